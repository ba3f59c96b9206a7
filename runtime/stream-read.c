/*
 * Checkpoints and streams, the reading side (docs/stream.md). Restore reads and
 * validates everything into host memory first (header, every record's CRC32C, each
 * segment's commit), keeping for each page id its latest committed record; then it
 * checks the result against the target cache (empty, same geometry, ids and tokens
 * that fit), reserves everything, writes the pages, and only then builds the
 * metadata. A failure before that last step leaves the cache as it was.
 *
 * Torn tails: a segment whose commit record is missing or damaged, with no valid
 * commit after it, is an unfinished checkpoint and is ignored. A record that breaks
 * the framing (bad type, length, or CRC of a TABLES or COMMIT record) with a valid
 * commit somewhere after it is corruption: the file is refused. A PAGE record with a
 * bad CRC or inconsistent fields is skipped; the (sequence, layer) pairs whose page
 * tables need it are restored empty and reported.
 */
#include "crc32c.h"
#include "stream.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---- input: a descriptor (file or stream) or memory ----------------------------------- */

typedef struct reader {
    pikv_context *ctx;
    const char *fn, *name;
    int fd;              /* -1: memory */
    const uint8_t *mem;
    uint64_t size;       /* bytes in all, when size_known */
    bool size_known;     /* regular file or memory: random access too (scan_for_commit) */
    bool stream;         /* one stream: stop at its commit, and no torn tail allowed */
    uint64_t at;         /* bytes consumed */
} reader;

static pikv_status io_fail(reader *r, const char *what, int err)
{
    char msg[128] = "";
    if (strerror_r(err, msg, sizeof msg) != 0) snprintf(msg, sizeof msg, "errno %d", err);
    return PIKV_FAIL(r->ctx, PIKV_ERR_BACKEND, "%s: %s: %s at byte %llu: %s", r->fn, r->name, what,
                     (unsigned long long)r->at, msg);
}

/* Up to n bytes at off (random access: files and memory). */
static pikv_status rd_pread(reader *r, uint64_t off, void *dst, size_t n, size_t *got)
{
    *got = 0;
    if (r->fd < 0) {
        if (off >= r->size) return PIKV_OK;
        *got = r->size - off < n ? (size_t)(r->size - off) : n;
        memcpy(dst, r->mem + off, *got);
        return PIKV_OK;
    }
    uint8_t *p = dst;
    while (*got < n) {
        ssize_t k = pread(r->fd, p + *got, n - *got, (off_t)(off + *got));
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) return io_fail(r, "read", errno);
        if (k == 0) break;
        *got += (size_t)k;
    }
    return PIKV_OK;
}

/* Up to n bytes from the current position (fewer only at the end). Never reads ahead,
   so a stream's bytes after its commit stay in the descriptor. */
static pikv_status rd_read(reader *r, void *dst, size_t n, size_t *got)
{
    *got = 0;
    if (r->fd < 0 || r->size_known) {
        PIKV_FORWARD_IF_ERROR(rd_pread(r, r->at, dst, n, got));
    } else {
        uint8_t *p = dst;
        while (*got < n) {
            ssize_t k = read(r->fd, p + *got, n - *got);
            if (k < 0 && errno == EINTR) continue;
            if (k < 0) return io_fail(r, "read", errno);
            if (k == 0) break;
            *got += (size_t)k;
        }
    }
    r->at += *got;
    return PIKV_OK;
}

/* ---- page id -> index maps (open addressing) -------------------------------------------- */

typedef struct idmap {
    uint32_t *keys;
    int64_t *vals; /* -1: empty */
    uint64_t cap, n;
} idmap;

static uint64_t id_hash(uint32_t id, uint64_t cap) { return ((uint64_t)id * 0x9e3779b97f4a7c15ull >> 20) & (cap - 1); }

static int64_t idmap_get(const idmap *m, uint32_t id)
{
    if (m->cap == 0) return -1;
    for (uint64_t i = id_hash(id, m->cap);; i = (i + 1) & (m->cap - 1)) {
        if (m->vals[i] < 0) return -1;
        if (m->keys[i] == id) return m->vals[i];
    }
}

static void idmap_free(pikv_context *ctx, idmap *m)
{
    pikv_host_free(ctx, m->keys);
    pikv_host_free(ctx, m->vals);
    memset(m, 0, sizeof *m);
}

/* Inserts or replaces. */
static pikv_status idmap_put(pikv_context *ctx, idmap *m, uint32_t id, int64_t val)
{
    if (2 * (m->n + 1) > m->cap) {
        idmap g = {NULL, NULL, m->cap ? 2 * m->cap : 64, 0};
        g.keys = pikv_host_alloc(ctx, g.cap * sizeof *g.keys, 64);
        g.vals = pikv_host_alloc(ctx, g.cap * sizeof *g.vals, 64);
        if (!g.keys || !g.vals) {
            idmap_free(ctx, &g);
            return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "restore: page id map of %llu entries: allocation failed",
                             (unsigned long long)g.cap);
        }
        for (uint64_t i = 0; i < g.cap; i++) g.vals[i] = -1;
        for (uint64_t i = 0; i < m->cap; i++)
            if (m->vals[i] >= 0) {
                uint64_t j = id_hash(m->keys[i], g.cap);
                while (g.vals[j] >= 0) j = (j + 1) & (g.cap - 1);
                g.keys[j] = m->keys[i], g.vals[j] = m->vals[i], g.n++;
            }
        idmap_free(ctx, m);
        *m = g;
    }
    uint64_t i = id_hash(id, m->cap);
    while (m->vals[i] >= 0 && m->keys[i] != id) i = (i + 1) & (m->cap - 1);
    if (m->vals[i] < 0) m->n++;
    m->keys[i] = id;
    m->vals[i] = val;
    return PIKV_OK;
}

/* ---- parse state -------------------------------------------------------------------------- */

typedef struct page_rec {
    uint32_t id;
    int32_t layer, shard, n_tokens, quant;
    uint64_t mod_seq;
    uint8_t *payload; /* the record's payload: rows at PIKV_PAGE_FIXED_BYTES, then the page bytes */
} page_rec;

typedef struct parse {
    pikv_cache *c;
    reader *r;
    /* committed: the latest record of each page id (map: id -> index in recs) */
    page_rec *recs;
    int64_t n_recs, cap_recs;
    idmap map;
    uint8_t *tables;
    uint64_t tables_len;
    uint64_t generation, write_seq, pages_total;
    uint32_t version; /* of the file's format */
    int64_t bad_records;
    /* the segment being read */
    page_rec *pend;
    int64_t n_pend, cap_pend;
    uint8_t *pend_tables;
    uint64_t pend_tables_len;
    int32_t pend_n_tables;
    uint32_t seg_records, seg_crc;
    int64_t seg_pages, seg_bad;
    uint64_t seg_start;
    int64_t n_record; /* records read, for messages */
} parse;

static void parse_free(parse *p)
{
    pikv_context *ctx = p->c->ctx;
    for (int64_t i = 0; i < p->n_recs; i++) pikv_host_free(ctx, p->recs[i].payload);
    for (int64_t i = 0; i < p->n_pend; i++) pikv_host_free(ctx, p->pend[i].payload);
    pikv_host_free(ctx, p->recs);
    pikv_host_free(ctx, p->pend);
    pikv_host_free(ctx, p->tables);
    pikv_host_free(ctx, p->pend_tables);
    idmap_free(ctx, &p->map);
}

static void drop_pending(parse *p)
{
    for (int64_t i = 0; i < p->n_pend; i++) pikv_host_free(p->c->ctx, p->pend[i].payload);
    p->n_pend = 0;
    pikv_host_free(p->c->ctx, p->pend_tables);
    p->pend_tables = NULL;
    p->pend_tables_len = 0;
    p->pend_n_tables = 0;
    p->seg_records = p->seg_crc = 0;
    p->seg_pages = p->seg_bad = 0;
}

/* The geometry of the header against the cache's, field by field. */
static pikv_status check_header(parse *p, const uint8_t *h)
{
    reader *r = p->r;
    pikv_cache *c = p->c;
    pikv_context *ctx = c->ctx;
    PIKV_RETURN_ERROR_IF(memcmp(h, PIKV_STREAM_MAGIC, 8) != 0, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "%s: %s: not a PiKV checkpoint (magic %02x %02x %02x %02x %02x %02x %02x %02x)", r->fn,
                         r->name, h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]);
    const uint32_t crc = pikv_crc32c(0, h, 188), stored = pikv_get_u32(h + 188);
    PIKV_RETURN_ERROR_IF(crc != stored, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "%s: %s: header CRC32C 0x%08x, stored 0x%08x: the header is damaged", r->fn, r->name, crc,
                         stored);
    const uint32_t version = pikv_get_u32(h + 8);
    PIKV_RETURN_ERROR_IF(version < PIKV_STREAM_VERSION_OLDEST || version > PIKV_STREAM_VERSION, ctx,
                         PIKV_ERR_UNSUPPORTED, "%s: %s: format version %u, this library reads versions %u to %u",
                         r->fn, r->name, version, PIKV_STREAM_VERSION_OLDEST, PIKV_STREAM_VERSION);
    p->version = version;
    PIKV_RETURN_ERROR_IF(pikv_get_u32(h + 12) != PIKV_STREAM_HEADER_BYTES, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "%s: %s: header of %u bytes, version %u has %u", r->fn, r->name, pikv_get_u32(h + 12),
                         version, PIKV_STREAM_HEADER_BYTES);
    const pikv_cache_params *cp = &c->params;
    static const char *names[12] = {"n_layers", "n_q_heads", "n_kv_heads", "head_dim", "n_experts",
                                    "experts_per_token", "page_size", "dtype", "quant_group", "placement",
                                    "n_shards", "hash_tokens"};
    const int32_t mine[12] = {cp->n_layers, cp->n_q_heads, cp->n_kv_heads, cp->head_dim, cp->n_experts,
                              cp->experts_per_token, cp->page_size, (int32_t)cp->dtype, cp->quant_group,
                              (int32_t)cp->placement, c->n_shards, cp->hash_tokens};
    for (int i = 0; i < 12; i++) {
        const int32_t theirs = (int32_t)pikv_get_u32(h + 40 + 4 * i);
        PIKV_RETURN_ERROR_IF(theirs != mine[i], ctx, PIKV_ERR_INVALID_ARGUMENT,
                             "%s: %s: %s = %d in the checkpoint, %d in the cache", r->fn, r->name, names[i], theirs,
                             mine[i]);
    }
    const uint64_t pb = pikv_get_u64(h + 88), qpb = pikv_get_u64(h + 96);
    const uint64_t my_qpb = c->qdevs ? c->qlayout.page_bytes : 0;
    PIKV_RETURN_ERROR_IF(pb != c->layout.page_bytes || qpb != my_qpb, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "%s: %s: page bytes %llu and %llu (quantized) in the checkpoint, %llu and %llu in the cache",
                         r->fn, r->name, (unsigned long long)pb, (unsigned long long)qpb,
                         (unsigned long long)c->layout.page_bytes, (unsigned long long)my_qpb);
    return PIKV_OK;
}

/* Expected payload bytes of a PAGE record, from its fixed part. */
static uint64_t page_len(const pikv_cache *c, int32_t n_tokens, int32_t quant)
{
    return PIKV_PAGE_FIXED_BYTES + 12ull * (uint64_t)n_tokens +
           (quant ? c->qlayout.page_bytes : c->layout.page_bytes);
}

/* The fields of a PAGE payload whose CRC is right; false when inconsistent. */
static bool decode_page(const pikv_cache *c, uint8_t *b, uint64_t len, page_rec *out)
{
    const pikv_cache_params *cp = &c->params;
    page_rec pr = {pikv_get_u32(b), (int32_t)pikv_get_u32(b + 4), (int32_t)pikv_get_u32(b + 8),
                   (int32_t)pikv_get_u32(b + 12), (int32_t)pikv_get_u32(b + 16), pikv_get_u64(b + 24), b};
    if (pr.layer < 0 || pr.layer >= cp->n_layers || pr.shard < 0 || pr.shard >= c->n_shards) return false;
    if (pr.n_tokens < 1 || pr.n_tokens > cp->page_size || (pr.quant != 0 && pr.quant != 1)) return false;
    /* only full pages of INT8/INT4 caches are quantized */
    if (pr.quant && (!c->qdevs || pr.n_tokens != cp->page_size)) return false;
    /* ... and every full page of those caches is (pages are quantized as they fill) */
    if (c->qdevs && pr.n_tokens == cp->page_size && !pr.quant) return false;
    if (len != page_len(c, pr.n_tokens, pr.quant)) return false;
    if (pikv_get_u32(b + 20) != (pr.quant ? c->qlayout.page_bytes : c->layout.page_bytes)) return false;
    const uint8_t *rows = b + PIKV_PAGE_FIXED_BYTES;
    const size_t n = (size_t)pr.n_tokens;
    for (size_t i = 0; i < n; i++) {
        const int32_t idx = (int32_t)pikv_get_u32(rows + 4 * (n + i));
        const int32_t e = (int32_t)pikv_get_u32(rows + 4 * (2 * n + i));
        if (idx < 0 || (i > 0 && idx <= (int32_t)pikv_get_u32(rows + 4 * (n + i - 1)))) return false;
        if (e < 0 || e >= cp->n_experts) return false;
    }
    *out = pr;
    return true;
}

static pikv_status grow_recs(pikv_context *ctx, page_rec **a, int64_t *cap, int64_t need)
{
    return pikv_host_reserve(ctx, (void **)a, sizeof **a, cap, need);
}

/* A valid commit: the pending segment becomes the committed state. */
static pikv_status commit_segment(parse *p, const uint8_t *b)
{
    pikv_context *ctx = p->c->ctx;
    PIKV_FORWARD_IF_ERROR(grow_recs(ctx, &p->recs, &p->cap_recs, p->n_recs + p->n_pend));
    for (int64_t i = 0; i < p->n_pend; i++) {
        const int64_t at = idmap_get(&p->map, p->pend[i].id);
        if (at >= 0) { /* a newer version of the page */
            pikv_host_free(ctx, p->recs[at].payload);
            p->recs[at] = p->pend[i];
        } else {
            PIKV_FORWARD_IF_ERROR(idmap_put(ctx, &p->map, p->pend[i].id, p->n_recs));
            p->recs[p->n_recs++] = p->pend[i];
        }
        p->pend[i].payload = NULL;
    }
    p->n_pend = 0;
    pikv_host_free(ctx, p->tables);
    p->tables = p->pend_tables;
    p->tables_len = p->pend_tables_len;
    p->pend_tables = NULL;
    p->generation = pikv_get_u64(b);
    p->write_seq = pikv_get_u64(b + 8);
    p->pages_total = pikv_get_u64(b + 32);
    p->bad_records += p->seg_bad;
    drop_pending(p);
    return PIKV_OK;
}

/* Whether a CRC-valid COMMIT record starts anywhere in [from, size). */
static pikv_status scan_for_commit(parse *p, uint64_t from, uint64_t *found)
{
    reader *r = p->r;
    *found = UINT64_MAX;
    const size_t chunk = 1u << 20, rec = PIKV_COMMIT_RECORD_BYTES;
    uint8_t *buf = pikv_host_alloc(p->c->ctx, chunk + rec, 64);
    PIKV_RETURN_ERROR_IF(!buf, p->c->ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: %s: scan buffer: allocation failed", r->fn,
                         r->name);
    pikv_status st = PIKV_OK;
    for (uint64_t off = from; off + rec <= r->size && *found == UINT64_MAX; off += chunk) {
        size_t got = 0;
        st = rd_pread(r, off, buf, chunk + rec - 1, &got);
        if (st != PIKV_OK) break;
        for (size_t i = 0; i + rec <= got && i < chunk; i++)
            if (buf[i] == PIKV_REC_COMMIT && buf[i + 1] == 0 && buf[i + 2] == 0 && buf[i + 3] == 0 &&
                pikv_get_u32(buf + i + 4) == PIKV_COMMIT_BYTES &&
                pikv_crc32c(0, buf + i, rec - 4) == pikv_get_u32(buf + i + rec - 4)) {
                *found = off + i;
                break;
            }
    }
    pikv_host_free(p->c->ctx, buf);
    return st;
}

/* The framing broke at a record (reason given): a torn tail if no valid commit follows,
   else damage before the last commit. Returns PIKV_OK to stop reading (tail ignored). */
static pikv_status framing_break(parse *p, uint64_t rec_off, const char *reason)
{
    reader *r = p->r;
    pikv_context *ctx = p->c->ctx;
    if (r->stream)
        return PIKV_FAIL(ctx, PIKV_ERR_INVALID_ARGUMENT, "%s: %s: record %lld at byte %llu: %s (before the stream's "
                         "commit record)", r->fn, r->name, (long long)p->n_record, (unsigned long long)rec_off,
                         reason);
    uint64_t found;
    PIKV_FORWARD_IF_ERROR(scan_for_commit(p, rec_off + 1, &found));
    if (found != UINT64_MAX)
        return PIKV_FAIL(ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "%s: %s: record %lld at byte %llu: %s, and a commit record follows at byte %llu: the "
                         "file is damaged", r->fn, r->name, (long long)p->n_record, (unsigned long long)rec_off,
                         reason, (unsigned long long)found);
    if (rec_off < r->size)
        pikv_log(ctx, PIKV_LOG_INFO, "%s: %s: ignoring the %llu bytes after the last commit (an unfinished "
                 "checkpoint: %s)", r->fn, r->name, (unsigned long long)(r->size - p->seg_start), reason);
    drop_pending(p);
    return PIKV_OK;
}

/* A record's payload: allocated whole when the size is known (the length was checked
   against what is left), else grown as bytes arrive so a forged length costs nothing. */
static pikv_status read_payload(parse *p, uint64_t len, uint8_t **out, bool *torn)
{
    reader *r = p->r;
    pikv_context *ctx = p->c->ctx;
    *out = NULL;
    *torn = false;
    uint64_t cap = r->size_known || len <= (1u << 20) ? len : (1u << 20);
    uint8_t *buf = pikv_host_alloc(ctx, (size_t)(cap ? cap : 1), 64);
    PIKV_RETURN_ERROR_IF(!buf, ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: %s: record of %llu bytes: allocation failed", r->fn,
                         r->name, (unsigned long long)len);
    uint64_t have = 0;
    while (have < len) {
        if (have == cap) {
            const uint64_t ncap = cap * 2 < len ? cap * 2 : len;
            uint8_t *nb = pikv_host_alloc(ctx, (size_t)ncap, 64);
            if (!nb) {
                pikv_host_free(ctx, buf);
                return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: %s: record of %llu bytes: allocation failed",
                                 r->fn, r->name, (unsigned long long)len);
            }
            memcpy(nb, buf, (size_t)have);
            pikv_host_free(ctx, buf);
            buf = nb, cap = ncap;
        }
        size_t got = 0;
        pikv_status st = rd_read(r, buf + have, (size_t)(cap - have), &got);
        if (st != PIKV_OK) {
            pikv_host_free(ctx, buf);
            return st;
        }
        if (got == 0) {
            pikv_host_free(ctx, buf);
            *torn = true;
            return PIKV_OK;
        }
        have += got;
    }
    *out = buf;
    return PIKV_OK;
}

/* Reads the header and every record; leaves the last committed state in p. */
static pikv_status parse_all(parse *p)
{
    reader *r = p->r;
    pikv_cache *c = p->c;
    pikv_context *ctx = c->ctx;
    uint8_t h[PIKV_STREAM_HEADER_BYTES];
    size_t got = 0;
    PIKV_FORWARD_IF_ERROR(rd_read(r, h, sizeof h, &got));
    PIKV_RETURN_ERROR_IF(got == 0, ctx, PIKV_ERR_INVALID_ARGUMENT, "%s: %s: empty (0 bytes): no checkpoint header",
                         r->fn, r->name);
    PIKV_RETURN_ERROR_IF(got < sizeof h, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "%s: %s: %zu bytes, less than the %u of a checkpoint header", r->fn, r->name, got,
                         PIKV_STREAM_HEADER_BYTES);
    PIKV_FORWARD_IF_ERROR(check_header(p, h));
    p->seg_start = r->at;
    const uint64_t max_page = page_len(c, c->params.page_size, c->qdevs && c->qlayout.page_bytes > c->layout.page_bytes);
    char why[160];
    for (;;) {
        const uint64_t rec_off = r->at;
        uint8_t head[PIKV_REC_HEAD_BYTES];
        PIKV_FORWARD_IF_ERROR(rd_read(r, head, sizeof head, &got));
        p->n_record++;
        if (got == 0 && !r->stream) return PIKV_OK; /* the end, at a record boundary */
        if (got < sizeof head) {
            snprintf(why, sizeof why, "the data ends inside the record header (%zu of %u bytes)", got,
                     PIKV_REC_HEAD_BYTES);
            return framing_break(p, rec_off, why);
        }
        const uint32_t type = pikv_get_u32(head), len = pikv_get_u32(head + 4);
        const uint64_t max = type == PIKV_REC_PAGE ? max_page : type == PIKV_REC_TABLES ? PIKV_TABLES_MAX_BYTES
                                                                                         : PIKV_COMMIT_BYTES;
        if (type < PIKV_REC_PAGE || type > PIKV_REC_COMMIT) {
            snprintf(why, sizeof why, "type %u is not a record type", type);
            return framing_break(p, rec_off, why);
        }
        if (len > max || (type == PIKV_REC_COMMIT && len != PIKV_COMMIT_BYTES) ||
            (type == PIKV_REC_PAGE && len < PIKV_PAGE_FIXED_BYTES)) {
            snprintf(why, sizeof why, "length %u is impossible for a %s record (at most %llu)", len,
                     type == PIKV_REC_PAGE ? "PAGE" : type == PIKV_REC_TABLES ? "TABLES" : "COMMIT",
                     (unsigned long long)max);
            return framing_break(p, rec_off, why);
        }
        if (r->size_known && (uint64_t)len + PIKV_REC_CRC_BYTES > r->size - r->at) {
            snprintf(why, sizeof why, "length %u runs past the end (%llu bytes)", len, (unsigned long long)r->size);
            return framing_break(p, rec_off, why);
        }
        uint8_t *payload = NULL;
        bool torn = false;
        PIKV_FORWARD_IF_ERROR(read_payload(p, len, &payload, &torn));
        uint8_t tail[PIKV_REC_CRC_BYTES];
        if (!torn) {
            pikv_status st = rd_read(r, tail, sizeof tail, &got);
            if (st != PIKV_OK) {
                pikv_host_free(ctx, payload);
                return st;
            }
            torn = got < sizeof tail;
        }
        if (torn) {
            pikv_host_free(ctx, payload);
            snprintf(why, sizeof why, "the data ends inside the record (%u bytes of payload)", len);
            return framing_break(p, rec_off, why);
        }
        const uint32_t stored = pikv_get_u32(tail);
        const uint32_t crc = pikv_crc32c(pikv_crc32c(0, head, sizeof head), payload, len);
        if (crc != stored && type != PIKV_REC_PAGE) {
            pikv_host_free(ctx, payload);
            snprintf(why, sizeof why, "%s record CRC32C 0x%08x, stored 0x%08x", type == PIKV_REC_TABLES ? "TABLES" : "COMMIT",
                     crc, stored);
            return framing_break(p, rec_off, why);
        }
        if (type == PIKV_REC_COMMIT) {
            const uint64_t gen = pikv_get_u64(payload), start = pikv_get_u64(payload + 16);
            const uint64_t pages = pikv_get_u64(payload + 24);
            const uint32_t records = pikv_get_u32(payload + 40), seg_crc = pikv_get_u32(payload + 44);
            const bool ok = gen == p->generation + 1 && start == p->seg_start && records == p->seg_records &&
                            seg_crc == p->seg_crc && pages == (uint64_t)p->seg_pages && p->pend_n_tables == 1;
            if (!ok) {
                pikv_host_free(ctx, payload);
                return PIKV_FAIL(ctx, PIKV_ERR_INVALID_ARGUMENT,
                                 "%s: %s: record %lld at byte %llu: the commit of generation %llu (segment at byte "
                                 "%llu, %u records, %llu pages, CRC 0x%08x) does not match what precedes it "
                                 "(generation %llu, segment at byte %llu, %u records of which %d TABLES, %lld pages, "
                                 "CRC 0x%08x): the file is damaged",
                                 r->fn, r->name, (long long)p->n_record, (unsigned long long)rec_off,
                                 (unsigned long long)gen, (unsigned long long)start, records,
                                 (unsigned long long)pages, seg_crc, (unsigned long long)p->generation + 1,
                                 (unsigned long long)p->seg_start, p->seg_records, p->pend_n_tables,
                                 (long long)p->seg_pages, p->seg_crc);
            }
            pikv_status st = commit_segment(p, payload);
            pikv_host_free(ctx, payload);
            PIKV_FORWARD_IF_ERROR(st);
            p->seg_start = r->at;
            if (r->stream) return PIKV_OK; /* one stream ends at its commit */
            continue;
        }
        /* the commit covers the records' framing (type, length), not their CRCs: a PAGE
           record damaged anywhere, its CRC included, costs only that page */
        p->seg_records++;
        p->seg_crc = pikv_crc32c(p->seg_crc, head, sizeof head);
        if (type == PIKV_REC_TABLES) {
            pikv_host_free(ctx, p->pend_tables);
            p->pend_tables = payload;
            p->pend_tables_len = len;
            p->pend_n_tables++;
            continue;
        }
        p->seg_pages++;
        page_rec pr;
        if (crc != stored || !decode_page(c, payload, len, &pr)) { /* damaged: its pages' users fail */
            p->seg_bad++;
            pikv_log(ctx, PIKV_LOG_WARN, "%s: %s: record %lld at byte %llu: PAGE record %s: skipped", r->fn, r->name,
                     (long long)p->n_record, (unsigned long long)rec_off,
                     crc != stored ? "with a bad CRC32C" : "with inconsistent fields");
            pikv_host_free(ctx, payload);
            continue;
        }
        pikv_status st = grow_recs(ctx, &p->pend, &p->cap_pend, p->n_pend + 1);
        if (st != PIKV_OK) {
            pikv_host_free(ctx, payload);
            return st;
        }
        p->pend[p->n_pend++] = pr;
    }
}

/* ---- the committed tables, checked against the target cache --------------------------------- */

typedef struct plan {
    /* live page entries of TABLES */
    uint32_t n_pages;
    const uint8_t *entries;   /* [n_pages][PIKV_TABLES_PAGE_BYTES] */
    int64_t *rec_of;          /* [n_pages] index into recs, -1 = missing, stale or damaged */
    int32_t *refs;            /* [n_pages] references from restored page tables */
    uint32_t *new_id;         /* [n_pages] */
    int32_t *dev;             /* [n_pages] */
    idmap entry_of;           /* page id -> entry */
    int32_t *shard_dev;       /* [n_layers][n_shards] target device of each shard */
    uint8_t *pair_ok;         /* [max_sequences][n_layers] of the target */
    const uint8_t *seqs;      /* the sequences part of TABLES */
    uint64_t seqs_len;
    uint32_t n_seqs;
    int64_t restored_pages;
} plan;

static void plan_free(pikv_context *ctx, plan *pl)
{
    pikv_host_free(ctx, pl->rec_of);
    pikv_host_free(ctx, pl->refs);
    pikv_host_free(ctx, pl->new_id);
    pikv_host_free(ctx, pl->dev);
    pikv_host_free(ctx, pl->shard_dev);
    pikv_host_free(ctx, pl->pair_ok);
    idmap_free(ctx, &pl->entry_of);
}

typedef struct cursor {
    const uint8_t *b;
    uint64_t len, at;
} cursor;

static bool cur_has(const cursor *k, uint64_t n) { return k->len - k->at >= n; }
static uint32_t cur_u32(cursor *k)
{
    uint32_t v = pikv_get_u32(k->b + k->at);
    k->at += 4;
    return v;
}
static uint64_t cur_u64(cursor *k)
{
    uint64_t v = pikv_get_u64(k->b + k->at);
    k->at += 8;
    return v;
}

#define TABLES_FAIL(p, ...) \
    pikv_fail((p)->c->ctx, PIKV_ERR_INVALID_ARGUMENT, __FILE__, __LINE__, __VA_ARGS__)

/* Walks the sequences part of TABLES: checks its structure, decides which (sequence,
   layer) pairs restore (pair_ok 1) or fail (2, reported), and counts every reference of
   each listed page (for the check that each is used). */
static pikv_status walk_sequences(parse *p, plan *pl, pikv_restore_report *report)
{
    pikv_cache *c = p->c;
    reader *r = p->r;
    const int32_t nl = c->params.n_layers, ns = c->n_shards;
    cursor k = {pl->seqs, pl->seqs_len, 0};
    for (uint32_t i = 0; i < pl->n_seqs; i++) {
        if (!cur_has(&k, 4)) return TABLES_FAIL(p, "%s: %s: the page tables end inside sequence entry %u", r->fn, r->name, i);
        const int32_t q = (int32_t)cur_u32(&k);
        PIKV_RETURN_ERROR_IF(q < 0 || q >= c->params.max_sequences, c->ctx, PIKV_ERR_OUT_OF_RANGE,
                             "%s: %s: sequence %d of the checkpoint is outside 0..%d of the cache (max_sequences)",
                             r->fn, r->name, q, c->params.max_sequences - 1);
        uint8_t *ok = pl->pair_ok + (size_t)q * (size_t)nl;
        if (ok[0] != 0) return TABLES_FAIL(p, "%s: %s: sequence %d appears twice in the page tables", r->fn, r->name, q);
        for (int32_t l = 0; l < nl; l++) {
            if (!cur_has(&k, 16))
                return TABLES_FAIL(p, "%s: %s: the page tables end inside sequence %d, layer %d", r->fn, r->name, q, l);
            const int64_t next = (int64_t)cur_u64(&k), n_tokens = (int64_t)cur_u64(&k);
            if (n_tokens < 0 || n_tokens > next || next > INT32_MAX)
                return TABLES_FAIL(p, "%s: %s: sequence %d, layer %d: n_tokens %lld, next index %lld: inconsistent",
                                   r->fn, r->name, q, l, (long long)n_tokens, (long long)next);
            bool good = true;
            int64_t sum = 0;
            for (int32_t s = 0; s < ns; s++) {
                if (!cur_has(&k, 4))
                    return TABLES_FAIL(p, "%s: %s: the page tables end inside sequence %d, layer %d", r->fn, r->name, q, l);
                const uint32_t count = cur_u32(&k);
                if (!cur_has(&k, 4ull * count))
                    return TABLES_FAIL(p, "%s: %s: sequence %d, layer %d, shard %d: %u pages run past the page tables",
                                       r->fn, r->name, q, l, s, count);
                for (uint32_t j = 0; j < count; j++) {
                    const uint32_t id = cur_u32(&k);
                    const int64_t e = idmap_get(&pl->entry_of, id);
                    if (e < 0)
                        return TABLES_FAIL(p, "%s: %s: sequence %d, layer %d, shard %d holds page %u, which the page "
                                           "tables do not list", r->fn, r->name, q, l, s, id);
                    const int32_t before = pl->refs[e]++; /* every reference: each listed page must be used */
                    const int64_t ri = pl->rec_of[e];
                    if (ri < 0 || p->recs[ri].layer != l || p->recs[ri].shard != s) {
                        good = false;
                        continue;
                    }
                    const page_rec *pr = &p->recs[ri];
                    /* Only the back page of a ring may be partial (appends write into it), and
                       it belongs to that ring alone (prefix copies copy partial pages): a file
                       that breaks this would have appends write into another sequence's page. */
                    if (pr->n_tokens < c->params.page_size && (j + 1 != count || before > 0))
                        return TABLES_FAIL(p, "%s: %s: sequence %d, layer %d, shard %d: partial page %u (%d tokens) "
                                           "is %s", r->fn, r->name, q, l, s, id, pr->n_tokens,
                                           before > 0 ? "held by more than one page table" : "not the last of its ring");
                    /* its rows' token indices must lie below the layer's next index */
                    const uint8_t *rows = pr->payload + PIKV_PAGE_FIXED_BYTES;
                    const int64_t last = (int64_t)(int32_t)pikv_get_u32(rows + 4 * ((size_t)pr->n_tokens + (size_t)pr->n_tokens - 1));
                    if (last < 0 || last >= next) good = false;
                    sum += pr->n_tokens;
                }
            }
            if (good && sum != n_tokens) good = false; /* pages and table disagree */
            ok[l] = good ? 1 : 2;
            if (!good && report) {
                if (report->n_failed < report->failed_cap && report->failed_seq && report->failed_layer) {
                    report->failed_seq[report->n_failed] = q;
                    report->failed_layer[report->n_failed] = l;
                }
                if (report->n_failed < INT32_MAX) report->n_failed++;
            }
        }
    }
    if (k.at != k.len)
        return TABLES_FAIL(p, "%s: %s: %llu bytes after the last sequence of the page tables", r->fn, r->name,
                           (unsigned long long)(k.len - k.at));
    return PIKV_OK;
}

/* Second walk over the sequences: references of the pairs that restore. */
static void count_refs(parse *p, plan *pl)
{
    pikv_cache *c = p->c;
    const int32_t nl = c->params.n_layers, ns = c->n_shards;
    cursor k = {pl->seqs, pl->seqs_len, 0};
    for (uint32_t i = 0; i < pl->n_seqs; i++) {
        const int32_t q = (int32_t)cur_u32(&k);
        for (int32_t l = 0; l < nl; l++) {
            k.at += 16;
            const bool ok = pl->pair_ok[(size_t)q * (size_t)nl + (size_t)l] == 1;
            for (int32_t s = 0; s < ns; s++) {
                const uint32_t count = cur_u32(&k);
                for (uint32_t j = 0; j < count; j++) {
                    const uint32_t id = cur_u32(&k);
                    if (ok) pl->refs[idmap_get(&pl->entry_of, id)]++;
                }
            }
        }
    }
}

/* Checks the committed TABLES and decides what restores. */
static pikv_status make_plan(parse *p, plan *pl, pikv_restore_report *report)
{
    pikv_cache *c = p->c;
    pikv_context *ctx = c->ctx;
    reader *r = p->r;
    const pikv_cache_params *cp = &c->params;
    const uint64_t nl = (uint64_t)cp->n_layers, ne = (uint64_t)cp->n_experts;
    const uint64_t ns = (uint64_t)c->n_shards;
    const uint64_t fixed = PIKV_TABLES_COUNTERS_BYTES + nl * PIKV_TABLES_LAYER_BYTES +
                           nl * ne * PIKV_TABLES_EXPERT_BYTES + 4 + nl * ns * 4;
    cursor k = {p->tables, p->tables_len, fixed};
    if (p->tables_len < fixed + 4)
        return TABLES_FAIL(p, "%s: %s: page tables of %llu bytes, less than the %llu of this geometry", r->fn, r->name,
                           (unsigned long long)p->tables_len, (unsigned long long)fixed + 8);
    pl->n_pages = cur_u32(&k);
    if (!cur_has(&k, (uint64_t)pl->n_pages * PIKV_TABLES_PAGE_BYTES + 4))
        return TABLES_FAIL(p, "%s: %s: the page tables list %u pages, more than their %llu bytes hold", r->fn, r->name,
                           pl->n_pages, (unsigned long long)p->tables_len);
    if ((uint64_t)pl->n_pages != p->pages_total)
        return TABLES_FAIL(p, "%s: %s: the page tables list %u pages, the commit %llu", r->fn, r->name, pl->n_pages,
                           (unsigned long long)p->pages_total);
    pl->entries = p->tables + k.at;
    k.at += (uint64_t)pl->n_pages * PIKV_TABLES_PAGE_BYTES;
    pl->n_seqs = cur_u32(&k);
    if (pl->n_seqs > (uint32_t)cp->max_sequences)
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_RANGE, "%s: %s: %u sequences in the checkpoint, max_sequences = %d in the cache",
                         r->fn, r->name, pl->n_seqs, cp->max_sequences);
    pl->seqs = p->tables + k.at;
    pl->seqs_len = p->tables_len - k.at;
    const size_t n = pl->n_pages ? pl->n_pages : 1;
    pl->rec_of = pikv_host_alloc(ctx, n * sizeof *pl->rec_of, 64);
    pl->refs = pikv_host_calloc(ctx, n, sizeof *pl->refs);
    pl->new_id = pikv_host_alloc(ctx, n * sizeof *pl->new_id, 64);
    pl->dev = pikv_host_alloc(ctx, n * sizeof *pl->dev, 64);
    pl->shard_dev = pikv_host_alloc(ctx, (size_t)nl * (size_t)c->n_shards * sizeof *pl->shard_dev, 64);
    pl->pair_ok = pikv_host_calloc(ctx, (size_t)cp->max_sequences * (size_t)nl, 1);
    if (!pl->rec_of || !pl->refs || !pl->new_id || !pl->dev || !pl->shard_dev || !pl->pair_ok)
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: %s: restore plan for %u pages: allocation failed", r->fn,
                         r->name, pl->n_pages);
    for (uint32_t e = 0; e < pl->n_pages; e++) {
        const uint8_t *b = pl->entries + (size_t)e * PIKV_TABLES_PAGE_BYTES;
        const uint32_t id = pikv_get_u32(b);
        if (idmap_get(&pl->entry_of, id) >= 0)
            return TABLES_FAIL(p, "%s: %s: page %u is listed twice in the page tables", r->fn, r->name, id);
        PIKV_FORWARD_IF_ERROR(idmap_put(ctx, &pl->entry_of, id, e));
        const int64_t ri = idmap_get(&p->map, id);
        /* the page's latest record must be the version the tables name */
        pl->rec_of[e] = ri >= 0 && p->recs[ri].mod_seq == pikv_get_u64(b + 4) ? ri : -1;
    }
    PIKV_FORWARD_IF_ERROR(walk_sequences(p, pl, report));
    for (uint32_t e = 0; e < pl->n_pages; e++) {
        if (pl->refs[e] == 0)
            return TABLES_FAIL(p, "%s: %s: page %u is listed in the page tables but no sequence holds it", r->fn,
                               r->name, pikv_get_u32(pl->entries + (size_t)e * PIKV_TABLES_PAGE_BYTES));
        pl->refs[e] = 0;
    }
    count_refs(p, pl);
    /* capacity: tokens per layer, shared pages once */
    int64_t *layer_tokens = pikv_host_calloc(ctx, (size_t)nl, sizeof *layer_tokens);
    PIKV_RETURN_ERROR_IF(!layer_tokens, ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: allocation failed", r->fn);
    for (uint32_t e = 0; e < pl->n_pages; e++)
        if (pl->refs[e] > 0) {
            const page_rec *pr = &p->recs[pl->rec_of[e]];
            layer_tokens[pr->layer] += pr->n_tokens;
            pl->restored_pages++;
        }
    pikv_status st = PIKV_OK;
    for (uint64_t l = 0; l < nl && st == PIKV_OK; l++)
        if (layer_tokens[l] > cp->capacity_tokens)
            st = PIKV_FAIL(ctx, PIKV_ERR_CAPACITY, "%s: %s: layer %d holds %lld tokens in the checkpoint, over the "
                           "cache's capacity_tokens = %lld", r->fn, r->name, (int)l, (long long)layer_tokens[l],
                           (long long)cp->capacity_tokens);
    pikv_host_free(ctx, layer_tokens);
    return st;
}

/* The metadata of restored page entry e (its id and slot taken, its bytes written) and
   the counters it adds to, as if it had been appended. */
static void commit_page(pikv_cache *c, const parse *p, const plan *pl, uint32_t e)
{
    const size_t ps = (size_t)c->params.page_size;
    const page_rec *pr = &p->recs[pl->rec_of[e]];
    const uint8_t *ent = pl->entries + (size_t)e * PIKV_TABLES_PAGE_BYTES;
    const uint32_t id = pl->new_id[e];
    pikv_page_meta *m = &c->pages[id];
    m->layer = pr->layer;
    m->shard = pr->shard;
    m->n_tokens = pr->n_tokens;
    m->refs = pl->refs[e];
    m->attn_mass = pikv_bits_f32(pikv_get_u32(ent + 12));
    m->use_count = (int32_t)pikv_get_u32(ent + 16);
    m->last_use = (int64_t)pikv_get_u64(ent + 20);
    const uint8_t *rows = pr->payload + PIKV_PAGE_FIXED_BYTES;
    const size_t n = (size_t)pr->n_tokens;
    m->expert_mask = 0;
    for (size_t i = 0; i < n; i++) {
        c->positions[(size_t)id * ps + i] = (int32_t)pikv_get_u32(rows + 4 * i);
        c->indices[(size_t)id * ps + i] = (int32_t)pikv_get_u32(rows + 4 * (n + i));
        const int32_t ex = (int32_t)pikv_get_u32(rows + 4 * (2 * n + i));
        c->row_expert[(size_t)id * ps + i] = ex;
        m->expert_mask |= 1ull << (ex % 64);
    }
    pikv_page_touch(c, id); /* new content for this cache: a later checkpoint writes it */
    pikv_page_pool *pool = pikv_page_pool_of(c, m);
    pool->pages_used++;
    pool->tokens += m->n_tokens;
    pikv_shard *sh = pikv_cache_shard(c, m->layer, m->shard);
    if (sh->dev < 0) {
        sh->dev = m->dev;
        c->devs[sh->dev].shards++;
    }
    sh->pages++;
    sh->tokens += m->n_tokens;
    c->layer_tokens[m->layer] += m->n_tokens;
    c->layer_pages[m->layer]++;
    if (m->quant) c->layer_qpages[m->layer]++;
    c->tokens += m->n_tokens;
    c->pages_live++;
}

/* ---- apply: reserve, write the pages, then build the metadata -------------------------------- */

/* A version 1 page's data (every head's K rows, then every head's V rows) in
   place into this version's layout (each head's K rows, then its V rows); the
   bounds and quantization parameters after the data are where they were. */
static bool page_from_v1(pikv_context *ctx, const pikv_page_layout *L, uint8_t *page)
{
    const size_t block = (size_t)L->page_size * (size_t)L->row_bytes, kvh = (size_t)L->n_kv_heads;
    uint8_t *old = pikv_host_alloc(ctx, 2 * block * kvh, 64);
    if (!old) return false;
    memcpy(old, page, 2 * block * kvh);
    for (size_t g = 0; g < kvh; g++) {
        memcpy(page + L->k_offset + g * L->head_stride, old + g * block, block);
        memcpy(page + L->v_offset + g * L->head_stride, old + (kvh + g) * block, block);
    }
    pikv_host_free(ctx, old);
    return true;
}

static pikv_status apply(parse *p, plan *pl)
{
    pikv_cache *c = p->c;
    pikv_context *ctx = c->ctx;
    reader *r = p->r;
    const pikv_cache_params *cp = &c->params;
    const int32_t nl = cp->n_layers, ns = c->n_shards;
    /* devices: a shard's device in the target cache; BALANCED shards not placed yet go
       where pikv_placement_pick_device would put them */
    int64_t pending[PIKV_MAX_DEVICES] = {0}, qpending[PIKV_MAX_DEVICES] = {0};
    const uint64_t hint_at = PIKV_TABLES_COUNTERS_BYTES + (uint64_t)nl * PIKV_TABLES_LAYER_BYTES +
                             (uint64_t)nl * (uint64_t)cp->n_experts * PIKV_TABLES_EXPERT_BYTES;
    const bool same_devs = (int32_t)pikv_get_u32(p->tables + hint_at) == c->n_devs;
    for (int32_t l = 0; l < nl; l++)
        for (int32_t s = 0; s < ns; s++) {
            const size_t i = (size_t)l * (size_t)ns + (size_t)s;
            const int32_t hint = (int32_t)pikv_get_u32(p->tables + hint_at + 4 + 4 * i);
            int32_t d = pikv_cache_shard(c, l, s)->dev;
            /* BALANCED shards not placed yet: where they were when the checkpoint holds as
               many devices (so attend merges alike), else where a new shard would go */
            if (d < 0 && same_devs && hint >= 0 && hint < c->n_devs) d = hint;
            pl->shard_dev[i] = d;
        }
    for (uint32_t e = 0; e < pl->n_pages; e++) {
        if (pl->refs[e] == 0) continue;
        const page_rec *pr = &p->recs[pl->rec_of[e]];
        int32_t *sd = &pl->shard_dev[(size_t)pr->layer * (size_t)ns + (size_t)pr->shard];
        if (*sd < 0) {
            int64_t both[PIKV_MAX_DEVICES];
            for (int32_t d = 0; d < c->n_devs; d++) both[d] = pending[d] + qpending[d];
            *sd = pikv_placement_pick_device(c, both);
        }
        pl->dev[e] = *sd;
        (pr->quant ? qpending : pending)[*sd]++;
    }
    /* page tables of every sequence, ring room */
    pikv_seq_layer **layers = pikv_host_calloc(ctx, (size_t)cp->max_sequences, sizeof *layers);
    PIKV_RETURN_ERROR_IF(!layers, ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: allocation failed", r->fn);
    pikv_status st = PIKV_OK;
    cursor k = {pl->seqs, pl->seqs_len, 0};
    for (uint32_t i = 0; i < pl->n_seqs && st == PIKV_OK; i++) {
        const int32_t q = (int32_t)cur_u32(&k);
        layers[q] = pikv_seq_layers_alloc(c);
        if (!layers[q]) {
            st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: page tables of sequence %d: allocation failed", r->fn, q);
            break;
        }
        for (int32_t l = 0; l < nl && st == PIKV_OK; l++) {
            k.at += 16;
            const bool ok = pl->pair_ok[(size_t)q * (size_t)nl + (size_t)l] == 1;
            for (int32_t s = 0; s < ns && st == PIKV_OK; s++) {
                const uint32_t count = cur_u32(&k);
                k.at += 4ull * count;
                if (ok && count > 0) st = pikv_ring_reserve(ctx, &layers[q][l].rings[s], count);
            }
        }
    }
    const int64_t old_high = c->pages_high, old_free = c->n_free_ids;
    const uint64_t old_write_seq = c->write_seq;
    if (st == PIKV_OK) st = pikv_page_ids_reserve(c, pl->restored_pages);
    /* Under a tiers device budget the pages may not all fit on the devices: each page then
       gets its room when its turn comes (pikv_tier_reserve demotes pages restored before it,
       whose metadata is committed at once for that), instead of all the room up front. */
    const bool budgeted = c->tier && c->params.tiers.device_bytes > 0;
    int32_t *placed_before = NULL; /* shard devices before, to undo BALANCED placements */
    if (st == PIKV_OK && budgeted) {
        placed_before = pikv_host_alloc(ctx, (size_t)nl * (size_t)ns * sizeof(int32_t), 64);
        if (!placed_before)
            st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: allocation failed", r->fn);
        for (size_t i = 0; placed_before && i < (size_t)nl * (size_t)ns; i++) placed_before[i] = c->shards[i].dev;
    }
    int32_t added[PIKV_MAX_DEVICES] = {0}, qadded[PIKV_MAX_DEVICES] = {0};
    for (int32_t d = 0; d < c->n_devs && st == PIKV_OK && !budgeted; d++) {
        if (pending[d] > 0) st = pikv_tier_reserve(c, d, 0, pending[d]);
        if (st == PIKV_OK) st = pikv_pool_reserve(ctx, &c->devs[d], &c->layout, pending[d], &added[d]);
        if (st == PIKV_OK && c->qdevs && qpending[d] > 0) st = pikv_tier_reserve(c, d, 1, qpending[d]);
        if (st == PIKV_OK && c->qdevs) st = pikv_pool_reserve(ctx, &c->qdevs[d], &c->qlayout, qpending[d], &qadded[d]);
    }
    /* take ids and slots, write the page bytes */
    uint32_t taken_end = 0; /* entries below this took an id and a slot */
    for (uint32_t e = 0; e < pl->n_pages && st == PIKV_OK; e++) {
        if (pl->refs[e] == 0) continue;
        const page_rec *pr = &p->recs[pl->rec_of[e]];
        const uint32_t id = pikv_page_id_take(c);
        pl->new_id[e] = id;
        taken_end = e + 1;
        pikv_page_meta *m = &c->pages[id];
        memset(m, 0, sizeof *m);
        m->dev = pl->dev[e];
        m->quant = pr->quant;
        pikv_page_pool *pool = pikv_page_pool_of(c, m);
        const pikv_page_layout *L = pikv_layout_of(c, m);
        if (budgeted) {
            int32_t grown = 0; /* chunks grown here are freed by the compaction of an undo */
            st = pikv_tier_reserve(c, m->dev, m->quant, 1);
            if (st == PIKV_OK) st = pikv_pool_reserve(ctx, pool, L, 1, &grown);
            if (st != PIKV_OK) {
                m->refs = 0; /* no slot: nothing of it to undo */
                taken_end = e;
                c->free_ids[c->n_free_ids++] = id;
                break;
            }
        }
        m->slot = pikv_pool_take(pool);
        uint64_t off = 0;
        pikv_buffer *buf = pikv_pool_chunk(pool, m->slot, &off, L);
        uint8_t *bytes = pr->payload + PIKV_PAGE_FIXED_BYTES + 12 * (size_t)pr->n_tokens;
        if (p->version == 1 && !page_from_v1(ctx, L, bytes))
            st = PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "%s: %s: reordering a version 1 page: allocation failed",
                           r->fn, r->name);
        if (st == PIKV_OK) st = pool->dev->iface->buffer_write(pool->dev, buf, off, bytes, L->page_bytes);
        if (budgeted) {
            commit_page(c, p, pl, e); /* a later page's reserve may demote this one */
            if (st != PIKV_OK) break;
        }
    }
    if (st != PIKV_OK && budgeted) {
        /* undo: every committed page is dropped (tiers free its slots wherever it went), the
           shards BALANCED placed go back to unplaced, emptied chunks are freed, the ids are
           handed out exactly as before */
        for (int64_t e = (int64_t)taken_end - 1; e >= 0; e--) {
            if (pl->refs[e] == 0) continue;
            pikv_page_meta *m = &c->pages[pl->new_id[e]];
            m->refs = 1;
            pikv_page_unref(c, pl->new_id[e]);
        }
        for (size_t i = 0; placed_before && i < (size_t)nl * (size_t)ns; i++)
            if (placed_before[i] < 0 && c->shards[i].dev >= 0) {
                c->devs[c->shards[i].dev].shards--;
                c->shards[i].dev = -1;
            }
        for (int32_t d = 0; d < c->n_devs; d++) (void)pikv_cache_compact_device(c, d);
        c->pages_high = old_high;
        c->n_free_ids = old_free;
        c->write_seq = old_write_seq;
        for (int32_t q = 0; q < cp->max_sequences; q++) pikv_seq_layers_free(c, layers[q]);
        pikv_host_free(ctx, layers);
        pikv_host_free(ctx, placed_before);
        return st;
    }
    pikv_host_free(ctx, placed_before);
    if (st != PIKV_OK) { /* undo: the cache was empty, so everything taken goes back */
        for (int64_t e = (int64_t)taken_end - 1; e >= 0; e--) {
            if (pl->refs[e] == 0) continue;
            const pikv_page_meta *m = &c->pages[pl->new_id[e]];
            pikv_pool_give(pikv_page_pool_of(c, m), m->slot);
        }
        for (int32_t d = 0; d < c->n_devs; d++) {
            pikv_pool_unreserve(&c->devs[d], added[d]);
            if (c->qdevs) pikv_pool_unreserve(&c->qdevs[d], qadded[d]);
        }
        c->pages_high = old_high;
        c->n_free_ids = old_free;
        for (int32_t q = 0; q < cp->max_sequences; q++) pikv_seq_layers_free(c, layers[q]);
        pikv_host_free(ctx, layers);
        return st;
    }

    /* ---- commit the metadata: nothing here can fail ---- */
    for (uint32_t e = 0; e < pl->n_pages; e++)
        if (pl->refs[e] != 0 && !budgeted) commit_page(c, p, pl, e);
    k = (cursor){pl->seqs, pl->seqs_len, 0};
    for (uint32_t i = 0; i < pl->n_seqs; i++) {
        const int32_t q = (int32_t)cur_u32(&k);
        for (int32_t l = 0; l < nl; l++) {
            pikv_seq_layer *sl = &layers[q][l];
            const int64_t next = (int64_t)cur_u64(&k), n_tokens = (int64_t)cur_u64(&k);
            const bool ok = pl->pair_ok[(size_t)q * (size_t)nl + (size_t)l] == 1;
            sl->next_index = ok ? next : 0;
            sl->n_tokens = ok ? n_tokens : 0;
            for (int32_t s = 0; s < ns; s++) {
                const uint32_t count = cur_u32(&k);
                for (uint32_t j = 0; j < count; j++) {
                    const uint32_t id = cur_u32(&k);
                    if (ok) pikv_ring_push(&sl->rings[s], pl->new_id[idmap_get(&pl->entry_of, id)]);
                }
            }
        }
        c->seqs[q].layers = layers[q];
        c->seqs[q].active = true;
        c->n_seqs++;
    }
    pikv_host_free(ctx, layers);
    /* policy state and counters */
    cursor t = {p->tables, p->tables_len, 0};
    c->evicted_pages = (int64_t)cur_u64(&t);
    c->evicted_tokens = (int64_t)cur_u64(&t);
    c->appends = (int64_t)cur_u64(&t);
    c->attends = (int64_t)cur_u64(&t);
    c->bytes_read = cur_u64(&t);
    c->last_pages_read = (int64_t)cur_u64(&t);
    c->last_tokens_read = (int64_t)cur_u64(&t);
    c->last_bytes_read = cur_u64(&t);
    c->last_recall = pikv_bits_f64(cur_u64(&t));
    c->last_output_error = pikv_bits_f64(cur_u64(&t));
    c->last_hit_rate = pikv_bits_f64(cur_u64(&t));
    for (int32_t l = 0; l < nl; l++) {
        c->layer_clock[l] = (int64_t)cur_u64(&t);
        c->layer_evicted[l] = (int64_t)cur_u64(&t);
        for (int j = 0; j < 5; j++) c->layer_qerr[(size_t)l * 5 + (size_t)j] = pikv_bits_f64(cur_u64(&t));
        c->layer_last_bytes[l] = cur_u64(&t);
        c->layer_last_pages[l] = (int64_t)cur_u64(&t);
    }
    for (size_t i = 0; i < (size_t)nl * (size_t)cp->n_experts; i++) {
        c->expert_misses[i] = pikv_bits_f64(cur_u64(&t));
        c->expert_routed[i] = (int64_t)cur_u64(&t);
        c->expert_top1[i] = (int64_t)cur_u64(&t);
    }
    return PIKV_OK;
}

/* ---- entry points -------------------------------------------------------------------------------- */

static pikv_status restore_from(pikv_cache *c, reader *r, pikv_restore_report *report)
{
    pikv_context *ctx = c->ctx;
    PIKV_RETURN_ERROR_IF(c->comm, ctx, PIKV_ERR_UNSUPPORTED,
                         "%s: a cache over ranks (params.comm) cannot be restored: each rank holds only its own "
                         "shards' pages", r->fn);
    PIKV_RETURN_ERROR_IF(!pikv_host_little_endian(), ctx, PIKV_ERR_UNSUPPORTED,
                         "%s: the stream format stores page bytes little-endian: big-endian hosts are not supported",
                         r->fn);
    PIKV_RETURN_ERROR_IF(c->n_seqs > 0, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "%s: the cache holds %d sequences: restore needs an empty cache", r->fn, c->n_seqs);
    pikv_restore_report rep;
    memset(&rep, 0, sizeof rep);
    if (report) {
        rep.failed_seq = report->failed_seq;
        rep.failed_layer = report->failed_layer;
        rep.failed_cap = report->failed_cap < 0 ? 0 : report->failed_cap;
    }
    parse p;
    memset(&p, 0, sizeof p);
    p.c = c;
    p.r = r;
    plan pl;
    memset(&pl, 0, sizeof pl);
    pikv_status st = parse_all(&p);
    if (st == PIKV_OK && p.generation == 0)
        st = PIKV_FAIL(ctx, PIKV_ERR_INVALID_ARGUMENT, "%s: %s: no committed checkpoint in it (%llu bytes)%s", r->fn,
                       r->name, (unsigned long long)r->at,
                       r->stream ? "" : ": the first checkpoint was never finished");
    if (st == PIKV_OK) st = make_plan(&p, &pl, &rep);
    if (st == PIKV_OK) st = apply(&p, &pl);
    if (st == PIKV_OK) {
        rep.generation = p.generation;
        rep.sequences = (int32_t)pl.n_seqs;
        rep.pages = pl.restored_pages;
        rep.bad_records = p.bad_records;
        if (rep.n_failed > 0)
            pikv_log(ctx, PIKV_LOG_WARN, "%s: %s: generation %llu restored with %d (sequence, layer) pairs empty: "
                     "%lld damaged page records", r->fn, r->name, (unsigned long long)p.generation, rep.n_failed,
                     (long long)p.bad_records);
        if (report) *report = rep;
    }
    plan_free(ctx, &pl);
    parse_free(&p);
    return st;
}

pikv_status pikv_cache_restore(pikv_cache *c, const char *path, pikv_restore_report *report)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    static const char *fn = "pikv_cache_restore";
    PIKV_RETURN_ERROR_IF(!path || !path[0], c->ctx, PIKV_ERR_INVALID_ARGUMENT, "%s: path is %s", fn,
                         !path ? "NULL" : "empty");
    PIKV_RETURN_ERROR_IF(report && report->failed_cap > 0 && (!report->failed_seq || !report->failed_layer), c->ctx,
                         PIKV_ERR_INVALID_ARGUMENT, "%s: report->failed_cap = %d but failed_seq or failed_layer is NULL",
                         fn, report->failed_cap);
    PIKV_RETURN_ERROR_IF(c->n_seqs > 0, c->ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "%s: the cache holds %d sequences: restore needs an empty cache", fn, c->n_seqs);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        const int err = errno;
        char msg[128] = "";
        if (strerror_r(err, msg, sizeof msg) != 0) snprintf(msg, sizeof msg, "errno %d", err);
        return PIKV_FAIL(c->ctx, err == ENOENT ? PIKV_ERR_NOT_FOUND : PIKV_ERR_BACKEND, "%s: %s: %s", fn, path, msg);
    }
    reader r = {c->ctx, fn, path, fd, NULL, 0, false, false, 0};
    struct stat sb;
    if (fstat(fd, &sb) == 0 && S_ISREG(sb.st_mode)) {
        r.size = (uint64_t)sb.st_size;
        r.size_known = true;
    }
    pikv_status st = restore_from(c, &r, report);
    close(fd);
    return st;
}

pikv_status pikv_cache_restore_memory(pikv_cache *c, const void *data, size_t size, const char *name,
                                      pikv_restore_report *report)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    PIKV_RETURN_ERROR_IF(!data && size > 0, c->ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "pikv_cache_restore_memory: data is NULL");
    reader r = {c->ctx, "pikv_cache_restore", name ? name : "(memory)", -1, data, size, true, false, 0};
    return restore_from(c, &r, report);
}

pikv_status pikv_cache_stream_in(pikv_cache *c, int fd, pikv_restore_report *report)
{
    if (!c) return PIKV_ERR_INVALID_ARGUMENT;
    static const char *fn = "pikv_cache_stream_in";
    PIKV_RETURN_ERROR_IF(fd < 0, c->ctx, PIKV_ERR_INVALID_ARGUMENT, "%s: fd = %d is not a descriptor", fn, fd);
    PIKV_RETURN_ERROR_IF(report && report->failed_cap > 0 && (!report->failed_seq || !report->failed_layer), c->ctx,
                         PIKV_ERR_INVALID_ARGUMENT, "%s: report->failed_cap = %d but failed_seq or failed_layer is NULL",
                         fn, report->failed_cap);
    char name[32];
    snprintf(name, sizeof name, "fd %d", fd);
    reader r = {c->ctx, fn, name, fd, NULL, 0, false, true, 0};
    return restore_from(c, &r, report);
}
