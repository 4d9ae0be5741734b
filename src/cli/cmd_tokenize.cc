// `cachette tokenize`: print the tokens of a text, like llama.cpp's llama-tokenize.
#include <cstdio>
#include <fstream>
#include <sstream>

#include "cli/cli.h"
#include "model/gguf.h"
#include "model/tokenizer.h"

namespace cachette::cli {
namespace {

struct TokenizeArgs {
  std::string model;
  std::string prompt;
  std::string file;
  bool ids = false;
  bool bos = false;
  bool no_parse_special = false;
};

std::string Escape(const std::string& s) {
  std::string out;
  for (unsigned char ch : s) {
    if (ch == '\n') out += "\\n";
    else if (ch == '\t') out += "\\t";
    else if (ch == '\'') out += "\\'";
    else if (ch < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\x%02x", ch);
      out += buf;
    } else {
      out += static_cast<char>(ch);
    }
  }
  return out;
}

int Tokenize(const TokenizeArgs& a) {
  auto file = gguf::GgufFile::Open(a.model.empty() ? DefaultModelPath() : a.model);
  if (!file.ok()) return Fail(file.status());
  auto tok = Tokenizer::FromGguf(**file);
  if (!tok.ok()) return Fail(tok.status());
  std::string text = a.prompt;
  if (!a.file.empty()) {
    std::ifstream in(a.file, std::ios::binary);
    if (!in) return Fail(IOError("cannot open '" + a.file + "'"));
    std::ostringstream ss;
    ss << in.rdbuf();
    text = ss.str();
  }
  const std::vector<TokenId> ids = (*tok)->Encode(text, a.bos, !a.no_parse_special);
  if (a.ids) {
    std::string out = "[";
    for (size_t i = 0; i < ids.size(); ++i) out += (i ? ", " : "") + std::to_string(ids[i]);
    std::printf("%s]\n", out.c_str());
  } else {
    for (TokenId id : ids) {
      std::printf("%6d -> '%s'\n", id, Escape((*tok)->TokenToPiece(id, true)).c_str());
    }
  }
  return 0;
}

}  // namespace

Runner AddTokenizeCommand(CLI::App& app) {
  auto a = std::make_shared<TokenizeArgs>();
  CLI::App* c = app.add_subcommand("tokenize", "Print the tokens of a text");
  c->add_option("-m,--model", a->model, "GGUF model or vocabulary (default: bundled model)");
  auto* p = c->add_option("-p,--prompt", a->prompt, "Text to tokenize");
  auto* f = c->add_option("-f,--file", a->file, "File whose contents to tokenize");
  p->excludes(f);
  c->add_flag("--ids", a->ids, "Print only a JSON array of ids");
  c->add_flag("--bos", a->bos, "Prepend BOS");
  c->add_flag("--no-parse-special", a->no_parse_special,
              "Treat special-token text as plain text");
  return [a, p, f] {
    if (p->count() == 0 && f->count() == 0) {
      return Fail(InvalidArgument("give the text with -p TEXT or -f FILE"));
    }
    return Tokenize(*a);
  };
}

}  // namespace cachette::cli
