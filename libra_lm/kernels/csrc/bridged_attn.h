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

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

namespace libra {

// Tile configurations: one table, read by the launch code below and mirrored in Python by
// libra_lm/kernels/tiles.py (a test compares the two). Variant 0 of a head dim is the fast one;
// a later variant needs less shared memory per block, for GPUs whose opt-in limit is 99 KiB
// (sm_86, sm_89, sm_120). The partition plan's query tiles are kPlanBlockM queries, the forward's
// block; the backward walks each plan tile in steps of kBwdBlockM queries.
constexpr int kPlanBlockM = 128;
constexpr int kKeyGroup = 32;  // keys per entry of BridgedAttnParams::key_segment

template <int D, int Variant>
struct KernelConfig;

template <>
struct KernelConfig<64, 0> {
  static constexpr int kFwdBlockN = 64;   // keys per forward step
  static constexpr int kFwdWarps = 4;     // 32 query rows per warp: two 16-row MMA tiles
  static constexpr int kBwdBlockM = 64;   // queries per backward step (double buffered)
  static constexpr int kBwdBlockN = 128;  // keys per backward block, 16 per warp
};

template <>
struct KernelConfig<128, 0> {
  static constexpr int kFwdBlockN = 64;
  static constexpr int kFwdWarps = 4;
  static constexpr int kBwdBlockM = 64;
  static constexpr int kBwdBlockN = 128;
};

template <>
struct KernelConfig<128, 1> {  // forward 68 KiB, backward 74 KiB of shared memory
  static constexpr int kFwdBlockN = 32;
  static constexpr int kFwdWarps = 4;
  static constexpr int kBwdBlockM = 32;
  static constexpr int kBwdBlockN = 64;
};

// Every compiled configuration, X(head_dim, variant): the launch code dispatches over this list.
#define LIBRA_FOR_EACH_CONFIG(X) X(64, 0) X(128, 0) X(128, 1)

// Dynamic shared memory of the kernels, in bytes, for 16-bit inputs: rows padded by 8 elements.
constexpr size_t fwd_smem_bytes(int d, int block_n) { return size_t(kPlanBlockM + 4 * block_n) * (d + 8) * 2; }
constexpr size_t bwd_smem_bytes(int d, int block_m, int block_n) {
  return size_t(2 * block_n + 4 * block_m) * (d + 8) * 2 + size_t(block_n) * (block_m + 8) * 2 +
         size_t(2 * block_m) * 16;
}

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
  const int32_t* perm;          // (B, N) query positions sorted by modality
  const int32_t* tiles;         // (B, T, 4): q_start, q_end (into perm), key_lo, key_hi
  const int32_t* n_text;        // (B,)
  const int32_t* tile_segment;  // (B, T) the segment all of a tile's queries share, else -1 (with segment)
  const int32_t* key_segment;   // (B, ceil(N / kKeyGroup)) the segment a key group shares, else -1
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

// Each returns the launch's error code (cudaSuccess when the kernels were queued);
// cudaErrorInvalidValue for a head dim or variant without a configuration.
cudaError_t bridged_attn_fwd(const BridgedAttnParams& p, DType dtype, int head_dim, int variant, cudaStream_t stream);
cudaError_t bridged_attn_bwd(const BridgedAttnParams& p, DType dtype, int head_dim, int variant, cudaStream_t stream);

// {fwd block_m, fwd block_n, fwd warps, bwd block_m, bwd block_n, bwd warps, fwd smem bytes,
// bwd smem bytes} of a configuration; false when (head_dim, variant) has none.
bool bridged_attn_config(int head_dim, int variant, int64_t out[8]);

}  // namespace libra
