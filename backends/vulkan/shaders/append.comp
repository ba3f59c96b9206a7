#version 450
/* Append: one invocation per (write, KV head, channel). It walks the write's
   rows, so stores are coalesced across channels, and it owns the Quest bounds
   of its channel. Sources are read as bits: f32 pages get them unchanged. */
layout(local_size_x_id = 0) in;

layout(std430, binding = 0) buffer Dst { uint dst_words[]; };
layout(std430, binding = 1) readonly buffer Lay { uint lay[]; };
/* per write {page byte offset, row0, n_rows, src_begin} */
layout(std430, binding = 2) readonly buffer Writes { int writes[]; };
layout(std430, binding = 3) readonly buffer Order { int order[]; };
layout(std430, binding = 4) readonly buffer SrcIndex { int src_index[]; };
layout(std430, binding = 5) readonly buffer K { uint k_bits[]; };
layout(std430, binding = 6) readonly buffer V { uint v_bits[]; };

layout(push_constant) uniform Push {
    int o_begin;
    int n_items;
} pc;

#define PAGES dst_words
#define DST dst_words
#include "common.glsl"

void main()
{
    const layout_t L = GET_LAYOUT(lay, 0);
    const int kvh = L.kvh, hd = L.hd;
    const int gid = FLAT_ID;
    const int d = gid % hd, g = (gid / hd) % kvh, it = gid / (hd * kvh);
    if (it >= pc.n_items) return;
    const int w = 4 * order[pc.o_begin + it];
    const uint page = uint(writes[w]);
    const int row0 = writes[w + 1], n_rows = writes[w + 2], src_begin = writes[w + 3];
    const uint kh = page + L.k + uint(g) * L.hs, vh = page + L.v + uint(g) * L.hs;
    const uint kmin = (page + L.kmin) / 4u + uint(g * hd + d), kmax = (page + L.kmax) / 4u + uint(g * hd + d);
    uint lo = row0 == 0 ? 0u : dst_words[kmin], hi = row0 == 0 ? 0u : dst_words[kmax];
    for (int r = 0; r < n_rows; r++) {
        const uint off = uint((src_index[src_begin + r] * kvh + g) * hd + d);
        const uint row = uint(row0 + r) * L.row;
        const uint s = store_open(kh + row, L.dtype, d, k_bits[off]);
        store_open(vh + row, L.dtype, d, v_bits[off]);
        if (row0 + r == 0) {
            lo = s;
            hi = s;
        } else {
            lo = bits_lt(s, lo) ? s : lo;
            hi = bits_lt(hi, s) ? s : hi;
        }
    }
    if (n_rows > 0) {
        dst_words[kmin] = lo;
        dst_words[kmax] = hi;
    }
}
