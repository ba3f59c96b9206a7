/* A small fork-join thread pool for the CPU backend's kernels. */
#include "cpu-impl.h"

#include <pthread.h>
#include <stdatomic.h>

struct pikv_cpu_pool {
    int32_t n_threads; /* including the caller */
    int32_t n_workers; /* started threads = n_threads - 1 */
    pthread_t *workers;
    struct worker_start *starts; /* each worker's (pool, index), read at start-up */
    pthread_mutex_t mutex;
    pthread_cond_t wake;
    pthread_cond_t done;
    uint64_t generation; /* bumped for every run; workers wait for a new one */
    int32_t running;     /* workers still inside the current run */
    bool quit;
    /* the current job */
    pikv_cpu_task_fn fn;
    void *arg;
    int64_t n_tasks;
    atomic_llong next_task;
};

typedef struct worker_start {
    pikv_cpu_pool *pool;
    int32_t thread;
} worker_start;

static void run_tasks(pikv_cpu_pool *pool, int32_t thread)
{
    for (;;) {
        long long t = atomic_fetch_add_explicit(&pool->next_task, 1, memory_order_relaxed);
        if (t >= pool->n_tasks) break;
        pool->fn(pool->arg, (int64_t)t, thread);
    }
}

static void *worker_main(void *p)
{
    pikv_cpu_pool *pool = ((worker_start *)p)->pool;
    int32_t thread = ((worker_start *)p)->thread;
    uint64_t seen = 0;
    pthread_mutex_lock(&pool->mutex);
    for (;;) {
        while (!pool->quit && pool->generation == seen) pthread_cond_wait(&pool->wake, &pool->mutex);
        if (pool->quit) break;
        seen = pool->generation;
        pthread_mutex_unlock(&pool->mutex);
        run_tasks(pool, thread);
        pthread_mutex_lock(&pool->mutex);
        if (--pool->running == 0) pthread_cond_signal(&pool->done);
    }
    pthread_mutex_unlock(&pool->mutex);
    return NULL;
}

pikv_status pikv_cpu_pool_create(pikv_context *ctx, int32_t n_threads, pikv_cpu_pool **out)
{
    *out = NULL;
    if (n_threads < 1) n_threads = 1;
    pikv_cpu_pool *pool = pikv_host_calloc(ctx, 1, sizeof *pool);
    worker_start *starts = pikv_host_calloc(ctx, (size_t)n_threads, sizeof *starts);
    pthread_t *workers = pikv_host_calloc(ctx, (size_t)n_threads, sizeof *workers);
    if (!pool || !starts || !workers) {
        pikv_host_free(ctx, pool);
        pikv_host_free(ctx, starts);
        pikv_host_free(ctx, workers);
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "thread pool of %d threads: allocation failed",
                         n_threads);
    }
    pool->workers = workers;
    pool->n_threads = n_threads;
    atomic_init(&pool->next_task, 0);
    pthread_mutex_init(&pool->mutex, NULL);
    pthread_cond_init(&pool->wake, NULL);
    pthread_cond_init(&pool->done, NULL);
    pool->starts = starts; /* freed with the pool: workers read it at start-up */
    int32_t started = 0;
    for (int32_t i = 1; i < n_threads; i++) {
        starts[i].pool = pool;
        starts[i].thread = i;
        if (pthread_create(&workers[i - 1], NULL, worker_main, &starts[i]) != 0) break;
        started++;
    }
    if (started < n_threads - 1)
        pikv_log(ctx, PIKV_LOG_WARN, "cpu backend: started %d of %d worker threads", started,
                 n_threads - 1);
    pool->n_workers = started;
    pool->n_threads = started + 1;
    *out = pool;
    return PIKV_OK;
}

void pikv_cpu_pool_free(pikv_context *ctx, pikv_cpu_pool *pool)
{
    if (!pool) return;
    pthread_mutex_lock(&pool->mutex);
    pool->quit = true;
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mutex);
    for (int32_t i = 0; i < pool->n_workers; i++) pthread_join(pool->workers[i], NULL);
    pthread_mutex_destroy(&pool->mutex);
    pthread_cond_destroy(&pool->wake);
    pthread_cond_destroy(&pool->done);
    pikv_host_free(ctx, pool->workers);
    pikv_host_free(ctx, pool->starts);
    pikv_host_free(ctx, pool);
}

int32_t pikv_cpu_pool_threads(const pikv_cpu_pool *pool) { return pool->n_threads; }

void pikv_cpu_pool_run(pikv_cpu_pool *pool, int64_t n_tasks, pikv_cpu_task_fn fn, void *arg)
{
    if (n_tasks <= 0) return;
    if (pool->n_workers == 0 || n_tasks == 1) {
        for (int64_t t = 0; t < n_tasks; t++) fn(arg, t, 0);
        return;
    }
    pthread_mutex_lock(&pool->mutex);
    pool->fn = fn;
    pool->arg = arg;
    pool->n_tasks = n_tasks;
    atomic_store_explicit(&pool->next_task, 0, memory_order_relaxed);
    pool->running = pool->n_workers;
    pool->generation++;
    pthread_cond_broadcast(&pool->wake);
    pthread_mutex_unlock(&pool->mutex);

    run_tasks(pool, 0);

    pthread_mutex_lock(&pool->mutex);
    while (pool->running > 0) pthread_cond_wait(&pool->done, &pool->mutex);
    pthread_mutex_unlock(&pool->mutex);
}
