/* The MPI communicator (runtime/comm.h): collectives over the engine's MPI
 * communicator, built only with MPI (PIKV_HAVE_MPI).
 *
 * Isolation. PiKV never initializes, finalizes or frees anything of the
 * engine's: it takes an MPI_Comm_dup of the engine's communicator (so its
 * messages can never match the engine's), sets MPI_ERRORS_RETURN on that dup
 * (MPI errors come back as codes, turned into PIKV_ERR_BACKEND with
 * MPI_Error_string, instead of aborting the job) and frees the dup in
 * pikv_comm_free. The dup is taken with MPI_Comm_idup and waited on like a
 * collective, so a rank that never calls pikv_comm_create_mpi makes the others
 * time out instead of hanging.
 *
 * Collectives. Each one is the non-blocking MPI call (MPI_Iallreduce,
 * MPI_Iallgather, MPI_Iallgatherv, MPI_Ialltoallv; payloads as MPI_BYTE, MPI_FLOAT
 * or MPI_INT64_T with int counts) completed by polling MPI_Test with a backoff
 * (pikv_comm_wait_pause: a few yields, then sleeps growing to 1 ms, so a rank
 * waiting for a slow peer does not burn a core) until it is done or c->timeout_s
 * has passed. The payload is staged through a buffer of the communicator (grown
 * on demand): MPI only ever reads and writes that buffer, never the caller's.
 *
 * Non-blocking allreduce (iface->iallreduce, wait): MPI_Iallreduce on a staging
 * buffer of its own (several may be in flight), polled like the others by wait
 * (the timeout counts from the start of the wait), the result copied to the
 * caller's buffer on completion.
 *
 * Timeouts. When a collective does not complete in time, the call fails with
 * PIKV_ERR_BACKEND and the communicator is marked failed (runtime/comm.c). MPI
 * forbids cancelling or freeing the request of a non-blocking collective, so it
 * stays active, and so does the staging buffer it uses: the buffer is set aside
 * (never reused) so that a rank joining late completes the collective against
 * valid memory instead of whatever the caller reuses its buffers for.
 * pikv_comm_free frees it if the request has completed by then (or MPI is
 * finalized) and leaks it otherwise; a job whose collective timed out is expected
 * to abort (MPI_Abort).
 */
#include "comm.h"

#include <mpi.h>

#include <limits.h>
#include <stdio.h>
#include <string.h>

#if !defined(MPI_VERSION) || MPI_VERSION < 3
#error "PiKV's MPI communicator needs MPI 3 or newer (non-blocking collectives, MPI_Comm_idup)"
#endif

typedef struct mpi_comm_impl {
    MPI_Comm comm;               /* PiKV's dup of the engine's communicator */
    unsigned char *scratch;      /* staging buffer of the collectives */
    size_t scratch_bytes;
    /* A collective abandoned by a timeout: its active request, and the staging
       buffer it still reads and writes. */
    MPI_Request abandoned;
    void *abandoned_buf;
} mpi_comm_impl;

static pikv_status mpi_fail(pikv_comm *c, int err, const char *what)
{
    char text[MPI_MAX_ERROR_STRING + 1];
    int len = 0;
    if (MPI_Error_string(err, text, &len) != MPI_SUCCESS || len < 0 ||
        len > MPI_MAX_ERROR_STRING)
        len = snprintf(text, sizeof text, "unknown MPI error");
    text[len] = '\0';
    return PIKV_FAIL(c->ctx, PIKV_ERR_BACKEND, "MPI communicator, rank %d of %d: %s failed: %s (%d)",
                     (int)c->rank, (int)c->size, what, text, err);
}

/* Sets the staging buffer (and the request using it) aside for good. */
static void mpi_abandon(mpi_comm_impl *impl, MPI_Request req)
{
    if (impl->abandoned_buf) return; /* cannot happen: the communicator is failed after one */
    impl->abandoned = req;
    impl->abandoned_buf = impl->scratch;
    impl->scratch = NULL;
    impl->scratch_bytes = 0;
}

/* Polls *req until it completes, fails, or c->timeout_s has passed. */
static pikv_status mpi_wait(pikv_comm *c, mpi_comm_impl *impl, MPI_Request *req, const char *what)
{
    pikv_comm_wait w;
    pikv_comm_wait_begin(&w);
    for (;;) {
        int done = 0;
        int err = MPI_Test(req, &done, MPI_STATUS_IGNORE);
        if (err != MPI_SUCCESS) {
            /* A request that failed has usually been freed; if not, MPI may still
               use the staging buffer. */
            if (*req != MPI_REQUEST_NULL) mpi_abandon(impl, *req);
            return mpi_fail(c, err, what);
        }
        if (done) return PIKV_OK;
        if (!pikv_comm_wait_pause(c, &w)) {
            mpi_abandon(impl, *req);
            return PIKV_FAIL(c->ctx, PIKV_ERR_BACKEND,
                             "MPI communicator, rank %d of %d: %s did not complete in %g s: a rank "
                             "failed or stalled before taking part (timeout: pikv_comm_set_timeout; "
                             "the communicator is broken, abort the job)",
                             (int)c->rank, (int)c->size, what, c->timeout_s);
        }
    }
}

/* A staging buffer of at least bytes bytes (contents not kept). */
static pikv_status mpi_scratch(pikv_comm *c, mpi_comm_impl *impl, size_t bytes, const char *what)
{
    if (bytes == 0) bytes = 1;
    if (bytes <= impl->scratch_bytes) return PIKV_OK;
    size_t want = impl->scratch_bytes * 2 > bytes ? impl->scratch_bytes * 2 : bytes;
    unsigned char *p = pikv_host_alloc(c->ctx, want, 64);
    if (!p && want > bytes) p = pikv_host_alloc(c->ctx, want = bytes, 64);
    PIKV_RETURN_ERROR_IF(!p, c->ctx, PIKV_ERR_OUT_OF_MEMORY,
                         "MPI communicator, rank %d of %d: %s: host allocation of a %zu-byte "
                         "staging buffer failed", (int)c->rank, (int)c->size, what, bytes);
    pikv_host_free(c->ctx, impl->scratch);
    impl->scratch = p;
    impl->scratch_bytes = want;
    return PIKV_OK;
}

static pikv_status mpi_count_fails(pikv_comm *c, const char *what, const char *name, int peer,
                                   uint64_t value)
{
    char of[32] = "";
    if (peer >= 0) snprintf(of, sizeof of, " of rank %d", peer);
    return PIKV_FAIL(c->ctx, PIKV_ERR_UNSUPPORTED,
                     "MPI communicator, rank %d of %d: %s: %s%s = %llu does not fit in an int "
                     "(MPI's count type, at most %d)",
                     (int)c->rank, (int)c->size, what, name, of, (unsigned long long)value,
                     INT_MAX);
}

static size_t round_up8(size_t n) { return (n + 7) & ~(size_t)7; }

/* ---- allreduce ------------------------------------------------------------ */

static pikv_status mpi_op(pikv_comm *c, pikv_reduce_op op, MPI_Op *out)
{
    switch (op) {
    case PIKV_REDUCE_SUM: *out = MPI_SUM; return PIKV_OK;
    case PIKV_REDUCE_MAX: *out = MPI_MAX; return PIKV_OK;
    case PIKV_REDUCE_MIN: *out = MPI_MIN; return PIKV_OK;
    }
    return PIKV_FAIL(c->ctx, PIKV_ERR_INTERNAL, "MPI allreduce: unknown reduce op %d", (int)op);
}

static pikv_status mpi_allreduce_any(pikv_comm *c, void *buf, int64_t n, size_t elem,
                                     MPI_Datatype type, pikv_reduce_op op)
{
    mpi_comm_impl *impl = (mpi_comm_impl *)c->impl;
    const char *what = "MPI_Iallreduce";
    if (n > INT_MAX) return mpi_count_fails(c, what, "the element count", -1, (uint64_t)n);
    MPI_Op mop = MPI_SUM;
    PIKV_FORWARD_IF_ERROR(mpi_op(c, op, &mop));
    size_t bytes = (size_t)n * elem;
    PIKV_FORWARD_IF_ERROR(mpi_scratch(c, impl, bytes, what));
    memcpy(impl->scratch, buf, bytes);
    MPI_Request req = MPI_REQUEST_NULL;
    int err = MPI_Iallreduce(MPI_IN_PLACE, impl->scratch, (int)n, type, mop, impl->comm, &req);
    if (err != MPI_SUCCESS) return mpi_fail(c, err, what);
    PIKV_FORWARD_IF_ERROR(mpi_wait(c, impl, &req, what));
    memcpy(buf, impl->scratch, bytes);
    return PIKV_OK;
}

static pikv_status mpi_allreduce(pikv_comm *c, float *buf, int64_t n, pikv_reduce_op op)
{
    return mpi_allreduce_any(c, buf, n, sizeof(float), MPI_FLOAT, op);
}

static pikv_status mpi_allreduce_i64(pikv_comm *c, int64_t *buf, int64_t n, pikv_reduce_op op)
{
    return mpi_allreduce_any(c, buf, n, sizeof(int64_t), MPI_INT64_T, op);
}

/* A posted MPI_Iallreduce: its request, its own staging buffer (several may be in
   flight, so not the communicator's) and where the result goes. */
typedef struct mpi_pending {
    MPI_Request req;
    float *buf;                  /* the caller's */
    size_t bytes;
    unsigned char *stage;        /* what MPI reads and writes */
} mpi_pending;

static pikv_status mpi_iallreduce(pikv_comm *c, float *buf, int64_t n, pikv_reduce_op op,
                                  void **handle)
{
    mpi_comm_impl *impl = (mpi_comm_impl *)c->impl;
    const char *what = "MPI_Iallreduce (non-blocking)";
    if (n > INT_MAX) return mpi_count_fails(c, what, "the element count", -1, (uint64_t)n);
    MPI_Op mop = MPI_SUM;
    PIKV_FORWARD_IF_ERROR(mpi_op(c, op, &mop));
    const size_t bytes = (size_t)n * sizeof(float);
    mpi_pending *p = pikv_host_alloc(c->ctx, sizeof *p, 16);
    unsigned char *stage = pikv_host_alloc(c->ctx, bytes, 64);
    if (!p || !stage) {
        pikv_host_free(c->ctx, p);
        pikv_host_free(c->ctx, stage);
        return PIKV_FAIL(c->ctx, PIKV_ERR_OUT_OF_MEMORY,
                         "MPI communicator, rank %d of %d: %s: host allocation of a %zu-byte "
                         "staging buffer failed", (int)c->rank, (int)c->size, what, bytes);
    }
    memcpy(stage, buf, bytes);
    p->req = MPI_REQUEST_NULL;
    p->buf = buf;
    p->bytes = bytes;
    p->stage = stage;
    int err = MPI_Iallreduce(MPI_IN_PLACE, stage, (int)n, MPI_FLOAT, mop, impl->comm, &p->req);
    if (err != MPI_SUCCESS) {
        pikv_host_free(c->ctx, stage);
        pikv_host_free(c->ctx, p);
        return mpi_fail(c, err, what);
    }
    *handle = p;
    return PIKV_OK;
}

/* Polls the posted allreduce like a blocking collective (c->timeout_s from the start
   of the wait). On a timeout or an error with the request still active, its staging
   buffer is set aside like a blocking collective's (or leaked when one already is). */
static pikv_status mpi_wait_pending(pikv_comm *c, void *handle)
{
    mpi_comm_impl *impl = (mpi_comm_impl *)c->impl;
    mpi_pending *p = handle;
    const char *what = "MPI_Iallreduce (non-blocking)";
    pikv_comm_wait w;
    pikv_comm_wait_begin(&w);
    pikv_status st = PIKV_OK;
    for (;;) {
        int done = 0;
        int err = MPI_Test(&p->req, &done, MPI_STATUS_IGNORE);
        if (err != MPI_SUCCESS) {
            st = mpi_fail(c, err, what);
            break;
        }
        if (done) {
            memcpy(p->buf, p->stage, p->bytes);
            p->req = MPI_REQUEST_NULL;
            break;
        }
        if (!pikv_comm_wait_pause(c, &w)) {
            st = PIKV_FAIL(c->ctx, PIKV_ERR_BACKEND,
                           "MPI communicator, rank %d of %d: %s did not complete in %g s: a rank "
                           "failed or stalled before taking part (timeout: pikv_comm_set_timeout; "
                           "the communicator is broken, abort the job)",
                           (int)c->rank, (int)c->size, what, c->timeout_s);
            break;
        }
    }
    if (p->req != MPI_REQUEST_NULL) {
        /* still active: MPI may write the staging buffer */
        if (!impl->abandoned_buf) {
            impl->abandoned = p->req;
            impl->abandoned_buf = p->stage;
        } /* else: leaked (a job whose collective timed out aborts) */
    } else {
        pikv_host_free(c->ctx, p->stage);
    }
    pikv_host_free(c->ctx, p);
    return st;
}

/* ---- gathers ------------------------------------------------------------- */

static pikv_status mpi_allgather(pikv_comm *c, const void *send, int64_t bytes, void *recv)
{
    mpi_comm_impl *impl = (mpi_comm_impl *)c->impl;
    const char *what = "MPI_Iallgather";
    if (bytes > INT_MAX) return mpi_count_fails(c, what, "the byte count", -1, (uint64_t)bytes);
    size_t b = (size_t)bytes, total = b * (size_t)c->size; /* checked by the wrapper */
    PIKV_FORWARD_IF_ERROR(mpi_scratch(c, impl, total, what));
    memcpy(impl->scratch + (size_t)c->rank * b, send, b);
    MPI_Request req = MPI_REQUEST_NULL;
    int err = MPI_Iallgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, impl->scratch, (int)bytes,
                             MPI_BYTE, impl->comm, &req);
    if (err != MPI_SUCCESS) return mpi_fail(c, err, what);
    PIKV_FORWARD_IF_ERROR(mpi_wait(c, impl, &req, what));
    memcpy(recv, impl->scratch, total);
    return PIKV_OK;
}

/* int counts and displacements (prefix sums) of counts[0..size) in ints[0..2 size);
   the byte total in *total. */
static pikv_status mpi_int_counts(pikv_comm *c, const char *what, const char *name,
                                  const int64_t *counts, int *ints, size_t *total)
{
    uint64_t at = 0;
    for (int32_t r = 0; r < c->size; r++) {
        if (counts[r] > INT_MAX) return mpi_count_fails(c, what, name, r, (uint64_t)counts[r]);
        if (at > INT_MAX) return mpi_count_fails(c, what, "the displacement", r, at);
        ints[r] = (int)counts[r];
        ints[c->size + r] = (int)at;
        at += (uint64_t)counts[r];
    }
    *total = (size_t)at; /* fits: checked by the wrapper */
    return PIKV_OK;
}

static pikv_status mpi_allgatherv(pikv_comm *c, const void *send, const int64_t *counts, void *recv)
{
    mpi_comm_impl *impl = (mpi_comm_impl *)c->impl;
    const char *what = "MPI_Iallgatherv";
    const size_t n = (size_t)c->size;
    /* the counts go into a scratch of their own first (the sizes decide the buffer) */
    int *ints = pikv_host_alloc(c->ctx, 2 * n * sizeof(int), 64);
    PIKV_RETURN_ERROR_IF(!ints, c->ctx, PIKV_ERR_OUT_OF_MEMORY,
                         "MPI communicator, rank %d of %d: %s: host allocation of %zu bytes failed",
                         (int)c->rank, (int)c->size, what, 2 * n * sizeof(int));
    size_t total = 0;
    pikv_status st = mpi_int_counts(c, what, "the count", counts, ints, &total);
    size_t off = round_up8(total);
    if (st == PIKV_OK) st = mpi_scratch(c, impl, off + 2 * n * sizeof(int), what);
    if (st != PIKV_OK) {
        pikv_host_free(c->ctx, ints);
        return st;
    }
    /* MPI reads the counts until the collective completes: they live in the
       staging buffer, which outlives a timed-out collective. */
    int *cnt = (int *)(void *)(impl->scratch + off), *displ = cnt + n;
    memcpy(cnt, ints, 2 * n * sizeof(int));
    pikv_host_free(c->ctx, ints);
    if (cnt[c->rank] > 0) memcpy(impl->scratch + displ[c->rank], send, (size_t)cnt[c->rank]);
    MPI_Request req = MPI_REQUEST_NULL;
    int err = MPI_Iallgatherv(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, impl->scratch, cnt, displ,
                              MPI_BYTE, impl->comm, &req);
    if (err != MPI_SUCCESS) return mpi_fail(c, err, what);
    PIKV_FORWARD_IF_ERROR(mpi_wait(c, impl, &req, what));
    memcpy(recv, impl->scratch, total);
    return PIKV_OK;
}

static pikv_status mpi_alltoallv(pikv_comm *c, const void *send, const int64_t *send_counts,
                                 void *recv, const int64_t *recv_counts)
{
    mpi_comm_impl *impl = (mpi_comm_impl *)c->impl;
    const char *what = "MPI_Ialltoallv";
    const size_t n = (size_t)c->size, ints_bytes = 4 * n * sizeof(int);
    int *ints = pikv_host_alloc(c->ctx, ints_bytes, 64);
    PIKV_RETURN_ERROR_IF(!ints, c->ctx, PIKV_ERR_OUT_OF_MEMORY,
                         "MPI communicator, rank %d of %d: %s: host allocation of %zu bytes failed",
                         (int)c->rank, (int)c->size, what, ints_bytes);
    size_t send_total = 0, recv_total = 0;
    pikv_status st = mpi_int_counts(c, what, "the send count", send_counts, ints, &send_total);
    if (st == PIKV_OK)
        st = mpi_int_counts(c, what, "the receive count", recv_counts, ints + 2 * n, &recv_total);
    /* [send | recv | send counts, send displs, recv counts, recv displs]. recv never
       starts where send does, even with nothing to send: Open MPI's libnbc takes equal
       send and receive pointers for MPI_IN_PLACE, and a rank with nothing to move then
       takes another path whose tag bookkeeping differs from the other ranks' (Open MPI
       4.1: the next collective never matches; tests/mpi_cache.c). */
    size_t recv_off = round_up8(send_total ? send_total : 1), ints_off = round_up8(recv_off + recv_total);
    if (st == PIKV_OK) st = mpi_scratch(c, impl, ints_off + ints_bytes, what);
    if (st != PIKV_OK) {
        pikv_host_free(c->ctx, ints);
        return st;
    }
    int *sc = (int *)(void *)(impl->scratch + ints_off), *sd = sc + n, *rc = sd + n, *rd = rc + n;
    memcpy(sc, ints, ints_bytes);
    pikv_host_free(c->ctx, ints);
    unsigned char *sbuf = impl->scratch, *rbuf = impl->scratch + recv_off;
    if (send_total) memcpy(sbuf, send, send_total);
    MPI_Request req = MPI_REQUEST_NULL;
    int err = MPI_Ialltoallv(sbuf, sc, sd, MPI_BYTE, rbuf, rc, rd, MPI_BYTE, impl->comm, &req);
    if (err != MPI_SUCCESS) return mpi_fail(c, err, what);
    PIKV_FORWARD_IF_ERROR(mpi_wait(c, impl, &req, what));
    if (recv_total) memcpy(recv, rbuf, recv_total);
    return PIKV_OK;
}

/* ---- lifetime ------------------------------------------------------------ */

static void mpi_destroy(pikv_comm *c)
{
    mpi_comm_impl *impl = (mpi_comm_impl *)c->impl;
    if (!impl) return;
    int finalized = 0;
    (void)MPI_Finalized(&finalized);
    if (!finalized) {
        if (impl->abandoned_buf) {
            /* Completed by now (the late ranks joined)? Then MPI is done with the
               buffer; otherwise it may still write into it: leak it. */
            int done = 0;
            if (impl->abandoned != MPI_REQUEST_NULL &&
                MPI_Test(&impl->abandoned, &done, MPI_STATUS_IGNORE) == MPI_SUCCESS && done)
                impl->abandoned = MPI_REQUEST_NULL;
            if (impl->abandoned == MPI_REQUEST_NULL) {
                pikv_host_free(c->ctx, impl->abandoned_buf);
                impl->abandoned_buf = NULL;
            }
        }
        /* Deallocated by MPI once a pending (abandoned) operation completes. */
        if (impl->comm != MPI_COMM_NULL) (void)MPI_Comm_free(&impl->comm);
    } else {
        /* MPI is gone: nothing uses the buffer any more. */
        pikv_host_free(c->ctx, impl->abandoned_buf);
        impl->abandoned_buf = NULL;
    }
    pikv_host_free(c->ctx, impl->scratch);
    pikv_host_free(c->ctx, impl);
    c->impl = NULL;
}

static const pikv_comm_iface mpi_iface = {
    .allreduce = mpi_allreduce,
    .destroy = mpi_destroy,
    .allreduce_i64 = mpi_allreduce_i64,
    .allgather = mpi_allgather,
    .allgatherv = mpi_allgatherv,
    .alltoallv = mpi_alltoallv,
    .name = "MPI",
    .iallreduce = mpi_iallreduce,
    .wait = mpi_wait_pending,
};

pikv_status pikv_comm_mpi_create(pikv_context *ctx, const void *mpi_comm, pikv_comm **out)
{
    int flag = 0;
    int err = MPI_Initialized(&flag);
    PIKV_RETURN_ERROR_IF(err != MPI_SUCCESS || !flag, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_create_mpi: MPI is not initialized (the engine calls MPI_Init or "
                         "MPI_Init_thread before creating a PiKV communicator)");
    flag = 0;
    err = MPI_Finalized(&flag);
    PIKV_RETURN_ERROR_IF(err != MPI_SUCCESS || flag, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_create_mpi: MPI is already finalized (MPI_Finalize was called)");
    MPI_Comm user = *(const MPI_Comm *)mpi_comm;
    PIKV_RETURN_ERROR_IF(user == MPI_COMM_NULL, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_create_mpi: *mpi_comm is MPI_COMM_NULL");
    /* Errors of these calls go to the engine's error handler on its communicator. */
    int inter = 0;
    err = MPI_Comm_test_inter(user, &inter);
    PIKV_RETURN_ERROR_IF(err != MPI_SUCCESS, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_create_mpi: MPI_Comm_test_inter failed (%d): is *mpi_comm a valid "
                         "communicator?", err);
    PIKV_RETURN_ERROR_IF(inter, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_create_mpi: *mpi_comm is an intercommunicator; PiKV needs an "
                         "intracommunicator");

    pikv_comm *c = pikv_host_calloc(ctx, 1, sizeof *c);
    mpi_comm_impl *impl = pikv_host_calloc(ctx, 1, sizeof *impl);
    if (!c || !impl) {
        pikv_host_free(ctx, c);
        pikv_host_free(ctx, impl);
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY,
                         "comm_create_mpi: host allocation of %zu bytes failed",
                         sizeof *c + sizeof *impl);
    }
    int rank = 0, size = 1;
    (void)MPI_Comm_rank(user, &rank);
    (void)MPI_Comm_size(user, &size);
    pikv_comm_init(c, &mpi_iface, ctx, (int32_t)rank, (int32_t)size, impl);
    impl->comm = MPI_COMM_NULL;
    impl->abandoned = MPI_REQUEST_NULL;

    /* The dup, waited on like a collective (with the default timeout). */
    MPI_Request req = MPI_REQUEST_NULL;
    err = MPI_Comm_idup(user, &impl->comm, &req);
    if (err != MPI_SUCCESS) {
        pikv_status st = mpi_fail(c, err, "comm_create_mpi: MPI_Comm_idup");
        pikv_comm_free(c);
        return st;
    }
    pikv_comm_wait w;
    pikv_comm_wait_begin(&w);
    for (;;) {
        int done = 0;
        err = MPI_Test(&req, &done, MPI_STATUS_IGNORE);
        if (err != MPI_SUCCESS) {
            pikv_status st = mpi_fail(c, err, "comm_create_mpi: MPI_Comm_idup");
            if (req == MPI_REQUEST_NULL) {
                impl->comm = MPI_COMM_NULL;
                pikv_comm_free(c);
            } /* else MPI may still write the new handle into impl: leak it */
            return st;
        }
        if (done) break;
        if (!pikv_comm_wait_pause(c, &w)) {
            /* MPI still holds &impl->comm for the new handle: leak c and impl. */
            return PIKV_FAIL(ctx, PIKV_ERR_BACKEND,
                             "comm_create_mpi: rank %d of %d: MPI_Comm_idup did not complete in "
                             "%g s: a rank failed, stalled, or does not call "
                             "pikv_comm_create_mpi", rank, size, c->timeout_s);
        }
    }
    err = MPI_Comm_set_errhandler(impl->comm, MPI_ERRORS_RETURN);
    if (err != MPI_SUCCESS) {
        pikv_status st = mpi_fail(c, err, "comm_create_mpi: MPI_Comm_set_errhandler");
        pikv_comm_free(c);
        return st;
    }
    *out = c;
    return PIKV_OK;
}
