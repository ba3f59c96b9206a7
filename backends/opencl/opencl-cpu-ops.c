/* Decode attention on CPU devices (PoCL): the host side of
 * kernels/attention_cpu.cl.
 *
 * Pool chunks of a CPU device are sub-buffers of a few large arenas
 * (opencl-buffers.c), so a page is addressed as (arena, byte offset) and one
 * launch per arena covers every page of the call: no launch per chunk, and
 * work items of any length. Work items are runs of consecutive pages of a list.
 * When the lists of all KV heads of a query hold the same pages (every exact or
 * expert-selected attend: selection is per head only with Quest), one item
 * takes a run of pages for all its KV heads at once, reading each page from
 * start to end (K rows of head 0, 1, ... then V alike: two sequential streams
 * the hardware prefetchers follow); otherwise items are per (query, KV head)
 * list. Run lengths aim at ~64 items per call, so both cores have work and the
 * partials stay few; the partials are merged exactly by pikv_attention_finish
 * (attention.cl), like the generic path's. */
#include "opencl-impl.h"

#include "../common/chunk-plan.h"

#include <limits.h>
#include <string.h>

/* scratch buffer indices (as opencl-ops.c's) */
enum { S_LAY = 0, S_A, S_B, S_C, S_D, S_E, S_F, S_G, S_OUT, S_LSE, S_PLSE, S_ERR, S_PARTS };
enum {
    CPU_STATE_FLOATS = 8192, /* as in attention_cpu.cl */
    TARGET_ITEMS = 64,
    MIN_ITEM_PAGES = 16,     /* head-pages: below this an item is not worth its partial */
    MAX_RUN = 64
};


static bool groups_ok(const pikv_page_layout *L)
{
    if (L->dtype == PIKV_DTYPE_INT8) return L->group % 16 == 0;
    if (L->dtype == PIKV_DTYPE_INT4) return L->group % 32 == 0;
    return true;
}

bool pikv_ocl_attention_cpu_applies(const pikv_ocl_device *od, const pikv_attention_args *a, int *kernel)
{
    if (!od->is_cpu) return false;
    const pikv_pool_view *pool = a->pool;
    const pikv_page_layout *L = pool->layout;
    if (!groups_ok(L) || (pool->quant && !groups_ok(pool->quant->layout))) return false;
    if (L->page_size > 0xffff || L->n_kv_heads <= 0) return false;
    const int64_t G = a->n_q_heads / L->n_kv_heads;
    if (G < 1 || G * L->head_dim > CPU_STATE_FLOATS) return false;
    const int k = L->head_dim == 64    ? PIKV_OCL_K_ATTN_CPU64
                  : L->head_dim == 128 ? PIKV_OCL_K_ATTN_CPU128
                  : L->head_dim == 256 ? PIKV_OCL_K_ATTN_CPU256
                                       : -1;
    if (k < 0 || !od->kernels[k]) return false;
    *kernel = k;
    return true;
}

typedef struct cpu_plan {
    int32_t n_items, n_parts, n_arenas;
    uint64_t *ent_off;   /* [E] byte offset of the page in its arena */
    int32_t *ent_len;    /* [E] rows | bit 30: quantized pool */
    int32_t *ent_arena;  /* [E] */
    int32_t *items;      /* [8 * n_items], sorted by arena */
    int32_t *item_arena; /* scratch [n_items] */
    int32_t *iptr;       /* [n_arenas + 1] items of arena a: iptr[a] .. iptr[a+1] */
    int32_t *unit_tasks; /* [units + 1] */
    cl_mem *arenas;      /* [n_chunk_keys] distinct parents */
} cpu_plan;

static void plan_free(pikv_context *ctx, cpu_plan *p)
{
    pikv_host_free(ctx, p->ent_off);
    pikv_host_free(ctx, p->ent_len);
    pikv_host_free(ctx, p->ent_arena);
    pikv_host_free(ctx, p->items);
    pikv_host_free(ctx, p->item_arena);
    pikv_host_free(ctx, p->iptr);
    pikv_host_free(ctx, p->unit_tasks);
    pikv_host_free(ctx, p->arenas);
    memset(p, 0, sizeof *p);
}

/* Lists u and v hold the same pages with the same lengths. */
static bool same_list(const pikv_attention_args *a, int32_t u, int32_t v)
{
    const int32_t b0 = a->indptr[u], n = a->indptr[u + 1] - b0, b1 = a->indptr[v];
    if (a->indptr[v + 1] - b1 != n) return false;
    return memcmp(a->slots + b0, a->slots + b1, (size_t)n * sizeof *a->slots) == 0 &&
           memcmp(a->page_len + b0, a->page_len + b1, (size_t)n * sizeof *a->page_len) == 0;
}

/* Appends the items of the runs of list entries [b, b + n) (absolute), for KV
   heads g0 .. g0 + ng of query i, at most run pages each; parts numbered from
   *next_part (see the kernel's item description). */
static void emit_items(cpu_plan *p, int32_t i, int32_t g0, int32_t ng, int32_t b,
                       int32_t n, int32_t list_stride, int32_t run, int32_t *next_part)
{
    /* runs: at most run pages, one arena, one pool */
    int32_t R = 0;
    for (int32_t pos = 0; pos < n;) {
        const int32_t e0 = b + pos;
        int32_t k = 1;
        while (pos + k < n && k < run && p->ent_arena[e0 + k] == p->ent_arena[e0] &&
               ((p->ent_len[e0 + k] ^ p->ent_len[e0]) & (1 << 30)) == 0)
            k++;
        int32_t *it = p->items + 8 * (size_t)p->n_items;
        it[0] = i;
        it[1] = g0;
        it[2] = ng;
        it[3] = e0;
        it[4] = k;
        it[5] = list_stride;
        it[6] = *next_part + R; /* part_base: fixed below once R is known */
        it[7] = 0;
        p->item_arena[p->n_items] = p->ent_arena[e0];
        p->n_items++;
        R++;
        pos += k;
    }
    for (int32_t r = 0; r < R; r++) p->items[8 * (size_t)(p->n_items - R + r) + 7] = R;
    *next_part += ng * R;
}

static pikv_status plan_build(pikv_device *dev, const pikv_attention_args *a, cpu_plan *p)
{
    pikv_context *ctx = dev->ctx;
    const pikv_pool_view *pool = a->pool;
    const int32_t kvh = pool->layout->n_kv_heads, units = a->n_queries * kvh, hd = pool->layout->head_dim;
    const int32_t G = a->n_q_heads / kvh, E = a->indptr[units], first = a->indptr[0];
    const int32_t nk = pikv_chunk_count(pool);
    const size_t nE = E > 0 ? (size_t)E : 1;
    pikv_status st = PIKV_OK;
    int32_t *key_arena = NULL;
    memset(p, 0, sizeof *p);
    p->ent_off = pikv_host_calloc(ctx, nE, sizeof *p->ent_off);
    p->ent_len = pikv_host_calloc(ctx, nE, sizeof *p->ent_len);
    p->ent_arena = pikv_host_calloc(ctx, nE, sizeof *p->ent_arena);
    p->items = pikv_host_alloc(ctx, 8 * nE * sizeof *p->items, 16);
    p->item_arena = pikv_host_alloc(ctx, nE * sizeof *p->item_arena, 16);
    p->unit_tasks = pikv_host_alloc(ctx, ((size_t)units + 1) * sizeof *p->unit_tasks, 16);
    p->arenas = pikv_host_alloc(ctx, ((size_t)nk + 1) * sizeof *p->arenas, 16);
    key_arena = pikv_host_alloc(ctx, ((size_t)nk + 1) * sizeof *key_arena, 16);
    if (!p->ent_off || !p->ent_len || !p->ent_arena || !p->items || !p->item_arena || !p->unit_tasks || !p->arenas ||
        !key_arena) {
        st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "attention: host scratch for %d pages: allocation failed", (int)E);
        goto done;
    }
    for (int32_t k = 0; k < nk; k++) key_arena[k] = -1;
    for (int32_t e = first; e < E; e++) {
        int32_t key = 0;
        uint32_t off = 0;
        CHECK_ST(pikv_chunk_resolve(dev, pool, a->slots[e], &key, &off));
        if (key_arena[key] < 0) {
            const pikv_ocl_buffer *ob = pikv_ocl_buf(pikv_chunk_buffer(pool, key));
            int32_t ai = 0;
            while (ai < p->n_arenas && p->arenas[ai] != ob->parent) ai++;
            if (ai == p->n_arenas) p->arenas[p->n_arenas++] = ob->parent;
            key_arena[key] = ai;
        }
        const pikv_ocl_buffer *ob = pikv_ocl_buf(pikv_chunk_buffer(pool, key));
        p->ent_off[e] = ob->base + off;
        p->ent_arena[e] = key_arena[key];
        const int32_t len = a->page_len[e] < 0 ? 0 : a->page_len[e];
        p->ent_len[e] = len | ((a->slots[e] & PIKV_SLOT_QUANT) ? (1 << 30) : 0);
    }
    /* run length: ~TARGET_ITEMS items over the call's head-pages */
    const int64_t W = (int64_t)E - first;
    int64_t tgt = W / TARGET_ITEMS;
    if (tgt < MIN_ITEM_PAGES) tgt = MIN_ITEM_PAGES;
    const int32_t max_pairs = CPU_STATE_FLOATS / hd; /* (KV head, query head) pairs per item */
    const int32_t ng_max = max_pairs / G < 1 ? 1 : max_pairs / G;
    int32_t next_part = 0;
    for (int32_t i = 0; i < a->n_queries; i++) {
        const int32_t u0 = i * kvh;
        bool wide = kvh > 1;
        for (int32_t g = 1; wide && g < kvh; g++) wide = same_list(a, u0, u0 + g);
        if (wide) {
            const int32_t n = a->indptr[u0 + 1] - a->indptr[u0];
            for (int32_t g0 = 0; g0 < kvh; g0 += ng_max) {
                const int32_t ng = kvh - g0 < ng_max ? kvh - g0 : ng_max;
                int64_t run = tgt / ng;
                run = run < 1 ? 1 : run > MAX_RUN ? MAX_RUN : run;
                const int32_t before = next_part, items_before = p->n_items;
                emit_items(p, i, g0, ng, a->indptr[u0 + g0], n, n, (int32_t)run, &next_part);
                const int32_t R = p->n_items - items_before;
                for (int32_t g = 0; g < ng; g++) p->unit_tasks[u0 + g0 + g] = before + g * R;
            }
        } else {
            const int64_t run = tgt > MAX_RUN ? MAX_RUN : tgt;
            for (int32_t g = 0; g < kvh; g++) {
                const int32_t u = u0 + g;
                p->unit_tasks[u] = next_part;
                emit_items(p, i, g, 1, a->indptr[u], a->indptr[u + 1] - a->indptr[u], 0, (int32_t)run,
                           &next_part);
            }
        }
    }
    p->unit_tasks[units] = next_part;
    p->n_parts = next_part;
    /* items grouped by arena (stable) */
    p->iptr = pikv_host_calloc(ctx, (size_t)p->n_arenas + 1, sizeof *p->iptr);
    int32_t *sorted = pikv_host_alloc(ctx, 8 * (size_t)(p->n_items > 0 ? p->n_items : 1) * sizeof *sorted, 16);
    if (!p->iptr || !sorted) {
        pikv_host_free(ctx, sorted);
        st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "attention: host scratch for %d items: allocation failed",
                       (int)p->n_items);
        goto done;
    }
    for (int32_t t = 0; t < p->n_items; t++) p->iptr[p->item_arena[t] + 1]++;
    for (int32_t ar = 0; ar < p->n_arenas; ar++) p->iptr[ar + 1] += p->iptr[ar];
    {
        int32_t *cursor = pikv_host_alloc(ctx, ((size_t)p->n_arenas + 1) * sizeof *cursor, 16);
        if (!cursor) {
            pikv_host_free(ctx, sorted);
            st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "attention: host scratch allocation failed");
            goto done;
        }
        memcpy(cursor, p->iptr, ((size_t)p->n_arenas + 1) * sizeof *cursor);
        for (int32_t t = 0; t < p->n_items; t++)
            memcpy(sorted + 8 * (size_t)cursor[p->item_arena[t]]++, p->items + 8 * (size_t)t, 8 * sizeof *sorted);
        pikv_host_free(ctx, cursor);
    }
    pikv_host_free(ctx, p->items);
    p->items = sorted;
done:
    pikv_host_free(ctx, key_arena);
    if (st != PIKV_OK) plan_free(ctx, p);
    return st;
}

pikv_status pikv_ocl_attention_cpu(pikv_device *dev, const pikv_attention_args *a, int kidx)
{
    pikv_context *ctx = dev->ctx;
    pikv_ocl_device *od = pikv_ocl_dev(dev);
    const pikv_pool_view *pool = a->pool;
    const pikv_page_layout *L = pool->layout;
    const int32_t kvh = L->n_kv_heads, hd = L->head_dim, G = a->n_q_heads / kvh;
    const int32_t units = a->n_queries * kvh, E = a->indptr[units];
    pikv_status st = PIKV_OK;
    cpu_plan plan = {0};
    CHECK_ST(plan_build(dev, a, &plan));
    const size_t out_floats = (size_t)a->n_queries * (size_t)a->n_q_heads * (size_t)hd;
    const size_t lse_floats = (size_t)a->n_queries * (size_t)a->n_q_heads;
    const size_t plse_floats = a->page_lse ? (size_t)E * (size_t)G : 0;
    const size_t nE = E > 0 ? (size_t)E : 0;
    cl_mem lay, mq, mit, moff, mlen, mut, mparts, mout, mlse, mplse, merr;
    {
        uint32_t words[2 * PIKV_LAYOUT_WORDS];
        pikv_pool_layout_words(words, pool);
        CHECK_ST(pikv_ocl_scratch(dev, S_LAY, sizeof words, &lay));
        /* blocking: words is on the stack */
        CHECK_CL(clEnqueueWriteBuffer(od->queue, lay, CL_TRUE, 0, sizeof words, words, 0, NULL, NULL),
                 "clEnqueueWriteBuffer (layouts)");
    }
    CHECK_ST(pikv_ocl_upload(dev, S_A, a->q, out_floats * sizeof(float), &mq));
    CHECK_ST(pikv_ocl_upload(dev, S_B, plan.items, 8 * (size_t)plan.n_items * sizeof(int32_t), &mit));
    CHECK_ST(pikv_ocl_upload(dev, S_C, plan.ent_off, nE * sizeof(uint64_t), &moff));
    CHECK_ST(pikv_ocl_upload(dev, S_D, plan.ent_len, nE * sizeof(int32_t), &mlen));
    CHECK_ST(pikv_ocl_upload(dev, S_G, plan.unit_tasks, ((size_t)units + 1) * sizeof(int32_t), &mut));
    CHECK_ST(pikv_ocl_scratch(dev, S_PARTS, (size_t)plan.n_parts * (size_t)G * ((size_t)hd + 2) * sizeof(float),
                              &mparts));
    CHECK_ST(pikv_ocl_scratch(dev, S_OUT, out_floats * sizeof(float), &mout));
    CHECK_ST(pikv_ocl_scratch(dev, S_LSE, lse_floats * sizeof(float), &mlse));
    /* page_lse: entries skipped (empty pages) keep the caller's values */
    CHECK_ST(pikv_ocl_upload(dev, S_PLSE, a->page_lse, plse_floats * sizeof(float), &mplse));
    const cl_int no_error = INT_MAX;
    CHECK_ST(pikv_ocl_upload(dev, S_ERR, &no_error, sizeof no_error, &merr));
    {
        cl_kernel k = od->kernels[kidx];
        const cl_int nqh = a->n_q_heads, g_ = G, want = a->page_lse != NULL;
        const cl_float scale = a->scale;
        for (int32_t ar = 0; ar < plan.n_arenas; ar++) {
            const cl_int begin = plan.iptr[ar], n_items = plan.iptr[ar + 1] - plan.iptr[ar];
            if (n_items == 0) continue;
            cl_mem arena = plan.arenas[ar];
            ARG(k, 0, arena);
            ARG(k, 1, lay);
            ARG(k, 2, mq);
            ARG(k, 3, mit);
            ARG(k, 4, begin);
            ARG(k, 5, moff);
            ARG(k, 6, mlen);
            ARG(k, 7, nqh);
            ARG(k, 8, g_);
            ARG(k, 9, scale);
            ARG(k, 10, want);
            ARG(k, 11, mparts);
            ARG(k, 12, mplse);
            const size_t global = (size_t)n_items, local = 1;
            CHECK_CL(clEnqueueNDRangeKernel(od->queue, k, 1, NULL, &global, &local, 0, NULL, NULL),
                     "clEnqueueNDRangeKernel");
        }
    }
    {
        const pikv_ocl_finish_args f = {units, G, hd, a->n_q_heads, kvh, mut, mparts, mout, mlse, merr};
        CHECK_ST(pikv_ocl_attention_finish(dev, &f));
    }
    if (out_floats > 0)
        CHECK_CL(clEnqueueReadBuffer(od->queue, mout, CL_TRUE, 0, out_floats * sizeof(float), a->out, 0, NULL, NULL),
                 "clEnqueueReadBuffer (op output)");
    if (lse_floats > 0)
        CHECK_CL(clEnqueueReadBuffer(od->queue, mlse, CL_TRUE, 0, lse_floats * sizeof(float), a->lse, 0, NULL, NULL),
                 "clEnqueueReadBuffer (op output)");
    if (plse_floats > 0)
        CHECK_CL(clEnqueueReadBuffer(od->queue, mplse, CL_TRUE, 0, plse_floats * sizeof(float), a->page_lse, 0, NULL,
                                     NULL),
                 "clEnqueueReadBuffer (op output)");
done:
    if (st != PIKV_OK) clFinish(od->queue);
    plan_free(ctx, &plan);
    return st;
}

/* ---- Quest scores ------------------------------------------------------------- */

enum { SCORE_RUN = 16 }; /* candidates per work item, as kernels/select_cpu.cl */

bool pikv_ocl_score_cpu_applies(const pikv_ocl_device *od, const pikv_score_args *a)
{
    return od->is_cpu && od->kernels[PIKV_OCL_K_SCORE_CPU] && a->pool->layout->head_dim % 16 == 0;
}

pikv_status pikv_ocl_score_cpu(pikv_device *dev, const pikv_score_args *a)
{
    pikv_context *ctx = dev->ctx;
    pikv_ocl_device *od = pikv_ocl_dev(dev);
    const pikv_pool_view *pool = a->pool;
    const pikv_page_layout *L = pool->layout;
    const int32_t kvh = L->n_kv_heads, hd = L->head_dim, G = a->n_q_heads / kvh;
    const int32_t n = a->indptr[a->n_queries], first = a->indptr[0], nk = pikv_chunk_count(pool);
    const size_t nn = (size_t)n;
    pikv_status st = PIKV_OK;
    uint64_t *off = pikv_host_calloc(ctx, nn, sizeof *off);
    int32_t *query = pikv_host_calloc(ctx, nn, sizeof *query), *info = pikv_host_calloc(ctx, nn, sizeof *info);
    int32_t *arena_of = pikv_host_calloc(ctx, nn, sizeof *arena_of), *order = pikv_host_calloc(ctx, nn, sizeof *order);
    int32_t *key_arena = pikv_host_alloc(ctx, ((size_t)nk + 1) * sizeof *key_arena, 16);
    int32_t *aptr = pikv_host_calloc(ctx, (size_t)nk + 2, sizeof *aptr);
    cl_mem *arenas = pikv_host_alloc(ctx, ((size_t)nk + 1) * sizeof *arenas, 16);
    int32_t n_arenas = 0;
    if (!off || !query || !info || !arena_of || !order || !key_arena || !aptr || !arenas) {
        st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "score: host scratch for %d candidates: allocation failed", (int)n);
        goto done;
    }
    for (int32_t k = 0; k < nk; k++) key_arena[k] = -1;
    for (int32_t i = 0; i < a->n_queries; i++)
        for (int32_t c = a->indptr[i]; c < a->indptr[i + 1]; c++) {
            int32_t key = 0;
            uint32_t o = 0;
            CHECK_ST(pikv_chunk_resolve(dev, pool, a->slots[c], &key, &o));
            const pikv_ocl_buffer *ob = pikv_ocl_buf(pikv_chunk_buffer(pool, key));
            if (key_arena[key] < 0) {
                int32_t ai = 0;
                while (ai < n_arenas && arenas[ai] != ob->parent) ai++;
                if (ai == n_arenas) arenas[n_arenas++] = ob->parent;
                key_arena[key] = ai;
            }
            off[c] = ob->base + o;
            query[c] = i;
            info[c] = (a->slots[c] & PIKV_SLOT_QUANT) ? (1 << 30) : 0;
            arena_of[c] = key_arena[key];
        }
    /* candidates grouped by arena (stable): order[aptr[x] .. aptr[x+1]) */
    for (int32_t c = first; c < n; c++) aptr[arena_of[c] + 1]++;
    for (int32_t x = 0; x < n_arenas; x++) aptr[x + 1] += aptr[x];
    {
        int32_t *cur = arena_of; /* reused: each candidate's slot in order */
        int32_t *fill = pikv_host_alloc(ctx, ((size_t)n_arenas + 1) * sizeof *fill, 16);
        if (!fill) {
            st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "score: host scratch allocation failed");
            goto done;
        }
        memcpy(fill, aptr, ((size_t)n_arenas + 1) * sizeof *fill);
        for (int32_t c = first; c < n; c++) order[fill[cur[c]]++] = c;
        pikv_host_free(ctx, fill);
    }
    {
        cl_mem lay, moff, mqo, minfo, mord, mq, msc;
        uint32_t words[2 * PIKV_LAYOUT_WORDS];
        pikv_pool_layout_words(words, pool);
        CHECK_ST(pikv_ocl_scratch(dev, S_LAY, sizeof words, &lay));
        CHECK_CL(clEnqueueWriteBuffer(od->queue, lay, CL_TRUE, 0, sizeof words, words, 0, NULL, NULL),
                 "clEnqueueWriteBuffer (layouts)");
        const size_t q_floats = (size_t)a->n_queries * (size_t)a->n_q_heads * (size_t)hd;
        CHECK_ST(pikv_ocl_upload(dev, S_A, off, nn * sizeof *off, &moff));
        CHECK_ST(pikv_ocl_upload(dev, S_B, query, nn * sizeof *query, &mqo));
        CHECK_ST(pikv_ocl_upload(dev, S_C, info, nn * sizeof *info, &minfo));
        CHECK_ST(pikv_ocl_upload(dev, S_D, order, (size_t)(n - first) * sizeof *order, &mord));
        CHECK_ST(pikv_ocl_upload(dev, S_E, a->q, q_floats * sizeof(float), &mq));
        /* scores of candidates before indptr[0] keep the caller's values */
        CHECK_ST(pikv_ocl_upload(dev, S_OUT, a->scores, nn * (size_t)kvh * sizeof(float), &msc));
        cl_kernel k = od->kernels[PIKV_OCL_K_SCORE_CPU];
        const cl_int nqh = a->n_q_heads, g_ = G;
        for (int32_t x = 0; x < n_arenas; x++) {
            const cl_int ob = aptr[x], oe = aptr[x + 1];
            if (oe <= ob) continue;
            ARG(k, 0, arenas[x]);
            ARG(k, 1, lay);
            ARG(k, 2, moff);
            ARG(k, 3, mqo);
            ARG(k, 4, minfo);
            ARG(k, 5, mord);
            ARG(k, 6, ob);
            ARG(k, 7, oe);
            ARG(k, 8, mq);
            ARG(k, 9, nqh);
            ARG(k, 10, g_);
            ARG(k, 11, msc);
            const size_t global = (size_t)(oe - ob + SCORE_RUN - 1) / SCORE_RUN, local = 1;
            CHECK_CL(clEnqueueNDRangeKernel(od->queue, k, 1, NULL, &global, &local, 0, NULL, NULL),
                     "clEnqueueNDRangeKernel");
        }
        CHECK_CL(clEnqueueReadBuffer(od->queue, msc, CL_TRUE, 0, nn * (size_t)kvh * sizeof(float), a->scores, 0, NULL,
                                     NULL),
                 "clEnqueueReadBuffer (op output)");
    }
done:
    if (st != PIKV_OK) clFinish(od->queue);
    pikv_host_free(ctx, off);
    pikv_host_free(ctx, query);
    pikv_host_free(ctx, info);
    pikv_host_free(ctx, arena_of);
    pikv_host_free(ctx, order);
    pikv_host_free(ctx, key_arena);
    pikv_host_free(ctx, aptr);
    pikv_host_free(ctx, arenas);
    return st;
}
