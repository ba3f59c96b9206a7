#version 450
/* Budgeted top-k, one workgroup per list. First every entry's rank in the
   order of decreasing score (ties: the lower index first, as the CPU's stable
   sort), computed in parallel: rank(i) = #{j : s_j > s_i, or s_j == s_i and
   j < i}; sorted[b + rank(i)] = i. Then one invocation walks the sorted
   entries and keeps each one whose tokens fit what is left of the budget.
   Budgets come clamped to int range by the host (to the list's total tokens
   when larger, which keeps the same entries). */
layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 256;

layout(std430, binding = 0) readonly buffer Indptr { int indptr[]; };
layout(std430, binding = 1) readonly buffer Scores { float scores[]; };
layout(std430, binding = 2) readonly buffer Tokens { int tokens[]; };
layout(std430, binding = 3) readonly buffer Budget { int budget[]; };
layout(std430, binding = 4) writeonly buffer Keep { uint keep[]; };
layout(std430, binding = 5) coherent buffer Sorted { int sorted[]; }; /* read by invocation 0 */

layout(push_constant) uniform Push {
    int n_lists;
} pc;

#include "common.glsl"

int order_key(float x)
{
    const uint u = floatBitsToUint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return int(0x80000000u); /* NaN: below everything */
    return (u & 0x80000000u) != 0u ? -int(u & 0x7fffffffu) : int(u);
}

void main()
{
    const int l = FLAT_GROUP;
    if (l >= pc.n_lists) return; /* the whole group */
    const int lid = int(gl_LocalInvocationID.x);
    const int b = indptr[l], e = indptr[l + 1];
    for (int i = b + lid; i < e; i += int(WG)) {
        const int s = order_key(scores[i]);
        int rank = 0;
        for (int j = b; j < e; j++) {
            const int t = order_key(scores[j]);
            rank += (t > s || (t == s && j < i)) ? 1 : 0;
        }
        sorted[b + rank] = i;
    }
    memoryBarrierBuffer();
    barrier();
    if (lid != 0) return;
    int left = budget[l];
    for (int r = b; r < e; r++) {
        const int i = sorted[r];
        const bool fits = tokens[i] <= left;
        keep[i] = fits ? 1u : 0u;
        if (fits) left -= tokens[i];
    }
}
