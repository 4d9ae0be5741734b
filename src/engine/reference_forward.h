// A float64 reference forward pass, written for obviousness rather than speed: every weight
// is dequantized by its own code here (not the kernels'), every sum is in double, attention is
// the textbook softmax(QK^T/sqrt(d))V with a causal mask. Tests compare the engine against it.
#pragma once

#include <vector>

#include "model/model.h"

namespace cachette::testing {

// Logits [tokens.size()][n_vocab] for every position of `tokens` (positions 0..n-1).
std::vector<std::vector<double>> ReferenceForward(const Model& model,
                                                  const std::vector<TokenId>& tokens);

// Relative L2 error ||a - b|| / ||b||.
double RelativeL2(const std::vector<float>& a, const std::vector<double>& b);

}  // namespace cachette::testing
