/* Cache creation, parameters, page ids and statistics. */
#include "cache-impl.h"
#include "comm.h"

#include <math.h>
#include <string.h>

void pikv_page_layout_init(pikv_page_layout *L, int32_t page_size, int32_t n_kv_heads,
                           int32_t head_dim, pikv_dtype dtype, int32_t group)
{
    memset(L, 0, sizeof *L);
    const uint64_t ps = (uint64_t)page_size, kvh = (uint64_t)n_kv_heads, hd = (uint64_t)head_dim;
    L->page_size = page_size;
    L->n_kv_heads = n_kv_heads;
    L->head_dim = head_dim;
    L->dtype = dtype;
    switch (dtype) {
    case PIKV_DTYPE_F32: L->elem_size = 4; L->row_bytes = hd * 4; break;
    case PIKV_DTYPE_F16: L->elem_size = 2; L->row_bytes = hd * 2; break;
    case PIKV_DTYPE_INT8: L->row_bytes = hd; break;
    case PIKV_DTYPE_INT4: L->row_bytes = (hd + 1) / 2; break;
    }
    /* Each KV head's K rows, then its V rows, are one contiguous block: a read
       of one head of a page (per-head selection) is one run of memory. */
    const uint64_t block = ps * L->row_bytes;
    L->head_stride = 2 * block;
    L->data_bytes = L->head_stride * kvh;
    const uint64_t bounds = kvh * hd * sizeof(float);
    L->k_offset = 0;
    L->v_offset = block;
    uint64_t at = (L->data_bytes + 15) / 16 * 16; /* f32 bounds stay aligned */
    L->kmin_offset = at;
    L->kmax_offset = at + bounds;
    at += 2 * bounds;
    if (pikv_dtype_quantized(dtype)) {
        L->group = group;
        L->k_groups = (int32_t)((ps + (uint64_t)group - 1) / (uint64_t)group);
        L->v_groups = (int32_t)((hd + (uint64_t)group - 1) / (uint64_t)group);
        const uint64_t kmeta = kvh * (uint64_t)L->k_groups * hd * 2, vmeta = kvh * ps * (uint64_t)L->v_groups * 2;
        L->kscale_offset = at;
        L->kzero_offset = at + kmeta;
        L->vscale_offset = at + 2 * kmeta;
        L->vzero_offset = at + 2 * kmeta + vmeta;
        L->scale_bytes = 2 * kmeta + 2 * vmeta;
        at += L->scale_bytes;
    }
    L->page_bytes = (at + 63) / 64 * 64;
}

pikv_cache_params pikv_cache_default_params(void)
{
    pikv_cache_params p;
    memset(&p, 0, sizeof p);
    p.n_layers = 1;
    p.n_q_heads = 8;
    p.n_kv_heads = 8;
    p.head_dim = 128;
    p.n_experts = 1;
    p.experts_per_token = 1;
    p.page_size = 16;
    p.dtype = PIKV_DTYPE_F16;
    p.quant_group = 32;
    p.capacity_tokens = 1 << 20;
    p.max_sequences = 64;
    p.placement = PIKV_PLACEMENT_EXPERT;
    p.select.mode = PIKV_SELECT_ALL;
    p.select.token_budget = 1024;
    p.select.sink_tokens = 4;
    p.select.recent_tokens = 64;
    p.budget.mode = PIKV_BUDGET_NONE;
    p.budget.pyramid_beta = 4.0f;
    p.evict.policy = PIKV_EVICT_NONE;
    p.evict.alpha_attention = 0.6f;
    p.evict.alpha_recency = 0.2f;
    p.evict.alpha_frequency = 0.2f;
    p.route.lambda = 0.0f;
    p.route.miss_decay = 0.9f;
    p.tiers.numa_node = -1;
    p.tiers.prefetch = 1;
    return p;
}

static pikv_status validate_params(pikv_context *ctx, const pikv_cache_params *p)
{
#define CHECK_RANGE(field, lo, hi)                                                         \
    PIKV_RETURN_ERROR_IF((p->field) < (lo) || (p->field) > (hi), ctx, PIKV_ERR_INVALID_ARGUMENT, \
                         #field " = %lld is outside %lld..%lld", (long long)(p->field),      \
                         (long long)(lo), (long long)(hi))
    CHECK_RANGE(n_layers, 1, 4096);
    CHECK_RANGE(n_kv_heads, 1, 1024);
    CHECK_RANGE(n_q_heads, 1, 8192);
    CHECK_RANGE(head_dim, 1, 1024);
    CHECK_RANGE(n_experts, 1, 65536);
    CHECK_RANGE(experts_per_token, 1, p->n_experts);
    CHECK_RANGE(page_size, 1, 4096);
    CHECK_RANGE(capacity_tokens, 1, INT32_MAX);
    CHECK_RANGE(quant_group, 1, 1024);
    CHECK_RANGE(max_sequences, 1, 1 << 20);
    CHECK_RANGE(n_shards, 0, 65536);
    CHECK_RANGE(hash_tokens, 0, INT32_MAX);
    CHECK_RANGE(n_devices, 0, PIKV_MAX_DEVICES);
#undef CHECK_RANGE
    PIKV_RETURN_ERROR_IF(p->n_q_heads % p->n_kv_heads != 0, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "n_q_heads = %d is not a multiple of n_kv_heads = %d", p->n_q_heads,
                         p->n_kv_heads);
    PIKV_RETURN_ERROR_IF((unsigned)p->dtype > PIKV_DTYPE_INT4, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "dtype = %d is not a pikv_dtype", (int)p->dtype);
    PIKV_RETURN_ERROR_IF(p->placement != PIKV_PLACEMENT_EXPERT && p->placement != PIKV_PLACEMENT_HASH &&
                             p->placement != PIKV_PLACEMENT_BALANCED,
                         ctx, PIKV_ERR_INVALID_ARGUMENT, "placement = %d is not a pikv_placement",
                         (int)p->placement);
    PIKV_RETURN_ERROR_IF(!(p->attn_scale >= 0.0f) || isinf(p->attn_scale), ctx,
                         PIKV_ERR_INVALID_ARGUMENT, "attn_scale = %g must be finite and >= 0 (0 = default)",
                         (double)p->attn_scale);
    PIKV_RETURN_ERROR_IF(p->n_devices > 0 && !p->devices, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "n_devices = %d but devices is NULL", p->n_devices);
    PIKV_RETURN_ERROR_IF(p->n_devices == 0 && p->devices, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "devices is set but n_devices = 0");
    if (p->tiers.enabled) { /* the byte fields are checked against the page layouts in pikv_tier_create */
        PIKV_RETURN_ERROR_IF(p->tiers.numa_node < -1, ctx, PIKV_ERR_INVALID_ARGUMENT,
                             "tiers.numa_node = %d is neither -1 (no binding) nor a node index", p->tiers.numa_node);
        PIKV_RETURN_ERROR_IF(p->tiers.staging_pages < 0, ctx, PIKV_ERR_INVALID_ARGUMENT,
                             "tiers.staging_pages = %d is negative (0 = automatic)", p->tiers.staging_pages);
    }
    return PIKV_OK;
}

/* The parameters and this process's devices (ids[*n_devs]). */
static pikv_status check_create(pikv_context *ctx, const pikv_cache_params *p, int32_t *ids, int32_t *n_devs_out)
{
    PIKV_FORWARD_IF_ERROR(validate_params(ctx, p));
    if (p->comm) {
        PIKV_RETURN_ERROR_IF(p->tiers.enabled, ctx, PIKV_ERR_UNSUPPORTED,
                             "pikv_cache_create: memory tiers over ranks are not supported yet (tiers.enabled = %d "
                             "with params.comm set: demotion and fetches are not collective)", p->tiers.enabled);
        /* the policies that need data only the page's owner has, or that move pages */
        PIKV_RETURN_ERROR_IF(p->select.mode & PIKV_SELECT_QUEST, ctx, PIKV_ERR_UNSUPPORTED,
                             "pikv_cache_create: QUEST selection over ranks is not supported yet (page scores "
                             "live with the pages)");
        PIKV_RETURN_ERROR_IF(p->evict.policy == PIKV_EVICT_H2O || p->evict.policy == PIKV_EVICT_UTILITY, ctx,
                             PIKV_ERR_UNSUPPORTED,
                             "pikv_cache_create: %s eviction over ranks is not supported yet (attention mass is "
                             "measured where the pages are)", p->evict.policy == PIKV_EVICT_H2O ? "H2O" : "utility");
    }
    int32_t n_devs = p->n_devices > 0 ? p->n_devices : ctx->n_devices;
    *n_devs_out = n_devs;
    for (int32_t i = 0; i < n_devs; i++) {
        ids[i] = p->n_devices > 0 ? p->devices[i] : i;
        PIKV_RETURN_ERROR_IF(ids[i] < 0 || ids[i] >= ctx->n_devices, ctx, PIKV_ERR_OUT_OF_RANGE,
                             "devices[%d] = %d is outside 0..%d", i, ids[i], ctx->n_devices - 1);
        for (int32_t j = 0; j < i; j++)
            PIKV_RETURN_ERROR_IF(ids[j] == ids[i], ctx, PIKV_ERR_INVALID_ARGUMENT,
                                 "devices[%d] = devices[%d] = %d: a device may be listed once", j, i,
                                 ids[i]);
        pikv_device *dev = ctx->devices[ids[i]];
        static const pikv_op needed[] = {PIKV_OP_APPEND, PIKV_OP_PAGE_COPY, PIKV_OP_ATTENTION, PIKV_OP_SCORE};
        for (size_t k = 0; k < sizeof needed / sizeof needed[0]; k++)
            PIKV_RETURN_ERROR_IF(!dev->iface->supports_op(dev, needed[k], p->dtype), ctx,
                                 PIKV_ERR_UNSUPPORTED, "device %s does not support op %d with dtype %d",
                                 dev->info.name, (int)needed[k], (int)p->dtype);
        PIKV_RETURN_ERROR_IF(pikv_dtype_quantized(p->dtype) && !dev->iface->supports_op(dev, PIKV_OP_QUANTIZE, p->dtype),
                             ctx, PIKV_ERR_UNSUPPORTED, "device %s cannot quantize pages to dtype %d",
                             dev->info.name, (int)p->dtype);
    }
    return PIKV_OK;
}

pikv_status pikv_cache_create(pikv_context *ctx, const pikv_cache_params *params, pikv_cache **out)
{
    if (out) *out = NULL;
    if (!ctx) return PIKV_ERR_INVALID_ARGUMENT;
    PIKV_RETURN_ERROR_IF(!params || !out, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "pikv_cache_create: %s is NULL", !params ? "params" : "out");
    const pikv_cache_params *p = params;
    int32_t ids[PIKV_MAX_DEVICES], n_local = 0;
    pikv_status st = check_create(ctx, p, ids, &n_local);
    /* over ranks: every rank takes part in the exchange, with its own verdict */
    void *infos = NULL;
    if (p->comm) st = pikv_dist_create_exchange(ctx, p, ids, n_local, st, &infos);
    if (st != PIKV_OK) return st;
    const int32_t n_devs = p->comm ? pikv_comm_size(p->comm) * n_local : n_local;
    uint64_t limits[PIKV_MAX_DEVICES];

    pikv_cache *c = pikv_host_calloc(ctx, 1, sizeof *c);
    if (!c) {
        pikv_host_free(ctx, infos);
        st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "cache: allocation failed");
        return p->comm ? pikv_dist_sync_status_comm(p->comm, ctx, "pikv_cache_create", st) : st;
    }
    c->ctx = ctx;
    c->params = *p;
    c->params.devices = NULL; /* the caller's array is not kept */
    c->params.n_devices = n_devs;
    for (int32_t d = 0; d < n_devs; d++) /* context indices of this rank's devices, -1 for other ranks' */
        c->device_ids[d] = !p->comm ? ids[d] : d / n_local == pikv_comm_rank(p->comm) ? ids[d % n_local] : -1;
    c->n_devs = n_devs;
    c->comm = p->comm;
    c->rank = p->comm ? pikv_comm_rank(p->comm) : 0;
    c->n_ranks = p->comm ? pikv_comm_size(p->comm) : 1;
    c->n_local = n_local;
    if (p->n_experts == 1)
        c->n_shards = p->n_shards > 0 ? p->n_shards : n_devs;
    else if (p->placement == PIKV_PLACEMENT_HASH)
        c->n_shards = p->n_shards > 0 ? p->n_shards : p->n_experts;
    else
        c->n_shards = p->n_experts;
    c->params.n_shards = c->n_shards;
    if (c->params.hash_tokens == 0) c->params.hash_tokens = c->n_shards;
    c->scale = p->attn_scale > 0.0f ? p->attn_scale : 1.0f / sqrtf((float)p->head_dim);
    /* Quantized caches keep open pages in f16 (the residual window) and full pages
       in a second pool of the quantized layout. */
    const bool quant = pikv_dtype_quantized(p->dtype);
    pikv_page_layout_init(&c->layout, p->page_size, p->n_kv_heads, p->head_dim, quant ? PIKV_DTYPE_F16 : p->dtype,
                          p->quant_group);
    if (quant) pikv_page_layout_init(&c->qlayout, p->page_size, p->n_kv_heads, p->head_dim, p->dtype, p->quant_group);

    c->devs = pikv_host_calloc(ctx, (size_t)n_devs, sizeof *c->devs);
    c->qdevs = quant ? pikv_host_calloc(ctx, (size_t)n_devs, sizeof *c->qdevs) : NULL;
    c->layer_qerr = pikv_host_calloc(ctx, (size_t)p->n_layers * 5, sizeof(double));
    c->shards = pikv_host_calloc(ctx, (size_t)p->n_layers * (size_t)c->n_shards, sizeof *c->shards);
    c->seqs = pikv_host_calloc(ctx, (size_t)p->max_sequences, sizeof *c->seqs);
    c->layer_tokens = pikv_host_calloc(ctx, (size_t)p->n_layers, sizeof *c->layer_tokens);
    const size_t nl = (size_t)p->n_layers, nle = nl * (size_t)p->n_experts;
    c->layer_budget = pikv_host_calloc(ctx, nl, sizeof(int64_t));
    c->layer_clock = pikv_host_calloc(ctx, nl, sizeof(int64_t));
    c->layer_pages = pikv_host_calloc(ctx, nl, sizeof(int64_t));
    c->layer_qpages = pikv_host_calloc(ctx, nl, sizeof(int64_t));
    c->layer_evicted = pikv_host_calloc(ctx, nl, sizeof(int64_t));
    c->layer_last_bytes = pikv_host_calloc(ctx, nl, sizeof(uint64_t));
    c->layer_last_pages = pikv_host_calloc(ctx, nl, sizeof(int64_t));
    c->expert_misses = pikv_host_calloc(ctx, nle, sizeof(double));
    c->expert_routed = pikv_host_calloc(ctx, nle, sizeof(int64_t));
    c->expert_top1 = pikv_host_calloc(ctx, nle, sizeof(int64_t));
    c->last_recall = c->last_output_error = c->last_hit_rate = -1.0;
    if (!c->devs || (quant && !c->qdevs) || !c->layer_qerr || !c->layer_qpages || !c->shards || !c->seqs || !c->layer_tokens || !c->layer_budget || !c->layer_clock ||
        !c->layer_pages || !c->layer_evicted || !c->layer_last_bytes || !c->layer_last_pages ||
        !c->expert_misses || !c->expert_routed || !c->expert_top1)
        st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "cache: allocation of tables failed");
    if (st == PIKV_OK && p->comm) {
        st = pikv_dist_create(c, infos, ids, n_local, limits);
        infos = NULL;
    }
    for (int32_t d = 0; st == PIKV_OK && !p->comm && d < n_devs; d++) {
        c->devs[d].dev = ctx->devices[ids[d]];
        limits[d] = c->devs[d].dev->info.caps.memory_limit;
    }
    if (p->comm) st = pikv_dist_sync_status_comm(p->comm, ctx, "pikv_cache_create", st);
    if (st != PIKV_OK) {
        pikv_host_free(ctx, infos);
        pikv_cache_free(c);
        return st;
    }
    for (int32_t d = 0; d < n_devs; d++) {
        pikv_page_pool *pool = &c->devs[d];
        /* Chunks of about 1 MiB, rarely allocated; on a device with a memory limit at
           most 1/16 of it, so a small limit still holds pages and the last chunk
           wastes little. */
        uint64_t target = 1u << 20;
        const uint64_t limit = limits[d]; /* the owner's: every rank sizes the chunks alike */
        if (limit > 0 && limit / 16 < target) target = limit / 16;
        /* a device budget of the tiers: chunks of at most an eighth of it, so what is
           allocated stays near what the budget lets the device hold */
        if (p->tiers.enabled && p->tiers.device_bytes > 0 && p->tiers.device_bytes / 8 < target)
            target = p->tiers.device_bytes / 8;
        uint64_t per = target / c->layout.page_bytes;
        if (per < 1) per = 1;
        if (per > 4096) per = 4096;
        pool->pages_per_chunk = (uint32_t)per;
        pool->view.layout = &c->layout;
        pool->view.pages_per_chunk = (uint32_t)per;
        if (quant) {
            pikv_page_pool *qp = &c->qdevs[d];
            qp->dev = pool->dev;
            uint64_t qper = target / c->qlayout.page_bytes;
            qp->pages_per_chunk = (uint32_t)(qper < 1 ? 1 : qper > 4096 ? 4096 : qper);
            qp->view.layout = &c->qlayout;
            qp->view.pages_per_chunk = qp->pages_per_chunk;
            pool->view.quant = &qp->view;
        }
    }
    pikv_placement_init(c);
    pikv_stream_cache_init(c);
    st = pikv_policies_init(c);
    if (st == PIKV_OK) st = pikv_tier_create(c);
    if (p->comm) st = pikv_dist_sync_status_comm(p->comm, ctx, "pikv_cache_create", st);
    if (st != PIKV_OK) {
        pikv_cache_free(c);
        return st;
    }
    *out = c;
    return PIKV_OK;
}

void pikv_cache_free(pikv_cache *c)
{
    if (!c) return;
    pikv_context *ctx = c->ctx;
    pikv_tier_free(c); /* joins the I/O thread, closes the disk files */
    if (c->seqs)
        for (int32_t q = 0; q < c->params.max_sequences; q++) {
            pikv_seq *s = &c->seqs[q];
            if (!s->active) continue;
            for (int32_t l = 0; l < c->params.n_layers; l++)
                for (int32_t k = 0; k < c->n_shards; k++) pikv_ring_free(ctx, &s->layers[l].rings[k]);
            pikv_host_free(ctx, s->layers);
        }
    if (c->devs)
        for (int32_t d = 0; d < c->n_devs; d++)
            if (c->devs[d].dev) pikv_pool_free(&c->devs[d]);
    if (c->qdevs)
        for (int32_t d = 0; d < c->n_devs; d++)
            if (c->qdevs[d].dev) pikv_pool_free(&c->qdevs[d]);
    pikv_dist_free(c); /* remote devices, after their pools */
    pikv_host_free(ctx, c->devs);
    pikv_host_free(ctx, c->qdevs);
    pikv_host_free(ctx, c->layer_qerr);
    pikv_host_free(ctx, c->layer_qpages);
    pikv_host_free(ctx, c->shards);
    pikv_host_free(ctx, c->seqs);
    pikv_host_free(ctx, c->layer_tokens);
    pikv_host_free(ctx, c->layer_budget);
    pikv_host_free(ctx, c->layer_clock);
    pikv_host_free(ctx, c->layer_pages);
    pikv_host_free(ctx, c->layer_evicted);
    pikv_host_free(ctx, c->layer_last_bytes);
    pikv_host_free(ctx, c->layer_last_pages);
    pikv_host_free(ctx, c->expert_misses);
    pikv_host_free(ctx, c->expert_routed);
    pikv_host_free(ctx, c->expert_top1);
    pikv_host_free(ctx, c->row_expert);
    pikv_host_free(ctx, c->pages);
    pikv_host_free(ctx, c->positions);
    pikv_host_free(ctx, c->indices);
    pikv_host_free(ctx, c->free_ids);
    pikv_host_free(ctx, c);
}

pikv_context *pikv_cache_context(const pikv_cache *c) { return c ? c->ctx : NULL; }

/* ---- zero copy: the source device of pikv_cache_append_device / attend_device ---- */

pikv_status pikv_zero_copy_device(pikv_context *ctx, int32_t device, const char *fn, pikv_device **out)
{
    *out = NULL;
    PIKV_RETURN_ERROR_IF(device < 0 || device >= ctx->n_devices, ctx, PIKV_ERR_OUT_OF_RANGE,
                         "%s: device %d is outside 0..%d", fn, device, ctx->n_devices - 1);
    pikv_device *dev = ctx->devices[device];
    const pikv_device_iface *f = dev->iface;
    PIKV_RETURN_ERROR_IF(!f->memory_read || !f->memory_write || !f->find_out_of_range, ctx, PIKV_ERR_UNSUPPORTED,
                         "%s: device %d (%s) of backend %s has no memory addresses an engine could hold: "
                         "zero copy is unsupported there (use the host API)", fn, device, dev->info.name,
                         pikv_backend_name(dev->info.backend));
    *out = dev;
    return PIKV_OK;
}

pikv_status pikv_device_find_out_of_range(pikv_device *dev, const float *ptr, int64_t n, float limit,
                                          int64_t *first, float *value)
{
    *first = -1;
    *value = 0.0f;
    if (n <= 0) return PIKV_OK;
    PIKV_FORWARD_IF_ERROR(dev->iface->find_out_of_range(dev, ptr, n, limit, first));
    if (*first >= n) /* a backend bug: keep the message honest */
        return PIKV_FAIL(dev->ctx, PIKV_ERR_INTERNAL, "device %s: find_out_of_range gave index %lld of %lld",
                         dev->info.name, (long long)*first, (long long)n);
    if (*first >= 0) PIKV_FORWARD_IF_ERROR(dev->iface->memory_read(dev, ptr + *first, value, sizeof *value));
    return PIKV_OK;
}

/* ---- page ids ------------------------------------------------------------------ */

pikv_status pikv_page_ids_reserve(pikv_cache *c, int64_t n)
{
    int64_t spare = c->n_free_ids + (c->pages_cap - c->pages_high);
    if (n <= spare) return PIKV_OK;
    int64_t need = c->pages_high + (n - c->n_free_ids);
    PIKV_RETURN_ERROR_IF(need > (int64_t)UINT32_MAX, c->ctx, PIKV_ERR_CAPACITY,
                         "%lld page ids exceed the id range", (long long)need);
    /* Grow all parallel arrays to one new capacity; each step only adds room. */
    int64_t cap = c->pages_cap > 0 ? c->pages_cap : 64;
    while (cap < need) cap *= 2;
    const size_t ps = (size_t)c->params.page_size;
    int64_t cap_meta = c->pages_cap, cap_free = c->free_ids_cap;
    int64_t cap_pos = c->pages_cap * (int64_t)ps, cap_idx = c->pages_cap * (int64_t)ps;
    int64_t cap_exp = c->pages_cap * (int64_t)ps;
    PIKV_FORWARD_IF_ERROR(pikv_host_reserve(c->ctx, (void **)&c->pages, sizeof *c->pages, &cap_meta, cap));
    PIKV_FORWARD_IF_ERROR(pikv_host_reserve(c->ctx, (void **)&c->positions, sizeof *c->positions, &cap_pos,
                                            cap * (int64_t)ps));
    PIKV_FORWARD_IF_ERROR(pikv_host_reserve(c->ctx, (void **)&c->indices, sizeof *c->indices, &cap_idx,
                                            cap * (int64_t)ps));
    PIKV_FORWARD_IF_ERROR(pikv_host_reserve(c->ctx, (void **)&c->row_expert, sizeof *c->row_expert, &cap_exp,
                                            cap * (int64_t)ps));
    PIKV_FORWARD_IF_ERROR(pikv_host_reserve(c->ctx, (void **)&c->free_ids, sizeof *c->free_ids, &cap_free, cap));
    c->free_ids_cap = cap_free;
    /* pikv_host_reserve may round capacities up differently: use the smallest */
    int64_t got = cap_meta;
    if (cap_pos / (int64_t)ps < got) got = cap_pos / (int64_t)ps;
    if (cap_idx / (int64_t)ps < got) got = cap_idx / (int64_t)ps;
    if (cap_exp / (int64_t)ps < got) got = cap_exp / (int64_t)ps;
    c->pages_cap = got;
    return PIKV_OK;
}

uint32_t pikv_page_id_take(pikv_cache *c)
{
    if (c->n_free_ids > 0) return c->free_ids[--c->n_free_ids];
    return (uint32_t)c->pages_high++;
}

void pikv_page_unref(pikv_cache *c, uint32_t id)
{
    pikv_page_meta *m = &c->pages[id];
    if (--m->refs > 0) return;
    if (m->quant) c->layer_qpages[m->layer]--;
    const bool demoted = m->tier != PIKV_TIER_DEVICE;
    if (c->tier) pikv_tier_page_freed(c, id); /* staging copies; a demoted page's tier slots and bounds */
    if (!demoted) {
        pikv_page_pool *pool = pikv_page_pool_of(c, m);
        pikv_pool_give(pool, m->slot);
        pool->pages_used--;
        pool->tokens -= m->n_tokens;
    }
    pikv_shard *sh = pikv_cache_shard(c, m->layer, m->shard);
    sh->pages--;
    sh->tokens -= m->n_tokens;
    c->layer_tokens[m->layer] -= m->n_tokens;
    c->layer_pages[m->layer]--;
    c->tokens -= m->n_tokens;
    c->pages_live--;
    c->free_ids[c->n_free_ids++] = id;
}

/* ---- stats ---------------------------------------------------------------------- */

pikv_status pikv_cache_get_params(const pikv_cache *c, pikv_cache_params *out)
{
    if (!c || !out) return PIKV_ERR_INVALID_ARGUMENT;
    *out = c->params;
    out->devices = NULL; /* the caller's array at create: not kept */
    return PIKV_OK;
}

pikv_status pikv_cache_get_stats(const pikv_cache *c, pikv_cache_stats *out)
{
    if (!c || !out) return PIKV_ERR_INVALID_ARGUMENT;
    memset(out, 0, sizeof *out);
    out->tokens = c->tokens;
    out->pages = c->pages_live;
    for (int32_t d = 0; d < c->n_devs; d++) {
        out->bytes_allocated += c->devs[d].bytes_allocated;
        out->bytes_used += (uint64_t)c->devs[d].pages_used * c->layout.page_bytes;
        if (c->qdevs) {
            out->bytes_allocated += c->qdevs[d].bytes_allocated;
            out->bytes_used += (uint64_t)c->qdevs[d].pages_used * c->qlayout.page_bytes;
        }
    }
    out->sequences = c->n_seqs;
    out->n_devices = c->n_devs;
    out->n_shards = c->n_shards;
    out->page_bytes = c->layout.page_bytes;
    out->quant_page_bytes = c->qdevs ? c->qlayout.page_bytes : 0;
    out->last_pages_read = c->last_pages_read;
    out->last_bytes_read = c->last_bytes_read;
    out->last_tokens_read = c->last_tokens_read;
    out->bytes_read = c->bytes_read;
    out->last_recall = c->last_recall;
    out->last_output_error = c->last_output_error;
    out->last_hit_rate = c->last_hit_rate;
    out->evicted_pages = c->evicted_pages;
    out->evicted_tokens = c->evicted_tokens;
    out->appends = c->appends;
    out->attends = c->attends;
    out->last_plan_s = c->last_plan_s;
    out->last_score_s = c->last_score_s;
    out->last_topk_s = c->last_topk_s;
    out->last_attention_s = c->last_attention_s;
    out->last_merge_s = c->last_merge_s;
    return PIKV_OK;
}

pikv_status pikv_cache_get_device_stats(const pikv_cache *c, int32_t i, pikv_cache_device_stats *out)
{
    if (!c || !out) return PIKV_ERR_INVALID_ARGUMENT;
    PIKV_RETURN_ERROR_IF(i < 0 || i >= c->n_devs, c->ctx, PIKV_ERR_OUT_OF_RANGE,
                         "cache device %d is outside 0..%d", i, c->n_devs - 1);
    const pikv_page_pool *pool = &c->devs[i];
    memset(out, 0, sizeof *out);
    out->device = c->device_ids[i];
    out->shards = pool->shards;
    out->tokens = pool->tokens;
    out->pages = pool->pages_used;
    out->bytes_allocated = pool->bytes_allocated;
    out->bytes_used = (uint64_t)pool->pages_used * c->layout.page_bytes;
    out->bytes_open_pages = out->bytes_used;
    out->last_bytes_read = pool->last_bytes_read;
    out->bytes_read = pool->bytes_read;
    if (c->qdevs) {
        const pikv_page_pool *q = &c->qdevs[i];
        const pikv_page_layout *Q = &c->qlayout;
        const uint64_t n = (uint64_t)q->pages_used;
        out->tokens += q->tokens;
        out->pages += q->pages_used;
        out->bytes_allocated += q->bytes_allocated;
        out->bytes_used += n * Q->page_bytes;
        out->quantized_pages = q->pages_used;
        out->bytes_quant_data = n * Q->data_bytes;
        out->bytes_quant_scales = n * Q->scale_bytes;
        out->bytes_quant_other = n * (Q->page_bytes - Q->data_bytes - Q->scale_bytes);
    }
    return PIKV_OK;
}

pikv_status pikv_cache_shard_info(const pikv_cache *c, int32_t layer, int32_t shard, int32_t *device,
                                  int64_t *pages, int64_t *tokens)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    PIKV_RETURN_ERROR_IF(layer < 0 || layer >= c->params.n_layers, c->ctx, PIKV_ERR_OUT_OF_RANGE,
                         "layer %d is outside 0..%d", layer, c->params.n_layers - 1);
    PIKV_RETURN_ERROR_IF(shard < 0 || shard >= c->n_shards, c->ctx, PIKV_ERR_OUT_OF_RANGE,
                         "shard %d is outside 0..%d", shard, c->n_shards - 1);
    const pikv_shard *sh = &c->shards[(size_t)layer * (size_t)c->n_shards + (size_t)shard];
    if (device) *device = sh->dev;
    if (pages) *pages = sh->pages;
    if (tokens) *tokens = sh->tokens;
    return PIKV_OK;
}

pikv_status pikv_cache_trim(pikv_cache *c)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    if (c->comm) return pikv_cache_compact_ranks(c);
    for (int32_t d = 0; d < c->n_devs; d++) PIKV_FORWARD_IF_ERROR(pikv_cache_compact_device(c, d));
    return PIKV_OK;
}

pikv_status pikv_cache_get_layer_stats(const pikv_cache *c, int32_t layer, pikv_layer_stats *out)
{
    if (!c || !out) return PIKV_ERR_INVALID_ARGUMENT;
    PIKV_RETURN_ERROR_IF(layer < 0 || layer >= c->params.n_layers, c->ctx, PIKV_ERR_OUT_OF_RANGE,
                         "pikv_cache_get_layer_stats: layer %d is outside 0..%d", layer,
                         c->params.n_layers - 1);
    memset(out, 0, sizeof *out);
    out->tokens = c->layer_tokens[layer];
    out->pages = c->layer_pages[layer];
    const int64_t q = c->layer_qpages[layer];
    out->bytes_used = (uint64_t)(c->layer_pages[layer] - q) * c->layout.page_bytes +
                      (uint64_t)q * c->qlayout.page_bytes;
    out->quantized_pages = q;
    const double *e = c->layer_qerr + (size_t)layer * 5;
    out->key_rel_error = c->qdevs ? (e[1] > 0 ? sqrt(e[0] / e[1]) : 0.0) : -1.0;
    out->value_rel_error = c->qdevs ? (e[3] > 0 ? sqrt(e[2] / e[3]) : 0.0) : -1.0;
    out->max_abs_error = c->qdevs ? e[4] : -1.0;
    out->budget_tokens = c->layer_budget[layer];
    out->evicted_pages = c->layer_evicted[layer];
    out->last_bytes_read = c->layer_last_bytes[layer];
    out->last_pages_read = c->layer_last_pages[layer];
    return PIKV_OK;
}
