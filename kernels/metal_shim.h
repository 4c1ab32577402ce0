// metal_shim.h: the part of the Metal Shading Language that the kernel bodies in this folder use,
// written for g++ so that `python -m mlx_kssm.kernels.emulate` can compile and run every body on
// a CPU. It is deliberately small: a body that uses anything else (another math function, a
// half, a texture, an atomic, an unqualified `sin`, a threadgroup pointer) does not compile.
//
// Modelled (see README.md for what each model does and does not capture):
//   address spaces   device / constant / thread (no effect); threadgroup array declarations
//                    (rewritten by the emulator to shared, poisoned, race-checked arrays)
//   types            uint, ushort, uint3 (member access only), float; double only in the
//                    emulator's float64 build (KSSM_EMULATE_FP64), which Metal does not have
//   math             metal::sin, cos, exp, sqrt, abs, min, max (IEEE libm, not Metal's ULP bounds)
//   synchronisation  metal::threadgroup_barrier(metal::mem_flags::...)
//   SIMD groups      metal::simd_sum, metal::simd_shuffle_xor (32 lanes, all lanes active)
//   buffers          every input is a bounds-checked read-only view; every output element
//                    records the thread that wrote it (two writers, a read of an element the
//                    reading thread did not write, an element never written: all errors)
#pragma once

#include "emulate_abi.h"

#define device
#define constant
#define thread
#ifdef KSSM_SYNTAX_ONLY
// Only for checking that MLX's exact generated text compiles; that build is never run.
#define threadgroup
#endif

typedef unsigned int uint;
typedef unsigned short ushort;

struct uint3 {
  uint x, y, z;
};

namespace metal {

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

inline float sin(float x) { return __builtin_sinf(x); }
inline float cos(float x) { return __builtin_cosf(x); }
inline float exp(float x) { return __builtin_expf(x); }
inline float sqrt(float x) { return __builtin_sqrtf(x); }
inline float abs(float x) { return __builtin_fabsf(x); }
inline float min(float a, float b) { return __builtin_fminf(a, b); }
inline float max(float a, float b) { return __builtin_fmaxf(a, b); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a < b ? b : a; }
inline uint min(uint a, uint b) { return a < b ? a : b; }
inline uint max(uint a, uint b) { return a < b ? b : a; }

#ifdef KSSM_EMULATE_FP64
inline double sin(double x) { return __builtin_sin(x); }
inline double cos(double x) { return __builtin_cos(x); }
inline double exp(double x) { return __builtin_exp(x); }
inline double sqrt(double x) { return __builtin_sqrt(x); }
inline double abs(double x) { return __builtin_fabs(x); }
inline double min(double a, double b) { return __builtin_fmin(a, b); }
inline double max(double a, double b) { return __builtin_fmax(a, b); }
#endif

// Every thread of the threadgroup must reach the same barrier (the emulator checks it).
inline void threadgroup_barrier(mem_flags flags, int site = __builtin_LINE()) {
  kssm_emu::barrier(static_cast<int>(flags), site);
}

// SIMD-group collectives: every lane of the 32-lane group must take part (checked).
inline float simd_sum(float value, int site = __builtin_LINE()) {
  return static_cast<float>(kssm_emu::simd_collective(kssm_emu::SIMD_SUM_F32, value, 0, site));
}
inline float simd_shuffle_xor(float value, ushort mask, int site = __builtin_LINE()) {
  return static_cast<float>(
      kssm_emu::simd_collective(kssm_emu::SIMD_SHUFFLE_XOR, value, mask, site));
}
#ifdef KSSM_EMULATE_FP64
inline double simd_sum(double value, int site = __builtin_LINE()) {
  return kssm_emu::simd_collective(kssm_emu::SIMD_SUM_F64, value, 0, site);
}
inline double simd_shuffle_xor(double value, ushort mask, int site = __builtin_LINE()) {
  return kssm_emu::simd_collective(kssm_emu::SIMD_SHUFFLE_XOR, value, mask, site);
}
#endif

}  // namespace metal

namespace kssm_emu {

template <typename T>
T poison_value();
template <>
inline float poison_value<float>() { return __builtin_nanf(""); }
template <>
inline double poison_value<double>() { return __builtin_nan(""); }
template <>
inline int poison_value<int>() { return -2147483647; }

// A read-only device/constant buffer: indexing only (no pointer arithmetic, no address-of).
template <typename T>
class in_ptr {
 public:
  in_ptr(const T* data, const BufferInfo* info) : data_(data), info_(info) {}
  T operator[](long i) const {
    if (i < 0 || i >= info_->size) {
      report("read out of bounds of", info_->name, i);
      return poison_value<T>();
    }
    return data_[i];
  }

 private:
  const T* data_;
  const BufferInfo* info_;
};

// One element of an output buffer: writes record the writing thread; a read must be of an
// element the same thread wrote (MLX does not initialise outputs, and threads of a dispatch
// cannot see each other's device writes in any defined order).
template <typename T>
class out_ref {
 public:
  out_ref(T* slot, int* writer, const BufferInfo* info, long index)
      : slot_(slot), writer_(writer), info_(info), index_(index) {}
  out_ref& operator=(T value) {
    if (slot_ == nullptr) return *this;
    const int me = global_thread();
    if (*writer_ != -1 && *writer_ != me) report("two threads write one element of", info_->name, index_);
    *writer_ = me;
    *slot_ = value;
    return *this;
  }
  out_ref& operator=(const out_ref& other) { return *this = static_cast<T>(other); }
  out_ref& operator+=(T value) { return *this = static_cast<T>(*this) + value; }
  operator T() const {
    if (slot_ == nullptr) return poison_value<T>();
    if (*writer_ != global_thread()) {
      report("read of an element this thread did not write, in", info_->name, index_);
      return poison_value<T>();
    }
    return *slot_;
  }

 private:
  T* slot_;
  int* writer_;
  const BufferInfo* info_;
  long index_;
};

template <typename T>
class out_ptr {
 public:
  out_ptr(T* data, const BufferInfo* info) : data_(data), info_(info) {}
  out_ref<T> operator[](long i) const {
    if (i < 0 || i >= info_->size) {
      report("write or read out of bounds of", info_->name, i);
      return out_ref<T>(nullptr, nullptr, info_, i);
    }
    return out_ref<T>(data_ + i, info_->writers + i, info_, i);
  }

 private:
  T* data_;
  const BufferInfo* info_;
};

// `threadgroup T name[SIZE];` in a body becomes `KSSM_TG_ARRAY(T, name, SIZE);`: one array shared
// by the threads of a threadgroup (a function-local static: the threads of one threadgroup run as
// coroutines of one OS thread, threadgroup after threadgroup), refilled with NaN and marked
// unwritten before every threadgroup. Within one memory epoch (between two barriers with
// mem_threadgroup), an element written by one thread and read or written by another is a race.
template <typename T, long N>
class TgArray {
 public:
  explicit TgArray(const char* name) : name_(name) {
    register_threadgroup_array(this, &poison_all, static_cast<long>(sizeof(T)) * N, &used_);
    poison();
  }
  class Ref {
   public:
    Ref(TgArray* array, long index) : array_(array), index_(index) {}
    operator T() const { return array_ ? array_->read(index_) : poison_value<T>(); }
    Ref& operator=(T value) {
      if (array_) array_->write(index_, value);
      return *this;
    }
    Ref& operator=(const Ref& other) { return *this = static_cast<T>(other); }
    Ref& operator+=(T value) { return *this = static_cast<T>(*this) + value; }

   private:
    TgArray* array_;
    long index_;
  };
  Ref operator[](long i) {
    used_ = true;
    if (i < 0 || i >= N) {
      report("out of bounds of threadgroup array", name_, i);
      return Ref(nullptr, i);
    }
    return Ref(this, i);
  }

 private:
  static constexpr int kManyReaders = -2;
  static void poison_all(void* self) { static_cast<TgArray*>(self)->poison(); }
  void poison() {
    for (long i = 0; i < N; i++) {
      data_[i] = poison_value<T>();
      writer_[i] = reader_[i] = -1;
      write_epoch_[i] = read_epoch_[i] = -1;
    }
  }
  T read(long i) {
    const int me = lane_index(), now = epoch();
    if (writer_[i] == -1) {
      report("race or uninitialised read: no thread wrote (before a barrier) the element of", name_, i);
      return poison_value<T>();
    }
    if (write_epoch_[i] == now && writer_[i] != me)
      report("race: read without a barrier after another thread's write to", name_, i);
    if (read_epoch_[i] != now) {
      read_epoch_[i] = now;
      reader_[i] = me;
    } else if (reader_[i] != me) {
      reader_[i] = kManyReaders;
    }
    return data_[i];
  }
  void write(long i, T value) {
    const int me = lane_index(), now = epoch();
    if (write_epoch_[i] == now && writer_[i] != me)
      report("race: two threads write without a barrier between them to", name_, i);
    if (read_epoch_[i] == now && reader_[i] != me)
      report("race: write without a barrier after another thread's read of", name_, i);
    write_epoch_[i] = now;
    writer_[i] = me;
    data_[i] = value;
  }

  const char* name_;
  bool used_ = false;
  T data_[N];
  int writer_[N], reader_[N], write_epoch_[N], read_epoch_[N];
};

}  // namespace kssm_emu

#define KSSM_TG_ARRAY(T, name, size) static ::kssm_emu::TgArray<T, (size)> name(#name)
