/* `pikv run` internals shared by its option parsing (cmd_run.c), the run itself
   (run_exec.c) and its reports (run_report.c). */
#ifndef PIKV_TOOLS_RUN_H
#define PIKV_TOOLS_RUN_H

#include <stdint.h>

#include "cli.h"
#include "workload.h"

/* One configuration of the cache's page storage and policies (a row of --compare). */
typedef struct run_policy {
    char label[64];
    pikv_dtype dtype;            /* page storage; the single run's is --dtype */
    pikv_select_params select;
    pikv_budget_params budget;
    pikv_evict_params evict;
    pikv_route_params route;
} run_policy;

typedef struct run_opts {
    int32_t layers, q_heads, kv_heads, head_dim, experts, top_k;
    int32_t page_size, shards, seqs, steps, chunk, devices, threads;
    int64_t context, capacity;
    uint64_t seed, device_memory;
    pikv_placement placement;
    pikv_dtype dtype;            /* --dtype (the single run's; --compare's float rows) */
    int32_t quant_group;         /* --quant-group: INT8/INT4 values per scale/zero group */
    const char *backend;
    int devices_set, json, quiet, verbose;
    int compare;
    run_policy policy;           /* the single run's policies; --compare's common settings */
    /* MPI (run_mpi.c): mpi 1 = --mpi, -1 = --no-mpi, 0 = when an MPI launcher started
       more than one rank; distributed: the cache spans MPI_COMM_WORLD's ranks */
    int mpi, distributed;
    double max_imbalance;        /* --max-imbalance: fail above this max/mean rank memory; 0 = no check */
    int no_overlap;              /* --no-overlap: blocking attends over ranks (no pipelining) */
    /* Memory tiers (docs/tiers.md): --tiers and its sizes; tier_device 0 = a quarter of
       the run's KV page bytes over the devices */
    int tiers;
    uint64_t tier_device, tier_host, tier_disk;
    const char *tier_dir;
    int32_t numa_node;           /* -1 = no binding */
    int32_t staging_pages;       /* 0 = the library's choice */
    int no_prefetch;
    /* Checkpoints (docs/stream.md): --checkpoint PATH written every checkpoint_every decode
       steps (the first one full, then incremental); --restore PATH resumes a run */
    const char *checkpoint_path;
    int32_t checkpoint_every;
    const char *restore_path;
} run_opts;

extern const char *const run_placement_names[];
extern const char *const run_dtype_names[];
extern const char *const run_select_names[];  /* indexed by select mode bits (0..3) */
extern const char *const run_budget_names[];  /* indexed by pikv_budget_mode */
extern const char *const run_evict_names[];   /* indexed by pikv_evict_policy */

/* Exact: every token read, nothing evicted. The error bound applies only to exact
   configurations of float pages (f32, f16); int8/int4 pages are lossy by design. */
int run_policy_exact(const run_policy *p);
int run_policy_bounded(const run_policy *p);
int run_dtype_quantized(pikv_dtype t);
/* "quest 256, pyramid 4096 b=2 h2o, lambda 1, int4 g32" into buf (the dtype only when
   quantized; the group from o). */
const char *run_policy_describe(const run_opts *o, const run_policy *p, char *buf, size_t size);

typedef struct run_dev {
    pikv_cache_device_stats st;
    char name[32];
    const char *backend;
    char backend_name[16];     /* over ranks: another rank's device's backend */
    uint64_t read_total;       /* sum of last_bytes_read after every decode attend */
} run_dev;

typedef struct run_layer {
    pikv_layer_stats st;       /* at the end of the run */
    uint64_t read_total;       /* sum of the layer's last_bytes_read over decode steps */
    int64_t routed_tokens;     /* over its experts (each token counts top_k times) */
    double imbalance;          /* max / mean of the experts' routed tokens; NAN if none */
    double misses;             /* sum of the experts' decayed miss counts at the end */
} run_layer;

/* One rank's figures of a run over MPI ranks (gathered on rank 0 as plain bytes: every
   rank runs the same binary). Bytes are the communicator's logical payload
   (pikv_comm_stats): an allreduce of B bytes counts B sent and B received. */
typedef struct run_rank {
    int32_t rank, n_ranks, local_devices;
    int32_t shards;
    int64_t pages, tokens;
    uint64_t bytes_allocated;     /* this rank's devices (pikv_cache_dist_stats) */
    uint64_t bytes_used;
    uint64_t max_rank_bytes;
    double mean_rank_bytes;
    /* prefill: its appends (and with a budget its attention passes) */
    uint64_t prefill_sent, prefill_received, prefill_kv_sent;
    /* decode: every step's attends and appends */
    uint64_t decode_sent, decode_received;
    uint64_t decode_attend_sent, decode_append_sent;
    uint64_t decode_kv_sent;      /* K/V rows of the decode appends sent to their owners */
    uint64_t partial_bytes;       /* partials + lse the decode attends moved */
    uint64_t gather_bytes;        /* what gathering the pages read elsewhere would have moved */
    double ranks_per_query_sum;   /* over decode attends */
    int64_t attends;
    int32_t max_ranks;
    int32_t passed;               /* -1: no bound (lossy), 0 FAIL, 1 PASS */
    uint64_t bytes_sent, bytes_received; /* over the run */
    double max_err;
    double decode_s, attend_s, prefill_s;
    /* decode attends' timing breakdown: overlap = layers pipelined (start(l), then
       finish(l - 1)); start_s = their first halves (validation, plan, kernels, the
       merge's MAX step and post), finish_s = the exposed wait for the merges (finish;
       --no-overlap: each attend's last_merge_wait_s, start_s the rest); the library's
       sums of last_merge_wait_s and last_merge_posted_s (hidden = 1 - wait / posted) */
    int32_t overlap;
    double start_s, finish_s, merge_wait_s, merge_posted_s;
} run_rank;

typedef struct run_result {
    pikv_cache_stats stats;
    int32_t n_devs;
    run_dev *devs;
    run_layer *layers;         /* [layers] */
    int64_t expected_tokens;   /* with no budget: every token of the workload */
    int64_t budget_tokens;     /* with a budget: sum of the layer budgets x sequences */
    int64_t capacity;
    int32_t prefill_chunk;
    double prefill_s;          /* appends (and routing) of the prefill */
    double observe_s;          /* the prefill's attention passes (budgets only) */
    int64_t observe_attends;
    double decode_s;           /* route + attend + append */
    double attend_s;
    double reference_s;
    uint64_t bytes_read_total; /* sum over steps and layers of last_bytes_read */
    int64_t pages_read_total;
    int64_t tokens_read_total;
    /* quality, over decode attends (steps x layers) or queries (x sequences) */
    double max_err;            /* vs the dense f64 reference over the full context */
    double err_sum;            /* per query, for the mean */
    int64_t err_n;
    double max_lse_err;
    double ctx_recall_sum;     /* exp(lse - lse_ref) per (query, head): the full-context
                                  attention mass the tokens read hold */
    int64_t ctx_recall_n;
    double recall_sum;         /* stats.last_recall where measured */
    int64_t recall_n;
    double err_exact_sum, err_exact_max; /* stats.last_output_error where measured */
    int64_t err_exact_n;
    double hit_sum;            /* stats.last_hit_rate where known */
    int64_t hit_n;
    int64_t routed_tokens;     /* tokens routed through pikv_route */
    int64_t rerouted_tokens;   /* ... whose experts differ from the plain top-k */
    double bound;              /* NAN without one (!bounded) */
    pikv_dtype dtype;          /* the run's page storage */
    int quantized;             /* int8/int4 pages */
    int exact;                 /* run_policy_exact: every token read, nothing evicted */
    int bounded;               /* run_policy_bounded: exact and float pages */
    int measured;              /* select.measure and a lossy selection */
    int rebalanced;
    int64_t moved_pages;
    double rebalance_s;
    int routing_mismatch;
    int storage_mismatch;      /* the device / layer storage figures do not add up */
    double step_ms_unmeasured; /* --compare: step time of an unmeasured rerun; NAN if none */
    /* over MPI ranks (n_ranks > 0): this rank's figures; on rank 0 also every rank's */
    int32_t n_ranks;           /* 0: one process */
    int32_t rank;
    int rebalance_skipped;     /* balanced placement over ranks: no rebalance */
    run_rank dist;
    run_rank *ranks;           /* [n_ranks] on rank 0 (run_gather_ranks), else NULL */
    /* memory tiers (--tiers) */
    int tiers;
    uint64_t tier_device_budget;   /* per device */
    uint64_t tier_device_peak;     /* the most page bytes one device held after any call */
    pikv_tier_stats tier;          /* at the end of the run */
    /* checkpoints (--checkpoint, --restore) */
    int32_t checkpoints;           /* written by this run */
    int32_t checkpoints_full;
    int64_t checkpoint_pages;      /* page records written, all checkpoints */
    int64_t checkpoint_full_pages; /* ... by the full ones */
    uint64_t checkpoint_bytes;
    double checkpoint_s;
    pikv_checkpoint_stats last_checkpoint;
    int restored;
    pikv_restore_report restore;
    double restore_s;
    int32_t restored_steps;        /* decode steps the restored checkpoint already held */
} run_result;

/* What the rows of --compare share: the context, the devices and the workload (which
   is rewound for every run), and the references of every decode query. */
typedef struct run_mpi {
    int active;                /* MPI initialized by this run (finalized at its end) */
    int rank, size;
} run_mpi;

typedef struct run_shared {
    pikv_context *ctx;
    pikv_comm *comm;           /* the cache spans its ranks; NULL: one process */
    run_mpi *mpi;              /* with comm */
    int32_t *dev_list;
    int32_t n_sel;
    wl_workload *wl;
    double *ref_out;           /* [steps][layers][seqs][q_heads][head_dim], or NULL */
    double *ref_lse;           /* [steps][layers][seqs][q_heads] */
    int refs_ready;
} run_shared;

/* One run of the workload through a new cache with the given policies. Progress lines
   are prefixed with tag. Returns CLI_EXIT_OK, or CLI_EXIT_FAIL after printing why (a
   library call failed). r is filled (free it with run_result_free in any case). */
int run_exec(const run_opts *o, const run_policy *pol, run_shared *sh, cli_progress *prog,
             const char *tag, run_result *r);
void run_result_free(run_result *r);

/* Rank 0 gathers every rank's r->dist into r->ranks (collective; 0, or -1 on failure). */
int run_gather_ranks(const run_shared *sh, run_result *r);
/* Whether the run's rank memory is within --max-imbalance (1 when unchecked). */
int run_ranks_balanced(const run_opts *o, const run_result *r);

/* ---- MPI (run_mpi.c) --------------------------------------------------------- */
int run_mpi_compiled(void);
int run_mpi_env_size(void);    /* the launcher's world size from the environment, 0 if none */
int run_mpi_env_rank(void);    /* ... this process's rank, 0 if none */
/* MPI_Init_thread (FUNNELED) unless MPI is initialized; 0, or -1 after printing why. */
int run_mpi_start(run_mpi *m);
pikv_status run_mpi_comm_create(const run_mpi *m, pikv_context *ctx, pikv_comm **out);
int run_mpi_gather(const run_mpi *m, const void *mine, size_t bytes, void *all);    /* to rank 0 */
int run_mpi_allgather(const run_mpi *m, const void *mine, size_t bytes, void *all);
int run_mpi_max(const run_mpi *m, int value);  /* the largest value of every rank */
void run_mpi_finish(run_mpi *m);               /* MPI_Finalize if run_mpi_start initialized */
void run_mpi_abort(run_mpi *m, int code);      /* MPI_Abort (a rank failed alone) */
/* Sends this process's stdout and stderr to /dev/null until unsilenced (ranks other
   than 0 while the options are parsed: every rank would print the same message). */
typedef struct run_mpi_silencer {
    int saved_out, saved_err;
} run_mpi_silencer;
void run_mpi_silence(run_mpi_silencer *s, int silence);
void run_mpi_unsilence(run_mpi_silencer *s);

/* Derived figures. */
double run_mean(double sum, int64_t n);           /* NAN when n == 0 */
double run_step_ms(const run_opts *o, const run_result *r);
int run_passed(const run_result *r);              /* bounded and within the bound */

/* Reports (run_report.c). */
void run_print_table(const run_opts *o, const run_result *r);
void run_print_json(const run_opts *o, const run_result *r);
void run_print_quiet(const run_opts *o, const run_result *r);
/* Over MPI ranks (rank 0, after run_gather_ranks): the per-rank table. */
void run_print_ranks(const run_opts *o, const run_result *r);
void run_print_compare(const run_opts *o, const run_policy *rows, const run_result *res,
                       int n);
void run_print_compare_json(const run_opts *o, const run_policy *rows, const run_result *res,
                            int n);

#endif /* PIKV_TOOLS_RUN_H */
