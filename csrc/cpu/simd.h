// What the CPU kernels share to run vectorised on every x86-64 level from one build: function attributes, explicit
// SIMD vector types, and the choice of the widest instruction set the running CPU has.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>

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
