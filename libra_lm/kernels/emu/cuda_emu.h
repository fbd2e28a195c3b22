// The CUDA subset the bridged-attention kernels use, for the host compiler: the kernels' own
// sources (csrc/*.cu) compile against this header as C++ and run on the CPU, one fiber per CUDA
// thread (emu_runtime.cpp). csrc/bridged_attn_common.cuh includes it when LIBRA_EMULATION is
// defined; nothing else in the kernels changes.
//
// What is emulated and checked (see the "Emulator" section of libra_lm/kernels/README.md):
// - threads, blocks, grids; __syncthreads as a block barrier (every thread of the block, at the
//   same call site); warp collectives (mma.sync, ldmatrix, shuffles) with all 32 lanes at the
//   same call site, each lane contributing its registers as the PTX fragment layouts say;
// - cp.async: the copy lands at the issuing thread's wait_group that retires it (the latest
//   legal point), and its destination counts as being written from issue to that wait;
// - shared memory: every access is checked against a shadow that flags a conflicting access
//   by another thread not separated by a barrier, a read of bytes never written, an access out
//   of the block's dynamic allocation or misaligned;
// - global memory: the kernel TUs are compiled with the compiler's address-sanitizer
//   instrumentation (-fsanitize=kernel-address, outlined checks) and emu_runtime.cpp is its
//   runtime: every load and store is checked against the buffers the harness allocated
//   (redzones), for alignment, and for conflicting writes by other threads of the same launch;
// - launches: block size, the dynamic shared memory against the kernel's attribute and the
//   emulated device's opt-in limit, errors returned through cudaGetLastError.
#pragma once

#include <cuda_runtime.h>

#include <cmath>  // fmaxf, exp2f, fmaf, logf: built into nvcc, from the C library here
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>

#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

namespace libra_emu {

// The running CUDA thread's coordinates (set by the scheduler before it resumes a fiber).
struct ThreadCoords {
  uint3 thread_idx;
  uint3 block_idx;
  dim3 block_dim;
  dim3 grid_dim;
};
extern ThreadCoords* current_coords;

// The running block's dynamic shared memory.
unsigned char* dynamic_smem();

// Each of these takes its call site from its return address: distinct call sites in the
// kernels stay distinct (the wrappers below are always inlined), which is how a barrier or a
// collective reached from two places in one warp or block is told apart.
void syncthreads();
uint32_t shfl_xor(uint32_t value, int lane_mask, unsigned member_mask);
float atomic_add(float* address, float value);

// Warp-level matrix operations with the operand layouts of the PTX ISA (see
// csrc/bridged_attn_common.cuh for the fragment tables).
void mma_m16n8k16_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
void mma_m16n8k16_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row, bool trans);
void cp_async(void* smem_dst, const void* gmem_src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int pending_groups);

// Launch: runs every block of the grid to completion (blocks one after another, the threads
// of a block as fibers) and returns the launch error.
using KernelBody = std::function<void()>;
cudaError_t launch(const void* kernel, dim3 grid, dim3 block, size_t dynamic_smem, const KernelBody& body);

template <typename... Args>
struct Launcher {
  void (*kernel)(Args...);
  dim3 grid, block;
  size_t smem;
  template <typename... Actual>
  void operator()(Actual&&... actual) const {
    auto k = kernel;
    // Every fiber calls the kernel with its own copy of the arguments, as CUDA passes them.
    const std::function<void()> body = [k, actual...]() { k(actual...); };
    launch(reinterpret_cast<const void*>(kernel), grid, block, smem, body);
  }
};

template <typename... Args>
Launcher<Args...> make_launcher(void (*kernel)(Args...), dim3 grid, dim3 block, size_t smem) {
  return Launcher<Args...>{kernel, grid, block, smem};
}

}  // namespace libra_emu

// The built-in variables and intrinsics the kernels use.
#define threadIdx (::libra_emu::current_coords->thread_idx)
#define blockIdx (::libra_emu::current_coords->block_idx)
#define blockDim (::libra_emu::current_coords->block_dim)
#define gridDim (::libra_emu::current_coords->grid_dim)
#define __syncthreads() ::libra_emu::syncthreads()

__attribute__((always_inline)) inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  bits = ::libra_emu::shfl_xor(bits, lane_mask, mask);
  std::memcpy(&value, &bits, 4);
  return value;
}

__attribute__((always_inline)) inline float atomicAdd(float* address, float value) {
  return ::libra_emu::atomic_add(address, value);
}

// cuda_runtime.h declares this overload for nvcc only.
template <typename... Args>
inline cudaError_t cudaFuncSetAttribute(void (*kernel)(Args...), cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), attr, value);
}

// The two spellings the kernels need from the shared header (bridged_attn_common.cuh defines
// them for nvcc).
#define LIBRA_LAUNCH(kernel, grid, block, smem, stream) ::libra_emu::make_launcher(kernel, grid, block, smem)
#define LIBRA_DYNAMIC_SMEM(name) unsigned char* const name = ::libra_emu::dynamic_smem()
