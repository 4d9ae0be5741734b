// Access control of `cachette serve` (docs/serving.md "Access control").
//
// Three kinds of route:
//   kOpen   /health and /metrics: always served.
//   kApi    the generation endpoints and /v1/models: with API keys configured, the request must
//           carry "Authorization: Bearer <key>" for one of them (the admin key also passes);
//           without keys they are open.
//   kAdmin  /v1/cache/*: with an admin key configured, the request must carry it (from any
//           address); without one, only loopback clients (127.0.0.0/8, ::1) are served.
// A missing or wrong key is 401 ("invalid_api_key"); a non-loopback admin client without an
// admin key configured is 403 ("permission_denied").
//
// Keys are compared in time that depends only on the configured key's length, never on where the
// first differing byte is, and every configured key is compared (no early exit).
//
// Thread-safety: AccessPolicy is read-only once the server starts; the functions are stateless.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "cachette/status.h"

namespace cachette::server {

enum class Access { kOpen, kApi, kAdmin };

struct AccessPolicy {
  std::vector<std::string> api_keys;  // empty: kApi routes are open
  std::string admin_key;              // empty: kAdmin routes serve loopback clients only
};

// The outcome of a check: http 0 means allowed; otherwise 401 or 403 with an OpenAI error `code`
// and a message that never repeats the key given.
struct AuthDecision {
  int http = 0;
  std::string code;
  std::string message;
  bool allowed() const { return http == 0; }
};

// `authorization` is the request's Authorization header ("" when absent); `remote_addr` the
// client's numeric address as the HTTP layer reports it.
AuthDecision Authorize(const AccessPolicy& policy, Access access, std::string_view authorization,
                       std::string_view remote_addr);

// The OpenAI error body of a refused request.
std::string AuthErrorBody(const AuthDecision& d);

// a == b, in time that depends on b's length only.
bool ConstantTimeEquals(std::string_view a, std::string_view b);

// 127.0.0.0/8, ::1 and ::ffff:127.x.y.z.
bool IsLoopback(std::string_view addr);

// Appends the keys of a key file: one a line, surrounding whitespace trimmed, blank lines and lines
// starting with '#' skipped. kIOError when it cannot be read; kInvalidArgument when it holds no
// key.
Status LoadApiKeyFile(const std::string& path, std::vector<std::string>* keys);

// What the stats show for a session id: 16 hex digits of a hash, never the id itself (the
// digest the session journal files it under, cache::SessionDigest64).
std::string SessionDigest(std::string_view session);
std::string SessionDigestHex(uint64_t digest);

}  // namespace cachette::server
