/* Remote devices: another rank's device as this rank sees it.
 *
 * A distributed cache keeps the host metadata of every page on every rank
 * (placement, page tables, pool slots), updated by the same collective calls
 * in the same order, so every rank takes the same decisions without asking the
 * others. Only the page data is not replicated: a remote device's buffers have
 * no bytes, and the ops that write pages do nothing here (the owner runs them
 * on its own device). Ops that read page data never run on a remote device:
 * attend computes partials where the pages are and merges them over the
 * communicator (attend.c). */
#include "cache-impl.h"

#include <stdio.h>
#include <string.h>

static bool remote_supports_op(pikv_device *dev, pikv_op op, pikv_dtype dtype)
{
    (void)dev;
    (void)op;
    (void)dtype;
    return true; /* the owner checked its device when the cache was created */
}

static pikv_status remote_buffer_alloc(pikv_device *dev, uint64_t size, pikv_buffer **out)
{
    *out = NULL;
    PIKV_FORWARD_IF_ERROR(pikv_device_reserve_bytes(dev, size));
    pikv_buffer *b = pikv_host_calloc(dev->ctx, 1, sizeof *b);
    if (!b) {
        pikv_device_release_bytes(dev, size);
        return PIKV_FAIL(dev->ctx, PIKV_ERR_OUT_OF_MEMORY, "device %s: buffer record: allocation failed",
                         dev->info.name);
    }
    b->device = dev;
    b->size = size;
    *out = b;
    return PIKV_OK;
}

static void remote_buffer_free(pikv_device *dev, pikv_buffer *buf)
{
    if (!buf) return;
    pikv_device_release_bytes(dev, buf->size);
    pikv_host_free(dev->ctx, buf);
}

static pikv_status remote_buffer_write(pikv_device *dev, pikv_buffer *buf, uint64_t offset, const void *src,
                                       uint64_t size)
{
    (void)buf;
    (void)offset;
    (void)src;
    (void)size;
    return PIKV_FAIL(dev->ctx, PIKV_ERR_UNSUPPORTED, "device %s: page data lives on its rank; moving pages "
                     "between ranks is not supported", dev->info.name);
}

static pikv_status remote_buffer_read(pikv_device *dev, const pikv_buffer *buf, uint64_t offset, void *dst,
                                      uint64_t size)
{
    (void)buf;
    (void)offset;
    (void)dst;
    (void)size;
    return PIKV_FAIL(dev->ctx, PIKV_ERR_UNSUPPORTED, "device %s: page data lives on its rank; moving pages "
                     "between ranks is not supported", dev->info.name);
}

/* Page writes: the owner runs them. */
static pikv_status remote_append(pikv_device *dev, const pikv_append_args *a)
{
    (void)dev;
    (void)a;
    return PIKV_OK;
}

static pikv_status remote_page_copy(pikv_device *dev, const pikv_page_copy_args *a)
{
    (void)dev;
    (void)a;
    return PIKV_OK;
}

static pikv_status remote_quantize(pikv_device *dev, pikv_quantize_args *a)
{
    (void)dev;
    (void)a; /* the reconstruction error is counted where the page is */
    return PIKV_OK;
}

/* Reads: never called (the runtime computes partials where the pages are). */
static pikv_status remote_attention(pikv_device *dev, const pikv_attention_args *a)
{
    (void)a;
    return PIKV_FAIL(dev->ctx, PIKV_ERR_INTERNAL, "device %s: attention on a remote device", dev->info.name);
}

static pikv_status remote_score(pikv_device *dev, const pikv_score_args *a)
{
    (void)a;
    return PIKV_FAIL(dev->ctx, PIKV_ERR_INTERNAL, "device %s: scoring on a remote device", dev->info.name);
}

static pikv_status remote_merge(pikv_device *dev, const pikv_merge_args *a)
{
    (void)a;
    return PIKV_FAIL(dev->ctx, PIKV_ERR_INTERNAL, "device %s: merge on a remote device", dev->info.name);
}

static pikv_status remote_topk(pikv_device *dev, const pikv_topk_args *a)
{
    (void)a;
    return PIKV_FAIL(dev->ctx, PIKV_ERR_INTERNAL, "device %s: top-k on a remote device", dev->info.name);
}

static pikv_status remote_synchronize(pikv_device *dev)
{
    (void)dev;
    return PIKV_OK;
}

static const pikv_device_iface remote_iface = {
    .supports_op = remote_supports_op,
    .buffer_alloc = remote_buffer_alloc,
    .buffer_free = remote_buffer_free,
    .buffer_write = remote_buffer_write,
    .buffer_read = remote_buffer_read,
    .append = remote_append,
    .page_copy = remote_page_copy,
    .attention = remote_attention,
    .merge = remote_merge,
    .score = remote_score,
    .topk = remote_topk,
    .quantize = remote_quantize,
    .synchronize = remote_synchronize,
};

pikv_status pikv_remote_device_create(pikv_context *ctx, int32_t rank, const char *name, uint64_t memory_limit,
                                      pikv_device **out)
{
    *out = NULL;
    pikv_device *d = pikv_host_calloc(ctx, 1, sizeof *d);
    PIKV_RETURN_ERROR_IF(!d, ctx, PIKV_ERR_OUT_OF_MEMORY, "remote device: allocation failed");
    d->iface = &remote_iface;
    d->ctx = ctx;
    d->index = -1;
    snprintf(d->info.name, sizeof d->info.name, "rank%d:%.20s", (int)rank, name);
    snprintf(d->info.description, sizeof d->info.description, "device %.20s of rank %d (pages live there)", name,
             (int)rank);
    d->info.backend_index = -1;
    d->info.caps.memory_limit = memory_limit;
    *out = d;
    return PIKV_OK;
}

void pikv_remote_device_free(pikv_context *ctx, pikv_device *dev)
{
    pikv_host_free(ctx, dev);
}
