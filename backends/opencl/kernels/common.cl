/* Shared helpers of the PiKV OpenCL kernels (OpenCL C 1.2, no extensions).
 *
 * Pages live in chunk buffers (one cl_mem per pool chunk); a kernel gets one
 * chunk as a byte pointer plus byte offsets of its pages. The page layout
 * (runtime/backend-impl.h, pikv_page_layout) comes as a row of LAYOUT_WORDS
 * uints in a small buffer: row 0 the open pool, row 1 the quantized pool.
 * f16 is storage only: vload_half / vstore_half_rte (core in 1.2), so no
 * cl_khr_fp16 is needed; rounding is to nearest even like runtime/f16.h.
 * No contraction anywhere: quantized pages must be bit-compatible with the CPU
 * backend (docs/compression.md). */
#pragma OPENCL FP_CONTRACT OFF

/* L_* field indices, LAYOUT_WORDS and DT_* come from backends/common/layout-words.h,
   embedded before this file. */

typedef __global const uchar *page_ptr;

/* Element d of an f32/f16 row starting at byte p. */
inline float load_open(page_ptr p, int dtype, int d)
{
    if (dtype == DT_F32) return ((__global const float *)p)[d];
    return vload_half(d, (__global const half *)p);
}

/* The quantized value of channel d of a packed row. */
inline uint load_q(page_ptr row, int dtype, int d)
{
    if (dtype == DT_INT8) return row[d];
    return (row[d >> 1] >> ((d & 1) * 4)) & 15u;
}

/* The layout fields the hot loops use, loaded once into private memory. */
typedef struct layout_t {
    int ps, kvh, hd, dtype, group, kg, vg;
    uint row, k, v, ksc, kze, vsc, vze, hs;
} layout_t;

inline layout_t get_layout(__global const uint *L)
{
    layout_t o;
    o.ps = (int)L[L_PS];
    o.kvh = (int)L[L_KVH];
    o.hd = (int)L[L_HD];
    o.dtype = (int)L[L_DTYPE];
    o.group = (int)L[L_GROUP];
    o.kg = (int)L[L_KG];
    o.vg = (int)L[L_VG];
    o.row = L[L_ROW];
    o.k = L[L_K];
    o.v = L[L_V];
    o.ksc = L[L_KSC];
    o.kze = L[L_KZE];
    o.vsc = L[L_VSC];
    o.vze = L[L_VZE];
    o.hs = L[L_HS];
    return o;
}

/* Key channel d of token r of KV head g, as f32 (dequantized for int pages). */
inline float load_key_l(page_ptr page, const layout_t L, int g, int r, int d)
{
    page_ptr row = page + L.k + (size_t)g * L.hs + (size_t)r * L.row;
    if (L.dtype < DT_INT8) return load_open(row, L.dtype, d);
    const size_t at = ((size_t)g * L.kg + (size_t)(r / L.group)) * L.hd + (size_t)d;
    const float s = vload_half(at, (__global const half *)(page + L.ksc));
    const float z = vload_half(at, (__global const half *)(page + L.kze));
    return (float)load_q(row, L.dtype, d) * s + z;
}

/* Value channel d of token t of KV head g, as f32. */
inline float load_value_l(page_ptr page, const layout_t L, int g, int t, int d)
{
    page_ptr row = page + L.v + (size_t)g * L.hs + (size_t)t * L.row;
    if (L.dtype < DT_INT8) return load_open(row, L.dtype, d);
    const size_t at = ((size_t)g * L.ps + (size_t)t) * L.vg + (size_t)(d / L.group);
    const float s = vload_half(at, (__global const half *)(page + L.vsc));
    const float z = vload_half(at, (__global const half *)(page + L.vze));
    return (float)load_q(row, L.dtype, d) * s + z;
}

inline float load_key(page_ptr page, __global const uint *L, int g, int r, int d)
{
    return load_key_l(page, get_layout(L), g, r, d);
}

inline float load_value(page_ptr page, __global const uint *L, int g, int t, int d)
{
    return load_value_l(page, get_layout(L), g, t, d);
}

/* Store x at element d of an f32/f16 row; returns the value stored (after rounding). */
inline float store_open(__global uchar *p, int dtype, int d, float x)
{
    if (dtype == DT_F32) {
        ((__global float *)p)[d] = x;
        return x;
    }
    vstore_half_rte(x, d, (__global half *)p);
    return vload_half(d, (__global const half *)p);
}

/* a / b correctly rounded (to nearest even) whatever the device's division
   accuracy: the quotient is corrected with exact fma residuals. */
inline float div_rn(float a, float b)
{
    float q = a / b;
    if (!isfinite(q) || q == 0.0f) return q;
    for (int it = 0; it < 4; it++) {
        const float up = nextafter(q, INFINITY), dn = nextafter(q, -INFINITY);
        const float r = fabs(fma(-q, b, a)), ru = fabs(fma(-up, b, a)), rd = fabs(fma(-dn, b, a));
        float best = q, rb = r;
        if (ru < rb || (ru == rb && (as_uint(up) & 1u) == 0u && (as_uint(best) & 1u))) { best = up; rb = ru; }
        if (rd < rb || (rd == rb && (as_uint(dn) & 1u) == 0u && (as_uint(best) & 1u))) { best = dn; rb = rd; }
        if (best == q) break;
        q = best;
    }
    return q;
}
