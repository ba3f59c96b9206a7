/*
 * bad_input: every function rejects bad handles, pointers, indices and geometry with the
 * documented status (never a crash), says what was wrong in pikv_context_last_error (naming
 * the bad value), and leaves the cache exactly as it was: stats, device memory, lengths, shard
 * info identical and a later attend bitwise identical. Also: status names/strings, capacity,
 * and the CPU device memory limit (PIKV_ERR_OUT_OF_MEMORY, cache unchanged and usable after
 * removing a sequence).
 */
#include "test-util.h"

#include <math.h>

static pikv_context *g_ctx;
static pikv_cache *g_cache;
static pikv_cache_params g_p;
static tu_snap g_base;

/* Does msg contain one of the '|'-separated needles? */
static int names_one_of(const char *msg, const char *needles)
{
    if (!needles)
        return 1;
    char buf[256];
    snprintf(buf, sizeof buf, "%s", needles);
    for (char *tok = strtok(buf, "|"); tok; tok = strtok(NULL, "|"))
        if (strstr(msg, tok))
            return 1;
    return 0;
}

static void check_message(const char *file, int line, const char *expr, const char *needles)
{
    const char *msg = pikv_context_last_error(g_ctx);
    if (!tu_checkf(msg != NULL && msg[0] != 0, file, line, "last error set",
                   "after %s: last error is empty", expr))
        return;
    tu_checkf(names_one_of(msg, needles), file, line, "last error names the bad value",
              "after %s: \"%s\" does not contain any of \"%s\"", expr, msg, needles);
}

/* A call on the global cache/context that must fail with `want` (or `want2` if not OK) and
   change nothing. */
static void fails_at(const char *file, int line, const char *expr, pikv_status got,
                     pikv_status want, pikv_status want2, const char *needles)
{
    if (want2 != PIKV_OK && got == want2)
        want = want2;
    tu_check_status(got, want, expr, file, line);
    if (got != PIKV_OK)
        check_message(file, line, expr, needles);
    tu_snap cur;
    tu_snap_take(g_cache, &g_p, &cur);
    tu_snap_same_at(file, line, expr, &g_base, &cur);
    tu_snap_free(&g_base);
    g_base = cur;
}
#define FAILS(want, needles, call) \
    fails_at(__FILE__, __LINE__, #call, (call), (want), PIKV_OK, (needles))
#define FAILS2(want, want2, needles, call) \
    fails_at(__FILE__, __LINE__, #call, (call), (want), (want2), (needles))
/* A failing call on a NULL handle: no context to hold a message; the cache is unchanged. */
#define FAILS_NULL(call) \
    fails_at(__FILE__, __LINE__, #call, (call), PIKV_ERR_INVALID_ARGUMENT, PIKV_OK, NULL)

/* ---------------------------------------------------------------------- */

static void test_status_strings(void)
{
    tu_set_case("status names and strings");
    static const char *ids[] = {
        "PIKV_OK", "PIKV_ERR_INVALID_ARGUMENT", "PIKV_ERR_OUT_OF_RANGE",
        "PIKV_ERR_OUT_OF_MEMORY", "PIKV_ERR_CAPACITY", "PIKV_ERR_NOT_FOUND",
        "PIKV_ERR_EXISTS", "PIKV_ERR_UNSUPPORTED", "PIKV_ERR_BACKEND", "PIKV_ERR_INTERNAL"};
    CHECK_EQ(sizeof ids / sizeof ids[0], PIKV_STATUS_COUNT_);
    for (int i = 0; i < PIKV_STATUS_COUNT_; i++) {
        const char *n = pikv_status_name((pikv_status)i);
        const char *s = pikv_status_string((pikv_status)i);
        if (!CHECKF(n && s && n[0] && s[0], "status %d has a NULL or empty name/string", i))
            continue;
        CHECKF(strcmp(n, ids[i]) == 0, "pikv_status_name(%d) = \"%s\", expected \"%s\"", i, n,
               ids[i]);
        for (int j = 0; j < i; j++) {
            const char *n2 = pikv_status_name((pikv_status)j);
            const char *s2 = pikv_status_string((pikv_status)j);
            if (n2 && s2) {
                CHECKF(strcmp(n, n2) != 0, "statuses %d and %d share the name \"%s\"", i, j, n);
                CHECKF(strcmp(s, s2) != 0, "statuses %d and %d share the string \"%s\"", i, j,
                       s);
            }
        }
    }
    /* never NULL, even for values out of the enum */
    CHECK(pikv_status_name(PIKV_STATUS_COUNT_) != NULL);
    CHECK(pikv_status_string(PIKV_STATUS_COUNT_) != NULL);
    CHECK(pikv_status_name((pikv_status)-1) != NULL);
    CHECK(pikv_status_string((pikv_status)12345) != NULL);
}

/* ---------------------------------------------------------------------- */

typedef struct geo_case {
    const char *what;
    pikv_status want;
    const char *needles;
    void (*edit)(pikv_cache_params *p);
} geo_case;

#define EDIT(name, body) \
    static void name(pikv_cache_params *p) { body; }
EDIT(e_layers0, p->n_layers = 0)
EDIT(e_layers_neg, p->n_layers = -3)
EDIT(e_qheads0, p->n_q_heads = 0)
EDIT(e_qheads_neg, p->n_q_heads = -12)
EDIT(e_kvheads0, p->n_kv_heads = 0)
EDIT(e_kvheads_neg, p->n_kv_heads = -2)
EDIT(e_gqa, (p->n_q_heads = 6, p->n_kv_heads = 4))
EDIT(e_kv_gt_q, (p->n_q_heads = 2, p->n_kv_heads = 4))
EDIT(e_hd0, p->head_dim = 0)
EDIT(e_hd_neg, p->head_dim = -5)
EDIT(e_hd_big, p->head_dim = 1025)
EDIT(e_ne0, p->n_experts = 0)
EDIT(e_ne_neg, p->n_experts = -4)
EDIT(e_ept0, p->experts_per_token = 0)
EDIT(e_ept_big, (p->n_experts = 4, p->experts_per_token = 5))
EDIT(e_ept_neg, p->experts_per_token = -1)
EDIT(e_ps0, p->page_size = 0)
EDIT(e_ps_neg, p->page_size = -8)
EDIT(e_ps_big, p->page_size = 4097)
EDIT(e_dtype, p->dtype = (pikv_dtype)77)
EDIT(e_dtype_neg, p->dtype = (pikv_dtype)-1)
EDIT(e_cap0, p->capacity_tokens = 0)
EDIT(e_cap_neg, p->capacity_tokens = -100)
EDIT(e_seq0, p->max_sequences = 0)
EDIT(e_seq_neg, p->max_sequences = -6)
EDIT(e_pl, p->placement = (pikv_placement)9)
EDIT(e_pl_neg, p->placement = (pikv_placement)-7)
EDIT(e_shards_neg, p->n_shards = -2)
EDIT(e_hash_neg, (p->placement = PIKV_PLACEMENT_HASH, p->hash_tokens = -3))
EDIT(e_ndev_neg, p->n_devices = -1)
EDIT(e_devnull, (p->devices = NULL, p->n_devices = 2))
EDIT(e_scale_neg, p->attn_scale = -0.25f)
static const int32_t dev_dup[2] = {1, 1};
EDIT(e_dev_dup, (p->devices = dev_dup, p->n_devices = 2))
static const int32_t dev_bad[2] = {0, 5};
static const int32_t dev_neg[2] = {1, -9};
EDIT(e_dev_range, (p->devices = dev_bad, p->n_devices = 2))
EDIT(e_dev_neg, (p->devices = dev_neg, p->n_devices = 2))

static void test_bad_geometry(void)
{
    static const geo_case cases[] = {
        {"n_layers 0", PIKV_ERR_INVALID_ARGUMENT, "n_layers", e_layers0},
        {"n_layers -3", PIKV_ERR_INVALID_ARGUMENT, "-3", e_layers_neg},
        {"n_q_heads 0", PIKV_ERR_INVALID_ARGUMENT, "n_q_heads", e_qheads0},
        {"n_q_heads -12", PIKV_ERR_INVALID_ARGUMENT, "-12", e_qheads_neg},
        {"n_kv_heads 0", PIKV_ERR_INVALID_ARGUMENT, "n_kv_heads", e_kvheads0},
        {"n_kv_heads -2", PIKV_ERR_INVALID_ARGUMENT, "-2", e_kvheads_neg},
        {"6 q heads over 4 kv heads", PIKV_ERR_INVALID_ARGUMENT, "6", e_gqa},
        {"2 q heads over 4 kv heads", PIKV_ERR_INVALID_ARGUMENT, "4", e_kv_gt_q},
        {"head_dim 0", PIKV_ERR_INVALID_ARGUMENT, "head_dim", e_hd0},
        {"head_dim -5", PIKV_ERR_INVALID_ARGUMENT, "-5", e_hd_neg},
        {"head_dim 1025", PIKV_ERR_INVALID_ARGUMENT, "1025", e_hd_big},
        {"n_experts 0", PIKV_ERR_INVALID_ARGUMENT, "n_experts", e_ne0},
        {"n_experts -4", PIKV_ERR_INVALID_ARGUMENT, "-4", e_ne_neg},
        {"experts_per_token 0", PIKV_ERR_INVALID_ARGUMENT, "experts_per_token", e_ept0},
        {"experts_per_token 5 > 4", PIKV_ERR_INVALID_ARGUMENT, "5", e_ept_big},
        {"experts_per_token -1", PIKV_ERR_INVALID_ARGUMENT, "-1", e_ept_neg},
        {"page_size 0", PIKV_ERR_INVALID_ARGUMENT, "page_size", e_ps0},
        {"page_size -8", PIKV_ERR_INVALID_ARGUMENT, "-8", e_ps_neg},
        {"page_size 4097", PIKV_ERR_INVALID_ARGUMENT, "4097", e_ps_big},
        {"dtype 77", PIKV_ERR_INVALID_ARGUMENT, "77", e_dtype},
        {"dtype -1", PIKV_ERR_INVALID_ARGUMENT, "-1", e_dtype_neg},
        {"capacity 0", PIKV_ERR_INVALID_ARGUMENT, "capacity", e_cap0},
        {"capacity -100", PIKV_ERR_INVALID_ARGUMENT, "-100", e_cap_neg},
        {"max_sequences 0", PIKV_ERR_INVALID_ARGUMENT, "max_sequences", e_seq0},
        {"max_sequences -6", PIKV_ERR_INVALID_ARGUMENT, "-6", e_seq_neg},
        {"placement 9", PIKV_ERR_INVALID_ARGUMENT, "9", e_pl},
        {"placement -7", PIKV_ERR_INVALID_ARGUMENT, "-7", e_pl_neg},
        {"n_shards -2", PIKV_ERR_INVALID_ARGUMENT, "-2", e_shards_neg},
        {"hash_tokens -3", PIKV_ERR_INVALID_ARGUMENT, "-3", e_hash_neg},
        {"n_devices -1", PIKV_ERR_INVALID_ARGUMENT, "-1", e_ndev_neg},
        {"devices NULL with n_devices 2", PIKV_ERR_INVALID_ARGUMENT, "devices", e_devnull},
        {"device index 5 of 2", PIKV_ERR_OUT_OF_RANGE, "5", e_dev_range},
        {"device index -9", PIKV_ERR_OUT_OF_RANGE, "-9", e_dev_neg},
        /* not spelled out in pikv.h; pinned here as the library behaves */
        {"attn_scale -0.25", PIKV_ERR_INVALID_ARGUMENT, "-0.25|attn_scale", e_scale_neg},
        {"device 1 listed twice", PIKV_ERR_INVALID_ARGUMENT, "1", e_dev_dup},
    };
    uint64_t mem0[2] = {tu_mem_used(g_ctx, 0), tu_mem_used(g_ctx, 1)};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        tu_set_case("pikv_cache_create with %s", cases[i].what);
        pikv_cache_params p = pikv_cache_default_params();
        p.n_layers = 2;
        p.n_q_heads = 8;
        p.n_kv_heads = 2;
        p.head_dim = 16;
        p.n_experts = 4;
        p.experts_per_token = 2;
        p.page_size = 4;
        p.capacity_tokens = 1000;
        p.max_sequences = 4;
        cases[i].edit(&p);
        pikv_cache *c = NULL;
        pikv_status st = pikv_cache_create(g_ctx, &p, &c);
        CHECKF(st == cases[i].want, "%s: got %s, want %s", cases[i].what, pikv_status_name(st),
               pikv_status_name(cases[i].want));
        CHECKF(c == NULL, "%s: *out not left NULL", cases[i].what);
        if (st != PIKV_OK)
            check_message(__FILE__, __LINE__, cases[i].what, cases[i].needles);
        pikv_cache_free(c);
        CHECK_EQ(tu_mem_used(g_ctx, 0), mem0[0]);
        CHECK_EQ(tu_mem_used(g_ctx, 1), mem0[1]);
    }
    /* the defaults themselves plus the geometry are valid */
    tu_set_case("valid geometry edge values");
    pikv_cache_params p = pikv_cache_default_params();
    p.n_layers = 1;
    p.n_q_heads = 1;
    p.n_kv_heads = 1;
    p.head_dim = 1024;
    p.n_experts = 3;
    p.experts_per_token = 3;
    p.page_size = 4096;
    p.capacity_tokens = 1;
    p.max_sequences = 1;
    pikv_cache *c = NULL;
    CHECK_OK(pikv_cache_create(g_ctx, &p, &c));
    CHECK(c != NULL);
    pikv_cache_free(c);
    p.head_dim = 1;
    p.page_size = 1;
    c = NULL;
    CHECK_OK(pikv_cache_create(g_ctx, &p, &c));
    pikv_cache_free(c);
}

/* ---------------------------------------------------------------------- */

static void fill_tokens(tu_rng *r, int n, float *k, float *v, int32_t *ex)
{
    size_t row = (size_t)g_p.n_kv_heads * g_p.head_dim;
    tu_fill(r, k, (size_t)n * row, 1.0f);
    tu_fill(r, v, (size_t)n * row, 1.0f);
    for (int t = 0; t < n; t++)
        tu_pick_experts(r, g_p.n_experts, g_p.experts_per_token, 0,
                        ex + (size_t)t * g_p.experts_per_token);
}

static void test_bad_calls(void)
{
    tu_set_case("bad calls on a populated cache");
    tu_rng r = tu_rng_seed(31337);
    tu_model m;
    tu_model_init(&m, &g_p);
    CHECK_OK(pikv_seq_add(g_cache, 0));
    CHECK_OK(pikv_seq_add(g_cache, 1));
    CHECK_OK(pikv_seq_add(g_cache, 2)); /* stays empty */
    m.live[0] = m.live[1] = m.live[2] = 1;
    CHECK_OK(tu_append_random(g_cache, &m, &r, 0, 0, 30, 0));
    CHECK_OK(tu_append_random(g_cache, &m, &r, 1, 0, 20, 0));
    CHECK_OK(tu_append_random(g_cache, &m, &r, 0, 1, 13, 0));
    CHECK_OK(tu_append_random(g_cache, &m, &r, 1, 1, 9, 0));
    TU_CHECK_ALL(g_cache, &m, &r);
    tu_snap_take(g_cache, &g_p, &g_base);
    CHECK(g_base.ok);

    enum { N = 200 };
    static float k[N * 64], v[N * 64];
    static int32_t ex[N * 4];
    fill_tokens(&r, N, k, v, ex);
    int64_t len = 0;

    /* sequences */
    FAILS(PIKV_ERR_OUT_OF_RANGE, "1234", pikv_seq_add(g_cache, 1234));
    FAILS(PIKV_ERR_OUT_OF_RANGE, "-5", pikv_seq_add(g_cache, -5));
    FAILS(PIKV_ERR_OUT_OF_RANGE, "8", pikv_seq_add(g_cache, 8));
    FAILS(PIKV_ERR_EXISTS, "1", pikv_seq_add(g_cache, 1));
    FAILS(PIKV_ERR_NOT_FOUND, "5", pikv_seq_remove(g_cache, 5));
    FAILS(PIKV_ERR_OUT_OF_RANGE, "99", pikv_seq_remove(g_cache, 99));
    FAILS(PIKV_ERR_OUT_OF_RANGE, "-11", pikv_seq_remove(g_cache, -11));
    FAILS(PIKV_ERR_NOT_FOUND, "6", pikv_seq_length(g_cache, 6, 0, &len));
    FAILS(PIKV_ERR_OUT_OF_RANGE, "37", pikv_seq_length(g_cache, 0, 37, &len));
    FAILS(PIKV_ERR_OUT_OF_RANGE, "-1", pikv_seq_length(g_cache, 0, -1, &len));
    FAILS(PIKV_ERR_OUT_OF_RANGE, "4321", pikv_seq_length(g_cache, 4321, 0, &len));
    FAILS(PIKV_ERR_INVALID_ARGUMENT, NULL, pikv_seq_length(g_cache, 0, 0, NULL));

    /* append */
    FAILS(PIKV_ERR_OUT_OF_RANGE, "37", pikv_cache_append(g_cache, 37, 0, 3, k, v, NULL, ex));
    FAILS(PIKV_ERR_OUT_OF_RANGE, "-1", pikv_cache_append(g_cache, -1, 0, 3, k, v, NULL, ex));
    FAILS(PIKV_ERR_NOT_FOUND, "6", pikv_cache_append(g_cache, 0, 6, 3, k, v, NULL, ex));
    FAILS(PIKV_ERR_OUT_OF_RANGE, "321", pikv_cache_append(g_cache, 0, 321, 3, k, v, NULL, ex));
    FAILS(PIKV_ERR_OUT_OF_RANGE, "-4", pikv_cache_append(g_cache, 0, -4, 3, k, v, NULL, ex));
    FAILS(PIKV_ERR_INVALID_ARGUMENT, NULL, pikv_cache_append(g_cache, 0, 0, 3, NULL, v, NULL, ex));
    FAILS(PIKV_ERR_INVALID_ARGUMENT, NULL, pikv_cache_append(g_cache, 0, 0, 3, k, NULL, NULL, ex));
    FAILS(PIKV_ERR_INVALID_ARGUMENT, NULL,
          pikv_cache_append(g_cache, 0, 0, 3, k, v, NULL, NULL)); /* MoE needs experts */
    FAILS(PIKV_ERR_INVALID_ARGUMENT, "-3", pikv_cache_append(g_cache, 0, 0, -3, k, v, NULL, ex));
    {
        /* a bad expert id late in the batch: nothing of the batch may be written */
        int32_t bad[20 * 4];
        memcpy(bad, ex, sizeof bad);
        bad[13 * g_p.experts_per_token] = 17; /* top-1 of token 13 */
        FAILS(PIKV_ERR_OUT_OF_RANGE, "17",
              pikv_cache_append(g_cache, 0, 0, 20, k, v, NULL, bad));
        memcpy(bad, ex, sizeof bad);
        bad[19 * g_p.experts_per_token] = -2; /* negative, last token */
        FAILS(PIKV_ERR_OUT_OF_RANGE, "-2",
              pikv_cache_append(g_cache, 1, 1, 20, k, v, NULL, bad));
        memcpy(bad, ex, sizeof bad);
        bad[6 * g_p.experts_per_token + 1] = 23; /* second choice */
        FAILS(PIKV_ERR_OUT_OF_RANGE, "23",
              pikv_cache_append(g_cache, 0, 1, 20, k, v, NULL, bad));
        memcpy(bad, ex, sizeof bad);
        bad[0] = g_p.n_experts; /* == n_experts, first token */
        FAILS(PIKV_ERR_OUT_OF_RANGE, "4", pikv_cache_append(g_cache, 0, 2, 1, k, v, NULL, bad));
    }
    {
        /* non-finite values, and values f16 pages cannot hold (g_p is f16): refused,
           naming the value, before anything is written */
        static float bad[20 * 64];
        const size_t row = (size_t)g_p.n_kv_heads * g_p.head_dim;
        memcpy(bad, k, sizeof bad);
        bad[7 * row + 3] = NAN;
        FAILS(PIKV_ERR_INVALID_ARGUMENT, "nan", pikv_cache_append(g_cache, 0, 0, 20, bad, v, NULL, ex));
        memcpy(bad, k, sizeof bad);
        bad[19 * row] = -INFINITY;
        FAILS(PIKV_ERR_INVALID_ARGUMENT, "inf", pikv_cache_append(g_cache, 0, 0, 20, k, bad, NULL, ex));
        memcpy(bad, k, sizeof bad);
        bad[2 * row + 5] = 70000.0f;
        FAILS(PIKV_ERR_INVALID_ARGUMENT, "70000",
              pikv_cache_append(g_cache, 1, 1, 20, bad, v, NULL, ex));
    }
    /* capacity: layer 0 holds 43 of 120 tokens, layer 1 holds 29 */
    FAILS(PIKV_ERR_CAPACITY, "120|78|121|77",
          pikv_cache_append(g_cache, 0, 2, 78, k, v, NULL, ex));
    FAILS(PIKV_ERR_CAPACITY, "120|100|121|92",
          pikv_cache_append(g_cache, 1, 0, 92, k, v, NULL, ex));

    /* copy_prefix: seq 0 has 30 tokens in layer 0 and 20 in layer 1 */
    FAILS(PIKV_ERR_NOT_FOUND, "5", pikv_seq_copy_prefix(g_cache, 5, 6, 1));
    FAILS(PIKV_ERR_EXISTS, "1", pikv_seq_copy_prefix(g_cache, 0, 1, 1));
    FAILS(PIKV_ERR_EXISTS, "0", pikv_seq_copy_prefix(g_cache, 0, 0, 1));
    FAILS(PIKV_ERR_OUT_OF_RANGE, "77", pikv_seq_copy_prefix(g_cache, 0, 77, 1));
    FAILS(PIKV_ERR_OUT_OF_RANGE, "-9", pikv_seq_copy_prefix(g_cache, -9, 6, 1));
    FAILS(PIKV_ERR_INVALID_ARGUMENT, "-4", pikv_seq_copy_prefix(g_cache, 0, 6, -4));
    FAILS2(PIKV_ERR_INVALID_ARGUMENT, PIKV_ERR_OUT_OF_RANGE, "31",
           pikv_seq_copy_prefix(g_cache, 0, 6, 31));
    FAILS2(PIKV_ERR_INVALID_ARGUMENT, PIKV_ERR_OUT_OF_RANGE, "25",
           pikv_seq_copy_prefix(g_cache, 0, 6, 25)); /* fits layer 0, not layer 1 */
    FAILS(PIKV_ERR_NOT_FOUND, "6", pikv_seq_length(g_cache, 6, 0, &len));

    /* attend */
    {
        size_t per = (size_t)g_p.n_q_heads * g_p.head_dim;
        float q[4 * 128], out[4 * 128], lse[4 * 8];
        tu_fill(&r, q, 4 * per, 1.0f);
        int32_t ok_ids[4] = {0, 1, 2, 0};
        int32_t nf_ids[4] = {0, 1, 5, 0};
        int32_t oor_ids[4] = {0, 555, 1, 0};
        int32_t neg_ids[4] = {0, 1, -8, 0};
        pikv_attend_batch b = {4, ok_ids, q, NULL, out, lse, NULL};
        FAILS(PIKV_ERR_OUT_OF_RANGE, "37", pikv_cache_attend(g_cache, 37, &b));
        FAILS(PIKV_ERR_OUT_OF_RANGE, "-1", pikv_cache_attend(g_cache, -1, &b));
        FAILS(PIKV_ERR_INVALID_ARGUMENT, NULL, pikv_cache_attend(g_cache, 0, NULL));
        b.seq_ids = nf_ids;
        FAILS(PIKV_ERR_NOT_FOUND, "5", pikv_cache_attend(g_cache, 0, &b));
        b.seq_ids = oor_ids;
        FAILS(PIKV_ERR_OUT_OF_RANGE, "555", pikv_cache_attend(g_cache, 1, &b));
        b.seq_ids = neg_ids;
        FAILS(PIKV_ERR_OUT_OF_RANGE, "-8", pikv_cache_attend(g_cache, 1, &b));
        b.seq_ids = NULL;
        FAILS(PIKV_ERR_INVALID_ARGUMENT, NULL, pikv_cache_attend(g_cache, 0, &b));
        b.seq_ids = ok_ids;
        b.q = NULL;
        FAILS(PIKV_ERR_INVALID_ARGUMENT, NULL, pikv_cache_attend(g_cache, 0, &b));
        b.q = q;
        b.out = NULL;
        FAILS(PIKV_ERR_INVALID_ARGUMENT, NULL, pikv_cache_attend(g_cache, 0, &b));
        b.out = out;
        b.n_queries = -2;
        FAILS(PIKV_ERR_INVALID_ARGUMENT, "-2", pikv_cache_attend(g_cache, 0, &b));
        b.n_queries = 4;
        {
            float bad_q[4 * 128];
            memcpy(bad_q, q, sizeof bad_q);
            bad_q[3 * per + 7] = NAN; /* query 3 */
            b.q = bad_q;
            FAILS(PIKV_ERR_INVALID_ARGUMENT, "nan", pikv_cache_attend(g_cache, 0, &b));
            bad_q[3 * per + 7] = INFINITY;
            FAILS(PIKV_ERR_INVALID_ARGUMENT, "inf", pikv_cache_attend(g_cache, 1, &b));
            b.q = q;
        }
        int32_t qex[4 * 2] = {0, 1, 2, 3, 99, 0, 1, 2}; /* query 2's top-1 is out of range */
        b.experts = qex;
        FAILS(PIKV_ERR_OUT_OF_RANGE, "99", pikv_cache_attend(g_cache, 0, &b));
        b.experts = NULL;
    }

    /* stats and shards */
    {
        pikv_cache_device_stats ds;
        int32_t dev;
        int64_t pages, tokens;
        FAILS(PIKV_ERR_INVALID_ARGUMENT, NULL, pikv_cache_get_stats(g_cache, NULL));
        FAILS(PIKV_ERR_OUT_OF_RANGE, "2", pikv_cache_get_device_stats(g_cache, 2, &ds));
        FAILS(PIKV_ERR_OUT_OF_RANGE, "-1", pikv_cache_get_device_stats(g_cache, -1, &ds));
        FAILS(PIKV_ERR_INVALID_ARGUMENT, NULL, pikv_cache_get_device_stats(g_cache, 0, NULL));
        FAILS(PIKV_ERR_OUT_OF_RANGE, "37",
              pikv_cache_shard_info(g_cache, 37, 0, &dev, &pages, &tokens));
        FAILS(PIKV_ERR_OUT_OF_RANGE, "4",
              pikv_cache_shard_info(g_cache, 0, 4, &dev, &pages, &tokens));
        FAILS(PIKV_ERR_OUT_OF_RANGE, "-3",
              pikv_cache_shard_info(g_cache, 0, -3, &dev, &pages, &tokens));
    }

    /* rebalance needs BALANCED placement (this cache is EXPERT) */
    {
        int64_t moved = -1;
        FAILS(PIKV_ERR_INVALID_ARGUMENT, "BALANCED|balanced|placement",
              pikv_cache_rebalance(g_cache, &moved));
    }

    /* zero-sized requests are no-ops, not errors */
    {
        pikv_attend_batch b0 = {0, NULL, NULL, NULL, NULL, NULL, NULL};
        CHECK_OK(pikv_cache_attend(g_cache, 0, &b0));
        CHECK_OK(pikv_cache_append(g_cache, 0, 0, 0, k, v, NULL, ex));
        int64_t l0 = -1;
        CHECK_OK(pikv_seq_length(g_cache, 0, 0, &l0));
        CHECK_EQ(l0, 30);
        tu_snap_free(&g_base);
        tu_snap_take(g_cache, &g_p, &g_base);
    }

    /* devices */
    {
        pikv_device_info info;
        FAILS(PIKV_ERR_OUT_OF_RANGE, "2", pikv_device_get_info(g_ctx, 2, &info));
        FAILS(PIKV_ERR_OUT_OF_RANGE, "-1", pikv_device_get_info(g_ctx, -1, &info));
        FAILS(PIKV_ERR_INVALID_ARGUMENT, NULL, pikv_device_get_info(g_ctx, 0, NULL));
    }

    /* NULL handles: an error status, never a crash; the cache is unchanged */
    {
        pikv_attend_batch b;
        memset(&b, 0, sizeof b);
        pikv_cache_stats cs;
        pikv_cache_device_stats ds;
        pikv_device_info info;
        int32_t dev;
        int64_t pages, tokens, moved;
        pikv_cache *c = NULL;
        pikv_context *ctx = NULL;
        pikv_context_params cp = pikv_context_default_params();
        cp.backends = "cpu";
        FAILS_NULL(pikv_context_create(NULL, &ctx));
        CHECK(ctx == NULL);
        pikv_context_free(ctx);
        FAILS_NULL(pikv_context_create(&cp, NULL));
        FAILS_NULL(pikv_context_set_log(NULL, NULL, NULL, PIKV_LOG_DEBUG));
        FAILS_NULL(pikv_device_get_info(NULL, 0, &info));
        FAILS_NULL(pikv_cache_create(NULL, &g_p, &c));
        CHECK(c == NULL);
        FAILS_NULL(pikv_cache_create(g_ctx, NULL, &c));
        CHECK(c == NULL);
        FAILS_NULL(pikv_cache_create(g_ctx, &g_p, NULL));
        FAILS_NULL(pikv_seq_add(NULL, 0));
        FAILS_NULL(pikv_seq_remove(NULL, 0));
        FAILS_NULL(pikv_seq_copy_prefix(NULL, 0, 1, 1));
        FAILS_NULL(pikv_seq_length(NULL, 0, 0, &len));
        FAILS_NULL(pikv_cache_append(NULL, 0, 0, 3, k, v, NULL, ex));
        FAILS_NULL(pikv_cache_attend(NULL, 0, &b));
        FAILS_NULL(pikv_cache_get_stats(NULL, &cs));
        FAILS_NULL(pikv_cache_get_device_stats(NULL, 0, &ds));
        FAILS_NULL(pikv_cache_rebalance(NULL, &moved));
        FAILS_NULL(pikv_cache_shard_info(NULL, 0, 0, &dev, &pages, &tokens));
        CHECK(pikv_cache_context(NULL) == NULL);
        CHECK(pikv_device_count(NULL) <= 0);
        const char *msg = pikv_context_last_error(NULL);
        CHECK(msg != NULL);
        pikv_cache_free(NULL);
        pikv_context_free(NULL);
    }

    /* the cache still works: what was refused can now be done correctly */
    tu_set_case("after bad calls");
    CHECK_OK(pikv_seq_copy_prefix(g_cache, 0, 6, 20));
    tu_model_copy_prefix(&m, 0, 6, 20);
    TU_CHECK_ALL(g_cache, &m, &r);
    CHECK_OK(pikv_seq_remove(g_cache, 6));
    tu_model_remove(&m, 6);
    CHECK_OK(tu_append_random(g_cache, &m, &r, 0, 2, 77, 0)); /* fills layer 0 to 120 */
    int64_t cap_len = -1;
    CHECK_OK(pikv_seq_length(g_cache, 2, 0, &cap_len));
    CHECK_EQ(cap_len, 77);
    TU_CHECK_ALL(g_cache, &m, &r);
    tu_snap_free(&g_base);
    tu_snap_take(g_cache, &g_p, &g_base);
    FAILS(PIKV_ERR_CAPACITY, "120|1|121", pikv_cache_append(g_cache, 0, 1, 1, k, v, NULL, ex));
    CHECK_OK(tu_append_random(g_cache, &m, &r, 1, 1, 5, 0)); /* layer 1 still has room */
    TU_CHECK_ALL(g_cache, &m, &r);
    tu_snap_free(&g_base);
    tu_model_free(&m);
}

/* ---------------------------------------------------------------------- */

/*
 * The CPU device memory limit: appends eventually fail with OUT_OF_MEMORY (not CAPACITY), no
 * device ever holds more than the limit, a good part of the limit is usable for pages, the
 * failed append changes nothing, and removing a sequence makes room for it.
 */
static void test_memory_limit(uint64_t limit)
{
    tu_set_case("cpu_device_memory limit %llu", (unsigned long long)limit);
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "cpu";
    cp.cpu_devices = 2;
    cp.cpu_device_memory = limit;
    pikv_context *ctx = NULL;
    if (!CHECK_OK(pikv_context_create(&cp, &ctx)))
        return;
    tu_err_ctx = ctx;
    for (int d = 0; d < 2; d++) {
        pikv_device_info info;
        CHECK_OK(pikv_device_get_info(ctx, d, &info));
        CHECK_EQ(info.caps.memory_limit, limit);
    }
    pikv_cache_params p = pikv_cache_default_params();
    p.n_layers = 1;
    p.n_q_heads = 4;
    p.n_kv_heads = 2;
    p.head_dim = 32;
    p.n_experts = 2;
    p.experts_per_token = 1;
    p.page_size = 16; /* 8 KiB of K+V per page */
    p.capacity_tokens = 1 << 22;
    p.max_sequences = 4;
    pikv_cache *c = NULL;
    if (!CHECK_OK(pikv_cache_create(ctx, &p, &c))) {
        pikv_context_free(ctx);
        return;
    }
    tu_model m;
    tu_model_init(&m, &p);
    tu_rng r = tu_rng_seed(4242);
    CHECK_OK(pikv_seq_add(c, 0));
    CHECK_OK(pikv_seq_add(c, 1));
    m.live[0] = m.live[1] = 1;
    enum { CHUNK = 20 };
    size_t row = (size_t)p.n_kv_heads * p.head_dim;
    float *k = tu_xmalloc(CHUNK * row * sizeof(float));
    float *v = tu_xmalloc(CHUNK * row * sizeof(float));
    int32_t ex[CHUNK];
    pikv_status st = PIKV_OK;
    int i, fail_seq = -1;
    tu_snap base;
    memset(&base, 0, sizeof base);
    for (i = 0; i < 5000; i++) {
        int s = i % 2;
        tu_fill(&r, k, CHUNK * row, 1.0f);
        tu_fill(&r, v, CHUNK * row, 1.0f);
        for (int t = 0; t < CHUNK; t++)
            ex[t] = (int32_t)tu_int(&r, 0, 1);
        pikv_cache_stats before;
        CHECK_OK(pikv_cache_get_stats(c, &before));
        uint64_t mem_before[2] = {tu_mem_used(ctx, 0), tu_mem_used(ctx, 1)};
        st = pikv_cache_append(c, 0, s, CHUNK, k, v, NULL, ex);
        for (int d = 0; d < 2; d++)
            CHECKF(tu_mem_used(ctx, d) <= limit, "device %d holds %llu bytes over the limit %llu",
                   d, (unsigned long long)tu_mem_used(ctx, d), (unsigned long long)limit);
        if (st != PIKV_OK) {
            pikv_cache_stats after;
            CHECK_OK(pikv_cache_get_stats(c, &after));
            CHECKF(tu_stats_equal(&before, &after), "stats changed by the failed append");
            CHECK_EQ(tu_mem_used(ctx, 0), mem_before[0]);
            CHECK_EQ(tu_mem_used(ctx, 1), mem_before[1]);
            fail_seq = s;
            break;
        }
        tu_model_push(&m, 0, s, CHUNK, k, v, ex);
    }
    CHECKF(st == PIKV_ERR_OUT_OF_MEMORY, "append over the device memory limit returned %s after "
           "%d appends", pikv_status_name(st), i);
    /* K+V bytes that fitted: at least a quarter of what the two devices may hold */
    uint64_t kv_bytes = (uint64_t)i * CHUNK * row * 2 * sizeof(float);
    CHECKF(kv_bytes * 4 >= 2 * limit, "only %d appends of %d tokens (%llu bytes of K+V) fit in "
           "2 devices x %llu bytes; last error: %s", i, CHUNK, (unsigned long long)kv_bytes,
           (unsigned long long)limit, pikv_context_last_error(ctx));
    if (st != PIKV_OK) {
        const char *msg = pikv_context_last_error(ctx);
        CHECK(msg && msg[0]);
        /* everything observable, around the same failing append again */
        tu_snap cur;
        tu_snap_take(c, &p, &base);
        CHECK_STATUS(PIKV_ERR_OUT_OF_MEMORY, pikv_cache_append(c, 0, fail_seq, CHUNK, k, v,
                                                               NULL, ex));
        tu_snap_take(c, &p, &cur);
        TU_SNAP_SAME("append over the memory limit", &base, &cur);
        tu_snap_free(&cur);
        TU_CHECK_ALL(c, &m, &r);
        /* free room: remove the other sequence, then the same append succeeds */
        if (i > 0) {
            CHECK_OK(pikv_seq_remove(c, 1 - fail_seq));
            tu_model_remove(&m, 1 - fail_seq);
            if (CHECK_OK(pikv_cache_append(c, 0, fail_seq, CHUNK, k, v, NULL, ex)))
                tu_model_push(&m, 0, fail_seq, CHUNK, k, v, ex);
        }
        TU_CHECK_ALL(c, &m, &r);
    }
    tu_snap_free(&base);
    free(k);
    free(v);
    pikv_cache_free(c);
    CHECK_EQ(tu_mem_used(ctx, 0), 0);
    CHECK_EQ(tu_mem_used(ctx, 1), 0);
    tu_model_free(&m);
    pikv_context_free(ctx);
}

/* Bad context parameters. */
/* Finite inputs whose scores overflow float: attend says so instead of returning a
   plausible-looking empty result. */
static void test_score_overflow(void)
{
    tu_set_case("score overflow");
    pikv_context_params cp = pikv_context_default_params();
    pikv_context *ctx = NULL;
    if (!CHECK_OK(pikv_context_create(&cp, &ctx)))
        return;
    pikv_cache_params p = pikv_cache_default_params();
    p.n_q_heads = 1;
    p.n_kv_heads = 1;
    p.head_dim = 2;
    p.page_size = 4;
    p.dtype = PIKV_DTYPE_F32;
    p.attn_scale = 1.0f;
    pikv_cache *c = NULL;
    CHECK_OK(pikv_cache_create(ctx, &p, &c));
    CHECK_OK(pikv_seq_add(c, 0));
    const float k[4] = {3e38f, 0.0f, 1.0f, 0.0f}, v[4] = {1, 2, 3, 4};
    CHECK_OK(pikv_cache_append(c, 0, 0, 2, k, v, NULL, NULL));
    float q[2] = {10.0f, 0.0f}, out[2] = {0, 0}, lse = 0;
    int32_t sid = 0;
    pikv_attend_batch b = {1, &sid, q, NULL, out, &lse, NULL};
    pikv_status st = pikv_cache_attend(c, 0, &b);
    CHECKF(st == PIKV_ERR_INVALID_ARGUMENT, "attend with q.k = 3e39 returned %s (out %g %g)",
           pikv_status_name(st), (double)out[0], (double)out[1]);
    CHECKF(strstr(pikv_context_last_error(ctx), "overflow") != NULL, "message: %s",
           pikv_context_last_error(ctx));
    q[0] = 1e-30f; /* the same cache with a small query works */
    CHECK_OK(pikv_cache_attend(c, 0, &b));
    pikv_cache_free(c);
    pikv_context_free(ctx);
}

static void test_bad_context(void)
{
    tu_set_case("bad context params");
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "cpu";
    pikv_context *ctx = NULL;
    cp.cpu_devices = 65;
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_context_create(&cp, &ctx));
    CHECK(ctx == NULL);
    cp.cpu_devices = -1;
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_context_create(&cp, &ctx));
    CHECK(ctx == NULL);
    cp.cpu_devices = 0;
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_context_create(&cp, &ctx));
    CHECK(ctx == NULL);
    cp.cpu_devices = 1;
    cp.cpu_threads = -3;
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_context_create(&cp, &ctx));
    CHECK(ctx == NULL);
    cp.cpu_threads = 0;
    cp.backends = "no-such-backend";
    CHECK(pikv_context_create(&cp, &ctx) != PIKV_OK);
    CHECK(ctx == NULL);
    pikv_context_free(ctx);
}

int main(void)
{
    test_status_strings();
    test_bad_context();
    test_score_overflow();

    g_ctx = tu_context(2);
    if (!CHECK(g_ctx))
        return tu_finish();
    tu_err_ctx = g_ctx;
    test_bad_geometry();

    g_p = pikv_cache_default_params();
    g_p.n_layers = 2;
    g_p.n_q_heads = 8;
    g_p.n_kv_heads = 4;
    g_p.head_dim = 16;
    g_p.n_experts = 4;
    g_p.experts_per_token = 2;
    g_p.page_size = 4;
    g_p.capacity_tokens = 120;
    g_p.max_sequences = 8;
    g_p.placement = PIKV_PLACEMENT_EXPERT;
    if (CHECK_OK(pikv_cache_create(g_ctx, &g_p, &g_cache))) {
        test_bad_calls();
        pikv_cache_free(g_cache);
    }
    CHECK_EQ(tu_mem_used(g_ctx, 0), 0);
    pikv_context_free(g_ctx);

    test_memory_limit(4u << 20);
    test_memory_limit(256u << 10);
    tu_set_case("");
    return tu_finish();
}
