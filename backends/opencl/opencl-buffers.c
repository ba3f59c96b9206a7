/* OpenCL buffers: one cl_mem per pikv_buffer, accounted against the device's
   memory limit; copies on the device's in-order queue. Also the scratch
   buffers the ops upload their host inputs into. */
#include "opencl-impl.h"

pikv_status pikv_ocl_buffer_alloc(pikv_device *dev, uint64_t size, pikv_buffer **out)
{
    pikv_context *ctx = dev->ctx;
    pikv_ocl_device *od = pikv_ocl_dev(dev);
    *out = NULL;
    PIKV_RETURN_ERROR_IF(size == 0 || size > SIZE_MAX / 2, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "buffer size %llu is not allocatable", (unsigned long long)size);
    PIKV_FORWARD_IF_ERROR(pikv_device_reserve_bytes(dev, size));
    pikv_buffer *buf = pikv_host_calloc(ctx, 1, sizeof *buf);
    if (!buf) {
        pikv_device_release_bytes(dev, size);
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "device %s: buffer allocation failed", dev->info.name);
    }
    cl_int err = CL_SUCCESS;
    cl_mem mem = clCreateBuffer(od->cl, CL_MEM_READ_WRITE, (size_t)size, NULL, &err);
    if (!mem || err != CL_SUCCESS) {
        pikv_host_free(ctx, buf);
        pikv_device_release_bytes(dev, size);
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "device %s: clCreateBuffer of %llu bytes failed: %s (%d)",
                         dev->info.name, (unsigned long long)size, pikv_ocl_error_name(err), (int)err);
    }
    /* Zero it, like the CPU backend's calloc'd chunks: stray reads see zeros. */
    const cl_uchar zero = 0;
    err = clEnqueueFillBuffer(od->queue, mem, &zero, 1, 0, (size_t)size, 0, NULL, NULL);
    if (err != CL_SUCCESS) {
        clReleaseMemObject(mem);
        pikv_host_free(ctx, buf);
        pikv_device_release_bytes(dev, size);
        return pikv_ocl_fail(dev, err, "clEnqueueFillBuffer");
    }
    buf->device = dev;
    buf->size = size;
    buf->host = NULL;
    buf->handle = mem;
    *out = buf;
    return PIKV_OK;
}

void pikv_ocl_buffer_free(pikv_device *dev, pikv_buffer *buf)
{
    if (!buf) return;
    /* In-order queue: commands using it may still be queued; the driver keeps
       the object alive until they finish (release is deferred by the spec). */
    clReleaseMemObject((cl_mem)buf->handle);
    pikv_device_release_bytes(dev, buf->size);
    pikv_host_free(dev->ctx, buf);
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
