/* Private declarations of the Vulkan compute backend.
 *
 * The Vulkan loader is opened at run time (dlopen of libvulkan.so.1): a build
 * with the backend runs on machines without Vulkan, whose context then simply
 * has no Vulkan devices. Function pointers come from vkGetInstanceProcAddr /
 * vkGetDeviceProcAddr (vulkan-loader.c).
 *
 * Per device: one queue (a family with compute, which implies transfer), one
 * command buffer and one timeline semaphore; every op records its dispatches,
 * submits once and waits, so the host arrays of its arguments may go away when
 * it returns. Page chunks are VkBuffers sub-allocated from large device-local
 * memory blocks (vulkan-memory.c); host data moves through a host-visible
 * staging buffer; op inputs and outputs live in host-visible scratch buffers
 * that the shaders read and write directly.
 *
 * Kernels see one chunk buffer per dispatch, like the OpenCL backend: the ops
 * group their pages by chunk on the host (backends/common/chunk-plan.h) and
 * dispatch once per chunk touched. Shaders (backends/vulkan/shaders) are
 * compiled to SPIR-V by glslc at build time and embedded in the library;
 * sizes go in push constants, the workgroup size and shared-array sizes in
 * specialization constants. */
#ifndef PIKV_VULKAN_IMPL_H
#define PIKV_VULKAN_IMPL_H

#define VK_NO_PROTOTYPES
#include <vulkan/vulkan.h>

#include "../../runtime/backend-impl.h"

/* ---- function tables (vulkan-loader.c) ------------------------------------- */

#define PIKV_VK_INSTANCE_FNS(X)                                                                          \
    X(vkDestroyInstance) X(vkEnumeratePhysicalDevices) X(vkGetPhysicalDeviceProperties)                  \
    X(vkGetPhysicalDeviceProperties2) X(vkGetPhysicalDeviceFeatures2) X(vkGetPhysicalDeviceQueueFamilyProperties) \
    X(vkGetPhysicalDeviceMemoryProperties) X(vkCreateDevice) X(vkGetDeviceProcAddr)

#define PIKV_VK_DEVICE_FNS(X)                                                                            \
    X(vkDestroyDevice) X(vkGetDeviceQueue) X(vkCreateBuffer) X(vkDestroyBuffer)                          \
    X(vkGetBufferMemoryRequirements) X(vkAllocateMemory) X(vkFreeMemory) X(vkBindBufferMemory)           \
    X(vkMapMemory) X(vkUnmapMemory) X(vkCreateCommandPool) X(vkDestroyCommandPool)                       \
    X(vkAllocateCommandBuffers) X(vkResetCommandBuffer) X(vkBeginCommandBuffer) X(vkEndCommandBuffer)    \
    X(vkCmdCopyBuffer) X(vkCmdFillBuffer) X(vkCmdPipelineBarrier) X(vkCmdBindPipeline)                   \
    X(vkCmdBindDescriptorSets) X(vkCmdPushConstants) X(vkCmdDispatch) X(vkQueueSubmit)                   \
    X(vkDeviceWaitIdle) X(vkCreateSemaphore) X(vkDestroySemaphore) X(vkWaitSemaphores)                   \
    X(vkCreateShaderModule) X(vkDestroyShaderModule) X(vkCreateDescriptorSetLayout)                      \
    X(vkDestroyDescriptorSetLayout) X(vkCreatePipelineLayout) X(vkDestroyPipelineLayout)                 \
    X(vkCreateComputePipelines) X(vkDestroyPipeline) X(vkCreateDescriptorPool) X(vkDestroyDescriptorPool) \
    X(vkResetDescriptorPool) X(vkAllocateDescriptorSets) X(vkUpdateDescriptorSets)

#define PIKV_VK_DECLARE_FN(name) PFN_##name name;

typedef struct pikv_vk_instance_fns {
    PIKV_VK_INSTANCE_FNS(PIKV_VK_DECLARE_FN)
    PFN_vkCreateDebugUtilsMessengerEXT vkCreateDebugUtilsMessengerEXT;   /* NULL without the extension */
    PFN_vkDestroyDebugUtilsMessengerEXT vkDestroyDebugUtilsMessengerEXT;
} pikv_vk_instance_fns;

typedef struct pikv_vk_device_fns {
    PIKV_VK_DEVICE_FNS(PIKV_VK_DECLARE_FN)
} pikv_vk_device_fns;

/* The loader library (NULL when there is none) and its global functions. */
typedef struct pikv_vk_loader {
    void *library;
    PFN_vkGetInstanceProcAddr vkGetInstanceProcAddr;
    PFN_vkCreateInstance vkCreateInstance;
    PFN_vkEnumerateInstanceVersion vkEnumerateInstanceVersion;
    PFN_vkEnumerateInstanceLayerProperties vkEnumerateInstanceLayerProperties;
    PFN_vkEnumerateInstanceExtensionProperties vkEnumerateInstanceExtensionProperties;
} pikv_vk_loader;

/* Opens the loader (once per process; it is never closed); false when it is
   not installed or lacks its global functions. */
bool pikv_vk_loader_open(pikv_vk_loader *loader);
/* false when a required function is missing (names it in *missing). */
bool pikv_vk_load_instance_fns(const pikv_vk_loader *loader, VkInstance inst, pikv_vk_instance_fns *fns,
                               const char **missing);
bool pikv_vk_load_device_fns(const pikv_vk_instance_fns *ifns, VkDevice dev, pikv_vk_device_fns *fns,
                             const char **missing);

/* ---- memory (vulkan-memory.c) ----------------------------------------------- */

/* A large VkDeviceMemory block with a sorted free list of byte ranges. */
typedef struct pikv_vk_range {
    VkDeviceSize offset, size;
} pikv_vk_range;

typedef struct pikv_vk_block {
    VkDeviceMemory memory;
    VkDeviceSize size;
    uint32_t type;
    int32_t n_free;
    int64_t free_cap;
    pikv_vk_range *free;
    struct pikv_vk_block *next;
} pikv_vk_block;

/* What pikv_buffer.handle points at. */
typedef struct pikv_vk_buffer {
    VkBuffer buffer;
    pikv_vk_block *block;
    VkDeviceSize offset, size; /* the range taken from the block */
} pikv_vk_buffer;

/* A host-visible buffer with its own memory, persistently mapped. */
typedef struct pikv_vk_host_buffer {
    VkBuffer buffer;
    VkDeviceMemory memory;
    VkDeviceSize size;
    void *map;
} pikv_vk_host_buffer;

/* ---- pipelines (vulkan-pipelines.c) ----------------------------------------- */

typedef enum pikv_vk_kernel {
    PIKV_VK_K_APPEND = 0,
    PIKV_VK_K_PAGE_COPY,
    PIKV_VK_K_ATTENTION,
    PIKV_VK_K_ATTENTION_FINISH,
    PIKV_VK_K_MERGE,
    PIKV_VK_K_SCORE,
    PIKV_VK_K_TOPK,
    PIKV_VK_K_QUANT_KEYS,
    PIKV_VK_K_QUANT_VALUES,
    PIKV_VK_K_READ_REDUCE,
    PIKV_VK_K_COUNT_
} pikv_vk_kernel;

enum { PIKV_VK_PUSH_BYTES = 32, PIKV_VK_MAX_BINDINGS = 10, PIKV_VK_ATTN_CACHE = 32 };

/* Top-k runs one workgroup of this size per list; read_reduce's workgroups are
   this size too (wide enough for a GPU's coalesced runs). */
enum { PIKV_VK_TOPK_WG = 256, PIKV_VK_REDUCE_WG = 256 };

/* llvmpipe (Mesa's CPU driver, lavapipe's engine) stops a loop nest after
   65535 iterations in total per outermost loop, silently. On CPU-type devices
   the ops keep every invocation's loop nests under this bound, or report the
   shape as unsupported rather than compute a wrong result. */
enum { PIKV_VK_CPU_LOOP_LIMIT = 60000 };

/* An attention pipeline specialized for one (workgroup, shared sizes). */
typedef struct pikv_vk_attn_pipeline {
    uint32_t sc_size, acc_size, max_g;
    VkPipeline pipeline;
    uint64_t last_use;
} pikv_vk_attn_pipeline;

enum { PIKV_VK_SCRATCH = 13 };

typedef struct pikv_vk_device {
    pikv_vk_device_fns fn;
    VkPhysicalDevice phys;
    VkDevice device;
    VkQueue queue;
    uint32_t queue_family;
    VkPhysicalDeviceMemoryProperties mem_props;
    VkPhysicalDeviceLimits limits;
    char dev_name[VK_MAX_PHYSICAL_DEVICE_NAME_SIZE];
    bool use_subgroups;        /* the subgroup variant of the attention shader */
    uint32_t subgroup_size;
    uint32_t wg;               /* workgroup size of the shaders but top-k (power of two) */
    bool loop_limit;           /* a CPU device: llvmpipe's loop limit applies */

    VkCommandPool cmd_pool;
    VkCommandBuffer cmd;
    bool recording;
    VkSemaphore timeline;
    uint64_t timeline_value;
    VkDescriptorPool desc_pool;

    /* memory */
    pikv_vk_block *blocks;
    pikv_vk_host_buffer staging;
    pikv_vk_host_buffer scratch[PIKV_VK_SCRATCH];

    /* pipelines, created on first use */
    bool pipelines_tried;
    pikv_status pipelines_status;
    char pipelines_error[PIKV_ERROR_LEN];
    VkDescriptorSetLayout set_layout[PIKV_VK_K_COUNT_];
    VkPipelineLayout pipe_layout[PIKV_VK_K_COUNT_];
    VkShaderModule module[PIKV_VK_K_COUNT_];
    VkPipeline pipeline[PIKV_VK_K_COUNT_]; /* all but attention */
    pikv_vk_attn_pipeline attn[PIKV_VK_ATTN_CACHE];
    int32_t n_attn;
    uint64_t attn_clock;
} pikv_vk_device;

static inline pikv_vk_device *pikv_vk_dev(pikv_device *dev)
{
    return (pikv_vk_device *)dev->context;
}

/* "VK_ERROR_OUT_OF_DEVICE_MEMORY" etc. (vulkan-backend.c) */
const char *pikv_vk_result_name(VkResult r);
/* Records "device X: what failed: VK_..." as PIKV_ERR_BACKEND (OUT_OF_MEMORY
   for allocation failures) and returns it. */
pikv_status pikv_vk_fail(pikv_device *dev, VkResult r, const char *what);

/* vulkan-memory.c */
pikv_status pikv_vk_buffer_alloc(pikv_device *dev, uint64_t size, pikv_buffer **out);
void pikv_vk_buffer_free(pikv_device *dev, pikv_buffer *buf);
pikv_status pikv_vk_buffer_write(pikv_device *dev, pikv_buffer *buf, uint64_t offset, const void *src,
                                 uint64_t size);
pikv_status pikv_vk_buffer_read(pikv_device *dev, const pikv_buffer *buf, uint64_t offset, void *dst,
                                uint64_t size);
/* Scratch buffer i with at least size bytes (contents not kept on growth). */
pikv_status pikv_vk_scratch(pikv_device *dev, int i, size_t size, pikv_vk_host_buffer **out);
/* Copies size bytes of host data into scratch buffer i. */
pikv_status pikv_vk_upload(pikv_device *dev, int i, const void *src, size_t size, pikv_vk_host_buffer **out);
void pikv_vk_memory_free(pikv_context *ctx, pikv_vk_device *vd);

/* vulkan-pipelines.c: pipelines built on first use (later calls return the
   first outcome), and command recording. */
pikv_status pikv_vk_ready(pikv_device *dev);
void pikv_vk_pipelines_free(pikv_vk_device *vd);
/* The attention pipeline for G query heads per KV head, page_size, head_dim. */
pikv_status pikv_vk_attention_pipeline(pikv_device *dev, int32_t G, int32_t page_size, int32_t head_dim,
                                       VkPipeline *out);

/* Starts recording (no-op when already recording). */
pikv_status pikv_vk_begin(pikv_device *dev);
/* Records one dispatch of `kernel` (pipeline: NULL for the kernel's own) over
   `groups` workgroups, with bindings 0..n-1 = buffers and the push constants. */
pikv_status pikv_vk_dispatch(pikv_device *dev, pikv_vk_kernel kernel, VkPipeline pipeline, const VkBuffer *buffers,
                             int n, const void *push, uint32_t push_size, uint64_t groups);
/* The same with binding i = bytes [offsets[i], offsets[i] + ranges[i]) of
   buffers[i] (offsets: multiples of minStorageBufferOffsetAlignment; ranges: at
   most maxStorageBufferRange), for buffers larger than one binding may be. */
pikv_status pikv_vk_dispatch_ranges(pikv_device *dev, pikv_vk_kernel kernel, VkPipeline pipeline,
                                    const VkBuffer *buffers, const VkDeviceSize *offsets,
                                    const VkDeviceSize *ranges, int n, const void *push, uint32_t push_size,
                                    uint64_t groups);
/* Orders everything recorded so far before what follows (shader and transfer
   writes made visible to shaders, transfers and the host). */
void pikv_vk_barrier(pikv_device *dev);
/* Ends, submits and waits for what was recorded (no-op when nothing is). */
pikv_status pikv_vk_submit(pikv_device *dev);
/* Drops what was recorded after a failure (waits for the queue first). */
void pikv_vk_abandon(pikv_device *dev);

/* vulkan-ops.c */
pikv_status pikv_vk_append(pikv_device *dev, const pikv_append_args *args);
pikv_status pikv_vk_page_copy(pikv_device *dev, const pikv_page_copy_args *args);
pikv_status pikv_vk_attention(pikv_device *dev, const pikv_attention_args *args);
pikv_status pikv_vk_merge(pikv_device *dev, const pikv_merge_args *args);
pikv_status pikv_vk_score(pikv_device *dev, const pikv_score_args *args);
pikv_status pikv_vk_quantize(pikv_device *dev, pikv_quantize_args *args);
pikv_status pikv_vk_topk(pikv_device *dev, const pikv_topk_args *args);
pikv_status pikv_vk_read_reduce(pikv_device *dev, const pikv_read_reduce_args *args);

/* The embedded SPIR-V (generated by cmake/embed-spirv.cmake). */
typedef struct pikv_vk_spirv {
    const char *name;
    const uint32_t *code;
    size_t size; /* bytes */
} pikv_vk_spirv;
extern const pikv_vk_spirv pikv_vk_shaders[];
extern const int pikv_vk_n_shaders;

#endif /* PIKV_VULKAN_IMPL_H */
