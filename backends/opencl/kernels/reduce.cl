/* read_reduce, the roofline probe (runtime/bandwidth.c): the sum of the first n
 * floats of a buffer, each read once, in any order; the host adds the partials
 * in double.
 *
 * CPU devices (pikv_read_reduce_cpu, built with -DPIKV_OCL_CPU): one contiguous run of `per` float16s per
 * work item (work-groups of one item), four independent accumulators so the
 * loads stream; item 0 also adds the n % 16 tail floats.
 * GPUs (pikv_read_reduce_gpu): grid-stride float4 loads (coalesced), then a
 * work-group tree reduction into one partial per group. Each float lane adds at
 * most a few million values, so sums of ones stay exact. */
#ifdef PIKV_OCL_CPU
__kernel __attribute__((reqd_work_group_size(1, 1, 1))) void pikv_read_reduce_cpu(__global const float *buf, ulong n,
                                                                                  ulong per, __global float *parts)
{
    const ulong i = get_global_id(0), n16 = n / 16;
    const ulong b = i * per, e = min(b + per, n16);
    float16 s0 = (float16)(0.0f), s1 = (float16)(0.0f), s2 = (float16)(0.0f), s3 = (float16)(0.0f);
    ulong k = b;
    for (; k + 4 <= e; k += 4) {
        s0 += vload16(k, buf);
        s1 += vload16(k + 1, buf);
        s2 += vload16(k + 2, buf);
        s3 += vload16(k + 3, buf);
    }
    for (; k < e; k++) s0 += vload16(k, buf);
    const float16 s = (s0 + s1) + (s2 + s3);
    const float8 t = s.lo + s.hi;
    const float4 u = t.lo + t.hi;
    float r = (u.x + u.y) + (u.z + u.w);
    if (i == 0)
        for (ulong j = n16 * 16; j < n; j++) r += buf[j];
    parts[i] = r;
}
#endif /* PIKV_OCL_CPU */

__kernel void pikv_read_reduce_gpu(__global const float *buf, ulong n, __global float *parts, __local float *red)
{
    const ulong gid = get_global_id(0), stride = get_global_size(0), n4 = n / 4;
    const int lid = (int)get_local_id(0), W = (int)get_local_size(0);
    float4 s0 = (float4)(0.0f), s1 = (float4)(0.0f);
    ulong k = gid;
    for (; k + stride < n4; k += 2 * stride) {
        s0 += vload4(k, buf);
        s1 += vload4(k + stride, buf);
    }
    if (k < n4) s0 += vload4(k, buf);
    const float4 s = s0 + s1;
    float r = (s.x + s.y) + (s.z + s.w);
    if (gid == 0)
        for (ulong j = n4 * 4; j < n; j++) r += buf[j];
    red[lid] = r;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int o = W / 2; o > 0; o >>= 1) {
        if (lid < o) red[lid] += red[lid + o];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0) parts[get_group_id(0)] = red[0];
}
