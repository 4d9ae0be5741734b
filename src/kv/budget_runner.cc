#include "kv/budget_runner.h"

#include <algorithm>
#include <string>

namespace cachette {

int64_t ResolveBudgetTokens(const KvPolicyConfig& config, int64_t length) {
  // A token budget holds from the start; a fraction applies to the length it is given.
  if (config.budget >= 1) return static_cast<int64_t>(config.budget);
  return BudgetTokens(config.budget, length);
}

int64_t PrefillBlock(const KvPolicy& policy, int64_t budget, int64_t prompt_len, int64_t ctx) {
  const bool past_context = prompt_len > ctx;
  if (!(policy.blockwise_prefill() || past_context) || prompt_len <= budget) return 0;
  int64_t block = budget;
  if (policy.reassigns_positions()) block = std::min(block, ctx - budget);
  return block;
}

Status CheckPolicyPrompt(const KvPolicy& policy, int64_t budget, int64_t prompt_len,
                         int64_t ctx) {
  if (prompt_len <= ctx) return Status::Ok();
  if (!policy.reassigns_positions()) {
    return InvalidArgument("the prompt has " + std::to_string(prompt_len) +
                           " tokens but the context holds " + std::to_string(ctx) + "; only a " +
                           "policy that reassigns positions (streamingllm, lacache) reads past " +
                           "the context");
  }
  if (budget >= ctx) {
    return InvalidArgument("kv_policy.budget: " + std::to_string(budget) +
                           " tokens leave no room to read a prompt longer than the context of " +
                           std::to_string(ctx) + " in blocks");
  }
  return Status::Ok();
}

Result<std::unique_ptr<BudgetRunner>> BudgetRunner::Create(Engine& engine,
                                                           const KvPolicyConfig& config,
                                                           int slack) {
  if (slack < 1) return InvalidArgument("slack must be >= 1");
  CT_ASSIGN_OR_RETURN(auto policy, MakeKvPolicy(config));
  return std::unique_ptr<BudgetRunner>(
      new BudgetRunner(engine, config, std::move(policy), slack));
}

BudgetRunner::BudgetRunner(Engine& engine, const KvPolicyConfig& config,
                           std::unique_ptr<KvPolicy> policy, int slack)
    : engine_(engine), config_(config), policy_(std::move(policy)), slack_(slack) {}

void BudgetRunner::NewSequence(int64_t capacity) {
  kv_ = std::make_unique<ContiguousKv>(engine_.kv_shape(), capacity);
  stats_ = AttentionStats{};
  stats_.window = policy_->stats_window();
  stats_.cumulative = policy_->stats_cumulative();
  since_compaction_ = peak_ = compactions_ = 0;
}

int64_t BudgetRunner::kept_tokens() const {
  if (!kv_) return 0;
  const int layers = kv_->shape().n_layer;
  return (kv_->total_slots() + layers - 1) / layers;
}

Status BudgetRunner::Forward(std::span<const TokenId> tokens, Engine::Logits mode,
                             float* logits) {
  const int64_t need = kv_->n_tokens() + static_cast<int64_t>(tokens.size());
  if (need > kv_->capacity()) {
    kv_->Grow(std::max(need, kv_->capacity() + kv_->capacity() / 2));
    const KvShape& s = kv_->shape();
    if (stats_.n_layer > 0) stats_.Resize(s.n_layer, s.n_kv_head, kv_->capacity());
  }
  Engine::Item item{kv_.get(), tokens, mode, logits};
  if (stats_.window > 0 || stats_.cumulative) item.stats = &stats_;
  CT_RETURN_IF_ERROR(engine_.Forward(std::span<Engine::Item>(&item, 1)));
  since_compaction_ += static_cast<int64_t>(tokens.size());
  peak_ = std::max(peak_, kept_tokens());
  return Status::Ok();
}

Status BudgetRunner::Compact(int layers_seen) {
  const int n_layer = kv_->shape().n_layer;
  const bool have_stats = stats_.n_layer == n_layer && stats_.capacity == kv_->capacity();
  const KeepPlan plan =
      policy_->Select(PolicyInputFor(*kv_, budget_, have_stats ? &stats_ : nullptr, layers_seen));
  const kernels::RopeParams& rope = engine_.model().config().rope;
  CT_RETURN_IF_ERROR(kv_->Compact(plan, rope, have_stats ? &stats_ : nullptr)
                         .WithContext("policy " + std::string(policy_->name())));
  // A cascade's later stages compact the layers read so far again, by the same window.
  if (layers_seen == 0 || layers_seen == n_layer) stats_.ClearWindow();
  since_compaction_ = 0;
  ++compactions_;
  return Status::Ok();
}

int64_t BudgetRunner::ResolveBudget(int64_t length) const {
  return ResolveBudgetTokens(config_, length);
}

Status BudgetRunner::Prefill(std::span<const TokenId> prompt, float* last_logits) {
  const int64_t n = static_cast<int64_t>(prompt.size());
  if (n == 0) return InvalidArgument("the prompt is empty");
  const int64_t ctx = engine_.model().config().n_ctx_train;
  budget_ = ResolveBudget(n);
  CT_RETURN_IF_ERROR(CheckPolicyPrompt(*policy_, budget_, n, ctx));
  const int64_t block = PrefillBlock(*policy_, budget_, n, ctx);
  if (block == 0 && policy_->cascades()) {
    NewSequence(n + slack_);
    // Stage l + 1 once layer l is read: the layers read so far share the budget; the last
    // stage (every layer) is the prompt's compaction.
    auto stage = [&](int layer) {
      peak_ = std::max(peak_, kept_tokens());
      return Compact(layer + 1);
    };
    AttentionStats* stats = stats_.window > 0 || stats_.cumulative ? &stats_ : nullptr;
    return engine_.ForwardLayerMajor(*kv_, prompt, last_logits, stats, stage);
  }
  if (block == 0) {
    NewSequence(n + slack_);
    CT_RETURN_IF_ERROR(Forward(prompt, last_logits ? Engine::Logits::kLast : Engine::Logits::kNone,
                               last_logits));
    return Compact();
  }
  // Blocks of the budget (so that budget + block fits in the context when positions are
  // reassigned), compacting after each.
  NewSequence(budget_ + block);
  for (int64_t i = 0; i < n; i += block) {
    const int64_t m = std::min(block, n - i);
    const bool last = i + m == n;
    const Engine::Logits mode =
        last && last_logits ? Engine::Logits::kLast : Engine::Logits::kNone;
    CT_RETURN_IF_ERROR(Forward(prompt.subspan(i, m), mode, last ? last_logits : nullptr));
    CT_RETURN_IF_ERROR(Compact());
  }
  return Status::Ok();
}

Status BudgetRunner::Step(std::span<const TokenId> tokens, Engine::Logits mode, float* logits) {
  if (!kv_) return InvalidArgument("Step before Prefill");
  if (tokens.empty()) return InvalidArgument("no tokens");
  const int64_t count = static_cast<int64_t>(tokens.size());
  // Compact first when these tokens would take the KV past budget + slack, or (positions
  // reassigned) past the context.
  const int64_t ctx = engine_.model().config().n_ctx_train;
  if (since_compaction_ > 0 &&
      (since_compaction_ + count > slack_ || kv_->next_position() + count > ctx)) {
    CT_RETURN_IF_ERROR(Compact());
  }
  return Forward(tokens, mode, logits);
}

Status BudgetRunner::StartFrom(const SequenceKv& src, int64_t n, const AttentionStats* stats) {
  if (n <= 0) return InvalidArgument("StartFrom needs at least one token");
  budget_ = ResolveBudget(n);
  NewSequence(n + slack_);
  CT_RETURN_IF_ERROR(kv_->CopyFrom(src, n));
  if (stats != nullptr && stats->n_layer > 0) {
    const int window = stats_.window;
    const bool cumulative = stats_.cumulative;
    stats_ = *stats;
    stats_.window = window;
    stats_.cumulative = cumulative;
    const KvShape& s = kv_->shape();
    stats_.Resize(s.n_layer, s.n_kv_head, kv_->capacity());
    // Slots past n belong to the source's later tokens.
    for (int l = 0; l < s.n_layer; ++l) {
      for (int h = 0; h < s.n_kv_head; ++h) {
        std::fill(stats_.WinSum(l, h) + n, stats_.WinSum(l, h) + stats_.capacity, 0.0f);
        std::fill(stats_.WinSq(l, h) + n, stats_.WinSq(l, h) + stats_.capacity, 0.0f);
        std::fill(stats_.Cum(l, h) + n, stats_.Cum(l, h) + stats_.capacity, 0.0f);
      }
    }
  }
  peak_ = kept_tokens();
  return Compact();
}

}  // namespace cachette
