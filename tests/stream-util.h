/*
 * stream-util.h — shared by the checkpoint/stream tests (stream_roundtrip, stream_corrupt,
 * stream_crash, stream_fuzz_seeds): a small MoE geometry, a deterministic workload (appends
 * with router experts, a prefix copy, eviction under a budget, attends that move the
 * eviction statistics), and comparisons of two caches: attend outputs bit for bit and the
 * statistics restore must carry over.
 */
#ifndef PIKV_TEST_STREAM_UTIL_H
#define PIKV_TEST_STREAM_UTIL_H

#include "test-util.h"

#include <dirent.h>
#include <stdlib.h>
#include <unistd.h>

static inline pikv_cache_params su_params(pikv_dtype dtype, pikv_placement placement)
{
    pikv_cache_params p = pikv_cache_default_params();
    p.n_layers = 2;
    p.n_q_heads = 4;
    p.n_kv_heads = 2;
    p.head_dim = 16;
    p.n_experts = 4;
    p.experts_per_token = 2;
    p.page_size = 8;
    p.dtype = dtype;
    p.quant_group = 8;
    p.placement = placement;
    p.max_sequences = 8;
    p.capacity_tokens = 1 << 16;
    p.select.sink_tokens = 4;
    p.select.recent_tokens = 16;
    /* 48 tokens per sequence and layer: the long sequence is evicted (LRU) */
    p.budget.mode = PIKV_BUDGET_UNIFORM;
    p.budget.total_tokens = 2 * 48;
    p.evict.policy = PIKV_EVICT_LRU;
    return p;
}

static inline pikv_cache *su_cache(pikv_context *ctx, const pikv_cache_params *p)
{
    pikv_cache *c = NULL;
    pikv_status st = pikv_cache_create(ctx, p, &c);
    if (st != PIKV_OK) {
        fprintf(stderr, "test: pikv_cache_create failed: %s: %s\n", pikv_status_name(st),
                pikv_context_last_error(ctx));
        exit(2);
    }
    return c;
}

/* Appends n random tokens (router top-k experts) to one sequence's layer. */
static inline pikv_status su_append(pikv_cache *c, const pikv_cache_params *p, tu_rng *r, int layer,
                                    int seq, int n)
{
    const size_t per = (size_t)p->n_kv_heads * (size_t)p->head_dim;
    float *k = (float *)tu_xmalloc((size_t)n * per * sizeof(float));
    float *v = (float *)tu_xmalloc((size_t)n * per * sizeof(float));
    int32_t *ex = (int32_t *)tu_xmalloc((size_t)n * (size_t)p->experts_per_token * sizeof(int32_t));
    tu_fill(r, k, (size_t)n * per, 1.0f);
    tu_fill(r, v, (size_t)n * per, 1.0f);
    for (int t = 0; t < n; t++)
        tu_pick_experts(r, p->n_experts, p->experts_per_token, 1, ex + (size_t)t * p->experts_per_token);
    pikv_status st = pikv_cache_append(c, layer, seq, n, k, v, NULL, ex);
    free(k);
    free(v);
    free(ex);
    return st;
}

/* The sequences that exist (ids ascending); returns the count. */
static inline int su_live(pikv_cache *c, const pikv_cache_params *p, int32_t *seqs)
{
    int n = 0;
    for (int q = 0; q < p->max_sequences; q++) {
        int64_t len;
        if (pikv_seq_length(c, q, 0, &len) == PIKV_OK)
            seqs[n++] = q;
    }
    return n;
}

/* Attends fixed queries (seed) over every live sequence in every layer; out and lse get
   [layer][query] results. Returns the number of queries per layer (-1 on failure). */
static inline int su_attend(pikv_cache *c, const pikv_cache_params *p, uint64_t seed, float **out,
                            float **lse)
{
    int32_t seqs[64];
    const int nq = su_live(c, p, seqs);
    const size_t per = (size_t)p->n_q_heads * (size_t)p->head_dim;
    *out = (float *)tu_xcalloc((size_t)p->n_layers * (size_t)(nq ? nq : 1) * per, sizeof(float));
    *lse = (float *)tu_xcalloc((size_t)p->n_layers * (size_t)(nq ? nq : 1) * (size_t)p->n_q_heads, sizeof(float));
    float *q = (float *)tu_xmalloc((size_t)(nq ? nq : 1) * per * sizeof(float));
    tu_rng r = tu_rng_seed(seed);
    for (int l = 0; l < p->n_layers && nq > 0; l++) {
        tu_fill(&r, q, (size_t)nq * per, 2.0f);
        pikv_attend_batch b;
        memset(&b, 0, sizeof b);
        b.n_queries = nq;
        b.seq_ids = seqs;
        b.q = q;
        b.out = *out + (size_t)l * (size_t)nq * per;
        b.lse = *lse + (size_t)l * (size_t)nq * (size_t)p->n_q_heads;
        if (pikv_cache_attend(c, l, &b) != PIKV_OK) {
            free(q);
            return -1;
        }
    }
    free(q);
    return nq;
}

/* The base workload: sequences 0, 1, 2 and a long one (4) evicted under the budget, a
   prefix copy 0 -> 3 (shared full pages), attends between the appends. */
static inline void su_workload(pikv_cache *c, const pikv_cache_params *p, uint64_t seed)
{
    tu_rng r = tu_rng_seed(seed);
    static const int lens[5] = {20, 13, 7, 0, 30};
    for (int q = 0; q < 5; q++)
        if (q != 3)
            CHECK_OK(pikv_seq_add(c, q));
    for (int round = 0; round < 4; round++) {
        for (int l = 0; l < p->n_layers; l++)
            for (int q = 0; q < 5; q++)
                if (q != 3 && (round == 0 || q == 4))
                    CHECK_OK(su_append(c, p, &r, l, q, lens[q]));
        float *o, *s;
        CHECK(su_attend(c, p, seed + (uint64_t)round, &o, &s) >= 0);
        free(o);
        free(s);
    }
    CHECK_OK(pikv_seq_copy_prefix(c, 0, 3, 17));
    for (int l = 0; l < p->n_layers; l++)
        CHECK_OK(su_append(c, p, &r, l, 3, 5));
}

/* Whether a and b attend alike, bit for bit (the same seed for both: changes stats alike). */
static inline int su_same_attend(pikv_cache *a, pikv_cache *b, const pikv_cache_params *p, uint64_t seed,
                                 double tol)
{
    float *oa, *la, *ob, *lb;
    const int na = su_attend(a, p, seed, &oa, &la), nb = su_attend(b, p, seed, &ob, &lb);
    int same = na >= 0 && na == nb;
    const size_t no = (size_t)p->n_layers * (size_t)(na > 0 ? na : 0) * (size_t)p->n_q_heads * (size_t)p->head_dim;
    const size_t nl = (size_t)p->n_layers * (size_t)(na > 0 ? na : 0) * (size_t)p->n_q_heads;
    if (same && tol == 0.0) {
        same = memcmp(oa, ob, no * sizeof(float)) == 0 && memcmp(la, lb, nl * sizeof(float)) == 0;
    } else if (same) {
        for (size_t i = 0; i < no && same; i++)
            same = fabs((double)oa[i] - (double)ob[i]) <= tol * (1.0 + fabs((double)oa[i]));
        for (size_t i = 0; i < nl && same; i++)
            same = (isinf(la[i]) && la[i] == lb[i]) || fabs((double)la[i] - (double)lb[i]) <= tol * (1.0 + fabs((double)la[i]));
    }
    free(oa);
    free(la);
    free(ob);
    free(lb);
    return same;
}

/* The statistics a restore carries over (not the allocation or per-device figures). */
static inline int su_same_stats(pikv_cache *a, pikv_cache *b, const pikv_cache_params *p, char *why, size_t cap)
{
    pikv_cache_stats sa, sb;
    if (pikv_cache_get_stats(a, &sa) != PIKV_OK || pikv_cache_get_stats(b, &sb) != PIKV_OK) {
        snprintf(why, cap, "get_stats failed");
        return 0;
    }
#define SU_FIELD(f)                                                                                       \
    if (sa.f != sb.f) {                                                                                   \
        snprintf(why, cap, "stats." #f ": %.17g vs %.17g", (double)sa.f, (double)sb.f);                   \
        return 0;                                                                                         \
    }
    SU_FIELD(tokens) SU_FIELD(pages) SU_FIELD(bytes_used) SU_FIELD(sequences) SU_FIELD(n_shards)
    SU_FIELD(last_pages_read) SU_FIELD(last_bytes_read) SU_FIELD(last_tokens_read) SU_FIELD(bytes_read)
    SU_FIELD(evicted_pages) SU_FIELD(evicted_tokens) SU_FIELD(appends) SU_FIELD(attends)
#undef SU_FIELD
    for (int l = 0; l < p->n_layers; l++) {
        pikv_layer_stats la, lb;
        if (pikv_cache_get_layer_stats(a, l, &la) != PIKV_OK || pikv_cache_get_layer_stats(b, l, &lb) != PIKV_OK ||
            memcmp(&la, &lb, sizeof la) != 0) {
            snprintf(why, cap, "layer %d stats differ (tokens %lld/%lld, pages %lld/%lld, evicted %lld/%lld, "
                     "key error %.17g/%.17g)", l, (long long)la.tokens, (long long)lb.tokens, (long long)la.pages,
                     (long long)lb.pages, (long long)la.evicted_pages, (long long)lb.evicted_pages,
                     la.key_rel_error, lb.key_rel_error);
            return 0;
        }
        for (int e = 0; e < p->n_experts; e++) {
            pikv_expert_stats ea, eb;
            if (pikv_cache_get_expert_stats(a, l, e, &ea) != PIKV_OK ||
                pikv_cache_get_expert_stats(b, l, e, &eb) != PIKV_OK || memcmp(&ea, &eb, sizeof ea) != 0) {
                snprintf(why, cap, "layer %d expert %d stats differ", l, e);
                return 0;
            }
        }
    }
    for (int q = 0; q < p->max_sequences; q++)
        for (int l = 0; l < p->n_layers; l++) {
            int64_t na = -1, nb = -1;
            pikv_status s1 = pikv_seq_length(a, q, l, &na), s2 = pikv_seq_length(b, q, l, &nb);
            if (s1 != s2 || na != nb) {
                snprintf(why, cap, "sequence %d layer %d: length %lld vs %lld", q, l, (long long)na, (long long)nb);
                return 0;
            }
        }
    return 1;
}

/* A fresh directory for a test's files (removed by su_rmdir). */
static inline char *su_tmpdir(const char *tag)
{
    const char *base = getenv("TMPDIR");
    char *d = (char *)tu_xmalloc(512);
    snprintf(d, 512, "%s/pikv-%s-XXXXXX", base && base[0] ? base : "/tmp", tag);
    if (!mkdtemp(d)) {
        fprintf(stderr, "test: mkdtemp %s failed\n", d);
        exit(2);
    }
    return d;
}

/* Files in dir (for "no temporary file is left behind"). */
static inline int su_count_files(const char *dir)
{
    DIR *d = opendir(dir);
    int n = 0;
    if (!d)
        return -1;
    for (struct dirent *e; (e = readdir(d)) != NULL;)
        if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0)
            n++;
    closedir(d);
    return n;
}

static inline void su_rmdir(char *dir)
{
    DIR *d = opendir(dir);
    if (d) {
        char path[1024];
        for (struct dirent *e; (e = readdir(d)) != NULL;)
            if (strcmp(e->d_name, ".") != 0 && strcmp(e->d_name, "..") != 0) {
                snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
                unlink(path);
            }
        closedir(d);
    }
    rmdir(dir);
    free(dir);
}

static inline int su_write_file(const char *path, const uint8_t *b, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return 0;
    int ok = fwrite(b, 1, n, f) == n;
    return fclose(f) == 0 && ok;
}

#endif /* PIKV_TEST_STREAM_UTIL_H */
