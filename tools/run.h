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
    uint64_t read_total;       /* sum of last_bytes_read after every decode attend */
} run_dev;

typedef struct run_layer {
    pikv_layer_stats st;       /* at the end of the run */
    uint64_t read_total;       /* sum of the layer's last_bytes_read over decode steps */
    int64_t routed_tokens;     /* over its experts (each token counts top_k times) */
    double imbalance;          /* max / mean of the experts' routed tokens; NAN if none */
    double misses;             /* sum of the experts' decayed miss counts at the end */
} run_layer;

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
} run_result;

/* What the rows of --compare share: the context, the devices and the workload (which
   is rewound for every run), and the references of every decode query. */
typedef struct run_shared {
    pikv_context *ctx;
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

/* Derived figures. */
double run_mean(double sum, int64_t n);           /* NAN when n == 0 */
double run_step_ms(const run_opts *o, const run_result *r);
int run_passed(const run_result *r);              /* bounded and within the bound */

/* Reports (run_report.c). */
void run_print_table(const run_opts *o, const run_result *r);
void run_print_json(const run_opts *o, const run_result *r);
void run_print_quiet(const run_opts *o, const run_result *r);
void run_print_compare(const run_opts *o, const run_policy *rows, const run_result *res,
                       int n);
void run_print_compare_json(const run_opts *o, const run_policy *rows, const run_result *res,
                            int n);

#endif /* PIKV_TOOLS_RUN_H */
