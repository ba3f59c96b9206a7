/*
 * policies-util.h — helpers shared by the policy tests (policies_*.c), on top of test-util.h.
 *
 *  - pt_page_model: which pages a sequence's tokens form, derived only from the documented
 *    placement rules (dense blocks, EXPERT/BALANCED shard = top-1 expert, HASH s(t,e)),
 *    in the library's candidate order (shard, then oldest page first). Valid while nothing
 *    was evicted and no prefix was copied.
 *  - pt_forced: whether a page holds a sink token or a token of the recent window.
 *  - pt_quest_bound: the Quest bound of a page for a query, in double, over stored keys.
 *  - pt_ref_masked: dense attention in double over a per-KV-head subset of the tokens.
 *  - pt_err_has: the context's last error contains a string.
 *
 * Include test-util.h first.
 */
#ifndef PIKV_POLICIES_UTIL_H
#define PIKV_POLICIES_UTIL_H

#include "test-util.h"

#define PT_MAX_PS 16

typedef struct pt_page {
    int32_t shard;
    int32_t n;                 /* tokens */
    int64_t tok[PT_MAX_PS];    /* token indices (in the sequence), increasing */
    uint64_t mask;             /* bit (top1 mod 64) of each row */
} pt_page;

typedef struct pt_page_model {
    int32_t n_pages;
    pt_page *pages;            /* by shard, then oldest first */
} pt_page_model;

/* The shard of token t with top-1 expert e (pikv.h, "Placement"). */
static inline int32_t pt_shard_of(const pikv_cache_params *p, int32_t n_shards, int64_t t, int32_t e)
{
    if (p->n_experts == 1)
        return (int32_t)((t / p->page_size) % n_shards);
    if (p->placement == PIKV_PLACEMENT_HASH) {
        int64_t ht = p->hash_tokens > 0 ? p->hash_tokens : n_shards;
        return (int32_t)(((t % ht) ^ (int64_t)(e % p->n_experts)) % n_shards);
    }
    return e;
}

/* Pages of a sequence of n tokens whose top-1 experts are top1[t] (NULL = all 0). */
static inline void pt_pages_build(pt_page_model *pm, const pikv_cache_params *p, int32_t n_shards,
                                  int64_t n, const int32_t *top1)
{
    memset(pm, 0, sizeof *pm);
    pm->pages = (pt_page *)tu_xcalloc((size_t)(n + 1), sizeof(pt_page));
    for (int32_t s = 0; s < n_shards; s++) {
        pt_page *cur = NULL;
        for (int64_t t = 0; t < n; t++) {
            int32_t e = top1 ? top1[t] : 0;
            if (pt_shard_of(p, n_shards, t, e) != s)
                continue;
            if (!cur || cur->n == p->page_size) {
                cur = &pm->pages[pm->n_pages++];
                cur->shard = s;
            }
            cur->tok[cur->n++] = t;
            cur->mask |= 1ull << (e % 64);
        }
    }
}

static inline void pt_pages_free(pt_page_model *pm)
{
    free(pm->pages);
    memset(pm, 0, sizeof *pm);
}

static inline int pt_forced(const pt_page *pg, int64_t next_index, int32_t sink, int32_t recent)
{
    return pg->n > 0 && (pg->tok[0] < sink || pg->tok[pg->n - 1] >= next_index - recent);
}

/*
 * The Quest bound of tokens tok[0..n) for KV head g: max over the query heads h of g of
 * sum_d max(q_hd * min_d, q_hd * max_d), min/max over the tokens' stored keys
 * K [tokens][nkv][hd]. *mag gets max_h sum_d |q_hd| * max(|min_d|, |max_d|) (the size of
 * the terms, for tolerances); *dot_max gets max_h max_t q_h . k_t.
 */
static inline double pt_quest_bound(const int64_t *tok, int n, int g, int nqh, int nkv, int hd,
                                    const float *q, const float *K, double *mag, double *dot_max)
{
    const int G = nqh / nkv;
    double best = -INFINITY, bmag = 0.0, bdot = -INFINITY;
    for (int h = g * G; h < (g + 1) * G; h++) {
        const float *qh = q + (size_t)h * hd;
        double sum = 0.0, m = 0.0;
        for (int d = 0; d < hd; d++) {
            double lo = INFINITY, hi = -INFINITY;
            for (int i = 0; i < n; i++) {
                double k = K[((size_t)tok[i] * nkv + g) * hd + d];
                lo = k < lo ? k : lo;
                hi = k > hi ? k : hi;
            }
            double x = (double)qh[d] * lo, y = (double)qh[d] * hi;
            sum += x > y ? x : y;
            m += fabs((double)qh[d]) * fmax(fabs(lo), fabs(hi));
        }
        best = sum > best ? sum : best;
        bmag = m > bmag ? m : bmag;
        for (int i = 0; i < n; i++) {
            const float *k = K + ((size_t)tok[i] * nkv + g) * hd;
            double dot = 0.0;
            for (int d = 0; d < hd; d++)
                dot += (double)qh[d] * (double)k[d];
            bdot = dot > bdot ? dot : bdot;
        }
    }
    if (mag)
        *mag = bmag;
    if (dot_max)
        *dot_max = bdot;
    return best;
}

/*
 * Dense decode attention in double over a subset of the tokens: query head h (KV head
 * g = h / (nqh / nkv)) reads token t when mask[g * n_tok + t] (mask NULL = all). An empty
 * subset gives 0 and -inf.
 */
static inline void pt_ref_masked(int64_t n_tok, int nqh, int nkv, int hd, double scale,
                                 const float *q, const float *K, const float *V,
                                 const uint8_t *mask, double *out, double *lse)
{
    const int G = nqh / nkv;
    double *s = (double *)tu_xmalloc((size_t)(n_tok > 0 ? n_tok : 1) * sizeof(double));
    for (int h = 0; h < nqh; h++) {
        const int g = h / G;
        const float *qh = q + (size_t)h * hd;
        double *o = out + (size_t)h * hd;
        for (int d = 0; d < hd; d++)
            o[d] = 0.0;
        double mx = -INFINITY;
        for (int64_t t = 0; t < n_tok; t++) {
            if (mask && !mask[(size_t)g * n_tok + t])
                continue;
            const float *k = K + ((size_t)t * nkv + g) * hd;
            double acc = 0.0;
            for (int d = 0; d < hd; d++)
                acc += (double)qh[d] * (double)k[d];
            s[t] = acc * scale;
            mx = s[t] > mx ? s[t] : mx;
        }
        if (mx == -INFINITY) {
            if (lse)
                lse[h] = -INFINITY;
            continue;
        }
        double sum = 0.0;
        for (int64_t t = 0; t < n_tok; t++) {
            if (mask && !mask[(size_t)g * n_tok + t])
                continue;
            double w = exp(s[t] - mx);
            sum += w;
            const float *v = V + ((size_t)t * nkv + g) * hd;
            for (int d = 0; d < hd; d++)
                o[d] += w * (double)v[d];
        }
        for (int d = 0; d < hd; d++)
            o[d] /= sum;
        if (lse)
            lse[h] = mx + log(sum);
    }
    free(s);
}

/* max |lse - ref| / max(1, |ref|) over n heads; -inf must match -inf. */
static inline double pt_lse_err(const float *lse, const double *ref, int n)
{
    double e = 0.0;
    for (int h = 0; h < n; h++) {
        if (ref[h] == -INFINITY) {
            if (!(isinf(lse[h]) && lse[h] < 0))
                return INFINITY;
            continue;
        }
        double d = isfinite(lse[h]) ? fabs((double)lse[h] - ref[h]) / fmax(1.0, fabs(ref[h])) : INFINITY;
        e = d > e ? d : e;
    }
    return e;
}

/* Whether the last error of ctx contains s (printed when not). */
static inline int pt_err_has(const pikv_context *ctx, const char *s)
{
    const char *e = pikv_context_last_error(ctx);
    if (strstr(e, s))
        return 1;
    fprintf(stderr, "    last error \"%s\" does not contain \"%s\"\n", e, s);
    return 0;
}
#define CHECK_ERR_HAS(ctx, s) CHECKF(pt_err_has((ctx), (s)), "message should name \"%s\"", (s))

/* A small cache geometry the policy tests start from: exact reads, no budget. */
static inline pikv_cache_params pt_params(void)
{
    pikv_cache_params p = pikv_cache_default_params();
    p.n_layers = 1;
    p.n_q_heads = 4;
    p.n_kv_heads = 2;
    p.head_dim = 16;
    p.n_experts = 1;
    p.experts_per_token = 1;
    p.page_size = 4;
    p.dtype = PIKV_DTYPE_F32;
    p.capacity_tokens = 1 << 20;
    p.max_sequences = 8;
    p.select.sink_tokens = 0;
    p.select.recent_tokens = 0;
    return p;
}

static inline pikv_attend_batch pt_batch(int32_t nq, const int32_t *seqs, const float *q,
                                         const int32_t *experts, float *out, float *lse,
                                         const pikv_select_params *sel)
{
    pikv_attend_batch b;
    memset(&b, 0, sizeof b);
    b.n_queries = nq;
    b.seq_ids = seqs;
    b.q = q;
    b.experts = experts;
    b.out = out;
    b.lse = lse;
    b.select = sel;
    return b;
}

static inline pikv_cache_stats pt_stats(const pikv_cache *c)
{
    pikv_cache_stats s;
    memset(&s, 0, sizeof s);
    if (pikv_cache_get_stats(c, &s) != PIKV_OK)
        s.tokens = -12345;
    return s;
}

static inline int64_t pt_len(const pikv_cache *c, int seq, int layer)
{
    int64_t n = -1;
    if (pikv_seq_length(c, seq, layer, &n) != PIKV_OK)
        return -1;
    return n;
}

#endif /* PIKV_POLICIES_UTIL_H */
