/* Host-side planning of chunk-at-a-time backends (see chunk-plan.h). */
#include "chunk-plan.h"

#include "layout-words.h"

#include <string.h>

_Static_assert(LAYOUT_WORDS == PIKV_LAYOUT_WORDS, "layout-words.h and chunk-plan.h disagree");
_Static_assert(DT_F32 == PIKV_DTYPE_F32 && DT_F16 == PIKV_DTYPE_F16 && DT_INT8 == PIKV_DTYPE_INT8 &&
                   DT_INT4 == PIKV_DTYPE_INT4,
               "layout-words.h's dtype codes are pikv_dtype's");

void pikv_layout_words(uint32_t *o, const pikv_page_layout *L)
{
    memset(o, 0, PIKV_LAYOUT_WORDS * sizeof *o);
    o[L_PS] = (uint32_t)L->page_size;
    o[L_KVH] = (uint32_t)L->n_kv_heads;
    o[L_HD] = (uint32_t)L->head_dim;
    o[L_DTYPE] = (uint32_t)L->dtype;
    o[L_GROUP] = (uint32_t)L->group;
    o[L_KG] = (uint32_t)L->k_groups;
    o[L_VG] = (uint32_t)L->v_groups;
    o[L_ROW] = (uint32_t)L->row_bytes;
    o[L_K] = (uint32_t)L->k_offset;
    o[L_V] = (uint32_t)L->v_offset;
    o[L_KMIN] = (uint32_t)L->kmin_offset;
    o[L_KMAX] = (uint32_t)L->kmax_offset;
    o[L_KSC] = (uint32_t)L->kscale_offset;
    o[L_KZE] = (uint32_t)L->kzero_offset;
    o[L_VSC] = (uint32_t)L->vscale_offset;
    o[L_VZE] = (uint32_t)L->vzero_offset;
    o[L_HS] = (uint32_t)L->head_stride;
    o[L_PB] = (uint32_t)L->page_bytes;
}

void pikv_pool_layout_words(uint32_t out[2 * PIKV_LAYOUT_WORDS], const pikv_pool_view *pool)
{
    pikv_layout_words(out, pool->layout);
    if (pool->quant) pikv_layout_words(out + PIKV_LAYOUT_WORDS, pool->quant->layout);
    else memset(out + PIKV_LAYOUT_WORDS, 0, PIKV_LAYOUT_WORDS * sizeof *out);
}

int32_t pikv_chunk_count(const pikv_pool_view *pool)
{
    return pool->n_chunks + (pool->quant ? pool->quant->n_chunks : 0);
}

pikv_buffer *pikv_chunk_buffer(const pikv_pool_view *pool, int32_t key)
{
    if (key < pool->n_chunks) return pool->chunks[key];
    return pool->quant->chunks[key - pool->n_chunks];
}

pikv_status pikv_chunk_resolve(pikv_device *dev, const pikv_pool_view *pool, uint32_t slot, int32_t *key,
                               uint32_t *off)
{
    const pikv_pool_view *p = pool;
    int32_t base = 0;
    if (slot & PIKV_SLOT_QUANT) {
        PIKV_RETURN_ERROR_IF(!pool->quant, dev->ctx, PIKV_ERR_INTERNAL, "slot %#x names a quantized page but the "
                             "pool has none", (unsigned)slot);
        p = pool->quant;
        base = pool->n_chunks;
        slot &= ~PIKV_SLOT_QUANT;
    }
    const uint32_t chunk = slot / p->pages_per_chunk, index = slot % p->pages_per_chunk;
    PIKV_RETURN_ERROR_IF((int32_t)chunk >= p->n_chunks, dev->ctx, PIKV_ERR_INTERNAL,
                         "slot %u is past the pool's %d chunks", (unsigned)slot, (int)p->n_chunks);
    const uint64_t o = (uint64_t)index * p->layout->page_bytes;
    PIKV_RETURN_ERROR_IF(o + p->layout->page_bytes > UINT32_MAX, dev->ctx, PIKV_ERR_UNSUPPORTED,
                         "device %s: chunks over 4 GiB are not supported", dev->info.name);
    *key = base + (int32_t)chunk;
    *off = (uint32_t)o;
    return PIKV_OK;
}

void pikv_group_by_key(int32_t n, const int32_t *key, int32_t nk, int32_t *order, int32_t *kptr)
{
    memset(kptr, 0, ((size_t)nk + 1) * sizeof *kptr);
    for (int32_t i = 0; i < n; i++) kptr[key[i] + 1]++;
    for (int32_t k = 0; k < nk; k++) kptr[k + 1] += kptr[k];
    for (int32_t i = 0; i < n; i++) order[kptr[key[i]]++] = i;
    for (int32_t k = nk; k > 0; k--) kptr[k] = kptr[k - 1];
    kptr[0] = 0;
}

/* One allocation for an array of n int32-sized elements (at least one). */
static int32_t *host_ints(pikv_context *ctx, size_t n)
{
    return pikv_host_alloc(ctx, (n ? n : 1) * sizeof(int32_t), 16);
}

/* ---- append ------------------------------------------------------------------ */

void pikv_append_plan_free(pikv_context *ctx, pikv_append_plan *p)
{
    pikv_host_free(ctx, p->writes);
    pikv_host_free(ctx, p->order);
    pikv_host_free(ctx, p->kptr);
    memset(p, 0, sizeof *p);
}

pikv_status pikv_append_plan_build(pikv_device *dev, const pikv_append_args *a, pikv_append_plan *p)
{
    pikv_context *ctx = dev->ctx;
    memset(p, 0, sizeof *p);
    const int32_t n = a->n_writes, nk = pikv_chunk_count(a->pool);
    p->n_keys = nk;
    p->writes = host_ints(ctx, 4 * (size_t)n);
    p->order = host_ints(ctx, (size_t)n);
    p->kptr = host_ints(ctx, (size_t)nk + 1);
    int32_t *key = host_ints(ctx, (size_t)n);
    pikv_status st = PIKV_OK;
    if (!p->writes || !p->order || !p->kptr || !key) {
        st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "append: host scratch for %d writes: allocation failed", (int)n);
        goto done;
    }
    for (int32_t w = 0; w < n; w++) {
        const pikv_page_write *pw = &a->writes[w];
        uint32_t off;
        st = pikv_chunk_resolve(dev, a->pool, pw->slot, &key[w], &off);
        if (st != PIKV_OK) goto done;
        p->writes[4 * w] = (int32_t)off;
        p->writes[4 * w + 1] = pw->row0;
        p->writes[4 * w + 2] = pw->n_rows;
        p->writes[4 * w + 3] = pw->src_begin;
        const int64_t end = (int64_t)pw->src_begin + pw->n_rows;
        if (end > p->idx_end) p->idx_end = end;
        for (int32_t r = 0; r < pw->n_rows; r++)
            if (a->src_index[pw->src_begin + r] + 1 > p->n_src) p->n_src = a->src_index[pw->src_begin + r] + 1;
    }
    pikv_group_by_key(n, key, nk, p->order, p->kptr);
done:
    pikv_host_free(ctx, key);
    if (st != PIKV_OK) pikv_append_plan_free(ctx, p);
    return st;
}

/* ---- score ------------------------------------------------------------------- */

void pikv_score_plan_free(pikv_context *ctx, pikv_score_plan *p)
{
    pikv_host_free(ctx, p->offset);
    pikv_host_free(ctx, p->query);
    pikv_host_free(ctx, p->order);
    pikv_host_free(ctx, p->kptr);
    memset(p, 0, sizeof *p);
}

pikv_status pikv_score_plan_build(pikv_device *dev, const pikv_score_args *a, pikv_score_plan *p)
{
    pikv_context *ctx = dev->ctx;
    memset(p, 0, sizeof *p);
    const int32_t n = a->n_queries > 0 ? a->indptr[a->n_queries] : 0, nk = pikv_chunk_count(a->pool);
    const int32_t first = a->n_queries > 0 ? a->indptr[0] : 0;
    p->n_keys = nk;
    p->n_candidates = n;
    p->offset = (uint32_t *)host_ints(ctx, (size_t)n);
    p->query = host_ints(ctx, (size_t)n);
    p->order = host_ints(ctx, (size_t)n);
    p->kptr = host_ints(ctx, (size_t)nk + 1);
    int32_t *key = host_ints(ctx, (size_t)n);
    pikv_status st = PIKV_OK;
    if (!p->offset || !p->query || !p->order || !p->kptr || !key) {
        st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "score: host scratch for %d candidates: allocation failed", (int)n);
        goto done;
    }
    for (int32_t c = 0; c < first; c++) {
        key[c] = 0;
        p->query[c] = 0;
        p->offset[c] = 0;
    }
    for (int32_t i = 0; i < a->n_queries; i++)
        for (int32_t c = a->indptr[i]; c < a->indptr[i + 1]; c++) {
            p->query[c] = i;
            st = pikv_chunk_resolve(dev, a->pool, a->slots[c], &key[c], &p->offset[c]);
            if (st != PIKV_OK) goto done;
        }
    /* candidates before indptr[0] are not scored: leave them out of the groups */
    pikv_group_by_key(n - first, key + first, nk, p->order, p->kptr);
    for (int32_t i = 0; i < n - first; i++) p->order[i] += first;
done:
    pikv_host_free(ctx, key);
    if (st != PIKV_OK) pikv_score_plan_free(ctx, p);
    return st;
}

/* ---- attention --------------------------------------------------------------- */

void pikv_attention_plan_free(pikv_context *ctx, pikv_attention_plan *p)
{
    pikv_host_free(ctx, p->perm);
    pikv_host_free(ctx, p->len);
    pikv_host_free(ctx, p->tasks);
    pikv_host_free(ctx, p->chunk_tasks);
    pikv_host_free(ctx, p->tkptr);
    pikv_host_free(ctx, p->list_tasks);
    pikv_host_free(ctx, p->offset);
    memset(p, 0, sizeof *p);
}

pikv_status pikv_attention_plan_build(pikv_device *dev, const pikv_attention_args *a, int32_t max_task_pages,
                                      pikv_attention_plan *p)
{
    pikv_context *ctx = dev->ctx;
    memset(p, 0, sizeof *p);
    const pikv_pool_view *pool = a->pool;
    const int32_t kvh = pool->layout->n_kv_heads, units = a->n_queries * kvh, nk = pikv_chunk_count(pool);
    const int32_t E = a->indptr[units]; /* entries are indexed absolutely, like the CPU backend */
    const int32_t first = a->indptr[0];
    const size_t nE = (size_t)E;
    p->n_keys = nk;
    p->n_lists = units;
    p->n_used = E - first;
    p->perm = host_ints(ctx, nE);
    p->len = host_ints(ctx, nE);
    p->offset = (uint32_t *)host_ints(ctx, nE);
    p->tasks = host_ints(ctx, 3 * nE); /* at most one task per entry */
    p->chunk_tasks = host_ints(ctx, nE);
    p->tkptr = host_ints(ctx, (size_t)nk + 1);
    p->list_tasks = host_ints(ctx, (size_t)units + 1);
    int32_t *ekey = host_ints(ctx, nE), *eunit = host_ints(ctx, nE), *tmp = host_ints(ctx, nE);
    int32_t *kptr = host_ints(ctx, (size_t)nk + 1), *tkey = host_ints(ctx, nE);
    uint32_t *eoff = (uint32_t *)host_ints(ctx, nE);
    pikv_status st = PIKV_OK;
    if (!p->perm || !p->len || !p->offset || !p->tasks || !p->chunk_tasks || !p->tkptr || !p->list_tasks || !ekey ||
        !eunit || !tmp || !kptr || !tkey || !eoff) {
        st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "attention: host scratch for %d pages: allocation failed", (int)E);
        goto done;
    }
    for (int32_t u = 0; u < units; u++)
        for (int32_t e = a->indptr[u]; e < a->indptr[u + 1]; e++) {
            eunit[e] = u;
            st = pikv_chunk_resolve(dev, pool, a->slots[e], &ekey[e], &eoff[e]);
            if (st != PIKV_OK) goto done;
        }
    for (int32_t e = 0; e < first; e++) { /* entries before the first list: unused */
        eunit[e] = 0;
        ekey[e] = 0;
        eoff[e] = 0;
    }
    /* entries grouped by list, then by chunk, then in list order: two stable counting sorts */
    int32_t *uptr = p->list_tasks; /* used as the list cursor first */
    pikv_group_by_key(E, ekey, nk, tmp, kptr);
    memset(uptr, 0, ((size_t)units + 1) * sizeof *uptr);
    for (int32_t i = first; i < E; i++) uptr[eunit[i] + 1]++;
    for (int32_t u = 0; u < units; u++) uptr[u + 1] += uptr[u];
    for (int32_t i = 0; i < E; i++) {
        const int32_t e = tmp[i];
        if (e < first) continue;
        p->perm[uptr[eunit[e]]++] = e;
    }
    for (int32_t i = 0; i < p->n_used; i++) {
        p->offset[i] = eoff[p->perm[i]];
        p->len[i] = a->page_len[p->perm[i]];
    }
    /* tasks: runs of at most max_task_pages entries of one list in one chunk */
    int32_t T = 0, i = 0;
    for (int32_t u = 0; u < units; u++) {
        uptr[u] = T;
        const int32_t end = i + (a->indptr[u + 1] - a->indptr[u]);
        while (i < end) {
            const int32_t k0 = ekey[p->perm[i]];
            int32_t j = i;
            while (j < end && j - i < max_task_pages && ekey[p->perm[j]] == k0) j++;
            p->tasks[3 * T] = u;
            p->tasks[3 * T + 1] = i;
            p->tasks[3 * T + 2] = j;
            tkey[T] = k0;
            T++;
            i = j;
        }
    }
    uptr[units] = T;
    p->n_tasks = T;
    pikv_group_by_key(T, tkey, nk, p->chunk_tasks, p->tkptr);
done:
    pikv_host_free(ctx, ekey);
    pikv_host_free(ctx, eunit);
    pikv_host_free(ctx, tmp);
    pikv_host_free(ctx, kptr);
    pikv_host_free(ctx, tkey);
    pikv_host_free(ctx, eoff);
    if (st != PIKV_OK) pikv_attention_plan_free(ctx, p);
    return st;
}

/* ---- quantize ------------------------------------------------------------------ */

void pikv_quantize_errors_add(pikv_quantize_args *a, const float *ek, size_t n_key_items, const float *ev,
                              size_t n_value_items)
{
    double e[5] = {0, 0, 0, 0, 0};
    for (size_t i = 0; i < n_key_items; i++) {
        e[0] += ek[3 * i];
        e[1] += ek[3 * i + 1];
        e[4] = ek[3 * i + 2] > e[4] ? ek[3 * i + 2] : e[4];
    }
    for (size_t i = 0; i < n_value_items; i++) {
        e[2] += ev[3 * i];
        e[3] += ev[3 * i + 1];
        e[4] = ev[3 * i + 2] > e[4] ? ev[3 * i + 2] : e[4];
    }
    for (int i = 0; i < 4; i++) a->err[i] += e[i];
    a->err[4] = e[4] > a->err[4] ? e[4] : a->err[4];
}
