// The warp primitives of csrc/bridged_attn_common.cuh on known inputs, for
// tests/test_kernels_emulator.py to check against the PTX ISA's fragment tables: one warp loads
// four 8x8 matrices with ldmatrix .x4 and .x4.trans and runs one mma.m16n8k16 (bf16) on
// operands given per lane. Compiled and checked like the kernels.
#include "bridged_attn_common.cuh"

namespace {

__global__ void primitives_kernel(const uint16_t* mats, const uint32_t* a_in, const uint32_t* b_in,
                                  const float* c_in, uint32_t* ld, uint32_t* ldt, float* d_out) {
  LIBRA_DYNAMIC_SMEM(smem_raw);
  uint16_t* m = reinterpret_cast<uint16_t*>(smem_raw);  // [4][8][8], row-major
  const int lane = threadIdx.x;
  for (int i = lane; i < 256; i += 32) m[i] = mats[i];
  __syncthreads();
  uint32_t r[4];
  const uint16_t* row = m + (lane / 8) * 64 + (lane % 8) * 8;  // row lane % 8 of matrix lane / 8
  libra::ldmatrix_x4(r, row);
  for (int i = 0; i < 4; ++i) ld[lane * 4 + i] = r[i];
  libra::ldmatrix_x4_trans(r, row);
  for (int i = 0; i < 4; ++i) ldt[lane * 4 + i] = r[i];
  const uint32_t a[4] = {a_in[lane * 4], a_in[lane * 4 + 1], a_in[lane * 4 + 2], a_in[lane * 4 + 3]};
  float c[4] = {c_in[lane * 4], c_in[lane * 4 + 1], c_in[lane * 4 + 2], c_in[lane * 4 + 3]};
  libra::MmaOps<__nv_bfloat16>::mma(c, a, b_in[lane * 2], b_in[lane * 2 + 1]);
  for (int i = 0; i < 4; ++i) d_out[lane * 4 + i] = c[i];
}

}  // namespace

cudaError_t libra_emu_selftest(const uint16_t* mats, const uint32_t* a, const uint32_t* b, const float* c,
                               uint32_t* ld, uint32_t* ldt, float* d) {
  auto kernel = primitives_kernel;
  LIBRA_LAUNCH(kernel, dim3(1), 32, 512, nullptr)(mats, a, b, c, ld, ldt, d);
  return cudaGetLastError();
}
