/*
 * stream_corrupt: restore of damaged checkpoint files. A valid file (FULL + 3 INCREMENTAL
 * segments of an int8 cache with shared and evicted pages) is damaged in every way below;
 * each case must give a clear status, never a crash, and a failing restore must leave the
 * target cache empty (no sequence, no page, device memory as before) and usable. The
 * expected outcome of each case is computed here, from this file's own walk of the record
 * framing and from the source cache's page tables (white-box), not from the library:
 *  - truncation at every record boundary and at random offsets: the last generation whose
 *    commit lies before the cut, restored bit for bit; an error before the first commit;
 *  - single bit flips in the header (error) and in every record (sampled): a PAGE payload or
 *    CRC -> OK, generation unchanged, bad_records 1, and exactly the (sequence, layer) pairs
 *    whose page tables hold that page version restored empty, every other pair bit for bit;
 *    a TABLES record, a record header, or any commit but the last -> error (damage before the
 *    last commit); the last commit -> the previous generation (an unfinished checkpoint);
 *  - wrong magic and version, another geometry, huge length fields (0xffffffff, 2^31, ...) in
 *    every record kind (no large allocation: an allocator hook records the largest request),
 *    empty and nonexistent files, a file of garbage, and the same bytes through
 *    pikv_cache_stream_in over a pipe (no torn tail allowed: an error) and from memory.
 */
#include "stream-util.h"

#include "cache-impl.h"
#include "crc32c.h"
#include "stream.h"

#include <pthread.h>
#include <signal.h>

/* allocator hook: the largest request */
static size_t g_max_alloc;
static void *hook_alloc(void *user, size_t size, size_t align)
{
    (void)user;
    if (size > g_max_alloc)
        g_max_alloc = size;
    void *p = NULL;
    return posix_memalign(&p, align < sizeof(void *) ? sizeof(void *) : align, size ? size : 1) == 0 ? p : NULL;
}
static void hook_free(void *user, void *p)
{
    (void)user;
    free(p);
}

typedef struct rec {
    size_t off, len; /* record start, payload length */
    uint32_t type;
    int seg;         /* segment (generation - 1) */
} rec;

static pikv_context *ctx;
static pikv_cache_params P;
static pikv_cache *src;
static uint8_t *good;
static size_t good_n;
static rec recs[4096];
static int n_recs;
static size_t commit_end[8]; /* bytes through the commit of generation g + 1 */
static int n_gens;
static float *gen_out[8], *gen_lse[8];
static int gen_nq[8];
static char path[600];
static int32_t live_seqs[64];
static int n_live;
static int g_want_bad; /* damaged PAGE records the next expect() case holds */

static void walk_records(void)
{
    size_t at = PIKV_STREAM_HEADER_BYTES;
    int seg = 0;
    while (at + 8 <= good_n) {
        rec r = {at, (size_t)pikv_get_u32(good + at + 4), pikv_get_u32(good + at), seg};
        recs[n_recs++] = r;
        at += 8 + r.len + 4;
        if (r.type == PIKV_REC_COMMIT)
            commit_end[seg++] = at;
    }
    n_gens = seg;
    CHECK_EQ(at, good_n);
}

/* The target must be empty and usable after a failed restore. */
static void check_empty(pikv_cache *t, uint64_t mem0, const char *what)
{
    pikv_cache_stats st;
    CHECK_OK(pikv_cache_get_stats(t, &st));
    CHECKF(st.sequences == 0 && st.pages == 0 && st.tokens == 0, "%s: target not empty (%d seqs, %lld pages)", what,
           st.sequences, (long long)st.pages);
    CHECKF(tu_mem_used(ctx, 0) == mem0, "%s: device memory %llu -> %llu", what, (unsigned long long)mem0,
           (unsigned long long)tu_mem_used(ctx, 0));
}

/* Restores bytes (via a file) and checks the outcome: want_gen 0 = an error; else that
   generation, with failed pairs (seq, layer) listed in fq/fl (n_f of them). */
static void expect(const uint8_t *b, size_t n, int want_gen, const int32_t *fq, const int32_t *fl, int n_f,
                   const char *what)
{
    if (!su_write_file(path, b, n)) {
        CHECKF(0, "%s: cannot write %s", what, path);
        return;
    }
    pikv_cache *t = su_cache(ctx, &P);
    const uint64_t mem0 = tu_mem_used(ctx, 0);
    int32_t rq[64], rl[64];
    pikv_restore_report rep;
    memset(&rep, 0, sizeof rep);
    rep.failed_seq = rq;
    rep.failed_layer = rl;
    rep.failed_cap = 64;
    pikv_status st = pikv_cache_restore(t, path, &rep);
    if (want_gen == 0) {
        CHECKF(st != PIKV_OK, "%s: restore succeeded (generation %llu), expected an error", what,
               (unsigned long long)rep.generation);
        CHECKF(st != PIKV_OK && strlen(pikv_context_last_error(ctx)) > 20, "%s: a message", what);
        check_empty(t, mem0, what);
        /* the same bytes from memory: the same verdict */
        pikv_status sm = pikv_cache_restore_memory(t, b, n, "mem", NULL);
        CHECKF(sm == st, "%s: from memory %s, from the file %s", what, pikv_status_name(sm), pikv_status_name(st));
        check_empty(t, mem0, what);
        pikv_cache_free(t);
        return;
    }
    if (!CHECKF(st == PIKV_OK, "%s: %s: %s", what, pikv_status_name(st), pikv_context_last_error(ctx))) {
        pikv_cache_free(t);
        return;
    }
    CHECKF(rep.generation == (uint64_t)want_gen, "%s: generation %llu, expected %d", what,
           (unsigned long long)rep.generation, want_gen);
    CHECKF(rep.n_failed == n_f, "%s: %d failed pairs, expected %d", what, rep.n_failed, n_f);
    int listed = 1;
    for (int i = 0; i < n_f && i < rep.n_failed; i++) {
        int found = 0;
        for (int j = 0; j < rep.n_failed; j++)
            found |= rq[j] == fq[i] && rl[j] == fl[i];
        listed &= found;
    }
    CHECKF(listed, "%s: the failed pairs differ", what);
    CHECKF(rep.bad_records == g_want_bad, "%s: %lld bad records, expected %d", what, (long long)rep.bad_records,
           g_want_bad);
    /* every pair that restored attends as at that generation, bit for bit */
    float *o, *l;
    const int nq = su_attend(t, &P, 1234, &o, &l);
    const int g = want_gen - 1;
    CHECKF(nq == gen_nq[g], "%s: %d sequences, expected %d", what, nq, gen_nq[g]);
    const size_t per = (size_t)P.n_q_heads * (size_t)P.head_dim;
    int same = 1;
    for (int layer = 0; layer < P.n_layers && nq == gen_nq[g]; layer++)
        for (int q = 0; q < nq; q++) {
            int failed = 0;
            for (int i = 0; i < n_f; i++)
                failed |= fq[i] == live_seqs[q] && fl[i] == layer;
            int64_t len = -1;
            pikv_seq_length(t, live_seqs[q], layer, &len);
            if (failed) {
                same &= len == 0;
                continue;
            }
            const size_t at = ((size_t)layer * (size_t)nq + (size_t)q) * per;
            same &= memcmp(o + at, gen_out[g] + at, per * sizeof(float)) == 0;
            const size_t al = ((size_t)layer * (size_t)nq + (size_t)q) * (size_t)P.n_q_heads;
            same &= memcmp(l + al, gen_lse[g] + al, (size_t)P.n_q_heads * sizeof(float)) == 0;
        }
    CHECKF(same, "%s: restored pairs differ from generation %d", what, want_gen);
    free(o);
    free(l);
    pikv_cache_free(t);
}

/* The (sequence, layer) pairs of the source's final state that hold page id at version v. */
static int pairs_of_page(uint32_t id, uint64_t v, int32_t *fq, int32_t *fl)
{
    if ((int64_t)id >= src->pages_high || src->pages[id].refs == 0 || src->pages[id].mod_seq != v)
        return 0; /* a superseded version: nobody needs it */
    int n = 0;
    for (int q = 0; q < P.max_sequences; q++) {
        if (!src->seqs[q].active)
            continue;
        for (int l = 0; l < P.n_layers; l++) {
            int holds = 0;
            for (int s = 0; s < src->n_shards; s++) {
                const pikv_ring *r = &src->seqs[q].layers[l].rings[s];
                for (int64_t i = 0; i < r->count; i++)
                    holds |= pikv_ring_at(r, i) == id;
            }
            if (holds) {
                fq[n] = q;
                fl[n] = l;
                n++;
            }
        }
    }
    return n;
}

/* The expected outcome of flipping bit `bit` of byte `at` in the good file. */
static int flip_outcome(size_t at, int32_t *fq, int32_t *fl, int *n_f)
{
    *n_f = 0;
    if (at < PIKV_STREAM_HEADER_BYTES)
        return 0;
    for (int i = 0; i < n_recs; i++) {
        const rec *r = &recs[i];
        if (at < r->off || at >= r->off + 12 + r->len)
            continue;
        const int last_commit = r->type == PIKV_REC_COMMIT && r->seg == n_gens - 1;
        if (last_commit)
            return n_gens - 1;
        if (at < r->off + 8 || r->type != PIKV_REC_PAGE)
            return 0; /* framing or a TABLES/COMMIT before the last commit */
        const uint8_t *pay = good + r->off + 8;
        *n_f = pairs_of_page(pikv_get_u32(pay), pikv_get_u64(pay + 24), fq, fl);
        return n_gens;
    }
    return 0;
}

typedef struct pipe_arg {
    const uint8_t *b;
    size_t n;
    int fd;
} pipe_arg;

static void *pipe_writer(void *arg)
{
    pipe_arg *a = arg;
    size_t done = 0;
    while (done < a->n) {
        ssize_t k = write(a->fd, a->b + done, a->n - done);
        if (k <= 0)
            break;
        done += (size_t)k;
    }
    close(a->fd);
    return NULL;
}

/* stream_in over a pipe carrying b: the status. */
static pikv_status stream_in_bytes(const uint8_t *b, size_t n)
{
    int fds[2];
    if (pipe(fds) != 0)
        return PIKV_ERR_INTERNAL;
    pipe_arg a = {b, n, fds[1]};
    pthread_t th;
    pthread_create(&th, NULL, pipe_writer, &a);
    pikv_cache *t = su_cache(ctx, &P);
    pikv_status st = pikv_cache_stream_in(t, fds[0], NULL);
    pikv_cache_stats s;
    pikv_cache_get_stats(t, &s);
    if (st != PIKV_OK)
        CHECKF(s.sequences == 0 && s.pages == 0, "stream_in failure left %d sequences", s.sequences);
    close(fds[0]); /* the writer may be blocked on a full pipe: EPIPE ends it */
    pthread_join(th, NULL);
    pikv_cache_free(t);
    return st;
}

/* Files whose CRCs are all right but whose page tables break the cache's invariants (what
   a forged or buggy writer could produce, and byte-level fuzzing cannot reach): a partial
   page held by two sequences, and a partial page before a full one in a ring. Restore must
   refuse both before touching the cache (appends would write into the shared page). The
   TABLES record is edited in place and its CRC recomputed; the commit covers only framing,
   which the edit keeps. */
static uint32_t rd32(const uint8_t *b) { return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24; }
static void wr32(uint8_t *b, uint32_t x)
{
    for (int i = 0; i < 4; i++) b[i] = (uint8_t)(x >> (8 * i));
}

static void test_forged_tables(const char *dir)
{
    tu_set_case("forged page tables");
    pikv_cache_params p = pikv_cache_default_params();
    p.n_layers = 1;
    p.n_q_heads = 2;
    p.n_kv_heads = 1;
    p.head_dim = 8;
    p.page_size = 8;
    p.max_sequences = 4;
    p.capacity_tokens = 1024;
    pikv_cache *c = su_cache(ctx, &p);
    tu_rng r = tu_rng_seed(5);
    for (int32_t q = 0; q < 2; q++) { /* each: a full page, then a partial page of 4 tokens */
        CHECK_OK(pikv_seq_add(c, q));
        CHECK_OK(su_append(c, &p, &r, 0, q, 12));
    }
    char file[700];
    snprintf(file, sizeof file, "%s/forged.pikv", dir);
    CHECK_OK(pikv_cache_checkpoint(c, file, PIKV_CHECKPOINT_FULL, NULL));
    pikv_cache_free(c);
    size_t n = 0;
    uint8_t *good = tu_read_file(file, &n);
    if (!CHECK(good != NULL)) return;
    /* the TABLES record and, in it, the sequences part: counters 88, one layer 72, one
       expert 24, shard devices 4 + 4, live pages 4 + 28 x pages */
    size_t at = 192, tab = 0;
    uint32_t tab_len = 0;
    while (at + 8 <= n) {
        const uint32_t type = rd32(good + at), len = rd32(good + at + 4);
        if (type == 2) {
            tab = at;
            tab_len = len;
            break;
        }
        at += 8 + (size_t)len + 4;
    }
    if (!CHECK(tab > 0)) {
        free(good);
        return;
    }
    uint8_t *t = good + tab + 8;
    size_t o = 88 + 72 + 24 + 8;
    const uint32_t pages = rd32(t + o);
    CHECK_EQ(pages, 4);
    o += 4 + 28 * (size_t)pages;
    CHECK_EQ(rd32(t + o), 2); /* sequences */
    o += 4;
    /* per sequence: id, next (8), tokens (8), shard count, ids */
    const size_t s0 = o, s1 = o + 4 + 16 + 4 + 8;
    CHECK_EQ(rd32(t + s0 + 20), 2);
    CHECK_EQ(rd32(t + s1 + 20), 2);
    const uint32_t a0 = rd32(t + s0 + 24), b0 = rd32(t + s0 + 28);
    static const struct {
        const char *what, *needle;
    } cases[] = {{"sequence 1 holds sequence 0's partial page", "held by more than one page table"},
                 {"sequence 0's partial page before its full one", "not the last of its ring"}};
    for (int k = 0; k < 2; k++) {
        uint8_t *b = tu_xmalloc(n);
        memcpy(b, good, n);
        uint8_t *tt = b + tab + 8;
        if (k == 0) {
            wr32(tt + s1 + 28, b0);
        } else {
            wr32(tt + s0 + 24, b0);
            wr32(tt + s0 + 28, a0);
        }
        wr32(b + tab + 8 + tab_len, pikv_crc32c(0, b + tab, 8 + (size_t)tab_len));
        CHECK(su_write_file(file, b, n));
        pikv_cache *dst = su_cache(ctx, &p);
        const pikv_status st = pikv_cache_restore(dst, file, NULL);
        CHECKF(st == PIKV_ERR_INVALID_ARGUMENT && strstr(pikv_context_last_error(ctx), cases[k].needle),
               "%s: got %s: %s", cases[k].what, pikv_status_name(st), pikv_context_last_error(ctx));
        pikv_cache_stats cs;
        CHECK_OK(pikv_cache_get_stats(dst, &cs));
        CHECK_EQ(cs.pages, 0);
        CHECK_EQ(cs.sequences, 0);
        pikv_cache_free(dst);
        free(b);
    }
    /* the unedited file restores */
    CHECK(su_write_file(file, good, n));
    pikv_cache *dst = su_cache(ctx, &p);
    CHECK_OK(pikv_cache_restore(dst, file, NULL));
    pikv_cache_free(dst);
    free(good);
}

int main(int argc, char **argv)
{
    (void)argc;
    (void)argv;
    signal(SIGPIPE, SIG_IGN);
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "cpu";
    cp.cpu_devices = 1;
    cp.allocator.alloc = hook_alloc;
    cp.allocator.free = hook_free;
    if (pikv_context_create(&cp, &ctx) != PIKV_OK)
        return 2;
    tu_err_ctx = ctx;
    char *dir = su_tmpdir("corrupt");
    char ckpt[600];
    snprintf(ckpt, sizeof ckpt, "%s/good.pikv", dir);
    snprintf(path, sizeof path, "%s/case.pikv", dir);

    /* the source: FULL + 3 INCREMENTAL, attend outputs after each */
    P = su_params(PIKV_DTYPE_INT8, PIKV_PLACEMENT_EXPERT);
    src = su_cache(ctx, &P);
    su_workload(src, &P, 99);
    tu_rng r = tu_rng_seed(7);
    for (int g = 0; g < 4; g++) {
        if (g == 1)
            CHECK_OK(su_append(src, &P, &r, 1, 0, 11));
        if (g == 2) {
            CHECK_OK(pikv_seq_remove(src, 2));
            CHECK_OK(su_append(src, &P, &r, 0, 4, 25));
        }
        if (g == 3)
            CHECK_OK(su_append(src, &P, &r, 0, 1, 2));
        CHECK_OK(pikv_cache_checkpoint(src, ckpt, g == 0 ? PIKV_CHECKPOINT_FULL : PIKV_CHECKPOINT_INCREMENTAL, NULL));
        gen_nq[g] = su_attend(src, &P, 1234, &gen_out[g], &gen_lse[g]);
    }
    n_live = su_live(src, &P, live_seqs);
    good = tu_read_file(ckpt, &good_n);
    if (!CHECK(good != NULL))
        return tu_finish();
    walk_records();
    CHECK_EQ(n_gens, 4);
    printf("file: %zu bytes, %d records, %d generations\n", good_n, n_recs, n_gens);
    uint8_t *b = (uint8_t *)tu_xmalloc(good_n);
    char what[128];
    int32_t fq[64], fl[64];
    int n_f = 0;

    /* the good file, and every record boundary */
    expect(good, good_n, 4, NULL, NULL, 0, "good file");
    tu_set_case("truncation");
    for (int i = 0; i <= n_recs; i++) {
        const size_t cut = i < n_recs ? recs[i].off : good_n;
        int g = 0;
        while (g < n_gens && commit_end[g] <= cut)
            g++;
        snprintf(what, sizeof what, "cut at record %d (byte %zu)", i, cut);
        expect(good, cut, g, NULL, NULL, 0, what);
    }
    tu_rng rr = tu_rng_seed(42);
    for (int i = 0; i < 150; i++) {
        const size_t cut = (size_t)tu_int(&rr, 0, (int64_t)good_n - 1);
        int g = 0;
        while (g < n_gens && commit_end[g] <= cut)
            g++;
        snprintf(what, sizeof what, "cut at byte %zu", cut);
        expect(good, cut, g, NULL, NULL, 0, what);
    }

    tu_set_case("bit flips");
    /* every bit of the header and of every record's framing and commit, sampled payload bits */
    for (size_t at = 0; at < good_n; at++) {
        int in_payload = 0;
        for (int i = 0; i < n_recs; i++)
            if (at >= recs[i].off + 8 && at < recs[i].off + 8 + recs[i].len && recs[i].type != PIKV_REC_COMMIT)
                in_payload = 1;
        if (in_payload && tu_int(&rr, 0, 99) >= 3)
            continue; /* 3% of the payload bytes */
        const int bit = (int)tu_int(&rr, 0, 7);
        memcpy(b, good, good_n);
        b[at] ^= (uint8_t)(1u << bit);
        const int g = flip_outcome(at, fq, fl, &n_f);
        snprintf(what, sizeof what, "bit %d of byte %zu", bit, at);
        g_want_bad = g == n_gens && at >= PIKV_STREAM_HEADER_BYTES; /* a PAGE record */
        expect(b, good_n, g, fq, fl, n_f, what);
        g_want_bad = 0;
    }

    tu_set_case("headers, lengths, files");
    memcpy(b, good, good_n);
    b[0] = 'X';
    expect(b, good_n, 0, NULL, NULL, 0, "wrong magic");
    CHECK(strstr(pikv_context_last_error(ctx), "not a PiKV checkpoint") != NULL);
    memcpy(b, good, good_n);
    for (uint32_t v = 0; v <= PIKV_STREAM_VERSION + 1; v += PIKV_STREAM_VERSION + 1) { /* before 1, after the newest */
        memcpy(b, good, good_n);
        pikv_put_u32(b + 8, v);
        pikv_put_u32(b + 188, pikv_crc32c(0, b, 188));
        if (su_write_file(path, b, good_n)) {
            pikv_cache *t = su_cache(ctx, &P);
            CHECK_STATUS(PIKV_ERR_UNSUPPORTED, pikv_cache_restore(t, path, NULL));
            char want[64];
            snprintf(want, sizeof want, "format version %u, this library reads versions 1 to %u", v,
                     PIKV_STREAM_VERSION);
            CHECKF(strstr(pikv_context_last_error(ctx), want) != NULL, "message names version %u", v);
            pikv_cache_free(t);
        }
    }
    memcpy(b, good, good_n);
    pikv_put_u32(b + 64, 16); /* page_size, with a correct header CRC */
    pikv_put_u32(b + 188, pikv_crc32c(0, b, 188));
    expect(b, good_n, 0, NULL, NULL, 0, "another page size");
    CHECKF(strstr(pikv_context_last_error(ctx), "page_size = 16 in the checkpoint, 8 in the cache") != NULL, "%s",
           pikv_context_last_error(ctx));
    static const uint32_t huge[] = {0xffffffffu, 0x80000000u, 0x7fffffffu, 0x40000001u, 0x10000000u};
    for (int i = 0; i < n_recs; i++) {
        if (i > 3 && i < n_recs - 6 && i % 5 != 0)
            continue;
        for (size_t h = 0; h < sizeof huge / sizeof huge[0]; h++) {
            memcpy(b, good, good_n);
            pikv_put_u32(b + recs[i].off + 4, huge[h]);
            g_max_alloc = 0;
            const int last = recs[i].type == PIKV_REC_COMMIT && recs[i].seg == n_gens - 1;
            snprintf(what, sizeof what, "length 0x%08x in record %d (type %u)", huge[h], i, recs[i].type);
            expect(b, good_n, last ? n_gens - 1 : 0, NULL, NULL, 0, what);
            CHECKF(g_max_alloc < (16u << 20), "%s: an allocation of %zu bytes", what, g_max_alloc);
            g_max_alloc = 0;
            CHECKF(stream_in_bytes(b, good_n) != PIKV_OK || recs[i].seg > 0, "%s: stream_in", what);
            CHECKF(g_max_alloc < (16u << 20), "%s: stream_in allocated %zu bytes", what, g_max_alloc);
        }
    }
    /* stream_in: the first segment is one stream; any cut before its commit is an error */
    CHECK_OK(stream_in_bytes(good, good_n));
    for (int i = 0; i < 40; i++) {
        const size_t cut = (size_t)tu_int(&rr, 0, (int64_t)commit_end[0] - 1);
        CHECKF(stream_in_bytes(good, cut) != PIKV_OK, "stream_in of %zu bytes", cut);
    }
    expect(good, 0, 0, NULL, NULL, 0, "empty file");
    CHECK(strstr(pikv_context_last_error(ctx), "empty") != NULL);
    for (size_t i = 0; i < good_n; i++)
        b[i] = (uint8_t)tu_next(&rr);
    expect(b, good_n, 0, NULL, NULL, 0, "garbage");
    memcpy(b, good, PIKV_STREAM_HEADER_BYTES); /* a header, then garbage */
    expect(b, good_n, 0, NULL, NULL, 0, "header and garbage");
    pikv_cache *t = su_cache(ctx, &P);
    snprintf(what, sizeof what, "%s/missing.pikv", dir);
    CHECK_STATUS(PIKV_ERR_NOT_FOUND, pikv_cache_restore(t, what, NULL));
    CHECK_OK(pikv_cache_restore(t, ckpt, NULL)); /* the target is still usable */
    pikv_cache_free(t);

    for (int g = 0; g < 4; g++) {
        free(gen_out[g]);
        free(gen_lse[g]);
    }
    free(b);
    free(good);
    pikv_cache_free(src);
    test_forged_tables(dir);
    su_rmdir(dir);
    pikv_context_free(ctx);
    return tu_finish();
}
