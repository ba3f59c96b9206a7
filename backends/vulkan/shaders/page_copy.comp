#version 450
/* The first n_rows rows of a page into an open page, bounds recomputed. The
   source is an open page (copied bit for bit) or a quantized page (rows
   dequantized into the destination's dtype). One invocation per (KV head,
   channel). Source and destination may be the same chunk buffer. */
layout(local_size_x_id = 0) in;

layout(std430, binding = 0) readonly buffer Src { uint src_words[]; };
layout(std430, binding = 1) buffer Dst { uint dst_words[]; };
layout(std430, binding = 2) readonly buffer Lay { uint lay[]; };

layout(push_constant) uniform Push {
    uint src_off;
    uint dst_off;
    int src_lay;
    int n_rows;
    uint same_page; /* source and destination are one page: recompute its bounds only */
} pc;

#define PAGES src_words
#define DST dst_words
#include "common.glsl"

void main()
{
    const layout_t S = GET_LAYOUT(lay, pc.src_lay), D = GET_LAYOUT(lay, 0);
    const int kvh = D.kvh, hd = D.hd, dtype = D.dtype;
    const int gid = FLAT_ID;
    if (gid >= kvh * hd) return;
    const int d = gid % hd, g = gid / hd;
    const uint kh = pc.dst_off + D.k + uint(g) * D.hs, vh = pc.dst_off + D.v + uint(g) * D.hs;
    const uint skh = pc.src_off + S.k + uint(g) * S.hs, svh = pc.src_off + S.v + uint(g) * S.hs;
    const bool quant = S.dtype >= DT_INT8;
    uint lo = 0u, hi = 0u;
    for (int r = 0; r < pc.n_rows; r++) {
        const uint row = uint(r) * D.row;
        uint s;
        if (quant) { /* dequantized values may pass the f16 range by part of a step: clamped, like the CPU */
            s = store_open(kh + row, dtype, d, floatBitsToUint(clamp(load_key(pc.src_off, S, g, r, d), -65504.0, 65504.0)));
            store_open(vh + row, dtype, d, floatBitsToUint(clamp(load_value(pc.src_off, S, g, r, d), -65504.0, 65504.0)));
        } else if (pc.same_page != 0u) {
            s = dtype == DT_F32 ? src_words[(skh + row) / 4u + uint(d)]
                                : floatBitsToUint(f16_bits_to_f32(rd_u16(skh + row + 2u * uint(d))));
        } else if (dtype == DT_F32) {
            s = src_words[(skh + row) / 4u + uint(d)];
            dst_words[(kh + row) / 4u + uint(d)] = s;
            dst_words[(vh + row) / 4u + uint(d)] = src_words[(svh + row) / 4u + uint(d)];
        } else {
            const uint kb = rd_u16(skh + row + 2u * uint(d));
            wr_u16(kh + row + 2u * uint(d), kb);
            wr_u16(vh + row + 2u * uint(d), rd_u16(svh + row + 2u * uint(d)));
            s = floatBitsToUint(f16_bits_to_f32(kb));
        }
        if (r == 0) {
            lo = s;
            hi = s;
        } else {
            lo = bits_lt(s, lo) ? s : lo;
            hi = bits_lt(hi, s) ? s : hi;
        }
    }
    if (pc.n_rows > 0) {
        dst_words[(pc.dst_off + D.kmin) / 4u + uint(g * hd + d)] = lo;
        dst_words[(pc.dst_off + D.kmax) / 4u + uint(g * hd + d)] = hi;
    }
}
