/*
 * `pikv eval`: accuracy against KV memory on the real model (issue 10, docs/eval.md).
 *
 * Perplexity of held-out text, top-1 agreement with the full cache, and passkey
 * retrieval, for a table of cache configurations (dtype, selection, budgets, eviction)
 * on the dense model and, when its file is there, on its MoE conversion; with the KV
 * bytes each configuration stores and reads and its prefill speed. The runs are in
 * eval_run.c; this file has the options, the configurations and the report (table,
 * JSON, plot through tools/eval_plot.py).
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "eval.h"

enum {
    OPT_HELP = 1, OPT_MODEL, OPT_MOE_MODEL, OPT_CORPUS, OPT_CTX, OPT_CHUNKS, OPT_PK_LENGTHS,
    OPT_PK_SAMPLES, OPT_PK_CONFIGS, OPT_PK_LONG, OPT_PK_FORMAT, OPT_CONFIGS, OPT_THREADS,
    OPT_BACKEND, OPT_JSON, OPT_PLOT, OPT_SEED, OPT_QUICK, OPT_CHECK, OPT_DUMP_IDS,
    OPT_PAGESIZE, OPT_SINKS, OPT_RECENT, OPT_QUIET, OPT_LIST, OPT_PK_LONG_SAMPLES, OPT_MOE_FFN_K,
    OPT_PK_LONG_CONFIGS
};

static const cli_opt eval_opts_table[] = {
    {"--help", "-h", 0, OPT_HELP},
    {"--model", "-m", 1, OPT_MODEL},
    {"--moe-model", NULL, 1, OPT_MOE_MODEL},
    {"--corpus", NULL, 1, OPT_CORPUS},
    {"--ctx", NULL, 1, OPT_CTX},
    {"--chunks", NULL, 1, OPT_CHUNKS},
    {"--passkey-lengths", NULL, 1, OPT_PK_LENGTHS},
    {"--passkey-samples", NULL, 1, OPT_PK_SAMPLES},
    {"--passkey-configs", NULL, 1, OPT_PK_CONFIGS},
    {"--passkey-long", NULL, 1, OPT_PK_LONG},
    {"--passkey-format", NULL, 1, OPT_PK_FORMAT},
    {"--passkey-long-samples", NULL, 1, OPT_PK_LONG_SAMPLES},
    {"--passkey-long-configs", NULL, 1, OPT_PK_LONG_CONFIGS},
    {"--configs", NULL, 1, OPT_CONFIGS},
    {"--threads", NULL, 1, OPT_THREADS},
    {"--backend", NULL, 1, OPT_BACKEND},
    {"--json", NULL, 1, OPT_JSON},
    {"--plot", NULL, 1, OPT_PLOT},
    {"--seed", NULL, 1, OPT_SEED},
    {"--quick", NULL, 0, OPT_QUICK},
    {"--check", NULL, 0, OPT_CHECK},
    {"--dump-ids", NULL, 1, OPT_DUMP_IDS},
    {"--page-size", NULL, 1, OPT_PAGESIZE},
    {"--sinks", NULL, 1, OPT_SINKS},
    {"--moe-ffn-k", NULL, 1, OPT_MOE_FFN_K},
    {"--recent", NULL, 1, OPT_RECENT},
    {"--quiet", "-q", 0, OPT_QUIET},
    {"--list-configs", NULL, 0, OPT_LIST},
    {NULL, NULL, 0, 0},
};

/* --check bounds (docs/eval.md): the f32 full cache's perplexity on the held-out KJV
   text must lie in this range, exact configurations must equal their f32 baseline within
   EXACT_REL, and int8 pages the f16 baseline within INT8_REL. */
#define CHECK_PPL_MIN 2.0
#define CHECK_PPL_MAX 100.0
#define CHECK_EXACT_REL 1e-4
#define CHECK_INT8_REL 0.05

static void eval_usage(FILE *f)
{
    fputs("usage: pikv eval [options]\n"
          "\n"
          "Accuracy against KV memory on the real model (SmolLM2-135M-Instruct, and its MoE\n"
          "conversion when present): for each cache configuration, the perplexity of\n"
          "held-out text, its change and top-1 agreement against the model's full f16\n"
          "cache, the KV bytes stored and read per attend, prefill tokens/s, and passkey\n"
          "retrieval accuracy per prompt length. The prefill is exactly causal (each token\n"
          "is appended then attends, layer by layer), so selection, budgets and eviction\n"
          "act while the text is read. Prints a table; writes JSON and a plot on request.\n"
          "Exit status: 0; 1 if a run fails or (--check) an assertion fails; 2 on a bad\n"
          "command line.\n"
          "\n"
          "inputs (CACHE = $PIKV_CACHE or ~/.cache/pikv):\n"
          "  -m, --model PATH        dense GGUF (default CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf)\n"
          "  --moe-model PATH        MoE GGUF (default CACHE/models/SmolLM2-135M-Instruct-MoE8.gguf;\n"
          "                          the MoE configurations are skipped with a note if absent)\n"
          "  --corpus PATH           held-out text (default CACHE/corpus/kjv-heldout.txt)\n"
          "perplexity:\n"
          "  --ctx N                 tokens per chunk, 32..8192 (default 512; --quick 128)\n"
          "  --chunks N              chunks, from the start of the text (default 2; --quick 1)\n"
          "passkey retrieval:\n"
          "  --passkey-lengths LIST  prompt lengths in tokens, comma list, 0 = none; 8192 is\n"
          "                          cut to the model's context minus the answer\n"
          "                          (default 1024,2048,4096,8192; --quick 0)\n"
          "  --passkey-samples N     prompts per length, key depths spread by the seed (default 2)\n"
          "  --passkey-configs LIST  configurations tested (default full,int4,quest-B/4,quest-B/2,\n"
          "                          streaming-B/2,h2o-B/2,pyramid-B/2 with B = ctx, and\n"
          "                          moe-full,experts,pikv)\n"
          "  --passkey-long N        lengths above N run only for --passkey-long-configs\n"
          "                          (default 2048)\n"
          "  --passkey-long-configs LIST  (default full,quest-B/2; each must also be in\n"
          "                          --passkey-configs to run)\n"
          "  --passkey-long-samples N  ... with N prompts each (default 1)\n"
          "  --passkey-format F      plain|chat (default plain: the chat template gets fewer\n"
          "                          keys right from this model; docs/eval.md)\n"
          "configurations:\n"
          "  --configs LIST          a subset, comma list (--list-configs shows the names for\n"
          "                          the chosen --ctx); baselines always run\n"
          "  --page-size N           tokens per page (default 16)\n"
          "  --sinks N               sink tokens, always read and kept (default 4)\n"
          "  --moe-ffn-k K           the FFN's experts per token in the MoE cache configurations\n"
          "                          (moe-full, experts, pikv); 0 = all (default: the dense FFN,\n"
          "                          so they measure the KV reads alone; moe-kN rows: the FFN)\n"
          "  --recent N              recent tokens, always read and kept (default 32)\n"
          "  --list-configs          print the configurations and exit\n"
          "run:\n"
          "  --threads N             threads of the model's products and the CPU backend\n"
          "                          (default 2)\n"
          "  --backend B             cpu|opencl|vulkan|cuda: attention backend (default cpu;\n"
          "                          the cache uses its first device)\n"
          "  --seed N                passkey keys and depths (default 1)\n"
          "  --quick                 CI size: --ctx 128, 1 chunk, a few configurations, no passkey\n"
          "  --check                 assert: full-f32 perplexity in a sane range, exact\n"
          "                          configurations equal to full-f32 (1e-4 relative), int8\n"
          "                          within 5% of full; exit 1 if one fails\n"
          "output:\n"
          "  --json FILE             results as JSON (schema: docs/eval.md)\n"
          "  --plot FILE.png         accuracy vs KV memory (tools/eval_plot.py with matplotlib;\n"
          "                          PIKV_PYTHON and PIKV_EVAL_PLOT override the python and\n"
          "                          the script)\n"
          "  --dump-ids FILE         the first chunk's token ids, whitespace-separated\n"
          "  -q, --quiet             no progress on stderr\n"
          "  -h, --help              this help\n",
          f);
}

/* ---- Configurations ----------------------------------------------------- */


static eval_config *add_config(eval_config_list *L, const char *name, int model)
{
    if (L->n >= EVAL_MAX_CONFIGS) return NULL;
    eval_config *c = &L->c[L->n++];
    memset(c, 0, sizeof *c);
    const pikv_cache_params d = pikv_cache_default_params();
    snprintf(c->name, sizeof c->name, "%s", name);
    c->model = model;
    c->dtype = PIKV_DTYPE_F16;
    c->select = d.select;
    c->select.mode = PIKV_SELECT_ALL;
    c->budget = d.budget;
    c->evict = d.evict;
    return c;
}

static void set_quest(eval_config *c, int32_t budget)
{
    c->select.mode |= PIKV_SELECT_QUEST;
    c->select.token_budget = budget;
}

static void set_evict(eval_config *c, pikv_budget_mode mode, int64_t per_layer, int32_t layers,
                      pikv_evict_policy policy)
{
    c->budget.mode = mode;
    c->budget.total_tokens = per_layer * layers;
    c->budget_per_layer = per_layer;
    c->evict.policy = policy;
}

/* Every configuration for these options (dense layers n_layers; the MoE model's
   n_experts, or 0 when unknown). */
static void build_configs(const eval_opts *o, int32_t n_layers, int32_t n_experts,
                          int32_t n_experts_used, eval_config_list *L)
{
    char nm[40];
    const int32_t C = o->ctx, floor_tokens = o->sinks + o->recent;
    int32_t budgets[3] = {C / 8, C / 4, C / 2};
    L->n = 0;
    eval_config *c = add_config(L, "full", EVAL_DENSE);
    c->baseline = 1;
    c = add_config(L, "full-f32", EVAL_DENSE);
    c->dtype = PIKV_DTYPE_F32;
    add_config(L, "int8", EVAL_DENSE)->dtype = PIKV_DTYPE_INT8;
    add_config(L, "int4", EVAL_DENSE)->dtype = PIKV_DTYPE_INT4;
    if (o->check || o->quick) {
        /* exact by construction: a Quest budget of the whole chunk, an eviction budget
           over it */
        c = add_config(L, "quest-exact", EVAL_DENSE);
        c->dtype = PIKV_DTYPE_F32;
        set_quest(c, C > floor_tokens ? C : floor_tokens);
        c->exact = 1;
        c = add_config(L, "evict-exact", EVAL_DENSE);
        c->dtype = PIKV_DTYPE_F32;
        set_evict(c, PIKV_BUDGET_UNIFORM, C + o->page_size, n_layers, PIKV_EVICT_H2O);
        c->exact = 1;
    }
    for (int f = 0; f < 4; f++) {
        static const char *const fam[4] = {"quest", "streaming", "h2o", "pyramid"};
        for (int b = 0; b < 3; b++) {
            const int32_t B = budgets[b];
            if (B < floor_tokens || B < 1) continue;
            snprintf(nm, sizeof nm, "%s-%d", fam[f], (int)B);
            c = add_config(L, nm, EVAL_DENSE);
            if (f == 0) set_quest(c, B);
            if (f == 1) set_evict(c, PIKV_BUDGET_UNIFORM, B, n_layers, PIKV_EVICT_STREAMING);
            if (f == 2) set_evict(c, PIKV_BUDGET_UNIFORM, B, n_layers, PIKV_EVICT_H2O);
            if (f == 3) set_evict(c, PIKV_BUDGET_PYRAMID, B, n_layers, PIKV_EVICT_H2O);
        }
    }
    /* MoE model. Its cache configurations run the FFN with ffn_k experts per token (default
       all of them: the dense FFN, so that they measure what the KV reads cost, on a model
       that is as good as the dense one); the moe-kN rows measure the FFN's top-k itself, with
       the full cache. The KV is routed by the router's top experts_per_token either way. */
    const int32_t ne = n_experts > 0 ? n_experts : 8;
    const int32_t ffn_k = o->moe_ffn_k > 0 && o->moe_ffn_k <= ne ? o->moe_ffn_k : ne;
    (void)n_experts_used;
    c = add_config(L, "moe-full", EVAL_MOE);
    c->baseline = 1;
    c->moe_top_k = ffn_k;
    if (o->check || o->quick) {
        c = add_config(L, "moe-full-f32", EVAL_MOE);
        c->dtype = PIKV_DTYPE_F32;
        c->moe_top_k = ffn_k;
    }
    for (int32_t k = 1; k <= ne; k = k * 2 > ne && k < ne ? ne : k * 2) {
        if (k == ffn_k) continue; /* that is moe-full */
        snprintf(nm, sizeof nm, "moe-k%d", (int)k);
        add_config(L, nm, EVAL_MOE)->moe_top_k = k;
    }
    c = add_config(L, "experts", EVAL_MOE);
    c->select.mode = PIKV_SELECT_EXPERTS;
    c->moe_top_k = ffn_k;
    if (o->check || o->quick) {
        /* every expert's shard read: exact by construction */
        c = add_config(L, "experts-exact", EVAL_MOE);
        c->dtype = PIKV_DTYPE_F32;
        c->select.mode = PIKV_SELECT_EXPERTS;
        c->cache_experts = ne;
        c->select.experts_top_k = ne;
        c->moe_top_k = ffn_k;
        c->exact = 1;
    }
    /* PiKV combined: the query's experts, Quest among them, int8 pages, pyramidal
       budgets with utility eviction */
    if (budgets[1] >= floor_tokens) {
        c = add_config(L, "pikv", EVAL_MOE);
        c->dtype = PIKV_DTYPE_INT8;
        c->select.mode = PIKV_SELECT_EXPERTS;
        c->moe_top_k = ffn_k;
        set_quest(c, budgets[1]);
        set_evict(c, PIKV_BUDGET_PYRAMID, budgets[2], n_layers, PIKV_EVICT_UTILITY);
    }
    for (int i = 0; i < L->n; i++) {
        L->c[i].select.sink_tokens = o->sinks;
        L->c[i].select.recent_tokens = o->recent;
    }
}

/* Is name in the comma list? */
static int in_list(const char *list, const char *name)
{
    const size_t n = strlen(name);
    for (const char *p = list; *p;) {
        const char *e = strchr(p, ',');
        const size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len == n && strncmp(p, name, n) == 0) return 1;
        if (!e) break;
        p = e + 1;
    }
    return 0;
}

/* Every name of the list must be a configuration: 0, or -1 after a message. */
static int check_list(const char *flag, const char *list, const eval_config_list *L)
{
    for (const char *p = list; *p;) {
        const char *e = strchr(p, ',');
        const size_t len = e ? (size_t)(e - p) : strlen(p);
        int found = 0;
        for (int i = 0; i < L->n && !found; i++)
            found = strlen(L->c[i].name) == len && strncmp(L->c[i].name, p, len) == 0;
        if (!found) {
            fprintf(stderr, "pikv eval: invalid value '%.*s' in %s: not a configuration (",
                    (int)len, p, flag);
            for (int i = 0; i < L->n; i++) fprintf(stderr, "%s%s", i ? ", " : "", L->c[i].name);
            fprintf(stderr, ")\n");
            return -1;
        }
        if (!e) break;
        p = e + 1;
    }
    return 0;
}

/* ---- Model ---------------------------------------------------------------- */

static int load_model(const eval_opts *o, const char *path, eval_model *em)
{
    pikv_llama_error err;
    memset(em, 0, sizeof *em);
    pikv_llama_status s = pikv_llama_load(path, o->threads, &em->m, &err);
    if (s != PIKV_LLAMA_OK) {
        fprintf(stderr, "pikv eval: %s: %s\n", pikv_llama_status_name(s), err.message);
        return -1;
    }
    em->hp = pikv_llama_get_hparams(em->m);
    em->tok = pikv_llama_get_tokenizer(em->m);
    return 0;
}

static char *read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "pikv eval: cannot open the corpus '%s': %s\n", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        if (n + 4096 + 1 > cap) {
            char *nb = realloc(buf, cap * 2);
            if (!nb) {
                free(buf);
                buf = NULL;
                break;
            }
            buf = nb;
            cap *= 2;
        }
        const size_t r = fread(buf + n, 1, cap - n - 1, f);
        n += r;
        if (r == 0) break;
    }
    fclose(f);
    if (!buf) fprintf(stderr, "pikv eval: out of memory reading '%s'\n", path);
    else buf[n] = 0;
    return buf;
}

/* ---- The command ---------------------------------------------------------- */

static int parse_lengths(const cli_parser *p, const char *v, eval_opts *o)
{
    o->n_pk_lengths = 0;
    const char *s = v;
    while (*s) {
        char item[32];
        const char *e = strchr(s, ',');
        const size_t len = e ? (size_t)(e - s) : strlen(s);
        if (len == 0 || len >= sizeof item || o->n_pk_lengths >= EVAL_MAX_LENGTHS) {
            cli_usage_error(p->cmd, "invalid value '%s' for --passkey-lengths: expected up to %d "
                                    "comma-separated lengths in 64..8192, or 0", v, EVAL_MAX_LENGTHS);
            return -1;
        }
        memcpy(item, s, len);
        item[len] = 0;
        int32_t x;
        if (strcmp(item, "0") == 0 && o->n_pk_lengths == 0 && !e) return 0;
        if (cli_parse_i32(p, item, 64, 8192, &x) != 0) return -1;
        o->pk_lengths[o->n_pk_lengths++] = x;
        if (!e) break;
        s = e + 1;
        if (!*s) {
            cli_usage_error(p->cmd, "invalid value '%s' for --passkey-lengths: a trailing comma", v);
            return -1;
        }
    }
    return 0;
}

static int valid_list(const cli_parser *p, const char *flag, const char *v)
{
    if (!*v || v[0] == ',' || v[strlen(v) - 1] == ',' || strstr(v, ",,")) {
        cli_usage_error(p->cmd, "invalid value '%s' for %s: expected a comma list of "
                                "configuration names", v, flag);
        return -1;
    }
    return 0;
}

int cli_cmd_eval(int argc, char **argv)
{
    static char model_buf[1200], moe_buf[1200], corpus_buf[1200];
    char cdir[1024];
    cli_cache_dir(cdir, sizeof cdir);
    snprintf(model_buf, sizeof model_buf, "%s/models/SmolLM2-135M-Instruct.Q4_1.gguf", cdir);
    snprintf(moe_buf, sizeof moe_buf, "%s/models/SmolLM2-135M-Instruct-MoE8.gguf", cdir);
    snprintf(corpus_buf, sizeof corpus_buf, "%s/corpus/kjv-heldout.txt", cdir);
    eval_opts o;
    memset(&o, 0, sizeof o);
    o.model_path = model_buf;
    o.moe_model_path = moe_buf;
    o.corpus_path = corpus_buf;
    o.backend = "cpu";
    o.threads = 2;
    o.page_size = 16;
    o.sinks = 4;
    o.recent = 32;
    o.piece = 64;
    o.seed = 1;
    o.pk_samples = 2;
    o.pk_long = 2048;
    o.pk_long_samples = 1;
    int ctx_set = 0, chunks_set = 0, lengths_set = 0, list = 0, moe_set = 0;

    cli_parser p;
    cli_parser_init(&p, "pikv eval", argc, argv, 2);
    const char *v;
    int id, choice;
    static const char *const backends[] = {"cpu", "opencl", "vulkan", "cuda", NULL};
    static const char *const formats[] = {"plain", "chat", NULL};
    while ((id = cli_next_opt(&p, eval_opts_table, &v)) != CLI_OPT_END) {
        int bad = 0;
        switch (id) {
        case CLI_OPT_ERROR: return CLI_EXIT_USAGE;
        case OPT_HELP: eval_usage(stdout); return CLI_EXIT_OK;
        case OPT_MODEL: o.model_path = v; break;
        case OPT_MOE_MODEL: o.moe_model_path = v; moe_set = 1; break;
        case OPT_CORPUS: o.corpus_path = v; break;
        case OPT_CTX: bad = cli_parse_i32(&p, v, 32, 8192, &o.ctx); ctx_set = 1; break;
        case OPT_CHUNKS: bad = cli_parse_i32(&p, v, 1, 1 << 20, &o.chunks); chunks_set = 1; break;
        case OPT_PK_LENGTHS: bad = parse_lengths(&p, v, &o); lengths_set = 1; break;
        case OPT_PK_SAMPLES: bad = cli_parse_i32(&p, v, 1, 1000, &o.pk_samples); break;
        case OPT_PK_CONFIGS: bad = valid_list(&p, "--passkey-configs", v); o.passkey_configs = v; break;
        case OPT_PK_LONG: bad = cli_parse_i32(&p, v, 0, 1 << 20, &o.pk_long); break;
        case OPT_PK_LONG_SAMPLES: bad = cli_parse_i32(&p, v, 1, 1000, &o.pk_long_samples); break;
        case OPT_PK_LONG_CONFIGS:
            bad = valid_list(&p, "--passkey-long-configs", v);
            o.passkey_long_configs = v;
            break;
        case OPT_PK_FORMAT:
            bad = cli_parse_choice(&p, v, formats, &choice);
            o.pk_chat = choice == 1;
            break;
        case OPT_CONFIGS: bad = valid_list(&p, "--configs", v); o.configs = v; break;
        case OPT_THREADS: bad = cli_parse_i32(&p, v, 1, 256, &o.threads); break;
        case OPT_BACKEND:
            bad = cli_parse_choice(&p, v, backends, &choice);
            o.backend = v;
            break;
        case OPT_JSON: o.json_path = v; break;
        case OPT_PLOT: o.plot_path = v; break;
        case OPT_SEED: bad = cli_parse_u64(&p, v, &o.seed); break;
        case OPT_QUICK: o.quick = 1; break;
        case OPT_CHECK: o.check = 1; break;
        case OPT_DUMP_IDS: o.dump_ids_path = v; break;
        case OPT_PAGESIZE: bad = cli_parse_i32(&p, v, 1, 4096, &o.page_size); break;
        case OPT_SINKS: bad = cli_parse_i32(&p, v, 0, 4096, &o.sinks); break;
        case OPT_MOE_FFN_K: bad = cli_parse_i32(&p, v, 0, 256, &o.moe_ffn_k); break;
        case OPT_RECENT: bad = cli_parse_i32(&p, v, 0, 4096, &o.recent); break;
        case OPT_QUIET: o.quiet = 1; break;
        case OPT_LIST: list = 1; break;
        default: break;
        }
        if (bad) return CLI_EXIT_USAGE;
    }
    if (!ctx_set) o.ctx = o.quick ? 128 : 512;
    if (!chunks_set) o.chunks = 1 + !o.quick;
    if (!lengths_set && !o.quick) {
        static const int32_t dl[] = {1024, 2048, 4096, 8192};
        o.n_pk_lengths = 4;
        memcpy(o.pk_lengths, dl, sizeof dl);
    }
    if (o.ctx < o.page_size) {
        cli_usage_error(p.cmd, "invalid value '%d' for --ctx: at least --page-size (%d)",
                        (int)o.ctx, (int)o.page_size);
        return CLI_EXIT_USAGE;
    }

    /* the configurations (dense geometry from the model: 30 layers here, and the MoE
       model's experts when it is there) */
    const double t_start = eval_now();
    eval_model dense, moe;
    memset(&dense, 0, sizeof dense);
    memset(&moe, 0, sizeof moe);
    eval_config_list *L = calloc(1, sizeof *L);
    int32_t *ids = NULL, *argmax = NULL;
    char *text = NULL;
    char notes[1024] = "";
    int rc = CLI_EXIT_OK;
    if (!L) {
        fprintf(stderr, "pikv eval: out of memory\n");
        return CLI_EXIT_FAIL;
    }
    if (load_model(&o, o.model_path, &dense) != 0) {
        free(L);
        return CLI_EXIT_FAIL;
    }
    int have_moe = cli_file_exists(o.moe_model_path);
    int32_t moe_experts = 0, moe_used = 0;
    if (have_moe) {
        if (load_model(&o, o.moe_model_path, &moe) != 0) {
            /* an explicit --moe-model must load; the default file may be from a newer
               conversion than this runner reads: skipped with a note */
            if (moe_set) {
                rc = CLI_EXIT_FAIL;
                goto out;
            }
            have_moe = 0;
            snprintf(notes, sizeof notes, "MoE model '%s' cannot be loaded (see stderr): MoE "
                     "configurations skipped", o.moe_model_path);
        }
    }
    if (have_moe) {
        moe_experts = moe.hp->n_experts;
        moe_used = moe.hp->n_experts_used;
        if (moe_experts < 2) {
            fprintf(stderr, "pikv eval: --moe-model '%s' is a dense model (%d expert)\n",
                    o.moe_model_path, (int)moe_experts);
            rc = CLI_EXIT_FAIL;
            goto out;
        }
        if (o.moe_ffn_k > moe_experts) {
            cli_usage_error(p.cmd, "invalid value '%d' for --moe-ffn-k: the MoE model has %d experts",
                            (int)o.moe_ffn_k, (int)moe_experts);
            rc = CLI_EXIT_USAGE;
            goto out;
        }
    }
    build_configs(&o, dense.hp->n_layers, moe_experts, moe_used, L);
    if (list) {
        for (int i = 0; i < L->n; i++) {
            char d[96];
            eval_describe(&L->c[i], d, sizeof d);
            printf("%-16s %-5s %s%s\n", L->c[i].name, L->c[i].model == EVAL_MOE ? "moe" : "dense",
                   d, L->c[i].baseline ? " (baseline)" : "");
        }
        goto out;
    }
    if ((o.configs && check_list("--configs", o.configs, L) != 0) ||
        (o.passkey_configs && check_list("--passkey-configs", o.passkey_configs, L) != 0) ||
        (o.passkey_long_configs && check_list("--passkey-long-configs", o.passkey_long_configs, L) != 0)) {
        rc = CLI_EXIT_USAGE;
        goto out;
    }
    /* which run: --quick's set, --configs, or all; baselines always */
    char quick_set[256]; /* the exact rows, and the lossy ones at half the chunk */
    snprintf(quick_set, sizeof quick_set,
             "full,full-f32,int8,int4,quest-exact,evict-exact,quest-%d,streaming-%d,h2o-%d,"
             "moe-full,moe-full-f32,experts,experts-exact",
             (int)(o.ctx / 2), (int)(o.ctx / 2), (int)(o.ctx / 2));
    int keep[EVAL_MAX_CONFIGS];
    char pk_default[256], pk_long_default[64];
    snprintf(pk_default, sizeof pk_default,
             "full,int4,quest-%d,quest-%d,streaming-%d,h2o-%d,pyramid-%d,moe-full,experts,pikv",
             (int)(o.ctx / 4), (int)(o.ctx / 2), (int)(o.ctx / 2), (int)(o.ctx / 2), (int)(o.ctx / 2));
    snprintf(pk_long_default, sizeof pk_long_default, "full,quest-%d", (int)(o.ctx / 2));
    for (int i = 0; i < L->n; i++) {
        eval_config *c = &L->c[i];
        keep[i] = o.configs ? in_list(o.configs, c->name)
                            : (o.quick ? in_list(quick_set, c->name) : 1);
        if (c->baseline) keep[i] = 1;
        if (o.check && (c->exact || !strcmp(c->name, "full-f32") ||
                        !strcmp(c->name, "moe-full-f32") || !strcmp(c->name, "int8")))
            keep[i] = 1;
        c->passkey = keep[i] && in_list(o.passkey_configs ? o.passkey_configs : pk_default, c->name);
        c->passkey_long = c->passkey &&
                          in_list(o.passkey_long_configs ? o.passkey_long_configs : pk_long_default, c->name);
    }
    if (!have_moe) {
        if (!notes[0])
            snprintf(notes, sizeof notes, "MoE model '%s' not found: MoE configurations skipped",
                     o.moe_model_path);
        fprintf(stderr, "pikv eval: note: %s\n", notes);
    }

    /* the text */
    text = read_file(o.corpus_path);
    if (!text) {
        rc = CLI_EXIT_FAIL;
        goto out;
    }
    int32_t n_ids = 0;
    if (eval_tokenize(dense.tok, text, 0, &ids, &n_ids) != 0) {
        rc = CLI_EXIT_FAIL;
        goto out;
    }
    if (o.ctx > dense.hp->n_ctx) {
        cli_usage_error(p.cmd, "invalid value '%d' for --ctx: the model's context is %d",
                        (int)o.ctx, (int)dense.hp->n_ctx);
        rc = CLI_EXIT_USAGE;
        goto out;
    }
    if (n_ids / o.ctx < o.chunks) {
        fprintf(stderr, "pikv eval: the corpus has %d tokens: %d chunk(s) of %d instead of %d\n",
                (int)n_ids, (int)(n_ids / o.ctx), (int)o.ctx, (int)o.chunks);
        o.chunks = n_ids / o.ctx;
        if (o.chunks < 1) {
            rc = CLI_EXIT_FAIL;
            goto out;
        }
    }
    if (!o.quiet)
        fprintf(stderr, "pikv eval: corpus %s: %d tokens; %d chunk(s) of %d\n", o.corpus_path,
                (int)n_ids, (int)o.chunks, (int)o.ctx);
    if (o.dump_ids_path) {
        FILE *f = fopen(o.dump_ids_path, "w");
        if (!f) {
            fprintf(stderr, "pikv eval: cannot write '%s': %s\n", o.dump_ids_path, strerror(errno));
            rc = CLI_EXIT_FAIL;
            goto out;
        }
        for (int32_t i = 0; i < o.ctx; i++) fprintf(f, "%d%c", (int)ids[i], i + 1 < o.ctx ? ' ' : '\n');
        if (fclose(f) != 0) {
            fprintf(stderr, "pikv eval: cannot write '%s'\n", o.dump_ids_path);
            rc = CLI_EXIT_FAIL;
            goto out;
        }
    }
    argmax = malloc((size_t)o.chunks * (size_t)o.ctx * sizeof *argmax);
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = o.backend;
    cp.cpu_threads = o.threads;
    pikv_context *pctx = NULL;
    pikv_status ps = pikv_context_create(&cp, &pctx);
    if (ps != PIKV_OK) {
        rc = cli_lib_error(pctx, "pikv_context_create", ps);
        pikv_context_free(pctx);
        goto out;
    }
    if (!argmax) {
        fprintf(stderr, "pikv eval: out of memory\n");
        pikv_context_free(pctx);
        rc = CLI_EXIT_FAIL;
        goto out;
    }
    if (pikv_device_count(pctx) < 1) {
        fprintf(stderr, "pikv eval: --backend %s: no device found\n", o.backend);
        pikv_context_free(pctx);
        rc = CLI_EXIT_FAIL;
        goto out;
    }
    dense.ctx = moe.ctx = pctx;

    /* runs: per model, the baseline first. A configuration that fails is reported and
       left out (the others still run); the exit status is then 1. Without its baseline
       a model's other configurations are skipped. */
    char failed[512] = "";
    int n_failed = 0;
#define EVAL_FAILED(name)                                                                   \
    do {                                                                                    \
        n_failed++;                                                                         \
        size_t fl_ = strlen(failed);                                                        \
        snprintf(failed + fl_, sizeof failed - fl_, "%s%s", fl_ ? "," : "", (name));         \
    } while (0)
    for (int model = EVAL_DENSE; model <= EVAL_MOE; model++) {
        eval_model *em = model == EVAL_MOE ? &moe : &dense;
        if (model == EVAL_MOE && !have_moe) break;
        int32_t *mids = ids;
        int32_t n_mids = n_ids;
        int32_t *own = NULL;
        if (model == EVAL_MOE) { /* its own tokenizer (the same vocabulary, normally) */
            if (eval_tokenize(em->tok, text, 0, &own, &n_mids) != 0 || n_mids < o.chunks * o.ctx) {
                free(own);
                EVAL_FAILED("moe tokenizer");
                break;
            }
            mids = own;
        }
        eval_config *base = NULL;
        for (int i = 0; i < L->n; i++)
            if (L->c[i].model == model && L->c[i].baseline) base = &L->c[i];
        for (int pass = 0; pass < 2; pass++)
            for (int i = 0; i < L->n; i++) {
                eval_config *c = &L->c[i];
                if (c->model != model || !keep[i] || (pass == 0) != (c == base)) continue;
                if (pass == 1 && !base->ran) continue;
                if (eval_perplexity(&o, em, c, mids, o.chunks, argmax) != 0) EVAL_FAILED(c->name);
                else c->delta = c->ppl - base->ppl;
            }
        for (int i = 0; i < L->n; i++) {
            eval_config *c = &L->c[i];
            if (c->model != model || !c->passkey || o.n_pk_lengths == 0 || !base->ran) continue;
            if (eval_passkey(&o, em, c) != 0) EVAL_FAILED(c->name);
        }
        free(own);
    }
#undef EVAL_FAILED
    if (n_failed) {
        size_t nl = strlen(notes);
        snprintf(notes + nl, sizeof notes - nl, "%sFAILED runs (see stderr): %s", nl ? "; " : "",
                 failed);
        rc = CLI_EXIT_FAIL;
    }
    pikv_context_free(pctx);
    const double wall = eval_now() - t_start;

    /* checks */
    eval_check checks[16];
    int n_checks = 0, n_check_failed = 0;
    eval_config *f32 = NULL, *full = NULL, *int8 = NULL, *moe_f32 = NULL;
    for (int i = 0; i < L->n; i++) {
        if (!L->c[i].ran) continue;
        if (!strcmp(L->c[i].name, "full-f32")) f32 = &L->c[i];
        if (!strcmp(L->c[i].name, "full")) full = &L->c[i];
        if (!strcmp(L->c[i].name, "int8")) int8 = &L->c[i];
        if (!strcmp(L->c[i].name, "moe-full-f32")) moe_f32 = &L->c[i];
    }
    if (o.check) {
        eval_check *k = &checks[n_checks++];
        snprintf(k->name, sizeof k->name, "full-f32 ppl in range");
        k->pass = f32 && isfinite(f32->ppl) && f32->ppl >= CHECK_PPL_MIN && f32->ppl <= CHECK_PPL_MAX;
        snprintf(k->detail, sizeof k->detail, "ppl %.6f, expected finite in [%g, %g]",
                 f32 ? f32->ppl : NAN, CHECK_PPL_MIN, CHECK_PPL_MAX);
        for (int i = 0; i < L->n && n_checks < 15; i++) {
            const eval_config *c = &L->c[i];
            if (!c->exact || !c->ran) continue;
            const eval_config *ref = c->model == EVAL_MOE ? moe_f32 : f32;
            k = &checks[n_checks++];
            snprintf(k->name, sizeof k->name, "%s equals %s", c->name, ref ? ref->name : "?");
            const double rel = ref ? fabs(c->ppl - ref->ppl) / ref->ppl : NAN;
            k->pass = ref && rel <= CHECK_EXACT_REL;
            snprintf(k->detail, sizeof k->detail, "ppl %.8f vs %.8f: relative %.3g (bound %g)",
                     c->ppl, ref ? ref->ppl : NAN, rel, CHECK_EXACT_REL);
        }
        if (n_checks < 16) {
            k = &checks[n_checks++];
            snprintf(k->name, sizeof k->name, "int8 close to full");
            const double rel = int8 && full ? fabs(int8->ppl - full->ppl) / full->ppl : NAN;
            k->pass = int8 && full && rel <= CHECK_INT8_REL;
            snprintf(k->detail, sizeof k->detail, "ppl %.6f vs %.6f: relative %.3g (bound %g)",
                     int8 ? int8->ppl : NAN, full ? full->ppl : NAN, rel, CHECK_INT8_REL);
        }
        for (int i = 0; i < n_checks; i++) n_check_failed += !checks[i].pass;
    }

    {
        eval_print_table(&o, L);
        if (o.check) {
            printf("\nchecks:\n");
            for (int i = 0; i < n_checks; i++)
                printf("  %s %s: %s\n", checks[i].pass ? "PASS" : "FAIL", checks[i].name,
                       checks[i].detail);
        }
        if (notes[0]) printf("\nnote: %s\n", notes);
        printf("\nwall time %.1f s\n", wall);
    }
    /* the command line, for the JSON */
    char cmdline[2048];
    size_t cl = 0;
    cmdline[0] = 0;
    for (int i = 0; i < argc && cl + 2 < sizeof cmdline; i++)
        cl += (size_t)snprintf(cmdline + cl, sizeof cmdline - cl, "%s%s", i ? " " : "", argv[i]);
    if (o.json_path || o.plot_path) {
        char tmp[1300];
        const char *jp = o.json_path;
        if (!jp) {
            snprintf(tmp, sizeof tmp, "%s.json", o.plot_path);
            jp = tmp;
        }
        if (eval_write_json(jp, &o, L, cmdline, wall, checks, n_checks, notes, f32) != 0) {
            rc = CLI_EXIT_FAIL;
        } else if (o.plot_path) {
            fflush(stdout);
            eval_run_plot(jp, o.plot_path);
        }
    }
    if (n_check_failed) {
        fprintf(stderr, "pikv eval: %d check(s) FAILED\n", n_check_failed);
        rc = CLI_EXIT_FAIL;
    }
out:
    free(argmax);
    free(ids);
    free(text);
    free(L);
    pikv_llama_free(dense.m);
    pikv_llama_free(moe.m);
    return rc;
}
