/*
 * Checkpoint, restore and stream throughput (docs/stream.md, "Measured"). Builds an f16
 * cache (8 layers, 8 KV heads, head_dim 128, pages of 16 tokens, 2 sequences of T tokens per
 * layer; T = argument 2, default 1024: 64 MiB of K and V, 76 MB of pages with their Quest
 * bounds), then times: a FULL checkpoint to
 * DIR (argument 1, default $TMPDIR or /tmp; fsync and rename included), its restore into an
 * empty cache, an INCREMENTAL checkpoint after appending 16 tokens to every (sequence,
 * layer), stream_out -> stream_in over a pipe (a writer thread), and CRC32C alone (hardware
 * and software paths). Prints MB/s (1 MB = 10^6 bytes) of checkpoint bytes.
 * White-box: runtime/crc32c.h.
 */
#define _POSIX_C_SOURCE 200809L
#include <pikv/pikv.h>

#include "crc32c.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void die(pikv_context *ctx, const char *what, pikv_status st)
{
    fprintf(stderr, "%s: %s: %s\n", what, pikv_status_name(st), ctx ? pikv_context_last_error(ctx) : "");
    exit(1);
}

static void fill(float *x, size_t n, uint64_t *s)
{
    for (size_t i = 0; i < n; i++) {
        *s = *s * 6364136223846793005ull + 1442695040888963407ull;
        x[i] = (float)((double)(*s >> 40) / (double)(1ull << 24) - 0.5);
    }
}

typedef struct out_arg {
    pikv_cache *c;
    int fd;
    pikv_status st;
} out_arg;

static void *stream_writer(void *a)
{
    out_arg *o = a;
    o->st = pikv_cache_stream_out(o->c, o->fd, NULL);
    close(o->fd);
    return NULL;
}

int main(int argc, char **argv)
{
    const char *tmp = getenv("TMPDIR");
    const char *dir = argc > 1 ? argv[1] : tmp && tmp[0] ? tmp : "/tmp";
    const int T = argc > 2 ? atoi(argv[2]) : 1024;
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "cpu";
    pikv_context *ctx = NULL;
    pikv_status st = pikv_context_create(&cp, &ctx);
    if (st != PIKV_OK) die(NULL, "context", st);
    pikv_cache_params p = pikv_cache_default_params();
    p.n_layers = 8;
    p.n_q_heads = 32;
    p.n_kv_heads = 8;
    p.head_dim = 128;
    p.page_size = 16;
    p.dtype = PIKV_DTYPE_F16;
    pikv_cache *c = NULL, *r = NULL, *s = NULL;
    if ((st = pikv_cache_create(ctx, &p, &c)) != PIKV_OK) die(ctx, "cache", st);
    const size_t per = (size_t)p.n_kv_heads * (size_t)p.head_dim;
    float *k = malloc((size_t)T * per * sizeof(float)), *v = malloc((size_t)T * per * sizeof(float));
    uint64_t seed = 1;
    for (int q = 0; q < 2; q++) {
        pikv_seq_add(c, q);
        for (int l = 0; l < p.n_layers; l++) {
            fill(k, (size_t)T * per, &seed);
            fill(v, (size_t)T * per, &seed);
            if ((st = pikv_cache_append(c, l, q, T, k, v, NULL, NULL)) != PIKV_OK) die(ctx, "append", st);
        }
    }
    char path[1024];
    snprintf(path, sizeof path, "%s/pikv-bench-stream.pikv", dir);
    pikv_checkpoint_stats cs;
    if ((st = pikv_cache_checkpoint(c, path, PIKV_CHECKPOINT_FULL, &cs)) != PIKV_OK) die(ctx, "checkpoint", st);
    const double mb = (double)cs.bytes_written / 1e6;
    printf("cache: %d layers, %d KV heads x %d, f16, %d tokens x 2 sequences per layer: %lld pages, %.1f MB file\n",
           p.n_layers, p.n_kv_heads, p.head_dim, T, (long long)cs.pages_total, mb);
    printf("checkpoint FULL    %8.1f MB/s  (%.3f s, fsync + rename included)\n", mb / cs.seconds, cs.seconds);
    if ((st = pikv_cache_create(ctx, &p, &r)) != PIKV_OK) die(ctx, "cache", st);
    double t0 = now_s();
    if ((st = pikv_cache_restore(r, path, NULL)) != PIKV_OK) die(ctx, "restore", st);
    double t = now_s() - t0;
    printf("restore            %8.1f MB/s  (%.3f s)\n", mb / t, t);
    for (int q = 0; q < 2; q++)
        for (int l = 0; l < p.n_layers; l++)
            if ((st = pikv_cache_append(c, l, q, 16, k, v, NULL, NULL)) != PIKV_OK) die(ctx, "append", st);
    if ((st = pikv_cache_checkpoint(c, path, PIKV_CHECKPOINT_INCREMENTAL, &cs)) != PIKV_OK) die(ctx, "incremental", st);
    printf("checkpoint INCR.   %lld of %lld pages, %.2f MB in %.3f s\n", (long long)cs.pages_written,
           (long long)cs.pages_total, (double)cs.bytes_written / 1e6, cs.seconds);
    int fds[2];
    if (pipe(fds) != 0) return 1;
    out_arg o = {c, fds[1], PIKV_ERR_INTERNAL};
    if ((st = pikv_cache_create(ctx, &p, &s)) != PIKV_OK) die(ctx, "cache", st);
    pthread_t th;
    t0 = now_s();
    pthread_create(&th, NULL, stream_writer, &o);
    st = pikv_cache_stream_in(s, fds[0], NULL);
    pthread_join(th, NULL);
    t = now_s() - t0;
    close(fds[0]);
    if (st != PIKV_OK) die(ctx, "stream_in", st);
    if (o.st != PIKV_OK) die(ctx, "stream_out", o.st);
    printf("stream over a pipe %8.1f MB/s  (%.3f s, out and in concurrently)\n", mb / t, t);
    size_t nb = 64u << 20;
    unsigned char *buf = malloc(nb);
    memset(buf, 0x5a, nb);
    t0 = now_s();
    uint32_t x = pikv_crc32c(0, buf, nb);
    t = now_s() - t0;
    printf("CRC32C %s   %8.1f MB/s\n", pikv_crc32c_hw() ? "(SSE4.2)" : "(software)", (double)nb / 1e6 / t);
    t0 = now_s();
    x ^= pikv_crc32c_sw(0, buf, nb);
    t = now_s() - t0;
    printf("CRC32C (software)  %8.1f MB/s%s\n", (double)nb / 1e6 / t, x ? "  MISMATCH" : "");
    unlink(path);
    free(buf);
    free(k);
    free(v);
    pikv_cache_free(c);
    pikv_cache_free(r);
    pikv_cache_free(s);
    pikv_context_free(ctx);
    return x ? 1 : 0;
}
