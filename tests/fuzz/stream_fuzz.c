/*
 * libFuzzer target: the bytes are a checkpoint file, restored through the library's own
 * parser and checks (pikv_cache_restore_memory, runtime/stream.h) into a small cache of a
 * fixed geometry (stream-fuzz.h). Whatever the bytes, the restore must return a status and
 * leave the cache consistent: after a success the restored sequences attend, then removing
 * them gives back every page; after a failure the cache is still empty. A broken invariant
 * traps (the fuzzer reports it).
 */
#include "stream-fuzz.h"

#include "stream.h"

#include <stdlib.h>

long stream_fuzz_restored; /* inputs that restored (the plain driver reports it) */
static pikv_context *fuzz_ctx;
static pikv_cache *fuzz_cache;

static void fuzz_init(void)
{
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "cpu";
    cp.cpu_threads = 1;
    if (pikv_context_create(&cp, &fuzz_ctx) != PIKV_OK) __builtin_trap();
    pikv_cache_params p = stream_fuzz_params();
    if (pikv_cache_create(fuzz_ctx, &p, &fuzz_cache) != PIKV_OK) __builtin_trap();
}

int LLVMFuzzerTestOneInput(const unsigned char *data, size_t size)
{
    if (!fuzz_cache) fuzz_init();
    pikv_cache *c = fuzz_cache;
    const pikv_cache_params *p = &c->params;
    int32_t fq[4], fl[4];
    pikv_restore_report rep = {0, 0, 0, 0, fq, fl, 4, 0};
    pikv_status st = pikv_cache_restore_memory(c, data, size, "fuzz input", &rep);
    if (st != PIKV_OK) {
        if (c->n_seqs != 0 || c->pages_live != 0 || c->tokens != 0) __builtin_trap();
        return 0;
    }
    if (rep.pages != c->pages_live || rep.sequences != c->n_seqs) __builtin_trap();
    stream_fuzz_restored++;
    int32_t seqs[8];
    int nq = 0;
    for (int32_t q = 0; q < p->max_sequences; q++)
        if (c->seqs[q].active) seqs[nq++] = q;
    float qv[8 * 2 * 8], out[8 * 2 * 8], lse[8 * 2];
    for (int i = 0; i < 8 * 2 * 8; i++) qv[i] = (float)((i * 7) % 5) - 2.0f;
    for (int32_t l = 0; l < p->n_layers && nq > 0; l++) {
        pikv_attend_batch b = {nq, seqs, qv, NULL, out, lse, NULL};
        if (pikv_cache_attend(c, l, &b) != PIKV_OK) __builtin_trap();
    }
    for (int i = 0; i < nq; i++)
        if (pikv_seq_remove(c, seqs[i]) != PIKV_OK) __builtin_trap();
    int64_t shard_pages = 0;
    for (int64_t i = 0; i < (int64_t)p->n_layers * c->n_shards; i++) shard_pages += c->shards[i].pages;
    if (c->pages_live != 0 || c->tokens != 0 || shard_pages != 0) __builtin_trap();
    return 0;
}
