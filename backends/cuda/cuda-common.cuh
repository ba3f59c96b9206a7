/* Device helpers shared by the PiKV CUDA kernels: f16 storage, page layout
 * accessors and the loads of quantized keys and values. The arithmetic is the
 * CPU backend's (backends/cpu/cpu-quant.c, cpu-append.c) written with explicit
 * round-to-nearest intrinsics, so pages and dequantized values are bit for bit
 * the CPU's whatever the contraction flags (--fmad) of the including file.
 *
 * A page is addressed by its device address (chunk base + offset, resolved by
 * the host); the layout fields are byte offsets inside it (cuda-kernels.h). */
#ifndef PIKV_CUDA_COMMON_CUH
#define PIKV_CUDA_COMMON_CUH

#include <cuda_fp16.h>
#include <stddef.h>
#include <stdint.h>

#include "cuda-kernels.h"

/* pikv_dtype codes, as in backends/common/layout-words.h */
#define PIKV_CU_F32 0
#define PIKV_CU_F16 1
#define PIKV_CU_INT8 2
#define PIKV_CU_INT4 3

/* ---- f16 storage ------------------------------------------------------------ */

/* f32 -> f16 bits, round to nearest even (runtime/f16.h). A NaN keeps its sign
   and top payload bits and is made quiet, as the CPU's converters do (the
   hardware would return a canonical NaN). */
static __device__ __forceinline__ unsigned short pikv_f32_to_f16_bits(float x)
{
    const unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (unsigned short)(((u >> 16) & 0x8000u) | 0x7e00u | ((u >> 13) & 0x3ffu));
    return __half_as_ushort(__float2half_rn(x));
}

static __device__ __forceinline__ float pikv_f16_bits_to_f32(unsigned short h)
{
    return __half2float(__ushort_as_half(h));
}

/* Element d of an f16 array at p. */
static __device__ __forceinline__ float pikv_load_f16(const void *p, size_t d)
{
    return pikv_f16_bits_to_f32(((const unsigned short *)p)[d]);
}

/* Element d of an f32/f16 row starting at p. */
static __device__ __forceinline__ float pikv_load_open(const unsigned char *row, int dtype, int d)
{
    if (dtype == PIKV_CU_F32) return ((const float *)row)[d];
    return pikv_load_f16(row, (size_t)d);
}

/* Stores x at element d of an f32/f16 row; returns the value stored (after
   rounding), which is what the Quest bounds must cover. */
static __device__ __forceinline__ float pikv_store_open(unsigned char *row, int dtype, int d, float x)
{
    if (dtype == PIKV_CU_F32) {
        ((float *)row)[d] = x;
        return x;
    }
    const unsigned short h = pikv_f32_to_f16_bits(x);
    ((unsigned short *)row)[d] = h;
    return pikv_f16_bits_to_f32(h);
}

/* ---- layout accessors ---------------------------------------------------------- */

static __device__ __forceinline__ unsigned char *pikv_page(uint64_t addr)
{
    return (unsigned char *)(uintptr_t)addr;
}

/* Row r of KV head g of K (or V), as bytes. */
static __device__ __forceinline__ const unsigned char *pikv_key_row(const unsigned char *page,
                                                                    const pikv_cuda_layout &L, int g, int r)
{
    return page + L.k + (size_t)g * L.hs + (size_t)r * L.row;
}

static __device__ __forceinline__ const unsigned char *pikv_value_row(const unsigned char *page,
                                                                      const pikv_cuda_layout &L, int g, int t)
{
    return page + L.v + (size_t)g * L.hs + (size_t)t * L.row;
}

/* ---- quantized pages ------------------------------------------------------------- */

/* The quantized code of channel d of a packed row: int8 one byte per channel;
   int4 channel 2j in the low, 2j+1 in the high nibble of byte j. */
static __device__ __forceinline__ unsigned int pikv_load_q(const unsigned char *row, int dtype, int d)
{
    if (dtype == PIKV_CU_INT8) return row[d];
    return (row[d >> 1] >> ((d & 1) * 4)) & 15u;
}

/* q * scale + zero, two roundings (the CPU is built without contraction). */
static __device__ __forceinline__ float pikv_dequant(unsigned int q, float scale, float zero)
{
    return __fadd_rn(__fmul_rn((float)q, scale), zero);
}

/* Key channel d of token r of KV head g as f32: keys are quantized per channel
   over groups of `group` tokens (scales [kvh][kg][hd]). */
static __device__ __forceinline__ float pikv_load_key(const unsigned char *page, const pikv_cuda_layout &L, int g,
                                                      int r, int d)
{
    const unsigned char *row = pikv_key_row(page, L, g, r);
    if (L.dtype < PIKV_CU_INT8) return pikv_load_open(row, L.dtype, d);
    const size_t at = ((size_t)g * (size_t)L.kg + (size_t)(r / L.group)) * (size_t)L.hd + (size_t)d;
    return pikv_dequant(pikv_load_q(row, L.dtype, d), pikv_load_f16(page + L.ksc, at),
                        pikv_load_f16(page + L.kze, at));
}

/* Value channel d of token t of KV head g as f32: values are quantized per token
   over groups of `group` channels (scales [kvh][ps][vg]). */
static __device__ __forceinline__ float pikv_load_value(const unsigned char *page, const pikv_cuda_layout &L, int g,
                                                        int t, int d)
{
    const unsigned char *row = pikv_value_row(page, L, g, t);
    if (L.dtype < PIKV_CU_INT8) return pikv_load_open(row, L.dtype, d);
    const size_t at = ((size_t)g * (size_t)L.ps + (size_t)t) * (size_t)L.vg + (size_t)(d / L.group);
    return pikv_dequant(pikv_load_q(row, L.dtype, d), pikv_load_f16(page + L.vsc, at),
                        pikv_load_f16(page + L.vze, at));
}

/* ---- launch helpers ----------------------------------------------------------------- */

/* Global thread index of a 1-D launch, 64-bit (grids may pass 2^31 threads). */
static __device__ __forceinline__ long long pikv_global_id(void)
{
    return (long long)blockIdx.x * (long long)blockDim.x + (long long)threadIdx.x;
}

/* The blocks of `threads` threads covering n > 0 items, or 0 when a 1-D grid
   cannot hold them (more than 2^31 - 1 blocks): the launcher then fails with
   cudaErrorInvalidConfiguration rather than cover part of the work. */
static inline unsigned int pikv_blocks(long long n, int threads)
{
    const long long blocks = (n + threads - 1) / threads;
    return blocks > 0x7fffffffLL ? 0u : (unsigned int)blocks;
}

#endif /* PIKV_CUDA_COMMON_CUH */
