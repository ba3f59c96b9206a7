/* CPU ops of query-aware selection: Quest page scores (an upper bound of q.k
   over a page from its per-channel key min/max) and the budgeted top-k. */
#include "cpu-impl.h"

#include <math.h>

/* One task per candidate page of one query: all KV heads of the page. */
typedef struct score_task_map {
    const pikv_score_args *a;
    const int32_t *query_of; /* candidate -> query */
} score_task_map;

static void score_task(void *arg, int64_t cand, int32_t thread)
{
    (void)thread;
    const score_task_map *m = arg;
    const pikv_score_args *a = m->a;
    const pikv_page_layout *L = pikv_cpu_slot_layout(a->pool, a->slots[cand]);
    const int32_t kvh = L->n_kv_heads, hd = L->head_dim, G = a->n_q_heads / kvh;
    const unsigned char *page = pikv_cpu_page_ptr(a->pool, a->slots[cand]);
    const float *kmin = (const float *)(page + L->kmin_offset);
    const float *kmax = (const float *)(page + L->kmax_offset);
    const float *q = a->q + (size_t)m->query_of[cand] * (size_t)a->n_q_heads * (size_t)hd;
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

pikv_status pikv_cpu_score(pikv_device *dev, const pikv_score_args *a)
{
    pikv_context *ctx = dev->ctx;
    const int32_t n_cand = a->n_queries > 0 ? a->indptr[a->n_queries] : 0;
    if (n_cand == 0) return PIKV_OK;
    int32_t *query_of = pikv_host_alloc(ctx, (size_t)n_cand * sizeof(int32_t), 16);
    PIKV_RETURN_ERROR_IF(!query_of, ctx, PIKV_ERR_OUT_OF_MEMORY,
                         "score: map of %d candidates: allocation failed", n_cand);
    for (int32_t i = 0; i < a->n_queries; i++)
        for (int32_t c = a->indptr[i]; c < a->indptr[i + 1]; c++) query_of[c] = i;
    score_task_map m = {a, query_of};
    pikv_cpu_pool_run(pikv_cpu_device_pool(dev), n_cand, score_task, &m);
    pikv_host_free(ctx, query_of);
    return PIKV_OK;
}

/* ---- budgeted top-k ------------------------------------------------------- */

typedef struct topk_job {
    const pikv_topk_args *a;
    int32_t *order; /* scratch: entries sorted per list */
} topk_job;

/* Sort indices by score descending, then index ascending (deterministic ties).
   A merge sort on the caller's scratch: no global state, any thread. */
static void sort_desc(int32_t *idx, int32_t *tmp, int32_t n, const float *score)
{
    for (int32_t width = 1; width < n; width *= 2) {
        for (int32_t lo = 0; lo < n; lo += 2 * width) {
            int32_t mid = lo + width < n ? lo + width : n;
            int32_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            int32_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi) {
                const float si = score[idx[i]], sj = score[idx[j]];
                bool take_i = si > sj || (si == sj && idx[i] < idx[j]);
                tmp[k++] = take_i ? idx[i++] : idx[j++];
            }
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
    int32_t *idx = job->order + b;                  /* this list's part of the scratch */
    int32_t *tmp = job->order + a->indptr[a->n_lists] + b;
    for (int32_t i = 0; i < n; i++) idx[i] = i;
    sort_desc(idx, tmp, n, a->scores + b);
    int64_t left = a->budget[list];
    for (int32_t i = 0; i < n; i++) {
        const int32_t e = b + idx[i];
        const bool fits = a->tokens[e] <= left;
        a->keep[e] = fits;
        if (fits) left -= a->tokens[e];
    }
}

pikv_status pikv_cpu_topk(pikv_device *dev, const pikv_topk_args *a)
{
    pikv_context *ctx = dev->ctx;
    const int32_t n = a->n_lists > 0 ? a->indptr[a->n_lists] : 0;
    if (n == 0) return PIKV_OK;
    topk_job job = {a, pikv_host_alloc(ctx, 2 * (size_t)n * sizeof(int32_t), 16)};
    PIKV_RETURN_ERROR_IF(!job.order, ctx, PIKV_ERR_OUT_OF_MEMORY,
                         "topk: scratch for %d entries: allocation failed", n);
    pikv_cpu_pool_run(pikv_cpu_device_pool(dev), a->n_lists, topk_task, &job);
    pikv_host_free(ctx, job.order);
    return PIKV_OK;
}
