/* The roofline probe: a streaming read-and-reduce over a device buffer, split
 * into one contiguous range per thread so every core streams its own part.
 * Sixty-four float lanes in four independent accumulators keep the loads in
 * flight (one accumulator would serialize on the add latency); the sum is only a
 * witness that every byte was read. Built for AVX-512 and AVX2 with a portable
 * default, chosen at load time (target_clones), except under ASan, whose
 * instrumentation does not mix with ifuncs. */
#include "cpu-impl.h"

#if defined(__SANITIZE_ADDRESS__)
#define CPU_REDUCE_NO_CLONES 1
#endif
#if defined(__has_feature)
#if __has_feature(address_sanitizer)
#define CPU_REDUCE_NO_CLONES 1
#endif
#endif
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(CPU_REDUCE_NO_CLONES)
#define CPU_REDUCE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CPU_REDUCE_CLONES
#endif

typedef struct reduce_job {
    const float *x;
    uint64_t n;
    int64_t n_tasks;
    double *partial; /* [n_tasks] */
} reduce_job;

/* Float lanes count exactly up to 2^24: a block of 2^18 x 64 floats leaves each lane
   at most 2^18 additions, then the lanes go into a double and start again. */
enum { BLOCK_FLOATS = 64u << 18 };

CPU_REDUCE_CLONES
static double sum_block(const float *x, uint64_t n)
{
    float acc[4][16] = {{0}};
    uint64_t i = 0;
    for (; i + 64 <= n; i += 64)
        for (int a = 0; a < 4; a++)
            for (int j = 0; j < 16; j++) acc[a][j] += x[i + 16 * (uint64_t)a + (uint64_t)j];
    double s = 0;
    for (int a = 0; a < 4; a++)
        for (int j = 0; j < 16; j++) s += acc[a][j];
    for (; i < n; i++) s += x[i];
    return s;
}

static double sum_range(const float *x, uint64_t n)
{
    double s = 0;
    for (uint64_t i = 0; i < n; i += BLOCK_FLOATS) s += sum_block(x + i, n - i < BLOCK_FLOATS ? n - i : BLOCK_FLOATS);
    return s;
}

static void reduce_task(void *arg, int64_t task, int32_t thread)
{
    (void)thread;
    reduce_job *job = arg;
    /* ranges in whole cache lines (16 floats) so no two threads share one */
    const uint64_t lines = (job->n + 15) / 16;
    const uint64_t lo = lines * (uint64_t)task / (uint64_t)job->n_tasks * 16;
    uint64_t hi = lines * (uint64_t)(task + 1) / (uint64_t)job->n_tasks * 16;
    if (hi > job->n) hi = job->n;
    job->partial[task] = lo < hi ? sum_range(job->x + lo, hi - lo) : 0.0;
}

pikv_status pikv_cpu_read_reduce(pikv_device *dev, const pikv_read_reduce_args *a)
{
    pikv_context *ctx = dev->ctx;
    PIKV_RETURN_ERROR_IF(a->n_floats > a->buf->size / sizeof(float), ctx, PIKV_ERR_OUT_OF_RANGE,
                         "read_reduce: %llu floats past a buffer of %llu bytes", (unsigned long long)a->n_floats,
                         (unsigned long long)a->buf->size);
    pikv_cpu_pool *pool = pikv_cpu_device_pool(dev);
    enum { MAX_TASKS = 256 };
    double partial[MAX_TASKS];
    int64_t n_tasks = pikv_cpu_pool_threads(pool);
    if (n_tasks > MAX_TASKS) n_tasks = MAX_TASKS;
    reduce_job job = {(const float *)a->buf->host, a->n_floats, n_tasks, partial};
    pikv_cpu_pool_run(pool, n_tasks, reduce_task, &job);
    double s = 0;
    for (int64_t t = 0; t < n_tasks; t++) s += partial[t];
    *a->sum = s;
    return PIKV_OK;
}
