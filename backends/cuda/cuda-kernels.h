/* The CUDA kernels as the host code sees them: plain-C launch functions
 * (defined in the .cu files, extern "C") and the records they read. Included by
 * the C host code and by the .cu files alike, so it uses only C and the CUDA
 * runtime's C header.
 *
 * Unlike OpenCL and Vulkan, CUDA kernels address device memory directly: the
 * host resolves every page slot to its device address (chunk base + offset),
 * so one launch covers pages of any number of chunks.
 *
 * Every launcher enqueues on `stream` and returns the launch status
 * (cudaGetLastError after the launch); cudaSuccess for empty work. Pointers
 * named *_dev are device memory. Sizes are checked by the host (cuda-ops.c)
 * before a launch. */
#ifndef PIKV_CUDA_KERNELS_H
#define PIKV_CUDA_KERNELS_H

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A page layout (runtime/backend-impl.h, pikv_page_layout) passed by value:
   byte offsets inside a page; row = bytes of one token row of one KV head; hs =
   bytes between KV heads inside K (and V); pb = page bytes. dtype: 0 f32, 1 f16,
   2 int8, 3 int4 (pikv_dtype). */
typedef struct pikv_cuda_layout {
    int32_t ps, kvh, hd, dtype, group, kg, vg;
    uint32_t row, k, v, kmin, kmax, ksc, kze, vsc, vze, hs, pb;
} pikv_cuda_layout;

/* ---- append and page copy (cuda-append.cu) --------------------------------- */

/* One write: rows [row0, row0 + n_rows) of the page at `page` get source tokens
   src_index[src_begin ..]. A page is in at most one write of a launch. */
typedef struct pikv_cuda_write {
    uint64_t page;
    int32_t row0, n_rows, src_begin, pad_;
} pikv_cuda_write;

/* k_dev, v_dev: [n_src][kvh][hd] f32. The stores round to nearest even (f16)
   and the Quest bounds (f32 min/max per KV head and channel) are set when
   row0 == 0, widened otherwise: bit for bit the CPU backend's pages. */
cudaError_t pikv_cuda_append(const pikv_cuda_layout *L, const pikv_cuda_write *writes_dev, int32_t n_writes,
                             const int32_t *src_index_dev, const float *k_dev, const float *v_dev,
                             cudaStream_t stream);

/* The first n_rows rows of page src (layout S: open, or quantized and then
   dequantized and clamped to the f16 range) into the open page dst (layout D),
   bounds recomputed over those rows. src == dst recomputes the bounds only. */
cudaError_t pikv_cuda_page_copy(const pikv_cuda_layout *D, const pikv_cuda_layout *S, uint64_t src, uint64_t dst,
                                int32_t n_rows, cudaStream_t stream);

/* ---- quantize (cuda-quant.cu) ---------------------------------------------- */

/* A full f16 page (layout S) into an int8/int4 page (layout Q): zero-fills dst,
   copies the Quest bounds, quantizes keys and values (docs/compression.md,
   bit for bit the CPU's). err_dev gets one {sum e^2, sum x^2, max |e|} triple
   per work item, the key items first: *n_key_items and *n_value_items say how
   many (pikv_cuda_quantize_items tells beforehand, to size err_dev). */
void pikv_cuda_quantize_items(const pikv_cuda_layout *S, const pikv_cuda_layout *Q, int64_t *n_key_items,
                              int64_t *n_value_items);
cudaError_t pikv_cuda_quantize(const pikv_cuda_layout *S, const pikv_cuda_layout *Q, uint64_t src, uint64_t dst,
                               float *err_dev, cudaStream_t stream);

/* ---- selection (cuda-select.cu) -------------------------------------------- */

/* A Quest candidate: its page, whether it is quantized (bounds at Q's offsets)
   and its query. scores_dev[c * kvh + g] for c in [0, n). */
typedef struct pikv_cuda_candidate {
    uint64_t page;
    int32_t query, quant;
} pikv_cuda_candidate;

cudaError_t pikv_cuda_score(const pikv_cuda_layout *L, const pikv_cuda_layout *Q, const pikv_cuda_candidate *cand_dev,
                            int32_t n, const float *q_dev, int32_t n_q_heads, float *scores_dev,
                            cudaStream_t stream);

/* Budgeted top-k of the lists indptr_dev[0 .. n_lists] (absolute entry indices):
   entries in order of decreasing score (ties: lower index; NaN below all), each
   kept when its tokens fit what is left of budget_dev[l]. keep_dev: 1 or 0. */
cudaError_t pikv_cuda_topk(int32_t n_lists, const int32_t *indptr_dev, const float *scores_dev,
                           const int32_t *tokens_dev, const int64_t *budget_dev, uint8_t *keep_dev,
                           cudaStream_t stream);

/* ---- merge and checks (cuda-merge.cu) -------------------------------------- */

/* Exact log-sum-exp merge of n_parts partials (backends/cpu/cpu-merge.c):
   part_out [n_parts][n_rows][dim], part_lse [n_parts][n_rows] -> out
   [n_rows][dim], lse [n_rows] (lse_dev may be NULL). */
cudaError_t pikv_cuda_merge(int32_t n_parts, int32_t n_rows, int32_t dim, const float *part_out_dev,
                            const float *part_lse_dev, float *out_dev, float *lse_dev, cudaStream_t stream);

/* *first_dev (which the launcher sets to INT64_MAX first) becomes the lowest
   index i < n with !(|ptr_dev[i]| <= limit) (NaN included), or stays INT64_MAX. */
cudaError_t pikv_cuda_find_out_of_range(const float *ptr_dev, int64_t n, float limit, long long *first_dev,
                                        cudaStream_t stream);

/* ---- decode attention (cuda-attention.cu) ---------------------------------- */

/* One page of a (query, KV head) list: its address, valid rows, absolute entry
   index (for page_lse) and whether it is quantized (layout Q). */
typedef struct pikv_cuda_entry {
    uint64_t page;
    int32_t len, id, quant, pad_;
} pikv_cuda_entry;

/* A task: entries [e0, e1) of list `unit` (= query * kvh + KV head). */
typedef struct pikv_cuda_task {
    int32_t unit, e0, e1, pad_;
} pikv_cuda_task;

typedef struct pikv_cuda_attention_launch {
    pikv_cuda_layout L, Q;          /* open and quantized layouts (Q zeros when none) */
    int32_t n_queries, n_q_heads;
    float scale;
    const float *q_dev;             /* [n_queries][n_q_heads][hd] */
    const pikv_cuda_entry *entries_dev;
    const pikv_cuda_task *tasks_dev;
    int32_t n_tasks;
    const int32_t *list_tasks_dev;  /* [units + 1]: the tasks of list u */
    float *parts_dev;               /* [n_tasks][G][hd + 2]: m, l, unnormalized sums */
    float *page_lse_dev;            /* [entries][G] at entry ids, or NULL */
    float *out_dev;                 /* [n_queries][n_q_heads][hd] */
    float *lse_dev;                 /* [n_queries][n_q_heads] */
    int *overflow_dev;              /* the lowest list with a non-finite score (INT_MAX when none) */
} pikv_cuda_attention_launch;

/* Whether the fast (16-byte vector) kernels apply to a layout: the attention
   launcher picks them itself; exposed for the benchmark's report. */
int pikv_cuda_attention_vectorized(const pikv_cuda_layout *L);
cudaError_t pikv_cuda_attention(const pikv_cuda_attention_launch *a, cudaStream_t stream);

/* ---- streaming reads (cuda-reduce.cu) --------------------------------------- */

/* read_reduce: parts_dev[b] = block b's share of the sum of the n_floats floats
   at x_dev (16-byte aligned), grid-stride over `blocks` blocks; the host adds
   the partials. */
cudaError_t pikv_cuda_read_reduce(const float *x_dev, uint64_t n_floats, double *parts_dev, int32_t blocks,
                                  cudaStream_t stream);

/* Bandwidth probe for benchmarks: reads n_bytes (a multiple of 16) at src_dev
   with 16-byte loads and reduces them into *sink_dev. */
cudaError_t pikv_cuda_read_probe(const void *src_dev, uint64_t n_bytes, unsigned *sink_dev, int32_t blocks,
                                 cudaStream_t stream);

/* Whether this binary holds code the current device can run (else kernels fail
   with cudaErrorNoKernelImageForDevice). */
cudaError_t pikv_cuda_kernels_loadable(void);

#ifdef __cplusplus
}
#endif

#endif /* PIKV_CUDA_KERNELS_H */
