/* Dispatch of the ops: host-side planning (pages grouped by chunk, see
   opencl-impl.h and ../common/chunk-plan.h), uploads into scratch buffers,
   one launch per chunk touched, read-back. Every op has finished when it
   returns, so the host arrays of its arguments may go away and the scratch
   buffers are free for the next op. */
#include "opencl-impl.h"

#include "../common/chunk-plan.h"

#include <limits.h>

enum { TASK_PAGES = 8 }; /* pages per attention task at most (more tasks = more parallelism) */

/* scratch buffer indices */
enum { S_LAY = 0, S_A, S_B, S_C, S_D, S_E, S_F, S_G, S_OUT, S_LSE, S_PLSE, S_ERR, S_PARTS };

/* Uploads the layouts of the pool (row 0) and of its quantized pool (row 1). */
static pikv_status upload_layouts(pikv_device *dev, const pikv_pool_view *pool, cl_mem *out)
{
    uint32_t lay[2 * PIKV_LAYOUT_WORDS];
    pikv_pool_layout_words(lay, pool);
    PIKV_FORWARD_IF_ERROR(pikv_ocl_scratch(dev, S_LAY, sizeof lay, out));
    /* blocking: lay is on this function's stack */
    cl_int err = clEnqueueWriteBuffer(pikv_ocl_dev(dev)->queue, *out, CL_TRUE, 0, sizeof lay, lay, 0, NULL, NULL);
    return err == CL_SUCCESS ? PIKV_OK : pikv_ocl_fail(dev, err, "clEnqueueWriteBuffer (layouts)");
}

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

/* The last step of both attention paths (this file's and opencl-cpu-ops.c's): the finish
   kernel merges each (query, head)'s partials into out and lse, then the overflow flag
   the kernels raise is read back. */
pikv_status pikv_ocl_attention_finish(pikv_device *dev, const pikv_ocl_finish_args *f)
{
    pikv_ocl_device *od = pikv_ocl_dev(dev);
    pikv_status st = PIKV_OK;
    cl_kernel k = od->kernels[PIKV_OCL_K_ATTN_FINISH];
    const cl_int n_items = f->units * f->group;
    ARG(k, 0, n_items);
    ARG(k, 1, f->group);
    ARG(k, 2, f->head_dim);
    ARG(k, 3, f->n_q_heads);
    ARG(k, 4, f->n_kv_heads);
    ARG(k, 5, f->units_buf);
    ARG(k, 6, f->parts);
    ARG(k, 7, f->out);
    ARG(k, 8, f->lse);
    ARG(k, 9, f->err);
    CHECK_ST(launch(dev, k, (size_t)n_items, 0));
    cl_int bad = INT_MAX;
    CHECK_ST(read_back(dev, f->err, &bad, sizeof bad));
    if (bad != INT_MAX)
        st = PIKV_FAIL(dev->ctx, PIKV_ERR_INVALID_ARGUMENT,
                       "attention: query %d, KV head %d: a score overflowed float (q.k*scale is not finite); "
                       "the inputs are too large", (int)(bad / f->n_kv_heads), (int)(bad % f->n_kv_heads));
done:
    return st;
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
    const int32_t n = a->n_writes, kvh = L->n_kv_heads, hd = L->head_dim;
    pikv_status st = PIKV_OK;
    pikv_append_plan plan = {0};
    CHECK_ST(pikv_append_plan_build(dev, a, &plan));
    cl_mem lay, mw, mo, mi, mk, mv;
    const size_t kv_bytes = (size_t)plan.n_src * (size_t)kvh * (size_t)hd * sizeof(float);
    CHECK_ST(upload_layouts(dev, pool, &lay));
    CHECK_ST(pikv_ocl_upload(dev, S_A, plan.writes, 4 * (size_t)n * sizeof(int32_t), &mw));
    CHECK_ST(pikv_ocl_upload(dev, S_B, plan.order, (size_t)n * sizeof(int32_t), &mo));
    CHECK_ST(pikv_ocl_upload(dev, S_C, a->src_index, (size_t)plan.idx_end * sizeof(int32_t), &mi));
    CHECK_ST(pikv_ocl_upload(dev, S_D, a->k, kv_bytes, &mk));
    CHECK_ST(pikv_ocl_upload(dev, S_E, a->v, kv_bytes, &mv));
    cl_kernel k = od->kernels[PIKV_OCL_K_APPEND];
    for (int32_t c = 0; c < plan.n_keys; c++) {
        const int32_t items = plan.kptr[c + 1] - plan.kptr[c];
        if (items == 0) continue;
        cl_mem chunk = (cl_mem)pikv_chunk_buffer(pool, c)->handle;
        const cl_int o_begin = plan.kptr[c], n_items = items;
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
    pikv_append_plan_free(ctx, &plan);
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
    PIKV_FORWARD_IF_ERROR(pikv_chunk_resolve(dev, pool, a->src_slot, &skey, &soff));
    PIKV_FORWARD_IF_ERROR(pikv_chunk_resolve(dev, pool, a->dst_slot, &dkey, &doff));
    cl_mem src = (cl_mem)pikv_chunk_buffer(pool, skey)->handle, dst = (cl_mem)pikv_chunk_buffer(pool, dkey)->handle;
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
        const cl_int src_lay = (a->src_slot & PIKV_SLOT_QUANT) ? PIKV_LAYOUT_WORDS : 0, n_rows = a->n_rows;
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
    const int32_t units = a->n_queries * kvh;
    const int32_t E = a->indptr[units]; /* entries are indexed absolutely, like the CPU backend */
    int cpu_k = -1;
    if (pikv_ocl_attention_cpu_applies(od, a, &cpu_k)) return pikv_ocl_attention_cpu(dev, a, cpu_k);
    const size_t W = od->attn_wg;
    const size_t local_bytes = ((size_t)G * (size_t)ps + (size_t)G * (size_t)hd + W + 3 * (size_t)G) * sizeof(float);
    PIKV_RETURN_ERROR_IF(local_bytes > od->local_mem, ctx, PIKV_ERR_UNSUPPORTED,
                         "device %s: attention needs %zu bytes of local memory (G %d, page %d, head_dim %d); "
                         "the device has %llu", dev->info.name, local_bytes, (int)G, (int)ps, (int)hd,
                         (unsigned long long)od->local_mem);
    pikv_status st = PIKV_OK;
    pikv_attention_plan plan = {0};
    CHECK_ST(pikv_attention_plan_build(dev, a, TASK_PAGES, &plan));
    const int32_t T = plan.n_tasks, n_used = plan.n_used;

    const size_t out_floats = (size_t)a->n_queries * (size_t)a->n_q_heads * (size_t)hd;
    const size_t lse_floats = (size_t)a->n_queries * (size_t)a->n_q_heads;
    const size_t plse_floats = a->page_lse ? (size_t)E * (size_t)G : 0;
    cl_mem lay, mq, mt, mct, moff, mlen, mid, mut, mparts, mout, mlse, mplse, merr;
    CHECK_ST(upload_layouts(dev, pool, &lay));
    CHECK_ST(pikv_ocl_upload(dev, S_A, a->q, out_floats * sizeof(float), &mq));
    CHECK_ST(pikv_ocl_upload(dev, S_B, plan.tasks, 3 * (size_t)T * sizeof(int32_t), &mt));
    CHECK_ST(pikv_ocl_upload(dev, S_C, plan.chunk_tasks, (size_t)T * sizeof(int32_t), &mct));
    CHECK_ST(pikv_ocl_upload(dev, S_D, plan.offset, (size_t)n_used * sizeof(uint32_t), &moff));
    CHECK_ST(pikv_ocl_upload(dev, S_E, plan.len, (size_t)n_used * sizeof(int32_t), &mlen));
    CHECK_ST(pikv_ocl_upload(dev, S_F, plan.perm, (size_t)n_used * sizeof(int32_t), &mid));
    CHECK_ST(pikv_ocl_upload(dev, S_G, plan.list_tasks, ((size_t)units + 1) * sizeof(int32_t), &mut));
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
        for (int32_t c = 0; c < plan.n_keys; c++) {
            const int32_t items = plan.tkptr[c + 1] - plan.tkptr[c];
            if (items == 0) continue;
            cl_mem chunk = (cl_mem)pikv_chunk_buffer(pool, c)->handle;
            const cl_int lay_off = c < pool->n_chunks ? 0 : PIKV_LAYOUT_WORDS, ct_begin = plan.tkptr[c];
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
        const pikv_ocl_finish_args f = {units, G, hd, a->n_q_heads, kvh, mut, mparts, mout, mlse, merr};
        CHECK_ST(pikv_ocl_attention_finish(dev, &f));
    }
    CHECK_ST(read_back(dev, mout, a->out, out_floats * sizeof(float)));
    CHECK_ST(read_back(dev, mlse, a->lse, lse_floats * sizeof(float)));
    if (a->page_lse) CHECK_ST(read_back(dev, mplse, a->page_lse, plse_floats * sizeof(float)));
done:
    if (st != PIKV_OK) clFinish(od->queue);
    pikv_attention_plan_free(ctx, &plan);
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
    if (pikv_ocl_score_cpu_applies(od, a)) return pikv_ocl_score_cpu(dev, a);
    const pikv_pool_view *pool = a->pool;
    const pikv_page_layout *L = pool->layout;
    const int32_t kvh = L->n_kv_heads, hd = L->head_dim, G = a->n_q_heads / kvh;
    pikv_status st = PIKV_OK;
    pikv_score_plan plan = {0};
    CHECK_ST(pikv_score_plan_build(dev, a, &plan));
    cl_mem lay, moff, mq_of, mo, mq, msc;
    const size_t q_floats = (size_t)a->n_queries * (size_t)a->n_q_heads * (size_t)hd;
    CHECK_ST(upload_layouts(dev, pool, &lay));
    CHECK_ST(pikv_ocl_upload(dev, S_A, plan.offset, (size_t)n * sizeof(uint32_t), &moff));
    CHECK_ST(pikv_ocl_upload(dev, S_B, plan.query, (size_t)n * sizeof(int32_t), &mq_of));
    CHECK_ST(pikv_ocl_upload(dev, S_C, plan.order, (size_t)(n - a->indptr[0]) * sizeof(int32_t), &mo));
    CHECK_ST(pikv_ocl_upload(dev, S_D, a->q, q_floats * sizeof(float), &mq));
    /* scores of candidates before indptr[0] keep the caller's values */
    CHECK_ST(pikv_ocl_upload(dev, S_OUT, a->scores, (size_t)n * (size_t)kvh * sizeof(float), &msc));
    {
        cl_kernel k = od->kernels[PIKV_OCL_K_SCORE];
        const cl_int nqh = a->n_q_heads, g_ = G;
        for (int32_t c = 0; c < plan.n_keys; c++) {
            const int32_t items = plan.kptr[c + 1] - plan.kptr[c];
            if (items == 0) continue;
            cl_mem chunk = (cl_mem)pikv_chunk_buffer(pool, c)->handle;
            const cl_int lay_off = c < pool->n_chunks ? 0 : PIKV_LAYOUT_WORDS, o_begin = plan.kptr[c], n_items = items;
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
    pikv_score_plan_free(ctx, &plan);
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
    CHECK_ST(pikv_chunk_resolve(dev, pool, a->src_slot & ~PIKV_SLOT_QUANT, &skey, &soff));
    CHECK_ST(pikv_chunk_resolve(dev, pool, a->dst_slot | PIKV_SLOT_QUANT, &dkey, &doff));
    cl_mem src = (cl_mem)pikv_chunk_buffer(pool, skey)->handle, dst = (cl_mem)pikv_chunk_buffer(pool, dkey)->handle;
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
    pikv_quantize_errors_add(a, errs, n_keys_items, errs + 3 * n_keys_items, n_val_items);
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

/* ---- read_reduce (the roofline probe) ---------------------------------------- */

/* CPU devices: a contiguous run per work item, 2 MiB each (at least 64 items
   when the buffer allows, so every core streams); GPUs: up to 1024 groups of
   256 items striding over the buffer. The partials are added in double here. */
enum { REDUCE_CPU_RUN = 2 << 20, REDUCE_GPU_WG = 256, REDUCE_GPU_GROUPS = 1024 };

pikv_status pikv_ocl_read_reduce(pikv_device *dev, const pikv_read_reduce_args *a)
{
    pikv_context *ctx = dev->ctx;
    PIKV_RETURN_ERROR_IF(a->n_floats > a->buf->size / sizeof(float), ctx, PIKV_ERR_OUT_OF_RANGE,
                         "read_reduce: %llu floats past a buffer of %llu bytes", (unsigned long long)a->n_floats,
                         (unsigned long long)a->buf->size);
    *a->sum = 0;
    if (a->n_floats == 0) return PIKV_OK;
    PIKV_FORWARD_IF_ERROR(pikv_ocl_ready(dev));
    pikv_ocl_device *od = pikv_ocl_dev(dev);
    pikv_status st = PIKV_OK;
    float *host = NULL;
    cl_mem buf = (cl_mem)a->buf->handle, mparts;
    const cl_ulong n = a->n_floats;
    size_t items = 0, local = 0;
    cl_kernel k = NULL;
    if (od->is_cpu && od->kernels[PIKV_OCL_K_READ_REDUCE_CPU]) {
        const uint64_t n16 = a->n_floats / 16;
        uint64_t per = REDUCE_CPU_RUN / 64; /* float16s per item */
        if (n16 / per < 64) per = n16 / 64 > 0 ? n16 / 64 : 1;
        items = (size_t)((n16 + per - 1) / per);
        if (items == 0) items = 1; /* fewer than 16 floats: item 0 adds the tail */
        local = 1;
        k = od->kernels[PIKV_OCL_K_READ_REDUCE_CPU];
        const cl_ulong per_ = per;
        CHECK_ST(pikv_ocl_scratch(dev, S_OUT, items * sizeof(float), &mparts));
        ARG(k, 0, buf);
        ARG(k, 1, n);
        ARG(k, 2, per_);
        ARG(k, 3, mparts);
    } else {
        size_t wg = REDUCE_GPU_WG, kmax = 0;
        k = od->kernels[PIKV_OCL_K_READ_REDUCE_GPU];
        clGetKernelWorkGroupInfo(k, od->id, CL_KERNEL_WORK_GROUP_SIZE, sizeof kmax, &kmax, NULL);
        while (wg > 1 && wg > kmax) wg /= 2;
        const uint64_t n4 = a->n_floats / 4;
        uint64_t groups = (n4 / 8 + wg - 1) / wg; /* at least ~8 float4s per item */
        groups = groups < 1 ? 1 : groups > REDUCE_GPU_GROUPS ? REDUCE_GPU_GROUPS : groups;
        items = (size_t)groups * wg;
        local = wg;
        CHECK_ST(pikv_ocl_scratch(dev, S_OUT, (size_t)groups * sizeof(float), &mparts));
        ARG(k, 0, buf);
        ARG(k, 1, n);
        ARG(k, 2, mparts);
        LOCAL_ARG(k, 3, wg * sizeof(float));
    }
    CHECK_ST(launch(dev, k, items, local));
    {
        const size_t n_parts = local == 1 ? items : items / local;
        host = pikv_host_alloc(ctx, n_parts * sizeof(float), 16);
        if (!host) {
            st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "read_reduce: host scratch allocation failed");
            goto done;
        }
        CHECK_ST(read_back(dev, mparts, host, n_parts * sizeof(float)));
        double sum = 0;
        for (size_t i = 0; i < n_parts; i++) sum += host[i];
        *a->sum = sum;
    }
done:
    if (st != PIKV_OK) clFinish(od->queue);
    pikv_host_free(ctx, host);
    return st;
}
