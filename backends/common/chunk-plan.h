/*
 * Host-side planning shared by the backends whose kernels see one pool chunk
 * per launch (OpenCL, Vulkan): a page slot becomes (chunk key, byte offset),
 * work is grouped by chunk so each launch binds one chunk buffer, and the
 * attention page lists become tasks (runs of pages of one list in one chunk)
 * whose partial softmax states a second kernel merges exactly.
 *
 * Chunk keys: open chunk c is key c, quantized chunk c is key n_open + c.
 * Every array of a plan is host memory from the context's allocator; a plan's
 * free accepts a plan that failed to build.
 */
#ifndef PIKV_CHUNK_PLAN_H
#define PIKV_CHUNK_PLAN_H

#include "../../runtime/backend-impl.h"

/* A page layout as the kernels read it: LAYOUT_WORDS uint32 words (field order
   in backends/opencl/kernels/common.cl and backends/vulkan/shaders/common.glsl). */
enum { PIKV_LAYOUT_WORDS = 20 };
void pikv_layout_words(uint32_t *out, const pikv_page_layout *layout);
/* Row 0: the pool's layout; row 1: its quantized pool's (zeros when none). */
void pikv_pool_layout_words(uint32_t out[2 * PIKV_LAYOUT_WORDS], const pikv_pool_view *pool);

int32_t pikv_chunk_count(const pikv_pool_view *pool);
pikv_buffer *pikv_chunk_buffer(const pikv_pool_view *pool, int32_t key);
/* A slot's chunk key and byte offset in its chunk (fails on a slot past the
   pool, or an offset past 4 GiB). */
pikv_status pikv_chunk_resolve(pikv_device *dev, const pikv_pool_view *pool, uint32_t slot, int32_t *key,
                               uint32_t *offset);

/* Stable counting sort of n items by key in [0, nk): order[n], kptr[nk + 1]. */
void pikv_group_by_key(int32_t n, const int32_t *key, int32_t nk, int32_t *order, int32_t *kptr);

/* append: writes[4 w] = {page byte offset, row0, n_rows, src_begin};
   order[kptr[c] .. kptr[c+1]) the writes into chunk key c. */
typedef struct pikv_append_plan {
    int32_t n_keys;
    int32_t *writes, *order, *kptr;
    int64_t n_src;   /* source tokens referenced: [0, n_src) */
    int64_t idx_end; /* src_index entries referenced: [0, idx_end) */
} pikv_append_plan;
pikv_status pikv_append_plan_build(pikv_device *dev, const pikv_append_args *args, pikv_append_plan *plan);
void pikv_append_plan_free(pikv_context *ctx, pikv_append_plan *plan);

/* score: per candidate c (absolute index) its page offset and query;
   order[kptr[k] .. kptr[k+1]) the candidates (absolute) in chunk key k; the
   candidates before indptr[0] are in no group. */
typedef struct pikv_score_plan {
    int32_t n_keys, n_candidates;
    uint32_t *offset;
    int32_t *query, *order, *kptr;
} pikv_score_plan;
pikv_status pikv_score_plan_build(pikv_device *dev, const pikv_score_args *args, pikv_score_plan *plan);
void pikv_score_plan_free(pikv_context *ctx, pikv_score_plan *plan);

/* attention: the used entries (those of the lists) in list order, then chunk
   order inside a list: entry p is list entry perm[p] (absolute index, for
   page_lse), page at byte offset[p] with len[p] rows. Task t covers entries
   tasks[3t+1] .. tasks[3t+2] of list tasks[3t] in one chunk, at most
   max_task_pages of them; chunk_tasks[tkptr[k] .. tkptr[k+1]) the tasks in
   chunk key k; list_tasks[u] .. list_tasks[u+1] the tasks of list u. */
typedef struct pikv_attention_plan {
    int32_t n_keys, n_lists, n_used, n_tasks;
    int32_t *perm, *len, *tasks, *chunk_tasks, *tkptr, *list_tasks;
    uint32_t *offset;
} pikv_attention_plan;
pikv_status pikv_attention_plan_build(pikv_device *dev, const pikv_attention_args *args, int32_t max_task_pages,
                                      pikv_attention_plan *plan);
void pikv_attention_plan_free(pikv_context *ctx, pikv_attention_plan *plan);

/* quantize: adds the per-work-item reconstruction errors ({sum e^2, sum x^2,
   max |e|} triples of the key items then of the value items) into args->err. */
void pikv_quantize_errors_add(pikv_quantize_args *args, const float *key_items, size_t n_key_items,
                              const float *value_items, size_t n_value_items);

#endif /* PIKV_CHUNK_PLAN_H */
