/*
 * mpi_cache: a cache over MPI ranks (pikv_cache_params.comm), run under mpiexec with 2 and 4
 * ranks. The test is the engine: it calls MPI_Init and hands MPI_COMM_WORLD to
 * pikv_comm_create_mpi. Every rank generates the tokens of every rank from one seed, so each
 * can hold one-process references with the same data:
 *   refg: comm NULL, as many CPU devices as the whole job has (size x local devices), so its
 *         placement is the distributed cache's device for device (pages, bytes, shards of
 *         global device g = rank * n_local + j equal the reference's device g);
 *   ref1: comm NULL, one CPU device (the other extreme of the merge order);
 *   the tu_model shadow: attention in double precision on what the pages hold (f32/f16).
 *
 * Checks:
 *  1. Exact attend equals the one-process result, after ragged collective appends (each
 *     rank passes its own count, some 0, sometimes all 0), prefix copies and removals: for
 *     EXPERT, HASH, BALANCED and dense placements, f32, f16, int8 (and int4), 1 or 2 devices
 *     per rank, and a budget with eviction. Bound: max|out - ref| / max|ref| <= 1e-5 per
 *     query, and |lse - ref| / max(1, |ref|) <= 1e-5. Both caches run the same kernels on
 *     the same page data; only the merge of the partials differs (across ranks: the
 *     max/sum allreduces of pikv_comm_merge_partials, in float; one process: the host
 *     merge op), so the outputs differ by a few float roundings of values of at most
 *     max|ref| (~1e-7 relative each), far below 1e-5, while any lost, duplicated or
 *     misplaced page changes the output by O(1 / tokens) >= 1e-3.
 *  2. Per-rank memory is the owned shards only: dist bytes_allocated == the sum over this
 *     rank's devices r * n_local + j of the device stats == the context's memory_used on
 *     those devices (and nothing more); every device's stats equal refg's; the sum over
 *     ranks equals refg's total (and max/mean over ranks agree); pages summed over ranks
 *     equal both references' page counts.
 *  3. Communicated bytes: after an attend, last_partial_bytes == 4 n_rows (head_dim + 2)
 *     (pikv_comm_merge_partials: a max of n_rows floats, a sum of n_rows (head_dim + 1)
 *     floats, n_rows = n_queries x n_q_heads; twice with measure); after an append,
 *     last_kv_bytes_sent == rows this rank passed whose owner is another rank x 2 x
 *     n_kv_heads x head_dim x 4, with the owner computed here from the documented
 *     placement; bytes sent summed over ranks == bytes received summed over ranks;
 *     last_gather_bytes == the page bytes refg read on other ranks' devices.
 *  4. EXPERTS selection (experts_top_k 1 and 2) touches only the owning ranks:
 *     last_ranks_per_query / last_max_ranks equal the distinct ranks owning the shards of
 *     the queries' experts that hold tokens of their sequence; exact mode counts every
 *     rank holding the sequence; the output equals refg's with the same selection.
 *  5. Errors are collective: a bad argument on rank 1 only (layer, NaN, sequence, expert,
 *     n, experts NULL, q) fails the call on every rank with the same status and "rank 1
 *     failed" in the other ranks' messages, and the cache is unchanged (and still equals the
 *     one-process cache); an append naming another (valid) layer or sequence on rank 1
 *     fails everywhere; total tokens over capacity fail alike (exactly the capacity
 *     passes); mismatched parameters or device counts at create fail everywhere with
 *     INVALID_ARGUMENT; QUEST, H2O, utility (everywhere or on rank 1 only), rebalance and
 *     zero copy give UNSUPPORTED on every rank; a memory limit on rank 1's device binds
 *     every rank alike; host allocation failures injected on rank 1 only, every allocation
 *     in turn, during create, append, attend, prefix copy, seq_add and trim fail every rank
 *     alike, leave every rank's view of the cache identical and change nothing.
 *  6. Overlap (pikv_cache_attend_start / _finish): one batch per layer attended blocking,
 *     pipelined (start(l), then finish(l - 1)) and with every layer outstanding gives
 *     bit-identical outputs and lse; finishing out of order and finish(NULL) give
 *     INVALID_ARGUMENT (the request stays); a bad layer on rank 1 only fails start on every
 *     rank and returns no request; the merge timings are sane (0 <= wait <= posted);
 *     measured starts do everything; a one-process cache's start does everything.
 *  Throughout, every rank's view of the replicated metadata (totals and every device's
 *  pages, tokens, bytes, shards) is checked to be the same on every rank.
 *
 * Every rank prints "N passed, N failed"; the exit status is non-zero on any failure.
 */
#include "test-util.h"

#include <mpi.h>

#define MAX_LOCAL 2
#define MAX_RANKS 32
#define MAX_L 3
#define MAX_SEQ 12
#define TOL_REF 1e-5
#define TOL_LSE 1e-5

static int g_rank, g_size;
static double g_worst_out, g_worst_lse; /* the largest errors seen against the references */

/* ------------------------------------------------------------------------ */
/* Collective helpers (plain MPI on MPI_COMM_WORLD)                          */
/* ------------------------------------------------------------------------ */

static uint64_t sum_u64(uint64_t x)
{
    uint64_t s = 0;
    MPI_Allreduce(&x, &s, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
    return s;
}

static int all_true(int ok)
{
    int r = 0;
    MPI_Allreduce(&ok, &r, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    return r;
}

/* Every rank got `want` (and so the same status everywhere). */
static void check_status_all_at(const char *file, int line, pikv_status st, pikv_status want,
                                const pikv_context *ctx, const char *what)
{
    int mine = (int)st, all[MAX_RANKS];
    MPI_Allgather(&mine, 1, MPI_INT, all, 1, MPI_INT, MPI_COMM_WORLD);
    int same = 1;
    for (int r = 0; r < g_size; r++) same &= all[r] == mine;
    tu_checkf(same, file, line, "same status on every rank", "%s: rank %d got %s, rank 0 %s", what, g_rank,
              pikv_status_name(st), pikv_status_name((pikv_status)all[0]));
    tu_checkf(st == want, file, line, "status", "%s: got %s, want %s: %s", what, pikv_status_name(st),
              pikv_status_name(want), ctx ? pikv_context_last_error(ctx) : "");
}
#define CHECK_STATUS_ALL(st, want, ctx, what) check_status_all_at(__FILE__, __LINE__, (st), (want), (ctx), (what))

/* Every rank keeps the metadata of the whole cache: its view of every device (pages,
   tokens, bytes, shards) and of the totals is the same on every rank. */
static void check_replicated_at(const char *file, int line, const pikv_cache *c, const char *what)
{
    enum { PER = 6, MAXV = 6 + PER * 64 };
    int64_t v[MAXV], lo[MAXV], hi[MAXV];
    memset(v, 0, sizeof v);
    pikv_cache_stats s;
    memset(&s, 0, sizeof s);
    pikv_cache_get_stats(c, &s);
    v[0] = s.tokens;
    v[1] = s.pages;
    v[2] = (int64_t)s.bytes_allocated;
    v[3] = (int64_t)s.bytes_used;
    v[4] = s.sequences;
    v[5] = s.evicted_pages;
    for (int g = 0; g < s.n_devices && g < 64; g++) {
        pikv_cache_device_stats d;
        memset(&d, 0, sizeof d);
        pikv_cache_get_device_stats(c, g, &d);
        int64_t *x = v + 6 + PER * g;
        x[0] = d.shards;
        x[1] = d.tokens;
        x[2] = d.pages;
        x[3] = (int64_t)d.bytes_allocated;
        x[4] = (int64_t)d.bytes_used;
        x[5] = d.quantized_pages;
    }
    MPI_Allreduce(v, lo, MAXV, MPI_INT64_T, MPI_MIN, MPI_COMM_WORLD);
    MPI_Allreduce(v, hi, MAXV, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD);
    int first = -1;
    for (int i = 0; i < MAXV && first < 0; i++)
        if (lo[i] != hi[i]) first = i;
    char where[64];
    if (first < 6) snprintf(where, sizeof where, "total %d", first);
    else snprintf(where, sizeof where, "device %d field %d", (first - 6) / PER, (first - 6) % PER);
    tu_checkf(first < 0, file, line, "the same metadata on every rank", "%s: %s differs across ranks: %lld..%lld",
              what, where, (long long)(first >= 0 ? lo[first] : 0), (long long)(first >= 0 ? hi[first] : 0));
}
#define CHECK_REPLICATED(c, what) check_replicated_at(__FILE__, __LINE__, (c), (what))

/* ------------------------------------------------------------------------ */
/* Contexts and communicators                                                */
/* ------------------------------------------------------------------------ */

static pikv_context *make_ctx(int devices, uint64_t memory)
{
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "cpu";
    cp.cpu_devices = devices;
    cp.cpu_threads = 1; /* ranks oversubscribe the cores already */
    cp.cpu_device_memory = memory;
    pikv_context *ctx = NULL;
    if (pikv_context_create(&cp, &ctx) != PIKV_OK) {
        fprintf(stderr, "rank %d: pikv_context_create(%d devices) failed\n", g_rank, devices);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    return ctx;
}

static pikv_comm *make_comm(pikv_context *ctx)
{
    MPI_Comm world = MPI_COMM_WORLD;
    pikv_comm *comm = NULL;
    pikv_status st = pikv_comm_create_mpi(ctx, &world, &comm);
    if (st != PIKV_OK || !comm) {
        fprintf(stderr, "rank %d: pikv_comm_create_mpi failed: %s: %s\n", g_rank, pikv_status_name(st),
                pikv_context_last_error(ctx));
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    /* a collective a bug leaves unmatched fails in a minute instead of the default 300 s */
    pikv_comm_set_timeout(comm, 60.0);
    return comm;
}

static pikv_context *g_ctx[MAX_LOCAL + 1];   /* this rank's devices */
static pikv_comm *g_comm[MAX_LOCAL + 1];
static pikv_context *g_ref_ctx[MAX_LOCAL + 1]; /* size x n_local devices */
static pikv_context *g_ref1_ctx;

/* ------------------------------------------------------------------------ */
/* A case: one distributed cache, its references, the shadow model           */
/* ------------------------------------------------------------------------ */

typedef struct dcase {
    const char *name;
    pikv_placement pl;
    int ne, ept;       /* ne 1: dense */
    pikv_dtype dt;
    int n_local;       /* devices per rank */
    int ps, nqh, nkv, hd, nl;
    int n_shards, hash_tokens;
    int evict;         /* a uniform budget with LRU eviction */
    uint64_t seed;
    int64_t capacity;  /* tokens per layer; 0 = 65536 */
} dcase;

typedef struct world {
    const dcase *dc;
    pikv_cache_params p;
    pikv_context *ctx;
    int G, nloc, row, n_shards, hash_tokens;
    pikv_cache *dist, *refg, *ref1;
    tu_model m;
    int model_ok;                      /* the model predicts the output (float pages, no eviction) */
    int32_t *tshard[MAX_L][MAX_SEQ];   /* shard of each token held, by index in its sequence */
    int64_t tcap[MAX_L][MAX_SEQ];
    int64_t next[MAX_L][MAX_SEQ];      /* tokens appended so far (the next token's index) */
    int live[MAX_SEQ];
    uint64_t mem_base[MAX_LOCAL];
} world;

static const char *pl_name(pikv_placement p)
{
    return p == PIKV_PLACEMENT_EXPERT ? "expert" : p == PIKV_PLACEMENT_HASH ? "hash" : "balanced";
}

static const char *dt_name(pikv_dtype d)
{
    return d == PIKV_DTYPE_F32 ? "f32" : d == PIKV_DTYPE_F16 ? "f16" : d == PIKV_DTYPE_INT8 ? "int8" : "int4";
}

static pikv_cache_params params_of(const dcase *c)
{
    pikv_cache_params p = pikv_cache_default_params();
    p.n_layers = c->nl;
    p.n_q_heads = c->nqh;
    p.n_kv_heads = c->nkv;
    p.head_dim = c->hd;
    p.n_experts = c->ne;
    p.experts_per_token = c->ept;
    p.page_size = c->ps;
    p.dtype = c->dt;
    p.quant_group = c->ps < 8 ? c->ps : 8;
    p.capacity_tokens = c->capacity ? c->capacity : 1 << 16;
    p.max_sequences = MAX_SEQ;
    p.placement = c->pl;
    p.n_shards = c->n_shards;
    p.hash_tokens = c->hash_tokens;
    if (c->evict) {
        p.budget.mode = PIKV_BUDGET_UNIFORM;
        p.budget.total_tokens = (int64_t)c->nl * 5 * c->ps;
        p.evict.policy = PIKV_EVICT_LRU;
        p.select.sink_tokens = c->ps;
        p.select.recent_tokens = c->ps;
    }
    return p;
}

static int shard_of(const world *w, int64_t t, int e)
{
    const dcase *c = w->dc;
    if (c->ne == 1) return (int)((t / c->ps) % w->n_shards);
    if (c->pl == PIKV_PLACEMENT_HASH) return (int)(((t % w->hash_tokens) ^ (int64_t)(e % c->ne)) % w->n_shards);
    return e;
}

/* The global device of a shard: the documented one for EXPERT/HASH (round-robin), checked
   against the cache's; BALANCED: where the cache put it (placed with its first page). */
static int shard_dev(const world *w, int layer, int s)
{
    int32_t dev = -2;
    pikv_cache_shard_info(w->dist, layer, s, &dev, NULL, NULL);
    if (w->dc->pl != PIKV_PLACEMENT_BALANCED) {
        CHECKF(dev == s % w->G, "layer %d shard %d on device %d, want %d", layer, s, dev, s % w->G);
        return s % w->G;
    }
    int32_t gdev = -2;
    pikv_cache_shard_info(w->refg, layer, s, &gdev, NULL, NULL);
    CHECKF(dev == gdev, "BALANCED layer %d shard %d: device %d, one process %d", layer, s, dev, gdev);
    return dev;
}

static void push_shards(world *w, int layer, int seq, int64_t n, const int32_t *ex)
{
    int64_t need = w->next[layer][seq] + n;
    if (need > w->tcap[layer][seq]) {
        int64_t cap = w->tcap[layer][seq] ? w->tcap[layer][seq] : 64;
        while (cap < need) cap *= 2;
        w->tshard[layer][seq] = tu_xrealloc(w->tshard[layer][seq], (size_t)cap * sizeof(int32_t));
        w->tcap[layer][seq] = cap;
    }
    for (int64_t i = 0; i < n; i++) {
        const int64_t t = w->next[layer][seq] + i;
        w->tshard[layer][seq][t] = shard_of(w, t, ex ? ex[(size_t)i * w->dc->ept] : 0);
    }
    w->next[layer][seq] += n;
}

static void check_memory(world *w);

/* Creates the three caches on every rank; returns 0 (on every rank) if that failed. */
static int world_open(world *w, const dcase *c)
{
    memset(w, 0, sizeof *w);
    w->dc = c;
    w->nloc = c->n_local;
    w->G = g_size * c->n_local;
    w->row = c->nkv * c->hd;
    w->ctx = g_ctx[c->n_local];
    w->p = params_of(c);
    for (int j = 0; j < w->nloc; j++) w->mem_base[j] = tu_mem_used(w->ctx, j);
    pikv_cache_params pd = w->p;
    pd.comm = g_comm[c->n_local];
    pikv_status st = pikv_cache_create(w->ctx, &pd, &w->dist);
    CHECK_STATUS_ALL(st, PIKV_OK, w->ctx, "create the distributed cache");
    pikv_cache_params pg = w->p;
    st = pikv_cache_create(g_ref_ctx[c->n_local], &pg, &w->refg);
    CHECKF(st == PIKV_OK, "create refg: %s", pikv_context_last_error(g_ref_ctx[c->n_local]));
    pikv_cache_params p1 = w->p;
    if (c->ne == 1) p1.n_shards = c->n_shards ? c->n_shards : w->G; /* the same position blocks */
    st = pikv_cache_create(g_ref1_ctx, &p1, &w->ref1);
    CHECKF(st == PIKV_OK, "create ref1: %s", pikv_context_last_error(g_ref1_ctx));
    if (!all_true(w->dist && w->refg && w->ref1)) {
        pikv_cache_free(w->dist);
        pikv_cache_free(w->refg);
        pikv_cache_free(w->ref1);
        return 0;
    }
    pikv_cache_stats s;
    CHECK_OK(pikv_cache_get_stats(w->dist, &s));
    w->n_shards = s.n_shards;
    const int want_shards = c->n_shards ? c->n_shards : c->ne == 1 ? w->G : c->ne;
    CHECK_EQ(s.n_shards, want_shards);
    CHECK_EQ(s.n_devices, w->G);
    w->hash_tokens = c->hash_tokens ? c->hash_tokens : w->n_shards;
    pikv_cache_dist_stats ds;
    if (CHECK_OK(pikv_cache_get_dist_stats(w->dist, &ds))) {
        CHECK_EQ(ds.rank, g_rank);
        CHECK_EQ(ds.n_ranks, g_size);
        CHECK_EQ(ds.local_devices, w->nloc);
        CHECK_EQ(ds.bytes_allocated, 0);
    }
    /* the device stats name this rank's context devices, -1 for other ranks' */
    for (int g = 0; g < w->G; g++) {
        pikv_cache_device_stats d;
        if (CHECK_OK(pikv_cache_get_device_stats(w->dist, g, &d)))
            CHECKF(d.device == (g / w->nloc == g_rank ? g % w->nloc : -1), "device %d named %d", g, d.device);
    }
    tu_model_init(&w->m, &w->p);
    w->model_ok = (c->dt == PIKV_DTYPE_F32 || c->dt == PIKV_DTYPE_F16) && !c->evict;
    return 1;
}

static void world_close(world *w)
{
    pikv_cache_free(w->dist);
    pikv_cache_free(w->refg);
    pikv_cache_free(w->ref1);
    /* everything this rank allocated is given back */
    for (int j = 0; j < w->nloc; j++)
        CHECKF(tu_mem_used(w->ctx, j) == w->mem_base[j], "device %d: memory_used %llu after free, %llu before", j,
               (unsigned long long)tu_mem_used(w->ctx, j), (unsigned long long)w->mem_base[j]);
    tu_model_free(&w->m);
    for (int l = 0; l < MAX_L; l++)
        for (int s = 0; s < MAX_SEQ; s++) free(w->tshard[l][s]);
}

static void seq_add_all(world *w, int seq)
{
    CHECK_STATUS_ALL(pikv_seq_add(w->dist, seq), PIKV_OK, w->ctx, "seq_add");
    CHECK_OK(pikv_seq_add(w->refg, seq));
    CHECK_OK(pikv_seq_add(w->ref1, seq));
    w->live[seq] = 1;
    w->m.live[seq] = 1;
    for (int l = 0; l < w->dc->nl; l++) w->next[l][seq] = 0;
}

static void seq_remove_all(world *w, int seq)
{
    CHECK_STATUS_ALL(pikv_seq_remove(w->dist, seq), PIKV_OK, w->ctx, "seq_remove");
    CHECK_OK(pikv_seq_remove(w->refg, seq));
    CHECK_OK(pikv_seq_remove(w->ref1, seq));
    tu_model_remove(&w->m, seq);
    w->live[seq] = 0;
    for (int l = 0; l < w->dc->nl; l++) w->next[l][seq] = 0;
}

static void seq_copy_all(world *w, int src, int dst, int64_t n)
{
    CHECK_STATUS_ALL(pikv_seq_copy_prefix(w->dist, src, dst, n), PIKV_OK, w->ctx, "seq_copy_prefix");
    CHECK_OK(pikv_seq_copy_prefix(w->refg, src, dst, n));
    CHECK_OK(pikv_seq_copy_prefix(w->ref1, src, dst, n));
    tu_model_copy_prefix(&w->m, src, dst, n);
    w->live[dst] = 1;
    for (int l = 0; l < w->dc->nl; l++) {
        w->next[l][dst] = 0;
        if (n > w->tcap[l][dst]) {
            w->tshard[l][dst] = tu_xrealloc(w->tshard[l][dst], (size_t)n * sizeof(int32_t));
            w->tcap[l][dst] = n;
        }
        if (n > 0) memcpy(w->tshard[l][dst], w->tshard[l][src], (size_t)n * sizeof(int32_t));
        w->next[l][dst] = n;
    }
}

/* ------------------------------------------------------------------------ */
/* A collective append: every rank passes its own tokens                     */
/* ------------------------------------------------------------------------ */

static void step_append(world *w, int layer, int seq, tu_rng *r, int max_n)
{
    const dcase *c = w->dc;
    const int P = g_size, ept = c->ept;
    int64_t cnt[MAX_RANKS], off[MAX_RANKS + 1];
    int use_pos[MAX_RANKS], null_when_empty[MAX_RANKS];
    const int pattern = (int)tu_int(r, 0, 9);
    const int only = (int)tu_int(r, 0, P - 1);
    for (int q = 0; q < P; q++) {
        if (pattern == 0) cnt[q] = 0;                                      /* nobody */
        else if (pattern <= 2) cnt[q] = q == only ? tu_int(r, 1, max_n) : 0; /* one rank */
        else if (pattern <= 5) cnt[q] = tu_int(r, 0, max_n);                /* ragged, some 0 */
        else cnt[q] = tu_int(r, 1, max_n);                                  /* everyone */
        use_pos[q] = tu_int(r, 0, 2) == 0;
        null_when_empty[q] = (int)tu_int(r, 0, 1);
    }
    off[0] = 0;
    for (int q = 0; q < P; q++) off[q + 1] = off[q] + cnt[q];
    const int64_t N = off[P];
    const size_t row = (size_t)w->row;
    float *k = tu_xmalloc((size_t)(N ? N : 1) * row * sizeof(float));
    float *v = tu_xmalloc((size_t)(N ? N : 1) * row * sizeof(float));
    int32_t *ex = tu_xmalloc((size_t)(N ? N : 1) * (size_t)ept * sizeof(int32_t));
    int32_t *pos = tu_xmalloc((size_t)(N ? N : 1) * sizeof(int32_t));
    tu_gen(r, &w->m, N, k, v, ex, (int)tu_int(r, 0, 1));
    const int64_t t0 = w->next[layer][seq];
    for (int q = 0; q < P; q++)
        for (int64_t i = off[q]; i < off[q + 1]; i++)
            pos[i] = use_pos[q] ? (int32_t)(7 * i + 3) : (int32_t)(t0 + i);
    const int me = g_rank;
    const int64_t n = cnt[me];
    const int empty_null = n == 0 && null_when_empty[me];
    pikv_status st = pikv_cache_append(w->dist, layer, seq, (int32_t)n, empty_null ? NULL : k + (size_t)off[me] * row,
                                       empty_null ? NULL : v + (size_t)off[me] * row,
                                       use_pos[me] && !empty_null ? pos + off[me] : NULL,
                                       c->ne > 1 && !empty_null ? ex + (size_t)off[me] * (size_t)ept : NULL);
    char what[96];
    snprintf(what, sizeof what, "append layer %d seq %d n %lld of %lld", layer, seq, (long long)n, (long long)N);
    CHECK_STATUS_ALL(st, PIKV_OK, w->ctx, what);
    const int32_t *rex = c->ne > 1 ? ex : NULL;
    CHECK_OK(pikv_cache_append(w->refg, layer, seq, (int32_t)N, k, v, pos, rex));
    CHECK_OK(pikv_cache_append(w->ref1, layer, seq, (int32_t)N, k, v, pos, rex));
    if (N > 0) tu_model_push(&w->m, layer, seq, N, k, v, ex);
    push_shards(w, layer, seq, N, rex);

    /* K/V rows sent: this rank's rows owned elsewhere; over all ranks, every row whose
       owner is not the rank that passed it */
    const uint64_t row_bytes = 2ull * row * (w->p.dtype == PIKV_DTYPE_F32 ? 4u : 2u); /* f16 on the wire unless f32 pages */
    uint64_t mine = 0, total = 0;
    for (int q = 0; q < P; q++)
        for (int64_t i = off[q]; i < off[q + 1]; i++) {
            const int s = w->tshard[layer][seq][t0 + i];
            const int owner = shard_dev(w, layer, s) / w->nloc;
            if (owner != q) {
                total += row_bytes;
                if (q == me) mine += row_bytes;
            }
        }
    pikv_cache_dist_stats ds;
    if (CHECK_OK(pikv_cache_get_dist_stats(w->dist, &ds))) {
        CHECKF(ds.last_kv_bytes_sent == mine, "%s: last_kv_bytes_sent %llu, want %llu", what,
               (unsigned long long)ds.last_kv_bytes_sent, (unsigned long long)mine);
        CHECKF(ds.last_bytes_sent >= ds.last_kv_bytes_sent, "%s: last_bytes_sent %llu < K/V %llu", what,
               (unsigned long long)ds.last_bytes_sent, (unsigned long long)ds.last_kv_bytes_sent);
    }
    const uint64_t all_kv = sum_u64(ds.last_kv_bytes_sent);
    CHECKF(all_kv == total, "%s: K/V bytes sent by all ranks %llu, want %llu", what, (unsigned long long)all_kv,
           (unsigned long long)total);
    const uint64_t all_sent = sum_u64(ds.last_bytes_sent), all_recv = sum_u64(ds.last_bytes_received);
    CHECKF(all_sent == all_recv, "%s: bytes sent by all ranks %llu != received %llu", what,
           (unsigned long long)all_sent, (unsigned long long)all_recv);
    free(k);
    free(v);
    free(ex);
    free(pos);
}

/* ------------------------------------------------------------------------ */
/* A collective attend, against the references                               */
/* ------------------------------------------------------------------------ */

/* Ranks whose pages query i reads: those owning a shard that holds tokens of the sequence
   and that the selection takes (sink/recent 0 with EXPERTS). */
static int expected_ranks(world *w, int layer, int seq, const pikv_select_params *sel, const int32_t *qex)
{
    const dcase *c = w->dc;
    uint8_t has[64] = {0}, rank_hit[MAX_RANKS] = {0};
    for (int64_t t = 0; t < w->next[layer][seq]; t++) has[w->tshard[layer][seq][t]] = 1;
    int n = 0;
    for (int s = 0; s < w->n_shards; s++) {
        if (!has[s]) continue;
        if (sel && (sel->mode & PIKV_SELECT_EXPERTS) && c->ne > 1) {
            const int k = sel->experts_top_k > 0 ? sel->experts_top_k : c->ept;
            int wanted = 0;
            for (int j = 0; j < k; j++) wanted |= qex[j] == s;
            if (!wanted) continue;
        }
        const int r = shard_dev(w, layer, s) / w->nloc;
        if (!rank_hit[r]) n++;
        rank_hit[r] = 1;
    }
    return n;
}

static void compare_out(const char *what, int nq, int nqh, int hd, const int32_t *seqs, const float *out,
                        const float *lse, const float *rout, const float *rlse)
{
    const size_t per = (size_t)nqh * (size_t)hd;
    double worst = 0.0, worst_lse = 0.0;
    int bad_empty = 0;
    for (int i = 0; i < nq; i++) {
        const float *o = out + (size_t)i * per, *ro = rout + (size_t)i * per;
        double e = tu_norm_err_ff(o, ro, per);
        worst = e > worst || isnan(e) ? e : worst;
        for (int h = 0; h < nqh && lse; h++) {
            const float l = lse[(size_t)i * nqh + h], rl = rlse[(size_t)i * nqh + h];
            double d;
            if (isinf(rl) && rl < 0) {
                d = 0.0;
                if (!(isinf(l) && l < 0)) bad_empty++;
            } else {
                d = isfinite(l) ? fabs((double)l - (double)rl) / fmax(1.0, fabs((double)rl)) : INFINITY;
            }
            worst_lse = d > worst_lse || isnan(d) ? d : worst_lse;
        }
    }
    g_worst_out = worst > g_worst_out ? worst : g_worst_out;
    g_worst_lse = worst_lse > g_worst_lse ? worst_lse : g_worst_lse;
    CHECKF(worst <= TOL_REF, "%s: normalized error %.3g (bound %g); seqs[0] = %d", what, worst, TOL_REF, seqs[0]);
    CHECKF(worst_lse <= TOL_LSE, "%s: lse error %.3g (bound %g)", what, worst_lse, TOL_LSE);
    CHECKF(bad_empty == 0, "%s: %d empty rows without -inf", what, bad_empty);
}

static void step_attend(world *w, int layer, int nq, const int32_t *seqs, tu_rng *r, const pikv_select_params *sel)
{
    const dcase *c = w->dc;
    const int nqh = c->nqh, hd = c->hd, ept = c->ept;
    const size_t per = (size_t)nqh * (size_t)hd;
    float *q = tu_xmalloc((size_t)nq * per * sizeof(float));
    int32_t *qex = tu_xmalloc((size_t)nq * (size_t)ept * sizeof(int32_t));
    float *out[3], *lse[3];
    for (int i = 0; i < 3; i++) {
        out[i] = tu_xmalloc((size_t)nq * per * sizeof(float));
        lse[i] = tu_xmalloc((size_t)nq * (size_t)nqh * sizeof(float));
        for (size_t x = 0; x < (size_t)nq * per; x++) out[i][x] = NAN;
    }
    tu_fill(r, q, (size_t)nq * per, 1.5f);
    for (int i = 0; i < nq; i++) tu_pick_experts(r, c->ne, ept, 0, qex + (size_t)i * ept);
    const int pass_experts = sel || tu_int(r, 0, 1);
    const int dist_lse = tu_int(r, 0, 3) != 0; /* lse NULL is allowed: the merge has its own */
    pikv_cache *caches[3] = {w->dist, w->refg, w->ref1};
    const int n_caches = c->evict ? 2 : 3; /* ref1 may evict other pages (its devices differ) */
    char what[160];
    snprintf(what, sizeof what, "attend layer %d nq %d %s%s k=%d", layer, nq,
             sel && (sel->mode & PIKV_SELECT_EXPERTS) ? "experts" : "exact", sel && sel->measure ? " measured" : "",
             sel ? sel->experts_top_k : 0);
    for (int i = 0; i < n_caches; i++) {
        pikv_attend_batch b;
        memset(&b, 0, sizeof b);
        b.n_queries = nq;
        b.seq_ids = seqs;
        b.q = q;
        b.experts = pass_experts ? qex : NULL;
        b.out = out[i];
        b.lse = i > 0 || dist_lse ? lse[i] : NULL;
        b.select = sel;
        pikv_status st = pikv_cache_attend(caches[i], layer, &b);
        if (i == 0) CHECK_STATUS_ALL(st, PIKV_OK, w->ctx, what);
        else CHECKF(st == PIKV_OK, "%s: reference %d: %s", what, i, pikv_context_last_error(pikv_cache_context(caches[i])));
    }
    compare_out(what, nq, nqh, hd, seqs, out[0], dist_lse ? lse[0] : NULL, out[1], lse[1]);
    if (n_caches > 2) {
        char w1[200];
        snprintf(w1, sizeof w1, "%s vs one device", what);
        compare_out(w1, nq, nqh, hd, seqs, out[0], dist_lse ? lse[0] : NULL, out[2], lse[2]);
    }
    /* exact mode: also the double-precision reference on what the pages hold */
    if (!sel && w->model_ok) {
        double *ro = tu_xmalloc(per * sizeof(double)), *rl = tu_xmalloc((size_t)nqh * sizeof(double));
        double worst = 0.0;
        for (int i = 0; i < nq; i++) {
            tu_model_ref(&w->m, layer, seqs[i], -1, q + (size_t)i * per, 1, ro, rl);
            const double e = tu_norm_err(out[0] + (size_t)i * per, ro, per);
            worst = e > worst || isnan(e) ? e : worst;
        }
        CHECKF(worst <= TU_TOL_EXACT, "%s: error %.3g vs the double reference (bound %g)", what, worst, TU_TOL_EXACT);
        free(ro);
        free(rl);
    }

    /* communication and reach */
    pikv_cache_dist_stats ds;
    pikv_cache_stats s0, sg;
    if (CHECK_OK(pikv_cache_get_dist_stats(w->dist, &ds)) && CHECK_OK(pikv_cache_get_stats(w->dist, &s0)) &&
        CHECK_OK(pikv_cache_get_stats(w->refg, &sg))) {
        const uint64_t rows = (uint64_t)nq * (uint64_t)nqh;
        const uint64_t merges = sel && sel->measure && sel->mode != PIKV_SELECT_ALL ? 2 : 1;
        const uint64_t partial = g_size > 1 ? merges * 4 * rows * ((uint64_t)hd + 2) : 0;
        CHECKF(ds.last_partial_bytes == partial, "%s: last_partial_bytes %llu, want %llu", what,
               (unsigned long long)ds.last_partial_bytes, (unsigned long long)partial);
        /* the rest is status exchanges: a few 8-byte allreduces */
        CHECKF(ds.last_bytes_sent >= partial && ds.last_bytes_sent <= partial + 64, "%s: last_bytes_sent %llu, "
               "partials %llu", what, (unsigned long long)ds.last_bytes_sent, (unsigned long long)partial);
        CHECK_EQ(s0.last_bytes_read, sg.last_bytes_read);
        CHECK_EQ(s0.last_pages_read, sg.last_pages_read);
        CHECK_EQ(s0.last_tokens_read, sg.last_tokens_read);
        if (sel && sel->measure) CHECKF(fabs(s0.last_recall - sg.last_recall) <= 1e-5, "%s: recall %.9g vs %.9g",
                                        what, s0.last_recall, sg.last_recall);
        uint64_t gather = 0;
        for (int g = 0; g < w->G; g++) {
            pikv_cache_device_stats d;
            if (g / w->nloc != g_rank && CHECK_OK(pikv_cache_get_device_stats(w->refg, g, &d)))
                gather += d.last_bytes_read;
        }
        CHECKF(ds.last_gather_bytes == gather, "%s: last_gather_bytes %llu, want %llu", what,
               (unsigned long long)ds.last_gather_bytes, (unsigned long long)gather);
        if (!c->evict) {
            int64_t touched = 0;
            int most = 0;
            for (int i = 0; i < nq; i++) {
                const int n = expected_ranks(w, layer, seqs[i], sel, qex + (size_t)i * ept);
                touched += n;
                most = n > most ? n : most;
            }
            const double mean = (double)touched / (double)nq;
            CHECKF(fabs(ds.last_ranks_per_query - mean) <= 1e-12, "%s: last_ranks_per_query %.6f, want %.6f", what,
                   ds.last_ranks_per_query, mean);
            CHECKF(ds.last_max_ranks == most, "%s: last_max_ranks %d, want %d", what, ds.last_max_ranks, most);
        }
    }
    const uint64_t all_sent = sum_u64(ds.last_bytes_sent), all_recv = sum_u64(ds.last_bytes_received);
    CHECKF(all_sent == all_recv, "%s: bytes sent by all ranks %llu != received %llu", what,
           (unsigned long long)all_sent, (unsigned long long)all_recv);
    free(q);
    free(qex);
    for (int i = 0; i < 3; i++) {
        free(out[i]);
        free(lse[i]);
    }
}

/* A batch over the live sequences (each at least once, some twice, shuffled). */
static int make_batch(world *w, tu_rng *r, int32_t *seqs)
{
    int nq = 0;
    for (int s = 0; s < MAX_SEQ; s++)
        if (w->live[s]) seqs[nq++] = s;
    const int n0 = nq;
    const int dups = (int)tu_int(r, 0, n0);
    for (int i = 0; i < dups && n0 > 0; i++) seqs[nq++] = seqs[tu_int(r, 0, n0 - 1)];
    for (int i = nq - 1; i > 0; i--) {
        const int j = (int)tu_int(r, 0, i);
        const int32_t t = seqs[i];
        seqs[i] = seqs[j];
        seqs[j] = t;
    }
    return nq;
}

/* ------------------------------------------------------------------------ */
/* Memory: each rank holds its own shards, and only them                     */
/* ------------------------------------------------------------------------ */

static void check_memory(world *w)
{
    pikv_cache_stats s0, sg, s1;
    pikv_cache_dist_stats ds;
    CHECK_REPLICATED(w->dist, "check_memory");
    if (!CHECK_OK(pikv_cache_get_stats(w->dist, &s0)) || !CHECK_OK(pikv_cache_get_stats(w->refg, &sg)) ||
        !CHECK_OK(pikv_cache_get_stats(w->ref1, &s1)) || !CHECK_OK(pikv_cache_get_dist_stats(w->dist, &ds)))
        return;
    /* the replicated metadata: the whole cache as the one-process cache on as many devices */
    CHECK_EQ(s0.tokens, sg.tokens);
    CHECK_EQ(s0.pages, sg.pages);
    CHECK_EQ(s0.bytes_allocated, sg.bytes_allocated);
    CHECK_EQ(s0.bytes_used, sg.bytes_used);
    CHECK_EQ(s0.sequences, sg.sequences);
    CHECK_EQ(s0.evicted_pages, sg.evicted_pages);
    if (!w->dc->evict) {
        CHECK_EQ(s0.pages, s1.pages);
        CHECK_EQ(s0.tokens, s1.tokens);
    }
    uint64_t per_rank[MAX_RANKS] = {0};
    int64_t my_pages = 0, my_tokens = 0;
    for (int g = 0; g < w->G; g++) {
        pikv_cache_device_stats d, dg;
        if (!CHECK_OK(pikv_cache_get_device_stats(w->dist, g, &d)) ||
            !CHECK_OK(pikv_cache_get_device_stats(w->refg, g, &dg)))
            continue;
        CHECKF(d.shards == dg.shards && d.tokens == dg.tokens && d.pages == dg.pages &&
                   d.bytes_allocated == dg.bytes_allocated && d.bytes_used == dg.bytes_used &&
                   d.quantized_pages == dg.quantized_pages,
               "device %d: shards %d/%d tokens %lld/%lld pages %lld/%lld bytes %llu/%llu used %llu/%llu (dist/one "
               "process)", g, d.shards, dg.shards, (long long)d.tokens, (long long)dg.tokens, (long long)d.pages,
               (long long)dg.pages, (unsigned long long)d.bytes_allocated, (unsigned long long)dg.bytes_allocated,
               (unsigned long long)d.bytes_used, (unsigned long long)dg.bytes_used);
        per_rank[g / w->nloc] += d.bytes_allocated;
        if (g / w->nloc == g_rank) {
            my_pages += d.pages;
            my_tokens += d.tokens;
            /* the context's device holds exactly this device's pages, nothing of other ranks' */
            const uint64_t used = tu_mem_used(w->ctx, g % w->nloc) - w->mem_base[g % w->nloc];
            CHECKF(used == d.bytes_allocated, "device %d: context memory_used grew by %llu, the cache holds %llu "
                   "there", g, (unsigned long long)used, (unsigned long long)d.bytes_allocated);
        }
    }
    CHECKF(ds.bytes_allocated == per_rank[g_rank], "rank bytes_allocated %llu, its devices %llu",
           (unsigned long long)ds.bytes_allocated, (unsigned long long)per_rank[g_rank]);
    uint64_t mx = 0, sum = 0;
    for (int r = 0; r < g_size; r++) {
        mx = per_rank[r] > mx ? per_rank[r] : mx;
        sum += per_rank[r];
    }
    CHECK_EQ(ds.max_rank_bytes, mx);
    CHECKF(fabs(ds.mean_rank_bytes - (double)sum / g_size) <= 1e-6 * (1.0 + (double)sum), "mean_rank_bytes %.1f",
           ds.mean_rank_bytes);
    /* what the ranks hold adds up to the whole cache */
    const uint64_t all_bytes = sum_u64(ds.bytes_allocated);
    CHECKF(all_bytes == sg.bytes_allocated, "bytes over ranks %llu, one process %llu", (unsigned long long)all_bytes,
           (unsigned long long)sg.bytes_allocated);
    const uint64_t all_pages = sum_u64((uint64_t)my_pages), all_tokens = sum_u64((uint64_t)my_tokens);
    CHECKF(all_pages == (uint64_t)sg.pages, "pages over ranks %llu, one process %lld", (unsigned long long)all_pages,
           (long long)sg.pages);
    CHECKF(all_tokens == (uint64_t)sg.tokens, "tokens over ranks %llu, one process %lld",
           (unsigned long long)all_tokens, (long long)sg.tokens);
    uint64_t all_max = 0, mine = ds.bytes_allocated;
    MPI_Allreduce(&mine, &all_max, 1, MPI_UINT64_T, MPI_MAX, MPI_COMM_WORLD);
    CHECK_EQ(ds.max_rank_bytes, all_max);
}

/* ------------------------------------------------------------------------ */
/* Check 1-4: a case run                                                     */
/* ------------------------------------------------------------------------ */

static void run_case(const dcase *c)
{
    tu_set_case("%s: %s %s experts %d/%d, %d device(s) per rank x %d ranks, ps %d, heads %d/%d, hd %d, layers %d, "
                "n_shards %d, hash_tokens %d%s, seed %llu", c->name, pl_name(c->pl), dt_name(c->dt), c->ne, c->ept,
                c->n_local, g_size, c->ps, c->nqh, c->nkv, c->hd, c->nl, c->n_shards, c->hash_tokens,
                c->evict ? ", budget + LRU" : "", (unsigned long long)c->seed);
    tu_err_ctx = g_ctx[c->n_local];
    world w;
    if (!world_open(&w, c)) return;
    tu_rng r = tu_rng_seed(c->seed);
    const int n_seq0 = 4;
    for (int s = 0; s < n_seq0; s++) seq_add_all(&w, s);
    seq_add_all(&w, 9); /* stays empty: zero output, -inf */
    const int max_n = c->ps * 2 + 3;
    int32_t seqs[4 * MAX_SEQ];
    for (int round = 0; round < 3; round++) {
        const int n_app = 8 + round * 2;
        for (int a = 0; a < n_app; a++) {
            const int layer = (int)tu_int(&r, 0, c->nl - 1);
            int seq;
            do seq = (int)tu_int(&r, 0, MAX_SEQ - 1);
            while (!w.live[seq] || seq == 9);
            step_append(&w, layer, seq, &r, max_n);
        }
        check_memory(&w);
        for (int l = 0; l < c->nl; l++) {
            const int nq = make_batch(&w, &r, seqs);
            step_attend(&w, l, nq, seqs, &r, NULL);
        }
        /* experts selection: only the owners of the queries' experts take part */
        if (c->ne > 1 && c->pl != PIKV_PLACEMENT_HASH && !c->evict) {
            for (int k = 1; k <= 2 && k <= c->ept; k++) {
                pikv_select_params sel = w.p.select;
                sel.mode = PIKV_SELECT_EXPERTS;
                sel.experts_top_k = k;
                sel.sink_tokens = 0;
                sel.recent_tokens = 0;
                sel.measure = round == 1 && k == 2;
                const int layer = (int)tu_int(&r, 0, c->nl - 1);
                const int nq = make_batch(&w, &r, seqs);
                step_attend(&w, layer, nq, seqs, &r, &sel);
            }
        }
        /* sequence operations, on every rank */
        if (round == 0) {
            int64_t shortest = INT64_MAX;
            for (int l = 0; l < c->nl; l++) shortest = w.next[l][1] < shortest ? w.next[l][1] : shortest;
            seq_copy_all(&w, 1, 5, shortest > 0 ? tu_int(&r, 0, shortest) : 0);
            seq_copy_all(&w, 2, 6, 0);
        } else if (round == 1) {
            seq_remove_all(&w, 0);
            CHECK_STATUS_ALL(pikv_cache_trim(w.dist), PIKV_OK, w.ctx, "trim");
            CHECK_OK(pikv_cache_trim(w.refg));
            CHECK_OK(pikv_cache_trim(w.ref1));
            check_memory(&w);
            seq_add_all(&w, 0);
        }
        check_memory(&w);
    }
    if (c->evict) { /* the budget did evict, alike everywhere (check_memory) */
        pikv_cache_stats es;
        if (CHECK_OK(pikv_cache_get_stats(w.dist, &es))) CHECKF(es.evicted_pages > 0, "no page was evicted");
    }
    /* a one-process cache is rank 0 of 1 and holds everything */
    pikv_cache_dist_stats ds1;
    pikv_cache_stats sg1;
    if (CHECK_OK(pikv_cache_get_dist_stats(w.refg, &ds1)) && CHECK_OK(pikv_cache_get_stats(w.refg, &sg1))) {
        CHECK_EQ(ds1.rank, 0);
        CHECK_EQ(ds1.n_ranks, 1);
        CHECK_EQ(ds1.local_devices, w.G);
        CHECK_EQ(ds1.bytes_allocated, sg1.bytes_allocated);
        CHECK_EQ(ds1.max_rank_bytes, sg1.bytes_allocated);
        CHECK_EQ(ds1.bytes_sent, 0);
        CHECK_EQ(ds1.last_partial_bytes, 0);
    }
    /* an attend with no queries moves nothing */
    pikv_attend_batch b;
    memset(&b, 0, sizeof b);
    CHECK_STATUS_ALL(pikv_cache_attend(w.dist, 0, &b), PIKV_OK, w.ctx, "attend of 0 queries");
    pikv_cache_dist_stats ds;
    if (CHECK_OK(pikv_cache_get_dist_stats(w.dist, &ds))) CHECK_EQ(ds.last_partial_bytes, 0);
    world_close(&w);
}

/* ------------------------------------------------------------------------ */
/* Check 5: errors                                                           */
/* ------------------------------------------------------------------------ */

static int has_text(const pikv_context *ctx, const char *text)
{
    return strstr(pikv_context_last_error(ctx), text) != NULL;
}

/* Every rank but the failing one names it. */
static void check_blame(const pikv_context *ctx, int bad_rank, const char *what)
{
    char text[32];
    snprintf(text, sizeof text, "rank %d failed", bad_rank);
    if (g_rank != bad_rank)
        CHECKF(has_text(ctx, text), "%s: rank %d's message does not name rank %d: \"%s\"", what, g_rank, bad_rank,
               pikv_context_last_error(ctx));
}

/* The cache as before the failed call, and its output still the one-process cache's. */
static void check_unchanged(world *w, tu_snap *base, const char *what, tu_rng *r)
{
    tu_snap now;
    tu_snap_take(w->dist, &w->p, &now);
    TU_SNAP_SAME(what, base, &now);
    tu_snap_free(base);
    *base = now; /* the next failure is compared with the cache as it is now */
    int32_t seqs[4 * MAX_SEQ];
    const int nq = make_batch(w, r, seqs);
    step_attend(w, 0, nq, seqs, r, NULL);
    tu_snap_free(base);
    tu_snap_take(w->dist, &w->p, base);
}

/* ------------------------------------------------------------------------ */
/* Check 6: overlap (pikv_cache_attend_start / _finish)                      */
/* ------------------------------------------------------------------------ */

/* One batch per layer, attended blocking and pipelined (start(l) then finish(l - 1), and
   all layers started before any finishes): the outputs and lse are bit-identical (the
   same kernels and the same merge, only its SUM posted non-blocking); out-of-order and
   NULL finishes are refused; a bad layer on rank 1 only fails start everywhere and leaves
   no request; the merge timings are sane; a one-process cache does all in start. */
static void run_overlap(void)
{
    const dcase c = {"overlap", PIKV_PLACEMENT_EXPERT, 4, 2, PIKV_DTYPE_F32, 1, 4, 4, 2, 16, 3, 0, 0, 0, 91, 0};
    tu_set_case("overlap over %d ranks", g_size);
    pikv_context *ctx = g_ctx[1];
    tu_err_ctx = ctx;
    world w;
    if (!world_open(&w, &c)) return;
    tu_rng r = tu_rng_seed(c.seed);
    for (int s = 0; s < 4; s++) seq_add_all(&w, s);
    seq_add_all(&w, 9); /* empty: zero output, -inf */
    for (int a = 0; a < 18; a++) step_append(&w, a % c.nl, a % 4, &r, 2 * c.ps + 3);
    int32_t seqs[4 * MAX_SEQ];
    const int nq = make_batch(&w, &r, seqs);
    const size_t per = (size_t)c.nqh * (size_t)c.hd, n_out = (size_t)nq * per, n_lse = (size_t)nq * (size_t)c.nqh;
    float *q = tu_xmalloc((size_t)c.nl * n_out * sizeof(float));
    int32_t *qex = tu_xmalloc((size_t)c.nl * (size_t)nq * (size_t)c.ept * sizeof(int32_t));
    float *out[3], *lse[3]; /* blocking, pipelined, all outstanding */
    for (int i = 0; i < 3; i++) {
        out[i] = tu_xmalloc((size_t)c.nl * n_out * sizeof(float));
        lse[i] = tu_xmalloc((size_t)c.nl * n_lse * sizeof(float));
        for (size_t x = 0; x < (size_t)c.nl * n_out; x++) out[i][x] = NAN;
    }
    tu_fill(&r, q, (size_t)c.nl * n_out, 1.5f);
    for (int i = 0; i < c.nl * nq; i++) tu_pick_experts(&r, c.ne, c.ept, 0, qex + (size_t)i * c.ept);
    pikv_attend_batch b[3][MAX_L];
    for (int m = 0; m < 3; m++)
        for (int l = 0; l < c.nl; l++) {
            memset(&b[m][l], 0, sizeof b[m][l]);
            b[m][l].n_queries = nq;
            b[m][l].seq_ids = seqs;
            b[m][l].q = q + (size_t)l * n_out;
            b[m][l].experts = qex + (size_t)l * (size_t)nq * (size_t)c.ept;
            b[m][l].out = out[m] + (size_t)l * n_out;
            b[m][l].lse = lse[m] + (size_t)l * n_lse;
        }
    const uint64_t want_partial = 4ull * (uint64_t)nq * (uint64_t)c.nqh * (uint64_t)(c.hd + 2);
    for (int l = 0; l < c.nl; l++)
        CHECK_STATUS_ALL(pikv_cache_attend(w.dist, l, &b[0][l]), PIKV_OK, ctx, "blocking attend");
    pikv_cache_dist_stats ds;
    if (CHECK_OK(pikv_cache_get_dist_stats(w.dist, &ds))) {
        CHECK_EQ(ds.last_partial_bytes, want_partial);
        CHECKF(ds.last_merge_wait_s >= 0.0 && ds.last_merge_wait_s <= ds.last_merge_posted_s,
               "blocking: merge wait %g s, posted %g s", ds.last_merge_wait_s, ds.last_merge_posted_s);
    }
    /* pipelined: start(l), finish(l - 1) */
    pikv_attend_request *prev = NULL;
    for (int l = 0; l <= c.nl; l++) {
        pikv_attend_request *cur = NULL;
        if (l < c.nl) {
            CHECK_STATUS_ALL(pikv_cache_attend_start(w.dist, l, &b[1][l], &cur), PIKV_OK, ctx, "start (pipelined)");
            CHECKF(cur != NULL, "start returned no request");
        }
        if (prev) {
            CHECK_STATUS_ALL(pikv_cache_attend_finish(prev), PIKV_OK, ctx, "finish (pipelined)");
            if (CHECK_OK(pikv_cache_get_dist_stats(w.dist, &ds))) {
                CHECK_EQ(ds.last_partial_bytes, want_partial);
                CHECK_EQ(ds.last_bytes_sent, ds.last_bytes_received);
                CHECKF(ds.last_merge_wait_s >= 0.0 && ds.last_merge_posted_s > 0.0 &&
                           ds.last_merge_wait_s <= ds.last_merge_posted_s,
                       "pipelined: merge wait %g s, posted %g s", ds.last_merge_wait_s, ds.last_merge_posted_s);
            }
        }
        prev = cur;
    }
    /* every layer outstanding, then finished in order */
    pikv_attend_request *reqs[MAX_L] = {NULL};
    for (int l = 0; l < c.nl; l++)
        CHECK_STATUS_ALL(pikv_cache_attend_start(w.dist, l, &b[2][l], &reqs[l]), PIKV_OK, ctx, "start (all)");
    if (c.nl > 1 && reqs[1]) { /* out of order: refused, the request stays */
        CHECK_STATUS_ALL(pikv_cache_attend_finish(reqs[1]), PIKV_ERR_INVALID_ARGUMENT, ctx, "finish out of order");
        CHECKF(has_text(ctx, "in the order"), "message: %s", pikv_context_last_error(ctx));
    }
    for (int l = 0; l < c.nl; l++)
        if (reqs[l]) CHECK_STATUS_ALL(pikv_cache_attend_finish(reqs[l]), PIKV_OK, ctx, "finish (all)");
    for (int m = 1; m < 3; m++) {
        CHECKF(memcmp(out[0], out[m], (size_t)c.nl * n_out * sizeof(float)) == 0,
               "outputs of %s differ from the blocking attends'", m == 1 ? "pipelined" : "all outstanding");
        CHECKF(memcmp(lse[0], lse[m], (size_t)c.nl * n_lse * sizeof(float)) == 0,
               "lse of %s differ from the blocking attends'", m == 1 ? "pipelined" : "all outstanding");
    }
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_attend_finish(NULL));
    /* a bad layer on rank 1 only: start fails everywhere, no request */
    if (g_size >= 2) {
        pikv_attend_request *bad = (pikv_attend_request *)&w; /* must be reset to NULL */
        pikv_status st = pikv_cache_attend_start(w.dist, g_rank == 1 ? c.nl : 0, &b[1][0], &bad);
        CHECK_STATUS_ALL(st, PIKV_ERR_OUT_OF_RANGE, ctx, "start, rank 1's layer out of range");
        check_blame(ctx, 1, "start layer");
        CHECKF(bad == NULL, "a failed start returned a request");
        /* the cache goes on: the next start/finish works and matches */
        pikv_attend_request *ok = NULL;
        CHECK_STATUS_ALL(pikv_cache_attend_start(w.dist, 0, &b[1][0], &ok), PIKV_OK, ctx, "start after a failure");
        if (ok) CHECK_STATUS_ALL(pikv_cache_attend_finish(ok), PIKV_OK, ctx, "finish after a failure");
        CHECKF(memcmp(out[0], out[1], n_out * sizeof(float)) == 0, "output after a failed start differs");
    }
    /* measurement: start does everything */
    {
        pikv_select_params sel = w.p.select;
        sel.mode = PIKV_SELECT_EXPERTS;
        sel.experts_top_k = 1;
        sel.measure = 1;
        pikv_attend_batch mb = b[1][0];
        mb.select = &sel;
        pikv_attend_request *mr = NULL;
        CHECK_STATUS_ALL(pikv_cache_attend_start(w.dist, 0, &mb, &mr), PIKV_OK, ctx, "start (measured)");
        pikv_cache_stats cs;
        if (CHECK_OK(pikv_cache_get_stats(w.dist, &cs))) CHECKF(cs.last_recall >= 0.0, "measured in start");
        if (mr) CHECK_STATUS_ALL(pikv_cache_attend_finish(mr), PIKV_OK, ctx, "finish (measured)");
        if (CHECK_OK(pikv_cache_get_dist_stats(w.dist, &ds))) CHECK_EQ(ds.last_partial_bytes, 2 * want_partial);
    }
    /* one process: start does everything, finish frees; the same output */
    {
        float *o1 = tu_xmalloc(n_out * sizeof(float)), *l1 = tu_xmalloc(n_lse * sizeof(float));
        pikv_attend_batch rb = b[0][0];
        rb.out = o1;
        rb.lse = l1;
        pikv_attend_request *rr = NULL;
        CHECK_OK(pikv_cache_attend_start(w.refg, 0, &rb, &rr));
        CHECKF(rr != NULL, "one process: no request");
        compare_out("overlap: one process start", nq, c.nqh, c.hd, seqs, out[0], lse[0], o1, l1);
        if (rr) CHECK_OK(pikv_cache_attend_finish(rr));
        pikv_cache_dist_stats d1;
        if (CHECK_OK(pikv_cache_get_dist_stats(w.refg, &d1))) {
            CHECK_EQ(d1.last_merge_wait_s, 0.0);
            CHECK_EQ(d1.last_merge_posted_s, 0.0);
        }
        free(o1);
        free(l1);
    }
    free(q);
    free(qex);
    for (int i = 0; i < 3; i++) {
        free(out[i]);
        free(lse[i]);
    }
    world_close(&w);
}

static void run_errors(void)
{
    if (g_size < 2) return;
    const int bad = 1;
    const dcase c = {"errors", PIKV_PLACEMENT_EXPERT, 6, 2, PIKV_DTYPE_F32, 1, 8, 4, 2, 16, 2, 0, 0, 0, 77, 0};
    tu_set_case("errors over %d ranks", g_size);
    pikv_context *ctx = g_ctx[1];
    tu_err_ctx = ctx;
    world w;
    if (!world_open(&w, &c)) return;
    tu_rng r = tu_rng_seed(c.seed);
    for (int s = 0; s < 3; s++) seq_add_all(&w, s);
    for (int a = 0; a < 8; a++) step_append(&w, a % 2, a % 3, &r, 12);
    float k[64 * 32], v[64 * 32], q[4 * 4 * 16];
    int32_t ex[64 * 2];
    tu_fill(&r, k, sizeof k / sizeof k[0], 1.0f);
    tu_fill(&r, v, sizeof v / sizeof v[0], 1.0f);
    tu_fill(&r, q, sizeof q / sizeof q[0], 1.0f);
    for (int i = 0; i < 64; i++) tu_pick_experts(&r, c.ne, c.ept, 0, ex + 2 * i);
    const int n = 3;
    tu_snap base;
    tu_snap_take(w.dist, &w.p, &base);

    /* append: rank 1 alone passes a bad layer */
    pikv_status st = pikv_cache_append(w.dist, g_rank == bad ? c.nl : 0, 0, n, k, v, NULL, ex);
    CHECK_STATUS_ALL(st, PIKV_ERR_OUT_OF_RANGE, ctx, "append, rank 1's layer out of range");
    check_blame(ctx, bad, "append layer");
    if (g_rank == bad) CHECKF(has_text(ctx, "layer 2 is outside"), "own message: %s", pikv_context_last_error(ctx));
    check_unchanged(&w, &base, "append with rank 1's bad layer", &r);

    /* NaN in rank 1's k */
    float kn[64 * 32];
    memcpy(kn, k, sizeof kn);
    if (g_rank == bad) kn[5] = NAN;
    st = pikv_cache_append(w.dist, 1, 1, n, kn, v, NULL, ex);
    CHECK_STATUS_ALL(st, PIKV_ERR_INVALID_ARGUMENT, ctx, "append, NaN in rank 1's k");
    check_blame(ctx, bad, "append NaN");
    CHECKF(has_text(ctx, "not finite"), "message: %s", pikv_context_last_error(ctx));
    check_unchanged(&w, &base, "append with a NaN on rank 1", &r);

    /* a sequence only rank 1 names, an expert only rank 1 passes, n < 0 or experts NULL on
       rank 1 */
    st = pikv_cache_append(w.dist, 0, g_rank == bad ? 7 : 0, n, k, v, NULL, ex);
    CHECK_STATUS_ALL(st, PIKV_ERR_NOT_FOUND, ctx, "append, rank 1's sequence not added");
    check_blame(ctx, bad, "append sequence");
    int32_t exb[64 * 2];
    memcpy(exb, ex, sizeof exb);
    if (g_rank == bad) exb[3] = c.ne;
    st = pikv_cache_append(w.dist, 0, 0, n, k, v, NULL, exb);
    CHECK_STATUS_ALL(st, PIKV_ERR_OUT_OF_RANGE, ctx, "append, rank 1's expert out of range");
    check_blame(ctx, bad, "append expert");
    st = pikv_cache_append(w.dist, 0, 0, g_rank == bad ? -1 : n, k, v, NULL, ex);
    CHECK_STATUS_ALL(st, PIKV_ERR_INVALID_ARGUMENT, ctx, "append, rank 1's n_tokens negative");
    check_blame(ctx, bad, "append n");
    st = pikv_cache_append(w.dist, 0, 0, n, k, v, NULL, g_rank == bad ? NULL : ex);
    CHECK_STATUS_ALL(st, PIKV_ERR_INVALID_ARGUMENT, ctx, "append, rank 1's experts NULL");
    check_blame(ctx, bad, "append experts NULL");
    /* valid on each rank, but not the same sequence, or not the same layer */
    st = pikv_cache_append(w.dist, 0, g_rank == bad ? 1 : 0, n, k, v, NULL, ex);
    CHECK_STATUS_ALL(st, PIKV_ERR_INVALID_ARGUMENT, ctx, "append, rank 1 names another sequence");
    CHECKF(has_text(ctx, "rank 1 appends to layer 0, sequence 1"), "message: %s", pikv_context_last_error(ctx));
    st = pikv_cache_append(w.dist, g_rank == bad ? 1 : 0, 0, n, k, v, NULL, ex);
    CHECK_STATUS_ALL(st, PIKV_ERR_INVALID_ARGUMENT, ctx, "append, rank 1 names another layer");
    CHECKF(has_text(ctx, "rank 1 appends to layer 1"), "message: %s", pikv_context_last_error(ctx));
    check_unchanged(&w, &base, "appends with rank 1's bad arguments", &r);

    /* attend: rank 1 alone passes a bad layer, a non-finite q, an unknown sequence, QUEST */
    float out[4 * 4 * 16], lse[4 * 4];
    int32_t seqs[4] = {0, 1, 2, 0};
    pikv_attend_batch b;
    memset(&b, 0, sizeof b);
    b.n_queries = 4;
    b.seq_ids = seqs;
    b.q = q;
    b.out = out;
    b.lse = lse;
    st = pikv_cache_attend(w.dist, g_rank == bad ? -1 : 0, &b);
    CHECK_STATUS_ALL(st, PIKV_ERR_OUT_OF_RANGE, ctx, "attend, rank 1's layer out of range");
    check_blame(ctx, bad, "attend layer");
    float qn[4 * 4 * 16];
    memcpy(qn, q, sizeof qn);
    if (g_rank == bad) qn[7] = INFINITY;
    b.q = qn;
    st = pikv_cache_attend(w.dist, 0, &b);
    CHECK_STATUS_ALL(st, PIKV_ERR_INVALID_ARGUMENT, ctx, "attend, rank 1's q not finite");
    check_blame(ctx, bad, "attend q");
    /* valid on every rank but not the same batch: a query value, a sequence id or the
       layer differs on rank 1 alone (the merge would mix different queries) */
    if (g_rank == bad) qn[7] = q[7] + 0.5f;
    st = pikv_cache_attend(w.dist, 0, &b);
    CHECK_STATUS_ALL(st, PIKV_ERR_INVALID_ARGUMENT, ctx, "attend, rank 1's q differs");
    CHECKF(has_text(ctx, "different batches"), "message: %s", pikv_context_last_error(ctx));
    b.q = q;
    int32_t seqd[4] = {0, 1, 2, g_rank == bad ? 1 : 0};
    b.seq_ids = seqd;
    st = pikv_cache_attend(w.dist, 0, &b);
    CHECK_STATUS_ALL(st, PIKV_ERR_INVALID_ARGUMENT, ctx, "attend, rank 1's sequences differ");
    b.seq_ids = seqs;
    st = pikv_cache_attend(w.dist, g_rank == bad ? 1 : 0, &b);
    CHECK_STATUS_ALL(st, PIKV_ERR_INVALID_ARGUMENT, ctx, "attend, rank 1's layer differs");
    int32_t seqb[4] = {0, 1, 2, g_rank == bad ? 8 : 0};
    b.seq_ids = seqb;
    st = pikv_cache_attend(w.dist, 0, &b);
    CHECK_STATUS_ALL(st, PIKV_ERR_NOT_FOUND, ctx, "attend, rank 1's sequence not added");
    check_blame(ctx, bad, "attend seq");
    b.seq_ids = seqs;
    pikv_select_params quest = w.p.select;
    quest.mode = PIKV_SELECT_QUEST;
    b.select = g_rank == bad ? &quest : NULL;
    st = pikv_cache_attend(w.dist, 0, &b);
    CHECK_STATUS_ALL(st, PIKV_ERR_UNSUPPORTED, ctx, "attend, QUEST on rank 1");
    check_blame(ctx, bad, "attend QUEST");
    b.select = &quest;
    st = pikv_cache_attend(w.dist, 0, &b);
    CHECK_STATUS_ALL(st, PIKV_ERR_UNSUPPORTED, ctx, "attend, QUEST everywhere");
    CHECKF(has_text(ctx, "QUEST"), "message: %s", pikv_context_last_error(ctx));
    b.select = NULL;
    /* zero copy: not over ranks */
    st = pikv_cache_attend_device(w.dist, 0, 0, &b);
    CHECK_STATUS_ALL(st, PIKV_ERR_UNSUPPORTED, ctx, "attend_device");
    st = pikv_cache_append_device(w.dist, 0, 0, n, 0, k, v, NULL, ex);
    CHECK_STATUS_ALL(st, PIKV_ERR_UNSUPPORTED, ctx, "append_device");
    check_unchanged(&w, &base, "attends with rank 1's bad arguments", &r);
    tu_snap_free(&base);
    world_close(&w);

    /* capacity over ranks: 40 tokens per layer; every rank's own tokens fit, all do not */
    dcase cc = c;
    cc.name = "capacity";
    cc.capacity = 40;
    tu_set_case("capacity over %d ranks", g_size);
    if (world_open(&w, &cc)) {
        seq_add_all(&w, 0);
        const int each = 40 / g_size + 1;
        tu_snap_take(w.dist, &w.p, &base);
        st = pikv_cache_append(w.dist, 0, 0, each, k, v, NULL, ex);
        CHECK_STATUS_ALL(st, PIKV_ERR_CAPACITY, ctx, "append over capacity over ranks");
        tu_snap now;
        tu_snap_take(w.dist, &w.p, &now);
        TU_SNAP_SAME("append over capacity", &base, &now);
        tu_snap_free(&now);
        tu_snap_free(&base);
        /* exactly the capacity is fine */
        const int fit = g_rank == 0 ? 40 - (g_size - 1) * (40 / g_size) : 40 / g_size;
        st = pikv_cache_append(w.dist, 0, 0, fit, k, v, NULL, ex);
        CHECK_STATUS_ALL(st, PIKV_OK, ctx, "append of exactly the capacity over ranks");
        world_close(&w);
    }

    /* create: mismatched parameters, device counts, bad parameters on rank 1 */
    tu_set_case("create errors over %d ranks", g_size);
    pikv_cache_params p = params_of(&c);
    p.comm = g_comm[1];
    pikv_cache *cache = NULL;
    pikv_cache_params pb = p;
    if (g_rank == bad) pb.page_size = 16;
    st = pikv_cache_create(ctx, &pb, &cache);
    CHECK_STATUS_ALL(st, PIKV_ERR_INVALID_ARGUMENT, ctx, "create, rank 1's page_size differs");
    CHECK(cache == NULL);
    CHECKF(has_text(ctx, "rank 1"), "message: %s", pikv_context_last_error(ctx));

    pb = p;
    if (g_rank == bad) pb.head_dim = 0;
    st = pikv_cache_create(ctx, &pb, &cache);
    CHECK_STATUS_ALL(st, PIKV_ERR_INVALID_ARGUMENT, ctx, "create, rank 1's head_dim 0");
    CHECK(cache == NULL);
    check_blame(ctx, bad, "create head_dim");

    /* rank 1 brings 2 devices, the others 1 */
    int32_t devs2[2] = {0, 1};
    pb = p;
    pb.comm = g_comm[2];
    pb.devices = devs2;
    pb.n_devices = g_rank == bad ? 2 : 1;
    st = pikv_cache_create(g_ctx[2], &pb, &cache);
    CHECK_STATUS_ALL(st, PIKV_ERR_INVALID_ARGUMENT, g_ctx[2], "create, rank 1 brings 2 devices");
    CHECK(cache == NULL);

    /* unsupported over ranks: everywhere, or on rank 1 only */
    const char *names[3] = {"QUEST", "H2O", "utility"};
    for (int i = 0; i < 3; i++)
        for (int only = 0; only < 2; only++) {
            pb = p;
            if (!only || g_rank == bad) {
                if (i == 0) pb.select.mode = PIKV_SELECT_QUEST;
                if (i == 1) pb.evict.policy = PIKV_EVICT_H2O;
                if (i == 2) pb.evict.policy = PIKV_EVICT_UTILITY;
                if (i > 0) {
                    pb.budget.mode = PIKV_BUDGET_UNIFORM;
                    pb.budget.total_tokens = 1024;
                }
            }
            st = pikv_cache_create(ctx, &pb, &cache);
            char what[64];
            snprintf(what, sizeof what, "create with %s%s", names[i], only ? " on rank 1" : "");
            CHECK_STATUS_ALL(st, PIKV_ERR_UNSUPPORTED, ctx, what);
            CHECK(cache == NULL);
            if (only) check_blame(ctx, bad, what);
            else CHECKF(has_text(ctx, names[i]), "%s: message: %s", what, pikv_context_last_error(ctx));
        }

    /* rebalance moves pages between ranks: unsupported */
    pb = p;
    pb.placement = PIKV_PLACEMENT_BALANCED;
    st = pikv_cache_create(ctx, &pb, &cache);
    CHECK_STATUS_ALL(st, PIKV_OK, ctx, "create BALANCED");
    if (all_true(cache != NULL)) {
        int64_t moved = -1;
        st = pikv_cache_rebalance(cache, &moved);
        CHECK_STATUS_ALL(st, PIKV_ERR_UNSUPPORTED, ctx, "rebalance");
        CHECK_EQ(moved, 0);
    }
    pikv_cache_free(cache);
}

/* ------------------------------------------------------------------------ */
/* Check 5b: a memory limit on rank 1; host allocation failures on rank 1    */
/* ------------------------------------------------------------------------ */

typedef struct fail_alloc {
    long countdown; /* < 0: never fail; 0: the next allocation fails */
    long calls;
} fail_alloc;

static void *fa_alloc(void *user, size_t size, size_t align)
{
    fail_alloc *f = user;
    f->calls++;
    if (f->countdown == 0) {
        f->countdown = -1;
        return NULL;
    }
    if (f->countdown > 0) f->countdown--;
    void *p = NULL;
    if (align < sizeof(void *)) align = sizeof(void *);
    if (posix_memalign(&p, align, size ? size : 1) != 0) return NULL;
    return p;
}

static void fa_free(void *user, void *p)
{
    (void)user;
    free(p);
}

static void run_limits(void)
{
    if (g_size < 2) return;
    tu_set_case("memory limit on rank 1's device, %d ranks", g_size);
    /* rank 1's device holds 24 KiB; the others are unlimited */
    const dcase c = {"limit", PIKV_PLACEMENT_EXPERT, 4, 1, PIKV_DTYPE_F32, 1, 8, 2, 2, 16, 1, 0, 0, 0, 91, 0};
    pikv_context *lctx = make_ctx(1, g_rank == 1 ? 24 * 1024 : 0);
    pikv_comm *lcomm = make_comm(lctx);
    tu_err_ctx = lctx;
    pikv_cache_params p = params_of(&c);
    p.comm = lcomm;
    pikv_cache *cache = NULL;
    pikv_status st = pikv_cache_create(lctx, &p, &cache);
    CHECK_STATUS_ALL(st, PIKV_OK, lctx, "create with a limit on rank 1");
    if (all_true(cache != NULL)) {
        CHECK_STATUS_ALL(pikv_seq_add(cache, 0), PIKV_OK, lctx, "seq_add");
        /* page bytes 8 x 2 x 16 x 2 x 4 = 2 KiB (+ bounds): 24 KiB is about 10 pages; shard 1
           (expert 1) lives on rank 1 */
        const int n = 200;
        const size_t row = 2 * 16;
        float *k = tu_xmalloc(n * row * sizeof(float)), *v = tu_xmalloc(n * row * sizeof(float));
        int32_t *ex = tu_xmalloc(n * sizeof(int32_t));
        tu_rng r = tu_rng_seed(5);
        tu_fill(&r, k, n * row, 1.0f);
        tu_fill(&r, v, n * row, 1.0f);
        for (int i = 0; i < n; i++) ex[i] = 1;
        tu_snap base;
        tu_snap_take(cache, &p, &base);
        st = pikv_cache_append(cache, 0, 0, g_rank == 0 ? n : 0, k, v, NULL, ex);
        pikv_status want = st != PIKV_OK ? st : PIKV_ERR_OUT_OF_MEMORY;
        CHECK_STATUS_ALL(st, want, lctx, "append beyond rank 1's device memory");
        CHECKF(st != PIKV_OK, "the append passed rank 1's limit: %s", pikv_status_name(st));
        tu_snap now;
        tu_snap_take(cache, &p, &now);
        TU_SNAP_SAME("append beyond rank 1's limit", &base, &now);
        tu_snap_free(&now);
        tu_snap_free(&base);
        /* the same tokens for expert 0 (rank 0's device) fit */
        for (int i = 0; i < n; i++) ex[i] = 0;
        st = pikv_cache_append(cache, 0, 0, g_rank == 0 ? n : 0, k, v, NULL, ex);
        CHECK_STATUS_ALL(st, PIKV_OK, lctx, "append to rank 0's device");
        free(k);
        free(v);
        free(ex);
        pikv_cache_free(cache);
    }
    pikv_comm_free(lcomm);
    pikv_context_free(lctx);
}

/* Each allocation of the cache's context on rank 1 fails in turn, during create, append,
   attend and prefix copy: every rank gets the same error and the cache is unchanged. The
   communicator lives in another context (its own allocations are not the cache's). */
static void run_alloc_faults(void)
{
    if (g_size < 2) return;
    const int bad = 1;
    static fail_alloc fa = {-1, 0};
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "cpu";
    cp.cpu_devices = 2;
    cp.cpu_threads = 1;
    cp.cpu_device_memory = 64 * 1024; /* chunks of a few pages: trim has chunks to free */
    cp.allocator.alloc = fa_alloc;
    cp.allocator.free = fa_free;
    cp.allocator.user = &fa;
    pikv_context *fctx = NULL;
    if (pikv_context_create(&cp, &fctx) != PIKV_OK) MPI_Abort(MPI_COMM_WORLD, 2);
    pikv_context *cctx = make_ctx(1, 0);
    pikv_comm *comm = make_comm(cctx);
    tu_err_ctx = fctx;
    const dcase c = {"faults", PIKV_PLACEMENT_BALANCED, 5, 2, PIKV_DTYPE_INT8, 2, 4, 4, 2, 8, 2, 0, 0, 0, 123, 0};
    pikv_cache_params p = params_of(&c);
    p.comm = comm;
    p.quant_group = 4;

    /* create */
    pikv_cache *cache = NULL;
    int done = 0;
    for (long at = 0; at < 400 && !done; at++) {
        tu_set_case("allocation %ld of rank 1 fails in create", at);
        fa.countdown = g_rank == bad ? at : -1;
        pikv_status st = pikv_cache_create(fctx, &p, &cache);
        fa.countdown = -1;
        int mine = (int)st, all[MAX_RANKS];
        MPI_Allgather(&mine, 1, MPI_INT, all, 1, MPI_INT, MPI_COMM_WORLD);
        int same = 1;
        for (int q = 0; q < g_size; q++) same &= all[q] == mine;
        CHECKF(same, "create: rank %d got %s, rank 0 %s: %s", g_rank, pikv_status_name(st),
               pikv_status_name((pikv_status)all[0]), pikv_context_last_error(fctx));
        if (!all_true(same)) break; /* out of step */
        if (st == PIKV_OK) {
            done = 1;
        } else {
            CHECK(cache == NULL);
            if (g_rank != bad) check_blame(fctx, bad, "create");
        }
    }
    CHECK(done);
    if (!all_true(cache != NULL)) {
        pikv_cache_free(cache);
        pikv_comm_free(comm);
        pikv_context_free(cctx);
        pikv_context_free(fctx);
        return;
    }
    tu_rng r = tu_rng_seed(c.seed);
    const size_t row = (size_t)c.nkv * c.hd;
    float k[40 * 16], v[40 * 16], q[6 * 4 * 8];
    int32_t ex[40 * 2];
    for (int s = 0; s < 3; s++) CHECK_STATUS_ALL(pikv_seq_add(cache, s), PIKV_OK, fctx, "seq_add");
    for (int s = 1; s < 3; s++)
        for (int l = 0; l < c.nl; l++) {
            tu_fill(&r, k, 40 * row, 1.0f);
            tu_fill(&r, v, 40 * row, 1.0f);
            for (int i = 0; i < 40; i++) tu_pick_experts(&r, c.ne, c.ept, 0, ex + 2 * i);
            CHECK_STATUS_ALL(pikv_cache_append(cache, l, s, 30, k, v, NULL, ex), PIKV_OK, fctx, "fill");
        }

    /* append to layers 0 and 1 (every rank passes a few tokens), attend, copy_prefix,
       seq_add, trim: fail each allocation in turn */
    for (int op = 0; op < 6; op++) {
        done = 0;
        long at_done = -1;
        for (long at = 0; at < 2000 && !done; at++) {
            tu_set_case("allocation %ld of rank 1 fails in op %d", at, op);
            tu_fill(&r, k, 40 * row, 1.0f);
            tu_fill(&r, v, 40 * row, 1.0f);
            tu_fill(&r, q, sizeof q / sizeof q[0], 1.0f);
            for (int i = 0; i < 40; i++) tu_pick_experts(&r, c.ne, c.ept, 0, ex + 2 * i);
            tu_snap base;
            tu_snap_take(cache, &p, &base);
            fa.countdown = g_rank == bad ? at : -1;
            pikv_status st;
            float out[6 * 4 * 8], lse[6 * 4];
            int32_t seqs[6] = {0, 1, 2, 0, 1, 2};
            if (op <= 1) { /* layer op, sequence 0 (which the copy below takes from) */
                st = pikv_cache_append(cache, op, 0, 5 + g_rank * 3, k, v, NULL, ex);
            } else if (op == 2) {
                pikv_attend_batch b;
                memset(&b, 0, sizeof b);
                b.n_queries = 6;
                b.seq_ids = seqs;
                b.q = q;
                b.out = out;
                b.lse = lse;
                b.experts = ex;
                st = pikv_cache_attend(cache, (int)(at % 2), &b);
            } else if (op == 3) {
                st = pikv_seq_copy_prefix(cache, 0, 5, 3);
            } else if (op == 4) {
                st = pikv_seq_add(cache, 7);
            } else {
                st = pikv_cache_trim(cache);
                pikv_cache_stats ts;
                if (st == PIKV_OK && CHECK_OK(pikv_cache_get_stats(cache, &ts)))
                    CHECKF(ts.bytes_allocated < base.pre.bytes_allocated, "trim freed nothing: %llu bytes before, %llu after",
                           (unsigned long long)base.pre.bytes_allocated, (unsigned long long)ts.bytes_allocated);
            }
            fa.countdown = -1;
            CHECK_REPLICATED(cache, "after a faulted op");
            int mine = (int)st, all[MAX_RANKS];
            MPI_Allgather(&mine, 1, MPI_INT, all, 1, MPI_INT, MPI_COMM_WORLD);
            int same = 1;
            for (int x = 0; x < g_size; x++) same &= all[x] == mine;
            CHECKF(same, "op %d: rank %d got %s, rank 0 %s: %s", op, g_rank, pikv_status_name(st),
                   pikv_status_name((pikv_status)all[0]), pikv_context_last_error(fctx));
            if (!all_true(same)) { /* out of step: the calls below would not match */
                tu_snap_free(&base);
                break;
            }
            if (st == PIKV_OK) {
                done = 1;
                at_done = at;
            } else {
                check_blame(fctx, bad, "faulted op");
                tu_snap now;
                tu_snap_take(cache, &p, &now);
                if (op == 5) { /* a trim may have compacted some devices: the output stands */
                    CHECKF(now.ok && now.n_out == base.n_out &&
                               memcmp(now.out, base.out, now.n_out * sizeof(float)) == 0,
                           "trim: attend output changed");
                } else {
                    TU_SNAP_SAME("faulted op", &base, &now);
                }
                tu_snap_free(&now);
            }
            tu_snap_free(&base);
        }
        CHECKF(done, "op %d never succeeded", op);
        if (g_rank == 0) fprintf(stderr, "mpi_cache: op %d succeeded after %ld injected failures on rank 1\n", op, at_done);
        if (op == 3 && done) CHECK_STATUS_ALL(pikv_seq_remove(cache, 5), PIKV_OK, fctx, "seq_remove");
        if (op == 4 && done) {
            /* leave pages to compact: sequences 1 and 2 go, their slots free up */
            CHECK_STATUS_ALL(pikv_seq_remove(cache, 7), PIKV_OK, fctx, "seq_remove");
            CHECK_STATUS_ALL(pikv_seq_remove(cache, 1), PIKV_OK, fctx, "seq_remove");
            CHECK_STATUS_ALL(pikv_seq_remove(cache, 2), PIKV_OK, fctx, "seq_remove");
        }
    }
    pikv_cache_free(cache);
    pikv_comm_free(comm);
    pikv_context_free(cctx);
    pikv_context_free(fctx);
}

/* ------------------------------------------------------------------------ */

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_size);
    if (g_size > MAX_RANKS || g_size * MAX_LOCAL > 64) {
        if (g_rank == 0) fprintf(stderr, "mpi_cache: at most %d ranks\n", MAX_RANKS);
        MPI_Finalize();
        return 2;
    }
    const double t0 = MPI_Wtime();
    for (int n = 1; n <= MAX_LOCAL; n++) {
        g_ctx[n] = make_ctx(n, 0);
        g_comm[n] = make_comm(g_ctx[n]);
        g_ref_ctx[n] = make_ctx(g_size * n, 0);
    }
    g_ref1_ctx = make_ctx(1, 0);

    /* name, placement, experts, top-k, dtype, devices per rank, ps, q heads, kv heads, hd,
       layers, n_shards, hash_tokens, evict, seed */
    static const dcase cases[] = {
        {"expert f32", PIKV_PLACEMENT_EXPERT, 6, 2, PIKV_DTYPE_F32, 1, 8, 4, 2, 16, 2, 0, 0, 0, 1, 0},
        {"expert f16 2 dev", PIKV_PLACEMENT_EXPERT, 8, 2, PIKV_DTYPE_F16, 2, 4, 2, 1, 32, 2, 0, 0, 0, 2, 0},
        {"expert int8", PIKV_PLACEMENT_EXPERT, 5, 2, PIKV_DTYPE_INT8, 1, 8, 4, 2, 16, 2, 0, 0, 0, 3, 0},
        {"hash f32", PIKV_PLACEMENT_HASH, 6, 2, PIKV_DTYPE_F32, 1, 8, 4, 4, 16, 2, 0, 0, 0, 4, 0},
        {"hash f16 2 dev shards", PIKV_PLACEMENT_HASH, 4, 1, PIKV_DTYPE_F16, 2, 4, 4, 2, 16, 1, 7, 5, 0, 5, 0},
        {"hash int8", PIKV_PLACEMENT_HASH, 6, 3, PIKV_DTYPE_INT8, 2, 8, 2, 2, 16, 2, 0, 0, 0, 6, 0},
        {"balanced f32 2 dev", PIKV_PLACEMENT_BALANCED, 7, 2, PIKV_DTYPE_F32, 2, 8, 4, 2, 16, 2, 0, 0, 0, 7, 0},
        {"balanced f16", PIKV_PLACEMENT_BALANCED, 5, 2, PIKV_DTYPE_F16, 1, 4, 2, 2, 16, 2, 0, 0, 0, 8, 0},
        {"balanced int8", PIKV_PLACEMENT_BALANCED, 6, 2, PIKV_DTYPE_INT8, 1, 8, 4, 2, 16, 2, 0, 0, 0, 9, 0},
        {"dense f32", PIKV_PLACEMENT_EXPERT, 1, 1, PIKV_DTYPE_F32, 1, 8, 4, 2, 16, 2, 0, 0, 0, 10, 0},
        {"dense f16 2 dev", PIKV_PLACEMENT_HASH, 1, 1, PIKV_DTYPE_F16, 2, 4, 4, 4, 16, 2, 0, 0, 0, 11, 0},
        {"dense int8 balanced", PIKV_PLACEMENT_BALANCED, 1, 1, PIKV_DTYPE_INT8, 1, 8, 2, 1, 32, 2, 3, 0, 0, 12, 0},
        {"expert int4", PIKV_PLACEMENT_EXPERT, 6, 2, PIKV_DTYPE_INT4, 1, 8, 4, 2, 16, 1, 0, 0, 0, 13, 0},
        {"expert f16 budget", PIKV_PLACEMENT_EXPERT, 4, 2, PIKV_DTYPE_F16, 1, 4, 4, 2, 16, 2, 0, 0, 1, 14, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const double t = MPI_Wtime();
        for (int rep = 0; rep < 3; rep++) { /* three data seeds each */
            dcase c = cases[i];
            c.seed += 1000u * (unsigned)rep;
            run_case(&c);
        }
        if (g_rank == 0) fprintf(stderr, "mpi_cache: %-24s %.2f s\n", cases[i].name, MPI_Wtime() - t);
    }
    double t = MPI_Wtime();
    run_overlap();
    if (g_rank == 0) fprintf(stderr, "mpi_cache: %-24s %.2f s\n", "overlap", MPI_Wtime() - t);
    t = MPI_Wtime();
    run_errors();
    if (g_rank == 0) fprintf(stderr, "mpi_cache: %-24s %.2f s\n", "errors", MPI_Wtime() - t);
    t = MPI_Wtime();
    run_limits();
    if (g_rank == 0) fprintf(stderr, "mpi_cache: %-24s %.2f s\n", "memory limit", MPI_Wtime() - t);
    t = MPI_Wtime();
    run_alloc_faults();
    if (g_rank == 0) fprintf(stderr, "mpi_cache: %-24s %.2f s\n", "allocation faults", MPI_Wtime() - t);

    for (int n = 1; n <= MAX_LOCAL; n++) {
        pikv_comm_free(g_comm[n]);
        pikv_context_free(g_ctx[n]);
        pikv_context_free(g_ref_ctx[n]);
    }
    pikv_context_free(g_ref1_ctx);
    double worst[2] = {g_worst_out, g_worst_lse}, most[2];
    MPI_Reduce(worst, most, 2, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
    if (g_rank == 0)
        fprintf(stderr, "mpi_cache: %d ranks, %.2f s; largest error against the one-process caches: output %.3g, "
                "lse %.3g (bounds %g, %g)\n", g_size, MPI_Wtime() - t0, most[0], most[1], TOL_REF, TOL_LSE);
    printf("rank %d: ", g_rank);
    const int rc = tu_finish();
    int any = 0;
    MPI_Allreduce(&rc, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Finalize();
    return any;
}
