// GGUF v3 writer. Metadata values are encoded when added (so AddValue can copy views into
// another file's mapping without keeping it alive); tensors are laid out at Serialize time.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cerrno>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <utility>

#include "core/check.h"
#include "model/gguf.h"

namespace cachette::gguf {

namespace {

constexpr uint32_t kVersion = 3;
constexpr uint64_t kDefaultAlignment = 32;
constexpr std::string_view kAlignmentKey = "general.alignment";

// resize + memcpy rather than insert(): g++ 12 warns falsely (-Wstringop-overflow) about
// small range inserts into an empty vector.
void PutBytes(std::vector<std::byte>* out, const void* p, size_t n) {
  if (n == 0) return;
  size_t at = out->size();
  out->resize(at + n);
  std::memcpy(out->data() + at, p, n);
}

template <typename T>
void Put(std::vector<std::byte>* out, T v) {
  PutBytes(out, &v, sizeof(T));
}

void PutString(std::vector<std::byte>* out, std::string_view s) {
  Put<uint64_t>(out, s.size());
  PutBytes(out, s.data(), s.size());
}

void PutPadding(std::vector<std::byte>* out, uint64_t alignment) {
  out->resize((out->size() + alignment - 1) / alignment * alignment, std::byte{0});
}

// The value of `v` as type `type`, without the leading type tag.
void PutPayload(std::vector<std::byte>* out, ValueType type, const Value& v) {
  switch (type) {
    case ValueType::kUint8:
      Put<uint8_t>(out, static_cast<uint8_t>(v.u64));
      break;
    case ValueType::kUint16:
      Put<uint16_t>(out, static_cast<uint16_t>(v.u64));
      break;
    case ValueType::kUint32:
      Put<uint32_t>(out, static_cast<uint32_t>(v.u64));
      break;
    case ValueType::kUint64:
      Put<uint64_t>(out, v.u64);
      break;
    case ValueType::kInt8:
      Put<int8_t>(out, static_cast<int8_t>(v.i64));
      break;
    case ValueType::kInt16:
      Put<int16_t>(out, static_cast<int16_t>(v.i64));
      break;
    case ValueType::kInt32:
      Put<int32_t>(out, static_cast<int32_t>(v.i64));
      break;
    case ValueType::kInt64:
      Put<int64_t>(out, v.i64);
      break;
    case ValueType::kFloat32:
      Put<float>(out, static_cast<float>(v.f64));
      break;
    case ValueType::kFloat64:
      Put<double>(out, v.f64);
      break;
    case ValueType::kBool:
      Put<uint8_t>(out, v.b ? 1 : 0);
      break;
    case ValueType::kString:
      PutString(out, v.str);
      break;
    case ValueType::kArray:
      Put<uint32_t>(out, static_cast<uint32_t>(v.array_type));
      Put<uint64_t>(out, v.array.size());
      // Elements are written as the array's element type, whatever their own tag says.
      for (const Value& e : v.array) PutPayload(out, v.array_type, e);
      break;
  }
}

Status WriteAll(int fd, const std::byte* p, size_t n, const std::string& path) {
  while (n > 0) {
    ssize_t w = ::write(fd, p, n);
    if (w < 0) {
      if (errno == EINTR) continue;
      return IOError("GGUF: write to '" + path + "' failed: " + std::strerror(errno));
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return Status::Ok();
}

}  // namespace

void GgufWriter::AddUint32(std::string key, uint32_t v) {
  Value val;
  val.type = ValueType::kUint32;
  val.u64 = v;
  AddValue(std::move(key), val);
}

void GgufWriter::AddInt32(std::string key, int32_t v) {
  Value val;
  val.type = ValueType::kInt32;
  val.i64 = v;
  AddValue(std::move(key), val);
}

void GgufWriter::AddUint64(std::string key, uint64_t v) {
  Value val;
  val.type = ValueType::kUint64;
  val.u64 = v;
  AddValue(std::move(key), val);
}

void GgufWriter::AddFloat32(std::string key, float v) {
  Value val;
  val.type = ValueType::kFloat32;
  val.f64 = v;
  AddValue(std::move(key), val);
}

void GgufWriter::AddBool(std::string key, bool v) {
  Value val;
  val.type = ValueType::kBool;
  val.b = v;
  AddValue(std::move(key), val);
}

void GgufWriter::AddString(std::string key, std::string v) {
  Value val;
  val.type = ValueType::kString;
  val.str = v;  // encoded (copied) before `v` dies
  AddValue(std::move(key), val);
}

void GgufWriter::AddStringArray(std::string key, std::vector<std::string> v) {
  Entry e{std::move(key), {}};
  Put<uint32_t>(&e.encoded, static_cast<uint32_t>(ValueType::kArray));
  Put<uint32_t>(&e.encoded, static_cast<uint32_t>(ValueType::kString));
  Put<uint64_t>(&e.encoded, v.size());
  for (const std::string& s : v) PutString(&e.encoded, s);
  kvs_.push_back(std::move(e));
}

void GgufWriter::AddFloat32Array(std::string key, std::vector<float> v) {
  Entry e{std::move(key), {}};
  Put<uint32_t>(&e.encoded, static_cast<uint32_t>(ValueType::kArray));
  Put<uint32_t>(&e.encoded, static_cast<uint32_t>(ValueType::kFloat32));
  Put<uint64_t>(&e.encoded, v.size());
  for (float f : v) Put<float>(&e.encoded, f);
  kvs_.push_back(std::move(e));
}

void GgufWriter::AddInt32Array(std::string key, std::vector<int32_t> v) {
  Entry e{std::move(key), {}};
  Put<uint32_t>(&e.encoded, static_cast<uint32_t>(ValueType::kArray));
  Put<uint32_t>(&e.encoded, static_cast<uint32_t>(ValueType::kInt32));
  Put<uint64_t>(&e.encoded, v.size());
  for (int32_t i : v) Put<int32_t>(&e.encoded, i);
  kvs_.push_back(std::move(e));
}

void GgufWriter::AddValue(std::string key, const Value& v) {
  if (key == kAlignmentKey && v.is_integer()) {
    bool is_unsigned = v.type == ValueType::kUint8 || v.type == ValueType::kUint16 ||
                       v.type == ValueType::kUint32 || v.type == ValueType::kUint64;
    uint64_t a = is_unsigned ? v.u64 : (v.i64 > 0 ? static_cast<uint64_t>(v.i64) : 0);
    if (a != 0 && a <= (uint64_t{1} << 30) && std::has_single_bit(a)) {
      SetAlignment(static_cast<uint32_t>(a));
      return;
    }
  }
  Entry e{std::move(key), {}};
  Put<uint32_t>(&e.encoded, static_cast<uint32_t>(v.type));
  PutPayload(&e.encoded, v.type, v);
  kvs_.push_back(std::move(e));
}

void GgufWriter::SetAlignment(uint32_t alignment) {
  CT_CHECK(std::has_single_bit(alignment) && alignment <= (uint32_t{1} << 30))
      << "GGUF alignment must be a power of two, got " << alignment;
  alignment_ = alignment;
}

Status GgufWriter::AddTensor(std::string name, TensorType type, std::vector<int64_t> dims,
                             std::vector<std::byte> data) {
  std::string what = "GGUF: tensor '" + name + "': ";
  if (name.empty()) return InvalidArgument("GGUF: tensor name is empty");
  const TypeTraits* traits = GetTypeTraits(type);
  if (traits == nullptr) return InvalidArgument(what + "unknown type " + TensorTypeName(type));
  if (dims.empty() || dims.size() > 4) {
    return InvalidArgument(what + std::to_string(dims.size()) + " dims, want 1 to 4");
  }
  uint64_t n = 1;
  for (int64_t d : dims) {
    if (d < 1) return InvalidArgument(what + "dim " + std::to_string(d) + " < 1");
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n) ||
        n > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      return InvalidArgument(what + "element count overflows");
    }
  }
  if (dims[0] % traits->block_elems != 0) {
    return InvalidArgument(what + "ne[0] = " + std::to_string(dims[0]) +
                           " is not a multiple of the block size " +
                           std::to_string(traits->block_elems));
  }
  uint64_t n_bytes = 0;
  if (__builtin_mul_overflow(n / traits->block_elems, static_cast<uint64_t>(traits->block_bytes),
                             &n_bytes)) {
    return InvalidArgument(what + "byte size overflows");
  }
  if (data.size() != n_bytes) {
    return InvalidArgument(what + "data is " + std::to_string(data.size()) + " bytes, want " +
                           std::to_string(n_bytes));
  }
  tensors_.push_back(Tensor{std::move(name), type, std::move(dims), std::move(data)});
  return Status::Ok();
}

// Everything before the data section, padded to the alignment: header, metadata, tensor
// infos with offsets laid out back to back, each rounded up to the alignment.
std::vector<std::byte> GgufWriter::SerializeHeader() const {
  const bool write_alignment = alignment_ != kDefaultAlignment;
  std::vector<std::byte> out;
  Put<uint32_t>(&out, 0x46554747);  // "GGUF" as a little-endian u32
  Put<uint32_t>(&out, kVersion);
  Put<uint64_t>(&out, tensors_.size());
  Put<uint64_t>(&out, kvs_.size() + (write_alignment ? 1 : 0));
  if (write_alignment) {
    PutString(&out, kAlignmentKey);
    Put<uint32_t>(&out, static_cast<uint32_t>(ValueType::kUint32));
    Put<uint32_t>(&out, static_cast<uint32_t>(alignment_));
  }
  for (const Entry& e : kvs_) {
    PutString(&out, e.key);
    PutBytes(&out, e.encoded.data(), e.encoded.size());
  }
  uint64_t offset = 0;
  for (const Tensor& t : tensors_) {
    PutString(&out, t.name);
    Put<uint32_t>(&out, static_cast<uint32_t>(t.dims.size()));
    for (int64_t d : t.dims) Put<uint64_t>(&out, static_cast<uint64_t>(d));
    Put<uint32_t>(&out, static_cast<uint32_t>(t.type));
    Put<uint64_t>(&out, offset);
    offset = (offset + t.data.size() + alignment_ - 1) / alignment_ * alignment_;
  }
  PutPadding(&out, alignment_);
  return out;
}

std::vector<std::byte> GgufWriter::Serialize() const {
  std::vector<std::byte> out = SerializeHeader();
  for (const Tensor& t : tensors_) {
    PutBytes(&out, t.data.data(), t.data.size());
    PutPadding(&out, alignment_);
  }
  return out;
}

Status GgufWriter::WriteFile(const std::string& path) const {
  // Written under a temporary name and renamed, so that readers see the old file or the
  // complete new one, never a prefix. Tensor data is streamed, not copied into one buffer.
  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return IOError("GGUF: cannot create '" + tmp + "': " + std::strerror(errno));
  auto fail = [&](Status s) {
    ::close(fd);
    ::unlink(tmp.c_str());
    return s;
  };
  std::vector<std::byte> header = SerializeHeader();
  Status s = WriteAll(fd, header.data(), header.size(), tmp);
  if (!s.ok()) return fail(s);
  const std::vector<std::byte> zeros(alignment_);
  for (const Tensor& t : tensors_) {
    s = WriteAll(fd, t.data.data(), t.data.size(), tmp);
    if (!s.ok()) return fail(s);
    uint64_t pad = (alignment_ - t.data.size() % alignment_) % alignment_;
    s = WriteAll(fd, zeros.data(), pad, tmp);
    if (!s.ok()) return fail(s);
  }
  if (::fsync(fd) != 0) {
    return fail(IOError("GGUF: fsync '" + tmp + "' failed: " + std::strerror(errno)));
  }
  if (::close(fd) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    return IOError("GGUF: close '" + tmp + "' failed: " + std::strerror(err));
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    return IOError("GGUF: rename '" + tmp + "' to '" + path + "' failed: " + std::strerror(err));
  }
  // Make the rename itself durable; best effort, the file is complete either way.
  std::string dir = path.find('/') == std::string::npos ? "." : path.substr(0, path.rfind('/'));
  if (dir.empty()) dir = "/";
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
  return Status::Ok();
}

}  // namespace cachette::gguf
