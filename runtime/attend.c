/* Attend: a host-side plan turns each query's page table into one CSR page
 * list per device (FlashInfer's indptr/indices layout, with per-page lengths);
 * each device then computes a partial output and log-sum-exp over its pages,
 * and the partials are merged exactly. */
#include "cache-impl.h"

#include <math.h>
#include <string.h>

typedef struct attend_plan {
    int32_t *indptr;   /* [n_devs][n_queries + 1] */
    uint32_t *slots;   /* [total pages], grouped by device then query */
    int32_t *lens;
    int64_t dev_begin[PIKV_MAX_DEVICES + 1]; /* offsets of each device's pages */
} attend_plan;

static pikv_status validate(pikv_cache *c, int32_t layer, const pikv_attend_batch *b)
{
    pikv_context *ctx = c->ctx;
    PIKV_RETURN_ERROR_IF(!b, ctx, PIKV_ERR_INVALID_ARGUMENT, "pikv_cache_attend: batch is NULL");
    PIKV_RETURN_ERROR_IF(layer < 0 || layer >= c->params.n_layers, ctx, PIKV_ERR_OUT_OF_RANGE,
                         "pikv_cache_attend: layer %d is outside 0..%d", layer, c->params.n_layers - 1);
    PIKV_RETURN_ERROR_IF(b->n_queries < 0, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "pikv_cache_attend: n_queries = %d is negative", b->n_queries);
    if (b->n_queries == 0) return PIKV_OK;
    PIKV_RETURN_ERROR_IF(!b->seq_ids || !b->q || !b->out, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "pikv_cache_attend: batch %s is NULL",
                         !b->seq_ids ? "seq_ids" : !b->q ? "q" : "out");
    for (int32_t i = 0; i < b->n_queries; i++) {
        const int32_t s = b->seq_ids[i];
        PIKV_RETURN_ERROR_IF(s < 0 || s >= c->params.max_sequences, ctx, PIKV_ERR_OUT_OF_RANGE,
                             "pikv_cache_attend: seq_ids[%d] = %d is outside 0..%d", i, s,
                             c->params.max_sequences - 1);
        PIKV_RETURN_ERROR_IF(!c->seqs[s].active, ctx, PIKV_ERR_NOT_FOUND,
                             "pikv_cache_attend: seq_ids[%d] = %d has not been added", i, s);
    }
    const int64_t n_q = (int64_t)b->n_queries * c->params.n_q_heads;
    PIKV_RETURN_ERROR_IF(n_q > INT32_MAX, ctx, PIKV_ERR_INVALID_ARGUMENT,
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

/* Build the per-device page lists of every query (exact mode: all pages). */
static pikv_status plan_pages(pikv_cache *c, int32_t layer, const pikv_attend_batch *b,
                              attend_plan *plan)
{
    pikv_context *ctx = c->ctx;
    const int32_t nq = b->n_queries, nd = c->n_devs;
    int64_t per_dev[PIKV_MAX_DEVICES] = {0};
    for (int32_t i = 0; i < nq; i++) {
        const pikv_seq_layer *sl = &c->seqs[b->seq_ids[i]].layers[layer];
        for (int32_t s = 0; s < c->n_shards; s++) {
            const pikv_ring *ring = &sl->rings[s];
            for (int64_t j = 0; j < ring->count; j++) per_dev[c->pages[pikv_ring_at(ring, j)].dev]++;
        }
    }
    plan->dev_begin[0] = 0;
    for (int32_t d = 0; d < nd; d++) plan->dev_begin[d + 1] = plan->dev_begin[d] + per_dev[d];
    const int64_t total = plan->dev_begin[nd];
    PIKV_RETURN_ERROR_IF(total > INT32_MAX, ctx, PIKV_ERR_CAPACITY,
                         "pikv_cache_attend: %lld pages in one call exceed the page-list range",
                         (long long)total);
    plan->indptr = pikv_host_calloc(ctx, (size_t)nd * ((size_t)nq + 1), sizeof(int32_t));
    plan->slots = pikv_host_calloc(ctx, (size_t)(total ? total : 1), sizeof(uint32_t));
    plan->lens = pikv_host_calloc(ctx, (size_t)(total ? total : 1), sizeof(int32_t));
    if (!plan->indptr || !plan->slots || !plan->lens)
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY,
                         "pikv_cache_attend: page lists of %lld pages: allocation failed", (long long)total);
    int64_t fill[PIKV_MAX_DEVICES];
    for (int32_t d = 0; d < nd; d++) fill[d] = plan->dev_begin[d];
    for (int32_t i = 0; i < nq; i++) {
        for (int32_t d = 0; d < nd; d++)
            plan->indptr[(size_t)d * ((size_t)nq + 1) + (size_t)i] = (int32_t)(fill[d] - plan->dev_begin[d]);
        const pikv_seq_layer *sl = &c->seqs[b->seq_ids[i]].layers[layer];
        for (int32_t s = 0; s < c->n_shards; s++) {
            const pikv_ring *ring = &sl->rings[s];
            for (int64_t j = 0; j < ring->count; j++) {
                const pikv_page_meta *m = &c->pages[pikv_ring_at(ring, j)];
                plan->slots[fill[m->dev]] = m->slot;
                plan->lens[fill[m->dev]++] = m->n_tokens;
            }
        }
    }
    for (int32_t d = 0; d < nd; d++)
        plan->indptr[(size_t)d * ((size_t)nq + 1) + (size_t)nq] = (int32_t)(fill[d] - plan->dev_begin[d]);
    return PIKV_OK;
}

pikv_status pikv_cache_attend(pikv_cache *c, int32_t layer, const pikv_attend_batch *b)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    PIKV_FORWARD_IF_ERROR(validate(c, layer, b));
    if (b->n_queries == 0) return PIKV_OK;
    pikv_context *ctx = c->ctx;
    const int32_t nq = b->n_queries, hq = c->params.n_q_heads, hd = c->params.head_dim;
    const size_t out_floats = (size_t)nq * (size_t)hq * (size_t)hd, lse_floats = (size_t)nq * (size_t)hq;

    attend_plan plan = {0};
    pikv_status st = plan_pages(c, layer, b, &plan);
    int32_t active[PIKV_MAX_DEVICES], n_active = 0;
    for (int32_t d = 0; d < c->n_devs; d++)
        if (plan.dev_begin[d + 1] > plan.dev_begin[d]) active[n_active++] = d;

    /* One active device writes straight into the caller's output; several
       write partials that are merged. */
    float *parts = NULL, *lse_tmp = NULL;
    if (st == PIKV_OK && n_active > 1) {
        parts = pikv_host_alloc(ctx, (size_t)n_active * (out_floats + lse_floats) * sizeof(float), 64);
        if (!parts)
            st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY,
                           "pikv_cache_attend: partials of %d devices: allocation failed", n_active);
    } else if (st == PIKV_OK && !b->lse) {
        lse_tmp = pikv_host_alloc(ctx, lse_floats * sizeof(float), 64);
        if (!lse_tmp)
            st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "pikv_cache_attend: allocation failed");
    }
    for (int32_t a = 0; a < n_active && st == PIKV_OK; a++) {
        const int32_t d = active[a];
        pikv_page_pool *pool = &c->devs[d];
        const int64_t off = plan.dev_begin[d];
        pikv_attention_args args = {
            .pool = &pool->view,
            .n_queries = nq,
            .n_q_heads = hq,
            .q = b->q,
            .indptr = plan.indptr + (size_t)d * ((size_t)nq + 1),
            .slots = plan.slots + off,
            .page_len = plan.lens + off,
            .scale = c->scale,
            .out = n_active > 1 ? parts + (size_t)a * out_floats : b->out,
            .lse = n_active > 1 ? parts + (size_t)n_active * out_floats + (size_t)a * lse_floats
                                : (b->lse ? b->lse : lse_tmp),
        };
        st = pool->dev->iface->attention(pool->dev, &args);
    }
    if (st == PIKV_OK && n_active > 1) {
        pikv_merge_args margs = {n_active, nq * hq, hd, parts, parts + (size_t)n_active * out_floats,
                                 b->out, b->lse};
        st = ctx->host_device->iface->merge(ctx->host_device, &margs);
    }
    if (st == PIKV_OK && n_active == 0) { /* every sequence empty */
        memset(b->out, 0, out_floats * sizeof(float));
        if (b->lse)
            for (size_t i = 0; i < lse_floats; i++) b->lse[i] = -INFINITY;
    }
    if (st == PIKV_OK) {
        const uint64_t row_bytes = 2 * (uint64_t)c->params.n_kv_heads * (uint64_t)hd * (uint64_t)c->layout.elem_size;
        c->last_pages_read = plan.dev_begin[c->n_devs];
        c->last_tokens_read = 0;
        c->last_bytes_read = 0;
        for (int32_t d = 0; d < c->n_devs; d++) {
            int64_t tokens = 0;
            for (int64_t i = plan.dev_begin[d]; i < plan.dev_begin[d + 1]; i++) tokens += plan.lens[i];
            c->devs[d].last_bytes_read = (uint64_t)tokens * row_bytes;
            c->devs[d].bytes_read += c->devs[d].last_bytes_read;
            c->last_tokens_read += tokens;
            c->last_bytes_read += c->devs[d].last_bytes_read;
        }
        c->bytes_read += c->last_bytes_read;
        c->attends++;
    }
    pikv_host_free(ctx, parts);
    pikv_host_free(ctx, lse_tmp);
    pikv_host_free(ctx, plan.indptr);
    pikv_host_free(ctx, plan.slots);
    pikv_host_free(ctx, plan.lens);
    return st;
}
