/*
 * gguf.h — a GGUF v3 reader for PiKV's model runner (samples/): metadata, tensor infos,
 * dequantization of F32/F16/Q4_0/Q4_1/Q8_0 tensors to f32 and a multithreaded
 * matrix-vector product over quantized weights.
 *
 * The reader validates everything before using it (docs/model.md lists the checks): a
 * malformed file is a status code and a message naming the field, its value and its byte
 * offset, never a crash, an abort or a print. Allocations are bounded by the input size (every
 * count is checked against the bytes left before anything is allocated).
 *
 * Opened files are read-only views: a file is mapped (mmap, PROT_READ); a memory buffer is
 * referenced, not copied, and must outlive the gguf_file. Strings point into the data and are
 * NOT NUL-terminated (use the lengths).
 *
 * Not thread-safe for concurrent open/close of the same object; all getters and the
 * dequantize/matvec functions only read and may run concurrently.
 */
#ifndef PIKV_SAMPLES_GGUF_H
#define PIKV_SAMPLES_GGUF_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum gguf_status {
    GGUF_OK = 0,
    GGUF_ERR_IO,          /* open/stat/mmap failed */
    GGUF_ERR_FORMAT,      /* malformed file (message says where) */
    GGUF_ERR_NOMEM,       /* out of host memory */
    GGUF_ERR_NOT_FOUND,   /* no such key / tensor */
    GGUF_ERR_TYPE,        /* key or tensor of another type than asked */
    GGUF_ERR_UNSUPPORTED, /* a valid ggml type this reader cannot dequantize */
    GGUF_ERR_ARG          /* bad argument (NULL, row range out of bounds...) */
} gguf_status;

/* GGUF metadata value types (the file's numbering). */
typedef enum gguf_vtype {
    GGUF_VT_U8 = 0, GGUF_VT_I8 = 1, GGUF_VT_U16 = 2, GGUF_VT_I16 = 3,
    GGUF_VT_U32 = 4, GGUF_VT_I32 = 5, GGUF_VT_F32 = 6, GGUF_VT_BOOL = 7,
    GGUF_VT_STRING = 8, GGUF_VT_ARRAY = 9, GGUF_VT_U64 = 10, GGUF_VT_I64 = 11,
    GGUF_VT_F64 = 12
} gguf_vtype;
#define GGUF_VT_COUNT 13

/* ggml tensor types (the file's numbering). Sizes are known for all listed here; only
 * F32, F16, Q4_0, Q4_1 and Q8_0 can be dequantized. Any other number is a format error. */
typedef enum gguf_ttype {
    GGUF_T_F32 = 0, GGUF_T_F16 = 1, GGUF_T_Q4_0 = 2, GGUF_T_Q4_1 = 3,
    GGUF_T_Q5_0 = 6, GGUF_T_Q5_1 = 7, GGUF_T_Q8_0 = 8, GGUF_T_Q8_1 = 9,
    GGUF_T_Q2_K = 10, GGUF_T_Q3_K = 11, GGUF_T_Q4_K = 12, GGUF_T_Q5_K = 13,
    GGUF_T_Q6_K = 14, GGUF_T_Q8_K = 15, GGUF_T_I8 = 24, GGUF_T_I16 = 25,
    GGUF_T_I32 = 26, GGUF_T_I64 = 27, GGUF_T_F64 = 28, GGUF_T_BF16 = 30
} gguf_ttype;

#define GGUF_MAX_DIMS 4
#define GGUF_MAX_ARRAY_DEPTH 8      /* nested arrays deeper than this are rejected */
#define GGUF_MAX_STRING (1u << 30)  /* longest string accepted (bytes) */
#define GGUF_DEFAULT_ALIGNMENT 32

/* The error of a failed open. */
typedef struct gguf_error {
    char message[320];
    uint64_t offset;       /* byte offset of the offending field */
    size_t alloc_bytes;    /* bytes the reader had allocated when it stopped (tests bound this) */
} gguf_error;

typedef struct gguf_string {
    const char *ptr; /* not NUL-terminated */
    uint64_t len;
} gguf_string;

typedef struct gguf_kv {
    gguf_string key;
    gguf_vtype type;
    /* arrays: element type and count; scalars/strings: arr_type = type, count = 1 */
    gguf_vtype arr_type;
    uint64_t count;
    const uint8_t *data;  /* the value (or the first array element) in the file */
    uint64_t offset;      /* byte offset of data in the file */
    uint64_t *str_offsets; /* arrays of strings: offset of each element from data (owned) */
} gguf_kv;

typedef struct gguf_tensor {
    gguf_string name;
    uint32_t n_dims;
    int64_t ne[GGUF_MAX_DIMS]; /* ne[0] is the row length (fastest); unused dims are 1 */
    gguf_ttype type;
    uint64_t offset;    /* from the start of the data section */
    uint64_t n_elements;
    uint64_t n_bytes;
    const uint8_t *data; /* in the file */
} gguf_tensor;

typedef struct gguf_file gguf_file;

/* Opens and validates a file (mapped read-only). err may be NULL. */
gguf_status gguf_open(const char *path, gguf_file **out, gguf_error *err);
/* Validates a buffer in memory; the buffer is referenced and must outlive the result. */
gguf_status gguf_open_memory(const void *data, size_t size, gguf_file **out, gguf_error *err);
void gguf_close(gguf_file *g);

uint32_t gguf_version(const gguf_file *g);
uint64_t gguf_alignment(const gguf_file *g);
uint64_t gguf_data_offset(const gguf_file *g); /* start of the data section in the file */
uint64_t gguf_file_size(const gguf_file *g);
size_t gguf_alloc_bytes(const gguf_file *g);   /* heap bytes allocated by the open (all of it) */

/* Metadata. Index access, lookup by key (NUL-terminated), and typed getters. The getters
 * return GGUF_ERR_NOT_FOUND or GGUF_ERR_TYPE (out untouched) when the key is absent or of
 * another type; the integer getters accept any integer type whose value fits. */
uint64_t gguf_kv_count(const gguf_file *g);
const gguf_kv *gguf_kv_at(const gguf_file *g, uint64_t i);
const gguf_kv *gguf_find_kv(const gguf_file *g, const char *key);
gguf_status gguf_get_u32(const gguf_file *g, const char *key, uint32_t *out);
gguf_status gguf_get_i32(const gguf_file *g, const char *key, int32_t *out);
gguf_status gguf_get_u64(const gguf_file *g, const char *key, uint64_t *out);
gguf_status gguf_get_i64(const gguf_file *g, const char *key, int64_t *out);
gguf_status gguf_get_f32(const gguf_file *g, const char *key, float *out); /* F32 (or F64 narrowed) */
gguf_status gguf_get_f64(const gguf_file *g, const char *key, double *out); /* F32 or F64 */
gguf_status gguf_get_bool(const gguf_file *g, const char *key, int *out);
gguf_status gguf_get_str(const gguf_file *g, const char *key, gguf_string *out);
/* An array: element type and count. */
gguf_status gguf_get_arr(const gguf_file *g, const char *key, gguf_vtype *elem_type, uint64_t *count);
/* Element i of an array KV: strings; integers (any integer element type, widened); floats. */
gguf_status gguf_kv_arr_str(const gguf_kv *kv, uint64_t i, gguf_string *out);
gguf_status gguf_kv_arr_i64(const gguf_kv *kv, uint64_t i, int64_t *out);
gguf_status gguf_kv_arr_f64(const gguf_kv *kv, uint64_t i, double *out);
/* Scalar value of a KV as i64/u64/f64 (integer, bool or float types). */
gguf_status gguf_kv_i64(const gguf_kv *kv, int64_t *out);
gguf_status gguf_kv_u64(const gguf_kv *kv, uint64_t *out);
gguf_status gguf_kv_f64(const gguf_kv *kv, double *out);
/* 1 when s equals the NUL-terminated c string. */
int gguf_str_eq(gguf_string s, const char *c);

/* Tensors. */
uint64_t gguf_tensor_count(const gguf_file *g);
const gguf_tensor *gguf_tensor_at(const gguf_file *g, uint64_t i);
const gguf_tensor *gguf_find_tensor(const gguf_file *g, const char *name);

/* Type information: name ("Q4_1"), elements per block and bytes per block (0 for unknown). */
const char *gguf_type_name(gguf_ttype t);
uint32_t gguf_type_block_elems(gguf_ttype t);
uint32_t gguf_type_block_bytes(gguf_ttype t);
const char *gguf_vtype_name(gguf_vtype t);
int gguf_type_can_dequantize(gguf_ttype t);

/* f16 (IEEE binary16) -> f32, exact. */
float gguf_f16_to_f32(uint16_t h);

/* Dequantizes n elements (n a multiple of the block size) of type t from src to dst. */
gguf_status gguf_dequantize(gguf_ttype t, const void *src, float *dst, uint64_t n);
/* Rows [row0, row0 + n_rows) of a tensor (a row is ne[0] elements; rows counted over
 * ne[1] * ne[2] * ne[3]) to dst (n_rows * ne[0] floats). */
gguf_status gguf_dequantize_rows(const gguf_tensor *t, uint64_t row0, uint64_t n_rows, float *dst);

/* Dot product of row `row` of w with x (ne[0] floats). Arithmetic (docs/model.md): each block
 * of 32 (F32: of 32 elements too, the tail of a row shorter) is dequantized to f32 exactly as
 * gguf_dequantize does, then w[j] * x[j] is added to lane acc[j % 8] in f32 in element order;
 * the 8 lanes are summed as ((a0+a4)+(a1+a5))+((a2+a6)+(a3+a7)). Types: F32, F16, Q4_0, Q4_1,
 * Q8_0. */
gguf_status gguf_row_dot(const gguf_tensor *w, uint64_t row, const float *x, float *out);
/* y[r] = row r of w . x for every row r (ne[1]*ne[2]*ne[3] rows), over n_threads threads
 * (pthreads; rows split in contiguous ranges; 1 = the calling thread only). Same arithmetic as
 * gguf_row_dot, so the result does not depend on n_threads. */
gguf_status gguf_matvec(const gguf_tensor *w, const float *x, float *y, int n_threads);
/* n_vec products at once (prefill): x holds n_vec vectors of ne[0] floats, y gets n_vec vectors
 * of rows floats (y[v * rows + r] = row r . vector v). Each weight row is dequantized once for
 * all the vectors (AVX2 where the CPU has it, same operations); every product has gguf_matvec's
 * arithmetic, so the results equal n_vec gguf_matvec calls bit for bit. */
gguf_status gguf_matmul(const gguf_tensor *w, const float *x, uint64_t n_vec, float *y, int n_threads);

/* A persistent pool of n_threads - 1 workers (the caller is the n-th) for the forward pass's
 * many small products: no thread creation per call. One caller at a time per pool.
 * gguf_pool_matmul has gguf_matmul's arithmetic and row split, so results are identical. */
typedef struct gguf_pool gguf_pool;
gguf_status gguf_pool_create(int n_threads, gguf_pool **out);
void gguf_pool_destroy(gguf_pool *p);
int gguf_pool_threads(const gguf_pool *p);
gguf_status gguf_pool_matmul(gguf_pool *p, const gguf_tensor *w, const float *x, uint64_t n_vec, float *y);

const char *gguf_status_name(gguf_status s);

#ifdef __cplusplus
}
#endif
#endif
