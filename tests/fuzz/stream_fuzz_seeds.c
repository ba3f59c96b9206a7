/*
 * Writes the seed corpus of the stream fuzzer into a directory (argument 1; created, with an
 * empty corpus directory argument 2 when given): a FULL checkpoint, a FULL + INCREMENTAL
 * file with removals, evictions and a prefix copy, a stream_out stream, and an empty cache's
 * checkpoint, all of the fuzz geometry (stream-fuzz.h).
 */
#include "../test-util.h"

#include "stream-fuzz.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

static void app(pikv_cache *c, tu_rng *r, int layer, int seq, int n)
{
    float k[64 * 8], v[64 * 8];
    int32_t ex[64 * 2];
    tu_fill(r, k, (size_t)n * 8, 1.0f);
    tu_fill(r, v, (size_t)n * 8, 1.0f);
    for (int t = 0; t < n; t++)
        tu_pick_experts(r, 4, 2, 1, ex + 2 * t);
    CHECK_OK(pikv_cache_append(c, layer, seq, n, k, v, NULL, ex));
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s SEED_DIR [CORPUS_DIR]\n", argv[0]);
        return 2;
    }
    mkdir(argv[1], 0755);
    if (argc > 2)
        mkdir(argv[2], 0755);
    pikv_context *ctx = tu_context(1);
    tu_err_ctx = ctx;
    pikv_cache_params p = stream_fuzz_params();
    pikv_cache *c = NULL;
    CHECK_OK(pikv_cache_create(ctx, &p, &c));
    char path[1024];
    snprintf(path, sizeof path, "%s/empty.pikv", argv[1]);
    CHECK_OK(pikv_cache_checkpoint(c, path, PIKV_CHECKPOINT_FULL, NULL));
    tu_rng r = tu_rng_seed(1);
    for (int q = 0; q < 3; q++)
        CHECK_OK(pikv_seq_add(c, q));
    for (int l = 0; l < 2; l++) {
        app(c, &r, l, 0, 9);
        app(c, &r, l, 1, 30); /* over the budget: evicted */
        app(c, &r, l, 2, 3);
    }
    CHECK_OK(pikv_seq_copy_prefix(c, 0, 5, 6));
    snprintf(path, sizeof path, "%s/full.pikv", argv[1]);
    CHECK_OK(pikv_cache_checkpoint(c, path, PIKV_CHECKPOINT_FULL, NULL));
    snprintf(path, sizeof path, "%s/incremental.pikv", argv[1]);
    CHECK_OK(pikv_cache_checkpoint(c, path, PIKV_CHECKPOINT_FULL, NULL));
    app(c, &r, 0, 2, 5);
    CHECK_OK(pikv_cache_checkpoint(c, path, PIKV_CHECKPOINT_INCREMENTAL, NULL));
    CHECK_OK(pikv_seq_remove(c, 1));
    app(c, &r, 1, 5, 7);
    CHECK_OK(pikv_cache_checkpoint(c, path, PIKV_CHECKPOINT_INCREMENTAL, NULL));
    snprintf(path, sizeof path, "%s/stream.pikv", argv[1]);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    CHECK(fd >= 0);
    CHECK_OK(pikv_cache_stream_out(c, fd, NULL));
    close(fd);
    pikv_cache_free(c);
    pikv_context_free(ctx);
    return tu_finish();
}
