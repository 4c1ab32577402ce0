// The scheduler behind `python -m mlx_kssm.kernels.emulate`: runs an emulated Metal kernel over
// its whole grid, one threadgroup after another. Every thread of a threadgroup is a coroutine
// (ucontext) of one OS thread; a thread runs until it reaches a threadgroup barrier, a SIMD-group
// collective or its end, then the next runs. When no thread can run:
//   - a SIMD group whose 32 lanes all wait at the same collective gets its result (sums are
//     taken in lane order, in the operand's precision) and runs on;
//   - otherwise, when every thread of the threadgroup waits at the same barrier, all run on, and
//     a barrier with mem_flags::mem_threadgroup starts a new memory epoch for the race checks;
//   - anything else (a barrier some threads never reach, threads at different barriers, a
//     collective some lanes of its SIMD group never reach) is an error and ends the run.
#include <ucontext.h>

#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "emulate_abi.h"

namespace kssm_emu {
namespace {

enum class State { ready, at_barrier, at_simd, done };

struct Lane {
  ucontext_t context;
  State state = State::ready;
  int site = 0, flags = 0, op = 0;
  unsigned arg = 0;
  double value = 0, result = 0;
  ThreadIds ids;
};

struct TgArrayEntry {
  void* array;
  void (*poison)(void*);
  long bytes;
  bool* used;
};

constexpr unsigned kSimdWidth = 32;             // Apple GPUs' thread_execution_width
constexpr long kThreadgroupMemory = 32 * 1024;  // bytes of threadgroup memory per threadgroup
constexpr size_t kStackBytes = 128 * 1024;  // per thread; never zero-filled, so mostly untouched
constexpr size_t kMaxMessages = 20;

struct Runner {
  std::vector<Lane> lanes;
  char* stacks = nullptr;
  ucontext_t scheduler;
  LaneFn fn = nullptr;
  void* ctx = nullptr;
  int current = -1;
  int epoch = 0;
  int group_base = 0;  // global index of the running threadgroup's first thread
  bool fatal = false;
};

Runner runner;
std::vector<TgArrayEntry> tg_arrays;
std::vector<std::string> messages;
int errors = 0;

void error(const std::string& message) {
  errors++;
  if (messages.size() < kMaxMessages) messages.push_back(message);
}

void lane_entry(int index) {
  Lane& lane = runner.lanes[index];
  runner.fn(runner.ctx, &lane.ids);
  lane.state = State::done;  // returning resumes uc_link, the scheduler
}

void wait_here(Lane& lane) { swapcontext(&lane.context, &runner.scheduler); }

std::string where(int site) { return "line " + std::to_string(site) + " of the kernel unit"; }

// Resolves every SIMD group whose lanes all wait at one collective. Returns true if any did.
bool release_simd_groups() {
  bool released = false;
  const unsigned n = static_cast<unsigned>(runner.lanes.size());
  for (unsigned first = 0; first < n && !runner.fatal; first += kSimdWidth) {
    const unsigned last = first + kSimdWidth < n ? first + kSimdWidth : n;
    unsigned waiting = 0;
    for (unsigned i = first; i < last; i++) waiting += runner.lanes[i].state == State::at_simd;
    if (waiting == 0) continue;
    const Lane& lead = runner.lanes[first];
    if (waiting != last - first || lead.state != State::at_simd) {
      error("SIMD collective at " + where(lead.site) + " reached by " + std::to_string(waiting) +
            " of " + std::to_string(last - first) + " lanes (divergent SIMD groups are not modelled)");
      runner.fatal = true;
      return false;
    }
    for (unsigned i = first; i < last; i++) {
      const Lane& lane = runner.lanes[i];
      if (lane.site != lead.site || lane.op != lead.op) {
        error("lanes of one SIMD group wait at different collectives: " + where(lead.site) +
              " and " + where(lane.site));
        runner.fatal = true;
        return false;
      }
    }
    if (lead.op == SIMD_SUM_F32) {
      float sum = 0.0f;
      for (unsigned i = first; i < last; i++) sum += static_cast<float>(runner.lanes[i].value);
      for (unsigned i = first; i < last; i++) runner.lanes[i].result = sum;
    } else if (lead.op == SIMD_SUM_F64) {
      double sum = 0.0;
      for (unsigned i = first; i < last; i++) sum += runner.lanes[i].value;
      for (unsigned i = first; i < last; i++) runner.lanes[i].result = sum;
    } else {  // SIMD_SHUFFLE_XOR
      for (unsigned i = first; i < last; i++) {
        const unsigned source = first + ((i - first) ^ runner.lanes[i].arg);
        if (source >= last) {
          error("simd_shuffle_xor at " + where(lead.site) + " reads a lane outside the SIMD group");
          runner.fatal = true;
          return false;
        }
        runner.lanes[i].result = runner.lanes[source].value;
      }
    }
    for (unsigned i = first; i < last; i++) runner.lanes[i].state = State::ready;
    released = true;
  }
  return released;
}

// Releases a barrier every thread waits at. Returns false (and reports) on anything else.
bool release_barrier() {
  int done = 0, waiting = 0;
  const Lane* lead = nullptr;
  for (const Lane& lane : runner.lanes) {
    if (lane.state == State::done) done++;
    if (lane.state == State::at_barrier) {
      waiting++;
      if (lead == nullptr) lead = &lane;
    }
  }
  if (lead == nullptr) return false;
  if (done > 0) {
    error("threadgroup barrier at " + where(lead->site) + " reached by " + std::to_string(waiting) +
          " threads while " + std::to_string(done) + " had returned");
    return false;
  }
  for (const Lane& lane : runner.lanes) {
    if (lane.state != State::at_barrier || lane.site != lead->site || lane.flags != lead->flags) {
      error("threads of one threadgroup wait at different barriers or collectives (" +
            where(lead->site) + " and " + where(lane.site) + ")");
      return false;
    }
  }
  if (lead->flags & 2) runner.epoch++;  // mem_flags::mem_threadgroup orders threadgroup memory
  for (Lane& lane : runner.lanes) lane.state = State::ready;
  return true;
}

void run_threadgroup() {
  for (const TgArrayEntry& entry : tg_arrays) entry.poison(entry.array);
  for (const TgArrayEntry& entry : tg_arrays) *entry.used = false;
  runner.epoch = 0;
  for (size_t i = 0; i < runner.lanes.size(); i++) {
    Lane& lane = runner.lanes[i];
    lane.state = State::ready;
    getcontext(&lane.context);
    lane.context.uc_stack.ss_sp = runner.stacks + i * kStackBytes;
    lane.context.uc_stack.ss_size = kStackBytes;
    lane.context.uc_link = &runner.scheduler;
    makecontext(&lane.context, reinterpret_cast<void (*)()>(lane_entry), 1, static_cast<int>(i));
  }
  while (true) {
    for (size_t i = 0; i < runner.lanes.size(); i++) {
      if (runner.lanes[i].state != State::ready) continue;
      runner.current = static_cast<int>(i);
      swapcontext(&runner.scheduler, &runner.lanes[i].context);
    }
    runner.current = -1;
    bool all_done = true;
    for (const Lane& lane : runner.lanes) all_done = all_done && lane.state == State::done;
    if (all_done) break;
    if (release_simd_groups()) continue;
    if (runner.fatal || !release_barrier()) {
      runner.fatal = true;
      return;
    }
  }
  long bytes = 0;
  for (const TgArrayEntry& entry : tg_arrays) bytes += *entry.used ? entry.bytes : 0;
  if (bytes > kThreadgroupMemory) {
    error("threadgroup arrays use " + std::to_string(bytes) + " bytes, more than 32 KiB");
    runner.fatal = true;
  }
}

}  // namespace

int run_grid(const unsigned grid[3], const unsigned group[3], LaneFn fn, void* ctx) {
  errors = 0;
  messages.clear();
  runner = Runner();
  runner.fn = fn;
  runner.ctx = ctx;
  for (int d = 0; d < 3; d++) {
    if (group[d] == 0 || grid[d] % group[d] != 0) {
      error("grid " + std::to_string(grid[d]) + " is not a multiple of threadgroup " +
            std::to_string(group[d]) + " (non-uniform threadgroups are not modelled)");
      return errors;
    }
  }
  const unsigned threads = group[0] * group[1] * group[2];
  if (threads > 1024) {
    error("threadgroup of " + std::to_string(threads) + " threads (Metal allows at most 1024)");
    return errors;
  }
  const Dim3 groups = {grid[0] / group[0], grid[1] / group[1], grid[2] / group[2]};
  runner.lanes.assign(threads, Lane());
  // Stacks outlive the run: a fresh allocation per launch costs page faults on every lane.
  static std::unique_ptr<char[]> stacks;
  static unsigned stack_count = 0;
  if (stack_count < threads) {
    stacks.reset(new char[threads * kStackBytes]);
    stack_count = threads;
  }
  runner.stacks = stacks.get();
  const unsigned simdgroups = (threads + kSimdWidth - 1) / kSimdWidth;
  int group_index = 0;
  for (unsigned gz = 0; gz < groups.z && !runner.fatal; gz++) {
    for (unsigned gy = 0; gy < groups.y && !runner.fatal; gy++) {
      for (unsigned gx = 0; gx < groups.x && !runner.fatal; gx++, group_index++) {
        runner.group_base = group_index * static_cast<int>(threads);
        for (unsigned t = 0; t < threads; t++) {
          const Dim3 local = {t % group[0], (t / group[0]) % group[1], t / (group[0] * group[1])};
          ThreadIds& ids = runner.lanes[t].ids;
          ids.thread_position_in_threadgroup = local;
          ids.threadgroup_position_in_grid = {gx, gy, gz};
          ids.thread_position_in_grid = {gx * group[0] + local.x, gy * group[1] + local.y,
                                         gz * group[2] + local.z};
          ids.threads_per_threadgroup = {group[0], group[1], group[2]};
          ids.threadgroups_per_grid = groups;
          ids.threads_per_grid = {grid[0], grid[1], grid[2]};
          ids.thread_index_in_threadgroup = t;
          ids.thread_index_in_simdgroup = t % kSimdWidth;
          ids.simdgroup_index_in_threadgroup = t / kSimdWidth;
          ids.simdgroups_per_threadgroup = simdgroups;
          ids.threads_per_simdgroup = kSimdWidth;
        }
        run_threadgroup();
      }
    }
  }
  return errors;
}

void barrier(int flags, int site) {
  Lane& lane = runner.lanes[runner.current];
  lane.state = State::at_barrier;
  lane.flags = flags;
  lane.site = site;
  wait_here(lane);
}

double simd_collective(int op, double value, unsigned arg, int site) {
  Lane& lane = runner.lanes[runner.current];
  lane.state = State::at_simd;
  lane.op = op;
  lane.value = value;
  lane.arg = arg;
  lane.site = site;
  wait_here(lane);
  return lane.result;
}

int lane_index() { return runner.current; }
int global_thread() { return runner.group_base + runner.current; }
int epoch() { return runner.epoch; }

void register_threadgroup_array(void* array, void (*poison)(void*), long bytes, bool* used) {
  tg_arrays.push_back({array, poison, bytes, used});
}

void report(const char* what, const char* buffer, long index) {
  error(std::string(what) + " " + buffer + " at index " + std::to_string(index) + " (thread " +
        std::to_string(global_thread()) + ")");
}

int error_count() { return errors; }
const char* first_error() { return messages.empty() ? "" : messages.front().c_str(); }

}  // namespace kssm_emu

extern "C" __attribute__((visibility("default"))) int kssm_error_count() {
  return kssm_emu::error_count();
}

extern "C" __attribute__((visibility("default"))) const char* kssm_error_message(int i) {
  return i >= 0 && static_cast<size_t>(i) < kssm_emu::messages.size()
             ? kssm_emu::messages[i].c_str()
             : "";
}
