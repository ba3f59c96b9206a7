/* Shared helpers of the `pikv` command-line program; see cli.h. */
#define _POSIX_C_SOURCE 200809L

#include "cli.h"

#include <ctype.h>
#include <errno.h>
#include <limits.h>
#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <sys/stat.h>
#include <unistd.h>

/* ---- Option parsing ---------------------------------------------------- */

void cli_parser_init(cli_parser *p, const char *cmd, int argc, char **argv, int first)
{
    p->argc = argc;
    p->argv = argv;
    p->i = first;
    p->cmd = cmd;
    p->flag = "";
}

void cli_usage_error(const char *cmd, const char *fmt, ...)
{
    va_list ap;
    fprintf(stderr, "%s: ", cmd);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
}

int cli_next_opt(cli_parser *p, const cli_opt *opts, const char **value)
{
    *value = NULL;
    if (p->i >= p->argc) return CLI_OPT_END;
    const char *arg = p->argv[p->i++];
    if (arg[0] != '-' || arg[1] == '\0') {
        cli_usage_error(p->cmd, "unexpected argument '%s' (see '%s --help')", arg, p->cmd);
        return CLI_OPT_ERROR;
    }
    const char *eq = strchr(arg, '=');
    size_t name_len = eq ? (size_t)(eq - arg) : strlen(arg);
    for (const cli_opt *o = opts; o->name; o++) {
        int hit = (strlen(o->name) == name_len && strncmp(o->name, arg, name_len) == 0) ||
                  (o->alias && strlen(o->alias) == name_len &&
                   strncmp(o->alias, arg, name_len) == 0);
        if (!hit) continue;
        p->flag = o->name;
        if (!o->has_value) {
            if (eq) {
                cli_usage_error(p->cmd, "option %s takes no value (got '%s')", o->name, arg);
                return CLI_OPT_ERROR;
            }
            return o->id;
        }
        if (eq) {
            *value = eq + 1;
        } else if (p->i < p->argc) {
            *value = p->argv[p->i++];
        } else {
            cli_usage_error(p->cmd, "option %s needs a value (see '%s --help')", o->name,
                            p->cmd);
            return CLI_OPT_ERROR;
        }
        return o->id;
    }
    cli_usage_error(p->cmd, "unknown option '%.*s' (see '%s --help')", (int)name_len, arg,
                    p->cmd);
    return CLI_OPT_ERROR;
}

int cli_parse_i64(const cli_parser *p, const char *value, int64_t min, int64_t max,
                  int64_t *out)
{
    char *end = NULL;
    errno = 0;
    long long x = 0;
    int ok = value && *value && !isspace((unsigned char)*value);
    if (ok) {
        x = strtoll(value, &end, 10);
        ok = errno == 0 && end && *end == '\0';
    }
    if (!ok || x < min || x > max) {
        cli_usage_error(p->cmd, "invalid value '%s' for %s: expected an integer in [%" PRId64
                                ", %" PRId64 "]",
                        value ? value : "", p->flag, min, max);
        return -1;
    }
    *out = (int64_t)x;
    return 0;
}

int cli_parse_i32(const cli_parser *p, const char *value, int32_t min, int32_t max,
                  int32_t *out)
{
    int64_t x;
    if (cli_parse_i64(p, value, min, max, &x) != 0) return -1;
    *out = (int32_t)x;
    return 0;
}

int cli_parse_u64(const cli_parser *p, const char *value, uint64_t *out)
{
    char *end = NULL;
    errno = 0;
    int ok = value && *value && isdigit((unsigned char)*value);
    unsigned long long x = 0;
    if (ok) {
        int hex = value[0] == '0' && (value[1] == 'x' || value[1] == 'X');
        x = strtoull(value, &end, hex ? 16 : 10);
        ok = errno == 0 && end && *end == '\0';
    }
    if (!ok) {
        cli_usage_error(p->cmd,
                        "invalid value '%s' for %s: expected an unsigned 64-bit integer",
                        value ? value : "", p->flag);
        return -1;
    }
    *out = (uint64_t)x;
    return 0;
}

int cli_parse_bytes(const cli_parser *p, const char *value, uint64_t *out)
{
    char *end = NULL;
    errno = 0;
    int ok = value && *value && isdigit((unsigned char)*value);
    unsigned long long x = 0;
    if (ok) {
        x = strtoull(value, &end, 10);
        ok = errno == 0 && end;
    }
    int shift = 0;
    if (ok && *end) {
        static const char units[] = "KMGT";
        const char *u = strchr(units, toupper((unsigned char)*end));
        ok = u != NULL && *u != '\0';
        if (ok) shift = 10 * (int)(u - units + 1);
        end++;
        if (ok && (*end == 'i' || *end == 'I')) end++; /* KiB, MiB, ... */
        if (ok && (*end == 'b' || *end == 'B')) end++;
        ok = ok && *end == '\0' && x <= (ULLONG_MAX >> shift);
    }
    if (!ok) {
        cli_usage_error(p->cmd,
                        "invalid value '%s' for %s: expected a byte count (an integer, optionally "
                        "with K, M, G or T for KiB, MiB, GiB, TiB)",
                        value ? value : "", p->flag);
        return -1;
    }
    *out = (uint64_t)x << shift;
    return 0;
}

/* One number from s up to a terminator in stop ("" = end of string); NULL if invalid. */
static const char *parse_one_double(const char *s, char stop, double *out)
{
    if (!s || !*s || isspace((unsigned char)*s)) return NULL;
    char *end = NULL;
    errno = 0;
    double x = strtod(s, &end);
    if (errno != 0 || end == s || !isfinite(x)) return NULL;
    if (*end != stop) return NULL;
    *out = x;
    return end;
}

int cli_parse_double(const cli_parser *p, const char *value, double min, double max,
                     double *out)
{
    double x = 0.0;
    if (!parse_one_double(value, '\0', &x) || x < min || x > max) {
        cli_usage_error(p->cmd, "invalid value '%s' for %s: expected a number in [%g, %g]",
                        value ? value : "", p->flag, min, max);
        return -1;
    }
    *out = x;
    return 0;
}

int cli_parse_doubles(const cli_parser *p, const char *value, int n, double min, double max,
                      double *out)
{
    const char *s = value;
    int ok = s != NULL;
    for (int i = 0; ok && i < n; i++) {
        double x = 0.0;
        const char *end = parse_one_double(s, i + 1 < n ? ',' : '\0', &x);
        ok = end && x >= min && x <= max;
        if (ok) {
            out[i] = x;
            s = end + 1;
        }
    }
    if (!ok) {
        cli_usage_error(p->cmd, "invalid value '%s' for %s: expected %d comma-separated numbers "
                                "in [%g, %g]",
                        value ? value : "", p->flag, n, min, max);
        return -1;
    }
    return 0;
}

int cli_parse_choice(const cli_parser *p, const char *value, const char *const *choices,
                     int *out)
{
    for (int i = 0; choices[i]; i++) {
        if (value && cli_streq_nocase(value, choices[i])) {
            *out = i;
            return 0;
        }
    }
    fprintf(stderr, "%s: invalid value '%s' for %s: expected one of ", p->cmd,
            value ? value : "", p->flag);
    for (int i = 0; choices[i]; i++) fprintf(stderr, "%s%s", i ? "|" : "", choices[i]);
    fputc('\n', stderr);
    return -1;
}

int cli_streq_nocase(const char *a, const char *b)
{
    while (*a && *b) {
        if (tolower((unsigned char)*a) != tolower((unsigned char)*b)) return 0;
        a++;
        b++;
    }
    return *a == *b;
}

/* ---- Errors ------------------------------------------------------------ */

static char msg_prefix[32] = "pikv";

void cli_set_message_prefix(const char *prefix)
{
    snprintf(msg_prefix, sizeof msg_prefix, "%s", prefix && *prefix ? prefix : "pikv");
}

int cli_lib_error(const pikv_context *ctx, const char *fn, pikv_status status)
{
    const char *msg = ctx ? pikv_context_last_error(ctx) : NULL;
    if (!msg || !*msg) msg = pikv_status_string(status);
    fprintf(stderr, "%s: %s: %s: %s\n", msg_prefix, fn, pikv_status_name(status), msg);
    return CLI_EXIT_FAIL;
}

pikv_log_level cli_log_filter_init(cli_log_filter *f, int verbose, int quiet)
{
    f->max_level = verbose ? PIKV_LOG_INFO : (quiet ? PIKV_LOG_ERROR : PIKV_LOG_WARN);
    f->errors = verbose;
    return f->max_level;
}

void cli_log(pikv_log_level level, const char *message, void *user)
{
    const cli_log_filter *filter = user;
    if (filter && (level > filter->max_level || (level == PIKV_LOG_ERROR && !filter->errors)))
        return;
    static const char *const names[] = {"error", "warning", "info", "debug"};
    const char *name = (level >= PIKV_LOG_ERROR && level <= PIKV_LOG_DEBUG)
                           ? names[level]
                           : "log";
    fprintf(stderr, "%s: library %s: %s\n", msg_prefix, name, message ? message : "");
}

/* ---- Progress ---------------------------------------------------------- */

#define COARSE_INTERVAL_S 10.0

void cli_progress_init(cli_progress *pr, int enabled)
{
    pr->mode = !enabled ? 0 : (isatty(STDERR_FILENO) ? 1 : 2);
    pr->last = cli_now();
    pr->line_len = 0;
}

void cli_progress_update(cli_progress *pr, const char *fmt, ...)
{
    if (pr->mode == 0) return;
    char line[160];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n >= (int)sizeof line) n = (int)sizeof line - 1;
    if (pr->mode == 1) {
        int pad = pr->line_len > n ? pr->line_len - n : 0;
        fprintf(stderr, "\r%s%*s", line, pad, "");
        if (pad) fprintf(stderr, "\r%s", line);
        pr->line_len = n;
        fflush(stderr);
    } else {
        double now = cli_now();
        if (now - pr->last < COARSE_INTERVAL_S) return;
        pr->last = now;
        fprintf(stderr, "%s\n", line);
    }
}

void cli_progress_done(cli_progress *pr)
{
    if (pr->mode == 1 && pr->line_len > 0) {
        fprintf(stderr, "\r%*s\r", pr->line_len, "");
        fflush(stderr);
        pr->line_len = 0;
    }
}

/* ---- Misc -------------------------------------------------------------- */

double cli_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

void cli_json_string(FILE *f, const char *s)
{
    fputc('"', f);
    for (const unsigned char *c = (const unsigned char *)(s ? s : ""); *c; c++) {
        switch (*c) {
        case '"': fputs("\\\"", f); break;
        case '\\': fputs("\\\\", f); break;
        case '\b': fputs("\\b", f); break;
        case '\f': fputs("\\f", f); break;
        case '\n': fputs("\\n", f); break;
        case '\r': fputs("\\r", f); break;
        case '\t': fputs("\\t", f); break;
        default:
            if (*c < 0x20 || *c == 0x7f) {
                fprintf(f, "\\u%04x", (unsigned)*c);
            } else if (*c < 0x80) {
                fputc(*c, f);
            } else {
                /* Copy a well-formed UTF-8 sequence; replace a stray byte. */
                int n = (*c & 0xE0) == 0xC0 ? 1 : (*c & 0xF0) == 0xE0 ? 2
                                              : (*c & 0xF8) == 0xF0 ? 3 : -1;
                int ok = n > 0 && *c >= 0xC2 && *c <= 0xF4;
                for (int j = 1; ok && j <= n; j++) ok = (c[j] & 0xC0) == 0x80;
                if (ok) {
                    fwrite(c, 1, (size_t)n + 1, f);
                    c += n;
                } else {
                    fputs("\\ufffd", f);
                }
            }
        }
    }
    fputc('"', f);
}

void cli_json_number(FILE *f, double x)
{
    if (isfinite(x))
        fprintf(f, "%.9g", x);
    else
        fputs("null", f);
}

const char *cli_format_bytes(uint64_t bytes, char *buf, size_t size)
{
    static const char *const units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
    if (bytes < 1024) {
        snprintf(buf, size, "%" PRIu64 " B", bytes);
        return buf;
    }
    double x = (double)bytes;
    int u = 0;
    while (x >= 1024.0 && u < 5) {
        x /= 1024.0;
        u++;
    }
    snprintf(buf, size, "%.1f %s", x, units[u]);
    return buf;
}

const char *cli_cache_dir(char *buf, size_t cap)
{
    const char *c = getenv("PIKV_CACHE");
    if (c && *c) {
        snprintf(buf, cap, "%s", c);
    } else {
        const char *h = getenv("HOME");
        snprintf(buf, cap, "%s/.cache/pikv", h && *h ? h : ".");
    }
    return buf;
}

int cli_file_exists(const char *path)
{
    struct stat st;
    return path && stat(path, &st) == 0 && S_ISREG(st.st_mode);
}

void cli_cpu_model(char *buf, size_t cap)
{
    snprintf(buf, cap, "unknown");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "model name", 10) == 0) {
            char *p = strchr(line, ':');
            if (p) {
                p++;
                while (*p == ' ' || *p == '\t') p++;
                p[strcspn(p, "\n")] = 0;
                snprintf(buf, cap, "%s", p);
            }
            break;
        }
    }
    fclose(f);
}
