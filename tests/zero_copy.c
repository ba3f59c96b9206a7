/*
 * zero_copy: pikv_cache_append_device and pikv_cache_attend_device (tensors in a device's
 * memory) against pikv_cache_append and pikv_cache_attend (host tensors) on twin caches.
 *
 *  1. Twins: for every dtype (f32, f16, int8, int4), for caches whose pages all live on the
 *     source device (cpu0), spread over cpu0..cpu2, or all elsewhere (cpu1, cpu2), and for
 *     exact mode, QUEST selection and H2O eviction under a budget: the same appends (cache A
 *     through the device API from cpu0, cache B through the host API) and the same attends
 *     (with and without lse, sometimes measured) give bit-identical outputs, lse, lengths
 *     and stats.
 *  2. Which path ran. White-box (runtime/backend-impl.h): every device's vtable is wrapped
 *     to record memory_read/memory_write/find_out_of_range/buffer_alloc calls and the append
 *     and attention ops with their src_on_device/io_on_device flags, and to check that an op
 *     gets the caller's device pointers exactly when the flag is set (on source cpu0 only)
 *     and never sees a device pointer otherwise (the host path must get a host copy). Pages
 *     all on cpu0: appends read nothing back (f32; other dtypes copy k/v once for the f16
 *     range check), attends run one attention op on the engine's q/out/lse. Pages elsewhere:
 *     k/v are read once per append, q once and out (and lse) written once per attend.
 *  3. Bad input through the device API: a non-finite k/v value (or one past the f16 range)
 *     at a known index, a non-finite q value: INVALID_ARGUMENT naming the index, cache
 *     unchanged (lengths, stats, a later attend bit-identical to the twin's); device index
 *     out of range: OUT_OF_RANGE; NULL cache / k / batch; an allocation failure at every
 *     allocation of append_device and attend_device: OUT_OF_MEMORY and nothing changed.
 *  4. A context with backends "all": append_device/attend_device from an OpenCL or Vulkan
 *     device give UNSUPPORTED naming the device (skipped without such a device).
 *
 * Every ERROR-level log outside the calls expected to fail is a failure.
 */
#include "test-util.h"

#include "backend-impl.h"

/* ------------------------------------------------------------------------ */
/* Logging and a host allocator that can fail on demand                     */
/* ------------------------------------------------------------------------ */

static int g_expect_errors;      /* >0: ERROR logs are expected (a call that must fail) */
static long g_unexpected_errors;
static char g_first_unexpected[512];

static void log_cb(pikv_log_level level, const char *message, void *user)
{
    (void)user;
    if (level != PIKV_LOG_ERROR || g_expect_errors) return;
    if (!g_unexpected_errors++) snprintf(g_first_unexpected, sizeof g_first_unexpected, "%s", message);
    fprintf(stderr, "unexpected library error: %s\n", message);
}

static long g_alloc_count, g_fail_at; /* fail the g_fail_at-th allocation (0 = none) */

static void *test_alloc(void *user, size_t size, size_t align)
{
    (void)user;
    if (g_fail_at && ++g_alloc_count == g_fail_at) return NULL;
    void *p = NULL;
    if (align < sizeof(void *)) align = sizeof(void *);
    return posix_memalign(&p, align, size ? size : 1) == 0 ? p : NULL;
}

static void test_free(void *user, void *p)
{
    (void)user;
    free(p);
}

/* ------------------------------------------------------------------------ */
/* Spy: every device's vtable wrapped                                         */
/* ------------------------------------------------------------------------ */

typedef struct spy_counts {
    long mem_read, mem_write, find_out_of_range, buffer_alloc;
    long append_direct, append_host, attn_direct, attn_host;
    long violations;
} spy_counts;

static spy_counts g_n;
static const pikv_device_iface *g_real[PIKV_MAX_DEVICES];
static pikv_device_iface g_spy_iface[PIKV_MAX_DEVICES];
static pikv_context *g_spied_ctx;
static int g_src = 0;      /* the source device of the device API calls */
static int g_checking = 0; /* the spy checks pointers (twin calls) */

/* The "device" tensors of the call in progress (CPU device memory is host memory, so
   they are host buffers; the spy checks the host path never gets them). */
typedef struct dev_range {
    const void *p;
    size_t bytes;
} dev_range;
static dev_range g_dev[5];
static const float *g_dev_k, *g_dev_v, *g_dev_q;
static float *g_dev_out, *g_dev_lse;

static int in_dev(const void *p)
{
    if (!p) return 0;
    for (int i = 0; i < 5; i++)
        if (g_dev[i].p && (const char *)p >= (const char *)g_dev[i].p &&
            (const char *)p < (const char *)g_dev[i].p + g_dev[i].bytes)
            return 1;
    return 0;
}

static void violation(const char *what, int dev)
{
    if (!g_checking) return;
    g_n.violations++;
    fprintf(stderr, "    spy: device %d: %s\n", dev, what);
}

static pikv_status spy_append(pikv_device *dev, const pikv_append_args *a)
{
    if (a->src_on_device) {
        g_n.append_direct++;
        if (dev->index != g_src) violation("append with src_on_device on a device other than the source", dev->index);
        if (a->k != g_dev_k || a->v != g_dev_v) violation("append with src_on_device: k/v are not the caller's", dev->index);
    } else {
        g_n.append_host++;
        if (in_dev(a->k) || in_dev(a->v)) violation("host-path append got device k/v", dev->index);
    }
    return g_real[dev->index]->append(dev, a);
}

static pikv_status spy_attention(pikv_device *dev, const pikv_attention_args *a)
{
    if (a->io_on_device) {
        g_n.attn_direct++;
        if (dev->index != g_src) violation("attention with io_on_device on a device other than the source", dev->index);
        if (a->q != g_dev_q || a->out != g_dev_out) violation("attention with io_on_device: q/out are not the caller's", dev->index);
        if (g_dev_lse && a->lse != g_dev_lse) violation("attention with io_on_device: lse is not the caller's", dev->index);
        if (!g_dev_lse && !in_dev(a->lse)) violation("attention with io_on_device: lse is not device scratch", dev->index);
    } else {
        g_n.attn_host++;
        if (in_dev(a->q) || in_dev(a->out) || in_dev(a->lse)) violation("host-path attention got device q/out/lse", dev->index);
    }
    return g_real[dev->index]->attention(dev, a);
}

static pikv_status spy_score(pikv_device *dev, const pikv_score_args *a)
{
    if (in_dev(a->q)) violation("score got device q (it takes host q)", dev->index);
    return g_real[dev->index]->score(dev, a);
}

static pikv_status spy_memory_read(pikv_device *dev, const void *src, void *dst, uint64_t size)
{
    g_n.mem_read++;
    if (dev->index != g_src) violation("memory_read on a device other than the source", dev->index);
    if (!in_dev(src)) violation("memory_read from outside the caller's tensors (or the lse scratch)", dev->index);
    return g_real[dev->index]->memory_read(dev, src, dst, size);
}

static pikv_status spy_memory_write(pikv_device *dev, void *dst, const void *src, uint64_t size)
{
    g_n.mem_write++;
    if (dev->index != g_src) violation("memory_write on a device other than the source", dev->index);
    if (!in_dev(dst)) violation("memory_write outside the caller's tensors", dev->index);
    return g_real[dev->index]->memory_write(dev, dst, src, size);
}

static pikv_status spy_find_out_of_range(pikv_device *dev, const float *p, int64_t n, float limit, int64_t *first)
{
    g_n.find_out_of_range++;
    if (dev->index != g_src) violation("find_out_of_range on a device other than the source", dev->index);
    if (!in_dev(p)) violation("find_out_of_range outside the caller's tensors", dev->index);
    return g_real[dev->index]->find_out_of_range(dev, p, n, limit, first);
}

static pikv_status spy_buffer_alloc(pikv_device *dev, uint64_t size, pikv_buffer **out)
{
    g_n.buffer_alloc++;
    pikv_status st = g_real[dev->index]->buffer_alloc(dev, size, out);
    if (st == PIKV_OK && g_checking) g_dev[4] = (dev_range){(*out)->host, (size_t)size}; /* CPU: its address */
    return st;
}

static void spy_install(pikv_context *ctx)
{
    g_spied_ctx = ctx;
    for (int32_t i = 0; i < ctx->n_devices; i++) {
        pikv_device *d = ctx->devices[i];
        g_real[i] = d->iface;
        g_spy_iface[i] = *d->iface;
        g_spy_iface[i].append = spy_append;
        g_spy_iface[i].attention = spy_attention;
        g_spy_iface[i].score = spy_score;
        g_spy_iface[i].memory_read = spy_memory_read;
        g_spy_iface[i].memory_write = spy_memory_write;
        g_spy_iface[i].find_out_of_range = spy_find_out_of_range;
        g_spy_iface[i].buffer_alloc = spy_buffer_alloc;
        d->iface = &g_spy_iface[i];
    }
}

static void spy_begin(void)
{
    memset(&g_n, 0, sizeof g_n);
}

static void dev_clear(void)
{
    memset(g_dev, 0, sizeof g_dev);
    g_dev_k = g_dev_v = g_dev_q = NULL;
    g_dev_out = g_dev_lse = NULL;
}

/* ------------------------------------------------------------------------ */
/* Twin caches                                                               */
/* ------------------------------------------------------------------------ */

enum { NL = 2, NQH = 4, NKV = 2, HD = 16, NE = 4, EPT = 2, PS = 8, NSEQ = 3 };
#define ROW ((size_t)NKV * HD)
#define QROW ((size_t)NQH * HD)

typedef enum placement_kind { ON_SOURCE, SPREAD, ELSEWHERE } placement_kind;
typedef enum policy_kind { EXACT, QUEST, H2O } policy_kind;

static const char *dtype_name(pikv_dtype t)
{
    return t == PIKV_DTYPE_F32 ? "f32" : t == PIKV_DTYPE_F16 ? "f16" : t == PIKV_DTYPE_INT8 ? "int8" : "int4";
}
static const char *placement_name(placement_kind k)
{
    return k == ON_SOURCE ? "pages on cpu0" : k == SPREAD ? "pages on cpu0..cpu2" : "pages on cpu1, cpu2";
}
static const char *policy_name(policy_kind k)
{
    return k == EXACT ? "exact" : k == QUEST ? "quest" : "h2o";
}

static pikv_cache_params twin_params(pikv_dtype dtype, placement_kind pk, policy_kind pol, int32_t *devs)
{
    pikv_cache_params p = pikv_cache_default_params();
    p.n_layers = NL;
    p.n_q_heads = NQH;
    p.n_kv_heads = NKV;
    p.head_dim = HD;
    p.n_experts = NE;
    p.experts_per_token = EPT;
    p.page_size = PS;
    p.dtype = dtype;
    p.quant_group = 4;
    p.capacity_tokens = 4096;
    p.max_sequences = NSEQ;
    p.placement = PIKV_PLACEMENT_EXPERT;
    if (pk == ON_SOURCE) {
        devs[0] = 0;
        p.n_devices = 1;
    } else if (pk == SPREAD) {
        devs[0] = 0, devs[1] = 1, devs[2] = 2;
        p.n_devices = 3;
    } else {
        devs[0] = 1, devs[1] = 2;
        p.n_devices = 2;
    }
    p.devices = devs;
    p.select.sink_tokens = 4;
    p.select.recent_tokens = 8;
    p.select.token_budget = 24;
    if (pol == H2O) {
        p.budget.mode = PIKV_BUDGET_UNIFORM;
        p.budget.total_tokens = NL * 40;
        p.evict.policy = PIKV_EVICT_H2O;
    }
    return p;
}

static int stats_same(const pikv_cache *a, const pikv_cache *b)
{
    pikv_cache_stats x, y;
    if (pikv_cache_get_stats(a, &x) != PIKV_OK || pikv_cache_get_stats(b, &y) != PIKV_OK) return 0;
    return x.tokens == y.tokens && x.pages == y.pages && x.bytes_used == y.bytes_used &&
           x.last_pages_read == y.last_pages_read && x.last_bytes_read == y.last_bytes_read &&
           x.last_tokens_read == y.last_tokens_read && x.bytes_read == y.bytes_read &&
           x.last_recall == y.last_recall && x.last_output_error == y.last_output_error &&
           x.last_hit_rate == y.last_hit_rate && x.evicted_pages == y.evicted_pages &&
           x.evicted_tokens == y.evicted_tokens && x.appends == y.appends && x.attends == y.attends;
}

static int lengths_same(const pikv_cache *a, const pikv_cache *b)
{
    for (int l = 0; l < NL; l++)
        for (int s = 0; s < NSEQ; s++) {
            int64_t x = -1, y = -2;
            if (pikv_seq_length(a, s, l, &x) != PIKV_OK || pikv_seq_length(b, s, l, &y) != PIKV_OK || x != y)
                return 0;
        }
    return 1;
}

/* Fills with a NaN pattern so an output the library did not write shows. */
static void poison(float *x, size_t n)
{
    for (size_t i = 0; i < n; i++) x[i] = NAN;
}

/* One append of n tokens of layer/seq to both twins: A through the device API from cpu0,
   B through the host API. Checks the paths the spy saw. */
static void twin_append(pikv_cache *a, pikv_cache *b, tu_rng *r, int layer, int seq, int n, placement_kind pk)
{
    float *k = tu_xmalloc((size_t)n * ROW * sizeof(float));
    float *v = tu_xmalloc((size_t)n * ROW * sizeof(float));
    int32_t *ex = tu_xmalloc((size_t)n * EPT * sizeof(int32_t));
    tu_fill(r, k, (size_t)n * ROW, 2.0f);
    tu_fill(r, v, (size_t)n * ROW, 1.0f);
    for (int t = 0; t < n; t++) tu_pick_experts(r, NE, EPT, 1, ex + (size_t)t * EPT);
    /* the "device" copies the engine holds */
    float *dk = tu_xmalloc((size_t)n * ROW * sizeof(float));
    float *dv = tu_xmalloc((size_t)n * ROW * sizeof(float));
    memcpy(dk, k, (size_t)n * ROW * sizeof(float));
    memcpy(dv, v, (size_t)n * ROW * sizeof(float));
    dev_clear();
    g_dev[0] = (dev_range){dk, (size_t)n * ROW * sizeof(float)};
    g_dev[1] = (dev_range){dv, (size_t)n * ROW * sizeof(float)};
    g_dev_k = dk, g_dev_v = dv;
    spy_begin();
    g_checking = 1;
    CHECK_OK(pikv_cache_append_device(a, layer, seq, n, 0, dk, dv, NULL, ex));
    g_checking = 0;
    const spy_counts got = g_n;
    dev_clear();
    CHECK_OK(pikv_cache_append(b, layer, seq, n, k, v, NULL, ex));
    CHECK_EQ(got.violations, 0);
    /* k and v are checked on the source device, and read back at most once (pages off the source) */
    CHECK_EQ(got.find_out_of_range, 2);
    CHECK(got.mem_read == 0 || got.mem_read == 2);
    CHECK_EQ(got.mem_write, 0);
    if (pk == ON_SOURCE) {
        CHECKF(got.append_direct == 1 && got.append_host == 0, "direct %ld host %ld", got.append_direct,
               got.append_host);
        CHECK_EQ(got.mem_read, 0);
    } else if (pk == ELSEWHERE) {
        CHECKF(got.append_direct == 0 && got.append_host >= 1, "direct %ld host %ld", got.append_direct,
               got.append_host);
        CHECK_EQ(got.mem_read, 2);
    } else {
        CHECK(got.append_direct <= 1);
        CHECK_EQ(got.append_direct + got.append_host >= 1, 1);
        if (got.append_host > 0) CHECK_EQ(got.mem_read, 2);
        if (got.append_host == 0) CHECK_EQ(got.mem_read, 0);
    }
    /* the engine's tensors are left alone */
    CHECK(memcmp(dk, k, (size_t)n * ROW * sizeof(float)) == 0 && memcmp(dv, v, (size_t)n * ROW * sizeof(float)) == 0);
    CHECK(lengths_same(a, b));
    CHECK(stats_same(a, b));
    free(k), free(v), free(ex), free(dk), free(dv);
}

static long g_direct_attends, g_staged_attends;

/* One attend of a batch on both twins; outputs and lse must be bit-identical. */
static void twin_attend(pikv_cache *a, pikv_cache *b, tu_rng *r, int layer, int nq, const int32_t *seqs,
                        const pikv_select_params *sel, int with_lse, placement_kind pk, policy_kind pol)
{
    float *q = tu_xmalloc((size_t)nq * QROW * sizeof(float));
    int32_t *ex = tu_xmalloc((size_t)nq * EPT * sizeof(int32_t));
    tu_fill(r, q, (size_t)nq * QROW, 2.0f);
    for (int i = 0; i < nq; i++) tu_pick_experts(r, NE, EPT, 0, ex + (size_t)i * EPT);
    float *dq = tu_xmalloc((size_t)nq * QROW * sizeof(float));
    memcpy(dq, q, (size_t)nq * QROW * sizeof(float));
    float *dout = tu_xmalloc((size_t)nq * QROW * sizeof(float)), *out = tu_xmalloc((size_t)nq * QROW * sizeof(float));
    float *dlse = tu_xmalloc((size_t)nq * NQH * sizeof(float)), *lse = tu_xmalloc((size_t)nq * NQH * sizeof(float));
    poison(dout, (size_t)nq * QROW), poison(out, (size_t)nq * QROW);
    poison(dlse, (size_t)nq * NQH), poison(lse, (size_t)nq * NQH);

    pikv_attend_batch bd;
    memset(&bd, 0, sizeof bd);
    bd.n_queries = nq;
    bd.seq_ids = seqs;
    bd.q = dq;
    bd.experts = ex;
    bd.out = dout;
    bd.lse = with_lse ? dlse : NULL;
    bd.select = sel;
    dev_clear();
    g_dev[0] = (dev_range){dq, (size_t)nq * QROW * sizeof(float)};
    g_dev[1] = (dev_range){dout, (size_t)nq * QROW * sizeof(float)};
    if (with_lse) g_dev[2] = (dev_range){dlse, (size_t)nq * NQH * sizeof(float)};
    g_dev_q = dq, g_dev_out = dout, g_dev_lse = with_lse ? dlse : NULL;
    spy_begin();
    g_checking = 1;
    CHECK_OK(pikv_cache_attend_device(a, layer, 0, &bd));
    g_checking = 0;
    const spy_counts got = g_n;
    dev_clear();

    pikv_attend_batch bh = bd;
    bh.q = q;
    bh.out = out;
    bh.lse = with_lse ? lse : NULL;
    CHECK_OK(pikv_cache_attend(b, layer, &bh));

    CHECK(memcmp(dq, q, (size_t)nq * QROW * sizeof(float)) == 0);
    CHECKF(memcmp(dout, out, (size_t)nq * QROW * sizeof(float)) == 0, "outputs differ (first %g vs %g)",
           (double)dout[0], (double)out[0]);
    if (with_lse) CHECK(memcmp(dlse, lse, (size_t)nq * NQH * sizeof(float)) == 0);
    CHECK(stats_same(a, b));
    CHECK_EQ(got.violations, 0);
    CHECK_EQ(got.find_out_of_range, 1);
    const int quest = sel && (sel->mode & PIKV_SELECT_QUEST);
    const int measure = sel && sel->measure && sel->mode != PIKV_SELECT_ALL;
    if (got.attn_direct) { /* zero copy: one op on the engine's tensors, nothing written back */
        g_direct_attends++;
        CHECK_EQ(got.attn_direct, 1);
        CHECK_EQ(got.attn_host, 0);
        CHECK_EQ(got.mem_write, 0);
        /* q read for QUEST scoring, lse read for H2O's mass */
        CHECK_EQ(got.mem_read, (quest ? 1 : 0) + (pol == H2O ? 1 : 0));
        CHECK_EQ(got.buffer_alloc, with_lse ? 0 : 1);
        CHECK(!measure);
    } else { /* staged: q read once, out (and lse) written once */
        g_staged_attends++;
        CHECK_EQ(got.mem_read, 1);
        CHECK_EQ(got.mem_write, with_lse ? 2 : 1);
        CHECK_EQ(got.buffer_alloc, 0);
    }
    if (pk == ON_SOURCE) CHECKF(got.attn_direct == 1 || measure, "pages all on the source, yet staged");
    if (pk == ELSEWHERE) CHECK_EQ(got.attn_direct, 0);
    free(q), free(ex), free(dq), free(dout), free(out), free(dlse), free(lse);
}

static void twin_case(pikv_context *ctx, pikv_dtype dtype, placement_kind pk, policy_kind pol, uint64_t seed)
{
    tu_set_case("twins: %s, %s, %s", dtype_name(dtype), placement_name(pk), policy_name(pol));
    int32_t devs[3];
    pikv_cache_params p = twin_params(dtype, pk, pol, devs);
    pikv_cache *a = NULL, *b = NULL;
    if (!CHECK_OK(pikv_cache_create(ctx, &p, &a)) || !CHECK_OK(pikv_cache_create(ctx, &p, &b))) {
        pikv_cache_free(a);
        pikv_cache_free(b);
        return;
    }
    for (int s = 0; s < NSEQ; s++) {
        CHECK_OK(pikv_seq_add(a, s));
        CHECK_OK(pikv_seq_add(b, s));
    }
    pikv_select_params sel = p.select;
    sel.mode = pol == QUEST ? PIKV_SELECT_QUEST : PIKV_SELECT_ALL;
    tu_rng r = tu_rng_seed(seed);
    const int32_t all[NSEQ] = {0, 1, 2}, some[2] = {2, 0};
    for (int round = 0; round < 8; round++) {
        for (int l = 0; l < NL; l++)
            for (int s = 0; s < NSEQ; s++) {
                const int n = round == 0 ? 1 : (int)tu_int(&r, 1, 13);
                twin_append(a, b, &r, l, s, n, pk);
            }
        for (int l = 0; l < NL; l++) {
            twin_attend(a, b, &r, l, NSEQ, all, &sel, round % 2, pk, pol);
            twin_attend(a, b, &r, l, 2, some, &sel, (round + 1) % 2, pk, pol);
            twin_attend(a, b, &r, l, 1, all + 1, NULL, 1, pk, pol); /* the cache's default select */
        }
        if (pol == QUEST && round % 3 == 2) { /* measured: staged even with every page on the source */
            pikv_select_params m = sel;
            m.measure = 1;
            twin_attend(a, b, &r, round % NL, NSEQ, all, &m, 1, pk, pol);
        }
    }
    if (pol == H2O) {
        pikv_cache_stats st;
        CHECK_OK(pikv_cache_get_stats(a, &st));
        CHECKF(st.evicted_pages > 0, "the H2O case evicted nothing (budget too large for the test)");
    }
    pikv_cache_free(a);
    pikv_cache_free(b);
}

/* ------------------------------------------------------------------------ */
/* Bad input through the device API                                          */
/* ------------------------------------------------------------------------ */

static int message_has(pikv_context *ctx, const char *needle)
{
    const char *m = pikv_context_last_error(ctx);
    return m && strstr(m, needle) != NULL;
}

/* Both twins answer the same attend bit for bit (the failed call changed nothing). */
static void twins_still_equal(pikv_cache *a, pikv_cache *b, tu_rng *r)
{
    CHECK(lengths_same(a, b));
    CHECK(stats_same(a, b));
    const int32_t all[NSEQ] = {0, 1, 2};
    for (int l = 0; l < NL; l++) twin_attend(a, b, r, l, NSEQ, all, NULL, 1, SPREAD, EXACT);
}

static void bad_input_case(pikv_context *ctx, pikv_dtype dtype)
{
    tu_set_case("bad input: %s, pages on cpu0..cpu2", dtype_name(dtype));
    int32_t devs[3];
    pikv_cache_params p = twin_params(dtype, SPREAD, EXACT, devs);
    pikv_cache *a = NULL, *b = NULL;
    if (!CHECK_OK(pikv_cache_create(ctx, &p, &a)) || !CHECK_OK(pikv_cache_create(ctx, &p, &b))) {
        pikv_cache_free(a);
        pikv_cache_free(b);
        return;
    }
    tu_rng r = tu_rng_seed(0xbad1 + (uint64_t)dtype);
    for (int s = 0; s < NSEQ; s++) {
        CHECK_OK(pikv_seq_add(a, s));
        CHECK_OK(pikv_seq_add(b, s));
    }
    for (int s = 0; s < NSEQ; s++)
        for (int l = 0; l < NL; l++) twin_append(a, b, &r, l, s, 11, SPREAD);
    const int n = 5;
    float *k = tu_xmalloc((size_t)n * ROW * sizeof(float)), *v = tu_xmalloc((size_t)n * ROW * sizeof(float));
    int32_t ex[5 * EPT];
    tu_fill(&r, k, (size_t)n * ROW, 1.0f);
    tu_fill(&r, v, (size_t)n * ROW, 1.0f);
    for (int t = 0; t < n; t++) tu_pick_experts(&r, NE, EPT, 0, ex + t * EPT);
    int64_t len0 = -1, len1 = -1;
    CHECK_OK(pikv_seq_length(a, 1, 0, &len0));

    g_expect_errors++;
    /* a NaN key at index 37 (token 1) */
    k[37] = NAN;
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_append_device(a, 0, 1, n, 0, k, v, NULL, ex));
    CHECKF(message_has(ctx, "k[37]") && message_has(ctx, "token 1") && message_has(ctx, "pikv_cache_append_device"),
           "message: %s", pikv_context_last_error(ctx));
    k[37] = 0.5f;
    /* an infinite value at v[ROW * 4 + 3] (the last token) */
    v[ROW * 4 + 3] = -INFINITY;
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_append_device(a, 0, 1, n, 0, k, v, NULL, ex));
    CHECKF(message_has(ctx, "v[131]") && message_has(ctx, "token 4"), "message: %s", pikv_context_last_error(ctx));
    v[ROW * 4 + 3] = 0.25f;
    if (dtype != PIKV_DTYPE_F32) { /* finite, but past what f16 holds */
        k[5] = 1.0e5f;
        CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_append_device(a, 0, 1, n, 0, k, v, NULL, ex));
        CHECKF(message_has(ctx, "k[5]") && message_has(ctx, "f16 range"), "message: %s", pikv_context_last_error(ctx));
        k[5] = 0.125f;
    }
    /* devices out of range, NULL pointers */
    CHECK_STATUS(PIKV_ERR_OUT_OF_RANGE, pikv_cache_append_device(a, 0, 1, n, -1, k, v, NULL, ex));
    CHECKF(message_has(ctx, "device -1"), "message: %s", pikv_context_last_error(ctx));
    CHECK_STATUS(PIKV_ERR_OUT_OF_RANGE, pikv_cache_append_device(a, 0, 1, n, pikv_device_count(ctx), k, v, NULL, ex));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_append_device(a, 0, 1, n, 0, NULL, v, NULL, ex));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_append_device(NULL, 0, 1, n, 0, k, v, NULL, ex));
    CHECK_STATUS(PIKV_ERR_OUT_OF_RANGE, pikv_cache_append_device(a, NL, 1, n, 0, k, v, NULL, ex));
    g_expect_errors--;
    CHECK_OK(pikv_cache_append_device(a, 0, 1, 0, 0, NULL, NULL, NULL, NULL)); /* nothing to append */
    CHECK_OK(pikv_seq_length(a, 1, 0, &len1));
    CHECK_EQ(len1, len0);
    twins_still_equal(a, b, &r);

    /* attend: a non-finite query value, devices out of range, NULL batch */
    float q[2 * QROW], out[2 * QROW], lse[2 * NQH];
    tu_fill(&r, q, 2 * QROW, 1.0f);
    const int32_t seqs[2] = {0, 2};
    pikv_attend_batch bd;
    memset(&bd, 0, sizeof bd);
    bd.n_queries = 2;
    bd.seq_ids = seqs;
    bd.q = q;
    bd.out = out;
    bd.lse = lse;
    g_expect_errors++;
    q[QROW + 9] = NAN;
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_attend_device(a, 0, 0, &bd));
    char want[32];
    snprintf(want, sizeof want, "q[%d]", (int)QROW + 9);
    CHECKF(message_has(ctx, want) && message_has(ctx, "query 1"), "message: %s", pikv_context_last_error(ctx));
    q[QROW + 9] = 0.0f;
    CHECK_STATUS(PIKV_ERR_OUT_OF_RANGE, pikv_cache_attend_device(a, 0, -3, &bd));
    CHECK_STATUS(PIKV_ERR_OUT_OF_RANGE, pikv_cache_attend_device(a, 0, pikv_device_count(ctx) + 1, &bd));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_attend_device(a, 0, 0, NULL));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_attend_device(NULL, 0, 0, &bd));
    g_expect_errors--;
    twins_still_equal(a, b, &r);

    /* An allocation failure anywhere in append_device / attend_device: OUT_OF_MEMORY and
       nothing changed; then the call succeeds and the twins agree. */
    tu_set_case("allocation failures: %s", dtype_name(dtype));
    for (int which = 0; which < 2; which++) {
        long fails = 0;
        for (long at = 1; at < 200; at++) {
            pikv_cache_stats before, after;
            CHECK_OK(pikv_cache_get_stats(a, &before));
            CHECK_OK(pikv_seq_length(a, 2, 1, &len0));
            g_expect_errors++;
            g_alloc_count = 0;
            g_fail_at = at;
            pikv_status st = which == 0 ? pikv_cache_append_device(a, 1, 2, n, 0, k, v, NULL, ex)
                                        : pikv_cache_attend_device(a, 1, 0, &bd);
            g_fail_at = 0;
            g_expect_errors--;
            if (st == PIKV_OK) break;
            fails++;
            CHECK_STATUS(PIKV_ERR_OUT_OF_MEMORY, st);
            CHECK_OK(pikv_cache_get_stats(a, &after));
            CHECK_OK(pikv_seq_length(a, 2, 1, &len1));
            CHECK_EQ(len1, len0);
            CHECK(after.tokens == before.tokens && after.pages == before.pages && after.appends == before.appends &&
                  after.attends == before.attends && after.bytes_allocated == before.bytes_allocated);
        }
        CHECKF(fails > 0, "no allocation to fail in %s", which == 0 ? "append_device" : "attend_device");
        if (which == 0) CHECK_OK(pikv_cache_append(b, 1, 2, n, k, v, NULL, ex));
        else CHECK_OK(pikv_cache_attend(b, 1, &bd));
    }
    twins_still_equal(a, b, &r);
    free(k);
    free(v);
    pikv_cache_free(a);
    pikv_cache_free(b);
}

/* ------------------------------------------------------------------------ */
/* OpenCL / Vulkan: UNSUPPORTED                                              */
/* ------------------------------------------------------------------------ */

static void unsupported_backends(void)
{
    tu_set_case("zero copy from OpenCL / Vulkan devices");
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "all";
    cp.cpu_threads = 2;
    cp.log_fn = log_cb;
    cp.log_level = PIKV_LOG_WARN;
    pikv_context *ctx = NULL;
    if (!CHECK_OK(pikv_context_create(&cp, &ctx))) return;
    int tested = 0;
    for (int32_t d = 0; d < pikv_device_count(ctx); d++) {
        pikv_device_info info;
        if (!CHECK_OK(pikv_device_get_info(ctx, d, &info))) continue;
        if (info.backend != PIKV_BACKEND_OPENCL && info.backend != PIKV_BACKEND_VULKAN) continue;
        int32_t devs[1] = {0};
        pikv_cache_params p = twin_params(PIKV_DTYPE_F32, ON_SOURCE, EXACT, devs);
        pikv_cache *c = NULL;
        if (!CHECK_OK(pikv_cache_create(ctx, &p, &c))) continue;
        CHECK_OK(pikv_seq_add(c, 0));
        float k[ROW], v[ROW], q[QROW], out[QROW];
        tu_rng r = tu_rng_seed(7);
        tu_fill(&r, k, ROW, 1.0f);
        tu_fill(&r, v, ROW, 1.0f);
        tu_fill(&r, q, QROW, 1.0f);
        int32_t ex[EPT] = {0, 1}, seq = 0;
        g_expect_errors++;
        CHECK_STATUS(PIKV_ERR_UNSUPPORTED, pikv_cache_append_device(c, 0, 0, 1, d, k, v, NULL, ex));
        CHECKF(message_has(ctx, info.name) && message_has(ctx, pikv_backend_name(info.backend)), "message: %s",
               pikv_context_last_error(ctx));
        pikv_attend_batch b;
        memset(&b, 0, sizeof b);
        b.n_queries = 1;
        b.seq_ids = &seq;
        b.q = q;
        b.out = out;
        CHECK_STATUS(PIKV_ERR_UNSUPPORTED, pikv_cache_attend_device(c, 0, d, &b));
        CHECKF(message_has(ctx, info.name), "message: %s", pikv_context_last_error(ctx));
        g_expect_errors--;
        int64_t len = -1;
        CHECK_OK(pikv_seq_length(c, 0, 0, &len));
        CHECK_EQ(len, 0);
        pikv_cache_free(c);
        printf("zero copy from %s (%s): UNSUPPORTED as documented\n", info.name, pikv_backend_name(info.backend));
        tested++;
    }
    if (!tested) printf("no OpenCL or Vulkan device: the UNSUPPORTED check is skipped\n");
    pikv_context_free(ctx);
}

int main(void)
{
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "cpu";
    cp.cpu_devices = 3;
    cp.cpu_threads = 2;
    cp.allocator.alloc = test_alloc;
    cp.allocator.free = test_free;
    cp.log_fn = log_cb;
    cp.log_level = PIKV_LOG_WARN;
    pikv_context *ctx = NULL;
    if (pikv_context_create(&cp, &ctx) != PIKV_OK) {
        fprintf(stderr, "zero_copy: context creation failed\n");
        return 1;
    }
    tu_err_ctx = ctx;
    spy_install(ctx);

    const pikv_dtype dtypes[4] = {PIKV_DTYPE_F32, PIKV_DTYPE_F16, PIKV_DTYPE_INT8, PIKV_DTYPE_INT4};
    uint64_t seed = 1;
    for (int t = 0; t < 4; t++)
        for (int pk = ON_SOURCE; pk <= ELSEWHERE; pk++)
            for (int pol = EXACT; pol <= H2O; pol++)
                twin_case(ctx, dtypes[t], (placement_kind)pk, (policy_kind)pol, seed++ * 0x9e3779b97f4a7c15ull);
    tu_set_case("path coverage");
    CHECKF(g_direct_attends > 0 && g_staged_attends > 0, "direct %ld, staged %ld attends", g_direct_attends,
           g_staged_attends);
    printf("attends: %ld zero copy, %ld staged\n", g_direct_attends, g_staged_attends);

    for (int t = 0; t < 4; t++) bad_input_case(ctx, dtypes[t]);
    pikv_context_free(ctx);

    unsupported_backends();

    tu_set_case("library errors");
    CHECKF(g_unexpected_errors == 0, "%ld unexpected ERROR logs (the first: %s)", g_unexpected_errors,
           g_first_unexpected);
    return tu_finish();
}
