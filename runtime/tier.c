/* Memory tiers: where a page's bytes are (docs/tiers.md).
 *
 * A page lives in a slot of its device's pool (the device tier), or, with tiers on,
 * is demoted: its bytes in the host tier (chunks of host memory, optionally bound to a
 * NUMA node) or in the disk tier (a file of fixed-size slots), and its Quest bounds in
 * the bounds pool (host memory the CPU score op reads), so selection still scores it.
 * Only full pages are demoted; they have the "tier layout": the quantized layout in an
 * INT8/INT4 cache (a full page there is always quantized), else the float layout.
 *
 * An attend reads demoted pages through staging slots of the device's pool: the
 * attention over the resident pages runs while an I/O thread reads the disk pages,
 * then the fetched pages go to staging slots in rounds, and all partials are merged
 * exactly (LSE merge). Afterwards pages that earned it are promoted, and the pages the
 * next layer read at its last attend are prefetched from disk to the host tier.
 *
 * Threads: every piece of metadata is the calling thread's. The I/O thread only runs
 * pread() into buffers it is handed (fetch buffers, host tier slots of prefetches) and
 * never allocates; pikv_tier_drain() ends the prefetches before anything else touches
 * the tiers.
 */
#define _GNU_SOURCE /* O_TMPFILE */
#include "select.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifdef PIKV_HAVE_NUMA
#include <numa.h>
#endif

#define IO_RING 256

typedef struct io_req {
    int fd;
    uint64_t offset;
    unsigned char *buf;
    uint64_t size;
    int *err;                 /* 0 or the errno of the read, written by the I/O thread */
    const unsigned char *src; /* non-NULL: a copy from host memory (into a host-visible slot) */
} io_req;

typedef struct host_tier {
    unsigned char **chunks;
    int64_t chunks_cap;
    int32_t n_chunks;
    uint32_t per_chunk;
    uint64_t chunk_bytes;
    uint32_t *free_slots;
    int64_t free_cap, n_free;
    int64_t used, cap_pages; /* cap_pages: INT64_MAX without host_bytes */
} host_tier;

typedef struct disk_tier {
    int fd; /* -1: no disk tier */
    char path[560];
    int64_t n_slots; /* slots handed out so far: the file's length in slots */
    uint32_t *free_slots;
    int64_t free_cap, n_free;
    int64_t used, cap_pages;
} disk_tier;

/* A staging slot: a slot of the device's pool of full pages, and the page whose bytes it
   holds (full pages never change, so it stays valid until the page is freed). */
typedef struct staging_slot {
    uint32_t slot;
    uint32_t tag;       /* 1 + the page id whose bytes it holds; 0 = none */
    uint8_t prefetched; /* a prefetch put them there (its first fetch is a hit) */
} staging_slot;

typedef struct prefetch_rec {
    uint32_t id;
    uint32_t host_slot;
    int err;
} prefetch_rec;

struct pikv_tier_state {
    pikv_tier_params p;
    char disk_dir[512];
    const pikv_page_layout *L; /* layout of demoted pages */
    int32_t quant;             /* demoted pages live in the quantized pools */
    host_tier host;
    disk_tier disk;
    int32_t numa_node;
    pikv_page_layout bounds_layout;
    pikv_page_pool bounds;
    /* staging slots per device (in the pool of the tier layout) */
    int64_t staging_n[PIKV_MAX_DEVICES]; /* fixed with a device budget; else 0 = automatic */
    staging_slot *staging[PIKV_MAX_DEVICES];
    int64_t staging_held[PIKV_MAX_DEVICES], staging_cap[PIKV_MAX_DEVICES];
    unsigned char *one_page; /* scratch of one page (disk promotion) */
    /* I/O thread */
    pthread_t thread;
    bool thread_started, stop;
    pthread_mutex_t mu;
    pthread_cond_t cv_work, cv_done;
    io_req ring[IO_RING];
    int64_t submitted, completed;
    prefetch_rec *pending;
    int64_t n_pending, pending_cap;
    int64_t stage_seq; /* the last staging copy queued by prefetch (0: none in flight) */
    int copy_err;      /* written by copies (which cannot fail) */
    /* pages the last attend fetched, with their use clock before it (promotion) */
    uint32_t *fetched;
    int64_t *fetched_prev;
    int64_t n_fetched, fetched_cap;
    /* statistics */
    int64_t demotions, promotions, fetches, prefetches, prefetch_hits, last_fetches;
    double fetch_stall_s, last_fetch_stall_s;
    uint64_t disk_read, disk_written;
    int64_t disk_copies; /* disk slots still held by host pages (pikv_page_meta.disk_copy) */
};


/* ---- file I/O: whole transfers, EINTR retried --------------------------------------- */

static int pread_full(int fd, unsigned char *buf, uint64_t size, uint64_t offset)
{
    while (size > 0) {
        const ssize_t n = pread(fd, buf, (size_t)size, (off_t)offset);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return errno;
        if (n == 0) return EIO; /* the file is shorter than the slot: never written */
        buf += n, size -= (uint64_t)n, offset += (uint64_t)n;
    }
    return 0;
}

static int pwrite_full(int fd, const unsigned char *buf, uint64_t size, uint64_t offset)
{
    while (size > 0) {
        const ssize_t n = pwrite(fd, buf, (size_t)size, (off_t)offset);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) return errno;
        if (n == 0) return ENOSPC;
        buf += n, size -= (uint64_t)n, offset += (uint64_t)n;
    }
    return 0;
}

static pikv_status disk_error(pikv_cache *c, const char *fn, const char *what, int err)
{
    const pikv_status st = err == ENOSPC || err == EDQUOT || err == EFBIG ? PIKV_ERR_CAPACITY : PIKV_ERR_BACKEND;
    return PIKV_FAIL(c->ctx, st, "%s: disk tier %s of %s failed: %s", fn, what, c->tier->disk.path, strerror(err));
}

/* ---- the I/O thread ------------------------------------------------------------------- */

static void *io_main(void *arg)
{
    struct pikv_tier_state *t = arg;
    pthread_mutex_lock(&t->mu);
    for (;;) {
        while (!t->stop && t->completed == t->submitted) pthread_cond_wait(&t->cv_work, &t->mu);
        if (t->completed == t->submitted) break; /* stop, nothing left */
        const io_req r = t->ring[t->completed % IO_RING];
        pthread_mutex_unlock(&t->mu);
        int err = 0;
        if (r.src) memcpy(r.buf, r.src, (size_t)r.size);
        else err = pread_full(r.fd, r.buf, r.size, r.offset);
        pthread_mutex_lock(&t->mu);
        *r.err = err;
        t->completed++;
        pthread_cond_broadcast(&t->cv_done);
    }
    pthread_mutex_unlock(&t->mu);
    return NULL;
}

static pikv_status io_start(pikv_cache *c, const char *fn)
{
    struct pikv_tier_state *t = c->tier;
    if (t->thread_started) return PIKV_OK;
    const int err = pthread_create(&t->thread, NULL, io_main, t);
    PIKV_RETURN_ERROR_IF(err != 0, c->ctx, PIKV_ERR_BACKEND, "%s: tier I/O thread: pthread_create failed: %s", fn,
                         strerror(err));
    t->thread_started = true;
    return PIKV_OK;
}

/* Queues a read; returns its number (io_wait waits for it). The thread must run. */
static int64_t io_submit(struct pikv_tier_state *t, uint64_t offset, unsigned char *buf, uint64_t size, int *err)
{
    pthread_mutex_lock(&t->mu);
    while (t->submitted - t->completed >= IO_RING) pthread_cond_wait(&t->cv_done, &t->mu);
    *err = 0;
    t->ring[t->submitted % IO_RING] = (io_req){t->disk.fd, offset, buf, size, err, NULL};
    const int64_t seq = ++t->submitted;
    pthread_cond_signal(&t->cv_work);
    pthread_mutex_unlock(&t->mu);
    return seq;
}

/* Queues a copy of host memory into a host-visible staging slot; returns its number. */
static int64_t io_submit_copy(struct pikv_tier_state *t, unsigned char *dst, const unsigned char *src, uint64_t size)
{
    pthread_mutex_lock(&t->mu);
    while (t->submitted - t->completed >= IO_RING) pthread_cond_wait(&t->cv_done, &t->mu);
    t->ring[t->submitted % IO_RING] = (io_req){-1, 0, dst, size, &t->copy_err, src};
    const int64_t seq = ++t->submitted;
    pthread_cond_signal(&t->cv_work);
    pthread_mutex_unlock(&t->mu);
    return seq;
}

static void io_wait(struct pikv_tier_state *t, int64_t seq)
{
    if (!t->thread_started) return;
    pthread_mutex_lock(&t->mu);
    while (t->completed < seq) pthread_cond_wait(&t->cv_done, &t->mu);
    pthread_mutex_unlock(&t->mu);
}

/* ---- host tier -------------------------------------------------------------------------- */

static unsigned char *host_ptr(const struct pikv_tier_state *t, uint32_t slot)
{
    return t->host.chunks[slot / t->host.per_chunk] + (uint64_t)(slot % t->host.per_chunk) * t->L->page_bytes;
}

static void *host_chunk_alloc(pikv_cache *c, uint64_t size)
{
#ifdef PIKV_HAVE_NUMA
    if (c->tier->numa_node >= 0) return numa_alloc_onnode((size_t)size, c->tier->numa_node);
#endif
    return pikv_host_alloc(c->ctx, (size_t)size, 64);
}

static void host_chunk_free(pikv_cache *c, void *p, uint64_t size)
{
    (void)size;
#ifdef PIKV_HAVE_NUMA
    if (c->tier->numa_node >= 0) {
        if (p) numa_free(p, (size_t)size);
        return;
    }
#endif
    pikv_host_free(c->ctx, p);
}

/* At least one free slot, growing by a chunk (nothing changes on failure). */
static pikv_status host_grow(pikv_cache *c, const char *fn)
{
    struct pikv_tier_state *t = c->tier;
    host_tier *h = &t->host;
    if (h->n_free > 0) return PIKV_OK;
    PIKV_FORWARD_IF_ERROR(pikv_host_reserve(c->ctx, (void **)&h->chunks, sizeof *h->chunks, &h->chunks_cap,
                                            h->n_chunks + 1));
    const int64_t total = ((int64_t)h->n_chunks + 1) * h->per_chunk;
    PIKV_RETURN_ERROR_IF(total > (int64_t)UINT32_MAX, c->ctx, PIKV_ERR_CAPACITY,
                         "%s: host tier: %lld slots exceed the slot range", fn, (long long)total);
    PIKV_FORWARD_IF_ERROR(pikv_host_reserve(c->ctx, (void **)&h->free_slots, sizeof *h->free_slots, &h->free_cap,
                                            total));
    unsigned char *chunk = host_chunk_alloc(c, h->chunk_bytes);
    PIKV_RETURN_ERROR_IF(!chunk, c->ctx, PIKV_ERR_OUT_OF_MEMORY,
                         "%s: host tier chunk of %llu bytes%s: allocation failed", fn,
                         (unsigned long long)h->chunk_bytes, t->numa_node >= 0 ? " on its NUMA node" : "");
    const int32_t k = h->n_chunks++;
    h->chunks[k] = chunk;
    for (int64_t i = (int64_t)h->per_chunk - 1; i >= 0; i--)
        h->free_slots[h->n_free++] = (uint32_t)((int64_t)k * h->per_chunk + i);
    return PIKV_OK;
}

static void host_give(struct pikv_tier_state *t, uint32_t slot)
{
    t->host.free_slots[t->host.n_free++] = slot;
    t->host.used--;
}

static void disk_give(struct pikv_tier_state *t, uint32_t slot)
{
    t->disk.free_slots[t->disk.n_free++] = slot;
    t->disk.used--;
}

/* A host page's disk copy is freed (the page leaves the host tier another way). */
static void drop_disk_copy(struct pikv_tier_state *t, pikv_page_meta *m)
{
    if (!m->disk_copy) return;
    disk_give(t, m->disk_copy - 1);
    m->disk_copy = 0;
    t->disk_copies--;
}

/* Coldness: pages holding sink tokens last, then least recently read (cache-wide
   clock), then oldest tokens first. */
static bool colder(const pikv_cache *c, uint32_t a, uint32_t b)
{
    const size_t ps = (size_t)c->params.page_size;
    const int32_t sink = c->params.select.sink_tokens;
    const bool sa = c->indices[a * ps] < sink, sb = c->indices[b * ps] < sink;
    if (sa != sb) return !sa;
    const pikv_page_meta *ma = &c->pages[a], *mb = &c->pages[b];
    if (ma->tier_use != mb->tier_use) return ma->tier_use < mb->tier_use;
    if (c->indices[a * ps] != c->indices[b * ps]) return c->indices[a * ps] < c->indices[b * ps];
    return a < b;
}

/* The coldest full resident page of device dev read before clock `before`
   (INT64_MAX: any), or UINT32_MAX. */
static uint32_t coldest_resident(const pikv_cache *c, int32_t dev, int64_t before)
{
    const struct pikv_tier_state *t = c->tier;
    uint32_t best = UINT32_MAX;
    for (int64_t id = 0; id < c->pages_high; id++) {
        const pikv_page_meta *m = &c->pages[id];
        if (m->refs == 0 || m->tier != PIKV_TIER_DEVICE || m->dev != dev || m->quant != t->quant ||
            m->n_tokens != c->params.page_size || m->tier_use >= before)
            continue;
        if (best == UINT32_MAX || colder(c, (uint32_t)id, best)) best = (uint32_t)id;
    }
    return best;
}

/* The host page to push to disk: one of layer `prefer` if any (the layer an attend
   just read: with layers read in turn it is needed last), else the coldest; never a
   page of layer `keep_layer` read at clock keep_clock (what a prefetch brings in). */
static uint32_t host_victim(const pikv_cache *c, int32_t prefer, int32_t keep_layer, int64_t keep_clock)
{
    uint32_t best = UINT32_MAX;
    bool best_pref = false;
    for (int64_t id = 0; id < c->pages_high; id++) {
        const pikv_page_meta *m = &c->pages[id];
        if (m->refs == 0 || m->tier != PIKV_TIER_HOST) continue;
        if (m->layer == keep_layer && m->last_use == keep_clock) continue;
        const bool pref = m->layer == prefer;
        if (best == UINT32_MAX || (pref && !best_pref) || (pref == best_pref && colder(c, (uint32_t)id, best))) {
            best = (uint32_t)id;
            best_pref = pref;
        }
    }
    return best;
}

/* Host page id -> the disk tier. */
static pikv_status host_to_disk(pikv_cache *c, uint32_t id, const char *fn)
{
    struct pikv_tier_state *t = c->tier;
    disk_tier *dk = &t->disk;
    pikv_page_meta *m = &c->pages[id];
    const uint64_t pb = t->L->page_bytes;
    if (m->disk_copy) { /* the disk still holds its bytes: nothing to write */
        host_give(t, m->tier_slot);
        m->tier = PIKV_TIER_DISK;
        m->tier_slot = m->disk_copy - 1;
        m->disk_copy = 0;
        m->prefetched = 0;
        t->disk_copies--;
        t->demotions++;
        return PIKV_OK;
    }
    PIKV_RETURN_ERROR_IF(dk->used >= dk->cap_pages, c->ctx, PIKV_ERR_CAPACITY,
                         "%s: disk tier full: %lld pages of %llu bytes fill tiers.disk_bytes = %llu", fn,
                         (long long)dk->used, (unsigned long long)pb, (unsigned long long)t->p.disk_bytes);
    uint32_t slot;
    if (dk->n_free > 0) {
        slot = dk->free_slots[--dk->n_free];
    } else {
        PIKV_RETURN_ERROR_IF(dk->n_slots >= (int64_t)UINT32_MAX, c->ctx, PIKV_ERR_CAPACITY,
                             "%s: disk tier: %lld slots exceed the slot range", fn, (long long)dk->n_slots);
        /* room to give every slot back later */
        PIKV_FORWARD_IF_ERROR(pikv_host_reserve(c->ctx, (void **)&dk->free_slots, sizeof *dk->free_slots,
                                                &dk->free_cap, dk->n_slots + 1));
        slot = (uint32_t)dk->n_slots++;
    }
    dk->used++;
    const int err = pwrite_full(dk->fd, host_ptr(t, m->tier_slot), pb, (uint64_t)slot * pb);
    if (err) {
        disk_give(t, slot);
        return disk_error(c, fn, "write", err);
    }
    t->disk_written += pb;
    host_give(t, m->tier_slot);
    m->tier = PIKV_TIER_DISK;
    m->tier_slot = slot;
    m->prefetched = 0;
    t->demotions++;
    return PIKV_OK;
}

/* k free host slots under the host budget: the coldest host pages go to disk (never
   one of keep_layer read at keep_clock), chunks are allocated. */
static pikv_status host_make_room(pikv_cache *c, int64_t k, const char *fn, int32_t prefer, int32_t keep_layer,
                                  int64_t keep_clock)
{
    struct pikv_tier_state *t = c->tier;
    host_tier *h = &t->host;
    while (h->used + k > h->cap_pages) {
        PIKV_RETURN_ERROR_IF(t->disk.fd < 0, c->ctx, PIKV_ERR_CAPACITY,
                             "%s: host tier full: %lld pages of %llu bytes fill tiers.host_bytes = %llu and there "
                             "is no disk tier (tiers.disk_bytes = 0)", fn, (long long)h->used,
                             (unsigned long long)t->L->page_bytes, (unsigned long long)t->p.host_bytes);
        const uint32_t victim = host_victim(c, prefer, keep_layer, keep_clock);
        PIKV_RETURN_ERROR_IF(victim == UINT32_MAX, c->ctx, PIKV_ERR_CAPACITY,
                             "%s: host tier full (tiers.host_bytes = %llu) and no page can move to disk", fn,
                             (unsigned long long)t->p.host_bytes);
        PIKV_FORWARD_IF_ERROR(host_to_disk(c, victim, fn));
    }
    /* a chunk at a time (each adds per_chunk free slots, so this ends; chunks hold at
       most host_bytes, so the slots never pass the budget by more than a chunk) */
    while (h->n_free < k) PIKV_FORWARD_IF_ERROR(host_grow(c, fn));
    return PIKV_OK;
}

static unsigned char *bounds_ptr(const struct pikv_tier_state *t, uint32_t slot)
{
    const uint32_t per = t->bounds.pages_per_chunk;
    return (unsigned char *)t->bounds.chunks[slot / per]->host + (uint64_t)(slot % per) * t->bounds_layout.page_bytes;
}

pikv_status pikv_tier_demote(pikv_cache *c, uint32_t id, const char *fn)
{
    struct pikv_tier_state *t = c->tier;
    pikv_page_meta *m = &c->pages[id];
    PIKV_RETURN_ERROR_IF(!t || m->tier != PIKV_TIER_DEVICE || m->quant != t->quant ||
                             m->n_tokens != c->params.page_size, c->ctx, PIKV_ERR_INTERNAL,
                         "%s: page %u cannot be demoted", fn, id);
    pikv_tier_drain(c);
    PIKV_FORWARD_IF_ERROR(host_make_room(c, 1, fn, -1, -1, -1));
    int32_t added = 0;
    PIKV_FORWARD_IF_ERROR(pikv_pool_reserve(c->ctx, &t->bounds, &t->bounds_layout, 1, &added));
    host_tier *h = &t->host;
    const uint32_t hs = h->free_slots[--h->n_free];
    h->used++;
    pikv_page_pool *pool = pikv_page_pool_of(c, m);
    uint64_t off = 0;
    pikv_buffer *buf = pikv_pool_chunk(pool, m->slot, &off, t->L);
    unsigned char *dst = host_ptr(t, hs);
    const pikv_status st = pool->dev->iface->buffer_read(pool->dev, buf, off, dst, t->L->page_bytes);
    if (st != PIKV_OK) {
        host_give(t, hs);
        pikv_pool_unreserve(&t->bounds, added);
        return st;
    }
    const uint32_t bs = pikv_pool_take(&t->bounds);
    t->bounds.pages_used++;
    /* kmin then kmax, contiguous in every page layout */
    memcpy(bounds_ptr(t, bs), dst + t->L->kmin_offset, (size_t)(2 * (t->L->kmax_offset - t->L->kmin_offset)));
    pikv_pool_give(pool, m->slot);
    pool->pages_used--;
    pool->tokens -= m->n_tokens;
    c->devs[m->dev].demoted++;
    m->tier = PIKV_TIER_HOST;
    m->tier_slot = hs;
    m->bounds_slot = bs;
    m->disk_copy = 0;
    m->prefetched = 0;
    t->demotions++;
    return PIKV_OK;
}

/* Resident bytes the device budget counts on device d: pages of both pools and the
   staging slots. */
static uint64_t resident_bytes(const pikv_cache *c, int32_t d)
{
    const struct pikv_tier_state *t = c->tier;
    uint64_t b = (uint64_t)c->devs[d].pages_used * c->layout.page_bytes;
    if (c->qdevs) b += (uint64_t)c->qdevs[d].pages_used * c->qlayout.page_bytes;
    const int64_t staging = t->p.device_bytes ? t->staging_n[d] : t->staging_held[d];
    return b + (uint64_t)staging * t->L->page_bytes;
}

pikv_status pikv_tier_reserve_bytes(pikv_cache *c, int32_t dev, uint64_t bytes, const char *fn)
{
    struct pikv_tier_state *t = c->tier;
    if (!t || t->p.device_bytes == 0 || bytes == 0) return PIKV_OK;
    pikv_tier_drain(c);
    while (resident_bytes(c, dev) + bytes > t->p.device_bytes) {
        const uint32_t victim = coldest_resident(c, dev, INT64_MAX);
        PIKV_RETURN_ERROR_IF(victim == UINT32_MAX, c->ctx, PIKV_ERR_CAPACITY,
                             "%s: device %s: %llu resident bytes (staging included) and %llu new exceed "
                             "tiers.device_bytes = %llu, and no full page is left to demote",
                             fn, c->devs[dev].dev->info.name, (unsigned long long)resident_bytes(c, dev),
                             (unsigned long long)bytes, (unsigned long long)t->p.device_bytes);
        PIKV_FORWARD_IF_ERROR(pikv_tier_demote(c, victim, fn));
    }
    return PIKV_OK;
}

pikv_status pikv_tier_reserve(pikv_cache *c, int32_t dev, int32_t quant, int64_t n)
{
    if (!c->tier || n <= 0) return PIKV_OK; /* tiers off: a device holds what its memory limit allows */
    const uint64_t pb = quant ? c->qlayout.page_bytes : c->layout.page_bytes;
    return pikv_tier_reserve_bytes(c, dev, (uint64_t)n * pb, "pikv_tier_reserve");
}

pikv_status pikv_tier_prepare_evict(pikv_cache *c, int32_t layer, int32_t seq, int64_t n_new)
{
    struct pikv_tier_state *t = c->tier;
    const int64_t budget = c->layer_budget[layer];
    if (!t || budget < 0) return PIKV_OK;
    pikv_tier_drain(c);
    const pikv_seq_layer *sl = &c->seqs[seq].layers[layer];
    int64_t resident = 0;
    for (int32_t s = 0; s < c->n_shards; s++)
        for (int64_t i = 0; i < sl->rings[s].count; i++) {
            const pikv_page_meta *m = &c->pages[pikv_ring_at(&sl->rings[s], i)];
            if (m->tier == PIKV_TIER_DEVICE) resident += m->n_tokens;
        }
    const int64_t over = resident + n_new - budget;
    if (over <= 0) return PIKV_OK;
    const int64_t k = (over + c->params.page_size - 1) / c->params.page_size + 1;
    PIKV_FORWARD_IF_ERROR(host_make_room(c, k, "pikv_cache_append", -1, -1, -1));
    int32_t added = 0;
    return pikv_pool_reserve(c->ctx, &t->bounds, &t->bounds_layout, k, &added);
}

/* Demoted page id -> a free slot of its device's pool (which must have one). */
static pikv_status promote(pikv_cache *c, uint32_t id, const char *fn)
{
    struct pikv_tier_state *t = c->tier;
    pikv_page_meta *m = &c->pages[id];
    pikv_page_pool *pool = t->quant ? &c->qdevs[m->dev] : &c->devs[m->dev];
    const uint64_t pb = t->L->page_bytes;
    int32_t added = 0;
    PIKV_FORWARD_IF_ERROR(pikv_pool_reserve(c->ctx, pool, t->L, 1, &added));
    const unsigned char *src = NULL;
    if (m->tier == PIKV_TIER_HOST) {
        src = host_ptr(t, m->tier_slot);
    } else {
        const int err = pread_full(t->disk.fd, t->one_page, pb, (uint64_t)m->tier_slot * pb);
        if (err) {
            pikv_pool_unreserve(pool, added);
            return disk_error(c, fn, "read", err);
        }
        t->disk_read += pb;
        src = t->one_page;
    }
    const uint32_t slot = pikv_pool_take(pool);
    uint64_t off = 0;
    pikv_buffer *buf = pikv_pool_chunk(pool, slot, &off, t->L);
    const pikv_status st = pool->dev->iface->buffer_write(pool->dev, buf, off, src, pb);
    if (st != PIKV_OK) {
        pikv_pool_give(pool, slot);
        pikv_pool_unreserve(pool, added);
        return st;
    }
    if (m->tier == PIKV_TIER_HOST) host_give(t, m->tier_slot);
    else disk_give(t, m->tier_slot);
    drop_disk_copy(t, m);
    pikv_pool_give(&t->bounds, m->bounds_slot);
    t->bounds.pages_used--;
    m->tier = PIKV_TIER_DEVICE;
    m->slot = slot;
    m->prefetched = 0;
    c->devs[m->dev].demoted--;
    pool->pages_used++;
    pool->tokens += m->n_tokens;
    t->promotions++;
    return PIKV_OK;
}

void pikv_tier_page_freed(pikv_cache *c, uint32_t id)
{
    struct pikv_tier_state *t = c->tier;
    pikv_tier_drain(c);
    for (int32_t d = 0; d < c->n_devs; d++) /* the id will name another page */
        for (int64_t k = 0; k < t->staging_held[d]; k++)
            if (t->staging[d][k].tag == id + 1) t->staging[d][k] = (staging_slot){t->staging[d][k].slot, 0, 0};
    pikv_page_meta *m = &c->pages[id];
    if (m->tier == PIKV_TIER_HOST) host_give(t, m->tier_slot);
    else if (m->tier == PIKV_TIER_DISK) disk_give(t, m->tier_slot);
    else return;
    drop_disk_copy(t, m);
    pikv_pool_give(&t->bounds, m->bounds_slot);
    t->bounds.pages_used--;
    c->devs[m->dev].demoted--;
    m->tier = PIKV_TIER_DEVICE;
    m->prefetched = 0;
}

void pikv_tier_drain(pikv_cache *c)
{
    struct pikv_tier_state *t = c->tier;
    if (!t || (t->n_pending == 0 && t->stage_seq == 0)) return;
    io_wait(t, t->submitted);
    t->stage_seq = 0;
    const uint64_t pb = t->L->page_bytes;
    for (int64_t i = 0; i < t->n_pending; i++) {
        const prefetch_rec *r = &t->pending[i];
        pikv_page_meta *m = &c->pages[r->id];
        if (r->err) { /* the page stays on disk */
            host_give(t, r->host_slot);
            pikv_log(c->ctx, PIKV_LOG_WARN, "tier prefetch of page %u from %s failed: %s", r->id, t->disk.path,
                     strerror(r->err));
            continue;
        }
        /* the disk slot stays as the page's clean copy: pushing it back to disk is free */
        m->disk_copy = m->tier_slot + 1;
        t->disk_copies++;
        m->tier = PIKV_TIER_HOST;
        m->tier_slot = r->host_slot;
        m->prefetched = 1;
        t->disk_read += pb;
        t->prefetches++;
        t->promotions++;
    }
    t->n_pending = 0;
}

/* ---- staging ------------------------------------------------------------------------------ */

static pikv_page_pool *tier_pool(pikv_cache *c, int32_t d)
{
    return c->tier->quant ? &c->qdevs[d] : &c->devs[d];
}

pikv_status pikv_tier_staging_ensure(pikv_cache *c, int32_t d, int64_t n)
{
    struct pikv_tier_state *t = c->tier;
    if (t->staging_held[d] >= n) return PIKV_OK;
    pikv_page_pool *pool = tier_pool(c, d);
    PIKV_FORWARD_IF_ERROR(
        pikv_host_reserve(c->ctx, (void **)&t->staging[d], sizeof(staging_slot), &t->staging_cap[d], n));
    int32_t added = 0;
    PIKV_FORWARD_IF_ERROR(pikv_pool_reserve(c->ctx, pool, t->L, n - t->staging_held[d], &added));
    while (t->staging_held[d] < n) t->staging[d][t->staging_held[d]++] = (staging_slot){pikv_pool_take(pool), 0, 0};
    return PIKV_OK;
}

/* The staging slot (index) of device d holding page id's bytes, or -1. */
static int64_t staged_at(const struct pikv_tier_state *t, int32_t d, uint32_t id)
{
    for (int64_t k = 0; k < t->staging_held[d]; k++)
        if (t->staging[d][k].tag == id + 1) return k;
    return -1;
}

int64_t pikv_tier_staging_slots(const pikv_cache *c, int32_t d, int32_t quant, unsigned char *used)
{
    const struct pikv_tier_state *t = c->tier;
    if (!t || t->quant != quant) return 0;
    if (used)
        for (int64_t i = 0; i < t->staging_held[d]; i++) used[t->staging[d][i].slot] = 1;
    return t->staging_held[d];
}

/* Staging slots an attend may use on device d: the fixed count under a device
   budget, else staging_pages, else a quarter of the device's resident full pages. */
static int64_t staging_target(const pikv_cache *c, int32_t d)
{
    const struct pikv_tier_state *t = c->tier;
    if (t->p.device_bytes) return t->staging_n[d];
    if (t->p.staging_pages > 0) return t->p.staging_pages;
    const int64_t q = (t->quant ? c->qdevs[d].pages_used : c->devs[d].pages_used) / 4;
    return q > 0 ? q : 1;
}

static pikv_status copy_to_slot(pikv_cache *c, int32_t d, uint32_t slot, const unsigned char *src)
{
    pikv_page_pool *pool = tier_pool(c, d);
    uint64_t off = 0;
    pikv_buffer *buf = pikv_pool_chunk(pool, slot, &off, c->tier->L);
    return pool->dev->iface->buffer_write(pool->dev, buf, off, src, c->tier->L->page_bytes);
}

pikv_status pikv_tier_copy_rows(pikv_cache *c, uint32_t id, uint32_t dst_slot, int32_t rows)
{
    struct pikv_tier_state *t = c->tier;
    pikv_tier_drain(c);
    const pikv_page_meta *m = &c->pages[id];
    const uint64_t pb = t->L->page_bytes;
    const unsigned char *src = t->one_page;
    if (m->tier == PIKV_TIER_HOST) {
        src = host_ptr(t, m->tier_slot);
    } else {
        const int err = pread_full(t->disk.fd, t->one_page, pb, (uint64_t)m->tier_slot * pb);
        if (err) return disk_error(c, "pikv_seq_copy_prefix", "read", err);
        t->disk_read += pb;
    }
    pikv_page_pool *open = &c->devs[m->dev];
    if (!t->quant) { /* the whole page into the copy's slot, then its bounds over `rows` */
        PIKV_FORWARD_IF_ERROR(copy_to_slot(c, m->dev, dst_slot, src));
        pikv_page_copy_args args = {&open->view, dst_slot, dst_slot, rows};
        return open->dev->iface->page_copy(open->dev, &args);
    }
    /* quantized: through a free slot of the quantized pool, dequantized by page_copy */
    pikv_page_pool *qpool = &c->qdevs[m->dev];
    PIKV_RETURN_ERROR_IF(qpool->n_free == 0, c->ctx, PIKV_ERR_INTERNAL,
                         "pikv_seq_copy_prefix: no free quantized slot reserved on device %s", qpool->dev->info.name);
    const uint32_t qs = pikv_pool_take(qpool);
    pikv_status st = copy_to_slot(c, m->dev, qs, src);
    if (st == PIKV_OK) {
        pikv_page_copy_args args = {&open->view, qs | PIKV_SLOT_QUANT, dst_slot, rows};
        st = open->dev->iface->page_copy(open->dev, &args);
    }
    pikv_pool_give(qpool, qs);
    return st;
}

const pikv_pool_view *pikv_tier_bounds_view(const pikv_cache *c)
{
    return &c->tier->bounds.view;
}

/* ---- page bytes ---------------------------------------------------------------------------- */

pikv_status pikv_page_read_bytes(pikv_cache *c, uint32_t id, void *dst)
{
    const pikv_page_meta *m = &c->pages[id];
    const pikv_page_layout *L = pikv_layout_of(c, m);
    if (m->tier != PIKV_TIER_DEVICE) {
        struct pikv_tier_state *t = c->tier;
        pikv_tier_drain(c);
        if (m->tier == PIKV_TIER_HOST) {
            memcpy(dst, host_ptr(t, m->tier_slot), (size_t)L->page_bytes);
            return PIKV_OK;
        }
        const int err = pread_full(t->disk.fd, dst, L->page_bytes, (uint64_t)m->tier_slot * L->page_bytes);
        if (err) return disk_error(c, "pikv_page_read_bytes", "read", err);
        t->disk_read += L->page_bytes;
        return PIKV_OK;
    }
    pikv_page_pool *pool = pikv_page_pool_of(c, m);
    uint64_t off = 0;
    pikv_buffer *buf = pikv_pool_chunk(pool, m->slot, &off, L);
    return pool->dev->iface->buffer_read(pool->dev, buf, off, dst, L->page_bytes);
}

/* ---- attend ---------------------------------------------------------------------------------- */

void pikv_tier_attend_begin(pikv_cache *c)
{
    struct pikv_tier_state *t = c->tier;
    t->last_fetches = 0;
    t->last_fetch_stall_s = 0.0;
    t->n_fetched = 0;
}

/* One attention call over the entries of device d's part of the plan that `pick`
   accepts, with the slots `slot_of` gives, into part (out, lse); page_lse of those
   entries scattered back to their plan positions. */
typedef struct sub_plan {
    int32_t *indptr;
    uint32_t *slots;
    int32_t *lens;
    int64_t *map;
    float *page_lse;
} sub_plan;

/* which: -1 = the resident entries; r >= 0 = the entries of fetch round r */
static pikv_status run_sub(pikv_cache *c, const pikv_read_plan *plan, int32_t d, int64_t which, const int32_t *pos,
                           const int32_t *fslot, int64_t S, int32_t nq, const float *q, float *out, float *lse, float *page_lse,
                           sub_plan *sp, bool *ran)
{
    struct pikv_tier_state *t = c->tier;
    const int32_t hq = c->params.n_q_heads, G = hq / c->params.n_kv_heads;
    const int64_t n_lists = plan->n_lists, off = plan->dev_begin[d];
    const int32_t *indptr = plan->indptr + (size_t)d * ((size_t)n_lists + 1);
    const uint32_t flag = t->quant ? PIKV_SLOT_QUANT : 0;
    int32_t n = 0;
    for (int64_t l = 0; l < n_lists; l++) {
        sp->indptr[l] = n;
        for (int32_t e = indptr[l]; e < indptr[l + 1]; e++) {
            const uint32_t id = plan->ids[off + e];
            const pikv_page_meta *m = &c->pages[id];
            if (which < 0) {
                if (m->tier != PIKV_TIER_DEVICE) continue;
                sp->slots[n] = plan->slots[off + e];
            } else {
                if (m->tier == PIKV_TIER_DEVICE || pos[id] / S != which) continue;
                sp->slots[n] = t->staging[d][fslot[pos[id]]].slot | flag;
            }
            sp->lens[n] = plan->lens[off + e];
            sp->map[n++] = off + e;
        }
    }
    sp->indptr[n_lists] = n;
    *ran = n > 0;
    if (n == 0) return PIKV_OK;
    pikv_page_pool *pool = &c->devs[d];
    pikv_attention_args args = {
        .pool = &pool->view,
        .n_queries = nq,
        .n_q_heads = hq,
        .q = q,
        .indptr = sp->indptr,
        .slots = sp->slots,
        .page_len = sp->lens,
        .scale = c->scale,
        .out = out,
        .lse = lse,
        .page_lse = page_lse ? sp->page_lse : NULL,
        .io_on_device = 0,
    };
    PIKV_FORWARD_IF_ERROR(pool->dev->iface->attention(pool->dev, &args));
    if (page_lse)
        for (int32_t k = 0; k < n; k++)
            memcpy(page_lse + (size_t)sp->map[k] * (size_t)G, sp->page_lse + (size_t)k * (size_t)G,
                   (size_t)G * sizeof(float));
    return PIKV_OK;
}

/* Queues the disk reads of global fetch round g into half g % 2 of the fetch buffers;
   returns the number of the last read queued (last_seq if none). */
static int64_t queue_round(pikv_cache *c, int64_t g, const int64_t *round_dev, const int64_t *S, const int64_t *fbegin,
                           const uint32_t *fetch_ids, int64_t S_max, unsigned char *bounce, int *errs,
                           int64_t *round_seq, int64_t last_seq)
{
    struct pikv_tier_state *t = c->tier;
    const uint64_t pb = t->L->page_bytes;
    int32_t d = 0;
    while (round_dev[d + 1] <= g) d++;
    const int64_t r = g - round_dev[d];
    round_seq[g % 2] = 0;
    for (int64_t k = r * S[d]; k < (r + 1) * S[d] && fbegin[d] + k < fbegin[d + 1]; k++) {
        const pikv_page_meta *m = &c->pages[fetch_ids[fbegin[d] + k]];
        if (m->tier != PIKV_TIER_DISK) continue; /* (read even when a staging slot has it: see run_plan) */
        const int64_t b = (g % 2) * S_max + (k - r * S[d]);
        round_seq[g % 2] = last_seq = io_submit(t, (uint64_t)m->tier_slot * pb, bounce + (size_t)b * pb, pb, &errs[b]);
    }
    return last_seq;
}

pikv_status pikv_tier_run_plan(pikv_cache *c, const char *fn, int32_t nq, const float *q, const pikv_read_plan *plan,
                               float *out, float *lse, float *page_lse)
{
    struct pikv_tier_state *t = c->tier;
    pikv_context *ctx = c->ctx;
    const int32_t hq = c->params.n_q_heads, hd = c->params.head_dim, G = hq / c->params.n_kv_heads;
    const int32_t nd = c->n_devs;
    const size_t out_floats = (size_t)nq * (size_t)hq * (size_t)hd, lse_floats = (size_t)nq * (size_t)hq;
    const int64_t entries = plan->dev_begin[nd], n_lists = plan->n_lists;
    const uint64_t pb = t->L->page_bytes;
    const double drain0 = pikv_monotonic_s();
    pikv_tier_drain(c); /* prefetches still in flight: waiting for them is a stall too */
    t->last_fetch_stall_s += pikv_monotonic_s() - drain0;
    t->fetch_stall_s += pikv_monotonic_s() - drain0;

    /* the demoted pages each device reads, each once: pos[id] = its index there */
    pikv_status st = PIKV_OK;
    int32_t *pos = pikv_host_alloc(ctx, (size_t)(c->pages_high ? c->pages_high : 1) * sizeof(int32_t), 64);
    uint32_t *fetch_ids = pikv_host_alloc(ctx, (size_t)(entries ? entries : 1) * sizeof(uint32_t), 64);
    /* per fetch: its staging slot (index) in its round, and 1 = its bytes are already
       there, 2 = put there by a prefetch; per round: the slots taken */
    int32_t *fslot = pikv_host_alloc(ctx, (size_t)(entries ? entries : 1) * sizeof(int32_t), 64);
    uint8_t *cached = pikv_host_calloc(ctx, (size_t)(entries ? entries : 1), 1);
    uint8_t *taken = pikv_host_calloc(ctx, (size_t)(entries ? entries : 1), 1);
    sub_plan sp = {
        pikv_host_alloc(ctx, ((size_t)n_lists + 1) * sizeof(int32_t), 64),
        pikv_host_alloc(ctx, (size_t)(entries ? entries : 1) * sizeof(uint32_t), 64),
        pikv_host_alloc(ctx, (size_t)(entries ? entries : 1) * sizeof(int32_t), 64),
        pikv_host_alloc(ctx, (size_t)(entries ? entries : 1) * sizeof(int64_t), 64),
        page_lse ? pikv_host_alloc(ctx, (size_t)(entries ? entries : 1) * (size_t)G * sizeof(float), 64) : NULL,
    };
    float *parts = NULL;
    unsigned char *bounce = NULL;
    int *errs = NULL;
    int64_t last_seq = 0; /* reads to wait for before anything is freed */
    if (!pos || !fetch_ids || !fslot || !cached || !taken || !sp.indptr || !sp.slots || !sp.lens || !sp.map || (page_lse && !sp.page_lse)) {
        st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: fetch plan of %lld page reads: allocation failed", fn,
                       (long long)entries);
        goto done;
    }
    for (int64_t i = 0; i < c->pages_high; i++) pos[i] = -1;
    int64_t fbegin[PIKV_MAX_DEVICES + 1], S[PIKV_MAX_DEVICES], rounds[PIKV_MAX_DEVICES];
    int64_t n_fetch = 0, n_parts = 0, S_max = 0, n_disk = 0;
    for (int32_t d = 0; d < nd; d++) {
        fbegin[d] = n_fetch;
        bool resident = false;
        for (int64_t e = plan->dev_begin[d]; e < plan->dev_begin[d + 1]; e++) {
            const uint32_t id = plan->ids[e];
            const pikv_page_meta *m = &c->pages[id];
            if (m->tier == PIKV_TIER_DEVICE) {
                resident = true;
            } else if (pos[id] < 0) {
                pos[id] = (int32_t)(n_fetch - fbegin[d]);
                fetch_ids[n_fetch++] = id;
                n_disk += m->tier == PIKV_TIER_DISK;
            }
        }
        const int64_t n_d = n_fetch - fbegin[d];
        const int64_t target = staging_target(c, d);
        S[d] = n_d < target ? n_d : target;
        rounds[d] = S[d] ? (n_d + S[d] - 1) / S[d] : 0;
        S_max = S[d] > S_max ? S[d] : S_max;
        n_parts += resident + rounds[d];
        if (S[d] > 0 && st == PIKV_OK) st = pikv_tier_staging_ensure(c, d, S[d]);
    }
    fbegin[nd] = n_fetch;
    if (st != PIKV_OK) goto done;
    parts = pikv_host_alloc(ctx, (size_t)n_parts * (out_floats + lse_floats) * sizeof(float), 64);
    if (n_disk) {
        bounce = pikv_host_alloc(ctx, (size_t)(2 * S_max) * (size_t)pb, 64);
        errs = pikv_host_calloc(ctx, (size_t)(2 * S_max), sizeof(int));
    }
    if (!parts || (n_disk && (!bounce || !errs))) {
        st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: %lld partials and fetch buffers of %lld pages: allocation "
                       "failed", fn, (long long)n_parts, (long long)(n_disk ? 2 * S_max : 0));
        goto done;
    }
    if (n_disk) st = io_start(c, fn);
    if (st != PIKV_OK) goto done;

    /* the rounds of every device, in order (global round g: device round_dev, its round
       g - round_dev[d]); the disk reads of round g go to half g % 2 of the fetch
       buffers, queued one round ahead so they run while the previous round computes */
    int64_t n_rounds = 0, round_dev[PIKV_MAX_DEVICES + 1];
    for (int32_t d = 0; d < nd; d++) {
        round_dev[d] = n_rounds;
        n_rounds += rounds[d];
    }
    round_dev[nd] = n_rounds;
    int64_t round_seq[2] = {0, 0};
    if (n_rounds > 0 && n_disk) last_seq = queue_round(c, 0, round_dev, S, fbegin, fetch_ids, S_max, bounce, errs,
                                                        round_seq, last_seq);
    /* resident pages first, while the reads run */
    int64_t p = 0;
    for (int32_t d = 0; d < nd && st == PIKV_OK; d++) {
        if (!pikv_cache_dev_local(c, d)) continue;
        bool ran = false;
        st = run_sub(c, plan, d, -1, pos, fslot, 1, nq, q, parts + (size_t)p * out_floats,
                     parts + (size_t)n_parts * out_floats + (size_t)p * lse_floats, page_lse, &sp, &ran);
        p += ran;
    }
    /* then the fetched pages, round by round */
    for (int64_t g = 0; g < n_rounds && st == PIKV_OK; g++) {
        int32_t d = 0;
        while (round_dev[d + 1] <= g) d++;
        const int64_t r = g - round_dev[d];
        if (g + 1 < n_rounds && n_disk)
            last_seq = queue_round(c, g + 1, round_dev, S, fbegin, fetch_ids, S_max, bounce, errs, round_seq,
                                   last_seq);
        /* Slots of this round's pages: a page whose bytes a staging slot already holds
           (prefetched, or fetched earlier) takes that slot, the others the free ones. The
           rounds themselves follow the plan's order whatever the slots hold, so results
           never depend on what was staged before. */
        const int64_t lo = fbegin[d] + r * S[d], hi = fbegin[d] + (r + 1) * S[d] < fbegin[d + 1]
                                                             ? fbegin[d] + (r + 1) * S[d]
                                                             : fbegin[d + 1];
        memset(taken, 0, (size_t)S[d]);
        for (int64_t i = lo; i < hi; i++) {
            const int64_t j = staged_at(t, d, fetch_ids[i]);
            cached[i] = 0;
            fslot[i] = -1;
            if (j < 0 || j >= S[d] || taken[j]) continue;
            taken[j] = 1;
            fslot[i] = (int32_t)j;
            cached[i] = (uint8_t)(1 | (t->staging[d][j].prefetched ? 2 : 0));
        }
        for (int64_t i = lo, next = 0; i < hi; i++) {
            if (fslot[i] >= 0) continue;
            while (taken[next]) next++;
            taken[next] = 1;
            fslot[i] = (int32_t)next;
        }
        const double t0 = pikv_monotonic_s();
        if (round_seq[g % 2]) io_wait(t, round_seq[g % 2]);
        for (int64_t k = r * S[d]; k < (r + 1) * S[d] && fbegin[d] + k < fbegin[d + 1] && st == PIKV_OK; k++) {
            const uint32_t id = fetch_ids[fbegin[d] + k];
            pikv_page_meta *m = &c->pages[id];
            staging_slot *ss = &t->staging[d][fslot[fbegin[d] + k]];
            if (cached[fbegin[d] + k]) { /* already there */
                ss->prefetched = 0;
                if (m->tier == PIKV_TIER_DISK) t->disk_read += pb; /* queue_round read it anyway */
                continue;
            }
            const int64_t b = (g % 2) * S_max + (k - r * S[d]);
            const unsigned char *src = m->tier == PIKV_TIER_HOST ? host_ptr(t, m->tier_slot) : NULL;
            if (m->tier == PIKV_TIER_DISK) {
                if (errs[b]) {
                    st = disk_error(c, fn, "read", errs[b]);
                    break;
                }
                src = bounce + (size_t)b * pb;
                t->disk_read += pb;
            }
            *ss = (staging_slot){ss->slot, 0, 0}; /* overwritten: valid again once written */
            st = copy_to_slot(c, d, ss->slot, src);
            if (st == PIKV_OK) ss->tag = id + 1;
        }
        const double waited = pikv_monotonic_s() - t0;
        t->fetch_stall_s += waited;
        t->last_fetch_stall_s += waited;
        if (st != PIKV_OK) break;
        bool ran = false;
        st = run_sub(c, plan, d, r, pos, fslot + fbegin[d], S[d], nq, q, parts + (size_t)p * out_floats,
                     parts + (size_t)n_parts * out_floats + (size_t)p * lse_floats, page_lse, &sp, &ran);
        p += ran;
    }
    if (st == PIKV_OK) {
        /* the first p partials: outputs from parts, log-sum-exps after all n_parts outputs */
        pikv_merge_args margs = {(int32_t)p, nq * hq, hd, parts, parts + (size_t)n_parts * out_floats, out, lse};
        st = ctx->host_device->iface->merge(ctx->host_device, &margs);
    }
    if (st == PIKV_OK) {
        /* statistics, and the candidates for promotion */
        int64_t cap_a = t->fetched_cap, cap_b = t->fetched_cap;
        if (pikv_host_reserve(ctx, (void **)&t->fetched, sizeof *t->fetched, &cap_a, t->n_fetched + n_fetch) ==
                PIKV_OK &&
            pikv_host_reserve(ctx, (void **)&t->fetched_prev, sizeof *t->fetched_prev, &cap_b,
                              t->n_fetched + n_fetch) == PIKV_OK) {
            t->fetched_cap = cap_a < cap_b ? cap_a : cap_b;
            for (int64_t i = 0; i < n_fetch; i++) {
                t->fetched[t->n_fetched] = fetch_ids[i];
                t->fetched_prev[t->n_fetched++] = c->pages[fetch_ids[i]].tier_use;
            }
        } else {
            t->fetched_cap = cap_a < cap_b ? cap_a : cap_b; /* promotion is skipped: no memory */
        }
        for (int64_t i = 0; i < n_fetch; i++) {
            pikv_page_meta *m = &c->pages[fetch_ids[i]];
            if (m->prefetched || (cached[i] & 2)) t->prefetch_hits++;
            m->prefetched = 0;
        }
        t->fetches += n_fetch;
        t->last_fetches += n_fetch;
    }
done:
    if (last_seq) io_wait(t, last_seq); /* no read may land in freed memory */
    pikv_host_free(ctx, pos);
    pikv_host_free(ctx, fetch_ids);
    pikv_host_free(ctx, fslot);
    pikv_host_free(ctx, cached);
    pikv_host_free(ctx, taken);
    pikv_host_free(ctx, sp.indptr);
    pikv_host_free(ctx, sp.slots);
    pikv_host_free(ctx, sp.lens);
    pikv_host_free(ctx, sp.map);
    pikv_host_free(ctx, sp.page_lse);
    pikv_host_free(ctx, parts);
    pikv_host_free(ctx, bounce);
    pikv_host_free(ctx, errs);
    return st;
}

/* Promotion: a fetched page comes back to a device slot when the device has room, or
   in place of a resident page read less recently than the fetched page was before this
   call (so pages read in turn by layer after layer never push each other out, and
   with everything read nothing moves). Not for layers under a token budget, whose
   residency eviction decides. */
static void promote_fetched(pikv_cache *c, int32_t layer)
{
    struct pikv_tier_state *t = c->tier;
    if (t->p.device_bytes == 0 || c->layer_budget[layer] >= 0) return;
    const uint64_t pb = t->L->page_bytes;
    for (int64_t i = 0; i < t->n_fetched; i++) {
        const uint32_t id = t->fetched[i];
        pikv_page_meta *m = &c->pages[id];
        if (m->refs == 0 || m->tier == PIKV_TIER_DEVICE) continue;
        const int32_t d = m->dev;
        if (resident_bytes(c, d) + pb > t->p.device_bytes) {
            const uint32_t victim = coldest_resident(c, d, t->fetched_prev[i]);
            if (victim == UINT32_MAX) continue;
            if (pikv_tier_demote(c, victim, "pikv_cache_attend (promotion)") != PIKV_OK) break;
        }
        if (resident_bytes(c, d) + pb > t->p.device_bytes) continue;
        if (promote(c, id, "pikv_cache_attend (promotion)") != PIKV_OK) break;
    }
    t->n_fetched = 0;
}

/* Prefetch for layer l2 = the next: its disk pages read at its last attend go to the
   host tier (asynchronously), pushing host pages of the layer just read to disk when
   the host tier is full. */
static void prefetch_next(pikv_cache *c, int32_t layer)
{
    struct pikv_tier_state *t = c->tier;
    if (!t->p.prefetch || t->disk.fd < 0) return;
    const int32_t l2 = (layer + 1) % c->params.n_layers;
    const int64_t clk = c->layer_clock[l2];
    if (clk == 0) return;
    const uint64_t pb = t->L->page_bytes;
    /* the records first: the I/O thread writes into them, so they never move while reads run */
    pikv_tier_drain(c);
    int64_t want = 0;
    for (int64_t id = 0; id < c->pages_high; id++) {
        const pikv_page_meta *m = &c->pages[id];
        want += m->refs > 0 && m->tier == PIKV_TIER_DISK && m->layer == l2 && m->last_use == clk;
    }
    if (want == 0 ||
        pikv_host_reserve(c->ctx, (void **)&t->pending, sizeof *t->pending, &t->pending_cap, want) != PIKV_OK)
        return;
    for (int64_t id = 0; id < c->pages_high; id++) {
        const pikv_page_meta *m = &c->pages[id];
        if (m->refs == 0 || m->tier != PIKV_TIER_DISK || m->layer != l2 || m->last_use != clk) continue;
        if (io_start(c, "pikv_cache_attend (prefetch)") != PIKV_OK) break;
        /* a pending prefetch's host slot is taken, so host_make_room never picks it */
        if (host_make_room(c, 1, "pikv_cache_attend (prefetch)", layer, l2, clk) != PIKV_OK) break;
        host_tier *h = &t->host;
        const uint32_t hs = h->free_slots[--h->n_free];
        h->used++;
        prefetch_rec *r = &t->pending[t->n_pending++];
        r->id = (uint32_t)id;
        r->host_slot = hs;
        io_submit(t, (uint64_t)m->tier_slot * pb, host_ptr(t, hs), pb, &r->err);
    }
}

/* Prefetch, second half: host pages the next layer read at its last attend go to free
   staging slots of their device (slots holding no page that layer wants), so its
   attend finds them there. */
static void prefetch_staging(pikv_cache *c, int32_t layer)
{
    struct pikv_tier_state *t = c->tier;
    if (!t->p.prefetch) return;
    const int32_t l2 = (layer + 1) % c->params.n_layers;
    const int64_t clk = c->layer_clock[l2];
    if (clk == 0) return;
    for (int32_t d = 0; d < c->n_devs; d++) {
        const int64_t held = t->staging_held[d];
        if (held == 0) continue;
        int64_t k = 0;
        for (int64_t id = 0; id < c->pages_high && k < held; id++) {
            const pikv_page_meta *m = &c->pages[id];
            if (m->refs == 0 || m->tier != PIKV_TIER_HOST || m->dev != d || m->layer != l2 || m->last_use != clk ||
                staged_at(t, d, (uint32_t)id) >= 0)
                continue;
            /* a slot whose page the next layer does not want */
            for (; k < held; k++) {
                const uint32_t tag = t->staging[d][k].tag;
                if (tag == 0) break;
                const pikv_page_meta *o = &c->pages[tag - 1];
                if (o->refs == 0 || o->tier == PIKV_TIER_DEVICE || o->dev != d || o->layer != l2 || o->last_use != clk)
                    break;
            }
            if (k >= held) break;
            staging_slot *ss = &t->staging[d][k++];
            *ss = (staging_slot){ss->slot, 0, 0};
            pikv_page_pool *pool = tier_pool(c, d);
            uint64_t off = 0;
            pikv_buffer *buf = pikv_pool_chunk(pool, ss->slot, &off, t->L);
            if (buf->host && io_start(c, "pikv_cache_attend (prefetch)") == PIKV_OK) {
                /* host-visible memory: the I/O thread copies, in the background (anything
                   that touches the tiers drains it first) */
                t->stage_seq = io_submit_copy(t, (unsigned char *)buf->host + off, host_ptr(t, m->tier_slot),
                                              t->L->page_bytes);
            } else if (copy_to_slot(c, d, ss->slot, host_ptr(t, m->tier_slot)) != PIKV_OK) {
                return; /* (asynchronous where the backend's buffer_write is) */
            }
            *ss = (staging_slot){ss->slot, (uint32_t)id + 1, 1};
            t->prefetches++;
        }
    }
}

void pikv_tier_after_attend(pikv_cache *c, int32_t layer)
{
    pikv_tier_drain(c);
    /* the attend succeeded: a promotion or prefetch that cannot be done is skipped */
    c->ctx->best_effort++;
    promote_fetched(c, layer);
    prefetch_next(c, layer);
    prefetch_staging(c, layer);
    c->ctx->best_effort--;
}

/* ---- create, free, stats ------------------------------------------------------------------ */

static pikv_status open_disk(pikv_cache *c, struct pikv_tier_state *t)
{
    const char *dir = t->disk_dir;
    if (!dir || !*dir) dir = getenv("TMPDIR");
    if (!dir || !*dir) dir = "/tmp";
    int fd = -1;
#ifdef O_TMPFILE
    fd = open(dir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd >= 0) snprintf(t->disk.path, sizeof t->disk.path, "%s/(unnamed O_TMPFILE)", dir);
#endif
    if (fd < 0) {
        /* no O_TMPFILE (or not on this file system): a named file, unlinked at once */
        snprintf(t->disk.path, sizeof t->disk.path, "%s/pikv-tier-XXXXXX", dir);
        fd = mkstemp(t->disk.path);
        if (fd >= 0) unlink(t->disk.path);
    }
    PIKV_RETURN_ERROR_IF(fd < 0, c->ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "tiers.disk_dir = \"%s\": cannot create the disk tier's file there: %s", dir,
                         strerror(errno));
    t->disk.fd = fd;
    return PIKV_OK;
}

static void tier_destroy(pikv_cache *c, struct pikv_tier_state *t)
{
    pikv_context *ctx = c->ctx;
    if (t->thread_started) {
        pthread_mutex_lock(&t->mu);
        t->stop = true;
        pthread_cond_signal(&t->cv_work);
        pthread_mutex_unlock(&t->mu);
        pthread_join(t->thread, NULL);
    }
    pthread_mutex_destroy(&t->mu);
    pthread_cond_destroy(&t->cv_work);
    pthread_cond_destroy(&t->cv_done);
    struct pikv_tier_state *saved = c->tier;
    c->tier = t; /* host_chunk_free reads the NUMA node */
    for (int32_t i = 0; i < t->host.n_chunks; i++) host_chunk_free(c, t->host.chunks[i], t->host.chunk_bytes);
    c->tier = saved;
    pikv_host_free(ctx, t->host.chunks);
    pikv_host_free(ctx, t->host.free_slots);
    pikv_host_free(ctx, t->disk.free_slots);
    if (t->disk.fd >= 0) close(t->disk.fd);
    if (t->bounds.dev) pikv_pool_free(&t->bounds);
    for (int32_t d = 0; d < PIKV_MAX_DEVICES; d++) pikv_host_free(ctx, t->staging[d]);
    pikv_host_free(ctx, t->one_page);
    pikv_host_free(ctx, t->pending);
    pikv_host_free(ctx, t->fetched);
    pikv_host_free(ctx, t->fetched_prev);
    pikv_host_free(ctx, t);
}

pikv_status pikv_tier_create(pikv_cache *c)
{
    pikv_context *ctx = c->ctx;
    const pikv_tier_params *p = &c->params.tiers;
    c->tier = NULL;
    if (!p->enabled) return PIKV_OK;
    const bool quant = c->qdevs != NULL;
    const pikv_page_layout *L = quant ? &c->qlayout : &c->layout;
    const uint64_t pb = L->page_bytes;
    const uint64_t larger = quant && c->qlayout.page_bytes > c->layout.page_bytes ? c->qlayout.page_bytes
                                                                                  : c->layout.page_bytes;
    PIKV_RETURN_ERROR_IF(p->host_bytes && p->host_bytes < pb, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "tiers.host_bytes = %llu holds no page of %llu bytes (0 = no limit)",
                         (unsigned long long)p->host_bytes, (unsigned long long)pb);
    PIKV_RETURN_ERROR_IF(p->disk_bytes && p->disk_bytes < pb, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "tiers.disk_bytes = %llu holds no page of %llu bytes (0 = no disk tier)",
                         (unsigned long long)p->disk_bytes, (unsigned long long)pb);
    int64_t staging = p->staging_pages;
    if (p->device_bytes) {
        if (staging == 0) {
            staging = (int64_t)(p->device_bytes / pb / 4);
            if (staging < 1) staging = 1;
        }
        PIKV_RETURN_ERROR_IF(p->device_bytes < (uint64_t)staging * pb + larger, ctx, PIKV_ERR_INVALID_ARGUMENT,
                             "tiers.device_bytes = %llu holds less than %lld staging slots (tiers.staging_pages = "
                             "%d) of %llu bytes and one page of %llu bytes",
                             (unsigned long long)p->device_bytes, (long long)staging, p->staging_pages,
                             (unsigned long long)pb, (unsigned long long)larger);
    }
    if (p->numa_node >= 0) {
#ifdef PIKV_HAVE_NUMA
        PIKV_RETURN_ERROR_IF(numa_available() < 0, ctx, PIKV_ERR_UNSUPPORTED,
                             "tiers.numa_node = %d: NUMA is not available on this system (numa_available() < 0)",
                             p->numa_node);
        PIKV_RETURN_ERROR_IF(p->numa_node > numa_max_node(), ctx, PIKV_ERR_INVALID_ARGUMENT,
                             "tiers.numa_node = %d is outside the system's nodes 0..%d", p->numa_node,
                             numa_max_node());
#else
        PIKV_RETURN_ERROR_IF(true, ctx, PIKV_ERR_UNSUPPORTED,
                             "tiers.numa_node = %d: this build has no libnuma (configure with PIKV_NUMA=ON)",
                             p->numa_node);
#endif
    }
    struct pikv_tier_state *t = pikv_host_calloc(ctx, 1, sizeof *t);
    PIKV_RETURN_ERROR_IF(!t, ctx, PIKV_ERR_OUT_OF_MEMORY, "tiers: state: allocation failed");
    t->p = *p;
    /* the caller's string is not kept: params.tiers.disk_dir points at this copy */
    if (p->disk_dir && strlen(p->disk_dir) >= sizeof t->disk_dir) {
        pikv_host_free(ctx, t);
        return PIKV_FAIL(ctx, PIKV_ERR_INVALID_ARGUMENT, "tiers.disk_dir is %zu characters long, more than %zu",
                         strlen(p->disk_dir), sizeof t->disk_dir - 1);
    }
    if (p->disk_dir) strcpy(t->disk_dir, p->disk_dir);
    t->p.disk_dir = p->disk_dir ? t->disk_dir : NULL;
    t->L = L;
    t->quant = quant;
    t->numa_node = p->numa_node;
    t->disk.fd = -1;
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->cv_work, NULL);
    pthread_cond_init(&t->cv_done, NULL);
    for (int32_t d = 0; d < c->n_devs; d++) t->staging_n[d] = p->device_bytes ? staging : 0;
    host_tier *h = &t->host;
    h->cap_pages = p->host_bytes ? (int64_t)(p->host_bytes / pb) : INT64_MAX;
    uint64_t per = ((uint64_t)1 << 20) / pb;
    if (per < 1) per = 1;
    if (per > 4096) per = 4096;
    if ((int64_t)per > h->cap_pages) per = (uint64_t)h->cap_pages;
    h->per_chunk = (uint32_t)per;
    h->chunk_bytes = per * pb;
    t->disk.cap_pages = p->disk_bytes ? (int64_t)(p->disk_bytes / pb) : 0;
    /* the bounds pool: kmin then kmax of every KV head, as the CPU score op reads them */
    pikv_page_layout *B = &t->bounds_layout;
    *B = *L;
    B->kmin_offset = 0;
    B->kmax_offset = L->kmax_offset - L->kmin_offset;
    B->k_offset = B->v_offset = 0;
    B->page_bytes = (2 * B->kmax_offset + 63) / 64 * 64;
    t->bounds.dev = ctx->host_device;
    uint64_t bper = ((uint64_t)256 << 10) / B->page_bytes;
    t->bounds.pages_per_chunk = (uint32_t)(bper < 1 ? 1 : bper > 4096 ? 4096 : bper);
    t->bounds.view.layout = B;
    t->bounds.view.pages_per_chunk = t->bounds.pages_per_chunk;
    pikv_status st = PIKV_OK;
    t->one_page = pikv_host_alloc(ctx, (size_t)pb, 64);
    if (!t->one_page) st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "tiers: page scratch: allocation failed");
    c->tier = t; /* open_disk and its messages read it */
    if (st == PIKV_OK && p->disk_bytes) st = open_disk(c, t);
    if (st != PIKV_OK) {
        c->tier = NULL;
        tier_destroy(c, t);
        return st;
    }
    c->params.tiers.disk_dir = t->p.disk_dir;
    return PIKV_OK;
}

void pikv_tier_free(pikv_cache *c)
{
    if (!c->tier) return;
    struct pikv_tier_state *t = c->tier;
    pikv_tier_drain(c);
    c->tier = NULL;
    tier_destroy(c, t);
}

pikv_status pikv_cache_get_tier_stats(const pikv_cache *c, pikv_tier_stats *out)
{
    if (!c || !out) return PIKV_ERR_INVALID_ARGUMENT;
    memset(out, 0, sizeof *out);
    const struct pikv_tier_state *t = c->tier;
    out->numa_node = -1;
    out->prefetch_hit_rate = -1.0;
    for (int32_t d = 0; d < c->n_devs; d++) {
        out->device_pages += c->devs[d].pages_used;
        out->device_bytes += (uint64_t)c->devs[d].pages_used * c->layout.page_bytes;
        if (c->qdevs) {
            out->device_pages += c->qdevs[d].pages_used;
            out->device_bytes += (uint64_t)c->qdevs[d].pages_used * c->qlayout.page_bytes;
        }
    }
    if (!t) return PIKV_OK;
    const uint64_t pb = t->L->page_bytes;
    out->enabled = 1;
    out->numa_node = t->numa_node;
    out->host_pages = t->host.used;
    out->disk_pages = t->disk.used - t->disk_copies; /* clean copies of host pages are not pages */
    /* pending prefetches hold a host slot but count where their page still is: disk */
    for (int64_t i = 0; i < t->n_pending; i++) out->host_pages--;
    out->host_bytes = (uint64_t)out->host_pages * pb;
    out->disk_bytes = (uint64_t)out->disk_pages * pb;
    for (int32_t d = 0; d < c->n_devs; d++) out->staging_bytes += (uint64_t)t->staging_held[d] * pb;
    out->demotions = t->demotions;
    out->promotions = t->promotions;
    out->fetches = t->fetches;
    out->prefetches = t->prefetches;
    out->prefetch_hits = t->prefetch_hits;
    out->prefetch_hit_rate = t->fetches ? (double)t->prefetch_hits / (double)t->fetches : -1.0;
    out->fetch_stall_s = t->fetch_stall_s;
    out->disk_bytes_read = t->disk_read;
    out->disk_bytes_written = t->disk_written;
    out->last_fetches = t->last_fetches;
    out->last_fetch_stall_s = t->last_fetch_stall_s;
    return PIKV_OK;
}
