// JSON, Python-style formatting for messages, hashing and size limits.
#include <openssl/evp.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/map.h>
#include <tvm/ffi/extra/json.h>

#include <charconv>
#include <cmath>
#include <cstdio>

#include "internal.hpp"

namespace kiln {
namespace detail {

namespace ffi = tvm::ffi;

const Json* Json::get(const std::string& key) const {
  if (type != Dict) return nullptr;
  for (const auto& kv : dict)
    if (kv.first == key) return &kv.second;
  return nullptr;
}

static Json from_any(const ffi::Any& v) {
  Json out;
  switch (v.type_index()) {
    case ffi::TypeIndex::kTVMFFINone:
      return out;
    case ffi::TypeIndex::kTVMFFIBool:
      out.type = Json::Bool;
      out.b = v.cast<bool>();
      return out;
    case ffi::TypeIndex::kTVMFFIInt:
      out.type = Json::Int;
      out.i = v.cast<int64_t>();
      return out;
    case ffi::TypeIndex::kTVMFFIFloat:
      out.type = Json::Float;
      out.f = v.cast<double>();
      return out;
    default:
      break;
  }
  if (auto s = v.as<ffi::String>()) {
    out.type = Json::Str;
    out.s = std::string(s->data(), s->size());
  } else if (auto a = v.as<ffi::json::Array>()) {
    out.type = Json::List;
    for (const ffi::Any& item : *a) out.list.push_back(from_any(item));
  } else if (auto m = v.as<ffi::json::Object>()) {
    out.type = Json::Dict;
    for (const auto& kv : *m) {
      std::string key = kv.first.cast<ffi::String>();
      Json value = from_any(kv.second);
      bool replaced = false;  // a repeated key: the last value wins, as in Python's json
      for (auto& existing : out.dict)
        if (existing.first == key) existing.second = value, replaced = true;
      if (!replaced) out.dict.emplace_back(std::move(key), std::move(value));
    }
  }
  return out;
}

bool parse_json(const std::string& text, Json* out, std::string* error) {
  try {
    ffi::String err;
    ffi::json::Value v = ffi::json::Parse(ffi::String(text), &err);
    if (!err.empty()) {
      *error = std::string(err);
      return false;
    }
    *out = from_any(v);
    return true;
  } catch (const std::exception& e) {
    *error = e.what();
    return false;
  }
}

namespace {
// One character as Python's repr writes it inside quotes ``q``; ``escape_high``: bytes >= 0x80 as \xNN.
void repr_char(std::string& out, unsigned char c, char q, bool escape_high) {
  if (c == static_cast<unsigned char>(q) || c == '\\') {
    out += '\\';
    out += static_cast<char>(c);
  } else if (c == '\n') {
    out += "\\n";
  } else if (c == '\r') {
    out += "\\r";
  } else if (c == '\t') {
    out += "\\t";
  } else if (c < 0x20 || c == 0x7f || (escape_high && c >= 0x80)) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "\\x%02x", c);
    out += buf;
  } else {
    out += static_cast<char>(c);
  }
}
}  // namespace

std::string repr_str(const std::string& s) {
  bool has_single = s.find('\'') != std::string::npos, has_double = s.find('"') != std::string::npos;
  char q = has_single && !has_double ? '"' : '\'';
  std::string out(1, q);
  for (unsigned char c : s) repr_char(out, c, q, false);
  return out + q;
}

std::string repr_bytes(const std::string& s) {
  std::string out = "b'";
  for (unsigned char c : s) repr_char(out, c, '\'', true);
  return out + "'";
}

std::string repr_list(const std::vector<std::string>& items) {
  std::string out = "[";
  for (size_t k = 0; k < items.size(); ++k) out += (k ? ", " : "") + repr_str(items[k]);
  return out + "]";
}

std::string py_float(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  std::string sci(buf, res.ptr);  // shortest digits: d.ddde[+-]XX
  size_t e = sci.find('e');
  std::string mant = sci.substr(0, e);
  int exp = std::stoi(sci.substr(e + 1));
  bool neg = mant[0] == '-';
  if (neg) mant.erase(0, 1);
  std::string digits;
  for (char c : mant)
    if (c != '.') digits += c;
  std::string out;
  if (exp < -4 || exp >= 16) {
    out = digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "");
    char eb[16];
    std::snprintf(eb, sizeof eb, "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
    out += eb;
  } else if (exp < 0) {
    out = "0." + std::string(-exp - 1, '0') + digits;
  } else if (static_cast<size_t>(exp) + 1 >= digits.size()) {
    out = digits + std::string(exp + 1 - digits.size(), '0') + ".0";
  } else {
    out = digits.substr(0, exp + 1) + "." + digits.substr(exp + 1);
  }
  return (neg ? "-" : "") + out;
}

std::string py_repr(const Json& v) {
  switch (v.type) {
    case Json::Null:
      return "None";
    case Json::Bool:
      return v.b ? "True" : "False";
    case Json::Int:
      return std::to_string(v.i);
    case Json::Float:
      return py_float(v.f);
    case Json::Str:
      return repr_str(v.s);
    case Json::List: {
      std::string out = "[";
      for (size_t k = 0; k < v.list.size(); ++k) out += (k ? ", " : "") + py_repr(v.list[k]);
      return out + "]";
    }
    case Json::Dict: {
      std::string out = "{";
      for (size_t k = 0; k < v.dict.size(); ++k)
        out += (k ? ", " : "") + repr_str(v.dict[k].first) + ": " + py_repr(v.dict[k].second);
      return out + "}";
    }
  }
  return "?";
}

std::string py_str(const Json& v) { return v.type == Json::Str ? v.s : py_repr(v); }

std::string py_type(const Json& v) {
  static const char* names[] = {"NoneType", "bool", "int", "float", "str", "list", "dict"};
  return names[v.type];
}

std::string trunc(const std::string& s, size_t n) {
  size_t chars = 0;
  for (size_t k = 0; k < s.size(); ++k) {
    if ((static_cast<unsigned char>(s[k]) & 0xC0) != 0x80) {
      if (chars == n) return s.substr(0, k);
      ++chars;
    }
  }
  return s;
}

std::string commas(int64_t n) {
  std::string digits = std::to_string(n < 0 ? -static_cast<uint64_t>(n) : static_cast<uint64_t>(n));
  std::string out;
  for (size_t k = 0; k < digits.size(); ++k) {
    if (k && (digits.size() - k) % 3 == 0) out += ',';
    out += digits[k];
  }
  return (n < 0 ? "-" : "") + out;
}

std::string sha256_hex(const void* data, size_t n) {
  unsigned char md[32];
  unsigned int len = 0;
  if (EVP_Digest(data, n, md, &len, EVP_sha256(), nullptr) != 1 || len != 32)
    throw Error("sha256 failed (OpenSSL)");
  static const char* hex = "0123456789abcdef";
  std::string out(64, '0');
  for (int k = 0; k < 32; ++k) out[2 * k] = hex[md[k] >> 4], out[2 * k + 1] = hex[md[k] & 15];
  return out;
}

static std::string human(uint64_t n) {
  static const std::pair<const char*, uint64_t> units[] = {{"GiB", 1ull << 30}, {"MiB", 1ull << 20}, {"KiB", 1024}};
  for (const auto& u : units) {
    if (n >= u.second) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "%.4g %s", static_cast<double>(n) / static_cast<double>(u.second), u.first);
      return buf;
    }
  }
  return std::to_string(n) + " bytes";
}

void check_limit(const Limits& limits, const std::string& field, uint64_t got, const std::string& what) {
  static const std::pair<const char*, const char*> flags[] = {
      {"member_bytes", "--max-member-mb"}, {"artifact_bytes", "--max-artifact-mb"},
      {"zip_ratio", "--max-zip-ratio"}, {"constant_bytes", "--max-constant-mb"},
      {"tensor_bytes", "--max-tensor-mb"}};
  uint64_t limit = field == "member_bytes" ? limits.member_bytes
                   : field == "artifact_bytes" ? limits.artifact_bytes
                   : field == "zip_ratio" ? limits.zip_ratio
                   : field == "constant_bytes" ? limits.constant_bytes
                                               : limits.tensor_bytes;
  if (got <= limit) return;
  auto shown = [&](uint64_t n) { return field == "zip_ratio" ? std::to_string(n) + "x" : human(n); };
  std::string flag;
  for (const auto& f : flags)
    if (field == f.first) flag = f.second;
  throw LimitError(what + " is " + shown(got) + ", over the limit " + field + "=" + shown(limit) +
                   "; if this is expected, raise it with " + flag + " (CLI) or limits=Limits(" + field +
                   "=...) (Python)");
}

}  // namespace detail
}  // namespace kiln
