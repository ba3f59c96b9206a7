/*
 * cache_fuzz: a white-box fuzzer of the cache's bookkeeping.
 *
 * Each seed draws a small random geometry (1-3 CPU devices, f32 or f16 storage, every
 * placement, pages of 1-5 tokens, sometimes a device-memory limit so pools grow in small
 * chunks, sometimes a tight token capacity) and runs a random sequence of operations:
 * seq_add, seq_remove, append, copy_prefix, rebalance (BALANCED) or trim, attend.
 *
 *  - seq_add, append, copy_prefix and rebalance sometimes run with an allocation failing
 *    (the allocator hook fails the Nth one, or the Nth and all later ones). A failed call
 *    must return OUT_OF_MEMORY (or CAPACITY where the call may) and leave the cache as it
 *    was: stats, device memory, lengths, shard info and attend output bitwise (tu_snap).
 *  - Every attend is compared with the dense double-precision reference over a shadow
 *    model of what the cache holds (tu_model).
 *  - After every operation the private structures (cache-impl.h) are checked:
 *      page refcounts equal the number of page-table rings that hold the page;
 *      only a ring's back page may be partial, and shared pages are full;
 *      a page sits in the layer and shard of its ring, on its shard's device;
 *      per device, every slot is free or used by exactly one page, free + used = slots;
 *      token and page counters of the cache, layers, shards and devices add up;
 *      the sequences and their lengths are the model's.
 *  - A third of the seeds turn memory tiers on (tiers.enabled; its own random stream, so the
 *    other seeds run as before): a host tier, sometimes small with a disk tier behind it,
 *    prefetch on or off, 1-3 staging slots taken at creation; the otherwise idle operation
 *    demotes a random resident full page (pikv_tier_demote), so every operation above runs
 *    over pages in all three tiers. The invariants then count resident pages per device
 *    (demoted ones have no slot; staging slots are used), the demoted pages per device, and
 *    the tier statistics' pages per tier add up to the live pages.
 *
 * Usage: cache_fuzz [first_seed [ops_per_seed [n_seeds]]]. Without arguments the
 * environment variables PIKV_FUZZ_SEEDS and PIKV_FUZZ_OPS override the defaults. The run
 * stops at the first failing operation and prints the seed and the operation number;
 * `cache_fuzz SEED OPS 1` replays that seed alone.
 */
#include "fault-hook.h"
#include "test-util.h"

#include "cache-impl.h"

#include <errno.h>
#include <pthread.h>

#define MAX_SEQS 6
#define MAX_LAYERS 2
#define MAX_TOKENS 400 /* per sequence and layer: keeps the references cheap */
#define MAX_APPEND 12

/* About 4 s on 2 cores, in a Release and an ASan+UBSan build alike: the time goes to waking
   the CPU backend's worker threads. */
#define DEFAULT_SEEDS 300
#define DEFAULT_OPS 300

/* ------------------------------------------------------------------------ */
/* One seed's state                                                          */
/* ------------------------------------------------------------------------ */

typedef struct fuzz {
    uint64_t seed;
    long op; /* index of the operation being run */
    tu_rng r;
    pikv_context_params cp;
    pikv_cache_params p;
    pikv_context *ctx;
    pikv_cache *c;
    tu_model m;
    char geometry[320];
    tu_rng tr; /* tiers: their own stream */
} fuzz;

/* What the whole run did, to show (and check) that the failure paths were exercised. */
typedef struct totals {
    long long ops, appends, copies, rebalances, adds, attends;
    long long armed;  /* calls run with the hook armed */
    long long failed; /* calls that failed (injected, capacity or device memory) */
    long long tier_seeds, demotes, demoted_reads; /* tiers: seeds, demotions, attends reading demoted pages */
} totals;

static totals g_totals;

/* Names the current operation in the message printed before its first failure. */
static void describe_op(const fuzz *f, const char *fmt, ...)
{
    char what[160];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    tu_set_case("seed %llu, op %ld: %s [%s]", (unsigned long long)f->seed, f->op, what,
                f->geometry);
}

static int coin(tu_rng *r)
{
    return (int)tu_int(r, 0, 1);
}

/* Arms the hook for one call with probability 1/3: one of its first 12 allocations fails
   (and, half of the time, every later one). */
static void maybe_arm(fuzz *f)
{
    if (tu_int(&f->r, 0, 2) != 0)
        return;
    long long fail_at = tu_int(&f->r, 0, 11);
    int fail_rest = coin(&f->r);
    tu_fault_arm(fail_at, fail_rest);
    g_totals.armed++;
}

/* ------------------------------------------------------------------------ */
/* Setup and teardown                                                        */
/* ------------------------------------------------------------------------ */

/* Bytes of one page of this geometry, read from a throwaway cache (pikv_page_layout_init is
   not exported from a shared library). 0 if it cannot be created. */
static uint64_t probe_page_bytes(const pikv_cache_params *p)
{
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "cpu";
    cp.cpu_devices = 1;
    cp.cpu_threads = 1;
    pikv_context *ctx = NULL;
    pikv_cache *c = NULL;
    uint64_t bytes = 0;
    if (pikv_context_create(&cp, &ctx) == PIKV_OK && pikv_cache_create(ctx, p, &c) == PIKV_OK)
        bytes = c->layout.page_bytes;
    pikv_cache_free(c);
    pikv_context_free(ctx);
    return bytes;
}

static void draw_geometry(fuzz *f)
{
    tu_rng *r = &f->r;
    pikv_cache_params *p = &f->p;
    *p = pikv_cache_default_params();
    p->n_layers = (int32_t)tu_int(r, 1, MAX_LAYERS);
    p->n_kv_heads = (int32_t)tu_int(r, 1, 2);
    p->n_q_heads = p->n_kv_heads * (int32_t)tu_int(r, 1, 3);
    p->head_dim = (int32_t)tu_int(r, 1, 9);
    p->n_experts = (int32_t)tu_int(r, 1, 4);
    p->experts_per_token = 1;
    p->page_size = (int32_t)tu_int(r, 1, 5);
    p->dtype = coin(r) ? PIKV_DTYPE_F16 : PIKV_DTYPE_F32;
    p->placement = (pikv_placement)tu_int(r, PIKV_PLACEMENT_EXPERT, PIKV_PLACEMENT_BALANCED);
    p->max_sequences = MAX_SEQS;
    /* A third of the seeds run into the token capacity now and then. */
    p->capacity_tokens = tu_int(r, 0, 2) == 0 ? tu_int(r, 30, 129) : 100000;
    if (p->n_experts == 1 && coin(r))
        p->n_shards = (int32_t)tu_int(r, 1, 3);

    pikv_context_params *cp = &f->cp;
    *cp = pikv_context_default_params();
    cp->backends = "cpu";
    cp->cpu_devices = (int32_t)tu_int(r, 1, 3);
    cp->cpu_threads = (int32_t)tu_int(r, 1, 4);
    tu_fault_install(cp);
    /* Half of the seeds limit device memory to 16-64 pages (plus an odd remainder), so
       chunks hold few pages, pools grow often and appends run out of device memory. */
    if (coin(r)) {
        uint64_t page = probe_page_bytes(p);
        uint64_t pages = 16 * (uint64_t)tu_int(r, 1, 4);
        cp->cpu_device_memory = page * pages + (uint64_t)tu_int(r, 0, 63);
    }

    /* tiers, from their own stream: the draws above are those of a build without tiers */
    f->tr = tu_rng_seed(f->seed ^ 0x7e125eedull);
    if (tu_int(&f->tr, 0, 2) == 0) {
        const uint64_t page = probe_page_bytes(p);
        p->tiers.enabled = 1;
        p->tiers.staging_pages = (int32_t)tu_int(&f->tr, 1, 3);
        p->tiers.prefetch = coin(&f->tr);
        if (coin(&f->tr)) {
            p->tiers.host_bytes = page * (uint64_t)tu_int(&f->tr, 1, 6);
            p->tiers.disk_bytes = page * 100000;
        }
    }
    snprintf(f->geometry, sizeof f->geometry,
             "layers %d, heads %d/%d, head_dim %d, experts %d, page %d, %s, placement %d, "
             "shards %d, capacity %lld, devices %d, threads %d, device memory %llu, tiers %d "
             "(host %llu, disk %llu, staging %d, prefetch %d)",
             p->n_layers, p->n_q_heads, p->n_kv_heads, p->head_dim, p->n_experts, p->page_size,
             p->dtype == PIKV_DTYPE_F16 ? "f16" : "f32", (int)p->placement, p->n_shards,
             (long long)p->capacity_tokens, cp->cpu_devices, cp->cpu_threads,
             (unsigned long long)cp->cpu_device_memory, p->tiers.enabled,
             (unsigned long long)p->tiers.host_bytes, (unsigned long long)p->tiers.disk_bytes,
             p->tiers.staging_pages, p->tiers.prefetch);
}

static int fuzz_open(fuzz *f, uint64_t seed)
{
    memset(f, 0, sizeof *f);
    f->seed = seed;
    f->op = -1;
    f->r = tu_rng_seed(seed);
    draw_geometry(f);
    describe_op(f, "setup");
    if (!CHECK_OK(pikv_context_create(&f->cp, &f->ctx)))
        return 0;
    tu_err_ctx = f->ctx;
    if (!CHECK_OK(pikv_cache_create(f->ctx, &f->p, &f->c)))
        return 0;
    /* the staging slots up front, so a snapshot's attend never grows a pool */
    for (int d = 0; f->p.tiers.enabled && d < f->c->n_devs; d++)
        if (!CHECK_OK(pikv_tier_staging_ensure(f->c, d, f->p.tiers.staging_pages)))
            return 0;
    tu_model_init(&f->m, &f->p);
    g_totals.tier_seeds += f->p.tiers.enabled;
    return 1;
}

static void fuzz_close(fuzz *f)
{
    pikv_cache_free(f->c);
    pikv_context_free(f->ctx);
    tu_err_ctx = NULL;
    tu_model_free(&f->m);
    f->c = NULL;
    f->ctx = NULL;
    /* Everything the context allocated went through the hook: a leak check without ASan. */
    CHECKF(tu_fault_live() == 0, "seed %llu: %lld allocations live after pikv_context_free",
           (unsigned long long)f->seed, tu_fault_live());
}

/* ------------------------------------------------------------------------ */
/* Invariants of the private structures                                      */
/* ------------------------------------------------------------------------ */

/* Per-page and per-owner sums recomputed from the page tables and page metadata. */
typedef struct tally {
    int64_t *refs;                      /* [pages_high]: rings holding each page id */
    int64_t *layer_tokens;              /* [n_layers] */
    int64_t *shard_pages, *shard_tokens; /* [n_layers * n_shards] */
    int64_t *dev_pages, *dev_tokens;    /* [n_devs] resident pages */
    int64_t *dev_demoted;               /* [n_devs] pages in the host or disk tier */
} tally;

static void tally_init(tally *t, const pikv_cache *c)
{
    size_t n_shards = (size_t)c->params.n_layers * (size_t)c->n_shards;
    t->refs = tu_xcalloc((size_t)c->pages_high + 1, sizeof(int64_t));
    t->layer_tokens = tu_xcalloc((size_t)c->params.n_layers, sizeof(int64_t));
    t->shard_pages = tu_xcalloc(n_shards, sizeof(int64_t));
    t->shard_tokens = tu_xcalloc(n_shards, sizeof(int64_t));
    t->dev_pages = tu_xcalloc((size_t)c->n_devs, sizeof(int64_t));
    t->dev_tokens = tu_xcalloc((size_t)c->n_devs, sizeof(int64_t));
    t->dev_demoted = tu_xcalloc((size_t)c->n_devs, sizeof(int64_t));
}

static void tally_free(tally *t)
{
    free(t->refs);
    free(t->layer_tokens);
    free(t->shard_pages);
    free(t->shard_tokens);
    free(t->dev_pages);
    free(t->dev_tokens);
    free(t->dev_demoted);
}

/* One ring: page ids in range, pages of the ring's layer and shard, only the back page
   partial, shared pages full. Adds the ring's references and tokens. */
static int check_ring(const pikv_cache *c, int seq, int layer, int shard, tally *t,
                      int64_t *tokens)
{
    const pikv_ring *ring = &c->seqs[seq].layers[layer].rings[shard];
    for (int64_t i = 0; i < ring->count; i++) {
        uint32_t id = pikv_ring_at(ring, i);
        if (!CHECKF(id < c->pages_high, "seq %d layer %d shard %d: page id %u >= %lld", seq,
                    layer, shard, id, (long long)c->pages_high))
            return 0;
        const pikv_page_meta *pm = &c->pages[id];
        t->refs[id]++;
        *tokens += pm->n_tokens;
        if (!CHECKF(pm->layer == layer && pm->shard == shard,
                    "seq %d: page %u is in the ring of layer %d shard %d, but belongs to "
                    "layer %d shard %d", seq, id, layer, shard, pm->layer, pm->shard))
            return 0;
        if (i < ring->count - 1 &&
            !CHECKF(pm->n_tokens == c->params.page_size,
                    "seq %d layer %d shard %d: page %u (%lld of %lld) holds %d tokens, only "
                    "the back page may be partial", seq, layer, shard, id, (long long)i,
                    (long long)ring->count, pm->n_tokens))
            return 0;
        if (pm->refs > 1 &&
            !CHECKF(pm->n_tokens == c->params.page_size,
                    "page %u is shared (%d refs) but holds %d of %d tokens", id, pm->refs,
                    pm->n_tokens, c->params.page_size))
            return 0;
    }
    return 1;
}

/* The page tables of every sequence, and the sequences against the model. */
static int check_page_tables(const fuzz *f, tally *t)
{
    const pikv_cache *c = f->c;
    int32_t live = 0;
    for (int q = 0; q < c->params.max_sequences; q++) {
        if (!CHECKF(c->seqs[q].active == (f->m.live[q] != 0), "seq %d: active %d, model %d", q,
                    (int)c->seqs[q].active, f->m.live[q]))
            return 0;
        if (!c->seqs[q].active)
            continue;
        live++;
        for (int l = 0; l < c->params.n_layers; l++) {
            int64_t tokens = 0;
            for (int s = 0; s < c->n_shards; s++)
                if (!check_ring(c, q, l, s, t, &tokens))
                    return 0;
            const pikv_seq_layer *sl = &c->seqs[q].layers[l];
            if (!CHECKF(tokens == sl->n_tokens, "seq %d layer %d: pages hold %lld tokens, "
                        "n_tokens %lld", q, l, (long long)tokens, (long long)sl->n_tokens))
                return 0;
            if (!CHECKF(sl->n_tokens == tu_model_seq(&f->m, l, q)->n,
                        "seq %d layer %d: %lld tokens, model %lld", q, l,
                        (long long)sl->n_tokens, (long long)tu_model_seq(&f->m, l, q)->n))
                return 0;
        }
    }
    return CHECK_EQ(c->n_seqs, live);
}

/* Every page id: refcount = ring occurrences; live pages on their shard's device; the
   cache, layer, shard and device counters are the sums over live pages. */
static int check_page_counts(const pikv_cache *c, tally *t)
{
    int64_t pages = 0;
    int64_t tokens = 0;
    for (uint32_t id = 0; id < c->pages_high; id++) {
        const pikv_page_meta *pm = &c->pages[id];
        if (!CHECKF(t->refs[id] == pm->refs, "page %u: refs %d, held by %lld rings", id,
                    pm->refs, (long long)t->refs[id]))
            return 0;
        if (t->refs[id] == 0)
            continue;
        size_t sh = (size_t)pm->layer * (size_t)c->n_shards + (size_t)pm->shard;
        pages++;
        tokens += pm->n_tokens;
        t->layer_tokens[pm->layer] += pm->n_tokens;
        t->shard_pages[sh]++;
        t->shard_tokens[sh] += pm->n_tokens;
        if (pm->tier == PIKV_TIER_DEVICE) { /* a device's counters hold its resident pages */
            t->dev_pages[pm->dev]++;
            t->dev_tokens[pm->dev] += pm->n_tokens;
        } else {
            t->dev_demoted[pm->dev]++;
            if (!CHECKF(c->tier && pm->n_tokens == c->params.page_size, "page %u is demoted (tier %d) but "
                        "holds %d of %d tokens (tiers %s)", id, pm->tier, pm->n_tokens, c->params.page_size,
                        c->tier ? "on" : "off"))
                return 0;
        }
        if (!CHECKF(c->shards[sh].dev == pm->dev, "page %u is on device %d, its shard "
                    "(layer %d, shard %d) on %d", id, pm->dev, pm->layer, pm->shard,
                    c->shards[sh].dev))
            return 0;
    }
    int ok = CHECK_EQ(pages, c->pages_live);
    ok &= CHECK_EQ(tokens, c->tokens);
    int64_t demoted = 0;
    for (int d = 0; d < c->n_devs; d++) {
        ok &= CHECKF(t->dev_demoted[d] == c->devs[d].demoted, "device %d: %lld demoted pages, counter %lld", d,
                     (long long)t->dev_demoted[d], (long long)c->devs[d].demoted);
        demoted += t->dev_demoted[d];
    }
    pikv_tier_stats ts;
    if (CHECK_OK(pikv_cache_get_tier_stats(c, &ts))) {
        ok &= CHECKF(ts.device_pages == pages - demoted && ts.host_pages + ts.disk_pages == demoted,
                     "tier stats: %lld device + %lld host + %lld disk pages; %lld live, %lld demoted",
                     (long long)ts.device_pages, (long long)ts.host_pages, (long long)ts.disk_pages,
                     (long long)pages, (long long)demoted);
    }
    for (int l = 0; l < c->params.n_layers; l++)
        ok &= CHECKF(t->layer_tokens[l] == c->layer_tokens[l], "layer %d: pages hold %lld "
                     "tokens, layer_tokens %lld", l, (long long)t->layer_tokens[l],
                     (long long)c->layer_tokens[l]);
    for (int i = 0; i < c->params.n_layers * c->n_shards; i++) {
        ok &= CHECKF(t->shard_pages[i] == c->shards[i].pages, "shard %d: %lld live pages, "
                     "counter %lld", i, (long long)t->shard_pages[i],
                     (long long)c->shards[i].pages);
        ok &= CHECKF(t->shard_tokens[i] == c->shards[i].tokens, "shard %d: %lld tokens, "
                     "counter %lld", i, (long long)t->shard_tokens[i],
                     (long long)c->shards[i].tokens);
    }
    return ok;
}

/* One device's pool: counters, and every slot either free or used by exactly one page.
   used[] has a byte per slot, zeroed. */
static int check_pool(const pikv_cache *c, int d, const tally *t, unsigned char *used)
{
    const pikv_page_pool *pool = &c->devs[d];
    int64_t slots = (int64_t)pool->n_chunks * pool->pages_per_chunk;
    int ok = CHECKF(t->dev_pages[d] == pool->pages_used, "device %d: %lld live pages, "
                    "pages_used %lld", d, (long long)t->dev_pages[d],
                    (long long)pool->pages_used);
    ok &= CHECKF(t->dev_tokens[d] == pool->tokens, "device %d: %lld tokens, counter %lld", d,
                 (long long)t->dev_tokens[d], (long long)pool->tokens);
    const int64_t staging = pikv_tier_staging_slots(c, d, 0, used); /* used, by no page */
    ok &= CHECKF(pool->n_free + pool->pages_used + staging == slots, "device %d: %lld free + %lld used "
                 "+ %lld staging != %lld slots", d, (long long)pool->n_free, (long long)pool->pages_used,
                 (long long)staging, (long long)slots);
    if (!ok)
        return 0;
    /* The free stack may hold thousands of slots: one check for all of them. */
    for (int64_t i = 0; i < pool->n_free; i++) {
        uint32_t slot = pool->free_slots[i];
        int valid = slot < slots && !used[slot];
        if (!valid)
            return CHECKF(valid, "device %d: free slot %u is out of range (%lld slots) or "
                          "listed twice", d, slot, (long long)slots);
        used[slot] = 1;
    }
    for (uint32_t id = 0; id < c->pages_high; id++) {
        const pikv_page_meta *pm = &c->pages[id];
        if (t->refs[id] == 0 || pm->dev != d || pm->tier != PIKV_TIER_DEVICE)
            continue;
        if (!CHECKF(pm->slot < slots, "device %d: page %u in slot %u >= %lld", d, id, pm->slot,
                    (long long)slots))
            return 0;
        if (!CHECKF(!used[pm->slot], "device %d: page %u in slot %u, which is free or used by "
                    "another page", d, id, pm->slot))
            return 0;
        used[pm->slot] = 1;
    }
    int32_t shards = 0;
    for (int i = 0; i < c->params.n_layers * c->n_shards; i++)
        shards += c->shards[i].dev == d;
    return CHECKF(shards == pool->shards, "device %d: %d shards placed, counter %d", d, shards,
                  pool->shards);
}

static void check_invariants(const fuzz *f)
{
    const pikv_cache *c = f->c;
    tally t;
    tally_init(&t, c);
    int ok = check_page_tables(f, &t) && check_page_counts(c, &t);
    for (int d = 0; ok && d < c->n_devs; d++) {
        const pikv_page_pool *pool = &c->devs[d];
        size_t slots = (size_t)pool->n_chunks * pool->pages_per_chunk;
        unsigned char *used = tu_xcalloc(slots + 1, 1);
        ok = check_pool(c, d, &t, used);
        free(used);
    }
    tally_free(&t);
}

/* ------------------------------------------------------------------------ */
/* Operations                                                                */
/* ------------------------------------------------------------------------ */

/* After a failed call: its status is one it may return, and the cache is as before.
   `refused` is how many allocations the hook refused during the call. */
static void check_failed_call(fuzz *f, const char *what, pikv_status st, long long refused,
                              int may_hit_capacity, const tu_snap *before)
{
    g_totals.failed++;
    CHECKF(st == PIKV_ERR_OUT_OF_MEMORY || (may_hit_capacity && st == PIKV_ERR_CAPACITY),
           "%s returned %s: %s", what, pikv_status_name(st), pikv_context_last_error(f->ctx));
    /* Without a refused allocation only a device memory limit can run out. */
    if (st == PIKV_ERR_OUT_OF_MEMORY && refused == 0)
        CHECKF(f->cp.cpu_device_memory > 0, "%s: OUT_OF_MEMORY, but no allocation was refused "
               "and the devices have no memory limit", what);
    tu_snap after;
    tu_snap_take(f->c, &f->p, &after);
    TU_SNAP_SAME(what, before, &after);
    tu_snap_free(&after);
}

static void op_seq_add(fuzz *f, int seq)
{
    if (f->m.live[seq])
        return;
    describe_op(f, "seq_add(%d)", seq);
    g_totals.adds++;
    tu_snap before;
    tu_snap_take(f->c, &f->p, &before);
    maybe_arm(f);
    pikv_status st = pikv_seq_add(f->c, seq);
    long long refused = tu_fault_disarm();
    if (st == PIKV_OK)
        f->m.live[seq] = 1;
    else
        check_failed_call(f, "seq_add", st, refused, 0, &before);
    tu_snap_free(&before);
}

static void op_seq_remove(fuzz *f, int seq)
{
    if (!f->m.live[seq])
        return;
    describe_op(f, "seq_remove(%d)", seq);
    if (CHECK_OK(pikv_seq_remove(f->c, seq)))
        tu_model_remove(&f->m, seq);
}

static void op_append(fuzz *f, int seq)
{
    if (!f->m.live[seq])
        return;
    int layer = (int)tu_int(&f->r, 0, f->p.n_layers - 1);
    int n = (int)tu_int(&f->r, 1, MAX_APPEND);
    if (tu_model_seq(&f->m, layer, seq)->n + n > MAX_TOKENS)
        return;
    size_t row = (size_t)f->p.n_kv_heads * (size_t)f->p.head_dim;
    float *k = tu_xmalloc((size_t)n * row * sizeof(float));
    float *v = tu_xmalloc((size_t)n * row * sizeof(float));
    int32_t *ex = tu_xmalloc((size_t)n * sizeof(int32_t));
    tu_gen(&f->r, &f->m, n, k, v, ex, 0);
    /* Dense models may pass no experts. */
    const int32_t *experts = f->p.n_experts > 1 || coin(&f->r) ? ex : NULL;
    describe_op(f, "append(layer %d, seq %d, %d tokens%s)", layer, seq, n,
                experts ? "" : ", no experts");
    g_totals.appends++;
    tu_snap before;
    tu_snap_take(f->c, &f->p, &before);
    maybe_arm(f);
    pikv_status st = pikv_cache_append(f->c, layer, seq, n, k, v, NULL, experts);
    long long refused = tu_fault_disarm();
    if (st == PIKV_OK)
        tu_model_push(&f->m, layer, seq, n, k, v, experts);
    else
        check_failed_call(f, "append", st, refused, 1, &before);
    tu_snap_free(&before);
    free(k);
    free(v);
    free(ex);
}

static void op_copy_prefix(fuzz *f, int src)
{
    if (!f->m.live[src])
        return;
    int dst = (int)tu_int(&f->r, 0, MAX_SEQS - 1);
    if (f->m.live[dst])
        return;
    int64_t shortest = MAX_TOKENS;
    for (int l = 0; l < f->p.n_layers; l++)
        if (tu_model_seq(&f->m, l, src)->n < shortest)
            shortest = tu_model_seq(&f->m, l, src)->n;
    int64_t n = tu_int(&f->r, 0, shortest);
    describe_op(f, "copy_prefix(%d -> %d, %lld tokens)", src, dst, (long long)n);
    g_totals.copies++;
    tu_snap before;
    tu_snap_take(f->c, &f->p, &before);
    maybe_arm(f);
    pikv_status st = pikv_seq_copy_prefix(f->c, src, dst, n);
    long long refused = tu_fault_disarm();
    if (st == PIKV_OK)
        tu_model_copy_prefix(&f->m, src, dst, n);
    else
        check_failed_call(f, "copy_prefix", st, refused, 1, &before);
    tu_snap_free(&before);
}

/* BALANCED caches re-pack their shards (moving pages between devices); the others compact
   their pools, which moves pages between slots. */
static void op_rebalance_or_trim(fuzz *f)
{
    if (f->p.placement != PIKV_PLACEMENT_BALANCED) {
        describe_op(f, "trim");
        CHECK_OK(pikv_cache_trim(f->c));
        return;
    }
    describe_op(f, "rebalance");
    g_totals.rebalances++;
    tu_snap before;
    tu_snap_take(f->c, &f->p, &before);
    maybe_arm(f);
    int64_t moved = -1;
    pikv_status st = pikv_cache_rebalance(f->c, &moved);
    long long refused = tu_fault_disarm();
    if (st != PIKV_OK)
        check_failed_call(f, "rebalance", st, refused, 0, &before);
    tu_snap_free(&before);
}

/* Compares one attend output with the dense reference on what is stored. The bound is
   relative to max|ref| plus a small absolute floor: with head_dim 1 the outputs of a query
   may nearly cancel, and then f32 rounding alone exceeds a purely relative bound. */
static void check_query(const fuzz *f, int layer, int seq, const float *q, const float *out,
                        const float *lse, double *ref, double *ref_lse)
{
    int nqh = f->p.n_q_heads;
    size_t per = (size_t)nqh * (size_t)f->p.head_dim;
    if (tu_model_seq(&f->m, layer, seq)->n == 0) {
        int zero = 1;
        int neg_inf = 1;
        for (size_t i = 0; i < per; i++)
            zero &= out[i] == 0.0f;
        for (int h = 0; h < nqh; h++)
            neg_inf &= isinf(lse[h]) && lse[h] < 0;
        CHECKF(zero && neg_inf, "layer %d seq %d: empty, but out is not 0 or lse not -inf",
               layer, seq);
        return;
    }
    tu_model_ref(&f->m, layer, seq, -1, q, 1, ref, ref_lse);
    double max_ref = 0.0;
    double max_err = 0.0;
    for (size_t i = 0; i < per; i++) {
        max_ref = fmax(max_ref, fabs(ref[i]));
        double err = fabs((double)out[i] - ref[i]);
        max_err = isnan(err) || err > max_err ? err : max_err; /* NaN sticks */
    }
    CHECKF(max_err <= TU_TOL_EXACT * max_ref + 1e-6, "layer %d seq %d (%lld tokens): error "
           "%g, max|ref| %g", layer, seq, (long long)tu_model_seq(&f->m, layer, seq)->n,
           max_err, max_ref);
    for (int h = 0; h < nqh; h++) {
        double d = fabs((double)lse[h] - ref_lse[h]) / fmax(1.0, fabs(ref_lse[h]));
        if (!CHECKF(d <= TU_TOL_LSE, "layer %d seq %d head %d: lse %g, reference %g", layer,
                    seq, h, (double)lse[h], ref_lse[h]))
            break;
    }
}

/* Attends every live sequence in every layer (one batch per layer, random queries) and
   checks every query against the reference. */
static void op_attend(fuzz *f)
{
    describe_op(f, "attend of every sequence in every layer");
    g_totals.attends++;
    int32_t seqs[MAX_SEQS];
    int nq = 0;
    for (int q = 0; q < MAX_SEQS; q++)
        if (f->m.live[q])
            seqs[nq++] = q;
    if (nq == 0)
        return;
    int nqh = f->p.n_q_heads;
    size_t per = (size_t)nqh * (size_t)f->p.head_dim;
    float *q = tu_xmalloc((size_t)nq * per * sizeof(float));
    float *out = tu_xmalloc((size_t)nq * per * sizeof(float));
    float *lse = tu_xmalloc((size_t)nq * (size_t)nqh * sizeof(float));
    double *ref = tu_xmalloc(per * sizeof(double));
    double *ref_lse = tu_xmalloc((size_t)nqh * sizeof(double));
    for (int l = 0; l < f->p.n_layers; l++) {
        tu_fill(&f->r, q, (size_t)nq * per, 1.5f);
        pikv_attend_batch b;
        memset(&b, 0, sizeof b); /* fields added later default to 0 / NULL */
        b.n_queries = nq;
        b.seq_ids = seqs;
        b.q = q;
        b.out = out;
        b.lse = lse;
        if (!CHECK_OK(pikv_cache_attend(f->c, l, &b)))
            break;
        if (f->p.tiers.enabled) {
            pikv_tier_stats ts;
            if (CHECK_OK(pikv_cache_get_tier_stats(f->c, &ts)))
                g_totals.demoted_reads += ts.last_fetches > 0;
        }
        for (int i = 0; i < nq; i++)
            check_query(f, l, seqs[i], q + (size_t)i * per, out + (size_t)i * per,
                        lse + (size_t)i * (size_t)nqh, ref, ref_lse);
    }
    free(q);
    free(out);
    free(lse);
    free(ref);
    free(ref_lse);
}

/* Tiers: a random resident full page to the host tier (maybe pushing one to disk). It
   changes no content: the attends that follow check that. */
static void op_demote(fuzz *f)
{
    pikv_cache *c = f->c;
    int64_t n = 0;
    for (int64_t id = 0; id < c->pages_high; id++)
        n += c->pages[id].refs > 0 && c->pages[id].tier == PIKV_TIER_DEVICE &&
             c->pages[id].n_tokens == c->params.page_size;
    describe_op(f, "demote one of %lld resident full pages", (long long)n);
    if (n == 0)
        return;
    int64_t k = tu_int(&f->tr, 0, n - 1);
    for (int64_t id = 0; id < c->pages_high; id++) {
        const pikv_page_meta *m = &c->pages[id];
        if (m->refs == 0 || m->tier != PIKV_TIER_DEVICE || m->n_tokens != c->params.page_size || k-- > 0)
            continue;
        /* the bounds pool lives on a CPU device, whose memory may be limited */
        const pikv_status st = pikv_tier_demote(c, (uint32_t)id, "cache_fuzz");
        g_totals.demotes += st == PIKV_OK;
        CHECKF(st == PIKV_OK || (st == PIKV_ERR_OUT_OF_MEMORY && f->cp.cpu_device_memory > 0),
               "demote of page %lld: %s: %s", (long long)id, pikv_status_name(st), pikv_context_last_error(f->ctx));
        break;
    }
}

static void run_random_op(fuzz *f)
{
    int kind = (int)tu_int(&f->r, 0, 9);
    int seq = (int)tu_int(&f->r, 0, MAX_SEQS - 1);
    g_totals.ops++;
    switch (kind) {
    case 0:
        op_seq_add(f, seq);
        break;
    case 1:
        op_seq_remove(f, seq);
        break;
    case 2:
    case 3:
    case 4:
    case 5:
        op_append(f, seq);
        break;
    case 6:
        op_copy_prefix(f, seq);
        break;
    case 7:
        op_rebalance_or_trim(f);
        break;
    case 8:
        op_attend(f);
        break;
    default:
        if (f->p.tiers.enabled)
            op_demote(f);
        else
            describe_op(f, "nothing (invariants only)");
        break;
    }
}

/* The end of a seed: a last attend, then removing every sequence must free every page, and
   a trim every chunk. */
static void drain(fuzz *f)
{
    op_attend(f);
    describe_op(f, "removing every sequence");
    for (int q = 0; q < MAX_SEQS; q++)
        if (f->m.live[q] && CHECK_OK(pikv_seq_remove(f->c, q)))
            tu_model_remove(&f->m, q);
    check_invariants(f);
    CHECK_OK(pikv_cache_trim(f->c));
    pikv_cache_stats st;
    if (CHECK_OK(pikv_cache_get_stats(f->c, &st))) {
        CHECK_EQ(st.tokens, 0);
        CHECK_EQ(st.pages, 0);
        /* staging slots stay allocated (at most one chunk per device) */
        if (!f->p.tiers.enabled)
            CHECK_EQ(st.bytes_allocated, 0);
    }
}

/* Runs one seed; returns 0 (and says how to replay it) if anything failed. */
static int run_seed(uint64_t seed, long ops)
{
    long fails_before = tu_fail_count;
    fuzz f;
    if (fuzz_open(&f, seed)) {
        /* Stop at the first failing operation: later failures are mostly its echoes. */
        for (f.op = 0; f.op < ops && tu_fail_count == fails_before; f.op++) {
            run_random_op(&f);
            check_invariants(&f);
        }
        if (tu_fail_count == fails_before)
            drain(&f);
    }
    fuzz_close(&f);
    if (tu_fail_count == fails_before)
        return 1;
    fprintf(stderr, "cache_fuzz: seed %llu failed (%s); replay: cache_fuzz %llu %ld 1\n",
            (unsigned long long)seed, f.op >= 0 ? "see the op above" : "at setup",
            (unsigned long long)seed, ops);
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Arguments                                                                 */
/* ------------------------------------------------------------------------ */

/* Parses a non-negative decimal integer; returns 0 if `s` is not one. */
static int parse_u64(const char *s, uint64_t *out)
{
    if (!s || !*s || *s == '-')
        return 0;
    char *end = NULL;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || *end != '\0')
        return 0;
    *out = (uint64_t)v;
    return 1;
}

/* A count from the environment, or `fallback` when the variable is unset. */
static int env_count(const char *name, uint64_t fallback, uint64_t *out)
{
    const char *s = getenv(name);
    *out = fallback;
    if (!s || !*s)
        return 1;
    if (parse_u64(s, out))
        return 1;
    fprintf(stderr, "cache_fuzz: %s=\"%s\" is not a count\n", name, s);
    return 0;
}

int main(int argc, char **argv)
{
    uint64_t first = 1;
    uint64_t ops = 0;
    uint64_t seeds = 0;
    int args_ok = env_count("PIKV_FUZZ_SEEDS", DEFAULT_SEEDS, &seeds) &&
                  env_count("PIKV_FUZZ_OPS", DEFAULT_OPS, &ops);
    if (argc > 1)
        args_ok &= parse_u64(argv[1], &first);
    if (argc > 2)
        args_ok &= parse_u64(argv[2], &ops);
    if (argc > 3)
        args_ok &= parse_u64(argv[3], &seeds);
    if (!args_ok || argc > 4 || seeds == 0 || ops > 1000000000) {
        fprintf(stderr, "usage: cache_fuzz [first_seed [ops_per_seed [n_seeds]]]\n");
        return 2;
    }

    printf("cache_fuzz: seeds %llu..%llu, %llu operations each\n", (unsigned long long)first,
           (unsigned long long)(first + seeds - 1), (unsigned long long)ops);
    for (uint64_t s = 0; s < seeds; s++)
        if (!run_seed(first + s, (long)ops))
            break;

    tu_set_case("totals");
    printf("cache_fuzz: %lld operations: %lld appends, %lld copy_prefix, %lld rebalances, "
           "%lld seq_add, %lld attends; %lld calls armed to fail an allocation, %lld calls "
           "failed\n", g_totals.ops, g_totals.appends, g_totals.copies, g_totals.rebalances,
           g_totals.adds, g_totals.attends, g_totals.armed, g_totals.failed);
    printf("cache_fuzz: tiers on in %lld seeds: %lld pages demoted, %lld attends read demoted pages\n",
           g_totals.tier_seeds, g_totals.demotes, g_totals.demoted_reads);
    /* A long run must reach the failure paths, or the fuzzer no longer tests them. */
    if (g_totals.ops >= 10000) {
        CHECKF(g_totals.failed > 0, "no call failed in %lld operations", g_totals.ops);
        CHECKF(g_totals.demotes > 0 && g_totals.demoted_reads > 0, "tiers: %lld demotions, %lld attends of "
               "demoted pages in %lld operations", g_totals.demotes, g_totals.demoted_reads, g_totals.ops);
    }
    return tu_finish();
}
