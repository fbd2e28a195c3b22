// The emulator's command-line driver: runs the kernels' host entry points (csrc/bridged_attn_fwd.cu
// `bridged_attn_fwd`, csrc/bridged_attn_bwd.cu `bridged_attn_bwd`) on arrays read from a folder,
// with the buffers and parameters that csrc/bridged_attn.cpp gives them, and writes the results
// and the emulator's reports back. libra_lm/kernels/emulator.py writes the folder and reads it.
//
//   harness DIR        DIR/meta.txt: "key value" lines (dtype bf16|fp16, head_dim, variant, B, H,
//                      N, T, mode fwd|bwd|fwdbwd, segment 0|1, smem_optin)
//
// Inputs DIR/<name>.bin, raw little-endian, contiguous: q k v kx vx (B,H,N,D), is_vision (B,N)
// u8, the plan: perm (B,N) i32, tiles (B,T,4) i32, n_text (B) i32, and with segment 1 segment
// (B,N), tile_segment (B,T), key_segment (B,ceil(N/32)) i32; for the backward dout (B,H,N,D),
// optionally grad_lse (B,H,N) f32, and with mode bwd out (B,H,N,D), lse (B,H,N) f32.
// Outputs: out, lse (forward); dq, dk, dv, dkx, dvx (backward); DIR/report.txt with launch
// errors, the emulator's counts and messages, the bytes of each output never written, and
// every launch (grid, block, dynamic shared memory).
//
// With "mode selftest" it runs selftest.cpp instead: inputs mats (4x8x8 u16), a (32x4 u32),
// b (32x2 u32), c (32x4 f32); outputs ld, ldt (32x4 u32) and d (32x4 f32).
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "bridged_attn.h"
#include "emu_runtime.h"

cudaError_t libra_emu_selftest(const uint16_t* mats, const uint32_t* a, const uint32_t* b, const float* c,
                               uint32_t* ld, uint32_t* ldt, float* d);

namespace {

std::string dir;
std::map<std::string, std::string> meta;

[[noreturn]] void fail(const std::string& message) {
  std::fprintf(stderr, "harness: %s\n", message.c_str());
  std::exit(2);
}

long meta_int(const std::string& key, long fallback = -1) {
  auto it = meta.find(key);
  if (it == meta.end()) {
    if (fallback < 0) fail("meta.txt has no " + key);
    return fallback;
  }
  return std::stol(it->second);
}

// A global buffer filled from DIR/name.bin (which must hold exactly `bytes`).
void* load(const std::string& name, size_t bytes) {
  void* p = libra_emu::device_alloc(bytes, name.c_str(), false);
  std::ifstream f(dir + "/" + name + ".bin", std::ios::binary);
  if (!f) fail("cannot read " + dir + "/" + name + ".bin");
  f.read(static_cast<char*>(p), std::streamsize(bytes));
  if (size_t(f.gcount()) != bytes || f.peek() != EOF) fail(name + ".bin must hold " + std::to_string(bytes) + " bytes");
  return p;
}

bool exists(const std::string& name) { return std::ifstream(dir + "/" + name + ".bin").good(); }

// An output buffer, poisoned (0xFF bytes are NaN in every float type used) so that an element
// the kernels never write shows.
void* output(const std::string& name, size_t bytes) {
  void* p = libra_emu::device_alloc(bytes, name.c_str(), true);
  std::memset(p, 0xFF, bytes);
  return p;
}

void save(const std::string& name, const void* p, size_t bytes) {
  std::ofstream f(dir + "/" + name + ".bin", std::ios::binary);
  f.write(static_cast<const char*>(p), std::streamsize(bytes));
  if (!f) fail("cannot write " + dir + "/" + name + ".bin");
}

uint16_t to_half_bits(float x, bool bf16) {
  if (bf16) {
    __nv_bfloat16 h = __float2bfloat16_rn(x);
    uint16_t bits;
    std::memcpy(&bits, &h, 2);
    return bits;
  }
  __half h = __float2half_rn(x);
  uint16_t bits;
  std::memcpy(&bits, &h, 2);
  return bits;
}

void write_report(const std::vector<std::string>& errors,
                  const std::vector<std::pair<std::string, const void*>>& written, bool outputs_are_inputs) {
  std::ofstream r(dir + "/report.txt");
  for (const auto& e : errors) r << "error " << e << "\n";
  for (const auto& [kind, n] : libra_emu::report_counts()) r << "count " << kind << " " << n << "\n";
  for (const auto& [name, ptr] : written) {
    if (outputs_are_inputs && (name == "out" || name == "lse")) continue;
    r << "unwritten " << name << " " << libra_emu::unwritten_bytes(ptr) << "\n";
  }
  for (const auto& l : libra_emu::launch_log()) {
    r << "launch " << l.grid.x << " " << l.grid.y << " " << l.grid.z << " " << l.threads << " " << l.smem_bytes
      << "\n";
  }
  for (const auto& m : libra_emu::report_messages()) r << "message " << m << "\n";
}

int selftest() {
  const auto* mats = static_cast<const uint16_t*>(load("mats", 256 * 2));
  const auto* a = static_cast<const uint32_t*>(load("a", 128 * 4));
  const auto* b = static_cast<const uint32_t*>(load("b", 64 * 4));
  const auto* c = static_cast<const float*>(load("c", 128 * 4));
  auto* ld = static_cast<uint32_t*>(output("ld", 128 * 4));
  auto* ldt = static_cast<uint32_t*>(output("ldt", 128 * 4));
  auto* d = static_cast<float*>(output("d", 128 * 4));
  std::vector<std::string> errors;
  const cudaError_t err = libra_emu_selftest(mats, a, b, c, ld, ldt, d);
  if (err != cudaSuccess) errors.push_back(std::string("selftest: ") + cudaGetErrorString(err));
  save("ld", ld, 128 * 4);
  save("ldt", ldt, 128 * 4);
  save("d", d, 128 * 4);
  write_report(errors, {{"ld", ld}, {"ldt", ldt}, {"d", d}}, false);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) fail("usage: harness DIR");
  dir = argv[1];
  {
    std::ifstream f(dir + "/meta.txt");
    if (!f) fail("cannot read " + dir + "/meta.txt");
    std::string key, value;
    while (f >> key >> value) meta[key] = value;
  }
  const std::string mode = meta.count("mode") ? meta["mode"] : "fwdbwd";
  if (mode == "selftest") return selftest();
  const std::string dtype_name = meta.count("dtype") ? meta["dtype"] : "";
  if (dtype_name != "bf16" && dtype_name != "fp16") fail("dtype must be bf16 or fp16");
  const bool bf16 = dtype_name == "bf16";
  const bool run_fwd = mode == "fwd" || mode == "fwdbwd";
  const bool run_bwd = mode == "bwd" || mode == "fwdbwd";
  if (!run_fwd && !run_bwd) fail("mode must be fwd, bwd or fwdbwd");
  const int variant = int(meta_int("variant", 0));
  const int D = int(meta_int("head_dim")), B = int(meta_int("B")), H = int(meta_int("H")), N = int(meta_int("N")),
            T = int(meta_int("T"));
  libra_emu::DeviceModel device;
  device.smem_optin = int(meta_int("smem_optin", device.smem_optin));
  libra_emu::set_device(device);

  const size_t rows = size_t(B) * H * N, elems = rows * D;
  const size_t tensor_bytes = elems * 2;
  const int64_t sb = int64_t(H) * N * D, sh = int64_t(N) * D, sn = D;
  const libra::RowStrides st{sb, sh, sn};

  libra::BridgedAttnParams p{};
  p.q = load("q", tensor_bytes);
  p.k = load("k", tensor_bytes);
  p.v = load("v", tensor_bytes);
  p.kx = load("kx", tensor_bytes);
  p.vx = load("vx", tensor_bytes);
  p.q_st = p.k_st = p.v_st = p.kx_st = p.vx_st = st;
  p.is_vision = static_cast<const uint8_t*>(load("is_vision", size_t(B) * N));
  if (meta_int("segment", 0)) {
    p.segment = static_cast<const int32_t*>(load("segment", size_t(B) * N * 4));
    p.tile_segment = static_cast<const int32_t*>(load("tile_segment", size_t(B) * T * 4));
    p.key_segment = static_cast<const int32_t*>(
        load("key_segment", size_t(B) * ((N + libra::kKeyGroup - 1) / libra::kKeyGroup) * 4));
  }
  p.perm = static_cast<const int32_t*>(load("perm", size_t(B) * N * 4));
  p.tiles = static_cast<const int32_t*>(load("tiles", size_t(B) * T * 16));
  p.n_text = static_cast<const int32_t*>(load("n_text", size_t(B) * 4));
  p.B = B;
  p.H = H;
  p.N = N;
  p.T = T;
  p.scale = float(1.0 / std::sqrt(double(D)));
  p.scale_log2 = float(1.4426950408889634 / std::sqrt(double(D)));
  const libra::DType dtype = bf16 ? libra::DType::kBFloat16 : libra::DType::kFloat16;

  std::vector<std::string> errors;
  if (run_fwd) {
    p.out = output("out", tensor_bytes);
    p.lse = static_cast<float*>(output("lse", rows * 4));
    p.o_st = st;
    const cudaError_t err = libra::bridged_attn_fwd(p, dtype, D, variant, nullptr);
    if (err != cudaSuccess) errors.push_back(std::string("forward: ") + cudaGetErrorString(err));
    save("out", p.out, tensor_bytes);
    save("lse", p.lse, rows * 4);
  } else {
    p.out = load("out", tensor_bytes);
    p.lse = static_cast<float*>(load("lse", rows * 4));
    p.o_st = st;
  }
  std::vector<std::pair<std::string, const void*>> written = {{"out", p.out}, {"lse", p.lse}};
  if (run_bwd && errors.empty()) {
    p.dout = load("dout", tensor_bytes);
    p.do_st = st;
    p.grad_lse = exists("grad_lse") ? static_cast<const float*>(load("grad_lse", rows * 4)) : nullptr;
    p.delta = static_cast<float*>(output("delta", rows * 4));
    p.dq_accum = static_cast<float*>(libra_emu::device_alloc(elems * 4, "dq_accum", true));
    std::memset(p.dq_accum, 0, elems * 4);  // at::zeros in bridged_attn.cpp
    p.dk = output("dk", tensor_bytes);
    p.dv = output("dv", tensor_bytes);
    p.dkx = output("dkx", tensor_bytes);
    p.dvx = output("dvx", tensor_bytes);
    const cudaError_t err = libra::bridged_attn_bwd(p, dtype, D, variant, nullptr);
    if (err != cudaSuccess) errors.push_back(std::string("backward: ") + cudaGetErrorString(err));
    std::vector<uint16_t> dq(elems);
    for (size_t i = 0; i < elems; ++i) dq[i] = to_half_bits(p.dq_accum[i], bf16);
    save("dq", dq.data(), tensor_bytes);
    for (auto [name, ptr] : {std::pair<const char*, void*>{"dk", p.dk}, {"dv", p.dv}, {"dkx", p.dkx}, {"dvx", p.dvx}}) {
      save(name, ptr, tensor_bytes);
      written.emplace_back(name, ptr);
    }
    written.emplace_back("delta", p.delta);
  }

  write_report(errors, written, mode == "bwd");  // with mode bwd, out and lse are inputs
  return 0;
}
