/*
 * gguf_reader: the GGUF reader (samples/gguf.c) without a model file.
 *  - a sample file with every metadata type, nested arrays and one tensor of each supported
 *    type (tests/fuzz/gguf-build.h) reads back exactly; dequantization matches hand-computed
 *    values; row ranges, row dot products and matvec (1..3 threads) match a double reference;
 *  - malformed files: truncation at every byte, every single-bit flip, huge counts, string
 *    lengths and dims, n_dims 0/5, unknown types, misaligned / overlapping / out-of-file
 *    offsets, duplicate names and keys, bad magic/version/alignment: each a GGUF_ERR_FORMAT
 *    with a message naming the field, never a crash (ASan build), and the reader's allocations
 *    stay bounded by the input size.
 */
#include "test-util.h"

#include "fuzz/gguf-build.h"
#include "gguf.h"

#define CHECK_OK_G(expr, e) CHECKF((expr) == GGUF_OK, "%s (last open error: '%s')", #expr, (e).message)

/* Opens a heap copy of exactly n bytes (so ASan sees any read past the end). */
static gguf_status open_copy(const uint8_t *p, size_t n, gguf_file **g, gguf_error *e)
{
    uint8_t *c = (uint8_t *)tu_xmalloc(n);
    memcpy(c, p, n);
    gguf_status s = gguf_open_memory(c, n, g, e);
    if (s == GGUF_OK) {
        /* walk everything while the copy is alive */
        for (uint64_t i = 0; i < gguf_tensor_count(*g); i++) {
            const gguf_tensor *t = gguf_tensor_at(*g, i);
            CHECK(t->data >= c && t->data + t->n_bytes <= c + n);
        }
        gguf_close(*g);
        *g = NULL;
    }
    free(c);
    CHECKF(e->alloc_bytes <= 8 * n + 1024, "allocated %zu bytes for a %zu-byte input", e->alloc_bytes, n);
    return s;
}

static int expect_fail(const gb *b, const char *what, const char *needle)
{
    gguf_file *g = NULL;
    gguf_error e;
    gguf_status s = open_copy(b->p, b->n, &g, &e);
    int ok = CHECKF(s == GGUF_ERR_FORMAT, "%s: status %s (message '%s')", what, gguf_status_name(s), e.message);
    ok &= CHECKF(strstr(e.message, needle) != NULL, "%s: message '%s' lacks '%s'", what, e.message, needle);
    return ok;
}

static void test_roundtrip(uint32_t alignment)
{
    tu_set_case("round trip, alignment %u", alignment);
    gb b = {0};
    gb_layout L;
    gb_build_sample(&b, &L, alignment);
    gguf_file *g = NULL;
    gguf_error e;
    if (!CHECK_OK_G(gguf_open_memory(b.p, b.n, &g, &e), e))
        return;
    CHECK_EQ(gguf_version(g), 3);
    CHECK_EQ(gguf_alignment(g), alignment);
    CHECK_EQ(gguf_data_offset(g), L.data_at);
    CHECK_EQ(gguf_data_offset(g) % alignment, 0);
    CHECK_EQ(gguf_kv_count(g), 19);
    CHECK_EQ(gguf_tensor_count(g), GB_NT);
    uint32_t u32 = 0;
    int32_t i32 = 0;
    uint64_t u64 = 0;
    int64_t i64 = 0;
    float f32 = 0;
    double f64 = 0;
    int bl = 0;
    gguf_string s;
    CHECK_OK_G(gguf_get_u32(g, "k.u8", &u32), e); CHECK_EQ(u32, 200);
    CHECK_OK_G(gguf_get_i32(g, "k.i8", &i32), e); CHECK_EQ(i32, -100);
    CHECK_OK_G(gguf_get_u32(g, "k.u16", &u32), e); CHECK_EQ(u32, 60000);
    CHECK_OK_G(gguf_get_i32(g, "k.i16", &i32), e); CHECK_EQ(i32, -30000);
    CHECK_OK_G(gguf_get_u32(g, "k.u32", &u32), e); CHECK_EQ(u32, 4000000000u);
    CHECK(gguf_get_i32(g, "k.u32", &i32) == GGUF_ERR_TYPE); /* does not fit */
    CHECK_OK_G(gguf_get_i32(g, "k.i32", &i32), e); CHECK_EQ(i32, -2000000000);
    CHECK(gguf_get_u32(g, "k.i32", &u32) == GGUF_ERR_TYPE); /* negative */
    CHECK_OK_G(gguf_get_f32(g, "k.f32", &f32), e); CHECK(f32 == 1.5f);
    CHECK(gguf_get_u32(g, "k.f32", &u32) == GGUF_ERR_TYPE);
    CHECK_OK_G(gguf_get_bool(g, "k.bool", &bl), e); CHECK_EQ(bl, 1);
    CHECK_OK_G(gguf_get_str(g, "k.str", &s), e); CHECK(gguf_str_eq(s, "hello GGUF"));
    CHECK(gguf_get_str(g, "k.u8", &s) == GGUF_ERR_TYPE);
    CHECK_OK_G(gguf_get_u64(g, "k.u64", &u64), e); CHECK(u64 == UINT64_MAX);
    CHECK(gguf_get_i64(g, "k.u64", &i64) == GGUF_ERR_TYPE);
    CHECK_OK_G(gguf_get_i64(g, "k.i64", &i64), e); CHECK(i64 == -(INT64_C(1) << 40));
    CHECK_OK_G(gguf_get_f64(g, "k.f64", &f64), e); CHECK(f64 == -2.25);
    CHECK(gguf_get_u32(g, "no.such.key", &u32) == GGUF_ERR_NOT_FOUND);
    CHECK(gguf_get_u32(g, "k.u", &u32) == GGUF_ERR_NOT_FOUND);
    gguf_vtype et;
    uint64_t n = 0;
    CHECK_OK_G(gguf_get_arr(g, "k.arr_u32", &et, &n), e);
    CHECK_EQ(et, GGUF_VT_U32); CHECK_EQ(n, 4);
    const gguf_kv *kv = gguf_find_kv(g, "k.arr_u32");
    CHECK_OK_G(gguf_kv_arr_i64(kv, 3, &i64), e); CHECK_EQ(i64, 4000000000ll);
    CHECK_OK_G(gguf_kv_arr_i64(kv, 0, &i64), e); CHECK_EQ(i64, 1);
    CHECK(gguf_kv_arr_i64(kv, 4, &i64) == GGUF_ERR_ARG);
    CHECK(gguf_kv_arr_str(kv, 0, &s) == GGUF_ERR_TYPE);
    kv = gguf_find_kv(g, "k.arr_str");
    CHECK(kv && kv->count == 3 && kv->arr_type == GGUF_VT_STRING);
    CHECK_OK_G(gguf_kv_arr_str(kv, 0, &s), e); CHECK(gguf_str_eq(s, "a"));
    CHECK_OK_G(gguf_kv_arr_str(kv, 1, &s), e); CHECK(gguf_str_eq(s, ""));
    CHECK_OK_G(gguf_kv_arr_str(kv, 2, &s), e); CHECK(gguf_str_eq(s, "h\xc3\xa9llo"));
    CHECK(gguf_kv_arr_str(kv, 3, &s) == GGUF_ERR_ARG);
    kv = gguf_find_kv(g, "k.nested");
    CHECK(kv && kv->count == 2 && kv->arr_type == GGUF_VT_ARRAY);
    CHECK(gguf_kv_arr_i64(kv, 0, &i64) == GGUF_ERR_TYPE);
    kv = gguf_find_kv(g, "k.arr_f32");
    CHECK_OK_G(gguf_kv_arr_f64(kv, 1, &f64), e); CHECK(f64 == -1.0);
    CHECK(gguf_kv_arr_i64(kv, 1, &i64) == GGUF_ERR_TYPE);
    CHECK_OK_G(gguf_get_arr(g, "k.arr_empty", &et, &n), e); CHECK_EQ(n, 0); CHECK_EQ(et, GGUF_VT_U8);
    kv = gguf_find_kv(g, "k.arr_bool");
    CHECK_OK_G(gguf_kv_arr_i64(kv, 2, &i64), e); CHECK_EQ(i64, 1);
    /* the order of the KVs is the file's */
    CHECK(gguf_str_eq(gguf_kv_at(g, 0)->key, "general.alignment"));
    CHECK(gguf_str_eq(gguf_kv_at(g, 18)->key, "k.arr_bool"));
    CHECK(gguf_kv_at(g, 19) == NULL);

    for (int k = 0; k < GB_NT; k++) {
        tu_set_case("round trip, alignment %u, tensor %s", alignment, GB_NAMES[k]);
        const gguf_tensor *t = gguf_find_tensor(g, GB_NAMES[k]);
        if (!CHECK(t != NULL))
            continue;
        CHECK(t == gguf_tensor_at(g, (uint64_t)k));
        CHECK_EQ(t->type, GB_TYPES[k]);
        CHECK_EQ(t->n_dims, GB_NDIMS[k]);
        uint64_t nel = 1;
        for (uint32_t d = 0; d < 4; d++) {
            CHECK_EQ(t->ne[d], d < GB_NDIMS[k] ? GB_DIMS[k][d] : 1);
            nel *= (uint64_t)t->ne[d];
        }
        CHECK_EQ(t->n_elements, nel);
        CHECK_EQ(t->offset, L.t_off[k]);
        CHECK_EQ(t->n_bytes, L.t_bytes[k]);
        CHECK(t->data == b.p + L.data_at + L.t_off[k]);
        float *out = (float *)tu_xcalloc(nel, sizeof(float));
        CHECK_OK_G(gguf_dequantize_rows(t, 0, nel / (uint64_t)t->ne[0], out), e);
        int bad = 0;
        for (uint64_t i = 0; i < nel; i++)
            if (out[i] != gb_expected(k, (int)i) || !signbit(out[i]) != !signbit(gb_expected(k, (int)i)))
                bad++;
        CHECKF(bad == 0, "%d of %llu dequantized values differ", bad, (unsigned long long)nel);
        /* the last row alone */
        const uint64_t rows = nel / (uint64_t)t->ne[0];
        float *row = (float *)tu_xcalloc((size_t)t->ne[0], sizeof(float));
        CHECK_OK_G(gguf_dequantize_rows(t, rows - 1, 1, row), e);
        CHECK(memcmp(row, out + (rows - 1) * (uint64_t)t->ne[0], (size_t)t->ne[0] * 4) == 0);
        CHECK(gguf_dequantize_rows(t, rows, 1, row) == GGUF_ERR_ARG);
        CHECK(gguf_dequantize_rows(t, 1, rows, row) == GGUF_ERR_ARG);
        CHECK(gguf_dequantize_rows(t, UINT64_MAX, 2, row) == GGUF_ERR_ARG);
        /* dot products and matvec against double */
        float *x = (float *)tu_xcalloc((size_t)t->ne[0], sizeof(float));
        for (int64_t j = 0; j < t->ne[0]; j++)
            x[j] = (float)((double)((j * 37) % 11) / 8.0 - 0.5);
        float *y = (float *)tu_xcalloc(rows, sizeof(float));
        for (int th = 1; th <= 3; th++) {
            CHECK_OK_G(gguf_matvec(t, x, y, th), e);
            for (uint64_t r = 0; r < rows; r++) {
                double ref = 0, mag = 0;
                for (int64_t j = 0; j < t->ne[0]; j++) {
                    ref += (double)out[r * (uint64_t)t->ne[0] + (uint64_t)j] * x[j];
                    mag += fabs((double)out[r * (uint64_t)t->ne[0] + (uint64_t)j] * x[j]);
                }
                CHECKF(fabs(y[r] - ref) <= 1e-6 * mag + 1e-30, "row %llu: %.9g vs %.9g (%d threads)",
                       (unsigned long long)r, y[r], ref, th);
                float d1;
                CHECK_OK_G(gguf_row_dot(t, r, x, &d1), e);
                CHECK(d1 == y[r]);
            }
        }
        /* matmul: n_vec products equal n_vec matvecs bit for bit */
        static const uint64_t nvs[] = {1, 3, 8, 11};
        for (size_t q = 0; q < sizeof nvs / sizeof nvs[0]; q++) {
            const uint64_t nv = nvs[q], ne0 = (uint64_t)t->ne[0];
            float *X = (float *)tu_xmalloc(nv * ne0 * sizeof(float));
            float *Y = (float *)tu_xmalloc(nv * rows * sizeof(float));
            for (uint64_t v = 0; v < nv; v++)
                for (uint64_t j = 0; j < ne0; j++)
                    X[v * ne0 + j] = (float)((double)((j * 13 + v * 7) % 17) / 4.0 - 2.0);
            for (int th = 1; th <= 3; th += 2) {
                CHECK_OK_G(gguf_matmul(t, X, nv, Y, th), e);
                int diff = 0;
                for (uint64_t v = 0; v < nv; v++) {
                    CHECK_OK_G(gguf_matvec(t, X + v * ne0, y, 1), e);
                    diff += memcmp(y, Y + v * rows, rows * sizeof(float)) != 0;
                }
                CHECKF(diff == 0, "matmul of %llu vectors (%d threads): %d differ from matvec",
                       (unsigned long long)nv, th, diff);
            }
            free(X);
            free(Y);
        }
        /* the persistent pool: same results, many calls in a row */
        for (int th = 1; th <= 4; th += 3) {
            gguf_pool *pool = NULL;
            if (!CHECK(gguf_pool_create(th, &pool) == GGUF_OK))
                continue;
            CHECK_EQ(gguf_pool_threads(pool), th);
            float *yp = (float *)tu_xcalloc(rows, sizeof(float));
            CHECK_OK_G(gguf_matvec(t, x, y, 1), e);
            int diff = 0;
            for (int rep = 0; rep < 500; rep++) {
                memset(yp, 0, rows * sizeof(float));
                CHECK_OK_G(gguf_pool_matmul(pool, t, x, 1, yp), e);
                diff += memcmp(y, yp, rows * sizeof(float)) != 0;
            }
            CHECKF(diff == 0, "%d of 500 pool products (%d threads) differ from matvec", diff, th);
            CHECK(gguf_pool_matmul(pool, t, x, 0, yp) == GGUF_ERR_ARG);
            gguf_pool_destroy(pool);
            free(yp);
        }
        CHECK(gguf_matmul(t, x, 0, y, 1) == GGUF_ERR_ARG);
        CHECK(gguf_matvec(t, x, y, 0) == GGUF_ERR_ARG);
        free(x); free(y); free(row); free(out);
    }
    CHECK(gguf_find_tensor(g, "t0.f3") == NULL);
    CHECK(gguf_find_tensor(g, "nope") == NULL);
    gguf_close(g);
    free(b.p);
}

static void test_f16_and_blocks(void)
{
    tu_set_case("f16 and hand-made blocks");
    CHECK(gguf_f16_to_f32(0x7c00) == INFINITY);
    CHECK(gguf_f16_to_f32(0xfc00) == -INFINITY);
    CHECK(isnan(gguf_f16_to_f32(0x7e00)));
    CHECK(gguf_f16_to_f32(0x3bff) == 0.99951171875f);
    for (int i = 0; i < 12; i++)
        CHECK(gguf_f16_to_f32(GB_F16_BITS[i]) == (float)GB_F16_VALS[i]);
    /* Q4_1: d = 1.5, m = -0.25; byte j = 0x?j: low nibble j, high nibble 15 - j */
    uint8_t q41[20] = {0x00, 0x3e, 0x00, 0xb4};
    for (int j = 0; j < 16; j++)
        q41[4 + j] = (uint8_t)(j | ((15 - j) << 4));
    float out[64];
    CHECK(gguf_dequantize(GGUF_T_Q4_1, q41, out, 32) == GGUF_OK);
    CHECK(out[0] == -0.25f && out[1] == 1.25f && out[15] == 22.25f);
    CHECK(out[16] == 22.25f && out[31] == -0.25f && out[17] == 20.75f);
    /* Q8_0: d = -0.5, q = -128, 127 */
    uint8_t q80[34] = {0x00, 0xb8, 0x80, 0x7f, 0x01};
    CHECK(gguf_dequantize(GGUF_T_Q8_0, q80, out, 32) == GGUF_OK);
    CHECK(out[0] == 64.0f && out[1] == -63.5f && out[2] == -0.5f && out[3] == -0.0f);
    /* Q4_0: d = 1, byte 0 = 0xf0: element 0 = -8, element 16 = 7 */
    uint8_t q40[18] = {0x00, 0x3c, 0xf0};
    CHECK(gguf_dequantize(GGUF_T_Q4_0, q40, out, 32) == GGUF_OK);
    CHECK(out[0] == -8.0f && out[16] == 7.0f && out[1] == -8.0f && out[17] == -8.0f);
    CHECK(gguf_dequantize(GGUF_T_Q4_0, q40, out, 31) == GGUF_ERR_ARG);
    CHECK(gguf_dequantize(GGUF_T_Q4_K, q40, out, 256) == GGUF_ERR_UNSUPPORTED);
    CHECK(gguf_dequantize((gguf_ttype)99, q40, out, 32) == GGUF_ERR_ARG);
    CHECK(strcmp(gguf_type_name(GGUF_T_Q4_1), "Q4_1") == 0);
    CHECK_EQ(gguf_type_block_bytes(GGUF_T_Q8_0), 34);
    CHECK_EQ(gguf_type_block_bytes((gguf_ttype)4), 0); /* Q4_2: removed from ggml */
}

/* Every truncation and every single-bit flip of the sample: no crash, bounded allocations;
 * truncations all fail. */
static void test_truncation_and_flips(void)
{
    gb b = {0};
    gb_layout L;
    gb_build_sample(&b, &L, 32);
    gguf_file *g = NULL;
    gguf_error e;
    tu_set_case("truncation");
    int bad = 0;
    for (size_t n = 0; n < b.n; n++) {
        gguf_status s = open_copy(b.p, n, &g, &e);
        if (s != GGUF_ERR_FORMAT || !e.message[0]) {
            if (bad++ < 5)
                CHECKF(0, "truncated to %zu of %zu bytes: status %s", n, b.n, gguf_status_name(s));
        }
    }
    CHECKF(bad == 0, "%d truncations accepted", bad);
    tu_set_case("bit flips");
    long accepted = 0;
    const size_t before = (size_t)tu_fail_count;
    for (size_t i = 0; i < L.data_at; i++)
        for (int bit = 0; bit < 8; bit++) {
            b.p[i] ^= (uint8_t)(1u << bit);
            gguf_status s = open_copy(b.p, b.n, &g, &e);
            accepted += s == GGUF_OK;
            if (s != GGUF_OK && s != GGUF_ERR_FORMAT)
                CHECKF(0, "flip at %zu bit %d: status %s", i, bit, gguf_status_name(s));
            else if (s != GGUF_OK && !e.message[0])
                CHECKF(0, "flip at %zu bit %d: no message", i, bit);
            b.p[i] ^= (uint8_t)(1u << bit);
        }
    CHECK((size_t)tu_fail_count == before);
    /* flips in values (not lengths/types) are accepted: some must be */
    CHECKF(accepted > 0 && accepted < (long)(8 * L.data_at), "%ld of %zu flips accepted", accepted,
           8 * (size_t)L.data_at);
    free(b.p);
}

typedef void (*mutator)(gb *b, const gb_layout *L);
#define MUT(fn, body) static void fn(gb *b, const gb_layout *L) { (void)L; body; }

MUT(m_magic, b->p[0] = 'g')
MUT(m_version1, gb_set_u32(b, L->version_at, 1))
MUT(m_version4, gb_set_u32(b, L->version_at, 4))
MUT(m_tcount63, gb_set_u64(b, L->tensor_count_at, UINT64_C(1) << 63))
MUT(m_tcount40, gb_set_u64(b, L->tensor_count_at, UINT64_C(1) << 40))
MUT(m_tcount_max, gb_set_u64(b, L->tensor_count_at, UINT64_MAX))
MUT(m_kvcount63, gb_set_u64(b, L->kv_count_at, UINT64_C(1) << 63))
MUT(m_kvcount40, gb_set_u64(b, L->kv_count_at, UINT64_C(1) << 40))
MUT(m_kvcount_plus, gb_set_u64(b, L->kv_count_at, 20))
MUT(m_keylen63, gb_set_u64(b, L->key_len_at, UINT64_C(1) << 63))
MUT(m_keylen40, gb_set_u64(b, L->key_len_at, UINT64_C(1) << 40))
MUT(m_keylen0, gb_set_u64(b, L->key_len_at, 0))
MUT(m_strlen40, gb_set_u64(b, L->str_len_at, UINT64_C(1) << 40))
MUT(m_strlen_max, gb_set_u64(b, L->str_len_at, UINT64_MAX))
MUT(m_arrcount63, gb_set_u64(b, L->arr_count_at, UINT64_C(1) << 63))
MUT(m_arrcount40, gb_set_u64(b, L->arr_count_at, UINT64_C(1) << 40))
MUT(m_nested40, gb_set_u64(b, L->nested_count_at, UINT64_C(1) << 40))
MUT(m_kvtype, gb_set_u32(b, L->kv_type_at, 13))
MUT(m_arrtype, gb_set_u32(b, L->arr_elem_type_at, 77))
MUT(m_bool2, b->p[L->bool_val_at] = 2)
MUT(m_align0, gb_set_u32(b, L->align_val_at, 0))
MUT(m_align3, gb_set_u32(b, L->align_val_at, 3))
MUT(m_align64, gb_set_u32(b, L->align_val_at, 64))
MUT(m_aligntype, gb_set_u32(b, L->align_type_at, 5))
MUT(m_ndims0, gb_set_u32(b, L->t_ndims_at[0], 0))
MUT(m_ndims5, gb_set_u32(b, L->t_ndims_at[0], 5))
MUT(m_dim0, gb_set_u64(b, L->t_dim_at[1], 0))
MUT(m_dim40, gb_set_u64(b, L->t_dim_at[0], UINT64_C(1) << 40); gb_set_u64(b, L->t_dim_at[0] + 8, UINT64_C(1) << 40))
MUT(m_dim63, gb_set_u64(b, L->t_dim_at[0], UINT64_C(1) << 63))
MUT(m_dimbig_q, gb_set_u64(b, L->t_dim_at[3], UINT64_C(1) << 58); gb_set_u64(b, L->t_dim_at[3] + 8, 16))
MUT(m_type99, gb_set_u32(b, L->t_type_at[2], 99))
MUT(m_type4, gb_set_u32(b, L->t_type_at[2], 4))
MUT(m_type_rowlen, gb_set_u32(b, L->t_type_at[1], GGUF_T_Q8_0)) /* 6 is no multiple of 32 */
MUT(m_off_misaligned, gb_set_u64(b, L->t_offset_at[2], L->t_off[2] + 1))
MUT(m_off_overlap, gb_set_u64(b, L->t_offset_at[3], L->t_off[2]))
MUT(m_off_past, gb_set_u64(b, L->t_offset_at[4], L->t_off[4] + 32))
MUT(m_off_huge, gb_set_u64(b, L->t_offset_at[4], UINT64_C(1) << 40))
MUT(m_off_wrap, gb_set_u64(b, L->t_offset_at[4], UINT64_MAX - 31))
MUT(m_dup_name, memcpy(b->p + L->t_name_len_at[3] + 8, GB_NAMES[1], 6))
MUT(m_dup_key, memcpy(b->p + L->kv_type_at - 2, "i8", 2)) /* "k.u8" -> "k.i8" */
MUT(m_name_len, gb_set_u64(b, L->t_name_len_at[2], 1000))
MUT(m_short, b->n = L->data_at + L->t_off[4] + L->t_bytes[4] - 1)

static void test_malformed(void)
{
    static const struct {
        mutator fn;
        const char *what, *needle;
    } cases[] = {
        {m_magic, "bad magic", "magic"},
        {m_version1, "version 1", "version 1"},
        {m_version4, "version 4", "version 4"},
        {m_tcount63, "tensor_count 2^63", "tensor_count 9223372036854775808"},
        {m_tcount40, "tensor_count 2^40", "tensor_count 1099511627776"},
        {m_tcount_max, "tensor_count 2^64-1", "tensor_count"},
        {m_kvcount63, "kv_count 2^63", "kv_count 9223372036854775808"},
        {m_kvcount40, "kv_count 2^40", "kv_count 1099511627776"},
        {m_kvcount_plus, "kv_count one too many", ""},
        {m_keylen63, "key length 2^63", "string length 9223372036854775808"},
        {m_keylen40, "key length 2^40", "string length 1099511627776"},
        {m_keylen0, "empty key", "empty key"},
        {m_strlen40, "string length 2^40", "'k.str'"},
        {m_strlen_max, "string length 2^64-1", "'k.str'"},
        {m_arrcount63, "array count 2^63", "array count 9223372036854775808"},
        {m_arrcount40, "array count 2^40", "array count 1099511627776"},
        {m_nested40, "nested array count 2^40", "'k.nested'"},
        {m_kvtype, "unknown value type", "unknown value type 13"},
        {m_arrtype, "unknown array element type", "unknown array element type 77"},
        {m_bool2, "bool 2", "bool value 2"},
        {m_align0, "alignment 0", "general.alignment = 0"},
        {m_align3, "alignment 3", "general.alignment = 3"},
        {m_align64, "alignment 64 (offsets misaligned)", "not a multiple of the alignment 64"},
        {m_aligntype, "alignment of type i32", "general.alignment has type i32"},
        {m_ndims0, "n_dims 0", "n_dims 0"},
        {m_ndims5, "n_dims 5", "n_dims 5"},
        {m_dim0, "dimension 0", "dimension 0 = 0"},
        {m_dim40, "dims 2^40 x 2^40", "overflow"},
        {m_dim63, "dim 2^63", "dimension 0 = 9223372036854775808"},
        {m_dimbig_q, "Q4_1 dims 2^58 x 16", "exceed the file size"},
        {m_type99, "ggml type 99", "unknown ggml type 99"},
        {m_type4, "ggml type 4 (removed Q4_2)", "unknown ggml type 4"},
        {m_type_rowlen, "row length not a block multiple", "not a multiple of the Q8_0 block size"},
        {m_off_misaligned, "misaligned offset", "tensor 2 't2.q40': data offset 97"},
        {m_off_overlap, "overlapping tensors", "overlaps"},
        {m_off_past, "offset past the end", "tensor 4 't4.q80': offset 256 + 68 bytes runs past the end"},
        {m_off_huge, "offset 2^40", "offset 1099511627776"},
        {m_off_wrap, "offset near 2^64", "runs past the end"},
        {m_dup_name, "duplicate tensor name", "duplicate tensor name"},
        {m_dup_key, "duplicate key", "duplicate key"},
        {m_name_len, "tensor name length 1000", "exceeds the limit"},
        {m_short, "file one byte short", "runs past the end of the file"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        gb b = {0};
        gb_layout L;
        gb_build_sample(&b, &L, 32);
        cases[c].fn(&b, &L);
        tu_set_case("malformed: %s", cases[c].what);
        expect_fail(&b, cases[c].what, cases[c].needle);
        free(b.p);
    }
    /* nesting deeper than GGUF_MAX_ARRAY_DEPTH */
    tu_set_case("malformed: arrays nested 9 deep");
    gb b = {0};
    gb_put(&b, "GGUF", 4);
    gb_u32(&b, 3); gb_u64(&b, 0); gb_u64(&b, 1);
    gb_str(&b, "deep"); gb_u32(&b, 9);
    for (int d = 0; d < 9; d++) {
        gb_u32(&b, 9); gb_u64(&b, 1);
    }
    gb_u32(&b, 0); gb_u64(&b, 0);
    expect_fail(&b, "deep nesting", "nested deeper than 8");
    /* 8 deep is fine */
    b.n = 0;
    gb_put(&b, "GGUF", 4);
    gb_u32(&b, 3); gb_u64(&b, 0); gb_u64(&b, 1);
    gb_str(&b, "deep"); gb_u32(&b, 9);
    for (int d = 0; d < 7; d++) {
        gb_u32(&b, 9); gb_u64(&b, 1);
    }
    gb_u32(&b, 0); gb_u64(&b, 0);
    gguf_file *g = NULL;
    gguf_error e;
    CHECKF(open_copy(b.p, b.n, &g, &e) == GGUF_OK, "8-deep array: %s", e.message);
    /* an empty file, NULL arguments, a missing path */
    CHECK(gguf_open_memory(b.p, 0, &g, &e) == GGUF_ERR_FORMAT);
    CHECK(gguf_open_memory(NULL, 10, &g, &e) == GGUF_ERR_ARG);
    CHECK(gguf_open("/nonexistent/model.gguf", &g, &e) == GGUF_ERR_IO && strstr(e.message, "/nonexistent"));
    CHECK(gguf_open("/", &g, &e) == GGUF_ERR_IO);
    free(b.p);
}

/* A real file on disk (mmap path) reads the same as the buffer. */
static void test_file(void)
{
    tu_set_case("open by path");
    gb b = {0};
    gb_layout L;
    gb_build_sample(&b, &L, 32);
    char path[] = "/tmp/pikv-gguf-XXXXXX";
    int fd = mkstemp(path);
    if (!CHECK(fd >= 0))
        return;
    FILE *f = fdopen(fd, "wb");
    CHECK(fwrite(b.p, 1, b.n, f) == b.n);
    fclose(f);
    gguf_file *g = NULL;
    gguf_error e;
    if (CHECKF(gguf_open(path, &g, &e) == GGUF_OK, "%s", e.message)) {
        CHECK_EQ(gguf_file_size(g), b.n);
        const gguf_tensor *t = gguf_find_tensor(g, "t3.q41");
        float v[96];
        CHECK(t && gguf_dequantize_rows(t, 0, 3, v) == GGUF_OK && v[95] == (float)gb_expected(3, 95));
        gguf_close(g);
    }
    remove(path);
    free(b.p);
}

int main(void)
{
    gguf_pool *pool = NULL;
    CHECK(gguf_pool_create(0, &pool) == GGUF_ERR_ARG && pool == NULL);
    gguf_pool_destroy(NULL);
    test_f16_and_blocks();
    test_roundtrip(32);
    test_roundtrip(64);
    test_roundtrip(1);
    test_file();
    test_malformed();
    test_truncation_and_flips();
    return tu_finish();
}
