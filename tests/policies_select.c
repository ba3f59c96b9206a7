/*
 * policies_select: what an attend reads (pikv_select_params) and the quality stats.
 *
 *  1. quest_bound_whitebox: the CPU score op (called directly on the cache's page pools,
 *     runtime/backend-impl.h) returns, for every page, KV head and query, exactly the Quest
 *     bound max_h sum_d max(q_hd min_d, q_hd max_d) over the page's stored keys, and so an
 *     upper bound of every q_h . k_t of the page. Random geometries (GQA, odd head dims),
 *     f32 and f16 pages, all placements, 1-3 devices, open pages, prefix copies (partly
 *     covered pages get recomputed bounds) and evictions (reused slots).
 *  2. quest_random: QUEST (and EXPERTS+QUEST) through the public API: the output equals
 *     dense attention over exactly the pages a budgeted top-k by the Quest bound picks
 *     (computed here in double), per (query, KV head); stats count exactly those reads;
 *     measured recall and output error match what those reads imply.
 *  3. Hand-built caches: QUEST picks the one page aligned with the query per KV head;
 *     EXPERTS reads exactly the query's expert shards plus sink/recent pages (EXPERT and
 *     HASH placement); EXPERTS+QUEST ranks only the query's shards; per-attend select
 *     overrides the cache default both ways.
 *  4. Whole-context budget: QUEST with token_budget >= the context is bitwise exact mode.
 *  5. Quality: exact mode recall 1 / error 0; unmeasured -1; QUEST recall non-decreasing in
 *     the budget (equal page sizes); hit rate; bytes read shrink and follow the reads.
 */
#include "test-util.h"

#include "policies-util.h"

#include "cache-impl.h"

static pikv_context *g_ctx[4]; /* by number of CPU devices */

/* ------------------------------------------------------------------------ */
/* helpers                                                                   */
/* ------------------------------------------------------------------------ */

/* Appends n tokens: keys of amplitude amp (sometimes a channel constant or of one sign), values
   in [-1, 1), random distinct experts. Pushes them into the model on success. */
static pikv_status append_varied(pikv_cache *c, tu_model *m, tu_rng *r, int layer, int seq, int n,
                                 float amp)
{
    size_t row = (size_t)m->nkv * m->hd;
    float *k = tu_xmalloc((size_t)n * row * sizeof(float));
    float *v = tu_xmalloc((size_t)n * row * sizeof(float));
    int32_t *ex = tu_xmalloc((size_t)n * m->ept * sizeof(int32_t));
    tu_fill(r, k, (size_t)n * row, amp);
    tu_fill(r, v, (size_t)n * row, 1.0f);
    int mode = (int)tu_int(r, 0, 4);
    int ch = (int)tu_int(r, 0, m->hd - 1);
    for (int t = 0; t < n; t++)
        for (int g = 0; g < m->nkv; g++) {
            float *kr = k + ((size_t)t * m->nkv + g) * m->hd;
            if (mode == 1)
                kr[ch] = 0.75f * amp; /* constant channel: min == max */
            else if (mode == 2)
                kr[ch] = -fabsf(kr[ch]) - 0.5f * amp; /* negative only */
            else if (mode == 3)
                kr[ch] = fabsf(kr[ch]) + 0.5f * amp; /* positive only */
        }
    for (int t = 0; t < n; t++)
        tu_pick_experts(r, m->ne, m->ept, 1, ex + (size_t)t * m->ept);
    pikv_status st = pikv_cache_append(c, layer, seq, n, k, v, NULL, ex);
    if (st == PIKV_OK)
        tu_model_push(m, layer, seq, n, k, v, ex);
    free(k);
    free(v);
    free(ex);
    return st;
}

static int32_t *model_top1(const tu_model *m, int layer, int seq)
{
    const tu_seq *s = tu_model_seq(m, layer, seq);
    int32_t *t1 = tu_xcalloc((size_t)(s->n + 1), sizeof(int32_t));
    for (int64_t t = 0; t < s->n; t++)
        t1[t] = s->ex[(size_t)t * m->ept];
    return t1;
}

/* ------------------------------------------------------------------------ */
/* 1. The score op is the Quest bound (white-box)                           */
/* ------------------------------------------------------------------------ */

typedef struct page_ref {
    uint32_t id;
    int32_t seq;
} page_ref;

static void bound_check_device(pikv_cache *c, const tu_model *m, int layer, int d, tu_rng *r, long *n_checked)
{
    const pikv_cache_params *p = &c->params;
    const int nkv = p->n_kv_heads, nqh = p->n_q_heads, hd = p->head_dim, ps = p->page_size;
    int64_t n = 0, cap = 64;
    page_ref *refs = tu_xmalloc((size_t)cap * sizeof *refs);
    for (int s = 0; s < p->max_sequences; s++) {
        if (!c->seqs[s].active)
            continue;
        const pikv_seq_layer *sl = &c->seqs[s].layers[layer];
        for (int32_t sh = 0; sh < c->n_shards; sh++)
            for (int64_t j = 0; j < sl->rings[sh].count; j++) {
                uint32_t id = pikv_ring_at(&sl->rings[sh], j);
                if (c->pages[id].dev != d)
                    continue;
                if (n == cap) {
                    cap *= 2;
                    refs = tu_xrealloc(refs, (size_t)cap * sizeof *refs);
                }
                refs[n].id = id;
                refs[n++].seq = s;
            }
    }
    if (n == 0) {
        free(refs);
        return;
    }
    const int nq = (int)tu_int(r, 1, 3);
    float *q = tu_xmalloc((size_t)nq * nqh * hd * sizeof(float));
    for (int i = 0; i < nq; i++) {
        float amp = (float)pow(10.0, tu_unif(r) * 3.0 - 1.5);
        tu_fill(r, q + (size_t)i * nqh * hd, (size_t)nqh * hd, amp);
        if (tu_int(r, 0, 3) == 0) /* some zero and one-signed query channels */
            for (int x = 0; x < nqh * hd; x += 3)
                q[(size_t)i * nqh * hd + x] = 0.0f;
    }
    /* each query gets a random subset of the device's pages, in random order */
    int32_t *indptr = tu_xcalloc((size_t)nq + 1, sizeof(int32_t));
    int64_t *pick = tu_xmalloc((size_t)nq * n * sizeof(int64_t));
    uint32_t *slots = tu_xmalloc((size_t)nq * n * sizeof(uint32_t));
    int64_t e = 0;
    for (int i = 0; i < nq; i++) {
        indptr[i] = (int32_t)e;
        int64_t first = e;
        for (int64_t j = 0; j < n; j++)
            if (tu_int(r, 0, 9) < 8)
                pick[e++] = j;
        for (int64_t j = e - 1; j > first; j--) {
            int64_t k = first + (int64_t)tu_int(r, 0, j - first), t = pick[j];
            pick[j] = pick[k];
            pick[k] = t;
        }
    }
    indptr[nq] = (int32_t)e;
    for (int64_t j = 0; j < e; j++)
        slots[j] = c->pages[refs[pick[j]].id].slot;
    float *scores = tu_xmalloc((size_t)(e ? e : 1) * nkv * sizeof(float));
    for (int64_t j = 0; j < e * nkv; j++)
        scores[j] = NAN;
    pikv_page_pool *pool = &c->devs[d];
    pikv_score_args a = {&pool->view, nq, nqh, q, indptr, slots, scores};
    pikv_status st = pool->dev->iface->score(pool->dev, &a);
    CHECK_OK(st);
    int64_t tok[4096];
    for (int i = 0; i < nq && st == PIKV_OK; i++)
        for (int64_t j = indptr[i]; j < indptr[i + 1]; j++) {
            const page_ref *pr = &refs[pick[j]];
            const pikv_page_meta *pm = &c->pages[pr->id];
            for (int row = 0; row < pm->n_tokens; row++)
                tok[row] = c->indices[(size_t)pr->id * ps + row];
            const float *K = tu_model_seq(m, layer, pr->seq)->ks;
            for (int g = 0; g < nkv; g++) {
                double mag, dot;
                double bound = pt_quest_bound(tok, pm->n_tokens, g, nqh, nkv, hd, q + (size_t)i * nqh * hd, K,
                                              &mag, &dot);
                double got = scores[(size_t)j * nkv + g], tol = 1e-5 * mag + 1e-30;
                CHECKF(got >= dot - tol, "page id %u (seq %d, %d rows) KV head %d query %d: score %.9g < max q.k %.9g",
                       pr->id, pr->seq, pm->n_tokens, g, i, got, dot);
                CHECKF(fabs(got - bound) <= tol,
                       "page id %u (seq %d, %d rows) KV head %d query %d: score %.9g, Quest bound %.9g", pr->id,
                       pr->seq, pm->n_tokens, g, i, got, bound);
                (*n_checked)++;
            }
        }
    free(refs);
    free(q);
    free(indptr);
    free(pick);
    free(slots);
    free(scores);
}

static void test_quest_bound_whitebox(void)
{
    long n_checked = 0, n_f16 = 0, n_gqa = 0, n_copies = 0, n_evicted = 0, n_moved = 0, n_trims = 0;
    for (uint64_t seed = 1; seed <= 250; seed++) {
        tu_rng r = tu_rng_seed(seed * 7919u);
        int ndev = (int)tu_int(&r, 1, 3);
        pikv_cache_params p = pt_params();
        p.n_layers = (int)tu_int(&r, 1, 2);
        p.n_kv_heads = (int)tu_int(&r, 1, 3);
        p.n_q_heads = p.n_kv_heads * (int)tu_int(&r, 1, 3);
        p.head_dim = tu_int(&r, 0, 3) == 0 ? (int)tu_int(&r, 1, 3) : (int)tu_int(&r, 4, 40);
        int ne_opts[3] = {1, 2, 5};
        p.n_experts = ne_opts[tu_int(&r, 0, 2)];
        p.experts_per_token = (int)tu_int(&r, 1, p.n_experts < 3 ? p.n_experts : 3);
        p.page_size = (int)tu_int(&r, 1, 8);
        p.dtype = tu_int(&r, 0, 1) ? PIKV_DTYPE_F16 : PIKV_DTYPE_F32;
        p.placement = (pikv_placement)tu_int(&r, 0, 2);
        if (p.n_experts == 1 || p.placement == PIKV_PLACEMENT_HASH)
            p.n_shards = (int)tu_int(&r, 0, 4);
        p.hash_tokens = (int)tu_int(&r, 0, 5);
        p.max_sequences = 4;
        int evict = tu_int(&r, 0, 1) == 1;
        if (evict) {
            p.select.sink_tokens = (int)tu_int(&r, 0, 3);
            p.select.recent_tokens = (int)tu_int(&r, 0, 5);
            p.budget.mode = PIKV_BUDGET_UNIFORM;
            p.budget.total_tokens = (int64_t)p.n_layers * (p.select.sink_tokens + p.select.recent_tokens +
                                                           tu_int(&r, 2, 20));
            p.evict.policy = (pikv_evict_policy)tu_int(&r, 1, 5);
        }
        tu_set_case("bound seed %llu: devs %d layers %d heads %d/%d hd %d experts %d/%d ps %d %s placement %d "
                    "shards %d evict %d", (unsigned long long)seed, ndev, p.n_layers, p.n_q_heads, p.n_kv_heads,
                    p.head_dim, p.n_experts, p.experts_per_token, p.page_size,
                    p.dtype == PIKV_DTYPE_F16 ? "f16" : "f32", (int)p.placement, p.n_shards, (int)p.evict.policy);
        pikv_cache *c = NULL;
        if (!CHECK_OK(pikv_cache_create(g_ctx[ndev], &p, &c)))
            continue;
        tu_model m;
        tu_model_init(&m, &p);
        const float amps[4] = {0.01f, 1.0f, 7.0f, 50.0f};
        int nseq = (int)tu_int(&r, 1, 3);
        for (int s = 0; s < nseq; s++) {
            CHECK_OK(pikv_seq_add(c, s));
            for (int l = 0; l < p.n_layers; l++) {
                int len = (int)tu_int(&r, 0, 60);
                while (tu_model_seq(&m, l, s)->n < len)
                    CHECK_OK(append_varied(c, &m, &r, l, s, (int)tu_int(&r, 1, 7), amps[tu_int(&r, 0, 3)]));
            }
        }
        if (tu_int(&r, 0, 9) < 4) { /* prefix copy: partly covered pages are copied with tighter bounds */
            int64_t mn = INT64_MAX;
            for (int l = 0; l < p.n_layers; l++)
                mn = tu_model_seq(&m, l, 0)->n < mn ? tu_model_seq(&m, l, 0)->n : mn;
            int64_t n = tu_int(&r, 0, mn);
            if (CHECK_OK(pikv_seq_copy_prefix(c, 0, nseq, n))) {
                tu_model_copy_prefix(&m, 0, nseq, n);
                n_copies++;
                for (int l = 0; l < p.n_layers; l++)
                    if (tu_int(&r, 0, 1))
                        CHECK_OK(append_varied(c, &m, &r, l, nseq, (int)tu_int(&r, 1, 9), amps[tu_int(&r, 0, 3)]));
            }
        }
        /* pages moved between devices (BALANCED) or slots (trim) keep their bounds */
        if (p.placement == PIKV_PLACEMENT_BALANCED && tu_int(&r, 0, 1)) {
            int64_t moved = 0;
            CHECK_OK(pikv_cache_rebalance(c, &moved));
            n_moved += moved;
        }
        if (tu_int(&r, 0, 2) == 0) {
            CHECK_OK(pikv_cache_trim(c));
            n_trims++;
        }
        pikv_cache_stats st = pt_stats(c);
        n_evicted += st.evicted_pages;
        for (int l = 0; l < p.n_layers; l++)
            for (int d = 0; d < c->n_devs; d++)
                bound_check_device(c, &m, l, d, &r, &n_checked);
        n_f16 += p.dtype == PIKV_DTYPE_F16;
        n_gqa += p.n_q_heads > p.n_kv_heads;
        tu_model_free(&m);
        pikv_cache_free(c);
    }
    tu_set_case("");
    /* the property ran on enough pages of each kind */
    CHECKF(n_checked > 10000 && n_f16 > 50 && n_gqa > 50 && n_copies > 30 && n_evicted > 100 && n_moved > 10 &&
               n_trims > 30,
           "checked %ld (f16 caches %ld, GQA %ld, copies %ld, evicted pages %ld, moved %ld, trims %ld)", n_checked,
           n_f16, n_gqa, n_copies, n_evicted, n_moved, n_trims);
    printf("quest_bound_whitebox: %ld (page, KV head, query) bounds checked\n", n_checked);
}

/* ------------------------------------------------------------------------ */
/* 2. QUEST / EXPERTS selection against a budgeted top-k computed here       */
/* ------------------------------------------------------------------------ */

typedef struct sel_expect {
    uint8_t *mask;        /* [nkv][n_tok] */
    int64_t tokens;       /* over the query's KV heads */
    int64_t pages;
    int64_t scored;       /* candidates whose Quest bounds were read (QUEST) */
    int ambiguous;        /* two Quest bounds too close to call */
} sel_expect;

static int expert_wanted(const pikv_cache_params *p, const pikv_select_params *sel, const int32_t *qexp,
                         const pt_page *pg)
{
    if (!(sel->mode & PIKV_SELECT_EXPERTS) || p->n_experts == 1)
        return 1;
    int k = sel->experts_top_k > 0 ? sel->experts_top_k : p->experts_per_token;
    for (int j = 0; j < k; j++) {
        if (p->placement == PIKV_PLACEMENT_HASH) {
            if ((pg->mask >> (qexp[j] % 64)) & 1u)
                return 1;
        } else if (pg->shard == qexp[j]) {
            return 1;
        }
    }
    return 0;
}

/* What one query reads: forced pages, the wanted shards, and under QUEST each KV head's
   greedy top pages by Quest bound (ties to the earlier candidate) while they fit. */
static void expect_reads(const pikv_cache_params *p, const pikv_select_params *sel, const pt_page_model *pm,
                         int64_t n_tok, const float *q, const int32_t *qexp, const float *K, sel_expect *x)
{
    const int nkv = p->n_kv_heads;
    x->mask = tu_xcalloc((size_t)nkv * (size_t)(n_tok + 1), 1);
    x->tokens = x->pages = x->scored = 0;
    x->ambiguous = 0;
    int *forced = tu_xcalloc((size_t)pm->n_pages + 1, sizeof(int));
    int *cand = tu_xcalloc((size_t)pm->n_pages + 1, sizeof(int));
    double *score = tu_xcalloc((size_t)pm->n_pages + 1, sizeof(double));
    double *mag = tu_xcalloc((size_t)pm->n_pages + 1, sizeof(double));
    int *order = tu_xcalloc((size_t)pm->n_pages + 1, sizeof(int));
    int64_t forced_tokens = 0;
    for (int j = 0; j < pm->n_pages; j++) {
        forced[j] = pt_forced(&pm->pages[j], n_tok, sel->sink_tokens, sel->recent_tokens);
        cand[j] = forced[j] || (qexp ? expert_wanted(p, sel, qexp, &pm->pages[j]) : p->n_experts == 1 ||
                                                                                     !(sel->mode & PIKV_SELECT_EXPERTS));
        if (forced[j])
            forced_tokens += pm->pages[j].n;
    }
    for (int g = 0; g < nkv; g++) {
        int no = 0;
        for (int j = 0; j < pm->n_pages; j++) {
            if (!cand[j])
                continue;
            int keep = 1;
            if ((sel->mode & PIKV_SELECT_QUEST) && !forced[j]) {
                keep = 0;
                score[j] = pt_quest_bound(pm->pages[j].tok, pm->pages[j].n, g, p->n_q_heads, nkv, p->head_dim, q, K,
                                          &mag[j], NULL);
                order[no++] = j;
            }
            if (keep) {
                for (int i = 0; i < pm->pages[j].n; i++)
                    x->mask[(size_t)g * n_tok + pm->pages[j].tok[i]] = 1;
                x->tokens += pm->pages[j].n;
                x->pages++;
            }
        }
        if (g == 0)
            x->scored = no;
        if (no == 0)
            continue;
        /* stable insertion sort: score descending, candidate order on ties */
        for (int a = 1; a < no; a++) {
            int v = order[a], b = a;
            while (b > 0 && score[order[b - 1]] < score[v]) {
                order[b] = order[b - 1];
                b--;
            }
            order[b] = v;
        }
        for (int a = 0; a + 1 < no; a++) {
            double s0 = score[order[a]], s1 = score[order[a + 1]];
            double tol = 2e-5 * fmax(mag[order[a]], mag[order[a + 1]]) + 1e-30;
            if (fabs(s0 - s1) <= tol)
                x->ambiguous = 1;
        }
        int64_t left = (int64_t)sel->token_budget - forced_tokens;
        if (left < 0)
            left = 0;
        for (int a = 0; a < no; a++) {
            const pt_page *pg = &pm->pages[order[a]];
            if (pg->n > left)
                continue;
            left -= pg->n;
            for (int i = 0; i < pg->n; i++)
                x->mask[(size_t)g * n_tok + pg->tok[i]] = 1;
            x->tokens += pg->n;
            x->pages++;
        }
    }
    free(forced);
    free(cand);
    free(score);
    free(mag);
    free(order);
}

/* Share of the exact softmax of head h held by the masked tokens (-1: no tokens at all). */
static double mass_share(const tu_model *m, int layer, int seq, const float *q, int h, const uint8_t *mask)
{
    const tu_seq *s = tu_model_seq(m, layer, seq);
    if (s->n == 0)
        return -1.0;
    int g = h / (m->nqh / m->nkv);
    double mx = -INFINITY;
    double *sc = tu_xmalloc((size_t)s->n * sizeof(double));
    for (int64_t t = 0; t < s->n; t++) {
        const float *k = s->ks + ((size_t)t * m->nkv + g) * m->hd;
        double a = 0.0;
        for (int d = 0; d < m->hd; d++)
            a += (double)q[(size_t)h * m->hd + d] * k[d];
        sc[t] = a * m->scale;
        mx = sc[t] > mx ? sc[t] : mx;
    }
    double all = 0.0, sel = 0.0;
    for (int64_t t = 0; t < s->n; t++) {
        double w = exp(sc[t] - mx);
        all += w;
        if (mask[(size_t)g * s->n + t])
            sel += w;
    }
    free(sc);
    return sel / all;
}

static void test_quest_random(void)
{
    long compared = 0, skipped = 0, with_experts = 0, batches_exact_stats = 0;
    for (uint64_t seed = 1; seed <= 250; seed++) {
        tu_rng r = tu_rng_seed(seed * 104729u + 5);
        int ndev = (int)tu_int(&r, 1, 3);
        pikv_cache_params p = pt_params();
        p.n_kv_heads = (int)tu_int(&r, 1, 3);
        p.n_q_heads = p.n_kv_heads * (int)tu_int(&r, 1, 3);
        p.head_dim = (int)tu_int(&r, 2, 24);
        int ne_opts[3] = {1, 3, 6};
        p.n_experts = ne_opts[tu_int(&r, 0, 2)];
        p.experts_per_token = (int)tu_int(&r, 1, p.n_experts < 3 ? p.n_experts : 3);
        p.page_size = (int)tu_int(&r, 1, 6);
        p.dtype = tu_int(&r, 0, 1) ? PIKV_DTYPE_F16 : PIKV_DTYPE_F32;
        p.placement = (pikv_placement)tu_int(&r, 0, 2);
        if (p.n_experts == 1 || p.placement == PIKV_PLACEMENT_HASH)
            p.n_shards = (int)tu_int(&r, 0, 4);
        p.hash_tokens = (int)tu_int(&r, 0, 5);
        p.max_sequences = 4;
        tu_set_case("quest_random seed %llu: devs %d heads %d/%d hd %d experts %d/%d ps %d %s placement %d shards %d",
                    (unsigned long long)seed, ndev, p.n_q_heads, p.n_kv_heads, p.head_dim, p.n_experts,
                    p.experts_per_token, p.page_size, p.dtype == PIKV_DTYPE_F16 ? "f16" : "f32", (int)p.placement,
                    p.n_shards);
        pikv_cache *c = NULL;
        if (!CHECK_OK(pikv_cache_create(g_ctx[ndev], &p, &c)))
            continue;
        tu_model m;
        tu_model_init(&m, &p);
        const int nseq = (int)tu_int(&r, 1, 3);
        pt_page_model pm[4];
        const int32_t n_shards = pt_stats(c).n_shards;
        for (int s = 0; s < nseq; s++) {
            CHECK_OK(pikv_seq_add(c, s));
            int len = tu_int(&r, 0, 7) == 0 ? 0 : (int)tu_int(&r, 1, 50);
            while (tu_model_seq(&m, 0, s)->n < len)
                CHECK_OK(tu_append_random(c, &m, &r, 0, s, tu_int(&r, 1, 9), 1));
            int32_t *t1 = model_top1(&m, 0, s);
            pt_pages_build(&pm[s], &p, n_shards, tu_model_seq(&m, 0, s)->n, t1);
            free(t1);
        }
        if (p.placement == PIKV_PLACEMENT_BALANCED && tu_int(&r, 0, 1)) /* pages move, reads do not change */
            CHECK_OK(pikv_cache_rebalance(c, NULL));
        if (tu_int(&r, 0, 3) == 0)
            CHECK_OK(pikv_cache_trim(c));
        for (int trial = 0; trial < 4; trial++) {
            pikv_select_params sel = p.select;
            sel.mode = PIKV_SELECT_QUEST;
            if (p.n_experts > 1 && tu_int(&r, 0, 1))
                sel.mode |= PIKV_SELECT_EXPERTS;
            sel.sink_tokens = (int)tu_int(&r, 0, 5);
            sel.recent_tokens = (int)tu_int(&r, 0, 5);
            sel.token_budget = sel.sink_tokens + sel.recent_tokens + (int)tu_int(&r, 0, 40);
            if (sel.token_budget < 1)
                sel.token_budget = 1;
            sel.experts_top_k = (int)tu_int(&r, 0, p.experts_per_token);
            sel.measure = (int)tu_int(&r, 0, 1);
            const int nq = (int)tu_int(&r, 1, 4);
            const size_t per = (size_t)p.n_q_heads * p.head_dim;
            int32_t seqs[4], qex[4 * 3];
            float *q = tu_xmalloc((size_t)nq * per * sizeof(float));
            float *out = tu_xmalloc((size_t)nq * per * sizeof(float));
            float *lse = tu_xmalloc((size_t)nq * p.n_q_heads * sizeof(float));
            for (int i = 0; i < nq; i++) {
                seqs[i] = (int32_t)tu_int(&r, 0, nseq - 1);
                tu_fill(&r, q + (size_t)i * per, per, (float)(0.5 + 2.5 * tu_unif(&r)));
                tu_pick_experts(&r, p.n_experts, p.experts_per_token, 0, qex + (size_t)i * p.experts_per_token);
            }
            pikv_attend_batch b = pt_batch(nq, seqs, q, qex, out, lse, &sel);
            pikv_status st = pikv_cache_attend(c, 0, &b);
            if (!CHECK_OK(st)) {
                free(q);
                free(out);
                free(lse);
                continue;
            }
            pikv_cache_stats cs = pt_stats(c);
            int64_t tokens = 0, pages = 0, scored = 0;
            int any_amb = 0;
            double recall_sum = 0.0, max_err = 0.0;
            long recall_n = 0;
            double *ro = tu_xmalloc(per * sizeof(double)), *rl = tu_xmalloc((size_t)p.n_q_heads * sizeof(double));
            double *eo = tu_xmalloc(per * sizeof(double));
            for (int i = 0; i < nq; i++) {
                const tu_seq *s = tu_model_seq(&m, 0, seqs[i]);
                sel_expect x;
                expect_reads(&p, &sel, &pm[seqs[i]], s->n, q + (size_t)i * per, qex + (size_t)i * p.experts_per_token,
                             s->ks, &x);
                tokens += x.tokens;
                pages += x.pages;
                scored += x.scored;
                if (x.ambiguous) {
                    any_amb = 1;
                    skipped++;
                    free(x.mask);
                    continue;
                }
                pt_ref_masked(s->n, p.n_q_heads, p.n_kv_heads, p.head_dim, m.scale, q + (size_t)i * per, s->ks, s->vs,
                              x.mask, ro, rl);
                double err = tu_norm_err(out + (size_t)i * per, ro, per);
                double lerr = pt_lse_err(lse + (size_t)i * p.n_q_heads, rl, p.n_q_heads);
                CHECKF(err <= TU_TOL_EXACT && lerr <= TU_TOL_LSE,
                       "trial %d query %d (seq %d, %lld tokens, mode %u, budget %d, sink %d, recent %d, top_k %d): "
                       "output error %.3g, lse error %.3g vs dense over the expected pages",
                       trial, i, seqs[i], (long long)s->n, sel.mode, sel.token_budget, sel.sink_tokens,
                       sel.recent_tokens, sel.experts_top_k, err, lerr);
                compared++;
                with_experts += (sel.mode & PIKV_SELECT_EXPERTS) != 0;
                /* what measurement should report: mass share and error vs the exact output */
                tu_model_ref(&m, 0, seqs[i], -1, q + (size_t)i * per, 1, eo, NULL);
                for (int h = 0; h < p.n_q_heads; h++) {
                    double share = mass_share(&m, 0, seqs[i], q + (size_t)i * per, h, x.mask);
                    if (share >= 0.0) {
                        recall_sum += share;
                        recall_n++;
                    }
                }
                double q_ref = 0.0, q_err = 0.0; /* normalized per query, the worst query */
                for (size_t j = 0; j < per; j++) {
                    q_ref = fmax(q_ref, fabs(eo[j]));
                    q_err = fmax(q_err, fabs((double)out[(size_t)i * per + j] - eo[j]));
                }
                max_err = fmax(max_err, q_ref > 0.0 ? q_err / q_ref : q_err);
                free(x.mask);
            }
            if (!any_amb) {
                batches_exact_stats++;
                CHECK_EQ(cs.last_tokens_read, tokens / p.n_kv_heads);
                CHECK_EQ(cs.last_pages_read, pages / p.n_kv_heads);
                /* K and V rows of each KV head read, plus the bounds of every scored page */
                CHECK_EQ(cs.last_bytes_read,
                         (uint64_t)tokens * 2u * (uint64_t)p.head_dim * (p.dtype == PIKV_DTYPE_F16 ? 2u : 4u) +
                             (uint64_t)scored * 2u * (uint64_t)p.n_kv_heads * (uint64_t)p.head_dim * 4u);
                if (sel.measure) {
                    double recall = recall_n ? recall_sum / (double)recall_n : 1.0;
                    double error = max_err;
                    CHECKF(fabs(cs.last_recall - recall) <= 1e-4, "recall %.6g, expected %.6g", cs.last_recall, recall);
                    CHECKF(fabs(cs.last_output_error - error) <= 1e-4 + 1e-3 * error, "output error %.6g, expected %.6g",
                           cs.last_output_error, error);
                } else {
                    CHECK(cs.last_recall == -1.0 && cs.last_output_error == -1.0);
                }
            }
            free(ro);
            free(rl);
            free(eo);
            free(q);
            free(out);
            free(lse);
        }
        for (int s = 0; s < nseq; s++)
            pt_pages_free(&pm[s]);
        tu_model_free(&m);
        pikv_cache_free(c);
    }
    tu_set_case("");
    CHECKF(compared > 1500 && skipped * 10 < compared && with_experts > 250 && batches_exact_stats > 700,
           "compared %ld queries (%ld with EXPERTS), %ld too close to call, %ld batches with exact stats", compared,
           with_experts, skipped, batches_exact_stats);
    printf("quest_random: %ld queries compared, %ld skipped (near-tied bounds)\n", compared, skipped);
}

/* ------------------------------------------------------------------------ */
/* 3. Hand-built caches                                                      */
/* ------------------------------------------------------------------------ */

/* Attends one query per sequence listed, checks each output against dense attention over
   mask[i] (per KV head) and returns the stats. */
static pikv_cache_stats attend_expect(pikv_cache *c, const pikv_cache_params *p, int nq, const int32_t *seqs,
                                      const float *q, const int32_t *qex, const pikv_select_params *sel,
                                      int64_t n_tok, const float *K, const float *V, uint8_t *const *mask,
                                      const char *what)
{
    const size_t per = (size_t)p->n_q_heads * p->head_dim;
    float *out = tu_xmalloc((size_t)nq * per * sizeof(float));
    float *lse = tu_xmalloc((size_t)nq * p->n_q_heads * sizeof(float));
    double *ro = tu_xmalloc(per * sizeof(double)), *rl = tu_xmalloc((size_t)p->n_q_heads * sizeof(double));
    double scale = p->attn_scale > 0 ? p->attn_scale : 1.0 / sqrt((double)p->head_dim);
    pikv_attend_batch b = pt_batch(nq, seqs, q, qex, out, lse, sel);
    pikv_cache_stats s;
    memset(&s, 0, sizeof s);
    if (CHECK_OK(pikv_cache_attend(c, 0, &b))) {
        for (int i = 0; i < nq; i++) {
            pt_ref_masked(n_tok, p->n_q_heads, p->n_kv_heads, p->head_dim, scale, q + (size_t)i * per, K, V, mask[i],
                          ro, rl);
            double err = tu_norm_err(out + (size_t)i * per, ro, per);
            double lerr = pt_lse_err(lse + (size_t)i * p->n_q_heads, rl, p->n_q_heads);
            CHECKF(err <= TU_TOL_EXACT && lerr <= TU_TOL_LSE, "%s: query %d: output error %.3g, lse error %.3g", what,
                   i, err, lerr);
        }
        s = pt_stats(c);
    }
    free(out);
    free(lse);
    free(ro);
    free(rl);
    return s;
}

static void mask_pages(uint8_t *mask, int64_t n_tok, int g, int ps, const int *pages, int n_pages)
{
    for (int j = 0; j < n_pages; j++)
        for (int t = pages[j] * ps; t < (pages[j] + 1) * ps && t < n_tok; t++)
            mask[(size_t)g * n_tok + t] = 1;
}

/* QUEST on a dense cache of 10 pages (sink page 0 and recent page 9 forced): KV head 0's keys
   on page a, and KV head 1's keys on page b, point along the query (bound ~12); pages c (head 0)
   and d (head 1) less so (~6); the rest is noise (~0.5). A budget of the forced pages plus
   one page reads exactly a / b; plus two pages, a and c / b and d; just the forced pages, nothing
   else. Every target page position is tried, on 1 and 2 devices. */
static void test_quest_crafted(void)
{
    for (int ndev = 1; ndev <= 2; ndev++)
        for (int a = 1; a <= 8; a++) {
            const int b = 9 - a, c0 = a == 4 ? 2 : 4, ps = 4, n = 40, hd = 16;
            int d1 = 1;
            while (d1 == a || d1 == b || d1 == c0)
                d1++;
            tu_set_case("quest_crafted: devices %d, head 0 pages %d then %d, head 1 pages %d then %d", ndev, a, c0, b,
                        d1);
            pikv_cache_params p = pt_params();
            p.select.sink_tokens = 4;
            p.select.recent_tokens = 4;
            pikv_cache *c = NULL;
            if (!CHECK_OK(pikv_cache_create(g_ctx[ndev], &p, &c)))
                continue;
            tu_rng r = tu_rng_seed(1000u + (unsigned)a);
            float *K = tu_xmalloc((size_t)n * 2 * hd * sizeof(float)), *V = tu_xmalloc((size_t)n * 2 * hd * sizeof(float));
            tu_fill(&r, K, (size_t)n * 2 * hd, 0.1f);
            tu_fill(&r, V, (size_t)n * 2 * hd, 1.0f);
            for (int t = 0; t < n; t++) {
                const int j = t / ps;
                if (j == a)
                    K[((size_t)t * 2 + 0) * hd + 0] = 3.0f + tu_sym(&r, 0.1f);
                if (j == c0)
                    K[((size_t)t * 2 + 0) * hd + 0] = 1.5f + tu_sym(&r, 0.1f);
                if (j == b)
                    K[((size_t)t * 2 + 1) * hd + 1] = 3.0f + tu_sym(&r, 0.1f);
                if (j == d1)
                    K[((size_t)t * 2 + 1) * hd + 1] = 1.5f + tu_sym(&r, 0.1f);
            }
            CHECK_OK(pikv_seq_add(c, 0));
            CHECK_OK(pikv_cache_append(c, 0, 0, n, K, V, NULL, NULL));
            float q[4 * 16];
            tu_fill(&r, q, 4 * 16, 0.05f);
            q[0 * hd + 0] = 4.0f; /* query heads 0, 1 read KV head 0 */
            q[1 * hd + 0] = 3.0f;
            q[2 * hd + 1] = 4.0f; /* query heads 2, 3 read KV head 1 */
            q[3 * hd + 1] = 2.0f;
            int32_t seq0 = 0;
            uint8_t *mask = tu_xcalloc(2 * n, 1);
            uint8_t *masks[1] = {mask};
            pikv_select_params sel = p.select;
            sel.mode = PIKV_SELECT_QUEST;
            const int budgets[5] = {8, 12, 15, 16, 19}, extras[5] = {0, 1, 1, 2, 2};
            const int forced[2] = {0, 9}, head0[2] = {a, c0}, head1[2] = {b, d1};
            for (int bi = 0; bi < 5; bi++) {
                sel.token_budget = budgets[bi];
                memset(mask, 0, 2 * n);
                mask_pages(mask, n, 0, ps, forced, 2);
                mask_pages(mask, n, 1, ps, forced, 2);
                mask_pages(mask, n, 0, ps, head0, extras[bi]);
                mask_pages(mask, n, 1, ps, head1, extras[bi]);
                pikv_cache_stats s = attend_expect(c, &p, 1, &seq0, q, NULL, &sel, n, K, V, masks, "quest_crafted");
                CHECK_EQ(s.last_tokens_read, 8 + 4 * extras[bi]);
                CHECK_EQ(s.last_pages_read, 2 + extras[bi]);
            }
            /* sinks reaching into page 1 force it too (12 forced tokens); a budget of 16 leaves room
               for each head's best page that is not forced */
            sel.sink_tokens = 5;
            sel.token_budget = 16;
            memset(mask, 0, 2 * n);
            const int f3[3] = {0, 1, 9};
            for (int g = 0; g < 2; g++)
                mask_pages(mask, n, g, ps, f3, 3);
            mask_pages(mask, n, 0, ps, a != 1 ? &a : &c0, 1);
            mask_pages(mask, n, 1, ps, b != 1 ? &b : &d1, 1);
            pikv_cache_stats s = attend_expect(c, &p, 1, &seq0, q, NULL, &sel, n, K, V, masks, "quest_crafted sink 5");
            CHECK_EQ(s.last_tokens_read, 16);
            free(mask);
            free(K);
            free(V);
            pikv_cache_free(c);
        }
    tu_set_case("");
}

/* Equal Quest bounds: the page met first (one shard: the older page) is kept. Pages 2 and 5
   hold the same keys (so the same bounds) but different values. */
static void test_quest_ties(void)
{
    tu_set_case("quest ties");
    const int n = 32, hd = 16, nkv = 2, ps = 4;
    pikv_cache_params p = pt_params();
    pikv_cache *c = NULL;
    if (!CHECK_OK(pikv_cache_create(g_ctx[1], &p, &c)))
        return;
    tu_rng r = tu_rng_seed(606);
    float *K = tu_xmalloc((size_t)n * nkv * hd * sizeof(float)), *V = tu_xmalloc((size_t)n * nkv * hd * sizeof(float));
    tu_fill(&r, K, (size_t)n * nkv * hd, 0.1f);
    tu_fill(&r, V, (size_t)n * nkv * hd, 1.0f);
    for (int t = 8; t < 12; t++)
        for (int g = 0; g < nkv; g++)
            K[((size_t)t * nkv + g) * hd + 3] = 2.5f;
    memcpy(K + (size_t)20 * nkv * hd, K + (size_t)8 * nkv * hd, (size_t)ps * nkv * hd * sizeof(float));
    CHECK_OK(pikv_seq_add(c, 0));
    CHECK_OK(pikv_cache_append(c, 0, 0, n, K, V, NULL, NULL));
    float q[4 * 16];
    tu_fill(&r, q, 64, 0.05f);
    for (int h = 0; h < 4; h++)
        q[h * hd + 3] = 3.0f;
    int32_t seq0 = 0;
    uint8_t *mask = tu_xcalloc((size_t)nkv * n, 1);
    uint8_t *masks[1] = {mask};
    int pg = 2;
    for (int g = 0; g < nkv; g++)
        mask_pages(mask, n, g, ps, &pg, 1);
    pikv_select_params sel = p.select;
    sel.mode = PIKV_SELECT_QUEST;
    sel.token_budget = 4;
    pikv_cache_stats s = attend_expect(c, &p, 1, &seq0, q, NULL, &sel, n, K, V, masks, "tie: the older page");
    CHECK_EQ(s.last_tokens_read, 4);
    sel.token_budget = 8; /* both */
    pg = 5;
    for (int g = 0; g < nkv; g++)
        mask_pages(mask, n, g, ps, &pg, 1);
    s = attend_expect(c, &p, 1, &seq0, q, NULL, &sel, n, K, V, masks, "tie: both");
    CHECK_EQ(s.last_tokens_read, 8);
    free(mask);
    free(K);
    free(V);
    pikv_cache_free(c);
    tu_set_case("");
}

/* EXPERTS: a query reads exactly the pages of its first experts_top_k experts' shards
   (EXPERT placement) or the pages holding one of them (HASH), plus sink and recent pages. */
static void experts_case(pikv_placement placement, int ndev)
{
    tu_set_case("experts_crafted: placement %d devices %d", (int)placement, ndev);
    pikv_cache_params p = pt_params();
    p.n_experts = 4;
    p.experts_per_token = 2;
    p.head_dim = 8;
    p.placement = placement;
    if (placement == PIKV_PLACEMENT_HASH) {
        p.n_shards = 3;
        p.hash_tokens = 5;
    }
    p.select.sink_tokens = 2;
    p.select.recent_tokens = 3;
    pikv_cache *c = NULL;
    if (!CHECK_OK(pikv_cache_create(g_ctx[ndev], &p, &c)))
        return;
    const int n = 48, hd = 8, nkv = 2;
    tu_rng r = tu_rng_seed(77u + (unsigned)placement);
    float *K = tu_xmalloc((size_t)n * nkv * hd * sizeof(float)), *V = tu_xmalloc((size_t)n * nkv * hd * sizeof(float));
    tu_fill(&r, K, (size_t)n * nkv * hd, 1.0f);
    tu_fill(&r, V, (size_t)n * nkv * hd, 1.0f);
    int32_t ex[48 * 2], top1[48];
    for (int t = 0; t < n; t++) { /* experts 0..2 only: expert 3's shard stays empty */
        top1[t] = (t * 7 + t / 5) % 3;
        ex[2 * t] = top1[t];
        ex[2 * t + 1] = (top1[t] + 1) % 4;
    }
    CHECK_OK(pikv_seq_add(c, 0));
    CHECK_OK(pikv_cache_append(c, 0, 0, 20, K, V, NULL, ex));
    CHECK_OK(pikv_cache_append(c, 0, 0, n - 20, K + 20 * nkv * hd, V + 20 * nkv * hd, NULL, ex + 40));
    pt_page_model pm;
    pt_pages_build(&pm, &p, pt_stats(c).n_shards, n, top1);
    const int32_t qex[4 * 2] = {1, 2, 2, 0, 3, 1, 0, 3};
    int32_t seqs[4] = {0, 0, 0, 0};
    float q[4 * 4 * 8];
    tu_fill(&r, q, sizeof q / sizeof q[0], 1.5f);
    for (int top_k = 0; top_k <= 2; top_k++) {
        pikv_select_params sel = p.select;
        sel.mode = PIKV_SELECT_EXPERTS;
        sel.experts_top_k = top_k;
        uint8_t *masks[4];
        int64_t tokens = 0, pages = 0;
        for (int i = 0; i < 4; i++) {
            masks[i] = tu_xcalloc((size_t)nkv * n, 1);
            int k = top_k ? top_k : 2;
            for (int j = 0; j < pm.n_pages; j++) {
                const pt_page *pg = &pm.pages[j];
                int want = pt_forced(pg, n, 2, 3);
                for (int x = 0; x < k; x++) {
                    int e = qex[2 * i + x];
                    want |= placement == PIKV_PLACEMENT_HASH ? (int)((pg->mask >> e) & 1u) : pg->shard == e;
                }
                if (!want)
                    continue;
                tokens += pg->n;
                pages++;
                for (int g = 0; g < nkv; g++)
                    for (int x = 0; x < pg->n; x++)
                        masks[i][(size_t)g * n + pg->tok[x]] = 1;
            }
        }
        pikv_cache_stats s = attend_expect(c, &p, 4, seqs, q, qex, &sel, n, K, V, masks, "experts_crafted");
        CHECK_EQ(s.last_tokens_read, tokens);
        CHECK_EQ(s.last_pages_read, pages);
        CHECK(tokens < 4 * n); /* the selection really is a subset */
        /* query 2 (experts 3, 1) with top_k 1 reads only forced pages (expert 3 is empty) */
        if (top_k == 1 && placement != PIKV_PLACEMENT_HASH) {
            int64_t forced = 0;
            for (int j = 0; j < pm.n_pages; j++)
                forced += pt_forced(&pm.pages[j], n, 2, 3) ? pm.pages[j].n : 0;
            int64_t t2 = 0;
            for (int t = 0; t < n; t++)
                t2 += masks[2][t];
            CHECK_EQ(t2, forced);
        }
        for (int i = 0; i < 4; i++)
            free(masks[i]);
    }
    pt_pages_free(&pm);
    free(K);
    free(V);
    pikv_cache_free(c);
    tu_set_case("");
}

/* EXPERTS+QUEST: the page most aligned with the query lies in another expert's shard; the
   query's own shard's best page is read instead. QUEST alone reads the decoy. */
static void test_experts_quest_composition(void)
{
    tu_set_case("experts+quest composition");
    pikv_cache_params p = pt_params();
    p.n_experts = 4;
    p.experts_per_token = 1;
    const int n = 32, hd = 16, nkv = 2, ps = 4;
    pikv_cache *c = NULL;
    if (!CHECK_OK(pikv_cache_create(g_ctx[2], &p, &c)))
        return;
    tu_rng r = tu_rng_seed(4242);
    float *K = tu_xmalloc((size_t)n * nkv * hd * sizeof(float)), *V = tu_xmalloc((size_t)n * nkv * hd * sizeof(float));
    tu_fill(&r, K, (size_t)n * nkv * hd, 0.1f);
    tu_fill(&r, V, (size_t)n * nkv * hd, 1.0f);
    int32_t ex[32];
    for (int t = 0; t < n; t++)
        ex[t] = t < 16 ? 1 : 2; /* shard 1: pages of tokens 0-15; shard 2: 16-31 */
    for (int t = 0; t < n; t++)
        for (int g = 0; g < nkv; g++) {
            if (t / ps == 2) /* shard 1's third page */
                K[((size_t)t * nkv + g) * hd + 0] = 3.0f;
            if (t / ps == 5) /* shard 2's second page: the decoy */
                K[((size_t)t * nkv + g) * hd + 0] = 6.0f;
        }
    CHECK_OK(pikv_seq_add(c, 0));
    CHECK_OK(pikv_cache_append(c, 0, 0, n, K, V, NULL, ex));
    float q[4 * 16];
    tu_fill(&r, q, 4 * 16, 0.05f);
    for (int h = 0; h < 4; h++)
        q[h * hd] = 4.0f;
    int32_t seq0 = 0, qexp = 1;
    uint8_t *mask = tu_xcalloc((size_t)nkv * n, 1);
    uint8_t *masks[1] = {mask};
    pikv_select_params sel = p.select;
    sel.mode = PIKV_SELECT_EXPERTS | PIKV_SELECT_QUEST;
    sel.token_budget = 4;
    int pg = 2;
    for (int g = 0; g < nkv; g++)
        mask_pages(mask, n, g, ps, &pg, 1);
    pikv_cache_stats s = attend_expect(c, &p, 1, &seq0, q, &qexp, &sel, n, K, V, masks, "experts+quest");
    CHECK_EQ(s.last_tokens_read, 4);
    sel.mode = PIKV_SELECT_QUEST;
    memset(mask, 0, (size_t)nkv * n);
    pg = 5;
    for (int g = 0; g < nkv; g++)
        mask_pages(mask, n, g, ps, &pg, 1);
    s = attend_expect(c, &p, 1, &seq0, q, &qexp, &sel, n, K, V, masks, "quest alone");
    CHECK_EQ(s.last_tokens_read, 4);
    /* EXPERTS alone: all of shard 1 */
    sel.mode = PIKV_SELECT_EXPERTS;
    memset(mask, 0, (size_t)nkv * n);
    int sh1[4] = {0, 1, 2, 3};
    for (int g = 0; g < nkv; g++)
        mask_pages(mask, n, g, ps, sh1, 4);
    s = attend_expect(c, &p, 1, &seq0, q, &qexp, &sel, n, K, V, masks, "experts alone");
    CHECK_EQ(s.last_tokens_read, 16);
    free(mask);
    free(K);
    free(V);
    pikv_cache_free(c);
    tu_set_case("");
}

/* batch.select overrides the cache default, both ways; NULL means the default. */
static void test_select_override(void)
{
    const int n = 40, hd = 16, nkv = 2, ps = 4;
    tu_rng r = tu_rng_seed(99);
    float *K = tu_xmalloc((size_t)n * nkv * hd * sizeof(float)), *V = tu_xmalloc((size_t)n * nkv * hd * sizeof(float));
    tu_fill(&r, K, (size_t)n * nkv * hd, 0.1f);
    tu_fill(&r, V, (size_t)n * nkv * hd, 1.0f);
    for (int t = 12; t < 16; t++) /* page 3 */
        for (int g = 0; g < nkv; g++)
            K[((size_t)t * nkv + g) * hd + 2] = 3.0f;
    float q[4 * 16];
    tu_fill(&r, q, 4 * 16, 0.05f);
    for (int h = 0; h < 4; h++)
        q[h * hd + 2] = 4.0f;
    int32_t seq0 = 0;
    uint8_t *all = tu_xcalloc((size_t)nkv * n, 1), *quest = tu_xcalloc((size_t)nkv * n, 1),
            *quest2 = tu_xcalloc((size_t)nkv * n, 1);
    memset(all, 1, (size_t)nkv * n);
    int qp[3] = {0, 3, 9}, qp2[4] = {0, 1, 3, 9};
    for (int g = 0; g < nkv; g++) {
        mask_pages(quest, n, g, ps, qp, 3);
        mask_pages(quest2, n, g, ps, qp2, 4);
    }
    for (int def_quest = 0; def_quest <= 1; def_quest++) {
        tu_set_case("select override: default %s", def_quest ? "QUEST" : "ALL");
        pikv_cache_params p = pt_params();
        p.select.sink_tokens = 4;
        p.select.recent_tokens = 4;
        if (def_quest) {
            p.select.mode = PIKV_SELECT_QUEST;
            p.select.token_budget = 12;
        }
        pikv_cache *c = NULL;
        if (!CHECK_OK(pikv_cache_create(g_ctx[1], &p, &c)))
            continue;
        CHECK_OK(pikv_seq_add(c, 0));
        CHECK_OK(pikv_cache_append(c, 0, 0, n, K, V, NULL, NULL));
        pikv_select_params qs = p.select, as = p.select, qs2 = p.select;
        qs.mode = PIKV_SELECT_QUEST;
        qs.token_budget = 12;
        as.mode = PIKV_SELECT_ALL;
        qs2.mode = PIKV_SELECT_QUEST; /* other sinks than the default: pages 0 and 1 forced */
        qs2.sink_tokens = 6;
        qs2.token_budget = 16;
        uint8_t *m1[1] = {def_quest ? quest : all};
        pikv_cache_stats s = attend_expect(c, &p, 1, &seq0, q, NULL, NULL, n, K, V, m1, "default");
        CHECK_EQ(s.last_tokens_read, def_quest ? 12 : n);
        uint8_t *m2[1] = {quest};
        s = attend_expect(c, &p, 1, &seq0, q, NULL, &qs, n, K, V, m2, "QUEST override");
        CHECK_EQ(s.last_tokens_read, 12);
        uint8_t *m3[1] = {all};
        s = attend_expect(c, &p, 1, &seq0, q, NULL, &as, n, K, V, m3, "ALL override");
        CHECK_EQ(s.last_tokens_read, n);
        CHECK(s.last_recall == 1.0 && s.last_output_error == 0.0);
        uint8_t *m4[1] = {quest2};
        s = attend_expect(c, &p, 1, &seq0, q, NULL, &qs2, n, K, V, m4, "QUEST override, sinks 6");
        CHECK_EQ(s.last_tokens_read, 16);
        s = attend_expect(c, &p, 1, &seq0, q, NULL, NULL, n, K, V, m1, "default again");
        CHECK_EQ(s.last_tokens_read, def_quest ? 12 : n);
        pikv_cache_free(c);
    }
    tu_set_case("");
    free(all);
    free(quest);
    free(quest2);
    free(K);
    free(V);
}

/* ------------------------------------------------------------------------ */
/* 4. A budget holding the whole context is exact mode, bit for bit          */
/* ------------------------------------------------------------------------ */

static void test_whole_context_bitwise(void)
{
    long compared = 0;
    for (uint64_t seed = 1; seed <= 80; seed++) {
        tu_rng r = tu_rng_seed(seed * 31337u);
        int ndev = (int)tu_int(&r, 1, 3);
        pikv_cache_params p = pt_params();
        p.n_kv_heads = (int)tu_int(&r, 1, 3);
        p.n_q_heads = p.n_kv_heads * (int)tu_int(&r, 1, 3);
        p.head_dim = (int)tu_int(&r, 1, 40);
        int ne_opts[3] = {1, 3, 8};
        p.n_experts = ne_opts[tu_int(&r, 0, 2)];
        p.experts_per_token = (int)tu_int(&r, 1, p.n_experts < 2 ? 1 : 2);
        p.page_size = (int)tu_int(&r, 1, 16);
        p.dtype = tu_int(&r, 0, 1) ? PIKV_DTYPE_F16 : PIKV_DTYPE_F32;
        p.placement = (pikv_placement)tu_int(&r, 0, 2);
        p.max_sequences = 4;
        tu_set_case("whole-context seed %llu", (unsigned long long)seed);
        pikv_cache *c = NULL;
        if (!CHECK_OK(pikv_cache_create(g_ctx[ndev], &p, &c)))
            continue;
        tu_model m;
        tu_model_init(&m, &p);
        int64_t longest = 0;
        for (int s = 0; s < 3; s++) {
            CHECK_OK(pikv_seq_add(c, s));
            int len = (int)tu_int(&r, 0, 120);
            while (tu_model_seq(&m, 0, s)->n < len)
                CHECK_OK(tu_append_random(c, &m, &r, 0, s, tu_int(&r, 1, 17), 1));
            longest = tu_model_seq(&m, 0, s)->n > longest ? tu_model_seq(&m, 0, s)->n : longest;
        }
        const int nq = 5;
        int32_t seqs[5] = {0, 1, 2, 1, 0}, qex[5 * 2];
        const size_t per = (size_t)p.n_q_heads * p.head_dim;
        float *q = tu_xmalloc(nq * per * sizeof(float));
        float *o1 = tu_xmalloc(nq * per * sizeof(float)), *o2 = tu_xmalloc(nq * per * sizeof(float));
        float l1[5 * 9], l2[5 * 9];
        tu_fill(&r, q, nq * per, 2.0f);
        for (int i = 0; i < nq; i++)
            tu_pick_experts(&r, p.n_experts, p.experts_per_token, 0, qex + i * p.experts_per_token);
        pikv_select_params exact = p.select;
        exact.mode = PIKV_SELECT_ALL;
        pikv_attend_batch b = pt_batch(nq, seqs, q, qex, o1, l1, &exact);
        CHECK_OK(pikv_cache_attend(c, 0, &b));
        pikv_cache_stats se = pt_stats(c);
        for (int v = 0; v < 3; v++) {
            pikv_select_params qs = p.select;
            qs.mode = PIKV_SELECT_QUEST;
            qs.sink_tokens = (int)tu_int(&r, 0, 8);
            qs.recent_tokens = (int)tu_int(&r, 0, 8);
            qs.token_budget = v == 0 ? (int)longest : v == 1 ? INT32_MAX : (int)longest + (int)tu_int(&r, 1, 50);
            if (qs.token_budget < qs.sink_tokens + qs.recent_tokens)
                qs.token_budget = qs.sink_tokens + qs.recent_tokens;
            if (qs.token_budget < 1)
                qs.token_budget = 1;
            qs.measure = 1;
            memset(o2, 0xff, nq * per * sizeof(float));
            b = pt_batch(nq, seqs, q, qex, o2, l2, &qs);
            if (!CHECK_OK(pikv_cache_attend(c, 0, &b)))
                continue;
            CHECKF(memcmp(o1, o2, nq * per * sizeof(float)) == 0, "QUEST budget %d output differs from exact mode",
                   qs.token_budget);
            CHECKF(memcmp(l1, l2, (size_t)nq * p.n_q_heads * sizeof(float)) == 0, "QUEST budget %d lse differs",
                   qs.token_budget);
            pikv_cache_stats s = pt_stats(c);
            CHECKF(s.last_recall == 1.0 && s.last_output_error == 0.0, "recall %.17g error %.17g", s.last_recall,
                   s.last_output_error);
            CHECK_EQ(s.last_tokens_read, se.last_tokens_read);
            /* the same rows, plus the Quest bounds of the scored pages */
            const uint64_t bounds = 2u * (uint64_t)p.n_kv_heads * (uint64_t)p.head_dim * 4u;
            CHECK(s.last_bytes_read >= se.last_bytes_read && (s.last_bytes_read - se.last_bytes_read) % bounds == 0);
            compared++;
        }
        free(q);
        free(o1);
        free(o2);
        tu_model_free(&m);
        pikv_cache_free(c);
    }
    tu_set_case("");
    CHECK(compared >= 230);
}

/* ------------------------------------------------------------------------ */
/* 5. Quality measures                                                       */
/* ------------------------------------------------------------------------ */

/* Exact mode: recall 1 and error 0 (measured or not); unmeasured selection: -1 and -1. */
static void test_exact_quality(void)
{
    tu_set_case("exact quality");
    pikv_cache_params p = pt_params();
    pikv_cache *c = NULL;
    if (!CHECK_OK(pikv_cache_create(g_ctx[1], &p, &c)))
        return;
    pikv_cache_stats s0 = pt_stats(c);
    CHECK(s0.last_recall == -1.0 && s0.last_output_error == -1.0 && s0.last_hit_rate == -1.0);
    tu_model m;
    tu_model_init(&m, &p);
    tu_rng r = tu_rng_seed(5);
    CHECK_OK(pikv_seq_add(c, 0));
    CHECK_OK(tu_append_random(c, &m, &r, 0, 0, 37, 0));
    float q[4 * 16], out[4 * 16];
    tu_fill(&r, q, 64, 1.0f);
    int32_t seq0 = 0;
    for (int measure = 0; measure <= 1; measure++) {
        pikv_select_params sel = p.select;
        sel.measure = measure;
        pikv_attend_batch b = pt_batch(1, &seq0, q, NULL, out, NULL, &sel);
        CHECK_OK(pikv_cache_attend(c, 0, &b));
        pikv_cache_stats s = pt_stats(c);
        CHECK(s.last_recall == 1.0);
        CHECK(s.last_output_error == 0.0);
        CHECK(s.last_hit_rate == -1.0); /* dense: no expert information */
        sel.mode = PIKV_SELECT_QUEST;
        sel.token_budget = 8;
        b = pt_batch(1, &seq0, q, NULL, out, NULL, &sel);
        CHECK_OK(pikv_cache_attend(c, 0, &b));
        s = pt_stats(c);
        if (measure) {
            CHECK(s.last_recall > 0.0 && s.last_recall < 1.0);
            CHECK(s.last_output_error > 0.0);
        } else {
            CHECK(s.last_recall == -1.0 && s.last_output_error == -1.0);
        }
    }
    tu_model_free(&m);
    pikv_cache_free(c);
    tu_set_case("");
}

/* With pages of equal size the QUEST selection under a larger budget is a superset, so the
   measured recall never decreases; the full budget gives recall 1 and error 0. */
static void test_recall_monotone(void)
{
    long steps = 0;
    for (uint64_t seed = 1; seed <= 16; seed++) {
        tu_rng r = tu_rng_seed(seed * 2654435761u);
        pikv_cache_params p = pt_params();
        p.n_kv_heads = (int)tu_int(&r, 1, 2);
        p.n_q_heads = p.n_kv_heads * (int)tu_int(&r, 1, 3);
        p.head_dim = (int)tu_int(&r, 4, 24);
        p.page_size = (int)tu_int(&r, 2, 5);
        p.dtype = seed % 2 ? PIKV_DTYPE_F16 : PIKV_DTYPE_F32;
        int n_experts = seed % 3 == 0 ? 4 : 1;
        p.n_experts = n_experts;
        int ndev = (int)tu_int(&r, 1, 2);
        tu_set_case("recall monotone seed %llu (ps %d, experts %d)", (unsigned long long)seed, p.page_size, n_experts);
        pikv_cache *c = NULL;
        if (!CHECK_OK(pikv_cache_create(g_ctx[ndev], &p, &c)))
            continue;
        /* full pages only: every shard gets a multiple of page_size tokens */
        const int per_shard = (n_experts == 1 ? 16 : 5) * p.page_size, n = per_shard * n_experts;
        const size_t row = (size_t)p.n_kv_heads * p.head_dim;
        float *K = tu_xmalloc(n * row * sizeof(float)), *V = tu_xmalloc(n * row * sizeof(float));
        int32_t *ex = tu_xmalloc(n * sizeof(int32_t));
        tu_fill(&r, K, n * row, 1.5f);
        tu_fill(&r, V, n * row, 1.0f);
        for (int t = 0; t < n; t++)
            ex[t] = t % n_experts;
        CHECK_OK(pikv_seq_add(c, 0));
        CHECK_OK(pikv_cache_append(c, 0, 0, n, K, V, NULL, ex));
        const int nq = 3;
        const size_t per = (size_t)p.n_q_heads * p.head_dim;
        float *q = tu_xmalloc(nq * per * sizeof(float)), *out = tu_xmalloc(nq * per * sizeof(float));
        tu_fill(&r, q, nq * per, 2.0f);
        int32_t seqs[3] = {0, 0, 0};
        pikv_select_params sel = p.select;
        sel.mode = PIKV_SELECT_QUEST;
        sel.measure = 1;
        sel.sink_tokens = 0;
        sel.recent_tokens = 0;
        double prev = -1.0;
        uint64_t prev_bytes = 0;
        for (int budget = 1; budget <= n; budget++) {
            sel.token_budget = budget;
            pikv_attend_batch b = pt_batch(nq, seqs, q, NULL, out, NULL, &sel);
            if (!CHECK_OK(pikv_cache_attend(c, 0, &b)))
                break;
            pikv_cache_stats s = pt_stats(c);
            CHECKF(s.last_recall >= prev - 1e-6, "budget %d: recall %.9g < %.9g at budget %d", budget, s.last_recall,
                   prev, budget - 1);
            CHECKF(s.last_recall >= 0.0 && s.last_recall <= 1.0 + 1e-6, "budget %d: recall %.9g", budget,
                   s.last_recall);
            CHECK_LE(prev_bytes, s.last_bytes_read);
            CHECK_EQ(s.last_tokens_read, (int64_t)nq * (budget / p.page_size) * p.page_size);
            prev = s.last_recall;
            prev_bytes = s.last_bytes_read;
            if (budget == n) {
                CHECKF(s.last_recall == 1.0 && s.last_output_error == 0.0, "full budget: recall %.17g error %.17g",
                       s.last_recall, s.last_output_error);
            }
            steps++;
        }
        free(K);
        free(V);
        free(ex);
        free(q);
        free(out);
        pikv_cache_free(c);
    }
    tu_set_case("");
    CHECK(steps > 500);
}

/* last_hit_rate: share of the queries' (first experts_top_k) experts whose shard holds pages
   of the sequence; -1 without experts. */
static void test_hit_rate(void)
{
    for (int placement = 0; placement <= 2; placement += 2) { /* EXPERT, BALANCED */
        tu_set_case("hit rate, placement %d", placement);
        pikv_cache_params p = pt_params();
        p.n_experts = 4;
        p.experts_per_token = 2;
        p.placement = (pikv_placement)placement;
        pikv_cache *c = NULL;
        if (!CHECK_OK(pikv_cache_create(g_ctx[2], &p, &c)))
            continue;
        tu_rng r = tu_rng_seed(8);
        const int n = 24;
        float *K = tu_xmalloc(n * 2 * 16 * sizeof(float)), *V = tu_xmalloc(n * 2 * 16 * sizeof(float));
        tu_fill(&r, K, n * 32, 1.0f);
        tu_fill(&r, V, n * 32, 1.0f);
        int32_t ex[24 * 2];
        for (int t = 0; t < n; t++) {
            ex[2 * t] = t % 3; /* top-1 in 0..2: expert 3 holds nothing */
            ex[2 * t + 1] = 3;
        }
        CHECK_OK(pikv_seq_add(c, 0));
        CHECK_OK(pikv_seq_add(c, 1)); /* empty sequence: every shard misses */
        CHECK_OK(pikv_cache_append(c, 0, 0, n, K, V, NULL, ex));
        float q[4 * 4 * 16], out[4 * 4 * 16];
        tu_fill(&r, q, 4 * 64, 1.0f);
        struct {
            int nq;
            int32_t seqs[4];
            int32_t qex[8];
            int top_k;
            double want;
        } cases[] = {
            {1, {0}, {0, 1}, 0, 1.0},
            {1, {0}, {2, 3}, 0, 0.5},
            {2, {0, 0}, {0, 1, 2, 3}, 0, 0.75},
            {1, {0}, {3, 0}, 1, 0.0},
            {1, {0}, {0, 3}, 1, 1.0},
            {2, {0, 1}, {0, 1, 0, 1}, 0, 0.5},
            {4, {0, 0, 0, 0}, {3, 0, 3, 1, 3, 2, 0, 1}, 1, 0.25},
        };
        for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
            pikv_select_params sel = p.select;
            sel.experts_top_k = cases[k].top_k;
            for (int mode = 0; mode <= 1; mode++) { /* the rate does not depend on the selection */
                sel.mode = mode ? PIKV_SELECT_EXPERTS : PIKV_SELECT_ALL;
                pikv_attend_batch b = pt_batch(cases[k].nq, cases[k].seqs, q, cases[k].qex, out, NULL, &sel);
                CHECK_OK(pikv_cache_attend(c, 0, &b));
                pikv_cache_stats s = pt_stats(c);
                CHECKF(fabs(s.last_hit_rate - cases[k].want) < 1e-12, "case %zu mode %d: hit rate %.17g, want %g", k,
                       mode, s.last_hit_rate, cases[k].want);
            }
        }
        pikv_attend_batch b = pt_batch(1, cases[0].seqs, q, NULL, out, NULL, NULL);
        CHECK_OK(pikv_cache_attend(c, 0, &b));
        CHECK(pt_stats(c).last_hit_rate == -1.0);
        free(K);
        free(V);
        pikv_cache_free(c);
    }
    tu_set_case("");
}

/* Bytes read follow the rows read (K and V of each KV head) and shrink under selection;
   cumulative, per-device and per-layer counters add up. */
static void test_bytes_read(void)
{
    for (int f16 = 0; f16 <= 1; f16++) {
        tu_set_case("bytes read, %s", f16 ? "f16" : "f32");
        pikv_cache_params p = pt_params();
        p.n_layers = 2;
        p.n_experts = 4;
        p.experts_per_token = 2;
        p.dtype = f16 ? PIKV_DTYPE_F16 : PIKV_DTYPE_F32;
        p.select.sink_tokens = 4;
        p.select.recent_tokens = 4;
        pikv_cache *c = NULL;
        if (!CHECK_OK(pikv_cache_create(g_ctx[3], &p, &c)))
            continue;
        tu_model m;
        tu_model_init(&m, &p);
        tu_rng r = tu_rng_seed(77);
        CHECK_OK(pikv_seq_add(c, 0));
        CHECK_OK(pikv_seq_add(c, 1));
        for (int l = 0; l < 2; l++)
            for (int s = 0; s < 2; s++)
                CHECK_OK(tu_append_random(c, &m, &r, l, s, 90 + 7 * s, 0));
        const uint64_t row = 2u * 2u * 16u * (f16 ? 2u : 4u); /* K and V of both KV heads */
        float q[2 * 4 * 16], out[2 * 4 * 16];
        tu_fill(&r, q, 128, 1.0f);
        int32_t seqs[2] = {0, 1}, qex[4] = {0, 1, 2, 3};
        uint64_t total = 0, dev_total[3] = {0, 0, 0};
        uint64_t all_bytes = 0;
        for (int mode = 0; mode < 4; mode++) {
            for (int l = 0; l < 2; l++) {
                pikv_select_params sel = p.select;
                sel.mode = mode == 0 ? PIKV_SELECT_ALL : mode == 1 ? PIKV_SELECT_QUEST
                                     : mode == 2 ? PIKV_SELECT_EXPERTS
                                                 : PIKV_SELECT_EXPERTS | PIKV_SELECT_QUEST;
                sel.token_budget = 24;
                sel.experts_top_k = 1;
                pikv_attend_batch b = pt_batch(2, seqs, q, qex, out, NULL, &sel);
                if (!CHECK_OK(pikv_cache_attend(c, l, &b)))
                    continue;
                pikv_cache_stats s = pt_stats(c);
                const uint64_t bounds = 2u * 2u * 16u * 4u; /* one scored page's Quest bounds */
                if (sel.mode & PIKV_SELECT_QUEST)
                    CHECK(s.last_bytes_read > (uint64_t)s.last_tokens_read * row &&
                          (s.last_bytes_read - (uint64_t)s.last_tokens_read * row) % bounds == 0);
                else
                    CHECK_EQ(s.last_bytes_read, (uint64_t)s.last_tokens_read * row);
                if (mode == 0) {
                    CHECK_EQ(s.last_tokens_read, 90 + 97);
                    all_bytes = s.last_bytes_read;
                } else {
                    CHECKF(s.last_bytes_read < all_bytes, "mode %d: %llu bytes, exact mode %llu", mode,
                           (unsigned long long)s.last_bytes_read, (unsigned long long)all_bytes);
                }
                total += s.last_bytes_read;
                CHECK_EQ(s.bytes_read, total);
                pikv_layer_stats ls;
                CHECK_OK(pikv_cache_get_layer_stats(c, l, &ls));
                CHECK_EQ(ls.last_bytes_read, s.last_bytes_read);
                CHECK_EQ(ls.last_pages_read, s.last_pages_read);
                uint64_t dsum = 0;
                for (int d = 0; d < s.n_devices; d++) {
                    pikv_cache_device_stats ds;
                    CHECK_OK(pikv_cache_get_device_stats(c, d, &ds));
                    dsum += ds.last_bytes_read;
                    dev_total[d] += ds.last_bytes_read;
                    CHECK_EQ(ds.bytes_read, dev_total[d]);
                }
                CHECK_EQ(dsum, s.last_bytes_read);
            }
        }
        tu_model_free(&m);
        pikv_cache_free(c);
    }
    tu_set_case("");
}

int main(void)
{
    for (int d = 1; d <= 3; d++) {
        g_ctx[d] = tu_context(d);
        if (!g_ctx[d])
            return 2;
    }
    test_quest_bound_whitebox();
    test_quest_random();
    test_quest_crafted();
    test_quest_ties();
    for (int pl = 0; pl <= 2; pl++)
        experts_case((pikv_placement)pl, pl == 1 ? 1 : 2);
    test_experts_quest_composition();
    test_select_override();
    test_whole_context_bitwise();
    test_exact_quality();
    test_recall_monotone();
    test_hit_rate();
    test_bytes_read();
    for (int d = 1; d <= 3; d++)
        pikv_context_free(g_ctx[d]);
    return tu_finish();
}
