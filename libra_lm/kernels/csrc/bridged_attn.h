// Bridged attention (Libra's cross-modal bridge) without the N x N matrix: host interface.
//
// Contract (libra_lm/attention.py `bridged_attention`): q, k, v, kx, vx are (B, H, N, D). For query i and key
// j <= i (original positions; and, when segment ids are given, seg[i] == seg[j]) the key and
// value are k[j], v[j] when is_vision[i] == is_vision[j], else kx[j], vx[j]; one softmax over
// all keys with scale 1/sqrt(D).
//
// Query partition (docs/attention.md): queries are sorted by
// modality (text first, then vision, ascending position inside each), cut into tiles of one
// modality, and each tile attends over the single key/value view its modality needs. The work
// is that of one causal attention. The plan (perm, tiles, n_text, segment labels) is computed
// by the caller (libra_lm/kernels/partition.py) and is shared with the PyTorch reference.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace libra {

// Tile shapes. The Python side reads them through `block_sizes(head_dim)` so the plan it
// builds matches the kernels; libra_lm/kernels/reference.py mirrors the same table.
template <int D>
struct FwdTile {
  static constexpr int kBlockM = 128;  // queries per tile (16 per warp)
  static constexpr int kBlockN = 64;   // keys per step
  static constexpr int kWarps = kBlockM / 16;
};

template <int D>
struct BwdTile {
  static constexpr int kBlockM = 64;   // queries per step (double buffered)
  static constexpr int kBlockN = 128;  // keys per block (16 per warp)
  static constexpr int kWarps = kBlockN / 16;
};

// Element strides of a (B, H, N, D) tensor whose last dimension is contiguous.
struct RowStrides {
  int64_t b, h, n;
};

struct BridgedAttnParams {
  // Inputs, bf16 or fp16.
  const void* q;
  const void* k;
  const void* v;
  const void* kx;
  const void* vx;
  RowStrides q_st, k_st, v_st, kx_st, vx_st;
  const uint8_t* is_vision;  // (B, N) bool
  const int32_t* segment;    // (B, N) first position of each token's segment, or nullptr

  // Plan.
  const int32_t* perm;    // (B, N) query positions sorted by modality
  const int32_t* tiles;   // (B, T, 4): q_start, q_end (into perm), key_lo, key_hi
  const int32_t* n_text;  // (B,)
  int B, H, N, T;
  float scale;       // 1/sqrt(D)
  float scale_log2;  // scale * log2(e): the softmax runs in base 2

  // Forward outputs; backward reads them.
  void* out;  // (B, H, N, D)
  RowStrides o_st;
  float* lse;  // (B, H, N) contiguous, natural log

  // Backward.
  const void* dout;  // (B, H, N, D)
  RowStrides do_st;
  const float* grad_lse;  // (B, H, N) contiguous or nullptr
  float* delta;           // (B, H, N) contiguous workspace: rowsum(dout * out) - grad_lse
  float* dq_accum;        // (B, H, N, D) fp32 contiguous, zero-initialised
  void* dk;               // (B, H, N, D) contiguous; every row written by the kernel
  void* dv;
  void* dkx;
  void* dvx;
};

enum class DType { kBFloat16, kFloat16 };

// Each returns the launch's error code (cudaSuccess when the kernels were queued).
cudaError_t bridged_attn_fwd(const BridgedAttnParams& p, DType dtype, int head_dim, cudaStream_t stream);
cudaError_t bridged_attn_bwd(const BridgedAttnParams& p, DType dtype, int head_dim, cudaStream_t stream);

// {fwd block_m, fwd block_n, bwd block_m, bwd block_n}; false when the head dim is unsupported.
bool bridged_attn_block_sizes(int head_dim, int sizes[4]);

}  // namespace libra
