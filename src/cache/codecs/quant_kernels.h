// Inner loops of the lossy KV codecs (docs/formats/codecs.md), in a scalar reference and AVX2
// and AVX-512 versions picked at run time. All compute bit-identical outputs: the same f32
// operations in the same order (no FMA contraction: the project builds with -std=c++20, which
// implies -ffp-contract=off), round-half-even everywhere, directed f16 rounding for scales and
// minima. codecs_test checks each fast table against the scalar one on random input.
//
// Pointers to f16 parameters and codes are byte pointers with no alignment requirement: the
// sections of a payload start wherever the previous one ended.
#pragma once

#include <cstddef>
#include <cstdint>

namespace cachette::cache::codecs {

// The largest finite f16; lossy codecs refuse inputs beyond it (and non-finite ones).
inline constexpr float kF16Max = 65504.0f;

struct QuantKernels {
  const char* name;  // "scalar", "avx2", "avx512"

  void (*f16_to_f32)(const std::byte* src, float* dst, size_t n);
  // Round to nearest even (the decoded f16 output).
  void (*f32_to_f16)(const float* src, std::byte* dst, size_t n);

  // Symmetric int8 of n_vec vectors of dim elements: scales [n_vec] f16, codes [n_vec][dim].
  // Returns false if some x is non-finite or |x| > kF16Max (outputs then unspecified).
  bool (*int8_encode)(const float* x, size_t n_vec, size_t dim, std::byte* scales,
                      int8_t* codes);
  void (*int8_decode)(const std::byte* scales, const int8_t* codes, size_t n_vec, size_t dim,
                      float* out);

  // Affine 4-bit along rows: x [n_rows][dim] in groups of `group` consecutive elements of a row
  // (last group of a row partial). scales/mins [n_rows][ceil(dim/group)] f16, codes
  // [n_rows][dim/2]. dim is even. Returns false on out-of-range input, like int8_encode.
  bool (*affine4_rows_encode)(const float* x, size_t n_rows, size_t dim, size_t group,
                              std::byte* scales, std::byte* mins, uint8_t* codes);
  void (*affine4_rows_decode)(const std::byte* scales, const std::byte* mins,
                              const uint8_t* codes, size_t n_rows, size_t dim, size_t group,
                              float* out);

  // Affine 4-bit down columns: x [n_rows][n_cols] is one group per column (n_rows <= 32 tokens
  // of a KIVI key group). scales/mins [n_cols] f16, codes [n_rows][n_cols/2]. n_cols is even.
  bool (*affine4_cols_encode)(const float* x, size_t n_rows, size_t n_cols, std::byte* scales,
                              std::byte* mins, uint8_t* codes);
  void (*affine4_cols_decode)(const std::byte* scales, const std::byte* mins,
                              const uint8_t* codes, size_t n_rows, size_t n_cols, float* out);
};

// The scalar reference, always available.
const QuantKernels& ScalarQuantKernels();
// The AVX-512 (F+BW) table, or nullptr if this CPU lacks it.
const QuantKernels* Avx512QuantKernels();
// The AVX2 (+F16C, no FMA) table, or nullptr if this CPU lacks AVX2 or F16C.
const QuantKernels* Avx2QuantKernels();
// The AVX2 table without the CPU check (quant_kernels_avx2.cc; call Avx2QuantKernels()).
const QuantKernels& Avx2QuantKernelsTable();
// The fastest table this CPU runs: AVX-512, else AVX2, else scalar. Chosen once, on first
// call; safe to call concurrently.
const QuantKernels& BestQuantKernels();

}  // namespace cachette::cache::codecs
