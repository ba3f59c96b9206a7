/*
 * The GGUF fuzz target without libFuzzer, in every build (gcc, ASan): runs
 * LLVMFuzzerTestOneInput (gguf_fuzz.c) on the sample files of gguf-build.h (alignments 32, 1
 * and 64), then on deterministic mutations of them: bit flips, truncations, 8-byte count /
 * length / offset fields smashed (2^63, 2^40, 2^32, -1, random) at 4-byte positions, bytes
 * inserted or deleted, and splices. PIKV_FUZZ_MUTATIONS sets how many (default 20000).
 * `gguf_fuzz_driver --write-seeds DIR` writes the samples into DIR (the libFuzzer corpus).
 */
#include "../test-util.h"

#include "gguf-build.h"
#include "gguf-fuzz.h"

#define N_SEEDS 3

int main(int argc, char **argv)
{
    static const uint32_t aligns[N_SEEDS] = {32, 1, 64};
    gb seeds[N_SEEDS];
    memset(seeds, 0, sizeof seeds);
    for (int i = 0; i < N_SEEDS; i++) {
        gb_layout L;
        gb_build_sample(&seeds[i], &L, aligns[i]);
    }
    if (argc == 3 && strcmp(argv[1], "--write-seeds") == 0) {
        for (int i = 0; i < N_SEEDS; i++) {
            char path[4096];
            snprintf(path, sizeof path, "%s/sample-align%u.gguf", argv[2], aligns[i]);
            FILE *f = fopen(path, "wb");
            if (!CHECKF(f && fwrite(seeds[i].p, 1, seeds[i].n, f) == seeds[i].n, "cannot write %s", path))
                return tu_finish();
            fclose(f);
        }
        for (int i = 0; i < N_SEEDS; i++)
            free(seeds[i].p);
        return tu_finish();
    }
    for (int i = 0; i < N_SEEDS; i++)
        LLVMFuzzerTestOneInput(seeds[i].p, seeds[i].n);
    CHECKF(gguf_fuzz_accepted == N_SEEDS, "%ld of %d seeds accepted", gguf_fuzz_accepted, N_SEEDS);
    const char *env = getenv("PIKV_FUZZ_MUTATIONS");
    const long n_mut = env ? atol(env) : 20000;
    tu_rng r = tu_rng_seed(20261122);
    size_t cap = 0;
    for (int i = 0; i < N_SEEDS; i++)
        cap = seeds[i].n > cap ? seeds[i].n : cap;
    cap = 2 * cap + 64;
    uint8_t *buf = (uint8_t *)tu_xmalloc(cap);
    static const uint64_t smash[] = {UINT64_C(1) << 63, UINT64_C(1) << 40, UINT64_C(1) << 32, UINT64_MAX,
                                     0, 1, 5, 31, 33, 0x7fffffffffffffffull};
    for (long m = 0; m < n_mut; m++) {
        const int s = (int)tu_int(&r, 0, N_SEEDS - 1);
        size_t n = seeds[s].n;
        memcpy(buf, seeds[s].p, n);
        const int kind = (int)tu_int(&r, 0, 5);
        const int rounds = (int)tu_int(&r, 1, 3);
        for (int k = 0; k < rounds && n > 0; k++) {
            switch (kind) {
            case 0:
                buf[tu_int(&r, 0, (int64_t)n - 1)] ^= (uint8_t)(1u << tu_int(&r, 0, 7));
                break;
            case 1:
                n = (size_t)tu_int(&r, 0, (int64_t)n - 1);
                break;
            case 2: {
                const size_t at = (size_t)tu_int(&r, 0, (int64_t)(n - 1) / 4) * 4;
                if (at + 8 <= n) {
                    const uint64_t v = tu_int(&r, 0, 1) ? smash[tu_int(&r, 0, 9)] : tu_next(&r);
                    for (int i = 0; i < 8; i++)
                        buf[at + (size_t)i] = (uint8_t)(v >> (8 * i));
                }
                break;
            }
            case 3: {
                const size_t at = (size_t)tu_int(&r, 0, (int64_t)n);
                if (n + 1 < cap) {
                    memmove(buf + at + 1, buf + at, n - at);
                    buf[at] = (uint8_t)tu_next(&r);
                    n++;
                }
                break;
            }
            case 4: {
                const size_t at = (size_t)tu_int(&r, 0, (int64_t)n - 1);
                const size_t len = (size_t)tu_int(&r, 1, 64);
                const size_t cut = at + len > n ? n - at : len;
                memmove(buf + at, buf + at + cut, n - at - cut);
                n -= cut;
                break;
            }
            default: {
                const int o = (int)tu_int(&r, 0, N_SEEDS - 1);
                const size_t a = (size_t)tu_int(&r, 0, (int64_t)n);
                const size_t b = (size_t)tu_int(&r, 0, (int64_t)seeds[o].n);
                if (a + seeds[o].n - b <= cap) {
                    memcpy(buf + a, seeds[o].p + b, seeds[o].n - b);
                    n = a + seeds[o].n - b;
                }
                break;
            }
            }
        }
        /* an exact-size heap copy, so ASan sees reads past the end */
        uint8_t *c = (uint8_t *)tu_xmalloc(n);
        memcpy(c, buf, n);
        LLVMFuzzerTestOneInput(c, n);
        free(c);
    }
    printf("%d seeds, %ld mutations, %ld inputs accepted\n", N_SEEDS, n_mut, gguf_fuzz_accepted);
    /* mutations that hit only tensor data or values are accepted: some must be */
    CHECKF(gguf_fuzz_accepted > N_SEEDS && gguf_fuzz_accepted < n_mut, "%ld inputs accepted", gguf_fuzz_accepted);
    free(buf);
    for (int i = 0; i < N_SEEDS; i++)
        free(seeds[i].p);
    return tu_finish();
}
