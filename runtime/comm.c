/* Communicators: the public API over the internal vtable (comm.h), and the
   exact merge of attention partials across ranks, written once for every
   implementation. */
#include "comm.h"

#include <math.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

void pikv_comm_init(pikv_comm *c, const pikv_comm_iface *iface, pikv_context *ctx,
                    int32_t rank, int32_t size, void *impl)
{
    memset(c, 0, sizeof *c);
    c->iface = iface;
    c->ctx = ctx;
    c->rank = rank;
    c->size = size;
    c->impl = impl;
    c->timeout_s = PIKV_COMM_DEFAULT_TIMEOUT_S;
}

/* ---- waiting ------------------------------------------------------------ */


void pikv_comm_wait_begin(pikv_comm_wait *w)
{
    w->start = pikv_monotonic_s();
    w->polls = 0;
}

double pikv_comm_wait_elapsed(const pikv_comm_wait *w)
{
    return pikv_monotonic_s() - w->start;
}

bool pikv_comm_wait_pause(const pikv_comm *c, pikv_comm_wait *w)
{
    double waited = pikv_monotonic_s() - w->start;
    if (c->timeout_s > 0.0 && waited >= c->timeout_s) return false;
    w->polls++;
    /* The first millisecond: poll as fast as the scheduler lets us, yielding the core
       between polls (most collectives finish by then, and with more ranks than cores a
       yield lets the peer we wait for run; sleeping instead costs the timer slack, some
       50 us, per poll). Then sleep about 1/8 of the time waited so far, up to 1 ms: at
       most ~12% added latency, and a rank waiting for a slow or stalled peer leaves its
       core to the others. */
    if (waited < 1e-3) {
        sched_yield();
        return true;
    }
    double pause = waited / 8.0;
    if (pause < 1e-6) pause = 1e-6;
    if (pause > 1e-3) pause = 1e-3;
    if (c->timeout_s > 0.0 && waited + pause > c->timeout_s) pause = c->timeout_s - waited + 1e-6;
    struct timespec ts;
    ts.tv_sec = 0;
    ts.tv_nsec = (long)(pause * 1e9);
    if (ts.tv_nsec >= 1000000000L) ts.tv_nsec = 999999999L;
    (void)nanosleep(&ts, NULL); /* EINTR: just poll earlier */
    return true;
}

/* ---- the collective wrappers ------------------------------------------- */

/* "the MPI" or "this" (before "communicator"), for messages */
static const char *comm_the(const pikv_comm *c)
{
    return c->iface && c->iface->name ? "the " : "";
}
static const char *comm_kind(const pikv_comm *c)
{
    return c->iface && c->iface->name ? c->iface->name : "this";
}

/* A collective on a communicator marked failed: fails at once, saying why. */
static pikv_status comm_broken(pikv_comm *c, const char *what)
{
    return PIKV_FAIL(c->ctx, PIKV_ERR_BACKEND,
                     "comm_%s: %s%s communicator (rank %d of %d) is broken, every collective on "
                     "it fails (the job should abort it): %s",
                     what, comm_the(c), comm_kind(c), (int)c->rank, (int)c->size, c->failure);
}

static pikv_status comm_unsupported(pikv_comm *c, const char *what)
{
    return PIKV_FAIL(c->ctx, PIKV_ERR_UNSUPPORTED,
                     "comm_%s: %s%s communicator does not implement %s", what, comm_the(c),
                     comm_kind(c), what);
}

/* Marks c failed after its implementation returned st from collective `what`;
   the reason is the message the implementation recorded. */
static pikv_status comm_mark_failed(pikv_comm *c, const char *what, pikv_status st)
{
    if (!c->failed) {
        c->failed = true;
        int n = snprintf(c->failure, sizeof c->failure, "an earlier %s failed with %s: ", what,
                         pikv_status_name(st));
        if (n < 0) n = 0;
        if ((size_t)n < sizeof c->failure) {
            size_t room = sizeof c->failure - (size_t)n;
            size_t len = strlen(c->ctx->last_error);
            if (len >= room) len = room - 1;
            memcpy(c->failure + n, c->ctx->last_error, len);
            c->failure[(size_t)n + len] = '\0';
        }
    }
    return st;
}

static void comm_count(pikv_comm *c, uint64_t sent, uint64_t received)
{
    c->bytes_sent += sent;
    c->bytes_received += received;
    c->collectives++;
}

static bool comm_overlap(const void *a, uint64_t na, const void *b, uint64_t nb)
{
    if (!na || !nb) return false;
    uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return x < y + nb && y < x + na;
}

static pikv_status check_allreduce_args(pikv_comm *c, const char *what, const void *buf,
                                        int64_t n, pikv_reduce_op op, size_t elem)
{
    PIKV_RETURN_ERROR_IF(n < 0 || (uint64_t)n > (uint64_t)INT64_MAX / elem ||
                         (uint64_t)n > SIZE_MAX / elem, c->ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_%s: n = %lld is negative or too large", what, (long long)n);
    PIKV_RETURN_ERROR_IF(n > 0 && !buf, c->ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_%s: buf is NULL (n = %lld)", what, (long long)n);
    PIKV_RETURN_ERROR_IF(op != PIKV_REDUCE_SUM && op != PIKV_REDUCE_MAX && op != PIKV_REDUCE_MIN,
                         c->ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_%s: op = %d is not a reduce op (SUM, MAX, MIN)", what, (int)op);
    return PIKV_OK;
}

pikv_status pikv_comm_allreduce(pikv_comm *c, float *buf, int64_t n, pikv_reduce_op op)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    if (c->failed) return comm_broken(c, "allreduce");
    PIKV_FORWARD_IF_ERROR(check_allreduce_args(c, "allreduce", buf, n, op, sizeof(float)));
    if (n == 0) return PIKV_OK; /* the same on every rank: no collective */
    if (!c->iface->allreduce) return comm_unsupported(c, "allreduce");
    pikv_status st = c->iface->allreduce(c, buf, n, op);
    if (st != PIKV_OK) return comm_mark_failed(c, "allreduce", st);
    /* Logical payload: B = 4n bytes sent and B received per rank, independent of
       how the implementation moves them (a ring moves about 2B(size-1)/size each
       way, a tree or an in-process one otherwise). */
    uint64_t bytes = (uint64_t)n * sizeof(float);
    comm_count(c, bytes, bytes);
    return PIKV_OK;
}

/* A posted non-blocking collective: the implementation's handle. */
struct pikv_comm_request {
    void *handle;
};

pikv_status pikv_comm_iallreduce(pikv_comm *c, float *buf, int64_t n, pikv_reduce_op op,
                                 pikv_comm_request **req)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    PIKV_RETURN_ERROR_IF(!req, c->ctx, PIKV_ERR_INVALID_ARGUMENT, "comm_iallreduce: req is NULL");
    *req = NULL;
    if (c->failed) return comm_broken(c, "iallreduce");
    PIKV_FORWARD_IF_ERROR(check_allreduce_args(c, "iallreduce", buf, n, op, sizeof(float)));
    if (n == 0) return PIKV_OK; /* the same on every rank: no collective */
    if (!c->iface->iallreduce || !c->iface->wait) /* the blocking fallback: done at post time */
        return pikv_comm_allreduce(c, buf, n, op);
    pikv_comm_request *r = pikv_host_alloc(c->ctx, sizeof *r, 16);
    if (!r) {
        /* the other ranks post it: they would wait for this one */
        pikv_status st = PIKV_FAIL(c->ctx, PIKV_ERR_OUT_OF_MEMORY,
                                   "comm_iallreduce: host allocation of a request failed");
        return comm_mark_failed(c, "iallreduce", st);
    }
    r->handle = NULL;
    pikv_status st = c->iface->iallreduce(c, buf, n, op, &r->handle);
    if (st != PIKV_OK) {
        pikv_host_free(c->ctx, r);
        return comm_mark_failed(c, "iallreduce", st);
    }
    uint64_t bytes = (uint64_t)n * sizeof(float); /* counted at post time */
    comm_count(c, bytes, bytes);
    *req = r;
    return PIKV_OK;
}

pikv_status pikv_comm_wait_request(pikv_comm *c, pikv_comm_request *req)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    if (!req) return PIKV_OK;
    /* the implementation frees its handle whatever happens (also on a broken
       communicator, where it gives up at once or times out) */
    pikv_status st = c->iface->wait(c, req->handle);
    pikv_host_free(c->ctx, req);
    if (st != PIKV_OK) return comm_mark_failed(c, "iallreduce (wait)", st);
    return PIKV_OK;
}

pikv_status pikv_comm_allreduce_i64(pikv_comm *c, int64_t *buf, int64_t n, pikv_reduce_op op)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    if (c->failed) return comm_broken(c, "allreduce_i64");
    PIKV_FORWARD_IF_ERROR(check_allreduce_args(c, "allreduce_i64", buf, n, op, sizeof(int64_t)));
    if (n == 0) return PIKV_OK;
    if (!c->iface->allreduce_i64) return comm_unsupported(c, "allreduce_i64");
    pikv_status st = c->iface->allreduce_i64(c, buf, n, op);
    if (st != PIKV_OK) return comm_mark_failed(c, "allreduce_i64", st);
    uint64_t bytes = (uint64_t)n * sizeof(int64_t);
    comm_count(c, bytes, bytes);
    return PIKV_OK;
}

pikv_status pikv_comm_allgather(pikv_comm *c, const void *send, int64_t bytes, void *recv)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    if (c->failed) return comm_broken(c, "allgather");
    PIKV_RETURN_ERROR_IF(bytes < 0, c->ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_allgather: bytes = %lld is negative", (long long)bytes);
    PIKV_RETURN_ERROR_IF((uint64_t)bytes > (uint64_t)INT64_MAX / (uint64_t)c->size ||
                         (uint64_t)bytes * (uint64_t)c->size > SIZE_MAX, c->ctx,
                         PIKV_ERR_INVALID_ARGUMENT,
                         "comm_allgather: %lld bytes from each of %d ranks overflow",
                         (long long)bytes, (int)c->size);
    if (bytes == 0) return PIKV_OK; /* the same on every rank: no collective */
    uint64_t total = (uint64_t)bytes * (uint64_t)c->size;
    PIKV_RETURN_ERROR_IF(!send, c->ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_allgather: send is NULL (bytes = %lld)", (long long)bytes);
    PIKV_RETURN_ERROR_IF(!recv, c->ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_allgather: recv is NULL (%llu bytes)", (unsigned long long)total);
    PIKV_RETURN_ERROR_IF(comm_overlap(send, (uint64_t)bytes, recv, total), c->ctx,
                         PIKV_ERR_INVALID_ARGUMENT,
                         "comm_allgather: send (%lld bytes) overlaps recv (%llu bytes)",
                         (long long)bytes, (unsigned long long)total);
    if (!c->iface->allgather) return comm_unsupported(c, "allgather");
    pikv_status st = c->iface->allgather(c, send, bytes, recv);
    if (st != PIKV_OK) return comm_mark_failed(c, "allgather", st);
    uint64_t others = (uint64_t)bytes * (uint64_t)(c->size - 1);
    comm_count(c, others, others);
    return PIKV_OK;
}

/* Checks counts[0..size) >= 0 and sums them (overflow-checked into *total and
   *others, the sum without this rank's count). */
static pikv_status check_counts(pikv_comm *c, const char *what, const char *name,
                                const int64_t *counts, uint64_t *total, uint64_t *others)
{
    PIKV_RETURN_ERROR_IF(!counts, c->ctx, PIKV_ERR_INVALID_ARGUMENT, "comm_%s: %s is NULL",
                         what, name);
    uint64_t sum = 0;
    for (int32_t r = 0; r < c->size; r++) {
        PIKV_RETURN_ERROR_IF(counts[r] < 0, c->ctx, PIKV_ERR_INVALID_ARGUMENT,
                             "comm_%s: %s[%d] = %lld is negative", what, name, (int)r,
                             (long long)counts[r]);
        sum += (uint64_t)counts[r];
        PIKV_RETURN_ERROR_IF(sum > (uint64_t)INT64_MAX || sum > SIZE_MAX, c->ctx,
                             PIKV_ERR_INVALID_ARGUMENT,
                             "comm_%s: the sum of %s[0..%d] overflows", what, name, (int)r);
    }
    *total = sum;
    *others = sum - (uint64_t)counts[c->rank];
    return PIKV_OK;
}

pikv_status pikv_comm_allgatherv(pikv_comm *c, const void *send, const int64_t *counts,
                                 void *recv)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    if (c->failed) return comm_broken(c, "allgatherv");
    uint64_t total = 0, others = 0;
    PIKV_FORWARD_IF_ERROR(check_counts(c, "allgatherv", "counts", counts, &total, &others));
    if (total == 0) return PIKV_OK; /* counts are the same on every rank: no collective */
    uint64_t mine = (uint64_t)counts[c->rank];
    PIKV_RETURN_ERROR_IF(mine > 0 && !send, c->ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_allgatherv: send is NULL (counts[%d] = %llu)", (int)c->rank,
                         (unsigned long long)mine);
    PIKV_RETURN_ERROR_IF(!recv, c->ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_allgatherv: recv is NULL (%llu bytes)", (unsigned long long)total);
    PIKV_RETURN_ERROR_IF(comm_overlap(send, mine, recv, total), c->ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_allgatherv: send (%llu bytes) overlaps recv (%llu bytes)",
                         (unsigned long long)mine, (unsigned long long)total);
    if (!c->iface->allgatherv) return comm_unsupported(c, "allgatherv");
    pikv_status st = c->iface->allgatherv(c, mine ? send : NULL, counts, recv);
    if (st != PIKV_OK) return comm_mark_failed(c, "allgatherv", st);
    comm_count(c, mine * (uint64_t)(c->size - 1), others);
    return PIKV_OK;
}

pikv_status pikv_comm_alltoallv(pikv_comm *c, const void *send, const int64_t *send_counts,
                                void *recv, const int64_t *recv_counts)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    if (c->failed) return comm_broken(c, "alltoallv");
    uint64_t send_total = 0, send_others = 0, recv_total = 0, recv_others = 0;
    PIKV_FORWARD_IF_ERROR(check_counts(c, "alltoallv", "send_counts", send_counts, &send_total,
                                       &send_others));
    PIKV_FORWARD_IF_ERROR(check_counts(c, "alltoallv", "recv_counts", recv_counts, &recv_total,
                                       &recv_others));
    PIKV_RETURN_ERROR_IF(send_counts[c->rank] != recv_counts[c->rank], c->ctx,
                         PIKV_ERR_INVALID_ARGUMENT,
                         "comm_alltoallv: send_counts[%d] = %lld differs from recv_counts[%d] = "
                         "%lld (what this rank sends itself)", (int)c->rank,
                         (long long)send_counts[c->rank], (int)c->rank,
                         (long long)recv_counts[c->rank]);
    PIKV_RETURN_ERROR_IF(send_total > 0 && !send, c->ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_alltoallv: send is NULL (%llu bytes)",
                         (unsigned long long)send_total);
    PIKV_RETURN_ERROR_IF(recv_total > 0 && !recv, c->ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_alltoallv: recv is NULL (%llu bytes)",
                         (unsigned long long)recv_total);
    PIKV_RETURN_ERROR_IF(comm_overlap(send, send_total, recv, recv_total), c->ctx,
                         PIKV_ERR_INVALID_ARGUMENT,
                         "comm_alltoallv: send (%llu bytes) overlaps recv (%llu bytes)",
                         (unsigned long long)send_total, (unsigned long long)recv_total);
    if (!c->iface->alltoallv) return comm_unsupported(c, "alltoallv");
    /* Always a collective: this rank cannot know whether the others send. */
    pikv_status st = c->iface->alltoallv(c, send_total ? send : NULL, send_counts,
                                         recv_total ? recv : NULL, recv_counts);
    if (st != PIKV_OK) return comm_mark_failed(c, "alltoallv", st);
    comm_count(c, send_others, recv_others);
    return PIKV_OK;
}

/* ---- public API -------------------------------------------------------- */

pikv_status pikv_comm_create_mpi(pikv_context *ctx, const void *mpi_comm, pikv_comm **out)
{
    if (!ctx) return PIKV_ERR_INVALID_ARGUMENT;
    PIKV_RETURN_ERROR_IF(!out, ctx, PIKV_ERR_INVALID_ARGUMENT, "comm_create_mpi: out is NULL");
    *out = NULL;
    PIKV_RETURN_ERROR_IF(!mpi_comm, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_create_mpi: mpi_comm is NULL (pass a pointer to an MPI_Comm)");
#ifdef PIKV_HAVE_MPI
    return pikv_comm_mpi_create(ctx, mpi_comm, out);
#else
    return PIKV_FAIL(ctx, PIKV_ERR_UNSUPPORTED,
                     "comm_create_mpi: this build of PiKV has no MPI support (configure with "
                     "-DPIKV_MPI=ON and an MPI library, e.g. Debian's libopenmpi-dev)");
#endif
}

pikv_status pikv_comm_set_timeout(pikv_comm *comm, double seconds)
{
    if (!comm) return PIKV_ERR_INVALID_ARGUMENT;
    PIKV_RETURN_ERROR_IF(!(seconds >= 0.0) || isinf(seconds), comm->ctx,
                         PIKV_ERR_INVALID_ARGUMENT,
                         "comm_set_timeout: seconds = %g is not a finite number >= 0 (0 = wait "
                         "forever)", seconds);
    comm->timeout_s = seconds;
    return PIKV_OK;
}

pikv_status pikv_comm_create_nccl(pikv_context *ctx, int32_t device, void *nccl_comm,
                                  pikv_comm **out)
{
    if (!ctx) return PIKV_ERR_INVALID_ARGUMENT;
    PIKV_RETURN_ERROR_IF(!out, ctx, PIKV_ERR_INVALID_ARGUMENT, "comm_create_nccl: out is NULL");
    *out = NULL;
    PIKV_RETURN_ERROR_IF(device < 0 || device >= ctx->n_devices, ctx, PIKV_ERR_OUT_OF_RANGE,
                         "comm_create_nccl: device %d is outside 0..%d", device,
                         ctx->n_devices - 1);
    PIKV_RETURN_ERROR_IF(!nccl_comm, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_create_nccl: nccl_comm is NULL");
    pikv_device *dev = ctx->devices[device];
    PIKV_RETURN_ERROR_IF(dev->info.backend != PIKV_BACKEND_CUDA, ctx, PIKV_ERR_UNSUPPORTED,
                         "comm_create_nccl: device %d (%s) is a %s device, not a CUDA device",
                         device, dev->info.name, pikv_backend_name(dev->info.backend));
#ifdef PIKV_HAVE_NCCL
    return pikv_comm_nccl_create(ctx, dev, nccl_comm, out);
#else
    return PIKV_FAIL(ctx, PIKV_ERR_UNSUPPORTED,
                     "comm_create_nccl: this build of PiKV has no NCCL support "
                     "(configure with -DPIKV_CUDA=ON -DPIKV_NCCL=ON)");
#endif
}

void pikv_comm_free(pikv_comm *comm)
{
    if (!comm) return;
    pikv_context *ctx = comm->ctx;
    if (comm->iface && comm->iface->destroy) comm->iface->destroy(comm);
    pikv_host_free(ctx, comm);
}

int32_t pikv_comm_rank(const pikv_comm *comm)
{
    return comm ? comm->rank : -1;
}

int32_t pikv_comm_size(const pikv_comm *comm)
{
    return comm ? comm->size : 0;
}

pikv_status pikv_comm_get_stats(const pikv_comm *comm, pikv_comm_stats *out)
{
    if (!comm) return PIKV_ERR_INVALID_ARGUMENT;
    PIKV_RETURN_ERROR_IF(!out, comm->ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_get_stats: out is NULL");
    memset(out, 0, sizeof *out);
    out->bytes_sent = comm->bytes_sent;
    out->bytes_received = comm->bytes_received;
    out->collectives = comm->collectives;
    return PIKV_OK;
}

/*
 * The exact merge of per-rank partials (flash-decoding across ranks), the same
 * arithmetic as the CPU merge op (backends/cpu/cpu-merge.c) with the sums taken
 * by allreduces:
 *   1. m = allreduce MAX of lse                          (n_rows floats)
 *   2. w = exp(lse - m) (0 for an empty row, or m = -inf); pack
 *      [w * out (n_rows x dim) | w (n_rows)], allreduce SUM  (n_rows (dim + 1) floats)
 *   3. out = sum(w out) * (1 / sum w), lse = m + log(sum w); rows empty on every
 *      rank (m = -inf) get zeros and -inf.
 * Two collectives, n_rows (dim + 2) floats of payload. On a rank whose row is
 * empty (lse = -inf) the row of out is not read, so anything there is ignored;
 * NaN elsewhere propagates. out and lse are written only after both collectives
 * succeeded, so a failure leaves them as they were.
 */
struct pikv_comm_merge {
    size_t rows, d;
    float *out, *lse;
    float *pack;              /* [w * out | w | m] */
    pikv_comm_request *req;   /* the SUM (NULL: done at post time) */
    double posted_at, post_s; /* when the SUM was posted, how long posting took */
};

pikv_status pikv_comm_merge_begin(pikv_comm *comm, int32_t n_rows, int32_t dim, float *out,
                                  float *lse, pikv_comm_merge **merge)
{
    if (!comm) return PIKV_ERR_INVALID_ARGUMENT;
    pikv_context *ctx = comm->ctx;
    PIKV_RETURN_ERROR_IF(!merge, ctx, PIKV_ERR_INVALID_ARGUMENT, "comm_merge_partials: merge is NULL");
    *merge = NULL;
    if (comm->failed) return comm_broken(comm, "merge_partials");
    PIKV_RETURN_ERROR_IF(n_rows < 0, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_merge_partials: n_rows = %d is negative", n_rows);
    PIKV_RETURN_ERROR_IF(dim < 1 || dim > 1024, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_merge_partials: dim = %d is outside 1..1024", dim);
    PIKV_RETURN_ERROR_IF(!out, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_merge_partials: out is NULL (n_rows = %d, dim = %d)", n_rows, dim);
    PIKV_RETURN_ERROR_IF(!lse, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_merge_partials: lse is NULL (n_rows = %d)", n_rows);
    if (n_rows == 0) return PIKV_OK; /* the same on every rank: no collective */

    /* [w * out | w | m]: the first n_rows (dim + 1) floats are reduced, m stays here,
       so out and lse are only written once both collectives succeeded. */
    size_t rows = (size_t)n_rows, d = (size_t)dim, n_pack, bytes;
    if (!pikv_mul_size(rows, d + 1, &n_pack) ||
        !pikv_mul_size(n_pack + rows, sizeof(float), &bytes))
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY,
                         "comm_merge_partials: %d rows of %d floats overflow size_t", n_rows, dim);
    pikv_comm_merge *m = pikv_host_alloc(ctx, sizeof *m, 16);
    float *pack = pikv_host_alloc(ctx, bytes, 64);
    if (!m || !pack) {
        pikv_host_free(ctx, m);
        pikv_host_free(ctx, pack);
        /* The other ranks are (or will be) waiting in the first allreduce. */
        pikv_status st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY,
                                   "comm_merge_partials: host allocation of %zu bytes failed",
                                   bytes + sizeof *m);
        return comm_mark_failed(comm, "merge_partials", st);
    }
    m->rows = rows;
    m->d = d;
    m->out = out;
    m->lse = lse;
    m->pack = pack;
    m->req = NULL;
    float *wsum = pack + rows * d, *lmax = wsum + rows;

    memcpy(lmax, lse, rows * sizeof(float));
    pikv_status st = pikv_comm_allreduce(comm, lmax, (int64_t)rows, PIKV_REDUCE_MAX);
    if (st == PIKV_OK) {
        for (size_t r = 0; r < rows; r++) {
            float mx = lmax[r], l = lse[r];
            float *p = pack + r * d;
            const float *o = out + r * d;
            float w = 0.0f;
            if (l == -INFINITY || mx == -INFINITY) {
                memset(p, 0, d * sizeof(float));
            } else {
                w = expf(l - mx);
                for (size_t j = 0; j < d; j++) p[j] = w * o[j];
            }
            wsum[r] = w;
        }
        m->posted_at = pikv_monotonic_s();
        st = pikv_comm_iallreduce(comm, pack, (int64_t)n_pack, PIKV_REDUCE_SUM, &m->req);
        m->post_s = pikv_monotonic_s() - m->posted_at;
    }
    if (st != PIKV_OK) {
        pikv_host_free(ctx, pack);
        pikv_host_free(ctx, m);
        return st;
    }
    *merge = m;
    return PIKV_OK;
}

pikv_status pikv_comm_merge_end(pikv_comm *comm, pikv_comm_merge *m)
{
    return pikv_comm_merge_end_timed(comm, m, NULL, NULL);
}

pikv_status pikv_comm_merge_end_timed(pikv_comm *comm, pikv_comm_merge *m, double *exposed_s,
                                      double *posted_s)
{
    if (exposed_s) *exposed_s = 0.0;
    if (posted_s) *posted_s = 0.0;
    if (!comm) return PIKV_ERR_INVALID_ARGUMENT;
    if (!m) return PIKV_OK;
    pikv_context *ctx = comm->ctx;
    const double t0 = pikv_monotonic_s();
    pikv_status st = pikv_comm_wait_request(comm, m->req);
    const double t1 = pikv_monotonic_s();
    if (exposed_s) *exposed_s = m->post_s + (t1 - t0);
    if (posted_s) *posted_s = t1 - m->posted_at;
    if (st == PIKV_OK) {
        const size_t rows = m->rows, d = m->d;
        const float *wsum = m->pack + rows * d, *lmax = wsum + rows;
        for (size_t r = 0; r < rows; r++) {
            float mx = lmax[r], sum = wsum[r];
            float *o = m->out + r * d;
            if (mx == -INFINITY) { /* empty on every rank */
                memset(o, 0, d * sizeof(float));
                m->lse[r] = -INFINITY;
                continue;
            }
            const float *p = m->pack + r * d;
            float inv = 1.0f / sum;
            for (size_t j = 0; j < d; j++) o[j] = p[j] * inv;
            m->lse[r] = mx + logf(sum);
        }
    }
    pikv_host_free(ctx, m->pack);
    pikv_host_free(ctx, m);
    return st;
}

pikv_status pikv_comm_merge_partials(pikv_comm *comm, int32_t n_rows, int32_t dim, float *out,
                                     float *lse)
{
    if (!comm) return PIKV_ERR_INVALID_ARGUMENT;
    pikv_comm_merge *m = NULL;
    PIKV_FORWARD_IF_ERROR(pikv_comm_merge_begin(comm, n_rows, dim, out, lse, &m));
    return pikv_comm_merge_end(comm, m);
}
