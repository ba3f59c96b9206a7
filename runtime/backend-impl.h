/*
 * The backend interface: every backend implements these vtables privately
 * ({iface, device, context} in the style of ggml) and registers its devices
 * through one entry point. The runtime only ever calls through them, so one
 * build can hold CPU, OpenCL, Vulkan and CUDA at once.
 *
 * Ops work on pages held in a device's page pool: chunks of device memory,
 * each holding pages_per_chunk fixed-size pages. A page is named by its slot,
 * slot = chunk * pages_per_chunk + index in chunk. Page lists handed to ops are
 * CSR-like (indptr + slots + lengths), as in FlashInfer's page tables.
 */
#ifndef PIKV_BACKEND_IMPL_H
#define PIKV_BACKEND_IMPL_H

#include "pikv-impl.h"

typedef struct pikv_device pikv_device;
typedef struct pikv_backend pikv_backend;

/* Device memory. For host-visible backends `host` points at the bytes. */
typedef struct pikv_buffer {
    pikv_device *device;
    uint64_t size;
    void *host;    /* non-NULL when the bytes are directly addressable by the host */
    void *handle;  /* backend object (cl_mem, VkBuffer, CUdeviceptr...) */
} pikv_buffer;

/* Byte layout of one page. K and V are [n_kv_heads][page_size][row] in the
   storage dtype, so each KV head's rows are contiguous for streaming; the Quest
   bounds are f32 [n_kv_heads][head_dim] min then max (over the stored keys, or,
   for quantized pages, over the f16 keys before quantizing). Quantized pages
   (INT8/INT4) add f16 scales and zero points: keys [n_kv_heads][k_groups]
   [head_dim] (groups of `group` tokens per channel), values [n_kv_heads]
   [page_size][v_groups] (groups of `group` channels per token). An INT4 row
   packs channel 2j in the low and 2j+1 in the high nibble of byte j. */
typedef struct pikv_page_layout {
    int32_t page_size;
    int32_t n_kv_heads;
    int32_t head_dim;
    pikv_dtype dtype;
    int32_t elem_size;     /* F32/F16: bytes per value; 0 for quantized */
    int32_t group;         /* quantized: group size; k_groups, v_groups below */
    int32_t k_groups, v_groups;
    uint64_t row_bytes;    /* one token row of one KV head */
    uint64_t k_offset, v_offset, kmin_offset, kmax_offset;
    uint64_t kscale_offset, kzero_offset, vscale_offset, vzero_offset;
    uint64_t head_stride;  /* bytes between KV heads inside K (and inside V) */
    uint64_t page_bytes;   /* padded to 64 bytes */
    uint64_t data_bytes;   /* K + V bytes of a full page */
    uint64_t scale_bytes;  /* scales + zero points (quantized) */
} pikv_page_layout;

static inline bool pikv_dtype_quantized(pikv_dtype t)
{
    return t == PIKV_DTYPE_INT8 || t == PIKV_DTYPE_INT4;
}

/* Slots handed to ops name a page of the open (full-precision) pool, or, with
   this bit set, of the quantized pool of the same device. */
#define PIKV_SLOT_QUANT 0x80000000u

/* A device's page storage as the kernels see it. */
typedef struct pikv_pool_view {
    const pikv_page_layout *layout;
    pikv_buffer *const *chunks;
    int32_t n_chunks;
    uint32_t pages_per_chunk;
    /* the device's quantized pool, for slots with PIKV_SLOT_QUANT (NULL if none) */
    const struct pikv_pool_view *quant;
} pikv_pool_view;

/* append: rows [row0, row0+n_rows) of page `slot` get source tokens
   src_index[src_begin .. src_begin+n_rows). A page appears in at most one write
   of a call, so writes may run in parallel. Bounds: row0 == 0 initializes
   them, otherwise they widen. */
typedef struct pikv_page_write {
    uint32_t slot;
    int32_t row0;
    int32_t n_rows;
    int32_t src_begin;
} pikv_page_write;

typedef struct pikv_append_args {
    const pikv_pool_view *pool;
    int32_t n_writes;
    const pikv_page_write *writes;
    const int32_t *src_index;
    const float *k;  /* [n_src][n_kv_heads][head_dim]: host memory, or this device's */
    const float *v;  /* memory when src_on_device (zero copy, see memory_read below) */
    int32_t src_on_device;
} pikv_append_args;

/* copy the first n_rows rows of src_slot into dst_slot (same device, same pool:
   both slots carry PIKV_SLOT_QUANT or neither) and recompute the destination's
   bounds over those rows; quantized pages are always full and copied whole.
   src_slot == dst_slot recomputes a page's bounds over its first n_rows rows. */
typedef struct pikv_page_copy_args {
    const pikv_pool_view *pool;
    uint32_t src_slot;
    uint32_t dst_slot;
    int32_t n_rows;
} pikv_page_copy_args;

/* decode attention of n_queries query tokens. Each (query i, KV head g) has its
   own page list slots[indptr[i*n_kv_heads+g] .. indptr[i*n_kv_heads+g+1]) with
   page_len valid rows per page (selection may keep different pages per head).
   Writes the normalized partial output and its log-sum-exp (-inf and 0 when
   empty) of every query head, and, when page_lse is set, for every list entry
   and each query head h of its group, log sum_{rows} exp(score): the page's
   attention mass before normalization, which eviction policies accumulate
   (computed in the same pass, not a second one). */
typedef struct pikv_attention_args {
    const pikv_pool_view *pool;
    int32_t n_queries;
    int32_t n_q_heads;
    const float *q;            /* host [n_queries][n_q_heads][head_dim] */
    const int32_t *indptr;     /* [n_queries * n_kv_heads + 1] */
    const uint32_t *slots;
    const int32_t *page_len;
    float scale;
    float *out;                /* host [n_queries][n_q_heads][head_dim] */
    float *lse;                /* host [n_queries][n_q_heads] */
    float *page_lse;           /* host [entries][n_q_heads / n_kv_heads], or NULL */
    int32_t io_on_device;      /* q, out and lse are in this device's memory (zero copy);
                                  page_lse, indptr, slots and page_len stay host arrays */
} pikv_attention_args;

/* Quest page scores: for each candidate page c of query i (slots[indptr[i] ..
   indptr[i+1])) and KV head g, scores[c * n_kv_heads + g] = max over the query
   heads h of g of sum_d max(q_hd * min_gd, q_hd * max_gd), an upper bound of
   q_h . k for every key k of the page (unscaled). */
typedef struct pikv_score_args {
    const pikv_pool_view *pool;
    int32_t n_queries;
    int32_t n_q_heads;
    const float *q;            /* host [n_queries][n_q_heads][head_dim] */
    const int32_t *indptr;     /* [n_queries + 1] */
    const uint32_t *slots;
    float *scores;             /* host [candidates][n_kv_heads] */
} pikv_score_args;

/* Budgeted top-k: for every list l, keep entries in order of decreasing score
   (ties: lower index first) while their tokens fit in budget[l]; an entry that
   does not fit is skipped and smaller ones may still fit. */
typedef struct pikv_topk_args {
    int32_t n_lists;
    const int32_t *indptr;     /* [n_lists + 1] */
    const float *scores;       /* [entries] */
    const int32_t *tokens;     /* [entries] */
    const int64_t *budget;     /* [n_lists] */
    uint8_t *keep;             /* out [entries]: 1 = selected */
} pikv_topk_args;

/* quantize a full open page (src_slot of pool) into a page of pool->quant
   (dst_slot, without the flag bit), copying its Quest bounds; adds its
   reconstruction error to err: [0] sum (x'-x)^2 keys, [1] sum x^2 keys, [2], [3]
   the same for values, [4] max |x'-x|. */
typedef struct pikv_quantize_args {
    const pikv_pool_view *pool;
    uint32_t src_slot;
    uint32_t dst_slot;
    double err[5];
} pikv_quantize_args;

/* exact merge of n_parts partials: out/lse [n_rows][dim] from
   part_out [n_parts][n_rows][dim] and part_lse [n_parts][n_rows]. */
typedef struct pikv_merge_args {
    int32_t n_parts;
    int32_t n_rows;
    int32_t dim;
    const float *part_out;
    const float *part_lse;
    float *out;
    float *lse;
} pikv_merge_args;

/* Streaming read-and-reduce, the roofline probe of pikv_device_read_bandwidth:
   *sum = the sum of the first n_floats f32 values of buf, each read exactly once
   (any order of addition, float or wider accumulators); finished on return. */
typedef struct pikv_read_reduce_args {
    const pikv_buffer *buf;
    uint64_t n_floats;
    double *sum;               /* host */
} pikv_read_reduce_args;

typedef enum pikv_op {
    PIKV_OP_APPEND = 0,
    PIKV_OP_PAGE_COPY,
    PIKV_OP_ATTENTION,
    PIKV_OP_MERGE,
    PIKV_OP_SCORE,
    PIKV_OP_TOPK,
    PIKV_OP_QUANTIZE,
    PIKV_OP_READ_REDUCE,       /* dtype-free: asked with PIKV_DTYPE_F32 */
    PIKV_OP_COUNT_
} pikv_op;

typedef struct pikv_device_iface {
    /* Whether the device runs op on pages of the given dtype. */
    bool (*supports_op)(pikv_device *dev, pikv_op op, pikv_dtype dtype);

    pikv_status (*buffer_alloc)(pikv_device *dev, uint64_t size, pikv_buffer **out);
    void (*buffer_free)(pikv_device *dev, pikv_buffer *buf);
    pikv_status (*buffer_write)(pikv_device *dev, pikv_buffer *buf, uint64_t offset,
                                const void *src, uint64_t size);
    pikv_status (*buffer_read)(pikv_device *dev, const pikv_buffer *buf, uint64_t offset,
                               void *dst, uint64_t size);

    pikv_status (*append)(pikv_device *dev, const pikv_append_args *args);
    pikv_status (*page_copy)(pikv_device *dev, const pikv_page_copy_args *args);
    pikv_status (*attention)(pikv_device *dev, const pikv_attention_args *args);
    pikv_status (*merge)(pikv_device *dev, const pikv_merge_args *args);
    pikv_status (*score)(pikv_device *dev, const pikv_score_args *args);
    pikv_status (*topk)(pikv_device *dev, const pikv_topk_args *args);
    pikv_status (*quantize)(pikv_device *dev, pikv_quantize_args *args);
    pikv_status (*read_reduce)(pikv_device *dev, const pikv_read_reduce_args *args);
    pikv_status (*synchronize)(pikv_device *dev);

    /* Zero copy: raw addresses of the device's own memory (an engine's tensors).
       NULL for backends whose memory has no addresses a caller could hold
       (OpenCL, Vulkan); for the CPU backend device memory is host memory.
       memory_read/memory_write copy between such an address and host memory and
       have finished when they return; find_out_of_range sets *first to the index
       of the first element x of ptr[0..n) with !(|x| <= limit) (NaN included), or -1:
       the value checks of zero-copy inputs, made where the values are. */
    pikv_status (*memory_read)(pikv_device *dev, const void *src, void *dst_host, uint64_t size);
    pikv_status (*memory_write)(pikv_device *dev, void *dst, const void *src_host, uint64_t size);
    pikv_status (*find_out_of_range)(pikv_device *dev, const float *ptr, int64_t n, float limit, int64_t *first);
} pikv_device_iface;

struct pikv_device {
    const pikv_device_iface *iface;
    pikv_backend *backend;
    void *context;               /* the backend's per-device state */
    pikv_context *ctx;
    int32_t index;               /* in the context's device list */
    pikv_device_info info;       /* name, caps, memory_used kept current */
};

typedef struct pikv_backend_iface {
    void (*free)(pikv_backend *backend);  /* frees the backend and its devices */
} pikv_backend_iface;

struct pikv_backend {
    const pikv_backend_iface *iface;
    pikv_backend_kind kind;
    void *context;
    pikv_context *ctx;
    int32_t n_devices;
    pikv_device **devices;
};

/* One registration entry per backend: creates the backend and its devices
   (none when the runtime is missing: that is not an error). */
pikv_status pikv_backend_cpu_init(pikv_context *ctx, const pikv_context_params *params,
                                  pikv_backend **out);

/* Built when PIKV_HAVE_OPENCL is defined (backends/opencl). */
pikv_status pikv_backend_opencl_init(pikv_context *ctx, const pikv_context_params *params,
                                     pikv_backend **out);

/* Built when PIKV_HAVE_VULKAN is defined (backends/vulkan). */
pikv_status pikv_backend_vulkan_init(pikv_context *ctx, const pikv_context_params *params,
                                     pikv_backend **out);

/* Built when PIKV_HAVE_CUDA is defined (backends/cuda). */
pikv_status pikv_backend_cuda_init(pikv_context *ctx, const pikv_context_params *params,
                                   pikv_backend **out);

/* Device memory accounting shared by all backends: reserve before allocating,
   release after freeing. Fails with OUT_OF_MEMORY past caps.memory_limit. */
pikv_status pikv_device_reserve_bytes(pikv_device *dev, uint64_t size);
void pikv_device_release_bytes(pikv_device *dev, uint64_t size);

/* The page layout for a geometry (pure; used by the runtime and the tests).
   group is used by quantized dtypes only. */
void pikv_page_layout_init(pikv_page_layout *layout, int32_t page_size, int32_t n_kv_heads,
                           int32_t head_dim, pikv_dtype dtype, int32_t group);

#endif /* PIKV_BACKEND_IMPL_H */
