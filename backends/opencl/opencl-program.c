/* The embedded OpenCL program: built once per device on first use, from the
 * binary cache when it holds a build for this exact source, options, device
 * and driver, else from source (and then written to the cache).
 *
 * Cache directory: $PIKV_CACHE_DIR, else $XDG_CACHE_HOME/pikv, else
 * $HOME/.cache/pikv; caching is skipped silently when none can be written.
 * File: opencl-<key>.bin, key = FNV-1a 64 of source, options, device name,
 * driver version and platform version. Contents: a header (magic, key, payload
 * size, FNV-1a of the payload) and the driver's binary. A file that does not
 * check out, or that the driver refuses, is ignored (rebuilt from source and
 * replaced). Writes go to a temporary file in the same directory, renamed into
 * place, so readers never see a partial file. */
#include "opencl-impl.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

extern const char pikv_opencl_source[];
extern const size_t pikv_opencl_source_len;

static const char *const kernel_names[PIKV_OCL_K_COUNT_] = {
    "pikv_append",         "pikv_page_copy", "pikv_attention_part", "pikv_attention_finish",
    "pikv_merge",          "pikv_score",     "pikv_quant_keys",     "pikv_quant_values",
    "pikv_topk",           "pikv_read_reduce_gpu", "pikv_read_reduce_cpu", "pikv_attention_cpu64",
    "pikv_attention_cpu128", "pikv_attention_cpu256", "pikv_score_cpu",
};

/* Kernels that exist only in the CPU devices' build of the program. */
static bool cpu_only(int k)
{
    return k >= PIKV_OCL_K_READ_REDUCE_CPU;
}

#define CACHE_MAGIC "PIKVCLB1"

static uint64_t fnv1a(uint64_t h, const void *data, size_t n)
{
    const unsigned char *p = data;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static uint64_t fnv1a_str(uint64_t h, const char *s)
{
    return fnv1a(h, s, strlen(s) + 1); /* with the NUL: fields cannot run together */
}

/* mkdir -p of path (which it may modify temporarily); true when it exists. */
static bool make_dirs(char *path)
{
    for (char *p = path + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        if (mkdir(path, 0755) != 0 && errno != EEXIST) {
            *p = '/';
            return false;
        }
        *p = '/';
    }
    if (mkdir(path, 0755) != 0 && errno != EEXIST) return false;
    struct stat sb;
    return stat(path, &sb) == 0 && S_ISDIR(sb.st_mode);
}

static bool cache_dir(char *out, size_t n)
{
    const char *env = getenv("PIKV_CACHE_DIR");
    int len = -1;
    if (env && *env) {
        len = snprintf(out, n, "%s", env);
    } else if ((env = getenv("XDG_CACHE_HOME")) && *env) {
        len = snprintf(out, n, "%s/pikv", env);
    } else if ((env = getenv("HOME")) && *env) {
        len = snprintf(out, n, "%s/.cache/pikv", env);
    }
    if (len <= 0 || (size_t)len >= n) return false;
    if (!make_dirs(out)) return false;
    /* The cache holds native code that will run: only a directory of our own that
       nobody else can write is trusted. */
    struct stat sb;
    return stat(out, &sb) == 0 && sb.st_uid == geteuid() && (sb.st_mode & 022) == 0;
}

static unsigned char *read_cache(pikv_context *ctx, const char *path, uint64_t key, size_t *size)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    struct stat fsb;
    if (fstat(fileno(f), &fsb) != 0 || fsb.st_uid != geteuid()) {
        fclose(f);
        return NULL;
    }
    unsigned char hdr[32];
    unsigned char *data = NULL;
    uint64_t k = 0, n = 0, sum = 0;
    if (fread(hdr, 1, sizeof hdr, f) == sizeof hdr && !memcmp(hdr, CACHE_MAGIC, 8)) {
        memcpy(&k, hdr + 8, 8);
        memcpy(&n, hdr + 16, 8);
        memcpy(&sum, hdr + 24, 8);
        if (k == key && n > 0 && n < ((uint64_t)1 << 31)) {
            data = pikv_host_alloc(ctx, (size_t)n, 16);
            if (data && (fread(data, 1, (size_t)n, f) != (size_t)n || fgetc(f) != EOF ||
                         fnv1a(0xcbf29ce484222325ull, data, (size_t)n) != sum)) {
                pikv_host_free(ctx, data);
                data = NULL;
            }
        }
    }
    fclose(f);
    if (data) *size = (size_t)n;
    return data;
}

/* write(2) until done (no stdio: the library never references fwrite). */
static bool write_all(int fd, const void *data, size_t n)
{
    const unsigned char *p = data;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return false;
        p += w;
        n -= (size_t)w;
    }
    return true;
}

static void write_cache(pikv_context *ctx, const char *dir, const char *path, uint64_t key,
                        const unsigned char *data, size_t n)
{
    char tmp[4200];
    if (snprintf(tmp, sizeof tmp, "%s/.opencl-XXXXXX", dir) >= (int)sizeof tmp) return;
    int fd = mkstemp(tmp);
    if (fd < 0) return;
    unsigned char hdr[32];
    const uint64_t n64 = n, sum = fnv1a(0xcbf29ce484222325ull, data, n);
    memcpy(hdr, CACHE_MAGIC, 8);
    memcpy(hdr + 8, &key, 8);
    memcpy(hdr + 16, &n64, 8);
    memcpy(hdr + 24, &sum, 8);
    bool ok = write_all(fd, hdr, sizeof hdr) && write_all(fd, data, n);
    ok = close(fd) == 0 && ok;
    if (!ok || rename(tmp, path) != 0) {
        unlink(tmp);
        return;
    }
    pikv_log(ctx, PIKV_LOG_INFO, "opencl: program binary cached in %s", path);
}

/* The first lines of the build log, for the error message. */
static void build_log(pikv_context *ctx, pikv_ocl_device *od, cl_program prog, char *out, size_t n)
{
    out[0] = 0;
    size_t want = 0;
    if (clGetProgramBuildInfo(prog, od->id, CL_PROGRAM_BUILD_LOG, 0, NULL, &want) != CL_SUCCESS || want == 0)
        return;
    char *logbuf = pikv_host_alloc(ctx, want + 1, 16);
    if (!logbuf) return;
    if (clGetProgramBuildInfo(prog, od->id, CL_PROGRAM_BUILD_LOG, want, logbuf, NULL) != CL_SUCCESS) {
        pikv_host_free(ctx, logbuf);
        return;
    }
    logbuf[want] = 0;
    /* first 6 non-empty lines, joined by " | " */
    size_t o = 0;
    int lines = 0;
    for (char *p = logbuf; *p && lines < 6 && o + 4 < n;) {
        char *e = strchr(p, '\n');
        size_t l = e ? (size_t)(e - p) : strlen(p);
        if (l > 0) {
            if (lines > 0 && o + 3 < n) {
                memcpy(out + o, " | ", 3);
                o += 3;
            }
            size_t take = l < n - o - 1 ? l : n - o - 1;
            memcpy(out + o, p, take);
            o += take;
            lines++;
        }
        p += l + (e ? 1 : 0);
    }
    out[o] = 0;
    pikv_host_free(ctx, logbuf);
}

static pikv_status build(pikv_device *dev)
{
    pikv_context *ctx = dev->ctx;
    pikv_ocl_device *od = pikv_ocl_dev(dev);
    char options[256];
    snprintf(options, sizeof options, "-cl-std=CL1.2%s%s",
             od->correct_div ? " -cl-fp32-correctly-rounded-divide-sqrt" : "", od->is_cpu ? " -DPIKV_OCL_CPU=1" : "");

    uint64_t key = 0xcbf29ce484222325ull;
    key = fnv1a(key, pikv_opencl_source, pikv_opencl_source_len);
    key = fnv1a_str(key, options);
    key = fnv1a_str(key, od->dev_name);
    key = fnv1a_str(key, od->driver);
    key = fnv1a_str(key, od->platform_version);
    char dir[4096], path[4200];
    bool cacheable = cache_dir(dir, sizeof dir);
    if (cacheable && snprintf(path, sizeof path, "%s/opencl-%016llx.bin", dir, (unsigned long long)key) >=
                         (int)sizeof path)
        cacheable = false;

    cl_int err = CL_SUCCESS;
    cl_program prog = NULL;
    if (cacheable) {
        size_t n = 0;
        unsigned char *bin = read_cache(ctx, path, key, &n);
        if (bin) {
            const unsigned char *bins[1] = {bin};
            cl_int bstatus = CL_SUCCESS;
            prog = clCreateProgramWithBinary(od->cl, 1, &od->id, &n, bins, &bstatus, &err);
            if (prog && (err != CL_SUCCESS || bstatus != CL_SUCCESS ||
                         clBuildProgram(prog, 1, &od->id, options, NULL, NULL) != CL_SUCCESS)) {
                clReleaseProgram(prog);
                prog = NULL;
            }
            pikv_host_free(ctx, bin);
            if (prog) pikv_log(ctx, PIKV_LOG_INFO, "opencl: %s: program loaded from %s", dev->info.name, path);
        }
    }
    bool from_source = false;
    if (!prog) {
        const char *src = pikv_opencl_source;
        size_t len = pikv_opencl_source_len;
        prog = clCreateProgramWithSource(od->cl, 1, &src, &len, &err);
        if (!prog || err != CL_SUCCESS) return pikv_ocl_fail(dev, err, "clCreateProgramWithSource");
        err = clBuildProgram(prog, 1, &od->id, options, NULL, NULL);
        if (err != CL_SUCCESS) {
            char logs[400];
            build_log(ctx, od, prog, logs, sizeof logs);
            clReleaseProgram(prog);
            return PIKV_FAIL(ctx, PIKV_ERR_BACKEND, "device %s: building the OpenCL program failed: %s (%d): %s",
                             dev->info.name, pikv_ocl_error_name(err), (int)err, logs);
        }
        from_source = true;
    }
    od->program = prog;
    for (int k = 0; k < PIKV_OCL_K_COUNT_; k++) {
        if (cpu_only(k) && !od->is_cpu) continue;
        od->kernels[k] = clCreateKernel(prog, kernel_names[k], &err);
        if (!od->kernels[k] || err != CL_SUCCESS) {
            od->kernels[k] = NULL;
            return pikv_ocl_fail(dev, err, kernel_names[k]);
        }
    }
    if (from_source && cacheable) {
        size_t n = 0;
        if (clGetProgramInfo(prog, CL_PROGRAM_BINARY_SIZES, sizeof n, &n, NULL) == CL_SUCCESS && n > 0) {
            unsigned char *bin = pikv_host_alloc(ctx, n, 16);
            unsigned char *bins[1] = {bin};
            if (bin && clGetProgramInfo(prog, CL_PROGRAM_BINARIES, sizeof bins, bins, NULL) == CL_SUCCESS)
                write_cache(ctx, dir, path, key, bin, n);
            pikv_host_free(ctx, bin);
        }
    }
    /* attention work-group: a power of two the kernel allows; CPUs run a group
       as one loop, so a small one; GPUs a few warps. */
    size_t kmax = 0;
    clGetKernelWorkGroupInfo(od->kernels[PIKV_OCL_K_ATTN_PART], od->id, CL_KERNEL_WORK_GROUP_SIZE, sizeof kmax,
                             &kmax, NULL);
    size_t wg = od->is_cpu ? 16 : 64;
    if (kmax == 0) kmax = 1;
    while (wg > kmax) wg /= 2;
    od->attn_wg = wg;
    return PIKV_OK;
}

pikv_status pikv_ocl_ready(pikv_device *dev)
{
    pikv_ocl_device *od = pikv_ocl_dev(dev);
    if (od->build_tried) {
        if (od->build_status != PIKV_OK)
            return PIKV_FAIL(dev->ctx, od->build_status, "%s", od->build_error);
        return PIKV_OK;
    }
    const pikv_status st = build(dev);
    if (st != PIKV_OK) pikv_ocl_program_free(od);
    /* A program that does not compile never will: remember that. Running out of
       memory while building is transient: the next op tries again. */
    if (st == PIKV_ERR_OUT_OF_MEMORY) return st;
    od->build_tried = true;
    od->build_status = st;
    if (st != PIKV_OK) snprintf(od->build_error, sizeof od->build_error, "%s", pikv_context_last_error(dev->ctx));
    return st;
}

void pikv_ocl_program_free(pikv_ocl_device *od)
{
    for (int k = 0; k < PIKV_OCL_K_COUNT_; k++) {
        if (od->kernels[k]) clReleaseKernel(od->kernels[k]);
        od->kernels[k] = NULL;
    }
    if (od->program) clReleaseProgram(od->program);
    od->program = NULL;
}
