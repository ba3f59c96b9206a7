/*
 * alloc_failure: an allocator hook (pikv_context_params.allocator) fails the Nth allocation
 * (N = 0, 1, 2, ... until the operation succeeds), in two modes: only the Nth fails, or the
 * Nth and every later one. Every failing call must return PIKV_ERR_OUT_OF_MEMORY, free what it
 * allocated, and leave the cache unchanged (stats, device memory, lengths, shard info, attend
 * output bitwise) and usable. Covered: context create, cache create, seq_add, append (new pages
 * in several shards and devices), copy_prefix, attend, rebalance, checkpoints (FULL and
 * INCREMENTAL) and restore (the target stays empty), seq_remove, cache_free.
 * The hook also counts live allocations: zero after pikv_context_free (a leak check that does
 * not depend on ASan), and every free must be of a pointer the hook returned.
 */
#include "test-util.h"

#include <pthread.h>
#include <unistd.h>

typedef struct hook {
    pthread_mutex_t mu;
    long long calls;    /* alloc calls since arming */
    long long fail_at;  /* -1 = never */
    int fail_rest;      /* fail every call >= fail_at */
    long long failed;   /* allocations refused since arming */
    long long live;     /* allocations not yet freed */
    uint64_t live_bytes;
    long long total;    /* all successful allocations */
    long long bad_frees;
    long long bad_align;
} hook;

static hook g_hook = {PTHREAD_MUTEX_INITIALIZER, 0, -1, 0, 0, 0, 0, 0, 0, 0};

#define HDR_MAGIC 0x70696b76616c6c6fULL
typedef struct hdr {
    uint64_t magic;
    uint64_t size;
    void *raw;
    uint64_t pad;
} hdr;

static void *hook_alloc(void *user, size_t size, size_t align)
{
    hook *h = user;
    pthread_mutex_lock(&h->mu);
    long long n = h->calls++;
    int fail = h->fail_at >= 0 && (n == h->fail_at || (h->fail_rest && n > h->fail_at));
    if (align == 0 || (align & (align - 1)) != 0 || align > 4096)
        h->bad_align++;
    if (fail)
        h->failed++;
    pthread_mutex_unlock(&h->mu);
    if (fail)
        return NULL;
    size_t a = align < 16 ? 16 : align;
    size_t off = a < sizeof(hdr) ? sizeof(hdr) : a; /* a multiple of a (powers of two) */
    void *raw = NULL;
    if (posix_memalign(&raw, a, size + off) != 0)
        return NULL;
    char *p = (char *)raw + off;
    hdr *hd = (hdr *)(void *)(p - sizeof(hdr));
    hd->magic = HDR_MAGIC;
    hd->size = size;
    hd->raw = raw;
    pthread_mutex_lock(&h->mu);
    h->live++;
    h->live_bytes += size;
    h->total++;
    pthread_mutex_unlock(&h->mu);
    return p;
}

static void hook_free(void *user, void *ptr)
{
    hook *h = user;
    if (!ptr)
        return;
    hdr *hd = (hdr *)(void *)((char *)ptr - sizeof(hdr));
    if (hd->magic != HDR_MAGIC) {
        pthread_mutex_lock(&h->mu);
        h->bad_frees++;
        pthread_mutex_unlock(&h->mu);
        return;
    }
    hd->magic = 0;
    pthread_mutex_lock(&h->mu);
    h->live--;
    h->live_bytes -= hd->size;
    pthread_mutex_unlock(&h->mu);
    free(hd->raw);
}

static void arm(long long n, int rest)
{
    pthread_mutex_lock(&g_hook.mu);
    g_hook.calls = 0;
    g_hook.failed = 0;
    g_hook.fail_at = n;
    g_hook.fail_rest = rest;
    pthread_mutex_unlock(&g_hook.mu);
}

/* Returns how many allocations were refused while armed. */
static long long disarm(void)
{
    pthread_mutex_lock(&g_hook.mu);
    long long f = g_hook.failed;
    g_hook.fail_at = -1;
    pthread_mutex_unlock(&g_hook.mu);
    return f;
}

static long long live(void)
{
    pthread_mutex_lock(&g_hook.mu);
    long long l = g_hook.live;
    pthread_mutex_unlock(&g_hook.mu);
    return l;
}

static pikv_context_params hook_params(int devices)
{
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "cpu";
    cp.cpu_devices = devices;
    cp.allocator.alloc = hook_alloc;
    cp.allocator.free = hook_free;
    cp.allocator.user = &g_hook;
    return cp;
}

#define MAX_TRIES 20000

/* ---------------------------------------------------------------------- */

typedef pikv_status (*op_fn)(void *arg);

/*
 * Runs op with the Nth allocation failing, N = 0, 1, ... until it succeeds; after each
 * failure checks OUT_OF_MEMORY, no leak, and the cache unchanged. Returns the failing attempts.
 */
static int retry(const char *name, pikv_cache *c, const pikv_cache_params *p, int rest,
                 op_fn op, void *arg, void (*on_fail)(void *arg))
{
    tu_snap base;
    tu_snap_take(c, p, &base);
    CHECKF(base.ok, "%s: snapshot before", name);
    long long n;
    pikv_status st = PIKV_ERR_INTERNAL;
    for (n = 0; n < MAX_TRIES; n++) {
        arm(n, rest);
        st = op(arg);
        long long refused = disarm();
        if (st == PIKV_OK)
            break;
        char what[160];
        snprintf(what, sizeof what, "%s with allocation %lld%s failing", name, n,
                 rest ? " and later ones" : "");
        CHECKF(st == PIKV_ERR_OUT_OF_MEMORY, "%s: returned %s (%s)", what,
               pikv_status_name(st), pikv_context_last_error(pikv_cache_context(c)));
        CHECKF(refused > 0, "%s: failed with %s although no allocation was refused", what,
               pikv_status_name(st));
        /* Allocations kept after a failure (grown index arrays) are allowed; leaks are caught
           at the end: everything must be freed by pikv_cache_free / pikv_context_free. */
        const char *msg = pikv_context_last_error(pikv_cache_context(c));
        CHECKF(msg && msg[0], "%s: no last error message", what);
        if (on_fail)
            on_fail(arg);
        tu_snap cur;
        tu_snap_take(c, p, &cur);
        TU_SNAP_SAME(what, &base, &cur);
        tu_snap_free(&base);
        base = cur;
        if (st != PIKV_ERR_OUT_OF_MEMORY || tu_fail_count > 200)
            break;
    }
    CHECKF(st == PIKV_OK, "%s: never succeeded (last %s after %lld tries)", name,
           pikv_status_name(st), n);
    tu_snap_free(&base);
    return (int)n;
}

/* ---------------------------------------------------------------------- */
/* Operations                                                             */
/* ---------------------------------------------------------------------- */

typedef struct env {
    pikv_context *ctx;
    pikv_cache *cache;
    pikv_cache_params p;
    tu_model m;
    tu_rng r;
    /* pending operation arguments */
    int seq, seq2, layer;
    int64_t n;
    float *k, *v;
    int32_t *ex;
    int64_t moved;
    int32_t qseqs[8];
    int nq;
    float *q, *out, *lse;
} env;

static pikv_status op_seq_add(void *a)
{
    env *e = a;
    return pikv_seq_add(e->cache, e->seq);
}

static void fail_seq_add(void *a)
{
    env *e = a;
    int64_t len;
    CHECKF(pikv_seq_length(e->cache, e->seq, 0, &len) == PIKV_ERR_NOT_FOUND,
           "seq %d exists after a failed seq_add", e->seq);
}

static pikv_status op_append(void *a)
{
    env *e = a;
    return pikv_cache_append(e->cache, e->layer, e->seq, (int32_t)e->n, e->k, e->v, NULL, e->ex);
}

static pikv_status op_copy(void *a)
{
    env *e = a;
    return pikv_seq_copy_prefix(e->cache, e->seq, e->seq2, e->n);
}

static void fail_copy(void *a)
{
    env *e = a;
    int64_t len;
    CHECKF(pikv_seq_length(e->cache, e->seq2, 0, &len) == PIKV_ERR_NOT_FOUND,
           "seq %d exists after a failed copy_prefix", e->seq2);
}

static pikv_status op_attend(void *a)
{
    env *e = a;
    pikv_attend_batch b = {e->nq, e->qseqs, e->q, NULL, e->out, e->lse, NULL};
    return pikv_cache_attend(e->cache, e->layer, &b);
}

static pikv_status op_rebalance(void *a)
{
    env *e = a;
    e->moved = -1;
    return pikv_cache_rebalance(e->cache, &e->moved);
}

static pikv_status op_remove(void *a)
{
    env *e = a;
    return pikv_seq_remove(e->cache, e->seq);
}

/* checkpoints and restore (docs/stream.md) */
static char ckpt_path[512];
static pikv_cache *restore_target;

static pikv_status op_checkpoint_full(void *a)
{
    env *e = a;
    return pikv_cache_checkpoint(e->cache, ckpt_path, PIKV_CHECKPOINT_FULL, NULL);
}

static pikv_status op_checkpoint_incremental(void *a)
{
    env *e = a;
    return pikv_cache_checkpoint(e->cache, ckpt_path, PIKV_CHECKPOINT_INCREMENTAL, NULL);
}

static pikv_status op_restore(void *a)
{
    (void)a;
    return pikv_cache_restore(restore_target, ckpt_path, NULL);
}

static void fail_restore(void *a)
{
    (void)a;
    pikv_cache_stats st;
    CHECK_OK(pikv_cache_get_stats(restore_target, &st));
    CHECKF(st.sequences == 0 && st.pages == 0, "a failed restore left %d sequences, %lld pages", st.sequences,
           (long long)st.pages);
}

static void gen_append(env *e, int layer, int seq, int64_t n, int only_expert)
{
    size_t row = (size_t)e->p.n_kv_heads * e->p.head_dim;
    free(e->k);
    free(e->v);
    free(e->ex);
    e->k = tu_xmalloc((size_t)n * row * sizeof(float));
    e->v = tu_xmalloc((size_t)n * row * sizeof(float));
    e->ex = tu_xmalloc((size_t)n * e->p.experts_per_token * sizeof(int32_t));
    tu_gen(&e->r, &e->m, n, e->k, e->v, e->ex, 0);
    if (only_expert >= 0)
        for (int64_t t = 0; t < n; t++)
            for (int j = 0; j < e->p.experts_per_token; j++)
                e->ex[(size_t)t * e->p.experts_per_token + j] = (only_expert + j) % e->p.n_experts;
    e->layer = layer;
    e->seq = seq;
    e->n = n;
}

/* An append of n tokens under failures; on success the model follows. */
static void append_under_failures(env *e, int rest, int layer, int seq, int64_t n,
                                  int only_expert)
{
    gen_append(e, layer, seq, n, only_expert);
    pikv_cache_stats s0, s1;
    pikv_cache_get_stats(e->cache, &s0);
    long long lb0 = (long long)g_hook.live_bytes;
    char name[96];
    snprintf(name, sizeof name, "append(layer %d, seq %d, %lld tokens)", layer, seq,
             (long long)n);
    retry(name, e->cache, &e->p, rest, op_append, e, NULL);
    tu_model_push(&e->m, layer, seq, n, e->k, e->v, e->ex);
    pikv_cache_get_stats(e->cache, &s1);
    long long lb1 = (long long)g_hook.live_bytes;
    /* the device memory of the pages went through the hook */
    CHECKF(lb1 - lb0 >= (long long)(s1.bytes_allocated - s0.bytes_allocated),
           "%s: hook saw %lld more bytes live, cache allocated %lld more", name, lb1 - lb0,
           (long long)(s1.bytes_allocated - s0.bytes_allocated));
}

static void scenario(int rest)
{
    const char *mode = rest ? "Nth and later allocations fail" : "only the Nth allocation fails";

    /* context create */
    tu_set_case("context create, %s", mode);
    pikv_context_params cp = hook_params(4);
    pikv_context *ctx = NULL;
    long long n;
    for (n = 0; n < MAX_TRIES; n++) {
        arm(n, rest);
        pikv_status st = pikv_context_create(&cp, &ctx);
        disarm();
        if (st == PIKV_OK)
            break;
        CHECKF(st == PIKV_ERR_OUT_OF_MEMORY, "context create with allocation %lld failing: %s",
               n, pikv_status_name(st));
        CHECKF(ctx == NULL, "context create failed but *out was set");
        CHECKF(live() == 0, "context create with allocation %lld failing leaks %lld "
               "allocations", n, live());
        if (st != PIKV_ERR_OUT_OF_MEMORY)
            break;
    }
    if (!CHECK(ctx != NULL))
        return;
    CHECKF(n > 0, "context create made no allocation through the hook");
    tu_err_ctx = ctx;
    long long live_ctx = live();

    /* cache create */
    tu_set_case("cache create, %s", mode);
    env e;
    memset(&e, 0, sizeof e);
    e.ctx = ctx;
    e.p = pikv_cache_default_params();
    e.p.n_layers = 2;
    e.p.n_q_heads = 4;
    e.p.n_kv_heads = 2;
    e.p.head_dim = 16;
    e.p.n_experts = 8;
    e.p.experts_per_token = 2;
    e.p.page_size = 4;
    e.p.capacity_tokens = 100000;
    e.p.max_sequences = 8;
    e.p.placement = PIKV_PLACEMENT_BALANCED;
    e.r = tu_rng_seed(rest ? 2 : 1);
    uint64_t mem0[4];
    for (int d = 0; d < 4; d++)
        mem0[d] = tu_mem_used(ctx, d);
    for (n = 0; n < MAX_TRIES; n++) {
        long long l0 = live();
        arm(n, rest);
        pikv_status st = pikv_cache_create(ctx, &e.p, &e.cache);
        disarm();
        if (st == PIKV_OK)
            break;
        CHECKF(st == PIKV_ERR_OUT_OF_MEMORY, "cache create with allocation %lld failing: %s",
               n, pikv_status_name(st));
        CHECKF(e.cache == NULL, "cache create failed but *out was set");
        CHECKF(live() == l0, "cache create with allocation %lld failing leaks %lld allocations",
               n, live() - l0);
        for (int d = 0; d < 4; d++)
            CHECK_EQ(tu_mem_used(ctx, d), mem0[d]);
        if (st != PIKV_ERR_OUT_OF_MEMORY)
            break;
    }
    if (!CHECK(e.cache != NULL)) {
        pikv_context_free(ctx);
        return;
    }
    tu_model_init(&e.m, &e.p);

    /* seq_add */
    tu_set_case("seq_add, %s", mode);
    e.seq = 0;
    retry("seq_add(0)", e.cache, &e.p, rest, op_seq_add, &e, fail_seq_add);
    e.m.live[0] = 1;
    e.seq = 1;
    retry("seq_add(1)", e.cache, &e.p, rest, op_seq_add, &e, fail_seq_add);
    e.m.live[1] = 1;

    /* appends: the first ones create shards and pages on every device */
    tu_set_case("append, %s", mode);
    append_under_failures(&e, rest, 0, 0, 3, -1);
    append_under_failures(&e, rest, 0, 0, 150, -1);
    append_under_failures(&e, rest, 1, 0, 97, -1);
    append_under_failures(&e, rest, 0, 1, 61, -1);
    append_under_failures(&e, rest, 1, 1, 1, -1);
    TU_CHECK_ALL(e.cache, &e.m, &e.r);

    /* copy_prefix with partial pages to copy */
    tu_set_case("copy_prefix, %s", mode);
    e.seq = 0;
    e.seq2 = 2;
    e.n = 77;
    retry("copy_prefix(0 -> 2, 77)", e.cache, &e.p, rest, op_copy, &e, fail_copy);
    tu_model_copy_prefix(&e.m, 0, 2, 77);
    TU_CHECK_ALL(e.cache, &e.m, &e.r);
    append_under_failures(&e, rest, 0, 2, 9, -1); /* diverge */
    TU_CHECK_ALL(e.cache, &e.m, &e.r);

    /* attend */
    tu_set_case("attend, %s", mode);
    {
        size_t per = (size_t)e.p.n_q_heads * e.p.head_dim;
        e.nq = 4;
        e.qseqs[0] = 0;
        e.qseqs[1] = 2;
        e.qseqs[2] = 1;
        e.qseqs[3] = 0;
        e.q = tu_xmalloc(4 * per * sizeof(float));
        e.out = tu_xmalloc(4 * per * sizeof(float));
        e.lse = tu_xmalloc(4 * (size_t)e.p.n_q_heads * sizeof(float));
        tu_fill(&e.r, e.q, 4 * per, 2.0f);
        for (int l = 0; l < 2; l++) {
            e.layer = l;
            retry("attend", e.cache, &e.p, rest, op_attend, &e, NULL);
            double *ro = tu_xmalloc(per * sizeof(double));
            for (int i = 0; i < e.nq; i++) {
                tu_model_ref(&e.m, l, e.qseqs[i], -1, e.q + i * per, 1, ro, NULL);
                CHECK_LE(tu_norm_err(e.out + i * per, ro, per), TU_TOL_EXACT);
            }
            free(ro);
        }
    }

    /* rebalance: grow two shards that share a device first */
    tu_set_case("rebalance, %s", mode);
    {
        int32_t dev[8];
        int64_t pg, tk;
        for (int s = 0; s < 8; s++)
            CHECK_OK(pikv_cache_shard_info(e.cache, 0, s, &dev[s], &pg, &tk));
        int ea = -1, eb = -1;
        for (int x = 0; x < 8 && ea < 0; x++)
            for (int y = x + 1; y < 8; y++)
                if (dev[x] == dev[y] && dev[x] >= 0) {
                    ea = x;
                    eb = y;
                    break;
                }
        if (CHECK(ea >= 0)) {
            append_under_failures(&e, rest, 0, 1, 120, ea);
            append_under_failures(&e, rest, 0, 0, 120, eb);
        }
        retry("rebalance", e.cache, &e.p, rest, op_rebalance, &e, NULL);
        CHECKF(e.moved > 0, "rebalance moved %lld pages", (long long)e.moved);
        TU_CHECK_ALL(e.cache, &e.m, &e.r);
    }

    /* checkpoints (FULL, then INCREMENTAL after an append) and a restore into a second
       cache: each fails cleanly at every allocation; the restore target stays empty */
    tu_set_case("checkpoint and restore, %s", mode);
    {
        char dir[] = "/tmp/pikv-alloc-XXXXXX";
        if (CHECK(mkdtemp(dir) != NULL)) {
            snprintf(ckpt_path, sizeof ckpt_path, "%s/ck.pikv", dir);
            int tries = retry("checkpoint FULL", e.cache, &e.p, rest, op_checkpoint_full, &e, NULL);
            CHECKF(tries >= 4, "checkpoint FULL failed %d times", tries);
            append_under_failures(&e, rest, 1, 1, 21, -1);
            tries = retry("checkpoint INCREMENTAL", e.cache, &e.p, rest, op_checkpoint_incremental, &e, NULL);
            CHECKF(tries >= 3, "checkpoint INCREMENTAL failed %d times", tries);
            CHECK_OK(pikv_cache_create(ctx, &e.p, &restore_target));
            tries = retry("restore", restore_target, &e.p, rest, op_restore, &e, fail_restore);
            CHECKF(tries >= 10, "restore failed %d times", tries);
            printf("checkpoint/restore: %d failing restores (%s)\n", tries, mode);
            TU_CHECK_ALL(restore_target, &e.m, &e.r);
            pikv_cache_free(restore_target);
            restore_target = NULL;
            unlink(ckpt_path);
            rmdir(dir);
        }
    }

    /* usable afterwards: more appends, a remove */
    tu_set_case("after failures, %s", mode);
    append_under_failures(&e, rest, 1, 2, 33, -1);
    e.seq = 0;
    retry("seq_remove(0)", e.cache, &e.p, rest, op_remove, &e, NULL);
    tu_model_remove(&e.m, 0);
    TU_CHECK_ALL(e.cache, &e.m, &e.r);
    for (int d = 0; d < 4; d++) {
        pikv_cache_device_stats ds;
        if (CHECK_OK(pikv_cache_get_device_stats(e.cache, d, &ds)))
            CHECK_EQ(tu_mem_used(ctx, ds.device) - mem0[ds.device], ds.bytes_allocated);
    }

    /* cache_free must not need to allocate */
    tu_set_case("free, %s", mode);
    arm(0, 1);
    pikv_cache_free(e.cache);
    disarm();
    e.cache = NULL;
    for (int d = 0; d < 4; d++)
        CHECK_EQ(tu_mem_used(ctx, d), mem0[d]);
    CHECKF(live() <= live_ctx, "after pikv_cache_free %lld allocations live, %lld right after "
           "context create", live(), live_ctx);
    arm(0, 1);
    pikv_context_free(ctx);
    disarm();
    CHECKF(live() == 0, "%lld allocations (%llu bytes) leaked after pikv_context_free", live(),
           (unsigned long long)g_hook.live_bytes);
    CHECK_EQ(g_hook.bad_frees, 0);
    CHECK_EQ(g_hook.bad_align, 0);
    tu_model_free(&e.m);
    free(e.k);
    free(e.v);
    free(e.ex);
    free(e.q);
    free(e.out);
    free(e.lse);
}

/* Regression: a device memory limit that makes every chunk one page, so the pool's chunk
   array grows often. Failing any allocation of an append that grows it must leave the pages
   readable (the kernels' view of the chunk array once dangled after such a failure). */
static void test_chunk_array_growth(void)
{
    tu_set_case("chunk array growth under failures");
    pikv_context_params cp = hook_params(1);
    cp.cpu_threads = 1;
    pikv_cache_params p = pikv_cache_default_params();
    p.n_q_heads = 1;
    p.n_kv_heads = 1;
    p.head_dim = 4;
    p.page_size = 1;
    p.dtype = PIKV_DTYPE_F32;
    p.capacity_tokens = 1000;
    p.max_sequences = 1;
    const float q[4] = {0.5f, -1.0f, 0.25f, 2.0f};
    for (int tokens = 1; tokens <= 15; tokens++) { /* the limit holds 16 pages */
        for (long long n = 0; n < 64; n++) {
            pikv_context *ctx = NULL;
            cp.cpu_device_memory = 16 * 64; /* a page is 64 bytes: one page per chunk */
            if (!CHECK_OK(pikv_context_create(&cp, &ctx)))
                return;
            pikv_cache *c = NULL;
            CHECK_OK(pikv_cache_create(ctx, &p, &c));
            CHECK_OK(pikv_seq_add(c, 0));
            float kv[4];
            for (int t = 0; t < tokens; t++) {
                for (int d = 0; d < 4; d++)
                    kv[d] = (float)((t * 7 + d * 3) % 11) - 5.0f;
                CHECK_OK(pikv_cache_append(c, 0, 0, 1, kv, kv, NULL, NULL));
            }
            int32_t sid = 0;
            float before[4], after[4], lb, la;
            pikv_attend_batch b = {1, &sid, q, NULL, before, &lb, NULL};
            CHECK_OK(pikv_cache_attend(c, 0, &b));
            arm(n, 0);
            pikv_status st = pikv_cache_append(c, 0, 0, 1, kv, kv, NULL, NULL);
            long long refused = disarm();
            CHECKF(st == PIKV_OK || st == PIKV_ERR_OUT_OF_MEMORY, "append after %d tokens, "
                   "allocation %lld refused: %s", tokens, n, pikv_status_name(st));
            if (st != PIKV_OK) {
                b.out = after;
                b.lse = &la;
                CHECK_OK(pikv_cache_attend(c, 0, &b));
                CHECKF(memcmp(before, after, sizeof before) == 0 && lb == la,
                       "attend changed after a failed append (%d tokens, allocation %lld)",
                       tokens, n);
            }
            pikv_cache_free(c);
            pikv_context_free(ctx);
            if (refused == 0)
                break; /* the append made fewer than n allocations: every one was tried */
        }
    }
    CHECK_EQ(live(), 0);
}

/* A plain run with the hook never failing: everything goes through it and is freed. */
static void test_no_failures(void)
{
    tu_set_case("hook without failures");
    pikv_context_params cp = hook_params(2);
    pikv_context *ctx = NULL;
    if (!CHECK_OK(pikv_context_create(&cp, &ctx)))
        return;
    pikv_cache_params p = pikv_cache_default_params();
    p.n_layers = 1;
    p.n_q_heads = 2;
    p.n_kv_heads = 1;
    p.head_dim = 8;
    p.n_experts = 2;
    p.experts_per_token = 1;
    p.page_size = 8;
    p.capacity_tokens = 1000;
    p.max_sequences = 2;
    pikv_cache *c = NULL;
    CHECK_OK(pikv_cache_create(ctx, &p, &c));
    long long t0 = g_hook.total;
    tu_model m;
    tu_model_init(&m, &p);
    tu_rng r = tu_rng_seed(5);
    CHECK_OK(pikv_seq_add(c, 0));
    m.live[0] = 1;
    pikv_cache_stats st;
    CHECK_OK(tu_append_random(c, &m, &r, 0, 0, 100, 0));
    CHECK_OK(pikv_cache_get_stats(c, &st));
    CHECKF(g_hook.total > t0, "appending 100 tokens made no allocation through the hook");
    CHECKF(g_hook.live_bytes >= st.bytes_allocated, "hook holds %llu bytes, cache allocated "
           "%llu", (unsigned long long)g_hook.live_bytes,
           (unsigned long long)st.bytes_allocated);
    TU_CHECK_ALL(c, &m, &r);
    pikv_cache_free(c);
    pikv_context_free(ctx);
    CHECK_EQ(live(), 0);
    tu_model_free(&m);
}

int main(void)
{
    test_no_failures();
    test_chunk_array_growth();
    scenario(0);
    scenario(1);
    tu_set_case("");
    printf("alloc_failure: %lld allocations through the hook\n", g_hook.total);
    return tu_finish();
}
