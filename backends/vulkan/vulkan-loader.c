/* The Vulkan loader, opened at run time: no libvulkan means no Vulkan devices,
   not a failure to load libpikv.

   The loader is opened once per process and never closed: drivers keep
   process-wide state (and some register exit handlers) that must not be
   unmapped under them, which is also what other Vulkan users do. */
#include "vulkan-impl.h"

#include <dlfcn.h>
#include <pthread.h>
#include <string.h>

static pthread_once_t g_loader_once = PTHREAD_ONCE_INIT;
static void *g_loader_library;

static void open_loader_once(void)
{
    static const char *const names[] = {"libvulkan.so.1", "libvulkan.so"};
    for (size_t i = 0; i < sizeof names / sizeof names[0] && !g_loader_library; i++)
        g_loader_library = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
}

bool pikv_vk_loader_open(pikv_vk_loader *L)
{
    memset(L, 0, sizeof *L);
    pthread_once(&g_loader_once, open_loader_once);
    L->library = g_loader_library;
    if (!L->library) return false;
    /* dlsym returns an object pointer; the cast through memcpy keeps ISO C quiet */
    void *sym = dlsym(L->library, "vkGetInstanceProcAddr");
    if (sym) memcpy(&L->vkGetInstanceProcAddr, &sym, sizeof sym);
    if (!L->vkGetInstanceProcAddr) return false;
    PFN_vkGetInstanceProcAddr gipa = L->vkGetInstanceProcAddr;
    L->vkCreateInstance = (PFN_vkCreateInstance)gipa(VK_NULL_HANDLE, "vkCreateInstance");
    L->vkEnumerateInstanceVersion = (PFN_vkEnumerateInstanceVersion)gipa(VK_NULL_HANDLE, "vkEnumerateInstanceVersion");
    L->vkEnumerateInstanceLayerProperties =
        (PFN_vkEnumerateInstanceLayerProperties)gipa(VK_NULL_HANDLE, "vkEnumerateInstanceLayerProperties");
    L->vkEnumerateInstanceExtensionProperties =
        (PFN_vkEnumerateInstanceExtensionProperties)gipa(VK_NULL_HANDLE, "vkEnumerateInstanceExtensionProperties");
    if (!L->vkCreateInstance || !L->vkEnumerateInstanceLayerProperties || !L->vkEnumerateInstanceExtensionProperties)
        return false;
    return true;
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
