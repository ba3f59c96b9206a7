/* Quantize a full f16 page into an int8/int4 page (the OpenCL quant.cl, bit for
 * bit the CPU's cpu-quant.c, docs/compression.md): per group zero = min, scale
 * = (max - min) / qmax correctly rounded, then rounded UP to f16; q =
 * clamp(rint((x - zero) / scale)). Every operation is an explicit
 * round-to-nearest intrinsic: no contraction, no approximate division.
 *
 * The work split is OpenCL's, so no two threads share a byte and int4 nibbles
 * need no atomics: keys one thread per (KV head, key group, byte column),
 * values one thread per (KV head, token). Each thread writes its
 * reconstruction error {sum e^2, sum x^2, max |e|} for the host to add up. */
#include "cuda-common.cuh"

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ int qmax_of(int dtype) { return dtype == PIKV_CU_INT4 ? 15 : 255; }

/* Writes code q of channel d into a zero-filled packed row (the thread owns the
   byte: int4 keys handle both channels of a byte column in one thread). */
__device__ __forceinline__ void put_q(unsigned char *row, int dtype, int d, unsigned int q)
{
    if (dtype == PIKV_CU_INT8) {
        row[d] = (unsigned char)q;
        return;
    }
    unsigned char *b = row + (d >> 1);
    *b = (d & 1) ? (unsigned char)((*b & 0x0fu) | (q << 4)) : (unsigned char)((*b & 0xf0u) | q);
}

__device__ __forceinline__ unsigned int quantize_value(float x, float scale, float zero, int qmax)
{
    if (scale == 0.0f) return 0u;
    float q = rintf(__fdiv_rn(__fsub_rn(x, zero), scale)); /* rint: to nearest even */
    q = q < 0.0f ? 0.0f : q > (float)qmax ? (float)qmax : q;
    return (unsigned int)q;
}

/* Stores zero = lo and scale = the f16 at or above (hi - lo) / qmax at element
   `at` of the f16 arrays; returns them as f32 (what dequantization reads). */
__device__ __forceinline__ float2 group_params(unsigned short *scales, unsigned short *zeros, size_t at, float lo,
                                               float hi, int qmax)
{
    const unsigned short z = pikv_f32_to_f16_bits(lo); /* lo is an f16 value: exact */
    unsigned short s = 0;
    if (hi > lo) {
        const float x = __fdiv_rn(__fsub_rn(hi, lo), (float)qmax);
        s = pikv_f32_to_f16_bits(x);
        if (pikv_f16_bits_to_f32(s) < x) s++; /* positive finite: the next f16 is larger */
    }
    zeros[at] = z;
    scales[at] = s;
    return make_float2(pikv_f16_bits_to_f32(s), pikv_f16_bits_to_f32(z));
}

/* Adds one value's reconstruction error to a thread's triple. */
__device__ __forceinline__ void add_error(float x, unsigned int q, float2 sz, float &e2, float &x2, float &emax)
{
    const float e = __fsub_rn(pikv_dequant(q, sz.x, sz.y), x);
    e2 = __fadd_rn(e2, __fmul_rn(e, e));
    x2 = __fadd_rn(x2, __fmul_rn(x, x));
    emax = fabsf(e) > emax ? fabsf(e) : emax;
}

/* Keys: thread (g, tg, col) quantizes channels col*per .. of tokens
   [tg*group, ..) of KV head g, group (tg, d) at a time. */
__global__ void __launch_bounds__(kThreads) quant_keys_kernel(const pikv_cuda_layout S, const pikv_cuda_layout Q,
                                                              const unsigned char *__restrict__ src,
                                                              unsigned char *__restrict__ dst, float *__restrict__ err)
{
    const int ps = S.ps, kvh = S.kvh, hd = S.hd;
    const int dtype = Q.dtype, G = Q.group, kg = Q.kg, qmax = qmax_of(dtype);
    const int per = dtype == PIKV_CU_INT4 ? 2 : 1, ncol = (hd + per - 1) / per;
    const long long gid = pikv_global_id();
    if (gid >= (long long)kvh * kg * ncol) return;
    const int col = (int)(gid % ncol), tg = (int)((gid / ncol) % kg), g = (int)(gid / ((long long)ncol * kg));
    const unsigned char *ks = src + S.k + (size_t)g * S.hs;
    unsigned char *kq = dst + Q.k + (size_t)g * Q.hs;
    unsigned short *kscale = (unsigned short *)(dst + Q.ksc), *kzero = (unsigned short *)(dst + Q.kze);
    const int t0 = tg * G, n = ps - t0 < G ? ps - t0 : G;
    float e2 = 0.0f, x2 = 0.0f, emax = 0.0f;
    for (int d = col * per; d < col * per + per && d < hd; d++) {
        float lo = INFINITY, hi = -INFINITY;
        for (int j = 0; j < n; j++) {
            const float x = pikv_load_f16(ks + (size_t)(t0 + j) * S.row, (size_t)d);
            lo = x < lo ? x : lo;
            hi = x > hi ? x : hi;
        }
        const size_t at = ((size_t)g * kg + (size_t)tg) * (size_t)hd + (size_t)d;
        const float2 sz = group_params(kscale, kzero, at, lo, hi, qmax);
        for (int j = 0; j < n; j++) {
            const float x = pikv_load_f16(ks + (size_t)(t0 + j) * S.row, (size_t)d);
            const unsigned int q = quantize_value(x, sz.x, sz.y, qmax);
            put_q(kq + (size_t)(t0 + j) * Q.row, dtype, d, q);
            add_error(x, q, sz, e2, x2, emax);
        }
    }
    err[3 * gid] = e2;
    err[3 * gid + 1] = x2;
    err[3 * gid + 2] = emax;
}

/* Values: thread (g, t) quantizes token t's row of KV head g, all its groups
   of `group` channels. */
__global__ void __launch_bounds__(kThreads) quant_values_kernel(const pikv_cuda_layout S, const pikv_cuda_layout Q,
                                                                const unsigned char *__restrict__ src,
                                                                unsigned char *__restrict__ dst,
                                                                float *__restrict__ err)
{
    const int ps = S.ps, kvh = S.kvh, hd = S.hd;
    const int dtype = Q.dtype, G = Q.group, vgs = Q.vg, qmax = qmax_of(dtype);
    const long long gid = pikv_global_id();
    if (gid >= (long long)kvh * ps) return;
    const int t = (int)(gid % ps), g = (int)(gid / ps);
    const unsigned char *vs = src + S.v + (size_t)g * S.hs + (size_t)t * S.row;
    unsigned char *vq = dst + Q.v + (size_t)g * Q.hs + (size_t)t * Q.row;
    unsigned short *vscale = (unsigned short *)(dst + Q.vsc), *vzero = (unsigned short *)(dst + Q.vze);
    float e2 = 0.0f, x2 = 0.0f, emax = 0.0f;
    for (int vg = 0; vg < vgs; vg++) {
        const int d0 = vg * G, n = hd - d0 < G ? hd - d0 : G;
        float lo = INFINITY, hi = -INFINITY;
        for (int j = 0; j < n; j++) {
            const float x = pikv_load_f16(vs, (size_t)(d0 + j));
            lo = x < lo ? x : lo;
            hi = x > hi ? x : hi;
        }
        const size_t at = ((size_t)g * ps + (size_t)t) * (size_t)vgs + (size_t)vg;
        const float2 sz = group_params(vscale, vzero, at, lo, hi, qmax);
        for (int j = 0; j < n; j++) {
            const float x = pikv_load_f16(vs, (size_t)(d0 + j));
            const unsigned int q = quantize_value(x, sz.x, sz.y, qmax);
            put_q(vq, dtype, d0 + j, q);
            add_error(x, q, sz, e2, x2, emax);
        }
    }
    err[3 * gid] = e2;
    err[3 * gid + 1] = x2;
    err[3 * gid + 2] = emax;
}

} // namespace

void pikv_cuda_quantize_items(const pikv_cuda_layout *S, const pikv_cuda_layout *Q, int64_t *n_key_items,
                              int64_t *n_value_items)
{
    const int64_t per = Q->dtype == PIKV_CU_INT4 ? 2 : 1, ncol = (S->hd + per - 1) / per;
    *n_key_items = (int64_t)S->kvh * Q->kg * ncol;
    *n_value_items = (int64_t)S->kvh * S->ps;
}

cudaError_t pikv_cuda_quantize(const pikv_cuda_layout *S, const pikv_cuda_layout *Q, uint64_t src, uint64_t dst,
                               float *err_dev, cudaStream_t stream)
{
    int64_t n_keys = 0, n_values = 0;
    pikv_cuda_quantize_items(S, Q, &n_keys, &n_values);
    const unsigned int key_blocks = n_keys > 0 ? pikv_blocks(n_keys, kThreads) : 1;
    const unsigned int value_blocks = n_values > 0 ? pikv_blocks(n_values, kThreads) : 1;
    if (key_blocks == 0 || value_blocks == 0) return cudaErrorInvalidConfiguration;
    unsigned char *s = (unsigned char *)(uintptr_t)src, *q = (unsigned char *)(uintptr_t)dst;
    /* the kernels write into a zero-filled page (unused nibbles and padding stay 0) */
    cudaError_t e = cudaMemsetAsync(q, 0, Q->pb, stream);
    if (e != cudaSuccess) return e;
    /* Quest bounds: those of the f16 keys, computed before quantizing */
    const size_t bounds = (size_t)S->kvh * (size_t)S->hd * sizeof(float);
    if (bounds > 0) {
        e = cudaMemcpyAsync(q + Q->kmin, s + S->kmin, bounds, cudaMemcpyDeviceToDevice, stream);
        if (e != cudaSuccess) return e;
        e = cudaMemcpyAsync(q + Q->kmax, s + S->kmax, bounds, cudaMemcpyDeviceToDevice, stream);
        if (e != cudaSuccess) return e;
    }
    if (n_keys > 0)
        quant_keys_kernel<<<key_blocks, kThreads, 0, stream>>>(*S, *Q, s, q, err_dev);
    if (n_values > 0)
        quant_values_kernel<<<value_blocks, kThreads, 0, stream>>>(*S, *Q, s, q, err_dev + 3 * n_keys);
    return cudaGetLastError();
}
