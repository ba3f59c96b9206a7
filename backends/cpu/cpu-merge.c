/* The exact merge of partial attention outputs (flash-decoding): each part is
   a normalized output o_p with its log-sum-exp l_p; the merged output is
   sum_p exp(l_p - M) o_p / sum_p exp(l_p - M) with M = max_p l_p, and the merged
   log-sum-exp is M + log(sum_p exp(l_p - M)). Empty parts have l_p = -inf. */
#include "cpu-impl.h"

#include <math.h>
#include <string.h>

void pikv_cpu_merge_row(int32_t n_parts, int32_t dim, const float *const *part_out,
                        const float *part_lse, float *out, float *lse)
{
    float m = -INFINITY;
    for (int32_t p = 0; p < n_parts; p++)
        if (part_lse[p] > m) m = part_lse[p];
    memset(out, 0, (size_t)dim * sizeof(float));
    if (m == -INFINITY) { /* every part empty */
        *lse = -INFINITY;
        return;
    }
    float sum = 0.0f;
    for (int32_t p = 0; p < n_parts; p++) {
        if (part_lse[p] == -INFINITY) continue;
        float w = expf(part_lse[p] - m);
        sum += w;
        const float *o = part_out[p];
        for (int32_t d = 0; d < dim; d++) out[d] += w * o[d];
    }
    float inv = 1.0f / sum;
    for (int32_t d = 0; d < dim; d++) out[d] *= inv;
    *lse = m + logf(sum);
}

typedef struct merge_job {
    const pikv_merge_args *args;
} merge_job;

enum { MAX_STACK_PARTS = 64 };

static void merge_task(void *arg, int64_t row, int32_t thread)
{
    (void)thread;
    const pikv_merge_args *a = ((merge_job *)arg)->args;
    const float *outs[MAX_STACK_PARTS];
    float lses[MAX_STACK_PARTS];
    float *out = a->out + (size_t)row * (size_t)a->dim;
    /* Merge in groups of MAX_STACK_PARTS, folding each group's result back in. */
    float acc_lse = -INFINITY;
    int32_t done = 0;
    while (done < a->n_parts) {
        int32_t n = 0;
        if (done > 0) { /* the running result is part 0 of the next group */
            outs[n] = out;
            lses[n++] = acc_lse;
        }
        for (; n < MAX_STACK_PARTS && done < a->n_parts; n++, done++) {
            outs[n] = a->part_out + ((size_t)done * (size_t)a->n_rows + (size_t)row) * (size_t)a->dim;
            lses[n] = a->part_lse[(size_t)done * (size_t)a->n_rows + (size_t)row];
        }
        float tmp[1024];
        pikv_cpu_merge_row(n, a->dim, outs, lses, tmp, &acc_lse);
        memcpy(out, tmp, (size_t)a->dim * sizeof(float));
    }
    if (a->n_parts == 0) {
        memset(out, 0, (size_t)a->dim * sizeof(float));
        acc_lse = -INFINITY;
    }
    if (a->lse) a->lse[row] = acc_lse;
}

pikv_status pikv_cpu_merge(pikv_device *dev, const pikv_merge_args *args)
{
    PIKV_RETURN_ERROR_IF(args->dim < 1 || args->dim > 1024, dev->ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "merge: dim %d is outside 1..1024", args->dim);
    merge_job job = {args};
    pikv_cpu_pool_run(pikv_cpu_device_pool(dev), args->n_rows, merge_task, &job);
    return PIKV_OK;
}
