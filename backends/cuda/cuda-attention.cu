/* Decode attention over paged KV (flash-decoding), and the read-bandwidth probe.
 *
 * attention_part: one thread block per task (a run of pages of one (query, KV
 * head) list; the host splits long lists so one sequence fills the GPU). Each
 * warp takes whole pages of the task; inside a warp a row group of LPR lanes
 * holds one token row, each lane E contiguous channels loaded with one 16-byte
 * (f16: 8 channels) or 8-byte access, so a warp streams 32 x 16 bytes per load.
 * Scores are reduced over the row group with warp shuffles and the softmax is
 * online per row group (one rescale per U rows); the query heads of a KV head
 * (GQA) share every K/V load. Row groups, then warps, are merged exactly at the
 * end of the task (log-sum-exp merge) into a partial {m, l, acc[hd]}.
 * attention_finish merges the tasks of each list into the normalized output.
 *
 * Pages of a list may mix the open dtype (f32/f16) and a quantized dtype
 * (int8/int4, dequantized in registers): the branch is per page, uniform
 * across the warp. Shapes the vector path cannot take (head_dim not a multiple
 * of E, over 32 x E, unaligned offsets) use the scalar kernel (E = 1, up to 32
 * channels per lane). */
#include "cuda-kernels.h"

#include <climits>
#include <cstdint>
#include <cuda_fp16.h>
#include <math_constants.h>

namespace {

constexpr int kWarps = 4;          /* warps per block of attention_part */
constexpr int kThreads = 32 * kWarps;

struct Page {
    const uint8_t *p;
    pikv_cuda_layout L;
};

__device__ __forceinline__ int next_pow2(int x)
{
    int p = 1;
    while (p < x) p <<= 1;
    return p;
}

__device__ __forceinline__ float half_at(const uint8_t *base, size_t i)
{
    return __half2float(reinterpret_cast<const __half *>(base)[i]);
}

/* E channels [d0, d0 + E) of row r of KV head g, keys (K = true) or values, as
   f32. OPEN_DT is the open pages' dtype (0 f32, 1 f16); quantized pages are
   int8 (2) or int4 (3) with the scale/zero layout of runtime/backend-impl.h. */
template <int E, bool K>
__device__ __forceinline__ void load_open(const uint8_t *row, int dtype, int d0, float (&x)[E])
{
    if (dtype == 0) {
        const float *f = reinterpret_cast<const float *>(row) + d0;
        if constexpr (E % 4 == 0) {
#pragma unroll
            for (int i = 0; i < E; i += 4) {
                const float4 v = *reinterpret_cast<const float4 *>(f + i);
                x[i] = v.x;
                x[i + 1] = v.y;
                x[i + 2] = v.z;
                x[i + 3] = v.w;
            }
        } else {
#pragma unroll
            for (int i = 0; i < E; i++) x[i] = f[i];
        }
    } else {
        const __half *h = reinterpret_cast<const __half *>(row) + d0;
        if constexpr (E % 8 == 0) {
#pragma unroll
            for (int i = 0; i < E; i += 8) {
                const uint4 v = *reinterpret_cast<const uint4 *>(h + i);
                const __half2 *h2 = reinterpret_cast<const __half2 *>(&v);
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const float2 f = __half22float2(h2[j]);
                    x[i + 2 * j] = f.x;
                    x[i + 2 * j + 1] = f.y;
                }
            }
        } else {
#pragma unroll
            for (int i = 0; i < E; i++) x[i] = __half2float(h[i]);
        }
    }
}

/* The raw quantized values of channels [d0, d0 + E) of a packed row. */
template <int E>
__device__ __forceinline__ void load_codes(const uint8_t *row, int dtype, int d0, uint32_t (&c)[E])
{
    if (dtype == 2) {
        if constexpr (E % 8 == 0) {
#pragma unroll
            for (int i = 0; i < E; i += 8) {
                const uint2 v = *reinterpret_cast<const uint2 *>(row + d0 + i);
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    c[i + j] = (v.x >> (8 * j)) & 0xffu;
                    c[i + 4 + j] = (v.y >> (8 * j)) & 0xffu;
                }
            }
        } else {
#pragma unroll
            for (int i = 0; i < E; i++) c[i] = row[d0 + i];
        }
    } else {
        if constexpr (E % 8 == 0) {
#pragma unroll
            for (int i = 0; i < E; i += 8) {
                const uint32_t v = *reinterpret_cast<const uint32_t *>(row + ((d0 + i) >> 1));
#pragma unroll
                for (int j = 0; j < 8; j++) c[i + j] = (v >> (4 * j)) & 15u;
            }
        } else {
#pragma unroll
            for (int i = 0; i < E; i++) {
                const int d = d0 + i;
                c[i] = (row[d >> 1] >> ((d & 1) * 4)) & 15u;
            }
        }
    }
}

template <int E, bool K>
__device__ __forceinline__ void load_row(const Page &pg, int g, int r, int d0, float (&x)[E])
{
    const pikv_cuda_layout &L = pg.L;
    const uint8_t *row = pg.p + (K ? L.k : L.v) + (size_t)g * L.hs + (size_t)r * L.row;
    if (L.dtype < 2) {
        load_open<E, K>(row, L.dtype, d0, x);
        return;
    }
    uint32_t c[E];
    load_codes<E>(row, L.dtype, d0, c);
    if (K) { /* per channel, over groups of `group` tokens */
        const size_t at = ((size_t)g * L.kg + (size_t)(r / L.group)) * (size_t)L.hd + (size_t)d0;
#pragma unroll
        for (int i = 0; i < E; i++)
            x[i] = (float)c[i] * half_at(pg.p + L.ksc, at + i) + half_at(pg.p + L.kze, at + i);
    } else { /* per token, over groups of `group` channels */
        const size_t at = ((size_t)g * L.ps + (size_t)r) * (size_t)L.vg;
#pragma unroll
        for (int i = 0; i < E; i++) {
            const size_t a = at + (size_t)((d0 + i) / L.group);
            x[i] = (float)c[i] * half_at(pg.p + L.vsc, a) + half_at(pg.p + L.vze, a);
        }
    }
}

/* Log-sum-exp merge of state (m2, l2) into (m, l); returns the factors that
   rescale the two accumulators. -inf maxima (nothing seen) weigh 0. */
__device__ __forceinline__ void lse_merge(float &m, float &l, float m2, float l2, float &w1, float &w2)
{
    /* fmaxf drops a NaN maximum (an overflowed score): keep it, or merging with
       an empty state (-inf) would turn it into "nothing seen" and the finish
       kernel would not report the overflow */
    const float mx = (m != m || m2 != m2) ? CUDART_NAN_F : fmaxf(m, m2);
    w1 = m == -CUDART_INF_F ? 0.0f : expf(m - mx);
    w2 = m2 == -CUDART_INF_F ? 0.0f : expf(m2 - mx);
    if (mx == -CUDART_INF_F) {
        w1 = w2 = 0.0f;
        l = 0.0f;
        m = mx;
        return;
    }
    l = l * w1 + l2 * w2;
    m = mx;
}

/* E channels per chunk, CPL chunks per lane at most, HB query heads per pass,
   kUnroll rows per row group loaded before they are used (bytes in flight).
   HDMAX bounds head_dim for the block's shared merge buffer. */
template <int E, int CPL, int HB, int kUnroll, int HDMAX, bool PAGE_LSE>
__global__ void __launch_bounds__(kThreads) attention_part(pikv_cuda_attention_launch a)
{
    __shared__ float sm_acc[kWarps][HB][HDMAX];
    __shared__ float sm_ml[kWarps][HB][2];

    const pikv_cuda_task task = a.tasks_dev[blockIdx.x];
    const int kvh = a.L.kvh, hd = a.L.hd, G = a.n_q_heads / kvh;
    const int query = task.unit / kvh, g = task.unit % kvh;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n_chunks = hd / E; /* the host guarantees E divides hd */
    const int lpr = min(32, next_pow2((n_chunks + CPL - 1) / CPL));
    const int rpw = 32 / lpr; /* row groups per warp */
    const int rg = lane / lpr, lr = lane % lpr;
    const float *qbase = a.q_dev + ((size_t)query * a.n_q_heads + (size_t)g * G) * (size_t)hd;
    float *part = a.parts_dev + (size_t)blockIdx.x * (size_t)G * (size_t)(hd + 2);

    for (int h0 = 0; h0 < G; h0 += HB) {
        const int nh = min(HB, G - h0);
        float q[HB][CPL][E], acc[HB][CPL][E], m[HB], l[HB];
#pragma unroll
        for (int h = 0; h < HB; h++) {
            m[h] = -CUDART_INF_F;
            l[h] = 0.0f;
#pragma unroll
            for (int j = 0; j < CPL; j++) {
                const int c = lr + j * lpr;
#pragma unroll
                for (int i = 0; i < E; i++) {
                    acc[h][j][i] = 0.0f;
                    q[h][j][i] = (h < nh && c < n_chunks) ? qbase[(size_t)(h0 + h) * hd + c * E + i] : 0.0f;
                }
            }
        }
        for (int e = task.e0 + warp; e < task.e1; e += kWarps) {
            const pikv_cuda_entry ent = a.entries_dev[e];
            const int n = ent.len;
            if (n <= 0) continue; /* uniform over the warp */
            Page pg;
            pg.p = reinterpret_cast<const uint8_t *>(ent.page);
            pg.L = ent.quant ? a.Q : a.L;
            float pm[HB], psum[HB]; /* this page's max and sum (PAGE_LSE) */
            bool live[HB];          /* a valid row of this page scored above -inf */
#pragma unroll
            for (int h = 0; h < HB; h++) {
                pm[h] = -CUDART_INF_F;
                psum[h] = 0.0f;
                live[h] = false;
            }
            for (int r0 = 0; r0 < n; r0 += rpw * kUnroll) {
                float kx[kUnroll][CPL][E], vx[kUnroll][CPL][E];
                bool valid[kUnroll];
#pragma unroll
                for (int u = 0; u < kUnroll; u++) {
                    const int r = r0 + u * rpw + rg;
                    valid[u] = r < n;
#pragma unroll
                    for (int j = 0; j < CPL; j++) {
                        const int c = lr + j * lpr;
                        if (valid[u] && c < n_chunks) {
                            load_row<E, true>(pg, g, r, c * E, kx[u][j]);
                            load_row<E, false>(pg, g, r, c * E, vx[u][j]);
                        } else {
#pragma unroll
                            for (int i = 0; i < E; i++) kx[u][j][i] = vx[u][j][i] = 0.0f;
                        }
                    }
                }
#pragma unroll
                for (int h = 0; h < HB; h++) {
                    if (h >= nh) break; /* uniform */
                    float s[kUnroll];
#pragma unroll
                    for (int u = 0; u < kUnroll; u++) {
                        float d = 0.0f;
#pragma unroll
                        for (int j = 0; j < CPL; j++)
#pragma unroll
                            for (int i = 0; i < E; i++) d = fmaf(q[h][j][i], kx[u][j][i], d);
                        for (int o = lpr >> 1; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
                        s[u] = valid[u] ? d * a.scale : -CUDART_INF_F; /* scaled after the sum, like the CPU */
                    }
                    float mx = m[h];
#pragma unroll
                    for (int u = 0; u < kUnroll; u++) mx = fmaxf(mx, s[u]);
                    /* NaN scores (overflowed inputs) must reach the finish kernel's check */
#pragma unroll
                    for (int u = 0; u < kUnroll; u++) {
                        if (valid[u] && !(s[u] == s[u])) mx = s[u];
                        if (valid[u] && s[u] != -CUDART_INF_F) live[h] = true;
                    }
                    if (mx != -CUDART_INF_F) {
                        const float alpha = m[h] == -CUDART_INF_F ? 0.0f : expf(m[h] - mx);
                        float p[kUnroll], psn = 0.0f;
#pragma unroll
                        for (int u = 0; u < kUnroll; u++) {
                            p[u] = valid[u] ? expf(s[u] - mx) : 0.0f;
                            psn += p[u];
                        }
                        l[h] = l[h] * alpha + psn;
                        m[h] = mx;
#pragma unroll
                        for (int j = 0; j < CPL; j++)
#pragma unroll
                            for (int i = 0; i < E; i++) {
                                float x = acc[h][j][i] * alpha;
#pragma unroll
                                for (int u = 0; u < kUnroll; u++) x = fmaf(p[u], vx[u][j][i], x);
                                acc[h][j][i] = x;
                            }
                    }
                    if constexpr (PAGE_LSE) {
                        float pmx = pm[h];
#pragma unroll
                        for (int u = 0; u < kUnroll; u++) pmx = fmaxf(pmx, s[u]);
                        if (pmx != -CUDART_INF_F) {
                            float x = pm[h] == -CUDART_INF_F ? 0.0f : psum[h] * expf(pm[h] - pmx);
#pragma unroll
                            for (int u = 0; u < kUnroll; u++) x += valid[u] ? expf(s[u] - pmx) : 0.0f;
                            psum[h] = x;
                            pm[h] = pmx;
                        }
                    }
                }
            }
            /* every valid score of the page -inf (q.k overflowed below -FLT_MAX):
               the CPU's page sum is NaN there; poison the state likewise so the
               finish kernel reports it (the vote is warp-uniform: one page per warp) */
#pragma unroll
            for (int h = 0; h < HB; h++) {
                if (h >= nh) break;
                if (!__any_sync(0xffffffffu, live[h])) m[h] = l[h] = CUDART_NAN_F;
            }
            if constexpr (PAGE_LSE) {
                if (a.page_lse_dev) {
#pragma unroll
                    for (int h = 0; h < HB; h++) {
                        if (h >= nh) break;
                        float pmh = pm[h], psh = psum[h];
                        for (int o = lpr; o < 32; o <<= 1) {
                            const float m2 = __shfl_xor_sync(0xffffffffu, pmh, o);
                            const float l2 = __shfl_xor_sync(0xffffffffu, psh, o);
                            float w1, w2;
                            lse_merge(pmh, psh, m2, l2, w1, w2);
                        }
                        if (lane == 0)
                            a.page_lse_dev[(size_t)ent.id * G + h0 + h] =
                                psh > 0.0f ? pmh + logf(psh) : -CUDART_INF_F;
                    }
                }
            }
        }
        /* merge the row groups of each warp, then the warps */
#pragma unroll
        for (int h = 0; h < HB; h++) {
            for (int o = lpr; o < 32; o <<= 1) {
                const float m2 = __shfl_xor_sync(0xffffffffu, m[h], o);
                const float l2 = __shfl_xor_sync(0xffffffffu, l[h], o);
                float w1, w2;
                lse_merge(m[h], l[h], m2, l2, w1, w2);
#pragma unroll
                for (int j = 0; j < CPL; j++)
#pragma unroll
                    for (int i = 0; i < E; i++) {
                        const float x2 = __shfl_xor_sync(0xffffffffu, acc[h][j][i], o);
                        acc[h][j][i] = acc[h][j][i] * w1 + x2 * w2;
                    }
            }
            if (h < nh && rg == 0) {
#pragma unroll
                for (int j = 0; j < CPL; j++) {
                    const int c = lr + j * lpr;
                    if (c < n_chunks)
#pragma unroll
                        for (int i = 0; i < E; i++) sm_acc[warp][h][c * E + i] = acc[h][j][i];
                }
                if (lr == 0) {
                    sm_ml[warp][h][0] = m[h];
                    sm_ml[warp][h][1] = l[h];
                }
            }
        }
        __syncthreads();
        for (int i = threadIdx.x; i < nh * hd; i += kThreads) {
            const int h = i / hd, d = i - h * hd;
            float mm = -CUDART_INF_F, ll = 0.0f, x = 0.0f;
            for (int w = 0; w < kWarps; w++) {
                float w1, w2;
                lse_merge(mm, ll, sm_ml[w][h][0], sm_ml[w][h][1], w1, w2);
                x = x * w1 + sm_acc[w][h][d] * w2;
            }
            float *ph = part + (size_t)(h0 + h) * (hd + 2);
            ph[2 + d] = x;
            if (d == 0) {
                ph[0] = mm;
                ph[1] = ll;
            }
        }
        __syncthreads(); /* the shared buffers are reused by the next head block */
    }
}

/* One block per (list, query head): the exact merge of the list's tasks. */
__global__ void __launch_bounds__(128) attention_finish(pikv_cuda_attention_launch a)
{
    __shared__ float red[128];
    __shared__ float bcast;
    const int kvh = a.L.kvh, hd = a.L.hd, G = a.n_q_heads / kvh;
    const int unit = blockIdx.x / G, h = blockIdx.x % G, query = unit / kvh, g = unit % kvh;
    const size_t head = (size_t)query * a.n_q_heads + (size_t)g * G + (size_t)h;
    const size_t stride = (size_t)G * (size_t)(hd + 2);
    const int t0 = a.list_tasks_dev[unit], t1 = a.list_tasks_dev[unit + 1];
    const float *parts = a.parts_dev + (size_t)h * (hd + 2);

    /* the largest task maximum, with overflow (NaN or +inf) detection */
    float mx = -CUDART_INF_F;
    bool bad = false;
    for (int t = t0 + (int)threadIdx.x; t < t1; t += blockDim.x) {
        const float *ph = parts + (size_t)t * stride;
        if ((!(ph[0] < CUDART_INF_F) && ph[0] != -CUDART_INF_F) || !(ph[1] < CUDART_INF_F)) bad = true;
        else if (ph[1] > 0.0f) mx = fmaxf(mx, ph[0]);
    }
    if (__syncthreads_or(bad)) {
        if (threadIdx.x == 0) atomicMin(a.overflow_dev, unit);
        return;
    }
    red[threadIdx.x] = mx;
    __syncthreads();
    for (int o = blockDim.x / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o) red[threadIdx.x] = fmaxf(red[threadIdx.x], red[threadIdx.x + o]);
        __syncthreads();
    }
    const float m = red[0];
    __syncthreads();
    float *o = a.out_dev + head * (size_t)hd;
    if (m == -CUDART_INF_F) {
        for (int d = threadIdx.x; d < hd; d += blockDim.x) o[d] = 0.0f;
        if (threadIdx.x == 0) a.lse_dev[head] = -CUDART_INF_F;
        return;
    }
    float sum = 0.0f;
    for (int t = t0 + (int)threadIdx.x; t < t1; t += blockDim.x) {
        const float *ph = parts + (size_t)t * stride;
        if (ph[1] > 0.0f) sum += expf(ph[0] - m) * ph[1];
    }
    red[threadIdx.x] = sum;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) red[threadIdx.x] += red[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) bcast = red[0];
    __syncthreads();
    const float total = bcast, inv = 1.0f / total;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float x = 0.0f;
        for (int t = t0; t < t1; t++) {
            const float *ph = parts + (size_t)t * stride;
            if (ph[1] > 0.0f) x += expf(ph[0] - m) * ph[2 + d];
        }
        o[d] = x * inv;
    }
    if (threadIdx.x == 0) a.lse_dev[head] = m + logf(total);
}

/* The vector path's chunk width for a layout pair: 16 bytes of the open dtype. */
__host__ __device__ inline int vector_elems(int open_dtype)
{
    return open_dtype == 0 ? 4 : 8;
}

bool aligned(const pikv_cuda_layout &L, uint32_t bytes)
{
    return L.k % bytes == 0 && L.v % bytes == 0 && L.hs % bytes == 0 && L.row % bytes == 0 && L.pb % bytes == 0;
}

template <int E, int CPL, int HB, int U, int HDMAX>
cudaError_t launch_part(const pikv_cuda_attention_launch &a, cudaStream_t stream)
{
    if (a.page_lse_dev)
        attention_part<E, CPL, HB, U, HDMAX, true><<<a.n_tasks, kThreads, 0, stream>>>(a);
    else
        attention_part<E, CPL, HB, U, HDMAX, false><<<a.n_tasks, kThreads, 0, stream>>>(a);
    return cudaGetLastError();
}

} // namespace

extern "C" int pikv_cuda_attention_vectorized(const pikv_cuda_layout *L)
{
    const int E = vector_elems(L->dtype);
    if (L->dtype > 1 || L->hd % E != 0 || L->hd / E > 32) return 0;
    return aligned(*L, 16u) ? 1 : 0; /* 16-byte loads of open rows (E f32 or f16 channels) */
}

/* Quantized pages mixed into the vector path read E channels as E bytes (int8)
   or E / 2 bytes (int4) per access: their offsets must be that aligned. */
static bool quant_vectorizable(const pikv_cuda_layout &Q, int E)
{
    if (Q.hd == 0) return true; /* no quantized pool */
    const uint32_t bytes = Q.dtype == 2 ? (uint32_t)E : (uint32_t)E / 2;
    return Q.hd % E == 0 && Q.k % bytes == 0 && Q.v % bytes == 0 && Q.hs % bytes == 0 && Q.row % bytes == 0;
}

extern "C" cudaError_t pikv_cuda_attention(const pikv_cuda_attention_launch *a, cudaStream_t stream)
{
    const int kvh = a->L.kvh, G = a->n_q_heads / kvh, units = a->n_queries * kvh;
    if (units <= 0) return cudaSuccess;
    cudaError_t err = cudaSuccess;
    if (a->n_tasks > 0) {
        const bool vec = pikv_cuda_attention_vectorized(&a->L) && quant_vectorizable(a->Q, vector_elems(a->L.dtype));
        /* registers: q and acc hold HB x CPL x E floats each, K and V U x CPL x E */
        if (vec && a->L.dtype == 1)
            err = G <= 4 ? launch_part<8, 1, 4, 2, 256>(*a, stream) : launch_part<8, 1, 8, 2, 256>(*a, stream);
        else if (vec)
            err = G <= 4 ? launch_part<4, 1, 4, 2, 128>(*a, stream) : launch_part<4, 1, 8, 2, 128>(*a, stream);
        else if (a->L.hd <= 256)
            err = launch_part<1, 8, 2, 1, 256>(*a, stream);
        else
            err = launch_part<1, 32, 1, 1, 1024>(*a, stream);
        if (err != cudaSuccess) return err;
    }
    attention_finish<<<units * G, 128, 0, stream>>>(*a);
    return cudaGetLastError();
}
