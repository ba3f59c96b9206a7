/*
 * sequences: sequence life cycle and accounting.
 *  - appends across page and ring boundaries (hundreds of pages in one shard), with
 *    sequences interleaved in a shard and removed in the middle;
 *  - pikv_seq_remove gives back tokens / pages / bytes_used;
 *  - pikv_seq_copy_prefix: dst holds exactly the first n tokens, full pages are shared
 *    (page count), src is unaffected, both diverge correctly, and dst survives src's removal;
 *  - stats add up: device stats sum to the totals, tokens are the appended tokens, bytes_used
 *    is pages times one page size, each device's memory_used grows by exactly the cache's
 *    bytes_allocated there and returns after pikv_cache_free;
 *  - placement: EXPERT puts tokens in the shard of their top-1 expert, shards dealt
 *    round-robin; HASH follows the formula of pikv.h; dense models use position blocks;
 *    BALANCED: a new shard goes to the least-loaded device and rebalance does not make the
 *    balance worse nor change outputs.
 */
#include "test-util.h"

static const char *pl_name(pikv_placement p)
{
    return p == PIKV_PLACEMENT_EXPERT ? "expert" : p == PIKV_PLACEMENT_HASH ? "hash" : "balanced";
}

/* The shard of token t (index in its sequence) with top-1 expert e, per pikv.h. */
static int shard_of(const pikv_cache_params *p, int n_shards, int hash_tokens, int64_t t, int e)
{
    if (p->n_experts == 1)
        return (int)((t / p->page_size) % n_shards);
    if (p->placement == PIKV_PLACEMENT_HASH)
        return (int)(((t % hash_tokens) ^ (int64_t)(e % p->n_experts)) % n_shards);
    return e;
}

static int expected_n_shards(const pikv_cache_params *p, int n_devices)
{
    if (p->n_experts == 1)
        return p->n_shards > 0 ? p->n_shards : n_devices;
    if (p->placement == PIKV_PLACEMENT_HASH)
        return p->n_shards > 0 ? p->n_shards : p->n_experts;
    return p->n_experts;
}

/* Per (layer, shard, seq) token counts of the first n tokens (n < 0: all) of a model. */
static void shard_counts(const tu_model *m, const pikv_cache_params *p, int n_shards,
                         int hash_tokens, int layer, int seq, int64_t n, int64_t *counts)
{
    const tu_seq *s = tu_model_seq(m, layer, seq);
    if (n < 0 || n > s->n)
        n = s->n;
    for (int i = 0; i < n_shards; i++)
        counts[i] = 0;
    for (int64_t t = 0; t < n; t++)
        counts[shard_of(p, n_shards, hash_tokens, t, s->ex[(size_t)t * m->ept])]++;
}

static int64_t ceil_div(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

typedef struct acct {
    uint64_t mem0[TU_MAXDEV]; /* memory_used of each context device before the cache */
    uint64_t page_bytes;      /* established from the first non-empty stats */
} acct;

/*
 * Checks every accounting invariant of a cache without shared pages against the model.
 */
static void check_accounting(pikv_cache *c, const tu_model *m, const pikv_cache_params *p,
                             acct *a, const char *where)
{
    pikv_context *ctx = pikv_cache_context(c);
    pikv_cache_stats st;
    if (!CHECK_OK(pikv_cache_get_stats(c, &st)))
        return;
    int nd = st.n_devices;
    int ns = st.n_shards;
    int ht = p->hash_tokens > 0 ? p->hash_tokens : ns;
    CHECKF(ns == expected_n_shards(p, nd), "%s: n_shards %d, expected %d", where, ns,
           expected_n_shards(p, nd));
    if (ns <= 0 || nd <= 0 || nd > TU_MAXDEV)
        return;

    /* tokens, sequences, lengths */
    int64_t tokens = 0;
    int live = 0;
    for (int s = 0; s < m->max_seq; s++) {
        if (!m->live[s])
            continue;
        live++;
        for (int l = 0; l < m->nl; l++) {
            int64_t n = -1;
            CHECK_OK(pikv_seq_length(c, s, l, &n));
            CHECKF(n == tu_model_seq(m, l, s)->n, "%s: seq %d layer %d length %lld, expected "
                   "%lld", where, s, l, (long long)n, (long long)tu_model_seq(m, l, s)->n);
            tokens += tu_model_seq(m, l, s)->n;
        }
    }
    CHECKF(st.tokens == tokens, "%s: stats.tokens %lld, appended %lld", where,
           (long long)st.tokens, (long long)tokens);
    CHECKF(st.sequences == live, "%s: stats.sequences %d, expected %d", where, st.sequences,
           live);

    /* shards: tokens by formula, pages per sequence, device by round robin */
    int64_t *cnt = tu_xcalloc((size_t)ns, sizeof(int64_t));
    int64_t *exp_tok = tu_xcalloc((size_t)ns, sizeof(int64_t));
    int64_t *exp_pages = tu_xcalloc((size_t)ns, sizeof(int64_t));
    int64_t dev_tok[TU_MAXDEV] = {0}, dev_pages[TU_MAXDEV] = {0};
    int32_t dev_shards[TU_MAXDEV] = {0};
    int64_t total_pages = 0;
    for (int l = 0; l < m->nl; l++) {
        memset(exp_tok, 0, (size_t)ns * sizeof(int64_t));
        memset(exp_pages, 0, (size_t)ns * sizeof(int64_t));
        for (int s = 0; s < m->max_seq; s++) {
            if (!m->live[s])
                continue;
            shard_counts(m, p, ns, ht, l, s, -1, cnt);
            for (int i = 0; i < ns; i++) {
                exp_tok[i] += cnt[i];
                exp_pages[i] += ceil_div(cnt[i], p->page_size);
            }
        }
        for (int i = 0; i < ns; i++) {
            int32_t dev = -1;
            int64_t pages = -1, tok = -1;
            if (!CHECK_OK(pikv_cache_shard_info(c, l, i, &dev, &pages, &tok)))
                continue;
            CHECKF(tok == exp_tok[i], "%s: layer %d shard %d holds %lld tokens, expected %lld",
                   where, l, i, (long long)tok, (long long)exp_tok[i]);
            CHECKF(pages == exp_pages[i], "%s: layer %d shard %d has %lld pages, expected %lld",
                   where, l, i, (long long)pages, (long long)exp_pages[i]);
            total_pages += pages;
            if (p->placement != PIKV_PLACEMENT_BALANCED)
                CHECKF(dev == i % nd, "%s: layer %d shard %d on cache device %d, expected %d "
                       "(round robin)", where, l, i, dev, i % nd);
            if (tok > 0 || p->placement != PIKV_PLACEMENT_BALANCED)
                CHECKF(dev >= 0 && dev < nd, "%s: layer %d shard %d device %d", where, l, i,
                       dev);
            if (dev >= 0 && dev < nd) {
                dev_tok[dev] += tok;
                dev_pages[dev] += pages;
                dev_shards[dev]++;
            }
        }
    }
    CHECKF(st.pages == total_pages, "%s: stats.pages %lld, shards hold %lld", where,
           (long long)st.pages, (long long)total_pages);

    /* devices: sums, memory, page bytes */
    int64_t sum_tok = 0, sum_pages = 0;
    uint64_t sum_alloc = 0, sum_used = 0;
    {
        /* stats.page_bytes: the page's K+V data plus its f32 min/max bounds, padded to 64 */
        uint64_t pb = st.page_bytes;
        if (a->page_bytes == 0)
            a->page_bytes = pb;
        CHECKF(pb == a->page_bytes, "%s: page bytes %llu, earlier %llu", where,
               (unsigned long long)pb, (unsigned long long)a->page_bytes);
        uint64_t data = (uint64_t)p->page_size * p->n_kv_heads * p->head_dim * 2u *
                        (p->dtype == PIKV_DTYPE_F16 ? 2u : 4u);
        uint64_t bounds = (uint64_t)p->n_kv_heads * p->head_dim * 2u * 4u;
        CHECKF(pb >= data + bounds && pb <= data + bounds + 64 + 16 && pb % 64 == 0,
               "%s: page bytes %llu for K+V data %llu and bounds %llu", where,
               (unsigned long long)pb, (unsigned long long)data, (unsigned long long)bounds);
        CHECKF(st.bytes_used == (uint64_t)st.pages * pb, "%s: bytes_used %llu != pages %lld * %llu",
               where, (unsigned long long)st.bytes_used, (long long)st.pages, (unsigned long long)pb);
    }
    if (st.pages == 0) {
        CHECK_EQ(st.bytes_used, 0);
    }
    CHECKF(st.bytes_allocated >= st.bytes_used, "%s: allocated %llu < used %llu", where,
           (unsigned long long)st.bytes_allocated, (unsigned long long)st.bytes_used);
    int32_t n_ctx = pikv_device_count(ctx);
    int in_cache[TU_MAXDEV] = {0};
    for (int i = 0; i < nd; i++) {
        pikv_cache_device_stats ds;
        if (!CHECK_OK(pikv_cache_get_device_stats(c, i, &ds)))
            continue;
        int want_dev = p->devices ? p->devices[i] : i;
        CHECKF(ds.device == want_dev, "%s: cache device %d is context device %d, expected %d",
               where, i, ds.device, want_dev);
        if (ds.device >= 0 && ds.device < TU_MAXDEV)
            in_cache[ds.device] = 1;
        sum_tok += ds.tokens;
        sum_pages += ds.pages;
        sum_alloc += ds.bytes_allocated;
        sum_used += ds.bytes_used;
        CHECKF(ds.tokens == dev_tok[i], "%s: device %d tokens %lld, its shards hold %lld",
               where, i, (long long)ds.tokens, (long long)dev_tok[i]);
        CHECKF(ds.pages == dev_pages[i], "%s: device %d pages %lld, its shards have %lld",
               where, i, (long long)ds.pages, (long long)dev_pages[i]);
        if (p->placement != PIKV_PLACEMENT_BALANCED)
            CHECKF(ds.shards == dev_shards[i], "%s: device %d shards %d, expected %d", where, i,
                   ds.shards, dev_shards[i]);
        if (a->page_bytes)
            CHECKF(ds.bytes_used == (uint64_t)ds.pages * a->page_bytes,
                   "%s: device %d bytes_used %llu != pages %lld * %llu", where, i,
                   (unsigned long long)ds.bytes_used, (long long)ds.pages,
                   (unsigned long long)a->page_bytes);
        CHECKF(ds.bytes_allocated >= ds.bytes_used, "%s: device %d allocated < used", where, i);
        uint64_t mem = tu_mem_used(ctx, ds.device);
        CHECKF(mem - a->mem0[ds.device] == ds.bytes_allocated,
               "%s: context device %d memory_used grew by %llu, cache bytes_allocated %llu",
               where, ds.device, (unsigned long long)(mem - a->mem0[ds.device]),
               (unsigned long long)ds.bytes_allocated);
    }
    for (int d = 0; d < n_ctx && d < TU_MAXDEV; d++)
        if (!in_cache[d])
            CHECKF(tu_mem_used(ctx, d) == a->mem0[d], "%s: device %d (not used by the cache) "
                   "memory_used changed", where, d);
    CHECKF(sum_tok == st.tokens, "%s: device tokens sum %lld != %lld", where,
           (long long)sum_tok, (long long)st.tokens);
    CHECKF(sum_pages == st.pages, "%s: device pages sum %lld != %lld", where,
           (long long)sum_pages, (long long)st.pages);
    CHECKF(sum_alloc == st.bytes_allocated, "%s: device bytes_allocated sum %llu != %llu", where,
           (unsigned long long)sum_alloc, (unsigned long long)st.bytes_allocated);
    CHECKF(sum_used == st.bytes_used, "%s: device bytes_used sum %llu != %llu", where,
           (unsigned long long)sum_used, (unsigned long long)st.bytes_used);
    free(cnt);
    free(exp_tok);
    free(exp_pages);
}

static pikv_cache_params base_params(void)
{
    pikv_cache_params p = pikv_cache_default_params();
    p.n_layers = 2;
    p.n_q_heads = 4;
    p.n_kv_heads = 2;
    p.head_dim = 16;
    p.n_experts = 1;
    p.experts_per_token = 1;
    p.page_size = 4;
    p.dtype = PIKV_DTYPE_F32;
    p.capacity_tokens = 1 << 20;
    p.max_sequences = 8;
    p.placement = PIKV_PLACEMENT_EXPERT;
    return p;
}

/* ---------------------------------------------------------------------- */
/* 1. Page and ring boundaries                                            */
/* ---------------------------------------------------------------------- */
static void test_ring(int page_size, pikv_dtype dt)
{
    tu_set_case("ring: dense, 1 device, page_size %d, %s", page_size,
                dt == PIKV_DTYPE_F16 ? "f16" : "f32");
    pikv_context *ctx = tu_context(1);
    if (!CHECK(ctx))
        return;
    tu_err_ctx = ctx;
    acct a;
    memset(&a, 0, sizeof a);
    a.mem0[0] = tu_mem_used(ctx, 0);
    pikv_cache_params p = base_params();
    p.n_layers = 1;
    p.page_size = page_size;
    p.dtype = dt;
    pikv_cache *c = NULL;
    if (!CHECK_OK(pikv_cache_create(ctx, &p, &c))) {
        pikv_context_free(ctx);
        return;
    }
    tu_model m;
    tu_model_init(&m, &p);
    tu_rng r = tu_rng_seed(42 + (uint64_t)page_size);
    CHECK_OK(pikv_seq_add(c, 0));
    CHECK_OK(pikv_seq_add(c, 1));
    m.live[0] = m.live[1] = 1;
    int64_t since = 0;
    int32_t both[2] = {0, 1};
    /* interleaved: both sequences' pages alternate in the one shard's ring */
    while (tu_model_seq(&m, 0, 0)->n < 1200 || tu_model_seq(&m, 0, 1)->n < 1100) {
        int s = (int)tu_int(&r, 0, 1);
        int64_t n = tu_int(&r, 1, 2 * page_size + 1);
        if (!CHECK_OK(tu_append_random(c, &m, &r, 0, s, n, 0)))
            break;
        since += n;
        if (since >= 400) {
            since = 0;
            TU_CHECK_ATTEND(c, &m, 0, 2, both, &r, 2.0f);
            check_accounting(c, &m, &p, &a, "ring/grow");
        }
    }
    TU_CHECK_ATTEND(c, &m, 0, 2, both, &r, 2.0f);
    check_accounting(c, &m, &p, &a, "ring/full");

    /* remove one sequence in the middle of the ring; the other keeps working */
    CHECK_OK(pikv_seq_remove(c, 0));
    tu_model_remove(&m, 0);
    int32_t one = 1;
    TU_CHECK_ATTEND(c, &m, 0, 1, &one, &r, 2.0f);
    check_accounting(c, &m, &p, &a, "ring/after remove");
    /* freed pages are reused: a new sequence and more tokens for the old one */
    CHECK_OK(pikv_seq_add(c, 2));
    m.live[2] = 1;
    for (int i = 0; i < 60; i++) {
        int s = i % 2 ? 1 : 2;
        if (!CHECK_OK(tu_append_random(c, &m, &r, 0, s, tu_int(&r, 1, 23), 0)))
            break;
    }
    int32_t s12[3] = {2, 1, 2};
    TU_CHECK_ATTEND(c, &m, 0, 3, s12, &r, 2.0f);
    check_accounting(c, &m, &p, &a, "ring/reuse");
    /* seq ids can be reused after removal */
    CHECK_OK(pikv_seq_add(c, 0));
    m.live[0] = 1;
    CHECK_OK(tu_append_random(c, &m, &r, 0, 0, 3 * page_size + 1, 0));
    TU_CHECK_ALL(c, &m, &r);
    check_accounting(c, &m, &p, &a, "ring/id reuse");

    pikv_cache_free(c);
    CHECK_EQ(tu_mem_used(ctx, 0), a.mem0[0]);
    tu_model_free(&m);
    pikv_context_free(ctx);
}

/* ---------------------------------------------------------------------- */
/* 2. Accounting and placement formulas                                   */
/* ---------------------------------------------------------------------- */
typedef struct acfg {
    int ctx_devices;
    int n_cache_devices; /* 0 = all */
    int32_t devices[8];
    pikv_placement pl;
    pikv_dtype dt;
    int ne, ept, ps;
    int n_shards, hash_tokens;
} acfg;

static void test_accounting(const acfg *g)
{
    tu_set_case("accounting: ctx devices %d, cache devices %d, %s, %s, experts %d/%d, page %d, "
                "n_shards %d, hash_tokens %d",
                g->ctx_devices, g->n_cache_devices, pl_name(g->pl),
                g->dt == PIKV_DTYPE_F16 ? "f16" : "f32", g->ne, g->ept, g->ps, g->n_shards,
                g->hash_tokens);
    pikv_context *ctx = tu_context(g->ctx_devices);
    if (!CHECK(ctx))
        return;
    tu_err_ctx = ctx;
    CHECK_EQ(pikv_device_count(ctx), g->ctx_devices);
    acct a;
    memset(&a, 0, sizeof a);
    for (int d = 0; d < g->ctx_devices; d++)
        a.mem0[d] = tu_mem_used(ctx, d);
    pikv_cache_params p = base_params();
    p.placement = g->pl;
    p.dtype = g->dt;
    p.n_experts = g->ne;
    p.experts_per_token = g->ept;
    p.page_size = g->ps;
    p.n_shards = g->n_shards;
    p.hash_tokens = g->hash_tokens;
    if (g->n_cache_devices) {
        p.devices = g->devices;
        p.n_devices = g->n_cache_devices;
    }
    int nd = g->n_cache_devices ? g->n_cache_devices : g->ctx_devices;
    pikv_cache *c = NULL;
    if (!CHECK_OK(pikv_cache_create(ctx, &p, &c))) {
        pikv_context_free(ctx);
        return;
    }
    pikv_cache_stats st;
    CHECK_OK(pikv_cache_get_stats(c, &st));
    CHECK_EQ(st.n_devices, nd);
    CHECK(pikv_cache_context(c) == ctx);
    tu_model m;
    tu_model_init(&m, &p);
    check_accounting(c, &m, &p, &a, "after create");
    tu_rng r = tu_rng_seed(7 + (uint64_t)g->ne * 131 + (uint64_t)nd * 17 + (uint64_t)g->pl);

    for (int round = 0; round < 6; round++) {
        if (round < 4) {
            CHECK_OK(pikv_seq_add(c, round * 2));
            m.live[round * 2] = 1;
        }
        for (int i = 0; i < 12; i++) {
            int s = 2 * (int)tu_int(&r, 0, round < 4 ? round : 3);
            int l = (int)tu_int(&r, 0, p.n_layers - 1);
            int64_t n = tu_int(&r, 1, i % 3 == 0 ? 5 * g->ps : g->ps + 1);
            if (!CHECK_OK(tu_append_random(c, &m, &r, l, s, n, 1)))
                break;
        }
        char where[64];
        snprintf(where, sizeof where, "round %d", round);
        check_accounting(c, &m, &p, &a, where);
    }
    TU_CHECK_ALL(c, &m, &r);

    /* remove gives everything back */
    pikv_cache_stats before, after;
    CHECK_OK(pikv_cache_get_stats(c, &before));
    CHECK_OK(pikv_seq_add(c, 7));
    m.live[7] = 1;
    for (int l = 0; l < p.n_layers; l++)
        CHECK_OK(tu_append_random(c, &m, &r, l, 7, 3 * g->ps + 2 + l, 0));
    check_accounting(c, &m, &p, &a, "seq 7 added");
    CHECK_OK(pikv_seq_remove(c, 7));
    tu_model_remove(&m, 7);
    CHECK_OK(pikv_cache_get_stats(c, &after));
    CHECK_EQ(after.tokens, before.tokens);
    CHECK_EQ(after.pages, before.pages);
    CHECK_EQ(after.bytes_used, before.bytes_used);
    CHECK_EQ(after.sequences, before.sequences);
    int64_t len = 0;
    CHECK_STATUS(PIKV_ERR_NOT_FOUND, pikv_seq_length(c, 7, 0, &len));
    check_accounting(c, &m, &p, &a, "seq 7 removed");
    TU_CHECK_ALL(c, &m, &r);

    /* remove all: nothing used */
    for (int s = 0; s < p.max_sequences; s++)
        if (m.live[s]) {
            CHECK_OK(pikv_seq_remove(c, s));
            tu_model_remove(&m, s);
        }
    CHECK_OK(pikv_cache_get_stats(c, &after));
    CHECK_EQ(after.tokens, 0);
    CHECK_EQ(after.pages, 0);
    CHECK_EQ(after.bytes_used, 0);
    CHECK_EQ(after.sequences, 0);
    check_accounting(c, &m, &p, &a, "all removed");

    pikv_cache_free(c);
    for (int d = 0; d < g->ctx_devices; d++)
        CHECKF(tu_mem_used(ctx, d) == a.mem0[d], "device %d memory_used %llu after free, %llu "
               "before the cache", d, (unsigned long long)tu_mem_used(ctx, d),
               (unsigned long long)a.mem0[d]);
    tu_model_free(&m);
    pikv_context_free(ctx);
}

/* ---------------------------------------------------------------------- */
/* 3. copy_prefix                                                         */
/* ---------------------------------------------------------------------- */
static void test_copy_prefix(int nd, pikv_placement pl, int ne, int ept, int ps, pikv_dtype dt)
{
    pikv_context *ctx = tu_context(nd);
    if (!CHECK(ctx))
        return;
    tu_err_ctx = ctx;
    pikv_cache_params p = base_params();
    p.placement = pl;
    p.n_experts = ne;
    p.experts_per_token = ept;
    p.page_size = ps;
    p.dtype = dt;
    const int64_t L0 = 5 * ps + 3, L1 = 3 * ps + 1;
    int64_t ns_list[] = {0, 1, ps - 1, ps, ps + 1, 2 * ps, 3 * ps, L1};
    for (size_t ni = 0; ni < sizeof ns_list / sizeof ns_list[0]; ni++) {
        int64_t n = ns_list[ni];
        if (n < 0 || (ni > 0 && n == ns_list[ni - 1]))
            continue;
        tu_set_case("copy_prefix: %d devices, %s, experts %d/%d, page %d, %s, n=%lld", nd,
                    pl_name(pl), ne, ept, ps, dt == PIKV_DTYPE_F16 ? "f16" : "f32",
                    (long long)n);
        pikv_cache *c = NULL;
        if (!CHECK_OK(pikv_cache_create(ctx, &p, &c)))
            break;
        tu_model m;
        tu_model_init(&m, &p);
        tu_rng r = tu_rng_seed(1234 + (uint64_t)n * 7 + (uint64_t)ps);
        CHECK_OK(pikv_seq_add(c, 0));
        m.live[0] = 1;
        /* a few chunks per layer */
        for (int l = 0; l < 2; l++) {
            int64_t L = l ? L1 : L0, done = 0;
            while (done < L) {
                int64_t k = tu_int(&r, 1, L - done);
                if (!CHECK_OK(tu_append_random(c, &m, &r, l, 0, k, 1)))
                    break;
                done += k;
            }
        }
        pikv_cache_stats s0, s1;
        CHECK_OK(pikv_cache_get_stats(c, &s0));
        pikv_status st = pikv_seq_copy_prefix(c, 0, 3, n);
        if (!CHECKF(st == PIKV_OK, "copy_prefix(0 -> 3, %lld): %s: %s", (long long)n,
                    pikv_status_name(st), pikv_context_last_error(ctx))) {
            pikv_cache_free(c);
            tu_model_free(&m);
            continue;
        }
        tu_model_copy_prefix(&m, 0, 3, n);
        for (int l = 0; l < 2; l++) {
            int64_t len = -1;
            CHECK_OK(pikv_seq_length(c, 3, l, &len));
            CHECK_EQ(len, n);
            CHECK_OK(pikv_seq_length(c, 0, l, &len));
            CHECK_EQ(len, l ? L1 : L0);
        }
        /* pages: only partly covered / open pages are copied */
        CHECK_OK(pikv_cache_get_stats(c, &s1));
        int ns = s1.n_shards;
        int ht = p.hash_tokens > 0 ? p.hash_tokens : ns;
        int64_t *cnt = tu_xcalloc((size_t)ns, sizeof(int64_t));
        int64_t copied = 0, copied_tokens = 0;
        for (int l = 0; l < 2; l++) {
            shard_counts(&m, &p, ns, ht, l, 0, n, cnt);
            for (int i = 0; i < ns; i++) {
                copied += cnt[i] % ps != 0;
                copied_tokens += cnt[i] % ps;
            }
        }
        CHECKF(s1.pages - s0.pages == copied, "copy_prefix added %lld pages, expected %lld "
               "(full pages shared, partial ones copied)", (long long)(s1.pages - s0.pages),
               (long long)copied);
        /* stats.tokens counts tokens held (like pages, shared ones once): that is what the
           device stats and shard info count too, and they must add up to it */
        CHECKF(s1.tokens - s0.tokens == copied_tokens, "copy_prefix added %lld tokens held, "
               "expected %lld (the tokens of the copied partial pages)",
               (long long)(s1.tokens - s0.tokens), (long long)copied_tokens);
        CHECK_EQ(s1.sequences, 2);
        if (s1.pages > 0)
            CHECK_EQ(s1.bytes_used % (uint64_t)s1.pages, 0);
        if (s0.pages > 0 && s1.pages > 0)
            CHECK_EQ(s1.bytes_used / (uint64_t)s1.pages, s0.bytes_used / (uint64_t)s0.pages);
        int32_t b3[3] = {3, 0, 3};
        for (int l = 0; l < 2; l++)
            TU_CHECK_ATTEND(c, &m, l, 3, b3, &r, 2.0f);

        /* diverge: different tokens to src and dst */
        for (int l = 0; l < 2; l++) {
            CHECK_OK(tu_append_random(c, &m, &r, l, 0, 2 * ps + 1, 1));
            CHECK_OK(tu_append_random(c, &m, &r, l, 3, ps + 2, 1));
        }
        for (int l = 0; l < 2; l++)
            TU_CHECK_ATTEND(c, &m, l, 3, b3, &r, 2.0f);

        /* a copy of the copy, then remove src: dst and its copy keep their pages */
        int64_t n2 = n / 2;
        CHECK_OK(pikv_seq_copy_prefix(c, 3, 5, n2));
        tu_model_copy_prefix(&m, 3, 5, n2);
        CHECK_OK(pikv_seq_remove(c, 0));
        tu_model_remove(&m, 0);
        int32_t b35[3] = {5, 3, 5};
        for (int l = 0; l < 2; l++)
            TU_CHECK_ATTEND(c, &m, l, 3, b35, &r, 2.0f);
        CHECK_OK(pikv_seq_remove(c, 3));
        tu_model_remove(&m, 3);
        int32_t b5 = 5;
        for (int l = 0; l < 2; l++)
            TU_CHECK_ATTEND(c, &m, l, 1, &b5, &r, 2.0f);
        /* seq 5 alone: its pages are exactly those of its tokens */
        CHECK_OK(pikv_cache_get_stats(c, &s1));
        int64_t alone = 0;
        for (int l = 0; l < 2; l++) {
            shard_counts(&m, &p, ns, ht, l, 5, -1, cnt);
            for (int i = 0; i < ns; i++)
                alone += ceil_div(cnt[i], ps);
        }
        CHECKF(s1.pages == alone, "after removing src and dst, pages %lld, expected %lld",
               (long long)s1.pages, (long long)alone);
        CHECK_EQ(s1.tokens, tu_model_seq(&m, 0, 5)->n + tu_model_seq(&m, 1, 5)->n);
        /* more tokens still append fine, then everything goes back to zero */
        for (int l = 0; l < 2; l++)
            CHECK_OK(tu_append_random(c, &m, &r, l, 5, ps + 1, 1));
        for (int l = 0; l < 2; l++)
            TU_CHECK_ATTEND(c, &m, l, 1, &b5, &r, 2.0f);
        CHECK_OK(pikv_seq_remove(c, 5));
        tu_model_remove(&m, 5);
        CHECK_OK(pikv_cache_get_stats(c, &s1));
        CHECK_EQ(s1.tokens, 0);
        CHECK_EQ(s1.pages, 0);
        CHECK_EQ(s1.bytes_used, 0);
        CHECK_EQ(s1.sequences, 0);
        free(cnt);
        pikv_cache_free(c);
        tu_model_free(&m);
    }
    pikv_context_free(ctx);
}

/* ---------------------------------------------------------------------- */
/* 4. BALANCED placement and rebalance                                    */
/* ---------------------------------------------------------------------- */
static double imbalance(pikv_cache *c)
{
    pikv_cache_stats st;
    if (pikv_cache_get_stats(c, &st) != PIKV_OK || st.n_devices <= 0)
        return INFINITY;
    double mx = 0, sum = 0;
    for (int i = 0; i < st.n_devices; i++) {
        pikv_cache_device_stats ds;
        if (pikv_cache_get_device_stats(c, i, &ds) != PIKV_OK)
            return INFINITY;
        sum += (double)ds.bytes_used;
        if ((double)ds.bytes_used > mx)
            mx = (double)ds.bytes_used;
    }
    return sum > 0 ? mx / (sum / st.n_devices) : 1.0;
}

static void append_expert(pikv_cache *c, tu_model *m, tu_rng *r, int layer, int seq, int64_t n,
                          int expert)
{
    size_t row = (size_t)m->nkv * m->hd;
    float *k = tu_xmalloc((size_t)n * row * sizeof(float));
    float *v = tu_xmalloc((size_t)n * row * sizeof(float));
    int32_t *ex = tu_xmalloc((size_t)n * m->ept * sizeof(int32_t));
    tu_gen(r, m, n, k, v, ex, 0);
    for (int64_t t = 0; t < n; t++) {
        /* top-1 = expert, the others distinct from it */
        for (int j = 0; j < m->ept; j++)
            ex[(size_t)t * m->ept + j] = (expert + j) % m->ne;
    }
    if (CHECK_OK(pikv_cache_append(c, layer, seq, (int32_t)n, k, v, NULL, ex)))
        tu_model_push(m, layer, seq, n, k, v, ex);
    free(k);
    free(v);
    free(ex);
}

static void test_balanced(int nl, int nd, int ne)
{
    tu_set_case("balanced: %d layers, %d devices, %d experts", nl, nd, ne);
    pikv_context *ctx = tu_context(nd);
    if (!CHECK(ctx))
        return;
    tu_err_ctx = ctx;
    acct a;
    memset(&a, 0, sizeof a);
    for (int d = 0; d < nd; d++)
        a.mem0[d] = tu_mem_used(ctx, d);
    pikv_cache_params p = base_params();
    p.n_layers = nl;
    p.placement = PIKV_PLACEMENT_BALANCED;
    p.n_experts = ne;
    p.experts_per_token = 2;
    p.page_size = 4;
    pikv_cache *c = NULL;
    if (!CHECK_OK(pikv_cache_create(ctx, &p, &c))) {
        pikv_context_free(ctx);
        return;
    }
    tu_model m;
    tu_model_init(&m, &p);
    tu_rng r = tu_rng_seed(99 + (uint64_t)nl * 10 + (uint64_t)nd);
    CHECK_OK(pikv_seq_add(c, 0));
    CHECK_OK(pikv_seq_add(c, 1));
    m.live[0] = m.live[1] = 1;

    /* shard 0 first (gets bytes), then shard 1: it must go to another device */
    for (int l = 0; l < nl; l++) {
        append_expert(c, &m, &r, l, 0, 2, 0);
        append_expert(c, &m, &r, l, 0, 1, 1);
        int32_t d0 = -1, d1 = -1;
        int64_t pg, tk;
        CHECK_OK(pikv_cache_shard_info(c, l, 0, &d0, &pg, &tk));
        CHECK_OK(pikv_cache_shard_info(c, l, 1, &d1, &pg, &tk));
        if (l == 0)
            CHECKF(d0 != d1, "layer 0: second new shard placed on device %d with the first one, "
                   "not on an empty device", d1);
        for (int e = 2; e < ne; e++)
            append_expert(c, &m, &r, l, 1, 1, e);
    }
    check_accounting(c, &m, &p, &a, "balanced/start");

    /* grow two shards that share a device */
    for (int l = 0; l < nl; l++) {
        int32_t dev[64];
        int64_t pg, tk;
        for (int e = 0; e < ne; e++)
            CHECK_OK(pikv_cache_shard_info(c, l, e, &dev[e], &pg, &tk));
        int ea = -1, eb = -1;
        for (int x = 0; x < ne && ea < 0; x++)
            for (int y = x + 1; y < ne; y++)
                if (dev[x] == dev[y]) {
                    ea = x;
                    eb = y;
                    break;
                }
        if (!CHECK(ea >= 0))
            continue;
        for (int i = 0; i < 8; i++) {
            append_expert(c, &m, &r, l, i % 2, 25, ea);
            append_expert(c, &m, &r, l, 1 - i % 2, 25, eb);
        }
    }
    check_accounting(c, &m, &p, &a, "balanced/skewed");
    double before = imbalance(c);

    int32_t seqs[3] = {0, 1, 0};
    size_t per = (size_t)p.n_q_heads * p.head_dim;
    float q[3 * 64], out0[4][3 * 64], out1[3 * 64];
    tu_fill(&r, q, 3 * per, 2.0f);
    for (int l = 0; l < nl; l++) {
        tu_aerr e;
        CHECK_OK(tu_attend_compare(c, &m, l, 3, seqs, q, NULL, out0[l], NULL, &e));
        TU_CHECK_AERR(e, 0);
    }
    int64_t moved = -1;
    CHECK_OK(pikv_cache_rebalance(c, &moved));
    CHECKF(moved > 0, "rebalance moved %lld pages of a skewed placement", (long long)moved);
    double after = imbalance(c);
    CHECKF(after <= before, "imbalance (max/mean device bytes_used) %.3f after rebalance, %.3f "
           "before", after, before);
    CHECKF(after < before, "rebalance did not improve a placement with two big shards on one "
           "device: %.3f -> %.3f", before, after);
    for (int l = 0; l < nl; l++) {
        tu_aerr e;
        CHECK_OK(tu_attend_compare(c, &m, l, 3, seqs, q, NULL, out1, NULL, &e));
        TU_CHECK_AERR(e, 0);
        CHECKF(tu_norm_err_ff(out1, out0[l], 3 * per) <= TU_TOL_EXACT,
               "layer %d: output changed by rebalance", l);
    }
    check_accounting(c, &m, &p, &a, "balanced/rebalanced");

    /* a second rebalance keeps everything (and appending still works) */
    CHECK_OK(pikv_cache_rebalance(c, NULL));
    CHECK_LE(imbalance(c), before);
    for (int l = 0; l < nl; l++)
        CHECK_OK(tu_append_random(c, &m, &r, l, 1, 9, 0));
    check_accounting(c, &m, &p, &a, "balanced/again");
    TU_CHECK_ALL(c, &m, &r);

    pikv_cache_free(c);
    for (int d = 0; d < nd; d++)
        CHECK_EQ(tu_mem_used(ctx, d), a.mem0[d]);
    tu_model_free(&m);
    pikv_context_free(ctx);
}

int main(void)
{
    test_ring(4, PIKV_DTYPE_F32);
    test_ring(1, PIKV_DTYPE_F16);
    test_ring(7, PIKV_DTYPE_F32);

    static const acfg cfgs[] = {
        /* ctx, n, devices, placement, dtype, experts, ept, page, n_shards, hash_tokens */
        {4, 0, {0}, PIKV_PLACEMENT_EXPERT, PIKV_DTYPE_F32, 8, 2, 4, 0, 0},
        {4, 0, {0}, PIKV_PLACEMENT_EXPERT, PIKV_DTYPE_F16, 16, 4, 3, 0, 0},
        {3, 0, {0}, PIKV_PLACEMENT_EXPERT, PIKV_DTYPE_F32, 7, 2, 5, 0, 0},
        {2, 0, {0}, PIKV_PLACEMENT_EXPERT, PIKV_DTYPE_F32, 2, 1, 1, 0, 0},
        {4, 2, {3, 1}, PIKV_PLACEMENT_EXPERT, PIKV_DTYPE_F32, 4, 2, 4, 0, 0},
        {2, 0, {0}, PIKV_PLACEMENT_HASH, PIKV_DTYPE_F32, 8, 2, 4, 0, 0},
        {3, 0, {0}, PIKV_PLACEMENT_HASH, PIKV_DTYPE_F32, 8, 1, 4, 5, 3},
        {4, 0, {0}, PIKV_PLACEMENT_HASH, PIKV_DTYPE_F16, 6, 3, 2, 0, 11},
        {2, 0, {0}, PIKV_PLACEMENT_EXPERT, PIKV_DTYPE_F32, 1, 1, 8, 0, 0},
        {3, 0, {0}, PIKV_PLACEMENT_HASH, PIKV_DTYPE_F32, 1, 1, 3, 5, 0},
        {5, 3, {4, 0, 2}, PIKV_PLACEMENT_BALANCED, PIKV_DTYPE_F32, 8, 2, 4, 0, 0},
        {4, 0, {0}, PIKV_PLACEMENT_BALANCED, PIKV_DTYPE_F32, 1, 1, 4, 6, 0},
        {1, 0, {0}, PIKV_PLACEMENT_EXPERT, PIKV_DTYPE_F32, 8, 2, 16, 0, 0},
    };
    for (size_t i = 0; i < sizeof cfgs / sizeof cfgs[0]; i++)
        test_accounting(&cfgs[i]);

    test_copy_prefix(1, PIKV_PLACEMENT_EXPERT, 1, 1, 4, PIKV_DTYPE_F32);
    test_copy_prefix(3, PIKV_PLACEMENT_EXPERT, 1, 1, 5, PIKV_DTYPE_F16);
    test_copy_prefix(2, PIKV_PLACEMENT_EXPERT, 4, 2, 4, PIKV_DTYPE_F32);
    test_copy_prefix(3, PIKV_PLACEMENT_HASH, 8, 2, 3, PIKV_DTYPE_F32);
    test_copy_prefix(2, PIKV_PLACEMENT_BALANCED, 4, 1, 2, PIKV_DTYPE_F16);

    test_balanced(1, 2, 4);
    test_balanced(2, 2, 4);
    test_balanced(2, 3, 6);

    tu_set_case("");
    return tu_finish();
}
