/* CPU ops that write pages: append (store rows in the page dtype and widen the
   Quest bounds) and page copy (copy a row prefix, recompute the bounds). */
#include "cpu-impl.h"

#include <string.h>

/* Store n floats as the page dtype; returns the stored values (after rounding)
   in `stored` so bounds cover exactly what attention will read. */
static void store_row(const pikv_cpu_backend *cb, pikv_dtype dtype, unsigned char *dst,
                      const float *src, int32_t n, float *stored)
{
    if (dtype == PIKV_DTYPE_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        if (stored) memcpy(stored, src, (size_t)n * sizeof(float));
        return;
    }
    cb->f32_to_f16(src, (uint16_t *)dst, n);
    if (stored) cb->f16_to_f32((const uint16_t *)dst, stored, n);
}

static void load_row(const pikv_cpu_backend *cb, pikv_dtype dtype, const unsigned char *src,
                     int32_t n, float *out)
{
    if (dtype == PIKV_DTYPE_F32) {
        memcpy(out, src, (size_t)n * sizeof(float));
        return;
    }
    cb->f16_to_f32((const uint16_t *)src, out, n);
}

/* A dequantized value can pass the f16 range by part of a step (scales round up);
   the value it approximates was within it, so clamping keeps the error bound. */
static void clamp_f16_range(float *x, int32_t n)
{
    for (int32_t d = 0; d < n; d++) x[d] = x[d] > 65504.0f ? 65504.0f : x[d] < -65504.0f ? -65504.0f : x[d];
}

static void widen_bounds(float *kmin, float *kmax, const float *row, int32_t n, bool init)
{
    if (init) {
        memcpy(kmin, row, (size_t)n * sizeof(float));
        memcpy(kmax, row, (size_t)n * sizeof(float));
        return;
    }
    for (int32_t d = 0; d < n; d++) {
        kmin[d] = row[d] < kmin[d] ? row[d] : kmin[d];
        kmax[d] = row[d] > kmax[d] ? row[d] : kmax[d];
    }
}

typedef struct append_job {
    const pikv_append_args *args;
    const pikv_cpu_backend *cb;
} append_job;

enum { MAX_STACK_DIM = 1024 }; /* head_dim limit of pikv_cache_params */

static void append_task(void *arg, int64_t task, int32_t thread)
{
    (void)thread;
    const pikv_append_args *a = ((append_job *)arg)->args;
    const pikv_cpu_backend *cb = ((append_job *)arg)->cb;
    const pikv_page_layout *L = a->pool->layout;
    const pikv_page_write *w = &a->writes[task];
    unsigned char *page = pikv_cpu_page_ptr(a->pool, w->slot);
    const int32_t hd = L->head_dim, kvh = L->n_kv_heads;
    float stored[MAX_STACK_DIM];
    for (int32_t g = 0; g < kvh; g++) {
        unsigned char *kh = page + L->k_offset + (uint64_t)g * L->head_stride;
        unsigned char *vh = page + L->v_offset + (uint64_t)g * L->head_stride;
        float *kmin = (float *)(page + L->kmin_offset) + (size_t)g * (size_t)hd;
        float *kmax = (float *)(page + L->kmax_offset) + (size_t)g * (size_t)hd;
        for (int32_t r = 0; r < w->n_rows; r++) {
            int64_t src = a->src_index[w->src_begin + r];
            size_t off = ((size_t)src * (size_t)kvh + (size_t)g) * (size_t)hd;
            uint64_t row = (uint64_t)(w->row0 + r) * (uint64_t)hd * (uint64_t)L->elem_size;
            store_row(cb, L->dtype, kh + row, a->k + off, hd, stored);
            store_row(cb, L->dtype, vh + row, a->v + off, hd, NULL);
            widen_bounds(kmin, kmax, stored, hd, w->row0 + r == 0);
        }
    }
}

pikv_status pikv_cpu_append(pikv_device *dev, const pikv_append_args *args)
{
    append_job job = {args, pikv_cpu_device_backend(dev)};
    pikv_cpu_pool_run(pikv_cpu_device_pool(dev), args->n_writes, append_task, &job);
    return PIKV_OK;
}

pikv_status pikv_cpu_page_copy(pikv_device *dev, const pikv_page_copy_args *args)
{
    const pikv_cpu_backend *cb = pikv_cpu_device_backend(dev);
    const pikv_page_layout *L = pikv_cpu_slot_layout(args->pool, args->src_slot);
    const unsigned char *src = pikv_cpu_page_ptr(args->pool, args->src_slot);
    unsigned char *dst = pikv_cpu_page_ptr(args->pool, args->dst_slot);
    if (pikv_dtype_quantized(L->dtype)) {
        if (args->dst_slot & PIKV_SLOT_QUANT) { /* within the quantized pool: whole page */
            memcpy(dst, src, (size_t)L->page_bytes);
            return PIKV_OK;
        }
        /* a prefix of a quantized page into an open page: dequantize its rows */
        const pikv_page_layout *D = args->pool->layout;
        const int32_t hd = D->head_dim;
        float row[MAX_STACK_DIM], stored[MAX_STACK_DIM];
        for (int32_t g = 0; g < D->n_kv_heads; g++) {
            unsigned char *kh = dst + D->k_offset + (uint64_t)g * D->head_stride;
            unsigned char *vh = dst + D->v_offset + (uint64_t)g * D->head_stride;
            float *kmin = (float *)(dst + D->kmin_offset) + (size_t)g * (size_t)hd;
            float *kmax = (float *)(dst + D->kmax_offset) + (size_t)g * (size_t)hd;
            for (int32_t r = 0; r < args->n_rows; r++) {
                const uint64_t at = (uint64_t)r * D->row_bytes;
                pikv_cpu_dequant_row(cb, L, src, g, r, true, row);
                clamp_f16_range(row, hd);
                store_row(cb, D->dtype, kh + at, row, hd, stored);
                widen_bounds(kmin, kmax, stored, hd, r == 0);
                pikv_cpu_dequant_row(cb, L, src, g, r, false, row);
                clamp_f16_range(row, hd);
                store_row(cb, D->dtype, vh + at, row, hd, NULL);
            }
        }
        return PIKV_OK;
    }
    const int32_t hd = L->head_dim;
    size_t rows_bytes = (size_t)args->n_rows * (size_t)hd * (size_t)L->elem_size;
    float row[MAX_STACK_DIM];
    for (int32_t g = 0; g < L->n_kv_heads; g++) {
        uint64_t h = (uint64_t)g * L->head_stride;
        if (src != dst) { /* src == dst: only recompute the bounds of the first n_rows */
            memcpy(dst + L->k_offset + h, src + L->k_offset + h, rows_bytes);
            memcpy(dst + L->v_offset + h, src + L->v_offset + h, rows_bytes);
        }
        float *kmin = (float *)(dst + L->kmin_offset) + (size_t)g * (size_t)hd;
        float *kmax = (float *)(dst + L->kmax_offset) + (size_t)g * (size_t)hd;
        /* A prefix of a page can have tighter bounds than the whole page. */
        for (int32_t r = 0; r < args->n_rows; r++) {
            load_row(cb, L->dtype, dst + L->k_offset + h + (uint64_t)r * (uint64_t)hd * (uint64_t)L->elem_size,
                     hd, row);
            widen_bounds(kmin, kmax, row, hd, r == 0);
        }
    }
    return PIKV_OK;
}
