/*
 * tokenizer.c — byte-level BPE tokenizer (see tokenizer.h and docs/tokenizer.md).
 *
 * Layout: token strings in one blob (offsets), their decoded bytes in another; an open-
 * addressing hash table string -> id, and one (left id, right id) -> (rank, result id). The
 * tokenizer is immutable after creation; encode allocates its own scratch per call.
 */
#include "tokenizer.h"

#include <limits.h>
#include <stdlib.h>
#include <string.h>

#include "tokenizer-unicode.h"

/* ------------------------------------------------------------------------ */
/* Byte mapping (GPT-2 bytes_to_unicode)                                     */
/* ------------------------------------------------------------------------ */

static int byte_is_printable(unsigned b)
{
    return (b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
}

uint32_t pikv_tokenizer_byte_to_cp(uint8_t b)
{
    if (byte_is_printable(b))
        return b;
    uint32_t n = 0;
    for (unsigned x = 0; x < b; x++)
        n += !byte_is_printable(x);
    return 256u + n;
}

int pikv_tokenizer_cp_to_byte(uint32_t cp)
{
    if (cp < 256)
        return byte_is_printable(cp) ? (int)cp : -1;
    if (cp >= 256 + 68)
        return -1;
    uint32_t n = 0;
    for (unsigned x = 0; x < 256; x++) {
        if (!byte_is_printable(x)) {
            if (n == cp - 256)
                return (int)x;
            n++;
        }
    }
    return -1;
}

static size_t utf8_put(uint32_t cp, unsigned char *o)
{
    if (cp < 0x80) {
        o[0] = (unsigned char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (unsigned char)(0xC0 | (cp >> 6));
        o[1] = (unsigned char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (unsigned char)(0xE0 | (cp >> 12));
        o[1] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
        o[2] = (unsigned char)(0x80 | (cp & 0x3F));
        return 3;
    }
    o[0] = (unsigned char)(0xF0 | (cp >> 18));
    o[1] = (unsigned char)(0x80 | ((cp >> 12) & 0x3F));
    o[2] = (unsigned char)(0x80 | ((cp >> 6) & 0x3F));
    o[3] = (unsigned char)(0x80 | (cp & 0x3F));
    return 4;
}

#define CP_INVALID 0xFFFFFFFFu

/* Decodes one code point at s[i] (i < n). Invalid, overlong, surrogate or truncated sequences
 * give CP_INVALID and length 1: the byte is then handled on its own. */
static uint32_t utf8_get(const unsigned char *s, size_t n, size_t i, size_t *len)
{
    unsigned c = s[i];
    *len = 1;
    if (c < 0x80)
        return c;
    size_t k;
    uint32_t cp, min;
    if ((c & 0xE0) == 0xC0) {
        k = 2, cp = c & 0x1F, min = 0x80;
    } else if ((c & 0xF0) == 0xE0) {
        k = 3, cp = c & 0x0F, min = 0x800;
    } else if ((c & 0xF8) == 0xF0) {
        k = 4, cp = c & 0x07, min = 0x10000;
    } else {
        return CP_INVALID;
    }
    if (n - i < k)
        return CP_INVALID;
    for (size_t j = 1; j < k; j++) {
        if ((s[i + j] & 0xC0) != 0x80)
            return CP_INVALID;
        cp = (cp << 6) | (s[i + j] & 0x3Fu);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF))
        return CP_INVALID;
    *len = k;
    return cp;
}

/* ------------------------------------------------------------------------ */
/* Character classes of the pre-tokenizer regex                              */
/* ------------------------------------------------------------------------ */

enum { CL_L, CL_N, CL_S, CL_O }; /* \p{L}, \p{N}, \s, anything else */

static int in_ranges(uint32_t cp, const uint32_t (*r)[2], size_t n)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cp < r[mid][0])
            hi = mid;
        else if (cp > r[mid][1])
            lo = mid + 1;
        else
            return 1;
    }
    return 0;
}

/* \s: Unicode White_Space (as the Rust regex crate and PCRE2 with UCP define it). */
static int is_space(uint32_t cp)
{
    return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 ||
           cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 ||
           cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

static int cp_class(uint32_t cp)
{
    if (cp == CP_INVALID)
        return CL_O;
    if (cp < 0x80) {
        if ((cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z'))
            return CL_L;
        if (cp >= '0' && cp <= '9')
            return CL_N;
        return is_space(cp) ? CL_S : CL_O;
    }
    if (is_space(cp))
        return CL_S;
    if (in_ranges(cp, tok_letter_ranges, sizeof tok_letter_ranges / sizeof tok_letter_ranges[0]))
        return CL_L;
    if (in_ranges(cp, tok_number_ranges, sizeof tok_number_ranges / sizeof tok_number_ranges[0]))
        return CL_N;
    return CL_O;
}

static int class_at(const unsigned char *s, size_t n, size_t i, size_t *len)
{
    return cp_class(utf8_get(s, n, i, len));
}

/* The end of the pre-token starting at i (< n). "smollm": each \p{N} alone; between them the
 * GPT-2 regex 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+,
 * leftmost alternative first. A number code point ends the regex's segment, so it acts as the
 * end of the text for the lookahead of \s+(?!\S) and never joins an optional space. */
static size_t pretok_next(const unsigned char *s, size_t n, size_t i)
{
    size_t len;
    int cl = class_at(s, n, i, &len);
    if (cl == CL_N)
        return i + len;
    if (s[i] == '\'' && i + 1 < n) {
        unsigned char a = s[i + 1];
        if (a == 's' || a == 't' || a == 'm' || a == 'd')
            return i + 2;
        if (i + 2 < n) {
            unsigned char b = s[i + 2];
            if ((a == 'r' && b == 'e') || (a == 'v' && b == 'e') || (a == 'l' && b == 'l'))
                return i + 3;
        }
    }
    size_t j = i + len;
    if (cl == CL_S) {
        if (s[i] == ' ' && j < n) {
            size_t l2;
            int c2 = class_at(s, n, j, &l2);
            if (c2 == CL_L || c2 == CL_O) { /* ' ?\p{L}+' or ' ?[^\s\p{L}\p{N}]+' */
                cl = c2;
                j += l2;
                goto run;
            }
        }
        /* \s+(?!\S) then \s+ */
        size_t last = i;
        while (j < n) {
            size_t l2;
            int c2 = class_at(s, n, j, &l2);
            if (c2 != CL_S)
                break;
            last = j;
            j += l2;
        }
        if (j == n || class_at(s, n, j, &len) == CL_N)
            return j;       /* the run reaches the end of its segment */
        return last > i ? last : j; /* leave the last space to the next token */
    }
run:
    while (j < n) {
        size_t l2;
        if (class_at(s, n, j, &l2) != cl)
            break;
        j += l2;
    }
    return j;
}

pikv_tok_status pikv_tokenizer_pretokenize(const char *text, size_t len, size_t *ends, size_t cap,
                                           size_t *n_pieces)
{
    if (!n_pieces || (!text && len) || (!ends && cap))
        return PIKV_TOK_EINVAL;
    const unsigned char *s = (const unsigned char *)text;
    size_t k = 0;
    for (size_t i = 0; i < len;) {
        size_t e = pretok_next(s, len, i);
        if (k < cap)
            ends[k] = e;
        k++;
        i = e;
    }
    *n_pieces = k;
    return k > cap ? PIKV_TOK_ESPACE : PIKV_TOK_OK;
}

/* ------------------------------------------------------------------------ */
/* The tokenizer                                                             */
/* ------------------------------------------------------------------------ */

typedef struct merge_slot {
    uint64_t key; /* left << 32 | right; UINT64_MAX empty */
    int32_t rank;
    int32_t result;
} merge_slot;

struct pikv_tokenizer {
    int32_t n_tokens;
    char *blob;      /* token strings */
    size_t *off;     /* n_tokens + 1 offsets into blob */
    char *dblob;     /* decoded bytes of each token */
    size_t *doff;    /* n_tokens + 1 offsets into dblob */
    int32_t *types;
    int32_t *vtab;   /* vocab hash table: ids, -1 empty */
    size_t vmask;
    merge_slot *mtab;
    size_t mmask;
    int32_t byte_tok[256];
    int32_t *specials; /* control / user-defined ids, longest text first */
    int32_t n_specials;
    unsigned char special_first[256];
    int32_t bos, eos, unk, pad;
};

static uint64_t hash_bytes(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (unsigned char)s[i];
        h *= 1099511628211ull;
    }
    return h ^ (h >> 29);
}

static uint64_t hash_u64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}

int32_t pikv_tokenizer_find(const pikv_tokenizer *t, const char *str, size_t len)
{
    if (!t || (!str && len))
        return -1;
    for (size_t h = hash_bytes(str, len) & t->vmask;; h = (h + 1) & t->vmask) {
        int32_t id = t->vtab[h];
        if (id < 0)
            return -1;
        size_t l = t->off[id + 1] - t->off[id];
        if (l == len && memcmp(t->blob + t->off[id], str, len) == 0)
            return id;
    }
}

static const merge_slot *merge_find(const pikv_tokenizer *t, int32_t a, int32_t b)
{
    uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
    for (size_t h = hash_u64(key) & t->mmask;; h = (h + 1) & t->mmask) {
        const merge_slot *m = &t->mtab[h];
        if (m->key == key)
            return m;
        if (m->key == UINT64_MAX)
            return NULL;
    }
}

static size_t pow2_at_least(size_t n)
{
    size_t p = 16;
    while (p < n)
        p <<= 1;
    return p;
}

void pikv_tokenizer_destroy(pikv_tokenizer *t)
{
    if (!t)
        return;
    free(t->blob);
    free(t->off);
    free(t->dblob);
    free(t->doff);
    free(t->types);
    free(t->vtab);
    free(t->mtab);
    free(t->specials);
    free(t);
}

static int is_special_type(int32_t type)
{
    return type == PIKV_TOK_TYPE_CONTROL || type == PIKV_TOK_TYPE_USER_DEFINED;
}

static size_t tok_len(const pikv_tokenizer *t, int32_t id)
{
    return t->off[id + 1] - t->off[id];
}

static pikv_tok_status build(pikv_tokenizer *t, const pikv_tokenizer_desc *d)
{
    int32_t n = d->n_tokens;
    size_t total = 0;
    for (int32_t i = 0; i < n; i++) {
        if (!d->tokens[i])
            return PIKV_TOK_EINVAL;
        size_t l = d->token_lens ? d->token_lens[i] : strlen(d->tokens[i]);
        if (l == 0)
            return PIKV_TOK_EVOCAB;
        if (l > SIZE_MAX / 2 - total)
            return PIKV_TOK_ENOMEM;
        total += l;
    }
    t->n_tokens = n;
    t->blob = malloc(total);
    t->off = malloc(((size_t)n + 1) * sizeof *t->off);
    t->dblob = malloc(total);
    t->doff = malloc(((size_t)n + 1) * sizeof *t->doff);
    t->types = malloc((size_t)n * sizeof *t->types);
    t->vmask = pow2_at_least((size_t)n * 2) - 1;
    t->vtab = malloc((t->vmask + 1) * sizeof *t->vtab);
    if (!t->blob || !t->off || !t->dblob || !t->doff || !t->types || !t->vtab)
        return PIKV_TOK_ENOMEM;
    memset(t->vtab, 0xFF, (t->vmask + 1) * sizeof *t->vtab);
    size_t o = 0, dout = 0;
    for (int32_t i = 0; i < n; i++) {
        size_t l = d->token_lens ? d->token_lens[i] : strlen(d->tokens[i]);
        t->off[i] = o;
        memcpy(t->blob + o, d->tokens[i], l);
        t->types[i] = d->token_types ? d->token_types[i] : PIKV_TOK_TYPE_NORMAL;
        /* Decoded bytes: special tokens as their text; otherwise the inverse byte mapping
         * (a code point that stands for no byte is kept as its UTF-8, never longer). */
        t->doff[i] = dout;
        if (is_special_type(t->types[i])) {
            memcpy(t->dblob + dout, d->tokens[i], l);
            dout += l;
        } else {
            const unsigned char *s = (const unsigned char *)d->tokens[i];
            for (size_t p = 0; p < l;) {
                size_t cl;
                uint32_t cp = utf8_get(s, l, p, &cl);
                int b = cp == CP_INVALID ? -1 : pikv_tokenizer_cp_to_byte(cp);
                if (b >= 0)
                    t->dblob[dout++] = (char)b;
                else {
                    memcpy(t->dblob + dout, s + p, cl);
                    dout += cl;
                }
                p += cl;
            }
        }
        o += l;
        if (pikv_tokenizer_find(t, d->tokens[i], l) >= 0)
            return PIKV_TOK_EVOCAB; /* duplicate token */
        t->off[i + 1] = o;
        size_t h = hash_bytes(d->tokens[i], l) & t->vmask;
        while (t->vtab[h] >= 0)
            h = (h + 1) & t->vmask;
        t->vtab[h] = i;
    }
    t->off[n] = o;
    t->doff[n] = dout;

    for (unsigned b = 0; b < 256; b++) {
        unsigned char u[4];
        size_t ul = utf8_put(pikv_tokenizer_byte_to_cp((uint8_t)b), u);
        t->byte_tok[b] = pikv_tokenizer_find(t, (const char *)u, ul); /* -1: none */
    }

    t->mmask = pow2_at_least((size_t)d->n_merges * 2 + 1) - 1;
    t->mtab = malloc((t->mmask + 1) * sizeof *t->mtab);
    if (!t->mtab)
        return PIKV_TOK_ENOMEM;
    for (size_t i = 0; i <= t->mmask; i++)
        t->mtab[i].key = UINT64_MAX;
    char *cat = NULL;
    size_t cat_cap = 0;
    pikv_tok_status st = PIKV_TOK_OK;
    for (int32_t r = 0; r < d->n_merges && st == PIKV_TOK_OK; r++) {
        const char *m = d->merges[r];
        if (!m) {
            st = PIKV_TOK_EINVAL;
            break;
        }
        size_t ml = d->merge_lens ? d->merge_lens[r] : strlen(m);
        const char *sp = memchr(m, ' ', ml);
        if (!sp || sp == m || sp == m + ml - 1) {
            st = PIKV_TOK_EVOCAB;
            break;
        }
        size_t la = (size_t)(sp - m), lb = ml - la - 1;
        int32_t a = pikv_tokenizer_find(t, m, la), b = pikv_tokenizer_find(t, sp + 1, lb);
        if (a < 0 || b < 0) {
            st = PIKV_TOK_EVOCAB;
            break;
        }
        if (la + lb > cat_cap) {
            char *nc = realloc(cat, la + lb);
            if (!nc) {
                st = PIKV_TOK_ENOMEM;
                break;
            }
            cat = nc;
            cat_cap = la + lb;
        }
        memcpy(cat, m, la);
        memcpy(cat + la, sp + 1, lb);
        int32_t res = pikv_tokenizer_find(t, cat, la + lb);
        if (res < 0) {
            st = PIKV_TOK_EVOCAB;
            break;
        }
        uint64_t key = ((uint64_t)(uint32_t)a << 32) | (uint32_t)b;
        size_t h = hash_u64(key) & t->mmask;
        while (t->mtab[h].key != UINT64_MAX && t->mtab[h].key != key)
            h = (h + 1) & t->mmask;
        if (t->mtab[h].key == UINT64_MAX) { /* a repeated pair keeps its first (lowest) rank */
            t->mtab[h].key = key;
            t->mtab[h].rank = r;
            t->mtab[h].result = res;
        }
    }
    free(cat);
    if (st != PIKV_TOK_OK)
        return st;

    t->n_specials = 0;
    for (int32_t i = 0; i < n; i++)
        t->n_specials += is_special_type(t->types[i]);
    if (t->n_specials) {
        t->specials = malloc((size_t)t->n_specials * sizeof *t->specials);
        if (!t->specials)
            return PIKV_TOK_ENOMEM;
        int32_t k = 0;
        for (int32_t i = 0; i < n; i++) {
            if (!is_special_type(t->types[i]))
                continue;
            /* insertion sort, longest first (leftmost-longest matching) */
            int32_t j = k++;
            while (j > 0 && tok_len(t, t->specials[j - 1]) < tok_len(t, i)) {
                t->specials[j] = t->specials[j - 1];
                j--;
            }
            t->specials[j] = i;
            t->special_first[(unsigned char)t->blob[t->off[i]]] = 1;
        }
    }
    return PIKV_TOK_OK;
}

pikv_tok_status pikv_tokenizer_create(const pikv_tokenizer_desc *d, pikv_tokenizer **out)
{
    if (!out)
        return PIKV_TOK_EINVAL;
    *out = NULL;
    if (!d || d->n_tokens < 0 || d->n_merges < 0 || (d->n_tokens && !d->tokens) ||
        (d->n_merges && !d->merges))
        return PIKV_TOK_EINVAL;
    if (d->n_tokens < 1)
        return PIKV_TOK_EVOCAB;
    const int32_t ids[4] = {d->bos_id, d->eos_id, d->unk_id, d->pad_id};
    for (int i = 0; i < 4; i++)
        if (ids[i] < -1 || ids[i] >= d->n_tokens)
            return PIKV_TOK_EVOCAB;
    pikv_tokenizer *t = calloc(1, sizeof *t);
    if (!t)
        return PIKV_TOK_ENOMEM;
    t->bos = d->bos_id;
    t->eos = d->eos_id;
    t->unk = d->unk_id;
    t->pad = d->pad_id;
    pikv_tok_status st = build(t, d);
    if (st != PIKV_TOK_OK) {
        pikv_tokenizer_destroy(t);
        return st;
    }
    *out = t;
    return PIKV_TOK_OK;
}

/* ------------------------------------------------------------------------ */
/* Encoding                                                                  */
/* ------------------------------------------------------------------------ */

typedef struct heap_item {
    int32_t rank;
    int32_t pos;   /* left symbol */
    int32_t right; /* right symbol at push time */
    int32_t a, b;  /* their ids at push time */
} heap_item;

typedef struct scratch {
    int32_t *id, *prev, *next;
    heap_item *heap;
    size_t cap, heap_cap;
} scratch;

static int heap_less(const heap_item *x, const heap_item *y)
{
    return x->rank < y->rank || (x->rank == y->rank && x->pos < y->pos);
}

static void heap_push(heap_item *h, size_t *n, heap_item it)
{
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!heap_less(&it, &h[p]))
            break;
        h[i] = h[p];
        i = p;
    }
    h[i] = it;
}

static heap_item heap_pop(heap_item *h, size_t *n)
{
    heap_item top = h[0], last = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= *n)
            break;
        if (c + 1 < *n && heap_less(&h[c + 1], &h[c]))
            c++;
        if (!heap_less(&h[c], &last))
            break;
        h[i] = h[c];
        i = c;
    }
    if (*n)
        h[i] = last;
    return top;
}

static int scratch_reserve(scratch *s, size_t m)
{
    if (m <= s->cap)
        return 1;
    size_t c = s->cap ? s->cap : 64;
    while (c < m)
        c *= 2;
    /* each merge pushes at most 2 items; m - 1 initial pairs */
    if (c > (SIZE_MAX / sizeof(heap_item)) / 3 || c > INT32_MAX)
        return 0;
    int32_t *id = realloc(s->id, c * sizeof *id);
    if (id)
        s->id = id;
    int32_t *pv = realloc(s->prev, c * sizeof *pv);
    if (pv)
        s->prev = pv;
    int32_t *nx = realloc(s->next, c * sizeof *nx);
    if (nx)
        s->next = nx;
    heap_item *hp = realloc(s->heap, 3 * c * sizeof *hp);
    if (hp)
        s->heap = hp;
    if (!id || !pv || !nx || !hp)
        return 0;
    s->cap = c;
    return 1;
}

static void try_push(const pikv_tokenizer *t, scratch *s, size_t *hn, int32_t l)
{
    int32_t r = s->next[l];
    if (r < 0)
        return;
    const merge_slot *m = merge_find(t, s->id[l], s->id[r]);
    if (!m)
        return;
    heap_item it = {m->rank, l, r, s->id[l], s->id[r]};
    heap_push(s->heap, hn, it);
}

typedef struct out_buf {
    int32_t *ids;
    size_t cap, n;
} out_buf;

static void emit(out_buf *o, int32_t id)
{
    if (o->n < o->cap)
        o->ids[o->n] = id;
    o->n++;
}

/* BPE of one pre-token: symbols start as byte tokens; the lowest-rank adjacent pair merges
 * first (leftmost among equal ranks), via a binary heap with lazy invalidation: O(m log m). */
static pikv_tok_status bpe_piece(const pikv_tokenizer *t, const unsigned char *p, size_t len,
                                 unsigned flags, scratch *s, out_buf *o)
{
    if (len == 1 && t->byte_tok[p[0]] >= 0) {
        emit(o, t->byte_tok[p[0]]);
        return PIKV_TOK_OK;
    }
    if (!scratch_reserve(s, len))
        return PIKV_TOK_ENOMEM;
    size_t m = 0;
    for (size_t i = 0; i < len; i++) {
        int32_t id = t->byte_tok[p[i]];
        if (id < 0) {
            if (!(flags & PIKV_TOK_DROP_UNKNOWN))
                return PIKV_TOK_ENOSYM;
            continue; /* dropped: its neighbours become adjacent, as in HF tokenizers */
        }
        s->id[m] = id;
        s->prev[m] = (int32_t)m - 1;
        s->next[m] = -1;
        if (m)
            s->next[m - 1] = (int32_t)m;
        m++;
    }
    if (m == 0)
        return PIKV_TOK_OK;
    size_t hn = 0;
    for (size_t i = 0; i + 1 < m; i++)
        try_push(t, s, &hn, (int32_t)i);
    while (hn) {
        heap_item it = heap_pop(s->heap, &hn);
        int32_t l = it.pos, r = it.right;
        /* stale: l was merged into its left (id -1), or either side changed since the push */
        if (s->id[l] != it.a || s->next[l] != r || s->id[r] != it.b)
            continue;
        const merge_slot *mg = merge_find(t, it.a, it.b);
        s->id[l] = mg->result;
        s->id[r] = -1;
        s->next[l] = s->next[r];
        if (s->next[r] >= 0)
            s->prev[s->next[r]] = l;
        if (s->prev[l] >= 0)
            try_push(t, s, &hn, s->prev[l]);
        try_push(t, s, &hn, l);
    }
    for (int32_t i = 0; i >= 0; i = s->next[i])
        emit(o, s->id[i]);
    return PIKV_TOK_OK;
}

static pikv_tok_status encode_plain(const pikv_tokenizer *t, const unsigned char *s, size_t n,
                                    unsigned flags, scratch *sc, out_buf *o)
{
    for (size_t i = 0; i < n;) {
        size_t e = pretok_next(s, n, i);
        pikv_tok_status st = bpe_piece(t, s + i, e - i, flags, sc, o);
        if (st != PIKV_TOK_OK)
            return st;
        i = e;
    }
    return PIKV_TOK_OK;
}

/* The special token at s[i], longest first, or -1. */
static int32_t special_at(const pikv_tokenizer *t, const unsigned char *s, size_t n, size_t i)
{
    if (!t->special_first[s[i]])
        return -1;
    for (int32_t k = 0; k < t->n_specials; k++) {
        int32_t id = t->specials[k];
        size_t l = tok_len(t, id);
        if (l <= n - i && memcmp(s + i, t->blob + t->off[id], l) == 0)
            return id;
    }
    return -1;
}

pikv_tok_status pikv_tokenizer_encode(const pikv_tokenizer *t, const char *text, size_t len,
                                      unsigned flags, int32_t *ids, size_t cap, size_t *n_ids)
{
    if (n_ids)
        *n_ids = 0;
    if (!t || !n_ids || (!text && len) || (!ids && cap) ||
        (flags & ~(PIKV_TOK_PARSE_SPECIAL | PIKV_TOK_ADD_BOS | PIKV_TOK_DROP_UNKNOWN)))
        return PIKV_TOK_EINVAL;
    if ((flags & PIKV_TOK_ADD_BOS) && t->bos < 0)
        return PIKV_TOK_EINVAL;
    out_buf o = {ids, cap, 0};
    scratch sc = {0};
    const unsigned char *s = (const unsigned char *)text;
    pikv_tok_status st = PIKV_TOK_OK;
    if (flags & PIKV_TOK_ADD_BOS)
        emit(&o, t->bos);
    if ((flags & PIKV_TOK_PARSE_SPECIAL) && t->n_specials) {
        size_t start = 0;
        for (size_t i = 0; i < len && st == PIKV_TOK_OK;) {
            int32_t sp = special_at(t, s, len, i);
            if (sp < 0) {
                i++;
                continue;
            }
            st = encode_plain(t, s + start, i - start, flags, &sc, &o);
            emit(&o, sp);
            i += tok_len(t, sp);
            start = i;
        }
        if (st == PIKV_TOK_OK)
            st = encode_plain(t, s + start, len - start, flags, &sc, &o);
    } else {
        st = encode_plain(t, s, len, flags, &sc, &o);
    }
    free(sc.id);
    free(sc.prev);
    free(sc.next);
    free(sc.heap);
    if (st != PIKV_TOK_OK)
        return st;
    *n_ids = o.n;
    return o.n > cap ? PIKV_TOK_ESPACE : PIKV_TOK_OK;
}

/* ------------------------------------------------------------------------ */
/* Decoding and accessors                                                    */
/* ------------------------------------------------------------------------ */

pikv_tok_status pikv_tokenizer_decode(const pikv_tokenizer *t, const int32_t *ids, size_t n,
                                      unsigned flags, char *out, size_t cap, size_t *n_bytes)
{
    if (n_bytes)
        *n_bytes = 0;
    if (!t || !n_bytes || (!ids && n) || (!out && cap) || (flags & ~PIKV_TOK_SKIP_SPECIAL))
        return PIKV_TOK_EINVAL;
    size_t w = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        if (id < 0 || id >= t->n_tokens)
            return PIKV_TOK_ERANGE;
        if ((flags & PIKV_TOK_SKIP_SPECIAL) && t->types[id] == PIKV_TOK_TYPE_CONTROL)
            continue;
        size_t l = t->doff[id + 1] - t->doff[id];
        if (w < cap)
            memcpy(out + w, t->dblob + t->doff[id], l <= cap - w ? l : cap - w);
        w += l;
    }
    *n_bytes = w;
    return w > cap ? PIKV_TOK_ESPACE : PIKV_TOK_OK;
}

int32_t pikv_tokenizer_n_vocab(const pikv_tokenizer *t)
{
    return t ? t->n_tokens : 0;
}

const char *pikv_tokenizer_token(const pikv_tokenizer *t, int32_t id, size_t *len)
{
    if (!t || id < 0 || id >= t->n_tokens)
        return NULL;
    if (len)
        *len = tok_len(t, id);
    return t->blob + t->off[id];
}

int32_t pikv_tokenizer_token_type(const pikv_tokenizer *t, int32_t id)
{
    if (!t || id < 0 || id >= t->n_tokens)
        return -1;
    return t->types[id];
}

int32_t pikv_tokenizer_bos(const pikv_tokenizer *t)
{
    return t ? t->bos : -1;
}

int32_t pikv_tokenizer_eos(const pikv_tokenizer *t)
{
    return t ? t->eos : -1;
}

const char *pikv_tokenizer_status_str(pikv_tok_status s)
{
    switch (s) {
    case PIKV_TOK_OK: return "ok";
    case PIKV_TOK_EINVAL: return "invalid argument";
    case PIKV_TOK_ENOMEM: return "out of memory";
    case PIKV_TOK_EVOCAB: return "inconsistent vocabulary or merges";
    case PIKV_TOK_ESPACE: return "output buffer too small";
    case PIKV_TOK_ERANGE: return "token id out of range";
    case PIKV_TOK_ENOSYM: return "a byte of the text has no symbol in the vocabulary";
    }
    return "unknown status";
}
