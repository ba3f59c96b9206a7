/*
 * policies_evict: per-layer budgets (pikv_budgets_compute and the cache's layer budgets) and
 * the eviction policies.
 *
 *  1. budgets_compute: for 1..100 layers, many totals, floors and betas: PYRAMID budgets are
 *     non-increasing, on PyramidKV's line while the floors do not bind, each >= floor, summing
 *     to at most (and nearly) the total; UNIFORM is total / L; beta 1 is uniform; bad input
 *     fails and leaves out[] alone. The cache's layer budgets are the same numbers.
 *  2. Crafted eviction orders: one script of reads (QUEST reads aimed at single pages, with
 *     weak or strong attention) under which LRU, LFU, STREAMING, H2O and UTILITY with one-hot
 *     alphas must evict pages in orders written out here by hand.
 *  3. A simulator of the documented policies (keys, features, ties to the older page, sink
 *     and recent pages never, only full pages) run against the library on random scripts,
 *     dense (one page per shard, so each page's presence is observable) and expert-sharded:
 *     after every append the pages held per shard, lengths, budgets, eviction counters and
 *     expert misses agree, and every read's output is dense attention over exactly what the
 *     simulator says was read.
 *  4. A budget that is never reached changes nothing: outputs bitwise equal to a cache
 *     without budget, for every policy. Several layers keep within their pyramid budgets.
 *     Shared pages (copy-prefix) lose only the evicting sequence's reference.
 */
#include "test-util.h"

#include "policies-util.h"

static pikv_context *g_ctx[3];

/* ------------------------------------------------------------------------ */
/* 1. Budgets                                                                */
/* ------------------------------------------------------------------------ */

static void check_budgets(const pikv_budget_params *bp, int32_t L, int64_t floor_t, const char *what)
{
    int64_t out[128];
    for (int i = 0; i < 128; i++)
        out[i] = -777;
    pikv_status st = pikv_budgets_compute(bp, L, floor_t, out);
    if (!CHECKF(st == PIKV_OK, "%s: status %s", what, pikv_status_name(st)))
        return;
    const long double T = (long double)bp->total_tokens;
    long double sum = 0;
    int ok_floor = 1, ok_mono = 1, ok_line = 1;
    for (int i = 0; i < L; i++) {
        sum += (long double)out[i];
        ok_floor &= out[i] >= floor_t;
        if (i > 0)
            ok_mono &= out[i] <= out[i - 1];
    }
    CHECKF(out[L] == -777, "%s: wrote past n_layers", what);
    CHECKF(ok_floor, "%s: a budget below the floor %lld (last %lld)", what, (long long)floor_t, (long long)out[L - 1]);
    CHECKF(sum <= T, "%s: budgets sum to %.0Lf > total %lld", what, sum, (long long)bp->total_tokens);
    if (bp->mode == PIKV_BUDGET_UNIFORM) {
        for (int i = 0; i < L; i++)
            ok_line &= out[i] == bp->total_tokens / L;
        CHECKF(ok_line, "%s: uniform budget %lld, want %lld", what, (long long)out[0],
               (long long)(bp->total_tokens / L));
        return;
    }
    CHECKF(ok_mono, "%s: pyramid budgets increase somewhere", what);
    if (L == 1) { /* the one layer gets the total (within double rounding) */
        CHECKF(fabsl((long double)out[0] - T) <= 1e-12L * T, "%s: one layer gets %lld of %lld", what,
               (long long)out[0], (long long)bp->total_tokens);
        return;
    }
    /* PyramidKV's line while the floors do not bind: top T/(beta L), bottom 2T/L - top */
    const long double beta = bp->pyramid_beta, top = T / (beta * L), bottom = 2.0L * T / L - top;
    const long double d = (bottom - top) / (L - 1);
    if ((long double)floor_t <= top - 1.0L) {
        for (int i = 0; i < L; i++) {
            long double want = floorl(bottom - d * i);
            ok_line &= fabsl((long double)out[i] - want) <= 1.0L + 1e-12L * T;
        }
        CHECKF(ok_line, "%s: not on the line bottom %.3Lf, step %.3Lf (out[0] %lld, out[L-1] %lld)", what, bottom, d,
               (long long)out[0], (long long)out[L - 1]);
        CHECKF(sum >= T - L - 1e-12L * T, "%s: budgets sum to %.0Lf, far below total %lld", what, sum,
               (long long)bp->total_tokens);
    }
}

static void test_budgets_compute(void)
{
    const float betas[] = {1.0f, 1.0001f, 1.5f, 2.0f, 3.0f, 4.0f, 10.0f, 1000.0f, 1e30f};
    tu_rng r = tu_rng_seed(2024);
    long n = 0;
    char what[200];
    for (int32_t L = 1; L <= 100; L++)
        for (int trial = 0; trial < 6; trial++) {
            int64_t T;
            switch (trial) {
            case 0: T = L; break;
            case 1: T = tu_int(&r, L, 10 * L); break;
            case 2: T = tu_int(&r, L, 100000); break;
            case 3: T = tu_int(&r, 1000000, 1000000000); break;
            case 4: T = tu_int(&r, (int64_t)1 << 40, (int64_t)1 << 50); break;
            default: T = 4096 * (int64_t)L + tu_int(&r, 0, L - 1); break;
            }
            if (T < L)
                T = L;
            int64_t floors[4] = {0, tu_int(&r, 0, T / L), T / L, tu_int(&r, 0, T / L / 8 + 1)};
            for (int fi = 0; fi < 4; fi++) {
                int64_t fl = floors[fi] > T / L ? T / L : floors[fi];
                pikv_budget_params bp = {PIKV_BUDGET_UNIFORM, T, 4.0f};
                snprintf(what, sizeof what, "uniform L=%d T=%lld floor=%lld", L, (long long)T, (long long)fl);
                check_budgets(&bp, L, fl, what);
                bp.mode = PIKV_BUDGET_PYRAMID;
                for (size_t b = 0; b < sizeof betas / sizeof betas[0]; b++) {
                    bp.pyramid_beta = betas[b];
                    snprintf(what, sizeof what, "pyramid L=%d T=%lld floor=%lld beta=%g", L, (long long)T, (long long)fl,
                             (double)betas[b]);
                    check_budgets(&bp, L, fl, what);
                    n++;
                }
                /* beta 1 is uniform within rounding */
                int64_t u[100], p1[100];
                pikv_budget_params ub = {PIKV_BUDGET_UNIFORM, T, 1.0f}, pb = {PIKV_BUDGET_PYRAMID, T, 1.0f};
                if (pikv_budgets_compute(&ub, L, fl, u) == PIKV_OK && pikv_budgets_compute(&pb, L, fl, p1) == PIKV_OK) {
                    int same = 1;
                    for (int i = 0; i < L; i++)
                        same &= llabs(u[i] - p1[i]) <= 1;
                    CHECKF(same, "L=%d T=%lld floor=%lld: pyramid beta 1 is not uniform", L, (long long)T,
                           (long long)fl);
                }
                /* NONE: -1 everywhere */
                pikv_budget_params nb = {PIKV_BUDGET_NONE, 0, 0.0f};
                int64_t o[100];
                if (CHECK_OK(pikv_budgets_compute(&nb, L, fl, o))) {
                    int all = 1;
                    for (int i = 0; i < L; i++)
                        all &= o[i] == -1;
                    CHECK(all);
                }
            }
        }
    CHECK(n > 10000);
}

static void test_budgets_bad_input(void)
{
    int64_t out[8];
    struct {
        pikv_budget_mode mode;
        int64_t total;
        float beta;
        int32_t L;
        int64_t floor_t;
        int null_params, null_out;
    } bad[] = {
        {PIKV_BUDGET_UNIFORM, 11, 4.0f, 4, 3, 0, 0},   /* floor * L = 12 > 11 */
        {PIKV_BUDGET_PYRAMID, 11, 4.0f, 4, 3, 0, 0},
        {PIKV_BUDGET_PYRAMID, 100, 0.999f, 4, 0, 0, 0}, /* beta < 1 */
        {PIKV_BUDGET_PYRAMID, 100, 0.0f, 4, 0, 0, 0},
        {PIKV_BUDGET_PYRAMID, 100, -2.0f, 4, 0, 0, 0},
        {PIKV_BUDGET_PYRAMID, 100, NAN, 4, 0, 0, 0},
        {PIKV_BUDGET_PYRAMID, 100, INFINITY, 4, 0, 0, 0},
        {PIKV_BUDGET_UNIFORM, 0, 4.0f, 4, 0, 0, 0},     /* total < 1 */
        {PIKV_BUDGET_PYRAMID, -5, 4.0f, 4, 0, 0, 0},
        {PIKV_BUDGET_UNIFORM, 100, 4.0f, 0, 0, 0, 0},   /* n_layers < 1 */
        {PIKV_BUDGET_PYRAMID, 100, 4.0f, -1, 0, 0, 0},
        {PIKV_BUDGET_UNIFORM, 100, 4.0f, 4, -1, 0, 0},  /* negative floor */
        {(pikv_budget_mode)3, 100, 4.0f, 4, 0, 0, 0},   /* unknown mode */
        {(pikv_budget_mode)-1, 100, 4.0f, 4, 0, 0, 0},
        {PIKV_BUDGET_UNIFORM, 100, 4.0f, 4, 0, 1, 0},
        {PIKV_BUDGET_UNIFORM, 100, 4.0f, 4, 0, 0, 1},
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) {
        pikv_budget_params bp = {bad[k].mode, bad[k].total, bad[k].beta};
        for (int i = 0; i < 8; i++)
            out[i] = 1234;
        pikv_status st = pikv_budgets_compute(bad[k].null_params ? NULL : &bp, bad[k].L, bad[k].floor_t,
                                              bad[k].null_out ? NULL : out);
        CHECKF(st == PIKV_ERR_INVALID_ARGUMENT, "bad case %zu: status %s", k, pikv_status_name(st));
        int same = 1;
        for (int i = 0; i < 8; i++)
            same &= out[i] == 1234;
        CHECKF(same, "bad case %zu: out[] written on failure", k);
    }
    /* the edge that is allowed: floor * L == total */
    pikv_budget_params bp = {PIKV_BUDGET_PYRAMID, 12, 4.0f};
    if (CHECK_OK(pikv_budgets_compute(&bp, 4, 3, out)))
        CHECK(out[0] == 3 && out[1] == 3 && out[2] == 3 && out[3] == 3);
}

/* The cache's layer budgets are pikv_budgets_compute's, with floor = sinks + recent. */
static void test_cache_layer_budgets(void)
{
    tu_rng r = tu_rng_seed(31);
    for (int k = 0; k < 40; k++) {
        pikv_cache_params p = pt_params();
        p.n_layers = (int)tu_int(&r, 1, 12);
        p.select.sink_tokens = (int)tu_int(&r, 0, 8);
        p.select.recent_tokens = (int)tu_int(&r, 0, 16);
        int64_t floor_t = p.select.sink_tokens + p.select.recent_tokens;
        p.budget.mode = k % 3 == 0 ? PIKV_BUDGET_NONE : k % 3 == 1 ? PIKV_BUDGET_UNIFORM : PIKV_BUDGET_PYRAMID;
        p.budget.total_tokens = floor_t * p.n_layers + tu_int(&r, p.budget.mode == PIKV_BUDGET_NONE ? 0 : 1, 5000);
        p.budget.pyramid_beta = (float)(1.0 + 9.0 * tu_unif(&r));
        p.evict.policy = (pikv_evict_policy)tu_int(&r, p.budget.mode == PIKV_BUDGET_NONE ? 0 : 1, 5);
        tu_set_case("layer budgets %d: mode %d layers %d total %lld floor %lld", k, (int)p.budget.mode, p.n_layers,
                    (long long)p.budget.total_tokens, (long long)floor_t);
        pikv_cache *c = NULL;
        if (!CHECK_OK(pikv_cache_create(g_ctx[1], &p, &c)))
            continue;
        int64_t want[12];
        CHECK_OK(pikv_budgets_compute(&p.budget, p.n_layers, floor_t, want));
        for (int l = 0; l < p.n_layers; l++) {
            pikv_layer_stats ls;
            CHECK_OK(pikv_cache_get_layer_stats(c, l, &ls));
            CHECK_EQ(ls.budget_tokens, want[l]);
            CHECK_EQ(ls.evicted_pages, 0);
        }
        pikv_cache_free(c);
    }
    tu_set_case("");
}

/* Totals near INT64_MAX: the same invariants (run last: a signed overflow here would stop a
   sanitizer build). */
static void test_budgets_huge_totals(void)
{
    const int64_t totals[3] = {(int64_t)1 << 62, INT64_MAX - 1000, INT64_MAX};
    char what[160];
    for (int ti = 0; ti < 3; ti++)
        for (int32_t L = 1; L <= 3; L++) {
            const float betas[3] = {1.0f, 4.0f, 1e6f};
            for (int b = 0; b < 3; b++) {
                pikv_budget_params bp = {PIKV_BUDGET_PYRAMID, totals[ti], betas[b]};
                snprintf(what, sizeof what, "huge total %lld L=%d beta=%g", (long long)totals[ti], L, (double)betas[b]);
                check_budgets(&bp, L, 0, what);
            }
        }
}

/* ------------------------------------------------------------------------ */
/* 2-3. The eviction simulator                                               */
/* ------------------------------------------------------------------------ */

#define EV_PS 4
#define EV_HD 32
#define EV_NKV 2
#define EV_NQH 4
#define EV_MAXP 32 /* each page's keys point along their own channel */
#define EV_MAXT (EV_MAXP * EV_PS)
#define EV_SHARDS 64

typedef struct ev_page {
    int shard, n, live;
    int64_t tok[EV_PS];
    int64_t last_use;
    int use_count;
    double mass;
} ev_page;

typedef struct ev {
    pikv_cache *c;
    pikv_cache_params p;
    int ne, n_shards;
    int64_t budget;
    ev_page pg[EV_MAXP];
    int np;
    int open[EV_SHARDS];
    int64_t next, n_tokens, clock;
    long evicted, shard_evicted[EV_SHARDS];
    int ambiguous, broken;
    float K[EV_MAXT * EV_NKV * EV_HD], V[EV_MAXT * EV_NKV * EV_HD];
    tu_rng r;
    int victims[EV_MAXT]; /* observed (dense: per page) in order */
    int n_victims;
    long reads;
} ev;

static int ev_init(ev *e, pikv_evict_policy policy, float a_att, float a_rec, float a_freq, int sink, int recent,
                   int64_t budget, int ne, int ndev, uint64_t seed)
{
    memset(e, 0, sizeof *e);
    e->r = tu_rng_seed(seed);
    pikv_cache_params p = pt_params();
    p.n_q_heads = EV_NQH;
    p.n_kv_heads = EV_NKV;
    p.head_dim = EV_HD;
    p.page_size = EV_PS;
    p.max_sequences = 2;
    if (ne == 1) {
        p.n_shards = EV_SHARDS; /* dense: page j is shard j, its presence is shard_info's pages */
    } else {
        p.n_experts = ne;
        p.experts_per_token = 1;
        p.placement = PIKV_PLACEMENT_EXPERT;
    }
    p.select.sink_tokens = sink;
    p.select.recent_tokens = recent;
    p.budget.mode = PIKV_BUDGET_UNIFORM;
    p.budget.total_tokens = budget;
    p.evict.policy = policy;
    p.evict.alpha_attention = a_att;
    p.evict.alpha_recency = a_rec;
    p.evict.alpha_frequency = a_freq;
    e->p = p;
    e->ne = ne;
    e->budget = budget;
    for (int s = 0; s < EV_SHARDS; s++)
        e->open[s] = -1;
    if (!CHECK_OK(pikv_cache_create(g_ctx[ndev], &p, &e->c)))
        return 0;
    e->n_shards = pt_stats(e->c).n_shards;
    CHECK_OK(pikv_seq_add(e->c, 0));
    return 1;
}

static int ev_protected(const ev *e, int j)
{
    const ev_page *pg = &e->pg[j];
    return pg->tok[0] < e->p.select.sink_tokens || pg->tok[pg->n - 1] >= e->next - e->p.select.recent_tokens;
}

static int ev_candidate(const ev *e, int j)
{
    return e->pg[j].live && e->pg[j].n == EV_PS && !ev_protected(e, j);
}

static double ev_key(const ev *e, int j, float max_mass, int max_count, int64_t min_use, int64_t max_use)
{
    const ev_page *pg = &e->pg[j];
    switch (e->p.evict.policy) {
    case PIKV_EVICT_LRU: return (double)pg->last_use;
    case PIKV_EVICT_LFU: return (double)pg->use_count;
    case PIKV_EVICT_H2O: return pg->mass;
    case PIKV_EVICT_UTILITY: {
        double att = max_mass > 0 ? pg->mass / (double)max_mass : 0.0;
        double rec = max_use > min_use ? (double)(pg->last_use - min_use) / (double)(max_use - min_use) : 1.0;
        double freq = max_count > 0 ? (double)pg->use_count / max_count : 0.0;
        return (double)e->p.evict.alpha_attention * att + (double)e->p.evict.alpha_recency * rec +
               (double)e->p.evict.alpha_frequency * freq;
    }
    default: return 0.0; /* STREAMING: the oldest */
    }
}

/* The documented policy: while over budget, evict the candidate with the lowest key, ties
   to the page whose first token is oldest. */
static void ev_sim_evict(ev *e)
{
    while (e->n_tokens > e->budget) {
        float max_mass = 0.0f;
        int max_count = 0;
        int64_t min_use = INT64_MAX, max_use = INT64_MIN;
        for (int j = 0; j < e->np; j++) {
            if (!ev_candidate(e, j))
                continue;
            max_mass = (float)e->pg[j].mass > max_mass ? (float)e->pg[j].mass : max_mass;
            max_count = e->pg[j].use_count > max_count ? e->pg[j].use_count : max_count;
            min_use = e->pg[j].last_use < min_use ? e->pg[j].last_use : min_use;
            max_use = e->pg[j].last_use > max_use ? e->pg[j].last_use : max_use;
        }
        int best = -1;
        double bk = INFINITY;
        for (int j = 0; j < e->np; j++) {
            if (!ev_candidate(e, j))
                continue;
            double k = ev_key(e, j, max_mass, max_count, min_use, max_use);
            if (k < bk || (k == bk && e->pg[j].tok[0] < e->pg[best].tok[0])) {
                bk = k;
                best = j;
            }
        }
        if (best < 0)
            return;
        if (e->p.evict.policy == PIKV_EVICT_H2O || e->p.evict.policy == PIKV_EVICT_UTILITY)
            for (int j = 0; j < e->np; j++) {
                if (j == best || !ev_candidate(e, j))
                    continue;
                double k = ev_key(e, j, max_mass, max_count, min_use, max_use);
                if (k != bk && fabs(k - bk) <= 1e-4 * fmax(1.0, fabs(bk)))
                    e->ambiguous = 1; /* float keys too close to call */
            }
        e->pg[best].live = 0;
        e->n_tokens -= EV_PS;
        e->evicted++;
        e->shard_evicted[e->pg[best].shard]++;
    }
}

static int ev_has_candidate(const ev *e)
{
    for (int j = 0; j < e->np; j++)
        if (ev_candidate(e, j))
            return 1;
    return 0;
}

/* Pages n more tokens would create (experts: their top-1). */
static int ev_new_pages(const ev *e, int n, const int32_t *experts)
{
    int fill[EV_SHARDS], add = 0;
    for (int s = 0; s < EV_SHARDS; s++)
        fill[s] = e->open[s] >= 0 ? e->pg[e->open[s]].n : EV_PS;
    for (int i = 0; i < n; i++) {
        int64_t t = e->next + i;
        int s = e->ne == 1 ? (int)((t / EV_PS) % e->n_shards) : experts[i];
        if (fill[s] == EV_PS) {
            add++;
            fill[s] = 0;
        }
        fill[s]++;
    }
    return add;
}

/* Compares what the library holds with the simulator. */
static void ev_compare(ev *e, const char *what)
{
    if (e->ambiguous || e->broken)
        return;
    int64_t len = pt_len(e->c, 0, 0);
    int ok = CHECKF(len == e->n_tokens, "%s: length %lld, simulator %lld", what, (long long)len, (long long)e->n_tokens);
    int64_t next = -1; /* tokens appended, evicted ones included */
    CHECK_OK(pikv_seq_next_index(e->c, 0, 0, &next));
    ok &= CHECKF(next == e->next, "%s: next index %lld, simulator %lld", what, (long long)next, (long long)e->next);
    for (int s = 0; s < e->n_shards; s++) {
        int64_t pages = -1, tokens = -1, sp = 0, stk = 0;
        CHECK_OK(pikv_cache_shard_info(e->c, 0, s, NULL, &pages, &tokens));
        for (int j = 0; j < e->np; j++)
            if (e->pg[j].live && e->pg[j].shard == s) {
                sp++;
                stk += e->pg[j].n;
            }
        ok &= CHECKF(pages == sp && tokens == stk, "%s: shard %d holds %lld pages / %lld tokens, simulator %lld / %lld",
                     what, s, (long long)pages, (long long)tokens, (long long)sp, (long long)stk);
    }
    /* sink and recent pages are never evicted */
    for (int j = 0; j < e->np; j++)
        if (ev_protected(e, j))
            ok &= CHECKF(e->pg[j].live, "%s: protected page %d (tokens %lld..) gone", what, j, (long long)e->pg[j].tok[0]);
    /* within budget unless only protected or partial pages are left */
    ok &= CHECKF(len <= e->budget || !ev_has_candidate(e), "%s: length %lld over budget %lld with evictable pages", what,
                 (long long)len, (long long)e->budget);
    pikv_cache_stats st = pt_stats(e->c);
    pikv_layer_stats ls;
    CHECK_OK(pikv_cache_get_layer_stats(e->c, 0, &ls));
    ok &= CHECK_EQ(st.evicted_pages, e->evicted);
    ok &= CHECK_EQ(st.evicted_tokens, e->evicted * EV_PS);
    ok &= CHECK_EQ(ls.evicted_pages, e->evicted);
    ok &= CHECK_EQ(ls.budget_tokens, e->budget);
    if (e->ne > 1)
        for (int x = 0; x < e->ne; x++) {
            pikv_expert_stats es;
            CHECK_OK(pikv_cache_get_expert_stats(e->c, 0, x, &es));
            ok &= CHECKF(es.misses == (double)e->shard_evicted[x], "%s: expert %d misses %g, pages evicted %ld", what, x,
                         es.misses, e->shard_evicted[x]);
        }
    if (!ok) {
        e->broken = 1; /* later steps would only repeat the divergence */
        fprintf(stderr, "    simulator pages (first token:live:uses:last use:mass):");
        for (int j = 0; j < e->np; j++)
            fprintf(stderr, " %lld:%d:%d:%lld:%.3f", (long long)e->pg[j].tok[0], e->pg[j].live, e->pg[j].use_count,
                    (long long)e->pg[j].last_use, e->pg[j].mass);
        fprintf(stderr, "\n");
    }
}

/* Appends n tokens (experts: top-1 of each, for expert caches). Returns 0 if it would need more
   pages than the simulator has key channels. */
static int ev_append(ev *e, int n, const int32_t *experts)
{
    if (e->broken || e->ambiguous || e->next + n > EV_MAXT || e->np + ev_new_pages(e, n, experts) > EV_MAXP)
        return 0;
    const size_t row = EV_NKV * EV_HD;
    for (int i = 0; i < n; i++) {
        int64_t t = e->next + i;
        int s = e->ne == 1 ? (int)((t / EV_PS) % e->n_shards) : experts[i];
        int j = e->open[s];
        if (j < 0 || e->pg[j].n == EV_PS) {
            j = e->np++;
            memset(&e->pg[j], 0, sizeof e->pg[j]);
            e->pg[j].shard = s;
            e->pg[j].live = 1;
            e->pg[j].last_use = e->clock;
            e->open[s] = j;
        }
        e->pg[j].tok[e->pg[j].n++] = t;
        float *k = e->K + (size_t)t * row, *v = e->V + (size_t)t * row;
        tu_fill(&e->r, k, row, 0.05f);
        tu_fill(&e->r, v, row, 1.0f);
        for (int g = 0; g < EV_NKV; g++)
            k[g * EV_HD + j % EV_HD] += 2.0f;
    }
    int64_t before[EV_SHARDS];
    for (int s = 0; s < e->n_shards; s++)
        CHECK_OK(pikv_cache_shard_info(e->c, 0, s, NULL, &before[s], NULL));
    if (!CHECK_OK(pikv_cache_append(e->c, 0, 0, n, e->K + (size_t)e->next * row, e->V + (size_t)e->next * row, NULL,
                                    experts))) {
        e->broken = 1;
        return 0;
    }
    e->next += n;
    e->n_tokens += n;
    ev_sim_evict(e);
    if (e->ne == 1) /* observed victims: pages (= shards) that went */
        for (int s = 0; s < e->n_shards; s++) {
            int64_t after = 0;
            CHECK_OK(pikv_cache_shard_info(e->c, 0, s, NULL, &after, NULL));
            if (after < before[s])
                e->victims[e->n_victims++] = s;
        }
    ev_compare(e, "after append");
    return 1;
}

/* One attend of query q reading `read` (pages) under sel; checks the output against dense
   attention over those pages and moves the simulator's statistics. */
static void ev_read(ev *e, const pikv_select_params *sel, const float *q, const int *read)
{
    if (e->broken || e->ambiguous)
        return;
    uint8_t mask[EV_NKV * EV_MAXT];
    memset(mask, 0, sizeof mask);
    int64_t tokens = 0;
    for (int j = 0; j < e->np; j++)
        if (read[j]) {
            for (int i = 0; i < e->pg[j].n; i++)
                for (int g = 0; g < EV_NKV; g++)
                    mask[g * e->next + e->pg[j].tok[i]] = 1;
            tokens += e->pg[j].n;
        }
    float out[EV_NQH * EV_HD], lse[EV_NQH];
    int32_t seq0 = 0;
    pikv_attend_batch b = pt_batch(1, &seq0, q, NULL, out, lse, sel);
    if (!CHECK_OK(pikv_cache_attend(e->c, 0, &b))) {
        e->broken = 1;
        return;
    }
    e->reads++;
    double ro[EV_NQH * EV_HD], rl[EV_NQH];
    const double scale = 1.0 / sqrt((double)EV_HD);
    pt_ref_masked(e->next, EV_NQH, EV_NKV, EV_HD, scale, q, e->K, e->V, mask, ro, rl);
    double err = tu_norm_err(out, ro, EV_NQH * EV_HD);
    if (!CHECKF(err <= TU_TOL_EXACT && pt_lse_err(lse, rl, EV_NQH) <= TU_TOL_LSE,
                "read of %lld tokens: output error %.3g vs dense over the pages meant to be read", (long long)tokens, err))
        e->broken = 1;
    CHECK_EQ(pt_stats(e->c).last_tokens_read, tokens);
    /* simulator: clock, use, and each page's share of the softmax summed over the heads */
    e->clock++;
    for (int h = 0; h < EV_NQH; h++) {
        const int g = h / (EV_NQH / EV_NKV);
        for (int j = 0; j < e->np; j++) {
            if (!read[j])
                continue;
            double share = 0.0;
            for (int i = 0; i < e->pg[j].n; i++) {
                const float *k = e->K + ((size_t)e->pg[j].tok[i] * EV_NKV + g) * EV_HD;
                double dot = 0.0;
                for (int d = 0; d < EV_HD; d++)
                    dot += (double)q[h * EV_HD + d] * k[d];
                share += exp(dot * scale - rl[h]);
            }
            e->pg[j].mass += share;
        }
    }
    for (int j = 0; j < e->np; j++)
        if (read[j]) {
            e->pg[j].last_use = e->clock;
            e->pg[j].use_count++;
        }
}

static int64_t ev_forced(const ev *e, int *read)
{
    int64_t t = 0;
    for (int j = 0; j < e->np; j++) {
        read[j] = e->pg[j].live && ev_protected(e, j);
        t += read[j] ? e->pg[j].n : 0;
    }
    return t;
}

/* QUEST read aimed at page j: a query along j's key channel (amplitude amp per head) and a
   budget of the forced pages plus j. Returns 0 when the budget rules do not allow it. */
static int ev_read_page(ev *e, int j, const float *amp)
{
    if (j < 0 || j >= e->np || !e->pg[j].live || ev_protected(e, j))
        return 0;
    int read[EV_MAXP];
    int64_t budget = ev_forced(e, read) + e->pg[j].n;
    if (budget < e->p.select.sink_tokens + e->p.select.recent_tokens)
        return 0;
    read[j] = 1;
    pikv_select_params sel = e->p.select;
    sel.mode = PIKV_SELECT_QUEST;
    sel.token_budget = (int32_t)budget;
    float q[EV_NQH * EV_HD];
    memset(q, 0, sizeof q);
    for (int h = 0; h < EV_NQH; h++)
        q[h * EV_HD + j % EV_HD] = amp[h];
    ev_read(e, &sel, q, read);
    return 1;
}

/* QUEST read of the forced pages only (budget = their tokens), zero query. */
static int ev_read_forced(ev *e)
{
    int read[EV_MAXP];
    int64_t budget = ev_forced(e, read);
    if (budget < 1 || budget < e->p.select.sink_tokens + e->p.select.recent_tokens)
        return 0;
    pikv_select_params sel = e->p.select;
    sel.mode = PIKV_SELECT_QUEST;
    sel.token_budget = (int32_t)budget;
    float q[EV_NQH * EV_HD];
    memset(q, 0, sizeof q);
    ev_read(e, &sel, q, read);
    return 1;
}

static void ev_read_all(ev *e, float amp)
{
    int read[EV_MAXP];
    for (int j = 0; j < e->np; j++)
        read[j] = e->pg[j].live;
    float q[EV_NQH * EV_HD];
    tu_fill(&e->r, q, EV_NQH * EV_HD, amp);
    pikv_select_params sel = e->p.select;
    sel.mode = PIKV_SELECT_ALL;
    ev_read(e, &sel, q, read);
}

/* ---- 2. crafted orders ---------------------------------------------------- */

/*
 * sink 4, recent 4, budget 28 tokens, pages of 4: after 28 tokens pages 0..6 are held, page 0
 * (sink) and page 6 (recent) protected. Reads (QUEST aimed at one page; amplitude = how
 * strongly the query attends to it):
 *   page 3 strong (6), page 1 weak (0.1) x3, page 4 medium (3) x2, page 2 strongest (8),
 *   page 5 weak x2
 * so: last reads 3 < 1 < 4 < 2 < 5; read counts 2:1 = 3:1 < 4:2 = 5:2 < 1:3; attention mass
 * 5 (~2.7) < 3 (~3.2) < 2 (~3.6) < 1 (~4.1) < 4 (~4.7). Then five times: four reads of the
 * forced pages only (so the page that leaves the recent window is read often, recently and
 * with mass) and one page of tokens, which evicts exactly one page.
 */
static void crafted_case(pikv_evict_policy policy, float aa, float ar, float af, const int *want, const char *name)
{
    tu_set_case("crafted order: %s", name);
    ev *e = tu_xcalloc(1, sizeof *e);
    if (!ev_init(e, policy, aa, ar, af, 4, 4, 28, 1, 1, 11)) {
        free(e);
        return;
    }
    CHECK(ev_append(e, 28, NULL));
    struct {
        int page;
        float amp;
        int times;
    } reads[] = {{3, 6.0f, 1}, {1, 0.1f, 3}, {4, 3.0f, 2}, {2, 8.0f, 1}, {5, 0.1f, 2}};
    for (size_t k = 0; k < sizeof reads / sizeof reads[0]; k++)
        for (int t = 0; t < reads[k].times; t++) {
            float amp[EV_NQH] = {reads[k].amp, reads[k].amp, reads[k].amp, reads[k].amp};
            CHECK(ev_read_page(e, reads[k].page, amp));
        }
    for (int step = 0; step < 5; step++) {
        for (int t = 0; t < 4; t++)
            CHECK(ev_read_forced(e));
        CHECK(ev_append(e, 4, NULL));
    }
    CHECK(!e->ambiguous);
    int same = e->n_victims == 5;
    for (int i = 0; same && i < 5; i++)
        same = e->victims[i] == want[i];
    CHECKF(same, "%s evicted pages %d %d %d %d %d (%d in all), want %d %d %d %d %d", name, e->victims[0], e->victims[1],
           e->victims[2], e->victims[3], e->victims[4], e->n_victims, want[0], want[1], want[2], want[3], want[4]);
    ev_read_all(e, 1.0f); /* output over exactly what is left */
    pikv_cache_free(e->c);
    free(e);
    tu_set_case("");
}

static void test_crafted_orders(void)
{
    const int lru[5] = {3, 1, 4, 2, 5}, lfu[5] = {2, 3, 4, 5, 1}, stream[5] = {1, 2, 3, 4, 5}, h2o[5] = {5, 3, 2, 1, 4};
    crafted_case(PIKV_EVICT_LRU, 0.6f, 0.2f, 0.2f, lru, "LRU");
    crafted_case(PIKV_EVICT_LFU, 0.6f, 0.2f, 0.2f, lfu, "LFU");
    crafted_case(PIKV_EVICT_STREAMING, 0.6f, 0.2f, 0.2f, stream, "STREAMING");
    crafted_case(PIKV_EVICT_H2O, 0.6f, 0.2f, 0.2f, h2o, "H2O");
    crafted_case(PIKV_EVICT_UTILITY, 1.0f, 0.0f, 0.0f, h2o, "UTILITY (1,0,0) = H2O");
    crafted_case(PIKV_EVICT_UTILITY, 0.0f, 0.0f, 1.0f, lfu, "UTILITY (0,0,1) = LFU");
    crafted_case(PIKV_EVICT_UTILITY, 0.0f, 1.0f, 0.0f, lru, "UTILITY (0,1,0) = LRU");
}

/* StreamingLLM by the token: sinks + the most recent pages stay. */
static void test_streaming_by_token(void)
{
    for (int sink = 4; sink <= 5; sink++) {
        tu_set_case("streaming one token at a time, sink %d", sink);
        ev *e = tu_xcalloc(1, sizeof *e);
        if (!ev_init(e, PIKV_EVICT_STREAMING, 0.6f, 0.2f, 0.2f, sink, 4, 24, 1, 1, 3)) {
            free(e);
            continue;
        }
        for (int t = 0; t < 40; t++)
            CHECK(ev_append(e, 1, NULL));
        /* 40 tokens, budget 24: sink 4 keeps page 0 and pages 5..9; sink 5 also keeps page 1 and
           so only pages 6..9 besides (24 tokens in all either way) */
        int want4[10] = {1, 0, 0, 0, 0, 1, 1, 1, 1, 1}, want5[10] = {1, 1, 0, 0, 0, 0, 1, 1, 1, 1};
        const int *want = sink == 4 ? want4 : want5;
        for (int j = 0; j < 10; j++) {
            int64_t pages = -1;
            CHECK_OK(pikv_cache_shard_info(e->c, 0, j, NULL, &pages, NULL));
            CHECKF(pages == want[j], "page %d: held %lld, want %d", j, (long long)pages, want[j]);
        }
        CHECK_EQ(pt_len(e->c, 0, 0), 24);
        ev_read_all(e, 1.0f);
        pikv_cache_free(e->c);
        free(e);
    }
    tu_set_case("");
}

/* LFU counts attend calls, not the KV heads that read a page: page 1 is read twice by KV head
   0 only, page 3 twice by KV head 1 only, page 2 once by both; page 2 (one call) must go
   first, not page 1 (the oldest of a three-way tie if heads were counted). */
static void test_lfu_counts_calls(void)
{
    tu_set_case("LFU counts calls, not heads");
    const int hd = 16, nkv = 2, ps = 4;
    pikv_cache_params p = pt_params();
    p.n_shards = EV_SHARDS; /* page j is shard j */
    p.select.sink_tokens = 4;
    p.select.recent_tokens = 4;
    p.budget.mode = PIKV_BUDGET_UNIFORM;
    p.budget.total_tokens = 20;
    p.evict.policy = PIKV_EVICT_LFU;
    pikv_cache *c = NULL;
    if (!CHECK_OK(pikv_cache_create(g_ctx[1], &p, &c)))
        return;
    tu_rng r = tu_rng_seed(333);
    float K[24 * 32], V[24 * 32];
    tu_fill(&r, K, 24 * 32, 0.05f);
    tu_fill(&r, V, 24 * 32, 1.0f);
    for (int t = 0; t < 24; t++) {
        const int j = t / ps;
        if (j == 1) /* KV head 0 along channel 0 */
            K[(t * nkv + 0) * hd + 0] = 2.0f;
        if (j == 3) /* KV head 1 along channel 1 */
            K[(t * nkv + 1) * hd + 1] = 2.0f;
        if (j == 2) /* both heads along channel 2 */
            for (int g = 0; g < nkv; g++)
                K[(t * nkv + g) * hd + 2] = 2.0f;
    }
    CHECK_OK(pikv_seq_add(c, 0));
    CHECK_OK(pikv_cache_append(c, 0, 0, 20, K, V, NULL, NULL)); /* pages 0..4, at budget */
    pikv_select_params sel = p.select;
    sel.mode = PIKV_SELECT_QUEST;
    sel.token_budget = 12; /* the sink page, the recent page 4, and one page per KV head */
    float q[4 * 16], out[4 * 16];
    int32_t seq0 = 0;
    for (int call = 0; call < 3; call++) {
        memset(q, 0, sizeof q);
        for (int h = 0; h < 4; h++)
            q[h * hd + (call < 2 ? (h < 2 ? 0 : 1) : 2)] = 3.0f;
        pikv_attend_batch b = pt_batch(1, &seq0, q, NULL, out, NULL, &sel);
        CHECK_OK(pikv_cache_attend(c, 0, &b));
        CHECK_EQ(pt_stats(c).last_tokens_read, 12);
    }
    CHECK_OK(pikv_cache_append(c, 0, 0, 4, K + 20 * 32, V + 20 * 32, NULL, NULL)); /* over budget: one page goes */
    int64_t held[5];
    for (int j = 0; j < 5; j++)
        CHECK_OK(pikv_cache_shard_info(c, 0, j, NULL, &held[j], NULL));
    CHECKF(held[0] == 1 && held[1] == 1 && held[2] == 0 && held[3] == 1 && held[4] == 1,
           "pages held %lld %lld %lld %lld %lld: page 2 (read by one call) should have gone", (long long)held[0],
           (long long)held[1], (long long)held[2], (long long)held[3], (long long)held[4]);
    pikv_cache_free(c);
    tu_set_case("");
}

/* ---- 3. random scripts against the simulator ------------------------------ */

static void test_random_scripts(void)
{
    long runs = 0, ambiguous = 0, evicted = 0, reads = 0;
    const int sinks[5] = {0, 1, 4, 5, 8}, recents[5] = {0, 1, 3, 4, 8};
    for (uint64_t seed = 1; seed <= 300; seed++) {
        tu_rng r = tu_rng_seed(seed * 6364136223846793005ull + 1);
        pikv_evict_policy policy = (pikv_evict_policy)(1 + seed % 5);
        float aa = 0.6f, ar = 0.2f, af = 0.2f;
        if (policy == PIKV_EVICT_UTILITY) {
            const float al[5][3] = {{1, 0, 0}, {0, 1, 0}, {0, 0, 1}, {0.6f, 0.2f, 0.2f}, {0.3f, 0.5f, 0.9f}};
            int k = (int)(seed / 5 % 5);
            aa = al[k][0];
            ar = al[k][1];
            af = al[k][2];
        }
        const int ne = seed % 3 == 0 ? 4 : 1;
        const int sink = sinks[tu_int(&r, 0, 4)], recent = recents[tu_int(&r, 0, 4)];
        const int64_t budget = sink + recent + tu_int(&r, 4, 24);
        tu_set_case("random script seed %llu: policy %d alphas (%g,%g,%g) experts %d sink %d recent %d budget %lld",
                    (unsigned long long)seed, (int)policy, (double)aa, (double)ar, (double)af, ne, sink, recent,
                    (long long)budget);
        ev *e = tu_xcalloc(1, sizeof *e);
        if (!ev_init(e, policy, aa, ar, af, sink, recent, budget, ne, ne == 1 ? 1 : 2, seed)) {
            free(e);
            continue;
        }
        for (int op = 0; op < 80 && !e->broken && !e->ambiguous; op++) {
            int kind = (int)tu_int(&r, 0, 9);
            if (kind < 4) {
                int n = (int)tu_int(&r, 1, 6);
                int32_t ex[6];
                for (int i = 0; i < n; i++)
                    ex[i] = (int32_t)tu_int(&r, 0, ne - 1);
                if (!ev_append(e, n, ne > 1 ? ex : NULL))
                    break;
            } else if (kind < 8) {
                float amp[EV_NQH];
                for (int h = 0; h < EV_NQH; h++)
                    amp[h] = (float)(0.05 + 6.0 * tu_unif(&r));
                int tries = 0;
                while (tries++ < 8 && !ev_read_page(e, (int)tu_int(&r, 0, e->np - 1), amp))
                    ;
            } else if (kind == 8) {
                ev_read_forced(e);
            } else {
                ev_read_all(e, 1.5f);
            }
        }
        ambiguous += e->ambiguous;
        evicted += e->evicted;
        reads += e->reads;
        if (!e->ambiguous && !e->broken) {
            ev_read_all(e, 1.0f);
            runs++;
        }
        pikv_cache_free(e->c);
        free(e);
    }
    tu_set_case("");
    CHECKF(runs >= 250 && evicted > 3000 && reads > 5000, "runs %ld (ambiguous %ld), pages evicted %ld, reads %ld", runs,
           ambiguous, evicted, reads);
    printf("random_scripts: %ld scripts, %ld too close to call, %ld pages evicted, %ld reads\n", runs, ambiguous, evicted,
           reads);
}

/* ------------------------------------------------------------------------ */
/* 4. No eviction = no change; several layers; shared pages                  */
/* ------------------------------------------------------------------------ */

static void test_unreached_budget_bitwise(void)
{
    for (int policy = PIKV_EVICT_LRU; policy <= PIKV_EVICT_UTILITY; policy++) {
        tu_set_case("unreached budget, policy %d", policy);
        pikv_cache_params p = pt_params();
        p.n_layers = 2;
        p.n_experts = 4;
        p.experts_per_token = 2;
        p.dtype = PIKV_DTYPE_F16;
        p.select.sink_tokens = 3;
        p.select.recent_tokens = 5;
        pikv_cache_params pe = p;
        pe.budget.mode = policy % 2 ? PIKV_BUDGET_UNIFORM : PIKV_BUDGET_PYRAMID;
        pe.budget.total_tokens = 100000;
        pe.evict.policy = (pikv_evict_policy)policy;
        pikv_cache *cx = NULL, *ce = NULL;
        if (!CHECK_OK(pikv_cache_create(g_ctx[2], &p, &cx)) || !CHECK_OK(pikv_cache_create(g_ctx[2], &pe, &ce))) {
            pikv_cache_free(cx);
            continue;
        }
        tu_model m;
        tu_model_init(&m, &p);
        tu_rng r = tu_rng_seed(500 + (uint64_t)policy), r2;
        for (int s = 0; s < 3; s++) {
            CHECK_OK(pikv_seq_add(cx, s));
            CHECK_OK(pikv_seq_add(ce, s));
        }
        const size_t per = 4 * 16;
        float q[3 * 64], o1[3 * 64], o2[3 * 64], l1[12], l2[12];
        int32_t seqs[3] = {0, 1, 2}, qex[6];
        long compared = 0;
        for (int step = 0; step < 30; step++) {
            int l = (int)tu_int(&r, 0, 1), s = (int)tu_int(&r, 0, 2), n = (int)tu_int(&r, 1, 20);
            r2 = r;
            CHECK_OK(tu_append_random(cx, &m, &r, l, s, n, 1));
            tu_model m2;
            tu_model_init(&m2, &p);
            CHECK_OK(tu_append_random(ce, &m2, &r2, l, s, n, 1));
            tu_model_free(&m2);
            tu_fill(&r, q, 3 * per, 1.5f);
            for (int i = 0; i < 3; i++)
                tu_pick_experts(&r, 4, 2, 0, qex + 2 * i);
            pikv_select_params sel = p.select;
            int mode = (int)tu_int(&r, 0, 3);
            sel.mode = mode == 0 ? PIKV_SELECT_ALL : mode == 1 ? PIKV_SELECT_QUEST
                                 : mode == 2 ? PIKV_SELECT_EXPERTS
                                             : PIKV_SELECT_EXPERTS | PIKV_SELECT_QUEST;
            sel.token_budget = 8 + (int)tu_int(&r, 0, 30);
            pikv_attend_batch b1 = pt_batch(3, seqs, q, qex, o1, l1, &sel), b2 = pt_batch(3, seqs, q, qex, o2, l2, &sel);
            if (CHECK_OK(pikv_cache_attend(cx, l, &b1)) && CHECK_OK(pikv_cache_attend(ce, l, &b2))) {
                CHECKF(memcmp(o1, o2, sizeof o1) == 0 && memcmp(l1, l2, sizeof l1) == 0, "step %d (mode %u): output differs",
                       step, sel.mode);
                compared++;
            }
        }
        CHECK(compared == 30);
        pikv_cache_stats s = pt_stats(ce);
        CHECK_EQ(s.evicted_pages, 0);
        CHECK_EQ(s.tokens, pt_stats(cx).tokens);
        tu_model_free(&m);
        pikv_cache_free(cx);
        pikv_cache_free(ce);
    }
    tu_set_case("");
}

/* Four layers with pyramid budgets: each layer stays within its own budget (page granular)
   once it is reached; evictions add up over the layers. */
static void test_layers_within_budget(void)
{
    for (int policy = PIKV_EVICT_LRU; policy <= PIKV_EVICT_UTILITY; policy++) {
        tu_set_case("layers within budget, policy %d", policy);
        pikv_cache_params p = pt_params();
        p.n_layers = 4;
        p.select.sink_tokens = 4;
        p.select.recent_tokens = 4;
        p.budget.mode = PIKV_BUDGET_PYRAMID;
        p.budget.total_tokens = 160;
        p.budget.pyramid_beta = 2.0f;
        p.evict.policy = (pikv_evict_policy)policy;
        pikv_cache *c = NULL;
        if (!CHECK_OK(pikv_cache_create(g_ctx[1], &p, &c)))
            continue;
        int64_t want[4];
        CHECK_OK(pikv_budgets_compute(&p.budget, 4, 8, want));
        CHECK(want[0] > want[1] && want[1] > want[2] && want[2] > want[3]);
        tu_model m;
        tu_model_init(&m, &p);
        tu_rng r = tu_rng_seed(900 + (uint64_t)policy);
        CHECK_OK(pikv_seq_add(c, 0));
        float q[64], out[64];
        int32_t seq0 = 0;
        int64_t appended[4] = {0, 0, 0, 0};
        for (int step = 0; step < 60; step++) {
            int l = step % 4, n = (int)tu_int(&r, 1, 7);
            CHECK_OK(tu_append_random(c, &m, &r, l, 0, n, 0));
            appended[l] += n;
            int64_t len = pt_len(c, 0, l);
            CHECKF(len <= want[l], "layer %d: %lld tokens, budget %lld", l, (long long)len, (long long)want[l]);
            if (appended[l] > want[l])
                CHECKF(len > want[l] - 4, "layer %d: %lld tokens, budget %lld: evicted more than needed", l,
                       (long long)len, (long long)want[l]);
            else
                CHECK_EQ(len, appended[l]);
            tu_fill(&r, q, 64, 1.0f);
            pikv_attend_batch b = pt_batch(1, &seq0, q, NULL, out, NULL, NULL);
            CHECK_OK(pikv_cache_attend(c, l, &b));
        }
        pikv_cache_stats s = pt_stats(c);
        int64_t sum_ev = 0, sum_tok = 0;
        for (int l = 0; l < 4; l++) {
            pikv_layer_stats ls;
            CHECK_OK(pikv_cache_get_layer_stats(c, l, &ls));
            CHECK_EQ(ls.budget_tokens, want[l]);
            CHECK_EQ(ls.tokens, pt_len(c, 0, l));
            CHECK_EQ(ls.evicted_pages * 4, appended[l] - ls.tokens);
            sum_ev += ls.evicted_pages;
            sum_tok += ls.tokens;
        }
        CHECK(sum_ev > 0);
        CHECK_EQ(s.evicted_pages, sum_ev);
        CHECK_EQ(s.evicted_tokens, 4 * sum_ev);
        CHECK_EQ(s.tokens, sum_tok);
        tu_model_free(&m);
        pikv_cache_free(c);
    }
    tu_set_case("");
}

/* A page shared by two sequences (copy-prefix) loses only the evicting sequence's reference:
   the other sequence's output stays bitwise the same; the page is freed when the last
   sequence evicts it. */
static void test_shared_pages(void)
{
    for (int policy = PIKV_EVICT_LRU; policy <= PIKV_EVICT_UTILITY; policy++) {
        tu_set_case("shared pages, policy %d", policy);
        pikv_cache_params p = pt_params();
        p.n_shards = EV_SHARDS; /* page j is shard j */
        p.select.sink_tokens = 4;
        p.select.recent_tokens = 4;
        p.budget.mode = PIKV_BUDGET_UNIFORM;
        p.budget.total_tokens = 32;
        p.evict.policy = (pikv_evict_policy)policy;
        pikv_cache *c = NULL;
        if (!CHECK_OK(pikv_cache_create(g_ctx[1], &p, &c)))
            continue;
        tu_rng r = tu_rng_seed(71);
        float K[40 * 32], V[40 * 32];
        tu_fill(&r, K, 40 * 32, 1.0f);
        tu_fill(&r, V, 40 * 32, 1.0f);
        CHECK_OK(pikv_seq_add(c, 0));
        CHECK_OK(pikv_cache_append(c, 0, 0, 32, K, V, NULL, NULL));
        CHECK_OK(pikv_seq_copy_prefix(c, 0, 1, 32)); /* all 8 pages shared */
        pikv_cache_stats s = pt_stats(c);
        CHECK_EQ(s.pages, 8);
        float q[64], o0[64], o0b[64], o1[64], o1b[64];
        tu_fill(&r, q, 64, 1.5f);
        int32_t seq0 = 0, seq1 = 1;
        pikv_attend_batch b = pt_batch(1, &seq0, q, NULL, o0, NULL, NULL);
        CHECK_OK(pikv_cache_attend(c, 0, &b));
        /* sequence 1 takes its own 4 tokens (different from sequence 0's later ones) */
        float K1[4 * 32], V1[4 * 32];
        tu_fill(&r, K1, 4 * 32, 1.0f);
        tu_fill(&r, V1, 4 * 32, 1.0f);
        CHECK_OK(pikv_cache_append(c, 0, 1, 4, K1, V1, NULL, NULL));
        s = pt_stats(c);
        CHECK_EQ(pt_len(c, 1, 0), 32);
        CHECK_EQ(pt_len(c, 0, 0), 32);
        CHECK_EQ(s.evicted_pages, 1);
        CHECK_EQ(s.evicted_tokens, 4);
        CHECK_EQ(s.pages, 9);   /* the evicted page still serves sequence 0 */
        CHECK_EQ(s.tokens, 36);
        int gone = -1;
        for (int j = 0; j < 9; j++) { /* pages 0..7 stay for sequence 0; 8 is sequence 1's new one */
            int64_t pages = 0;
            CHECK_OK(pikv_cache_shard_info(c, 0, j, NULL, &pages, NULL));
            CHECKF(pages == 1, "shard (page) %d holds %lld pages", j, (long long)pages);
        }
        b = pt_batch(1, &seq0, q, NULL, o0b, NULL, NULL);
        CHECK_OK(pikv_cache_attend(c, 0, &b));
        CHECK(memcmp(o0, o0b, sizeof o0) == 0);
        /* sequence 1's output: dense over its 36 tokens minus one of pages 1..7 (0 is a sink, 8
           recent); which one depends on the policy's keys after the one attend above */
        b = pt_batch(1, &seq1, q, NULL, o1, NULL, NULL);
        CHECK_OK(pikv_cache_attend(c, 0, &b));
        float K1all[36 * 32], V1all[36 * 32];
        memcpy(K1all, K, 32 * 32 * sizeof(float));
        memcpy(V1all, V, 32 * 32 * sizeof(float));
        memcpy(K1all + 32 * 32, K1, 4 * 32 * sizeof(float));
        memcpy(V1all + 32 * 32, V1, 4 * 32 * sizeof(float));
        double best = INFINITY, ro[64];
        for (int j = 1; j <= 7; j++) {
            uint8_t mask[2 * 36];
            for (int t = 0; t < 36; t++)
                mask[t] = mask[36 + t] = t / 4 != j;
            pt_ref_masked(36, 4, 2, 16, 0.25, q, K1all, V1all, mask, ro, NULL);
            double err = tu_norm_err(o1, ro, 64);
            if (err < best) {
                best = err;
                gone = j;
            }
        }
        CHECKF(best <= TU_TOL_EXACT, "sequence 1 is not its prefix minus one page (best error %.3g)", best);
        if (policy == PIKV_EVICT_STREAMING)
            CHECK_EQ(gone, 1);
        /* sequence 0 now evicts too: its own copy of the reference goes, and when that is the
           same page the page is freed */
        b = pt_batch(1, &seq1, q, NULL, o1b, NULL, NULL);
        CHECK_OK(pikv_cache_append(c, 0, 0, 4, K + 32 * 32, V + 32 * 32, NULL, NULL));
        s = pt_stats(c);
        CHECK_EQ(s.evicted_pages, 2);
        CHECK_OK(pikv_cache_attend(c, 0, &b));
        CHECK(memcmp(o1, o1b, sizeof o1) == 0); /* sequence 1 untouched by sequence 0's eviction */
        int64_t pages_gone = 0;
        CHECK_OK(pikv_cache_shard_info(c, 0, gone, NULL, &pages_gone, NULL));
        if (policy == PIKV_EVICT_STREAMING) {
            CHECK_EQ(pages_gone, 0); /* both sequences dropped page 1: freed */
            CHECK_EQ(s.pages, 9);
            CHECK_EQ(s.tokens, 36);
        }
        pikv_cache_free(c);
    }
    tu_set_case("");
}

int main(void)
{
    for (int d = 1; d <= 2; d++) {
        g_ctx[d] = tu_context(d);
        if (!g_ctx[d])
            return 2;
    }
    test_budgets_compute();
    test_budgets_bad_input();
    test_cache_layer_budgets();
    test_crafted_orders();
    test_streaming_by_token();
    test_lfu_counts_calls();
    test_random_scripts();
    test_unreached_budget_bitwise();
    test_layers_within_budget();
    test_shared_pages();
    /* last: on the library at the time of writing this hits a signed overflow in
       pikv_budgets_compute, which stops a sanitizer build here */
    printf("before huge totals: %ld passed, %ld failed\n", tu_pass_count, tu_fail_count);
    fflush(stdout);
    test_budgets_huge_totals();
    for (int d = 1; d <= 2; d++)
        pikv_context_free(g_ctx[d]);
    return tu_finish();
}
