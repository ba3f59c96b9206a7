/* `pikv bench`: every backend against its own measured roofline, and PiKV against
 * the baselines (docs/performance.md). Private to the bench sources, which are
 * compiled into the `pikv` program:
 *   cmd_bench.c       options, the order of the measurements, the closing targets
 *   bench_kv.c        caches filled with synthetic KV and timed attends
 *   bench_baseline.c  dense attention over a contiguous KV array (no cache manager)
 *   bench_report.c    the table on stdout and the JSON document
 * Every figure is measured in the run that reports it; ratios (share of the read
 * bandwidth, speedup over dense, share of the ideal speedup) compare measurements
 * of one run on one device. */
#ifndef PIKV_BENCH_H
#define PIKV_BENCH_H

#include <stdint.h>
#include <stdio.h>

#include "pikv/pikv.h"

enum { BENCH_MAX_LIST = 24, BENCH_MAX_DEVICES = 16 };

typedef struct bench_opts {
    /* geometry of the attention (default: OLMoE-1B-7B's, MHA) */
    int32_t q_heads, kv_heads, head_dim, page_size, quant_group;
    /* sweeps */
    int64_t contexts[BENCH_MAX_LIST];       /* batch 1 */
    int n_contexts;
    int64_t batch_contexts[BENCH_MAX_LIST]; /* larger batches */
    int n_batch_contexts;
    int32_t batches[BENCH_MAX_LIST];
    int n_batches;
    pikv_dtype dtypes[4];
    int n_dtypes;
    int32_t quest_ratios[BENCH_MAX_LIST];   /* budget = context / ratio */
    int n_quest;
    int32_t n_experts;                      /* experts selection: E */
    int32_t expert_ks[BENCH_MAX_LIST];      /* ... reading k of E */
    int n_expert_ks;
    int32_t memory_devices;                 /* CPU devices of the memory/merge section */
    uint64_t max_kv_bytes;                  /* skip configurations holding more */
    uint64_t roofline_bytes;                /* 0: 1 GiB on host-visible devices, 4 GiB else */
    double min_time;                        /* seconds of timed attends per point */
    double max_attend_s;                    /* a device slower than this stops its sweep */
    int32_t min_reps, max_reps;
    int32_t threads;
    const char *backends;                   /* for the context: "all" */
    char device_names[BENCH_MAX_DEVICES][32]; /* empty: every device found */
    int n_device_names;
    const char *json_path;
    int baseline, memory, check, quiet;
    int rank;                               /* over MPI ranks: this process's (0 prints) */
    uint64_t seed;
} bench_opts;

/* One device under test and its roofline. */
typedef struct bench_device {
    int32_t index;                /* context device index */
    pikv_device_info info;
    double read_bps;              /* measured read bandwidth; 0 = not measured */
    double read_median_s;
    uint64_t read_bytes;
    char read_error[160];         /* why there is no roofline */
    pikv_read_probe *probe;       /* the cold pass before each timed call (NULL: the host flush) */
    uint64_t probe_bytes;
} bench_device;

/* One timed attend configuration. */
typedef struct bench_point {
    int32_t device;               /* bench_device index */
    const char *kind;             /* "dense", "quest", "experts", "pikv-f32" */
    pikv_dtype dtype;
    int32_t batch;
    int64_t context;
    int32_t param;                /* quest: budget ratio; experts: k */
    int32_t n_experts;            /* of the cache */
    double seconds;               /* best attend */
    double median_s;
    int32_t reps;
    uint64_t bytes;               /* read by one attend (pikv_cache_stats.last_bytes_read) */
    uint64_t stored_bytes;        /* the cache's bytes_used on its one device (and rank) */
    double plan_s, score_s, topk_s, attention_s, merge_s; /* of the best attend */
    double append_s_per_token;    /* filling the cache this point read (0: shared fill) */
    double probe_s;               /* the fastest of this point's cold passes (bench_cold_pass) */
    uint64_t probe_bytes;         /* read by that pass; 0: no probe (the device roofline) */
    /* Paired figures (0: not measured): medians over the rounds of an interleaved
       group (timed_group) of what one round measured back to back, so a change of
       the machine's bandwidth between rounds cancels out. */
    double paired_share;          /* (bytes / attend time) / (the cold pass's bytes / time) */
    double paired_speedup;        /* reference attend time / this one's: dense for sparse
                                     points, f16 for int8/int4 dense points */
} bench_point;

/* A baseline measurement. */
typedef struct bench_baseline {
    const char *name;             /* "c-contiguous-f32", "cublas-f16" */
    int32_t device;               /* bench_device index it is compared on (-1: none) */
    int32_t batch;
    int64_t context;
    double seconds;
    uint64_t bytes;
    double probe_s;               /* as bench_point's */
    uint64_t probe_bytes;
    char error[160];
} bench_baseline;

/* The memory and merge section: one configuration over several devices. */
typedef struct bench_memory {
    const char *placement;
    int32_t n_devices;
    uint64_t bytes_used[BENCH_MAX_DEVICES];
    uint64_t bytes_allocated[BENCH_MAX_DEVICES];
    int64_t tokens[BENCH_MAX_DEVICES];
    double imbalance;             /* max / mean of bytes_used */
    double merge_s;               /* an attend's merge of the devices' partials */
    double attend_s;
    int32_t n_ranks;              /* 1: one process */
    uint64_t rank_bytes[BENCH_MAX_DEVICES]; /* bytes_used of each rank's devices */
    double rank_imbalance;        /* max / mean over ranks */
} bench_memory;

typedef struct bench_target {
    char name[160];
    char detail[160];
    double value, target;
    int have;                     /* measured in this run */
    int pass;
} bench_target;

typedef struct bench_results {
    bench_device devices[BENCH_MAX_DEVICES];
    int n_devices;
    bench_point *points;
    int n_points, cap_points;
    bench_baseline baselines[256];
    int n_baselines;
    bench_memory memory[8];
    int n_memory;
    bench_target targets[8];
    int n_targets;
    double started_at;            /* cli_now() */
    char date[32];                /* UTC, ISO 8601 */
} bench_results;

/* bench_kv.c */
typedef struct bench_env {
    const bench_opts *o;
    pikv_context *ctx;
    bench_results *r;
    float *flush;                 /* a buffer read between timed attends (evicts the LLC) */
    size_t flush_floats;
    volatile float flush_sink;
} bench_env;

int bench_env_init(bench_env *env, const bench_opts *o, pikv_context *ctx, bench_results *r);
/* Reads the flush buffer: whatever was cached is evicted before a timed call. */
void bench_flush_llc(bench_env *env);
/* The cold pass before a timed call on device dev that reads about `bytes`: the
   device's read probe over at least as many bytes (whole passes over its buffer,
   which is much larger than the caches and so evicts the host's LLC too when the
   device reads host memory; the host flush runs as well when it does not). The
   probe thus reads as much, as long and as close in time as the call it is
   compared with. *probe_bytes and *probe_s get what it read and its time (0
   without a probe). 0, or CLI_EXIT_FAIL after a library error (printed). */
int bench_cold_pass(bench_env *env, int32_t dev, uint64_t bytes, uint64_t *probe_bytes, double *probe_s);
/* The read bandwidth a point or baseline is a share of: its own probe passes, else
   the device's roofline; 0 when neither was measured. */
double bench_point_read_bps(const bench_results *r, const bench_point *p);
/* The point's share of the read bandwidth: paired_share, else bytes / best time over
   bench_point_read_bps; 0 when there is no bandwidth to divide by. */
double bench_point_share(const bench_results *r, const bench_point *p);
double bench_baseline_read_bps(const bench_results *r, const bench_baseline *b);
void bench_env_free(bench_env *env);
/* The dense, quantized and sparse sweeps of one device; 0, or CLI_EXIT_FAIL after a
   library error (printed). */
int bench_device_sweeps(bench_env *env, int32_t dev);
/* The memory/merge section (its own context with several CPU devices); over MPI ranks
   (mpi with size > 1: tools/run.h) one cache spans the ranks' devices. */
struct run_mpi;
int bench_memory_section(bench_env *env, const struct run_mpi *mpi);
/* The point of a sweep, or NULL. */
const bench_point *bench_find(const bench_results *r, int32_t dev, const char *kind, pikv_dtype dtype,
                              int32_t batch, int64_t context, int32_t param);
bench_point *bench_add_point(bench_results *r);
const char *bench_dtype_name(pikv_dtype t);
/* K and V rows ([kv_heads][head_dim] f32) of token t of base sequence s: the data
   every cache and the baseline hold. */
const float *bench_pool_k(int32_t s, int64_t t);
const float *bench_pool_v(int32_t s, int64_t t);

/* bench_baseline.c: dense decode attention over contiguous f32 K/V [batch][kv_heads]
   [context][head_dim], threads over (query, KV head); the same data as the cache's. */
int bench_baseline_c(bench_env *env, int32_t dev, int32_t batch, int64_t context);
/* the vendor library path where a GPU is present (cuBLAS) */
int bench_baseline_vendor(bench_env *env, int32_t dev, int32_t batch, int64_t context);

/* bench_report.c */
void bench_print_tables(FILE *f, const bench_opts *o, const bench_results *r);
void bench_compute_targets(const bench_opts *o, bench_results *r);
void bench_print_targets(FILE *f, const bench_results *r);
int bench_write_json(const char *path, const bench_opts *o, const bench_results *r);

#endif /* PIKV_BENCH_H */
