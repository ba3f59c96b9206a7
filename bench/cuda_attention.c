/*
 * pikv_bench_cuda_attention: dense decode attention on a CUDA device against
 * that device's own read roofline, measured in the same run.
 *
 *   roofline   the best rate of a streaming 16-byte read-and-reduce over a
 *              buffer far larger than L2 (several grid sizes tried)
 *   attention  one decode query per step over a cache holding N tokens of one
 *              sequence (f16 pages by default), through pikv_cache_attend; the
 *              attention kernels alone are timed with CUDA events (the "run",
 *              as opposed to the host "plan" and the transfers), and the whole
 *              call by wall clock. Achieved bandwidth = K and V bytes / time.
 *
 * White-box: turns on the CUDA backend's kernel timing (backends/cuda/cuda-impl.h).
 * Exits 77 when there is no CUDA device, 1 on a library error.
 *
 *   pikv_bench_cuda_attention [--contexts 4096,32768,131072] [--dtype f16|f32|int8|int4]
 *                             [--q-heads 32] [--kv-heads 8] [--head-dim 128] [--page-size 16]
 *                             [--iters 50] [--json]
 */
#define _POSIX_C_SOURCE 200809L

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../backends/cuda/cuda-impl.h"

typedef struct options {
    int64_t contexts[16];
    int n_contexts;
    pikv_dtype dtype;
    int32_t q_heads, kv_heads, head_dim, page_size, iters;
    int json;
} options;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint64_t g_rng = 0x243f6a8885a308d3ull;
static float frand(void)
{
    g_rng ^= g_rng << 13;
    g_rng ^= g_rng >> 7;
    g_rng ^= g_rng << 17;
    return (float)((g_rng >> 40) & 0xffffff) / 16777216.0f * 2.0f - 1.0f;
}

static int usage(void)
{
    fprintf(stderr, "usage: pikv_bench_cuda_attention [--contexts N,N,...] [--dtype f16|f32|int8|int4] "
                    "[--q-heads N] [--kv-heads N] [--head-dim N] [--page-size N] [--iters N] [--json]\n");
    return 2;
}

static int parse(int argc, char **argv, options *o)
{
    o->contexts[0] = 4096;
    o->contexts[1] = 32768;
    o->contexts[2] = 131072;
    o->n_contexts = 3;
    o->dtype = PIKV_DTYPE_F16;
    o->q_heads = 32;
    o->kv_heads = 8;
    o->head_dim = 128;
    o->page_size = 16;
    o->iters = 50;
    o->json = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--json")) {
            o->json = 1;
            continue;
        }
        if (!v) return usage();
        i++;
        if (!strcmp(a, "--contexts")) {
            o->n_contexts = 0;
            for (char *s = (char *)v; *s && o->n_contexts < 16;) {
                o->contexts[o->n_contexts++] = strtoll(s, &s, 10);
                if (*s == ',') s++;
            }
        } else if (!strcmp(a, "--dtype")) {
            o->dtype = !strcmp(v, "f32") ? PIKV_DTYPE_F32 : !strcmp(v, "int8") ? PIKV_DTYPE_INT8
                     : !strcmp(v, "int4") ? PIKV_DTYPE_INT4 : PIKV_DTYPE_F16;
        } else if (!strcmp(a, "--q-heads")) {
            o->q_heads = atoi(v);
        } else if (!strcmp(a, "--kv-heads")) {
            o->kv_heads = atoi(v);
        } else if (!strcmp(a, "--head-dim")) {
            o->head_dim = atoi(v);
        } else if (!strcmp(a, "--page-size")) {
            o->page_size = atoi(v);
        } else if (!strcmp(a, "--iters")) {
            o->iters = atoi(v);
        } else {
            return usage();
        }
    }
    return 0;
}

/* The best read rate (bytes/s) of the probe over `bytes` of device memory. */
static double measure_read_bandwidth(pikv_device *dev, size_t bytes)
{
    pikv_cuda_device *cd = pikv_cuda_dev(dev);
    void *buf = NULL;
    unsigned *sink = NULL;
    if (cudaMalloc(&buf, bytes) != cudaSuccess || cudaMalloc((void **)&sink, sizeof *sink) != cudaSuccess) {
        cudaFree(buf);
        return 0.0;
    }
    cudaMemset(buf, 1, bytes);
    double best = 0.0;
    const int grids[] = {1, 2, 4, 8, 16};
    for (size_t g = 0; g < sizeof grids / sizeof grids[0]; g++) {
        const int blocks = grids[g] * cd->sm_count * 4;
        for (int rep = 0; rep < 6; rep++) {
            cudaEventRecord(cd->time_begin, cd->stream);
            pikv_cuda_read_probe(buf, bytes, sink, blocks, cd->stream);
            cudaEventRecord(cd->time_end, cd->stream);
            cudaEventSynchronize(cd->time_end);
            float ms = 0.0f;
            cudaEventElapsedTime(&ms, cd->time_begin, cd->time_end);
            if (rep > 0 && ms > 0.0f && bytes / (ms * 1e-3) > best) best = (double)bytes / (ms * 1e-3);
        }
    }
    cudaFree(buf);
    cudaFree(sink);
    return best;
}

static int cmp_double(const void *a, const void *b)
{
    const double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    options o;
    if (parse(argc, argv, &o)) return 2;
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "cuda";
    pikv_context *ctx = NULL;
    if (pikv_context_create(&cp, &ctx) != PIKV_OK) {
        fprintf(stderr, "pikv_context_create failed\n");
        return 1;
    }
    int32_t cuda_index = -1;
    for (int32_t i = 0; i < pikv_device_count(ctx) && cuda_index < 0; i++) {
        pikv_device_info info;
        if (pikv_device_get_info(ctx, i, &info) == PIKV_OK && info.backend == PIKV_BACKEND_CUDA) cuda_index = i;
    }
    if (cuda_index < 0) {
        printf("no CUDA device: nothing to measure\n");
        pikv_context_free(ctx);
        return 77;
    }
    pikv_device *dev = ctx->devices[cuda_index];
    pikv_cuda_device *cd = pikv_cuda_dev(dev);
    int prev;
    pikv_cuda_enter(dev, &prev);
    const double read_bw = measure_read_bandwidth(dev, (size_t)2 << 30);
    const char *dt_name[] = {"f32", "f16", "int8", "int4"};
    if (!o.json) {
        printf("device: %s (%s)\n", dev->info.name, dev->info.description);
        printf("measured read bandwidth: %.1f GB/s (16-byte streaming reads of 2 GiB)\n", read_bw / 1e9);
        printf("dense decode attention, %s pages, q_heads %d, kv_heads %d, head_dim %d, page %d, batch 1\n",
               dt_name[o.dtype], o.q_heads, o.kv_heads, o.head_dim, o.page_size);
        printf("%10s %12s %12s %10s %12s %12s\n", "tokens", "kernel_us", "kernel_GB/s", "of_roof", "call_us",
               "call_GB/s");
    } else {
        printf("{\"device\": \"%s\", \"read_bandwidth_GBps\": %.3f, \"dtype\": \"%s\", \"results\": [", dev->info.description,
               read_bw / 1e9, dt_name[o.dtype]);
    }
    int rc = 0;
    double ratio_32k = -1.0;
    for (int ci = 0; ci < o.n_contexts && rc == 0; ci++) {
        const int64_t n = o.contexts[ci];
        pikv_cache_params p = pikv_cache_default_params();
        p.n_layers = 1;
        p.n_q_heads = o.q_heads;
        p.n_kv_heads = o.kv_heads;
        p.head_dim = o.head_dim;
        p.n_experts = 1;
        p.experts_per_token = 1;
        p.page_size = o.page_size;
        p.dtype = o.dtype;
        p.capacity_tokens = n + o.page_size;
        p.max_sequences = 1;
        p.devices = &cuda_index;
        p.n_devices = 1;
        pikv_cache *cache = NULL;
        if (pikv_cache_create(ctx, &p, &cache) != PIKV_OK || pikv_seq_add(cache, 0) != PIKV_OK) {
            fprintf(stderr, "cache of %lld tokens: %s\n", (long long)n, pikv_context_last_error(ctx));
            rc = 1;
            break;
        }
        const int32_t chunk = 4096;
        const size_t row = (size_t)o.kv_heads * (size_t)o.head_dim;
        float *k = malloc((size_t)chunk * row * sizeof(float)), *v = malloc((size_t)chunk * row * sizeof(float));
        float *q = malloc((size_t)o.q_heads * o.head_dim * sizeof(float));
        float *out = malloc((size_t)o.q_heads * o.head_dim * sizeof(float));
        for (size_t i = 0; i < (size_t)chunk * row; i++) {
            k[i] = frand();
            v[i] = frand();
        }
        for (int i = 0; i < o.q_heads * o.head_dim; i++) q[i] = frand();
        for (int64_t t = 0; t < n && rc == 0; t += chunk) {
            const int32_t m = (int32_t)(n - t < chunk ? n - t : chunk);
            if (pikv_cache_append(cache, 0, 0, m, k, v, NULL, NULL) != PIKV_OK) {
                fprintf(stderr, "append: %s\n", pikv_context_last_error(ctx));
                rc = 1;
            }
        }
        const int32_t seq = 0;
        pikv_attend_batch b = {.n_queries = 1, .seq_ids = &seq, .q = q, .out = out};
        double *kern = malloc((size_t)o.iters * sizeof(double)), *call = malloc((size_t)o.iters * sizeof(double));
        cd->timing = true;
        for (int it = -3; it < o.iters && rc == 0; it++) { /* three warm-up calls */
            const double t0 = now_s();
            if (pikv_cache_attend(cache, 0, &b) != PIKV_OK) {
                fprintf(stderr, "attend: %s\n", pikv_context_last_error(ctx));
                rc = 1;
                break;
            }
            if (it >= 0) {
                call[it] = now_s() - t0;
                kern[it] = cd->last_attention_ms * 1e-3;
            }
        }
        cd->timing = false;
        if (rc == 0) {
            qsort(kern, (size_t)o.iters, sizeof *kern, cmp_double);
            qsort(call, (size_t)o.iters, sizeof *call, cmp_double);
            const double tk = kern[o.iters / 2], tc = call[o.iters / 2]; /* medians */
            pikv_cache_stats st;
            pikv_cache_get_stats(cache, &st);
            const double bytes = (double)st.last_bytes_read;
            const double share = read_bw > 0 ? bytes / tk / read_bw : 0.0;
            if (n == 32768) ratio_32k = share;
            if (!o.json)
                printf("%10lld %12.1f %12.1f %9.1f%% %12.1f %12.1f\n", (long long)n, tk * 1e6, bytes / tk / 1e9,
                       100.0 * share, tc * 1e6, bytes / tc / 1e9);
            else
                printf("%s{\"tokens\": %lld, \"kv_bytes\": %.0f, \"kernel_s\": %.9f, \"call_s\": %.9f, "
                       "\"share_of_read_bandwidth\": %.4f}",
                       ci ? ", " : "", (long long)n, bytes, tk, tc, share);
        }
        free(kern);
        free(call);
        free(k);
        free(v);
        free(q);
        free(out);
        pikv_cache_free(cache);
    }
    if (o.json) printf("]}\n");
    else if (ratio_32k >= 0)
        printf("dense %s decode at 32K tokens: %.1f%% of the measured read bandwidth (target: at least 85%%)\n",
               dt_name[o.dtype], 100.0 * ratio_32k);
    pikv_cuda_leave(prev);
    pikv_context_free(ctx);
    return rc;
}
