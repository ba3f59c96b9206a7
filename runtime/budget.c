/* Per-layer token budgets (uniform, or pyramidal as in PyramidKV) and the
   validation of the policy parameters of a cache. */
#include "cache-impl.h"

#include <math.h>
#include <string.h>

/* Whether sum_i max(floor, min(c_i, cap)) <= total, without overflowing. */
static bool capped_fits(const int64_t *c, int32_t n, int64_t floor_tokens, int64_t cap, int64_t total)
{
    int64_t left = total;
    for (int32_t i = 0; i < n; i++) {
        int64_t v = c[i] < cap ? c[i] : cap;
        v = v > floor_tokens ? v : floor_tokens;
        if (v > left) return false;
        left -= v;
    }
    return true;
}

pikv_status pikv_budgets_compute(const pikv_budget_params *p, int32_t n_layers, int64_t floor_tokens,
                                 int64_t *out)
{
    if (!p || !out || n_layers < 1 || floor_tokens < 0) return PIKV_ERR_INVALID_ARGUMENT;
    if (p->mode == PIKV_BUDGET_NONE) {
        for (int32_t i = 0; i < n_layers; i++) out[i] = -1;
        return PIKV_OK;
    }
    if (p->mode != PIKV_BUDGET_UNIFORM && p->mode != PIKV_BUDGET_PYRAMID) return PIKV_ERR_INVALID_ARGUMENT;
    const int64_t total = p->total_tokens;
    if (total < 1 || floor_tokens > total / n_layers) return PIKV_ERR_INVALID_ARGUMENT;
    const double L = n_layers, T = (double)total;
    if (p->mode == PIKV_BUDGET_PYRAMID && (!(p->pyramid_beta >= 1.0f) || isinf(p->pyramid_beta)))
        return PIKV_ERR_INVALID_ARGUMENT;
    if (p->mode == PIKV_BUDGET_UNIFORM || n_layers == 1) {
        for (int32_t i = 0; i < n_layers; i++) out[i] = total / n_layers;
    } else {
        const double beta = p->pyramid_beta;
        /* PyramidKV: the top layer keeps T / (beta L), the bottom 2T/L minus that, and
           the layers between lie on the line: C_i = C_1 - (i-1) d. */
        const double top = T / (beta * L), bottom = 2.0 * T / L - top;
        const double d = n_layers > 1 ? (bottom - top) / (L - 1.0) : 0.0;
        for (int32_t i = 0; i < n_layers; i++) {
            /* clamp in double: a huge total must not overflow the conversion */
            const double v = floor(bottom - d * i);
            out[i] = v <= 0.0 ? 0 : v >= (double)total ? total : (int64_t)v;
        }
    }
    /* Floors first; then, if the floors pushed the sum over the total, lower the
       largest budgets to a common cap (keeps them non-increasing). */
    if (!capped_fits(out, n_layers, floor_tokens, INT64_MAX, total)) {
        int64_t lo = floor_tokens, hi = total; /* largest cap whose sum fits */
        while (lo < hi) {
            const int64_t span = hi - lo; /* >= 1, no overflow: 0 <= lo < hi */
            const int64_t mid = lo + span / 2 + (span & 1);
            if (capped_fits(out, n_layers, floor_tokens, mid, total)) lo = mid;
            else hi = mid - 1;
        }
        for (int32_t i = 0; i < n_layers; i++) out[i] = out[i] < lo ? out[i] : lo;
    }
    for (int32_t i = 0; i < n_layers; i++) out[i] = out[i] > floor_tokens ? out[i] : floor_tokens;
    return PIKV_OK;
}

pikv_status pikv_select_validate(pikv_context *ctx, const pikv_cache *c, const pikv_select_params *s,
                                 const char *where)
{
    const pikv_cache_params *p = &c->params;
    PIKV_RETURN_ERROR_IF((s->mode & ~(uint32_t)(PIKV_SELECT_EXPERTS | PIKV_SELECT_QUEST)) != 0, ctx,
                         PIKV_ERR_INVALID_ARGUMENT, "%s: select.mode = 0x%x has unknown bits", where,
                         (unsigned)s->mode);
    PIKV_RETURN_ERROR_IF(s->experts_top_k < 0 || s->experts_top_k > p->experts_per_token, ctx,
                         PIKV_ERR_INVALID_ARGUMENT,
                         "%s: select.experts_top_k = %d is outside 0..experts_per_token = %d", where,
                         s->experts_top_k, p->experts_per_token);
    PIKV_RETURN_ERROR_IF(s->sink_tokens < 0 || s->recent_tokens < 0, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "%s: select.%s = %d is negative", where, s->sink_tokens < 0 ? "sink_tokens" : "recent_tokens",
                         s->sink_tokens < 0 ? s->sink_tokens : s->recent_tokens);
    if (s->mode & PIKV_SELECT_QUEST)
        PIKV_RETURN_ERROR_IF(s->token_budget < 1 || (int64_t)s->token_budget < (int64_t)s->sink_tokens + s->recent_tokens,
                             ctx, PIKV_ERR_INVALID_ARGUMENT,
                             "%s: select.token_budget = %d must be at least 1 and at least sink_tokens + "
                             "recent_tokens = %lld", where, s->token_budget,
                             (long long)s->sink_tokens + s->recent_tokens);
    return PIKV_OK;
}

pikv_status pikv_policies_init(pikv_cache *c)
{
    pikv_context *ctx = c->ctx;
    const pikv_cache_params *p = &c->params;
    PIKV_FORWARD_IF_ERROR(pikv_select_validate(ctx, c, &p->select, "pikv_cache_create"));
    const pikv_budget_params *b = &p->budget;
    const pikv_evict_params *e = &p->evict;
    const pikv_route_params *r = &p->route;
    PIKV_RETURN_ERROR_IF(b->mode != PIKV_BUDGET_NONE && b->mode != PIKV_BUDGET_UNIFORM &&
                             b->mode != PIKV_BUDGET_PYRAMID,
                         ctx, PIKV_ERR_INVALID_ARGUMENT, "budget.mode = %d is not a pikv_budget_mode",
                         (int)b->mode);
    PIKV_RETURN_ERROR_IF((unsigned)e->policy > PIKV_EVICT_UTILITY, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "evict.policy = %d is not a pikv_evict_policy", (int)e->policy);
    PIKV_RETURN_ERROR_IF(!(e->alpha_attention >= 0.0f && e->alpha_recency >= 0.0f && e->alpha_frequency >= 0.0f) ||
                             isinf(e->alpha_attention) || isinf(e->alpha_recency) || isinf(e->alpha_frequency),
                         ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "evict alphas (%g, %g, %g) must be finite and >= 0", (double)e->alpha_attention,
                         (double)e->alpha_recency, (double)e->alpha_frequency);
    PIKV_RETURN_ERROR_IF(e->policy == PIKV_EVICT_UTILITY &&
                             e->alpha_attention + e->alpha_recency + e->alpha_frequency <= 0.0f,
                         ctx, PIKV_ERR_INVALID_ARGUMENT, "evict.policy UTILITY needs a positive alpha");
    PIKV_RETURN_ERROR_IF(!(r->lambda >= 0.0f) || isinf(r->lambda), ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "route.lambda = %g must be finite and >= 0", (double)r->lambda);
    PIKV_RETURN_ERROR_IF(!(r->miss_decay >= 0.0f && r->miss_decay <= 1.0f), ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "route.miss_decay = %g is outside [0, 1]", (double)r->miss_decay);
    if (b->mode == PIKV_BUDGET_NONE) {
        for (int32_t l = 0; l < p->n_layers; l++) c->layer_budget[l] = -1;
        return PIKV_OK;
    }
    PIKV_RETURN_ERROR_IF(e->policy == PIKV_EVICT_NONE, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "budget.mode = %d needs an eviction policy (evict.policy is NONE)", (int)b->mode);
    PIKV_RETURN_ERROR_IF(b->mode == PIKV_BUDGET_PYRAMID && (!(b->pyramid_beta >= 1.0f) || isinf(b->pyramid_beta)),
                         ctx, PIKV_ERR_INVALID_ARGUMENT, "budget.pyramid_beta = %g must be finite and >= 1",
                         (double)b->pyramid_beta);
    /* Every layer keeps at least the sinks and the recent window (never evicted). */
    const int64_t floor_tokens = (int64_t)p->select.sink_tokens + p->select.recent_tokens;
    PIKV_RETURN_ERROR_IF(b->total_tokens < 1 || floor_tokens * p->n_layers > b->total_tokens, ctx,
                         PIKV_ERR_INVALID_ARGUMENT,
                         "budget.total_tokens = %lld is smaller than n_layers = %d times sink_tokens + "
                         "recent_tokens = %lld", (long long)b->total_tokens, p->n_layers,
                         (long long)floor_tokens);
    pikv_status st = pikv_budgets_compute(b, p->n_layers, floor_tokens, c->layer_budget);
    PIKV_RETURN_ERROR_IF(st != PIKV_OK, ctx, st, "budget: cannot derive layer budgets from total %lld",
                         (long long)b->total_tokens);
    return PIKV_OK;
}
