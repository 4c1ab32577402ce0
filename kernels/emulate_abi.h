// The interface between an emulated kernel (metal_shim.h + a Metal body + a generated launcher)
// and the scheduler that runs it (emulate_runtime.cpp). No system header and no macro here: the
// kernel's translation unit must see nothing but what the shim declares.
#pragma once

namespace kssm_emu {

struct Dim3 {
  unsigned x, y, z;
};

// The values of the Metal attributes the launcher may pass to a kernel, for one thread.
struct ThreadIds {
  Dim3 thread_position_in_grid;
  Dim3 thread_position_in_threadgroup;
  Dim3 threadgroup_position_in_grid;
  Dim3 threads_per_threadgroup;
  Dim3 threadgroups_per_grid;
  Dim3 threads_per_grid;
  unsigned thread_index_in_threadgroup;
  unsigned thread_index_in_simdgroup;
  unsigned simdgroup_index_in_threadgroup;
  unsigned simdgroups_per_threadgroup;
  unsigned threads_per_simdgroup;
};

typedef void (*LaneFn)(void* ctx, const ThreadIds* ids);

// One buffer of the signature. `writers` (outputs only) holds, per element, the global index of
// the thread that wrote it, or -1.
struct BufferInfo {
  const char* name;
  long size;
  int* writers;
};

enum SimdOp { SIMD_SUM_F32 = 1, SIMD_SUM_F64 = 2, SIMD_SHUFFLE_XOR = 3 };

// Runs `fn` for every thread of the grid, threadgroup by threadgroup, each thread a coroutine
// that yields at barriers and SIMD-group collectives. Returns the number of errors found.
int run_grid(const unsigned grid[3], const unsigned group[3], LaneFn fn, void* ctx);

void barrier(int flags, int site);
double simd_collective(int op, double value, unsigned arg, int site);

int lane_index();     // thread_index_in_threadgroup of the running thread
int global_thread();  // a unique index of the running thread in the grid
int epoch();          // memory epoch of the running threadgroup: +1 per threadgroup-memory barrier

void register_threadgroup_array(void* array, void (*poison)(void*), long bytes, bool* used);
void report(const char* what, const char* buffer, long index);

int error_count();
const char* first_error();

}  // namespace kssm_emu
