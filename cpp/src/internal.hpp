// Internal pieces of kiln's C++ runtime, shared by its source files (not installed).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "kiln/runtime.hpp"

namespace kiln {
namespace detail {

/// A parsed JSON value, objects in document order (messages print them as Python would).
struct Json {
  enum Type { Null, Bool, Int, Float, Str, List, Dict };
  Type type = Null;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;
  std::vector<Json> list;
  std::vector<std::pair<std::string, Json>> dict;

  /// The member ``key`` of an object (nullptr when absent or not an object).
  const Json* get(const std::string& key) const;
  bool has(const std::string& key) const { return get(key) != nullptr; }
  bool is_int() const { return type == Int; }
  bool is_str() const { return type == Str; }
};

/// Parse JSON text (tvm-ffi's parser); false with ``error`` set when the text is not JSON.
bool parse_json(const std::string& text, Json* out, std::string* error);

/// Python's repr() of the value json.loads would give (for messages that print one).
std::string py_repr(const Json& v);
/// Python's str(): the text of a string, repr() of anything else.
std::string py_str(const Json& v);
/// Python's type(v).__name__ of the value json.loads would give.
std::string py_type(const Json& v);
/// repr() of a str.
std::string repr_str(const std::string& s);
/// repr() of a list of str: ['a', 'b'].
std::string repr_list(const std::vector<std::string>& items);
/// repr() of bytes: b'PK\x03\x04'.
std::string repr_bytes(const std::string& s);
/// The first ``n`` characters (code points) of UTF-8 text, as Python's "{x:.n}" keeps.
std::string trunc(const std::string& s, size_t n);
/// An integer with thousands separators, as Python's "{n:,}".
std::string commas(int64_t n);
/// Python's str(float) (shortest repr).
std::string py_float(double d);

/// sha256 of bytes as 64 lower-case hex digits (OpenSSL).
std::string sha256_hex(const void* data, size_t n);

/// One entry of a zip central directory (what Python's ZipInfo holds of it).
struct ZipEntry {
  std::string name;
  uint16_t flags = 0;
  uint16_t method = 0;
  uint32_t crc = 0;
  uint64_t compress_size = 0;
  uint64_t file_size = 0;
  uint64_t header_offset = 0;
};

/// A zip failure in Python zipfile's words: ``type`` is the exception name (BadZipFile, ...).
struct ZipProblem {
  std::string type;
  std::string message;
};

/// Random-access bytes a zip is read from: a file (the artifact) or a buffer (weights.npz).
class ZipSource {
 public:
  virtual ~ZipSource() = default;
  virtual uint64_t size() const = 0;
  /// Up to ``n`` bytes at ``offset`` (fewer at the end).
  virtual std::string read(uint64_t offset, size_t n) const = 0;
};

/// A buffer (weights.npz inside the artifact), not copied: it must outlive the source.
class BufferSource : public ZipSource {
 public:
  explicit BufferSource(const std::string& data) : data_(data) {}
  uint64_t size() const override { return data_.size(); }
  std::string read(uint64_t offset, size_t n) const override {
    return offset >= data_.size() ? std::string() : data_.substr(static_cast<size_t>(offset), n);
  }

 private:
  const std::string& data_;
};

/// The central directory as Python's zipfile reads it; throws ZipProblem.
std::vector<ZipEntry> zip_directory(const ZipSource& src);
/// Offset of a member's data: its local header checked as zipfile.open does; throws ZipProblem.
uint64_t zip_data_offset(const ZipSource& src, const ZipEntry& e);
/// A member inflated into exactly its directory size; ArtifactError/ZipProblem as Python's _inflate.
std::string zip_inflate(const std::string& path, const ZipSource& src, const ZipEntry& e);
/// crc32 (zlib) of bytes.
uint32_t crc32_of(const void* data, size_t n);

/// Python's check_limit: LimitError when ``got`` exceeds the limit named ``field``.
void check_limit(const Limits& limits, const std::string& field, uint64_t got, const std::string& what);

/// A validated artifact in memory (Python's ArtifactContents).
struct Weight {
  std::string name;
  std::string dtype;  // the manifest's name (float32, bfloat16, ...)
  std::vector<int64_t> shape;
  std::string bytes;  // C order, native byte order
};

struct Contents {
  std::string manifest_text;
  Json manifest;
  std::string library;
  std::vector<Weight> weights;
  TrustInfo trust;
};

/// Read and validate an artifact exactly as Python's read_artifact.
Contents read_artifact(const std::string& path, const LoadOptions& options);

/// Problems with a manifest's structure; [] when usable (Python's validate_manifest).
std::vector<std::string> validate_manifest(const Json& m, bool need_members);

/// CPU checks (Python's runtime/cpu.py).
std::vector<std::string> required_cpu_features(const Json& target);
std::vector<std::string> missing_cpu_features(const std::vector<std::string>& required);
std::string host_arch();
std::string target_arch(const Json& target);  // "" when the target names none

/// Item size in bytes of a manifest dtype name (0 when unknown).
int dtype_itemsize(const std::string& name);

/// Trusted public keys (32 raw bytes) with where each came from: the given files, KILN_TRUSTED_KEYS,
/// the local key (Python's signing.trusted_public_keys); KeyFileError for a bad given key file.
using TrustedKeys = std::vector<std::pair<std::string, std::string>>;
TrustedKeys trusted_public_keys(const std::vector<std::string>& given);
/// Trust decision (Python's signing.verify_record); throws ArtifactError/TrustError.
TrustInfo verify_record(const std::string& path, const std::string& manifest_bytes,
                        const std::string& record_bytes, const TrustedKeys& trusted, bool allow_unsigned);

/// Kernel thread pool (runtime/threads.py's C source, compiled into this library).
/// Points the kernel library loaded from ``lib_path`` at kiln's pool; false when it keeps TVM's.
bool adopt_thread_pool(const std::string& lib_path);
/// The thread count a load uses: ``threads``, else TVM_NUM_THREADS, else the CPUs this process may use.
int configure_threads(int threads);

}  // namespace detail
}  // namespace kiln
