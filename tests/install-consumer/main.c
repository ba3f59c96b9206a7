/* Embeds an installed PiKV: one append and one attend, checked against the
   only possible answer (a single token: the output is its value). */
#include <pikv/pikv.h>

#include <math.h>
#include <stdio.h>

int main(void)
{
    if (pikv_version_number() != PIKV_VERSION_NUMBER) {
        fprintf(stderr, "header %d != library %u\n", PIKV_VERSION_NUMBER, pikv_version_number());
        return 1;
    }
    pikv_context *ctx = NULL;
    pikv_context_params cp = pikv_context_default_params();
    if (pikv_context_create(&cp, &ctx) != PIKV_OK) return 1;
    pikv_cache_params p = pikv_cache_default_params();
    p.n_q_heads = 2;
    p.n_kv_heads = 1;
    p.head_dim = 4;
    p.dtype = PIKV_DTYPE_F32;
    pikv_cache *cache = NULL;
    float k[4] = {1, 2, 3, 4}, v[4] = {0.5f, -1, 2, 8}, q[8] = {1, 0, 0, 0, 0, 1, 0, 0}, out[8];
    int32_t seq = 0;
    pikv_attend_batch batch = {1, &seq, q, NULL, out, NULL, NULL};
    int ok = pikv_cache_create(ctx, &p, &cache) == PIKV_OK && pikv_seq_add(cache, 0) == PIKV_OK &&
             pikv_cache_append(cache, 0, 0, 1, k, v, NULL, NULL) == PIKV_OK &&
             pikv_cache_attend(cache, 0, &batch) == PIKV_OK;
    for (int i = 0; ok && i < 8; i++) ok = fabsf(out[i] - v[i % 4]) < 1e-6f;
    printf("consumer: PiKV %s %s\n", pikv_version_string(), ok ? "ok" : pikv_context_last_error(ctx));
    pikv_cache_free(cache);
    pikv_context_free(ctx);
    return ok ? 0 : 1;
}
