// Warp-level building blocks shared by the forward and backward kernels (sm_80+).
//
// Fragment layouts are those of the PTX ISA for mma.m16n8k16 with 16-bit inputs, where
// g = lane / 4 and t = lane % 4:
//   A (16x16, row-major) a0: (g, 2t..2t+1)  a1: (g+8, 2t..)  a2: (g, 2t+8..)  a3: (g+8, 2t+8..)
//   B (16x8, "col")      b0: (k=2t..2t+1, n=g)  b1: (k=2t+8.., n=g)
//   C (16x8, fp32)       c0,c1: (g, 2t..2t+1)   c2,c3: (g+8, 2t..2t+1)
// Two C tiles side by side (columns 0-7 and 8-15) hold exactly the A fragment of a 16x16
// operand, which is how the probabilities P (and dS) go from one product to the next without
// leaving registers.
//
// The same sources also compile for the CPU: with LIBRA_EMULATION defined (the emulator of
// libra_lm/kernels/emu, used by the tests) each inline-assembly helper below calls the
// emulated instruction instead, and the two spellings that are not C++ (a kernel launch, the
// block's dynamic shared memory) go through the macros LIBRA_LAUNCH and LIBRA_DYNAMIC_SMEM.
#pragma once

#ifdef LIBRA_EMULATION
#include "cuda_emu.h"
#else
#define LIBRA_LAUNCH(kernel, grid, block, smem, stream) kernel<<<grid, block, smem, stream>>>
#define LIBRA_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#endif

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace libra {

template <typename T>
struct MmaOps;

template <>
struct MmaOps<__nv_bfloat16> {
  // c += a * b on the tensor cores, fp32 accumulation.
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef LIBRA_EMULATION
    libra_emu::mma_m16n8k16_bf16(c, a, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
  // Two floats to one register: `lo` in the low 16 bits (the lower column index).
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
};

template <>
struct MmaOps<__half> {
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#ifdef LIBRA_EMULATION
    libra_emu::mma_m16n8k16_f16(c, a, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
};

#ifndef LIBRA_EMULATION
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// Four 8x8 b16 matrices; lane l gives the address of row (l % 8) of matrix (l / 8) and
// receives, in register i, row (l / 4), columns 2(l % 4)..+1 of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
#ifdef LIBRA_EMULATION
  libra_emu::ldmatrix_x4(r, p, false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
#endif
}

// Same, transposed: register i holds rows 2(l % 4)..+1, column (l / 4) of matrix i.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
#ifdef LIBRA_EMULATION
  libra_emu::ldmatrix_x4(r, p, true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
#endif
}

// 16-byte global -> shared copy that bypasses registers; when `pred` is false nothing is read
// and the destination is zero-filled (padding rows must be zeros, never stale data: a masked
// probability of 0 times a NaN left in shared memory would still be NaN).
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool pred) {
  const int src_bytes = pred ? 16 : 0;
#ifdef LIBRA_EMULATION
  libra_emu::cp_async(smem, gmem, 16, src_bytes);
#else
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef LIBRA_EMULATION
  libra_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef LIBRA_EMULATION
  libra_emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Row-major tile addressing for the ldmatrix patterns used by both kernels. `ld` is the row
// stride in elements of the shared-memory tile.
//
// A operand (16 rows x 16 k) from a row-major [row][k] tile at (row0, k0).
template <typename T>
__device__ __forceinline__ const T* a_frag_ptr(const T* tile, int ld, int row0, int k0, int lane) {
  return tile + (row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + k0 + (lane >> 4) * 8;
}
// Two B operands (n0..n0+15 x 16 k) from a tile stored [n][k] (for example K when computing
// Q K^T): registers {0,1} feed columns n0..n0+7, {2,3} columns n0+8..n0+15.
template <typename T>
__device__ __forceinline__ const T* b_frag_ptr_nk(const T* tile, int ld, int n0, int k0, int lane) {
  return tile + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8;
}
// Two B operands from a tile stored [k][n] (for example V when computing P V); load with
// ldmatrix_x4_trans. Same register order as b_frag_ptr_nk.
template <typename T>
__device__ __forceinline__ const T* b_frag_ptr_kn(const T* tile, int ld, int k0, int n0, int lane) {
  return tile + (k0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + n0 + (lane >> 4) * 8;
}
// A operand (16 rows x 16 k) from a tile stored transposed, [k][row]; load with
// ldmatrix_x4_trans.
template <typename T>
__device__ __forceinline__ const T* a_frag_ptr_t(const T* tile, int ld, int row0, int k0, int lane) {
  return tile + (k0 + (lane & 7) + (lane >> 4) * 8) * ld + row0 + ((lane >> 3) & 1) * 8;
}

}  // namespace libra
