/* Decode attention for CPU devices (PoCL), compiled only there (-DPIKV_OCL_CPU).
 *
 * Same output as pikv_attention_part (attention.cl): per task (a run of pages
 * of one (query, KV head) list) and query head of the group, the online softmax
 * state (max, sum, unnormalized accumulator) that pikv_attention_finish merges,
 * and each page's log-sum-exp. The host side is opencl-cpu-ops.c.
 *
 * CPU shape: one work item per item (work-groups of one item, so PoCL runs items
 * as independent loop iterations spread over its threads, no barriers). Pages are
 * addressed in a pool arena (one launch covers every chunk of it). An item takes a
 * run of pages for one or several KV heads of a query (several when their lists
 * agree), page after page, all its heads of a page before the next page, so the
 * reads stream through each page; software prefetch runs a few head blocks ahead.
 * Vectors are explicit float16s: the head dimension is a compile-time constant (one
 * kernel per supported head_dim), so queries and accumulators live in registers;
 * the softmax states of the item's (KV head, query head) pairs wait in private
 * memory (L1) between pages. GQA: two query heads of a group go through a page
 * together, sharing each K/V load and conversion. Rows go in blocks of up to 16:
 * the block's 16 scores come out of one transposing add tree as one float16, exp
 * is vectorized, the running max is updated once per block. Quantized pages are
 * dequantized on the fly: keys as q.(s*k + z) = (q*s).k + q.z per key group,
 * values as w*s*v + w*z per value group (value groups must be a multiple of 16
 * channels for int8, 32 for int4: the host checks). An int4 row's vector j (16
 * bytes) holds channels 32j .. 32j+31, even ones in the low nibbles: queries and
 * accumulators are kept de-interleaved (slot 2j even channels, 2j+1 odd) and put
 * back in order at the end. */
#ifdef PIKV_OCL_CPU

#define CPU_NVMAX 16 /* float16 vectors per row: head_dim up to 256 */

/* Software prefetch of n bytes from p (one per 64-byte line). A head's rows of a
   page are only a few KiB, too short for the hardware prefetchers to ramp up;
   the next page's rows are requested while this one is computed. */
#define CPU_PF_STRIDE 64 /* bytes: one per cache line (every other line measured slower) */
#if defined(__clang__)
#define CPU_PREFETCH(p, n)                                                        \
    do {                                                                          \
        for (uint o_ = 0; o_ < (uint)(n); o_ += CPU_PF_STRIDE) __builtin_prefetch((p) + o_); \
    } while (0)
#else
#define CPU_PREFETCH(p, n) ((void)0)
#endif

/* Prefetch of the scales and zero points of KV head g of a quantized page (the
   rows are prefetched row by row while the current head is computed). */
static inline void cpu_prefetch_scales(page_ptr page, const layout_t L, int g)
{
    if (L.dtype >= DT_INT8) {
        const uint kb = (uint)L.kg * (uint)L.hd * 2u, vb = (uint)L.ps * (uint)L.vg * 2u;
        CPU_PREFETCH(page + L.ksc + (size_t)g * kb, kb);
        CPU_PREFETCH(page + L.kze + (size_t)g * kb, kb);
        CPU_PREFETCH(page + L.vsc + (size_t)g * vb, vb);
        CPU_PREFETCH(page + L.vze + (size_t)g * vb, vb);
    }
}

/* Prefetch of KV head g's rows of a page (n rows), with its scales and zero
   points on quantized pages (they lie apart from the rows). */
static inline void cpu_prefetch_head(page_ptr page, const layout_t L, int g, int n)
{
    const uint nbytes = (uint)n * L.row;
    CPU_PREFETCH(page + L.k + (size_t)g * L.hs, nbytes);
    CPU_PREFETCH(page + L.v + (size_t)g * L.hs, nbytes);
    cpu_prefetch_scales(page, L, g);
}

static inline float cpu_hsum16(float16 v)
{
    float8 a = v.lo + v.hi;
    float4 b = a.lo + a.hi;
    float2 c = b.lo + b.hi;
    return c.x + c.y;
}

/* GQA: HP (1 or 2) query heads of a KV head go through a page together, so each
   K and V vector is loaded and converted once for them. Per-head arrays are
   indexed [hp * CPU_NVMAX + j]. */
#define CPU_HPMAX 2

/* The dot product partials of one key row with HP queries (16 lanes each to add up). */
static inline __attribute__((always_inline)) void cpu_row_dot(const int NV, const int DT, const int HP, page_ptr row,
                                                              const float16 *qk, float16 *t)
{
    _Pragma("unroll") for (int p = 0; p < HP; p++) t[p] = (float16)(0.0f);
    if (DT == DT_INT4) {
        _Pragma("unroll") for (int j = 0; j < NV / 2; j++) {
            const int16 x = convert_int16(vload16(j, row)); /* nibbles split after widening: fewer shuffles */
            const float16 lo = convert_float16(x & 15), hi = convert_float16(x >> 4);
            _Pragma("unroll") for (int p = 0; p < HP; p++) {
                t[p] = fma(qk[p * CPU_NVMAX + 2 * j], lo, t[p]);
                t[p] = fma(qk[p * CPU_NVMAX + 2 * j + 1], hi, t[p]);
            }
        }
        return;
    }
    _Pragma("unroll") for (int j = 0; j < NV; j++) {
        float16 x;
        if (DT == DT_F32)
            x = vload16(j, (__global const float *)row);
        else if (DT == DT_F16)
            x = vload_half16(j, (__global const half *)row);
        else
            x = convert_float16(vload16(j, row));
        _Pragma("unroll") for (int p = 0; p < HP; p++) t[p] = fma(qk[p * CPU_NVMAX + j], x, t[p]);
    }
}

/* Folds lane chunks of c pairwise: chunk 2k + chunk 2k+1. */
static inline float8 cpu_fold8(float16 v) { return (float8)(v.s0123 + v.s4567, v.s89ab + v.scdef); }
static inline float8 cpu_fold4(float16 v)
{
    return (float8)(v.s01 + v.s23, v.s45 + v.s67, v.s89 + v.sab, v.scd + v.sef);
}

/* Scores of rows [r0, r0 + nb) (nb <= 16) of KV head row base kp for HP queries,
   one vector each (-inf past nb): 16 rows' partials are added up together by a
   transposing tree (row order kept) instead of one horizontal sum per row. Rows
   past nb re-read row nb - 1 (cached) and are masked. qk: the (scaled, for
   quantized pages dequantization-folded) queries; kc: their constant terms (q.z
   of the key group for quantized pages). */
static inline __attribute__((always_inline)) void cpu_scores(const int NV, const int DT, const int HP, page_ptr kp,
                                                             uint row_bytes, int r0, int nb, const float16 *qk,
                                                             const float *kc, page_ptr pfk, float16 *s)
{
    float16 v[CPU_HPMAX * 8];
    _Pragma("unroll") for (int k = 0; k < 8; k++) {
        if (pfk) CPU_PREFETCH(pfk + (size_t)(r0 + 2 * k) * row_bytes, 2 * row_bytes);
        float16 a[CPU_HPMAX], b[CPU_HPMAX];
        cpu_row_dot(NV, DT, HP, kp + (size_t)(r0 + min(2 * k, nb - 1)) * row_bytes, qk, a);
        cpu_row_dot(NV, DT, HP, kp + (size_t)(r0 + min(2 * k + 1, nb - 1)) * row_bytes, qk, b);
        _Pragma("unroll") for (int p = 0; p < HP; p++)
            v[p * 8 + k] = (float16)(a[p].lo + a[p].hi, b[p].lo + b[p].hi); /* rows 2k, 2k+1: 8 lanes each */
    }
    const int16 lane = (int16)(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    _Pragma("unroll") for (int p = 0; p < HP; p++) {
        const float16 *vp = v + p * 8;
        float16 w[4];
        _Pragma("unroll") for (int k = 0; k < 4; k++) w[k] = (float16)(cpu_fold8(vp[2 * k]), cpu_fold8(vp[2 * k + 1]));
        float16 x[2];
        _Pragma("unroll") for (int k = 0; k < 2; k++) x[k] = (float16)(cpu_fold4(w[2 * k]), cpu_fold4(w[2 * k + 1]));
        const float16 sums = (float16)(x[0].even + x[0].odd, x[1].even + x[1].odd) + kc[p];
        s[p] = select((float16)(-INFINITY), sums, lane < (int16)(nb));
    }
}

/* acc[p] += sum_i w[p * 16 + i] * value row r0 + i, for i < nb. Quantized rows:
   per value group (a multiple of 16 channels for int8, 32 for int4) the weight
   times the group's scale multiplies the codes, and the zero points' share w * z
   is added once per group and block. */
static inline __attribute__((always_inline)) void cpu_values(const int NV, const int DT, const int HP, page_ptr vp,
                                                             uint row_bytes, page_ptr page, const layout_t L, int g,
                                                             int r0, int nb, const float *w, page_ptr pfv,
                                                             float16 *acc)
{
    if (DT == DT_F32 || DT == DT_F16) {
        for (int i = 0; i < nb; i++) {
            page_ptr row = vp + (size_t)(r0 + i) * row_bytes;
            if (pfv) CPU_PREFETCH(pfv + (size_t)(r0 + i) * row_bytes, row_bytes);
            float16 wi[CPU_HPMAX];
            _Pragma("unroll") for (int p = 0; p < HP; p++) wi[p] = (float16)(w[p * 16 + i]);
            _Pragma("unroll") for (int j = 0; j < NV; j++) {
                const float16 x = DT == DT_F32 ? vload16(j, (__global const float *)row)
                                               : vload_half16(j, (__global const half *)row);
                _Pragma("unroll") for (int p = 0; p < HP; p++)
                    acc[p * CPU_NVMAX + j] = fma(wi[p], x, acc[p * CPU_NVMAX + j]);
            }
        }
        return;
    }
    const int vg = L.vg, per = DT == DT_INT8 ? L.group / 16 : L.group / 32; /* vectors per group */
    int gj[CPU_NVMAX];
    _Pragma("unroll") for (int j = 0; j < NV; j++) gj[j] = j / per;
    float zb[CPU_HPMAX * CPU_NVMAX];
    /* ws[p][i * vg + k]: row i's weight times its group k's scale */
    float ws[CPU_HPMAX * 16 * CPU_NVMAX];
    const size_t at0 = ((size_t)g * L.ps + (size_t)r0) * (size_t)vg;
    __global const half *vs0 = (__global const half *)(page + L.vsc) + at0;
    __global const half *vz0 = (__global const half *)(page + L.vze) + at0;
    if ((vg & (vg - 1)) == 0) {
        /* vg divides 16 (the common case): the block's scales and zero points
           ([row][group], contiguous: vg float16s for 16 rows) are weighted as
           vectors, the weights spread to [row][group] lanes by one permutation
           per vector, instead of vg scalar products per row. Lane l of every
           vector is group l % vg, so the zero points' shares fold by lane. */
        const uint lvg = 31 - clz((uint)vg);
        const uint16 lane = (uint16)(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
        float16 wv[CPU_HPMAX], zv[CPU_HPMAX];
        _Pragma("unroll") for (int p = 0; p < HP; p++) {
            wv[p] = vload16(0, w + p * 16); /* 0 past nb */
            zv[p] = (float16)(0.0f);
        }
        for (int t = 0; t < vg; t++) {
            float16 s16, z16;
            if (nb == 16) {
                s16 = vload_half16(t, vs0);
                z16 = vload_half16(t, vz0);
            } else { /* the page's last rows: lanes past nb * vg must not be read (their weight is 0) */
                float sa[16], za[16];
                for (int l = 0; l < 16; l++) {
                    const int k = 16 * t + l;
                    sa[l] = k < nb * vg ? vload_half(k, vs0) : 0.0f;
                    za[l] = k < nb * vg ? vload_half(k, vz0) : 0.0f;
                }
                s16 = vload16(0, sa);
                z16 = vload16(0, za);
            }
            const uint16 mask = (lane + (uint)(16 * t)) >> lvg;
            _Pragma("unroll") for (int p = 0; p < HP; p++) {
                const float16 wt = shuffle(wv[p], mask);
                vstore16(wt * s16, t, ws + p * 16 * CPU_NVMAX);
                zv[p] = fma(wt, z16, zv[p]);
            }
        }
        _Pragma("unroll") for (int p = 0; p < HP; p++) {
            float za[16];
            vstore16(zv[p], 0, za);
            for (int k = 0; k < vg; k++) {
                float z = 0.0f;
                for (int l = k; l < 16; l += vg) z += za[l];
                zb[p * CPU_NVMAX + k] = z;
            }
        }
    } else {
        /* any other group count: scalar products per row */
        for (int k = 0; k < vg; k++)
            _Pragma("unroll") for (int p = 0; p < HP; p++) zb[p * CPU_NVMAX + k] = 0.0f;
        for (int i = 0; i < nb; i++)
            for (int k = 0; k < vg; k++) {
                const float sc = vload_half(i * vg + k, vs0), zc = vload_half(i * vg + k, vz0);
                _Pragma("unroll") for (int p = 0; p < HP; p++) {
                    const float wi = w[p * 16 + i];
                    ws[p * 16 * CPU_NVMAX + i * vg + k] = wi * sc;
                    zb[p * CPU_NVMAX + k] = fma(wi, zc, zb[p * CPU_NVMAX + k]);
                }
            }
    }
    for (int i = 0; i < nb; i++) {
        const int r = r0 + i;
        page_ptr row = vp + (size_t)r * row_bytes;
        if (pfv) CPU_PREFETCH(pfv + (size_t)r * row_bytes, row_bytes);
        const float *wsi = ws + i * vg;
        if (DT == DT_INT8) {
            _Pragma("unroll") for (int j = 0; j < NV; j++) {
                const float16 x = convert_float16(vload16(j, row));
                _Pragma("unroll") for (int p = 0; p < HP; p++)
                    acc[p * CPU_NVMAX + j] = fma((float16)(wsi[p * 16 * CPU_NVMAX + gj[j]]), x, acc[p * CPU_NVMAX + j]);
            }
        } else {
            _Pragma("unroll") for (int j = 0; j < NV / 2; j++) {
                const int16 x = convert_int16(vload16(j, row));
                const float16 lo = convert_float16(x & 15), hi = convert_float16(x >> 4);
                _Pragma("unroll") for (int p = 0; p < HP; p++) {
                    const float16 sj = (float16)(wsi[p * 16 * CPU_NVMAX + gj[j]]);
                    acc[p * CPU_NVMAX + 2 * j] = fma(sj, lo, acc[p * CPU_NVMAX + 2 * j]);
                    acc[p * CPU_NVMAX + 2 * j + 1] = fma(sj, hi, acc[p * CPU_NVMAX + 2 * j + 1]);
                }
            }
        }
    }
    _Pragma("unroll") for (int p = 0; p < HP; p++) {
        if (DT == DT_INT8) {
            _Pragma("unroll") for (int j = 0; j < NV; j++) acc[p * CPU_NVMAX + j] += (float16)(zb[p * CPU_NVMAX + gj[j]]);
        } else {
            _Pragma("unroll") for (int j = 0; j < NV / 2; j++) {
                acc[p * CPU_NVMAX + 2 * j] += (float16)(zb[p * CPU_NVMAX + gj[j]]);
                acc[p * CPU_NVMAX + 2 * j + 1] += (float16)(zb[p * CPU_NVMAX + gj[j]]);
            }
        }
    }
}

/* One page for HP query heads of KV head g (rows qh, qh + HD, ...): updates their
   running softmax states (m, l, acc; acc de-interleaved for int4) with rows
   [0, n) of the page, and writes each head's page log-sum-exp to plse when
   want_lse (-inf without rows). */
static inline __attribute__((always_inline)) void cpu_page(const int HD, const int DT, const int HP, page_ptr page,
                                                           const layout_t L, int g, int n, __global const float *qh,
                                                           float scale, int want_lse, page_ptr pfk, page_ptr pfv,
                                                           float *m_io, float *l_io, float16 *acc, float *plse)
{
    const int NV = HD / 16;
    const bool quant = DT == DT_INT8 || DT == DT_INT4;
    float16 qv[CPU_HPMAX * CPU_NVMAX], qk[CPU_HPMAX * CPU_NVMAX];
    _Pragma("unroll") for (int p = 0; p < HP; p++) {
        _Pragma("unroll") for (int j = 0; j < NV; j++) qv[p * CPU_NVMAX + j] = vload16(j, qh + (size_t)p * HD) * scale;
        if (DT == DT_INT4) { /* de-interleave: slot 2j even channels of 32j.., 2j+1 odd */
            _Pragma("unroll") for (int j = 0; j < NV / 2; j++) {
                const float16 a = qv[p * CPU_NVMAX + 2 * j], b = qv[p * CPU_NVMAX + 2 * j + 1];
                qv[p * CPU_NVMAX + 2 * j] = (float16)(a.even, b.even);
                qv[p * CPU_NVMAX + 2 * j + 1] = (float16)(a.odd, b.odd);
            }
        }
        if (!quant) {
            _Pragma("unroll") for (int j = 0; j < NV; j++) qk[p * CPU_NVMAX + j] = qv[p * CPU_NVMAX + j];
        }
    }
    page_ptr kp = page + L.k + (size_t)g * L.hs;
    page_ptr vp = page + L.v + (size_t)g * L.hs;
    float m[CPU_HPMAX], l[CPU_HPMAX], pm[CPU_HPMAX], psum[CPU_HPMAX], kc[CPU_HPMAX];
    _Pragma("unroll") for (int p = 0; p < HP; p++) {
        m[p] = m_io[p];
        l[p] = l_io[p];
        pm[p] = -INFINITY; /* the page's own log-sum-exp, online */
        psum[p] = 0.0f;
        kc[p] = 0.0f;
    }
    const int kgroup = quant ? L.group : 1 << 30;
    for (int r0 = 0; r0 < n;) {
        const int gend = min(n, (r0 / kgroup + 1) * kgroup);
        if (quant) { /* r0 starts a key group: fold its per-channel scales into the queries */
            const size_t at = ((size_t)g * L.kg + (size_t)(r0 / kgroup)) * HD;
            __global const half *ks = (__global const half *)(page + L.ksc) + at;
            __global const half *kz = (__global const half *)(page + L.kze) + at;
            float16 c[CPU_HPMAX];
            _Pragma("unroll") for (int p = 0; p < HP; p++) c[p] = (float16)(0.0f);
            if (DT == DT_INT4) { /* scales and zeros de-interleaved like qv */
                _Pragma("unroll") for (int j = 0; j < NV / 2; j++) {
                    const float16 sa = vload_half16(2 * j, ks), sb = vload_half16(2 * j + 1, ks);
                    const float16 za = vload_half16(2 * j, kz), zb = vload_half16(2 * j + 1, kz);
                    const float16 se = (float16)(sa.even, sb.even), so = (float16)(sa.odd, sb.odd);
                    const float16 ze = (float16)(za.even, zb.even), zo = (float16)(za.odd, zb.odd);
                    _Pragma("unroll") for (int p = 0; p < HP; p++) {
                        qk[p * CPU_NVMAX + 2 * j] = qv[p * CPU_NVMAX + 2 * j] * se;
                        qk[p * CPU_NVMAX + 2 * j + 1] = qv[p * CPU_NVMAX + 2 * j + 1] * so;
                        c[p] = fma(qv[p * CPU_NVMAX + 2 * j], ze, c[p]);
                        c[p] = fma(qv[p * CPU_NVMAX + 2 * j + 1], zo, c[p]);
                    }
                }
            } else {
                _Pragma("unroll") for (int j = 0; j < NV; j++) {
                    const float16 sv = vload_half16(j, ks), zv = vload_half16(j, kz);
                    _Pragma("unroll") for (int p = 0; p < HP; p++) {
                        qk[p * CPU_NVMAX + j] = qv[p * CPU_NVMAX + j] * sv;
                        c[p] = fma(qv[p * CPU_NVMAX + j], zv, c[p]);
                    }
                }
            }
            _Pragma("unroll") for (int p = 0; p < HP; p++) kc[p] = cpu_hsum16(c[p]);
        }
        /* blocks of <= 16 rows inside this key group */
        for (; r0 < gend; r0 += 16) {
            const int nb = min(16, gend - r0);
            float16 s[CPU_HPMAX];
            cpu_scores(NV, DT, HP, kp, L.row, r0, nb, qk, kc, pfk, s);
            float w[CPU_HPMAX * 16];
            _Pragma("unroll") for (int p = 0; p < HP; p++) {
                const float8 m8 = fmax(s[p].lo, s[p].hi);
                const float4 m4 = fmax(m8.lo, m8.hi);
                const float2 m2 = fmax(m4.lo, m4.hi);
                const float bm = fmax(m2.x, m2.y);
                /* NaN or inf scores: poison the state so the finish kernel reports them */
                if (!(bm < INFINITY) || bm != bm) {
                    l[p] = NAN; /* sticky: every later update keeps it */
                    vstore16((float16)(0.0f), 0, w + p * 16);
                    continue;
                }
                const float16 ex = exp(s[p] - bm);
                const float bs = cpu_hsum16(ex);
                if (want_lse) {
                    const float npm = fmax(pm[p], bm);
                    psum[p] = psum[p] * (pm[p] == -INFINITY ? 0.0f : exp(pm[p] - npm)) + bs * exp(bm - npm);
                    pm[p] = npm;
                }
                const float mn = fmax(m[p], bm);
                if (mn > m[p]) {
                    const float alpha = m[p] == -INFINITY ? 0.0f : exp(m[p] - mn);
                    _Pragma("unroll") for (int j = 0; j < NV; j++) acc[p * CPU_NVMAX + j] *= alpha;
                    l[p] *= alpha;
                    m[p] = mn;
                }
                const float beta = exp(bm - m[p]);
                vstore16(ex * beta, 0, w + p * 16);
                l[p] = fma(bs, beta, l[p]);
            }
            cpu_values(NV, DT, HP, vp, L.row, page, L, g, r0, nb, w, pfv, acc);
        }
        r0 = gend;
    }
    _Pragma("unroll") for (int p = 0; p < HP; p++) {
        m_io[p] = m[p];
        l_io[p] = l[p];
        plse[p] = want_lse && psum[p] > 0.0f ? pm[p] + log(psum[p]) : -INFINITY;
    }
}

/* Softmax states of the (KV head, query head) pairs of one work item, in
   private memory (L1): pairs * head_dim floats at most (the host checks). */
#define CPU_STATE_FLOATS 8192
#define CPU_PF_HEADS 8 /* prefetch distance in head blocks */
#define CPU_PF_PAGES 3 /* ... in pages, for items of one KV head */

/* An item (8 ints): query, g0, ng, e_begin, n, list_stride, part_base,
   part_gstride: pages e_begin .. e_begin + n (absolute entries of the list of KV
   head g0; KV head g0 + i reads the same pages, its list entries are i *
   list_stride further, for page_lse), for KV heads g0 .. g0 + ng, every query
   head of their groups. The partial of KV head g0 + i goes to task part_base +
   i * part_gstride. Pages are taken one after the other, all heads of a page
   before the next page, so the reads stream through the page. ent_len: rows,
   with bit 30 set for a page of the quantized pool (layout row 1). */
static inline __attribute__((always_inline)) void cpu_attn_item(
    const int HD, __global const uchar *arena, __global const uint *lay, __global const float *q,
    __global const int *it, __global const ulong *ent_off, __global const int *ent_len, int n_q_heads, int G,
    float scale, int want_page_lse, __global float *parts, __global float *page_lse)
{
    const int NV = HD / 16;
    const int query = it[0], g0 = it[1], ng = it[2], e_begin = it[3], n = it[4], list_stride = it[5];
    const int part_base = it[6], part_gstride = it[7];
    const layout_t L0 = get_layout(lay), L1 = get_layout(lay + LAYOUT_WORDS);
    const int pairs = ng * G;
    float16 st[CPU_STATE_FLOATS / 16];
    float sm[CPU_STATE_FLOATS / 64], sl[CPU_STATE_FLOATS / 64];
    for (int c = 0; c < pairs; c++) {
        sm[c] = -INFINITY;
        sl[c] = 0.0f;
        _Pragma("unroll") for (int j = 0; j < NV; j++) st[c * NV + j] = (float16)(0.0f);
    }
    __global const float *qq = q + ((size_t)query * (size_t)n_q_heads + (size_t)g0 * (size_t)G) * HD;
    for (int k = 0; k < n; k++) {
        const int e = e_begin + k;
        const int lenq = ent_len[e], len = lenq & 0xffff;
        if (len <= 0) continue;
        const bool qpool = (lenq >> 30) & 1;
        page_ptr page = arena + ent_off[e];
        const layout_t L = qpool ? L1 : L0;
        if (ng == 1) { /* one head: its rows are short runs, help the prefetcher (CPU_PF_PAGES ahead) */
            for (int kp_ = k == 0 ? 1 : k + CPU_PF_PAGES; kp_ <= k + CPU_PF_PAGES && kp_ < n; kp_++) {
                const int ep = e_begin + kp_;
                cpu_prefetch_head(arena + ent_off[ep], ((ent_len[ep] >> 30) & 1) ? L1 : L0, g0, ent_len[ep] & 0xffff);
            }
        }
        for (int c = 0; c < pairs; c++) {
            const int gi = c / G, h = c - gi * G, g = g0 + gi;
            /* the rows of the head CPU_PF_HEADS further on (maybe next page's), row by
               row as this head's rows are computed (a burst of a whole head block's
               prefetches at once stalled on the miss buffers); its scales now */
            page_ptr pfk = 0, pfv = 0;
            if (ng > 1 && h == 0) {
                int gp = gi + CPU_PF_HEADS, kp_ = k;
                if (gp >= ng) {
                    gp -= ng;
                    kp_++;
                }
                if (kp_ < n && gp < ng) {
                    const int ep = e_begin + kp_;
                    const layout_t Lp = ((ent_len[ep] >> 30) & 1) ? L1 : L0;
                    page_ptr pp = arena + ent_off[ep];
                    cpu_prefetch_scales(pp, Lp, g0 + gp);
                    pfk = pp + Lp.k + (size_t)(g0 + gp) * Lp.hs;
                    pfv = pp + Lp.v + (size_t)(g0 + gp) * Lp.hs;
                }
            }
            const int HPn = (G % 2 == 0) ? 2 : 1; /* query heads per pass (c is even when HPn is 2) */
            if (h % HPn) continue;
            float16 acc[CPU_HPMAX * CPU_NVMAX];
            float m[CPU_HPMAX], l[CPU_HPMAX], plse[CPU_HPMAX];
            for (int p = 0; p < HPn; p++) {
                _Pragma("unroll") for (int j = 0; j < NV; j++) acc[p * CPU_NVMAX + j] = st[(c + p) * NV + j];
                m[p] = sm[c + p];
                l[p] = sl[c + p];
            }
            __global const float *qh = qq + (size_t)c * HD;
#define CPU_PAGE_CASE(DT_)                                                                                 \
    if (HPn == 2)                                                                                          \
        cpu_page(HD, DT_, 2, page, L, g, len, qh, scale, want_page_lse, pfk, pfv, m, l, acc, plse);                  \
    else                                                                                                   \
        cpu_page(HD, DT_, 1, page, L, g, len, qh, scale, want_page_lse, pfk, pfv, m, l, acc, plse);
            switch (L.dtype) {
            case DT_F32: CPU_PAGE_CASE(DT_F32) break;
            case DT_F16: CPU_PAGE_CASE(DT_F16) break;
            case DT_INT8: CPU_PAGE_CASE(DT_INT8) break;
            default: CPU_PAGE_CASE(DT_INT4) break;
            }
#undef CPU_PAGE_CASE
            for (int p = 0; p < HPn; p++) {
                _Pragma("unroll") for (int j = 0; j < NV; j++) st[(c + p) * NV + j] = acc[p * CPU_NVMAX + j];
                sm[c + p] = m[p];
                sl[c + p] = l[p];
                if (want_page_lse) page_lse[((size_t)e + (size_t)gi * list_stride) * G + h + p] = plse[p];
            }
        }
    }
    /* An item never mixes int4 pages with others (the host splits runs where the
       pool changes): its accumulators are all de-interleaved, or none. */
    const bool deint = L1.dtype == DT_INT4 && n > 0 && ((ent_len[e_begin] >> 30) & 1);
    for (int c = 0; c < pairs; c++) {
        const int gi = c / G, h = c - gi * G;
        __global float *ph = parts + ((size_t)(part_base + gi * part_gstride) * G + h) * (HD + 2);
        ph[0] = sm[c];
        ph[1] = sl[c];
        if (deint) {
            for (int j = 0; j < NV / 2; j++) {
                float ev[16], od[16];
                vstore16(st[c * NV + 2 * j], 0, ev);
                vstore16(st[c * NV + 2 * j + 1], 0, od);
                for (int i = 0; i < 16; i++) {
                    ph[2 + 32 * j + 2 * i] = ev[i];
                    ph[2 + 32 * j + 2 * i + 1] = od[i];
                }
            }
        } else {
            for (int j = 0; j < NV; j++) vstore16(st[c * NV + j], 0, ph + 2 + 16 * j);
        }
    }
}

#define PIKV_ATTN_CPU(HD)                                                                                      \
    __kernel __attribute__((reqd_work_group_size(1, 1, 1))) void pikv_attention_cpu##HD(                     \
        __global const uchar *arena, __global const uint *lay, __global const float *q,                       \
        __global const int *items, int item_begin, __global const ulong *ent_off, __global const int *ent_len, \
        int n_q_heads, int G, float scale, int want_page_lse, __global float *parts, __global float *page_lse) \
    {                                                                                                         \
        cpu_attn_item(HD, arena, lay, q, items + 8 * ((size_t)item_begin + get_global_id(0)), ent_off,        \
                      ent_len, n_q_heads, G, scale, want_page_lse, parts, page_lse);                          \
    }

PIKV_ATTN_CPU(64)
PIKV_ATTN_CPU(128)
PIKV_ATTN_CPU(256)

#endif /* PIKV_OCL_CPU */
