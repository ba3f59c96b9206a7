/*
 * comm_merge: the cross-rank merge of attention partials (pikv_comm_merge_partials,
 * runtime/comm.c) and the communicator API, without GPUs, NCCL or MPI.
 *
 * White-box: it builds pikv_comm structs by hand (runtime/comm.h) over a test-only
 * in-process communicator: N ranks are N pthreads, each with its own context (a
 * context is used from one thread at a time), sharing a slot table and a pthread
 * barrier; an allreduce publishes every rank's buffer, rank 0 reduces them in rank
 * order (sum, or max), and every rank copies the result back. It also checks that
 * every rank called with the same count and op, as real collectives require.
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
 *    out and lse unchanged, counting only the collectives that succeeded;
 *  - bad inputs: NULL comm/out/lse, n_rows -1, dim 0 and 1025 give INVALID_ARGUMENT
 *    naming the value, with no collective; pikv_comm_create_nccl on a CPU device gives
 *    UNSUPPORTED (with or without NCCL in the build), out-of-range device and NULL
 *    arguments their errors; pikv_comm_free(NULL), rank/size/stats of NULL.
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
    if (me->fail_call && me->calls == me->fail_call) return PIKV_ERR_BACKEND;
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
                    else if (x[i] > g->result[i])
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

static void inproc_destroy(pikv_comm *c)
{
    (void)c; /* the test owns everything */
}

static const pikv_comm_iface inproc_iface = {inproc_allreduce, inproc_destroy};

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
    memset(c, 0, sizeof *c);
    c->iface = &inproc_iface;
    c->ctx = ctx;
    c->rank = rank;
    c->size = size;
    c->impl = impl;
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
        /* the next merge (the "fault" was transient) succeeds: one rank merges to itself */
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

static void check_error_names(const char *want)
{
    const char *msg = pikv_context_last_error(g_ctx[0]);
    CHECKF(strstr(msg, want) != NULL, "last error \"%s\" does not name \"%s\"", msg, want);
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
    for (int r = 0; r < MAX_RANKS; r++) pikv_context_free(g_ctx[r]);
    return tu_finish();
}
