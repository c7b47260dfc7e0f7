// Fused CUDA kernels for the SDXL UNet and VAE, compiled to PTX by build.rs (feature `cuda`) and
// launched from cuda/mod.rs. Everything accumulates in f32 whatever the storage type.
//
// flash_attn_*: softmax(q kᵀ · scale) v for head dim 64, one pass over the keys with an online
// softmax (FlashAttention-2's schedule), so the score matrix is never stored. mma.sync m16n8k16
// tensor-core instructions (sm_80+), fragments laid out as the PTX ISA documents them:
//   A (16x16, row-major) reg0: (r, c..c+1), reg1: (r+8, c..c+1), reg2: (r, c+8..), reg3: (r+8, c+8..)
//   B (16x8, "col")      reg0: k = c..c+1, n = r;   reg1: k = c+8..c+9, n = r
//   C (16x8, f32)        c0,c1: (r, c..c+1);        c2,c3: (r+8, c..c+1)
// with r = lane / 4 and c = 2 * (lane % 4). A C tile pair of scores is exactly the A fragment of
// the probabilities for the next product, so P never leaves registers. K and V tiles are
// double-buffered in shared memory (cp.async); V's B fragments come from ldmatrix.trans.
//
// group_norm_*: GroupNorm (+ optional SiLU) over NCHW in two launches: partial shifted sums per
// chunk of each group, then normalise + affine (+ SiLU) with the combined statistics.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#define HEAD_DIM 64
#define BLOCK_Q 128
#define BLOCK_K 64
// Row pitch in shared memory: 72 elements = 36 words, so the 8 rows x 4 words a fragment load
// touches fall in 32 different banks.
#define PITCH 72

__device__ __forceinline__ uint32_t pack2(float a, float b, __half) {
  __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}
__device__ __forceinline__ uint32_t pack2(float a, float b, __nv_bfloat16) {
  __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<uint32_t*>(&h);
}

__device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1, __half) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1,
                                    __nv_bfloat16) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t ld32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global → shared without passing through registers; `bytes` = 0 fills zeros (rows past
// the end of the keys).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(bytes));
}

// Four transposed 8x8 b16 tiles: lane l gives the address of row l % 8 of tile l / 8.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// q: element (b, s, h, d) at q[b * q_bs + s * q_ss + h * 64 + d]; likewise k, v and o. Strides and
// offsets are multiples of 8 elements (checked by the caller), so rows load as 16-byte vectors.
// Grid: (ceil(sq / 128), batch * heads); block: 256 threads, 8 warps of 16 query rows each.
// Shared memory: two stages of (K, V) tiles, 64 keys each, row-major; the first stage holds the
// 128 query rows until their fragments are in registers. Each stage's tile is fetched with
// cp.async while the other is computed on.
template <typename T>
__device__ void flash_attn(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                           T* __restrict__ o, int heads, int sq, int sk, long q_bs, long q_ss, long k_bs,
                           long k_ss, long v_bs, long v_ss, long o_bs, long o_ss, float scale_log2) {
  __shared__ __align__(16) T smem[2][2][BLOCK_K][PITCH];  // [stage][K or V][key][dim]
  T(*sQ)[PITCH] = smem[0][0];                              // 128 rows: stage 0's K and V

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int r = lane >> 2, c = (lane & 3) * 2;
  const int b = blockIdx.y / heads, h = blockIdx.y % heads;
  const int q0 = blockIdx.x * BLOCK_Q;
  q += b * q_bs + h * HEAD_DIM;
  k += b * k_bs + h * HEAD_DIM;
  v += b * v_bs + h * HEAD_DIM;
  o += b * o_bs + h * HEAD_DIM;

  for (int i = tid; i < BLOCK_Q * 8; i += blockDim.x) {
    int row = i >> 3, col = (i & 7) * 8;
    bool in = q0 + row < sq;
    cp_async16(&sQ[row][col], q + (in ? (q0 + row) * q_ss : 0) + col, in ? 16 : 0);
  }
  asm volatile("cp.async.commit_group;\n" ::);
  asm volatile("cp.async.wait_group 0;\n" ::);
  __syncthreads();
  uint32_t qa[4][4];
  const int qr = warp * 16 + r;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    qa[kk][0] = ld32(&sQ[qr][kk * 16 + c]);
    qa[kk][1] = ld32(&sQ[qr + 8][kk * 16 + c]);
    qa[kk][2] = ld32(&sQ[qr][kk * 16 + c + 8]);
    qa[kk][3] = ld32(&sQ[qr + 8][kk * 16 + c + 8]);
  }
  __syncthreads();  // stage 0 is free for keys

  // 64 keys x 8 vectors of 8 elements, for K and for V: 2 of each per thread.
  auto fetch = [&](int stage, int k0) {
    for (int i = tid; i < BLOCK_K * 8; i += blockDim.x) {
      int row = i >> 3, col = (i & 7) * 8;
      bool in = k0 + row < sk;
      cp_async16(&smem[stage][0][row][col], k + (in ? (k0 + row) * k_ss : 0) + col, in ? 16 : 0);
      cp_async16(&smem[stage][1][row][col], v + (in ? (k0 + row) * v_ss : 0) + col, in ? 16 : 0);
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };

  float acc[8][4];
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

  fetch(0, 0);
  for (int k0 = 0, stage = 0; k0 < sk; k0 += BLOCK_K, stage ^= 1) {
    if (k0 + BLOCK_K < sk) {
      fetch(stage ^ 1, k0 + BLOCK_K);
      asm volatile("cp.async.wait_group 1;\n" ::);  // this stage's group has landed
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::);
    }
    __syncthreads();
    T(*sK)[PITCH] = smem[stage][0];
    T(*sV)[PITCH] = smem[stage][1];

    // S = Q Kᵀ for this warp's 16 rows and the tile's 64 keys: 8 C tiles of 16x8.
    float s[8][4];
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        mma(s[j], qa[kk], ld32(&sK[j * 8 + r][kk * 16 + c]), ld32(&sK[j * 8 + r][kk * 16 + c + 8]), T());
      }
    }
    // Scale into log2 units and mask keys past the end.
    float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        bool in = k0 + j * 8 + c + e < sk;
        s[j][e] = in ? s[j][e] * scale_log2 : -INFINITY;
        s[j][2 + e] = in ? s[j][2 + e] * scale_log2 : -INFINITY;
        mx0 = fmaxf(mx0, s[j][e]);
        mx1 = fmaxf(mx1, s[j][2 + e]);
      }
    }
    // The 4 threads of a quad share rows r and r + 8.
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 2));
    const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
    const float alpha0 = exp2f(m0 - n0), alpha1 = exp2f(m1 - n1);
    m0 = n0;
    m1 = n1;
    float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        s[j][e] = exp2f(s[j][e] - n0);
        s[j][2 + e] = exp2f(s[j][2 + e] - n1);
        sum0 += s[j][e];
        sum1 += s[j][2 + e];
      }
    }
    l0 = l0 * alpha0 + sum0;
    l1 = l1 * alpha1 + sum1;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      acc[j][0] *= alpha0;
      acc[j][1] *= alpha0;
      acc[j][2] *= alpha1;
      acc[j][3] *= alpha1;
    }
    // O += P V: P's C tiles (2kk, 2kk+1) are the A fragment of keys 16kk..16kk+15; V's B
    // fragments for two 8-dim tiles at a time come transposed from ldmatrix.
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t pa[4] = {pack2(s[2 * kk][0], s[2 * kk][1], T()), pack2(s[2 * kk][2], s[2 * kk][3], T()),
                        pack2(s[2 * kk + 1][0], s[2 * kk + 1][1], T()),
                        pack2(s[2 * kk + 1][2], s[2 * kk + 1][3], T())};
      const int key = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;
#pragma unroll
      for (int jd = 0; jd < 8; jd += 2) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, &sV[key][(jd + (lane >> 4)) * 8]);
        mma(acc[jd], pa, vb[0], vb[1], T());
        mma(acc[jd + 1], pa, vb[2], vb[3], T());
      }
    }
    __syncthreads();  // this stage is consumed before it is fetched into again
  }

  l0 += __shfl_xor_sync(0xffffffff, l0, 1);
  l0 += __shfl_xor_sync(0xffffffff, l0, 2);
  l1 += __shfl_xor_sync(0xffffffff, l1, 1);
  l1 += __shfl_xor_sync(0xffffffff, l1, 2);
  const float inv0 = 1.f / l0, inv1 = 1.f / l1;
  const int row0 = q0 + qr, row1 = row0 + 8;
#pragma unroll
  for (int jd = 0; jd < 8; ++jd) {
    if (row0 < sq)
      *reinterpret_cast<uint32_t*>(o + row0 * o_ss + jd * 8 + c) = pack2(acc[jd][0] * inv0, acc[jd][1] * inv0, T());
    if (row1 < sq)
      *reinterpret_cast<uint32_t*>(o + row1 * o_ss + jd * 8 + c) = pack2(acc[jd][2] * inv1, acc[jd][3] * inv1, T());
  }
}

#define FLASH_ATTN(NAME, T)                                                                                  \
  extern "C" __global__ void __launch_bounds__(256, 2)                                                        \
      NAME(const T* q, const T* k, const T* v, T* o, int heads, int sq, int sk, long q_bs, long q_ss, long k_bs, \
           long k_ss, long v_bs, long v_ss, long o_bs, long o_ss, float scale_log2) {                       \
    flash_attn<T>(q, k, v, o, heads, sq, sk, q_bs, q_ss, k_bs, k_ss, v_bs, v_ss, o_bs, o_ss, scale_log2);   \
  }
FLASH_ATTN(flash_attn_f16, __half)
FLASH_ATTN(flash_attn_bf16, __nv_bfloat16)

// ---------------------------------------------------------------------------------------------
// GroupNorm. x is contiguous [B, C, HW]; group (b, g) is the contiguous run of n = (C / G) * HW
// elements at (b * G + g) * n. Grid (B * G, splits): block (group, s) covers elements
// [s * chunk, min(n, (s + 1) * chunk)).

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void from_f32(float x, float* y) { *y = x; }
__device__ __forceinline__ void from_f32(float x, __half* y) { *y = __float2half_rn(x); }
__device__ __forceinline__ void from_f32(float x, __nv_bfloat16* y) { *y = __float2bfloat16_rn(x); }

// Partial sums of (x - shift) and (x - shift)², shift = the group's first element, so the
// variance does not cancel catastrophically when the mean is large. partial: [groups, splits, 2].
template <typename T>
__device__ void group_norm_stats(const T* __restrict__ x, float* __restrict__ partial, long n, long chunk) {
  __shared__ float red[2][32];
  const long base = (long)blockIdx.x * n;
  const float shift = to_f32(x[base]);
  const long start = blockIdx.y * chunk, end = min(n, start + chunk);
  float s = 0.f, ss = 0.f;
  for (long i = start + threadIdx.x; i < end; i += blockDim.x) {
    float d = to_f32(x[base + i]) - shift;
    s += d;
    ss += d * d;
  }
  for (int off = 16; off > 0; off >>= 1) {
    s += __shfl_xor_sync(0xffffffff, s, off);
    ss += __shfl_xor_sync(0xffffffff, ss, off);
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (lane == 0) {
    red[0][warp] = s;
    red[1][warp] = ss;
  }
  __syncthreads();
  if (warp == 0) {
    const int warps = blockDim.x >> 5;
    s = lane < warps ? red[0][lane] : 0.f;
    ss = lane < warps ? red[1][lane] : 0.f;
    for (int off = 16; off > 0; off >>= 1) {
      s += __shfl_xor_sync(0xffffffff, s, off);
      ss += __shfl_xor_sync(0xffffffff, ss, off);
    }
    if (lane == 0) {
      float* p = partial + ((long)blockIdx.x * gridDim.y + blockIdx.y) * 2;
      p[0] = s;
      p[1] = ss;
    }
  }
}

// y = (x - mean) / sqrt(var + eps) * gamma[c] + beta[c], then SiLU when `silu`; hw = elements per
// channel, cpg = channels per group.
template <typename T>
__device__ void group_norm_apply(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
                                 const float* __restrict__ partial, T* __restrict__ y, long n, long chunk, long hw,
                                 int cpg, int groups, float eps, int silu) {
  __shared__ float stats[2];
  const long base = (long)blockIdx.x * n;
  if (threadIdx.x == 0) {
    float s = 0.f, ss = 0.f;
    const float* p = partial + (long)blockIdx.x * gridDim.y * 2;
    for (int i = 0; i < gridDim.y; ++i) {
      s += p[2 * i];
      ss += p[2 * i + 1];
    }
    const float mean_d = s / n;
    const float var = fmaxf(ss / n - mean_d * mean_d, 0.f);
    stats[0] = to_f32(x[base]) + mean_d;
    stats[1] = rsqrtf(var + eps);
  }
  __syncthreads();
  const float mean = stats[0], rstd = stats[1];
  const int g = blockIdx.x % groups;
  const long start = blockIdx.y * chunk, end = min(n, start + chunk);
  for (long i = start + threadIdx.x; i < end; i += blockDim.x) {
    const int ch = g * cpg + (int)((unsigned)i / (unsigned)hw);  // n < 2^31, checked by the caller
    float val = (to_f32(x[base + i]) - mean) * rstd * to_f32(gamma[ch]) + to_f32(beta[ch]);
    if (silu) val = val / (1.f + __expf(-val));
    from_f32(val, &y[base + i]);
  }
}

#define GROUP_NORM(SUFFIX, T)                                                                              \
  extern "C" __global__ void group_norm_stats_##SUFFIX(const T* x, float* partial, long n, long chunk) {     \
    group_norm_stats<T>(x, partial, n, chunk);                                                             \
  }                                                                                                        \
  extern "C" __global__ void group_norm_apply_##SUFFIX(const T* x, const T* gamma, const T* beta,           \
                                                       const float* partial, T* y, long n, long chunk, long hw, \
                                                       int cpg, int groups, float eps, int silu) {         \
    group_norm_apply<T>(x, gamma, beta, partial, y, n, chunk, hw, cpg, groups, eps, silu);                 \
  }
GROUP_NORM(f32, float)
GROUP_NORM(f16, __half)
GROUP_NORM(bf16, __nv_bfloat16)

// ---------------------------------------------------------------------------------------------
// Elementwise kernels that candle runs as strided broadcasts (several times slower than a
// contiguous pass): a per-channel bias add and GEGLU.

// y = x + b[(i / inner) % c] (+ r[i] when r is not null) for contiguous x and r: a Linear's bias
// (inner = 1) or a convolution's over NCHW (inner = H·W), and the residual that often follows.
template <typename T>
__device__ void add_bias(const T* __restrict__ x, const T* __restrict__ b, const T* __restrict__ r,
                         T* __restrict__ y, long n, long inner, int c) {
  // 32-bit index arithmetic (the caller checks n < 2^31): 64-bit division is many times slower.
  const unsigned un = n, uinner = inner, uc = c;
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < un; i += gridDim.x * blockDim.x) {
    const unsigned ch = (uinner == 1 ? i : i / uinner) % uc;
    float v = to_f32(x[i]) + to_f32(b[ch]);
    if (r) v += to_f32(r[i]);
    from_f32(v, &y[i]);
  }
}

// diffusers GEGLU: h = [value | gate] per row of 2·inner (plus the projection's bias b, 2·inner,
// when not null); y = value · GELU(gate), exact (erf) GELU.
template <typename T>
__device__ void geglu(const T* __restrict__ h, const T* __restrict__ b, T* __restrict__ y, long rows, long inner) {
  const unsigned n = rows * inner, uinner = inner;  // n < 2^31, checked by the caller
  for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const unsigned r = i / uinner, j = i - r * uinner;
    float value = to_f32(h[2 * (long)r * uinner + j]);
    float gate = to_f32(h[2 * (long)r * uinner + uinner + j]);
    if (b) {
      value += to_f32(b[j]);
      gate += to_f32(b[uinner + j]);
    }
    from_f32(value * (0.5f * gate * (1.f + erff(gate * 0.70710678118654752f))), &y[i]);
  }
}

#define ELEMENTWISE(SUFFIX, T)                                                                              \
  extern "C" __global__ void add_bias_##SUFFIX(const T* x, const T* b, const T* r, T* y, long n, long inner, \
                                               int c) {                                                    \
    add_bias<T>(x, b, r, y, n, inner, c);                                                                  \
  }                                                                                                        \
  extern "C" __global__ void geglu_##SUFFIX(const T* h, const T* b, T* y, long rows, long inner) {            \
    geglu<T>(h, b, y, rows, inner);                                                                        \
  }
ELEMENTWISE(f32, float)
ELEMENTWISE(f16, __half)
ELEMENTWISE(bf16, __nv_bfloat16)
