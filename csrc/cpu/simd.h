// What the CPU kernels share to run vectorised on every x86-64 level from one build: function attributes, explicit
// SIMD vector types, and the choice of the widest instruction set the running CPU has.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

// The compiler emits AVX-512 and AVX2 copies of a FASTDD_CPU_CLONES function next to the baseline one, and the
// loader picks the best for the running CPU.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTDD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTDD_CPU_CLONES
#endif

#if defined(__GNUC__)
#define FASTDD_ALWAYS_INLINE inline __attribute__((always_inline))
#define FASTDD_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))
#else
#define FASTDD_ALWAYS_INLINE inline
#define FASTDD_ALWAYS_INLINE_LAMBDA
#endif

namespace fastdd {

// Explicit SIMD vectors (GCC/Clang vector extensions) of `Bytes` bytes: 64 for AVX-512, 32 for AVX2, 16 for SSE2 and
// NEON. Other compilers get plain scalars. The vectors never cross a function boundary (everything is inlined into
// one per-ISA function), so GCC's note that passing them would change the ABI does not apply.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
#if defined(__GNUC__)
template <typename T, int Bytes>
struct Simd {
  typedef T type __attribute__((vector_size(Bytes)));
  static constexpr int64_t lanes = Bytes / sizeof(T);
};
#else
template <typename T, int Bytes>
struct Simd {
  using type = T;
  static constexpr int64_t lanes = 1;
};
#endif

// A vector or scalar P from / to unaligned memory (through memcpy, so rows need no alignment).
template <typename P, typename T>
FASTDD_ALWAYS_INLINE P load(const T* source) {
  P value;
  std::memcpy(&value, source, sizeof(P));
  return value;
}

template <typename P, typename T>
FASTDD_ALWAYS_INLINE void store(T* target, const P& value) {
  std::memcpy(target, &value, sizeof(P));
}

// Half-precision storage: a kernel templated on its storage type S loads S values, computes and accumulates in
// compute_t<S> (float for bfloat16 and float16, S itself for float and double), and stores S values.
template <typename S>
struct ComputeType {
  using type = S;
};
template <>
struct ComputeType<c10::BFloat16> {
  using type = float;
};
template <>
struct ComputeType<c10::Half> {
  using type = float;
};
template <typename S>
using compute_t = typename ComputeType<S>::type;

// out[k] = float(in[k]), k < n, for bfloat16 (exact: the 16 bits become the float's top half) or float16 (exact).
// Inlined into the caller's per-ISA copy, so the bfloat16 loop runs on that copy's vectors.
template <int Bytes>
FASTDD_ALWAYS_INLINE void widen(const c10::BFloat16* in, int64_t n, float* out) {
  int64_t k = 0;
#if defined(__GNUC__)
  using Bits = typename Simd<uint16_t, Bytes / 2>::type;
  using Wide = typename Simd<uint32_t, Bytes>::type;
  using Floats = typename Simd<float, Bytes>::type;
  constexpr int64_t lanes = Simd<float, Bytes>::lanes;
  for (; k + lanes <= n; k += lanes) {
    const Wide bits = __builtin_convertvector(load<Bits>(in + k), Wide) << 16;
    store(out + k, (Floats)bits);  // a vector cast reinterprets the bits
  }
#endif
  for (; k < n; ++k) out[k] = static_cast<float>(in[k]);
}

template <int Bytes>
FASTDD_ALWAYS_INLINE void widen(const c10::Half* in, int64_t n, float* out) {
  int64_t k = 0;
#if defined(__GNUC__) && defined(__FLT16_MAX__)
  // The compiler's _Float16 vectors: F16C instructions in the AVX2 and AVX-512 copies (c10::Half's bit arithmetic
  // does not vectorise); IEEE conversions, so the values are c10::Half's.
  using Halves = typename Simd<_Float16, Bytes / 2>::type;
  using Floats = typename Simd<float, Bytes>::type;
  constexpr int64_t lanes = Simd<float, Bytes>::lanes;
  for (; k + lanes <= n; k += lanes) store(out + k, __builtin_convertvector(load<Halves>(in + k), Floats));
#endif
  for (; k < n; ++k) out[k] = static_cast<float>(in[k]);
}

// out[k] = in[k] rounded to the nearest bfloat16 (ties to even; NaN stays a quiet NaN), as c10::BFloat16(float).
template <int Bytes>
FASTDD_ALWAYS_INLINE void narrow(const float* in, int64_t n, c10::BFloat16* out) {
  int64_t k = 0;
#if defined(__GNUC__)
  using Bits = typename Simd<uint16_t, Bytes / 2>::type;
  using Wide = typename Simd<uint32_t, Bytes>::type;
  using Floats = typename Simd<float, Bytes>::type;
  constexpr int64_t lanes = Simd<float, Bytes>::lanes;
  for (; k + lanes <= n; k += lanes) {
    const Floats value = load<Floats>(in + k);
    const Wide bits = (Wide)value;
    const Wide rounded = (bits + ((bits >> 16) & 1u) + 0x7FFFu) >> 16;
    const Wide nan = (Wide)(value != value);  // all ones where NaN
    store(out + k, __builtin_convertvector((rounded & ~nan) | (nan & 0x7FC0u), Bits));
  }
#endif
  for (; k < n; ++k) out[k] = c10::BFloat16(in[k]);
}

// out[k] = in[k] rounded to the nearest float16 (ties to even), as c10::Half(float).
template <int Bytes>
FASTDD_ALWAYS_INLINE void narrow(const float* in, int64_t n, c10::Half* out) {
  int64_t k = 0;
#if defined(__GNUC__) && defined(__FLT16_MAX__)
  using Halves = typename Simd<_Float16, Bytes / 2>::type;
  using Floats = typename Simd<float, Bytes>::type;
  constexpr int64_t lanes = Simd<float, Bytes>::lanes;
  for (; k + lanes <= n; k += lanes) store(out + k, __builtin_convertvector(load<Floats>(in + k), Halves));
#endif
  for (; k < n; ++k) out[k] = c10::Half(in[k]);
}

// A map of S values as compute_t<S> values: the map itself when S is the compute type, else widened into buffer.
template <int Bytes, typename S>
FASTDD_ALWAYS_INLINE const compute_t<S>* as_compute(const S* map, int64_t n, compute_t<S>* buffer) {
  if constexpr (std::is_same_v<S, compute_t<S>>) {
    return map;
  } else {
    widen<Bytes>(map, n, buffer);
    return buffer;
  }
}

// Where a kernel writes the compute_t<S> results meant for a map of S values: the map itself when S is the compute
// type, else buffer, which store_computed then narrows into the map.
template <typename S>
FASTDD_ALWAYS_INLINE compute_t<S>* compute_target(S* map, compute_t<S>* buffer) {
  if constexpr (std::is_same_v<S, compute_t<S>>) {
    return map;
  } else {
    return buffer;
  }
}

template <int Bytes, typename S>
FASTDD_ALWAYS_INLINE void store_computed(const compute_t<S>* target, int64_t n, S* map) {
  if constexpr (!std::is_same_v<S, compute_t<S>>) {
    narrow<Bytes>(target, n, map);
  }
}

enum class SimdLevel { baseline, avx2, avx512 };

// The widest x86-64 level of the running CPU (x86-64-v4: AVX-512 F/BW/CD/DQ/VL; x86-64-v3: AVX2 + FMA), read once.
// ATEN_CPU_CAPABILITY=default or avx2 caps it, as it does for PyTorch's own kernels (the tests use it to run the
// narrower copies on a machine that has AVX-512).
inline SimdLevel simd_level_for_this_cpu() {
  static const SimdLevel level = [] {
#if defined(__GNUC__) && defined(__x86_64__)
    const char* requested = std::getenv("ATEN_CPU_CAPABILITY");
    const std::string cap = requested == nullptr ? "" : requested;
    __builtin_cpu_init();
    if (cap != "default" && cap != "avx2" && __builtin_cpu_supports("x86-64-v4")) return SimdLevel::avx512;
    if (cap != "default" && __builtin_cpu_supports("x86-64-v3")) return SimdLevel::avx2;
#endif
    return SimdLevel::baseline;
  }();
  return level;
}

}  // namespace fastdd
