/* Selection plans (select.c): which pages each (query, KV head) reads. */
#ifndef PIKV_SELECT_H
#define PIKV_SELECT_H

#include "cache-impl.h"

/* Page reads grouped by device, then by list (query * n_kv_heads + KV head):
   device d's lists are indptr[d * (n_lists + 1) ...] into its part of slots,
   lens and ids, which starts at dev_begin[d]. */
typedef struct pikv_read_plan {
    int64_t n_lists;
    int64_t dev_begin[PIKV_MAX_DEVICES + 1];
    int32_t *indptr;
    uint32_t *slots;
    int32_t *lens;
    uint32_t *ids;
    int64_t scored[PIKV_MAX_DEVICES]; /* pages whose bounds QUEST read, per device */
    int64_t n_demoted;               /* entries naming demoted pages (slot PIKV_SLOT_DEMOTED) */
    double score_s, topk_s;          /* QUEST: seconds in the score and top-k ops */
} pikv_read_plan;

pikv_status pikv_plan_reads(pikv_cache *c, int32_t layer, const pikv_attend_batch *b,
                            const pikv_select_params *sel, pikv_read_plan *plan);
void pikv_read_plan_free(pikv_context *ctx, pikv_read_plan *plan);
/* tier.c: run_plan for a plan that reads demoted pages (host q/out/lse): attention over
   each device's resident pages while the demoted ones are fetched, then over the
   fetched ones in rounds of the device's staging slots, all partials merged exactly. */
pikv_status pikv_tier_run_plan(pikv_cache *c, const char *fn, int32_t nq, const float *q,
                               const pikv_read_plan *plan, float *out, float *lse, float *page_lse);

#endif /* PIKV_SELECT_H */
