/*
 * exact_attend: exact-mode attention (pikv_cache_attend, every page selected, f32/f16 storage)
 * equals dense attention in double precision, over many geometries, placements and device
 * counts, with appends in chunks of random sizes; and the result does not depend on the
 * placement or the device count.
 */
#include "test-util.h"

#define MAX_NDEV 8
#define MAX_SEQS 8

static pikv_context *g_ctx[MAX_NDEV + 1];

static pikv_context *ctx_for(int nd)
{
    if (!g_ctx[nd]) {
        /* vary the worker threads too (1..3): results may not depend on how work is split */
        pikv_context_params cp = pikv_context_default_params();
        cp.backends = "cpu";
        cp.cpu_devices = nd;
        cp.cpu_threads = 1 + nd % 3;
        if (pikv_context_create(&cp, &g_ctx[nd]) != PIKV_OK)
            g_ctx[nd] = NULL;
    }
    return g_ctx[nd];
}

typedef struct acase {
    int ps, nqh, nkv, hd, ne, ept, nl;
    pikv_dtype dt;
    pikv_placement pl;
    int nd;
    int nseq;
    int64_t len[MAX_SEQS][4]; /* per sequence and layer */
    float attn_scale;
    int n_shards, hash_tokens;
    float q_amp;
    int rebalance;
    int skew;
} acase;

static const char *pl_name(pikv_placement p)
{
    return p == PIKV_PLACEMENT_EXPERT ? "expert" : p == PIKV_PLACEMENT_HASH ? "hash" : "balanced";
}

static void describe(const acase *c, uint64_t seed, uint64_t chunk_seed)
{
    char lens[256];
    size_t o = 0;
    lens[0] = 0;
    for (int s = 0; s < c->nseq && o < sizeof lens - 40; s++) {
        o += (size_t)snprintf(lens + o, sizeof lens - o, "%s[", s ? "," : "");
        for (int l = 0; l < c->nl && o < sizeof lens - 20; l++)
            o += (size_t)snprintf(lens + o, sizeof lens - o, "%s%lld", l ? " " : "",
                                  (long long)c->len[s][l]);
        o += (size_t)snprintf(lens + o, sizeof lens - o, "]");
    }
    tu_set_case("ps=%d nq=%d nkv=%d hd=%d experts=%d/%d layers=%d %s %s devices=%d "
                "n_shards=%d hash_tokens=%d scale=%g q_amp=%g rebalance=%d seed=%llu "
                "chunk_seed=%llu lens=%s",
                c->ps, c->nqh, c->nkv, c->hd, c->ne, c->ept, c->nl,
                c->dt == PIKV_DTYPE_F16 ? "f16" : "f32", pl_name(c->pl), c->nd, c->n_shards,
                c->hash_tokens, (double)c->attn_scale, (double)c->q_amp, c->rebalance,
                (unsigned long long)seed, (unsigned long long)chunk_seed, lens);
}

static pikv_cache_params params_of(const acase *c)
{
    pikv_cache_params p = pikv_cache_default_params();
    p.n_layers = c->nl;
    p.n_q_heads = c->nqh;
    p.n_kv_heads = c->nkv;
    p.head_dim = c->hd;
    p.n_experts = c->ne;
    p.experts_per_token = c->ept;
    p.page_size = c->ps;
    p.dtype = c->dt;
    p.max_sequences = 16;
    p.placement = c->pl;
    p.n_shards = c->n_shards;
    p.hash_tokens = c->hash_tokens;
    p.devices = NULL;
    p.n_devices = 0;
    p.attn_scale = c->attn_scale;
    int64_t mx = 0;
    for (int l = 0; l < c->nl; l++) {
        int64_t t = 0;
        for (int s = 0; s < c->nseq; s++)
            t += c->len[s][l];
        if (t > mx)
            mx = t;
    }
    p.capacity_tokens = mx > 0 ? mx : 1; /* exactly enough: the boundary must be accepted */
    return p;
}

/* Output of one attend batch per layer for a fixed query set, saved for comparisons. */
typedef struct run_out {
    int nq;
    int32_t seqs[3 * MAX_SEQS];
    float *out[4];
    float *lse[4];
} run_out;

static void run_out_free(run_out *o)
{
    for (int l = 0; l < 4; l++) {
        free(o->out[l]);
        free(o->lse[l]);
        o->out[l] = o->lse[l] = NULL;
    }
}

/* Attends the batch (every sequence, some twice, shuffled) on every layer and checks. */
static void attend_all(pikv_cache *cache, const tu_model *mirror, const acase *c,
                       const int32_t *ids, uint64_t qseed, int use_lse, run_out *save)
{
    tu_rng qr = tu_rng_seed(qseed);
    int32_t seqs[3 * MAX_SEQS];
    int nq = 0;
    for (int s = 0; s < c->nseq; s++)
        seqs[nq++] = ids[s];
    int dups = (int)tu_int(&qr, 1, c->nseq);
    for (int i = 0; i < dups; i++)
        seqs[nq++] = ids[tu_int(&qr, 0, c->nseq - 1)];
    for (int i = nq - 1; i > 0; i--) {
        int j = (int)tu_int(&qr, 0, i);
        int32_t t = seqs[i];
        seqs[i] = seqs[j];
        seqs[j] = t;
    }
    size_t per = (size_t)c->nqh * c->hd;
    float *q = tu_xmalloc((size_t)nq * per * sizeof(float));
    int32_t *qex = tu_xmalloc((size_t)nq * c->ept * sizeof(int32_t));
    for (int l = 0; l < c->nl; l++) {
        float *out = tu_xmalloc((size_t)nq * per * sizeof(float));
        float *lse = tu_xmalloc((size_t)nq * c->nqh * sizeof(float));
        tu_fill(&qr, q, (size_t)nq * per, c->q_amp);
        for (int i = 0; i < nq; i++)
            tu_pick_experts(&qr, c->ne, c->ept, 0, qex + (size_t)i * c->ept);
        int pass_ex = (int)tu_int(&qr, 0, 1);
        tu_aerr e;
        pikv_status st = tu_attend_compare(cache, mirror, l, nq, seqs, q, pass_ex ? qex : NULL,
                                           out, use_lse ? lse : NULL, &e);
        if (CHECKF(st == PIKV_OK, "attend layer %d: %s: %s", l, pikv_status_name(st),
                   pikv_context_last_error(pikv_cache_context(cache)))) {
            CHECKF(e.stored <= TU_TOL_EXACT, "layer %d: normalized error %.3g vs reference on "
                   "stored K/V (bound %g)", l, e.stored, TU_TOL_EXACT);
            if (c->dt == PIKV_DTYPE_F16)
                CHECKF(e.input <= TU_TOL_F16_INPUT, "layer %d: f16 normalized error %.3g vs "
                       "reference on f32 inputs (bound %g)", l, e.input, TU_TOL_F16_INPUT);
            if (use_lse)
                CHECKF(e.lse <= TU_TOL_LSE, "layer %d: lse error %.3g", l, e.lse);
            CHECKF(e.bad_empty == 0, "layer %d: %ld empty-sequence outputs not 0/-inf", l,
                   e.bad_empty);
        }
        if (save && l < 4) {
            save->nq = nq;
            memcpy(save->seqs, seqs, (size_t)nq * sizeof(int32_t));
            save->out[l] = out;
            save->lse[l] = lse;
        } else {
            free(out);
            free(lse);
        }
    }
    free(q);
    free(qex);
}

/*
 * Builds the case's data from `seed` (independent of devices/placement/chunking), appends it
 * into a fresh cache in random chunks (chunk_seed), interleaving layers and sequences, and
 * checks attention midway and at the end. Saves the final outputs if save != NULL.
 */
static void run_case(const acase *c, uint64_t seed, uint64_t chunk_seed, run_out *save)
{
    describe(c, seed, chunk_seed);
    pikv_context *ctx = ctx_for(c->nd);
    if (!CHECK(ctx != NULL))
        return;
    tu_err_ctx = ctx;
    pikv_cache_params p = params_of(c);
    tu_model target, mirror;
    tu_model_init(&target, &p);
    tu_model_init(&mirror, &p);
    tu_rng dr = tu_rng_seed(seed);
    int32_t ids[MAX_SEQS];
    /* distinct sequence ids in [0, 16), derived from the data seed */
    {
        int32_t pool[16];
        for (int i = 0; i < 16; i++)
            pool[i] = i;
        for (int i = 0; i < c->nseq; i++) {
            int j = (int)tu_int(&dr, i, 15);
            int32_t t = pool[i];
            pool[i] = pool[j];
            pool[j] = t;
            ids[i] = pool[i];
        }
    }
    size_t row = (size_t)c->nkv * c->hd;
    for (int l = 0; l < c->nl; l++)
        for (int s = 0; s < c->nseq; s++) {
            int64_t n = c->len[s][l];
            if (n == 0)
                continue;
            float *k = tu_xmalloc((size_t)n * row * sizeof(float));
            float *v = tu_xmalloc((size_t)n * row * sizeof(float));
            int32_t *ex = tu_xmalloc((size_t)n * c->ept * sizeof(int32_t));
            tu_gen(&dr, &target, n, k, v, ex, c->skew);
            tu_model_push(&target, l, ids[s], n, k, v, ex);
            free(k);
            free(v);
            free(ex);
        }

    pikv_cache *cache = NULL;
    pikv_status st = pikv_cache_create(ctx, &p, &cache);
    if (!CHECKF(st == PIKV_OK && cache, "pikv_cache_create: %s: %s", pikv_status_name(st),
                pikv_context_last_error(ctx))) {
        tu_model_free(&target);
        tu_model_free(&mirror);
        return;
    }
    for (int s = 0; s < c->nseq; s++) {
        CHECK_OK(pikv_seq_add(cache, ids[s]));
        mirror.live[ids[s]] = 1;
    }

    /* replay */
    tu_rng cr = tu_rng_seed(chunk_seed);
    int64_t total = 0, done_total = 0;
    for (int l = 0; l < c->nl; l++)
        for (int s = 0; s < c->nseq; s++)
            total += c->len[s][l];
    int midway_checked = 0;
    int32_t *pos = tu_xmalloc((size_t)(total + 1) * sizeof(int32_t));
    while (done_total < total) {
        int l, s;
        int64_t rem;
        do {
            l = (int)tu_int(&cr, 0, c->nl - 1);
            s = (int)tu_int(&cr, 0, c->nseq - 1);
            rem = c->len[s][l] - tu_model_seq(&mirror, l, ids[s])->n;
        } while (rem <= 0);
        int64_t chunk;
        int kind = (int)tu_int(&cr, 0, 9);
        if (kind < 3)
            chunk = 1;
        else if (kind < 6)
            chunk = tu_int(&cr, 1, c->ps + 1);
        else
            chunk = tu_int(&cr, 1, rem);
        if (chunk > rem)
            chunk = rem;
        const tu_seq *ts = tu_model_seq(&target, l, ids[s]);
        int64_t off = tu_model_seq(&mirror, l, ids[s])->n;
        const int32_t *ex = ts->ex + (size_t)off * c->ept;
        if (c->ne == 1 && tu_int(&cr, 0, 1))
            ex = NULL; /* allowed for dense models */
        const int32_t *pp = NULL;
        if (tu_int(&cr, 0, 3) == 0) {
            for (int64_t i = 0; i < chunk; i++)
                pos[i] = (int32_t)(1000 + off + i); /* metadata only */
            pp = pos;
        }
        st = pikv_cache_append(cache, l, ids[s], (int32_t)chunk, ts->k + (size_t)off * row,
                               ts->v + (size_t)off * row, pp, ex);
        if (!CHECKF(st == PIKV_OK, "append layer %d seq %d n=%lld at %lld: %s: %s", l, ids[s],
                    (long long)chunk, (long long)off, pikv_status_name(st),
                    pikv_context_last_error(ctx)))
            break;
        tu_model_push(&mirror, l, ids[s], chunk, ts->k + (size_t)off * row,
                      ts->v + (size_t)off * row, ts->ex + (size_t)off * c->ept);
        done_total += chunk;
        if (!midway_checked && done_total * 2 >= total) {
            midway_checked = 1;
            attend_all(cache, &mirror, c, ids, seed ^ 0x1234, (int)(seed & 1), NULL);
        }
    }
    free(pos);

    /* lengths and token count */
    for (int l = 0; l < c->nl; l++)
        for (int s = 0; s < c->nseq; s++) {
            int64_t n = -1;
            CHECK_OK(pikv_seq_length(cache, ids[s], l, &n));
            CHECK_EQ(n, c->len[s][l]);
        }
    pikv_cache_stats cs;
    if (CHECK_OK(pikv_cache_get_stats(cache, &cs))) {
        CHECK_EQ(cs.tokens, total);
        CHECK_EQ(cs.sequences, c->nseq);
        CHECK_EQ(cs.n_devices, c->nd);
    }

    /* lse = NULL is allowed; saved outputs always carry lse for comparisons */
    int use_lse = save != NULL || (int)((seed >> 1) & 1) || c->dt == PIKV_DTYPE_F16;
    if (c->pl == PIKV_PLACEMENT_BALANCED && c->rebalance) {
        run_out before;
        memset(&before, 0, sizeof before);
        attend_all(cache, &mirror, c, ids, seed ^ 0xabcd, 1, &before);
        int64_t moved = -1;
        st = pikv_cache_rebalance(cache, &moved);
        CHECKF(st == PIKV_OK, "rebalance: %s: %s", pikv_status_name(st),
               pikv_context_last_error(ctx));
        CHECK(moved >= 0);
        run_out after;
        memset(&after, 0, sizeof after);
        attend_all(cache, &mirror, c, ids, seed ^ 0xabcd, 1, &after);
        size_t per = (size_t)c->nqh * c->hd;
        for (int l = 0; l < c->nl && l < 4; l++)
            if (before.out[l] && after.out[l])
                CHECKF(tu_norm_err_ff(after.out[l], before.out[l], (size_t)before.nq * per) <=
                           TU_TOL_EXACT,
                       "layer %d: output changed by rebalance", l);
        run_out_free(&before);
        run_out_free(&after);
    }
    attend_all(cache, &mirror, c, ids, seed ^ 0x5678, use_lse, save);

    pikv_cache_free(cache);
    tu_model_free(&target);
    tu_model_free(&mirror);
}

/* Lengths for one sequence: one of the interesting values for the page size. */
static int64_t pick_len(tu_rng *r, int ps, int64_t max_many)
{
    switch (tu_int(r, 0, 7)) {
    case 0: return 0;
    case 1: return 1;
    case 2: return ps > 1 ? ps - 1 : 2;
    case 3: return ps;
    case 4: return ps + 1;
    case 5: return 2 * ps + tu_int(r, 0, ps - 1);
    default: {
        int64_t pages = max_many / ps;
        if (pages < 3)
            pages = 3;
        return ps * tu_int(r, 3, pages) + tu_int(r, 0, ps - 1);
    }
    }
}

static const int k_experts[][2] = {{1, 1}, {4, 1}, {8, 2}, {16, 4}, {6, 3}, {2, 2}, {16, 1}};
#define N_EXPERT_CFG ((int)(sizeof k_experts / sizeof k_experts[0]))

static void fill_lens(acase *c, tu_rng *r, int64_t budget)
{
    /* budget bounds tokens * heads * head_dim per layer, so the reference stays cheap */
    int64_t max_many = budget / ((int64_t)c->nqh * c->hd * (c->nseq + 1));
    if (max_many < 3 * c->ps)
        max_many = 3 * c->ps;
    if (max_many > 1500)
        max_many = 1500;
    for (int s = 0; s < c->nseq; s++) {
        int64_t base = pick_len(r, c->ps, max_many);
        for (int l = 0; l < c->nl; l++) {
            /* ragged across layers too, sometimes */
            c->len[s][l] = tu_int(r, 0, 3) == 0 ? pick_len(r, c->ps, max_many) : base;
        }
    }
}

static void test_f16_helper(void)
{
    tu_set_case("f16 rounding helper self-test");
    CHECK(tu_f16_round(1.0f) == 1.0f);
    CHECK(tu_f16_round(1.0f + 0x1.0p-11f) == 1.0f);                /* tie -> even */
    CHECK(tu_f16_round(1.0f + 3 * 0x1.0p-11f) == 1.0f + 0x1.0p-9f); /* tie -> even (up) */
    CHECK(tu_f16_round(1.0f + 0x1.8p-11f) == 1.0f + 0x1.0p-10f);    /* above half */
    CHECK(tu_f16_round(65504.0f) == 65504.0f);
    CHECK(isinf(tu_f16_round(65520.0f)));
    CHECK(tu_f16_round(65519.0f) == 65504.0f);
    CHECK(tu_f16_round(0x1.0p-24f) == 0x1.0p-24f);
    CHECK(tu_f16_round(0x1.0p-25f) == 0.0f);                     /* tie -> even (0) */
    CHECK(tu_f16_round(3 * 0x1.0p-25f) == 0x1.0p-23f);           /* tie -> even (2) */
    CHECK(tu_f16_round(0x1.ffp-15f) == 0x1.ffp-15f);             /* largest-but-one subnormal */
    CHECK(tu_f16_round(0x1.fffp-15f) == 0x1.0p-14f);             /* rounds up to the normal */
    CHECK(tu_f16_round(-0.333333f) == -0.333251953125f);
    CHECK(tu_f32_to_f16_bits(-2.0f) == 0xc000);
    CHECK(tu_f32_to_f16_bits(0.1f) == 0x2e66);
}

int main(void)
{
    test_f16_helper();

    static const int page_sizes[] = {1, 7, 13, 16, 64};
    static const int ratios[] = {1, 2, 4, 8};
    static const int head_dims[] = {8, 24, 64, 80, 128, 3, 1, 40};
    const int64_t budget = 3000000; /* tokens * q heads * head_dim per layer */
    int n_cases = 0;

    /* 1. Systematic: every page size x GQA ratio x dtype; the rest cycles. */
    int k = 0;
    for (int ip = 0; ip < 5; ip++)
        for (int ir = 0; ir < 4; ir++)
            for (int dt = 0; dt < 2; dt++, k++) {
                tu_rng r = tu_rng_seed(1000 + (uint64_t)k);
                acase c;
                memset(&c, 0, sizeof c);
                c.ps = page_sizes[ip];
                c.nkv = 1 + k % 3;
                c.nqh = c.nkv * ratios[ir];
                c.hd = head_dims[k % 8];
                c.ne = k_experts[k % N_EXPERT_CFG][0];
                c.ept = k_experts[k % N_EXPERT_CFG][1];
                c.nl = 1 + k % 3;
                c.dt = dt ? PIKV_DTYPE_F16 : PIKV_DTYPE_F32;
                c.pl = (pikv_placement)(k % 3);
                c.nd = 1 + (k * 3) % 8;
                c.nseq = 1 + k % 4;
                c.q_amp = (k % 4 == 3) ? 4.0f : 1.0f;
                c.rebalance = (k / 3) % 2;
                c.skew = k % 2;
                fill_lens(&c, &r, budget);
                if (k % 5 == 0) { /* make sure the interesting lengths all appear */
                    c.nseq = 4;
                    for (int l = 0; l < c.nl; l++) {
                        c.len[0][l] = 0;
                        c.len[1][l] = 1;
                        c.len[2][l] = c.ps > 1 ? c.ps - 1 : 3;
                        c.len[3][l] = c.ps;
                    }
                }
                run_case(&c, 77000 + (uint64_t)k, 99000 + (uint64_t)k, NULL);
                n_cases++;
            }

    /* 2. Random geometries. */
    for (int i = 0; i < 100; i++) {
        tu_rng r = tu_rng_seed(500000 + (uint64_t)i);
        acase c;
        memset(&c, 0, sizeof c);
        static const int ps_any[] = {1, 2, 3, 5, 7, 8, 13, 16, 31, 32, 64};
        c.ps = ps_any[tu_int(&r, 0, 10)];
        c.nkv = (int)tu_int(&r, 1, 4);
        c.nqh = c.nkv * ratios[tu_int(&r, 0, 3)];
        c.hd = tu_int(&r, 0, 2) ? head_dims[tu_int(&r, 0, 7)] : (int)tu_int(&r, 1, 130);
        int ex = (int)tu_int(&r, 0, N_EXPERT_CFG - 1);
        c.ne = k_experts[ex][0];
        c.ept = k_experts[ex][1];
        if (tu_int(&r, 0, 3) == 0) {
            c.ne = (int)tu_int(&r, 1, 16);
            c.ept = (int)tu_int(&r, 1, c.ne < 4 ? c.ne : 4);
        }
        c.nl = (int)tu_int(&r, 1, 3);
        c.dt = tu_int(&r, 0, 1) ? PIKV_DTYPE_F16 : PIKV_DTYPE_F32;
        c.pl = (pikv_placement)tu_int(&r, 0, 2);
        c.nd = (int)tu_int(&r, 1, 8);
        c.nseq = (int)tu_int(&r, 1, 5);
        c.q_amp = tu_int(&r, 0, 1) ? 1.0f : (c.dt == PIKV_DTYPE_F16 ? 3.0f : 8.0f);
        c.rebalance = (int)tu_int(&r, 0, 1);
        c.skew = (int)tu_int(&r, 0, 1);
        if (tu_int(&r, 0, 4) == 0)
            c.attn_scale = 0.3f;
        if (c.pl == PIKV_PLACEMENT_HASH || c.ne == 1) {
            if (tu_int(&r, 0, 1))
                c.n_shards = (int)tu_int(&r, 1, 9);
            if (c.pl == PIKV_PLACEMENT_HASH && tu_int(&r, 0, 1))
                c.hash_tokens = (int)tu_int(&r, 1, 7);
        }
        fill_lens(&c, &r, budget);
        run_case(&c, 600000 + (uint64_t)i, 700000 + (uint64_t)i, NULL);
        n_cases++;
    }

    /* 3. Long sequences: many pages, long accumulations. */
    for (int dt = 0; dt < 2; dt++) {
        acase c;
        memset(&c, 0, sizeof c);
        c.ps = 16;
        c.nkv = 2;
        c.nqh = 8;
        c.hd = 64;
        c.ne = 8;
        c.ept = 2;
        c.nl = 1;
        c.dt = dt ? PIKV_DTYPE_F16 : PIKV_DTYPE_F32;
        c.pl = PIKV_PLACEMENT_EXPERT;
        c.nd = 3;
        c.nseq = 2;
        c.len[0][0] = 4000;
        c.len[1][0] = 2500 + 7;
        c.q_amp = 2.0f;
        run_case(&c, 800000 + (uint64_t)dt, 800100 + (uint64_t)dt, NULL);
        n_cases++;
    }

    /* 4. Independence of placement and device count: same data (and queries), every
          placement on 1, 2, 3, 5 and 8 devices, different chunkings. */
    for (int g = 0; g < 6; g++) {
        tu_rng r = tu_rng_seed(900000 + (uint64_t)g);
        acase c;
        memset(&c, 0, sizeof c);
        static const int ps_g[] = {1, 7, 16, 13, 64, 4};
        c.ps = ps_g[g];
        c.nkv = (int)tu_int(&r, 1, 3);
        c.nqh = c.nkv * ratios[tu_int(&r, 0, 3)];
        c.hd = head_dims[tu_int(&r, 0, 7)];
        c.ne = g == 1 ? 1 : k_experts[1 + g % (N_EXPERT_CFG - 1)][0];
        c.ept = g == 1 ? 1 : k_experts[1 + g % (N_EXPERT_CFG - 1)][1];
        c.nl = 2;
        c.dt = g % 2 ? PIKV_DTYPE_F16 : PIKV_DTYPE_F32;
        c.nseq = 3;
        c.q_amp = 2.0f;
        c.skew = 1;
        fill_lens(&c, &r, budget);
        c.len[0][0] = c.len[0][1] = 5 * c.ps + 3; /* at least one multi-page sequence */
        run_out first;
        memset(&first, 0, sizeof first);
        int have_first = 0;
        static const int nds[] = {1, 2, 3, 5, 8};
        for (int in = 0; in < 5; in++)
            for (int pl = 0; pl < 3; pl++) {
                c.nd = nds[in];
                c.pl = (pikv_placement)pl;
                c.rebalance = pl == PIKV_PLACEMENT_BALANCED;
                run_out o;
                memset(&o, 0, sizeof o);
                run_case(&c, 910000 + (uint64_t)g, 920000 + (uint64_t)(g * 100 + in * 3 + pl),
                         &o);
                n_cases++;
                if (!have_first) {
                    first = o;
                    have_first = 1;
                    continue;
                }
                size_t per = (size_t)c.nqh * c.hd;
                for (int l = 0; l < c.nl; l++) {
                    if (!o.out[l] || !first.out[l])
                        continue;
                    CHECK_EQ(o.nq, first.nq);
                    double e = tu_norm_err_ff(o.out[l], first.out[l], (size_t)o.nq * per);
                    CHECKF(e <= TU_TOL_EXACT,
                           "layer %d: output on %d devices/%s differs from 1 device/expert by "
                           "%.3g", l, c.nd, pl_name(c.pl), e);
                    double le = 0;
                    for (size_t i = 0; i < (size_t)o.nq * c.nqh; i++) {
                        float a = o.lse[l][i], b = first.lse[l][i];
                        double d = (isinf(a) && isinf(b) && a == b)
                                       ? 0.0
                                       : fabs((double)a - (double)b) / fmax(1.0, fabs((double)b));
                        if (!(d <= le))
                            le = d;
                    }
                    CHECKF(le <= TU_TOL_LSE, "layer %d: lse on %d devices/%s differs by %.3g",
                           l, c.nd, pl_name(c.pl), le);
                }
                run_out_free(&o);
            }
        run_out_free(&first);
    }

    tu_set_case("");
    for (int i = 0; i <= MAX_NDEV; i++)
        pikv_context_free(g_ctx[i]);
    printf("exact_attend: %d cases\n", n_cases);
    return tu_finish();
}
