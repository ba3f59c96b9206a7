/* Shared GLSL of the PiKV Vulkan shaders (GLSL 4.50, Vulkan 1.2, no optional
 * features: no 8/16-bit storage, no int64, no float64).
 *
 * Pages live in chunk buffers bound as uint words; a page is addressed by its
 * byte offset (a multiple of 64). The page layout (runtime/backend-impl.h,
 * pikv_page_layout) comes as rows of LAYOUT_WORDS uints in a storage buffer:
 * row 0 the open pool, row 1 the quantized pool (backends/common/chunk-plan.c).
 *
 * Exactness: pages must be bit-identical to the CPU backend's (docs/compression.md).
 * f32 -> f16 is done with integer arithmetic (round to nearest even, like
 * runtime/f16.h) since the rounding of OpFConvert is not specified; min/max of
 * stored keys compare bit patterns, so denormals compare right even where the
 * device flushes them. f16 -> f32 is integer code too (exact, denormals kept).
 *
 * A shader that includes this file first defines PAGES, the name of its
 * readable page buffer (uint words). */
#extension GL_GOOGLE_include_directive : require

#include "../../common/layout-words.h" /* L_* field indices, LAYOUT_WORDS, DT_* */

/* Dispatches past maxComputeWorkGroupCount[0] groups are 2-D (the host splits
   them): the flat invocation / workgroup index. */
#define FLAT_ID int(gl_GlobalInvocationID.x + gl_GlobalInvocationID.y * gl_NumWorkGroups.x * gl_WorkGroupSize.x)
#define FLAT_GROUP int(gl_WorkGroupID.x + gl_WorkGroupID.y * gl_NumWorkGroups.x)

#define F_INF uintBitsToFloat(0x7f800000u)

/* The layout fields the hot loops use, loaded once. */
struct layout_t {
    int ps, kvh, hd, dtype, group, kg, vg;
    uint row, k, v, kmin, kmax, ksc, kze, vsc, vze, hs;
};

#define GET_LAYOUT(buf, base)                                                        \
    layout_t(int(buf[(base) + L_PS]), int(buf[(base) + L_KVH]), int(buf[(base) + L_HD]), \
             int(buf[(base) + L_DTYPE]), int(buf[(base) + L_GROUP]), int(buf[(base) + L_KG]), \
             int(buf[(base) + L_VG]), buf[(base) + L_ROW], buf[(base) + L_K], buf[(base) + L_V], \
             buf[(base) + L_KMIN], buf[(base) + L_KMAX], buf[(base) + L_KSC], buf[(base) + L_KZE], \
             buf[(base) + L_VSC], buf[(base) + L_VZE], buf[(base) + L_HS])

/* ---- f16 <-> f32 --------------------------------------------------------- */

/* f32 bits to f16 bits, round to nearest even; NaN stays a quiet NaN with its
   top payload bits (the same as runtime/f16.h and the F16C instruction). */
uint f32_to_f16_bits(uint x)
{
    const uint sign = (x >> 16) & 0x8000u;
    const uint absx = x & 0x7fffffffu;
    if (absx >= 0x7f800000u)
        return sign | 0x7c00u | (absx > 0x7f800000u ? (0x200u | ((absx >> 13) & 0x3ffu)) : 0u);
    if (absx >= 0x477ff000u) return sign | 0x7c00u;
    if (absx < 0x38800000u) {
        if (absx < 0x33000000u) return sign;
        const uint mant = (absx & 0x007fffffu) | 0x00800000u;
        const uint shift = 126u - (absx >> 23); /* 14..24 */
        uint half_ = mant >> shift;
        const uint rem = mant & ((1u << shift) - 1u);
        const uint mid = 1u << (shift - 1u);
        if (rem > mid || (rem == mid && (half_ & 1u) != 0u)) half_++;
        return sign | half_;
    }
    uint half_ = (absx - 0x38000000u) >> 13;
    const uint rem = absx & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (half_ & 1u) != 0u)) half_++;
    return sign | half_;
}

/* f16 bits to f32, in integer arithmetic: unpackHalf2x16 is not required to
   keep f16 denormals, and the bounds must be bit-exact. */
float f16_bits_to_f32(uint h)
{
    const uint sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0u) {
        if (m == 0u) return uintBitsToFloat(sign);
        const int top = findMSB(m); /* m * 2^-24 = 1.f * 2^(top - 24) */
        return uintBitsToFloat(sign | (uint(top + 103) << 23) | ((m << uint(23 - top)) & 0x7fffffu));
    }
    if (e == 31u) return uintBitsToFloat(sign | 0x7f800000u | (m << 13));
    return uintBitsToFloat(sign | ((e + 112u) << 23) | (m << 13));
}

/* IEEE a < b on f32 bit patterns (false for NaN; -0 == +0), exact for denormals. */
bool bits_lt(uint a, uint b)
{
    if ((a & 0x7fffffffu) > 0x7f800000u || (b & 0x7fffffffu) > 0x7f800000u) return false;
    if (((a | b) & 0x7fffffffu) == 0u) return false;
    const int ka = (a & 0x80000000u) != 0u ? -int(a & 0x7fffffffu) : int(a);
    const int kb = (b & 0x80000000u) != 0u ? -int(b & 0x7fffffffu) : int(b);
    return ka < kb;
}

/* ---- page reads (from PAGES) ----------------------------------------------- */

#ifdef PAGES
uint rd_u8(uint byte_off)
{
    return (PAGES[byte_off >> 2] >> ((byte_off & 3u) << 3)) & 0xffu;
}

uint rd_u16(uint byte_off) /* byte_off is even */
{
    return (PAGES[byte_off >> 2] >> ((byte_off & 2u) << 3)) & 0xffffu;
}

float rd_f16(uint byte_off)
{
    return f16_bits_to_f32(rd_u16(byte_off));
}

/* Element d of an f32/f16 row starting at byte p. */
float load_open(uint p, int dtype, int d)
{
    if (dtype == DT_F32) return uintBitsToFloat(PAGES[(p >> 2) + uint(d)]);
    return rd_f16(p + 2u * uint(d));
}

/* The quantized value of channel d of a packed row at byte p. */
uint load_q(uint p, int dtype, int d)
{
    if (dtype == DT_INT8) return rd_u8(p + uint(d));
    return (rd_u8(p + uint(d >> 1)) >> ((d & 1) * 4)) & 15u;
}

/* Key channel d of token r of KV head g of the page at byte `page`, as f32. */
float load_key(uint page, layout_t L, int g, int r, int d)
{
    const uint row = page + L.k + uint(g) * L.hs + uint(r) * L.row;
    if (L.dtype < DT_INT8) return load_open(row, L.dtype, d);
    const uint at = (uint(g * L.kg + r / L.group)) * uint(L.hd) + uint(d);
    const float s = rd_f16(page + L.ksc + 2u * at);
    const float z = rd_f16(page + L.kze + 2u * at);
    precise const float x = float(load_q(row, L.dtype, d)) * s + z; /* no fma: bit-exact with the CPU */
    return x;
}

/* Value channel d of token t of KV head g, as f32. */
float load_value(uint page, layout_t L, int g, int t, int d)
{
    const uint row = page + L.v + uint(g) * L.hs + uint(t) * L.row;
    if (L.dtype < DT_INT8) return load_open(row, L.dtype, d);
    const uint at = uint((g * L.ps + t) * L.vg + d / L.group);
    const float s = rd_f16(page + L.vsc + 2u * at);
    const float z = rd_f16(page + L.vze + 2u * at);
    precise const float x = float(load_q(row, L.dtype, d)) * s + z;
    return x;
}
#endif

/* ---- page writes (into DST, a writable uint buffer) -------------------------- */

#ifdef DST
/* Stores 16 bits at an even byte offset. Neighbouring halves belong to other
   invocations, so the word is updated with two atomics (each keeps the other
   half intact). */
void wr_u16(uint byte_off, uint bits)
{
    const uint w = byte_off >> 2, sh = (byte_off & 2u) << 3;
    atomicAnd(DST[w], ~(0xffffu << sh));
    atomicOr(DST[w], (bits & 0xffffu) << sh);
}

/* ORs bits into a byte of a zero-filled region (quantized pages). */
void or_u8(uint byte_off, uint bits)
{
    atomicOr(DST[byte_off >> 2], (bits & 0xffu) << ((byte_off & 3u) << 3));
}

void or_u16(uint byte_off, uint bits)
{
    atomicOr(DST[byte_off >> 2], (bits & 0xffffu) << ((byte_off & 2u) << 3));
}

/* Stores x (given as f32 bits) at element d of an f32/f16 row at byte p;
   returns the bits of the value stored, as f32 (after rounding to f16). */
uint store_open(uint p, int dtype, int d, uint xbits)
{
    if (dtype == DT_F32) {
        DST[(p >> 2) + uint(d)] = xbits;
        return xbits;
    }
    const uint h = f32_to_f16_bits(xbits);
    wr_u16(p + 2u * uint(d), h);
    return floatBitsToUint(f16_bits_to_f32(h));
}
#endif
