// weights.npz (Python's artifact._load_weights and _read_npy): an uncompressed zip of .npy arrays,
// each header checked (shape against the bytes present and the tensor_bytes limit) before allocating.
#include <algorithm>
#include <cstring>

#include "internal.hpp"

namespace kiln {
namespace detail {

namespace {

/// A Python literal from an npy header (what ast.literal_eval would return, as far as headers go).
struct Lit {
  enum Kind { Str, Int, Bool, Tuple, List, Dict, None } kind = None;
  std::string s;
  int64_t i = 0;
  bool b = false;
  std::vector<Lit> items;                          // Tuple, List
  std::vector<std::pair<Lit, Lit>> entries;        // Dict
};

std::string lit_repr(const Lit& v) {
  switch (v.kind) {
    case Lit::Str: return repr_str(v.s);
    case Lit::Int: return std::to_string(v.i);
    case Lit::Bool: return v.b ? "True" : "False";
    case Lit::None: return "None";
    case Lit::Tuple:
    case Lit::List: {
      std::string out = v.kind == Lit::Tuple ? "(" : "[";
      for (size_t k = 0; k < v.items.size(); ++k) out += (k ? ", " : "") + lit_repr(v.items[k]);
      if (v.kind == Lit::Tuple && v.items.size() == 1) out += ",";
      return out + (v.kind == Lit::Tuple ? ")" : "]");
    }
    case Lit::Dict: {
      std::string out = "{";
      for (size_t k = 0; k < v.entries.size(); ++k)
        out += (k ? ", " : "") + lit_repr(v.entries[k].first) + ": " + lit_repr(v.entries[k].second);
      return out + "}";
    }
  }
  return "?";
}

/// A strict parser for the literal forms numpy writes in headers: dicts, tuples, lists, str, int, bool.
class LitParser {
 public:
  explicit LitParser(const std::string& text) : t_(text) {}
  bool parse(Lit* out) {
    if (!value(out, 0)) return false;
    skip();
    return at_ == t_.size();
  }

 private:
  void skip() {
    while (at_ < t_.size() && std::strchr(" \t\n\r", t_[at_])) ++at_;
  }
  bool eat(char c) {
    skip();
    if (at_ < t_.size() && t_[at_] == c) return ++at_, true;
    return false;
  }
  bool seq(char close, std::vector<Lit>* items, bool* trailing_comma, int depth) {
    *trailing_comma = false;
    while (!eat(close)) {
      Lit item;
      if (!value(&item, depth + 1)) return false;
      items->push_back(std::move(item));
      *trailing_comma = eat(',');
      if (!*trailing_comma) return eat(close);
    }
    return true;
  }
  bool value(Lit* out, int depth) {
    if (depth > 32) return false;
    skip();
    if (at_ >= t_.size()) return false;
    char c = t_[at_];
    if (c == '\'' || c == '"') {
      size_t end = t_.find(c, at_ + 1);
      if (end == std::string::npos || t_.find('\\', at_ + 1) < end) return false;
      out->kind = Lit::Str, out->s = t_.substr(at_ + 1, end - at_ - 1), at_ = end + 1;
      return true;
    }
    if (c == '(' || c == '[') {
      ++at_;
      bool trailing;
      out->kind = c == '(' ? Lit::Tuple : Lit::List;
      if (!seq(c == '(' ? ')' : ']', &out->items, &trailing, depth)) return false;
      if (c == '(' && out->items.size() == 1 && !trailing) *out = Lit(out->items[0]);  // (x) is x
      return true;
    }
    if (c == '{') {
      ++at_;
      out->kind = Lit::Dict;
      while (!eat('}')) {
        Lit key, val;
        if (!value(&key, depth + 1) || !eat(':') || !value(&val, depth + 1)) return false;
        if (key.kind != Lit::Str && key.kind != Lit::Int && key.kind != Lit::Bool) return false;
        out->entries.emplace_back(std::move(key), std::move(val));
        if (!eat(',')) return eat('}');
      }
      return true;
    }
    for (const char* word : {"True", "False", "None"}) {
      if (t_.compare(at_, std::strlen(word), word) == 0) {
        at_ += std::strlen(word);
        out->kind = word[0] == 'N' ? Lit::None : Lit::Bool;
        out->b = word[0] == 'T';
        return true;
      }
    }
    size_t start = at_;
    if (c == '-' || c == '+') ++at_;
    size_t digits = at_;
    while (at_ < t_.size() && std::isdigit(static_cast<unsigned char>(t_[at_]))) ++at_;
    if (at_ == digits || at_ - digits > 18) return false;
    out->kind = Lit::Int;
    out->i = std::stoll(t_.substr(start, at_ - start));
    return true;
  }
  const std::string& t_;
  size_t at_ = 0;
};

struct NpyType {
  std::string str;   // numpy's dtype.str: <f4, |u1, |b1, |V2 ...
  std::string name;  // numpy's dtype.name: float32, uint8, bool, void16 ...
  int itemsize = 0;
  bool swap = false;  // big-endian data: byte-swapped to this machine's order on reading
};

/// numpy's view of a descr string, for the plain types weights.npz holds; false for others.
bool npy_type(const std::string& descr, NpyType* out) {
  if (descr.size() < 2) return false;
  size_t at = std::strchr("<>|=", descr[0]) ? 1 : 0;
  char order = at ? descr[0] : '=';
  char kind = descr[at];
  std::string digits = descr.substr(at + 1);
  if (digits.empty() || digits.size() > 6 || !std::all_of(digits.begin(), digits.end(), ::isdigit)) return false;
  int size = std::stoi(digits);
  std::string name;
  if (kind == 'b' && size == 1) name = "bool";
  else if (kind == 'i' && (size == 1 || size == 2 || size == 4 || size == 8)) name = "int" + std::to_string(8 * size);
  else if (kind == 'u' && (size == 1 || size == 2 || size == 4 || size == 8)) name = "uint" + std::to_string(8 * size);
  else if (kind == 'f' && (size == 2 || size == 4 || size == 8)) name = "float" + std::to_string(8 * size);
  else if (kind == 'c' && (size == 8 || size == 16)) name = "complex" + std::to_string(8 * size);
  else if (kind == 'V' && size > 0) name = "void" + std::to_string(8 * size);
  else return false;
  bool single = size == 1 || kind == 'b' || kind == 'V';
  out->itemsize = size;
  out->name = name;
  out->swap = order == '>' && !single;
  out->str = std::string(1, single ? '|' : (order == '>' ? '>' : '<')) + kind + digits;
  if (kind == 'c') out->swap = out->swap;  // complex halves swap as their floats do
  return true;
}

struct NpyError {
  std::string type;  // ValueError, BadZipFile, ...
  std::string message;
};

std::string shape_list(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t k = 0; k < shape.size(); ++k) out += (k ? ", " : "") + std::to_string(shape[k]);
  return out + "]";
}

/// Row-major copy of Fortran-ordered data.
std::string to_c_order(const std::string& data, const std::vector<int64_t>& shape, size_t itemsize) {
  size_t rank = shape.size(), count = data.size() / std::max<size_t>(itemsize, 1);
  std::string out(data.size(), '\0');
  std::vector<int64_t> index(rank, 0);
  for (size_t flat = 0; flat < count; ++flat) {  // flat walks the C order; src is the Fortran offset
    size_t src = 0, stride = 1;
    for (size_t d = 0; d < rank; ++d) src += static_cast<size_t>(index[d]) * stride, stride *= static_cast<size_t>(shape[d]);
    std::memcpy(&out[flat * itemsize], &data[src * itemsize], itemsize);
    for (size_t d = rank; d-- > 0;) {
      if (++index[d] < shape[d]) break;
      index[d] = 0;
    }
  }
  return out;
}

std::string read_exact(const std::string& member, const std::string& what, const std::string& data, size_t* at,
                       size_t n) {
  size_t got = std::min(n, data.size() - std::min(*at, data.size()));
  if (got != n)
    throw NpyError{"ValueError", "EOF: reading " + what + ", expected " + std::to_string(n) + " bytes got " +
                                     std::to_string(got)};
  std::string out = data.substr(*at, n);
  *at += n;
  return out;
}

/// One .npy member (its bytes, header included) as a weight, checked before its data is copied.
Weight read_npy(const std::string& path, const std::string& member, const std::string& bytes, const Limits& limits) {
  size_t at = 0;
  std::string magic = read_exact(member, "magic string", bytes, &at, 8);
  if (magic.compare(0, 6, "\x93NUMPY") != 0)
    throw NpyError{"ValueError", "the magic string is not correct; expected b'\\x93NUMPY', got " +
                                     repr_bytes(magic.substr(0, 6))};
  int major = static_cast<unsigned char>(magic[6]), minor = static_cast<unsigned char>(magic[7]);
  if (!((major == 1 || major == 2) && minor == 0))
    throw NpyError{"ValueError", member + ": npy format version (" + std::to_string(major) + ", " +
                                     std::to_string(minor) + ") is not one kiln writes (1.0, 2.0)"};
  std::string len = read_exact(member, "array header length", bytes, &at, major == 1 ? 2 : 4);
  size_t header_len = 0;
  for (size_t k = len.size(); k-- > 0;) header_len = header_len << 8 | static_cast<unsigned char>(len[k]);
  std::string header = read_exact(member, "array header", bytes, &at, header_len);
  if (header.size() > 10000)
    throw NpyError{"ValueError", "Header info length (" + std::to_string(header.size()) +
                                     ") is large and may not be safe to load securely.\nTo allow loading, adjust "
                                     "`max_header_size` or fully trust the `.npy` file using `allow_pickle=True`.\n"
                                     "For safety against large resource use or crashes, sandboxing may be necessary."};
  Lit d;
  if (!LitParser(header).parse(&d)) throw NpyError{"ValueError", "Cannot parse header: " + repr_str(header)};
  if (d.kind != Lit::Dict) throw NpyError{"ValueError", "Header is not a dictionary: " + lit_repr(d)};
  const Lit *descr = nullptr, *fortran = nullptr, *shape = nullptr;
  std::vector<std::string> keys;
  for (const auto& kv : d.entries) {
    keys.push_back(kv.first.kind == Lit::Str ? kv.first.s : lit_repr(kv.first));
    if (kv.first.kind != Lit::Str) continue;
    if (kv.first.s == "descr") descr = &kv.second;
    if (kv.first.s == "fortran_order") fortran = &kv.second;
    if (kv.first.s == "shape") shape = &kv.second;
  }
  if (!descr || !fortran || !shape || d.entries.size() != 3) {
    std::sort(keys.begin(), keys.end());
    throw NpyError{"ValueError", "Header does not contain the correct keys: " + repr_list(keys)};
  }
  bool ints = shape->kind == Lit::Tuple &&
              std::all_of(shape->items.begin(), shape->items.end(),
                          [](const Lit& x) { return x.kind == Lit::Int || x.kind == Lit::Bool; });
  if (!ints) throw NpyError{"ValueError", "shape is not valid: " + lit_repr(*shape)};
  if (fortran->kind != Lit::Bool) throw NpyError{"ValueError", "fortran_order is not a valid bool: " + lit_repr(*fortran)};
  NpyType type;
  if (descr->kind != Lit::Str || !npy_type(descr->s, &type))
    throw NpyError{"ValueError", "descr is not a valid dtype descriptor: " + lit_repr(*descr)};
  Weight w;
  w.dtype = type.name;
  __int128 count = 1;
  for (const Lit& x : shape->items) {
    w.shape.push_back(x.kind == Lit::Bool ? x.b : x.i);
    count *= w.shape.back();
    if (count > (static_cast<__int128>(1) << 100)) count = static_cast<__int128>(1) << 100;
  }
  __int128 nbytes = count * type.itemsize;
  uint64_t shown = nbytes < 0 ? 0 : nbytes > static_cast<__int128>(INT64_MAX) ? INT64_MAX : static_cast<uint64_t>(nbytes);
  check_limit(limits, "tensor_bytes", shown, path + ": weights.npz: " + member + " (" + type.str + shape_list(w.shape) + ")");
  int64_t present = static_cast<int64_t>(bytes.size() - at);
  if (nbytes != present)
    throw NpyError{"ValueError", member + ": its header claims " + type.str + shape_list(w.shape) + " = " +
                                     commas(static_cast<int64_t>(nbytes)) + " bytes of data, the member holds " +
                                     commas(present)};
  w.bytes = bytes.substr(at);
  if (type.swap) {
    size_t unit = type.name.rfind("complex", 0) == 0 ? type.itemsize / 2 : type.itemsize;
    for (size_t k = 0; k < w.bytes.size(); k += unit) std::reverse(&w.bytes[k], &w.bytes[k] + unit);
  }
  if (fortran->b && w.shape.size() > 1) w.bytes = to_c_order(w.bytes, w.shape, type.itemsize);
  return w;
}

/// ml_dtypes' types, stored in weights.npz as their bits: their item sizes (Python's bits_dtype).
int ml_itemsize(const std::string& name) {
  if (name == "bfloat16") return 2;
  static const char* ones[] = {"int2", "int4", "uint2", "uint4", "float4_e2m1fn", "float6_e2m3fn", "float6_e3m2fn",
                               "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz",
                               "float8_e8m0fnu", "float8_e4m3", "float8_e4m3b11fnuz", "float8_e3m4"};
  for (const char* n : ones)
    if (name == n) return 1;
  return 0;
}

}  // namespace

int dtype_itemsize(const std::string& name) {
  if (int ml = ml_itemsize(name)) return ml;
  if (name == "bool") return 1;
  for (const char* prefix : {"uint", "int", "float", "complex"}) {
    size_t n = std::strlen(prefix);
    if (name.compare(0, n, prefix) == 0 && name.size() > n &&
        std::all_of(name.begin() + static_cast<long>(n), name.end(), ::isdigit))
      return std::stoi(name.substr(n)) / 8;
  }
  return 0;
}

std::vector<Weight> load_weights(const std::string& path, const Json& manifest, const std::string& data,
                                 const Limits& limits) {
  std::vector<Weight> found;
  try {
    BufferSource src(data);
    for (const ZipEntry& info : zip_directory(src)) {
      const std::string& member = info.name;
      if (member.size() < 4 || member.compare(member.size() - 4, 4, ".npy") != 0)
        throw NpyError{"ValueError", "member " + repr_str(member) + " is not a .npy array"};
      std::string name = member.substr(0, member.size() - 4);
      for (const auto& w : found)
        if (w.name == name) throw NpyError{"ValueError", "member " + repr_str(member) + " appears twice"};
      if (info.method != 0 || info.compress_size != info.file_size)
        throw NpyError{"ValueError", "member " + repr_str(member) + " is compressed; kiln stores weights uncompressed"};
      uint64_t start = zip_data_offset(src, info);
      std::string bytes = src.read(start, static_cast<size_t>(info.file_size));
      Weight w = read_npy(path, member, bytes, limits);
      if (bytes.size() != info.file_size) throw NpyError{"EOFError", ""};
      if (crc32_of(bytes.data(), bytes.size()) != info.crc)
        throw NpyError{"BadZipFile", "Bad CRC-32 for file " + repr_str(member)};
      w.name = name;
      found.push_back(std::move(w));
    }
  } catch (const ZipProblem& p) {
    throw ArtifactError(path + ": weights.npz is not a readable npz without pickles (" + p.type + ": " +
                        trunc(p.message, 300) + ")");
  } catch (const NpyError& p) {
    throw ArtifactError(path + ": weights.npz is not a readable npz without pickles (" + p.type + ": " +
                        trunc(p.message, 300) + ")");
  }
  std::vector<std::string> names, missing, extra, have;
  for (const auto& n : manifest.get("weights")->list) names.push_back(n.s);
  for (const auto& w : found) have.push_back(w.name);
  for (const auto& n : names)
    if (std::find(have.begin(), have.end(), n) == have.end()) missing.push_back(n);
  for (const auto& n : have)
    if (std::find(names.begin(), names.end(), n) == names.end()) extra.push_back(n);
  if (!missing.empty() || !extra.empty())
    throw ArtifactError(path + ": weights.npz does not match the manifest: expected weights " + repr_list(names) +
                        ", found " + repr_list(have) + " (missing " + repr_list(missing) + ", unexpected " +
                        repr_list(extra) + ")");
  const Json* specs = manifest.get("weight_specs");
  if (specs && specs->type == Json::List) {
    for (const Json& spec : specs->list) {
      const Json* name = spec.get("name");
      auto it = name && name->is_str()
                    ? std::find_if(found.begin(), found.end(), [&](const Weight& w) { return w.name == name->s; })
                    : found.end();
      if (it == found.end())
        throw ArtifactError(path + ": manifest weight_specs names " + trunc(name ? py_repr(*name) : "None", 80) +
                            ", which is not a weight");
      const Json* dtype = spec.get("dtype");
      const Json* shape = spec.get("shape");
      std::string want = dtype && dtype->is_str() ? dtype->s : "";
      int bits = ml_itemsize(want);
      bool stored_as_bits = it->dtype == "uint" + std::to_string(8 * bits) || it->dtype.rfind("void", 0) == 0;
      if (bits && stored_as_bits && dtype_itemsize(it->dtype) == bits) it->dtype = want;
      std::vector<int64_t> want_shape;
      bool shape_ok = !shape || shape->type == Json::List;
      if (shape && shape->type == Json::List)
        for (const Json& d : shape->list) {
          shape_ok = shape_ok && d.is_int();
          want_shape.push_back(d.i);
        }
      if (it->dtype != want || !shape_ok || it->shape != want_shape)
        throw ArtifactError(path + ": weight " + repr_str(it->name) + ": manifest says " +
                            (dtype ? py_str(*dtype) : "None") + " " + (shape ? py_str(*shape) : "None") +
                            ", weights.npz has " + it->dtype + " " + shape_list(it->shape));
    }
  }
  std::vector<Weight> ordered;
  for (const auto& n : names)
    for (auto& w : found)
      if (w.name == n) ordered.push_back(std::move(w));
  return ordered;
}

}  // namespace detail
}  // namespace kiln
