/* Page-pool chunks (about 1 MiB each) carved out of 32 MiB slabs backed by
 * transparent huge pages where the OS offers them (madvise). Attention reads
 * each KV head's rows of a page as a few KiB far from the previous page's:
 * with 4 KiB pages nearly every such block is a TLB miss (measured: dense f16
 * decode at 32K tokens went from ~19 to ~30 GB/s with huge pages).
 * Only with the default allocator: a caller's allocator sees every chunk as its
 * own allocation (its accounting stays exact), as does AddressSanitizer. Other
 * sizes come straight from the context's allocator. */
#define _DEFAULT_SOURCE 1
#include "cpu-impl.h"

#include <pthread.h>
#include <string.h>
#include <sys/mman.h>

#if defined(__SANITIZE_ADDRESS__)
#define PIKV_ARENA_OFF 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define PIKV_ARENA_OFF 1
#endif
#endif

enum {
    SLAB_BYTES = 32 << 20,
    HUGE = 2 << 20,
    MIN_BUF = 256 << 10,
    MAX_BUF = 4 << 20,
    MAX_SLOTS = SLAB_BYTES / MIN_BUF,
};

struct pikv_cpu_slab {
    struct pikv_cpu_slab *next;
    void *raw;             /* from the context's allocator */
    unsigned char *base;   /* raw rounded up to 2 MiB */
    size_t buf_size;
    int32_t n_slots, used;
    unsigned char busy[MAX_SLOTS];
};

#ifndef PIKV_ARENA_OFF
static pthread_mutex_t arena_mutex = PTHREAD_MUTEX_INITIALIZER;
#endif

void *pikv_cpu_arena_alloc(pikv_context *ctx, pikv_cpu_backend *cb, size_t size)
{
#ifndef PIKV_ARENA_OFF
    if (ctx->default_allocator && size >= MIN_BUF && size <= MAX_BUF) {
        pthread_mutex_lock(&arena_mutex);
        pikv_cpu_slab *s = cb->slabs;
        while (s && (s->buf_size != size || s->used == s->n_slots)) s = s->next;
        if (!s) {
            s = pikv_host_calloc(ctx, 1, sizeof *s);
            void *raw = s ? pikv_host_alloc(ctx, (size_t)SLAB_BYTES + HUGE, 4096) : NULL;
            if (!raw) {
                pikv_host_free(ctx, s);
                pthread_mutex_unlock(&arena_mutex);
                return NULL;
            }
            s->raw = raw;
            s->base = (unsigned char *)(((uintptr_t)raw + HUGE - 1) & ~(uintptr_t)(HUGE - 1));
#ifdef MADV_HUGEPAGE
            (void)madvise(s->base, SLAB_BYTES, MADV_HUGEPAGE); /* a hint: fine if refused */
#endif
            s->buf_size = size;
            s->n_slots = (int32_t)(SLAB_BYTES / size);
            s->next = cb->slabs;
            cb->slabs = s;
        }
        int32_t i = 0;
        while (s->busy[i]) i++;
        s->busy[i] = 1;
        s->used++;
        pthread_mutex_unlock(&arena_mutex);
        return s->base + (size_t)i * size;
    }
#endif
    (void)cb;
    return pikv_host_alloc(ctx, size, 64);
}

void pikv_cpu_arena_free(pikv_context *ctx, pikv_cpu_backend *cb, void *ptr, size_t size)
{
    if (!ptr) return;
#ifndef PIKV_ARENA_OFF
    if (ctx->default_allocator && size >= MIN_BUF && size <= MAX_BUF) {
        pthread_mutex_lock(&arena_mutex);
        for (pikv_cpu_slab **at = &cb->slabs; *at; at = &(*at)->next) {
            pikv_cpu_slab *s = *at;
            const unsigned char *p = ptr;
            if (s->buf_size != size || p < s->base || p >= s->base + (size_t)s->n_slots * size) continue;
            s->busy[(size_t)(p - s->base) / size] = 0;
            if (--s->used == 0) { /* the slab's memory goes back */
                *at = s->next;
                pikv_host_free(ctx, s->raw);
                pikv_host_free(ctx, s);
            }
            pthread_mutex_unlock(&arena_mutex);
            return;
        }
        pthread_mutex_unlock(&arena_mutex);
    }
#endif
    (void)cb;
    (void)size;
    pikv_host_free(ctx, ptr);
}

void pikv_cpu_arena_release(pikv_context *ctx, pikv_cpu_backend *cb)
{
    while (cb->slabs) { /* only slabs of buffers never freed */
        pikv_cpu_slab *s = cb->slabs;
        cb->slabs = s->next;
        pikv_host_free(ctx, s->raw);
        pikv_host_free(ctx, s);
    }
}
