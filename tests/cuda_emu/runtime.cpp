// runtime.cpp: the strict CPU emulation of CUDA behind tests/cuda_emu (see __init__.py).
//
// One std::thread per CUDA thread, the blocks of a launch one after another. Every block gets
// the same shared-memory window (static arrays first, then the launch's dynamic size) poisoned
// with 0xff bytes (NaN in fp32, fp16 and bf16) at its start. The kernel translation unit is
// compiled with -fsanitize=thread, and the __tsan_* hooks below are ours: every load and store
// of the kernel code lands here, is checked for natural alignment (a GPU faults where a CPU
// does not) and, when it falls in the window, for bounds and for races (a shadow word per 4
// bytes: the last writer warp and barrier epoch, the warps that read in the current epoch).
// Everything found is a violation: counted, the first few described, read by the driver after
// each entry point, and any one fails the test.
#include "emu.h"

#include <algorithm>
#include <atomic>
#include <barrier>
#include <climits>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#define EMU_API extern "C" __attribute__((visibility("default")))

thread_local uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;

namespace emu {
namespace {

constexpr size_t kMaxSmem = 232448;        // sm_90: shared memory per block after opt-in
constexpr size_t kDefaultSmem = 48 * 1024;  // without cudaFuncSetAttribute
constexpr size_t kStaticMax = 48 * 1024;    // static __shared__ per kernel
constexpr size_t kWindow = 256 * 1024;      // larger than any legal size: overruns land inside
constexpr size_t kGranule = 4;              // race-check granularity (bytes)
constexpr unsigned char kPoison = 0xff;

alignas(128) unsigned char window[kWindow];

struct Granule {
  uint32_t w_epoch, r_epoch, r_mask;  // epoch of the last write / of the reads in r_mask
  int16_t w_warp;
  uint8_t inflight;                   // a cp.async into it is not complete yet
};
Granule shadow[kWindow / kGranule];
std::atomic_flag stripes[4096];  // one lock per 16-byte chunk (modulo)

// ---- violations ------------------------------------------------------------------------------
enum Kind { kLaunch, kBounds, kAlign, kInflight, kRace, kShuffle, kCollective, kAsync, kKinds };
const char* const kKindNames[kKinds] = {"launch", "bounds", "alignment", "in-flight", "race",
                                        "shuffle", "collective", "cp.async"};
std::mutex violations_mu;
long long violation_counts[kKinds];
std::vector<std::string> violation_messages;
constexpr size_t kKeptMessages = 12;

// counters the driver reads back (emu_counters): evidence that the checks ran at all
enum Counter { cLaunches, cBlocks, cBarriers, cCpAsync, cLdmatrix, cMma, cShuffles, cSharedAccesses,
               cVectorAccesses, cCounters };
const char* const kCounterNames[cCounters] = {"launches", "blocks", "barriers", "cp_async", "ldmatrix",
                                              "mma", "shuffles", "shared_accesses", "vector_accesses"};
std::atomic<long long> counters[cCounters];
void count(Counter c, long long n = 1) { counters[c].fetch_add(n, std::memory_order_relaxed); }

struct Launch;
Launch* current = nullptr;

thread_local int tl_lane = 0, tl_warp = 0, tl_tid = 0;
thread_local bool tl_in_kernel = false;
thread_local size_t tl_static_off = 0;

std::string where();

__attribute__((format(printf, 2, 3))) void violation(Kind kind, const char* fmt, ...) {
  char text[400];
  va_list args;
  va_start(args, fmt);
  vsnprintf(text, sizeof text, fmt, args);
  va_end(args);
  std::lock_guard<std::mutex> lock(violations_mu);
  if (violation_counts[kind]++ == 0 || violation_messages.size() < kKeptMessages)
    if (violation_messages.size() < 2 * kKeptMessages)
      violation_messages.push_back(std::string(kKindNames[kind]) + ": " + where() + text);
}

// ---- one launch ------------------------------------------------------------------------------
struct EpochBump {
  std::atomic<uint32_t>* epoch;
  void operator()() noexcept {
    epoch->fetch_add(1, std::memory_order_relaxed);
    count(cBarriers);
  }
};

std::atomic<uint32_t> epoch{1};  // never reset: stale shadow entries never match a live epoch

struct Warp {
  uint64_t vals[32];
  unsigned masks[32];
  const void* ptrs[32];
  unsigned words[32][6];
  std::atomic<unsigned> exited{0};
  std::unique_ptr<std::barrier<>> bar;
};

struct Launch {
  const char* name;
  dim3 grid, block;
  int threads = 0;
  size_t dynamic = 0;
  std::atomic<size_t> static_end{0};  // bytes of static shared memory (block-uniform)
  std::atomic<bool> bounds_reported{false};
  std::unique_ptr<std::barrier<EpochBump>> bar;
  std::vector<Warp> warps;
};

std::string where() {
  if (!tl_in_kernel || !current) return "";
  char text[300];
  snprintf(text, sizeof text, "%s, block (%u,%u,%u), thread %d (warp %d, lane %d): ", current->name,
           blockIdx.x, blockIdx.y, blockIdx.z, tl_tid, tl_warp, tl_lane);
  return text;
}

size_t shared_limit(const Launch& L) {
  return ((L.static_end.load(std::memory_order_relaxed) + 15) & ~size_t(15)) + L.dynamic;
}

void lock(size_t off) {
  std::atomic_flag& f = stripes[(off / 16) % 4096];
  while (f.test_and_set(std::memory_order_acquire)) std::this_thread::yield();
}
void unlock(size_t off) { stripes[(off / 16) % 4096].clear(std::memory_order_release); }

enum Access { kLoad, kStore, kCpAsyncIssue, kCpAsyncLand, kLdmatrix };
const char* const kAccessNames[] = {"load", "store", "cp.async", "cp.async", "ldmatrix"};

// The race check of one access of n bytes at window offset off by warp tl_warp. Conflicting
// accesses of two warps need a __syncthreads between them: a read of what another warp wrote
// in this epoch, or a write over what another warp read or wrote in it, is a race. Within one
// warp nothing is checked (warp-synchronous code is allowed). A read of bytes whose cp.async
// has not landed (by the issuing thread's wait) reads poison on a GPU too.
bool shared_access(size_t off, size_t n, Access kind) {
  Launch& L = *current;
  count(cSharedAccesses);
  const size_t limit = shared_limit(L);
  if (off + n > limit) {
    violation(kBounds, "%s of %zu bytes at shared offset %zu, past the %zu bytes this launch has "
              "(%zu static + %zu dynamic)", kAccessNames[kind], n, off, limit,
              L.static_end.load(std::memory_order_relaxed), L.dynamic);
    return false;
  }
  const uint32_t ep = epoch.load(std::memory_order_relaxed);
  const int w = tl_warp;
  const unsigned me = 1u << w;
  for (size_t g = off / kGranule; g < (off + n + kGranule - 1) / kGranule; ++g) {
    const size_t goff = g * kGranule;
    Granule& s = shadow[g];
    if (kind == kLoad || kind == kLdmatrix) {
      // fast path: this warp's read is already recorded in this epoch and nothing conflicts (the
      // other lanes of a warp reading a reduction slot); relaxed loads of the shadow suffice,
      // a stale value only sends the access down the locked path
      const uint32_t r_epoch = __atomic_load_n(&s.r_epoch, __ATOMIC_RELAXED);
      const uint32_t r_mask = __atomic_load_n(&s.r_mask, __ATOMIC_RELAXED);
      const uint32_t w_epoch = __atomic_load_n(&s.w_epoch, __ATOMIC_RELAXED);
      const int16_t w_warp = __atomic_load_n(&s.w_warp, __ATOMIC_RELAXED);
      const uint8_t flight = __atomic_load_n(&s.inflight, __ATOMIC_RELAXED);
      if (r_epoch == ep && (r_mask & me) && !flight && (w_epoch != ep || w_warp == w)) continue;
    }
    lock(goff);
    int other = -1;
    unsigned readers = 0;
    bool inflight = false;
    if (kind == kLoad || kind == kLdmatrix) {
      inflight = s.inflight;
      if (!inflight && s.w_epoch == ep && s.w_warp != w) other = s.w_warp;
      if (s.r_epoch != ep) {
        s.r_epoch = ep;
        s.r_mask = 0;
      }
      s.r_mask |= me;
    } else {
      if (kind == kCpAsyncIssue || kind == kStore) {
        inflight = s.inflight && kind == kStore;
        if (s.w_epoch == ep && s.w_warp != w) other = s.w_warp;
        if (s.r_epoch == ep) readers = s.r_mask & ~me;
      }
      s.w_epoch = ep;
      s.w_warp = static_cast<int16_t>(w);
      s.inflight = kind == kCpAsyncIssue;
    }
    unlock(goff);
    if (inflight) {
      violation(kInflight, "%s at shared offset %zu: its cp.async is still in flight (no cp.async.wait_group "
                "has completed its group)", kAccessNames[kind], goff);
      return false;
    }
    if (other >= 0) {
      violation(kRace, "%s at shared offset %zu after warp %d wrote it, with no __syncthreads between",
                kAccessNames[kind], goff, other);
      return false;
    }
    if (readers) {
      violation(kRace, "%s at shared offset %zu over what warps %#x read, with no __syncthreads between",
                kAccessNames[kind], goff, readers);
      return false;
    }
  }
  return true;
}

inline bool in_window(uintptr_t a) { return a - reinterpret_cast<uintptr_t>(window) < kWindow; }
inline size_t window_offset(const void* p) {
  return reinterpret_cast<uintptr_t>(p) - reinterpret_cast<uintptr_t>(window);
}

// Every instrumented load/store of the kernel translation unit.
inline void memory_access(void* p, size_t n, bool store, bool typed) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (!tl_in_kernel) return;
  if (typed && (a & (n - 1))) {
    // said at once: the host may fault on the access itself (an aligned SSE move)
    fprintf(stderr, "cuda_emu: %zu-byte %s at %p is misaligned\n", n, store ? "store" : "load", p);
    violation(kAlign, "%zu-byte %s at %p, which is not %zu-byte aligned (a GPU faults)", n,
              store ? "store" : "load", p, n);
  }
  if (in_window(a)) shared_access(a - reinterpret_cast<uintptr_t>(window), n, store ? kStore : kLoad);
}

// ---- cp.async: a queue per thread --------------------------------------------------------------
struct Copy {
  unsigned char* dst;
  const unsigned char* src;
};
thread_local std::vector<Copy> tl_open;
thread_local std::deque<std::vector<Copy>> tl_committed;

void land(const std::vector<Copy>& group) {
  for (const Copy& c : group) {
    if (c.src) std::memcpy(c.dst, c.src, 16);
    else std::memset(c.dst, 0, 16);
    shared_access(window_offset(c.dst), 16, kCpAsyncLand);
  }
}

void drain_at_exit() {
  if (!tl_open.empty() || !tl_committed.empty()) {
    violation(kAsync, "%zu cp.async group(s) and %zu uncommitted copies still in flight at kernel exit",
              tl_committed.size(), tl_open.size());
    for (const auto& g : tl_committed) land(g);
    land(tl_open);
  }
  tl_committed.clear();
  tl_open.clear();
}

// ---- warp collectives ----------------------------------------------------------------------------
Warp& my_warp() { return current->warps[tl_warp]; }

// mma.sync / ldmatrix .aligned: every lane of the warp executes it
void check_full_warp(const char* what) {
  const unsigned exited = my_warp().exited.load(std::memory_order_relaxed);
  if (exited && tl_lane == 0)
    violation(kCollective, "%s with lanes %#x of the warp exited (it needs all 32)", what, exited);
}

template <typename T>
T shfl_xor(unsigned mask, T v, int lane_mask) {
  count(cShuffles);
  Warp& w = my_warp();
  std::memcpy(&w.vals[tl_lane], &v, sizeof(T));
  w.masks[tl_lane] = mask;
  w.bar->arrive_and_wait();
  // Every live lane is here (the emulation cannot diverge). CUDA wants each lane in its own
  // mask, every lane of the mask taking part with the same mask, and the source lane in it.
  const unsigned exited = w.exited.load(std::memory_order_relaxed);
  const int src = (tl_lane ^ lane_mask) & 31;
  if (!(mask >> tl_lane & 1u))
    violation(kShuffle, "__shfl_xor_sync with mask %#x, which leaves out lane %d that takes part", mask, tl_lane);
  else if (mask & exited)
    violation(kShuffle, "__shfl_xor_sync with mask %#x names lanes %#x that have exited", mask, mask & exited);
  else if (!(mask >> src & 1u))
    violation(kShuffle, "__shfl_xor_sync reads lane %d, outside its mask %#x", src, mask);
  else if (w.masks[src] != mask)
    violation(kShuffle, "__shfl_xor_sync: lane %d uses mask %#x, lane %d mask %#x", tl_lane, mask, src,
              w.masks[src]);
  T out;
  std::memcpy(&out, &w.vals[src], sizeof(T));
  w.bar->arrive_and_wait();
  return out;
}

void ldmatrix(unsigned* r, const void* p, bool trans) {
  count(cLdmatrix);
  Warp& w = my_warp();
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  bool ok = true;
  if (a % 16) {
    violation(kAlign, "ldmatrix row address %p is not 16-byte aligned", p);
    ok = false;
  } else if (!in_window(a)) {
    violation(kBounds, "ldmatrix row address %p is not in shared memory", p);
    ok = false;
  } else {
    ok = shared_access(window_offset(p), 16, kLdmatrix);
  }
  w.ptrs[tl_lane] = ok ? p : window;  // a bad row reads the (poisoned) window start instead
  w.bar->arrive_and_wait();
  check_full_warp("ldmatrix");
  const int g = tl_lane >> 2, t = tl_lane & 3;
  for (int i = 0; i < 4; ++i) {  // matrix i: rows at the addresses of lanes 8i .. 8i+7
    const auto row = [&](int k) { return static_cast<const unsigned short*>(w.ptrs[8 * i + k]); };
    const unsigned lo = trans ? row(2 * t)[g] : row(g)[2 * t];
    const unsigned hi = trans ? row(2 * t + 1)[g] : row(g)[2 * t + 1];
    r[i] = lo | (hi << 16);
  }
  w.bar->arrive_and_wait();
}

float b16(__half, unsigned bits) {
  __half_raw r;
  r.x = static_cast<unsigned short>(bits);
  return __half2float(__half(r));
}
float b16(__nv_bfloat16, unsigned bits) {
  __nv_bfloat16_raw r;
  r.x = static_cast<unsigned short>(bits);
  return __bfloat162float(__nv_bfloat16(r));
}

// mma.sync.m16n8k16: every lane posts its operand registers, then reads back its accumulators,
// element by element from the PTX ISA's fragment tables.
template <typename T>
void mma(float* c, const unsigned* a, const unsigned* b) {
  count(cMma);
  Warp& w = my_warp();
  for (int i = 0; i < 4; ++i) w.words[tl_lane][i] = a[i];
  w.words[tl_lane][4] = b[0];
  w.words[tl_lane][5] = b[1];
  w.bar->arrive_and_wait();
  check_full_warp("mma.sync");
  // A (16x16, row): element (r, k) in lane 4*(r%8) + (k%8)/2, register (r>=8) + 2*(k>=8), half k%2
  // B (16x8, col): element (k, n) in lane 4*n + (k%8)/2, register 4 + (k>=8), half k%2
  const auto A = [&](int r, int k) {
    const unsigned v = w.words[4 * (r % 8) + (k % 8) / 2][(r >= 8) + 2 * (k >= 8)];
    return b16(T{}, k % 2 ? v >> 16 : v & 0xffffu);
  };
  const auto B = [&](int k, int n) {
    const unsigned v = w.words[4 * n + (k % 8) / 2][4 + (k >= 8)];
    return b16(T{}, k % 2 ? v >> 16 : v & 0xffffu);
  };
  const int g = tl_lane >> 2, t = tl_lane & 3;
  float d[4];
  for (int e = 0; e < 4; ++e) {
    const int r = g + 8 * (e >> 1), n = 2 * t + (e & 1);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A(r, k) * B(k, n);
    d[e] = c[e] + acc;
  }
  w.bar->arrive_and_wait();
  for (int e = 0; e < 4; ++e) c[e] = d[e];
}

// ---- host API state ------------------------------------------------------------------------------
std::mutex attr_mu;
std::map<const void*, int> max_dynamic_smem;  // cudaFuncSetAttribute
cudaError_t last_error = cudaSuccess;

bool check_config(const char* name, const void* kernel, dim3 grid, dim3 block, size_t dynamic) {
  const long long threads = 1LL * block.x * block.y * block.z;
  const char* bad = nullptr;
  char text[200];
  if (block.x == 0 || block.y == 0 || block.z == 0 || block.x > 1024 || block.y > 1024 || block.z > 64 ||
      threads > 1024) {
    snprintf(text, sizeof text, "block (%u,%u,%u): at most (1024,1024,64) and 1024 threads", block.x, block.y,
             block.z);
    bad = text;
  } else if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > INT_MAX || grid.y > 65535 || grid.z > 65535) {
    snprintf(text, sizeof text, "grid (%u,%u,%u): x in [1, 2^31-1], y and z in [1, 65535]", grid.x, grid.y,
             grid.z);
    bad = text;
  } else if (dynamic > kMaxSmem) {
    snprintf(text, sizeof text, "%zu bytes of dynamic shared memory, more than the %zu a block can have",
             dynamic, kMaxSmem);
    bad = text;
  } else if (dynamic > kDefaultSmem) {
    std::lock_guard<std::mutex> lock(attr_mu);
    const auto it = max_dynamic_smem.find(kernel);
    const int allowed = it == max_dynamic_smem.end() ? int(kDefaultSmem) : it->second;
    if (dynamic > size_t(allowed)) {
      snprintf(text, sizeof text, "%zu bytes of dynamic shared memory, over the kernel's limit of %d (more "
               "than 48 KiB needs cudaFuncSetAttribute(MaxDynamicSharedMemorySize) first)", dynamic, allowed);
      bad = text;
    }
  }
  if (!bad) return true;
  violation(kLaunch, "launch of %s: %s", name, bad);
  last_error = cudaErrorInvalidConfiguration;
  return false;
}

void new_block(Launch& L) {
  L.bar = std::make_unique<std::barrier<EpochBump>>(L.threads, EpochBump{&epoch});
  for (size_t i = 0; i < L.warps.size(); ++i) {
    // a partial last warp: its missing lanes count as exited (a full mask there is a violation)
    const int lanes = std::min(32, L.threads - int(i) * 32);
    L.warps[i].bar = std::make_unique<std::barrier<>>(lanes);
    L.warps[i].exited.store(lanes == 32 ? 0u : ~((1u << lanes) - 1), std::memory_order_relaxed);
  }
  // a new block: nothing in shared memory survives, every old access is ordered before it
  std::memset(window, kPoison, std::min(kWindow, std::max(shared_limit(L), size_t(16 * 1024))));
  epoch.fetch_add(1, std::memory_order_relaxed);
  L.bounds_reported.store(false, std::memory_order_relaxed);
}

}  // namespace

void launch(const char* name, const void* kernel, dim3 grid, dim3 block, size_t dynamic,
            const std::function<void()>& body) {
  count(cLaunches);
  if (!check_config(name, kernel, grid, block, dynamic)) return;
  Launch L;
  L.name = name;
  L.grid = grid;
  L.block = block;
  L.threads = static_cast<int>(block.x * block.y * block.z);
  L.dynamic = dynamic;
  L.warps = std::vector<Warp>((L.threads + 31) / 32);
  current = &L;
  blockDim = block;
  gridDim = grid;
  std::memset(window, kPoison, kWindow);
  new_block(L);
  const long long blocks = 1LL * grid.x * grid.y * grid.z;
  std::barrier<> all(L.threads);
  auto run = [&](int t) {
    threadIdx = make_uint3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
    tl_tid = t;
    tl_lane = t % 32;
    tl_warp = t / 32;
    for (long long b = 0; b < blocks; ++b) {
      blockIdx = make_uint3(unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / (1LL * grid.x * grid.y)));
      tl_static_off = 0;
      tl_in_kernel = true;
      body();
      drain_at_exit();
      tl_in_kernel = false;
      Warp& w = L.warps[tl_warp];
      w.exited.fetch_or(1u << tl_lane, std::memory_order_relaxed);
      w.bar->arrive_and_drop();
      L.bar->arrive_and_drop();
      all.arrive_and_wait();  // the block is done
      if (t == 0) {
        count(cBlocks);
        if (b + 1 < blocks) new_block(L);
      }
      all.arrive_and_wait();  // the next one is set up
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(L.threads);
  for (int t = 0; t < L.threads; ++t) pool.emplace_back(run, t);
  for (std::thread& th : pool) th.join();
  current = nullptr;
}

void launch_bounds(int max_threads) {
  Launch& L = *current;
  if (L.threads > max_threads && !L.bounds_reported.exchange(true))
    violation(kLaunch, "launched with %d threads per block, more than its __launch_bounds__(%d)", L.threads,
              max_threads);
}

void* static_shared_bytes(size_t bytes, size_t align) {
  const size_t off = (tl_static_off + align - 1) / align * align;
  tl_static_off = off + bytes;
  if (tl_static_off > kStaticMax) {
    if (tl_tid == 0) violation(kLaunch, "%zu bytes of static shared memory, more than 48 KiB", tl_static_off);
    return window;
  }
  size_t seen = current->static_end.load(std::memory_order_relaxed);
  while (seen < tl_static_off && !current->static_end.compare_exchange_weak(seen, tl_static_off)) {
  }
  return window + off;
}

unsigned char* dynamic_smem() {
  const size_t base = (tl_static_off + 15) & ~size_t(15);
  if (base + current->dynamic > kMaxSmem && tl_tid == 0)
    violation(kLaunch, "%zu static + %zu dynamic bytes of shared memory, more than %zu", base, current->dynamic,
              kMaxSmem);
  return window + base;
}

}  // namespace emu

using namespace emu;

void __syncthreads() { current->bar->arrive_and_wait(); }
float __shfl_xor_sync(unsigned mask, float v, int lane_mask) { return shfl_xor(mask, v, lane_mask); }
int __shfl_xor_sync(unsigned mask, int v, int lane_mask) { return shfl_xor(mask, v, lane_mask); }
unsigned __shfl_xor_sync(unsigned mask, unsigned v, int lane_mask) { return shfl_xor(mask, v, lane_mask); }

// cp.async: the destination is poisoned at issue and the data lands only at the wait that
// completes its commit group; sources and destinations must be 16-byte aligned, the
// destination in shared memory.
void cp_async16(void* dst, const void* src, bool valid) {
  count(cCpAsync);
  const uintptr_t d = reinterpret_cast<uintptr_t>(dst), s = reinterpret_cast<uintptr_t>(src);
  if (d % 16 || (valid && s % 16)) {
    violation(kAlign, "cp.async of 16 bytes from %p to %p: both must be 16-byte aligned", src, dst);
    return;
  }
  if (!in_window(d)) {
    violation(kBounds, "cp.async destination %p is not in shared memory", dst);
    return;
  }
  if (!shared_access(window_offset(dst), 16, kCpAsyncIssue)) return;
  std::memset(dst, kPoison, 16);
  tl_open.push_back({static_cast<unsigned char*>(dst), valid ? static_cast<const unsigned char*>(src) : nullptr});
}

void cp_async_commit() {
  tl_committed.push_back(std::move(tl_open));
  tl_open.clear();
}

void cp_async_wait_groups(int n) {
  while (tl_committed.size() > size_t(n)) {
    land(tl_committed.front());
    tl_committed.pop_front();
  }
}

void ldmatrix_x4(unsigned* r, const void* p) { ldmatrix(r, p, false); }
void ldmatrix_x4_trans(unsigned* r, const void* p) { ldmatrix(r, p, true); }
template <>
void mma16816<__half>(float* c, const unsigned* a, const unsigned* b) { mma<__half>(c, a, b); }
template <>
void mma16816<__nv_bfloat16>(float* c, const unsigned* a, const unsigned* b) { mma<__nv_bfloat16>(c, a, b); }

void emu_vector_access(const void* p) {
  count(cVectorAccesses);
  if (reinterpret_cast<uintptr_t>(p) % 16) violation(kAlign, "16-byte vector access at %p is misaligned", p);
}

// ---- the CUDA runtime API the host code calls ------------------------------------------------------
// A small "GPU" of emu_sm_count SMs holding one block each, so that grids are a few blocks and
// the grid-stride loops go round many times; compute capability 9.0.
EMU_API int emu_sm_count;
int emu_sm_count = 3;
extern "C" cudaError_t cudaGetLastError(void) {
  const cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}
extern "C" const char* cudaGetErrorString(cudaError_t e) {
  return e == cudaSuccess ? "no error" : e == cudaErrorInvalidConfiguration ? "invalid configuration argument"
                                                                             : "invalid argument";
}
extern "C" cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
extern "C" cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? emu_sm_count
           : attr == cudaDevAttrComputeCapabilityMajor ? 9
           : attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? int(kMaxSmem) : 0;
  return cudaSuccess;
}
extern "C" cudaError_t cudaFuncSetAttribute(const void* kernel, enum cudaFuncAttribute attr, int value) {
  if (attr == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (value < 0 || size_t(value) > kMaxSmem) {
      violation(kLaunch, "cudaFuncSetAttribute(MaxDynamicSharedMemorySize, %d): more than %zu", value, kMaxSmem);
      return cudaErrorInvalidValue;
    }
    std::lock_guard<std::mutex> lock(attr_mu);
    max_dynamic_smem[kernel] = value;
  }
  return cudaSuccess;
}
extern "C" cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void*, int, size_t) {
  *blocks = 1;
  return cudaSuccess;
}

// ---- what the driver reads back --------------------------------------------------------------------
// Violations since the last call: the count, and their first descriptions (one a line) in buf.
EMU_API long long emu_take_violations(char* buf, int size) {
  std::lock_guard<std::mutex> lock(violations_mu);
  long long total = 0;
  std::string text;
  for (int k = 0; k < kKinds; ++k) {
    if (violation_counts[k])
      text += std::string(kKindNames[k]) + ": " + std::to_string(violation_counts[k]) + " violation(s)\n";
    total += violation_counts[k];
    violation_counts[k] = 0;
  }
  for (const std::string& m : violation_messages) text += m + "\n";
  violation_messages.clear();
  snprintf(buf, size, "%s", text.c_str());
  return total;
}

EMU_API int emu_counter_names(char* buf, int size) {
  std::string text;
  for (int c = 0; c < cCounters; ++c) text += std::string(kCounterNames[c]) + (c + 1 < cCounters ? " " : "");
  snprintf(buf, size, "%s", text.c_str());
  return cCounters;
}

// Counters since the last call (then reset).
EMU_API void emu_take_counters(long long* out) {
  for (int c = 0; c < cCounters; ++c) out[c] = counters[c].exchange(0);
}

// ---- the instrumentation hooks (-fsanitize=thread on the kernel translation unit) -------------------
// __tsan_readN/writeN: an access whose type promises N-byte alignment; the unaligned_ ones do not.
extern "C" {
void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
#define EMU_HOOKS(N)                                                                       \
  void __tsan_read##N(void* p) { memory_access(p, N, false, true); }                       \
  void __tsan_write##N(void* p) { memory_access(p, N, true, true); }                       \
  void __tsan_unaligned_read##N(void* p) { memory_access(p, N, false, false); }            \
  void __tsan_unaligned_write##N(void* p) { memory_access(p, N, true, false); }            \
  void __tsan_volatile_read##N(void* p) { memory_access(p, N, false, true); }              \
  void __tsan_volatile_write##N(void* p) { memory_access(p, N, true, true); }
EMU_HOOKS(1)
EMU_HOOKS(2)
EMU_HOOKS(4)
EMU_HOOKS(8)
EMU_HOOKS(16)
void __tsan_read_range(void* p, unsigned long n) {
  if (tl_in_kernel && in_window(reinterpret_cast<uintptr_t>(p))) shared_access(window_offset(p), n, kLoad);
}
void __tsan_write_range(void* p, unsigned long n) {
  if (tl_in_kernel && in_window(reinterpret_cast<uintptr_t>(p))) shared_access(window_offset(p), n, kStore);
}
// host-side atomics of the kernel sources (gelu.cu's occupancy cache, static-local guards),
// done for real
#define EMU_ATOMICS(BITS, T)                                                                              \
  T __tsan_atomic##BITS##_load(const volatile T* a, int) { return __atomic_load_n(a, __ATOMIC_SEQ_CST); } \
  void __tsan_atomic##BITS##_store(volatile T* a, T v, int) { __atomic_store_n(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##BITS##_fetch_add(volatile T* a, T v, int) { return __atomic_fetch_add(a, v, __ATOMIC_SEQ_CST); } \
  T __tsan_atomic##BITS##_exchange(volatile T* a, T v, int) { return __atomic_exchange_n(a, v, __ATOMIC_SEQ_CST); } \
  int __tsan_atomic##BITS##_compare_exchange_strong(volatile T* a, T* expected, T desired, int, int) {   \
    return __atomic_compare_exchange_n(a, expected, desired, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST); \
  }                                                                                                       \
  int __tsan_atomic##BITS##_compare_exchange_weak(volatile T* a, T* expected, T desired, int, int) {     \
    return __atomic_compare_exchange_n(a, expected, desired, true, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);  \
  }
EMU_ATOMICS(8, char)
EMU_ATOMICS(16, short)
EMU_ATOMICS(32, int)
EMU_ATOMICS(64, long long)
void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
void __tsan_atomic_signal_fence(int) {}
}
