/*
 * backend_ops: cross-backend conformance of the backend ops (in the spirit of ggml's
 * test-backend-ops). White-box: it drives every device through the private interface
 * (runtime/backend-impl.h) and compares it with the CPU reference.
 *
 * The context is created with backends "all" and two CPU devices. The reference is cpu0;
 * the devices under test are every other device: cpu1 (so the harness itself runs, and
 * must match cpu0 bit for bit, without any other backend) and every non-CPU device.
 *
 * For every shape of the grid (dtype f32/f16/int8/int4 x head dim 64/80/128/256 x page
 * size 1/16/64 x GQA ratio 1/4/8; KV heads 1..3, quant groups 7/32/48/64/128, two sequences
 * of odd and even lengths from 1 to 301 tokens) both devices get identical page pools
 * (chunks from iface->buffer_alloc with 256 bytes of slack each, every byte set to a fill
 * pattern, pages on permuted slots spread over three chunks, unused slots between them)
 * and run the same ops on the same host inputs:
 *
 *  append     two calls (a page prefix, then the rest: bounds widen), permuted sources:
 *             K/V rows bit-exact (f32, f16: the f16 rounding is round-to-nearest-even,
 *             the inputs include halfway cases, subnormals and signed zeros);
 *  bounds     the Quest min/max written by append, bit-exact;
 *  quantize   (int8/int4) full open f16 pages into the quantized pool: page bytes
 *             bit-exact, every dequantized value within one quantization step of the f16
 *             value (decoded here from the documented format), err[] within 1e-5;
 *  page_copy  open->open row prefix, quantized->quantized whole page, quantized->open
 *             dequantizing prefix: destination page bytes bit-exact;
 *  score      Quest scores over lists of open and quantized pages: normalized error 1e-5;
 *  topk       budgeted top-k on the scores, on tied (rounded) scores and an empty list:
 *             the kept set must be a valid greedy selection for some order of tied entries
 *             (so ties may differ), and equal to the reference's where nothing ties;
 *  attention  per (query, KV head) page lists mixing open and quantized pages, dropped
 *             pages (selection), a partial last page, an extra query with empty lists; with
 *             and without page_lse: out, lse, page_lse normalized error 1e-5 (1e-4 with
 *             quantized pages; page_lse of a page under 1e-6 of its head's mass is compared
 *             as the mass fraction exp(page_lse - lse), which f32 cannot give as a log);
 *  merge      1/4/67 parts (past the CPU's 64-part groups), rows whose parts are all empty,
 *             with and without lse: normalized error 1e-6;
 *  buffer     buffer_write / buffer_read round trips at odd offsets and sizes;
 *  read_reduce  sums of 0..3M floats against the exact sum (1e-6 of sum |x|), floats past
 *             n planted huge (over-reads show).
 *
 * Devices of the CPU backend must match the reference exactly (tolerance 0).
 *
 * Guards: every host output buffer handed to an op has 64 guard bytes before and after it
 * (checked after the op) and its payload preset to 0xff (NaN), so an element the op does
 * not write is a mismatch. In device memory, every byte no op has written (slack after the
 * pages of a chunk, unused slots, rows past the written ones, page padding) must still hold
 * the fill pattern after each op, on the device under test and on the reference; read-only
 * ops (score, attention) must leave the pools unchanged. After each page-writing op the
 * device under test's pools are reset to the reference's bytes, so a failure does not
 * cascade into later ops. An op the device reports unsupported (supports_op false for the
 * shape's dtype) is "unsupported" and counted as skipped, never passed; its output pages
 * are then copied from the reference so later ops still run.
 *
 * Usage: backend_ops [-o OP] [-b BACKEND] [-s SHAPE] [-r] [-v]
 *   -o OP       only this op (append, bounds, quantize, page_copy, score, topk, attention,
 *               merge, buffer); the ops that build its input pages run on the reference
 *               only and their pages are copied to the device under test
 *   -b BACKEND  only devices whose backend (cpu, opencl, ...) or device name (cpu1) matches
 *   -s SHAPE    only shapes whose description contains SHAPE ("int4", "hd80", "ps1 ",
 *               "gqa8", ...)
 *   -r          fail when no device is under test (a backend expected to be there is not)
 *   -v          print every case, and every unsupported one (else the first per group)
 * Prints one line per (op, device, dtype) group and, last, "N passed, N failed, N skipped";
 * exits non-zero on any failure. Every error the library logs is a failure too; with
 * PIKV_VULKAN_VALIDATION=1 in the environment the Khronos validation layer must be on and
 * each of its errors (logged as library errors) fails the run.
 */
#include "test-util.h"

#include "backend-impl.h"

#include <time.h>

#define GUARD 64
#define DEV_FILL 0xffu  /* device pool fill: NaN as f32 and as f16 */
#define OUT_FILL 0xffu  /* host output payload preset */
#define SLACK 256       /* bytes after the pages of every chunk */
#define MAX_DUTS 64
#define MAX_DIM 256

/* ------------------------------------------------------------------------ */
/* Ops, groups, results                                                      */
/* ------------------------------------------------------------------------ */

enum {
    T_APPEND, T_BOUNDS, T_QUANTIZE, T_PAGE_COPY, T_SCORE, T_TOPK, T_ATTENTION, T_MERGE, T_BUFFER, T_READ_REDUCE,
    T_COUNT
};
static const char *const t_name[T_COUNT] = {"append", "bounds",    "quantize", "page_copy", "score",
                                            "topk",   "attention", "merge",    "buffer",    "read_reduce"};
static const int t_iface_op[T_COUNT] = {PIKV_OP_APPEND, PIKV_OP_APPEND,    PIKV_OP_QUANTIZE,
                                        PIKV_OP_PAGE_COPY, PIKV_OP_SCORE,  PIKV_OP_TOPK,
                                        PIKV_OP_ATTENTION, PIKV_OP_MERGE,  -1, PIKV_OP_READ_REDUCE};
#define N_DT 5 /* f32 f16 int8 int4, and "-" for ops without a page dtype */
static const char *const dt_name[N_DT] = {"f32", "f16", "int8", "int4", "-"};

typedef struct group {
    long passed, failed, skipped;
    double max_err;
    int unsupported_printed;
} group;

static group g_groups[T_COUNT][MAX_DUTS][N_DT];
static long g_passed, g_failed, g_skipped;

static struct {
    const char *op, *backend, *shape;
    int verbose;
    int require;     /* -r: fail when no device is under test */
} g_opt;

typedef struct dut {
    pikv_device *dev;
    int index; /* among the devices under test */
    char label[64];  /* "cpu1(cpu)" */
    int exact;       /* a CPU device: must match the reference bit for bit */
} dut;

static pikv_context *g_ctx;
static int g_reps = 2; /* cases per grid point (lengths, KV heads, quant group vary); PIKV_BACKEND_OPS_REPS */
static dut g_duts[MAX_DUTS];
static int g_n_duts;

static int op_selected(int t) { return !g_opt.op || !strcmp(g_opt.op, t_name[t]); }

static const char *status_str(pikv_status st) { return pikv_status_name(st); }

/* The one place a case's outcome is counted and printed. result: 0 pass, 1 fail, 2 skip. */
static void record(int t, const dut *d, int dt, const char *shape, int result, double err,
                   const char *fmt, ...) PIKV_PRINTF(7, 8);
static void record(int t, const dut *d, int dt, const char *shape, int result, double err,
                   const char *fmt, ...)
{
    group *g = &g_groups[t][d->index][dt];
    char detail[512] = "";
    if (fmt) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(detail, sizeof detail, fmt, ap);
        va_end(ap);
    }
    if (result == 2) {
        g->skipped++;
        g_skipped++;
        if (g_opt.verbose || !g->unsupported_printed) {
            printf("%s %s %s %s: unsupported%s\n", t_name[t], d->label, dt_name[dt], shape,
                   g_opt.verbose ? "" : " (further unsupported cases of this group: -v)");
            g->unsupported_printed = 1;
        }
        return;
    }
    if (err > g->max_err || err != err) g->max_err = err;
    if (result == 0) {
        g->passed++;
        g_passed++;
        if (g_opt.verbose) printf("%s %s %s %s: passed%s%s\n", t_name[t], d->label, dt_name[dt], shape,
                                  detail[0] ? " " : "", detail);
    } else {
        g->failed++;
        g_failed++;
        if (g_failed <= 200)
            printf("%s %s %s %s: FAILED %s\n", t_name[t], d->label, dt_name[dt], shape, detail);
        else if (g_failed == 201)
            printf("(further failures are counted but not printed)\n");
    }
    fflush(stdout);
}

/* ------------------------------------------------------------------------ */
/* Host buffers with guard bytes                                             */
/* ------------------------------------------------------------------------ */

typedef struct gbuf {
    unsigned char *base;
    size_t size;
} gbuf;

static unsigned char guard_byte(size_t i) { return (unsigned char)(0x5au + 13u * (unsigned)i); }

static void *gbuf_alloc(gbuf *g, size_t size)
{
    g->size = size;
    g->base = tu_xmalloc(size + 2 * GUARD);
    for (size_t i = 0; i < GUARD; i++) {
        g->base[i] = guard_byte(i);
        g->base[GUARD + size + i] = guard_byte(i + GUARD);
    }
    memset(g->base + GUARD, OUT_FILL, size);
    return g->base + GUARD;
}

/* Bytes of the guards that changed. */
static long gbuf_damage(const gbuf *g)
{
    long bad = 0;
    for (size_t i = 0; i < GUARD; i++) {
        bad += g->base[i] != guard_byte(i);
        bad += g->base[GUARD + g->size + i] != guard_byte(i + GUARD);
    }
    return bad;
}

static void gbuf_free(gbuf *g)
{
    free(g->base);
    g->base = NULL;
}

/* ------------------------------------------------------------------------ */
/* Comparisons                                                               */
/* ------------------------------------------------------------------------ */

/* max|a - ref| / max|ref| over finite reference values; infinities must match exactly and
   NaN anywhere is an infinite error. 0 when equal. */
static double nerr(const float *a, const float *ref, size_t n)
{
    double maxd = 0, maxr = 0;
    for (size_t i = 0; i < n; i++) {
        if (a[i] != a[i] || ref[i] != ref[i]) return INFINITY;
        if (isinf(ref[i]) || isinf(a[i])) {
            if (a[i] != ref[i]) return INFINITY;
            continue;
        }
        double d = fabs((double)a[i] - (double)ref[i]);
        maxd = d > maxd ? d : maxd;
        maxr = fabs((double)ref[i]) > maxr ? fabs((double)ref[i]) : maxr;
    }
    if (maxd == 0) return 0;
    return maxr > 0 ? maxd / maxr : INFINITY;
}

/* page_lse: where the reference page holds at least 1e-6 of its head's attention mass, the
   normalized error of the log (as nerr); below that, f32 loses the value (the CPU computes it
   against the running maximum and may even give -inf for a mass under e^-87), so the error
   of the mass fraction exp(page_lse - lse) instead. unit_of[e]: the (query, KV head) of entry e.
   *first gets the first entry past tol. */
static double plse_err(const float *a, const float *ref, const float *lse_ref, const int32_t *unit_of, int n,
                       int G, int kvh, double tol, long *first)
{
    double maxr = 0, worst = 0;
    *first = -1;
    for (int e = 0; e < n; e++)
        for (int h = 0; h < G; h++) {
            const float r = ref[(size_t)e * (size_t)G + (size_t)h];
            if (isfinite(r) && fabs((double)r) > maxr) maxr = fabs((double)r);
        }
    if (maxr == 0) maxr = 1;
    for (int e = 0; e < n; e++)
        for (int h = 0; h < G; h++) {
            const size_t i = (size_t)e * (size_t)G + (size_t)h;
            const int u = unit_of[e], q = u / kvh, g = u % kvh;
            const double l = lse_ref[((size_t)q * (size_t)kvh + (size_t)g) * (size_t)G + (size_t)h];
            double err;
            if (a[i] != a[i] || a[i] == INFINITY) err = INFINITY;
            else if (isfinite(ref[i]) && exp((double)ref[i] - l) >= 1e-6) err = isfinite(a[i]) ? fabs((double)a[i] - (double)ref[i]) / maxr : INFINITY;
            else err = fabs(exp((double)a[i] - l) - exp((double)ref[i] - l));
            if (!(err <= tol) && *first < 0) *first = (long)i;
            if (!(err <= worst)) worst = err;
        }
    return worst;
}

/* The first element where a and ref differ by more than tol (normalized as nerr), or -1. */
static long first_bad(const float *a, const float *ref, size_t n, double tol)
{
    double maxr = 0;
    for (size_t i = 0; i < n; i++)
        if (isfinite(ref[i]) && fabs((double)ref[i]) > maxr) maxr = fabs((double)ref[i]);
    for (size_t i = 0; i < n; i++) {
        if (a[i] != a[i] || ref[i] != ref[i] || isinf(a[i]) || isinf(ref[i])) {
            if (!(a[i] == ref[i])) return (long)i;
            continue;
        }
        if (fabs((double)a[i] - (double)ref[i]) > tol * maxr) return (long)i;
    }
    return -1;
}

/* ------------------------------------------------------------------------ */
/* Shapes and page pools                                                     */
/* ------------------------------------------------------------------------ */

typedef struct page {
    int seq, first_tok, rows;
    uint32_t slot;  /* open slot (its rows were appended there) */
    int64_t qslot;  /* quantized slot, or -1 */
} page;

typedef struct scen {
    int idx;
    pikv_dtype dtype;
    int quant, hd, ps, kvh, gqa, nqh, group;
    int n_seq, len[2];
    char shape[160];  /* "hd80 ps16 kvh2 gqa4 n=17,129 G7" */
    char match[200];  /* dtype + shape, for -s */
    pikv_page_layout L, QL;
    uint32_t ppc, n_chunks, n_slots;    /* open pool */
    uint32_t qppc, n_qchunks, n_qslots; /* quantized pool */
    uint64_t chunk_bytes, qchunk_bytes;
    int n_pages;
    page *pages;
    int seq_first[2], seq_pages[2];
    int32_t *rows_written;     /* per open slot: rows [0, n) written (0: untouched) */
    unsigned char *qwritten;   /* per quantized slot */
    uint32_t *spare;           /* open slots no page uses (copy destinations) */
    int n_spare;
    uint32_t *qspare;
    int n_qspare;
    int n_src;
    float *k, *v;              /* [n_src][kvh][hd] */
    int32_t *src_of;           /* token -> source row, per page order */
    float *q;                  /* [n_queries][nqh][hd] */
    int n_queries;
} scen;

typedef struct dpool {
    pikv_device *dev;
    pikv_buffer **ch, **qch;
    pikv_pool_view view, qview;
    int ok;
} dpool;

static unsigned char *g_fill; /* a chunk's worth of DEV_FILL bytes (largest chunk) */
static size_t g_fill_size;

static void ensure_fill(size_t n)
{
    if (n <= g_fill_size) return;
    free(g_fill);
    g_fill = tu_xmalloc(n);
    memset(g_fill, DEV_FILL, n);
    g_fill_size = n;
}

static void dpool_free(dpool *p, const scen *s)
{
    for (uint32_t c = 0; p->ch && c < s->n_chunks; c++)
        if (p->ch[c]) p->dev->iface->buffer_free(p->dev, p->ch[c]);
    for (uint32_t c = 0; p->qch && c < s->n_qchunks; c++)
        if (p->qch[c]) p->dev->iface->buffer_free(p->dev, p->qch[c]);
    free(p->ch);
    free(p->qch);
    memset(p, 0, sizeof *p);
}

static int dpool_make(dpool *p, const scen *s, pikv_device *dev)
{
    memset(p, 0, sizeof *p);
    p->dev = dev;
    p->ch = tu_xcalloc(s->n_chunks, sizeof *p->ch);
    p->qch = tu_xcalloc(s->n_qchunks ? s->n_qchunks : 1, sizeof *p->qch);
    ensure_fill(s->chunk_bytes > s->qchunk_bytes ? s->chunk_bytes : s->qchunk_bytes);
    for (uint32_t c = 0; c < s->n_chunks; c++) {
        pikv_status st = dev->iface->buffer_alloc(dev, s->chunk_bytes, &p->ch[c]);
        if (st == PIKV_OK) st = dev->iface->buffer_write(dev, p->ch[c], 0, g_fill, s->chunk_bytes);
        if (st != PIKV_OK) {
            printf("%s: buffer_alloc/write of %llu bytes: %s (%s)\n", dev->info.name,
                   (unsigned long long)s->chunk_bytes, status_str(st), pikv_context_last_error(g_ctx));
            return 0;
        }
    }
    for (uint32_t c = 0; c < s->n_qchunks; c++) {
        pikv_status st = dev->iface->buffer_alloc(dev, s->qchunk_bytes, &p->qch[c]);
        if (st == PIKV_OK) st = dev->iface->buffer_write(dev, p->qch[c], 0, g_fill, s->qchunk_bytes);
        if (st != PIKV_OK) {
            printf("%s: buffer_alloc/write of %llu bytes: %s (%s)\n", dev->info.name,
                   (unsigned long long)s->qchunk_bytes, status_str(st), pikv_context_last_error(g_ctx));
            return 0;
        }
    }
    p->view.layout = &s->L;
    p->view.chunks = (pikv_buffer *const *)p->ch;
    p->view.n_chunks = (int32_t)s->n_chunks;
    p->view.pages_per_chunk = s->ppc;
    p->view.quant = NULL;
    if (s->quant) {
        p->qview.layout = &s->QL;
        p->qview.chunks = (pikv_buffer *const *)p->qch;
        p->qview.n_chunks = (int32_t)s->n_qchunks;
        p->qview.pages_per_chunk = s->qppc;
        p->qview.quant = NULL;
        p->view.quant = &p->qview;
    }
    p->ok = 1;
    return 1;
}

static void shuffle_u32(tu_rng *r, uint32_t *a, int n)
{
    for (int i = n - 1; i > 0; i--) {
        int j = (int)tu_int(r, 0, i);
        uint32_t t = a[i];
        a[i] = a[j];
        a[j] = t;
    }
}

/* A value for K/V/q: mostly uniform, sometimes one that exercises f16 rounding. */
static float test_value(tu_rng *r, float amp)
{
    static const float special[] = {
        1.0f + 0x1p-11f,          /* halfway between two f16: rounds down to even */
        1.0f + 3 * 0x1p-11f,      /* halfway: rounds up to even */
        -(1.0f + 0x1p-11f),
        2.0f + 0x1p-10f,          /* halfway at a spacing of 2^-9: rounds down to even */
        -(2.0f + 3 * 0x1p-10f),   /* rounds up (in magnitude) to even */
        0x1p-20f,                 /* f16 subnormal */
        -3 * 0x1p-25f,            /* halfway between f16 subnormals */
        0x1p-26f,                 /* underflows to zero */
        0.0f, -0.0f,
        0x1.ffcp-15f,             /* just below the smallest normal f16 */
    };
    if (tu_int(r, 0, 49) == 0) return special[tu_int(r, 0, (int64_t)(sizeof special / sizeof special[0]) - 1)];
    return tu_sym(r, amp);
}

static void scen_free(scen *s)
{
    free(s->pages);
    free(s->rows_written);
    free(s->qwritten);
    free(s->spare);
    free(s->qspare);
    free(s->k);
    free(s->v);
    free(s->src_of);
    free(s->q);
    memset(s, 0, sizeof *s);
}

static const int k_hd[] = {64, 80, 128, 256};
static const int k_ps[] = {1, 16, 64};
static const int k_gqa[] = {1, 4, 8};
static const pikv_dtype k_dt[] = {PIKV_DTYPE_F32, PIKV_DTYPE_F16, PIKV_DTYPE_INT8, PIKV_DTYPE_INT4};
static const int k_len[][2] = {{1, 37}, {17, 129}, {64, 301}, {255, 3}, {33, 2}, {128, 63}};
/* 48: on int8 pages of head_dim 128 a value group count (3) that is no power of
   two, the OpenCL CPU attention's scalar fallback for value scales */
static const int k_group[] = {32, 7, 64, 128, 48};
static const int k_kvh[] = {2, 1, 3};

static void scen_make(scen *s, int idx, pikv_dtype dt, int hd, int ps, int gqa)
{
    memset(s, 0, sizeof *s);
    s->idx = idx;
    s->dtype = dt;
    s->quant = pikv_dtype_quantized(dt);
    s->hd = hd;
    s->ps = ps;
    s->gqa = gqa;
    s->kvh = k_kvh[idx % 3];
    s->nqh = s->kvh * gqa;
    s->group = k_group[(idx / 3) % (int)(sizeof k_group / sizeof *k_group)];
    s->n_seq = 2;
    s->len[0] = k_len[(idx / 2) % 6][0];
    s->len[1] = k_len[(idx / 2) % 6][1];
    snprintf(s->shape, sizeof s->shape, "hd%d ps%d kvh%d gqa%d n=%d,%d", hd, ps, s->kvh, gqa, s->len[0],
             s->len[1]);
    if (s->quant) {
        size_t n = strlen(s->shape);
        snprintf(s->shape + n, sizeof s->shape - n, " G%d", s->group);
    }
    snprintf(s->match, sizeof s->match, "%s %s ", dt_name[dt], s->shape);
    pikv_page_layout_init(&s->L, ps, s->kvh, hd, s->quant ? PIKV_DTYPE_F16 : dt, s->group);
    if (s->quant) pikv_page_layout_init(&s->QL, ps, s->kvh, hd, dt, s->group);

    tu_rng r = tu_rng_seed(0xb0a5ull * 1000003ull + (uint64_t)idx * 7919ull);
    /* pages */
    int np = 0;
    for (int q = 0; q < s->n_seq; q++) np += (s->len[q] + ps - 1) / ps;
    s->n_pages = np;
    s->pages = tu_xcalloc((size_t)np, sizeof *s->pages);
    s->n_spare = 4;
    s->n_slots = (uint32_t)(np + np / 4 + s->n_spare + 2);
    s->ppc = (s->n_slots + 2) / 3;
    s->n_chunks = (s->n_slots + s->ppc - 1) / s->ppc;
    uint32_t *perm = tu_xmalloc(s->n_slots * sizeof *perm);
    for (uint32_t i = 0; i < s->n_slots; i++) perm[i] = i;
    shuffle_u32(&r, perm, (int)s->n_slots);
    int n_quant = 0;
    for (int q = 0, p = 0; q < s->n_seq; q++) {
        s->seq_first[q] = p;
        s->seq_pages[q] = (s->len[q] + ps - 1) / ps;
        for (int j = 0; j < s->seq_pages[q]; j++, p++) {
            page *pg = &s->pages[p];
            pg->seq = q;
            pg->first_tok = j * ps;
            pg->rows = s->len[q] - j * ps < ps ? s->len[q] - j * ps : ps;
            pg->slot = perm[p];
            pg->qslot = -1;
            /* quantized shapes: most full pages are quantized, some stay open (mixed lists) */
            if (s->quant && pg->rows == ps && (n_quant == 0 || tu_int(&r, 0, 2) != 0)) pg->qslot = n_quant++;
        }
    }
    s->spare = tu_xmalloc((size_t)s->n_spare * sizeof *s->spare);
    for (int i = 0; i < s->n_spare; i++) s->spare[i] = perm[np + i];
    free(perm);
    s->rows_written = tu_xcalloc(s->n_slots, sizeof *s->rows_written);
    if (s->quant) {
        s->n_qspare = 2;
        s->n_qslots = (uint32_t)(n_quant + n_quant / 3 + s->n_qspare + 1);
        s->qppc = (s->n_qslots + 2) / 3;
        s->n_qchunks = (s->n_qslots + s->qppc - 1) / s->qppc;
        uint32_t *qp = tu_xmalloc(s->n_qslots * sizeof *qp);
        for (uint32_t i = 0; i < s->n_qslots; i++) qp[i] = i;
        shuffle_u32(&r, qp, (int)s->n_qslots);
        for (int p = 0; p < np; p++)
            if (s->pages[p].qslot >= 0) s->pages[p].qslot = qp[s->pages[p].qslot];
        s->qspare = tu_xmalloc((size_t)s->n_qspare * sizeof *s->qspare);
        for (int i = 0; i < s->n_qspare; i++) s->qspare[i] = qp[n_quant + i];
        free(qp);
        s->qwritten = tu_xcalloc(s->n_qslots, 1);
        s->qchunk_bytes = (uint64_t)s->qppc * s->QL.page_bytes + SLACK;
    }
    s->chunk_bytes = (uint64_t)s->ppc * s->L.page_bytes + SLACK;

    /* host K/V: every token of every page gets its own (permuted) source row, plus unused rows */
    int tokens = s->len[0] + s->len[1];
    s->n_src = tokens + 5;
    size_t row = (size_t)s->kvh * (size_t)hd;
    s->k = tu_xmalloc((size_t)s->n_src * row * sizeof(float));
    s->v = tu_xmalloc((size_t)s->n_src * row * sizeof(float));
    for (size_t i = 0; i < (size_t)s->n_src * row; i++) {
        s->k[i] = test_value(&r, 2.0f);
        s->v[i] = test_value(&r, 3.0f);
    }
    uint32_t *sp = tu_xmalloc((size_t)s->n_src * sizeof *sp);
    for (int i = 0; i < s->n_src; i++) sp[i] = (uint32_t)i;
    shuffle_u32(&r, sp, s->n_src);
    s->src_of = tu_xmalloc((size_t)tokens * sizeof *s->src_of);
    for (int i = 0; i < tokens; i++) s->src_of[i] = (int32_t)sp[i];
    free(sp);
    /* queries: one per sequence and one more (attention gives it empty lists) */
    s->n_queries = s->n_seq + 1;
    size_t nq = (size_t)s->n_queries * (size_t)s->nqh * (size_t)hd;
    s->q = tu_xmalloc(nq * sizeof(float));
    for (size_t i = 0; i < nq; i++) s->q[i] = tu_sym(&r, 1.0f);
}

/* Token t of page p: its row in the page-order token list. */
static int page_token_base(const scen *s, int p)
{
    const page *pg = &s->pages[p];
    return (pg->seq == 0 ? 0 : s->len[0]) + pg->first_tok;
}

static uint32_t page_list_slot(const page *pg)
{
    return pg->qslot >= 0 ? ((uint32_t)pg->qslot | PIKV_SLOT_QUANT) : pg->slot;
}

/* ------------------------------------------------------------------------ */
/* Device pool comparison                                                    */
/* ------------------------------------------------------------------------ */

typedef struct cmp_res {
    long data, bounds, stray, ref_stray, io;
    char first[256];
} cmp_res;

static long count_not_fill(const unsigned char *b, uint64_t from, uint64_t to)
{
    long n = 0;
    for (uint64_t i = from; i < to; i++) n += b[i] != DEV_FILL;
    return n;
}

static void note_first(cmp_res *r, const char *fmt, ...) PIKV_PRINTF(2, 3);
static void note_first(cmp_res *r, const char *fmt, ...)
{
    if (r->first[0]) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->first, sizeof r->first, fmt, ap);
    va_end(ap);
}

static long count_diff(const unsigned char *a, const unsigned char *b, uint64_t n, uint64_t *first)
{
    long d = 0;
    for (uint64_t i = 0; i < n; i++)
        if (a[i] != b[i]) {
            if (d == 0) *first = i;
            d++;
        }
    return d;
}

/* Unwritten parts of bytes [base, base + page) of an open page with `rows` rows written,
   on both buffers: they must still be fill. */
static void check_unwritten_open(const scen *s, const unsigned char *A, const unsigned char *B, uint64_t base,
                                 int rows, uint32_t slot, cmp_res *r)
{
    const pikv_page_layout *L = &s->L;
    for (int kv = 0; kv < 2; kv++)
        for (int g = 0; g < s->kvh; g++) {
            uint64_t h = base + (kv ? L->v_offset : L->k_offset) + (uint64_t)g * L->head_stride;
            uint64_t from = h + (uint64_t)rows * L->row_bytes, to = h + (uint64_t)L->page_size * L->row_bytes;
            long a = count_not_fill(A, from, to), b = count_not_fill(B, from, to);
            r->ref_stray += a;
            r->stray += b;
            if (b) note_first(r, "open slot %u: %ld bytes written past row %d of %s head %d", slot, b, rows,
                              kv ? "V" : "K", g);
        }
    const uint64_t bounds_end = L->kmax_offset + (uint64_t)s->kvh * (uint64_t)s->hd * 4;
    long a = count_not_fill(A, base + L->data_bytes, base + L->kmin_offset) +
             count_not_fill(A, base + bounds_end, base + L->page_bytes);
    long b = count_not_fill(B, base + L->data_bytes, base + L->kmin_offset) +
             count_not_fill(B, base + bounds_end, base + L->page_bytes);
    r->ref_stray += a;
    r->stray += b;
    if (b) note_first(r, "open slot %u: %ld bytes of page padding written", slot, b);
}

/* Reads every chunk of both pools, compares them and checks the fill; then (sync) writes
   the reference's bytes into the device under test's chunks. */
static void compare_pools(const scen *s, dpool *ref, dpool *tst, cmp_res *r, int sync)
{
    memset(r, 0, sizeof *r);
    const pikv_page_layout *L = &s->L;
    size_t maxb = (size_t)(s->chunk_bytes > s->qchunk_bytes ? s->chunk_bytes : s->qchunk_bytes);
    unsigned char *A = tu_xmalloc(maxb), *B = tu_xmalloc(maxb);
    for (int pool = 0; pool < 1 + s->quant; pool++) {
        const uint32_t nch = pool ? s->n_qchunks : s->n_chunks, ppc = pool ? s->qppc : s->ppc;
        const uint32_t nslots = pool ? s->n_qslots : s->n_slots;
        const uint64_t cb = pool ? s->qchunk_bytes : s->chunk_bytes;
        const uint64_t pb = pool ? s->QL.page_bytes : L->page_bytes;
        for (uint32_t c = 0; c < nch; c++) {
            pikv_buffer *ba = pool ? ref->qch[c] : ref->ch[c], *bb = pool ? tst->qch[c] : tst->ch[c];
            pikv_status sa = ref->dev->iface->buffer_read(ref->dev, ba, 0, A, cb);
            pikv_status sb = tst->dev->iface->buffer_read(tst->dev, bb, 0, B, cb);
            if (sa != PIKV_OK || sb != PIKV_OK) {
                r->io++;
                note_first(r, "buffer_read: %s / %s", status_str(sa), status_str(sb));
                continue;
            }
            for (uint32_t j = 0; j < ppc; j++) {
                const uint32_t slot = c * ppc + j;
                const uint64_t base = (uint64_t)j * pb;
                const int written = slot < nslots ? (pool ? s->qwritten[slot] : s->rows_written[slot] > 0) : 0;
                if (!written) {
                    long a = count_not_fill(A, base, base + pb), b = count_not_fill(B, base, base + pb);
                    r->ref_stray += a;
                    r->stray += b;
                    if (b) note_first(r, "%s slot %u (unused): %ld bytes written", pool ? "quantized" : "open",
                                      slot, b);
                    continue;
                }
                if (pool) { /* a quantized page: all of it is the quantize op's output */
                    uint64_t at = 0;
                    long d = count_diff(A + base, B + base, pb, &at);
                    r->data += d;
                    if (d) note_first(r, "quantized slot %u: %ld bytes differ, first at byte %llu of %llu", slot,
                                      d, (unsigned long long)at, (unsigned long long)pb);
                    continue;
                }
                const int rows = s->rows_written[slot];
                for (int kv = 0; kv < 2; kv++)
                    for (int g = 0; g < s->kvh; g++) {
                        uint64_t h = base + (kv ? L->v_offset : L->k_offset) + (uint64_t)g * L->head_stride;
                        uint64_t at = 0;
                        long d = count_diff(A + h, B + h, (uint64_t)rows * L->row_bytes, &at);
                        r->data += d;
                        if (d)
                            note_first(r, "open slot %u: %s head %d row %llu: %ld bytes differ", slot,
                                       kv ? "V" : "K", g, (unsigned long long)(at / L->row_bytes), d);
                    }
                uint64_t at = 0;
                const uint64_t nb = 2 * (uint64_t)s->kvh * (uint64_t)s->hd * 4;
                long d = count_diff(A + base + L->kmin_offset, B + base + L->kmin_offset, nb, &at);
                r->bounds += d;
                if (d) {
                    float fa, fb;
                    uint64_t e = at / 4 * 4;
                    memcpy(&fa, A + base + L->kmin_offset + e, 4);
                    memcpy(&fb, B + base + L->kmin_offset + e, 4);
                    note_first(r, "open slot %u: %s bound of head %d channel %d: %.9g, reference %.9g", slot,
                               e < nb / 2 ? "min" : "max", (int)((e % (nb / 2)) / 4 / (uint64_t)s->hd),
                               (int)((e / 4) % (uint64_t)s->hd), (double)fb, (double)fa);
                }
                check_unwritten_open(s, A, B, base, rows, slot, r);
            }
            long a = count_not_fill(A, (uint64_t)ppc * pb, cb), b = count_not_fill(B, (uint64_t)ppc * pb, cb);
            r->ref_stray += a;
            r->stray += b;
            if (b) note_first(r, "%s chunk %u: %ld bytes of the slack after its pages written",
                              pool ? "quantized" : "open", c, b);
            if (sync && memcmp(A, B, (size_t)cb) != 0) {
                pikv_status st = tst->dev->iface->buffer_write(tst->dev, bb, 0, A, cb);
                if (st != PIKV_OK) {
                    r->io++;
                    note_first(r, "buffer_write: %s", status_str(st));
                }
            }
        }
    }
    free(A);
    free(B);
}

static void sync_dev(pikv_device *d)
{
    if (d->iface->synchronize) d->iface->synchronize(d);
}

/* ------------------------------------------------------------------------ */
/* The ops                                                                   */
/* ------------------------------------------------------------------------ */

static int dt_index(const scen *s) { return (int)s->dtype; }

/* -1: not selected (not counted); 0: unsupported (counted as skipped); 1: run it */
static int want_case(int t, const dut *d, const scen *s, pikv_dtype dtype)
{
    if (!op_selected(t)) return -1;
    (void)s;
    if (t_iface_op[t] >= 0 && !d->dev->iface->supports_op(d->dev, (pikv_op)t_iface_op[t], dtype)) return 0;
    return 1;
}

static double tol_for(const dut *d, double tol) { return d->exact ? 0.0 : tol; }

/* append: two calls, then page bytes and bounds. Returns 0 when the pools could not be set. */
/* Zero copy (backends with addressable memory: memory_read set): a buffer of the
   device's own memory stands in for an engine's tensor; its address is the host
   pointer on host-visible backends, else the handle (a CUDA device pointer). */
static int has_zero_copy(const pikv_device *dev) { return dev->iface->memory_read != NULL; }

static void *device_copy(pikv_device *dev, const void *src, size_t bytes, pikv_buffer **buf)
{
    *buf = NULL;
    if (dev->iface->buffer_alloc(dev, bytes ? bytes : 1, buf) != PIKV_OK) return NULL;
    void *addr = (*buf)->host ? (*buf)->host : (*buf)->handle;
    if (src && bytes && dev->iface->memory_write(dev, addr, src, bytes) != PIKV_OK) {
        dev->iface->buffer_free(dev, *buf);
        *buf = NULL;
        return NULL;
    }
    return addr;
}

/* zero_copy: k and v are passed in the device's memory (src_on_device). */
static void run_append_on(const scen *s, dpool *p, int phase, const int *split, int zero_copy, pikv_status *st)
{
    pikv_page_write *w = tu_xcalloc((size_t)s->n_pages, sizeof *w);
    int32_t *idx = tu_xmalloc((size_t)(s->len[0] + s->len[1]) * sizeof *idx);
    int nw = 0, ni = 0;
    /* writes in a page order that is not the slot order */
    for (int i = 0; i < s->n_pages; i++) {
        int pidx = (i * 7 + s->idx) % s->n_pages;
        if (s->n_pages % 7 == 0) pidx = i;
        const page *pg = &s->pages[pidx];
        int r0 = phase == 0 ? 0 : split[pidx], r1 = phase == 0 ? split[pidx] : pg->rows;
        if (r1 <= r0) continue;
        w[nw].slot = pg->slot;
        w[nw].row0 = r0;
        w[nw].n_rows = r1 - r0;
        w[nw].src_begin = ni;
        nw++;
        for (int t = r0; t < r1; t++) idx[ni++] = s->src_of[page_token_base(s, pidx) + t];
    }
    pikv_append_args a;
    memset(&a, 0, sizeof a);
    a.pool = &p->view;
    a.n_writes = nw;
    a.writes = w;
    a.src_index = idx;
    a.k = s->k;
    a.v = s->v;
    pikv_buffer *bk = NULL, *bv = NULL;
    if (zero_copy) {
        const size_t bytes = (size_t)s->n_src * (size_t)s->kvh * (size_t)s->hd * sizeof(float);
        a.k = device_copy(p->dev, s->k, bytes, &bk);
        a.v = device_copy(p->dev, s->v, bytes, &bv);
        a.src_on_device = 1;
    }
    *st = zero_copy && (!a.k || !a.v) ? PIKV_ERR_BACKEND : p->dev->iface->append(p->dev, &a);
    sync_dev(p->dev);
    if (bk) p->dev->iface->buffer_free(p->dev, bk);
    if (bv) p->dev->iface->buffer_free(p->dev, bv);
    free(w);
    free(idx);
}

static void report_cmp(int t, const dut *d, int dt, const char *shape, const cmp_res *c, long diff,
                       const char *what)
{
    long bad = diff + c->stray + c->ref_stray + c->io;
    if (!bad) {
        record(t, d, dt, shape, 0, 0, NULL);
        return;
    }
    record(t, d, dt, shape, 1, INFINITY,
           "%s: %ld bytes differ from the reference, %ld stray bytes written in device memory (reference: %ld), "
           "%ld I/O errors; first: %s",
           what, diff, c->stray, c->ref_stray, c->io, c->first);
}

static void step_append(scen *s, dpool *ref, dpool *dut_p, const dut *d)
{
    int *split = tu_xmalloc((size_t)s->n_pages * sizeof *split);
    tu_rng r = tu_rng_seed(0xa99e9dull + (uint64_t)s->idx);
    for (int p = 0; p < s->n_pages; p++) {
        int rows = s->pages[p].rows;
        split[p] = rows == 1 || tu_int(&r, 0, 3) == 0 ? rows : (int)tu_int(&r, 1, rows - 1);
    }
    const int dt = dt_index(s);
    const int wa = want_case(T_APPEND, d, s, s->dtype);
    const int wb = want_case(T_BOUNDS, d, s, s->dtype);
    /* an unselected (-o) or unsupported op runs on the reference only; its pages are copied */
    const int run_dut = wa > 0 || wb > 0;
    pikv_status sr = PIKV_OK, sd = PIKV_OK, st;
    /* every other case reads K/V from the device's own memory where it can (zero copy) */
    const int zero_copy = has_zero_copy(d->dev) && (s->idx & 1);
    for (int phase = 0; phase < 2; phase++) {
        run_append_on(s, ref, phase, split, 0, &st);
        if (st != PIKV_OK) sr = st;
        if (run_dut) {
            run_append_on(s, dut_p, phase, split, zero_copy, &st);
            if (st != PIKV_OK) sd = st;
        }
    }
    for (int p = 0; p < s->n_pages; p++) s->rows_written[s->pages[p].slot] = s->pages[p].rows;
    free(split);
    cmp_res c;
    compare_pools(s, ref, dut_p, &c, 1);
    if (wa == 0) record(T_APPEND, d, dt, s->shape, 2, 0, NULL);
    if (wb == 0) record(T_BOUNDS, d, dt, s->shape, 2, 0, NULL);
    if (!run_dut) return;
    if (sr != PIKV_OK || sd != PIKV_OK) {
        record(wa > 0 ? T_APPEND : T_BOUNDS, d, dt, s->shape, 1, INFINITY, "status %s, reference %s (%s)",
               status_str(sd), status_str(sr), pikv_context_last_error(g_ctx));
        return;
    }
    if (wa > 0) report_cmp(T_APPEND, d, dt, s->shape, &c, c.data, "K/V rows");
    if (wb > 0) {
        cmp_res cb = c;
        cb.stray = cb.ref_stray = 0; /* counted by append */
        report_cmp(T_BOUNDS, d, dt, s->shape, &cb, c.bounds, "Quest bounds");
    }
}

/* Decodes value row t of KV head g of a quantized page (the documented format). */
static void decode_q(const scen *s, const unsigned char *pg, int g, int t, int is_key, float *out)
{
    const pikv_page_layout *Q = &s->QL;
    const unsigned char *row =
        pg + (is_key ? Q->k_offset : Q->v_offset) + (uint64_t)g * Q->head_stride + (uint64_t)t * Q->row_bytes;
    for (int dd = 0; dd < s->hd; dd++) {
        uint32_t q = Q->dtype == PIKV_DTYPE_INT8 ? row[dd] : (dd & 1) ? (uint32_t)row[dd / 2] >> 4 : row[dd / 2] & 0xfu;
        uint16_t sc, ze;
        size_t at;
        if (is_key) {
            at = ((size_t)g * (size_t)Q->k_groups + (size_t)(t / Q->group)) * (size_t)s->hd + (size_t)dd;
            memcpy(&sc, pg + Q->kscale_offset + 2 * at, 2);
            memcpy(&ze, pg + Q->kzero_offset + 2 * at, 2);
        } else {
            at = ((size_t)g * (size_t)s->ps + (size_t)t) * (size_t)Q->v_groups + (size_t)(dd / Q->group);
            memcpy(&sc, pg + Q->vscale_offset + 2 * at, 2);
            memcpy(&ze, pg + Q->vzero_offset + 2 * at, 2);
        }
        const float scale = tu_f16_to_f32(sc), zero = tu_f16_to_f32(ze);
        out[dd] = (float)q * scale + zero;
        out[MAX_DIM + dd] = scale; /* the step */
    }
}

static pikv_status read_page(dpool *p, const scen *s, uint32_t slot, unsigned char *dst)
{
    const int q = (slot & PIKV_SLOT_QUANT) != 0;
    slot &= ~PIKV_SLOT_QUANT;
    const uint32_t ppc = q ? s->qppc : s->ppc;
    const uint64_t pb = q ? s->QL.page_bytes : s->L.page_bytes;
    pikv_buffer *b = q ? p->qch[slot / ppc] : p->ch[slot / ppc];
    return p->dev->iface->buffer_read(p->dev, b, (uint64_t)(slot % ppc) * pb, dst, pb);
}

static void step_quantize(scen *s, dpool *ref, dpool *dut_p, const dut *d)
{
    if (!s->quant) return;
    const int dt = dt_index(s);
    const int w = want_case(T_QUANTIZE, d, s, s->dtype);
    const int run_dut = w > 0;
    double err_ref[5] = {0}, err_dut[5] = {0};
    pikv_status sr = PIKV_OK, sd = PIKV_OK;
    int n = 0;
    for (int p = 0; p < s->n_pages; p++) {
        const page *pg = &s->pages[p];
        if (pg->qslot < 0) continue;
        n++;
        pikv_quantize_args a;
        memset(&a, 0, sizeof a);
        a.pool = &ref->view;
        a.src_slot = pg->slot;
        a.dst_slot = (uint32_t)pg->qslot;
        memcpy(a.err, err_ref, sizeof a.err);
        pikv_status st = ref->dev->iface->quantize(ref->dev, &a);
        if (st != PIKV_OK) sr = st;
        memcpy(err_ref, a.err, sizeof a.err);
        if (run_dut) {
            a.pool = &dut_p->view;
            memcpy(a.err, err_dut, sizeof a.err);
            st = d->dev->iface->quantize(d->dev, &a);
            if (st != PIKV_OK) sd = st;
            memcpy(err_dut, a.err, sizeof a.err);
        }
        s->qwritten[pg->qslot] = 1;
    }
    sync_dev(ref->dev);
    sync_dev(d->dev);
    /* one step: the device under test's quantized pages against the open f16 pages */
    double max_steps = 0;
    long over = 0;
    char first[200] = "";
    if (run_dut && w > 0 && sd == PIKV_OK) {
        unsigned char *op = tu_xmalloc(s->L.page_bytes), *qp = tu_xmalloc(s->QL.page_bytes);
        float *x = tu_xmalloc(2 * MAX_DIM * sizeof(float));
        for (int p = 0; p < s->n_pages; p++) {
            const page *pg = &s->pages[p];
            if (pg->qslot < 0) continue;
            if (read_page(dut_p, s, pg->slot, op) != PIKV_OK ||
                read_page(dut_p, s, (uint32_t)pg->qslot | PIKV_SLOT_QUANT, qp) != PIKV_OK) {
                over++;
                continue;
            }
            for (int kv = 0; kv < 2; kv++)
                for (int g = 0; g < s->kvh; g++)
                    for (int t = 0; t < s->ps; t++) {
                        decode_q(s, qp, g, t, kv == 0, x);
                        const unsigned char *src = op + (kv ? s->L.v_offset : s->L.k_offset) +
                                                   (uint64_t)g * s->L.head_stride + (uint64_t)t * s->L.row_bytes;
                        for (int dd = 0; dd < s->hd; dd++) {
                            uint16_t h;
                            memcpy(&h, src + 2 * dd, 2);
                            const double xv = tu_f16_to_f32(h), e = fabs((double)x[dd] - xv), step = x[MAX_DIM + dd];
                            const double steps = step > 0 ? e / step : (e > 0 ? INFINITY : 0);
                            if (!(e <= step)) {
                                if (!over)
                                    snprintf(first, sizeof first, "slot %u %s head %d row %d ch %d: %.9g vs f16 %.9g, step %.3g",
                                             (unsigned)pg->qslot, kv ? "V" : "K", g, t, dd, (double)x[dd], xv, step);
                                over++;
                            }
                            if (!(steps <= max_steps)) max_steps = steps;
                        }
                    }
        }
        free(op);
        free(qp);
        free(x);
    }
    cmp_res c;
    compare_pools(s, ref, dut_p, &c, 1);
    if (w == 0) record(T_QUANTIZE, d, dt, s->shape, 2, 0, NULL);
    if (w <= 0 || !run_dut) return;
    char shape[200];
    snprintf(shape, sizeof shape, "%s pages=%d", s->shape, n);
    if (sr != PIKV_OK || sd != PIKV_OK) {
        record(T_QUANTIZE, d, dt, shape, 1, INFINITY, "status %s, reference %s (%s)", status_str(sd),
               status_str(sr), pikv_context_last_error(g_ctx));
        return;
    }
    double eerr = 0;
    for (int i = 0; i < 5; i++) {
        double den = fabs(err_ref[i]) > 1e-30 ? fabs(err_ref[i]) : 1e-30;
        double e = err_dut[i] == err_ref[i] ? 0 : fabs(err_dut[i] - err_ref[i]) / den;
        eerr = e > eerr || e != e ? e : eerr;
    }
    const double etol = tol_for(d, 1e-5);
    long bad = c.data + c.stray + c.ref_stray + c.io + over;
    if (!bad && eerr <= etol) {
        record(T_QUANTIZE, d, dt, shape, 0, eerr, "max %.3f steps", max_steps);
        return;
    }
    record(T_QUANTIZE, d, dt, shape, 1, INFINITY,
           "%ld page bytes differ, %ld stray bytes (reference %ld), %ld values past one step (max %.3g steps%s%s), "
           "err[] rel. error %.3g (tol %.0e); first: %s",
           c.data, c.stray, c.ref_stray, over, max_steps, first[0] ? ": " : "", first, eerr, etol, c.first);
}

static void step_page_copy(scen *s, dpool *ref, dpool *dut_p, const dut *d)
{
    const int dt = dt_index(s);
    tu_rng r = tu_rng_seed(0xc0b1ull + (uint64_t)s->idx);
    const int w = want_case(T_PAGE_COPY, d, s, s->dtype);
    const int run_dut = w > 0;
    /* the copies: {src, dst, rows, kind} */
    struct { uint32_t src, dst; int rows, of; const char *kind; } cp[4];
    int n = 0, spare = 0;
    /* open -> open: a prefix of a partial open page, and one of a full open page (or of any
       other open page) */
    for (int want_full = 0; want_full < 2; want_full++) {
        int pick = -1;
        for (int p = 0; p < s->n_pages; p++) {
            const page *pg = &s->pages[p];
            if (pg->qslot >= 0 || (n == 1 && pg->slot == cp[0].src)) continue;
            if ((pg->rows == s->ps) == want_full) pick = p; /* the last such page */
            else if (pick < 0 && want_full) pick = p;
        }
        if (pick < 0) continue;
        cp[n].src = s->pages[pick].slot;
        cp[n].dst = s->spare[spare++];
        cp[n].rows = (int)tu_int(&r, 1, s->pages[pick].rows);
        cp[n].of = s->pages[pick].rows;
        cp[n].kind = "open->open";
        n++;
    }
    if (s->quant) {
        for (int p = 0; p < s->n_pages; p++)
            if (s->pages[p].qslot >= 0) {
                cp[n].src = (uint32_t)s->pages[p].qslot | PIKV_SLOT_QUANT;
                cp[n].dst = s->qspare[0] | PIKV_SLOT_QUANT;
                cp[n].rows = cp[n].of = s->ps;
                cp[n].kind = "quant->quant";
                n++;
                cp[n].src = (uint32_t)s->pages[p].qslot | PIKV_SLOT_QUANT;
                cp[n].dst = s->spare[spare++];
                cp[n].rows = (int)tu_int(&r, 1, s->ps);
                cp[n].of = s->ps;
                cp[n].kind = "quant->open";
                n++;
                break;
            }
    }
    for (int i = 0; i < n; i++) {
        pikv_page_copy_args a;
        memset(&a, 0, sizeof a);
        a.pool = &ref->view;
        a.src_slot = cp[i].src;
        a.dst_slot = cp[i].dst;
        a.n_rows = cp[i].rows;
        pikv_status sr = ref->dev->iface->page_copy(ref->dev, &a), sd = PIKV_OK;
        sync_dev(ref->dev);
        if (run_dut) {
            a.pool = &dut_p->view;
            sd = d->dev->iface->page_copy(d->dev, &a);
            sync_dev(d->dev);
        }
        if (cp[i].dst & PIKV_SLOT_QUANT)
            s->qwritten[cp[i].dst & ~PIKV_SLOT_QUANT] = 1;
        else if (s->rows_written[cp[i].dst] < cp[i].rows)
            s->rows_written[cp[i].dst] = cp[i].rows;
        cmp_res c;
        compare_pools(s, ref, dut_p, &c, 1);
        char shape[220];
        snprintf(shape, sizeof shape, "%s %s rows=%d/%d", s->shape, cp[i].kind, cp[i].rows, cp[i].of);
        if (w == 0) record(T_PAGE_COPY, d, dt, shape, 2, 0, NULL);
        if (w <= 0 || !run_dut) continue;
        if (sr != PIKV_OK || sd != PIKV_OK) {
            record(T_PAGE_COPY, d, dt, shape, 1, INFINITY, "status %s, reference %s (%s)", status_str(sd),
                   status_str(sr), pikv_context_last_error(g_ctx));
            continue;
        }
        report_cmp(T_PAGE_COPY, d, dt, shape, &c, c.data + c.bounds, "destination page");
    }
}

/* Candidate lists for score: query i gets the pages of sequence i (query 2: those of both),
   plus the copies' destinations for query 0. */
static int build_candidates(const scen *s, int32_t *indptr, uint32_t *slots)
{
    int n = 0;
    indptr[0] = 0;
    for (int i = 0; i < s->n_queries; i++) {
        for (int p = 0; p < s->n_pages; p++)
            if (s->pages[p].seq == i || i == s->n_seq) slots[n++] = page_list_slot(&s->pages[p]);
        if (i == 0)
            for (int j = 0; j < s->n_spare; j++)
                if (s->rows_written[s->spare[j]] > 0) slots[n++] = s->spare[j];
        indptr[i + 1] = n;
    }
    return n;
}

static void step_score_topk(scen *s, dpool *ref, dpool *dut_p, const dut *d)
{
    const int dt = dt_index(s);
    const int w = want_case(T_SCORE, d, s, s->dtype);
    const int run_dut = w > 0;
    int32_t *indptr = tu_xmalloc((size_t)(s->n_queries + 1) * sizeof *indptr);
    uint32_t *slots = tu_xmalloc((size_t)(2 * s->n_pages + s->n_spare) * sizeof *slots);
    const int n = build_candidates(s, indptr, slots);
    gbuf gr, gd;
    float *sc_ref = gbuf_alloc(&gr, (size_t)n * (size_t)s->kvh * sizeof(float));
    float *sc_dut = gbuf_alloc(&gd, (size_t)n * (size_t)s->kvh * sizeof(float));
    pikv_score_args a;
    memset(&a, 0, sizeof a);
    a.pool = &ref->view;
    a.n_queries = s->n_queries;
    a.n_q_heads = s->nqh;
    a.q = s->q;
    a.indptr = indptr;
    a.slots = slots;
    a.scores = sc_ref;
    pikv_status sr = ref->dev->iface->score(ref->dev, &a), sd = PIKV_OK;
    sync_dev(ref->dev);
    if (run_dut && w > 0) {
        a.pool = &dut_p->view;
        a.scores = sc_dut;
        sd = d->dev->iface->score(d->dev, &a);
        sync_dev(d->dev);
        cmp_res c;
        compare_pools(s, ref, dut_p, &c, 1);
        const double tol = tol_for(d, 1e-5);
        const long guard = gbuf_damage(&gd) + gbuf_damage(&gr);
        if (sr != PIKV_OK || sd != PIKV_OK)
            record(T_SCORE, d, dt, s->shape, 1, INFINITY, "status %s, reference %s (%s)", status_str(sd),
                   status_str(sr), pikv_context_last_error(g_ctx));
        else {
            const double e = nerr(sc_dut, sc_ref, (size_t)n * (size_t)s->kvh);
            if (e <= tol && !guard && !c.stray && !c.ref_stray && !c.data && !c.bounds && !c.io)
                record(T_SCORE, d, dt, s->shape, 0, e, "err %.2e", e);
            else
                record(T_SCORE, d, dt, s->shape, 1, e,
                       "normalized error %.3g (tol %.0e), %ld guard bytes overwritten, pools changed: %ld bytes "
                       "(%ld stray); %s",
                       e, tol, guard, c.data + c.bounds, c.stray + c.ref_stray, c.first);
        }
    } else if (w == 0) {
        record(T_SCORE, d, dt, s->shape, 2, 0, NULL);
    }

    /* top-k over lists built from the reference scores (dtype-independent: f32 shapes only) */
    if (s->dtype == PIKV_DTYPE_F32 && sr == PIKV_OK) {
        const int wt = want_case(T_TOPK, d, s, PIKV_DTYPE_F32);
        if (wt == 0) record(T_TOPK, d, 4, s->shape, 2, 0, NULL);
        if (wt > 0) {
            tu_rng r = tu_rng_seed(0x70bcull + (uint64_t)s->idx);
            /* lists: (query, head) of the scores, the same with rounded (tied) scores, an
               empty list, and a long list of random small integers (many ties) */
            const int n_lists = 2 * s->n_queries * s->kvh + 2;
            const int n_ent = 2 * n * s->kvh + 200;
            int32_t *lp = tu_xmalloc((size_t)(n_lists + 1) * sizeof *lp);
            float *es = tu_xmalloc((size_t)n_ent * sizeof *es);
            int32_t *et = tu_xmalloc((size_t)n_ent * sizeof *et);
            int64_t *bud = tu_xmalloc((size_t)n_lists * sizeof *bud);
            int l = 0, e = 0;
            lp[0] = 0;
            for (int tied = 0; tied < 2; tied++)
                for (int i = 0; i < s->n_queries; i++)
                    for (int g = 0; g < s->kvh; g++) {
                        int64_t total = 0;
                        for (int c = indptr[i]; c < indptr[i + 1]; c++) {
                            float v = sc_ref[(size_t)c * (size_t)s->kvh + (size_t)g];
                            es[e] = tied ? floorf(v * 0.25f) : v;
                            const uint32_t sl = slots[c];
                            int rows = s->ps;
                            if (!(sl & PIKV_SLOT_QUANT)) rows = s->rows_written[sl];
                            et[e++] = rows;
                            total += rows;
                        }
                        bud[l] = tu_int(&r, 0, 3) == 0 ? total + 1 : tu_int(&r, 0, total);
                        lp[++l] = e;
                        if (l == s->n_queries * s->kvh) { /* an empty list */
                            bud[l] = 5;
                            lp[++l] = e;
                        }
                    }
            for (int i = 0; i < 200; i++) {
                es[e] = (float)tu_int(&r, 0, 9);
                et[e++] = (int32_t)tu_int(&r, 1, 64);
            }
            bud[l] = tu_int(&r, 100, 4000);
            lp[++l] = e;
            gbuf kr, kd;
            uint8_t *keep_ref = gbuf_alloc(&kr, (size_t)e), *keep_dut = gbuf_alloc(&kd, (size_t)e);
            pikv_topk_args ta;
            memset(&ta, 0, sizeof ta);
            ta.n_lists = l;
            ta.indptr = lp;
            ta.scores = es;
            ta.tokens = et;
            ta.budget = bud;
            ta.keep = keep_ref;
            pikv_status tr = ref->dev->iface->topk(ref->dev, &ta);
            sync_dev(ref->dev);
            ta.keep = keep_dut;
            pikv_status td = d->dev->iface->topk(d->dev, &ta);
            sync_dev(d->dev);
            const long guard = gbuf_damage(&kr) + gbuf_damage(&kd);
            long invalid = 0, differ = 0, untied_differ = 0;
            char first[200] = "";
            int *ord = tu_xmalloc((size_t)(e > 0 ? e : 1) * sizeof *ord);
            for (int li = 0; li < l && tr == PIKV_OK && td == PIKV_OK; li++) {
                const int b = lp[li], m = lp[li + 1] - b;
                /* order by score descending (insertion sort: lists are short) */
                for (int i = 0; i < m; i++) {
                    int j = i;
                    while (j > 0 && es[b + ord[j - 1]] < es[b + i]) {
                        ord[j] = ord[j - 1];
                        j--;
                    }
                    ord[j] = i;
                }
                int64_t left = bud[li];
                for (int i = 0; i < m;) {
                    int j = i;
                    while (j < m && es[b + ord[j]] == es[b + ord[i]]) j++;
                    int64_t kept = 0;
                    for (int x = i; x < j; x++) {
                        const int en = b + ord[x];
                        if (keep_dut[en] > 1) {
                            invalid++;
                            if (!first[0]) snprintf(first, sizeof first, "list %d entry %d: keep = %u", li, ord[x], keep_dut[en]);
                        }
                        if (keep_dut[en] == 1) kept += et[en];
                        if (keep_dut[en] != keep_ref[en]) {
                            differ++;
                            if (j - i == 1) untied_differ++;
                        }
                    }
                    /* valid for some order of the tied entries: the kept ones fit, and each
                       dropped one does not fit in what they leave */
                    int ok = kept <= left;
                    for (int x = i; x < j && ok; x++)
                        if (keep_dut[b + ord[x]] == 0 && et[b + ord[x]] <= left - kept) ok = 0;
                    if (!ok) {
                        invalid++;
                        if (!first[0])
                            snprintf(first, sizeof first, "list %d: entries of score %g: %lld tokens kept of %lld left",
                                     li, (double)es[b + ord[i]], (long long)kept, (long long)left);
                    }
                    left -= kept;
                    i = j;
                }
            }
            free(ord);
            char shape[200];
            snprintf(shape, sizeof shape, "%s lists=%d entries=%d", s->shape, l, e);
            if (tr != PIKV_OK || td != PIKV_OK)
                record(T_TOPK, d, 4, shape, 1, INFINITY, "status %s, reference %s (%s)", status_str(td),
                       status_str(tr), pikv_context_last_error(g_ctx));
            else if (!invalid && !guard && !untied_differ && !(d->exact && differ))
                record(T_TOPK, d, 4, shape, 0, 0, "%ld tied entries chosen differently", differ);
            else
                record(T_TOPK, d, 4, shape, 1, INFINITY,
                       "%ld invalid selections, %ld entries differ (%ld without a tie), %ld guard bytes "
                       "overwritten; first: %s",
                       invalid, differ, untied_differ, guard, first);
            gbuf_free(&kr);
            gbuf_free(&kd);
            free(lp);
            free(es);
            free(et);
            free(bud);
        }
    }
    gbuf_free(&gr);
    gbuf_free(&gd);
    free(indptr);
    free(slots);
}

static void step_attention(scen *s, dpool *ref, dpool *dut_p, const dut *d)
{
    const int dt = dt_index(s);
    const int w = want_case(T_ATTENTION, d, s, s->dtype);
    if (w < 0) return;
    tu_rng r = tu_rng_seed(0xa77e17ull + (uint64_t)s->idx);
    /* lists per (query, KV head) */
    const int units = s->n_queries * s->kvh;
    int32_t *indptr = tu_xmalloc((size_t)(units + 1) * sizeof *indptr);
    const size_t cap = (size_t)units * (size_t)(s->n_pages + s->n_spare);
    uint32_t *slots = tu_xmalloc(cap * sizeof *slots);
    int32_t *plen = tu_xmalloc(cap * sizeof *plen);
    int n = 0, has_quant = 0;
    indptr[0] = 0;
    for (int i = 0; i < s->n_queries; i++)
        for (int g = 0; g < s->kvh; g++) {
            if (i == s->n_seq && g == 0) { /* empty */
                indptr[i * s->kvh + g + 1] = n;
                continue;
            }
            const int seq = i == s->n_seq ? 0 : i;
            for (int p = s->seq_first[seq]; p < s->seq_first[seq] + s->seq_pages[seq]; p++) {
                const page *pg = &s->pages[p];
                const int last = p == s->seq_first[seq] + s->seq_pages[seq] - 1;
                if ((g & 1) && !last && tu_int(&r, 0, 4) == 0) continue; /* dropped by selection */
                slots[n] = page_list_slot(pg);
                plen[n] = pg->rows;
                /* an open full page read partially */
                if (pg->qslot < 0 && pg->rows > 1 && tu_int(&r, 0, 5) == 0) plen[n] = (int32_t)tu_int(&r, 1, pg->rows);
                has_quant |= pg->qslot >= 0;
                n++;
            }
            if (i == 0 && g == s->kvh - 1)
                for (int j = 0; j < s->n_spare; j++)
                    if (s->rows_written[s->spare[j]] > 0) {
                        slots[n] = s->spare[j];
                        plen[n++] = s->rows_written[s->spare[j]];
                    }
            indptr[i * s->kvh + g + 1] = n;
        }
    int32_t *unit_of = tu_xmalloc((size_t)(n ? n : 1) * sizeof *unit_of);
    for (int u = 0; u < units; u++)
        for (int e = indptr[u]; e < indptr[u + 1]; e++) unit_of[e] = u;
    const int G = s->gqa;
    const size_t n_out = (size_t)s->n_queries * (size_t)s->nqh * (size_t)s->hd;
    const size_t n_lse = (size_t)s->n_queries * (size_t)s->nqh;
    const size_t n_plse = (size_t)(n ? n : 1) * (size_t)G;
    const double tol = tol_for(d, has_quant ? 1e-4 : 1e-5);
    /* mode 0: plain, 1: with page_lse, 2: q, out and lse in the device's memory (zero copy) */
    for (int mode = 0; mode < (has_zero_copy(d->dev) ? 3 : 2); mode++) {
        const int with_plse = mode == 1, io_dev = mode == 2;
        char shape[220];
        snprintf(shape, sizeof shape, "%s entries=%d%s", s->shape, n, with_plse ? " page_lse" : io_dev ? " zero-copy" : "");
        if (w == 0) {
            record(T_ATTENTION, d, dt, shape, 2, 0, NULL);
            continue;
        }
        gbuf go[2], gl[2], gp[2];
        float *out[2], *lse[2], *plse[2];
        pikv_status st[2];
        cmp_res c;
        for (int k = 0; k < 2; k++) {
            dpool *p = k ? dut_p : ref;
            out[k] = gbuf_alloc(&go[k], n_out * sizeof(float));
            lse[k] = gbuf_alloc(&gl[k], n_lse * sizeof(float));
            plse[k] = gbuf_alloc(&gp[k], n_plse * sizeof(float));
            pikv_attention_args a;
            memset(&a, 0, sizeof a);
            a.pool = &p->view;
            a.n_queries = s->n_queries;
            a.n_q_heads = s->nqh;
            a.q = s->q;
            a.indptr = indptr;
            a.slots = slots;
            a.page_len = plen;
            a.scale = 1.0f / sqrtf((float)s->hd);
            a.out = out[k];
            a.lse = lse[k];
            a.page_lse = with_plse ? plse[k] : NULL;
            pikv_buffer *bq = NULL, *bo = NULL, *bl = NULL;
            if (io_dev && k == 1) {
                a.q = device_copy(p->dev, s->q, n_out * sizeof(float), &bq);
                a.out = device_copy(p->dev, NULL, n_out * sizeof(float), &bo);
                a.lse = device_copy(p->dev, NULL, n_lse * sizeof(float), &bl);
                a.io_on_device = 1;
            }
            st[k] = io_dev && k == 1 && (!a.q || !a.out || !a.lse) ? PIKV_ERR_BACKEND
                                                                     : p->dev->iface->attention(p->dev, &a);
            sync_dev(p->dev);
            if (io_dev && k == 1 && st[k] == PIKV_OK) {
                if (p->dev->iface->memory_read(p->dev, a.out, out[k], n_out * sizeof(float)) != PIKV_OK ||
                    p->dev->iface->memory_read(p->dev, a.lse, lse[k], n_lse * sizeof(float)) != PIKV_OK)
                    st[k] = PIKV_ERR_BACKEND;
            }
            if (bq) p->dev->iface->buffer_free(p->dev, bq);
            if (bo) p->dev->iface->buffer_free(p->dev, bo);
            if (bl) p->dev->iface->buffer_free(p->dev, bl);
        }
        compare_pools(s, ref, dut_p, &c, 1);
        long guard = 0;
        for (int k = 0; k < 2; k++) guard += gbuf_damage(&go[k]) + gbuf_damage(&gl[k]) + gbuf_damage(&gp[k]);
        /* without page_lse its buffer must stay untouched */
        long plse_touched = 0;
        if (!with_plse)
            for (size_t i = 0; i < n_plse * sizeof(float); i++) plse_touched += ((unsigned char *)plse[1])[i] != OUT_FILL;
        if (st[0] != PIKV_OK || st[1] != PIKV_OK) {
            record(T_ATTENTION, d, dt, shape, 1, INFINITY, "status %s, reference %s (%s)", status_str(st[1]),
                   status_str(st[0]), pikv_context_last_error(g_ctx));
        } else {
            const double eo = nerr(out[1], out[0], n_out), el = nerr(lse[1], lse[0], n_lse);
            long pfirst = -1;
            const double ep = with_plse ? plse_err(plse[1], plse[0], lse[0], unit_of, n, G, s->kvh, tol, &pfirst) : 0;
            double e = eo > el ? eo : el;
            e = ep > e ? ep : e;
            const long pools = c.data + c.bounds + c.stray + c.ref_stray + c.io;
            if (e <= tol && !guard && !pools && !plse_touched)
                record(T_ATTENTION, d, dt, shape, 0, e, "err out %.2e lse %.2e page_lse %.2e", eo, el, ep);
            else {
                char where[200] = "";
                const float *arr[3][2] = {{out[1], out[0]}, {lse[1], lse[0]}, {plse[1], plse[0]}};
                const size_t len[3] = {n_out, n_lse, 0};
                static const char *const nm[3] = {"out", "lse", "page_lse"};
                for (int k = 0; k < 3 && !where[0]; k++) {
                    long i = k == 2 ? pfirst : first_bad(arr[k][0], arr[k][1], len[k], tol);
                    if (i >= 0)
                        snprintf(where, sizeof where, "; first: %s[%ld] = %.9g, reference %.9g", nm[k], i,
                                 (double)arr[k][0][i], (double)arr[k][1][i]);
                }
                record(T_ATTENTION, d, dt, shape, 1, e,
                       "normalized error out %.3g lse %.3g page_lse %.3g (tol %.0e), %ld guard bytes "
                       "overwritten, page_lse written when NULL: %ld bytes, pools changed: %ld bytes%s%s%s",
                       eo, el, ep, tol, guard, plse_touched, pools, where, c.first[0] ? "; " : "", c.first);
            }
        }
        for (int k = 0; k < 2; k++) {
            gbuf_free(&go[k]);
            gbuf_free(&gl[k]);
            gbuf_free(&gp[k]);
        }
    }
    free(indptr);
    free(slots);
    free(plen);
    free(unit_of);
}

static void step_merge(const scen *s, const dut *d)
{
    static const int parts[] = {1, 4, 67};
    const int w = want_case(T_MERGE, d, s, PIKV_DTYPE_F32);
    if (w < 0) return;
    tu_rng r = tu_rng_seed(0x3e26eull + (uint64_t)s->idx);
    const int np = parts[s->idx % 3], rows = 2 * (int)tu_int(&r, 0, 15) + 1, dim = s->hd;
    const size_t po = (size_t)np * (size_t)rows * (size_t)dim, pl = (size_t)np * (size_t)rows;
    float *part_out = tu_xmalloc(po * sizeof(float)), *part_lse = tu_xmalloc(pl * sizeof(float));
    for (size_t i = 0; i < po; i++) part_out[i] = tu_sym(&r, 3.0f);
    for (int p = 0; p < np; p++)
        for (int row = 0; row < rows; row++) {
            float v = tu_sym(&r, 10.0f);
            if (row == 0 && rows > 1) v = -INFINITY;           /* a row with every part empty */
            else if (tu_int(&r, 0, 4) == 0 && p > 0) v = -INFINITY; /* some empty parts */
            part_lse[(size_t)p * (size_t)rows + (size_t)row] = v;
        }
    for (int with_lse = 1; with_lse >= 0; with_lse--) {
        char shape[160];
        snprintf(shape, sizeof shape, "parts=%d rows=%d dim=%d%s", np, rows, dim, with_lse ? "" : " lse=NULL");
        if (w == 0) {
            record(T_MERGE, d, 4, shape, 2, 0, NULL);
            continue;
        }
        gbuf go[2], gl[2];
        float *out[2], *lse[2];
        pikv_status st[2];
        for (int k = 0; k < 2; k++) {
            pikv_device *dev = k ? d->dev : g_ctx->devices[0];
            out[k] = gbuf_alloc(&go[k], (size_t)rows * (size_t)dim * sizeof(float));
            lse[k] = gbuf_alloc(&gl[k], (size_t)rows * sizeof(float));
            pikv_merge_args a;
            memset(&a, 0, sizeof a);
            a.n_parts = np;
            a.n_rows = rows;
            a.dim = dim;
            a.part_out = part_out;
            a.part_lse = part_lse;
            a.out = out[k];
            a.lse = with_lse ? lse[k] : NULL;
            st[k] = dev->iface->merge(dev, &a);
            sync_dev(dev);
        }
        long guard = 0, lse_touched = 0;
        for (int k = 0; k < 2; k++) guard += gbuf_damage(&go[k]) + gbuf_damage(&gl[k]);
        if (!with_lse)
            for (size_t i = 0; i < (size_t)rows * sizeof(float); i++) lse_touched += ((unsigned char *)lse[1])[i] != OUT_FILL;
        const double tol = tol_for(d, 1e-6);
        if (st[0] != PIKV_OK || st[1] != PIKV_OK) {
            record(T_MERGE, d, 4, shape, 1, INFINITY, "status %s, reference %s (%s)", status_str(st[1]),
                   status_str(st[0]), pikv_context_last_error(g_ctx));
        } else {
            const double eo = nerr(out[1], out[0], (size_t)rows * (size_t)dim);
            const double el = with_lse ? nerr(lse[1], lse[0], (size_t)rows) : 0;
            const double e = eo > el ? eo : el;
            if (e <= tol && !guard && !lse_touched)
                record(T_MERGE, d, 4, shape, 0, e, "err out %.2e lse %.2e", eo, el);
            else
                record(T_MERGE, d, 4, shape, 1, e,
                       "normalized error out %.3g lse %.3g (tol %.0e), %ld guard bytes overwritten, lse written "
                       "when NULL: %ld bytes",
                       eo, el, tol, guard, lse_touched);
        }
        for (int k = 0; k < 2; k++) {
            gbuf_free(&go[k]);
            gbuf_free(&gl[k]);
        }
    }
    free(part_out);
    free(part_lse);
}

/* buffer_write / buffer_read round trips, with the untouched bytes checked. */
/* top-k on scores with NaNs, infinities, signed zeros and denormals (a score can be NaN: 0 * inf
   bounds): any order of the odd values is allowed, but the op must succeed, keep must be 0 or 1,
   the kept tokens within each list's budget, and no byte outside the output written. */
static void step_topk_odd_scores(const dut *d)
{
    if (!op_selected(T_TOPK)) return;
    if (g_opt.shape && !strstr("- odd scores ", g_opt.shape)) return;
    enum { N = 300 };
    float sc[N];
    int32_t tok[N];
    tu_rng r = tu_rng_seed(0x0ddull);
    const float odd[] = {NAN, INFINITY, -INFINITY, 0.0f, -0.0f, 1e-40f, -1e-40f, 1.0f};
    int64_t total = 0;
    for (int i = 0; i < N; i++) {
        sc[i] = tu_int(&r, 0, 2) == 0 ? odd[tu_int(&r, 0, 7)] : (float)tu_int(&r, -5, 5);
        tok[i] = (int32_t)tu_int(&r, 1, 16);
        total += tok[i];
    }
    const int32_t indptr[3] = {0, N / 2, N};
    const int64_t budget[2] = {total / 4, total / 3};
    gbuf kb;
    uint8_t *keep = gbuf_alloc(&kb, N);
    pikv_topk_args ta;
    memset(&ta, 0, sizeof ta);
    ta.n_lists = 2;
    ta.indptr = indptr;
    ta.scores = sc;
    ta.tokens = tok;
    ta.budget = budget;
    ta.keep = keep;
    pikv_status st = d->dev->iface->topk(d->dev, &ta);
    sync_dev(d->dev);
    long bad = 0;
    for (int l = 0; l < 2 && st == PIKV_OK; l++) {
        int64_t kept = 0;
        for (int i = indptr[l]; i < indptr[l + 1]; i++) {
            if (keep[i] > 1) bad++;
            if (keep[i] == 1) kept += tok[i];
        }
        if (kept > budget[l]) bad++;
    }
    const long guard = gbuf_damage(&kb);
    if (st == PIKV_OK && !bad && !guard)
        record(T_TOPK, d, 4, "odd scores (NaN, inf, +-0, denormals)", 0, 0, NULL);
    else
        record(T_TOPK, d, 4, "odd scores (NaN, inf, +-0, denormals)", 1, INFINITY,
               "status %s, %ld invalid keeps or lists over budget, %ld guard bytes overwritten", status_str(st), bad,
               guard);
    gbuf_free(&kb);
}

static void step_buffer(const dut *d)
{
    static const uint64_t sizes[] = {1, 63, 4097, (1u << 20) + 3};
    if (!op_selected(T_BUFFER)) return;
    for (size_t si = 0; si < sizeof sizes / sizeof sizes[0]; si++) {
        char shape[64];
        snprintf(shape, sizeof shape, "size=%llu", (unsigned long long)sizes[si]);
        char match[80];
        snprintf(match, sizeof match, "- %s ", shape);
        if (g_opt.shape && !strstr(match, g_opt.shape)) continue;
        const uint64_t n = sizes[si];
        tu_rng r = tu_rng_seed(0xb0ffull + si);
        unsigned char *want = tu_xmalloc(n), *got = tu_xmalloc(n), *src = tu_xmalloc(n);
        for (uint64_t i = 0; i < n; i++) want[i] = (unsigned char)tu_next(&r);
        pikv_buffer *b = NULL;
        pikv_status st = d->dev->iface->buffer_alloc(d->dev, n, &b);
        long bad = 0, errs = 0;
        if (st == PIKV_OK) {
            /* whole, then pieces at odd offsets overwrite parts with new bytes */
            errs += d->dev->iface->buffer_write(d->dev, b, 0, want, n) != PIKV_OK;
            for (int piece = 0; piece < 8; piece++) {
                uint64_t off = (uint64_t)tu_int(&r, 0, (int64_t)n - 1);
                uint64_t len = (uint64_t)tu_int(&r, 1, (int64_t)(n - off));
                for (uint64_t i = 0; i < len; i++) src[i] = (unsigned char)tu_next(&r);
                errs += d->dev->iface->buffer_write(d->dev, b, off, src, len) != PIKV_OK;
                memcpy(want + off, src, (size_t)len);
            }
            sync_dev(d->dev);
            errs += d->dev->iface->buffer_read(d->dev, b, 0, got, n) != PIKV_OK;
            bad += memcmp(got, want, (size_t)n) != 0;
            for (int piece = 0; piece < 8; piece++) {
                uint64_t off = (uint64_t)tu_int(&r, 0, (int64_t)n - 1);
                uint64_t len = (uint64_t)tu_int(&r, 1, (int64_t)(n - off));
                gbuf g;
                unsigned char *dst = gbuf_alloc(&g, (size_t)len);
                errs += d->dev->iface->buffer_read(d->dev, b, off, dst, len) != PIKV_OK;
                bad += memcmp(dst, want + off, (size_t)len) != 0;
                bad += gbuf_damage(&g) != 0;
                gbuf_free(&g);
            }
            d->dev->iface->buffer_free(d->dev, b);
        }
        if (st != PIKV_OK || errs || bad)
            record(T_BUFFER, d, 4, shape, 1, INFINITY, "alloc %s, %ld failed calls, %ld mismatching reads",
                   status_str(st), errs, bad);
        else
            record(T_BUFFER, d, 4, shape, 0, 0, NULL);
        free(want);
        free(got);
        free(src);
    }
}

/* read_reduce: sums of n floats (tails of every length mod 16, several MiB) of a
   buffer whose floats past n are huge (an over-read shows), against the exact
   double sum: error over sum |x| within 1e-6 (float lanes), 0 for CPU devices
   against the reference device's own sum. */
static void step_read_reduce(const dut *d)
{
    static const uint64_t ns[] = {0, 1, 15, 16, 17, 1000, (1u << 20) + 5, (3u << 20) + 7};
    if (!op_selected(T_READ_REDUCE)) return;
    pikv_device *ref = g_ctx->devices[0];
    for (size_t ni = 0; ni < sizeof ns / sizeof ns[0]; ni++) {
        const uint64_t n = ns[ni], total = n + 9; /* 9 floats of slack */
        char shape[64];
        snprintf(shape, sizeof shape, "n=%llu", (unsigned long long)n);
        char match[80];
        snprintf(match, sizeof match, "- %s ", shape);
        if (g_opt.shape && !strstr(match, g_opt.shape)) continue;
        if (!d->dev->iface->read_reduce || !d->dev->iface->supports_op(d->dev, PIKV_OP_READ_REDUCE, PIKV_DTYPE_F32)) {
            record(T_READ_REDUCE, d, 4, shape, 2, 0, NULL);
            continue;
        }
        tu_rng r = tu_rng_seed(0x5edull + ni);
        float *x = tu_xmalloc((size_t)total * sizeof(float));
        double exact = 0, mag = 0;
        for (uint64_t i = 0; i < total; i++) {
            x[i] = i < n ? tu_sym(&r, 1.0f) : 1e30f;
            if (i < n) {
                exact += x[i];
                mag += fabs(x[i]);
            }
        }
        double sum[2] = {0, 0};
        pikv_status st[2] = {PIKV_OK, PIKV_OK};
        for (int k = 0; k < 2; k++) {
            pikv_device *dev = k ? d->dev : ref;
            pikv_buffer *b = NULL;
            st[k] = dev->iface->buffer_alloc(dev, total * sizeof(float), &b);
            if (st[k] == PIKV_OK) st[k] = dev->iface->buffer_write(dev, b, 0, x, total * sizeof(float));
            if (st[k] == PIKV_OK) sync_dev(dev);
            if (st[k] == PIKV_OK) {
                pikv_read_reduce_args a = {b, n, &sum[k]};
                st[k] = dev->iface->read_reduce(dev, &a);
            }
            if (b) dev->iface->buffer_free(dev, b);
        }
        const double e = mag > 0 ? fabs(sum[1] - exact) / mag : fabs(sum[1] - exact);
        const double e_ref = mag > 0 ? fabs(sum[1] - sum[0]) / mag : fabs(sum[1] - sum[0]);
        if (st[0] != PIKV_OK || st[1] != PIKV_OK)
            record(T_READ_REDUCE, d, 4, shape, 1, INFINITY, "status %s, reference %s (%s)", status_str(st[1]),
                   status_str(st[0]), pikv_context_last_error(g_ctx));
        else if (e <= 1e-6 && (!d->exact || e_ref == 0))
            record(T_READ_REDUCE, d, 4, shape, 0, e, "sum %.9g exact %.9g", sum[1], exact);
        else
            record(T_READ_REDUCE, d, 4, shape, 1, e, "sum %.9g, exact %.9g, reference %.9g (tol 1e-6)", sum[1], exact,
                   sum[0]);
        free(x);
    }
}

/* Zero-copy memory calls: memory_write/memory_read round trips at odd offsets of a
   device buffer, and find_out_of_range with NaN, inf and past-limit values planted. */
static void step_zero_copy_memory(const dut *d)
{
    if (!op_selected(T_BUFFER) || !has_zero_copy(d->dev)) return;
    if (g_opt.shape && !strstr("- zero-copy ", g_opt.shape)) return;
    pikv_device *dev = d->dev;
    const int64_t n = 300007;
    float *want = tu_xmalloc((size_t)n * sizeof(float)), *got = tu_xmalloc((size_t)n * sizeof(float));
    tu_rng r = tu_rng_seed(0x2c0b1ull);
    for (int64_t i = 0; i < n; i++) want[i] = test_value(&r, 100.0f);
    pikv_buffer *b = NULL;
    float *dp = device_copy(dev, want, (size_t)n * sizeof(float), &b);
    long errs = !dp, bad = 0;
    if (dp) {
        errs += dev->iface->memory_read(dev, dp, got, (size_t)n * sizeof(float)) != PIKV_OK;
        bad += memcmp(got, want, (size_t)n * sizeof(float)) != 0;
        const int64_t off = 12345, len = 777;
        for (int64_t i = 0; i < len; i++) want[off + i] = (float)i;
        errs += dev->iface->memory_write(dev, dp + off, want + off, (size_t)len * sizeof(float)) != PIKV_OK;
        gbuf g;
        float *dst = gbuf_alloc(&g, (size_t)(len + 2) * sizeof(float));
        errs += dev->iface->memory_read(dev, dp + off - 1, dst, (size_t)(len + 2) * sizeof(float)) != PIKV_OK;
        bad += memcmp(dst, want + off - 1, (size_t)(len + 2) * sizeof(float)) != 0;
        bad += gbuf_damage(&g) != 0;
        gbuf_free(&g);
        /* planted: past 65504 at 290001, inf at 200003, NaN at 150001 (only the lowest counts) */
        const struct { int64_t at; float x; } plant[] = {{290001, 70000.0f}, {200003, INFINITY}, {150001, NAN}};
        const struct { float limit; int upto; int64_t want; } q[] = {
            {65504.0f, 0, -1}, {65504.0f, 1, 290001}, {3.0e38f, 1, -1}, {3.0e38f, 2, 200003}, {65504.0f, 3, 150001}};
        int planted = 0;
        for (size_t t = 0; t < sizeof q / sizeof q[0]; t++) {
            while (planted < q[t].upto) {
                errs += dev->iface->memory_write(dev, dp + plant[planted].at, &plant[planted].x, sizeof(float)) !=
                        PIKV_OK;
                planted++;
            }
            int64_t first = -2;
            errs += dev->iface->find_out_of_range(dev, dp, n, q[t].limit, &first) != PIKV_OK;
            if (first != q[t].want) {
                bad++;
                printf("  %s: find_out_of_range(limit %g) = %lld, expected %lld\n", d->label, (double)q[t].limit,
                       (long long)first, (long long)q[t].want);
            }
        }
        dev->iface->buffer_free(dev, b);
    }
    if (errs || bad)
        record(T_BUFFER, d, 4, "zero-copy", 1, INFINITY, "%ld failed calls, %ld mismatches", errs, bad);
    else
        record(T_BUFFER, d, 4, "zero-copy", 0, 0, NULL);
    free(want);
    free(got);
}

/* ------------------------------------------------------------------------ */
/* Main                                                                      */
/* ------------------------------------------------------------------------ */

static void usage(const char *prog)
{
    fprintf(stderr,
            "usage: %s [-o OP] [-b BACKEND] [-s SHAPE] [-r] [-v]\n"
            "  OP: append bounds quantize page_copy score topk attention merge buffer\n"
            "  BACKEND: a backend (cpu, opencl, vulkan, cuda) or a device name (cpu1)\n"
            "  SHAPE: a substring of the case description, e.g. int4, hd80, \"ps1 \", gqa8\n"
            "  -r: fail when no device matches (a backend that should be there is not)\n",
            prog);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static long g_log_errors;
static char g_first_log_error[512];
static int g_validation_on;

static void count_log(pikv_log_level level, const char *message, void *user)
{
    (void)user;
    if (strstr(message, "vulkan: validation: on")) g_validation_on = 1;
    if (level != PIKV_LOG_ERROR) return;
    if (!g_log_errors++) snprintf(g_first_log_error, sizeof g_first_log_error, "%s", message);
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "-v")) {
            g_opt.verbose = 1;
        } else if (!strcmp(a, "-r")) {
            g_opt.require = 1;
        } else if ((!strcmp(a, "-o") || !strcmp(a, "-b") || !strcmp(a, "-s")) && i + 1 < argc) {
            const char *v = argv[++i];
            if (a[1] == 'o') g_opt.op = v;
            if (a[1] == 'b') g_opt.backend = v;
            if (a[1] == 's') g_opt.shape = v;
        } else {
            usage(argv[0]);
            return 2;
        }
    }
    if (g_opt.op) {
        int known = 0;
        for (int t = 0; t < T_COUNT; t++) known |= !strcmp(g_opt.op, t_name[t]);
        if (!known) {
            fprintf(stderr, "unknown op '%s'\n", g_opt.op);
            usage(argv[0]);
            return 2;
        }
    }
    /* Every error the library logs fails the run: with PIKV_VULKAN_VALIDATION=1 that
       includes each Vulkan validation error, and the layer must then be on. */
    const int want_validation = getenv("PIKV_VULKAN_VALIDATION") && strcmp(getenv("PIKV_VULKAN_VALIDATION"), "0");
    const char *reps = getenv("PIKV_BACKEND_OPS_REPS");
    if (reps && atoi(reps) > 0) g_reps = atoi(reps);
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "all";
    cp.cpu_devices = 2;
    cp.log_fn = count_log;
    cp.log_level = PIKV_LOG_INFO;
    pikv_status st = pikv_context_create(&cp, &g_ctx);
    if (st != PIKV_OK) {
        printf("pikv_context_create(backends \"all\", cpu_devices 2): %s\n", status_str(st));
        printf("0 passed, 1 failed, 0 skipped\n");
        return 1;
    }
    tu_err_ctx = g_ctx;
    printf("reference: %s (%s)\n", g_ctx->devices[0]->info.name, g_ctx->devices[0]->info.description);
    for (int i = 1; i < g_ctx->n_devices && g_n_duts < MAX_DUTS; i++) {
        pikv_device *dev = g_ctx->devices[i];
        const char *bname = pikv_backend_name(dev->info.backend);
        if (g_opt.backend && strcmp(g_opt.backend, bname) && strcmp(g_opt.backend, dev->info.name)) continue;
        dut *d = &g_duts[g_n_duts];
        d->dev = dev;
        d->index = g_n_duts++;
        d->exact = dev->info.backend == PIKV_BACKEND_CPU;
        snprintf(d->label, sizeof d->label, "%s(%s)", dev->info.name, bname);
        printf("under test: %s: %s%s\n", d->label, dev->info.description,
               d->exact ? " [must match the reference exactly]" : "");
    }
    if (g_opt.require && g_n_duts == 0) {
        printf("no device under test%s%s (-r)\n", g_opt.backend ? " of " : "", g_opt.backend ? g_opt.backend : "");
        g_failed++;
    }
    fflush(stdout);
    const double t0 = now_s();
    for (int di = 0; di < g_n_duts; di++) {
        const dut *d = &g_duts[di];
        const double td = now_s();
        step_buffer(d);
        step_read_reduce(d);
        step_zero_copy_memory(d);
        step_topk_odd_scores(d);
        int idx = 0;
        for (size_t a = 0; a < sizeof k_dt / sizeof k_dt[0]; a++)
            for (size_t b = 0; b < sizeof k_hd / sizeof k_hd[0]; b++)
                for (size_t c = 0; c < sizeof k_ps / sizeof k_ps[0]; c++)
                    for (size_t e = 0; e < sizeof k_gqa / sizeof k_gqa[0]; e++)
                        for (int rep = 0; rep < g_reps; rep++, idx++) {
                        scen s;
                        scen_make(&s, idx, k_dt[a], k_hd[b], k_ps[c], k_gqa[e]);
                        if (g_opt.shape && !strstr(s.match, g_opt.shape)) {
                            scen_free(&s);
                            continue;
                        }
                        dpool ref, dp;
                        memset(&ref, 0, sizeof ref);
                        memset(&dp, 0, sizeof dp);
                        int ok = dpool_make(&ref, &s, g_ctx->devices[0]);
                        ok = ok && dpool_make(&dp, &s, d->dev);
                        if (!ok) {
                            record(T_APPEND, d, dt_index(&s), s.shape, 1, INFINITY, "could not allocate the pools");
                        } else {
                            step_append(&s, &ref, &dp, d);
                            step_quantize(&s, &ref, &dp, d);
                            step_page_copy(&s, &ref, &dp, d);
                            step_score_topk(&s, &ref, &dp, d);
                            step_attention(&s, &ref, &dp, d);
                            if (s.dtype == PIKV_DTYPE_F32) step_merge(&s, d);
                        }
                        if (ref.dev) dpool_free(&ref, &s);
                        if (dp.dev) dpool_free(&dp, &s);
                        scen_free(&s);
                    }
        printf("%s: %.2f s\n", d->label, now_s() - td);
    }
    printf("\n%-10s %-16s %-5s %6s %6s %7s  %s\n", "op", "device", "dtype", "passed", "failed", "skipped",
           "max normalized error");
    for (int t = 0; t < T_COUNT; t++)
        for (int di = 0; di < g_n_duts; di++)
            for (int dt = 0; dt < N_DT; dt++) {
                const group *g = &g_groups[t][di][dt];
                if (!g->passed && !g->failed && !g->skipped) continue;
                printf("%-10s %-16s %-5s %6ld %6ld %7ld  %.3g%s\n", t_name[t], g_duts[di].label, dt_name[dt],
                       g->passed, g->failed, g->skipped, g->max_err,
                       g->failed ? "  FAILED" : (g->passed ? "" : "  unsupported"));
            }
    printf("time %.2f s\n", now_s() - t0);
    free(g_fill);
    pikv_context_free(g_ctx); /* the validation layer also reports objects left at destruction */
    if (g_log_errors) {
        printf("library errors logged: %ld (the first: %s)\n", g_log_errors, g_first_log_error);
        g_failed++;
    }
    if (want_validation) {
        printf("Vulkan validation: %s\n", !g_validation_on ? "NOT ON (layer missing?)" : g_log_errors ? "on, errors logged" : "on, no errors logged");
        if (!g_validation_on || g_log_errors) g_failed++;
    }
    printf("%ld passed, %ld failed, %ld skipped\n", g_passed, g_failed, g_skipped);
    fflush(stdout);
    return g_failed ? 1 : 0;
}
