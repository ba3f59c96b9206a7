/*
 * api_basics: version macros and runtime version, default parameters, context creation,
 * devices (count, cpu0 info, cpu_devices), backend names, logging through the callback, and
 * a minimal cache round trip (also through the split attend, pikv_cache_attend_start /
 * _finish, in one process), and the read-bandwidth probe on every device (measured, or
 * unsupported), with its argument checks.
 */
#include "test-util.h"

typedef struct log_rec {
    int count;
    int max_level;
    int bad_level;
    char last[512];
} log_rec;

static void log_cb(pikv_log_level level, const char *message, void *user)
{
    log_rec *r = user;
    r->count++;
    if ((int)level > r->max_level)
        r->max_level = (int)level;
    if ((int)level < PIKV_LOG_ERROR || (int)level > PIKV_LOG_DEBUG)
        r->bad_level++;
    snprintf(r->last, sizeof r->last, "%s", message ? message : "(null)");
}

static void test_version(void)
{
    tu_set_case("version");
    CHECK_EQ(pikv_version_number(), PIKV_VERSION_NUMBER);
    CHECK_EQ(PIKV_VERSION_NUMBER,
             PIKV_VERSION_MAJOR * 10000 + PIKV_VERSION_MINOR * 100 + PIKV_VERSION_PATCH);
    const char *v = pikv_version_string();
    if (CHECK(v != NULL)) {
        CHECKF(strcmp(v, PIKV_VERSION_STRING) == 0, "runtime \"%s\", header \"%s\"", v,
               PIKV_VERSION_STRING);
        char buf[32];
        snprintf(buf, sizeof buf, "%d.%d.%d", PIKV_VERSION_MAJOR, PIKV_VERSION_MINOR,
                 PIKV_VERSION_PATCH);
        CHECKF(strcmp(buf, PIKV_VERSION_STRING) == 0, "macro string \"%s\" vs numbers \"%s\"",
               PIKV_VERSION_STRING, buf);
    }
}

static void test_defaults(void)
{
    tu_set_case("default params");
    pikv_context_params cp = pikv_context_default_params();
    CHECK_EQ(cp.cpu_devices, 1);
    CHECK_EQ(cp.cpu_threads, 0);
    CHECK_EQ(cp.cpu_device_memory, 0);
    CHECK(cp.allocator.alloc == NULL && cp.allocator.free == NULL);
    CHECK(cp.log_fn == NULL);

    pikv_cache_params p = pikv_cache_default_params();
    CHECK(p.n_layers >= 1);
    CHECK(p.n_kv_heads >= 1 && p.n_q_heads >= 1 && p.n_q_heads % p.n_kv_heads == 0);
    CHECK(p.head_dim >= 1 && p.head_dim <= 1024);
    CHECK(p.n_experts >= 1);
    CHECK(p.experts_per_token >= 1 && p.experts_per_token <= p.n_experts);
    CHECK(p.page_size >= 1 && p.page_size <= 4096);
    CHECK(p.dtype == PIKV_DTYPE_F32 || p.dtype == PIKV_DTYPE_F16);
    CHECK(p.capacity_tokens >= 1);
    CHECK(p.max_sequences >= 1);
    CHECK(p.devices == NULL);
    CHECK_EQ(p.n_devices, 0);
    CHECK(p.attn_scale == 0.0f);
}

static void test_context(void)
{
    tu_set_case("context with default params");
    pikv_context_params cp = pikv_context_default_params();
    pikv_context *ctx = NULL;
    if (!CHECK_OK(pikv_context_create(&cp, &ctx)))
        return;
    CHECK(ctx != NULL);
    tu_err_ctx = ctx;
    int32_t n = pikv_device_count(ctx);
    CHECK(n >= 1);
    const char *msg = pikv_context_last_error(ctx);
    CHECK(msg != NULL && msg[0] == 0);
    int found_cpu0 = 0;
    for (int32_t d = 0; d < n; d++) {
        pikv_device_info info;
        memset(&info, 0x5a, sizeof info);
        if (!CHECK_OK(pikv_device_get_info(ctx, d, &info)))
            continue;
        CHECK(memchr(info.name, 0, sizeof info.name) != NULL);
        CHECK(memchr(info.description, 0, sizeof info.description) != NULL);
        CHECK(info.name[0] != 0);
        CHECK_EQ(info.memory_used, 0);
        if (strcmp(info.name, "cpu0") == 0) {
            found_cpu0 = 1;
            CHECK_EQ(info.backend, PIKV_BACKEND_CPU);
            CHECK_EQ(info.backend_index, 0);
            CHECK(info.caps.compute_units >= 1);
            CHECK(info.caps.host_visible);
            CHECK(info.caps.f16_storage);
            CHECK_EQ(info.caps.memory_limit, 0);
        }
    }
    CHECKF(found_cpu0, "no device named cpu0 among %d", n);
    pikv_context_free(ctx);
}

static void test_cpu_devices(void)
{
    for (int nd = 1; nd <= 8; nd += 3) {
        tu_set_case("cpu backend with %d devices", nd);
        pikv_context_params cp = pikv_context_default_params();
        cp.backends = "cpu";
        cp.cpu_devices = nd;
        cp.cpu_threads = nd % 2 ? 1 : 2;
        cp.cpu_device_memory = 1 << 20;
        pikv_context *ctx = NULL;
        if (!CHECK_OK(pikv_context_create(&cp, &ctx)))
            continue;
        CHECK_EQ(pikv_device_count(ctx), nd);
        for (int d = 0; d < nd; d++) {
            pikv_device_info info;
            if (!CHECK_OK(pikv_device_get_info(ctx, d, &info)))
                continue;
            char want[32];
            snprintf(want, sizeof want, "cpu%d", d);
            CHECKF(strcmp(info.name, want) == 0, "device %d is \"%s\", expected \"%s\"", d,
                   info.name, want);
            CHECK_EQ(info.backend, PIKV_BACKEND_CPU);
            CHECK_EQ(info.backend_index, d);
            CHECK_EQ(info.caps.memory_limit, 1 << 20);
        }
        pikv_context_free(ctx);
    }
    /* 64 is the most */
    tu_set_case("cpu backend with 64 devices");
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "cpu";
    cp.cpu_devices = 64;
    pikv_context *ctx = NULL;
    if (CHECK_OK(pikv_context_create(&cp, &ctx))) {
        CHECK_EQ(pikv_device_count(ctx), 64);
        pikv_device_info info;
        if (CHECK_OK(pikv_device_get_info(ctx, 63, &info)))
            CHECK(strcmp(info.name, "cpu63") == 0);
        pikv_context_free(ctx);
    }
}

static void test_backend_names(void)
{
    tu_set_case("backend names");
    const char *n[4] = {pikv_backend_name(PIKV_BACKEND_CPU), pikv_backend_name(PIKV_BACKEND_OPENCL),
                        pikv_backend_name(PIKV_BACKEND_VULKAN),
                        pikv_backend_name(PIKV_BACKEND_CUDA)};
    for (int i = 0; i < 4; i++) {
        if (!CHECKF(n[i] && n[i][0], "backend %d has no name", i))
            continue;
        for (int j = 0; j < i; j++)
            if (n[j])
                CHECK(strcmp(n[i], n[j]) != 0);
    }
    if (n[0])
        CHECKF(strcmp(n[0], "cpu") == 0, "pikv_backend_name(PIKV_BACKEND_CPU) = \"%s\"", n[0]);
}

static void test_logging(void)
{
    tu_set_case("logging");
    log_rec rec;
    memset(&rec, 0, sizeof rec);
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "cpu";
    cp.log_fn = log_cb;
    cp.log_user = &rec;
    cp.log_level = PIKV_LOG_DEBUG;
    pikv_context *ctx = NULL;
    if (!CHECK_OK(pikv_context_create(&cp, &ctx)))
        return;
    tu_err_ctx = ctx;
    pikv_cache_params p = pikv_cache_default_params();
    p.n_layers = 1;
    p.max_sequences = 4;
    p.capacity_tokens = 100;
    pikv_cache *c = NULL;
    if (!CHECK_OK(pikv_cache_create(ctx, &p, &c))) {
        pikv_context_free(ctx);
        return;
    }
    int before = rec.count;
    CHECK_STATUS(PIKV_ERR_OUT_OF_RANGE, pikv_seq_add(c, 4711));
    CHECKF(rec.count > before, "no log message for a failing call at level DEBUG");
    CHECK(rec.last[0] != 0);
    const char *msg = pikv_context_last_error(ctx);
    CHECK(msg && strstr(msg, "4711"));
    CHECK_EQ(rec.bad_level, 0);

    /* set_log: level ERROR drops INFO/DEBUG messages */
    log_rec rec2;
    memset(&rec2, 0, sizeof rec2);
    CHECK_OK(pikv_context_set_log(ctx, log_cb, &rec2, PIKV_LOG_ERROR));
    before = rec.count;
    CHECK_OK(pikv_seq_add(c, 1));
    CHECK_STATUS(PIKV_ERR_EXISTS, pikv_seq_add(c, 1));
    CHECK_EQ(rec.count, before); /* the old callback is gone */
    CHECK(rec2.max_level <= PIKV_LOG_ERROR);
    /* NULL callback: no logging, still fine */
    CHECK_OK(pikv_context_set_log(ctx, NULL, NULL, PIKV_LOG_DEBUG));
    CHECK_STATUS(PIKV_ERR_NOT_FOUND, pikv_seq_remove(c, 2));
    pikv_cache_free(c);
    pikv_context_free(ctx);
}

static void test_round_trip(void)
{
    tu_set_case("minimal round trip");
    pikv_context *ctx = tu_context(1);
    if (!CHECK(ctx))
        return;
    tu_err_ctx = ctx;
    pikv_cache_params p = pikv_cache_default_params();
    p.n_layers = 1;
    p.n_q_heads = 2;
    p.n_kv_heads = 1;
    p.head_dim = 4;
    p.n_experts = 1;
    p.experts_per_token = 1;
    p.page_size = 2;
    p.capacity_tokens = 16;
    p.max_sequences = 2;
    pikv_cache *c = NULL;
    if (!CHECK_OK(pikv_cache_create(ctx, &p, &c)) || !c) {
        pikv_context_free(ctx);
        return;
    }
    CHECK(pikv_cache_context(c) == ctx);
    CHECK_OK(pikv_seq_add(c, 1));
    /* two tokens; query aligned with the second key only (scale 0.5 = 1/sqrt(4)) */
    const float k[8] = {10, 0, 0, 0, 0, 10, 0, 0};
    const float v[8] = {1, 2, 3, 4, -1, -2, -3, -4};
    CHECK_OK(pikv_cache_append(c, 0, 1, 2, k, v, NULL, NULL));
    int64_t len = 0;
    CHECK_OK(pikv_seq_length(c, 1, 0, &len));
    CHECK_EQ(len, 2);
    const float q[8] = {0, 1, 0, 0, 1, 0, 0, 0};
    float out[8], lse[2];
    int32_t ids[1] = {1};
    pikv_attend_batch b = {1, ids, q, NULL, out, lse, NULL};
    CHECK_OK(pikv_cache_attend(c, 0, &b));
    /* head 0: scores 0 and 5 -> weights 1/(1+e^5), e^5/(1+e^5) */
    double w1 = exp(5.0) / (1.0 + exp(5.0)), w0 = 1.0 - w1;
    for (int d = 0; d < 4; d++) {
        double ref0 = w0 * v[d] + w1 * v[4 + d];
        double ref1 = w1 * v[d] + w0 * v[4 + d];
        CHECKF(fabs(out[d] - ref0) <= 1e-5, "head 0 d %d: %g vs %g", d, out[d], ref0);
        CHECKF(fabs(out[4 + d] - ref1) <= 1e-5, "head 1 d %d: %g vs %g", d, out[4 + d], ref1);
    }
    CHECKF(fabs(lse[0] - log(1.0 + exp(5.0))) <= 1e-5, "lse %g", lse[0]);
    pikv_cache_stats st;
    CHECK_OK(pikv_cache_get_stats(c, &st));
    CHECK_EQ(st.tokens, 2);
    CHECK_EQ(st.pages, 1);
    CHECK_EQ(st.sequences, 1);
    CHECK_EQ(st.n_devices, 1);
    CHECK_EQ(st.appends, 1);
    CHECK_EQ(st.attends, 1);
    CHECK_EQ(st.last_tokens_read, 2);
    CHECK_EQ(st.last_pages_read, 1);
    /* where the time went: a plan and a kernel, no QUEST, one device (no merge) */
    CHECKF(st.last_plan_s > 0 && st.last_attention_s > 0, "plan %g s, attention %g s", st.last_plan_s,
           st.last_attention_s);
    CHECK(st.last_score_s == 0 && st.last_topk_s == 0 && st.last_merge_s == 0);
    CHECK(st.last_bytes_read > 0);
    /* the split attend: one process does everything in start, the same output bit for
       bit; requests finish in the order started; finish(NULL) and a failed start */
    float out2[8], lse2[2], out3[8], lse3[2];
    pikv_attend_batch b2 = {1, ids, q, NULL, out2, lse2, NULL}, b3 = {1, ids, q, NULL, out3, lse3, NULL};
    pikv_attend_request *r2 = NULL, *r3 = NULL;
    CHECK_OK(pikv_cache_attend_start(c, 0, &b2, &r2));
    CHECK_OK(pikv_cache_attend_start(c, 0, &b3, &r3));
    CHECK(r2 != NULL && r3 != NULL);
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_attend_finish(r3));
    CHECK(strstr(pikv_context_last_error(ctx), "in the order they were started") != NULL);
    CHECK_OK(pikv_cache_attend_finish(r2));
    CHECK_OK(pikv_cache_attend_finish(r3));
    CHECK(memcmp(out, out2, sizeof out) == 0 && memcmp(lse, lse2, sizeof lse) == 0);
    CHECK(memcmp(out, out3, sizeof out) == 0 && memcmp(lse, lse3, sizeof lse) == 0);
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_attend_finish(NULL));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_attend_start(c, 0, &b2, NULL));
    r2 = (pikv_attend_request *)&b2;
    CHECK_STATUS(PIKV_ERR_OUT_OF_RANGE, pikv_cache_attend_start(c, 1, &b2, &r2));
    CHECK(r2 == NULL);
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_cache_attend_start(NULL, 0, &b2, &r2));
    CHECK_OK(pikv_cache_get_stats(c, &st));
    CHECK_EQ(st.attends, 3);
    pikv_cache_dist_stats ds;
    CHECK_OK(pikv_cache_get_dist_stats(c, &ds));
    CHECK(ds.last_merge_wait_s == 0.0 && ds.last_merge_posted_s == 0.0);
    pikv_cache_free(c);
    pikv_context_free(ctx);
}

/* Every device either measures (a positive rate, the memory given back) or says it has
   no read-reduce kernel; bad arguments name the bad value and change nothing. */
static void test_read_bandwidth(void)
{
    pikv_context_params cp = pikv_context_default_params();
    cp.backends = "all";
    pikv_context *ctx = NULL;
    tu_set_case("read bandwidth");
    if (!CHECK_OK(pikv_context_create(&cp, &ctx)))
        return;
    tu_err_ctx = ctx;
    for (int32_t d = 0; d < pikv_device_count(ctx); d++) {
        pikv_device_info info;
        CHECK_OK(pikv_device_get_info(ctx, d, &info));
        tu_set_case("read bandwidth of %s", info.name);
        pikv_read_bandwidth bw;
        memset(&bw, 0, sizeof bw);
        pikv_status st = pikv_device_read_bandwidth(ctx, d, 3u << 20, 3, &bw);
        if (info.backend == PIKV_BACKEND_CPU)
            CHECK_OK(st);
        if (st == PIKV_ERR_UNSUPPORTED) {
            CHECKF(strstr(pikv_context_last_error(ctx), info.name) != NULL, "message \"%s\"",
                   pikv_context_last_error(ctx));
            continue;
        }
        if (!CHECK_OK(st))
            continue;
        CHECK_EQ(bw.bytes, 3u << 20);
        CHECK_EQ(bw.passes, 3);
        CHECK(bw.best_s > 0 && bw.best_s <= bw.median_s);
        CHECKF(bw.bytes_per_s > 1e6, "%g bytes/s", bw.bytes_per_s);
        pikv_device_info after;
        CHECK_OK(pikv_device_get_info(ctx, d, &after));
        CHECK_EQ(after.memory_used, info.memory_used);
        /* a probe keeps its buffer (counted while it lives) across runs */
        pikv_read_probe *probe = NULL;
        if (!CHECK_OK(pikv_read_probe_create(ctx, d, 1u << 20, &probe)))
            continue;
        CHECK_OK(pikv_device_get_info(ctx, d, &after));
        CHECK(after.memory_used >= info.memory_used + (1u << 20));
        for (int run = 0; run < 2; run++) {
            memset(&bw, 0, sizeof bw);
            CHECK_OK(pikv_read_probe_run(probe, 2, &bw));
            CHECK_EQ(bw.bytes, 1u << 20);
            CHECK_EQ(bw.passes, 2);
            CHECK(bw.best_s > 0 && bw.best_s <= bw.median_s);
        }
        CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_read_probe_run(probe, 1001, &bw));
        CHECK(strstr(pikv_context_last_error(ctx), "1001") != NULL);
        CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_read_probe_run(probe, 1, NULL));
        pikv_read_probe_free(probe);
        CHECK_OK(pikv_device_get_info(ctx, d, &after));
        CHECK_EQ(after.memory_used, info.memory_used);
    }
    tu_set_case("read probe: bad arguments");
    pikv_read_probe *probe = (pikv_read_probe *)&cp; /* a refused create sets *out to NULL */
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_read_probe_create(ctx, 0, 4098, &probe));
    CHECK(probe == NULL);
    CHECK(strstr(pikv_context_last_error(ctx), "4098") != NULL);
    CHECK_STATUS(PIKV_ERR_OUT_OF_RANGE, pikv_read_probe_create(ctx, -1, 1u << 20, &probe));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_read_probe_create(ctx, 0, 1u << 20, NULL));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_read_probe_create(NULL, 0, 1u << 20, &probe));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_read_probe_run(NULL, 1, NULL));
    pikv_read_probe_free(NULL);
    tu_set_case("read bandwidth: bad arguments");
    pikv_read_bandwidth bw, sentinel;
    memset(&bw, 0x5a, sizeof bw);
    sentinel = bw;
    CHECK_STATUS(PIKV_ERR_OUT_OF_RANGE, pikv_device_read_bandwidth(ctx, pikv_device_count(ctx), 1u << 20, 1, &bw));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_device_read_bandwidth(ctx, 0, 4098, 1, &bw));
    CHECK(strstr(pikv_context_last_error(ctx), "4098") != NULL);
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_device_read_bandwidth(ctx, 0, 1024, 1, &bw));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_device_read_bandwidth(ctx, 0, 1u << 20, 0, &bw));
    CHECK(strstr(pikv_context_last_error(ctx), "passes 0") != NULL);
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_device_read_bandwidth(ctx, 0, 1u << 20, 1, NULL));
    CHECK_STATUS(PIKV_ERR_INVALID_ARGUMENT, pikv_device_read_bandwidth(NULL, 0, 1u << 20, 1, &bw));
    CHECK(memcmp(&bw, &sentinel, sizeof bw) == 0); /* a refused call writes nothing */
    tu_err_ctx = NULL;
    pikv_context_free(ctx);
}

int main(void)
{
    test_version();
    test_defaults();
    test_context();
    test_cpu_devices();
    test_backend_names();
    test_logging();
    test_round_trip();
    test_read_bandwidth();
    tu_set_case("");
    return tu_finish();
}
