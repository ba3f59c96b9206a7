/*
 * comm_merge: the cross-rank merge of attention partials (pikv_comm_merge_partials,
 * runtime/comm.c) and the communicator API, without GPUs, NCCL or MPI.
 *
 * White-box: it builds pikv_comm structs by hand (runtime/comm.h) over a test-only
 * in-process communicator: N ranks are N pthreads, each with its own context (a
 * context is used from one thread at a time), sharing a slot table and a pthread
 * barrier; an allreduce publishes every rank's buffer, rank 0 reduces them in rank
 * order (sum, max or min), and every rank copies the result back. The other
 * collectives (allreduce_i64, allgather, allgatherv, alltoallv) publish their
 * arguments and every rank copies what it needs from the others' buffers. It also
 * checks that every rank called with matching counts and op, as real collectives
 * require.
 *
 * Checks:
 *  - merge vs the CPU merge op (cpu0's iface->merge over the N partials), for
 *    N = 1, 2, 3, 4 ranks and dim = 1, 7, 128: random partials with lse spread over
 *    [-80, 80] (so some ranks' weights underflow to 0), rows empty on some ranks (their
 *    out rows hold NaN, which must be ignored), rows empty on every rank (zeros and
 *    -inf), rows with equal lse everywhere; every rank must hold the same result, bit
 *    for bit;
 *  - statistics: 2 collectives and 4 n_rows (dim + 2) bytes each way per merge, none for
 *    n_rows = 0;
 *  - a failing allreduce (first or second collective) propagates its status and leaves
 *    out and lse unchanged, counting only the collectives that succeeded; the communicator
 *    is then broken: the next merge fails at once without entering a collective;
 *  - the collective wrappers of runtime/comm.h for 1-4 ranks: allreduce (f32 and int64;
 *    SUM, MAX, MIN), allgather, allgatherv (ranks sending nothing with NULL), alltoallv
 *    (uneven counts, zeros, self): results, and the statistics formulas after each call
 *    (nothing to move: no collective, except alltoallv, always one);
 *  - an implementation lacking an entry: UNSUPPORTED naming the collective, the
 *    communicator still usable; bad arguments of every wrapper (INVALID_ARGUMENT naming
 *    the value, nothing entered, not failed); pikv_comm_set_timeout; the failed flag: after
 *    an implementation failure every collective (merge included) fails at once with
 *    PIKV_ERR_BACKEND naming itself and the first failure;
 *  - the non-blocking allreduce (pikv_comm_iallreduce / pikv_comm_wait_request) and the
 *    split merge (pikv_comm_merge_begin / _end), 1-4 ranks, with the blocking fallback
 *    (an implementation without iallreduce: done at post time, no request) and a
 *    deferred implementation (done in the wait): results, statistics counted at post
 *    time, n = 0 and wait(NULL) doing nothing, begin + end bit-identical to the blocking
 *    merge, the timings sane; argument errors, a failing wait breaking the communicator;
 *  - bad inputs: NULL comm/out/lse, n_rows -1, dim 0 and 1025 give INVALID_ARGUMENT
 *    naming the value, with no collective; pikv_comm_create_nccl on a CPU device gives
 *    UNSUPPORTED (with or without NCCL in the build), out-of-range device and NULL
 *    arguments their errors; pikv_comm_create_mpi's NULL arguments, and UNSUPPORTED without
 *    MPI in the build (or "not initialized" with it); pikv_comm_free(NULL), rank/size/stats
 *    of NULL.
 */
#include "test-util.h"

#include "comm.h"

#include <pthread.h>

#define MAX_RANKS 4

/* ------------------------------------------------------------------------ */
/* The in-process communicator                                               */
/* ------------------------------------------------------------------------ */

typedef struct inproc_group {
    int n;
    pthread_barrier_t barrier;
    float *bufs[MAX_RANKS];
    int64_t counts[MAX_RANKS];
    pikv_reduce_op ops[MAX_RANKS];
    float *result;
    int64_t result_cap;
    int mismatch;  /* ranks disagreed on count or op */
    int failed;    /* the collective failed (set by rank 0 for everybody) */
    /* the other collectives: each rank publishes its arguments, everybody reads them */
    struct inproc_slot {
        int kind;
        const void *send;
        void *recv;
        const int64_t *counts, *counts2;
        int64_t n;
        int op;
    } slots[MAX_RANKS];
    int bad[MAX_RANKS]; /* rank r saw inconsistent arguments (written by rank r only) */
} inproc_group;

typedef struct inproc_rank {
    inproc_group *g;
    int rank;
    int calls;
    int fail_call;  /* 1-based call that fails with PIKV_ERR_BACKEND (single rank); 0 = none */
} inproc_rank;

static pikv_status inproc_allreduce(pikv_comm *c, float *buf, int64_t n, pikv_reduce_op op)
{
    inproc_rank *me = (inproc_rank *)c->impl;
    inproc_group *g = me->g;
    me->calls++;
    if (me->fail_call && me->calls == me->fail_call)
        return PIKV_FAIL(c->ctx, PIKV_ERR_BACKEND, "in-process allreduce: injected failure %d",
                         me->calls);
    g->bufs[me->rank] = buf;
    g->counts[me->rank] = n;
    g->ops[me->rank] = op;
    pthread_barrier_wait(&g->barrier);
    if (me->rank == 0) {
        g->failed = 0;
        for (int r = 1; r < g->n; r++)
            if (g->counts[r] != n || g->ops[r] != op) g->failed = g->mismatch = 1;
        if (n > g->result_cap) g->failed = g->mismatch = 1;
        if (!g->failed) {
            memcpy(g->result, g->bufs[0], (size_t)n * sizeof(float));
            for (int r = 1; r < g->n; r++) {
                const float *x = g->bufs[r];
                for (int64_t i = 0; i < n; i++) {
                    if (op == PIKV_REDUCE_SUM)
                        g->result[i] += x[i];
                    else if (op == PIKV_REDUCE_MAX ? x[i] > g->result[i] : x[i] < g->result[i])
                        g->result[i] = x[i];
                }
            }
        }
    }
    pthread_barrier_wait(&g->barrier);
    int failed = g->failed;
    if (!failed) memcpy(buf, g->result, (size_t)n * sizeof(float));
    pthread_barrier_wait(&g->barrier); /* nobody reuses result before everyone copied it */
    return failed ? PIKV_ERR_INTERNAL : PIKV_OK;
}

enum { K_I64 = 1, K_GATHER, K_GATHERV, K_A2A };

/* Publishes this rank's arguments and waits for everybody's; returns whether every
   rank called the same collective (kind, n, op). */
static int inproc_publish(inproc_rank *me, struct inproc_slot s)
{
    inproc_group *g = me->g;
    g->slots[me->rank] = s;
    pthread_barrier_wait(&g->barrier);
    int ok = 1;
    for (int r = 0; r < g->n; r++)
        ok &= g->slots[r].kind == s.kind && g->slots[r].n == s.n && g->slots[r].op == s.op;
    return ok;
}

/* Everybody has read what it needs from the others' buffers. */
static pikv_status inproc_done(pikv_comm *c, inproc_rank *me, int ok)
{
    if (!ok) me->g->bad[me->rank] = 1;
    pthread_barrier_wait(&me->g->barrier);
    return ok ? PIKV_OK
              : PIKV_FAIL(c->ctx, PIKV_ERR_INTERNAL, "in-process collective: inconsistent arguments");
}

static pikv_status inproc_allreduce_i64(pikv_comm *c, int64_t *buf, int64_t n, pikv_reduce_op op)
{
    inproc_rank *me = (inproc_rank *)c->impl;
    inproc_group *g = me->g;
    me->calls++;
    struct inproc_slot s = {K_I64, NULL, buf, NULL, NULL, n, (int)op};
    int ok = inproc_publish(me, s);
    int64_t *tmp = (int64_t *)tu_xmalloc((size_t)n * sizeof(int64_t));
    for (int64_t i = 0; ok && i < n; i++) {
        int64_t v = ((const int64_t *)g->slots[0].recv)[i];
        for (int r = 1; r < g->n; r++) {
            int64_t x = ((const int64_t *)g->slots[r].recv)[i];
            v = op == PIKV_REDUCE_SUM ? v + x : op == PIKV_REDUCE_MAX ? (x > v ? x : v) : (x < v ? x : v);
        }
        tmp[i] = v;
    }
    pikv_status st = inproc_done(c, me, ok);
    if (st == PIKV_OK) memcpy(buf, tmp, (size_t)n * sizeof(int64_t)); /* nobody reads buf now */
    free(tmp);
    return st;
}

static pikv_status inproc_allgather(pikv_comm *c, const void *send, int64_t bytes, void *recv)
{
    inproc_rank *me = (inproc_rank *)c->impl;
    inproc_group *g = me->g;
    me->calls++;
    struct inproc_slot s = {K_GATHER, send, recv, NULL, NULL, bytes, 0};
    int ok = inproc_publish(me, s) && send && recv && bytes > 0;
    for (int r = 0; ok && r < g->n; r++)
        memcpy((unsigned char *)recv + (size_t)r * (size_t)bytes, g->slots[r].send, (size_t)bytes);
    return inproc_done(c, me, ok);
}

static pikv_status inproc_allgatherv(pikv_comm *c, const void *send, const int64_t *counts,
                                     void *recv)
{
    inproc_rank *me = (inproc_rank *)c->impl;
    inproc_group *g = me->g;
    me->calls++;
    struct inproc_slot s = {K_GATHERV, send, recv, counts, NULL, 0, 0};
    int ok = inproc_publish(me, s) && recv;
    size_t at = 0;
    for (int r = 0; ok && r < g->n; r++) {
        /* the same counts everywhere; a NULL send exactly for an empty part */
        ok &= memcmp(g->slots[r].counts, counts, (size_t)g->n * sizeof(int64_t)) == 0;
        ok &= (g->slots[r].send == NULL) == (counts[r] == 0);
        if (ok && counts[r]) memcpy((unsigned char *)recv + at, g->slots[r].send, (size_t)counts[r]);
        at += (size_t)counts[r];
    }
    return inproc_done(c, me, ok);
}

static pikv_status inproc_alltoallv(pikv_comm *c, const void *send, const int64_t *send_counts,
                                    void *recv, const int64_t *recv_counts)
{
    inproc_rank *me = (inproc_rank *)c->impl;
    inproc_group *g = me->g;
    me->calls++;
    struct inproc_slot s = {K_A2A, send, recv, send_counts, recv_counts, 0, 0};
    int ok = inproc_publish(me, s);
    size_t at = 0;
    for (int p = 0; ok && p < g->n; p++) {
        const struct inproc_slot *q = &g->slots[p];
        size_t from = 0;
        for (int r = 0; r < me->rank; r++) from += (size_t)q->counts[r];
        ok &= q->counts[me->rank] == recv_counts[p]; /* what p sends here is what I expect */
        if (ok && recv_counts[p])
            memcpy((unsigned char *)recv + at, (const unsigned char *)q->send + from,
                   (size_t)recv_counts[p]);
        at += (size_t)recv_counts[p];
    }
    return inproc_done(c, me, ok);
}

static void inproc_destroy(pikv_comm *c)
{
    (void)c; /* the test owns everything */
}

static const pikv_comm_iface inproc_iface = {
    .allreduce = inproc_allreduce,
    .destroy = inproc_destroy,
    .allreduce_i64 = inproc_allreduce_i64,
    .allgather = inproc_allgather,
    .allgatherv = inproc_allgatherv,
    .alltoallv = inproc_alltoallv,
    .name = "in-process",
};
/* an implementation with the float allreduce only: the others are UNSUPPORTED */
static const pikv_comm_iface minimal_iface = {.allreduce = inproc_allreduce,
                                              .destroy = inproc_destroy};

static void group_init(inproc_group *g, int n, int64_t cap)
{
    memset(g, 0, sizeof *g);
    g->n = n;
    pthread_barrier_init(&g->barrier, NULL, (unsigned)n);
    g->result = (float *)tu_xmalloc((size_t)cap * sizeof(float));
    g->result_cap = cap;
}

static void group_free(inproc_group *g)
{
    pthread_barrier_destroy(&g->barrier);
    free(g->result);
}

static void comm_init(pikv_comm *c, pikv_context *ctx, inproc_rank *impl, int rank, int size)
{
    pikv_comm_init(c, &inproc_iface, ctx, rank, size, impl);
}

/* ------------------------------------------------------------------------ */
/* Merge against the CPU merge op                                            */
/* ------------------------------------------------------------------------ */

typedef struct rank_job {
    pikv_comm *comm;
    int32_t n_rows, dim;
    float *out, *lse;
    pikv_status st;
} rank_job;

static void *rank_main(void *arg)
{
    rank_job *j = (rank_job *)arg;
    j->st = pikv_comm_merge_partials(j->comm, j->n_rows, j->dim, j->out, j->lse);
    return NULL;
}

static int is_neg_inf(float x) { return isinf(x) && x < 0; }

static pikv_context *g_ctx[MAX_RANKS]; /* one per rank; g_ctx[0] also runs the reference */
static double g_max_err, g_max_lse_err;

static void merge_case(int n_ranks, int32_t dim, int32_t n_rows, uint64_t seed)
{
    tu_set_case("merge: %d ranks, dim %d, %d rows, seed %llu", n_ranks, dim, n_rows,
                (unsigned long long)seed);
    tu_rng rng = tu_rng_seed(seed);
    size_t rd = (size_t)n_rows * (size_t)dim;
    float *part_out = (float *)tu_xmalloc((size_t)n_ranks * rd * sizeof(float));
    float *part_lse = (float *)tu_xmalloc((size_t)n_ranks * (size_t)n_rows * sizeof(float));
    /* Row kinds cycle: 0 random lse in [-80, 80], each rank empty with p = 1/3;
       1 empty on every rank; 2 non-empty on exactly one rank; 3 the same lse on every
       rank; 4 lse alternating near -80 and +80 over the ranks (the low ones weigh
       exp(-160), 0 in f32; kind 0 also draws spreads whose weights are subnormal). */
    for (int32_t row = 0; row < n_rows; row++) {
        int kind = row % 5;
        int only = (int)tu_int(&rng, 0, n_ranks - 1);
        float same = tu_sym(&rng, 80.0f);
        for (int r = 0; r < n_ranks; r++) {
            float *o = part_out + (size_t)r * rd + (size_t)row * dim;
            float l;
            switch (kind) {
            case 0: l = tu_int(&rng, 0, 2) == 0 ? -INFINITY : tu_sym(&rng, 80.0f); break;
            case 1: l = -INFINITY; break;
            case 2: l = r == only ? tu_sym(&rng, 80.0f) : -INFINITY; break;
            case 3: l = same; break;
            default: l = (float)(r % 2) * 160.0f - 80.0f + tu_sym(&rng, 1.0f); break;
            }
            part_lse[(size_t)r * n_rows + row] = l;
            if (is_neg_inf(l)) {
                /* the contract says a zero row; NaN must be ignored just as well */
                for (int32_t d = 0; d < dim; d++) o[d] = (row / 5) % 2 ? NAN : 0.0f;
            } else {
                tu_fill(&rng, o, (size_t)dim, 1.0f);
            }
        }
    }

    /* The reference: the CPU merge op over the N partials. */
    float *ref_out = (float *)tu_xmalloc(rd * sizeof(float) + 1);
    float *ref_lse = (float *)tu_xmalloc((size_t)n_rows * sizeof(float) + 1);
    pikv_device *host = g_ctx[0]->host_device;
    pikv_merge_args ma;
    memset(&ma, 0, sizeof ma);
    ma.n_parts = n_ranks;
    ma.n_rows = n_rows;
    ma.dim = dim;
    ma.part_out = part_out;
    ma.part_lse = part_lse;
    ma.out = ref_out;
    ma.lse = ref_lse;
    tu_err_ctx = g_ctx[0];
    CHECK_OK(host->iface->merge(host, &ma));

    /* The ranks: each merges its own copy in place. */
    inproc_group g;
    group_init(&g, n_ranks, (int64_t)n_rows * (dim + 1));
    inproc_rank impl[MAX_RANKS];
    pikv_comm comm[MAX_RANKS];
    rank_job job[MAX_RANKS];
    pthread_t th[MAX_RANKS];
    for (int r = 0; r < n_ranks; r++) {
        memset(&impl[r], 0, sizeof impl[r]);
        impl[r].g = &g;
        impl[r].rank = r;
        comm_init(&comm[r], g_ctx[r], &impl[r], r, n_ranks);
        job[r].comm = &comm[r];
        job[r].n_rows = n_rows;
        job[r].dim = dim;
        job[r].out = (float *)tu_xmalloc(rd * sizeof(float) + 1);
        job[r].lse = (float *)tu_xmalloc((size_t)n_rows * sizeof(float) + 1);
        memcpy(job[r].out, part_out + (size_t)r * rd, rd * sizeof(float));
        memcpy(job[r].lse, part_lse + (size_t)r * n_rows, (size_t)n_rows * sizeof(float));
        job[r].st = PIKV_ERR_INTERNAL;
    }
    for (int r = 0; r < n_ranks; r++)
        if (pthread_create(&th[r], NULL, rank_main, &job[r]) != 0) {
            fprintf(stderr, "test: pthread_create failed\n");
            exit(2);
        }
    for (int r = 0; r < n_ranks; r++) pthread_join(th[r], NULL);
    CHECK_EQ(g.mismatch, 0);

    for (int r = 0; r < n_ranks; r++) {
        tu_err_ctx = g_ctx[r];
        CHECK_OK(job[r].st);
        if (job[r].st != PIKV_OK) continue;
        /*
         * Bound: 1e-6 of the row's max|ref|. The merge does the CPU op's arithmetic: the
         * same weights expf(l - m), products w * o, sums (here in rank order, as the CPU
         * op sums parts) and multiplication by 1 / sum w, so with this communicator the
         * two agree to the last bit in practice. The bound is the headroom an allreduce
         * with another summation order (NCCL's rings and trees) needs: reordering a sum
         * of at most 4 terms w_r o_r (w_r <= 1 <= sum w) moves it by a few f32 ulps
         * (2^-24 = 6e-8 each) of the largest term, and the data keep that term within a
         * small factor of max|ref|.
         */
        long bad_empty = 0, bad_rows = 0;
        double worst = 0.0, worst_lse = 0.0;
        for (int32_t row = 0; row < n_rows; row++) {
            const float *o = job[r].out + (size_t)row * dim;
            const float *ro = ref_out + (size_t)row * dim;
            float l = job[r].lse[row], rl = ref_lse[row];
            if (is_neg_inf(rl)) {
                int ok = is_neg_inf(l);
                for (int32_t d = 0; d < dim; d++) ok &= o[d] == 0.0f;
                if (!ok) bad_empty++;
                continue;
            }
            double mref = 0.0, mdiff = 0.0;
            for (int32_t d = 0; d < dim; d++) {
                double diff = fabs((double)o[d] - (double)ro[d]);
                if (!(diff <= mdiff)) mdiff = diff; /* NaN sticks */
                if (fabs((double)ro[d]) > mref) mref = fabs((double)ro[d]);
            }
            double err = mref > 0.0 ? mdiff / mref : (mdiff == 0.0 ? 0.0 : INFINITY);
            double lerr = fabs((double)l - (double)rl) / fmax(1.0, fabs((double)rl));
            if (!(err <= 1e-6) || !(lerr <= 1e-6)) {
                if (bad_rows++ == 0)
                    CHECKF(0, "rank %d row %d: out error %.3g, lse %.9g vs reference %.9g", r,
                           row, err, (double)l, (double)rl);
            }
            if (!(err <= worst)) worst = err;
            if (!(lerr <= worst_lse)) worst_lse = lerr;
        }
        CHECK_EQ(bad_rows, 0);
        CHECK_EQ(bad_empty, 0);
        if (!(worst <= g_max_err)) g_max_err = worst;
        if (!(worst_lse <= g_max_lse_err)) g_max_lse_err = worst_lse;
        /* every rank holds the same merge */
        if (r > 0) {
            CHECK(memcmp(job[r].out, job[0].out, rd * sizeof(float)) == 0);
            CHECK(memcmp(job[r].lse, job[0].lse, (size_t)n_rows * sizeof(float)) == 0);
        }
        /* statistics: max of n_rows floats, sum of n_rows (dim + 1) floats */
        pikv_comm_stats s;
        CHECK_OK(pikv_comm_get_stats(&comm[r], &s));
        uint64_t bytes = 4ull * (uint64_t)n_rows * (uint64_t)(dim + 2);
        CHECK_EQ(s.collectives, n_rows > 0 ? 2 : 0);
        CHECK_EQ(s.bytes_sent, n_rows > 0 ? bytes : 0);
        CHECK_EQ(s.bytes_received, n_rows > 0 ? bytes : 0);
        CHECK_EQ(pikv_comm_rank(&comm[r]), r);
        CHECK_EQ(pikv_comm_size(&comm[r]), n_ranks);
    }
    tu_err_ctx = NULL;

    for (int r = 0; r < n_ranks; r++) {
        free(job[r].out);
        free(job[r].lse);
    }
    group_free(&g);
    free(ref_out);
    free(ref_lse);
    free(part_out);
    free(part_lse);
}

/* ------------------------------------------------------------------------ */
/* Failures and bad inputs (one rank, in the main thread)                     */
/* ------------------------------------------------------------------------ */

static void check_error_names(const char *want)
{
    const char *msg = pikv_context_last_error(g_ctx[0]);
    CHECKF(strstr(msg, want) != NULL, "last error \"%s\" does not name \"%s\"", msg, want);
}

static void failing_collectives(void)
{
    const int32_t n_rows = 6, dim = 5;
    for (int fail_call = 1; fail_call <= 2; fail_call++) {
        tu_set_case("allreduce %d of the merge fails", fail_call);
        inproc_group g;
        group_init(&g, 1, n_rows * (dim + 1));
        inproc_rank impl;
        memset(&impl, 0, sizeof impl);
        impl.g = &g;
        impl.fail_call = fail_call;
        pikv_comm c;
        comm_init(&c, g_ctx[0], &impl, 0, 1);
        float out[6 * 5], lse[6], out0[6 * 5], lse0[6];
        tu_rng rng = tu_rng_seed(77 + (uint64_t)fail_call);
        tu_fill(&rng, out, sizeof out / sizeof out[0], 1.0f);
        tu_fill(&rng, lse, 6, 10.0f);
        lse[2] = -INFINITY;
        memcpy(out0, out, sizeof out);
        memcpy(lse0, lse, sizeof lse);
        CHECK_STATUS(PIKV_ERR_BACKEND, pikv_comm_merge_partials(&c, n_rows, dim, out, lse));
        CHECK(memcmp(out, out0, sizeof out) == 0);
        CHECK(memcmp(lse, lse0, sizeof lse) == 0);
        pikv_comm_stats s;
        CHECK_OK(pikv_comm_get_stats(&c, &s));
        CHECK_EQ(s.collectives, fail_call - 1);
        CHECK_EQ(s.bytes_sent, fail_call == 2 ? 4ull * n_rows : 0);
        CHECK_EQ(s.bytes_received, s.bytes_sent);
        /* the communicator is broken: the next merge fails at once, saying why, without
           entering a collective */
        CHECK(c.failed);
        int calls = impl.calls;
        CHECK_STATUS(PIKV_ERR_BACKEND, pikv_comm_merge_partials(&c, n_rows, dim, out, lse));
        check_error_names("broken");
        check_error_names("injected failure");
        CHECK_EQ(impl.calls, calls);
        CHECK(memcmp(out, out0, sizeof out) == 0);
        /* a new communicator merges: one rank merges to itself */
        impl.fail_call = 0;
        comm_init(&c, g_ctx[0], &impl, 0, 1);
        CHECK_OK(pikv_comm_merge_partials(&c, n_rows, dim, out, lse));
        for (int i = 0; i < n_rows; i++) {
            if (i == 2) {
                CHECK(is_neg_inf(lse[i]));
                for (int d = 0; d < dim; d++) CHECK(out[i * dim + d] == 0.0f);
            } else {
                CHECK_LE(fabs((double)lse[i] - (double)lse0[i]), 1e-5);
                for (int d = 0; d < dim; d++)
                    CHECK_LE(fabs((double)out[i * dim + d] - (double)out0[i * dim + d]), 1e-6);
            }
        }
        group_free(&g);
    }
}

static void bad_inputs(void)
{
    tu_set_case("bad inputs");
    pikv_context *ctx = g_ctx[0];
    inproc_group g;
    group_init(&g, 1, 64);
    inproc_rank impl;
    memset(&impl, 0, sizeof impl);
    impl.g = &g;
    pikv_comm c;
    comm_init(&c, ctx, &impl, 0, 1);
    float out[16] = {0}, lse[4] = {0, 0, 0, 0};

    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_merge_partials(NULL, 4, 4, out, lse));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_merge_partials(&c, 4, 4, NULL, lse));
    check_error_names("out is NULL");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_merge_partials(&c, 4, 4, out, NULL));
    check_error_names("lse is NULL");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_merge_partials(&c, 4, 0, out, lse));
    check_error_names("dim = 0");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_merge_partials(&c, 4, 1025, out, lse));
    check_error_names("dim = 1025");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_merge_partials(&c, -1, 4, out, lse));
    check_error_names("n_rows = -1");
    CHECK_EQ(impl.calls, 0); /* no collective was entered */
    /* n_rows = 0: nothing to do, no collective, on every rank alike */
    CHECK_OK(pikv_comm_merge_partials(&c, 0, 4, out, lse));
    CHECK_EQ(impl.calls, 0);
    pikv_comm_stats s;
    memset(&s, 0xab, sizeof s);
    CHECK_OK(pikv_comm_get_stats(&c, &s));
    CHECK_EQ(s.collectives, 0);
    CHECK_EQ(s.bytes_sent, 0);
    CHECK_EQ(s.bytes_received, 0);
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_get_stats(&c, NULL));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_get_stats(NULL, &s));

    /* NULL handles */
    pikv_comm_free(NULL);
    CHECK_EQ(pikv_comm_rank(NULL), -1);
    CHECK_EQ(pikv_comm_size(NULL), 0);

    /* NCCL over a CPU device: unsupported, whether or not the build has NCCL */
    int dummy = 0; /* never dereferenced: the device is rejected first */
    pikv_comm *nc = (pikv_comm *)&dummy;
    CHECK_STATUS(PIKV_ERR_UNSUPPORTED, pikv_comm_create_nccl(ctx, 0, &dummy, &nc));
    CHECK(nc == NULL);
    check_error_names("CUDA");
    nc = (pikv_comm *)&dummy;
    CHECK_STATUS(PIKV_ERR_OUT_OF_RANGE, pikv_comm_create_nccl(ctx, -1, &dummy, &nc));
    CHECK(nc == NULL);
    check_error_names("device -1");
    CHECK_STATUS(PIKV_ERR_OUT_OF_RANGE,
                 pikv_comm_create_nccl(ctx, pikv_device_count(ctx), &dummy, &nc));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_create_nccl(ctx, 0, NULL, &nc));
    check_error_names("nccl_comm is NULL");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_create_nccl(ctx, 0, &dummy, NULL));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_create_nccl(NULL, 0, &dummy, &nc));

    /* MPI: argument checks in every build; without MPI in the build UNSUPPORTED, with it
       (MPI is not initialized in this program) INVALID_ARGUMENT saying so */
    nc = (pikv_comm *)&dummy;
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_create_mpi(ctx, NULL, &nc));
    CHECK(nc == NULL);
    check_error_names("mpi_comm is NULL");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_create_mpi(ctx, &dummy, NULL));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_create_mpi(NULL, &dummy, &nc));
    pikv_status mst = pikv_comm_create_mpi(ctx, &dummy, &nc);
    CHECK(nc == NULL);
    if (mst == PIKV_ERR_UNSUPPORTED)
        check_error_names("no MPI support");
    else {
        CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, mst);
        check_error_names("MPI is not initialized");
    }
    group_free(&g);
}

/* ------------------------------------------------------------------------ */
/* The other collectives, through the wrappers: results and statistics        */
/* ------------------------------------------------------------------------ */

enum { N_STEPS = 12 };

typedef struct coll_job {
    pikv_comm *comm;
    int rank, size;
    pikv_status st[N_STEPS];
    long wrong[N_STEPS];          /* elements that differ from the expected result */
    pikv_comm_stats stats[N_STEPS + 1]; /* before step 0, after each step */
} coll_job;

static float cf_value(int r, int i) { return (float)(r * 10 + i) * (i % 2 ? -1.0f : 1.0f); }
static int64_t ci_value(int r, int i)
{
    return (int64_t)(r + 1) * 3000000000LL * (i % 2 ? -1 : 1) + i;
}
static unsigned char cb_value(int src, int dst, int i) { return (unsigned char)(src * 40 + dst * 7 + i); }
static int64_t gv_count(int r) { return r % 2 ? 0 : r + 3; }
static int64_t a2a_count(int s, int d) { return (s + 2 * d) % 3; }

static void *coll_main(void *arg)
{
    coll_job *j = (coll_job *)arg;
    pikv_comm *c = j->comm;
    const int me = j->rank, n = j->size;
    static const pikv_reduce_op ops[3] = {PIKV_REDUCE_SUM, PIKV_REDUCE_MAX, PIKV_REDUCE_MIN};
    int k = 0;
    pikv_comm_get_stats(c, &j->stats[0]);
    for (int o = 0; o < 3; o++, k++) { /* steps 0-2: f32 allreduces */
        float buf[5];
        for (int i = 0; i < 5; i++) buf[i] = cf_value(me, i);
        j->st[k] = pikv_comm_allreduce(c, buf, 5, ops[o]);
        for (int i = 0; i < 5; i++) {
            float w = cf_value(0, i);
            for (int r = 1; r < n; r++) {
                float x = cf_value(r, i);
                w = o == 0 ? w + x : o == 1 ? (x > w ? x : w) : (x < w ? x : w);
            }
            j->wrong[k] += buf[i] != w;
        }
        pikv_comm_get_stats(c, &j->stats[k + 1]);
    }
    for (int o = 0; o < 3; o++, k++) { /* steps 3-5: int64 allreduces */
        int64_t buf[3];
        for (int i = 0; i < 3; i++) buf[i] = ci_value(me, i);
        j->st[k] = pikv_comm_allreduce_i64(c, buf, 3, ops[o]);
        for (int i = 0; i < 3; i++) {
            int64_t w = ci_value(0, i);
            for (int r = 1; r < n; r++) {
                int64_t x = ci_value(r, i);
                w = o == 0 ? w + x : o == 1 ? (x > w ? x : w) : (x < w ? x : w);
            }
            j->wrong[k] += buf[i] != w;
        }
        pikv_comm_get_stats(c, &j->stats[k + 1]);
    }
    { /* step 6: allgather of 6 bytes */
        unsigned char send[6], recv[6 * MAX_RANKS];
        for (int i = 0; i < 6; i++) send[i] = cb_value(me, 0, i);
        j->st[k] = pikv_comm_allgather(c, send, 6, recv);
        for (int r = 0; r < n; r++)
            for (int i = 0; i < 6; i++) j->wrong[k] += recv[r * 6 + i] != cb_value(r, 0, i);
        pikv_comm_get_stats(c, &j->stats[++k]);
    }
    { /* step 7: allgatherv, odd ranks send nothing (and pass NULL) */
        int64_t counts[MAX_RANKS];
        unsigned char send[8], recv[64];
        for (int r = 0; r < n; r++) counts[r] = gv_count(r);
        for (int i = 0; i < gv_count(me); i++) send[i] = cb_value(me, 1, i);
        j->st[k] = pikv_comm_allgatherv(c, gv_count(me) ? send : NULL, counts, recv);
        int at = 0;
        for (int r = 0; r < n; r++)
            for (int i = 0; i < gv_count(r); i++) j->wrong[k] += recv[at++] != cb_value(r, 1, i);
        pikv_comm_get_stats(c, &j->stats[++k]);
    }
    { /* step 8: alltoallv with uneven counts (zeros, self included) */
        int64_t sc[MAX_RANKS], rc[MAX_RANKS];
        unsigned char send[16], recv[16];
        int at = 0;
        for (int p = 0; p < n; p++) {
            sc[p] = a2a_count(me, p);
            rc[p] = a2a_count(p, me);
            for (int i = 0; i < sc[p]; i++) send[at++] = cb_value(me, p, i);
        }
        j->st[k] = pikv_comm_alltoallv(c, send, sc, recv, rc);
        at = 0;
        for (int p = 0; p < n; p++)
            for (int i = 0; i < rc[p]; i++) j->wrong[k] += recv[at++] != cb_value(p, me, i);
        pikv_comm_get_stats(c, &j->stats[++k]);
    }
    { /* step 9: nothing to move on any rank: no collective */
        int64_t zero[MAX_RANKS] = {0};
        pikv_status st = pikv_comm_allreduce(c, NULL, 0, PIKV_REDUCE_SUM);
        if (st == PIKV_OK) st = pikv_comm_allreduce_i64(c, NULL, 0, PIKV_REDUCE_MAX);
        if (st == PIKV_OK) st = pikv_comm_allgather(c, NULL, 0, NULL);
        if (st == PIKV_OK) st = pikv_comm_allgatherv(c, NULL, zero, NULL);
        j->st[k] = st;
        pikv_comm_get_stats(c, &j->stats[++k]);
    }
    { /* step 10: an alltoallv sending nothing is still one collective */
        int64_t zero[MAX_RANKS] = {0};
        j->st[k] = pikv_comm_alltoallv(c, NULL, zero, NULL, zero);
        pikv_comm_get_stats(c, &j->stats[++k]);
    }
    { /* step 11: a larger allgather (bytes from every rank) */
        unsigned char send[1000], recv[1000 * MAX_RANKS];
        for (int i = 0; i < 1000; i++) send[i] = cb_value(me, 2, i);
        j->st[k] = pikv_comm_allgather(c, send, 1000, recv);
        for (int r = 0; r < n; r++)
            for (int i = 0; i < 1000; i++) j->wrong[k] += recv[r * 1000 + i] != cb_value(r, 2, i);
        pikv_comm_get_stats(c, &j->stats[++k]);
    }
    return NULL;
}

static void collectives_case(int n_ranks)
{
    tu_set_case("collectives: %d ranks", n_ranks);
    inproc_group g;
    group_init(&g, n_ranks, 64);
    inproc_rank impl[MAX_RANKS];
    pikv_comm comm[MAX_RANKS];
    coll_job job[MAX_RANKS];
    pthread_t th[MAX_RANKS];
    for (int r = 0; r < n_ranks; r++) {
        memset(&impl[r], 0, sizeof impl[r]);
        impl[r].g = &g;
        impl[r].rank = r;
        comm_init(&comm[r], g_ctx[r], &impl[r], r, n_ranks);
        memset(&job[r], 0, sizeof job[r]);
        job[r].comm = &comm[r];
        job[r].rank = r;
        job[r].size = n_ranks;
    }
    for (int r = 0; r < n_ranks; r++)
        if (pthread_create(&th[r], NULL, coll_main, &job[r]) != 0) {
            fprintf(stderr, "test: pthread_create failed\n");
            exit(2);
        }
    for (int r = 0; r < n_ranks; r++) pthread_join(th[r], NULL);
    for (int r = 0; r < n_ranks; r++) {
        CHECK_EQ(g.bad[r], 0);
        tu_err_ctx = g_ctx[r];
        /* the statistics formulas of runtime/comm.h, step by step */
        uint64_t gv_others = 0, a2a_sent = 0, a2a_recv = 0;
        for (int p = 0; p < n_ranks; p++)
            if (p != r) {
                gv_others += (uint64_t)gv_count(p);
                a2a_sent += (uint64_t)a2a_count(r, p);
                a2a_recv += (uint64_t)a2a_count(p, r);
            }
        const uint64_t others = (uint64_t)(n_ranks - 1);
        const uint64_t want_sent[N_STEPS] = {20, 20, 20, 24, 24, 24, 6 * others,
                                             (uint64_t)gv_count(r) * others, a2a_sent, 0, 0,
                                             1000 * others};
        const uint64_t want_recv[N_STEPS] = {20, 20, 20, 24, 24, 24, 6 * others, gv_others,
                                             a2a_recv, 0, 0, 1000 * others};
        const int64_t want_coll[N_STEPS] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 1, 1};
        for (int k = 0; k < N_STEPS; k++) {
            const pikv_comm_stats *a = &job[r].stats[k], *b = &job[r].stats[k + 1];
            CHECKF(job[r].st[k] == PIKV_OK, "rank %d step %d: %s", r, k,
                   pikv_status_name(job[r].st[k]));
            CHECKF(job[r].wrong[k] == 0, "rank %d step %d: %ld wrong elements", r, k,
                   job[r].wrong[k]);
            CHECKF(b->bytes_sent - a->bytes_sent == want_sent[k],
                   "rank %d step %d: sent +%llu, want +%llu", r, k,
                   (unsigned long long)(b->bytes_sent - a->bytes_sent),
                   (unsigned long long)want_sent[k]);
            CHECKF(b->bytes_received - a->bytes_received == want_recv[k],
                   "rank %d step %d: received +%llu, want +%llu", r, k,
                   (unsigned long long)(b->bytes_received - a->bytes_received),
                   (unsigned long long)want_recv[k]);
            CHECKF(b->collectives - a->collectives == want_coll[k],
                   "rank %d step %d: %lld collectives, want %lld", r, k,
                   (long long)(b->collectives - a->collectives), (long long)want_coll[k]);
        }
        CHECK(!comm[r].failed);
    }
    tu_err_ctx = NULL;
    group_free(&g);
}

/* Entries the implementation lacks, the failed flag, timeouts, bad collective inputs */
static void comm_state(void)
{
    pikv_context *ctx = g_ctx[0];
    inproc_group g;
    group_init(&g, 1, 64);
    inproc_rank impl;
    memset(&impl, 0, sizeof impl);
    impl.g = &g;
    pikv_comm c;
    int64_t one[1] = {4}, i64[2] = {1, 2};
    unsigned char a[8] = {1, 2, 3, 4, 5, 6, 7, 8}, b[8];
    float f[2] = {1, 2};
    tu_err_ctx = ctx;

    tu_set_case("an implementation without the collectives");
    pikv_comm_init(&c, &minimal_iface, ctx, 0, 1, &impl);
    CHECK(c.timeout_s == 300.0);
    CHECK_STATUS(PIKV_ERR_UNSUPPORTED, pikv_comm_allreduce_i64(&c, i64, 2, PIKV_REDUCE_SUM));
    check_error_names("does not implement allreduce_i64");
    CHECK_STATUS(PIKV_ERR_UNSUPPORTED, pikv_comm_allgather(&c, a, 4, b));
    check_error_names("does not implement allgather");
    CHECK_STATUS(PIKV_ERR_UNSUPPORTED, pikv_comm_allgatherv(&c, a, one, b));
    check_error_names("does not implement allgatherv");
    CHECK_STATUS(PIKV_ERR_UNSUPPORTED, pikv_comm_alltoallv(&c, a, one, b, one));
    check_error_names("does not implement alltoallv");
    CHECK_EQ(impl.calls, 0);
    CHECK(!c.failed); /* found alike on every rank: the communicator still works */
    CHECK_OK(pikv_comm_allreduce(&c, f, 2, PIKV_REDUCE_MIN));
    CHECK(f[0] == 1.0f && f[1] == 2.0f);

    tu_set_case("bad collective arguments");
    comm_init(&c, ctx, &impl, 0, 1);
    impl.calls = 0;
    int64_t neg[1] = {-2}, big[1] = {INT64_MAX};
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_allreduce(&c, NULL, 2, PIKV_REDUCE_SUM));
    check_error_names("buf is NULL");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_allreduce(&c, f, -1, PIKV_REDUCE_SUM));
    check_error_names("n = -1");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_allreduce_i64(&c, i64, 2, (pikv_reduce_op)3));
    check_error_names("op = 3");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_allgather(&c, a, -1, b));
    check_error_names("bytes = -1");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_allgather(&c, a, 4, NULL));
    check_error_names("recv is NULL");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_allgather(&c, a, 4, a + 2));
    check_error_names("overlaps");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_allgatherv(&c, a, NULL, b));
    check_error_names("counts is NULL");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_allgatherv(&c, a, neg, b));
    check_error_names("counts[0] = -2 is negative");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_allgatherv(&c, NULL, one, b));
    check_error_names("send is NULL");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_alltoallv(&c, a, one, b, neg));
    check_error_names("recv_counts[0] = -2");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_alltoallv(&c, a, big, b, big));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_alltoallv(&c, a, one, b, i64));
    check_error_names("differs from recv_counts");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_alltoallv(&c, a, one, NULL, one));
    check_error_names("recv is NULL");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_alltoallv(&c, a, one, a + 1, one));
    check_error_names("overlaps");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_allreduce(NULL, f, 2, PIKV_REDUCE_SUM));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_allgather(NULL, a, 2, b));
    CHECK_EQ(impl.calls, 0);
    CHECK(!c.failed);
    pikv_comm_stats s;
    CHECK_OK(pikv_comm_get_stats(&c, &s));
    CHECK_EQ(s.collectives, 0);
    /* one rank: the collectives copy, alltoallv to itself */
    CHECK_OK(pikv_comm_alltoallv(&c, a, one, b, one));
    CHECK(memcmp(a, b, 4) == 0);
    CHECK_OK(pikv_comm_get_stats(&c, &s));
    CHECK_EQ(s.collectives, 1);
    CHECK_EQ(s.bytes_sent, 0); /* to itself: not counted */

    tu_set_case("set_timeout");
    CHECK_OK(pikv_comm_set_timeout(&c, 0.0));
    CHECK(c.timeout_s == 0.0);
    CHECK_OK(pikv_comm_set_timeout(&c, 2.5));
    CHECK(c.timeout_s == 2.5);
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_set_timeout(&c, -0.5));
    check_error_names("seconds = -0.5");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_set_timeout(&c, NAN));
    check_error_names("seconds = nan");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_set_timeout(&c, -INFINITY));
    check_error_names("seconds = -inf");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_set_timeout(NULL, 1.0));
    CHECK(c.timeout_s == 2.5);

    tu_set_case("the failed flag");
    comm_init(&c, ctx, &impl, 0, 1);
    impl.calls = 0;
    impl.fail_call = 2;
    CHECK_OK(pikv_comm_allreduce(&c, f, 2, PIKV_REDUCE_SUM));
    CHECK_STATUS(PIKV_ERR_BACKEND, pikv_comm_allreduce(&c, f, 2, PIKV_REDUCE_SUM));
    check_error_names("injected failure 2");
    CHECK(c.failed);
    CHECK(strstr(c.failure, "allreduce") && strstr(c.failure, "injected failure 2"));
    impl.fail_call = 0;
    int calls = impl.calls;
    /* every later collective fails at once, naming itself and the first failure;
       even one with nothing to move, and bad arguments are not looked at */
    CHECK_STATUS(PIKV_ERR_BACKEND, pikv_comm_allreduce(&c, f, 2, PIKV_REDUCE_SUM));
    check_error_names("comm_allreduce: the in-process communicator (rank 0 of 1) is broken");
    check_error_names("an earlier allreduce failed with PIKV_ERR_BACKEND: in-process allreduce: "
                      "injected failure 2");
    CHECK_STATUS(PIKV_ERR_BACKEND, pikv_comm_allreduce(&c, f, 0, PIKV_REDUCE_SUM));
    CHECK_STATUS(PIKV_ERR_BACKEND, pikv_comm_allreduce_i64(&c, i64, 2, PIKV_REDUCE_SUM));
    check_error_names("comm_allreduce_i64");
    CHECK_STATUS(PIKV_ERR_BACKEND, pikv_comm_allgather(&c, a, -1, b));
    check_error_names("comm_allgather:");
    CHECK_STATUS(PIKV_ERR_BACKEND, pikv_comm_allgatherv(&c, a, one, b));
    check_error_names("comm_allgatherv");
    CHECK_STATUS(PIKV_ERR_BACKEND, pikv_comm_alltoallv(&c, a, one, b, one));
    check_error_names("comm_alltoallv");
    float out[4] = {0}, lse[1] = {0};
    CHECK_STATUS(PIKV_ERR_BACKEND, pikv_comm_merge_partials(&c, 1, 4, out, lse));
    check_error_names("comm_merge_partials");
    CHECK_STATUS(PIKV_ERR_BACKEND, pikv_comm_merge_partials(&c, 0, 4, out, lse));
    CHECK_STATUS(PIKV_ERR_BACKEND, pikv_comm_merge_partials(&c, 1, 0, out, lse));
    CHECK_EQ(impl.calls, calls);
    CHECK_OK(pikv_comm_get_stats(&c, &s)); /* statistics still readable: the first one */
    CHECK_EQ(s.collectives, 1);
    CHECK_EQ(s.bytes_sent, 8);
    /* set_timeout does not repair it */
    CHECK_OK(pikv_comm_set_timeout(&c, 10.0));
    CHECK_STATUS(PIKV_ERR_BACKEND, pikv_comm_allreduce(&c, f, 2, PIKV_REDUCE_SUM));

    tu_err_ctx = NULL;
    group_free(&g);
}

/* ------------------------------------------------------------------------ */
/* Non-blocking allreduce and the split merge                                */
/* ------------------------------------------------------------------------ */

/* A deferred implementation of iallreduce/wait over the in-process allreduce: the post
   records the call, the wait runs it (so the wrappers' non-blocking path is exercised
   without MPI). */
typedef struct deferred {
    float *buf;
    int64_t n;
    pikv_reduce_op op;
} deferred;

static pikv_status inproc_iallreduce(pikv_comm *c, float *buf, int64_t n, pikv_reduce_op op, void **handle)
{
    deferred *d = (deferred *)malloc(sizeof *d);
    if (!d) return PIKV_FAIL(c->ctx, PIKV_ERR_OUT_OF_MEMORY, "in-process iallreduce: no memory");
    d->buf = buf;
    d->n = n;
    d->op = op;
    *handle = d;
    return PIKV_OK;
}

static pikv_status inproc_wait(pikv_comm *c, void *handle)
{
    deferred *d = (deferred *)handle;
    pikv_status st = inproc_allreduce(c, d->buf, d->n, d->op);
    free(d);
    return st == PIKV_OK ? PIKV_OK : PIKV_FAIL(c->ctx, st, "in-process wait: the allreduce failed");
}

static const pikv_comm_iface deferred_iface = {
    .allreduce = inproc_allreduce,
    .destroy = inproc_destroy,
    .allreduce_i64 = inproc_allreduce_i64,
    .allgather = inproc_allgather,
    .allgatherv = inproc_allgatherv,
    .alltoallv = inproc_alltoallv,
    .name = "deferred",
    .iallreduce = inproc_iallreduce,
    .wait = inproc_wait,
};

typedef struct nb_job {
    pikv_comm *comm;
    int rank, size, deferred;
    int32_t n_rows, dim;
    float *out, *lse, *out2, *lse2;  /* the same partials: merged blocking / begin + end */
    int wrong_post, wrong_wait, wrong_merge;
    pikv_status st[6];
    pikv_comm_stats stats[4];
    int null_req;
} nb_job;

static void *nb_main(void *arg)
{
    nb_job *j = (nb_job *)arg;
    pikv_comm *c = j->comm;
    float buf[6], want[6];
    for (int i = 0; i < 6; i++) {
        buf[i] = cf_value(j->rank, i);
        want[i] = 0.0f;
        for (int r = 0; r < j->size; r++) want[i] += cf_value(r, i);
    }
    pikv_comm_get_stats(c, &j->stats[0]);
    pikv_comm_request *req = NULL;
    j->st[0] = pikv_comm_iallreduce(c, buf, 6, PIKV_REDUCE_SUM, &req);
    pikv_comm_get_stats(c, &j->stats[1]); /* counted at post time */
    /* the fallback has finished at post time; the deferred one only after the wait */
    for (int i = 0; i < 6; i++) j->wrong_post += j->deferred ? buf[i] != cf_value(j->rank, i) : buf[i] != want[i];
    j->null_req = req == NULL;
    j->st[1] = pikv_comm_wait_request(c, req);
    for (int i = 0; i < 6; i++) j->wrong_wait += buf[i] != want[i];
    /* nothing to move: no request, no collective */
    pikv_comm_request *none = (pikv_comm_request *)buf;
    j->st[2] = pikv_comm_iallreduce(c, NULL, 0, PIKV_REDUCE_SUM, &none);
    if (none) j->wrong_post++;
    j->st[3] = pikv_comm_wait_request(c, NULL);
    pikv_comm_get_stats(c, &j->stats[2]);
    /* merge: blocking, and begin + end, bit for bit */
    j->st[4] = pikv_comm_merge_partials(c, j->n_rows, j->dim, j->out, j->lse);
    pikv_comm_merge *m = NULL;
    j->st[5] = pikv_comm_merge_begin(c, j->n_rows, j->dim, j->out2, j->lse2, &m);
    double exposed = -1.0, posted = -1.0;
    pikv_status st = pikv_comm_merge_end_timed(c, m, &exposed, &posted);
    if (j->st[5] == PIKV_OK) j->st[5] = st;
    if (!(exposed >= 0.0 && exposed <= posted)) j->wrong_merge++;
    pikv_comm_get_stats(c, &j->stats[3]);
    const size_t n_out = (size_t)j->n_rows * (size_t)j->dim;
    j->wrong_merge += memcmp(j->out, j->out2, n_out * sizeof(float)) != 0;
    j->wrong_merge += memcmp(j->lse, j->lse2, (size_t)j->n_rows * sizeof(float)) != 0;
    return NULL;
}

static void nonblocking_case(int n_ranks, int use_deferred)
{
    tu_set_case("non-blocking: %d ranks, %s", n_ranks, use_deferred ? "deferred implementation" : "blocking fallback");
    inproc_group g;
    group_init(&g, n_ranks, 4096);
    inproc_rank impl[MAX_RANKS];
    pikv_comm comm[MAX_RANKS];
    nb_job job[MAX_RANKS];
    pthread_t th[MAX_RANKS];
    const int32_t n_rows = 5, dim = 7;
    tu_rng r = tu_rng_seed(77 + (uint64_t)n_ranks);
    for (int k = 0; k < n_ranks; k++) {
        memset(&impl[k], 0, sizeof impl[k]);
        impl[k].g = &g;
        impl[k].rank = k;
        pikv_comm_init(&comm[k], use_deferred ? &deferred_iface : &inproc_iface, g_ctx[k], k, n_ranks, &impl[k]);
        memset(&job[k], 0, sizeof job[k]);
        job[k].comm = &comm[k];
        job[k].rank = k;
        job[k].size = n_ranks;
        job[k].deferred = use_deferred;
        job[k].n_rows = n_rows;
        job[k].dim = dim;
        job[k].out = tu_xmalloc((size_t)n_rows * dim * sizeof(float));
        job[k].out2 = tu_xmalloc((size_t)n_rows * dim * sizeof(float));
        job[k].lse = tu_xmalloc((size_t)n_rows * sizeof(float));
        job[k].lse2 = tu_xmalloc((size_t)n_rows * sizeof(float));
        tu_fill(&r, job[k].out, (size_t)n_rows * dim, 1.0f);
        for (int i = 0; i < n_rows; i++) job[k].lse[i] = (float)tu_unif(&r) * 4.0f - 2.0f;
        if (k == 1) job[k].lse[2] = -INFINITY; /* an empty row here */
        memcpy(job[k].out2, job[k].out, (size_t)n_rows * dim * sizeof(float));
        memcpy(job[k].lse2, job[k].lse, (size_t)n_rows * sizeof(float));
    }
    for (int k = 0; k < n_ranks; k++) pthread_create(&th[k], NULL, nb_main, &job[k]);
    for (int k = 0; k < n_ranks; k++) pthread_join(th[k], NULL);
    for (int k = 0; k < n_ranks; k++) {
        nb_job *j = &job[k];
        for (int i = 0; i < 6; i++) CHECKF(j->st[i] == PIKV_OK, "rank %d step %d: %s", k, i, pikv_status_name(j->st[i]));
        CHECK_EQ(j->wrong_post, 0);
        CHECK_EQ(j->wrong_wait, 0);
        CHECK_EQ(j->wrong_merge, 0);
        CHECK_EQ(j->null_req, !use_deferred); /* the fallback posts nothing to wait for */
        CHECK_EQ(j->stats[1].collectives - j->stats[0].collectives, 1);
        CHECK_EQ(j->stats[1].bytes_sent - j->stats[0].bytes_sent, 24);
        CHECK_EQ(j->stats[1].bytes_received - j->stats[0].bytes_received, 24);
        CHECK_EQ(j->stats[2].collectives, j->stats[1].collectives); /* n = 0, wait(NULL): nothing */
        /* two merges of 2 collectives and 4 n_rows (dim + 2) bytes each */
        CHECK_EQ(j->stats[3].collectives - j->stats[2].collectives, 4);
        CHECK_EQ(j->stats[3].bytes_sent - j->stats[2].bytes_sent, 2 * 4 * (uint64_t)n_rows * (uint64_t)(dim + 2));
        CHECK(!comm[k].failed);
        free(j->out);
        free(j->out2);
        free(j->lse);
        free(j->lse2);
    }
    CHECK(!g.mismatch);
    group_free(&g);
}

/* Single rank: argument errors, a broken communicator, a failing wait. */
static void nonblocking_state(void)
{
    pikv_context *ctx = g_ctx[0];
    tu_err_ctx = ctx;
    tu_set_case("non-blocking: arguments and failures");
    inproc_group g;
    group_init(&g, 1, 64);
    inproc_rank impl;
    memset(&impl, 0, sizeof impl);
    impl.g = &g;
    pikv_comm c;
    pikv_comm_init(&c, &deferred_iface, ctx, 0, 1, &impl);
    float f[2] = {1, 2};
    pikv_comm_request *req = (pikv_comm_request *)f;
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_iallreduce(NULL, f, 2, PIKV_REDUCE_SUM, &req));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_iallreduce(&c, f, 2, PIKV_REDUCE_SUM, NULL));
    check_error_names("req is NULL");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_iallreduce(&c, NULL, 2, PIKV_REDUCE_SUM, &req));
    check_error_names("buf is NULL");
    CHECK(req == NULL);
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_iallreduce(&c, f, -1, PIKV_REDUCE_SUM, &req));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_iallreduce(&c, f, 2, (pikv_reduce_op)9, &req));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_wait_request(NULL, NULL));
    pikv_comm_merge *m = (pikv_comm_merge *)f;
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_merge_begin(&c, 1, 0, f, f, &m));
    CHECK(m == NULL);
    CHECK_OK(pikv_comm_merge_end(&c, NULL));
    CHECK_EQ(impl.calls, 0);
    CHECK(!c.failed);
    /* a wait whose collective fails: the communicator is broken, the request freed */
    impl.fail_call = 1;
    CHECK_OK(pikv_comm_iallreduce(&c, f, 2, PIKV_REDUCE_SUM, &req));
    CHECK(req != NULL);
    CHECK_STATUS(PIKV_ERR_BACKEND, pikv_comm_wait_request(&c, req));
    CHECK(c.failed);
    CHECK_STATUS(PIKV_ERR_BACKEND, pikv_comm_iallreduce(&c, f, 2, PIKV_REDUCE_SUM, &req));
    check_error_names("is broken");
    CHECK(req == NULL);
    float lse[1] = {0}, out[4] = {0};
    CHECK_STATUS(PIKV_ERR_BACKEND, pikv_comm_merge_begin(&c, 1, 4, out, lse, &m));
    CHECK(m == NULL);
    tu_err_ctx = NULL;
    group_free(&g);
}

int main(void)
{
    for (int r = 0; r < MAX_RANKS; r++) {
        pikv_context_params cp = pikv_context_default_params();
        cp.cpu_threads = 1;
        if (pikv_context_create(&cp, &g_ctx[r]) != PIKV_OK) {
            fprintf(stderr, "test: pikv_context_create failed\n");
            return 2;
        }
    }
    static const int32_t dims[] = {1, 7, 128};
    static const int32_t rows[] = {0, 1, 37};
    uint64_t seed = 1;
    for (int n = 1; n <= MAX_RANKS; n++)
        for (size_t di = 0; di < sizeof dims / sizeof dims[0]; di++)
            for (size_t ri = 0; ri < sizeof rows / sizeof rows[0]; ri++)
                for (int rep = 0; rep < 3; rep++)
                    merge_case(n, dims[di], rows[ri], seed++);
    printf("merge vs the CPU merge op: max normalized error %.3g, max lse error %.3g\n",
           g_max_err, g_max_lse_err);
    failing_collectives();
    bad_inputs();
    for (int n = 1; n <= MAX_RANKS; n++) collectives_case(n);
    comm_state();
    for (int n = 1; n <= MAX_RANKS; n++) {
        nonblocking_case(n, 0);
        nonblocking_case(n, 1);
    }
    nonblocking_state();
    for (int r = 0; r < MAX_RANKS; r++) pikv_context_free(g_ctx[r]);
    return tu_finish();
}
