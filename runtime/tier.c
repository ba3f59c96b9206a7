/* Memory tiers: where a page's bytes are (docs/tiers.md). A page lives in a slot
 * of its device's pool (the device tier); with tiers on it may be demoted to the
 * host tier or the disk tier and fetched back. */
#include "cache-impl.h"

pikv_status pikv_page_read_bytes(pikv_cache *c, uint32_t id, void *dst)
{
    const pikv_page_meta *m = &c->pages[id];
    const pikv_page_layout *L = pikv_layout_of(c, m);
    pikv_page_pool *pool = pikv_page_pool_of(c, m);
    uint64_t off = 0;
    pikv_buffer *buf = pikv_pool_chunk(pool, m->slot, &off, L);
    return pool->dev->iface->buffer_read(pool->dev, buf, off, dst, L->page_bytes);
}

pikv_status pikv_tier_reserve(pikv_cache *c, int32_t dev, int32_t quant, int64_t n)
{
    (void)c, (void)dev, (void)quant, (void)n;
    return PIKV_OK; /* tiers off: a device holds what its memory limit allows */
}
