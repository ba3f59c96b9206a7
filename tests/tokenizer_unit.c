/*
 * tokenizer_unit — the byte-level BPE tokenizer (samples/tokenizer.h) without a model: the
 * GPT-2 byte mapping, the "smollm" pre-tokenizer on tricky strings against splits written
 * here, BPE on a hand-made vocabulary with ids known by hand, special tokens, round trips of
 * random byte strings, concurrent encodes and bad inputs.
 */
#include "test-util.h"

#include <pthread.h>

#include "tokenizer.h"

/* ------------------------------------------------------------------------ */
/* A hand-made vocabulary: ids 0..255 the byte symbols in byte order, then extras.           */
/* ------------------------------------------------------------------------ */

#define MAX_TOK 300
static char tok_store[MAX_TOK][16];
static const char *tok_ptr[MAX_TOK];
static int32_t tok_type[MAX_TOK];
static int32_t n_tok;

static size_t put_cp(uint32_t cp, char *o)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    o[0] = (char)(0xC0 | (cp >> 6));
    o[1] = (char)(0x80 | (cp & 0x3F));
    return 2;
}

static int32_t add_tok(const char *s, int32_t type)
{
    snprintf(tok_store[n_tok], sizeof tok_store[n_tok], "%s", s);
    tok_ptr[n_tok] = tok_store[n_tok];
    tok_type[n_tok] = type;
    return n_tok++;
}

/* Token ids of the extras. */
enum {
    T_SPECIAL = 256, T_HE, T_LL, T_HELL, T_HELLO, T_GW, T_GWO, T_AA, T_BC, T_AB, T_GG, T_N_EXTRA
};

static const char *merge_list[] = {
    "h e", "l l", "he ll", "hell o", "\xc4\xa0 w", "\xc4\xa0w o", "a a", "b c", "a b",
    "\xc4\xa0 \xc4\xa0",
};
#define N_MERGES ((int32_t)(sizeof merge_list / sizeof merge_list[0]))

static void build_vocab(void)
{
    n_tok = 0;
    for (int b = 0; b < 256; b++) {
        char s[8] = {0};
        put_cp(pikv_tokenizer_byte_to_cp((uint8_t)b), s);
        add_tok(s, PIKV_TOK_TYPE_NORMAL);
    }
    add_tok("<|s|>", PIKV_TOK_TYPE_CONTROL);
    add_tok("he", 1);
    add_tok("ll", 1);
    add_tok("hell", 1);
    add_tok("hello", 1);
    add_tok("\xc4\xa0w", 1);
    add_tok("\xc4\xa0wo", 1);
    add_tok("aa", 1);
    add_tok("bc", 1);
    add_tok("ab", 1);
    add_tok("\xc4\xa0\xc4\xa0", 1);
}

static pikv_tokenizer_desc base_desc(void)
{
    pikv_tokenizer_desc d;
    memset(&d, 0, sizeof d);
    d.n_tokens = n_tok;
    d.tokens = tok_ptr;
    d.token_types = tok_type;
    d.n_merges = N_MERGES;
    d.merges = merge_list;
    d.bos_id = T_SPECIAL;
    d.eos_id = T_SPECIAL;
    d.unk_id = -1;
    d.pad_id = -1;
    return d;
}

/* Encodes and compares with want[0..n). */
static void check_encode(const pikv_tokenizer *t, const char *text, unsigned flags,
                         const int32_t *want, size_t n)
{
    int32_t ids[64];
    size_t got = 0;
    tu_set_case("encode \"%s\" flags %u", text, flags);
    CHECK_EQ(pikv_tokenizer_encode(t, text, strlen(text), flags, ids, 64, &got), PIKV_TOK_OK);
    CHECK_EQ(got, n);
    for (size_t i = 0; i < n && i < got; i++)
        CHECKF(ids[i] == want[i], "id %zu: got %d want %d", i, (int)ids[i], (int)want[i]);
}

/* ------------------------------------------------------------------------ */

static void test_byte_map(void)
{
    tu_set_case("byte map");
    int seen[400] = {0};
    for (int b = 0; b < 256; b++) {
        uint32_t cp = pikv_tokenizer_byte_to_cp((uint8_t)b);
        CHECKF(cp < 400, "byte %d -> U+%04X", b, (unsigned)cp);
        if (cp >= 400)
            continue;
        CHECKF(!seen[cp], "U+%04X used twice", (unsigned)cp);
        seen[cp] = 1;
        CHECKF(pikv_tokenizer_cp_to_byte(cp) == b, "byte %d -> U+%04X -> %d", b, (unsigned)cp,
               pikv_tokenizer_cp_to_byte(cp));
    }
    CHECK_EQ(pikv_tokenizer_byte_to_cp(' '), 0x120);  /* Ġ */
    CHECK_EQ(pikv_tokenizer_byte_to_cp('\n'), 0x10A); /* Ċ */
    CHECK_EQ(pikv_tokenizer_byte_to_cp(0), 0x100);
    CHECK_EQ(pikv_tokenizer_byte_to_cp('A'), 'A');
    CHECK_EQ(pikv_tokenizer_byte_to_cp(0xAD), 0x143);
    CHECK_EQ(pikv_tokenizer_cp_to_byte(' '), -1);
    CHECK_EQ(pikv_tokenizer_cp_to_byte(0x144), -1);
    CHECK_EQ(pikv_tokenizer_cp_to_byte(0x4E00), -1);
}

/* Pre-tokenizer: text and its expected pieces, separated by '|' in the spec string ('|'
 * itself never appears in these texts). */
static void check_split(const char *spec)
{
    char text[256];
    size_t want_ends[64], nw = 0, tl = 0;
    for (const char *p = spec; *p; p++) {
        if (*p == '|')
            want_ends[nw++] = tl;
        else
            text[tl++] = *p;
    }
    if (tl)
        want_ends[nw++] = tl;
    size_t ends[64], n = 0;
    tu_set_case("pre-tokenize \"%s\"", spec);
    CHECK_EQ(pikv_tokenizer_pretokenize(text, tl, ends, 64, &n), PIKV_TOK_OK);
    CHECK_EQ(n, nw);
    for (size_t i = 0; i < n && i < nw; i++)
        CHECKF(ends[i] == want_ends[i], "piece %zu ends at %zu, want %zu", i, ends[i],
               want_ends[i]);
}

static void test_pretokenizer(void)
{
    check_split("Hello| world");
    check_split("I|'m| don|'t| you|'ll| we|'ve| they|'re| he|'d| it|'s");
    check_split("x|'|S| O|'|Neil");          /* contractions are case-sensitive */
    check_split("''|s");                      /* a run of punctuation wins over 's later */
    check_split("1|2|3|4|5");                 /* every digit alone (smollm) */
    check_split("abc| |1|2|3|.|4");
    check_split("a| |1");                      /* a space before a digit stays alone */
    check_split("a| | b");
    check_split("a|\n|\n|b");
    check_split("a|\n\n");
    check_split("a|\n\n| b");
    check_split("\t|\t|x");
    check_split(" |\n|a");
    check_split("end|.|  ");
    check_split("hi|!!!| ok| ?|x");
    check_split("f|(|x|)| {| return| x|;| }");
    check_split("\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e\xe3\x83\x86\xe3\x82\xad");  /* CJK+kana */
    check_split("\xe4\xbd\xa0\xe5\xa5\xbd|\xef\xbc\x8c|\xe4\xb8\x96\xe7\x95\x8c"); /* 你好，世界 */
    check_split("\xce\xb1\xce\xb2\xce\xb3| \xd0\xb4\xd0\xb0");  /* Greek, Cyrillic */
    check_split("a|\xf0\x9f\x98\x80|b");                     /* emoji: not a letter */
    check_split(" \xf0\x9f\x98\x80\xf0\x9f\x98\x80| x");
    check_split("\xd9\xa3|\xd9\xa4|\xc2\xbd");               /* Arabic-Indic digits, ½: \p{N} */
    check_split("caf\xc3\xa9| na\xc3\xafve");
    check_split("\xff\xfe|ab");                              /* invalid bytes: one by one */
    check_split("a|\xff|b");
    check_split("a|\xe6\x97|b");                             /* truncated sequence */
    check_split("a|\xc0\xaf|b");                             /* overlong '/' */
    check_split("x|\xc2\xa0\xc2\xa0");                       /* NBSP is \s */
    check_split("");
}

static void test_hand_vocab(void)
{
    pikv_tokenizer_desc d = base_desc();
    pikv_tokenizer *t = NULL;
    tu_set_case("create hand vocab");
    CHECK_EQ(pikv_tokenizer_create(&d, &t), PIKV_TOK_OK);
    if (!t)
        return;
    CHECK_EQ(pikv_tokenizer_n_vocab(t), T_N_EXTRA);
    CHECK_EQ(pikv_tokenizer_find(t, "hello", 5), T_HELLO);
    CHECK_EQ(pikv_tokenizer_find(t, "hellO", 5), -1);

    { const int32_t w[] = {T_HELLO, T_GWO, 'r', 'l', 'd'}; check_encode(t, "hello world", 0, w, 5); }
    { const int32_t w[] = {T_HELL}; check_encode(t, "hell", 0, w, 1); }
    { const int32_t w[] = {T_HE, 'l'}; check_encode(t, "hel", 0, w, 2); }
    /* equal ranks: leftmost first */
    { const int32_t w[] = {T_AA, 'a'}; check_encode(t, "aaa", 0, w, 2); }
    { const int32_t w[] = {T_AA, T_AA}; check_encode(t, "aaaa", 0, w, 2); }
    /* "b c" (rank 7) before "a b" (rank 8) */
    { const int32_t w[] = {'a', T_BC}; check_encode(t, "abc", 0, w, 2); }
    { const int32_t w[] = {T_AB, 'x'}; check_encode(t, "abx", 0, w, 2); }
    /* "   w": the first two spaces merge (ĠĠ), the third joins w */
    { const int32_t w[] = {T_GG, T_GW}; check_encode(t, "   w", 0, w, 2); }
    { const int32_t w[] = {'x', T_SPECIAL, 'y'}; check_encode(t, "x<|s|>y", PIKV_TOK_PARSE_SPECIAL, w, 3); }
    { const int32_t w[] = {T_SPECIAL, T_SPECIAL}; check_encode(t, "<|s|><|s|>", PIKV_TOK_PARSE_SPECIAL, w, 2); }
    { const int32_t w[] = {'x', '<', '|', 's', '|', '>', 'y'}; check_encode(t, "x<|s|>y", 0, w, 7); }
    { const int32_t w[] = {'<', '|', 's', '|'}; check_encode(t, "<|s|", PIKV_TOK_PARSE_SPECIAL, w, 4); }
    { const int32_t w[] = {T_SPECIAL, T_HELLO}; check_encode(t, "hello", PIKV_TOK_ADD_BOS, w, 2); }
    { const int32_t w[] = {0xFF, 0xFE}; check_encode(t, "\xff\xfe", 0, w, 2); }
    check_encode(t, "", 0, NULL, 0);

    /* ESPACE reports the needed count; the first cap ids are written */
    int32_t ids[8];
    size_t n = 0;
    tu_set_case("encode ESPACE");
    CHECK_EQ(pikv_tokenizer_encode(t, "hello world", 11, 0, ids, 2, &n), PIKV_TOK_ESPACE);
    CHECK_EQ(n, 5);
    CHECK_EQ(ids[0], T_HELLO);
    CHECK_EQ(ids[1], T_GWO);
    CHECK_EQ(pikv_tokenizer_encode(t, "hello world", 11, 0, NULL, 0, &n), PIKV_TOK_ESPACE);
    CHECK_EQ(n, 5);

    /* decode */
    char out[64];
    tu_set_case("decode");
    const int32_t dec[] = {T_HELLO, T_GWO, 'r', 'l', 'd', T_SPECIAL, 0x0A};
    CHECK_EQ(pikv_tokenizer_decode(t, dec, 7, 0, out, sizeof out, &n), PIKV_TOK_OK);
    CHECK(n == 17 && memcmp(out, "hello world<|s|>\n", 17) == 0);
    /* the byte symbol of '\n' is Ċ (token 10): decodes to 0x0A */
    const int32_t nl = 10;
    CHECK_EQ(pikv_tokenizer_decode(t, &nl, 1, 0, out, sizeof out, &n), PIKV_TOK_OK);
    CHECK(n == 1 && out[0] == '\n');
    CHECK_EQ(pikv_tokenizer_decode(t, dec, 7, PIKV_TOK_SKIP_SPECIAL, out, sizeof out, &n), PIKV_TOK_OK);
    CHECK_EQ(n, 12);
    CHECK_EQ(pikv_tokenizer_decode(t, dec, 7, 0, out, 4, &n), PIKV_TOK_ESPACE);
    CHECK(n == 17 && memcmp(out, "hell", 4) == 0);
    const int32_t bad[] = {T_HELLO, T_N_EXTRA};
    CHECK_EQ(pikv_tokenizer_decode(t, bad, 2, 0, out, sizeof out, &n), PIKV_TOK_ERANGE);
    const int32_t neg = -1;
    CHECK_EQ(pikv_tokenizer_decode(t, &neg, 1, 0, out, sizeof out, &n), PIKV_TOK_ERANGE);

    /* round trip of random byte strings, with and without special parsing: every byte
     * string comes back exactly */
    tu_rng r = tu_rng_seed(10);
    static const char alphabet[] = "helowrd abc<|s>'\n\t1 9";
    for (int iter = 0; iter < 3000; iter++) {
        char s[200];
        size_t len = (size_t)tu_int(&r, 0, 199);
        int mode = iter % 3;
        for (size_t i = 0; i < len; i++)
            s[i] = mode == 0 ? (char)tu_int(&r, 0, 255)
                             : alphabet[tu_int(&r, 0, (int64_t)sizeof alphabet - 2)];
        if (mode == 2 && len > 10)
            memcpy(s + tu_int(&r, 0, (int64_t)len - 6), "<|s|>", 5);
        int32_t enc[256];
        size_t ne = 0, nd = 0;
        char back[256];
        unsigned fl = mode == 2 ? PIKV_TOK_PARSE_SPECIAL : 0;
        tu_set_case("round trip %d (mode %d, %zu bytes)", iter, mode, len);
        CHECK_EQ(pikv_tokenizer_encode(t, s, len, fl, enc, 256, &ne), PIKV_TOK_OK);
        CHECK(ne <= len);
        CHECK_EQ(pikv_tokenizer_decode(t, enc, ne, 0, back, sizeof back, &nd), PIKV_TOK_OK);
        CHECK(nd == len && memcmp(back, s, len) == 0);
    }
    pikv_tokenizer_destroy(t);
}

typedef struct thr_arg {
    const pikv_tokenizer *t;
    const char *text;
    size_t len;
    int32_t *want;
    size_t n_want;
    int bad;
} thr_arg;

static void *thr_main(void *p)
{
    thr_arg *a = p;
    int32_t *ids = tu_xmalloc((a->n_want + 1) * sizeof *ids);
    for (int i = 0; i < 200; i++) {
        size_t n = 0;
        if (pikv_tokenizer_encode(a->t, a->text, a->len, PIKV_TOK_PARSE_SPECIAL, ids,
                                  a->n_want + 1, &n) != PIKV_TOK_OK ||
            n != a->n_want || memcmp(ids, a->want, n * sizeof *ids) != 0)
            a->bad++;
    }
    free(ids);
    return NULL;
}

static void test_threads(void)
{
    pikv_tokenizer_desc d = base_desc();
    pikv_tokenizer *t = NULL;
    tu_set_case("concurrent encodes");
    CHECK_EQ(pikv_tokenizer_create(&d, &t), PIKV_TOK_OK);
    if (!t)
        return;
    char text[4000];
    tu_rng r = tu_rng_seed(3);
    for (size_t i = 0; i < sizeof text; i++)
        text[i] = "hello world aaab <|s|> x\n"[tu_int(&r, 0, 24)];
    size_t n = 0;
    int32_t *want = tu_xmalloc(sizeof text * sizeof *want);
    CHECK_EQ(pikv_tokenizer_encode(t, text, sizeof text, PIKV_TOK_PARSE_SPECIAL, want,
                                   sizeof text, &n), PIKV_TOK_OK);
    pthread_t th[4];
    thr_arg args[4];
    for (int i = 0; i < 4; i++) {
        args[i] = (thr_arg){t, text, sizeof text, want, n, 0};
        CHECK_EQ(pthread_create(&th[i], NULL, thr_main, &args[i]), 0);
    }
    for (int i = 0; i < 4; i++) {
        pthread_join(th[i], NULL);
        CHECK_EQ(args[i].bad, 0);
    }
    free(want);
    pikv_tokenizer_destroy(t);
}

static void expect_create(const pikv_tokenizer_desc *d, pikv_tok_status want, const char *what)
{
    pikv_tokenizer *t = (pikv_tokenizer *)&t; /* poisoned: must be reset to NULL */
    tu_set_case("create: %s", what);
    pikv_tok_status st = pikv_tokenizer_create(d, &t);
    CHECKF(st == want, "got %d (%s), want %d", (int)st, pikv_tokenizer_status_str(st), (int)want);
    if (st == PIKV_TOK_OK)
        pikv_tokenizer_destroy(t);
    else
        CHECK(t == NULL);
}

static void test_bad_inputs(void)
{
    pikv_tokenizer_desc d = base_desc();
    pikv_tokenizer *t = NULL;
    tu_set_case("bad inputs");
    CHECK_EQ(pikv_tokenizer_create(NULL, &t), PIKV_TOK_EINVAL);
    CHECK_EQ(pikv_tokenizer_create(&d, NULL), PIKV_TOK_EINVAL);
    pikv_tokenizer_destroy(NULL);

    pikv_tokenizer_desc e = d;
    e.n_tokens = 0;
    expect_create(&e, PIKV_TOK_EVOCAB, "empty vocabulary");
    e = d;
    e.n_tokens = -1;
    expect_create(&e, PIKV_TOK_EINVAL, "negative count");
    e = d;
    e.tokens = NULL;
    expect_create(&e, PIKV_TOK_EINVAL, "NULL tokens");
    e = d;
    e.n_merges = -3;
    expect_create(&e, PIKV_TOK_EINVAL, "negative merges");
    e = d;
    e.bos_id = n_tok;
    expect_create(&e, PIKV_TOK_EVOCAB, "bos out of range");

    /* a missing byte symbol (byte 'q' replaced by "qq"): encoding a 'q' fails with ENOSYM,
     * or drops it with PIKV_TOK_DROP_UNKNOWN, its neighbours then merging as in HF */
    const char *saved = tok_ptr['q'];
    tok_ptr['q'] = "qq";
    tu_set_case("missing byte symbol");
    CHECK_EQ(pikv_tokenizer_create(&d, &t), PIKV_TOK_OK);
    if (t) {
        int32_t q[8];
        size_t nq = 77;
        CHECK_EQ(pikv_tokenizer_encode(t, "aqa", 3, 0, q, 8, &nq), PIKV_TOK_ENOSYM);
        CHECK_EQ(nq, 0);
        CHECK_EQ(pikv_tokenizer_encode(t, "q", 1, 0, q, 8, &nq), PIKV_TOK_ENOSYM);
        CHECK_EQ(pikv_tokenizer_encode(t, "aqa", 3, PIKV_TOK_DROP_UNKNOWN, q, 8, &nq), PIKV_TOK_OK);
        CHECK(nq == 1 && q[0] == T_AA);
        CHECK_EQ(pikv_tokenizer_encode(t, "q q", 3, PIKV_TOK_DROP_UNKNOWN, q, 8, &nq), PIKV_TOK_OK);
        CHECK(nq == 1 && q[0] == 0x20); /* " q" keeps its space; "q" is empty */
        CHECK_EQ(pikv_tokenizer_encode(t, "hi", 2, 0, q, 8, &nq), PIKV_TOK_OK);
        pikv_tokenizer_destroy(t);
        t = NULL;
    }
    tok_ptr['q'] = "a"; /* duplicate of byte 'a' */
    expect_create(&d, PIKV_TOK_EVOCAB, "duplicate token");
    tok_ptr['q'] = "";
    expect_create(&d, PIKV_TOK_EVOCAB, "empty token");
    tok_ptr['q'] = NULL;
    expect_create(&d, PIKV_TOK_EINVAL, "NULL token");
    tok_ptr['q'] = saved;

    const char *m1[] = {"h e", "x zz"};
    const char *m2[] = {"he"};
    const char *m3[] = {"x y"};    /* "xy" not in the vocabulary */
    const char *m4[] = {"h e", " h"};
    const char *m5[] = {"h e", NULL};
    e = d;
    e.merges = m1, e.n_merges = 2;
    expect_create(&e, PIKV_TOK_EVOCAB, "merge names an unknown token");
    e.merges = m2, e.n_merges = 1;
    expect_create(&e, PIKV_TOK_EVOCAB, "merge without a space");
    e.merges = m3, e.n_merges = 1;
    expect_create(&e, PIKV_TOK_EVOCAB, "merge result not in the vocabulary");
    e.merges = m4, e.n_merges = 2;
    expect_create(&e, PIKV_TOK_EVOCAB, "merge with an empty side");
    e.merges = m5, e.n_merges = 2;
    expect_create(&e, PIKV_TOK_EINVAL, "NULL merge");
    e.merges = NULL, e.n_merges = 0;
    expect_create(&e, PIKV_TOK_OK, "no merges");

    CHECK_EQ(pikv_tokenizer_create(&d, &t), PIKV_TOK_OK);
    if (!t)
        return;
    int32_t ids[4];
    char out[4];
    size_t n = 99;
    tu_set_case("bad encode/decode arguments");
    CHECK_EQ(pikv_tokenizer_encode(NULL, "a", 1, 0, ids, 4, &n), PIKV_TOK_EINVAL);
    CHECK_EQ(n, 0);
    CHECK_EQ(pikv_tokenizer_encode(t, NULL, 1, 0, ids, 4, &n), PIKV_TOK_EINVAL);
    CHECK_EQ(pikv_tokenizer_encode(t, NULL, 0, 0, ids, 4, &n), PIKV_TOK_OK);
    CHECK_EQ(pikv_tokenizer_encode(t, "a", 1, 0, NULL, 4, &n), PIKV_TOK_EINVAL);
    CHECK_EQ(pikv_tokenizer_encode(t, "a", 1, 0, ids, 4, NULL), PIKV_TOK_EINVAL);
    CHECK_EQ(pikv_tokenizer_encode(t, "a", 1, 64, ids, 4, &n), PIKV_TOK_EINVAL);
    CHECK_EQ(pikv_tokenizer_encode(t, "a", 1, 8, ids, 4, &n), PIKV_TOK_EINVAL);
    CHECK_EQ(pikv_tokenizer_decode(t, NULL, 1, 0, out, 4, &n), PIKV_TOK_EINVAL);
    CHECK_EQ(pikv_tokenizer_decode(t, ids, 0, 0, NULL, 4, &n), PIKV_TOK_EINVAL);
    CHECK_EQ(pikv_tokenizer_decode(t, ids, 0, 8, out, 4, &n), PIKV_TOK_EINVAL);
    CHECK_EQ(pikv_tokenizer_pretokenize(NULL, 3, NULL, 0, &n), PIKV_TOK_EINVAL);
    CHECK(pikv_tokenizer_token(t, -1, NULL) == NULL);
    CHECK(pikv_tokenizer_token(t, n_tok, NULL) == NULL);
    CHECK_EQ(pikv_tokenizer_token_type(t, T_SPECIAL), PIKV_TOK_TYPE_CONTROL);
    CHECK(strcmp(pikv_tokenizer_status_str(PIKV_TOK_EVOCAB), "inconsistent vocabulary or merges") == 0);
    pikv_tokenizer_destroy(t);

    e = d;
    e.bos_id = -1;
    CHECK_EQ(pikv_tokenizer_create(&e, &t), PIKV_TOK_OK);
    if (t) {
        CHECK_EQ(pikv_tokenizer_encode(t, "a", 1, PIKV_TOK_ADD_BOS, ids, 4, &n), PIKV_TOK_EINVAL);
        pikv_tokenizer_destroy(t);
    }
}

int main(void)
{
    build_vocab();
    test_byte_map();
    test_pretokenizer();
    test_hand_vocab();
    test_threads();
    test_bad_inputs();
    return tu_finish();
}
