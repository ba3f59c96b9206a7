/* Communicators: the public API over the internal vtable (comm.h), and the
   exact merge of attention partials across ranks, written once for every
   implementation. */
#include "comm.h"

#include <math.h>
#include <string.h>

pikv_status pikv_comm_allreduce(pikv_comm *c, float *buf, int64_t n, pikv_reduce_op op)
{
    if (n == 0) return PIKV_OK;
    PIKV_FORWARD_IF_ERROR(c->iface->allreduce(c, buf, n, op));
    /* Logical payload: B = 4n bytes sent and B received per rank, independent of
       how the implementation moves them (a ring moves about 2B(size-1)/size each
       way, a tree or an in-process one otherwise). */
    uint64_t bytes = (uint64_t)n * sizeof(float);
    c->bytes_sent += bytes;
    c->bytes_received += bytes;
    c->collectives++;
    return PIKV_OK;
}

pikv_status pikv_comm_create_nccl(pikv_context *ctx, int32_t device, void *nccl_comm,
                                  pikv_comm **out)
{
    if (!ctx) return PIKV_ERR_INVALID_ARGUMENT;
    PIKV_RETURN_ERROR_IF(!out, ctx, PIKV_ERR_INVALID_ARGUMENT, "comm_create_nccl: out is NULL");
    *out = NULL;
    PIKV_RETURN_ERROR_IF(device < 0 || device >= ctx->n_devices, ctx, PIKV_ERR_OUT_OF_RANGE,
                         "comm_create_nccl: device %d is outside 0..%d", device,
                         ctx->n_devices - 1);
    PIKV_RETURN_ERROR_IF(!nccl_comm, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_create_nccl: nccl_comm is NULL");
    pikv_device *dev = ctx->devices[device];
    PIKV_RETURN_ERROR_IF(dev->info.backend != PIKV_BACKEND_CUDA, ctx, PIKV_ERR_UNSUPPORTED,
                         "comm_create_nccl: device %d (%s) is a %s device, not a CUDA device",
                         device, dev->info.name, pikv_backend_name(dev->info.backend));
#ifdef PIKV_HAVE_NCCL
    return pikv_comm_nccl_create(ctx, dev, nccl_comm, out);
#else
    return PIKV_FAIL(ctx, PIKV_ERR_UNSUPPORTED,
                     "comm_create_nccl: this build of PiKV has no NCCL support "
                     "(configure with -DPIKV_CUDA=ON -DPIKV_NCCL=ON)");
#endif
}

void pikv_comm_free(pikv_comm *comm)
{
    if (!comm) return;
    pikv_context *ctx = comm->ctx;
    if (comm->iface && comm->iface->destroy) comm->iface->destroy(comm);
    pikv_host_free(ctx, comm);
}

int32_t pikv_comm_rank(const pikv_comm *comm)
{
    return comm ? comm->rank : -1;
}

int32_t pikv_comm_size(const pikv_comm *comm)
{
    return comm ? comm->size : 0;
}

pikv_status pikv_comm_get_stats(const pikv_comm *comm, pikv_comm_stats *out)
{
    if (!comm) return PIKV_ERR_INVALID_ARGUMENT;
    PIKV_RETURN_ERROR_IF(!out, comm->ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_get_stats: out is NULL");
    memset(out, 0, sizeof *out);
    out->bytes_sent = comm->bytes_sent;
    out->bytes_received = comm->bytes_received;
    out->collectives = comm->collectives;
    return PIKV_OK;
}

/*
 * The exact merge of per-rank partials (flash-decoding across ranks), the same
 * arithmetic as the CPU merge op (backends/cpu/cpu-merge.c) with the sums taken
 * by allreduces:
 *   1. m = allreduce MAX of lse                          (n_rows floats)
 *   2. w = exp(lse - m) (0 for an empty row, or m = -inf); pack
 *      [w * out (n_rows x dim) | w (n_rows)], allreduce SUM  (n_rows (dim + 1) floats)
 *   3. out = sum(w out) * (1 / sum w), lse = m + log(sum w); rows empty on every
 *      rank (m = -inf) get zeros and -inf.
 * Two collectives, n_rows (dim + 2) floats of payload. On a rank whose row is
 * empty (lse = -inf) the row of out is not read, so anything there is ignored;
 * NaN elsewhere propagates. out and lse are written only after both collectives
 * succeeded, so a failure leaves them as they were.
 */
pikv_status pikv_comm_merge_partials(pikv_comm *comm, int32_t n_rows, int32_t dim, float *out,
                                     float *lse)
{
    if (!comm) return PIKV_ERR_INVALID_ARGUMENT;
    pikv_context *ctx = comm->ctx;
    PIKV_RETURN_ERROR_IF(n_rows < 0, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_merge_partials: n_rows = %d is negative", n_rows);
    PIKV_RETURN_ERROR_IF(dim < 1 || dim > 1024, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_merge_partials: dim = %d is outside 1..1024", dim);
    PIKV_RETURN_ERROR_IF(!out, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_merge_partials: out is NULL (n_rows = %d, dim = %d)", n_rows, dim);
    PIKV_RETURN_ERROR_IF(!lse, ctx, PIKV_ERR_INVALID_ARGUMENT,
                         "comm_merge_partials: lse is NULL (n_rows = %d)", n_rows);
    if (n_rows == 0) return PIKV_OK; /* the same on every rank: no collective */

    /* [w * out | w | m]: the first n_rows (dim + 1) floats are reduced, m stays here,
       so out and lse are only written once both collectives succeeded. */
    size_t rows = (size_t)n_rows, d = (size_t)dim, n_pack, bytes;
    if (!pikv_mul_size(rows, d + 1, &n_pack) ||
        !pikv_mul_size(n_pack + rows, sizeof(float), &bytes))
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY,
                         "comm_merge_partials: %d rows of %d floats overflow size_t", n_rows, dim);
    float *pack = pikv_host_alloc(ctx, bytes, 64);
    PIKV_RETURN_ERROR_IF(!pack, ctx, PIKV_ERR_OUT_OF_MEMORY,
                         "comm_merge_partials: host allocation of %zu bytes failed", bytes);
    float *wsum = pack + rows * d, *lmax = wsum + rows;

    memcpy(lmax, lse, rows * sizeof(float));
    pikv_status st = pikv_comm_allreduce(comm, lmax, (int64_t)rows, PIKV_REDUCE_MAX);
    if (st != PIKV_OK) goto done;

    for (size_t r = 0; r < rows; r++) {
        float m = lmax[r], l = lse[r];
        float *p = pack + r * d;
        const float *o = out + r * d;
        float w = 0.0f;
        if (l == -INFINITY || m == -INFINITY) {
            memset(p, 0, d * sizeof(float));
        } else {
            w = expf(l - m);
            for (size_t j = 0; j < d; j++) p[j] = w * o[j];
        }
        wsum[r] = w;
    }
    st = pikv_comm_allreduce(comm, pack, (int64_t)n_pack, PIKV_REDUCE_SUM);
    if (st != PIKV_OK) goto done;

    for (size_t r = 0; r < rows; r++) {
        float m = lmax[r], sum = wsum[r];
        float *o = out + r * d;
        if (m == -INFINITY) { /* empty on every rank */
            memset(o, 0, d * sizeof(float));
            lse[r] = -INFINITY;
            continue;
        }
        const float *p = pack + r * d;
        float inv = 1.0f / sum;
        for (size_t j = 0; j < d; j++) o[j] = p[j] * inv;
        lse[r] = m + logf(sum);
    }

done:
    pikv_host_free(ctx, pack);
    return st;
}
