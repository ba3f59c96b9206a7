/* The CUDA backend: device discovery through the CUDA runtime, per-device
   streams, event and memory pool, capabilities, registration. No driver or no
   GPU means a backend without devices, not an error. */
#include "cuda-impl.h"

#include <stdio.h>
#include <string.h>

enum { MAX_CUDA_DEVICES = 16 };

pikv_status pikv_cuda_fail(pikv_device *dev, cudaError_t err, const char *what)
{
    pikv_cuda_device *cd = pikv_cuda_dev(dev);
    const bool oom = err == cudaErrorMemoryAllocation;
    /* errors that leave the CUDA context unusable for the rest of the process */
    if (err == cudaErrorIllegalAddress || err == cudaErrorLaunchFailure || err == cudaErrorHardwareStackError ||
        err == cudaErrorIllegalInstruction || err == cudaErrorMisalignedAddress ||
        err == cudaErrorInvalidAddressSpace || err == cudaErrorInvalidPc || err == cudaErrorECCUncorrectable ||
        err == cudaErrorUnknown)
        cd->failed = true;
    cudaGetLastError(); /* clear a non-sticky error so the next call starts clean */
    return PIKV_FAIL(dev->ctx, oom ? PIKV_ERR_OUT_OF_MEMORY : PIKV_ERR_BACKEND, "device %s: %s failed: %s (%d): %s",
                     dev->info.name, what, cudaGetErrorName(err), (int)err, cudaGetErrorString(err));
}

pikv_status pikv_cuda_enter(pikv_device *dev, int *previous)
{
    pikv_cuda_device *cd = pikv_cuda_dev(dev);
    *previous = -1;
    PIKV_RETURN_ERROR_IF(cd->failed, dev->ctx, PIKV_ERR_BACKEND,
                         "device %s: an earlier CUDA error left the device unusable", dev->info.name);
    if (cudaGetDevice(previous) != cudaSuccess) *previous = -1;
    if (*previous == cd->ordinal) return PIKV_OK;
    cudaError_t err = cudaSetDevice(cd->ordinal);
    return err == cudaSuccess ? PIKV_OK : pikv_cuda_fail(dev, err, "cudaSetDevice");
}

void pikv_cuda_leave(int previous)
{
    int now = -1;
    if (previous >= 0 && cudaGetDevice(&now) == cudaSuccess && now != previous) cudaSetDevice(previous);
}

int pikv_cuda_device_ordinal(const pikv_device *dev)
{
    if (!dev || !dev->backend || dev->backend->kind != PIKV_BACKEND_CUDA) return -1;
    return ((const pikv_cuda_device *)dev->context)->ordinal;
}

static bool cuda_supports_op(pikv_device *dev, pikv_op op, pikv_dtype dtype)
{
    (void)dev;
    const bool open = dtype == PIKV_DTYPE_F32 || dtype == PIKV_DTYPE_F16;
    const bool quant = pikv_dtype_quantized(dtype);
    switch (op) {
    case PIKV_OP_APPEND:
    case PIKV_OP_PAGE_COPY:
    case PIKV_OP_ATTENTION:
    case PIKV_OP_SCORE:
    case PIKV_OP_MERGE:
        return open || quant; /* quantized caches append into f16 open pages */
    case PIKV_OP_QUANTIZE:
        return quant;
    case PIKV_OP_TOPK:
    case PIKV_OP_READ_REDUCE:
        return true; /* no pages involved */
    default:
        return false;
    }
}

static pikv_status cuda_synchronize(pikv_device *dev)
{
    int prev;
    PIKV_FORWARD_IF_ERROR(pikv_cuda_enter(dev, &prev));
    pikv_cuda_device *cd = pikv_cuda_dev(dev);
    cudaError_t err = cudaStreamSynchronize(cd->copy_stream);
    if (err == cudaSuccess) err = cudaStreamSynchronize(cd->stream);
    pikv_status st = err == cudaSuccess ? PIKV_OK : pikv_cuda_fail(dev, err, "cudaStreamSynchronize");
    pikv_cuda_leave(prev);
    return st;
}

static const pikv_device_iface cuda_device_iface = {
    .supports_op = cuda_supports_op,
    .buffer_alloc = pikv_cuda_buffer_alloc,
    .buffer_free = pikv_cuda_buffer_free,
    .buffer_write = pikv_cuda_buffer_write,
    .buffer_read = pikv_cuda_buffer_read,
    .append = pikv_cuda_append_op,
    .page_copy = pikv_cuda_page_copy_op,
    .attention = pikv_cuda_attention_op,
    .merge = pikv_cuda_merge_op,
    .score = pikv_cuda_score_op,
    .topk = pikv_cuda_topk_op,
    .quantize = pikv_cuda_quantize_op,
    .read_reduce = pikv_cuda_read_reduce_op,
    .synchronize = cuda_synchronize,
    .memory_read = pikv_cuda_memory_read,
    .memory_write = pikv_cuda_memory_write,
    .find_out_of_range = pikv_cuda_find_out_of_range_op,
};

static void cuda_device_free(pikv_context *ctx, pikv_device *d)
{
    if (!d) return;
    pikv_cuda_device *cd = d->context;
    if (cd) {
        int prev = -1;
        cudaGetDevice(&prev);
        if (cudaSetDevice(cd->ordinal) == cudaSuccess) {
            if (cd->stream) cudaStreamSynchronize(cd->stream);
            if (cd->copy_stream) cudaStreamSynchronize(cd->copy_stream);
            pikv_cuda_memory_release(d);
            if (cd->write_done) cudaEventDestroy(cd->write_done);
            if (cd->time_begin) cudaEventDestroy(cd->time_begin);
            if (cd->time_end) cudaEventDestroy(cd->time_end);
            if (cd->copy_stream) cudaStreamDestroy(cd->copy_stream);
            if (cd->stream) cudaStreamDestroy(cd->stream);
            if (cd->pool) cudaMemPoolDestroy(cd->pool);
        }
        if (prev >= 0) cudaSetDevice(prev);
        cudaGetLastError();
        pikv_host_free(ctx, cd);
    }
    pikv_host_free(ctx, d);
}

static void cuda_backend_free(pikv_backend *b)
{
    if (!b) return;
    pikv_context *ctx = b->ctx;
    for (int32_t i = 0; b->devices && i < b->n_devices; i++) cuda_device_free(ctx, b->devices[i]);
    pikv_host_free(ctx, b->devices);
    pikv_host_free(ctx, b);
}

static const pikv_backend_iface cuda_backend_iface = {.free = cuda_backend_free};

/* Streams, event and pool of one device; false (logged) when it cannot serve. */
static bool device_setup(pikv_context *ctx, pikv_cuda_device *cd, const char *name)
{
    const char *what = "cudaSetDevice";
    cudaError_t err = cudaSetDevice(cd->ordinal);
    if (err == cudaSuccess) {
        what = "loading the kernels"; /* this build has no code for the GPU's architecture */
        err = pikv_cuda_kernels_loadable();
    }
    if (err == cudaSuccess) {
        what = "cudaStreamCreateWithFlags";
        err = cudaStreamCreateWithFlags(&cd->stream, cudaStreamNonBlocking);
    }
    if (err == cudaSuccess) err = cudaStreamCreateWithFlags(&cd->copy_stream, cudaStreamNonBlocking);
    if (err == cudaSuccess) {
        what = "cudaEventCreateWithFlags";
        err = cudaEventCreateWithFlags(&cd->write_done, cudaEventDisableTiming);
    }
    if (err == cudaSuccess) err = cudaEventCreate(&cd->time_begin);
    if (err == cudaSuccess) err = cudaEventCreate(&cd->time_end);
    if (err == cudaSuccess) {
        int pools = 0;
        what = "cudaDeviceGetAttribute (memory pools)";
        err = cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, cd->ordinal);
        if (err == cudaSuccess && !pools) {
            pikv_log(ctx, PIKV_LOG_WARN, "cuda: device %d '%s' skipped: no stream-ordered memory pools "
                     "(cudaDevAttrMemoryPoolsSupported is 0)", cd->ordinal, name);
            return false;
        }
    }
    if (err == cudaSuccess) {
        /* a pool of the device's memory that keeps what is freed for reuse:
           chunk and scratch allocations are stream-ordered and cheap */
        struct cudaMemPoolProps props;
        memset(&props, 0, sizeof props);
        props.allocType = cudaMemAllocationTypePinned;
        props.location.type = cudaMemLocationTypeDevice;
        props.location.id = cd->ordinal;
        what = "cudaMemPoolCreate";
        err = cudaMemPoolCreate(&cd->pool, &props);
    }
    if (err == cudaSuccess) {
        uint64_t keep = UINT64_MAX;
        what = "cudaMemPoolSetAttribute";
        err = cudaMemPoolSetAttribute(cd->pool, cudaMemPoolAttrReleaseThreshold, &keep);
    }
    if (err != cudaSuccess) {
        pikv_log(ctx, PIKV_LOG_WARN, "cuda: device %d '%s' skipped: %s failed: %s: %s", cd->ordinal, name, what,
                 cudaGetErrorName(err), cudaGetErrorString(err));
        cudaGetLastError();
        return false;
    }
    return true;
}

static pikv_status add_device(pikv_context *ctx, pikv_backend *b, int ordinal)
{
    struct cudaDeviceProp props;
    cudaError_t err = cudaGetDeviceProperties(&props, ordinal);
    if (err != cudaSuccess) {
        pikv_log(ctx, PIKV_LOG_WARN, "cuda: device %d skipped: cudaGetDeviceProperties: %s", ordinal,
                 cudaGetErrorString(err));
        cudaGetLastError();
        return PIKV_OK;
    }
    pikv_device *d = pikv_host_calloc(ctx, 1, sizeof *d);
    pikv_cuda_device *cd = pikv_host_calloc(ctx, 1, sizeof *cd);
    if (!d || !cd) {
        pikv_host_free(ctx, d);
        pikv_host_free(ctx, cd);
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "cuda backend: device allocation failed");
    }
    d->context = cd;
    cd->ordinal = ordinal;
    if (!device_setup(ctx, cd, props.name)) {
        cuda_device_free(ctx, d);
        return PIKV_OK;
    }
    int sms = 0, smem = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, ordinal);
    cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, ordinal);
    cd->sm_count = sms > 0 ? sms : 1;
    cd->smem_per_block = smem > 0 ? (size_t)smem : 48 * 1024;

    d->iface = &cuda_device_iface;
    d->backend = b;
    d->ctx = ctx;
    pikv_device_info *info = &d->info;
    snprintf(info->name, sizeof info->name, "cuda%d", (int)b->n_devices);
    int driver = 0;
    cudaDriverGetVersion(&driver);
    char desc[400];
    snprintf(desc, sizeof desc, "%s (sm_%d%d, %d SMs, driver %d.%d)", props.name, props.major, props.minor, sms,
             driver / 1000, (driver % 1000) / 10);
    size_t dl = strlen(desc);
    if (dl >= sizeof info->description) dl = sizeof info->description - 1;
    memcpy(info->description, desc, dl);
    info->description[dl] = 0;
    info->backend = PIKV_BACKEND_CUDA;
    info->backend_index = b->n_devices;
    info->caps.memory_total = props.totalGlobalMem;
    info->caps.memory_limit = 0;
    info->caps.compute_units = cd->sm_count;
    info->caps.subgroup_size = 32;
    info->caps.async_copies = 1; /* buffer writes go through a copy stream */
    info->caps.host_visible = props.integrated ? 1 : 0;
    info->caps.f16_storage = 1;
    info->caps.int8_dot = 1; /* dp4a and int8 tensor cores on every architecture the build targets */
    b->devices[b->n_devices++] = d;
    return PIKV_OK;
}

pikv_status pikv_backend_cuda_init(pikv_context *ctx, const pikv_context_params *params, pikv_backend **out)
{
    (void)params;
    *out = NULL;
    pikv_backend *b = pikv_host_calloc(ctx, 1, sizeof *b);
    if (b) b->devices = pikv_host_calloc(ctx, MAX_CUDA_DEVICES, sizeof *b->devices);
    if (!b || !b->devices) {
        if (b) pikv_host_free(ctx, b->devices);
        pikv_host_free(ctx, b);
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "cuda backend: allocation failed");
    }
    b->iface = &cuda_backend_iface;
    b->kind = PIKV_BACKEND_CUDA;
    b->ctx = ctx;
    *out = b;

    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) { /* cudaErrorNoDevice, cudaErrorInsufficientDriver: no GPU here */
        pikv_log(ctx, PIKV_LOG_INFO, "cuda: %s (%s): the backend has no devices", cudaGetErrorString(err),
                 cudaGetErrorName(err));
        cudaGetLastError();
        return PIKV_OK;
    }
    int previous = 0;
    cudaGetDevice(&previous);
    pikv_status st = PIKV_OK;
    for (int i = 0; i < count && b->n_devices < MAX_CUDA_DEVICES && st == PIKV_OK; i++) st = add_device(ctx, b, i);
    cudaSetDevice(previous); /* leave the engine's current device as it was */
    cudaGetLastError();
    if (st != PIKV_OK) {
        cuda_backend_free(b);
        *out = NULL;
    }
    return st;
}
