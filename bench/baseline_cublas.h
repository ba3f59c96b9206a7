/* The cuBLAS dense decode-attention baseline of the benchmarks (bench/baseline_cublas.cu):
 * what a plain GEMM-based implementation achieves on the same shape, with no paging,
 * selection or compression. Built when the CUDA backend is (the pikv_bench_cublas
 * library, whose consumers see PIKV_BENCH_HAVE_CUBLAS=1). */
#ifndef PIKV_BENCH_BASELINE_CUBLAS_H
#define PIKV_BENCH_BASELINE_CUBLAS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Times `iters` decode attention calls on CUDA device 0 (after one untimed warm-up)
 * over contiguous f16 K and V [batch][n_kv_heads][context][head_dim] holding random
 * values, one f16 query token per sequence [batch][n_q_heads][head_dim]:
 *   scores = K q / sqrt(head_dim)   (cublasGemmStridedBatchedEx: per (sequence, KV head)
 *                                     a context x group GEMM, group = n_q_heads / n_kv_heads)
 *   p = softmax(scores)              (a kernel, one block per query head)
 *   out = V^T p                      (the same GEMM form, f32 output)
 * all on one stream; each call is timed with CUDA events around all three. *best_s
 * gets the fastest call. Returns 0 on success, 77 when there is no CUDA device
 * (not an error: skip the baseline), any other value with a message in err
 * (err_len bytes, NUL-terminated; err may be NULL) on failure. Never prints or exits;
 * everything it allocates is freed, and the caller's current CUDA device is kept. */
int pikv_bench_cublas_attention(int32_t batch, int32_t n_q_heads, int32_t n_kv_heads, int32_t head_dim,
                                int64_t context, int32_t iters, double *best_s, char *err, size_t err_len);

#ifdef __cplusplus
}
#endif

#endif /* PIKV_BENCH_BASELINE_CUBLAS_H */
