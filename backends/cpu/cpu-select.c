/* CPU ops of query-aware selection: Quest page scores (an upper bound of q.k
   over a page from its per-channel key min/max) and the budgeted top-k. */
#include "cpu-attention.h"

#include <math.h>
#include <stdlib.h>

/* Tasks of SCORE_PAGES candidate pages of one query's list (lists are split at
   query boundaries): each reads its pages' bounds, all KV heads. */
enum { SCORE_PAGES = 32 };

typedef struct score_job {
    const pikv_score_args *a;
    const int32_t *task_query;  /* task -> query */
    const int32_t *task_begin;  /* task -> first candidate */
    const int32_t *order;       /* candidates of each query sorted by slot (address order), or NULL */
    bool avx512;
} score_job;

static void score_page_generic(const pikv_score_args *a, const float *q, int64_t cand)
{
    const pikv_page_layout *L = pikv_cpu_slot_layout(a->pool, a->slots[cand]);
    const int32_t kvh = L->n_kv_heads, hd = L->head_dim, G = a->n_q_heads / kvh;
    const unsigned char *page = pikv_cpu_page_ptr(a->pool, a->slots[cand]);
    const float *kmin = (const float *)(page + L->kmin_offset);
    const float *kmax = (const float *)(page + L->kmax_offset);
    for (int32_t g = 0; g < kvh; g++) {
        const float *lo = kmin + (size_t)g * (size_t)hd, *hi = kmax + (size_t)g * (size_t)hd;
        float best = -INFINITY;
        for (int32_t h = 0; h < G; h++) {
            const float *qh = q + ((size_t)g * (size_t)G + (size_t)h) * (size_t)hd;
            float bound = 0.0f;
            for (int32_t d = 0; d < hd; d++) {
                const float x = qh[d] * lo[d], y = qh[d] * hi[d];
                bound += x > y ? x : y;
            }
            best = bound > best ? bound : best;
        }
        a->scores[(size_t)cand * (size_t)kvh + (size_t)g] = best;
    }
}

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <immintrin.h>
#define PIKV_SCORE_AVX512 1
/* The same bound, 16 channels at a time (sums in another order: equal within
   float rounding), with the next page's bounds prefetched: the op streams
   2 x n_kv_heads x head_dim floats per page and should run at read bandwidth. */
__attribute__((target("avx512f,avx512dq"))) static void prefetch_bounds(const pikv_score_args *a, int64_t cand)
{
    const pikv_page_layout *NL = pikv_cpu_slot_layout(a->pool, a->slots[cand]);
    const unsigned char *np = pikv_cpu_page_ptr(a->pool, a->slots[cand]) + NL->kmin_offset;
    const uint64_t bytes = 2 * (uint64_t)NL->n_kv_heads * (uint64_t)NL->head_dim * sizeof(float);
    for (uint64_t o = 0; o < bytes; o += 64) _mm_prefetch((const char *)(np + o), _MM_HINT_T0);
}

__attribute__((target("avx512f,avx512dq"))) static void score_page_avx512(const pikv_score_args *a, const float *q,
                                                                         int64_t cand, int64_t next)
{
    const pikv_page_layout *L = pikv_cpu_slot_layout(a->pool, a->slots[cand]);
    const int32_t kvh = L->n_kv_heads, hd = L->head_dim, G = a->n_q_heads / kvh;
    if (hd % 16 != 0) {
        score_page_generic(a, q, cand);
        return;
    }
    const unsigned char *page = pikv_cpu_page_ptr(a->pool, a->slots[cand]);
    if (next >= 0) prefetch_bounds(a, next);
    const float *kmin = (const float *)(const void *)(page + L->kmin_offset);
    const float *kmax = (const float *)(const void *)(page + L->kmax_offset);
    for (int32_t g = 0; g < kvh; g++) {
        const float *lo = kmin + (size_t)g * (size_t)hd, *hi = kmax + (size_t)g * (size_t)hd;
        float best = -INFINITY;
        for (int32_t h = 0; h < G; h++) {
            const float *qh = q + ((size_t)g * (size_t)G + (size_t)h) * (size_t)hd;
            __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
            int32_t d = 0;
            for (; d + 32 <= hd; d += 32) {
                const __m512 q0 = _mm512_loadu_ps(qh + d), q1 = _mm512_loadu_ps(qh + d + 16);
                s0 = _mm512_add_ps(s0, _mm512_max_ps(_mm512_mul_ps(q0, _mm512_loadu_ps(lo + d)),
                                                     _mm512_mul_ps(q0, _mm512_loadu_ps(hi + d))));
                s1 = _mm512_add_ps(s1, _mm512_max_ps(_mm512_mul_ps(q1, _mm512_loadu_ps(lo + d + 16)),
                                                     _mm512_mul_ps(q1, _mm512_loadu_ps(hi + d + 16))));
            }
            if (d < hd) {
                const __m512 q0 = _mm512_loadu_ps(qh + d);
                s0 = _mm512_add_ps(s0, _mm512_max_ps(_mm512_mul_ps(q0, _mm512_loadu_ps(lo + d)),
                                                     _mm512_mul_ps(q0, _mm512_loadu_ps(hi + d))));
            }
            const float bound = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
            best = bound > best ? bound : best;
        }
        a->scores[(size_t)cand * (size_t)kvh + (size_t)g] = best;
    }
}
#endif

static void score_task(void *arg, int64_t task, int32_t thread)
{
    (void)thread;
    const score_job *job = arg;
    const pikv_score_args *a = job->a;
    const int32_t i = job->task_query[task];
    const int64_t c0 = job->task_begin[task];
    int64_t c1 = c0 + SCORE_PAGES;
    if (c1 > a->indptr[i + 1]) c1 = a->indptr[i + 1];
    const float *q = a->q + (size_t)i * (size_t)a->n_q_heads * (size_t)a->pool->layout->head_dim;
    const int32_t *ord = job->order;
#define CAND(c) (ord ? (int64_t)ord[c] : (c))
#ifdef PIKV_SCORE_AVX512
    if (job->avx512 && c0 + 1 < c1) prefetch_bounds(a, CAND(c0 + 1));
#endif
    for (int64_t c = c0; c < c1; c++) {
#ifdef PIKV_SCORE_AVX512
        if (job->avx512) { /* two pages ahead */
            score_page_avx512(a, q, CAND(c), c + 2 < c1 ? CAND(c + 2) : -1);
            continue;
        }
#endif
        score_page_generic(a, q, CAND(c));
    }
#undef CAND
}

pikv_status pikv_cpu_score(pikv_device *dev, const pikv_score_args *a)
{
    pikv_context *ctx = dev->ctx;
    const int32_t n_cand = a->n_queries > 0 ? a->indptr[a->n_queries] : 0;
    if (n_cand == 0) return PIKV_OK;
    int64_t n_tasks = 0;
    for (int32_t i = 0; i < a->n_queries; i++)
        n_tasks += (a->indptr[i + 1] - a->indptr[i] + SCORE_PAGES - 1) / SCORE_PAGES;
    int32_t *map = pikv_host_alloc(ctx, 2 * (size_t)(n_tasks ? n_tasks : 1) * sizeof(int32_t), 16);
    PIKV_RETURN_ERROR_IF(!map, ctx, PIKV_ERR_OUT_OF_MEMORY,
                         "score: map of %d candidates: allocation failed", n_cand);
    int64_t t = 0;
    for (int32_t i = 0; i < a->n_queries; i++)
        for (int32_t c = a->indptr[i]; c < a->indptr[i + 1]; c += SCORE_PAGES) {
            map[t] = i;
            map[n_tasks + t++] = c;
        }
    score_job job = {a, map, map + n_tasks, NULL, pikv_cpu_device_backend(dev)->attn_avx512};
    /* Candidates come in page-table order, scattered over the arena; scored in
       slot (address) order instead, the bounds (16 KB a page here) are read as a
       monotone walk. Each score is still written at its candidate's index, so the
       results are the same. */
    int32_t *order = job.avx512 ? pikv_host_alloc(ctx, (size_t)n_cand * sizeof(int32_t), 64) : NULL;
    if (order && pikv_cpu_order_by_slot(ctx, a->slots, a->indptr, a->n_queries, order)) job.order = order;
    pikv_cpu_pool_run(pikv_cpu_device_pool(dev), n_tasks, score_task, &job);
    pikv_host_free(ctx, order);
    pikv_host_free(ctx, map);
    return PIKV_OK;
}

/* ---- budgeted top-k ------------------------------------------------------- */

/* The greedy of the op (entries in order of decreasing score, ties by lower
   index, each kept if its tokens still fit) without sorting the list: a
   quickselect on token weights finds the longest prefix of that order that
   fits (expected O(n)); after it only entries with at most the tokens left can
   still fit (usually none, or the few partly filled pages), and only those are
   sorted and taken greedily. NaN scores rank below -inf so the order stays total. */

typedef struct topk_job {
    const pikv_topk_args *a;
    int32_t *scratch; /* 4 ints per entry */
} topk_job;

static inline bool ranks_before(const float *key, int32_t a, int32_t b)
{
    return key[a] > key[b] || (key[a] == key[b] && a < b);
}

/* merge sort of idx[0..n) by ranks_before */
static void sort_rank(int32_t *idx, int32_t *tmp, int32_t n, const float *key)
{
    for (int32_t width = 1; width < n; width *= 2) {
        for (int32_t lo = 0; lo < n; lo += 2 * width) {
            int32_t mid = lo + width < n ? lo + width : n;
            int32_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            int32_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi) tmp[k++] = ranks_before(key, idx[j], idx[i]) ? idx[j++] : idx[i++];
            while (i < mid) tmp[k++] = idx[i++];
            while (j < hi) tmp[k++] = idx[j++];
        }
        for (int32_t t = 0; t < n; t++) idx[t] = tmp[t];
    }
}

static void topk_task(void *arg, int64_t list, int32_t thread)
{
    (void)thread;
    topk_job *job = arg;
    const pikv_topk_args *a = job->a;
    const int32_t b = a->indptr[list], n = a->indptr[list + 1] - b;
    const int32_t total_n = a->indptr[a->n_lists];
    int32_t *idx = job->scratch + b;
    float *key = (float *)(void *)(job->scratch + total_n) + b; /* int32 and float have the same size */
    int32_t *rem = job->scratch + 2 * (size_t)total_n + b;
    int32_t *tmp = job->scratch + 3 * (size_t)total_n + b;
    const float *sc = a->scores + b;
    const int32_t *tok = a->tokens + b;
    uint8_t *keep = a->keep + b;
    int64_t left = a->budget[list], total = 0;
    for (int32_t i = 0; i < n; i++) {
        key[i] = sc[i] != sc[i] ? -INFINITY : sc[i];
        idx[i] = i;
        keep[i] = 0;
        total += tok[i];
    }
    if (total <= left) { /* everything fits */
        for (int32_t i = 0; i < n; i++) keep[i] = 1;
        return;
    }
    /* A small budget (Quest keeps ~1/16): the prefix that fits lies among the entries
       whose key reaches a threshold taken from a sample of the keys; the quickselect
       then runs on those only (one pass over the list instead of several). The
       entries at or above a key value are a prefix of the rank order, so this is
       exact whenever their tokens exceed the budget; else all entries are used. */
    int32_t m = n;
    const int32_t ns = n / 16 < 256 ? n / 16 : 256; /* sample size: sorting it costs little next to n */
    if (ns >= 32 && left < total / 4) {
        for (int32_t j = 0; j < ns; j++) rem[j] = (int32_t)((int64_t)j * n / ns);
        sort_rank(rem, tmp, ns, key);
        int64_t at = (int64_t)((double)left / (double)total * ns * 1.5) + 4;
        if (at > ns - 1) at = ns - 1;
        const float th = key[rem[at]];
        int32_t nc = 0;
        int64_t tc = 0;
        for (int32_t i = 0; i < n; i++)
            if (key[i] >= th) {
                idx[nc++] = i;
                tc += tok[i];
            }
        if (tc > left) {
            m = nc;
        } else {
            for (int32_t i = 0; i < n; i++) idx[i] = i;
        }
    }
    /* idx[0..lo) fit, in no particular order, and rank before everything in idx[lo..m)
       (and everything not in idx[0..m)) */
    int32_t lo = 0, hi = m;
    while (lo < hi) {
        const int32_t mid = lo + (hi - lo) / 2;
        int32_t x = idx[lo], y = idx[mid], z = idx[hi - 1], pv; /* median of three */
        if (ranks_before(key, x, y)) pv = ranks_before(key, y, z) ? y : ranks_before(key, x, z) ? z : x;
        else pv = ranks_before(key, x, z) ? x : ranks_before(key, y, z) ? z : y;
        int32_t p = lo;
        int64_t tb = 0;
        for (int32_t i = lo; i < hi; i++) /* the entries ranking before the pivot first */
            if (ranks_before(key, idx[i], pv)) {
                const int32_t e = idx[i];
                idx[i] = idx[p];
                idx[p++] = e;
                tb += tok[e];
            }
        for (int32_t i = p; i < hi; i++) /* then the pivot */
            if (idx[i] == pv) {
                idx[i] = idx[p];
                idx[p] = pv;
                break;
            }
        if (tb + tok[pv] <= left) {
            left -= tb + tok[pv];
            lo = p + 1;
        } else if (tb > left) {
            hi = p;
        } else {
            left -= tb;
            lo = p;
            break;
        }
    }
    for (int32_t i = 0; i < lo; i++) keep[idx[i]] = 1;
    /* the rest of the greedy: only entries that fit what is left can be taken */
    int32_t nr = 0;
    for (int32_t i = 0; i < n; i++)
        if (!keep[i] && tok[i] <= left) rem[nr++] = i;
    sort_rank(rem, tmp, nr, key);
    for (int32_t i = 0; i < nr; i++)
        if (tok[rem[i]] <= left) {
            keep[rem[i]] = 1;
            left -= tok[rem[i]];
        }
}

pikv_status pikv_cpu_topk(pikv_device *dev, const pikv_topk_args *a)
{
    pikv_context *ctx = dev->ctx;
    const int32_t n = a->n_lists > 0 ? a->indptr[a->n_lists] : 0;
    if (n == 0) return PIKV_OK;
    topk_job job = {a, pikv_host_alloc(ctx, 4 * (size_t)n * sizeof(int32_t), 64)};
    PIKV_RETURN_ERROR_IF(!job.scratch, ctx, PIKV_ERR_OUT_OF_MEMORY,
                         "topk: scratch for %d entries: allocation failed", n);
    pikv_cpu_pool_run(pikv_cpu_device_pool(dev), a->n_lists, topk_task, &job);
    pikv_host_free(ctx, job.scratch);
    return PIKV_OK;
}
