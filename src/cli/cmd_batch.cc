// `cachette batch -i requests.jsonl -o results.jsonl`: an offline batch in the OpenAI Batch
// API's line formats, run through the same serving stack as `cachette serve` (serving_stack.h:
// the same model, engine, KV, store and scheduler flags) in BatchLLM's order (batch_runner.h),
// or in file order through the online scheduler (--order fcfs, the baseline).
//
// Input, one request a line (blank lines are not requests and are skipped):
//   {"custom_id": "q1", "method": "POST", "url": "/v1/chat/completions" | "/v1/completions",
//    "body": {...the body the endpoint takes...}}
// Each body goes through server::ParseGenerate, exactly as the server parses it (chat template,
// every field validated, "model" must name the served model); "stream" is ignored (results
// are whole).
//
// Output, one line per request line, in input order:
//   {"id": "batch_req_<n>", "custom_id": "q1", "response": {"status_code": 200,
//    "request_id": "req_<n>", "body": <what the endpoint returns>}, "error": null}
// or, for a line that fails (not JSON, custom_id missing or repeated, wrong method or url, a
// body the parser rejects, a request the scheduler rejects or that fails while running):
//   {"id": "batch_req_<n>", "custom_id": "q1" | null, "response": null,
//    "error": {"code": "...", "message": "line <n>: ..."}}
// where <n> is the line's number in the input file. A failing line never stops the batch.
// Codes: invalid_json_line, missing_custom_id, duplicate_custom_id, invalid_method,
// invalid_url, invalid_body; for a body the parser rejects, the OpenAI code it names (e.g.
// model_not_found) or the Status code's name (e.g. InvalidArgument), as the server's error
// bodies do; for a request that fails to run, the Status code's name.
//
// The output is written to "<output>.tmp-<pid>" as lines complete (in order) and renamed to
// <output> only once every line is in it, so a crash never leaves a partial file under the
// final name. A progress bar goes to stderr when it is a terminal (else a line every 5 s); the
// summary goes to stdout (--json: one JSON object).
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <variant>

#include "cli/batch_runner.h"
#include "cli/cli.h"
#include "cli/serving_stack.h"
#include "core/log.h"
#include "core/timer.h"
#include "server/openai.h"

namespace cachette::cli {
namespace {

using nlohmann::json;

constexpr const char* kChatUrl = "/v1/chat/completions";
constexpr const char* kCompletionUrl = "/v1/completions";

struct BatchFlags {
  ServeFlags stack;
  std::string input, output;
  std::string order = "batchllm";
  int64_t min_prefix_tokens = 16;
  bool json = false;
};

// A request line of the input file.
struct Line {
  int64_t number = 0;  // in the file, from 1
  std::string text;
  json custom_id;  // the string, or null when there is none
  server::Endpoint endpoint = server::Endpoint::kChat;
};

std::string ErrorLine(const Line& l, std::string_view code, const std::string& message) {
  const json j = {
      {"id", "batch_req_" + std::to_string(l.number)},
      {"custom_id", l.custom_id},
      {"response", nullptr},
      {"error",
       {{"code", code}, {"message", "line " + std::to_string(l.number) + ": " + message}}}};
  return server::Dump(j);
}

std::string ResultLine(const Line& l, const std::string& model, const JobResult& r) {
  server::GenerateCall call;  // CompletionJson reads the endpoint only
  call.endpoint = l.endpoint;
  const std::string id =
      (l.endpoint == server::Endpoint::kChat ? "chatcmpl-" : "cmpl-") + std::to_string(l.number);
  const std::string finish = server::FinishReasonName(r.finish);
  const json j = {
      {"id", "batch_req_" + std::to_string(l.number)},
      {"custom_id", l.custom_id},
      {"response",
       {{"status_code", 200},
        {"request_id", "req_" + std::to_string(l.number)},
        {"body", server::CompletionJson(call, id, static_cast<int64_t>(std::time(nullptr)), model,
                                        r.text, finish, r.usage)}}},
      {"error", nullptr}};
  return server::Dump(j);
}

// Parses line `l` into a request; on failure returns the error line instead.
std::variant<sched::SchedRequest, std::string> ParseLine(Line& l, const server::ApiContext& api,
                                                         std::set<std::string>* seen_ids) {
  json j = json::parse(l.text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return ErrorLine(l, "invalid_json_line", "not a JSON object");
  }
  auto id = j.find("custom_id");
  if (id == j.end() || !id->is_string() || id->get_ref<const std::string&>().empty()) {
    return ErrorLine(l, "missing_custom_id", "'custom_id' (a non-empty string) is required");
  }
  l.custom_id = *id;
  if (!seen_ids->insert(id->get<std::string>()).second) {
    return ErrorLine(l, "duplicate_custom_id",
                     "custom_id '" + id->get<std::string>() + "' was used on an earlier line");
  }
  auto method = j.find("method");
  if (method == j.end() || !method->is_string() || *method != "POST") {
    return ErrorLine(l, "invalid_method", "'method' must be \"POST\"");
  }
  auto url = j.find("url");
  if (url != j.end() && url->is_string() && *url == kChatUrl) {
    l.endpoint = server::Endpoint::kChat;
  } else if (url != j.end() && url->is_string() && *url == kCompletionUrl) {
    l.endpoint = server::Endpoint::kCompletion;
  } else {
    return ErrorLine(l, "invalid_url",
                     std::string("'url' must be \"") + kChatUrl + "\" or \"" + kCompletionUrl +
                         "\"" + (url != j.end() ? ", not " + server::Dump(*url) : ""));
  }
  auto body = j.find("body");
  if (body == j.end() || !body->is_object()) {
    return ErrorLine(l, "invalid_body", "'body' (a JSON object) is required");
  }
  server::ErrorDetail detail;
  auto call = server::ParseGenerate(server::Dump(*body), l.endpoint, api, &detail);
  if (!call.ok()) {
    const std::string code =
        detail.code.empty() ? std::string(StatusCodeName(call.status().code())) : detail.code;
    return ErrorLine(l, code, "body: " + call.status().message());
  }
  return std::move(call->request);
}

// Writes result lines in input order as they become known, to a temporary file that Commit()
// renames to the final name.
class OrderedWriter {
 public:
  OrderedWriter(std::string path, size_t lines)
      : path_(std::move(path)), tmp_(path_ + ".tmp-" + std::to_string(getpid())), pending_(lines) {}
  ~OrderedWriter() {
    if (file_ != nullptr) {
      std::fclose(file_);
      std::remove(tmp_.c_str());  // not committed: no half file is left behind
    }
  }

  Status Open() {
    file_ = std::fopen(tmp_.c_str(), "w");
    if (file_ == nullptr) return IOError("cannot write " + tmp_ + ": " + std::strerror(errno));
    return Status::Ok();
  }

  void Set(size_t i, std::string line) {
    pending_[i] = std::move(line);
    while (next_ < pending_.size() && pending_[next_].has_value()) {
      ok_ =
          ok_ && std::fputs(pending_[next_]->c_str(), file_) >= 0 && std::fputc('\n', file_) != EOF;
      pending_[next_].reset();
      ++next_;
    }
  }

  // Every line must have been Set.
  Status Commit() {
    const bool flushed = std::fflush(file_) == 0 && fsync(fileno(file_)) == 0;
    const bool closed = std::fclose(file_) == 0;
    file_ = nullptr;
    if (!ok_ || !flushed || !closed || next_ != pending_.size()) {
      std::remove(tmp_.c_str());
      return IOError("writing " + tmp_ + " failed: " + std::strerror(errno));
    }
    std::error_code ec;
    std::filesystem::rename(tmp_, path_, ec);
    if (ec) return IOError("renaming " + tmp_ + " to " + path_ + ": " + ec.message());
    return Status::Ok();
  }

 private:
  std::string path_, tmp_;
  std::vector<std::optional<std::string>> pending_;
  size_t next_ = 0;
  std::FILE* file_ = nullptr;
  bool ok_ = true;
};

// Progress on stderr: a bar redrawn in place on a terminal, else a line every 5 s.
class Progress {
 public:
  explicit Progress(size_t total) : total_(total), tty_(isatty(STDERR_FILENO) == 1) {}

  void Update(size_t done, size_t failed, int64_t generated) {
    const double now = clock_.Millis() * 1e-3;
    const bool last = done == total_;
    if (!last && now - shown_ < (tty_ ? 0.1 : 5.0)) return;
    shown_ = now;
    char line[200];
    std::snprintf(line, sizeof line,
                  "%zu/%zu lines, %zu failed, %lld tokens generated, %.1f tok/s, %.0f s", done,
                  total_, failed, static_cast<long long>(generated),
                  now > 0 ? static_cast<double>(generated) / now : 0.0, now);
    if (tty_) {
      constexpr int kWidth = 30;
      const int filled = total_ == 0 ? kWidth : static_cast<int>(kWidth * done / total_);
      std::fprintf(stderr, "\r[%s%s] %s%s", std::string(static_cast<size_t>(filled), '#').c_str(),
                   std::string(static_cast<size_t>(kWidth - filled), '.').c_str(), line,
                   last ? "\n" : "");
    } else {
      std::fprintf(stderr, "batch: %s\n", line);
    }
    std::fflush(stderr);
  }

 private:
  const size_t total_;
  const bool tty_;
  Stopwatch clock_;
  double shown_ = -1e9;
};

Result<std::vector<Line>> ReadLines(const std::string& path) {
  std::ifstream in(path);
  if (!in) return IOError("cannot read " + path + ": " + std::strerror(errno));
  std::vector<Line> lines;
  std::string text;
  for (int64_t n = 1; std::getline(in, text); ++n) {
    if (text.find_first_not_of(" \t\r") == std::string::npos) continue;
    lines.push_back(Line{n, std::move(text), nullptr, server::Endpoint::kChat});
  }
  if (in.bad()) return IOError("reading " + path + " failed");
  return lines;
}

int Batch(BatchFlags& f) {
  auto cfg_or = ResolveServeConfig(f.stack);
  if (!cfg_or.ok()) return Fail(cfg_or.status());
  server::ServeConfig cfg = *cfg_or;
  if (Status s = CheckStackConfig(cfg); !s.ok()) return Fail(s);  // before any file is touched
  auto lines_or = ReadLines(f.input);
  if (!lines_or.ok()) return Fail(lines_or.status());
  std::vector<Line>& lines = *lines_or;
  // Every request (and a prime per group) may wait in the scheduler's queue at once.
  cfg.max_queue = static_cast<int>(std::min<int64_t>(
      1 << 30, std::max<int64_t>(cfg.max_queue, 2 * static_cast<int64_t>(lines.size()) + 16)));
  OrderedWriter out(f.output, lines.size());
  if (Status s = out.Open(); !s.ok()) return Fail(s);

  auto stack_or = BuildServingStack(cfg);
  if (!stack_or.ok()) return Fail(stack_or.status());
  ServingStack& stack = **stack_or;

  Stopwatch wall;
  std::set<std::string> seen_ids;
  std::vector<sched::SchedRequest> jobs;
  std::vector<size_t> line_of_job;
  size_t failed = 0, ok = 0;
  for (size_t i = 0; i < lines.size(); ++i) {
    auto parsed = ParseLine(lines[i], stack.api, &seen_ids);
    lines[i].text.clear();
    lines[i].text.shrink_to_fit();
    if (auto* err = std::get_if<std::string>(&parsed)) {
      out.Set(i, std::move(*err));
      ++failed;
      continue;
    }
    jobs.push_back(std::move(std::get<sched::SchedRequest>(parsed)));
    line_of_job.push_back(i);
  }
  CT_LOG(kInfo) << "batch: " << lines.size() << " requests read from " << f.input << " (" << failed
                << " invalid), order " << f.order;

  Progress progress(lines.size());
  int64_t prompt_tokens = 0, cached_tokens = 0, generated_tokens = 0;
  progress.Update(failed, failed, 0);
  BatchRunOptions ro;
  ro.order = f.order == "fcfs" ? BatchOrder::kFcfs : BatchOrder::kBatchLlm;
  ro.min_prefix_tokens = f.min_prefix_tokens;
  ro.pin_ttl_ms = int64_t{cfg.max_pin_ttl_s} * 1000;
  const BatchRunStats rs =
      RunBatch(*stack.scheduler, std::move(jobs), ro, [&](size_t job, JobResult r) {
        const size_t i = line_of_job[job];
        if (!r.error.ok()) {
          out.Set(i, ErrorLine(lines[i], StatusCodeName(r.error.code()), r.error.message()));
          ++failed;
        } else {
          out.Set(i, ResultLine(lines[i], stack.api.model_id, r));
          ++ok;
          prompt_tokens += r.usage.prompt_tokens;
          cached_tokens += r.usage.cached_tokens;
          generated_tokens += r.usage.completion_tokens;
        }
        progress.Update(ok + failed, failed, generated_tokens);
      });
  if (Status s = out.Commit(); !s.ok()) return Fail(s);
  const double seconds = wall.Millis() * 1e-3;
  const sched::SchedulerStats st = stack.scheduler->Stats();

  const json summary = {
      {"order", f.order},
      {"lines", lines.size()},
      {"ok", ok},
      {"failed", failed},
      {"prompt_tokens", prompt_tokens},
      {"cached_tokens", cached_tokens},
      {"prefilled_tokens", st.prefill_tokens},  // computed, primes included
      {"generated_tokens", generated_tokens},
      {"wall_seconds", seconds},
      {"requests_per_second", seconds > 0 ? static_cast<double>(ok) / seconds : 0.0},
      {"generated_tokens_per_second",
       seconds > 0 ? static_cast<double>(generated_tokens) / seconds : 0.0},
      {"groups", rs.groups},
      {"shared_groups", rs.shared_groups},
      {"planned_saved_tokens", rs.planned_saved_tokens},
      {"primes_failed", rs.primes_failed},
      {"pins_refused", rs.pins_refused},
      {"window_pages", rs.window_pages},
      {"peak_window_pages", rs.peak_window_pages},
      {"plan_seconds", rs.plan_seconds},
      {"output", f.output}};
  if (f.json) {
    std::printf("%s\n", summary.dump().c_str());
    return 0;
  }
  std::printf("lines             %zu (%zu ok, %zu failed) -> %s\n", lines.size(), ok, failed,
              f.output.c_str());
  std::printf("prompt tokens     %lld (%lld cached; %llu prefilled, primes included)\n",
              static_cast<long long>(prompt_tokens), static_cast<long long>(cached_tokens),
              static_cast<unsigned long long>(st.prefill_tokens));
  std::printf("generated tokens  %lld\n", static_cast<long long>(generated_tokens));
  std::printf("wall              %.2f s: %.2f requests/s, %.1f generated tokens/s\n", seconds,
              summary["requests_per_second"].get<double>(),
              summary["generated_tokens_per_second"].get<double>());
  if (ro.order == BatchOrder::kBatchLlm) {
    std::printf(
        "plan              %zu groups, %zu sharing a prefix, %lld tokens to reuse "
        "(%.1f ms)\n",
        rs.groups, rs.shared_groups, static_cast<long long>(rs.planned_saved_tokens),
        rs.plan_seconds * 1e3);
  }
  return 0;
}

}  // namespace

Runner AddBatchCommand(CLI::App& app) {
  auto f = std::make_shared<BatchFlags>();
  BatchFlags* p = f.get();
  CLI::App* c = app.add_subcommand(
      "batch", "Run an OpenAI Batch API file (JSONL) offline, prefix-grouped (BatchLLM)");
  constexpr const char* kBatch = "Batch";
  c->add_option("-i,--input", p->input, "Requests, one JSON line each (OpenAI Batch format)")
      ->required()
      ->check(CLI::ExistingFile)
      ->group(kBatch);
  c->add_option("-o,--output", p->output, "Results, one JSON line per request, in input order")
      ->required()
      ->group(kBatch);
  c->add_option("--order", p->order,
                "batchllm (prefix groups computed once, decode-heavy first) or fcfs (file "
                "order through the online scheduler, the baseline)")
      ->check(CLI::IsMember({"batchllm", "fcfs"}))
      ->group(kBatch);
  c->add_option("--min-prefix", p->min_prefix_tokens,
                "Shortest shared prefix in tokens that makes a group (16)")
      ->check(CLI::PositiveNumber)
      ->group(kBatch);
  c->add_flag("--json", p->json, "Print the summary as one JSON object")->group(kBatch);
  c->add_option("--config", p->stack.config_path,
                "TOML file with `serve` settings (flags win; network keys are ignored)")
      ->check(CLI::ExistingFile)
      ->group(kBatch);
  AddStackFlags(c, &p->stack);
  return [f] { return Batch(*f); };
}

}  // namespace cachette::cli
