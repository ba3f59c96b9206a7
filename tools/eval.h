/* `pikv eval`: accuracy vs KV memory on the real model (issue 10). Shared between
   cmd_eval.c (options, configurations, report) and eval_run.c (perplexity and passkey
   runs through pikv_llama_forward_ex). */
#ifndef PIKV_TOOLS_EVAL_H
#define PIKV_TOOLS_EVAL_H

#include <stdint.h>

#include "llama.h"
#include "pikv/pikv.h"

#define EVAL_MAX_CONFIGS 48
#define EVAL_MAX_LENGTHS 16

enum { EVAL_DENSE = 0, EVAL_MOE = 1 };

/* One cache configuration of the table. */
typedef struct eval_config {
    char name[40];
    int model;                  /* EVAL_DENSE or EVAL_MOE */
    pikv_dtype dtype;
    pikv_select_params select;
    pikv_budget_params budget;
    pikv_evict_params evict;
    int32_t moe_top_k;          /* FFN top-k (rp.moe_top_k), 0 = the model's */
    int64_t budget_per_layer;   /* budgets: the mean per-layer budget (tokens) */
    int32_t cache_experts;      /* cache experts_per_token, 0 = the model's router top-k */
    int exact;                  /* exact by construction: must equal the f32 baseline */
    int baseline;               /* the model's baseline (delta and top-1 agreement) */
    int passkey;                /* runs the passkey test */
    int passkey_long;           /* ... at the lengths above --passkey-long too */
    /* results: perplexity */
    int ran;
    double nll_sum;
    int64_t count;
    double ppl, delta, top1;
    double first_nll_sum;       /* the first chunk alone */
    int64_t first_count;
    double kv_bytes_stored;     /* mean over chunks of bytes_used at the chunk's end */
    double kv_bytes_peak;       /* the most bytes_used seen (after each forward piece) */
    double bytes_read_per_attend;
    double tokens_per_s;
    double seconds;
    int64_t evicted_tokens;
    /* results: passkey, per length */
    int pk_ran[EVAL_MAX_LENGTHS];
    int pk_correct[EVAL_MAX_LENGTHS];
    int pk_total[EVAL_MAX_LENGTHS];
    double pk_seconds;
} eval_config;

typedef struct eval_opts {
    const char *model_path;
    const char *moe_model_path;
    const char *corpus_path;
    const char *json_path;
    const char *plot_path;
    const char *dump_ids_path;
    const char *configs;        /* comma list or NULL */
    const char *passkey_configs;
    const char *passkey_long_configs;
    const char *backend;
    int32_t ctx, chunks, threads, page_size, sinks, recent, piece;
    int32_t moe_ffn_k;          /* the MoE cache configurations' FFN top-k (0 = all experts) */
    int32_t pk_lengths[EVAL_MAX_LENGTHS];
    int n_pk_lengths;
    int32_t pk_samples;
    int32_t pk_long;            /* lengths above this run only the dense baseline `full` */
    int32_t pk_long_samples;    /* ... with this many samples */
    int pk_chat;                /* the chat template around the passkey prompt */
    uint64_t seed;
    int quick, check, quiet;
} eval_opts;

/* What eval_run needs of the loaded model. */
typedef struct eval_model {
    pikv_llama *m;
    const pikv_llama_hparams *hp;
    const pikv_tokenizer *tok;
    pikv_context *ctx;
} eval_model;

typedef struct eval_config_list {
    eval_config c[EVAL_MAX_CONFIGS];
    int n;
} eval_config_list;

typedef struct eval_check {
    char name[64];
    int pass;
    char detail[192];
} eval_check;

/* Runs the perplexity of cfg over the chunks (tokens[c * ctx ...]); base_argmax holds the
   baseline's argmax of every position (written when cfg->baseline, else compared). 0, or
   nonzero after printing an error. */
int eval_perplexity(const eval_opts *o, eval_model *em, eval_config *cfg, const int32_t *tokens,
                    int32_t n_chunks, int32_t *base_argmax);

/* Runs the passkey test of cfg at every length (skipping lengths past the model's context,
   and lengths > o->pk_long unless cfg is the dense baseline). */
int eval_passkey(const eval_opts *o, eval_model *em, eval_config *cfg);

/* Tokenizes text (no special tokens unless special). *out malloc'd. 0 or -1. */
int eval_tokenize(const pikv_tokenizer *tok, const char *text, int special, int32_t **out,
                  int32_t *n);

double eval_now(void);

/* eval_report.c */
const char *eval_dtype_name(pikv_dtype d);
const char *eval_evict_name(pikv_evict_policy p);
void eval_describe(const eval_config *c, char *buf, size_t cap);
void eval_print_table(const eval_opts *o, const eval_config_list *L);
int eval_write_json(const char *path, const eval_opts *o, const eval_config_list *L,
                    const char *cmdline, double wall, const eval_check *checks, int n_checks,
                    const char *notes, const eval_config *first);
/* Runs the plot script; 0, or -1 after saying on stderr why there is no plot. */
int eval_run_plot(const char *json, const char *png);

#endif
