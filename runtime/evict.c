/* Eviction at page granularity when a sequence's layer holds more tokens than
 * its budget. Candidates are the sequence's full pages that hold no sink token
 * and no token of the recent window; the policy gives each a key and the
 * lowest key goes first (ties: the oldest page). Shared pages lose only this
 * sequence's reference. Evicting a page counts a miss for its expert, which
 * cache-aware routing penalizes.
 *
 * With memory tiers on, nothing is dropped: the budget bounds the sequence's
 * RESIDENT tokens of the layer, and a victim is demoted to the host tier (tier.c)
 * instead, still read by attend and still counted by seq_length. It is no eviction
 * (evicted_pages stays) and no miss.
 *
 *   LRU        key = the layer's attend clock when the page was last read
 *   LFU        key = how many attend calls read it
 *   STREAMING  key = its first token's index (StreamingLLM: sinks + recent stay)
 *   H2O        key = attention mass accumulated by the attention kernel
 *   UTILITY    key = a_att phi_att + a_rec phi_rec + a_freq phi_freq, each feature
 *              scaled to [0, 1] over the candidates (mass / max mass, recency of
 *              last use between the oldest and newest, use count / max count)
 */
#include "cache-impl.h"

#include <math.h>

bool pikv_page_protected(const pikv_cache *c, uint32_t id, const pikv_seq_layer *sl,
                         const pikv_select_params *sel)
{
    const pikv_page_meta *m = &c->pages[id];
    const int32_t *idx = c->indices + (size_t)id * (size_t)c->params.page_size;
    if (m->n_tokens == 0) return false;
    return idx[0] < sel->sink_tokens || idx[m->n_tokens - 1] >= sl->next_index - sel->recent_tokens;
}

typedef struct feature_range {
    float max_mass;
    int32_t max_count;
    int64_t min_use, max_use;
} feature_range;

static double page_key(const pikv_cache *c, const pikv_page_meta *m, const feature_range *f)
{
    const pikv_evict_params *e = &c->params.evict;
    switch (e->policy) {
    case PIKV_EVICT_LRU: return (double)m->last_use;
    case PIKV_EVICT_LFU: return (double)m->use_count;
    case PIKV_EVICT_H2O: return (double)m->attn_mass;
    case PIKV_EVICT_UTILITY: {
        const double att = f->max_mass > 0.0f ? m->attn_mass / f->max_mass : 0.0;
        const double rec = f->max_use > f->min_use
                               ? (double)(m->last_use - f->min_use) / (double)(f->max_use - f->min_use)
                               : 1.0;
        const double freq = f->max_count > 0 ? (double)m->use_count / f->max_count : 0.0;
        return e->alpha_attention * att + e->alpha_recency * rec + e->alpha_frequency * freq;
    }
    case PIKV_EVICT_STREAMING:
    case PIKV_EVICT_NONE: break;
    }
    return 0.0; /* STREAMING: every key equal, the oldest page goes first */
}

static bool evictable(const pikv_cache *c, uint32_t id, const pikv_seq_layer *sl)
{
    const pikv_page_meta *m = &c->pages[id];
    /* tiers: only resident pages of the layout the tiers hold (full pages always are) */
    if (c->tier && (m->tier != PIKV_TIER_DEVICE || m->quant != (c->qdevs != NULL))) return false;
    return m->n_tokens == c->params.page_size && !pikv_page_protected(c, id, sl, &c->params.select);
}

/* Tokens of the sequence's layer the budget bounds: all, or with tiers the resident ones. */
static int64_t budgeted_tokens(const pikv_cache *c, const pikv_seq_layer *sl)
{
    if (!c->tier) return sl->n_tokens;
    int64_t n = 0;
    for (int32_t s = 0; s < c->n_shards; s++)
        for (int64_t i = 0; i < sl->rings[s].count; i++) {
            const pikv_page_meta *m = &c->pages[pikv_ring_at(&sl->rings[s], i)];
            if (m->tier == PIKV_TIER_DEVICE) n += m->n_tokens;
        }
    return n;
}

static void ring_remove_at(pikv_ring *r, int64_t i)
{
    for (int64_t j = i; j + 1 < r->count; j++) r->ids[(r->head + j) % r->cap] = r->ids[(r->head + j + 1) % r->cap];
    r->count--;
}

void pikv_evict_to_budget(pikv_cache *c, int32_t layer, int32_t seq)
{
    const int64_t budget = c->layer_budget[layer];
    pikv_seq_layer *sl = &c->seqs[seq].layers[layer];
    const int32_t ps = c->params.page_size;
    while (budget >= 0 && budgeted_tokens(c, sl) > budget) {
        feature_range f = {0.0f, 0, INT64_MAX, INT64_MIN};
        for (int32_t s = 0; s < c->n_shards; s++) {
            const pikv_ring *ring = &sl->rings[s];
            for (int64_t i = 0; i < ring->count; i++) {
                const uint32_t id = pikv_ring_at(ring, i);
                if (!evictable(c, id, sl)) continue;
                const pikv_page_meta *m = &c->pages[id];
                f.max_mass = m->attn_mass > f.max_mass ? m->attn_mass : f.max_mass;
                f.max_count = m->use_count > f.max_count ? m->use_count : f.max_count;
                f.min_use = m->last_use < f.min_use ? m->last_use : f.min_use;
                f.max_use = m->last_use > f.max_use ? m->last_use : f.max_use;
            }
        }
        int32_t best_shard = -1;
        int64_t best_pos = -1, best_first = INT64_MAX;
        double best_key = INFINITY;
        for (int32_t s = 0; s < c->n_shards; s++) {
            const pikv_ring *ring = &sl->rings[s];
            for (int64_t i = 0; i < ring->count; i++) {
                const uint32_t id = pikv_ring_at(ring, i);
                if (!evictable(c, id, sl)) continue;
                const double key = page_key(c, &c->pages[id], &f);
                const int64_t first = c->indices[(size_t)id * (size_t)ps];
                if (key < best_key || (key == best_key && first < best_first)) {
                    best_key = key;
                    best_first = first;
                    best_shard = s;
                    best_pos = i;
                }
            }
        }
        if (best_shard < 0) return; /* only protected or partial pages are left */
        pikv_ring *ring = &sl->rings[best_shard];
        const uint32_t id = pikv_ring_at(ring, best_pos);
        if (c->tier) {
            /* the append reserved the host room (pikv_tier_prepare_evict): only a device
               error can stop this, and the page then stays resident, over the budget */
            if (pikv_tier_demote(c, id, "pikv_cache_append (eviction)") != PIKV_OK) {
                pikv_log(c->ctx, PIKV_LOG_WARN, "eviction to the host tier stopped: %s", c->ctx->last_error);
                return;
            }
            continue;
        }
        const pikv_page_meta *m = &c->pages[id];
        ring_remove_at(ring, best_pos);
        sl->n_tokens -= m->n_tokens;
        c->layer_evicted[layer]++;
        c->evicted_pages++;
        c->evicted_tokens += m->n_tokens;
        pikv_expert_miss(c, layer, m->expert_mask, m->shard);
        pikv_page_unref(c, id);
    }
}
