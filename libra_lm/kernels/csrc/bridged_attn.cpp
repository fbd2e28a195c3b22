// Python bindings of the bridged-attention kernels. The torch.library custom ops, autograd and
// the query-partition plan live in Python (libra_lm/kernels/ops.py, partition.py); these
// functions check their inputs, fill the outputs they are given and launch on the current
// stream.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

#include "bridged_attn.h"

namespace {

libra::RowStrides row_strides(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// A (B, H, N, D) tensor the kernels can read 16 bytes at a time.
void check_rows(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device(), ", got ",
              t.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must be ", like.scalar_type(), ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == like.sizes(), name, " must have shape ", like.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.stride(3) == 1, name, " must have a contiguous last dimension (call .contiguous())");
  bool aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int d = 0; d < 3; ++d) aligned = aligned && (t.size(d) == 1 || t.stride(d) % 8 == 0);
  TORCH_CHECK(aligned, name, " must be 16-byte aligned with strides that are multiples of 8 (call .contiguous())");
}

void check_contiguous(const at::Tensor& t, const char* name, at::ScalarType dtype, at::IntArrayRef shape,
                      const at::Device& device) {
  TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
}

libra::DType kernel_dtype(const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "bridged attention kernels take bfloat16 or float16, got ", q.scalar_type());
  return q.scalar_type() == at::kBFloat16 ? libra::DType::kBFloat16 : libra::DType::kFloat16;
}

// Shared inputs of the forward and backward: checks them and fills the params. The plan
// (libra_lm/kernels/partition.py) is built once per batch and shared by both.
libra::BridgedAttnParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                     const at::Tensor& kx, const at::Tensor& vx, const at::Tensor& is_vision,
                                     const at::Tensor& perm, const at::Tensor& tiles, const at::Tensor& n_text,
                                     const std::optional<at::Tensor>& segment,
                                     const std::optional<at::Tensor>& tile_segment,
                                     const std::optional<at::Tensor>& key_segment, int64_t variant) {
  TORCH_CHECK(q.dim() == 4, "q must be (B, H, N, D), got ", q.sizes());
  check_rows(q, "q", q);
  check_rows(k, "k", q);
  check_rows(v, "v", q);
  check_rows(kx, "k_x", q);
  check_rows(vx, "v_x", q);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  int64_t config[8];
  TORCH_CHECK(libra::bridged_attn_config(int(D), int(variant), config), "no kernel configuration for head dim ", D,
              " and variant ", variant);
  TORCH_CHECK(N < (int64_t(1) << 30), "sequence length ", N, " is too long for 32-bit positions");
  const auto dev = q.device();
  check_contiguous(is_vision, "is_vision", at::kBool, {B, N}, dev);
  if (segment.has_value()) check_contiguous(*segment, "segment", at::kInt, {B, N}, dev);
  check_contiguous(perm, "perm", at::kInt, {B, N}, dev);
  TORCH_CHECK(tiles.dim() == 3 && tiles.size(0) == B && tiles.size(2) == 4, "tiles must be (B, T, 4), got ",
              tiles.sizes());
  check_contiguous(tiles, "tiles", at::kInt, tiles.sizes(), dev);
  check_contiguous(n_text, "n_text", at::kInt, {B}, dev);
  TORCH_CHECK(segment.has_value() == tile_segment.has_value() && segment.has_value() == key_segment.has_value(),
              "segment, tile_segment and key_segment come together");
  if (segment.has_value()) {
    check_contiguous(*tile_segment, "tile_segment", at::kInt, {B, tiles.size(1)}, dev);
    check_contiguous(*key_segment, "key_segment", at::kInt, {B, (N + libra::kKeyGroup - 1) / libra::kKeyGroup}, dev);
  }

  libra::BridgedAttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.kx = kx.data_ptr();
  p.vx = vx.data_ptr();
  p.q_st = row_strides(q);
  p.k_st = row_strides(k);
  p.v_st = row_strides(v);
  p.kx_st = row_strides(kx);
  p.vx_st = row_strides(vx);
  p.is_vision = reinterpret_cast<const uint8_t*>(is_vision.data_ptr<bool>());
  p.segment = segment.has_value() ? segment->data_ptr<int32_t>() : nullptr;
  p.perm = perm.data_ptr<int32_t>();
  p.tiles = tiles.data_ptr<int32_t>();
  p.n_text = n_text.data_ptr<int32_t>();
  p.tile_segment = tile_segment.has_value() ? tile_segment->data_ptr<int32_t>() : nullptr;
  p.key_segment = key_segment.has_value() ? key_segment->data_ptr<int32_t>() : nullptr;
  p.B = int(B);
  p.H = int(H);
  p.N = int(N);
  p.T = int(tiles.size(1));
  p.scale = float(1.0 / std::sqrt(double(D)));
  p.scale_log2 = float(1.4426950408889634 / std::sqrt(double(D)));
  return p;
}

void forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kx,
             const at::Tensor& vx, const at::Tensor& is_vision, const at::Tensor& perm, const at::Tensor& tiles,
             const at::Tensor& n_text, const std::optional<at::Tensor>& segment,
             const std::optional<at::Tensor>& tile_segment, const std::optional<at::Tensor>& key_segment,
             int64_t variant, const at::Tensor& out, const at::Tensor& lse) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  auto p = make_params(q, k, v, kx, vx, is_vision, perm, tiles, n_text, segment, tile_segment, key_segment, variant);
  check_rows(out, "out", q);
  check_contiguous(lse, "lse", at::kFloat, {q.size(0), q.size(1), q.size(2)}, q.device());
  p.out = out.data_ptr();
  p.o_st = row_strides(out);
  p.lse = lse.data_ptr<float>();
  const cudaError_t err = libra::bridged_attn_fwd(p, kernel_dtype(q), int(q.size(3)), int(variant),
                                                  c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "bridged attention forward failed to launch: ", cudaGetErrorString(err));
}

void backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& kx, const at::Tensor& vx, const at::Tensor& is_vision, const at::Tensor& perm,
              const at::Tensor& tiles, const at::Tensor& n_text, const std::optional<at::Tensor>& segment,
              const std::optional<at::Tensor>& tile_segment, const std::optional<at::Tensor>& key_segment,
              int64_t variant, const at::Tensor& out, const at::Tensor& lse,
              const std::optional<at::Tensor>& grad_lse, const at::Tensor& dq, const at::Tensor& dk,
              const at::Tensor& dv, const at::Tensor& dkx, const at::Tensor& dvx) {
  TORCH_CHECK(q.is_cuda(), "q must be a CUDA tensor, got ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  auto p = make_params(q, k, v, kx, vx, is_vision, perm, tiles, n_text, segment, tile_segment, key_segment, variant);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  check_rows(dout, "grad_out", q);
  check_rows(out, "out", q);
  check_contiguous(lse, "lse", at::kFloat, {B, H, N}, q.device());
  if (grad_lse.has_value()) check_contiguous(*grad_lse, "grad_lse", at::kFloat, {B, H, N}, q.device());
  for (auto* t : {&dq, &dk, &dv, &dkx, &dvx}) {
    check_contiguous(*t, "gradient buffer", q.scalar_type(), q.sizes(), q.device());
  }
  auto delta = at::empty({B, H, N}, q.options().dtype(at::kFloat));
  auto dq_accum = at::zeros({B, H, N, D}, q.options().dtype(at::kFloat));
  p.out = out.data_ptr();
  p.o_st = row_strides(out);
  p.lse = lse.data_ptr<float>();
  p.dout = dout.data_ptr();
  p.do_st = row_strides(dout);
  p.grad_lse = grad_lse.has_value() ? grad_lse->data_ptr<float>() : nullptr;
  p.delta = delta.data_ptr<float>();
  p.dq_accum = dq_accum.data_ptr<float>();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.dkx = dkx.data_ptr();
  p.dvx = dvx.data_ptr();
  const cudaError_t err =
      libra::bridged_attn_bwd(p, kernel_dtype(q), int(D), int(variant), c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "bridged attention backward failed to launch: ", cudaGetErrorString(err));
  dq.copy_(dq_accum);
}

// The compiled configuration (head_dim, variant), as bridged_attn_config fills it; empty when
// there is none. libra_lm/kernels/tiles.py checks its own table against this.
std::vector<int64_t> config(int64_t head_dim, int64_t variant) {
  int64_t values[8];
  if (!libra::bridged_attn_config(int(head_dim), int(variant), values)) return {};
  return std::vector<int64_t>(values, values + 8);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused bridged attention (Libra's cross-modal bridge) without the N x N matrix";
  m.def("forward", &forward, "fill out (B,H,N,D) and lse (B,H,N) fp32");
  m.def("backward", &backward, "fill dq, dk, dv, dk_x, dv_x");
  m.def("config", &config,
        "(fwd block_m, fwd block_n, fwd warps, bwd block_m, bwd block_n, bwd warps, fwd smem, bwd smem) of a "
        "(head_dim, variant), empty when not compiled");
}
