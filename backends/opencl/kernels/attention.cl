/* Decode attention, split in two kernels (flash-decoding):
 *
 * pikv_attention_part: one work group per task. A task is a run of at most a
 * few pages of one (query, KV head) list that lie in one chunk; the host
 * launches it once per chunk that the lists touch. It computes, for the G
 * query heads of the KV head (GQA: each K/V row is read once for the group),
 * the online softmax state (max m, sum l, unnormalized accumulator) over its
 * pages, and each page's log-sum-exp (page_lse) in the same pass. Scores: one
 * row per work item; softmax max/sum: work-group tree reductions in local
 * memory; values: one (head, channel) per work item, so V reads are coalesced.
 *
 * pikv_attention_finish: one work item per (query, KV head, query head): the
 * exact log-sum-exp merge of the tasks of its list into the normalized output. */

#define HEADS_AT_ONCE 8

__kernel void pikv_attention_part(__global const uchar *chunk, __global const uint *lay, int lay_off,
                                  __global const float *q, __global const int *tasks,
                                  __global const int *chunk_tasks, int ct_begin,
                                  __global const uint *ent_off, __global const int *ent_len,
                                  __global const int *ent_id, int n_q_heads, int G, float scale,
                                  int want_page_lse, __global float *parts, __global float *page_lse,
                                  __local float *sc, __local float *acc, __local float *red,
                                  __local float *st)
{
    const int lid = (int)get_local_id(0), W = (int)get_local_size(0);
    const int task = chunk_tasks[ct_begin + (int)get_group_id(0)];
    const int unit = tasks[3 * task], e0 = tasks[3 * task + 1], e1 = tasks[3 * task + 2];
    const layout_t L = get_layout(lay + lay_off);
    const int ps = L.ps, kvh = L.kvh, hd = L.hd;
    const int query = unit / kvh, g = unit % kvh;
    __global const float *qb = q + ((size_t)query * (size_t)n_q_heads + (size_t)g * (size_t)G) * (size_t)hd;

    for (int i = lid; i < G * hd; i += W) acc[i] = 0.0f;
    for (int h = lid; h < G; h += W) {
        st[h] = -INFINITY;   /* running max */
        st[G + h] = 0.0f;    /* running sum of exp */
        st[2 * G + h] = 0.0f; /* this page's rescale */
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int e = e0; e < e1; e++) {
        const int n = ent_len[e];
        if (n <= 0) continue; /* uniform over the group */
        page_ptr page = chunk + ent_off[e];
        for (int r = lid; r < n; r += W) {
            for (int h0 = 0; h0 < G; h0 += HEADS_AT_ONCE) {
                float s[HEADS_AT_ONCE];
                for (int j = 0; j < HEADS_AT_ONCE; j++) s[j] = 0.0f;
                for (int d = 0; d < hd; d++) {
                    const float kx = load_key_l(page, L, g, r, d);
                    for (int j = 0; j < HEADS_AT_ONCE; j++)
                        if (h0 + j < G) s[j] += qb[(size_t)(h0 + j) * hd + d] * kx;
                }
                for (int j = 0; j < HEADS_AT_ONCE; j++)
                    if (h0 + j < G) sc[(h0 + j) * ps + r] = s[j] * scale;
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int h = 0; h < G; h++) {
            __local float *s = sc + h * ps;
            const float m_old = st[h];
            float mx = m_old;
            for (int r = lid; r < n; r += W) mx = s[r] > mx ? s[r] : mx;
            red[lid] = mx;
            barrier(CLK_LOCAL_MEM_FENCE);
            for (int o = W / 2; o > 0; o >>= 1) {
                if (lid < o) red[lid] = red[lid + o] > red[lid] ? red[lid + o] : red[lid];
                barrier(CLK_LOCAL_MEM_FENCE);
            }
            mx = red[0];
            barrier(CLK_LOCAL_MEM_FENCE);
            float sum = 0.0f;
            for (int r = lid; r < n; r += W) {
                const float x = exp(s[r] - mx);
                s[r] = x;
                sum += x;
            }
            red[lid] = sum;
            barrier(CLK_LOCAL_MEM_FENCE);
            for (int o = W / 2; o > 0; o >>= 1) {
                if (lid < o) red[lid] += red[lid + o];
                barrier(CLK_LOCAL_MEM_FENCE);
            }
            if (lid == 0) {
                const float page_sum = red[0];
                if (want_page_lse)
                    page_lse[(size_t)ent_id[e] * G + h] = page_sum > 0.0f ? mx + log(page_sum) : -INFINITY;
                const float rescale = m_old == -INFINITY ? 0.0f : exp(m_old - mx);
                st[h] = mx;
                st[G + h] = st[G + h] * rescale + page_sum;
                st[2 * G + h] = rescale;
            }
            barrier(CLK_LOCAL_MEM_FENCE);
        }
        for (int i = lid; i < G * hd; i += W) {
            const int h = i / hd, d = i - h * hd;
            float a = acc[i] * st[2 * G + h];
            __local const float *w = sc + h * ps;
            for (int r = 0; r < n; r++) a += w[r] * load_value_l(page, L, g, r, d);
            acc[i] = a;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    __global float *part = parts + (size_t)task * (size_t)G * (size_t)(hd + 2);
    for (int i = lid; i < G * hd; i += W) {
        const int h = i / hd, d = i - h * hd;
        part[(size_t)h * (hd + 2) + 2 + d] = acc[i];
    }
    for (int h = lid; h < G; h += W) {
        part[(size_t)h * (hd + 2)] = st[h];
        part[(size_t)h * (hd + 2) + 1] = st[G + h];
    }
}

/* unit_tasks[u .. u+1]: the tasks of list u. err: the lowest list whose score
   overflowed (INT_MAX when none). */
__kernel void pikv_attention_finish(int n_items, int G, int hd, int n_q_heads, int kvh,
                                    __global const int *unit_tasks, __global const float *parts,
                                    __global float *out, __global float *lse, __global int *err)
{
    const int i = (int)get_global_id(0);
    if (i >= n_items) return;
    const int unit = i / G, h = i % G, query = unit / kvh, g = unit % kvh;
    const size_t head = (size_t)query * n_q_heads + (size_t)g * G + (size_t)h;
    const size_t stride = (size_t)G * (size_t)(hd + 2);
    const int t0 = unit_tasks[unit], t1 = unit_tasks[unit + 1];
    __global float *o = out + head * (size_t)hd;
    float m = -INFINITY;
    for (int t = t0; t < t1; t++) {
        __global const float *ph = parts + (size_t)t * stride + (size_t)h * (hd + 2);
        if ((!(ph[0] < INFINITY) && ph[0] != -INFINITY) || !(ph[1] < INFINITY)) {
            atomic_min(err, unit);
            return;
        }
        if (ph[1] > 0.0f && ph[0] > m) m = ph[0];
    }
    if (m == -INFINITY) {
        for (int d = 0; d < hd; d++) o[d] = 0.0f;
        lse[head] = -INFINITY;
        return;
    }
    float sum = 0.0f;
    for (int t = t0; t < t1; t++) {
        __global const float *ph = parts + (size_t)t * stride + (size_t)h * (hd + 2);
        if (ph[1] > 0.0f) sum += exp(ph[0] - m) * ph[1];
    }
    const float inv = 1.0f / sum;
    /* tasks outer, channels inner: one exp per task (the same sums in the same order) */
    for (int d = 0; d < hd; d++) o[d] = 0.0f;
    for (int t = t0; t < t1; t++) {
        __global const float *ph = parts + (size_t)t * stride + (size_t)h * (hd + 2);
        if (!(ph[1] > 0.0f)) continue;
        const float w = exp(ph[0] - m);
        for (int d = 0; d < hd; d++) o[d] += w * ph[2 + d];
    }
    for (int d = 0; d < hd; d++) o[d] *= inv;
    lse[head] = m + log(sum);
}

/* The merge op: one work item per row (see backends/cpu/cpu-merge.c). */
__kernel void pikv_merge(int n_parts, int n_rows, int dim, __global const float *part_out,
                         __global const float *part_lse, __global float *out, __global float *lse,
                         int want_lse)
{
    const int row = (int)get_global_id(0);
    if (row >= n_rows) return;
    __global float *o = out + (size_t)row * dim;
    float m = -INFINITY;
    for (int p = 0; p < n_parts; p++) {
        const float l = part_lse[(size_t)p * n_rows + row];
        if (l > m) m = l;
    }
    if (m == -INFINITY) {
        for (int d = 0; d < dim; d++) o[d] = 0.0f;
        if (want_lse) lse[row] = -INFINITY;
        return;
    }
    float sum = 0.0f;
    for (int p = 0; p < n_parts; p++) {
        const float l = part_lse[(size_t)p * n_rows + row];
        if (l != -INFINITY) sum += exp(l - m);
    }
    const float inv = 1.0f / sum;
    for (int d = 0; d < dim; d++) {
        float a = 0.0f;
        for (int p = 0; p < n_parts; p++) {
            const float l = part_lse[(size_t)p * n_rows + row];
            if (l != -INFINITY) a += exp(l - m) * part_out[((size_t)p * n_rows + row) * dim + d];
        }
        o[d] = a * inv;
    }
    if (want_lse) lse[row] = m + log(sum);
}
