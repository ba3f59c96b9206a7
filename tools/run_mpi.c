/*
 * `pikv run` over MPI ranks (docs/distributed.md): starting and stopping MPI, the
 * communicator of the cache, and the few collectives of the CLI itself (gathering
 * every rank's figures on rank 0, agreeing on the exit status).
 *
 * Built with MPI when the library is (PIKV_HAVE_MPI, CMake PIKV_MPI); without it the
 * functions below report that MPI is missing and the run stays one process.
 *
 * When: --mpi always; without a flag, when the environment shows an MPI launcher
 * that started more than one rank (Open MPI's OMPI_COMM_WORLD_SIZE, MPICH/Hydra's
 * and Intel MPI's PMI_SIZE, MVAPICH2's MV2_COMM_WORLD_SIZE); --no-mpi never.
 */
#define _POSIX_C_SOURCE 200809L

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "run.h"

#ifdef PIKV_HAVE_MPI
#include <mpi.h>
#endif

static long env_long(const char *const *names)
{
    for (int i = 0; names[i]; i++) {
        const char *s = getenv(names[i]);
        if (!s || !*s) continue;
        char *end = NULL;
        long v = strtol(s, &end, 10);
        if (end && *end == '\0' && v >= 0) return v;
    }
    return -1;
}

int run_mpi_env_size(void)
{
    static const char *const names[] = {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE",
                                        NULL};
    long v = env_long(names);
    return v > 0 && v < (1L << 30) ? (int)v : 0;
}

int run_mpi_env_rank(void)
{
    static const char *const names[] = {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK",
                                        NULL};
    long v = env_long(names);
    return v >= 0 && v < (1L << 30) ? (int)v : 0;
}

int run_mpi_compiled(void)
{
#ifdef PIKV_HAVE_MPI
    return 1;
#else
    return 0;
#endif
}

/* ---- silencing a rank's output (the same usage error or help from every rank) --- */

void run_mpi_silence(run_mpi_silencer *s, int silence)
{
    s->saved_out = s->saved_err = -1;
    if (!silence) return;
    fflush(stdout);
    fflush(stderr);
    int null_fd = open("/dev/null", O_WRONLY);
    if (null_fd < 0) return;
    s->saved_out = dup(STDOUT_FILENO);
    s->saved_err = dup(STDERR_FILENO);
    if (s->saved_out >= 0) dup2(null_fd, STDOUT_FILENO);
    if (s->saved_err >= 0) dup2(null_fd, STDERR_FILENO);
    close(null_fd);
}

void run_mpi_unsilence(run_mpi_silencer *s)
{
    fflush(stdout);
    fflush(stderr);
    if (s->saved_out >= 0) {
        dup2(s->saved_out, STDOUT_FILENO);
        close(s->saved_out);
    }
    if (s->saved_err >= 0) {
        dup2(s->saved_err, STDERR_FILENO);
        close(s->saved_err);
    }
    s->saved_out = s->saved_err = -1;
}

/* ---- MPI ------------------------------------------------------------------------ */

int run_mpi_start(run_mpi *m)
{
    m->rank = 0;
    m->size = 1;
    m->active = 0;
#ifdef PIKV_HAVE_MPI
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) {
        int provided = 0;
        /* PiKV calls MPI from the thread that calls it (this one); the CPU backend's
           workers never call MPI */
        if (MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided) != MPI_SUCCESS) {
            fprintf(stderr, "pikv: MPI_Init_thread failed\n");
            return -1;
        }
        m->active = 1;
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &m->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &m->size);
    return 0;
#else
    fprintf(stderr, "pikv: this pikv was built without MPI (configure with -DPIKV_MPI=ON)\n");
    return -1;
#endif
}

pikv_status run_mpi_comm_create(const run_mpi *m, pikv_context *ctx, pikv_comm **out)
{
    *out = NULL;
#ifdef PIKV_HAVE_MPI
    (void)m;
    MPI_Comm world = MPI_COMM_WORLD;
    return pikv_comm_create_mpi(ctx, &world, out);
#else
    (void)m;
    (void)ctx;
    return PIKV_ERR_UNSUPPORTED;
#endif
}

int run_mpi_gather(const run_mpi *m, const void *mine, size_t bytes, void *all)
{
#ifdef PIKV_HAVE_MPI
    if (m->size > 1 || m->active) {
        if (bytes > (size_t)0x7fffffff) return -1;
        return MPI_Gather(mine, (int)bytes, MPI_BYTE, all, (int)bytes, MPI_BYTE, 0,
                          MPI_COMM_WORLD) == MPI_SUCCESS
                   ? 0
                   : -1;
    }
#endif
    (void)m;
    memcpy(all, mine, bytes);
    return 0;
}

int run_mpi_allgather(const run_mpi *m, const void *mine, size_t bytes, void *all)
{
#ifdef PIKV_HAVE_MPI
    if (m->size > 1 || m->active) {
        if (bytes > (size_t)0x7fffffff) return -1;
        return MPI_Allgather(mine, (int)bytes, MPI_BYTE, all, (int)bytes, MPI_BYTE,
                             MPI_COMM_WORLD) == MPI_SUCCESS
                   ? 0
                   : -1;
    }
#endif
    (void)m;
    memcpy(all, mine, bytes);
    return 0;
}

int run_mpi_max(const run_mpi *m, int value)
{
#ifdef PIKV_HAVE_MPI
    if (m->size > 1 || m->active) {
        int out = value;
        if (MPI_Allreduce(&value, &out, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD) != MPI_SUCCESS)
            return value > CLI_EXIT_FAIL ? value : CLI_EXIT_FAIL;
        return out;
    }
#endif
    (void)m;
    return value;
}

void run_mpi_finish(run_mpi *m)
{
#ifdef PIKV_HAVE_MPI
    if (m->active) {
        int finalized = 0;
        MPI_Finalized(&finalized);
        if (!finalized) MPI_Finalize();
    }
#endif
    m->active = 0;
}

void run_mpi_abort(run_mpi *m, int code)
{
#ifdef PIKV_HAVE_MPI
    if (m->active) {
        fflush(stdout);
        fflush(stderr);
        MPI_Abort(MPI_COMM_WORLD, code);
    }
#endif
    (void)m;
    (void)code;
}
