/*
 * GGUF reader figures (docs/model.md): open + validate time of a model file, and matvec
 * throughput (weight bytes per second) of gguf_matvec with 1 and 2 threads: one Q4_1 matrix
 * repeated (cache-resident) and a sweep over every Q4_1 matrix of the model (about one token's
 * weight traffic of the dense forward pass), and gguf_matmul of 16 vectors (prefill). Times are
 * the best of 5 runs.
 * Usage: pikv_bench_gguf MODEL.gguf [MATRIX_NAME]
 */
#if !defined(_POSIX_C_SOURCE) || _POSIX_C_SOURCE < 200809L
#undef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif
#include "gguf.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL.gguf [MATRIX_NAME]\n", argv[0]);
        return 2;
    }
    const char *mname = argc > 2 ? argv[2] : "blk.0.ffn_down.weight";
    gguf_file *g = NULL;
    gguf_error e;
    double best = 1e9;
    for (int i = 0; i < 5; i++) {
        const double t0 = now_s();
        gguf_status s = gguf_open(argv[1], &g, &e);
        const double t = now_s() - t0;
        if (s != GGUF_OK) {
            fprintf(stderr, "%s: %s: %s\n", argv[1], gguf_status_name(s), e.message);
            return 1;
        }
        best = t < best ? t : best;
        if (i < 4)
            gguf_close(g);
    }
    printf("open + validate: %.3f ms (best of 5; %llu bytes, %llu tensors)\n", 1e3 * best,
           (unsigned long long)gguf_file_size(g), (unsigned long long)gguf_tensor_count(g));
    const gguf_tensor *w = gguf_find_tensor(g, mname);
    if (!w) {
        fprintf(stderr, "no tensor %s\n", mname);
        return 1;
    }
    float *x = (float *)malloc(8192 * sizeof(float)), *y = (float *)malloc(65536 * sizeof(float));
    if (!x || !y || w->ne[0] > 8192 || w->ne[1] > 65536)
        return 1;
    for (int j = 0; j < 8192; j++)
        x[j] = (float)((j * 7919 % 1000) / 500.0 - 1.0);
    for (int th = 1; th <= 2; th++) {
        const int reps = 200;
        gguf_matvec(w, x, y, th);
        double t = 1e9;
        for (int trial = 0; trial < 5; trial++) { /* best of 5: the box may be shared */
            const double t0 = now_s();
            for (int r = 0; r < reps; r++)
                gguf_matvec(w, x, y, th);
            const double tt = (now_s() - t0) / reps;
            t = tt < t ? tt : t;
        }
        printf("%s (%s %lld x %lld, %llu bytes), %d thread(s): %.1f us, %.2f GB/s\n", mname,
               gguf_type_name(w->type), (long long)w->ne[0], (long long)w->ne[1],
               (unsigned long long)w->n_bytes, th, 1e6 * t, (double)w->n_bytes / t / 1e9);
    }
    /* prefill: 16 vectors at once (each block dequantized once per 8 vectors) */
    float *X = (float *)malloc(16 * (size_t)w->ne[0] * sizeof(float));
    float *Y = (float *)malloc(16 * (size_t)w->ne[1] * sizeof(float));
    if (!X || !Y)
        return 1;
    for (size_t i = 0; i < 16 * (size_t)w->ne[0]; i++)
        X[i] = (float)((i * 7919 % 1000) / 500.0 - 1.0);
    for (int th = 1; th <= 2; th++) {
        double t = 1e9;
        for (int trial = 0; trial < 5; trial++) {
            const double t0 = now_s();
            for (int r = 0; r < 20; r++)
                gguf_matmul(w, X, 16, Y, th);
            const double tt = (now_s() - t0) / 20;
            t = tt < t ? tt : t;
        }
        printf("%s, gguf_matmul of 16 vectors, %d thread(s): %.1f us, %.1f us per vector (%.2f GFLOP/s)\n", mname,
               th, 1e6 * t, 1e6 * t / 16, 2.0 * 16 * (double)w->n_elements / t / 1e9);
    }
    free(X);
    free(Y);
    for (int th = 1; th <= 2; th++) {
        double bytes = 0, tsum = 1e9;
        int n = 0;
        for (int pass = 0; pass < 6; pass++) { /* a warm-up pass, then the best of 5 */
            const double t0 = now_s();
            for (uint64_t i = 0; i < gguf_tensor_count(g); i++) {
                const gguf_tensor *t = gguf_tensor_at(g, i);
                if (t->type != GGUF_T_Q4_1 || t->ne[0] > 8192 || t->ne[1] > 65536)
                    continue;
                gguf_matvec(t, x, y, th);
                if (pass == 0) {
                    bytes += (double)t->n_bytes;
                    n++;
                }
            }
            const double tp = now_s() - t0;
            if (pass > 0 && tp < tsum)
                tsum = tp;
        }
        printf("sweep of all %d Q4_1 matrices (%.1f MB), %d thread(s): %.1f ms, %.2f GB/s\n", n, bytes / 1e6, th,
               1e3 * tsum, bytes / tsum / 1e9);
    }
    /* the same sweep through a persistent pool (no thread creation per product) */
    for (int th = 1; th <= 2; th++) {
        gguf_pool *pool = NULL;
        if (gguf_pool_create(th, &pool) != GGUF_OK)
            return 1;
        double bytes = 0, tsum = 1e9;
        for (int pass = 0; pass < 6; pass++) {
            const double t0 = now_s();
            for (uint64_t i = 0; i < gguf_tensor_count(g); i++) {
                const gguf_tensor *t = gguf_tensor_at(g, i);
                if (t->type != GGUF_T_Q4_1 || t->ne[0] > 8192 || t->ne[1] > 65536)
                    continue;
                gguf_pool_matmul(pool, t, x, 1, y);
                if (pass == 0)
                    bytes += (double)t->n_bytes;
            }
            const double tp = now_s() - t0;
            if (pass > 0 && tp < tsum)
                tsum = tp;
        }
        printf("the same sweep through a gguf_pool of %d thread(s): %.1f ms, %.2f GB/s\n", th, 1e3 * tsum,
               bytes / tsum / 1e9);
        gguf_pool_destroy(pool);
    }
    free(x);
    free(y);
    gguf_close(g);
    return 0;
}
