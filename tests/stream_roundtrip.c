/*
 * stream_roundtrip: checkpoints and streams restore the cache exactly.
 *  - every dtype (f32, f16, int8, int4) x placement (expert, hash, balanced) x 1 and 3 CPU
 *    devices: a workload with a prefix-shared sequence and one evicted under a budget is
 *    checkpointed (FULL) and restored into a fresh cache with the same devices (attend out
 *    and lse bit for bit; statistics equal; continuing both with the same appends and
 *    attends stays bit for bit) and into one with the other device count (equal to float
 *    rounding: the merge across devices differs);
 *  - incremental: a FULL then rounds of (append / remove / evict / copy_prefix / nothing) +
 *    INCREMENTAL: each writes exactly the pages changed since the last checkpoint (counted
 *    from the cache's page versions, white-box), and the restore of the file equals the
 *    cache at the latest checkpoint;
 *  - stream_out / stream_in over a pipe (writer thread) and a socketpair, two streams back
 *    to back on one descriptor;
 *  - failures leave things as they were: restore into a cache holding sequences, or of
 *    another geometry (the field named); a checkpoint whose writes fail part way (injected)
 *    leaves the previous checkpoint restorable, no temporary file, and the bookkeeping
 *    intact (the next INCREMENTAL continues the file); a restore whose device page writes
 *    fail part way, or whose devices are too small, leaves the target empty (device memory
 *    as before); INCREMENTAL without a FULL, or onto a file replaced behind the cache's back;
 *    NULL arguments; a restored cache's first checkpoint must be FULL.
 * White-box: counts changed pages in runtime/cache-impl.h, injects write faults through
 * runtime/stream.h and device write failures through a spying device vtable.
 */
#include "stream-util.h"

#include "cache-impl.h"
#include "crc32c.h"
#include "stream.h"

#include <pthread.h>
#include <sys/socket.h>
#include <sys/stat.h>

static const char *dt_name[] = {"f32", "f16", "int8", "int4"};
static const char *pl_name[] = {"expert", "hash", "balanced"};

static pikv_context *ctx1, *ctx3;

static void check_crc32c(void)
{
    const char *v = "123456789";
    CHECK_EQ(pikv_crc32c(0, v, 9), 0xE3069283u);
    CHECK_EQ(pikv_crc32c_sw(0, v, 9), 0xE3069283u);
    CHECK_EQ(pikv_crc32c(pikv_crc32c(0, v, 4), v + 4, 5), 0xE3069283u);
    /* 32 zero bytes: RFC 3720 B.4 */
    uint8_t z[32] = {0};
    CHECK_EQ(pikv_crc32c(0, z, 32), 0x8A9136AAu);
    /* the hardware and software paths agree on every length and alignment */
    uint8_t buf[300];
    tu_rng r = tu_rng_seed(3);
    for (size_t i = 0; i < sizeof buf; i++)
        buf[i] = (uint8_t)tu_next(&r);
    int agree = 1;
    for (size_t off = 0; off < 9; off++)
        for (size_t n = 0; n + off <= sizeof buf; n++)
            agree &= pikv_crc32c(7, buf + off, n) == pikv_crc32c_sw(7, buf + off, n);
    CHECKF(agree, "hardware path %d", pikv_crc32c_hw());
}

/* Live pages changed since write_seq `since` (white-box). */
static int64_t changed_pages(const pikv_cache *c, uint64_t since)
{
    int64_t n = 0;
    for (int64_t id = 0; id < c->pages_high; id++)
        n += c->pages[id].refs > 0 && c->pages[id].mod_seq > since;
    return n;
}

static pikv_cache *restored(pikv_context *ctx, const pikv_cache_params *p, const char *path, pikv_restore_report *rep)
{
    pikv_cache *c = su_cache(ctx, p);
    pikv_restore_report local;
    memset(&local, 0, sizeof local);
    tu_err_ctx = ctx;
    CHECK_OK(pikv_cache_restore(c, path, rep ? rep : &local));
    return c;
}

static void one_config(pikv_dtype dt, pikv_placement pl, int devs, const char *dir)
{
    tu_set_case("%s %s, %d devices", dt_name[dt], pl_name[pl], devs);
    pikv_context *ctx = devs == 1 ? ctx1 : ctx3, *other = devs == 1 ? ctx3 : ctx1;
    tu_err_ctx = ctx;
    pikv_cache_params p = su_params(dt, pl);
    pikv_cache *a = su_cache(ctx, &p);
    su_workload(a, &p, 1000u + (uint64_t)dt * 10u + (uint64_t)pl);
    pikv_layer_stats ls;
    CHECK_OK(pikv_cache_get_layer_stats(a, 0, &ls));
    CHECKF(ls.evicted_pages > 0, "the workload evicts (layer 0 evicted %lld pages)", (long long)ls.evicted_pages);
    char path[600];
    snprintf(path, sizeof path, "%s/full-%d-%d-%d.pikv", dir, (int)dt, (int)pl, devs);
    pikv_checkpoint_stats cs;
    memset(&cs, 0, sizeof cs);
    CHECK_OK(pikv_cache_checkpoint(a, path, PIKV_CHECKPOINT_FULL, &cs));
    pikv_cache_stats sa;
    pikv_cache_get_stats(a, &sa);
    CHECK_EQ(cs.generation, 1);
    CHECK_EQ(cs.pages_written, sa.pages);
    CHECK_EQ(cs.pages_total, sa.pages);
    struct stat sb;
    CHECK(stat(path, &sb) == 0 && (uint64_t)sb.st_size == cs.bytes_written);

    pikv_restore_report rep;
    memset(&rep, 0, sizeof rep);
    pikv_cache *b = restored(ctx, &p, path, &rep);
    CHECK_EQ(rep.generation, 1);
    CHECK_EQ(rep.pages, sa.pages);
    CHECK_EQ(rep.sequences, 5);
    CHECK_EQ(rep.n_failed, 0);
    CHECK_EQ(rep.bad_records, 0);
    char why[256] = "";
    CHECKF(su_same_stats(a, b, &p, why, sizeof why), "restored: %s", why);
    CHECKF(su_same_attend(a, b, &p, 77, 0.0), "restored attend bit for bit");
    /* continue both alike: appends (evicting), a copy, attends */
    tu_rng ra = tu_rng_seed(5), rb = tu_rng_seed(5);
    for (int l = 0; l < p.n_layers; l++) {
        CHECK_OK(su_append(a, &p, &ra, l, 4, 19));
        CHECK_OK(su_append(b, &p, &rb, l, 4, 19));
        CHECK_OK(su_append(a, &p, &ra, l, 3, 9));
        CHECK_OK(su_append(b, &p, &rb, l, 3, 9));
    }
    CHECK_OK(pikv_seq_copy_prefix(a, 3, 6, 20));
    CHECK_OK(pikv_seq_copy_prefix(b, 3, 6, 20));
    CHECKF(su_same_attend(a, b, &p, 78, 0.0), "continued attend bit for bit");
    CHECKF(su_same_stats(a, b, &p, why, sizeof why), "continued: %s", why);

    /* another device count: same contents, merged across other devices */
    pikv_cache *d = restored(other, &p, path, NULL);
    pikv_cache *a0 = su_cache(ctx, &p); /* the state at the checkpoint, rebuilt */
    su_workload(a0, &p, 1000u + (uint64_t)dt * 10u + (uint64_t)pl);
    CHECKF(su_same_attend(a0, d, &p, 79, 1e-5), "restored on %d devices", devs == 1 ? 3 : 1);
    CHECKF(su_same_stats(a0, d, &p, why, sizeof why), "restored on other devices: %s", why);
    pikv_cache_free(a0);
    pikv_cache_free(d);
    pikv_cache_free(b);

    /* incremental rounds onto a fresh FULL of a */
    snprintf(path, sizeof path, "%s/inc-%d-%d-%d.pikv", dir, (int)dt, (int)pl, devs);
    CHECK_OK(pikv_cache_checkpoint(a, path, PIKV_CHECKPOINT_FULL, &cs));
    tu_rng rr = tu_rng_seed(11);
    for (int round = 0; round < 6; round++) {
        const uint64_t since = a->write_seq;
        switch (round) {
        case 0: CHECK_OK(su_append(a, &p, &rr, 0, 1, 3)); break;          /* one open page */
        case 1: CHECK_OK(pikv_seq_remove(a, 2)); break;                   /* removal only */
        case 2: for (int l = 0; l < p.n_layers; l++) CHECK_OK(su_append(a, &p, &rr, l, 4, 40)); break; /* evicts */
        case 3: CHECK_OK(pikv_seq_copy_prefix(a, 1, 2, 11)); break;       /* a partial page copied */
        case 4: break;                                                    /* nothing */
        case 5: {
            float *o, *s; /* attends only: statistics, no page bytes */
            CHECK(su_attend(a, &p, 90, &o, &s) >= 0);
            free(o);
            free(s);
            break;
        }
        }
        const int64_t want = changed_pages(a, since);
        CHECK_OK(pikv_cache_checkpoint(a, path, PIKV_CHECKPOINT_INCREMENTAL, &cs));
        CHECK_EQ(cs.generation, (uint64_t)round + 2);
        CHECKF(cs.pages_written == want, "round %d: %lld pages written, %lld changed", round,
               (long long)cs.pages_written, (long long)want);
        if (round == 1 || round == 4 || round == 5)
            CHECK_EQ(cs.pages_written, 0);
        pikv_cache_get_stats(a, &sa);
        CHECK_EQ(cs.pages_total, sa.pages);
        pikv_cache *r = restored(ctx, &p, path, &rep);
        CHECK_EQ(rep.generation, (uint64_t)round + 2);
        CHECK_EQ(rep.n_failed, 0);
        CHECKF(su_same_stats(a, r, &p, why, sizeof why), "round %d: %s", round, why);
        CHECKF(su_same_attend(a, r, &p, 80 + (uint64_t)round, 0.0), "round %d attend bit for bit", round);
        /* a restored cache must start its own file with a FULL */
        snprintf(why, sizeof why, "%s/other.pikv", dir);
        CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_checkpoint(r, path, PIKV_CHECKPOINT_INCREMENTAL, NULL));
        pikv_cache_free(r);
    }
    pikv_cache_free(a);
}

/* ---- streams over descriptors ---------------------------------------------------------- */

typedef struct writer_arg {
    pikv_cache *c[2];
    int n, fd;
    pikv_status st[2];
} writer_arg;

static void *writer_main(void *arg)
{
    writer_arg *w = arg;
    for (int i = 0; i < w->n; i++)
        w->st[i] = pikv_cache_stream_out(w->c[i], w->fd, NULL);
    close(w->fd);
    return NULL;
}

static void streams(int use_socket)
{
    tu_set_case("streams over a %s", use_socket ? "socketpair" : "pipe");
    pikv_cache_params p = su_params(PIKV_DTYPE_INT8, PIKV_PLACEMENT_EXPERT);
    pikv_cache *a = su_cache(ctx3, &p), *b = su_cache(ctx3, &p);
    su_workload(a, &p, 21);
    su_workload(b, &p, 22);
    int fds[2];
    CHECK(use_socket ? socketpair(AF_UNIX, SOCK_STREAM, 0, fds) == 0 : pipe(fds) == 0);
    writer_arg w = {{a, b}, 2, fds[1], {PIKV_ERR_INTERNAL, PIKV_ERR_INTERNAL}};
    pthread_t th;
    CHECK(pthread_create(&th, NULL, writer_main, &w) == 0);
    pikv_cache *x = su_cache(ctx1, &p), *y = su_cache(ctx1, &p);
    pikv_restore_report rep;
    memset(&rep, 0, sizeof rep);
    tu_err_ctx = ctx1;
    CHECK_OK(pikv_cache_stream_in(x, fds[0], &rep));
    CHECK_EQ(rep.generation, 1);
    CHECK_OK(pikv_cache_stream_in(y, fds[0], &rep));
    /* the descriptor is at the end: a third read finds nothing */
    pikv_cache *z = su_cache(ctx1, &p);
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_stream_in(z, fds[0], &rep));
    pthread_join(th, NULL);
    CHECK_OK(w.st[0]);
    CHECK_OK(w.st[1]);
    close(fds[0]);
    char why[256] = "";
    CHECKF(su_same_stats(a, x, &p, why, sizeof why), "first stream: %s", why);
    CHECKF(su_same_stats(b, y, &p, why, sizeof why), "second stream: %s", why);
    CHECKF(su_same_attend(a, x, &p, 5, 1e-5), "first stream attend");
    CHECKF(su_same_attend(b, y, &p, 6, 1e-5), "second stream attend");
    /* a reader that went away: EPIPE, never SIGPIPE (sockets), the cache unchanged */
    if (use_socket) {
        CHECK(socketpair(AF_UNIX, SOCK_STREAM, 0, fds) == 0);
        close(fds[0]);
        CHECK_STATUS(PIKV_ERR_BACKEND, pikv_cache_stream_out(a, fds[1], NULL));
        close(fds[1]);
    }
    pikv_cache_free(a);
    pikv_cache_free(b);
    pikv_cache_free(x);
    pikv_cache_free(y);
    pikv_cache_free(z);
}

/* ---- failures ---------------------------------------------------------------------------- */

/* A device whose buffer_write fails after so many calls (a restore's page writes). */
static const pikv_device_iface *g_real_iface;
static pikv_device_iface g_spy_iface;
static int g_writes_left;

static pikv_status spy_buffer_write(pikv_device *dev, pikv_buffer *buf, uint64_t offset, const void *src,
                                    uint64_t size)
{
    if (g_writes_left-- <= 0)
        return PIKV_ERR_BACKEND;
    return g_real_iface->buffer_write(dev, buf, offset, src, size);
}

/* A restore whose page writes fail part way, and one over a device memory limit: the target
   is left empty, its device memory as before, and a later restore works. */
static void restore_device_failures(const pikv_cache_params *p, const char *path)
{
    tu_set_case("restore: device failures");
    pikv_context *ctx = tu_context(3);
    pikv_cache *src = restored(ctx, p, path, NULL), *t = su_cache(ctx, p);
    pikv_cache_stats ss;
    pikv_cache_get_stats(src, &ss);
    pikv_device *dev = t->devs[0].dev;
    g_real_iface = dev->iface;
    g_spy_iface = *dev->iface;
    g_spy_iface.buffer_write = spy_buffer_write;
    uint64_t mem0[3];
    for (int d = 0; d < 3; d++)
        mem0[d] = tu_mem_used(ctx, d);
    for (int n = 0; n < 6; n++) {
        dev->iface = &g_spy_iface;
        g_writes_left = n;
        pikv_status st = pikv_cache_restore(t, path, NULL);
        dev->iface = g_real_iface;
        CHECKF(st == PIKV_ERR_BACKEND, "restore with device write %d failing: %s", n, pikv_status_name(st));
        pikv_cache_stats s;
        pikv_cache_get_stats(t, &s);
        CHECKF(s.sequences == 0 && s.pages == 0 && s.tokens == 0, "after a failed page write %d: %d sequences, "
               "%lld pages", n, s.sequences, (long long)s.pages);
        for (int d = 0; d < 3; d++)
            CHECK_EQ(tu_mem_used(ctx, d), mem0[d]);
    }
    CHECK_OK(pikv_cache_restore(t, path, NULL));
    CHECKF(su_same_attend(src, t, p, 8, 0.0), "restore after failed ones");
    pikv_cache_free(t);
    pikv_cache_free(src);
    pikv_context_free(ctx);
    /* devices too small for the checkpoint */
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "cpu";
    cp.cpu_devices = 1;
    cp.cpu_device_memory = (uint64_t)ss.bytes_used / 4;
    ctx = NULL;
    if (!CHECK_OK(pikv_context_create(&cp, &ctx)))
        return;
    t = su_cache(ctx, p);
    const uint64_t m0 = tu_mem_used(ctx, 0);
    pikv_status st = pikv_cache_restore(t, path, NULL);
    CHECKF(st != PIKV_OK, "restore onto a device of %llu bytes for %llu bytes of pages",
           (unsigned long long)cp.cpu_device_memory, (unsigned long long)ss.bytes_used);
    pikv_cache_get_stats(t, &ss);
    CHECK(ss.sequences == 0 && ss.pages == 0);
    CHECK_EQ(tu_mem_used(ctx, 0), m0);
    pikv_cache_free(t);
    pikv_context_free(ctx);
}

static void failures(const char *dir)
{
    tu_set_case("failures");
    tu_err_ctx = ctx1;
    pikv_cache_params p = su_params(PIKV_DTYPE_F16, PIKV_PLACEMENT_HASH);
    pikv_cache *a = su_cache(ctx1, &p);
    su_workload(a, &p, 31);
    char path[600], why[256];
    snprintf(path, sizeof path, "%s/fail.pikv", dir);
    /* INCREMENTAL before any FULL */
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_checkpoint(a, path, PIKV_CHECKPOINT_INCREMENTAL, NULL));
    CHECK(strstr(pikv_context_last_error(ctx1), "FULL") != NULL);
    CHECK(access(path, F_OK) != 0);
    /* arguments */
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_checkpoint(NULL, path, PIKV_CHECKPOINT_FULL, NULL));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_checkpoint(a, NULL, PIKV_CHECKPOINT_FULL, NULL));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_checkpoint(a, path, (pikv_checkpoint_mode)7, NULL));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_restore(NULL, path, NULL));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_restore(a, NULL, NULL));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_stream_out(a, -1, NULL));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_stream_in(a, -1, NULL));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_stream_out(NULL, 1, NULL));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_stream_in(NULL, 0, NULL));
    CHECK_OK(pikv_cache_checkpoint(a, path, PIKV_CHECKPOINT_FULL, NULL));
    restore_device_failures(&p, path);

    /* restore into a cache that holds a sequence: refused, unchanged */
    pikv_cache *busy = su_cache(ctx1, &p);
    CHECK_OK(pikv_seq_add(busy, 5));
    tu_rng r = tu_rng_seed(1);
    CHECK_OK(su_append(busy, &p, &r, 0, 5, 9));
    tu_snap s0, s1;
    tu_snap_take(busy, &p, &s0);
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_restore(busy, path, NULL));
    CHECK(strstr(pikv_context_last_error(ctx1), "holds 1 sequences") != NULL);
    tu_snap_take(busy, &p, &s1);
    TU_SNAP_SAME("restore into a busy cache", &s0, &s1);
    tu_snap_free(&s0);
    tu_snap_free(&s1);
    pikv_cache_free(busy);
    /* another geometry: the field and both values are named */
    pikv_cache_params q = p;
    q.head_dim = 32;
    pikv_cache *wrong = su_cache(ctx1, &q);
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_restore(wrong, path, NULL));
    CHECKF(strstr(pikv_context_last_error(ctx1), "head_dim = 16 in the checkpoint, 32 in the cache") != NULL, "%s",
           pikv_context_last_error(ctx1));
    pikv_cache_free(wrong);
    q = p;
    q.dtype = PIKV_DTYPE_F32;
    wrong = su_cache(ctx1, &q);
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_restore(wrong, path, NULL));
    CHECK(strstr(pikv_context_last_error(ctx1), "dtype = 1 in the checkpoint, 0 in the cache") != NULL);
    {
        pikv_cache_stats st;
        pikv_cache_get_stats(wrong, &st);
        CHECK_EQ(st.sequences, 0);
        CHECK_EQ(st.pages, 0);
    }
    pikv_cache_free(wrong);
    /* capacity of the target too small */
    q = p;
    q.capacity_tokens = 16;
    wrong = su_cache(ctx1, &q);
    CHECK_STATUS(PIKV_ERR_CAPACITY, pikv_cache_restore(wrong, path, NULL));
    pikv_cache_free(wrong);
    /* fewer sequence ids */
    q = p;
    q.max_sequences = 3;
    wrong = su_cache(ctx1, &q);
    CHECK_STATUS(PIKV_ERR_OUT_OF_RANGE, pikv_cache_restore(wrong, path, NULL));
    pikv_cache_free(wrong);

    /* injected write failures: FULL and INCREMENTAL at many points */
    pikv_cache *ref = restored(ctx1, &p, path, NULL); /* generation 1 */
    struct stat sb;
    CHECK(stat(path, &sb) == 0);
    const int64_t full_bytes = (int64_t)sb.st_size;
    int files0 = su_count_files(dir);
    for (int64_t at = 0; at < full_bytes; at += full_bytes / 23 + 1) {
        pikv_stream_set_write_fault(a, at);
        CHECK_STATUS(PIKV_ERR_BACKEND, pikv_cache_checkpoint(a, path, PIKV_CHECKPOINT_FULL, NULL));
        pikv_stream_set_write_fault(a, -1);
        CHECK_EQ(su_count_files(dir), files0);
        pikv_cache *x = restored(ctx1, &p, path, NULL);
        CHECKF(su_same_attend(ref, x, &p, 3, 0.0), "after a failed FULL at byte %lld", (long long)at);
        pikv_cache_free(x);
    }
    /* the bookkeeping survived: an incremental continues generation 1 */
    CHECK_OK(su_append(a, &p, &r, 1, 1, 30));
    pikv_checkpoint_stats cs;
    for (int64_t at = 0; at < 4000; at += 333) {
        pikv_stream_set_write_fault(a, at);
        CHECK_STATUS(PIKV_ERR_BACKEND, pikv_cache_checkpoint(a, path, PIKV_CHECKPOINT_INCREMENTAL, NULL));
        pikv_stream_set_write_fault(a, -1);
        CHECK(stat(path, &sb) == 0 && (int64_t)sb.st_size == full_bytes);
        pikv_restore_report rep;
        memset(&rep, 0, sizeof rep);
        pikv_cache *x = restored(ctx1, &p, path, &rep);
        CHECK_EQ(rep.generation, 1);
        CHECKF(su_same_attend(ref, x, &p, 3, 0.0), "after a failed INCREMENTAL at byte %lld", (long long)at);
        pikv_cache_free(x);
    }
    CHECK_OK(pikv_cache_checkpoint(a, path, PIKV_CHECKPOINT_INCREMENTAL, &cs));
    CHECK_EQ(cs.generation, 2);
    pikv_cache *x = restored(ctx1, &p, path, NULL);
    CHECKF(su_same_attend(a, x, &p, 4, 0.0), "generation 2 after failed attempts");
    CHECKF(su_same_stats(a, x, &p, why, sizeof why), "%s", why);
    pikv_cache_free(x);
    /* a torn tail (garbage after the last commit) is ignored by restore and cut by the next INCREMENTAL */
    FILE *f = fopen(path, "ab");
    CHECK(f && fwrite("\x01\x00\x00\x00garbage", 1, 11, f) == 11);
    if (f)
        fclose(f);
    pikv_restore_report rep;
    memset(&rep, 0, sizeof rep);
    x = restored(ctx1, &p, path, &rep);
    CHECK_EQ(rep.generation, 2);
    pikv_cache_free(x);
    CHECK_OK(su_append(a, &p, &r, 0, 0, 5));
    CHECK_OK(pikv_cache_checkpoint(a, path, PIKV_CHECKPOINT_INCREMENTAL, &cs));
    CHECK_EQ(cs.generation, 3);
    x = restored(ctx1, &p, path, &rep);
    CHECK_EQ(rep.generation, 3);
    CHECKF(su_same_attend(a, x, &p, 4, 0.0), "generation 3 after a torn tail");
    pikv_cache_free(x);
    /* the file replaced behind the cache's back (another inode): INCREMENTAL refuses, writes nothing */
    char other[700];
    snprintf(other, sizeof other, "%s.other", path);
    CHECK_OK(pikv_cache_checkpoint(ref, other, PIKV_CHECKPOINT_FULL, NULL));
    CHECK(rename(other, path) == 0);
    CHECK(stat(path, &sb) == 0);
    const off_t before = sb.st_size;
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_checkpoint(a, path, PIKV_CHECKPOINT_INCREMENTAL, NULL));
    CHECK(strstr(pikv_context_last_error(ctx1), "not the file of this cache's last checkpoint") != NULL);
    CHECK(stat(path, &sb) == 0 && sb.st_size == before);
    /* ... and another cache may not append to this cache's file either */
    CHECK_OK(pikv_cache_checkpoint(a, path, PIKV_CHECKPOINT_FULL, NULL));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_checkpoint(ref, path, PIKV_CHECKPOINT_INCREMENTAL, NULL));
    /* nonexistent file */
    pikv_cache *e = su_cache(ctx1, &p);
    snprintf(other, sizeof other, "%s/none.pikv", dir);
    CHECK_STATUS(PIKV_ERR_NOT_FOUND, pikv_cache_restore(e, other, NULL));
    CHECK_OK(pikv_cache_restore(e, path, NULL)); /* still usable */
    pikv_cache_free(e);
    pikv_cache_free(ref);
    pikv_cache_free(a);
}

/* Version 1 files (tests/data, written by the library as of commit d112e11 with
   gen_v1: su_workload seed 7000 + i for f16, int4) restore into this version's page
   layout: their caches attend as the same workload built here does. */
static void version1_files(void)
{
    static const pikv_dtype dts[2] = {PIKV_DTYPE_F16, PIKV_DTYPE_INT4};
    static const char *names[2] = {"f16", "int4"};
    for (int i = 0; i < 2; i++) {
        tu_set_case("version 1 file, %s", names[i]);
        tu_err_ctx = ctx1;
        pikv_cache_params p = su_params(dts[i], PIKV_PLACEMENT_EXPERT);
        char path[600];
        snprintf(path, sizeof path, "%s/v1-%s.pikv", PIKV_TEST_DATA_DIR, names[i]);
        size_t n = 0;
        uint8_t *file = tu_read_file(path, &n);
        CHECK_EQ(n > 12 ? file[8] : 0, 1); /* it is a version 1 file */
        free(file);
        pikv_restore_report rep;
        memset(&rep, 0, sizeof rep);
        pikv_cache *a = restored(ctx1, &p, path, &rep);
        pikv_cache *b = su_cache(ctx1, &p);
        su_workload(b, &p, 7000u + (uint64_t)i);
        pikv_cache_stats sa, sb;
        pikv_cache_get_stats(a, &sa);
        pikv_cache_get_stats(b, &sb);
        CHECK_EQ(sa.pages, sb.pages);
        CHECKF(su_same_attend(a, b, &p, 77, 1e-6), "a restored version 1 file attends as the same workload");
        pikv_cache_free(a);
        pikv_cache_free(b);
    }
}

int main(void)
{
    ctx1 = tu_context(1);
    ctx3 = tu_context(3);
    if (!ctx1 || !ctx3)
        return 2;
    char *dir = su_tmpdir("roundtrip");
    check_crc32c();
    for (int dt = 0; dt < 4; dt++)
        for (int pl = 0; pl < 3; pl++)
            for (int devs = 1; devs <= 3; devs += 2)
                one_config((pikv_dtype)dt, (pikv_placement)pl, devs, dir);
    streams(0);
    streams(1);
    version1_files();
    failures(dir);
    su_rmdir(dir);
    pikv_context_free(ctx1);
    pikv_context_free(ctx3);
    return tu_finish();
}
