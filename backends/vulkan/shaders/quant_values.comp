#version 450
/* Values of a full f16 page into an int8/int4 page: one invocation per (KV
   head, token), the whole row and all its channel groups. See quant_keys.comp. */
layout(local_size_x_id = 0) in;

layout(std430, binding = 0) readonly buffer Src { uint src_words[]; };
layout(std430, binding = 1) buffer Dst { uint dst_words[]; };
layout(std430, binding = 2) readonly buffer Lay { uint lay[]; };
layout(std430, binding = 3) writeonly buffer Err { float err[]; };

layout(push_constant) uniform Push {
    uint src_off;
    uint dst_off;
} pc;

#define PAGES src_words
#define DST dst_words
#include "common.glsl"
#include "quant.glsl"

void main()
{
    const layout_t S = GET_LAYOUT(lay, 0), Q = GET_LAYOUT(lay, LAYOUT_WORDS);
    const int ps = S.ps, kvh = S.kvh, hd = S.hd, dtype = Q.dtype, G = Q.group, vgs = Q.vg;
    const int qmax = dtype == DT_INT4 ? 15 : 255;
    const int gid = FLAT_ID;
    if (gid >= kvh * ps) return;
    const int t = gid % ps, g = gid / ps;
    const uint vs = pc.src_off + S.v + uint(g) * S.hs + uint(t * hd) * 2u;
    const uint vq = pc.dst_off + Q.v + uint(g) * Q.hs + uint(t) * Q.row;
    float e2 = 0.0, x2 = 0.0, emax = 0.0;
    for (int vg = 0; vg < vgs; vg++) {
        const int d0 = vg * G, n = min(hd - d0, G);
        float lo = F_INF, hi = -F_INF;
        for (int j = 0; j < n; j++) {
            const float x = rd_f16(vs + 2u * uint(d0 + j));
            lo = x < lo ? x : lo;
            hi = x > hi ? x : hi;
        }
        const uint at = uint((g * ps + t) * vgs + vg);
        const uvec2 sz_bits = group_params_bits(lo, hi, qmax);
        or_u16(pc.dst_off + Q.vsc + 2u * at, sz_bits.x);
        or_u16(pc.dst_off + Q.vze + 2u * at, sz_bits.y);
        const float scale = f16_bits_to_f32(sz_bits.x), zero = f16_bits_to_f32(sz_bits.y);
        for (int j = 0; j < n; j++) {
            const int d = d0 + j;
            const float x = rd_f16(vs + 2u * uint(d));
            const uint qv = quantize_value(x, scale, zero, qmax);
            if (dtype == DT_INT8) or_u8(vq + uint(d), qv);
            else or_u8(vq + uint(d >> 1), qv << ((d & 1) * 4));
            precise const float e = (float(qv) * scale + zero) - x;
            e2 += e * e;
            x2 += x * x;
            emax = max(abs(e), emax);
        }
    }
    err[3 * gid] = e2;
    err[3 * gid + 1] = x2;
    err[3 * gid + 2] = emax;
}
