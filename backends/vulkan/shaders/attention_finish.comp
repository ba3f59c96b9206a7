#version 450
/* Decode attention, part 2: one invocation per (query, KV head, query head):
   the exact log-sum-exp merge of the tasks of its list into the normalized
   output. list_tasks[u] .. list_tasks[u+1]: the tasks of list u. err: the
   lowest list whose score overflowed (0x7fffffff when none). */
layout(local_size_x_id = 0) in;

layout(std430, binding = 0) readonly buffer ListTasks { int list_tasks[]; };
layout(std430, binding = 1) readonly buffer Parts { float parts[]; };
layout(std430, binding = 2) writeonly buffer Out { float outv[]; };
layout(std430, binding = 3) writeonly buffer Lse { float lse[]; };
layout(std430, binding = 4) buffer Err { int err[]; };

layout(push_constant) uniform Push {
    int n_items;
    int G;
    int hd;
    int n_q_heads;
    int kvh;
} pc;

#include "common.glsl"

void main()
{
    const int i = FLAT_ID;
    if (i >= pc.n_items) return;
    const int G = pc.G, hd = pc.hd;
    const int unit = i / G, h = i % G, query = unit / pc.kvh, g = unit % pc.kvh;
    const int head = query * pc.n_q_heads + g * G + h;
    const int stride = G * (hd + 2);
    const int t0 = list_tasks[unit], t1 = list_tasks[unit + 1];
    const int o = head * hd;
    float m = -F_INF;
    for (int t = t0; t < t1; t++) {
        const int ph = t * stride + h * (hd + 2);
        const float pm = parts[ph], pl = parts[ph + 1];
        if ((!(pm < F_INF) && pm != -F_INF) || !(pl < F_INF)) {
            atomicMin(err[0], unit);
            return;
        }
        if (pl > 0.0 && pm > m) m = pm;
    }
    if (m == -F_INF) {
        for (int d = 0; d < hd; d++) outv[o + d] = 0.0;
        lse[head] = -F_INF;
        return;
    }
    float sum = 0.0;
    for (int t = t0; t < t1; t++) {
        const int ph = t * stride + h * (hd + 2);
        if (parts[ph + 1] > 0.0) sum += exp(parts[ph] - m) * parts[ph + 1];
    }
    const float inv = 1.0 / sum;
    for (int d = 0; d < hd; d++) {
        float a = 0.0;
        for (int t = t0; t < t1; t++) {
            const int ph = t * stride + h * (hd + 2);
            if (parts[ph + 1] > 0.0) a += exp(parts[ph] - m) * parts[ph + 2 + d];
        }
        outv[o + d] = a * inv;
    }
    lse[head] = m + log(sum);
}
