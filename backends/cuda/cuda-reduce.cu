/* Streaming reads: read_reduce, the roofline probe of pikv_device_read_bandwidth
 * (a sum, so the caller can check that every float was read), and the
 * benchmarks' raw read probe (bench/cuda_attention.c). Both are grid-stride
 * loops of 16-byte streaming loads (__ldcs: no reuse, so L2 is not polluted)
 * over a grid of a few blocks per SM. */
#include "cuda-common.cuh"

namespace {

constexpr int kReduceThreads = 256;

/* Thread sums in float (exact for the probe's ones while a lane adds under
   2^24 values: up to 512 GiB on a one-SM grid), the block's in double through
   warp shuffles; one partial per block. Block 0 adds the n_tail floats after
   the last whole float4. */
__global__ void __launch_bounds__(kReduceThreads) read_reduce_kernel(const float4 *__restrict__ x, uint64_t n4,
                                                                     int n_tail, double *__restrict__ parts)
{
    float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
    const uint64_t stride = (uint64_t)gridDim.x * blockDim.x;
    for (uint64_t i = (uint64_t)pikv_global_id(); i < n4; i += stride) {
        const float4 v = __ldcs(x + i);
        acc.x += v.x;
        acc.y += v.y;
        acc.z += v.z;
        acc.w += v.w;
    }
    double s = (double)((acc.x + acc.y) + (acc.z + acc.w));
    if (blockIdx.x == 0 && (int)threadIdx.x < n_tail) s += (double)((const float *)(x + n4))[threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
    __shared__ double warp_sum[kReduceThreads / 32];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    if (lane == 0) warp_sum[warp] = s;
    __syncthreads();
    if (warp == 0) {
        s = lane < kReduceThreads / 32 ? warp_sum[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) s += __shfl_down_sync(0xffffffffu, s, o);
        if (lane == 0) parts[blockIdx.x] = s;
    }
}

__global__ void read_probe(const uint4 *src, uint64_t n, unsigned *sink)
{
    uint32_t x = 0;
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
        const uint4 v = __ldcs(src + i); /* streaming: no reuse */
        x ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (x == 0x9e3779b9u) atomicAdd(sink, 1u); /* keeps the loads; almost never taken */
}

} // namespace

extern "C" cudaError_t pikv_cuda_read_reduce(const float *x_dev, uint64_t n_floats, double *parts_dev, int32_t blocks,
                                             cudaStream_t stream)
{
    if (blocks <= 0) return cudaErrorInvalidConfiguration;
    read_reduce_kernel<<<blocks, kReduceThreads, 0, stream>>>(reinterpret_cast<const float4 *>(x_dev), n_floats / 4,
                                                              (int)(n_floats % 4), parts_dev);
    return cudaGetLastError();
}

extern "C" cudaError_t pikv_cuda_read_probe(const void *src_dev, uint64_t n_bytes, unsigned *sink_dev, int32_t blocks,
                                            cudaStream_t stream)
{
    if (n_bytes < 16) return cudaSuccess;
    read_probe<<<blocks, 256, 0, stream>>>(static_cast<const uint4 *>(src_dev), n_bytes / 16, sink_dev);
    return cudaGetLastError();
}
