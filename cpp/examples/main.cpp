// kiln C++ example: load a .kiln artifact, run it once, print (and optionally save) the outputs.
//
//   kiln_example MODEL.kiln [--input NAME=FILE.npy]... [--out DIR] [--trust KEY.pub]...
//                [--allow-unsigned] [--threads N] [--print N] [--stats]
//
// Inputs not given as .npy files get deterministic values anyone can reproduce: element k of the
// i-th input is ((k * 7 + i * 3) % 11) for integer dtypes, ((k * 7 + i * 3) % 11 - 5) / 4 for float
// dtypes, and (k + i) % 2 for bool. Outputs are printed with full precision (%.9g for float32,
// %.17g for float64), and with --out written as DIR/NAME.npy. On a kiln error it prints
// "KIND: message" to stderr and exits 2.
#include <kiln/runtime.hpp>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace {

/// An input held by the example: the DLTensor points into ``data``.
struct HostTensor {
  std::vector<int64_t> shape;
  std::vector<unsigned char> data;
  DLTensor dl{};
};

DLDataType parse_dtype(const std::string& name) {
  struct Entry {
    const char* name;
    DLDataType dt;
  };
  static const Entry table[] = {
      {"float32", {kDLFloat, 32, 1}}, {"float64", {kDLFloat, 64, 1}}, {"float16", {kDLFloat, 16, 1}},
      {"bfloat16", {kDLBfloat, 16, 1}}, {"int8", {kDLInt, 8, 1}},     {"int16", {kDLInt, 16, 1}},
      {"int32", {kDLInt, 32, 1}},     {"int64", {kDLInt, 64, 1}},     {"uint8", {kDLUInt, 8, 1}},
      {"uint16", {kDLUInt, 16, 1}},   {"uint32", {kDLUInt, 32, 1}},   {"uint64", {kDLUInt, 64, 1}},
      {"bool", {kDLBool, 8, 1}}};
  for (const auto& e : table)
    if (name == e.name) return e.dt;
  throw std::runtime_error("the example cannot make inputs of dtype " + name);
}

/// The .npy descr of a DLPack dtype (little-endian).
std::string npy_descr(DLDataType t) {
  char kind = t.code == kDLFloat ? 'f' : t.code == kDLInt ? 'i' : t.code == kDLUInt ? 'u' : t.code == kDLBool ? 'b' : 'V';
  if (t.code == kDLBfloat) kind = 'V';
  int bytes = (t.bits + 7) / 8;
  return std::string(bytes == 1 ? "|" : "<") + kind + std::to_string(bytes);
}

/// Deterministic values for input ``index`` (see the file comment).
void fill(HostTensor& t, DLDataType dt, int index) {
  size_t count = 1;
  for (int64_t d : t.shape) count *= static_cast<size_t>(d);
  size_t item = (dt.bits + 7) / 8;
  t.data.assign(count * item, 0);
  for (size_t k = 0; k < count; ++k) {
    long v = static_cast<long>((k * 7 + static_cast<size_t>(index) * 3) % 11);
    unsigned char* p = &t.data[k * item];
    if (dt.code == kDLFloat && dt.bits == 32) {
      float f = static_cast<float>(v - 5) / 4.0f;
      std::memcpy(p, &f, 4);
    } else if (dt.code == kDLFloat && dt.bits == 64) {
      double f = static_cast<double>(v - 5) / 4.0;
      std::memcpy(p, &f, 8);
    } else if (dt.code == kDLBool) {
      *p = static_cast<unsigned char>((k + static_cast<size_t>(index)) % 2);
    } else if (dt.code == kDLInt || dt.code == kDLUInt) {
      std::memcpy(p, &v, item);  // little-endian: the low bytes of v
    } else {
      throw std::runtime_error("the example makes float32/float64/int/bool inputs only; give a .npy");
    }
  }
}

/// A C-ordered little-endian .npy file (what numpy.save writes) as an input tensor.
void read_npy(const std::string& path, HostTensor& t, DLDataType* dt) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot read " + path);
  std::string bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (bytes.size() < 10 || bytes.compare(0, 6, "\x93NUMPY") != 0) throw std::runtime_error(path + ": not a .npy file");
  size_t hlen = bytes[6] == 1 ? (static_cast<unsigned char>(bytes[8]) | static_cast<unsigned char>(bytes[9]) << 8)
                              : (static_cast<unsigned char>(bytes[8]) | static_cast<unsigned char>(bytes[9]) << 8 |
                                 static_cast<unsigned char>(bytes[10]) << 16);
  size_t start = bytes[6] == 1 ? 10 : 12;
  std::string header = bytes.substr(start, hlen);
  auto field = [&](const std::string& key) {
    size_t at = header.find("'" + key + "':");
    if (at == std::string::npos) throw std::runtime_error(path + ": npy header lacks " + key);
    return header.substr(at + key.size() + 3);
  };
  std::string descr = field("descr");
  descr = descr.substr(descr.find('\'') + 1);
  descr = descr.substr(0, descr.find('\''));
  if (field("fortran_order").find("False") != 1) throw std::runtime_error(path + ": Fortran-ordered .npy");
  std::string shape = field("shape");
  shape = shape.substr(shape.find('(') + 1, shape.find(')') - shape.find('(') - 1);
  std::stringstream ss(shape);
  std::string dim;
  t.shape.clear();
  while (std::getline(ss, dim, ','))
    if (dim.find_first_not_of(' ') != std::string::npos) t.shape.push_back(std::stoll(dim));
  static const std::map<std::string, DLDataType> kinds = {
      {"<f4", {kDLFloat, 32, 1}}, {"<f8", {kDLFloat, 64, 1}}, {"<f2", {kDLFloat, 16, 1}}, {"|i1", {kDLInt, 8, 1}},
      {"<i2", {kDLInt, 16, 1}},   {"<i4", {kDLInt, 32, 1}},   {"<i8", {kDLInt, 64, 1}},   {"|u1", {kDLUInt, 8, 1}},
      {"<u2", {kDLUInt, 16, 1}},  {"<u4", {kDLUInt, 32, 1}},  {"<u8", {kDLUInt, 64, 1}},  {"|b1", {kDLBool, 8, 1}}};
  auto it = kinds.find(descr);
  if (it == kinds.end()) throw std::runtime_error(path + ": unsupported npy dtype " + descr);
  *dt = it->second;
  t.data.assign(bytes.begin() + static_cast<long>(start + hlen), bytes.end());
}

void write_npy(const std::string& path, const kiln::Tensor& t) {
  std::string shape = "(";
  for (int64_t d : t.shape()) shape += std::to_string(d) + ",";
  if (t.shape().size() > 1) shape.pop_back();
  shape += ")";
  std::string header = "{'descr': '" + npy_descr(t.dl().dtype) + "', 'fortran_order': False, 'shape': " + shape + ", }";
  while ((10 + header.size() + 1) % 64) header += ' ';
  header += '\n';
  std::ofstream f(path, std::ios::binary);
  f.write("\x93NUMPY\x01\x00", 8);
  char len[2] = {static_cast<char>(header.size() & 255), static_cast<char>(header.size() >> 8)};
  f.write(len, 2);
  f << header;
  size_t bytes = static_cast<size_t>(t.numel()) * ((t.dl().dtype.bits + 7) / 8);
  f.write(t.data<char>(), static_cast<std::streamsize>(bytes));
  if (!f) throw std::runtime_error("cannot write " + path);
}

void print(const std::string& name, const kiln::Tensor& t, int64_t most) {
  std::cout << name << ": " << t.dtype() << " [";
  for (size_t d = 0; d < t.shape().size(); ++d) std::cout << (d ? ", " : "") << t.shape()[d];
  std::cout << "]\n";
  const DLDataType dt = t.dl().dtype;
  int64_t n = std::min(t.numel(), most);
  for (int64_t k = 0; k < n; ++k) {
    char buf[64];
    if (dt.code == kDLFloat && dt.bits == 32) std::snprintf(buf, sizeof buf, "%.9g", static_cast<double>(t.data<float>()[k]));
    else if (dt.code == kDLFloat && dt.bits == 64) std::snprintf(buf, sizeof buf, "%.17g", t.data<double>()[k]);
    else if (dt.code == kDLInt && dt.bits == 64) std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(t.data<int64_t>()[k]));
    else if (dt.code == kDLInt && dt.bits == 32) std::snprintf(buf, sizeof buf, "%d", t.data<int32_t>()[k]);
    else if (dt.code == kDLBool) std::snprintf(buf, sizeof buf, "%d", t.data<unsigned char>()[k] != 0);
    else std::snprintf(buf, sizeof buf, "?");
    std::cout << (k % 8 ? " " : (k ? "\n  " : "  ")) << buf;
  }
  if (n < t.numel()) std::cout << " ... (" << t.numel() - n << " more)";
  std::cout << "\n";
}

int usage() {
  std::cerr << "usage: kiln_example MODEL.kiln [--input NAME=FILE.npy]... [--out DIR] [--trust KEY.pub]...\n"
               "                    [--allow-unsigned] [--threads N] [--print N] [--stats]\n";
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return usage();
  std::string model = argv[1], out_dir;
  kiln::LoadOptions options;
  std::map<std::string, std::string> npy_inputs;
  int64_t most = 64;
  bool stats = false;
  for (int k = 2; k < argc; ++k) {
    std::string arg = argv[k];
    auto value = [&]() -> std::string {
      if (k + 1 >= argc) throw std::runtime_error(arg + " needs a value");
      return argv[++k];
    };
    try {
      if (arg == "--input") {
        std::string item = value();
        size_t eq = item.find('=');
        if (eq == std::string::npos) return usage();
        npy_inputs[item.substr(0, eq)] = item.substr(eq + 1);
      } else if (arg == "--out") out_dir = value();
      else if (arg == "--trust") options.trusted_keys.push_back(value());
      else if (arg == "--allow-unsigned") options.allow_unsigned = true;
      else if (arg == "--threads") options.threads = std::stoi(value());
      else if (arg == "--print") most = std::stoll(value());
      else if (arg == "--stats") stats = true;
      else return usage();
    } catch (const std::exception& e) {
      std::cerr << e.what() << "\n";
      return usage();
    }
  }
  try {
    kiln::Session session = kiln::load(model, options);
    std::vector<HostTensor> hosts(session.inputs().size());
    kiln::Inputs inputs;
    for (size_t i = 0; i < hosts.size(); ++i) {
      const kiln::TensorSpec& spec = session.inputs()[i];
      HostTensor& h = hosts[i];
      DLDataType dt = parse_dtype(spec.dtype);
      auto given = npy_inputs.find(spec.name);
      if (given != npy_inputs.end()) {
        read_npy(given->second, h, &dt);
      } else {
        for (const std::string& d : spec.shape) {
          if (d.empty() || d.find_first_not_of("0123456789") != std::string::npos)
            throw std::runtime_error("input " + spec.name + " has symbolic dim " + d + ": give it with --input");
          h.shape.push_back(std::stoll(d));
        }
        fill(h, dt, static_cast<int>(i));
      }
      h.dl = DLTensor{h.data.data(), DLDevice{kDLCPU, 0}, static_cast<int32_t>(h.shape.size()), dt, h.shape.data(),
                      nullptr, 0};
      inputs.emplace_back(spec.name, h.dl);
    }
    kiln::Outputs outputs = session.run(inputs);
    for (const auto& [name, tensor] : outputs) {
      print(name, tensor, most);
      if (!out_dir.empty()) write_npy(out_dir + "/" + name + ".npy", tensor);
    }
    if (stats) {
      kiln::PoolStats p = kiln::thread_pool_stats();
      std::cout << "pool: launches=" << p.launches << " pooled=" << p.pooled << " inline=" << p.inline_
                << " chunks_caller=" << p.chunks_caller << " chunks_workers=" << p.chunks_workers
                << " workers=" << p.workers << "\n";
    }
  } catch (const kiln::Error& e) {
    std::cerr << e.kind() << ": " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
