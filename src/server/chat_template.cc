#include "server/chat_template.h"

namespace cachette::server {
namespace {

constexpr const char* kNames = "plain, chatml, llama3, gemma, llama2 (or mistral)";

// The canonical role, or "" when unknown.
std::string Role(const std::string& r) {
  if (r == "system" || r == "developer") return "system";
  if (r == "user" || r == "assistant" || r == "tool") return r;
  return "";
}

}  // namespace

Result<ChatTemplate> ChatTemplate::ByName(std::string_view name) {
  if (name == "plain") return ChatTemplate(Family::kPlain);
  if (name == "chatml") return ChatTemplate(Family::kChatMl);
  if (name == "llama3") return ChatTemplate(Family::kLlama3);
  if (name == "gemma") return ChatTemplate(Family::kGemma);
  if (name == "llama2" || name == "mistral") return ChatTemplate(Family::kLlama2);
  return InvalidArgument("unknown chat template '" + std::string(name) + "' (known: " + kNames +
                         ")");
}

Result<ChatTemplate> ChatTemplate::Detect(std::string_view jinja) {
  if (jinja.empty()) return ChatTemplate(Family::kPlain);
  auto has = [&](std::string_view s) { return jinja.find(s) != std::string_view::npos; };
  if (has("<|im_start|>")) return ChatTemplate(Family::kChatMl);
  if (has("<|start_header_id|>")) return ChatTemplate(Family::kLlama3);
  if (has("<start_of_turn>")) return ChatTemplate(Family::kGemma);
  if (has("[INST]")) return ChatTemplate(Family::kLlama2);
  return InvalidArgument(
      "the model's tokenizer.chat_template is not one cachette recognizes; choose one with "
      "--chat-template NAME (" + std::string(kNames) + ")");
}

std::string_view ChatTemplate::name() const {
  switch (family_) {
    case Family::kPlain: return "plain";
    case Family::kChatMl: return "chatml";
    case Family::kLlama3: return "llama3";
    case Family::kGemma: return "gemma";
    case Family::kLlama2: return "llama2";
  }
  return "?";
}

std::vector<std::string> ChatTemplate::DefaultStops() const {
  if (family_ == Family::kPlain) return {"\nUser:"};
  return {};
}

Result<std::vector<ChatTemplate::Segment>> ChatTemplate::Render(
    const std::vector<Message>& messages) const {
  if (messages.empty()) return InvalidArgument("'messages' must not be empty");
  std::vector<Segment> out;
  auto special = [&](std::string s) { out.push_back({std::move(s), true}); };
  auto text = [&](std::string s) {
    if (!s.empty()) out.push_back({std::move(s), false});
  };
  // Families without a system role fold the system text into the first user turn.
  std::string pending_system;
  for (size_t i = 0; i < messages.size(); ++i) {
    const std::string role = Role(messages[i].role);
    if (role.empty()) {
      return InvalidArgument("messages[" + std::to_string(i) + "].role '" + messages[i].role +
                             "' is not one of system, developer, user, assistant, tool");
    }
    const std::string& c = messages[i].content;
    switch (family_) {
      case Family::kPlain: {
        const char* label = role == "system"      ? "System: "
                            : role == "assistant" ? "Assistant: "
                            : role == "tool"      ? "Tool: "
                                                  : "User: ";
        text(label + c + "\n");
        break;
      }
      case Family::kChatMl:
        special("<|im_start|>" + role + "\n");
        text(c);
        special("<|im_end|>\n");
        break;
      case Family::kLlama3:
        special("<|start_header_id|>" + (role == "tool" ? std::string("ipython") : role) +
                "<|end_header_id|>\n\n");
        text(c);
        special("<|eot_id|>");
        break;
      case Family::kGemma:
        if (role == "system") {
          pending_system += c + "\n\n";
          break;
        }
        special(std::string("<start_of_turn>") + (role == "assistant" ? "model" : "user") + "\n");
        text(pending_system + c);
        pending_system.clear();
        special("<end_of_turn>\n");
        break;
      case Family::kLlama2:
        if (role == "system") {
          pending_system += c;
          break;
        }
        if (role == "assistant") {
          text(" " + c);
          special("</s>");
          break;
        }
        special("[INST] ");
        if (!pending_system.empty()) {
          text("<<SYS>>\n" + pending_system + "\n<</SYS>>\n\n");
          pending_system.clear();
        }
        text(c);
        special(" [/INST]");
        break;
    }
  }
  switch (family_) {
    case Family::kPlain: text("Assistant:"); break;
    case Family::kChatMl: special("<|im_start|>assistant\n"); break;
    case Family::kLlama3: special("<|start_header_id|>assistant<|end_header_id|>\n\n"); break;
    case Family::kGemma: special("<start_of_turn>model\n"); break;
    case Family::kLlama2: break;  // the reply follows " [/INST]" directly
  }
  return out;
}

std::vector<TokenId> ChatTemplate::Tokenize(const Tokenizer& tok,
                                            const std::vector<Segment>& segs) {
  std::vector<TokenId> ids;
  if (tok.add_bos() && tok.bos() >= 0) ids.push_back(tok.bos());
  // Adjacent plain segments are tokenized together, as one text would be.
  for (size_t i = 0; i < segs.size();) {
    std::string run = segs[i].text;
    const bool special = segs[i].special;
    size_t j = i + 1;
    while (!special && j < segs.size() && !segs[j].special) run += segs[j++].text;
    const std::vector<TokenId> part = tok.Encode(run, /*add_bos=*/false, special);
    ids.insert(ids.end(), part.begin(), part.end());
    i = j;
  }
  return ids;
}

}  // namespace cachette::server
