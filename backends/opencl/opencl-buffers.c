/* OpenCL buffers: one cl_mem per pikv_buffer, accounted against the device's
   memory limit; copies on the device's in-order queue. Also the scratch
   buffers the ops upload their host inputs into. */
#include "opencl-impl.h"

/* ---- arenas (CPU devices) ------------------------------------------------- */

enum { GRANULE = 4096 };
#define ARENA_MIN ((size_t)64 << 20)
#define ARENA_MAX ((size_t)1 << 30)
#define PIECE_MAX ((size_t)16 << 20) /* larger buffers get a cl_mem of their own */

static bool bit_get(const uint64_t *bm, size_t i) { return (bm[i >> 6] >> (i & 63)) & 1u; }

static void bits_set(uint64_t *bm, size_t i, size_t n, bool v)
{
    for (size_t k = i; k < i + n; k++) {
        if (v)
            bm[k >> 6] |= (uint64_t)1 << (k & 63);
        else
            bm[k >> 6] &= ~((uint64_t)1 << (k & 63));
    }
}

/* First fit of n free granules, or SIZE_MAX. */
static size_t arena_find(const pikv_ocl_arena *a, size_t n)
{
    size_t run = 0;
    for (size_t i = 0; i < a->n_granules; i++) {
        if ((i & 63) == 0 && a->used[i >> 6] == ~(uint64_t)0 && i + 64 <= a->n_granules) {
            run = 0;
            i += 63;
            continue;
        }
        run = bit_get(a->used, i) ? 0 : run + 1;
        if (run == n) return i + 1 - n;
    }
    return SIZE_MAX;
}

static void arena_release(pikv_context *ctx, pikv_ocl_device *od, pikv_ocl_arena *a)
{
    for (pikv_ocl_arena **p = &od->arenas; *p; p = &(*p)->next)
        if (*p == a) {
            *p = a->next;
            break;
        }
    od->arena_bytes -= a->size;
    clReleaseMemObject(a->mem);
    pikv_host_free(ctx, a->used);
    pikv_host_free(ctx, a);
}

void pikv_ocl_arenas_free(pikv_context *ctx, pikv_ocl_device *od)
{
    while (od->arenas) arena_release(ctx, od, od->arenas);
}

/* A sub-buffer of size bytes in an arena (a new arena when none has room); false
   when that cannot be done (the caller then makes a buffer of its own). */
static bool arena_alloc(pikv_device *dev, size_t size, pikv_ocl_buffer *ob)
{
    pikv_context *ctx = dev->ctx;
    pikv_ocl_device *od = pikv_ocl_dev(dev);
    if (od->base_align > GRANULE || size > PIECE_MAX) return false;
    const size_t n = (size + GRANULE - 1) / GRANULE;
    pikv_ocl_arena *a = od->arenas;
    size_t at = SIZE_MAX;
    for (; a; a = a->next)
        if ((at = arena_find(a, n)) != SIZE_MAX) break;
    if (!a) {
        size_t want = od->arena_bytes < ARENA_MIN ? ARENA_MIN : od->arena_bytes > ARENA_MAX ? ARENA_MAX
                                                                                            : (size_t)od->arena_bytes;
        if (od->max_alloc > 0 && want > od->max_alloc) want = (size_t)od->max_alloc / GRANULE * GRANULE;
        if (want < n * GRANULE) return false;
        a = pikv_host_calloc(ctx, 1, sizeof *a);
        if (!a) return false;
        a->size = want;
        a->n_granules = want / GRANULE;
        a->used = pikv_host_calloc(ctx, (a->n_granules + 63) / 64, sizeof(uint64_t));
        cl_int err = CL_SUCCESS;
        if (a->used) a->mem = clCreateBuffer(od->cl, CL_MEM_READ_WRITE, want, NULL, &err);
        if (!a->used || !a->mem || err != CL_SUCCESS) {
            pikv_host_free(ctx, a->used);
            pikv_host_free(ctx, a);
            return false;
        }
        a->next = od->arenas;
        od->arenas = a;
        od->arena_bytes += want;
        at = 0;
    }
    cl_buffer_region reg = {.origin = at * GRANULE, .size = size};
    cl_int err = CL_SUCCESS;
    cl_mem sub = clCreateSubBuffer(a->mem, CL_MEM_READ_WRITE, CL_BUFFER_CREATE_TYPE_REGION, &reg, &err);
    if (!sub || err != CL_SUCCESS) {
        if (a->pieces == 0) arena_release(ctx, od, a);
        return false;
    }
    bits_set(a->used, at, n, true);
    a->pieces++;
    ob->b.handle = sub;
    ob->parent = a->mem;
    ob->base = (uint64_t)at * GRANULE;
    ob->arena = a;
    return true;
}

pikv_status pikv_ocl_buffer_alloc(pikv_device *dev, uint64_t size, pikv_buffer **out)
{
    pikv_context *ctx = dev->ctx;
    pikv_ocl_device *od = pikv_ocl_dev(dev);
    *out = NULL;
    PIKV_RETURN_ERROR_IF(size == 0 || size > SIZE_MAX / 2, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "buffer size %llu is not allocatable", (unsigned long long)size);
    PIKV_FORWARD_IF_ERROR(pikv_device_reserve_bytes(dev, size));
    pikv_ocl_buffer *ob = pikv_host_calloc(ctx, 1, sizeof *ob);
    if (!ob) {
        pikv_device_release_bytes(dev, size);
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "device %s: buffer allocation failed", dev->info.name);
    }
    cl_mem mem = NULL;
    if (od->is_cpu && arena_alloc(dev, (size_t)size, ob)) {
        mem = (cl_mem)ob->b.handle;
    } else {
        cl_int err = CL_SUCCESS;
        mem = clCreateBuffer(od->cl, CL_MEM_READ_WRITE, (size_t)size, NULL, &err);
        if (!mem || err != CL_SUCCESS) {
            pikv_host_free(ctx, ob);
            pikv_device_release_bytes(dev, size);
            return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "device %s: clCreateBuffer of %llu bytes failed: %s (%d)",
                             dev->info.name, (unsigned long long)size, pikv_ocl_error_name(err), (int)err);
        }
        ob->parent = mem;
        ob->base = 0;
        ob->arena = NULL;
    }
    ob->b.device = dev;
    ob->b.size = size;
    ob->b.host = NULL;
    ob->b.handle = mem;
    /* Zero it, like the CPU backend's calloc'd chunks: stray reads see zeros. */
    const cl_uchar zero = 0;
    cl_int err = clEnqueueFillBuffer(od->queue, mem, &zero, 1, 0, (size_t)size, 0, NULL, NULL);
    if (err != CL_SUCCESS) {
        pikv_ocl_buffer_free(dev, &ob->b);
        return pikv_ocl_fail(dev, err, "clEnqueueFillBuffer");
    }
    *out = &ob->b;
    return PIKV_OK;
}

void pikv_ocl_buffer_free(pikv_device *dev, pikv_buffer *buf)
{
    if (!buf) return;
    pikv_ocl_buffer *ob = (pikv_ocl_buffer *)buf;
    /* In-order queue: commands using it may still be queued; the driver keeps
       the object alive until they finish (release is deferred by the spec). */
    clReleaseMemObject((cl_mem)buf->handle);
    if (ob->arena) {
        pikv_ocl_arena *a = ob->arena;
        bits_set(a->used, (size_t)(ob->base / GRANULE), (size_t)((buf->size + GRANULE - 1) / GRANULE), false);
        if (--a->pieces == 0) arena_release(dev->ctx, pikv_ocl_dev(dev), a);
    }
    pikv_device_release_bytes(dev, buf->size);
    pikv_host_free(dev->ctx, ob);
}

pikv_status pikv_ocl_buffer_write(pikv_device *dev, pikv_buffer *buf, uint64_t offset, const void *src,
                                  uint64_t size)
{
    PIKV_RETURN_ERROR_IF(offset > buf->size || size > buf->size - offset, dev->ctx, PIKV_ERR_OUT_OF_RANGE,
                         "write of %llu bytes at %llu past buffer of %llu", (unsigned long long)size,
                         (unsigned long long)offset, (unsigned long long)buf->size);
    if (size == 0) return PIKV_OK;
    /* The caller's data need not outlive the call: wait on the copy's event. */
    cl_event ev = NULL;
    cl_int err = clEnqueueWriteBuffer(pikv_ocl_dev(dev)->queue, (cl_mem)buf->handle, CL_FALSE, (size_t)offset,
                                      (size_t)size, src, 0, NULL, &ev);
    if (err == CL_SUCCESS) err = clWaitForEvents(1, &ev);
    if (ev) clReleaseEvent(ev);
    return err == CL_SUCCESS ? PIKV_OK : pikv_ocl_fail(dev, err, "clEnqueueWriteBuffer");
}

pikv_status pikv_ocl_buffer_read(pikv_device *dev, const pikv_buffer *buf, uint64_t offset, void *dst,
                                 uint64_t size)
{
    PIKV_RETURN_ERROR_IF(offset > buf->size || size > buf->size - offset, dev->ctx, PIKV_ERR_OUT_OF_RANGE,
                         "read of %llu bytes at %llu past buffer of %llu", (unsigned long long)size,
                         (unsigned long long)offset, (unsigned long long)buf->size);
    if (size == 0) return PIKV_OK;
    cl_int err = clEnqueueReadBuffer(pikv_ocl_dev(dev)->queue, (cl_mem)buf->handle, CL_TRUE, (size_t)offset,
                                     (size_t)size, dst, 0, NULL, NULL);
    return err == CL_SUCCESS ? PIKV_OK : pikv_ocl_fail(dev, err, "clEnqueueReadBuffer");
}

pikv_status pikv_ocl_scratch(pikv_device *dev, int i, size_t size, cl_mem *out)
{
    pikv_ocl_device *od = pikv_ocl_dev(dev);
    pikv_ocl_scratch_buf *s = &od->scratch[i];
    if (size < 64) size = 64;
    if (s->mem && s->size >= size) {
        *out = s->mem;
        return PIKV_OK;
    }
    PIKV_RETURN_ERROR_IF(size > SIZE_MAX / 4, dev->ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "device %s: scratch of %zu bytes is not allocatable", dev->info.name, size);
    size_t grown = s->size ? s->size : 4096;
    while (grown < size) grown *= 2;
    if (s->mem) {
        clReleaseMemObject(s->mem); /* queued users keep it alive until they finish */
        s->mem = NULL;
        s->size = 0;
    }
    cl_int err = CL_SUCCESS;
    s->mem = clCreateBuffer(od->cl, CL_MEM_READ_WRITE, grown, NULL, &err);
    if (!s->mem || err != CL_SUCCESS) {
        s->mem = NULL;
        return PIKV_FAIL(dev->ctx, PIKV_ERR_OUT_OF_MEMORY, "device %s: scratch buffer of %zu bytes: %s (%d)",
                         dev->info.name, grown, pikv_ocl_error_name(err), (int)err);
    }
    s->size = grown;
    *out = s->mem;
    return PIKV_OK;
}

pikv_status pikv_ocl_upload(pikv_device *dev, int i, const void *src, size_t size, cl_mem *out)
{
    PIKV_FORWARD_IF_ERROR(pikv_ocl_scratch(dev, i, size, out));
    if (size == 0) return PIKV_OK;
    cl_int err = clEnqueueWriteBuffer(pikv_ocl_dev(dev)->queue, *out, CL_FALSE, 0, size, src, 0, NULL, NULL);
    return err == CL_SUCCESS ? PIKV_OK : pikv_ocl_fail(dev, err, "clEnqueueWriteBuffer (op input)");
}

void pikv_ocl_scratch_free(pikv_ocl_device *od)
{
    for (int i = 0; i < PIKV_OCL_SCRATCH; i++) {
        if (od->scratch[i].mem) clReleaseMemObject(od->scratch[i].mem);
        od->scratch[i].mem = NULL;
        od->scratch[i].size = 0;
    }
}
