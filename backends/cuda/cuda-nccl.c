/* The NCCL communicator (runtime/comm.h): collectives over an ncclComm_t the
 * engine created for one GPU. PiKV never creates, aborts or destroys that
 * communicator; it only enqueues on its own stream.
 *
 * Every collective takes host memory: the payload is copied to a device buffer
 * (grown on demand), the NCCL operation runs there (ncclAllReduce in place,
 * ncclAllGather in place, and for allgatherv / alltoallv one ncclSend / ncclRecv
 * per peer in a group, this rank's own part copied locally), the stream is waited
 * on, and only then is the result copied back, so the result is in host memory
 * when the call returns. The payloads are small (a merge moves n_rows (dim + 2)
 * floats), so the copies from and to pageable memory cost little next to the
 * collective itself.
 *
 * Waiting: with c->timeout_s = 0 the stream is synchronized; otherwise it is
 * polled (cudaStreamQuery, and ncclCommGetAsyncError for errors raised
 * meanwhile) with the backoff of pikv_comm_wait_pause until the operation is done
 * or the timeout has passed. The copy back is enqueued only after the operation
 * completed, so a collective that timed out never writes into the caller's
 * memory; its work stays queued on PiKV's stream (over PiKV's device buffer)
 * until the engine aborts the NCCL communicator (ncclCommAbort), and
 * pikv_comm_free then leaks the stream and the buffer instead of waiting.
 *
 * Communicators created non-blocking (ncclConfig_t.blocking = 0) are handled:
 * a call answering ncclInProgress is waited on through ncclCommGetAsyncError.
 * After a failed NCCL or CUDA call the communicator is marked failed and every
 * later collective fails at once (NCCL's state is unknown: the engine aborts it). */
#include "cuda-impl.h"
#include "../../runtime/comm.h"

/* nccl.h declares a few functions as f() (not f(void)): keep -Wstrict-prototypes
   quiet on it even when its directory is not a system include directory. */
#if defined(__GNUC__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wstrict-prototypes"
#endif
#include <nccl.h>
#if defined(__GNUC__)
#pragma GCC diagnostic pop
#endif

#include <stdint.h>
#include <string.h>

#if defined(NCCL_VERSION_CODE) && NCCL_VERSION_CODE >= NCCL_VERSION(2, 14, 0)
#define PIKV_NCCL_NONBLOCKING 1 /* ncclInProgress and ncclGetLastError exist */
#endif

typedef struct nccl_comm_impl {
    ncclComm_t nccl;             /* the engine's communicator */
    pikv_device *dev;
    int ordinal;                 /* CUDA device number */
    cudaStream_t stream;         /* PiKV's own stream on that device */
    unsigned char *buf;          /* device buffer of the collectives */
    size_t buf_bytes;
    bool failed;                 /* an earlier NCCL or CUDA failure */
    bool stuck;                  /* work may still be queued on the stream (timeout, error) */
} nccl_comm_impl;

static pikv_status nccl_fail(pikv_comm *c, nccl_comm_impl *impl, ncclResult_t res,
                             const char *what)
{
    const char *detail = "";
#ifdef PIKV_NCCL_NONBLOCKING
    if (impl && impl->nccl) {
        detail = ncclGetLastError(impl->nccl);
        if (!detail) detail = "";
    }
#endif
    if (impl) impl->failed = true;
    return PIKV_FAIL(c->ctx, PIKV_ERR_BACKEND, "NCCL communicator (rank %d of %d, device %s): %s failed: "
                     "%s (%d)%s%s", (int)c->rank, (int)c->size,
                     impl && impl->dev ? impl->dev->info.name : "?", what, ncclGetErrorString(res),
                     (int)res, detail[0] ? ": " : "", detail);
}

static pikv_status cuda_fail(pikv_comm *c, nccl_comm_impl *impl, cudaError_t err, const char *what)
{
    pikv_status st = err == cudaErrorMemoryAllocation ? PIKV_ERR_OUT_OF_MEMORY : PIKV_ERR_BACKEND;
    if (st == PIKV_ERR_BACKEND) impl->failed = true;
    return PIKV_FAIL(c->ctx, st, "NCCL communicator (rank %d of %d, device %s): %s failed: %s (%d): %s",
                     (int)c->rank, (int)c->size, impl->dev->info.name, what,
                     cudaGetErrorName(err), (int)err, cudaGetErrorString(err));
}

/* Waits while a non-blocking communicator reports ncclInProgress; returns the
   final state. */
static ncclResult_t nccl_settle(ncclComm_t comm, ncclResult_t res)
{
#ifdef PIKV_NCCL_NONBLOCKING
    while (res == ncclInProgress) {
        ncclResult_t state = ncclSuccess;
        ncclResult_t q = ncclCommGetAsyncError(comm, &state);
        res = q != ncclSuccess ? q : state;
    }
#else
    (void)comm;
#endif
    return res;
}

static pikv_status nccl_timed_out(pikv_comm *c, nccl_comm_impl *impl, const char *what)
{
    impl->failed = true;
    impl->stuck = true;
    return PIKV_FAIL(c->ctx, PIKV_ERR_BACKEND,
                     "NCCL communicator (rank %d of %d, device %s): %s did not complete in %g s: a "
                     "rank failed or stalled before taking part (timeout: pikv_comm_set_timeout; "
                     "the communicator is broken, abort it with ncclCommAbort)",
                     (int)c->rank, (int)c->size, impl->dev->info.name, what, c->timeout_s);
}

/* The result of enqueuing `what`: waits out ncclInProgress (non-blocking
   communicators), within the timeout. */
static pikv_status nccl_enqueued(pikv_comm *c, nccl_comm_impl *impl, ncclResult_t res,
                                 const char *what)
{
#ifdef PIKV_NCCL_NONBLOCKING
    pikv_comm_wait w;
    pikv_comm_wait_begin(&w);
    while (res == ncclInProgress) {
        ncclResult_t state = ncclSuccess;
        ncclResult_t q = ncclCommGetAsyncError(impl->nccl, &state);
        res = q != ncclSuccess ? q : state;
        if (res == ncclInProgress && !pikv_comm_wait_pause(c, &w))
            return nccl_timed_out(c, impl, what);
    }
#endif
    if (res != ncclSuccess) {
        impl->stuck = true; /* part of the group may be queued */
        return nccl_fail(c, impl, res, what);
    }
    return PIKV_OK;
}

/* Waits until everything enqueued on the stream is done (within the timeout) and
   checks NCCL's asynchronous error state. */
static pikv_status nccl_finish(pikv_comm *c, nccl_comm_impl *impl, const char *what)
{
    cudaError_t err;
    if (c->timeout_s <= 0.0) {
        err = cudaStreamSynchronize(impl->stream);
        if (err != cudaSuccess) {
            impl->stuck = true;
            return cuda_fail(c, impl, err, "cudaStreamSynchronize");
        }
    } else {
        pikv_comm_wait w;
        pikv_comm_wait_begin(&w);
        for (;;) {
            err = cudaStreamQuery(impl->stream);
            if (err == cudaSuccess) break;
            if (err != cudaErrorNotReady) {
                impl->stuck = true;
                return cuda_fail(c, impl, err, "cudaStreamQuery");
            }
            ncclResult_t async = ncclSuccess;
            ncclResult_t res = ncclCommGetAsyncError(impl->nccl, &async);
            if (res != ncclSuccess) {
                impl->stuck = true;
                return nccl_fail(c, impl, res, "ncclCommGetAsyncError");
            }
#ifdef PIKV_NCCL_NONBLOCKING
            if (async == ncclInProgress) async = ncclSuccess;
#endif
            if (async != ncclSuccess) {
                impl->stuck = true;
                return nccl_fail(c, impl, async, what);
            }
            if (!pikv_comm_wait_pause(c, &w)) return nccl_timed_out(c, impl, what);
        }
    }
    ncclResult_t async = ncclSuccess;
    ncclResult_t res = ncclCommGetAsyncError(impl->nccl, &async);
    if (res != ncclSuccess) return nccl_fail(c, impl, res, "ncclCommGetAsyncError");
    async = nccl_settle(impl->nccl, async);
    if (async != ncclSuccess) return nccl_fail(c, impl, async, what);
    return PIKV_OK;
}

/* Common start of a collective: the device current and a device buffer of at
   least bytes bytes (contents not kept). */
static pikv_status nccl_begin(pikv_comm *c, nccl_comm_impl *impl, size_t bytes)
{
    PIKV_RETURN_ERROR_IF(impl->failed, c->ctx, PIKV_ERR_BACKEND,
                         "NCCL communicator (rank %d of %d, device %s): unusable after an earlier "
                         "NCCL or CUDA failure", (int)c->rank, (int)c->size, impl->dev->info.name);
    cudaError_t err = cudaSetDevice(impl->ordinal);
    if (err != cudaSuccess) return cuda_fail(c, impl, err, "cudaSetDevice");
    if (bytes == 0) bytes = 1;
    if (bytes > impl->buf_bytes) {
        unsigned char *grown = NULL;
        err = cudaMalloc((void **)&grown, bytes);
        if (err != cudaSuccess) {
            (void)cudaGetLastError(); /* clear a non-sticky allocation error */
            return cuda_fail(c, impl, err, "cudaMalloc of the collective buffer");
        }
        if (impl->buf) {
            err = cudaFree(impl->buf); /* synchronizes: no collective still uses it */
            if (err != cudaSuccess) {
                (void)cudaFree(grown);
                return cuda_fail(c, impl, err, "cudaFree of the collective buffer");
            }
        }
        impl->buf = grown;
        impl->buf_bytes = bytes;
    }
    return PIKV_OK;
}

static pikv_status nccl_to_device(pikv_comm *c, nccl_comm_impl *impl, size_t off, const void *host,
                                  size_t bytes)
{
    if (bytes == 0) return PIKV_OK;
    cudaError_t err = cudaMemcpyAsync(impl->buf + off, host, bytes, cudaMemcpyHostToDevice,
                                      impl->stream);
    if (err != cudaSuccess) return cuda_fail(c, impl, err, "cudaMemcpyAsync (host to device)");
    return PIKV_OK;
}

/* After nccl_finish: the result back to host memory, synchronously. */
static pikv_status nccl_to_host(pikv_comm *c, nccl_comm_impl *impl, void *host, size_t off,
                                size_t bytes)
{
    if (bytes == 0) return PIKV_OK;
    cudaError_t err = cudaMemcpyAsync(host, impl->buf + off, bytes, cudaMemcpyDeviceToHost,
                                      impl->stream);
    if (err != cudaSuccess) return cuda_fail(c, impl, err, "cudaMemcpyAsync (device to host)");
    err = cudaStreamSynchronize(impl->stream);
    if (err != cudaSuccess) return cuda_fail(c, impl, err, "cudaStreamSynchronize");
    return PIKV_OK;
}

static pikv_status nccl_allreduce_any(pikv_comm *c, void *host, int64_t n, size_t elem,
                                      ncclDataType_t type, pikv_reduce_op op)
{
    nccl_comm_impl *impl = (nccl_comm_impl *)c->impl;
    ncclRedOp_t nop;
    switch (op) {
    case PIKV_REDUCE_SUM: nop = ncclSum; break;
    case PIKV_REDUCE_MAX: nop = ncclMax; break;
    case PIKV_REDUCE_MIN: nop = ncclMin; break;
    default:
        return PIKV_FAIL(c->ctx, PIKV_ERR_INTERNAL, "NCCL allreduce: unknown reduce op %d", (int)op);
    }
    size_t bytes = (size_t)n * elem; /* checked by the wrapper */
    PIKV_FORWARD_IF_ERROR(nccl_begin(c, impl, bytes));
    PIKV_FORWARD_IF_ERROR(nccl_to_device(c, impl, 0, host, bytes));
    ncclResult_t res = ncclAllReduce(impl->buf, impl->buf, (size_t)n, type, nop, impl->nccl,
                                     impl->stream);
    PIKV_FORWARD_IF_ERROR(nccl_enqueued(c, impl, res, "ncclAllReduce"));
    PIKV_FORWARD_IF_ERROR(nccl_finish(c, impl, "ncclAllReduce"));
    return nccl_to_host(c, impl, host, 0, bytes);
}

static pikv_status nccl_allreduce(pikv_comm *c, float *host, int64_t n, pikv_reduce_op op)
{
    return nccl_allreduce_any(c, host, n, sizeof(float), ncclFloat32, op);
}

static pikv_status nccl_allreduce_i64(pikv_comm *c, int64_t *host, int64_t n, pikv_reduce_op op)
{
    return nccl_allreduce_any(c, host, n, sizeof(int64_t), ncclInt64, op);
}

static pikv_status nccl_allgather(pikv_comm *c, const void *send, int64_t bytes, void *recv)
{
    nccl_comm_impl *impl = (nccl_comm_impl *)c->impl;
    size_t b = (size_t)bytes, total = b * (size_t)c->size, mine = b * (size_t)c->rank;
    PIKV_FORWARD_IF_ERROR(nccl_begin(c, impl, total));
    PIKV_FORWARD_IF_ERROR(nccl_to_device(c, impl, mine, send, b));
    /* in place: sendbuff = recvbuff + rank * count */
    ncclResult_t res = ncclAllGather(impl->buf + mine, impl->buf, b, ncclUint8, impl->nccl,
                                     impl->stream);
    PIKV_FORWARD_IF_ERROR(nccl_enqueued(c, impl, res, "ncclAllGather"));
    PIKV_FORWARD_IF_ERROR(nccl_finish(c, impl, "ncclAllGather"));
    return nccl_to_host(c, impl, recv, 0, total);
}

/* Sends and receives in one group. To peer p: send_counts[p] bytes from buf +
   send_off + the sum of send_counts[0..p), or, with send_counts NULL, send_each
   bytes from buf + send_off for every peer. From peer p: recv_counts[p] bytes into
   buf + the sum of recv_counts[0..p). Self and empty transfers are skipped. */
static pikv_status nccl_exchange(pikv_comm *c, nccl_comm_impl *impl, size_t send_off,
                                 const int64_t *send_counts, size_t send_each, size_t recv_off,
                                 const int64_t *recv_counts, const char *what)
{
    ncclResult_t res = ncclGroupStart();
    if (res != ncclSuccess) return nccl_fail(c, impl, res, "ncclGroupStart");
    size_t sd = 0, rd = 0;
    for (int32_t p = 0; p < c->size && res == ncclSuccess; p++) {
        size_t sn = send_counts ? (size_t)send_counts[p] : send_each;
        size_t rn = (size_t)recv_counts[p];
        if (p != c->rank) {
            if (sn)
                res = ncclSend(impl->buf + send_off + sd, sn, ncclUint8, (int)p, impl->nccl,
                               impl->stream);
            if (res == ncclSuccess && rn)
                res = ncclRecv(impl->buf + recv_off + rd, rn, ncclUint8, (int)p, impl->nccl,
                               impl->stream);
        }
        if (send_counts) sd += sn;
        rd += rn;
    }
    ncclResult_t end = ncclGroupEnd(); /* closes the group even after a failed call */
    if (res == ncclSuccess) res = end;
    return nccl_enqueued(c, impl, res, what);
}

static pikv_status nccl_allgatherv(pikv_comm *c, const void *send, const int64_t *counts, void *recv)
{
    nccl_comm_impl *impl = (nccl_comm_impl *)c->impl;
    const char *what = "ncclSend/ncclRecv (allgatherv)";
    size_t total = 0, displ = 0;
    for (int32_t r = 0; r < c->size; r++) {
        if (r == c->rank) displ = total;
        total += (size_t)counts[r]; /* checked by the wrapper */
    }
    size_t mine = (size_t)counts[c->rank];
    PIKV_FORWARD_IF_ERROR(nccl_begin(c, impl, total));
    /* this rank's part goes in place, and every peer is sent it from there */
    PIKV_FORWARD_IF_ERROR(nccl_to_device(c, impl, displ, send, mine));
    PIKV_FORWARD_IF_ERROR(nccl_exchange(c, impl, displ, NULL, mine, 0, counts, what));
    PIKV_FORWARD_IF_ERROR(nccl_finish(c, impl, what));
    return nccl_to_host(c, impl, recv, 0, total);
}

static pikv_status nccl_alltoallv(pikv_comm *c, const void *send, const int64_t *send_counts,
                                  void *recv, const int64_t *recv_counts)
{
    nccl_comm_impl *impl = (nccl_comm_impl *)c->impl;
    const char *what = "ncclSend/ncclRecv (alltoallv)";
    size_t send_total = 0, recv_total = 0, send_self = 0, recv_self = 0;
    for (int32_t r = 0; r < c->size; r++) {
        if (r == c->rank) {
            send_self = send_total;
            recv_self = recv_total;
        }
        send_total += (size_t)send_counts[r]; /* checked by the wrapper */
        recv_total += (size_t)recv_counts[r];
    }
    /* device buffer: [send | recv], the recv part 256-byte aligned */
    size_t recv_off = (send_total + 255) & ~(size_t)255;
    PIKV_FORWARD_IF_ERROR(nccl_begin(c, impl, recv_off + recv_total));
    PIKV_FORWARD_IF_ERROR(nccl_to_device(c, impl, 0, send, send_total));
    PIKV_FORWARD_IF_ERROR(nccl_exchange(c, impl, 0, send_counts, 0, recv_off, recv_counts, what));
    PIKV_FORWARD_IF_ERROR(nccl_finish(c, impl, what));
    PIKV_FORWARD_IF_ERROR(nccl_to_host(c, impl, recv, recv_off, recv_total));
    /* this rank's own part, copied locally (send_counts[rank] == recv_counts[rank]) */
    size_t self = (size_t)send_counts[c->rank];
    if (self)
        memcpy((unsigned char *)recv + recv_self, (const unsigned char *)send + send_self, self);
    return PIKV_OK;
}

static void nccl_destroy(pikv_comm *c)
{
    nccl_comm_impl *impl = (nccl_comm_impl *)c->impl;
    if (!impl) return;
    if (cudaSetDevice(impl->ordinal) == cudaSuccess) {
        /* After a timeout or an error, work may still be queued on the stream (it ends
           when the engine aborts the NCCL communicator): waiting could hang and freeing
           the buffer would wait too, so both are leaked unless the stream is idle. */
        bool idle = !impl->stuck || (impl->stream && cudaStreamQuery(impl->stream) == cudaSuccess);
        if (idle) {
            if (impl->stream) (void)cudaStreamSynchronize(impl->stream);
            if (impl->buf) (void)cudaFree(impl->buf);
            if (impl->stream) (void)cudaStreamDestroy(impl->stream);
        }
    }
    (void)cudaGetLastError();
    pikv_host_free(c->ctx, impl);
    c->impl = NULL;
}

/* No iallreduce / wait: pikv_comm_iallreduce falls back to the blocking allreduce at post
   time, so pikv_cache_attend_start / _finish work over NCCL without overlapping the merge. */
static const pikv_comm_iface nccl_iface = {
    .allreduce = nccl_allreduce,
    .destroy = nccl_destroy,
    .allreduce_i64 = nccl_allreduce_i64,
    .allgather = nccl_allgather,
    .allgatherv = nccl_allgatherv,
    .alltoallv = nccl_alltoallv,
    .name = "NCCL",
};

pikv_status pikv_comm_nccl_create(pikv_context *ctx, pikv_device *dev, void *nccl_comm,
                                  pikv_comm **out)
{
    *out = NULL;
    int ordinal = pikv_cuda_device_ordinal(dev);
    PIKV_RETURN_ERROR_IF(ordinal < 0, ctx, PIKV_ERR_UNSUPPORTED,
                         "comm_create_nccl: device %d (%s) is not a CUDA device", (int)dev->index,
                         dev->info.name);
    ncclComm_t nccl = (ncclComm_t)nccl_comm;
    int rank = -1, size = 0, cudev = -1;
    ncclResult_t res = nccl_settle(nccl, ncclCommUserRank(nccl, &rank));
    PIKV_RETURN_ERROR_IF(res != ncclSuccess, ctx, PIKV_ERR_BACKEND,
                         "comm_create_nccl: ncclCommUserRank failed: %s (%d)",
                         ncclGetErrorString(res), (int)res);
    res = nccl_settle(nccl, ncclCommCount(nccl, &size));
    PIKV_RETURN_ERROR_IF(res != ncclSuccess, ctx, PIKV_ERR_BACKEND,
                         "comm_create_nccl: ncclCommCount failed: %s (%d)",
                         ncclGetErrorString(res), (int)res);
    res = nccl_settle(nccl, ncclCommCuDevice(nccl, &cudev));
    PIKV_RETURN_ERROR_IF(res != ncclSuccess, ctx, PIKV_ERR_BACKEND,
                         "comm_create_nccl: ncclCommCuDevice failed: %s (%d)",
                         ncclGetErrorString(res), (int)res);
    PIKV_RETURN_ERROR_IF(size < 1 || rank < 0 || rank >= size, ctx, PIKV_ERR_BACKEND,
                         "comm_create_nccl: the NCCL communicator reports rank %d of %d", rank,
                         size);
    PIKV_RETURN_ERROR_IF(cudev != ordinal, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_create_nccl: the NCCL communicator is on CUDA device %d, but "
                         "context device %d (%s) is CUDA device %d",
                         cudev, (int)dev->index, dev->info.name, ordinal);

    pikv_comm *c = pikv_host_calloc(ctx, 1, sizeof *c);
    nccl_comm_impl *impl = pikv_host_calloc(ctx, 1, sizeof *impl);
    if (!c || !impl) {
        pikv_host_free(ctx, c);
        pikv_host_free(ctx, impl);
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY,
                         "comm_create_nccl: host allocation of %zu bytes failed",
                         sizeof *c + sizeof *impl);
    }
    impl->nccl = nccl;
    impl->dev = dev;
    impl->ordinal = ordinal;
    pikv_comm_init(c, &nccl_iface, ctx, (int32_t)rank, (int32_t)size, impl);

    cudaError_t err = cudaSetDevice(ordinal);
    if (err == cudaSuccess) err = cudaStreamCreateWithFlags(&impl->stream, cudaStreamNonBlocking);
    if (err != cudaSuccess) {
        impl->stream = NULL;
        pikv_status st = PIKV_FAIL(ctx, err == cudaErrorMemoryAllocation ? PIKV_ERR_OUT_OF_MEMORY
                                                                          : PIKV_ERR_BACKEND,
                                   "comm_create_nccl: device %s: creating the stream failed: %s "
                                   "(%d): %s", dev->info.name, cudaGetErrorName(err), (int)err,
                                   cudaGetErrorString(err));
        pikv_comm_free(c);
        return st;
    }
    *out = c;
    return PIKV_OK;
}
