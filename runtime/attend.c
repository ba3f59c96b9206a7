/* Attend: a host-side plan (select.c) gives each (query, KV head) its page
 * list on each device (FlashInfer's indptr/indices layout, with per-page
 * lengths); each device computes a partial output and log-sum-exp over its
 * pages, and the partials are merged exactly. The kernels also return each
 * page's log attention mass, which is turned into the page's share of the
 * final softmax and accumulated for the eviction policies. */
#include "select.h"
#include "comm.h"

#include <float.h>
#include <math.h>
#include <string.h>

/* Arguments; q is checked where it lives (io: a device's memory, else the host). */
static pikv_status validate(pikv_cache *c, const char *fn, int32_t layer, const pikv_attend_batch *b,
                            const pikv_select_params *sel, pikv_device *io)
{
    pikv_context *ctx = c->ctx;
    PIKV_RETURN_ERROR_IF(!b, ctx, PIKV_ERR_INVALID_ARGUMENT, "%s: batch is NULL", fn);
    PIKV_RETURN_ERROR_IF(layer < 0 || layer >= c->params.n_layers, ctx, PIKV_ERR_OUT_OF_RANGE,
                         "%s: layer %d is outside 0..%d", fn, layer, c->params.n_layers - 1);
    PIKV_RETURN_ERROR_IF(b->n_queries < 0, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "%s: n_queries = %d is negative", fn, b->n_queries);
    if (b->select) PIKV_FORWARD_IF_ERROR(pikv_select_validate(ctx, c, b->select, fn));
    PIKV_RETURN_ERROR_IF(c->comm && (sel->mode & PIKV_SELECT_QUEST), ctx, PIKV_ERR_UNSUPPORTED,
                         "%s: QUEST selection over ranks is not supported yet (page scores live with the pages)",
                         fn);
    if (b->n_queries == 0) return PIKV_OK;
    PIKV_RETURN_ERROR_IF(!b->seq_ids || !b->q || !b->out, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "%s: batch %s is NULL", fn,
                         !b->seq_ids ? "seq_ids" : !b->q ? "q" : "out");
    PIKV_RETURN_ERROR_IF((sel->mode & PIKV_SELECT_EXPERTS) && c->params.n_experts > 1 && !b->experts, ctx,
                         PIKV_ERR_INVALID_ARGUMENT,
                         "%s: EXPERTS selection needs the queries' experts (batch experts is NULL)", fn);
    for (int32_t i = 0; i < b->n_queries; i++) {
        const int32_t s = b->seq_ids[i];
        PIKV_RETURN_ERROR_IF(s < 0 || s >= c->params.max_sequences, ctx, PIKV_ERR_OUT_OF_RANGE,
                             "%s: seq_ids[%d] = %d is outside 0..%d", fn, i, s,
                             c->params.max_sequences - 1);
        PIKV_RETURN_ERROR_IF(!c->seqs[s].active, ctx, PIKV_ERR_NOT_FOUND,
                             "%s: seq_ids[%d] = %d has not been added", fn, i, s);
    }
    const int64_t n_q = (int64_t)b->n_queries * c->params.n_q_heads;
    PIKV_RETURN_ERROR_IF(n_q > INT32_MAX || (int64_t)b->n_queries * c->params.n_kv_heads >= INT32_MAX, ctx,
                         PIKV_ERR_INVALID_ARGUMENT,
                         "%s: n_queries = %d times n_q_heads = %d exceeds %d rows",
                         fn, b->n_queries, c->params.n_q_heads, INT32_MAX);
    const int64_t n_vals = n_q * c->params.head_dim;
    int64_t first = -1;
    float x = 0.0f;
    if (io) {
        PIKV_FORWARD_IF_ERROR(pikv_device_find_out_of_range(io, b->q, n_vals, FLT_MAX, &first, &x));
    } else {
        for (int64_t i = 0; i < n_vals && first < 0; i++)
            if (!isfinite(b->q[i])) first = i, x = b->q[i];
    }
    PIKV_RETURN_ERROR_IF(first >= 0, ctx, PIKV_ERR_INVALID_ARGUMENT, "%s: q[%lld] = %g (query %lld) is not finite",
                         fn, (long long)first, (double)x,
                         (long long)(first / ((int64_t)c->params.n_q_heads * c->params.head_dim)));
    if (b->experts)
        for (int64_t i = 0; i < (int64_t)b->n_queries * c->params.experts_per_token; i++)
            PIKV_RETURN_ERROR_IF(b->experts[i] < 0 || b->experts[i] >= c->params.n_experts, ctx,
                                 PIKV_ERR_OUT_OF_RANGE,
                                 "%s: experts[%lld] = %d is outside 0..%d", fn, (long long)i,
                                 b->experts[i], c->params.n_experts - 1);
    return PIKV_OK;
}

/* Run the plan: partials per device, merged into out/lse. page_lse (entries x
   group, in plan order) is filled when non-NULL. With io_on_device, q, out and lse
   are in the memory of the plan's one active device (the caller made sure). */
static pikv_status run_plan(pikv_cache *c, const char *fn, int32_t nq, const float *q, const pikv_read_plan *plan, float *out,
                            float *lse, float *page_lse, bool io_on_device)
{
    pikv_context *ctx = c->ctx;
    const int32_t hq = c->params.n_q_heads, hd = c->params.head_dim;
    const int32_t G = hq / c->params.n_kv_heads;
    const size_t out_floats = (size_t)nq * (size_t)hq * (size_t)hd, lse_floats = (size_t)nq * (size_t)hq;
    int32_t active[PIKV_MAX_DEVICES], n_active = 0;
    for (int32_t d = 0; d < c->n_devs; d++) /* over ranks: this rank's devices, its partial */
        if (plan->dev_begin[d + 1] > plan->dev_begin[d] && pikv_cache_dev_local(c, d)) active[n_active++] = d;
    PIKV_RETURN_ERROR_IF(io_on_device && n_active != 1, ctx, PIKV_ERR_INTERNAL,
                         "%s: device-resident output with %d devices to read", fn, n_active);
    /* demoted pages: fetched through staging slots (tier.c); otherwise the one pass below */
    if (plan->n_demoted > 0) {
        PIKV_RETURN_ERROR_IF(io_on_device || !c->tier, ctx, PIKV_ERR_INTERNAL,
                             "%s: a plan with %lld demoted page reads on the zero-copy path", fn,
                             (long long)plan->n_demoted);
        const double t0 = pikv_monotonic_s();
        pikv_status st = pikv_tier_run_plan(c, fn, nq, q, plan, out, lse, page_lse);
        c->run_attention_s += pikv_monotonic_s() - t0;
        return st;
    }
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
                             "%s: partials of %d devices: allocation failed", fn, n_active);
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
            .q = q,
            .indptr = plan->indptr + (size_t)d * ((size_t)plan->n_lists + 1),
            .slots = plan->slots + off,
            .page_len = plan->lens + off,
            .scale = c->scale,
            .out = n_active > 1 ? parts + (size_t)a * out_floats : out,
            .lse = n_active > 1 ? parts + (size_t)n_active * out_floats + (size_t)a * lse_floats : lse,
            .page_lse = page_lse ? page_lse + (size_t)off * (size_t)G : NULL,
            .io_on_device = io_on_device,
        };
        const double t0 = pikv_monotonic_s();
        st = pool->dev->iface->attention(pool->dev, &args);
        c->run_attention_s += pikv_monotonic_s() - t0;
    }
    if (st == PIKV_OK && n_active > 1) {
        pikv_merge_args margs = {n_active, nq * hq, hd, parts, parts + (size_t)n_active * out_floats, out, lse};
        const double t0 = pikv_monotonic_s();
        st = ctx->host_device->iface->merge(ctx->host_device, &margs);
        c->run_merge_s += pikv_monotonic_s() - t0;
    }
    pikv_host_free(ctx, parts);
    return st;
}

/* run_plan, then over ranks the exact merge of every rank's partial (every rank
   calls it: a rank with nothing to read contributes an empty partial). Only the
   partials travel, n_queries x n_q_heads x (head_dim + 2) floats, never pages.
   The merge is begun here (its MAX step done, its SUM posted: *merge, NULL without
   ranks) and ended by pikv_comm_merge_end; *partial_bytes gets what it moved. */
static pikv_status run_plan_ranks_begin(pikv_cache *c, const char *fn, int32_t nq, const float *q,
                                        const pikv_read_plan *plan, float *out, float *lse, float *page_lse,
                                        bool io_on_device, pikv_comm_merge **merge, uint64_t *partial_bytes)
{
    *merge = NULL;
    pikv_status st = run_plan(c, fn, nq, q, plan, out, lse, page_lse, io_on_device);
    if (!c->comm) return st;
    PIKV_FORWARD_IF_ERROR(pikv_dist_sync_status(c, fn, st));
    const uint64_t sent0 = c->comm->bytes_sent;
    st = pikv_comm_merge_begin(c->comm, nq * c->params.n_q_heads, c->params.head_dim, out, lse, merge);
    *partial_bytes += c->comm->bytes_sent - sent0; /* the SUM is counted when posted */
    return st;
}

/* The same, merged before it returns. */
static pikv_status run_plan_ranks(pikv_cache *c, const char *fn, int32_t nq, const float *q,
                                  const pikv_read_plan *plan, float *out, float *lse, float *page_lse,
                                  bool io_on_device, uint64_t *partial_bytes)
{
    pikv_comm_merge *merge = NULL;
    PIKV_FORWARD_IF_ERROR(run_plan_ranks_begin(c, fn, nq, q, plan, out, lse, page_lse, io_on_device, &merge,
                                               partial_bytes));
    return merge ? pikv_comm_merge_end(c->comm, merge) : PIKV_OK;
}

/* Distribution figures of an attend: ranks whose pages each query read, and the
   page bytes other ranks read (what gathering the pages here would have moved). */
static void count_ranks(pikv_cache *c, const pikv_read_plan *plan, int32_t nq, const uint64_t *dev_bytes)
{
    const int32_t kvh = c->params.n_kv_heads;
    int64_t touched = 0;
    int32_t most = 0;
    for (int32_t i = 0; i < nq; i++) {
        bool hit[PIKV_MAX_DEVICES] = {false};
        int32_t n = 0;
        for (int32_t d = 0; d < c->n_devs; d++) {
            const int32_t *indptr = plan->indptr + (size_t)d * ((size_t)plan->n_lists + 1);
            const int32_t r = d / c->n_local;
            if (hit[r] || indptr[(i + 1) * kvh] == indptr[i * kvh]) continue;
            hit[r] = true;
            n++;
        }
        touched += n;
        most = n > most ? n : most;
    }
    uint64_t gather = 0;
    for (int32_t d = 0; d < c->n_devs; d++)
        if (!pikv_cache_dev_local(c, d)) gather += dev_bytes[d];
    c->dist.last_ranks_per_query = nq ? (double)touched / (double)nq : 0.0;
    c->dist.last_max_ranks = most;
    c->dist.last_gather_bytes = gather;
}

/* Each read page's use statistics move; with page_lse (policies that rank by
   attention), its share of the final softmax, summed over the query heads of its
   KV head, is added to the page's attention mass. */
static void accumulate_mass(pikv_cache *c, int32_t layer, const pikv_read_plan *plan, const float *lse,
                            const float *page_lse)
{
    const int32_t kvh = c->params.n_kv_heads, G = c->params.n_q_heads / kvh;
    const int64_t clock = ++c->layer_clock[layer];
    const int64_t tier_clock = ++c->tier_clock;
    for (int32_t d = 0; d < c->n_devs; d++) {
        const int32_t *indptr = plan->indptr + (size_t)d * ((size_t)plan->n_lists + 1);
        const int64_t off = plan->dev_begin[d];
        for (int64_t list = 0; list < plan->n_lists; list++) {
            for (int32_t e = indptr[list]; e < indptr[list + 1]; e++) {
                pikv_page_meta *m = &c->pages[plan->ids[off + e]];
                if (page_lse) {
                    const float *l = lse + (size_t)list * (size_t)G; /* heads (i, g*G .. g*G+G-1) */
                    float mass = 0.0f;
                    for (int32_t h = 0; h < G; h++) {
                        const float pl = page_lse[(size_t)(off + e) * (size_t)G + (size_t)h];
                        if (pl != -INFINITY && l[h] != -INFINITY) mass += expf(pl - l[h]);
                    }
                    m->attn_mass += mass;
                }
                m->tier_use = tier_clock;
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

/* A host copy of a device batch's q (n floats). */
static pikv_status read_q(pikv_cache *c, const char *fn, pikv_device *io, const float *q, size_t n, float **out)
{
    float *h = pikv_host_alloc(c->ctx, n * sizeof(float), 64);
    PIKV_RETURN_ERROR_IF(!h, c->ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: host copy of q (%zu floats): allocation failed", fn,
                         n);
    pikv_status st = io->iface->memory_read(io, q, h, n * sizeof(float));
    if (st != PIKV_OK) {
        pikv_host_free(c->ctx, h);
        return st;
    }
    *out = h;
    return PIKV_OK;
}

/* The address of a buffer's bytes in its device's memory: the host pointer of
   host-visible backends, else the handle, which for backends with addressable memory
   (memory_read set: CPU, CUDA) is the device address. */
static float *device_address(pikv_buffer *buf)
{
    return (float *)(buf->host ? buf->host : buf->handle);
}

/* An attend between its two halves (pikv_cache_attend_start / _finish; the
   blocking calls run both halves back to back on one on the stack). */
struct pikv_attend_request {
    pikv_cache *c;
    const char *fn;
    int32_t layer;
    pikv_device *io;
    pikv_attend_batch b;         /* the caller's batch (its arrays stay valid until finish) */
    pikv_select_params sel;
    bool empty;                  /* no queries: nothing to finish */
    bool done;                   /* ended in start (one process, measurement) */
    bool measure, direct, staged;
    pikv_read_plan plan;
    float *scratch, *q_host, *page_lse, *lse_own, *out, *lse;
    pikv_buffer *lse_buf;
    pikv_comm_merge *merge;      /* the posted SUM of the merge (NULL: none in flight) */
    double recall, error;
    int64_t seq;                 /* its number among the cache's started requests */
    /* distribution figures, counted per request so that other requests' collectives
       between start and finish are not mixed in */
    uint64_t sent, received, partial_bytes;
    double merge_wait_s, merge_posted_s;
    double plan_s;               /* pikv_plan_reads of the batch */
    double attention_s, merge_s; /* this request's kernels and device merge (begin's share) */
};

/* Over ranks every rank must pass the same batch, or the merge mixes different
   queries silently: a hash of the layer, the batch's sequences, experts, selection and
   query values is compared over the ranks (one allreduce of two int64: MAX of h and
   of -h gives the largest and the smallest). Every rank sees the same verdict. */
static uint64_t hash_words(uint64_t h, const void *p, size_t bytes)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < bytes; i++) h = (h ^ b[i]) * 0x100000001b3ull;
    return h;
}

static uint64_t hash_floats(uint64_t h, const float *x, size_t n)
{
    /* the query values: one multiply per float, so a large batch costs little next to
       reading its pages */
    uint64_t a = h;
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], sizeof u);
        a = (a ^ u) * 0x9e3779b97f4a7c15ull + i;
    }
    return a;
}

static pikv_status check_same_batch(pikv_cache *c, const char *fn, int32_t layer, const pikv_attend_batch *b,
                                    const pikv_select_params *sel)
{
    const pikv_cache_params *p = &c->params;
    uint64_t h = 0xcbf29ce484222325ull;
    const int64_t head[2] = {layer, b->n_queries};
    h = hash_words(h, head, sizeof head);
    if (b->n_queries > 0) {
        h = hash_words(h, b->seq_ids, (size_t)b->n_queries * sizeof(int32_t));
        if (b->experts) h = hash_words(h, b->experts, (size_t)b->n_queries * (size_t)p->experts_per_token * sizeof(int32_t));
        h = hash_floats(h, b->q, (size_t)b->n_queries * (size_t)p->n_q_heads * (size_t)p->head_dim);
    }
    const int64_t s4[4] = {sel->mode, sel->experts_top_k, sel->sink_tokens, sel->recent_tokens};
    h = hash_words(h, s4, sizeof s4);
    const int64_t hv = (int64_t)(h >> 1); /* non-negative, so -hv does not overflow */
    int64_t mm[2] = {hv, -hv};
    PIKV_FORWARD_IF_ERROR(pikv_comm_allreduce_i64(c->comm, mm, 2, PIKV_REDUCE_MAX));
    PIKV_RETURN_ERROR_IF(mm[0] != -mm[1], c->ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "%s: the ranks passed different batches (layer, sequences, experts, selection or query "
                         "values differ): every rank must pass the same", fn);
    return PIKV_OK;
}

/* The batch's q, out and lse are host memory (io == NULL) or in io's memory (zero
   copy). Zero copy runs the attention kernel on the engine's tensors when every page
   read lives on io and nothing on the host needs the output (no measurement); else
   it is staged: q is read to the host, the host path runs, out and lse are written
   back. QUEST scores pages with a host copy of q either way (the score op takes host
   q); mass-ranking eviction reads lse back (a small device scratch when batch->lse
   is NULL).

   attend_begin runs everything up to this rank's partial, begins the merge over
   ranks (MAX step done, SUM posted: r->merge) and returns; with measurement it also
   ends the merge and measures. attend_end ends the merge, writes the output (staged),
   accumulates the masses and the statistics, and frees what begin held. A failing
   attend_begin frees everything itself (attend_end is not called). r: zeroed but for
   c, fn, layer and io. */
static pikv_status attend_begin(pikv_attend_request *r, const pikv_attend_batch *b)
{
    pikv_cache *c = r->c;
    const char *fn = r->fn;
    const int32_t layer = r->layer;
    pikv_device *io = r->io;
    const pikv_select_params *sel = b && b->select ? b->select : &c->params.select;
    pikv_status vst = validate(c, fn, layer, b, sel, io);
    /* over ranks every rank must pass the same batch: a rank refusing its own alone
       must not leave the others waiting in the merge */
    if (c->comm) vst = pikv_dist_sync_status(c, fn, vst);
    PIKV_FORWARD_IF_ERROR(vst);
    if (c->comm) PIKV_FORWARD_IF_ERROR(check_same_batch(c, fn, layer, b, sel));
    r->b = *b;
    r->sel = *sel;
    sel = &r->sel;
    if (b->n_queries == 0) {
        r->empty = true;
        return PIKV_OK;
    }
    pikv_context *ctx = c->ctx;
    const int32_t nq = b->n_queries, hq = c->params.n_q_heads, hd = c->params.head_dim;
    const int32_t kvh = c->params.n_kv_heads, G = hq / kvh;
    const size_t out_floats = (size_t)nq * (size_t)hq * (size_t)hd, lse_floats = (size_t)nq * (size_t)hq;
    const bool measure = sel->measure != 0 && sel->mode != PIKV_SELECT_ALL;
    /* only H2O and utility eviction rank pages by attention mass */
    const bool want_mass = c->params.evict.policy == PIKV_EVICT_H2O || c->params.evict.policy == PIKV_EVICT_UTILITY;
    r->measure = measure;
    if (c->tier) pikv_tier_attend_begin(c);

    /* The batch as the host-side planner sees it: for zero copy, q is a host copy when
       QUEST scores with it, else not needed (NULL). */
    pikv_attend_batch hb = *b;
    float *q_host = NULL;
    pikv_status st = PIKV_OK;
    if (io) {
        hb.q = NULL;
        if (sel->mode & PIKV_SELECT_QUEST) {
            st = read_q(c, fn, io, b->q, out_floats, &q_host);
            if (st != PIKV_OK) return st;
            hb.q = q_host;
        }
    }
    pikv_read_plan *plan = &r->plan;
    c->run_attention_s = c->run_merge_s = 0.0;
    const double plan_t0 = pikv_monotonic_s();
    st = pikv_plan_reads(c, layer, &hb, sel, plan);
    r->plan_s = pikv_monotonic_s() - plan_t0;
    if (st != PIKV_OK) {
        pikv_host_free(ctx, q_host);
        return c->comm ? pikv_dist_sync_status(c, fn, st) : st; /* the exchange the others make below */
    }
    /* zero copy straight on the engine's tensors, or staged through the host */
    int32_t n_active = 0, active = -1;
    for (int32_t d = 0; d < c->n_devs; d++)
        if (plan->dev_begin[d + 1] > plan->dev_begin[d]) n_active++, active = d;
    /* demoted pages read: staged (they are fetched into staging slots first) */
    const bool direct = io && !measure && n_active == 1 && c->devs[active].dev == io && plan->n_demoted == 0;
    const bool staged = io && !direct;
    r->direct = direct;
    r->staged = staged;
    if (staged && !q_host) {
        st = read_q(c, fn, io, b->q, out_floats, &q_host);
        hb.q = q_host;
    }
    const int64_t entries = plan->dev_begin[c->n_devs];
    const size_t mass_floats = want_mass ? (size_t)entries * (size_t)G : 0;
    float *scratch = NULL;
    if (st == PIKV_OK) {
        scratch = pikv_host_alloc(ctx, (mass_floats + lse_floats + (measure ? out_floats + lse_floats : 0) +
                                        (staged ? out_floats : 0) + 1) * sizeof(float), 64);
        if (!scratch)
            st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: scratch for %lld page reads: allocation failed", fn,
                           (long long)entries);
    }
    /* zero copy without batch->lse: the kernel still writes lse, into device scratch */
    pikv_buffer *lse_buf = NULL;
    if (st == PIKV_OK && direct && !b->lse) st = io->iface->buffer_alloc(io, lse_floats * sizeof(float), &lse_buf);
    if (c->comm) st = pikv_dist_sync_status(c, fn, st); /* every rank planned and has its scratch */
    r->scratch = scratch;
    r->q_host = q_host;
    r->lse_buf = lse_buf;
    if (st != PIKV_OK) goto fail;
    float *page_lse = want_mass ? scratch : NULL;
    float *lse_own = scratch + mass_floats;
    float *exact_out = lse_own + lse_floats, *exact_lse = measure ? exact_out + out_floats : exact_out;
    float *out_host = exact_lse + (measure ? lse_floats : 0);
    /* where the kernels read q and write out and lse */
    const float *q = staged ? q_host : b->q;
    float *out = staged ? out_host : b->out;
    float *lse = direct ? (b->lse ? b->lse : device_address(lse_buf)) : staged ? lse_own : b->lse ? b->lse : lse_own;
    r->page_lse = page_lse;
    r->lse_own = lse_own;
    r->out = out;
    r->lse = lse;
    st = run_plan_ranks_begin(c, fn, nq, q, plan, out, lse, page_lse, direct, &r->merge, &r->partial_bytes);
    if (st != PIKV_OK) goto fail;
    /* kept in the request: another attend may run between this begin and its end */
    r->attention_s = c->run_attention_s;
    r->merge_s = c->run_merge_s;
    if (!measure) return PIKV_OK;

    /* Measurement: the same batch read exactly, for recall and output error (which
       needs the merged output: the merge ends here). */
    if (r->merge) st = pikv_comm_merge_end_timed(c->comm, r->merge, &r->merge_wait_s, &r->merge_posted_s);
    r->merge = NULL;
    double recall = 1.0, error = 0.0;
    if (st == PIKV_OK) {
        pikv_select_params all = *sel;
        all.mode = PIKV_SELECT_ALL;
        pikv_read_plan exact;
        st = pikv_plan_reads(c, layer, &hb, &all, &exact);
        if (st == PIKV_OK) {
            st = run_plan_ranks(c, fn, nq, q, &exact, exact_out, exact_lse, NULL, false, &r->partial_bytes);
            pikv_read_plan_free(ctx, &exact);
        } else if (c->comm) {
            st = pikv_dist_sync_status(c, fn, st); /* the exchange run_plan_ranks makes on the others */
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
                    max_err = fmax(max_err, fabs((double)out[x] - (double)exact_out[x]));
                }
                const double e = max_ref > 0.0 ? max_err / max_ref : max_err;
                error = e > error ? e : error;
            }
        }
    }
    r->recall = recall;
    r->error = error;
    r->attention_s = c->run_attention_s; /* the exact pass included, as documented */
    r->merge_s = c->run_merge_s;
    if (st == PIKV_OK) return PIKV_OK;

fail:
    if (r->merge) (void)pikv_comm_merge_end(c->comm, r->merge); /* not reached: a failing begin posts nothing */
    r->merge = NULL;
    if (lse_buf) io->iface->buffer_free(io, lse_buf);
    pikv_host_free(ctx, scratch);
    pikv_host_free(ctx, q_host);
    pikv_read_plan_free(ctx, plan);
    r->scratch = r->q_host = NULL;
    r->lse_buf = NULL;
    return st;
}

static pikv_status attend_end(pikv_attend_request *r)
{
    if (r->empty) return PIKV_OK;
    pikv_cache *c = r->c;
    pikv_context *ctx = c->ctx;
    const int32_t layer = r->layer;
    pikv_device *io = r->io;
    const pikv_attend_batch *b = &r->b;
    const pikv_select_params *sel = &r->sel;
    const pikv_read_plan *plan = &r->plan;
    const int32_t nq = b->n_queries, hq = c->params.n_q_heads;
    const int32_t kvh = c->params.n_kv_heads, hd = c->params.head_dim;
    const size_t out_floats = (size_t)nq * (size_t)hq * (size_t)hd, lse_floats = (size_t)nq * (size_t)hq;
    float *out = r->out, *lse = r->lse;
    pikv_status st = PIKV_OK;
    if (r->merge) {
        st = pikv_comm_merge_end_timed(c->comm, r->merge, &r->merge_wait_s, &r->merge_posted_s);
        r->merge = NULL;
    }
    /* Staged: the output goes to the device. Zero copy: mass accumulation reads lse on the host. */
    if (st == PIKV_OK && r->staged) {
        st = io->iface->memory_write(io, b->out, out, out_floats * sizeof(float));
        if (st == PIKV_OK && b->lse) st = io->iface->memory_write(io, b->lse, lse, lse_floats * sizeof(float));
    }
    const float *mass_lse = lse;
    if (st == PIKV_OK && r->direct && r->page_lse) {
        st = io->iface->memory_read(io, lse, r->lse_own, lse_floats * sizeof(float));
        mass_lse = r->lse_own;
    }
    if (st == PIKV_OK) {
        const int64_t entries = plan->dev_begin[c->n_devs];
        accumulate_mass(c, layer, plan, mass_lse, r->page_lse);
        if (c->tier) pikv_tier_after_attend(c, layer); /* promotion, prefetch for the next layer */
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
            for (int64_t i = plan->dev_begin[d]; i < plan->dev_begin[d + 1]; i++) {
                dev_tokens += plan->lens[i];
                bytes += plan->lens[i] * ((plan->slots[i] & PIKV_SLOT_QUANT) ? qrow_bytes : row_bytes);
            }
            c->devs[d].last_bytes_read = (uint64_t)(bytes + 0.5) + (uint64_t)plan->scored[d] * bounds_bytes;
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
        c->last_recall = sel->mode == PIKV_SELECT_ALL ? 1.0 : r->measure ? r->recall : -1.0;
        c->last_output_error = sel->mode == PIKV_SELECT_ALL ? 0.0 : r->measure ? r->error : -1.0;
        c->attends++;
        c->last_plan_s = r->plan_s;
        c->last_score_s = plan->score_s;
        c->last_topk_s = plan->topk_s;
        c->last_attention_s = r->attention_s;
        c->last_merge_s = r->merge_s + r->merge_wait_s;
        if (c->comm) {
            uint64_t dev_bytes[PIKV_MAX_DEVICES];
            for (int32_t d = 0; d < c->n_devs; d++) dev_bytes[d] = c->devs[d].last_bytes_read;
            count_ranks(c, plan, nq, dev_bytes);
        }
    }
    if (r->lse_buf) io->iface->buffer_free(io, r->lse_buf);
    pikv_host_free(ctx, r->scratch);
    pikv_host_free(ctx, r->q_host);
    pikv_read_plan_free(ctx, &r->plan);
    r->scratch = r->q_host = NULL;
    r->lse_buf = NULL;
    return st;
}

/* Over ranks every call is a step of the figures, whatever path it returns by (no
   queries, a failure): "last" never describes an earlier call. Reset before the
   half that sets count_ranks' figures, set from the request after it. */
static void dist_reset_last(pikv_cache *c)
{
    c->dist.last_partial_bytes = c->dist.last_gather_bytes = 0;
    c->dist.last_ranks_per_query = 0.0;
    c->dist.last_max_ranks = 0;
    c->dist.last_merge_wait_s = c->dist.last_merge_posted_s = 0.0;
}

static void dist_set_last(pikv_cache *c, const pikv_attend_request *r)
{
    c->dist.last_bytes_sent = r->sent;
    c->dist.last_bytes_received = r->received;
    c->dist.bytes_sent += r->sent;
    c->dist.bytes_received += r->received;
    c->dist.last_partial_bytes = r->partial_bytes;
    c->dist.last_merge_wait_s = r->merge_wait_s;
    c->dist.last_merge_posted_s = r->merge_posted_s;
}

static void request_init(pikv_attend_request *r, pikv_cache *c, const char *fn, int32_t layer, pikv_device *io)
{
    memset(r, 0, sizeof *r);
    r->c = c;
    r->fn = fn;
    r->layer = layer;
    r->io = io;
}

/* begin (and, with end_now, end), counting the request's traffic */
static pikv_status request_begin(pikv_attend_request *r, const pikv_attend_batch *b, bool end_now)
{
    pikv_comm *comm = r->c->comm;
    uint64_t sent0 = comm ? comm->bytes_sent : 0, recv0 = comm ? comm->bytes_received : 0;
    pikv_status st = attend_begin(r, b);
    if (st == PIKV_OK && (end_now || !comm || r->measure)) {
        if (comm) dist_reset_last(r->c);
        st = attend_end(r);
        r->done = true;
    }
    if (comm) {
        r->sent += comm->bytes_sent - sent0;
        r->received += comm->bytes_received - recv0;
    }
    return st;
}

static pikv_status attend(pikv_cache *c, const char *fn, int32_t layer, const pikv_attend_batch *b, pikv_device *io)
{
    pikv_attend_request r;
    request_init(&r, c, fn, layer, io);
    if (c->comm) dist_reset_last(c);
    const pikv_status st = request_begin(&r, b, true);
    if (c->comm) dist_set_last(c, &r);
    return st;
}

pikv_status pikv_cache_attend(pikv_cache *c, int32_t layer, const pikv_attend_batch *b)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    return attend(c, "pikv_cache_attend", layer, b, NULL);
}

pikv_status pikv_cache_attend_start(pikv_cache *c, int32_t layer, const pikv_attend_batch *b,
                                    pikv_attend_request **req)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    const char *fn = "pikv_cache_attend_start";
    pikv_context *ctx = c->ctx;
    /* a local argument error: every rank passes req, so every rank finds it alike */
    PIKV_RETURN_ERROR_IF(!req, ctx, PIKV_ERR_INVALID_ARGUMENT, "%s: req is NULL", fn);
    *req = NULL;
    pikv_attend_request *r = pikv_host_alloc(ctx, sizeof *r, 64);
    if (!r) {
        pikv_status st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: request: allocation failed", fn);
        if (c->comm) { /* the exchange the others make on their arguments */
            dist_reset_last(c);
            const uint64_t sent0 = c->comm->bytes_sent, recv0 = c->comm->bytes_received;
            st = pikv_dist_sync_status(c, fn, st);
            pikv_dist_account(c, sent0, recv0);
        }
        return st;
    }
    request_init(r, c, fn, layer, NULL);
    const pikv_status st = request_begin(r, b, false);
    if (st != PIKV_OK) {
        if (c->comm) {
            if (!r->done) dist_reset_last(c);
            dist_set_last(c, r);
        }
        pikv_host_free(ctx, r);
        return st;
    }
    if (c->comm && r->done) dist_set_last(c, r);
    r->seq = ++c->attend_started;
    *req = r;
    return PIKV_OK;
}

pikv_status pikv_cache_attend_finish(pikv_attend_request *r)
{
    if (!r) return PIKV_ERR_INVALID_ARGUMENT;
    pikv_cache *c = r->c;
    pikv_context *ctx = c->ctx;
    PIKV_RETURN_ERROR_IF(r->seq != c->attend_finished + 1, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "pikv_cache_attend_finish: requests finish in the order they were started: this one "
                         "(layer %d) is number %lld, the next to finish is number %lld (it is not freed)",
                         r->layer, (long long)r->seq, (long long)(c->attend_finished + 1));
    c->attend_finished++;
    r->fn = "pikv_cache_attend_finish";
    pikv_status st = PIKV_OK;
    if (!r->done) {
        pikv_comm *comm = c->comm; /* not done: over ranks */
        const uint64_t sent0 = comm->bytes_sent, recv0 = comm->bytes_received;
        dist_reset_last(c);
        st = attend_end(r);
        r->sent += comm->bytes_sent - sent0;
        r->received += comm->bytes_received - recv0;
        dist_set_last(c, r);
    }
    pikv_host_free(ctx, r);
    return st;
}

pikv_status pikv_cache_attend_device(pikv_cache *c, int32_t layer, int32_t device, const pikv_attend_batch *b)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    pikv_device *io;
    PIKV_RETURN_ERROR_IF(c->comm, c->ctx, PIKV_ERR_UNSUPPORTED,
                         "pikv_cache_attend_device: zero copy on a distributed cache is not supported yet "
                         "(use pikv_cache_attend)");
    PIKV_FORWARD_IF_ERROR(pikv_zero_copy_device(c->ctx, device, "pikv_cache_attend_device", &io));
    return attend(c, "pikv_cache_attend_device", layer, b, io);
}
