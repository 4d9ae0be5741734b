#include "server/auth.h"

#include <cstdio>
#include <fstream>

#include "cache/session_journal.h"
#include "core/hash.h"
#include "server/openai.h"

namespace cachette::server {
namespace {

// The token of "Bearer <token>" (scheme case-insensitive); "" when the header is not one.
std::string_view BearerToken(std::string_view h) {
  constexpr std::string_view kScheme = "bearer ";
  if (h.size() <= kScheme.size()) return {};
  for (size_t i = 0; i < kScheme.size(); ++i) {
    const char c = h[i];
    if ((c >= 'A' && c <= 'Z' ? static_cast<char>(c - 'A' + 'a') : c) != kScheme[i]) return {};
  }
  h.remove_prefix(kScheme.size());
  while (!h.empty() && (h.front() == ' ' || h.front() == '\t')) h.remove_prefix(1);
  while (!h.empty() && (h.back() == ' ' || h.back() == '\t')) h.remove_suffix(1);
  return h;
}

std::string_view Trim(std::string_view s) {
  while (!s.empty() && (s.front() == ' ' || s.front() == '\t' || s.front() == '\r')) {
    s.remove_prefix(1);
  }
  while (!s.empty() && (s.back() == ' ' || s.back() == '\t' || s.back() == '\r')) {
    s.remove_suffix(1);
  }
  return s;
}

AuthDecision Refuse(int http, const char* code, std::string message) {
  return {http, code, std::move(message)};
}

}  // namespace

bool ConstantTimeEquals(std::string_view a, std::string_view b) {
  unsigned diff = a.size() == b.size() ? 0u : 1u;
  for (size_t i = 0; i < b.size(); ++i) {
    const unsigned char x = i < a.size() ? static_cast<unsigned char>(a[i]) : 0;
    diff |= x ^ static_cast<unsigned char>(b[i]);
  }
  return diff == 0;
}

bool IsLoopback(std::string_view addr) {
  if (addr == "::1") return true;
  if (addr.rfind("::ffff:", 0) == 0) addr.remove_prefix(7);
  return addr.rfind("127.", 0) == 0;
}

AuthDecision Authorize(const AccessPolicy& policy, Access access, std::string_view authorization,
                       std::string_view remote_addr) {
  if (access == Access::kOpen) return {};
  const std::string_view token = BearerToken(authorization);
  const bool admin_ok =
      !policy.admin_key.empty() && !token.empty() && ConstantTimeEquals(token, policy.admin_key);
  if (access == Access::kApi) {
    if (policy.api_keys.empty()) return {};
    bool ok = admin_ok;
    for (const std::string& k : policy.api_keys) ok |= ConstantTimeEquals(token, k);
    if (ok && !token.empty()) return {};
    return Refuse(401, "invalid_api_key",
                  token.empty() ? "no API key given: send 'Authorization: Bearer <key>'"
                                : "the API key given is not valid");
  }
  // kAdmin.
  if (!policy.admin_key.empty()) {
    if (admin_ok) return {};
    return Refuse(401, "invalid_api_key",
                  token.empty() ? "the cache admin API needs 'Authorization: Bearer <admin key>'"
                                : "the admin key given is not valid");
  }
  if (IsLoopback(remote_addr)) return {};
  return Refuse(403, "permission_denied",
                "the cache admin API serves loopback clients only (start the server with "
                "--admin-key to open it to others)");
}

std::string AuthErrorBody(const AuthDecision& d) {
  nlohmann::json j = {{"error",
                       {{"message", d.message},
                        {"type", d.http == 401 ? "authentication_error" : "permission_error"},
                        {"param", nullptr},
                        {"code", d.code}}}};
  return Dump(j);
}

Status LoadApiKeyFile(const std::string& path, std::vector<std::string>* keys) {
  std::ifstream f(path);
  if (!f) return IOError("--api-key-file " + path + ": cannot be read");
  std::string line;
  size_t found = 0;
  while (std::getline(f, line)) {
    const std::string_view t = Trim(line);
    if (t.empty() || t.front() == '#') continue;
    if (t.find_first_of(" \t") != std::string_view::npos) {
      return InvalidArgument("--api-key-file " + path + ": a key holds whitespace");
    }
    keys->emplace_back(t);
    ++found;
  }
  if (f.bad()) return IOError("--api-key-file " + path + ": read failed");
  if (found == 0) return InvalidArgument("--api-key-file " + path + ": holds no key");
  return Status::Ok();
}

std::string SessionDigestHex(uint64_t digest) {
  char hex[17];
  std::snprintf(hex, sizeof hex, "%016llx", static_cast<unsigned long long>(digest));
  return hex;
}

std::string SessionDigest(std::string_view session) {
  return SessionDigestHex(cache::SessionDigest64(session));
}

}  // namespace cachette::server
