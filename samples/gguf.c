/*
 * gguf.c — GGUF v3 reader, dequantization and matrix-vector products (see gguf.h).
 *
 * Parsing reads little-endian fields byte by byte through a bounds-checked cursor. Every count
 * is compared with the bytes left before anything is allocated, so a parse allocates at most a
 * small multiple of the input size. docs/model.md lists every check.
 */
#if !defined(_POSIX_C_SOURCE) || _POSIX_C_SOURCE < 200809L
#undef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif

#include "gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define GGUF_MAX_KEY 65535u   /* longest metadata key (bytes) */
#define GGUF_MAX_NAME 256u    /* longest tensor name (bytes) */

struct gguf_file {
    const uint8_t *base;
    uint64_t size;
    void *map;        /* mmap'ed region (gguf_open) or NULL */
    size_t map_size;
    uint32_t version;
    uint64_t alignment;
    uint64_t data_offset;
    uint64_t n_kv;
    gguf_kv *kv;
    uint64_t n_tensors;
    gguf_tensor *tensors;
    uint32_t *kv_hash;   /* open addressing: index + 1, 0 = empty */
    uint64_t kv_hash_cap;
    uint32_t *t_hash;
    uint64_t t_hash_cap;
    size_t alloc_bytes;
};

/* ------------------------------------------------------------------------ */
/* Types                                                                     */
/* ------------------------------------------------------------------------ */

typedef struct type_info {
    const char *name;
    uint32_t blk;   /* elements per block */
    uint32_t bytes; /* bytes per block */
} type_info;

static const type_info TYPES[31] = {
    [GGUF_T_F32] = {"F32", 1, 4},        [GGUF_T_F16] = {"F16", 1, 2},
    [GGUF_T_Q4_0] = {"Q4_0", 32, 18},    [GGUF_T_Q4_1] = {"Q4_1", 32, 20},
    [GGUF_T_Q5_0] = {"Q5_0", 32, 22},    [GGUF_T_Q5_1] = {"Q5_1", 32, 24},
    [GGUF_T_Q8_0] = {"Q8_0", 32, 34},    [GGUF_T_Q8_1] = {"Q8_1", 32, 36},
    [GGUF_T_Q2_K] = {"Q2_K", 256, 84},   [GGUF_T_Q3_K] = {"Q3_K", 256, 110},
    [GGUF_T_Q4_K] = {"Q4_K", 256, 144},  [GGUF_T_Q5_K] = {"Q5_K", 256, 176},
    [GGUF_T_Q6_K] = {"Q6_K", 256, 210},  [GGUF_T_Q8_K] = {"Q8_K", 256, 292},
    [GGUF_T_I8] = {"I8", 1, 1},          [GGUF_T_I16] = {"I16", 1, 2},
    [GGUF_T_I32] = {"I32", 1, 4},        [GGUF_T_I64] = {"I64", 1, 8},
    [GGUF_T_F64] = {"F64", 1, 8},        [GGUF_T_BF16] = {"BF16", 1, 2},
};

static const type_info *type_get(uint32_t t)
{
    if (t >= sizeof TYPES / sizeof TYPES[0] || !TYPES[t].name)
        return NULL;
    return &TYPES[t];
}

const char *gguf_type_name(gguf_ttype t)
{
    const type_info *ti = type_get((uint32_t)t);
    return ti ? ti->name : "unknown";
}
uint32_t gguf_type_block_elems(gguf_ttype t)
{
    const type_info *ti = type_get((uint32_t)t);
    return ti ? ti->blk : 0;
}
uint32_t gguf_type_block_bytes(gguf_ttype t)
{
    const type_info *ti = type_get((uint32_t)t);
    return ti ? ti->bytes : 0;
}
int gguf_type_can_dequantize(gguf_ttype t)
{
    return t == GGUF_T_F32 || t == GGUF_T_F16 || t == GGUF_T_Q4_0 || t == GGUF_T_Q4_1 ||
           t == GGUF_T_Q8_0;
}

static const char *const VT_NAMES[GGUF_VT_COUNT] = {"u8",  "i8",     "u16",   "i16", "u32",
                                                    "i32", "f32",    "bool",  "string", "array",
                                                    "u64", "i64",    "f64"};
static const uint8_t VT_SIZE[GGUF_VT_COUNT] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};

const char *gguf_vtype_name(gguf_vtype t)
{
    return (unsigned)t < GGUF_VT_COUNT ? VT_NAMES[t] : "unknown";
}

const char *gguf_status_name(gguf_status s)
{
    switch (s) {
    case GGUF_OK: return "ok";
    case GGUF_ERR_IO: return "I/O error";
    case GGUF_ERR_FORMAT: return "malformed file";
    case GGUF_ERR_NOMEM: return "out of memory";
    case GGUF_ERR_NOT_FOUND: return "not found";
    case GGUF_ERR_TYPE: return "wrong type";
    case GGUF_ERR_UNSUPPORTED: return "unsupported type";
    case GGUF_ERR_ARG: return "invalid argument";
    }
    return "unknown status";
}

/* ------------------------------------------------------------------------ */
/* Little-endian loads                                                       */
/* ------------------------------------------------------------------------ */

static uint16_t ld16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static uint32_t ld32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static uint64_t ld64(const uint8_t *p) { return (uint64_t)ld32(p) | ((uint64_t)ld32(p + 4) << 32); }

float gguf_f16_to_f32(uint16_t h)
{
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13); /* inf / nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalize */
        exp = 113;
        while (!(man & 0x400u)) {
            man <<= 1;
            exp--;
        }
        man &= 0x3ffu;
        bits = sign | (exp << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* ------------------------------------------------------------------------ */
/* Parse cursor and errors                                                   */
/* ------------------------------------------------------------------------ */

typedef struct rd {
    const uint8_t *p;
    uint64_t size;
    uint64_t pos;
    gguf_error *err;
    gguf_file *g;
} rd;

static gguf_status fail_at(rd *r, uint64_t offset, const char *fmt, ...)
{
    if (r->err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(r->err->message, sizeof r->err->message, fmt, ap);
        va_end(ap);
        r->err->offset = offset;
    }
    return GGUF_ERR_FORMAT;
}

/* A printable copy of (at most 64 bytes of) a name, for messages. */
static const char *printable(gguf_string s, char buf[80])
{
    size_t n = s.len < 64 ? (size_t)s.len : 64, o = 0;
    for (size_t i = 0; i < n; i++) {
        const unsigned char c = (unsigned char)s.ptr[i];
        buf[o++] = (c >= 0x20 && c < 0x7f && c != '\'') ? (char)c : '?';
    }
    if (s.len > 64) {
        memcpy(buf + o, "...", 3);
        o += 3;
    }
    buf[o] = 0;
    return buf;
}

static uint64_t left(const rd *r) { return r->size - r->pos; }

static gguf_status need(rd *r, uint64_t n, const char *what)
{
    if (n > left(r))
        return fail_at(r, r->pos, "%s: needs %llu bytes at offset %llu, only %llu left in the file (%llu)",
                       what, (unsigned long long)n, (unsigned long long)r->pos,
                       (unsigned long long)left(r), (unsigned long long)r->size);
    return GGUF_OK;
}

static gguf_status rd_u32(rd *r, uint32_t *v, const char *what)
{
    gguf_status s = need(r, 4, what);
    if (s)
        return s;
    *v = ld32(r->p + r->pos);
    r->pos += 4;
    return GGUF_OK;
}

static gguf_status rd_u64(rd *r, uint64_t *v, const char *what)
{
    gguf_status s = need(r, 8, what);
    if (s)
        return s;
    *v = ld64(r->p + r->pos);
    r->pos += 8;
    return GGUF_OK;
}

static gguf_status rd_str(rd *r, gguf_string *out, uint64_t max_len, const char *what)
{
    const uint64_t at = r->pos;
    uint64_t len;
    gguf_status s = rd_u64(r, &len, what);
    if (s)
        return s;
    if (len > max_len)
        return fail_at(r, at, "%s: string length %llu at offset %llu exceeds the limit %llu", what,
                       (unsigned long long)len, (unsigned long long)at, (unsigned long long)max_len);
    if (len > left(r))
        return fail_at(r, at, "%s: string length %llu at offset %llu runs past the end of the file (%llu)",
                       what, (unsigned long long)len, (unsigned long long)at,
                       (unsigned long long)r->size);
    out->ptr = (const char *)(r->p + r->pos);
    out->len = len;
    r->pos += len;
    return GGUF_OK;
}

static void *g_alloc(gguf_file *g, size_t n)
{
    void *p = calloc(1, n ? n : 1);
    if (p)
        g->alloc_bytes += n;
    return p;
}

/* ------------------------------------------------------------------------ */
/* Metadata values                                                           */
/* ------------------------------------------------------------------------ */

/* Skips (validating) one value of type t. */
static gguf_status skip_value(rd *r, uint32_t t, int depth, const char *what);

static gguf_status skip_array(rd *r, int depth, uint32_t *elem_type, uint64_t *count,
                              const char *what)
{
    const uint64_t at = r->pos;
    gguf_status s;
    if (depth >= GGUF_MAX_ARRAY_DEPTH)
        return fail_at(r, at, "%s: arrays nested deeper than %d at offset %llu", what,
                       GGUF_MAX_ARRAY_DEPTH, (unsigned long long)at);
    if ((s = rd_u32(r, elem_type, what)) != GGUF_OK)
        return s;
    if (*elem_type >= GGUF_VT_COUNT)
        return fail_at(r, at, "%s: unknown array element type %u at offset %llu", what, *elem_type,
                       (unsigned long long)at);
    const uint64_t at_count = r->pos;
    if ((s = rd_u64(r, count, what)) != GGUF_OK)
        return s;
    /* the smallest encoding of one element: fixed size, 8 (string length), 12 (empty array) */
    const uint64_t min_elem = VT_SIZE[*elem_type] ? VT_SIZE[*elem_type]
                              : *elem_type == GGUF_VT_STRING ? 8 : 12;
    if (*count > left(r) / min_elem)
        return fail_at(r, at_count,
                       "%s: array count %llu at offset %llu needs at least %llu bytes per %s element, "
                       "only %llu bytes left in the file (%llu)",
                       what, (unsigned long long)*count, (unsigned long long)at_count,
                       (unsigned long long)min_elem, VT_NAMES[*elem_type],
                       (unsigned long long)left(r), (unsigned long long)r->size);
    if (VT_SIZE[*elem_type] && *elem_type != GGUF_VT_BOOL) {
        r->pos += *count * min_elem;
        return GGUF_OK;
    }
    for (uint64_t i = 0; i < *count; i++)
        if ((s = skip_value(r, *elem_type, depth + 1, what)) != GGUF_OK)
            return s;
    return GGUF_OK;
}

static gguf_status skip_value(rd *r, uint32_t t, int depth, const char *what)
{
    gguf_status s;
    if (t == GGUF_VT_STRING) {
        gguf_string str;
        return rd_str(r, &str, GGUF_MAX_STRING, what);
    }
    if (t == GGUF_VT_ARRAY) {
        uint32_t et;
        uint64_t n;
        return skip_array(r, depth, &et, &n, what);
    }
    if ((s = need(r, VT_SIZE[t], what)) != GGUF_OK)
        return s;
    if (t == GGUF_VT_BOOL && r->p[r->pos] > 1)
        return fail_at(r, r->pos, "%s: bool value %u at offset %llu is not 0 or 1", what,
                       r->p[r->pos], (unsigned long long)r->pos);
    r->pos += VT_SIZE[t];
    return GGUF_OK;
}

/* ------------------------------------------------------------------------ */
/* Hash tables of keys and tensor names                                      */
/* ------------------------------------------------------------------------ */

static uint64_t hash_bytes(const char *p, uint64_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (uint64_t i = 0; i < n; i++)
        h = (h ^ (unsigned char)p[i]) * 1099511628211ull;
    return h;
}

static uint64_t hash_cap(uint64_t n)
{
    uint64_t cap = 16;
    while (cap < 2 * n)
        cap <<= 1;
    return cap;
}

/* Inserts entry idx with name s; returns the index of an existing entry with that name + 1, 0
 * when inserted. */
static uint64_t hash_insert(uint32_t *tab, uint64_t cap, gguf_string s, uint32_t idx,
                            const gguf_string *(*name_of)(const gguf_file *, uint32_t),
                            const gguf_file *g)
{
    uint64_t h = hash_bytes(s.ptr, s.len) & (cap - 1);
    while (tab[h]) {
        const gguf_string *o = name_of(g, tab[h] - 1);
        if (o->len == s.len && memcmp(o->ptr, s.ptr, s.len) == 0)
            return tab[h];
        h = (h + 1) & (cap - 1);
    }
    tab[h] = idx + 1;
    return 0;
}

static const gguf_string *kv_name(const gguf_file *g, uint32_t i) { return &g->kv[i].key; }
static const gguf_string *t_name(const gguf_file *g, uint32_t i) { return &g->tensors[i].name; }

static int64_t hash_find(const uint32_t *tab, uint64_t cap, const char *key,
                         const gguf_string *(*name_of)(const gguf_file *, uint32_t),
                         const gguf_file *g)
{
    if (!tab || !key)
        return -1;
    const uint64_t n = strlen(key);
    uint64_t h = hash_bytes(key, n) & (cap - 1);
    while (tab[h]) {
        const gguf_string *o = name_of(g, tab[h] - 1);
        if (o->len == n && memcmp(o->ptr, key, n) == 0)
            return (int64_t)tab[h] - 1;
        h = (h + 1) & (cap - 1);
    }
    return -1;
}

/* ------------------------------------------------------------------------ */
/* Parse                                                                     */
/* ------------------------------------------------------------------------ */

static gguf_status parse_kvs(rd *r)
{
    gguf_file *g = r->g;
    gguf_status s;
    char nb[80], what[128];
    for (uint64_t i = 0; i < g->n_kv; i++) {
        gguf_kv *kv = &g->kv[i];
        const uint64_t at = r->pos;
        snprintf(what, sizeof what, "KV %llu key", (unsigned long long)i);
        if ((s = rd_str(r, &kv->key, GGUF_MAX_KEY, what)) != GGUF_OK)
            return s;
        if (kv->key.len == 0)
            return fail_at(r, at, "KV %llu: empty key at offset %llu", (unsigned long long)i,
                           (unsigned long long)at);
        snprintf(what, sizeof what, "KV %llu '%s'", (unsigned long long)i, printable(kv->key, nb));
        const uint64_t at_type = r->pos;
        uint32_t t;
        if ((s = rd_u32(r, &t, what)) != GGUF_OK)
            return s;
        if (t >= GGUF_VT_COUNT)
            return fail_at(r, at_type, "%s: unknown value type %u at offset %llu", what, t,
                           (unsigned long long)at_type);
        kv->type = (gguf_vtype)t;
        kv->arr_type = (gguf_vtype)t;
        kv->count = 1;
        kv->offset = r->pos;
        kv->data = r->p + r->pos;
        if (t == GGUF_VT_ARRAY) {
            uint32_t et;
            uint64_t n;
            if ((s = skip_array(r, 0, &et, &n, what)) != GGUF_OK)
                return s;
            kv->arr_type = (gguf_vtype)et;
            kv->count = n;
            kv->offset += 12;
            kv->data += 12;
            if (et == GGUF_VT_STRING && n > 0) {
                /* n <= (bytes of the array) / 8, so this is bounded by the file size */
                kv->str_offsets = (uint64_t *)g_alloc(g, (size_t)n * sizeof(uint64_t));
                if (!kv->str_offsets)
                    return GGUF_ERR_NOMEM;
                uint64_t o = 0;
                for (uint64_t j = 0; j < n; j++) {
                    kv->str_offsets[j] = o;
                    o += 8 + ld64(kv->data + o);
                }
            }
        } else if ((s = skip_value(r, t, 0, what)) != GGUF_OK) {
            return s;
        }
        if (hash_insert(g->kv_hash, g->kv_hash_cap, kv->key, (uint32_t)i, kv_name, g))
            return fail_at(r, at, "%s: duplicate key at offset %llu", what, (unsigned long long)at);
    }
    return GGUF_OK;
}

static int cmp_offset(const void *a, const void *b, const gguf_file *g)
{
    const uint64_t x = g->tensors[*(const uint32_t *)a].offset;
    const uint64_t y = g->tensors[*(const uint32_t *)b].offset;
    return x < y ? -1 : x > y;
}

/* qsort has no context argument in C11: a small heap sort instead. */
static void sort_by_offset(uint32_t *idx, uint64_t n, const gguf_file *g)
{
    for (uint64_t k = n / 2; k-- > 0;) {
        uint64_t i = k;
        for (;;) {
            uint64_t c = 2 * i + 1;
            if (c >= n)
                break;
            if (c + 1 < n && cmp_offset(&idx[c + 1], &idx[c], g) > 0)
                c++;
            if (cmp_offset(&idx[c], &idx[i], g) <= 0)
                break;
            uint32_t t = idx[i]; idx[i] = idx[c]; idx[c] = t;
            i = c;
        }
    }
    for (uint64_t end = n; end-- > 1;) {
        uint32_t t = idx[0]; idx[0] = idx[end]; idx[end] = t;
        uint64_t i = 0;
        for (;;) {
            uint64_t c = 2 * i + 1;
            if (c >= end)
                break;
            if (c + 1 < end && cmp_offset(&idx[c + 1], &idx[c], g) > 0)
                c++;
            if (cmp_offset(&idx[c], &idx[i], g) <= 0)
                break;
            t = idx[i]; idx[i] = idx[c]; idx[c] = t;
            i = c;
        }
    }
}

static gguf_status parse_tensors(rd *r)
{
    gguf_file *g = r->g;
    gguf_status s;
    char nb[80], what[160];
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        gguf_tensor *t = &g->tensors[i];
        const uint64_t at = r->pos;
        snprintf(what, sizeof what, "tensor %llu name", (unsigned long long)i);
        if ((s = rd_str(r, &t->name, GGUF_MAX_NAME, what)) != GGUF_OK)
            return s;
        if (t->name.len == 0)
            return fail_at(r, at, "tensor %llu: empty name at offset %llu", (unsigned long long)i,
                           (unsigned long long)at);
        snprintf(what, sizeof what, "tensor %llu '%s'", (unsigned long long)i, printable(t->name, nb));
        const uint64_t at_nd = r->pos;
        if ((s = rd_u32(r, &t->n_dims, what)) != GGUF_OK)
            return s;
        if (t->n_dims < 1 || t->n_dims > GGUF_MAX_DIMS)
            return fail_at(r, at_nd, "%s: n_dims %u at offset %llu is not in 1..%d", what, t->n_dims,
                           (unsigned long long)at_nd, GGUF_MAX_DIMS);
        uint64_t nel = 1;
        for (int d = 0; d < GGUF_MAX_DIMS; d++)
            t->ne[d] = 1;
        for (uint32_t d = 0; d < t->n_dims; d++) {
            const uint64_t at_d = r->pos;
            uint64_t v;
            if ((s = rd_u64(r, &v, what)) != GGUF_OK)
                return s;
            if (v == 0 || v > (uint64_t)INT64_MAX || nel > (uint64_t)INT64_MAX / v)
                return fail_at(r, at_d,
                               "%s: dimension %u = %llu at offset %llu is 0 or makes the element count "
                               "overflow (> 2^63 - 1)",
                               what, d, (unsigned long long)v, (unsigned long long)at_d);
            t->ne[d] = (int64_t)v;
            nel *= v;
        }
        t->n_elements = nel;
        const uint64_t at_ty = r->pos;
        uint32_t ty;
        if ((s = rd_u32(r, &ty, what)) != GGUF_OK)
            return s;
        const type_info *ti = type_get(ty);
        if (!ti)
            return fail_at(r, at_ty, "%s: unknown ggml type %u at offset %llu", what, ty,
                           (unsigned long long)at_ty);
        t->type = (gguf_ttype)ty;
        if ((uint64_t)t->ne[0] % ti->blk)
            return fail_at(r, at_ty, "%s: row length ne[0] = %lld is not a multiple of the %s block size %u",
                           what, (long long)t->ne[0], ti->name, ti->blk);
        const uint64_t blocks = nel / ti->blk;
        if (blocks > UINT64_MAX / 2 / ti->bytes)
            return fail_at(r, at_ty, "%s: %llu %s blocks overflow the byte size", what,
                           (unsigned long long)blocks, ti->name);
        t->n_bytes = blocks * ti->bytes;
        const uint64_t at_off = r->pos;
        if ((s = rd_u64(r, &t->offset, what)) != GGUF_OK)
            return s;
        if (t->offset % g->alignment)
            return fail_at(r, at_off, "%s: data offset %llu at offset %llu is not a multiple of the alignment %llu",
                           what, (unsigned long long)t->offset, (unsigned long long)at_off,
                           (unsigned long long)g->alignment);
        if (t->n_bytes > r->size)
            return fail_at(r, at_ty, "%s: %llu bytes of data (%s %lld x %lld x %lld x %lld) exceed the file size (%llu)",
                           what, (unsigned long long)t->n_bytes, ti->name, (long long)t->ne[0],
                           (long long)t->ne[1], (long long)t->ne[2], (long long)t->ne[3],
                           (unsigned long long)r->size);
        if (hash_insert(g->t_hash, g->t_hash_cap, t->name, (uint32_t)i, t_name, g))
            return fail_at(r, at, "%s: duplicate tensor name at offset %llu", what, (unsigned long long)at);
    }
    return GGUF_OK;
}

static gguf_status parse(gguf_file *g, gguf_error *err)
{
    rd r = {g->base, g->size, 0, err, g};
    gguf_status s;
    if (g->size < 4 || memcmp(g->base, "GGUF", 4) != 0) {
        char m[9] = {0};
        for (uint64_t i = 0; i < 4 && i < g->size; i++) {
            const unsigned char c = g->base[i];
            m[i] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
        }
        return fail_at(&r, 0, "bad magic '%s' at offset 0 (expected 'GGUF'; file size %llu)", m,
                       (unsigned long long)g->size);
    }
    r.pos = 4;
    if ((s = rd_u32(&r, &g->version, "version")) != GGUF_OK)
        return s;
    if (g->version != 3 && g->version != 2)
        return fail_at(&r, 4, "unsupported GGUF version %u at offset 4 (this reader reads 2 and 3)",
                       g->version);
    if ((s = rd_u64(&r, &g->n_tensors, "tensor_count")) != GGUF_OK)
        return s;
    if ((s = rd_u64(&r, &g->n_kv, "kv_count")) != GGUF_OK)
        return s;
    /* bounds before allocating: a KV takes >= 8 (key length) + 1 (key) + 4 (type) + 1 bytes,
     * a tensor info >= 8 + 1 (name) + 4 (n_dims) + 8 (one dim) + 4 (type) + 8 (offset) */
    if (g->n_kv > left(&r) / 14 || g->n_kv >= UINT32_MAX)
        return fail_at(&r, 16, "kv_count %llu at offset 16 is impossible: %llu bytes left in the file (%llu) "
                       "hold at most %llu KVs", (unsigned long long)g->n_kv,
                       (unsigned long long)left(&r), (unsigned long long)g->size,
                       (unsigned long long)(left(&r) / 14));
    if (g->n_tensors > left(&r) / 33 || g->n_tensors >= UINT32_MAX)
        return fail_at(&r, 8, "tensor_count %llu at offset 8 is impossible: %llu bytes left in the file (%llu) "
                       "hold at most %llu tensor infos", (unsigned long long)g->n_tensors,
                       (unsigned long long)left(&r), (unsigned long long)g->size,
                       (unsigned long long)(left(&r) / 33));
    g->kv = (gguf_kv *)g_alloc(g, (size_t)g->n_kv * sizeof(gguf_kv));
    g->kv_hash_cap = hash_cap(g->n_kv);
    g->kv_hash = (uint32_t *)g_alloc(g, (size_t)g->kv_hash_cap * sizeof(uint32_t));
    g->tensors = (gguf_tensor *)g_alloc(g, (size_t)g->n_tensors * sizeof(gguf_tensor));
    g->t_hash_cap = hash_cap(g->n_tensors);
    g->t_hash = (uint32_t *)g_alloc(g, (size_t)g->t_hash_cap * sizeof(uint32_t));
    if (!g->kv || !g->kv_hash || !g->tensors || !g->t_hash)
        return GGUF_ERR_NOMEM;
    if ((s = parse_kvs(&r)) != GGUF_OK)
        return s;

    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    const int64_t ia = hash_find(g->kv_hash, g->kv_hash_cap, "general.alignment", kv_name, g);
    if (ia >= 0) {
        const gguf_kv *kv = &g->kv[ia];
        if (kv->type != GGUF_VT_U32)
            return fail_at(&r, kv->offset - 4, "general.alignment has type %s at offset %llu (must be u32)",
                           gguf_vtype_name(kv->type), (unsigned long long)(kv->offset - 4));
        const uint32_t a = ld32(kv->data);
        if (a == 0 || (a & (a - 1)) || a > (1u << 24))
            return fail_at(&r, kv->offset, "general.alignment = %u at offset %llu is not a power of two in 1..2^24",
                           a, (unsigned long long)kv->offset);
        g->alignment = a;
    }
    if ((s = parse_tensors(&r)) != GGUF_OK)
        return s;

    const uint64_t pad = (g->alignment - r.pos % g->alignment) % g->alignment;
    if (g->n_tensors > 0 && pad > left(&r))
        return fail_at(&r, r.pos, "data section: start %llu aligned to %llu runs past the end of the file (%llu)",
                       (unsigned long long)r.pos, (unsigned long long)g->alignment,
                       (unsigned long long)g->size);
    g->data_offset = pad > left(&r) ? r.size : r.pos + pad;
    const uint64_t data_size = g->size - g->data_offset;
    char nb[80];
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        gguf_tensor *t = &g->tensors[i];
        if (t->offset > data_size || t->n_bytes > data_size - t->offset)
            return fail_at(&r, g->data_offset,
                           "tensor %llu '%s': offset %llu + %llu bytes runs past the end of the file (%llu; "
                           "data section starts at %llu)",
                           (unsigned long long)i, printable(t->name, nb), (unsigned long long)t->offset,
                           (unsigned long long)t->n_bytes, (unsigned long long)g->size,
                           (unsigned long long)g->data_offset);
        t->data = g->base + g->data_offset + t->offset;
    }
    if (g->n_tensors > 1) {
        uint32_t *idx = (uint32_t *)malloc((size_t)g->n_tensors * sizeof(uint32_t));
        if (!idx)
            return GGUF_ERR_NOMEM;
        g->alloc_bytes += (size_t)g->n_tensors * sizeof(uint32_t); /* counted, though freed below */
        for (uint64_t i = 0; i < g->n_tensors; i++)
            idx[i] = (uint32_t)i;
        sort_by_offset(idx, g->n_tensors, g);
        for (uint64_t k = 0; k + 1 < g->n_tensors; k++) {
            const gguf_tensor *a = &g->tensors[idx[k]], *b = &g->tensors[idx[k + 1]];
            if (a->offset + a->n_bytes > b->offset) {
                char nb2[80];
                s = fail_at(&r, g->data_offset,
                            "tensor %u '%s' (offset %llu, %llu bytes) overlaps tensor %u '%s' (offset %llu)",
                            idx[k], printable(a->name, nb), (unsigned long long)a->offset,
                            (unsigned long long)a->n_bytes, idx[k + 1], printable(b->name, nb2),
                            (unsigned long long)b->offset);
                free(idx);
                return s;
            }
        }
        free(idx);
    }
    return GGUF_OK;
}

static gguf_status open_common(gguf_file *g, gguf_file **out, gguf_error *err)
{
    gguf_status s = parse(g, err);
    if (s == GGUF_ERR_NOMEM && err) {
        snprintf(err->message, sizeof err->message, "out of memory reading the GGUF tables");
        err->offset = 0;
    }
    if (err)
        err->alloc_bytes = g->alloc_bytes;
    if (s != GGUF_OK) {
        gguf_close(g);
        return s;
    }
    if (err) {
        err->message[0] = 0;
        err->offset = 0;
    }
    *out = g;
    return GGUF_OK;
}

gguf_status gguf_open_memory(const void *data, size_t size, gguf_file **out, gguf_error *err)
{
    if (err)
        memset(err, 0, sizeof *err);
    if (!out || (!data && size)) {
        if (err)
            snprintf(err->message, sizeof err->message, "gguf_open_memory: NULL argument");
        return GGUF_ERR_ARG;
    }
    *out = NULL;
    gguf_file *g = (gguf_file *)calloc(1, sizeof *g);
    if (!g)
        return GGUF_ERR_NOMEM;
    static const uint8_t empty[1] = {0};
    g->base = data ? (const uint8_t *)data : empty;
    g->size = size;
    return open_common(g, out, err);
}

gguf_status gguf_open(const char *path, gguf_file **out, gguf_error *err)
{
    if (err)
        memset(err, 0, sizeof *err);
    if (!out || !path) {
        if (err)
            snprintf(err->message, sizeof err->message, "gguf_open: NULL argument");
        return GGUF_ERR_ARG;
    }
    *out = NULL;
    const int fd = open(path, O_RDONLY);
    if (fd < 0) {
        if (err)
            snprintf(err->message, sizeof err->message, "cannot open '%s': %s", path, strerror(errno));
        return GGUF_ERR_IO;
    }
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_size <= 0) {
        if (err)
            snprintf(err->message, sizeof err->message, "'%s' is not a non-empty regular file", path);
        close(fd);
        return GGUF_ERR_IO;
    }
    void *map = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (map == MAP_FAILED) {
        if (err)
            snprintf(err->message, sizeof err->message, "cannot map '%s' (%lld bytes): %s", path,
                     (long long)st.st_size, strerror(errno));
        return GGUF_ERR_IO;
    }
    gguf_file *g = (gguf_file *)calloc(1, sizeof *g);
    if (!g) {
        munmap(map, (size_t)st.st_size);
        return GGUF_ERR_NOMEM;
    }
    g->map = map;
    g->map_size = (size_t)st.st_size;
    g->base = (const uint8_t *)map;
    g->size = (uint64_t)st.st_size;
    return open_common(g, out, err);
}

void gguf_close(gguf_file *g)
{
    if (!g)
        return;
    if (g->kv)
        for (uint64_t i = 0; i < g->n_kv; i++)
            free(g->kv[i].str_offsets);
    free(g->kv);
    free(g->kv_hash);
    free(g->tensors);
    free(g->t_hash);
    if (g->map)
        munmap(g->map, g->map_size);
    free(g);
}

/* ------------------------------------------------------------------------ */
/* Getters                                                                   */
/* ------------------------------------------------------------------------ */

uint32_t gguf_version(const gguf_file *g) { return g->version; }
uint64_t gguf_alignment(const gguf_file *g) { return g->alignment; }
uint64_t gguf_data_offset(const gguf_file *g) { return g->data_offset; }
uint64_t gguf_file_size(const gguf_file *g) { return g->size; }
size_t gguf_alloc_bytes(const gguf_file *g) { return g->alloc_bytes; }
uint64_t gguf_kv_count(const gguf_file *g) { return g->n_kv; }
uint64_t gguf_tensor_count(const gguf_file *g) { return g->n_tensors; }

const gguf_kv *gguf_kv_at(const gguf_file *g, uint64_t i) { return i < g->n_kv ? &g->kv[i] : NULL; }
const gguf_tensor *gguf_tensor_at(const gguf_file *g, uint64_t i)
{
    return i < g->n_tensors ? &g->tensors[i] : NULL;
}

const gguf_kv *gguf_find_kv(const gguf_file *g, const char *key)
{
    const int64_t i = hash_find(g->kv_hash, g->kv_hash_cap, key, kv_name, g);
    return i >= 0 ? &g->kv[i] : NULL;
}

const gguf_tensor *gguf_find_tensor(const gguf_file *g, const char *name)
{
    const int64_t i = hash_find(g->t_hash, g->t_hash_cap, name, t_name, g);
    return i >= 0 ? &g->tensors[i] : NULL;
}

int gguf_str_eq(gguf_string s, const char *c)
{
    return c && strlen(c) == s.len && memcmp(s.ptr, c, s.len) == 0;
}

/* One scalar element of type t at p, as integer (is_int = 1) or float. */
static int load_scalar(gguf_vtype t, const uint8_t *p, int64_t *iv, uint64_t *uv, double *fv,
                       int *is_unsigned_big)
{
    *is_unsigned_big = 0;
    switch (t) {
    case GGUF_VT_U8: *iv = p[0]; break;
    case GGUF_VT_I8: *iv = (int8_t)p[0]; break;
    case GGUF_VT_BOOL: *iv = p[0]; break;
    case GGUF_VT_U16: *iv = ld16(p); break;
    case GGUF_VT_I16: *iv = (int16_t)ld16(p); break;
    case GGUF_VT_U32: *iv = ld32(p); break;
    case GGUF_VT_I32: *iv = (int32_t)ld32(p); break;
    case GGUF_VT_U64:
        *uv = ld64(p);
        *iv = (int64_t)(*uv & 0x7fffffffffffffffull);
        *is_unsigned_big = *uv > (uint64_t)INT64_MAX;
        break;
    case GGUF_VT_I64: *iv = (int64_t)ld64(p); break;
    case GGUF_VT_F32: {
        uint32_t b = ld32(p);
        float f;
        memcpy(&f, &b, 4);
        *fv = f;
        return 2;
    }
    case GGUF_VT_F64: {
        uint64_t b = ld64(p);
        memcpy(fv, &b, 8);
        return 2;
    }
    default: return 0;
    }
    if (t != GGUF_VT_U64)
        *uv = (uint64_t)*iv;
    return 1;
}

gguf_status gguf_kv_i64(const gguf_kv *kv, int64_t *out)
{
    int64_t iv = 0;
    uint64_t uv = 0;
    double fv;
    int big;
    if (!kv || kv->type == GGUF_VT_ARRAY || load_scalar(kv->type, kv->data, &iv, &uv, &fv, &big) != 1 || big)
        return GGUF_ERR_TYPE;
    *out = iv;
    return GGUF_OK;
}

gguf_status gguf_kv_u64(const gguf_kv *kv, uint64_t *out)
{
    int64_t iv = 0;
    uint64_t uv = 0;
    double fv;
    int big;
    if (!kv || kv->type == GGUF_VT_ARRAY || load_scalar(kv->type, kv->data, &iv, &uv, &fv, &big) != 1 ||
        (!big && iv < 0))
        return GGUF_ERR_TYPE;
    *out = uv;
    return GGUF_OK;
}

gguf_status gguf_kv_f64(const gguf_kv *kv, double *out)
{
    int64_t iv = 0;
    uint64_t uv = 0;
    double fv = 0;
    int big;
    if (!kv || kv->type == GGUF_VT_ARRAY)
        return GGUF_ERR_TYPE;
    const int k = load_scalar(kv->type, kv->data, &iv, &uv, &fv, &big);
    if (k == 0)
        return GGUF_ERR_TYPE;
    *out = k == 2 ? fv : big ? (double)uv : (double)iv;
    return GGUF_OK;
}

static gguf_status find_typed(const gguf_file *g, const char *key, const gguf_kv **kv)
{
    if (!g || !key)
        return GGUF_ERR_ARG;
    *kv = gguf_find_kv(g, key);
    return *kv ? GGUF_OK : GGUF_ERR_NOT_FOUND;
}

gguf_status gguf_get_i64(const gguf_file *g, const char *key, int64_t *out)
{
    const gguf_kv *kv;
    gguf_status s = find_typed(g, key, &kv);
    if (s)
        return s;
    if (kv->type == GGUF_VT_F32 || kv->type == GGUF_VT_F64 || kv->type == GGUF_VT_BOOL)
        return GGUF_ERR_TYPE;
    return gguf_kv_i64(kv, out);
}

gguf_status gguf_get_u64(const gguf_file *g, const char *key, uint64_t *out)
{
    const gguf_kv *kv;
    gguf_status s = find_typed(g, key, &kv);
    if (s)
        return s;
    if (kv->type == GGUF_VT_F32 || kv->type == GGUF_VT_F64 || kv->type == GGUF_VT_BOOL)
        return GGUF_ERR_TYPE;
    return gguf_kv_u64(kv, out);
}

gguf_status gguf_get_u32(const gguf_file *g, const char *key, uint32_t *out)
{
    uint64_t v;
    gguf_status s = gguf_get_u64(g, key, &v);
    if (s)
        return s;
    if (v > UINT32_MAX)
        return GGUF_ERR_TYPE;
    *out = (uint32_t)v;
    return GGUF_OK;
}

gguf_status gguf_get_i32(const gguf_file *g, const char *key, int32_t *out)
{
    int64_t v;
    gguf_status s = gguf_get_i64(g, key, &v);
    if (s)
        return s;
    if (v < INT32_MIN || v > INT32_MAX)
        return GGUF_ERR_TYPE;
    *out = (int32_t)v;
    return GGUF_OK;
}

gguf_status gguf_get_f64(const gguf_file *g, const char *key, double *out)
{
    const gguf_kv *kv;
    gguf_status s = find_typed(g, key, &kv);
    if (s)
        return s;
    if (kv->type != GGUF_VT_F32 && kv->type != GGUF_VT_F64)
        return GGUF_ERR_TYPE;
    return gguf_kv_f64(kv, out);
}

gguf_status gguf_get_f32(const gguf_file *g, const char *key, float *out)
{
    double v;
    gguf_status s = gguf_get_f64(g, key, &v);
    if (s)
        return s;
    *out = (float)v;
    return GGUF_OK;
}

gguf_status gguf_get_bool(const gguf_file *g, const char *key, int *out)
{
    const gguf_kv *kv;
    gguf_status s = find_typed(g, key, &kv);
    if (s)
        return s;
    if (kv->type != GGUF_VT_BOOL)
        return GGUF_ERR_TYPE;
    *out = kv->data[0] != 0;
    return GGUF_OK;
}

gguf_status gguf_get_str(const gguf_file *g, const char *key, gguf_string *out)
{
    const gguf_kv *kv;
    gguf_status s = find_typed(g, key, &kv);
    if (s)
        return s;
    if (kv->type != GGUF_VT_STRING)
        return GGUF_ERR_TYPE;
    out->len = ld64(kv->data);
    out->ptr = (const char *)kv->data + 8;
    return GGUF_OK;
}

gguf_status gguf_get_arr(const gguf_file *g, const char *key, gguf_vtype *elem_type, uint64_t *count)
{
    const gguf_kv *kv;
    gguf_status s = find_typed(g, key, &kv);
    if (s)
        return s;
    if (kv->type != GGUF_VT_ARRAY)
        return GGUF_ERR_TYPE;
    if (elem_type)
        *elem_type = kv->arr_type;
    if (count)
        *count = kv->count;
    return GGUF_OK;
}

gguf_status gguf_kv_arr_str(const gguf_kv *kv, uint64_t i, gguf_string *out)
{
    if (!kv || !out)
        return GGUF_ERR_ARG;
    if (kv->type != GGUF_VT_ARRAY || kv->arr_type != GGUF_VT_STRING)
        return GGUF_ERR_TYPE;
    if (i >= kv->count)
        return GGUF_ERR_ARG;
    const uint8_t *p = kv->data + kv->str_offsets[i];
    out->len = ld64(p);
    out->ptr = (const char *)p + 8;
    return GGUF_OK;
}

static gguf_status arr_scalar(const gguf_kv *kv, uint64_t i, int64_t *iv, double *fv, int *k)
{
    if (!kv)
        return GGUF_ERR_ARG;
    if (kv->type != GGUF_VT_ARRAY || !VT_SIZE[kv->arr_type])
        return GGUF_ERR_TYPE;
    if (i >= kv->count)
        return GGUF_ERR_ARG;
    uint64_t uv;
    int big;
    *k = load_scalar(kv->arr_type, kv->data + i * VT_SIZE[kv->arr_type], iv, &uv, fv, &big);
    if (big)
        return GGUF_ERR_TYPE;
    return GGUF_OK;
}

gguf_status gguf_kv_arr_i64(const gguf_kv *kv, uint64_t i, int64_t *out)
{
    int64_t iv = 0;
    double fv = 0;
    int k = 0;
    gguf_status s = arr_scalar(kv, i, &iv, &fv, &k);
    if (s)
        return s;
    if (k != 1)
        return GGUF_ERR_TYPE;
    *out = iv;
    return GGUF_OK;
}

gguf_status gguf_kv_arr_f64(const gguf_kv *kv, uint64_t i, double *out)
{
    int64_t iv = 0;
    double fv = 0;
    int k = 0;
    gguf_status s = arr_scalar(kv, i, &iv, &fv, &k);
    if (s)
        return s;
    *out = k == 2 ? fv : (double)iv;
    return GGUF_OK;
}

/* ------------------------------------------------------------------------ */
/* Dequantization                                                            */
/* ------------------------------------------------------------------------ */

/* One block of 32 (quantized types) to dst. */
static void deq_q4_0(const uint8_t *b, float *dst)
{
    const float d = gguf_f16_to_f32(ld16(b));
    for (int j = 0; j < 16; j++) {
        dst[j] = (float)((int)(b[2 + j] & 0x0f) - 8) * d;
        dst[j + 16] = (float)((int)(b[2 + j] >> 4) - 8) * d;
    }
}

static void deq_q4_1(const uint8_t *b, float *dst)
{
    const float d = gguf_f16_to_f32(ld16(b));
    const float m = gguf_f16_to_f32(ld16(b + 2));
    for (int j = 0; j < 16; j++) {
        dst[j] = (float)(b[4 + j] & 0x0f) * d + m;
        dst[j + 16] = (float)(b[4 + j] >> 4) * d + m;
    }
}

static void deq_q8_0(const uint8_t *b, float *dst)
{
    const float d = gguf_f16_to_f32(ld16(b));
    for (int j = 0; j < 32; j++)
        dst[j] = (float)(int8_t)b[2 + j] * d;
}

gguf_status gguf_dequantize(gguf_ttype t, const void *src, float *dst, uint64_t n)
{
    if (!gguf_type_can_dequantize(t))
        return type_get((uint32_t)t) ? GGUF_ERR_UNSUPPORTED : GGUF_ERR_ARG;
    if ((!src || !dst) && n)
        return GGUF_ERR_ARG;
    const uint8_t *s = (const uint8_t *)src;
    switch (t) {
    case GGUF_T_F32:
        memcpy(dst, s, n * 4);
        return GGUF_OK;
    case GGUF_T_F16:
        for (uint64_t i = 0; i < n; i++)
            dst[i] = gguf_f16_to_f32(ld16(s + 2 * i));
        return GGUF_OK;
    default:
        break;
    }
    if (n % 32)
        return GGUF_ERR_ARG;
    const uint32_t bb = gguf_type_block_bytes(t);
    for (uint64_t k = 0; k < n / 32; k++) {
        const uint8_t *b = s + k * bb;
        if (t == GGUF_T_Q4_0)
            deq_q4_0(b, dst + 32 * k);
        else if (t == GGUF_T_Q4_1)
            deq_q4_1(b, dst + 32 * k);
        else
            deq_q8_0(b, dst + 32 * k);
    }
    return GGUF_OK;
}

static uint64_t n_rows_of(const gguf_tensor *t) { return t->n_elements / (uint64_t)t->ne[0]; }
static uint64_t row_bytes(const gguf_tensor *t)
{
    return (uint64_t)t->ne[0] / gguf_type_block_elems(t->type) * gguf_type_block_bytes(t->type);
}

gguf_status gguf_dequantize_rows(const gguf_tensor *t, uint64_t row0, uint64_t n_rows, float *dst)
{
    if (!t || (!dst && n_rows))
        return GGUF_ERR_ARG;
    if (!gguf_type_can_dequantize(t->type))
        return GGUF_ERR_UNSUPPORTED;
    const uint64_t rows = n_rows_of(t);
    if (row0 > rows || n_rows > rows - row0)
        return GGUF_ERR_ARG;
    return gguf_dequantize(t->type, t->data + row0 * row_bytes(t), dst, n_rows * (uint64_t)t->ne[0]);
}

/* ------------------------------------------------------------------------ */
/* Dot products and matvec                                                   */
/* ------------------------------------------------------------------------ */

/* Elements k .. k + m - 1 of a row (k a multiple of 32, m <= 32) to tmp, as gguf_dequantize does. */
static inline void deq_chunk(gguf_ttype type, const uint8_t *w, uint32_t bb, uint64_t k, uint64_t m,
                             float *tmp)
{
    switch (type) {
    case GGUF_T_Q4_0: deq_q4_0(w + k / 32 * bb, tmp); break;
    case GGUF_T_Q4_1: deq_q4_1(w + k / 32 * bb, tmp); break;
    case GGUF_T_Q8_0: deq_q8_0(w + k / 32 * bb, tmp); break;
    case GGUF_T_F16:
        for (uint64_t j = 0; j < m; j++)
            tmp[j] = gguf_f16_to_f32(ld16(w + 2 * (k + j)));
        break;
    default: memcpy(tmp, w + 4 * k, m * 4); break;
    }
}

/* acc[l] += tmp[j] * x[j] for j = l (mod 8), in element order. */
static inline void acc_chunk(float *acc, const float *tmp, const float *xk, uint64_t m)
{
    if (m == 32) {
        for (int j = 0; j < 32; j += 8)
            for (int l = 0; l < 8; l++)
                acc[l] += tmp[j + l] * xk[j + l];
    } else {
        for (uint64_t j = 0; j < m; j++)
            acc[j % 8] += tmp[j] * xk[j];
    }
}

static inline float acc_sum(const float *acc)
{
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

static float dot_row(gguf_ttype type, const uint8_t *w, const float *x, uint64_t n)
{
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    float tmp[32];
    const uint32_t bb = gguf_type_block_bytes(type);
    for (uint64_t k = 0; k < n; k += 32) {
        const uint64_t m = n - k < 32 ? n - k : 32;
        deq_chunk(type, w, bb, k, m, tmp);
        acc_chunk(acc, tmp, x + k, m);
    }
    return acc_sum(acc);
}

/* The products of one dequantized row w (n floats) with nv <= 4 vectors: dot_row's arithmetic
 * per vector (w[i] * x[i] added to lane i % 8 in element order, lanes summed by acc_sum), so
 * the results equal dot_row's bit for bit. The 8 lanes are one 8-float vector (GCC/Clang
 * vector extension); where the CPU has AVX2 the clone built for it runs (ifunc): the same
 * multiplies and adds in the same order (no FMA: this library is built with -ffp-contract=off). */
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define GGUF_NO_CLONES 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__)
#define GGUF_NO_CLONES 1
#endif
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(GGUF_NO_CLONES)
#define GGUF_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define GGUF_CLONES
#endif

#if defined(__GNUC__)
typedef float gguf_v8 __attribute__((vector_size(32)));
/* an unaligned load, without passing 32-byte vectors by value (an ABI that depends on -mavx) */
#define GGUF_LD_V8(dst, p) memcpy(&(dst), (p), sizeof(dst))
GGUF_CLONES
static void dot4_lanes(const float *w, const float *x, uint64_t n, uint64_t nv, float *out,
                       uint64_t out_stride)
{
    gguf_v8 v0 = {0}, v1 = {0}, v2 = {0}, v3 = {0};
    const float *x0 = x, *x1 = x + (nv > 1 ? n : 0), *x2 = x + (nv > 2 ? 2 * n : 0),
                *x3 = x + (nv > 3 ? 3 * n : 0);
    uint64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        gguf_v8 wv, y0, y1, y2, y3;
        GGUF_LD_V8(wv, w + i);
        GGUF_LD_V8(y0, x0 + i);
        GGUF_LD_V8(y1, x1 + i);
        GGUF_LD_V8(y2, x2 + i);
        GGUF_LD_V8(y3, x3 + i);
        v0 += wv * y0;
        v1 += wv * y1;
        v2 += wv * y2;
        v3 += wv * y3;
    }
    float a0[8], a1[8], a2[8], a3[8];
    memcpy(a0, &v0, sizeof a0);
    memcpy(a1, &v1, sizeof a1);
    memcpy(a2, &v2, sizeof a2);
    memcpy(a3, &v3, sizeof a3);
#else
static void dot4_lanes(const float *w, const float *x, uint64_t n, uint64_t nv, float *out,
                       uint64_t out_stride)
{
    float a0[8] = {0}, a1[8] = {0}, a2[8] = {0}, a3[8] = {0};
    const float *x0 = x, *x1 = x + (nv > 1 ? n : 0), *x2 = x + (nv > 2 ? 2 * n : 0),
                *x3 = x + (nv > 3 ? 3 * n : 0);
    uint64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) {
            a0[l] += w[i + l] * x0[i + l];
            a1[l] += w[i + l] * x1[i + l];
            a2[l] += w[i + l] * x2[i + l];
            a3[l] += w[i + l] * x3[i + l];
        }
#endif
    for (; i < n; i++) {
        a0[i % 8] += w[i] * x0[i];
        a1[i % 8] += w[i] * x1[i];
        a2[i % 8] += w[i] * x2[i];
        a3[i % 8] += w[i] * x3[i];
    }
    out[0] = acc_sum(a0);
    if (nv > 1) out[out_stride] = acc_sum(a1);
    if (nv > 2) out[2 * out_stride] = acc_sum(a2);
    if (nv > 3) out[3 * out_stride] = acc_sum(a3);
}

/* dot4_lanes for one vector (decode). */
#if defined(__GNUC__)
GGUF_CLONES
static float dot1_lanes(const float *w, const float *x, uint64_t n)
{
    gguf_v8 v0 = {0};
    uint64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        gguf_v8 wv, y0;
        GGUF_LD_V8(wv, w + i);
        GGUF_LD_V8(y0, x + i);
        v0 += wv * y0;
    }
    float a0[8];
    memcpy(a0, &v0, sizeof a0);
#else
static float dot1_lanes(const float *w, const float *x, uint64_t n)
{
    float a0[8] = {0};
    uint64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++)
            a0[l] += w[i + l] * x[i + l];
#endif
    for (; i < n; i++)
        a0[i % 8] += w[i] * x[i];
    return acc_sum(a0);
}

/* The whole row dequantized once (as gguf_dequantize does) into wbuf (n floats). */
static void deq_row(gguf_ttype type, const uint8_t *w, uint64_t n, float *wbuf)
{
    const uint32_t bb = gguf_type_block_bytes(type);
    for (uint64_t k = 0; k < n; k += 32)
        deq_chunk(type, w, bb, k, n - k < 32 ? n - k : 32, wbuf + k);
}

gguf_status gguf_row_dot(const gguf_tensor *w, uint64_t row, const float *x, float *out)
{
    if (!w || !x || !out)
        return GGUF_ERR_ARG;
    if (!gguf_type_can_dequantize(w->type))
        return GGUF_ERR_UNSUPPORTED;
    if (row >= n_rows_of(w))
        return GGUF_ERR_ARG;
    *out = dot_row(w->type, w->data + row * row_bytes(w), x, (uint64_t)w->ne[0]);
    return GGUF_OK;
}

typedef struct mv_job {
    const gguf_tensor *w;
    const float *x;
    float *y;
    uint64_t n_vec, rows, r0, r1;
} mv_job;

static void *mv_run(void *arg)
{
    const mv_job *j = (const mv_job *)arg;
    const uint64_t rb = row_bytes(j->w), n = (uint64_t)j->w->ne[0];
    /* each row dequantized once for all the vectors (rounded up to a block of 32, since
       deq_chunk writes whole blocks) */
    float *wbuf = malloc(((n + 31) / 32 * 32) * sizeof(float));
    if (wbuf && j->n_vec == 1) {
        for (uint64_t r = j->r0; r < j->r1; r++) {
            deq_row(j->w->type, j->w->data + r * rb, n, wbuf);
            j->y[r] = dot1_lanes(wbuf, j->x, n);
        }
        free(wbuf);
        return NULL;
    }
    if (!wbuf) {
        for (uint64_t r = j->r0; r < j->r1; r++)
            for (uint64_t v = 0; v < j->n_vec; v++)
                j->y[v * j->rows + r] = dot_row(j->w->type, j->w->data + r * rb, j->x + v * n, n);
        return NULL;
    }
    for (uint64_t r = j->r0; r < j->r1; r++) {
        deq_row(j->w->type, j->w->data + r * rb, n, wbuf);
        for (uint64_t v = 0; v < j->n_vec; v += 4) {
            const uint64_t nv = j->n_vec - v < 4 ? j->n_vec - v : 4;
            dot4_lanes(wbuf, j->x + v * n, n, nv, j->y + v * j->rows + r, j->rows);
        }
    }
    free(wbuf);
    return NULL;
}

#define GGUF_MAX_THREADS 256

gguf_status gguf_matmul(const gguf_tensor *w, const float *x, uint64_t n_vec, float *y, int n_threads)
{
    if (!w || !x || !y || n_threads < 1 || n_vec < 1)
        return GGUF_ERR_ARG;
    if (!gguf_type_can_dequantize(w->type))
        return GGUF_ERR_UNSUPPORTED;
    const uint64_t rows = n_rows_of(w);
    if (n_threads > GGUF_MAX_THREADS)
        n_threads = GGUF_MAX_THREADS;
    if ((uint64_t)n_threads > rows)
        n_threads = (int)rows;
    mv_job jobs[GGUF_MAX_THREADS];
    pthread_t tid[GGUF_MAX_THREADS];
    int started[GGUF_MAX_THREADS];
    for (int i = 0; i < n_threads; i++) {
        jobs[i] = (mv_job){w, x, y, n_vec, rows, rows * (uint64_t)i / (uint64_t)n_threads,
                           rows * (uint64_t)(i + 1) / (uint64_t)n_threads};
        started[i] = 0;
    }
    for (int i = 1; i < n_threads; i++)
        started[i] = pthread_create(&tid[i], NULL, mv_run, &jobs[i]) == 0;
    mv_run(&jobs[0]);
    for (int i = 1; i < n_threads; i++) {
        if (started[i])
            pthread_join(tid[i], NULL);
        else
            mv_run(&jobs[i]); /* thread creation failed: do its rows here */
    }
    return GGUF_OK;
}

gguf_status gguf_matvec(const gguf_tensor *w, const float *x, float *y, int n_threads)
{
    return gguf_matmul(w, x, 1, y, n_threads);
}

/* ------------------------------------------------------------------------ */
/* Persistent worker pool                                                    */
/* ------------------------------------------------------------------------ */

struct gguf_pool {
    int n_threads;       /* workers + the caller */
    pthread_t *tid;
    int n_started;       /* workers running */
    pthread_mutex_t mu;
    pthread_cond_t go;   /* a new job or shutdown */
    pthread_cond_t done; /* a worker finished its part */
    uint64_t generation; /* bumped per job */
    int pending;         /* workers still on the current job */
    int shutdown;
    mv_job jobs[GGUF_MAX_THREADS];
};

typedef struct pool_arg {
    gguf_pool *p;
    int index;
} pool_arg;

static void *pool_worker(void *arg)
{
    gguf_pool *p = ((pool_arg *)arg)->p;
    const int index = ((pool_arg *)arg)->index;
    free(arg);
    uint64_t seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (!p->shutdown && p->generation == seen)
            pthread_cond_wait(&p->go, &p->mu);
        if (p->shutdown)
            break;
        seen = p->generation;
        mv_job job = p->jobs[index];
        pthread_mutex_unlock(&p->mu);
        mv_run(&job);
        pthread_mutex_lock(&p->mu);
        if (--p->pending == 0)
            pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

gguf_status gguf_pool_create(int n_threads, gguf_pool **out)
{
    if (!out || n_threads < 1)
        return GGUF_ERR_ARG;
    *out = NULL;
    if (n_threads > GGUF_MAX_THREADS)
        n_threads = GGUF_MAX_THREADS;
    gguf_pool *p = (gguf_pool *)calloc(1, sizeof *p);
    if (!p)
        return GGUF_ERR_NOMEM;
    p->tid = (pthread_t *)calloc((size_t)n_threads, sizeof(pthread_t));
    if (!p->tid || pthread_mutex_init(&p->mu, NULL) != 0) {
        free(p->tid);
        free(p);
        return GGUF_ERR_NOMEM;
    }
    if (pthread_cond_init(&p->go, NULL) != 0) {
        pthread_mutex_destroy(&p->mu);
        free(p->tid);
        free(p);
        return GGUF_ERR_NOMEM;
    }
    if (pthread_cond_init(&p->done, NULL) != 0) {
        pthread_cond_destroy(&p->go);
        pthread_mutex_destroy(&p->mu);
        free(p->tid);
        free(p);
        return GGUF_ERR_NOMEM;
    }
    p->n_threads = 1;
    for (int i = 1; i < n_threads; i++) {
        pool_arg *a = (pool_arg *)malloc(sizeof *a);
        if (!a)
            break;
        a->p = p;
        a->index = i;
        if (pthread_create(&p->tid[i], NULL, pool_worker, a) != 0) {
            free(a);
            break;
        }
        p->n_started++;
        p->n_threads++;
    }
    if (p->n_threads < n_threads) {
        gguf_pool_destroy(p);
        return GGUF_ERR_NOMEM;
    }
    *out = p;
    return GGUF_OK;
}

void gguf_pool_destroy(gguf_pool *p)
{
    if (!p)
        return;
    pthread_mutex_lock(&p->mu);
    p->shutdown = 1;
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    for (int i = 1; i <= p->n_started; i++)
        pthread_join(p->tid[i], NULL);
    pthread_cond_destroy(&p->done);
    pthread_cond_destroy(&p->go);
    pthread_mutex_destroy(&p->mu);
    free(p->tid);
    free(p);
}

int gguf_pool_threads(const gguf_pool *p) { return p ? p->n_threads : 0; }

gguf_status gguf_pool_matmul(gguf_pool *p, const gguf_tensor *w, const float *x, uint64_t n_vec, float *y)
{
    if (!p || !w || !x || !y || n_vec < 1)
        return GGUF_ERR_ARG;
    if (!gguf_type_can_dequantize(w->type))
        return GGUF_ERR_UNSUPPORTED;
    const uint64_t rows = n_rows_of(w);
    const uint64_t n = (uint64_t)p->n_threads;
    pthread_mutex_lock(&p->mu);
    for (uint64_t i = 0; i < n; i++)
        p->jobs[i] = (mv_job){w, x, y, n_vec, rows, rows * i / n, rows * (i + 1) / n};
    p->pending = p->n_threads - 1;
    p->generation++;
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    mv_run(&p->jobs[0]); /* the caller's share; jobs[0] is not touched by workers */
    pthread_mutex_lock(&p->mu);
    while (p->pending > 0)
        pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
    return GGUF_OK;
}
