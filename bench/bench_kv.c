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

int bench_cold_pass(bench_env *env, int32_t dev, uint64_t bytes, uint64_t *probe_bytes, double *probe_s)
{
    const bench_device *bd = &env->r->devices[dev];
    *probe_s = 0;
    *probe_bytes = 0;
    /* the probe evicts the LLC itself only when it reads host memory and is larger */
    if (!bd->probe || !bd->info.caps.host_visible || bd->probe_bytes < env->flush_floats * sizeof(float))
        bench_flush_llc(env);
    if (!bd->probe) return 0;
    uint64_t passes = (bytes + bd->probe_bytes - 1) / bd->probe_bytes;
    passes = passes < 1 ? 1 : passes > 1000 ? 1000 : passes;
    pikv_read_bandwidth bw;
    const pikv_status st = pikv_read_probe_run(bd->probe, (int32_t)passes, &bw);
    if (st != PIKV_OK) return cli_lib_error(env->ctx, "pikv_read_probe_run", st);
    *probe_s = bw.total_s;
    *probe_bytes = passes * bd->probe_bytes;
    return 0;
}

double bench_point_read_bps(const bench_results *r, const bench_point *p)
{
    if (p->probe_bytes && p->probe_s > 0) return (double)p->probe_bytes / p->probe_s;
    return r->devices[p->device].read_bps;
}

double bench_point_share(const bench_results *r, const bench_point *p)
{
    if (p->paired_share > 0) return p->paired_share;
    const double bw = bench_point_read_bps(r, p);
    return bw > 0 && p->seconds > 0 ? (double)p->bytes / p->seconds / bw : 0;
}

double bench_baseline_read_bps(const bench_results *r, const bench_baseline *b)
{
    if (b->probe_bytes && b->probe_s > 0) return (double)b->probe_bytes / b->probe_s;
    return b->device >= 0 ? r->devices[b->device].read_bps : 0;
}

bench_point *bench_add_point(bench_results *r)
{
    if (r->n_points == r->cap_points) {
        int cap = r->cap_points ? 2 * r->cap_points : 16; /* small: ASan runs see it grow */
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

/* One configuration of a measurement group: a cache and a selection. */
typedef struct timed_cfg {
    bench_cache *bc;
    pikv_select_params sel;
    int point;                    /* its point's index in the results (the array grows: no pointers
                                     are kept while points are added) */
    bench_point *pt;              /* that point while the group is timed */
    int ref;                      /* the group's configuration this one's speedup is over, or -1 */
    double *times;                /* [max_reps] attend time of each round */
    double *probe_bps;            /* [max_reps] the rate of the cold pass before it (0: none) */
    double *scratch;              /* [max_reps] */
    double total;
} timed_cfg;

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median_of(double *x, int n)
{
    qsort(x, (size_t)n, sizeof(double), cmp_double);
    return n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]);
}

/* Times the configurations of a group interleaved: each round runs one attend of
   every configuration not yet done (min reps and min time reached, or max reps),
   each after a cold pass (bench_cold_pass). So what the ratios compare -- dense
   against its sparse reads, f16 against int8/int4, every point against the read
   bandwidth -- is measured over the same seconds: on a shared machine the memory
   bandwidth moves by 1.5x and more within seconds (docs/performance.md). Each
   point keeps its best attend (with that attend's stats), the median, and its
   best probe pass. */
static int timed_group(bench_env *env, int32_t dev, timed_cfg *c, int n, const int32_t *seqs, const float *q,
                       const int32_t *experts, float *out)
{
    const bench_opts *o = env->o;
    const int32_t max_reps = o->max_reps < 1000 ? o->max_reps : 1000;
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) { /* warm-up: first-use costs */
        pikv_attend_batch b = {c[i].bc->batch, seqs, q, experts, out, NULL, &c[i].sel};
        pikv_status st = pikv_cache_attend(c[i].bc->cache, 0, &b);
        if (st != PIKV_OK) rc = lib_fail(env, "pikv_cache_attend", st);
        pikv_cache_stats cs;
        pikv_cache_get_stats(c[i].bc->cache, &cs);
        c[i].pt->bytes = cs.last_bytes_read; /* sizes the cold passes */
        c[i].times = rc ? NULL : malloc(3 * (size_t)max_reps * sizeof(double));
        c[i].probe_bps = c[i].times ? c[i].times + max_reps : NULL;
        c[i].scratch = c[i].times ? c[i].times + 2 * (size_t)max_reps : NULL;
        if (rc == 0 && !c[i].times) {
            fprintf(stderr, "pikv bench: out of host memory\n");
            rc = CLI_EXIT_FAIL;
        }
        c[i].total = 0;
        c[i].pt->seconds = INFINITY;
        c[i].pt->reps = 0;
        c[i].pt->probe_s = 0;
        c[i].pt->probe_bytes = 0;
    }
    for (int busy = 1; busy && rc == 0;) {
        busy = 0;
        for (int i = 0; i < n && rc == 0; i++) {
            bench_point *pt = c[i].pt;
            if (pt->reps >= max_reps || (pt->reps >= o->min_reps && c[i].total >= o->min_time)) continue;
            busy = 1;
            double probe_s = 0;
            uint64_t probe_bytes = 0;
            rc = bench_cold_pass(env, dev, pt->bytes, &probe_bytes, &probe_s);
            if (rc) break;
            if (probe_s > 0 && (pt->probe_bytes == 0 || (double)probe_bytes / probe_s > (double)pt->probe_bytes / pt->probe_s))
                pt->probe_s = probe_s, pt->probe_bytes = probe_bytes;
            pikv_attend_batch b = {c[i].bc->batch, seqs, q, experts, out, NULL, &c[i].sel};
            const double t0 = cli_now();
            pikv_status st = pikv_cache_attend(c[i].bc->cache, 0, &b);
            const double t = cli_now() - t0;
            if (st != PIKV_OK) {
                rc = lib_fail(env, "pikv_cache_attend", st);
                break;
            }
            c[i].probe_bps[pt->reps] = probe_s > 0 ? (double)probe_bytes / probe_s : 0;
            c[i].times[pt->reps++] = t;
            c[i].total += t;
            if (t < pt->seconds) {
                pt->seconds = t;
                pikv_cache_stats cs;
                pikv_cache_get_stats(c[i].bc->cache, &cs);
                pt->bytes = cs.last_bytes_read;
                pt->stored_bytes = cs.bytes_used;
                pt->plan_s = cs.last_plan_s;
                pt->score_s = cs.last_score_s;
                pt->topk_s = cs.last_topk_s;
                pt->attention_s = cs.last_attention_s;
                pt->merge_s = cs.last_merge_s;
            }
        }
    }
    /* paired figures first (they need the rounds in order), then the medians */
    for (int i = 0; i < n && rc == 0; i++) {
        bench_point *pt = c[i].pt;
        int m = 0;
        for (int32_t k = 0; k < pt->reps; k++)
            if (c[i].probe_bps[k] > 0 && c[i].times[k] > 0)
                c[i].scratch[m++] = (double)pt->bytes / c[i].times[k] / c[i].probe_bps[k];
        pt->paired_share = m > 0 ? median_of(c[i].scratch, m) : 0;
        const int r = c[i].ref;
        m = 0;
        for (int32_t k = 0; r >= 0 && k < pt->reps && k < c[r].pt->reps; k++) /* round k of both */
            if (c[i].times[k] > 0 && c[r].times[k] > 0) c[i].scratch[m++] = c[r].times[k] / c[i].times[k];
        pt->paired_speedup = m > 0 ? median_of(c[i].scratch, m) : 0;
    }
    for (int i = 0; i < n; i++) {
        bench_point *pt = c[i].pt;
        if (rc == 0 && pt->reps > 0) pt->median_s = median_of(c[i].times, pt->reps);
        free(c[i].times);
        c[i].times = NULL;
    }
    return rc;
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

/* The contexts of a batch under --max-kv, ascending: the caches of the dtypes measured
   together (one per dtype, all live at once) hold at most that much KV. */
static int contexts_of(const bench_opts *o, int32_t batch, const pikv_dtype *dtypes, int n_dtypes, int64_t *out)
{
    const int64_t *list = batch == 1 ? o->contexts : o->batch_contexts;
    const int n = batch == 1 ? o->n_contexts : o->n_batch_contexts;
    double per_token = 0;
    for (int d = 0; d < n_dtypes; d++) per_token += kv_bytes_per_token(o, dtypes[d]);
    int m = 0;
    for (int i = 0; i < n; i++)
        if ((double)batch * (double)list[i] * per_token <= (double)o->max_kv_bytes) out[m++] = list[i];
    for (int i = 1; i < m; i++)
        for (int j = i; j > 0 && out[j - 1] > out[j]; j--) {
            const int64_t x = out[j];
            out[j] = out[j - 1];
            out[j - 1] = x;
        }
    return m;
}

/* One cache of a batch sweep and where its sweep stands. */
typedef struct sweep_cache {
    pikv_dtype dtype;
    int64_t ctxs[BENCH_MAX_LIST];
    int n_ctx;
    bench_cache bc;
    int created, stopped;
    int64_t filled;
    double fill_s;
    int dense;                    /* this context's dense point (index in the results), or -1 */
} sweep_cache;

/* Dense, quantized and sparse points of one (device, batch) for each dtype: one
   cache per dtype, their sequences growing together through the contexts in
   ascending order, and at each context every dtype's dense and sparse points timed
   as one interleaved group. A dtype too slow for its next context (its last dense
   attend took longer than --max-attend-s, or filling to it would take longer than
   20 times that) stops there, and says so. */
static int sweep_batch(bench_env *env, int32_t dev, const pikv_dtype *dtypes, int n_dtypes, int32_t batch,
                       int32_t n_experts)
{
    const bench_opts *o = env->o;
    bench_device *bd = &env->r->devices[dev];
    sweep_cache sc[4];
    int64_t all[4 * BENCH_MAX_LIST];
    int n_all = 0, rc = 0;
    for (int d = 0; d < n_dtypes; d++) {
        memset(&sc[d], 0, sizeof sc[d]);
        sc[d].dtype = dtypes[d];
        sc[d].n_ctx = contexts_of(o, batch, dtypes, n_dtypes, sc[d].ctxs);
        for (int c = 0; c < sc[d].n_ctx; c++) {
            int seen = 0;
            for (int j = 0; j < n_all; j++) seen |= all[j] == sc[d].ctxs[c];
            if (!seen) all[n_all++] = sc[d].ctxs[c];
        }
    }
    for (int i = 1; i < n_all; i++)
        for (int j = i; j > 0 && all[j - 1] > all[j]; j--) {
            const int64_t x = all[j];
            all[j] = all[j - 1];
            all[j - 1] = x;
        }
    for (int d = 0; d < n_dtypes && rc == 0; d++) {
        if (sc[d].n_ctx == 0) continue;
        rc = cache_create(env, dev, sc[d].dtype, batch, sc[d].ctxs[sc[d].n_ctx - 1], n_experts, &sc[d].bc);
        sc[d].created = rc == 0;
    }
    const int32_t ept = n_dtypes > 0 && sc[0].created ? sc[0].bc.ept : 1;
    const size_t qn = (size_t)batch * (size_t)o->q_heads * (size_t)o->head_dim;
    float *q = malloc(qn * sizeof(float)), *out = malloc(qn * sizeof(float));
    int32_t *experts = calloc((size_t)batch * (size_t)ept, sizeof(int32_t));
    int32_t *seqs = calloc((size_t)batch, sizeof(int32_t));
    timed_cfg *cfg = calloc((size_t)n_dtypes * (size_t)(1 + BENCH_MAX_LIST), sizeof *cfg);
    if (rc == 0 && (!q || !out || !experts || !seqs || !cfg)) {
        fprintf(stderr, "pikv bench: out of host memory\n");
        rc = CLI_EXIT_FAIL;
    }
    for (int32_t i = 0; i < batch && seqs; i++) seqs[i] = i;
    if (rc == 0) make_queries(env, batch, n_experts, ept, q, experts);
    for (int c = 0; c < n_all && rc == 0; c++) {
        const int64_t n = all[c];
        int n_cfg = 0;
        for (int d = 0; d < n_dtypes && rc == 0; d++) {
            sweep_cache *w = &sc[d];
            w->dense = -1;
            int has = 0;
            for (int j = 0; j < w->n_ctx; j++) has |= w->ctxs[j] == n;
            if (!has || w->stopped) continue;
            const double per_token = w->filled ? w->fill_s / ((double)batch * (double)w->filled) : 0;
            if (per_token * (double)batch * (double)(n - w->filled) > 20 * o->max_attend_s) {
                if (!o->quiet)
                    fprintf(stderr, "  %s: %s batch %d: stopping before %lld tokens (filling would take %.0f s)\n",
                            bd->info.name, bench_dtype_name(w->dtype), batch, (long long)n,
                            per_token * (double)batch * (double)(n - w->filled));
                w->stopped = 1;
                continue;
            }
            if (!o->quiet)
                fprintf(stderr, "  %s: %s%s, batch %d, %lld tokens\n", bd->info.name, bench_dtype_name(w->dtype),
                        n_experts > 1 ? " (experts)" : "", batch, (long long)n);
            double t = 0;
            rc = cache_fill(env, &w->bc, w->filled, n, &t);
            if (rc) break;
            w->fill_s += t;
            w->filled = n;
            pikv_cache_params cp;
            pikv_cache_get_params(w->bc.cache, &cp);
            /* dense: every page (the reference of the sparse points) */
            bench_point *pt = bench_add_point(env->r);
            if (!pt) {
                rc = CLI_EXIT_FAIL;
                break;
            }
            *pt = (bench_point){.device = dev, .kind = n_experts > 1 ? "experts-dense" : "dense", .dtype = w->dtype,
                                .batch = batch, .context = n, .n_experts = n_experts};
            pt->append_s_per_token = w->fill_s / ((double)batch * (double)w->filled);
            w->dense = env->r->n_points - 1;
            const int dense_cfg = n_cfg;
            cfg[n_cfg] = (timed_cfg){.bc = &w->bc, .sel = cp.select, .point = w->dense, .ref = -1};
            cfg[n_cfg++].sel.mode = PIKV_SELECT_ALL;
            const int n_sparse = n_experts > 1 ? o->n_expert_ks : o->n_quest;
            for (int k = 0; k < n_sparse; k++) {
                pikv_select_params sel = cp.select;
                int32_t param;
                if (n_experts > 1) {
                    if (o->expert_ks[k] >= n_experts) continue;
                    sel.mode = PIKV_SELECT_EXPERTS;
                    sel.experts_top_k = param = o->expert_ks[k];
                } else {
                    const int64_t budget = n / o->quest_ratios[k];
                    if (budget < sel.sink_tokens + sel.recent_tokens + o->page_size) continue;
                    sel.mode = PIKV_SELECT_QUEST;
                    sel.token_budget = (int32_t)budget;
                    param = o->quest_ratios[k];
                }
                pt = bench_add_point(env->r);
                if (!pt) {
                    rc = CLI_EXIT_FAIL;
                    break;
                }
                *pt = (bench_point){.device = dev, .kind = n_experts > 1 ? "experts" : "quest", .dtype = w->dtype,
                                    .batch = batch, .context = n, .param = param, .n_experts = n_experts};
                cfg[n_cfg++] = (timed_cfg){.bc = &w->bc, .sel = sel, .point = env->r->n_points - 1, .ref = dense_cfg};
            }
        }
        for (int i = 0; i < n_cfg; i++) cfg[i].pt = &env->r->points[cfg[i].point];
        /* the other dtypes' dense points are paired with the f16 dense point of the group */
        int f16_cfg = -1;
        for (int i = 0; i < n_cfg; i++)
            if (cfg[i].ref < 0 && cfg[i].pt->dtype == PIKV_DTYPE_F16) f16_cfg = i;
        for (int i = 0; i < n_cfg; i++)
            if (cfg[i].ref < 0 && cfg[i].pt->dtype != PIKV_DTYPE_F16) cfg[i].ref = f16_cfg;
        if (rc == 0 && n_cfg > 0) rc = timed_group(env, dev, cfg, n_cfg, seqs, q, experts, out);
        for (int d = 0; d < n_dtypes && rc == 0; d++) {
            sweep_cache *w = &sc[d];
            const bench_point *dp = w->dense >= 0 ? &env->r->points[w->dense] : NULL;
            if (!dp || dp->seconds <= o->max_attend_s || n >= w->ctxs[w->n_ctx - 1]) continue;
            if (!o->quiet)
                fprintf(stderr, "  %s: %s batch %d: stopping after %lld tokens (an attend took %.2f s)\n",
                        bd->info.name, bench_dtype_name(w->dtype), batch, (long long)n, dp->seconds);
            w->stopped = 1;
        }
    }
    for (int d = 0; d < n_dtypes; d++)
        if (sc[d].created) pikv_cache_free(sc[d].bc.cache);
    free(cfg);
    free(q);
    free(out);
    free(experts);
    free(seqs);
    return rc;
}

/* Table order: a device's points by sweep (dtype sweeps, then the experts'), dtype,
   batch, context, then dense before its sparse points (the sweeps interleave them). */
static int point_rank(const bench_opts *o, const bench_point *p, int64_t *key)
{
    int di = 0, bi = 0;
    for (int i = 0; i < o->n_dtypes; i++)
        if (o->dtypes[i] == p->dtype) di = i;
    for (int i = 0; i < o->n_batches; i++)
        if (o->batches[i] == p->batch) bi = i;
    key[0] = p->n_experts > 1;
    key[1] = di;
    key[2] = bi;
    key[3] = p->context;
    key[4] = strcmp(p->kind, "dense") && strcmp(p->kind, "experts-dense") ? 1 : 0;
    key[5] = p->param;
    return 6;
}

static int point_before(const bench_opts *o, const bench_point *a, const bench_point *b)
{
    int64_t ka[6], kb[6];
    const int n = point_rank(o, a, ka);
    point_rank(o, b, kb);
    for (int i = 0; i < n; i++)
        if (ka[i] != kb[i]) return ka[i] < kb[i];
    return 0;
}

int bench_device_sweeps(bench_env *env, int32_t dev)
{
    const bench_opts *o = env->o;
    const int first = env->r->n_points;
    int rc = 0;
    for (int b = 0; b < o->n_batches && rc == 0; b++)
        rc = sweep_batch(env, dev, o->dtypes, o->n_dtypes, o->batches[b], 1);
    /* experts selection: an MoE cache (E experts, top-2 routing, expert placement), f16 */
    const pikv_dtype f16 = PIKV_DTYPE_F16;
    if (rc == 0 && o->n_experts > 1 && o->n_expert_ks > 0)
        for (int b = 0; b < o->n_batches && rc == 0; b++) rc = sweep_batch(env, dev, &f16, 1, o->batches[b], o->n_experts);
    /* stable insertion sort of this device's points into table order */
    bench_point *p = env->r->points + first;
    const int n = env->r->n_points - first;
    for (int i = 1; i < n; i++)
        for (int j = i; j > 0 && point_before(o, &p[j], &p[j - 1]); j--) {
            const bench_point x = p[j];
            p[j] = p[j - 1];
            p[j - 1] = x;
        }
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
