/*
 * Communicators (internal): the collectives PiKV needs between ranks, behind a
 * small vtable so the merge of attention partials (and the distribution code)
 * is written once for every implementation (NCCL, MPI, an in-process one in the
 * tests).
 *
 * The engine owns its communicator (MPI_Init, ncclCommInitRank...) and hands it
 * to PiKV, which never creates or destroys it (the MPI implementation works on
 * its own MPI_Comm_dup of it). Collectives follow the usual rules: every rank of
 * the communicator calls the same collectives in the same order with matching
 * sizes; a rank that fails before entering one (out of host memory, a count too
 * large for the implementation) leaves the others waiting in it, so an engine
 * treats any error of a collective call as fatal for the communicator.
 *
 * Failure state. The public wrappers below (pikv_comm_allreduce...) mark the
 * communicator failed (c->failed) when the implementation returns an error or
 * times out; from then on every collective fails at once with PIKV_ERR_BACKEND
 * and a message repeating why (c->failure). Argument errors the wrappers detect
 * themselves (NULL buffers, negative counts, an unknown op, a collective the
 * implementation lacks) do not: they are found before anything is entered, and
 * with arguments that agree across ranks every rank finds them alike.
 *
 * Statistics (pikv_comm_get_stats), counted by the wrappers after a collective
 * completed, as logical payload (what this rank contributes to and takes from
 * the other ranks, whatever algorithm moves it; size = number of ranks):
 *   allreduce of B bytes (n elements)  sent B, received B
 *   allgather of b bytes per rank      sent b (size - 1), received b (size - 1)
 *   allgatherv, counts[r] from rank r  sent counts[rank] (size - 1),
 *                                      received sum over r != rank of counts[r]
 *   alltoallv                          sent sum over r != rank of send_counts[r],
 *                                      received sum over r != rank of recv_counts[r]
 * and one collective each. A call with nothing to move on any rank (allreduce
 * n = 0, allgather bytes = 0, allgatherv with every count 0) is no collective
 * and counts nothing; alltoallv always is one (a rank cannot know whether the
 * others send).
 */
#ifndef PIKV_COMM_H
#define PIKV_COMM_H

#include "backend-impl.h"

typedef enum pikv_reduce_op {
    PIKV_REDUCE_SUM = 0,
    PIKV_REDUCE_MAX = 1,
    PIKV_REDUCE_MIN = 2
} pikv_reduce_op;

static inline const char *pikv_reduce_op_name(pikv_reduce_op op)
{
    switch (op) {
    case PIKV_REDUCE_SUM: return "SUM";
    case PIKV_REDUCE_MAX: return "MAX";
    case PIKV_REDUCE_MIN: return "MIN";
    }
    return "?";
}

/* Every entry takes and returns HOST memory, is finished when it returns, and is
   called only through the wrappers below (which validate the arguments, check
   c->failed and count statistics: implementations do not). Failures record a
   message in c->ctx. An entry left NULL is a collective the implementation
   lacks: its wrapper answers PIKV_ERR_UNSUPPORTED. Implementations honour
   c->timeout_s (seconds, 0 = wait forever) where they can wait. */
typedef struct pikv_comm_iface {
    /* In-place allreduce of buf[0..n) (n >= 1) over every rank. */
    pikv_status (*allreduce)(pikv_comm *c, float *buf, int64_t n, pikv_reduce_op op);
    /* Frees c->impl and what it holds (not the engine's communicator, not c). */
    void (*destroy)(pikv_comm *c);
    /* In-place allreduce of int64 buf[0..n) (n >= 1). */
    pikv_status (*allreduce_i64)(pikv_comm *c, int64_t *buf, int64_t n, pikv_reduce_op op);
    /* bytes (>= 1) from every rank: recv[size * bytes] holds rank r's at r * bytes.
       send and recv do not overlap. */
    pikv_status (*allgather)(pikv_comm *c, const void *send, int64_t bytes, void *recv);
    /* counts[r] bytes from rank r (the same counts on every rank, their sum >= 1):
       recv is their concatenation in rank order, send holds counts[c->rank] bytes.
       send and recv do not overlap; either may be NULL when it holds 0 bytes. */
    pikv_status (*allgatherv)(pikv_comm *c, const void *send, const int64_t *counts, void *recv);
    /* send_counts[r] bytes to rank r, recv_counts[r] bytes from rank r (which must
       equal what rank r sends here; send_counts[c->rank] == recv_counts[c->rank]).
       Both buffers are packed in rank order (displacements = prefix sums), do not
       overlap, and may be NULL when they hold 0 bytes. */
    pikv_status (*alltoallv)(pikv_comm *c, const void *send, const int64_t *send_counts,
                             void *recv, const int64_t *recv_counts);
    const char *name; /* "NCCL", "MPI"... for messages; NULL = "this" */
    /* Optional, both or neither: a non-blocking in-place allreduce of buf[0..n)
       (n >= 1). iallreduce posts it and returns an opaque *handle; wait completes it
       (buf holds the result then) and frees the handle, whatever it returns. buf must
       stay valid until wait returns; every rank posts its non-blocking collectives in
       the same order relative to all its other collectives (waits may come in any
       order). Implementations lacking them: pikv_comm_iallreduce runs the blocking
       allreduce at post time and pikv_comm_wait_request does nothing. */
    pikv_status (*iallreduce)(pikv_comm *c, float *buf, int64_t n, pikv_reduce_op op, void **handle);
    pikv_status (*wait)(pikv_comm *c, void *handle);
} pikv_comm_iface;

#define PIKV_COMM_FAILURE_LEN 320
#define PIKV_COMM_DEFAULT_TIMEOUT_S 300.0

struct pikv_comm {
    const pikv_comm_iface *iface;
    pikv_context *ctx;           /* errors and host memory */
    int32_t rank, size;
    void *impl;                  /* the implementation's state */
    /* How long a collective may wait for the other ranks, in seconds (0 = forever;
       pikv_comm_set_timeout). pikv_comm_init sets PIKV_COMM_DEFAULT_TIMEOUT_S. */
    double timeout_s;
    /* Set by the wrappers when a collective failed or timed out (see above);
       failure says why (the message of the failing call). */
    bool failed;
    char failure[PIKV_COMM_FAILURE_LEN];
    /* Statistics (pikv_comm_get_stats), counted by the wrappers below. */
    uint64_t bytes_sent, bytes_received;
    int64_t collectives;
};

/* Zeroes *c and fills it in, with the default timeout. */
void pikv_comm_init(pikv_comm *c, const pikv_comm_iface *iface, pikv_context *ctx,
                    int32_t rank, int32_t size, void *impl);

/* The collectives: validate, check c->failed, call the implementation, mark the
   communicator failed if it fails, count statistics (formulas above). Counts are
   elements for the allreduces, bytes for the others. */
pikv_status pikv_comm_allreduce(pikv_comm *c, float *buf, int64_t n, pikv_reduce_op op);
pikv_status pikv_comm_allreduce_i64(pikv_comm *c, int64_t *buf, int64_t n, pikv_reduce_op op);
pikv_status pikv_comm_allgather(pikv_comm *c, const void *send, int64_t bytes, void *recv);
pikv_status pikv_comm_allgatherv(pikv_comm *c, const void *send, const int64_t *counts,
                                 void *recv);
pikv_status pikv_comm_alltoallv(pikv_comm *c, const void *send, const int64_t *send_counts,
                                void *recv, const int64_t *recv_counts);

/* Non-blocking allreduce (see iface->iallreduce): validates, checks c->failed, posts
   (or, without iface->iallreduce, runs the blocking allreduce) and counts statistics
   at post time. *req is NULL when nothing was posted (n == 0, a failure, the blocking
   fallback); pikv_comm_wait_request(c, NULL) does nothing and returns PIKV_OK. A failing wait
   marks the communicator failed. Every request posted must be waited on. */
typedef struct pikv_comm_request pikv_comm_request;
pikv_status pikv_comm_iallreduce(pikv_comm *c, float *buf, int64_t n, pikv_reduce_op op,
                                 pikv_comm_request **req);
pikv_status pikv_comm_wait_request(pikv_comm *c, pikv_comm_request *req);

/* The merge of partials in two halves, for overlapping its large step with other
   work (pikv_comm_merge_partials = begin + end): begin checks the arguments, runs
   the MAX of lse (blocking, n_rows floats), packs and posts the SUM; end waits for
   it and writes out and lse (NULL merge: nothing to do). out and lse must stay
   valid and unchanged between begin and end; end must be called for every merge
   begin returned (it frees it, also when the wait fails). A failing begin returns
   *merge = NULL and leaves out and lse as they were. */
typedef struct pikv_comm_merge pikv_comm_merge;
pikv_status pikv_comm_merge_begin(pikv_comm *comm, int32_t n_rows, int32_t dim, float *out,
                                  float *lse, pikv_comm_merge **merge);
pikv_status pikv_comm_merge_end(pikv_comm *comm, pikv_comm_merge *merge);
/* As pikv_comm_merge_end, and when not NULL: *exposed_s = the seconds the SUM step
   blocked this rank (its post plus the wait; the whole allreduce with the blocking
   fallback), *posted_s = the seconds from its post to the end of the wait (>=
   *exposed_s; 0 and 0 for a NULL merge). */
pikv_status pikv_comm_merge_end_timed(pikv_comm *comm, pikv_comm_merge *merge, double *exposed_s,
                                      double *posted_s);

/* Waiting with a timeout, for implementations that poll: begin, then call
   pikv_comm_wait_pause between polls; for the first millisecond it yields the
   core, then it sleeps with a backoff growing to 1 ms (about 1/8 of the time
   waited so far, so a long wait does not burn a core and a short one is barely
   delayed), and returns false once c->timeout_s (when > 0) has passed. */
typedef struct pikv_comm_wait {
    double start;    /* monotonic seconds */
    uint32_t polls;
} pikv_comm_wait;
void pikv_comm_wait_begin(pikv_comm_wait *w);
bool pikv_comm_wait_pause(const pikv_comm *c, pikv_comm_wait *w);
double pikv_comm_wait_elapsed(const pikv_comm_wait *w);

#ifdef PIKV_HAVE_NCCL
/* backends/cuda/cuda-nccl.c: a communicator over the engine's ncclComm_t
   (nccl_comm) for CUDA device dev of the context. *out is freed with
   pikv_comm_free() (which frees the struct itself with the context's host
   allocator after iface->destroy). */
pikv_status pikv_comm_nccl_create(pikv_context *ctx, pikv_device *dev, void *nccl_comm,
                                  pikv_comm **out);
#endif

#ifdef PIKV_HAVE_MPI
/* runtime/comm-mpi.c: a communicator over an MPI_Comm_dup of *(MPI_Comm *)mpi_comm
   (collective over that communicator). Arguments are checked by the caller
   (pikv_comm_create_mpi). */
pikv_status pikv_comm_mpi_create(pikv_context *ctx, const void *mpi_comm, pikv_comm **out);
#endif

#endif /* PIKV_COMM_H */
