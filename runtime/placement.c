/* Placement: which shard a token's KV goes to, which device holds a shard,
   and re-balancing of shards over devices (BALANCED). */
#include "cache-impl.h"

#include <string.h>

int32_t pikv_placement_shard(const pikv_cache *c, int64_t t, int32_t e)
{
    const pikv_cache_params *p = &c->params;
    if (p->n_experts == 1) /* dense: blocks of page_size positions dealt over the shards */
        return (int32_t)((t / p->page_size) % c->n_shards);
    if (p->placement == PIKV_PLACEMENT_HASH) {
        /* s(t,e) = (t mod N_tok) xor (e mod N_exp), folded onto the shards */
        int64_t s = (t % p->hash_tokens) ^ (int64_t)(e % p->n_experts);
        return (int32_t)(s % c->n_shards);
    }
    return e; /* EXPERT, BALANCED: shard = top-1 expert */
}

void pikv_placement_init(pikv_cache *c)
{
    for (int32_t l = 0; l < c->params.n_layers; l++)
        for (int32_t s = 0; s < c->n_shards; s++) {
            pikv_shard *sh = pikv_cache_shard(c, l, s);
            memset(sh, 0, sizeof *sh);
            if (c->params.placement == PIKV_PLACEMENT_BALANCED) {
                sh->dev = -1; /* placed when its first page arrives */
            } else {
                sh->dev = s % c->n_devs;
                c->devs[sh->dev].shards++;
            }
        }
}

int32_t pikv_placement_pick_device(const pikv_cache *c, const int64_t *pending)
{
    int32_t best = 0;
    int64_t best_load = INT64_MAX;
    for (int32_t d = 0; d < c->n_devs; d++) {
        /* demoted pages count: they are read (fetched) on their device */
        int64_t load = c->devs[d].pages_used + (c->qdevs ? c->qdevs[d].pages_used : 0) + c->devs[d].demoted + pending[d];
        if (load < best_load) {
            best_load = load;
            best = d;
        }
    }
    return best;
}

/* ---- re-balancing ------------------------------------------------------------ */

typedef struct shard_load {
    int32_t layer, shard;
    int64_t pages;
} shard_load;

static void sort_by_pages_desc(shard_load *a, int64_t n)
{
    /* shell sort: largest first, ties by (layer, shard) so packing is deterministic */
    for (int64_t gap = n / 2; gap > 0; gap /= 2)
        for (int64_t i = gap; i < n; i++) {
            shard_load x = a[i];
            int64_t j = i;
            for (; j >= gap && (a[j - gap].pages < x.pages ||
                                (a[j - gap].pages == x.pages &&
                                 (a[j - gap].layer > x.layer ||
                                  (a[j - gap].layer == x.layer && a[j - gap].shard > x.shard))));
                 j -= gap)
                a[j] = a[j - gap];
            a[j] = x;
        }
}

/* Assign shards (sorted largest first) to devices. sticky: a shard stays on
   its device while that keeps the device at or under cap; otherwise (and for
   every shard when !sticky) it goes to the least-loaded device. Returns the
   resulting maximum device load. */
static int64_t pack_shards(const pikv_cache *c, const shard_load *loads, int64_t n, bool sticky,
                           int64_t cap, int32_t *assign, int64_t *dev_load)
{
    for (int32_t d = 0; d < c->n_devs; d++) dev_load[d] = 0;
    int64_t makespan = 0;
    for (int64_t i = 0; i < n; i++) {
        const int32_t cur = c->shards[(size_t)loads[i].layer * (size_t)c->n_shards + (size_t)loads[i].shard].dev;
        int32_t best = 0;
        if (sticky && cur >= 0 && dev_load[cur] + loads[i].pages <= cap) {
            best = cur;
        } else {
            for (int32_t d = 1; d < c->n_devs; d++)
                if (dev_load[d] < dev_load[best]) best = d;
        }
        dev_load[best] += loads[i].pages;
        if (dev_load[best] > makespan) makespan = dev_load[best];
        assign[i] = best;
    }
    return makespan;
}

pikv_status pikv_cache_rebalance(pikv_cache *c, int64_t *moved_pages)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    pikv_context *ctx = c->ctx;
    if (moved_pages) *moved_pages = 0;
    PIKV_RETURN_ERROR_IF(c->comm, ctx, PIKV_ERR_UNSUPPORTED,
                         "pikv_cache_rebalance: moving pages between ranks is not supported (a distributed cache "
                         "places BALANCED shards when their first page arrives)");
    PIKV_RETURN_ERROR_IF(c->params.placement != PIKV_PLACEMENT_BALANCED, ctx,
                         PIKV_ERR_INVALID_ARGUMENT,
                         "rebalance needs BALANCED placement (the cache uses placement %d)",
                         (int)c->params.placement);
    const int64_t n_all = (int64_t)c->params.n_layers * c->n_shards;
    shard_load *loads = pikv_host_calloc(ctx, (size_t)n_all, sizeof *loads);
    int32_t *target = pikv_host_calloc(ctx, (size_t)n_all, sizeof *target);
    int32_t *assign = pikv_host_calloc(ctx, (size_t)n_all * 2, sizeof *assign);
    int64_t *dev_load = pikv_host_calloc(ctx, (size_t)c->n_devs, sizeof *dev_load);
    int64_t *incoming = pikv_host_calloc(ctx, (size_t)c->n_devs * 2, sizeof *incoming); /* [kind][dev] */
    int32_t *added = pikv_host_calloc(ctx, (size_t)c->n_devs * 2, sizeof *added);
    int32_t *active = pikv_host_calloc(ctx, (size_t)(c->n_seqs ? c->n_seqs : 1), sizeof *active);
    const uint64_t staging_bytes = c->qdevs && c->qlayout.page_bytes > c->layout.page_bytes ? c->qlayout.page_bytes
                                                                                         : c->layout.page_bytes;
    void *staging = pikv_host_alloc(ctx, (size_t)staging_bytes, 64);
    pikv_status st = PIKV_OK;
    int64_t moved = 0;
    if (!loads || !target || !assign || !dev_load || !incoming || !added || !active || !staging) {
        st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "rebalance: allocation of work arrays failed");
        goto done;
    }
    int32_t n_active = 0;
    for (int32_t q = 0; q < c->params.max_sequences && n_active < c->n_seqs; q++)
        if (c->seqs[q].active) active[n_active++] = q;
    int64_t n = 0, current = 0;
    for (int32_t l = 0; l < c->params.n_layers; l++)
        for (int32_t s = 0; s < c->n_shards; s++) {
            const pikv_shard *sh = pikv_cache_shard(c, l, s);
            target[(size_t)l * (size_t)c->n_shards + (size_t)s] = sh->dev;
            if (sh->pages > 0) loads[n++] = (shard_load){l, s, sh->pages};
        }
    for (int32_t d = 0; d < c->n_devs; d++) {
        const int64_t pages = c->devs[d].pages_used + (c->qdevs ? c->qdevs[d].pages_used : 0) + c->devs[d].demoted;
        if (pages > current) current = pages;
    }
    sort_by_pages_desc(loads, n);
    /* Greedy largest-first packing, then the same bounded by its makespan but
       keeping shards where they are when they fit: the second moves far fewer
       pages. Take the better; move nothing unless the maximum load drops. */
    int32_t *lpt = assign, *sticky = assign + n_all;
    const int64_t m_lpt = pack_shards(c, loads, n, false, 0, lpt, dev_load);
    const int64_t m_sticky = pack_shards(c, loads, n, true, m_lpt, sticky, dev_load);
    const int32_t *best = m_sticky <= m_lpt ? sticky : lpt;
    const int64_t m_best = m_sticky <= m_lpt ? m_sticky : m_lpt;
    if (m_best >= current) goto done;
    for (int64_t i = 0; i < n; i++) {
        size_t k = (size_t)loads[i].layer * (size_t)c->n_shards + (size_t)loads[i].shard;
        if (target[k] != best[i]) { /* count the shard's pages by pool kind (shared ones may count twice) */
            for (int32_t a = 0; a < n_active; a++) {
                const pikv_ring *ring = &c->seqs[active[a]].layers[loads[i].layer].rings[loads[i].shard];
                for (int64_t j = 0; j < ring->count; j++) {
                    const pikv_page_meta *m = &c->pages[pikv_ring_at(ring, j)];
                    if (m->tier != PIKV_TIER_DEVICE) continue; /* demoted: only its device changes */
                    incoming[(size_t)m->quant * (size_t)c->n_devs + (size_t)best[i]]++;
                }
            }
        }
        target[k] = best[i];
    }
    /* Tiers: room under the destinations' device budgets (demotions are content-
       preserving moves that stand if the rebalance fails). Then every destination
       slot is reserved before anything moves. */
    for (int32_t d = 0; c->tier && d < c->n_devs && st == PIKV_OK; d++)
        st = pikv_tier_reserve_bytes(c, d, (uint64_t)incoming[d] * c->layout.page_bytes +
                                               (c->qdevs ? (uint64_t)incoming[c->n_devs + d] * c->qlayout.page_bytes : 0),
                                     "pikv_cache_rebalance");
    for (int32_t d = 0; d < c->n_devs && st == PIKV_OK; d++) {
        st = pikv_pool_reserve(ctx, &c->devs[d], &c->layout, incoming[d], &added[d]);
        if (st == PIKV_OK && c->qdevs)
            st = pikv_pool_reserve(ctx, &c->qdevs[d], &c->qlayout, incoming[c->n_devs + d], &added[c->n_devs + d]);
    }
    if (st != PIKV_OK) {
        for (int32_t d = 0; d < c->n_devs; d++) {
            pikv_pool_unreserve(&c->devs[d], added[d]);
            if (c->qdevs) pikv_pool_unreserve(&c->qdevs[d], added[c->n_devs + d]);
        }
        goto done;
    }
    for (int32_t l = 0; l < c->params.n_layers && st == PIKV_OK; l++)
        for (int32_t s = 0; s < c->n_shards && st == PIKV_OK; s++) {
            pikv_shard *sh = pikv_cache_shard(c, l, s);
            const int32_t to = target[(size_t)l * (size_t)c->n_shards + (size_t)s];
            if (sh->pages == 0 || to == sh->dev) continue;
            for (int32_t a = 0; a < n_active && st == PIKV_OK; a++) {
                const pikv_ring *ring = &c->seqs[active[a]].layers[l].rings[s];
                for (int64_t i = 0; i < ring->count && st == PIKV_OK; i++) {
                    pikv_page_meta *m = &c->pages[pikv_ring_at(ring, i)];
                    if (m->dev == to) continue; /* shared page, already moved */
                    if (m->tier != PIKV_TIER_DEVICE) { /* demoted: it will be fetched to its new device */
                        c->devs[m->dev].demoted--;
                        c->devs[to].demoted++;
                        m->dev = to;
                        moved++;
                        continue;
                    }
                    /* the page's own device: after a failed move a shard can span two */
                    pikv_page_pool *src = pikv_page_pool_of(c, m);
                    pikv_page_pool *dst = m->quant ? &c->qdevs[to] : &c->devs[to];
                    const pikv_page_layout *L = pikv_layout_of(c, m);
                    uint64_t so, dof;
                    pikv_buffer *sb = pikv_pool_chunk(src, m->slot, &so, L);
                    uint32_t slot = pikv_pool_take(dst);
                    pikv_buffer *db = pikv_pool_chunk(dst, slot, &dof, L);
                    st = src->dev->iface->buffer_read(src->dev, sb, so, staging, L->page_bytes);
                    if (st == PIKV_OK)
                        st = dst->dev->iface->buffer_write(dst->dev, db, dof, staging, L->page_bytes);
                    if (st != PIKV_OK) { /* the page stays where it was */
                        pikv_pool_give(dst, slot);
                        break;
                    }
                    pikv_pool_give(src, m->slot);
                    m->dev = to;
                    m->slot = slot;
                    src->pages_used--;
                    dst->pages_used++;
                    src->tokens -= m->n_tokens;
                    dst->tokens += m->n_tokens;
                    moved++;
                }
            }
            if (st == PIKV_OK) {
                c->devs[sh->dev].shards--;
                c->devs[to].shards++;
                sh->dev = to;
            }
        }
    /* Give back the memory the moves emptied (best effort: the moves stand). */
    for (int32_t d = 0; d < c->n_devs && st == PIKV_OK; d++) {
        pikv_status tst = pikv_cache_compact_device(c, d);
        if (tst != PIKV_OK)
            pikv_log(ctx, PIKV_LOG_WARN, "rebalance: device %s not compacted: %s", c->devs[d].dev->info.name,
                     ctx->last_error);
    }
done:
    if (moved_pages) *moved_pages = moved;
    pikv_host_free(ctx, loads);
    pikv_host_free(ctx, target);
    pikv_host_free(ctx, assign);
    pikv_host_free(ctx, dev_load);
    pikv_host_free(ctx, incoming);
    pikv_host_free(ctx, added);
    pikv_host_free(ctx, active);
    pikv_host_free(ctx, staging);
    return st;
}
