/* Transactional append. A dry run computes where every token goes (its shard,
 * the shard's open page or new pages), checks capacity and reserves every
 * resource (page ids, ring room, device slots, scratch); only then is anything
 * written. A failure before the commit leaves the cache exactly as it was.
 *
 * Zero copy (pikv_cache_append_device): k and v are in a device's memory. They
 * are checked there (find_out_of_range), pages on that device are written by its
 * kernel straight from them, and pages on other devices from one host copy made
 * during the dry run, only when such a page is written. */
#include "cache-impl.h"

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <string.h>

typedef struct append_plan {
    int32_t *shard_of;    /* [n] shard of each token */
    int32_t *shard_count; /* [n_shards] tokens per shard */
    int32_t *shard_start; /* [n_shards + 1] offsets into order[] */
    int32_t *order;       /* [n] tokens sorted by shard, in input order */
    int32_t *new_pages;   /* [n_shards] pages each shard needs */
    int32_t *place;       /* [n_shards] device of each shard (BALANCED: tentative) */
    pikv_page_write *writes; /* [n_shards + total new pages] */
    int32_t *write_dev;   /* device of each write */
    pikv_page_write *dev_writes;
    uint32_t *new_ids;    /* [total new pages] ids taken for new pages, in shard order */
    uint32_t *full_ids;   /* [writes] quantized caches: pages this append fills */
    uint32_t *qslots;     /* [writes] their slots in the quantized pool */
} append_plan;

/* Non-finite values (or values f16 pages cannot hold) would poison every softmax
   they take part in: refuse them, naming the first. Open pages of quantized caches
   are f16 too. */
static float value_limit(const pikv_cache *c)
{
    return c->params.dtype == PIKV_DTYPE_F32 ? FLT_MAX : 65504.0f;
}

static pikv_status bad_value(pikv_cache *c, const char *fn, const char *name, int64_t i, float x)
{
    const pikv_cache_params *p = &c->params;
    return PIKV_FAIL(c->ctx, PIKV_ERR_INVALID_ARGUMENT, "%s: %s[%lld] = %g (token %lld) is not finite%s", fn,
                     name, (long long)i, (double)x, (long long)(i / ((int64_t)p->n_kv_heads * p->head_dim)),
                     p->dtype != PIKV_DTYPE_F32 ? " or exceeds the f16 range 65504" : "");
}

static pikv_status check_host_values(pikv_cache *c, const char *fn, int32_t n, const float *k, const float *v)
{
    const float limit = value_limit(c);
    const int64_t n_vals = (int64_t)n * c->params.n_kv_heads * c->params.head_dim;
    for (int pass = 0; pass < 2; pass++) {
        const float *x = pass == 0 ? k : v;
        for (int64_t i = 0; i < n_vals; i++)
            if (!(fabsf(x[i]) <= limit)) return bad_value(c, fn, pass == 0 ? "k" : "v", i, x[i]);
    }
    return PIKV_OK;
}

/* Host copy of k and v (one block, k then v) read from the source device. */
static pikv_status copy_to_host(pikv_cache *c, const char *fn, int32_t n, pikv_device *src, const float *k,
                                const float *v, float **out)
{
    const size_t n_vals = (size_t)n * (size_t)c->params.n_kv_heads * (size_t)c->params.head_dim;
    float *h = pikv_host_alloc(c->ctx, 2 * n_vals * sizeof(float), 64);
    PIKV_RETURN_ERROR_IF(!h, c->ctx, PIKV_ERR_OUT_OF_MEMORY,
                         "%s: host copy of k and v (%d tokens) for pages off device %s: allocation failed",
                         fn, n, src->info.name);
    pikv_status st = src->iface->memory_read(src, k, h, n_vals * sizeof(float));
    if (st == PIKV_OK) st = src->iface->memory_read(src, v, h + n_vals, n_vals * sizeof(float));
    if (st != PIKV_OK) {
        pikv_host_free(c->ctx, h);
        return st;
    }
    *out = h;
    return PIKV_OK;
}

/* The values of k and v in the source device's memory, checked there (the same
   limit as check_host_values), so nothing comes back to the host. */
static pikv_status check_device_values(pikv_cache *c, const char *fn, int32_t n, pikv_device *src,
                                       const float *k, const float *v)
{
    const int64_t n_vals = (int64_t)n * c->params.n_kv_heads * c->params.head_dim;
    for (int pass = 0; pass < 2; pass++) {
        int64_t first;
        float x;
        PIKV_FORWARD_IF_ERROR(pikv_device_find_out_of_range(src, pass == 0 ? k : v, n_vals, value_limit(c),
                                                            &first, &x));
        if (first >= 0) return bad_value(c, fn, pass == 0 ? "k" : "v", first, x);
    }
    return PIKV_OK;
}

/* Arguments, and with src == NULL (host tensors) the values of k and v; values on a
   device are checked by check_device_values() after this. */
static pikv_status validate(pikv_cache *c, const char *fn, int32_t layer, int32_t seq, int32_t n,
                            pikv_device *src, const float *k, const float *v, const int32_t *positions,
                            const int32_t *experts, bool check_values)
{
    pikv_context *ctx = c->ctx;
    const pikv_cache_params *p = &c->params;
    PIKV_RETURN_ERROR_IF(layer < 0 || layer >= p->n_layers, ctx, PIKV_ERR_OUT_OF_RANGE,
                         "%s: layer %d is outside 0..%d", fn, layer, p->n_layers - 1);
    char what[64];
    snprintf(what, sizeof what, "%s:", fn);
    PIKV_FORWARD_IF_ERROR(pikv_seq_check(c, seq, what));
    PIKV_RETURN_ERROR_IF(n < 0, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "%s: n_tokens = %d is negative", fn, n);
    if (n == 0) return PIKV_OK;
    PIKV_RETURN_ERROR_IF(!k || !v, ctx, PIKV_ERR_INVALID_ARGUMENT, "%s: %s is NULL", fn,
                         !k ? "k" : "v");
    PIKV_RETURN_ERROR_IF(!experts && p->n_experts > 1, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "%s: experts is NULL but the cache has n_experts = %d",
                         fn, p->n_experts);
    if (experts)
        for (int64_t i = 0; i < (int64_t)n * p->experts_per_token; i++)
            PIKV_RETURN_ERROR_IF(experts[i] < 0 || experts[i] >= p->n_experts, ctx, PIKV_ERR_OUT_OF_RANGE,
                                 "%s: experts[%lld] = %d (token %lld) is outside 0..%d",
                                 fn, (long long)i, experts[i], (long long)(i / p->experts_per_token),
                                 p->n_experts - 1);
    if (!src && check_values) PIKV_FORWARD_IF_ERROR(check_host_values(c, fn, n, k, v));
    if (positions)
        for (int32_t i = 0; i < n; i++)
            PIKV_RETURN_ERROR_IF(positions[i] < 0, ctx, PIKV_ERR_INVALID_ARGUMENT,
                                 "%s: positions[%d] = %d is negative", fn, i, positions[i]);
    const pikv_seq_layer *sl = &c->seqs[seq].layers[layer];
    PIKV_RETURN_ERROR_IF(sl->next_index + n > INT32_MAX, ctx, PIKV_ERR_CAPACITY,
                         "%s: sequence %d would pass %d tokens", fn, seq, INT32_MAX);
    PIKV_RETURN_ERROR_IF(c->layer_tokens[layer] + n > p->capacity_tokens, ctx, PIKV_ERR_CAPACITY,
                         "%s: layer %d holds %lld tokens; %d more exceed capacity_tokens "
                         "= %lld", fn, layer, (long long)c->layer_tokens[layer], n,
                         (long long)p->capacity_tokens);
    return PIKV_OK;
}

/* Rows still free in a shard's open page (the back of its ring). */
static int32_t open_rows(const pikv_cache *c, const pikv_ring *ring)
{
    if (ring->count == 0) return 0;
    const pikv_page_meta *m = &c->pages[pikv_ring_back(ring)];
    return c->params.page_size - m->n_tokens;
}

pikv_status pikv_append_validate(pikv_cache *c, const char *fn, int32_t layer, int32_t seq, int32_t n,
                                 const float *k, const float *v, const int32_t *positions, const int32_t *experts)
{
    return validate(c, fn, layer, seq, n, NULL, k, v, positions, experts, true);
}

void pikv_append_route(const pikv_cache *c, int32_t layer, int32_t seq, int32_t n, const int32_t *experts,
                       int32_t *shard_of, int32_t *shard_count, int32_t *new_pages, int32_t *place)
{
    const pikv_cache_params *p = &c->params;
    const int32_t ps = p->page_size, ns = c->n_shards;
    const pikv_seq_layer *sl = &c->seqs[seq].layers[layer];
    memset(shard_count, 0, (size_t)ns * sizeof *shard_count);
    for (int32_t i = 0; i < n; i++) {
        int32_t e = experts ? experts[(size_t)i * (size_t)p->experts_per_token] : 0;
        int32_t s = pikv_placement_shard(c, sl->next_index + i, e);
        shard_of[i] = s;
        shard_count[s]++;
    }
    int64_t pending[PIKV_MAX_DEVICES] = {0};
    for (int32_t s = 0; s < ns; s++) {
        new_pages[s] = 0;
        place[s] = -1;
        if (shard_count[s] == 0) continue;
        const int32_t open = open_rows(c, &sl->rings[s]);
        int64_t rest = (int64_t)shard_count[s] - open;
        if (rest < 0) rest = 0;
        new_pages[s] = (int32_t)((rest + ps - 1) / ps);
        int32_t dev = ((pikv_cache *)c)->shards[(size_t)layer * (size_t)ns + (size_t)s].dev;
        if (dev < 0) dev = pikv_placement_pick_device(c, pending);
        place[s] = dev;
        pending[dev] += new_pages[s];
    }
}

/* k and v are host memory (src == NULL) or in src's memory (zero copy): writes to
   pages on src get the device pointers; pages on other devices are written from a
   host copy, made once and only when some page needs it. With sync (a distributed
   cache), every rank runs this with the same arguments and the status is exchanged
   twice, after the dry run and after the writes, so all ranks commit or all roll
   back; every path below makes both exchanges or returns after the first. */
pikv_status pikv_append_tokens(pikv_cache *c, const char *fn, int32_t layer, int32_t seq, int32_t n,
                               pikv_device *src, const float *k, const float *v, const int32_t *row_of,
                               const int32_t *positions, const int32_t *experts, bool sync)
{
    /* with row_of the rows were checked by the rank that passed them */
    PIKV_FORWARD_IF_ERROR(validate(c, fn, layer, seq, n, src, k, v, positions, experts, row_of == NULL));
    if (n == 0) return PIKV_OK;
    pikv_context *ctx = c->ctx;
    const pikv_cache_params *p = &c->params;
    const int32_t ps = p->page_size, ns = c->n_shards;
    const size_t n_vals = (size_t)n * (size_t)p->n_kv_heads * (size_t)p->head_dim;
    pikv_seq_layer *sl = &c->seqs[seq].layers[layer];
    float *host_kv = NULL; /* zero copy: k then v read from src, when needed */
    if (src) PIKV_FORWARD_IF_ERROR(check_device_values(c, fn, n, src, k, v));

    /* ---- dry run: plan ---- */
    append_plan plan;
    const size_t n_ints = (size_t)n * 3 + (size_t)ns * 5 + 1;
    int32_t *ints = pikv_host_calloc(ctx, n_ints, sizeof(int32_t));
    if (!ints) {
        pikv_host_free(ctx, host_kv);
        pikv_status fail = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: scratch for %d tokens: allocation failed",
                                     fn, n);
        return sync ? pikv_dist_sync_status(c, fn, fail) : fail;
    }
    plan.shard_of = ints;
    plan.order = plan.shard_of + n;
    plan.shard_count = plan.order + n;
    plan.new_pages = plan.shard_count + ns;
    plan.place = plan.new_pages + ns;
    plan.shard_start = plan.place + ns;
    pikv_append_route(c, layer, seq, n, experts, plan.shard_of, plan.shard_count, plan.new_pages, plan.place);
    plan.shard_start[0] = 0;
    for (int32_t s = 0; s < ns; s++) plan.shard_start[s + 1] = plan.shard_start[s] + plan.shard_count[s];
    {
        /* counting sort keeps input order within a shard */
        int32_t *fill = plan.shard_start + ns + 1; /* [ns] cursors */
        for (int32_t s = 0; s < ns; s++) fill[s] = plan.shard_start[s];
        for (int32_t i = 0; i < n; i++) plan.order[fill[plan.shard_of[i]]++] = i;
    }
    /* the rows of k/v the writes read: the tokens' own, or through row_of */
    int32_t *src_rows = plan.order;
    if (row_of) {
        src_rows = plan.shard_start + 2 * ns + 1; /* [n], after the cursors */
        for (int32_t i = 0; i < n; i++) src_rows[i] = row_of[plan.order[i]] < 0 ? 0 : row_of[plan.order[i]];
    }
    int64_t pending[PIKV_MAX_DEVICES] = {0}, qpending[PIKV_MAX_DEVICES] = {0};
    int64_t total_new = 0, n_writes = 0;
    const bool quant = c->qdevs != NULL;
    for (int32_t s = 0; s < ns; s++) {
        if (plan.shard_count[s] == 0) continue;
        const int32_t open = open_rows(c, &sl->rings[s]);
        const int32_t dev = plan.place[s];
        pending[dev] += plan.new_pages[s];
        total_new += plan.new_pages[s];
        if (quant) { /* pages this append fills are quantized: the open page, full new pages */
            const int32_t into_open = open < plan.shard_count[s] ? open : plan.shard_count[s];
            if (open > 0 && into_open == open) qpending[c->pages[pikv_ring_back(&sl->rings[s])].dev]++;
            qpending[dev] += (plan.shard_count[s] - into_open) / ps;
        }
        n_writes += plan.new_pages[s] + (open > 0 ? 1 : 0);
    }

    /* ---- dry run: reserve ---- */
    pikv_status st = PIKV_OK;
    plan.writes = pikv_host_calloc(ctx, (size_t)n_writes * 2, sizeof(pikv_page_write));
    plan.write_dev = pikv_host_calloc(ctx, (size_t)n_writes, sizeof(int32_t));
    if (!plan.writes || !plan.write_dev)
        st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: scratch for %lld page writes: "
                       "allocation failed", fn, (long long)n_writes);
    plan.dev_writes = plan.writes ? plan.writes + n_writes : NULL;
    plan.new_ids = NULL;
    plan.full_ids = plan.qslots = NULL;
    if (st == PIKV_OK) {
        plan.new_ids = pikv_host_calloc(ctx, (size_t)(total_new ? total_new : 1), sizeof(uint32_t));
        plan.full_ids = pikv_host_calloc(ctx, (size_t)(n_writes ? n_writes : 1) * 2, sizeof(uint32_t));
        plan.qslots = plan.full_ids ? plan.full_ids + (n_writes ? n_writes : 1) : NULL;
        if (!plan.new_ids || !plan.full_ids)
            st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: scratch for %lld new pages: "
                           "allocation failed", fn, (long long)total_new);
    }
    if (st == PIKV_OK) st = pikv_page_ids_reserve(c, total_new);
    for (int32_t s = 0; s < ns && st == PIKV_OK; s++)
        if (plan.new_pages[s] > 0)
            st = pikv_ring_reserve(ctx, &sl->rings[s], sl->rings[s].count + plan.new_pages[s]);
    /* Tiers: room under the device budgets (demoting cold pages: content-preserving
       moves that stand even if the append fails), and host-tier room for what eviction
       will demote after the commit. Before the pool reserves, which they do not undo. */
    for (int32_t d = 0; c->tier && d < c->n_devs && st == PIKV_OK; d++)
        st = pikv_tier_reserve_bytes(c, d, (uint64_t)pending[d] * c->layout.page_bytes +
                                               (uint64_t)qpending[d] * (quant ? c->qlayout.page_bytes : 0), fn);
    if (c->tier && st == PIKV_OK) st = pikv_tier_prepare_evict(c, layer, seq, n);
    int32_t added[PIKV_MAX_DEVICES] = {0}, qadded[PIKV_MAX_DEVICES] = {0};
    for (int32_t d = 0; d < c->n_devs && st == PIKV_OK; d++)
        st = pikv_pool_reserve(ctx, &c->devs[d], &c->layout, pending[d], &added[d]);
    for (int32_t d = 0; quant && d < c->n_devs && st == PIKV_OK; d++)
        st = pikv_pool_reserve(ctx, &c->qdevs[d], &c->qlayout, qpending[d], &qadded[d]);
    if (st == PIKV_OK && src && !host_kv) {
        /* zero copy: pages on devices other than the source are written from host memory */
        bool need_host = false;
        for (int32_t s = 0; s < ns && !need_host; s++) {
            if (plan.shard_count[s] == 0) continue;
            const pikv_ring *ring = &sl->rings[s];
            if (open_rows(c, ring) > 0 && c->devs[c->pages[pikv_ring_back(ring)].dev].dev != src) need_host = true;
            if (plan.new_pages[s] > 0 && c->devs[plan.place[s]].dev != src) need_host = true;
        }
        if (need_host) st = copy_to_host(c, fn, n, src, k, v, &host_kv);
    }
    if (sync) st = pikv_dist_sync_status(c, fn, st); /* exchange 1: every rank reserved */
    if (st != PIKV_OK) {
        for (int32_t d = 0; d < c->n_devs; d++) pikv_pool_unreserve(&c->devs[d], added[d]);
        for (int32_t d = 0; quant && d < c->n_devs; d++) pikv_pool_unreserve(&c->qdevs[d], qadded[d]);
        pikv_host_free(ctx, plan.writes);
        pikv_host_free(ctx, plan.write_dev);
        pikv_host_free(ctx, plan.full_ids);
        pikv_host_free(ctx, plan.new_ids);
        pikv_host_free(ctx, ints);
        pikv_host_free(ctx, host_kv);
        return st;
    }

    /* ---- write: take page ids and slots, then run the device ops. A device error
       here gives the ids and slots back and leaves the metadata as it was (the open
       pages' bounds may have widened, which keeps them valid upper bounds). ---- */
    int64_t w = 0, n_new = 0, n_full = 0;
    for (int32_t s = 0; s < ns; s++) {
        if (plan.shard_count[s] == 0) continue;
        const pikv_ring *ring = &sl->rings[s];
        const int32_t dev = plan.place[s];
        int32_t done = 0;
        const int32_t open = open_rows(c, ring);
        if (open > 0) {
            const pikv_page_meta *m = &c->pages[pikv_ring_back(ring)];
            const int32_t rows = open < plan.shard_count[s] ? open : plan.shard_count[s];
            plan.writes[w] = (pikv_page_write){m->slot, m->n_tokens, rows, plan.shard_start[s]};
            plan.write_dev[w++] = m->dev;
            if (quant && m->n_tokens + rows == ps) plan.full_ids[n_full++] = pikv_ring_back(ring);
            done = rows;
        }
        for (int32_t j = 0; j < plan.new_pages[s]; j++) {
            const int32_t rows = plan.shard_count[s] - done < ps ? plan.shard_count[s] - done : ps;
            uint32_t id = pikv_page_id_take(c);
            c->pages[id] = (pikv_page_meta){.dev = dev, .slot = pikv_pool_take(&c->devs[dev]), .layer = layer,
                                            .shard = s, .last_use = c->layer_clock[layer],
                                            .tier_use = c->tier_clock};
            plan.new_ids[n_new++] = id;
            plan.writes[w] = (pikv_page_write){c->pages[id].slot, 0, rows, plan.shard_start[s] + done};
            plan.write_dev[w++] = dev;
            if (quant && rows == ps) plan.full_ids[n_full++] = id;
            done += rows;
        }
    }
    /* host tensors: the caller's, or for zero copy the host copy (made if some page needs it) */
    const float *hk = src ? host_kv : k, *hv = src ? (host_kv ? host_kv + n_vals : NULL) : v;
    for (int32_t d = 0; d < c->n_devs && st == PIKV_OK; d++) {
        int32_t nw = 0;
        for (int64_t i = 0; i < w; i++)
            if (plan.write_dev[i] == d) plan.dev_writes[nw++] = plan.writes[i];
        if (nw == 0) continue;
        pikv_page_pool *pool = &c->devs[d];
        const bool direct = src && pool->dev == src; /* zero copy: the kernel reads the engine's tensors */
        pikv_append_args args = {&pool->view, nw, plan.dev_writes, src_rows, direct ? k : hk, direct ? v : hv,
                                 direct};
        st = pool->dev->iface->append(pool->dev, &args);
    }
    /* Quantize the pages this append filled (KIVI: the open page stays f16). */
    double qerr[5] = {0, 0, 0, 0, 0};
    int64_t n_quantized = 0;
    while (st == PIKV_OK && n_quantized < n_full) {
        const pikv_page_meta *m = &c->pages[plan.full_ids[n_quantized]];
        pikv_page_pool *qpool = &c->qdevs[m->dev];
        plan.qslots[n_quantized] = pikv_pool_take(qpool);
        pikv_quantize_args qa = {&c->devs[m->dev].view, m->slot, plan.qslots[n_quantized], {0, 0, 0, 0, 0}};
        st = qpool->dev->iface->quantize(qpool->dev, &qa);
        n_quantized++; /* its slot is taken: given back below on failure */
        for (int j = 0; j < 4; j++) qerr[j] += qa.err[j];
        qerr[4] = qa.err[4] > qerr[4] ? qa.err[4] : qerr[4];
    }
    if (sync) st = pikv_dist_sync_status(c, fn, st); /* exchange 2: every rank wrote its pages */
    if (st != PIKV_OK) {
        /* Open pages already written on some device had their bounds widened by rows
           that are now dropped: recompute them over their old rows (best effort: the
           device may be what failed). */
        for (int64_t i = 0; i < w; i++) {
            if (plan.writes[i].row0 == 0) continue;
            pikv_page_pool *pool = &c->devs[plan.write_dev[i]];
            pikv_page_copy_args restore = {&pool->view, plan.writes[i].slot, plan.writes[i].slot, plan.writes[i].row0};
            (void)pool->dev->iface->page_copy(pool->dev, &restore);
        }
        for (int64_t i = n_quantized - 1; i >= 0; i--)
            pikv_pool_give(&c->qdevs[c->pages[plan.full_ids[i]].dev], plan.qslots[i]);
        for (int32_t d = 0; quant && d < c->n_devs; d++) pikv_pool_unreserve(&c->qdevs[d], qadded[d]);
        for (int64_t i = n_new - 1; i >= 0; i--) {
            const pikv_page_meta *m = &c->pages[plan.new_ids[i]];
            pikv_pool_give(&c->devs[m->dev], m->slot);
            c->free_ids[c->n_free_ids++] = plan.new_ids[i];
        }
        for (int32_t d = 0; d < c->n_devs; d++) pikv_pool_unreserve(&c->devs[d], added[d]);
    } else {
        /* ---- commit the metadata: nothing here can fail ---- */
        int64_t next_new = 0;
        for (int32_t s = 0; s < ns; s++) {
            if (plan.shard_count[s] == 0) continue;
            pikv_shard *sh = pikv_cache_shard(c, layer, s);
            if (sh->dev < 0) {
                sh->dev = plan.place[s];
                c->devs[sh->dev].shards++;
            }
            pikv_ring *ring = &sl->rings[s];
            int32_t done = 0;
            while (done < plan.shard_count[s]) {
                uint32_t id;
                if (open_rows(c, ring) > 0) {
                    id = pikv_ring_back(ring);
                } else {
                    id = plan.new_ids[next_new++];
                    c->pages[id].refs = 1;
                    pikv_ring_push(ring, id);
                    c->devs[c->pages[id].dev].pages_used++;
                    sh->pages++;
                    c->layer_pages[layer]++;
                    c->pages_live++;
                }
                pikv_page_meta *m = &c->pages[id];
                int32_t rows = ps - m->n_tokens;
                if (rows > plan.shard_count[s] - done) rows = plan.shard_count[s] - done;
                for (int32_t r = 0; r < rows; r++) {
                    int32_t t = plan.order[plan.shard_start[s] + done + r];
                    size_t at = (size_t)id * (size_t)ps + (size_t)(m->n_tokens + r);
                    c->indices[at] = (int32_t)(sl->next_index + t);
                    c->positions[at] = positions ? positions[t] : (int32_t)(sl->next_index + t);
                    const int32_t e = experts ? experts[(size_t)t * (size_t)p->experts_per_token] : 0;
                    c->row_expert[at] = e;
                    m->expert_mask |= 1ull << (e % 64);
                }
                m->n_tokens += rows;
                pikv_page_touch(c, id);
                c->devs[m->dev].tokens += rows;
                sh->tokens += rows;
                done += rows;
            }
        }
        sl->next_index += n;
        sl->n_tokens += n;
        c->layer_tokens[layer] += n;
        c->tokens += n;
        c->appends++;
        /* move the filled pages to their quantized slots */
        for (int64_t i = 0; i < n_full; i++) {
            pikv_page_meta *m = &c->pages[plan.full_ids[i]];
            pikv_page_pool *open_pool = &c->devs[m->dev], *qpool = &c->qdevs[m->dev];
            pikv_pool_give(open_pool, m->slot);
            open_pool->pages_used--;
            open_pool->tokens -= m->n_tokens;
            m->slot = plan.qslots[i];
            m->quant = 1;
            pikv_page_touch(c, plan.full_ids[i]);
            qpool->pages_used++;
            qpool->tokens += m->n_tokens;
            c->layer_qpages[layer]++;
        }
        double *le = c->layer_qerr + (size_t)layer * 5;
        for (int j = 0; j < 4; j++) le[j] += qerr[j];
        le[4] = qerr[4] > le[4] ? qerr[4] : le[4];
        pikv_evict_to_budget(c, layer, seq); /* allocates nothing: cannot fail */
    }
    pikv_host_free(ctx, plan.writes);
    pikv_host_free(ctx, plan.write_dev);
    pikv_host_free(ctx, plan.full_ids);
    pikv_host_free(ctx, plan.new_ids);
    pikv_host_free(ctx, ints);
    pikv_host_free(ctx, host_kv);
    return st;
}

pikv_status pikv_cache_append(pikv_cache *c, int32_t layer, int32_t seq, int32_t n, const float *k,
                              const float *v, const int32_t *positions, const int32_t *experts)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    if (c->comm) return pikv_dist_append(c, "pikv_cache_append", layer, seq, n, k, v, positions, experts);
    return pikv_append_tokens(c, "pikv_cache_append", layer, seq, n, NULL, k, v, NULL, positions, experts, false);
}

pikv_status pikv_cache_append_device(pikv_cache *c, int32_t layer, int32_t seq, int32_t n, int32_t device,
                                     const float *k, const float *v, const int32_t *positions,
                                     const int32_t *experts)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    pikv_device *src;
    PIKV_RETURN_ERROR_IF(c->comm, c->ctx, PIKV_ERR_UNSUPPORTED,
                         "pikv_cache_append_device: zero copy into a distributed cache is not supported yet "
                         "(use pikv_cache_append)");
    PIKV_FORWARD_IF_ERROR(pikv_zero_copy_device(c->ctx, device, "pikv_cache_append_device", &src));
    return pikv_append_tokens(c, "pikv_cache_append_device", layer, seq, n, src, k, v, NULL, positions, experts,
                              false);
}
