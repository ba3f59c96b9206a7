/* `pikv generate` and `pikv demo`: text generation with the real model (samples/llama.h)
 * whose KV cache is a PiKV cache, and the demo of the README's main command.
 *
 * generate: prompt in, text out (streamed), then one line with what the cache held and read
 * and how fast it ran. Any cache configuration `pikv run` offers for reads (dtype, select,
 * experts top-k, Quest budget) and the MoE FFN's top-k.
 * demo: generate with the cached MoE model (else the dense one) and PiKV's expert-sharded,
 * query-aware reads; without a model (tools/setup-model.sh could not fetch it) it says so and
 * runs the synthetic workload (`pikv run`) instead. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cli.h"
#include "llama.h"

#define GEN_CMD "pikv generate"
#define CHAT_PRE "<|im_start|>user\n"
#define CHAT_POST "<|im_end|>\n<|im_start|>assistant\n"
#define DENSE_FILE "SmolLM2-135M-Instruct.Q4_1.gguf"
#define MOE_FILE "SmolLM2-135M-Instruct-MoE8.gguf"
#define DEMO_PROMPT "Give me three tips for staying healthy."
#define GEN_MOE_ALL (-1)

enum {
    G_MODEL = 1, G_MOE, G_PROMPT, G_TOKENS, G_CHAT, G_THREADS, G_BACKEND, G_DTYPE, G_SELECT,
    G_EXPERTS_TOP_K, G_BUDGET, G_MOE_K, G_TEMP, G_TOP_K, G_SEED, G_HELP
};

static const cli_opt gen_opts[] = {
    {"--model", "-m", 1, G_MODEL},
    {"--moe", NULL, 0, G_MOE},
    {"--prompt", "-p", 1, G_PROMPT},
    {"--tokens", "-n", 1, G_TOKENS},
    {"--chat", NULL, 0, G_CHAT},
    {"--threads", NULL, 1, G_THREADS},
    {"--backend", NULL, 1, G_BACKEND},
    {"--dtype", NULL, 1, G_DTYPE},
    {"--select", NULL, 1, G_SELECT},
    {"--experts-top-k", NULL, 1, G_EXPERTS_TOP_K},
    {"--token-budget", NULL, 1, G_BUDGET},
    {"--moe-k", NULL, 1, G_MOE_K},
    {"--temp", NULL, 1, G_TEMP},
    {"--top-k", NULL, 1, G_TOP_K},
    {"--seed", NULL, 1, G_SEED},
    {"--help", "-h", 0, G_HELP},
    {NULL, NULL, 0, 0},
};

typedef struct gen_opts_t {
    const char *model;  /* NULL: the cached model */
    int moe;            /* the cached MoE model */
    const char *prompt;
    int32_t n_gen;
    int chat;
    int32_t threads;
    const char *backend;
    pikv_dtype dtype;
    uint32_t select;
    int32_t experts_top_k;
    int32_t token_budget;
    int32_t moe_k;      /* 0: the model's top-k; GEN_MOE_ALL: every expert */
    int select_set;     /* --select was given */
    int moe_k_set;      /* --moe-k was given */
    double temp;
    int32_t top_k;
    uint64_t seed;
} gen_opts_t;

static void generate_usage(FILE *f, int demo)
{
    if (demo)
        fputs("usage: pikv demo [options]\n"
              "\n"
              "The README's main command: 'pikv generate --chat' on the cached MoE model (else the\n"
              "dense one) with --select experts and the FFN running every expert (--moe-k to\n"
              "change). Without any cached model it says so and runs 'pikv run' (whose options\n"
              "then apply) instead.\n"
              "\n",
              f);
    else
        fputs("usage: pikv generate [options]\n"
              "\n"
              "Generates text with a real model (GGUF, Llama or Mixtral-style MoE) whose KV cache is\n"
              "a PiKV cache, then prints what the cache held and read and the speed.\n"
              "\n",
              f);
    fputs("options:\n"
          "  -m, --model PATH      GGUF model (default: the model tools/setup-model.sh cached,\n"
          "                        $PIKV_CACHE or ~/.cache/pikv, models/" DENSE_FILE ")\n"
          "  --moe                 the cached MoE model instead (models/" MOE_FILE ")\n"
          "  -p, --prompt TEXT     the prompt (default: \"" DEMO_PROMPT "\")\n"
          "  -n, --tokens N        tokens to generate, 0..8192 (default 48)\n"
          "  --chat                wrap the prompt in the model's chat template (ChatML)\n"
          "  --threads N           threads of the matrix products, 1..256 (default 2)\n"
          "  --backend NAME        attention backend: cpu, opencl, vulkan, cuda (default cpu)\n"
          "  --dtype T             KV pages: f32, f16, int8, int4 (default f16)\n"
          "  --select S            reads: all, experts, quest, experts+quest (default all)\n"
          "  --experts-top-k K     experts: the query's experts read (0 = all it was routed to)\n"
          "  --token-budget N      quest: tokens read per query and KV head (default 256)\n"
          "  --moe-k K             MoE: experts per token in the FFN (0 = the model's)\n"
          "  --temp T              sampling temperature, 0 = greedy (default 0)\n"
          "  --top-k K             sample among the K most likely tokens (default 40)\n"
          "  --seed S              sampling seed (default 42)\n"
          "  -h, --help            this help\n",
          f);
}

/* <cache>/models/<file> (cli_cache_dir). */
static const char *cached_model(const char *file, char *buf, size_t n)
{
    char dir[768];
    snprintf(buf, n, "%s/models/%s", cli_cache_dir(dir, sizeof dir), file);
    return buf;
}

/* Writes one token's text (the tokenizer's bytes), growing the buffer as needed. */
static int print_token(const pikv_tokenizer *tok, int32_t id, char **buf, size_t *cap)
{
    size_t n = 0;
    pikv_tok_status s = pikv_tokenizer_decode(tok, &id, 1, 0, *buf, *cap, &n);
    if (s == PIKV_TOK_ESPACE) {
        char *b = realloc(*buf, n + 1);
        if (!b)
            return -1;
        *buf = b;
        *cap = n + 1;
        s = pikv_tokenizer_decode(tok, &id, 1, 0, *buf, *cap, &n);
    }
    if (s != PIKV_TOK_OK)
        return -1;
    fwrite(*buf, 1, n, stdout);
    fflush(stdout);
    return 0;
}

static const char *dtype_name(pikv_dtype d)
{
    switch (d) {
    case PIKV_DTYPE_F32: return "f32";
    case PIKV_DTYPE_F16: return "f16";
    case PIKV_DTYPE_INT8: return "int8";
    case PIKV_DTYPE_INT4: return "int4";
    default: return "?";
    }
}

static int run_generate(const gen_opts_t *o)
{
    char pathbuf[1024];
    const char *path = o->model ? o->model
                                : cached_model(o->moe ? MOE_FILE : DENSE_FILE, pathbuf, sizeof pathbuf);
    pikv_llama_error err;
    pikv_llama *m = NULL;
    pikv_llama_status s = pikv_llama_load(path, o->threads, &m, &err);
    if (s != PIKV_LLAMA_OK) {
        fprintf(stderr, GEN_CMD ": %s: %s%s\n", pikv_llama_status_name(s), err.message,
                o->model ? "" : " (run tools/setup-model.sh)");
        return CLI_EXIT_FAIL;
    }
    const pikv_llama_hparams *hp = pikv_llama_get_hparams(m);
    const pikv_tokenizer *tok = pikv_llama_get_tokenizer(m);
    int rc = CLI_EXIT_FAIL;
    char *text = NULL, *piece = NULL;
    size_t piece_cap = 0;
    int32_t *ids = NULL;
    float *logits = NULL;
    pikv_context *ctx = NULL;
    pikv_cache *cache = NULL;

    if ((o->select & PIKV_SELECT_EXPERTS) && hp->n_experts < 2) {
        cli_usage_error(GEN_CMD, "--select experts needs a MoE model (%s has no experts; try --moe)", path);
        rc = CLI_EXIT_USAGE;
        goto out;
    }
    const int32_t moe_k = o->moe_k == GEN_MOE_ALL ? hp->n_experts : o->moe_k;
    if (moe_k > hp->n_experts) {
        cli_usage_error(GEN_CMD, "invalid value '%d' for --moe-k: the model has %d experts", (int)o->moe_k,
                        (int)hp->n_experts);
        rc = CLI_EXIT_USAGE;
        goto out;
    }
    size_t plen = strlen(o->prompt);
    text = malloc(sizeof CHAT_PRE + plen + sizeof CHAT_POST);
    logits = malloc((size_t)hp->n_vocab * sizeof(float));
    size_t cap = plen + sizeof CHAT_PRE + sizeof CHAT_POST + 8, n_ids = 0;
    ids = malloc(cap * sizeof *ids);
    if (!text || !logits || !ids) {
        fprintf(stderr, GEN_CMD ": out of memory\n");
        goto out;
    }
    if (o->chat)
        snprintf(text, sizeof CHAT_PRE + plen + sizeof CHAT_POST, "%s%s%s", CHAT_PRE, o->prompt, CHAT_POST);
    else
        memcpy(text, o->prompt, plen + 1);
    pikv_tok_status ts = pikv_tokenizer_encode(tok, text, strlen(text),
                                               (o->chat ? PIKV_TOK_PARSE_SPECIAL : 0u) | PIKV_TOK_DROP_UNKNOWN,
                                               ids, cap, &n_ids);
    if (ts != PIKV_TOK_OK || n_ids == 0) {
        fprintf(stderr, GEN_CMD ": cannot tokenize the prompt (%s, %zu tokens)\n", pikv_tokenizer_status_str(ts),
                n_ids);
        goto out;
    }
    int32_t n_gen = o->n_gen;
    if ((int64_t)n_ids + n_gen > hp->n_ctx) {
        if ((int64_t)n_ids >= hp->n_ctx) {
            fprintf(stderr, GEN_CMD ": the prompt's %zu tokens fill the model's context of %d\n", n_ids,
                    (int)hp->n_ctx);
            goto out;
        }
        n_gen = hp->n_ctx - (int32_t)n_ids;
        fprintf(stderr, GEN_CMD ": generating %d tokens (the model's context is %d)\n", (int)n_gen,
                (int)hp->n_ctx);
    }

    pikv_context_params cp = pikv_context_default_params();
    cp.backends = o->backend;
    cp.cpu_threads = o->threads; /* attention runs between the products, on the same cores */
    pikv_status ps = pikv_context_create(&cp, &ctx);
    if (ps != PIKV_OK) {
        rc = cli_lib_error(ctx, "pikv_context_create", ps);
        goto out;
    }
    pikv_cache_params kp = pikv_llama_cache_params(m, 1, (int64_t)n_ids + n_gen + 1);
    kp.dtype = o->dtype;
    kp.select.mode = o->select;
    kp.select.experts_top_k = o->experts_top_k;
    if (o->select & PIKV_SELECT_QUEST)
        kp.select.token_budget = o->token_budget;
    ps = pikv_cache_create(ctx, &kp, &cache);
    if (ps == PIKV_OK)
        ps = pikv_seq_add(cache, 0);
    if (ps != PIKV_OK) {
        rc = cli_lib_error(ctx, "pikv_cache_create", ps);
        goto out;
    }

    pikv_llama_run_params rp;
    memset(&rp, 0, sizeof rp);
    rp.moe_top_k = moe_k;
    double t0 = cli_now();
    s = pikv_llama_forward_ex(m, cache, 0, ids, (int32_t)n_ids, &rp, logits, &err);
    double t_prefill = cli_now() - t0;
    if (s != PIKV_LLAMA_OK) {
        fprintf(stderr, GEN_CMD ": %s: %s\n", pikv_llama_status_name(s), err.message);
        goto out;
    }
    if (!o->chat) {
        fputs(o->prompt, stdout);
        fflush(stdout);
    }
    uint64_t rng = o->seed ? o->seed : 1;
    int32_t n_done = 0, steps = 0; /* tokens printed; decode forward calls */
    uint64_t read_bytes = 0;
    int64_t read_tokens = 0;
    double t1 = cli_now();
    for (int32_t i = 0; i < n_gen; i++) {
        int32_t next = pikv_llama_sample(logits, hp->n_vocab, (float)o->temp, o->top_k, &rng);
        if (next < 0 || next == pikv_tokenizer_eos(tok))
            break;
        if (o->chat && pikv_tokenizer_token_type(tok, next) == PIKV_TOK_TYPE_CONTROL)
            break; /* <|im_end|> */
        if (print_token(tok, next, &piece, &piece_cap) != 0) {
            fprintf(stderr, "\n" GEN_CMD ": cannot decode token %d\n", (int)next);
            goto out;
        }
        n_done++;
        if (i + 1 == n_gen)
            break;
        s = pikv_llama_forward_ex(m, cache, 0, &next, 1, &rp, logits, &err);
        if (s != PIKV_LLAMA_OK) {
            fprintf(stderr, "\n" GEN_CMD ": %s: %s\n", pikv_llama_status_name(s), err.message);
            goto out;
        }
        steps++;
        pikv_cache_stats st;
        if (pikv_cache_get_stats(cache, &st) == PIKV_OK) {
            read_bytes += st.last_bytes_read; /* the last layer's attend of this step */
            read_tokens += st.last_tokens_read;
        }
    }
    double t_decode = cli_now() - t1;
    pikv_cache_stats st;
    memset(&st, 0, sizeof st);
    ps = pikv_cache_get_stats(cache, &st);
    if (ps != PIKV_OK) {
        rc = cli_lib_error(ctx, "pikv_cache_get_stats", ps);
        goto out;
    }
    char b1[32], b2[32];
    const int64_t stored = st.tokens / (hp->n_layers > 0 ? hp->n_layers : 1);
    printf("\n\n");
    printf("model: %s (%s", path, hp->n_experts > 1 ? "MoE" : "dense");
    if (hp->n_experts > 1)
        printf(", %d experts, FFN top-%d, KV routed to the top-%d", (int)hp->n_experts,
               (int)(moe_k ? moe_k : hp->n_experts_used), (int)kp.experts_per_token);
    printf(", %d layers)\n", (int)hp->n_layers);
    printf("KV cache: %s pages, select %s%s%s, %d device(s): %lld tokens x %d layers in %s",
           dtype_name(o->dtype), o->select == 0 ? "all" : "", (o->select & PIKV_SELECT_EXPERTS) ? "experts" : "",
           (o->select & PIKV_SELECT_QUEST) ? ((o->select & PIKV_SELECT_EXPERTS) ? "+quest" : "quest") : "",
           (int)st.n_devices, (long long)stored, (int)hp->n_layers, cli_format_bytes(st.bytes_used, b1, sizeof b1));
    if (steps > 0)
        printf("; a decode step's attend read %lld tokens (%s) on average (last layer)",
               (long long)(read_tokens / steps), cli_format_bytes(read_bytes / (uint64_t)steps, b2, sizeof b2));
    printf("\n");
    printf("speed: prompt %zu tokens at %.1f tok/s, generated %d tokens at %.1f tok/s (%d threads, %s)\n",
           n_ids, (double)n_ids / (t_prefill > 0 ? t_prefill : 1e-9), (int)n_done,
           steps > 0 && t_decode > 0 ? (double)steps / t_decode : 0.0, (int)o->threads, o->backend);
    rc = CLI_EXIT_OK;
out:
    pikv_cache_free(cache);
    pikv_context_free(ctx);
    free(ids);
    free(logits);
    free(text);
    free(piece);
    pikv_llama_free(m);
    return rc;
}

static void gen_defaults(gen_opts_t *o)
{
    memset(o, 0, sizeof *o);
    o->prompt = DEMO_PROMPT;
    o->n_gen = 48;
    o->threads = 2;
    o->backend = "cpu";
    o->dtype = PIKV_DTYPE_F16;
    o->token_budget = 256;
    o->top_k = 40;
    o->seed = 42;
}

/* Parses generate's options from argv[first..]; returns -1 to go on, else an exit status. */
static int parse_generate(gen_opts_t *o, const char *cmd, int argc, char **argv, int first)
{
    static const char *const dtypes[] = {"f32", "f16", "int8", "int4", NULL};
    static const pikv_dtype dtype_of[] = {PIKV_DTYPE_F32, PIKV_DTYPE_F16, PIKV_DTYPE_INT8, PIKV_DTYPE_INT4};
    static const char *const selects[] = {"all", "experts", "quest", "experts+quest", NULL};
    static const uint32_t select_of[] = {PIKV_SELECT_ALL, PIKV_SELECT_EXPERTS, PIKV_SELECT_QUEST,
                                         PIKV_SELECT_EXPERTS | PIKV_SELECT_QUEST};
    static const char *const backends[] = {"cpu", "opencl", "vulkan", "cuda", NULL};
    cli_parser p;
    cli_parser_init(&p, cmd, argc, argv, first);
    const char *v = NULL;
    int id, k;
    int64_t seed;
    while ((id = cli_next_opt(&p, gen_opts, &v)) != CLI_OPT_END) {
        switch (id) {
        case CLI_OPT_ERROR: return CLI_EXIT_USAGE;
        case G_HELP: generate_usage(stdout, strcmp(cmd, GEN_CMD) != 0); return CLI_EXIT_OK;
        case G_MODEL: o->model = v; break;
        case G_MOE: o->moe = 1; break;
        case G_PROMPT: o->prompt = v; break;
        case G_CHAT: o->chat = 1; break;
        case G_TOKENS: if (cli_parse_i32(&p, v, 0, 8192, &o->n_gen)) return CLI_EXIT_USAGE; break;
        case G_THREADS: if (cli_parse_i32(&p, v, 1, 256, &o->threads)) return CLI_EXIT_USAGE; break;
        case G_BACKEND:
            if (cli_parse_choice(&p, v, backends, &k)) return CLI_EXIT_USAGE;
            o->backend = backends[k];
            break;
        case G_DTYPE:
            if (cli_parse_choice(&p, v, dtypes, &k)) return CLI_EXIT_USAGE;
            o->dtype = dtype_of[k];
            break;
        case G_SELECT:
            if (cli_parse_choice(&p, v, selects, &k)) return CLI_EXIT_USAGE;
            o->select = select_of[k];
            o->select_set = 1;
            break;
        case G_EXPERTS_TOP_K: if (cli_parse_i32(&p, v, 0, 256, &o->experts_top_k)) return CLI_EXIT_USAGE; break;
        case G_BUDGET: if (cli_parse_i32(&p, v, 1, 1 << 20, &o->token_budget)) return CLI_EXIT_USAGE; break;
        case G_MOE_K:
            if (cli_parse_i32(&p, v, 0, 256, &o->moe_k)) return CLI_EXIT_USAGE;
            o->moe_k_set = 1;
            break;
        case G_TEMP: if (cli_parse_double(&p, v, 0.0, 100.0, &o->temp)) return CLI_EXIT_USAGE; break;
        case G_TOP_K: if (cli_parse_i32(&p, v, 0, 1 << 20, &o->top_k)) return CLI_EXIT_USAGE; break;
        case G_SEED:
            if (cli_parse_i64(&p, v, 0, INT64_MAX, &seed)) return CLI_EXIT_USAGE;
            o->seed = (uint64_t)seed;
            break;
        default: return CLI_EXIT_USAGE;
        }
    }
    if (o->model && o->moe) {
        cli_usage_error(cmd, "--moe picks the cached MoE model: give it or --model, not both");
        return CLI_EXIT_USAGE;
    }
    return -1;
}

int cli_cmd_generate(int argc, char **argv)
{
    gen_opts_t o;
    gen_defaults(&o);
    int rc = parse_generate(&o, GEN_CMD, argc, argv, 2);
    return rc >= 0 ? rc : run_generate(&o);
}

/* The README's main command: the cached MoE model (else the dense one) with PiKV's reads
 * (the query's experts' shards, then Quest pages), or the synthetic workload without a model. */
int cli_cmd_demo(int argc, char **argv)
{
    gen_opts_t o;
    gen_defaults(&o);
    o.chat = 1;
    char moe[1024], dense[1024];
    cached_model(MOE_FILE, moe, sizeof moe);
    cached_model(DENSE_FILE, dense, sizeof dense);
    for (int i = 2; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0) {
            generate_usage(stdout, 1);
            return CLI_EXIT_OK;
        }
    if (!cli_file_exists(moe) && !cli_file_exists(dense)) {
        fprintf(stderr, "pikv demo: no model at %s (tools/setup-model.sh could not fetch it?): running the "
                        "synthetic workload instead (pikv run)\n", dense);
        return cli_cmd_run(argc, argv);
    }
    int rc = parse_generate(&o, "pikv demo", argc, argv, 2);
    if (rc >= 0)
        return rc;
    if (!o.model && (o.moe || cli_file_exists(moe))) {
        o.moe = 1;
        if (!o.select_set)
            o.select = PIKV_SELECT_EXPERTS;
        /* the FFN with every expert: the MoEfied FFN at its router's top-2 (perplexity 20.6
           against the dense 8.5 on held-out text, docs/moe.md) writes visibly worse text; the
           KV is still sharded by the router's top-1 and each query reads its top experts'
           shards (--moe-k 2 runs the sparse FFN) */
        if (!o.moe_k_set)
            o.moe_k = GEN_MOE_ALL;
    }
    return run_generate(&o);
}
