/*
 * test-util.h — the tiny shared harness of PiKV's tests.
 *
 *  - CHECK / CHECKF / CHECK_EQ / CHECK_LE / CHECK_STATUS / CHECK_OK: print file:line and the
 *    failing values, count passes and failures; tu_finish() prints "N passed, N failed".
 *  - tu_rng: a seeded splitmix64 generator for test data.
 *  - tu_ref_attend: dense decode attention in double precision (the oracle).
 *  - tu_norm_err: max|out-ref| / max|ref|.
 *  - tu_f16_round: f32 -> f16 (round to nearest even) -> f32, implemented here so tests can
 *    compute the reference on exactly what f16 storage holds.
 *  - tu_model: a shadow of what a cache holds (per layer and sequence: K, V, experts), used to
 *    compute references after appends, removals and prefix copies.
 *  - tu_snap: a snapshot of everything observable about a cache (stats, per-device stats and
 *    memory, shard info, sequence lengths, attend output) to check "the cache is unchanged".
 *
 * Include this header first in every test (it sets _POSIX_C_SOURCE for posix_memalign).
 */
#ifndef PIKV_TEST_UTIL_H
#define PIKV_TEST_UTIL_H

#if !defined(_POSIX_C_SOURCE) || _POSIX_C_SOURCE < 200809L
#undef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif

#include <pikv/pikv.h>

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------ */
/* Checks                                                                    */
/* ------------------------------------------------------------------------ */

static long tu_pass_count = 0;
static long tu_fail_count = 0;
/* When set, failed status checks also print this context's last error. */
static const pikv_context *tu_err_ctx = NULL;
/* A description of the case being run, printed once before its first failure. */
static char tu_case_desc[512];
static int tu_case_printed = 0;

#define TU_MAX_PRINTED_FAILURES 300

static inline void tu_set_case(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tu_case_desc, sizeof tu_case_desc, fmt, ap);
    va_end(ap);
    tu_case_printed = 0;
}

static inline int tu_fail_begin(const char *file, int line)
{
    tu_fail_count++;
    if (tu_fail_count > TU_MAX_PRINTED_FAILURES) {
        if (tu_fail_count == TU_MAX_PRINTED_FAILURES + 1)
            fprintf(stderr, "(further failures are counted but not printed)\n");
        return 0;
    }
    if (!tu_case_printed && tu_case_desc[0]) {
        fprintf(stderr, "-- in case: %s\n", tu_case_desc);
        tu_case_printed = 1;
    }
    fprintf(stderr, "%s:%d: CHECK failed: ", file, line);
    return 1;
}

static inline int tu_check(int ok, const char *file, int line, const char *expr)
{
    if (ok) {
        tu_pass_count++;
        return 1;
    }
    if (tu_fail_begin(file, line))
        fprintf(stderr, "%s\n", expr);
    return 0;
}

static inline int tu_checkf(int ok, const char *file, int line, const char *expr,
                            const char *fmt, ...)
{
    if (ok) {
        tu_pass_count++;
        return 1;
    }
    if (tu_fail_begin(file, line)) {
        va_list ap;
        fprintf(stderr, "%s [", expr);
        va_start(ap, fmt);
        vfprintf(stderr, fmt, ap);
        va_end(ap);
        fprintf(stderr, "]\n");
    }
    return 0;
}

static inline int tu_check_eq(long long a, long long b, const char *ea, const char *eb,
                              const char *file, int line)
{
    if (a == b) {
        tu_pass_count++;
        return 1;
    }
    if (tu_fail_begin(file, line))
        fprintf(stderr, "%s == %s: %lld != %lld\n", ea, eb, a, b);
    return 0;
}

static inline int tu_check_le(double a, double b, const char *ea, const char *eb,
                              const char *file, int line)
{
    if (a <= b) { /* false for NaN */
        tu_pass_count++;
        return 1;
    }
    if (tu_fail_begin(file, line))
        fprintf(stderr, "%s <= %s: %.6g > %.6g\n", ea, eb, a, b);
    return 0;
}

static inline int tu_check_status(pikv_status got, pikv_status want, const char *expr,
                                  const char *file, int line)
{
    if (got == want) {
        tu_pass_count++;
        return 1;
    }
    if (tu_fail_begin(file, line)) {
        fprintf(stderr, "%s: got %s (%d), want %s (%d)\n", expr, pikv_status_name(got),
                (int)got, pikv_status_name(want), (int)want);
        if (tu_err_ctx)
            fprintf(stderr, "    last error: \"%s\"\n", pikv_context_last_error(tu_err_ctx));
    }
    return 0;
}

#define CHECK(c) tu_check(!!(c), __FILE__, __LINE__, #c)
#define CHECKF(c, ...) tu_checkf(!!(c), __FILE__, __LINE__, #c, __VA_ARGS__)
#define CHECK_EQ(a, b) tu_check_eq((long long)(a), (long long)(b), #a, #b, __FILE__, __LINE__)
#define CHECK_LE(a, b) tu_check_le((double)(a), (double)(b), #a, #b, __FILE__, __LINE__)
#define CHECK_STATUS(want, expr) tu_check_status((expr), (want), #expr, __FILE__, __LINE__)
#define CHECK_OK(expr) CHECK_STATUS(PIKV_OK, expr)

/* Prints the final line and gives main's return value. */
static inline int tu_finish(void)
{
    printf("%ld passed, %ld failed\n", tu_pass_count, tu_fail_count);
    fflush(stdout);
    return tu_fail_count ? 1 : 0;
}

/* Aborts the test program (test infrastructure failure, not a library failure). */
static inline void *tu_xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p) {
        fprintf(stderr, "test: out of host memory (%zu bytes)\n", n);
        exit(2);
    }
    return p;
}

static inline void *tu_xcalloc(size_t n, size_t size)
{
    void *p = calloc(n ? n : 1, size ? size : 1);
    if (!p) {
        fprintf(stderr, "test: out of host memory\n");
        exit(2);
    }
    return p;
}

static inline void *tu_xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q) {
        fprintf(stderr, "test: out of host memory (%zu bytes)\n", n);
        exit(2);
    }
    return q;
}

/* A whole file into memory: *n bytes, followed by a NUL (not counted) so text can be parsed
   in place. NULL (nothing allocated) when it cannot be opened or read. */
static inline uint8_t *tu_read_file(const char *path, size_t *n)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    size_t cap = 1 << 16, len = 0, got;
    uint8_t *buf = (uint8_t *)tu_xmalloc(cap + 1);
    while ((got = fread(buf + len, 1, cap - len, f)) > 0) {
        len += got;
        if (len == cap) {
            cap *= 2;
            buf = (uint8_t *)tu_xrealloc(buf, cap + 1);
        }
    }
    int bad = ferror(f);
    fclose(f);
    if (bad) {
        free(buf);
        return NULL;
    }
    buf[len] = 0;
    *n = len;
    return buf;
}

/* ------------------------------------------------------------------------ */
/* PRNG: splitmix64                                                          */
/* ------------------------------------------------------------------------ */

typedef struct tu_rng {
    uint64_t s;
} tu_rng;

static inline tu_rng tu_rng_seed(uint64_t seed)
{
    tu_rng r;
    r.s = seed;
    return r;
}

static inline uint64_t tu_next(tu_rng *r)
{
    uint64_t z = (r->s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in [0, 1). */
static inline double tu_unif(tu_rng *r)
{
    return (double)(tu_next(r) >> 11) * 0x1.0p-53;
}

/* Uniform integer in [lo, hi] (inclusive). */
static inline int64_t tu_int(tu_rng *r, int64_t lo, int64_t hi)
{
    if (hi <= lo)
        return lo;
    return lo + (int64_t)(tu_next(r) % (uint64_t)(hi - lo + 1));
}

/* Uniform in [-amp, amp). */
static inline float tu_sym(tu_rng *r, float amp)
{
    return (float)((2.0 * tu_unif(r) - 1.0) * (double)amp);
}

static inline void tu_fill(tu_rng *r, float *x, size_t n, float amp)
{
    for (size_t i = 0; i < n; i++)
        x[i] = tu_sym(r, amp);
}

/* Writes k distinct expert ids in [0, n_experts) (k <= 64); top-1 first. With skew, the
   top-1 expert is biased towards low ids, so shards get uneven sizes. */
static inline void tu_pick_experts(tu_rng *r, int n_experts, int k, int skew, int32_t *out)
{
    int32_t ids[1024];
    int n = n_experts < 1024 ? n_experts : 1024;
    for (int i = 0; i < n; i++)
        ids[i] = i;
    for (int i = 0; i < k && i < n; i++) {
        int j;
        if (i == 0 && skew) {
            double u = tu_unif(r);
            j = (int)(u * u * u * n);
            if (j >= n)
                j = n - 1;
        } else {
            j = (int)tu_int(r, i, n - 1);
        }
        int32_t t = ids[i];
        ids[i] = ids[j];
        ids[j] = t;
        out[i] = ids[i];
    }
}

/* ------------------------------------------------------------------------ */
/* f16 rounding (round to nearest even), independent of the library          */
/* ------------------------------------------------------------------------ */

static inline float tu_f16_to_f32(uint16_t h)
{
    uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    double v;
    if (e == 0)
        v = ldexp((double)m, -24);
    else if (e == 31)
        v = m ? (double)NAN : (double)INFINITY;
    else
        v = ldexp((double)(m | 0x400u), (int)e - 25);
    return (float)((h & 0x8000u) ? -v : v);
}

static inline uint16_t tu_f32_to_f16_bits(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    uint32_t h;
    if (a > 0x7f800000u) {
        h = 0x7e00u; /* NaN */
    } else if (a >= 0x477ff000u) {
        h = 0x7c00u; /* >= 65520 (or inf) rounds to inf */
    } else if (a >= 0x38800000u) { /* normal f16: >= 2^-14 */
        uint32_t e = (a >> 23) - 112u;
        uint32_t m = a & 0x7fffffu;
        uint32_t rem = m & 0x1fffu;
        h = (e << 10) | (m >> 13);
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u)))
            h++; /* a carry into the exponent is the right answer */
    } else { /* subnormal f16 or zero: count units of 2^-24 */
        float af;
        memcpy(&af, &a, sizeof af);
        double s = (double)af * 16777216.0; /* exact */
        double fl = floor(s);
        double rem = s - fl;
        h = (uint32_t)fl;
        if (rem > 0.5 || (rem == 0.5 && (h & 1u)))
            h++;
    }
    return (uint16_t)(sign | h);
}

static inline float tu_f16_round(float x)
{
    return tu_f16_to_f32(tu_f32_to_f16_bits(x));
}

/* ------------------------------------------------------------------------ */
/* Dense attention reference (double)                                        */
/* ------------------------------------------------------------------------ */

/*
 * One decode query over n_tok tokens.
 *   q   [n_q_heads][hd]
 *   k,v [n_tok][n_kv][hd]
 *   out [n_q_heads][hd], lse [n_q_heads] (lse may be NULL)
 * Query head h reads KV head h / (n_q_heads / n_kv). An empty sequence gives 0 and -inf.
 */
static inline void tu_ref_attend(int64_t n_tok, int n_q_heads, int n_kv, int hd, double scale,
                                 const float *q, const float *k, const float *v, double *out,
                                 double *lse)
{
    int group = n_q_heads / n_kv;
    double *s = (double *)tu_xmalloc((size_t)(n_tok > 0 ? n_tok : 1) * sizeof(double));
    for (int h = 0; h < n_q_heads; h++) {
        int kh = h / group;
        double *o = out + (size_t)h * hd;
        for (int d = 0; d < hd; d++)
            o[d] = 0.0;
        if (n_tok <= 0) {
            if (lse)
                lse[h] = -INFINITY;
            continue;
        }
        const float *qh = q + (size_t)h * hd;
        double mx = -INFINITY;
        for (int64_t j = 0; j < n_tok; j++) {
            const float *kj = k + ((size_t)j * n_kv + kh) * hd;
            double acc = 0.0;
            for (int d = 0; d < hd; d++)
                acc += (double)qh[d] * (double)kj[d];
            s[j] = acc * scale;
            if (s[j] > mx)
                mx = s[j];
        }
        double sum = 0.0;
        for (int64_t j = 0; j < n_tok; j++) {
            double w = exp(s[j] - mx);
            sum += w;
            const float *vj = v + ((size_t)j * n_kv + kh) * hd;
            for (int d = 0; d < hd; d++)
                o[d] += w * (double)vj[d];
        }
        for (int d = 0; d < hd; d++)
            o[d] /= sum;
        if (lse)
            lse[h] = mx + log(sum);
    }
    free(s);
}

/* max|out-ref| / max|ref| (max|out| if ref is all zero); +inf if out has a NaN/inf. */
static inline double tu_norm_err(const float *out, const double *ref, size_t n)
{
    double md = 0.0, mr = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(out[i]))
            return INFINITY;
        double d = fabs((double)out[i] - ref[i]);
        if (d > md)
            md = d;
        if (fabs(ref[i]) > mr)
            mr = fabs(ref[i]);
    }
    return mr > 0.0 ? md / mr : md;
}

/* Same between two float outputs (b is the reference). */
static inline double tu_norm_err_ff(const float *a, const float *b, size_t n)
{
    double md = 0.0, mr = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (!isfinite(a[i]) || !isfinite(b[i]))
            return INFINITY;
        double d = fabs((double)a[i] - (double)b[i]);
        if (d > md)
            md = d;
        if (fabs((double)b[i]) > mr)
            mr = fabs((double)b[i]);
    }
    return mr > 0.0 ? md / mr : md;
}

#define TU_TOL_EXACT 2e-5     /* exact mode vs the reference on what is stored */
#define TU_TOL_F16_INPUT 5e-3 /* f16 storage vs the reference on the f32 inputs */
#define TU_TOL_LSE 3e-5       /* |lse - ref| / max(1, |ref|) */

/* ------------------------------------------------------------------------ */
/* Shadow model of a cache's contents                                        */
/* ------------------------------------------------------------------------ */

typedef struct tu_seq {
    int64_t n, cap;
    float *k, *v;   /* inputs, [n][n_kv][hd] */
    float *ks, *vs; /* what the storage holds (f16-rounded for f16 caches) */
    int32_t *ex;    /* [n][ept] */
} tu_seq;

typedef struct tu_model {
    int nl, nqh, nkv, hd, ne, ept, ps, max_seq, f16;
    double scale;
    int *live;
    tu_seq *s; /* [nl * max_seq] */
} tu_model;

static inline void tu_model_init(tu_model *m, const pikv_cache_params *p)
{
    memset(m, 0, sizeof *m);
    m->nl = p->n_layers;
    m->nqh = p->n_q_heads;
    m->nkv = p->n_kv_heads;
    m->hd = p->head_dim;
    m->ne = p->n_experts;
    m->ept = p->experts_per_token;
    m->ps = p->page_size;
    m->max_seq = p->max_sequences;
    m->f16 = p->dtype == PIKV_DTYPE_F16;
    m->scale = p->attn_scale != 0.0f ? (double)p->attn_scale : 1.0 / sqrt((double)p->head_dim);
    m->live = (int *)tu_xcalloc((size_t)m->max_seq, sizeof(int));
    m->s = (tu_seq *)tu_xcalloc((size_t)m->nl * (size_t)m->max_seq, sizeof(tu_seq));
}

static inline tu_seq *tu_model_seq(const tu_model *m, int layer, int seq)
{
    return &m->s[(size_t)layer * (size_t)m->max_seq + (size_t)seq];
}

static inline void tu_model_push(tu_model *m, int layer, int seq, int64_t n, const float *k,
                                 const float *v, const int32_t *ex)
{
    tu_seq *s = tu_model_seq(m, layer, seq);
    size_t row = (size_t)m->nkv * (size_t)m->hd;
    if (s->n + n > s->cap) {
        int64_t cap = s->cap ? s->cap : 16;
        while (cap < s->n + n)
            cap *= 2;
        s->k = (float *)tu_xrealloc(s->k, (size_t)cap * row * sizeof(float));
        s->v = (float *)tu_xrealloc(s->v, (size_t)cap * row * sizeof(float));
        s->ks = (float *)tu_xrealloc(s->ks, (size_t)cap * row * sizeof(float));
        s->vs = (float *)tu_xrealloc(s->vs, (size_t)cap * row * sizeof(float));
        s->ex = (int32_t *)tu_xrealloc(s->ex, (size_t)cap * (size_t)m->ept * sizeof(int32_t));
        s->cap = cap;
    }
    size_t off = (size_t)s->n * row, cnt = (size_t)n * row;
    memcpy(s->k + off, k, cnt * sizeof(float));
    memcpy(s->v + off, v, cnt * sizeof(float));
    for (size_t i = 0; i < cnt; i++) {
        s->ks[off + i] = m->f16 ? tu_f16_round(k[i]) : k[i];
        s->vs[off + i] = m->f16 ? tu_f16_round(v[i]) : v[i];
    }
    if (ex)
        memcpy(s->ex + (size_t)s->n * m->ept, ex, (size_t)n * m->ept * sizeof(int32_t));
    else
        memset(s->ex + (size_t)s->n * m->ept, 0, (size_t)n * m->ept * sizeof(int32_t));
    s->n += n;
    m->live[seq] = 1;
}

static inline void tu_model_remove(tu_model *m, int seq)
{
    for (int l = 0; l < m->nl; l++)
        tu_model_seq(m, l, seq)->n = 0;
    m->live[seq] = 0;
}

static inline void tu_model_copy_prefix(tu_model *m, int src, int dst, int64_t n)
{
    for (int l = 0; l < m->nl; l++) {
        tu_seq *s = tu_model_seq(m, l, src);
        tu_model_seq(m, l, dst)->n = 0;
        if (n > 0)
            tu_model_push(m, l, dst, n, s->k, s->v, s->ex);
    }
    m->live[dst] = 1;
}

static inline void tu_model_free(tu_model *m)
{
    if (m->s) {
        for (size_t i = 0; i < (size_t)m->nl * (size_t)m->max_seq; i++) {
            free(m->s[i].k);
            free(m->s[i].v);
            free(m->s[i].ks);
            free(m->s[i].vs);
            free(m->s[i].ex);
        }
    }
    free(m->s);
    free(m->live);
    memset(m, 0, sizeof *m);
}

/* Generates n random tokens: K, V in [-1, 1), distinct top-k experts. */
static inline void tu_gen(tu_rng *r, const tu_model *m, int64_t n, float *k, float *v,
                          int32_t *ex, int skew)
{
    size_t row = (size_t)m->nkv * (size_t)m->hd;
    tu_fill(r, k, (size_t)n * row, 1.0f);
    tu_fill(r, v, (size_t)n * row, 1.0f);
    for (int64_t t = 0; t < n; t++)
        tu_pick_experts(r, m->ne, m->ept, skew, ex + (size_t)t * m->ept);
}

/* Generates n tokens and appends them to the cache; on success also to the model. */
static inline pikv_status tu_append_random(pikv_cache *c, tu_model *m, tu_rng *r, int layer,
                                           int seq, int64_t n, int skew)
{
    size_t row = (size_t)m->nkv * (size_t)m->hd;
    float *k = (float *)tu_xmalloc((size_t)n * row * sizeof(float));
    float *v = (float *)tu_xmalloc((size_t)n * row * sizeof(float));
    int32_t *ex = (int32_t *)tu_xmalloc((size_t)n * (size_t)m->ept * sizeof(int32_t));
    tu_gen(r, m, n, k, v, ex, skew);
    pikv_status st = pikv_cache_append(c, layer, seq, (int32_t)n, k, v, NULL, ex);
    if (st == PIKV_OK)
        tu_model_push(m, layer, seq, n, k, v, ex);
    free(k);
    free(v);
    free(ex);
    return st;
}

/* Reference over the first n_tok tokens of (layer, seq); stored = on what storage holds. */
static inline void tu_model_ref(const tu_model *m, int layer, int seq, int64_t n_tok,
                                const float *q, int stored, double *out, double *lse)
{
    const tu_seq *s = tu_model_seq(m, layer, seq);
    if (n_tok < 0 || n_tok > s->n)
        n_tok = s->n;
    tu_ref_attend(n_tok, m->nqh, m->nkv, m->hd, m->scale, q, stored ? s->ks : s->k,
                  stored ? s->vs : s->v, out, lse);
}

typedef struct tu_aerr {
    double stored;  /* max normalized error vs the reference on stored K/V */
    double input;   /* ... vs the reference on the f32 inputs */
    double lse;     /* max |lse - ref| / max(1, |ref|) */
    long bad_empty; /* empty sequences whose output is not 0 or lse not -inf */
} tu_aerr;

/*
 * Attends a batch and compares every query with the model's reference over all the tokens
 * the model holds for its sequence. q [nq][nqh][hd] is given; out/lse are written (lse may
 * be NULL: then lse is not requested). Returns the attend status (errors are not computed
 * when it fails).
 */
static inline pikv_status tu_attend_compare(pikv_cache *c, const tu_model *m, int layer, int nq,
                                            const int32_t *seqs, const float *q,
                                            const int32_t *qex, float *out, float *lse,
                                            tu_aerr *e)
{
    size_t per = (size_t)m->nqh * (size_t)m->hd;
    pikv_attend_batch b;
    memset(&b, 0, sizeof b); /* fields added later default to 0 / NULL */
    memset(e, 0, sizeof *e);
    for (size_t i = 0; i < (size_t)nq * per; i++)
        out[i] = NAN;
    if (lse)
        for (size_t i = 0; i < (size_t)nq * m->nqh; i++)
            lse[i] = NAN;
    b.n_queries = nq;
    b.seq_ids = seqs;
    b.q = q;
    b.experts = qex;
    b.out = out;
    b.lse = lse;
    pikv_status st = pikv_cache_attend(c, layer, &b);
    if (st != PIKV_OK)
        return st;
    double *ro = (double *)tu_xmalloc(per * sizeof(double));
    double *rl = (double *)tu_xmalloc((size_t)m->nqh * sizeof(double));
    for (int i = 0; i < nq; i++) {
        const float *qi = q + (size_t)i * per;
        float *oi = out + (size_t)i * per;
        const tu_seq *s = tu_model_seq(m, layer, seqs[i]);
        if (s->n == 0) {
            for (size_t j = 0; j < per; j++)
                if (oi[j] != 0.0f) {
                    e->bad_empty++;
                    break;
                }
            if (lse)
                for (int h = 0; h < m->nqh; h++) {
                    float l = lse[(size_t)i * m->nqh + h];
                    if (!(isinf(l) && l < 0)) {
                        e->bad_empty++;
                        break;
                    }
                }
            continue;
        }
        tu_model_ref(m, layer, seqs[i], -1, qi, 1, ro, rl);
        double err = tu_norm_err(oi, ro, per);
        if (!(err <= e->stored))
            e->stored = err;
        if (lse)
            for (int h = 0; h < m->nqh; h++) {
                double l = (double)lse[(size_t)i * m->nqh + h];
                double d = isfinite(l) ? fabs(l - rl[h]) / fmax(1.0, fabs(rl[h])) : INFINITY;
                if (!(d <= e->lse))
                    e->lse = d;
            }
        if (m->f16) {
            tu_model_ref(m, layer, seqs[i], -1, qi, 0, ro, NULL);
            err = tu_norm_err(oi, ro, per);
        }
        if (!(err <= e->input))
            e->input = err;
    }
    free(ro);
    free(rl);
    return st;
}

/* CHECKs an attend comparison against the exact-mode bounds. */
#define TU_CHECK_AERR(e, with_lse)                                                       \
    do {                                                                                 \
        CHECK_LE((e).stored, TU_TOL_EXACT);                                              \
        CHECK_LE((e).input, TU_TOL_F16_INPUT);                                           \
        if (with_lse)                                                                    \
            CHECK_LE((e).lse, TU_TOL_LSE);                                               \
        CHECK_EQ((e).bad_empty, 0);                                                      \
    } while (0)

/* Convenience: random queries over the given sequences of one layer, checked. */
static inline void tu_check_attend_at(const char *file, int line, pikv_cache *c,
                                      const tu_model *m, int layer, int nq,
                                      const int32_t *seqs, tu_rng *r, float q_amp)
{
    size_t per = (size_t)m->nqh * (size_t)m->hd;
    float *q = (float *)tu_xmalloc((size_t)nq * per * sizeof(float));
    float *out = (float *)tu_xmalloc((size_t)nq * per * sizeof(float));
    float *lse = (float *)tu_xmalloc((size_t)nq * (size_t)m->nqh * sizeof(float));
    tu_aerr e;
    tu_fill(r, q, (size_t)nq * per, q_amp);
    pikv_status st = tu_attend_compare(c, m, layer, nq, seqs, q, NULL, out, lse, &e);
    tu_check_status(st, PIKV_OK, "pikv_cache_attend", file, line);
    if (st == PIKV_OK) {
        tu_check_le(e.stored, TU_TOL_EXACT, "attend err (stored)", "TU_TOL_EXACT", file, line);
        tu_check_le(e.input, TU_TOL_F16_INPUT, "attend err (inputs)", "TU_TOL_F16_INPUT",
                    file, line);
        tu_check_le(e.lse, TU_TOL_LSE, "attend lse err", "TU_TOL_LSE", file, line);
        tu_check_eq(e.bad_empty, 0, "attend bad empty outputs", "0", file, line);
    }
    free(q);
    free(out);
    free(lse);
}
#define TU_CHECK_ATTEND(c, m, layer, nq, seqs, r, amp) \
    tu_check_attend_at(__FILE__, __LINE__, (c), (m), (layer), (nq), (seqs), (r), (amp))

/* Checks every live sequence of the model in every layer (one batch per layer). */
static inline void tu_check_all_at(const char *file, int line, pikv_cache *c, const tu_model *m,
                                   tu_rng *r)
{
    int32_t *seqs = (int32_t *)tu_xmalloc((size_t)m->max_seq * sizeof(int32_t));
    int n = 0;
    for (int s = 0; s < m->max_seq; s++)
        if (m->live[s])
            seqs[n++] = s;
    if (n > 0)
        for (int l = 0; l < m->nl; l++)
            tu_check_attend_at(file, line, c, m, l, n, seqs, r, 1.5f);
    free(seqs);
}
#define TU_CHECK_ALL(c, m, r) tu_check_all_at(__FILE__, __LINE__, (c), (m), (r))

/* ------------------------------------------------------------------------ */
/* Snapshots: "the cache is unchanged"                                       */
/* ------------------------------------------------------------------------ */

#define TU_MAXDEV 64

typedef struct tu_snap {
    pikv_cache_stats pre, post; /* stats before / after the snapshot's own attend */
    int32_t n_dev;
    pikv_cache_device_stats dpre[TU_MAXDEV], dpost[TU_MAXDEV];
    int32_t n_ctx_dev;
    uint64_t mem_used[TU_MAXDEV]; /* per context device */
    int nl, max_seq, n_shards;
    int64_t *len;           /* [nl * max_seq], -1 = not found */
    int32_t *shard_dev;     /* [nl * n_shards] */
    int64_t *shard_pages, *shard_tokens;
    size_t n_out;
    float *out, *lse;       /* attend of every existing sequence, every layer */
    pikv_status attend_status;
    int ok;                 /* every query succeeded */
} tu_snap;

static inline void tu_snap_free(tu_snap *s)
{
    free(s->len);
    free(s->shard_dev);
    free(s->shard_pages);
    free(s->shard_tokens);
    free(s->out);
    free(s->lse);
    memset(s, 0, sizeof *s);
}

/* Takes a snapshot: lengths, memory, shards and stats, then attends (fixed queries over every
   existing sequence in every layer), then stats again. */
static inline void tu_snap_take(pikv_cache *c, const pikv_cache_params *p, tu_snap *s)
{
    memset(s, 0, sizeof *s);
    s->ok = 1;
    pikv_context *ctx = pikv_cache_context(c);
    s->nl = p->n_layers;
    s->max_seq = p->max_sequences;
    s->len = (int64_t *)tu_xcalloc((size_t)s->nl * (size_t)s->max_seq, sizeof(int64_t));
    for (int l = 0; l < s->nl; l++)
        for (int q = 0; q < s->max_seq; q++) {
            int64_t n = -1;
            pikv_status st = pikv_seq_length(c, q, l, &n);
            s->len[(size_t)l * s->max_seq + q] = st == PIKV_OK ? n : -1;
        }
    s->n_ctx_dev = pikv_device_count(ctx);
    for (int d = 0; d < s->n_ctx_dev && d < TU_MAXDEV; d++) {
        pikv_device_info info;
        memset(&info, 0, sizeof info);
        if (pikv_device_get_info(ctx, d, &info) != PIKV_OK)
            s->ok = 0;
        s->mem_used[d] = info.memory_used;
    }
    if (pikv_cache_get_stats(c, &s->pre) != PIKV_OK)
        s->ok = 0;
    s->n_dev = s->pre.n_devices;
    for (int i = 0; i < s->n_dev && i < TU_MAXDEV; i++)
        if (pikv_cache_get_device_stats(c, i, &s->dpre[i]) != PIKV_OK)
            s->ok = 0;
    s->n_shards = s->pre.n_shards;
    size_t ns = (size_t)s->nl * (size_t)(s->n_shards > 0 ? s->n_shards : 1);
    s->shard_dev = (int32_t *)tu_xcalloc(ns, sizeof(int32_t));
    s->shard_pages = (int64_t *)tu_xcalloc(ns, sizeof(int64_t));
    s->shard_tokens = (int64_t *)tu_xcalloc(ns, sizeof(int64_t));
    for (int l = 0; l < s->nl; l++)
        for (int sh = 0; sh < s->n_shards; sh++) {
            size_t i = (size_t)l * s->n_shards + sh;
            if (pikv_cache_shard_info(c, l, sh, &s->shard_dev[i], &s->shard_pages[i],
                                      &s->shard_tokens[i]) != PIKV_OK)
                s->ok = 0;
        }
    /* attend */
    int32_t *seqs = (int32_t *)tu_xmalloc((size_t)s->max_seq * sizeof(int32_t));
    int nq = 0;
    for (int q = 0; q < s->max_seq; q++)
        if (s->len[q] >= 0)
            seqs[nq++] = q;
    size_t per = (size_t)p->n_q_heads * (size_t)p->head_dim;
    s->n_out = (size_t)nq * per * (size_t)s->nl;
    s->out = (float *)tu_xcalloc(s->n_out ? s->n_out : 1, sizeof(float));
    s->lse = (float *)tu_xcalloc((size_t)nq * p->n_q_heads * s->nl + 1, sizeof(float));
    float *q = (float *)tu_xmalloc((size_t)(nq ? nq : 1) * per * sizeof(float));
    tu_rng r = tu_rng_seed(0x5eed5eedull);
    tu_fill(&r, q, (size_t)nq * per, 2.0f);
    s->attend_status = PIKV_OK;
    if (nq > 0)
        for (int l = 0; l < s->nl; l++) {
            pikv_attend_batch b;
            memset(&b, 0, sizeof b); /* fields added later default to 0 / NULL */
            b.n_queries = nq;
            b.seq_ids = seqs;
            b.q = q;
            b.experts = NULL;
            b.out = s->out + (size_t)l * nq * per;
            b.lse = s->lse + (size_t)l * nq * p->n_q_heads;
            pikv_status st = pikv_cache_attend(c, l, &b);
            if (st != PIKV_OK) {
                s->attend_status = st;
                s->ok = 0;
            }
        }
    free(q);
    free(seqs);
    if (pikv_cache_get_stats(c, &s->post) != PIKV_OK)
        s->ok = 0;
    for (int i = 0; i < s->n_dev && i < TU_MAXDEV; i++)
        if (pikv_cache_get_device_stats(c, i, &s->dpost[i]) != PIKV_OK)
            s->ok = 0;
}

static inline int tu_stats_equal(const pikv_cache_stats *a, const pikv_cache_stats *b)
{
    return a->tokens == b->tokens && a->pages == b->pages &&
           a->bytes_allocated == b->bytes_allocated && a->bytes_used == b->bytes_used &&
           a->sequences == b->sequences && a->n_devices == b->n_devices &&
           a->n_shards == b->n_shards && a->last_pages_read == b->last_pages_read &&
           a->last_bytes_read == b->last_bytes_read &&
           a->last_tokens_read == b->last_tokens_read && a->appends == b->appends &&
           a->attends == b->attends;
}

static inline int tu_dstats_equal(const pikv_cache_device_stats *a,
                                  const pikv_cache_device_stats *b)
{
    return a->device == b->device && a->shards == b->shards && a->tokens == b->tokens &&
           a->pages == b->pages && a->bytes_allocated == b->bytes_allocated &&
           a->bytes_used == b->bytes_used && a->last_bytes_read == b->last_bytes_read;
}

static inline void tu_print_stats(const char *tag, const pikv_cache_stats *s)
{
    fprintf(stderr,
            "    %s: tokens=%lld pages=%lld bytes_allocated=%llu bytes_used=%llu sequences=%d "
            "last_pages_read=%lld last_bytes_read=%llu last_tokens_read=%lld appends=%lld "
            "attends=%lld\n",
            tag, (long long)s->tokens, (long long)s->pages,
            (unsigned long long)s->bytes_allocated, (unsigned long long)s->bytes_used,
            s->sequences, (long long)s->last_pages_read,
            (unsigned long long)s->last_bytes_read, (long long)s->last_tokens_read,
            (long long)s->appends, (long long)s->attends);
}

/*
 * Checks that `cur` (taken after some failed call) shows the cache exactly as `base` (taken
 * before it): stats before cur's attend equal stats after base's attend, lengths, memory,
 * shard info identical, and cur's attend output bitwise identical to base's.
 */
static inline int tu_snap_same_at(const char *file, int line, const char *what,
                                  const tu_snap *base, const tu_snap *cur)
{
    int ok = 1;
    ok &= tu_checkf(cur->ok, file, line, "snapshot taken", "%s: attend status %s", what,
                    pikv_status_name(cur->attend_status));
    if (!tu_checkf(tu_stats_equal(&base->post, &cur->pre), file, line, "stats unchanged", "%s",
                   what)) {
        ok = 0;
        if (tu_fail_count <= TU_MAX_PRINTED_FAILURES) {
            tu_print_stats("before", &base->post);
            tu_print_stats("after ", &cur->pre);
        }
    }
    int dsame = base->n_dev == cur->n_dev;
    for (int i = 0; dsame && i < cur->n_dev && i < TU_MAXDEV; i++)
        dsame = tu_dstats_equal(&base->dpost[i], &cur->dpre[i]);
    ok &= tu_checkf(dsame, file, line, "device stats unchanged", "%s", what);
    int msame = base->n_ctx_dev == cur->n_ctx_dev;
    for (int d = 0; msame && d < cur->n_ctx_dev && d < TU_MAXDEV; d++)
        if (base->mem_used[d] != cur->mem_used[d]) {
            msame = 0;
            ok &= tu_checkf(0, file, line, "device memory_used unchanged",
                            "%s: device %d: %llu -> %llu", what, d,
                            (unsigned long long)base->mem_used[d],
                            (unsigned long long)cur->mem_used[d]);
        }
    int lsame = base->nl == cur->nl && base->max_seq == cur->max_seq;
    for (size_t i = 0; lsame && i < (size_t)cur->nl * cur->max_seq; i++)
        if (base->len[i] != cur->len[i]) {
            lsame = 0;
            ok &= tu_checkf(0, file, line, "sequence lengths unchanged",
                            "%s: layer %d seq %d: %lld -> %lld", what, (int)(i / cur->max_seq),
                            (int)(i % cur->max_seq), (long long)base->len[i],
                            (long long)cur->len[i]);
        }
    int ssame = base->n_shards == cur->n_shards;
    for (size_t i = 0; ssame && i < (size_t)cur->nl * cur->n_shards; i++)
        ssame = base->shard_dev[i] == cur->shard_dev[i] &&
                base->shard_pages[i] == cur->shard_pages[i] &&
                base->shard_tokens[i] == cur->shard_tokens[i];
    ok &= tu_checkf(ssame, file, line, "shard info unchanged", "%s", what);
    int osame = base->n_out == cur->n_out &&
                memcmp(base->out, cur->out, cur->n_out * sizeof(float)) == 0;
    ok &= tu_checkf(osame, file, line, "attend output bitwise unchanged", "%s", what);
    return ok;
}
#define TU_SNAP_SAME(what, base, cur) tu_snap_same_at(__FILE__, __LINE__, (what), (base), (cur))

/* Context / cache helpers */

static inline pikv_context *tu_context(int cpu_devices)
{
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "cpu";
    cp.cpu_devices = cpu_devices;
    pikv_context *ctx = NULL;
    pikv_status st = pikv_context_create(&cp, &ctx);
    if (st != PIKV_OK || !ctx) {
        fprintf(stderr, "test: pikv_context_create(cpu_devices=%d) failed: %s\n", cpu_devices,
                pikv_status_name(st));
        return NULL;
    }
    return ctx;
}

static inline uint64_t tu_mem_used(const pikv_context *ctx, int device)
{
    pikv_device_info info;
    memset(&info, 0, sizeof info);
    if (pikv_device_get_info(ctx, device, &info) != PIKV_OK)
        return UINT64_MAX;
    return info.memory_used;
}

#endif /* PIKV_TEST_UTIL_H */
