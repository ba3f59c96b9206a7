/* The context: host allocator, log callback, last error, and the devices of
   every backend loaded at run time. */
#include "backend-impl.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

static void *default_alloc(void *user, size_t size, size_t align)
{
    (void)user;
    if (align < sizeof(void *)) align = sizeof(void *);
    size_t rounded = (size + align - 1) / align * align; /* aligned_alloc wants a multiple */
    if (rounded < size) return NULL;
    return aligned_alloc(align, rounded ? rounded : align);
}

static void default_free(void *user, void *ptr)
{
    (void)user;
    free(ptr);
}

void *pikv_host_alloc(pikv_context *ctx, size_t size, size_t align)
{
    if (align == 0) align = 16;
    return ctx->allocator.alloc(ctx->allocator.user, size ? size : 1, align);
}

void *pikv_host_calloc(pikv_context *ctx, size_t count, size_t size)
{
    size_t bytes;
    if (!pikv_mul_size(count, size, &bytes)) return NULL;
    void *p = pikv_host_alloc(ctx, bytes, 16);
    if (p) memset(p, 0, bytes);
    return p;
}

void pikv_host_free(pikv_context *ctx, void *ptr)
{
    if (ptr) ctx->allocator.free(ctx->allocator.user, ptr);
}

pikv_status pikv_host_reserve(pikv_context *ctx, void **arr, size_t elem, int64_t *cap,
                              int64_t need)
{
    if (need <= *cap) return PIKV_OK;
    int64_t new_cap = *cap > 0 ? *cap : 4;
    while (new_cap < need) new_cap *= 2;
    size_t bytes;
    if (!pikv_mul_size((size_t)new_cap, elem, &bytes))
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "array of %lld elements overflows size_t",
                         (long long)new_cap);
    void *p = pikv_host_alloc(ctx, bytes, 16);
    if (!p)
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "host allocation of %zu bytes failed", bytes);
    if (*arr && *cap > 0) memcpy(p, *arr, (size_t)*cap * elem);
    pikv_host_free(ctx, *arr);
    *arr = p;
    *cap = new_cap;
    return PIKV_OK;
}

pikv_context_params pikv_context_default_params(void)
{
    pikv_context_params p;
    memset(&p, 0, sizeof p);
    p.backends = "cpu";
    p.cpu_devices = 1;
    p.cpu_threads = 0;
    p.cpu_device_memory = 0;
    p.log_level = PIKV_LOG_WARN;
    return p;
}

const char *pikv_backend_name(pikv_backend_kind kind)
{
    switch (kind) {
    case PIKV_BACKEND_CPU: return "cpu";
    case PIKV_BACKEND_OPENCL: return "opencl";
    case PIKV_BACKEND_VULKAN: return "vulkan";
    case PIKV_BACKEND_CUDA: return "cuda";
    }
    return "unknown";
}

int pikv_backend_is_compiled(pikv_backend_kind kind)
{
#ifdef PIKV_HAVE_OPENCL
    if (kind == PIKV_BACKEND_OPENCL) return 1;
#endif
#ifdef PIKV_HAVE_VULKAN
    if (kind == PIKV_BACKEND_VULKAN) return 1;
#endif
#ifdef PIKV_HAVE_CUDA
    if (kind == PIKV_BACKEND_CUDA) return 1;
#endif
    return kind == PIKV_BACKEND_CPU;
}

/* The accelerator backends compiled into this build, in device order. */
static const struct {
    pikv_backend_kind kind;
    pikv_status (*init)(pikv_context *ctx, const pikv_context_params *params, pikv_backend **out);
} k_accelerators[] = {
#ifdef PIKV_HAVE_CUDA
    {PIKV_BACKEND_CUDA, pikv_backend_cuda_init},
#endif
#ifdef PIKV_HAVE_OPENCL
    {PIKV_BACKEND_OPENCL, pikv_backend_opencl_init},
#endif
#ifdef PIKV_HAVE_VULKAN
    {PIKV_BACKEND_VULKAN, pikv_backend_vulkan_init},
#endif
    {PIKV_BACKEND_CPU, NULL}, /* keeps the array non-empty; the CPU backend is loaded apart */
};

static pikv_status add_backend_devices(pikv_context *ctx, pikv_backend *b)
{
    PIKV_RETURN_ERROR_IF(ctx->n_backends >= PIKV_MAX_BACKENDS, ctx, PIKV_ERR_INTERNAL,
                         "too many backends");
    PIKV_RETURN_ERROR_IF(ctx->n_devices + b->n_devices > PIKV_MAX_DEVICES, ctx,
                         PIKV_ERR_INVALID_ARGUMENT, "%d devices exceed the limit of %d",
                         ctx->n_devices + b->n_devices, PIKV_MAX_DEVICES);
    ctx->backends[ctx->n_backends++] = b;
    for (int32_t i = 0; i < b->n_devices; i++) {
        b->devices[i]->index = ctx->n_devices;
        ctx->devices[ctx->n_devices++] = b->devices[i];
    }
    return PIKV_OK;
}

/* Which backends the comma-separated list names. The CPU backend is always
   loaded: it is the reference and runs host-side merges. */
static pikv_status parse_backends(pikv_context *ctx, const char *list, bool want[4])
{
    memset(want, 0, 4 * sizeof want[0]);
    want[PIKV_BACKEND_CPU] = true;
    if (!list || !*list) return PIKV_OK;
    const char *p = list;
    while (*p) {
        const char *end = strchr(p, ',');
        size_t len = end ? (size_t)(end - p) : strlen(p);
        bool known = false;
        if (len == 3 && !strncmp(p, "all", 3)) {
            for (int i = 0; i < 4; i++) want[i] = true;
            known = true;
        }
        for (int k = 0; k < 4 && !known; k++) {
            const char *name = pikv_backend_name((pikv_backend_kind)k);
            if (strlen(name) == len && !strncmp(p, name, len)) {
                want[k] = true;
                known = true;
            }
        }
        PIKV_RETURN_ERROR_IF(!known, ctx, PIKV_ERR_INVALID_ARGUMENT,
                             "unknown backend '%.*s' in backends \"%s\" (known: cpu, opencl, "
                             "vulkan, cuda, all)", (int)len, p, list);
        p += len;
        if (*p == ',') p++;
    }
    return PIKV_OK;
}

pikv_status pikv_context_create(const pikv_context_params *params, pikv_context **out)
{
    if (!out) return PIKV_ERR_INVALID_ARGUMENT;
    *out = NULL;
    if (!params) return PIKV_ERR_INVALID_ARGUMENT; /* no context yet to hold a message */
    pikv_context_params p = *params;
    if ((p.allocator.alloc == NULL) != (p.allocator.free == NULL))
        return PIKV_ERR_INVALID_ARGUMENT; /* no context yet to hold a message */
    if (!p.allocator.alloc) {
        p.allocator.alloc = default_alloc;
        p.allocator.free = default_free;
        p.allocator.user = NULL;
    }
    pikv_context *ctx = p.allocator.alloc(p.allocator.user, sizeof *ctx, 64);
    if (!ctx) return PIKV_ERR_OUT_OF_MEMORY;
    memset(ctx, 0, sizeof *ctx);
    ctx->allocator = p.allocator;
    ctx->default_allocator = p.allocator.alloc == default_alloc;
    ctx->log_fn = p.log_fn;
    ctx->log_user = p.log_user;
    ctx->log_level = p.log_level;

    pikv_status st = PIKV_OK;
    bool want[4];
    if (p.cpu_devices < 1 || p.cpu_devices > PIKV_MAX_DEVICES)
        st = PIKV_FAIL(ctx, PIKV_ERR_INVALID_ARGUMENT, "cpu_devices = %d is outside 1..%d",
                       p.cpu_devices, PIKV_MAX_DEVICES);
    else if (p.cpu_threads < 0 || p.cpu_threads > 1024)
        st = PIKV_FAIL(ctx, PIKV_ERR_INVALID_ARGUMENT, "cpu_threads = %d is outside 0..1024",
                       p.cpu_threads);
    else if ((unsigned)p.log_level > PIKV_LOG_DEBUG)
        st = PIKV_FAIL(ctx, PIKV_ERR_INVALID_ARGUMENT, "log_level = %d is not a pikv_log_level",
                       (int)p.log_level);
    if (st == PIKV_OK) st = parse_backends(ctx, p.backends, want);

    pikv_backend *cpu = NULL;
    if (st == PIKV_OK) st = pikv_backend_cpu_init(ctx, &p, &cpu);
    if (st == PIKV_OK) {
        st = add_backend_devices(ctx, cpu);
        if (st != PIKV_OK) cpu->iface->free(cpu);
    }
    if (st == PIKV_OK) ctx->host_device = cpu->devices[0];
    /* The accelerator backends, one registration entry each, CUDA (primary) first: a
       backend whose runtime, driver or device is missing comes back without devices. */
    for (size_t i = 0; i < sizeof k_accelerators / sizeof k_accelerators[0] && st == PIKV_OK; i++) {
        const pikv_backend_kind kind = k_accelerators[i].kind;
        if (!k_accelerators[i].init || !want[kind]) continue;
        pikv_backend *b = NULL;
        st = k_accelerators[i].init(ctx, &p, &b);
        if (st == PIKV_OK) {
            st = add_backend_devices(ctx, b);
            if (st != PIKV_OK) b->iface->free(b);
        }
        want[kind] = false;
    }
    for (int k = 1; k < 4 && st == PIKV_OK; k++) {
        /* Backends not compiled into this build contribute no devices. */
        if (want[k])
            pikv_log(ctx, PIKV_LOG_INFO, "backend %s is not compiled into this build",
                     pikv_backend_name((pikv_backend_kind)k));
    }
    if (st != PIKV_OK) {
        pikv_context_free(ctx);
        return st;
    }
    *out = ctx;
    return PIKV_OK;
}

void pikv_context_free(pikv_context *ctx)
{
    if (!ctx) return;
    for (int32_t i = ctx->n_backends - 1; i >= 0; i--) ctx->backends[i]->iface->free(ctx->backends[i]);
    pikv_allocator a = ctx->allocator;
    a.free(a.user, ctx);
}

const char *pikv_context_last_error(const pikv_context *ctx)
{
    return ctx ? ctx->last_error : "no context";
}

pikv_status pikv_context_set_log(pikv_context *ctx, pikv_log_fn fn, void *user,
                                 pikv_log_level level)
{
    if (!ctx) return PIKV_ERR_INVALID_ARGUMENT;
    PIKV_RETURN_ERROR_IF((unsigned)level > PIKV_LOG_DEBUG, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "log level %d is not a pikv_log_level", (int)level);
    ctx->log_fn = fn;
    ctx->log_user = user;
    ctx->log_level = level;
    return PIKV_OK;
}

int32_t pikv_device_count(const pikv_context *ctx)
{
    return ctx ? ctx->n_devices : 0;
}

pikv_status pikv_device_get_info(const pikv_context *ctx, int32_t device, pikv_device_info *out)
{
    if (!ctx || !out) return PIKV_ERR_INVALID_ARGUMENT;
    PIKV_RETURN_ERROR_IF(device < 0 || device >= ctx->n_devices, (pikv_context *)ctx,
                         PIKV_ERR_OUT_OF_RANGE, "device %d is outside 0..%d", device,
                         ctx->n_devices - 1);
    *out = ctx->devices[device]->info;
    return PIKV_OK;
}

pikv_status pikv_device_reserve_bytes(pikv_device *dev, uint64_t size)
{
    pikv_device_info *info = &dev->info;
    uint64_t limit = info->caps.memory_limit;
    PIKV_RETURN_ERROR_IF(limit && (size > limit || info->memory_used > limit - size), dev->ctx,
                         PIKV_ERR_OUT_OF_MEMORY,
                         "device %s: %llu more bytes would exceed its limit of %llu (in use %llu)",
                         info->name, (unsigned long long)size, (unsigned long long)limit,
                         (unsigned long long)info->memory_used);
    info->memory_used += size;
    return PIKV_OK;
}

void pikv_device_release_bytes(pikv_device *dev, uint64_t size)
{
    dev->info.memory_used -= size;
}

double pikv_monotonic_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
