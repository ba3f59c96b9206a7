/*
 * tokenizer_model — the tokenizer (samples/tokenizer.h) over SmolLM2-135M's real vocabulary
 * against Hugging Face `tokenizers`: tools/tokenizer_reference.py writes DIR/vocab.bin (the
 * GGUF vocabulary, types and merges) and DIR/cases.bin (fixed strings, corpus lines and the
 * whole corpus with their HF ids, and known ids of vocabulary strings). Checks: the same ids
 * for every case, decode(encode(s)) == s, concurrent encodes agree. Prints the encode speed.
 *
 *   tokenizer_model DIR            the test
 *   tokenizer_model DIR --bench N  encode the whole corpus N times and print MB/s
 */
#include "test-util.h"

#include <pthread.h>
#include <time.h>

#include "tokenizer.h"

typedef struct tcase {
    char kind;
    char *text;
    size_t len;
    int32_t *ids;
    size_t n_ids;
} tcase;

static char *read_file(const char *dir, const char *name, size_t *len)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    char *buf = (char *)tu_read_file(path, len);
    if (!buf)
        fprintf(stderr, "tokenizer_model: cannot read %s\n", path);
    return buf;
}

/* A cursor over a reference file. */
typedef struct cur {
    const char *p, *end;
    int bad;
} cur;

static long long cur_int(cur *c)
{
    while (c->p < c->end && *c->p == ' ')
        c->p++;
    /* by hand: strtoll under ASan's strict_string_checks scans to the NUL each call */
    int neg = c->p < c->end && *c->p == '-';
    if (neg)
        c->p++;
    long long v = 0;
    const char *start = c->p;
    while (c->p < c->end && *c->p >= '0' && *c->p <= '9' && v < (1ll << 40))
        v = v * 10 + (*c->p++ - '0');
    if (c->p == start)
        c->bad = 1;
    return neg ? -v : v;
}

static void cur_expect(cur *c, char ch)
{
    if (c->p >= c->end || *c->p != ch)
        c->bad = 1;
    else
        c->p++;
}

static const char *cur_bytes(cur *c, size_t n)
{
    if ((size_t)(c->end - c->p) < n) {
        c->bad = 1;
        return c->p;
    }
    const char *s = c->p;
    c->p += n;
    return s;
}

typedef struct thr_arg {
    const pikv_tokenizer *t;
    const tcase *w;
    int bad;
} thr_arg;

static void *thr_main(void *p)
{
    thr_arg *a = p;
    int32_t *ids = tu_xmalloc((a->w->n_ids + 1) * sizeof *ids);
    size_t n = 0;
    if (pikv_tokenizer_encode(a->t, a->w->text, a->w->len, PIKV_TOK_PARSE_SPECIAL, ids,
                              a->w->n_ids + 1, &n) != PIKV_TOK_OK ||
        n != a->w->n_ids || memcmp(ids, a->w->ids, n * sizeof *ids) != 0)
        a->bad = 1;
    free(ids);
    return NULL;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: tokenizer_model DIR [--bench N]\n");
        return 2;
    }
    int bench = argc >= 4 && strcmp(argv[2], "--bench") == 0 ? atoi(argv[3]) : 0;
    size_t vlen = 0, clen = 0;
    char *vbuf = read_file(argv[1], "vocab.bin", &vlen);
    char *cbuf = read_file(argv[1], "cases.bin", &clen);
    if (!vbuf || !cbuf)
        return 2;

    /* vocabulary */
    cur c = {vbuf, vbuf + vlen, 0};
    if (strncmp(vbuf, "PIKVVOCAB ", 10) != 0) {
        fprintf(stderr, "tokenizer_model: bad vocab.bin\n");
        return 2;
    }
    c.p = vbuf + 10;
    pikv_tokenizer_desc d;
    memset(&d, 0, sizeof d);
    d.n_tokens = (int32_t)cur_int(&c);
    d.n_merges = (int32_t)cur_int(&c);
    d.bos_id = (int32_t)cur_int(&c);
    d.eos_id = (int32_t)cur_int(&c);
    d.unk_id = (int32_t)cur_int(&c);
    d.pad_id = (int32_t)cur_int(&c);
    cur_expect(&c, '\n');
    if (c.bad || d.n_tokens <= 0 || d.n_merges < 0) {
        fprintf(stderr, "tokenizer_model: bad vocab.bin header\n");
        return 2;
    }
    const char **toks = tu_xcalloc((size_t)d.n_tokens, sizeof *toks);
    size_t *tlens = tu_xcalloc((size_t)d.n_tokens, sizeof *tlens);
    int32_t *types = tu_xcalloc((size_t)d.n_tokens, sizeof *types);
    const char **merges = tu_xcalloc((size_t)d.n_merges + 1, sizeof *merges);
    size_t *mlens = tu_xcalloc((size_t)d.n_merges + 1, sizeof *mlens);
    for (int32_t i = 0; i < d.n_tokens && !c.bad; i++) {
        types[i] = (int32_t)cur_int(&c);
        tlens[i] = (size_t)cur_int(&c);
        cur_expect(&c, '\n');
        toks[i] = cur_bytes(&c, tlens[i]);
        cur_expect(&c, '\n');
    }
    for (int32_t i = 0; i < d.n_merges && !c.bad; i++) {
        mlens[i] = (size_t)cur_int(&c);
        cur_expect(&c, '\n');
        merges[i] = cur_bytes(&c, mlens[i]);
        cur_expect(&c, '\n');
    }
    if (c.bad) {
        fprintf(stderr, "tokenizer_model: truncated vocab.bin\n");
        return 2;
    }
    d.tokens = toks;
    d.token_lens = tlens;
    d.token_types = types;
    d.merges = merges;
    d.merge_lens = mlens;
    pikv_tokenizer *t = NULL;
    double t0 = now_s();
    pikv_tok_status st = pikv_tokenizer_create(&d, &t);
    double t_create = now_s() - t0;
    tu_set_case("create from the GGUF vocabulary");
    CHECKF(st == PIKV_TOK_OK, "create: %s", pikv_tokenizer_status_str(st));
    if (!t)
        return tu_finish();
    CHECK_EQ(pikv_tokenizer_n_vocab(t), d.n_tokens);

    /* cases */
    c = (cur){cbuf, cbuf + clen, 0};
    if (strncmp(cbuf, "PIKVCASES ", 10) != 0) {
        fprintf(stderr, "tokenizer_model: bad cases.bin\n");
        return 2;
    }
    c.p = cbuf + 10;
    size_t n_cases = (size_t)cur_int(&c);
    cur_expect(&c, '\n');
    tcase *cs = tu_xcalloc(n_cases, sizeof *cs);
    for (size_t i = 0; i < n_cases && !c.bad; i++) {
        if (c.p >= c.end) {
            c.bad = 1;
            break;
        }
        cs[i].kind = *c.p++;
        cs[i].len = (size_t)cur_int(&c);
        cs[i].n_ids = (size_t)cur_int(&c);
        cur_expect(&c, '\n');
        cs[i].text = (char *)cur_bytes(&c, cs[i].len);
        cur_expect(&c, '\n');
        cs[i].ids = tu_xmalloc((cs[i].n_ids + 1) * sizeof *cs[i].ids);
        for (size_t k = 0; k < cs[i].n_ids; k++)
            cs[i].ids[k] = (int32_t)cur_int(&c);
        cur_expect(&c, '\n');
    }
    if (c.bad) {
        fprintf(stderr, "tokenizer_model: truncated cases.bin\n");
        return 2;
    }

    size_t n_kind[128] = {0}, ok_kind[128] = {0}, printed = 0, max_ids = 0, max_len = 0;
    const tcase *whole = NULL;
    for (size_t i = 0; i < n_cases; i++) {
        if (cs[i].n_ids > max_ids)
            max_ids = cs[i].n_ids;
        if (cs[i].len > max_len)
            max_len = cs[i].len;
        if (cs[i].kind == 'W')
            whole = &cs[i];
    }
    int32_t *ids = tu_xmalloc((max_len + 2) * sizeof *ids);
    char *back = tu_xmalloc(max_len + 1);
    for (size_t i = 0; i < n_cases; i++) {
        const tcase *k = &cs[i];
        unsigned char kind = (unsigned char)k->kind & 127;
        n_kind[kind]++;
        if (k->kind == 'K') { /* a vocabulary string: found at its gguf index, encodes to it */
            tu_set_case("known id of \"%.*s\"", (int)k->len, k->text);
            CHECK_EQ(pikv_tokenizer_find(t, k->text, k->len), k->ids[0]);
            size_t tl = 0;
            const char *ts = pikv_tokenizer_token(t, k->ids[0], &tl);
            CHECK(ts && tl == k->len && memcmp(ts, k->text, tl) == 0);
            ok_kind[kind]++;
            continue;
        }
        size_t n = 0, nb = 0;
        tu_set_case("%c case %zu: \"%.60s\"", k->kind, i, k->text);
        unsigned fl = PIKV_TOK_PARSE_SPECIAL;
        if (k->kind == 'D') { /* bytes without a symbol: ENOSYM, or dropped as HF does */
            CHECK_EQ(pikv_tokenizer_encode(t, k->text, k->len, fl, ids, max_len + 2, &n),
                     PIKV_TOK_ENOSYM);
            fl |= PIKV_TOK_DROP_UNKNOWN;
        }
        st = pikv_tokenizer_encode(t, k->text, k->len, fl, ids, max_len + 2, &n);
        CHECK_EQ(st, PIKV_TOK_OK);
        int same = st == PIKV_TOK_OK && n == k->n_ids &&
                   memcmp(ids, k->ids, n * sizeof *ids) == 0;
        if (!same && printed++ < 10) {
            fprintf(stderr, "  mismatch: %zu ids vs HF %zu; first difference at", n, k->n_ids);
            size_t j = 0;
            while (j < n && j < k->n_ids && ids[j] == k->ids[j])
                j++;
            fprintf(stderr, " %zu: ours", j);
            for (size_t q = j; q < n && q < j + 6; q++)
                fprintf(stderr, " %d", (int)ids[q]);
            fprintf(stderr, ", HF");
            for (size_t q = j; q < k->n_ids && q < j + 6; q++)
                fprintf(stderr, " %d", (int)k->ids[q]);
            fprintf(stderr, "\n");
        }
        CHECK(same);
        ok_kind[kind] += same;
        if (k->kind == 'D')
            continue;
        /* round trip */
        CHECK_EQ(pikv_tokenizer_decode(t, ids, n, 0, back, max_len + 1, &nb), PIKV_TOK_OK);
        CHECK(nb == k->len && memcmp(back, k->text, nb) == 0);
        /* decoding HF's ids gives the text back too */
        CHECK_EQ(pikv_tokenizer_decode(t, k->ids, k->n_ids, 0, back, max_len + 1, &nb), PIKV_TOK_OK);
        CHECK(nb == k->len && memcmp(back, k->text, nb) == 0);
    }
    printf("tokenizer_model: fixed strings %zu/%zu, random strings %zu/%zu, dropped-byte strings "
           "%zu/%zu, corpus lines %zu/%zu, whole corpus %zu/%zu, known ids %zu/%zu equal to HF "
           "tokenizers (create %.0f ms)\n", ok_kind['F'], n_kind['F'], ok_kind['R'], n_kind['R'],
           ok_kind['D'], n_kind['D'], ok_kind['C'],
           n_kind['C'], ok_kind['W'], n_kind['W'],
           ok_kind['K'], n_kind['K'], 1e3 * t_create);
    tu_set_case("reference content");
    CHECK(n_kind['F'] >= 40);
    CHECK(n_kind['R'] >= 1000);
    CHECK(n_kind['C'] >= 1000);
    CHECK(whole != NULL);

    if (whole) {
        /* "Hello" is one token; the chat markers are their control ids */
        int32_t h[4];
        size_t n = 0;
        tu_set_case("fixed ids");
        CHECK_EQ(pikv_tokenizer_encode(t, "Hello", 5, 0, h, 4, &n), PIKV_TOK_OK);
        CHECK(n == 1 && h[0] == pikv_tokenizer_find(t, "Hello", 5));
        CHECK_EQ(pikv_tokenizer_encode(t, "<|im_start|><|im_end|>", 22, PIKV_TOK_PARSE_SPECIAL, h, 4, &n), PIKV_TOK_OK);
        CHECK(n == 2 && h[0] == 1 && h[1] == 2);

        /* concurrent encodes of the whole corpus */
        pthread_t th[2];
        thr_arg args[2];
        tu_set_case("concurrent encodes");
        for (int i = 0; i < 2; i++) {
            args[i] = (thr_arg){t, whole, 0};
            CHECK_EQ(pthread_create(&th[i], NULL, thr_main, &args[i]), 0);
        }
        for (int i = 0; i < 2; i++) {
            pthread_join(th[i], NULL);
            CHECK_EQ(args[i].bad, 0);
        }

        /* speed: the whole corpus, one thread */
        int reps = bench > 0 ? bench : 3;
        double best = 1e30;
        for (int r = 0; r < reps; r++) {
            double s0 = now_s();
            pikv_tokenizer_encode(t, whole->text, whole->len, PIKV_TOK_PARSE_SPECIAL, ids,
                                  max_len + 2, &n);
            double dt = now_s() - s0;
            if (dt < best)
                best = dt;
        }
        printf("tokenizer_model: encode %.2f MB/s (%zu bytes -> %zu tokens, best of %d, one "
               "thread)\n", (double)whole->len / best / 1e6, whole->len, n, reps);
    }

    for (size_t i = 0; i < n_cases; i++)
        free(cs[i].ids);
    free(cs);
    free(ids);
    free(back);
    free(toks);
    free(tlens);
    free(types);
    free(merges);
    free(mlens);
    free(vbuf);
    free(cbuf);
    pikv_tokenizer_destroy(t);
    return tu_finish();
}
