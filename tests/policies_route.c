/*
 * policies_route: cache-aware routing (pikv_route) and the per-expert statistics.
 *
 *  1. lambda 0 is plain top-k exactly (ties to the lower id) over random logits with many
 *     ties, 1..200 experts, top-1..64; weights are the softmax of the chosen experts' own
 *     logits and sum to 1; routed_tokens / routed_top1 count exactly the choices.
 *  2. Misses: a query routed to an expert whose shard holds nothing for its sequence lowers
 *     the hit rate and counts a miss; an evicted page counts a miss for its expert. With
 *     lambda > 0 a missing expert loses ties (and small logit leads) it wins with lambda 0.
 *  3. The ranking is logit - lambda log(1 + miss) with misses decayed once per call, checked
 *     bit for bit against the same arithmetic here over random misses, lambdas and decays;
 *     decay is per layer and per call, not per token.
 *  4. stored_tokens counts the stored rows whose top-1 is the expert, also after evictions.
 */
#include "test-util.h"

#include "policies-util.h"

static pikv_context *g_ctx;

/* Top-k by score descending, ties to the lower id. */
static void ref_topk(const double *score, int ne, int k, int32_t *out)
{
    char used[256];
    memset(used, 0, sizeof used);
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int e = 0; e < ne; e++)
            if (!used[e] && (best < 0 || score[e] > score[best]))
                best = e;
        used[best] = 1;
        out[j] = best;
    }
}

static pikv_expert_stats expert_stats(const pikv_cache *c, int layer, int e)
{
    pikv_expert_stats s;
    memset(&s, 0, sizeof s);
    s.routed_tokens = -1;
    CHECK_OK(pikv_cache_get_expert_stats(c, layer, e, &s));
    return s;
}

static pikv_cache *route_cache(int ne, int ept, int n_layers, float lambda, float decay)
{
    pikv_cache_params p = pt_params();
    p.n_layers = n_layers;
    p.n_experts = ne;
    p.experts_per_token = ept;
    p.route.lambda = lambda;
    p.route.miss_decay = decay;
    pikv_cache *c = NULL;
    if (!CHECK_OK(pikv_cache_create(g_ctx, &p, &c)))
        return NULL;
    return c;
}

/* ---- 1. plain top-k -------------------------------------------------------- */

static void test_plain_topk(void)
{
    const int cfg[][2] = {{1, 1}, {2, 1}, {2, 2}, {3, 2}, {8, 2}, {8, 8}, {16, 4}, {64, 6}, {65, 64}, {100, 3}, {200, 64}};
    tu_rng r = tu_rng_seed(17);
    long tokens = 0, tied = 0;
    for (size_t ci = 0; ci < sizeof cfg / sizeof cfg[0]; ci++) {
        const int ne = cfg[ci][0], k = cfg[ci][1];
        tu_set_case("plain top-k: %d experts, top-%d", ne, k);
        pikv_cache *c = route_cache(ne, k, 2, 0.0f, 0.9f);
        if (!c)
            continue;
        int64_t *routed = tu_xcalloc(2 * (size_t)ne, sizeof(int64_t)), *top1 = tu_xcalloc(2 * (size_t)ne, sizeof(int64_t));
        int64_t total = 0, total_n = 0;
        for (int call = 0; call < 24; call++) {
            const int n = (int)tu_int(&r, 1, 40), layer = (int)tu_int(&r, 0, 1), mode = call % 4;
            float *x = tu_xmalloc((size_t)n * ne * sizeof(float));
            int32_t *got = tu_xmalloc((size_t)n * k * sizeof(int32_t));
            float *w = tu_xmalloc((size_t)n * k * sizeof(float));
            for (int i = 0; i < n * ne; i++) {
                switch (mode) {
                case 0: x[i] = tu_sym(&r, 4.0f); break;
                case 1: x[i] = (float)tu_int(&r, -2, 2); break; /* many ties */
                case 2: x[i] = 0.5f; break;                     /* all tied */
                default: x[i] = tu_sym(&r, 80.0f); break;      /* large: softmax must not overflow */
                }
            }
            if (!CHECK_OK(pikv_route(c, layer, n, x, got, call % 3 == 2 ? NULL : w))) {
                free(x);
                free(got);
                free(w);
                continue;
            }
            double score[256];
            int32_t want[64];
            int ok = 1, wok = 1;
            for (int t = 0; t < n; t++) {
                for (int e = 0; e < ne; e++)
                    score[e] = x[(size_t)t * ne + e];
                ref_topk(score, ne, k, want);
                for (int j = 0; j < k; j++) {
                    ok &= got[(size_t)t * k + j] == want[j];
                    routed[layer * ne + want[j]]++;
                }
                top1[layer * ne + want[0]]++;
                for (int e = 0; e < ne; e++) { /* a tie at the boundary of the top-k */
                    int chosen = 0;
                    for (int j = 0; j < k; j++)
                        chosen |= want[j] == e;
                    if (!chosen && score[e] == score[want[k - 1]]) {
                        tied++;
                        break;
                    }
                }
                if (call % 3 != 2) {
                    double mx = -INFINITY, sum = 0.0, wsum = 0.0;
                    for (int j = 0; j < k; j++)
                        mx = fmax(mx, score[want[j]]);
                    for (int j = 0; j < k; j++)
                        sum += exp(score[want[j]] - mx);
                    for (int j = 0; j < k; j++) {
                        double ref = exp(score[want[j]] - mx) / sum, gw = w[(size_t)t * k + j];
                        wok &= fabs(gw - ref) <= 2e-6 + 2e-6 * ref;
                        wsum += gw;
                    }
                    wok &= fabs(wsum - 1.0) <= 1e-5;
                }
            }
            CHECKF(ok, "call %d (logits mode %d, %d tokens): experts differ from top-%d", call, mode, n, k);
            CHECKF(wok, "call %d: weights are not the softmax of the chosen logits", call);
            total += (int64_t)n * k;
            total_n += n;
            tokens += n;
            free(x);
            free(got);
            free(w);
        }
        int64_t sum_routed = 0, sum_top1 = 0;
        int cok = 1;
        for (int l = 0; l < 2; l++)
            for (int e = 0; e < ne; e++) {
                pikv_expert_stats s = expert_stats(c, l, e);
                cok &= s.routed_tokens == routed[l * ne + e] && s.routed_top1 == top1[l * ne + e] && s.misses == 0.0 &&
                       s.stored_tokens == 0;
                sum_routed += s.routed_tokens;
                sum_top1 += s.routed_top1;
            }
        CHECKF(cok, "per-expert counters differ from the choices made");
        CHECK_EQ(sum_routed, total);
        CHECK_EQ(sum_top1, total_n);
        free(routed);
        free(top1);
        pikv_cache_free(c);
    }
    tu_set_case("");
    CHECK(tokens > 500 && tied > 50);
}

/* ---- 2. misses ----------------------------------------------------------------- */

/* A sequence whose tokens all have top-1 in {1, 2, 3}: expert 0's shard stays empty. */
static void fill_without_expert0(pikv_cache *c, int ept, int n)
{
    tu_rng r = tu_rng_seed(3);
    float *k = tu_xmalloc((size_t)n * 32 * sizeof(float)), *v = tu_xmalloc((size_t)n * 32 * sizeof(float));
    int32_t *ex = tu_xmalloc((size_t)n * ept * sizeof(int32_t));
    tu_fill(&r, k, (size_t)n * 32, 1.0f);
    tu_fill(&r, v, (size_t)n * 32, 1.0f);
    for (int t = 0; t < n; t++)
        for (int j = 0; j < ept; j++)
            ex[t * ept + j] = 1 + (t + j) % 3;
    CHECK_OK(pikv_seq_add(c, 0));
    CHECK_OK(pikv_cache_append(c, 0, 0, n, k, v, NULL, ex));
    free(k);
    free(v);
    free(ex);
}

static void test_missing_expert_loses_ties(void)
{
    for (int ept = 1; ept <= 2; ept++)
        for (int with_lambda = 0; with_lambda <= 1; with_lambda++) {
            tu_set_case("missing expert: top-%d, lambda %d", ept, with_lambda);
            pikv_cache *c = route_cache(4, ept, 1, with_lambda ? 0.5f : 0.0f, 0.9f);
            if (!c)
                continue;
            fill_without_expert0(c, ept, 20);
            float q[64], out[64];
            tu_rng r = tu_rng_seed(4);
            tu_fill(&r, q, 64, 1.0f);
            int32_t seq0 = 0, qex[2] = {0, 1};
            pikv_select_params sel = pikv_cache_default_params().select;
            sel.sink_tokens = sel.recent_tokens = 0;
            sel.mode = PIKV_SELECT_EXPERTS;
            pikv_attend_batch b = pt_batch(1, &seq0, q, qex, out, NULL, &sel);
            CHECK_OK(pikv_cache_attend(c, 0, &b));
            pikv_cache_stats s = pt_stats(c);
            CHECKF(s.last_hit_rate == (ept == 1 ? 0.0 : 0.5), "hit rate %g", s.last_hit_rate);
            CHECK(s.last_hit_rate < 1.0);
            CHECK(expert_stats(c, 0, 0).misses == 1.0);
            for (int e = 1; e < 4; e++)
                CHECK(expert_stats(c, 0, e).misses == 0.0);
            /* the query read nothing: expert 0's shard is empty (no sinks or recent window) */
            if (ept == 1)
                CHECK_EQ(s.last_tokens_read, 0);
            /* all logits tied */
            float x[4] = {0.25f, 0.25f, 0.25f, 0.25f};
            int32_t got[2];
            float w[2];
            if (CHECK_OK(pikv_route(c, 0, 1, x, got, w))) {
                if (with_lambda) {
                    CHECKF(got[0] == 1 && (ept == 1 || got[1] == 2), "tied logits, lambda 0.5: chose %d %d", got[0],
                           ept > 1 ? got[1] : -1);
                } else {
                    CHECKF(got[0] == 0 && (ept == 1 || got[1] == 1), "tied logits, lambda 0: chose %d %d", got[0],
                           ept > 1 ? got[1] : -1);
                }
                CHECK(fabsf(w[0] - 1.0f / (float)ept) < 1e-6f);
            }
            CHECK(expert_stats(c, 0, 0).misses == 1.0 * (double)0.9f); /* decayed once */
            /* a lead of 0.2 is not enough with lambda 0.5 (penalty 0.5 log(1.81) = 0.30) */
            float y[4] = {0.45f, 0.25f, 0.25f, 0.25f};
            if (CHECK_OK(pikv_route(c, 0, 1, y, got, NULL)))
                CHECKF(got[0] == (with_lambda ? 1 : 0), "logits (0.45, .25, .25, .25): chose %d", got[0]);
            /* a lead of 0.5 is */
            float z[4] = {0.75f, 0.25f, 0.25f, 0.25f};
            if (CHECK_OK(pikv_route(c, 0, 1, z, got, NULL)))
                CHECKF(got[0] == 0, "logits (0.75, .25, .25, .25): chose %d", got[0]);
            pikv_cache_free(c);
        }
    tu_set_case("");
}

/* Evicted pages count misses for their expert. */
static void test_eviction_misses(void)
{
    for (int with_lambda = 0; with_lambda <= 1; with_lambda++) {
        tu_set_case("eviction misses, lambda %d", with_lambda);
        pikv_cache_params p = pt_params();
        p.n_experts = 4;
        p.experts_per_token = 1;
        p.select.sink_tokens = 0;
        p.select.recent_tokens = 4;
        p.budget.mode = PIKV_BUDGET_UNIFORM;
        p.budget.total_tokens = 16;
        p.evict.policy = PIKV_EVICT_STREAMING;
        p.route.lambda = with_lambda ? 1.0f : 0.0f;
        p.route.miss_decay = 1.0f;
        pikv_cache *c = NULL;
        if (!CHECK_OK(pikv_cache_create(g_ctx, &p, &c)))
            continue;
        tu_rng r = tu_rng_seed(12);
        const int n = 40;
        float k[40 * 32], v[40 * 32];
        int32_t ex[40];
        tu_fill(&r, k, 40 * 32, 1.0f);
        tu_fill(&r, v, 40 * 32, 1.0f);
        for (int t = 0; t < n; t++)
            ex[t] = t < 8 ? 1 : 2; /* two pages of expert 1 first, then expert 2 */
        CHECK_OK(pikv_seq_add(c, 0));
        for (int t = 0; t < n; t += 4)
            CHECK_OK(pikv_cache_append(c, 0, 0, 4, k + t * 32, v + t * 32, NULL, ex + t));
        pikv_cache_stats s = pt_stats(c);
        /* 40 tokens in pages of 4, 16 kept: 6 pages went, oldest first: expert 1's two, then
           four of expert 2 */
        CHECK_EQ(s.evicted_pages, 6);
        CHECK_EQ(pt_len(c, 0, 0), 16);
        CHECK(expert_stats(c, 0, 0).misses == 0.0);
        CHECK(expert_stats(c, 0, 1).misses == 2.0);
        CHECK(expert_stats(c, 0, 2).misses == 4.0);
        CHECK(expert_stats(c, 0, 3).misses == 0.0);
        CHECK_EQ(expert_stats(c, 0, 1).stored_tokens, 0);
        CHECK_EQ(expert_stats(c, 0, 2).stored_tokens, 16);
        /* expert 2 leads by 0.5 but has 4 misses: lambda 1 costs it log(5) = 1.6 */
        float x[4] = {0.0f, 0.0f, 0.5f, 0.0f};
        int32_t got = -1;
        if (CHECK_OK(pikv_route(c, 0, 1, x, &got, NULL)))
            CHECKF(got == (with_lambda ? 0 : 2), "chose %d", got);
        pikv_cache_free(c);
    }
    tu_set_case("");
}

/* ---- 3. the ranking formula and the decay ---------------------------------------- */

static void test_decay(void)
{
    const float decays[4] = {0.9f, 0.5f, 0.0f, 1.0f};
    for (int di = 0; di < 4; di++) {
        tu_set_case("decay %g", (double)decays[di]);
        pikv_cache *c = route_cache(4, 1, 2, 0.0f, decays[di]);
        if (!c)
            continue;
        fill_without_expert0(c, 1, 12);
        /* five queries to expert 0 in layer 0, three in layer 1 (empty there too) */
        float q[5 * 64], out[5 * 64];
        tu_rng r = tu_rng_seed(5);
        tu_fill(&r, q, 5 * 64, 1.0f);
        int32_t seqs[5] = {0, 0, 0, 0, 0}, qex[5] = {0, 0, 0, 0, 0};
        pikv_attend_batch b = pt_batch(5, seqs, q, qex, out, NULL, NULL);
        CHECK_OK(pikv_cache_attend(c, 0, &b));
        b.n_queries = 3;
        CHECK_OK(pikv_cache_attend(c, 1, &b));
        CHECK(expert_stats(c, 0, 0).misses == 5.0);
        CHECK(expert_stats(c, 1, 0).misses == 3.0);
        double m = 5.0;
        float x[7 * 4];
        int32_t got[7];
        tu_fill(&r, x, 7 * 4, 1.0f);
        for (int call = 0; call < 6; call++) {
            int n = 1 + call % 7; /* one decay per call, whatever the token count */
            if (!CHECK_OK(pikv_route(c, 0, n, x, got, NULL)))
                break;
            m *= (double)decays[di];
            double g = expert_stats(c, 0, 0).misses;
            CHECKF(g == m, "call %d: misses %.17g, want %.17g", call, g, m);
        }
        CHECK(expert_stats(c, 1, 0).misses == 3.0); /* layer 1 untouched by layer 0's calls */
        pikv_cache_free(c);
    }
    tu_set_case("");
}

static void test_formula_random(void)
{
    long checked = 0, differs_from_plain = 0;
    for (uint64_t seed = 1; seed <= 120; seed++) {
        tu_rng r = tu_rng_seed(seed * 977u);
        const int ne = (int)tu_int(&r, 2, 20), ept = (int)tu_int(&r, 1, ne < 4 ? ne : 4);
        const float lambda = (float)(0.05 + 3.0 * tu_unif(&r)), decay = (float)tu_unif(&r);
        tu_set_case("formula seed %llu: %d experts top-%d lambda %g decay %g", (unsigned long long)seed, ne, ept,
                    (double)lambda, (double)decay);
        pikv_cache_params p = pt_params();
        p.n_experts = ne;
        p.experts_per_token = ept;
        p.route.lambda = lambda;
        p.route.miss_decay = decay;
        p.select.sink_tokens = 0;
        p.select.recent_tokens = 2;
        p.budget.mode = PIKV_BUDGET_UNIFORM;
        p.budget.total_tokens = 24;
        p.evict.policy = (pikv_evict_policy)tu_int(&r, 1, 5);
        pikv_cache *c = NULL;
        if (!CHECK_OK(pikv_cache_create(g_ctx, &p, &c)))
            continue;
        tu_model m;
        tu_model_init(&m, &p);
        CHECK_OK(pikv_seq_add(c, 0));
        const int populated = (int)tu_int(&r, 1, ne); /* experts >= populated never store */
        for (int round = 0; round < 12; round++) {
            /* tokens of the populated experts (evictions count misses) */
            int n = (int)tu_int(&r, 1, 10);
            float k[10 * 32], v[10 * 32];
            int32_t ex[10 * 4];
            tu_fill(&r, k, (size_t)n * 32, 1.0f);
            tu_fill(&r, v, (size_t)n * 32, 1.0f);
            for (int t = 0; t < n; t++) { /* distinct top-k, top-1 among the populated experts */
                int32_t *e = ex + t * ept, top = (int32_t)tu_int(&r, 0, populated - 1);
                tu_pick_experts(&r, ne, ept, 0, e);
                int at = 0;
                while (at < ept && e[at] != top)
                    at++;
                if (at < ept)
                    e[at] = e[0];
                e[0] = top;
            }
            CHECK_OK(pikv_cache_append(c, 0, 0, n, k, v, NULL, ex));
            /* queries routed anywhere (absent shards count misses) */
            float q[3 * 64], out[3 * 64];
            int32_t seqs[3] = {0, 0, 0}, qex[3 * 4];
            tu_fill(&r, q, 3 * 64, 1.0f);
            for (int i = 0; i < 3; i++)
                tu_pick_experts(&r, ne, ept, 0, qex + i * ept);
            pikv_attend_batch b = pt_batch(3, seqs, q, qex, out, NULL, NULL);
            CHECK_OK(pikv_cache_attend(c, 0, &b));
            /* route: the same arithmetic here */
            double miss[20];
            for (int e = 0; e < ne; e++)
                miss[e] = expert_stats(c, 0, e).misses * (double)decay;
            const int nt = (int)tu_int(&r, 1, 8);
            float x[8 * 20];
            for (int i = 0; i < nt * ne; i++)
                x[i] = tu_int(&r, 0, 1) ? (float)tu_int(&r, -1, 1) : tu_sym(&r, 1.5f);
            int32_t got[8 * 4];
            if (!CHECK_OK(pikv_route(c, 0, nt, x, got, NULL)))
                continue;
            for (int e = 0; e < ne; e++)
                CHECKF(expert_stats(c, 0, e).misses == miss[e], "expert %d: misses %.17g, want %.17g", e,
                       expert_stats(c, 0, e).misses, miss[e]);
            for (int t = 0; t < nt; t++) {
                double score[20], plain[20];
                int32_t want[4], want_plain[4];
                for (int e = 0; e < ne; e++) {
                    score[e] = (double)x[t * ne + e] - (double)lambda * log1p(miss[e]);
                    plain[e] = x[t * ne + e];
                }
                ref_topk(score, ne, ept, want);
                ref_topk(plain, ne, ept, want_plain);
                int ok = 1, same_plain = 1;
                for (int j = 0; j < ept; j++) {
                    ok &= got[t * ept + j] == want[j];
                    same_plain &= want[j] == want_plain[j];
                }
                CHECKF(ok, "round %d token %d: chose %d.. want %d..", round, t, got[t * ept], want[0]);
                differs_from_plain += !same_plain;
                checked++;
            }
        }
        tu_model_free(&m);
        pikv_cache_free(c);
    }
    tu_set_case("");
    CHECKF(checked > 3000 && differs_from_plain > 300, "checked %ld tokens, %ld where the penalty changed the choice",
           checked, differs_from_plain);
}

/* Hit rate and misses under HASH placement: a shard mixes experts, an expert hits when a
   page of the sequence holds one of its rows as top-1. */
static void test_hash_hits(void)
{
    tu_set_case("hash placement hits");
    pikv_cache_params p = pt_params();
    p.n_experts = 6;
    p.experts_per_token = 2;
    p.placement = PIKV_PLACEMENT_HASH;
    p.n_shards = 2;
    pikv_cache *c = NULL;
    if (!CHECK_OK(pikv_cache_create(g_ctx, &p, &c)))
        return;
    tu_rng r = tu_rng_seed(66);
    float k[30 * 32], v[30 * 32];
    int32_t ex[30 * 2];
    tu_fill(&r, k, 30 * 32, 1.0f);
    tu_fill(&r, v, 30 * 32, 1.0f);
    for (int t = 0; t < 30; t++) {
        ex[2 * t] = t % 3 == 0 ? 4 : t % 3; /* top-1 in {1, 2, 4} */
        ex[2 * t + 1] = 5;
    }
    CHECK_OK(pikv_seq_add(c, 0));
    CHECK_OK(pikv_cache_append(c, 0, 0, 30, k, v, NULL, ex));
    float q[2 * 64], out[2 * 64];
    tu_fill(&r, q, 128, 1.0f);
    int32_t seqs[2] = {0, 0}, qex[4] = {1, 0, 4, 5};
    pikv_attend_batch b = pt_batch(2, seqs, q, qex, out, NULL, NULL);
    CHECK_OK(pikv_cache_attend(c, 0, &b));
    CHECK(pt_stats(c).last_hit_rate == 0.5);
    const double want[6] = {1, 0, 0, 0, 0, 1};
    for (int e = 0; e < 6; e++)
        CHECKF(expert_stats(c, 0, e).misses == want[e], "expert %d: misses %g", e, expert_stats(c, 0, e).misses);
    const int64_t stored[6] = {0, 10, 10, 0, 10, 0};
    for (int e = 0; e < 6; e++)
        CHECK_EQ(expert_stats(c, 0, e).stored_tokens, stored[e]);
    pikv_cache_free(c);
    tu_set_case("");
}

int main(void)
{
    g_ctx = tu_context(2);
    if (!g_ctx)
        return 2;
    test_plain_topk();
    test_missing_expert_loses_ties();
    test_eviction_misses();
    test_decay();
    test_formula_random();
    test_hash_hits();
    pikv_context_free(g_ctx);
    return tu_finish();
}
