/*
 * quant: int8 / int4 pages (pikv_dtype INT8/INT4, quant_group). White-box: pages are read
 * through the cache's pools (runtime/cache-impl.h) and the CPU backend's page pointer and
 * row dequantizer (backends/cpu/cpu-impl.h); everything expected is computed here from the
 * documented format (backend-impl.h, cpu-quant.c), with this file's own f16 conversions and
 * its own decoder of the page bytes.
 *
 *  1. roundtrip: every quantized page, byte for byte: the layout offsets; the Quest bounds
 *     (f32 min/max over the f16 keys the open page held); per group zero = group min,
 *     scale = (max - min) / qmax rounded UP to f16 (the smallest such f16), q = rint((x -
 *     zero) / scale) clamped; int4 nibble order (channel 2j low, 2j+1 high) and zeroed
 *     padding; this file's decode q * scale + zero equals pikv_cpu_dequant_row bit for bit;
 *     |x' - x| <= scale / 2 + 1 ulp of the largest of |x|, |x'|, |x - zero| (the f32
 *     arithmetic), and exactly 0 for constant groups. Random, constant,
 *     outlier, near +-65504, tiny / subnormal, wide mixed-sign, offset and two-valued data;
 *     int8 and int4; head dims 1..128 (odd ones), page sizes 1..33, groups 1..1024 (larger
 *     than the page and the head, not dividing either). The open page holds the f16 of the
 *     inputs. The layer's key_rel_error / value_rel_error / max_abs_error equal this file's
 *     sums over those pages; -1 for float caches, 0 before any page is quantized.
 *     A hand-made group at a rounding midpoint shows the f32 arithmetic is the specification
 *     (|x' - x| passes scale / 2 there by the rounding of x - zero).
 *  2. attend: output and lse of pikv_cache_attend equal dense attention in double over the
 *     dequantized rows of the quantized pages and the f16 rows of the open pages read in the
 *     same call (normalized error < 2e-5): 1..4 devices, dense and every placement, GQA 1/2/4,
 *     lengths that are not multiples of the page size; exact mode and QUEST / EXPERTS /
 *     QUEST|EXPERTS, whose page choice is recomputed here (float Quest bound from the f16
 *     keys, budgeted top-k). Read stats follow the reads.
 *  3. memory: page_bytes / quant_page_bytes and bytes_used equal the format's sizes exactly
 *     (data, f16 scales and zero points, f32 bounds, padding) for open and quantized pages;
 *     the int4 / int8 cache holds at most 0.25 / 0.5 of the f16 twin's bytes plus that
 *     overhead; device stats split bytes_used into open / quantized data / scales / other.
 *  4. copy_prefix cutting inside quantized pages (the copy holds the f16 of the dequantized
 *     rows, full pages are shared, the source is untouched), appending to the copy
 *     re-quantizes it; rebalance and trim move pages bit for bit (outputs: bitwise after trim
 *     and for sequences read by one device; within 2e-5 when the devices a query reads
 *     change, which changes the partial merge); placement and rebalance of an int8/int4 cache
 *     match its f16 twin; budget eviction frees quantized slots (every slot used or free,
 *     stats add up); allocation failures during an append that quantizes leave the cache
 *     unchanged (stats, memory, bitwise attend) and usable, Quest bounds included.
 *  5. bad input: dtype and quant_group ranges; values beyond the f16 range (open pages are
 *     f16), 65504 itself accepted.
 *
 * PIKV_QUANT_CASES in the environment sets the number of random round-trip caches (1000).
 */
#include "fault-hook.h"
#include "test-util.h"

#include "cache-impl.h"
#include "cpu-impl.h"

#include <pthread.h>
#include <time.h>

static pikv_context *g_ctx[5]; /* by number of CPU devices (1..4) */

/* ------------------------------------------------------------------------ */
/* The documented format                                                     */
/* ------------------------------------------------------------------------ */

static uint64_t up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

/* Offsets and sizes of a quantized page and of the open (f16) page of the same geometry:
   per KV head its K rows [ps][row] then its V rows [ps][row] ([kvh][2][ps][row]), then
   (16-byte aligned) f32 bounds min [kvh][hd] and max,
   then f16 key scales [kvh][k_groups][hd], key zeros, value scales [kvh][ps][v_groups],
   value zeros, padded to 64 bytes. */
typedef struct qfmt {
    int ps, kvh, hd, G, qmax, int4, kg, vg;
    uint64_t row, data, v_off, kmin, kmax, ks, kz, vs, vz, end, scales, bounds, page;
    uint64_t f16_data, f16_page;
} qfmt;

static qfmt qfmt_make(int ps, int kvh, int hd, pikv_dtype dtype, int G)
{
    qfmt f;
    memset(&f, 0, sizeof f);
    f.ps = ps;
    f.kvh = kvh;
    f.hd = hd;
    f.G = G;
    f.int4 = dtype == PIKV_DTYPE_INT4;
    f.qmax = f.int4 ? 15 : 255;
    f.row = f.int4 ? (uint64_t)(hd + 1) / 2 : (uint64_t)hd;
    f.data = 2 * (uint64_t)kvh * ps * f.row;
    f.v_off = (uint64_t)ps * f.row;
    f.bounds = (uint64_t)kvh * hd * 4;
    f.kmin = up(f.data, 16);
    f.kmax = f.kmin + f.bounds;
    f.kg = (ps + G - 1) / G;
    f.vg = (hd + G - 1) / G;
    const uint64_t kmeta = (uint64_t)kvh * f.kg * hd * 2, vmeta = (uint64_t)kvh * ps * f.vg * 2;
    f.ks = f.kmax + f.bounds;
    f.kz = f.ks + kmeta;
    f.vs = f.kz + kmeta;
    f.vz = f.vs + vmeta;
    f.end = f.vz + vmeta;
    f.scales = 2 * kmeta + 2 * vmeta;
    f.page = up(f.end, 64);
    f.f16_data = 2 * (uint64_t)kvh * ps * hd * 2;
    f.f16_page = up(up(f.f16_data, 16) + 2 * f.bounds, 64);
    return f;
}

static uint16_t rd16(const unsigned char *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return h;
}

static uint32_t fbits(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    return u;
}

/* The smallest f16 >= r (r > 0 finite, below 65504). */
static uint16_t f16_ceil(float r)
{
    uint16_t h = tu_f32_to_f16_bits(r);
    while (tu_f16_to_f32(h) < r)
        h++;
    while (h > 0 && tu_f16_to_f32((uint16_t)(h - 1)) >= r)
        h--;
    return h;
}

/* q of channel d of a row (int4: channel 2j low nibble, 2j+1 high nibble of byte j). */
static uint32_t fmt_q(const qfmt *F, const unsigned char *row, int d)
{
    if (!F->int4)
        return row[d];
    return (d & 1) ? (uint32_t)(row[d / 2] >> 4) : (uint32_t)(row[d / 2] & 0x0f);
}

static const unsigned char *fmt_row(const qfmt *F, const unsigned char *page, int key, int g, int t)
{
    return page + (uint64_t)g * 2 * F->v_off + (key ? 0 : F->v_off) + (uint64_t)t * F->row;
}

/* x' = q * scale + zero in f32 (two statements: no contraction). */
static float decode(uint32_t q, uint16_t sb, uint16_t zb)
{
    const float s = tu_f16_to_f32(sb), z = tu_f16_to_f32(zb);
    const float p = (float)q * s;
    const float r = p + z;
    return r;
}

/* This file's decode of row t of KV head g of a quantized page. */
static void fmt_decode_row(const qfmt *F, const unsigned char *page, int key, int g, int t, float *out)
{
    const unsigned char *row = fmt_row(F, page, key, g, t);
    for (int d = 0; d < F->hd; d++) {
        uint64_t at;
        if (key)
            at = (((uint64_t)g * F->kg + (uint64_t)(t / F->G)) * F->hd + (uint64_t)d) * 2;
        else
            at = (((uint64_t)g * F->ps + (uint64_t)t) * F->vg + (uint64_t)(d / F->G)) * 2;
        out[d] = decode(fmt_q(F, row, d), rd16(page + (key ? F->ks : F->vs) + at),
                        rd16(page + (key ? F->kz : F->vz) + at));
    }
}

/* ------------------------------------------------------------------------ */
/* White-box access to pages                                                 */
/* ------------------------------------------------------------------------ */

static const unsigned char *page_at(const pikv_cache *c, uint32_t id)
{
    const pikv_page_meta *m = &c->pages[id];
    return pikv_cpu_page_ptr(&c->devs[m->dev].view, pikv_op_slot(m));
}

static uint64_t page_size_bytes(const pikv_cache *c, uint32_t id)
{
    return c->pages[id].quant ? c->qlayout.page_bytes : c->layout.page_bytes;
}

static int64_t tok_of(const pikv_cache *c, uint32_t id, int r)
{
    return c->indices[(size_t)id * (size_t)c->params.page_size + (size_t)r];
}

/* What attention reads: row t of KV head g (the library's dequantizer for quantized
   pages, the f16 values for open pages). */
static void read_row(const pikv_cache *c, uint32_t id, int g, int t, int key, float *out)
{
    const pikv_page_meta *m = &c->pages[id];
    const unsigned char *pg = page_at(c, id);
    if (m->quant) {
        pikv_cpu_dequant_row(pikv_cpu_device_backend(c->devs[m->dev].dev), &c->qlayout, pg, g, t, key != 0,
                             out);
        return;
    }
    const pikv_page_layout *L = &c->layout;
    const unsigned char *row = pg + (key ? L->k_offset : L->v_offset) + (uint64_t)g * L->head_stride +
                               (uint64_t)t * L->row_bytes;
    for (int d = 0; d < c->params.head_dim; d++)
        out[d] = tu_f16_to_f32(rd16(row + 2 * (size_t)d));
}

static uint16_t open_bits(const pikv_cache *c, uint32_t id, int g, int t, int key, int d)
{
    const pikv_page_layout *L = &c->layout;
    return rd16(page_at(c, id) + (key ? L->k_offset : L->v_offset) + (uint64_t)g * L->head_stride +
                (uint64_t)t * L->row_bytes + 2 * (uint64_t)d);
}

/* Page ids of (seq, layer) in the library's candidate order (shard, then oldest first). */
static int seq_pages(const pikv_cache *c, int seq, int layer, uint32_t *ids, int32_t *shards, int cap)
{
    const pikv_seq_layer *sl = &c->seqs[seq].layers[layer];
    int n = 0;
    for (int32_t s = 0; s < c->n_shards; s++)
        for (int64_t j = 0; j < sl->rings[s].count; j++) {
            if (n < cap) {
                ids[n] = pikv_ring_at(&sl->rings[s], j);
                if (shards)
                    shards[n] = s;
            }
            n++;
        }
    return n;
}

/* f32 min / max the way the kernels keep bounds: first row, then strictly smaller/larger. */
static void minmax(const float *x, int n, int stride, float *lo, float *hi)
{
    float a = x[0], b = x[0];
    for (int i = 1; i < n; i++) {
        const float v = x[(size_t)i * (size_t)stride];
        a = v < a ? v : a;
        b = v > b ? v : b;
    }
    *lo = a;
    *hi = b;
}

/* ------------------------------------------------------------------------ */
/* Verifying a quantized page against the f16 values it was made from       */
/* ------------------------------------------------------------------------ */

typedef struct errsum {
    double kerr, kss, verr, vss, maxerr;
    double worst_excess; /* max (|x'-x| - scale/2) / ulp over non-constant groups */
    long values, const_groups, groups, pages;
} errsum;

typedef struct pagebad {
    long layout, bounds, zero, scale, q, deq, err, pad;
    char first[400];
} pagebad;

static void note_bad(pagebad *b, long *counter, const char *fmt, ...)
{
    (*counter)++;
    if (b->first[0])
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(b->first, sizeof b->first, fmt, ap);
    va_end(ap);
}

/* One group: values x[0..n) (f16 values), stored q, the library's decoded values, scale and
   zero bits. */
static void check_group(const qfmt *F, const float *x, const uint32_t *q, const float *lib, int n, uint16_t sb,
                        uint16_t zb, int key, errsum *es, pagebad *bad, const char *where)
{
    float lo = INFINITY, hi = -INFINITY;
    for (int i = 0; i < n; i++) {
        lo = x[i] < lo ? x[i] : lo;
        hi = x[i] > hi ? x[i] : hi;
    }
    const float z = tu_f16_to_f32(zb), s = tu_f16_to_f32(sb);
    es->groups++;
    if (!(z == lo) || (zb & 0x7c00u) == 0x7c00u)
        note_bad(bad, &bad->zero, "%s: zero point %a (bits 0x%04x), group min %a", where, (double)z, zb, (double)lo);
    const float range = hi - lo;
    uint16_t want_s = 0;
    if (range > 0.0f)
        want_s = f16_ceil(range / (float)F->qmax);
    if (sb != want_s)
        note_bad(bad, &bad->scale, "%s: scale bits 0x%04x (%a), expected 0x%04x (%a) for range %a / %d", where, sb,
                 (double)s, want_s, (double)tu_f16_to_f32(want_s), (double)range, F->qmax);
    if (range == 0.0f)
        es->const_groups++;
    for (int i = 0; i < n; i++) {
        uint32_t wq = 0;
        if (s != 0.0f) {
            float y = rintf((x[i] - z) / s);
            y = y < 0.0f ? 0.0f : y > (float)F->qmax ? (float)F->qmax : y;
            wq = (uint32_t)y;
        }
        if (q[i] != wq)
            note_bad(bad, &bad->q, "%s: element %d: q %u, expected %u (x %a, zero %a, scale %a)", where, i, q[i], wq,
                     (double)x[i], (double)z, (double)s);
        const float xr = decode(q[i], sb, zb);
        if (fbits(xr) != fbits(lib[i]))
            note_bad(bad, &bad->deq, "%s: element %d: pikv_cpu_dequant_row %a, q * scale + zero = %a", where, i,
                     (double)lib[i], (double)xr);
        const double e = fabs((double)xr - (double)x[i]);
        /* one ulp of the largest magnitude the f32 arithmetic handles: x, x' and x - zero
           (rounding x - zero can move a value across the rounding midpoint) */
        float mag = fabsf(x[i]) > fabsf(xr) ? fabsf(x[i]) : fabsf(xr);
        mag = fabsf(x[i] - z) > mag ? fabsf(x[i] - z) : mag;
        const double ulp = mag > 0.0f ? (double)(nextafterf(mag, INFINITY) - mag) : 0.0;
        if (range == 0.0f ? e != 0.0 : !(e <= (double)s / 2 + ulp))
            note_bad(bad, &bad->err, "%s: element %d: |x' - x| = %a > scale/2 = %a (+ulp %a); x %a x' %a q %u", where,
                     i, e, (double)s / 2, ulp, (double)x[i], (double)xr, q[i]);
        if (range > 0.0f && ulp > 0.0) {
            const double ex = (e - (double)s / 2) / ulp;
            es->worst_excess = ex > es->worst_excess ? ex : es->worst_excess;
        }
        const double ed = (double)xr - (double)x[i];
        if (key) {
            es->kerr += ed * ed;
            es->kss += (double)x[i] * x[i];
        } else {
            es->verr += ed * ed;
            es->vss += (double)x[i] * x[i];
        }
        es->maxerr = fabs(ed) > es->maxerr ? fabs(ed) : es->maxerr;
        es->values++;
    }
}

/* Checks the layout of the cache against the documented format (once per cache). */
static int check_layout(const pikv_cache *c, const qfmt *F)
{
    const pikv_page_layout *Q = &c->qlayout, *L = &c->layout;
    int ok = 1;
    ok &= CHECK_EQ(Q->row_bytes, F->row);
    ok &= CHECK_EQ(Q->k_offset, 0);
    ok &= CHECK_EQ(Q->v_offset, F->v_off);
    ok &= CHECK_EQ(Q->head_stride, 2 * (uint64_t)F->ps * F->row);
    ok &= CHECK_EQ(Q->kmin_offset, F->kmin);
    ok &= CHECK_EQ(Q->kmax_offset, F->kmax);
    ok &= CHECK_EQ(Q->kscale_offset, F->ks);
    ok &= CHECK_EQ(Q->kzero_offset, F->kz);
    ok &= CHECK_EQ(Q->vscale_offset, F->vs);
    ok &= CHECK_EQ(Q->vzero_offset, F->vz);
    ok &= CHECK_EQ(Q->k_groups, F->kg);
    ok &= CHECK_EQ(Q->v_groups, F->vg);
    ok &= CHECK_EQ(Q->page_bytes, F->page);
    ok &= CHECK_EQ(Q->data_bytes, F->data);
    ok &= CHECK_EQ(Q->scale_bytes, F->scales);
    ok &= CHECK_EQ(L->dtype, PIKV_DTYPE_F16);
    ok &= CHECK_EQ(L->page_bytes, F->f16_page);
    ok &= CHECK_EQ(L->kmin_offset, up(F->f16_data, 16));
    return ok;
}

/*
 * Verifies quantized page `id` made from xk, xv [ps][kvh][hd] (the f16 values the open page
 * held). Returns 1 if every check passed.
 */
static int verify_qpage(const pikv_cache *c, const qfmt *F, uint32_t id, const float *xk, const float *xv,
                        errsum *es, const char *what)
{
    const int ps = F->ps, kvh = F->kvh, hd = F->hd, G = F->G;
    const unsigned char *pg = page_at(c, id);
    pagebad bad;
    memset(&bad, 0, sizeof bad);
    char where[160];
    if (!c->pages[id].quant || c->pages[id].n_tokens != ps)
        note_bad(&bad, &bad.layout, "page %u: quant %d, %d rows", id, c->pages[id].quant, c->pages[id].n_tokens);
    es->pages++;
    float *lib = tu_xmalloc((size_t)ps * hd * sizeof(float));
    float *gx = tu_xmalloc((size_t)(ps > hd ? ps : hd) * sizeof(float));
    float *gl = tu_xmalloc((size_t)(ps > hd ? ps : hd) * sizeof(float));
    uint32_t *gq = tu_xmalloc((size_t)(ps > hd ? ps : hd) * sizeof(uint32_t));
    for (int g = 0; g < kvh; g++) {
        /* bounds: f32 min / max of the f16 keys, bit for bit */
        for (int d = 0; d < hd; d++) {
            float lo, hi;
            minmax(xk + (size_t)g * hd + d, ps, kvh * hd, &lo, &hi);
            float glo, ghi;
            memcpy(&glo, pg + F->kmin + 4 * ((size_t)g * hd + d), 4);
            memcpy(&ghi, pg + F->kmax + 4 * ((size_t)g * hd + d), 4);
            if (fbits(glo) != fbits(lo) || fbits(ghi) != fbits(hi))
                note_bad(&bad, &bad.bounds, "page %u head %d channel %d: bounds [%a, %a], f16 keys span [%a, %a]", id,
                         g, d, (double)glo, (double)ghi, (double)lo, (double)hi);
        }
        for (int key = 1; key >= 0; key--) {
            const float *x = key ? xk : xv;
            for (int t = 0; t < ps; t++)
                pikv_cpu_dequant_row(pikv_cpu_device_backend(c->devs[c->pages[id].dev].dev), &c->qlayout, pg, g, t,
                                     key != 0, lib + (size_t)t * hd);
            if (F->int4 && (hd & 1))
                for (int t = 0; t < ps; t++)
                    if (fmt_row(F, pg, key, g, t)[hd / 2] >> 4)
                        note_bad(&bad, &bad.pad, "page %u %s head %d row %d: unused high nibble is %u", id,
                                 key ? "K" : "V", g, t, fmt_row(F, pg, key, g, t)[hd / 2] >> 4);
            if (key) {
                for (int tg = 0; tg < F->kg; tg++)
                    for (int d = 0; d < hd; d++) {
                        const int t0 = tg * G, n = ps - t0 < G ? ps - t0 : G;
                        for (int i = 0; i < n; i++) {
                            gx[i] = x[((size_t)(t0 + i) * kvh + g) * hd + d];
                            gq[i] = fmt_q(F, fmt_row(F, pg, 1, g, t0 + i), d);
                            gl[i] = lib[(size_t)(t0 + i) * hd + d];
                        }
                        const uint64_t at = (((uint64_t)g * F->kg + (uint64_t)tg) * hd + (uint64_t)d) * 2;
                        snprintf(where, sizeof where, "page %u K head %d tokens %d..%d channel %d", id, g, t0,
                                 t0 + n - 1, d);
                        check_group(F, gx, gq, gl, n, rd16(pg + F->ks + at), rd16(pg + F->kz + at), 1, es, &bad,
                                    where);
                    }
            } else {
                for (int t = 0; t < ps; t++)
                    for (int vg = 0; vg < F->vg; vg++) {
                        const int d0 = vg * G, n = hd - d0 < G ? hd - d0 : G;
                        const unsigned char *row = fmt_row(F, pg, 0, g, t);
                        for (int i = 0; i < n; i++) {
                            gx[i] = x[((size_t)t * kvh + g) * hd + d0 + i];
                            gq[i] = fmt_q(F, row, d0 + i);
                            gl[i] = lib[(size_t)t * hd + d0 + i];
                        }
                        const uint64_t at = (((uint64_t)g * ps + (uint64_t)t) * F->vg + (uint64_t)vg) * 2;
                        snprintf(where, sizeof where, "page %u V head %d token %d channels %d..%d", id, g, t, d0,
                                 d0 + n - 1);
                        check_group(F, gx, gq, gl, n, rd16(pg + F->vs + at), rd16(pg + F->vz + at), 0, es, &bad,
                                    where);
                    }
            }
        }
    }
    /* alignment gap after the data and the tail padding are zero (deterministic pages) */
    for (uint64_t b = F->data; b < F->kmin; b++)
        if (pg[b])
            note_bad(&bad, &bad.pad, "page %u: byte %llu (gap before the bounds) is 0x%02x", id,
                     (unsigned long long)b, pg[b]);
    for (uint64_t b = F->end; b < F->page; b++)
        if (pg[b])
            note_bad(&bad, &bad.pad, "page %u: byte %llu (tail padding) is 0x%02x", id, (unsigned long long)b,
                     pg[b]);
    free(lib);
    free(gx);
    free(gl);
    free(gq);
    int ok = 1;
    ok &= CHECKF(bad.layout == 0, "%s: %s", what, bad.first);
    ok &= CHECKF(bad.bounds == 0, "%s: %ld bound mismatches; first: %s", what, bad.bounds, bad.first);
    ok &= CHECKF(bad.zero == 0, "%s: %ld zero points wrong; first: %s", what, bad.zero, bad.first);
    ok &= CHECKF(bad.scale == 0, "%s: %ld scales wrong; first: %s", what, bad.scale, bad.first);
    ok &= CHECKF(bad.q == 0, "%s: %ld quantized values wrong; first: %s", what, bad.q, bad.first);
    ok &= CHECKF(bad.deq == 0, "%s: %ld dequantized values differ; first: %s", what, bad.deq, bad.first);
    ok &= CHECKF(bad.err == 0, "%s: %ld values off by more than half a step; first: %s", what, bad.err, bad.first);
    ok &= CHECKF(bad.pad == 0, "%s: %ld padding bytes set; first: %s", what, bad.pad, bad.first);
    return ok;
}

/* An open page: rows hold the f16 of the inputs (bits), bounds are min / max of those. */
static int verify_open_page(const pikv_cache *c, uint32_t id, int rows, const float *in_k, const float *in_v,
                            const char *what)
{
    const int kvh = c->params.n_kv_heads, hd = c->params.head_dim;
    long bad = 0, bad_bounds = 0;
    char first[200] = "";
    if (c->pages[id].quant || c->pages[id].n_tokens != rows)
        return CHECKF(0, "%s: page %u: quant %d, %d rows, expected an open page of %d rows", what, id,
                      c->pages[id].quant, c->pages[id].n_tokens, rows);
    float *fk = tu_xmalloc((size_t)rows * kvh * hd * sizeof(float));
    for (int t = 0; t < rows; t++)
        for (int g = 0; g < kvh; g++)
            for (int d = 0; d < hd; d++) {
                const size_t i = ((size_t)t * kvh + g) * hd + d;
                const uint16_t wk = tu_f32_to_f16_bits(in_k[i]), wv = tu_f32_to_f16_bits(in_v[i]);
                const uint16_t gk = open_bits(c, id, g, t, 1, d), gv = open_bits(c, id, g, t, 0, d);
                fk[i] = tu_f16_to_f32(wk);
                if (gk != wk || gv != wv) {
                    if (!bad++)
                        snprintf(first, sizeof first, "row %d head %d channel %d: K 0x%04x V 0x%04x, expected "
                                 "0x%04x 0x%04x", t, g, d, gk, gv, wk, wv);
                }
            }
    const unsigned char *pg = page_at(c, id);
    for (int g = 0; g < kvh; g++)
        for (int d = 0; d < hd; d++) {
            float lo, hi, glo, ghi;
            minmax(fk + (size_t)g * hd + d, rows, kvh * hd, &lo, &hi);
            memcpy(&glo, pg + c->layout.kmin_offset + 4 * ((size_t)g * hd + d), 4);
            memcpy(&ghi, pg + c->layout.kmax_offset + 4 * ((size_t)g * hd + d), 4);
            if (fbits(glo) != fbits(lo) || fbits(ghi) != fbits(hi))
                bad_bounds++;
        }
    free(fk);
    int ok = CHECKF(bad == 0, "%s: open page %u: %ld f16 values differ from the inputs; first: %s", what, id, bad,
                    first);
    ok &= CHECKF(bad_bounds == 0, "%s: open page %u: %ld bounds differ from the f16 keys' min/max", what, id,
                 bad_bounds);
    return ok;
}

/* Gathers a page's rows from a model sequence (inputs), by the page's token indices. */
static void page_inputs(const pikv_cache *c, uint32_t id, const tu_seq *s, int use_f16, float *k, float *v)
{
    const int kvh = c->params.n_kv_heads, hd = c->params.head_dim;
    const size_t row = (size_t)kvh * hd;
    for (int r = 0; r < c->pages[id].n_tokens; r++) {
        const int64_t t = tok_of(c, id, r);
        memcpy(k + (size_t)r * row, (use_f16 ? s->ks : s->k) + (size_t)t * row, row * sizeof(float));
        memcpy(v + (size_t)r * row, (use_f16 ? s->vs : s->v) + (size_t)t * row, row * sizeof(float));
    }
}

/* Every page of every live sequence of the model, quantized or open, against the inputs;
   also that the pages hold each token of the sequence exactly once. */
static void verify_all_pages(const pikv_cache *c, const tu_model *m, const qfmt *F, errsum *es, const char *what)
{
    const int ps = c->params.page_size;
    const size_t row = (size_t)m->nkv * m->hd;
    float *k = tu_xmalloc((size_t)ps * row * sizeof(float)), *v = tu_xmalloc((size_t)ps * row * sizeof(float));
    float *ik = tu_xmalloc((size_t)ps * row * sizeof(float)), *iv = tu_xmalloc((size_t)ps * row * sizeof(float));
    uint32_t *ids = tu_xmalloc(4096 * sizeof(uint32_t));
    char buf[200];
    for (int l = 0; l < m->nl; l++)
        for (int s = 0; s < m->max_seq; s++) {
            if (!m->live[s])
                continue;
            const tu_seq *ms = tu_model_seq(m, l, s);
            const int n = seq_pages(c, s, l, ids, NULL, 4096);
            if (!CHECK(n <= 4096))
                continue;
            uint8_t *seen = tu_xcalloc((size_t)ms->n + 1, 1);
            long bad_cover = 0;
            for (int j = 0; j < n; j++) {
                const uint32_t id = ids[j];
                for (int r = 0; r < c->pages[id].n_tokens; r++) {
                    const int64_t t = tok_of(c, id, r);
                    if (t < 0 || t >= ms->n || seen[t]++)
                        bad_cover++;
                }
                if (bad_cover)
                    continue;
                snprintf(buf, sizeof buf, "%s: layer %d seq %d page %d (id %u)", what, l, s, j, id);
                if (c->pages[id].quant) {
                    page_inputs(c, id, ms, 1, k, v);
                    verify_qpage(c, F, id, k, v, es, buf);
                } else {
                    page_inputs(c, id, ms, 0, ik, iv);
                    verify_open_page(c, id, c->pages[id].n_tokens, ik, iv, buf);
                }
            }
            for (int64_t t = 0; t < ms->n; t++)
                bad_cover += !seen[t];
            CHECKF(bad_cover == 0, "%s: layer %d seq %d: pages do not hold tokens 0..%lld once each", what, l, s,
                   (long long)ms->n - 1);
            free(seen);
        }
    free(k);
    free(v);
    free(ik);
    free(iv);
    free(ids);
}

/* ------------------------------------------------------------------------ */
/* Attention oracle                                                          */
/* ------------------------------------------------------------------------ */

typedef struct oracle_tot {
    long calls, queries, mixed_calls, quant_reads, open_reads, selected_subset;
    double max_err, max_lse;
} oracle_tot;
static oracle_tot g_or;

/* Dense attention of one query head in double over n rows K, V [n][hd]. */
static void ref_head(int n, int hd, double scale, const float *qh, const float *K, const float *V, double *o,
                     double *lse)
{
    for (int d = 0; d < hd; d++)
        o[d] = 0.0;
    if (n == 0) {
        *lse = -INFINITY;
        return;
    }
    double *s = tu_xmalloc((size_t)n * sizeof(double));
    double mx = -INFINITY, sum = 0.0;
    for (int t = 0; t < n; t++) {
        double acc = 0.0;
        for (int d = 0; d < hd; d++)
            acc += (double)qh[d] * (double)K[(size_t)t * hd + d];
        s[t] = acc * scale;
        mx = s[t] > mx ? s[t] : mx;
    }
    for (int t = 0; t < n; t++) {
        const double w = exp(s[t] - mx);
        sum += w;
        for (int d = 0; d < hd; d++)
            o[d] += w * (double)V[(size_t)t * hd + d];
    }
    for (int d = 0; d < hd; d++)
        o[d] /= sum;
    *lse = mx + log(sum);
    free(s);
}

/* The top-1 experts of a page's rows as a mask (bit e mod 64), from the model. */
static uint64_t page_mask(const pikv_cache *c, uint32_t id, const tu_seq *s, int ept)
{
    uint64_t mask = 0;
    for (int r = 0; r < c->pages[id].n_tokens; r++)
        mask |= 1ull << (s->ex[(size_t)tok_of(c, id, r) * ept] % 64);
    return mask;
}

/*
 * Attends (layer; queries seqs/q/qex; sel may be NULL = exact) and compares with dense
 * attention in double over the rows of exactly the pages each (query, KV head) should read.
 * The pages' rows are read back (read_row). Selection is recomputed here: candidates in
 * shard / ring order, forced = holds a sink or recent token, EXPERTS keeps the query's
 * top-k shards (HASH: pages whose rows' experts meet them), QUEST keeps the best-scoring
 * non-forced pages (float Quest bound over the model's f16 keys) within the budget.
 */
static void oracle_check(pikv_cache *c, const tu_model *m, int layer, int nq, const int32_t *seqs, const float *q,
                         const int32_t *qex, const pikv_select_params *sel, const char *what)
{
    const pikv_cache_params *p = &c->params;
    const int kvh = p->n_kv_heads, nqh = p->n_q_heads, hd = p->head_dim, G = nqh / kvh, ept = p->experts_per_token;
    const size_t per = (size_t)nqh * hd;
    pikv_select_params all;
    memset(&all, 0, sizeof all); /* exact mode */
    if (!sel)
        sel = &all;
    enum { CAP = 4096 };
    uint32_t *ids = tu_xmalloc(CAP * sizeof(uint32_t));
    int32_t *shards = tu_xmalloc(CAP * sizeof(int32_t));
    uint8_t *forced = tu_xmalloc(CAP);
    float *scores = tu_xmalloc(CAP * sizeof(float));
    int *order = tu_xmalloc(CAP * sizeof(int));
    /* lists[(i * kvh + g)]: page ids */
    uint32_t **lists = tu_xcalloc((size_t)nq * kvh, sizeof(uint32_t *));
    int *list_n = tu_xcalloc((size_t)nq * kvh, sizeof(int));
    int64_t exp_entries = 0, exp_tokens = 0;
    double exp_bytes[PIKV_MAX_DEVICES] = {0};
    int64_t exp_scored[PIKV_MAX_DEVICES] = {0};
    const double row_bytes = 2.0 * (double)c->layout.row_bytes;
    const double qrow_bytes = 2.0 * (double)c->qlayout.row_bytes +
                              (double)c->qlayout.scale_bytes / ((double)kvh * c->qlayout.page_size);
    long quant_reads = 0, open_reads = 0, subset = 0;
    for (int i = 0; i < nq; i++) {
        const pikv_seq_layer *sl = &c->seqs[seqs[i]].layers[layer];
        const tu_seq *ms = m ? tu_model_seq(m, layer, seqs[i]) : NULL;
        int n = seq_pages(c, seqs[i], layer, ids, shards, CAP);
        if (!CHECK(n <= CAP))
            n = CAP;
        int nc = 0;
        int64_t forced_tokens = 0;
        /* candidates */
        for (int j = 0; j < n; j++) {
            const uint32_t id = ids[j];
            const pikv_page_meta *pm = &c->pages[id];
            const int fz = pm->n_tokens > 0 && (tok_of(c, id, 0) < sel->sink_tokens ||
                                                tok_of(c, id, pm->n_tokens - 1) >= sl->next_index - sel->recent_tokens);
            if (!fz && (sel->mode & PIKV_SELECT_EXPERTS) && p->n_experts > 1) {
                const int k = sel->experts_top_k > 0 ? sel->experts_top_k : ept;
                int want = 0;
                for (int e = 0; e < k; e++) {
                    const int32_t qe = qex[(size_t)i * ept + e];
                    if (p->placement == PIKV_PLACEMENT_HASH)
                        want |= (int)((page_mask(c, id, ms, ept) >> (qe % 64)) & 1u);
                    else
                        want |= qe == shards[j];
                }
                if (!want)
                    continue;
            }
            ids[nc] = id;
            forced[nc] = (uint8_t)fz;
            if (fz)
                forced_tokens += pm->n_tokens;
            nc++;
        }
        if (sel->mode & PIKV_SELECT_QUEST)
            for (int k = 0; k < nc; k++)
                if (!forced[k])
                    exp_scored[c->pages[ids[k]].dev]++;
        for (int g = 0; g < kvh; g++) {
            uint32_t *lst = tu_xmalloc((size_t)(nc ? nc : 1) * sizeof(uint32_t));
            int ln = 0;
            if (!(sel->mode & PIKV_SELECT_QUEST)) {
                for (int k = 0; k < nc; k++)
                    lst[ln++] = ids[k];
            } else {
                int no = 0;
                for (int k = 0; k < nc; k++) {
                    if (forced[k]) {
                        lst[ln++] = ids[k];
                        continue;
                    }
                    /* Quest bound in float, the score op's operations */
                    const uint32_t id = ids[k];
                    const int rows = c->pages[id].n_tokens;
                    float best = -INFINITY;
                    float lo[1024], hi[1024];
                    for (int d = 0; d < hd; d++) {
                        const float *x0 = ms->ks + ((size_t)tok_of(c, id, 0) * kvh + g) * hd + d;
                        lo[d] = hi[d] = *x0;
                        for (int r = 1; r < rows; r++) {
                            const float x = ms->ks[((size_t)tok_of(c, id, r) * kvh + g) * hd + d];
                            lo[d] = x < lo[d] ? x : lo[d];
                            hi[d] = x > hi[d] ? x : hi[d];
                        }
                    }
                    for (int h = 0; h < G; h++) {
                        const float *qh = q + (size_t)i * per + ((size_t)g * G + h) * hd;
                        float bound = 0.0f;
                        for (int d = 0; d < hd; d++) {
                            const float x = qh[d] * lo[d], y = qh[d] * hi[d];
                            bound += x > y ? x : y;
                        }
                        best = bound > best ? bound : best;
                    }
                    scores[k] = best;
                    order[no++] = k;
                }
                /* score descending, then candidate order (stable insertion sort) */
                for (int a = 1; a < no; a++) {
                    const int x = order[a];
                    int b = a - 1;
                    while (b >= 0 && (scores[order[b]] < scores[x] || (scores[order[b]] == scores[x] && order[b] > x))) {
                        order[b + 1] = order[b];
                        b--;
                    }
                    order[b + 1] = x;
                }
                int64_t left = sel->token_budget - forced_tokens;
                if (left < 0)
                    left = 0;
                for (int a = 0; a < no; a++) {
                    const int rows = c->pages[ids[order[a]]].n_tokens;
                    if (rows <= left) {
                        left -= rows;
                        lst[ln++] = ids[order[a]];
                    }
                }
                subset += ln < nc;
            }
            for (int k = 0; k < ln; k++) {
                const pikv_page_meta *pm = &c->pages[lst[k]];
                exp_entries++;
                exp_tokens += pm->n_tokens;
                exp_bytes[pm->dev] += pm->n_tokens * (pm->quant ? qrow_bytes : row_bytes);
                if (pm->quant)
                    quant_reads++;
                else
                    open_reads++;
            }
            lists[(size_t)i * kvh + g] = lst;
            list_n[(size_t)i * kvh + g] = ln;
        }
    }
    float *out = tu_xmalloc((size_t)nq * per * sizeof(float));
    float *lse = tu_xmalloc((size_t)nq * nqh * sizeof(float));
    for (size_t x = 0; x < (size_t)nq * per; x++)
        out[x] = NAN;
    for (size_t x = 0; x < (size_t)nq * nqh; x++)
        lse[x] = NAN;
    pikv_attend_batch b;
    memset(&b, 0, sizeof b);
    b.n_queries = nq;
    b.seq_ids = seqs;
    b.q = q;
    b.experts = qex;
    b.out = out;
    b.lse = lse;
    b.select = sel;
    pikv_status st = pikv_cache_attend(c, layer, &b);
    if (CHECKF(st == PIKV_OK, "%s: attend returned %s: %s", what, pikv_status_name(st),
               pikv_context_last_error(pikv_cache_context(c)))) {
        double worst = 0.0, worst_lse = 0.0;
        int worst_q = -1;
        double *ro = tu_xmalloc(per * sizeof(double)), *rl = tu_xmalloc((size_t)nqh * sizeof(double));
        for (int i = 0; i < nq; i++) {
            for (int g = 0; g < kvh; g++) {
                const uint32_t *lst = lists[(size_t)i * kvh + g];
                int rows = 0;
                for (int k = 0; k < list_n[(size_t)i * kvh + g]; k++)
                    rows += c->pages[lst[k]].n_tokens;
                float *K = tu_xmalloc((size_t)(rows ? rows : 1) * hd * sizeof(float));
                float *V = tu_xmalloc((size_t)(rows ? rows : 1) * hd * sizeof(float));
                int at = 0;
                for (int k = 0; k < list_n[(size_t)i * kvh + g]; k++)
                    for (int r = 0; r < c->pages[lst[k]].n_tokens; r++, at++) {
                        read_row(c, lst[k], g, r, 1, K + (size_t)at * hd);
                        read_row(c, lst[k], g, r, 0, V + (size_t)at * hd);
                    }
                for (int h = g * G; h < (g + 1) * G; h++)
                    ref_head(rows, hd, 1.0 / sqrt((double)hd), q + (size_t)i * per + (size_t)h * hd, K, V,
                             ro + (size_t)h * hd, rl + h);
                free(K);
                free(V);
            }
            const double e = tu_norm_err(out + (size_t)i * per, ro, per);
            if (!(e <= worst)) {
                worst = e;
                worst_q = i;
            }
            for (int h = 0; h < nqh; h++) {
                const float l = lse[(size_t)i * nqh + h];
                double d;
                if (rl[h] == -INFINITY)
                    d = (isinf(l) && l < 0) ? 0.0 : INFINITY;
                else
                    d = isfinite(l) ? fabs((double)l - rl[h]) / fmax(1.0, fabs(rl[h])) : INFINITY;
                worst_lse = d > worst_lse || d != d ? d : worst_lse;
            }
        }
        CHECKF(worst <= TU_TOL_EXACT, "%s: normalized error %.3g (query %d) vs dense attention over the read pages",
               what, worst, worst_q);
        CHECKF(worst_lse <= TU_TOL_LSE, "%s: lse error %.3g", what, worst_lse);
        g_or.max_err = worst > g_or.max_err ? worst : g_or.max_err;
        g_or.max_lse = worst_lse > g_or.max_lse ? worst_lse : g_or.max_lse;
        free(ro);
        free(rl);
        /* reads in the stats */
        pikv_cache_stats cs;
        if (CHECK_OK(pikv_cache_get_stats(c, &cs))) {
            CHECKF(cs.last_pages_read == exp_entries / kvh && cs.last_tokens_read == exp_tokens / kvh,
                   "%s: last_pages_read %lld last_tokens_read %lld, expected %lld %lld", what,
                   (long long)cs.last_pages_read, (long long)cs.last_tokens_read, (long long)(exp_entries / kvh),
                   (long long)(exp_tokens / kvh));
            double want = 0.0;
            for (int d = 0; d < c->n_devs; d++)
                want += (double)(uint64_t)(exp_bytes[d] + 0.5) +
                        (double)exp_scored[d] * 2.0 * kvh * hd * sizeof(float);
            CHECKF(fabs((double)cs.last_bytes_read - want) <= c->n_devs, "%s: last_bytes_read %llu, expected %.0f",
                   what, (unsigned long long)cs.last_bytes_read, want);
        }
        g_or.calls++;
        g_or.queries += nq;
        g_or.quant_reads += quant_reads;
        g_or.open_reads += open_reads;
        g_or.mixed_calls += quant_reads > 0 && open_reads > 0;
        g_or.selected_subset += subset;
    }
    for (size_t x = 0; x < (size_t)nq * kvh; x++)
        free(lists[x]);
    free(lists);
    free(list_n);
    free(out);
    free(lse);
    free(ids);
    free(shards);
    free(forced);
    free(scores);
    free(order);
}

/* ------------------------------------------------------------------------ */
/* Test data                                                                 */
/* ------------------------------------------------------------------------ */

enum { D_RANDOM, D_CONST, D_OUTLIER, D_EXTREME, D_TINY, D_MIXED, D_OFFSET, D_TWOVAL, D_COUNT };
static const char *const k_kind_names[D_COUNT] = {"random", "constant", "outliers", "near +-65504",
                                                  "tiny/subnormal", "mixed signs 1e-7..6e4", "offset",
                                                  "two-valued"};

static float sgn(tu_rng *r) { return tu_int(r, 0, 1) ? 1.0f : -1.0f; }

/* Fills K and V [n][kvh][hd] of a dataset kind, with the groups of page size ps and
   group size G (outliers: one huge value per key group and per value group). */
static void gen_data(tu_rng *r, int kind, int n, int kvh, int hd, int ps, int G, float *K, float *V)
{
    const size_t row = (size_t)kvh * hd, nv = (size_t)n * row;
    const float offset = tu_int(r, 0, 1) ? 1000.0f : -30000.0f, wiggle = (float)(0.5 + 4.0 * tu_unif(r));
    const float amp = (float)pow(10.0, 4.0 * tu_unif(r) - 2.0);
    for (int pass = 0; pass < 2; pass++) {
        float *X = pass == 0 ? K : V;
        for (size_t i = 0; i < nv; i++) {
            float x = 0.0f;
            switch (kind) {
            case D_RANDOM: x = tu_sym(r, amp); break;
            case D_EXTREME:
                x = tu_int(r, 0, 4) == 0 ? sgn(r) * 65504.0f : sgn(r) * (float)(60000.0 + 5504.0 * tu_unif(r));
                break;
            case D_TINY: {
                const int64_t u = tu_int(r, 0, 9);
                if (u == 0)
                    x = sgn(r) * (float)ldexp((double)tu_int(r, 0, 8), -24); /* exact subnormal f16 */
                else if (u == 1)
                    x = sgn(r) * (float)ldexp(tu_unif(r), -25); /* rounds to +-0 */
                else
                    x = sgn(r) * (float)(tu_unif(r) * ldexp(1.5, -14)); /* subnormal / smallest normals */
                break;
            }
            case D_MIXED: {
                double v = pow(10.0, -7.0 + 11.8 * tu_unif(r));
                x = sgn(r) * (float)(v > 65504.0 ? 65504.0 : v);
                break;
            }
            case D_OFFSET: x = offset + tu_sym(r, wiggle); break;
            case D_OUTLIER: x = tu_sym(r, 1.0f); break;
            default: break;
            }
            X[i] = x;
        }
    }
    if (kind == D_CONST || kind == D_TWOVAL) {
        /* keys: channel (g, d) takes a[g][d] (or b[g][d]) in every token; values: token t's
           row takes a[t][g] (or b[t][g]) in every channel */
        float *ka = tu_xmalloc(row * sizeof(float)), *kb = tu_xmalloc(row * sizeof(float));
        for (size_t i = 0; i < row; i++) {
            ka[i] = tu_int(r, 0, 5) == 0 ? 0.0f : tu_sym(r, 100.0f);
            kb[i] = tu_sym(r, 100.0f);
        }
        for (int t = 0; t < n; t++)
            for (size_t i = 0; i < row; i++)
                K[(size_t)t * row + i] = (kind == D_CONST || tu_int(r, 0, 1)) ? ka[i] : kb[i];
        for (int t = 0; t < n; t++)
            for (int g = 0; g < kvh; g++) {
                const float a = tu_int(r, 0, 5) == 0 ? 0.0f : tu_sym(r, 100.0f), b = tu_sym(r, 100.0f);
                for (int d = 0; d < hd; d++)
                    V[((size_t)t * kvh + g) * hd + d] = (kind == D_CONST || tu_int(r, 0, 1)) ? a : b;
            }
        free(ka);
        free(kb);
    }
    if (kind == D_OUTLIER) {
        for (int p0 = 0; p0 < n; p0 += ps)
            for (int t0 = p0; t0 < p0 + ps && t0 < n; t0 += G)
                for (int g = 0; g < kvh; g++)
                    for (int d = 0; d < hd; d++) {
                        int len = G;
                        if (t0 + len > p0 + ps)
                            len = p0 + ps - t0;
                        if (t0 + len > n)
                            len = n - t0;
                        const int t = t0 + (int)tu_int(r, 0, len - 1);
                        K[((size_t)t * kvh + g) * hd + d] = sgn(r) * (float)(2000.0 + 63504.0 * tu_unif(r));
                    }
        for (int t = 0; t < n; t++)
            for (int g = 0; g < kvh; g++)
                for (int d0 = 0; d0 < hd; d0 += G) {
                    const int len = hd - d0 < G ? hd - d0 : G;
                    V[((size_t)t * kvh + g) * hd + d0 + (int)tu_int(r, 0, len - 1)] =
                        sgn(r) * (float)(2000.0 + 63504.0 * tu_unif(r));
                }
    }
}

static pikv_cache_params base_params(pikv_dtype dt)
{
    pikv_cache_params p = pikv_cache_default_params();
    p.n_layers = 1;
    p.n_q_heads = 2;
    p.n_kv_heads = 1;
    p.head_dim = 8;
    p.n_experts = 1;
    p.experts_per_token = 1;
    p.page_size = 4;
    p.dtype = dt;
    p.quant_group = 4;
    p.capacity_tokens = 1 << 20;
    p.max_sequences = 16;
    p.select.sink_tokens = 0;
    p.select.recent_tokens = 0;
    return p;
}

static const char *dt_name(pikv_dtype dt)
{
    return dt == PIKV_DTYPE_INT4 ? "int4" : dt == PIKV_DTYPE_INT8 ? "int8" : dt == PIKV_DTYPE_F16 ? "f16" : "f32";
}

/* Appends n tokens K, V (experts may be NULL for dense) in chunks of random size. */
static int append_chunks(pikv_cache *c, tu_model *m, tu_rng *r, int layer, int seq, int n, const float *K,
                         const float *V, const int32_t *ex, int max_chunk)
{
    const size_t row = (size_t)c->params.n_kv_heads * c->params.head_dim;
    const int ept = c->params.experts_per_token;
    for (int done = 0; done < n;) {
        int k = (int)tu_int(r, 1, max_chunk);
        if (k > n - done)
            k = n - done;
        pikv_status st = pikv_cache_append(c, layer, seq, k, K + (size_t)done * row, V + (size_t)done * row, NULL,
                                           ex ? ex + (size_t)done * ept : NULL);
        if (!CHECKF(st == PIKV_OK, "append %d tokens at %d: %s: %s", k, done, pikv_status_name(st),
                    pikv_context_last_error(pikv_cache_context(c))))
            return 0;
        if (m)
            tu_model_push(m, layer, seq, k, K + (size_t)done * row, V + (size_t)done * row,
                          ex ? ex + (size_t)done * ept : NULL);
        done += k;
    }
    return 1;
}

/* A model that keeps the f16 of the inputs as "stored" values. */
static void model_init(tu_model *m, const pikv_cache_params *p)
{
    tu_model_init(m, p);
    m->f16 = 1;
}

/* ------------------------------------------------------------------------ */
/* 1. Round trip: format, error bound, error stats                           */
/* ------------------------------------------------------------------------ */

typedef struct rt_tot {
    long cases, pages, values, const_groups, groups, odd_hd, group_gt_page, group_gt_head, page_not_multiple;
    double worst_excess;
} rt_tot;

static void roundtrip_case(pikv_dtype dt, int ps, int kvh, int hd, int G, int kind, int n_full, int extra,
                           uint64_t seed, rt_tot *tot)
{
    tu_set_case("roundtrip %s ps %d kvh %d hd %d group %d data %s pages %d+%d seed %llu", dt_name(dt), ps, kvh, hd, G,
                k_kind_names[kind], n_full, extra, (unsigned long long)seed);
    tu_rng r = tu_rng_seed(seed);
    pikv_cache_params p = base_params(dt);
    p.page_size = ps;
    p.n_kv_heads = kvh;
    p.n_q_heads = kvh;
    p.head_dim = hd;
    p.quant_group = G;
    pikv_cache *c = NULL;
    if (!CHECK_OK(pikv_cache_create(g_ctx[1], &p, &c)))
        return;
    const qfmt F = qfmt_make(ps, kvh, hd, dt, G);
    check_layout(c, &F);
    pikv_layer_stats ls;
    if (CHECK_OK(pikv_cache_get_layer_stats(c, 0, &ls)))
        CHECK(ls.key_rel_error == 0.0 && ls.value_rel_error == 0.0 && ls.max_abs_error == 0.0 &&
              ls.quantized_pages == 0);
    tu_model m;
    model_init(&m, &p);
    CHECK_OK(pikv_seq_add(c, 0));
    const int n = n_full * ps + extra;
    const size_t row = (size_t)kvh * hd;
    float *K = tu_xmalloc((size_t)n * row * sizeof(float)), *V = tu_xmalloc((size_t)n * row * sizeof(float));
    gen_data(&r, kind, n, kvh, hd, ps, G, K, V);
    if (append_chunks(c, &m, &r, 0, 0, n, K, V, NULL, 2 * ps + 1)) {
        errsum es;
        memset(&es, 0, sizeof es);
        verify_all_pages(c, &m, &F, &es, "roundtrip");
        CHECK_EQ(es.pages, n_full);
        /* the layer's reconstruction error: this file's sums over the same pages */
        if (CHECK_OK(pikv_cache_get_layer_stats(c, 0, &ls))) {
            const double ke = es.kss > 0 ? sqrt(es.kerr / es.kss) : 0.0, ve = es.vss > 0 ? sqrt(es.verr / es.vss) : 0.0;
            CHECKF(fabs(ls.key_rel_error - ke) <= 1e-9 * ke && fabs(ls.value_rel_error - ve) <= 1e-9 * ve,
                   "key_rel_error %.17g value_rel_error %.17g, computed %.17g %.17g", ls.key_rel_error,
                   ls.value_rel_error, ke, ve);
            CHECKF(ls.max_abs_error == es.maxerr, "max_abs_error %.17g, computed %.17g", ls.max_abs_error, es.maxerr);
            CHECK_EQ(ls.quantized_pages, n_full);
            if (kind == D_CONST && n_full > 0)
                CHECKF(ls.key_rel_error == 0.0 && ls.value_rel_error == 0.0 && ls.max_abs_error == 0.0,
                       "constant groups must reconstruct exactly: %g %g %g", ls.key_rel_error, ls.value_rel_error,
                       ls.max_abs_error);
        }
        tot->pages += es.pages;
        tot->values += es.values;
        tot->const_groups += es.const_groups;
        tot->groups += es.groups;
        tot->worst_excess = es.worst_excess > tot->worst_excess ? es.worst_excess : tot->worst_excess;
    }
    tot->cases++;
    tot->odd_hd += hd & 1;
    tot->group_gt_page += G > ps;
    tot->group_gt_head += G > hd;
    tot->page_not_multiple += ps % G != 0 && G < ps;
    free(K);
    free(V);
    tu_model_free(&m);
    pikv_cache_free(c);
}

/* The rounding midpoint: int4 value group {-1500, 300, 0x1.3p-17} (f16 values): zero -1500,
   scale 1800 / 15 = 120 (exact). x - zero = 1500.0000091 rounds to 1500 in f32, 1500 / 120 =
   12.5 exactly, rint gives 12 (half to even): x' = -60, |x' - x| = 60 + 0x1.3p-17, past
   scale / 2 by the rounding of x - zero (well within 1 ulp of 1500). The f32 arithmetic is the
   specification, so q must be 12. */
static void test_midpoint(void)
{
    tu_set_case("rounding midpoint");
    pikv_cache_params p = base_params(PIKV_DTYPE_INT4);
    p.page_size = 1;
    p.n_q_heads = 1;
    p.head_dim = 3;
    p.quant_group = 3;
    pikv_cache *c = NULL;
    if (!CHECK_OK(pikv_cache_create(g_ctx[1], &p, &c)))
        return;
    const float K[3] = {1.0f, 2.0f, 3.0f}, V[3] = {-1500.0f, 300.0f, 0x1.3p-17f};
    CHECK_OK(pikv_seq_add(c, 0));
    if (CHECK_OK(pikv_cache_append(c, 0, 0, 1, K, V, NULL, NULL))) {
        uint32_t id = 0;
        seq_pages(c, 0, 0, &id, NULL, 1);
        const qfmt F = qfmt_make(1, 1, 3, PIKV_DTYPE_INT4, 3);
        errsum es;
        memset(&es, 0, sizeof es);
        verify_qpage(c, &F, id, K, V, &es, "midpoint page");
        float out[3];
        fmt_decode_row(&F, page_at(c, id), 0, 0, 0, out);
        CHECKF(out[2] == -60.0f && fmt_q(&F, fmt_row(&F, page_at(c, id), 0, 0, 0), 2) == 12,
               "x' = %a, expected -60 (q 12)", (double)out[2]);
        pikv_layer_stats ls;
        if (CHECK_OK(pikv_cache_get_layer_stats(c, 0, &ls)))
            CHECKF(ls.max_abs_error == 60.0 + 0x1.3p-17, "max_abs_error %.17g, expected 60 + 2^-17 * 1.1875",
                   ls.max_abs_error);
        printf("midpoint: |x' - x| - scale/2 = %.3g (x = 0x1.3p-17, zero -1500, scale 120)\n",
               fabs((double)out[2] - 0x1.3p-17) - 60.0);
    }
    pikv_cache_free(c);
}

static void test_roundtrip(void)
{
    rt_tot tot;
    memset(&tot, 0, sizeof tot);
    /* geometries chosen for their edges: odd head dims, groups larger than the page and the
       head, pages not a multiple of the group, group 1 (every value its own group) */
    static const int geo[][4] = {/* ps, kvh, hd, G */
                                 {4, 1, 8, 4},    {16, 2, 64, 32}, {5, 1, 7, 3},   {1, 1, 1, 1},
                                 {3, 2, 3, 1024}, {8, 1, 65, 16},  {33, 1, 16, 8}, {6, 3, 9, 4},
                                 {2, 1, 128, 64}, {7, 2, 1, 2},    {16, 1, 33, 5}, {12, 1, 128, 100}};
    const int n_geo = (int)(sizeof geo / sizeof geo[0]);
    uint64_t seed = 1000;
    for (int kind = 0; kind < D_COUNT; kind++)
        for (int dti = 0; dti < 2; dti++)
            for (int gi = 0; gi < n_geo; gi++) {
                tu_rng r = tu_rng_seed(++seed * 31337u);
                const int ps = geo[gi][0];
                const int n_full = (int)tu_int(&r, 1, 3), extra = ps > 1 ? (int)tu_int(&r, 0, ps - 1) : 0;
                roundtrip_case(dti ? PIKV_DTYPE_INT4 : PIKV_DTYPE_INT8, ps, geo[gi][1], geo[gi][2], geo[gi][3], kind,
                               n_full, extra, seed, &tot);
            }
    /* random geometries */
    const char *env = getenv("PIKV_QUANT_CASES");
    const long n_random = env && atol(env) > 0 ? atol(env) : 1000;
    for (long i = 0; i < n_random; i++) {
        tu_rng r = tu_rng_seed(++seed * 7727u);
        static const int hds[] = {1, 2, 3, 5, 7, 8, 15, 16, 31, 65, 96};
        static const int gs[] = {1, 2, 3, 4, 5, 7, 8, 16, 31, 32, 64, 100, 1024};
        const int ps = (int)tu_int(&r, 1, 20), hd = hds[tu_int(&r, 0, 10)], G = gs[tu_int(&r, 0, 12)];
        roundtrip_case(tu_int(&r, 0, 1) ? PIKV_DTYPE_INT4 : PIKV_DTYPE_INT8, ps, (int)tu_int(&r, 1, 3), hd, G,
                       (int)tu_int(&r, 0, D_COUNT - 1), (int)tu_int(&r, 1, 3), (int)tu_int(&r, 0, ps - 1), seed, &tot);
    }
    tu_set_case("roundtrip totals");
    CHECK(tot.const_groups > 100 && tot.odd_hd > 10 && tot.group_gt_page > 10 && tot.group_gt_head > 10 &&
          tot.page_not_multiple > 10);
    printf("roundtrip: %ld caches, %ld quantized pages, %ld values, %ld groups (%ld constant); odd head dims %ld, "
           "group > page %ld, group > head %ld, page not a multiple of the group %ld; worst |x'-x| - scale/2 = "
           "%.3g ulp\n",
           tot.cases, tot.pages, tot.values, tot.groups, tot.const_groups, tot.odd_hd, tot.group_gt_page,
           tot.group_gt_head, tot.page_not_multiple, tot.worst_excess);

    /* float caches report -1 */
    for (int dti = 0; dti < 2; dti++) {
        tu_set_case("error stats of a %s cache", dti ? "f32" : "f16");
        pikv_cache_params p = base_params(dti ? PIKV_DTYPE_F32 : PIKV_DTYPE_F16);
        pikv_cache *c = NULL;
        if (!CHECK_OK(pikv_cache_create(g_ctx[1], &p, &c)))
            continue;
        tu_model m;
        model_init(&m, &p);
        tu_rng r = tu_rng_seed(77);
        CHECK_OK(pikv_seq_add(c, 0));
        CHECK_OK(tu_append_random(c, &m, &r, 0, 0, 13, 0));
        pikv_layer_stats ls;
        if (CHECK_OK(pikv_cache_get_layer_stats(c, 0, &ls)))
            CHECK(ls.key_rel_error == -1.0 && ls.value_rel_error == -1.0 && ls.max_abs_error == -1.0 &&
                  ls.quantized_pages == 0);
        pikv_cache_stats cs;
        if (CHECK_OK(pikv_cache_get_stats(c, &cs)))
            CHECK_EQ(cs.quant_page_bytes, 0);
        tu_model_free(&m);
        pikv_cache_free(c);
    }
}

/* ------------------------------------------------------------------------ */
/* 2. Attention over quantized + open pages                                  */
/* ------------------------------------------------------------------------ */

static void gen_experts(tu_rng *r, const pikv_cache_params *p, int n, int32_t *ex)
{
    for (int t = 0; t < n; t++)
        tu_pick_experts(r, p->n_experts, p->experts_per_token, 1, ex + (size_t)t * p->experts_per_token);
}

static void attend_config(int ndev, int moe, pikv_placement pl, int cfg, uint64_t seed)
{
    tu_rng r = tu_rng_seed(seed);
    static const int ratios[] = {1, 2, 4};
    static const int hds[] = {1, 3, 7, 16, 33, 64};
    static const int pss[] = {3, 5, 8, 13};
    static const int gs[] = {1, 3, 4, 8, 32, 1000};
    pikv_cache_params p = base_params(cfg & 1 ? PIKV_DTYPE_INT4 : PIKV_DTYPE_INT8);
    p.n_layers = 2;
    p.n_kv_heads = (int)tu_int(&r, 1, 3);
    p.n_q_heads = p.n_kv_heads * ratios[cfg % 3];
    p.head_dim = hds[tu_int(&r, 0, 5)];
    p.page_size = pss[tu_int(&r, 0, 3)];
    p.quant_group = gs[tu_int(&r, 0, 5)];
    p.n_experts = moe ? (int)tu_int(&r, 3, 6) : 1;
    p.experts_per_token = moe ? (int)tu_int(&r, 1, 2) : 1;
    p.placement = pl;
    if (!moe || pl == PIKV_PLACEMENT_HASH)
        p.n_shards = (int)tu_int(&r, 0, 4);
    p.max_sequences = 4;
    tu_set_case("attend cfg %d: %d devices %s placement %d: %s heads %d/%d hd %d ps %d group %d experts %d/%d "
                "shards %d seed %llu",
                cfg, ndev, moe ? "moe" : "dense", (int)pl, dt_name(p.dtype), p.n_q_heads, p.n_kv_heads, p.head_dim,
                p.page_size, p.quant_group, p.n_experts, p.experts_per_token, p.n_shards, (unsigned long long)seed);
    pikv_cache *c = NULL;
    if (!CHECK_OK(pikv_cache_create(g_ctx[ndev], &p, &c)))
        return;
    tu_model m;
    model_init(&m, &p);
    const int nseq = 3;
    const size_t row = (size_t)p.n_kv_heads * p.head_dim;
    for (int s = 0; s < nseq; s++) {
        CHECK_OK(pikv_seq_add(c, s));
        for (int l = 0; l < p.n_layers; l++) {
            int len = (int)tu_int(&r, 2 * p.page_size, 6 * p.page_size);
            if (len % p.page_size == 0)
                len++; /* an open page in every shard-block pattern */
            float *K = tu_xmalloc((size_t)len * row * sizeof(float)), *V = tu_xmalloc((size_t)len * row * sizeof(float));
            int32_t *ex = tu_xmalloc((size_t)len * p.experts_per_token * sizeof(int32_t));
            tu_fill(&r, K, (size_t)len * row, 2.0f);
            tu_fill(&r, V, (size_t)len * row, 1.0f);
            gen_experts(&r, &p, len, ex);
            append_chunks(c, &m, &r, l, s, len, K, V, ex, 2 * p.page_size + 3);
            free(K);
            free(V);
            free(ex);
        }
    }
    if (pl == PIKV_PLACEMENT_BALANCED && tu_int(&r, 0, 1))
        CHECK_OK(pikv_cache_rebalance(c, NULL));
    errsum es;
    memset(&es, 0, sizeof es);
    const qfmt F = qfmt_make(p.page_size, p.n_kv_heads, p.head_dim, p.dtype, p.quant_group);
    check_layout(c, &F);
    verify_all_pages(c, &m, &F, &es, "attend data");
    const size_t per = (size_t)p.n_q_heads * p.head_dim;
    for (int trial = 0; trial < 7; trial++) {
        const int nq = (int)tu_int(&r, 1, 4);
        int32_t seqs[4], qex[4 * 2];
        float *q = tu_xmalloc((size_t)nq * per * sizeof(float));
        for (int i = 0; i < nq; i++)
            seqs[i] = (int32_t)tu_int(&r, 0, nseq - 1);
        tu_fill(&r, q, (size_t)nq * per, (float)(0.5 + 2.5 * tu_unif(&r)));
        gen_experts(&r, &p, nq, qex);
        pikv_select_params sel = p.select;
        char what[64];
        const pikv_select_params *sp = NULL;
        if (trial > 0) {
            const uint32_t modes[3] = {PIKV_SELECT_QUEST, PIKV_SELECT_EXPERTS,
                                       PIKV_SELECT_QUEST | PIKV_SELECT_EXPERTS};
            sel.mode = modes[(trial - 1) % 3];
            if (!moe && (sel.mode & PIKV_SELECT_EXPERTS))
                sel.mode = PIKV_SELECT_QUEST;
            sel.sink_tokens = (int)tu_int(&r, 0, 4);
            sel.recent_tokens = (int)tu_int(&r, 0, 6);
            sel.token_budget = sel.sink_tokens + sel.recent_tokens + (int)tu_int(&r, 1, 3 * p.page_size);
            sel.experts_top_k = (int)tu_int(&r, 0, p.experts_per_token);
            sp = &sel;
        }
        for (int l = 0; l < p.n_layers; l++) {
            snprintf(what, sizeof what, "trial %d layer %d mode %u", trial, l, sp ? sp->mode : 0u);
            oracle_check(c, &m, l, nq, seqs, q, qex, sp, what);
        }
        free(q);
    }
    tu_model_free(&m);
    pikv_cache_free(c);
}

static void test_attend(void)
{
    memset(&g_or, 0, sizeof g_or);
    int cfg = 0;
    for (int ndev = 1; ndev <= 4; ndev++) {
        for (int rep = 0; rep < 6; rep++)
            attend_config(ndev, 0, PIKV_PLACEMENT_EXPERT, cfg, 5000u + (uint64_t)cfg * 97u), cfg++;
        for (int pl = 0; pl < 3; pl++)
            for (int rep = 0; rep < 6; rep++)
                attend_config(ndev, 1, (pikv_placement)pl, cfg, 5000u + (uint64_t)cfg * 97u), cfg++;
    }
    tu_set_case("attend totals");
    CHECK(g_or.mixed_calls > 50 && g_or.selected_subset > 20);
    printf("attend: %d caches, %ld calls (%ld reading quantized and f16 pages together), %ld queries, %ld quantized "
           "and %ld open page reads, %ld selections strictly smaller than the candidates; worst error %.3g, lse "
           "%.3g\n",
           cfg, g_or.calls, g_or.mixed_calls, g_or.queries, g_or.quant_reads, g_or.open_reads, g_or.selected_subset,
           g_or.max_err, g_or.max_lse);
}

/* ------------------------------------------------------------------------ */
/* 3. Memory                                                                 */
/* ------------------------------------------------------------------------ */

static void memory_case(int ps, int kvh, int hd, int G, int ndev, const int *lens, int nseq, double full_ratio_max4,
                        double full_ratio_max8)
{
    pikv_cache *cs[3] = {NULL, NULL, NULL}; /* f16 twin, int8, int4 */
    const pikv_dtype dts[3] = {PIKV_DTYPE_F16, PIKV_DTYPE_INT8, PIKV_DTYPE_INT4};
    tu_set_case("memory ps %d kvh %d hd %d group %d devices %d", ps, kvh, hd, G, ndev);
    tu_rng r = tu_rng_seed((uint64_t)(ps * 1000 + hd * 10 + G));
    const size_t row = (size_t)kvh * hd;
    for (int k = 0; k < 3; k++) {
        pikv_cache_params p = base_params(dts[k]);
        p.page_size = ps;
        p.n_kv_heads = kvh;
        p.n_q_heads = kvh;
        p.head_dim = hd;
        p.quant_group = G;
        if (!CHECK_OK(pikv_cache_create(g_ctx[ndev], &p, &cs[k])))
            goto done;
    }
    for (int s = 0; s < nseq; s++) {
        float *K = tu_xmalloc((size_t)lens[s] * row * sizeof(float)), *V = tu_xmalloc((size_t)lens[s] * row * sizeof(float));
        tu_fill(&r, K, (size_t)lens[s] * row, 1.0f);
        tu_fill(&r, V, (size_t)lens[s] * row, 1.0f);
        for (int k = 0; k < 3; k++) {
            tu_rng rc = tu_rng_seed((uint64_t)s);
            CHECK_OK(pikv_seq_add(cs[k], s));
            append_chunks(cs[k], NULL, &rc, 0, s, lens[s], K, V, NULL, 3 * ps);
        }
        free(K);
        free(V);
    }
    /* dense placement: blocks of ps positions dealt over the devices' shards; every block but
       a sequence's last (partial) one is full */
    int64_t full_dev[8] = {0}, open_dev[8] = {0}, n_full = 0, n_open = 0;
    for (int s = 0; s < nseq; s++)
        for (int b = 0; b * ps < lens[s]; b++) {
            const int full = (b + 1) * ps <= lens[s];
            (full ? full_dev : open_dev)[b % ndev]++;
            (full ? &n_full : &n_open)[0]++;
        }
    pikv_cache_stats st[3];
    for (int k = 0; k < 3; k++)
        if (!CHECK_OK(pikv_cache_get_stats(cs[k], &st[k])))
            goto done;
    const qfmt F16 = qfmt_make(ps, kvh, hd, PIKV_DTYPE_INT8, G);
    CHECK_EQ(st[0].page_bytes, F16.f16_page);
    CHECK_EQ(st[0].quant_page_bytes, 0);
    CHECK_EQ(st[0].pages, n_full + n_open);
    CHECK_EQ(st[0].bytes_used, (uint64_t)(n_full + n_open) * F16.f16_page);
    for (int k = 1; k < 3; k++) {
        const qfmt F = qfmt_make(ps, kvh, hd, dts[k], G);
        const double base = dts[k] == PIKV_DTYPE_INT4 ? 0.25 : 0.5;
        CHECK_EQ(st[k].tokens, st[0].tokens);
        CHECK_EQ(st[k].pages, st[0].pages);
        CHECK_EQ(st[k].page_bytes, F.f16_page);
        CHECK_EQ(st[k].quant_page_bytes, F.page);
        /* the exact size of the cache from the format */
        const uint64_t want = (uint64_t)n_full * F.page + (uint64_t)n_open * F.f16_page;
        CHECKF(st[k].bytes_used == want, "%s: bytes_used %llu, expected %lld quantized x %llu + %lld open x %llu = %llu",
               dt_name(dts[k]), (unsigned long long)st[k].bytes_used, (long long)n_full, (unsigned long long)F.page,
               (long long)n_open, (unsigned long long)F.f16_page, (unsigned long long)want);
        /* at most base of the f16 cache plus the format's overhead: per quantized page its f16
           scales and zero points, f32 bounds, at most 15 + 63 padding bytes and the int4 odd-head
           nibbles; open pages count whole */
        const uint64_t odd = 2 * (uint64_t)kvh * ps * F.row - (uint64_t)(base * (double)F.f16_data);
        const double overhead = ((double)n_full * (double)(F.scales + 2 * F.bounds + 78 + odd) +
                                 (double)n_open * (double)F.f16_page) /
                                (double)st[0].bytes_used;
        const double ratio = (double)st[k].bytes_used / (double)st[0].bytes_used;
        CHECKF(ratio <= base + overhead, "%s: %.4f of the f16 cache's bytes > %.2f + overhead %.4f", dt_name(dts[k]),
               ratio, base, overhead);
        /* full pages of the realistic geometry: the bound in numbers */
        const double full_ratio = (double)F.page / (double)F.f16_page;
        CHECKF(full_ratio <= (dts[k] == PIKV_DTYPE_INT4 ? full_ratio_max4 : full_ratio_max8),
               "%s: a quantized page is %.4f of an f16 page", dt_name(dts[k]), full_ratio);
        printf("memory: ps %d kvh %d hd %d group %d, %s: %lld quantized + %lld open pages, %llu bytes = %.4f of f16 "
               "(bound %.2f + %.4f); a full page %.4f of f16\n",
               ps, kvh, hd, G, dt_name(dts[k]), (long long)n_full, (long long)n_open,
               (unsigned long long)st[k].bytes_used, ratio, base, overhead, full_ratio);
        /* per device: the split adds up and follows the pages there */
        uint64_t sum_used = 0, sum_layer = 0;
        for (int d = 0; d < ndev; d++) {
            pikv_cache_device_stats ds;
            if (!CHECK_OK(pikv_cache_get_device_stats(cs[k], d, &ds)))
                continue;
            CHECK_EQ(ds.bytes_open_pages + ds.bytes_quant_data + ds.bytes_quant_scales + ds.bytes_quant_other,
                     ds.bytes_used);
            CHECK_EQ(ds.quantized_pages, full_dev[d]);
            CHECK_EQ(ds.pages, full_dev[d] + open_dev[d]);
            CHECK_EQ(ds.bytes_open_pages, (uint64_t)open_dev[d] * F.f16_page);
            CHECK_EQ(ds.bytes_quant_data, (uint64_t)full_dev[d] * F.data);
            CHECK_EQ(ds.bytes_quant_scales, (uint64_t)full_dev[d] * F.scales);
            CHECK_EQ(ds.bytes_quant_other, (uint64_t)full_dev[d] * (F.page - F.data - F.scales));
            CHECK(ds.bytes_allocated >= ds.bytes_used);
            sum_used += ds.bytes_used;
        }
        CHECK_EQ(sum_used, st[k].bytes_used);
        pikv_layer_stats ls;
        if (CHECK_OK(pikv_cache_get_layer_stats(cs[k], 0, &ls))) {
            sum_layer += ls.bytes_used;
            CHECK_EQ(ls.quantized_pages, n_full);
            CHECK_EQ(ls.pages, n_full + n_open);
        }
        CHECK_EQ(sum_layer, st[k].bytes_used);
    }
    /* the f16 twin reports no quantized bytes */
    for (int d = 0; d < ndev; d++) {
        pikv_cache_device_stats ds;
        if (CHECK_OK(pikv_cache_get_device_stats(cs[0], d, &ds)))
            CHECK(ds.quantized_pages == 0 && ds.bytes_quant_data == 0 && ds.bytes_quant_scales == 0 &&
                  ds.bytes_quant_other == 0 && ds.bytes_open_pages == ds.bytes_used);
    }
done:
    for (int k = 0; k < 3; k++)
        pikv_cache_free(cs[k]);
}

static void test_memory(void)
{
    /* docs/compression.md's table: ps 16, kvh 2, hd 64, G 32 */
    {
        tu_set_case("memory: the documented page sizes");
        const qfmt f8 = qfmt_make(16, 2, 64, PIKV_DTYPE_INT8, 32), f4 = qfmt_make(16, 2, 64, PIKV_DTYPE_INT4, 32);
        CHECK(f8.f16_page == 9216 && f8.data == 4096 && f8.scales == 768 && 2 * f8.bounds == 1024 && f8.page == 5888);
        CHECK(f4.data == 2048 && f4.scales == 768 && f4.page == 3840);
        for (int k = 0; k < 2; k++) {
            pikv_cache_params p = base_params(k ? PIKV_DTYPE_INT4 : PIKV_DTYPE_INT8);
            p.page_size = 16;
            p.n_kv_heads = 2;
            p.n_q_heads = 2;
            p.head_dim = 64;
            p.quant_group = 32;
            pikv_cache *c = NULL;
            pikv_cache_stats cs;
            if (CHECK_OK(pikv_cache_create(g_ctx[1], &p, &c)) && CHECK_OK(pikv_cache_get_stats(c, &cs)))
                CHECK(cs.page_bytes == 9216 && cs.quant_page_bytes == (k ? 3840u : 5888u));
            pikv_cache_free(c);
        }
    }
    /* realistic: head 128, 8 KV heads, 32-token pages and groups: a quantized page is 0.353 (int4)
       / 0.588 (int8) of an f16 page (bounds 8 KiB and scales 8 KiB on 32 / 64 KiB of data) */
    const int lens1[3] = {32 * 6 + 5, 32 * 3, 17};
    memory_case(32, 8, 128, 32, 2, lens1, 3, 0.36, 0.59);
    const int lens2[4] = {23, 5, 41, 2};
    memory_case(5, 3, 7, 4, 3, lens2, 4, 10.0, 10.0); /* tiny pages: metadata dominates */
    const int lens3[2] = {50, 33};
    memory_case(16, 2, 65, 1024, 1, lens3, 2, 0.41, 0.63);
    const int lens4[2] = {9, 4};
    memory_case(1, 1, 1, 1, 4, lens4, 2, 10.0, 10.0);
    const int lens5[3] = {40, 27, 13};
    memory_case(13, 1, 33, 3, 2, lens5, 3, 10.0, 10.0);
}

/* ------------------------------------------------------------------------ */
/* 4. Sequences and pages: copy_prefix, rebalance, trim, eviction, failures  */
/* ------------------------------------------------------------------------ */

static pikv_status attend_raw(pikv_cache *c, int layer, int nq, const int32_t *seqs, const float *q, float *out,
                              float *lse)
{
    pikv_attend_batch b;
    memset(&b, 0, sizeof b);
    b.n_queries = nq;
    b.seq_ids = seqs;
    b.q = q;
    b.out = out;
    b.lse = lse;
    return pikv_cache_attend(c, layer, &b);
}

typedef struct page_snap {
    int64_t n;
    uint32_t *ids;
    int32_t *quant, *rows, *dev;
    unsigned char **bytes;
} page_snap;

/* Every live page's bytes, by id. */
static void page_snap_take(const pikv_cache *c, page_snap *s)
{
    memset(s, 0, sizeof s[0]);
    s->ids = tu_xmalloc((size_t)(c->pages_high + 1) * sizeof(uint32_t));
    s->quant = tu_xmalloc((size_t)(c->pages_high + 1) * sizeof(int32_t));
    s->rows = tu_xmalloc((size_t)(c->pages_high + 1) * sizeof(int32_t));
    s->dev = tu_xmalloc((size_t)(c->pages_high + 1) * sizeof(int32_t));
    s->bytes = tu_xcalloc((size_t)(c->pages_high + 1), sizeof(unsigned char *));
    for (int64_t id = 0; id < c->pages_high; id++) {
        if (c->pages[id].refs <= 0)
            continue;
        const uint64_t nb = page_size_bytes(c, (uint32_t)id);
        s->ids[s->n] = (uint32_t)id;
        s->quant[s->n] = c->pages[id].quant;
        s->rows[s->n] = c->pages[id].n_tokens;
        s->dev[s->n] = c->pages[id].dev;
        s->bytes[s->n] = tu_xmalloc((size_t)nb);
        memcpy(s->bytes[s->n], page_at(c, (uint32_t)id), (size_t)nb);
        s->n++;
    }
}

static void page_snap_free(page_snap *s)
{
    for (int64_t i = 0; i < s->n; i++)
        free(s->bytes[i]);
    free(s->ids);
    free(s->quant);
    free(s->rows);
    free(s->dev);
    free(s->bytes);
    memset(s, 0, sizeof s[0]);
}

/* A page's bytes equal a saved copy: a quantized page whole; an open page's rows in use
   (rows past them are not part of the page's contents) and its bounds. */
static int page_bytes_equal(const pikv_cache *c, uint32_t id, const unsigned char *saved)
{
    const unsigned char *pg = page_at(c, id);
    if (c->pages[id].quant)
        return memcmp(pg, saved, (size_t)c->qlayout.page_bytes) == 0;
    const pikv_page_layout *L = &c->layout;
    const size_t rows = (size_t)c->pages[id].n_tokens * L->row_bytes;
    for (int g = 0; g < L->n_kv_heads; g++) {
        const uint64_t h = (uint64_t)g * L->head_stride;
        if (memcmp(pg + L->k_offset + h, saved + L->k_offset + h, rows) ||
            memcmp(pg + L->v_offset + h, saved + L->v_offset + h, rows))
            return 0;
    }
    return memcmp(pg + L->kmin_offset, saved + L->kmin_offset, 2 * (size_t)L->n_kv_heads * L->head_dim * 4) == 0;
}

/* The pages of the snapshot are still there, same kind and rows, same bytes. Returns how
   many changed device (and how many of those are quantized). */
static int64_t page_snap_same(const pikv_cache *c, const page_snap *s, const char *what, int64_t *moved_quant)
{
    int64_t bad = 0, moved = 0, mq = 0;
    uint32_t first = 0;
    for (int64_t i = 0; i < s->n; i++) {
        const uint32_t id = s->ids[i];
        const pikv_page_meta *m = &c->pages[id];
        if (m->refs <= 0 || m->quant != s->quant[i] || m->n_tokens != s->rows[i] ||
            !page_bytes_equal(c, id, s->bytes[i])) {
            if (!bad++)
                first = id;
            continue;
        }
        if (m->dev != s->dev[i]) {
            moved++;
            mq += m->quant;
        }
    }
    CHECKF(bad == 0, "%s: %lld of %lld pages changed (first id %u)", what, (long long)bad, (long long)s->n, first);
    if (moved_quant)
        *moved_quant = mq;
    return moved;
}

/* Quantized / open pages over all live pages, and the pools' slot bookkeeping. */
static void check_pools(const pikv_cache *c, const char *what)
{
    const qfmt F = qfmt_make(c->params.page_size, c->params.n_kv_heads, c->params.head_dim, c->params.dtype,
                             c->params.quant_group);
    int64_t nq[8] = {0}, no[8] = {0}, layer_q[8] = {0}, total_q = 0, total_o = 0;
    for (int64_t id = 0; id < c->pages_high; id++) {
        const pikv_page_meta *m = &c->pages[id];
        if (m->refs <= 0)
            continue;
        (m->quant ? nq : no)[m->dev]++;
        (m->quant ? &total_q : &total_o)[0]++;
        layer_q[m->layer] += m->quant;
        if (m->quant)
            CHECKF(m->n_tokens == c->params.page_size, "%s: quantized page %lld has %d rows", what, (long long)id,
                   m->n_tokens);
    }
    pikv_cache_stats cs;
    if (CHECK_OK(pikv_cache_get_stats(c, &cs))) {
        CHECKF(cs.bytes_used == (uint64_t)total_q * F.page + (uint64_t)total_o * F.f16_page,
               "%s: bytes_used %llu, %lld quantized + %lld open pages", what, (unsigned long long)cs.bytes_used,
               (long long)total_q, (long long)total_o);
        CHECK_EQ(cs.pages, total_q + total_o);
    }
    for (int l = 0; l < c->params.n_layers; l++) {
        pikv_layer_stats ls;
        if (CHECK_OK(pikv_cache_get_layer_stats(c, l, &ls)))
            CHECKF(ls.quantized_pages == layer_q[l], "%s: layer %d quantized_pages %lld, holds %lld", what, l,
                   (long long)ls.quantized_pages, (long long)layer_q[l]);
    }
    for (int d = 0; d < c->n_devs; d++) {
        pikv_cache_device_stats ds;
        if (CHECK_OK(pikv_cache_get_device_stats(c, d, &ds))) {
            CHECKF(ds.quantized_pages == nq[d] && ds.pages == nq[d] + no[d],
                   "%s: device %d: quantized_pages %lld pages %lld, holds %lld + %lld", what, d,
                   (long long)ds.quantized_pages, (long long)ds.pages, (long long)nq[d], (long long)no[d]);
            CHECK_EQ(ds.bytes_open_pages + ds.bytes_quant_data + ds.bytes_quant_scales + ds.bytes_quant_other,
                     ds.bytes_used);
        }
        /* every slot is either used or free, in both pools */
        for (int k = 0; k < 2; k++) {
            const pikv_page_pool *pool = k ? &c->qdevs[d] : &c->devs[d];
            CHECKF(pool->pages_used == (k ? nq[d] : no[d]) &&
                       pool->pages_used + pool->n_free == (int64_t)pool->n_chunks * pool->pages_per_chunk,
                   "%s: device %d %s pool: %lld used + %lld free != %d chunks x %u", what, d, k ? "quantized" : "open",
                   (long long)pool->pages_used, (long long)pool->n_free, pool->n_chunks, pool->pages_per_chunk);
        }
    }
}

/* Page ids of a sequence's ring of one shard. */
static int ring_ids(const pikv_cache *c, int seq, int layer, int shard, uint32_t *ids)
{
    const pikv_ring *ring = &c->seqs[seq].layers[layer].rings[shard];
    for (int64_t j = 0; j < ring->count; j++)
        ids[j] = pikv_ring_at(ring, j);
    return (int)ring->count;
}

static void copy_case(int ndev, pikv_dtype dt, uint64_t seed, long *n_checked)
{
    tu_rng r = tu_rng_seed(seed);
    pikv_cache_params p = base_params(dt);
    p.n_layers = 2;
    p.n_kv_heads = 2;
    p.n_q_heads = 4;
    p.head_dim = 7;
    p.page_size = 8;
    p.quant_group = 3;
    p.max_sequences = 4;
    const int ps = p.page_size, kvh = p.n_kv_heads, hd = p.head_dim, L0 = 37;
    const size_t row = (size_t)kvh * hd;
    pikv_cache *c = NULL;
    tu_set_case("copy_prefix %s %d devices", dt_name(dt), ndev);
    if (!CHECK_OK(pikv_cache_create(g_ctx[ndev], &p, &c)))
        return;
    const qfmt F = qfmt_make(ps, kvh, hd, dt, p.quant_group);
    tu_model m;
    model_init(&m, &p);
    CHECK_OK(pikv_seq_add(c, 0));
    for (int l = 0; l < p.n_layers; l++) {
        float *K = tu_xmalloc((size_t)L0 * row * sizeof(float)), *V = tu_xmalloc((size_t)L0 * row * sizeof(float));
        tu_fill(&r, K, (size_t)L0 * row, 2.0f);
        tu_fill(&r, V, (size_t)L0 * row, 1.0f);
        append_chunks(c, &m, &r, l, 0, L0, K, V, NULL, 11);
        free(K);
        free(V);
    }
    errsum es;
    memset(&es, 0, sizeof es);
    verify_all_pages(c, &m, &F, &es, "copy source");
    const int cuts[] = {0, 3, 8, 13, 16, 21, 32, 35, 37};
    const size_t per = (size_t)p.n_q_heads * hd;
    float *q = tu_xmalloc(per * sizeof(float));
    float *o0 = tu_xmalloc(per * sizeof(float) * 2), *o1 = tu_xmalloc(per * sizeof(float) * 2);
    float l0[8], l1[8];
    const int32_t seq0 = 0, seq1 = 1;
    uint32_t sids[64], dids[64];
    for (size_t ci = 0; ci < sizeof cuts / sizeof cuts[0]; ci++) {
        const int n = cuts[ci];
        tu_set_case("copy_prefix %s %d devices: cut at %d of %d (page size %d)", dt_name(dt), ndev, n, L0, ps);
        tu_fill(&r, q, per, 1.5f);
        pikv_cache_stats before, after;
        CHECK_OK(pikv_cache_get_stats(c, &before));
        page_snap src_pages;
        page_snap_take(c, &src_pages);
        for (int l = 0; l < p.n_layers; l++)
            CHECK_OK(attend_raw(c, l, 1, &seq0, q, o0 + (size_t)l * per, l0 + l * 4));
        if (!CHECK_OK(pikv_seq_copy_prefix(c, 0, 1, n))) {
            page_snap_free(&src_pages);
            continue;
        }
        /* dense placement: one block of ps positions is partly covered unless n is a multiple */
        const int copies = n % ps ? 1 : 0;
        CHECK_OK(pikv_cache_get_stats(c, &after));
        CHECK_EQ(after.pages, before.pages + copies * p.n_layers);
        CHECK_EQ(after.tokens, before.tokens + (n % ps) * p.n_layers);
        CHECK_EQ(after.bytes_used, before.bytes_used + (uint64_t)(copies * p.n_layers) * F.f16_page);
        CHECK_EQ(after.sequences, before.sequences + 1);
        /* per layer: dst values for every token (what f16 of the value gives the copy's rows;
           the inputs past n are appended below) */
        const int add = (ps - n % ps) % ps + ps + 2, total = n + add;
        float *dk = tu_xmalloc((size_t)p.n_layers * total * row * sizeof(float));
        float *dv = tu_xmalloc((size_t)p.n_layers * total * row * sizeof(float));
        for (int l = 0; l < p.n_layers; l++) {
            int64_t len = -1;
            CHECK_OK(pikv_seq_length(c, 1, l, &len));
            CHECK_EQ(len, n);
            for (int s = 0; s < c->n_shards; s++) {
                const int ns = ring_ids(c, 0, l, s, sids), nd = ring_ids(c, 1, l, s, dids);
                int want = 0;
                for (int j = 0; j < ns; j++) {
                    const uint32_t sid = sids[j];
                    int rows = 0;
                    while (rows < c->pages[sid].n_tokens && tok_of(c, sid, rows) < n)
                        rows++;
                    if (rows == 0)
                        break;
                    if (want >= nd) {
                        want++;
                        continue;
                    }
                    const uint32_t did = dids[want++];
                    /* the source page's rows as the destination sees them */
                    for (int rr = 0; rr < rows; rr++) {
                        const int64_t t = tok_of(c, sid, rr);
                        for (int g = 0; g < kvh; g++)
                            for (int key = 0; key < 2; key++) {
                                float *dst = (key ? dk : dv) + (((size_t)l * total + (size_t)t) * kvh + g) * hd;
                                if (c->pages[sid].quant)
                                    fmt_decode_row(&F, page_at(c, sid), key, g, rr, dst);
                                else
                                    for (int d = 0; d < hd; d++)
                                        dst[d] = tu_f16_to_f32(open_bits(c, sid, g, rr, key, d));
                            }
                    }
                    if (rows == ps) {
                        CHECKF(did == sid && c->pages[sid].refs == 2,
                               "layer %d shard %d page %d: full page not shared (src id %u dst id %u refs %d)", l, s,
                               j, sid, did, c->pages[sid].refs);
                        continue;
                    }
                    CHECKF(did != sid && c->pages[did].refs == 1 && c->pages[did].dev == c->pages[sid].dev,
                           "layer %d shard %d page %d: partial page not copied (src %u dst %u)", l, s, j, sid, did);
                    char what[128];
                    snprintf(what, sizeof what, "copy of %s page, layer %d, %d rows",
                             c->pages[sid].quant ? "a quantized" : "an open", l, rows);
                    /* an open page of rows rows holding f16(values): dk/dv are those values */
                    float *ik = tu_xmalloc((size_t)rows * row * sizeof(float)),
                          *iv = tu_xmalloc((size_t)rows * row * sizeof(float));
                    for (int rr = 0; rr < rows; rr++) {
                        const int64_t t = tok_of(c, sid, rr);
                        memcpy(ik + (size_t)rr * row, dk + ((size_t)l * total + (size_t)t) * row, row * sizeof(float));
                        memcpy(iv + (size_t)rr * row, dv + ((size_t)l * total + (size_t)t) * row, row * sizeof(float));
                    }
                    verify_open_page(c, did, rows, ik, iv, what);
                    (*n_checked)++;
                    free(ik);
                    free(iv);
                }
                CHECKF(nd == want, "layer %d shard %d: destination holds %d pages, expected %d", l, s, nd, want);
            }
            char what[64];
            snprintf(what, sizeof what, "copy, layer %d", l);
            oracle_check(c, NULL, l, 1, &seq1, q, NULL, NULL, what);
            CHECK_OK(attend_raw(c, l, 1, &seq0, q, o1, l1));
            CHECKF(memcmp(o1, o0 + (size_t)l * per, per * sizeof(float)) == 0, "layer %d: source output changed", l);
        }
        /* append to the copy: its partial page fills and is quantized from what it holds */
        for (int l = 0; l < p.n_layers; l++) {
            float *K = dk + (size_t)l * total * row + (size_t)n * row, *V = dv + (size_t)l * total * row + (size_t)n * row;
            tu_fill(&r, K, (size_t)add * row, 2.0f);
            tu_fill(&r, V, (size_t)add * row, 1.0f);
            append_chunks(c, NULL, &r, l, 1, add, K, V, NULL, 5);
            for (int s = 0; s < c->n_shards; s++) {
                const int nd = ring_ids(c, 1, l, s, dids);
                for (int j = 0; j < nd; j++) {
                    const uint32_t id = dids[j];
                    if (c->pages[id].refs == 2)
                        continue; /* shared with the source, verified there */
                    const int rows = c->pages[id].n_tokens;
                    float *xk = tu_xmalloc((size_t)ps * row * sizeof(float)), *xv = tu_xmalloc((size_t)ps * row * sizeof(float));
                    for (int rr = 0; rr < rows; rr++) {
                        const int64_t t = tok_of(c, id, rr);
                        for (size_t i = 0; i < row; i++) {
                            const float a = dk[((size_t)l * total + (size_t)t) * row + i];
                            const float b = dv[((size_t)l * total + (size_t)t) * row + i];
                            xk[(size_t)rr * row + i] = c->pages[id].quant ? tu_f16_round(a) : a;
                            xv[(size_t)rr * row + i] = c->pages[id].quant ? tu_f16_round(b) : b;
                        }
                    }
                    char what[128];
                    snprintf(what, sizeof what, "copy after append, layer %d shard %d page %d", l, s, j);
                    if (c->pages[id].quant)
                        verify_qpage(c, &F, id, xk, xv, &es, what);
                    else
                        verify_open_page(c, id, rows, xk, xv, what);
                    free(xk);
                    free(xv);
                }
            }
            char what[64];
            snprintf(what, sizeof what, "copy after append, layer %d", l);
            oracle_check(c, NULL, l, 1, &seq1, q, NULL, NULL, what);
            CHECK_OK(attend_raw(c, l, 1, &seq0, q, o1, l1));
            CHECKF(memcmp(o1, o0 + (size_t)l * per, per * sizeof(float)) == 0,
                   "layer %d: source output changed by appending to the copy", l);
        }
        check_pools(c, "copy after append");
        page_snap_same(c, &src_pages, "source pages after copy and append", NULL);
        page_snap_free(&src_pages);
        /* removing the copy gives back exactly what it added */
        CHECK_OK(pikv_seq_remove(c, 1));
        CHECK_OK(pikv_cache_get_stats(c, &after));
        CHECK(after.pages == before.pages && after.tokens == before.tokens && after.bytes_used == before.bytes_used &&
              after.sequences == before.sequences);
        check_pools(c, "copy removed");
        free(dk);
        free(dv);
    }
    free(q);
    free(o0);
    free(o1);
    tu_model_free(&m);
    pikv_cache_free(c);
}

static void test_copy_prefix(void)
{
    long n_checked = 0;
    for (int ndev = 1; ndev <= 3; ndev++)
        for (int dti = 0; dti < 2; dti++)
            copy_case(ndev, dti ? PIKV_DTYPE_INT4 : PIKV_DTYPE_INT8, 900u + (uint64_t)ndev * 10 + (uint64_t)dti,
                      &n_checked);
    tu_set_case("copy_prefix totals");
    CHECK(n_checked >= 20);
    printf("copy_prefix: %ld partial pages copied and checked\n", n_checked);
}

/* Appends n tokens of one expert (top-1 `e`, the rest of top-k after it). */
static void append_expert(pikv_cache *c, tu_model *m, tu_rng *r, int layer, int seq, int n, int e)
{
    const pikv_cache_params *p = &c->params;
    const size_t row = (size_t)p->n_kv_heads * p->head_dim;
    float *K = tu_xmalloc((size_t)n * row * sizeof(float)), *V = tu_xmalloc((size_t)n * row * sizeof(float));
    int32_t *ex = tu_xmalloc((size_t)n * p->experts_per_token * sizeof(int32_t));
    tu_fill(r, K, (size_t)n * row, 2.0f);
    tu_fill(r, V, (size_t)n * row, 1.0f);
    for (int t = 0; t < n; t++)
        for (int j = 0; j < p->experts_per_token; j++)
            ex[(size_t)t * p->experts_per_token + j] = (e + j) % p->n_experts;
    pikv_status st = pikv_cache_append(c, layer, seq, n, K, V, NULL, ex);
    if (CHECKF(st == PIKV_OK, "append %d tokens of expert %d: %s", n, e, pikv_status_name(st)) && m)
        tu_model_push(m, layer, seq, n, K, V, ex);
    free(K);
    free(V);
    free(ex);
}

/* BALANCED placement and rebalance count pages, whatever pool they are in: an int8 / int4
   cache places and moves shards exactly like its f16 twin. */
static void test_balanced_twins(void)
{
    for (int dti = 0; dti < 2; dti++) {
        const pikv_dtype dt = dti ? PIKV_DTYPE_INT4 : PIKV_DTYPE_INT8;
        pikv_cache *tw[2] = {NULL, NULL}; /* f16, quantized */
        for (int scen = 0; scen < 2; scen++) {
            for (int k = 0; k < 2; k++) {
                pikv_cache_params p = base_params(k ? dt : PIKV_DTYPE_F16);
                p.placement = PIKV_PLACEMENT_BALANCED;
                p.n_experts = scen == 0 ? 4 : 3;
                if (!CHECK_OK(pikv_cache_create(g_ctx[2], &p, &tw[k])))
                    return;
                CHECK_OK(pikv_seq_add(tw[k], 0));
            }
            tu_set_case("balanced twins %s scenario %d", dt_name(dt), scen);
            for (int k = 0; k < 2; k++) {
                tu_rng r = tu_rng_seed(4242);
                if (scen == 0) {
                    /* 40 tokens of expert 0 (10 pages, all full: quantized in the twin), then
                       a new shard: it goes to the device with the fewest pages, device 1 */
                    append_expert(tw[k], NULL, &r, 0, 0, 40, 0);
                    append_expert(tw[k], NULL, &r, 0, 0, 2, 1);
                    append_expert(tw[k], NULL, &r, 0, 0, 3, 2);
                } else {
                    /* shards 0, 1, 2 placed while every page is open (0 and 2 share device 0),
                       then 0 and 2 grow by 8 full pages each: rebalance moves one of them */
                    const size_t row = 8;
                    float K[3 * 8], V[3 * 8];
                    int32_t ex[3] = {0, 1, 2};
                    tu_fill(&r, K, 3 * row, 1.0f);
                    tu_fill(&r, V, 3 * row, 1.0f);
                    CHECK_OK(pikv_cache_append(tw[k], 0, 0, 3, K, V, NULL, ex));
                    append_expert(tw[k], NULL, &r, 0, 0, 32, 0);
                    append_expert(tw[k], NULL, &r, 0, 0, 32, 2);
                }
            }
            pikv_cache_stats s0, s1;
            CHECK_OK(pikv_cache_get_stats(tw[0], &s0));
            CHECK_OK(pikv_cache_get_stats(tw[1], &s1));
            for (int sh = 0; sh < s0.n_shards; sh++) {
                int32_t d0 = -2, d1 = -2;
                int64_t p0 = -1, p1 = -1;
                CHECK_OK(pikv_cache_shard_info(tw[0], 0, sh, &d0, &p0, NULL));
                CHECK_OK(pikv_cache_shard_info(tw[1], 0, sh, &d1, &p1, NULL));
                CHECKF(d0 == d1 && p0 == p1, "shard %d: f16 cache has it on device %d (%lld pages), %s cache on "
                       "device %d (%lld pages)", sh, d0, (long long)p0, dt_name(dt), d1, (long long)p1);
                if (scen == 0 && sh == 1)
                    CHECKF(d1 == 1, "%s cache: new shard 1 placed on device %d; device 0 holds 10 pages, device 1 none",
                           dt_name(dt), d1);
            }
            if (scen == 1) {
                int64_t m0 = -1, m1 = -1;
                CHECK_OK(pikv_cache_rebalance(tw[0], &m0));
                CHECK_OK(pikv_cache_rebalance(tw[1], &m1));
                CHECKF(m0 > 0, "the f16 cache moved %lld pages (scenario broken)", (long long)m0);
                CHECKF(m1 == m0, "rebalance moved %lld pages of the %s cache, %lld of its f16 twin", (long long)m1,
                       dt_name(dt), (long long)m0);
                for (int d = 0; d < 2; d++) {
                    pikv_cache_device_stats a, b;
                    CHECK_OK(pikv_cache_get_device_stats(tw[0], d, &a));
                    CHECK_OK(pikv_cache_get_device_stats(tw[1], d, &b));
                    CHECKF(a.pages == b.pages, "device %d after rebalance: f16 %lld pages, %s %lld", d,
                           (long long)a.pages, dt_name(dt), (long long)b.pages);
                }
            }
            for (int k = 0; k < 2; k++)
                pikv_cache_free(tw[k]);
        }
    }
}

/* Rebalance and trim move quantized pages byte for byte; outputs stay (trim: bitwise). */
static void test_rebalance_trim(void)
{
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "cpu";
    cp.cpu_devices = 2;
    cp.cpu_device_memory = 64 << 10; /* chunks of a few pages, so trim can free some */
    pikv_context *ctx = NULL;
    if (!CHECK_OK(pikv_context_create(&cp, &ctx)))
        return;
    long bitwise_rebalance = 0, rebalances = 0;
    for (int dti = 0; dti < 2; dti++) {
        const pikv_dtype dt = dti ? PIKV_DTYPE_INT4 : PIKV_DTYPE_INT8;
        tu_set_case("rebalance/trim %s", dt_name(dt));
        pikv_cache_params p = base_params(dt);
        p.placement = PIKV_PLACEMENT_BALANCED;
        p.n_experts = 3;
        p.n_kv_heads = 2;
        p.n_q_heads = 4;
        p.head_dim = 16;
        p.quant_group = 4;
        p.max_sequences = 16;
        pikv_cache *c = NULL;
        if (!CHECK_OK(pikv_cache_create(ctx, &p, &c)))
            continue;
        const qfmt F = qfmt_make(p.page_size, p.n_kv_heads, p.head_dim, dt, p.quant_group);
        tu_model m;
        model_init(&m, &p);
        tu_rng r = tu_rng_seed(31 + (uint64_t)dti);
        CHECK_OK(pikv_seq_add(c, 0));
        {
            const size_t row = (size_t)p.n_kv_heads * p.head_dim;
            float K[3 * 32], V[3 * 32];
            int32_t ex[3] = {0, 1, 2};
            tu_fill(&r, K, 3 * row, 1.0f);
            tu_fill(&r, V, 3 * row, 1.0f);
            if (CHECK_OK(pikv_cache_append(c, 0, 0, 3, K, V, NULL, ex)))
                tu_model_push(&m, 0, 0, 3, K, V, ex);
        }
        /* shards 0 and 2 share device 0 and grow: 10 sequences with open pages in both,
           sequence 0 also with full (quantized) pages */
        for (int s = 0; s < 10; s++) {
            if (s > 0)
                CHECK_OK(pikv_seq_add(c, s));
            append_expert(c, &m, &r, 0, s, 2, 0);
            append_expert(c, &m, &r, 0, s, 2, 2);
        }
        append_expert(c, &m, &r, 0, 0, 8, 0);
        append_expert(c, &m, &r, 0, 0, 8, 2);
        /* sequences 14 and 15 live in one shard each (0, 2): one device reads them before and
           after the move, so their outputs must not change by a bit */
        CHECK_OK(pikv_seq_add(c, 14));
        CHECK_OK(pikv_seq_add(c, 15));
        append_expert(c, &m, &r, 0, 14, 6, 0);
        append_expert(c, &m, &r, 0, 15, 6, 2);
        errsum es;
        memset(&es, 0, sizeof es);
        verify_all_pages(c, &m, &F, &es, "before rebalance");
        int32_t seqs[10];
        for (int s = 0; s < 10; s++)
            seqs[s] = s;
        const size_t per = (size_t)p.n_q_heads * p.head_dim;
        float *q = tu_xmalloc(10 * per * sizeof(float)), *o0 = tu_xmalloc(10 * per * sizeof(float)),
              *o1 = tu_xmalloc(10 * per * sizeof(float)), *l0 = tu_xmalloc(10 * 4 * sizeof(float)),
              *l1 = tu_xmalloc(10 * 4 * sizeof(float));
        tu_fill(&r, q, 10 * per, 1.5f);
        CHECK_OK(attend_raw(c, 0, 10, seqs, q, o0, l0));
        const int32_t single[2] = {14, 15};
        float so0[2 * 64], so1[2 * 64], sl0[2 * 4], sl1[2 * 4];
        for (int i = 0; i < 2; i++)
            CHECK_OK(attend_raw(c, 0, 1, &single[i], q, so0 + (size_t)i * per, sl0 + i * 4));
        pikv_cache_stats before, after;
        CHECK_OK(pikv_cache_get_stats(c, &before));
        page_snap ps0;
        page_snap_take(c, &ps0);
        int64_t moved = -1, moved_q = 0;
        CHECK_OK(pikv_cache_rebalance(c, &moved));
        const int64_t changed = page_snap_same(c, &ps0, "rebalance", &moved_q);
        page_snap_free(&ps0);
        CHECKF(moved > 0 && changed == moved && moved_q > 0,
               "rebalance moved %lld pages; %lld changed device, %lld of them quantized", (long long)moved,
               (long long)changed, (long long)moved_q);
        CHECK_OK(pikv_cache_get_stats(c, &after));
        CHECK(after.bytes_used == before.bytes_used && after.pages == before.pages && after.tokens == before.tokens);
        check_pools(c, "after rebalance");
        verify_all_pages(c, &m, &F, &es, "after rebalance");
        CHECK_OK(attend_raw(c, 0, 10, seqs, q, o1, l1));
        CHECKF(tu_norm_err_ff(o1, o0, 10 * per) <= TU_TOL_EXACT, "output changed by rebalance: %.3g",
               tu_norm_err_ff(o1, o0, 10 * per));
        rebalances++;
        bitwise_rebalance += memcmp(o1, o0, 10 * per * sizeof(float)) == 0;
        for (int i = 0; i < 2; i++) {
            CHECK_OK(attend_raw(c, 0, 1, &single[i], q, so1 + (size_t)i * per, sl1 + i * 4));
            CHECKF(memcmp(so0 + (size_t)i * per, so1 + (size_t)i * per, per * sizeof(float)) == 0 &&
                       memcmp(sl0 + i * 4, sl1 + i * 4, 4 * sizeof(float)) == 0,
                   "sequence %d (one shard): output changed by rebalance", single[i]);
        }
        {
            int32_t sd[2] = {-1, -1};
            CHECK_OK(pikv_cache_shard_info(c, 0, 0, &sd[0], NULL, NULL));
            CHECK_OK(pikv_cache_shard_info(c, 0, 2, &sd[1], NULL, NULL));
            CHECKF(sd[0] != sd[1], "shards 0 and 2 still share device %d after rebalance", sd[0]);
        }
        oracle_check(c, &m, 0, 10, seqs, q, NULL, NULL, "after rebalance");

        /* trim: quantized pages of sequences 10..13 on shard 0's device, then more of sequence
           0 above them; dropping 1..13 leaves holes below sequence 0's newest pages, which
           compaction must move down (quantized pages included) */
        for (int s = 10; s < 14; s++) {
            CHECK_OK(pikv_seq_add(c, s));
            append_expert(c, &m, &r, 0, s, 12, 0);
        }
        append_expert(c, &m, &r, 0, 0, 12, 0);
        append_expert(c, &m, &r, 0, 0, 12, 2);
        for (int s = 1; s < 14; s++) {
            CHECK_OK(pikv_seq_remove(c, s));
            tu_model_remove(&m, s);
        }
        const int32_t kept[3] = {0, 14, 15};
        CHECK_OK(attend_raw(c, 0, 3, kept, q, o0, l0));
        CHECK_OK(pikv_cache_get_stats(c, &before));
        uint64_t qalloc_before = 0, qalloc_after = 0;
        for (int d = 0; d < 2; d++)
            qalloc_before += c->qdevs[d].bytes_allocated;
        page_snap_take(c, &ps0);
        uint32_t *slots0 = tu_xmalloc((size_t)(c->pages_high + 1) * sizeof(uint32_t));
        for (int64_t id = 0; id < c->pages_high; id++)
            slots0[id] = c->pages[id].slot;
        CHECK_OK(pikv_cache_trim(c));
        page_snap_same(c, &ps0, "trim", NULL);
        page_snap_free(&ps0);
        long qmoved = 0;
        for (int64_t id = 0; id < c->pages_high; id++)
            qmoved += c->pages[id].refs > 0 && c->pages[id].quant && c->pages[id].slot != slots0[id];
        free(slots0);
        CHECKF(qmoved > 0, "trim moved no quantized page to a lower slot (scenario broken)");
        for (int d = 0; d < 2; d++)
            qalloc_after += c->qdevs[d].bytes_allocated;
        CHECK_OK(pikv_cache_get_stats(c, &after));
        CHECKF(after.bytes_allocated < before.bytes_allocated && qalloc_after < qalloc_before,
               "trim: bytes_allocated %llu -> %llu, quantized pools %llu -> %llu",
               (unsigned long long)before.bytes_allocated, (unsigned long long)after.bytes_allocated,
               (unsigned long long)qalloc_before, (unsigned long long)qalloc_after);
        CHECK(after.bytes_used == before.bytes_used && after.pages == before.pages);
        check_pools(c, "after trim");
        CHECK_OK(attend_raw(c, 0, 3, kept, q, o1, l1));
        CHECKF(memcmp(o1, o0, 3 * per * sizeof(float)) == 0 && memcmp(l1, l0, 3 * 4 * sizeof(float)) == 0,
               "output changed by trim");
        verify_all_pages(c, &m, &F, &es, "after trim");
        /* still usable */
        append_expert(c, &m, &r, 0, 0, 9, 1);
        verify_all_pages(c, &m, &F, &es, "append after trim");
        oracle_check(c, &m, 0, 3, kept, q, NULL, NULL, "append after trim");
        free(q);
        free(o0);
        free(o1);
        free(l0);
        free(l1);
        tu_model_free(&m);
        pikv_cache_free(c);
    }
    pikv_context_free(ctx);
    printf("rebalance: %ld rebalances moving quantized pages (outputs over pages of two devices bitwise equal after "
           "%ld; single-device sequences always)\n", rebalances, bitwise_rebalance);
}

/* Budgets evict full (quantized) pages: their slots go back to the quantized pool. */
static void test_evict(void)
{
    long evicted = 0, checks = 0;
    for (int dti = 0; dti < 2; dti++)
        for (int pol = 0; pol < 2; pol++) {
            const pikv_dtype dt = dti ? PIKV_DTYPE_INT4 : PIKV_DTYPE_INT8;
            pikv_cache_params p = base_params(dt);
            p.n_layers = 2;
            p.n_kv_heads = 2;
            p.n_q_heads = 4;
            p.head_dim = 8;
            p.quant_group = 2;
            p.select.sink_tokens = 4;
            p.select.recent_tokens = 8;
            p.budget.mode = PIKV_BUDGET_UNIFORM;
            p.budget.total_tokens = 2 * 24;
            p.evict.policy = pol ? PIKV_EVICT_H2O : PIKV_EVICT_STREAMING;
            tu_set_case("evict %s policy %d", dt_name(dt), (int)p.evict.policy);
            pikv_cache *c = NULL;
            if (!CHECK_OK(pikv_cache_create(g_ctx[2], &p, &c)))
                continue;
            const qfmt F = qfmt_make(p.page_size, p.n_kv_heads, p.head_dim, dt, p.quant_group);
            tu_model m;
            model_init(&m, &p);
            tu_rng r = tu_rng_seed(606 + (uint64_t)(dti * 2 + pol));
            CHECK_OK(pikv_seq_add(c, 0));
            CHECK_OK(pikv_seq_add(c, 1));
            const size_t per = (size_t)p.n_q_heads * p.head_dim;
            float *q = tu_xmalloc(2 * per * sizeof(float));
            const int32_t seqs[2] = {0, 1};
            int64_t full_made = 0;
            for (int step = 0; step < 48; step++) {
                const int l = step % 2, s = (step / 2) % 2;
                CHECK_OK(tu_append_random(c, &m, &r, l, s, tu_int(&r, 1, 9), 0));
                int64_t len = -1;
                CHECK_OK(pikv_seq_length(c, s, l, &len));
                CHECKF(len <= 24, "step %d: layer %d seq %d holds %lld tokens, budget 24", step, l, s, (long long)len);
                check_pools(c, "evict");
                if (step % 6 == 5) {
                    tu_fill(&r, q, 2 * per, 1.5f);
                    for (int ll = 0; ll < 2; ll++)
                        oracle_check(c, &m, ll, 2, seqs, q, NULL, NULL, "evict");
                    pikv_select_params sel = p.select;
                    sel.mode = PIKV_SELECT_QUEST;
                    sel.token_budget = 16;
                    oracle_check(c, &m, l, 2, seqs, q, NULL, &sel, "evict, quest");
                    checks++;
                }
            }
            /* pages of the remaining tokens match the inputs (quantized ones byte for byte) */
            errsum es;
            memset(&es, 0, sizeof es);
            const int ps = p.page_size;
            float *xk = tu_xmalloc((size_t)ps * 16 * sizeof(float)), *xv = tu_xmalloc((size_t)ps * 16 * sizeof(float));
            uint32_t ids[256];
            for (int l = 0; l < 2; l++)
                for (int s = 0; s < 2; s++) {
                    const tu_seq *ms = tu_model_seq(&m, l, s);
                    full_made += ms->n / ps; /* dense: every page of a sequence fills but the last */
                    const int n = seq_pages(c, s, l, ids, NULL, 256);
                    for (int j = 0; j < n && j < 256; j++) {
                        if (c->pages[ids[j]].quant) {
                            page_inputs(c, ids[j], ms, 1, xk, xv);
                            verify_qpage(c, &F, ids[j], xk, xv, &es, "evict survivors");
                        } else {
                            page_inputs(c, ids[j], ms, 0, xk, xv);
                            verify_open_page(c, ids[j], c->pages[ids[j]].n_tokens, xk, xv, "evict survivors");
                        }
                    }
                }
            pikv_cache_stats cs;
            CHECK_OK(pikv_cache_get_stats(c, &cs));
            int64_t live_q = 0;
            for (int l = 0; l < 2; l++) {
                pikv_layer_stats ls;
                CHECK_OK(pikv_cache_get_layer_stats(c, l, &ls));
                live_q += ls.quantized_pages;
            }
            CHECKF(cs.evicted_pages > 10 && cs.evicted_tokens == cs.evicted_pages * ps &&
                       live_q + cs.evicted_pages == full_made,
                   "evicted %lld pages / %lld tokens; %lld quantized pages live of %lld made", (long long)cs.evicted_pages,
                   (long long)cs.evicted_tokens, (long long)live_q, (long long)full_made);
            /* freed slots are reused: the pools never grew past one chunk */
            for (int d = 0; d < 2; d++)
                CHECK(c->qdevs[d].n_chunks <= 1 && c->devs[d].n_chunks <= 1);
            evicted += cs.evicted_pages;
            free(xk);
            free(xv);
            free(q);
            tu_model_free(&m);
            pikv_cache_free(c);
        }
    printf("evict: %ld quantized pages evicted, %ld oracle rounds\n", evicted, checks);
}

/* ---- allocation failures ---------------------------------------------------------------- */

static pikv_context *hook_context(int devices)
{
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "cpu";
    cp.cpu_devices = devices;
    tu_fault_install(&cp);
    pikv_context *ctx = NULL;
    return pikv_context_create(&cp, &ctx) == PIKV_OK ? ctx : NULL;
}

/* What the quantization adds to "unchanged": layer error stats, quantized counts. */
typedef struct qsnap {
    pikv_layer_stats ls[4];
    pikv_cache_device_stats ds[4];
} qsnap;

static void qsnap_take(const pikv_cache *c, qsnap *s)
{
    memset(s, 0, sizeof *s);
    for (int l = 0; l < c->params.n_layers && l < 4; l++)
        pikv_cache_get_layer_stats(c, l, &s->ls[l]);
    for (int d = 0; d < c->n_devs && d < 4; d++)
        pikv_cache_get_device_stats(c, d, &s->ds[d]);
}

static int qsnap_same(const qsnap *a, const qsnap *b)
{
    for (int l = 0; l < 4; l++)
        if (a->ls[l].quantized_pages != b->ls[l].quantized_pages || a->ls[l].key_rel_error != b->ls[l].key_rel_error ||
            a->ls[l].value_rel_error != b->ls[l].value_rel_error || a->ls[l].max_abs_error != b->ls[l].max_abs_error ||
            a->ls[l].bytes_used != b->ls[l].bytes_used || a->ls[l].pages != b->ls[l].pages)
            return 0;
    for (int d = 0; d < 4; d++)
        if (a->ds[d].quantized_pages != b->ds[d].quantized_pages || a->ds[d].bytes_open_pages != b->ds[d].bytes_open_pages ||
            a->ds[d].bytes_quant_data != b->ds[d].bytes_quant_data ||
            a->ds[d].bytes_quant_scales != b->ds[d].bytes_quant_scales ||
            a->ds[d].bytes_quant_other != b->ds[d].bytes_quant_other)
            return 0;
    return 1;
}

static void test_alloc_failure(void)
{
    pikv_context *ctx = hook_context(2);
    if (!CHECK(ctx != NULL))
        return;
    long quant_failures = 0, attempts = 0;
    for (int dti = 0; dti < 2; dti++)
        for (int rest = 0; rest < 2; rest++) {
            const pikv_dtype dt = dti ? PIKV_DTYPE_INT4 : PIKV_DTYPE_INT8;
            tu_set_case("alloc failure in an append that quantizes: %s, %s", dt_name(dt),
                        rest ? "the Nth allocation and later ones fail" : "the Nth allocation fails");
            pikv_cache_params p = base_params(dt);
            p.n_layers = 2;
            p.n_kv_heads = 2;
            p.n_q_heads = 4;
            p.head_dim = 5;
            p.quant_group = 2;
            p.n_experts = 3;
            p.experts_per_token = 2;
            p.max_sequences = 4;
            pikv_cache *c = NULL;
            if (!CHECK_OK(pikv_cache_create(ctx, &p, &c)))
                continue;
            const qfmt F = qfmt_make(p.page_size, p.n_kv_heads, p.head_dim, dt, p.quant_group);
            tu_model m;
            model_init(&m, &p);
            tu_rng r = tu_rng_seed(99 + (uint64_t)(dti * 2 + rest));
            CHECK_OK(pikv_seq_add(c, 0));
            CHECK_OK(pikv_seq_add(c, 1));
            for (int l = 0; l < 2; l++) {
                CHECK_OK(tu_append_random(c, &m, &r, l, 0, 6, 0));
                CHECK_OK(tu_append_random(c, &m, &r, l, 1, 3, 0));
            }
            /* the append: fills open pages and new pages of several shards and devices */
            const int n = 15;
            const size_t row = (size_t)p.n_kv_heads * p.head_dim;
            float *K = tu_xmalloc((size_t)n * row * sizeof(float)), *V = tu_xmalloc((size_t)n * row * sizeof(float));
            int32_t *ex = tu_xmalloc((size_t)n * 2 * sizeof(int32_t));
            tu_gen(&r, &m, n, K, V, ex, 0);
            tu_snap base, cur;
            qsnap qb, qc;
            tu_snap_take(c, &p, &base);
            qsnap_take(c, &qb);
            pikv_status st = PIKV_ERR_INTERNAL;
            for (long long k = 0; k < 500; k++) {
                tu_fault_arm(k, rest);
                st = pikv_cache_append(c, 0, 0, n, K, V, NULL, ex);
                const long long refused = tu_fault_disarm();
                if (st == PIKV_OK)
                    break;
                attempts++;
                char what[96];
                snprintf(what, sizeof what, "allocation %lld failing", k);
                const char *msg = pikv_context_last_error(ctx);
                CHECKF(st == PIKV_ERR_OUT_OF_MEMORY && refused > 0, "%s: %s (%s), %lld refused", what,
                       pikv_status_name(st), msg, refused);
                quant_failures += strstr(msg, "quantize") != NULL;
                tu_snap_take(c, &p, &cur);
                qsnap_take(c, &qc);
                TU_SNAP_SAME(what, &base, &cur);
                CHECKF(qsnap_same(&qb, &qc), "%s: quantization stats changed", what);
                tu_snap_free(&base);
                base = cur;
                check_pools(c, what);
                if (tu_fail_count > 100)
                    break;
            }
            tu_snap_free(&base);
            if (CHECK_OK(st)) {
                tu_model_push(&m, 0, 0, n, K, V, ex);
                errsum es;
                memset(&es, 0, sizeof es);
                verify_all_pages(c, &m, &F, &es, "after the append succeeded");
                check_pools(c, "after the append succeeded");
                const size_t per = (size_t)p.n_q_heads * p.head_dim;
                float *q = tu_xmalloc(2 * per * sizeof(float));
                const int32_t seqs[2] = {0, 1}, qex[4] = {0, 1, 2, 0};
                tu_fill(&r, q, 2 * per, 1.5f);
                for (int l = 0; l < 2; l++)
                    oracle_check(c, &m, l, 2, seqs, q, qex, NULL, "after the append succeeded");
                free(q);
            }
            free(K);
            free(V);
            free(ex);
            tu_model_free(&m);
            pikv_cache_free(c);
        }
    pikv_context_free(ctx);
    tu_set_case("alloc failure totals");
    /* the quantize step runs inside the append's commit: it must allocate nothing */
    CHECKF(quant_failures == 0, "%ld allocation failures hit the quantize step", quant_failures);
    CHECKF(tu_fault_live() == 0, "%lld allocations leaked", tu_fault_live());
    printf("alloc_failure: %ld failed appends, %ld of them in the quantize step\n", attempts, quant_failures);
}

/* A failure after the open page was written could not be undone: "on any error the
   cache is unchanged" must hold for its Quest bounds too (they steer QUEST reads now, and are
   copied into the quantized page when it fills). */
static void test_failed_quantize_bounds(void)
{
    pikv_context *ctx = hook_context(1);
    if (!CHECK(ctx != NULL))
        return;
    tu_set_case("bounds after a failed quantize step");
    pikv_cache_params p = base_params(PIKV_DTYPE_INT8);
    p.n_q_heads = 1;
    p.head_dim = 4;
    const qfmt F = qfmt_make(p.page_size, 1, 4, p.dtype, p.quant_group);
    /* page A: 4 tokens of keys near +1 (quantized); page B: 2 tokens of keys near -1 (open) */
    float KA[16], VA[16], KB[8], VB[8], Kbig[8], Vbig[8], K2[8];
    tu_rng r = tu_rng_seed(5150);
    for (int i = 0; i < 16; i++) {
        KA[i] = 1.0f + tu_sym(&r, 0.1f);
        VA[i] = tu_sym(&r, 1.0f);
    }
    for (int i = 0; i < 8; i++) {
        KB[i] = -1.0f + tu_sym(&r, 0.1f);
        VB[i] = tu_sym(&r, 1.0f);
        Kbig[i] = 50.0f;
        Vbig[i] = 1.0f;
        K2[i] = -1.0f + tu_sym(&r, 0.1f);
    }
    const float q[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    pikv_select_params sel = p.select;
    sel.mode = PIKV_SELECT_QUEST;
    sel.token_budget = 4; /* page A (bound ~4) fits, page B (bound ~-4) then does not */
    const int32_t seq0 = 0;
    int hit = 0;
    /* a fresh cache per try (a failed try keeps grown index arrays, which shifts the
       allocations of the next); allocation k fails in an append of 2 rows of keys 50 that
       would fill page B */
    long long failures = 0;
    for (long long k = 0; k < 100; k++) {
        pikv_cache *c = NULL;
        if (!CHECK_OK(pikv_cache_create(ctx, &p, &c)))
            break;
        CHECK_OK(pikv_seq_add(c, 0));
        CHECK_OK(pikv_cache_append(c, 0, 0, 4, KA, VA, NULL, NULL));
        CHECK_OK(pikv_cache_append(c, 0, 0, 2, KB, VB, NULL, NULL));
        uint32_t ids[2] = {0, 0};
        seq_pages(c, 0, 0, ids, NULL, 2);
        const uint32_t id = ids[1];
        unsigned char bounds0[32];
        memcpy(bounds0, page_at(c, id) + c->layout.kmin_offset, 32);
        float o0[4], o1[4], l0 = 0, l1 = 0;
        pikv_attend_batch b;
        memset(&b, 0, sizeof b);
        b.n_queries = 1;
        b.seq_ids = &seq0;
        b.q = q;
        b.select = &sel;
        b.out = o0;
        b.lse = &l0;
        CHECK_OK(pikv_cache_attend(c, 0, &b));
        tu_fault_arm(k, 0);
        const pikv_status st = pikv_cache_append(c, 0, 0, 2, Kbig, Vbig, NULL, NULL);
        tu_fault_disarm();
        if (st != PIKV_OK && strstr(pikv_context_last_error(ctx), "quantize") != NULL) hit = 1;
        if (st != PIKV_OK) {
            failures++;
            CHECKF(memcmp(bounds0, page_at(c, id) + c->layout.kmin_offset, 32) == 0,
                   "the refused append (allocation %lld failing) widened the open page's Quest bounds", k);
            b.out = o1;
            b.lse = &l1;
            CHECK_OK(pikv_cache_attend(c, 0, &b));
            CHECKF(memcmp(o0, o1, sizeof o0) == 0 && l0 == l1,
                   "QUEST attend changed by the refused append: lse %.6g -> %.6g (reads page %s)", (double)l0,
                   (double)l1, l1 == l0 ? "A" : "B");
            /* page B fills with other keys: the quantized page's bounds are its keys' */
            if (CHECK_OK(pikv_cache_append(c, 0, 0, 2, K2, VB, NULL, NULL))) {
                float xk[16], xv[16];
                for (int i = 0; i < 8; i++) {
                    xk[i] = tu_f16_round(KB[i]);
                    xv[i] = tu_f16_round(VB[i]);
                    xk[8 + i] = tu_f16_round(K2[i]);
                    xv[8 + i] = tu_f16_round(VB[i]);
                }
                errsum es;
                memset(&es, 0, sizeof es);
                verify_qpage(c, &F, id, xk, xv, &es, "page filled after a failed quantize step");
            }
        }
        pikv_cache_free(c);
        if (st == PIKV_OK)
            break;
    }
    /* every allocation of the append was refused once; none may be in the quantize step */
    CHECKF(failures > 0 && !hit, "%lld refused appends, quantize step reached: %d", failures, hit);
    pikv_context_free(ctx);
}

/* ------------------------------------------------------------------------ */
/* 5. Bad input                                                              */
/* ------------------------------------------------------------------------ */

static void test_bad_input(void)
{
    tu_set_case("bad input");
    pikv_context *ctx = g_ctx[1];
    tu_err_ctx = ctx;
    /* a failed create sets *out to NULL: start from a valid cache pointer */
    pikv_cache *other = NULL;
    {
        pikv_cache_params p = base_params(PIKV_DTYPE_INT8);
        CHECK_OK(pikv_cache_create(ctx, &p, &other));
    }
    const int bad_dt[2] = {4, -1};
    for (int i = 0; i < 2; i++) {
        pikv_cache_params p = base_params(PIKV_DTYPE_INT8);
        p.dtype = (pikv_dtype)bad_dt[i];
        pikv_cache *c = other;
        CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_create(ctx, &p, &c));
        CHECK(c == NULL);
        CHECK(strstr(pikv_context_last_error(ctx), "dtype") != NULL);
    }
    const int groups[4] = {0, 1025, -1, 1 << 30};
    for (int i = 0; i < 4; i++)
        for (int dti = 0; dti < 2; dti++) {
            pikv_cache_params p = base_params(dti ? PIKV_DTYPE_INT4 : PIKV_DTYPE_INT8);
            p.quant_group = groups[i];
            pikv_cache *c = other;
            CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_create(ctx, &p, &c));
            CHECK(c == NULL);
            CHECK(strstr(pikv_context_last_error(ctx), "quant_group") != NULL);
        }
    const int ok_groups[2] = {1, 1024};
    for (int i = 0; i < 2; i++) {
        pikv_cache_params p = base_params(PIKV_DTYPE_INT4);
        p.quant_group = ok_groups[i];
        pikv_cache *c = NULL;
        CHECK_OK(pikv_cache_create(ctx, &p, &c));
        pikv_cache_free(c);
    }
    /* values: open pages are f16, so |x| <= 65504 */
    const pikv_dtype dts[4] = {PIKV_DTYPE_INT8, PIKV_DTYPE_INT4, PIKV_DTYPE_F16, PIKV_DTYPE_F32};
    const float bad_vals[6] = {65505.0f, -65505.0f, 65520.0f, 1e30f, INFINITY, NAN};
    for (int k = 0; k < 4; k++) {
        pikv_cache_params p = base_params(dts[k]);
        pikv_cache *c = NULL;
        if (!CHECK_OK(pikv_cache_create(ctx, &p, &c)))
            continue;
        CHECK_OK(pikv_seq_add(c, 0));
        float K[3 * 8], V[3 * 8];
        for (int i = 0; i < 24; i++)
            K[i] = V[i] = 0.5f;
        /* the extremes themselves are fine, and a page of them quantizes */
        K[3] = 65504.0f;
        V[5] = -65504.0f;
        CHECK_OK(pikv_cache_append(c, 0, 0, 3, K, V, NULL, NULL));
        CHECK_OK(pikv_cache_append(c, 0, 0, 3, K, V, NULL, NULL));
        pikv_cache_stats before, after;
        CHECK_OK(pikv_cache_get_stats(c, &before));
        for (int b = 0; b < 6; b++)
            for (int kv = 0; kv < 2; kv++) {
                float *X = kv ? V : K;
                const float keep = X[10];
                X[10] = bad_vals[b];
                pikv_status st = pikv_cache_append(c, 0, 0, 3, K, V, NULL, NULL);
                if (dts[k] == PIKV_DTYPE_F32 && isfinite(bad_vals[b]))
                    CHECKF(st == PIKV_OK, "f32 cache: %g refused", (double)bad_vals[b]);
                else
                    CHECKF(st == PIKV_ERR_INVALID_ARGUMENT, "%s cache: %s = %g: %s", dt_name(dts[k]), kv ? "v" : "k",
                           (double)bad_vals[b], pikv_status_name(st));
                X[10] = keep;
            }
        CHECK_OK(pikv_cache_get_stats(c, &after));
        if (dts[k] != PIKV_DTYPE_F32)
            CHECK(tu_stats_equal(&before, &after));
        pikv_cache_free(c);
    }
    pikv_cache_free(other);
    tu_err_ctx = NULL;
}

/* ------------------------------------------------------------------------ */

static void run(const char *name, void (*fn)(void))
{
    struct timespec t0, t1;
    const long f0 = tu_fail_count;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    fn();
    clock_gettime(CLOCK_MONOTONIC, &t1);
    tu_set_case("%s", "");
    printf("  %-16s %6.2f s  %s\n", name, (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec),
           tu_fail_count == f0 ? "ok" : "FAILED");
    fflush(stdout);
}

int main(void)
{
    for (int d = 1; d <= 4; d++) {
        g_ctx[d] = tu_context(d);
        if (!g_ctx[d])
            return 2;
    }
    run("roundtrip", test_roundtrip);
    run("midpoint", test_midpoint);
    run("attend", test_attend);
    run("memory", test_memory);
    run("copy_prefix", test_copy_prefix);
    run("balanced_twins", test_balanced_twins);
    run("rebalance_trim", test_rebalance_trim);
    run("evict", test_evict);
    run("alloc_failure", test_alloc_failure);
    run("failed_quantize", test_failed_quantize_bounds);
    run("bad_input", test_bad_input);
    for (int d = 1; d <= 4; d++)
        pikv_context_free(g_ctx[d]);
    return tu_finish();
}
