/*
 * policies_bad_input: invalid policy parameters are refused with PIKV_ERR_INVALID_ARGUMENT
 * (PIKV_ERR_OUT_OF_RANGE for indices), with a last-error message naming the value, and
 * nothing changes:
 *  - pikv_cache_create: no cache, no device memory;
 *  - pikv_cache_attend with a bad per-call select: output buffer untouched, the cache's stats,
 *    lengths, memory, shards and attend output bitwise as before (tu_snap), expert counters
 *    unchanged;
 *  - pikv_route: experts / weights untouched, expert counters and misses (no decay) unchanged;
 *  - statistics getters with indices out of range.
 */
#include "test-util.h"

#include "policies-util.h"

static pikv_context *g_ctx;

typedef void (*edit_fn)(pikv_cache_params *p);

static void create_fails(const char *what, edit_fn edit, pikv_status want, const char *n1, const char *n2)
{
    tu_set_case("create: %s", what);
    pikv_cache_params p = pt_params();
    p.n_layers = 4;
    p.n_experts = 4;
    p.experts_per_token = 2;
    edit(&p);
    uint64_t mem = tu_mem_used(g_ctx, 0);
    pikv_cache *c = (pikv_cache *)&p; /* must be reset to NULL */
    pikv_status st = pikv_cache_create(g_ctx, &p, &c);
    CHECK_STATUS(want, st);
    if (want != PIKV_OK) {
        CHECK(c == NULL);
        CHECK_EQ(tu_mem_used(g_ctx, 0), mem);
    } else {
        CHECK(c != NULL && c != (pikv_cache *)&p);
    }
    if (n1)
        CHECK_ERR_HAS(g_ctx, n1);
    if (n2)
        CHECK_ERR_HAS(g_ctx, n2);
    if (st == PIKV_OK && c && c != (pikv_cache *)&p)
        pikv_cache_free(c);
    tu_set_case("");
}

/* one edit per case */
static void e_mode_bit(pikv_cache_params *p) { p->select.mode = 4; }
static void e_mode_high(pikv_cache_params *p) { p->select.mode = 0x80000001u; }
static void e_quest_small(pikv_cache_params *p)
{
    p->select.mode = PIKV_SELECT_QUEST;
    p->select.sink_tokens = 4;
    p->select.recent_tokens = 8;
    p->select.token_budget = 11;
}
static void e_quest_zero(pikv_cache_params *p)
{
    p->select.mode = PIKV_SELECT_QUEST | PIKV_SELECT_EXPERTS;
    p->select.token_budget = 0;
}
static void e_topk_big(pikv_cache_params *p) { p->select.experts_top_k = 3; }
static void e_topk_neg(pikv_cache_params *p) { p->select.experts_top_k = -1; }
static void e_sink_neg(pikv_cache_params *p) { p->select.sink_tokens = -1; }
static void e_recent_neg(pikv_cache_params *p) { p->select.recent_tokens = -2; }
static void e_policy_6(pikv_cache_params *p) { p->evict.policy = (pikv_evict_policy)6; }
static void e_policy_neg(pikv_cache_params *p) { p->evict.policy = (pikv_evict_policy)-1; }
static void e_bmode_3(pikv_cache_params *p) { p->budget.mode = (pikv_budget_mode)3; }
static void e_bmode_neg(pikv_cache_params *p) { p->budget.mode = (pikv_budget_mode)-7; }
static void e_budget_no_policy(pikv_cache_params *p)
{
    p->budget.mode = PIKV_BUDGET_UNIFORM;
    p->budget.total_tokens = 1000;
}
static void e_budget_small(pikv_cache_params *p)
{
    p->select.sink_tokens = 4;
    p->select.recent_tokens = 4;
    p->budget.mode = PIKV_BUDGET_PYRAMID;
    p->budget.total_tokens = 31; /* 4 layers x 8 = 32 */
    p->evict.policy = PIKV_EVICT_H2O;
}
static void e_budget_zero(pikv_cache_params *p)
{
    p->budget.mode = PIKV_BUDGET_UNIFORM;
    p->budget.total_tokens = 0;
    p->evict.policy = PIKV_EVICT_LRU;
}
static void e_budget_neg(pikv_cache_params *p)
{
    p->budget.mode = PIKV_BUDGET_UNIFORM;
    p->budget.total_tokens = -100;
    p->evict.policy = PIKV_EVICT_LRU;
}
static void beta(pikv_cache_params *p, float b)
{
    p->budget.mode = PIKV_BUDGET_PYRAMID;
    p->budget.total_tokens = 1000;
    p->budget.pyramid_beta = b;
    p->evict.policy = PIKV_EVICT_STREAMING;
}
static void e_beta_half(pikv_cache_params *p) { beta(p, 0.5f); }
static void e_beta_nan(pikv_cache_params *p) { beta(p, NAN); }
static void e_beta_inf(pikv_cache_params *p) { beta(p, INFINITY); }
static void e_lambda_neg(pikv_cache_params *p) { p->route.lambda = -0.5f; }
static void e_lambda_nan(pikv_cache_params *p) { p->route.lambda = NAN; }
static void e_lambda_inf(pikv_cache_params *p) { p->route.lambda = INFINITY; }
static void e_alpha_neg(pikv_cache_params *p) { p->evict.alpha_attention = -1.0f; }
static void e_alpha_rec_nan(pikv_cache_params *p)
{
    p->evict.policy = PIKV_EVICT_UTILITY;
    p->evict.alpha_recency = NAN;
}
static void e_alpha_freq_inf(pikv_cache_params *p)
{
    p->evict.policy = PIKV_EVICT_UTILITY;
    p->evict.alpha_frequency = INFINITY;
}
static void e_alpha_zero(pikv_cache_params *p)
{
    p->evict.policy = PIKV_EVICT_UTILITY;
    p->evict.alpha_attention = p->evict.alpha_recency = p->evict.alpha_frequency = 0.0f;
}
static void e_decay_neg(pikv_cache_params *p) { p->route.miss_decay = -0.25f; }
static void e_decay_big(pikv_cache_params *p) { p->route.miss_decay = 1.5f; }
static void e_decay_nan(pikv_cache_params *p) { p->route.miss_decay = NAN; }

/* the edges that are allowed */
static void e_ok_edges(pikv_cache_params *p)
{
    p->select.mode = PIKV_SELECT_QUEST | PIKV_SELECT_EXPERTS;
    p->select.sink_tokens = 4;
    p->select.recent_tokens = 8;
    p->select.token_budget = 12;       /* == sink + recent */
    p->select.experts_top_k = 2;       /* == experts_per_token */
    p->budget.mode = PIKV_BUDGET_PYRAMID;
    p->budget.total_tokens = 48;       /* == n_layers x 12 */
    p->budget.pyramid_beta = 1.0f;
    p->evict.policy = PIKV_EVICT_UTILITY;
    p->evict.alpha_attention = 0.0f;   /* one positive alpha is enough */
    p->evict.alpha_recency = 0.0f;
    p->evict.alpha_frequency = 1e-30f;
    p->route.lambda = 0.0f;
    p->route.miss_decay = 1.0f;
}

static void test_create(void)
{
    const pikv_status I = PIKV_ERR_INVALID_ARGUMENT;
    create_fails("unknown select bit", e_mode_bit, I, "0x4", NULL);
    create_fails("unknown high select bits", e_mode_high, I, "0x80000001", NULL);
    create_fails("QUEST budget < sink + recent", e_quest_small, I, "token_budget = 11", "12");
    create_fails("QUEST budget 0", e_quest_zero, I, "token_budget = 0", NULL);
    create_fails("experts_top_k > experts_per_token", e_topk_big, I, "experts_top_k = 3", NULL);
    create_fails("experts_top_k < 0", e_topk_neg, I, "experts_top_k = -1", NULL);
    create_fails("negative sinks", e_sink_neg, I, "sink_tokens = -1", NULL);
    create_fails("negative recent window", e_recent_neg, I, "recent_tokens = -2", NULL);
    create_fails("eviction policy 6", e_policy_6, I, "evict.policy = 6", NULL);
    create_fails("eviction policy -1", e_policy_neg, I, "evict.policy = -1", NULL);
    create_fails("budget mode 3", e_bmode_3, I, "budget.mode = 3", NULL);
    create_fails("budget mode -7", e_bmode_neg, I, "budget.mode = -7", NULL);
    create_fails("budget without eviction policy", e_budget_no_policy, I, "NONE", NULL);
    create_fails("budget below n_layers x (sinks + recent)", e_budget_small, I, "31", "8");
    create_fails("budget 0", e_budget_zero, I, "total_tokens = 0", NULL);
    create_fails("budget < 0", e_budget_neg, I, "-100", NULL);
    create_fails("pyramid beta 0.5", e_beta_half, I, "0.5", NULL);
    create_fails("pyramid beta NaN", e_beta_nan, I, "nan", NULL);
    create_fails("pyramid beta inf", e_beta_inf, I, "inf", NULL);
    create_fails("lambda -0.5", e_lambda_neg, I, "lambda = -0.5", NULL);
    create_fails("lambda NaN", e_lambda_nan, I, "lambda = ", "nan");
    create_fails("lambda inf", e_lambda_inf, I, "lambda = inf", NULL);
    create_fails("alpha_attention -1", e_alpha_neg, I, "-1", NULL);
    create_fails("alpha_recency NaN", e_alpha_rec_nan, I, "nan", NULL);
    create_fails("alpha_frequency inf", e_alpha_freq_inf, I, "inf", NULL);
    create_fails("UTILITY with all alphas 0", e_alpha_zero, I, "UTILITY", NULL);
    create_fails("miss_decay -0.25", e_decay_neg, I, "miss_decay = -0.25", NULL);
    create_fails("miss_decay 1.5", e_decay_big, I, "miss_decay = 1.5", NULL);
    create_fails("miss_decay NaN", e_decay_nan, I, "miss_decay = ", "nan");
    create_fails("allowed edges", e_ok_edges, PIKV_OK, NULL, NULL);
}

/* ---- attend with a bad per-call select ------------------------------------------------ */

static void expert_counters(const pikv_cache *c, int nl, int ne, double *out)
{
    for (int l = 0; l < nl; l++)
        for (int e = 0; e < ne; e++) {
            pikv_expert_stats s;
            memset(&s, 0, sizeof s);
            CHECK_OK(pikv_cache_get_expert_stats(c, l, e, &s));
            out[(l * ne + e) * 4 + 0] = (double)s.routed_tokens;
            out[(l * ne + e) * 4 + 1] = (double)s.routed_top1;
            out[(l * ne + e) * 4 + 2] = (double)s.stored_tokens;
            out[(l * ne + e) * 4 + 3] = s.misses;
        }
}

static pikv_cache *filled_cache(pikv_cache_params *p)
{
    *p = pt_params();
    p->n_layers = 2;
    p->n_experts = 4;
    p->experts_per_token = 2;
    p->select.sink_tokens = 2;
    p->select.recent_tokens = 3;
    p->budget.mode = PIKV_BUDGET_UNIFORM;
    p->budget.total_tokens = 80;
    p->evict.policy = PIKV_EVICT_H2O;
    p->route.lambda = 0.5f;
    pikv_cache *c = NULL;
    if (!CHECK_OK(pikv_cache_create(g_ctx, p, &c)))
        return NULL;
    tu_model m;
    tu_model_init(&m, p);
    tu_rng r = tu_rng_seed(9);
    for (int s = 0; s < 2; s++) {
        CHECK_OK(pikv_seq_add(c, s));
        for (int l = 0; l < 2; l++)
            CHECK_OK(tu_append_random(c, &m, &r, l, s, 30 + 11 * s, 1));
    }
    tu_model_free(&m);
    /* some misses and routing counts, so that a decay or a count would show */
    float q[64], out[64], x[3 * 4];
    int32_t seq0 = 0, got[6];
    tu_fill(&r, q, 64, 1.0f);
    int32_t qex_all3[2] = {3, 2};
    pikv_attend_batch b = pt_batch(1, &seq0, q, qex_all3, out, NULL, NULL);
    CHECK_OK(pikv_cache_attend(c, 0, &b)); /* may or may not miss: fine either way */
    tu_fill(&r, x, 12, 1.0f);
    CHECK_OK(pikv_route(c, 0, 3, x, got, NULL));
    return c;
}

typedef struct attend_case {
    const char *what;
    pikv_select_params sel;
    int use_sel;
    int no_experts;
    int32_t bad_expert;
    pikv_status want;
    const char *n1, *n2;
} attend_case;

static void test_attend(void)
{
    pikv_cache_params p;
    pikv_cache *c = filled_cache(&p);
    if (!c)
        return;
    pikv_select_params base = p.select;
    attend_case cases[12];
    int nc = 0;
    memset(cases, 0, sizeof cases);
#define ADD_CASE(w, field, value, st, a, b)        \
    do {                                           \
        cases[nc].what = (w);                      \
        cases[nc].sel = base;                      \
        cases[nc].sel.field = (value);             \
        cases[nc].use_sel = 1;                     \
        cases[nc].want = (st);                     \
        cases[nc].n1 = (a);                        \
        cases[nc].n2 = (b);                        \
        nc++;                                      \
    } while (0)
    ADD_CASE("unknown select bit", mode, 8u, PIKV_ERR_INVALID_ARGUMENT, "0x8", "pikv_cache_attend");
    ADD_CASE("experts_top_k 3 > 2", experts_top_k, 3, PIKV_ERR_INVALID_ARGUMENT, "experts_top_k = 3", NULL);
    ADD_CASE("experts_top_k -2", experts_top_k, -2, PIKV_ERR_INVALID_ARGUMENT, "experts_top_k = -2", NULL);
    ADD_CASE("negative sinks", sink_tokens, -3, PIKV_ERR_INVALID_ARGUMENT, "sink_tokens = -3", NULL);
    ADD_CASE("negative recent", recent_tokens, -1, PIKV_ERR_INVALID_ARGUMENT, "recent_tokens = -1", NULL);
    ADD_CASE("QUEST budget 4 < 2 + 3", mode, PIKV_SELECT_QUEST, PIKV_ERR_INVALID_ARGUMENT, "token_budget = 4", "5");
    cases[nc - 1].sel.token_budget = 4;
    ADD_CASE("EXPERTS without batch experts", mode, PIKV_SELECT_EXPERTS, PIKV_ERR_INVALID_ARGUMENT, "experts", NULL);
    cases[nc - 1].no_experts = 1;
    ADD_CASE("EXPERTS|QUEST without batch experts", mode, PIKV_SELECT_EXPERTS | PIKV_SELECT_QUEST,
             PIKV_ERR_INVALID_ARGUMENT, "experts", NULL);
    cases[nc - 1].sel.token_budget = 16;
    cases[nc - 1].no_experts = 1;
    ADD_CASE("query expert out of range", mode, PIKV_SELECT_EXPERTS, PIKV_ERR_OUT_OF_RANGE, "experts[3] = 4", NULL);
    cases[nc - 1].bad_expert = 4;
    ADD_CASE("negative query expert", mode, PIKV_SELECT_ALL, PIKV_ERR_OUT_OF_RANGE, "experts[3] = -1", NULL);
    cases[nc - 1].bad_expert = -1;
#undef ADD_CASE
    float q[2 * 64], out[2 * 64];
    tu_rng r = tu_rng_seed(10);
    tu_fill(&r, q, 128, 1.0f);
    int32_t seqs[2] = {0, 1};
    for (int k = 0; k < nc; k++) {
        tu_set_case("attend: %s", cases[k].what);
        int32_t qex[4] = {0, 1, 2, 3};
        if (cases[k].bad_expert)
            qex[3] = cases[k].bad_expert;
        tu_snap before, after;
        tu_snap_take(c, &p, &before);
        double cnt0[2 * 4 * 4], cnt1[2 * 4 * 4];
        expert_counters(c, 2, 4, cnt0);
        for (int i = 0; i < 128; i++)
            out[i] = -99.0f;
        pikv_attend_batch b = pt_batch(2, seqs, q, cases[k].no_experts ? NULL : qex, out, NULL,
                                       cases[k].use_sel ? &cases[k].sel : NULL);
        pikv_status st = pikv_cache_attend(c, 0, &b);
        CHECK_STATUS(cases[k].want, st);
        if (cases[k].n1)
            CHECK_ERR_HAS(g_ctx, cases[k].n1);
        if (cases[k].n2)
            CHECK_ERR_HAS(g_ctx, cases[k].n2);
        int untouched = 1;
        for (int i = 0; i < 128; i++)
            untouched &= out[i] == -99.0f;
        CHECK(untouched);
        expert_counters(c, 2, 4, cnt1);
        CHECK(memcmp(cnt0, cnt1, sizeof cnt0) == 0);
        tu_snap_take(c, &p, &after);
        TU_SNAP_SAME(cases[k].what, &before, &after);
        tu_snap_free(&before);
        tu_snap_free(&after);
    }
    pikv_cache_free(c);

    /* a cache whose default selection is EXPERTS needs the batch's experts */
    tu_set_case("attend: default EXPERTS without batch experts");
    p = pt_params();
    p.n_experts = 3;
    p.select.mode = PIKV_SELECT_EXPERTS;
    c = NULL;
    if (CHECK_OK(pikv_cache_create(g_ctx, &p, &c))) {
        tu_model m;
        tu_model_init(&m, &p);
        CHECK_OK(pikv_seq_add(c, 0));
        CHECK_OK(tu_append_random(c, &m, &r, 0, 0, 9, 0));
        pikv_cache_stats s0 = pt_stats(c);
        pikv_attend_batch b = pt_batch(1, seqs, q, NULL, out, NULL, NULL);
        CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_attend(c, 0, &b));
        CHECK_ERR_HAS(g_ctx, "experts");
        pikv_cache_stats s1 = pt_stats(c);
        CHECK(tu_stats_equal(&s0, &s1));
        /* dense caches have no experts to need */
        tu_model_free(&m);
        pikv_cache_free(c);
    }
    p = pt_params();
    p.select.mode = PIKV_SELECT_EXPERTS;
    if (CHECK_OK(pikv_cache_create(g_ctx, &p, &c))) {
        CHECK_OK(pikv_seq_add(c, 0));
        pikv_attend_batch b = pt_batch(1, seqs, q, NULL, out, NULL, NULL);
        CHECK_OK(pikv_cache_attend(c, 0, &b));
        pikv_cache_free(c);
    }
    tu_set_case("");
}

/* ---- route --------------------------------------------------------------------------- */

static void test_route(void)
{
    pikv_cache_params p;
    pikv_cache *c = filled_cache(&p);
    if (!c)
        return;
    float x[3 * 4];
    tu_rng r = tu_rng_seed(11);
    tu_fill(&r, x, 12, 1.0f);
    /* make sure some misses exist (a query to every expert of the empty layer-1 shard set
       of a fresh sequence) */
    CHECK_OK(pikv_seq_add(c, 5));
    float q[64], out[64];
    tu_fill(&r, q, 64, 1.0f);
    int32_t seq5 = 5, qex[2] = {0, 1};
    pikv_attend_batch b = pt_batch(1, &seq5, q, qex, out, NULL, NULL);
    CHECK_OK(pikv_cache_attend(c, 0, &b));
    CHECK_OK(pikv_cache_attend(c, 1, &b));
    struct {
        const char *what;
        int layer, n, nan_at, inf_at, null_logits, null_experts;
        pikv_status want;
        const char *n1, *n2;
    } cases[] = {
        {"layer -1", -1, 3, -1, -1, 0, 0, PIKV_ERR_OUT_OF_RANGE, "layer -1", NULL},
        {"layer 2 of 2", 2, 3, -1, -1, 0, 0, PIKV_ERR_OUT_OF_RANGE, "layer 2", NULL},
        {"NaN logit", 0, 3, 5, -1, 0, 0, PIKV_ERR_INVALID_ARGUMENT, "logits[5]", "nan"},
        {"inf logit", 1, 3, -1, 0, 0, 0, PIKV_ERR_INVALID_ARGUMENT, "logits[0]", "inf"},
        {"last logit NaN", 0, 3, 11, -1, 0, 0, PIKV_ERR_INVALID_ARGUMENT, "logits[11]", NULL},
        {"negative n_tokens", 0, -3, -1, -1, 0, 0, PIKV_ERR_INVALID_ARGUMENT, "-3", NULL},
        {"NULL logits", 0, 3, -1, -1, 1, 0, PIKV_ERR_INVALID_ARGUMENT, "logits", NULL},
        {"NULL experts", 0, 3, -1, -1, 0, 1, PIKV_ERR_INVALID_ARGUMENT, "experts", NULL},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        tu_set_case("route: %s", cases[k].what);
        float y[12];
        memcpy(y, x, sizeof y);
        if (cases[k].nan_at >= 0)
            y[cases[k].nan_at] = NAN;
        if (cases[k].inf_at >= 0)
            y[cases[k].inf_at] = INFINITY;
        int32_t got[6];
        float w[6];
        for (int i = 0; i < 6; i++) {
            got[i] = -5;
            w[i] = -5.0f;
        }
        double cnt0[2 * 4 * 4], cnt1[2 * 4 * 4];
        expert_counters(c, 2, 4, cnt0);
        int any_miss = 0;
        for (int i = 0; i < 2 * 4; i++)
            any_miss |= cnt0[i * 4 + 3] > 0.0;
        CHECK(any_miss);
        pikv_status st = pikv_route(c, cases[k].layer, cases[k].n, cases[k].null_logits ? NULL : y,
                                    cases[k].null_experts ? NULL : got, w);
        CHECK_STATUS(cases[k].want, st);
        if (cases[k].n1)
            CHECK_ERR_HAS(g_ctx, cases[k].n1);
        if (cases[k].n2)
            CHECK_ERR_HAS(g_ctx, cases[k].n2);
        int untouched = 1;
        for (int i = 0; i < 6; i++)
            untouched &= got[i] == -5 && w[i] == -5.0f;
        CHECK(untouched);
        expert_counters(c, 2, 4, cnt1);
        CHECKF(memcmp(cnt0, cnt1, sizeof cnt0) == 0, "expert counters or misses changed");
    }
    pikv_cache_free(c);

    /* top-k past what pikv_route supports: refused, not run */
    tu_set_case("route: experts_per_token 65");
    pikv_cache_params q65 = pt_params();
    q65.n_experts = 70;
    q65.experts_per_token = 65;
    c = NULL;
    if (CHECK_OK(pikv_cache_create(g_ctx, &q65, &c))) {
        float *l = tu_xcalloc(70, sizeof(float));
        int32_t got[65];
        got[0] = -5;
        pikv_status st = pikv_route(c, 0, 1, l, got, NULL);
        CHECK(st != PIKV_OK);
        CHECK(got[0] == -5);
        pikv_expert_stats es;
        CHECK_OK(pikv_cache_get_expert_stats(c, 0, 0, &es));
        CHECK_EQ(es.routed_tokens, 0);
        free(l);
        pikv_cache_free(c);
    }
    tu_set_case("");
}

/* ---- statistics getters ------------------------------------------------------------- */

static void test_getters(void)
{
    pikv_cache_params p = pt_params();
    p.n_layers = 2;
    p.n_experts = 3;
    pikv_cache *c = NULL;
    if (!CHECK_OK(pikv_cache_create(g_ctx, &p, &c)))
        return;
    pikv_expert_stats es;
    pikv_layer_stats ls;
    CHECK_STATUS(PIKV_ERR_OUT_OF_RANGE, pikv_cache_get_expert_stats(c, 0, 3, &es));
    CHECK_ERR_HAS(g_ctx, "expert 3");
    CHECK_STATUS(PIKV_ERR_OUT_OF_RANGE, pikv_cache_get_expert_stats(c, 0, -1, &es));
    CHECK_ERR_HAS(g_ctx, "expert -1");
    CHECK_STATUS(PIKV_ERR_OUT_OF_RANGE, pikv_cache_get_expert_stats(c, 2, 0, &es));
    CHECK_ERR_HAS(g_ctx, "layer 2");
    CHECK_STATUS(PIKV_ERR_OUT_OF_RANGE, pikv_cache_get_layer_stats(c, -1, &ls));
    CHECK_ERR_HAS(g_ctx, "layer -1");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_get_expert_stats(c, 0, 0, NULL));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_get_expert_stats(NULL, 0, 0, &es));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_get_layer_stats(c, 0, NULL));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_route(NULL, 0, 1, NULL, NULL, NULL));
    pikv_cache_free(c);
}

int main(void)
{
    g_ctx = tu_context(2);
    if (!g_ctx)
        return 2;
    tu_err_ctx = g_ctx;
    test_create();
    test_attend();
    test_route();
    test_getters();
    pikv_context_free(g_ctx);
    return tu_finish();
}
