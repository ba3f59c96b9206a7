/* The Vulkan loader, opened at run time: no libvulkan means no Vulkan devices,
   not a failure to load libpikv. */
#include "vulkan-impl.h"

#include <dlfcn.h>
#include <string.h>

bool pikv_vk_loader_open(pikv_vk_loader *L)
{
    memset(L, 0, sizeof *L);
    static const char *const names[] = {"libvulkan.so.1", "libvulkan.so"};
    for (size_t i = 0; i < sizeof names / sizeof names[0] && !L->library; i++)
        L->library = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (!L->library) return false;
    /* dlsym returns an object pointer; the cast through memcpy keeps ISO C quiet */
    void *sym = dlsym(L->library, "vkGetInstanceProcAddr");
    if (sym) memcpy(&L->vkGetInstanceProcAddr, &sym, sizeof sym);
    if (!L->vkGetInstanceProcAddr) {
        pikv_vk_loader_close(L);
        return false;
    }
    PFN_vkGetInstanceProcAddr gipa = L->vkGetInstanceProcAddr;
    L->vkCreateInstance = (PFN_vkCreateInstance)gipa(VK_NULL_HANDLE, "vkCreateInstance");
    L->vkEnumerateInstanceVersion = (PFN_vkEnumerateInstanceVersion)gipa(VK_NULL_HANDLE, "vkEnumerateInstanceVersion");
    L->vkEnumerateInstanceLayerProperties =
        (PFN_vkEnumerateInstanceLayerProperties)gipa(VK_NULL_HANDLE, "vkEnumerateInstanceLayerProperties");
    L->vkEnumerateInstanceExtensionProperties =
        (PFN_vkEnumerateInstanceExtensionProperties)gipa(VK_NULL_HANDLE, "vkEnumerateInstanceExtensionProperties");
    if (!L->vkCreateInstance || !L->vkEnumerateInstanceLayerProperties || !L->vkEnumerateInstanceExtensionProperties) {
        pikv_vk_loader_close(L);
        return false;
    }
    return true;
}

void pikv_vk_loader_close(pikv_vk_loader *L)
{
    if (L->library) dlclose(L->library);
    memset(L, 0, sizeof *L);
}

bool pikv_vk_load_instance_fns(const pikv_vk_loader *L, VkInstance inst, pikv_vk_instance_fns *f,
                               const char **missing)
{
    memset(f, 0, sizeof *f);
#define LOAD(name)                                                                  \
    f->name = (PFN_##name)L->vkGetInstanceProcAddr(inst, #name);                   \
    if (!f->name) {                                                                 \
        *missing = #name;                                                           \
        return false;                                                               \
    }
    PIKV_VK_INSTANCE_FNS(LOAD)
#undef LOAD
    f->vkCreateDebugUtilsMessengerEXT =
        (PFN_vkCreateDebugUtilsMessengerEXT)L->vkGetInstanceProcAddr(inst, "vkCreateDebugUtilsMessengerEXT");
    f->vkDestroyDebugUtilsMessengerEXT =
        (PFN_vkDestroyDebugUtilsMessengerEXT)L->vkGetInstanceProcAddr(inst, "vkDestroyDebugUtilsMessengerEXT");
    return true;
}

bool pikv_vk_load_device_fns(const pikv_vk_instance_fns *ifns, VkDevice dev, pikv_vk_device_fns *f,
                             const char **missing)
{
    memset(f, 0, sizeof *f);
#define LOAD(name)                                                                  \
    f->name = (PFN_##name)ifns->vkGetDeviceProcAddr(dev, #name);                   \
    if (!f->name) {                                                                 \
        *missing = #name;                                                           \
        return false;                                                               \
    }
    PIKV_VK_DEVICE_FNS(LOAD)
#undef LOAD
    return true;
}
