/*
 * `pikv run`: a seeded synthetic MoE decode workload driven through the cache.
 *
 * Options and the command itself; the run is in run_exec.c, the reports in
 * run_report.c. A single run prints per-device memory and traffic, step time, the
 * policies' quality figures and the error against a dense f64 reference over the full
 * context, and for int8/int4 pages the bytes of data, scales and the rest and each
 * layer's reconstruction error; exact configurations of f32/f16 pages exit 0 when the
 * error is within bound. --compare runs a fixed set of storage and policy
 * configurations on the same seeded workload and prints one table.
 */
#define _POSIX_C_SOURCE 200809L

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "run.h"

/* ------------------------------------------------------------------------ */
/* Options                                                                   */
/* ------------------------------------------------------------------------ */
enum {
    OPT_HELP = 1, OPT_LAYERS, OPT_QHEADS, OPT_KVHEADS, OPT_HEADDIM, OPT_EXPERTS, OPT_TOPK,
    OPT_CONTEXT, OPT_SEQS, OPT_STEPS, OPT_PAGESIZE, OPT_PLACEMENT, OPT_SHARDS, OPT_DEVICES,
    OPT_DTYPE, OPT_QUANT_GROUP, OPT_BACKEND, OPT_SEED, OPT_THREADS, OPT_CHUNK, OPT_CAPACITY, OPT_MEMORY,
    OPT_JSON, OPT_QUIET, OPT_VERBOSE,
    OPT_SELECT, OPT_EXPERTS_K, OPT_TOKEN_BUDGET, OPT_SINKS, OPT_RECENT, OPT_MEASURE,
    OPT_KV_BUDGET, OPT_BUDGET, OPT_BETA, OPT_EVICT, OPT_ALPHA, OPT_LAMBDA, OPT_DECAY,
    OPT_COMPARE, OPT_MPI, OPT_NO_MPI, OPT_MAX_IMBALANCE, OPT_NO_OVERLAP,
    OPT_TIERS, OPT_TIER_DEVICE, OPT_TIER_HOST, OPT_TIER_DISK, OPT_TIER_DIR, OPT_NUMA_NODE,
    OPT_STAGING, OPT_NO_PREFETCH, OPT_CHECKPOINT, OPT_CHECKPOINT_EVERY, OPT_RESTORE, OPT_COUNT_
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
    {"--quant-group", NULL, 1, OPT_QUANT_GROUP},
    {"--backend", NULL, 1, OPT_BACKEND},
    {"--seed", NULL, 1, OPT_SEED},
    {"--threads", NULL, 1, OPT_THREADS},
    {"--chunk", NULL, 1, OPT_CHUNK},
    {"--capacity", NULL, 1, OPT_CAPACITY},
    {"--device-memory", NULL, 1, OPT_MEMORY},
    {"--json", NULL, 0, OPT_JSON},
    {"--quiet", "-q", 0, OPT_QUIET},
    {"--verbose", "-v", 0, OPT_VERBOSE},
    {"--select", NULL, 1, OPT_SELECT},
    {"--experts-k", NULL, 1, OPT_EXPERTS_K},
    {"--token-budget", NULL, 1, OPT_TOKEN_BUDGET},
    {"--sinks", NULL, 1, OPT_SINKS},
    {"--recent", NULL, 1, OPT_RECENT},
    {"--measure", NULL, 0, OPT_MEASURE},
    {"--kv-budget", NULL, 1, OPT_KV_BUDGET},
    {"--budget", NULL, 1, OPT_BUDGET},
    {"--pyramid-beta", NULL, 1, OPT_BETA},
    {"--evict", NULL, 1, OPT_EVICT},
    {"--alpha", NULL, 1, OPT_ALPHA},
    {"--route-lambda", NULL, 1, OPT_LAMBDA},
    {"--miss-decay", NULL, 1, OPT_DECAY},
    {"--compare", NULL, 0, OPT_COMPARE},
    {"--mpi", NULL, 0, OPT_MPI},
    {"--no-mpi", NULL, 0, OPT_NO_MPI},
    {"--max-imbalance", NULL, 1, OPT_MAX_IMBALANCE},
    {"--no-overlap", NULL, 0, OPT_NO_OVERLAP},
    {"--tiers", NULL, 0, OPT_TIERS},
    {"--tier-device", NULL, 1, OPT_TIER_DEVICE},
    {"--tier-host", NULL, 1, OPT_TIER_HOST},
    {"--tier-disk", NULL, 1, OPT_TIER_DISK},
    {"--tier-dir", NULL, 1, OPT_TIER_DIR},
    {"--numa-node", NULL, 1, OPT_NUMA_NODE},
    {"--staging-pages", NULL, 1, OPT_STAGING},
    {"--no-prefetch", NULL, 0, OPT_NO_PREFETCH},
    {"--checkpoint", NULL, 1, OPT_CHECKPOINT},
    {"--checkpoint-every", NULL, 1, OPT_CHECKPOINT_EVERY},
    {"--restore", NULL, 1, OPT_RESTORE},
    {NULL, NULL, 0, 0},
};

/* Choices of --budget and --evict (NONE is not offered). */
static const char *const budget_choices[] = {"uniform", "pyramid", NULL};
static const char *const evict_choices[] = {"lru", "lfu", "streaming", "h2o", "utility", NULL};

#define COMPARE_DEFAULT_STEPS 16

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
    o->quant_group = 32;
    o->backend = "cpu";
    o->numa_node = -1;
    /* The library's policy defaults: exact reads, no budget, plain top-k. */
    const pikv_cache_params d = pikv_cache_default_params();
    o->policy.select = d.select;
    o->policy.budget = d.budget;
    o->policy.evict = d.evict;
    o->policy.route = d.route;
    o->policy.dtype = o->dtype;
    if (d.quant_group > 0) o->quant_group = d.quant_group;
}

static void run_usage(FILE *f)
{
    const pikv_cache_params d = pikv_cache_default_params();
    fputs("usage: pikv run [options]\n"
          "\n"
          "Runs a seeded synthetic MoE decode workload through a PiKV cache: prefill of\n"
          "every sequence's context, then decode steps that attend a batch of all\n"
          "sequences per layer and append one token. Every attention output is compared\n"
          "with dense attention computed in double precision over the full context. Prints\n"
          "per-device memory, bytes read per step, step time, the policies' quality figures\n"
          "and the error. Exit status: 0, or 1 if a library call fails or an exact\n"
          "configuration (--select all, no --kv-budget, f32 or f16 pages) misses its error\n"
          "bound (1e-4 for f32, 5e-3 for f16); a lossy configuration (a selection, a\n"
          "budget, or int8/int4 pages) reports its error and has no bound. 2 on a bad\n"
          "command line.\n"
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
          "  --steps N           decode steps (default 32; 16 with --compare)\n"
          "  --chunk N           prefill append chunk, tokens (default 256; with --kv-budget\n"
          "                      at most max(--recent, --page-size), see below)\n"
          "  --seed N            workload seed, decimal or 0x hex (default 1)\n"
          "cache:\n"
          "  --page-size N       tokens per page, 1..4096 (default 16)\n"
          "  --dtype T           f32|f16|int8|int4 page storage (default f16). int8/int4:\n"
          "                      a page is quantized when it fills (the open page of each\n"
          "                      shard stays f16): keys per channel over groups of tokens\n"
          "                      (within the page), values per token over groups of\n"
          "                      channels, an f16 scale and zero point per group; int4\n"
          "                      packs two values a byte. Lossy: no error bound; the run\n"
          "                      reports the bytes of data, scales and the rest per device,\n"
          "                      KV MiB vs the same pages in f16, and each layer's\n"
          "                      reconstruction error\n"
          "  --quant-group N     int8/int4: values per scale and zero point, 1..1024\n"
          "                      (default 32; key groups are at most --page-size tokens)\n"
          "  --placement P       expert|hash|balanced (default expert); balanced also\n"
          "                      rebalances after prefill and reports pages moved\n"
          "  --shards N          hash/dense placement: shards per layer, 0 = library\n"
          "                      default (default 0)\n"
          "  --capacity N        tokens per layer the cache may hold, 0 = what the run\n"
          "                      needs plus one page per sequence and shard (default 0)\n",
          f);
    fprintf(f,
            "selection (what each decode attend reads):\n"
            "  --select S          all|experts|quest|experts+quest (default all = exact).\n"
            "                      experts: only the shards of the query's experts (PiKV);\n"
            "                      quest: the pages with the best Quest bound under a token\n"
            "                      budget; experts+quest: Quest among the expert shards\n"
            "  --experts-k N       experts: how many of the query's top-k experts to read,\n"
            "                      0 = all top-k (default 0)\n"
            "  --token-budget N    quest: tokens read per query and KV head, sink and recent\n"
            "                      pages included, >= --sinks + --recent (default 1/8 of\n"
            "                      --context, at least --sinks + --recent)\n"
            "  --sinks N           first tokens of a sequence: always read, never evicted\n"
            "                      (default %" PRId32 ")\n"
            "  --recent N          last tokens of a sequence: always read, never evicted\n"
            "                      (default %" PRId32 ")\n"
            "  --measure           also run exact attention at every attend to measure the\n"
            "                      selection's recall and error vs exact (a second full pass,\n"
            "                      included in the step time; implied by --compare)\n"
            "budgets and eviction:\n"
            "  --kv-budget N       tokens each sequence keeps, summed over all layers; turns\n"
            "                      on per-layer budgets and eviction (default: no budget)\n"
            "  --budget B          uniform|pyramid split over layers (default pyramid)\n"
            "  --pyramid-beta X    pyramid shape, >= 1: the top layer keeps N/(X*layers), the\n"
            "                      bottom 2N/layers minus that; 1 = uniform (default %g)\n"
            "  --evict P           lru|lfu|streaming|h2o|utility: which pages go when a layer\n"
            "                      is over budget (default streaming)\n"
            "  --alpha A,R,F       utility weights of attention, recency and frequency, >= 0,\n"
            "                      not all 0 (default %g,%g,%g)\n"
            "                      With a budget, prefill appends chunks of at most\n"
            "                      max(--recent, --page-size) tokens and each layer attends\n"
            "                      every sequence's current query after each round (exact,\n"
            "                      not in the step figures), as prefill attention would, so\n"
            "                      the policies see attention and use before a page may go.\n"
            "routing (every token is routed by pikv_route over the workload's router logits):\n"
            "  --route-lambda X    cache-aware penalty: experts ranked by logit minus\n"
            "                      X * log(1 + misses); 0 = plain top-k, the workload's own\n"
            "                      choice (default %g)\n"
            "  --miss-decay X      misses are multiplied by X at every routing call of a\n"
            "                      layer, in [0, 1] (default %g)\n",
            d.select.sink_tokens, d.select.recent_tokens, (double)d.budget.pyramid_beta,
            (double)d.evict.alpha_attention, (double)d.evict.alpha_recency,
            (double)d.evict.alpha_frequency, (double)d.route.lambda, (double)d.route.miss_decay);
    fputs("comparison:\n"
          "  --compare           run these configurations on the same seeded workload and\n"
          "                      print one table: exact; int8 and int4 pages (exact\n"
          "                      selection); experts (k=1); quest at 1/4, 1/8 and 1/16 of\n"
          "                      --context; experts+quest at 1/8; a pyramid budget of 1/4\n"
          "                      of the context per layer with streaming, lru, lfu, h2o\n"
          "                      and utility eviction; the same budget uniform with h2o;\n"
          "                      pyramid h2o with cache-aware routing (lambda 1); and int4\n"
          "                      pages with quest 1/8 and with pyramid h2o (combined\n"
          "                      PiKV). A recon K column shows the key reconstruction\n"
          "                      error of int8/int4 rows. Rows without a dtype in their\n"
          "                      name use --dtype (a quantized --dtype names it in every\n"
          "                      row and drops the int row it would repeat). Budgets\n"
          "                      are raised to the --sinks + --recent floor where needed.\n"
          "                      Geometry, workload, cache and device options apply, as do\n"
          "                      --quant-group, --sinks, --recent, --pyramid-beta, --alpha\n"
          "                      and --miss-decay; the other policy options are per row\n"
          "devices:\n"
          "  --backend LIST      backends to load (cpu, opencl, vulkan, cuda, a comma list,\n"
          "                      or all; default cpu). For a single non-CPU backend the\n"
          "                      cache uses that backend's devices; otherwise all devices\n"
          "  --devices N         CPU devices to expose, 1..64 (default 2); with a single\n"
          "                      non-CPU backend, use its first N devices\n"
          "  --threads N         CPU backend worker threads, 0 = online cores (default 0)\n"
          "  --device-memory N   bytes each CPU device may hold, 0 = unlimited (default 0)\n",
          f);
    fputs("memory tiers (docs/tiers.md):\n"
          "  --tiers             device -> host -> disk tiers: pages over a device's budget\n"
          "                      (and pages evicted under --kv-budget) are demoted, not\n"
          "                      dropped; attend fetches the demoted pages it reads. Reports\n"
          "                      bytes per tier, demotions, promotions, fetches, the fetch\n"
          "                      stall time and the prefetch hit rate\n"
          "  --tier-device N     page bytes each device keeps resident (K/M/G suffixes);\n"
          "                      default a quarter of the run's KV page bytes over the devices\n"
          "  --tier-host N       host tier bytes, 0 = no limit (default 0)\n"
          "  --tier-disk N       disk tier bytes, 0 = no disk tier (default 0)\n"
          "  --tier-dir DIR      directory of the disk tier's files (default $TMPDIR or /tmp)\n"
          "  --numa-node N       bind the host tier to NUMA node N (CXL memory expanders are\n"
          "                      CPU-less nodes; needs libnuma)\n"
          "  --staging-pages N   device slots for fetched pages per device (default: library)\n"
          "  --no-prefetch       do not prefetch what the next layer read at the last step\n"
          "checkpoints (docs/stream.md):\n"
          "  --checkpoint PATH   write a checkpoint of the cache to PATH every\n"
          "  --checkpoint-every N  N decode steps: the first one full (temporary file,\n"
          "                      fsync, rename), the next ones incremental (the pages changed\n"
          "                      since, then a commit record)\n"
          "  --restore PATH      resume a run from its checkpoint: the cache is restored from\n"
          "                      PATH instead of the prefill, the workload fast-forwards to\n"
          "                      the checkpoint's length, and the remaining decode steps of\n"
          "                      --steps run and are checked as usual (give the options of the\n"
          "                      run that wrote it)\n",
          f);
    fputs("ranks (MPI; docs/distributed.md):\n"
          "  mpirun -np N pikv run ...  runs one cache over N ranks: shards are placed over\n"
          "                      every rank's devices (--devices N per rank), each rank\n"
          "                      holds only its shards' pages; every rank generates the\n"
          "                      same seeded workload, appends its contiguous slice of each\n"
          "                      prefill chunk (and the decode token of the sequences s\n"
          "                      with s mod N = rank), attends the same batch and checks the\n"
          "                      merged output against the reference. Rank 0 prints every\n"
          "                      rank's memory, load imbalance and traffic. Not over\n"
          "                      ranks: --select quest or experts+quest, --evict h2o or\n"
          "                      utility, --compare; --placement balanced places shards\n"
          "                      as their first page arrives (no rebalance)\n"
          "  --mpi               use MPI even when the launcher is not recognized (or with\n"
          "                      one rank); by default MPI is used when the environment\n"
          "                      shows an MPI launcher that started more than one rank\n"
          "                      (Open MPI, MPICH, Intel MPI, MVAPICH2)\n"
          "  --no-mpi            never use MPI: under mpirun every rank runs alone\n"
          "  --max-imbalance X   over ranks: exit 1 when the largest rank's device memory\n"
          "                      exceeds X times the mean over ranks, X >= 1 (default: no\n"
          "                      check)\n",
          f);
    fputs("  --no-overlap        over ranks: blocking attends, one layer after the other\n"
          "                      (default: each decode step pipelines its layers, the\n"
          "                      merge of layer l in flight while layer l + 1 starts)\n"
          "output:\n"
          "  --json              print one JSON object on stdout instead of the table (with\n"
          "                      --compare: an array of one object per row)\n"
          "  -q, --quiet         no progress on stderr; print only the one-line verdict\n"
          "                      (with --json: only suppress progress; with --compare: the\n"
          "                      table alone)\n"
          "  -v, --verbose       per-layer memory, budget, eviction and routing figures,\n"
          "                      and for int8/int4 reconstruction error (with --compare: KV\n"
          "                      MiB per layer and row, and the key/value reconstruction\n"
          "                      error per layer of int8/int4 rows), and the library's\n"
          "                      informational log messages\n"
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
    int seen[OPT_COUNT_] = {0};
    double x, alpha[3];
    int64_t i64;
    run_policy *pol = &o->policy;
    while ((id = cli_next_opt(&p, run_opts_table, &v)) != CLI_OPT_END) {
        int bad = 0;
        if (id > 0 && id < OPT_COUNT_) seen[id] = 1;
        switch (id) {
        case CLI_OPT_ERROR: return 2;
        case OPT_HELP: run_usage(stdout); return 1;
        case OPT_LAYERS: bad = cli_parse_i32(&p, v, 1, 4096, &o->layers); break;
        case OPT_QHEADS: bad = cli_parse_i32(&p, v, 1, 1024, &o->q_heads); break;
        case OPT_KVHEADS: bad = cli_parse_i32(&p, v, 1, 1024, &o->kv_heads); break;
        case OPT_HEADDIM: bad = cli_parse_i32(&p, v, 1, WL_MAX_HEAD_DIM, &o->head_dim); break;
        case OPT_EXPERTS: bad = cli_parse_i32(&p, v, 1, 65536, &o->experts); break;
        case OPT_TOPK: bad = cli_parse_i32(&p, v, 1, WL_MAX_TOP_K, &o->top_k); break;
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
            bad = cli_parse_choice(&p, v, run_placement_names, &choice);
            if (!bad) o->placement = (pikv_placement)choice;
            break;
        case OPT_DTYPE:
            bad = cli_parse_choice(&p, v, run_dtype_names, &choice);
            if (!bad) o->dtype = (pikv_dtype)choice;
            break;
        case OPT_QUANT_GROUP: bad = cli_parse_i32(&p, v, 1, 1024, &o->quant_group); break;
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
        case OPT_SELECT:
            bad = cli_parse_choice(&p, v, run_select_names, &choice);
            if (!bad) pol->select.mode = (uint32_t)choice; /* the names are indexed by bits */
            break;
        case OPT_EXPERTS_K:
            bad = cli_parse_i32(&p, v, 0, WL_MAX_TOP_K, &pol->select.experts_top_k);
            break;
        case OPT_TOKEN_BUDGET:
            bad = cli_parse_i32(&p, v, 1, INT32_MAX, &pol->select.token_budget);
            break;
        case OPT_SINKS: bad = cli_parse_i32(&p, v, 0, 1 << 30, &pol->select.sink_tokens); break;
        case OPT_RECENT: bad = cli_parse_i32(&p, v, 0, 1 << 30, &pol->select.recent_tokens); break;
        case OPT_MEASURE: pol->select.measure = 1; break;
        case OPT_KV_BUDGET:
            bad = cli_parse_i64(&p, v, 1, INT64_MAX / 4, &i64);
            if (!bad) pol->budget.total_tokens = i64;
            break;
        case OPT_BUDGET:
            bad = cli_parse_choice(&p, v, budget_choices, &choice);
            if (!bad) pol->budget.mode = choice == 0 ? PIKV_BUDGET_UNIFORM : PIKV_BUDGET_PYRAMID;
            break;
        case OPT_BETA:
            bad = cli_parse_double(&p, v, 1.0, 1e6, &x);
            if (!bad) pol->budget.pyramid_beta = (float)x;
            break;
        case OPT_EVICT:
            bad = cli_parse_choice(&p, v, evict_choices, &choice);
            if (!bad) pol->evict.policy = (pikv_evict_policy)(choice + 1); /* after NONE */
            break;
        case OPT_ALPHA:
            bad = cli_parse_doubles(&p, v, 3, 0.0, 1e6, alpha);
            if (!bad && alpha[0] + alpha[1] + alpha[2] <= 0.0) {
                cli_usage_error(p.cmd, "invalid value '%s' for --alpha: the weights must not "
                                       "all be 0", v);
                bad = 1;
            }
            if (!bad) {
                pol->evict.alpha_attention = (float)alpha[0];
                pol->evict.alpha_recency = (float)alpha[1];
                pol->evict.alpha_frequency = (float)alpha[2];
            }
            break;
        case OPT_LAMBDA:
            bad = cli_parse_double(&p, v, 0.0, 1e6, &x);
            if (!bad) pol->route.lambda = (float)x;
            break;
        case OPT_DECAY:
            bad = cli_parse_double(&p, v, 0.0, 1.0, &x);
            if (!bad) pol->route.miss_decay = (float)x;
            break;
        case OPT_COMPARE: o->compare = 1; break;
        case OPT_MPI: o->mpi = 1; break;
        case OPT_NO_MPI: o->mpi = -1; break;
        case OPT_MAX_IMBALANCE: bad = cli_parse_double(&p, v, 1.0, 1e6, &o->max_imbalance); break;
        case OPT_NO_OVERLAP: o->no_overlap = 1; break;
        case OPT_TIERS: o->tiers = 1; break;
        case OPT_TIER_DEVICE: bad = cli_parse_bytes(&p, v, &o->tier_device); break;
        case OPT_TIER_HOST: bad = cli_parse_bytes(&p, v, &o->tier_host); break;
        case OPT_TIER_DISK: bad = cli_parse_bytes(&p, v, &o->tier_disk); break;
        case OPT_TIER_DIR: o->tier_dir = v; break;
        case OPT_NUMA_NODE: bad = cli_parse_i32(&p, v, 0, 1 << 20, &o->numa_node); break;
        case OPT_STAGING: bad = cli_parse_i32(&p, v, 1, 1 << 24, &o->staging_pages); break;
        case OPT_NO_PREFETCH: o->no_prefetch = 1; break;
        case OPT_CHECKPOINT: o->checkpoint_path = v; break;
        case OPT_CHECKPOINT_EVERY: bad = cli_parse_i32(&p, v, 1, 1 << 24, &o->checkpoint_every); break;
        case OPT_RESTORE: o->restore_path = v; break;
        default: bad = 1;
        }
        if (bad) return 2;
    }
    /* Cross-flag consistency; defaults adapt to explicit settings where obvious. */
    pol->dtype = o->dtype;
    if (seen[OPT_MPI] && seen[OPT_NO_MPI]) {
        cli_usage_error(p.cmd, "--mpi and --no-mpi exclude each other");
        return 2;
    }
    if (o->mpi > 0 && !run_mpi_compiled()) {
        cli_usage_error(p.cmd, "--mpi: this pikv was built without MPI (configure with "
                               "-DPIKV_MPI=ON; docs/distributed.md)");
        return 2;
    }
    o->distributed = run_mpi_compiled() &&
                     (o->mpi > 0 || (o->mpi == 0 && run_mpi_env_size() > 1));
    if (o->distributed) {
        /* what a cache over ranks cannot do yet (docs/distributed.md, "Not over ranks") */
        const uint32_t m = pol->select.mode;
        const char *why = NULL;
        if (o->compare)
            why = "--compare (its rows include Quest selection and H2O/utility eviction)";
        else if (m & PIKV_SELECT_QUEST)
            why = m & PIKV_SELECT_EXPERTS ? "--select experts+quest (Quest page bounds live with "
                                            "the pages, on their owner rank)"
                                          : "--select quest (Quest page bounds live with the "
                                            "pages, on their owner rank)";
        else if (seen[OPT_EVICT] && pol->evict.policy == PIKV_EVICT_H2O)
            why = "--evict h2o (the attention mass it ranks pages by is measured on the pages' "
                  "owner rank)";
        else if (seen[OPT_EVICT] && pol->evict.policy == PIKV_EVICT_UTILITY)
            why = "--evict utility (the attention mass it ranks pages by is measured on the "
                  "pages' owner rank)";
        if (why) {
            cli_usage_error(p.cmd, "%s is not supported over MPI ranks (docs/distributed.md); "
                                   "run it in one process (--no-mpi, or without mpirun)", why);
            return 2;
        }
    } else if (seen[OPT_MAX_IMBALANCE] || seen[OPT_NO_OVERLAP]) {
        cli_usage_error(p.cmd, "%s needs a cache over MPI ranks (mpirun -np N pikv "
                               "run ..., or --mpi)",
                        seen[OPT_MAX_IMBALANCE] ? "--max-imbalance" : "--no-overlap");
        return 2;
    }
    /* Tiers and checkpoints: options that need another one, and what they exclude. */
    {
        static const struct { int id; const char *name; } tier_opts[] = {
            {OPT_TIER_DEVICE, "--tier-device"}, {OPT_TIER_HOST, "--tier-host"},
            {OPT_TIER_DISK, "--tier-disk"},     {OPT_TIER_DIR, "--tier-dir"},
            {OPT_NUMA_NODE, "--numa-node"},     {OPT_STAGING, "--staging-pages"},
            {OPT_NO_PREFETCH, "--no-prefetch"},
        };
        for (size_t i = 0; i < sizeof tier_opts / sizeof tier_opts[0]; i++) {
            if (seen[tier_opts[i].id] && !o->tiers) {
                cli_usage_error(p.cmd, "%s needs --tiers", tier_opts[i].name);
                return 2;
            }
        }
        if (seen[OPT_TIER_DIR] && !seen[OPT_TIER_DISK]) {
            cli_usage_error(p.cmd, "--tier-dir needs --tier-disk (the disk tier's byte budget)");
            return 2;
        }
        if (seen[OPT_CHECKPOINT_EVERY] != seen[OPT_CHECKPOINT]) {
            cli_usage_error(p.cmd, "%s", seen[OPT_CHECKPOINT] ? "--checkpoint needs --checkpoint-every N"
                                                              : "--checkpoint-every needs --checkpoint PATH");
            return 2;
        }
        const char *what = o->tiers ? "--tiers" : o->checkpoint_path ? "--checkpoint"
                                                  : o->restore_path ? "--restore" : NULL;
        if (what && (o->compare || o->distributed)) {
            cli_usage_error(p.cmd, "%s cannot be combined with %s", what,
                            o->compare ? "--compare" : "a cache over MPI ranks (docs/stream.md, "
                                                       "docs/tiers.md: not over ranks yet)");
            return 2;
        }
    }
    if (seen[OPT_QUANT_GROUP] && !o->compare && !run_dtype_quantized(o->dtype)) {
        cli_usage_error(p.cmd, "--quant-group needs --dtype int8 or int4 (or --compare)");
        return 2;
    }
    if (!seen[OPT_KVHEADS] && o->q_heads % o->kv_heads != 0) o->kv_heads = o->q_heads;
    if (!seen[OPT_TOPK] && o->top_k > o->experts) o->top_k = o->experts;
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
    const int64_t floor_tokens = (int64_t)pol->select.sink_tokens + pol->select.recent_tokens;
    if (o->compare) {
        static const struct { int id; const char *name; } per_row[] = {
            {OPT_SELECT, "--select"},     {OPT_EXPERTS_K, "--experts-k"},
            {OPT_TOKEN_BUDGET, "--token-budget"}, {OPT_KV_BUDGET, "--kv-budget"},
            {OPT_BUDGET, "--budget"},     {OPT_EVICT, "--evict"},
            {OPT_LAMBDA, "--route-lambda"},
        };
        for (size_t i = 0; i < sizeof per_row / sizeof per_row[0]; i++) {
            if (seen[per_row[i].id]) {
                cli_usage_error(p.cmd, "%s cannot be combined with --compare, which sets it per "
                                       "row (see 'pikv run --help')", per_row[i].name);
                return 2;
            }
        }
        if (!seen[OPT_STEPS]) o->steps = COMPARE_DEFAULT_STEPS;
        pol->select.measure = 1;
        if (floor_tokens > INT32_MAX / 2) {
            cli_usage_error(p.cmd, "--sinks + --recent = %" PRId64 " is too large", floor_tokens);
            return 2;
        }
        return 0;
    }
    /* Selection. */
    const uint32_t mode = pol->select.mode;
    if (seen[OPT_EXPERTS_K] && !(mode & PIKV_SELECT_EXPERTS)) {
        cli_usage_error(p.cmd, "--experts-k needs --select experts or experts+quest");
        return 2;
    }
    if (pol->select.experts_top_k > o->top_k) {
        cli_usage_error(p.cmd, "invalid value '%" PRId32 "' for --experts-k: exceeds --top-k %" PRId32,
                        pol->select.experts_top_k, o->top_k);
        return 2;
    }
    if (seen[OPT_TOKEN_BUDGET] && !(mode & PIKV_SELECT_QUEST)) {
        cli_usage_error(p.cmd, "--token-budget needs --select quest or experts+quest");
        return 2;
    }
    if (mode & PIKV_SELECT_QUEST) {
        if (!seen[OPT_TOKEN_BUDGET]) {
            int64_t tb = o->context / 8;
            if (tb < floor_tokens) tb = floor_tokens;
            if (tb < 1) tb = 1;
            if (tb > INT32_MAX) tb = INT32_MAX;
            pol->select.token_budget = (int32_t)tb;
        } else if ((int64_t)pol->select.token_budget < floor_tokens) {
            cli_usage_error(p.cmd, "invalid value '%" PRId32 "' for --token-budget: must be at "
                                   "least --sinks + --recent = %" PRId64,
                            pol->select.token_budget, floor_tokens);
            return 2;
        }
    }
    /* Budgets and eviction. */
    if (!seen[OPT_KV_BUDGET]) {
        static const struct { int id; const char *name; } needs[] = {
            {OPT_BUDGET, "--budget"}, {OPT_BETA, "--pyramid-beta"}, {OPT_EVICT, "--evict"},
            {OPT_ALPHA, "--alpha"},
        };
        for (size_t i = 0; i < sizeof needs / sizeof needs[0]; i++) {
            if (seen[needs[i].id]) {
                cli_usage_error(p.cmd, "%s needs --kv-budget", needs[i].name);
                return 2;
            }
        }
        return 0;
    }
    if (!seen[OPT_BUDGET]) pol->budget.mode = PIKV_BUDGET_PYRAMID;
    if (!seen[OPT_EVICT]) pol->evict.policy = PIKV_EVICT_STREAMING;
    if (seen[OPT_BETA] && pol->budget.mode != PIKV_BUDGET_PYRAMID) {
        cli_usage_error(p.cmd, "--pyramid-beta needs --budget pyramid");
        return 2;
    }
    if (seen[OPT_ALPHA] && pol->evict.policy != PIKV_EVICT_UTILITY) {
        cli_usage_error(p.cmd, "--alpha needs --evict utility");
        return 2;
    }
    if (pol->budget.total_tokens < floor_tokens * o->layers) {
        cli_usage_error(p.cmd, "invalid value '%" PRId64 "' for --kv-budget: must be at least "
                               "--layers x (--sinks + --recent) = %" PRId64,
                        pol->budget.total_tokens, floor_tokens * o->layers);
        return 2;
    }
    return 0;
}

/* ------------------------------------------------------------------------ */
/* The command                                                               */
/* ------------------------------------------------------------------------ */
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

/* --compare's rows; returns how many (at most COMPARE_MAX_ROWS). */
#define COMPARE_MAX_ROWS 24

#if defined(__GNUC__)
__attribute__((format(printf, 2, 3)))
#endif
static void set_label(run_policy *row, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(row->label, sizeof row->label, fmt, ap);
    va_end(ap);
}

static int compare_rows(const run_opts *o, run_policy *rows)
{
    const pikv_cache_params d = pikv_cache_default_params();
    run_policy base = o->policy; /* sinks, recent, beta, alphas, decay; measure on */
    base.select.mode = PIKV_SELECT_ALL;
    base.select.experts_top_k = 0;
    base.select.token_budget = d.select.token_budget;
    base.budget.mode = PIKV_BUDGET_NONE;
    base.budget.total_tokens = d.budget.total_tokens;
    base.evict.policy = PIKV_EVICT_NONE;
    base.route.lambda = 0.0f;
    const int64_t floor_tokens = (int64_t)base.select.sink_tokens + base.select.recent_tokens;
    int n = 0;

    rows[n] = base;
    set_label(&rows[n++], "exact");

    /* Quantized pages, exact selection (a quantized --dtype already is the first row). */
    static const pikv_dtype quant[] = {PIKV_DTYPE_INT8, PIKV_DTYPE_INT4};
    for (int i = 0; i < 2; i++) {
        if (quant[i] == base.dtype) continue;
        rows[n] = base;
        rows[n].dtype = quant[i];
        set_label(&rows[n++], "exact");
    }

    rows[n] = base;
    rows[n].select.mode = PIKV_SELECT_EXPERTS;
    rows[n].select.experts_top_k = 1;
    set_label(&rows[n++], "experts k=1");

    static const int fractions[] = {4, 8, 16};
    for (int i = 0; i < 3; i++) {
        int64_t tb = o->context / fractions[i];
        const int floored = tb < floor_tokens;
        if (floored) tb = floor_tokens;
        if (tb < 1) tb = 1;
        rows[n] = base;
        rows[n].select.mode = PIKV_SELECT_QUEST;
        rows[n].select.token_budget = (int32_t)tb;
        set_label(&rows[n++], "quest 1/%d: %" PRId64 "%s", fractions[i], tb,
                  floored ? "*" : "");
    }
    {
        int64_t tb = o->context / 8;
        const int floored = tb < floor_tokens;
        if (floored) tb = floor_tokens;
        if (tb < 1) tb = 1;
        rows[n] = base;
        rows[n].select.mode = PIKV_SELECT_EXPERTS | PIKV_SELECT_QUEST;
        rows[n].select.experts_top_k = 1;
        rows[n].select.token_budget = (int32_t)tb;
        set_label(&rows[n++], "experts k=1 + quest 1/8: %" PRId64 "%s", tb,
                  floored ? "*" : "");
    }

    /* Budgets: 1/4 of the context per layer on average, at least the floor. */
    int64_t total = o->context / 4 * o->layers;
    const int floored = total < floor_tokens * o->layers;
    if (floored) total = floor_tokens * o->layers;
    if (total < 1) total = 1;
    const char *fl = floored ? "*" : "";
    static const pikv_evict_policy policies[] = {PIKV_EVICT_STREAMING, PIKV_EVICT_LRU,
                                                 PIKV_EVICT_LFU, PIKV_EVICT_H2O,
                                                 PIKV_EVICT_UTILITY};
    for (int i = 0; i < 5; i++) {
        rows[n] = base;
        rows[n].budget.mode = PIKV_BUDGET_PYRAMID;
        rows[n].budget.total_tokens = total;
        rows[n].evict.policy = policies[i];
        set_label(&rows[n++], "pyramid %" PRId64 "%s %s", total, fl,
                 run_evict_names[policies[i]]);
    }
    rows[n] = base;
    rows[n].budget.mode = PIKV_BUDGET_UNIFORM;
    rows[n].budget.total_tokens = total;
    rows[n].evict.policy = PIKV_EVICT_H2O;
    set_label(&rows[n++], "uniform %" PRId64 "%s h2o", total, fl);

    rows[n] = base;
    rows[n].budget.mode = PIKV_BUDGET_PYRAMID;
    rows[n].budget.total_tokens = total;
    rows[n].evict.policy = PIKV_EVICT_H2O;
    rows[n].route.lambda = 1.0f;
    set_label(&rows[n++], "pyramid %" PRId64 "%s h2o lambda=1", total,
             fl);

    /* Combined PiKV: int4 pages under a selection and under a budget. */
    if (base.dtype != PIKV_DTYPE_INT4) {
        int64_t tb = o->context / 8;
        const int tb_floored = tb < floor_tokens;
        if (tb_floored) tb = floor_tokens;
        if (tb < 1) tb = 1;
        rows[n] = base;
        rows[n].dtype = PIKV_DTYPE_INT4;
        rows[n].select.mode = PIKV_SELECT_QUEST;
        rows[n].select.token_budget = (int32_t)tb;
        set_label(&rows[n++], "quest 1/8: %" PRId64 "%s", tb, tb_floored ? "*" : "");

        rows[n] = base;
        rows[n].dtype = PIKV_DTYPE_INT4;
        rows[n].budget.mode = PIKV_BUDGET_PYRAMID;
        rows[n].budget.total_tokens = total;
        rows[n].evict.policy = PIKV_EVICT_H2O;
        set_label(&rows[n++], "pyramid %" PRId64 "%s h2o", total, fl);
    }

    /* Quantized rows name their dtype: "int4" (exact selection), "int4 + quest ...". */
    for (int i = 0; i < n; i++) {
        if (!run_dtype_quantized(rows[i].dtype)) continue;
        char plain[sizeof rows[i].label];
        memcpy(plain, rows[i].label, sizeof plain);
        if (strcmp(plain, "exact") == 0)
            set_label(&rows[i], "%s", run_dtype_names[rows[i].dtype]);
        else
            set_label(&rows[i], "%s + %s", run_dtype_names[rows[i].dtype], plain);
    }
    return n;
}

/* Over MPI ranks: rank 0 gathers every rank's figures and prints; the exit status is the
   worst of every rank's (a rank whose output misses the bound fails the run). */
static int run_over_ranks(const run_opts *o, run_shared *sh, cli_progress *prog,
                          run_result *r)
{
    int rc = run_exec(o, &o->policy, sh, prog, "", r);
    cli_progress_done(prog);
    /* a library failure is the same on every rank (the library exchanges statuses) */
    if (run_mpi_max(sh->mpi, rc) != CLI_EXIT_OK) return rc != CLI_EXIT_OK ? rc : CLI_EXIT_FAIL;
    if (run_gather_ranks(sh, r) != 0) return CLI_EXIT_FAIL;
    int verdict = r->bounded && !run_passed(r) ? CLI_EXIT_FAIL : CLI_EXIT_OK;
    if (!run_ranks_balanced(o, r)) verdict = CLI_EXIT_FAIL;
    if (sh->mpi->rank == 0) {
        if (o->json)
            run_print_json(o, r);
        else if (o->quiet)
            run_print_quiet(o, r);
        else {
            run_print_table(o, r);
            run_print_ranks(o, r);
        }
        fflush(stdout);
    }
    return run_mpi_max(sh->mpi, verdict);
}

int cli_cmd_run(int argc, char **argv)
{
    run_opts o;
    /* under an MPI launcher every rank parses the same command line: only the first
       prints its help or usage error */
    run_mpi_silencer quiet_ranks;
    run_mpi_silence(&quiet_ranks, run_mpi_env_size() > 1 && run_mpi_env_rank() > 0);
    int pr = parse_run(argc, argv, &o);
    run_mpi_unsilence(&quiet_ranks);
    if (pr == 1) return CLI_EXIT_OK;
    if (pr != 0) return CLI_EXIT_USAGE;
    if (!o.distributed && o.mpi == 0 && run_mpi_env_size() > 1 && run_mpi_env_rank() == 0)
        fprintf(stderr, "pikv: warning: started by an MPI launcher (%d ranks) but %s: every rank "
                        "runs the workload alone\n",
                run_mpi_env_size(),
                run_mpi_compiled() ? "--no-mpi was given" : "this pikv was built without MPI");

    run_mpi mpi;
    memset(&mpi, 0, sizeof mpi);
    mpi.size = 1;
    pikv_comm *comm = NULL;
    if (o.distributed) {
        if (run_mpi_start(&mpi) != 0) return CLI_EXIT_FAIL;
        if (mpi.rank != 0) o.quiet = 1; /* progress and warnings: rank 0 alone */
        char prefix[32];
        snprintf(prefix, sizeof prefix, "pikv[rank %d]", mpi.rank);
        cli_set_message_prefix(prefix);
    }

    int rc = CLI_EXIT_FAIL;
    run_shared sh;
    memset(&sh, 0, sizeof sh);
    run_policy rows[COMPARE_MAX_ROWS];
    run_result res[COMPARE_MAX_ROWS];
    memset(res, 0, sizeof res);
    int n_rows = 0;
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
    pikv_context *ctx = NULL;
    pikv_status st = pikv_context_create(&cp, &ctx);
    if (st != PIKV_OK) {
        rc = cli_lib_error(ctx, "pikv_context_create", st);
        if (o.distributed) run_mpi_abort(&mpi, rc); /* the others wait for this rank */
        goto done;
    }
    sh.ctx = ctx;
    sh.n_sel = select_devices(&o, ctx, &sh.dev_list);
    if (o.distributed) {
        /* every rank must reach the communicator's creation (collective): a rank without
           its devices stops the job */
        if (sh.n_sel < 0) run_mpi_abort(&mpi, CLI_EXIT_FAIL);
        st = run_mpi_comm_create(&mpi, ctx, &comm);
        if (st != PIKV_OK) {
            rc = cli_lib_error(ctx, "pikv_comm_create_mpi", st);
            goto done;
        }
        sh.comm = comm;
        sh.mpi = &mpi;
    }
    if (sh.n_sel < 0) goto done;

    /* Workload (shared by every row of --compare: rewound for each run). */
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
    wc.max_tokens = o.context + o.steps;
    wc.seed = o.seed;
    if (wl_create(&wc, &sh.wl) != 0) {
        char b[32];
        fprintf(stderr, "pikv: cannot allocate the workload's reference copy of K/V (%s); "
                        "use a smaller --context, --seqs, --layers or --steps\n",
                cli_format_bytes((uint64_t)wl_memory_bytes(&wc), b, sizeof b));
        if (o.distributed) run_mpi_abort(&mpi, CLI_EXIT_FAIL);
        goto done;
    }

    if (o.distributed) {
        rc = run_over_ranks(&o, &sh, &prog, &res[0]);
        n_rows = 1;
        goto done;
    }
    if (!o.compare) {
        rc = run_exec(&o, &o.policy, &sh, &prog, "", &res[0]);
        n_rows = 1;
        cli_progress_done(&prog);
        if (rc != CLI_EXIT_OK) goto done;
        /* after --restore, the figures are those of the decode steps this run made */
        run_opts shown = o;
        shown.steps = o.steps - res[0].restored_steps;
        if (o.json)
            run_print_json(&shown, &res[0]);
        else if (o.quiet)
            run_print_quiet(&shown, &res[0]);
        else
            run_print_table(&shown, &res[0]);
        fflush(stdout);
        rc = res[0].bounded && !run_passed(&res[0]) ? CLI_EXIT_FAIL : CLI_EXIT_OK;
        goto done;
    }

    /* --compare: the decode queries' references are computed once, by the first row. */
    const double ref_doubles = (double)o.steps * o.layers * o.seqs * o.q_heads * (o.head_dim + 1.0);
    if (o.steps > 0 && ref_doubles * 8.0 <= 512.0 * 1024.0 * 1024.0) {
        const size_t queries = (size_t)o.steps * (size_t)o.layers * (size_t)o.seqs;
        sh.ref_out = malloc(queries * (size_t)o.q_heads * (size_t)o.head_dim * sizeof(double));
        sh.ref_lse = malloc(queries * (size_t)o.q_heads * sizeof(double));
        if (!sh.ref_out || !sh.ref_lse) { /* recompute per row instead */
            free(sh.ref_out);
            free(sh.ref_lse);
            sh.ref_out = sh.ref_lse = NULL;
        }
    }
    n_rows = compare_rows(&o, rows);
    const double t0 = cli_now();
    for (int i = 0; i < n_rows; i++) {
        char tag[96];
        snprintf(tag, sizeof tag, "[%d/%d %.48s] ", i + 1, n_rows, rows[i].label);
        rc = run_exec(&o, &rows[i], &sh, &prog, tag, &res[i]);
        if (rc != CLI_EXIT_OK) goto done;
        if (res[i].measured) { /* the step time without the exact measuring pass */
            run_policy timing = rows[i];
            timing.select.measure = 0;
            run_result tr;
            snprintf(tag, sizeof tag, "[%d/%d %.48s, timing] ", i + 1, n_rows, rows[i].label);
            rc = run_exec(&o, &timing, &sh, &prog, tag, &tr);
            if (rc == CLI_EXIT_OK) res[i].step_ms_unmeasured = run_step_ms(&o, &tr);
            run_result_free(&tr);
            if (rc != CLI_EXIT_OK) goto done;
        }
    }
    cli_progress_done(&prog);
    if (o.json)
        run_print_compare_json(&o, rows, res, n_rows);
    else
        run_print_compare(&o, rows, res, n_rows);
    if (!o.json && !o.quiet)
        printf("  %d configurations in %.1f s\n", n_rows, cli_now() - t0);
    fflush(stdout);
    rc = CLI_EXIT_OK;
    for (int i = 0; i < n_rows; i++)
        if (res[i].bounded && !run_passed(&res[i])) rc = CLI_EXIT_FAIL;

done:
    cli_progress_done(&prog);
    for (int i = 0; i < COMPARE_MAX_ROWS; i++) run_result_free(&res[i]);
    free(sh.ref_out);
    free(sh.ref_lse);
    free(sh.dev_list);
    wl_free(sh.wl);
    pikv_comm_free(comm); /* before MPI_Finalize: it frees PiKV's dup of MPI_COMM_WORLD */
    pikv_context_free(ctx);
    run_mpi_finish(&mpi);
    return rc;
}
