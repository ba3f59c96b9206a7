/* Quest page scores: one work item per (candidate page, KV head), over the
   candidates of one chunk (order[o_begin ..]). */
__kernel void pikv_score(__global const uchar *chunk, __global const uint *lay, int lay_off,
                         __global const uint *page_off, __global const int *cand_query,
                         __global const int *order, int o_begin, int n_items,
                         __global const float *q, int n_q_heads, int G, __global float *scores)
{
    __global const uint *L = lay + lay_off;
    const int kvh = (int)L[L_KVH], hd = (int)L[L_HD];
    const int gid = (int)get_global_id(0);
    const int g = gid % kvh, it = gid / kvh;
    if (it >= n_items) return;
    const int c = order[o_begin + it];
    page_ptr page = chunk + page_off[c];
    __global const float *lo = (__global const float *)(page + L[L_KMIN]) + (size_t)g * hd;
    __global const float *hi = (__global const float *)(page + L[L_KMAX]) + (size_t)g * hd;
    __global const float *qq = q + (size_t)cand_query[c] * (size_t)n_q_heads * (size_t)hd;
    float best = -INFINITY;
    for (int h = 0; h < G; h++) {
        __global const float *qh = qq + ((size_t)g * G + (size_t)h) * (size_t)hd;
        float bound = 0.0f;
        for (int d = 0; d < hd; d++) {
            const float x = qh[d] * lo[d], y = qh[d] * hi[d];
            bound += x > y ? x : y;
        }
        best = bound > best ? bound : best;
    }
    scores[(size_t)c * kvh + g] = best;
}

/* Budgeted top-k, one work item per list: repeatedly take the best entry not yet
   visited (ties: the lower index, as the CPU's stable sort), keep it if its tokens
   fit what is left of the budget. keep[] holds 0 unvisited, 1 kept, 2 skipped while
   it runs. O(n^2) per list: lists are one (query, KV head)'s candidate pages. */
__kernel void pikv_topk(__global const int *indptr, __global const float *scores, __global const int *tokens,
                        __global const long *budget, __global uchar *keep, int n_lists)
{
    const int l = (int)get_global_id(0);
    if (l >= n_lists) return;
    const int b = indptr[l], e = indptr[l + 1];
    for (int i = b; i < e; i++) keep[i] = 0;
    long left = budget[l];
    for (int step = b; step < e; step++) {
        int best = -1;
        float best_score = 0.0f;
        for (int i = b; i < e; i++)
            if (keep[i] == 0 && (best < 0 || scores[i] > best_score)) {
                best = i;
                best_score = scores[i];
            }
        if (tokens[best] <= left) {
            keep[best] = 1;
            left -= tokens[best];
        } else {
            keep[best] = 2;
        }
    }
    for (int i = b; i < e; i++) keep[i] = keep[i] == 1 ? 1 : 0;
}
