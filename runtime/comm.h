/*
 * Communicators (internal): the collectives PiKV needs between ranks, behind a
 * small vtable so the merge of attention partials is written once for every
 * implementation (NCCL here, MPI later, an in-process one in the tests).
 *
 * The engine owns its communicator (MPI_Init, ncclCommInitRank...) and hands it
 * to PiKV, which never creates or destroys it. Collectives follow the usual
 * rules: every rank of the communicator calls the same collectives in the same
 * order with the same sizes; a rank that fails before entering one (bad
 * arguments, out of host memory) leaves the others waiting in it, so an engine
 * treats any error of a collective call as fatal for the communicator.
 */
#ifndef PIKV_COMM_H
#define PIKV_COMM_H

#include "backend-impl.h"

typedef enum pikv_reduce_op {
    PIKV_REDUCE_SUM = 0,
    PIKV_REDUCE_MAX = 1
} pikv_reduce_op;

typedef struct pikv_comm_iface {
    /* In-place allreduce of buf[0..n) (HOST memory) over every rank; every rank
       calls it with the same n and op. Finished when it returns. Failures record
       a message in c->ctx. Implementations do not count statistics: callers go
       through pikv_comm_allreduce(), which does. */
    pikv_status (*allreduce)(pikv_comm *c, float *buf, int64_t n, pikv_reduce_op op);
    /* Frees c->impl and what it holds (not the engine's communicator, not c). */
    void (*destroy)(pikv_comm *c);
} pikv_comm_iface;

struct pikv_comm {
    const pikv_comm_iface *iface;
    pikv_context *ctx;           /* errors and host memory */
    int32_t rank, size;
    void *impl;                  /* the implementation's state */
    /* Statistics (pikv_comm_get_stats), counted by pikv_comm_allreduce(). */
    uint64_t bytes_sent, bytes_received;
    int64_t collectives;
};

/* iface->allreduce plus statistics. Payload bytes are counted logically: an
   allreduce of B bytes counts B sent and B received on every rank, whatever
   algorithm (ring, tree, in-process) moves them. n == 0 is no collective. */
pikv_status pikv_comm_allreduce(pikv_comm *c, float *buf, int64_t n, pikv_reduce_op op);

#ifdef PIKV_HAVE_NCCL
/* backends/cuda/cuda-nccl.c: a communicator over the engine's ncclComm_t
   (nccl_comm) for CUDA device dev of the context. *out is freed with
   pikv_comm_free() (which frees the struct itself with the context's host
   allocator after iface->destroy). */
pikv_status pikv_comm_nccl_create(pikv_context *ctx, pikv_device *dev, void *nccl_comm,
                                  pikv_comm **out);
#endif

#endif /* PIKV_COMM_H */
