/* Append and page copy. One work item per (write, KV head, channel): it walks
   the write's rows, so its stores are coalesced across channels on a GPU and
   one contiguous loop on a CPU, and it owns the Quest bounds of its channel. */

/* writes: per write 4 ints {page byte offset, row0, n_rows, src_begin};
   order[o_begin ..] the writes of this chunk. */
__kernel void pikv_append(__global uchar *chunk, __global const uint *lay,
                          __global const int *writes, __global const int *order, int o_begin,
                          int n_items, __global const int *src_index,
                          __global const float *k, __global const float *v)
{
    __global const uint *L = lay;
    const int kvh = (int)L[L_KVH], hd = (int)L[L_HD], dtype = (int)L[L_DTYPE];
    const int gid = (int)get_global_id(0);
    const int d = gid % hd, g = (gid / hd) % kvh, it = gid / (hd * kvh);
    if (it >= n_items) return;
    __global const int *w = writes + 4 * order[o_begin + it];
    __global uchar *page = chunk + (uint)w[0];
    const int row0 = w[1], n_rows = w[2], src_begin = w[3];
    __global uchar *kh = page + L[L_K] + (size_t)g * L[L_HS];
    __global uchar *vh = page + L[L_V] + (size_t)g * L[L_HS];
    __global float *kmin = (__global float *)(page + L[L_KMIN]) + (size_t)g * hd;
    __global float *kmax = (__global float *)(page + L[L_KMAX]) + (size_t)g * hd;
    float lo = row0 == 0 ? 0.0f : kmin[d], hi = row0 == 0 ? 0.0f : kmax[d];
    for (int r = 0; r < n_rows; r++) {
        const size_t src = (size_t)src_index[src_begin + r];
        const size_t off = (src * (size_t)kvh + (size_t)g) * (size_t)hd + (size_t)d;
        const size_t row = (size_t)(row0 + r) * L[L_ROW];
        const float s = store_open(kh + row, dtype, d, k[off]);
        store_open(vh + row, dtype, d, v[off]);
        if (row0 + r == 0) {
            lo = s;
            hi = s;
        } else {
            lo = s < lo ? s : lo;
            hi = s > hi ? s : hi;
        }
    }
    if (n_rows > 0) {
        kmin[d] = lo;
        kmax[d] = hi;
    }
}

/* The first n_rows rows of a page into an open page, bounds recomputed. The
   source is an open page (copied bit for bit) or a quantized page (rows
   dequantized into the destination's dtype). One work item per (KV head, channel). */
__kernel void pikv_page_copy(__global const uchar *src_chunk, uint src_off, __global uchar *dst_chunk,
                             uint dst_off, __global const uint *lay, int src_lay, int n_rows)
{
    __global const uint *S = lay + src_lay, *D = lay;
    const int kvh = (int)D[L_KVH], hd = (int)D[L_HD], dtype = (int)D[L_DTYPE];
    const int gid = (int)get_global_id(0);
    if (gid >= kvh * hd) return;
    const int d = gid % hd, g = gid / hd;
    page_ptr src = src_chunk + src_off;
    __global uchar *dst = dst_chunk + dst_off;
    __global uchar *kh = dst + D[L_K] + (size_t)g * D[L_HS];
    __global uchar *vh = dst + D[L_V] + (size_t)g * D[L_HS];
    page_ptr skh = src + S[L_K] + (size_t)g * S[L_HS];
    page_ptr svh = src + S[L_V] + (size_t)g * S[L_HS];
    const bool quant = S[L_DTYPE] >= DT_INT8;
    float lo = 0.0f, hi = 0.0f;
    for (int r = 0; r < n_rows; r++) {
        const size_t row = (size_t)r * D[L_ROW];
        float s;
        if (quant) { /* dequantized values may pass the f16 range by part of a step: clamped, like the CPU */
            s = store_open(kh + row, dtype, d, clamp(load_key(src, S, g, r, d), -65504.0f, 65504.0f));
            store_open(vh + row, dtype, d, clamp(load_value(src, S, g, r, d), -65504.0f, 65504.0f));
        } else if (dtype == DT_F32) {
            ((__global uint *)(kh + row))[d] = ((__global const uint *)(skh + row))[d];
            ((__global uint *)(vh + row))[d] = ((__global const uint *)(svh + row))[d];
            s = ((__global const float *)(kh + row))[d];
        } else {
            ((__global ushort *)(kh + row))[d] = ((__global const ushort *)(skh + row))[d];
            ((__global ushort *)(vh + row))[d] = ((__global const ushort *)(svh + row))[d];
            s = vload_half(d, (__global const half *)(kh + row));
        }
        if (r == 0) {
            lo = s;
            hi = s;
        } else {
            lo = s < lo ? s : lo;
            hi = s > hi ? s : hi;
        }
    }
    if (n_rows > 0) {
        ((__global float *)(dst + D[L_KMIN]))[(size_t)g * hd + d] = lo;
        ((__global float *)(dst + D[L_KMAX]))[(size_t)g * hd + d] = hi;
    }
}
