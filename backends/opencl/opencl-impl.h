/* Private declarations of the OpenCL backend.
 *
 * One cl_context, one in-order queue and one program per device; a pikv_buffer
 * is one cl_mem (pool chunks are ~1 MiB). Ops take host pointers: their inputs
 * are uploaded into per-device scratch buffers (grown, reused), kernels run,
 * outputs are read back, and every op has finished when it returns.
 *
 * Pages live in separate chunk buffers, and a kernel cannot take a variable
 * number of buffers. Design: every op groups its pages by chunk on the host
 * and launches its kernel once per chunk touched (page addresses become byte
 * offsets into that chunk). Attention computes partial softmax states per
 * (list, chunk, run of pages) and a second kernel merges them exactly (log-sum-
 * exp), so a list may span any number of chunks and there is never a launch
 * per page.
 *
 * CPU devices (PoCL) differ where it pays: chunks are sub-buffers of large
 * arenas, so attention and Quest scoring launch once per arena over work items
 * of contiguous runs (opencl-cpu-ops.c, kernels/attention_cpu.cl and
 * select_cpu.cl, built with -DPIKV_OCL_CPU); GPUs keep the work-group kernels. */
#ifndef PIKV_OPENCL_IMPL_H
#define PIKV_OPENCL_IMPL_H

#ifndef CL_TARGET_OPENCL_VERSION
#define CL_TARGET_OPENCL_VERSION 120
#endif
#include <CL/cl.h>

#include "../../runtime/backend-impl.h"

/* Kernels of the embedded program. */
typedef enum pikv_ocl_kernel {
    PIKV_OCL_K_APPEND = 0,
    PIKV_OCL_K_PAGE_COPY,
    PIKV_OCL_K_ATTN_PART,
    PIKV_OCL_K_ATTN_FINISH,
    PIKV_OCL_K_MERGE,
    PIKV_OCL_K_SCORE,
    PIKV_OCL_K_QUANT_KEYS,
    PIKV_OCL_K_QUANT_VALUES,
    PIKV_OCL_K_TOPK,
    PIKV_OCL_K_READ_REDUCE_GPU,
    PIKV_OCL_K_READ_REDUCE_CPU, /* CPU devices only from here on */
    /* CPU devices only (kernels/attention_cpu.cl, built with -DPIKV_OCL_CPU) */
    PIKV_OCL_K_ATTN_CPU64,
    PIKV_OCL_K_ATTN_CPU128,
    PIKV_OCL_K_ATTN_CPU256,
    PIKV_OCL_K_SCORE_CPU,
    PIKV_OCL_K_COUNT_
} pikv_ocl_kernel;

/* Scratch buffers reused by the ops (each grown on demand). */
enum { PIKV_OCL_SCRATCH = 13 };

typedef struct pikv_ocl_scratch_buf {
    cl_mem mem;
    size_t size;
} pikv_ocl_scratch_buf;

/* CPU devices: pool chunks are sub-buffers carved out of a few large arenas
   (opencl-buffers.c), so one kernel launch can reach the pages of many chunks
   through the arena buffer (the CPU attention path). Granules of 4 KiB, a bitmap
   of used ones; an arena is released with its last piece. */
typedef struct pikv_ocl_arena {
    cl_mem mem;
    size_t size;
    size_t n_granules;
    uint64_t *used; /* bitmap of granules */
    int32_t pieces;
    struct pikv_ocl_arena *next;
} pikv_ocl_arena;

/* What buffer_alloc returns: a pikv_buffer (first member, what the runtime
   sees; handle is the cl_mem of this buffer or sub-buffer) and where its bytes
   lie: parent (the arena's buffer, or the buffer itself) at byte offset base. */
typedef struct pikv_ocl_buffer {
    pikv_buffer b;
    cl_mem parent;
    uint64_t base;
    pikv_ocl_arena *arena; /* NULL for a buffer of its own */
} pikv_ocl_buffer;

typedef struct pikv_ocl_device {
    cl_platform_id platform;
    cl_device_id id;
    cl_context cl;
    cl_command_queue queue;
    bool is_cpu;
    bool correct_div;      /* CL_FP_CORRECTLY_ROUNDED_DIVIDE_SQRT */
    cl_ulong local_mem;
    cl_ulong max_alloc;    /* CL_DEVICE_MAX_MEM_ALLOC_SIZE */
    cl_uint base_align;    /* CL_DEVICE_MEM_BASE_ADDR_ALIGN, in bytes */
    size_t max_wg;
    pikv_ocl_arena *arenas;
    uint64_t arena_bytes;  /* sum of the arenas' sizes */
    char dev_name[128];
    char driver[64];
    char platform_version[128];

    /* built on first use (opencl-program.c) */
    bool build_tried;
    pikv_status build_status;
    char build_error[PIKV_ERROR_LEN];
    cl_program program;
    cl_kernel kernels[PIKV_OCL_K_COUNT_];
    size_t attn_wg;        /* work-group size of the attention kernel */

    pikv_ocl_scratch_buf scratch[PIKV_OCL_SCRATCH];
} pikv_ocl_device;

static inline pikv_ocl_device *pikv_ocl_dev(pikv_device *dev)
{
    return (pikv_ocl_device *)dev->context;
}

/* "CL_OUT_OF_RESOURCES" etc. (opencl-backend.c) */
const char *pikv_ocl_error_name(cl_int err);
/* Records "device X: what failed: CL_..." as PIKV_ERR_BACKEND (OUT_OF_MEMORY
   for allocation failures) and returns it. */
pikv_status pikv_ocl_fail(pikv_device *dev, cl_int err, const char *what);

/* Op bodies: a failing OpenCL call or status jumps to the function's `done:` label with
   st set (`dev` and `st` in scope); ARG sets a kernel argument the same way. */
#define CHECK_CL(expr, what)                                     \
    do {                                                         \
        cl_int ck_err_ = (expr);                                 \
        if (ck_err_ != CL_SUCCESS) {                             \
            st = pikv_ocl_fail(dev, ck_err_, what);              \
            goto done;                                           \
        }                                                        \
    } while (0)
#define CHECK_ST(expr)                                           \
    do {                                                         \
        st = (expr);                                             \
        if (st != PIKV_OK) goto done;                            \
    } while (0)
#define ARG(k, i, v) CHECK_CL(clSetKernelArg((k), (i), sizeof(v), &(v)), "clSetKernelArg")

/* The attention's finish step, shared by the work-group and the CPU-device paths
   (opencl-ops.c): merges `units` x group partials, then checks the overflow flag. */
typedef struct pikv_ocl_finish_args {
    cl_int units, group, head_dim, n_q_heads, n_kv_heads;
    cl_mem units_buf, parts, out, lse, err;
} pikv_ocl_finish_args;
pikv_status pikv_ocl_attention_finish(pikv_device *dev, const pikv_ocl_finish_args *f);

/* opencl-buffers.c */
pikv_status pikv_ocl_buffer_alloc(pikv_device *dev, uint64_t size, pikv_buffer **out);
void pikv_ocl_buffer_free(pikv_device *dev, pikv_buffer *buf);
pikv_status pikv_ocl_buffer_write(pikv_device *dev, pikv_buffer *buf, uint64_t offset, const void *src,
                                  uint64_t size);
pikv_status pikv_ocl_buffer_read(pikv_device *dev, const pikv_buffer *buf, uint64_t offset, void *dst,
                                 uint64_t size);
/* Scratch buffer i with at least size bytes (contents not kept on growth). */
pikv_status pikv_ocl_scratch(pikv_device *dev, int i, size_t size, cl_mem *out);
/* Uploads size bytes of host data into scratch buffer i (non-blocking: the
   host data must stay alive until the op finishes, which every op waits for). */
pikv_status pikv_ocl_upload(pikv_device *dev, int i, const void *src, size_t size, cl_mem *out);
void pikv_ocl_scratch_free(pikv_ocl_device *od);
/* Releases the arenas left (every piece should have been freed before). */
void pikv_ocl_arenas_free(pikv_context *ctx, pikv_ocl_device *od);
static inline const pikv_ocl_buffer *pikv_ocl_buf(const pikv_buffer *b)
{
    return (const pikv_ocl_buffer *)b;
}

/* opencl-program.c: builds (or loads from the binary cache) the program and
   creates its kernels, once; later calls return the first outcome. */
pikv_status pikv_ocl_ready(pikv_device *dev);
void pikv_ocl_program_free(pikv_ocl_device *od);

/* opencl-ops.c */
pikv_status pikv_ocl_append(pikv_device *dev, const pikv_append_args *args);
pikv_status pikv_ocl_page_copy(pikv_device *dev, const pikv_page_copy_args *args);
pikv_status pikv_ocl_attention(pikv_device *dev, const pikv_attention_args *args);
pikv_status pikv_ocl_merge(pikv_device *dev, const pikv_merge_args *args);
pikv_status pikv_ocl_score(pikv_device *dev, const pikv_score_args *args);
pikv_status pikv_ocl_quantize(pikv_device *dev, pikv_quantize_args *args);
pikv_status pikv_ocl_topk(pikv_device *dev, const pikv_topk_args *args);

/* opencl-cpu-ops.c: decode attention on CPU devices, one launch per arena
   (kernel: one of PIKV_OCL_K_ATTN_CPU*); false from the check when it does not
   apply (then the generic path runs). */
bool pikv_ocl_attention_cpu_applies(const pikv_ocl_device *od, const pikv_attention_args *args, int *kernel);
pikv_status pikv_ocl_attention_cpu(pikv_device *dev, const pikv_attention_args *args, int kernel);
/* Quest scores on CPU devices (one launch per arena); false when it does not apply. */
bool pikv_ocl_score_cpu_applies(const pikv_ocl_device *od, const pikv_score_args *args);
pikv_status pikv_ocl_score_cpu(pikv_device *dev, const pikv_score_args *args);
/* opencl-ops.c */
pikv_status pikv_ocl_read_reduce(pikv_device *dev, const pikv_read_reduce_args *args);

#endif /* PIKV_OPENCL_IMPL_H */
