/* CRC32C: software slice-by-8 over tables built once (pthread_once, so
   concurrent first calls are safe), and the SSE4.2 crc32 instruction on x86
   CPUs that have it (checked once with cpuid). */
#include "crc32c.h"

#include <pthread.h>
#include <string.h>

#define CRC32C_POLY 0x82F63B78u

static uint32_t crc_table[8][256];
static pthread_once_t crc_once = PTHREAD_ONCE_INIT;

static void crc_tables_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = (c >> 1) ^ (CRC32C_POLY & (0u - (c & 1u)));
        crc_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc_table[t][i] = (crc_table[t - 1][i] >> 8) ^ crc_table[0][crc_table[t - 1][i] & 0xffu];
}

static uint32_t load_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

uint32_t pikv_crc32c_sw(uint32_t crc, const void *data, size_t n)
{
    pthread_once(&crc_once, crc_tables_init);
    const uint8_t *p = data;
    uint32_t c = ~crc;
    for (; n > 0 && ((uintptr_t)p & 7u) != 0; n--) c = (c >> 8) ^ crc_table[0][(c ^ *p++) & 0xffu];
    for (; n >= 8; n -= 8, p += 8) {
        /* byte loads: independent of the host's byte order */
        const uint32_t lo = load_le32(p) ^ c, hi = load_le32(p + 4);
        c = crc_table[7][lo & 0xffu] ^ crc_table[6][(lo >> 8) & 0xffu] ^ crc_table[5][(lo >> 16) & 0xffu] ^
            crc_table[4][lo >> 24] ^ crc_table[3][hi & 0xffu] ^ crc_table[2][(hi >> 8) & 0xffu] ^
            crc_table[1][(hi >> 16) & 0xffu] ^ crc_table[0][hi >> 24];
    }
    for (; n > 0; n--) c = (c >> 8) ^ crc_table[0][(c ^ *p++) & 0xffu];
    return ~c;
}

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#define PIKV_CRC32C_X86 1

__attribute__((target("sse4.2"))) static uint32_t crc32c_sse42(uint32_t crc, const void *data, size_t n)
{
    const uint8_t *p = data;
    uint32_t c = ~crc;
    for (; n > 0 && ((uintptr_t)p & 7u) != 0; n--) c = __builtin_ia32_crc32qi(c, *p++);
#if defined(__x86_64__)
    uint64_t c64 = c;
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t w;
        memcpy(&w, p, 8); /* x86 is little-endian */
        c64 = __builtin_ia32_crc32di(c64, w);
    }
    c = (uint32_t)c64;
#endif
    for (; n >= 4; n -= 4, p += 4) {
        uint32_t w;
        memcpy(&w, p, 4);
        c = __builtin_ia32_crc32si(c, w);
    }
    for (; n > 0; n--) c = __builtin_ia32_crc32qi(c, *p++);
    return ~c;
}

static int crc_have_sse42;
static pthread_once_t crc_cpu_once = PTHREAD_ONCE_INIT;

static void crc_cpu_init(void)
{
    unsigned a = 0, b = 0, c = 0, d = 0;
    crc_have_sse42 = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_SSE4_2) != 0;
}
#endif

int pikv_crc32c_hw(void)
{
#ifdef PIKV_CRC32C_X86
    pthread_once(&crc_cpu_once, crc_cpu_init);
    return crc_have_sse42;
#else
    return 0;
#endif
}

uint32_t pikv_crc32c(uint32_t crc, const void *data, size_t n)
{
#ifdef PIKV_CRC32C_X86
    if (pikv_crc32c_hw()) return crc32c_sse42(crc, data, n);
#endif
    return pikv_crc32c_sw(crc, data, n);
}
