/*
 * mpi_comm: the MPI communicator (runtime/comm-mpi.c) with real MPI ranks, run by ctest under
 * mpiexec with 2 and 4 ranks (tests/CMakeLists.txt). White-box: calls the collectives of
 * runtime/comm.h directly (pikv_comm_allreduce...) and the CPU merge op as the reference.
 *
 * Checks, on every rank (each prints "N passed, N failed"; the process exits non-zero on a
 * failure, and so does mpiexec):
 *  - pikv_comm_create_mpi before MPI_Init and after MPI_Finalize fails saying so; NULL
 *    arguments and MPI_COMM_NULL give INVALID_ARGUMENT; rank and size are MPI's; the
 *    default timeout is 300 s;
 *  - every collective with rank-dependent data against the result computed locally:
 *    allreduce (f32 SUM/MAX/MIN, exact on integer values), allreduce_i64 (SUM/MAX/MIN,
 *    beyond 2^53), allgather (13 bytes and 192 KiB per rank), allgatherv (a rank sending
 *    nothing with a NULL send, a large count; all counts 0 is no collective), alltoallv
 *    (uneven counts with zeros, self included; a large exchange);
 *  - the statistics formulas of runtime/comm.h after each collective;
 *  - pikv_comm_merge_partials across the ranks against the CPU merge op over the partials
 *    gathered from every rank (pikv_comm_allgather), bound 1e-6 of the row's max|ref| (see
 *    tests/comm_merge.c: MPI sums in its own order), and the ranks agree with each other to
 *    the same bound;
 *  - bad input (the same on every rank, so no rank enters a collective): INVALID_ARGUMENT
 *    naming the value, no statistics, the communicator still works; a count beyond MPI's
 *    int gives UNSUPPORTED and breaks that communicator; pikv_comm_set_timeout checks;
 *  - the timeout: rank 0 enters an allreduce with a 1 s timeout while the others sleep 4 s
 *    before entering it: rank 0 gets PIKV_ERR_BACKEND naming MPI_Iallreduce after 1-3 s
 *    (measured), later collectives on that communicator fail at once saying it is broken;
 *    the late ranks complete the allreduce against rank 0's abandoned request, with rank 0's
 *    data even though rank 0 overwrote its own buffer meanwhile; everybody then meets in an
 *    MPI_Barrier on MPI_COMM_WORLD and frees the communicator.
 *  - the non-blocking allreduce (pikv_comm_iallreduce / pikv_comm_wait_request): two in
 *    flight with a blocking one between them, waited in reverse order; staged at post time;
 *    statistics at post time; merge begin + end bit-identical to the blocking merge; the
 *    timeout applies to the wait (rank 0 waits 1 s for ranks posting 4 s late: BACKEND
 *    naming the non-blocking allreduce, the communicator broken, the late ranks complete
 *    with rank 0's data).
 * An ERROR-level library log fails the test, except around calls that must fail.
 */
#include "test-util.h"

#include "comm.h"

#include <mpi.h>

#include <limits.h>
#include <sys/resource.h>
#include <time.h>

static int g_rank, g_size;
static pikv_context *g_ctx;
static int g_expect_errors; /* >0: ERROR logs are expected */
static long g_unexpected_errors;

static void log_cb(pikv_log_level level, const char *message, void *user)
{
    (void)user;
    if (level != PIKV_LOG_ERROR || g_expect_errors) return;
    g_unexpected_errors++;
    fprintf(stderr, "rank %d: unexpected library error: %s\n", g_rank, message);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + 1e-6 * (double)ru.ru_utime.tv_usec +
           (double)ru.ru_stime.tv_sec + 1e-6 * (double)ru.ru_stime.tv_usec;
}

static void check_error_names(const char *want)
{
    const char *msg = pikv_context_last_error(g_ctx);
    CHECKF(strstr(msg, want) != NULL, "rank %d: last error \"%s\" does not name \"%s\"", g_rank,
           msg, want);
}

typedef struct stats_snap {
    uint64_t sent, received;
    int64_t collectives;
} stats_snap;

static stats_snap snap(const pikv_comm *c)
{
    pikv_comm_stats s;
    memset(&s, 0, sizeof s);
    CHECK_OK(pikv_comm_get_stats(c, &s));
    stats_snap r = {s.bytes_sent, s.bytes_received, s.collectives};
    return r;
}

/* The statistics moved by exactly (sent, received, collectives) since before. */
static void check_delta(const pikv_comm *c, stats_snap before, uint64_t sent, uint64_t received,
                        int64_t collectives)
{
    stats_snap after = snap(c);
    CHECKF(after.sent - before.sent == sent, "rank %d: bytes sent +%llu, want +%llu", g_rank,
           (unsigned long long)(after.sent - before.sent), (unsigned long long)sent);
    CHECKF(after.received - before.received == received,
           "rank %d: bytes received +%llu, want +%llu", g_rank,
           (unsigned long long)(after.received - before.received), (unsigned long long)received);
    CHECK_EQ(after.collectives - before.collectives, collectives);
}

/* ------------------------------------------------------------------------ */
/* Collectives                                                               */
/* ------------------------------------------------------------------------ */

static float f32_value(int rank, int64_t i) { return (float)((rank + 1) * (i % 97) - 3 * rank); }

static void allreduce_f32(pikv_comm *c)
{
    static const pikv_reduce_op ops[] = {PIKV_REDUCE_SUM, PIKV_REDUCE_MAX, PIKV_REDUCE_MIN};
    static const int64_t sizes[] = {1, 1000, 70000};
    for (size_t si = 0; si < 3; si++)
        for (size_t oi = 0; oi < 3; oi++) {
            int64_t n = sizes[si];
            pikv_reduce_op op = ops[oi];
            tu_set_case("rank %d: allreduce f32 %s of %lld", g_rank, pikv_reduce_op_name(op),
                        (long long)n);
            float *buf = tu_xmalloc((size_t)n * sizeof(float));
            for (int64_t i = 0; i < n; i++) buf[i] = f32_value(g_rank, i);
            stats_snap s0 = snap(c);
            CHECK_OK(pikv_comm_allreduce(c, buf, n, op));
            long bad = 0;
            for (int64_t i = 0; i < n; i++) {
                float want = f32_value(0, i);
                for (int r = 1; r < g_size; r++) {
                    float x = f32_value(r, i);
                    want = op == PIKV_REDUCE_SUM ? want + x
                         : op == PIKV_REDUCE_MAX ? (x > want ? x : want)
                                                 : (x < want ? x : want);
                }
                if (buf[i] != want && bad++ == 0)
                    CHECKF(0, "rank %d: [%lld] = %g, want %g", g_rank, (long long)i,
                           (double)buf[i], (double)want);
            }
            CHECK_EQ(bad, 0);
            check_delta(c, s0, 4ull * (uint64_t)n, 4ull * (uint64_t)n, 1);
            free(buf);
        }
}

static int64_t i64_value(int rank, int64_t i)
{
    int64_t big = (int64_t)1 << 55; /* beyond what a double holds exactly */
    return (i % 2 ? -big : big) + (int64_t)(rank + 1) * 1000003 * (i + 1) + i;
}

static void allreduce_i64(pikv_comm *c)
{
    static const pikv_reduce_op ops[] = {PIKV_REDUCE_SUM, PIKV_REDUCE_MAX, PIKV_REDUCE_MIN};
    for (size_t oi = 0; oi < 3; oi++) {
        const int64_t n = 513;
        pikv_reduce_op op = ops[oi];
        tu_set_case("rank %d: allreduce i64 %s", g_rank, pikv_reduce_op_name(op));
        int64_t buf[513];
        for (int64_t i = 0; i < n; i++) buf[i] = i64_value(g_rank, i);
        stats_snap s0 = snap(c);
        CHECK_OK(pikv_comm_allreduce_i64(c, buf, n, op));
        long bad = 0;
        for (int64_t i = 0; i < n; i++) {
            int64_t want = i64_value(0, i);
            for (int r = 1; r < g_size; r++) {
                int64_t x = i64_value(r, i);
                want = op == PIKV_REDUCE_SUM ? want + x
                     : op == PIKV_REDUCE_MAX ? (x > want ? x : want)
                                             : (x < want ? x : want);
            }
            if (buf[i] != want && bad++ == 0)
                CHECKF(0, "rank %d: [%lld] = %lld, want %lld", g_rank, (long long)i,
                       (long long)buf[i], (long long)want);
        }
        CHECK_EQ(bad, 0);
        check_delta(c, s0, 8ull * (uint64_t)n, 8ull * (uint64_t)n, 1);
    }
}

static unsigned char byte_of(int src, int dst, int64_t i)
{
    return (unsigned char)(src * 31 + dst * 7 + i * 13 + (i >> 8));
}

static void allgather(pikv_comm *c)
{
    static const int64_t sizes[] = {13, 192 * 1024};
    for (size_t si = 0; si < 2; si++) {
        int64_t b = sizes[si];
        tu_set_case("rank %d: allgather of %lld bytes", g_rank, (long long)b);
        unsigned char *send = tu_xmalloc((size_t)b);
        unsigned char *recv = tu_xmalloc((size_t)b * (size_t)g_size);
        for (int64_t i = 0; i < b; i++) send[i] = byte_of(g_rank, -1, i);
        memset(recv, 0xee, (size_t)b * (size_t)g_size);
        stats_snap s0 = snap(c);
        CHECK_OK(pikv_comm_allgather(c, send, b, recv));
        long bad = 0;
        for (int r = 0; r < g_size; r++)
            for (int64_t i = 0; i < b; i++)
                if (recv[(size_t)r * (size_t)b + (size_t)i] != byte_of(r, -1, i)) bad++;
        CHECK_EQ(bad, 0);
        uint64_t others = (uint64_t)b * (uint64_t)(g_size - 1);
        check_delta(c, s0, others, others, 1);
        free(send);
        free(recv);
    }
    /* 0 bytes: no collective on any rank */
    stats_snap s0 = snap(c);
    CHECK_OK(pikv_comm_allgather(c, NULL, 0, NULL));
    check_delta(c, s0, 0, 0, 0);
}

static void allgatherv(pikv_comm *c)
{
    for (int variant = 0; variant < 3; variant++) {
        tu_set_case("rank %d: allgatherv variant %d", g_rank, variant);
        int64_t counts[64];
        uint64_t total = 0, others = 0;
        for (int r = 0; r < g_size; r++) {
            /* odd ranks send nothing; variant 1 has a large count; variant 2 all zero */
            counts[r] = variant == 2 ? 0 : r % 2 ? 0 : 1000 * r + 5;
            if (variant == 1 && r == g_size - 2) counts[r] = 300 * 1024 + 3;
            total += (uint64_t)counts[r];
            if (r != g_rank) others += (uint64_t)counts[r];
        }
        uint64_t displ = 0;
        for (int r = 0; r < g_rank; r++) displ += (uint64_t)counts[r];
        unsigned char *send = NULL; /* NULL is fine when this rank sends nothing */
        if (counts[g_rank]) {
            send = tu_xmalloc((size_t)counts[g_rank]);
            for (int64_t i = 0; i < counts[g_rank]; i++) send[i] = byte_of(g_rank, variant, i);
        }
        unsigned char *recv = total ? tu_xmalloc((size_t)total) : NULL;
        if (recv) memset(recv, 0xee, (size_t)total);
        stats_snap s0 = snap(c);
        CHECK_OK(pikv_comm_allgatherv(c, send, counts, recv));
        long bad = 0;
        size_t at = 0;
        for (int r = 0; r < g_size; r++)
            for (int64_t i = 0; i < counts[r]; i++)
                if (recv[at++] != byte_of(r, variant, i)) bad++;
        CHECK_EQ(bad, 0);
        (void)displ;
        check_delta(c, s0, (uint64_t)counts[g_rank] * (uint64_t)(g_size - 1), others,
                    total ? 1 : 0);
        free(send);
        free(recv);
    }
}

static int64_t a2a_count(int src, int dst, int variant)
{
    int64_t n = (src * 7 + dst * 3 + variant) % 5 * 100; /* zeros included, self too */
    if (variant == 1) n = n * 1000 + 17;                /* ~400 KiB per peer */
    return n;
}

static void alltoallv(pikv_comm *c)
{
    for (int variant = 0; variant < 2; variant++) {
        tu_set_case("rank %d: alltoallv variant %d", g_rank, variant);
        int64_t sc[64], rc[64];
        uint64_t st = 0, rt = 0, so = 0, ro = 0;
        for (int p = 0; p < g_size; p++) {
            sc[p] = a2a_count(g_rank, p, variant);
            rc[p] = a2a_count(p, g_rank, variant);
            st += (uint64_t)sc[p];
            rt += (uint64_t)rc[p];
            if (p != g_rank) {
                so += (uint64_t)sc[p];
                ro += (uint64_t)rc[p];
            }
        }
        unsigned char *send = tu_xmalloc((size_t)st), *recv = tu_xmalloc((size_t)rt);
        size_t at = 0;
        for (int p = 0; p < g_size; p++)
            for (int64_t i = 0; i < sc[p]; i++) send[at++] = byte_of(g_rank, p, i);
        memset(recv, 0xee, (size_t)rt);
        stats_snap s0 = snap(c);
        CHECK_OK(pikv_comm_alltoallv(c, send, sc, recv, rc));
        long bad = 0;
        at = 0;
        for (int p = 0; p < g_size; p++)
            for (int64_t i = 0; i < rc[p]; i++)
                if (recv[at++] != byte_of(p, g_rank, i)) bad++;
        CHECK_EQ(bad, 0);
        check_delta(c, s0, so, ro, 1);
        free(send);
        free(recv);
    }
    /* nothing to send anywhere: still one collective (a rank cannot know) */
    tu_set_case("rank %d: empty alltoallv", g_rank);
    int64_t zero[64] = {0};
    stats_snap s0 = snap(c);
    CHECK_OK(pikv_comm_alltoallv(c, NULL, zero, NULL, zero));
    check_delta(c, s0, 0, 0, 1);
}

/* ------------------------------------------------------------------------ */
/* Merge of attention partials vs the CPU merge op                          */
/* ------------------------------------------------------------------------ */

static void merge_case(pikv_comm *c, int32_t n_rows, int32_t dim, uint64_t seed)
{
    tu_set_case("rank %d: merge of %d rows, dim %d", g_rank, n_rows, dim);
    const size_t rd = (size_t)n_rows * (size_t)dim;
    /* this rank's partials; row kinds as in comm_merge: 0 random (empty with p = 1/3),
       1 empty everywhere, 2 non-empty on rank (row % size) only, 3 the same lse everywhere */
    tu_rng rng = tu_rng_seed(seed * 1000 + (uint64_t)g_rank);
    float *out = tu_xmalloc(rd * sizeof(float)), *lse = tu_xmalloc((size_t)n_rows * sizeof(float));
    for (int32_t row = 0; row < n_rows; row++) {
        float l;
        switch (row % 4) {
        case 0: l = tu_int(&rng, 0, 2) == 0 ? -INFINITY : tu_sym(&rng, 80.0f); break;
        case 1: l = -INFINITY; break;
        case 2: l = row % g_size == g_rank ? tu_sym(&rng, 30.0f) : -INFINITY; break;
        default: l = 0.25f * (float)row; break;
        }
        lse[row] = l;
        float *o = out + (size_t)row * dim;
        if (isinf(l))
            for (int32_t d = 0; d < dim; d++) o[d] = (row / 4) % 2 ? NAN : 0.0f;
        else
            tu_fill(&rng, o, (size_t)dim, 1.0f);
    }
    /* the reference: every rank's partials, gathered, merged by the CPU merge op */
    float *all_out = tu_xmalloc(rd * (size_t)g_size * sizeof(float));
    float *all_lse = tu_xmalloc((size_t)n_rows * (size_t)g_size * sizeof(float));
    CHECK_OK(pikv_comm_allgather(c, out, (int64_t)(rd * sizeof(float)), all_out));
    CHECK_OK(pikv_comm_allgather(c, lse, (int64_t)n_rows * 4, all_lse));
    float *ref_out = tu_xmalloc(rd * sizeof(float)), *ref_lse = tu_xmalloc((size_t)n_rows * 4);
    pikv_merge_args ma;
    memset(&ma, 0, sizeof ma);
    ma.n_parts = g_size;
    ma.n_rows = n_rows;
    ma.dim = dim;
    ma.part_out = all_out;
    ma.part_lse = all_lse;
    ma.out = ref_out;
    ma.lse = ref_lse;
    pikv_device *host = g_ctx->host_device;
    CHECK_OK(host->iface->merge(host, &ma));

    stats_snap s0 = snap(c);
    CHECK_OK(pikv_comm_merge_partials(c, n_rows, dim, out, lse));
    uint64_t bytes = 4ull * (uint64_t)n_rows * (uint64_t)(dim + 2);
    check_delta(c, s0, bytes, bytes, n_rows > 0 ? 2 : 0);

    /* Bound: as in comm_merge, 1e-6 of the row's max|ref|: MPI sums the weighted rows of at
       most 4 ranks in its own order, a few f32 ulps of the largest term. */
    long bad = 0;
    for (int32_t row = 0; row < n_rows; row++) {
        const float *o = out + (size_t)row * dim, *ro = ref_out + (size_t)row * dim;
        if (isinf(ref_lse[row])) {
            int ok = isinf(lse[row]) && lse[row] < 0;
            for (int32_t d = 0; d < dim; d++) ok &= o[d] == 0.0f;
            if (!ok && bad++ == 0) CHECKF(0, "rank %d row %d: not an empty row", g_rank, row);
            continue;
        }
        double mref = 0.0, mdiff = 0.0;
        for (int32_t d = 0; d < dim; d++) {
            double diff = fabs((double)o[d] - (double)ro[d]);
            if (!(diff <= mdiff)) mdiff = diff;
            if (fabs((double)ro[d]) > mref) mref = fabs((double)ro[d]);
        }
        double err = mref > 0.0 ? mdiff / mref : (mdiff == 0.0 ? 0.0 : INFINITY);
        double lerr = fabs((double)lse[row] - (double)ref_lse[row]) /
                      fmax(1.0, fabs((double)ref_lse[row]));
        if ((!(err <= 1e-6) || !(lerr <= 1e-6)) && bad++ == 0)
            CHECKF(0, "rank %d row %d: out error %.3g, lse %.9g vs %.9g", g_rank, row, err,
                   (double)lse[row], (double)ref_lse[row]);
    }
    CHECK_EQ(bad, 0);

    /* the ranks agree (to the same bound: MPI does not promise bitwise equality) */
    CHECK_OK(pikv_comm_allgather(c, out, (int64_t)(rd * sizeof(float)), all_out));
    long disagree = 0, bitwise = 0;
    for (int r = 0; r < g_size; r++)
        for (size_t i = 0; i < rd; i++) {
            float x = all_out[(size_t)r * rd + i], y = out[i];
            if (memcmp(&x, &y, sizeof x) != 0) bitwise++;
            if (!(fabs((double)x - (double)y) <= 1e-6 * fmax(1.0, fabs((double)y)))) disagree++;
        }
    CHECK_EQ(disagree, 0);
    if (g_rank == 0)
        printf("merge %d rows x %d: ranks %s\n", n_rows, dim,
               bitwise ? "agree within the bound" : "agree bit for bit");
    free(out);
    free(lse);
    free(all_out);
    free(all_lse);
    free(ref_out);
    free(ref_lse);
}

/* ------------------------------------------------------------------------ */
/* Bad input, set_timeout, int counts                                        */
/* ------------------------------------------------------------------------ */

static void bad_input(pikv_comm *c)
{
    tu_set_case("rank %d: bad input", g_rank);
    tu_err_ctx = g_ctx;
    float f[4] = {1, 2, 3, 4};
    int64_t counts[64], big[64];
    unsigned char buf[256];
    for (int r = 0; r < g_size; r++) {
        counts[r] = 1;
        big[r] = 2;
    }
    stats_snap s0 = snap(c);
    g_expect_errors++;
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_allreduce(c, NULL, 4, PIKV_REDUCE_SUM));
    check_error_names("buf is NULL");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_allreduce(c, f, -1, PIKV_REDUCE_SUM));
    check_error_names("n = -1");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_allreduce(c, f, 4, (pikv_reduce_op)7));
    check_error_names("op = 7");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_allgather(c, buf, -3, buf + 64));
    check_error_names("bytes = -3");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_allgather(c, NULL, 4, buf + 64));
    check_error_names("send is NULL");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_allgather(c, buf + 64, 4, buf + 64));
    check_error_names("overlaps");
    counts[g_size - 1] = -5;
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_allgatherv(c, buf, counts, buf + 64));
    check_error_names("= -5 is negative");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_allgatherv(c, buf, NULL, buf + 64));
    check_error_names("counts is NULL");
    counts[g_size - 1] = 1;
    big[g_rank] = 3; /* send to self 3, receive from self 2 */
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_alltoallv(c, buf, big, buf + 128, counts));
    check_error_names("differs from recv_counts");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_set_timeout(c, -1.0));
    check_error_names("seconds = -1");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_set_timeout(c, NAN));
    check_error_names("seconds = nan");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_set_timeout(c, INFINITY));
    check_error_names("seconds = inf");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_set_timeout(NULL, 1.0));
    g_expect_errors--;
    CHECK(c->timeout_s == PIKV_COMM_DEFAULT_TIMEOUT_S);
    /* nobody entered a collective: no statistics, the communicator still works */
    check_delta(c, s0, 0, 0, 0);
    CHECK(!c->failed);
    float one = 1.0f;
    CHECK_OK(pikv_comm_allreduce(c, &one, 1, PIKV_REDUCE_SUM));
    CHECK(one == (float)g_size);

    /* A count beyond MPI's int (the same on every rank): UNSUPPORTED before anything is
       entered, and the communicator is broken afterwards (as after any failure of the
       implementation). The buffer is never touched. */
    tu_set_case("rank %d: counts beyond int", g_rank);
    pikv_comm *bc = NULL;
    MPI_Comm w = MPI_COMM_WORLD;
    CHECK_OK(pikv_comm_create_mpi(g_ctx, &w, &bc));
    if (bc) {
        g_expect_errors++;
        CHECK_STATUS(PIKV_ERR_UNSUPPORTED,
                     pikv_comm_allreduce(bc, f, (int64_t)INT_MAX + 1, PIKV_REDUCE_SUM));
        check_error_names("does not fit in an int");
        CHECK(bc->failed);
        CHECK_STATUS(PIKV_ERR_BACKEND, pikv_comm_allreduce(bc, f, 4, PIKV_REDUCE_SUM));
        check_error_names("broken");
        check_error_names("does not fit in an int");
        g_expect_errors--;
        CHECK(f[0] == 1.0f && f[3] == 4.0f);
        pikv_comm_free(bc);
    }
    tu_err_ctx = NULL;
}

/* ------------------------------------------------------------------------ */
/* Timeout                                                                    */
/* ------------------------------------------------------------------------ */

static float timeout_value(int rank, int i) { return (float)(rank * 100 + i); }

static void timeout_case(void)
{
    tu_set_case("rank %d: timeout", g_rank);
    tu_err_ctx = g_ctx;
    pikv_comm *tc = NULL;
    MPI_Comm w = MPI_COMM_WORLD;
    CHECK_OK(pikv_comm_create_mpi(g_ctx, &w, &tc));
    if (!tc) { /* keep the ranks in step */
        MPI_Barrier(MPI_COMM_WORLD);
        MPI_Barrier(MPI_COMM_WORLD);
        return;
    }
    CHECK_OK(pikv_comm_set_timeout(tc, g_rank == 0 ? 1.0 : 60.0));
    enum { N = 64 };
    float buf[N];
    for (int i = 0; i < N; i++) buf[i] = timeout_value(g_rank, i);
    MPI_Barrier(MPI_COMM_WORLD);
    if (g_rank == 0) {
        g_expect_errors++;
        double t0 = now_s(), cpu0 = cpu_s();
        pikv_status st = pikv_comm_allreduce(tc, buf, N, PIKV_REDUCE_SUM);
        double dt = now_s() - t0, cpu = cpu_s() - cpu0;
        CHECK_STATUS(PIKV_ERR_BACKEND, st);
        printf("rank 0: the allreduce timed out after %.3f s (timeout 1 s, %.3f s of CPU "
               "meanwhile): %s\n", dt, cpu, pikv_context_last_error(g_ctx));
        CHECK_LE(0.99, dt);
        CHECK_LE(dt, 3.0);
        /* the wait sleeps (backoff to 1 ms): it must not burn a core */
        CHECK_LE(cpu, 0.5 * dt);
        check_error_names("MPI_Iallreduce");
        check_error_names("did not complete in 1 s");
        CHECK(tc->failed);
        /* buf is the caller's again: MPI works on the abandoned staging buffer */
        for (int i = 0; i < N; i++) buf[i] = NAN;
        /* later collectives fail at once, saying why */
        t0 = now_s();
        CHECK_STATUS(PIKV_ERR_BACKEND, pikv_comm_allreduce(tc, buf, N, PIKV_REDUCE_SUM));
        check_error_names("broken");
        check_error_names("MPI_Iallreduce did not complete");
        CHECK_STATUS(PIKV_ERR_BACKEND, pikv_comm_allgather(tc, buf, 4, buf + 8));
        check_error_names("comm_allgather");
        float lse[2] = {0, 0};
        CHECK_STATUS(PIKV_ERR_BACKEND, pikv_comm_merge_partials(tc, 2, 4, buf, lse));
        dt = now_s() - t0;
        CHECK_LE(dt, 0.05);
        g_expect_errors--;
        stats_snap s = snap(tc);
        CHECK_EQ(s.collectives, 0);
        CHECK_EQ(s.sent, 0);
    } else {
        struct timespec ts = {4, 0};
        while (nanosleep(&ts, &ts) != 0) {
        }
        /* joins rank 0's abandoned request: rank 0's data, though it overwrote its buf */
        CHECK_OK(pikv_comm_allreduce(tc, buf, N, PIKV_REDUCE_SUM));
        long bad = 0;
        for (int i = 0; i < N; i++) {
            float want = 0.0f;
            for (int r = 0; r < g_size; r++) want += timeout_value(r, i);
            if (buf[i] != want) bad++;
        }
        CHECK_EQ(bad, 0);
    }
    /* rank 0 never touches the broken communicator's MPI state again: it waits here
       (progressing its pending request) until the late ranks completed theirs */
    MPI_Barrier(MPI_COMM_WORLD);
    pikv_comm_free(tc);
    MPI_Barrier(MPI_COMM_WORLD);
    tu_err_ctx = NULL;
}

/* ------------------------------------------------------------------------ */
/* Non-blocking allreduce                                                    */
/* ------------------------------------------------------------------------ */

/* Two allreduces in flight at once with a blocking one between them, waited in reverse
   order; the caller's buffers are staged at post time (overwriting them before the wait
   changes nothing); statistics counted at post time; the split merge equals the blocking
   one bit for bit. */
static void iallreduce_f32(pikv_comm *c)
{
    tu_set_case("rank %d: iallreduce", g_rank);
    const int64_t na = 1000, nb = 70000;
    float *a = tu_xmalloc((size_t)na * sizeof(float)), *b = tu_xmalloc((size_t)nb * sizeof(float));
    float mid[3];
    for (int64_t i = 0; i < na; i++) a[i] = f32_value(g_rank, i);
    for (int64_t i = 0; i < nb; i++) b[i] = f32_value(g_rank, i + 7);
    for (int i = 0; i < 3; i++) mid[i] = (float)(g_rank + i);
    stats_snap s0 = snap(c);
    pikv_comm_request *ra = NULL, *rb = NULL;
    CHECK_OK(pikv_comm_iallreduce(c, a, na, PIKV_REDUCE_SUM, &ra));
    check_delta(c, s0, 4ull * (uint64_t)na, 4ull * (uint64_t)na, 1);
    CHECK_OK(pikv_comm_iallreduce(c, b, nb, PIKV_REDUCE_MAX, &rb));
    CHECK(ra != NULL && rb != NULL);
    CHECK_OK(pikv_comm_allreduce(c, mid, 3, PIKV_REDUCE_MIN));
    s0 = snap(c);
    CHECK_OK(pikv_comm_wait_request(c, rb));
    check_delta(c, s0, 0, 0, 0); /* nothing counted at the wait */
    CHECK_OK(pikv_comm_wait_request(c, ra));
    long bad = 0;
    for (int64_t i = 0; i < na; i++) {
        float want = 0.0f;
        for (int r = 0; r < g_size; r++) want += f32_value(r, i);
        bad += a[i] != want;
    }
    for (int64_t i = 0; i < nb; i++) {
        float want = f32_value(0, i + 7);
        for (int r = 1; r < g_size; r++) want = f32_value(r, i + 7) > want ? f32_value(r, i + 7) : want;
        bad += b[i] != want;
    }
    for (int i = 0; i < 3; i++) bad += mid[i] != (float)i;
    CHECK_EQ(bad, 0);
    /* staged at post: overwriting the buffer before the wait does not change the result */
    for (int64_t i = 0; i < na; i++) a[i] = f32_value(g_rank, i);
    CHECK_OK(pikv_comm_iallreduce(c, a, na, PIKV_REDUCE_SUM, &ra));
    for (int64_t i = 0; i < na; i++) a[i] = NAN;
    CHECK_OK(pikv_comm_wait_request(c, ra));
    bad = 0;
    for (int64_t i = 0; i < na; i++) {
        float want = 0.0f;
        for (int r = 0; r < g_size; r++) want += f32_value(r, i);
        bad += a[i] != want;
    }
    CHECK_EQ(bad, 0);
    /* the split merge: begin + end == the blocking merge */
    const int32_t rows = 9, dim = 33;
    float *o1 = tu_xmalloc((size_t)rows * dim * sizeof(float)), *o2 = tu_xmalloc((size_t)rows * dim * sizeof(float));
    float l1[9], l2[9];
    tu_rng rr = tu_rng_seed(500 + (uint64_t)g_rank);
    tu_fill(&rr, o1, (size_t)rows * dim, 1.0f);
    for (int i = 0; i < rows; i++) l1[i] = (float)(tu_unif(&rr) * 6.0 - 3.0);
    if (g_rank == 1) l1[4] = -INFINITY;
    memcpy(o2, o1, (size_t)rows * dim * sizeof(float));
    memcpy(l2, l1, sizeof l1);
    CHECK_OK(pikv_comm_merge_partials(c, rows, dim, o1, l1));
    pikv_comm_merge *m = NULL;
    CHECK_OK(pikv_comm_merge_begin(c, rows, dim, o2, l2, &m));
    CHECK(m != NULL);
    double exposed = -1, posted = -1;
    CHECK_OK(pikv_comm_merge_end_timed(c, m, &exposed, &posted));
    CHECK(exposed >= 0.0 && exposed <= posted);
    CHECK(memcmp(o1, o2, (size_t)rows * dim * sizeof(float)) == 0);
    CHECK(memcmp(l1, l2, sizeof l1) == 0);
    free(o1);
    free(o2);
    free(a);
    free(b);
}

/* The timeout applies to the wait: rank 0 posts and waits with a 1 s timeout while the
   others sleep 4 s before posting: rank 0's wait fails after 1-3 s naming the
   non-blocking allreduce, the communicator is broken; the late ranks complete against
   rank 0's set-aside staging buffer with its data. */
static void iallreduce_timeout_case(void)
{
    tu_set_case("rank %d: iallreduce timeout", g_rank);
    tu_err_ctx = g_ctx;
    pikv_comm *tc = NULL;
    MPI_Comm w = MPI_COMM_WORLD;
    CHECK_OK(pikv_comm_create_mpi(g_ctx, &w, &tc));
    if (!tc) {
        MPI_Barrier(MPI_COMM_WORLD);
        MPI_Barrier(MPI_COMM_WORLD);
        return;
    }
    CHECK_OK(pikv_comm_set_timeout(tc, g_rank == 0 ? 1.0 : 60.0));
    enum { N = 64 };
    float buf[N];
    for (int i = 0; i < N; i++) buf[i] = timeout_value(g_rank, i);
    MPI_Barrier(MPI_COMM_WORLD);
    pikv_comm_request *req = NULL;
    if (g_rank == 0) {
        CHECK_OK(pikv_comm_iallreduce(tc, buf, N, PIKV_REDUCE_SUM, &req));
        g_expect_errors++;
        double t0 = now_s();
        pikv_status st = pikv_comm_wait_request(tc, req);
        double dt = now_s() - t0;
        CHECK_STATUS(PIKV_ERR_BACKEND, st);
        printf("rank 0: the non-blocking allreduce's wait timed out after %.3f s: %s\n", dt,
               pikv_context_last_error(g_ctx));
        CHECK_LE(0.99, dt);
        CHECK_LE(dt, 3.0);
        check_error_names("MPI_Iallreduce (non-blocking) did not complete in 1 s");
        CHECK(tc->failed);
        for (int i = 0; i < N; i++) buf[i] = NAN;
        CHECK_STATUS(PIKV_ERR_BACKEND, pikv_comm_iallreduce(tc, buf, N, PIKV_REDUCE_SUM, &req));
        check_error_names("broken");
        CHECK(req == NULL);
        g_expect_errors--;
    } else {
        struct timespec ts = {4, 0};
        while (nanosleep(&ts, &ts) != 0) {
        }
        CHECK_OK(pikv_comm_iallreduce(tc, buf, N, PIKV_REDUCE_SUM, &req));
        CHECK_OK(pikv_comm_wait_request(tc, req));
        long bad = 0;
        for (int i = 0; i < N; i++) {
            float want = 0.0f;
            for (int r = 0; r < g_size; r++) want += timeout_value(r, i);
            if (buf[i] != want) bad++;
        }
        CHECK_EQ(bad, 0);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    pikv_comm_free(tc);
    MPI_Barrier(MPI_COMM_WORLD);
    tu_err_ctx = NULL;
}

int main(int argc, char **argv)
{
    pikv_context_params cp = pikv_context_default_params();
    cp.cpu_threads = 1;
    cp.log_fn = log_cb;
    if (pikv_context_create(&cp, &g_ctx) != PIKV_OK) {
        fprintf(stderr, "test: pikv_context_create failed\n");
        return 2;
    }
    tu_err_ctx = g_ctx;
    pikv_comm *c = NULL;
    MPI_Comm w = MPI_COMM_WORLD;

    /* before MPI_Init */
    g_expect_errors++;
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_create_mpi(g_ctx, &w, &c));
    check_error_names("MPI is not initialized");
    CHECK(c == NULL);
    g_expect_errors--;

    if (MPI_Init(&argc, &argv) != MPI_SUCCESS) {
        fprintf(stderr, "test: MPI_Init failed\n");
        return 2;
    }
    MPI_Comm_rank(MPI_COMM_WORLD, &g_rank);
    MPI_Comm_size(MPI_COMM_WORLD, &g_size);
    if (g_size > 64) {
        fprintf(stderr, "test: at most 64 ranks\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }

    tu_set_case("rank %d: create", g_rank);
    g_expect_errors++;
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_create_mpi(NULL, &w, &c));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_create_mpi(g_ctx, NULL, &c));
    check_error_names("mpi_comm is NULL");
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_create_mpi(g_ctx, &w, NULL));
    check_error_names("out is NULL");
    MPI_Comm null_comm = MPI_COMM_NULL;
    c = (pikv_comm *)&w;
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_create_mpi(g_ctx, &null_comm, &c));
    check_error_names("MPI_COMM_NULL");
    CHECK(c == NULL);
    g_expect_errors--;

    CHECK_OK(pikv_comm_create_mpi(g_ctx, &w, &c));
    if (!c) {
        fprintf(stderr, "rank %d: cannot create the communicator: %s\n", g_rank,
                pikv_context_last_error(g_ctx));
        MPI_Abort(MPI_COMM_WORLD, 1);
    }
    CHECK_EQ(pikv_comm_rank(c), g_rank);
    CHECK_EQ(pikv_comm_size(c), g_size);
    CHECK(c->timeout_s == 300.0);
    stats_snap s0 = snap(c);
    CHECK_EQ(s0.collectives, 0);
    CHECK_EQ(s0.sent, 0);

    allreduce_f32(c);
    allreduce_i64(c);
    allgather(c);
    allgatherv(c);
    alltoallv(c);
    merge_case(c, 37, 128, 1);
    merge_case(c, 40, 7, 2);
    merge_case(c, 1, 1, 3);
    iallreduce_f32(c);
    bad_input(c);
    pikv_comm_free(c);

    timeout_case();
    iallreduce_timeout_case();

    MPI_Finalize();
    /* after MPI_Finalize */
    tu_set_case("rank %d: after MPI_Finalize", g_rank);
    g_expect_errors++;
    c = NULL;
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_comm_create_mpi(g_ctx, &w, &c));
    check_error_names("finalized");
    g_expect_errors--;

    CHECK_EQ(g_unexpected_errors, 0);
    pikv_context_free(g_ctx);
    printf("rank %d of %d: ", g_rank, g_size);
    return tu_finish();
}
