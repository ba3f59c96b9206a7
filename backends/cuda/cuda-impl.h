/* Private declarations of the CUDA backend (host side, C11).
 *
 * The backend links the CUDA runtime statically (cudart_static), which opens
 * the driver (libcuda.so.1) at run time: a build with CUDA runs on machines
 * without a GPU or driver, whose context then has no CUDA devices.
 *
 * Per device (cuda-backend.c): a compute stream for the ops, a copy stream for
 * buffer writes (host -> device copies overlap the ops, ordered by events), a
 * stream-ordered memory pool (cudaMallocFromPoolAsync) for page chunks and
 * scratch, and pinned host staging for every transfer (cuda-memory.c). Kernels
 * (the .cu files, launched through cuda-kernels.h) address pages directly:
 * the host resolves each slot to chunk base + offset (cuda-ops.c), so one
 * launch covers pages of any number of chunks. Every op has finished when it
 * returns, so the host arrays of its arguments may go away. */
#ifndef PIKV_CUDA_IMPL_H
#define PIKV_CUDA_IMPL_H

#include "../../runtime/backend-impl.h"
#include "cuda-kernels.h"

#include <cuda_runtime_api.h>

typedef struct pikv_cuda_device {
    int ordinal;                 /* CUDA device number */
    cudaStream_t stream;         /* ops */
    cudaStream_t copy_stream;    /* buffer_write uploads */
    cudaEvent_t write_done;      /* the last upload on copy_stream */
    cudaMemPool_t pool;          /* page chunks and scratch */
    int sm_count;
    size_t smem_per_block;       /* opt-in shared memory per block */
    /* pinned staging for op inputs and outputs */
    unsigned char *pinned;
    size_t pinned_size;
    /* pinned staging of buffer_write (async), reusable once write_done fired */
    unsigned char *upload;
    size_t upload_size;
    /* device scratch for op inputs and outputs, grown on demand */
    unsigned char *scratch;
    size_t scratch_size;
    bool failed;                 /* a sticky error: the device is unusable */
    /* benchmarks (bench/): time the attention kernels of each op with events */
    bool timing;
    cudaEvent_t time_begin, time_end;
    float last_attention_ms;     /* kernels only: the "run" without the host "plan" */
} pikv_cuda_device;

static inline pikv_cuda_device *pikv_cuda_dev(pikv_device *dev)
{
    return (pikv_cuda_device *)dev->context;
}

/* The CUDA device number of a context device, or -1 when it is not a CUDA
   device (used by the NCCL communicator). */
int pikv_cuda_device_ordinal(const pikv_device *dev);

/* A failed CUDA call as a status with its message ("device cuda0: what failed:
   name (code): description"); allocation failures are OUT_OF_MEMORY. */
pikv_status pikv_cuda_fail(pikv_device *dev, cudaError_t err, const char *what);
/* In a function with `pikv_device *dev`, `pikv_status st` and a `done:` label: a
   failed CUDA call becomes st (via pikv_cuda_fail) and jumps to done. */
#define CUDA_TRY(expr, what)                                     \
    do {                                                         \
        cudaError_t try_err_ = (expr);                           \
        if (try_err_ != cudaSuccess) {                           \
            st = pikv_cuda_fail(dev, try_err_, what);            \
            goto done;                                           \
        }                                                        \
    } while (0)

/* Makes the device current for this host thread, saving the caller's current
   device in *previous (an engine's own choice must survive calls into PiKV);
   fails on a device lost to a sticky error. pikv_cuda_leave restores it. */
pikv_status pikv_cuda_enter(pikv_device *dev, int *previous);
void pikv_cuda_leave(int previous);

/* ---- memory (cuda-memory.c) ------------------------------------------------- */
pikv_status pikv_cuda_buffer_alloc(pikv_device *dev, uint64_t size, pikv_buffer **out);
void pikv_cuda_buffer_free(pikv_device *dev, pikv_buffer *buf);
pikv_status pikv_cuda_buffer_write(pikv_device *dev, pikv_buffer *buf, uint64_t offset, const void *src,
                                   uint64_t size);
pikv_status pikv_cuda_buffer_read(pikv_device *dev, const pikv_buffer *buf, uint64_t offset, void *dst,
                                  uint64_t size);
pikv_status pikv_cuda_memory_read(pikv_device *dev, const void *src, void *dst_host, uint64_t size);
pikv_status pikv_cuda_memory_write(pikv_device *dev, void *dst, const void *src_host, uint64_t size);
/* At least size bytes of pinned staging (op inputs/outputs) / device scratch;
   earlier contents are lost when they grow. */
pikv_status pikv_cuda_pinned(pikv_device *dev, size_t size, unsigned char **out);
pikv_status pikv_cuda_scratch(pikv_device *dev, size_t size, unsigned char **out);
void pikv_cuda_memory_release(pikv_device *dev);

/* ---- ops (cuda-ops.c) ------------------------------------------------------ */
pikv_status pikv_cuda_append_op(pikv_device *dev, const pikv_append_args *args);
pikv_status pikv_cuda_page_copy_op(pikv_device *dev, const pikv_page_copy_args *args);
pikv_status pikv_cuda_attention_op(pikv_device *dev, const pikv_attention_args *args);
pikv_status pikv_cuda_merge_op(pikv_device *dev, const pikv_merge_args *args);
pikv_status pikv_cuda_score_op(pikv_device *dev, const pikv_score_args *args);
pikv_status pikv_cuda_topk_op(pikv_device *dev, const pikv_topk_args *args);
pikv_status pikv_cuda_quantize_op(pikv_device *dev, pikv_quantize_args *args);
pikv_status pikv_cuda_read_reduce_op(pikv_device *dev, const pikv_read_reduce_args *args);
pikv_status pikv_cuda_find_out_of_range_op(pikv_device *dev, const float *ptr, int64_t n, float limit,
                                           int64_t *first);
void pikv_cuda_layout_from(pikv_cuda_layout *out, const pikv_page_layout *layout);

#endif /* PIKV_CUDA_IMPL_H */
