/* Dispatch of the ops: host-side planning (pages grouped by chunk, see
   opencl-impl.h), uploads into scratch buffers, one launch per chunk touched,
   read-back. Every op has finished when it returns, so the host arrays of its
   arguments may go away and the scratch buffers are free for the next op. */
#include "opencl-impl.h"

#include <limits.h>
#include <math.h>
#include <string.h>

enum { LAYOUT_STRIDE = 20 };
enum { TASK_PAGES = 8 }; /* pages per attention task at most (more tasks = more parallelism) */

/* scratch buffer indices */
enum { S_LAY = 0, S_A, S_B, S_C, S_D, S_E, S_F, S_G, S_OUT, S_LSE, S_PLSE, S_ERR, S_PARTS };

#define CHECK_CL(expr, what)                                     \
    do {                                                         \
        cl_int ck_err_ = (expr);                                 \
        if (ck_err_ != CL_SUCCESS) {                             \
            st = pikv_ocl_fail(dev, ck_err_, what);              \
            goto done;                                           \
        }                                                        \
    } while (0)

#define CHECK_ST(expr)                                           \
    do {                                                         \
        st = (expr);                                             \
        if (st != PIKV_OK) goto done;                            \
    } while (0)

static void fill_layout(uint32_t *o, const pikv_page_layout *L)
{
    memset(o, 0, LAYOUT_STRIDE * sizeof *o);
    o[0] = (uint32_t)L->page_size;
    o[1] = (uint32_t)L->n_kv_heads;
    o[2] = (uint32_t)L->head_dim;
    o[3] = (uint32_t)L->dtype;
    o[4] = (uint32_t)L->group;
    o[5] = (uint32_t)L->k_groups;
    o[6] = (uint32_t)L->v_groups;
    o[7] = (uint32_t)L->row_bytes;
    o[8] = (uint32_t)L->k_offset;
    o[9] = (uint32_t)L->v_offset;
    o[10] = (uint32_t)L->kmin_offset;
    o[11] = (uint32_t)L->kmax_offset;
    o[12] = (uint32_t)L->kscale_offset;
    o[13] = (uint32_t)L->kzero_offset;
    o[14] = (uint32_t)L->vscale_offset;
    o[15] = (uint32_t)L->vzero_offset;
    o[16] = (uint32_t)L->head_stride;
    o[17] = (uint32_t)L->page_bytes;
}

/* Uploads the layouts of the pool (row 0) and of its quantized pool (row 1). */
static pikv_status upload_layouts(pikv_device *dev, const pikv_pool_view *pool, cl_mem *out)
{
    uint32_t lay[2 * LAYOUT_STRIDE];
    fill_layout(lay, pool->layout);
    if (pool->quant) fill_layout(lay + LAYOUT_STRIDE, pool->quant->layout);
    else memset(lay + LAYOUT_STRIDE, 0, LAYOUT_STRIDE * sizeof *lay);
    PIKV_FORWARD_IF_ERROR(pikv_ocl_scratch(dev, S_LAY, sizeof lay, out));
    /* blocking: lay is on this function's stack */
    cl_int err = clEnqueueWriteBuffer(pikv_ocl_dev(dev)->queue, *out, CL_TRUE, 0, sizeof lay, lay, 0, NULL, NULL);
    return err == CL_SUCCESS ? PIKV_OK : pikv_ocl_fail(dev, err, "clEnqueueWriteBuffer (layouts)");
}

/* Chunk keys: open chunk c is key c, quantized chunk c is key n_open + c. */
static int32_t n_keys(const pikv_pool_view *pool)
{
    return pool->n_chunks + (pool->quant ? pool->quant->n_chunks : 0);
}

static cl_mem key_mem(const pikv_pool_view *pool, int32_t key)
{
    if (key < pool->n_chunks) return (cl_mem)pool->chunks[key]->handle;
    return (cl_mem)pool->quant->chunks[key - pool->n_chunks]->handle;
}

/* A slot's chunk key and byte offset in its chunk. */
static pikv_status resolve(pikv_device *dev, const pikv_pool_view *pool, uint32_t slot, int32_t *key,
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

/* Stable counting sort of n items by key in [0, nk): order[] and kptr[nk + 1]. */
static void group_by_key(int32_t n, const int32_t *key, int32_t nk, int32_t *order, int32_t *kptr)
{
    memset(kptr, 0, ((size_t)nk + 1) * sizeof *kptr);
    for (int32_t i = 0; i < n; i++) kptr[key[i] + 1]++;
    for (int32_t k = 0; k < nk; k++) kptr[k + 1] += kptr[k];
    for (int32_t i = 0; i < n; i++) order[kptr[key[i]]++] = i;
    for (int32_t k = nk; k > 0; k--) kptr[k] = kptr[k - 1];
    kptr[0] = 0;
}

/* One allocation for several host arrays of int32-sized elements. */
static int32_t *host_ints(pikv_context *ctx, size_t n)
{
    return pikv_host_alloc(ctx, (n ? n : 1) * sizeof(int32_t), 16);
}

#define ARG(k, i, v) CHECK_CL(clSetKernelArg((k), (i), sizeof(v), &(v)), "clSetKernelArg")
#define LOCAL_ARG(k, i, bytes) CHECK_CL(clSetKernelArg((k), (i), (bytes), NULL), "clSetKernelArg")

static pikv_status launch(pikv_device *dev, cl_kernel k, size_t global, size_t local)
{
    if (global == 0) return PIKV_OK;
    cl_int err = clEnqueueNDRangeKernel(pikv_ocl_dev(dev)->queue, k, 1, NULL, &global, local ? &local : NULL, 0,
                                        NULL, NULL);
    return err == CL_SUCCESS ? PIKV_OK : pikv_ocl_fail(dev, err, "clEnqueueNDRangeKernel");
}

static pikv_status finish(pikv_device *dev)
{
    cl_int err = clFinish(pikv_ocl_dev(dev)->queue);
    return err == CL_SUCCESS ? PIKV_OK : pikv_ocl_fail(dev, err, "clFinish");
}

static pikv_status read_back(pikv_device *dev, cl_mem mem, void *dst, size_t size)
{
    if (size == 0) return PIKV_OK;
    cl_int err = clEnqueueReadBuffer(pikv_ocl_dev(dev)->queue, mem, CL_TRUE, 0, size, dst, 0, NULL, NULL);
    return err == CL_SUCCESS ? PIKV_OK : pikv_ocl_fail(dev, err, "clEnqueueReadBuffer (op output)");
}

/* ---- append --------------------------------------------------------------- */

pikv_status pikv_ocl_append(pikv_device *dev, const pikv_append_args *a)
{
    if (a->n_writes <= 0) return PIKV_OK;
    PIKV_FORWARD_IF_ERROR(pikv_ocl_ready(dev));
    pikv_context *ctx = dev->ctx;
    pikv_ocl_device *od = pikv_ocl_dev(dev);
    const pikv_pool_view *pool = a->pool;
    const pikv_page_layout *L = pool->layout;
    const int32_t n = a->n_writes, nk = n_keys(pool), kvh = L->n_kv_heads, hd = L->head_dim;
    pikv_status st = PIKV_OK;
    int32_t *wr = host_ints(ctx, 4 * (size_t)n), *key = host_ints(ctx, (size_t)n);
    int32_t *order = host_ints(ctx, (size_t)n), *kptr = host_ints(ctx, (size_t)nk + 1);
    if (!wr || !key || !order || !kptr) {
        st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "append: host scratch allocation failed");
        goto done;
    }
    int64_t idx_end = 0, n_src = 0;
    for (int32_t w = 0; w < n; w++) {
        const pikv_page_write *pw = &a->writes[w];
        uint32_t off;
        CHECK_ST(resolve(dev, pool, pw->slot, &key[w], &off));
        wr[4 * w] = (int32_t)off;
        wr[4 * w + 1] = pw->row0;
        wr[4 * w + 2] = pw->n_rows;
        wr[4 * w + 3] = pw->src_begin;
        const int64_t end = (int64_t)pw->src_begin + pw->n_rows;
        if (end > idx_end) idx_end = end;
        for (int32_t r = 0; r < pw->n_rows; r++)
            if (a->src_index[pw->src_begin + r] + 1 > n_src) n_src = a->src_index[pw->src_begin + r] + 1;
    }
    group_by_key(n, key, nk, order, kptr);
    cl_mem lay, mw, mo, mi, mk, mv;
    const size_t kv_bytes = (size_t)n_src * (size_t)kvh * (size_t)hd * sizeof(float);
    CHECK_ST(upload_layouts(dev, pool, &lay));
    CHECK_ST(pikv_ocl_upload(dev, S_A, wr, 4 * (size_t)n * sizeof(int32_t), &mw));
    CHECK_ST(pikv_ocl_upload(dev, S_B, order, (size_t)n * sizeof(int32_t), &mo));
    CHECK_ST(pikv_ocl_upload(dev, S_C, a->src_index, (size_t)idx_end * sizeof(int32_t), &mi));
    CHECK_ST(pikv_ocl_upload(dev, S_D, a->k, kv_bytes, &mk));
    CHECK_ST(pikv_ocl_upload(dev, S_E, a->v, kv_bytes, &mv));
    cl_kernel k = od->kernels[PIKV_OCL_K_APPEND];
    for (int32_t c = 0; c < nk; c++) {
        const int32_t items = kptr[c + 1] - kptr[c];
        if (items == 0) continue;
        cl_mem chunk = key_mem(pool, c);
        const cl_int o_begin = kptr[c], n_items = items;
        ARG(k, 0, chunk);
        ARG(k, 1, lay);
        ARG(k, 2, mw);
        ARG(k, 3, mo);
        ARG(k, 4, o_begin);
        ARG(k, 5, n_items);
        ARG(k, 6, mi);
        ARG(k, 7, mk);
        ARG(k, 8, mv);
        CHECK_ST(launch(dev, k, (size_t)items * (size_t)kvh * (size_t)hd, 0));
    }
    st = finish(dev);
done:
    if (st != PIKV_OK) clFinish(od->queue); /* the host inputs must not be in use any more */
    pikv_host_free(ctx, wr);
    pikv_host_free(ctx, key);
    pikv_host_free(ctx, order);
    pikv_host_free(ctx, kptr);
    return st;
}

/* ---- page copy ------------------------------------------------------------ */

pikv_status pikv_ocl_page_copy(pikv_device *dev, const pikv_page_copy_args *a)
{
    PIKV_FORWARD_IF_ERROR(pikv_ocl_ready(dev));
    pikv_ocl_device *od = pikv_ocl_dev(dev);
    const pikv_pool_view *pool = a->pool;
    pikv_status st = PIKV_OK;
    int32_t skey = 0, dkey = 0;
    uint32_t soff = 0, doff = 0;
    PIKV_FORWARD_IF_ERROR(resolve(dev, pool, a->src_slot, &skey, &soff));
    PIKV_FORWARD_IF_ERROR(resolve(dev, pool, a->dst_slot, &dkey, &doff));
    cl_mem src = key_mem(pool, skey), dst = key_mem(pool, dkey);
    if ((a->src_slot & PIKV_SLOT_QUANT) && (a->dst_slot & PIKV_SLOT_QUANT)) { /* whole quantized page */
        CHECK_CL(clEnqueueCopyBuffer(od->queue, src, dst, soff, doff, (size_t)pool->quant->layout->page_bytes, 0,
                                     NULL, NULL),
                 "clEnqueueCopyBuffer");
        st = finish(dev);
        goto done;
    }
    {
        PIKV_RETURN_ERROR_IF(a->dst_slot & PIKV_SLOT_QUANT, dev->ctx, PIKV_ERR_INTERNAL,
                             "page_copy: an open page into a quantized slot");
        const pikv_page_layout *L = pool->layout;
        cl_mem lay;
        CHECK_ST(upload_layouts(dev, pool, &lay));
        cl_kernel k = od->kernels[PIKV_OCL_K_PAGE_COPY];
        const cl_int src_lay = (a->src_slot & PIKV_SLOT_QUANT) ? LAYOUT_STRIDE : 0, n_rows = a->n_rows;
        const cl_uint so = soff, dof = doff;
        ARG(k, 0, src);
        ARG(k, 1, so);
        ARG(k, 2, dst);
        ARG(k, 3, dof);
        ARG(k, 4, lay);
        ARG(k, 5, src_lay);
        ARG(k, 6, n_rows);
        CHECK_ST(launch(dev, k, (size_t)L->n_kv_heads * (size_t)L->head_dim, 0));
        st = finish(dev);
    }
done:
    if (st != PIKV_OK) clFinish(od->queue);
    return st;
}

/* ---- attention ------------------------------------------------------------ */

pikv_status pikv_ocl_attention(pikv_device *dev, const pikv_attention_args *a)
{
    if (a->n_queries <= 0) return PIKV_OK;
    PIKV_FORWARD_IF_ERROR(pikv_ocl_ready(dev));
    pikv_context *ctx = dev->ctx;
    pikv_ocl_device *od = pikv_ocl_dev(dev);
    const pikv_pool_view *pool = a->pool;
    const pikv_page_layout *L = pool->layout;
    const int32_t kvh = L->n_kv_heads, hd = L->head_dim, ps = L->page_size, G = a->n_q_heads / kvh;
    const int32_t units = a->n_queries * kvh, nk = n_keys(pool);
    const int32_t E = a->indptr[units]; /* entries are indexed absolutely, like the CPU backend */
    const size_t W = od->attn_wg;
    const size_t local_bytes = ((size_t)G * (size_t)ps + (size_t)G * (size_t)hd + W + 3 * (size_t)G) * sizeof(float);
    PIKV_RETURN_ERROR_IF(local_bytes > od->local_mem, ctx, PIKV_ERR_UNSUPPORTED,
                         "device %s: attention needs %zu bytes of local memory (G %d, page %d, head_dim %d); "
                         "the device has %llu", dev->info.name, local_bytes, (int)G, (int)ps, (int)hd,
                         (unsigned long long)od->local_mem);
    pikv_status st = PIKV_OK;
    const size_t nE = (size_t)E;
    int32_t *ekey = host_ints(ctx, nE), *eunit = host_ints(ctx, nE), *tmp = host_ints(ctx, nE);
    int32_t *perm = host_ints(ctx, nE), *kptr = host_ints(ctx, (size_t)nk + 1);
    int32_t *uptr = host_ints(ctx, (size_t)units + 1);
    uint32_t *eoff = (uint32_t *)host_ints(ctx, nE), *poff = (uint32_t *)host_ints(ctx, nE);
    int32_t *plen = host_ints(ctx, nE);
    /* tasks: at most one per entry */
    int32_t *tasks = host_ints(ctx, 3 * nE), *tkey = host_ints(ctx, nE), *ctasks = host_ints(ctx, nE);
    int32_t *tkptr = host_ints(ctx, (size_t)nk + 1);
    if (!ekey || !eunit || !tmp || !perm || !kptr || !uptr || !eoff || !poff || !plen || !tasks || !tkey ||
        !ctasks || !tkptr) {
        st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "attention: host scratch for %d pages: allocation failed", (int)E);
        goto done;
    }
    for (int32_t u = 0; u < units; u++)
        for (int32_t e = a->indptr[u]; e < a->indptr[u + 1]; e++) {
            eunit[e] = u;
            CHECK_ST(resolve(dev, pool, a->slots[e], &ekey[e], &eoff[e]));
        }
    for (int32_t e = 0; e < a->indptr[0]; e++) { /* entries before the first list: unused */
        eunit[e] = 0;
        ekey[e] = 0;
        eoff[e] = 0;
    }
    /* entries grouped by list, then by chunk, then in list order: two stable counting sorts */
    group_by_key(E, ekey, nk, tmp, kptr);
    {
        memset(uptr, 0, ((size_t)units + 1) * sizeof *uptr);
        for (int32_t i = a->indptr[0]; i < E; i++) uptr[eunit[i] + 1]++;
        for (int32_t u = 0; u < units; u++) uptr[u + 1] += uptr[u];
        for (int32_t i = 0; i < E; i++) {
            const int32_t e = tmp[i];
            if (e < a->indptr[0]) continue;
            perm[uptr[eunit[e]]++] = e;
        }
    }
    const int32_t n_used = E - a->indptr[0];
    for (int32_t p = 0; p < n_used; p++) {
        poff[p] = eoff[perm[p]];
        plen[p] = a->page_len[perm[p]];
    }
    /* tasks: runs of at most TASK_PAGES entries of one list in one chunk */
    int32_t T = 0;
    {
        int32_t p = 0;
        for (int32_t u = 0; u < units; u++) {
            uptr[u] = T;
            const int32_t end = p + (a->indptr[u + 1] - a->indptr[u]);
            while (p < end) {
                const int32_t k0 = ekey[perm[p]];
                int32_t q = p;
                while (q < end && q - p < TASK_PAGES && ekey[perm[q]] == k0) q++;
                tasks[3 * T] = u;
                tasks[3 * T + 1] = p;
                tasks[3 * T + 2] = q;
                tkey[T] = k0;
                T++;
                p = q;
            }
        }
        uptr[units] = T;
    }
    group_by_key(T, tkey, nk, ctasks, tkptr);

    const size_t out_floats = (size_t)a->n_queries * (size_t)a->n_q_heads * (size_t)hd;
    const size_t lse_floats = (size_t)a->n_queries * (size_t)a->n_q_heads;
    const size_t plse_floats = a->page_lse ? nE * (size_t)G : 0;
    cl_mem lay, mq, mt, mct, moff, mlen, mid, mut, mparts, mout, mlse, mplse, merr;
    CHECK_ST(upload_layouts(dev, pool, &lay));
    CHECK_ST(pikv_ocl_upload(dev, S_A, a->q, out_floats * sizeof(float), &mq));
    CHECK_ST(pikv_ocl_upload(dev, S_B, tasks, 3 * (size_t)T * sizeof(int32_t), &mt));
    CHECK_ST(pikv_ocl_upload(dev, S_C, ctasks, (size_t)T * sizeof(int32_t), &mct));
    CHECK_ST(pikv_ocl_upload(dev, S_D, poff, (size_t)n_used * sizeof(uint32_t), &moff));
    CHECK_ST(pikv_ocl_upload(dev, S_E, plen, (size_t)n_used * sizeof(int32_t), &mlen));
    CHECK_ST(pikv_ocl_upload(dev, S_F, perm, (size_t)n_used * sizeof(int32_t), &mid));
    CHECK_ST(pikv_ocl_upload(dev, S_G, uptr, ((size_t)units + 1) * sizeof(int32_t), &mut));
    CHECK_ST(pikv_ocl_scratch(dev, S_PARTS, (size_t)T * (size_t)G * ((size_t)hd + 2) * sizeof(float), &mparts));
    CHECK_ST(pikv_ocl_scratch(dev, S_OUT, out_floats * sizeof(float), &mout));
    CHECK_ST(pikv_ocl_scratch(dev, S_LSE, lse_floats * sizeof(float), &mlse));
    /* page_lse: entries skipped (empty pages) keep the caller's values */
    CHECK_ST(pikv_ocl_upload(dev, S_PLSE, a->page_lse, plse_floats * sizeof(float), &mplse));
    const cl_int no_error = INT_MAX;
    CHECK_ST(pikv_ocl_upload(dev, S_ERR, &no_error, sizeof no_error, &merr));
    {
        cl_kernel k = od->kernels[PIKV_OCL_K_ATTN_PART];
        const cl_int nqh = a->n_q_heads, g_ = G, want = a->page_lse != NULL;
        const cl_float scale = a->scale;
        for (int32_t c = 0; c < nk; c++) {
            const int32_t items = tkptr[c + 1] - tkptr[c];
            if (items == 0) continue;
            cl_mem chunk = key_mem(pool, c);
            const cl_int lay_off = c < pool->n_chunks ? 0 : LAYOUT_STRIDE, ct_begin = tkptr[c];
            ARG(k, 0, chunk);
            ARG(k, 1, lay);
            ARG(k, 2, lay_off);
            ARG(k, 3, mq);
            ARG(k, 4, mt);
            ARG(k, 5, mct);
            ARG(k, 6, ct_begin);
            ARG(k, 7, moff);
            ARG(k, 8, mlen);
            ARG(k, 9, mid);
            ARG(k, 10, nqh);
            ARG(k, 11, g_);
            ARG(k, 12, scale);
            ARG(k, 13, want);
            ARG(k, 14, mparts);
            ARG(k, 15, mplse);
            LOCAL_ARG(k, 16, (size_t)G * (size_t)ps * sizeof(float));
            LOCAL_ARG(k, 17, (size_t)G * (size_t)hd * sizeof(float));
            LOCAL_ARG(k, 18, W * sizeof(float));
            LOCAL_ARG(k, 19, 3 * (size_t)G * sizeof(float));
            CHECK_ST(launch(dev, k, (size_t)items * W, W));
        }
    }
    {
        cl_kernel k = od->kernels[PIKV_OCL_K_ATTN_FINISH];
        const cl_int n_items = units * G, g_ = G, hd_ = hd, nqh = a->n_q_heads, kvh_ = kvh;
        ARG(k, 0, n_items);
        ARG(k, 1, g_);
        ARG(k, 2, hd_);
        ARG(k, 3, nqh);
        ARG(k, 4, kvh_);
        ARG(k, 5, mut);
        ARG(k, 6, mparts);
        ARG(k, 7, mout);
        ARG(k, 8, mlse);
        ARG(k, 9, merr);
        CHECK_ST(launch(dev, k, (size_t)n_items, 0));
    }
    cl_int bad = INT_MAX;
    CHECK_ST(read_back(dev, merr, &bad, sizeof bad));
    if (bad != INT_MAX) {
        st = PIKV_FAIL(ctx, PIKV_ERR_INVALID_ARGUMENT,
                       "attention: query %d, KV head %d: a score overflowed float (q.k*scale is not finite); "
                       "the inputs are too large", (int)(bad / kvh), (int)(bad % kvh));
        goto done;
    }
    CHECK_ST(read_back(dev, mout, a->out, out_floats * sizeof(float)));
    CHECK_ST(read_back(dev, mlse, a->lse, lse_floats * sizeof(float)));
    if (a->page_lse) CHECK_ST(read_back(dev, mplse, a->page_lse, plse_floats * sizeof(float)));
done:
    if (st != PIKV_OK) clFinish(od->queue);
    pikv_host_free(ctx, ekey);
    pikv_host_free(ctx, eunit);
    pikv_host_free(ctx, tmp);
    pikv_host_free(ctx, perm);
    pikv_host_free(ctx, kptr);
    pikv_host_free(ctx, uptr);
    pikv_host_free(ctx, eoff);
    pikv_host_free(ctx, poff);
    pikv_host_free(ctx, plen);
    pikv_host_free(ctx, tasks);
    pikv_host_free(ctx, tkey);
    pikv_host_free(ctx, ctasks);
    pikv_host_free(ctx, tkptr);
    return st;
}

/* ---- merge ---------------------------------------------------------------- */

pikv_status pikv_ocl_merge(pikv_device *dev, const pikv_merge_args *a)
{
    PIKV_RETURN_ERROR_IF(a->dim < 1 || a->dim > 1024, dev->ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "merge: dim %d is outside 1..1024", a->dim);
    if (a->n_rows <= 0) return PIKV_OK;
    PIKV_FORWARD_IF_ERROR(pikv_ocl_ready(dev));
    pikv_ocl_device *od = pikv_ocl_dev(dev);
    pikv_status st = PIKV_OK;
    const size_t rows = (size_t)a->n_rows, parts = a->n_parts > 0 ? (size_t)a->n_parts : 0;
    cl_mem mpo, mpl, mout, mlse;
    CHECK_ST(pikv_ocl_upload(dev, S_A, a->part_out, parts * rows * (size_t)a->dim * sizeof(float), &mpo));
    CHECK_ST(pikv_ocl_upload(dev, S_B, a->part_lse, parts * rows * sizeof(float), &mpl));
    CHECK_ST(pikv_ocl_scratch(dev, S_OUT, rows * (size_t)a->dim * sizeof(float), &mout));
    CHECK_ST(pikv_ocl_scratch(dev, S_LSE, rows * sizeof(float), &mlse));
    {
        cl_kernel k = od->kernels[PIKV_OCL_K_MERGE];
        const cl_int np = (cl_int)parts, nr = a->n_rows, dim = a->dim, want = a->lse != NULL;
        ARG(k, 0, np);
        ARG(k, 1, nr);
        ARG(k, 2, dim);
        ARG(k, 3, mpo);
        ARG(k, 4, mpl);
        ARG(k, 5, mout);
        ARG(k, 6, mlse);
        ARG(k, 7, want);
        CHECK_ST(launch(dev, k, rows, 0));
    }
    CHECK_ST(read_back(dev, mout, a->out, rows * (size_t)a->dim * sizeof(float)));
    if (a->lse) CHECK_ST(read_back(dev, mlse, a->lse, rows * sizeof(float)));
done:
    if (st != PIKV_OK) clFinish(od->queue);
    return st;
}

/* ---- Quest scores ----------------------------------------------------------- */

pikv_status pikv_ocl_score(pikv_device *dev, const pikv_score_args *a)
{
    const int32_t n = a->n_queries > 0 ? a->indptr[a->n_queries] : 0;
    if (n == 0) return PIKV_OK;
    PIKV_FORWARD_IF_ERROR(pikv_ocl_ready(dev));
    pikv_context *ctx = dev->ctx;
    pikv_ocl_device *od = pikv_ocl_dev(dev);
    const pikv_pool_view *pool = a->pool;
    const pikv_page_layout *L = pool->layout;
    const int32_t kvh = L->n_kv_heads, hd = L->head_dim, G = a->n_q_heads / kvh, nk = n_keys(pool);
    pikv_status st = PIKV_OK;
    int32_t *key = host_ints(ctx, (size_t)n), *qof = host_ints(ctx, (size_t)n);
    int32_t *order = host_ints(ctx, (size_t)n), *kptr = host_ints(ctx, (size_t)nk + 1);
    uint32_t *off = (uint32_t *)host_ints(ctx, (size_t)n);
    if (!key || !qof || !order || !kptr || !off) {
        st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "score: host scratch for %d candidates: allocation failed", (int)n);
        goto done;
    }
    for (int32_t c = 0; c < a->indptr[0]; c++) {
        key[c] = 0;
        qof[c] = 0;
        off[c] = 0;
    }
    for (int32_t i = 0; i < a->n_queries; i++)
        for (int32_t c = a->indptr[i]; c < a->indptr[i + 1]; c++) {
            qof[c] = i;
            CHECK_ST(resolve(dev, pool, a->slots[c], &key[c], &off[c]));
        }
    /* candidates before indptr[0] are not scored: leave them out of the groups */
    group_by_key(n - a->indptr[0], key + a->indptr[0], nk, order, kptr);
    for (int32_t i = 0; i < n - a->indptr[0]; i++) order[i] += a->indptr[0];
    cl_mem lay, moff, mq_of, mo, mq, msc;
    const size_t q_floats = (size_t)a->n_queries * (size_t)a->n_q_heads * (size_t)hd;
    CHECK_ST(upload_layouts(dev, pool, &lay));
    CHECK_ST(pikv_ocl_upload(dev, S_A, off, (size_t)n * sizeof(uint32_t), &moff));
    CHECK_ST(pikv_ocl_upload(dev, S_B, qof, (size_t)n * sizeof(int32_t), &mq_of));
    CHECK_ST(pikv_ocl_upload(dev, S_C, order, (size_t)(n - a->indptr[0]) * sizeof(int32_t), &mo));
    CHECK_ST(pikv_ocl_upload(dev, S_D, a->q, q_floats * sizeof(float), &mq));
    /* scores of candidates before indptr[0] keep the caller's values */
    CHECK_ST(pikv_ocl_upload(dev, S_OUT, a->scores, (size_t)n * (size_t)kvh * sizeof(float), &msc));
    {
        cl_kernel k = od->kernels[PIKV_OCL_K_SCORE];
        const cl_int nqh = a->n_q_heads, g_ = G;
        for (int32_t c = 0; c < nk; c++) {
            const int32_t items = kptr[c + 1] - kptr[c];
            if (items == 0) continue;
            cl_mem chunk = key_mem(pool, c);
            const cl_int lay_off = c < pool->n_chunks ? 0 : LAYOUT_STRIDE, o_begin = kptr[c], n_items = items;
            ARG(k, 0, chunk);
            ARG(k, 1, lay);
            ARG(k, 2, lay_off);
            ARG(k, 3, moff);
            ARG(k, 4, mq_of);
            ARG(k, 5, mo);
            ARG(k, 6, o_begin);
            ARG(k, 7, n_items);
            ARG(k, 8, mq);
            ARG(k, 9, nqh);
            ARG(k, 10, g_);
            ARG(k, 11, msc);
            CHECK_ST(launch(dev, k, (size_t)items * (size_t)kvh, 0));
        }
    }
    CHECK_ST(read_back(dev, msc, a->scores, (size_t)n * (size_t)kvh * sizeof(float)));
done:
    if (st != PIKV_OK) clFinish(od->queue);
    pikv_host_free(ctx, key);
    pikv_host_free(ctx, qof);
    pikv_host_free(ctx, order);
    pikv_host_free(ctx, kptr);
    pikv_host_free(ctx, off);
    return st;
}

/* ---- quantize --------------------------------------------------------------- */

pikv_status pikv_ocl_quantize(pikv_device *dev, pikv_quantize_args *a)
{
    PIKV_FORWARD_IF_ERROR(pikv_ocl_ready(dev));
    pikv_context *ctx = dev->ctx;
    pikv_ocl_device *od = pikv_ocl_dev(dev);
    const pikv_pool_view *pool = a->pool;
    PIKV_RETURN_ERROR_IF(!pool->quant, ctx, PIKV_ERR_INTERNAL, "quantize: the pool has no quantized pool");
    const pikv_page_layout *S = pool->layout, *Q = pool->quant->layout;
    const int32_t kvh = S->n_kv_heads, hd = S->head_dim, ps = S->page_size;
    const int32_t per = Q->dtype == PIKV_DTYPE_INT4 ? 2 : 1, ncol = (hd + per - 1) / per;
    const size_t n_keys_items = (size_t)kvh * (size_t)Q->k_groups * (size_t)ncol;
    const size_t n_val_items = (size_t)kvh * (size_t)ps;
    pikv_status st = PIKV_OK;
    float *errs = pikv_host_alloc(ctx, 3 * (n_keys_items + n_val_items) * sizeof(float), 16);
    PIKV_RETURN_ERROR_IF(!errs, ctx, PIKV_ERR_OUT_OF_MEMORY, "quantize: host scratch allocation failed");
    int32_t skey = 0, dkey = 0;
    uint32_t soff = 0, doff = 0;
    CHECK_ST(resolve(dev, pool, a->src_slot & ~PIKV_SLOT_QUANT, &skey, &soff));
    CHECK_ST(resolve(dev, pool, a->dst_slot | PIKV_SLOT_QUANT, &dkey, &doff));
    cl_mem src = key_mem(pool, skey), dst = key_mem(pool, dkey);
    cl_mem lay, mek, mev;
    CHECK_ST(upload_layouts(dev, pool, &lay));
    CHECK_ST(pikv_ocl_scratch(dev, S_A, 3 * n_keys_items * sizeof(float), &mek));
    CHECK_ST(pikv_ocl_scratch(dev, S_B, 3 * n_val_items * sizeof(float), &mev));
    {
        const cl_uchar zero = 0;
        CHECK_CL(clEnqueueFillBuffer(od->queue, dst, &zero, 1, doff, (size_t)Q->page_bytes, 0, NULL, NULL),
                 "clEnqueueFillBuffer");
        /* Quest bounds: those of the f16 keys (min then max, contiguous in both layouts) */
        CHECK_CL(clEnqueueCopyBuffer(od->queue, src, dst, soff + S->kmin_offset, doff + Q->kmin_offset,
                                     2 * (size_t)kvh * (size_t)hd * sizeof(float), 0, NULL, NULL),
                 "clEnqueueCopyBuffer");
        const cl_uint so = soff, dof = doff;
        cl_kernel k = od->kernels[PIKV_OCL_K_QUANT_KEYS];
        ARG(k, 0, src);
        ARG(k, 1, so);
        ARG(k, 2, dst);
        ARG(k, 3, dof);
        ARG(k, 4, lay);
        ARG(k, 5, mek);
        CHECK_ST(launch(dev, k, n_keys_items, 0));
        k = od->kernels[PIKV_OCL_K_QUANT_VALUES];
        ARG(k, 0, src);
        ARG(k, 1, so);
        ARG(k, 2, dst);
        ARG(k, 3, dof);
        ARG(k, 4, lay);
        ARG(k, 5, mev);
        CHECK_ST(launch(dev, k, n_val_items, 0));
    }
    CHECK_ST(read_back(dev, mek, errs, 3 * n_keys_items * sizeof(float)));
    CHECK_ST(read_back(dev, mev, errs + 3 * n_keys_items, 3 * n_val_items * sizeof(float)));
    {
        double e[5] = {0, 0, 0, 0, 0};
        for (size_t i = 0; i < n_keys_items; i++) {
            e[0] += errs[3 * i];
            e[1] += errs[3 * i + 1];
            e[4] = errs[3 * i + 2] > e[4] ? errs[3 * i + 2] : e[4];
        }
        const float *ev = errs + 3 * n_keys_items;
        for (size_t i = 0; i < n_val_items; i++) {
            e[2] += ev[3 * i];
            e[3] += ev[3 * i + 1];
            e[4] = ev[3 * i + 2] > e[4] ? ev[3 * i + 2] : e[4];
        }
        for (int i = 0; i < 4; i++) a->err[i] += e[i];
        a->err[4] = e[4] > a->err[4] ? e[4] : a->err[4];
    }
done:
    if (st != PIKV_OK) clFinish(od->queue);
    pikv_host_free(ctx, errs);
    return st;
}

/* ---- budgeted top-k --------------------------------------------------------- */

pikv_status pikv_ocl_topk(pikv_device *dev, const pikv_topk_args *a)
{
    const int32_t n = a->n_lists > 0 ? a->indptr[a->n_lists] : 0;
    if (a->n_lists <= 0) return PIKV_OK;
    PIKV_FORWARD_IF_ERROR(pikv_ocl_ready(dev));
    pikv_ocl_device *od = pikv_ocl_dev(dev);
    pikv_status st = PIKV_OK;
    const size_t entries = n > 0 ? (size_t)n : 1;
    cl_mem mptr, msc, mtok, mbud, mkeep;
    CHECK_ST(pikv_ocl_upload(dev, S_A, a->indptr, ((size_t)a->n_lists + 1) * sizeof(int32_t), &mptr));
    CHECK_ST(pikv_ocl_upload(dev, S_B, a->scores, (size_t)n * sizeof(float), &msc));
    CHECK_ST(pikv_ocl_upload(dev, S_C, a->tokens, (size_t)n * sizeof(int32_t), &mtok));
    CHECK_ST(pikv_ocl_upload(dev, S_D, a->budget, (size_t)a->n_lists * sizeof(int64_t), &mbud));
    CHECK_ST(pikv_ocl_scratch(dev, S_OUT, entries, &mkeep));
    {
        cl_kernel k = od->kernels[PIKV_OCL_K_TOPK];
        const cl_int nl = a->n_lists;
        ARG(k, 0, mptr);
        ARG(k, 1, msc);
        ARG(k, 2, mtok);
        ARG(k, 3, mbud);
        ARG(k, 4, mkeep);
        ARG(k, 5, nl);
        CHECK_ST(launch(dev, k, (size_t)a->n_lists, 0));
    }
    if (n > 0) CHECK_ST(read_back(dev, mkeep, a->keep, (size_t)n));
    CHECK_ST(finish(dev)); /* every op is complete when it returns: the caller frees its inputs */
done:
    if (st != PIKV_OK) clFinish(od->queue);
    return st;
}
