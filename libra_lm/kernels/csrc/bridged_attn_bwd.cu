// Bridged attention backward with recomputation: one thread block per key tile. For each of
// the two query views (text queries, then vision queries) the block loads the key/value rows
// that view uses, walks the query tiles of that modality that can see the key tile, and
// accumulates dK and dV of the view in registers. A key's gradient in the view of its own
// modality belongs to dk/dv, in the other view to dkx/dvx, so every output row is written
// exactly once and needs no atomics; dQ is accumulated with fp32 atomics as in
// FlashAttention-2. The block walks each query tile of the plan (the forward's) in steps of BM
// queries, and applies the mask only on steps that straddle the causal diagonal, a segment
// boundary or the tile's end. libra_lm/kernels/reference.py `tiled_backward` is the same
// algorithm.
#include <cmath>

#include "bridged_attn.h"
#include "bridged_attn_common.cuh"

namespace libra {
namespace {

constexpr float kLog2e = 1.4426950408889634f;

// delta[row] = sum_d dout[row, d] * out[row, d] - grad_lse[row]: the row term of dS.
template <typename T, int D>
__global__ void bridged_attn_bwd_delta_kernel(const BridgedAttnParams p) {
  constexpr int kWarpsPerBlock = 8;
  const int64_t row = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t rows = int64_t(p.B) * p.H * p.N;
  if (row >= rows) return;
  const int n = int(row % p.N);
  const int64_t bh = row / p.N;
  const int h = int(bh % p.H), b = int(bh / p.H);
  const T* o = static_cast<const T*>(p.out) + b * p.o_st.b + h * p.o_st.h + n * p.o_st.n;
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_st.b + h * p.do_st.h + n * p.do_st.n;
  float sum = 0.f;
  for (int c = lane; c < D; c += 32) sum += MmaOps<T>::to_float(o[c]) * MmaOps<T>::to_float(dout[c]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) p.delta[row] = sum - (p.grad_lse != nullptr ? p.grad_lse[row] : 0.f);
}

// One block of 8 warps per SM at d = 128 (255 registers, 156 KiB), as FlashAttention-2's backward.
template <typename T, int D, int BM, int BN, int NW>
__global__ void __launch_bounds__(NW * 32, 1) bridged_attn_bwd_kernel(const BridgedAttnParams p) {
  static_assert(BN == 16 * NW, "each warp owns 16 key rows");
  static_assert(D % 16 == 0 && BM % 16 == 0 && kPlanBlockM % BM == 0, "steps must divide the plan's tiles");
  static_assert(BN % kKeyGroup == 0, "key blocks are whole key groups");
  using Ops = MmaOps<T>;
  constexpr int LD = D + 8;    // padded rows of the [row][D] tiles
  constexpr int LDP = BM + 8;  // padded rows of the dS^T tile
  constexpr int CPR = D / 8;
  constexpr int NT = NW * 32;
  constexpr int SUBS = kPlanBlockM / BM;  // steps per plan tile
  // dQ (BM x D) is split into one task per warp: 16 rows x DQ_N columns.
  constexpr int DQ_N = D * (BM / 16) / NW;
  static_assert(DQ_N % 16 == 0 && D % DQ_N == 0, "dQ tasks must be 16-column multiples");
  constexpr int DQ_TASKS = (BM / 16) * (D / DQ_N);

  LIBRA_DYNAMIC_SMEM(smem_raw);
  T* k_s = reinterpret_cast<T*>(smem_raw);  // [BN][LD] key view
  T* v_s = k_s + BN * LD;                   // [BN][LD] value view
  T* q_s = v_s + BN * LD;                   // [2][BM][LD], double buffered
  T* do_s = q_s + 2 * BM * LD;              // [2][BM][LD]
  T* ds_s = do_s + 2 * BM * LD;             // [BN][LDP] dS^T, rows are keys
  float* lse_s = reinterpret_cast<float*>(ds_s + BN * LDP);  // [2][BM] lse * log2(e)
  float* delta_s = lse_s + 2 * BM;                           // [2][BM]
  int* qpos_s = reinterpret_cast<int*>(delta_s + 2 * BM);    // [2][BM] -1 past the tile
  int* qseg_s = qpos_s + 2 * BM;                             // [2][BM]

  const int key_tile = blockIdx.x;  // first key tiles have the most queries: scheduled first
  const int h = blockIdx.y;
  const int b = blockIdx.z;
  const int N = p.N;
  const int j0 = key_tile * BN;

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, t4 = lane & 3;

  const int32_t* perm = p.perm + (int64_t)b * N;
  const int4* tiles = reinterpret_cast<const int4*>(p.tiles) + (int64_t)b * p.T;
  const uint8_t* is_vision = p.is_vision + (int64_t)b * N;
  const int32_t* segment = p.segment ? p.segment + (int64_t)b * N : nullptr;
  const int32_t* tile_segment = segment != nullptr ? p.tile_segment + (int64_t)b * p.T : nullptr;
  const int64_t bh = (int64_t)b * p.H + h;
  const T* q = static_cast<const T*>(p.q) + b * p.q_st.b + h * p.q_st.h;
  const T* k = static_cast<const T*>(p.k) + b * p.k_st.b + h * p.k_st.h;
  const T* v = static_cast<const T*>(p.v) + b * p.v_st.b + h * p.v_st.h;
  const T* kx = static_cast<const T*>(p.kx) + b * p.kx_st.b + h * p.kx_st.h;
  const T* vx = static_cast<const T*>(p.vx) + b * p.vx_st.b + h * p.vx_st.h;
  const T* dout = static_cast<const T*>(p.dout) + b * p.do_st.b + h * p.do_st.h;
  const float* lse = p.lse + bh * N;
  const float* delta = p.delta + bh * N;
  float* dq_accum = p.dq_accum + bh * N * D;
  const float sl2 = p.scale_log2;

  const int n_text = p.n_text[b];
  const int tiles_text = (n_text + kPlanBlockM - 1) / kPlanBlockM;
  const int tiles_vision = (N - n_text + kPlanBlockM - 1) / kPlanBlockM;

  // The segment all keys of this block share, or -1 (several, or keys past the sequence).
  int key_block_seg = -1;
  if (segment != nullptr && j0 + BN <= N) {
    const int32_t* key_seg = p.key_segment + (int64_t)b * ((N + kKeyGroup - 1) / kKeyGroup) + j0 / kKeyGroup;
    key_block_seg = key_seg[0];
#pragma unroll
    for (int gi = 1; gi < BN / kKeyGroup; ++gi) key_block_seg = key_seg[gi] == key_block_seg ? key_block_seg : -1;
  }

  // Steps are (plan tile, BM-query part of it), numbered tile * SUBS + part. Next step after `s`
  // (below `s_end`) whose queries can see a key of this block; the same answer in every thread.
  auto next_step = [&](int s, int s_end) {
    for (++s; s < s_end; ++s) {
      const int4 tile = tiles[s / SUBS];
      const int r0 = tile.x + (s % SUBS) * BM;
      if (r0 >= tile.y || tile.z >= j0 + BN) continue;  // no query left, or all segments start later
      if (perm[(r0 + BM < tile.y ? r0 + BM : tile.y) - 1] >= j0) break;  // positions ascend: the last sees j0
    }
    return s;
  };
  // Gather a step's rows of Q and dO (cp.async) and its row data (plain stores, visible after
  // the next barrier) into buffer `buf`.
  auto load_query_step = [&](int s, int buf) {
    const int4 tile = tiles[s / SUBS];
    const int r0 = tile.x + (s % SUBS) * BM;
    T* qd = q_s + buf * BM * LD;
    T* dod = do_s + buf * BM * LD;
    for (int c = tid; c < BM * CPR; c += NT) {
      const int r = c / CPR, col = (c % CPR) * 8;
      const bool ok = r0 + r < tile.y;
      const int pos = ok ? perm[r0 + r] : 0;
      cp_async_16(qd + r * LD + col, q + pos * p.q_st.n + col, ok);
      cp_async_16(dod + r * LD + col, dout + pos * p.do_st.n + col, ok);
    }
    for (int r = tid; r < BM; r += NT) {
      const int pos = r0 + r < tile.y ? perm[r0 + r] : -1;
      qpos_s[buf * BM + r] = pos;
      qseg_s[buf * BM + r] = (segment != nullptr && pos >= 0) ? segment[pos] : 0;
      lse_s[buf * BM + r] = pos >= 0 ? lse[pos] * kLog2e : 0.f;
      delta_s[buf * BM + r] = pos >= 0 ? delta[pos] : 0.f;
    }
  };

  // This thread's two key rows (g and g + 8 of the warp's 16).
  int key_j[2], key_seg[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    key_j[i] = j0 + warp * 16 + g + 8 * i;
    key_seg[i] = (segment != nullptr && key_j[i] < N) ? segment[key_j[i]] : 0;
  }

  for (int view = 0; view < 2; ++view) {  // text queries, then vision queries
    const int s_begin = (view == 0 ? 0 : tiles_text) * SUBS;
    const int s_end = (view == 0 ? tiles_text : tiles_text + tiles_vision) * SUBS;
    float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
    for (int nd = 0; nd < D / 8; ++nd)
#pragma unroll
      for (int e = 0; e < 4; ++e) dk_acc[nd][e] = dv_acc[nd][e] = 0.f;

    int s = next_step(s_begin - 1, s_end);
    if (s < s_end) {
      // Key row j of this view: k/v when its modality is the view's, else kx/vx.
      for (int c = tid; c < BN * CPR; c += NT) {
        const int r = c / CPR, col = (c % CPR) * 8;
        const int j = j0 + r;
        const bool ok = j < N;
        const int jj = ok ? j : 0;
        const bool same = (is_vision[jj] != 0) == (view != 0);
        const T* ksrc = same ? k + jj * p.k_st.n : kx + jj * p.kx_st.n;
        const T* vsrc = same ? v + jj * p.v_st.n : vx + jj * p.vx_st.n;
        cp_async_16(k_s + r * LD + col, ksrc + col, ok);
        cp_async_16(v_s + r * LD + col, vsrc + col, ok);
      }
      load_query_step(s, 0);
      cp_async_commit();
    }

    for (int buf = 0; s < s_end; buf ^= 1) {
      const int s_next = next_step(s, s_end);
      if (s_next < s_end) {
        load_query_step(s_next, buf ^ 1);  // prefetch while this step computes
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const T* qt = q_s + buf * BM * LD;
      const T* dot = do_s + buf * BM * LD;
      const float* lse_t = lse_s + buf * BM;
      const float* delta_t = delta_s + buf * BM;
      const int* qpos_t = qpos_s + buf * BM;
      const int* qseg_t = qseg_s + buf * BM;

      // The mask is needed when the step has padding rows, when a key lies past the step's
      // first query, or (with segments) when keys and queries are not all of one segment.
      bool need_mask;
      {
        const int4 tile = tiles[s / SUBS];
        const int r0 = tile.x + (s % SUBS) * BM;
        need_mask = r0 + BM > tile.y || j0 + BN - 1 > perm[r0];
        if (!need_mask && segment != nullptr) {
          const int ts = tile_segment[s / SUBS];
          need_mask = ts < 0 || ts != key_block_seg;
        }
      }

      // S^T = K Q^T and dP^T = V dO^T: rows are this warp's 16 keys, columns the BM queries.
      float st[BM / 8][4], dpt[BM / 8][4];
#pragma unroll
      for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
        for (int e = 0; e < 4; ++e) st[nb][e] = dpt[nb][e] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t ak[4], av[4];
        ldmatrix_x4(ak, a_frag_ptr(k_s, LD, warp * 16, kk * 16, lane));
        ldmatrix_x4(av, a_frag_ptr(v_s, LD, warp * 16, kk * 16, lane));
#pragma unroll
        for (int nb2 = 0; nb2 < BM / 16; ++nb2) {
          uint32_t bq[4], bo[4];
          ldmatrix_x4(bq, b_frag_ptr_nk(qt, LD, nb2 * 16, kk * 16, lane));
          ldmatrix_x4(bo, b_frag_ptr_nk(dot, LD, nb2 * 16, kk * 16, lane));
          Ops::mma(st[2 * nb2], ak, bq[0], bq[1]);
          Ops::mma(st[2 * nb2 + 1], ak, bq[2], bq[3]);
          Ops::mma(dpt[2 * nb2], av, bo[0], bo[1]);
          Ops::mma(dpt[2 * nb2 + 1], av, bo[2], bo[3]);
        }
      }

      // P^T = exp(S^T * scale - lse) where visible, dS^T = P^T * (dP^T - delta).
      if (need_mask) {
#pragma unroll
        for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int i = e >> 1;
            const int c = nb * 8 + 2 * t4 + (e & 1);
            const bool ok = key_j[i] <= qpos_t[c] && (segment == nullptr || key_seg[i] == qseg_t[c]);
            const float pr = ok ? exp2f(fmaf(st[nb][e], sl2, -lse_t[c])) : 0.f;
            dpt[nb][e] = pr * (dpt[nb][e] - delta_t[c]);
            st[nb][e] = pr;
          }
      } else {
#pragma unroll
        for (int nb = 0; nb < BM / 8; ++nb)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int c = nb * 8 + 2 * t4 + (e & 1);
            const float pr = exp2f(fmaf(st[nb][e], sl2, -lse_t[c]));
            dpt[nb][e] = pr * (dpt[nb][e] - delta_t[c]);
            st[nb][e] = pr;
          }
      }

      // dV += P^T dO and dK += dS^T Q: A operands straight from registers, k runs over queries.
#pragma unroll
      for (int kc = 0; kc < BM / 16; ++kc) {
        uint32_t ap[4], ads[4];
        ap[0] = Ops::pack(st[2 * kc][0], st[2 * kc][1]);
        ap[1] = Ops::pack(st[2 * kc][2], st[2 * kc][3]);
        ap[2] = Ops::pack(st[2 * kc + 1][0], st[2 * kc + 1][1]);
        ap[3] = Ops::pack(st[2 * kc + 1][2], st[2 * kc + 1][3]);
        ads[0] = Ops::pack(dpt[2 * kc][0], dpt[2 * kc][1]);
        ads[1] = Ops::pack(dpt[2 * kc][2], dpt[2 * kc][3]);
        ads[2] = Ops::pack(dpt[2 * kc + 1][0], dpt[2 * kc + 1][1]);
        ads[3] = Ops::pack(dpt[2 * kc + 1][2], dpt[2 * kc + 1][3]);
        // dS^T rows go to shared memory as well, for dQ.
        *reinterpret_cast<uint32_t*>(ds_s + (warp * 16 + g) * LDP + kc * 16 + 2 * t4) = ads[0];
        *reinterpret_cast<uint32_t*>(ds_s + (warp * 16 + g + 8) * LDP + kc * 16 + 2 * t4) = ads[1];
        *reinterpret_cast<uint32_t*>(ds_s + (warp * 16 + g) * LDP + kc * 16 + 8 + 2 * t4) = ads[2];
        *reinterpret_cast<uint32_t*>(ds_s + (warp * 16 + g + 8) * LDP + kc * 16 + 8 + 2 * t4) = ads[3];
#pragma unroll
        for (int nd2 = 0; nd2 < D / 16; ++nd2) {
          uint32_t bo[4], bq[4];
          ldmatrix_x4_trans(bo, b_frag_ptr_kn(dot, LD, kc * 16, nd2 * 16, lane));
          ldmatrix_x4_trans(bq, b_frag_ptr_kn(qt, LD, kc * 16, nd2 * 16, lane));
          Ops::mma(dv_acc[2 * nd2], ap, bo[0], bo[1]);
          Ops::mma(dv_acc[2 * nd2 + 1], ap, bo[2], bo[3]);
          Ops::mma(dk_acc[2 * nd2], ads, bq[0], bq[1]);
          Ops::mma(dk_acc[2 * nd2 + 1], ads, bq[2], bq[3]);
        }
      }
      __syncthreads();  // dS^T complete

      // dQ = dS K for the step's queries, added to their original rows.
      for (int task = warp; task < DQ_TASKS; task += NW) {
        const int rb = task % (BM / 16), ch = task / (BM / 16);
        float dq[DQ_N / 8][4];
#pragma unroll
        for (int nd = 0; nd < DQ_N / 8; ++nd)
#pragma unroll
          for (int e = 0; e < 4; ++e) dq[nd][e] = 0.f;
#pragma unroll
        for (int kc = 0; kc < BN / 16; ++kc) {
          uint32_t a[4];
          ldmatrix_x4_trans(a, a_frag_ptr_t(ds_s, LDP, rb * 16, kc * 16, lane));
#pragma unroll
          for (int nd2 = 0; nd2 < DQ_N / 16; ++nd2) {
            uint32_t bk[4];
            ldmatrix_x4_trans(bk, b_frag_ptr_kn(k_s, LD, kc * 16, ch * DQ_N + nd2 * 16, lane));
            Ops::mma(dq[2 * nd2], a, bk[0], bk[1]);
            Ops::mma(dq[2 * nd2 + 1], a, bk[2], bk[3]);
          }
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          const int pos = qpos_t[rb * 16 + g + 8 * i];
          if (pos < 0) continue;
          float* dst = dq_accum + (int64_t)pos * D + ch * DQ_N + 2 * t4;
#pragma unroll
          for (int nd = 0; nd < DQ_N / 8; ++nd) {
            atomicAdd(dst + nd * 8, dq[nd][2 * i] * p.scale);
            atomicAdd(dst + nd * 8 + 1, dq[nd][2 * i + 1] * p.scale);
          }
        }
      }
      __syncthreads();  // this buffer, ds_s and the row data are refilled next
      s = s_next;
    }

    // Write this view's dK, dV: to dk/dv for keys of the view's modality, else to dkx/dvx.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int j = key_j[i];
      if (j >= N) continue;
      const bool same = (is_vision[j] != 0) == (view != 0);
      T* dk_row = static_cast<T*>(same ? p.dk : p.dkx) + (bh * N + j) * D + 2 * t4;
      T* dv_row = static_cast<T*>(same ? p.dv : p.dvx) + (bh * N + j) * D + 2 * t4;
#pragma unroll
      for (int nd = 0; nd < D / 8; ++nd) {
        *reinterpret_cast<uint32_t*>(dk_row + nd * 8) =
            Ops::pack(dk_acc[nd][2 * i] * p.scale, dk_acc[nd][2 * i + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(dv_row + nd * 8) = Ops::pack(dv_acc[nd][2 * i], dv_acc[nd][2 * i + 1]);
      }
    }
    // k_s and v_s are refilled by the next view only after the last step's closing barrier
    // (and when this view had no step, nothing read them).
  }
}

template <typename T, int D, int V>
cudaError_t launch_bwd(const BridgedAttnParams& p, cudaStream_t stream) {
  using Config = KernelConfig<D, V>;
  constexpr int BM = Config::kBwdBlockM, BN = Config::kBwdBlockN, NW = BN / 16;

  const int64_t rows = int64_t(p.B) * p.H * p.N;
  const int64_t delta_blocks = (rows + 7) / 8;
  auto delta_kernel = bridged_attn_bwd_delta_kernel<T, D>;
  LIBRA_LAUNCH(delta_kernel, dim3(unsigned(delta_blocks)), 256, 0, stream)(p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;

  const size_t smem = bwd_smem_bytes(D, BM, BN);
  auto kernel = bridged_attn_bwd_kernel<T, D, BM, BN, NW>;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid((p.N + BN - 1) / BN, p.H, p.B);
  LIBRA_LAUNCH(kernel, grid, NW * 32, smem, stream)(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_bwd(const BridgedAttnParams& p, int head_dim, int variant, cudaStream_t stream) {
#define LIBRA_LAUNCH_IF(D_, V_) \
  if (head_dim == D_ && variant == V_) return launch_bwd<T, D_, V_>(p, stream);
  LIBRA_FOR_EACH_CONFIG(LIBRA_LAUNCH_IF)
#undef LIBRA_LAUNCH_IF
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t bridged_attn_bwd(const BridgedAttnParams& p, DType dtype, int head_dim, int variant, cudaStream_t stream) {
  if (p.B == 0 || p.H == 0 || p.N == 0) return cudaSuccess;
  return dtype == DType::kBFloat16 ? dispatch_bwd<__nv_bfloat16>(p, head_dim, variant, stream)
                                   : dispatch_bwd<__half>(p, head_dim, variant, stream);
}

}  // namespace libra
