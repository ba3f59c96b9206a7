/*
 * The stream fuzz target without libFuzzer, in every build (gcc, ASan): runs
 * LLVMFuzzerTestOneInput on each seed file given, then on deterministic mutations of them:
 * bit flips, truncations, length fields smashed (0xffffffff, 2^31, random) at record-like
 * positions, bytes inserted or deleted, and splices of two seeds. PIKV_FUZZ_MUTATIONS sets
 * how many (default 3000). A broken invariant traps inside the target.
 */
#include "../test-util.h"

#include "stream-fuzz.h"

static uint8_t *seeds[16];
static size_t seed_n[16];
static int n_seeds;

int main(int argc, char **argv)
{
    for (int i = 1; i < argc && n_seeds < 16; i++) {
        FILE *f = fopen(argv[i], "rb");
        if (!f) {
            fprintf(stderr, "cannot open seed %s\n", argv[i]);
            return 2;
        }
        fseek(f, 0, SEEK_END);
        long n = ftell(f);
        fseek(f, 0, SEEK_SET);
        seeds[n_seeds] = (uint8_t *)tu_xmalloc((size_t)n + 1);
        seed_n[n_seeds] = fread(seeds[n_seeds], 1, (size_t)n, f);
        fclose(f);
        LLVMFuzzerTestOneInput(seeds[n_seeds], seed_n[n_seeds]);
        n_seeds++;
    }
    if (!CHECKF(n_seeds > 0, "no seeds given"))
        return tu_finish();
    const char *env = getenv("PIKV_FUZZ_MUTATIONS");
    const long n_mut = env ? atol(env) : 3000;
    tu_rng r = tu_rng_seed(20261122);
    size_t cap = 0;
    for (int i = 0; i < n_seeds; i++)
        cap = seed_n[i] > cap ? seed_n[i] : cap;
    cap = 2 * cap + 64;
    uint8_t *buf = (uint8_t *)tu_xmalloc(cap);
    static const uint32_t smash[] = {0xffffffffu, 0x80000000u, 0x7fffffffu, 0x00010000u, 0u, 47u, 49u};
    for (long m = 0; m < n_mut; m++) {
        const int s = (int)tu_int(&r, 0, n_seeds - 1);
        size_t n = seed_n[s];
        memcpy(buf, seeds[s], n);
        const int kind = (int)tu_int(&r, 0, 5);
        const int rounds = (int)tu_int(&r, 1, 3);
        for (int k = 0; k < rounds && n > 0; k++) {
            switch (kind) {
            case 0: /* bit flips */
                buf[tu_int(&r, 0, (int64_t)n - 1)] ^= (uint8_t)(1u << tu_int(&r, 0, 7));
                break;
            case 1: /* truncation */
                n = (size_t)tu_int(&r, 0, (int64_t)n - 1);
                break;
            case 2: { /* a 4-byte field smashed, aligned as record fields are */
                const size_t at = (size_t)tu_int(&r, 0, (int64_t)(n - 1) / 4) * 4;
                if (at + 4 <= n) {
                    uint32_t v = tu_int(&r, 0, 1) ? smash[tu_int(&r, 0, 6)] : (uint32_t)tu_next(&r);
                    memcpy(buf + at, &v, 4);
                }
                break;
            }
            case 3: { /* insert a byte */
                const size_t at = (size_t)tu_int(&r, 0, (int64_t)n);
                if (n + 1 < cap) {
                    memmove(buf + at + 1, buf + at, n - at);
                    buf[at] = (uint8_t)tu_next(&r);
                    n++;
                }
                break;
            }
            case 4: { /* delete a run */
                const size_t at = (size_t)tu_int(&r, 0, (int64_t)n - 1);
                const size_t len = (size_t)tu_int(&r, 1, 64);
                const size_t cut = at + len > n ? n - at : len;
                memmove(buf + at, buf + at + cut, n - at - cut);
                n -= cut;
                break;
            }
            case 5: { /* splice: the head of this seed, the tail of another */
                const int o = (int)tu_int(&r, 0, n_seeds - 1);
                const size_t a = (size_t)tu_int(&r, 0, (int64_t)n);
                const size_t b = (size_t)tu_int(&r, 0, (int64_t)seed_n[o]);
                if (a + seed_n[o] - b <= cap) {
                    memcpy(buf + a, seeds[o] + b, seed_n[o] - b);
                    n = a + seed_n[o] - b;
                }
                break;
            }
            }
        }
        LLVMFuzzerTestOneInput(buf, n);
    }
    printf("%d seeds, %ld mutations, %ld inputs restored\n", n_seeds, n_mut, stream_fuzz_restored);
    /* the seeds restore, and so do mutations that hit only page bytes */
    CHECKF(stream_fuzz_restored > n_seeds, "%ld inputs restored", stream_fuzz_restored);
    free(buf);
    for (int i = 0; i < n_seeds; i++)
        free(seeds[i]);
    return tu_finish();
}
