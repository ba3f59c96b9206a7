/* Dispatch of the ops on Vulkan: host-side planning (pages grouped by chunk,
   backends/common/chunk-plan.h), inputs copied into host-visible scratch
   buffers, one dispatch per chunk touched, one submission per op (split only
   when the descriptor pool runs out), outputs read from the mapped scratch.
   Every op has finished when it returns. */
#include "vulkan-impl.h"

#include "../common/chunk-plan.h"

#include <limits.h>
#include <string.h>

enum { TASK_PAGES = 8 }; /* pages per attention task at most (more tasks = more parallelism) */

/* scratch buffer indices */
enum { S_LAY = 0, S_A, S_B, S_C, S_D, S_E, S_F, S_G, S_OUT, S_LSE, S_PLSE, S_ERR, S_PARTS };

#define CHECK_ST(expr)                                           \
    do {                                                         \
        st = (expr);                                             \
        if (st != PIKV_OK) goto done;                            \
    } while (0)

typedef pikv_vk_host_buffer hbuf;

static VkBuffer chunk_of(const pikv_pool_view *pool, int32_t key)
{
    return ((const pikv_vk_buffer *)pikv_chunk_buffer(pool, key)->handle)->buffer;
}

/* A pool's chunks are all one size; the kernels bind a chunk whole, so it must
   fit in one binding (buffer_alloc takes larger buffers for read_reduce). */
static pikv_status check_chunk_size(pikv_device *dev, const pikv_pool_view *pool)
{
    const pikv_vk_device *vd = pikv_vk_dev(dev);
    const uint64_t size = pool && pool->n_chunks > 0 ? pool->chunks[0]->size : 0;
    PIKV_RETURN_ERROR_IF(size > vd->limits.maxStorageBufferRange, dev->ctx, PIKV_ERR_UNSUPPORTED,
                         "device %s: a page chunk of %llu bytes is past the device's storage buffer range (%u "
                         "bytes); use smaller pages", dev->info.name, (unsigned long long)size,
                         (unsigned)vd->limits.maxStorageBufferRange);
    return PIKV_OK;
}

static pikv_status upload_layouts(pikv_device *dev, const pikv_pool_view *pool, hbuf **out)
{
    PIKV_FORWARD_IF_ERROR(check_chunk_size(dev, pool));
    PIKV_FORWARD_IF_ERROR(check_chunk_size(dev, pool->quant));
    uint32_t lay[2 * PIKV_LAYOUT_WORDS];
    pikv_pool_layout_words(lay, pool);
    return pikv_vk_upload(dev, S_LAY, lay, sizeof lay, out);
}

static uint64_t groups_for(const pikv_device *dev, uint64_t items)
{
    const uint64_t wg = ((const pikv_vk_device *)dev->context)->wg;
    return (items + wg - 1) / wg;
}

/* ---- append ------------------------------------------------------------------ */

pikv_status pikv_vk_append(pikv_device *dev, const pikv_append_args *a)
{
    if (a->n_writes <= 0) return PIKV_OK;
    PIKV_FORWARD_IF_ERROR(pikv_vk_ready(dev));
    const pikv_pool_view *pool = a->pool;
    const int32_t kvh = pool->layout->n_kv_heads, hd = pool->layout->head_dim;
    pikv_append_plan p = {0};
    pikv_status st = PIKV_OK;
    hbuf *lay, *mw, *mo, *mi, *mk, *mv;
    CHECK_ST(pikv_append_plan_build(dev, a, &p));
    const size_t kv_bytes = (size_t)p.n_src * (size_t)kvh * (size_t)hd * sizeof(float);
    CHECK_ST(upload_layouts(dev, pool, &lay));
    CHECK_ST(pikv_vk_upload(dev, S_A, p.writes, 4 * (size_t)a->n_writes * sizeof(int32_t), &mw));
    CHECK_ST(pikv_vk_upload(dev, S_B, p.order, (size_t)a->n_writes * sizeof(int32_t), &mo));
    CHECK_ST(pikv_vk_upload(dev, S_C, a->src_index, (size_t)p.idx_end * sizeof(int32_t), &mi));
    CHECK_ST(pikv_vk_upload(dev, S_D, a->k, kv_bytes, &mk));
    CHECK_ST(pikv_vk_upload(dev, S_E, a->v, kv_bytes, &mv));
    for (int32_t c = 0; c < p.n_keys; c++) {
        const int32_t items = p.kptr[c + 1] - p.kptr[c];
        if (items == 0) continue;
        const VkBuffer b[] = {chunk_of(pool, c), lay->buffer, mw->buffer, mo->buffer, mi->buffer, mk->buffer,
                              mv->buffer};
        const int32_t push[2] = {p.kptr[c], items};
        CHECK_ST(pikv_vk_dispatch(dev, PIKV_VK_K_APPEND, VK_NULL_HANDLE, b, 7, push, sizeof push,
                                  groups_for(dev, (uint64_t)items * (uint64_t)kvh * (uint64_t)hd)));
    }
    st = pikv_vk_submit(dev);
done:
    if (st != PIKV_OK) pikv_vk_abandon(dev);
    pikv_append_plan_free(dev->ctx, &p);
    return st;
}

/* ---- page copy ------------------------------------------------------------ */

pikv_status pikv_vk_page_copy(pikv_device *dev, const pikv_page_copy_args *a)
{
    PIKV_FORWARD_IF_ERROR(pikv_vk_ready(dev));
    pikv_vk_device *vd = pikv_vk_dev(dev);
    const pikv_pool_view *pool = a->pool;
    int32_t skey = 0, dkey = 0;
    uint32_t soff = 0, doff = 0;
    PIKV_FORWARD_IF_ERROR(pikv_chunk_resolve(dev, pool, a->src_slot, &skey, &soff));
    PIKV_FORWARD_IF_ERROR(pikv_chunk_resolve(dev, pool, a->dst_slot, &dkey, &doff));
    const bool src_quant = (a->src_slot & PIKV_SLOT_QUANT) != 0, dst_quant = (a->dst_slot & PIKV_SLOT_QUANT) != 0;
    PIKV_RETURN_ERROR_IF(dst_quant && !src_quant, dev->ctx, PIKV_ERR_INTERNAL,
                         "page_copy: an open page into a quantized slot");
    pikv_status st = PIKV_OK;
    CHECK_ST(pikv_vk_begin(dev));
    if (src_quant && dst_quant) { /* whole quantized page */
        if (a->src_slot != a->dst_slot) {
            VkBufferCopy region = {.srcOffset = soff, .dstOffset = doff, .size = pool->quant->layout->page_bytes};
            vd->fn.vkCmdCopyBuffer(vd->cmd, chunk_of(pool, skey), chunk_of(pool, dkey), 1, &region);
        }
    } else {
        hbuf *lay;
        CHECK_ST(upload_layouts(dev, pool, &lay));
        const VkBuffer b[] = {chunk_of(pool, skey), chunk_of(pool, dkey), lay->buffer};
        /* the same page: only its bounds are recomputed (no stores racing with reads) */
        const uint32_t push[5] = {soff, doff, src_quant ? (uint32_t)PIKV_LAYOUT_WORDS : 0u, (uint32_t)a->n_rows,
                                  a->src_slot == a->dst_slot};
        const pikv_page_layout *L = pool->layout;
        CHECK_ST(pikv_vk_dispatch(dev, PIKV_VK_K_PAGE_COPY, VK_NULL_HANDLE, b, 3, push, sizeof push,
                                  groups_for(dev, (uint64_t)L->n_kv_heads * (uint64_t)L->head_dim)));
    }
    st = pikv_vk_submit(dev);
done:
    if (st != PIKV_OK) pikv_vk_abandon(dev);
    return st;
}

/* ---- attention ------------------------------------------------------------ */

pikv_status pikv_vk_attention(pikv_device *dev, const pikv_attention_args *a)
{
    if (a->n_queries <= 0) return PIKV_OK;
    PIKV_FORWARD_IF_ERROR(pikv_vk_ready(dev));
    pikv_context *ctx = dev->ctx;
    const pikv_pool_view *pool = a->pool;
    const pikv_page_layout *L = pool->layout;
    const int32_t kvh = L->n_kv_heads, hd = L->head_dim, G = a->n_q_heads / kvh;
    /* one pipeline serves both pools: quantized pages have the same page size */
    VkPipeline attn = VK_NULL_HANDLE;
    PIKV_FORWARD_IF_ERROR(pikv_vk_attention_pipeline(dev, G, L->page_size, hd, &attn));
    const int32_t units = a->n_queries * kvh;
    pikv_vk_device *vd = pikv_vk_dev(dev);
    int32_t task_pages = TASK_PAGES;
    if (vd->loop_limit) { /* the loop iterations of one invocation over one page (attention.comp), bounded */
        const int64_t W = vd->wg, ps = L->page_size, rows = (ps + W - 1) / W;
        const int64_t per_page = rows * ((G + 7) / 8) * hd + G * (2 * rows + 16) + ((G * hd + W - 1) / W) * ps + 2;
        task_pages = (int32_t)(PIKV_VK_CPU_LOOP_LIMIT / per_page);
        if (task_pages > TASK_PAGES) task_pages = TASK_PAGES;
        PIKV_RETURN_ERROR_IF(task_pages < 1, ctx, PIKV_ERR_UNSUPPORTED,
                             "attention: pages of %d tokens with head_dim %d and %d query heads per KV head are too "
                             "large for device %s (a CPU Vulkan driver whose loops stop after 65535 iterations)",
                             (int)ps, (int)hd, (int)G, dev->info.name);
    }
    pikv_attention_plan p = {0};
    pikv_status st = PIKV_OK;
    CHECK_ST(pikv_attention_plan_build(dev, a, task_pages, &p));
    if (vd->loop_limit)
        for (int32_t u = 0; u < units; u++) {
            const int64_t tasks = p.list_tasks[u + 1] - p.list_tasks[u];
            if (tasks * (hd + 2) > PIKV_VK_CPU_LOOP_LIMIT) {
                st = PIKV_FAIL(ctx, PIKV_ERR_UNSUPPORTED, "attention: query %d, KV head %d reads %lld page runs, too "
                               "many for device %s (a CPU Vulkan driver whose loops stop after 65535 iterations)",
                               (int)(u / kvh), (int)(u % kvh), (long long)tasks, dev->info.name);
                goto done;
            }
        }
    const size_t out_floats = (size_t)a->n_queries * (size_t)a->n_q_heads * (size_t)hd;
    const size_t lse_floats = (size_t)a->n_queries * (size_t)a->n_q_heads;
    const size_t plse_floats = a->page_lse ? (size_t)a->indptr[units] * (size_t)G : 0;
    hbuf *lay, *mq, *mt, *mct, *moff, *mlen, *mid, *mut, *mparts, *mout, *mlse, *mplse, *merr;
    CHECK_ST(upload_layouts(dev, pool, &lay));
    CHECK_ST(pikv_vk_upload(dev, S_A, a->q, out_floats * sizeof(float), &mq));
    CHECK_ST(pikv_vk_upload(dev, S_B, p.tasks, 3 * (size_t)p.n_tasks * sizeof(int32_t), &mt));
    CHECK_ST(pikv_vk_upload(dev, S_C, p.chunk_tasks, (size_t)p.n_tasks * sizeof(int32_t), &mct));
    CHECK_ST(pikv_vk_upload(dev, S_D, p.offset, (size_t)p.n_used * sizeof(uint32_t), &moff));
    CHECK_ST(pikv_vk_upload(dev, S_E, p.len, (size_t)p.n_used * sizeof(int32_t), &mlen));
    CHECK_ST(pikv_vk_upload(dev, S_F, p.perm, (size_t)p.n_used * sizeof(int32_t), &mid));
    CHECK_ST(pikv_vk_upload(dev, S_G, p.list_tasks, ((size_t)units + 1) * sizeof(int32_t), &mut));
    CHECK_ST(pikv_vk_scratch(dev, S_PARTS, (size_t)p.n_tasks * (size_t)G * ((size_t)hd + 2) * sizeof(float),
                             &mparts));
    CHECK_ST(pikv_vk_scratch(dev, S_OUT, out_floats * sizeof(float), &mout));
    CHECK_ST(pikv_vk_scratch(dev, S_LSE, lse_floats * sizeof(float), &mlse));
    /* page_lse: entries skipped (empty pages) keep the caller's values */
    CHECK_ST(pikv_vk_upload(dev, S_PLSE, a->page_lse, plse_floats * sizeof(float), &mplse));
    const int32_t no_error = INT_MAX;
    CHECK_ST(pikv_vk_upload(dev, S_ERR, &no_error, sizeof no_error, &merr));
    for (int32_t c = 0; c < p.n_keys; c++) {
        const int32_t items = p.tkptr[c + 1] - p.tkptr[c];
        if (items == 0) continue;
        const VkBuffer b[] = {chunk_of(pool, c), lay->buffer,  mq->buffer,  mt->buffer,     mct->buffer,
                              moff->buffer,      mlen->buffer, mid->buffer, mparts->buffer, mplse->buffer};
        struct {
            int32_t lay_off, ct_begin, n_q_heads, G;
            float scale;
            int32_t want_page_lse, n_groups;
        } push = {c < pool->n_chunks ? 0 : PIKV_LAYOUT_WORDS, p.tkptr[c], a->n_q_heads, G, a->scale,
                  a->page_lse != NULL, items};
        CHECK_ST(pikv_vk_dispatch(dev, PIKV_VK_K_ATTENTION, attn, b, 10, &push, sizeof push, (uint64_t)items));
    }
    pikv_vk_barrier(dev);
    {
        const VkBuffer b[] = {mut->buffer, mparts->buffer, mout->buffer, mlse->buffer, merr->buffer};
        const int32_t push[5] = {units * G, G, hd, a->n_q_heads, kvh};
        CHECK_ST(pikv_vk_dispatch(dev, PIKV_VK_K_ATTENTION_FINISH, VK_NULL_HANDLE, b, 5, push, sizeof push,
                                  groups_for(dev, (uint64_t)units * (uint64_t)G)));
    }
    CHECK_ST(pikv_vk_submit(dev));
    int32_t bad;
    memcpy(&bad, merr->map, sizeof bad);
    if (bad != INT_MAX) {
        st = PIKV_FAIL(ctx, PIKV_ERR_INVALID_ARGUMENT,
                       "attention: query %d, KV head %d: a score overflowed float (q.k*scale is not finite); "
                       "the inputs are too large", (int)(bad / kvh), (int)(bad % kvh));
        goto done;
    }
    memcpy(a->out, mout->map, out_floats * sizeof(float));
    memcpy(a->lse, mlse->map, lse_floats * sizeof(float));
    if (a->page_lse) memcpy(a->page_lse, mplse->map, plse_floats * sizeof(float));
done:
    if (st != PIKV_OK) pikv_vk_abandon(dev);
    pikv_attention_plan_free(ctx, &p);
    return st;
}

/* ---- merge ---------------------------------------------------------------- */

pikv_status pikv_vk_merge(pikv_device *dev, const pikv_merge_args *a)
{
    PIKV_RETURN_ERROR_IF(a->dim < 1, dev->ctx, PIKV_ERR_INVALID_ARGUMENT, "merge: dim %d is below 1", a->dim);
    if (a->n_rows <= 0) return PIKV_OK;
    PIKV_FORWARD_IF_ERROR(pikv_vk_ready(dev));
    pikv_status st = PIKV_OK;
    const size_t rows = (size_t)a->n_rows, parts = a->n_parts > 0 ? (size_t)a->n_parts : 0;
    hbuf *mpo, *mpl, *mout, *mlse;
    CHECK_ST(pikv_vk_upload(dev, S_A, a->part_out, parts * rows * (size_t)a->dim * sizeof(float), &mpo));
    CHECK_ST(pikv_vk_upload(dev, S_B, a->part_lse, parts * rows * sizeof(float), &mpl));
    CHECK_ST(pikv_vk_scratch(dev, S_OUT, rows * (size_t)a->dim * sizeof(float), &mout));
    CHECK_ST(pikv_vk_scratch(dev, S_LSE, rows * sizeof(float), &mlse));
    {
        const VkBuffer b[] = {mpo->buffer, mpl->buffer, mout->buffer, mlse->buffer};
        const int32_t push[4] = {(int32_t)parts, a->n_rows, a->dim, a->lse != NULL};
        CHECK_ST(pikv_vk_dispatch(dev, PIKV_VK_K_MERGE, VK_NULL_HANDLE, b, 4, push, sizeof push,
                                  groups_for(dev, rows)));
    }
    CHECK_ST(pikv_vk_submit(dev));
    memcpy(a->out, mout->map, rows * (size_t)a->dim * sizeof(float));
    if (a->lse) memcpy(a->lse, mlse->map, rows * sizeof(float));
done:
    if (st != PIKV_OK) pikv_vk_abandon(dev);
    return st;
}

/* ---- Quest scores ----------------------------------------------------------- */

pikv_status pikv_vk_score(pikv_device *dev, const pikv_score_args *a)
{
    const int32_t n = a->n_queries > 0 ? a->indptr[a->n_queries] : 0;
    if (n == 0) return PIKV_OK;
    PIKV_FORWARD_IF_ERROR(pikv_vk_ready(dev));
    const pikv_pool_view *pool = a->pool;
    const int32_t kvh = pool->layout->n_kv_heads, hd = pool->layout->head_dim, G = a->n_q_heads / kvh;
    pikv_score_plan p = {0};
    pikv_status st = PIKV_OK;
    hbuf *lay, *moff, *mqof, *mo, *mq, *msc;
    CHECK_ST(pikv_score_plan_build(dev, a, &p));
    const size_t q_floats = (size_t)a->n_queries * (size_t)a->n_q_heads * (size_t)hd;
    const size_t n_scored = (size_t)(n - a->indptr[0]);
    CHECK_ST(upload_layouts(dev, pool, &lay));
    CHECK_ST(pikv_vk_upload(dev, S_A, p.offset, (size_t)n * sizeof(uint32_t), &moff));
    CHECK_ST(pikv_vk_upload(dev, S_B, p.query, (size_t)n * sizeof(int32_t), &mqof));
    CHECK_ST(pikv_vk_upload(dev, S_C, p.order, n_scored * sizeof(int32_t), &mo));
    CHECK_ST(pikv_vk_upload(dev, S_D, a->q, q_floats * sizeof(float), &mq));
    /* scores of candidates before indptr[0] keep the caller's values */
    CHECK_ST(pikv_vk_upload(dev, S_OUT, a->scores, (size_t)n * (size_t)kvh * sizeof(float), &msc));
    for (int32_t c = 0; c < p.n_keys; c++) {
        const int32_t items = p.kptr[c + 1] - p.kptr[c];
        if (items == 0) continue;
        const VkBuffer b[] = {chunk_of(pool, c), lay->buffer, moff->buffer, mqof->buffer,
                              mo->buffer,        mq->buffer,  msc->buffer};
        const int32_t push[5] = {c < pool->n_chunks ? 0 : PIKV_LAYOUT_WORDS, p.kptr[c], items, a->n_q_heads, G};
        CHECK_ST(pikv_vk_dispatch(dev, PIKV_VK_K_SCORE, VK_NULL_HANDLE, b, 7, push, sizeof push,
                                  groups_for(dev, (uint64_t)items * (uint64_t)kvh)));
    }
    CHECK_ST(pikv_vk_submit(dev));
    memcpy(a->scores, msc->map, (size_t)n * (size_t)kvh * sizeof(float));
done:
    if (st != PIKV_OK) pikv_vk_abandon(dev);
    pikv_score_plan_free(dev->ctx, &p);
    return st;
}

/* ---- quantize --------------------------------------------------------------- */

pikv_status pikv_vk_quantize(pikv_device *dev, pikv_quantize_args *a)
{
    PIKV_FORWARD_IF_ERROR(pikv_vk_ready(dev));
    pikv_context *ctx = dev->ctx;
    pikv_vk_device *vd = pikv_vk_dev(dev);
    const pikv_pool_view *pool = a->pool;
    PIKV_RETURN_ERROR_IF(!pool->quant, ctx, PIKV_ERR_INTERNAL, "quantize: the pool has no quantized pool");
    const pikv_page_layout *S = pool->layout, *Q = pool->quant->layout;
    const int32_t kvh = S->n_kv_heads, hd = S->head_dim, ps = S->page_size;
    const int32_t per = Q->dtype == PIKV_DTYPE_INT4 ? 2 : 1, ncol = (hd + per - 1) / per;
    const size_t n_key_items = (size_t)kvh * (size_t)Q->k_groups * (size_t)ncol;
    const size_t n_val_items = (size_t)kvh * (size_t)ps;
    int32_t skey = 0, dkey = 0;
    uint32_t soff = 0, doff = 0;
    PIKV_FORWARD_IF_ERROR(pikv_chunk_resolve(dev, pool, a->src_slot & ~PIKV_SLOT_QUANT, &skey, &soff));
    PIKV_FORWARD_IF_ERROR(pikv_chunk_resolve(dev, pool, a->dst_slot | PIKV_SLOT_QUANT, &dkey, &doff));
    pikv_status st = PIKV_OK;
    hbuf *lay, *mek, *mev;
    CHECK_ST(upload_layouts(dev, pool, &lay));
    CHECK_ST(pikv_vk_scratch(dev, S_A, 3 * n_key_items * sizeof(float), &mek));
    CHECK_ST(pikv_vk_scratch(dev, S_B, 3 * n_val_items * sizeof(float), &mev));
    CHECK_ST(pikv_vk_begin(dev));
    {
        const VkBuffer src = chunk_of(pool, skey), dst = chunk_of(pool, dkey);
        vd->fn.vkCmdFillBuffer(vd->cmd, dst, doff, Q->page_bytes, 0); /* page_bytes is a multiple of 64 */
        pikv_vk_barrier(dev); /* transfer commands are not ordered among themselves */
        /* Quest bounds: those of the f16 keys (min then max, contiguous in both layouts) */
        VkBufferCopy region = {.srcOffset = soff + S->kmin_offset,
                               .dstOffset = doff + Q->kmin_offset,
                               .size = 2 * (VkDeviceSize)kvh * (VkDeviceSize)hd * sizeof(float)};
        vd->fn.vkCmdCopyBuffer(vd->cmd, src, dst, 1, &region);
        pikv_vk_barrier(dev);
        const uint32_t push[2] = {soff, doff};
        const VkBuffer bk[] = {src, dst, lay->buffer, mek->buffer};
        CHECK_ST(pikv_vk_dispatch(dev, PIKV_VK_K_QUANT_KEYS, VK_NULL_HANDLE, bk, 4, push, sizeof push,
                                  groups_for(dev, n_key_items)));
        const VkBuffer bv[] = {src, dst, lay->buffer, mev->buffer};
        CHECK_ST(pikv_vk_dispatch(dev, PIKV_VK_K_QUANT_VALUES, VK_NULL_HANDLE, bv, 4, push, sizeof push,
                                  groups_for(dev, n_val_items)));
    }
    CHECK_ST(pikv_vk_submit(dev));
    pikv_quantize_errors_add(a, mek->map, n_key_items, mev->map, n_val_items);
done:
    if (st != PIKV_OK) pikv_vk_abandon(dev);
    return st;
}

/* ---- budgeted top-k --------------------------------------------------------- */

pikv_status pikv_vk_topk(pikv_device *dev, const pikv_topk_args *a)
{
    if (a->n_lists <= 0) return PIKV_OK;
    PIKV_FORWARD_IF_ERROR(pikv_vk_ready(dev));
    pikv_context *ctx = dev->ctx;
    const int32_t n = a->indptr[a->n_lists];
    pikv_status st = PIKV_OK;
    /* The shader has no 64-bit integers (an optional feature): a budget at or
       past the list's total tokens keeps every entry, so it is clamped there. */
    int32_t *budget = pikv_host_alloc(ctx, (size_t)a->n_lists * sizeof *budget, 16);
    PIKV_RETURN_ERROR_IF(!budget, ctx, PIKV_ERR_OUT_OF_MEMORY, "topk: host scratch for %d lists: allocation failed",
                         (int)a->n_lists);
    hbuf *mptr, *msc, *mtok, *mbud, *mkeep, *msorted;
    pikv_vk_device *vd = pikv_vk_dev(dev);
    for (int32_t l = 0; l < a->n_lists; l++) {
        const int64_t m = a->indptr[l + 1] - a->indptr[l];
        int64_t total = 0;
        for (int32_t i = a->indptr[l]; i < a->indptr[l + 1]; i++) total += a->tokens[i] > 0 ? a->tokens[i] : 0;
        if (total > INT32_MAX) {
            st = PIKV_FAIL(ctx, PIKV_ERR_UNSUPPORTED, "topk: list %d holds %lld tokens, past the Vulkan kernel's "
                           "32-bit range", (int)l, (long long)total);
            goto done;
        }
        if (vd->loop_limit && (m + PIKV_VK_TOPK_WG - 1) / PIKV_VK_TOPK_WG * m + m > PIKV_VK_CPU_LOOP_LIMIT) {
            st = PIKV_FAIL(ctx, PIKV_ERR_UNSUPPORTED, "topk: list %d has %lld entries, too many for device %s "
                           "(a CPU Vulkan driver whose loops stop after 65535 iterations)", (int)l, (long long)m,
                           dev->info.name);
            goto done;
        }
        const int64_t b = a->budget[l] < 0 ? -1 : a->budget[l] > total ? total : a->budget[l];
        budget[l] = (int32_t)b;
    }
    CHECK_ST(pikv_vk_upload(dev, S_A, a->indptr, ((size_t)a->n_lists + 1) * sizeof(int32_t), &mptr));
    CHECK_ST(pikv_vk_upload(dev, S_B, a->scores, (size_t)n * sizeof(float), &msc));
    CHECK_ST(pikv_vk_upload(dev, S_C, a->tokens, (size_t)n * sizeof(int32_t), &mtok));
    CHECK_ST(pikv_vk_upload(dev, S_D, budget, (size_t)a->n_lists * sizeof(int32_t), &mbud));
    CHECK_ST(pikv_vk_scratch(dev, S_OUT, (size_t)n * sizeof(uint32_t), &mkeep));
    CHECK_ST(pikv_vk_scratch(dev, S_E, (size_t)n * sizeof(int32_t), &msorted));
    {
        const VkBuffer b[] = {mptr->buffer, msc->buffer, mtok->buffer, mbud->buffer, mkeep->buffer, msorted->buffer};
        const int32_t push[1] = {a->n_lists};
        CHECK_ST(pikv_vk_dispatch(dev, PIKV_VK_K_TOPK, VK_NULL_HANDLE, b, 6, push, sizeof push,
                                  (uint64_t)a->n_lists));
    }
    CHECK_ST(pikv_vk_submit(dev));
    {
        const uint32_t *keep = mkeep->map;
        for (int32_t i = a->indptr[0]; i < n; i++) a->keep[i] = (uint8_t)keep[i];
    }
done:
    if (st != PIKV_OK) pikv_vk_abandon(dev);
    pikv_host_free(ctx, budget);
    return st;
}

/* ---- read_reduce ------------------------------------------------------------- */

/* The buffer is read in windows of at most maxStorageBufferRange bytes, each
   bound at its own offset (lavapipe's range is 128 MiB; a GPU's is at most
   4 GiB, less than a roofline buffer may be), so the shader's indices stay
   32-bit. All windows go in one submission; the host adds the partials in
   double. */
/* vec4s per invocation: 256 KiB per workgroup on a GPU (a few per SM per window);
   on lavapipe, more and smaller workgroups read faster (1 GiB: 8 steps about
   twice the rate of 64, measured on a shared 2-core machine, noisy). */
enum { REDUCE_STEPS = 64, REDUCE_STEPS_CPU = 8 };

pikv_status pikv_vk_read_reduce(pikv_device *dev, const pikv_read_reduce_args *a)
{
    pikv_context *ctx = dev->ctx;
    pikv_vk_device *vd = pikv_vk_dev(dev);
    PIKV_RETURN_ERROR_IF(a->n_floats > a->buf->size / sizeof(float), ctx, PIKV_ERR_OUT_OF_RANGE,
                         "read_reduce: %llu floats past a buffer of %llu bytes", (unsigned long long)a->n_floats,
                         (unsigned long long)a->buf->size);
    *a->sum = 0;
    if (a->n_floats == 0) return PIKV_OK;
    PIKV_FORWARD_IF_ERROR(pikv_vk_ready(dev));
    /* window: a multiple of 16 bytes and of the offset alignment (both powers of two) */
    VkDeviceSize align = vd->limits.minStorageBufferOffsetAlignment;
    if (align < 16) align = 16;
    const uint64_t window = (uint64_t)vd->limits.maxStorageBufferRange / align * align;
    PIKV_RETURN_ERROR_IF(window < 16, ctx, PIKV_ERR_UNSUPPORTED, "device %s: read_reduce: storage buffer range "
                         "of %u bytes", dev->info.name, (unsigned)vd->limits.maxStorageBufferRange);
    const uint64_t span = (uint64_t)PIKV_VK_REDUCE_WG * (vd->loop_limit ? REDUCE_STEPS_CPU : REDUCE_STEPS);
    const uint64_t bytes = a->n_floats * sizeof(float);
    uint64_t n_parts = 0;
    for (uint64_t at = 0; at < bytes; at += window) {
        const uint64_t w = bytes - at < window ? bytes - at : window;
        const uint64_t groups = (w / 16 + span - 1) / span;
        n_parts += groups ? groups : 1; /* a window of under 4 floats still takes one group */
    }
    const VkBuffer vb = ((const pikv_vk_buffer *)a->buf->handle)->buffer;
    pikv_status st = PIKV_OK;
    hbuf *parts;
    CHECK_ST(pikv_vk_scratch(dev, S_OUT, (size_t)n_parts * sizeof(float), &parts));
    uint64_t part0 = 0;
    for (uint64_t at = 0; at < bytes; at += window) {
        const uint64_t w = bytes - at < window ? bytes - at : window;
        uint64_t groups = (w / 16 + span - 1) / span;
        if (!groups) groups = 1;
        const VkBuffer b[] = {vb, vb, parts->buffer};
        const VkDeviceSize off[] = {at, at, 0}, range[] = {w, w, VK_WHOLE_SIZE};
        const uint32_t push[5] = {(uint32_t)(w / 16), (uint32_t)(w % 16 / 4), (uint32_t)span, (uint32_t)part0,
                                  (uint32_t)groups};
        CHECK_ST(pikv_vk_dispatch_ranges(dev, PIKV_VK_K_READ_REDUCE, VK_NULL_HANDLE, b, off, range, 3, push,
                                         sizeof push, groups));
        part0 += groups;
    }
    CHECK_ST(pikv_vk_submit(dev));
    const float *p = parts->map;
    double sum = 0;
    for (uint64_t i = 0; i < n_parts; i++) sum += p[i];
    *a->sum = sum;
done:
    if (st != PIKV_OK) pikv_vk_abandon(dev);
    return st;
}
