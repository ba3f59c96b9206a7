#version 450
/* The read_reduce op, the roofline probe of pikv_device_read_bandwidth: the sum
 * of n floats of a window of a device buffer, one partial per workgroup.
 *
 * Workgroup g reduces its own contiguous span of SPAN vec4s (the last one
 * fewer); within it, invocation i reads vec4s i, i + WG, i + 2 WG, ... so each
 * step of the workgroup is one coalesced run of WG * 16 bytes. The host keeps
 * SPAN / WG small (llvmpipe's loop limit; enough workgroups for a big GPU) and
 * binds at most maxStorageBufferRange bytes per dispatch, so indices stay
 * 32-bit whatever the buffer's size. Floats past the last whole vec4 (n not a
 * multiple of 4) are added by workgroup 0 through the scalar view.
 *
 * Specialization constant 0: the workgroup size (a power of two). */
#ifdef USE_SUBGROUPS
#extension GL_KHR_shader_subgroup_basic : require
#extension GL_KHR_shader_subgroup_arithmetic : require
#endif

layout(local_size_x_id = 0) in;
layout(constant_id = 0) const uint WG = 256;

/* bindings 0 and 1: the same window of the buffer, as vec4s and as floats */
layout(std430, binding = 0) readonly buffer Data4 { vec4 data4[]; };
layout(std430, binding = 1) readonly buffer Data1 { float data1[]; };
layout(std430, binding = 2) writeonly buffer Parts { float parts[]; };

layout(push_constant) uniform Push {
    uint n_vec4;   /* whole vec4s in the window */
    uint n_tail;   /* floats after them: 0..3 */
    uint span;     /* vec4s per workgroup, a multiple of WG */
    uint part0;    /* index of this dispatch's first partial */
    uint n_groups; /* of this dispatch (a 2-D one has a few more) */
} pc;

#include "common.glsl"

shared float red[WG];

void main()
{
    const uint lid = gl_LocalInvocationID.x;
    const uint g = uint(FLAT_GROUP);
    if (g >= pc.n_groups) return; /* the whole workgroup: no barrier is left waiting */
    const uint lo = g * pc.span;
    const uint hi = min(lo + pc.span, pc.n_vec4);
    /* two accumulators: two loads in flight per invocation */
    vec4 a0 = vec4(0.0), a1 = vec4(0.0);
    uint i = lo + lid;
    for (; i + WG < hi; i += 2u * WG) {
        a0 += data4[i];
        a1 += data4[i + WG];
    }
    if (i < hi) a0 += data4[i];
    a0 += a1;
    float x = (a0.x + a0.y) + (a0.z + a0.w);
    if (g == 0u && lid < pc.n_tail) x += data1[4u * pc.n_vec4 + lid];
#ifdef USE_SUBGROUPS
    x = subgroupAdd(x);
    if (subgroupElect()) red[gl_SubgroupID] = x;
    barrier();
    if (gl_SubgroupID == 0u) {
        float y = 0.0;
        for (uint s = gl_SubgroupInvocationID; s < gl_NumSubgroups; s += gl_SubgroupSize) y += red[s];
        y = subgroupAdd(y);
        if (subgroupElect()) parts[pc.part0 + g] = y;
    }
#else
    red[lid] = x;
    barrier();
    for (uint s = WG / 2u; s > 0u; s >>= 1) {
        if (lid < s) red[lid] += red[lid + s];
        barrier();
    }
    if (lid == 0u) parts[pc.part0 + g] = red[0];
#endif
}
