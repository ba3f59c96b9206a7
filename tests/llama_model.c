/*
 * llama_model: the Llama runner (samples/llama.[ch]) on the real model (SmolLM2-135M-Instruct,
 * Q4_1; tools/setup-model.sh) against the float64 numpy forward pass of tools/llama_reference.py.
 * Registered only when the model and the reference Python exist at configure time.
 *  - per reference case (token-id prompts, and one ChatML text prompt whose ids our tokenizer
 *    must reproduce): with an exact F32 PiKV cache, the last prompt position's logits are within
 *    1e-4 * max |logit| of the reference, and the greedy next 8 tokens equal the reference's;
 *  - prefill in one call equals the same prompt fed one token per call, bit for bit;
 *  - two sequences in one cache do not disturb each other;
 *  - F16 and INT8 caches: logits within 1e-2 / 5e-2 of max |logit|, the same top-1 token;
 *  - errors: a missing file, a GGUF image lacking a tensor or a metadata key, a tensor of the
 *    wrong shape, a token outside
 *    the vocabulary, a sequence never added -> a status and a message that names the problem;
 *  - sampling: greedy = argmax; a seeded draw is reproducible; top_k = 1 is greedy.
 * The MoE model (tools/moe_convert.py; the reference runs its router's top-k experts) gets the
 * same reference checks, and (check_moe):
 *  - FFN top-k = n_experts gives the dense model's logits (the "sum" gating of a MoEfied FFN
 *    adds up the dense FFN's neurons; f16 expert down-projections: within 2e-3 of max |logit|, same top-1);
 *  - every token's KV is stored in the shard of its routed top-1 expert, and PIKV_SELECT_EXPERTS
 *    with experts_top_k = n_experts reads everything (logits equal exact mode within 1e-5),
 *    while experts_top_k = 1 reads fewer tokens;
 *  - bad moe_top_k, a cache whose expert count is not the model's, MoE keys or tensors missing
 *    -> a status and a message naming them.
 * PIKV_LLAMA_TEST_CASES=N limits the reference cases run (sanitizer builds).
 * Usage: llama_model MODEL.gguf REFERENCE.txt [DENSE.gguf (with a MoE model)]
 */
#include "test-util.h"

#include "llama.h"

#include <math.h>
#include <time.h>

#define N_GREEDY 8
#define MAX_CASES 8
#define MAX_IDS 256

typedef struct ref_case {
    char name[64];
    char text[1024]; /* "" = a token-id case */
    int n_ids;
    int32_t ids[MAX_IDS];
    int32_t greedy[N_GREEDY];
    double margins[N_GREEDY];
    double *logits;
} ref_case;

static ref_case cases[MAX_CASES];
static int n_cases;
static int n_vocab_ref;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* The next whitespace-separated word of f is `word` (fscanf's literal matching cannot tell). */
static int expect_word(FILE *f, const char *word)
{
    char got[32];
    return fscanf(f, " %31s", got) == 1 && strcmp(got, word) == 0;
}

static int read_reference(const char *path)
{
    FILE *f = fopen(path, "r");
    if (!CHECKF(f != NULL, "cannot open reference %s", path))
        return 0;
    int ok = fscanf(f, " vocab %d", &n_vocab_ref) == 1 && n_vocab_ref > 0;
    while (ok && n_cases < MAX_CASES) {
        ref_case *c = &cases[n_cases];
        char hex[2100];
        if (fscanf(f, " case %63s %d", c->name, &c->n_ids) != 2)
            break;
        ok = c->n_ids > 0 && c->n_ids <= MAX_IDS && fscanf(f, " text %2099s", hex) == 1;
        if (ok && strcmp(hex, "-") != 0) {
            size_t n = strlen(hex) / 2;
            ok = n < sizeof c->text;
            for (size_t i = 0; ok && i < n; i++) {
                unsigned b = 0;
                ok = sscanf(hex + 2 * i, "%2x", &b) == 1;
                c->text[i] = (char)b;
            }
        }
        ok = ok && expect_word(f, "ids");
        for (int i = 0; ok && i < c->n_ids; i++)
            ok = fscanf(f, "%d", &c->ids[i]) == 1;
        ok = ok && expect_word(f, "greedy");
        for (int i = 0; ok && i < N_GREEDY; i++)
            ok = fscanf(f, "%d", &c->greedy[i]) == 1;
        ok = ok && expect_word(f, "margins");
        for (int i = 0; ok && i < N_GREEDY; i++)
            ok = fscanf(f, "%lf", &c->margins[i]) == 1;
        ok = ok && expect_word(f, "logits");
        c->logits = ok ? malloc((size_t)n_vocab_ref * sizeof(double)) : NULL;
        ok = ok && c->logits;
        for (int i = 0; ok && i < n_vocab_ref; i++)
            ok = fscanf(f, "%lf", &c->logits[i]) == 1;
        if (ok)
            n_cases++;
    }
    fclose(f);
    CHECKF(ok && n_cases > 0, "reference %s: malformed (%d cases read)", path, n_cases);
    return ok && n_cases > 0;
}

static pikv_cache *make_cache(pikv_context *ctx, const pikv_llama *m, int32_t n_seq, pikv_dtype dt)
{
    pikv_cache_params p = pikv_llama_cache_params(m, n_seq, 1024);
    p.dtype = dt;
    pikv_cache *c = NULL;
    if (!CHECK_OK(pikv_cache_create(ctx, &p, &c)))
        return NULL;
    for (int32_t s = 0; s < n_seq; s++)
        CHECK_OK(pikv_seq_add(c, s));
    return c;
}

static int32_t argmax(const float *x, int32_t n)
{
    int32_t b = 0;
    for (int32_t i = 1; i < n; i++)
        if (x[i] > x[b])
            b = i;
    return b;
}

/* Runs one reference case in sequence `seq` of `cache`; returns the max |logit diff|. */
static void run_case(pikv_llama *m, pikv_context *ctx, const ref_case *c)
{
    tu_set_case("case %s", c->name);
    const pikv_llama_hparams *hp = pikv_llama_get_hparams(m);
    CHECK_EQ(hp->n_vocab, n_vocab_ref);
    const int32_t *ids = c->ids;
    int32_t n_ids = c->n_ids;
    int32_t enc[MAX_IDS];
    if (c->text[0]) {
        size_t n = 0;
        pikv_tok_status ts = pikv_tokenizer_encode(pikv_llama_get_tokenizer(m), c->text, strlen(c->text),
                                                   PIKV_TOK_PARSE_SPECIAL, enc, MAX_IDS, &n);
        CHECKF(ts == PIKV_TOK_OK, "encode: %s", pikv_tokenizer_status_str(ts));
        CHECK_EQ(n, c->n_ids);
        int same = n == (size_t)c->n_ids;
        for (size_t i = 0; same && i < n; i++)
            same = enc[i] == c->ids[i];
        CHECKF(same, "the tokenizer's ids differ from the reference's");
        ids = enc;
        n_ids = (int32_t)n;
    }
    pikv_cache *cache = make_cache(ctx, m, 1, PIKV_DTYPE_F32);
    float *logits = malloc((size_t)hp->n_vocab * sizeof(float));
    if (!cache || !CHECK(logits != NULL))
        goto out;
    pikv_llama_error err;
    double t0 = now_s();
    pikv_llama_status s = pikv_llama_forward(m, cache, 0, ids, n_ids, logits, &err);
    double t1 = now_s();
    if (!CHECKF(s == PIKV_LLAMA_OK, "forward: %s: %s", pikv_llama_status_name(s), err.message))
        goto out;
    double maxref = 0, maxdiff = 0;
    for (int32_t i = 0; i < hp->n_vocab; i++) {
        maxref = fmax(maxref, fabs(c->logits[i]));
        maxdiff = fmax(maxdiff, fabs((double)logits[i] - c->logits[i]));
    }
    printf("%s: %d prompt tokens in %.3f s; logits max |diff| %.3g, max |ref| %.3g (ratio %.2g)\n",
           c->name, (int)n_ids, t1 - t0, maxdiff, maxref, maxdiff / maxref);
    CHECKF(maxdiff <= 1e-4 * maxref, "logits max |diff| %g > 1e-4 * %g", maxdiff, maxref);
    int32_t got[N_GREEDY];
    double t2 = now_s();
    for (int i = 0; i < N_GREEDY; i++) {
        got[i] = argmax(logits, hp->n_vocab);
        if (i + 1 < N_GREEDY) {
            s = pikv_llama_forward(m, cache, 0, &got[i], 1, logits, &err);
            if (!CHECKF(s == PIKV_LLAMA_OK, "decode: %s", err.message))
                goto out;
        }
    }
    double t3 = now_s();
    int same = 1;
    for (int i = 0; i < N_GREEDY; i++)
        same = same && got[i] == c->greedy[i];
    printf("%s: greedy", c->name);
    for (int i = 0; i < N_GREEDY; i++)
        printf(" %d%s", got[i], got[i] == c->greedy[i] ? "" : "(!)");
    printf(" in %.3f s (%.1f tok/s)\n", t3 - t2, (N_GREEDY - 1) / (t3 - t2));
    CHECKF(same, "greedy tokens differ from the reference's");
out:
    free(logits);
    pikv_cache_free(cache);
}

/* The cache's dtype is the caller's: F16 and INT8 caches on a reference case. Logged, and
 * bounded loosely (F16: 1e-2 of max |logit|; INT8: 5e-2), with the same top-1 token. */
static void check_dtypes(pikv_llama *m, pikv_context *ctx, const ref_case *c)
{
    static const pikv_dtype dts[2] = {PIKV_DTYPE_F16, PIKV_DTYPE_INT8};
    static const char *const names[2] = {"f16", "int8"};
    static const double tol[2] = {1e-2, 5e-2};
    const int32_t V = pikv_llama_get_hparams(m)->n_vocab;
    float *lg = malloc((size_t)V * sizeof(float));
    if (!CHECK(lg != NULL))
        return;
    for (int d = 0; d < 2; d++) {
        tu_set_case("dtype %s (%s)", names[d], c->name);
        pikv_cache *cache = make_cache(ctx, m, 1, dts[d]);
        pikv_llama_error err;
        if (!cache)
            continue;
        if (CHECKF(pikv_llama_forward(m, cache, 0, c->ids, c->n_ids, lg, &err) == PIKV_LLAMA_OK, "%s",
                   err.message)) {
            double maxref = 0, maxdiff = 0;
            for (int32_t i = 0; i < V; i++) {
                maxref = fmax(maxref, fabs(c->logits[i]));
                maxdiff = fmax(maxdiff, fabs((double)lg[i] - c->logits[i]));
            }
            printf("%s cache, %s: logits max |diff| %.3g (ratio %.2g), top-1 %d\n", names[d], c->name,
                   maxdiff, maxdiff / maxref, (int)argmax(lg, V));
            CHECK_LE(maxdiff, tol[d] * maxref);
            CHECK_EQ(argmax(lg, V), c->greedy[0]);
        }
        pikv_cache_free(cache);
    }
    free(lg);
}

/* Prefill in one call = the prompt one token per call, bit for bit; and two sequences in one
 * cache (the second interleaved with the first) give the same logits. */
static void check_chunking(pikv_llama *m, pikv_context *ctx, const ref_case *c)
{
    tu_set_case("chunking and sequences (%s)", c->name);
    const int32_t V = pikv_llama_get_hparams(m)->n_vocab;
    pikv_cache *cache = make_cache(ctx, m, 2, PIKV_DTYPE_F32);
    float *a = malloc((size_t)V * sizeof(float)), *b = malloc((size_t)V * sizeof(float));
    pikv_llama_error err;
    if (!cache || !CHECK(a && b))
        goto out;
    CHECK(pikv_llama_forward(m, cache, 0, c->ids, c->n_ids, a, &err) == PIKV_LLAMA_OK);
    for (int i = 0; i < c->n_ids; i++)
        CHECK(pikv_llama_forward(m, cache, 1, &c->ids[i], 1, b, &err) == PIKV_LLAMA_OK);
    CHECKF(memcmp(a, b, (size_t)V * sizeof(float)) == 0, "prefill and token-by-token logits differ");
    int64_t len = 0;
    CHECK_OK(pikv_seq_length(cache, 1, 29, &len));
    CHECK_EQ(len, c->n_ids);
out:
    free(a);
    free(b);
    pikv_cache_free(cache);
}

static unsigned char *find_bytes(unsigned char *d, size_t n, const char *s)
{
    size_t k = strlen(s);
    for (size_t i = 0; i + k <= n; i++)
        if (d[i] == (unsigned char)s[0] && memcmp(d + i, s, k) == 0)
            return d + i;
    return NULL;
}

/* Loads an image with `what` renamed (its last byte changed); expects FORMAT naming `what`. */
static void expect_missing(unsigned char *img, size_t n, const char *what)
{
    tu_set_case("missing %s", what);
    unsigned char *p = find_bytes(img, n, what);
    if (!CHECKF(p != NULL, "'%s' not found in the file", what))
        return;
    size_t k = strlen(what);
    unsigned char saved = p[k - 1];
    p[k - 1] = 'Z';
    pikv_llama *m = (pikv_llama *)1;
    pikv_llama_error err;
    pikv_llama_status s = pikv_llama_load_memory(img, n, 1, &m, &err);
    p[k - 1] = saved;
    printf("missing %s -> %s: %s\n", what, pikv_llama_status_name(s), err.message);
    CHECK_EQ(s, PIKV_LLAMA_ERR_FORMAT);
    CHECK(m == NULL);
    CHECKF(strstr(err.message, what) != NULL, "message '%s' does not name %s", err.message, what);
    pikv_llama_free(m);
}

/* Loads an image with tensor `name`'s ne[1] changed to `ne1`; expects FORMAT naming the shape. */
static void expect_bad_shape(unsigned char *img, size_t n, const char *name, uint64_t ne1)
{
    tu_set_case("bad shape of %s", name);
    unsigned char *p = find_bytes(img, n, name);
    if (!CHECKF(p != NULL, "'%s' not found in the file", name))
        return;
    unsigned char *ne1p = p + strlen(name) + 4 + 8; /* n_dims (u32), ne[0] (u64) */
    unsigned char saved[8];
    memcpy(saved, ne1p, 8);
    memcpy(ne1p, &ne1, 8); /* little-endian host (GGUF is little-endian) */
    pikv_llama *m = (pikv_llama *)1;
    pikv_llama_error err;
    pikv_llama_status s = pikv_llama_load_memory(img, n, 1, &m, &err);
    memcpy(ne1p, saved, 8);
    printf("%s with ne[1] = %llu -> %s: %s\n", name, (unsigned long long)ne1, pikv_llama_status_name(s),
           err.message);
    CHECK_EQ(s, PIKV_LLAMA_ERR_FORMAT);
    CHECK(m == NULL);
    CHECKF(strstr(err.message, name) != NULL && strstr(err.message, "shape") != NULL, "message: %s",
           err.message);
    pikv_llama_free(m);
}

static void check_errors(pikv_llama *m, pikv_context *ctx, const char *model_path)
{
    const int moe = pikv_llama_get_hparams(m)->n_experts > 1;
    tu_set_case("errors");
    pikv_llama *bad = (pikv_llama *)1;
    pikv_llama_error err;
    pikv_llama_status s = pikv_llama_load("/nonexistent/model.gguf", 1, &bad, &err);
    printf("bad path -> %s: %s\n", pikv_llama_status_name(s), err.message);
    CHECK_EQ(s, PIKV_LLAMA_ERR_IO);
    CHECK(bad == NULL);
    CHECK(strstr(err.message, "/nonexistent/model.gguf") != NULL);
    CHECK_EQ(pikv_llama_load(model_path, 0, &bad, &err), PIKV_LLAMA_ERR_ARG);
    CHECK_EQ(pikv_llama_load(NULL, 1, &bad, &err), PIKV_LLAMA_ERR_ARG);

    pikv_cache *cache = make_cache(ctx, m, 1, PIKV_DTYPE_F32);
    if (cache) {
        int32_t tok = pikv_llama_get_hparams(m)->n_vocab;
        s = pikv_llama_forward(m, cache, 0, &tok, 1, NULL, &err);
        CHECK_EQ(s, PIKV_LLAMA_ERR_ARG);
        CHECKF(strstr(err.message, "vocabulary") != NULL, "message: %s", err.message);
        tok = 1;
        s = pikv_llama_forward(m, cache, 5, &tok, 1, NULL, &err);
        printf("sequence 5 of a 1-sequence cache -> %s: %s\n", pikv_llama_status_name(s), err.message);
        CHECK_EQ(s, PIKV_LLAMA_ERR_CACHE);
        CHECK_EQ(pikv_llama_forward(m, cache, 0, &tok, 0, NULL, &err), PIKV_LLAMA_ERR_ARG);
        pikv_cache_free(cache);
    }
    /* a cache whose rows are not the model's (head_dim, KV heads) is refused before any
       buffer of the model's sizes reaches append or attend */
    for (int k = 0; k < 2; k++) {
        pikv_cache_params p = pikv_llama_cache_params(m, 1, 1024);
        if (k == 0) p.head_dim *= 2;
        else p.n_kv_heads = p.n_q_heads;
        pikv_cache *wrong = NULL;
        if (!CHECK_OK(pikv_cache_create(ctx, &p, &wrong))) continue;
        CHECK_OK(pikv_seq_add(wrong, 0));
        int32_t tok = 1;
        s = pikv_llama_forward(m, wrong, 0, &tok, 1, NULL, &err);
        CHECK_EQ(s, PIKV_LLAMA_ERR_ARG);
        CHECKF(strstr(err.message, "geometry") != NULL, "message: %s", err.message);
        pikv_cache_free(wrong);
    }

    size_t n = 0;
    unsigned char *img = tu_read_file(model_path, &n);
    if (CHECKF(img != NULL, "cannot read %s", model_path)) {
        expect_missing(img, n, moe ? "blk.7.ffn_up_exps.weight" : "blk.7.ffn_up.weight");
        if (moe) {
            expect_missing(img, n, "blk.3.ffn_gate_inp.weight");
            expect_missing(img, n, "blk.5.ffn_down_shexp.weight");
            expect_bad_shape(img, n, "blk.2.ffn_up_shexp.weight", 639);
            expect_missing(img, n, "llama.expert_used_count");
        }
        expect_missing(img, n, "output_norm.weight");
        expect_missing(img, n, "llama.block_count");
        expect_missing(img, n, "tokenizer.ggml.tokens");
        expect_bad_shape(img, n, "blk.0.attn_k.weight", 64);
        tu_set_case("memory image");
        pikv_llama *mm = NULL;
        s = pikv_llama_load_memory(img, n, 1, &mm, &err);
        CHECKF(s == PIKV_LLAMA_OK, "unchanged image: %s", err.message);
        pikv_llama_free(mm);
        free(img);
    }
}

static void check_sampling(void)
{
    tu_set_case("sampling");
    float lg[6] = {0.5f, 2.0f, -1.0f, 2.0f, 1.9f, 0.0f};
    CHECK_EQ(pikv_llama_sample(lg, 6, 0.0f, 0, NULL), 1); /* lowest id on ties */
    uint64_t r1 = 7, r2 = 7;
    int32_t a[64], b[64];
    int hist[6] = {0};
    for (int i = 0; i < 64; i++) {
        a[i] = pikv_llama_sample(lg, 6, 1.0f, 3, &r1);
        b[i] = pikv_llama_sample(lg, 6, 1.0f, 3, &r2);
        CHECK(a[i] == b[i]);
        CHECK(a[i] == 1 || a[i] == 3 || a[i] == 4);
        if (a[i] >= 0 && a[i] < 6)
            hist[a[i]]++;
    }
    CHECKF(hist[1] > 0 && hist[3] > 0 && hist[4] > 0, "top-3 draws: %d %d %d", hist[1], hist[3], hist[4]);
    uint64_t r3 = 99;
    CHECK_EQ(pikv_llama_sample(lg, 6, 0.8f, 1, &r3), 1);
    uint64_t zero = 0;
    CHECK_EQ(pikv_llama_sample(lg, 6, 1.0f, 0, &zero), -1);
    CHECK_EQ(pikv_llama_sample(NULL, 6, 0.0f, 0, NULL), -1);
}

/* Logits of one prompt through a fresh F32 cache of `p` (NULL: the model's defaults). */
static int forward_logits(pikv_llama *m, pikv_context *ctx, const pikv_cache_params *p,
                          const ref_case *c, int32_t moe_k, float *lg, pikv_cache_stats *st)
{
    pikv_cache_params q = p ? *p : pikv_llama_cache_params(m, 1, 1024);
    pikv_cache *cache = NULL;
    if (!CHECK_OK(pikv_cache_create(ctx, &q, &cache)))
        return 0;
    pikv_llama_run_params rp;
    memset(&rp, 0, sizeof rp);
    rp.moe_top_k = moe_k;
    pikv_llama_error err;
    int ok = CHECK_OK(pikv_seq_add(cache, 0)) &&
             CHECKF(pikv_llama_forward_ex(m, cache, 0, c->ids, c->n_ids, &rp, lg, &err) == PIKV_LLAMA_OK,
                    "forward: %s", err.message);
    if (ok && st)
        ok = CHECK_OK(pikv_cache_get_stats(cache, st));
    pikv_cache_free(cache);
    return ok;
}

static double max_abs_diff(const float *a, const float *b, int32_t n, double *max_b)
{
    double d = 0, mb = 0;
    for (int32_t i = 0; i < n; i++) {
        d = fmax(d, fabs((double)a[i] - (double)b[i]));
        mb = fmax(mb, fabs((double)b[i]));
    }
    if (max_b)
        *max_b = mb;
    return d;
}

static void check_moe(pikv_llama *m, pikv_context *ctx, const ref_case *c, const char *dense_path)
{
    const pikv_llama_hparams *hp = pikv_llama_get_hparams(m);
    const int32_t V = hp->n_vocab, X = hp->n_experts;
    float *a = malloc((size_t)V * sizeof(float)), *b = malloc((size_t)V * sizeof(float));
    if (!CHECK(a && b))
        goto out;
    pikv_llama_error err;
    if (dense_path) {
        tu_set_case("moe: top-k = n_experts is the dense FFN");
        pikv_llama *dense = NULL;
        if (CHECKF(pikv_llama_load(dense_path, 2, &dense, &err) == PIKV_LLAMA_OK, "%s", err.message) &&
            forward_logits(dense, ctx, NULL, c, 0, a, NULL) && forward_logits(m, ctx, NULL, c, X, b, NULL)) {
            double mx = 0, d = max_abs_diff(b, a, V, &mx);
            printf("moe top-%d vs dense: logits max |diff| %.3g (ratio %.2g)\n", (int)X, d, d / mx);
            CHECKF(d <= 2e-3 * mx, "max |diff| %g > 2e-3 * %g", d, mx);
            CHECK_EQ(argmax(a, V), argmax(b, V));
        }
        pikv_llama_free(dense);
    }

    tu_set_case("moe: experts selection");
    pikv_cache_params p = pikv_llama_cache_params(m, 1, 1024);
    CHECK_EQ(p.n_experts, X);
    CHECK_EQ(p.experts_per_token, hp->n_experts_used);
    pikv_cache_stats s_all, s_sel;
    if (forward_logits(m, ctx, &p, c, 0, a, &s_all)) {
        p.select.mode = PIKV_SELECT_EXPERTS;
        p.experts_per_token = X;    /* every query is routed to all experts ... */
        p.select.experts_top_k = X; /* ... and reads them all: exact */
        if (forward_logits(m, ctx, &p, c, 0, b, &s_sel)) {
            double mx = 0, d = max_abs_diff(b, a, V, &mx);
            printf("experts selection, top %d of %d: max |diff| %.3g, tokens read %lld (all: %lld)\n", (int)X,
                   (int)X, d, (long long)s_sel.last_tokens_read, (long long)s_all.last_tokens_read);
            CHECKF(d <= 1e-5 * mx, "max |diff| %g > 1e-5 * %g", d, mx);
            CHECK_EQ(s_sel.last_tokens_read, s_all.last_tokens_read);
        }
        p.select.experts_top_k = 1;
        p.select.sink_tokens = 0;
        p.select.recent_tokens = 0;
        if (forward_logits(m, ctx, &p, c, 0, b, &s_sel)) {
            printf("experts selection, top 1: tokens read in the last attend %lld of %lld, top-1 %d (exact %d)\n",
                   (long long)s_sel.last_tokens_read, (long long)s_all.last_tokens_read, (int)argmax(b, V),
                   (int)argmax(a, V));
            CHECKF(s_sel.last_tokens_read < s_all.last_tokens_read && s_sel.last_tokens_read > 0,
                   "tokens read %lld, all %lld", (long long)s_sel.last_tokens_read,
                   (long long)s_all.last_tokens_read);
        }
    }

    tu_set_case("moe: each token's KV in its routed top-1 expert's shard");
    pikv_cache *routed = make_cache(ctx, m, 1, PIKV_DTYPE_F32);
    if (routed && CHECKF(pikv_llama_forward(m, routed, 0, c->ids, c->n_ids, a, &err) == PIKV_LLAMA_OK, "%s",
                         err.message)) {
        for (int32_t l = 0; l < hp->n_layers; l += 7) {
            int64_t stored = 0, used = 0;
            for (int32_t e = 0; e < X; e++) {
                pikv_expert_stats es;
                if (!CHECK_OK(pikv_cache_get_expert_stats(routed, l, e, &es)))
                    break;
                CHECK_EQ(es.stored_tokens, es.routed_top1); /* stored where the router sent it */
                stored += es.stored_tokens;
                used += es.stored_tokens > 0;
            }
            CHECK_EQ(stored, c->n_ids);
            if (l == 0)
                printf("layer 0: %d tokens stored in %d of %d experts' shards\n", (int)c->n_ids, (int)used, (int)X);
        }
    }
    pikv_cache_free(routed);

    tu_set_case("moe: errors");
    pikv_cache *cache = make_cache(ctx, m, 1, PIKV_DTYPE_F32);
    if (cache) {
        pikv_llama_run_params rp;
        memset(&rp, 0, sizeof rp);
        for (int k = 0; k < 2; k++) {
            rp.moe_top_k = k ? -1 : X + 1;
            pikv_llama_status s = pikv_llama_forward_ex(m, cache, 0, c->ids, 1, &rp, NULL, &err);
            printf("moe_top_k %d -> %s: %s\n", (int)rp.moe_top_k, pikv_llama_status_name(s), err.message);
            CHECK_EQ(s, PIKV_LLAMA_ERR_ARG);
            CHECK(strstr(err.message, "moe_top_k") != NULL);
        }
        int64_t len = -1;
        CHECK_OK(pikv_seq_length(cache, 0, 0, &len));
        CHECK_EQ(len, 0); /* refused before anything was appended */
        pikv_cache_free(cache);
    }
    p = pikv_llama_cache_params(m, 1, 1024);
    p.n_experts = 1;
    p.experts_per_token = 1;
    pikv_cache *wrong = NULL;
    if (CHECK_OK(pikv_cache_create(ctx, &p, &wrong)) && CHECK_OK(pikv_seq_add(wrong, 0))) {
        pikv_llama_status s = pikv_llama_forward(m, wrong, 0, c->ids, 1, NULL, &err);
        CHECK_EQ(s, PIKV_LLAMA_ERR_ARG);
        CHECKF(strstr(err.message, "experts") != NULL, "message: %s", err.message);
    }
    pikv_cache_free(wrong);
out:
    free(a);
    free(b);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf REFERENCE.txt\n", argv[0]);
        return 2;
    }
    check_sampling();
    if (!read_reference(argv[2]))
        return tu_finish();
    int limit = n_cases;
    const char *env = getenv("PIKV_LLAMA_TEST_CASES");
    if (env && atoi(env) > 0 && atoi(env) < limit)
        limit = atoi(env);

    tu_set_case("load");
    pikv_llama *m = NULL;
    pikv_llama_error err;
    double t0 = now_s();
    pikv_llama_status s = pikv_llama_load(argv[1], 2, &m, &err);
    if (!CHECKF(s == PIKV_LLAMA_OK, "%s: %s", pikv_llama_status_name(s), err.message))
        return tu_finish();
    printf("loaded %s in %.3f s\n", argv[1], now_s() - t0);
    const pikv_llama_hparams *hp = pikv_llama_get_hparams(m);
    const int moe = hp->n_experts > 1;
    CHECK_EQ(hp->n_layers, 30);
    CHECK_EQ(hp->n_embd, 576);
    if (moe) { /* tools/moe_convert.py: the dense FFN's 1536 neurons split into 8 experts (and
                  a shared expert), top-2, summed */
        CHECK_EQ(hp->n_experts, 8);
        CHECK_EQ(hp->n_experts_used, 2);
        CHECK_EQ(hp->n_ff * 8 + hp->n_ff_shared, 1536);
        CHECK_EQ(hp->n_ff_shared, 640); /* the shared expert's path runs */
        CHECK_EQ(hp->moe_gating, PIKV_LLAMA_GATING_SUM);
    } else {
        CHECK_EQ(hp->n_ff, 1536);
        CHECK_EQ(hp->n_experts, 1);
    }
    CHECK_EQ(hp->n_head, 9);
    CHECK_EQ(hp->n_head_kv, 3);
    CHECK_EQ(hp->head_dim, 64);
    CHECK_EQ(hp->n_vocab, 49152);
    CHECK_EQ(hp->n_ctx, 8192);
    CHECK_EQ(hp->tied_output, 1);
    CHECK(fabs(hp->rope_base - 1e5) < 1e-6);
    CHECK(fabs(hp->rms_eps - 1e-5) < 1e-9);

    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "cpu";
    cp.cpu_threads = 1;
    pikv_context *ctx = NULL;
    if (CHECK_OK(pikv_context_create(&cp, &ctx))) {
        for (int i = 0; i < limit; i++)
            run_case(m, ctx, &cases[i]);
        check_chunking(m, ctx, &cases[0]);
        check_dtypes(m, ctx, &cases[n_cases - 1]);
        check_errors(m, ctx, argv[1]);
        if (moe)
            check_moe(m, ctx, &cases[0], argc > 3 ? argv[3] : NULL);
    }
    pikv_context_free(ctx);
    pikv_llama_free(m);
    for (int i = 0; i < n_cases; i++)
        free(cases[i].logits);
    return tu_finish();
}
