/* Dispatch of the ops on a CUDA device: the host resolves page slots to device
   addresses and packs every input of an op into one pinned staging block, which
   goes to the device in one copy; the kernels run on the compute stream; the
   outputs come back in one copy. Every op has finished when it returns.

   Staging and scratch share one layout per op: [inputs | in-out | outputs],
   each section 256-byte aligned; inputs and in-out go up, in-out and outputs
   come back, and device-only scratch (attention partials) follows. */
#include "cuda-impl.h"

#include <limits.h>
#include <string.h>

#define CHECK_ST(expr)                                           \
    do {                                                         \
        st = (expr);                                             \
        if (st != PIKV_OK) goto done;                            \
    } while (0)

void pikv_cuda_layout_from(pikv_cuda_layout *o, const pikv_page_layout *L)
{
    memset(o, 0, sizeof *o);
    if (!L) return;
    o->ps = L->page_size;
    o->kvh = L->n_kv_heads;
    o->hd = L->head_dim;
    o->dtype = (int32_t)L->dtype;
    o->group = L->group;
    o->kg = L->k_groups;
    o->vg = L->v_groups;
    o->row = (uint32_t)L->row_bytes;
    o->k = (uint32_t)L->k_offset;
    o->v = (uint32_t)L->v_offset;
    o->kmin = (uint32_t)L->kmin_offset;
    o->kmax = (uint32_t)L->kmax_offset;
    o->ksc = (uint32_t)L->kscale_offset;
    o->kze = (uint32_t)L->kzero_offset;
    o->vsc = (uint32_t)L->vscale_offset;
    o->vze = (uint32_t)L->vzero_offset;
    o->hs = (uint32_t)L->head_stride;
    o->pb = (uint32_t)L->page_bytes;
}

/* The op's staging: sections are laid out first (sizes only), then the blocks
   are obtained and filled. */
typedef struct op_stage {
    size_t cursor, in_end, inout_end, out_end;
    unsigned char *host, *dev;
} op_stage;

static size_t section(op_stage *s, size_t bytes)
{
    const size_t at = s->cursor;
    s->cursor += (bytes + 255) & ~(size_t)255;
    return at;
}

static pikv_status stage_acquire(pikv_device *dev, op_stage *s)
{
    PIKV_FORWARD_IF_ERROR(pikv_cuda_pinned(dev, s->out_end ? s->out_end : 1, &s->host));
    return pikv_cuda_scratch(dev, s->cursor ? s->cursor : 1, &s->dev);
}

/* Inputs and in-out sections to the device. */
static pikv_status stage_upload(pikv_device *dev, const op_stage *s)
{
    if (s->inout_end == 0) return PIKV_OK;
    cudaError_t err = cudaMemcpyAsync(s->dev, s->host, s->inout_end, cudaMemcpyHostToDevice, pikv_cuda_dev(dev)->stream);
    return err == cudaSuccess ? PIKV_OK : pikv_cuda_fail(dev, err, "cudaMemcpyAsync (op inputs)");
}

/* In-out and output sections back, then wait for the whole op. */
static pikv_status stage_download(pikv_device *dev, const op_stage *s)
{
    pikv_cuda_device *cd = pikv_cuda_dev(dev);
    cudaError_t err = cudaSuccess;
    if (s->out_end > s->in_end)
        err = cudaMemcpyAsync(s->host + s->in_end, s->dev + s->in_end, s->out_end - s->in_end,
                              cudaMemcpyDeviceToHost, cd->stream);
    if (err != cudaSuccess) return pikv_cuda_fail(dev, err, "cudaMemcpyAsync (op outputs)");
    err = cudaStreamSynchronize(cd->stream);
    return err == cudaSuccess ? PIKV_OK : pikv_cuda_fail(dev, err, "cudaStreamSynchronize (op)");
}

/* The device address of a page slot (PIKV_SLOT_QUANT: of the quantized pool). */
static pikv_status page_address(pikv_device *dev, const pikv_pool_view *pool, uint32_t slot, uint64_t *addr)
{
    const pikv_pool_view *p = pool;
    if (slot & PIKV_SLOT_QUANT) {
        PIKV_RETURN_ERROR_IF(!pool->quant, dev->ctx, PIKV_ERR_INTERNAL,
                             "slot %#x names a quantized page but the pool has none", (unsigned)slot);
        p = pool->quant;
        slot &= ~PIKV_SLOT_QUANT;
    }
    const uint32_t chunk = slot / p->pages_per_chunk, index = slot % p->pages_per_chunk;
    PIKV_RETURN_ERROR_IF((int32_t)chunk >= p->n_chunks, dev->ctx, PIKV_ERR_INTERNAL,
                         "slot %u is past the pool's %d chunks", (unsigned)slot, (int)p->n_chunks);
    /* pikv_cuda_layout holds the offsets inside a page as 32-bit */
    PIKV_RETURN_ERROR_IF(p->layout->page_bytes > UINT32_MAX, dev->ctx, PIKV_ERR_UNSUPPORTED,
                         "device %s: pages over 4 GiB are not supported", dev->info.name);
    *addr = (uint64_t)(uintptr_t)p->chunks[chunk]->handle + (uint64_t)index * p->layout->page_bytes;
    return PIKV_OK;
}

/* On failure: wait for what was enqueued (the caller's host arrays must be
   free when we return) and leave the device. */
static pikv_status op_end(pikv_device *dev, pikv_status st, int prev)
{
    if (st != PIKV_OK) {
        cudaStreamSynchronize(pikv_cuda_dev(dev)->stream);
        cudaGetLastError();
    }
    pikv_cuda_leave(prev);
    return st;
}

/* ---- append --------------------------------------------------------------- */

pikv_status pikv_cuda_append_op(pikv_device *dev, const pikv_append_args *a)
{
    if (a->n_writes <= 0) return PIKV_OK;
    int prev;
    PIKV_FORWARD_IF_ERROR(pikv_cuda_enter(dev, &prev));
    pikv_cuda_device *cd = pikv_cuda_dev(dev);
    const pikv_page_layout *L = a->pool->layout;
    const int32_t n = a->n_writes;
    int64_t n_src = 0, idx_end = 0;
    pikv_status st = PIKV_OK;
    for (int32_t w = 0; w < n; w++) {
        const pikv_page_write *pw = &a->writes[w];
        if ((int64_t)pw->src_begin + pw->n_rows > idx_end) idx_end = (int64_t)pw->src_begin + pw->n_rows;
        for (int32_t r = 0; r < pw->n_rows; r++)
            if (a->src_index[pw->src_begin + r] + 1 > n_src) n_src = a->src_index[pw->src_begin + r] + 1;
    }
    const size_t kv_bytes = (size_t)n_src * (size_t)L->n_kv_heads * (size_t)L->head_dim * sizeof(float);
    op_stage s = {0};
    const size_t o_writes = section(&s, (size_t)n * sizeof(pikv_cuda_write));
    const size_t o_index = section(&s, (size_t)idx_end * sizeof(int32_t));
    const size_t o_k = a->src_on_device ? 0 : section(&s, kv_bytes);
    const size_t o_v = a->src_on_device ? 0 : section(&s, kv_bytes);
    s.in_end = s.inout_end = s.out_end = s.cursor;
    CHECK_ST(stage_acquire(dev, &s));
    pikv_cuda_write *writes = (pikv_cuda_write *)(s.host + o_writes);
    for (int32_t w = 0; w < n; w++) {
        const pikv_page_write *pw = &a->writes[w];
        CHECK_ST(page_address(dev, a->pool, pw->slot, &writes[w].page));
        writes[w].row0 = pw->row0;
        writes[w].n_rows = pw->n_rows;
        writes[w].src_begin = pw->src_begin;
        writes[w].pad_ = 0;
    }
    memcpy(s.host + o_index, a->src_index, (size_t)idx_end * sizeof(int32_t));
    if (!a->src_on_device) {
        memcpy(s.host + o_k, a->k, kv_bytes);
        memcpy(s.host + o_v, a->v, kv_bytes);
    }
    CHECK_ST(stage_upload(dev, &s));
    {
        pikv_cuda_layout cl;
        pikv_cuda_layout_from(&cl, L);
        const float *k = a->src_on_device ? a->k : (const float *)(s.dev + o_k);
        const float *v = a->src_on_device ? a->v : (const float *)(s.dev + o_v);
        CUDA_TRY(pikv_cuda_append(&cl, (const pikv_cuda_write *)(s.dev + o_writes), n,
                                  (const int32_t *)(s.dev + o_index), k, v, cd->stream),
                 "append kernel launch");
    }
    CHECK_ST(stage_download(dev, &s));
done:
    return op_end(dev, st, prev);
}

/* ---- page copy ------------------------------------------------------------ */

pikv_status pikv_cuda_page_copy_op(pikv_device *dev, const pikv_page_copy_args *a)
{
    int prev;
    PIKV_FORWARD_IF_ERROR(pikv_cuda_enter(dev, &prev));
    pikv_cuda_device *cd = pikv_cuda_dev(dev);
    const pikv_pool_view *pool = a->pool;
    pikv_status st = PIKV_OK;
    uint64_t src = 0, dst = 0;
    CHECK_ST(page_address(dev, pool, a->src_slot, &src));
    CHECK_ST(page_address(dev, pool, a->dst_slot, &dst));
    if ((a->src_slot & PIKV_SLOT_QUANT) && (a->dst_slot & PIKV_SLOT_QUANT)) { /* whole quantized page */
        if (src != dst)
            CUDA_TRY(cudaMemcpyAsync((void *)(uintptr_t)dst, (const void *)(uintptr_t)src,
                                     (size_t)pool->quant->layout->page_bytes, cudaMemcpyDeviceToDevice, cd->stream),
                     "cudaMemcpyAsync (page copy)");
    } else {
        if (a->dst_slot & PIKV_SLOT_QUANT) {
            st = PIKV_FAIL(dev->ctx, PIKV_ERR_INTERNAL, "page_copy: an open page into a quantized slot");
            goto done;
        }
        pikv_cuda_layout D, S;
        pikv_cuda_layout_from(&D, pool->layout);
        pikv_cuda_layout_from(&S, (a->src_slot & PIKV_SLOT_QUANT) ? pool->quant->layout : pool->layout);
        CUDA_TRY(pikv_cuda_page_copy(&D, &S, src, dst, a->n_rows, cd->stream), "page copy kernel launch");
    }
    CUDA_TRY(cudaStreamSynchronize(cd->stream), "cudaStreamSynchronize (page copy)");
done:
    return op_end(dev, st, prev);
}

/* ---- attention ------------------------------------------------------------ */

/* Pages per task: enough tasks for about eight blocks per SM over the whole
   batch, so one long sequence is split along its context and fills the GPU,
   but at least 64 tokens a task so its fixed costs stay small. */
static int32_t task_pages(const pikv_cuda_device *cd, int64_t used_pages, int32_t page_size)
{
    const int64_t target = 8 * (int64_t)cd->sm_count;
    int64_t p = (used_pages + target - 1) / target;
    const int64_t min_p = (64 + page_size - 1) / page_size;
    if (p < min_p) p = min_p;
    if (p > 1024) p = 1024;
    return (int32_t)(p < 1 ? 1 : p);
}

pikv_status pikv_cuda_attention_op(pikv_device *dev, const pikv_attention_args *a)
{
    if (a->n_queries <= 0) return PIKV_OK;
    int prev;
    PIKV_FORWARD_IF_ERROR(pikv_cuda_enter(dev, &prev));
    pikv_context *ctx = dev->ctx;
    pikv_cuda_device *cd = pikv_cuda_dev(dev);
    const pikv_pool_view *pool = a->pool;
    const pikv_page_layout *L = pool->layout;
    const int32_t kvh = L->n_kv_heads, hd = L->head_dim, G = a->n_q_heads / kvh;
    const int32_t units = a->n_queries * kvh;
    const int32_t first = a->indptr[0], E = a->indptr[units]; /* entries are indexed absolutely */
    const int32_t used = E - first;
    const int32_t P = task_pages(cd, used, L->page_size);
    int32_t n_tasks = 0;
    for (int32_t u = 0; u < units; u++) n_tasks += (a->indptr[u + 1] - a->indptr[u] + P - 1) / P;
    const size_t q_floats = (size_t)a->n_queries * (size_t)a->n_q_heads * (size_t)hd;
    const size_t lse_floats = (size_t)a->n_queries * (size_t)a->n_q_heads;
    const size_t plse_floats = a->page_lse ? (size_t)E * (size_t)G : 0;
    pikv_status st = PIKV_OK;
    op_stage s = {0};
    const size_t o_q = a->io_on_device ? 0 : section(&s, q_floats * sizeof(float));
    const size_t o_ent = section(&s, (size_t)used * sizeof(pikv_cuda_entry));
    const size_t o_tasks = section(&s, (size_t)n_tasks * sizeof(pikv_cuda_task));
    const size_t o_ltasks = section(&s, ((size_t)units + 1) * sizeof(int32_t));
    s.in_end = s.cursor;
    const size_t o_overflow = section(&s, sizeof(int));
    const size_t o_plse = section(&s, plse_floats * sizeof(float)); /* skipped entries keep their values */
    s.inout_end = s.cursor;
    const size_t o_out = a->io_on_device ? 0 : section(&s, q_floats * sizeof(float));
    const size_t o_lse = a->io_on_device ? 0 : section(&s, lse_floats * sizeof(float));
    s.out_end = s.cursor;
    const size_t o_parts = section(&s, (size_t)n_tasks * (size_t)G * ((size_t)hd + 2) * sizeof(float));
    CHECK_ST(stage_acquire(dev, &s));

    if (!a->io_on_device) memcpy(s.host + o_q, a->q, q_floats * sizeof(float));
    pikv_cuda_entry *ent = (pikv_cuda_entry *)(s.host + o_ent);
    for (int32_t e = first; e < E; e++) {
        pikv_cuda_entry *x = &ent[e - first];
        CHECK_ST(page_address(dev, pool, a->slots[e], &x->page));
        x->len = a->page_len[e];
        x->id = e;
        x->quant = (a->slots[e] & PIKV_SLOT_QUANT) ? 1 : 0;
        x->pad_ = 0;
    }
    pikv_cuda_task *tasks = (pikv_cuda_task *)(s.host + o_tasks);
    int32_t *list_tasks = (int32_t *)(s.host + o_ltasks);
    int32_t t = 0;
    for (int32_t u = 0; u < units; u++) {
        list_tasks[u] = t;
        for (int32_t e = a->indptr[u]; e < a->indptr[u + 1]; e += P) {
            tasks[t].unit = u;
            tasks[t].e0 = e - first; /* into the uploaded entries */
            tasks[t].e1 = (e + P < a->indptr[u + 1] ? e + P : a->indptr[u + 1]) - first;
            tasks[t].pad_ = 0;
            t++;
        }
    }
    list_tasks[units] = t;
    const int no_overflow = INT_MAX;
    memcpy(s.host + o_overflow, &no_overflow, sizeof no_overflow);
    if (plse_floats) memcpy(s.host + o_plse, a->page_lse, plse_floats * sizeof(float));
    CHECK_ST(stage_upload(dev, &s));
    {
        pikv_cuda_attention_launch l;
        memset(&l, 0, sizeof l);
        pikv_cuda_layout_from(&l.L, L);
        pikv_cuda_layout_from(&l.Q, pool->quant ? pool->quant->layout : NULL);
        l.n_queries = a->n_queries;
        l.n_q_heads = a->n_q_heads;
        l.scale = a->scale;
        l.q_dev = a->io_on_device ? a->q : (const float *)(s.dev + o_q);
        l.entries_dev = (const pikv_cuda_entry *)(s.dev + o_ent);
        l.tasks_dev = (const pikv_cuda_task *)(s.dev + o_tasks);
        l.n_tasks = n_tasks;
        l.list_tasks_dev = (const int32_t *)(s.dev + o_ltasks);
        l.parts_dev = (float *)(s.dev + o_parts);
        /* page_lse holds absolute entry ids: offset so id e lands at e */
        l.page_lse_dev = plse_floats ? (float *)(s.dev + o_plse) : NULL;
        l.out_dev = a->io_on_device ? a->out : (float *)(s.dev + o_out);
        l.lse_dev = a->io_on_device ? a->lse : (float *)(s.dev + o_lse);
        l.overflow_dev = (int *)(s.dev + o_overflow);
        const bool timed = cd->timing && cd->time_begin && cd->time_end;
        if (timed) CUDA_TRY(cudaEventRecord(cd->time_begin, cd->stream), "cudaEventRecord");
        CUDA_TRY(pikv_cuda_attention(&l, cd->stream), "attention kernel launch");
        if (timed) {
            CUDA_TRY(cudaEventRecord(cd->time_end, cd->stream), "cudaEventRecord");
            CUDA_TRY(cudaEventSynchronize(cd->time_end), "cudaEventSynchronize");
            CUDA_TRY(cudaEventElapsedTime(&cd->last_attention_ms, cd->time_begin, cd->time_end),
                     "cudaEventElapsedTime");
        }
    }
    CHECK_ST(stage_download(dev, &s));
    {
        int bad;
        memcpy(&bad, s.host + o_overflow, sizeof bad);
        if (bad != INT_MAX) {
            st = PIKV_FAIL(ctx, PIKV_ERR_INVALID_ARGUMENT,
                           "attention: query %d, KV head %d: a score overflowed float (q.k*scale is not finite); "
                           "the inputs are too large", (int)(bad / kvh), (int)(bad % kvh));
            goto done;
        }
    }
    if (!a->io_on_device) {
        memcpy(a->out, s.host + o_out, q_floats * sizeof(float));
        memcpy(a->lse, s.host + o_lse, lse_floats * sizeof(float));
    }
    if (plse_floats) memcpy(a->page_lse, s.host + o_plse, plse_floats * sizeof(float));
done:
    return op_end(dev, st, prev);
}

/* ---- merge ---------------------------------------------------------------- */

pikv_status pikv_cuda_merge_op(pikv_device *dev, const pikv_merge_args *a)
{
    PIKV_RETURN_ERROR_IF(a->dim < 1 || a->dim > 1024, dev->ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "merge: dim %d is outside 1..1024", a->dim);
    if (a->n_rows <= 0) return PIKV_OK;
    int prev;
    PIKV_FORWARD_IF_ERROR(pikv_cuda_enter(dev, &prev));
    pikv_cuda_device *cd = pikv_cuda_dev(dev);
    const size_t rows = (size_t)a->n_rows, parts = a->n_parts > 0 ? (size_t)a->n_parts : 0, dim = (size_t)a->dim;
    pikv_status st = PIKV_OK;
    op_stage s = {0};
    const size_t o_po = section(&s, parts * rows * dim * sizeof(float));
    const size_t o_pl = section(&s, parts * rows * sizeof(float));
    s.in_end = s.inout_end = s.cursor;
    const size_t o_out = section(&s, rows * dim * sizeof(float));
    const size_t o_lse = section(&s, rows * sizeof(float));
    s.out_end = s.cursor;
    CHECK_ST(stage_acquire(dev, &s));
    memcpy(s.host + o_po, a->part_out, parts * rows * dim * sizeof(float));
    memcpy(s.host + o_pl, a->part_lse, parts * rows * sizeof(float));
    CHECK_ST(stage_upload(dev, &s));
    CUDA_TRY(pikv_cuda_merge((int32_t)parts, a->n_rows, a->dim, (const float *)(s.dev + o_po),
                             (const float *)(s.dev + o_pl), (float *)(s.dev + o_out),
                             a->lse ? (float *)(s.dev + o_lse) : NULL, cd->stream),
             "merge kernel launch");
    CHECK_ST(stage_download(dev, &s));
    memcpy(a->out, s.host + o_out, rows * dim * sizeof(float));
    if (a->lse) memcpy(a->lse, s.host + o_lse, rows * sizeof(float));
done:
    return op_end(dev, st, prev);
}

/* ---- Quest scores ----------------------------------------------------------- */

pikv_status pikv_cuda_score_op(pikv_device *dev, const pikv_score_args *a)
{
    const int32_t n = a->n_queries > 0 ? a->indptr[a->n_queries] : 0;
    const int32_t first = a->n_queries > 0 ? a->indptr[0] : 0;
    if (n - first <= 0) return PIKV_OK;
    int prev;
    PIKV_FORWARD_IF_ERROR(pikv_cuda_enter(dev, &prev));
    pikv_cuda_device *cd = pikv_cuda_dev(dev);
    const pikv_pool_view *pool = a->pool;
    const pikv_page_layout *L = pool->layout;
    const int32_t kvh = L->n_kv_heads, m = n - first;
    const size_t q_floats = (size_t)a->n_queries * (size_t)a->n_q_heads * (size_t)L->head_dim;
    pikv_status st = PIKV_OK;
    op_stage s = {0};
    const size_t o_cand = section(&s, (size_t)m * sizeof(pikv_cuda_candidate));
    const size_t o_q = section(&s, q_floats * sizeof(float));
    s.in_end = s.inout_end = s.cursor;
    const size_t o_sc = section(&s, (size_t)m * (size_t)kvh * sizeof(float));
    s.out_end = s.cursor;
    CHECK_ST(stage_acquire(dev, &s));
    pikv_cuda_candidate *cand = (pikv_cuda_candidate *)(s.host + o_cand);
    for (int32_t i = 0; i < a->n_queries; i++)
        for (int32_t c = a->indptr[i]; c < a->indptr[i + 1]; c++) {
            pikv_cuda_candidate *x = &cand[c - first];
            CHECK_ST(page_address(dev, pool, a->slots[c], &x->page));
            x->query = i;
            x->quant = (a->slots[c] & PIKV_SLOT_QUANT) ? 1 : 0;
        }
    memcpy(s.host + o_q, a->q, q_floats * sizeof(float));
    CHECK_ST(stage_upload(dev, &s));
    {
        pikv_cuda_layout cl, cq;
        pikv_cuda_layout_from(&cl, L);
        pikv_cuda_layout_from(&cq, pool->quant ? pool->quant->layout : NULL);
        CUDA_TRY(pikv_cuda_score(&cl, &cq, (const pikv_cuda_candidate *)(s.dev + o_cand), m,
                                 (const float *)(s.dev + o_q), a->n_q_heads, (float *)(s.dev + o_sc), cd->stream),
                 "score kernel launch");
    }
    CHECK_ST(stage_download(dev, &s));
    /* scores of candidates before indptr[0] keep the caller's values */
    memcpy(a->scores + (size_t)first * (size_t)kvh, s.host + o_sc, (size_t)m * (size_t)kvh * sizeof(float));
done:
    return op_end(dev, st, prev);
}

/* ---- budgeted top-k --------------------------------------------------------- */

pikv_status pikv_cuda_topk_op(pikv_device *dev, const pikv_topk_args *a)
{
    if (a->n_lists <= 0) return PIKV_OK;
    const int32_t n = a->indptr[a->n_lists];
    if (n <= 0) return PIKV_OK;
    int prev;
    PIKV_FORWARD_IF_ERROR(pikv_cuda_enter(dev, &prev));
    pikv_cuda_device *cd = pikv_cuda_dev(dev);
    pikv_status st = PIKV_OK;
    op_stage s = {0};
    const size_t o_ptr = section(&s, ((size_t)a->n_lists + 1) * sizeof(int32_t));
    const size_t o_sc = section(&s, (size_t)n * sizeof(float));
    const size_t o_tok = section(&s, (size_t)n * sizeof(int32_t));
    const size_t o_bud = section(&s, (size_t)a->n_lists * sizeof(int64_t));
    s.in_end = s.cursor;
    /* entries before indptr[0] belong to no list: their keep bytes go up and
       come back unchanged */
    const size_t o_keep = section(&s, (size_t)n);
    s.inout_end = s.out_end = s.cursor;
    CHECK_ST(stage_acquire(dev, &s));
    memcpy(s.host + o_ptr, a->indptr, ((size_t)a->n_lists + 1) * sizeof(int32_t));
    memcpy(s.host + o_sc, a->scores, (size_t)n * sizeof(float));
    memcpy(s.host + o_tok, a->tokens, (size_t)n * sizeof(int32_t));
    memcpy(s.host + o_bud, a->budget, (size_t)a->n_lists * sizeof(int64_t));
    memcpy(s.host + o_keep, a->keep, (size_t)n);
    CHECK_ST(stage_upload(dev, &s));
    CUDA_TRY(pikv_cuda_topk(a->n_lists, (const int32_t *)(s.dev + o_ptr), (const float *)(s.dev + o_sc),
                            (const int32_t *)(s.dev + o_tok), (const int64_t *)(s.dev + o_bud),
                            (uint8_t *)(s.dev + o_keep), cd->stream),
             "topk kernel launch");
    CHECK_ST(stage_download(dev, &s));
    memcpy(a->keep, s.host + o_keep, (size_t)n);
done:
    return op_end(dev, st, prev);
}

/* ---- quantize --------------------------------------------------------------- */

pikv_status pikv_cuda_quantize_op(pikv_device *dev, pikv_quantize_args *a)
{
    const pikv_pool_view *pool = a->pool;
    PIKV_RETURN_ERROR_IF(!pool->quant, dev->ctx, PIKV_ERR_INTERNAL, "quantize: the pool has no quantized pool");
    int prev;
    PIKV_FORWARD_IF_ERROR(pikv_cuda_enter(dev, &prev));
    pikv_cuda_device *cd = pikv_cuda_dev(dev);
    pikv_cuda_layout S, Q;
    pikv_cuda_layout_from(&S, pool->layout);
    pikv_cuda_layout_from(&Q, pool->quant->layout);
    int64_t nk = 0, nv = 0;
    pikv_cuda_quantize_items(&S, &Q, &nk, &nv);
    pikv_status st = PIKV_OK;
    uint64_t src = 0, dst = 0;
    op_stage s = {0};
    s.in_end = s.inout_end = 0;
    const size_t o_err = section(&s, 3 * (size_t)(nk + nv) * sizeof(float));
    s.out_end = s.cursor;
    CHECK_ST(page_address(dev, pool, a->src_slot & ~PIKV_SLOT_QUANT, &src));
    CHECK_ST(page_address(dev, pool, a->dst_slot | PIKV_SLOT_QUANT, &dst));
    CHECK_ST(stage_acquire(dev, &s));
    CUDA_TRY(pikv_cuda_quantize(&S, &Q, src, dst, (float *)(s.dev + o_err), cd->stream), "quantize kernel launch");
    CHECK_ST(stage_download(dev, &s));
    {
        const float *errs = (const float *)(s.host + o_err);
        double e[5] = {0, 0, 0, 0, 0};
        for (int64_t i = 0; i < nk + nv; i++) {
            const int at = i < nk ? 0 : 2; /* keys then values */
            e[at] += errs[3 * i];
            e[at + 1] += errs[3 * i + 1];
            e[4] = errs[3 * i + 2] > e[4] ? errs[3 * i + 2] : e[4];
        }
        for (int i = 0; i < 4; i++) a->err[i] += e[i];
        a->err[4] = e[4] > a->err[4] ? e[4] : a->err[4];
    }
done:
    return op_end(dev, st, prev);
}

/* ---- zero-copy input check -------------------------------------------------- */

pikv_status pikv_cuda_find_out_of_range_op(pikv_device *dev, const float *ptr, int64_t n, float limit,
                                           int64_t *first)
{
    *first = -1;
    if (n <= 0) return PIKV_OK;
    int prev;
    PIKV_FORWARD_IF_ERROR(pikv_cuda_enter(dev, &prev));
    pikv_cuda_device *cd = pikv_cuda_dev(dev);
    pikv_status st = PIKV_OK;
    op_stage s = {0};
    const size_t o_res = section(&s, sizeof(long long));
    s.out_end = s.cursor;
    CHECK_ST(stage_acquire(dev, &s));
    CUDA_TRY(pikv_cuda_find_out_of_range(ptr, n, limit, (long long *)(s.dev + o_res), cd->stream),
             "find_out_of_range launch");
    CHECK_ST(stage_download(dev, &s));
    {
        long long r;
        memcpy(&r, s.host + o_res, sizeof r);
        *first = r == LLONG_MAX ? -1 : (int64_t)r;
    }
done:
    return op_end(dev, st, prev);
}

/* ---- read_reduce (the roofline probe) ------------------------------------- */

pikv_status pikv_cuda_read_reduce_op(pikv_device *dev, const pikv_read_reduce_args *a)
{
    PIKV_RETURN_ERROR_IF(a->n_floats > a->buf->size / sizeof(float), dev->ctx, PIKV_ERR_OUT_OF_RANGE,
                         "read_reduce: %llu floats past a buffer of %llu bytes", (unsigned long long)a->n_floats,
                         (unsigned long long)a->buf->size);
    *a->sum = 0;
    if (a->n_floats == 0) return PIKV_OK;
    int prev;
    PIKV_FORWARD_IF_ERROR(pikv_cuda_enter(dev, &prev));
    pikv_cuda_device *cd = pikv_cuda_dev(dev);
    pikv_status st = PIKV_OK;
    /* eight blocks per SM keep enough loads in flight; the grid stride covers the rest */
    const uint64_t n4 = a->n_floats / 4, want = (n4 + 255) / 256;
    const uint64_t cap = (uint64_t)(cd->sm_count > 0 ? cd->sm_count : 1) * 8;
    const int32_t blocks = (int32_t)(want == 0 ? 1 : want < cap ? want : cap);
    unsigned char *parts_dev = NULL, *parts_host = NULL;
    CHECK_ST(pikv_cuda_scratch(dev, (size_t)blocks * sizeof(double), &parts_dev));
    CHECK_ST(pikv_cuda_pinned(dev, (size_t)blocks * sizeof(double), &parts_host));
    CUDA_TRY(pikv_cuda_read_reduce((const float *)a->buf->handle, a->n_floats, (double *)parts_dev, blocks,
                                   cd->stream),
             "read_reduce kernel launch");
    CUDA_TRY(cudaMemcpyAsync(parts_host, parts_dev, (size_t)blocks * sizeof(double), cudaMemcpyDeviceToHost,
                             cd->stream),
             "cudaMemcpyAsync (read_reduce partials)");
    CUDA_TRY(cudaStreamSynchronize(cd->stream), "cudaStreamSynchronize (read_reduce)");
    double sum = 0;
    for (int32_t b = 0; b < blocks; b++) sum += ((const double *)parts_host)[b];
    *a->sum = sum;
done:
    return op_end(dev, st, prev);
}
