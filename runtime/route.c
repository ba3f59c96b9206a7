/* Cache-aware routing (PiKV routing): top-k experts by router logit minus
   lambda * log(1 + miss_e), where miss_e is a decayed count of the expert's
   recent cache misses in the layer (its pages evicted, its shard absent when a
   query wanted it). Also the per-expert load statistics. */
#include "cache-impl.h"

#include <math.h>
#include <string.h>

void pikv_expert_miss(pikv_cache *c, int32_t layer, uint64_t expert_mask, int32_t shard)
{
    const int32_t ne = c->params.n_experts;
    if (ne == 1) return;
    double *miss = c->expert_misses + (size_t)layer * (size_t)ne;
    if (c->params.placement != PIKV_PLACEMENT_HASH) { /* shard = expert */
        miss[shard] += 1.0;
        return;
    }
    if (ne > 64) return; /* the page's expert mask is ambiguous past 64 experts */
    for (int32_t e = 0; e < ne; e++)
        if (expert_mask & (1ull << e)) miss[e] += 1.0;
}

enum { MAX_TOPK = 64 };

pikv_status pikv_route(pikv_cache *c, int32_t layer, int32_t n, const float *logits, int32_t *experts,
                       float *weights)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    pikv_context *ctx = c->ctx;
    const pikv_cache_params *p = &c->params;
    const int32_t ne = p->n_experts, k = p->experts_per_token;
    PIKV_RETURN_ERROR_IF(layer < 0 || layer >= p->n_layers, ctx, PIKV_ERR_OUT_OF_RANGE,
                         "pikv_route: layer %d is outside 0..%d", layer, p->n_layers - 1);
    PIKV_RETURN_ERROR_IF(n < 0, ctx, PIKV_ERR_INVALID_ARGUMENT, "pikv_route: n_tokens = %d is negative", n);
    if (n == 0) return PIKV_OK;
    PIKV_RETURN_ERROR_IF(!logits || !experts, ctx, PIKV_ERR_INVALID_ARGUMENT, "pikv_route: %s is NULL",
                         !logits ? "logits" : "experts");
    PIKV_RETURN_ERROR_IF(k > MAX_TOPK, ctx, PIKV_ERR_UNSUPPORTED,
                         "pikv_route: experts_per_token = %d exceeds %d", k, MAX_TOPK);
    for (int64_t i = 0; i < (int64_t)n * ne; i++)
        PIKV_RETURN_ERROR_IF(!isfinite(logits[i]), ctx, PIKV_ERR_INVALID_ARGUMENT,
                             "pikv_route: logits[%lld] = %g is not finite", (long long)i, (double)logits[i]);

    double *miss = c->expert_misses + (size_t)layer * (size_t)ne;
    const double decay = p->route.miss_decay, lambda = p->route.lambda;
    for (int32_t e = 0; e < ne; e++) miss[e] *= decay;
    for (int32_t t = 0; t < n; t++) {
        const float *x = logits + (size_t)t * (size_t)ne;
        int32_t *chosen = experts + (size_t)t * (size_t)k;
        double best_score[MAX_TOPK];
        int32_t m = 0;
        /* insertion into a sorted top-k: score descending, ties to the lower id */
        for (int32_t e = 0; e < ne; e++) {
            const double score = lambda > 0.0 ? (double)x[e] - lambda * log1p(miss[e]) : (double)x[e];
            if (m == k && !(score > best_score[k - 1])) continue;
            int32_t at = m < k ? m++ : k - 1;
            while (at > 0 && score > best_score[at - 1]) {
                best_score[at] = best_score[at - 1];
                chosen[at] = chosen[at - 1];
                at--;
            }
            best_score[at] = score;
            chosen[at] = e;
        }
        if (weights) { /* softmax over the chosen experts' own logits */
            float *w = weights + (size_t)t * (size_t)k;
            float mx = -INFINITY, sum = 0.0f;
            for (int32_t j = 0; j < k; j++) mx = x[chosen[j]] > mx ? x[chosen[j]] : mx;
            for (int32_t j = 0; j < k; j++) sum += (w[j] = expf(x[chosen[j]] - mx));
            for (int32_t j = 0; j < k; j++) w[j] /= sum;
        }
        int64_t *routed = c->expert_routed + (size_t)layer * (size_t)ne;
        for (int32_t j = 0; j < k; j++) routed[chosen[j]]++;
        c->expert_top1[(size_t)layer * (size_t)ne + (size_t)chosen[0]]++;
    }
    return PIKV_OK;
}

pikv_status pikv_cache_get_expert_stats(const pikv_cache *c, int32_t layer, int32_t expert,
                                        pikv_expert_stats *out)
{
    if (!c || !out) return PIKV_ERR_INVALID_ARGUMENT;
    const pikv_cache_params *p = &c->params;
    PIKV_RETURN_ERROR_IF(layer < 0 || layer >= p->n_layers, c->ctx, PIKV_ERR_OUT_OF_RANGE,
                         "pikv_cache_get_expert_stats: layer %d is outside 0..%d", layer, p->n_layers - 1);
    PIKV_RETURN_ERROR_IF(expert < 0 || expert >= p->n_experts, c->ctx, PIKV_ERR_OUT_OF_RANGE,
                         "pikv_cache_get_expert_stats: expert %d is outside 0..%d", expert, p->n_experts - 1);
    memset(out, 0, sizeof *out);
    const size_t at = (size_t)layer * (size_t)p->n_experts + (size_t)expert;
    out->routed_tokens = c->expert_routed[at];
    out->routed_top1 = c->expert_top1[at];
    out->misses = c->expert_misses[at];
    /* stored tokens: rows of the layer's live pages whose top-1 is the expert */
    for (int64_t id = 0; id < c->pages_high; id++) {
        const pikv_page_meta *m = &c->pages[id];
        if (m->refs == 0 || m->layer != layer) continue;
        const int32_t *rows = c->row_expert + (size_t)id * (size_t)p->page_size;
        for (int32_t r = 0; r < m->n_tokens; r++) out->stored_tokens += rows[r] == expert;
    }
    return PIKV_OK;
}
