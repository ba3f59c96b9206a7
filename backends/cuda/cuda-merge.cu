/* The log-sum-exp merge of partial attention outputs (the OpenCL pikv_merge,
 * the CPU's cpu-merge.c), the search for the first non-finite float, and the
 * check that this binary holds code for the current device. */
#include "cuda-common.cuh"

#include <limits.h>

namespace {

constexpr int kThreads = 256;

/* Thread (row, d): M = max_p lse_p; out = sum_p exp(lse_p - M) o_p / sum_p
   exp(lse_p - M), each accumulator summed in part order with separate
   roundings; lse = M + log(sum) (written by d == 0). A row whose parts are all
   empty (lse -inf) gets zeros and -inf. */
__global__ void __launch_bounds__(kThreads) merge_kernel(int n_parts, int n_rows, int dim,
                                                         const float *__restrict__ part_out,
                                                         const float *__restrict__ part_lse, float *__restrict__ out,
                                                         float *__restrict__ lse)
{
    const long long gid = pikv_global_id();
    if (gid >= (long long)n_rows * dim) return;
    const int row = (int)(gid / dim), d = (int)(gid % dim);
    float m = -INFINITY;
    for (int p = 0; p < n_parts; p++) {
        const float l = part_lse[(size_t)p * n_rows + row];
        if (l > m) m = l;
    }
    if (m == -INFINITY) {
        out[gid] = 0.0f;
        if (lse && d == 0) lse[row] = -INFINITY;
        return;
    }
    float sum = 0.0f, a = 0.0f;
    for (int p = 0; p < n_parts; p++) {
        const float l = part_lse[(size_t)p * n_rows + row];
        if (l == -INFINITY) continue;
        const float w = expf(__fsub_rn(l, m));
        sum = __fadd_rn(sum, w);
        a = __fadd_rn(a, __fmul_rn(w, part_out[((size_t)p * n_rows + row) * dim + d]));
    }
    out[gid] = __fmul_rn(a, __fdiv_rn(1.0f, sum));
    if (lse && d == 0) lse[row] = __fadd_rn(m, logf(sum));
}

/* *first = INT64_MAX before the search. */
__global__ void nonfinite_init_kernel(long long *first)
{
    *first = LLONG_MAX;
}

/* Grid-stride: each thread's indices rise, so its first hit is its lowest;
   one atomicMin per thread that finds one. */
__global__ void __launch_bounds__(kThreads) nonfinite_kernel(const float *__restrict__ x, long long n,
                                                             float limit, long long *first)
{
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = pikv_global_id(); i < n; i += stride)
        if (!(fabsf(x[i]) <= limit)) { /* inf, NaN, or past the pages' range */
            atomicMin(first, i);
            return;
        }
}

} // namespace

cudaError_t pikv_cuda_merge(int32_t n_parts, int32_t n_rows, int32_t dim, const float *part_out_dev,
                            const float *part_lse_dev, float *out_dev, float *lse_dev, cudaStream_t stream)
{
    const long long threads = (long long)n_rows * dim;
    if (n_rows <= 0 || threads <= 0) return cudaSuccess;
    const unsigned int blocks = pikv_blocks(threads, kThreads);
    if (blocks == 0) return cudaErrorInvalidConfiguration;
    merge_kernel<<<blocks, kThreads, 0, stream>>>(n_parts > 0 ? n_parts : 0, n_rows, dim, part_out_dev, part_lse_dev,
                                                  out_dev, lse_dev);
    return cudaGetLastError();
}

cudaError_t pikv_cuda_find_out_of_range(const float *ptr_dev, int64_t n, float limit, long long *first_dev,
                                        cudaStream_t stream)
{
    nonfinite_init_kernel<<<1, 1, 0, stream>>>(first_dev);
    if (n > 0) {
        /* enough blocks to fill any current GPU; the grid stride covers the rest */
        const long long max_blocks = 8192, blocks = (n + kThreads - 1) / kThreads;
        nonfinite_kernel<<<(unsigned int)(blocks < max_blocks ? blocks : max_blocks), kThreads, 0, stream>>>(
            ptr_dev, (long long)n, limit, first_dev);
    }
    return cudaGetLastError();
}

cudaError_t pikv_cuda_kernels_loadable(void)
{
    cudaFuncAttributes a;
    return cudaFuncGetAttributes(&a, merge_kernel);
}
