/* The OpenCL backend: device discovery through the ICD loader, device info
   and capabilities, registration. No OpenCL runtime (no ICD, no platform) means
   a backend without devices, not an error. */
#include "opencl-impl.h"

#include <stdio.h>
#include <string.h>

enum { MAX_OCL_DEVICES = 16 };

const char *pikv_ocl_error_name(cl_int err)
{
    switch (err) {
#define E(x) case x: return #x;
    E(CL_SUCCESS) E(CL_DEVICE_NOT_FOUND) E(CL_DEVICE_NOT_AVAILABLE) E(CL_COMPILER_NOT_AVAILABLE)
    E(CL_MEM_OBJECT_ALLOCATION_FAILURE) E(CL_OUT_OF_RESOURCES) E(CL_OUT_OF_HOST_MEMORY)
    E(CL_BUILD_PROGRAM_FAILURE) E(CL_MEM_COPY_OVERLAP) E(CL_INVALID_VALUE) E(CL_INVALID_DEVICE)
    E(CL_INVALID_CONTEXT) E(CL_INVALID_COMMAND_QUEUE) E(CL_INVALID_MEM_OBJECT) E(CL_INVALID_BINARY)
    E(CL_INVALID_BUILD_OPTIONS) E(CL_INVALID_PROGRAM) E(CL_INVALID_PROGRAM_EXECUTABLE)
    E(CL_INVALID_KERNEL_NAME) E(CL_INVALID_KERNEL) E(CL_INVALID_ARG_INDEX) E(CL_INVALID_ARG_VALUE)
    E(CL_INVALID_ARG_SIZE) E(CL_INVALID_KERNEL_ARGS) E(CL_INVALID_WORK_DIMENSION)
    E(CL_INVALID_WORK_GROUP_SIZE) E(CL_INVALID_WORK_ITEM_SIZE) E(CL_INVALID_GLOBAL_OFFSET)
    E(CL_INVALID_EVENT_WAIT_LIST) E(CL_INVALID_EVENT) E(CL_INVALID_OPERATION)
    E(CL_INVALID_BUFFER_SIZE) E(CL_INVALID_GLOBAL_WORK_SIZE) E(CL_EXEC_STATUS_ERROR_FOR_EVENTS_IN_WAIT_LIST)
    E(CL_MISALIGNED_SUB_BUFFER_OFFSET) E(CL_INVALID_PLATFORM)
#undef E
    case -1001: return "CL_PLATFORM_NOT_FOUND_KHR";
    default: return "unknown OpenCL error";
    }
}

pikv_status pikv_ocl_fail(pikv_device *dev, cl_int err, const char *what)
{
    const bool oom = err == CL_MEM_OBJECT_ALLOCATION_FAILURE || err == CL_OUT_OF_RESOURCES ||
                     err == CL_OUT_OF_HOST_MEMORY;
    return PIKV_FAIL(dev->ctx, oom ? PIKV_ERR_OUT_OF_MEMORY : PIKV_ERR_BACKEND, "device %s: %s failed: %s (%d)",
                     dev->info.name, what, pikv_ocl_error_name(err), (int)err);
}

static bool ocl_supports_op(pikv_device *dev, pikv_op op, pikv_dtype dtype)
{
    (void)dev;
    const bool open = dtype == PIKV_DTYPE_F32 || dtype == PIKV_DTYPE_F16;
    const bool quant = dtype == PIKV_DTYPE_INT8 || dtype == PIKV_DTYPE_INT4;
    switch (op) {
    case PIKV_OP_APPEND:
    case PIKV_OP_PAGE_COPY:
    case PIKV_OP_ATTENTION:
    case PIKV_OP_SCORE:
        return open || quant; /* quantized caches append into f16 open pages */
    case PIKV_OP_MERGE:
        return open || quant; /* no pages involved */
    case PIKV_OP_QUANTIZE:
        return quant;
    case PIKV_OP_TOPK:
    case PIKV_OP_READ_REDUCE:
        return true; /* no pages involved */
    default:
        return false;
    }
}

static pikv_status ocl_synchronize(pikv_device *dev)
{
    cl_int err = clFinish(pikv_ocl_dev(dev)->queue);
    return err == CL_SUCCESS ? PIKV_OK : pikv_ocl_fail(dev, err, "clFinish");
}

static const pikv_device_iface ocl_device_iface = {
    .supports_op = ocl_supports_op,
    .buffer_alloc = pikv_ocl_buffer_alloc,
    .buffer_free = pikv_ocl_buffer_free,
    .buffer_write = pikv_ocl_buffer_write,
    .buffer_read = pikv_ocl_buffer_read,
    .append = pikv_ocl_append,
    .page_copy = pikv_ocl_page_copy,
    .attention = pikv_ocl_attention,
    .merge = pikv_ocl_merge,
    .score = pikv_ocl_score,
    .topk = pikv_ocl_topk,
    .quantize = pikv_ocl_quantize,
    .read_reduce = pikv_ocl_read_reduce,
    .synchronize = ocl_synchronize,
};

static void ocl_device_free(pikv_context *ctx, pikv_device *d)
{
    if (!d) return;
    pikv_ocl_device *od = d->context;
    if (od) {
        if (od->queue) clFinish(od->queue);
        pikv_ocl_scratch_free(od);
        pikv_ocl_arenas_free(ctx, od);
        pikv_ocl_program_free(od);
        if (od->queue) clReleaseCommandQueue(od->queue);
        if (od->cl) clReleaseContext(od->cl);
        pikv_host_free(ctx, od);
    }
    pikv_host_free(ctx, d);
}

static void ocl_backend_free(pikv_backend *b)
{
    if (!b) return;
    pikv_context *ctx = b->ctx;
    for (int32_t i = 0; b->devices && i < b->n_devices; i++) ocl_device_free(ctx, b->devices[i]);
    pikv_host_free(ctx, b->devices);
    pikv_host_free(ctx, b);
}

static const pikv_backend_iface ocl_backend_iface = {.free = ocl_backend_free};

/* A device string into buf[n]. A longer one is truncated and ends with a hash of the
   whole string, so that two long names never look the same (they key the binary cache). */
static void get_str(pikv_context *ctx, cl_device_id dev, cl_device_info what, char *buf, size_t n)
{
    buf[0] = 0;
    size_t need = 0;
    if (clGetDeviceInfo(dev, what, 0, NULL, &need) != CL_SUCCESS || need == 0) return;
    if (need <= n) {
        if (clGetDeviceInfo(dev, what, n, buf, NULL) != CL_SUCCESS) buf[0] = 0;
        buf[n - 1] = 0;
        return;
    }
    char *full = pikv_host_alloc(ctx, need, 16);
    if (!full) return;
    if (clGetDeviceInfo(dev, what, need, full, NULL) == CL_SUCCESS && n > 18) {
        uint64_t h = 0xcbf29ce484222325ull;
        for (size_t i = 0; i < need; i++) h = (h ^ (unsigned char)full[i]) * 0x100000001b3ull;
        snprintf(buf, n, "%.*s#%016llx", (int)(n - 18), full, (unsigned long long)h);
    }
    pikv_host_free(ctx, full);
}

/* A device of the context (NULL with a log line when it cannot be used). */
static pikv_status open_device(pikv_context *ctx, pikv_backend *b, cl_platform_id plat, cl_device_id id,
                               pikv_device **out)
{
    *out = NULL;
    cl_bool avail = CL_FALSE, compiler = CL_FALSE;
    clGetDeviceInfo(id, CL_DEVICE_AVAILABLE, sizeof avail, &avail, NULL);
    clGetDeviceInfo(id, CL_DEVICE_COMPILER_AVAILABLE, sizeof compiler, &compiler, NULL);
    if (!avail || !compiler) return PIKV_OK;
    pikv_device *d = pikv_host_calloc(ctx, 1, sizeof *d);
    pikv_ocl_device *od = pikv_host_calloc(ctx, 1, sizeof *od);
    if (!d || !od) {
        pikv_host_free(ctx, d);
        pikv_host_free(ctx, od);
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "opencl backend: allocation failed");
    }
    d->context = od;
    od->platform = plat;
    od->id = id;
    get_str(ctx, id, CL_DEVICE_NAME, od->dev_name, sizeof od->dev_name);
    get_str(ctx, id, CL_DRIVER_VERSION, od->driver, sizeof od->driver);
    od->platform_version[0] = 0;
    clGetPlatformInfo(plat, CL_PLATFORM_VERSION, sizeof od->platform_version - 1, od->platform_version, NULL);
    od->platform_version[sizeof od->platform_version - 1] = 0;
    cl_device_type type = 0;
    clGetDeviceInfo(id, CL_DEVICE_TYPE, sizeof type, &type, NULL);
    od->is_cpu = (type & CL_DEVICE_TYPE_CPU) != 0;
    cl_device_fp_config fp = 0;
    clGetDeviceInfo(id, CL_DEVICE_SINGLE_FP_CONFIG, sizeof fp, &fp, NULL);
    od->correct_div = (fp & CL_FP_CORRECTLY_ROUNDED_DIVIDE_SQRT) != 0;
    clGetDeviceInfo(id, CL_DEVICE_LOCAL_MEM_SIZE, sizeof od->local_mem, &od->local_mem, NULL);
    clGetDeviceInfo(id, CL_DEVICE_MAX_MEM_ALLOC_SIZE, sizeof od->max_alloc, &od->max_alloc, NULL);
    cl_uint align_bits = 0;
    clGetDeviceInfo(id, CL_DEVICE_MEM_BASE_ADDR_ALIGN, sizeof align_bits, &align_bits, NULL);
    od->base_align = align_bits / 8;
    clGetDeviceInfo(id, CL_DEVICE_MAX_WORK_GROUP_SIZE, sizeof od->max_wg, &od->max_wg, NULL);

    cl_int err = CL_SUCCESS;
    cl_context_properties props[] = {CL_CONTEXT_PLATFORM, (cl_context_properties)plat, 0};
    od->cl = clCreateContext(props, 1, &id, NULL, NULL, &err);
    if (od->cl && err == CL_SUCCESS) od->queue = clCreateCommandQueue(od->cl, id, 0, &err);
    if (err != CL_SUCCESS || !od->cl || !od->queue) {
        pikv_log(ctx, PIKV_LOG_WARN, "opencl: device '%s' skipped: context or queue creation failed: %s (%d)",
                 od->dev_name, pikv_ocl_error_name(err), (int)err);
        ocl_device_free(ctx, d);
        return PIKV_OK;
    }

    d->iface = &ocl_device_iface;
    d->backend = b;
    d->ctx = ctx;
    pikv_device_info *info = &d->info;
    snprintf(info->name, sizeof info->name, "opencl%d", (int)b->n_devices);
    char plat_name[64] = "";
    clGetPlatformInfo(plat, CL_PLATFORM_NAME, sizeof plat_name - 1, plat_name, NULL);
    plat_name[sizeof plat_name - 1] = 0;
    char desc[320];
    snprintf(desc, sizeof desc, "%s (%s, driver %s)", od->dev_name, plat_name, od->driver);
    size_t dl = strlen(desc);
    if (dl >= sizeof info->description) dl = sizeof info->description - 1;
    memcpy(info->description, desc, dl);
    info->description[dl] = 0;
    info->backend = PIKV_BACKEND_OPENCL;
    info->backend_index = b->n_devices;
    cl_ulong mem = 0;
    clGetDeviceInfo(id, CL_DEVICE_GLOBAL_MEM_SIZE, sizeof mem, &mem, NULL);
    cl_uint cus = 0;
    clGetDeviceInfo(id, CL_DEVICE_MAX_COMPUTE_UNITS, sizeof cus, &cus, NULL);
    cl_bool unified = CL_FALSE;
    clGetDeviceInfo(id, CL_DEVICE_HOST_UNIFIED_MEMORY, sizeof unified, &unified, NULL);
    info->caps.memory_total = mem;
    info->caps.memory_limit = 0;
    info->caps.compute_units = (int32_t)cus;
    info->caps.subgroup_size = 1; /* kernels use work-group reductions, no subgroup ops */
    info->caps.async_copies = 0;  /* every op finishes before it returns */
    info->caps.host_visible = unified ? 1 : 0;
    info->caps.f16_storage = 1;   /* vload_half / vstore_half: core OpenCL 1.2 */
    info->caps.int8_dot = 0;
    *out = d;
    return PIKV_OK;
}

pikv_status pikv_backend_opencl_init(pikv_context *ctx, const pikv_context_params *params, pikv_backend **out)
{
    (void)params;
    *out = NULL;
    pikv_backend *b = pikv_host_calloc(ctx, 1, sizeof *b);
    if (b) b->devices = pikv_host_calloc(ctx, MAX_OCL_DEVICES, sizeof *b->devices);
    if (!b || !b->devices) {
        pikv_host_free(ctx, b);
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "opencl backend: allocation failed");
    }
    b->iface = &ocl_backend_iface;
    b->kind = PIKV_BACKEND_OPENCL;
    b->ctx = ctx;

    cl_uint n_plat = 0;
    cl_int err = clGetPlatformIDs(0, NULL, &n_plat);
    if (err != CL_SUCCESS || n_plat == 0) { /* no ICD or no platform: no devices */
        pikv_log(ctx, PIKV_LOG_INFO, "opencl: no platform found (%s): the backend has no devices",
                 err == CL_SUCCESS ? "none installed" : pikv_ocl_error_name(err));
        *out = b;
        return PIKV_OK;
    }
    cl_platform_id plats[16];
    if (n_plat > 16) n_plat = 16;
    err = clGetPlatformIDs(n_plat, plats, NULL);
    if (err != CL_SUCCESS) n_plat = 0;
    for (cl_uint p = 0; p < n_plat && b->n_devices < MAX_OCL_DEVICES; p++) {
        cl_uint n_dev = 0;
        cl_device_id ids[MAX_OCL_DEVICES];
        err = clGetDeviceIDs(plats[p], CL_DEVICE_TYPE_ALL, MAX_OCL_DEVICES, ids, &n_dev);
        if (err != CL_SUCCESS) continue; /* CL_DEVICE_NOT_FOUND and the like */
        if (n_dev > MAX_OCL_DEVICES) n_dev = MAX_OCL_DEVICES;
        for (cl_uint i = 0; i < n_dev && b->n_devices < MAX_OCL_DEVICES; i++) {
            pikv_device *d = NULL;
            pikv_status st = open_device(ctx, b, plats[p], ids[i], &d);
            if (st != PIKV_OK) {
                ocl_backend_free(b);
                return st;
            }
            if (d) b->devices[b->n_devices++] = d;
        }
    }
    pikv_log(ctx, PIKV_LOG_INFO, "opencl: %d device%s", (int)b->n_devices, b->n_devices == 1 ? "" : "s");
    *out = b;
    return PIKV_OK;
}
