/* Writes the version 1 fixtures (run with the library as of commit d112e11). */
#include "stream-util.h"
int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: gen_v1 DIR\n");
        return 2;
    }
    static const pikv_dtype dts[2] = {PIKV_DTYPE_F16, PIKV_DTYPE_INT4};
    static const char *names[2] = {"f16", "int4"};
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "cpu";
    pikv_context *ctx;
    if (pikv_context_create(&cp, &ctx) != PIKV_OK) return 1;
    for (int i = 0; i < 2; i++) {
        pikv_cache_params p = su_params(dts[i], PIKV_PLACEMENT_EXPERT);
        pikv_cache *c = su_cache(ctx, &p);
        su_workload(c, &p, 7000u + (uint64_t)i);
        char path[512];
        snprintf(path, sizeof path, "%s/v1-%s.pikv", argv[1], names[i]);
        pikv_checkpoint_stats cs;
        if (pikv_cache_checkpoint(c, path, PIKV_CHECKPOINT_FULL, &cs) != PIKV_OK) return 1;
        pikv_cache_free(c);
    }
    pikv_context_free(ctx);
    return tu_fail_count ? 1 : 0;
}
