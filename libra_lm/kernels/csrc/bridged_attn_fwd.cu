// Bridged attention forward: one thread block per query tile of one modality, online softmax
// over the key/value view that modality needs, log-sum-exp written for the backward.
// libra_lm/kernels/reference.py `tiled_forward` is the same algorithm step by step.
//
// Each warp owns 32 query rows as two 16-row MMA tiles (as FlashAttention-2's forward), so every
// K and V fragment read from shared memory feeds two mma.sync: 0.31 ldmatrix.x4 per MMA instead
// of 0.56 with one tile per warp. The mask is applied only on key steps that reach past the
// tile's first query or cross a segment boundary.
#include <cmath>

#include "bridged_attn.h"
#include "bridged_attn_common.cuh"

namespace libra {
namespace {

// Two blocks per SM: 4 warps x 255 registers each, and 2 x 102 KiB of shared memory on sm_90
// (libra_lm/kernels/README.md has the ptxas reports).
template <typename T, int D, int BM, int BN, int NW>
__global__ void __launch_bounds__(NW * 32, 2) bridged_attn_fwd_kernel(const BridgedAttnParams p) {
  constexpr int MT = 2;  // 16-row MMA tiles per warp
  static_assert(BM == 16 * MT * NW, "each warp owns 32 query rows");
  static_assert(D % 16 == 0 && BN % kKeyGroup == 0, "tile sizes must be multiples of 16 and of the key group");
  using Ops = MmaOps<T>;
  constexpr int LD = D + 8;   // padded row: ldmatrix row addresses fall in distinct banks
  constexpr int CPR = D / 8;  // 16-byte chunks per row
  constexpr int NT = NW * 32;

  LIBRA_DYNAMIC_SMEM(smem_raw);
  T* q_s = reinterpret_cast<T*>(smem_raw);  // [BM][LD]
  T* k_s = q_s + BM * LD;                   // [2][BN][LD], double buffered
  T* v_s = k_s + 2 * BN * LD;               // [2][BN][LD]

  // Last tiles first: they tend to have the longest key ranges.
  const int tile_idx = gridDim.x - 1 - blockIdx.x;
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int N = p.N;
  const int4 tile = reinterpret_cast<const int4*>(p.tiles)[(int64_t)b * p.T + tile_idx];
  const int q_start = tile.x, q_end = tile.y, key_lo = tile.z, key_hi = tile.w;
  if (q_start >= q_end) return;  // unused tile slot (uniform over the block)
  const int modality = q_start >= p.n_text[b] ? 1 : 0;

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, t4 = lane & 3;

  const int32_t* perm = p.perm + (int64_t)b * N;
  const uint8_t* is_vision = p.is_vision + (int64_t)b * N;
  const int32_t* segment = p.segment ? p.segment + (int64_t)b * N : nullptr;
  const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_st.b + h * p.k_st.h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_st.b + h * p.v_st.h;
  const T* kx = static_cast<const T*>(p.kx) + b * p.kx_st.b + h * p.kx_st.h;
  const T* vx = static_cast<const T*>(p.vx) + b * p.vx_st.b + h * p.vx_st.h;

  // Query rows are gathered through the permutation; rows past the tile are zero.
  for (int c = tid; c < BM * CPR; c += NT) {
    const int r = c / CPR, col = (c % CPR) * 8;
    const int s = q_start + r;
    const bool ok = s < q_end;
    const int pos = ok ? perm[s] : 0;
    cp_async_16(q_s + r * LD + col, q + pos * p.q_st.n + col, ok);
  }
  // Key row j comes from k/v when its modality is the tile's, else from kx/vx.
  auto load_kv = [&](int kb, int buf) {
    T* kd = k_s + buf * BN * LD;
    T* vd = v_s + buf * BN * LD;
    for (int c = tid; c < BN * CPR; c += NT) {
      const int r = c / CPR, col = (c % CPR) * 8;
      const int j = kb * BN + r;
      const bool ok = j < N;
      const int jj = ok ? j : 0;
      const bool same = (is_vision[jj] != 0) == (modality != 0);
      const T* ksrc = same ? k + jj * p.k_st.n : kx + jj * p.kx_st.n;
      const T* vsrc = same ? v + jj * p.v_st.n : vx + jj * p.vx_st.n;
      cp_async_16(kd + r * LD + col, ksrc + col, ok);
      cp_async_16(vd + r * LD + col, vsrc + col, ok);
    }
  };

  // Position of this thread's query row i (g and g + 8 of each of the warp's two 16-row
  // tiles), -1 past the tile. Read again where needed (masked steps, the end) rather than held:
  // the forward is short of registers.
  auto row_position = [&](int mt, int i) {
    const int s = q_start + warp * 32 + mt * 16 + g + 8 * i;
    return s < q_end ? perm[s] : -1;
  };
  const int min_pos = perm[q_start];  // positions ascend inside a tile
  // The segment all the tile's queries share (-1: several), and the key groups' labels.
  const int tile_seg = segment != nullptr ? p.tile_segment[(int64_t)b * p.T + tile_idx] : 0;
  const int32_t* key_seg = segment != nullptr ? p.key_segment + (int64_t)b * ((N + kKeyGroup - 1) / kKeyGroup) : nullptr;

  float acc[MT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nd][e] = 0.f;
  float m_run[MT][2], l_run[MT][2];  // running max of the raw scores; this thread's part of the row sums
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      m_run[mt][i] = -INFINITY;
      l_run[mt][i] = 0.f;
    }
  const float sl2 = p.scale_log2;

  const int kb_begin = key_lo / BN;
  const int kb_end = (key_hi + BN - 1) / BN;
  load_kv(kb_begin, 0);
  cp_async_commit();

  for (int kb = kb_begin; kb < kb_end; ++kb) {
    const int buf = (kb - kb_begin) & 1;
    if (kb + 1 < kb_end) {
      load_kv(kb + 1, buf ^ 1);  // prefetch the next step while this one computes
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* kt = k_s + buf * BN * LD;
    const T* vt = v_s + buf * BN * LD;

    // S = Q K^T for this warp's 32 rows: each K fragment feeds both row tiles.
    float s[MT][BN / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[mt][nb][e] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], a_frag_ptr(q_s, LD, warp * 32 + mt * 16, kk * 16, lane));
#pragma unroll
      for (int nb2 = 0; nb2 < BN / 16; ++nb2) {
        uint32_t bf[4];
        ldmatrix_x4(bf, b_frag_ptr_nk(kt, LD, nb2 * 16, kk * 16, lane));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Ops::mma(s[mt][2 * nb2], a[mt], bf[0], bf[1]);
          Ops::mma(s[mt][2 * nb2 + 1], a[mt], bf[2], bf[3]);
        }
      }
    }

    // Causal mask by original position, and the segment mask, on steps that need them: keys
    // past the tile's first query, or (with segments) not all in the one segment of all the
    // tile's queries. The decision is the same in every thread.
    bool need_mask = kb * BN + BN - 1 > min_pos;
    if (!need_mask && segment != nullptr) {
      need_mask = tile_seg < 0;
#pragma unroll
      for (int gi = 0; gi < BN / kKeyGroup; ++gi) need_mask = need_mask || key_seg[kb * (BN / kKeyGroup) + gi] != tile_seg;
    }
    if (need_mask) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int pos = row_position(mt, i);
          const int seg = (segment != nullptr && pos >= 0) ? segment[pos] : 0;
#pragma unroll
          for (int nb = 0; nb < BN / 8; ++nb)
#pragma unroll
            for (int e = 2 * i; e < 2 * i + 2; ++e) {
              const int j = kb * BN + nb * 8 + 2 * t4 + (e & 1);
              const bool ok = j <= pos && (segment == nullptr || segment[j] == seg);
              if (!ok) s[mt][nb][e] = -INFINITY;
            }
        }
    }

    // Online softmax (base 2). A row with no visible key yet keeps max -inf; it is shifted
    // by 0 instead so that exp2 gives 0 and never NaN.
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        float mx = m_run[mt][i];
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb) mx = fmaxf(mx, fmaxf(s[mt][nb][2 * i], s[mt][nb][2 * i + 1]));
        mx = quad_max(mx);
        const float m_use = mx == -INFINITY ? 0.f : mx;
        const float alpha = exp2f((m_run[mt][i] - m_use) * sl2);
        const float m_scaled = m_use * sl2;
        m_run[mt][i] = mx;
        float row_sum = 0.f;
#pragma unroll
        for (int nb = 0; nb < BN / 8; ++nb) {
          const float p0 = exp2f(fmaf(s[mt][nb][2 * i], sl2, -m_scaled));
          const float p1 = exp2f(fmaf(s[mt][nb][2 * i + 1], sl2, -m_scaled));
          s[mt][nb][2 * i] = p0;
          s[mt][nb][2 * i + 1] = p1;
          row_sum += p0 + p1;
        }
        l_run[mt][i] = l_run[mt][i] * alpha + row_sum;
#pragma unroll
        for (int nd = 0; nd < D / 8; ++nd) {
          acc[mt][nd][2 * i] *= alpha;
          acc[mt][nd][2 * i + 1] *= alpha;
        }
      }

    // O += P V, P straight from the score registers (rounded to the input type); each V
    // fragment feeds both row tiles.
#pragma unroll
    for (int kc = 0; kc < BN / 16; ++kc) {
      uint32_t a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        a[mt][0] = Ops::pack(s[mt][2 * kc][0], s[mt][2 * kc][1]);
        a[mt][1] = Ops::pack(s[mt][2 * kc][2], s[mt][2 * kc][3]);
        a[mt][2] = Ops::pack(s[mt][2 * kc + 1][0], s[mt][2 * kc + 1][1]);
        a[mt][3] = Ops::pack(s[mt][2 * kc + 1][2], s[mt][2 * kc + 1][3]);
      }
#pragma unroll
      for (int nd2 = 0; nd2 < D / 16; ++nd2) {
        uint32_t bf[4];
        ldmatrix_x4_trans(bf, b_frag_ptr_kn(vt, LD, kc * 16, nd2 * 16, lane));
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          Ops::mma(acc[mt][2 * nd2], a[mt], bf[0], bf[1]);
          Ops::mma(acc[mt][2 * nd2 + 1], a[mt], bf[2], bf[3]);
        }
      }
    }
    __syncthreads();  // the buffer is refilled two steps later
  }

  // Normalise and scatter rows back to their original positions.
  T* o = static_cast<T*>(p.out) + b * p.o_st.b + h * p.o_st.h;
  float* lse = p.lse + ((int64_t)b * p.H + h) * N;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const float l = quad_sum(l_run[mt][i]);
      const int pos = row_position(mt, i);
      if (pos < 0) continue;
      const float inv = 1.f / l;  // l >= 1: a query always sees itself
      T* orow = o + pos * p.o_st.n;
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd) {
        *reinterpret_cast<uint32_t*>(orow + nd * 8 + 2 * t4) =
            Ops::pack(acc[mt][nd][2 * i] * inv, acc[mt][nd][2 * i + 1] * inv);
      }
      if (t4 == 0) lse[pos] = m_run[mt][i] * p.scale + logf(l);
    }
}

template <typename T, int D, int V>
cudaError_t launch_fwd(const BridgedAttnParams& p, cudaStream_t stream) {
  using Config = KernelConfig<D, V>;
  constexpr int BM = kPlanBlockM, BN = Config::kFwdBlockN, NW = Config::kFwdWarps;
  const size_t smem = fwd_smem_bytes(D, BN);
  auto kernel = bridged_attn_fwd_kernel<T, D, BM, BN, NW>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(p.T, p.H, p.B);
  LIBRA_LAUNCH(kernel, grid, NW * 32, smem, stream)(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_fwd(const BridgedAttnParams& p, int head_dim, int variant, cudaStream_t stream) {
#define LIBRA_LAUNCH_IF(D_, V_) \
  if (head_dim == D_ && variant == V_) return launch_fwd<T, D_, V_>(p, stream);
  LIBRA_FOR_EACH_CONFIG(LIBRA_LAUNCH_IF)
#undef LIBRA_LAUNCH_IF
  return cudaErrorInvalidValue;
}

template <int D, int V>
void config_of(int64_t out[8]) {
  using C = KernelConfig<D, V>;
  const int64_t values[8] = {kPlanBlockM, C::kFwdBlockN, C::kFwdWarps, C::kBwdBlockM, C::kBwdBlockN,
                             C::kBwdBlockN / 16, int64_t(fwd_smem_bytes(D, C::kFwdBlockN)),
                             int64_t(bwd_smem_bytes(D, C::kBwdBlockM, C::kBwdBlockN))};
  for (int i = 0; i < 8; ++i) out[i] = values[i];
}

}  // namespace

cudaError_t bridged_attn_fwd(const BridgedAttnParams& p, DType dtype, int head_dim, int variant, cudaStream_t stream) {
  if (p.B == 0 || p.H == 0 || p.N == 0) return cudaSuccess;
  return dtype == DType::kBFloat16 ? dispatch_fwd<__nv_bfloat16>(p, head_dim, variant, stream)
                                   : dispatch_fwd<__half>(p, head_dim, variant, stream);
}

bool bridged_attn_config(int head_dim, int variant, int64_t out[8]) {
#define LIBRA_CONFIG_IF(D_, V_) \
  if (head_dim == D_ && variant == V_) return config_of<D_, V_>(out), true;
  LIBRA_FOR_EACH_CONFIG(LIBRA_CONFIG_IF)
#undef LIBRA_CONFIG_IF
  return false;
}

}  // namespace libra
