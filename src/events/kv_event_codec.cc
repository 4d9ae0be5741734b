#include "events/kv_event_codec.h"

#include <msgpack.h>

#include <cmath>
#include <cstdio>
#include <limits>

#include "events/msgpack_scan.h"

namespace cachette::events {

namespace {

constexpr std::string_view kStoredTag = "BlockStored";
constexpr std::string_view kRemovedTag = "BlockRemoved";
constexpr std::string_view kClearedTag = "AllBlocksCleared";

// ---- Encoding -------------------------------------------------------------------------------

// msgpack-c's write callback: appends to the std::string passed as `data`. Never fails.
int AppendToString(void* data, const char* buf, size_t len) {
  static_cast<std::string*>(data)->append(buf, len);
  return 0;
}

void PackString(msgpack_packer* pk, std::string_view s) {
  msgpack_pack_str_with_body(pk, s.data(), s.size());
}

void PackHashes(msgpack_packer* pk, const std::vector<uint64_t>& hashes) {
  msgpack_pack_array(pk, hashes.size());
  for (uint64_t h : hashes) msgpack_pack_uint64(pk, h);
}

void PackEvent(msgpack_packer* pk, const KvEvent& e) {
  switch (e.kind) {
    case KvEvent::Kind::kStored:
      msgpack_pack_array(pk, 7);
      PackString(pk, kStoredTag);
      PackHashes(pk, e.block_hashes);
      if (e.parent) {
        msgpack_pack_uint64(pk, *e.parent);
      } else {
        msgpack_pack_nil(pk);
      }
      msgpack_pack_array(pk, e.token_ids.size());
      for (int32_t t : e.token_ids) msgpack_pack_int32(pk, t);
      msgpack_pack_int32(pk, e.block_size);
      msgpack_pack_nil(pk);  // lora_id: a block hash already names its adapter
      PackString(pk, KvMediumName(e.medium));
      return;
    case KvEvent::Kind::kRemoved:
      msgpack_pack_array(pk, 3);
      PackString(pk, kRemovedTag);
      PackHashes(pk, e.block_hashes);
      PackString(pk, KvMediumName(e.medium));
      return;
    case KvEvent::Kind::kAllCleared:
      msgpack_pack_array(pk, 1);
      PackString(pk, kClearedTag);
      return;
  }
}

// ---- Decoding -------------------------------------------------------------------------------

Status Malformed(std::string_view where, std::string_view what) {
  std::string message = "kv event batch: ";
  if (!where.empty()) {
    message += where;
    message += ": ";
  }
  message += what;
  return Corruption(std::move(message));
}

// "a string", "an integer", ... for "X is a string, not an integer".
std::string_view TypeName(const msgpack_object& o) {
  switch (o.type) {
    case MSGPACK_OBJECT_NIL:
      return "nil";
    case MSGPACK_OBJECT_BOOLEAN:
      return "a boolean";
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
    case MSGPACK_OBJECT_NEGATIVE_INTEGER:
      return "an integer";
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64:
      return "a float";
    case MSGPACK_OBJECT_STR:
      return "a string";
    case MSGPACK_OBJECT_ARRAY:
      return "an array";
    case MSGPACK_OBJECT_MAP:
      return "a map";
    case MSGPACK_OBJECT_BIN:
      return "bytes";
    case MSGPACK_OBJECT_EXT:
      return "an ext value";
  }
  return "an unknown type";
}

std::string IsNot(std::string_view field, const msgpack_object& o, std::string_view expected) {
  return std::string(field) + " is " + std::string(TypeName(o)) + ", not " + std::string(expected);
}

// A string from the wire, quoted and cut to 40 bytes with anything unprintable escaped, so a
// hostile tag cannot flood or garble a log line.
std::string Quote(std::string_view s) {
  std::string out = "\"";
  for (size_t i = 0; i < s.size() && i < 40; ++i) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    if (c >= 0x20 && c < 0x7f && c != '"' && c != '\\') {
      out += static_cast<char>(c);
    } else {
      char hex[8];
      snprintf(hex, sizeof(hex), "\\x%02x", c);
      out += hex;
    }
  }
  if (s.size() > 40) out += "...";
  return out + "\"";
}

std::string_view StrOf(const msgpack_object& o) {
  return std::string_view(o.via.str.ptr, o.via.str.size);
}

bool IsInteger(const msgpack_object& o) {
  return o.type == MSGPACK_OBJECT_POSITIVE_INTEGER || o.type == MSGPACK_OBJECT_NEGATIVE_INTEGER;
}

// An integer that fits int64, or an error naming `field`.
Status ReadInt64(const msgpack_object& o, std::string_view where, std::string_view field,
                 int64_t* out) {
  if (!IsInteger(o)) return Malformed(where, IsNot(field, o, "an integer"));
  if (o.type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
    if (o.via.u64 > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return Malformed(where,
                       std::string(field) + " is " + std::to_string(o.via.u64) + ", beyond int64");
    }
    *out = static_cast<int64_t>(o.via.u64);
  } else {
    *out = o.via.i64;
  }
  return Status::Ok();
}

// A block hash: an unsigned 64-bit integer, or a negative int64 read as its two's complement
// (vLLM versions that used Python's hash() sent signed values).
Status ReadHash(const msgpack_object& o, std::string_view where, std::string_view field,
                uint64_t* out) {
  if (o.type == MSGPACK_OBJECT_POSITIVE_INTEGER) {
    *out = o.via.u64;
  } else if (o.type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
    *out = static_cast<uint64_t>(o.via.i64);
  } else if (o.type == MSGPACK_OBJECT_BIN) {
    return Malformed(where, std::string(field) +
                                " is bytes: only integer block hashes are supported (vLLM sends "
                                "them with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=1)");
  } else {
    return Malformed(where, IsNot(field, o, "an integer"));
  }
  return Status::Ok();
}

Status ReadHashes(const msgpack_object& o, std::string_view where, std::vector<uint64_t>* out) {
  if (o.type != MSGPACK_OBJECT_ARRAY) return Malformed(where, IsNot("block_hashes", o, "an array"));
  const msgpack_object_array& a = o.via.array;
  if (a.size > kMaxEventBlocks) {
    return Malformed(where, "block_hashes has " + std::to_string(a.size) + " blocks, more than " +
                                std::to_string(kMaxEventBlocks));
  }
  out->resize(a.size);  // a.size elements were parsed: bounded by the payload
  for (uint32_t i = 0; i < a.size; ++i) {
    CT_RETURN_IF_ERROR(
        ReadHash(a.ptr[i], where, "block_hashes[" + std::to_string(i) + "]", &(*out)[i]));
  }
  return Status::Ok();
}

// nil (vLLM's default: its own GPU cache) or a medium name.
Status ReadMedium(const msgpack_object& o, std::string_view where, KvMedium* out) {
  if (o.type == MSGPACK_OBJECT_NIL) {
    *out = KvMedium::kMemory;
    return Status::Ok();
  }
  if (o.type != MSGPACK_OBJECT_STR) return Malformed(where, IsNot("medium", o, "a string or nil"));
  const std::optional<KvMedium> m = ParseKvMedium(StrOf(o));
  if (!m) return Malformed(where, "unknown medium " + Quote(StrOf(o)));
  *out = *m;
  return Status::Ok();
}

// ["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id
//  (, medium (, lora_name))]
Status ReadStored(const msgpack_object_array& a, std::string_view where, KvEvent* e) {
  if (a.size < 6 || a.size > 8) {
    return Malformed(where, "has " + std::to_string(a.size) +
                                " elements, expected 6 to 8 (tag, block_hashes, "
                                "parent_block_hash, token_ids, block_size, lora_id, [medium, "
                                "[lora_name]])");
  }
  e->kind = KvEvent::Kind::kStored;
  CT_RETURN_IF_ERROR(ReadHashes(a.ptr[1], where, &e->block_hashes));
  if (a.ptr[2].type != MSGPACK_OBJECT_NIL) {
    uint64_t parent = 0;
    CT_RETURN_IF_ERROR(ReadHash(a.ptr[2], where, "parent_block_hash", &parent));
    e->parent = parent;
  }
  const msgpack_object& tokens = a.ptr[3];
  if (tokens.type != MSGPACK_OBJECT_ARRAY) {
    return Malformed(where, IsNot("token_ids", tokens, "an array"));
  }
  e->token_ids.resize(tokens.via.array.size);
  for (uint32_t i = 0; i < tokens.via.array.size; ++i) {
    const std::string field = "token_ids[" + std::to_string(i) + "]";
    int64_t t = 0;
    CT_RETURN_IF_ERROR(ReadInt64(tokens.via.array.ptr[i], where, field, &t));
    if (t < std::numeric_limits<int32_t>::min() || t > std::numeric_limits<int32_t>::max()) {
      return Malformed(where, field + " is " + std::to_string(t) + ", beyond int32");
    }
    e->token_ids[i] = static_cast<int32_t>(t);
  }
  int64_t block_size = 0;
  CT_RETURN_IF_ERROR(ReadInt64(a.ptr[4], where, "block_size", &block_size));
  if (block_size < 0 || block_size > kMaxBlockSize) {
    return Malformed(where, "block_size is " + std::to_string(block_size) + ", outside 0.." +
                                std::to_string(kMaxBlockSize));
  }
  e->block_size = static_cast<int32_t>(block_size);
  if (a.ptr[5].type != MSGPACK_OBJECT_NIL && !IsInteger(a.ptr[5])) {
    return Malformed(where, IsNot("lora_id", a.ptr[5], "an integer or nil"));
  }
  e->medium = KvMedium::kMemory;
  if (a.size >= 7) CT_RETURN_IF_ERROR(ReadMedium(a.ptr[6], where, &e->medium));
  if (a.size >= 8 && a.ptr[7].type != MSGPACK_OBJECT_NIL && a.ptr[7].type != MSGPACK_OBJECT_STR) {
    return Malformed(where, IsNot("lora_name", a.ptr[7], "a string or nil"));
  }
  return Status::Ok();
}

// ["BlockRemoved", block_hashes (, medium)]
Status ReadRemoved(const msgpack_object_array& a, std::string_view where, KvEvent* e) {
  if (a.size < 2 || a.size > 3) {
    return Malformed(where, "has " + std::to_string(a.size) +
                                " elements, expected 2 or 3 (tag, block_hashes, [medium])");
  }
  e->kind = KvEvent::Kind::kRemoved;
  CT_RETURN_IF_ERROR(ReadHashes(a.ptr[1], where, &e->block_hashes));
  e->medium = KvMedium::kMemory;
  if (a.size == 3) CT_RETURN_IF_ERROR(ReadMedium(a.ptr[2], where, &e->medium));
  return Status::Ok();
}

Status ReadEvent(const msgpack_object& o, size_t index, KvEvent* e) {
  const std::string at = "event " + std::to_string(index);
  if (o.type != MSGPACK_OBJECT_ARRAY) return Malformed("", IsNot(at, o, "an array"));
  const msgpack_object_array& a = o.via.array;
  if (a.size == 0) return Malformed(at, "is an empty array (no tag)");
  if (a.ptr[0].type != MSGPACK_OBJECT_STR)
    return Malformed(at, IsNot("the tag", a.ptr[0], "a string"));
  const std::string_view tag = StrOf(a.ptr[0]);
  const std::string where = at + " (" + std::string(tag) + ")";
  if (tag == kStoredTag) return ReadStored(a, where, e);
  if (tag == kRemovedTag) return ReadRemoved(a, where, e);
  if (tag == kClearedTag) {
    if (a.size != 1) {
      return Malformed(where, "has " + std::to_string(a.size) + " elements, expected 1 (the tag)");
    }
    e->kind = KvEvent::Kind::kAllCleared;
    return Status::Ok();
  }
  return Malformed(at, "unknown tag " + Quote(tag));
}

// Frees what msgpack-c allocated for one parse.
class Unpacked {
 public:
  Unpacked() { msgpack_unpacked_init(&u_); }
  ~Unpacked() { msgpack_unpacked_destroy(&u_); }
  Unpacked(const Unpacked&) = delete;
  Unpacked& operator=(const Unpacked&) = delete;
  msgpack_unpacked* get() { return &u_; }

 private:
  msgpack_unpacked u_;
};

}  // namespace

std::optional<KvMedium> ParseKvMedium(std::string_view name) {
  if (name == "memory" || name == "GPU") return KvMedium::kMemory;
  if (name == "ram" || name == "CPU") return KvMedium::kRam;
  if (name == "disk" || name == "DISK") return KvMedium::kDisk;
  if (name == "redis") return KvMedium::kRedis;
  return std::nullopt;
}

std::string EncodeBatch(const KvEventBatch& batch) {
  std::string out;
  msgpack_packer pk;
  msgpack_packer_init(&pk, &out, AppendToString);
  msgpack_pack_array(&pk, batch.dp_rank ? 3 : 2);
  msgpack_pack_double(&pk, batch.ts);
  msgpack_pack_array(&pk, batch.events.size());
  for (const KvEvent& e : batch.events) PackEvent(&pk, e);
  if (batch.dp_rank) msgpack_pack_int64(&pk, *batch.dp_rank);
  return out;
}

Result<KvEventBatch> DecodeBatch(std::string_view payload) {
  if (payload.empty()) return Malformed("", "empty payload");
  // Bounds first: msgpack-c sizes a container from its declared count (msgpack_scan.h).
  if (Status s = ScanMsgpackValue(payload, kMaxBatchDepth); !s.ok()) {
    return s.WithContext("kv event batch");
  }
  Unpacked unpacked;
  size_t offset = 0;
  const msgpack_unpack_return r =
      msgpack_unpack_next(unpacked.get(), payload.data(), payload.size(), &offset);
  if (r != MSGPACK_UNPACK_SUCCESS && r != MSGPACK_UNPACK_EXTRA_BYTES) {
    return Malformed("", "not valid msgpack (msgpack-c says " + std::to_string(r) + ")");
  }
  if (offset != payload.size()) {  // the scan already checked; kept as a second line
    return Malformed("", std::to_string(payload.size() - offset) + " trailing bytes");
  }
  const msgpack_object& root = unpacked.get()->data;
  if (root.type != MSGPACK_OBJECT_ARRAY) return Malformed("", IsNot("the batch", root, "an array"));
  const msgpack_object_array& top = root.via.array;
  if (top.size != 2 && top.size != 3) {
    return Malformed("", "the batch has " + std::to_string(top.size) +
                             " elements, expected 2 or 3 (ts, events, [dp_rank])");
  }
  KvEventBatch batch;
  const msgpack_object& ts = top.ptr[0];
  if (ts.type != MSGPACK_OBJECT_FLOAT64 && ts.type != MSGPACK_OBJECT_FLOAT32) {
    return Malformed("", IsNot("ts", ts, "a float"));
  }
  if (!std::isfinite(ts.via.f64)) return Malformed("", "ts is not a finite number");
  batch.ts = ts.via.f64;
  const msgpack_object& events = top.ptr[1];
  if (events.type != MSGPACK_OBJECT_ARRAY)
    return Malformed("", IsNot("events", events, "an array"));
  if (events.via.array.size > kMaxBatchEvents) {
    return Malformed("", "events has " + std::to_string(events.via.array.size) +
                             " events, more than " + std::to_string(kMaxBatchEvents));
  }
  batch.events.resize(events.via.array.size);
  for (uint32_t i = 0; i < events.via.array.size; ++i) {
    CT_RETURN_IF_ERROR(ReadEvent(events.via.array.ptr[i], i, &batch.events[i]));
  }
  if (top.size == 3 && top.ptr[2].type != MSGPACK_OBJECT_NIL) {
    int64_t rank = 0;
    CT_RETURN_IF_ERROR(ReadInt64(top.ptr[2], "", "dp_rank", &rank));
    batch.dp_rank = rank;
  }
  return batch;
}

bool SameOnWire(const KvEvent& a, const KvEvent& b) {
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case KvEvent::Kind::kStored:
      return a.medium == b.medium && a.block_hashes == b.block_hashes && a.parent == b.parent &&
             a.token_ids == b.token_ids && a.block_size == b.block_size;
    case KvEvent::Kind::kRemoved:
      return a.medium == b.medium && a.block_hashes == b.block_hashes;
    case KvEvent::Kind::kAllCleared:
      return true;
  }
  return false;
}

bool SameOnWire(const KvEventBatch& a, const KvEventBatch& b) {
  if (a.ts != b.ts || a.dp_rank != b.dp_rank || a.events.size() != b.events.size()) return false;
  for (size_t i = 0; i < a.events.size(); ++i) {
    if (!SameOnWire(a.events[i], b.events[i])) return false;
  }
  return true;
}

}  // namespace cachette::events
