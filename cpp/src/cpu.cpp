// CPU features (Python's runtime/cpu.py): which x86 extensions an artifact's code needs (manifest
// cpu_features plus what the target's mcpu/mattr imply) and which this CPU has (/proc/cpuinfo).
#include <sys/utsname.h>

#include <algorithm>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "internal.hpp"

namespace kiln {
namespace detail {

namespace {

// Generated from runtime/cpu.py (tests/cpp/test_cpp_runtime.py checks they agree).
const std::map<std::string, std::vector<std::string>> kMcpuFeatures = {
    {"x86-64", {}},
    {"x86-64-v2", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2"}},
    {"nehalem", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2"}},
    {"westmere", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2"}},
    {"sandybridge", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx"}},
    {"corei7-avx", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx"}},
    {"ivybridge", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "f16c"}},
    {"core-avx-i", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "f16c"}},
    {"x86-64-v3", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe"}},
    {"haswell", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe"}},
    {"core-avx2", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe"}},
    {"broadwell", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe"}},
    {"skylake", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe"}},
    {"alderlake", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "avx_vnni", "gfni", "vaes", "vpclmulqdq"}},
    {"raptorlake", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "avx_vnni", "gfni", "vaes", "vpclmulqdq"}},
    {"meteorlake", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "avx_vnni", "gfni", "vaes", "vpclmulqdq"}},
    {"x86-64-v4", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}},
    {"skylake-avx512", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}},
    {"cascadelake", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"}},
    {"cooperlake", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16"}},
    {"icelake-client", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512ifma", "avx512vbmi", "avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq", "gfni", "vaes", "vpclmulqdq"}},
    {"icelake-server", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512ifma", "avx512vbmi", "avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq", "gfni", "vaes", "vpclmulqdq"}},
    {"tigerlake", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512ifma", "avx512vbmi", "avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq", "gfni", "vaes", "vpclmulqdq"}},
    {"sapphirerapids", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512ifma", "avx512vbmi", "avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq", "gfni", "vaes", "vpclmulqdq", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"}},
    {"emeraldrapids", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512ifma", "avx512vbmi", "avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq", "gfni", "vaes", "vpclmulqdq", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"}},
    {"znver1", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "sse4a"}},
    {"znver2", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "sse4a"}},
    {"znver3", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "sse4a", "vaes", "vpclmulqdq"}},
    {"znver4", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "sse4a", "vaes", "vpclmulqdq", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512ifma", "avx512vbmi", "avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq", "gfni"}},
    {"znver5", {"cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "sse4a", "vaes", "vpclmulqdq", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni", "avx512_bf16", "avx512ifma", "avx512vbmi", "avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq", "gfni", "avx_vnni"}},
};
const std::map<std::string, std::string> kMattrToFlag = {
    {"sse3", "pni"},
    {"ssse3", "ssse3"},
    {"sse4.1", "sse4_1"},
    {"sse4.2", "sse4_2"},
    {"sse4a", "sse4a"},
    {"popcnt", "popcnt"},
    {"cx16", "cx16"},
    {"sahf", "lahf_lm"},
    {"avx", "avx"},
    {"avx2", "avx2"},
    {"fma", "fma"},
    {"f16c", "f16c"},
    {"bmi", "bmi1"},
    {"bmi2", "bmi2"},
    {"lzcnt", "abm"},
    {"movbe", "movbe"},
    {"avx512f", "avx512f"},
    {"avx512cd", "avx512cd"},
    {"avx512bw", "avx512bw"},
    {"avx512dq", "avx512dq"},
    {"avx512vl", "avx512vl"},
    {"avx512vnni", "avx512_vnni"},
    {"avx512bf16", "avx512_bf16"},
    {"avx512fp16", "avx512_fp16"},
    {"avx512ifma", "avx512ifma"},
    {"avx512vbmi", "avx512vbmi"},
    {"avx512vbmi2", "avx512_vbmi2"},
    {"avx512bitalg", "avx512_bitalg"},
    {"avx512vpopcntdq", "avx512_vpopcntdq"},
    {"avxvnni", "avx_vnni"},
    {"gfni", "gfni"},
    {"vaes", "vaes"},
    {"vpclmulqdq", "vpclmulqdq"},
    {"amx-tile", "amx_tile"},
    {"amx-int8", "amx_int8"},
    {"amx-bf16", "amx_bf16"},
    {"amx-fp16", "amx_fp16"},
    {"fma4", "fma4"},
    {"xop", "xop"},
    {"tbm", "tbm"},
    {"aes", "aes"},
    {"pclmul", "pclmulqdq"},
    {"sha", "sha_ni"},
    {"adx", "adx"},
    {"avx512er", "avx512er"},
    {"avx512pf", "avx512pf"},
    {"avxifma", "avx_ifma"},
    {"avxvnniint8", "avx_vnni_int8"},
    {"avxneconvert", "avx_ne_convert"},
    {"avx512vp2intersect", "avx512_vp2intersect"},
};
const std::map<std::string, std::vector<std::string>> kImplies = {
    {"avx512f", {"avx2", "fma", "f16c"}},
    {"avx2", {"avx"}},
    {"fma", {"avx"}},
    {"f16c", {"avx"}},
    {"fma4", {"avx", "sse4a"}},
    {"xop", {"fma4"}},
    {"avx", {"sse4_2"}},
    {"sse4_2", {"sse4_1"}},
    {"sse4_1", {"ssse3"}},
    {"ssse3", {"pni"}},
    {"avx_vnni", {"avx2"}},
    {"avx_ifma", {"avx2"}},
    {"avx_vnni_int8", {"avx2"}},
    {"avx_ne_convert", {"avx2"}},
    {"vaes", {"avx", "aes"}},
    {"vpclmulqdq", {"avx", "pclmulqdq"}},
    {"amx_int8", {"amx_tile"}},
    {"amx_bf16", {"amx_tile"}},
    {"amx_fp16", {"amx_tile"}},
};
const std::map<std::string, std::string> kArchAliases = {
    {"amd64", "x86_64"},
    {"x64", "x86_64"},
    {"arm64", "aarch64"},
    {"i686", "x86"},
    {"i386", "x86"},
};

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

std::string strip(const std::string& s) {
  size_t a = s.find_first_not_of(" \t\n\r\f\v");
  if (a == std::string::npos) return "";
  return s.substr(a, s.find_last_not_of(" \t\n\r\f\v") - a + 1);
}

std::string norm_arch(const std::string& arch) {
  std::string a = lower(arch);
  auto it = kArchAliases.find(a);
  return it == kArchAliases.end() ? a : it->second;
}

/// ``mattr`` as "+feat"/"-feat" items, from its list or its comma form.
std::vector<std::string> mattr_items(const Json* mattr) {
  std::vector<std::string> out;
  if (!mattr || mattr->type == Json::Null) return out;
  if (mattr->is_str()) {
    std::stringstream ss(mattr->s);
    std::string item;
    while (std::getline(ss, item, ','))
      if (!strip(item).empty()) out.push_back(strip(item));
    return out;
  }
  if (mattr->type == Json::List)
    for (const auto& m : mattr->list) out.push_back(strip(py_str(m)));
  return out;
}

std::set<std::string> closure(const std::string& flag) {
  std::set<std::string> out;
  std::vector<std::string> todo = {flag};
  while (!todo.empty()) {
    std::string f = todo.back();
    todo.pop_back();
    if (!out.insert(f).second) continue;
    auto it = kImplies.find(f);
    if (it != kImplies.end()) todo.insert(todo.end(), it->second.begin(), it->second.end());
    if (f.rfind("avx512", 0) == 0 && f != "avx512f") todo.push_back("avx512f");
  }
  return out;
}

std::set<std::string> host_cpu_flags() {
  std::ifstream f("/proc/cpuinfo");
  std::string line;
  while (std::getline(f, line)) {
    size_t colon = line.find(':');
    if (colon == std::string::npos || strip(line.substr(0, colon)) != "flags") continue;
    std::stringstream ss(line.substr(colon + 1));
    std::set<std::string> flags;
    std::string flag;
    while (ss >> flag) flags.insert(flag);
    return flags;
  }
  return {};
}

}  // namespace

std::string host_arch() {
  struct utsname u;
  return uname(&u) == 0 ? norm_arch(u.machine) : "";
}

std::string target_arch(const Json& target) {
  const Json* triple = target.get("mtriple");
  if (!triple || triple->type == Json::Null || (triple->is_str() && triple->s.empty())) return "";
  std::string t = py_str(*triple);
  return norm_arch(t.substr(0, t.find('-')));
}

std::vector<std::string> required_cpu_features(const Json& target) {
  const Json* kind = target.get("kind");
  std::string arch = target_arch(target);
  if ((kind && py_str(*kind) != "llvm") || !(arch.empty() || arch == "x86_64")) return {};
  const Json* mcpu = target.get("mcpu");
  std::set<std::string> flags;
  auto it = kMcpuFeatures.find(lower(mcpu ? py_str(*mcpu) : ""));
  if (it != kMcpuFeatures.end()) flags.insert(it->second.begin(), it->second.end());
  for (const std::string& item : mattr_items(target.get("mattr"))) {
    bool plus = item.empty() || item[0] != '-';
    std::string name = !item.empty() && (item[0] == '+' || item[0] == '-') ? item.substr(1) : item;
    auto flag = kMattrToFlag.find(lower(name));
    if (flag == kMattrToFlag.end()) continue;
    if (plus) {
      std::set<std::string> more = closure(flag->second);
      flags.insert(more.begin(), more.end());
    } else {
      flags.erase(flag->second);
    }
  }
  return std::vector<std::string>(flags.begin(), flags.end());
}

std::vector<std::string> missing_cpu_features(const std::vector<std::string>& required) {
  static const std::set<std::string> have = host_cpu_flags();
  std::vector<std::string> out;
  if (have.empty()) return out;
  for (const auto& f : required)
    if (!have.count(f) && std::find(out.begin(), out.end(), f) == out.end()) out.push_back(f);
  return out;
}

}  // namespace detail
}  // namespace kiln
