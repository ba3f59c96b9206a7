/*
 * gguf_model: the GGUF reader on the real model (SmolLM2-135M-Instruct, Q4_1; tools/setup-model.sh),
 * registered only when the model file exists at configure time.
 *  - metadata of the Llama architecture (layers, widths, heads, rope, eps, vocabulary);
 *  - 272 tensors: 210 Q4_1, 61 F32, 1 Q8_0; the first and last row of each dequantize to finite
 *    values;
 *  - dequantized samples of five tensors equal gguf-py's (tools/gguf_reference.py writes them);
 *  - a Q4_1 matrix-vector product (1 and 2 threads, identical) matches numpy's float64 product
 *    within 1e-5 of sum_j |W[r, j] x[j]| per row; gguf_matmul of 9 vectors (and the
 *    same through a gguf_pool) gives the same row.
 * Usage: gguf_model MODEL.gguf REFERENCE.txt
 */
#include "test-util.h"

#include "gguf.h"

#include <time.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void check_u32(const gguf_file *g, const char *key, uint32_t want)
{
    uint32_t v = 0;
    gguf_status s = gguf_get_u32(g, key, &v);
    CHECKF(s == GGUF_OK && v == want, "%s: status %s, value %u, expected %u", key, gguf_status_name(s), v, want);
}

static void check_metadata(const gguf_file *g)
{
    tu_set_case("metadata");
    CHECK_EQ(gguf_version(g), 3);
    CHECK_EQ(gguf_alignment(g), 32);
    gguf_string s = {0};
    CHECK(gguf_get_str(g, "general.architecture", &s) == GGUF_OK && gguf_str_eq(s, "llama"));
    CHECK(gguf_get_str(g, "tokenizer.ggml.model", &s) == GGUF_OK && gguf_str_eq(s, "gpt2"));
    check_u32(g, "llama.block_count", 30);
    check_u32(g, "llama.embedding_length", 576);
    check_u32(g, "llama.feed_forward_length", 1536);
    check_u32(g, "llama.attention.head_count", 9);
    check_u32(g, "llama.attention.head_count_kv", 3);
    check_u32(g, "llama.context_length", 8192);
    check_u32(g, "llama.vocab_size", 49152);
    check_u32(g, "llama.rope.dimension_count", 64);
    float f = 0;
    CHECK(gguf_get_f32(g, "llama.rope.freq_base", &f) == GGUF_OK && f == 100000.0f);
    CHECK(gguf_get_f32(g, "llama.attention.layer_norm_rms_epsilon", &f) == GGUF_OK && f == 1e-5f);
    gguf_vtype et;
    uint64_t n = 0;
    CHECK(gguf_get_arr(g, "tokenizer.ggml.tokens", &et, &n) == GGUF_OK && et == GGUF_VT_STRING && n == 49152);
    CHECK(gguf_get_arr(g, "tokenizer.ggml.merges", &et, &n) == GGUF_OK && et == GGUF_VT_STRING && n == 48900);
    CHECK(gguf_get_arr(g, "tokenizer.ggml.token_type", &et, &n) == GGUF_OK && et == GGUF_VT_I32 && n == 49152);
    const gguf_kv *tok = gguf_find_kv(g, "tokenizer.ggml.tokens");
    uint32_t bos = 0, eos = 0;
    CHECK(gguf_get_u32(g, "tokenizer.ggml.bos_token_id", &bos) == GGUF_OK);
    CHECK(gguf_get_u32(g, "tokenizer.ggml.eos_token_id", &eos) == GGUF_OK);
    CHECK(tok && gguf_kv_arr_str(tok, bos, &s) == GGUF_OK && gguf_str_eq(s, "<|im_start|>"));
    CHECK(tok && gguf_kv_arr_str(tok, eos, &s) == GGUF_OK && gguf_str_eq(s, "<|im_end|>"));
    CHECK(tok && gguf_kv_arr_str(tok, 49151, &s) == GGUF_OK && s.len > 0);
    const gguf_kv *merges = gguf_find_kv(g, "tokenizer.ggml.merges");
    CHECK(merges && gguf_kv_arr_str(merges, 0, &s) == GGUF_OK && memchr(s.ptr, ' ', s.len) != NULL);
}

static void check_tensors(const gguf_file *g)
{
    tu_set_case("tensors");
    CHECK_EQ(gguf_tensor_count(g), 272);
    int n_q41 = 0, n_f32 = 0, n_q80 = 0, nonfinite = 0;
    uint64_t bytes = 0;
    float *row = (float *)tu_xmalloc(49152 * sizeof(float));
    for (uint64_t i = 0; i < gguf_tensor_count(g); i++) {
        const gguf_tensor *t = gguf_tensor_at(g, i);
        n_q41 += t->type == GGUF_T_Q4_1;
        n_f32 += t->type == GGUF_T_F32;
        n_q80 += t->type == GGUF_T_Q8_0;
        bytes += t->n_bytes;
        const uint64_t rows = t->n_elements / (uint64_t)t->ne[0];
        for (int k = 0; k < 2; k++) {
            if (!CHECK(gguf_dequantize_rows(t, k ? rows - 1 : 0, 1, row) == GGUF_OK))
                continue;
            for (int64_t j = 0; j < t->ne[0]; j++)
                nonfinite += !isfinite(row[j]);
        }
    }
    free(row);
    CHECK_EQ(n_q41, 210);
    CHECK_EQ(n_f32, 61);
    CHECK_EQ(n_q80, 1);
    CHECK_EQ(nonfinite, 0);
    CHECKF(bytes <= gguf_file_size(g) - gguf_data_offset(g) && bytes > 90000000ull, "%llu tensor bytes",
           (unsigned long long)bytes);
    const gguf_tensor *e = gguf_find_tensor(g, "token_embd.weight");
    CHECK(e && e->type == GGUF_T_Q8_0 && e->ne[0] == 576 && e->ne[1] == 49152 && e->n_dims == 2);
    const gguf_tensor *q = gguf_find_tensor(g, "blk.29.attn_q.weight");
    CHECK(q && q->type == GGUF_T_Q4_1 && q->ne[0] == 576 && q->ne[1] == 576);
    const gguf_tensor *k = gguf_find_tensor(g, "blk.29.attn_k.weight");
    CHECK(k && k->ne[0] == 576 && k->ne[1] == 192);
    const gguf_tensor *d = gguf_find_tensor(g, "blk.29.ffn_down.weight");
    CHECK(d && d->ne[0] == 1536 && d->ne[1] == 576);
    const gguf_tensor *n = gguf_find_tensor(g, "output_norm.weight");
    CHECK(n && n->type == GGUF_T_F32 && n->ne[0] == 576 && n->n_dims == 1);
    CHECK(gguf_find_tensor(g, "blk.30.attn_q.weight") == NULL);
}

static void check_reference(const gguf_file *g, const char *ref_path)
{
    FILE *f = fopen(ref_path, "r");
    if (!CHECKF(f != NULL, "cannot open the reference %s", ref_path))
        return;
    char line[512];
    int sections = 0;
    while (fgets(line, sizeof line, f)) {
        char name[128], type[16];
        unsigned nd;
        long long ne[4], count;
        if (sscanf(line, "tensor %127s %15s %u %lld %lld %lld %lld %lld", name, type, &nd, &ne[0], &ne[1],
                   &ne[2], &ne[3], &count) == 8) {
            sections++;
            tu_set_case("gguf-py reference: %s", name);
            const gguf_tensor *t = gguf_find_tensor(g, name);
            if (!CHECKF(t != NULL, "no tensor %s", name))
                return;
            CHECK(strcmp(gguf_type_name(t->type), type) == 0);
            CHECK_EQ(t->n_dims, nd);
            for (int d = 0; d < 4; d++)
                CHECK_EQ(t->ne[d], ne[d]);
            float *row = (float *)tu_xmalloc((size_t)t->ne[0] * sizeof(float));
            long long cur = -1, exact = 0, bad = 0;
            for (long long c = 0; c < count; c++) {
                unsigned long long idx;
                double want;
                if (!fgets(line, sizeof line, f) || sscanf(line, "%llu %lf", &idx, &want) != 2) {
                    CHECKF(0, "reference truncated in %s", name);
                    break;
                }
                const long long r = (long long)(idx / (uint64_t)t->ne[0]);
                if (r != cur && CHECK(gguf_dequantize_rows(t, (uint64_t)r, 1, row) == GGUF_OK))
                    cur = r;
                const double got = row[idx % (uint64_t)t->ne[0]];
                exact += got == want;
                if (fabs(got - want) > 1e-6 * fabs(want) && bad++ < 5)
                    CHECKF(0, "%s[%llu] = %.9g, gguf-py %.9g", name, idx, got, want);
            }
            CHECKF(bad == 0, "%lld of %lld values differ", bad, count);
            CHECK_EQ(exact, count); /* same f32 arithmetic as gguf-py: bit for bit */
            printf("%s (%s): %lld of %lld sampled values equal to gguf-py's bit for bit\n", name, type, exact, count);
            free(row);
        } else if (sscanf(line, "matvec %127s %lld", name, &count) == 2) {
            sections++;
            tu_set_case("matvec vs numpy: %s", name);
            const gguf_tensor *t = gguf_find_tensor(g, name);
            if (!CHECKF(t != NULL && t->ne[1] == count, "tensor %s", name))
                return;
            float *x = (float *)tu_xmalloc((size_t)t->ne[0] * sizeof(float));
            for (int64_t j = 0; j < t->ne[0]; j++)
                x[j] = (float)((double)(j * 7919 % 1000) / 500.0 - 1.0);
            float *y1 = (float *)tu_xmalloc((size_t)count * sizeof(float));
            float *y2 = (float *)tu_xmalloc((size_t)count * sizeof(float));
            CHECK(gguf_matvec(t, x, y1, 1) == GGUF_OK);
            CHECK(gguf_matvec(t, x, y2, 2) == GGUF_OK);
            CHECK(memcmp(y1, y2, (size_t)count * sizeof(float)) == 0);
            /* a batch of 9 vectors (vector 4 is x) through gguf_matmul, 2 threads */
            const size_t ne0 = (size_t)t->ne[0];
            float *X = (float *)tu_xmalloc(9 * ne0 * sizeof(float));
            float *Y = (float *)tu_xmalloc(9 * (size_t)count * sizeof(float));
            for (size_t v = 0; v < 9; v++)
                for (size_t j = 0; j < ne0; j++)
                    X[v * ne0 + j] = v == 4 ? x[j] : (float)((double)((j * 31 + v) % 23) / 11.0 - 1.0);
            CHECK(gguf_matmul(t, X, 9, Y, 2) == GGUF_OK);
            CHECK(memcmp(Y + 4 * (size_t)count, y1, (size_t)count * sizeof(float)) == 0);
            gguf_pool *pool = NULL;
            if (CHECK(gguf_pool_create(2, &pool) == GGUF_OK)) {
                memset(Y, 0, 9 * (size_t)count * sizeof(float));
                CHECK(gguf_pool_matmul(pool, t, X, 9, Y) == GGUF_OK);
                CHECK(memcmp(Y + 4 * (size_t)count, y1, (size_t)count * sizeof(float)) == 0);
                gguf_pool_destroy(pool);
            }
            free(X);
            free(Y);
            double worst = 0;
            long long bad = 0;
            for (long long r = 0; r < count; r++) {
                long long rr;
                double want, mag;
                if (!fgets(line, sizeof line, f) || sscanf(line, "%lld %lf %lf", &rr, &want, &mag) != 3 || rr != r) {
                    CHECKF(0, "reference truncated in matvec %s", name);
                    break;
                }
                const double err = fabs(y1[r] - want) / mag;
                worst = err > worst ? err : worst;
                if (err > 1e-5 && bad++ < 5)
                    CHECKF(0, "row %lld: %.9g, numpy %.9g (scale %.6g)", r, y1[r], want, mag);
            }
            CHECK_EQ(bad, 0);
            printf("matvec %s: worst |y - numpy| / sum|w x| = %.3g over %lld rows\n", name, worst, count);
            free(x); free(y1); free(y2);
        }
    }
    fclose(f);
    CHECK_EQ(sections, 6);
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf REFERENCE.txt\n", argv[0]);
        return 2;
    }
    gguf_file *g = NULL;
    gguf_error e;
    const double t0 = now_s();
    gguf_status s = gguf_open(argv[1], &g, &e);
    const double t1 = now_s();
    if (!CHECKF(s == GGUF_OK, "%s: %s", argv[1], e.message))
        return tu_finish();
    printf("opened and validated %s (%llu bytes, %llu KVs, %llu tensors) in %.2f ms; tables %zu bytes\n", argv[1],
           (unsigned long long)gguf_file_size(g), (unsigned long long)gguf_kv_count(g),
           (unsigned long long)gguf_tensor_count(g), 1e3 * (t1 - t0), gguf_alloc_bytes(g));
    check_metadata(g);
    check_tensors(g);
    check_reference(g, argv[2]);
    gguf_close(g);
    return tu_finish();
}
