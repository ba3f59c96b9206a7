/* Quantized pages (INT8 / INT4), KIVI's layout: keys per channel over groups of
 * `group` tokens, values per token over groups of `group` channels, asymmetric.
 * A group with minimum lo and maximum hi (of the f16 values being quantized)
 * stores zero = lo and scale = (hi - lo) / qmax rounded UP to f16, so every
 * value maps into [0, qmax]; q = rint((x - zero) / scale) in f32 and the value
 * read back is q * scale + zero (f32, no contraction). The rounding error is at
 * most half a step (scale / 2). Every backend must use these exact operations so
 * pages are bit-compatible. */
#include "cpu-impl.h"
#include "../../runtime/f16.h"

#include <math.h>
#include <string.h>

static inline int32_t qmax_of(pikv_dtype t) { return t == PIKV_DTYPE_INT4 ? 15 : 255; }

/* f16 of a positive value, rounded up. */
static uint16_t f16_round_up(float x)
{
    uint16_t h = pikv_f32_to_f16(x);
    if (pikv_f16_to_f32(h) < x) h++; /* positive finite: the next f16 is larger */
    return h;
}

static inline void put_q(const pikv_page_layout *L, unsigned char *row, int32_t d, uint32_t q)
{
    if (L->dtype == PIKV_DTYPE_INT8) {
        row[d] = (unsigned char)q;
        return;
    }
    unsigned char *b = row + d / 2;
    *b = (d & 1) ? (unsigned char)((*b & 0x0f) | (q << 4)) : (unsigned char)((*b & 0xf0) | q);
}

static inline uint32_t quantize_value(float x, float scale, float zero, int32_t qmax)
{
    if (scale == 0.0f) return 0;
    float q = rintf((x - zero) / scale);
    q = q < 0.0f ? 0.0f : q > (float)qmax ? (float)qmax : q;
    return (uint32_t)q;
}

/* The library is built with -ffp-contract=off: no fused multiply-add here, so
   every backend computes the same bits. */
static inline float dequant(uint32_t q, float scale, float zero)
{
    return (float)q * scale + zero;
}

/* Allocates nothing (it runs inside an append's commit, where a host allocation
   failure could no longer be undone cleanly): keys are read element by element,
   value rows through a row buffer on the stack (head_dim <= 1024). */
pikv_status pikv_cpu_quantize(pikv_device *dev, pikv_quantize_args *a)
{
    enum { MAX_DIM = 1024 };
    const pikv_cpu_backend *cb = pikv_cpu_device_backend(dev);
    const pikv_pool_view *pool = a->pool;
    const pikv_page_layout *S = pool->layout, *Q = pool->quant->layout;
    const int32_t ps = S->page_size, kvh = S->n_kv_heads, hd = S->head_dim, G = Q->group;
    const int32_t qmax = qmax_of(Q->dtype);
    const unsigned char *src = pikv_cpu_page_ptr(pool, a->src_slot);
    unsigned char *dst = pikv_cpu_page_ptr(pool, a->dst_slot | PIKV_SLOT_QUANT);
    memset(dst, 0, (size_t)Q->page_bytes);
    /* Quest bounds: those of the f16 keys, computed before quantizing */
    memcpy(dst + Q->kmin_offset, src + S->kmin_offset, 2 * (size_t)kvh * (size_t)hd * sizeof(float));
    double kerr = 0, kss = 0, verr = 0, vss = 0, maxerr = 0;
    float row[MAX_DIM];
    for (int32_t g = 0; g < kvh; g++) {
        /* keys: group (tg, d) = tokens [tg*G, ..) of channel d */
        const uint16_t *ks = (const uint16_t *)(src + S->k_offset + (uint64_t)g * S->head_stride);
        unsigned char *kq = dst + Q->k_offset + (uint64_t)g * Q->head_stride;
        uint16_t *kscale = (uint16_t *)(dst + Q->kscale_offset), *kzero = (uint16_t *)(dst + Q->kzero_offset);
        for (int32_t tg = 0; tg < Q->k_groups; tg++)
            for (int32_t d = 0; d < hd; d++) {
                const int32_t t0 = tg * G, n = ps - t0 < G ? ps - t0 : G;
                float lo = INFINITY, hi = -INFINITY;
                for (int32_t j = 0; j < n; j++) {
                    const float v = pikv_f16_to_f32(ks[(size_t)(t0 + j) * (size_t)hd + (size_t)d]);
                    lo = v < lo ? v : lo;
                    hi = v > hi ? v : hi;
                }
                const size_t at = ((size_t)g * (size_t)Q->k_groups + (size_t)tg) * (size_t)hd + (size_t)d;
                kzero[at] = pikv_f32_to_f16(lo); /* lo is an f16 value: exact */
                kscale[at] = hi > lo ? f16_round_up((hi - lo) / (float)qmax) : 0;
                const float scale = pikv_f16_to_f32(kscale[at]), zero = pikv_f16_to_f32(kzero[at]);
                for (int32_t j = 0; j < n; j++) {
                    const float v = pikv_f16_to_f32(ks[(size_t)(t0 + j) * (size_t)hd + (size_t)d]);
                    const uint32_t q = quantize_value(v, scale, zero, qmax);
                    put_q(Q, kq + (uint64_t)(t0 + j) * Q->row_bytes, d, q);
                    const double e = (double)dequant(q, scale, zero) - (double)v;
                    kerr += e * e;
                    kss += (double)v * v;
                    maxerr = fabs(e) > maxerr ? fabs(e) : maxerr;
                }
            }
        /* values: group (t, vg) = channels [vg*G, ..) of token t */
        const uint16_t *vs = (const uint16_t *)(src + S->v_offset + (uint64_t)g * S->head_stride);
        unsigned char *vq = dst + Q->v_offset + (uint64_t)g * Q->head_stride;
        uint16_t *vscale = (uint16_t *)(dst + Q->vscale_offset), *vzero = (uint16_t *)(dst + Q->vzero_offset);
        for (int32_t t = 0; t < ps; t++) {
            cb->f16_to_f32(vs + (size_t)t * (size_t)hd, row, hd);
            for (int32_t vg = 0; vg < Q->v_groups; vg++) {
                const int32_t d0 = vg * G, n = hd - d0 < G ? hd - d0 : G;
                float lo = INFINITY, hi = -INFINITY;
                for (int32_t j = 0; j < n; j++) {
                    lo = row[d0 + j] < lo ? row[d0 + j] : lo;
                    hi = row[d0 + j] > hi ? row[d0 + j] : hi;
                }
                const size_t at = ((size_t)g * (size_t)ps + (size_t)t) * (size_t)Q->v_groups + (size_t)vg;
                vzero[at] = pikv_f32_to_f16(lo);
                vscale[at] = hi > lo ? f16_round_up((hi - lo) / (float)qmax) : 0;
                const float scale = pikv_f16_to_f32(vscale[at]), zero = pikv_f16_to_f32(vzero[at]);
                for (int32_t j = 0; j < n; j++) {
                    const float v = row[d0 + j];
                    const uint32_t q = quantize_value(v, scale, zero, qmax);
                    put_q(Q, vq + (uint64_t)t * Q->row_bytes, d0 + j, q);
                    const double e = (double)dequant(q, scale, zero) - (double)v;
                    verr += e * e;
                    vss += (double)v * v;
                    maxerr = fabs(e) > maxerr ? fabs(e) : maxerr;
                }
            }
        }
    }
    a->err[0] += kerr;
    a->err[1] += kss;
    a->err[2] += verr;
    a->err[3] += vss;
    a->err[4] = maxerr > a->err[4] ? maxerr : a->err[4];
    return PIKV_OK;
}

/* Unpack row t's quantized values of one KV head to floats. */
static void unpack_row(const pikv_page_layout *L, const unsigned char *row, float *out)
{
    const int32_t hd = L->head_dim;
    if (L->dtype == PIKV_DTYPE_INT8) {
        for (int32_t d = 0; d < hd; d++) out[d] = (float)row[d];
        return;
    }
    const int32_t pairs = hd / 2;
    for (int32_t j = 0; j < pairs; j++) {
        const uint32_t b = row[j];
        out[2 * j] = (float)(b & 0x0fu);
        out[2 * j + 1] = (float)(b >> 4);
    }
    if (hd & 1) out[hd - 1] = (float)(row[pairs] & 0x0fu);
}

void pikv_cpu_key_group_params(const pikv_cpu_backend *cb, const pikv_page_layout *L, const unsigned char *page,
                               int32_t g, int32_t tg, float *scale, float *zero)
{
    const size_t at = ((size_t)g * (size_t)L->k_groups + (size_t)tg) * (size_t)L->head_dim;
    cb->f16_to_f32((const uint16_t *)(page + L->kscale_offset) + at, scale, L->head_dim);
    cb->f16_to_f32((const uint16_t *)(page + L->kzero_offset) + at, zero, L->head_dim);
}

void pikv_cpu_dequant_key_row(const pikv_page_layout *L, const unsigned char *page, int32_t g, int32_t t,
                              const float *scale, const float *zero, float *out)
{
    const unsigned char *row = page + L->k_offset + (uint64_t)g * L->head_stride + (uint64_t)t * L->row_bytes;
    unpack_row(L, row, out); /* out[d] = (float)q exactly, so this is dequant(q, ...) bit for bit */
    for (int32_t d = 0; d < L->head_dim; d++) out[d] = out[d] * scale[d] + zero[d];
}

void pikv_cpu_dequant_value_row(const pikv_cpu_backend *cb, const pikv_page_layout *L, const unsigned char *page,
                                int32_t g, int32_t t, float *group_scratch, float *out)
{
    const int32_t hd = L->head_dim, vg = L->v_groups, G = L->group;
    const unsigned char *row = page + L->v_offset + (uint64_t)g * L->head_stride + (uint64_t)t * L->row_bytes;
    const size_t at = ((size_t)g * (size_t)L->page_size + (size_t)t) * (size_t)vg;
    float *scale = group_scratch, *zero = group_scratch + vg;
    cb->f16_to_f32((const uint16_t *)(page + L->vscale_offset) + at, scale, vg);
    cb->f16_to_f32((const uint16_t *)(page + L->vzero_offset) + at, zero, vg);
    unpack_row(L, row, out);
    for (int32_t j = 0; j < vg; j++) {
        const float sj = scale[j], zj = zero[j];
        const int32_t end = (j + 1) * G < hd ? (j + 1) * G : hd;
        for (int32_t d = j * G; d < end; d++) out[d] = out[d] * sj + zj;
    }
}

void pikv_cpu_dequant_row(const pikv_cpu_backend *cb, const pikv_page_layout *L, const unsigned char *page,
                          int32_t g, int32_t t, bool is_key, float *out)
{
    enum { MAX_DIM = 1024 };
    float a[2 * MAX_DIM], b[MAX_DIM]; /* values use a[] for 2 x v_groups scales and zero points */
    if (is_key) {
        pikv_cpu_key_group_params(cb, L, page, g, t / L->group, a, b);
        pikv_cpu_dequant_key_row(L, page, g, t, a, b, out);
    } else {
        pikv_cpu_dequant_value_row(cb, L, page, g, t, a, out);
    }
}
