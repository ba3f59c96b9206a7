/* The NCCL communicator (runtime/comm.h): collectives over an ncclComm_t the
 * engine created for one GPU. PiKV never creates, aborts or destroys that
 * communicator; it only enqueues on its own stream.
 *
 * allreduce takes host memory: it is copied to a device buffer (grown on
 * demand), reduced in place there by ncclAllReduce, copied back, and the stream
 * is synchronized, so the result is in host memory when the call returns. The
 * payloads are small (a merge moves n_rows (dim + 2) floats), so the copies from
 * and to pageable memory cost little next to the collective itself.
 *
 * Communicators created non-blocking (ncclConfig_t.blocking = 0) are handled:
 * a call answering ncclInProgress is waited on through ncclCommGetAsyncError.
 * After a failed NCCL or CUDA call the communicator is marked failed and every
 * later allreduce fails at once (NCCL's state is unknown: the engine aborts it). */
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

#if defined(NCCL_VERSION_CODE) && NCCL_VERSION_CODE >= NCCL_VERSION(2, 14, 0)
#define PIKV_NCCL_NONBLOCKING 1 /* ncclInProgress and ncclGetLastError exist */
#endif

typedef struct nccl_comm_impl {
    ncclComm_t nccl;             /* the engine's communicator */
    pikv_device *dev;
    int ordinal;                 /* CUDA device number */
    cudaStream_t stream;         /* PiKV's own stream on that device */
    float *buf;                  /* device buffer of the collectives */
    size_t buf_bytes;
    bool failed;                 /* an earlier NCCL or CUDA failure */
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

static pikv_status nccl_allreduce(pikv_comm *c, float *host, int64_t n, pikv_reduce_op op)
{
    nccl_comm_impl *impl = (nccl_comm_impl *)c->impl;
    PIKV_RETURN_ERROR_IF(impl->failed, c->ctx, PIKV_ERR_BACKEND,
                         "NCCL communicator (rank %d of %d, device %s): unusable after an earlier "
                         "NCCL or CUDA failure", (int)c->rank, (int)c->size, impl->dev->info.name);
    PIKV_RETURN_ERROR_IF(n < 0 || (uint64_t)n > SIZE_MAX / sizeof(float), c->ctx,
                         PIKV_ERR_INVALID_ARGUMENT, "NCCL allreduce: count %lld is invalid",
                         (long long)n);
    if (n == 0) return PIKV_OK;
    ncclRedOp_t nop;
    switch (op) {
    case PIKV_REDUCE_SUM: nop = ncclSum; break;
    case PIKV_REDUCE_MAX: nop = ncclMax; break;
    default:
        return PIKV_FAIL(c->ctx, PIKV_ERR_INTERNAL, "NCCL allreduce: unknown reduce op %d", (int)op);
    }
    size_t bytes = (size_t)n * sizeof(float);
    cudaError_t err = cudaSetDevice(impl->ordinal);
    if (err != cudaSuccess) return cuda_fail(c, impl, err, "cudaSetDevice");
    if (bytes > impl->buf_bytes) {
        float *grown = NULL;
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
    err = cudaMemcpyAsync(impl->buf, host, bytes, cudaMemcpyHostToDevice, impl->stream);
    if (err != cudaSuccess) return cuda_fail(c, impl, err, "cudaMemcpyAsync (host to device)");
    ncclResult_t res = ncclAllReduce(impl->buf, impl->buf, (size_t)n, ncclFloat32, nop, impl->nccl,
                                     impl->stream);
    res = nccl_settle(impl->nccl, res);
    if (res != ncclSuccess) return nccl_fail(c, impl, res, "ncclAllReduce");
    err = cudaMemcpyAsync(host, impl->buf, bytes, cudaMemcpyDeviceToHost, impl->stream);
    if (err != cudaSuccess) return cuda_fail(c, impl, err, "cudaMemcpyAsync (device to host)");
    err = cudaStreamSynchronize(impl->stream);
    if (err != cudaSuccess) return cuda_fail(c, impl, err, "cudaStreamSynchronize");
    ncclResult_t async = ncclSuccess;
    res = ncclCommGetAsyncError(impl->nccl, &async);
    if (res != ncclSuccess) return nccl_fail(c, impl, res, "ncclCommGetAsyncError");
    async = nccl_settle(impl->nccl, async);
    if (async != ncclSuccess) return nccl_fail(c, impl, async, "ncclAllReduce (asynchronous error)");
    return PIKV_OK;
}

static void nccl_destroy(pikv_comm *c)
{
    nccl_comm_impl *impl = (nccl_comm_impl *)c->impl;
    if (!impl) return;
    if (cudaSetDevice(impl->ordinal) == cudaSuccess) {
        if (impl->stream) (void)cudaStreamSynchronize(impl->stream);
        if (impl->buf) (void)cudaFree(impl->buf);
        if (impl->stream) (void)cudaStreamDestroy(impl->stream);
    }
    (void)cudaGetLastError();
    pikv_host_free(c->ctx, impl);
    c->impl = NULL;
}

static const pikv_comm_iface nccl_iface = {
    nccl_allreduce,
    nccl_destroy,
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
    c->iface = &nccl_iface;
    c->ctx = ctx;
    c->rank = (int32_t)rank;
    c->size = (int32_t)size;
    c->impl = impl;

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
