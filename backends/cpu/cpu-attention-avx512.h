/* Inline AVX-512 building blocks of the CPU attention kernels
 * (cpu-attention-avx512.c includes this once): vector exp, the 16-row
 * transposed reduction, row loads per storage kind (0 f16, 1 f32, 2 int8 codes,
 * 3 int4 codes in even/odd order), the scores of 16 rows, the per-page online
 * softmax step, the value sums, and their GQA forms. Only for x86-64 GCC/clang
 * builds; every function carries its own target attribute. */
#ifndef PIKV_CPU_ATTENTION_AVX512_H
#define PIKV_CPU_ATTENTION_AVX512_H

#include "cpu-attention.h"

#include <immintrin.h>
#include <math.h>

#define T512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))
#define T512_INLINE static inline __attribute__((always_inline, target("avx512f,avx512bw,avx512vl,avx512dq,f16c,fma")))
/* ---- helpers --------------------------------------------------------------- */

/* exp(x) for x up to 88 (scores minus their maximum, or minus a reference at most
   REF_SLACK under it): Cephes' polynomial on r = x - n ln2, evaluated in Estrin's
   form (half the dependency chain of Horner's: it sits on a page's critical path),
   then 2^n by scalef, which flushes very negative x to 0. */
T512_INLINE __m512 exp512(__m512 x)
{
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    const __m512 r2 = _mm512_mul_ps(r, r);
    const __m512 a = _mm512_fmadd_ps(_mm512_set1_ps(1.9875691500e-4f), r, _mm512_set1_ps(1.3981999507e-3f));
    const __m512 b = _mm512_fmadd_ps(_mm512_set1_ps(8.3334519073e-3f), r, _mm512_set1_ps(4.1665795894e-2f));
    const __m512 c = _mm512_fmadd_ps(_mm512_set1_ps(1.6666665459e-1f), r, _mm512_set1_ps(5.0000001201e-1f));
    __m512 p = _mm512_fmadd_ps(a, _mm512_mul_ps(r2, r2), _mm512_fmadd_ps(b, r2, c));
    p = _mm512_fmadd_ps(p, r2, r);
    p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* The 16 horizontal sums of a[0..15] as one vector (lane r = sum of a[r]). */
T512_INLINE __m512 hsum16(__m512 a[16])
{
    __m512 c[8], d[4], e[2];
    for (int i = 0; i < 8; i++)
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[i], a[i + 8], 0x44), _mm512_shuffle_f32x4(a[i], a[i + 8], 0xee));
    for (int i = 0; i < 4; i++)
        d[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[i], c[i + 4], 0x88), _mm512_shuffle_f32x4(c[i], c[i + 4], 0xdd));
    for (int i = 0; i < 2; i++)
        e[i] = _mm512_add_ps(_mm512_unpacklo_ps(d[i], d[i + 2]), _mm512_unpackhi_ps(d[i], d[i + 2]));
    const __m512 g = _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x44), _mm512_shuffle_ps(e[0], e[1], 0xee));
    const __m512i idx = _mm512_setr_epi32(0, 2, 1, 3, 8, 10, 9, 11, 4, 6, 5, 7, 12, 14, 13, 15);
    return _mm512_permutexvar_ps(idx, g);
}

/* ---- prefetch spread over a kernel's loops ------------------------------------
   While one (page, head) unit is read, the rows of a unit a few ahead are
   prefetched as the loops go: each loop step prefetches as many bytes of that
   unit as it reads of its own, so the prefetches leave at the rate of the loads.
   A burst instead (the 64-128 lines of a 4-8 KiB block at once) fills the core's
   miss buffers and the loop stalls behind it (docs/performance.md, "What changed
   since run C", for the bench's figures). Steps pass pf NULL when nothing is ahead. */
typedef struct pikv_pf_stream {
    const unsigned char *base;
    size_t read;     /* bytes the loops have read since the stream began */
    size_t next;     /* offset of the next line to prefetch */
    size_t len;      /* bytes to prefetch */
} pikv_pf_stream;

T512_INLINE void pf_advance(pikv_pf_stream *pf, size_t bytes)
{
    if (!pf) return;
    pf->read += bytes;
    const size_t stop = pf->read < pf->len ? pf->read : pf->len;
    for (; pf->next < stop; pf->next += 64) _mm_prefetch((const char *)(pf->base + pf->next), _MM_HINT_T0);
}

/* the lines the loops did not reach (this unit was shorter than the one ahead) */
T512_INLINE void pf_finish(pikv_pf_stream *pf)
{
    if (!pf) return;
    for (; pf->next < pf->len; pf->next += 64) _mm_prefetch((const char *)(pf->base + pf->next), _MM_HINT_T0);
}

/* 16 channels of a row, as f32: f16 (kind 0), f32 (1), int8 codes (2). */
T512_INLINE __m512 load16(const unsigned char *row, int32_t c, int kind)
{
    if (kind == 0) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + 2 * (size_t)c)));
    if (kind == 1) return _mm512_loadu_ps(row + 4 * (size_t)c);
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + c))));
}

/* INT4: 32 channels from 16 bytes, as (even, odd) vectors of the nibble codes. */
T512_INLINE void load32_int4(const unsigned char *row, int32_t c, __m512 *even, __m512 *odd)
{
    /* a table lookup (vpermps reads the low 4 bits of each index) is the mask and
       the conversion in one instruction */
    const __m512 tab = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + c / 2)));
    *even = _mm512_permutexvar_ps(b, tab);
    *odd = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), tab);
}

/* natural <-> even/odd order of 32 channels */
T512_INLINE void to_eo(__m512 lo, __m512 hi, __m512 *even, __m512 *odd)
{
    const __m512i ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    *even = _mm512_permutex2var_ps(lo, ie, hi);
    *odd = _mm512_permutex2var_ps(lo, io, hi);
}

T512_INLINE void from_eo(__m512 even, __m512 odd, __m512 *lo, __m512 *hi)
{
    const __m512i il = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i ih = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    *lo = _mm512_permutex2var_ps(even, il, odd);
    *hi = _mm512_permutex2var_ps(even, ih, odd);
}

/* Scores of rows [r0, r0+nb) (nb <= 16) for one head: lane r = q . row(r0 + r) plus
   the sum of init's lanes (a constant term that needs no reduction of its own). Rows
   are `kind` codes at row_bytes apart, or f32 (kind 1) in a block. hd % 16 == 0;
   int4 (kind 3) reads q in even/odd order. */
T512_INLINE __m512 dot_rows_init(__m512 init, const float *q, const unsigned char *rows, size_t row_bytes,
                                 int32_t nb, int32_t hd, int kind, pikv_pf_stream *pf)
{
    __m512 acc[16];
    for (int r = 0; r < 16; r++) acc[r] = init;
    if (nb == 16) {
        /* bytes one step over 16 rows reads: 16 (f16, f32, int8) or 32 (int4) channels of each */
        const size_t step_bytes = 16 * row_bytes * (size_t)(kind == 3 ? 32 : 16) / (size_t)hd;
        for (int32_t c = 0; c < hd; c += (kind == 3 ? 32 : 16)) {
            pf_advance(pf, step_bytes);
            if (kind == 3) {
                const __m512 qe = _mm512_loadu_ps(q + c), qo = _mm512_loadu_ps(q + c + 16);
                for (int r = 0; r < 16; r++) {
                    __m512 e, o;
                    load32_int4(rows + (size_t)r * row_bytes, c, &e, &o);
                    acc[r] = _mm512_fmadd_ps(qe, e, acc[r]);
                    acc[r] = _mm512_fmadd_ps(qo, o, acc[r]);
                }
            } else {
                const __m512 qv = _mm512_loadu_ps(q + c);
                for (int r = 0; r < 16; r++)
                    acc[r] = _mm512_fmadd_ps(qv, load16(rows + (size_t)r * row_bytes, c, kind), acc[r]);
            }
        }
    } else {
        for (int32_t r = 0; r < nb; r++) {
            const unsigned char *row = rows + (size_t)r * row_bytes;
            pf_advance(pf, row_bytes);
            __m512 s = init;
            for (int32_t c = 0; c < hd; c += (kind == 3 ? 32 : 16)) {
                if (kind == 3) {
                    __m512 e, o;
                    load32_int4(row, c, &e, &o);
                    s = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), e, s);
                    s = _mm512_fmadd_ps(_mm512_loadu_ps(q + c + 16), o, s);
                } else {
                    s = _mm512_fmadd_ps(_mm512_loadu_ps(q + c), load16(row, c, kind), s);
                }
            }
            acc[r] = s;
        }
    }
    return hsum16(acc);
}

T512_INLINE __m512 dot_rows(const float *q, const unsigned char *rows, size_t row_bytes, int32_t nb, int32_t hd,
                            int kind, pikv_pf_stream *pf)
{
    return dot_rows_init(_mm512_setzero_ps(), q, rows, row_bytes, nb, hd, kind, pf);
}

/* Rows [r0, r0+nb) of `kind` codes as f32 into blk[nb][hd] (int4: even/odd order). */
T512_INLINE void rows_to_f32(const unsigned char *rows, size_t row_bytes, int32_t nb, int32_t hd, int kind,
                             float *blk, pikv_pf_stream *pf)
{
    for (int32_t r = 0; r < nb; r++) {
        const unsigned char *row = rows + (size_t)r * row_bytes;
        pf_advance(pf, row_bytes);
        float *o = blk + (size_t)r * (size_t)hd;
        if (kind == 3) {
            for (int32_t c = 0; c < hd; c += 32) {
                __m512 e, od;
                load32_int4(row, c, &e, &od);
                _mm512_storeu_ps(o + c, e);
                _mm512_storeu_ps(o + c + 16, od);
            }
        } else {
            for (int32_t c = 0; c < hd; c += 16) _mm512_storeu_ps(o + c, load16(row, c, kind));
        }
    }
}

/* ---- the per-page online softmax -------------------------------------------- */

/* Head h's scores s[0..n) of a page become its weights against the running
   maximum; the running state (m, l, acc) is rescaled. page_lse: the page's
   log mass. */
T512_INLINE void softmax_step(float *s, int32_t n, float *ph, int32_t hd, float *page_lse)
{
    if (!page_lse && n <= 16) {
        /* one page of up to 16 rows and no page mass wanted: the weights are taken
           against the new running maximum directly (one vector exp, no scalar exp
           unless the maximum grows) */
        const __mmask16 k = (__mmask16)((1u << n) - 1u);
        const __m512 x = _mm512_maskz_loadu_ps(k, s);
        const float page_max = _mm512_mask_reduce_max_ps(k, x);
        const float mx = page_max > ph[0] ? page_max : ph[0];
        if (ph[0] < mx) {
            const float rescale = ph[0] == -INFINITY ? 0.0f : expf(ph[0] - mx);
            const __m512 f = _mm512_set1_ps(rescale);
            float *acc = ph + 2;
            ph[1] *= rescale;
            for (int32_t d = 0; d < hd; d += 16) _mm512_storeu_ps(acc + d, _mm512_mul_ps(_mm512_loadu_ps(acc + d), f));
            ph[0] = mx;
        }
        const __m512 e = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(x, _mm512_set1_ps(mx))));
        _mm512_mask_storeu_ps(s, k, e);
        ph[1] += _mm512_reduce_add_ps(e);
        return;
    }
    float page_max = -INFINITY;
    for (int32_t r = 0; r < n; r++) page_max = s[r] > page_max ? s[r] : page_max;
    const float mx = page_max > ph[0] ? page_max : ph[0];
    /* one of the two factors is exp(0) = 1; the other in the same vector call as the page's */
    float rescale = 1.0f, to_running = 1.0f;
    if (ph[0] == -INFINITY) rescale = 0.0f;
    else if (ph[0] < mx) rescale = expf(ph[0] - mx);
    if (page_max < mx) to_running = expf(page_max - mx);
    const __m512 pm = _mm512_set1_ps(page_max);
    __m512 sum = _mm512_setzero_ps();
    int32_t r = 0;
    for (; r + 16 <= n; r += 16) {
        const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + r), pm));
        _mm512_storeu_ps(s + r, e);
        sum = _mm512_add_ps(sum, e);
    }
    if (r < n) {
        const __mmask16 k = (__mmask16)((1u << (n - r)) - 1u);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + r), pm));
        _mm512_mask_storeu_ps(s + r, k, e);
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(k, e));
    }
    const float page_sum = _mm512_reduce_add_ps(sum);
    if (page_lse) *page_lse = page_max + logf(page_sum);
    if (to_running != 1.0f) {
        const __m512 t = _mm512_set1_ps(to_running);
        for (r = 0; r + 16 <= n; r += 16) _mm512_storeu_ps(s + r, _mm512_mul_ps(_mm512_loadu_ps(s + r), t));
        for (; r < n; r++) s[r] *= to_running;
    }
    ph[0] = mx;
    ph[1] = ph[1] * rescale + page_sum * to_running;
    if (rescale != 1.0f) {
        const __m512 f = _mm512_set1_ps(rescale);
        float *acc = ph + 2;
        for (int32_t d = 0; d < hd; d += 16) _mm512_storeu_ps(acc + d, _mm512_mul_ps(_mm512_loadu_ps(acc + d), f));
    }
}

/* softmax_step for one head's scores held in a vector (lanes [0, n), n <= 16):
   returns the weights exp(s - m) against the new reference m of the running state
   (ph[0]); the accumulators' rescale is left to the caller (acc_rescale). The
   reference only has to keep the weights in range, so a page whose scores stay
   under the running one + REF_SLACK keeps it: no horizontal max and no rescale on
   the page's dependency chain from the scores to the value pass (weights up to
   e^REF_SLACK are harmless in f32). Otherwise m = the maximum, as softmax_step. */
enum { REF_SLACK = 16 };

T512_INLINE __m512 softmax_step16(__m512 sv, int32_t n, float *ph, float *page_lse, float *acc_rescale)
{
    const __mmask16 k = (__mmask16)((1u << n) - 1u);
    if (page_lse) {
        const float page_max = _mm512_mask_reduce_max_ps(k, sv);
        const __m512 ep = exp512(_mm512_sub_ps(sv, _mm512_set1_ps(page_max)));
        *page_lse = page_max + logf(_mm512_reduce_add_ps(_mm512_maskz_mov_ps(k, ep)));
    }
    float m = ph[0], rescale = 1.0f;
    if (m == -INFINITY || _mm512_mask_cmp_ps_mask(k, sv, _mm512_set1_ps(m + (float)REF_SLACK), _CMP_GT_OQ)) {
        const float page_max = _mm512_mask_reduce_max_ps(k, sv);
        if (page_max > m) {
            rescale = m == -INFINITY ? 0.0f : _mm512_cvtss_f32(exp512(_mm512_set1_ps(m - page_max)));
            m = page_max;
        }
    }
    const __m512 e = _mm512_maskz_mov_ps(k, exp512(_mm512_sub_ps(sv, _mm512_set1_ps(m))));
    ph[0] = m;
    ph[1] = ph[1] * rescale + _mm512_reduce_add_ps(e);
    *acc_rescale = rescale;
    return e;
}

/* A vector of accumulators, which with zs starts from 0 and ends as acc * f + the
   sums + zs[g] (the rescale and the zero points wait off the chain of the FMAs);
   without, plain acc += the sums. */
T512_INLINE __m512 acc_start(const float *acc, const float *zs)
{
    return zs ? _mm512_setzero_ps() : _mm512_loadu_ps(acc);
}

T512_INLINE void acc_end(float *acc, __m512 a, __m512 f, const float *zs, int32_t g)
{
    _mm512_storeu_ps(acc, zs ? _mm512_fmadd_ps(_mm512_loadu_ps(acc), f, _mm512_add_ps(a, _mm512_set1_ps(zs[g]))) : a);
}

/* 128 channels at acc (8 accumulators in registers) += sum_r w[r] * row_r[d0 ..],
   w[r * wstride + gi] being the weight of row r for the channels' group gi
   (one group for all 128 when gsize % 128 == 0, else groups of 32). With zs, acc
   becomes acc * f + the sums + zs[gi] (the running state's rescale and the page's
   zero-point term, in the same pass). */
T512_INLINE void accumulate128(float *acc, const float *w, int32_t wstride, int32_t gsize, int32_t d0,
                               const unsigned char *rows, size_t row_bytes, int32_t n, int32_t hd, int kind, __m512 f,
                               const float *zs, pikv_pf_stream *pf)
{
    const size_t step_bytes = 128 * row_bytes / (size_t)hd; /* 128 channels of a row */
    const int32_t g0 = d0 / gsize, g1 = (d0 + 32) / gsize, g2 = (d0 + 64) / gsize, g3 = (d0 + 96) / gsize;
    __m512 a0 = acc_start(acc, zs), a1 = acc_start(acc + 16, zs), a2 = acc_start(acc + 32, zs),
           a3 = acc_start(acc + 48, zs), a4 = acc_start(acc + 64, zs), a5 = acc_start(acc + 80, zs),
           a6 = acc_start(acc + 96, zs), a7 = acc_start(acc + 112, zs);
    if (gsize % 128 == 0) {
        for (int32_t r = 0; r < n; r++) {
            const __m512 p = _mm512_set1_ps(w[(size_t)r * (size_t)wstride + (size_t)g0]);
            const unsigned char *row = rows + (size_t)r * row_bytes;
            pf_advance(pf, step_bytes);
            if (kind == 3) {
                __m512 e, o;
                load32_int4(row, d0, &e, &o);
                a0 = _mm512_fmadd_ps(p, e, a0), a1 = _mm512_fmadd_ps(p, o, a1);
                load32_int4(row, d0 + 32, &e, &o);
                a2 = _mm512_fmadd_ps(p, e, a2), a3 = _mm512_fmadd_ps(p, o, a3);
                load32_int4(row, d0 + 64, &e, &o);
                a4 = _mm512_fmadd_ps(p, e, a4), a5 = _mm512_fmadd_ps(p, o, a5);
                load32_int4(row, d0 + 96, &e, &o);
                a6 = _mm512_fmadd_ps(p, e, a6), a7 = _mm512_fmadd_ps(p, o, a7);
            } else {
                a0 = _mm512_fmadd_ps(p, load16(row, d0, kind), a0);
                a1 = _mm512_fmadd_ps(p, load16(row, d0 + 16, kind), a1);
                a2 = _mm512_fmadd_ps(p, load16(row, d0 + 32, kind), a2);
                a3 = _mm512_fmadd_ps(p, load16(row, d0 + 48, kind), a3);
                a4 = _mm512_fmadd_ps(p, load16(row, d0 + 64, kind), a4);
                a5 = _mm512_fmadd_ps(p, load16(row, d0 + 80, kind), a5);
                a6 = _mm512_fmadd_ps(p, load16(row, d0 + 96, kind), a6);
                a7 = _mm512_fmadd_ps(p, load16(row, d0 + 112, kind), a7);
            }
        }
    } else {
        for (int32_t r = 0; r < n; r++) {
            const float *wr = w + (size_t)r * (size_t)wstride;
            const __m512 p0 = _mm512_set1_ps(wr[g0]), p1 = _mm512_set1_ps(wr[g1]);
            const __m512 p2 = _mm512_set1_ps(wr[g2]), p3 = _mm512_set1_ps(wr[g3]);
            const unsigned char *row = rows + (size_t)r * row_bytes;
            pf_advance(pf, step_bytes);
            if (kind == 3) {
                __m512 e, o;
                load32_int4(row, d0, &e, &o);
                a0 = _mm512_fmadd_ps(p0, e, a0), a1 = _mm512_fmadd_ps(p0, o, a1);
                load32_int4(row, d0 + 32, &e, &o);
                a2 = _mm512_fmadd_ps(p1, e, a2), a3 = _mm512_fmadd_ps(p1, o, a3);
                load32_int4(row, d0 + 64, &e, &o);
                a4 = _mm512_fmadd_ps(p2, e, a4), a5 = _mm512_fmadd_ps(p2, o, a5);
                load32_int4(row, d0 + 96, &e, &o);
                a6 = _mm512_fmadd_ps(p3, e, a6), a7 = _mm512_fmadd_ps(p3, o, a7);
            } else {
                a0 = _mm512_fmadd_ps(p0, load16(row, d0, kind), a0);
                a1 = _mm512_fmadd_ps(p0, load16(row, d0 + 16, kind), a1);
                a2 = _mm512_fmadd_ps(p1, load16(row, d0 + 32, kind), a2);
                a3 = _mm512_fmadd_ps(p1, load16(row, d0 + 48, kind), a3);
                a4 = _mm512_fmadd_ps(p2, load16(row, d0 + 64, kind), a4);
                a5 = _mm512_fmadd_ps(p2, load16(row, d0 + 80, kind), a5);
                a6 = _mm512_fmadd_ps(p3, load16(row, d0 + 96, kind), a6);
                a7 = _mm512_fmadd_ps(p3, load16(row, d0 + 112, kind), a7);
            }
        }
    }
    acc_end(acc, a0, f, zs, g0), acc_end(acc + 16, a1, f, zs, g0), acc_end(acc + 32, a2, f, zs, g1);
    acc_end(acc + 48, a3, f, zs, g1), acc_end(acc + 64, a4, f, zs, g2), acc_end(acc + 80, a5, f, zs, g2);
    acc_end(acc + 96, a6, f, zs, g3), acc_end(acc + 112, a7, f, zs, g3);
}

/* acc[0..hd) += sum_r w[r] * row_r for n rows of `kind` codes (or an f32 block),
   with per-row-group weights for quantized values: w[r * wstride + j] for the
   channel group j of `gsize` channels (gsize = hd, wstride = 1 for plain rows).
   Blocks of 128 channels keep their accumulators in registers; the rest (head_dim
   not a multiple of 128, or groups of other sizes) goes 16 channels at a time.
   With zs, acc becomes acc * f + the sums + zs[j] (see acc_start). */
T512_INLINE void accumulate_rows_z(float *acc, const float *w, int32_t wstride, int32_t gsize,
                                   const unsigned char *rows, size_t row_bytes, int32_t n, int32_t hd, int kind,
                                   __m512 f, const float *zs, pikv_pf_stream *pf)
{
    int32_t d0 = 0;
    if (gsize % 32 == 0)
        for (; d0 + 128 <= hd; d0 += 128)
            accumulate128(acc + d0, w, wstride, gsize, d0, rows, row_bytes, n, hd, kind, f, zs, pf);
    const size_t step_bytes = (size_t)(kind == 3 ? 32 : 16) * row_bytes / (size_t)hd;
    for (; d0 < hd; d0 += (kind == 3 ? 32 : 16)) {
        const int32_t g0 = d0 / gsize;
        __m512 a0 = acc_start(acc + d0, zs), a1 = kind == 3 ? acc_start(acc + d0 + 16, zs) : a0;
        for (int32_t r = 0; r < n; r++) {
            const __m512 p = _mm512_set1_ps(w[(size_t)r * (size_t)wstride + (size_t)g0]);
            const unsigned char *row = rows + (size_t)r * row_bytes;
            pf_advance(pf, step_bytes);
            if (kind == 3) {
                __m512 e, o;
                load32_int4(row, d0, &e, &o);
                a0 = _mm512_fmadd_ps(p, e, a0), a1 = _mm512_fmadd_ps(p, o, a1);
            } else {
                a0 = _mm512_fmadd_ps(p, load16(row, d0, kind), a0);
            }
        }
        acc_end(acc + d0, a0, f, zs, g0);
        if (kind == 3) acc_end(acc + d0 + 16, a1, f, zs, g0);
    }
}

T512_INLINE void accumulate_rows(float *acc, const float *w, int32_t wstride, int32_t gsize,
                                 const unsigned char *rows, size_t row_bytes, int32_t n, int32_t hd, int kind,
                                 pikv_pf_stream *pf)
{
    accumulate_rows_z(acc, w, wstride, gsize, rows, row_bytes, n, hd, kind, _mm512_setzero_ps(), NULL, pf);
}

/* ---- GQA: G query heads on the same rows, no f32 copy of the rows ----------------
   Scores: 16 / G rows x G heads = 16 accumulators, reduced together by hsum16, so
   each row is converted once for all heads. Values: 16 / G vectors of channels per
   pass, G heads x that many accumulators, each row converted once per pass.
   G is a compile-time constant (2, 4, 8 or 16) so the accumulators stay in registers.
   head_dim % 128 == 0. */

/* 128 channels of a row from d0 as 8 vectors (int4: even/odd pairs) */
T512_INLINE void row128(const unsigned char *row, int32_t d0, int kind, __m512 k[8])
{
    if (kind == 3) {
        for (int c = 0; c < 8; c += 2) load32_int4(row, d0 + 16 * c, &k[c], &k[c + 1]);
    } else {
        for (int c = 0; c < 8; c++) k[c] = load16(row, d0 + 16 * c, kind);
    }
}

/* s[h * ss + r] = q_h . row_r (+ add[h]) for rows [0, n) */
T512_INLINE void scores_gqa(const float *q, const unsigned char *rows, size_t rb, int32_t n, int32_t hd, int kind,
                            const int G, float *s, size_t ss, const float *add, pikv_pf_stream *pf)
{
    const int R = 16 / G;
    for (int32_t r0 = 0; r0 < n; r0 += R) {
        const int32_t nr = n - r0 < R ? n - r0 : R;
        __m512 acc[16];
        for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
        for (int r = 0; r < R; r++) {
            if (r >= nr) break;
            const unsigned char *row = rows + (size_t)(r0 + r) * rb;
            for (int32_t d0 = 0; d0 < hd; d0 += 128) {
                __m512 k[8];
                pf_advance(pf, 128 * rb / (size_t)hd);
                row128(row, d0, kind, k);
                for (int h = 0; h < G; h++) {
                    const float *qh = q + (size_t)h * (size_t)hd + d0;
                    for (int c = 0; c < 8; c++) acc[h * R + r] = _mm512_fmadd_ps(_mm512_loadu_ps(qh + 16 * c), k[c], acc[h * R + r]);
                }
            }
        }
        float v[16];
        _mm512_storeu_ps(v, hsum16(acc));
        for (int h = 0; h < G; h++)
            for (int32_t r = 0; r < nr; r++) s[(size_t)h * ss + (size_t)(r0 + r)] = v[h * R + r] + (add ? add[h] : 0.0f);
    }
}

/* acc_h[0..hd) += sum_r w_h[r * wstride + group] * row_r, w_h = w + h * hstride,
   acc_h = part + h * (hd + 2) + 2; groups of gsize channels (a multiple of 32, or
   gsize % 128 == 0 for one weight per row). */
T512_INLINE void values_gqa(float *part, const float *w, size_t hstride, int32_t wstride, int32_t gsize,
                            const unsigned char *rows, size_t rb, int32_t n, int32_t hd, int kind, const int G,
                            pikv_pf_stream *pf)
{
    const int CW = 16 / G; /* vectors of 16 channels per pass */
    const size_t pst = (size_t)hd + 2;
    const size_t step_bytes = (size_t)(16 * CW) * rb / (size_t)hd; /* a pass's channels of a row */
    for (int32_t d0 = 0; d0 < hd; d0 += 16 * CW) {
        __m512 acc[16];
        int32_t gi[16];
        for (int h = 0; h < G; h++)
            for (int c = 0; c < CW; c++) acc[h * CW + c] = _mm512_loadu_ps(part + (size_t)h * pst + 2 + d0 + 16 * c);
        for (int c = 0; c < CW; c++) gi[c] = (d0 + 16 * c) / gsize;
        for (int32_t r = 0; r < n; r++) {
            const unsigned char *row = rows + (size_t)r * rb;
            pf_advance(pf, step_bytes);
            __m512 v[16];
            if (kind == 3) {
                for (int c = 0; c < CW; c += 2) load32_int4(row, d0 + 16 * c, &v[c], &v[c + 1]);
            } else {
                for (int c = 0; c < CW; c++) v[c] = load16(row, d0 + 16 * c, kind);
            }
            for (int h = 0; h < G; h++) {
                const float *wr = w + (size_t)h * hstride + (size_t)r * (size_t)wstride;
                for (int c = 0; c < CW; c++)
                    acc[h * CW + c] = _mm512_fmadd_ps(_mm512_set1_ps(wr[gi[c]]), v[c], acc[h * CW + c]);
            }
        }
        for (int h = 0; h < G; h++)
            for (int c = 0; c < CW; c++) _mm512_storeu_ps(part + (size_t)h * pst + 2 + d0 + 16 * c, acc[h * CW + c]);
    }
}

/* the GQA kernels for this G and kind, or false */
T512_INLINE bool gqa_ok(int32_t G, int32_t hd, int kind)
{
    if (hd % 128 != 0) return false;
    return G == 2 || G == 4 || G == 8 || (G == 16 && kind != 3);
}

#define GQA_DISPATCH(G, call) \
    switch (G) {               \
    case 2: call(2); break;    \
    case 4: call(4); break;    \
    case 8: call(8); break;    \
    default: call(16); break;  \
    }

#endif
