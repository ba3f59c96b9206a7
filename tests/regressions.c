/*
 * regressions: bugs found in review, each reproduced through the public API so that it
 * cannot come back unnoticed (the sanitizer builds catch the memory errors).
 */
#include "test-util.h"

#include <math.h>

static pikv_context *make_context(void)
{
    pikv_context_params cp = pikv_context_default_params();
    pikv_context *ctx = NULL;
    CHECK_OK(pikv_context_create(&cp, &ctx));
    return ctx;
}

/* copy_prefix ending inside an INT8 page with head_dim 600 and quant_group 1: 600 value
   groups; dequantizing the copied row once overflowed a stack buffer of 1024 floats. */
static void test_copy_prefix_many_value_groups(void)
{
    tu_set_case("copy prefix of a quantized page with 600 value groups");
    pikv_context *ctx = make_context();
    if (!ctx) return;
    pikv_cache_params p = pikv_cache_default_params();
    p.n_q_heads = 1;
    p.n_kv_heads = 1;
    p.head_dim = 600;
    p.page_size = 2;
    p.dtype = PIKV_DTYPE_INT8;
    p.quant_group = 1;
    pikv_cache *c = NULL;
    CHECK_OK(pikv_cache_create(ctx, &p, &c));
    static float k[2 * 600], v[2 * 600], q[600], out[600];
    for (int i = 0; i < 1200; i++) {
        k[i] = sinf((float)i * 0.1f);
        v[i] = cosf((float)i * 0.3f);
    }
    CHECK_OK(pikv_seq_add(c, 0));
    CHECK_OK(pikv_cache_append(c, 0, 0, 2, k, v, NULL, NULL)); /* fills and quantizes the page */
    CHECK_OK(pikv_seq_copy_prefix(c, 0, 1, 1));                 /* dequantizes row 0 */
    /* one token: the output is that token's value; group size 1 quantizes exactly up to f16 */
    int32_t seq = 1;
    pikv_attend_batch b = {1, &seq, q, NULL, out, NULL, NULL};
    CHECK_OK(pikv_cache_attend(c, 0, &b));
    float worst = 0.0f;
    for (int d = 0; d < 600; d++) worst = fmaxf(worst, fabsf(out[d] - tu_f16_round(v[d])));
    CHECKF(worst <= 1e-3f, "copied row differs from the source value by %g", (double)worst);
    pikv_cache_free(c);
    pikv_context_free(ctx);
}

/* A dequantized value can pass 65504 by part of a step; the copy's f16 page once stored +inf
   and the copy's attend then failed. */
static void test_copy_prefix_f16_range(void)
{
    for (int dt = PIKV_DTYPE_INT8; dt <= PIKV_DTYPE_INT4; dt++) {
        tu_set_case(dt == PIKV_DTYPE_INT8 ? "copy prefix near 65504 (int8)" : "copy prefix near 65504 (int4)");
        pikv_context *ctx = make_context();
        if (!ctx) return;
        pikv_cache_params p = pikv_cache_default_params();
        p.n_q_heads = 1;
        p.n_kv_heads = 1;
        p.head_dim = 2;
        p.page_size = 2;
        p.dtype = (pikv_dtype)dt;
        p.attn_scale = 1e-6f;
        pikv_cache *c = NULL;
        CHECK_OK(pikv_cache_create(ctx, &p, &c));
        float k[4] = {65504.0f, 1.0f, 0.0f, 1.0f}, v[4] = {65504.0f, 1.0f, 0.0f, 2.0f};
        CHECK_OK(pikv_seq_add(c, 0));
        CHECK_OK(pikv_cache_append(c, 0, 0, 2, k, v, NULL, NULL));
        CHECK_OK(pikv_seq_copy_prefix(c, 0, 1, 1));
        float q[2] = {1.0f, 0.0f}, out[2], lse = 0;
        int32_t seq = 1;
        pikv_attend_batch b = {1, &seq, q, NULL, out, &lse, NULL};
        CHECK_OK(pikv_cache_attend(c, 0, &b));
        CHECKF(isfinite(out[0]) && isfinite(lse) && out[0] <= 65504.0f, "copy attends to %g (lse %g)",
               (double)out[0], (double)lse);
        pikv_cache_free(c);
        pikv_context_free(ctx);
    }
}

/* A partial copy kept the whole source page's expert mask: with HASH placement and EXPERTS
   selection it was read for an expert none of its rows has. */
static void test_copy_prefix_expert_mask(void)
{
    tu_set_case("copy prefix keeps only its rows' experts");
    pikv_context *ctx = make_context();
    if (!ctx) return;
    pikv_cache_params p = pikv_cache_default_params();
    p.n_q_heads = 1;
    p.n_kv_heads = 1;
    p.head_dim = 2;
    p.n_experts = 4;
    p.experts_per_token = 1;
    p.page_size = 4;
    p.dtype = PIKV_DTYPE_INT8;
    p.placement = PIKV_PLACEMENT_HASH;
    p.n_shards = 1;
    p.select.mode = PIKV_SELECT_EXPERTS;
    p.select.sink_tokens = 0;
    p.select.recent_tokens = 0;
    pikv_cache *c = NULL;
    CHECK_OK(pikv_cache_create(ctx, &p, &c));
    float k[8] = {1, 2, 3, 4, 5, 6, 7, 8}, v[8] = {1, 1, 1, 1, 9, 9, 9, 9};
    int32_t ex[4] = {0, 0, 3, 3};
    CHECK_OK(pikv_seq_add(c, 0));
    CHECK_OK(pikv_cache_append(c, 0, 0, 4, k, v, NULL, ex)); /* one page: experts 0, 0, 3, 3 */
    CHECK_OK(pikv_seq_copy_prefix(c, 0, 1, 2));               /* the copy: expert 0 rows only */
    float q[2] = {0.5f, 0.5f}, out[2], lse = 0;
    int32_t seq = 1, qex = 3;
    pikv_attend_batch b = {1, &seq, q, &qex, out, &lse, NULL};
    CHECK_OK(pikv_cache_attend(c, 0, &b));
    pikv_cache_stats st;
    CHECK_OK(pikv_cache_get_stats(c, &st));
    CHECKF(st.last_pages_read == 0 && lse == -INFINITY && st.last_hit_rate == 0.0,
           "a query for expert 3 read %lld pages (lse %g, hit rate %g) of a copy holding expert 0 only",
           (long long)st.last_pages_read, (double)lse, st.last_hit_rate);
    pikv_cache_free(c);
    pikv_context_free(ctx);
}

int main(void)
{
    test_copy_prefix_many_value_groups();
    test_copy_prefix_f16_range();
    test_copy_prefix_expert_mask();
    tu_set_case("");
    return tu_finish();
}
