/*
 * The GGUF reader's fuzz target (libFuzzer entry point; also linked into gguf_fuzz_driver):
 * opens the input from memory; when it is accepted, reads every metadata value through the
 * getters, checks every tensor lies inside the input, and dequantizes (and multiplies a vector
 * by) every tensor of a supported type. A broken invariant aborts.
 */
#if !defined(_POSIX_C_SOURCE) || _POSIX_C_SOURCE < 200809L
#undef _POSIX_C_SOURCE
#define _POSIX_C_SOURCE 200809L
#endif
#include "gguf-fuzz.h"

#include "gguf.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

long gguf_fuzz_accepted = 0;

static void must(int ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "gguf_fuzz: invariant broken: %s\n", what);
        abort();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    gguf_file *g = NULL;
    gguf_error e;
    gguf_status s = gguf_open_memory(data, size, &g, &e);
    must(e.alloc_bytes <= 8 * size + 1024, "allocations bounded by the input size");
    if (s != GGUF_OK) {
        must(s == GGUF_ERR_FORMAT && e.message[0] && g == NULL, "a rejected input has a message");
        return 0;
    }
    gguf_fuzz_accepted++;
    must(gguf_data_offset(g) <= size, "data section inside the input");
    for (uint64_t i = 0; i < gguf_kv_count(g); i++) {
        const gguf_kv *kv = gguf_kv_at(g, i);
        must((const uint8_t *)kv->key.ptr >= data && (const uint8_t *)kv->key.ptr + kv->key.len <= data + size,
             "key inside the input");
        must(gguf_find_kv(g, "") == NULL, "no empty key");
        int64_t iv;
        double fv;
        gguf_string str;
        (void)gguf_kv_i64(kv, &iv);
        (void)gguf_kv_f64(kv, &fv);
        if (kv->type == GGUF_VT_ARRAY) {
            for (uint64_t j = 0; j < kv->count; j++) {
                if (gguf_kv_arr_str(kv, j, &str) == GGUF_OK)
                    must((const uint8_t *)str.ptr >= data && (const uint8_t *)str.ptr + str.len <= data + size,
                         "array string inside the input");
                (void)gguf_kv_arr_i64(kv, j, &iv);
                (void)gguf_kv_arr_f64(kv, j, &fv);
            }
        }
    }
    for (uint64_t i = 0; i < gguf_tensor_count(g); i++) {
        const gguf_tensor *t = gguf_tensor_at(g, i);
        must(t->data >= data && t->n_bytes <= size && t->data + t->n_bytes <= data + size,
             "tensor inside the input");
        if (!gguf_type_can_dequantize(t->type))
            continue;
        const uint64_t rows = t->n_elements / (uint64_t)t->ne[0];
        float *w = (float *)malloc((size_t)t->n_elements * sizeof(float));
        float *x = (float *)calloc((size_t)t->ne[0], sizeof(float));
        float *y = (float *)malloc((size_t)rows * sizeof(float));
        if (w && x && y) {
            must(gguf_dequantize_rows(t, 0, rows, w) == GGUF_OK, "dequantize a valid tensor");
            must(gguf_matvec(t, x, y, 2) == GGUF_OK, "matvec a valid tensor");
        }
        free(w);
        free(x);
        free(y);
    }
    gguf_close(g);
    return 0;
}
