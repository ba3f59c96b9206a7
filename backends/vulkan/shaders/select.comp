#version 450
/* Quest page scores: one invocation per (candidate page, KV head), over the
   candidates of one chunk (order[o_begin ..]). */
layout(local_size_x_id = 0) in;

layout(std430, binding = 0) readonly buffer Chunk { uint chunk[]; };
layout(std430, binding = 1) readonly buffer Lay { uint lay[]; };
layout(std430, binding = 2) readonly buffer PageOff { uint page_off[]; };
layout(std430, binding = 3) readonly buffer CandQuery { int cand_query[]; };
layout(std430, binding = 4) readonly buffer Order { int order[]; };
layout(std430, binding = 5) readonly buffer Q { float q[]; };
layout(std430, binding = 6) buffer Scores { float scores[]; };

layout(push_constant) uniform Push {
    int lay_off;
    int o_begin;
    int n_items;
    int n_q_heads;
    int G;
} pc;

#define PAGES chunk
#include "common.glsl"

void main()
{
    const layout_t L = GET_LAYOUT(lay, pc.lay_off);
    const int kvh = L.kvh, hd = L.hd, G = pc.G;
    const int gid = FLAT_ID;
    const int g = gid % kvh, it = gid / kvh;
    if (it >= pc.n_items) return;
    const int c = order[pc.o_begin + it];
    const uint page = page_off[c];
    const uint lo = (page + L.kmin) / 4u + uint(g * hd), hi = (page + L.kmax) / 4u + uint(g * hd);
    const int qq = cand_query[c] * pc.n_q_heads * hd;
    float best = -F_INF;
    for (int h = 0; h < G; h++) {
        const int qh = qq + (g * G + h) * hd;
        float bound = 0.0;
        for (int d = 0; d < hd; d++) {
            const float x = q[qh + d] * uintBitsToFloat(chunk[lo + uint(d)]);
            const float y = q[qh + d] * uintBitsToFloat(chunk[hi + uint(d)]);
            bound += x > y ? x : y;
        }
        best = bound > best ? bound : best;
    }
    scores[c * kvh + g] = best;
}
