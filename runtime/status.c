/* Status names and messages, the version query, error recording and logging. */
#include "pikv-impl.h"

#include <stdio.h>
#include <string.h>

unsigned pikv_version_number(void) { return PIKV_VERSION_NUMBER; }
const char *pikv_version_string(void) { return PIKV_VERSION_STRING; }

static const struct {
    const char *name;
    const char *text;
} status_table[PIKV_STATUS_COUNT_] = {
    [PIKV_OK] = {"PIKV_OK", "success"},
    [PIKV_ERR_INVALID_ARGUMENT] = {"PIKV_ERR_INVALID_ARGUMENT", "invalid argument"},
    [PIKV_ERR_OUT_OF_RANGE] = {"PIKV_ERR_OUT_OF_RANGE", "index out of range"},
    [PIKV_ERR_OUT_OF_MEMORY] = {"PIKV_ERR_OUT_OF_MEMORY", "out of memory"},
    [PIKV_ERR_CAPACITY] = {"PIKV_ERR_CAPACITY", "cache capacity exceeded"},
    [PIKV_ERR_NOT_FOUND] = {"PIKV_ERR_NOT_FOUND", "no such object"},
    [PIKV_ERR_EXISTS] = {"PIKV_ERR_EXISTS", "object already exists"},
    [PIKV_ERR_UNSUPPORTED] = {"PIKV_ERR_UNSUPPORTED", "operation not supported"},
    [PIKV_ERR_BACKEND] = {"PIKV_ERR_BACKEND", "backend failure"},
    [PIKV_ERR_INTERNAL] = {"PIKV_ERR_INTERNAL", "internal error"},
};

const char *pikv_status_name(pikv_status status)
{
    if ((unsigned)status >= PIKV_STATUS_COUNT_) return "PIKV_ERR_UNKNOWN";
    return status_table[status].name;
}

const char *pikv_status_string(pikv_status status)
{
    if ((unsigned)status >= PIKV_STATUS_COUNT_) return "unknown status";
    return status_table[status].text;
}

static void log_va(pikv_context *ctx, pikv_log_level level, const char *fmt, va_list ap)
{
    if (!ctx || !ctx->log_fn || level > ctx->log_level) return;
    char msg[PIKV_ERROR_LEN];
    vsnprintf(msg, sizeof msg, fmt, ap);
    ctx->log_fn(level, msg, ctx->log_user);
}

void pikv_log(pikv_context *ctx, pikv_log_level level, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    log_va(ctx, level, fmt, ap);
    va_end(ap);
}

pikv_status pikv_fail(pikv_context *ctx, pikv_status status, const char *file, int line,
                      const char *fmt, ...)
{
    if (!ctx) return status;
    /* best-effort work after a call succeeded (pikv_context.best_effort): the failure is
       only logged as a warning and the last error stays that of the last failed call */
    char spare[PIKV_ERROR_LEN];
    char *msg = ctx->best_effort > 0 ? spare : ctx->last_error;
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(msg, PIKV_ERROR_LEN, fmt, ap);
    va_end(ap);
#ifndef NDEBUG
    /* Debug builds say where the failure was raised. */
    if (n >= 0 && (size_t)n < PIKV_ERROR_LEN) {
        const char *base = strrchr(file, '/');
        snprintf(msg + n, PIKV_ERROR_LEN - (size_t)n, " [%s:%d]", base ? base + 1 : file, line);
    }
#else
    (void)file;
    (void)line;
    (void)n;
#endif
    if (ctx->best_effort > 0)
        pikv_log(ctx, PIKV_LOG_WARN, "%s (ignored: best-effort work after a successful call): %s",
                 pikv_status_name(status), msg);
    else if (ctx->log_fn && ctx->log_level >= PIKV_LOG_ERROR)
        pikv_log(ctx, PIKV_LOG_ERROR, "%s: %s", pikv_status_name(status), ctx->last_error);
    return status;
}
