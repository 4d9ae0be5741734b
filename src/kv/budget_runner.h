// One sequence read and extended under a KV budget policy: the loop that gathers attention
// statistics, asks the policy which slots to keep, and compacts the KV.
//
//   Prefill(prompt): the budget is fixed: B >= 1 tokens as given, a fraction B < 1 of the
//     prompt's length. A policy with block-wise prefill, or any prompt longer than the context
//     under a policy that reassigns positions, is read in blocks of the budget, compacting
//     after each block (peak KV: budget + block); otherwise the whole prompt is read with full attention
//     and compacted once at the end (the SnapKV family's observation window is then the
//     prompt's last tokens). A cascading policy (CAKE) reads that whole prompt a layer at a
//     time instead, compacting the layers read so far after each (Engine::ForwardLayerMajor),
//     so its peak is near the budget too.
//   Step(tokens): decode (or score) tokens after the prompt; once `slack` tokens have been
//     added since the last compaction the policy runs again, so the KV stays within budget +
//     slack.
//
// Statistics are collected only as the policy asks (window, cumulative). The window sums are
// cleared after each compaction, so a decode-time selection sees the queries since the last.
//
// Thread-safety: one caller; uses the engine (one Forward at a time per Engine).
#pragma once

#include <cstdint>
#include <memory>
#include <span>

#include "cachette/status.h"
#include "engine/engine.h"
#include "engine/kv_budget.h"
#include "kv/kv_policy.h"

namespace cachette {

// The budget in tokens a config gives a prompt of `length` tokens: B >= 1 tokens as given
// (truncated), a fraction B < 1 of the length (BudgetTokens).
int64_t ResolveBudgetTokens(const KvPolicyConfig& config, int64_t length);
// Tokens per prefill block, or 0 to read the whole prompt at once: blocks for a policy with
// block-wise prefill, or a prompt longer than the context (under a policy that reassigns
// positions; the block then leaves room for the budget within the context). A prompt within
// the budget is always read at once.
// (Valid once CheckPolicyPrompt passed.)
int64_t PrefillBlock(const KvPolicy& policy, int64_t budget, int64_t prompt_len, int64_t ctx);
// kInvalidArgument (a client's 400) for a prompt longer than the context under a policy that
// keeps positions, or with a budget leaving no room for a block within the context.
Status CheckPolicyPrompt(const KvPolicy& policy, int64_t budget, int64_t prompt_len,
                         int64_t ctx);

class BudgetRunner {
 public:
  // kInvalidArgument for a bad config (ValidateKvPolicy's message).
  static Result<std::unique_ptr<BudgetRunner>> Create(Engine& engine,
                                                      const KvPolicyConfig& config,
                                                      int slack = 16);

  // Reads the prompt (see above) into a fresh sequence, reserving room for `max_new` more
  // tokens when the policy never compacts them away. `last_logits` (may be null) receives the
  // last prompt token's logits. kInvalidArgument when the prompt is longer than the context
  // and the policy cannot read it.
  Status Prefill(std::span<const TokenId> prompt, float* last_logits);

  // Adds tokens after the prompt (a decode step or a scoring block) with logits per `mode`,
  // then compacts if due. The tokens must fit in `slack` (one block) plus what is free.
  Status Step(std::span<const TokenId> tokens, Engine::Logits mode, float* logits);

  // Starts over with an already computed prefix: copies `src`'s first n tokens, with the
  // statistics gathered while computing them (may be null), and compacts to the budget for
  // that length. Used by the evaluation harness to share one exact prefill between policies.
  Status StartFrom(const SequenceKv& src, int64_t n, const AttentionStats* stats);

  const KvPolicy& policy() const { return *policy_; }
  const KvPolicyConfig& config() const { return config_; }
  ContiguousKv* kv() { return kv_.get(); }
  int64_t budget_tokens() const { return budget_; }
  // Slots held now, summed over layers, divided by the layer count (the kept size a client
  // sees as kv_tokens_kept), and the largest that has been held.
  int64_t kept_tokens() const;
  int64_t peak_kept_tokens() const { return peak_; }
  int64_t compactions() const { return compactions_; }
  // Statistics a caller must collect for this policy during an exact prefill it will hand to
  // StartFrom: window (0 = none) and cumulative.
  int stats_window() const { return policy_->stats_window(); }
  bool stats_cumulative() const { return policy_->stats_cumulative(); }

 private:
  BudgetRunner(Engine& engine, const KvPolicyConfig& config, std::unique_ptr<KvPolicy> policy,
               int slack);
  Status Forward(std::span<const TokenId> tokens, Engine::Logits mode, float* logits);
  // layers_seen: a cascade's stage (KvPolicyInput::layers_seen; 0 = every layer).
  Status Compact(int layers_seen = 0);
  int64_t ResolveBudget(int64_t length) const;
  void NewSequence(int64_t capacity);

  Engine& engine_;
  KvPolicyConfig config_;
  std::unique_ptr<KvPolicy> policy_;
  int slack_;
  std::unique_ptr<ContiguousKv> kv_;
  AttentionStats stats_;
  int64_t budget_ = 0;
  int64_t since_compaction_ = 0;
  int64_t peak_ = 0;
  int64_t compactions_ = 0;
};

}  // namespace cachette
