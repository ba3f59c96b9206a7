/* Quest page scores for CPU devices (PoCL), compiled only there (-DPIKV_OCL_CPU).
 * Same contract as pikv_score (select.cl). Pages are addressed in a pool arena
 * (see opencl-cpu-ops.c): the candidates of one arena, order[o_begin .. o_end),
 * go to work items in runs of SCORE_RUN, each scoring every KV head of its
 * candidates with float16 vectors over the contiguous min/max bounds rows
 * (head_dim a multiple of 16: the host checks). cand_info[c]: bit 30 set for a
 * page of the quantized pool (layout row 1). CPU_PREFETCH: attention_cpu.cl. */
#ifdef PIKV_OCL_CPU

#define SCORE_RUN 16
#define SCORE_PF 2 /* prefetch distance in candidates */

__kernel __attribute__((reqd_work_group_size(1, 1, 1))) void pikv_score_cpu(
    __global const uchar *arena, __global const uint *lay, __global const ulong *page_off,
    __global const int *cand_query, __global const int *cand_info, __global const int *order, int o_begin,
    int o_end, __global const float *q, int n_q_heads, int G, __global float *scores)
{
    const int b = o_begin + (int)get_global_id(0) * SCORE_RUN, e = min(b + SCORE_RUN, o_end);
    const int kvh = (int)lay[L_KVH], hd = (int)lay[L_HD], nv = hd / 16;
    const uint bounds_bytes = 2u * (uint)kvh * (uint)hd * 4u; /* min then max, contiguous */
    for (int o = b; o < e; o++) {
        const int c = order[o];
        if (o + SCORE_PF < o_end) { /* a later candidate's bounds: pages are far apart */
            const int cp = order[o + SCORE_PF];
            __global const uint *Lp = ((cand_info[cp] >> 30) & 1) ? lay + LAYOUT_WORDS : lay;
            CPU_PREFETCH(arena + page_off[cp] + Lp[L_KMIN], bounds_bytes);
        }
        const bool qpool = (cand_info[c] >> 30) & 1;
        __global const uint *Lw = qpool ? lay + LAYOUT_WORDS : lay;
        page_ptr page = arena + page_off[c];
        __global const float *lo0 = (__global const float *)(page + Lw[L_KMIN]);
        __global const float *hi0 = (__global const float *)(page + Lw[L_KMAX]);
        __global const float *qq = q + (size_t)cand_query[c] * (size_t)n_q_heads * (size_t)hd;
        for (int g = 0; g < kvh; g++) {
            __global const float *lo = lo0 + (size_t)g * hd, *hi = hi0 + (size_t)g * hd;
            float best = -INFINITY;
            for (int h = 0; h < G; h++) {
                __global const float *qh = qq + ((size_t)g * G + (size_t)h) * (size_t)hd;
                float16 acc = (float16)(0.0f);
                for (int j = 0; j < nv; j++) {
                    const float16 qv = vload16(j, qh);
                    acc += fmax(qv * vload16(j, lo), qv * vload16(j, hi));
                }
                const float8 a8 = acc.lo + acc.hi;
                const float4 a4 = a8.lo + a8.hi;
                const float bound = (a4.x + a4.y) + (a4.z + a4.w);
                best = bound > best ? bound : best;
            }
            scores[(size_t)c * kvh + g] = best;
        }
    }
}

#endif /* PIKV_OCL_CPU */
