/* CUDA memory: page chunks and scratch come from the device's stream-ordered
   pool (freed memory stays in the pool for reuse, so growing and trimming a
   cache does not call the driver's allocator each time); every host transfer
   goes through pinned staging, so copies run at full PCIe/NVLink speed and
   buffer writes return before their copy has finished (copy stream + event). */
#include "cuda-impl.h"

#include <string.h>

enum { UPLOAD_STAGING = 8 << 20 }; /* buffer_write's pinned staging */

pikv_status pikv_cuda_buffer_alloc(pikv_device *dev, uint64_t size, pikv_buffer **out)
{
    pikv_context *ctx = dev->ctx;
    *out = NULL;
    PIKV_RETURN_ERROR_IF(size == 0 || size > SIZE_MAX / 2, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "buffer size %llu is not allocatable", (unsigned long long)size);
    PIKV_FORWARD_IF_ERROR(pikv_device_reserve_bytes(dev, size));
    pikv_cuda_device *cd = pikv_cuda_dev(dev);
    pikv_status st = PIKV_OK;
    int prev = -1;
    void *mem = NULL;
    pikv_buffer *buf = pikv_host_calloc(ctx, 1, sizeof *buf);
    if (!buf) {
        st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "device %s: buffer record: allocation failed", dev->info.name);
        goto done;
    }
    st = pikv_cuda_enter(dev, &prev);
    if (st != PIKV_OK) goto done;
    CUDA_TRY(cudaMallocFromPoolAsync(&mem, (size_t)size, cd->pool, cd->stream), "cudaMallocFromPoolAsync");
    /* usable by the copy stream too from now on */
    CUDA_TRY(cudaStreamSynchronize(cd->stream), "cudaStreamSynchronize (allocation)");
    buf->device = dev;
    buf->size = size;
    buf->host = NULL;
    buf->handle = mem;
    *out = buf;
done:
    if (st != PIKV_OK) {
        if (mem) cudaFreeAsync(mem, cd->stream);
        pikv_host_free(ctx, buf);
        pikv_device_release_bytes(dev, size);
    }
    pikv_cuda_leave(prev);
    return st;
}

void pikv_cuda_buffer_free(pikv_device *dev, pikv_buffer *buf)
{
    if (!buf) return;
    pikv_cuda_device *cd = pikv_cuda_dev(dev);
    int prev = -1;
    cudaGetDevice(&prev);
    if (cudaSetDevice(cd->ordinal) == cudaSuccess) {
        /* after every pending upload into it, and every op (stream order) */
        cudaStreamWaitEvent(cd->stream, cd->write_done, 0);
        cudaFreeAsync(buf->handle, cd->stream);
    }
    if (prev >= 0) cudaSetDevice(prev);
    cudaGetLastError();
    pikv_device_release_bytes(dev, buf->size);
    pikv_host_free(dev->ctx, buf);
}

static pikv_status check_range(pikv_device *dev, const pikv_buffer *buf, uint64_t offset, uint64_t size,
                               const char *what)
{
    PIKV_RETURN_ERROR_IF(offset > buf->size || size > buf->size - offset, dev->ctx, PIKV_ERR_OUT_OF_RANGE,
                         "device %s: %s of %llu bytes at %llu past buffer of %llu", dev->info.name, what,
                         (unsigned long long)size, (unsigned long long)offset, (unsigned long long)buf->size);
    return PIKV_OK;
}

/* Host -> device through the upload staging on the copy stream. Returns once
   the source has been copied into staging: the device copy goes on while the
   caller continues; the next op (on the compute stream) waits for it. */
static pikv_status upload(pikv_device *dev, unsigned char *dst, const void *src, uint64_t size)
{
    pikv_cuda_device *cd = pikv_cuda_dev(dev);
    pikv_status st = PIKV_OK;
    if (!cd->upload) {
        CUDA_TRY(cudaHostAlloc((void **)&cd->upload, UPLOAD_STAGING, cudaHostAllocPortable), "cudaHostAlloc");
        cd->upload_size = UPLOAD_STAGING;
    }
    for (uint64_t done_bytes = 0; done_bytes < size;) {
        const size_t n = (size_t)(size - done_bytes < cd->upload_size ? size - done_bytes : cd->upload_size);
        /* the staging is free once the previous upload has been copied out of it */
        CUDA_TRY(cudaEventSynchronize(cd->write_done), "cudaEventSynchronize (staging)");
        memcpy(cd->upload, (const unsigned char *)src + done_bytes, n);
        CUDA_TRY(cudaMemcpyAsync(dst + done_bytes, cd->upload, n, cudaMemcpyHostToDevice, cd->copy_stream),
                 "cudaMemcpyAsync (upload)");
        CUDA_TRY(cudaEventRecord(cd->write_done, cd->copy_stream), "cudaEventRecord");
        CUDA_TRY(cudaStreamWaitEvent(cd->stream, cd->write_done, 0), "cudaStreamWaitEvent");
        done_bytes += n;
    }
done:
    return st;
}

/* Device -> host through the op staging on the compute stream (after every
   op and upload); finished on return. */
static pikv_status download(pikv_device *dev, void *dst, const unsigned char *src, uint64_t size)
{
    pikv_cuda_device *cd = pikv_cuda_dev(dev);
    pikv_status st = PIKV_OK;
    const size_t piece = 8u << 20;
    unsigned char *stage = NULL;
    PIKV_FORWARD_IF_ERROR(pikv_cuda_pinned(dev, size < piece ? (size_t)size : piece, &stage));
    for (uint64_t done_bytes = 0; done_bytes < size;) {
        const size_t n = (size_t)(size - done_bytes < piece ? size - done_bytes : piece);
        CUDA_TRY(cudaMemcpyAsync(stage, src + done_bytes, n, cudaMemcpyDeviceToHost, cd->stream),
                 "cudaMemcpyAsync (download)");
        CUDA_TRY(cudaStreamSynchronize(cd->stream), "cudaStreamSynchronize (download)");
        memcpy((unsigned char *)dst + done_bytes, stage, n);
        done_bytes += n;
    }
done:
    return st;
}

pikv_status pikv_cuda_buffer_write(pikv_device *dev, pikv_buffer *buf, uint64_t offset, const void *src,
                                   uint64_t size)
{
    PIKV_FORWARD_IF_ERROR(check_range(dev, buf, offset, size, "write"));
    if (size == 0) return PIKV_OK;
    int prev;
    pikv_status st = pikv_cuda_enter(dev, &prev);
    if (st == PIKV_OK) st = upload(dev, (unsigned char *)buf->handle + offset, src, size);
    pikv_cuda_leave(prev);
    return st;
}

pikv_status pikv_cuda_buffer_read(pikv_device *dev, const pikv_buffer *buf, uint64_t offset, void *dst,
                                  uint64_t size)
{
    PIKV_FORWARD_IF_ERROR(check_range(dev, buf, offset, size, "read"));
    if (size == 0) return PIKV_OK;
    int prev;
    pikv_status st = pikv_cuda_enter(dev, &prev);
    if (st == PIKV_OK) st = download(dev, dst, (const unsigned char *)buf->handle + offset, size);
    pikv_cuda_leave(prev);
    return st;
}

/* Zero copy: an engine's own device pointers. */
pikv_status pikv_cuda_memory_read(pikv_device *dev, const void *src, void *dst_host, uint64_t size)
{
    if (size == 0) return PIKV_OK;
    int prev;
    pikv_status st = pikv_cuda_enter(dev, &prev);
    if (st == PIKV_OK) st = download(dev, dst_host, src, size);
    pikv_cuda_leave(prev);
    return st;
}

pikv_status pikv_cuda_memory_write(pikv_device *dev, void *dst, const void *src_host, uint64_t size)
{
    if (size == 0) return PIKV_OK;
    int prev;
    pikv_status st = pikv_cuda_enter(dev, &prev);
    if (st == PIKV_OK) st = upload(dev, dst, src_host, size);
    /* finished on return: the engine may read dst on any stream right away */
    if (st == PIKV_OK) {
        cudaError_t err = cudaEventSynchronize(pikv_cuda_dev(dev)->write_done);
        if (err != cudaSuccess) st = pikv_cuda_fail(dev, err, "cudaEventSynchronize (memory write)");
    }
    pikv_cuda_leave(prev);
    return st;
}

pikv_status pikv_cuda_pinned(pikv_device *dev, size_t size, unsigned char **out)
{
    pikv_cuda_device *cd = pikv_cuda_dev(dev);
    if (size > cd->pinned_size) {
        /* the compute stream is idle between ops, and downloads synchronize
           before the staging is reused, so the old block is no longer in use */
        size_t want = cd->pinned_size ? cd->pinned_size : (1u << 20);
        while (want < size) want *= 2;
        if (cd->pinned) cudaFreeHost(cd->pinned);
        cd->pinned = NULL;
        cd->pinned_size = 0;
        cudaError_t err = cudaHostAlloc((void **)&cd->pinned, want, cudaHostAllocPortable);
        if (err != cudaSuccess) {
            cd->pinned = NULL;
            return pikv_cuda_fail(dev, err, "cudaHostAlloc (op staging)");
        }
        cd->pinned_size = want;
    }
    *out = cd->pinned;
    return PIKV_OK;
}

pikv_status pikv_cuda_scratch(pikv_device *dev, size_t size, unsigned char **out)
{
    pikv_cuda_device *cd = pikv_cuda_dev(dev);
    if (size > cd->scratch_size) {
        size_t want = cd->scratch_size ? cd->scratch_size : (1u << 20);
        while (want < size) want *= 2;
        if (cd->scratch) cudaFreeAsync(cd->scratch, cd->stream); /* after the ops that used it */
        cd->scratch = NULL;
        cd->scratch_size = 0;
        cudaError_t err = cudaMallocFromPoolAsync((void **)&cd->scratch, want, cd->pool, cd->stream);
        if (err != cudaSuccess) {
            cd->scratch = NULL;
            return pikv_cuda_fail(dev, err, "cudaMallocFromPoolAsync (op scratch)");
        }
        cd->scratch_size = want;
    }
    *out = cd->scratch;
    return PIKV_OK;
}

void pikv_cuda_memory_release(pikv_device *dev)
{
    pikv_cuda_device *cd = pikv_cuda_dev(dev);
    if (cd->scratch) cudaFreeAsync(cd->scratch, cd->stream);
    if (cd->stream) cudaStreamSynchronize(cd->stream);
    if (cd->pinned) cudaFreeHost(cd->pinned);
    if (cd->upload) cudaFreeHost(cd->upload);
    cd->scratch = cd->pinned = cd->upload = NULL;
    cd->scratch_size = cd->pinned_size = cd->upload_size = 0;
}
