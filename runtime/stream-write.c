/*
 * Checkpoints and streams, the writing side (docs/stream.md): a FULL checkpoint
 * goes to a temporary file in path's directory, fsynced and renamed over path
 * (then the directory is fsynced); an INCREMENTAL one appends the pages changed
 * since the cache's last checkpoint to that file, then the tables and a commit
 * record, and fsyncs. pikv_cache_stream_out writes one full checkpoint to a
 * descriptor. The cache itself is never changed, only its checkpoint bookkeeping
 * after a success.
 */
#include "crc32c.h"
#include "stream.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

/* ---- cache identity ---------------------------------------------------------------- */

static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void pikv_stream_cache_init(pikv_cache *c)
{
    c->ckpt_valid = false;
    c->ckpt_fault_after = -1;
    ssize_t got = getrandom(c->cache_id, sizeof c->cache_id, GRND_NONBLOCK);
    if (got == (ssize_t)sizeof c->cache_id) return;
    /* no entropy yet (early boot) or no getrandom: time, pid and address, mixed */
    static uint64_t counter;
    struct timespec ts = {0, 0};
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t a = mix64((uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec);
    uint64_t b = mix64(a ^ ((uint64_t)getpid() << 32) ^ (uint64_t)(uintptr_t)c ^ ++counter * 0x9e3779b97f4a7c15ull);
    pikv_put_u64(c->cache_id, a ^ b);
    pikv_put_u64(c->cache_id + 8, mix64(b + 0x9e3779b97f4a7c15ull));
}

void pikv_stream_set_write_fault(pikv_cache *c, int64_t fail_after)
{
    if (c) c->ckpt_fault_after = fail_after;
}

/* ---- output: buffered writes to a descriptor ------------------------------------------ */

typedef struct writer {
    pikv_cache *c;
    const char *fn, *name; /* for messages */
    int fd;
    bool sock;             /* send(MSG_NOSIGNAL): a closed peer gives EPIPE, not SIGPIPE */
    uint8_t *buf;
    size_t len, cap;
    uint64_t offset;       /* where the next byte lands in the file (or stream) */
    uint64_t written;      /* bytes of this checkpoint */
    /* the segment being written: records, their CRCs, page records */
    uint32_t seg_records, seg_crc;
    int64_t seg_pages;
    /* an incremental checkpoint: the segment's records are made durable (fsync) before its
       COMMIT is written, so the kernel cannot put the commit on disk ahead of the data it
       commits (a crash could otherwise leave a valid commit after holes) */
    bool sync_before_commit;
} writer;

static pikv_status io_fail(pikv_cache *c, const char *fn, const char *name, const char *what, int err)
{
    char msg[128] = "";
    if (strerror_r(err, msg, sizeof msg) != 0) snprintf(msg, sizeof msg, "errno %d", err);
    return PIKV_FAIL(c->ctx, PIKV_ERR_BACKEND, "%s: %s: %s: %s", fn, name, what, msg);
}

static pikv_status write_all(writer *w, const uint8_t *p, size_t n)
{
    while (n > 0) {
        size_t chunk = n;
        bool fault = false;
        if (w->c->ckpt_fault_after >= 0) { /* tests: a write error after so many bytes */
            const uint64_t limit = (uint64_t)w->c->ckpt_fault_after;
            if (w->written >= limit) fault = true;
            else if (chunk > limit - w->written) chunk = (size_t)(limit - w->written);
        }
        if (fault) return io_fail(w->c, w->fn, w->name, "write (injected fault)", ENOSPC);
        ssize_t k = w->sock ? send(w->fd, p, chunk, MSG_NOSIGNAL) : write(w->fd, p, chunk);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) return io_fail(w->c, w->fn, w->name, "write", errno);
        if (k == 0) return io_fail(w->c, w->fn, w->name, "write", EIO);
        p += k, n -= (size_t)k;
        w->written += (uint64_t)k;
    }
    return PIKV_OK;
}

static pikv_status flush(writer *w)
{
    pikv_status st = write_all(w, w->buf, w->len);
    w->len = 0;
    return st;
}

static pikv_status put(writer *w, const void *data, size_t n)
{
    w->offset += n;
    if (n >= w->cap) { /* large: straight through */
        PIKV_FORWARD_IF_ERROR(flush(w));
        return write_all(w, data, n);
    }
    if (w->cap - w->len < n) PIKV_FORWARD_IF_ERROR(flush(w));
    memcpy(w->buf + w->len, data, n);
    w->len += n;
    return PIKV_OK;
}

/* One record: type, length, payload, CRC32C of the three. */
static pikv_status put_record(writer *w, uint32_t type, const uint8_t *payload, uint64_t len)
{
    if (len > UINT32_MAX)
        return PIKV_FAIL(w->c->ctx, PIKV_ERR_CAPACITY, "%s: %s: a record of %llu bytes exceeds the format's 4 GiB",
                         w->fn, w->name, (unsigned long long)len);
    uint8_t head[PIKV_REC_HEAD_BYTES], tail[PIKV_REC_CRC_BYTES];
    pikv_put_u32(head, type);
    pikv_put_u32(head + 4, (uint32_t)len);
    uint32_t crc = pikv_crc32c(0, head, sizeof head);
    crc = pikv_crc32c(crc, payload, (size_t)len);
    pikv_put_u32(tail, crc);
    PIKV_FORWARD_IF_ERROR(put(w, head, sizeof head));
    PIKV_FORWARD_IF_ERROR(put(w, payload, (size_t)len));
    PIKV_FORWARD_IF_ERROR(put(w, tail, sizeof tail));
    if (type != PIKV_REC_COMMIT) { /* the commit covers the framing of the records before it */
        w->seg_records++;
        w->seg_crc = pikv_crc32c(w->seg_crc, head, sizeof head);
    }
    return PIKV_OK;
}

/* ---- encoders ---------------------------------------------------------------------- */

static void encode_header(const pikv_cache *c, uint32_t flags, uint8_t *h)
{
    const pikv_cache_params *p = &c->params;
    memset(h, 0, PIKV_STREAM_HEADER_BYTES);
    memcpy(h, PIKV_STREAM_MAGIC, 8);
    pikv_put_u32(h + 8, PIKV_STREAM_VERSION);
    pikv_put_u32(h + 12, PIKV_STREAM_HEADER_BYTES);
    pikv_put_u32(h + 16, flags);
    memcpy(h + 24, c->cache_id, 16);
    const int32_t geo[12] = {p->n_layers, p->n_q_heads, p->n_kv_heads, p->head_dim, p->n_experts,
                             p->experts_per_token, p->page_size, (int32_t)p->dtype, p->quant_group,
                             (int32_t)p->placement, c->n_shards, p->hash_tokens};
    for (int i = 0; i < 12; i++) pikv_put_u32(h + 40 + 4 * i, (uint32_t)geo[i]);
    pikv_put_u64(h + 88, c->layout.page_bytes);
    pikv_put_u64(h + 96, c->qdevs ? c->qlayout.page_bytes : 0);
    pikv_put_u32(h + 104, (uint32_t)p->max_sequences);
    pikv_put_u64(h + 112, (uint64_t)p->capacity_tokens);
    pikv_put_u32(h + 120, pikv_f32_bits(p->attn_scale));
    pikv_put_u32(h + 124, p->select.mode);
    pikv_put_u32(h + 128, (uint32_t)p->select.experts_top_k);
    pikv_put_u32(h + 132, (uint32_t)p->select.token_budget);
    pikv_put_u32(h + 136, (uint32_t)p->select.sink_tokens);
    pikv_put_u32(h + 140, (uint32_t)p->select.recent_tokens);
    pikv_put_u32(h + 144, (uint32_t)p->select.measure);
    pikv_put_u32(h + 148, (uint32_t)p->budget.mode);
    pikv_put_u64(h + 152, (uint64_t)p->budget.total_tokens);
    pikv_put_u32(h + 160, pikv_f32_bits(p->budget.pyramid_beta));
    pikv_put_u32(h + 164, (uint32_t)p->evict.policy);
    pikv_put_u32(h + 168, pikv_f32_bits(p->evict.alpha_attention));
    pikv_put_u32(h + 172, pikv_f32_bits(p->evict.alpha_recency));
    pikv_put_u32(h + 176, pikv_f32_bits(p->evict.alpha_frequency));
    pikv_put_u32(h + 180, pikv_f32_bits(p->route.lambda));
    pikv_put_u32(h + 184, pikv_f32_bits(p->route.miss_decay));
    pikv_put_u32(h + 188, pikv_crc32c(0, h, 188));
}

/* A PAGE payload into buf (room for the largest): metadata, rows, then the page's bytes. */
static pikv_status encode_page(pikv_cache *c, uint32_t id, uint8_t *buf, uint64_t *len)
{
    const pikv_page_meta *m = &c->pages[id];
    const pikv_page_layout *L = pikv_layout_of(c, m);
    const size_t ps = (size_t)c->params.page_size, n = (size_t)m->n_tokens;
    pikv_put_u32(buf, id);
    pikv_put_u32(buf + 4, (uint32_t)m->layer);
    pikv_put_u32(buf + 8, (uint32_t)m->shard);
    pikv_put_u32(buf + 12, (uint32_t)m->n_tokens);
    pikv_put_u32(buf + 16, (uint32_t)m->quant);
    pikv_put_u32(buf + 20, (uint32_t)L->page_bytes);
    pikv_put_u64(buf + 24, m->mod_seq);
    pikv_put_u32(buf + 32, pikv_f32_bits(m->attn_mass));
    pikv_put_u32(buf + 36, (uint32_t)m->use_count);
    pikv_put_u64(buf + 40, (uint64_t)m->last_use);
    pikv_put_u64(buf + 48, m->expert_mask);
    uint8_t *rows = buf + PIKV_PAGE_FIXED_BYTES;
    for (size_t r = 0; r < n; r++) {
        pikv_put_u32(rows + 4 * r, (uint32_t)c->positions[(size_t)id * ps + r]);
        pikv_put_u32(rows + 4 * (n + r), (uint32_t)c->indices[(size_t)id * ps + r]);
        pikv_put_u32(rows + 4 * (2 * n + r), (uint32_t)c->row_expert[(size_t)id * ps + r]);
    }
    PIKV_FORWARD_IF_ERROR(pikv_page_read_bytes(c, id, rows + 12 * n));
    *len = PIKV_PAGE_FIXED_BYTES + 12 * n + L->page_bytes;
    return PIKV_OK;
}

/* The TABLES payload (allocated here): counters, per-layer and per-expert policy
   state, the live pages' versions and statistics, the sequences' page tables. */
static pikv_status encode_tables(pikv_cache *c, const char *fn, uint8_t **out, uint64_t *out_len)
{
    const pikv_cache_params *p = &c->params;
    const uint64_t nl = (uint64_t)p->n_layers, ne = (uint64_t)p->n_experts, ns = (uint64_t)c->n_shards;
    uint64_t len = PIKV_TABLES_COUNTERS_BYTES + nl * PIKV_TABLES_LAYER_BYTES + nl * ne * PIKV_TABLES_EXPERT_BYTES +
                   4 + nl * ns * 4 + 4 + (uint64_t)c->pages_live * PIKV_TABLES_PAGE_BYTES + 4;
    for (int32_t q = 0; q < p->max_sequences; q++) {
        if (!c->seqs[q].active) continue;
        len += 4 + nl * 16 + nl * ns * 4;
        for (uint64_t l = 0; l < nl; l++)
            for (uint64_t s = 0; s < ns; s++) len += 4 * (uint64_t)c->seqs[q].layers[l].rings[s].count;
    }
    PIKV_RETURN_ERROR_IF(len > PIKV_TABLES_MAX_BYTES, c->ctx, PIKV_ERR_CAPACITY,
                         "%s: the page tables need %llu bytes, over the format's %llu", fn,
                         (unsigned long long)len, (unsigned long long)PIKV_TABLES_MAX_BYTES);
    uint8_t *b = pikv_host_alloc(c->ctx, (size_t)len, 64);
    PIKV_RETURN_ERROR_IF(!b, c->ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: page tables record of %llu bytes: allocation failed",
                         fn, (unsigned long long)len);
    uint8_t *at = b;
#define PUT32(v) (pikv_put_u32(at, (uint32_t)(v)), at += 4)
#define PUT64(v) (pikv_put_u64(at, (uint64_t)(v)), at += 8)
    PUT64(c->evicted_pages);
    PUT64(c->evicted_tokens);
    PUT64(c->appends);
    PUT64(c->attends);
    PUT64(c->bytes_read);
    PUT64(c->last_pages_read);
    PUT64(c->last_tokens_read);
    PUT64(c->last_bytes_read);
    PUT64(pikv_f64_bits(c->last_recall));
    PUT64(pikv_f64_bits(c->last_output_error));
    PUT64(pikv_f64_bits(c->last_hit_rate));
    for (uint64_t l = 0; l < nl; l++) {
        PUT64(c->layer_clock[l]);
        PUT64(c->layer_evicted[l]);
        for (int j = 0; j < 5; j++) PUT64(pikv_f64_bits(c->layer_qerr[l * 5 + (uint64_t)j]));
        PUT64(c->layer_last_bytes[l]);
        PUT64(c->layer_last_pages[l]);
    }
    for (uint64_t i = 0; i < nl * ne; i++) {
        PUT64(pikv_f64_bits(c->expert_misses[i]));
        PUT64(c->expert_routed[i]);
        PUT64(c->expert_top1[i]);
    }
    /* where the shards are: a restore onto as many devices puts them there again */
    PUT32(c->n_devs);
    for (uint64_t i = 0; i < nl * ns; i++) PUT32(c->shards[i].dev);
    PUT32(c->pages_live);
    for (int64_t id = 0; id < c->pages_high; id++) {
        const pikv_page_meta *m = &c->pages[id];
        if (m->refs == 0) continue;
        PUT32(id);
        PUT64(m->mod_seq);
        PUT32(pikv_f32_bits(m->attn_mass));
        PUT32(m->use_count);
        PUT64(m->last_use);
    }
    PUT32(c->n_seqs);
    for (int32_t q = 0; q < p->max_sequences; q++) {
        if (!c->seqs[q].active) continue;
        PUT32(q);
        for (uint64_t l = 0; l < nl; l++) {
            const pikv_seq_layer *sl = &c->seqs[q].layers[l];
            PUT64(sl->next_index);
            PUT64(sl->n_tokens);
            for (uint64_t s = 0; s < ns; s++) {
                const pikv_ring *r = &sl->rings[s];
                PUT32(r->count);
                for (int64_t i = 0; i < r->count; i++) PUT32(pikv_ring_at(r, i));
            }
        }
    }
#undef PUT32
#undef PUT64
    if ((uint64_t)(at - b) != len) { /* the sizes above and the writes disagree */
        pikv_host_free(c->ctx, b);
        return PIKV_FAIL(c->ctx, PIKV_ERR_INTERNAL, "%s: page tables record: %llu bytes written, %llu planned", fn,
                         (unsigned long long)(at - b), (unsigned long long)len);
    }
    *out = b;
    *out_len = len;
    return PIKV_OK;
}

/* One segment: the PAGE records of pages changed after `since` (all pages when
   full), TABLES, COMMIT. */
static pikv_status write_segment(writer *w, bool full, uint64_t since, uint64_t generation, int64_t *pages_written)
{
    pikv_cache *c = w->c;
    pikv_context *ctx = c->ctx;
    const uint64_t seg_start = w->offset;
    w->seg_records = 0;
    w->seg_crc = 0;
    w->seg_pages = 0;
    const uint64_t pb = c->qdevs && c->qlayout.page_bytes > c->layout.page_bytes ? c->qlayout.page_bytes
                                                                                : c->layout.page_bytes;
    const uint64_t max_page = PIKV_PAGE_FIXED_BYTES + 12ull * (uint64_t)c->params.page_size + pb;
    PIKV_RETURN_ERROR_IF(max_page > PIKV_TABLES_MAX_BYTES, ctx, PIKV_ERR_CAPACITY,
                         "%s: a page record of %llu bytes exceeds the format's %llu", w->fn,
                         (unsigned long long)max_page, (unsigned long long)PIKV_TABLES_MAX_BYTES);
    uint8_t *page = pikv_host_alloc(ctx, (size_t)max_page, 64);
    PIKV_RETURN_ERROR_IF(!page, ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: page record buffer of %llu bytes: allocation failed",
                         w->fn, (unsigned long long)max_page);
    pikv_status st = PIKV_OK;
    for (int64_t id = 0; id < c->pages_high && st == PIKV_OK; id++) {
        const pikv_page_meta *m = &c->pages[id];
        if (m->refs == 0 || (!full && m->mod_seq <= since)) continue;
        uint64_t len = 0;
        st = encode_page(c, (uint32_t)id, page, &len);
        if (st == PIKV_OK) st = put_record(w, PIKV_REC_PAGE, page, len);
        w->seg_pages++;
    }
    pikv_host_free(ctx, page);
    PIKV_FORWARD_IF_ERROR(st);
    uint8_t *tables = NULL;
    uint64_t tables_len = 0;
    PIKV_FORWARD_IF_ERROR(encode_tables(c, w->fn, &tables, &tables_len));
    st = put_record(w, PIKV_REC_TABLES, tables, tables_len);
    pikv_host_free(ctx, tables);
    PIKV_FORWARD_IF_ERROR(st);
    if (w->sync_before_commit) {
        PIKV_FORWARD_IF_ERROR(flush(w));
        if (fsync(w->fd) != 0) return io_fail(c, w->fn, w->name, "fsync before the commit", errno);
    }
    uint8_t commit[PIKV_COMMIT_BYTES];
    pikv_put_u64(commit, generation);
    pikv_put_u64(commit + 8, c->write_seq);
    pikv_put_u64(commit + 16, seg_start);
    pikv_put_u64(commit + 24, (uint64_t)w->seg_pages);
    pikv_put_u64(commit + 32, (uint64_t)c->pages_live);
    pikv_put_u32(commit + 40, w->seg_records);
    pikv_put_u32(commit + 44, w->seg_crc);
    PIKV_FORWARD_IF_ERROR(put_record(w, PIKV_REC_COMMIT, commit, sizeof commit));
    *pages_written = w->seg_pages;
    return flush(w);
}

static pikv_status writer_open(writer *w, pikv_cache *c, const char *fn, const char *name, int fd)
{
    memset(w, 0, sizeof *w);
    w->c = c, w->fn = fn, w->name = name, w->fd = fd;
    struct stat sb;
    w->sock = fstat(fd, &sb) == 0 && S_ISSOCK(sb.st_mode);
    w->cap = 1u << 20;
    w->buf = pikv_host_alloc(c->ctx, w->cap, 64);
    PIKV_RETURN_ERROR_IF(!w->buf, c->ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: write buffer: allocation failed", fn);
    return PIKV_OK;
}


static pikv_status check_cache(pikv_cache *c, const char *fn)
{
    PIKV_RETURN_ERROR_IF(c->comm, c->ctx, PIKV_ERR_UNSUPPORTED,
                         "%s: a cache over ranks (params.comm) cannot be checkpointed: each rank holds only its "
                         "own shards' pages", fn);
    PIKV_RETURN_ERROR_IF(!pikv_host_little_endian(), c->ctx, PIKV_ERR_UNSUPPORTED,
                         "%s: the stream format stores page bytes little-endian: big-endian hosts are not supported",
                         fn);
    return PIKV_OK;
}

/* The directory part of path ("." when none), into buf. */
static void dir_of(const char *path, char *buf, size_t cap)
{
    const char *slash = strrchr(path, '/');
    if (!slash) {
        snprintf(buf, cap, ".");
    } else if (slash == path) {
        snprintf(buf, cap, "/");
    } else {
        snprintf(buf, cap, "%.*s", (int)(slash - path), path);
    }
}

static pikv_status checkpoint_full(pikv_cache *c, const char *path, pikv_checkpoint_stats *stats)
{
    static const char *fn = "pikv_cache_checkpoint";
    pikv_context *ctx = c->ctx;
    const size_t plen = strlen(path);
    char *tmp = pikv_host_alloc(ctx, plen + 16, 16), *dir = pikv_host_alloc(ctx, plen + 2, 16);
    if (!tmp || !dir) {
        pikv_host_free(ctx, tmp);
        pikv_host_free(ctx, dir);
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: %s: allocation failed", fn, path);
    }
    snprintf(tmp, plen + 16, "%s.tmp-XXXXXX", path);
    dir_of(path, dir, plen + 2);
    writer w;
    pikv_status st = writer_open(&w, c, fn, path, -1);
    int fd = -1;
    if (st == PIKV_OK) {
        fd = mkstemp(tmp);
        if (fd < 0) st = io_fail(c, fn, tmp, "cannot create the temporary file", errno);
    }
    w.fd = fd;
    int64_t pages = 0;
    struct stat sb;
    if (st == PIKV_OK) {
        uint8_t h[PIKV_STREAM_HEADER_BYTES];
        encode_header(c, 0, h);
        st = put(&w, h, sizeof h);
    }
    if (st == PIKV_OK) st = write_segment(&w, true, 0, 1, &pages);
    if (st == PIKV_OK && fsync(fd) != 0) st = io_fail(c, fn, tmp, "fsync", errno);
    if (st == PIKV_OK && fstat(fd, &sb) != 0) st = io_fail(c, fn, tmp, "fstat", errno);
    if (fd >= 0 && close(fd) != 0 && st == PIKV_OK) st = io_fail(c, fn, tmp, "close", errno);
    if (st == PIKV_OK && rename(tmp, path) != 0) st = io_fail(c, fn, path, "rename of the temporary file", errno);
    if (st != PIKV_OK) {
        if (fd >= 0) unlink(tmp); /* path still holds the previous checkpoint */
    } else {
        /* the rename is durable once the directory is */
        int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (dfd < 0 || fsync(dfd) != 0) {
            /* path now holds the new checkpoint, but a crash could bring back the old one */
            st = io_fail(c, fn, dir, "fsync of the directory after the rename", errno);
        }
        if (dfd >= 0) close(dfd);
        c->ckpt_valid = true;
        c->ckpt_dev = (uint64_t)sb.st_dev;
        c->ckpt_ino = (uint64_t)sb.st_ino;
        c->ckpt_generation = 1;
        c->ckpt_write_seq = c->write_seq;
        c->ckpt_end = w.offset;
        if (stats) {
            stats->generation = 1;
            stats->pages_written = pages;
            stats->pages_total = c->pages_live;
            stats->bytes_written = w.written;
        }
    }
    pikv_host_free(ctx, w.buf);
    pikv_host_free(ctx, tmp);
    pikv_host_free(ctx, dir);
    return st;
}

/* Reads n bytes at off; a short file is a mismatch, not an I/O error (*short_read). */
static pikv_status pread_all(pikv_cache *c, const char *fn, const char *path, int fd, void *dst, size_t n, uint64_t off,
                             bool *short_read)
{
    uint8_t *p = dst;
    *short_read = false;
    while (n > 0) {
        ssize_t k = pread(fd, p, n, (off_t)off);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) return io_fail(c, fn, path, "read", errno);
        if (k == 0) {
            *short_read = true;
            return PIKV_OK;
        }
        p += k, n -= (size_t)k, off += (uint64_t)k;
    }
    return PIKV_OK;
}

static pikv_status checkpoint_incremental(pikv_cache *c, const char *path, pikv_checkpoint_stats *stats)
{
    static const char *fn = "pikv_cache_checkpoint";
    pikv_context *ctx = c->ctx;
    PIKV_RETURN_ERROR_IF(!c->ckpt_valid, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "%s: %s: INCREMENTAL needs this cache's last checkpoint, and it has written none (or was "
                         "restored since): write a FULL checkpoint first", fn, path);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT ? PIKV_FAIL(ctx, PIKV_ERR_INVALID_ARGUMENT,
                                           "%s: %s does not exist: INCREMENTAL appends to this cache's last "
                                           "checkpoint (write a FULL one first)", fn, path)
                               : io_fail(c, fn, path, "open", errno);
    pikv_status st = PIKV_OK;
    struct stat sb;
    bool short_read = false;
    uint8_t h[PIKV_STREAM_HEADER_BYTES], rec[PIKV_COMMIT_RECORD_BYTES];
    if (fstat(fd, &sb) != 0) st = io_fail(c, fn, path, "fstat", errno);
    /* Is path still the file this cache last committed to, as it left it? */
    if (st == PIKV_OK && ((uint64_t)sb.st_dev != c->ckpt_dev || (uint64_t)sb.st_ino != c->ckpt_ino))
        st = PIKV_FAIL(ctx, PIKV_ERR_INVALID_ARGUMENT,
                       "%s: %s is not the file of this cache's last checkpoint (device/inode %llu/%llu, expected "
                       "%llu/%llu): write a FULL checkpoint to it", fn, path, (unsigned long long)sb.st_dev,
                       (unsigned long long)sb.st_ino, (unsigned long long)c->ckpt_dev,
                       (unsigned long long)c->ckpt_ino);
    if (st == PIKV_OK && (uint64_t)sb.st_size < c->ckpt_end)
        st = PIKV_FAIL(ctx, PIKV_ERR_INVALID_ARGUMENT,
                       "%s: %s holds %llu bytes, less than the %llu of this cache's last checkpoint: it was changed",
                       fn, path, (unsigned long long)sb.st_size, (unsigned long long)c->ckpt_end);
    if (st == PIKV_OK) st = pread_all(c, fn, path, fd, h, sizeof h, 0, &short_read);
    if (st == PIKV_OK && (short_read || memcmp(h, PIKV_STREAM_MAGIC, 8) != 0 ||
                          pikv_get_u32(h + 188) != pikv_crc32c(0, h, 188) || memcmp(h + 24, c->cache_id, 16) != 0))
        st = PIKV_FAIL(ctx, PIKV_ERR_INVALID_ARGUMENT,
                       "%s: %s: its header is not this cache's (another cache's checkpoint, or damaged)", fn, path);
    if (st == PIKV_OK)
        st = pread_all(c, fn, path, fd, rec, sizeof rec, c->ckpt_end - PIKV_COMMIT_RECORD_BYTES, &short_read);
    if (st == PIKV_OK) {
        const uint32_t crc = pikv_crc32c(0, rec, PIKV_REC_HEAD_BYTES + PIKV_COMMIT_BYTES);
        const uint64_t gen = pikv_get_u64(rec + PIKV_REC_HEAD_BYTES);
        if (short_read || pikv_get_u32(rec) != PIKV_REC_COMMIT || pikv_get_u32(rec + 4) != PIKV_COMMIT_BYTES ||
            pikv_get_u32(rec + PIKV_REC_HEAD_BYTES + PIKV_COMMIT_BYTES) != crc || gen != c->ckpt_generation)
            st = PIKV_FAIL(ctx, PIKV_ERR_INVALID_ARGUMENT,
                           "%s: %s: no commit of generation %llu at byte %llu, where this cache's last checkpoint "
                           "ended: the file was changed", fn, path, (unsigned long long)c->ckpt_generation,
                           (unsigned long long)(c->ckpt_end - PIKV_COMMIT_RECORD_BYTES));
    }
    /* a torn tail (an earlier write that failed before its commit) goes first */
    if (st == PIKV_OK && (uint64_t)sb.st_size > c->ckpt_end && ftruncate(fd, (off_t)c->ckpt_end) != 0)
        st = io_fail(c, fn, path, "truncating the unfinished tail", errno);
    if (st == PIKV_OK && lseek(fd, (off_t)c->ckpt_end, SEEK_SET) < 0) st = io_fail(c, fn, path, "lseek", errno);
    writer w;
    memset(&w, 0, sizeof w);
    if (st == PIKV_OK) st = writer_open(&w, c, fn, path, fd);
    w.offset = c->ckpt_end;
    w.sync_before_commit = true;
    int64_t pages = 0;
    const uint64_t gen = c->ckpt_generation + 1;
    if (st == PIKV_OK) st = write_segment(&w, false, c->ckpt_write_seq, gen, &pages);
    if (st == PIKV_OK && fsync(fd) != 0) st = io_fail(c, fn, path, "fsync", errno);
    if (st != PIKV_OK && w.buf) {
        /* drop what this call appended (best effort: restore ignores an uncommitted tail anyway) */
        if (ftruncate(fd, (off_t)c->ckpt_end) == 0) (void)fsync(fd);
    }
    if (close(fd) != 0 && st == PIKV_OK) st = io_fail(c, fn, path, "close", errno);
    if (st == PIKV_OK) {
        c->ckpt_generation = gen;
        c->ckpt_write_seq = c->write_seq;
        c->ckpt_end = w.offset;
        if (stats) {
            stats->generation = gen;
            stats->pages_written = pages;
            stats->pages_total = c->pages_live;
            stats->bytes_written = w.written;
        }
    }
    pikv_host_free(ctx, w.buf);
    return st;
}

pikv_status pikv_cache_checkpoint(pikv_cache *c, const char *path, pikv_checkpoint_mode mode,
                                  pikv_checkpoint_stats *stats)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    static const char *fn = "pikv_cache_checkpoint";
    PIKV_RETURN_ERROR_IF(!path || !path[0], c->ctx, PIKV_ERR_INVALID_ARGUMENT, "%s: path is %s", fn,
                         !path ? "NULL" : "empty");
    PIKV_RETURN_ERROR_IF(mode != PIKV_CHECKPOINT_FULL && mode != PIKV_CHECKPOINT_INCREMENTAL, c->ctx,
                         PIKV_ERR_INVALID_ARGUMENT, "%s: mode = %d is not a pikv_checkpoint_mode", fn, (int)mode);
    PIKV_FORWARD_IF_ERROR(check_cache(c, fn));
    pikv_checkpoint_stats s;
    memset(&s, 0, sizeof s);
    const double t0 = pikv_monotonic_s();
    pikv_status st = mode == PIKV_CHECKPOINT_FULL ? checkpoint_full(c, path, &s) : checkpoint_incremental(c, path, &s);
    s.seconds = pikv_monotonic_s() - t0;
    if (st == PIKV_OK && stats) *stats = s;
    return st;
}

pikv_status pikv_cache_stream_out(pikv_cache *c, int fd, pikv_checkpoint_stats *stats)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    static const char *fn = "pikv_cache_stream_out";
    PIKV_RETURN_ERROR_IF(fd < 0, c->ctx, PIKV_ERR_INVALID_ARGUMENT, "%s: fd = %d is not a descriptor", fn, fd);
    PIKV_FORWARD_IF_ERROR(check_cache(c, fn));
    const double t0 = pikv_monotonic_s();
    char name[32];
    snprintf(name, sizeof name, "fd %d", fd);
    writer w;
    pikv_status st = writer_open(&w, c, fn, name, fd);
    int64_t pages = 0;
    if (st == PIKV_OK) {
        uint8_t h[PIKV_STREAM_HEADER_BYTES];
        encode_header(c, PIKV_STREAM_FLAG_STREAM, h);
        st = put(&w, h, sizeof h);
    }
    if (st == PIKV_OK) st = write_segment(&w, true, 0, 1, &pages);
    if (st == PIKV_OK && stats) {
        stats->generation = 1;
        stats->pages_written = pages;
        stats->pages_total = c->pages_live;
        stats->bytes_written = w.written;
        stats->seconds = pikv_monotonic_s() - t0;
    }
    pikv_host_free(c->ctx, w.buf);
    return st;
}
