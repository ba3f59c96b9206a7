/* Row conversions between f16 pages and f32, chosen once at run time: F16C on
   x86-64 CPUs that have it (8 values per instruction), portable C otherwise.
   Both round to nearest even, so pages are bit-identical either way. */
#include "cpu-attention.h"
#include "../../runtime/f16.h"

#include <stdlib.h>
#include <string.h>

static void f16_to_f32_generic(const uint16_t *src, float *dst, int32_t n)
{
    for (int32_t i = 0; i < n; i++) dst[i] = pikv_f16_to_f32(src[i]);
}

static void f32_to_f16_generic(const float *src, uint16_t *dst, int32_t n)
{
    for (int32_t i = 0; i < n; i++) dst[i] = pikv_f32_to_f16(src[i]);
}

#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define PIKV_HAVE_F16C_PATH 1

/* AVX and F16C present, and the OS saves the YMM registers (XCR0 bits 1-2). */
static bool cpu_has_avx_f16c(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
    const unsigned osxsave = 1u << 27, avx = 1u << 28, f16c = 1u << 29;
    if ((c & (osxsave | avx | f16c)) != (osxsave | avx | f16c)) return false;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    (void)hi;
    return (lo & 6u) == 6u;
}

/* AVX2 and FMA too (leaf 7 EBX bit 5, leaf 1 ECX bit 12). */
static bool cpu_has_avx2_fma(void)
{
    if (!cpu_has_avx_f16c()) return false;
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d) || !(c & (1u << 12))) return false;
    if (__get_cpuid_max(0, NULL) < 7) return false;
    __cpuid_count(7, 0, a, b, c, d);
    return (b & (1u << 5)) != 0;
}

__attribute__((target("avx,f16c"))) static void f16_to_f32_f16c(const uint16_t *src, float *dst,
                                                                 int32_t n)
{
    int32_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < n; i++) dst[i] = pikv_f16_to_f32(src[i]);
}

__attribute__((target("avx,f16c"))) static void f32_to_f16_f16c(const float *src, uint16_t *dst,
                                                                 int32_t n)
{
    int32_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; i++) dst[i] = pikv_f32_to_f16(src[i]);
}
#else
static bool cpu_has_avx2_fma(void) { return false; }
#endif

void pikv_cpu_f16_init(pikv_cpu_backend *cb)
{
    cb->f16_to_f32 = f16_to_f32_generic;
    cb->f32_to_f16 = f32_to_f16_generic;
    /* PIKV_CPU_ISA=generic keeps the portable kernels, =avx2 the AVX2 build of them
       (tests run every path on one machine) */
    const char *isa = getenv("PIKV_CPU_ISA");
    const bool generic = isa && strcmp(isa, "generic") == 0, avx2 = isa && strcmp(isa, "avx2") == 0;
    cb->attn_avx512 = !generic && !avx2 && pikv_cpu_has_avx512();
    cb->attn_avx2 = !generic && cpu_has_avx2_fma();
#ifdef PIKV_HAVE_F16C_PATH
    if (cpu_has_avx_f16c()) {
        cb->f16_to_f32 = f16_to_f32_f16c;
        cb->f32_to_f16 = f32_to_f16_f16c;
    }
#endif
}
