/*
 * `pikv run`: a seeded synthetic MoE decode workload driven through the cache.
 *
 * Prefill appends every sequence's context per layer in chunks; each decode step
 * attends a batch of all sequences' queries per layer, compares every output with
 * dense attention in double precision over the workload's own copy of the K/V,
 * then appends the step's token. Prints per-device memory and traffic, step time
 * and the error against the reference; exits 0 when the error is within bound.
 */
#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "workload.h"

/* ------------------------------------------------------------------------ */
/* Options                                                                   */
/* ------------------------------------------------------------------------ */
typedef struct run_opts {
    int32_t layers, q_heads, kv_heads, head_dim, experts, top_k;
    int32_t page_size, shards, seqs, steps, chunk, devices, threads;
    int64_t context, capacity;
    uint64_t seed, device_memory;
    pikv_placement placement;
    pikv_dtype dtype;
    const char *backend;
    int devices_set, json, quiet, verbose;
} run_opts;

enum {
    OPT_HELP = 1, OPT_LAYERS, OPT_QHEADS, OPT_KVHEADS, OPT_HEADDIM, OPT_EXPERTS, OPT_TOPK,
    OPT_CONTEXT, OPT_SEQS, OPT_STEPS, OPT_PAGESIZE, OPT_PLACEMENT, OPT_SHARDS, OPT_DEVICES,
    OPT_DTYPE, OPT_BACKEND, OPT_SEED, OPT_THREADS, OPT_CHUNK, OPT_CAPACITY, OPT_MEMORY,
    OPT_JSON, OPT_QUIET, OPT_VERBOSE
};

static const cli_opt run_opts_table[] = {
    {"--help", "-h", 0, OPT_HELP},
    {"--layers", NULL, 1, OPT_LAYERS},
    {"--q-heads", NULL, 1, OPT_QHEADS},
    {"--kv-heads", NULL, 1, OPT_KVHEADS},
    {"--head-dim", NULL, 1, OPT_HEADDIM},
    {"--experts", NULL, 1, OPT_EXPERTS},
    {"--top-k", NULL, 1, OPT_TOPK},
    {"--context", NULL, 1, OPT_CONTEXT},
    {"--seqs", NULL, 1, OPT_SEQS},
    {"--steps", NULL, 1, OPT_STEPS},
    {"--page-size", NULL, 1, OPT_PAGESIZE},
    {"--placement", NULL, 1, OPT_PLACEMENT},
    {"--shards", NULL, 1, OPT_SHARDS},
    {"--devices", NULL, 1, OPT_DEVICES},
    {"--dtype", NULL, 1, OPT_DTYPE},
    {"--backend", NULL, 1, OPT_BACKEND},
    {"--seed", NULL, 1, OPT_SEED},
    {"--threads", NULL, 1, OPT_THREADS},
    {"--chunk", NULL, 1, OPT_CHUNK},
    {"--capacity", NULL, 1, OPT_CAPACITY},
    {"--device-memory", NULL, 1, OPT_MEMORY},
    {"--json", NULL, 0, OPT_JSON},
    {"--quiet", "-q", 0, OPT_QUIET},
    {"--verbose", "-v", 0, OPT_VERBOSE},
    {NULL, NULL, 0, 0},
};

static const char *const placement_names[] = {"expert", "hash", "balanced", NULL};
static const char *const dtype_names[] = {"f32", "f16", NULL};

static void run_defaults(run_opts *o)
{
    memset(o, 0, sizeof *o);
    o->layers = 8;
    o->q_heads = 8;
    o->kv_heads = 2;
    o->head_dim = 64;
    o->experts = 8;
    o->top_k = 2;
    o->page_size = 16;
    o->shards = 0;
    o->context = 2048;
    o->seqs = 4;
    o->steps = 32;
    o->chunk = 256;
    o->devices = 2;
    o->threads = 0;
    o->capacity = 0;
    o->seed = 1;
    o->device_memory = 0;
    o->placement = PIKV_PLACEMENT_EXPERT;
    o->dtype = PIKV_DTYPE_F16;
    o->backend = "cpu";
}

static void run_usage(FILE *f)
{
    fputs("usage: pikv run [options]\n"
          "\n"
          "Runs a seeded synthetic MoE decode workload through a PiKV cache: prefill of\n"
          "every sequence's context, then decode steps that attend a batch of all\n"
          "sequences per layer and append one token. Every attention output is compared\n"
          "with dense attention computed in double precision. Prints per-device memory,\n"
          "bytes read per step, step time and the error; exits 0 if the error is within\n"
          "bound (1e-4 for f32, 5e-3 for f16), 1 if not or if a library call fails,\n"
          "2 on a bad command line.\n"
          "\n"
          "model geometry:\n"
          "  --layers N          layers (default 8)\n"
          "  --q-heads N         query heads (default 8)\n"
          "  --kv-heads N        KV heads, dividing --q-heads (default 2)\n"
          "  --head-dim N        head dimension, 1..1024 (default 64)\n"
          "  --experts N         experts per layer, 1 = dense (default 8)\n"
          "  --top-k N           router top-k, 1..min(experts, 64) (default 2)\n"
          "workload:\n"
          "  --context N         prefill tokens per sequence (default 2048)\n"
          "  --seqs N            sequences in the batch (default 4)\n"
          "  --steps N           decode steps (default 32)\n"
          "  --chunk N           prefill append chunk, tokens (default 256)\n"
          "  --seed N            workload seed, decimal or 0x hex (default 1)\n"
          "cache:\n"
          "  --page-size N       tokens per page, 1..4096 (default 16)\n"
          "  --dtype T           f32|f16 page storage (default f16)\n"
          "  --placement P       expert|hash|balanced (default expert); balanced also\n"
          "                      rebalances after prefill and reports pages moved\n"
          "  --shards N          hash/dense placement: shards per layer, 0 = library\n"
          "                      default (default 0)\n"
          "  --capacity N        tokens per layer the cache may hold, 0 = what the run\n"
          "                      needs plus one page per sequence and shard (default 0)\n"
          "devices:\n"
          "  --backend LIST      backends to load (cpu, opencl, vulkan, cuda, a comma list,\n"
          "                      or all; default cpu). For a single non-CPU backend the\n"
          "                      cache uses that backend's devices; otherwise all devices\n"
          "  --devices N         CPU devices to expose, 1..64 (default 2); with a single\n"
          "                      non-CPU backend, use its first N devices\n"
          "  --threads N         CPU backend worker threads, 0 = online cores (default 0)\n"
          "  --device-memory N   bytes each CPU device may hold, 0 = unlimited (default 0)\n"
          "output:\n"
          "  --json              print one JSON object on stdout instead of the table\n"
          "  -q, --quiet         no progress on stderr; print only the one-line verdict\n"
          "                      (with --json: only suppress progress)\n"
          "  -v, --verbose       print the library's informational log messages\n"
          "  -h, --help          show this help\n",
          f);
}

/* 0 = parsed, 1 = help printed, 2 = usage error. */
static int parse_run(int argc, char **argv, run_opts *o)
{
    cli_parser p;
    cli_parser_init(&p, "pikv run", argc, argv, 2);
    run_defaults(o);
    const char *v;
    int id, choice;
    int kv_set = 0, topk_set = 0;
    while ((id = cli_next_opt(&p, run_opts_table, &v)) != CLI_OPT_END) {
        int bad = 0;
        switch (id) {
        case CLI_OPT_ERROR: return 2;
        case OPT_HELP: run_usage(stdout); return 1;
        case OPT_LAYERS: bad = cli_parse_i32(&p, v, 1, 4096, &o->layers); break;
        case OPT_QHEADS: bad = cli_parse_i32(&p, v, 1, 1024, &o->q_heads); break;
        case OPT_KVHEADS:
            bad = cli_parse_i32(&p, v, 1, 1024, &o->kv_heads);
            kv_set = 1;
            break;
        case OPT_HEADDIM: bad = cli_parse_i32(&p, v, 1, WL_MAX_HEAD_DIM, &o->head_dim); break;
        case OPT_EXPERTS: bad = cli_parse_i32(&p, v, 1, 65536, &o->experts); break;
        case OPT_TOPK:
            bad = cli_parse_i32(&p, v, 1, WL_MAX_TOP_K, &o->top_k);
            topk_set = 1;
            break;
        case OPT_CONTEXT: bad = cli_parse_i64(&p, v, 0, INT64_C(1) << 30, &o->context); break;
        case OPT_SEQS: bad = cli_parse_i32(&p, v, 1, 1 << 20, &o->seqs); break;
        case OPT_STEPS: bad = cli_parse_i32(&p, v, 0, 1 << 24, &o->steps); break;
        case OPT_CHUNK: bad = cli_parse_i32(&p, v, 1, 1 << 20, &o->chunk); break;
        case OPT_PAGESIZE: bad = cli_parse_i32(&p, v, 1, 4096, &o->page_size); break;
        case OPT_SHARDS: bad = cli_parse_i32(&p, v, 0, 1 << 20, &o->shards); break;
        case OPT_DEVICES:
            bad = cli_parse_i32(&p, v, 1, 64, &o->devices);
            o->devices_set = 1;
            break;
        case OPT_THREADS: bad = cli_parse_i32(&p, v, 0, 4096, &o->threads); break;
        case OPT_CAPACITY: bad = cli_parse_i64(&p, v, 0, INT64_MAX / 2, &o->capacity); break;
        case OPT_MEMORY: bad = cli_parse_u64(&p, v, &o->device_memory); break;
        case OPT_SEED: bad = cli_parse_u64(&p, v, &o->seed); break;
        case OPT_PLACEMENT:
            bad = cli_parse_choice(&p, v, placement_names, &choice);
            if (!bad) o->placement = (pikv_placement)choice;
            break;
        case OPT_DTYPE:
            bad = cli_parse_choice(&p, v, dtype_names, &choice);
            if (!bad) o->dtype = (pikv_dtype)choice;
            break;
        case OPT_BACKEND:
            if (!*v || strchr(v, ' ')) {
                cli_usage_error(p.cmd, "invalid value '%s' for --backend: expected a backend "
                                       "name, a comma list or 'all'", v);
                bad = 1;
            }
            o->backend = v;
            break;
        case OPT_JSON: o->json = 1; break;
        case OPT_QUIET: o->quiet = 1; break;
        case OPT_VERBOSE: o->verbose = 1; break;
        default: bad = 1;
        }
        if (bad) return 2;
    }
    /* Cross-flag consistency; defaults adapt to explicit settings where obvious. */
    if (!kv_set && o->q_heads % o->kv_heads != 0) o->kv_heads = o->q_heads;
    if (!topk_set && o->top_k > o->experts) o->top_k = o->experts;
    if (o->q_heads % o->kv_heads != 0) {
        cli_usage_error(p.cmd, "--q-heads %" PRId32 " is not a multiple of --kv-heads %" PRId32,
                        o->q_heads, o->kv_heads);
        return 2;
    }
    if (o->top_k > o->experts) {
        cli_usage_error(p.cmd, "--top-k %" PRId32 " exceeds --experts %" PRId32, o->top_k,
                        o->experts);
        return 2;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* The run                                                                   */
/* ------------------------------------------------------------------------ */
typedef struct dev_row {
    pikv_cache_device_stats st;
    char name[32];
    const char *backend;
    uint64_t read_total;       /* sum of last_bytes_read after every decode attend */
} dev_row;

typedef struct run_result {
    pikv_cache_stats stats;
    int32_t n_devs;
    dev_row *devs;
    int64_t expected_tokens;
    int64_t capacity;
    double prefill_s;
    double decode_s;           /* attend + append */
    double attend_s;
    double reference_s;
    uint64_t bytes_read_total; /* sum over steps and layers of last_bytes_read */
    int64_t pages_read_total;
    int64_t tokens_read_total;
    double max_err;
    double max_lse_err;
    double bound;
    int rebalanced;
    int64_t moved_pages;
    double rebalance_s;
    int routing_mismatch;
} run_result;

static size_t dtype_bytes(pikv_dtype t) { return t == PIKV_DTYPE_F32 ? 4 : 2; }

/* Normalized max error of one query's output against the reference. */
static double output_error(const float *out, const double *ref, size_t n)
{
    double maxref = 0.0, maxdiff = 0.0;
    for (size_t i = 0; i < n; i++) {
        double r = fabs(ref[i]);
        if (r > maxref) maxref = r;
        if (!isfinite(out[i])) return INFINITY;
        double d = fabs((double)out[i] - ref[i]);
        if (d > maxdiff) maxdiff = d;
    }
    return maxref > 0.0 ? maxdiff / maxref : maxdiff;
}

static const char *placement_name(pikv_placement p)
{
    return (p >= PIKV_PLACEMENT_EXPERT && p <= PIKV_PLACEMENT_BALANCED) ? placement_names[p]
                                                                       : "?";
}

static double mib(uint64_t b) { return (double)b / (1024.0 * 1024.0); }

static void print_table(const run_opts *o, const run_result *r)
{
    const double steps = o->steps > 0 ? (double)o->steps : 1.0;
    printf("pikv run (PiKV %s)\n", pikv_version_string());
    printf("  model      %" PRId32 " layers, %" PRId32 " query heads, %" PRId32
           " KV heads, head_dim %" PRId32 ", %" PRId32 " experts, top-%" PRId32 "\n",
           o->layers, o->q_heads, o->kv_heads, o->head_dim, o->experts, o->top_k);
    printf("  cache      %s pages of %" PRId32 " tokens, placement %s, %" PRId32
           " shards/layer, capacity %" PRId64 " tokens/layer\n",
           dtype_names[o->dtype], o->page_size, placement_name(o->placement),
           r->stats.n_shards, r->capacity);
    char threads[24];
    if (o->threads)
        snprintf(threads, sizeof threads, "%" PRId32, o->threads);
    else
        snprintf(threads, sizeof threads, "auto");
    printf("  devices    %" PRId32 " (backend %s, CPU threads %s)\n", r->n_devs, o->backend,
           threads);
    printf("  workload   %" PRId32 " sequences x %" PRId64 " context tokens, %" PRId32
           " decode steps, chunk %" PRId32 ", seed %" PRIu64 "\n",
           o->seqs, o->context, o->steps, o->chunk, o->seed);
    printf("\n");
    printf("%-10s %-8s %7s %10s %9s %11s %11s %14s\n", "device", "backend", "shards", "tokens",
           "pages", "alloc MiB", "used MiB", "read MiB/step");
    int64_t sh = 0, tok = 0, pg = 0;
    uint64_t al = 0, us = 0, rd = 0;
    for (int32_t i = 0; i < r->n_devs; i++) {
        const dev_row *d = &r->devs[i];
        printf("%-10s %-8s %7" PRId32 " %10" PRId64 " %9" PRId64 " %11.2f %11.2f %14.3f\n",
               d->name, d->backend, d->st.shards, d->st.tokens, d->st.pages,
               mib(d->st.bytes_allocated), mib(d->st.bytes_used),
               mib(d->read_total) / steps);
        sh += d->st.shards;
        tok += d->st.tokens;
        pg += d->st.pages;
        al += d->st.bytes_allocated;
        us += d->st.bytes_used;
        rd += d->read_total;
    }
    if (r->n_devs > 1)
        printf("%-10s %-8s %7" PRId64 " %10" PRId64 " %9" PRId64 " %11.2f %11.2f %14.3f\n",
               "total", "", sh, tok, pg, mib(al), mib(us), mib(rd) / steps);
    printf("\n");

    const uint64_t raw = (uint64_t)r->stats.tokens * (uint64_t)o->kv_heads *
                         (uint64_t)o->head_dim * 2u * dtype_bytes(o->dtype);
    const double prefill_tokens = (double)o->seqs * (double)o->context;
    printf("  tokens             %" PRId64 " over all layers (expected %" PRId64 ")%s\n",
           r->stats.tokens, r->expected_tokens,
           r->stats.tokens == r->expected_tokens ? "" : "  MISMATCH");
    printf("  KV MiB             %.2f used, %.2f allocated, %" PRId64
           " pages (raw %s K+V: %.2f)\n",
           mib(r->stats.bytes_used), mib(r->stats.bytes_allocated), r->stats.pages,
           dtype_names[o->dtype], mib(raw));
    if (o->steps > 0) {
        printf("  read per step      %.3f MiB, %.1f pages, %.1f tokens (all layers)\n",
               mib(r->bytes_read_total) / steps, (double)r->pages_read_total / steps,
               (double)r->tokens_read_total / steps);
    }
    printf("  prefill            %.0f tokens x %" PRId32 " layers in %.3f s (%.0f tokens/s)\n",
           prefill_tokens, o->layers, r->prefill_s,
           r->prefill_s > 0 ? prefill_tokens / r->prefill_s : 0.0);
    if (r->rebalanced)
        printf("  rebalance          %" PRId64 " pages moved in %.3f s\n", r->moved_pages,
               r->rebalance_s);
    if (o->steps > 0) {
        printf("  mean step time     %.3f ms (attend %.3f ms + append, %" PRId32
               " layers; reference %.3f ms)\n",
               1e3 * r->decode_s / steps, 1e3 * r->attend_s / steps, o->layers,
               1e3 * r->reference_s / steps);
        printf("  decode tokens/s    %.1f (%" PRId32 " sequences)\n",
               r->decode_s > 0 ? (double)o->seqs * (double)o->steps / r->decode_s : 0.0,
               o->seqs);
        printf("  KV read bandwidth  %.2f GiB/s\n",
               r->attend_s > 0 ? (double)r->bytes_read_total / r->attend_s / 1073741824.0
                               : 0.0);
        printf("  max norm. error    %.3e vs dense f64 reference (bound %.0e)\n", r->max_err,
               r->bound);
        printf("  max lse error      %.3e\n", r->max_lse_err);
    }
    if (r->routing_mismatch) printf("  warning: workload routing was not reproducible\n");
    printf("  result             %s\n", r->max_err <= r->bound ? "PASS" : "FAIL");
}

static void print_json(const run_opts *o, const run_result *r)
{
    const double steps = o->steps > 0 ? (double)o->steps : 1.0;
    FILE *f = stdout;
    fprintf(f, "{\n  \"pikv_version\": ");
    cli_json_string(f, pikv_version_string());
    fprintf(f, ",\n  \"config\": {\"layers\": %" PRId32 ", \"q_heads\": %" PRId32
               ", \"kv_heads\": %" PRId32 ", \"head_dim\": %" PRId32 ", \"experts\": %" PRId32
               ", \"top_k\": %" PRId32 ", \"page_size\": %" PRId32 ", \"dtype\": ",
            o->layers, o->q_heads, o->kv_heads, o->head_dim, o->experts, o->top_k,
            o->page_size);
    cli_json_string(f, dtype_names[o->dtype]);
    fprintf(f, ", \"placement\": ");
    cli_json_string(f, placement_name(o->placement));
    fprintf(f, ", \"shards_per_layer\": %" PRId32 ", \"capacity_tokens\": %" PRId64
               ", \"backend\": ",
            r->stats.n_shards, r->capacity);
    cli_json_string(f, o->backend);
    fprintf(f, ", \"devices\": %" PRId32 ", \"threads\": %" PRId32 ", \"context\": %" PRId64
               ", \"seqs\": %" PRId32 ", \"steps\": %" PRId32 ", \"chunk\": %" PRId32
               ", \"seed\": %" PRIu64 "},\n",
            r->n_devs, o->threads, o->context, o->seqs, o->steps, o->chunk, o->seed);
    fprintf(f, "  \"devices\": [");
    for (int32_t i = 0; i < r->n_devs; i++) {
        const dev_row *d = &r->devs[i];
        fprintf(f, "%s\n    {\"index\": %" PRId32 ", \"name\": ", i ? "," : "", d->st.device);
        cli_json_string(f, d->name);
        fprintf(f, ", \"backend\": ");
        cli_json_string(f, d->backend);
        fprintf(f, ", \"shards\": %" PRId32 ", \"tokens\": %" PRId64 ", \"pages\": %" PRId64
                   ", \"bytes_allocated\": %" PRIu64 ", \"bytes_used\": %" PRIu64
                   ", \"bytes_read_per_step\": ",
                d->st.shards, d->st.tokens, d->st.pages, d->st.bytes_allocated,
                d->st.bytes_used);
        cli_json_number(f, (double)d->read_total / steps);
        fputc('}', f);
    }
    fprintf(f, "%s],\n", r->n_devs ? "\n  " : "");
    const double prefill_tokens = (double)o->seqs * (double)o->context;
    fprintf(f, "  \"summary\": {\"tokens\": %" PRId64 ", \"expected_tokens\": %" PRId64
               ", \"pages\": %" PRId64 ", \"bytes_allocated\": %" PRIu64
               ", \"bytes_used\": %" PRIu64 ", \"kv_mib\": ",
            r->stats.tokens, r->expected_tokens, r->stats.pages, r->stats.bytes_allocated,
            r->stats.bytes_used);
    cli_json_number(f, mib(r->stats.bytes_used));
    fprintf(f, ", \"bytes_read_per_step\": ");
    cli_json_number(f, (double)r->bytes_read_total / steps);
    fprintf(f, ", \"pages_read_per_step\": ");
    cli_json_number(f, (double)r->pages_read_total / steps);
    fprintf(f, ", \"tokens_read_per_step\": ");
    cli_json_number(f, (double)r->tokens_read_total / steps);
    fprintf(f, ", \"prefill_s\": ");
    cli_json_number(f, r->prefill_s);
    fprintf(f, ", \"prefill_tokens_per_s\": ");
    cli_json_number(f, r->prefill_s > 0 ? prefill_tokens / r->prefill_s : 0.0);
    fprintf(f, ", \"rebalance_moved_pages\": ");
    if (r->rebalanced)
        fprintf(f, "%" PRId64, r->moved_pages);
    else
        fputs("null", f);
    fprintf(f, ", \"mean_step_ms\": ");
    cli_json_number(f, o->steps > 0 ? 1e3 * r->decode_s / steps : NAN);
    fprintf(f, ", \"mean_attend_ms\": ");
    cli_json_number(f, o->steps > 0 ? 1e3 * r->attend_s / steps : NAN);
    fprintf(f, ", \"mean_reference_ms\": ");
    cli_json_number(f, o->steps > 0 ? 1e3 * r->reference_s / steps : NAN);
    fprintf(f, ", \"decode_tokens_per_s\": ");
    cli_json_number(f, r->decode_s > 0 ? (double)o->seqs * (double)o->steps / r->decode_s
                                       : NAN);
    fprintf(f, ", \"kv_read_bytes_per_s\": ");
    cli_json_number(f, r->attend_s > 0 ? (double)r->bytes_read_total / r->attend_s : NAN);
    fprintf(f, ", \"max_norm_error\": ");
    cli_json_number(f, r->max_err);
    fprintf(f, ", \"max_lse_error\": ");
    cli_json_number(f, r->max_lse_err);
    fprintf(f, ", \"error_bound\": ");
    cli_json_number(f, r->bound);
    fprintf(f, ", \"pass\": %s}\n}\n", r->max_err <= r->bound ? "true" : "false");
}

/* Picks the cache's devices for --backend; returns the count (0 = all of the context),
   or -1 after printing an error. */
static int32_t select_devices(const run_opts *o, pikv_context *ctx, int32_t **out)
{
    *out = NULL;
    if (strchr(o->backend, ',') || cli_streq_nocase(o->backend, "all") ||
        cli_streq_nocase(o->backend, "cpu"))
        return 0;
    int32_t n = pikv_device_count(ctx);
    int32_t *list = malloc((size_t)(n > 0 ? n : 1) * sizeof *list);
    if (!list) {
        fprintf(stderr, "pikv: out of memory\n");
        return -1;
    }
    int32_t count = 0;
    for (int32_t i = 0; i < n; i++) {
        pikv_device_info info;
        pikv_status st = pikv_device_get_info(ctx, i, &info);
        if (st != PIKV_OK) {
            cli_lib_error(ctx, "pikv_device_get_info", st);
            free(list);
            return -1;
        }
        if (!cli_streq_nocase(pikv_backend_name(info.backend), o->backend)) continue;
        if (o->devices_set && count >= o->devices) break;
        list[count++] = i;
    }
    if (count == 0) {
        int compiled = 0;
        for (int k = PIKV_BACKEND_CPU; k <= PIKV_BACKEND_CUDA; k++)
            if (cli_streq_nocase(pikv_backend_name((pikv_backend_kind)k), o->backend))
                compiled = pikv_backend_is_compiled((pikv_backend_kind)k);
        fprintf(stderr, "pikv: no device of backend '%s' is available: %s (see 'pikv devices "
                        "--backend all')\n",
                o->backend, compiled ? "no device or driver found at run time"
                                     : "this build of the library does not include it");
        free(list);
        return -1;
    }
    *out = list;
    return count;
}

#define LIB(call, name)                                                                    \
    do {                                                                                   \
        pikv_status st_ = (call);                                                          \
        if (st_ != PIKV_OK) {                                                              \
            rc = cli_lib_error(ctx, name, st_);                                            \
            goto done;                                                                     \
        }                                                                                  \
    } while (0)

int cli_cmd_run(int argc, char **argv)
{
    run_opts o;
    int pr = parse_run(argc, argv, &o);
    if (pr == 1) return CLI_EXIT_OK;
    if (pr != 0) return CLI_EXIT_USAGE;

    int rc = CLI_EXIT_FAIL;
    pikv_context *ctx = NULL;
    pikv_cache *cache = NULL;
    wl_workload *wl = NULL;
    int32_t *dev_list = NULL;
    float *k = NULL, *v = NULL, *q = NULL, *out = NULL, *lse = NULL;
    float *nk = NULL, *nv = NULL;
    int32_t *ex = NULL, *qex = NULL, *nex = NULL, *seq_ids = NULL;
    double *ref = NULL, *ref_lse = NULL;
    run_result r;
    memset(&r, 0, sizeof r);
    cli_progress prog;
    cli_progress_init(&prog, !o.quiet);

    /* Context and devices. */
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = o.backend;
    cp.cpu_devices = o.devices;
    cp.cpu_threads = o.threads;
    cp.cpu_device_memory = o.device_memory;
    cli_log_filter log_filter;
    cp.log_level = cli_log_filter_init(&log_filter, o.verbose, o.quiet);
    cp.log_fn = cli_log;
    cp.log_user = &log_filter;
    LIB(pikv_context_create(&cp, &ctx), "pikv_context_create");
    int32_t n_sel = select_devices(&o, ctx, &dev_list);
    if (n_sel < 0) goto done;

    /* Cache. */
    const int64_t per_seq = o.context + o.steps;
    const int32_t shards_guess = o.shards > 0 ? o.shards : o.experts;
    r.capacity = o.capacity > 0 ? o.capacity
                                : (int64_t)o.seqs * (per_seq + (int64_t)shards_guess * o.page_size);
    r.expected_tokens = (int64_t)o.layers * o.seqs * per_seq;
    r.bound = o.dtype == PIKV_DTYPE_F32 ? 1e-4 : 5e-3;

    pikv_cache_params cpar = pikv_cache_default_params();
    cpar.n_layers = o.layers;
    cpar.n_q_heads = o.q_heads;
    cpar.n_kv_heads = o.kv_heads;
    cpar.head_dim = o.head_dim;
    cpar.n_experts = o.experts;
    cpar.experts_per_token = o.top_k;
    cpar.page_size = o.page_size;
    cpar.dtype = o.dtype;
    cpar.capacity_tokens = r.capacity;
    cpar.max_sequences = o.seqs;
    cpar.placement = o.placement;
    cpar.n_shards = o.shards;
    cpar.devices = dev_list;
    cpar.n_devices = n_sel;
    cpar.attn_scale = 0.0f;
    LIB(pikv_cache_create(ctx, &cpar, &cache), "pikv_cache_create");
    for (int32_t s = 0; s < o.seqs; s++) LIB(pikv_seq_add(cache, s), "pikv_seq_add");
    LIB(pikv_cache_get_stats(cache, &r.stats), "pikv_cache_get_stats");

    r.n_devs = r.stats.n_devices > 0 ? r.stats.n_devices : 0;
    r.devs = calloc((size_t)(r.n_devs > 0 ? r.n_devs : 1), sizeof *r.devs);
    if (!r.devs) {
        fprintf(stderr, "pikv: out of memory\n");
        goto done;
    }

    /* Workload. */
    wl_config wc;
    memset(&wc, 0, sizeof wc);
    wc.n_layers = o.layers;
    wc.n_q_heads = o.q_heads;
    wc.n_kv_heads = o.kv_heads;
    wc.head_dim = o.head_dim;
    wc.n_experts = o.experts;
    wc.top_k = o.top_k;
    wc.n_seqs = o.seqs;
    wc.context = o.context;
    wc.max_tokens = per_seq;
    wc.seed = o.seed;
    if (wl_create(&wc, &wl) != 0) {
        char b[32];
        fprintf(stderr, "pikv: cannot allocate the workload's reference copy of K/V (%s); "
                        "use a smaller --context, --seqs, --layers or --steps\n",
                cli_format_bytes((uint64_t)wl_memory_bytes(&wc), b, sizeof b));
        goto done;
    }

    const size_t G = (size_t)o.kv_heads, D = (size_t)o.head_dim, QH = (size_t)o.q_heads;
    const size_t S = (size_t)o.seqs, K = (size_t)o.top_k;
    const size_t chunk = (size_t)(o.context < o.chunk ? (o.context > 0 ? o.context : 1)
                                                       : o.chunk);
    k = malloc(chunk * G * D * sizeof *k);
    v = malloc(chunk * G * D * sizeof *v);
    ex = malloc(chunk * K * sizeof *ex);
    q = malloc(S * QH * D * sizeof *q);
    out = malloc(S * QH * D * sizeof *out);
    lse = malloc(S * QH * sizeof *lse);
    qex = malloc(S * K * sizeof *qex);
    nk = malloc(S * G * D * sizeof *nk);
    nv = malloc(S * G * D * sizeof *nv);
    nex = malloc(S * K * sizeof *nex);
    seq_ids = malloc(S * sizeof *seq_ids);
    ref = malloc(QH * D * sizeof *ref);
    ref_lse = malloc(QH * sizeof *ref_lse);
    if (!k || !v || !ex || !q || !out || !lse || !qex || !nk || !nv || !nex || !seq_ids ||
        !ref || !ref_lse) {
        fprintf(stderr, "pikv: out of memory for the run's buffers\n");
        goto done;
    }
    for (size_t s = 0; s < S; s++) seq_ids[s] = (int32_t)s;

    /* Prefill: per layer, per sequence, in chunks. Only the library calls are timed. */
    for (int32_t l = 0; l < o.layers; l++) {
        cli_progress_update(&prog, "prefill %" PRId32 "/%" PRId32 " layers", l, o.layers);
        for (int32_t s = 0; s < o.seqs; s++) {
            for (int64_t t = 0; t < o.context;) {
                int32_t n = (int32_t)(o.context - t < (int64_t)chunk ? o.context - t
                                                                     : (int64_t)chunk);
                if (wl_next_tokens(wl, l, s, n, k, v, ex) != 0) {
                    fprintf(stderr, "pikv: internal error: workload overflow\n");
                    goto done;
                }
                double t0 = cli_now();
                LIB(pikv_cache_append(cache, l, s, n, k, v, NULL, ex), "pikv_cache_append");
                r.prefill_s += cli_now() - t0;
                t += n;
            }
        }
    }

    if (o.placement == PIKV_PLACEMENT_BALANCED) {
        cli_progress_update(&prog, "rebalance");
        double t0 = cli_now();
        LIB(pikv_cache_rebalance(cache, &r.moved_pages), "pikv_cache_rebalance");
        r.rebalance_s = cli_now() - t0;
        r.rebalanced = 1;
    }

    /* Decode. */
    const double scale = 1.0 / sqrt((double)o.head_dim);
    pikv_attend_batch batch;
    memset(&batch, 0, sizeof batch); /* fields added later default to 0 / NULL */
    batch.n_queries = o.seqs;
    batch.seq_ids = seq_ids;
    batch.q = q;
    batch.experts = qex;
    batch.out = out;
    batch.lse = lse;
    for (int32_t step = 0; step < o.steps; step++) {
        cli_progress_update(&prog, "decode step %" PRId32 "/%" PRId32, step, o.steps);
        for (int32_t l = 0; l < o.layers; l++) {
            for (size_t s = 0; s < S; s++)
                wl_next_query(wl, l, (int32_t)s, q + s * QH * D, qex + s * K);

            double t0 = cli_now();
            LIB(pikv_cache_attend(cache, l, &batch), "pikv_cache_attend");
            double t1 = cli_now();
            r.attend_s += t1 - t0;
            r.decode_s += t1 - t0;

            pikv_cache_stats cs;
            LIB(pikv_cache_get_stats(cache, &cs), "pikv_cache_get_stats");
            r.bytes_read_total += cs.last_bytes_read;
            r.pages_read_total += cs.last_pages_read;
            r.tokens_read_total += cs.last_tokens_read;
            for (int32_t d = 0; d < r.n_devs; d++) {
                pikv_cache_device_stats ds;
                LIB(pikv_cache_get_device_stats(cache, d, &ds), "pikv_cache_get_device_stats");
                r.devs[d].read_total += ds.last_bytes_read;
            }

            double t2 = cli_now();
            for (size_t s = 0; s < S; s++) {
                wl_reference(wl, l, (int32_t)s, q + s * QH * D, scale, ref, ref_lse);
                double e = output_error(out + s * QH * D, ref, QH * D);
                if (!(e <= r.max_err)) r.max_err = e; /* NaN/inf propagate */
                for (size_t h = 0; h < QH; h++) {
                    double le = fabs((double)lse[s * QH + h] - ref_lse[h]);
                    if (isinf(ref_lse[h]) && isinf(lse[s * QH + h]) && lse[s * QH + h] < 0)
                        le = 0.0;
                    if (!(le <= r.max_lse_err)) r.max_lse_err = le;
                }
            }
            r.reference_s += cli_now() - t2;

            for (size_t s = 0; s < S; s++) {
                if (wl_next_tokens(wl, l, (int32_t)s, 1, nk + s * G * D, nv + s * G * D,
                                   nex + s * K) != 0) {
                    fprintf(stderr, "pikv: internal error: workload overflow\n");
                    goto done;
                }
                if (memcmp(nex + s * K, qex + s * K, K * sizeof *nex) != 0)
                    r.routing_mismatch = 1;
            }
            double t3 = cli_now();
            for (size_t s = 0; s < S; s++)
                LIB(pikv_cache_append(cache, l, (int32_t)s, 1, nk + s * G * D, nv + s * G * D,
                                      NULL, nex + s * K),
                    "pikv_cache_append");
            r.decode_s += cli_now() - t3;
        }
    }
    cli_progress_done(&prog);

    /* Final statistics. */
    LIB(pikv_cache_get_stats(cache, &r.stats), "pikv_cache_get_stats");
    if (r.stats.n_devices != r.n_devs) {
        fprintf(stderr, "pikv: the cache's device count changed during the run (%" PRId32
                        " -> %" PRId32 ")\n",
                r.n_devs, r.stats.n_devices);
        goto done;
    }
    for (int32_t d = 0; d < r.n_devs; d++) {
        dev_row *row = &r.devs[d];
        LIB(pikv_cache_get_device_stats(cache, d, &row->st), "pikv_cache_get_device_stats");
        pikv_device_info info;
        LIB(pikv_device_get_info(ctx, row->st.device, &info), "pikv_device_get_info");
        memcpy(row->name, info.name, sizeof row->name);
        row->name[sizeof row->name - 1] = '\0';
        row->backend = pikv_backend_name(info.backend);
    }

    if (o.json)
        print_json(&o, &r);
    else if (o.quiet)
        printf("%s max_norm_error=%.3e bound=%.0e mean_step_ms=%.3f decode_tokens_per_s=%.1f\n",
               r.max_err <= r.bound ? "PASS" : "FAIL", r.max_err, r.bound,
               o.steps > 0 ? 1e3 * r.decode_s / o.steps : 0.0,
               r.decode_s > 0 ? (double)o.seqs * o.steps / r.decode_s : 0.0);
    else
        print_table(&o, &r);
    fflush(stdout);
    rc = r.max_err <= r.bound ? CLI_EXIT_OK : CLI_EXIT_FAIL;

done:
    cli_progress_done(&prog);
    free(k);
    free(v);
    free(ex);
    free(q);
    free(out);
    free(lse);
    free(qex);
    free(nk);
    free(nv);
    free(nex);
    free(seq_ids);
    free(ref);
    free(ref_lse);
    free(r.devs);
    free(dev_list);
    wl_free(wl);
    pikv_cache_free(cache);
    pikv_context_free(ctx);
    return rc;
}
