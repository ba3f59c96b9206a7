/* The CPU reference backend: registration, devices and buffers. Device memory
   is host memory from the context's allocator; every device accounts its own. */
#include "cpu-impl.h"

#include <math.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static bool cpu_supports_op(pikv_device *dev, pikv_op op, pikv_dtype dtype)
{
    (void)dev;
    bool dtype_ok = dtype == PIKV_DTYPE_F32 || dtype == PIKV_DTYPE_F16 || dtype == PIKV_DTYPE_INT8 ||
                    dtype == PIKV_DTYPE_INT4;
    return dtype_ok && op >= 0 && op < PIKV_OP_COUNT_;
}

static pikv_status cpu_buffer_alloc(pikv_device *dev, uint64_t size, pikv_buffer **out)
{
    pikv_context *ctx = dev->ctx;
    *out = NULL;
    PIKV_RETURN_ERROR_IF(size == 0 || size > SIZE_MAX / 2, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "buffer size %llu is not allocatable", (unsigned long long)size);
    PIKV_FORWARD_IF_ERROR(pikv_device_reserve_bytes(dev, size));
    pikv_buffer *buf = pikv_host_calloc(ctx, 1, sizeof *buf);
    void *mem = buf ? pikv_cpu_arena_alloc(ctx, pikv_cpu_device_backend(dev), (size_t)size) : NULL;
    if (!mem) {
        pikv_host_free(ctx, buf);
        pikv_device_release_bytes(dev, size);
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "device %s: allocation of %llu bytes failed",
                         dev->info.name, (unsigned long long)size);
    }
    buf->device = dev;
    buf->size = size;
    buf->host = mem;
    buf->handle = mem;
    *out = buf;
    return PIKV_OK;
}

static void cpu_buffer_free(pikv_device *dev, pikv_buffer *buf)
{
    if (!buf) return;
    pikv_device_release_bytes(dev, buf->size);
    pikv_cpu_arena_free(dev->ctx, pikv_cpu_device_backend(dev), buf->host, (size_t)buf->size);
    pikv_host_free(dev->ctx, buf);
}

static pikv_status cpu_buffer_write(pikv_device *dev, pikv_buffer *buf, uint64_t offset,
                                    const void *src, uint64_t size)
{
    PIKV_RETURN_ERROR_IF(offset > buf->size || size > buf->size - offset, dev->ctx,
                         PIKV_ERR_OUT_OF_RANGE, "write of %llu bytes at %llu past buffer of %llu",
                         (unsigned long long)size, (unsigned long long)offset,
                         (unsigned long long)buf->size);
    memcpy((unsigned char *)buf->host + offset, src, (size_t)size);
    return PIKV_OK;
}

static pikv_status cpu_buffer_read(pikv_device *dev, const pikv_buffer *buf, uint64_t offset,
                                   void *dst, uint64_t size)
{
    PIKV_RETURN_ERROR_IF(offset > buf->size || size > buf->size - offset, dev->ctx,
                         PIKV_ERR_OUT_OF_RANGE, "read of %llu bytes at %llu past buffer of %llu",
                         (unsigned long long)size, (unsigned long long)offset,
                         (unsigned long long)buf->size);
    memcpy(dst, (const unsigned char *)buf->host + offset, (size_t)size);
    return PIKV_OK;
}

static pikv_status cpu_synchronize(pikv_device *dev)
{
    (void)dev; /* every CPU op completes before it returns */
    return PIKV_OK;
}

/* Zero copy: a CPU device's memory is host memory, so the engine's tensors are host
   pointers; the ops read and write them as they are (src_on_device, io_on_device
   change nothing here). */
static pikv_status cpu_memory_read(pikv_device *dev, const void *src, void *dst_host, uint64_t size)
{
    (void)dev;
    if (size) memcpy(dst_host, src, (size_t)size);
    return PIKV_OK;
}

static pikv_status cpu_memory_write(pikv_device *dev, void *dst, const void *src_host, uint64_t size)
{
    (void)dev;
    if (size) memcpy(dst, src_host, (size_t)size);
    return PIKV_OK;
}

static pikv_status cpu_find_out_of_range(pikv_device *dev, const float *ptr, int64_t n, float limit,
                                         int64_t *first)
{
    (void)dev;
    *first = -1;
    for (int64_t i = 0; i < n; i++)
        if (!(fabsf(ptr[i]) <= limit)) {
            *first = i;
            break;
        }
    return PIKV_OK;
}

static const pikv_device_iface cpu_device_iface = {
    .supports_op = cpu_supports_op,
    .buffer_alloc = cpu_buffer_alloc,
    .buffer_free = cpu_buffer_free,
    .buffer_write = cpu_buffer_write,
    .buffer_read = cpu_buffer_read,
    .append = pikv_cpu_append,
    .page_copy = pikv_cpu_page_copy,
    .attention = pikv_cpu_attention,
    .merge = pikv_cpu_merge,
    .score = pikv_cpu_score,
    .topk = pikv_cpu_topk,
    .quantize = pikv_cpu_quantize,
    .read_reduce = pikv_cpu_read_reduce,
    .synchronize = cpu_synchronize,
    .memory_read = cpu_memory_read,
    .memory_write = cpu_memory_write,
    .find_out_of_range = cpu_find_out_of_range,
};

static void cpu_backend_free(pikv_backend *b)
{
    if (!b) return;
    pikv_context *ctx = b->ctx;
    pikv_cpu_backend *cb = b->context;
    if (cb) pikv_cpu_pool_free(ctx, cb->pool);
    if (cb) pikv_cpu_arena_release(ctx, cb);
    pikv_host_free(ctx, cb);
    for (int32_t i = 0; b->devices && i < b->n_devices; i++) pikv_host_free(ctx, b->devices[i]);
    pikv_host_free(ctx, b->devices);
    pikv_host_free(ctx, b);
}

static const pikv_backend_iface cpu_backend_iface = {.free = cpu_backend_free};

static uint64_t physical_memory(void)
{
    long pages = sysconf(_SC_PHYS_PAGES);
    long page = sysconf(_SC_PAGESIZE);
    return pages > 0 && page > 0 ? (uint64_t)pages * (uint64_t)page : 0;
}

pikv_status pikv_backend_cpu_init(pikv_context *ctx, const pikv_context_params *params,
                                  pikv_backend **out)
{
    *out = NULL;
    int32_t n = params->cpu_devices;
    pikv_backend *b = pikv_host_calloc(ctx, 1, sizeof *b);
    if (!b) return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "cpu backend: allocation failed");
    b->iface = &cpu_backend_iface;
    b->kind = PIKV_BACKEND_CPU;
    b->ctx = ctx;
    pikv_cpu_backend *cb = pikv_host_calloc(ctx, 1, sizeof *cb);
    b->context = cb;
    b->devices = pikv_host_calloc(ctx, (size_t)n, sizeof *b->devices);
    if (!cb || !b->devices) {
        cpu_backend_free(b);
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "cpu backend: allocation failed");
    }
    pikv_cpu_f16_init(cb);
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    int32_t threads = params->cpu_threads > 0 ? params->cpu_threads : (online > 0 ? (int32_t)online : 1);
    pikv_status st = pikv_cpu_pool_create(ctx, threads, &cb->pool);
    if (st != PIKV_OK) {
        cpu_backend_free(b);
        return st;
    }
    uint64_t mem = physical_memory();
    for (int32_t i = 0; i < n; i++) {
        pikv_device *d = pikv_host_calloc(ctx, 1, sizeof *d);
        if (!d) {
            cpu_backend_free(b);
            return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "cpu backend: allocation failed");
        }
        b->devices[b->n_devices++] = d;
        d->iface = &cpu_device_iface;
        d->backend = b;
        d->ctx = ctx;
        pikv_device_info *info = &d->info;
        snprintf(info->name, sizeof info->name, "cpu%d", (int)i);
        snprintf(info->description, sizeof info->description,
                 "CPU reference backend, %d threads shared by %d devices",
                 (int)pikv_cpu_pool_threads(cb->pool), (int)n);
        info->backend = PIKV_BACKEND_CPU;
        info->backend_index = i;
        info->caps.memory_total = mem;
        info->caps.memory_limit = params->cpu_device_memory;
        info->caps.compute_units = pikv_cpu_pool_threads(cb->pool);
        info->caps.subgroup_size = 1;
        info->caps.async_copies = 0;
        info->caps.host_visible = 1;
        info->caps.f16_storage = 1;
        info->caps.int8_dot = 0;
    }
    *out = b;
    return PIKV_OK;
}
