/*
 * `pikv eval`: the report (docs/eval.md). The table on stdout, the JSON, the plot through
 * tools/eval_plot.py, and the small helpers the command shares with it.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <inttypes.h>
#include <math.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "cli.h"
#include "eval.h"

extern char **environ;

#ifndef PIKV_EVAL_PLOT_SCRIPT
#define PIKV_EVAL_PLOT_SCRIPT "tools/eval_plot.py"
#endif

const char *eval_dtype_name(pikv_dtype d)
{
    static const char *const n[] = {"f32", "f16", "int8", "int4"};
    return (unsigned)d < 4 ? n[d] : "?";
}

const char *eval_evict_name(pikv_evict_policy p)
{
    static const char *const n[] = {"none", "lru", "lfu", "streaming", "h2o", "utility"};
    return (unsigned)p < 6 ? n[p] : "?";
}

void eval_describe(const eval_config *c, char *buf, size_t cap)
{
    size_t n = (size_t)snprintf(buf, cap, "%s", eval_dtype_name(c->dtype));
    if (c->select.mode & PIKV_SELECT_EXPERTS && n < cap)
        n += c->select.experts_top_k
                 ? (size_t)snprintf(buf + n, cap - n, ", experts top-%d", (int)c->select.experts_top_k)
                 : (size_t)snprintf(buf + n, cap - n, ", experts (router top-k)");
    if (c->select.mode & PIKV_SELECT_QUEST && n < cap)
        n += (size_t)snprintf(buf + n, cap - n, ", quest %d", (int)c->select.token_budget);
    if (c->budget.mode != PIKV_BUDGET_NONE && n < cap)
        n += (size_t)snprintf(buf + n, cap - n, ", %s %" PRId64 "/layer %s",
                              c->budget.mode == PIKV_BUDGET_PYRAMID ? "pyramid" : "uniform",
                              c->budget_per_layer, eval_evict_name(c->evict.policy));
    if (c->moe_top_k && n < cap) snprintf(buf + n, cap - n, ", ffn top-%d", (int)c->moe_top_k);
}

/* ---- Output ------------------------------------------------------------- */

static void fmt_mib(double bytes, char *buf, size_t cap)
{
    snprintf(buf, cap, "%.2f", bytes / 1048576.0);
}

void eval_print_table(const eval_opts *o, const eval_config_list *L)
{
    printf("\nperplexity: %d chunk(s) of %d tokens; delta and top-1 agreement against the "
           "model's full f16 cache\n",
           (int)o->chunks, (int)o->ctx);
    printf("%-16s %-5s %-44s %9s %9s %7s %9s %9s %11s %8s\n", "config", "model", "cache", "ppl",
           "delta", "top-1", "KV MiB", "peak MiB", "read/attend", "tok/s");
    for (int i = 0; i < L->n; i++) {
        const eval_config *c = &L->c[i];
        if (!c->ran) continue;
        char d[96], a[32], b[32];
        eval_describe(c, d, sizeof d);
        fmt_mib(c->kv_bytes_stored, a, sizeof a);
        fmt_mib(c->kv_bytes_peak, b, sizeof b);
        printf("%-16s %-5s %-44s %9.4f %+9.4f %6.2f%% %9s %9s %9.1fKB %8.1f\n", c->name,
               c->model == EVAL_MOE ? "moe" : "dense", d, c->ppl, c->delta, 100.0 * c->top1, a,
               b, c->bytes_read_per_attend / 1024.0, c->tokens_per_s);
    }
    int any = 0;
    for (int i = 0; i < L->n; i++)
        for (int l = 0; l < o->n_pk_lengths; l++) any |= L->c[i].pk_ran[l];
    if (!any) return;
    printf("\npasskey retrieval (%s prompt; correct / samples per length in tokens)\n",
           o->pk_chat ? "chat" : "plain");
    printf("%-16s", "config");
    for (int l = 0; l < o->n_pk_lengths; l++) printf(" %8d", (int)o->pk_lengths[l]);
    printf("\n");
    for (int i = 0; i < L->n; i++) {
        const eval_config *c = &L->c[i];
        int ran = 0;
        for (int l = 0; l < o->n_pk_lengths; l++) ran |= c->pk_ran[l];
        if (!ran) continue;
        printf("%-16s", c->name);
        for (int l = 0; l < o->n_pk_lengths; l++) {
            if (c->pk_ran[l]) printf(" %5d/%-2d", c->pk_correct[l], c->pk_total[l]);
            else printf(" %8s", "-");
        }
        printf("\n");
    }
}


int eval_write_json(const char *path, const eval_opts *o, const eval_config_list *L,
                      const char *cmdline, double wall, const eval_check *checks, int n_checks,
                      const char *notes, const eval_config *first)
{
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "pikv eval: cannot write '%s': %s\n", path, strerror(errno));
        return -1;
    }
    char cpu[256], date[64];
    cli_cpu_model(cpu, sizeof cpu);
    time_t t = time(NULL);
    struct tm tm;
    gmtime_r(&t, &tm);
    strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%SZ", &tm);
    fprintf(f, "{\n  \"tool\": \"pikv eval\",\n  \"version\": \"%s\",\n  \"date\": \"%s\",\n",
            pikv_version_string(), date);
    fprintf(f, "  \"command\": ");
    cli_json_string(f, cmdline);
    fprintf(f, ",\n  \"wall_s\": ");
    cli_json_number(f, wall);
    fprintf(f, ",\n  \"machine\": {\"nproc\": %ld, \"cpu\": ", sysconf(_SC_NPROCESSORS_ONLN));
    cli_json_string(f, cpu);
    fprintf(f, ", \"threads\": %d, \"backend\": ", (int)o->threads);
    cli_json_string(f, o->backend);
    fprintf(f, "},\n  \"settings\": {\"model\": ");
    cli_json_string(f, o->model_path);
    fprintf(f, ", \"moe_model\": ");
    cli_json_string(f, o->moe_model_path);
    fprintf(f, ", \"corpus\": ");
    cli_json_string(f, o->corpus_path);
    fprintf(f,
            ", \"ctx\": %d, \"chunks\": %d, \"page_size\": %d, \"sinks\": %d, \"recent\": %d, "
            "\"seed\": %" PRIu64 ", \"quick\": %s, \"passkey_samples\": %d, "
            "\"passkey_long\": %d, \"passkey_long_samples\": %d, \"passkey_format\": \"%s\", "
            "\"passkey_lengths\": [",
            (int)o->ctx, (int)o->chunks, (int)o->page_size, (int)o->sinks, (int)o->recent,
            o->seed, o->quick ? "true" : "false", (int)o->pk_samples, (int)o->pk_long,
            (int)o->pk_long_samples, o->pk_chat ? "chat" : "plain");
    for (int l = 0; l < o->n_pk_lengths; l++) fprintf(f, "%s%d", l ? ", " : "", (int)o->pk_lengths[l]);
    fprintf(f, "]},\n  \"notes\": ");
    cli_json_string(f, notes);
    fprintf(f, ",\n  \"first_chunk\": ");
    if (first && first->ran) {
        fprintf(f, "{\"config\": ");
        cli_json_string(f, first->name);
        fprintf(f, ", \"nll_sum\": %.17g, \"count\": %" PRId64 ", \"ppl\": %.17g}",
                first->first_nll_sum, first->first_count,
                exp(first->first_nll_sum / (double)first->first_count));
    } else {
        fprintf(f, "null");
    }
    fprintf(f, ",\n  \"configs\": [");
    int k = 0;
    for (int i = 0; i < L->n; i++) {
        const eval_config *c = &L->c[i];
        if (!c->ran) continue;
        char d[96];
        eval_describe(c, d, sizeof d);
        fprintf(f, "%s\n    {\"name\": ", k++ ? "," : "");
        cli_json_string(f, c->name);
        fprintf(f, ", \"model\": \"%s\", \"description\": ", c->model == EVAL_MOE ? "moe" : "dense");
        cli_json_string(f, d);
        fprintf(f,
                ", \"dtype\": \"%s\", \"select_experts\": %s, \"select_quest\": %s, "
                "\"token_budget\": %d, \"experts_top_k\": %d, \"budget_mode\": \"%s\", "
                "\"budget_total_tokens\": %" PRId64 ", \"evict\": \"%s\", \"moe_top_k\": %d, "
                "\"exact\": %s, \"baseline\": %s,\n     \"ppl\": ",
                eval_dtype_name(c->dtype), c->select.mode & PIKV_SELECT_EXPERTS ? "true" : "false",
                c->select.mode & PIKV_SELECT_QUEST ? "true" : "false",
                (int)c->select.token_budget, (int)c->select.experts_top_k,
                c->budget.mode == PIKV_BUDGET_NONE
                    ? "none"
                    : (c->budget.mode == PIKV_BUDGET_PYRAMID ? "pyramid" : "uniform"),
                c->budget.mode == PIKV_BUDGET_NONE ? (int64_t)0 : c->budget.total_tokens,
                eval_evict_name(c->evict.policy), (int)c->moe_top_k, c->exact ? "true" : "false",
                c->baseline ? "true" : "false");
        cli_json_number(f, c->ppl);
        fprintf(f, ", \"nll_sum\": %.17g, \"count\": %" PRId64 ", \"delta\": ", c->nll_sum,
                c->count);
        cli_json_number(f, c->delta);
        fprintf(f, ", \"top1_agreement\": ");
        cli_json_number(f, c->top1);
        fprintf(f, ", \"kv_bytes_stored\": %.0f, \"kv_bytes_peak\": %.0f, "
                   "\"bytes_read_per_attend\": %.1f, \"tokens_per_s\": ",
                c->kv_bytes_stored, c->kv_bytes_peak, c->bytes_read_per_attend);
        cli_json_number(f, c->tokens_per_s);
        fprintf(f, ", \"seconds\": ");
        cli_json_number(f, c->seconds);
        fprintf(f, ", \"evicted_tokens\": %" PRId64 ",\n     \"passkey\": [", c->evicted_tokens);
        int kk = 0;
        for (int l = 0; l < o->n_pk_lengths; l++) {
            if (!c->pk_ran[l]) continue;
            fprintf(f, "%s{\"length\": %d, \"correct\": %d, \"samples\": %d, \"accuracy\": ",
                    kk++ ? ", " : "", (int)o->pk_lengths[l], c->pk_correct[l], c->pk_total[l]);
            cli_json_number(f, c->pk_total[l] ? (double)c->pk_correct[l] / c->pk_total[l] : NAN);
            fprintf(f, "}");
        }
        fprintf(f, "], \"passkey_seconds\": ");
        cli_json_number(f, c->pk_seconds);
        fprintf(f, "}");
    }
    fprintf(f, "\n  ],\n  \"checks\": [");
    for (int i = 0; i < n_checks; i++) {
        fprintf(f, "%s\n    {\"name\": ", i ? "," : "");
        cli_json_string(f, checks[i].name);
        fprintf(f, ", \"pass\": %s, \"detail\": ", checks[i].pass ? "true" : "false");
        cli_json_string(f, checks[i].detail);
        fprintf(f, "}");
    }
    fprintf(f, "%s]\n}\n", n_checks ? "\n  " : "");
    if (fclose(f) != 0) {
        fprintf(stderr, "pikv eval: cannot write '%s': %s\n", path, strerror(errno));
        return -1;
    }
    return 0;
}

/* Runs the plot script; 0, or -1 after saying why there is no plot. */
int eval_run_plot(const char *json, const char *png)
{
    char cdir[1024], py[1200];
    const char *python = getenv("PIKV_PYTHON");
    if (!python || !*python) {
        snprintf(py, sizeof py, "%s/venv/bin/python", cli_cache_dir(cdir, sizeof cdir));
        python = py;
    }
    const char *script = getenv("PIKV_EVAL_PLOT");
    if (!script || !*script) script = PIKV_EVAL_PLOT_SCRIPT;
    if (!cli_file_exists(script)) {
        fprintf(stderr, "pikv eval: no plot: the script '%s' is missing (set PIKV_EVAL_PLOT)\n",
                script);
        return -1;
    }
    if (strchr(python, '/') && access(python, X_OK) != 0) {
        fprintf(stderr, "pikv eval: no plot: no python at '%s' (set PIKV_PYTHON)\n", python);
        return -1;
    }
    char *argv[] = {(char *)python, (char *)script, (char *)json, (char *)png, NULL};
    pid_t pid;
    int e = posix_spawnp(&pid, python, NULL, NULL, argv, environ);
    if (e != 0) {
        fprintf(stderr, "pikv eval: no plot: cannot run '%s': %s\n", python, strerror(e));
        return -1;
    }
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
        fprintf(stderr, "pikv eval: no plot: '%s %s' failed (status %d; is matplotlib in that "
                        "python?)\n", python, script, WIFEXITED(status) ? WEXITSTATUS(status) : -1);
        return -1;
    }
    fprintf(stderr, "pikv eval: plot written to %s\n", png);
    return 0;
}

