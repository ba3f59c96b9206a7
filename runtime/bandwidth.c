/* pikv_device_read_bandwidth and the read probe: the measured read roofline of a device, the
 * denominator of every "share of bandwidth" the benchmarks report. The timed
 * region is the backend's read_reduce op alone; the fill is not timed. */
#include "backend-impl.h"

#include <stdlib.h>
#include <string.h>

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Fill the buffer with 1.0f through a bounded host staging block. */
static pikv_status fill_ones(pikv_device *dev, pikv_buffer *buf, uint64_t bytes)
{
    pikv_context *ctx = dev->ctx;
    const uint64_t block = bytes < (4u << 20) ? bytes : (4u << 20);
    float *ones = pikv_host_alloc(ctx, (size_t)block, 64);
    PIKV_RETURN_ERROR_IF(!ones, ctx, PIKV_ERR_OUT_OF_MEMORY, "read bandwidth: %llu-byte staging block: "
                         "allocation failed", (unsigned long long)block);
    for (uint64_t i = 0; i < block / sizeof(float); i++) ones[i] = 1.0f;
    pikv_status st = PIKV_OK;
    for (uint64_t at = 0; at < bytes && st == PIKV_OK; at += block) {
        const uint64_t n = bytes - at < block ? bytes - at : block;
        st = dev->iface->buffer_write(dev, buf, at, ones, n);
    }
    pikv_host_free(ctx, ones);
    return st;
}

struct pikv_read_probe {
    pikv_context *ctx;
    pikv_device *dev;
    pikv_buffer *buf;
    uint64_t bytes;
};

pikv_status pikv_read_probe_create(pikv_context *ctx, int32_t device, uint64_t bytes, pikv_read_probe **out)
{
    if (!ctx) return PIKV_ERR_INVALID_ARGUMENT;
    PIKV_RETURN_ERROR_IF(!out, ctx, PIKV_ERR_INVALID_ARGUMENT, "pikv_read_probe_create: out is NULL");
    *out = NULL;
    PIKV_RETURN_ERROR_IF(device < 0 || device >= ctx->n_devices, ctx, PIKV_ERR_OUT_OF_RANGE,
                         "pikv_read_probe_create: device %d is outside 0..%d", device, ctx->n_devices - 1);
    PIKV_RETURN_ERROR_IF(bytes < 4096 || bytes > (1ull << 40) || bytes % 4, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "pikv_read_probe_create: bytes %llu is not a multiple of 4 in 4096..2^40",
                         (unsigned long long)bytes);
    pikv_device *dev = ctx->devices[device];
    PIKV_RETURN_ERROR_IF(!dev->iface->read_reduce || !dev->iface->supports_op(dev, PIKV_OP_READ_REDUCE, PIKV_DTYPE_F32),
                         ctx, PIKV_ERR_UNSUPPORTED, "pikv_read_probe_create: device %s (%s) has no read-reduce "
                         "kernel", dev->info.name, pikv_backend_name(dev->info.backend));
    pikv_read_probe *p = pikv_host_calloc(ctx, 1, sizeof *p);
    PIKV_RETURN_ERROR_IF(!p, ctx, PIKV_ERR_OUT_OF_MEMORY, "pikv_read_probe_create: allocation failed");
    p->ctx = ctx;
    p->dev = dev;
    p->bytes = bytes;
    pikv_status st = dev->iface->buffer_alloc(dev, bytes, &p->buf);
    if (st == PIKV_OK) st = fill_ones(dev, p->buf, bytes);
    if (st == PIKV_OK) st = dev->iface->synchronize(dev);
    if (st != PIKV_OK) {
        pikv_read_probe_free(p);
        return st;
    }
    *out = p;
    return PIKV_OK;
}

void pikv_read_probe_free(pikv_read_probe *probe)
{
    if (!probe) return;
    if (probe->buf) probe->dev->iface->buffer_free(probe->dev, probe->buf);
    pikv_host_free(probe->ctx, probe);
}

pikv_status pikv_read_probe_run(pikv_read_probe *probe, int32_t passes, pikv_read_bandwidth *out)
{
    if (!probe) return PIKV_ERR_INVALID_ARGUMENT;
    pikv_context *ctx = probe->ctx;
    pikv_device *dev = probe->dev;
    PIKV_RETURN_ERROR_IF(!out, ctx, PIKV_ERR_INVALID_ARGUMENT, "pikv_read_probe_run: out is NULL");
    PIKV_RETURN_ERROR_IF(passes < 1 || passes > 1000, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "pikv_read_probe_run: passes %d is outside 1..1000", passes);
    double *times = pikv_host_calloc(ctx, (size_t)passes, sizeof(double));
    PIKV_RETURN_ERROR_IF(!times, ctx, PIKV_ERR_OUT_OF_MEMORY, "pikv_read_probe_run: allocation failed");
    const uint64_t n = probe->bytes / sizeof(float);
    pikv_status st = PIKV_OK;
    for (int32_t p = 0; p < passes && st == PIKV_OK; p++) {
        double sum = 0;
        pikv_read_reduce_args args = {probe->buf, n, &sum};
        const double t0 = pikv_monotonic_s();
        st = dev->iface->read_reduce(dev, &args);
        times[p] = pikv_monotonic_s() - t0;
        /* a sum of ones is exact when kernels keep their float partial sums under 2^24 */
        if (st == PIKV_OK && !(sum >= (double)n * (1 - 1e-5) && sum <= (double)n * (1 + 1e-5)))
            st = PIKV_FAIL(ctx, PIKV_ERR_BACKEND, "read bandwidth: device %s summed %.17g over %llu ones",
                           dev->info.name, sum, (unsigned long long)n);
    }
    if (st == PIKV_OK) {
        double total = 0;
        for (int32_t p = 0; p < passes; p++) total += times[p];
        qsort(times, (size_t)passes, sizeof(double), cmp_double);
        memset(out, 0, sizeof *out);
        out->bytes = probe->bytes;
        out->passes = passes;
        out->best_s = times[0];
        out->median_s = passes % 2 ? times[passes / 2] : 0.5 * (times[passes / 2 - 1] + times[passes / 2]);
        out->total_s = total;
        out->bytes_per_s = times[0] > 0 ? (double)probe->bytes / times[0] : 0;
    }
    pikv_host_free(ctx, times);
    return st;
}

pikv_status pikv_device_read_bandwidth(pikv_context *ctx, int32_t device, uint64_t bytes, int32_t passes,
                                       pikv_read_bandwidth *out)
{
    if (!ctx) return PIKV_ERR_INVALID_ARGUMENT;
    PIKV_RETURN_ERROR_IF(!out, ctx, PIKV_ERR_INVALID_ARGUMENT, "pikv_device_read_bandwidth: out is NULL");
    PIKV_RETURN_ERROR_IF(passes < 1 || passes > 1000, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "pikv_device_read_bandwidth: passes %d is outside 1..1000", passes);
    pikv_read_probe *probe = NULL;
    pikv_status st = pikv_read_probe_create(ctx, device, bytes, &probe);
    if (st == PIKV_OK) st = pikv_read_probe_run(probe, passes, out);
    pikv_read_probe_free(probe);
    return st;
}
