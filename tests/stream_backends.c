/*
 * stream_backends: the format does not depend on the backend. For every non-CPU device of a
 * context with backends "all" (OpenCL on PoCL, Vulkan on lavapipe, CUDA on a GPU; none: the
 * test only checks the CPU) and every dtype: the workload of stream-util.h runs on a cache on
 * that device and on one on cpu0; the device cache's checkpoint restored on the CPU attends bit
 * for bit like the CPU cache (the pages are the same bytes on every backend), and the CPU
 * cache's checkpoint restored on the device attends like the device cache (to float rounding:
 * the device's own kernels); the restored statistics are the source's; a stream from the
 * device into a CPU cache too.
 */
#include "stream-util.h"

#include <pthread.h>

typedef struct out_arg {
    pikv_cache *c;
    int fd;
    pikv_status st;
} out_arg;

static void *writer(void *a)
{
    out_arg *o = a;
    o->st = pikv_cache_stream_out(o->c, o->fd, NULL);
    close(o->fd);
    return NULL;
}

static const char *dt_name[] = {"f32", "f16", "int8", "int4"};

int main(void)
{
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "all";
    pikv_context *ctx = NULL;
    if (pikv_context_create(&cp, &ctx) != PIKV_OK)
        return 2;
    tu_err_ctx = ctx;
    char *dir = su_tmpdir("backends");
    int devices_tested = 0;
    for (int32_t d = 0; d < pikv_device_count(ctx); d++) {
        pikv_device_info info;
        CHECK_OK(pikv_device_get_info(ctx, d, &info));
        if (info.backend == PIKV_BACKEND_CPU)
            continue;
        for (int dt = 0; dt < 4; dt++) {
            tu_set_case("device %s, %s", info.name, dt_name[dt]);
            pikv_cache_params p = su_params((pikv_dtype)dt, PIKV_PLACEMENT_EXPERT);
            const int32_t on_dev[1] = {d}, on_cpu[1] = {0};
            pikv_cache_params pd = p, pc = p;
            pd.devices = on_dev;
            pd.n_devices = 1;
            pc.devices = on_cpu;
            pc.n_devices = 1;
            pikv_cache *dev = NULL, *cpu = NULL;
            pikv_status st = pikv_cache_create(ctx, &pd, &dev);
            if (st == PIKV_ERR_UNSUPPORTED) {
                printf("%s: %s unsupported, skipped\n", info.name, dt_name[dt]);
                continue;
            }
            if (!CHECK_OK(st))
                continue;
            devices_tested += dt == 0;
            cpu = su_cache(ctx, &pc);
            su_workload(dev, &p, 500u + (uint64_t)dt);
            su_workload(cpu, &p, 500u + (uint64_t)dt);
            char pdev[600], pcpu[600], why[256] = "";
            snprintf(pdev, sizeof pdev, "%s/dev-%d-%d.pikv", dir, (int)d, dt);
            snprintf(pcpu, sizeof pcpu, "%s/cpu-%d-%d.pikv", dir, (int)d, dt);
            CHECK_OK(pikv_cache_checkpoint(dev, pdev, PIKV_CHECKPOINT_FULL, NULL));
            CHECK_OK(pikv_cache_checkpoint(cpu, pcpu, PIKV_CHECKPOINT_FULL, NULL));
            pikv_cache *a = su_cache(ctx, &pc), *b = su_cache(ctx, &pd), *s = su_cache(ctx, &pc);
            CHECK_OK(pikv_cache_restore(a, pdev, NULL));
            /* the statistics are the source's (its quantization error sums are the device's own) */
            CHECKF(su_same_stats(dev, a, &p, why, sizeof why), "%s's checkpoint on the CPU: %s", info.name, why);
            CHECKF(su_same_attend(cpu, a, &p, 41, 0.0), "%s's checkpoint on the CPU: bit for bit", info.name);
            CHECK_OK(pikv_cache_restore(b, pcpu, NULL));
            CHECKF(su_same_attend(dev, b, &p, 42, 1e-5), "the CPU's checkpoint on %s", info.name);
            int fds[2];
            if (CHECK(pipe(fds) == 0)) {
                out_arg o = {dev, fds[1], PIKV_ERR_INTERNAL};
                pthread_t th;
                CHECK(pthread_create(&th, NULL, writer, &o) == 0);
                CHECK_OK(pikv_cache_stream_in(s, fds[0], NULL));
                pthread_join(th, NULL);
                CHECK_OK(o.st);
                close(fds[0]);
                CHECKF(su_same_attend(cpu, s, &p, 43, 0.0), "a stream from %s", info.name);
            }
            pikv_cache_free(a);
            pikv_cache_free(b);
            pikv_cache_free(s);
            pikv_cache_free(dev);
            pikv_cache_free(cpu);
        }
    }
    printf("%d non-CPU devices tested\n", devices_tested);
    CHECK(devices_tested >= 0);
    su_rmdir(dir);
    pikv_context_free(ctx);
    return tu_finish();
}
