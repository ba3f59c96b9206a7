/* Append and page copy (the OpenCL append.cl, bit for bit the CPU backend's
 * cpu-append.c). One thread per (write, KV head, channel) walks the write's
 * rows: stores are coalesced across channels and each thread owns the Quest
 * bounds of its channel, so no two threads touch the same bytes. */
#include "cuda-common.cuh"

namespace {

constexpr int kThreads = 256;

/* Rows [row0, row0 + n_rows) of each write's page get the source tokens
   src_index[src_begin ..]: keys and values stored in the page dtype, the key
   bounds set from row 0 on and widened otherwise (over the stored values). */
__global__ void __launch_bounds__(kThreads) append_kernel(const pikv_cuda_layout L,
                                                          const pikv_cuda_write *__restrict__ writes,
                                                          int n_writes, const int32_t *__restrict__ src_index,
                                                          const float *__restrict__ k, const float *__restrict__ v)
{
    const int kvh = L.kvh, hd = L.hd, dtype = L.dtype;
    const long long per_write = (long long)kvh * hd;
    const long long gid = pikv_global_id();
    const long long it = gid / per_write;
    if (it >= n_writes) return;
    const int rem = (int)(gid - it * per_write), d = rem % hd, g = rem / hd;
    const pikv_cuda_write w = writes[it];
    unsigned char *page = pikv_page(w.page);
    unsigned char *kh = page + L.k + (size_t)g * L.hs;
    unsigned char *vh = page + L.v + (size_t)g * L.hs;
    float *kmin = (float *)(page + L.kmin) + (size_t)g * hd;
    float *kmax = (float *)(page + L.kmax) + (size_t)g * hd;
    float lo = w.row0 == 0 ? 0.0f : kmin[d], hi = w.row0 == 0 ? 0.0f : kmax[d];
    for (int r = 0; r < w.n_rows; r++) {
        const size_t src = (size_t)src_index[w.src_begin + r];
        const size_t off = (src * (size_t)kvh + (size_t)g) * (size_t)hd + (size_t)d;
        const size_t row = (size_t)(w.row0 + r) * L.row;
        const float s = pikv_store_open(kh + row, dtype, d, k[off]);
        pikv_store_open(vh + row, dtype, d, v[off]);
        if (w.row0 + r == 0) {
            lo = s;
            hi = s;
        } else { /* the CPU's widen_bounds, comparison for comparison */
            lo = s < lo ? s : lo;
            hi = s > hi ? s : hi;
        }
    }
    if (w.n_rows > 0) {
        kmin[d] = lo;
        kmax[d] = hi;
    }
}

/* The CPU's clamp_f16_range (a NaN stays NaN). */
__device__ __forceinline__ float clamp_f16_range(float x)
{
    return x > 65504.0f ? 65504.0f : x < -65504.0f ? -65504.0f : x;
}

/* The first n_rows rows of page src (layout S) into the open page dst (layout
   D), one thread per (KV head, channel): open rows copied bit for bit,
   quantized rows dequantized, clamped and stored in D's dtype; the key bounds
   recomputed over the rows as stored. src == dst rewrites each element with
   its own bits (the thread reads it before it writes it). */
__global__ void __launch_bounds__(kThreads) page_copy_kernel(const pikv_cuda_layout D, const pikv_cuda_layout S,
                                                             uint64_t src_addr, uint64_t dst_addr, int n_rows)
{
    const int kvh = D.kvh, hd = D.hd, dtype = D.dtype;
    const long long gid = pikv_global_id();
    if (gid >= (long long)kvh * hd) return;
    const int d = (int)(gid % hd), g = (int)(gid / hd);
    const unsigned char *src = pikv_page(src_addr);
    unsigned char *dst = pikv_page(dst_addr);
    unsigned char *kh = dst + D.k + (size_t)g * D.hs;
    unsigned char *vh = dst + D.v + (size_t)g * D.hs;
    const unsigned char *skh = src + S.k + (size_t)g * S.hs;
    const unsigned char *svh = src + S.v + (size_t)g * S.hs;
    const bool quant = S.dtype >= PIKV_CU_INT8;
    float lo = 0.0f, hi = 0.0f;
    for (int r = 0; r < n_rows; r++) {
        const size_t row = (size_t)r * D.row, srow = (size_t)r * S.row;
        float s;
        if (quant) { /* a dequantized value may pass the f16 range by part of a step */
            s = pikv_store_open(kh + row, dtype, d, clamp_f16_range(pikv_load_key(src, S, g, r, d)));
            pikv_store_open(vh + row, dtype, d, clamp_f16_range(pikv_load_value(src, S, g, r, d)));
        } else if (dtype == PIKV_CU_F32) {
            const unsigned int kb = ((const unsigned int *)(skh + srow))[d];
            ((unsigned int *)(kh + row))[d] = kb;
            ((unsigned int *)(vh + row))[d] = ((const unsigned int *)(svh + srow))[d];
            s = __uint_as_float(kb);
        } else {
            const unsigned short kb = ((const unsigned short *)(skh + srow))[d];
            ((unsigned short *)(kh + row))[d] = kb;
            ((unsigned short *)(vh + row))[d] = ((const unsigned short *)(svh + srow))[d];
            s = pikv_f16_bits_to_f32(kb);
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
        ((float *)(dst + D.kmin))[(size_t)g * hd + d] = lo;
        ((float *)(dst + D.kmax))[(size_t)g * hd + d] = hi;
    }
}

} // namespace

cudaError_t pikv_cuda_append(const pikv_cuda_layout *L, const pikv_cuda_write *writes_dev, int32_t n_writes,
                             const int32_t *src_index_dev, const float *k_dev, const float *v_dev,
                             cudaStream_t stream)
{
    const long long threads = (long long)n_writes * L->kvh * L->hd;
    if (n_writes <= 0 || threads <= 0) return cudaSuccess;
    const unsigned int blocks = pikv_blocks(threads, kThreads);
    if (blocks == 0) return cudaErrorInvalidConfiguration;
    append_kernel<<<blocks, kThreads, 0, stream>>>(*L, writes_dev, n_writes, src_index_dev, k_dev, v_dev);
    return cudaGetLastError();
}

cudaError_t pikv_cuda_page_copy(const pikv_cuda_layout *D, const pikv_cuda_layout *S, uint64_t src, uint64_t dst,
                                int32_t n_rows, cudaStream_t stream)
{
    const long long threads = (long long)D->kvh * D->hd;
    if (n_rows <= 0 || threads <= 0) return cudaSuccess; /* nothing copied, bounds untouched */
    const unsigned int blocks = pikv_blocks(threads, kThreads);
    if (blocks == 0) return cudaErrorInvalidConfiguration;
    page_copy_kernel<<<blocks, kThreads, 0, stream>>>(*D, *S, src, dst, n_rows);
    return cudaGetLastError();
}
