// Reading a .kiln (Python's runtime/artifact.py): the same checks, in the same order, with the same
// messages: zip directory against the limits, digest and signature, manifest, member sha256s, weights.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <set>

#include "internal.hpp"

namespace kiln {
namespace detail {

namespace {

const char* const kMembers[] = {"manifest.json", "signature.json", "lib.so", "weights.npz", "model.ir"};
const char* const kHashed[] = {"lib.so", "weights.npz", "model.ir"};
const char* const kRequired[] = {"format_version", "kiln_version", "tvm_version", "target", "cpu_features",
                                 "pipeline", "inputs", "outputs", "symbols", "weights", "entry", "kernels",
                                 "calibration", "created", "members"};
constexpr int kFormatVersion = 2, kLegacyVersion = 1;
constexpr uint64_t kRatioFloor = 1 << 20;

const std::set<std::string>& kiln_dtypes() {
  static const std::set<std::string> names = {
      "bool", "int2", "int4", "int8", "int16", "int32", "int64", "uint2", "uint4", "uint8", "uint16", "uint32",
      "uint64", "float16", "float32", "float64", "bfloat16", "float4_e2m1fn", "float6_e2m3fn", "float6_e3m2fn",
      "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu"};
  return names;
}

/// The artifact file, read with pread.
class FileSource : public ZipSource {
 public:
  FileSource(int fd, uint64_t size) : fd_(fd), size_(size) {}
  ~FileSource() override { ::close(fd_); }
  uint64_t size() const override { return size_; }
  std::string read(uint64_t offset, size_t n) const override {
    if (offset >= size_) return "";
    n = static_cast<size_t>(std::min<uint64_t>(n, size_ - offset));
    std::string out(n, '\0');
    size_t got = 0;
    while (got < n) {
      ssize_t r = ::pread(fd_, &out[got], n - got, static_cast<off_t>(offset + got));
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) break;
      got += static_cast<size_t>(r);
    }
    out.resize(got);
    return out;
  }

 private:
  int fd_;
  uint64_t size_;
};

std::unique_ptr<FileSource> open_zip(const std::string& path, std::vector<ZipEntry>* entries) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) throw ArtifactError(path + ": no such file");
  if (!S_ISREG(st.st_mode)) throw ArtifactError(path + ": not a file (expected a kiln artifact, a zip file)");
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw ArtifactError(path + ": cannot read (" + std::strerror(errno) + ")");
  auto src = std::make_unique<FileSource>(fd, static_cast<uint64_t>(st.st_size));
  try {
    *entries = zip_directory(*src);
  } catch (const ZipProblem& p) {
    std::string head = src->read(0, 4);
    if (head == std::string("PK\x03\x04", 4))
      throw ArtifactError(path + ": truncated or corrupted zip (" + p.message +
                          "); the file was probably cut short while copying: copy it again");
    throw ArtifactError(path + ": not a kiln artifact: expected a zip file (starting with b'PK\\x03\\x04'), found bytes " +
                        repr_bytes(head));
  }
  return src;
}

bool is_member(const std::string& name) {
  return std::find_if(std::begin(kMembers), std::end(kMembers), [&](const char* m) { return name == m; }) !=
         std::end(kMembers);
}

/// The members kiln reads, checked from the zip directory alone before inflating any (Python's _directory).
std::vector<ZipEntry> directory(const std::string& path, const std::vector<ZipEntry>& all, uint64_t size,
                                const Limits& limits) {
  std::vector<ZipEntry> infos;
  std::vector<std::string> names;
  for (const auto& e : all) {
    names.push_back(e.name);
    if (!is_member(e.name)) continue;
    for (const auto& seen : infos)
      if (seen.name == e.name)
        throw ArtifactError(path + ": member " + e.name + " appears twice in the zip (a tampered file)");
    infos.push_back(e);
  }
  std::vector<std::string> missing;
  for (const char* m : kMembers) {
    bool found = std::any_of(infos.begin(), infos.end(), [&](const ZipEntry& e) { return e.name == m; });
    if (!found && std::string(m) != "signature.json") missing.push_back(m);
  }
  if (!missing.empty()) {
    std::sort(names.begin(), names.end());
    if (names.size() > 20) names.resize(20);
    std::vector<std::string> expected(std::begin(kMembers), std::end(kMembers));
    throw ArtifactError(path + ": missing members " + repr_list(missing) + ": expected " + repr_list(expected) +
                        ", found " + repr_list(names));
  }
  uint64_t total = 0;
  for (const auto& e : infos) {
    const std::string& name = e.name;
    if (e.flags & 0x1) throw ArtifactError(path + ": member " + name + " is encrypted; kiln artifacts are not");
    if (e.method != 0 && e.method != 8)
      throw ArtifactError(path + ": member " + name + " uses zip compression method " + std::to_string(e.method) +
                          "; kiln reads stored or deflated members only");
    if (e.method == 0 && e.compress_size != e.file_size)
      throw ArtifactError(path + ": member " + name + " is stored uncompressed but the zip directory gives " +
                          std::to_string(e.compress_size) + " stored and " + std::to_string(e.file_size) +
                          " inflated bytes");
    if (e.header_offset + e.compress_size > size)
      throw ArtifactError(path + ": member " + name + " extends past the end of the file: truncated or corrupted");
    check_limit(limits, "member_bytes", e.file_size, path + ": member " + name + "'s inflated size");
    if (e.method == 8 && e.file_size > kRatioFloor)
      check_limit(limits, "zip_ratio", e.file_size / std::max<uint64_t>(e.compress_size, 1),
                  path + ": member " + name + " inflates " + commas(static_cast<int64_t>(e.compress_size)) + " to " +
                      commas(static_cast<int64_t>(e.file_size)) + " bytes; its compression ratio");
    total += e.file_size;
  }
  check_limit(limits, "artifact_bytes", total, path + ": the inflated size of its members together");
  return infos;
}

const ZipEntry* find(const std::vector<ZipEntry>& infos, const std::string& name) {
  for (const auto& e : infos)
    if (e.name == name) return &e;
  return nullptr;
}

Json parse(const std::string& path, const std::string& name, const std::string& data) {
  Json out;
  std::string error;
  if (!parse_json(data, &out, &error))
    throw ArtifactError(path + ": " + name + " is not valid JSON (JSONDecodeError: " + trunc(error, 200) + ")");
  return out;
}

bool is_dim(const Json& d) { return (d.is_int() && d.i >= 0) || (d.is_str() && !d.s.empty()); }

std::vector<std::string> check_signature(const std::string& key, const Json& specs) {
  if (specs.type != Json::List) return {repr_str(key) + " should be a list, found " + py_type(specs)};
  std::vector<std::string> problems;
  for (size_t k = 0; k < specs.list.size(); ++k) {
    const Json& spec = specs.list[k];
    std::string where = key + "[" + std::to_string(k) + "]";
    if (spec.type != Json::Dict || !spec.has("name") || !spec.has("dtype") || !spec.has("shape")) {
      problems.push_back(where + " should be an object with name, dtype, shape; found " + py_repr(spec));
      continue;
    }
    const Json& dtype = *spec.get("dtype");
    std::string name = py_repr(*spec.get("name"));
    if (!dtype.is_str() || !kiln_dtypes().count(dtype.s)) {
      std::string all;
      for (const auto& d : kiln_dtypes()) all += (all.empty() ? "" : ", ") + d;
      problems.push_back(where + " (" + name + ") has dtype " + py_repr(dtype) + ", which kiln never emits (kiln's: " +
                         all + ")");
    }
    const Json& shape = *spec.get("shape");
    if (shape.type != Json::List || !std::all_of(shape.list.begin(), shape.list.end(), is_dim))
      problems.push_back(where + " (" + name + ") shape should be a list of ints or symbol strings, found " +
                         py_repr(shape));
  }
  return problems;
}

bool is_str_list(const Json& v) {
  return v.type == Json::List && std::all_of(v.list.begin(), v.list.end(), [](const Json& s) { return s.is_str(); });
}

std::vector<std::string> check_kernels(const Json& kernels) {
  if (kernels.type != Json::List) return {"kernels should be a list, found " + py_type(kernels)};
  for (size_t k = 0; k < kernels.list.size(); ++k) {
    const Json& e = kernels.list[k];
    const Json* name = e.get("name");
    const Json* ops = e.get("ops");
    if (e.type != Json::Dict || !name || !name->is_str() || (ops && !is_str_list(*ops)))
      return {"kernels[" + std::to_string(k) + "] should be an object with a string name and a list of op names, found " +
              py_repr(e)};
  }
  return {};
}

/// The shape of a nested list value (numpy.asarray's), or "" with ``error`` set when ragged.
bool value_shape(const Json& v, std::vector<int64_t>* shape) {
  if (v.type != Json::List) return true;
  shape->push_back(static_cast<int64_t>(v.list.size()));
  if (v.list.empty()) return true;
  std::vector<int64_t> first;
  if (!value_shape(v.list[0], &first)) return false;
  for (const auto& item : v.list) {
    std::vector<int64_t> s;
    if (!value_shape(item, &s) || s != first) return false;
  }
  shape->insert(shape->end(), first.begin(), first.end());
  return true;
}

std::string shape_text(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t k = 0; k < shape.size(); ++k) out += (k ? ", " : "") + std::to_string(shape[k]);
  return out + "]";
}

std::vector<std::string> check_specialized(const Json& specs) {
  std::vector<std::string> problems = check_signature("specialized", specs);
  if (!problems.empty()) return problems;
  for (size_t k = 0; k < specs.list.size(); ++k) {
    const Json& spec = specs.list[k];
    std::string where = "specialized[" + std::to_string(k) + "] (" + py_repr(*spec.get("name")) + ")";
    const Json* value = spec.get("value");
    if (!value) {
      problems.push_back(where + " has no value");
      continue;
    }
    std::vector<int64_t> shape;
    if (!value_shape(*value, &shape)) {
      problems.push_back(where + ": value does not fit dtype " + spec.get("dtype")->s +
                         ": setting an array element with a sequence (an inhomogeneous list)");
      continue;
    }
    std::vector<int64_t> want;
    for (const auto& d : spec.get("shape")->list) want.push_back(d.is_int() ? d.i : -1);
    if (shape != want)
      problems.push_back(where + ": value has shape " + shape_text(shape) + ", the entry says " +
                         py_repr(*spec.get("shape")));
  }
  return problems;
}

Json parse_manifest(const std::string& path, const std::string& data, const std::vector<int>& versions) {
  Json manifest = parse(path, "manifest.json", data);
  if (manifest.type != Json::Dict)
    throw ArtifactError(path + ": manifest.json should be a JSON object, found " + py_type(manifest));
  const Json* version = manifest.get("format_version");
  if (!version || !version->is_int() || version->i < 1)
    throw ArtifactError(path + ": manifest.json: format_version should be an int >= 1, found " +
                        trunc(version ? py_repr(*version) : "None", 40));
  if (version->i > kFormatVersion) {
    const Json* kv = manifest.get("kiln_version");
    throw ArtifactError(path + ": artifact format version " + std::to_string(version->i) +
                        " is newer than this runtime supports (version " + std::to_string(kFormatVersion) +
                        ", and version " + std::to_string(kLegacyVersion) + " with allow_unsigned; kiln " +
                        trunc(kv ? py_str(*kv) : "?", 40) + " wrote it): upgrade kiln (or kiln-runtime) to load it");
  }
  if (std::find(versions.begin(), versions.end(), version->i) == versions.end())
    throw ArtifactError(path + ": manifest.json says format version " + std::to_string(version->i) +
                        ", but the file has the members of version " +
                        std::to_string(*std::max_element(versions.begin(), versions.end())) +
                        ": the file was modified or damaged");
  std::vector<std::string> problems = validate_manifest(manifest, true);
  if (!problems.empty()) {
    std::string all;
    for (const auto& p : problems) all += (all.empty() ? "" : "; ") + p;
    throw ArtifactError(trunc(path + ": manifest.json: " + all, 2000));
  }
  return manifest;
}

Json legacy_manifest(const std::string& path, const std::string& data, bool allow_unsigned) {
  Json manifest = parse(path, "manifest.json", data);
  const Json* version = manifest.get("format_version");
  if (!version || !version->is_int() || version->i != kLegacyVersion)
    throw ArtifactError(path +
                        ": missing members ['signature.json']: format version 2 artifacts always carry it (the file "
                        "was modified or damaged)");
  if (!allow_unsigned)
    throw TrustError(path +
                     ": artifact format version 1 (written by a kiln before artifacts were signed; nothing "
                     "authenticates it): this runtime reads version 2, and version 1 only with --allow-unsigned "
                     "(allow_unsigned=True): recompile the model with this kiln, or load it with --allow-unsigned "
                     "if you trust where it came from");
  return parse_manifest(path, data, {kLegacyVersion});
}

void check_hashes(const std::string& path, const Json& manifest,
                  const std::vector<std::pair<std::string, std::string>>& blobs) {
  const Json& recorded = *manifest.get("members");
  for (const auto& blob : blobs) {
    const Json* want = recorded.get(blob.first);
    if (!want || !want->is_str())
      throw ArtifactError(path + ": manifest.json members lists no sha256 for " + blob.first);
    std::string have = sha256_hex(blob.second.data(), blob.second.size());
    std::string lower = want->s;
    std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
    if (have != lower)
      throw ArtifactError(path + ": " + blob.first + ": sha256 mismatch: manifest says " + trunc(want->s, 64) +
                          ", file has " + have + " (the artifact was modified or damaged after it was written)");
  }
}

/// The start of a UTF-8 error as Python's UnicodeDecodeError words it; "" for valid text.
std::string utf8_problem(const std::string& s) {
  size_t k = 0;
  while (k < s.size()) {
    unsigned char c = s[k];
    int n = c < 0x80 ? 0 : (c >> 5) == 6 && c >= 0xC2 ? 1 : (c >> 4) == 14 ? 2 : (c >> 3) == 30 && c <= 0xF4 ? 3 : -1;
    char buf[128];
    if (n < 0) {
      std::snprintf(buf, sizeof buf, "'utf-8' codec can't decode byte 0x%02x in position %zu: invalid start byte", c, k);
      return buf;
    }
    for (int j = 1; j <= n; ++j) {
      if (k + j >= s.size()) {
        std::snprintf(buf, sizeof buf, "'utf-8' codec can't decode byte 0x%02x in position %zu: unexpected end of data",
                      c, k);
        return buf;
      }
      unsigned char d = s[k + j];
      bool ok = (d & 0xC0) == 0x80;
      if (j == 1 && c == 0xE0) ok = ok && d >= 0xA0;
      if (j == 1 && c == 0xED) ok = ok && d < 0xA0;
      if (j == 1 && c == 0xF0) ok = ok && d >= 0x90;
      if (j == 1 && c == 0xF4) ok = ok && d < 0x90;
      if (!ok) {
        std::snprintf(buf, sizeof buf, "'utf-8' codec can't decode byte 0x%02x in position %zu: invalid continuation byte",
                      c, k);
        return buf;
      }
    }
    k += n + 1;
  }
  return "";
}

}  // namespace

std::vector<std::string> validate_manifest(const Json& m, bool need_members) {
  if (m.type != Json::Dict) return {"manifest should be a JSON object, found " + py_type(m)};
  std::vector<std::string> missing;
  for (const char* k : kRequired)
    if ((need_members || std::string(k) != "members") && !m.has(k)) missing.push_back(k);
  if (!missing.empty()) return {"manifest lacks required keys " + repr_list(missing)};
  std::vector<std::string> problems = check_signature("inputs", *m.get("inputs"));
  for (auto& p : check_signature("outputs", *m.get("outputs"))) problems.push_back(p);
  const Json& fv = *m.get("format_version");
  if (!fv.is_int() && fv.type != Json::Bool) problems.push_back("format_version should be an int, found " + py_repr(fv));
  if (m.get("target")->type != Json::Dict)
    problems.push_back("target should be an object, found " + py_repr(*m.get("target")));
  const Json& symbols = *m.get("symbols");
  bool symbols_ok = symbols.type == Json::Dict;
  for (const auto& kv : symbols.dict) symbols_ok = symbols_ok && (kv.second.is_int() || kv.second.type == Json::Bool);
  if (!symbols_ok) problems.push_back("symbols should map names to ints, found " + py_repr(symbols));
  for (const char* key : {"weights", "cpu_features"})
    if (!is_str_list(*m.get(key)))
      problems.push_back(std::string(key) + " should be a list of strings, found " + py_repr(*m.get(key)));
  const Json& weights = *m.get("weights");
  if (weights.type == Json::List) {
    std::set<std::string> seen;
    for (const auto& w : weights.list) seen.insert(py_repr(w));
    if (seen.size() != weights.list.size()) problems.push_back("weights lists a name twice");
  }
  for (auto& p : check_kernels(*m.get("kernels"))) problems.push_back(p);
  const Json& entry = *m.get("entry");
  if (!entry.is_str() || entry.s.empty()) problems.push_back("entry should be a function name, found " + py_repr(entry));
  if (need_members && m.get("members")->type != Json::Dict)
    problems.push_back("members should map member names to sha256, found " + py_repr(*m.get("members")));
  if (m.has("specialized"))
    for (auto& p : check_specialized(*m.get("specialized"))) problems.push_back(p);
  return problems;
}

std::vector<Weight> load_weights(const std::string& path, const Json& manifest, const std::string& data,
                                 const Limits& limits);

Contents read_artifact(const std::string& path, const LoadOptions& options) {
  TrustedKeys trusted = trusted_public_keys(options.trusted_keys);
  std::vector<ZipEntry> all;
  std::unique_ptr<FileSource> src = open_zip(path, &all);
  std::vector<ZipEntry> infos = directory(path, all, src->size(), options.limits);
  Contents out;
  out.manifest_text = zip_inflate(path, *src, *find(infos, "manifest.json"));
  if (const ZipEntry* sig = find(infos, "signature.json")) {
    out.trust = verify_record(path, out.manifest_text, zip_inflate(path, *src, *sig), trusted, options.allow_unsigned);
    out.manifest = parse_manifest(path, out.manifest_text, {kFormatVersion});
  } else {
    out.manifest = legacy_manifest(path, out.manifest_text, options.allow_unsigned);
  }
  // trusted (or explicitly allowed) from here on: the other members may be inflated
  std::vector<std::pair<std::string, std::string>> blobs;
  for (const char* name : kHashed) blobs.emplace_back(name, zip_inflate(path, *src, *find(infos, name)));
  src.reset();
  check_hashes(path, out.manifest, blobs);
  out.weights = load_weights(path, out.manifest, blobs[1].second, options.limits);
  blobs[1].second = std::string();
  std::string bad_text = utf8_problem(blobs[2].second);
  if (!bad_text.empty()) throw ArtifactError(path + ": model.ir is not utf-8 text (" + bad_text + ")");
  out.library = std::move(blobs[0].second);
  return out;
}

}  // namespace detail
}  // namespace kiln
