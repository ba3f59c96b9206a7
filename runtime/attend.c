/* Attend: a host-side plan (select.c) gives each (query, KV head) its page
 * list on each device (FlashInfer's indptr/indices layout, with per-page
 * lengths); each device computes a partial output and log-sum-exp over its
 * pages, and the partials are merged exactly. The kernels also return each
 * page's log attention mass, which is turned into the page's share of the
 * final softmax and accumulated for the eviction policies. */
#include "select.h"

#include <math.h>
#include <string.h>

static pikv_status validate(pikv_cache *c, int32_t layer, const pikv_attend_batch *b,
                            const pikv_select_params *sel)
{
    pikv_context *ctx = c->ctx;
    PIKV_RETURN_ERROR_IF(!b, ctx, PIKV_ERR_INVALID_ARGUMENT, "pikv_cache_attend: batch is NULL");
    PIKV_RETURN_ERROR_IF(layer < 0 || layer >= c->params.n_layers, ctx, PIKV_ERR_OUT_OF_RANGE,
                         "pikv_cache_attend: layer %d is outside 0..%d", layer, c->params.n_layers - 1);
    PIKV_RETURN_ERROR_IF(b->n_queries < 0, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "pikv_cache_attend: n_queries = %d is negative", b->n_queries);
    if (b->select) PIKV_FORWARD_IF_ERROR(pikv_select_validate(ctx, c, b->select, "pikv_cache_attend"));
    if (b->n_queries == 0) return PIKV_OK;
    PIKV_RETURN_ERROR_IF(!b->seq_ids || !b->q || !b->out, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "pikv_cache_attend: batch %s is NULL",
                         !b->seq_ids ? "seq_ids" : !b->q ? "q" : "out");
    PIKV_RETURN_ERROR_IF((sel->mode & PIKV_SELECT_EXPERTS) && c->params.n_experts > 1 && !b->experts, ctx,
                         PIKV_ERR_INVALID_ARGUMENT,
                         "pikv_cache_attend: EXPERTS selection needs the queries' experts (batch experts is NULL)");
    for (int32_t i = 0; i < b->n_queries; i++) {
        const int32_t s = b->seq_ids[i];
        PIKV_RETURN_ERROR_IF(s < 0 || s >= c->params.max_sequences, ctx, PIKV_ERR_OUT_OF_RANGE,
                             "pikv_cache_attend: seq_ids[%d] = %d is outside 0..%d", i, s,
                             c->params.max_sequences - 1);
        PIKV_RETURN_ERROR_IF(!c->seqs[s].active, ctx, PIKV_ERR_NOT_FOUND,
                             "pikv_cache_attend: seq_ids[%d] = %d has not been added", i, s);
    }
    const int64_t n_q = (int64_t)b->n_queries * c->params.n_q_heads;
    PIKV_RETURN_ERROR_IF(n_q > INT32_MAX || (int64_t)b->n_queries * c->params.n_kv_heads >= INT32_MAX, ctx,
                         PIKV_ERR_INVALID_ARGUMENT,
                         "pikv_cache_attend: n_queries = %d times n_q_heads = %d exceeds %d rows",
                         b->n_queries, c->params.n_q_heads, INT32_MAX);
    for (int64_t i = 0; i < n_q * c->params.head_dim; i++)
        PIKV_RETURN_ERROR_IF(!isfinite(b->q[i]), ctx, PIKV_ERR_INVALID_ARGUMENT,
                             "pikv_cache_attend: q[%lld] = %g (query %lld) is not finite", (long long)i,
                             (double)b->q[i], (long long)(i / ((int64_t)c->params.n_q_heads * c->params.head_dim)));
    if (b->experts)
        for (int64_t i = 0; i < (int64_t)b->n_queries * c->params.experts_per_token; i++)
            PIKV_RETURN_ERROR_IF(b->experts[i] < 0 || b->experts[i] >= c->params.n_experts, ctx,
                                 PIKV_ERR_OUT_OF_RANGE,
                                 "pikv_cache_attend: experts[%lld] = %d is outside 0..%d", (long long)i,
                                 b->experts[i], c->params.n_experts - 1);
    return PIKV_OK;
}

/* Run the plan: partials per device, merged into out/lse. page_lse (entries x
   group, in plan order) is filled when non-NULL. */
static pikv_status run_plan(pikv_cache *c, const pikv_attend_batch *b, const pikv_read_plan *plan,
                            float *out, float *lse, float *page_lse)
{
    pikv_context *ctx = c->ctx;
    const int32_t nq = b->n_queries, hq = c->params.n_q_heads, hd = c->params.head_dim;
    const int32_t G = hq / c->params.n_kv_heads;
    const size_t out_floats = (size_t)nq * (size_t)hq * (size_t)hd, lse_floats = (size_t)nq * (size_t)hq;
    int32_t active[PIKV_MAX_DEVICES], n_active = 0;
    for (int32_t d = 0; d < c->n_devs; d++)
        if (plan->dev_begin[d + 1] > plan->dev_begin[d]) active[n_active++] = d;
    if (n_active == 0) { /* nothing to read */
        memset(out, 0, out_floats * sizeof(float));
        for (size_t i = 0; i < lse_floats; i++) lse[i] = -INFINITY;
        return PIKV_OK;
    }
    /* One active device writes straight into the output; several write partials. */
    float *parts = NULL;
    if (n_active > 1) {
        parts = pikv_host_alloc(ctx, (size_t)n_active * (out_floats + lse_floats) * sizeof(float), 64);
        PIKV_RETURN_ERROR_IF(!parts, ctx, PIKV_ERR_OUT_OF_MEMORY,
                             "pikv_cache_attend: partials of %d devices: allocation failed", n_active);
    }
    pikv_status st = PIKV_OK;
    for (int32_t a = 0; a < n_active && st == PIKV_OK; a++) {
        const int32_t d = active[a];
        pikv_page_pool *pool = &c->devs[d];
        const int64_t off = plan->dev_begin[d];
        pikv_attention_args args = {
            .pool = &pool->view,
            .n_queries = nq,
            .n_q_heads = hq,
            .q = b->q,
            .indptr = plan->indptr + (size_t)d * ((size_t)plan->n_lists + 1),
            .slots = plan->slots + off,
            .page_len = plan->lens + off,
            .scale = c->scale,
            .out = n_active > 1 ? parts + (size_t)a * out_floats : out,
            .lse = n_active > 1 ? parts + (size_t)n_active * out_floats + (size_t)a * lse_floats : lse,
            .page_lse = page_lse ? page_lse + (size_t)off * (size_t)G : NULL,
        };
        st = pool->dev->iface->attention(pool->dev, &args);
    }
    if (st == PIKV_OK && n_active > 1) {
        pikv_merge_args margs = {n_active, nq * hq, hd, parts, parts + (size_t)n_active * out_floats, out, lse};
        st = ctx->host_device->iface->merge(ctx->host_device, &margs);
    }
    pikv_host_free(ctx, parts);
    return st;
}

/* Each read page's use statistics move; with page_lse (policies that rank by
   attention), its share of the final softmax, summed over the query heads of its
   KV head, is added to the page's attention mass. */
static void accumulate_mass(pikv_cache *c, int32_t layer, const pikv_read_plan *plan, const float *lse,
                            const float *page_lse)
{
    const int32_t kvh = c->params.n_kv_heads, G = c->params.n_q_heads / kvh;
    const int64_t clock = ++c->layer_clock[layer];
    for (int32_t d = 0; d < c->n_devs; d++) {
        const int32_t *indptr = plan->indptr + (size_t)d * ((size_t)plan->n_lists + 1);
        const int64_t off = plan->dev_begin[d];
        for (int64_t list = 0; list < plan->n_lists; list++) {
            const float *l = lse + (size_t)list * (size_t)G; /* heads (i, g*G .. g*G+G-1) */
            for (int32_t e = indptr[list]; e < indptr[list + 1]; e++) {
                pikv_page_meta *m = &c->pages[plan->ids[off + e]];
                if (page_lse) {
                    float mass = 0.0f;
                    for (int32_t h = 0; h < G; h++) {
                        const float pl = page_lse[(size_t)(off + e) * (size_t)G + (size_t)h];
                        if (pl != -INFINITY && l[h] != -INFINITY) mass += expf(pl - l[h]);
                    }
                    m->attn_mass += mass;
                }
                if (m->last_use != clock) { /* once per call, however many heads read it */
                    m->last_use = clock;
                    m->use_count++;
                }
            }
        }
    }
}

/* Share of the queries' experts whose shard holds pages of their sequence; a
   missing one counts a miss for cache-aware routing. -1 without experts. */
static double expert_hit_rate(pikv_cache *c, int32_t layer, const pikv_attend_batch *b,
                              const pikv_select_params *sel)
{
    const pikv_cache_params *p = &c->params;
    if (!b->experts || p->n_experts == 1) return -1.0;
    const int32_t k = sel->experts_top_k > 0 ? sel->experts_top_k : p->experts_per_token;
    int64_t hits = 0, total = 0;
    for (int32_t i = 0; i < b->n_queries; i++) {
        const pikv_seq_layer *sl = &c->seqs[b->seq_ids[i]].layers[layer];
        for (int32_t j = 0; j < k; j++) {
            const int32_t e = b->experts[(size_t)i * (size_t)p->experts_per_token + (size_t)j];
            bool hit = false;
            if (p->placement != PIKV_PLACEMENT_HASH) {
                hit = sl->rings[e].count > 0;
            } else {
                for (int32_t s = 0; s < c->n_shards && !hit; s++)
                    for (int64_t r = 0; r < sl->rings[s].count && !hit; r++)
                        hit = (c->pages[pikv_ring_at(&sl->rings[s], r)].expert_mask >> (e % 64)) & 1u;
            }
            total++;
            hits += hit;
            if (!hit) pikv_expert_miss(c, layer, 1ull << (e % 64), e);
        }
    }
    return total ? (double)hits / (double)total : -1.0;
}

pikv_status pikv_cache_attend(pikv_cache *c, int32_t layer, const pikv_attend_batch *b)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    const pikv_select_params *sel = b && b->select ? b->select : &c->params.select;
    PIKV_FORWARD_IF_ERROR(validate(c, layer, b, sel));
    if (b->n_queries == 0) return PIKV_OK;
    pikv_context *ctx = c->ctx;
    const int32_t nq = b->n_queries, hq = c->params.n_q_heads, hd = c->params.head_dim;
    const int32_t kvh = c->params.n_kv_heads, G = hq / kvh;
    const size_t out_floats = (size_t)nq * (size_t)hq * (size_t)hd, lse_floats = (size_t)nq * (size_t)hq;
    const bool measure = sel->measure != 0 && sel->mode != PIKV_SELECT_ALL;
    /* only H2O and utility eviction rank pages by attention mass */
    const bool want_mass = c->params.evict.policy == PIKV_EVICT_H2O || c->params.evict.policy == PIKV_EVICT_UTILITY;

    pikv_read_plan plan;
    pikv_status st = pikv_plan_reads(c, layer, b, sel, &plan);
    if (st != PIKV_OK) return st;
    const int64_t entries = plan.dev_begin[c->n_devs];
    float *lse = b->lse;
    const size_t mass_floats = want_mass ? (size_t)entries * (size_t)G : 0;
    float *scratch = pikv_host_alloc(ctx, (mass_floats + lse_floats +
                                          (measure ? out_floats + lse_floats : 0) + 1) * sizeof(float), 64);
    if (!scratch) {
        pikv_read_plan_free(ctx, &plan);
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "pikv_cache_attend: scratch for %lld page reads: "
                         "allocation failed", (long long)entries);
    }
    float *page_lse = want_mass ? scratch : NULL;
    float *lse_own = scratch + mass_floats;
    float *exact_out = lse_own + lse_floats, *exact_lse = exact_out + out_floats;
    if (!lse) lse = lse_own;
    st = run_plan(c, b, &plan, b->out, lse, page_lse);

    /* Measurement: the same batch read exactly, for recall and output error. */
    double recall = 1.0, error = 0.0;
    if (st == PIKV_OK && measure) {
        pikv_select_params all = *sel;
        all.mode = PIKV_SELECT_ALL;
        pikv_read_plan exact;
        st = pikv_plan_reads(c, layer, b, &all, &exact);
        if (st == PIKV_OK) {
            st = run_plan(c, b, &exact, exact_out, exact_lse, NULL);
            pikv_read_plan_free(ctx, &exact);
        }
        if (st == PIKV_OK) {
            double sum = 0.0;
            int64_t n = 0;
            for (size_t i = 0; i < lse_floats; i++) {
                if (exact_lse[i] == -INFINITY) continue;
                sum += lse[i] == -INFINITY ? 0.0 : exp((double)lse[i] - (double)exact_lse[i]);
                n++;
            }
            recall = n ? sum / (double)n : 1.0;
            /* normalized per query, the worst query reported */
            const size_t per_query = (size_t)hq * (size_t)hd;
            for (int32_t i = 0; i < nq; i++) {
                double max_ref = 0.0, max_err = 0.0;
                for (size_t x = (size_t)i * per_query; x < (size_t)(i + 1) * per_query; x++) {
                    max_ref = fmax(max_ref, fabs((double)exact_out[x]));
                    max_err = fmax(max_err, fabs((double)b->out[x] - (double)exact_out[x]));
                }
                const double e = max_ref > 0.0 ? max_err / max_ref : max_err;
                error = e > error ? e : error;
            }
        }
    }
    if (st == PIKV_OK) {
        accumulate_mass(c, layer, &plan, lse, page_lse);
        /* bytes of one token row of one KV head, K and V; quantized rows also read
           their share of the page's scales and zero points */
        const double row_bytes = 2.0 * (double)c->layout.row_bytes;
        const double qrow_bytes = c->qdevs ? 2.0 * (double)c->qlayout.row_bytes +
                                                 (double)c->qlayout.scale_bytes / ((double)kvh * c->qlayout.page_size)
                                           : 0.0;
        const uint64_t bounds_bytes = 2 * (uint64_t)kvh * (uint64_t)hd * sizeof(float); /* QUEST scoring */
        int64_t tokens = 0;
        c->last_bytes_read = 0;
        for (int32_t d = 0; d < c->n_devs; d++) {
            int64_t dev_tokens = 0;
            double bytes = 0.0;
            for (int64_t i = plan.dev_begin[d]; i < plan.dev_begin[d + 1]; i++) {
                dev_tokens += plan.lens[i];
                bytes += plan.lens[i] * ((plan.slots[i] & PIKV_SLOT_QUANT) ? qrow_bytes : row_bytes);
            }
            c->devs[d].last_bytes_read = (uint64_t)(bytes + 0.5) + (uint64_t)plan.scored[d] * bounds_bytes;
            c->devs[d].bytes_read += c->devs[d].last_bytes_read;
            c->last_bytes_read += c->devs[d].last_bytes_read;
            tokens += dev_tokens;
        }
        /* per KV head reads, expressed in pages and tokens of all heads */
        c->last_pages_read = entries / kvh;
        c->last_tokens_read = tokens / kvh;
        c->bytes_read += c->last_bytes_read;
        c->layer_last_bytes[layer] = c->last_bytes_read;
        c->layer_last_pages[layer] = c->last_pages_read;
        c->last_hit_rate = expert_hit_rate(c, layer, b, sel);
        c->last_recall = sel->mode == PIKV_SELECT_ALL ? 1.0 : measure ? recall : -1.0;
        c->last_output_error = sel->mode == PIKV_SELECT_ALL ? 0.0 : measure ? error : -1.0;
        c->attends++;
    }
    pikv_host_free(ctx, scratch);
    pikv_read_plan_free(ctx, &plan);
    return st;
}
