// Runtime of the CUDA emulator (cuda_emu.h): fibers and their scheduler, block barriers, warp
// collectives with the PTX fragment layouts, cp.async, the shadow of shared memory, the global
// buffers' bounds and write shadow, the checks called by the address-sanitizer instrumentation
// of the kernel sources, and the few CUDA runtime calls the launch code makes.
//
// This file is compiled without instrumentation; the kernel translation units are compiled with
// -fsanitize=kernel-address and outlined checks, which turn every load and store they make into
// a call of the __asan_* functions at the end of this file.
#include "emu_runtime.h"

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cinttypes>
#include <cstdarg>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <set>
#include <string>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace libra_emu {

ThreadCoords* current_coords = nullptr;

// ----------------------------------------------------------------------------- reports

namespace {

struct Reports {
  std::map<std::string, long> counts;
  std::vector<std::string> messages;
  std::set<std::string> seen;  // one message per (kind, call site)
};
Reports reports;
constexpr size_t kMaxMessages = 64;

}  // namespace

void report(const char* kind, const void* site, const char* fmt, ...) {
  reports.counts[kind] += 1;
  char key[96];
  std::snprintf(key, sizeof key, "%s@%p", kind, site);
  if (!reports.seen.insert(key).second || reports.messages.size() >= kMaxMessages) return;
  char body[512];
  va_list args;
  va_start(args, fmt);
  std::vsnprintf(body, sizeof body, fmt, args);
  va_end(args);
  char line[700];
  std::snprintf(line, sizeof line, "%s at 0x%" PRIxPTR ": %s", kind, reinterpret_cast<uintptr_t>(site), body);
  reports.messages.push_back(line);
}

const std::map<std::string, long>& report_counts() { return reports.counts; }
const std::vector<std::string>& report_messages() { return reports.messages; }

// ----------------------------------------------------------------------------- device model

namespace {

DeviceModel device;
cudaError_t last_error = cudaSuccess;
std::map<const void*, int> max_dynamic_smem;  // cudaFuncAttributeMaxDynamicSharedMemorySize
constexpr int kDefaultDynamicSmem = 48 * 1024;
uint32_t launch_counter = 0;
std::vector<LaunchRecord> launches;
uint32_t epoch_counter = 0;  // grows across blocks and launches: stale shadow entries are older

}  // namespace

void set_device(const DeviceModel& model) { device = model; }
const std::vector<LaunchRecord>& launch_log() { return launches; }
const DeviceModel& get_device() { return device; }

// ----------------------------------------------------------------------------- global buffers

namespace {

constexpr size_t kRedzone = 256;

struct GlobalShadow {
  uint32_t launch = 0;  // 0: never written
  uint32_t block = 0;
  uint32_t epoch = 0;
  int16_t tid = -1;
  uint8_t atomic = 0;
};

struct Buffer {
  uintptr_t base;
  size_t size;
  std::string name;
  bool writable;
  unsigned char* raw;
  std::vector<GlobalShadow> shadow;  // writable buffers only
};

std::vector<Buffer> buffers;  // sorted by base
uintptr_t global_lo = UINTPTR_MAX, global_hi = 0;

Buffer* find_buffer(uintptr_t a) {
  // The buffer whose redzone-extended range holds a.
  auto it = std::upper_bound(buffers.begin(), buffers.end(), a,
                             [](uintptr_t x, const Buffer& b) { return x < b.base - kRedzone; });
  if (it == buffers.begin()) return nullptr;
  --it;
  return a < it->base + it->size + kRedzone ? &*it : nullptr;
}

}  // namespace

void* device_alloc(size_t bytes, const char* name, bool writable) {
  void* raw = nullptr;
  if (posix_memalign(&raw, 256, bytes + 2 * kRedzone) != 0) {
    std::fprintf(stderr, "emulator: out of memory allocating %zu bytes for %s\n", bytes, name);
    std::exit(3);
  }
  auto* r = static_cast<unsigned char*>(raw);
  std::memset(r, 0xA5, bytes + 2 * kRedzone);
  Buffer buf{reinterpret_cast<uintptr_t>(r + kRedzone), bytes, name, writable, r, {}};
  if (writable) buf.shadow.resize(bytes);
  auto pos = std::upper_bound(buffers.begin(), buffers.end(), buf.base,
                              [](uintptr_t x, const Buffer& b) { return x < b.base; });
  buffers.insert(pos, std::move(buf));
  global_lo = std::min(global_lo, reinterpret_cast<uintptr_t>(r));
  global_hi = std::max(global_hi, reinterpret_cast<uintptr_t>(r) + bytes + 2 * kRedzone);
  return r + kRedzone;
}

long unwritten_bytes(const void* buffer) {
  Buffer* b = find_buffer(reinterpret_cast<uintptr_t>(buffer));
  if (b == nullptr || !b->writable) return -1;
  long n = 0;
  for (const auto& s : b->shadow) n += s.launch == 0;
  return n;
}

void reset_written(const void* buffer) {
  Buffer* b = find_buffer(reinterpret_cast<uintptr_t>(buffer));
  if (b != nullptr && b->writable) std::fill(b->shadow.begin(), b->shadow.end(), GlobalShadow{});
}

// ----------------------------------------------------------------------------- fibers

extern "C" void libra_emu_switch(void** save_sp, void* next_sp);

#if defined(__x86_64__)
// Saves the callee-saved registers, MXCSR and the x87 control word on the current stack,
// stores the stack pointer in *save_sp, and resumes the context saved at next_sp.
asm(R"(
    .text
    .globl libra_emu_switch
    .type libra_emu_switch, @function
libra_emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size libra_emu_switch, .-libra_emu_switch
    .section .note.GNU-stack,"",@progbits
    .text
)");
#endif

namespace {

enum class State { kReady, kWaitWarp, kWaitBlock, kDone };

struct Copy {
  unsigned char* dst;
  const unsigned char* src;
  int bytes, src_bytes;
};

constexpr size_t kStackBytes = 128 * 1024;

struct Fiber {
  void* sp = nullptr;
  unsigned char* stack = nullptr;  // mmap'ed, with a guard page below
#if !defined(__x86_64__)
  ucontext_t ctx;
#endif
  ThreadCoords coords;
  int tid = 0;
  State state = State::kReady;
  uint64_t wait_gen = 0;
  std::vector<Copy> uncommitted;
  std::deque<std::vector<Copy>> groups;
};

enum class Op : int { kNone, kMmaBf16, kMmaF16, kLdsm, kLdsmTrans, kShfl };
const char* op_name(Op op) {
  switch (op) {
    case Op::kMmaBf16: return "mma.sync bf16";
    case Op::kMmaF16: return "mma.sync f16";
    case Op::kLdsm: return "ldmatrix";
    case Op::kLdsmTrans: return "ldmatrix.trans";
    case Op::kShfl: return "shfl.sync";
    default: return "?";
  }
}

struct Payload {
  uint32_t w[6];
};

struct Warp {
  uint64_t gen = 0;
  int arrived = 0;
  Op op = Op::kNone;
  const void* site = nullptr;
  Payload stage[2][32];
};

struct SharedShadow {
  uint32_t w_epoch = 0;  // epoch of the last write (0 or older than the block: never written here)
  uint32_t r_epoch = 0;
  int16_t writer = -1;
  int16_t reader = -1;   // -2: several threads
  int16_t pending = -1;  // thread with a cp.async to this byte in flight
};

struct Block {
  std::vector<Fiber> fibers;
  std::vector<Warp> warps;
  int threads = 0;
  int done = 0;
  int arrived = 0;
  const void* barrier_site = nullptr;
  uint64_t barrier_gen = 0;
  uint32_t first_epoch = 0, epoch = 0;
  uint32_t block_linear = 0;
  unsigned char* smem = nullptr;  // the dynamic allocation
  size_t smem_bytes = 0;
};

constexpr size_t kSmemRedzone = 1024;
constexpr size_t kSmemMax = 256 * 1024;

unsigned char* smem_arena = nullptr;  // kSmemRedzone + kSmemMax + kSmemRedzone
std::vector<SharedShadow> smem_shadow;
std::vector<unsigned char*> stacks;
void* scheduler_sp = nullptr;
#if !defined(__x86_64__)
ucontext_t scheduler_ctx;
#endif
Block* block = nullptr;
Fiber* current = nullptr;
const std::function<void()>* kernel_body = nullptr;

uintptr_t smem_lo = 0, smem_hi = 0;  // redzone-extended range of the running block's allocation

unsigned char* get_stack(size_t i) {
  while (stacks.size() <= i) {
    const size_t page = size_t(sysconf(_SC_PAGESIZE));
    void* m = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) {
      std::fprintf(stderr, "emulator: cannot map a fiber stack\n");
      std::exit(3);
    }
    mprotect(m, page, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
    stacks.push_back(static_cast<unsigned char*>(m) + page);
  }
  return stacks[i];
}

void yield_to_scheduler() {
#if defined(__x86_64__)
  libra_emu_switch(&current->sp, scheduler_sp);
#else
  swapcontext(&current->ctx, &scheduler_ctx);
#endif
}

void check_pending_copies(Fiber& f);

[[noreturn]] void fiber_main() {
  (*kernel_body)();
  Fiber* f = current;
  check_pending_copies(*f);
  f->state = State::kDone;
  block->done += 1;
  yield_to_scheduler();
  std::abort();  // a finished fiber is never resumed
}

#if !defined(__x86_64__)
void fiber_entry_ucontext() { fiber_main(); }
#endif

void start_fiber(Fiber& f, unsigned char* stack) {
  f.stack = stack;
#if defined(__x86_64__)
  // The frame libra_emu_switch pops: MXCSR and x87 control word, r15..rbp, then the return
  // address fiber_main, entered with the stack aligned as after a call.
  uintptr_t top = (reinterpret_cast<uintptr_t>(stack) + kStackBytes) & ~uintptr_t(15);
  auto* sp = reinterpret_cast<uint64_t*>(top - 72);
  uint32_t csr[2] = {0x1F80u, 0x037Fu};
  std::memcpy(sp, csr, 8);
  for (int i = 1; i <= 6; ++i) sp[i] = 0;
  sp[7] = reinterpret_cast<uint64_t>(&fiber_main);
  sp[8] = 0;
  f.sp = sp;
#else
  getcontext(&f.ctx);
  f.ctx.uc_stack.ss_sp = stack;
  f.ctx.uc_stack.ss_size = kStackBytes;
  f.ctx.uc_link = nullptr;
  makecontext(&f.ctx, fiber_entry_ucontext, 0);
#endif
}

void resume(Fiber& f) {
  current = &f;
  current_coords = &f.coords;
#if defined(__x86_64__)
  libra_emu_switch(&scheduler_sp, f.sp);
#else
  swapcontext(&scheduler_ctx, &f.ctx);
#endif
  current = nullptr;
  current_coords = nullptr;
}

bool runnable(const Fiber& f) {
  switch (f.state) {
    case State::kReady: return true;
    case State::kWaitWarp: return block->warps[f.tid / 32].gen > f.wait_gen;
    case State::kWaitBlock: return block->barrier_gen > f.wait_gen;
    default: return false;
  }
}

// ----------------------------------------------------------------------------- shared memory

void shared_access(uintptr_t a, size_t n, bool write, const void* site) {
  Block& b = *block;
  const uintptr_t base = reinterpret_cast<uintptr_t>(b.smem);
  const int tid = current->tid;
  if (a < base || a + n > base + b.smem_bytes) {
    report("shared-out-of-bounds", site,
           "thread %d of block %u %s %zu bytes at offset %" PRIdPTR " of a %zu-byte dynamic allocation", tid,
           b.block_linear, write ? "writes" : "reads", n, intptr_t(a - base), b.smem_bytes);
    return;
  }
  if (n > 1 && (a % std::min<size_t>(n, 16)) != 0) {
    report("misaligned-shared", site, "thread %d %s %zu bytes at offset %zu", tid, write ? "writes" : "reads", n,
           size_t(a - base));
  }
  const uint32_t e = b.epoch;
  SharedShadow* sh = &smem_shadow[kSmemRedzone + (a - base)];
  for (size_t i = 0; i < n; ++i) {
    SharedShadow& s = sh[i];
    const bool written_now = s.w_epoch == e && s.writer != tid;
    if (s.pending >= 0) {
      if (s.pending == tid)
        report("cp-async-hazard", site, "thread %d %s shared offset %zu before the wait_group of its own cp.async",
               tid, write ? "writes" : "reads", size_t(a - base + i));
      else
        report("shared-race", site, "thread %d %s shared offset %zu while thread %d's cp.async to it is in flight",
               tid, write ? "writes" : "reads", size_t(a - base + i), s.pending);
    } else if (write) {
      if (written_now)
        report("shared-race", site, "write-write: threads %d and %d write shared offset %zu between two barriers",
               s.writer, tid, size_t(a - base + i));
      else if (s.r_epoch == e && s.reader != tid && s.reader != -1)
        report("shared-race", site, "read-write: thread %d writes shared offset %zu that %s read since the last barrier",
               tid, size_t(a - base + i),
               s.reader == -2 ? "several threads" : ("thread " + std::to_string(s.reader)).c_str());
    } else {
      if (written_now)
        report("shared-race", site,
               "write-read: thread %d reads shared offset %zu that thread %d wrote since the last barrier", tid,
               size_t(a - base + i), s.writer);
      else if (s.w_epoch < b.first_epoch)
        report("shared-uninitialized", site, "thread %d reads shared offset %zu, never written in this block", tid,
               size_t(a - base + i));
    }
    if (write) {
      s.w_epoch = e;
      s.writer = int16_t(tid);
    } else if (s.r_epoch == e && s.reader != tid) {
      s.reader = -2;
    } else {
      s.r_epoch = e;
      s.reader = int16_t(tid);
    }
  }
}

// ----------------------------------------------------------------------------- global memory

void global_access(uintptr_t a, size_t n, bool write, bool atomic, const void* site) {
  Buffer* buf = find_buffer(a);
  if (buf == nullptr) buf = find_buffer(a + n - 1);
  if (buf == nullptr) return;  // not a buffer of the harness (a stack or the emulator's own data)
  const Block& b = *block;
  const int tid = current->tid;
  if (a < buf->base || a + n > buf->base + buf->size) {
    report("global-out-of-bounds", site, "thread %d of block %u %s %zu bytes at offset %" PRIdPTR " of %s (%zu bytes)",
           tid, b.block_linear, write ? "writes" : "reads", n, intptr_t(a - buf->base), buf->name.c_str(), buf->size);
    return;
  }
  if (n > 1 && (a % std::min<size_t>(n, 16)) != 0) {
    report("misaligned-global", site, "thread %d %s %zu bytes at offset %zu of %s", tid, write ? "writes" : "reads",
           n, size_t(a - buf->base), buf->name.c_str());
  }
  if (write && !buf->writable) {
    report("write-to-input", site, "thread %d writes %s, an input", tid, buf->name.c_str());
    return;
  }
  if (!buf->writable) return;
  GlobalShadow* sh = &buf->shadow[a - buf->base];
  for (size_t i = 0; i < n; ++i) {
    GlobalShadow& s = sh[i];
    if (s.launch == launch_counter && !(s.block == b.block_linear && s.tid == tid)) {
      const bool unordered = s.block != b.block_linear || s.epoch == b.epoch;
      const bool both_atomic = atomic && s.atomic;
      if (unordered && !both_atomic) {
        report("global-race", site,
               "%s: thread %d of block %u and thread %d of block %u access byte %zu of %s in one launch, unordered",
               write ? (atomic ? "atomic after access" : "write after write") : "read after write", s.tid, s.block,
               tid, b.block_linear, size_t(a - buf->base + i), buf->name.c_str());
      }
    }
    if (write) {
      s.launch = launch_counter;
      s.block = b.block_linear;
      s.epoch = b.epoch;
      s.tid = int16_t(tid);
      s.atomic = atomic;
    }
  }
}

inline void on_access(uintptr_t a, size_t n, bool write, const void* site) {
  if (current == nullptr) return;  // host code of the kernel translation units
  if (a + n > smem_lo && a < smem_hi) {
    shared_access(a, n, write, site);
  } else if (a + n > global_lo && a < global_hi) {
    global_access(a, n, write, false, site);
  }
}

// ----------------------------------------------------------------------------- collectives

// Arrive at a warp collective with this lane's operands; returns the 32 lanes' operands once
// every lane has arrived (the fiber waits until then).
const Payload* warp_collective(Op op, const Payload& mine, const void* site) {
  Warp& w = block->warps[current->tid / 32];
  const int lane = current->tid % 32;
  const uint64_t g = w.gen;
  if (w.arrived == 0) {
    w.op = op;
    w.site = site;
  } else if (w.op != op || w.site != site) {
    report("warp-divergence", site, "lane %d of warp %d reaches %s while other lanes wait at %s (0x%" PRIxPTR ")", lane,
           current->tid / 32, op_name(op), op_name(w.op), reinterpret_cast<uintptr_t>(w.site));
  }
  w.stage[g & 1][lane] = mine;
  if (++w.arrived == 32) {
    w.arrived = 0;
    w.gen += 1;
  } else {
    current->state = State::kWaitWarp;
    current->wait_gen = g;
    yield_to_scheduler();
    current->state = State::kReady;
  }
  return w.stage[g & 1];
}

inline uint16_t half_of(uint32_t reg, int hi) { return uint16_t(hi ? reg >> 16 : reg & 0xffffu); }

float bf16_to_float(uint16_t x) {
  uint32_t bits = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

float f16_to_float(uint16_t x) {
  __half_raw raw;
  raw.x = x;
  return __half2float(__half(raw));
}

// D = A B + C for m16n8k16 with this lane's C/D fragment; A, B gathered from the lanes that
// hold them (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type").
void mma(Op op, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1, const void* site) {
  Payload mine{{a[0], a[1], a[2], a[3], b0, b1}};
  const Payload* all = warp_collective(op, mine, site);
  float (*cvt)(uint16_t) = op == Op::kMmaBf16 ? bf16_to_float : f16_to_float;
  const int lane = current->tid % 32;
  const int g = lane >> 2, t = lane & 3;
  for (int i = 0; i < 4; ++i) {
    const int r = g + 8 * (i >> 1);
    const int n = 2 * t + (i & 1);
    float acc = c[i];
    for (int k = 0; k < 16; ++k) {
      // A row r, column k: lane (r % 8) * 4 + (k % 8) / 2, register (r >= 8) + 2 (k >= 8).
      const uint32_t areg = all[(r % 8) * 4 + (k % 8) / 2].w[(r >= 8) + 2 * (k >= 8)];
      // B row k, column n: lane n * 4 + (k % 8) / 2, register 4 + (k >= 8) of the payload.
      const uint32_t breg = all[n * 4 + (k % 8) / 2].w[4 + (k >= 8)];
      acc = std::fma(cvt(half_of(areg, k & 1)), cvt(half_of(breg, k & 1)), acc);
    }
    c[i] = acc;
  }
}

void check_pending_copies(Fiber& f) {
  if (!f.uncommitted.empty() || !f.groups.empty()) {
    report("cp-async-unwaited", nullptr, "thread %d of block %u exits with %zu cp.async groups never waited for",
           f.tid, block->block_linear, f.groups.size() + (f.uncommitted.empty() ? 0 : 1));
  }
}

void run_block(dim3 grid, dim3 block_dim, uint3 block_idx, size_t smem_bytes) {
  Block b;
  b.threads = int(block_dim.x * block_dim.y * block_dim.z);
  b.block_linear = block_idx.x + grid.x * (block_idx.y + grid.y * block_idx.z);
  b.first_epoch = b.epoch = ++epoch_counter;
  b.smem = smem_arena + kSmemRedzone;
  b.smem_bytes = smem_bytes;
  b.warps.resize((b.threads + 31) / 32);
  // Stale contents are NaN in bf16 and fp16 (0xFFFF): a read of bytes never written shows.
  std::memset(b.smem, 0xFF, smem_bytes);
  smem_lo = reinterpret_cast<uintptr_t>(smem_arena);
  smem_hi = reinterpret_cast<uintptr_t>(b.smem + smem_bytes + kSmemRedzone);
  std::fill(smem_shadow.begin() + kSmemRedzone, smem_shadow.begin() + kSmemRedzone + smem_bytes, SharedShadow{});
  b.fibers.resize(b.threads);
  block = &b;
  for (int i = 0; i < b.threads; ++i) {
    Fiber& f = b.fibers[i];
    f.tid = i;
    f.coords.thread_idx = uint3{unsigned(i) % block_dim.x, (unsigned(i) / block_dim.x) % block_dim.y,
                                unsigned(i) / (block_dim.x * block_dim.y)};
    f.coords.block_idx = block_idx;
    f.coords.block_dim = block_dim;
    f.coords.grid_dim = grid;
    start_fiber(f, get_stack(i));
  }
  while (b.done < b.threads) {
    bool progress = false;
    for (auto& f : b.fibers) {
      if (runnable(f)) {
        resume(f);
        progress = true;
      }
    }
    if (!progress) {
      int at_barrier = 0, at_warp = 0;
      for (auto& f : b.fibers) {
        at_barrier += f.state == State::kWaitBlock;
        at_warp += f.state == State::kWaitWarp;
      }
      report("deadlock", b.barrier_site,
             "block %u: %d threads wait at a barrier, %d at warp collectives, %d finished", b.block_linear,
             at_barrier, at_warp, b.done);
      break;
    }
  }
  block = nullptr;
  smem_lo = smem_hi = 0;
}

}  // namespace

// ----------------------------------------------------------------------------- API of cuda_emu.h

unsigned char* dynamic_smem() { return block->smem; }

void syncthreads() {
  const void* site = __builtin_return_address(0);
  Block& b = *block;
  if (b.done > 0) {
    report("barrier-after-exit", site, "block %u: a barrier is reached after %d threads exited", b.block_linear,
           b.done);
  }
  if (b.arrived == 0) {
    b.barrier_site = site;
  } else if (b.barrier_site != site) {
    report("barrier-divergence", site, "thread %d waits at a different __syncthreads than other threads (0x%" PRIxPTR ")",
           current->tid, reinterpret_cast<uintptr_t>(b.barrier_site));
  }
  const uint64_t g = b.barrier_gen;
  if (++b.arrived == b.threads - b.done) {
    b.arrived = 0;
    b.barrier_gen += 1;
    b.epoch = ++epoch_counter;
  } else {
    current->state = State::kWaitBlock;
    current->wait_gen = g;
    yield_to_scheduler();
    current->state = State::kReady;
  }
}

uint32_t shfl_xor(uint32_t value, int lane_mask, unsigned member_mask) {
  const void* site = __builtin_return_address(0);
  if (member_mask != 0xffffffffu) report("partial-warp", site, "shfl.sync with member mask 0x%x", member_mask);
  Payload mine{{value, 0, 0, 0, 0, 0}};
  const Payload* all = warp_collective(Op::kShfl, mine, site);
  const int src = (current->tid % 32) ^ lane_mask;
  return src < 32 ? all[src].w[0] : value;
}

float atomic_add(float* address, float value) {
  const void* site = __builtin_return_address(0);
  const auto a = reinterpret_cast<uintptr_t>(address);
  if (a + 4 > smem_lo && a < smem_hi) {
    shared_access(a, 4, true, site);
  } else {
    global_access(a, 4, true, true, site);
  }
  const float old = *address;
  *address = old + value;
  return old;
}

void mma_m16n8k16_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma(Op::kMmaBf16, c, a, b0, b1, __builtin_return_address(0));
}

void mma_m16n8k16_f16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  mma(Op::kMmaF16, c, a, b0, b1, __builtin_return_address(0));
}

// ldmatrix .m8n8.x4 .b16: lane l gives the address of row l % 8 of matrix l / 8 and reads those
// 16 bytes; register i of lane l receives, of matrix i, row l / 4 columns 2 (l % 4) .. +1, or
// with .trans column l / 4 rows 2 (l % 4) .. +1 (PTX ISA, "ldmatrix").
void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row, bool trans) {
  const void* site = __builtin_return_address(0);
  const auto a = reinterpret_cast<uintptr_t>(smem_row);
  Payload mine{};
  if (a < smem_lo || a + 16 > smem_hi) {
    report("ldmatrix-not-shared", site, "thread %d gives ldmatrix an address outside the block's shared memory",
           current->tid);
  } else {
    if (a % 16 != 0) report("misaligned-shared", site, "ldmatrix row address of thread %d is not 16-byte aligned",
                            current->tid);
    shared_access(a, 16, false, site);
    std::memcpy(mine.w, smem_row, 16);
  }
  const Payload* all = warp_collective(trans ? Op::kLdsmTrans : Op::kLdsm, mine, site);
  const int lane = current->tid % 32;
  auto elem = [&](int matrix, int row, int col) -> uint32_t {
    const uint32_t word = all[8 * matrix + row].w[col / 2];
    return half_of(word, col & 1);
  };
  for (int i = 0; i < 4; ++i) {
    if (!trans) {
      r[i] = elem(i, lane / 4, 2 * (lane % 4)) | (elem(i, lane / 4, 2 * (lane % 4) + 1) << 16);
    } else {
      r[i] = elem(i, 2 * (lane % 4), lane / 4) | (elem(i, 2 * (lane % 4) + 1, lane / 4) << 16);
    }
  }
}

void cp_async(void* smem_dst, const void* gmem_src, int bytes, int src_bytes) {
  const void* site = __builtin_return_address(0);
  const auto d = reinterpret_cast<uintptr_t>(smem_dst);
  const auto s = reinterpret_cast<uintptr_t>(gmem_src);
  if (d < smem_lo || d + bytes > smem_hi) {
    report("cp-async-not-shared", site, "thread %d: cp.async destination outside the block's shared memory",
           current->tid);
    return;
  }
  if (d % bytes != 0 || s % bytes != 0)
    report("misaligned-cp-async", site, "thread %d: cp.async of %d bytes needs %d-byte aligned addresses",
           current->tid, bytes, bytes);
  // Issue: the destination is being written from now until the wait that retires the group.
  shared_access(d, size_t(bytes), true, site);
  const auto base = reinterpret_cast<uintptr_t>(block->smem);
  if (d >= base && d + bytes <= base + block->smem_bytes) {
    for (int i = 0; i < bytes; ++i) smem_shadow[kSmemRedzone + (d - base) + i].pending = int16_t(current->tid);
  }
  if (src_bytes > 0 && s + src_bytes > global_lo && s < global_hi) global_access(s, size_t(src_bytes), false, false, site);
  current->uncommitted.push_back(
      Copy{static_cast<unsigned char*>(smem_dst), static_cast<const unsigned char*>(gmem_src), bytes, src_bytes});
}

void cp_async_commit() {
  current->groups.push_back(std::move(current->uncommitted));
  current->uncommitted.clear();
}

void cp_async_wait(int pending_groups) {
  const void* site = __builtin_return_address(0);
  Fiber& f = *current;
  const auto base = reinterpret_cast<uintptr_t>(block->smem);
  while (int(f.groups.size()) > pending_groups) {
    for (const Copy& c : f.groups.front()) {
      // The data lands now: the latest point the program may rely on.
      std::memcpy(c.dst, c.src, size_t(c.src_bytes));
      std::memset(c.dst + c.src_bytes, 0, size_t(c.bytes - c.src_bytes));
      const uintptr_t off = reinterpret_cast<uintptr_t>(c.dst) - base;
      for (int i = 0; i < c.bytes; ++i) smem_shadow[kSmemRedzone + off + i].pending = -1;
      shared_access(reinterpret_cast<uintptr_t>(c.dst), size_t(c.bytes), true, site);
    }
    f.groups.pop_front();
  }
}

cudaError_t launch(const void* kernel, dim3 grid, dim3 block_dim, size_t smem_bytes, const KernelBody& body) {
  const void* site = __builtin_return_address(0);
  const long threads = long(block_dim.x) * block_dim.y * block_dim.z;
  if (threads <= 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535) {
    report("launch-error", site, "invalid configuration: grid (%u, %u, %u), block of %ld threads", grid.x, grid.y,
           grid.z, threads);
    last_error = cudaErrorInvalidConfiguration;
    return last_error;
  }
  auto attr = max_dynamic_smem.find(kernel);
  const long allowed = attr == max_dynamic_smem.end() ? kDefaultDynamicSmem : attr->second;
  if (long(smem_bytes) > allowed || long(smem_bytes) > device.smem_optin) {
    report("launch-error", site,
           "%zu bytes of dynamic shared memory requested; the kernel's limit is %ld, the device's %d", smem_bytes,
           allowed, device.smem_optin);
    last_error = cudaErrorInvalidValue;
    return last_error;
  }
  if (smem_arena == nullptr) {
    smem_arena = static_cast<unsigned char*>(std::aligned_alloc(128, kSmemMax + 2 * kSmemRedzone));
    smem_shadow.resize(kSmemMax + 2 * kSmemRedzone);
  }
  launch_counter += 1;
  launches.push_back(LaunchRecord{grid, threads, smem_bytes});
  kernel_body = &body;
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) run_block(grid, block_dim, uint3{x, y, z}, smem_bytes);
  kernel_body = nullptr;
  return cudaSuccess;
}

}  // namespace libra_emu

// ----------------------------------------------------------------------------- CUDA runtime stand-ins

extern "C" {

cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || value > libra_emu::device.smem_optin) {
      libra_emu::last_error = cudaErrorInvalidValue;
      return cudaErrorInvalidValue;
    }
    libra_emu::max_dynamic_smem[func] = value;
  }
  return cudaSuccess;
}

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = libra_emu::last_error;
  libra_emu::last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return libra_emu::last_error; }

const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unknown error";
  }
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  (void)device;
  switch (attr) {
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = libra_emu::device.smem_optin; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMajor: *value = libra_emu::device.cc_major; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = libra_emu::device.cc_minor; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

// ----------------------------------------------------------------------------- instrumentation

// The checks -fsanitize=kernel-address emits in the kernel translation units (outlined, with
// recovery), for every load and store they make.
#define LIBRA_EMU_CHECKS(n)                                                                       \
  void __asan_load##n##_noabort(uintptr_t a) {                                                    \
    libra_emu::on_access(a, n, false, __builtin_return_address(0));                               \
  }                                                                                               \
  void __asan_store##n##_noabort(uintptr_t a) {                                                   \
    libra_emu::on_access(a, n, true, __builtin_return_address(0));                                \
  }
LIBRA_EMU_CHECKS(1)
LIBRA_EMU_CHECKS(2)
LIBRA_EMU_CHECKS(4)
LIBRA_EMU_CHECKS(8)
LIBRA_EMU_CHECKS(16)
#undef LIBRA_EMU_CHECKS

void __asan_loadN_noabort(uintptr_t a, size_t n) { libra_emu::on_access(a, n, false, __builtin_return_address(0)); }
void __asan_storeN_noabort(uintptr_t a, size_t n) { libra_emu::on_access(a, n, true, __builtin_return_address(0)); }
void __asan_handle_no_return(void) {}

}  // extern "C"
