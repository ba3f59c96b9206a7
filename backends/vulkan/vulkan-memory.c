/* Vulkan memory: page chunks are VkBuffers sub-allocated from large
   device-local blocks (never one VkDeviceMemory per buffer: allocation counts
   are limited, maxMemoryAllocationCount can be as low as 4096); host data
   moves through a host-visible staging buffer; op inputs and outputs use
   host-visible scratch buffers. */
#include "vulkan-impl.h"

#include <stdio.h>
#include <string.h>

enum { STAGING_BYTES = 8u << 20, MIN_SCRATCH = 256 };

static const VkDeviceSize DEFAULT_BLOCK = 64u << 20;

/* The memory type for `bits` with all of `need`, preferring `want` too. */
static uint32_t find_type(const VkPhysicalDeviceMemoryProperties *mp, uint32_t bits, VkMemoryPropertyFlags need,
                          VkMemoryPropertyFlags want)
{
    uint32_t fallback = UINT32_MAX;
    for (uint32_t i = 0; i < mp->memoryTypeCount; i++) {
        if (!(bits & (1u << i))) continue;
        const VkMemoryPropertyFlags f = mp->memoryTypes[i].propertyFlags;
        if ((f & need) != need) continue;
        if ((f & want) == want) return i;
        if (fallback == UINT32_MAX) fallback = i;
    }
    return fallback;
}

static pikv_status create_buffer(pikv_device *dev, VkDeviceSize size, VkBuffer *out, VkMemoryRequirements *req)
{
    pikv_vk_device *vd = pikv_vk_dev(dev);
    VkBufferCreateInfo bci = {.sType = VK_STRUCTURE_TYPE_BUFFER_CREATE_INFO,
                              .size = size,
                              .usage = VK_BUFFER_USAGE_STORAGE_BUFFER_BIT | VK_BUFFER_USAGE_TRANSFER_SRC_BIT |
                                       VK_BUFFER_USAGE_TRANSFER_DST_BIT,
                              .sharingMode = VK_SHARING_MODE_EXCLUSIVE};
    VkResult r = vd->fn.vkCreateBuffer(vd->device, &bci, NULL, out);
    if (r != VK_SUCCESS) {
        *out = VK_NULL_HANDLE;
        char what[80]; /* the size says why (past maxBufferSize, or memory) */
        snprintf(what, sizeof what, "vkCreateBuffer (%llu bytes)", (unsigned long long)size);
        return pikv_vk_fail(dev, r, what);
    }
    vd->fn.vkGetBufferMemoryRequirements(vd->device, *out, req);
    return PIKV_OK;
}

/* ---- blocks ------------------------------------------------------------------ */

static void block_free(pikv_context *ctx, pikv_vk_device *vd, pikv_vk_block *b)
{
    if (b->memory) vd->fn.vkFreeMemory(vd->device, b->memory, NULL);
    pikv_host_free(ctx, b->free);
    pikv_host_free(ctx, b);
}

/* Takes size bytes aligned to align from the block's free list (first fit):
   1 taken, 0 no room, -1 no host memory to split a free range. */
static int block_take(pikv_context *ctx, pikv_vk_block *b, VkDeviceSize size, VkDeviceSize align,
                      VkDeviceSize *offset)
{
    for (int32_t i = 0; i < b->n_free; i++) {
        pikv_vk_range *f = &b->free[i];
        const VkDeviceSize start = (f->offset + align - 1) / align * align;
        if (start + size > f->offset + f->size) continue;
        const VkDeviceSize head = start - f->offset, tail = f->offset + f->size - (start + size);
        if (head && tail) { /* split in two: one more range */
            if (pikv_host_reserve(ctx, (void **)&b->free, sizeof *b->free, &b->free_cap, b->n_free + 1) != PIKV_OK)
                return -1;
            f = &b->free[i];
            memmove(&b->free[i + 2], &b->free[i + 1], (size_t)(b->n_free - i - 1) * sizeof *b->free);
            b->free[i + 1] = (pikv_vk_range){start + size, tail};
            f->size = head;
            b->n_free++;
        } else if (head) {
            f->size = head;
        } else if (tail) {
            f->offset = start + size;
            f->size = tail;
        } else {
            memmove(&b->free[i], &b->free[i + 1], (size_t)(b->n_free - i - 1) * sizeof *b->free);
            b->n_free--;
        }
        *offset = start;
        return 1;
    }
    return 0;
}

/* Returns a range to the block's free list, merging with its neighbours (a
   range that merges with neither needs one more entry). */
static pikv_status block_give(pikv_context *ctx, pikv_vk_block *b, VkDeviceSize offset, VkDeviceSize size)
{
    int32_t i = 0;
    while (i < b->n_free && b->free[i].offset < offset) i++;
    const bool merge_prev = i > 0 && b->free[i - 1].offset + b->free[i - 1].size == offset;
    const bool merge_next = i < b->n_free && offset + size == b->free[i].offset;
    if (merge_prev && merge_next) {
        b->free[i - 1].size += size + b->free[i].size;
        memmove(&b->free[i], &b->free[i + 1], (size_t)(b->n_free - i - 1) * sizeof *b->free);
        b->n_free--;
    } else if (merge_prev) {
        b->free[i - 1].size += size;
    } else if (merge_next) {
        b->free[i].offset = offset;
        b->free[i].size += size;
    } else {
        PIKV_FORWARD_IF_ERROR(pikv_host_reserve(ctx, (void **)&b->free, sizeof *b->free, &b->free_cap, b->n_free + 1));
        memmove(&b->free[i + 1], &b->free[i], (size_t)(b->n_free - i) * sizeof *b->free);
        b->free[i] = (pikv_vk_range){offset, size};
        b->n_free++;
    }
    return PIKV_OK;
}

static pikv_status block_new(pikv_device *dev, VkDeviceSize size, uint32_t type, pikv_vk_block **out)
{
    pikv_context *ctx = dev->ctx;
    pikv_vk_device *vd = pikv_vk_dev(dev);
    pikv_vk_block *b = pikv_host_calloc(ctx, 1, sizeof *b);
    if (!b || pikv_host_reserve(ctx, (void **)&b->free, sizeof *b->free, &b->free_cap, 4) != PIKV_OK) {
        if (b) pikv_host_free(ctx, b->free);
        pikv_host_free(ctx, b);
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "device %s: host allocation failed", dev->info.name);
    }
    VkMemoryAllocateInfo mai = {.sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO, .allocationSize = size,
                                .memoryTypeIndex = type};
    VkResult r = vd->fn.vkAllocateMemory(vd->device, &mai, NULL, &b->memory);
    if (r != VK_SUCCESS) {
        b->memory = VK_NULL_HANDLE;
        block_free(ctx, vd, b);
        char what[96]; /* the size says why (past maxMemoryAllocationSize, or memory) */
        snprintf(what, sizeof what, "vkAllocateMemory (a device-local block of %llu bytes)", (unsigned long long)size);
        return pikv_vk_fail(dev, r, what);
    }
    b->size = size;
    b->type = type;
    b->free[0] = (pikv_vk_range){0, size};
    b->n_free = 1;
    b->next = vd->blocks;
    vd->blocks = b;
    *out = b;
    return PIKV_OK;
}

static void block_unlink(pikv_vk_device *vd, pikv_vk_block *b)
{
    for (pikv_vk_block **p = &vd->blocks; *p; p = &(*p)->next)
        if (*p == b) {
            *p = b->next;
            return;
        }
}

/* ---- page buffers -------------------------------------------------------------- */

pikv_status pikv_vk_buffer_alloc(pikv_device *dev, uint64_t size, pikv_buffer **out)
{
    *out = NULL;
    pikv_context *ctx = dev->ctx;
    pikv_vk_device *vd = pikv_vk_dev(dev);
    PIKV_RETURN_ERROR_IF(size == 0, ctx, PIKV_ERR_INVALID_ARGUMENT, "device %s: buffer of 0 bytes", dev->info.name);
    /* A buffer may be larger than one binding (maxStorageBufferRange): read_reduce
       binds it window by window. The ops that bind a page chunk whole refuse a
       chunk past the range (vulkan-ops.c, upload_layouts). */
    PIKV_FORWARD_IF_ERROR(pikv_device_reserve_bytes(dev, size));
    pikv_buffer *buf = pikv_host_calloc(ctx, 1, sizeof *buf);
    pikv_vk_buffer *vb = pikv_host_calloc(ctx, 1, sizeof *vb);
    pikv_status st = PIKV_OK;
    VkMemoryRequirements req;
    if (!buf || !vb) {
        st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "device %s: host allocation failed", dev->info.name);
        goto fail;
    }
    st = create_buffer(dev, size, &vb->buffer, &req);
    if (st != PIKV_OK) goto fail;
    const uint32_t type = find_type(&vd->mem_props, req.memoryTypeBits, 0, VK_MEMORY_PROPERTY_DEVICE_LOCAL_BIT);
    if (type == UINT32_MAX) {
        st = PIKV_FAIL(ctx, PIKV_ERR_BACKEND, "device %s: no memory type for storage buffers", dev->info.name);
        goto fail;
    }
    pikv_vk_block *blk = NULL;
    VkDeviceSize offset = 0;
    for (pikv_vk_block *b = vd->blocks; b && !blk; b = b->next) {
        if (b->type != type) continue;
        const int took = block_take(ctx, b, req.size, req.alignment, &offset);
        if (took < 0) {
            st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "device %s: host allocation failed", dev->info.name);
            goto fail;
        }
        if (took) blk = b;
    }
    if (!blk) {
        VkDeviceSize bsize = DEFAULT_BLOCK;
        if (req.size > bsize) bsize = req.size; /* a big buffer gets a block of its own */
        st = block_new(dev, bsize, type, &blk);
        if (st == PIKV_ERR_OUT_OF_MEMORY && bsize > req.size) st = block_new(dev, req.size, type, &blk);
        if (st != PIKV_OK) goto fail;
        if (block_take(ctx, blk, req.size, req.alignment, &offset) != 1) { /* a fresh block always fits */
            block_unlink(vd, blk);
            block_free(ctx, vd, blk);
            st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "device %s: host allocation failed", dev->info.name);
            goto fail;
        }
    }
    VkResult r = vd->fn.vkBindBufferMemory(vd->device, vb->buffer, blk->memory, offset);
    if (r != VK_SUCCESS) {
        block_give(ctx, blk, offset, req.size);
        if (blk->n_free == 1 && blk->free[0].size == blk->size) { /* empty again: give the memory back */
            block_unlink(vd, blk);
            block_free(ctx, vd, blk);
        }
        st = pikv_vk_fail(dev, r, "vkBindBufferMemory");
        goto fail;
    }
    vb->block = blk;
    vb->offset = offset;
    vb->size = req.size;
    buf->device = dev;
    buf->size = size;
    buf->handle = vb;
    *out = buf;
    return PIKV_OK;
fail:
    if (vb && vb->buffer) vd->fn.vkDestroyBuffer(vd->device, vb->buffer, NULL);
    pikv_host_free(ctx, vb);
    pikv_host_free(ctx, buf);
    pikv_device_release_bytes(dev, size);
    return st;
}

void pikv_vk_buffer_free(pikv_device *dev, pikv_buffer *buf)
{
    if (!buf) return;
    pikv_context *ctx = dev->ctx;
    pikv_vk_device *vd = pikv_vk_dev(dev);
    pikv_vk_buffer *vb = buf->handle;
    vd->fn.vkDestroyBuffer(vd->device, vb->buffer, NULL);
    pikv_vk_block *b = vb->block;
    if (block_give(ctx, b, vb->offset, vb->size) != PIKV_OK) {
        /* no host memory to record the range: the block keeps it until freed */
        pikv_log(ctx, PIKV_LOG_WARN, "device %s: %llu bytes of a memory block lost until it is freed",
                 dev->info.name, (unsigned long long)vb->size);
    }
    if (b->n_free == 1 && b->free[0].size == b->size) { /* empty: give the memory back */
        block_unlink(vd, b);
        block_free(ctx, vd, b);
    }
    pikv_device_release_bytes(dev, buf->size);
    pikv_host_free(ctx, vb);
    pikv_host_free(ctx, buf);
}

/* ---- host-visible buffers -------------------------------------------------------- */

static void host_buffer_free(pikv_vk_device *vd, pikv_vk_host_buffer *h)
{
    if (h->buffer) vd->fn.vkDestroyBuffer(vd->device, h->buffer, NULL);
    if (h->memory) vd->fn.vkFreeMemory(vd->device, h->memory, NULL); /* unmaps */
    memset(h, 0, sizeof *h);
}

static pikv_status host_buffer_create(pikv_device *dev, VkDeviceSize size, pikv_vk_host_buffer *h)
{
    pikv_vk_device *vd = pikv_vk_dev(dev);
    memset(h, 0, sizeof *h);
    VkMemoryRequirements req;
    PIKV_FORWARD_IF_ERROR(create_buffer(dev, size, &h->buffer, &req));
    /* host-cached where offered: outputs are read back by the host */
    const uint32_t type = find_type(&vd->mem_props, req.memoryTypeBits,
                                    VK_MEMORY_PROPERTY_HOST_VISIBLE_BIT | VK_MEMORY_PROPERTY_HOST_COHERENT_BIT,
                                    VK_MEMORY_PROPERTY_HOST_CACHED_BIT);
    if (type == UINT32_MAX) {
        host_buffer_free(vd, h);
        return PIKV_FAIL(dev->ctx, PIKV_ERR_BACKEND, "device %s: no host-visible coherent memory type",
                         dev->info.name);
    }
    VkMemoryAllocateInfo mai = {.sType = VK_STRUCTURE_TYPE_MEMORY_ALLOCATE_INFO, .allocationSize = req.size,
                                .memoryTypeIndex = type};
    VkResult r = vd->fn.vkAllocateMemory(vd->device, &mai, NULL, &h->memory);
    if (r == VK_SUCCESS) r = vd->fn.vkBindBufferMemory(vd->device, h->buffer, h->memory, 0);
    if (r == VK_SUCCESS) r = vd->fn.vkMapMemory(vd->device, h->memory, 0, VK_WHOLE_SIZE, 0, &h->map);
    if (r != VK_SUCCESS) {
        host_buffer_free(vd, h);
        return pikv_vk_fail(dev, r, "host-visible buffer (vkAllocateMemory/vkBindBufferMemory/vkMapMemory)");
    }
    h->size = size;
    return PIKV_OK;
}

pikv_status pikv_vk_scratch(pikv_device *dev, int i, size_t size, pikv_vk_host_buffer **out)
{
    pikv_vk_device *vd = pikv_vk_dev(dev);
    pikv_vk_host_buffer *h = &vd->scratch[i];
    if (size < MIN_SCRATCH) size = MIN_SCRATCH;
    if (h->buffer && h->size >= size) {
        *out = h;
        return PIKV_OK;
    }
    PIKV_RETURN_ERROR_IF(size > vd->limits.maxStorageBufferRange, dev->ctx, PIKV_ERR_UNSUPPORTED,
                         "device %s: an op needs %zu bytes of inputs or outputs in one buffer, past the device's "
                         "storage buffer range (%u bytes); use smaller batches", dev->info.name, size,
                         (unsigned)vd->limits.maxStorageBufferRange);
    VkDeviceSize want = MIN_SCRATCH;
    while (want < size) want *= 2;
    if (want > vd->limits.maxStorageBufferRange) want = size;
    host_buffer_free(vd, h);
    PIKV_FORWARD_IF_ERROR(host_buffer_create(dev, want, h));
    *out = h;
    return PIKV_OK;
}

pikv_status pikv_vk_upload(pikv_device *dev, int i, const void *src, size_t size, pikv_vk_host_buffer **out)
{
    PIKV_FORWARD_IF_ERROR(pikv_vk_scratch(dev, i, size, out));
    if (size) memcpy((*out)->map, src, size);
    return PIKV_OK;
}

/* ---- transfers through the staging buffer --------------------------------------- */

static pikv_status staging(pikv_device *dev, pikv_vk_host_buffer **out)
{
    pikv_vk_device *vd = pikv_vk_dev(dev);
    if (!vd->staging.buffer) PIKV_FORWARD_IF_ERROR(host_buffer_create(dev, STAGING_BYTES, &vd->staging));
    *out = &vd->staging;
    return PIKV_OK;
}

/* Moves size bytes between host memory and a device buffer through the staging
   buffer, in pieces of its size: to the device when `to_device`. */
static pikv_status transfer(pikv_device *dev, const pikv_buffer *buf, uint64_t offset, void *host, uint64_t size,
                            bool to_device)
{
    PIKV_RETURN_ERROR_IF(offset > buf->size || size > buf->size - offset, dev->ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "device %s: %s of %llu bytes at %llu is past a buffer of %llu", dev->info.name,
                         to_device ? "write" : "read", (unsigned long long)size, (unsigned long long)offset,
                         (unsigned long long)buf->size);
    pikv_vk_device *vd = pikv_vk_dev(dev);
    pikv_vk_host_buffer *stg;
    PIKV_FORWARD_IF_ERROR(staging(dev, &stg));
    const VkBuffer dev_buffer = ((const pikv_vk_buffer *)buf->handle)->buffer;
    for (uint64_t done = 0; done < size;) {
        const uint64_t n = size - done < STAGING_BYTES ? size - done : STAGING_BYTES;
        if (to_device) memcpy(stg->map, (const char *)host + done, (size_t)n);
        pikv_status st = pikv_vk_begin(dev);
        if (st == PIKV_OK) {
            VkBufferCopy region = {.srcOffset = to_device ? 0 : offset + done,
                                   .dstOffset = to_device ? offset + done : 0,
                                   .size = n};
            vd->fn.vkCmdCopyBuffer(vd->cmd, to_device ? stg->buffer : dev_buffer, to_device ? dev_buffer : stg->buffer,
                                   1, &region);
            st = pikv_vk_submit(dev);
        }
        if (st != PIKV_OK) {
            pikv_vk_abandon(dev);
            return st;
        }
        if (!to_device) memcpy((char *)host + done, stg->map, (size_t)n);
        done += n;
    }
    return PIKV_OK;
}

pikv_status pikv_vk_buffer_write(pikv_device *dev, pikv_buffer *buf, uint64_t offset, const void *src, uint64_t size)
{
    return transfer(dev, buf, offset, (void *)(uintptr_t)src, size, true); /* src is only read */
}

pikv_status pikv_vk_buffer_read(pikv_device *dev, const pikv_buffer *buf, uint64_t offset, void *dst, uint64_t size)
{
    return transfer(dev, buf, offset, dst, size, false);
}

void pikv_vk_memory_free(pikv_context *ctx, pikv_vk_device *vd)
{
    host_buffer_free(vd, &vd->staging);
    for (int i = 0; i < PIKV_VK_SCRATCH; i++) host_buffer_free(vd, &vd->scratch[i]);
    /* page buffers are freed by their caches before the device goes; a block
       still here belongs to a buffer nobody freed */
    while (vd->blocks) {
        pikv_vk_block *b = vd->blocks;
        vd->blocks = b->next;
        block_free(ctx, vd, b);
    }
}
