/* Query-aware selection: Quest page scores (the OpenCL select.cl, bit for bit
 * the CPU's cpu-select.c) and the budgeted top-k (the order of the Vulkan
 * topk.comp: decreasing score, ties by lower index, NaN below everything). */
#include "cuda-common.cuh"

#include <limits.h>

namespace {

/* ---- Quest scores ------------------------------------------------------------ */

constexpr int kScoreThreads = 128;

/* Thread (c, g): the largest over the G query heads of KV head g of the upper
   bound sum_d max(q_d * kmin_d, q_d * kmax_d), summed in channel order with
   separate roundings, as the CPU does. */
__global__ void __launch_bounds__(kScoreThreads) score_kernel(const pikv_cuda_layout L, const pikv_cuda_layout Q,
                                                              const pikv_cuda_candidate *__restrict__ cand, int n,
                                                              const float *__restrict__ q, int n_q_heads,
                                                              float *__restrict__ scores)
{
    const int kvh = L.kvh, hd = L.hd, G = n_q_heads / kvh;
    const long long gid = pikv_global_id();
    if (gid >= (long long)n * kvh) return;
    const int g = (int)(gid % kvh);
    const long long c = gid / kvh;
    const pikv_cuda_candidate cd = cand[c];
    const unsigned char *page = pikv_page(cd.page);
    const uint32_t kmin_off = cd.quant ? Q.kmin : L.kmin, kmax_off = cd.quant ? Q.kmax : L.kmax;
    const float *lo = (const float *)(page + kmin_off) + (size_t)g * hd;
    const float *hi = (const float *)(page + kmax_off) + (size_t)g * hd;
    const float *qq = q + (size_t)cd.query * (size_t)n_q_heads * (size_t)hd;
    float best = -INFINITY;
    for (int h = 0; h < G; h++) {
        const float *qh = qq + ((size_t)g * G + (size_t)h) * (size_t)hd;
        float bound = 0.0f;
        for (int d = 0; d < hd; d++) {
            const float x = __fmul_rn(qh[d], lo[d]), y = __fmul_rn(qh[d], hi[d]);
            bound = __fadd_rn(bound, x > y ? x : y);
        }
        best = bound > best ? bound : best;
    }
    scores[gid] = best; /* = c * kvh + g */
}

/* ---- budgeted top-k ------------------------------------------------------------ */

constexpr int kTopkThreads = 256;
constexpr int kTopkChunk = 4096; /* sorted entries held in shared memory per pass */
constexpr int kTopkTile = 1024;  /* order keys staged per tile of the rank loop */

/* An int whose order is the scores' (topk.comp's order_key): NaN below
   everything, -0 == +0. */
__device__ __forceinline__ int order_key(float x)
{
    const unsigned int u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return INT_MIN;
    return (u & 0x80000000u) ? -(int)(u & 0x7fffffffu) : (int)u;
}

/* One block per list. The rank of entry i is #{j : key_j > key_i, or key_j ==
   key_i and j < i}: a permutation of 0 .. n-1 in the order of decreasing score,
   ties by lower index. Ranks are computed in parallel against tiles of keys in
   shared memory; the entries of ranks [c0, c0 + kTopkChunk) and their tokens go
   to shared memory, where thread 0 walks them keeping each one whose tokens fit
   what is left of the budget. A list longer than a chunk takes several passes
   (ranks recomputed each pass): O(n^2) per pass, like topk.comp. */
__global__ void __launch_bounds__(kTopkThreads) topk_kernel(const int32_t *__restrict__ indptr,
                                                            const float *__restrict__ scores,
                                                            const int32_t *__restrict__ tokens,
                                                            const int64_t *__restrict__ budget,
                                                            uint8_t *__restrict__ keep)
{
    __shared__ int sorted_entry[kTopkChunk];
    __shared__ int sorted_tokens[kTopkChunk];
    __shared__ int tile[kTopkTile];
    const int l = blockIdx.x, tid = threadIdx.x;
    const int b = indptr[l], n = indptr[l + 1] - b; /* the same in the whole block */
    if (n <= 0) return;
    long long left = (long long)budget[l]; /* used by thread 0 */
    for (int c0 = 0; c0 < n; c0 += kTopkChunk) {
        const int c_len = n - c0 < kTopkChunk ? n - c0 : kTopkChunk;
        for (int base = 0; base < n; base += kTopkThreads) {
            const int i = base + tid; /* relative to b */
            const bool valid = i < n;
            const int s = valid ? order_key(scores[b + i]) : 0;
            int rank = 0;
            for (int t0 = 0; t0 < n; t0 += kTopkTile) {
                const int t_len = n - t0 < kTopkTile ? n - t0 : kTopkTile;
                __syncthreads(); /* the previous tile is no longer read */
                for (int k = tid; k < t_len; k += kTopkThreads) tile[k] = order_key(scores[b + t0 + k]);
                __syncthreads();
                if (valid) {
                    /* keys before entry i count on ties, from i on they do not */
                    const int split = i - t0 < 0 ? 0 : i - t0 < t_len ? i - t0 : t_len;
                    for (int k = 0; k < split; k++) rank += tile[k] >= s ? 1 : 0;
                    for (int k = split; k < t_len; k++) rank += tile[k] > s ? 1 : 0;
                }
            }
            if (valid && rank >= c0 && rank - c0 < c_len) {
                sorted_entry[rank - c0] = b + i;
                sorted_tokens[rank - c0] = tokens[b + i];
            }
        }
        __syncthreads(); /* the chunk is complete */
        if (tid == 0)
            for (int r = 0; r < c_len; r++) {
                const int tok = sorted_tokens[r];
                const bool fits = tok <= left;
                keep[sorted_entry[r]] = fits ? 1 : 0;
                if (fits) left -= tok;
            }
        __syncthreads(); /* the next pass overwrites the chunk */
        if (n - c0 <= kTopkChunk) break; /* c0 + kTopkChunk would pass n (and could overflow) */
    }
}

} // namespace

cudaError_t pikv_cuda_score(const pikv_cuda_layout *L, const pikv_cuda_layout *Q, const pikv_cuda_candidate *cand_dev,
                            int32_t n, const float *q_dev, int32_t n_q_heads, float *scores_dev,
                            cudaStream_t stream)
{
    const long long threads = (long long)n * L->kvh;
    if (n <= 0 || threads <= 0) return cudaSuccess;
    const unsigned int blocks = pikv_blocks(threads, kScoreThreads);
    if (blocks == 0) return cudaErrorInvalidConfiguration;
    score_kernel<<<blocks, kScoreThreads, 0, stream>>>(*L, Q ? *Q : *L, cand_dev, n, q_dev, n_q_heads, scores_dev);
    return cudaGetLastError();
}

cudaError_t pikv_cuda_topk(int32_t n_lists, const int32_t *indptr_dev, const float *scores_dev,
                           const int32_t *tokens_dev, const int64_t *budget_dev, uint8_t *keep_dev,
                           cudaStream_t stream)
{
    if (n_lists <= 0) return cudaSuccess;
    topk_kernel<<<(unsigned int)n_lists, kTopkThreads, 0, stream>>>(indptr_dev, scores_dev, tokens_dev, budget_dev,
                                                                    keep_dev);
    return cudaGetLastError();
}
