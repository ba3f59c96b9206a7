/*
 * Private runtime declarations shared by the runtime and the backends:
 * the context, error reporting, host allocation helpers.
 */
#ifndef PIKV_IMPL_H
#define PIKV_IMPL_H

#include "pikv/pikv.h"

#include <stdarg.h>
#include <stdbool.h>

#define PIKV_MAX_DEVICES 64
#define PIKV_MAX_BACKENDS 4
#define PIKV_ERROR_LEN 512

struct pikv_backend;
struct pikv_device;

struct pikv_context {
    pikv_allocator allocator;
    bool default_allocator; /* the C library's (none given): backends may pool large blocks */
    pikv_log_fn log_fn;
    void *log_user;
    pikv_log_level log_level;
    char last_error[PIKV_ERROR_LEN];

    int32_t n_backends;
    struct pikv_backend *backends[PIKV_MAX_BACKENDS];
    int32_t n_devices;
    struct pikv_device *devices[PIKV_MAX_DEVICES];
    /* The CPU device that runs host-side ops (cross-device merges). Always present:
       the CPU backend is the reference and is always loaded. */
    struct pikv_device *host_device;
    /* > 0 while the runtime does best-effort work after a call has succeeded (promotions
       and prefetches after an attend): failures there are logged as warnings and do not
       replace last_error */
    int32_t best_effort;
};

/* ---- errors --------------------------------------------------------------
 * Every failure goes through pikv_fail(): it records the message as the
 * context's last error (with file:line in debug builds), logs it, and returns
 * the status, so call sites read `return PIKV_FAIL(ctx, STATUS, "fmt", ...)`. */
#if defined(__GNUC__)
#define PIKV_PRINTF(a, b) __attribute__((format(printf, a, b)))
#else
#define PIKV_PRINTF(a, b)
#endif

pikv_status pikv_fail(pikv_context *ctx, pikv_status status, const char *file, int line,
                      const char *fmt, ...) PIKV_PRINTF(5, 6);
void pikv_log(pikv_context *ctx, pikv_log_level level, const char *fmt, ...) PIKV_PRINTF(3, 4);

#define PIKV_FAIL(ctx, status, ...) pikv_fail((ctx), (status), __FILE__, __LINE__, __VA_ARGS__)

/* Return a failure when cond holds. */
#define PIKV_RETURN_ERROR_IF(cond, ctx, status, ...)                         \
    do {                                                                     \
        if (cond) return pikv_fail((ctx), (status), __FILE__, __LINE__, __VA_ARGS__); \
    } while (0)

/* Propagate a non-OK status (the callee already recorded the message). */
#define PIKV_FORWARD_IF_ERROR(expr)                                          \
    do {                                                                     \
        pikv_status pikv_fwd_st_ = (expr);                                   \
        if (pikv_fwd_st_ != PIKV_OK) return pikv_fwd_st_;                    \
    } while (0)

/* Seconds of CLOCK_MONOTONIC (context.c): every duration the library reports. */
double pikv_monotonic_s(void);

/* ---- host memory through the context's allocator ----------------------- */
void *pikv_host_alloc(pikv_context *ctx, size_t size, size_t align);
void *pikv_host_calloc(pikv_context *ctx, size_t count, size_t size);
void pikv_host_free(pikv_context *ctx, void *ptr);
/* Grow *arr (elem bytes each) to hold at least need elements; keeps contents.
   On failure *arr and *cap are untouched. */
pikv_status pikv_host_reserve(pikv_context *ctx, void **arr, size_t elem, int64_t *cap,
                              int64_t need);

/* Overflow-checked size arithmetic: returns false on overflow. */
static inline bool pikv_mul_size(size_t a, size_t b, size_t *out)
{
    if (a != 0 && b > SIZE_MAX / a) return false;
    *out = a * b;
    return true;
}

#endif /* PIKV_IMPL_H */
