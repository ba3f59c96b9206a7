/* Quantize a full f16 page into an int8/int4 page, with exactly the arithmetic
   of docs/compression.md (bit-compatible with backends/cpu/cpu-quant.c): zero =
   min, scale = (max - min) / qmax correctly rounded then rounded UP to f16,
   q = clamp(rint((x - zero) / scale)). The host zero-fills the destination page
   and copies the Quest bounds first. Each work item also writes its
   reconstruction error (sum e^2, sum x^2, max |e|) for the host to add up. */

inline void put_q(__global uchar *row, int dtype, int d, uint q)
{
    if (dtype == DT_INT8) {
        row[d] = (uchar)q;
        return;
    }
    __global uchar *b = row + (d >> 1);
    *b = (d & 1) ? (uchar)((*b & 0x0fu) | (q << 4)) : (uchar)((*b & 0xf0u) | q);
}

inline uint quantize_value(float x, float scale, float zero, int qmax)
{
    if (scale == 0.0f) return 0u;
    float q = rint(div_rn(x - zero, scale));
    q = q < 0.0f ? 0.0f : q > (float)qmax ? (float)qmax : q;
    return (uint)q;
}

/* Stores zero = lo and scale = f16 at or above (hi - lo) / qmax at element at;
   returns them as f32. */
inline float2 group_params(__global half *scales, __global half *zeros, size_t at, float lo, float hi, int qmax)
{
    vstore_half_rte(lo, at, zeros);
    if (hi > lo) {
        const float x = div_rn(hi - lo, (float)qmax);
        vstore_half_rte(x, at, scales);
        if (vload_half(at, scales) < x) ((__global ushort *)scales)[at] += 1;
    } else {
        ((__global ushort *)scales)[at] = 0;
    }
    return (float2)(vload_half(at, scales), vload_half(at, zeros));
}

/* Keys: one work item per (KV head, key group, byte column): int4 columns hold
   two channels, so no two work items share a byte. */
__kernel void pikv_quant_keys(__global const uchar *src_chunk, uint src_off, __global uchar *dst_chunk,
                              uint dst_off, __global const uint *lay, __global float *err)
{
    __global const uint *S = lay, *Q = lay + LAYOUT_WORDS;
    const int ps = (int)S[L_PS], kvh = (int)S[L_KVH], hd = (int)S[L_HD];
    const int dtype = (int)Q[L_DTYPE], G = (int)Q[L_GROUP], kg = (int)Q[L_KG];
    const int qmax = dtype == DT_INT4 ? 15 : 255;
    const int per = dtype == DT_INT4 ? 2 : 1, ncol = (hd + per - 1) / per;
    const int gid = (int)get_global_id(0);
    if (gid >= kvh * kg * ncol) return;
    const int col = gid % ncol, tg = (gid / ncol) % kg, g = gid / (ncol * kg);
    page_ptr ks = src_chunk + src_off + S[L_K] + (size_t)g * S[L_HS];
    __global uchar *dst = dst_chunk + dst_off;
    __global uchar *kq = dst + Q[L_K] + (size_t)g * Q[L_HS];
    __global half *kscale = (__global half *)(dst + Q[L_KSC]), *kzero = (__global half *)(dst + Q[L_KZE]);
    const int t0 = tg * G, n = ps - t0 < G ? ps - t0 : G;
    float e2 = 0.0f, x2 = 0.0f, emax = 0.0f;
    for (int d = col * per; d < col * per + per && d < hd; d++) {
        float lo = INFINITY, hi = -INFINITY;
        for (int j = 0; j < n; j++) {
            const float x = vload_half((size_t)(t0 + j) * hd + d, (__global const half *)ks);
            lo = x < lo ? x : lo;
            hi = x > hi ? x : hi;
        }
        const size_t at = ((size_t)g * kg + (size_t)tg) * (size_t)hd + (size_t)d;
        const float2 sz = group_params(kscale, kzero, at, lo, hi, qmax);
        for (int j = 0; j < n; j++) {
            const float x = vload_half((size_t)(t0 + j) * hd + d, (__global const half *)ks);
            const uint qv = quantize_value(x, sz.x, sz.y, qmax);
            put_q(kq + (size_t)(t0 + j) * Q[L_ROW], dtype, d, qv);
            const float e = ((float)qv * sz.x + sz.y) - x;
            e2 += e * e;
            x2 += x * x;
            emax = fabs(e) > emax ? fabs(e) : emax;
        }
    }
    err[3 * (size_t)gid] = e2;
    err[3 * (size_t)gid + 1] = x2;
    err[3 * (size_t)gid + 2] = emax;
}

/* Values: one work item per (KV head, token): the whole row, all its groups. */
__kernel void pikv_quant_values(__global const uchar *src_chunk, uint src_off, __global uchar *dst_chunk,
                                uint dst_off, __global const uint *lay, __global float *err)
{
    __global const uint *S = lay, *Q = lay + LAYOUT_WORDS;
    const int ps = (int)S[L_PS], kvh = (int)S[L_KVH], hd = (int)S[L_HD];
    const int dtype = (int)Q[L_DTYPE], G = (int)Q[L_GROUP], vgs = (int)Q[L_VG];
    const int qmax = dtype == DT_INT4 ? 15 : 255;
    const int gid = (int)get_global_id(0);
    if (gid >= kvh * ps) return;
    const int t = gid % ps, g = gid / ps;
    __global const half *vs = (__global const half *)(src_chunk + src_off + S[L_V] + (size_t)g * S[L_HS]) +
                              (size_t)t * hd;
    __global uchar *dst = dst_chunk + dst_off;
    __global uchar *vq = dst + Q[L_V] + (size_t)g * Q[L_HS] + (size_t)t * Q[L_ROW];
    __global half *vscale = (__global half *)(dst + Q[L_VSC]), *vzero = (__global half *)(dst + Q[L_VZE]);
    float e2 = 0.0f, x2 = 0.0f, emax = 0.0f;
    for (int vg = 0; vg < vgs; vg++) {
        const int d0 = vg * G, n = hd - d0 < G ? hd - d0 : G;
        float lo = INFINITY, hi = -INFINITY;
        for (int j = 0; j < n; j++) {
            const float x = vload_half(d0 + j, vs);
            lo = x < lo ? x : lo;
            hi = x > hi ? x : hi;
        }
        const size_t at = ((size_t)g * ps + (size_t)t) * (size_t)vgs + (size_t)vg;
        const float2 sz = group_params(vscale, vzero, at, lo, hi, qmax);
        for (int j = 0; j < n; j++) {
            const float x = vload_half(d0 + j, vs);
            const uint qv = quantize_value(x, sz.x, sz.y, qmax);
            put_q(vq, dtype, d0 + j, qv);
            const float e = ((float)qv * sz.x + sz.y) - x;
            e2 += e * e;
            x2 += x * x;
            emax = fabs(e) > emax ? fabs(e) : emax;
        }
    }
    err[3 * (size_t)gid] = e2;
    err[3 * (size_t)gid + 1] = x2;
    err[3 * (size_t)gid + 2] = emax;
}
