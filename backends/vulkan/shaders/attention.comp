#version 450
/* Decode attention, part 1 (flash-decoding): one workgroup per task. A task is
 * a run of a few pages of one (query, KV head) list that lie in one chunk; the
 * host dispatches once per chunk the lists touch. For the G query heads of the
 * KV head (GQA: each K/V row is read once for the group) it computes the online
 * softmax state (max m, sum l, unnormalized accumulator) over its pages, and
 * each page's log-sum-exp (page_lse) in the same pass. Scores: one row per
 * invocation; softmax max/sum: workgroup reductions (subgroup operations when
 * built with USE_SUBGROUPS, else a shared-memory tree); values: one (head,
 * channel) per invocation, so V reads are coalesced. attention_finish.comp
 * merges the tasks of each list.
 *
 * Specialization constants: the workgroup size (a power of two) and the sizes
 * of the shared arrays, G * page_size scores and G * head_dim accumulators. */
#ifdef USE_SUBGROUPS
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#endif

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 64;
layout(constant_id = 1) const uint SC_SIZE = 1024;
layout(constant_id = 2) const uint ACC_SIZE = 1024;
layout(constant_id = 3) const uint MAX_G = 8;

layout(std430, binding = 0) readonly buffer Chunk { uint chunk[]; };
layout(std430, binding = 1) readonly buffer Lay { uint lay[]; };
layout(std430, binding = 2) readonly buffer Q { float q[]; };
layout(std430, binding = 3) readonly buffer Tasks { int tasks[]; };
layout(std430, binding = 4) readonly buffer ChunkTasks { int chunk_tasks[]; };
layout(std430, binding = 5) readonly buffer EntOff { uint ent_off[]; };
layout(std430, binding = 6) readonly buffer EntLen { int ent_len[]; };
layout(std430, binding = 7) readonly buffer EntId { int ent_id[]; };
layout(std430, binding = 8) writeonly buffer Parts { float parts[]; };
layout(std430, binding = 9) buffer PageLse { float page_lse[]; };

layout(push_constant) uniform Push {
    int lay_off;
    int ct_begin;
    int n_q_heads;
    int G;
    float scale;
    int want_page_lse;
    int n_groups;
} pc;

#define PAGES chunk
#include "common.glsl"

#define HEADS_AT_ONCE 8

shared float sc[SC_SIZE];
shared float acc[ACC_SIZE];
shared float red[WG];
shared float st[3 * MAX_G]; /* running max, running sum, this page's rescale */

/* The maximum / sum of x over the workgroup, returned to every invocation.
   Called in uniform control flow. */
float wg_max(float x)
{
    const uint lid = gl_LocalInvocationID.x;
#ifdef USE_SUBGROUPS
    x = subgroupMax(x);
    if (subgroupElect()) red[gl_SubgroupID] = x;
    barrier();
    if (gl_SubgroupID == 0u) {
        float y = -F_INF;
        for (uint i = gl_SubgroupInvocationID; i < gl_NumSubgroups; i += gl_SubgroupSize) y = max(y, red[i]);
        y = subgroupMax(y);
        if (subgroupElect()) red[0] = y;
    }
    barrier();
#else
    red[lid] = x;
    barrier();
    for (uint o = WG / 2u; o > 0u; o >>= 1) {
        if (lid < o) red[lid] = max(red[lid], red[lid + o]);
        barrier();
    }
#endif
    const float r = red[0];
    barrier();
    return r;
}

float wg_sum(float x)
{
    const uint lid = gl_LocalInvocationID.x;
#ifdef USE_SUBGROUPS
    x = subgroupAdd(x);
    if (subgroupElect()) red[gl_SubgroupID] = x;
    barrier();
    if (gl_SubgroupID == 0u) {
        float y = 0.0;
        for (uint i = gl_SubgroupInvocationID; i < gl_NumSubgroups; i += gl_SubgroupSize) y += red[i];
        y = subgroupAdd(y);
        if (subgroupElect()) red[0] = y;
    }
    barrier();
#else
    red[lid] = x;
    barrier();
    for (uint o = WG / 2u; o > 0u; o >>= 1) {
        if (lid < o) red[lid] += red[lid + o];
        barrier();
    }
#endif
    const float r = red[0];
    barrier();
    return r;
}

void main()
{
    const int lid = int(gl_LocalInvocationID.x), W = int(WG);
    if (FLAT_GROUP >= pc.n_groups) return; /* the whole group: the last row of a 2-D dispatch */
    const int task = chunk_tasks[pc.ct_begin + FLAT_GROUP];
    const int unit = tasks[3 * task], e0 = tasks[3 * task + 1], e1 = tasks[3 * task + 2];
    const layout_t L = GET_LAYOUT(lay, pc.lay_off);
    const int ps = L.ps, kvh = L.kvh, hd = L.hd, G = pc.G;
    const int query = unit / kvh, g = unit % kvh;
    const int qb = (query * pc.n_q_heads + g * G) * hd;

    for (int i = lid; i < G * hd; i += W) acc[i] = 0.0;
    for (int h = lid; h < G; h += W) {
        st[h] = -F_INF;
        st[G + h] = 0.0;
        st[2 * G + h] = 0.0;
    }
    barrier();
    for (int e = e0; e < e1; e++) {
        const int n = ent_len[e];
        if (n <= 0) continue; /* uniform over the workgroup */
        const uint page = ent_off[e];
        for (int r = lid; r < n; r += W) {
            for (int h0 = 0; h0 < G; h0 += HEADS_AT_ONCE) {
                float s[HEADS_AT_ONCE];
                for (int j = 0; j < HEADS_AT_ONCE; j++) s[j] = 0.0;
                for (int d = 0; d < hd; d++) {
                    const float kx = load_key(page, L, g, r, d);
                    for (int j = 0; j < HEADS_AT_ONCE; j++)
                        if (h0 + j < G) s[j] += q[qb + (h0 + j) * hd + d] * kx;
                }
                for (int j = 0; j < HEADS_AT_ONCE; j++)
                    if (h0 + j < G) sc[(h0 + j) * ps + r] = s[j] * pc.scale;
            }
        }
        barrier();
        for (int h = 0; h < G; h++) {
            const float m_old = st[h];
            float mx = m_old;
            for (int r = lid; r < n; r += W) mx = sc[h * ps + r] > mx ? sc[h * ps + r] : mx;
            mx = wg_max(mx);
            float sum = 0.0;
            for (int r = lid; r < n; r += W) {
                const float x = exp(sc[h * ps + r] - mx);
                sc[h * ps + r] = x;
                sum += x;
            }
            const float page_sum = wg_sum(sum);
            if (lid == 0) {
                if (pc.want_page_lse != 0) page_lse[ent_id[e] * G + h] = page_sum > 0.0 ? mx + log(page_sum) : -F_INF;
                const float rescale = m_old == -F_INF ? 0.0 : exp(m_old - mx);
                st[h] = mx;
                st[G + h] = st[G + h] * rescale + page_sum;
                st[2 * G + h] = rescale;
            }
            barrier();
        }
        for (int i = lid; i < G * hd; i += W) {
            const int h = i / hd, d = i - h * hd;
            float a = acc[i] * st[2 * G + h];
            for (int r = 0; r < n; r++) a += sc[h * ps + r] * load_value(page, L, g, r, d);
            acc[i] = a;
        }
        barrier();
    }
    const int part = task * G * (hd + 2);
    for (int i = lid; i < G * hd; i += W) {
        const int h = i / hd, d = i - h * hd;
        parts[part + h * (hd + 2) + 2 + d] = acc[i];
    }
    for (int h = lid; h < G; h += W) {
        parts[part + h * (hd + 2)] = st[h];
        parts[part + h * (hd + 2) + 1] = st[G + h];
    }
}
