// GGUF reader: maps the file, then parses and validates it in one forward pass over the bytes.
//
// Every read goes through Cursor, which checks the remaining length first, so no input can
// make the parser read outside the span. Counts from the file are checked against the bytes
// left before anything is reserved: each element needs at least kMin*Bytes bytes, so a count
// larger than remaining / min cannot be satisfied and is rejected before any allocation.
#include "model/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <utility>

#include "core/file_io.h"

namespace cachette::gguf {

static_assert(std::endian::native == std::endian::little,
              "GGUF is little-endian; the reader loads fields with memcpy");

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian u32
constexpr uint64_t kDefaultAlignment = 32;
constexpr uint64_t kHeaderBytes = 4 + 4 + 8 + 8;
// Smallest encodings, used to bound counts before reserving: a string is its u64 length; a
// key/value is a string key + u32 type + a 1-byte value; a tensor info is a name + n_dims +
// one dim + type + offset.
constexpr uint64_t kMinStringBytes = 8;
constexpr uint64_t kMinKvBytes = kMinStringBytes + 4 + 1;
constexpr uint64_t kMinTensorInfoBytes = kMinStringBytes + 4 + 8 + 4 + 8;
constexpr uint32_t kMaxDims = 4;

constexpr TypeTraits kTypeTraits[] = {
    /* 0 F32 */ {"f32", 1, 4},
    /* 1 F16 */ {"f16", 1, 2},
    /* 2 Q4_0 */ {"q4_0", 32, 18},
    /* 3 Q4_1 */ {"q4_1", 32, 20},
    /* 4 (removed Q4_2) */ {"", 0, 0},
    /* 5 (removed Q4_3) */ {"", 0, 0},
    /* 6 Q5_0 */ {"q5_0", 32, 22},
    /* 7 Q5_1 */ {"q5_1", 32, 24},
    /* 8 Q8_0 */ {"q8_0", 32, 34},
    /* 9 Q8_1 */ {"q8_1", 32, 36},
    /* 10 Q2_K */ {"q2_K", 256, 84},
    /* 11 Q3_K */ {"q3_K", 256, 110},
    /* 12 Q4_K */ {"q4_K", 256, 144},
    /* 13 Q5_K */ {"q5_K", 256, 176},
    /* 14 Q6_K */ {"q6_K", 256, 210},
    /* 15 Q8_K */ {"q8_K", 256, 292},
    /* 16 IQ2_XXS */ {"iq2_xxs", 256, 66},
    /* 17 IQ2_XS */ {"iq2_xs", 256, 74},
    /* 18 IQ3_XXS */ {"iq3_xxs", 256, 98},
    /* 19 IQ1_S */ {"iq1_s", 256, 50},
    /* 20 IQ4_NL */ {"iq4_nl", 32, 18},
    /* 21 IQ3_S */ {"iq3_s", 256, 110},
    /* 22 IQ2_S */ {"iq2_s", 256, 82},
    /* 23 IQ4_XS */ {"iq4_xs", 256, 136},
    /* 24 I8 */ {"i8", 1, 1},
    /* 25 I16 */ {"i16", 1, 2},
    /* 26 I32 */ {"i32", 1, 4},
    /* 27 I64 */ {"i64", 1, 8},
    /* 28 F64 */ {"f64", 1, 8},
    /* 29 IQ1_M */ {"iq1_m", 256, 56},
    /* 30 BF16 */ {"bf16", 1, 2},
};

// Bytes of a scalar value type in the file, 0 for string/array/unknown.
uint64_t ScalarBytes(ValueType t) {
  switch (t) {
    case ValueType::kUint8:
    case ValueType::kInt8:
    case ValueType::kBool:
      return 1;
    case ValueType::kUint16:
    case ValueType::kInt16:
      return 2;
    case ValueType::kUint32:
    case ValueType::kInt32:
    case ValueType::kFloat32:
      return 4;
    case ValueType::kUint64:
    case ValueType::kInt64:
    case ValueType::kFloat64:
      return 8;
    case ValueType::kString:
    case ValueType::kArray:
      return 0;
  }
  return 0;
}

bool IsKnownValueType(uint32_t t) { return t <= static_cast<uint32_t>(ValueType::kFloat64); }

// Smallest encoding of one array element of type `t` (arrays: u32 type + u64 count).
uint64_t MinElementBytes(ValueType t) {
  if (t == ValueType::kString) return kMinStringBytes;
  if (t == ValueType::kArray) return 4 + 8;
  return ScalarBytes(t);
}

std::string Quote(std::string_view s) {
  // Names come from the file: cap their length and hide control bytes so that a hostile name
  // cannot flood or garble a log line.
  constexpr size_t kMaxShown = 96;
  std::string out = "'";
  for (size_t i = 0; i < s.size() && i < kMaxShown; ++i) {
    unsigned char c = static_cast<unsigned char>(s[i]);
    out += (c < 0x20 || c == 0x7f) ? '?' : static_cast<char>(c);
  }
  if (s.size() > kMaxShown) out += "...";
  out += "'";
  return out;
}

Status Err(StatusCode code, std::string msg) { return Status(code, "GGUF: " + std::move(msg)); }

// A bounds-checked little-endian reader over the file.
class Cursor {
 public:
  explicit Cursor(ByteSpan bytes) : bytes_(bytes) {}

  uint64_t pos() const { return pos_; }
  uint64_t remaining() const { return bytes_.size() - pos_; }

  // Reads a fixed-size little-endian scalar; Corruption naming `what` when truncated.
  // `what` + `field` name the value in errors; kept apart so that the hot path builds no
  // strings.
  template <typename T>
  Status Read(T* out, std::string_view what, std::string_view field = {}) {
    if (remaining() < sizeof(T)) return Truncated(sizeof(T), what, field);
    std::memcpy(out, bytes_.data() + pos_, sizeof(T));
    pos_ += sizeof(T);
    return Status::Ok();
  }

  Status ReadString(std::string_view* out, std::string_view what) {
    uint64_t len = 0;
    CT_RETURN_IF_ERROR(Read(&len, what));
    if (len > remaining()) {
      return Err(StatusCode::kCorruption,
                 std::string(what) + ": string length " + std::to_string(len) + " at offset " +
                     std::to_string(pos_ - 8) + " extends past end of file (" +
                     std::to_string(bytes_.size()) + ")");
    }
    *out = std::string_view(reinterpret_cast<const char*>(bytes_.data() + pos_), len);
    pos_ += len;
    return Status::Ok();
  }

 private:
  Status Truncated(uint64_t need, std::string_view what, std::string_view field) const {
    return Err(StatusCode::kCorruption, std::string(what) + std::string(field) +
                                            ": truncated at offset " + std::to_string(pos_) +
                                            " (need " + std::to_string(need) + " bytes, file is " +
                                            std::to_string(bytes_.size()) + ")");
  }

  ByteSpan bytes_;
  uint64_t pos_ = 0;
};

// Parses metadata values. `what` names the key in every error.
class ValueParser {
 public:
  explicit ValueParser(Cursor* cur) : cur_(cur) {}

  Status Parse(ValueType type, int depth, const std::string& what, Value* out) {
    out->type = type;
    switch (type) {
      case ValueType::kUint8:
        return ReadUnsigned<uint8_t>(what, out);
      case ValueType::kUint16:
        return ReadUnsigned<uint16_t>(what, out);
      case ValueType::kUint32:
        return ReadUnsigned<uint32_t>(what, out);
      case ValueType::kUint64:
        return ReadUnsigned<uint64_t>(what, out);
      case ValueType::kInt8:
        return ReadSigned<int8_t>(what, out);
      case ValueType::kInt16:
        return ReadSigned<int16_t>(what, out);
      case ValueType::kInt32:
        return ReadSigned<int32_t>(what, out);
      case ValueType::kInt64:
        return ReadSigned<int64_t>(what, out);
      case ValueType::kFloat32: {
        float f = 0;
        CT_RETURN_IF_ERROR(cur_->Read(&f, what));
        out->f64 = f;
        return Status::Ok();
      }
      case ValueType::kFloat64:
        return cur_->Read(&out->f64, what);
      case ValueType::kBool: {
        uint8_t b = 0;
        CT_RETURN_IF_ERROR(cur_->Read(&b, what));
        if (b > 1) {
          return Err(StatusCode::kCorruption,
                     what + ": bool value " + std::to_string(b) + " is neither 0 nor 1");
        }
        out->b = b != 0;
        return Status::Ok();
      }
      case ValueType::kString:
        return cur_->ReadString(&out->str, what);
      case ValueType::kArray:
        return ParseArray(depth + 1, what, out);
    }
    return Err(StatusCode::kCorruption,
               what + ": unknown value type " + std::to_string(static_cast<uint32_t>(type)));
  }

 private:
  template <typename T>
  Status ReadUnsigned(const std::string& what, Value* out) {
    T v = 0;
    CT_RETURN_IF_ERROR(cur_->Read(&v, what));
    out->u64 = v;
    return Status::Ok();
  }
  template <typename T>
  Status ReadSigned(const std::string& what, Value* out) {
    T v = 0;
    CT_RETURN_IF_ERROR(cur_->Read(&v, what));
    out->i64 = v;
    return Status::Ok();
  }

  // `depth` is this array's nesting level (1 for an array directly under a key).
  Status ParseArray(int depth, const std::string& what, Value* out) {
    if (depth > kMaxArrayDepth) {
      return Err(StatusCode::kInvalidArgument,
                 what + ": arrays nested deeper than " + std::to_string(kMaxArrayDepth));
    }
    uint32_t elem_type = 0;
    uint64_t count = 0;
    CT_RETURN_IF_ERROR(cur_->Read(&elem_type, what, ": array type"));
    if (!IsKnownValueType(elem_type)) {
      return Err(StatusCode::kCorruption,
                 what + ": unknown array element value type " + std::to_string(elem_type));
    }
    CT_RETURN_IF_ERROR(cur_->Read(&count, what, ": array count"));
    out->array_type = static_cast<ValueType>(elem_type);
    uint64_t min_bytes = MinElementBytes(out->array_type);
    if (count > cur_->remaining() / min_bytes) {
      return Err(StatusCode::kCorruption, what + ": array count " + std::to_string(count) + " of " +
                                              std::string(ValueTypeName(out->array_type)) +
                                              " needs at least " + std::to_string(min_bytes) +
                                              " bytes each, but only " +
                                              std::to_string(cur_->remaining()) + " bytes remain");
    }
    total_elements_ += count;
    if (total_elements_ > kMaxArrayElements) {
      return Err(StatusCode::kInvalidArgument, what + ": more than " +
                                                   std::to_string(kMaxArrayElements) +
                                                   " array elements in the file");
    }
    out->array.resize(count);
    for (Value& v : out->array) {
      CT_RETURN_IF_ERROR(Parse(out->array_type, depth, what, &v));
    }
    return Status::Ok();
  }

  Cursor* cur_;
  uint64_t total_elements_ = 0;
};

bool MulOverflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_mul_overflow(a, b, out);
}
bool AddOverflows(uint64_t a, uint64_t b, uint64_t* out) {
  return __builtin_add_overflow(a, b, out);
}

}  // namespace

std::string_view ValueTypeName(ValueType t) {
  switch (t) {
    case ValueType::kUint8:
      return "uint8";
    case ValueType::kInt8:
      return "int8";
    case ValueType::kUint16:
      return "uint16";
    case ValueType::kInt16:
      return "int16";
    case ValueType::kUint32:
      return "uint32";
    case ValueType::kInt32:
      return "int32";
    case ValueType::kFloat32:
      return "float32";
    case ValueType::kBool:
      return "bool";
    case ValueType::kString:
      return "string";
    case ValueType::kArray:
      return "array";
    case ValueType::kUint64:
      return "uint64";
    case ValueType::kInt64:
      return "int64";
    case ValueType::kFloat64:
      return "float64";
  }
  return "unknown";
}

const TypeTraits* GetTypeTraits(TensorType t) {
  auto i = static_cast<uint32_t>(t);
  if (i >= std::size(kTypeTraits) || kTypeTraits[i].block_elems == 0) return nullptr;
  return &kTypeTraits[i];
}

std::string TensorTypeName(TensorType t) {
  const TypeTraits* traits = GetTypeTraits(t);
  if (traits != nullptr) return std::string(traits->name);
  return "type(" + std::to_string(static_cast<uint32_t>(t)) + ")";
}

bool Value::is_integer() const {
  switch (type) {
    case ValueType::kUint8:
    case ValueType::kInt8:
    case ValueType::kUint16:
    case ValueType::kInt16:
    case ValueType::kUint32:
    case ValueType::kInt32:
    case ValueType::kUint64:
    case ValueType::kInt64:
      return true;
    default:
      return false;
  }
}

int64_t TensorInfo::n_elements() const {
  // The reader checked that this product does not overflow.
  int64_t n = 1;
  for (int64_t d : dims) n *= d;
  return n;
}

GgufFile::~GgufFile() {
  if (map_ != nullptr) munmap(map_, map_size_);
}

Result<std::unique_ptr<GgufFile>> GgufFile::Open(const std::string& path, Residence residence) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) return IOError("GGUF: cannot open '" + path + "': " + std::strerror(errno));
  struct stat st;
  if (fstat(fd.get(), &st) != 0) {
    return IOError("GGUF: cannot stat '" + path + "': " + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) return IOError("GGUF: '" + path + "' is not a regular file");
  std::unique_ptr<GgufFile> file(new GgufFile());
  file->path_ = path;
  size_t size = static_cast<size_t>(st.st_size);
  // mmap rejects length 0; an empty file still goes through Parse() for its error.
  if (size > 0 && residence == Residence::kHugePages) {
    try {
      file->copy_ = std::make_unique<ZeroedBuffer>(size);
    } catch (const std::bad_alloc&) {
      return IOError("GGUF: no memory to read '" + path + "' (" + std::to_string(size) +
                     " bytes) into");
    }
    auto got = ReadAt(fd.get(), file->copy_->get(), size, 0, path);
    if (!got.ok()) return got.status().WithContext("GGUF");
    if (*got < size) {
      return IOError("GGUF: '" + path + "' ended at byte " + std::to_string(*got) + " of " +
                     std::to_string(size) + " (changed while being read)");
    }
    file->bytes_ = ByteSpan(file->copy_->get(), size);
  } else if (size > 0) {
    void* p = mmap(nullptr, size, PROT_READ, MAP_PRIVATE, fd.get(), 0);
    if (p == MAP_FAILED) {
      return IOError("GGUF: cannot mmap '" + path + "': " + std::strerror(errno));
    }
    file->map_ = p;  // the mapping keeps the file alive once fd is closed
    file->map_size_ = size;
    file->bytes_ = ByteSpan(static_cast<const std::byte*>(p), size);
  }
  Status s = file->Parse();
  if (!s.ok()) return s.WithContext(path);
  return file;
}

std::byte* GgufFile::WritableData(const TensorInfo& t) {
  if (copy_ == nullptr) return nullptr;
  return copy_->get() + (t.data - bytes_.data());
}

Result<std::unique_ptr<GgufFile>> GgufFile::FromMemory(ByteSpan bytes) {
  std::unique_ptr<GgufFile> file(new GgufFile());
  file->bytes_ = bytes;
  Status s = file->Parse();
  if (!s.ok()) return s;
  return file;
}

Status GgufFile::Parse() {
  const uint64_t size = bytes_.size();
  if (size < kHeaderBytes) {
    return Err(StatusCode::kCorruption, "file is " + std::to_string(size) +
                                            " bytes, too small for a header (" +
                                            std::to_string(kHeaderBytes) + ")");
  }
  Cursor cur(bytes_);
  uint32_t magic = 0;
  CT_RETURN_IF_ERROR(cur.Read(&magic, "magic"));
  if (magic != kMagic) {
    char hex[16];
    std::snprintf(hex, sizeof(hex), "0x%08x", magic);
    return Err(StatusCode::kCorruption, std::string("bad magic ") + hex + " (want \"GGUF\")");
  }
  CT_RETURN_IF_ERROR(cur.Read(&version_, "version"));
  if (version_ != 2 && version_ != 3) {
    return Err(version_ == 0 ? StatusCode::kCorruption : StatusCode::kUnimplemented,
               "unsupported version " + std::to_string(version_) + " (want 2 or 3)");
  }
  uint64_t n_tensors = 0;
  uint64_t n_kv = 0;
  CT_RETURN_IF_ERROR(cur.Read(&n_tensors, "tensor count"));
  CT_RETURN_IF_ERROR(cur.Read(&n_kv, "metadata count"));
  // Both sections must fit in what is left; checked up front so that reserve() below is
  // bounded by the file size.
  if (n_kv > cur.remaining() / kMinKvBytes) {
    return Err(StatusCode::kCorruption,
               "metadata count " + std::to_string(n_kv) + " cannot fit in the " +
                   std::to_string(cur.remaining()) + " bytes after the header");
  }
  if (n_tensors > cur.remaining() / kMinTensorInfoBytes) {
    return Err(StatusCode::kCorruption,
               "tensor count " + std::to_string(n_tensors) + " cannot fit in the " +
                   std::to_string(cur.remaining()) + " bytes after the header");
  }

  // Metadata.
  // Reserve at most a modest amount: the count is bounded by the file size, but a large hostile
  // file should not commit memory before its entries prove to be there.
  constexpr uint64_t kMaxReserve = 1 << 16;
  kvs_.reserve(std::min(n_kv, kMaxReserve));
  kv_index_.reserve(std::min(n_kv, kMaxReserve));
  ValueParser values(&cur);
  for (uint64_t i = 0; i < n_kv; ++i) {
    KeyValue kv;
    std::string idx = "metadata #" + std::to_string(i);
    CT_RETURN_IF_ERROR(cur.ReadString(&kv.key, idx + " key"));
    if (kv.key.empty()) return Err(StatusCode::kCorruption, idx + ": empty key");
    std::string what = "key " + Quote(kv.key);
    uint32_t type = 0;
    CT_RETURN_IF_ERROR(cur.Read(&type, what, ": value type"));
    if (!IsKnownValueType(type)) {
      return Err(StatusCode::kCorruption, what + ": unknown value type " + std::to_string(type));
    }
    CT_RETURN_IF_ERROR(values.Parse(static_cast<ValueType>(type), 0, what, &kv.value));
    if (!kv_index_.emplace(kv.key, kvs_.size()).second) {
      return Err(StatusCode::kCorruption, "duplicate " + what);
    }
    kvs_.push_back(std::move(kv));
  }

  // Alignment, needed before tensor offsets can be checked.
  if (const Value* a = Find("general.alignment"); a != nullptr) {
    // Accept any integer width (the spec says uint32); cap at 2^30 so that rounding the data
    // offset up cannot overflow and a hostile value cannot demand gigabytes of padding.
    Result<int64_t> v = a->is_integer() ? GetInt("general.alignment") : Result<int64_t>(-1);
    if (!v.ok() || *v <= 0 || !std::has_single_bit(static_cast<uint64_t>(*v)) ||
        *v > (int64_t{1} << 30)) {
      std::string got = !a->is_integer() ? std::string(ValueTypeName(a->type))
                        : a->type == ValueType::kUint8 || a->type == ValueType::kUint16 ||
                                a->type == ValueType::kUint32 || a->type == ValueType::kUint64
                            ? std::to_string(a->u64)
                            : std::to_string(a->i64);
      return Err(StatusCode::kCorruption,
                 "general.alignment must be a nonzero power of two up to 2^30, got " + got);
    }
    alignment_ = static_cast<uint64_t>(*v);
  } else {
    alignment_ = kDefaultAlignment;
  }

  // Tensor infos.
  tensors_.reserve(std::min(n_tensors, kMaxReserve));
  tensor_index_.reserve(std::min(n_tensors, kMaxReserve));
  for (uint64_t i = 0; i < n_tensors; ++i) {
    TensorInfo t;
    std::string idx = "tensor #" + std::to_string(i);
    CT_RETURN_IF_ERROR(cur.ReadString(&t.name, idx + " name"));
    if (t.name.empty()) return Err(StatusCode::kCorruption, idx + ": empty name");
    std::string what = "tensor " + Quote(t.name);
    uint32_t n_dims = 0;
    CT_RETURN_IF_ERROR(cur.Read(&n_dims, what, ": n_dims"));
    if (n_dims < 1 || n_dims > kMaxDims) {
      return Err(StatusCode::kCorruption, what + ": n_dims " + std::to_string(n_dims) +
                                              " not in [1, " + std::to_string(kMaxDims) + "]");
    }
    t.dims.resize(n_dims);
    uint64_t n_elements = 1;
    for (uint32_t d = 0; d < n_dims; ++d) {
      uint64_t ne = 0;
      CT_RETURN_IF_ERROR(cur.Read(&ne, what, ": dims"));
      if (ne == 0 || ne > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return Err(StatusCode::kCorruption, what + ": dim " + std::to_string(d) + " is " +
                                                std::to_string(ne) +
                                                " (must be >= 1 and fit in int64)");
      }
      if (MulOverflows(n_elements, ne, &n_elements) ||
          n_elements > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return Err(StatusCode::kCorruption, what + ": element count overflows int64");
      }
      t.dims[d] = static_cast<int64_t>(ne);
    }
    uint32_t type = 0;
    CT_RETURN_IF_ERROR(cur.Read(&type, what, ": type"));
    t.type = static_cast<TensorType>(type);
    const TypeTraits* traits = GetTypeTraits(t.type);
    if (traits == nullptr) {
      return Err(StatusCode::kUnimplemented,
                 what + ": unknown tensor type id " + std::to_string(type));
    }
    if (t.dims[0] % traits->block_elems != 0) {
      return Err(StatusCode::kCorruption, what + ": ne[0] = " + std::to_string(t.dims[0]) +
                                              " is not a multiple of the " +
                                              std::string(traits->name) + " block size " +
                                              std::to_string(traits->block_elems));
    }
    // n_elements / block_elems blocks; ne[0] divisible implies the total is too.
    uint64_t n_blocks = n_elements / static_cast<uint64_t>(traits->block_elems);
    if (MulOverflows(n_blocks, static_cast<uint64_t>(traits->block_bytes), &t.n_bytes)) {
      return Err(StatusCode::kCorruption, what + ": byte size overflows");
    }
    CT_RETURN_IF_ERROR(cur.Read(&t.offset, what, ": offset"));
    if (t.offset % alignment_ != 0) {
      return Err(StatusCode::kCorruption, what + ": offset " + std::to_string(t.offset) +
                                              " is not a multiple of the alignment " +
                                              std::to_string(alignment_));
    }
    if (!tensor_index_.emplace(t.name, tensors_.size()).second) {
      return Err(StatusCode::kCorruption, "duplicate " + what);
    }
    tensors_.push_back(std::move(t));
  }

  // Data section: header end rounded up to the alignment. A file without tensors may end
  // before that (nothing to pad for), so only the tensor ranges are checked against the size.
  uint64_t header_end = cur.pos();
  if (AddOverflows(header_end, alignment_ - 1, &data_offset_)) {
    return Err(StatusCode::kCorruption, "data offset overflows");
  }
  data_offset_ &= ~(alignment_ - 1);
  for (TensorInfo& t : tensors_) {
    uint64_t begin = 0;
    uint64_t end = 0;
    if (AddOverflows(data_offset_, t.offset, &begin) || AddOverflows(begin, t.n_bytes, &end) ||
        end > size) {
      return Err(StatusCode::kCorruption, "tensor " + Quote(t.name) + ": data [" +
                                              std::to_string(begin) + ", " + std::to_string(end) +
                                              ") extends past end of file (" +
                                              std::to_string(size) + ")");
    }
    t.data = bytes_.data() + begin;
  }
  // Overlaps: sort by offset (n log n) and compare neighbours.
  std::vector<const TensorInfo*> by_offset;
  by_offset.reserve(tensors_.size());
  for (const TensorInfo& t : tensors_) by_offset.push_back(&t);
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->offset < b->offset; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    const TensorInfo* prev = by_offset[i - 1];
    const TensorInfo* cur_t = by_offset[i];
    if (prev->offset + prev->n_bytes > cur_t->offset) {  // no overflow: both inside the file
      return Err(StatusCode::kCorruption,
                 "tensor " + Quote(cur_t->name) + " at offset " + std::to_string(cur_t->offset) +
                     " overlaps tensor " + Quote(prev->name) + " [" + std::to_string(prev->offset) +
                     ", " + std::to_string(prev->offset + prev->n_bytes) + ")");
    }
  }
  return Status::Ok();
}

const Value* GgufFile::Find(std::string_view key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &kvs_[it->second].value;
}

const TensorInfo* GgufFile::FindTensor(std::string_view name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &tensors_[it->second];
}

namespace {

Status NotFoundKey(std::string_view key) {
  return NotFound("GGUF: key '" + std::string(key) + "' not found");
}
Status WrongType(std::string_view key, const Value& v, std::string_view want) {
  return InvalidArgument("GGUF: key '" + std::string(key) + "' is " +
                         std::string(ValueTypeName(v.type)) + ", want " + std::string(want));
}

Result<int64_t> AsInt(std::string_view key, const Value& v) {
  if (!v.is_integer()) return WrongType(key, v, "an integer");
  switch (v.type) {
    case ValueType::kUint8:
    case ValueType::kUint16:
    case ValueType::kUint32:
    case ValueType::kUint64:
      if (v.u64 > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return InvalidArgument("GGUF: key '" + std::string(key) + "' = " + std::to_string(v.u64) +
                               " does not fit in int64");
      }
      return static_cast<int64_t>(v.u64);
    default:
      return v.i64;
  }
}

Result<double> AsFloat(std::string_view key, const Value& v) {
  if (v.is_float()) return v.f64;
  if (v.is_integer()) {
    CT_ASSIGN_OR_RETURN(int64_t i, AsInt(key, v));
    return static_cast<double>(i);
  }
  return WrongType(key, v, "a float");
}

}  // namespace

Result<int64_t> GgufFile::GetInt(std::string_view key) const {
  const Value* v = Find(key);
  if (v == nullptr) return NotFoundKey(key);
  return AsInt(key, *v);
}

Result<double> GgufFile::GetFloat(std::string_view key) const {
  const Value* v = Find(key);
  if (v == nullptr) return NotFoundKey(key);
  return AsFloat(key, *v);
}

Result<bool> GgufFile::GetBool(std::string_view key) const {
  const Value* v = Find(key);
  if (v == nullptr) return NotFoundKey(key);
  if (v->type != ValueType::kBool) return WrongType(key, *v, "bool");
  return v->b;
}

Result<std::string_view> GgufFile::GetString(std::string_view key) const {
  const Value* v = Find(key);
  if (v == nullptr) return NotFoundKey(key);
  if (v->type != ValueType::kString) return WrongType(key, *v, "string");
  return v->str;
}

Result<const std::vector<Value>*> GgufFile::GetArray(std::string_view key,
                                                     ValueType elem_type) const {
  const Value* v = Find(key);
  if (v == nullptr) return NotFoundKey(key);
  if (v->type != ValueType::kArray || v->array_type != elem_type) {
    std::string got(ValueTypeName(v->type));
    if (v->type == ValueType::kArray) got += " of " + std::string(ValueTypeName(v->array_type));
    return InvalidArgument("GGUF: key '" + std::string(key) + "' is " + got + ", want array of " +
                           std::string(ValueTypeName(elem_type)));
  }
  return &v->array;
}

Result<int64_t> GgufFile::GetIntOr(std::string_view key, int64_t dflt) const {
  const Value* v = Find(key);
  if (v == nullptr) return dflt;
  return AsInt(key, *v);
}

Result<double> GgufFile::GetFloatOr(std::string_view key, double dflt) const {
  const Value* v = Find(key);
  if (v == nullptr) return dflt;
  return AsFloat(key, *v);
}

Result<bool> GgufFile::GetBoolOr(std::string_view key, bool dflt) const {
  const Value* v = Find(key);
  if (v == nullptr) return dflt;
  if (v->type != ValueType::kBool) return WrongType(key, *v, "bool");
  return v->b;
}

}  // namespace cachette::gguf
