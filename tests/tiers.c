/*
 * tiers: memory tiers device -> host -> disk (docs/tiers.md). White-box where it helps
 * (runtime/cache-impl.h: page metadata, pools, pikv_tier_demote, pikv_page_read_bytes).
 *
 * Most cases run a pair of caches on one context fed the same data: `ref` without
 * tiers and `tier` with them. The reference bound for attend outputs is
 * max |out - ref| <= 2e-5 * max |ref| per batch: a tiered attend computes the same
 * per-page partials from bit-identical page bytes and merges them (LSE merge) in a
 * different grouping, so only float rounding of the merge differs (about 1e-7
 * relative); a page read twice, missed, read from the wrong slot, or stale staging
 * data moves outputs by 1e-2 or more with these random keys.
 *
 *  1. Bit-exact moves: every dtype, pages demoted to host and disk read back with
 *     identical bytes; attends equal ref; promotion brings them back identical.
 *  2. Exact mode under device_bytes of about a quarter of the context (4 CPU devices,
 *     every dtype, expert/hash/balanced placement): decode steps with appends between;
 *     outputs equal ref; demotions, fetches, host (and with a small host tier, disk)
 *     bytes; each device's resident bytes plus staging never over device_bytes.
 *  3. QUEST: the same pages chosen as ref (pages/tokens read equal, outputs equal);
 *     a planted page demoted, then selected and fetched.
 *  4. Eviction demotes: LRU and H2O under budgets lose no token; exact attend equals a
 *     no-budget cache; resident tokens per (sequence, layer) within the budget.
 *  5. Prefetch: a decode loop over layers with a disk tier: prefetches and hits with
 *     prefetch on, none with it off, identical outputs.
 *  6. Faults: bad parameters named in messages, a disk_dir that does not exist, a full
 *     host tier without disk (CAPACITY, content unchanged), NUMA nodes, allocation
 *     failures injected in tier paths.
 *  7. copy_prefix, seq_remove, rebalance and trim with demoted pages stay exact.
 *  8. Checkpoints of tiered caches restore into caches whose devices hold a quarter of
 *     them (pages demoted as they are placed); a restore out of tier room fails with
 *     CAPACITY and leaves the cache empty and usable.
 *
 * `tiers PART` runs only the parts whose name contains PART; `tiers measure` prints the
 * figures of docs/tiers.md instead (a decode loop, no checks of its timings).
 */
#include "test-util.h"

#include "fault-hook.h"

#include "cache-impl.h"

#include <time.h>
#include <unistd.h>

static pikv_context *g_ctx;
static const float TOL = 2e-5f;

static const char *dtype_name(pikv_dtype t)
{
    static const char *n[] = {"f32", "f16", "int8", "int4"};
    return n[t];
}

static pikv_cache_params base_params(pikv_dtype dt, pikv_placement pl, int32_t n_experts)
{
    pikv_cache_params p = pikv_cache_default_params();
    p.n_layers = 2;
    p.n_q_heads = 4;
    p.n_kv_heads = 2;
    p.head_dim = 32;
    p.n_experts = n_experts;
    p.experts_per_token = n_experts > 1 ? 2 : 1;
    p.page_size = 8;
    p.dtype = dt;
    p.quant_group = 8;
    p.placement = pl;
    p.max_sequences = 8;
    p.select.sink_tokens = 4;
    p.select.recent_tokens = 8;
    return p;
}

/* Page bytes of the layout demoted pages have (the quantized one in INT8/INT4 caches). */
static uint64_t tier_page_bytes(const pikv_cache *c)
{
    return c->qdevs ? c->qlayout.page_bytes : c->layout.page_bytes;
}

/* Each device's resident pages plus its staging slots within device_bytes. */
static void check_device_budget(const pikv_cache *c, const char *where)
{
    const pikv_tier_params *tp = &c->params.tiers;
    if (!tp->enabled || tp->device_bytes == 0) return;
    const uint64_t pb = tier_page_bytes(c);
    int64_t staging = tp->staging_pages ? tp->staging_pages : (int64_t)(tp->device_bytes / pb / 4);
    if (staging < 1) staging = 1;
    for (int32_t d = 0; d < c->n_devs; d++) {
        pikv_cache_device_stats ds;
        CHECK_OK(pikv_cache_get_device_stats(c, d, &ds));
        CHECKF(ds.bytes_used + (uint64_t)staging * pb <= tp->device_bytes,
               "%s: device %d holds %llu resident bytes + %lld staging slots of %llu > device_bytes %llu", where, d,
               (unsigned long long)ds.bytes_used, (long long)staging, (unsigned long long)pb,
               (unsigned long long)tp->device_bytes);
    }
}

typedef struct pair {
    pikv_cache *ref, *tier;
    tu_rng rng;
    const char *what;
} pair;

static int pair_create(pair *pr, const pikv_cache_params *p, const pikv_tier_params *tp, uint64_t seed,
                       const char *what)
{
    memset(pr, 0, sizeof *pr);
    pr->rng = tu_rng_seed(seed);
    pr->what = what;
    pikv_cache_params q = *p;
    if (!CHECK_OK(pikv_cache_create(g_ctx, &q, &pr->ref))) return 0;
    q.tiers = *tp;
    q.tiers.enabled = 1;
    if (!CHECK_OK(pikv_cache_create(g_ctx, &q, &pr->tier))) {
        pikv_cache_free(pr->ref);
        pr->ref = NULL;
        return 0;
    }
    return 1;
}

static void pair_free(pair *pr)
{
    pikv_cache_free(pr->ref);
    pikv_cache_free(pr->tier);
    pr->ref = pr->tier = NULL;
}

/* The same random tokens appended to both caches. */
static int pair_append(pair *pr, int32_t layer, int32_t seq, int32_t n)
{
    const pikv_cache_params *p = &pr->ref->params;
    const size_t nv = (size_t)n * (size_t)p->n_kv_heads * (size_t)p->head_dim;
    float *k = tu_xmalloc(nv * sizeof(float)), *v = tu_xmalloc(nv * sizeof(float));
    int32_t *ex = tu_xmalloc((size_t)n * (size_t)p->experts_per_token * sizeof(int32_t));
    tu_fill(&pr->rng, k, nv, 1.0f);
    tu_fill(&pr->rng, v, nv, 1.0f);
    for (int32_t i = 0; i < n; i++) tu_pick_experts(&pr->rng, p->n_experts, p->experts_per_token, 1, ex + i * p->experts_per_token);
    const int ok = CHECK_OK(pikv_cache_append(pr->ref, layer, seq, n, k, v, NULL, ex)) &&
                   CHECK_OK(pikv_cache_append(pr->tier, layer, seq, n, k, v, NULL, ex));
    check_device_budget(pr->tier, pr->what);
    free(k);
    free(v);
    free(ex);
    return ok;
}

static double max_abs(const float *x, size_t n)
{
    double m = 0.0;
    for (size_t i = 0; i < n; i++) m = fmax(m, fabs((double)x[i]));
    return m;
}

/* One decode query per sequence in seqs; outputs compared (and returned in out_tier when
   not NULL). Returns the normalized error. */
static double pair_attend(pair *pr, int32_t layer, const int32_t *seqs, int32_t nq, const pikv_select_params *sel,
                          const float *q_in, float *out_tier)
{
    const pikv_cache_params *p = &pr->ref->params;
    const size_t nqv = (size_t)nq * (size_t)p->n_q_heads * (size_t)p->head_dim;
    float *q = tu_xmalloc(nqv * sizeof(float)), *o1 = tu_xcalloc(nqv, sizeof(float)), *o2 = tu_xcalloc(nqv, sizeof(float));
    float *l1 = tu_xcalloc((size_t)nq * (size_t)p->n_q_heads, sizeof(float));
    float *l2 = tu_xcalloc((size_t)nq * (size_t)p->n_q_heads, sizeof(float));
    int32_t *ex = tu_xmalloc((size_t)nq * (size_t)p->experts_per_token * sizeof(int32_t));
    if (q_in) memcpy(q, q_in, nqv * sizeof(float));
    else tu_fill(&pr->rng, q, nqv, 1.0f);
    for (int32_t i = 0; i < nq; i++) tu_pick_experts(&pr->rng, p->n_experts, p->experts_per_token, 1, ex + i * p->experts_per_token);
    pikv_attend_batch b = {nq, seqs, q, ex, o1, l1, sel};
    double err = INFINITY;
    if (CHECK_OK(pikv_cache_attend(pr->ref, layer, &b))) {
        b.out = o2;
        b.lse = l2;
        if (CHECK_OK(pikv_cache_attend(pr->tier, layer, &b))) {
            double d = 0.0;
            for (size_t i = 0; i < nqv; i++) d = fmax(d, fabs((double)o1[i] - (double)o2[i]));
            const double ref = max_abs(o1, nqv);
            err = ref > 0 ? d / ref : d;
            CHECKF(err <= TOL, "%s: layer %d attend differs from the no-tier cache: max|diff| %.3g / max|ref| %.3g",
                   pr->what, layer, d, ref);
            double dl = 0.0;
            for (size_t i = 0; i < (size_t)nq * (size_t)p->n_q_heads; i++)
                dl = fmax(dl, fabs((double)l1[i] - (double)l2[i]));
            CHECKF(dl <= 1e-4, "%s: lse differs by %.3g", pr->what, dl);
            if (out_tier) memcpy(out_tier, o2, nqv * sizeof(float));
        }
    }
    check_device_budget(pr->tier, pr->what);
    free(q);
    free(o1);
    free(o2);
    free(l1);
    free(l2);
    free(ex);
    return err;
}

/* The full pages of a sequence's layer (ids), in ring order over shards. */
static int32_t seq_pages(const pikv_cache *c, int32_t seq, int32_t layer, uint32_t *ids, int32_t cap, bool full_only)
{
    int32_t n = 0;
    const pikv_seq_layer *sl = &c->seqs[seq].layers[layer];
    for (int32_t s = 0; s < c->n_shards; s++)
        for (int64_t i = 0; i < sl->rings[s].count && n < cap; i++) {
            const uint32_t id = pikv_ring_at(&sl->rings[s], i);
            if (!full_only || c->pages[id].n_tokens == c->params.page_size) ids[n++] = id;
        }
    return n;
}

static pikv_tier_stats tier_stats(const pikv_cache *c)
{
    pikv_tier_stats ts;
    CHECK_OK(pikv_cache_get_tier_stats(c, &ts));
    return ts;
}

/* ------------------------------------------------------------------------ */
/* 1. Bit-exact moves                                                        */
/* ------------------------------------------------------------------------ */

static void test_exact_moves(void)
{
    for (int dt = 0; dt < 4; dt++) {
        tu_set_case("exact moves, %s", dtype_name((pikv_dtype)dt));
        pikv_cache_params p = base_params((pikv_dtype)dt, PIKV_PLACEMENT_EXPERT, 1);
        p.n_layers = 1;
        pikv_tier_params tp = pikv_cache_default_params().tiers;
        pair pr;
        if (!pair_create(&pr, &p, &tp, 100 + dt, "exact moves")) continue;
        /* a tier page size is only known after create: host tier of 3 pages, disk for the rest,
           device room for everything (promotion brings pages back) */
        pikv_cache_free(pr.tier);
        pikv_cache_params q = p;
        q.tiers = tp;
        q.tiers.enabled = 1;
        q.tiers.host_bytes = 3 * tier_page_bytes(pr.ref);
        q.tiers.disk_bytes = 1000 * tier_page_bytes(pr.ref);
        q.tiers.device_bytes = 4096 * tier_page_bytes(pr.ref);
        pr.tier = NULL;
        if (!CHECK_OK(pikv_cache_create(g_ctx, &q, &pr.tier))) {
            pair_free(&pr);
            continue;
        }
        CHECK_OK(pikv_seq_add(pr.ref, 0));
        CHECK_OK(pikv_seq_add(pr.tier, 0));
        pair_append(&pr, 0, 0, 96);
        uint32_t ids[64];
        const int32_t n = seq_pages(pr.tier, 0, 0, ids, 64, true);
        const uint64_t pb = tier_page_bytes(pr.tier);
        unsigned char *before = tu_xmalloc((size_t)n * pb), *after = tu_xmalloc(pb);
        for (int32_t i = 0; i < n; i++) CHECK_OK(pikv_page_read_bytes(pr.tier, ids[i], before + (size_t)i * pb));
        /* demote the pages holding no sink token; the host tier holds 3, the rest go to disk */
        int32_t demoted = 0;
        for (int32_t i = 0; i < n; i++) {
            if (pr.tier->indices[(size_t)ids[i] * (size_t)p.page_size] < p.select.sink_tokens) continue;
            if (CHECK_OK(pikv_tier_demote(pr.tier, ids[i], "test"))) demoted++;
        }
        pikv_tier_stats ts = tier_stats(pr.tier);
        CHECK_EQ(ts.host_pages, 3);
        CHECK_EQ(ts.disk_pages, demoted - 3);
        CHECK_EQ(ts.demotions, demoted + (demoted - 3)); /* device->host, then host->disk */
        CHECK_EQ(ts.disk_bytes_written, (uint64_t)(demoted - 3) * pb);
        int bad = 0;
        for (int32_t i = 0; i < n; i++) {
            CHECK_OK(pikv_page_read_bytes(pr.tier, ids[i], after));
            bad += memcmp(after, before + (size_t)i * pb, pb) != 0;
        }
        CHECKF(bad == 0, "%s: %d pages changed bytes in the host/disk tiers", dtype_name((pikv_dtype)dt), bad);
        const int32_t seqs[1] = {0};
        pair_attend(&pr, 0, seqs, 1, NULL, NULL, NULL);
        ts = tier_stats(pr.tier);
        CHECK_EQ(ts.fetches, demoted);
        CHECK_EQ(ts.last_fetches, demoted);
        /* the device had room: every fetched page was promoted */
        CHECK_EQ(ts.host_pages + ts.disk_pages, 0);
        CHECK_LE(demoted, ts.promotions);
        bad = 0;
        for (int32_t i = 0; i < n; i++) {
            CHECK_EQ(pr.tier->pages[ids[i]].tier, PIKV_TIER_DEVICE);
            CHECK_OK(pikv_page_read_bytes(pr.tier, ids[i], after));
            bad += memcmp(after, before + (size_t)i * pb, pb) != 0;
        }
        CHECKF(bad == 0, "%s: %d pages changed bytes after promotion", dtype_name((pikv_dtype)dt), bad);
        pair_attend(&pr, 0, seqs, 1, NULL, NULL, NULL);
        CHECK_EQ(tier_stats(pr.tier).last_fetches, 0);
        free(before);
        free(after);
        pair_free(&pr);
    }
}

/* ------------------------------------------------------------------------ */
/* 2. Exact mode under a device budget                                       */
/* ------------------------------------------------------------------------ */

/* Context for a pair: n_seqs sequences of len tokens in every layer. */
static void build_context(pair *pr, int32_t n_seqs, int32_t len)
{
    for (int32_t s = 0; s < n_seqs; s++) {
        CHECK_OK(pikv_seq_add(pr->ref, s));
        CHECK_OK(pikv_seq_add(pr->tier, s));
        for (int32_t l = 0; l < pr->ref->params.n_layers; l++)
            for (int32_t done = 0; done < len; done += 32) pair_append(pr, l, s, len - done < 32 ? len - done : 32);
    }
}

/* device_bytes for about a quarter of the context's page bytes per device, at least the
   open pages plus staging and a few pages */
static uint64_t quarter_budget(const pikv_cache *ref, int64_t open_pages_per_dev)
{
    pikv_cache_stats cs;
    CHECK_OK(pikv_cache_get_stats(ref, &cs));
    const uint64_t big = cs.page_bytes > cs.quant_page_bytes ? cs.page_bytes : cs.quant_page_bytes;
    uint64_t b = cs.bytes_used / 4 / (uint64_t)cs.n_devices;
    const uint64_t floor_b = (uint64_t)(open_pages_per_dev + 6) * big;
    return b > floor_b ? b : floor_b;
}

/* The budget for a context of 2 sequences x 160 tokens in every layer (measured on a
   pair of no-tier caches fed the same data). */
static uint64_t measure_budget(const pikv_cache_params *p, uint64_t seed)
{
    pikv_tier_params none = pikv_cache_default_params().tiers;
    pair pr;
    memset(&pr, 0, sizeof pr);
    pr.rng = tu_rng_seed(seed);
    pr.what = "measure";
    (void)none;
    CHECK_OK(pikv_cache_create(g_ctx, p, &pr.ref));
    CHECK_OK(pikv_cache_create(g_ctx, p, &pr.tier));
    build_context(&pr, 2, 160);
    /* open pages (never demoted) a device must hold: 2 per (layer, shard) it holds; BALANCED
       may stack 4 of the 8 (layer, shard) pairs on one device */
    const uint64_t b = quarter_budget(pr.ref, p->placement == PIKV_PLACEMENT_BALANCED ? 14 : 6);
    pair_free(&pr);
    return b;
}

static void test_exact_budget(void)
{
    static const pikv_placement placements[] = {PIKV_PLACEMENT_EXPERT, PIKV_PLACEMENT_HASH, PIKV_PLACEMENT_BALANCED};
    for (int dt = 0; dt < 4; dt++)
        for (int pi = 0; pi < 3; pi++)
            for (int small_host = 0; small_host < 2; small_host++) {
                if (small_host && pi != 0) continue; /* the disk tier: one placement is enough */
                char what[128];
                snprintf(what, sizeof what, "exact budget, %s, placement %d%s", dtype_name((pikv_dtype)dt), pi,
                         small_host ? ", small host tier + disk" : "");
                tu_set_case("%s", what);
                pikv_cache_params p = base_params((pikv_dtype)dt, placements[pi], 4);
                pikv_tier_params tp = pikv_cache_default_params().tiers;
                const uint64_t budget = measure_budget(&p, 200 + dt * 10 + pi);
                pair pr;
                pikv_cache_params q = p;
                q.tiers = tp;
                q.tiers.enabled = 1;
                q.tiers.device_bytes = budget;
                if (small_host) { /* a host tier of 6 tier pages (the size is known once created) */
                    q.tiers.disk_bytes = 1ull << 30;
                    pikv_cache *probe = NULL;
                    CHECK_OK(pikv_cache_create(g_ctx, &q, &probe));
                    q.tiers.host_bytes = probe ? 6 * tier_page_bytes(probe) : 0;
                    pikv_cache_free(probe);
                }
                if (!pair_create(&pr, &p, &q.tiers, 200 + dt * 10 + pi, what)) continue;
                build_context(&pr, 2, 160);
                const int32_t seqs[2] = {0, 1};
                double worst = 0.0;
                for (int step = 0; step < 4; step++)
                    for (int32_t l = 0; l < p.n_layers; l++) {
                        pair_append(&pr, l, 0, 1);
                        pair_append(&pr, l, 1, 1);
                        const double e = pair_attend(&pr, l, seqs, 2, NULL, NULL, NULL);
                        worst = e > worst ? e : worst;
                    }
                {
                    /* the same attend twice: the same bits, whatever the staging slots held */
                    const size_t per = (size_t)p.n_q_heads * (size_t)p.head_dim;
                    float *qv = tu_xmalloc(2 * per * sizeof(float)), *o1 = tu_xmalloc(2 * per * sizeof(float));
                    float *o2 = tu_xmalloc(2 * per * sizeof(float));
                    tu_fill(&pr.rng, qv, 2 * per, 1.0f);
                    pikv_attend_batch bt = {2, seqs, qv, NULL, o1, NULL, NULL};
                    CHECK_OK(pikv_cache_attend(pr.tier, 0, &bt));
                    bt.out = o2;
                    CHECK_OK(pikv_cache_attend(pr.tier, 0, &bt));
                    CHECKF(memcmp(o1, o2, 2 * per * sizeof(float)) == 0, "%s: one attend twice, different bits", what);
                    free(qv);
                    free(o1);
                    free(o2);
                }
                const pikv_tier_stats ts = tier_stats(pr.tier);
                pikv_cache_stats cs;
                CHECK_OK(pikv_cache_get_stats(pr.tier, &cs));
                /* with a small host tier its few slots may all be in flight (prefetches count where
                   their pages still are: on disk) */
                CHECKF(ts.demotions > 0 && ts.fetches > 0 && (small_host || ts.host_bytes > 0),
                       "%s: demotions %lld fetches %lld host bytes %llu", what, (long long)ts.demotions,
                       (long long)ts.fetches, (unsigned long long)ts.host_bytes);
                if (small_host) CHECKF(ts.disk_pages > 0 && ts.disk_bytes_read > 0, "%s: disk pages %lld, read %llu",
                                       what, (long long)ts.disk_pages, (unsigned long long)ts.disk_bytes_read);
                CHECK_EQ(ts.device_pages + ts.host_pages + ts.disk_pages, cs.pages);
                CHECK(ts.fetch_stall_s >= 0.0);
                if (getenv("PIKV_TIERS_VERBOSE"))
                    printf("%s: budget %llu B/device, pages %lld (device %lld host %lld disk %lld), fetches %lld, worst "
                           "err %.2g\n", what, (unsigned long long)budget, (long long)cs.pages,
                           (long long)ts.device_pages, (long long)ts.host_pages, (long long)ts.disk_pages,
                           (long long)ts.fetches, worst);
                pair_free(&pr);
            }
}

/* ------------------------------------------------------------------------ */
/* 3. QUEST over demoted pages                                               */
/* ------------------------------------------------------------------------ */

static void test_quest(void)
{
    for (int dt = 0; dt < 4; dt += 2) {
        tu_set_case("quest, %s", dtype_name((pikv_dtype)dt));
        pikv_cache_params p = base_params((pikv_dtype)dt, PIKV_PLACEMENT_EXPERT, 1);
        p.n_layers = 1;
        p.select.mode = PIKV_SELECT_QUEST;
        p.select.token_budget = 48;
        pikv_tier_params tp = pikv_cache_default_params().tiers;
        pair pr;
        if (!pair_create(&pr, &p, &tp, 300 + dt, "quest")) continue;
        build_context(&pr, 1, 200);
        /* demote every full page without sink or recent tokens (white-box) */
        uint32_t ids[64];
        const int32_t n = seq_pages(pr.tier, 0, 0, ids, 64, true);
        int32_t demoted = 0;
        for (int32_t i = 0; i < n; i++)
            if (!pikv_page_protected(pr.tier, ids[i], &pr.tier->seqs[0].layers[0], &p.select))
                demoted += CHECK_OK(pikv_tier_demote(pr.tier, ids[i], "test"));
        CHECK(demoted > 10);
        const int32_t seqs[1] = {0};
        for (int step = 0; step < 5; step++) {
            pair_attend(&pr, 0, seqs, 1, NULL, NULL, NULL);
            pikv_cache_stats a, b;
            CHECK_OK(pikv_cache_get_stats(pr.ref, &a));
            CHECK_OK(pikv_cache_get_stats(pr.tier, &b));
            CHECK_EQ(a.last_pages_read, b.last_pages_read);
            CHECK_EQ(a.last_tokens_read, b.last_tokens_read);
            CHECK_EQ(a.last_bytes_read, b.last_bytes_read);
            pair_append(&pr, 0, 0, 1);
        }
        CHECK(tier_stats(pr.tier).fetches > 0);
        /* a planted page: keys along one direction, then a query along it */
        pikv_seq_remove(pr.ref, 0);
        pikv_seq_remove(pr.tier, 0);
        CHECK_OK(pikv_seq_add(pr.ref, 1));
        CHECK_OK(pikv_seq_add(pr.tier, 1));
        const size_t row = (size_t)p.n_kv_heads * (size_t)p.head_dim;
        float *k = tu_xcalloc(200 * row, sizeof(float)), *v = tu_xcalloc(200 * row, sizeof(float));
        tu_fill(&pr.rng, k, 200 * row, 0.3f);
        tu_fill(&pr.rng, v, 200 * row, 1.0f);
        for (int t = 80; t < 88; t++) /* tokens 80..87: one full page */
            for (size_t x = 0; x < row; x++) k[(size_t)t * row + x] = 3.0f;
        CHECK_OK(pikv_cache_append(pr.ref, 0, 1, 200, k, v, NULL, NULL));
        CHECK_OK(pikv_cache_append(pr.tier, 0, 1, 200, k, v, NULL, NULL));
        uint32_t planted = UINT32_MAX;
        const int32_t m = seq_pages(pr.tier, 1, 0, ids, 64, true);
        for (int32_t i = 0; i < m; i++)
            if (pr.tier->indices[(size_t)ids[i] * (size_t)p.page_size] == 80) planted = ids[i];
        if (CHECK(planted != UINT32_MAX)) {
            CHECK_OK(pikv_tier_demote(pr.tier, planted, "test"));
            const int64_t f0 = tier_stats(pr.tier).fetches;
            float *q = tu_xmalloc((size_t)p.n_q_heads * (size_t)p.head_dim * sizeof(float));
            for (int32_t i = 0; i < p.n_q_heads * p.head_dim; i++) q[i] = 1.0f;
            const int32_t s1[1] = {1};
            pair_attend(&pr, 0, s1, 1, NULL, q, NULL);
            CHECK(tier_stats(pr.tier).fetches > f0);
            CHECK(pr.tier->pages[planted].last_use == pr.tier->layer_clock[0]); /* it was read */
            free(q);
        }
        free(k);
        free(v);
        pair_free(&pr);
    }
}

/* Promotion: QUEST with one query repeated under a device budget that holds its working
   set: after the first attends fetched the selected pages, they are promoted (in place
   of colder pages nobody reads) and later attends fetch nothing. Zero copy
   (pikv_cache_attend_device on a CPU device) reads demoted pages through the staged
   path with the same results. */
static void test_promotion_zero_copy(void)
{
    tu_set_case("promotion and zero copy");
    pikv_cache_params p = base_params(PIKV_DTYPE_F16, PIKV_PLACEMENT_EXPERT, 1);
    p.n_layers = 1;
    p.select.mode = PIKV_SELECT_QUEST;
    p.select.token_budget = 40;
    pikv_tier_params tp = pikv_cache_default_params().tiers;
    pair pr;
    if (!pair_create(&pr, &p, &tp, 900, "promotion")) return;
    const uint64_t pb = tier_page_bytes(pr.tier);
    pikv_cache_free(pr.tier);
    pikv_cache_params q = p;
    q.tiers = tp;
    q.tiers.enabled = 1;
    q.tiers.device_bytes = 5 * pb; /* per device: 1 staging slot + 4 pages; the context is 4x that */
    pr.tier = NULL;
    if (!CHECK_OK(pikv_cache_create(g_ctx, &q, &pr.tier))) {
        pair_free(&pr);
        return;
    }
    build_context(&pr, 1, 640);
    const size_t per = (size_t)p.n_q_heads * (size_t)p.head_dim;
    float *qv = tu_xmalloc(per * sizeof(float));
    tu_fill(&pr.rng, qv, per, 1.0f);
    const int32_t seqs[1] = {0};
    int64_t fetches[6];
    for (int i = 0; i < 6; i++) {
        pair_attend(&pr, 0, seqs, 1, NULL, qv, NULL);
        fetches[i] = tier_stats(pr.tier).last_fetches;
    }
    CHECKF(fetches[0] > 0 && fetches[5] == 0, "fetches per attend: first %lld, last %lld (the working set "
           "should be promoted)", (long long)fetches[0], (long long)fetches[5]);
    CHECK(tier_stats(pr.tier).promotions > 0);
    /* exact mode over 4x the budget: nothing is colder than what is read, nothing churns */
    pikv_select_params all = p.select;
    all.mode = PIKV_SELECT_ALL;
    pair_attend(&pr, 0, seqs, 1, &all, qv, NULL);
    const int64_t prom = tier_stats(pr.tier).promotions, dem = tier_stats(pr.tier).demotions;
    for (int i = 0; i < 3; i++) pair_attend(&pr, 0, seqs, 1, &all, qv, NULL);
    CHECK_EQ(tier_stats(pr.tier).promotions, prom);
    CHECK_EQ(tier_stats(pr.tier).demotions, dem);
    CHECK(tier_stats(pr.tier).last_fetches > 0);
    /* zero copy on a CPU device: q/out/lse in that device's memory (host memory here) */
    float *o_ref = tu_xmalloc(per * sizeof(float)), *o_zc = tu_xmalloc(per * sizeof(float));
    float *l_ref = tu_xmalloc((size_t)p.n_q_heads * sizeof(float)), *l_zc = tu_xmalloc((size_t)p.n_q_heads * sizeof(float));
    pikv_attend_batch b = {1, seqs, qv, NULL, o_ref, l_ref, &all};
    CHECK_OK(pikv_cache_attend(pr.ref, 0, &b));
    b.out = o_zc;
    b.lse = l_zc;
    CHECK_OK(pikv_cache_attend_device(pr.tier, 0, 0, &b));
    double d = 0.0;
    for (size_t i = 0; i < per; i++) d = fmax(d, fabs((double)o_ref[i] - (double)o_zc[i]));
    CHECKF(d <= TOL * max_abs(o_ref, per), "zero copy with demoted pages: max|diff| %.3g", d);
    CHECK(tier_stats(pr.tier).last_fetches > 0);
    free(o_ref);
    free(o_zc);
    free(l_ref);
    free(l_zc);
    free(qv);
    pair_free(&pr);
}

/* ------------------------------------------------------------------------ */
/* 4. Eviction demotes                                                       */
/* ------------------------------------------------------------------------ */

static void test_evict_demotes(void)
{
    static const pikv_evict_policy pols[] = {PIKV_EVICT_LRU, PIKV_EVICT_H2O};
    for (int pi = 0; pi < 2; pi++) {
        tu_set_case("eviction demotes, policy %d", (int)pols[pi]);
        pikv_cache_params p = base_params(PIKV_DTYPE_F16, PIKV_PLACEMENT_EXPERT, 1);
        pikv_cache_params pb = p; /* the reference: no budget */
        p.budget.mode = PIKV_BUDGET_UNIFORM;
        p.budget.total_tokens = 2 * 64;
        p.evict.policy = pols[pi];
        pikv_tier_params tp = pikv_cache_default_params().tiers;
        pair pr;
        if (!pair_create(&pr, &pb, &tp, 400 + pi, "eviction demotes")) continue;
        pikv_cache_free(pr.tier);
        pr.tier = NULL;
        pikv_cache_params q = p;
        q.tiers = tp;
        q.tiers.enabled = 1;
        if (!CHECK_OK(pikv_cache_create(g_ctx, &q, &pr.tier))) {
            pair_free(&pr);
            continue;
        }
        const int32_t seqs[2] = {0, 1};
        for (int32_t s = 0; s < 2; s++) {
            CHECK_OK(pikv_seq_add(pr.ref, s));
            CHECK_OK(pikv_seq_add(pr.tier, s));
        }
        for (int step = 0; step < 12; step++)
            for (int32_t l = 0; l < 2; l++) {
                pair_append(&pr, l, 0, 16);
                pair_append(&pr, l, 1, 16);
                pair_attend(&pr, l, seqs, 2, NULL, NULL, NULL);
            }
        pikv_cache_stats cs;
        CHECK_OK(pikv_cache_get_stats(pr.tier, &cs));
        CHECK_EQ(cs.evicted_pages, 0);
        CHECK_EQ(cs.tokens, 2 * 2 * 12 * 16);
        for (int32_t l = 0; l < 2; l++)
            for (int32_t s = 0; s < 2; s++) {
                int64_t len = 0, resident = 0;
                CHECK_OK(pikv_seq_length(pr.tier, s, l, &len));
                CHECK_EQ(len, 12 * 16);
                const pikv_seq_layer *sl = &pr.tier->seqs[s].layers[l];
                for (int32_t sh = 0; sh < pr.tier->n_shards; sh++)
                    for (int64_t i = 0; i < sl->rings[sh].count; i++) {
                        const pikv_page_meta *m = &pr.tier->pages[pikv_ring_at(&sl->rings[sh], i)];
                        if (m->tier == PIKV_TIER_DEVICE) resident += m->n_tokens;
                    }
                CHECKF(resident <= pr.tier->layer_budget[l], "layer %d seq %d: %lld resident tokens > budget %lld", l,
                       s, (long long)resident, (long long)pr.tier->layer_budget[l]);
            }
        CHECK(tier_stats(pr.tier).demotions > 0);
        pair_free(&pr);
    }
}

/* ------------------------------------------------------------------------ */
/* 5. Prefetch                                                               */
/* ------------------------------------------------------------------------ */

static void test_prefetch(void)
{
    float *outs[2] = {NULL, NULL};
    size_t n_out = 0;
    int64_t stats_pf[2] = {0, 0}, stats_hits[2] = {0, 0};
    for (int on = 1; on >= 0; on--) {
        tu_set_case("prefetch %s", on ? "on" : "off");
        pikv_cache_params p = base_params(PIKV_DTYPE_F32, PIKV_PLACEMENT_EXPERT, 1);
        p.n_layers = 3;
        pikv_tier_params tp = pikv_cache_default_params().tiers;
        pair pr;
        if (!pair_create(&pr, &p, &tp, 500, "prefetch")) continue;
        const uint64_t pb = tier_page_bytes(pr.tier);
        pikv_cache_free(pr.tier);
        pr.tier = NULL;
        pikv_cache_params q = p;
        q.tiers = tp;
        q.tiers.enabled = 1;
        q.tiers.prefetch = on;
        q.tiers.device_bytes = 16 * pb;
        q.tiers.host_bytes = 8 * pb;
        q.tiers.disk_bytes = 4096 * pb;
        if (!CHECK_OK(pikv_cache_create(g_ctx, &q, &pr.tier))) {
            pair_free(&pr);
            continue;
        }
        build_context(&pr, 1, 200);
        const int32_t seqs[1] = {0};
        const size_t per = (size_t)p.n_q_heads * (size_t)p.head_dim;
        n_out = 6 * 3 * per;
        outs[on] = tu_xcalloc(n_out, sizeof(float));
        tu_rng qr = tu_rng_seed(77);
        float *qv = tu_xmalloc(per * sizeof(float));
        for (int step = 0; step < 6; step++)
            for (int32_t l = 0; l < 3; l++) {
                tu_fill(&qr, qv, per, 1.0f);
                pair_attend(&pr, l, seqs, 1, NULL, qv, outs[on] + ((size_t)step * 3 + (size_t)l) * per);
            }
        free(qv);
        const pikv_tier_stats ts = tier_stats(pr.tier);
        stats_pf[on] = ts.prefetches;
        stats_hits[on] = ts.prefetch_hits;
        CHECK(ts.disk_pages > 0);
        if (on)
            CHECKF(ts.prefetches > 0 && ts.prefetch_hits > 0 && ts.prefetch_hit_rate > 0.0,
                   "prefetch on: prefetches %lld hits %lld rate %g", (long long)ts.prefetches,
                   (long long)ts.prefetch_hits, ts.prefetch_hit_rate);
        else
            CHECK(ts.prefetches == 0 && ts.prefetch_hits == 0);
        if (getenv("PIKV_TIERS_VERBOSE"))
            printf("prefetch %s: fetches %lld prefetches %lld hits %lld rate %.2f stall %.6f s disk read %llu\n",
                   on ? "on" : "off", (long long)ts.fetches, (long long)ts.prefetches, (long long)ts.prefetch_hits,
                   ts.prefetch_hit_rate, ts.fetch_stall_s, (unsigned long long)ts.disk_bytes_read);
        pair_free(&pr);
    }
    (void)stats_pf;
    (void)stats_hits;
    if (outs[0] && outs[1])
        CHECKF(memcmp(outs[0], outs[1], n_out * sizeof(float)) == 0, "prefetch on and off give different outputs");
    free(outs[0]);
    free(outs[1]);
}

/* ------------------------------------------------------------------------ */
/* 6. Faults                                                                 */
/* ------------------------------------------------------------------------ */

static void expect_create_error(const pikv_cache_params *p, pikv_status want, const char *needle)
{
    pikv_cache *c = NULL;
    const pikv_status st = pikv_cache_create(g_ctx, p, &c);
    CHECK_STATUS(want, st);
    CHECK(c == NULL);
    const char *msg = pikv_context_last_error(g_ctx);
    CHECKF(strstr(msg, needle) != NULL, "message \"%s\" does not name \"%s\"", msg, needle);
    pikv_cache_free(c);
}

static void test_faults(void)
{
    tu_set_case("bad tier parameters");
    pikv_cache_params p = base_params(PIKV_DTYPE_F16, PIKV_PLACEMENT_EXPERT, 1);
    p.n_layers = 1;
    p.tiers.enabled = 1;
    pikv_cache_params b = p;
    b.tiers.host_bytes = 100;
    expect_create_error(&b, PIKV_ERR_INVALID_ARGUMENT, "tiers.host_bytes = 100");
    b = p;
    b.tiers.disk_bytes = 7;
    expect_create_error(&b, PIKV_ERR_INVALID_ARGUMENT, "tiers.disk_bytes = 7");
    b = p;
    b.tiers.device_bytes = 5000;
    expect_create_error(&b, PIKV_ERR_INVALID_ARGUMENT, "tiers.device_bytes = 5000");
    b = p;
    b.tiers.staging_pages = -3;
    expect_create_error(&b, PIKV_ERR_INVALID_ARGUMENT, "tiers.staging_pages = -3");
    b = p;
    b.tiers.numa_node = -2;
    expect_create_error(&b, PIKV_ERR_INVALID_ARGUMENT, "tiers.numa_node = -2");
    b = p;
    b.tiers.device_bytes = 1u << 20;
    b.tiers.staging_pages = 1000000;
    expect_create_error(&b, PIKV_ERR_INVALID_ARGUMENT, "tiers.staging_pages = 1000000");
    b = p;
    b.tiers.disk_bytes = 1u << 20;
    b.tiers.disk_dir = "/nonexistent/pikv-tier-dir";
    expect_create_error(&b, PIKV_ERR_INVALID_ARGUMENT, "/nonexistent/pikv-tier-dir");

    tu_set_case("NUMA");
    b = p;
    b.tiers.numa_node = 9999;
    {
        pikv_cache *c = NULL;
        const pikv_status st = pikv_cache_create(g_ctx, &b, &c);
        CHECK(st == PIKV_ERR_INVALID_ARGUMENT || st == PIKV_ERR_UNSUPPORTED);
        CHECKF(strstr(pikv_context_last_error(g_ctx), "9999") != NULL, "%s", pikv_context_last_error(g_ctx));
        pikv_cache_free(c);
    }
    b.tiers.numa_node = 0;
    b.tiers.device_bytes = 0;
    {
        pikv_cache *c = NULL;
        const pikv_status st = pikv_cache_create(g_ctx, &b, &c);
        if (st == PIKV_ERR_UNSUPPORTED) {
            printf("NUMA: not available (%s)\n", pikv_context_last_error(g_ctx));
        } else if (CHECK_OK(st)) {
            CHECK_EQ(tier_stats(c).numa_node, 0);
            /* pages in the NUMA-bound host tier stay exact */
            pair pr = {NULL, c, tu_rng_seed(5), "numa"};
            pikv_cache_params r = p;
            r.tiers.enabled = 0;
            CHECK_OK(pikv_cache_create(g_ctx, &r, &pr.ref));
            build_context(&pr, 1, 64);
            uint32_t ids[16];
            const int32_t n = seq_pages(c, 0, 0, ids, 16, true);
            for (int32_t i = 1; i < n; i++) CHECK_OK(pikv_tier_demote(c, ids[i], "test"));
            CHECK(tier_stats(c).host_pages > 0);
            const int32_t seqs[1] = {0};
            pair_attend(&pr, 0, seqs, 1, NULL, NULL, NULL);
            pair_free(&pr);
        }
    }

    tu_set_case("disk tier full");
    {
        pikv_cache_params q = p;
        q.tiers.enabled = 0;
        pikv_cache *probe = NULL;
        CHECK_OK(pikv_cache_create(g_ctx, &q, &probe));
        const uint64_t pb = probe ? tier_page_bytes(probe) : 4096;
        pikv_cache_free(probe);
        q.tiers.enabled = 1;
        q.tiers.device_bytes = 8 * pb;
        q.tiers.host_bytes = 2 * pb;
        q.tiers.disk_bytes = 3 * pb;
        pikv_cache *c = NULL;
        if (CHECK_OK(pikv_cache_create(g_ctx, &q, &c))) {
            CHECK_OK(pikv_seq_add(c, 0));
            const size_t row = (size_t)p.n_kv_heads * (size_t)p.head_dim;
            float *k = tu_xmalloc(8 * row * sizeof(float));
            tu_rng r = tu_rng_seed(9);
            tu_fill(&r, k, 8 * row, 1.0f);
            pikv_status st = PIKV_OK;
            int64_t appended = 0;
            for (int i = 0; i < 40 && st == PIKV_OK; i++) {
                st = pikv_cache_append(c, 0, 0, 8, k, k, NULL, NULL);
                appended += st == PIKV_OK ? 8 : 0;
            }
            CHECK_STATUS(PIKV_ERR_CAPACITY, st);
            CHECKF(strstr(pikv_context_last_error(g_ctx), "tiers.disk_bytes") != NULL, "%s",
                   pikv_context_last_error(g_ctx));
            int64_t len = 0;
            CHECK_OK(pikv_seq_length(c, 0, 0, &len));
            CHECK_EQ(len, appended);
            const pikv_tier_stats ts = tier_stats(c);
            CHECK_EQ(ts.disk_pages, 3);
            CHECK_EQ(ts.host_pages, 2);
            free(k);
            pikv_cache_free(c);
        }
    }

    tu_set_case("host tier full without disk");
    {
        pair pr;
        pikv_tier_params tp = pikv_cache_default_params().tiers;
        pikv_cache_params q = p;
        q.tiers.enabled = 0;
        if (pair_create(&pr, &q, &tp, 600, "host full")) {
            const uint64_t pb = tier_page_bytes(pr.tier);
            pikv_cache_free(pr.tier);
            q.tiers = tp;
            q.tiers.enabled = 1;
            q.tiers.device_bytes = 8 * pb;
            q.tiers.host_bytes = 4 * pb;
            pr.tier = NULL;
            CHECK_OK(pikv_cache_create(g_ctx, &q, &pr.tier));
            CHECK_OK(pikv_seq_add(pr.ref, 0));
            CHECK_OK(pikv_seq_add(pr.tier, 0));
            pikv_status st = PIKV_OK;
            const size_t row = (size_t)p.n_kv_heads * (size_t)p.head_dim;
            float *k = tu_xmalloc(8 * row * sizeof(float)), *v = tu_xmalloc(8 * row * sizeof(float));
            int appended = 0;
            for (int i = 0; i < 40 && st == PIKV_OK; i++) {
                tu_fill(&pr.rng, k, 8 * row, 1.0f);
                tu_fill(&pr.rng, v, 8 * row, 1.0f);
                st = pikv_cache_append(pr.tier, 0, 0, 8, k, v, NULL, NULL);
                if (st == PIKV_OK) {
                    CHECK_OK(pikv_cache_append(pr.ref, 0, 0, 8, k, v, NULL, NULL));
                    appended++;
                }
            }
            CHECK_STATUS(PIKV_ERR_CAPACITY, st);
            CHECKF(strstr(pikv_context_last_error(g_ctx), "tiers.host_bytes") != NULL, "%s",
                   pikv_context_last_error(g_ctx));
            int64_t len = 0;
            CHECK_OK(pikv_seq_length(pr.tier, 0, 0, &len));
            CHECK_EQ(len, appended * 8);
            const int32_t seqs[1] = {0};
            pair_attend(&pr, 0, seqs, 1, NULL, NULL, NULL); /* content unchanged: equals ref */
            free(k);
            free(v);
            pair_free(&pr);
        }
    }
}

/* Allocation failures in tier paths: a context whose allocator refuses the Nth
   allocation; every failing call leaves results equal to the reference. */
static void test_alloc_failures(void)
{
    tu_set_case("allocation failures");
    pikv_context_params cp = pikv_context_default_params();
    cp.cpu_devices = 2;
    cp.cpu_threads = 1;
    cp.allocator = (pikv_allocator){tu_fault_alloc, tu_fault_free, &tu_fault};
    pikv_context *fctx = NULL;
    if (!CHECK_OK(pikv_context_create(&cp, &fctx))) return;
    pikv_context *saved = g_ctx;
    g_ctx = fctx;
    {
        /* create: every allocation of a tiered cache refused in turn; nothing leaks */
        pikv_cache_params cpar = base_params(PIKV_DTYPE_F16, PIKV_PLACEMENT_EXPERT, 1);
        cpar.tiers.enabled = 1;
        cpar.tiers.disk_bytes = 1u << 20;
        cpar.tiers.device_bytes = 1u << 20;
        const long long live0 = tu_fault_live();
        int created = 0, refused_creates = 0;
        for (long long n = 0; n < 200 && !created; n++) {
            pikv_cache *c = NULL;
            tu_fault_arm(n, 0);
            const pikv_status st = pikv_cache_create(fctx, &cpar, &c);
            tu_fault_disarm();
            if (st == PIKV_OK) {
                created = 1;
                pikv_cache_free(c);
            } else {
                refused_creates++;
                CHECK_STATUS(PIKV_ERR_OUT_OF_MEMORY, st);
                CHECK(c == NULL);
            }
            CHECK_EQ(tu_fault_live(), live0);
        }
        CHECK(created && refused_creates > 10);
    }
    pikv_cache_params p = base_params(PIKV_DTYPE_INT8, PIKV_PLACEMENT_EXPERT, 1);
    p.n_layers = 1;
    pikv_tier_params tp = pikv_cache_default_params().tiers;
    pair pr;
    if (pair_create(&pr, &p, &tp, 700, "alloc failures")) {
        const uint64_t pb = tier_page_bytes(pr.tier);
        pikv_cache_free(pr.tier);
        pikv_cache_params q = p;
        q.tiers = tp;
        q.tiers.enabled = 1;
        q.tiers.device_bytes = 10 * pb + 2 * pr.ref->layout.page_bytes;
        q.tiers.host_bytes = 6 * pb;
        q.tiers.disk_bytes = 1000 * pb;
        pr.tier = NULL;
        CHECK_OK(pikv_cache_create(g_ctx, &q, &pr.tier));
        build_context(&pr, 1, 160);
        const int32_t seqs[1] = {0};
        const size_t per = (size_t)p.n_q_heads * (size_t)p.head_dim;
        float *qv = tu_xmalloc(per * sizeof(float)), *o = tu_xmalloc(per * sizeof(float));
        tu_fill(&pr.rng, qv, per, 1.0f);
        int failures = 0;
        for (long long n = 0; n < 200; n++) {
            /* attend with a refused allocation: fails cleanly or succeeds */
            tu_fault_arm(n, 0);
            pikv_attend_batch bt = {1, seqs, qv, NULL, o, NULL, NULL};
            const pikv_status st = pikv_cache_attend(pr.tier, 0, &bt);
            const long long refused = tu_fault_disarm();
            CHECK(st == PIKV_OK || st == PIKV_ERR_OUT_OF_MEMORY);
            failures += st != PIKV_OK;
            pair_attend(&pr, 0, seqs, 1, NULL, qv, NULL);
            /* an append with a refused allocation */
            const size_t row = (size_t)p.n_kv_heads * (size_t)p.head_dim;
            float k[8 * 64], v[8 * 64];
            tu_fill(&pr.rng, k, 8 * row, 1.0f);
            tu_fill(&pr.rng, v, 8 * row, 1.0f);
            tu_fault_arm(n, 0);
            const pikv_status sa = pikv_cache_append(pr.tier, 0, 0, 8, k, v, NULL, NULL);
            tu_fault_disarm();
            CHECK(sa == PIKV_OK || sa == PIKV_ERR_OUT_OF_MEMORY);
            if (sa == PIKV_OK) CHECK_OK(pikv_cache_append(pr.ref, 0, 0, 8, k, v, NULL, NULL));
            pair_attend(&pr, 0, seqs, 1, NULL, qv, NULL);
            if (refused == 0 && sa == PIKV_OK && n > 40) break;
        }
        CHECK(failures > 0);
        /* a restore into a tiered cache under its device budget (pages demoted as they are
           placed) with each allocation refused in turn: it fails cleanly, leaving the cache
           empty, or succeeds; nothing leaks */
        char path[] = "/tmp/pikv-tiers-alloc-XXXXXX";
        const int fd = mkstemp(path);
        if (CHECK(fd >= 0)) {
            close(fd);
            CHECK_OK(pikv_cache_checkpoint(pr.tier, path, PIKV_CHECKPOINT_FULL, NULL));
            int restored = 0, refused_restores = 0;
            for (long long n = 0; n < 400 && !restored; n++) {
                const long long live0 = tu_fault_live();
                pikv_cache *c = NULL;
                if (!CHECK_OK(pikv_cache_create(g_ctx, &q, &c))) break;
                tu_fault_arm(n, 0);
                const pikv_status st = pikv_cache_restore(c, path, NULL);
                const long long refused = tu_fault_disarm();
                pikv_cache_stats cs;
                CHECK_OK(pikv_cache_get_stats(c, &cs));
                if (st == PIKV_OK) {
                    restored = refused == 0;
                    CHECK_EQ(cs.pages, pr.tier->pages_live);
                } else {
                    refused_restores++;
                    CHECK_STATUS(PIKV_ERR_OUT_OF_MEMORY, st);
                    CHECK_EQ(cs.pages, 0);
                    CHECK_EQ(cs.tokens, 0);
                    CHECK_EQ(cs.sequences, 0);
                    const pikv_tier_stats ts = tier_stats(c);
                    CHECK_EQ(ts.host_pages + ts.disk_pages, 0);
                }
                pikv_cache_free(c);
                CHECK_EQ(tu_fault_live(), live0);
            }
            CHECK(restored && refused_restores > 10);
            unlink(path);
        }
        free(qv);
        free(o);
        pair_free(&pr);
    }
    g_ctx = saved;
    pikv_context_free(fctx);
    CHECK_EQ(tu_fault_live(), 0);
}

/* ------------------------------------------------------------------------ */
/* 7. Sequence operations, rebalance, trim                                   */
/* ------------------------------------------------------------------------ */

static void test_seq_ops(void)
{
    for (int dt = 0; dt < 4; dt += 3) {
        tu_set_case("sequence ops, %s", dtype_name((pikv_dtype)dt));
        pikv_cache_params p = base_params((pikv_dtype)dt, PIKV_PLACEMENT_BALANCED, 4);
        pikv_tier_params tp = pikv_cache_default_params().tiers;
        pair pr;
        if (!pair_create(&pr, &p, &tp, 800 + dt, "sequence ops")) continue;
        const uint64_t pb = tier_page_bytes(pr.tier);
        pikv_cache_free(pr.tier);
        pikv_cache_params q = p;
        q.tiers = tp;
        q.tiers.enabled = 1;
        q.tiers.device_bytes = 18 * pr.ref->layout.page_bytes; /* BALANCED may stack open pages */
        q.tiers.host_bytes = 10 * pb;
        q.tiers.disk_bytes = 1000 * pb;
        pr.tier = NULL;
        if (!CHECK_OK(pikv_cache_create(g_ctx, &q, &pr.tier))) {
            pair_free(&pr);
            continue;
        }
        build_context(&pr, 2, 150);
        CHECK(tier_stats(pr.tier).host_pages + tier_stats(pr.tier).disk_pages > 0);
        /* a prefix that ends inside pages (some of them demoted) */
        pr.what = "copy_prefix";
        CHECK_OK(pikv_seq_copy_prefix(pr.ref, 0, 2, 101));
        CHECK_OK(pikv_seq_copy_prefix(pr.tier, 0, 2, 101));
        check_device_budget(pr.tier, "copy_prefix");
        const int32_t s2[1] = {2}, s01[2] = {0, 1}, s12[2] = {1, 2};
        for (int32_t l = 0; l < 2; l++) pair_attend(&pr, l, s2, 1, NULL, NULL, NULL);
        pr.what = "seq_remove";
        CHECK_OK(pikv_seq_remove(pr.ref, 0));
        CHECK_OK(pikv_seq_remove(pr.tier, 0));
        for (int32_t l = 0; l < 2; l++) pair_attend(&pr, l, s12, 2, NULL, NULL, NULL);
        pr.what = "rebalance";
        int64_t moved_ref = 0, moved = 0;
        CHECK_OK(pikv_cache_rebalance(pr.ref, &moved_ref));
        CHECK_OK(pikv_cache_rebalance(pr.tier, &moved));
        check_device_budget(pr.tier, "rebalance");
        for (int32_t l = 0; l < 2; l++) pair_attend(&pr, l, s12, 2, NULL, NULL, NULL);
        pr.what = "trim";
        CHECK_OK(pikv_cache_trim(pr.ref));
        CHECK_OK(pikv_cache_trim(pr.tier));
        for (int32_t l = 0; l < 2; l++) {
            pair_append(&pr, l, 1, 9);
            pair_attend(&pr, l, s12, 2, NULL, NULL, NULL);
        }
        (void)s01;
        pair_free(&pr);
    }
}

/* ------------------------------------------------------------------------ */
/* Figures (tiers measure): not a check, the example of docs/tiers.md        */
/* ------------------------------------------------------------------------ */

static double wall_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* A decode loop: 4 layers, one sequence of 4096 tokens per layer (f16, 8/2 heads, head_dim
   128, pages of 16 tokens, 4 CPU devices), then 8 steps of (append 1 token, attend) per
   layer, with 1 ms of busy work between attends standing for the engine's own work on the
   layer, exact and QUEST (token budget 512). Tier variants: none; device_bytes = 1/4 of
   the context per device with an unlimited host tier; the same with a host tier of 1/4
   of the demoted pages and a disk tier, prefetch on and off. */
static void measure(void)
{
    static const struct {
        const char *name;
        int tiers, small_host, prefetch;
    } variants[] = {{"no tiers", 0, 0, 0},
                    {"device 1/4, host", 1, 0, 1},
                    {"device 1/4, host 1/4 + disk, prefetch", 1, 1, 1},
                    {"device 1/4, host 1/4 + disk, no prefetch", 1, 1, 0}};
    const int L = 4, ctx_tokens = 4096, steps = 8;
    for (int sel_mode = 0; sel_mode < 2; sel_mode++)
        for (size_t vi = 0; vi < sizeof variants / sizeof variants[0]; vi++) {
            pikv_cache_params p = base_params(PIKV_DTYPE_F16, PIKV_PLACEMENT_EXPERT, 1);
            p.n_layers = L;
            p.n_q_heads = 8;
            p.n_kv_heads = 2;
            p.head_dim = 128;
            p.page_size = 16;
            p.select.sink_tokens = 16;
            p.select.recent_tokens = 64;
            p.select.token_budget = 512;
            if (sel_mode) p.select.mode = PIKV_SELECT_QUEST;
            const uint64_t page = 16 * 2 * 2 * 128 * 2 + 2 * 2 * 128 * 4; /* K+V f16 + bounds */
            const uint64_t ctx_bytes = (uint64_t)L * (ctx_tokens / 16) * page;
            if (variants[vi].tiers) {
                p.tiers.enabled = 1;
                p.tiers.device_bytes = ctx_bytes / 4 / 4;
                p.tiers.prefetch = variants[vi].prefetch;
                if (variants[vi].small_host) {
                    p.tiers.host_bytes = ctx_bytes * 3 / 4 / 4;
                    p.tiers.disk_bytes = ctx_bytes * 2;
                }
            }
            pikv_cache *c = NULL;
            if (!CHECK_OK(pikv_cache_create(g_ctx, &p, &c))) continue;
            CHECK_OK(pikv_seq_add(c, 0));
            tu_rng r = tu_rng_seed(1234);
            const size_t row = (size_t)p.n_kv_heads * (size_t)p.head_dim, per = (size_t)p.n_q_heads * p.head_dim;
            float *k = tu_xmalloc(256 * row * sizeof(float)), *v = tu_xmalloc(256 * row * sizeof(float));
            float *q = tu_xmalloc(per * sizeof(float)), *o = tu_xmalloc(per * sizeof(float));
            for (int l = 0; l < L; l++)
                for (int t = 0; t < ctx_tokens; t += 256) {
                    tu_fill(&r, k, 256 * row, 1.0f);
                    tu_fill(&r, v, 256 * row, 1.0f);
                    CHECK_OK(pikv_cache_append(c, l, 0, 256, k, v, NULL, NULL));
                }
            const int32_t seqs[1] = {0};
            pikv_attend_batch b = {1, seqs, q, NULL, o, NULL, NULL};
            double attend_s = 0.0;
            pikv_tier_stats t0;
            CHECK_OK(pikv_cache_get_tier_stats(c, &t0));
            for (int step = 0; step < steps; step++)
                for (int l = 0; l < L; l++) {
                    tu_fill(&r, k, row, 1.0f);
                    tu_fill(&r, v, row, 1.0f);
                    CHECK_OK(pikv_cache_append(c, l, 0, 1, k, v, NULL, NULL));
                    tu_fill(&r, q, per, 1.0f);
                    const double a = wall_s();
                    CHECK_OK(pikv_cache_attend(c, l, &b));
                    attend_s += wall_s() - a;
                    /* the engine's work on the layer (its MLP), which background I/O overlaps */
                    const double until = wall_s() + 1e-3;
                    while (wall_s() < until) {
                    }
                }
            pikv_tier_stats ts;
            CHECK_OK(pikv_cache_get_tier_stats(c, &ts));
            const double n_att = (double)steps * L;
            printf("%-6s %-42s attend %7.3f ms | fetches/attend %6.1f, stall %6.3f ms/attend, prefetch hits %5.1f%%, "
                   "disk read %6.1f MiB, pages device/host/disk %lld/%lld/%lld\n",
                   sel_mode ? "QUEST" : "exact", variants[vi].name, 1e3 * attend_s / n_att,
                   (double)(ts.fetches - t0.fetches) / n_att, 1e3 * (ts.fetch_stall_s - t0.fetch_stall_s) / n_att,
                   ts.fetches > t0.fetches ? 100.0 * (double)(ts.prefetch_hits - t0.prefetch_hits) /
                                                 (double)(ts.fetches - t0.fetches)
                                           : 0.0,
                   (double)(ts.disk_bytes_read - t0.disk_bytes_read) / 1048576.0, (long long)ts.device_pages,
                   (long long)ts.host_pages, (long long)ts.disk_pages);
            free(k);
            free(v);
            free(q);
            free(o);
            pikv_cache_free(c);
        }
}

/* ------------------------------------------------------------------------ */
/* 8. Checkpoints of tiered caches, restore under a device budget            */
/* ------------------------------------------------------------------------ */

/* A checkpoint of a tiered cache (demoted pages included) restores into another tiered
   cache whose devices hold a quarter of it: pages beyond the budget are demoted as the
   restore places them, attends equal the no-tier cache, the budget holds. A restore that
   runs out of tier room fails with CAPACITY and leaves the cache empty and usable. */
static void test_checkpoint(void)
{
    char path[] = "/tmp/pikv-tiers-ckpt-XXXXXX";
    const int fd = mkstemp(path);
    if (!CHECK(fd >= 0)) return;
    close(fd);
    for (int dt = 0; dt < 4; dt++) {
        char what[96];
        snprintf(what, sizeof what, "checkpoint, %s", dtype_name((pikv_dtype)dt));
        tu_set_case("%s", what);
        pikv_cache_params p = base_params((pikv_dtype)dt, PIKV_PLACEMENT_EXPERT, 4);
        const uint64_t budget = measure_budget(&p, 900 + dt);
        pikv_tier_params tp = pikv_cache_default_params().tiers;
        tp.device_bytes = budget;
        pair pr;
        if (!pair_create(&pr, &p, &tp, 900 + dt, what)) continue;
        build_context(&pr, 2, 160);
        const int32_t seqs[2] = {0, 1};
        pair_attend(&pr, 0, seqs, 2, NULL, NULL, NULL);
        CHECK(tier_stats(pr.tier).host_pages > 0);
        CHECK_OK(pikv_cache_checkpoint(pr.tier, path, PIKV_CHECKPOINT_FULL, NULL));

        /* restore into a tiered cache with the same budget: compared with the no-tier cache */
        pikv_cache_params q = p;
        q.tiers = tp;
        q.tiers.enabled = 1;
        pikv_cache *restored = NULL;
        if (CHECK_OK(pikv_cache_create(g_ctx, &q, &restored))) {
            pikv_restore_report rep;
            memset(&rep, 0, sizeof rep);
            CHECK_OK(pikv_cache_restore(restored, path, &rep));
            CHECK_EQ(rep.n_failed, 0);
            check_device_budget(restored, what);
            pikv_cache_stats a, b;
            CHECK_OK(pikv_cache_get_stats(pr.ref, &a));
            CHECK_OK(pikv_cache_get_stats(restored, &b));
            CHECK_EQ(a.tokens, b.tokens);
            CHECK_EQ(a.pages, b.pages);
            const pikv_tier_stats ts = tier_stats(restored);
            CHECKF(ts.host_pages > 0 && ts.device_pages + ts.host_pages + ts.disk_pages == b.pages,
                   "%s: restored pages device %lld host %lld disk %lld of %lld", what, (long long)ts.device_pages,
                   (long long)ts.host_pages, (long long)ts.disk_pages, (long long)b.pages);
            pair rp = pr;
            rp.tier = restored;
            for (int32_t l = 0; l < p.n_layers; l++) pair_attend(&rp, l, seqs, 2, NULL, NULL, NULL);
            pr.rng = rp.rng;
            pikv_cache_free(restored);
        }

        /* a host tier of one page and no disk: the restore runs out of room, undoes itself */
        pikv_cache *probe = NULL;
        if (CHECK_OK(pikv_cache_create(g_ctx, &q, &probe))) {
            q.tiers.host_bytes = tier_page_bytes(probe);
            pikv_cache_free(probe);
        }
        pikv_cache *small = NULL;
        if (CHECK_OK(pikv_cache_create(g_ctx, &q, &small))) {
            pikv_cache_device_stats before[4];
            for (int32_t d = 0; d < 4; d++) CHECK_OK(pikv_cache_get_device_stats(small, d, &before[d]));
            CHECK_STATUS(PIKV_ERR_CAPACITY, pikv_cache_restore(small, path, NULL));
            pikv_cache_stats cs;
            CHECK_OK(pikv_cache_get_stats(small, &cs));
            CHECK_EQ(cs.tokens, 0);
            CHECK_EQ(cs.pages, 0);
            CHECK_EQ(cs.sequences, 0);
            const pikv_tier_stats ts = tier_stats(small);
            CHECK_EQ(ts.device_pages + ts.host_pages + ts.disk_pages, 0);
            for (int32_t d = 0; d < 4; d++) {
                pikv_cache_device_stats ds;
                CHECK_OK(pikv_cache_get_device_stats(small, d, &ds));
                CHECK_EQ(ds.shards, before[d].shards);
                CHECK_EQ(ds.pages, 0);
            }
            /* still usable: a sequence appends and attends */
            CHECK_OK(pikv_seq_add(small, 0));
            const size_t nv = 8 * (size_t)p.n_kv_heads * (size_t)p.head_dim;
            float *k = tu_xcalloc(nv, sizeof(float)), *v = tu_xcalloc(nv, sizeof(float));
            int32_t ex[16] = {0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1};
            CHECK_OK(pikv_cache_append(small, 0, 0, 8, k, v, NULL, ex));
            free(k);
            free(v);
            pikv_cache_free(small);
        }
        pair_free(&pr);
    }
    unlink(path);
}

int main(int argc, char **argv)
{
    /* argv[1] (optional): run only the parts whose name contains it */
    const char *only = argc > 1 ? argv[1] : "";
    pikv_context_params cp = pikv_context_default_params();
    cp.cpu_devices = 4; /* "one device and 3 CPU devices": every device is a CPU device here */
    cp.cpu_threads = 2;
    if (!CHECK_OK(pikv_context_create(&cp, &g_ctx))) return tu_finish();
    tu_err_ctx = g_ctx;
    static const struct {
        const char *name;
        void (*fn)(void);
    } parts[] = {{"moves", test_exact_moves}, {"budget", test_exact_budget}, {"quest", test_quest},
                 {"promotion", test_promotion_zero_copy},
                 {"evict", test_evict_demotes}, {"prefetch", test_prefetch}, {"faults", test_faults},
                 {"seqops", test_seq_ops}, {"alloc", test_alloc_failures}, {"checkpoint", test_checkpoint}};
    if (strcmp(only, "measure") == 0) { /* the figures of docs/tiers.md */
        measure();
    } else {
        for (size_t i = 0; i < sizeof parts / sizeof parts[0]; i++)
            if (strstr(parts[i].name, only)) parts[i].fn();
    }
    pikv_context_free(g_ctx);
    return tu_finish();
}
