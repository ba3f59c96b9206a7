/*
 * gguf-build.h — a small GGUF v3 writer for the reader's tests and fuzz seeds: builds the sample
 * file (every metadata value type, nested arrays, one tensor of each supported type with
 * hand-made blocks) and records where each field landed so tests can corrupt it precisely.
 * Header-only, static functions; include after test-util.h or the C headers it needs.
 */
#ifndef PIKV_TESTS_GGUF_BUILD_H
#define PIKV_TESTS_GGUF_BUILD_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct gb {
    uint8_t *p;
    size_t n, cap;
} gb;

static inline void gb_put(gb *b, const void *src, size_t n)
{
    if (b->n + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n)
            cap *= 2;
        uint8_t *np = (uint8_t *)realloc(b->p, cap);
        if (!np)
            abort();
        b->p = np;
        b->cap = cap;
    }
    memcpy(b->p + b->n, src, n);
    b->n += n;
}
static inline void gb_u8(gb *b, uint8_t v) { gb_put(b, &v, 1); }
static inline void gb_u16(gb *b, uint16_t v)
{
    const uint8_t x[2] = {(uint8_t)v, (uint8_t)(v >> 8)};
    gb_put(b, x, 2);
}
static inline void gb_u32(gb *b, uint32_t v)
{
    gb_u16(b, (uint16_t)v);
    gb_u16(b, (uint16_t)(v >> 16));
}
static inline void gb_u64(gb *b, uint64_t v)
{
    gb_u32(b, (uint32_t)v);
    gb_u32(b, (uint32_t)(v >> 32));
}
static inline void gb_f32(gb *b, float f)
{
    uint32_t v;
    memcpy(&v, &f, 4);
    gb_u32(b, v);
}
static inline void gb_str(gb *b, const char *s)
{
    gb_u64(b, strlen(s));
    gb_put(b, s, strlen(s));
}
static inline void gb_set_u32(gb *b, size_t at, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        b->p[at + (size_t)i] = (uint8_t)(v >> (8 * i));
}
static inline void gb_set_u64(gb *b, size_t at, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        b->p[at + (size_t)i] = (uint8_t)(v >> (8 * i));
}

#define GB_NT 5
typedef struct gb_layout {
    size_t tensor_count_at, kv_count_at, version_at;
    size_t key_len_at;      /* length of the first key */
    size_t align_val_at;    /* general.alignment's value */
    size_t align_type_at;   /* general.alignment's type */
    size_t kv_type_at;      /* k.u8's value type */
    size_t bool_val_at;     /* k.bool's value */
    size_t str_len_at;      /* k.str's length */
    size_t arr_count_at;    /* k.arr_str's count */
    size_t arr_elem_type_at;/* k.arr_u32's element type */
    size_t nested_count_at; /* k.nested's outer count */
    size_t t_name_len_at[GB_NT], t_ndims_at[GB_NT], t_dim_at[GB_NT], t_type_at[GB_NT],
        t_offset_at[GB_NT];
    uint64_t t_off[GB_NT], t_bytes[GB_NT];
    size_t data_at;
    size_t infos_end;
} gb_layout;

/* f16 bits of the F16 tensor and their exact values. */
static const uint16_t GB_F16_BITS[12] = {0x3c00, 0xc000, 0x7bff, 0x0001, 0x8400, 0x3555,
                                         0x0000, 0x8000, 0x3800, 0x5640, 0x03ff, 0xfbff};
static const double GB_F16_VALS[12] = {1.0, -2.0, 65504.0, 5.9604644775390625e-08,
                                       -6.103515625e-05, 0.333251953125, 0.0, -0.0, 0.5, 100.0,
                                       6.097555160522461e-05, -65504.0};

/* Expected element i of sample tensor k (row-major over ne[0] fastest). */
static inline double gb_expected(int k, int i)
{
    const int blk = i / 32, j = i % 32, jj = j % 16, hi = j >= 16;
    switch (k) {
    case 0: return i * 0.5 - 3.0;                       /* F32 [8, 2] */
    case 1: return GB_F16_VALS[i];                      /* F16 [6, 2] */
    case 2: {                                           /* Q4_0 [64, 1]: d = 2, 0.5 */
        const double d = blk == 0 ? 2.0 : 0.5;
        const int q = hi ? 15 - jj : (jj + blk) & 15;
        return (q - 8) * d;
    }
    case 3: {                                           /* Q4_1 [32, 3] */
        static const double d[3] = {0.5, 0.25, 3.0}, m[3] = {-1.0, 2.0, -24.0};
        const int q = hi ? 15 - jj : (jj * 7 + blk) & 15;
        return q * d[blk] + m[blk];
    }
    default: {                                          /* Q8_0 [32, 1, 2]: d = 0.25, 8 */
        const double d = blk == 0 ? 0.25 : 8.0;
        return (double)(j * 4 - 64 + blk * 3) * d;
    }
    }
}

static const char *const GB_NAMES[GB_NT] = {"t0.f32", "t1.f16", "t2.q40", "t3.q41", "t4.q80"};
static const uint32_t GB_TYPES[GB_NT] = {0, 1, 2, 3, 8};
static const uint32_t GB_NDIMS[GB_NT] = {2, 2, 2, 2, 3};
static const uint64_t GB_DIMS[GB_NT][3] = {{8, 2, 1}, {6, 2, 1}, {64, 1, 1}, {32, 3, 1}, {32, 1, 2}};

static inline void gb_tensor_data(gb *b, int k)
{
    switch (k) {
    case 0:
        for (int i = 0; i < 16; i++)
            gb_f32(b, (float)(i * 0.5 - 3.0));
        break;
    case 1:
        for (int i = 0; i < 12; i++)
            gb_u16(b, GB_F16_BITS[i]);
        break;
    case 2:
        for (int blk = 0; blk < 2; blk++) {
            gb_u16(b, blk == 0 ? 0x4000 : 0x3800);
            for (int j = 0; j < 16; j++)
                gb_u8(b, (uint8_t)(((j + blk) & 15) | ((15 - j) << 4)));
        }
        break;
    case 3: {
        static const uint16_t d[3] = {0x3800, 0x3400, 0x4200}, m[3] = {0xbc00, 0x4000, 0xce00};
        for (int blk = 0; blk < 3; blk++) {
            gb_u16(b, d[blk]);
            gb_u16(b, m[blk]);
            for (int j = 0; j < 16; j++)
                gb_u8(b, (uint8_t)(((j * 7 + blk) & 15) | ((15 - j) << 4)));
        }
        break;
    }
    default:
        for (int blk = 0; blk < 2; blk++) {
            gb_u16(b, blk == 0 ? 0x3400 : 0x4800);
            for (int j = 0; j < 32; j++)
                gb_u8(b, (uint8_t)(int8_t)(j * 4 - 64 + blk * 3));
        }
        break;
    }
}

static inline size_t gb_here(const gb *b) { return b->n; }

/* Builds the sample file into b (reset first) with the given alignment (a power of two). */
static inline void gb_build_sample(gb *b, gb_layout *L, uint32_t alignment)
{
    static const uint64_t bytes[GB_NT] = {64, 24, 36, 60, 68};
    b->n = 0;
    memset(L, 0, sizeof *L);
    gb_put(b, "GGUF", 4);
    L->version_at = gb_here(b);
    gb_u32(b, 3);
    L->tensor_count_at = gb_here(b);
    gb_u64(b, GB_NT);
    L->kv_count_at = gb_here(b);
    gb_u64(b, 19);
    /* 19 KVs */
    L->key_len_at = gb_here(b);
    gb_str(b, "general.alignment");
    L->align_type_at = gb_here(b);
    gb_u32(b, 4);
    L->align_val_at = gb_here(b);
    gb_u32(b, alignment);
    gb_str(b, "k.u8");
    L->kv_type_at = gb_here(b);
    gb_u32(b, 0); gb_u8(b, 200);
    gb_str(b, "k.i8"); gb_u32(b, 1); gb_u8(b, (uint8_t)(int8_t)-100);
    gb_str(b, "k.u16"); gb_u32(b, 2); gb_u16(b, 60000);
    gb_str(b, "k.i16"); gb_u32(b, 3); gb_u16(b, (uint16_t)(int16_t)-30000);
    gb_str(b, "k.u32"); gb_u32(b, 4); gb_u32(b, 4000000000u);
    gb_str(b, "k.i32"); gb_u32(b, 5); gb_u32(b, (uint32_t)(int32_t)-2000000000);
    gb_str(b, "k.f32"); gb_u32(b, 6); gb_f32(b, 1.5f);
    gb_str(b, "k.bool"); gb_u32(b, 7);
    L->bool_val_at = gb_here(b);
    gb_u8(b, 1);
    gb_str(b, "k.str"); gb_u32(b, 8);
    L->str_len_at = gb_here(b);
    gb_str(b, "hello GGUF");
    gb_str(b, "k.u64"); gb_u32(b, 10); gb_u64(b, UINT64_MAX);
    gb_str(b, "k.i64"); gb_u32(b, 11); gb_u64(b, (uint64_t)-(INT64_C(1) << 40));
    gb_str(b, "k.f64"); gb_u32(b, 12);
    {
        double d = -2.25;
        uint64_t v;
        memcpy(&v, &d, 8);
        gb_u64(b, v);
    }
    gb_str(b, "k.arr_u32"); gb_u32(b, 9);
    L->arr_elem_type_at = gb_here(b);
    gb_u32(b, 4); gb_u64(b, 4);
    gb_u32(b, 1); gb_u32(b, 2); gb_u32(b, 3); gb_u32(b, 4000000000u);
    gb_str(b, "k.arr_str"); gb_u32(b, 9); gb_u32(b, 8);
    L->arr_count_at = gb_here(b);
    gb_u64(b, 3);
    gb_str(b, "a"); gb_str(b, ""); gb_str(b, "h\xc3\xa9llo");
    gb_str(b, "k.nested"); gb_u32(b, 9); gb_u32(b, 9);
    L->nested_count_at = gb_here(b);
    gb_u64(b, 2);
    gb_u32(b, 3); gb_u64(b, 2); gb_u16(b, 1); gb_u16(b, (uint16_t)(int16_t)-2);
    gb_u32(b, 3); gb_u64(b, 1); gb_u16(b, 3);
    gb_str(b, "k.arr_f32"); gb_u32(b, 9); gb_u32(b, 6); gb_u64(b, 2); gb_f32(b, 0.5f); gb_f32(b, -1.0f);
    gb_str(b, "k.arr_empty"); gb_u32(b, 9); gb_u32(b, 0); gb_u64(b, 0);
    gb_str(b, "k.arr_bool"); gb_u32(b, 9); gb_u32(b, 7); gb_u64(b, 3); gb_u8(b, 1); gb_u8(b, 0); gb_u8(b, 1);
    /* tensor infos */
    uint64_t off = 0;
    for (int k = 0; k < GB_NT; k++) {
        L->t_name_len_at[k] = gb_here(b);
        gb_str(b, GB_NAMES[k]);
        L->t_ndims_at[k] = gb_here(b);
        gb_u32(b, GB_NDIMS[k]);
        L->t_dim_at[k] = gb_here(b);
        for (uint32_t d = 0; d < GB_NDIMS[k]; d++)
            gb_u64(b, GB_DIMS[k][d]);
        L->t_type_at[k] = gb_here(b);
        gb_u32(b, GB_TYPES[k]);
        L->t_offset_at[k] = gb_here(b);
        gb_u64(b, off);
        L->t_off[k] = off;
        L->t_bytes[k] = bytes[k];
        off = (off + bytes[k] + alignment - 1) / alignment * alignment;
    }
    L->infos_end = gb_here(b);
    while (b->n % alignment)
        gb_u8(b, 0);
    L->data_at = gb_here(b);
    for (int k = 0; k < GB_NT; k++) {
        while (b->n < L->data_at + L->t_off[k])
            gb_u8(b, 0xee);
        gb_tensor_data(b, k);
    }
}

#endif
