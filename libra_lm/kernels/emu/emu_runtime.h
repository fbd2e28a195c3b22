// What the harness (harness.cpp) uses of the emulator runtime besides cuda_emu.h: the emulated
// device, buffers in "global memory" with bounds and write tracking, and the reports.
#pragma once

#include <cstddef>
#include <map>
#include <string>
#include <vector>

#include "cuda_emu.h"

namespace libra_emu {

struct DeviceModel {
  int smem_optin = 227 * 1024;  // cudaDevAttrMaxSharedMemoryPerBlockOptin (sm_90: 227 KiB)
  int cc_major = 9, cc_minor = 0;
};
void set_device(const DeviceModel& model);
const DeviceModel& get_device();

// A buffer in emulated global memory, 256-byte aligned, with redzones on both sides; accesses
// by the kernels outside [p, p + bytes) are reported. Writes to a buffer that is not writable
// are reported; writable ones have a shadow that detects unordered writes and reads.
void* device_alloc(size_t bytes, const char* name, bool writable);
// Bytes of a writable buffer that no kernel wrote since the buffer was made or reset.
long unwritten_bytes(const void* buffer);
void reset_written(const void* buffer);

// Every launch that ran, in order.
struct LaunchRecord {
  dim3 grid;
  long threads;
  size_t smem_bytes;
};
const std::vector<LaunchRecord>& launch_log();

// kind: a short category ("shared-race", "global-out-of-bounds", ...); one message is kept per
// kind and call site, every occurrence is counted.
void report(const char* kind, const void* site, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
const std::map<std::string, long>& report_counts();
const std::vector<std::string>& report_messages();

}  // namespace libra_emu
