/* The cuBLAS dense decode-attention baseline (bench/baseline_cublas.h): two
 * strided-batched GEMMs around a softmax kernel, the way an engine without a
 * paged KV cache computes decode attention. Per (sequence, KV head) the group of
 * G query heads sharing that head is one small GEMM (n = G), so GQA reads K and
 * V once per group, as PiKV's kernels do.
 *
 * Column-major view (cuBLAS): K of one (sequence, KV head) is [context][head_dim]
 * row-major, i.e. a head_dim x context matrix with ld = head_dim; the G queries
 * are head_dim x G; scores = K^T q is context x G, so the scores of query head c
 * (c = (b * n_kv_heads + g) * G + j) are the contiguous row S[c][0..context).
 * out = V p is head_dim x G: out[c][0..head_dim). */
#include "baseline_cublas.h"

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>

namespace {

constexpr int kThreads = 256;

/* Uniform values in [-1, 1) from a hash of the index (no cuRAND to link). */
__global__ void fill_random(__half *x, uint64_t n, uint64_t seed)
{
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += stride) {
        uint64_t z = (i + seed) * 0x9e3779b97f4a7c15ull; /* splitmix64's finalizer */
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
        z ^= z >> 31;
        x[i] = __float2half((float)(z >> 40) * (2.0f / 16777216.0f) - 1.0f);
    }
}

/* op(a, b) over the block; every thread gets the result. */
template <bool Max>
__device__ float block_reduce(float v, float *shared)
{
    for (int o = 16; o > 0; o >>= 1) {
        const float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = Max ? fmaxf(v, w) : v + w;
    }
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    __syncthreads(); /* shared may still be read from the previous call */
    if (lane == 0) shared[warp] = v;
    __syncthreads();
    v = lane < kThreads / 32 ? shared[lane] : (Max ? -INFINITY : 0.0f);
    for (int o = 16; o > 0; o >>= 1) {
        const float w = __shfl_xor_sync(0xffffffffu, v, o);
        v = Max ? fmaxf(v, w) : v + w;
    }
    return v;
}

/* One block per query head: p = softmax(s) over its context scores, in f16 for the
   second GEMM. */
__global__ void __launch_bounds__(kThreads) softmax_rows(const float *__restrict__ s, __half *__restrict__ p,
                                                         int n)
{
    __shared__ float red[kThreads / 32];
    const float *row = s + (size_t)blockIdx.x * (size_t)n;
    __half *out = p + (size_t)blockIdx.x * (size_t)n;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n; i += kThreads) m = fmaxf(m, row[i]);
    m = block_reduce<true>(m, red);
    float sum = 0.0f;
    for (int i = threadIdx.x; i < n; i += kThreads) sum += __expf(row[i] - m);
    sum = block_reduce<false>(sum, red);
    const float inv = 1.0f / sum;
    for (int i = threadIdx.x; i < n; i += kThreads) out[i] = __float2half(__expf(row[i] - m) * inv);
}

void set_err(char *err, size_t len, const char *fmt, ...)
{
    if (!err || len == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, len, fmt, ap);
    va_end(ap);
}

} // namespace

#define CU_TRY(expr)                                                                                       \
    do {                                                                                                   \
        const cudaError_t e_ = (expr);                                                                     \
        if (e_ != cudaSuccess) {                                                                           \
            set_err(err, err_len, "cublas baseline: %s: %s", #expr, cudaGetErrorString(e_));               \
            rc = 1;                                                                                        \
            goto done;                                                                                     \
        }                                                                                                  \
    } while (0)
#define BLAS_TRY(expr)                                                                                     \
    do {                                                                                                   \
        const cublasStatus_t e_ = (expr);                                                                  \
        if (e_ != CUBLAS_STATUS_SUCCESS) {                                                                 \
            set_err(err, err_len, "cublas baseline: %s: %s (%d)", #expr, cublasGetStatusString(e_), (int)e_); \
            rc = 1;                                                                                        \
            goto done;                                                                                     \
        }                                                                                                  \
    } while (0)

extern "C" int pikv_bench_cublas_attention(int32_t batch, int32_t n_q_heads, int32_t n_kv_heads, int32_t head_dim,
                                           int64_t context, int32_t iters, double *best_s, char *err,
                                           size_t err_len)
{
    if (err && err_len) err[0] = 0;
    if (batch < 1 || n_kv_heads < 1 || n_q_heads < n_kv_heads || n_q_heads % n_kv_heads || head_dim < 1 ||
        context < 1 || context > INT_MAX || iters < 1 || !best_s) {
        set_err(err, err_len, "cublas baseline: bad shape (batch %d, q heads %d, kv heads %d, head_dim %d, "
                "context %lld, iters %d%s)", (int)batch, (int)n_q_heads, (int)n_kv_heads, (int)head_dim,
                (long long)context, (int)iters, best_s ? "" : ", best_s NULL");
        return 2;
    }
    int n_dev = 0;
    if (cudaGetDeviceCount(&n_dev) != cudaSuccess || n_dev < 1) {
        cudaGetLastError(); /* clear "no device" / "no driver" */
        return 77;
    }
    int rc = 0, prev = 0;
    const bool have_prev = cudaGetDevice(&prev) == cudaSuccess;
    const int n = (int)context, G = n_q_heads / n_kv_heads, D = head_dim;
    const long long units = (long long)batch * n_kv_heads; /* GEMMs per call */
    const size_t kv_elems = (size_t)units * (size_t)n * (size_t)D;
    const size_t q_rows = (size_t)batch * (size_t)n_q_heads;
    const float scale = 1.0f / sqrtf((float)D), one = 1.0f, zero = 0.0f;
    __half *k = NULL, *v = NULL, *q = NULL, *p = NULL;
    float *s = NULL, *out = NULL;
    cublasHandle_t blas = NULL;
    cudaStream_t stream = NULL;
    cudaEvent_t t0 = NULL, t1 = NULL;
    double best = INFINITY;
    if (units > INT_MAX) {
        set_err(err, err_len, "cublas baseline: %lld GEMMs per batched call are past cuBLAS's int", units);
        return 2;
    }
    CU_TRY(cudaSetDevice(0));
    CU_TRY(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CU_TRY(cudaEventCreate(&t0));
    CU_TRY(cudaEventCreate(&t1));
    {
        const cudaError_t e = cudaMalloc((void **)&k, kv_elems * sizeof(__half));
        if (e != cudaSuccess) {
            set_err(err, err_len, "cublas baseline: K and V of %zu bytes each: %s", kv_elems * sizeof(__half),
                    cudaGetErrorString(e));
            rc = 1;
            goto done;
        }
    }
    CU_TRY(cudaMalloc((void **)&v, kv_elems * sizeof(__half)));
    CU_TRY(cudaMalloc((void **)&q, q_rows * (size_t)D * sizeof(__half)));
    CU_TRY(cudaMalloc((void **)&s, q_rows * (size_t)n * sizeof(float)));
    CU_TRY(cudaMalloc((void **)&p, q_rows * (size_t)n * sizeof(__half)));
    CU_TRY(cudaMalloc((void **)&out, q_rows * (size_t)D * sizeof(float)));
    fill_random<<<1024, kThreads, 0, stream>>>(k, kv_elems, 1);
    fill_random<<<1024, kThreads, 0, stream>>>(v, kv_elems, 2 * (uint64_t)kv_elems + 7);
    fill_random<<<64, kThreads, 0, stream>>>(q, q_rows * (size_t)D, 4 * (uint64_t)kv_elems + 11);
    CU_TRY(cudaGetLastError());
    BLAS_TRY(cublasCreate(&blas));
    BLAS_TRY(cublasSetStream(blas, stream));
    for (int it = -1; it < iters; it++) { /* it -1: warm-up (cuBLAS heuristics, first-touch) */
        CU_TRY(cudaEventRecord(t0, stream));
        /* S (n x G per unit, ld n) = K^T (n x D) q (D x G), scaled */
        BLAS_TRY(cublasGemmStridedBatchedEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, n, G, D, &scale, k, CUDA_R_16F, D,
                                            (long long)n * D, q, CUDA_R_16F, D, (long long)G * D, &zero, s,
                                            CUDA_R_32F, n, (long long)n * G, (int)units, CUBLAS_COMPUTE_32F,
                                            CUBLAS_GEMM_DEFAULT));
        softmax_rows<<<(unsigned)q_rows, kThreads, 0, stream>>>(s, p, n);
        CU_TRY(cudaGetLastError());
        /* out (D x G per unit, ld D) = V (D x n) p (n x G) */
        BLAS_TRY(cublasGemmStridedBatchedEx(blas, CUBLAS_OP_N, CUBLAS_OP_N, D, G, n, &one, v, CUDA_R_16F, D,
                                            (long long)n * D, p, CUDA_R_16F, n, (long long)n * G, &zero, out,
                                            CUDA_R_32F, D, (long long)D * G, (int)units, CUBLAS_COMPUTE_32F,
                                            CUBLAS_GEMM_DEFAULT));
        CU_TRY(cudaEventRecord(t1, stream));
        CU_TRY(cudaEventSynchronize(t1));
        float ms = 0.0f;
        CU_TRY(cudaEventElapsedTime(&ms, t0, t1));
        if (it >= 0 && ms * 1e-3 < best) best = ms * 1e-3;
    }
    {
        /* a cheap sanity check: softmax rows are probabilities, so every output is a
           convex combination of values in [-1, 1] */
        float o[8];
        const size_t m = q_rows * (size_t)D < 8 ? q_rows * (size_t)D : 8;
        CU_TRY(cudaMemcpy(o, out, m * sizeof(float), cudaMemcpyDeviceToHost));
        for (size_t i = 0; i < m; i++)
            if (!(fabsf(o[i]) <= 1.001f)) {
                set_err(err, err_len, "cublas baseline: output %zu is %g, outside [-1, 1]", i, (double)o[i]);
                rc = 1;
                goto done;
            }
    }
    *best_s = best;
done:
    if (blas) cublasDestroy(blas);
    if (stream) cudaStreamSynchronize(stream);
    cudaFree(k);
    cudaFree(v);
    cudaFree(q);
    cudaFree(s);
    cudaFree(p);
    cudaFree(out);
    if (t0) cudaEventDestroy(t0);
    if (t1) cudaEventDestroy(t1);
    if (stream) cudaStreamDestroy(stream);
    if (rc) cudaGetLastError(); /* leave no error behind for the caller's next call */
    if (have_prev) cudaSetDevice(prev);
    return rc;
}
