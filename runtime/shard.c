/* Shards keep, per sequence, a ring of page ids: appends go to the back in
   O(1) (the back page is the shard's open page), and eviction policies can
   drop from the front in O(1). Growing a ring unrolls it into a larger array. */
#include "cache-impl.h"

#include <string.h>

pikv_status pikv_ring_reserve(pikv_context *ctx, pikv_ring *ring, int64_t need)
{
    if (need <= ring->cap) return PIKV_OK;
    int64_t cap = ring->cap > 0 ? ring->cap : 4;
    while (cap < need) cap *= 2;
    uint32_t *ids = pikv_host_alloc(ctx, (size_t)cap * sizeof *ids, 16);
    if (!ids)
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "page ring of %lld entries: allocation failed",
                         (long long)cap);
    for (int64_t i = 0; i < ring->count; i++) ids[i] = pikv_ring_at(ring, i);
    pikv_host_free(ctx, ring->ids);
    ring->ids = ids;
    ring->cap = cap;
    ring->head = 0;
    return PIKV_OK;
}

void pikv_ring_free(pikv_context *ctx, pikv_ring *ring)
{
    pikv_host_free(ctx, ring->ids);
    memset(ring, 0, sizeof *ring);
}
