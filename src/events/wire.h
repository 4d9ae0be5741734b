// The ZeroMQ framing of KV events (docs/formats/kv-events.md, "Frames"), shared by the
// publisher and the subscriber:
//   PUB stream      [topic, seq, payload]     seq = 0, 1, 2, ... one per batch
//   replay request  [empty, start_seq]        DEALER -> ROUTER (which sees the identity first)
//   replay answer   [empty, seq, payload] ..., then [empty, kEndOfAnswerSeq, empty]
// Every seq is 8 bytes, big-endian, two's complement (vLLM's framing). The negative values are
// the protocol's own; a batch never has one, except a snapshot taken before the first batch.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace cachette::events {

// The seq frame of the last message of every replay answer (its payload is empty).
inline constexpr int64_t kEndOfAnswerSeq = -1;
// A start_seq asking for a snapshot rather than a replay (cachette's extension).
inline constexpr int64_t kSnapshotRequestSeq = -2;
// The seq of a snapshot taken before the publisher published anything: the subscriber then
// takes every batch from seq 0 on. (-1 cannot serve: it is the end marker.)
inline constexpr int64_t kSnapshotBeforeFirstSeq = -3;

// 8 bytes, big-endian two's complement.
inline std::string EncodeSeq(int64_t seq) {
  std::string out(8, '\0');
  const uint64_t u = static_cast<uint64_t>(seq);
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>(u >> (56 - 8 * i));
  return out;
}

// The seq in `frame`, or nullopt unless it is exactly 8 bytes.
inline std::optional<int64_t> DecodeSeq(std::string_view frame) {
  if (frame.size() != 8) return std::nullopt;
  uint64_t u = 0;
  for (char c : frame) u = (u << 8) | static_cast<uint8_t>(c);
  return static_cast<int64_t>(u);
}

}  // namespace cachette::events
