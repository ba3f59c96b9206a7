/* `pikv bench`: the benchmark program (docs/performance.md). Options, then the
 * measurements in order: each device's read roofline, its dense / quantized /
 * sparse sweeps, the baselines, memory per device and the merge; then the tables,
 * the JSON, and the acceptance ratios last. */
#define _POSIX_C_SOURCE 200809L

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench.h"
#include "cli.h"
#include "run.h"

enum {
    OPT_HELP = 1, OPT_QUICK, OPT_JSON, OPT_BACKEND, OPT_DEVICE, OPT_THREADS, OPT_Q_HEADS, OPT_KV_HEADS,
    OPT_HEAD_DIM, OPT_PAGE_SIZE, OPT_QUANT_GROUP, OPT_CONTEXTS, OPT_BATCH_CONTEXTS, OPT_BATCHES, OPT_DTYPES,
    OPT_QUEST, OPT_EXPERTS, OPT_EXPERT_KS, OPT_MEMORY_DEVICES, OPT_MAX_KV, OPT_ROOFLINE_BYTES, OPT_MIN_TIME,
    OPT_REPS, OPT_MAX_ATTEND, OPT_NO_BASELINE, OPT_NO_MEMORY, OPT_CHECK, OPT_QUIET, OPT_SEED, OPT_VERBOSE
};

static const cli_opt bench_opts_table[] = {
    {"--help", "-h", 0, OPT_HELP},
    {"--quick", NULL, 0, OPT_QUICK},
    {"--json", NULL, 1, OPT_JSON},
    {"--backend", NULL, 1, OPT_BACKEND},
    {"--device", NULL, 1, OPT_DEVICE},
    {"--threads", NULL, 1, OPT_THREADS},
    {"--q-heads", NULL, 1, OPT_Q_HEADS},
    {"--kv-heads", NULL, 1, OPT_KV_HEADS},
    {"--head-dim", NULL, 1, OPT_HEAD_DIM},
    {"--page-size", NULL, 1, OPT_PAGE_SIZE},
    {"--quant-group", NULL, 1, OPT_QUANT_GROUP},
    {"--contexts", NULL, 1, OPT_CONTEXTS},
    {"--batch-contexts", NULL, 1, OPT_BATCH_CONTEXTS},
    {"--batches", NULL, 1, OPT_BATCHES},
    {"--dtypes", NULL, 1, OPT_DTYPES},
    {"--quest", NULL, 1, OPT_QUEST},
    {"--experts", NULL, 1, OPT_EXPERTS},
    {"--expert-k", NULL, 1, OPT_EXPERT_KS},
    {"--memory-devices", NULL, 1, OPT_MEMORY_DEVICES},
    {"--max-kv", NULL, 1, OPT_MAX_KV},
    {"--roofline-bytes", NULL, 1, OPT_ROOFLINE_BYTES},
    {"--min-time", NULL, 1, OPT_MIN_TIME},
    {"--reps", NULL, 1, OPT_REPS},
    {"--max-attend-s", NULL, 1, OPT_MAX_ATTEND},
    {"--no-baseline", NULL, 0, OPT_NO_BASELINE},
    {"--no-memory", NULL, 0, OPT_NO_MEMORY},
    {"--check", NULL, 0, OPT_CHECK},
    {"--quiet", "-q", 0, OPT_QUIET},
    {"--seed", NULL, 1, OPT_SEED},
    {"--verbose", "-v", 0, OPT_VERBOSE},
    {NULL, NULL, 0, 0},
};

static void bench_usage(FILE *f)
{
    fputs("usage: pikv bench [options]\n"
          "\n"
          "Measures every device against its own read roofline and PiKV against the\n"
          "baselines, on synthetic KV (docs/performance.md): each device's read bandwidth;\n"
          "decode attention at each context for f16/int8/int4 pages and each batch (share\n"
          "of that bandwidth); quest and expert selection (speedup over dense, and share of\n"
          "the ideal = bytes ratio); int8/int4 over f16; memory per device with the\n"
          "imbalance; overheads (append per token, scoring, top-k, merge); a dense C\n"
          "baseline over a contiguous KV array (and cuBLAS on an NVIDIA GPU). Prints the\n"
          "tables, then the acceptance ratios last.\n"
          "\n"
          "options:\n"
          "  --quick               a short run (small contexts; for tests)\n"
          "  --json FILE           also write the results as JSON ('-': stdout, and the\n"
          "                        tables go to stderr)\n"
          "  --backend LIST        backends to load (cpu, opencl, vulkan, cuda; default all)\n"
          "  --device NAME         measure this device only (repeatable; default: every one)\n"
          "  --threads N           CPU backend threads, 0 = online cores (default 0)\n"
          "  --q-heads N           query heads (default 16)\n"
          "  --kv-heads N          KV heads (default 16: MHA, as OLMoE-1B-7B)\n"
          "  --head-dim N          (default 128)\n"
          "  --page-size N         tokens per page (default 16)\n"
          "  --quant-group N       int8/int4 group (default 32)\n"
          "  --contexts LIST       batch-1 contexts (default 1K,2K,4K,8K,16K,32K,64K,128K)\n"
          "  --batch-contexts LIST contexts of the larger batches (default 1K,4K,16K,32K)\n"
          "  --batches LIST        (default 1,16)\n"
          "  --dtypes LIST         page dtypes: f32,f16,int8,int4 (default f16,int8,int4)\n"
          "  --quest LIST          quest budgets as context / R (default 8,16,32)\n"
          "  --experts E           experts of the MoE cache of expert selection (default 8;\n"
          "                        0 = no expert sweep)\n"
          "  --expert-k LIST       experts read per query (default 1,2,4)\n"
          "  --memory-devices N    CPU devices of the memory and merge section (default 4)\n"
          "  --max-kv BYTES        skip contexts where the dtypes measured together would\n"
          "                        store more KV (default 8G)\n"
          "  --roofline-bytes B    buffer of the read roofline (default 1G; 4G on GPUs)\n"
          "  --min-time S          seconds of timed attends per point (default 0.25)\n"
          "  --reps MIN,MAX        attends per point (default 3,30)\n"
          "  --max-attend-s S      a device whose attend takes longer stops its sweep there\n"
          "                        (default 1; 0.2 with --quick)\n"
          "  --no-baseline         skip the baselines\n"
          "  --no-memory           skip the memory and merge section\n"
          "  --check               exit 1 when a measured target is missed\n"
          "  -q, --quiet           no progress on stderr\n"
          "  --seed N              data seed (default 1)\n"
          "  -v, --verbose         library log messages\n"
          "  -h, --help            show this help\n"
          "Contexts and byte counts take K, M, G suffixes (binary).\n"
          "\n"
          "Under an MPI launcher with more than one rank (mpirun -np N pikv bench), only\n"
          "the memory and merge section runs, with one cache over every rank's devices:\n"
          "bytes per device and per rank, and both imbalances.\n",
          f);
}

/* "1K,4K,16K" into out (1..max_n entries in [lo, hi]). */
static int parse_list(const cli_parser *p, const char *value, int64_t lo, int64_t hi, int64_t *out, int max_n)
{
    char buf[512];
    snprintf(buf, sizeof buf, "%s", value);
    int n = 0;
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        uint64_t x;
        if (n == max_n) {
            cli_usage_error(p->cmd, "%s: at most %d entries", p->flag, max_n);
            return -1;
        }
        if (cli_parse_bytes(p, tok, &x) != 0) return -1;
        if ((int64_t)x < lo || (int64_t)x > hi) {
            cli_usage_error(p->cmd, "invalid value '%s' for %s: expected %lld..%lld", tok, p->flag, (long long)lo,
                            (long long)hi);
            return -1;
        }
        out[n++] = (int64_t)x;
    }
    if (n == 0) {
        cli_usage_error(p->cmd, "%s: an empty list", p->flag);
        return -1;
    }
    return n;
}

static int parse_list32(const cli_parser *p, const char *value, int64_t lo, int64_t hi, int32_t *out, int max_n)
{
    int64_t tmp[BENCH_MAX_LIST];
    const int n = parse_list(p, value, lo, hi, tmp, max_n < BENCH_MAX_LIST ? max_n : BENCH_MAX_LIST);
    for (int i = 0; i < n; i++) out[i] = (int32_t)tmp[i];
    return n;
}

static void set_defaults(bench_opts *o, int quick)
{
    static const int64_t ctx_full[] = {1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072};
    static const int64_t bctx_full[] = {1024, 4096, 16384, 32768};
    static const int64_t ctx_quick[] = {1024, 4096};
    static const int64_t bctx_quick[] = {1024};
    const int64_t *c = quick ? ctx_quick : ctx_full, *bc = quick ? bctx_quick : bctx_full;
    o->n_contexts = quick ? 2 : 8;
    o->n_batch_contexts = quick ? 1 : 4;
    memcpy(o->contexts, c, (size_t)o->n_contexts * sizeof *c);
    memcpy(o->batch_contexts, bc, (size_t)o->n_batch_contexts * sizeof *bc);
    o->batches[0] = 1;
    o->batches[1] = quick ? 4 : 16;
    o->n_batches = 2;
    o->max_kv_bytes = quick ? (256u << 20) : (8ull << 30);
    o->roofline_bytes = quick ? (64u << 20) : 0;
    o->min_time = quick ? 0.02 : 0.25;
    o->min_reps = quick ? 2 : 3;
    o->max_reps = quick ? 3 : 30;
    o->memory_devices = quick ? 2 : 4;
    o->max_attend_s = quick ? 0.2 : 1.0;
}

int cli_cmd_bench(int argc, char **argv)
{
    bench_opts o;
    memset(&o, 0, sizeof o);
    o.q_heads = 16;
    o.kv_heads = 16;
    o.head_dim = 128;
    o.page_size = 16;
    o.quant_group = 32;
    o.dtypes[0] = PIKV_DTYPE_F16;
    o.dtypes[1] = PIKV_DTYPE_INT8;
    o.dtypes[2] = PIKV_DTYPE_INT4;
    o.n_dtypes = 3;
    o.quest_ratios[0] = 8;
    o.quest_ratios[1] = 16;
    o.quest_ratios[2] = 32;
    o.n_quest = 3;
    o.n_experts = 8;
    o.expert_ks[0] = 1;
    o.expert_ks[1] = 2;
    o.expert_ks[2] = 4;
    o.n_expert_ks = 3;
    o.backends = "all";
    o.baseline = 1;
    o.memory = 1;
    o.seed = 1;
    int verbose = 0;
    /* --quick sets defaults the other options then override, wherever it appears */
    for (int i = 2; i < argc; i++)
        if (strcmp(argv[i], "--quick") == 0) o.check = -1;
    set_defaults(&o, o.check == -1);
    o.check = 0;

    cli_parser p;
    cli_parser_init(&p, "pikv bench", argc, argv, 2);
    const char *v;
    int id;
    int64_t tmp[BENCH_MAX_LIST];
    while ((id = cli_next_opt(&p, bench_opts_table, &v)) != CLI_OPT_END) {
        int bad = 0, n;
        switch (id) {
        case CLI_OPT_ERROR: return CLI_EXIT_USAGE;
        case OPT_HELP: bench_usage(stdout); return CLI_EXIT_OK;
        case OPT_QUICK: break;
        case OPT_JSON: o.json_path = v; break;
        case OPT_BACKEND: o.backends = v; break;
        case OPT_DEVICE:
            if (o.n_device_names == BENCH_MAX_DEVICES) {
                cli_usage_error(p.cmd, "--device: at most %d", BENCH_MAX_DEVICES);
                return CLI_EXIT_USAGE;
            }
            snprintf(o.device_names[o.n_device_names++], sizeof o.device_names[0], "%s", v);
            break;
        case OPT_THREADS: bad = cli_parse_i32(&p, v, 0, 256, &o.threads); break;
        case OPT_Q_HEADS: bad = cli_parse_i32(&p, v, 1, 1024, &o.q_heads); break;
        case OPT_KV_HEADS: bad = cli_parse_i32(&p, v, 1, 1024, &o.kv_heads); break;
        case OPT_HEAD_DIM: bad = cli_parse_i32(&p, v, 1, 1024, &o.head_dim); break;
        case OPT_PAGE_SIZE: bad = cli_parse_i32(&p, v, 1, 4096, &o.page_size); break;
        case OPT_QUANT_GROUP: bad = cli_parse_i32(&p, v, 1, 1024, &o.quant_group); break;
        case OPT_CONTEXTS:
            n = parse_list(&p, v, 1, 1 << 24, o.contexts, BENCH_MAX_LIST);
            bad = n < 0;
            if (n > 0) o.n_contexts = n;
            break;
        case OPT_BATCH_CONTEXTS:
            n = parse_list(&p, v, 1, 1 << 24, o.batch_contexts, BENCH_MAX_LIST);
            bad = n < 0;
            if (n > 0) o.n_batch_contexts = n;
            break;
        case OPT_BATCHES:
            n = parse_list32(&p, v, 1, 4096, o.batches, BENCH_MAX_LIST);
            bad = n < 0;
            if (n > 0) o.n_batches = n;
            break;
        case OPT_DTYPES: {
            static const char *const names[] = {"f32", "f16", "int8", "int4", NULL};
            char buf[128];
            snprintf(buf, sizeof buf, "%s", v);
            o.n_dtypes = 0;
            for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok && !bad; tok = strtok_r(NULL, ",", &save)) {
                int choice;
                bad = cli_parse_choice(&p, tok, names, &choice) != 0;
                if (!bad && o.n_dtypes == 4) {
                    cli_usage_error(p.cmd, "--dtypes '%s': at most 4 entries", v);
                    bad = 1;
                }
                if (!bad) o.dtypes[o.n_dtypes++] = (pikv_dtype)choice;
            }
            if (!bad && (o.n_dtypes == 0 || strlen(v) >= sizeof buf)) {
                cli_usage_error(p.cmd, "--dtypes '%s': expected a list of f32, f16, int8, int4", v);
                bad = 1;
            }
            break;
        }
        case OPT_QUEST:
            n = parse_list32(&p, v, 1, 1 << 20, o.quest_ratios, BENCH_MAX_LIST);
            bad = n < 0;
            if (n > 0) o.n_quest = n;
            break;
        case OPT_EXPERTS: bad = cli_parse_i32(&p, v, 0, 64, &o.n_experts); break;
        case OPT_EXPERT_KS:
            n = parse_list32(&p, v, 1, 64, o.expert_ks, BENCH_MAX_LIST);
            bad = n < 0;
            if (n > 0) o.n_expert_ks = n;
            break;
        case OPT_MEMORY_DEVICES: bad = cli_parse_i32(&p, v, 1, BENCH_MAX_DEVICES, &o.memory_devices); break;
        case OPT_MAX_KV: bad = cli_parse_bytes(&p, v, &o.max_kv_bytes); break;
        case OPT_ROOFLINE_BYTES: bad = cli_parse_bytes(&p, v, &o.roofline_bytes); break;
        case OPT_MIN_TIME: bad = cli_parse_double(&p, v, 0, 60, &o.min_time); break;
        case OPT_REPS:
            n = parse_list(&p, v, 1, 1000, tmp, 2);
            bad = n != 2 || tmp[0] > tmp[1];
            if (!bad) o.min_reps = (int32_t)tmp[0], o.max_reps = (int32_t)tmp[1];
            else if (n == 2) cli_usage_error(p.cmd, "--reps: MIN,MAX with MIN <= MAX");
            else if (n > 0) cli_usage_error(p.cmd, "--reps: MIN,MAX");
            break;
        case OPT_MAX_ATTEND: bad = cli_parse_double(&p, v, 0.001, 3600, &o.max_attend_s); break;
        case OPT_NO_BASELINE: o.baseline = 0; break;
        case OPT_NO_MEMORY: o.memory = 0; break;
        case OPT_CHECK: o.check = 1; break;
        case OPT_QUIET: o.quiet = 1; break;
        case OPT_SEED: bad = cli_parse_u64(&p, v, &o.seed); break;
        case OPT_VERBOSE: verbose = 1; break;
        }
        if (bad) return CLI_EXIT_USAGE;
    }
    if (o.q_heads % o.kv_heads != 0) {
        cli_usage_error(p.cmd, "--q-heads %d is not a multiple of --kv-heads %d", o.q_heads, o.kv_heads);
        return CLI_EXIT_USAGE;
    }

    /* over MPI ranks: the memory section only (the sweeps are per process) */
    run_mpi mpi = {0, 0, 1};
    const int over_ranks = run_mpi_env_size() > 1;
    run_mpi_silencer quiet_rank = {-1, -1};
    if (over_ranks) {
        if (!run_mpi_compiled()) {
            cli_usage_error(p.cmd, "started by an MPI launcher with %d ranks, but built without MPI", run_mpi_env_size());
            return CLI_EXIT_USAGE;
        }
        if (run_mpi_start(&mpi) != 0) return CLI_EXIT_FAIL;
        o.rank = mpi.rank;
        o.quiet |= mpi.rank != 0;
        run_mpi_silence(&quiet_rank, mpi.rank != 0);
    }

    bench_results r;
    memset(&r, 0, sizeof r);
    r.started_at = cli_now();
    const time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(r.date, sizeof r.date, "%Y-%m-%dT%H:%M:%SZ", &tm);

    cli_log_filter filter;
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = o.backends;
    cp.cpu_threads = o.threads;
    cp.log_level = cli_log_filter_init(&filter, verbose, o.quiet);
    cp.log_fn = cli_log;
    cp.log_user = &filter;
    pikv_context *ctx = NULL;
    pikv_status st = pikv_context_create(&cp, &ctx);
    if (st != PIKV_OK) {
        run_mpi_finish(&mpi);
        return cli_lib_error(NULL, "pikv_context_create", st);
    }

    /* the devices under test */
    for (int32_t d = 0; !over_ranks && d < pikv_device_count(ctx) && r.n_devices < BENCH_MAX_DEVICES; d++) {
        bench_device *bd = &r.devices[r.n_devices];
        memset(bd, 0, sizeof *bd);
        bd->index = d;
        pikv_device_get_info(ctx, d, &bd->info);
        int wanted = o.n_device_names == 0;
        for (int i = 0; i < o.n_device_names; i++) wanted |= strcmp(o.device_names[i], bd->info.name) == 0;
        if (wanted) r.n_devices++;
    }
    if (r.n_devices == 0 && !over_ranks) {
        cli_usage_error(p.cmd, "no device matches --device %s", o.device_names[0]);
        pikv_context_free(ctx);
        return CLI_EXIT_USAGE;
    }
    bench_env env;
    int rc = bench_env_init(&env, &o, ctx, &r);
    if (rc) {
        pikv_context_free(ctx);
        run_mpi_finish(&mpi);
        return rc;
    }
    /* 1. rooflines */
    for (int i = 0; i < r.n_devices && rc == 0; i++) {
        bench_device *bd = &r.devices[i];
        uint64_t bytes = o.roofline_bytes;
        if (!bytes) {
            bytes = bd->info.caps.host_visible ? (1ull << 30) : (4ull << 30);
            if (bd->info.caps.memory_total && bytes > bd->info.caps.memory_total / 4)
                bytes = bd->info.caps.memory_total / 4 / 4096 * 4096;
        }
        if (!o.quiet) fprintf(stderr, "pikv bench: %s: read roofline over %llu MiB\n", bd->info.name,
                              (unsigned long long)(bytes >> 20));
        pikv_read_bandwidth bw;
        st = pikv_device_read_bandwidth(ctx, bd->index, bytes, 10, &bw);
        if (st == PIKV_OK) {
            bd->read_bps = bw.bytes_per_s;
            bd->read_median_s = bw.median_s;
            bd->read_bytes = bw.bytes;
        } else {
            snprintf(bd->read_error, sizeof bd->read_error, "%s", pikv_context_last_error(ctx));
            continue;
        }
        /* the probe of the cold passes: 8x a 32 MiB LLC (and at least the host flush) on
           host memory, 1 GiB (20x an H100's L2) on device memory */
        uint64_t pb = bd->info.caps.host_visible ? (256ull << 20) : (1ull << 30);
        if (pb < env.flush_floats * sizeof(float)) pb = env.flush_floats * sizeof(float);
        if (o.roofline_bytes && pb > o.roofline_bytes) pb = o.roofline_bytes;
        if (bd->info.caps.memory_total && pb > bd->info.caps.memory_total / 8)
            pb = bd->info.caps.memory_total / 8 / 4096 * 4096;
        if (pikv_read_probe_create(ctx, bd->index, pb, &bd->probe) == PIKV_OK) bd->probe_bytes = pb;
        else if (!o.quiet)
            fprintf(stderr, "pikv bench: %s: no read probe (%s): its shares are of the roofline above\n",
                    bd->info.name, pikv_context_last_error(ctx));
    }
    /* 2. sweeps */
    for (int i = 0; i < r.n_devices && rc == 0; i++) {
        if (!o.quiet) fprintf(stderr, "pikv bench: %s: attention sweeps\n", r.devices[i].info.name);
        rc = bench_device_sweeps(&env, i);
    }
    /* 3. baselines, on the same data */
    for (int i = 0; i < r.n_devices && rc == 0 && o.baseline; i++) {
        const pikv_backend_kind k = r.devices[i].info.backend;
        if (k != PIKV_BACKEND_CPU && k != PIKV_BACKEND_CUDA) continue;
        if (!o.quiet) fprintf(stderr, "pikv bench: baselines on %s\n", r.devices[i].info.name);
        for (int b = 0; b < o.n_batches && rc == 0; b++) {
            const int64_t *list = o.batches[b] == 1 ? o.contexts : o.batch_contexts;
            const int n = o.batches[b] == 1 ? o.n_contexts : o.n_batch_contexts;
            for (int c = 0; c < n && rc == 0; c++)
                rc = k == PIKV_BACKEND_CPU ? bench_baseline_c(&env, i, o.batches[b], list[c])
                                           : bench_baseline_vendor(&env, i, o.batches[b], list[c]);
        }
    }
    /* 4. memory per device, the merge */
    if (rc == 0 && (o.memory || over_ranks)) {
        if (!o.quiet) fprintf(stderr, "pikv bench: memory per device (%d CPU devices)\n", o.memory_devices);
        rc = bench_memory_section(&env, &mpi);
    }
    if (over_ranks) rc = run_mpi_max(&mpi, rc); /* every rank agrees on the outcome */
    if (rc == 0 && o.rank == 0) {
        /* --json -: the JSON alone on stdout, the tables on stderr */
        FILE *tables = o.json_path && strcmp(o.json_path, "-") == 0 ? stderr : stdout;
        bench_print_tables(tables, &o, &r);
        bench_compute_targets(&o, &r);
        if (o.json_path) rc = bench_write_json(o.json_path, &o, &r);
        fprintf(tables, "\n(%.0f s in all)\n", cli_now() - r.started_at);
        if (over_ranks)
            fprintf(tables, "\nTargets: measured by a one-process run (over ranks only the memory section runs)\n");
        else
            bench_print_targets(tables, &r);
        if (rc == 0 && o.check)
            for (int i = 0; i < r.n_targets; i++)
                if (r.targets[i].have && !r.targets[i].pass) rc = CLI_EXIT_FAIL;
    }
    for (int i = 0; i < r.n_devices; i++) pikv_read_probe_free(r.devices[i].probe);
    bench_env_free(&env);
    free(r.points);
    pikv_context_free(ctx);
    run_mpi_unsilence(&quiet_rank);
    run_mpi_finish(&mpi);
    return rc;
}
