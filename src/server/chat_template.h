// Chat templates: how a list of messages becomes prompt tokens.
//
// Models ship a Jinja template in `tokenizer.chat_template`; cachette does not run Jinja. It
// recognizes the common families by their marker tokens and renders them natively:
//   chatml  "<|im_start|>"         <|im_start|>{role}\n{content}<|im_end|>\n ... <|im_start|>assistant\n
//   llama3  "<|start_header_id|>"  <|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>
//   gemma   "<start_of_turn>"      <start_of_turn>{user|model}\n{content}<end_of_turn>\n
//   llama2  "[INST]"               [INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {reply}</s>
//   plain   (no template)          System: ...\nUser: ...\nAssistant: ... ending "Assistant:"
// `plain` is for base models such as the bundled cachette-tiny (no template, no chat tokens); it
// adds the stop string "\nUser:". A template present but not recognized is an error that names
// the --chat-template choices.
//
// Rendering yields segments: template text (whose special tokens are parsed) and message
// content (tokenized as plain text, so a user cannot forge control tokens). Each turn renders
// the same way whatever follows it, so turn N+1's tokens begin with turn N's prompt: the
// condition for prefix reuse across turns.
//
// Thread-safety: immutable; safe to share.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "cachette/status.h"
#include "cachette/types.h"
#include "model/tokenizer.h"

namespace cachette::server {

class ChatTemplate {
 public:
  enum class Family { kPlain, kChatMl, kLlama3, kGemma, kLlama2 };

  // "plain", "chatml", "llama3", "gemma", "llama2" ("mistral" is llama2); kInvalidArgument
  // listing those for anything else.
  static Result<ChatTemplate> ByName(std::string_view name);
  // From the text of `tokenizer.chat_template`: empty gives plain; kInvalidArgument when the
  // text is not one of the families above.
  static Result<ChatTemplate> Detect(std::string_view jinja);

  struct Message {
    std::string role;  // system, developer (as system), user, assistant, tool
    std::string content;
  };
  struct Segment {
    std::string text;
    bool special = false;  // template text: control tokens in it are parsed
  };
  // The conversation followed by the assistant's turn opener. kInvalidArgument for no
  // messages or an unknown role (naming it).
  Result<std::vector<Segment>> Render(const std::vector<Message>& messages) const;

  // Segments to tokens; BOS first when the tokenizer adds one.
  static std::vector<TokenId> Tokenize(const Tokenizer& tok, const std::vector<Segment>& segs);

  // Stop strings every request of this template gets (plain: "\nUser:").
  std::vector<std::string> DefaultStops() const;
  Family family() const { return family_; }
  std::string_view name() const;

 private:
  explicit ChatTemplate(Family f) : family_(f) {}
  Family family_;
};

}  // namespace cachette::server
