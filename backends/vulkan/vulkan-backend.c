/* The Vulkan backend: loader, instance (no window system), device discovery,
   capabilities and registration. No loader, no driver or no Vulkan 1.2 device
   means a backend without devices, not an error.

   One VkInstance per process, created on first use and never destroyed: the
   loader unloads the driver when the last instance goes, and drivers then
   lose (leak) their one-time state on every reload; contexts create their own
   VkDevices on it.

   PIKV_VULKAN_VALIDATION=1 in the environment (read when the instance is
   created) enables the Khronos validation layer; its messages go to the log
   callback of every live context with Vulkan devices ("vulkan validation:",
   errors at PIKV_LOG_ERROR). PIKV_VULKAN_NO_SUBGROUPS=1 forces the attention
   shader without subgroup operations. */
#include "vulkan-impl.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { MAX_VK_DEVICES = 16, ATTENTION_BINDINGS = 10 };

/* The process-wide instance (see above). */
typedef struct pikv_vk_process {
    pikv_vk_loader loader;
    VkInstance instance;
    pikv_vk_instance_fns fn;
    bool validation_requested, validation, debug_utils;
    char error[160]; /* why there is no instance, when there is none */
} pikv_vk_process;

static pthread_once_t g_process_once = PTHREAD_ONCE_INIT;
static pikv_vk_process g_vk;

typedef struct pikv_vk_backend {
    pikv_context *ctx;
    VkDebugUtilsMessengerEXT messenger;
} pikv_vk_backend;

const char *pikv_vk_result_name(VkResult r)
{
    switch (r) {
#define E(x) case x: return #x;
    E(VK_SUCCESS) E(VK_NOT_READY) E(VK_TIMEOUT) E(VK_INCOMPLETE) E(VK_ERROR_OUT_OF_HOST_MEMORY)
    E(VK_ERROR_OUT_OF_DEVICE_MEMORY) E(VK_ERROR_INITIALIZATION_FAILED) E(VK_ERROR_DEVICE_LOST)
    E(VK_ERROR_MEMORY_MAP_FAILED) E(VK_ERROR_LAYER_NOT_PRESENT) E(VK_ERROR_EXTENSION_NOT_PRESENT)
    E(VK_ERROR_FEATURE_NOT_PRESENT) E(VK_ERROR_INCOMPATIBLE_DRIVER) E(VK_ERROR_TOO_MANY_OBJECTS)
    E(VK_ERROR_FORMAT_NOT_SUPPORTED) E(VK_ERROR_FRAGMENTED_POOL) E(VK_ERROR_OUT_OF_POOL_MEMORY)
    E(VK_ERROR_INVALID_SHADER_NV) E(VK_ERROR_FRAGMENTATION) E(VK_ERROR_UNKNOWN)
#undef E
    default: return "unknown VkResult";
    }
}

pikv_status pikv_vk_fail(pikv_device *dev, VkResult r, const char *what)
{
    const bool oom = r == VK_ERROR_OUT_OF_HOST_MEMORY || r == VK_ERROR_OUT_OF_DEVICE_MEMORY ||
                     r == VK_ERROR_OUT_OF_POOL_MEMORY || r == VK_ERROR_FRAGMENTED_POOL ||
                     r == VK_ERROR_FRAGMENTATION || r == VK_ERROR_TOO_MANY_OBJECTS;
    return PIKV_FAIL(dev->ctx, oom ? PIKV_ERR_OUT_OF_MEMORY : PIKV_ERR_BACKEND, "device %s: %s failed: %s (%d)",
                     dev->info.name, what, pikv_vk_result_name(r), (int)r);
}

static bool env_on(const char *name)
{
    const char *v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

static VKAPI_ATTR VkBool32 VKAPI_CALL on_validation_message(VkDebugUtilsMessageSeverityFlagBitsEXT severity,
                                                           VkDebugUtilsMessageTypeFlagsEXT types,
                                                           const VkDebugUtilsMessengerCallbackDataEXT *data,
                                                           void *user)
{
    (void)types;
    pikv_vk_backend *vb = user;
    const pikv_log_level level = (severity & VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT)     ? PIKV_LOG_ERROR
                                 : (severity & VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT) ? PIKV_LOG_WARN
                                                                                                : PIKV_LOG_DEBUG;
    pikv_log(vb->ctx, level, "vulkan validation: %s", data && data->pMessage ? data->pMessage : "(no message)");
    return VK_FALSE;
}

/* ---- the device iface ------------------------------------------------------- */

static bool vk_supports_op(pikv_device *dev, pikv_op op, pikv_dtype dtype)
{
    (void)dev;
    const bool known = dtype == PIKV_DTYPE_F32 || dtype == PIKV_DTYPE_F16 || dtype == PIKV_DTYPE_INT8 ||
                       dtype == PIKV_DTYPE_INT4;
    switch (op) {
    case PIKV_OP_APPEND:
    case PIKV_OP_PAGE_COPY:
    case PIKV_OP_ATTENTION:
    case PIKV_OP_SCORE:
    case PIKV_OP_MERGE:
        return known; /* quantized caches append into f16 open pages */
    case PIKV_OP_QUANTIZE:
        return pikv_dtype_quantized(dtype);
    case PIKV_OP_TOPK:
    case PIKV_OP_READ_REDUCE:
        return true; /* no pages involved */
    default:
        return false;
    }
}

static pikv_status vk_synchronize(pikv_device *dev)
{
    /* every op has finished when it returns; make sure nothing is left queued */
    pikv_vk_device *vd = pikv_vk_dev(dev);
    VkResult r = vd->fn.vkDeviceWaitIdle(vd->device);
    return r == VK_SUCCESS ? PIKV_OK : pikv_vk_fail(dev, r, "vkDeviceWaitIdle");
}

static const pikv_device_iface vk_device_iface = {
    .supports_op = vk_supports_op,
    .buffer_alloc = pikv_vk_buffer_alloc,
    .buffer_free = pikv_vk_buffer_free,
    .buffer_write = pikv_vk_buffer_write,
    .buffer_read = pikv_vk_buffer_read,
    .append = pikv_vk_append,
    .page_copy = pikv_vk_page_copy,
    .attention = pikv_vk_attention,
    .merge = pikv_vk_merge,
    .score = pikv_vk_score,
    .topk = pikv_vk_topk,
    .quantize = pikv_vk_quantize,
    .read_reduce = pikv_vk_read_reduce,
    .synchronize = vk_synchronize,
};

static void vk_device_free(pikv_context *ctx, pikv_device *d)
{
    if (!d) return;
    pikv_vk_device *vd = d->context;
    if (vd) {
        if (vd->device) {
            vd->fn.vkDeviceWaitIdle(vd->device);
            pikv_vk_pipelines_free(vd);
            pikv_vk_memory_free(ctx, vd);
            if (vd->desc_pool) vd->fn.vkDestroyDescriptorPool(vd->device, vd->desc_pool, NULL);
            if (vd->timeline) vd->fn.vkDestroySemaphore(vd->device, vd->timeline, NULL);
            if (vd->cmd_pool) vd->fn.vkDestroyCommandPool(vd->device, vd->cmd_pool, NULL);
            vd->fn.vkDestroyDevice(vd->device, NULL);
        }
        pikv_host_free(ctx, vd);
    }
    pikv_host_free(ctx, d);
}

static void vk_backend_free(pikv_backend *b)
{
    if (!b) return;
    pikv_context *ctx = b->ctx;
    for (int32_t i = 0; b->devices && i < b->n_devices; i++) vk_device_free(ctx, b->devices[i]);
    pikv_vk_backend *vb = b->context;
    if (vb) {
        if (vb->messenger) g_vk.fn.vkDestroyDebugUtilsMessengerEXT(g_vk.instance, vb->messenger, NULL);
        pikv_host_free(ctx, vb);
    }
    pikv_host_free(ctx, b->devices);
    pikv_host_free(ctx, b);
}

static const pikv_backend_iface vk_backend_iface = {.free = vk_backend_free};

/* ---- discovery --------------------------------------------------------------- */

static const char *device_type_name(VkPhysicalDeviceType t)
{
    switch (t) {
    case VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU: return "integrated GPU";
    case VK_PHYSICAL_DEVICE_TYPE_DISCRETE_GPU: return "discrete GPU";
    case VK_PHYSICAL_DEVICE_TYPE_VIRTUAL_GPU: return "virtual GPU";
    case VK_PHYSICAL_DEVICE_TYPE_CPU: return "CPU";
    default: return "other";
    }
}

/* Creates the logical device and its queue, command buffer, timeline semaphore
   and descriptor pool. Returns a VkResult with *what naming the failed call. */
static VkResult create_device(pikv_vk_device *vd, const char **what)
{
    VkPhysicalDeviceVulkan12Features f12 = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES,
                                            .timelineSemaphore = VK_TRUE};
    const float priority = 1.0f;
    VkDeviceQueueCreateInfo qci = {.sType = VK_STRUCTURE_TYPE_DEVICE_QUEUE_CREATE_INFO,
                                   .queueFamilyIndex = vd->queue_family,
                                   .queueCount = 1,
                                   .pQueuePriorities = &priority};
    VkDeviceCreateInfo dci = {.sType = VK_STRUCTURE_TYPE_DEVICE_CREATE_INFO,
                              .pNext = &f12,
                              .queueCreateInfoCount = 1,
                              .pQueueCreateInfos = &qci};
    *what = "vkCreateDevice";
    VkResult r = g_vk.fn.vkCreateDevice(vd->phys, &dci, NULL, &vd->device);
    if (r != VK_SUCCESS) {
        vd->device = VK_NULL_HANDLE;
        return r;
    }
    const char *missing = NULL;
    if (!pikv_vk_load_device_fns(&g_vk.fn, vd->device, &vd->fn, &missing)) {
        *what = missing;
        PFN_vkDestroyDevice destroy = (PFN_vkDestroyDevice)g_vk.fn.vkGetDeviceProcAddr(vd->device, "vkDestroyDevice");
        if (destroy) destroy(vd->device, NULL);
        vd->device = VK_NULL_HANDLE;
        return VK_ERROR_INITIALIZATION_FAILED;
    }
    vd->fn.vkGetDeviceQueue(vd->device, vd->queue_family, 0, &vd->queue);
    VkCommandPoolCreateInfo pci = {.sType = VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO,
                                   .flags = VK_COMMAND_POOL_CREATE_RESET_COMMAND_BUFFER_BIT,
                                   .queueFamilyIndex = vd->queue_family};
    *what = "vkCreateCommandPool";
    if ((r = vd->fn.vkCreateCommandPool(vd->device, &pci, NULL, &vd->cmd_pool)) != VK_SUCCESS) return r;
    VkCommandBufferAllocateInfo cai = {.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO,
                                       .commandPool = vd->cmd_pool,
                                       .level = VK_COMMAND_BUFFER_LEVEL_PRIMARY,
                                       .commandBufferCount = 1};
    *what = "vkAllocateCommandBuffers";
    if ((r = vd->fn.vkAllocateCommandBuffers(vd->device, &cai, &vd->cmd)) != VK_SUCCESS) return r;
    VkSemaphoreTypeCreateInfo sti = {.sType = VK_STRUCTURE_TYPE_SEMAPHORE_TYPE_CREATE_INFO,
                                     .semaphoreType = VK_SEMAPHORE_TYPE_TIMELINE,
                                     .initialValue = 0};
    VkSemaphoreCreateInfo sci = {.sType = VK_STRUCTURE_TYPE_SEMAPHORE_CREATE_INFO, .pNext = &sti};
    *what = "vkCreateSemaphore (timeline)";
    if ((r = vd->fn.vkCreateSemaphore(vd->device, &sci, NULL, &vd->timeline)) != VK_SUCCESS) return r;
    /* Sets are allocated per dispatch and the pool is reset per submission; a
       submission that needs more sets is split (pikv_vk_dispatch). */
    VkDescriptorPoolSize size = {.type = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
                                 .descriptorCount = 512 * PIKV_VK_MAX_BINDINGS};
    VkDescriptorPoolCreateInfo dpi = {.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_POOL_CREATE_INFO,
                                      .maxSets = 512,
                                      .poolSizeCount = 1,
                                      .pPoolSizes = &size};
    *what = "vkCreateDescriptorPool";
    return vd->fn.vkCreateDescriptorPool(vd->device, &dpi, NULL, &vd->desc_pool);
}

/* A device of the context (*out NULL, with a log line, when it cannot be used). */
static pikv_status open_device(pikv_context *ctx, pikv_backend *b, VkPhysicalDevice phys,
                               pikv_device **out)
{
    *out = NULL;
    VkPhysicalDeviceProperties props;
    g_vk.fn.vkGetPhysicalDeviceProperties(phys, &props);
    if (VK_API_VERSION_MAJOR(props.apiVersion) == 1 && VK_API_VERSION_MINOR(props.apiVersion) < 2) {
        pikv_log(ctx, PIKV_LOG_INFO, "vulkan: device '%s' skipped: Vulkan %u.%u (1.2 needed)", props.deviceName,
                 VK_API_VERSION_MAJOR(props.apiVersion), VK_API_VERSION_MINOR(props.apiVersion));
        return PIKV_OK;
    }
    VkPhysicalDeviceVulkan12Features f12 = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_VULKAN_1_2_FEATURES};
    VkPhysicalDeviceFeatures2 f2 = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_FEATURES_2, .pNext = &f12};
    g_vk.fn.vkGetPhysicalDeviceFeatures2(phys, &f2);
    const VkPhysicalDeviceLimits *lim = &props.limits;
    const char *why = NULL;
    if (!f12.timelineSemaphore) why = "no timeline semaphores";
    else if (lim->maxPerStageDescriptorStorageBuffers < ATTENTION_BINDINGS) why = "fewer than 10 storage buffers per stage";
    else if (lim->maxPushConstantsSize < PIKV_VK_PUSH_BYTES) why = "push constants under 32 bytes";
    else if (lim->maxComputeWorkGroupInvocations < 64 || lim->maxComputeWorkGroupSize[0] < 64)
        why = "workgroups under 64 invocations";
    uint32_t n_fam = 0;
    g_vk.fn.vkGetPhysicalDeviceQueueFamilyProperties(phys, &n_fam, NULL);
    VkQueueFamilyProperties fams[32];
    if (n_fam > 32) n_fam = 32;
    g_vk.fn.vkGetPhysicalDeviceQueueFamilyProperties(phys, &n_fam, fams);
    uint32_t family = UINT32_MAX;
    for (uint32_t i = 0; i < n_fam && family == UINT32_MAX; i++) /* prefer a compute family without graphics */
        if ((fams[i].queueFlags & VK_QUEUE_COMPUTE_BIT) && !(fams[i].queueFlags & VK_QUEUE_GRAPHICS_BIT)) family = i;
    for (uint32_t i = 0; i < n_fam && family == UINT32_MAX; i++)
        if (fams[i].queueFlags & VK_QUEUE_COMPUTE_BIT) family = i;
    if (!why && family == UINT32_MAX) why = "no compute queue";
    if (why) {
        pikv_log(ctx, PIKV_LOG_INFO, "vulkan: device '%s' skipped: %s", props.deviceName, why);
        return PIKV_OK;
    }

    pikv_device *d = pikv_host_calloc(ctx, 1, sizeof *d);
    pikv_vk_device *vd = pikv_host_calloc(ctx, 1, sizeof *vd);
    if (!d || !vd) {
        pikv_host_free(ctx, d);
        pikv_host_free(ctx, vd);
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "vulkan backend: allocation failed");
    }
    d->context = vd;
    vd->phys = phys;
    vd->queue_family = family;
    vd->limits = *lim;
    memcpy(vd->dev_name, props.deviceName, sizeof vd->dev_name);
    vd->dev_name[sizeof vd->dev_name - 1] = 0;
    g_vk.fn.vkGetPhysicalDeviceMemoryProperties(phys, &vd->mem_props);

    VkPhysicalDeviceSubgroupProperties sg = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_SUBGROUP_PROPERTIES};
    VkPhysicalDeviceProperties2 p2 = {.sType = VK_STRUCTURE_TYPE_PHYSICAL_DEVICE_PROPERTIES_2, .pNext = &sg};
    g_vk.fn.vkGetPhysicalDeviceProperties2(phys, &p2);
    const VkSubgroupFeatureFlags need = VK_SUBGROUP_FEATURE_BASIC_BIT | VK_SUBGROUP_FEATURE_ARITHMETIC_BIT;
    vd->use_subgroups = (sg.supportedStages & VK_SHADER_STAGE_COMPUTE_BIT) && (sg.supportedOperations & need) == need &&
                        sg.subgroupSize >= 1 && !env_on("PIKV_VULKAN_NO_SUBGROUPS");
    vd->subgroup_size = sg.subgroupSize;
    vd->wg = 64;
    vd->loop_limit = props.deviceType == VK_PHYSICAL_DEVICE_TYPE_CPU;
    if (lim->maxComputeWorkGroupInvocations < PIKV_VK_TOPK_WG || lim->maxComputeWorkGroupSize[0] < PIKV_VK_TOPK_WG) {
        pikv_log(ctx, PIKV_LOG_INFO, "vulkan: device '%s' skipped: workgroups under %d invocations",
                 props.deviceName, (int)PIKV_VK_TOPK_WG);
        pikv_host_free(ctx, vd);
        pikv_host_free(ctx, d);
        return PIKV_OK;
    }

    const char *what = NULL;
    VkResult r = create_device(vd, &what);
    if (r != VK_SUCCESS) {
        pikv_log(ctx, PIKV_LOG_WARN, "vulkan: device '%s' skipped: %s failed: %s (%d)", vd->dev_name, what,
                 pikv_vk_result_name(r), (int)r);
        vk_device_free(ctx, d);
        return PIKV_OK;
    }

    d->iface = &vk_device_iface;
    d->backend = b;
    d->ctx = ctx;
    pikv_device_info *info = &d->info;
    snprintf(info->name, sizeof info->name, "vulkan%d", (int)b->n_devices);
    char desc[320];
    snprintf(desc, sizeof desc, "%s (%s, Vulkan %u.%u.%u)", vd->dev_name, device_type_name(props.deviceType),
             VK_API_VERSION_MAJOR(props.apiVersion), VK_API_VERSION_MINOR(props.apiVersion),
             VK_API_VERSION_PATCH(props.apiVersion));
    size_t dl = strlen(desc);
    if (dl >= sizeof info->description) dl = sizeof info->description - 1;
    memcpy(info->description, desc, dl);
    info->description[dl] = 0;
    info->backend = PIKV_BACKEND_VULKAN;
    info->backend_index = b->n_devices;
    uint64_t device_local = 0;
    for (uint32_t i = 0; i < vd->mem_props.memoryHeapCount; i++)
        if (vd->mem_props.memoryHeaps[i].flags & VK_MEMORY_HEAP_DEVICE_LOCAL_BIT)
            device_local += vd->mem_props.memoryHeaps[i].size;
    info->caps.memory_total = device_local;
    info->caps.memory_limit = 0;
    info->caps.compute_units = 0; /* Vulkan does not say */
    info->caps.subgroup_size = vd->use_subgroups ? (int32_t)vd->subgroup_size : 1;
    info->caps.async_copies = 0; /* every op and copy finishes before it returns */
    info->caps.host_visible = props.deviceType == VK_PHYSICAL_DEVICE_TYPE_CPU ||
                              props.deviceType == VK_PHYSICAL_DEVICE_TYPE_INTEGRATED_GPU;
    info->caps.f16_storage = 1; /* packed in 32-bit words: no 16-bit storage feature needed */
    info->caps.int8_dot = 0;
    *out = d;
    return PIKV_OK;
}

/* Whether the loader offers layer `name` / instance extension `name` (of
   `layer`). The process-wide instance belongs to no context, so these use
   malloc rather than a context's allocator. */
static bool has_layer(const pikv_vk_loader *L, const char *name)
{
    uint32_t n = 0;
    if (L->vkEnumerateInstanceLayerProperties(&n, NULL) != VK_SUCCESS || n == 0) return false;
    VkLayerProperties *p = malloc((size_t)n * sizeof *p);
    bool found = false;
    if (p && L->vkEnumerateInstanceLayerProperties(&n, p) >= VK_SUCCESS)
        for (uint32_t i = 0; i < n && !found; i++) found = strcmp(p[i].layerName, name) == 0;
    free(p);
    return found;
}

static bool has_instance_extension(const pikv_vk_loader *L, const char *layer, const char *name)
{
    uint32_t n = 0;
    if (L->vkEnumerateInstanceExtensionProperties(layer, &n, NULL) != VK_SUCCESS || n == 0) return false;
    VkExtensionProperties *p = malloc((size_t)n * sizeof *p);
    bool found = false;
    if (p && L->vkEnumerateInstanceExtensionProperties(layer, &n, p) >= VK_SUCCESS)
        for (uint32_t i = 0; i < n && !found; i++) found = strcmp(p[i].extensionName, name) == 0;
    free(p);
    return found;
}

static const char VALIDATION_LAYER[] = "VK_LAYER_KHRONOS_validation";

static void create_process_instance(void)
{
    pikv_vk_process *P = &g_vk;
    if (!pikv_vk_loader_open(&P->loader)) {
        snprintf(P->error, sizeof P->error, "no loader (libvulkan.so.1)");
        return;
    }
    uint32_t version = VK_API_VERSION_1_0;
    if (P->loader.vkEnumerateInstanceVersion) P->loader.vkEnumerateInstanceVersion(&version);
    if (VK_API_VERSION_MAJOR(version) == 1 && VK_API_VERSION_MINOR(version) < 2) {
        snprintf(P->error, sizeof P->error, "the loader offers Vulkan %u.%u (1.2 needed)",
                 VK_API_VERSION_MAJOR(version), VK_API_VERSION_MINOR(version));
        return;
    }
    const char *layers[1], *exts[1];
    uint32_t n_layers = 0, n_exts = 0;
    P->validation_requested = env_on("PIKV_VULKAN_VALIDATION");
    if (P->validation_requested && has_layer(&P->loader, VALIDATION_LAYER)) {
        layers[n_layers++] = VALIDATION_LAYER;
        if (has_instance_extension(&P->loader, VALIDATION_LAYER, VK_EXT_DEBUG_UTILS_EXTENSION_NAME) ||
            has_instance_extension(&P->loader, NULL, VK_EXT_DEBUG_UTILS_EXTENSION_NAME))
            exts[n_exts++] = VK_EXT_DEBUG_UTILS_EXTENSION_NAME;
    }
    VkApplicationInfo app = {.sType = VK_STRUCTURE_TYPE_APPLICATION_INFO,
                             .pApplicationName = "pikv",
                             .pEngineName = "pikv",
                             .engineVersion = (uint32_t)PIKV_VERSION_NUMBER,
                             .apiVersion = VK_API_VERSION_1_2};
    VkInstanceCreateInfo ici = {.sType = VK_STRUCTURE_TYPE_INSTANCE_CREATE_INFO,
                                .pApplicationInfo = &app,
                                .enabledLayerCount = n_layers,
                                .ppEnabledLayerNames = layers,
                                .enabledExtensionCount = n_exts,
                                .ppEnabledExtensionNames = exts};
    VkResult r = P->loader.vkCreateInstance(&ici, NULL, &P->instance);
    if (r != VK_SUCCESS && n_layers) { /* a broken layer must not cost the devices: try without it */
        ici.enabledLayerCount = n_layers = 0;
        ici.enabledExtensionCount = n_exts = 0;
        r = P->loader.vkCreateInstance(&ici, NULL, &P->instance);
    }
    if (r != VK_SUCCESS) { /* VK_ERROR_INCOMPATIBLE_DRIVER: no driver installed */
        P->instance = VK_NULL_HANDLE;
        snprintf(P->error, sizeof P->error, "vkCreateInstance: %s", pikv_vk_result_name(r));
        return;
    }
    const char *missing = NULL;
    if (!pikv_vk_load_instance_fns(&P->loader, P->instance, &P->fn, &missing)) {
        PFN_vkDestroyInstance destroy =
            (PFN_vkDestroyInstance)P->loader.vkGetInstanceProcAddr(P->instance, "vkDestroyInstance");
        if (destroy) destroy(P->instance, NULL);
        P->instance = VK_NULL_HANDLE;
        snprintf(P->error, sizeof P->error, "the loader lacks %s", missing);
        return;
    }
    P->validation = n_layers > 0;
    P->debug_utils = n_exts > 0 && P->fn.vkCreateDebugUtilsMessengerEXT && P->fn.vkDestroyDebugUtilsMessengerEXT;
}

pikv_status pikv_backend_vulkan_init(pikv_context *ctx, const pikv_context_params *params, pikv_backend **out)
{
    (void)params;
    *out = NULL;
    pikv_backend *b = pikv_host_calloc(ctx, 1, sizeof *b);
    pikv_vk_backend *vb = pikv_host_calloc(ctx, 1, sizeof *vb);
    if (b) b->devices = pikv_host_calloc(ctx, MAX_VK_DEVICES, sizeof *b->devices);
    if (!b || !vb || !b->devices) {
        if (b) pikv_host_free(ctx, b->devices);
        pikv_host_free(ctx, b);
        pikv_host_free(ctx, vb);
        return PIKV_FAIL(ctx, PIKV_ERR_OUT_OF_MEMORY, "vulkan backend: allocation failed");
    }
    b->iface = &vk_backend_iface;
    b->kind = PIKV_BACKEND_VULKAN;
    b->ctx = ctx;
    b->context = vb;
    vb->ctx = ctx;
    *out = b;

    pthread_once(&g_process_once, create_process_instance);
    if (!g_vk.instance) {
        pikv_log(ctx, PIKV_LOG_INFO, "vulkan: %s: the backend has no devices", g_vk.error);
        return PIKV_OK;
    }
    if (g_vk.validation_requested && !g_vk.validation)
        pikv_log(ctx, PIKV_LOG_WARN, "vulkan: PIKV_VULKAN_VALIDATION is set but %s is not installed "
                 "(Debian: vulkan-validationlayers)", VALIDATION_LAYER);
    if (g_vk.validation) {
        VkDebugUtilsMessengerCreateInfoEXT mci = {
            .sType = VK_STRUCTURE_TYPE_DEBUG_UTILS_MESSENGER_CREATE_INFO_EXT,
            .messageSeverity =
                VK_DEBUG_UTILS_MESSAGE_SEVERITY_WARNING_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_SEVERITY_ERROR_BIT_EXT,
            .messageType = VK_DEBUG_UTILS_MESSAGE_TYPE_GENERAL_BIT_EXT | VK_DEBUG_UTILS_MESSAGE_TYPE_VALIDATION_BIT_EXT |
                           VK_DEBUG_UTILS_MESSAGE_TYPE_PERFORMANCE_BIT_EXT,
            .pfnUserCallback = on_validation_message,
            .pUserData = vb};
        if (g_vk.debug_utils && g_vk.fn.vkCreateDebugUtilsMessengerEXT(g_vk.instance, &mci, NULL, &vb->messenger) ==
                                    VK_SUCCESS)
            pikv_log(ctx, PIKV_LOG_INFO, "vulkan: validation: on (%s, messages through the log callback)",
                     VALIDATION_LAYER);
        else
            pikv_log(ctx, PIKV_LOG_WARN, "vulkan: validation layer on, but its messages cannot be captured");
    }

    uint32_t n_phys = 0;
    VkResult r = g_vk.fn.vkEnumeratePhysicalDevices(g_vk.instance, &n_phys, NULL);
    VkPhysicalDevice phys[MAX_VK_DEVICES];
    if (n_phys > MAX_VK_DEVICES) n_phys = MAX_VK_DEVICES;
    if (r >= VK_SUCCESS && n_phys) r = g_vk.fn.vkEnumeratePhysicalDevices(g_vk.instance, &n_phys, phys);
    if (r < VK_SUCCESS) n_phys = 0;
    for (uint32_t i = 0; i < n_phys; i++) {
        pikv_device *d = NULL;
        pikv_status st = open_device(ctx, b, phys[i], &d);
        if (st != PIKV_OK) {
            *out = NULL;
            vk_backend_free(b);
            return st;
        }
        if (d) b->devices[b->n_devices++] = d;
    }
    pikv_log(ctx, PIKV_LOG_INFO, "vulkan: %d device%s", (int)b->n_devices, b->n_devices == 1 ? "" : "s");
    return PIKV_OK;
}
