/* The baselines, run on the same data as the caches:
 *  - "c-contiguous-f32": what an engine without a cache manager runs: K and V of
 *    every sequence in one contiguous f32 array [batch][kv_heads][context]
 *    [head_dim], and a straightforward decode attention over it (scores, softmax,
 *    weighted sum of values), written so the compiler vectorizes the dot products
 *    (eight independent partial sums) and threaded over (query, KV head) like the
 *    library. Each K and V row is read once for the query heads that share it.
 *  - the vendor library where a GPU is present (cuBLAS batched GEMV, built with
 *    the CUDA backend: bench/baseline_cublas.cu). */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench.h"
#include "cli.h"

#ifdef PIKV_BENCH_HAVE_CUBLAS
#include "baseline_cublas.h"
#endif

typedef struct base_job {
    const float *k, *v, *q;
    float *out;
    int32_t batch, kvh, group, hd;
    int64_t ctx;
    float scale;
    atomic_int next;
    float *scores;                /* per thread [group][ctx] */
    int32_t n_threads;
} base_job;

typedef struct base_thread {
    base_job *job;
    int32_t index;
} base_thread;

static float dot8(const float *a, const float *b, int32_t n)
{
    float acc[8] = {0};
    int32_t d = 0;
    for (; d + 8 <= n; d += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[d + j] * b[d + j];
    float s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (; d < n; d++) s += a[d] * b[d];
    return s;
}

static void *base_worker(void *arg)
{
    base_thread *th = arg;
    base_job *j = th->job;
    const int32_t G = j->group, hd = j->hd;
    float *sc = j->scores + (size_t)th->index * (size_t)G * (size_t)j->ctx;
    for (;;) {
        const int task = atomic_fetch_add(&j->next, 1);
        if (task >= j->batch * j->kvh) break;
        const int32_t b = task / j->kvh, g = task % j->kvh;
        const size_t base = ((size_t)b * (size_t)j->kvh + (size_t)g) * (size_t)j->ctx * (size_t)hd;
        const float *K = j->k + base, *V = j->v + base;
        const float *q = j->q + ((size_t)b * (size_t)j->kvh * (size_t)G + (size_t)g * (size_t)G) * (size_t)hd;
        float *out = j->out + ((size_t)b * (size_t)j->kvh * (size_t)G + (size_t)g * (size_t)G) * (size_t)hd;
        for (int64_t t = 0; t < j->ctx; t++)
            for (int32_t h = 0; h < G; h++)
                sc[(size_t)h * (size_t)j->ctx + (size_t)t] = dot8(q + (size_t)h * (size_t)hd, K + (size_t)t * (size_t)hd, hd) * j->scale;
        float sum[64];
        for (int32_t h = 0; h < G; h++) {
            float *s = sc + (size_t)h * (size_t)j->ctx, m = -INFINITY;
            for (int64_t t = 0; t < j->ctx; t++) m = s[t] > m ? s[t] : m;
            float z = 0;
            for (int64_t t = 0; t < j->ctx; t++) z += (s[t] = expf(s[t] - m));
            sum[h] = z;
            memset(out + (size_t)h * (size_t)hd, 0, (size_t)hd * sizeof(float));
        }
        for (int64_t t = 0; t < j->ctx; t++) {
            const float *vr = V + (size_t)t * (size_t)hd;
            for (int32_t h = 0; h < G; h++) {
                const float w = sc[(size_t)h * (size_t)j->ctx + (size_t)t];
                float *o = out + (size_t)h * (size_t)hd;
                for (int32_t d = 0; d < hd; d++) o[d] += w * vr[d];
            }
        }
        for (int32_t h = 0; h < G; h++)
            for (int32_t d = 0; d < hd; d++) out[(size_t)h * (size_t)hd + (size_t)d] /= sum[h];
    }
    return NULL;
}

static void base_run(base_job *j)
{
    atomic_store(&j->next, 0);
    pthread_t tid[256];
    base_thread th[256];
    int started[256] = {0};
    /* a thread that fails to start leaves its tasks to the others (shared counter) */
    for (int32_t i = 1; i < j->n_threads; i++) {
        th[i] = (base_thread){j, i};
        started[i] = pthread_create(&tid[i], NULL, base_worker, &th[i]) == 0;
    }
    th[0] = (base_thread){j, 0};
    base_worker(&th[0]);
    for (int32_t i = 1; i < j->n_threads; i++)
        if (started[i]) pthread_join(tid[i], NULL);
}

int bench_baseline_c(bench_env *env, int32_t dev, int32_t batch, int64_t context)
{
    const bench_opts *o = env->o;
    bench_results *r = env->r;
    if (r->n_baselines >= (int)(sizeof r->baselines / sizeof r->baselines[0])) return 0;
    const int32_t kvh = o->kv_heads, hd = o->head_dim, G = o->q_heads / o->kv_heads;
    const size_t row = (size_t)kvh * (size_t)hd;
    const size_t n = (size_t)batch * row * (size_t)context;
    if ((double)n * 8.0 > (double)o->max_kv_bytes || G > 64) return 0;
    int32_t threads = o->threads > 0 ? o->threads : (int32_t)sysconf(_SC_NPROCESSORS_ONLN);
    if (threads < 1) threads = 1;
    if (threads > 256) threads = 256;
    base_job j = {.batch = batch, .kvh = kvh, .group = G, .hd = hd, .ctx = context,
                  .scale = 1.0f / sqrtf((float)hd), .n_threads = threads};
    float *k = malloc(n * sizeof(float)), *v = malloc(n * sizeof(float));
    const size_t qn = (size_t)batch * (size_t)o->q_heads * (size_t)hd;
    float *q = malloc(qn * sizeof(float)), *out = malloc(qn * sizeof(float));
    float *scores = malloc((size_t)threads * (size_t)G * (size_t)context * sizeof(float));
    if (!k || !v || !q || !out || !scores) {
        free(k), free(v), free(q), free(out), free(scores);
        fprintf(stderr, "pikv bench: baseline: out of host memory for %lld tokens\n", (long long)context);
        return CLI_EXIT_FAIL;
    }
    /* the cache's layout of the same tokens: [batch][kv_heads][context][head_dim] */
    for (int32_t b = 0; b < batch; b++)
        for (int64_t t = 0; t < context; t++) {
            const float *ks = bench_pool_k(b, t), *vs = bench_pool_v(b, t);
            for (int32_t g = 0; g < kvh; g++) {
                const size_t at = (((size_t)b * (size_t)kvh + (size_t)g) * (size_t)context + (size_t)t) * (size_t)hd;
                memcpy(k + at, ks + (size_t)g * (size_t)hd, (size_t)hd * sizeof(float));
                memcpy(v + at, vs + (size_t)g * (size_t)hd, (size_t)hd * sizeof(float));
            }
        }
    for (size_t i = 0; i < qn; i++) q[i] = (float)((i * 2654435761u) % 1000) / 500.0f - 1.0f;
    j.k = k, j.v = v, j.q = q, j.out = out, j.scores = scores;
    base_run(&j); /* warm-up */
    double best = INFINITY, total = 0, probe_s = 0;
    uint64_t probe_bytes = 0;
    int rc = 0;
    for (int rep = 0; rep < o->max_reps && (rep < o->min_reps || total < o->min_time) && rc == 0; rep++) {
        double ps = 0;
        uint64_t pb = 0;
        rc = bench_cold_pass(env, dev, (uint64_t)n * 2 * sizeof(float), &pb, &ps);
        if (ps > 0 && (probe_bytes == 0 || (double)pb / ps > (double)probe_bytes / probe_s)) probe_s = ps, probe_bytes = pb;
        const double t0 = cli_now();
        base_run(&j);
        const double t = cli_now() - t0;
        total += t;
        best = t < best ? t : best;
    }
    bench_baseline *bl = &r->baselines[r->n_baselines++];
    memset(bl, 0, sizeof *bl);
    bl->name = "c-contiguous-f32";
    bl->device = dev;
    bl->batch = batch;
    bl->context = context;
    bl->seconds = best;
    bl->bytes = (uint64_t)n * 2 * sizeof(float);
    bl->probe_s = probe_s;
    bl->probe_bytes = probe_bytes;
    free(k), free(v), free(q), free(out), free(scores);
    return rc;
}

int bench_baseline_vendor(bench_env *env, int32_t dev, int32_t batch, int64_t context)
{
    bench_results *r = env->r;
    if (r->devices[dev].info.backend != PIKV_BACKEND_CUDA) return 0;
    if (r->n_baselines >= (int)(sizeof r->baselines / sizeof r->baselines[0])) return 0;
#ifdef PIKV_BENCH_HAVE_CUBLAS
    const bench_opts *o = env->o;
    bench_baseline *bl = &r->baselines[r->n_baselines];
    memset(bl, 0, sizeof *bl);
    bl->name = "cublas-f16";
    bl->device = dev;
    bl->batch = batch;
    bl->context = context;
    bl->bytes = (uint64_t)batch * (uint64_t)context * (uint64_t)o->kv_heads * (uint64_t)o->head_dim * 2 * 2;
    const int rc = pikv_bench_cublas_attention(batch, o->q_heads, o->kv_heads, o->head_dim, context,
                                               o->max_reps < 20 ? o->max_reps : 20, &bl->seconds, bl->error,
                                               sizeof bl->error);
    if (rc == 77) return 0;
    if (rc != 0) bl->seconds = 0; /* kept with its error message */
    r->n_baselines++;
#else
    (void)batch;
    (void)context;
#endif
    return 0;
}
