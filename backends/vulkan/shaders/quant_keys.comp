#version 450
/* Keys of a full f16 page into an int8/int4 page: one invocation per (KV head,
   key group, byte column): int4 columns hold two channels. The host zero-fills
   the destination page and copies the Quest bounds first, so bytes and f16
   scales are ORed in. Each invocation writes its reconstruction error (sum e^2,
   sum x^2, max |e|) for the host to add up. */
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
    const int ps = S.ps, kvh = S.kvh, hd = S.hd, dtype = Q.dtype, G = Q.group, kg = Q.kg;
    const int qmax = dtype == DT_INT4 ? 15 : 255;
    const int per = dtype == DT_INT4 ? 2 : 1, ncol = (hd + per - 1) / per;
    const int gid = FLAT_ID;
    if (gid >= kvh * kg * ncol) return;
    const int col = gid % ncol, tg = (gid / ncol) % kg, g = gid / (ncol * kg);
    const uint ks = pc.src_off + S.k + uint(g) * S.hs;
    const uint kq = pc.dst_off + Q.k + uint(g) * Q.hs;
    const int t0 = tg * G, n = min(ps - t0, G);
    float e2 = 0.0, x2 = 0.0, emax = 0.0;
    for (int d = col * per; d < col * per + per && d < hd; d++) {
        float lo = F_INF, hi = -F_INF;
        for (int j = 0; j < n; j++) {
            const float x = rd_f16(ks + 2u * uint((t0 + j) * hd + d));
            lo = x < lo ? x : lo;
            hi = x > hi ? x : hi;
        }
        const uint at = uint((g * kg + tg) * hd + d);
        const uvec2 sz_bits = group_params_bits(lo, hi, qmax);
        or_u16(pc.dst_off + Q.ksc + 2u * at, sz_bits.x);
        or_u16(pc.dst_off + Q.kze + 2u * at, sz_bits.y);
        const float scale = f16_bits_to_f32(sz_bits.x), zero = f16_bits_to_f32(sz_bits.y);
        for (int j = 0; j < n; j++) {
            const float x = rd_f16(ks + 2u * uint((t0 + j) * hd + d));
            const uint qv = quantize_value(x, scale, zero, qmax);
            const uint row = kq + uint(t0 + j) * Q.row;
            if (dtype == DT_INT8) or_u8(row + uint(d), qv);
            else or_u8(row + uint(d >> 1), qv << ((d & 1) * 4));
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
