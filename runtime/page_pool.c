/* Per-device page pools. Device memory is taken in chunks of many pages
   (never one allocation per page: GPU allocators and descriptor limits make
   per-page buffers slow or impossible); free page slots are a stack. */
#include "cache-impl.h"

#include <string.h>

pikv_status pikv_pool_reserve(pikv_context *ctx, pikv_page_pool *pool,
                              const pikv_page_layout *layout, int64_t n, int32_t *added)
{
    *added = 0;
    if (pool->n_free >= n) return PIKV_OK;
    const int64_t per = pool->pages_per_chunk;
    const int64_t chunks_needed = (n - pool->n_free + per - 1) / per;
    const int64_t total_slots = ((int64_t)pool->n_chunks + chunks_needed) * per;
    /* bit 31 of a slot marks the quantized pool in op arguments (PIKV_SLOT_QUANT) */
    PIKV_RETURN_ERROR_IF(total_slots > (int64_t)0x7fffffff, ctx, PIKV_ERR_CAPACITY,
                         "device %s: %lld page slots exceed the slot index range",
                         pool->dev->info.name, (long long)total_slots);
    /* Index arrays first: growing them changes nothing observable. */
    pikv_status st = pikv_host_reserve(ctx, (void **)&pool->chunks, sizeof *pool->chunks,
                                       &pool->chunks_cap, pool->n_chunks + chunks_needed);
    pool->view.chunks = pool->chunks; /* the array may have moved: kernels read through the view */
    PIKV_FORWARD_IF_ERROR(st);
    PIKV_FORWARD_IF_ERROR(pikv_host_reserve(ctx, (void **)&pool->free_slots, sizeof *pool->free_slots,
                                            &pool->free_cap, total_slots));
    const uint64_t chunk_bytes = (uint64_t)per * layout->page_bytes;
    for (int64_t c = 0; c < chunks_needed; c++) {
        pikv_buffer *buf = NULL;
        st = pool->dev->iface->buffer_alloc(pool->dev, chunk_bytes, &buf);
        if (st != PIKV_OK) {
            pikv_pool_unreserve(pool, *added);
            *added = 0;
            return st;
        }
        int32_t chunk = pool->n_chunks++;
        pool->chunks[chunk] = buf;
        pool->bytes_allocated += chunk_bytes;
        /* push in reverse so slots are taken in increasing order */
        for (int64_t i = per - 1; i >= 0; i--)
            pool->free_slots[pool->n_free++] = (uint32_t)((int64_t)chunk * per + i);
        (*added)++;
    }
    pool->view.n_chunks = pool->n_chunks;
    return PIKV_OK;
}

void pikv_pool_unreserve(pikv_page_pool *pool, int32_t added)
{
    /* The newest chunks' slots are on top of the free stack: nothing was taken since. */
    for (int32_t c = 0; c < added; c++) {
        pikv_buffer *buf = pool->chunks[--pool->n_chunks];
        pool->n_free -= pool->pages_per_chunk;
        pool->bytes_allocated -= buf->size;
        pool->dev->iface->buffer_free(pool->dev, buf);
    }
    pool->view.n_chunks = pool->n_chunks;
}

void pikv_pool_free(pikv_page_pool *pool)
{
    pikv_context *ctx = pool->dev->ctx;
    for (int32_t c = 0; c < pool->n_chunks; c++) pool->dev->iface->buffer_free(pool->dev, pool->chunks[c]);
    pikv_host_free(ctx, pool->chunks);
    pikv_host_free(ctx, pool->free_slots);
    pool->chunks = NULL;
    pool->free_slots = NULL;
    pool->n_chunks = 0;
    pool->bytes_allocated = 0;
}

/* Slots of a pool's map when compaction would free chunks, else 0. */
static int64_t compact_map_slots(const pikv_cache *c, int32_t d, int32_t quant)
{
    const pikv_page_pool *pool = quant ? &c->qdevs[d] : &c->devs[d];
    const int64_t per = pool->pages_per_chunk;
    const int64_t held = pool->pages_used + pikv_tier_staging_slots(c, d, quant, NULL);
    const int64_t keep = (held + per - 1) / per; /* chunks the pages fit in */
    return keep >= pool->n_chunks ? 0 : (int64_t)pool->n_chunks * per;
}

/* Compacts one pool with `map`, zeroed, of at least compact_map_slots() bytes, left
   zeroed (NULL: a map of its own, allocated here). */
static pikv_status compact_pool_map(pikv_cache *c, int32_t d, int32_t quant, unsigned char *map)
{
    pikv_context *ctx = c->ctx;
    pikv_page_pool *pool = quant ? &c->qdevs[d] : &c->devs[d];
    const uint32_t flag = quant ? PIKV_SLOT_QUANT : 0;
    const int64_t per = pool->pages_per_chunk;
    /* tiers: staging slots stay where they are, used */
    const int64_t held = pool->pages_used + pikv_tier_staging_slots(c, d, quant, NULL);
    const int64_t keep = (held + per - 1) / per; /* chunks the pages fit in */
    if (keep >= pool->n_chunks) return PIKV_OK;
    const int64_t n_slots = (int64_t)pool->n_chunks * per, bound = keep * per;
    unsigned char *used = map ? map : pikv_host_calloc(ctx, (size_t)n_slots, 1);
    PIKV_RETURN_ERROR_IF(!used, ctx, PIKV_ERR_OUT_OF_MEMORY,
                         "compact: map of %lld slots: allocation failed", (long long)n_slots);
    for (int64_t id = 0; id < c->pages_high; id++)
        if (c->pages[id].refs > 0 && c->pages[id].dev == d && c->pages[id].quant == quant &&
            c->pages[id].tier == PIKV_TIER_DEVICE) /* a demoted page has no slot */
            used[c->pages[id].slot] = 1;
    pikv_tier_staging_slots(c, d, quant, used);
    /* Move every page above the bound into a free slot below it. */
    int64_t low = 0;
    pikv_status st = PIKV_OK;
    for (int64_t id = 0; id < c->pages_high && st == PIKV_OK; id++) {
        pikv_page_meta *m = &c->pages[id];
        if (m->refs == 0 || m->dev != d || m->quant != quant || m->tier != PIKV_TIER_DEVICE ||
            (int64_t)m->slot < bound)
            continue;
        while (low < bound && used[low]) low++;
        if (low >= bound) break; /* cannot happen: bound holds the used slots */
        pikv_page_copy_args args = {&c->devs[d].view, m->slot | flag, (uint32_t)low | flag, m->n_tokens};
        st = pool->dev->iface->page_copy(pool->dev, &args); /* the open pool's view knows both */
        if (st != PIKV_OK) break;
        used[m->slot] = 0;
        used[low] = 1;
        m->slot = (uint32_t)low;
    }
    /* Free trailing chunks with no page left, rebuild the free stack. */
    while (pool->n_chunks > 0) {
        const int64_t first = (int64_t)(pool->n_chunks - 1) * per;
        bool empty = true;
        for (int64_t i = first; i < first + per && empty; i++) empty = !used[i];
        if (!empty) break;
        pikv_buffer *buf = pool->chunks[--pool->n_chunks];
        pool->bytes_allocated -= buf->size;
        pool->dev->iface->buffer_free(pool->dev, buf);
    }
    pool->view.n_chunks = pool->n_chunks;
    pool->n_free = 0;
    for (int64_t i = (int64_t)pool->n_chunks * per - 1; i >= 0; i--)
        if (!used[i]) pool->free_slots[pool->n_free++] = (uint32_t)i;
    if (map) memset(map, 0, (size_t)n_slots);
    else pikv_host_free(ctx, used);
    return st;
}

static pikv_status compact_pool(pikv_cache *c, int32_t d, int32_t quant)
{
    return compact_pool_map(c, d, quant, NULL);
}

pikv_status pikv_cache_compact_device(pikv_cache *c, int32_t d)
{
    PIKV_FORWARD_IF_ERROR(compact_pool(c, d, 0));
    return c->qdevs ? compact_pool(c, d, 1) : PIKV_OK;
}

pikv_status pikv_cache_compact_ranks(pikv_cache *c)
{
    int64_t most = 0;
    for (int32_t d = 0; d < c->n_devs; d++)
        for (int32_t quant = 0; quant <= (c->qdevs != NULL); quant++) {
            const int64_t n = compact_map_slots(c, d, quant);
            most = n > most ? n : most;
        }
    unsigned char *map = most ? pikv_host_calloc(c->ctx, (size_t)most, 1) : NULL;
    pikv_status st = most && !map ? PIKV_FAIL(c->ctx, PIKV_ERR_OUT_OF_MEMORY,
                                              "pikv_cache_trim: map of %lld slots: allocation failed",
                                              (long long)most)
                                  : PIKV_OK;
    st = pikv_dist_sync_status(c, "pikv_cache_trim", st); /* every rank compacts, or none */
    for (int32_t d = 0; d < c->n_devs && st == PIKV_OK && map; d++) {
        st = compact_pool_map(c, d, 0, map);
        if (st == PIKV_OK && c->qdevs) st = compact_pool_map(c, d, 1, map);
    }
    pikv_host_free(c->ctx, map);
    return pikv_dist_sync_status(c, "pikv_cache_trim", st);
}
