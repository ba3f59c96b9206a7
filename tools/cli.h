/* Shared helpers of the `pikv` command-line program: option parsing, error
   reporting, progress on stderr, JSON output, clocks. */
#ifndef PIKV_TOOLS_CLI_H
#define PIKV_TOOLS_CLI_H

#include <stdint.h>
#include <stdio.h>

#include "pikv/pikv.h"

#define CLI_EXIT_OK 0
#define CLI_EXIT_FAIL 1   /* a library call failed, or a run did not pass */
#define CLI_EXIT_USAGE 2  /* bad command line */

/* ---- Option parsing ---------------------------------------------------- */

typedef struct cli_opt {
    const char *name;   /* "--layers"; a short alias may follow in alias */
    const char *alias;  /* "-h" or NULL */
    int has_value;
    int id;             /* > 0 */
} cli_opt;

typedef struct cli_parser {
    int argc;
    char **argv;
    int i;              /* next argv index */
    const char *cmd;    /* "pikv run", for messages */
    const char *flag;   /* the flag being handled, for messages */
} cli_parser;

#define CLI_OPT_END 0
#define CLI_OPT_ERROR (-1)

void cli_parser_init(cli_parser *p, const char *cmd, int argc, char **argv, int first);

/*
 * Returns the id of the next option (setting *value for options with a value;
 * "--name value" and "--name=value" are both accepted), CLI_OPT_END when the
 * arguments are exhausted, or CLI_OPT_ERROR after printing a message (unknown
 * option, missing value, unexpected argument): the caller exits with
 * CLI_EXIT_USAGE.
 */
int cli_next_opt(cli_parser *p, const cli_opt *opts, const char **value);

/* Value parsers: 0 on success; otherwise print "<cmd>: invalid value '<v>' for
   <flag>: <what was expected>" and return -1. */
int cli_parse_i64(const cli_parser *p, const char *value, int64_t min, int64_t max,
                  int64_t *out);
int cli_parse_i32(const cli_parser *p, const char *value, int32_t min, int32_t max,
                  int32_t *out);
int cli_parse_u64(const cli_parser *p, const char *value, uint64_t *out);
/* A byte count: a decimal integer with an optional binary suffix K, M, G or T (KiB,
   MiB, GiB, TiB; "64M" = 64 MiB). */
int cli_parse_bytes(const cli_parser *p, const char *value, uint64_t *out);
/* A finite decimal number in [min, max]. */
int cli_parse_double(const cli_parser *p, const char *value, double min, double max,
                     double *out);
/* n comma-separated finite numbers, each in [min, max] ("0.6,0.2,0.2"). */
int cli_parse_doubles(const cli_parser *p, const char *value, int n, double min, double max,
                      double *out);
/* choices: NULL-terminated; *out gets the index. */
int cli_parse_choice(const cli_parser *p, const char *value, const char *const *choices,
                     int *out);

/* Prints "<cmd>: <message>" to stderr (usage errors that span flags). */
void cli_usage_error(const char *cmd, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;

/* ---- Errors ------------------------------------------------------------ */

/* Prints "pikv: <fn>: <status name>: <last error>" and returns CLI_EXIT_FAIL. */
int cli_lib_error(const pikv_context *ctx, const char *fn, pikv_status status);
/* What starts the messages of cli_lib_error and cli_log: "pikv" by default, "pikv[rank
   2]" over MPI ranks. */
void cli_set_message_prefix(const char *prefix);

/* Which library log messages cli_log prints. Error-level messages repeat what a
   failing call's status and last error say, so they are shown only when verbose. */
typedef struct cli_log_filter {
    pikv_log_level max_level;   /* the most verbose level printed */
    int errors;                 /* print error-level messages too */
} cli_log_filter;

/* Fills a filter and returns the level to give the context. */
pikv_log_level cli_log_filter_init(cli_log_filter *f, int verbose, int quiet);

/* A log callback that prints library messages to stderr; user: a cli_log_filter or
   NULL (print everything). */
void cli_log(pikv_log_level level, const char *message, void *user);

/* ---- Progress on stderr ------------------------------------------------ */

typedef struct cli_progress {
    int mode;           /* 0 off, 1 tty (rewritten line), 2 coarse (a line every few s) */
    double last;        /* time of the last line (coarse mode) */
    int line_len;       /* length of the visible line (tty mode) */
} cli_progress;

void cli_progress_init(cli_progress *pr, int enabled);
void cli_progress_update(cli_progress *pr, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
/* Clears the tty line. */
void cli_progress_done(cli_progress *pr);

/* ---- Misc -------------------------------------------------------------- */

/* Monotonic seconds. */
double cli_now(void);

/* JSON string with escapes, in quotes. */
void cli_json_string(FILE *f, const char *s);
/* A number, or null when not finite. */
void cli_json_number(FILE *f, double x);

/* "12.0 GiB", "512 B"... into buf. */
const char *cli_format_bytes(uint64_t bytes, char *buf, size_t size);

/* Where tools/setup-model.sh caches the model, venv and corpus: $PIKV_CACHE, or
   ~/.cache/pikv. */
const char *cli_cache_dir(char *buf, size_t cap);
/* 1 when path names a regular file. */
int cli_file_exists(const char *path);

/* The CPU's model name from /proc/cpuinfo ("unknown" elsewhere), for reports. */
void cli_cpu_model(char *buf, size_t cap);

/* Case-insensitive ASCII string equality. */
int cli_streq_nocase(const char *a, const char *b);

/* Subcommands. */
int cli_cmd_devices(int argc, char **argv);
int cli_cmd_run(int argc, char **argv);
int cli_cmd_generate(int argc, char **argv);
int cli_cmd_demo(int argc, char **argv);
int cli_cmd_eval(int argc, char **argv);
int cli_cmd_bench(int argc, char **argv); /* bench/cmd_bench.c */

#endif /* PIKV_TOOLS_CLI_H */
