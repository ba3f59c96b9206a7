/* Selection: which pages an attend reads, as one CSR page list per (query,
 * KV head) on each device.
 *
 * 1. Candidates of a query: the pages of its sequence in the layer. With
 *    EXPERTS, only the shards of the query's first experts_top_k experts
 *    (EXPERT/BALANCED placement: shard = expert; HASH: pages whose rows' top-1
 *    experts meet the query's, by a 64-bit mask, so a superset). Pages holding a
 *    sink or recent token are always read ("forced").
 * 2. QUEST: every non-forced candidate is scored on the device that holds it
 *    (the Quest bound from the page's key min/max; a page demoted to the host or
 *    disk tier by the CPU backend's score op on the host copy of its bounds, the
 *    oracle every backend matches, so it competes with the same scores), and each
 *    (query, KV head)
 *    keeps its best pages while their tokens fit in token_budget minus the
 *    forced pages' tokens (budgeted top-k, a backend op).
 */
#include "select.h"

#include <string.h>

static bool shard_wanted(const pikv_cache *c, const pikv_select_params *sel, const int32_t *qexp,
                         int32_t shard, uint64_t page_mask)
{
    if (!(sel->mode & PIKV_SELECT_EXPERTS) || c->params.n_experts == 1) return true;
    const int32_t k = sel->experts_top_k > 0 ? sel->experts_top_k : c->params.experts_per_token;
    for (int32_t j = 0; j < k; j++) {
        if (c->params.placement == PIKV_PLACEMENT_HASH) {
            if (page_mask & (1ull << (qexp[j] % 64))) return true;
        } else if (qexp[j] == shard) {
            return true;
        }
    }
    return false;
}

void pikv_read_plan_free(pikv_context *ctx, pikv_read_plan *p)
{
    pikv_host_free(ctx, p->indptr);
    pikv_host_free(ctx, p->slots);
    pikv_host_free(ctx, p->lens);
    pikv_host_free(ctx, p->ids);
    memset(p, 0, sizeof *p);
}

/* Candidates of every query: ids and whether forced, CSR by query. */
typedef struct candidates {
    int32_t *indptr; /* [nq + 1] */
    uint32_t *ids;
    uint8_t *forced;
} candidates;

static pikv_status gather_candidates(pikv_cache *c, int32_t layer, const pikv_attend_batch *b,
                                     const pikv_select_params *sel, candidates *out)
{
    pikv_context *ctx = c->ctx;
    const int32_t nq = b->n_queries, ept = c->params.experts_per_token;
    out->indptr = pikv_host_calloc(ctx, (size_t)nq + 1, sizeof(int32_t));
    PIKV_RETURN_ERROR_IF(!out->indptr, ctx, PIKV_ERR_OUT_OF_MEMORY, "attend: allocation failed");
    for (int pass = 0; pass < 2; pass++) {
        int64_t n = 0;
        for (int32_t i = 0; i < nq; i++) {
            const pikv_seq_layer *sl = &c->seqs[b->seq_ids[i]].layers[layer];
            const int32_t *qexp = b->experts ? b->experts + (size_t)i * (size_t)ept : NULL;
            if (pass == 0) out->indptr[i] = (int32_t)n;
            for (int32_t s = 0; s < c->n_shards; s++) {
                const pikv_ring *ring = &sl->rings[s];
                for (int64_t j = 0; j < ring->count; j++) {
                    const uint32_t id = pikv_ring_at(ring, j);
                    const bool forced = pikv_page_protected(c, id, sl, sel);
                    if (!forced && qexp && !shard_wanted(c, sel, qexp, s, c->pages[id].expert_mask)) continue;
                    if (!forced && !qexp && (sel->mode & PIKV_SELECT_EXPERTS) && c->params.n_experts > 1)
                        continue;
                    if (pass == 1) {
                        out->ids[n] = id;
                        out->forced[n] = forced;
                    }
                    n++;
                }
            }
        }
        if (pass == 0) {
            PIKV_RETURN_ERROR_IF(n > INT32_MAX, ctx, PIKV_ERR_CAPACITY,
                                 "attend: %lld candidate pages exceed the page-list range", (long long)n);
            out->indptr[nq] = (int32_t)n;
            out->ids = pikv_host_calloc(ctx, (size_t)(n ? n : 1), sizeof(uint32_t));
            out->forced = pikv_host_calloc(ctx, (size_t)(n ? n : 1), 1);
            PIKV_RETURN_ERROR_IF(!out->ids || !out->forced, ctx, PIKV_ERR_OUT_OF_MEMORY,
                                 "attend: candidate list of %lld pages: allocation failed", (long long)n);
        }
    }
    return PIKV_OK;
}

/* QUEST's verdict, in list order: list (query i, KV head g) holds the non-forced
   candidates of query i in candidate order; keep[list_indptr[list] + j] says whether
   its j-th is read. All passes walk these arrays in order (a per-candidate x head
   matrix walked head by head would stride through memory once per head). */
typedef struct quest_lists {
    int32_t *indptr; /* [nq * kvh + 1] */
    uint8_t *keep;
} quest_lists;

/* QUEST: score the non-forced candidates where they live, then keep the best of
   each (query, KV head) under its budget. */
static pikv_status quest_select(pikv_cache *c, const pikv_attend_batch *b, const pikv_select_params *sel,
                                const candidates *cand, const int32_t *cand_tokens, quest_lists *out,
                                pikv_read_plan *plan)
{
    pikv_context *ctx = c->ctx;
    const int32_t nq = b->n_queries, kvh = c->params.n_kv_heads, nd = c->n_devs;
    const int64_t n_cand = cand->indptr[nq];
    PIKV_RETURN_ERROR_IF(n_cand * kvh > INT32_MAX, ctx, PIKV_ERR_CAPACITY,
                         "attend: %lld candidate pages x %d KV heads exceed the page-list range",
                         (long long)n_cand, kvh);
    pikv_status st = PIKV_OK;
    /* per device: CSR by query of its non-forced candidates; "device" nd holds the
       demoted candidates, scored on the host */
    int32_t *dev_indptr = pikv_host_calloc(ctx, ((size_t)nd + 1) * ((size_t)nq + 1), sizeof(int32_t));
    uint32_t *dev_slots = pikv_host_calloc(ctx, (size_t)(n_cand ? n_cand : 1), sizeof(uint32_t));
    int32_t *dev_pos = pikv_host_calloc(ctx, (size_t)(n_cand ? n_cand : 1), sizeof(int32_t)); /* -> cand */
    int32_t *local = pikv_host_alloc(ctx, (size_t)(n_cand ? n_cand : 1) * sizeof(int32_t), 64); /* j of cand */
    /* a device's scores [its candidate][kvh], written before they are read */
    float *scores = pikv_host_alloc(ctx, (size_t)(n_cand ? n_cand : 1) * (size_t)kvh * sizeof(float), 64);
    float *list_scores = pikv_host_alloc(ctx, (size_t)(n_cand ? n_cand : 1) * (size_t)kvh * sizeof(float), 64);
    int32_t *list_tokens = pikv_host_alloc(ctx, (size_t)(n_cand ? n_cand : 1) * (size_t)kvh * sizeof(int32_t), 64);
    int64_t *budget = pikv_host_calloc(ctx, (size_t)nq * (size_t)kvh, sizeof(int64_t));
    out->indptr = pikv_host_calloc(ctx, (size_t)nq * (size_t)kvh + 1, sizeof(int32_t));
    out->keep = pikv_host_alloc(ctx, (size_t)(n_cand ? n_cand : 1) * (size_t)kvh, 64); /* topk writes all */
    int64_t dev_begin[PIKV_MAX_DEVICES + 2] = {0};
    if (!dev_indptr || !dev_slots || !dev_pos || !local || !scores || !list_scores || !list_tokens || !budget ||
        !out->indptr || !out->keep) {
        st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "attend: quest scratch for %lld candidates: allocation failed",
                       (long long)n_cand);
        goto done;
    }
    int64_t per_dev[PIKV_MAX_DEVICES + 1] = {0};
    for (int64_t k = 0; k < n_cand; k++) {
        if (cand->forced[k]) continue;
        const pikv_page_meta *m = &c->pages[cand->ids[k]];
        per_dev[m->tier != PIKV_TIER_DEVICE ? nd : m->dev]++;
        plan->scored[m->dev]++;
    }
    for (int32_t d = 0; d <= nd; d++) dev_begin[d + 1] = dev_begin[d] + per_dev[d];
    int64_t fill[PIKV_MAX_DEVICES + 1];
    for (int32_t d = 0; d <= nd; d++) fill[d] = dev_begin[d];
    /* lists (query, KV head) of non-forced candidates, budget = what forced pages leave;
       each query's kvh lists are the same length */
    int32_t *lp = out->indptr;
    int64_t e = 0;
    for (int32_t i = 0; i < nq; i++) {
        for (int32_t d = 0; d <= nd; d++)
            dev_indptr[(size_t)d * ((size_t)nq + 1) + (size_t)i] = (int32_t)(fill[d] - dev_begin[d]);
        int64_t forced_tokens = 0;
        int32_t n_free = 0;
        for (int32_t k = cand->indptr[i]; k < cand->indptr[i + 1]; k++) {
            if (cand->forced[k]) {
                forced_tokens += cand_tokens[k];
                continue;
            }
            const pikv_page_meta *m = &c->pages[cand->ids[k]];
            const int32_t d = m->tier != PIKV_TIER_DEVICE ? nd : m->dev;
            dev_slots[fill[d]] = m->tier != PIKV_TIER_DEVICE ? m->bounds_slot : pikv_op_slot(m);
            dev_pos[fill[d]++] = k;
            local[k] = n_free++;
        }
        const int64_t left = (int64_t)sel->token_budget - forced_tokens;
        for (int32_t g = 0; g < kvh; g++) {
            const size_t list = (size_t)i * (size_t)kvh + (size_t)g;
            lp[list] = (int32_t)(e + (int64_t)g * n_free);
            budget[list] = left > 0 ? left : 0;
        }
        for (int32_t k = cand->indptr[i]; k < cand->indptr[i + 1]; k++) {
            if (cand->forced[k]) continue;
            for (int32_t g = 0; g < kvh; g++) list_tokens[lp[(size_t)i * (size_t)kvh + (size_t)g] + local[k]] = cand_tokens[k];
        }
        e += (int64_t)kvh * n_free;
    }
    lp[(size_t)nq * (size_t)kvh] = (int32_t)e;
    for (int32_t d = 0; d <= nd; d++)
        dev_indptr[(size_t)d * ((size_t)nq + 1) + (size_t)nq] = (int32_t)(fill[d] - dev_begin[d]);
    /* each device scores its candidates; the scores go to their lists */
    for (int32_t d = 0; d <= nd && st == PIKV_OK; d++) {
        if (dev_begin[d + 1] == dev_begin[d]) continue;
        pikv_device *dev = d < nd ? c->devs[d].dev : ctx->host_device;
        const int32_t *dip = dev_indptr + (size_t)d * ((size_t)nq + 1);
        pikv_score_args args = {d < nd ? &c->devs[d].view : pikv_tier_bounds_view(c), nq, c->params.n_q_heads, b->q,
                                dip, dev_slots + dev_begin[d], scores};
        const double t0 = pikv_monotonic_s();
        st = dev->iface->score(dev, &args);
        plan->score_s += pikv_monotonic_s() - t0;
        for (int32_t i = 0; i < nq && st == PIKV_OK; i++)
            for (int32_t j = dip[i]; j < dip[i + 1]; j++) {
                const int32_t k = dev_pos[dev_begin[d] + j];
                const float *sk = scores + (size_t)j * (size_t)kvh;
                for (int32_t g = 0; g < kvh; g++) list_scores[lp[(size_t)i * (size_t)kvh + (size_t)g] + local[k]] = sk[g];
            }
    }
    if (st != PIKV_OK) goto done;
    pikv_topk_args targs = {nq * kvh, lp, list_scores, list_tokens, budget, out->keep};
    const double t0 = pikv_monotonic_s();
    st = ctx->host_device->iface->topk(ctx->host_device, &targs);
    plan->topk_s = pikv_monotonic_s() - t0;
done:
    pikv_host_free(ctx, dev_indptr);
    pikv_host_free(ctx, dev_slots);
    pikv_host_free(ctx, dev_pos);
    pikv_host_free(ctx, local);
    pikv_host_free(ctx, scores);
    pikv_host_free(ctx, list_scores);
    pikv_host_free(ctx, list_tokens);
    pikv_host_free(ctx, budget);
    if (st != PIKV_OK) {
        pikv_host_free(ctx, out->indptr);
        pikv_host_free(ctx, out->keep);
        out->indptr = NULL;
        out->keep = NULL;
    }
    return st;
}

pikv_status pikv_plan_reads(pikv_cache *c, int32_t layer, const pikv_attend_batch *b,
                            const pikv_select_params *sel, pikv_read_plan *plan)
{
    pikv_context *ctx = c->ctx;
    const int32_t nq = b->n_queries, kvh = c->params.n_kv_heads, nd = c->n_devs;
    const int64_t n_lists = (int64_t)nq * kvh;
    memset(plan, 0, sizeof *plan);
    plan->n_lists = n_lists;
    candidates cand = {0};
    quest_lists ql = {0};
    const uint8_t *keep = NULL; /* ql.keep with quest */
    int32_t *cinfo = NULL; /* per candidate: device, tokens, op slot, demoted (read once from the page table) */
    pikv_status st = gather_candidates(c, layer, b, sel, &cand);
    const int64_t n_cand = st == PIKV_OK ? cand.indptr[nq] : 0;
    if (st == PIKV_OK) {
        cinfo = pikv_host_alloc(ctx, 4 * (size_t)(n_cand ? n_cand : 1) * sizeof(int32_t), 64);
        if (!cinfo) st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "attend: allocation failed");
    }
    int32_t *cdev = cinfo, *ctok = cinfo + n_cand;
    uint32_t *cslot = (uint32_t *)(void *)(cinfo + 2 * n_cand);
    int32_t *cdem = cinfo + 3 * n_cand;
    for (int64_t k = 0; st == PIKV_OK && k < n_cand; k++) {
        const pikv_page_meta *m = &c->pages[cand.ids[k]];
        cdev[k] = m->dev;
        ctok[k] = m->n_tokens;
        cslot[k] = pikv_op_slot(m);
        cdem[k] = m->tier != PIKV_TIER_DEVICE;
    }
    if (st == PIKV_OK && (sel->mode & PIKV_SELECT_QUEST)) {
        st = quest_select(c, b, sel, &cand, ctok, &ql, plan);
        keep = ql.keep;
    }
    /* count, then fill, the per-device lists of every (query, KV head); a quest list's
       j-th entry is its query's j-th non-forced candidate */
    int64_t per_dev[PIKV_MAX_DEVICES] = {0};
    for (int32_t i = 0; st == PIKV_OK && i < nq; i++) {
        for (int32_t k = cand.indptr[i]; k < cand.indptr[i + 1]; k++)
            if (!keep || cand.forced[k]) per_dev[cdev[k]] += kvh;
        for (int32_t g = 0; keep && g < kvh; g++) {
            const size_t list = (size_t)i * (size_t)kvh + (size_t)g;
            int32_t j = ql.indptr[list];
            for (int32_t k = cand.indptr[i]; k < cand.indptr[i + 1]; k++)
                if (!cand.forced[k]) per_dev[cdev[k]] += keep[j++];
        }
    }
    if (st == PIKV_OK) {
        for (int32_t d = 0; d < nd; d++) plan->dev_begin[d + 1] = plan->dev_begin[d] + per_dev[d];
        const int64_t total = plan->dev_begin[nd];
        if (total > INT32_MAX)
            st = PIKV_FAIL(ctx, PIKV_ERR_CAPACITY, "attend: %lld page reads in one call exceed the page-list "
                           "range", (long long)total);
    }
    if (st == PIKV_OK) {
        const int64_t total = plan->dev_begin[nd];
        plan->indptr = pikv_host_calloc(ctx, (size_t)nd * ((size_t)n_lists + 1), sizeof(int32_t));
        plan->slots = pikv_host_alloc(ctx, (size_t)(total ? total : 1) * sizeof(uint32_t), 64);
        plan->lens = pikv_host_alloc(ctx, (size_t)(total ? total : 1) * sizeof(int32_t), 64);
        plan->ids = pikv_host_alloc(ctx, (size_t)(total ? total : 1) * sizeof(uint32_t), 64);
        if (!plan->indptr || !plan->slots || !plan->lens || !plan->ids)
            st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "attend: page lists of %lld reads: allocation failed",
                           (long long)total);
    }
    if (st == PIKV_OK) {
        int64_t fill[PIKV_MAX_DEVICES];
        for (int32_t d = 0; d < nd; d++) fill[d] = plan->dev_begin[d];
        for (int32_t i = 0; i < nq; i++)
            for (int32_t g = 0; g < kvh; g++) {
                const size_t list = (size_t)i * (size_t)kvh + (size_t)g;
                for (int32_t d = 0; d < nd; d++)
                    plan->indptr[(size_t)d * ((size_t)n_lists + 1) + list] = (int32_t)(fill[d] - plan->dev_begin[d]);
                int32_t j = keep ? ql.indptr[list] : 0;
                for (int32_t k = cand.indptr[i]; k < cand.indptr[i + 1]; k++) {
                    if (keep && !cand.forced[k] && !keep[j++]) continue;
                    const int64_t at = fill[cdev[k]]++;
                    plan->slots[at] = cslot[k];
                    plan->n_demoted += cdem[k];
                    plan->lens[at] = ctok[k];
                    plan->ids[at] = cand.ids[k];
                }
            }
        for (int32_t d = 0; d < nd; d++)
            plan->indptr[(size_t)d * ((size_t)n_lists + 1) + (size_t)n_lists] = (int32_t)(fill[d] - plan->dev_begin[d]);
    }
    pikv_host_free(ctx, cinfo);
    pikv_host_free(ctx, cand.indptr);
    pikv_host_free(ctx, cand.ids);
    pikv_host_free(ctx, cand.forced);
    pikv_host_free(ctx, ql.keep);
    pikv_host_free(ctx, ql.indptr);
    if (st != PIKV_OK) pikv_read_plan_free(ctx, plan);
    return st;
}
