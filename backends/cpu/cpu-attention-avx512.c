/* Decode attention page kernels for x86-64 CPUs with AVX-512 (F, BW, VL), F16C
 * and FMA, chosen at run time (pikv_cpu_attn_avx512_usable). One call handles
 * one page of one KV head for the G query heads sharing it:
 *   1. scores: 16 rows at a time, one accumulator per row, then a transposed
 *      reduction gives the 16 row sums in one vector (no horizontal sum per row);
 *   2. the page's online-softmax step, exp vectorized;
 *   3. the value sum, with the accumulators in registers for the whole page.
 * f16 rows are converted in registers (MHA: straight from the page; GQA: once
 * into a 16-row f32 block in L1 that every head of the group reuses). Quantized
 * pages are never dequantized into rows: the key scale is folded into q per
 * key group (q'_d = q_d * scale_d, constant sum_d q_d * zero_d), value rows add
 * (p * s_g) * v_int and the zero points once per page as p-weighted group
 * sums. INT4 works on nibbles in place: per 32 channels the low nibbles are the
 * even channels and the high nibbles the odd ones, so q and the accumulators
 * are kept in that "even/odd" order while int4 pages are read.
 * The kernels use explicit FMA: results match the portable path within float
 * tolerance, not bit for bit. */
#include "cpu-attention.h"

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include "cpu-attention-avx512.h"

#include <cpuid.h>
#include <string.h>

bool pikv_cpu_has_avx512(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
    const unsigned osxsave = 1u << 27, fma = 1u << 12, f16c = 1u << 29;
    if ((c & (osxsave | fma | f16c)) != (osxsave | fma | f16c)) return false;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    if ((lo & 0xe6u) != 0xe6u) return false; /* XMM, YMM, opmask, ZMM state saved by the OS */
    if (__get_cpuid_max(0, NULL) < 7) return false;
    __cpuid_count(7, 0, a, b, c, d);
    const unsigned f = 1u << 16, dq = 1u << 17, bw = 1u << 30, vl = 1u << 31;
    return (b & (f | dq | bw | vl)) == (f | dq | bw | vl);
}

/* Reorder n floats (a multiple of 32) in place between natural and even/odd order. */
T512 void pikv_cpu_attn_reorder(float *x, int32_t n, bool to_even_odd)
{
    for (int32_t c = 0; c < n; c += 32) {
        const __m512 a = _mm512_loadu_ps(x + c), b = _mm512_loadu_ps(x + c + 16);
        __m512 u, v;
        if (to_even_odd) to_eo(a, b, &u, &v);
        else from_eo(a, b, &u, &v);
        _mm512_storeu_ps(x + c, u);
        _mm512_storeu_ps(x + c + 16, v);
    }
}

/* ---- one page of one KV head --------------------------------------------------- */

/* Keys of one page of one KV head: the G heads' scores, turned into weights by
   the online-softmax step (t->scores, [G][page_size]). */
T512_INLINE void plain_keys(pikv_cpu_attn_list *t, const pikv_page_layout *L, const unsigned char *page, int32_t n,
                            float *page_lse, int kind, pikv_pf_stream *pf)
{
    const int32_t hd = L->head_dim, G = t->G;
    const size_t ps_stride = (size_t)hd + 2;
    const unsigned char *K = page + L->k_offset + (uint64_t)t->kv_head * L->head_stride;
    const size_t rb = (size_t)L->row_bytes;
    float *s = t->scores; /* [G][page_size] */
    const size_t ss = (size_t)L->page_size;
    const bool gqa = G > 1 && gqa_ok(G, hd, kind);
    if (gqa) {
#define SC(g) scores_gqa(t->qs, K, rb, n, hd, kind, g, s, ss, NULL, pf)
        GQA_DISPATCH(G, SC)
#undef SC
    }
    for (int32_t r0 = 0; r0 < n && !gqa; r0 += 16) {
        const int32_t nb = n - r0 < 16 ? n - r0 : 16;
        if (G == 1) {
            const __m512 v = dot_rows(t->qs, K + (size_t)r0 * rb, rb, nb, hd, kind, pf);
            _mm512_mask_storeu_ps(s + r0, (__mmask16)((1u << nb) - 1u), v);
        } else {
            rows_to_f32(K + (size_t)r0 * rb, rb, nb, hd, kind, t->block, pf);
            for (int32_t h = 0; h < G; h++) {
                const __m512 v = dot_rows(t->qs + (size_t)h * (size_t)hd, (const unsigned char *)t->block,
                                          (size_t)hd * 4, nb, hd, 1, NULL);
                _mm512_mask_storeu_ps(s + (size_t)h * ss + r0, (__mmask16)((1u << nb) - 1u), v);
            }
        }
    }
    for (int32_t h = 0; h < G; h++)
        softmax_step(s + (size_t)h * ss, n, t->part + (size_t)h * ps_stride, hd, page_lse ? page_lse + h : NULL);
}

/* Values of one page of one KV head, weighted by plain_keys' weights. */
T512_INLINE void plain_values(pikv_cpu_attn_list *t, const pikv_page_layout *L, const unsigned char *page, int32_t n,
                              int kind, pikv_pf_stream *pf)
{
    const int32_t hd = L->head_dim, G = t->G;
    const size_t ps_stride = (size_t)hd + 2;
    const unsigned char *V = page + L->v_offset + (uint64_t)t->kv_head * L->head_stride;
    const size_t rb = (size_t)L->row_bytes;
    const float *s = t->scores;
    const size_t ss = (size_t)L->page_size;
    if (G == 1) {
        accumulate_rows(t->part + 2, s, 1, hd, V, rb, n, hd, kind, pf);
        return;
    }
    if (gqa_ok(G, hd, kind)) {
#define VA(g) values_gqa(t->part, s, ss, 1, hd, V, rb, n, hd, kind, g, pf)
        GQA_DISPATCH(G, VA)
#undef VA
        return;
    }
    for (int32_t r0 = 0; r0 < n; r0 += 16) {
        const int32_t nb = n - r0 < 16 ? n - r0 : 16;
        rows_to_f32(V + (size_t)r0 * rb, rb, nb, hd, kind, t->block, pf);
        for (int32_t h = 0; h < G; h++)
            accumulate_rows(t->part + (size_t)h * ps_stride + 2, s + (size_t)h * ss + r0, 1, hd,
                            (const unsigned char *)t->block, (size_t)hd * 4, nb, hd, 1, NULL);
    }
}

T512_INLINE void page_plain(pikv_cpu_attn_list *t, const pikv_page_layout *L, const unsigned char *page, int32_t n,
                            float *page_lse, int kind, pikv_pf_stream *pf)
{
    plain_keys(t, L, page, n, page_lse, kind, pf);
    plain_values(t, L, page, n, kind, pf);
}

/* Quantized page (kind 2: int8, 3: int4). */
T512_INLINE void page_quant(pikv_cpu_attn_list *t, const pikv_page_layout *L, const unsigned char *page, int32_t n,
                            float *page_lse, int kind, pikv_pf_stream *pf)
{
    const int32_t hd = L->head_dim, G = t->G, gsz = L->group, vg = L->v_groups;
    const size_t ps_stride = (size_t)hd + 2;
    const int32_t g = t->kv_head;
    const unsigned char *K = page + L->k_offset + (uint64_t)g * L->head_stride;
    const unsigned char *V = page + L->v_offset + (uint64_t)g * L->head_stride;
    const size_t rb = (size_t)L->row_bytes;
    float *s = t->scores;
    const size_t ss = (size_t)L->page_size;
    const float *q = kind == 3 ? t->qeo : t->qs;
    float *qf = t->qfold; /* [G][hd]: q * key scale of the current key group */
    const bool gqa = G > 1 && gqa_ok(G, hd, kind);
    /* one head, one block of rows and one key group: the scores stay in a register */
    const bool one = G == 1 && n <= 16 && n <= gsz;
    __m512 sv = _mm512_setzero_ps();
    __m512 cz = _mm512_setzero_ps(); /* the last head's sum_d q_d * zero_d, by lanes */
    /* keys, by key group (tokens [tg * gsz, ..)) */
    for (int32_t t0 = 0, tg = 0; t0 < n; t0 += gsz, tg++) {
        const int32_t nt = n - t0 < gsz ? n - t0 : gsz;
        const size_t at = ((size_t)g * (size_t)L->k_groups + (size_t)tg) * (size_t)hd;
        const uint16_t *ksc = (const uint16_t *)(page + L->kscale_offset) + at;
        const uint16_t *kzr = (const uint16_t *)(page + L->kzero_offset) + at;
        for (int32_t h = 0; h < G; h++) {
            const float *qh = t->qs + (size_t)h * (size_t)hd, *qo = q + (size_t)h * (size_t)hd;
            float *qfh = qf + (size_t)h * (size_t)hd;
            __m512 cz1 = _mm512_setzero_ps(); /* two chains: this sits on the page's critical path */
            cz = _mm512_setzero_ps();
            for (int32_t c = 0; c < hd; c += 32) {
                const __m512 s0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(ksc + c)));
                const __m512 s1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(ksc + c + 16)));
                const __m512 z0 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kzr + c)));
                const __m512 z1 = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(kzr + c + 16)));
                cz = _mm512_fmadd_ps(_mm512_loadu_ps(qh + c), z0, cz);
                cz1 = _mm512_fmadd_ps(_mm512_loadu_ps(qh + c + 16), z1, cz1);
                __m512 a = s0, b = s1;
                if (kind == 3) to_eo(s0, s1, &a, &b);
                _mm512_storeu_ps(qfh + c, _mm512_mul_ps(_mm512_loadu_ps(qo + c), a));
                _mm512_storeu_ps(qfh + c + 16, _mm512_mul_ps(_mm512_loadu_ps(qo + c + 16), b));
            }
            cz = _mm512_add_ps(cz, cz1);
            if (G > 1) t->kconst[h] = _mm512_reduce_add_ps(cz); /* G == 1: cz goes into the row sums */
        }
        if (gqa) {
#define SC(gg) scores_gqa(qf, K + (size_t)t0 * rb, rb, nt, hd, kind, gg, s + t0, ss, t->kconst, pf)
            GQA_DISPATCH(G, SC)
#undef SC
            continue;
        }
        for (int32_t r0 = t0; r0 < t0 + nt; r0 += 16) {
            const int32_t nb = t0 + nt - r0 < 16 ? t0 + nt - r0 : 16;
            const __mmask16 m = (__mmask16)((1u << nb) - 1u);
            if (G == 1) {
                sv = dot_rows_init(cz, qf, K + (size_t)r0 * rb, rb, nb, hd, kind, pf);
                if (!one) _mm512_mask_storeu_ps(s + r0, m, sv);
            } else {
                rows_to_f32(K + (size_t)r0 * rb, rb, nb, hd, kind, t->block, pf);
                for (int32_t h = 0; h < G; h++) {
                    const __m512 v = dot_rows(qf + (size_t)h * (size_t)hd, (const unsigned char *)t->block,
                                              (size_t)hd * 4, nb, hd, 1, NULL);
                    _mm512_mask_storeu_ps(s + (size_t)h * ss + r0, m, _mm512_add_ps(v, _mm512_set1_ps(t->kconst[h])));
                }
            }
        }
    }
    float rescale = 1.0f; /* of the accumulators, where softmax_step16 leaves it to the value pass */
    if (one) sv = softmax_step16(sv, n, t->part, page_lse, &rescale);
    for (int32_t h = 0; h < G && !one; h++)
        softmax_step(s + (size_t)h * ss, n, t->part + (size_t)h * ps_stride, hd, page_lse ? page_lse + h : NULL);
    /* values: weights p_r * scale_{r,j}; zero points as sum_r p_r * zero_{r,j} per group */
    const uint16_t *vsc = (const uint16_t *)(page + L->vscale_offset) + (size_t)g * ss * (size_t)vg;
    const uint16_t *vzr = (const uint16_t *)(page + L->vzero_offset) + (size_t)g * ss * (size_t)vg;
    float *w = t->vweights;      /* [n][vg] */
    float *zs = t->vzsum;        /* [vg] */
    float *vsf = t->vscales;     /* [n][vg] value scales, then zero points, as f32 */
    float *vzf = t->vscales + (size_t)n * (size_t)vg;
    const int32_t nv = n * vg;
    /* vg divides 16 (hd 128, groups of 32: 4): a vector covers 16 / vg rows, and
       the scales and zero points are converted as they are used */
    const bool vec_w = 16 % vg == 0 && nv % 16 == 0;
    if (one && !vec_w) _mm512_mask_storeu_ps(s, (__mmask16)((1u << n) - 1u), sv);
    if (!vec_w) {
        int32_t i = 0;
        for (; i + 16 <= nv; i += 16) {
            _mm512_storeu_ps(vsf + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(vsc + i))));
            _mm512_storeu_ps(vzf + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(vzr + i))));
        }
        for (; i < nv; i++) {
            vsf[i] = _cvtsh_ss(vsc[i]);
            vzf[i] = _cvtsh_ss(vzr[i]);
        }
    }
    for (int32_t h = 0; h < G; h++) {
        const float *p = s + (size_t)h * ss;
        float *acc = t->part + (size_t)h * ps_stride + 2;
        if (gqa) { /* every head's weights first, then one pass over the rows */
            w = t->vweights + (size_t)h * (size_t)nv;
            zs = t->vzsum + (size_t)h * (size_t)vg;
        }
        if (vec_w) {
            __m512 zacc = _mm512_setzero_ps();
            /* w[r][j] = p[r] * scale[r][j]; zero points summed per lane, lane i being group i % vg */
            const int sh = vg == 1 ? 0 : vg == 2 ? 1 : vg == 4 ? 2 : vg == 8 ? 3 : 4;
            const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
            const __m512i lane_row = _mm512_srli_epi32(iota, (unsigned)sh);
            const __mmask16 pmask = (__mmask16)((1u << (16 >> sh)) - 1u);
            for (int32_t i = 0; i < nv; i += 16) {
                const __m512 pr = one ? _mm512_permutexvar_ps(_mm512_add_epi32(lane_row, _mm512_set1_epi32(i >> sh)), sv)
                                      : _mm512_permutexvar_ps(lane_row, _mm512_maskz_loadu_ps(pmask, p + (i >> sh)));
                const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(vsc + i)));
                const __m512 zr = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(vzr + i)));
                _mm512_storeu_ps(w + i, _mm512_mul_ps(pr, sc));
                zacc = _mm512_fmadd_ps(pr, zr, zacc);
            }
            /* fold lanes i and i + width until the lanes repeat with period vg (a power of 2) */
            for (int width = 8; width >= vg; width >>= 1) {
                const __m512i rot = _mm512_and_si512(_mm512_add_epi32(iota, _mm512_set1_epi32(width)), _mm512_set1_epi32(15));
                zacc = _mm512_add_ps(zacc, _mm512_permutexvar_ps(rot, zacc));
            }
            if (gqa) {
                _mm512_mask_storeu_ps(zs, (__mmask16)((1u << vg) - 1u), zacc);
                continue;
            }
            float zl[16]; /* whole: a masked store would not forward to the loads of zl */
            _mm512_storeu_ps(zl, zacc);
            /* the first block of rows also rescales and adds the zero points */
            for (int32_t r0 = 0; r0 < n; r0 += 16) {
                const int32_t nb = n - r0 < 16 ? n - r0 : 16;
                accumulate_rows_z(acc, w + (size_t)r0 * (size_t)vg, vg, gsz, V + (size_t)r0 * rb, rb, nb, hd, kind,
                                  _mm512_set1_ps(rescale), r0 ? NULL : zl, pf);
            }
        } else {
            for (int32_t j = 0; j < vg; j++) zs[j] = 0.0f;
            for (int32_t r = 0; r < n; r++) {
                const float pr = p[r];
                const float *sr = vsf + (size_t)r * (size_t)vg, *zr = vzf + (size_t)r * (size_t)vg;
                float *wr = w + (size_t)r * (size_t)vg;
                for (int32_t j = 0; j < vg; j++) {
                    wr[j] = pr * sr[j];
                    zs[j] += pr * zr[j];
                }
            }
            if (!gqa) accumulate_rows_z(acc, w, vg, gsz, V, rb, n, hd, kind, _mm512_set1_ps(rescale), zs, pf);
        }
    }
    if (!gqa) return;
#define VA(gg) values_gqa(t->part, t->vweights, (size_t)nv, vg, gsz, V, rb, n, hd, kind, gg, pf)
    GQA_DISPATCH(G, VA)
#undef VA
    for (int32_t h = 0; h < G; h++) {
        float *acc = t->part + (size_t)h * ps_stride + 2;
        for (int32_t j = 0; j < vg; j++) {
            const int32_t end = (j + 1) * gsz < hd ? (j + 1) * gsz : hd;
            const __m512 z = _mm512_set1_ps(t->vzsum[(size_t)h * (size_t)vg + (size_t)j]);
            for (int32_t d = j * gsz; d < end; d += 16) _mm512_storeu_ps(acc + d, _mm512_add_ps(_mm512_loadu_ps(acc + d), z));
        }
    }
}

/* Unit u of a task: (list entry, KV head). A unit's K rows and V rows are one
   block of the page (the layout keeps a head's K and V together), its scales and
   zero points (quantized pages) lie elsewhere in the page. */
typedef struct unit_walk {
    const pikv_cpu_attn_list *t;
    const int32_t *oe, *oh; /* address-ordered entries and their heads, or NULL */
    int32_t nkv, head0;
} unit_walk;

T512_INLINE int32_t unit_entry(const unit_walk *w, int64_t u)
{
    return w->oe ? w->oe[w->t->page_begin + u] : w->t->page_begin + (int32_t)(u / w->nkv);
}

T512_INLINE int32_t unit_head(const unit_walk *w, int64_t u)
{
    return w->oe ? w->oh[w->t->page_begin + u] : w->nkv > 1 ? (int32_t)(u % w->nkv) : w->head0;
}

/* The stream of unit u's K and V rows; with `burst` they are prefetched at once
   (the units before the first: nothing runs ahead of them). Its scales and zero
   points are prefetched at once either way (a few lines). */
T512_INLINE void unit_stream(const unit_walk *w, int64_t u, pikv_pf_stream *pf, bool burst)
{
    const pikv_attention_args *a = w->t->args;
    const int32_t j = unit_entry(w, u), head = unit_head(w, u);
    const unsigned char *page = pikv_cpu_page_ptr(a->pool, a->slots[j]);
    const pikv_page_layout *L = pikv_cpu_slot_layout(a->pool, a->slots[j]);
    const uint64_t rows = (uint64_t)(a->page_len[j] > 0 ? a->page_len[j] : 0) * L->row_bytes;
    /* K rows, the rest of the K block (unread in a short page), then the V rows */
    pf->base = page + L->k_offset + (uint64_t)head * L->head_stride;
    pf->read = pf->next = 0;
    pf->len = rows ? (size_t)(L->v_offset - L->k_offset + rows) : 0;
    if (burst) pf_finish(pf);
    if (pikv_dtype_quantized(L->dtype) && rows) {
        const uint64_t kb = (uint64_t)L->k_groups * (uint64_t)L->head_dim * 2;
        const uint64_t vb = (uint64_t)L->page_size * (uint64_t)L->v_groups * 2;
        const uint64_t at[4] = {L->kscale_offset + (uint64_t)head * kb, L->kzero_offset + (uint64_t)head * kb,
                                L->vscale_offset + (uint64_t)head * vb, L->vzero_offset + (uint64_t)head * vb};
        for (int i = 0; i < 4; i++)
            for (uint64_t o = 0; o < (i < 2 ? kb : vb); o += 64) _mm_prefetch((const char *)(page + at[i] + o), _MM_HINT_T0);
    }
}

/* bytes ahead the walk prefetches (in whole units: two f16 units at page 16, head_dim 128;
   measured faster than one and than four) */
enum { PREFETCH_BYTES = 16 << 10 };

/* The page list of one task, in (page, head) units: each page by its own layout
   (open f16/f32 pages and quantized pages may be mixed). With n_kv > 1 (every KV
   head reads the same pages, or a query's entries of all heads sorted by slot)
   each page is read for its heads in turn, so the reads walk through the page in
   address order; a unit's rows prefetch the unit PREFETCH_BYTES ahead as they are
   read (pikv_pf_stream). */
T512 void pikv_cpu_attn_list_avx512(pikv_cpu_attn_list *t)
{
    const pikv_attention_args *a = t->args;
    const int32_t G = t->G, nkv = t->n_kv;
    const int32_t hd = a->pool->layout->head_dim;
    const size_t head_floats = (size_t)G * ((size_t)hd + 2);
    const int32_t head0 = t->kv_head;
    bool eo = false; /* accumulators in even/odd order (int4 pages) */
    const unit_walk w = {t, t->ord_entry, t->ord_head, nkv, head0};
    /* prefetch distance in units, from the bytes a unit holds */
    const pikv_page_layout *LD = a->pool->quant ? a->pool->quant->layout : a->pool->layout;
    const uint64_t unit_bytes = LD->head_stride + 1;
    int64_t dist = (int64_t)(PREFETCH_BYTES / unit_bytes);
    dist = dist < 1 ? 1 : dist > 8 ? 8 : dist;
    const int64_t units = w.oe ? (int64_t)(t->page_end - t->page_begin) : (int64_t)(t->page_end - t->page_begin) * nkv;
    pikv_pf_stream ahead;
    for (int64_t u = 0; u < dist && u < units; u++) unit_stream(&w, u, &ahead, true);
    for (int64_t u = 0; u < units; u++) {
        pikv_pf_stream *pf = NULL;
        if (u + dist < units) {
            unit_stream(&w, u + dist, &ahead, false);
            pf = &ahead;
        }
        const int32_t p = unit_entry(&w, u), k = unit_head(&w, u);
        const int32_t n = a->page_len[p];
        if (n > 0) {
            const uint32_t slot = a->slots[p];
            const unsigned char *page = pikv_cpu_page_ptr(a->pool, slot);
            const pikv_page_layout *L = pikv_cpu_slot_layout(a->pool, slot);
            const bool want_eo = L->dtype == PIKV_DTYPE_INT4;
            if (want_eo != eo) {
                for (int32_t h = 0; h < nkv * G; h++)
                    pikv_cpu_attn_reorder(t->part0 + (size_t)h * ((size_t)hd + 2) + 2, hd, want_eo);
                eo = want_eo;
            }
            const int32_t g = nkv > 1 ? k : head0, kk = nkv > 1 ? k : 0;
            t->kv_head = g;
            t->part = t->part0 + (size_t)kk * head_floats;
            t->qs = t->qs0 + (size_t)kk * (size_t)G * (size_t)hd;
            t->qeo = t->qeo0 + (size_t)kk * (size_t)G * (size_t)hd;
            t->scores = t->scores0 + (size_t)kk * (size_t)G * (size_t)L->page_size;
            const int64_t entry = w.oe || nkv == 1 ? (int64_t)p : (int64_t)p + (t->list_begin[k] - t->list_begin[0]);
            float *pl = a->page_lse ? a->page_lse + (size_t)entry * (size_t)G : NULL;
            switch (L->dtype) {
            case PIKV_DTYPE_F16: page_plain(t, L, page, n, pl, 0, pf); break;
            case PIKV_DTYPE_F32: page_plain(t, L, page, n, pl, 1, pf); break;
            case PIKV_DTYPE_INT8: page_quant(t, L, page, n, pl, 2, pf); break;
            case PIKV_DTYPE_INT4: page_quant(t, L, page, n, pl, 3, pf); break;
            }
        }
        pf_finish(pf);
    }
    if (eo)
        for (int32_t h = 0; h < nkv * G; h++) pikv_cpu_attn_reorder(t->part0 + (size_t)h * ((size_t)hd + 2) + 2, hd, false);
}

#else
bool pikv_cpu_has_avx512(void) { return false; }
void pikv_cpu_attn_list_avx512(pikv_cpu_attn_list *t) { (void)t; }
void pikv_cpu_attn_reorder(float *x, int32_t n, bool to_even_odd) { (void)x, (void)n, (void)to_even_odd; }
#endif
