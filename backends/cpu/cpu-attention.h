/* Decode attention on the CPU: the task of one (query, KV head, page range)
   as the page kernels see it (cpu-attention.c plans and merges; the kernels are
   in cpu-attention.c (portable) and cpu-attention-avx512.c). */
#ifndef PIKV_CPU_ATTENTION_H
#define PIKV_CPU_ATTENTION_H

#include "cpu-impl.h"

typedef struct pikv_cpu_attn_list {
    const pikv_attention_args *args;
    int32_t kv_head;            /* the KV head being read (set per page when n_kv > 1) */
    int32_t n_kv;               /* 1, or every KV head when they share one page list */
    const int32_t *list_begin;  /* n_kv > 1: indptr of the query's lists (page_lse entries) */
    /* n_kv > 1 with per-head lists: units [page_begin, page_end) of the query's
       entries in address order, unit u being entry ord_entry[u] of head ord_head[u];
       NULL when the heads share their pages */
    const int32_t *ord_entry, *ord_head;
    int32_t G;                  /* query heads of the KV head */
    int32_t page_begin, page_end;
    float *part;                /* [G][head_dim + 2]: running max, sum, acc (of kv_head) */
    float *part0;               /* [n_kv][G][head_dim + 2] */
    /* per-thread scratch, set up by the caller */
    float *qs;                  /* [G][head_dim] q * scale (of kv_head) */
    float *qeo;                 /* [G][head_dim] the same, even/odd order per 32 channels */
    float *qs0, *qeo0;          /* [n_kv][G][head_dim] */
    float *qfold;               /* [G][head_dim] */
    float *kconst;              /* [G] */
    float *scores;              /* [G][page_size] (of kv_head) */
    float *scores0;             /* [n_kv][G][page_size] */
    float *block;               /* [16][head_dim] */
    float *vweights;            /* [G][page_size][v_groups] */
    float *vzsum;               /* [G][v_groups] */
    float *vscales;             /* [2][page_size][v_groups] */
} pikv_cpu_attn_list;

/* scratch floats per thread for the fast kernels */
static inline size_t pikv_cpu_attn_vgroups_max(int32_t hd) { return ((size_t)hd + 31) / 32; }

static inline size_t pikv_cpu_attn_scratch_floats(int32_t G, int32_t n_kv, int32_t hd, int32_t ps)
{
    const size_t vgm = pikv_cpu_attn_vgroups_max(hd);
    return (2 * (size_t)n_kv + 1) * (size_t)G * (size_t)hd + (size_t)G + (size_t)n_kv * (size_t)G * (size_t)ps +
           16 * (size_t)hd +
           (size_t)G * (size_t)ps * vgm + 2 * (size_t)ps * vgm + (size_t)G * vgm + 64;
}

bool pikv_cpu_has_avx512(void);
/* order[indptr[i] .. indptr[i + 1]): that range's indices (absolute) sorted by
   slots[] (stable), for every range i < n_ranges; false when out of memory */
bool pikv_cpu_order_by_slot(pikv_context *ctx, const uint32_t *slots, const int32_t *indptr, int32_t n_ranges,
                            int32_t *order);
/* runs the task with AVX-512; only for layouts pikv_cpu_attn_fast_layout accepts */
void pikv_cpu_attn_list_avx512(pikv_cpu_attn_list *t);
void pikv_cpu_attn_reorder(float *x, int32_t n, bool to_even_odd);

static inline bool pikv_cpu_attn_fast_layout(const pikv_page_layout *L)
{
    if (!L) return true;
    if (L->head_dim % 32 != 0 || L->head_dim > 1024) return false;
    if (pikv_dtype_quantized(L->dtype)) return L->group % 32 == 0 || L->group >= L->head_dim;
    return true;
}

#endif
