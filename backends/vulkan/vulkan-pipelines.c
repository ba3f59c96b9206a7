/* Vulkan pipelines (from the embedded SPIR-V) and command recording. */
#include "vulkan-impl.h"

#include <stdio.h>
#include <string.h>

typedef struct kernel_desc {
    const char *spirv;          /* embedded module name */
    const char *spirv_subgroups; /* variant with subgroup operations, or NULL */
    int n_bindings;
} kernel_desc;

static const kernel_desc KERNELS[PIKV_VK_K_COUNT_] = {
    [PIKV_VK_K_APPEND] = {"append", NULL, 7},
    [PIKV_VK_K_PAGE_COPY] = {"page_copy", NULL, 3},
    [PIKV_VK_K_ATTENTION] = {"attention", "attention_subgroups", 10},
    [PIKV_VK_K_ATTENTION_FINISH] = {"attention_finish", NULL, 5},
    [PIKV_VK_K_MERGE] = {"merge", NULL, 4},
    [PIKV_VK_K_SCORE] = {"select", NULL, 7},
    [PIKV_VK_K_TOPK] = {"topk", NULL, 6},
    [PIKV_VK_K_QUANT_KEYS] = {"quant_keys", NULL, 4},
    [PIKV_VK_K_QUANT_VALUES] = {"quant_values", NULL, 4},
    [PIKV_VK_K_READ_REDUCE] = {"read_reduce", "read_reduce_subgroups", 3},
};

static const pikv_vk_spirv *find_spirv(const char *name)
{
    for (int i = 0; i < pikv_vk_n_shaders; i++)
        if (strcmp(pikv_vk_shaders[i].name, name) == 0) return &pikv_vk_shaders[i];
    return NULL;
}

/* A compute pipeline of kernel k with specialization constants 0..n_spec-1. */
static VkResult create_pipeline(pikv_vk_device *vd, pikv_vk_kernel k, const uint32_t *spec, uint32_t n_spec,
                                VkPipeline *out)
{
    VkSpecializationMapEntry entries[4];
    for (uint32_t i = 0; i < n_spec; i++)
        entries[i] = (VkSpecializationMapEntry){.constantID = i, .offset = 4 * i, .size = 4};
    VkSpecializationInfo si = {.mapEntryCount = n_spec, .pMapEntries = entries, .dataSize = 4 * n_spec, .pData = spec};
    VkComputePipelineCreateInfo ci = {
        .sType = VK_STRUCTURE_TYPE_COMPUTE_PIPELINE_CREATE_INFO,
        .stage = {.sType = VK_STRUCTURE_TYPE_PIPELINE_SHADER_STAGE_CREATE_INFO,
                  .stage = VK_SHADER_STAGE_COMPUTE_BIT,
                  .module = vd->module[k],
                  .pName = "main",
                  .pSpecializationInfo = &si},
        .layout = vd->pipe_layout[k]};
    return vd->fn.vkCreateComputePipelines(vd->device, VK_NULL_HANDLE, 1, &ci, NULL, out);
}

static pikv_status build(pikv_device *dev)
{
    pikv_vk_device *vd = pikv_vk_dev(dev);
    for (int k = 0; k < PIKV_VK_K_COUNT_; k++) {
        const kernel_desc *kd = &KERNELS[k];
        const char *name = vd->use_subgroups && kd->spirv_subgroups ? kd->spirv_subgroups : kd->spirv;
        const pikv_vk_spirv *code = find_spirv(name);
        PIKV_RETURN_ERROR_IF(!code, dev->ctx, PIKV_ERR_INTERNAL, "vulkan: shader '%s' is not embedded", name);
        VkShaderModuleCreateInfo smi = {.sType = VK_STRUCTURE_TYPE_SHADER_MODULE_CREATE_INFO,
                                        .codeSize = code->size,
                                        .pCode = code->code};
        VkResult r = vd->fn.vkCreateShaderModule(vd->device, &smi, NULL, &vd->module[k]);
        if (r != VK_SUCCESS) return pikv_vk_fail(dev, r, "vkCreateShaderModule");
        VkDescriptorSetLayoutBinding b[PIKV_VK_MAX_BINDINGS];
        for (int i = 0; i < kd->n_bindings; i++)
            b[i] = (VkDescriptorSetLayoutBinding){.binding = (uint32_t)i,
                                                  .descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
                                                  .descriptorCount = 1,
                                                  .stageFlags = VK_SHADER_STAGE_COMPUTE_BIT};
        VkDescriptorSetLayoutCreateInfo dli = {.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_LAYOUT_CREATE_INFO,
                                               .bindingCount = (uint32_t)kd->n_bindings,
                                               .pBindings = b};
        r = vd->fn.vkCreateDescriptorSetLayout(vd->device, &dli, NULL, &vd->set_layout[k]);
        if (r != VK_SUCCESS) return pikv_vk_fail(dev, r, "vkCreateDescriptorSetLayout");
        VkPushConstantRange pr = {.stageFlags = VK_SHADER_STAGE_COMPUTE_BIT, .offset = 0, .size = PIKV_VK_PUSH_BYTES};
        VkPipelineLayoutCreateInfo pli = {.sType = VK_STRUCTURE_TYPE_PIPELINE_LAYOUT_CREATE_INFO,
                                          .setLayoutCount = 1,
                                          .pSetLayouts = &vd->set_layout[k],
                                          .pushConstantRangeCount = 1,
                                          .pPushConstantRanges = &pr};
        r = vd->fn.vkCreatePipelineLayout(vd->device, &pli, NULL, &vd->pipe_layout[k]);
        if (r != VK_SUCCESS) return pikv_vk_fail(dev, r, "vkCreatePipelineLayout");
        if (k == PIKV_VK_K_ATTENTION) continue; /* specialized per geometry, on demand */
        const uint32_t wg = k == PIKV_VK_K_TOPK          ? PIKV_VK_TOPK_WG
                            : k == PIKV_VK_K_READ_REDUCE ? PIKV_VK_REDUCE_WG
                                                         : vd->wg;
        r = create_pipeline(vd, (pikv_vk_kernel)k, &wg, 1, &vd->pipeline[k]);
        if (r != VK_SUCCESS) return pikv_vk_fail(dev, r, "vkCreateComputePipelines");
    }
    return PIKV_OK;
}

void pikv_vk_pipelines_free(pikv_vk_device *vd)
{
    for (int i = 0; i < vd->n_attn; i++) vd->fn.vkDestroyPipeline(vd->device, vd->attn[i].pipeline, NULL);
    vd->n_attn = 0;
    for (int k = 0; k < PIKV_VK_K_COUNT_; k++) {
        if (vd->pipeline[k]) vd->fn.vkDestroyPipeline(vd->device, vd->pipeline[k], NULL);
        if (vd->pipe_layout[k]) vd->fn.vkDestroyPipelineLayout(vd->device, vd->pipe_layout[k], NULL);
        if (vd->set_layout[k]) vd->fn.vkDestroyDescriptorSetLayout(vd->device, vd->set_layout[k], NULL);
        if (vd->module[k]) vd->fn.vkDestroyShaderModule(vd->device, vd->module[k], NULL);
        vd->pipeline[k] = VK_NULL_HANDLE;
        vd->pipe_layout[k] = VK_NULL_HANDLE;
        vd->set_layout[k] = VK_NULL_HANDLE;
        vd->module[k] = VK_NULL_HANDLE;
    }
}

pikv_status pikv_vk_ready(pikv_device *dev)
{
    pikv_vk_device *vd = pikv_vk_dev(dev);
    if (!vd->pipelines_tried) {
        pikv_status st = build(dev);
        if (st != PIKV_OK) {
            snprintf(vd->pipelines_error, sizeof vd->pipelines_error, "%s", pikv_context_last_error(dev->ctx));
            pikv_vk_pipelines_free(vd);
            /* running out of memory may pass: try again on the next op */
            if (st == PIKV_ERR_OUT_OF_MEMORY) return st;
        }
        vd->pipelines_tried = true;
        vd->pipelines_status = st;
    }
    PIKV_RETURN_ERROR_IF(vd->pipelines_status != PIKV_OK, dev->ctx, vd->pipelines_status,
                         "device %s: the Vulkan pipelines could not be built: %s", dev->info.name,
                         vd->pipelines_error);
    return PIKV_OK;
}

pikv_status pikv_vk_attention_pipeline(pikv_device *dev, int32_t G, int32_t page_size, int32_t head_dim,
                                       VkPipeline *out)
{
    pikv_vk_device *vd = pikv_vk_dev(dev);
    const uint32_t sc = (uint32_t)G * (uint32_t)page_size, acc = (uint32_t)G * (uint32_t)head_dim, g = (uint32_t)G;
    const uint64_t shared = ((uint64_t)sc + acc + vd->wg + 3u * g) * sizeof(float);
    PIKV_RETURN_ERROR_IF(shared > vd->limits.maxComputeSharedMemorySize, dev->ctx, PIKV_ERR_UNSUPPORTED,
                         "device %s: attention needs %llu bytes of shared memory (G %d, page %d, head_dim %d); "
                         "the device has %u", dev->info.name, (unsigned long long)shared, (int)G, (int)page_size,
                         (int)head_dim, (unsigned)vd->limits.maxComputeSharedMemorySize);
    vd->attn_clock++;
    for (int i = 0; i < vd->n_attn; i++)
        if (vd->attn[i].sc_size == sc && vd->attn[i].acc_size == acc && vd->attn[i].max_g == g) {
            vd->attn[i].last_use = vd->attn_clock;
            *out = vd->attn[i].pipeline;
            return PIKV_OK;
        }
    int slot = vd->n_attn;
    if (slot == PIKV_VK_ATTN_CACHE) { /* replace the least recently used (the device is idle between ops) */
        slot = 0;
        for (int i = 1; i < vd->n_attn; i++)
            if (vd->attn[i].last_use < vd->attn[slot].last_use) slot = i;
        vd->fn.vkDestroyPipeline(vd->device, vd->attn[slot].pipeline, NULL);
        vd->attn[slot] = vd->attn[--vd->n_attn];
        slot = vd->n_attn;
    }
    const uint32_t spec[4] = {vd->wg, sc, acc, g};
    VkPipeline p = VK_NULL_HANDLE;
    VkResult r = create_pipeline(vd, PIKV_VK_K_ATTENTION, spec, 4, &p);
    if (r != VK_SUCCESS) return pikv_vk_fail(dev, r, "vkCreateComputePipelines (attention)");
    vd->attn[slot] = (pikv_vk_attn_pipeline){sc, acc, g, p, vd->attn_clock};
    vd->n_attn++;
    *out = p;
    return PIKV_OK;
}

/* ---- command recording --------------------------------------------------------- */

static void full_barrier(pikv_vk_device *vd, VkPipelineStageFlags dst_stage, VkAccessFlags dst_access)
{
    VkMemoryBarrier mb = {.sType = VK_STRUCTURE_TYPE_MEMORY_BARRIER,
                          .srcAccessMask = VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_WRITE_BIT |
                                           VK_ACCESS_HOST_WRITE_BIT,
                          .dstAccessMask = dst_access};
    vd->fn.vkCmdPipelineBarrier(vd->cmd, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT |
                                             VK_PIPELINE_STAGE_HOST_BIT,
                                dst_stage, 0, 1, &mb, 0, NULL, 0, NULL);
}

pikv_status pikv_vk_begin(pikv_device *dev)
{
    pikv_vk_device *vd = pikv_vk_dev(dev);
    if (vd->recording) return PIKV_OK;
    VkResult r = vd->fn.vkResetDescriptorPool(vd->device, vd->desc_pool, 0);
    if (r != VK_SUCCESS) return pikv_vk_fail(dev, r, "vkResetDescriptorPool");
    VkCommandBufferBeginInfo bi = {.sType = VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO,
                                   .flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT};
    r = vd->fn.vkBeginCommandBuffer(vd->cmd, &bi);
    if (r != VK_SUCCESS) return pikv_vk_fail(dev, r, "vkBeginCommandBuffer");
    vd->recording = true;
    /* what earlier submissions and the host wrote is visible to this one */
    full_barrier(vd, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT,
                 VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_READ_BIT |
                     VK_ACCESS_TRANSFER_WRITE_BIT);
    return PIKV_OK;
}

void pikv_vk_barrier(pikv_device *dev)
{
    pikv_vk_device *vd = pikv_vk_dev(dev);
    full_barrier(vd, VK_PIPELINE_STAGE_COMPUTE_SHADER_BIT | VK_PIPELINE_STAGE_TRANSFER_BIT,
                 VK_ACCESS_SHADER_READ_BIT | VK_ACCESS_SHADER_WRITE_BIT | VK_ACCESS_TRANSFER_READ_BIT |
                     VK_ACCESS_TRANSFER_WRITE_BIT);
}

pikv_status pikv_vk_submit(pikv_device *dev)
{
    pikv_vk_device *vd = pikv_vk_dev(dev);
    if (!vd->recording) return PIKV_OK;
    full_barrier(vd, VK_PIPELINE_STAGE_HOST_BIT, VK_ACCESS_HOST_READ_BIT); /* results readable by the host */
    vd->recording = false;
    VkResult r = vd->fn.vkEndCommandBuffer(vd->cmd);
    if (r != VK_SUCCESS) return pikv_vk_fail(dev, r, "vkEndCommandBuffer");
    const uint64_t value = vd->timeline_value + 1;
    VkTimelineSemaphoreSubmitInfo ts = {.sType = VK_STRUCTURE_TYPE_TIMELINE_SEMAPHORE_SUBMIT_INFO,
                                        .signalSemaphoreValueCount = 1,
                                        .pSignalSemaphoreValues = &value};
    VkSubmitInfo si = {.sType = VK_STRUCTURE_TYPE_SUBMIT_INFO,
                       .pNext = &ts,
                       .commandBufferCount = 1,
                       .pCommandBuffers = &vd->cmd,
                       .signalSemaphoreCount = 1,
                       .pSignalSemaphores = &vd->timeline};
    r = vd->fn.vkQueueSubmit(vd->queue, 1, &si, VK_NULL_HANDLE);
    if (r != VK_SUCCESS) return pikv_vk_fail(dev, r, "vkQueueSubmit");
    vd->timeline_value = value;
    VkSemaphoreWaitInfo wi = {.sType = VK_STRUCTURE_TYPE_SEMAPHORE_WAIT_INFO,
                              .semaphoreCount = 1,
                              .pSemaphores = &vd->timeline,
                              .pValues = &value};
    r = vd->fn.vkWaitSemaphores(vd->device, &wi, UINT64_MAX);
    if (r != VK_SUCCESS) return pikv_vk_fail(dev, r, "vkWaitSemaphores");
    return PIKV_OK;
}

void pikv_vk_abandon(pikv_device *dev)
{
    pikv_vk_device *vd = pikv_vk_dev(dev);
    vd->fn.vkDeviceWaitIdle(vd->device);
    if (vd->recording) {
        vd->fn.vkEndCommandBuffer(vd->cmd);
        vd->recording = false;
    }
    vd->fn.vkResetCommandBuffer(vd->cmd, 0);
}

pikv_status pikv_vk_dispatch(pikv_device *dev, pikv_vk_kernel k, VkPipeline pipeline, const VkBuffer *buffers, int n,
                             const void *push, uint32_t push_size, uint64_t groups)
{
    return pikv_vk_dispatch_ranges(dev, k, pipeline, buffers, NULL, NULL, n, push, push_size, groups);
}

pikv_status pikv_vk_dispatch_ranges(pikv_device *dev, pikv_vk_kernel k, VkPipeline pipeline, const VkBuffer *buffers,
                                    const VkDeviceSize *offsets, const VkDeviceSize *ranges, int n, const void *push,
                                    uint32_t push_size, uint64_t groups)
{
    pikv_vk_device *vd = pikv_vk_dev(dev);
    if (groups == 0) return PIKV_OK;
    const uint64_t max_x = vd->limits.maxComputeWorkGroupCount[0], max_y = vd->limits.maxComputeWorkGroupCount[1];
    const uint64_t gx = groups < max_x ? groups : max_x, gy = (groups + gx - 1) / gx;
    PIKV_RETURN_ERROR_IF(gy > max_y, dev->ctx, PIKV_ERR_UNSUPPORTED,
                         "device %s: %llu workgroups in one dispatch are past the device's limits", dev->info.name,
                         (unsigned long long)groups);
    PIKV_FORWARD_IF_ERROR(pikv_vk_begin(dev));
    VkDescriptorSetAllocateInfo ai = {.sType = VK_STRUCTURE_TYPE_DESCRIPTOR_SET_ALLOCATE_INFO,
                                      .descriptorPool = vd->desc_pool,
                                      .descriptorSetCount = 1,
                                      .pSetLayouts = &vd->set_layout[k]};
    VkDescriptorSet set = VK_NULL_HANDLE;
    VkResult r = vd->fn.vkAllocateDescriptorSets(vd->device, &ai, &set);
    if (r == VK_ERROR_OUT_OF_POOL_MEMORY || r == VK_ERROR_FRAGMENTED_POOL) {
        /* the pool is spent: run what was recorded, which frees its sets, and go on */
        PIKV_FORWARD_IF_ERROR(pikv_vk_submit(dev));
        PIKV_FORWARD_IF_ERROR(pikv_vk_begin(dev));
        r = vd->fn.vkAllocateDescriptorSets(vd->device, &ai, &set);
    }
    if (r != VK_SUCCESS) return pikv_vk_fail(dev, r, "vkAllocateDescriptorSets");
    VkDescriptorBufferInfo info[PIKV_VK_MAX_BINDINGS];
    VkWriteDescriptorSet w[PIKV_VK_MAX_BINDINGS];
    for (int i = 0; i < n; i++) {
        info[i] = (VkDescriptorBufferInfo){.buffer = buffers[i],
                                           .offset = offsets ? offsets[i] : 0,
                                           .range = ranges ? ranges[i] : VK_WHOLE_SIZE};
        w[i] = (VkWriteDescriptorSet){.sType = VK_STRUCTURE_TYPE_WRITE_DESCRIPTOR_SET,
                                      .dstSet = set,
                                      .dstBinding = (uint32_t)i,
                                      .descriptorCount = 1,
                                      .descriptorType = VK_DESCRIPTOR_TYPE_STORAGE_BUFFER,
                                      .pBufferInfo = &info[i]};
    }
    vd->fn.vkUpdateDescriptorSets(vd->device, (uint32_t)n, w, 0, NULL);
    vd->fn.vkCmdBindPipeline(vd->cmd, VK_PIPELINE_BIND_POINT_COMPUTE, pipeline ? pipeline : vd->pipeline[k]);
    vd->fn.vkCmdBindDescriptorSets(vd->cmd, VK_PIPELINE_BIND_POINT_COMPUTE, vd->pipe_layout[k], 0, 1, &set, 0, NULL);
    uint8_t pushed[PIKV_VK_PUSH_BYTES] = {0};
    memcpy(pushed, push, push_size < sizeof pushed ? push_size : sizeof pushed);
    vd->fn.vkCmdPushConstants(vd->cmd, vd->pipe_layout[k], VK_SHADER_STAGE_COMPUTE_BIT, 0, PIKV_VK_PUSH_BYTES, pushed);
    vd->fn.vkCmdDispatch(vd->cmd, (uint32_t)gx, (uint32_t)gy, 1);
    return PIKV_OK;
}
