/* Private declarations of the CPU reference backend. */
#ifndef PIKV_CPU_IMPL_H
#define PIKV_CPU_IMPL_H

#include "../../runtime/backend-impl.h"

/* ---- thread pool (cpu-threadpool.c) ------------------------------------
 * A fixed set of workers that run `n_tasks` calls of fn(arg, task, thread)
 * in parallel; the calling thread takes part, so a pool of 1 is serial.
 * thread is in [0, pikv_cpu_pool_threads()) and indexes per-thread scratch. */
typedef struct pikv_cpu_pool pikv_cpu_pool;
typedef void (*pikv_cpu_task_fn)(void *arg, int64_t task, int32_t thread);

pikv_status pikv_cpu_pool_create(pikv_context *ctx, int32_t n_threads, pikv_cpu_pool **out);
void pikv_cpu_pool_free(pikv_context *ctx, pikv_cpu_pool *pool);
int32_t pikv_cpu_pool_threads(const pikv_cpu_pool *pool);
void pikv_cpu_pool_run(pikv_cpu_pool *pool, int64_t n_tasks, pikv_cpu_task_fn fn, void *arg);

typedef struct pikv_cpu_slab pikv_cpu_slab;

/* The backend's shared state: all CPU devices share one pool of workers. */
typedef struct pikv_cpu_backend {
    pikv_cpu_pool *pool;
    /* f16 row conversions picked for this CPU (cpu-f16.c) */
    void (*f16_to_f32)(const uint16_t *src, float *dst, int32_t n);
    void (*f32_to_f16)(const float *src, uint16_t *dst, int32_t n);
    bool attn_avx512; /* the AVX-512 kernels run here (cpu-attention-avx512.c) */
    bool attn_avx2;   /* else the portable attention kernel built for AVX2 + FMA runs here */
    pikv_cpu_slab *slabs; /* huge-page slabs of page-pool chunks (cpu-arena.c) */
} pikv_cpu_backend;

/* Device memory of the CPU devices (cpu-arena.c). */
void *pikv_cpu_arena_alloc(pikv_context *ctx, pikv_cpu_backend *cb, size_t size);
void pikv_cpu_arena_free(pikv_context *ctx, pikv_cpu_backend *cb, void *ptr, size_t size);
void pikv_cpu_arena_release(pikv_context *ctx, pikv_cpu_backend *cb);

void pikv_cpu_f16_init(pikv_cpu_backend *cb); /* cpu-f16.c */

static inline pikv_cpu_backend *pikv_cpu_device_backend(pikv_device *dev)
{
    return (pikv_cpu_backend *)dev->backend->context;
}

static inline pikv_cpu_pool *pikv_cpu_device_pool(pikv_device *dev)
{
    return ((pikv_cpu_backend *)dev->backend->context)->pool;
}

/* Host address of a page in a pool whose chunks are host memory; a slot with
   PIKV_SLOT_QUANT names a page of the device's quantized pool. */
static inline unsigned char *pikv_cpu_page_ptr(const pikv_pool_view *pool, uint32_t slot)
{
    if (slot & PIKV_SLOT_QUANT) {
        pool = pool->quant;
        slot &= ~PIKV_SLOT_QUANT;
    }
    uint32_t chunk = slot / pool->pages_per_chunk;
    uint32_t index = slot % pool->pages_per_chunk;
    return (unsigned char *)pool->chunks[chunk]->host + (uint64_t)index * pool->layout->page_bytes;
}

/* The layout of the page a slot names. */
static inline const pikv_page_layout *pikv_cpu_slot_layout(const pikv_pool_view *pool, uint32_t slot)
{
    return (slot & PIKV_SLOT_QUANT) ? pool->quant->layout : pool->layout;
}

/* Ops, one file per family. */
pikv_status pikv_cpu_append(pikv_device *dev, const pikv_append_args *args);       /* cpu-append.c */
pikv_status pikv_cpu_page_copy(pikv_device *dev, const pikv_page_copy_args *args); /* cpu-append.c */
pikv_status pikv_cpu_attention(pikv_device *dev, const pikv_attention_args *args); /* cpu-attention.c */
pikv_status pikv_cpu_merge(pikv_device *dev, const pikv_merge_args *args);         /* cpu-merge.c */
pikv_status pikv_cpu_score(pikv_device *dev, const pikv_score_args *args);         /* cpu-select.c */
pikv_status pikv_cpu_topk(pikv_device *dev, const pikv_topk_args *args);           /* cpu-select.c */
pikv_status pikv_cpu_quantize(pikv_device *dev, pikv_quantize_args *args);         /* cpu-quant.c */
pikv_status pikv_cpu_read_reduce(pikv_device *dev, const pikv_read_reduce_args *args); /* cpu-reduce.c */

/* Dequantize row t of KV head g of a quantized page into out[head_dim].
   is_key selects the key (per-channel groups over tokens) or value (per-token
   groups over channels) format. (cpu-quant.c) */
void pikv_cpu_dequant_row(const pikv_cpu_backend *cb, const pikv_page_layout *L, const unsigned char *page,
                          int32_t g, int32_t t, bool is_key, float *out);
/* The fast path used by attention: a key group's f32 scales and zero points are
   converted once (head_dim each) and reused for its rows; value rows convert
   their own v_groups scales into group_scratch (2 x v_groups floats). */
void pikv_cpu_key_group_params(const pikv_cpu_backend *cb, const pikv_page_layout *L, const unsigned char *page,
                               int32_t g, int32_t tg, float *scale, float *zero);
void pikv_cpu_dequant_key_row(const pikv_page_layout *L, const unsigned char *page, int32_t g, int32_t t,
                              const float *scale, const float *zero, float *out);
void pikv_cpu_dequant_value_row(const pikv_cpu_backend *cb, const pikv_page_layout *L, const unsigned char *page,
                                int32_t g, int32_t t, float *group_scratch, float *out);

/* The exact log-sum-exp merge of one row, shared by the attention kernel's
   split merge and the merge op: parts are (out_p normalized, lse_p). */
void pikv_cpu_merge_row(int32_t n_parts, int32_t dim, const float *const *part_out,
                        const float *part_lse, float *out, float *lse);

/* Dot product written so compilers vectorize it without -ffast-math. */
static inline float pikv_cpu_dot(const float *a, const float *b, int32_t n)
{
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int32_t d = 0;
    for (; d + 8 <= n; d += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[d + j] * b[d + j];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; d < n; d++) s += a[d] * b[d];
    return s;
}

#endif /* PIKV_CPU_IMPL_H */
