/* Caches filled with synthetic KV, and timed attends over them.
 *
 * One cache per (device, dtype, batch): its base sequences are filled to the
 * sweep's largest context once (the fill is timed: append cost per token), and
 * every smaller context reads prefix copies of them (pikv_seq_copy_prefix shares
 * the full pages, so nothing is copied but an open page). Each timed attend is
 * preceded by a read of a buffer twice the last-level cache, so it starts cold,
 * as a layer's attend does in a decode step after the other layers ran. The best
 * of several attends is kept (and the median reported). */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench.h"
#include "cli.h"
#include "run.h"

enum { POOL_TOKENS = 2048, FILL_CHUNK = 1024 };

typedef struct kv_pool {
    float *k, *v;                 /* [POOL_TOKENS][kv_heads][head_dim] */
    size_t row;                   /* floats per token */
} kv_pool;

static kv_pool g_pool;

static uint64_t splitmix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static float uniform(uint64_t *s) /* [-1, 1) */
{
    return (float)((double)(splitmix(s) >> 40) / (double)(1ull << 23) - 1.0);
}

const char *bench_dtype_name(pikv_dtype t)
{
    switch (t) {
    case PIKV_DTYPE_F32: return "f32";
    case PIKV_DTYPE_F16: return "f16";
    case PIKV_DTYPE_INT8: return "int8";
    case PIKV_DTYPE_INT4: return "int4";
    }
    return "?";
}

/* The pool row holding token t of base sequence s: the baseline reads the same. */
static inline size_t pool_row(int32_t s, int64_t t)
{
    return (size_t)((t + (int64_t)s * 977) % POOL_TOKENS);
}

int bench_env_init(bench_env *env, const bench_opts *o, pikv_context *ctx, bench_results *r)
{
    memset(env, 0, sizeof *env);
    env->o = o;
    env->ctx = ctx;
    env->r = r;
    long l3 = -1;
#ifdef _SC_LEVEL3_CACHE_SIZE
    l3 = sysconf(_SC_LEVEL3_CACHE_SIZE);
#endif
    size_t flush_bytes = l3 > 0 ? 2 * (size_t)l3 : 0;
    if (flush_bytes < ((size_t)64 << 20)) flush_bytes = (size_t)64 << 20;
    env->flush_floats = flush_bytes / sizeof(float);
    env->flush = malloc(flush_bytes);
    const size_t row = (size_t)o->kv_heads * (size_t)o->head_dim;
    if (!g_pool.k || g_pool.row != row) {
        free(g_pool.k);
        free(g_pool.v);
        g_pool.row = row;
        g_pool.k = malloc(POOL_TOKENS * row * sizeof(float));
        g_pool.v = malloc(POOL_TOKENS * row * sizeof(float));
        if (g_pool.k && g_pool.v) {
            uint64_t s = o->seed;
            /* keys: a per-channel offset (so channels differ, as in real keys) plus noise */
            for (size_t t = 0; t < POOL_TOKENS; t++)
                for (size_t i = 0; i < row; i++) {
                    g_pool.k[t * row + i] = 0.5f * (float)((i * 2654435761u) % 7) / 7.0f + uniform(&s);
                    g_pool.v[t * row + i] = uniform(&s);
                }
        }
    }
    if (!env->flush || !g_pool.k || !g_pool.v) {
        fprintf(stderr, "pikv bench: out of host memory for the data pool\n");
        bench_env_free(env);
        return CLI_EXIT_FAIL;
    }
    for (size_t i = 0; i < env->flush_floats; i++) env->flush[i] = (float)(i & 7);
    return 0;
}

void bench_env_free(bench_env *env)
{
    free(env->flush);
    env->flush = NULL;
    free(g_pool.k);
    free(g_pool.v);
    memset(&g_pool, 0, sizeof g_pool);
}

/* The pool's K and V rows of token t of base sequence s (for the baseline). */
const float *bench_pool_k(int32_t s, int64_t t) { return g_pool.k + pool_row(s, t) * g_pool.row; }
const float *bench_pool_v(int32_t s, int64_t t) { return g_pool.v + pool_row(s, t) * g_pool.row; }

void bench_flush_llc(bench_env *env)
{
    float acc[8] = {0};
    for (size_t i = 0; i + 8 <= env->flush_floats; i += 8)
        for (int j = 0; j < 8; j++) acc[j] += env->flush[i + (size_t)j];
    env->flush_sink = acc[0] + acc[7];
}

bench_point *bench_add_point(bench_results *r)
{
    if (r->n_points == r->cap_points) {
        int cap = r->cap_points ? 2 * r->cap_points : 256;
        bench_point *p = realloc(r->points, (size_t)cap * sizeof *p);
        if (!p) return NULL;
        r->points = p;
        r->cap_points = cap;
    }
    bench_point *p = &r->points[r->n_points++];
    memset(p, 0, sizeof *p);
    return p;
}

const bench_point *bench_find(const bench_results *r, int32_t dev, const char *kind, pikv_dtype dtype,
                              int32_t batch, int64_t context, int32_t param)
{
    for (int i = 0; i < r->n_points; i++) {
        const bench_point *p = &r->points[i];
        if (p->device == dev && strcmp(p->kind, kind) == 0 && p->dtype == dtype && p->batch == batch &&
            p->context == context && p->param == param)
            return p;
    }
    return NULL;
}

/* KV bytes a configuration stores (for --max-kv): K and V rows, plus, quantized,
   the scales of KIVI's groups (an estimate; the run reports the real bytes). */
static double kv_bytes_per_token(const bench_opts *o, pikv_dtype t)
{
    const double elems = 2.0 * o->kv_heads * o->head_dim;
    switch (t) {
    case PIKV_DTYPE_F32: return 4 * elems;
    case PIKV_DTYPE_F16: return 2 * elems;
    case PIKV_DTYPE_INT8: return elems + elems * 4.0 / o->quant_group;
    case PIKV_DTYPE_INT4: return elems / 2 + elems * 4.0 / o->quant_group;
    }
    return 2 * elems;
}

typedef struct bench_cache {
    pikv_cache *cache;
    int32_t batch;
    int32_t n_experts, ept;
    uint64_t rng;
} bench_cache;

static int lib_fail(bench_env *env, const char *fn, pikv_status st)
{
    return cli_lib_error(env->ctx, fn, st);
}

static int cache_create(bench_env *env, int32_t dev, pikv_dtype dtype, int32_t batch, int64_t max_ctx,
                        int32_t n_experts, bench_cache *bc)
{
    const bench_opts *o = env->o;
    memset(bc, 0, sizeof *bc);
    pikv_cache_params p = pikv_cache_default_params();
    p.n_layers = 1;
    p.n_q_heads = o->q_heads;
    p.n_kv_heads = o->kv_heads;
    p.head_dim = o->head_dim;
    p.page_size = o->page_size;
    p.quant_group = o->quant_group;
    p.dtype = dtype;
    p.n_experts = n_experts;
    /* the router's top-k: at least 2, and as many as the largest k the queries read */
    int32_t ept = 1;
    if (n_experts > 1) {
        ept = 2;
        for (int i = 0; i < o->n_expert_ks; i++) ept = o->expert_ks[i] > ept ? o->expert_ks[i] : ept;
        ept = ept < n_experts ? ept : n_experts;
    }
    p.experts_per_token = ept;
    p.placement = PIKV_PLACEMENT_EXPERT;
    const int64_t cap = (int64_t)batch * max_ctx;
    if (cap > INT32_MAX) {
        fprintf(stderr, "pikv bench: %lld tokens exceed a cache's capacity range\n", (long long)cap);
        return CLI_EXIT_FAIL;
    }
    p.capacity_tokens = cap;
    p.max_sequences = batch;
    p.devices = &env->r->devices[dev].index;
    p.n_devices = 1;
    p.select.sink_tokens = 4;
    p.select.recent_tokens = o->page_size;
    pikv_status st = pikv_cache_create(env->ctx, &p, &bc->cache);
    if (st != PIKV_OK) return lib_fail(env, "pikv_cache_create", st);
    bc->batch = batch;
    bc->n_experts = n_experts;
    bc->ept = p.experts_per_token;
    bc->rng = o->seed ^ 0x5eed;
    return 0;
}

/* Grows sequences 0..batch-1 from `from` to `to` tokens (adding them when from is 0);
   *seconds gets the time of the appends alone. */
static int cache_fill(bench_env *env, bench_cache *bc, int64_t from, int64_t to, double *seconds)
{
    const bench_opts *o = env->o;
    const size_t row = g_pool.row;
    float *k = malloc((size_t)FILL_CHUNK * row * sizeof(float));
    float *v = malloc((size_t)FILL_CHUNK * row * sizeof(float));
    int32_t *experts = malloc((size_t)FILL_CHUNK * (size_t)bc->ept * sizeof(int32_t));
    int rc = 0;
    double t = 0;
    if (!k || !v || !experts) {
        fprintf(stderr, "pikv bench: out of host memory\n");
        rc = CLI_EXIT_FAIL;
    }
    for (int32_t s = 0; s < bc->batch && rc == 0; s++) {
        pikv_status st = from == 0 ? pikv_seq_add(bc->cache, s) : PIKV_OK;
        if (st != PIKV_OK) {
            rc = lib_fail(env, "pikv_seq_add", st);
            break;
        }
        for (int64_t t0 = from; t0 < to && rc == 0; t0 += FILL_CHUNK) {
            const int32_t m = (int32_t)(to - t0 < FILL_CHUNK ? to - t0 : FILL_CHUNK);
            for (int32_t i = 0; i < m; i++) {
                memcpy(k + (size_t)i * row, bench_pool_k(s, t0 + i), row * sizeof(float));
                memcpy(v + (size_t)i * row, bench_pool_v(s, t0 + i), row * sizeof(float));
                if (bc->n_experts > 1) { /* uniform top-1 (where the token is stored), then its neighbours */
                    const int32_t e0 = (int32_t)(splitmix(&bc->rng) % (uint64_t)bc->n_experts);
                    for (int32_t j = 0; j < bc->ept; j++) experts[(size_t)i * (size_t)bc->ept + (size_t)j] = (e0 + j) % bc->n_experts;
                }
            }
            const double a = cli_now();
            st = pikv_cache_append(bc->cache, 0, s, m, k, v, NULL, bc->n_experts > 1 ? experts : NULL);
            t += cli_now() - a;
            if (st != PIKV_OK) rc = lib_fail(env, "pikv_cache_append", st);
        }
    }
    (void)o;
    free(k);
    free(v);
    free(experts);
    *seconds = t;
    return rc;
}

/* Best-of-N timed attends (each after an LLC flush). Fills pt's timing fields. */
static int timed_attend(bench_env *env, bench_cache *bc, const int32_t *seqs, const float *q,
                        const int32_t *experts, float *out, const pikv_select_params *sel, bench_point *pt)
{
    const bench_opts *o = env->o;
    pikv_attend_batch b = {bc->batch, seqs, q, experts, out, NULL, sel};
    pikv_status st = pikv_cache_attend(bc->cache, 0, &b); /* warm-up: first-use costs */
    if (st != PIKV_OK) return lib_fail(env, "pikv_cache_attend", st);
    double times[1024];
    int reps = 0;
    double total = 0, best = INFINITY;
    while (reps < o->max_reps && reps < 1024 && (reps < o->min_reps || total < o->min_time)) {
        bench_flush_llc(env);
        const double t0 = cli_now();
        st = pikv_cache_attend(bc->cache, 0, &b);
        const double t = cli_now() - t0;
        if (st != PIKV_OK) return lib_fail(env, "pikv_cache_attend", st);
        times[reps++] = t;
        total += t;
        if (t < best) {
            best = t;
            pikv_cache_stats cs;
            pikv_cache_get_stats(bc->cache, &cs);
            pt->bytes = cs.last_bytes_read;
            pt->stored_bytes = cs.bytes_used;
            pt->plan_s = cs.last_plan_s;
            pt->score_s = cs.last_score_s;
            pt->topk_s = cs.last_topk_s;
            pt->attention_s = cs.last_attention_s;
            pt->merge_s = cs.last_merge_s;
        }
    }
    /* median by insertion sort (reps is small) */
    for (int i = 1; i < reps; i++)
        for (int j = i; j > 0 && times[j - 1] > times[j]; j--) {
            const double x = times[j];
            times[j] = times[j - 1];
            times[j - 1] = x;
        }
    pt->seconds = best;
    pt->median_s = reps % 2 ? times[reps / 2] : 0.5 * (times[reps / 2 - 1] + times[reps / 2]);
    pt->reps = reps;
    return 0;
}

static void make_queries(bench_env *env, int32_t batch, int32_t n_experts, int32_t ept, float *q, int32_t *experts)
{
    const bench_opts *o = env->o;
    uint64_t s = o->seed * 31 + (uint64_t)batch;
    const size_t n = (size_t)batch * (size_t)o->q_heads * (size_t)o->head_dim;
    for (size_t i = 0; i < n; i++) q[i] = uniform(&s);
    for (int32_t i = 0; i < batch && n_experts > 1; i++) {
        const int32_t e0 = (int32_t)(splitmix(&s) % (uint64_t)n_experts);
        for (int32_t j = 0; j < ept; j++) experts[(size_t)i * (size_t)ept + (size_t)j] = (e0 + j) % n_experts;
    }
}

/* The contexts of a batch under --max-kv, ascending. */
static int contexts_of(const bench_opts *o, int32_t batch, pikv_dtype dtype, int64_t *out)
{
    const int64_t *list = batch == 1 ? o->contexts : o->batch_contexts;
    const int n = batch == 1 ? o->n_contexts : o->n_batch_contexts;
    int m = 0;
    for (int i = 0; i < n; i++)
        if ((double)batch * (double)list[i] * kv_bytes_per_token(o, dtype) <= (double)o->max_kv_bytes) out[m++] = list[i];
    for (int i = 1; i < m; i++)
        for (int j = i; j > 0 && out[j - 1] > out[j]; j--) {
            const int64_t x = out[j];
            out[j] = out[j - 1];
            out[j - 1] = x;
        }
    return m;
}

/* Dense, quantized and sparse points of one (device, dtype, batch): the sequences
   grow through the contexts in ascending order, each measured when reached. A
   device too slow for the next context (its last dense attend took longer than
   --max-attend-s, or filling to it would take longer than 20 times that) stops
   there, and says so. */
static int sweep_dtype_batch(bench_env *env, int32_t dev, pikv_dtype dtype, int32_t batch, int32_t n_experts)
{
    const bench_opts *o = env->o;
    bench_device *bd = &env->r->devices[dev];
    int64_t ctxs[BENCH_MAX_LIST];
    const int n_ctx = contexts_of(o, batch, dtype, ctxs);
    if (n_ctx == 0) return 0;
    bench_cache bc;
    int rc = cache_create(env, dev, dtype, batch, ctxs[n_ctx - 1], n_experts, &bc);
    if (rc) return rc;
    const size_t qn = (size_t)batch * (size_t)o->q_heads * (size_t)o->head_dim;
    float *q = malloc(qn * sizeof(float)), *out = malloc(qn * sizeof(float));
    int32_t *experts = calloc((size_t)batch * (size_t)bc.ept, sizeof(int32_t));
    int32_t *seqs = calloc((size_t)batch, sizeof(int32_t));
    if (!q || !out || !experts || !seqs) {
        fprintf(stderr, "pikv bench: out of host memory\n");
        rc = CLI_EXIT_FAIL;
    }
    for (int32_t i = 0; i < batch && seqs; i++) seqs[i] = i;
    if (rc == 0) make_queries(env, batch, n_experts, bc.ept, q, experts);
    pikv_cache_params cp;
    pikv_cache_get_params(bc.cache, &cp);
    double fill_s = 0;
    int64_t filled = 0;
    for (int c = 0; c < n_ctx && rc == 0; c++) {
        const int64_t n = ctxs[c];
        const double per_token = filled ? fill_s / ((double)batch * (double)filled) : 0;
        if (per_token * (double)batch * (double)(n - filled) > 20 * o->max_attend_s) {
            if (!o->quiet)
                fprintf(stderr, "  %s: %s batch %d: stopping before %lld tokens (filling would take %.0f s)\n",
                        bd->info.name, bench_dtype_name(dtype), batch, (long long)n,
                        per_token * (double)batch * (double)(n - filled));
            break;
        }
        if (!o->quiet)
            fprintf(stderr, "  %s: %s%s, batch %d, %lld tokens\n", bd->info.name, bench_dtype_name(dtype),
                    n_experts > 1 ? " (experts)" : "", batch, (long long)n);
        double t = 0;
        rc = cache_fill(env, &bc, filled, n, &t);
        if (rc) break;
        fill_s += t;
        filled = n;
        pikv_select_params sel = cp.select;
        /* dense: every page (the reference of the sparse points) */
        sel.mode = PIKV_SELECT_ALL;
        bench_point *pt = bench_add_point(env->r);
        if (!pt) {
            rc = CLI_EXIT_FAIL;
            break;
        }
        *pt = (bench_point){.device = dev, .kind = n_experts > 1 ? "experts-dense" : "dense", .dtype = dtype,
                            .batch = batch, .context = n, .n_experts = n_experts};
        pt->append_s_per_token = fill_s / ((double)batch * (double)filled);
        rc = timed_attend(env, &bc, seqs, q, experts, out, &sel, pt);
        if (rc) break;
        const double dense_s = pt->seconds;
        if (n_experts > 1) {
            for (int k = 0; k < o->n_expert_ks && rc == 0; k++) {
                if (o->expert_ks[k] >= n_experts) continue;
                sel.mode = PIKV_SELECT_EXPERTS;
                sel.experts_top_k = o->expert_ks[k];
                pt = bench_add_point(env->r);
                if (!pt) {
                    rc = CLI_EXIT_FAIL;
                    break;
                }
                *pt = (bench_point){.device = dev, .kind = "experts", .dtype = dtype, .batch = batch, .context = n,
                                    .param = o->expert_ks[k], .n_experts = n_experts};
                rc = timed_attend(env, &bc, seqs, q, experts, out, &sel, pt);
            }
        } else {
            for (int k = 0; k < o->n_quest && rc == 0; k++) {
                const int64_t budget = n / o->quest_ratios[k];
                if (budget < sel.sink_tokens + sel.recent_tokens + o->page_size) continue;
                sel.mode = PIKV_SELECT_QUEST;
                sel.token_budget = (int32_t)budget;
                pt = bench_add_point(env->r);
                if (!pt) {
                    rc = CLI_EXIT_FAIL;
                    break;
                }
                *pt = (bench_point){.device = dev, .kind = "quest", .dtype = dtype, .batch = batch, .context = n,
                                    .param = o->quest_ratios[k], .n_experts = 1};
                rc = timed_attend(env, &bc, seqs, q, experts, out, &sel, pt);
            }
        }
        if (rc == 0 && dense_s > o->max_attend_s && c + 1 < n_ctx) {
            if (!o->quiet)
                fprintf(stderr, "  %s: %s batch %d: stopping after %lld tokens (an attend took %.2f s)\n",
                        bd->info.name, bench_dtype_name(dtype), batch, (long long)n, dense_s);
            break;
        }
    }
    pikv_cache_free(bc.cache);
    free(q);
    free(out);
    free(experts);
    free(seqs);
    return rc;
}

int bench_device_sweeps(bench_env *env, int32_t dev)
{
    const bench_opts *o = env->o;
    int rc = 0;
    for (int d = 0; d < o->n_dtypes && rc == 0; d++)
        for (int b = 0; b < o->n_batches && rc == 0; b++)
            rc = sweep_dtype_batch(env, dev, o->dtypes[d], o->batches[b], 1);
    /* experts selection: an MoE cache (E experts, top-2 routing, expert placement), f16 */
    if (rc == 0 && o->n_experts > 1 && o->n_expert_ks > 0)
        for (int b = 0; b < o->n_batches && rc == 0; b++)
            rc = sweep_dtype_batch(env, dev, PIKV_DTYPE_F16, o->batches[b], o->n_experts);
    return rc;
}

/* Memory per device and the merge of partials: an MoE cache (8 experts, top-2,
   routing skewed as real routers are: expert e drawn with weight 1/(e+1)) over
   several CPU devices of a context of its own, for each placement. Over MPI ranks
   the cache spans every rank's devices (rank 0 passes the tokens, every rank
   attends; balanced placement is not re-packed there: rebalance is one-process);
   the metadata is replicated, so rank 0 reads every device's bytes. */
int bench_memory_section(bench_env *env, const run_mpi *mpi)
{
    const bench_opts *o = env->o;
    pikv_context_params cpp = pikv_context_default_params();
    cpp.backends = "cpu";
    cpp.cpu_devices = o->memory_devices;
    cpp.cpu_threads = o->threads;
    pikv_context *ctx = NULL;
    pikv_status st = pikv_context_create(&cpp, &ctx);
    if (st != PIKV_OK) {
        fprintf(stderr, "pikv bench: pikv_context_create (%d CPU devices): %s\n", o->memory_devices,
                pikv_status_name(st));
        return CLI_EXIT_FAIL;
    }
    const int ranks = mpi && mpi->size > 1 ? mpi->size : 1, rank = ranks > 1 ? mpi->rank : 0;
    pikv_comm *comm = NULL;
    if (ranks > 1) {
        st = run_mpi_comm_create(mpi, ctx, &comm);
        if (st != PIKV_OK) {
            const int rc = cli_lib_error(ctx, "pikv_comm_create_mpi", st);
            pikv_context_free(ctx);
            return rc;
        }
    }
    static const struct {
        const char *name;
        pikv_placement p;
    } placements[] = {{"expert", PIKV_PLACEMENT_EXPERT}, {"hash", PIKV_PLACEMENT_HASH},
                      {"balanced", PIKV_PLACEMENT_BALANCED}};
    enum { E = 8, EPT = 2, BATCH = 4 };
    const int64_t n = o->batch_contexts[0] < 8192 ? o->batch_contexts[0] : 8192;
    const size_t row = g_pool.row;
    int rc = 0;
    float *k = malloc((size_t)FILL_CHUNK * row * sizeof(float));
    float *v = malloc((size_t)FILL_CHUNK * row * sizeof(float));
    const size_t qn = (size_t)BATCH * (size_t)o->q_heads * (size_t)o->head_dim;
    float *q = malloc(qn * sizeof(float)), *out = malloc(qn * sizeof(float));
    int32_t experts[FILL_CHUNK * EPT], qexp[BATCH * EPT], seqs[BATCH];
    double cdf[E], wsum = 0;
    for (int e = 0; e < E; e++) cdf[e] = (wsum += 1.0 / (e + 1));
    if (!k || !v || !q || !out) {
        fprintf(stderr, "pikv bench: out of host memory\n");
        rc = CLI_EXIT_FAIL;
    }
    uint64_t rng = o->seed ^ 0x3e3;
    for (size_t i = 0; rc == 0 && i < qn; i++) q[i] = uniform(&rng);
    for (int32_t i = 0; i < BATCH; i++) {
        seqs[i] = i;
        qexp[i * EPT] = i % E;
        qexp[i * EPT + 1] = (i + 1) % E;
    }
    for (size_t pl = 0; pl < sizeof placements / sizeof placements[0] && rc == 0; pl++) {
        if (env->r->n_memory >= (int)(sizeof env->r->memory / sizeof env->r->memory[0])) break;
        pikv_cache_params p = pikv_cache_default_params();
        p.n_q_heads = o->q_heads;
        p.n_kv_heads = o->kv_heads;
        p.head_dim = o->head_dim;
        p.page_size = o->page_size;
        p.n_experts = E;
        p.experts_per_token = EPT;
        p.placement = placements[pl].p;
        p.capacity_tokens = BATCH * n + (int64_t)BATCH * E * o->page_size;
        p.max_sequences = BATCH;
        p.comm = comm;
        pikv_cache *c = NULL;
        st = pikv_cache_create(ctx, &p, &c);
        if (st != PIKV_OK) {
            rc = cli_lib_error(ctx, "pikv_cache_create", st);
            break;
        }
        if (!o->quiet && rank == 0)
            fprintf(stderr, "  memory: %s placement over %d devices x %d rank%s\n", placements[pl].name,
                    o->memory_devices, ranks, ranks > 1 ? "s" : "");
        for (int32_t s = 0; s < BATCH && rc == 0; s++) {
            st = pikv_seq_add(c, s);
            for (int64_t t0 = 0; t0 < n && st == PIKV_OK; t0 += FILL_CHUNK) {
                const int32_t m = (int32_t)(n - t0 < FILL_CHUNK ? n - t0 : FILL_CHUNK);
                for (int32_t i = 0; i < m; i++) {
                    memcpy(k + (size_t)i * row, bench_pool_k(s, t0 + i), row * sizeof(float));
                    memcpy(v + (size_t)i * row, bench_pool_v(s, t0 + i), row * sizeof(float));
                    const double u = (double)(splitmix(&rng) >> 11) / (double)(1ull << 53) * wsum;
                    int32_t e0 = 0;
                    while (e0 < E - 1 && cdf[e0] < u) e0++;
                    experts[i * EPT] = e0;
                    experts[i * EPT + 1] = (e0 + 1) % E;
                }
                /* over ranks: rank 0's tokens are the append, the others pass none */
                st = pikv_cache_append(c, 0, s, rank == 0 ? m : 0, k, v, NULL, experts);
            }
            if (st != PIKV_OK) rc = cli_lib_error(ctx, "pikv_cache_append", st);
        }
        if (rc == 0 && p.placement == PIKV_PLACEMENT_BALANCED && !comm) {
            int64_t moved = 0;
            st = pikv_cache_rebalance(c, &moved);
            if (st != PIKV_OK) rc = cli_lib_error(ctx, "pikv_cache_rebalance", st);
        }
        bench_memory *bm = &env->r->memory[env->r->n_memory];
        memset(bm, 0, sizeof *bm);
        bm->placement = placements[pl].name;
        pikv_cache_stats cs;
        if (rc == 0) pikv_cache_get_stats(c, &cs);
        bm->n_devices = rc == 0 ? cs.n_devices : 0;
        if (bm->n_devices > BENCH_MAX_DEVICES) {
            fprintf(stderr, "pikv bench: the memory section reports at most %d devices (%d here: devices x ranks)\n",
                    BENCH_MAX_DEVICES, bm->n_devices);
            rc = CLI_EXIT_USAGE;
        }
        double sum = 0, max = 0;
        for (int32_t d = 0; rc == 0 && d < bm->n_devices && d < BENCH_MAX_DEVICES; d++) {
            pikv_cache_device_stats ds;
            pikv_cache_get_device_stats(c, d, &ds);
            bm->bytes_used[d] = ds.bytes_used;
            bm->bytes_allocated[d] = ds.bytes_allocated;
            bm->tokens[d] = ds.tokens;
            sum += (double)ds.bytes_used;
            max = (double)ds.bytes_used > max ? (double)ds.bytes_used : max;
        }
        bm->imbalance = sum > 0 ? max / (sum / bm->n_devices) : 0;
        /* global devices are rank-major: rank r holds devices r*n .. r*n+n-1 */
        bm->n_ranks = ranks < BENCH_MAX_DEVICES ? ranks : BENCH_MAX_DEVICES;
        const int32_t per_rank = bm->n_devices / ranks > 0 ? bm->n_devices / ranks : 1;
        double rmax = 0;
        for (int32_t d = 0; rc == 0 && d < bm->n_devices && d < BENCH_MAX_DEVICES; d++)
            if (d / per_rank < bm->n_ranks) bm->rank_bytes[d / per_rank] += bm->bytes_used[d];
        for (int32_t i = 0; i < bm->n_ranks; i++) rmax = (double)bm->rank_bytes[i] > rmax ? (double)bm->rank_bytes[i] : rmax;
        bm->rank_imbalance = sum > 0 ? rmax / (sum / bm->n_ranks) : 0;
        /* one attend over every device: the partials are merged on the host */
        pikv_attend_batch b = {BATCH, seqs, q, qexp, out, NULL, NULL};
        double best = INFINITY;
        for (int rep = 0; rc == 0 && rep < 5; rep++) {
            bench_flush_llc(env);
            const double t0 = cli_now();
            st = pikv_cache_attend(c, 0, &b);
            const double t = cli_now() - t0;
            if (st != PIKV_OK) {
                rc = cli_lib_error(ctx, "pikv_cache_attend", st);
                break;
            }
            if (t < best) {
                best = t;
                pikv_cache_get_stats(c, &cs);
                bm->merge_s = cs.last_merge_s;
            }
        }
        bm->attend_s = best;
        if (rc == 0) env->r->n_memory++;
        pikv_cache_free(c);
    }
    free(k);
    free(v);
    free(q);
    free(out);
    pikv_comm_free(comm);
    pikv_context_free(ctx);
    return rc;
}
