/* The bench's output: tables on stdout (the acceptance ratios last), and one JSON
 * document (bench/bench_plot.py draws it). Ratios are computed here from the
 * points, so the table and the JSON always agree. */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench.h"
#include "cli.h"

#ifndef PIKV_GIT_COMMIT
#define PIKV_GIT_COMMIT "unknown"
#endif

static double gbps(uint64_t bytes, double s) { return s > 0 ? (double)bytes / s / 1e9 : 0; }

static const char *ctx_label(int64_t n, char *buf, size_t size)
{
    if (n >= 1024 && n % 1024 == 0) snprintf(buf, size, "%lldK", (long long)(n / 1024) % 100000000);
    else snprintf(buf, size, "%lld", (long long)n);
    return buf;
}

/* ---- ratios ---------------------------------------------------------------------- */

/* speedup of p over its dense reference (same device, dtype, batch, context, cache kind) */
static int sparse_ratios(const bench_results *r, const bench_point *p, double *speedup, double *ideal)
{
    const char *ref_kind = strcmp(p->kind, "experts") == 0 ? "experts-dense" : "dense";
    const bench_point *d = bench_find(r, p->device, ref_kind, p->dtype, p->batch, p->context, 0);
    if (!d || p->seconds <= 0 || p->bytes == 0) return 0;
    *speedup = p->paired_speedup > 0 ? p->paired_speedup : d->seconds / p->seconds;
    *ideal = (double)d->bytes / (double)p->bytes;
    return 1;
}

static int quant_ratios(const bench_results *r, const bench_point *p, double *speedup, double *ideal)
{
    const bench_point *f = bench_find(r, p->device, "dense", PIKV_DTYPE_F16, p->batch, p->context, 0);
    if (!f || p->seconds <= 0 || p->bytes == 0) return 0;
    *speedup = p->paired_speedup > 0 ? p->paired_speedup : f->seconds / p->seconds;
    *ideal = (double)f->bytes / (double)p->bytes;
    return 1;
}

static int first_device(const bench_results *r, pikv_backend_kind kind)
{
    for (int i = 0; i < r->n_devices; i++)
        if (r->devices[i].info.backend == kind) return i;
    return -1;
}

enum { TARGET_CONTEXT = 32768 };

void bench_compute_targets(const bench_opts *o, bench_results *r)
{
    (void)o;
    r->n_targets = 0;
    const int cpu = first_device(r, PIKV_BACKEND_CPU), ocl = first_device(r, PIKV_BACKEND_OPENCL);
    bench_target *t;
    char dev[40];
    snprintf(dev, sizeof dev, "%s", cpu >= 0 ? r->devices[cpu].info.name : "cpu");

    /* 1. dense f16 at 32K+: share of the measured read bandwidth (the worst point) */
    t = &r->targets[r->n_targets++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s dense f16 attention at 32K+ tokens, share of read bandwidth", dev);
    t->target = 0.80;
    for (int i = 0; cpu >= 0 && i < r->n_points; i++) {
        const bench_point *p = &r->points[i];
        if (p->device != cpu || strcmp(p->kind, "dense") || p->dtype != PIKV_DTYPE_F16 || p->context < TARGET_CONTEXT)
            continue;
        const double bw = bench_point_read_bps(r, p);
        if (bw <= 0 || p->seconds <= 0) continue;
        const double share = bench_point_share(r, p);
        if (!t->have || share < t->value) {
            t->value = share;
            snprintf(t->detail, sizeof t->detail, "worst: batch %d, %lld tokens (best attend %.1f GB/s, best probe %.1f)",
                     p->batch, (long long)p->context, gbps(p->bytes, p->seconds), bw / 1e9);
        }
        t->have = 1;
    }
    /* 2. quest at 1/16: share of the ideal speedup (bytes ratio) */
    t = &r->targets[r->n_targets++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s quest budget 1/16 at 32K+ tokens, share of ideal speedup", dev);
    t->target = 0.80;
    for (int i = 0; cpu >= 0 && i < r->n_points; i++) {
        const bench_point *p = &r->points[i];
        double sp, id;
        if (p->device != cpu || strcmp(p->kind, "quest") || p->param != 16 || p->dtype != PIKV_DTYPE_F16 ||
            p->context < TARGET_CONTEXT || !sparse_ratios(r, p, &sp, &id))
            continue;
        if (!t->have || sp / id < t->value) {
            t->value = sp / id;
            snprintf(t->detail, sizeof t->detail, "worst: batch %d, %lld tokens: %.2fx of ideal %.2fx", p->batch,
                     (long long)p->context, sp, id);
        }
        t->have = 1;
    }
    /* 3. int4 over f16 */
    t = &r->targets[r->n_targets++];
    memset(t, 0, sizeof *t);
    snprintf(t->name, sizeof t->name, "%s int4 speedup over f16 at 32K+ tokens", dev);
    t->target = 2.0;
    for (int i = 0; cpu >= 0 && i < r->n_points; i++) {
        const bench_point *p = &r->points[i];
        double sp, id;
        if (p->device != cpu || strcmp(p->kind, "dense") || p->dtype != PIKV_DTYPE_INT4 ||
            p->context < TARGET_CONTEXT || !quant_ratios(r, p, &sp, &id))
            continue;
        if (!t->have || sp < t->value) {
            t->value = sp;
            snprintf(t->detail, sizeof t->detail, "worst: batch %d, %lld tokens (ideal %.2fx)", p->batch,
                     (long long)p->context, id);
        }
        t->have = 1;
    }
    /* 4. OpenCL against the CPU backend: dense f16 (the roofline target's workload), the
       worst point; the detail adds the worst of the quantized dtypes, which are compute
       bound on a CPU and so favour the hand-vectorized CPU kernels */
    t = &r->targets[r->n_targets++];
    memset(t, 0, sizeof *t);
    char ocl_name[40];
    snprintf(ocl_name, sizeof ocl_name, "%s", ocl >= 0 ? r->devices[ocl].info.name : "opencl");
    snprintf(t->name, sizeof t->name, "%s speed relative to %s, dense f16 at 32K+ tokens", ocl_name, dev);
    t->target = 0.80;
    double q_worst = 0;
    const bench_point *q_at = NULL;
    char f16_detail[96] = "";
    for (int i = 0; cpu >= 0 && ocl >= 0 && i < r->n_points; i++) {
        const bench_point *p = &r->points[i];
        if (p->device != ocl || strcmp(p->kind, "dense") || p->context < TARGET_CONTEXT || p->seconds <= 0) continue;
        const bench_point *c = bench_find(r, cpu, "dense", p->dtype, p->batch, p->context, 0);
        if (!c) continue;
        const double ratio = c->seconds / p->seconds;
        if (p->dtype != PIKV_DTYPE_F16) {
            if (!q_at || ratio < q_worst) q_worst = ratio, q_at = p;
            continue;
        }
        if (!t->have || ratio < t->value) {
            t->value = ratio;
            snprintf(f16_detail, sizeof f16_detail, "worst: batch %d, %lld tokens: %.2f vs %.2f ms", p->batch,
                     (long long)p->context, 1e3 * p->seconds, 1e3 * c->seconds);
        }
        t->have = 1;
    }
    if (q_at)
        snprintf(t->detail, sizeof t->detail, "%s; quantized pages: worst %.2fx (%s, batch %d, %lld tokens)",
                 f16_detail, q_worst, bench_dtype_name(q_at->dtype), q_at->batch, (long long)q_at->context);
    else
        snprintf(t->detail, sizeof t->detail, "%s", f16_detail);
    for (int i = 0; i < r->n_targets; i++) r->targets[i].pass = r->targets[i].have && r->targets[i].value >= r->targets[i].target;
}

/* ---- tables ---------------------------------------------------------------------- */

static void print_devices(FILE *f, const bench_results *r)
{
    fprintf(f, "\nRead roofline (streaming read-and-reduce of a buffer in the device's memory)\n");
    fprintf(f, "  %-10s %-7s %-40s %10s %12s\n", "device", "backend", "description", "buffer", "read GB/s");
    for (int i = 0; i < r->n_devices; i++) {
        const bench_device *d = &r->devices[i];
        char b[32];
        if (d->read_bps > 0)
            fprintf(f, "  %-10s %-7s %-40.40s %10s %12.2f\n", d->info.name, pikv_backend_name(d->info.backend),
                    d->info.description, cli_format_bytes(d->read_bytes, b, sizeof b), d->read_bps / 1e9);
        else
            fprintf(f, "  %-10s %-7s %-40.40s %10s %12s  (%s)\n", d->info.name, pikv_backend_name(d->info.backend),
                    d->info.description, "-", "-", d->read_error);
    }
}

static void print_dense(FILE *f, const bench_results *r, int dev)
{
    const bench_device *d = &r->devices[dev];
    fprintf(f, "\nDense decode attention on %s (one layer, every page; ms, GB/s: the best of N, each after a\n"
               "cold pass; probe: its best pass; %%roof: median over rounds of the attend's rate over its pass's)\n",
            d->info.name);
    fprintf(f, "  %-5s %5s %7s %10s %9s %10s %8s %8s %7s %8s %8s %9s %9s\n", "dtype", "batch", "context", "stored MiB",
            "ms", "read MiB", "GB/s", "probe", "%roof", "xf16", "ideal", "plan ms", "append ns/tok");
    for (int i = 0; i < r->n_points; i++) {
        const bench_point *p = &r->points[i];
        if (p->device != dev || strcmp(p->kind, "dense")) continue;
        char c[16];
        double sp = 0, id = 0;
        const int qr = p->dtype != PIKV_DTYPE_F16 && quant_ratios(r, p, &sp, &id);
        const double bw = bench_point_read_bps(r, p);
        fprintf(f, "  %-5s %5d %7s %10.1f %9.3f %10.1f %8.2f", bench_dtype_name(p->dtype), p->batch,
                ctx_label(p->context, c, sizeof c), (double)p->stored_bytes / 1048576.0, 1e3 * p->seconds,
                (double)p->bytes / 1048576.0, gbps(p->bytes, p->seconds));
        if (bw > 0) fprintf(f, " %8.2f %6.0f%%", bw / 1e9, 100 * bench_point_share(r, p));
        else fprintf(f, " %8s %7s", "-", "-");
        if (qr) fprintf(f, " %7.2fx %7.2fx", sp, id);
        else fprintf(f, " %8s %8s", "", "");
        fprintf(f, " %9.3f", 1e3 * p->plan_s);
        if (p->append_s_per_token > 0) fprintf(f, " %9.0f", 1e9 * p->append_s_per_token);
        fputc('\n', f);
    }
}

static void print_sparse(FILE *f, const bench_results *r, int dev, const char *kind)
{
    int any = 0;
    for (int i = 0; i < r->n_points && !any; i++) any = r->points[i].device == dev && !strcmp(r->points[i].kind, kind);
    if (!any) return;
    const int quest = !strcmp(kind, "quest");
    if (quest)
        fprintf(f, "\nQuest selection on %s: budget = context / R; speedup over dense, ideal = bytes ratio\n",
                r->devices[dev].info.name);
    else
        fprintf(f, "\nExpert selection on %s: reading k of E experts' shards (tokens stored by top-1 expert)\n",
                r->devices[dev].info.name);
    fprintf(f, "  %-5s %5s %7s %6s %9s %9s %8s %8s %7s %9s %9s\n", "dtype", "batch", "context", quest ? "R" : "k/E",
            "dense ms", "ms", "speedup", "ideal", "%ideal", "score ms", "top-k ms");
    for (int i = 0; i < r->n_points; i++) {
        const bench_point *p = &r->points[i];
        double sp, id;
        if (p->device != dev || strcmp(p->kind, kind) || !sparse_ratios(r, p, &sp, &id)) continue;
        char c[16], param[16];
        if (quest) snprintf(param, sizeof param, "1/%d", p->param);
        else snprintf(param, sizeof param, "%d/%d", p->param, p->n_experts);
        fprintf(f, "  %-5s %5d %7s %6s %9.3f %9.3f %7.2fx %7.2fx %6.0f%% %9.3f %9.3f\n", bench_dtype_name(p->dtype),
                p->batch, ctx_label(p->context, c, sizeof c), param, 1e3 * p->seconds * sp, 1e3 * p->seconds, sp, id,
                100 * sp / id, 1e3 * p->score_s, 1e3 * p->topk_s);
    }
}

static void print_baselines(FILE *f, const bench_results *r)
{
    if (r->n_baselines == 0) return;
    fprintf(f, "\nBaselines on the same data (no cache manager: contiguous KV; vendor library where a GPU is present)\n");
    fprintf(f, "  %-17s %-10s %5s %7s %9s %8s %7s %11s %11s\n", "baseline", "device", "batch", "context", "ms", "GB/s",
            "%roof", "PiKV f16 x", "PiKV int4 x");
    for (int i = 0; i < r->n_baselines; i++) {
        const bench_baseline *b = &r->baselines[i];
        const bench_device *d = &r->devices[b->device];
        char c[16];
        if (b->seconds <= 0) {
            fprintf(f, "  %-17s %-10s %5d %7s  failed: %s\n", b->name, d->info.name, b->batch,
                    ctx_label(b->context, c, sizeof c), b->error);
            continue;
        }
        fprintf(f, "  %-17s %-10s %5d %7s %9.3f %8.2f", b->name, d->info.name, b->batch, ctx_label(b->context, c, sizeof c),
                1e3 * b->seconds, gbps(b->bytes, b->seconds));
        const double bw = bench_baseline_read_bps(r, b);
        if (bw > 0) fprintf(f, " %6.0f%%", 100 * (double)b->bytes / b->seconds / bw);
        else fprintf(f, " %7s", "-");
        const bench_point *p16 = bench_find(r, b->device, "dense", PIKV_DTYPE_F16, b->batch, b->context, 0);
        const bench_point *p4 = bench_find(r, b->device, "dense", PIKV_DTYPE_INT4, b->batch, b->context, 0);
        if (p16) fprintf(f, " %10.2fx", b->seconds / p16->seconds);
        else fprintf(f, " %11s", "-");
        if (p4) fprintf(f, " %10.2fx", b->seconds / p4->seconds);
        fputc('\n', f);
    }
}

static void print_memory(FILE *f, const bench_results *r)
{
    if (r->n_memory == 0) return;
    fprintf(f, "\nMemory per device (MoE cache: 8 experts, top-2, skewed routing; %d rank%s)\n", r->memory[0].n_ranks,
            r->memory[0].n_ranks > 1 ? "s, devices rank-major" : "");
    for (int i = 0; i < r->n_memory; i++) {
        const bench_memory *m = &r->memory[i];
        fprintf(f, "  %-8s", m->placement);
        for (int d = 0; d < m->n_devices && d < BENCH_MAX_DEVICES; d++)
            fprintf(f, " %8.1f", (double)m->bytes_used[d] / 1048576.0);
        fprintf(f, " MiB  imbalance %.2f", m->imbalance);
        if (m->n_ranks > 1) {
            fprintf(f, "; per rank");
            for (int k = 0; k < m->n_ranks; k++) fprintf(f, " %.1f", (double)m->rank_bytes[k] / 1048576.0);
            fprintf(f, " MiB, imbalance %.2f", m->rank_imbalance);
        }
        fprintf(f, "; attend %.3f ms, merge %.3f ms\n", 1e3 * m->attend_s, 1e3 * m->merge_s);
    }
}

void bench_print_tables(FILE *f, const bench_opts *o, const bench_results *r)
{
    fprintf(f, "pikv bench: %d query heads, %d KV heads, head_dim %d, page %d tokens, quant group %d; %s UTC\n",
            o->q_heads, o->kv_heads, o->head_dim, o->page_size, o->quant_group, r->date);
    print_devices(f, r);
    for (int d = 0; d < r->n_devices; d++) {
        print_dense(f, r, d);
        print_sparse(f, r, d, "quest");
        print_sparse(f, r, d, "experts");
    }
    print_baselines(f, r);
    print_memory(f, r);
}

void bench_print_targets(FILE *f, const bench_results *r)
{
    fprintf(f, "\nTargets (issue 11; measured in this run):\n");
    for (int i = 0; i < r->n_targets; i++) {
        const bench_target *t = &r->targets[i];
        const int pct = t->target < 1.5;
        if (!t->have) {
            fprintf(f, "  %-72s not measured (needs contexts >= 32K on that device)\n", t->name);
            continue;
        }
        if (pct)
            fprintf(f, "  %-72s %5.0f%%  (>= %.0f%%)  %s\n", t->name, 100 * t->value, 100 * t->target,
                    t->pass ? "PASS" : "FAIL");
        else
            fprintf(f, "  %-72s %5.2fx  (>= %.1fx)  %s\n", t->name, t->value, t->target, t->pass ? "PASS" : "FAIL");
        fprintf(f, "      %s\n", t->detail);
    }
}

/* ---- JSON ------------------------------------------------------------------------ */

static void jkey(FILE *f, const char *k) { fprintf(f, "\"%s\": ", k); }

static void jnum(FILE *f, const char *k, double x, int comma)
{
    jkey(f, k);
    cli_json_number(f, x);
    if (comma) fputs(", ", f);
}

/* byte counts exactly (a double's %.9g would round them) */
static void jint(FILE *f, const char *k, uint64_t x, int comma)
{
    fprintf(f, "\"%s\": %llu%s", k, (unsigned long long)x, comma ? ", " : "");
}

static void jstr(FILE *f, const char *k, const char *s, int comma)
{
    jkey(f, k);
    cli_json_string(f, s);
    if (comma) fputs(", ", f);
}

int bench_write_json(const char *path, const bench_opts *o, const bench_results *r)
{
    FILE *f = strcmp(path, "-") == 0 ? stdout : fopen(path, "w");
    if (!f) {
        fprintf(stderr, "pikv bench: cannot write %s\n", path);
        return CLI_EXIT_FAIL;
    }
    char cpu[128];
    cli_cpu_model(cpu, sizeof cpu);
    fputs("{\n  ", f);
    jnum(f, "format", 1, 1);
    jstr(f, "date", r->date, 1);
    jstr(f, "commit", PIKV_GIT_COMMIT, 1);
    jstr(f, "library", pikv_version_string(), 1);
    fputs("\n  \"host\": {", f);
    jstr(f, "cpu", cpu, 1);
    jnum(f, "cores", (double)sysconf(_SC_NPROCESSORS_ONLN), 1);
    jint(f, "memory_bytes", (uint64_t)sysconf(_SC_PHYS_PAGES) * (uint64_t)sysconf(_SC_PAGESIZE), 0);
    fputs("},\n  \"geometry\": {", f);
    jnum(f, "q_heads", o->q_heads, 1);
    jnum(f, "kv_heads", o->kv_heads, 1);
    jnum(f, "head_dim", o->head_dim, 1);
    jnum(f, "page_size", o->page_size, 1);
    jnum(f, "quant_group", o->quant_group, 1);
    jnum(f, "layers_per_attend", 1, 0);
    fputs("},\n  \"devices\": [", f);
    for (int i = 0; i < r->n_devices; i++) {
        const bench_device *d = &r->devices[i];
        fputs(i ? ",\n    {" : "\n    {", f);
        jstr(f, "name", d->info.name, 1);
        jstr(f, "backend", pikv_backend_name(d->info.backend), 1);
        jstr(f, "description", d->info.description, 1);
        jint(f, "read_bytes", d->read_bytes, 1);
        jnum(f, "read_bytes_per_s", d->read_bps > 0 ? d->read_bps : NAN, 1);
        jnum(f, "read_median_s", d->read_bps > 0 ? d->read_median_s : NAN, 1);
        jstr(f, "read_error", d->read_error, 0);
        fputs("}", f);
    }
    fputs("\n  ],\n  \"points\": [", f);
    for (int i = 0; i < r->n_points; i++) {
        const bench_point *p = &r->points[i];
        const bench_device *d = &r->devices[p->device];
        double sp = NAN, id = NAN;
        if (!strcmp(p->kind, "quest") || !strcmp(p->kind, "experts")) {
            if (!sparse_ratios(r, p, &sp, &id)) sp = id = NAN;
        } else if (!strcmp(p->kind, "dense") && p->dtype != PIKV_DTYPE_F16) {
            if (!quant_ratios(r, p, &sp, &id)) sp = id = NAN;
        }
        fputs(i ? ",\n    {" : "\n    {", f);
        jstr(f, "device", d->info.name, 1);
        jstr(f, "backend", pikv_backend_name(d->info.backend), 1);
        jstr(f, "kind", p->kind, 1);
        jstr(f, "dtype", bench_dtype_name(p->dtype), 1);
        jnum(f, "batch", p->batch, 1);
        jint(f, "context", (uint64_t)p->context, 1);
        jnum(f, "param", p->param, 1);
        jnum(f, "n_experts", p->n_experts, 1);
        jnum(f, "seconds", p->seconds, 1);
        jnum(f, "median_s", p->median_s, 1);
        jnum(f, "reps", p->reps, 1);
        jint(f, "bytes", p->bytes, 1);
        jint(f, "stored_bytes", p->stored_bytes, 1);
        jnum(f, "bytes_per_s", p->seconds > 0 ? (double)p->bytes / p->seconds : NAN, 1);
        const double bw = bench_point_read_bps(r, p);
        jnum(f, "probe_bytes_per_s", p->probe_bytes && p->probe_s > 0 ? (double)p->probe_bytes / p->probe_s : NAN, 1);
        jnum(f, "share_of_read", bw > 0 && p->seconds > 0 ? bench_point_share(r, p) : NAN, 1);
        jnum(f, "paired_share", p->paired_share > 0 ? p->paired_share : NAN, 1);
        jnum(f, "paired_speedup", p->paired_speedup > 0 ? p->paired_speedup : NAN, 1);
        jnum(f, "speedup", sp, 1);
        jnum(f, "ideal_speedup", id, 1);
        jnum(f, "share_of_ideal", sp / id, 1);
        jnum(f, "plan_s", p->plan_s, 1);
        jnum(f, "score_s", p->score_s, 1);
        jnum(f, "topk_s", p->topk_s, 1);
        jnum(f, "attention_s", p->attention_s, 1);
        jnum(f, "merge_s", p->merge_s, 1);
        jnum(f, "append_s_per_token", p->append_s_per_token > 0 ? p->append_s_per_token : NAN, 0);
        fputs("}", f);
    }
    fputs("\n  ],\n  \"baselines\": [", f);
    for (int i = 0; i < r->n_baselines; i++) {
        const bench_baseline *b = &r->baselines[i];
        const bench_device *d = &r->devices[b->device];
        fputs(i ? ",\n    {" : "\n    {", f);
        jstr(f, "name", b->name, 1);
        jstr(f, "device", d->info.name, 1);
        jnum(f, "batch", b->batch, 1);
        jint(f, "context", (uint64_t)b->context, 1);
        jnum(f, "seconds", b->seconds > 0 ? b->seconds : NAN, 1);
        jint(f, "bytes", b->bytes, 1);
        const double bw = bench_baseline_read_bps(r, b);
        jnum(f, "probe_bytes_per_s", b->probe_bytes && b->probe_s > 0 ? (double)b->probe_bytes / b->probe_s : NAN, 1);
        jnum(f, "share_of_read", bw > 0 && b->seconds > 0 ? (double)b->bytes / b->seconds / bw : NAN, 1);
        jstr(f, "error", b->error, 0);
        fputs("}", f);
    }
    fputs("\n  ],\n  \"memory\": [", f);
    for (int i = 0; i < r->n_memory; i++) {
        const bench_memory *m = &r->memory[i];
        fputs(i ? ",\n    {" : "\n    {", f);
        jstr(f, "placement", m->placement, 1);
        jnum(f, "n_devices", m->n_devices, 1);
        jkey(f, "bytes_used");
        fputc('[', f);
        for (int d = 0; d < m->n_devices && d < BENCH_MAX_DEVICES; d++) fprintf(f, "%s%llu", d ? ", " : "", (unsigned long long)m->bytes_used[d]);
        fputs("], ", f);
        jkey(f, "tokens");
        fputc('[', f);
        for (int d = 0; d < m->n_devices && d < BENCH_MAX_DEVICES; d++) fprintf(f, "%s%lld", d ? ", " : "", (long long)m->tokens[d]);
        fputs("], ", f);
        jnum(f, "imbalance", m->imbalance, 1);
        jnum(f, "n_ranks", m->n_ranks, 1);
        jkey(f, "rank_bytes");
        fputc('[', f);
        for (int k = 0; k < m->n_ranks; k++) fprintf(f, "%s%llu", k ? ", " : "", (unsigned long long)m->rank_bytes[k]);
        fputs("], ", f);
        jnum(f, "rank_imbalance", m->rank_imbalance, 1);
        jnum(f, "attend_s", m->attend_s, 1);
        jnum(f, "merge_s", m->merge_s, 0);
        fputs("}", f);
    }
    fputs("\n  ],\n  \"targets\": [", f);
    for (int i = 0; i < r->n_targets; i++) {
        const bench_target *t = &r->targets[i];
        fputs(i ? ",\n    {" : "\n    {", f);
        jstr(f, "name", t->name, 1);
        jnum(f, "value", t->have ? t->value : NAN, 1);
        jnum(f, "target", t->target, 1);
        jkey(f, "pass");
        fputs(!t->have ? "null" : t->pass ? "true" : "false", f);
        fputs(", ", f);
        jstr(f, "detail", t->detail, 0);
        fputs("}", f);
    }
    fputs("\n  ]\n}\n", f);
    const int bad = ferror(f);
    if (f != stdout) fclose(f);
    if (bad) {
        fprintf(stderr, "pikv bench: error writing %s\n", path);
        return CLI_EXIT_FAIL;
    }
    return 0;
}
