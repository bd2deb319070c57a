// load() and Session (Python's runtime/session.py): the target and sizes checked, then lib.so
// (from a private temp file removed right after dlopen) run by TVM's Relax VM through tvm-ffi,
// inputs validated with Python's messages, outputs checked against the manifest.
#include <dlfcn.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <stdexcept>

#include "internal.hpp"

namespace kiln {

namespace ffi = tvm::ffi;
using detail::Json;

// ---------------------------------------------------------------------------------------------
// Tensor, Outputs

Tensor::Tensor(DLManagedTensor* managed) : managed_(managed) {}
Tensor::Tensor(Tensor&& other) noexcept : managed_(other.release()) {}
Tensor& Tensor::operator=(Tensor&& other) noexcept {
  if (this != &other) {
    if (managed_ && managed_->deleter) managed_->deleter(managed_);
    managed_ = other.release();
  }
  return *this;
}
Tensor::~Tensor() {
  if (managed_ && managed_->deleter) managed_->deleter(managed_);
}
const DLTensor& Tensor::dl() const {
  if (!managed_) throw std::logic_error("kiln::Tensor is empty");
  return managed_->dl_tensor;
}
std::string Tensor::dtype() const { return std::string(ffi::DLDataTypeToString(dl().dtype)); }
std::vector<int64_t> Tensor::shape() const { return std::vector<int64_t>(dl().shape, dl().shape + dl().ndim); }
int64_t Tensor::numel() const {
  int64_t n = 1;
  for (int i = 0; i < dl().ndim; ++i) n *= dl().shape[i];
  return n;
}
DLManagedTensor* Tensor::release() noexcept {
  DLManagedTensor* out = managed_;
  managed_ = nullptr;
  return out;
}

const Tensor& Outputs::at(const std::string& name) const {
  for (const auto& kv : items)
    if (kv.first == name) return kv.second;
  throw std::out_of_range("no output named " + detail::repr_str(name));
}

std::vector<int> format_versions() { return {1, 2}; }

namespace {

constexpr size_t kAlign = 64;

/// CPU memory aligned for TVM's kernels (FromNDAlloc's allocator).
struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t bytes = ffi::GetDataSize(*t);
    t->data = std::aligned_alloc(kAlign, std::max<size_t>((bytes + kAlign - 1) / kAlign * kAlign, kAlign));
    if (!t->data) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

DLDevice cpu() { return DLDevice{kDLCPU, 0}; }

ffi::Tensor empty_tensor(const std::vector<int64_t>& shape, DLDataType dtype) {
  return ffi::Tensor::FromNDAlloc(AlignedAlloc(), ffi::ShapeView(shape.data(), shape.size()), dtype, cpu());
}

std::string dtype_name(DLDataType t) { return std::string(ffi::DLDataTypeToString(t)); }

/// A dim as (integer coefficient, symbol factors): "64*N" -> (64, ["N"]).
std::pair<int64_t, std::vector<std::string>> dim_terms(const Json& dim) {
  if (dim.is_int()) return {dim.i, {}};
  std::string text;
  for (char c : dim.s)
    if (c != ' ') text += c;
  int64_t coef = 1;
  std::vector<std::string> syms;
  size_t at = 0;
  while (at <= text.size()) {
    size_t next = text.find('*', at);
    if (next == std::string::npos) next = text.size();
    std::string part = text.substr(at, next - at);
    at = next + 1;
    if (!part.empty() && std::all_of(part.begin(), part.end(), ::isdigit)) coef *= std::stoll(part);
    else syms.push_back(part);
  }
  return {coef, syms};
}

std::string describe_dim(const Json& dim) {
  auto [coef, syms] = dim_terms(dim);
  return coef == 1 && syms.size() == 1 ? "symbol " + detail::py_str(dim) : detail::py_str(dim);
}

std::string ints(const int64_t* v, int n) {
  std::string out = "[";
  for (int k = 0; k < n; ++k) out += (k ? ", " : "") + std::to_string(v[k]);
  return out + "]";
}

/// Bytes of a DLTensor copied into a C-ordered buffer (strides honoured).
void gather(const DLTensor& t, char* out) {
  size_t item = (t.dtype.bits * t.dtype.lanes + 7) / 8;
  const char* base = static_cast<const char*>(t.data) + t.byte_offset;
  int64_t count = 1;
  for (int d = 0; d < t.ndim; ++d) count *= t.shape[d];
  std::vector<int64_t> index(t.ndim, 0);
  for (int64_t flat = 0; flat < count; ++flat) {
    int64_t offset = 0, stride = 1;
    for (int d = t.ndim; d-- > 0;) {
      offset += index[d] * (t.strides ? t.strides[d] : stride);
      stride *= t.shape[d];
    }
    std::memcpy(out + flat * item, base + offset * static_cast<int64_t>(item), item);
    for (int d = t.ndim; d-- > 0;) {
      if (++index[d] < t.shape[d]) break;
      index[d] = 0;
    }
  }
}

bool compact(const DLTensor& t) {
  if (!t.strides) return true;
  int64_t expect = 1;
  for (int d = t.ndim; d-- > 0;) {
    if (t.shape[d] != 1 && t.strides[d] != expect) return false;
    expect *= t.shape[d];
  }
  return true;
}

/// A borrowed tensor for TVM: the caller's memory when compact and aligned, else an aligned copy.
ffi::Tensor to_device(const DLTensor& t, DLDataType dtype) {
  std::vector<int64_t> shape(t.shape, t.shape + t.ndim);
  int64_t count = 1;
  for (int64_t d : shape) count *= d;
  const char* data = static_cast<const char*>(t.data) + t.byte_offset;
  if (count == 0) return empty_tensor(shape, dtype);
  if (compact(t) && reinterpret_cast<uintptr_t>(data) % kAlign == 0) {
    struct Borrowed {
      DLManagedTensor managed;
      std::vector<int64_t> shape;
    };
    auto* b = new Borrowed{};
    b->shape = shape;
    b->managed.dl_tensor = DLTensor{const_cast<char*>(data), cpu(), t.ndim, dtype, b->shape.data(), nullptr, 0};
    b->managed.manager_ctx = b;
    b->managed.deleter = [](DLManagedTensor* self) { delete static_cast<Borrowed*>(self->manager_ctx); };
    return ffi::Tensor::FromDLPack(&b->managed, kAlign, true);
  }
  ffi::Tensor copy = empty_tensor(shape, dtype);
  gather(t, static_cast<char*>(copy.data_ptr()));
  return copy;
}

/// An element of a CPU tensor as double / int64 (specialized-input comparisons).
double element_double(const DLTensor& t, int64_t flat) {
  std::vector<char> buf((t.dtype.bits + 7) / 8);
  const char* base = static_cast<const char*>(t.data) + t.byte_offset;
  int64_t offset = 0, rest = flat, stride = 1;
  for (int d = t.ndim; d-- > 0;) {
    int64_t i = rest % t.shape[d];
    rest /= t.shape[d];
    offset += i * (t.strides ? t.strides[d] : stride);
    stride *= t.shape[d];
  }
  std::memcpy(buf.data(), base + offset * static_cast<int64_t>(buf.size()), buf.size());
  auto u = [&](auto v) { std::memcpy(&v, buf.data(), sizeof v); return v; };
  switch (t.dtype.code) {
    case kDLBool: return buf[0] != 0;
    case kDLInt:
      return t.dtype.bits == 8 ? u(int8_t()) : t.dtype.bits == 16 ? u(int16_t()) : t.dtype.bits == 32 ? u(int32_t()) : static_cast<double>(u(int64_t()));
    case kDLUInt:
      return t.dtype.bits == 8 ? u(uint8_t()) : t.dtype.bits == 16 ? u(uint16_t()) : t.dtype.bits == 32 ? u(uint32_t()) : static_cast<double>(u(uint64_t()));
    case kDLFloat:
      if (t.dtype.bits == 32) return u(float());
      if (t.dtype.bits == 64) return u(double());
      if (t.dtype.bits == 16) {
        uint16_t h = u(uint16_t());
        int e = (h >> 10) & 31, m = h & 1023;
        double v = e == 0 ? std::ldexp(m, -24) : e == 31 ? (m ? NAN : INFINITY) : std::ldexp(m + 1024, e - 25);
        return h & 0x8000 ? -v : v;
      }
      break;
    case kDLBfloat: {
      uint32_t bits = static_cast<uint32_t>(u(uint16_t())) << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      return f;
    }
    default:
      break;
  }
  return NAN;
}

/// Python's repr of one value of ``dtype`` (what ndarray.tolist() prints).
std::string value_text(double v, const std::string& dtype) {
  if (dtype == "bool") return v != 0 ? "True" : "False";
  if (dtype.rfind("int", 0) == 0 || dtype.rfind("uint", 0) == 0) return std::to_string(static_cast<int64_t>(v));
  if (dtype == "float32") return detail::py_float(static_cast<float>(v));
  return detail::py_float(v);
}

/// ndarray.tolist()'s repr of flat values in ``shape``.
std::string nested_text(const std::vector<double>& values, const std::vector<int64_t>& shape, const std::string& dtype,
                        size_t dim = 0, size_t* at = nullptr) {
  size_t start = 0;
  if (!at) at = &start;
  if (dim == shape.size()) return value_text(values[(*at)++], dtype);
  std::string out = "[";
  for (int64_t k = 0; k < shape[dim]; ++k) out += (k ? ", " : "") + nested_text(values, shape, dtype, dim + 1, at);
  return out + "]";
}

void flatten_json(const Json& v, std::vector<double>* out) {
  if (v.type == Json::List) {
    for (const auto& item : v.list) flatten_json(item, out);
  } else {
    out->push_back(v.type == Json::Bool ? v.b : v.is_int() ? static_cast<double>(v.i) : v.type == Json::Float ? v.f : NAN);
  }
}

/// What a specialized value becomes in its dtype (numpy.asarray(value, dtype)).
double in_dtype(double v, const std::string& dtype) {
  if (dtype == "bool") return v != 0;
  if (dtype.rfind("int", 0) == 0 || dtype.rfind("uint", 0) == 0) return std::trunc(v);
  if (dtype == "float32") return static_cast<float>(v);
  return v;
}

struct Spec {
  std::string name;
  std::string dtype;
  DLDataType dl;
  std::vector<Json> shape;
};

struct Specialized {
  std::string name;
  std::string dtype;
  std::vector<int64_t> shape;
  std::vector<double> values;
};

struct Vm {
  std::optional<ffi::Module> module;
  std::optional<ffi::Function> entry;
};

/// What a Session holds of TVM, released once by close() or the last Session/run holding it.
struct Loaded {
  std::optional<ffi::Module> library;
  std::vector<ffi::Tensor> weights;
  std::mutex mu;
  std::vector<std::unique_ptr<Vm>> idle;
};

}  // namespace

struct SessionImpl {
  std::string path;
  std::string manifest_text;
  Json manifest;
  TrustInfo trust;
  std::string entry;
  std::vector<Spec> inputs, outputs;
  std::vector<TensorSpec> input_specs, output_specs;
  std::map<std::string, int64_t> symbols;
  std::vector<Specialized> specialized;
  std::vector<int> aliases;  // 1 true, 0 false, -1 not said
  std::mutex mu;
  std::shared_ptr<Loaded> loaded;

  std::shared_ptr<Loaded> hold() {
    std::lock_guard<std::mutex> guard(mu);
    if (!loaded) throw ArtifactError(path + ": this Session was closed; load the artifact again to run it");
    return loaded;
  }

  std::unique_ptr<Vm> take_vm(Loaded& l) {
    {
      std::lock_guard<std::mutex> guard(l.mu);
      if (!l.idle.empty()) {
        auto vm = std::move(l.idle.back());
        l.idle.pop_back();
        return vm;
      }
    }
    auto vm = std::make_unique<Vm>();
    vm->module = (*l.library)->GetFunction("vm_load_executable", true).value()().cast<ffi::Module>();
    (*vm->module)->GetFunction("vm_initialization", true).value()(static_cast<int>(kDLCPU), 0, 2);  // pooled allocator
    auto fn = (*vm->module)->GetFunction(entry, true);
    if (!fn.has_value()) throw std::runtime_error("no function " + entry);
    vm->entry = fn.value();
    return vm;
  }

  void give_back(Loaded& l, std::unique_ptr<Vm> vm) {
    std::lock_guard<std::mutex> guard(l.mu);
    l.idle.push_back(std::move(vm));
  }

  std::optional<int64_t> compiled_dim(const Json& dim) const {
    auto [coef, syms] = dim_terms(dim);
    int64_t v = coef;
    for (const auto& s : syms) {
      auto it = symbols.find(s);
      if (it == symbols.end()) return std::nullopt;
      v *= it->second;
    }
    return v;
  }

  std::vector<const DLTensor*> validate(const Inputs& given) const;
  Outputs run(const Inputs& inputs);
};

namespace {

std::string spec_shape_text(const Spec& s) {
  std::string out = "[";
  for (size_t k = 0; k < s.shape.size(); ++k) out += (k ? ", " : "") + detail::py_repr(s.shape[k]);
  return out + "]";
}

void check_specialized(const Specialized& want, const std::string& name, const DLTensor& got) {
  std::string got_dtype = dtype_name(got.dtype);
  std::string want_text = nested_text(want.values, want.shape, want.dtype);
  if (got_dtype != want.dtype)
    throw InputError("input " + detail::repr_str(name) + ": expected dtype " + want.dtype + ", got " + got_dtype +
                     " (it was specialized to " + want_text + " at compile time)");
  std::vector<int64_t> shape(got.shape, got.shape + got.ndim);
  int64_t size = 1;
  for (int64_t d : shape) size *= d;
  bool same = shape == want.shape;
  std::vector<double> values;
  for (int64_t k = 0; k < size && (same || size <= 64); ++k) values.push_back(element_double(got, k));
  if (same) {
    bool floating = want.dtype.rfind("float", 0) == 0 || want.dtype == "bfloat16";
    for (size_t k = 0; k < values.size() && same; ++k)
      same = values[k] == want.values[k] || (floating && std::isnan(values[k]) && std::isnan(want.values[k]));
  }
  if (!same)
    throw InputError("input " + detail::repr_str(name) + " was specialized to " + want_text + " at compile time; got " +
                     (size <= 64 ? nested_text(values, shape, want.dtype) : "an array of shape " + ints(got.shape, got.ndim)) +
                     "; recompile with that value");
}

}  // namespace

std::vector<const DLTensor*> SessionImpl::validate(const Inputs& given_all) const {
  std::vector<std::pair<std::string, const DLTensor*>> given;
  for (const auto& kv : given_all) {
    if (!kv.second.get()) throw InputError("input " + detail::repr_str(kv.first) + " is a null tensor");
    for (const auto& g : given)
      if (g.first == kv.first) throw InputError("input " + detail::repr_str(kv.first) + " is given twice");
    auto sp = std::find_if(specialized.begin(), specialized.end(), [&](const Specialized& s) { return s.name == kv.first; });
    if (sp != specialized.end()) {
      check_specialized(*sp, kv.first, *kv.second.get());
      continue;
    }
    given.emplace_back(kv.first, kv.second.get());
  }
  std::vector<std::string> names, got_names, missing, extra;
  for (const auto& s : inputs) names.push_back(s.name);
  for (const auto& g : given) got_names.push_back(g.first);
  for (const auto& n : names)
    if (std::find(got_names.begin(), got_names.end(), n) == got_names.end()) missing.push_back(n);
  for (const auto& n : got_names)
    if (std::find(names.begin(), names.end(), n) == names.end()) extra.push_back(n);
  if (!missing.empty() || !extra.empty()) {
    std::string parts = missing.empty() ? "" : "missing inputs " + detail::repr_list(missing);
    if (!extra.empty()) parts += (parts.empty() ? "" : " and ") + std::string("unexpected inputs ") + detail::repr_list(extra);
    throw InputError(parts + ": the model takes " + detail::repr_list(names) + ", got " + detail::repr_list(got_names));
  }
  std::vector<const DLTensor*> ordered;
  std::map<std::string, std::tuple<int64_t, std::string, size_t>> bound;
  for (const Spec& spec : inputs) {
    const DLTensor* t = std::find_if(given.begin(), given.end(), [&](const auto& g) { return g.first == spec.name; })->second;
    if (t->device.device_type != kDLCPU && t->device.device_type != kDLCUDAHost)
      throw InputError("input " + detail::repr_str(spec.name) + ": expected a CPU tensor, got DLPack device type " +
                       std::to_string(t->device.device_type));
    std::string got = dtype_name(t->dtype);
    if (got != spec.dtype)
      throw InputError("input " + detail::repr_str(spec.name) + ": expected dtype " + spec.dtype + ", got " + got +
                       " (convert it with .astype(np." + spec.dtype + "); kiln does not cast silently)");
    if (static_cast<size_t>(t->ndim) != spec.shape.size())
      throw InputError("input " + detail::repr_str(spec.name) + ": expected rank " + std::to_string(spec.shape.size()) +
                       " (shape " + spec_shape_text(spec) + "), got rank " + std::to_string(t->ndim) + " (shape " +
                       ints(t->shape, t->ndim) + ")");
    for (size_t i = 0; i < spec.shape.size(); ++i) {
      auto [coef, syms] = dim_terms(spec.shape[i]);
      int64_t g = t->shape[i];
      if (syms.size() != 1 || coef == 0 || g % coef) continue;
      const std::string& sym = syms[0];
      int64_t value = g / coef;
      auto it = bound.find(sym);
      if (it != bound.end() && std::get<0>(it->second) != value)
        throw InputError("input " + detail::repr_str(spec.name) + " dim " + std::to_string(i) + " is " +
                         describe_dim(spec.shape[i]) + ": got " + std::to_string(g) + " (so " + sym + "=" +
                         std::to_string(value) + ") but input " + detail::repr_str(std::get<1>(it->second)) + " dim " +
                         std::to_string(std::get<2>(it->second)) + " gave " + sym + "=" +
                         std::to_string(std::get<0>(it->second)) + ": " + sym + " must take one value across all inputs");
      bound.emplace(sym, std::make_tuple(value, spec.name, i));
    }
    ordered.push_back(t);
  }
  for (size_t n = 0; n < inputs.size(); ++n) {
    const Spec& spec = inputs[n];
    const DLTensor* t = ordered[n];
    for (size_t i = 0; i < spec.shape.size(); ++i) {
      auto [coef, syms] = dim_terms(spec.shape[i]);
      int64_t got = t->shape[i];
      if (syms.empty()) {
        if (got != coef)
          throw InputError("input " + detail::repr_str(spec.name) + ": dim " + std::to_string(i) + " should be " +
                           std::to_string(coef) + ", got " + std::to_string(got) + " (expected shape " +
                           spec_shape_text(spec) + ", got " + ints(t->shape, t->ndim) + ")");
        continue;
      }
      std::vector<std::string> unknown;
      for (const auto& s : syms)
        if (!symbols.count(s)) unknown.push_back(s);
      if (!unknown.empty())
        throw ArtifactError(path + ": manifest gives no compiled value for symbols " + detail::repr_list(unknown));
      int64_t want = *compiled_dim(spec.shape[i]);
      if (got == want) continue;
      std::string values, got_desc = "got " + std::to_string(got);
      std::vector<std::string> seen;
      for (const auto& s : syms) {
        if (std::find(seen.begin(), seen.end(), s) != seen.end()) continue;
        seen.push_back(s);
        values += (values.empty() ? "" : ", ") + s + "=" + std::to_string(symbols.at(s));
      }
      if (!(coef == 1 && syms.size() == 1)) {
        for (const auto& s : seen)
          if (bound.count(s)) got_desc += " (" + s + "=" + std::to_string(std::get<0>(bound.at(s))) + ")";
        got_desc += ", expected " + std::to_string(want);
      }
      throw InputError("input " + detail::repr_str(spec.name) + " dim " + std::to_string(i) + " is " +
                       describe_dim(spec.shape[i]) + ": " + got_desc + " but the artifact was compiled for " + values +
                       " (recompile with that shape)");
    }
  }
  return ordered;
}

namespace {

void flatten_result(const ffi::Any& result, std::vector<ffi::Tensor>* out) {
  if (auto t = result.as<ffi::Tensor>()) {
    out->push_back(*t);
  } else if (auto a = result.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& item : *a) flatten_result(item, out);
  } else {
    throw std::runtime_error(std::string("the entry returned a ") + result.GetTypeKey() + ", not tensors");
  }
}

bool overlaps(const DLTensor& a, const DLTensor& b) {
  auto range = [](const DLTensor& t) {
    const char* p = static_cast<const char*>(t.data) + t.byte_offset;
    return std::make_pair(p, p + ffi::GetDataSize(t));
  };
  auto [a0, a1] = range(a);
  auto [b0, b1] = range(b);
  return a0 < b1 && b0 < a1 && a0 != a1 && b0 != b1;
}

}  // namespace

Outputs SessionImpl::run(const Inputs& given) {
  std::vector<const DLTensor*> arrays = validate(given);
  std::shared_ptr<Loaded> l = hold();
  std::vector<ffi::Tensor> flat;
  try {
    std::vector<ffi::Tensor> tensors;
    for (size_t k = 0; k < arrays.size(); ++k) tensors.push_back(to_device(*arrays[k], inputs[k].dl));
    std::vector<ffi::AnyView> args;
    for (const auto& t : tensors) args.emplace_back(t);
    for (const auto& w : l->weights) args.emplace_back(w);
    std::unique_ptr<Vm> vm = take_vm(*l);
    ffi::Any result;
    vm->entry->CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);
    give_back(*l, std::move(vm));
    flatten_result(result, &flat);
  } catch (const Error&) {
    throw;
  } catch (const std::bad_alloc&) {
    throw ArtifactError(path + ": out of memory while running " + entry);
  } catch (const ffi::Error& e) {
    throw ArtifactError(path + ": " + entry + " failed (" + std::string(e.kind()) + ": " +
                        detail::trunc(std::string(e.message()), 500) + ")");
  } catch (const std::exception& e) {
    throw ArtifactError(path + ": " + entry + " failed (RuntimeError: " + detail::trunc(e.what(), 500) + ")");
  }
  if (flat.size() != outputs.size())
    throw ArtifactError(path + ": " + entry + " returned " + std::to_string(flat.size()) + " outputs, the manifest lists " +
                        std::to_string(outputs.size()));
  Outputs out;
  for (size_t i = 0; i < flat.size(); ++i) {
    const Spec& spec = outputs[i];
    const DLTensor& t = *flat[i].GetDLTensorPtr();
    bool ok = dtype_name(t.dtype) == spec.dtype && static_cast<size_t>(t.ndim) == spec.shape.size();
    std::string want = "[";
    for (size_t d = 0; d < spec.shape.size(); ++d) {
      auto c = compiled_dim(spec.shape[d]);
      want += (d ? ", " : "") + (c ? std::to_string(*c) : detail::py_repr(spec.shape[d]));
      if (ok && c && t.shape[d] != *c) ok = false;
    }
    want += "]";
    if (!ok)
      throw ArtifactError(path + ": output " + detail::repr_str(spec.name) + ": the manifest says " + spec.dtype + want +
                          ", the library returned " + dtype_name(t.dtype) + ints(t.shape, t.ndim) +
                          " (the library and manifest disagree)");
    bool alias = aliases[i] == 1;
    if (aliases[i] == -1) {
      for (const DLTensor* a : arrays) alias = alias || overlaps(t, *a);
      for (const auto& w : l->weights) alias = alias || overlaps(t, *w.GetDLTensorPtr());
    }
    ffi::Tensor result = flat[i];
    if (alias || !compact(t)) {
      result = empty_tensor(std::vector<int64_t>(t.shape, t.shape + t.ndim), t.dtype);
      gather(t, static_cast<char*>(result.data_ptr()));
    }
    out.items.emplace_back(spec.name, Tensor(result.ToDLPack()));
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// load

namespace {

void check_target(const std::string& path, const Json& manifest) {
  const Json& target = *manifest.get("target");
  const Json* kind_field = target.get("kind");
  std::string kind = kind_field ? detail::py_str(*kind_field) : "llvm";
  if (kind != "llvm")
    throw ArtifactError(path + ": compiled for target kind " + detail::repr_str(kind) +
                        "; this runtime runs CPU (llvm) code only");
  std::string arch = detail::target_arch(target), host = detail::host_arch();
  if (!arch.empty() && !host.empty() && arch != host) {
    const Json* triple = target.get("mtriple");
    throw ArtifactError(path + ": compiled for " + arch + " (mtriple=" + (triple ? detail::py_str(*triple) : "None") +
                        "), this machine is " + host + ": recompile on (or for) this machine");
  }
  std::vector<std::string> needed;
  for (const auto& f : manifest.get("cpu_features")->list)
    if (std::find(needed.begin(), needed.end(), f.s) == needed.end()) needed.push_back(f.s);
  for (const auto& f : detail::required_cpu_features(target))
    if (std::find(needed.begin(), needed.end(), f) == needed.end()) needed.push_back(f);
  std::vector<std::string> missing = detail::missing_cpu_features(needed);
  if (missing.empty()) return;
  const Json* mcpu = target.get("mcpu");
  const Json* mattr = target.get("mattr");
  std::string built = "mcpu=" + (mcpu ? detail::py_str(*mcpu) : "?");
  bool has_mattr = mattr && !(mattr->type == Json::Null || (mattr->is_str() && mattr->s.empty()) ||
                              (mattr->type == Json::List && mattr->list.empty()) || (mattr->type == Json::Bool && !mattr->b) ||
                              (mattr->is_int() && mattr->i == 0) || (mattr->type == Json::Dict && mattr->dict.empty()));
  if (has_mattr) {
    std::vector<std::string> items;
    if (mattr->is_str())
      for (char c : mattr->s) items.emplace_back(1, c);  // Python joins a string's characters
    else
      for (const auto& m : mattr->list) items.push_back(detail::py_str(m));
    std::string joined;
    for (const auto& it : items) joined += (joined.empty() ? "" : ",") + it;
    built += " mattr=" + joined;
  }
  std::string list;
  for (const auto& m : missing) list += (list.empty() ? "" : ", ") + m;
  throw ArtifactError(path + ": artifact was compiled for " + built + " which needs CPU features " + list +
                      "; this CPU lacks them (running it would die with SIGILL): recompile with --target 'llvm "
                      "-mcpu=...' for this machine (or with no --target: the host CPU is the default)");
}

void check_sizes(const std::string& path, const Json& manifest, const Limits& limits) {
  const Json& symbols = *manifest.get("symbols");
  for (const char* kind : {"inputs", "outputs"}) {
    for (const Json& spec : manifest.get(kind)->list) {
      __int128 count = 1;
      bool known = true;
      for (const Json& d : spec.get("shape")->list) {
        auto [coef, syms] = dim_terms(d);
        __int128 v = coef;
        for (const auto& s : syms) {
          const Json* value = symbols.get(s);
          if (!value) known = false;
          else v *= value->type == Json::Bool ? value->b : value->i;
        }
        count *= v;
        if (count > (static_cast<__int128>(1) << 100)) count = static_cast<__int128>(1) << 100;
      }
      if (!known) continue;
      __int128 bytes = count * detail::dtype_itemsize(spec.get("dtype")->s);
      uint64_t shown = bytes < 0 ? 0 : bytes > static_cast<__int128>(INT64_MAX) ? INT64_MAX : static_cast<uint64_t>(bytes);
      std::string shape = detail::py_repr(*spec.get("shape"));
      detail::check_limit(limits, "tensor_bytes", shown,
                          path + ": " + std::string(kind).substr(0, std::strlen(kind) - 1) + " " +
                              detail::py_repr(*spec.get("name")) + " (" + spec.get("dtype")->s + shape + ")");
    }
  }
}

/// libtvm_runtime and libtvm_ffi must be in the global symbol scope: kernel libraries have
/// undefined references into both (TVMBackendAnyList*, TVMFFIErrorSetRaisedFromCStrParts).
void promote_tvm_libraries() {
  static std::once_flag once;
  std::call_once(once, [] {
    for (const char* name : {"libtvm_ffi.so", "libtvm_runtime.so"}) dlopen(name, RTLD_NOW | RTLD_GLOBAL | RTLD_NOLOAD);
  });
}

std::string hex_id() {
  std::random_device rd;
  std::mt19937_64 gen((static_cast<uint64_t>(rd()) << 32) ^ rd() ^ static_cast<uint64_t>(getpid()));
  char buf[40];
  std::snprintf(buf, sizeof buf, "%016llx%016llx", static_cast<unsigned long long>(gen()),
                static_cast<unsigned long long>(gen()));
  return buf;
}

/// lib.so from a private temp folder (removed right after dlopen), on kiln's thread pool.
ffi::Module load_library(const std::string& path, const std::string& library) {
  promote_tvm_libraries();
  const char* tmp = std::getenv("TMPDIR");
  std::string pattern = std::string(tmp && *tmp ? tmp : "/tmp") + "/kiln-lib-XXXXXX";
  std::vector<char> dir(pattern.begin(), pattern.end());
  dir.push_back('\0');
  if (!mkdtemp(dir.data()))
    throw ArtifactError(path + ": lib.so could not be loaded (OSError: cannot make a temp folder: " + std::strerror(errno) + ")");
  std::string lib_path = std::string(dir.data()) + "/" + hex_id() + ".so";
  auto cleanup = [&] {
    ::unlink(lib_path.c_str());
    ::rmdir(dir.data());
  };
  try {
    {
      std::ofstream f(lib_path, std::ios::binary);
      f.write(library.data(), static_cast<std::streamsize>(library.size()));
      if (!f) throw std::runtime_error("cannot write " + lib_path);
    }
    ffi::Module module = ffi::Module::LoadFromFile(lib_path);
    detail::adopt_thread_pool(lib_path);
    cleanup();
    return module;
  } catch (const ffi::Error& e) {
    cleanup();
    throw ArtifactError(path + ": lib.so could not be loaded (" + std::string(e.kind()) + ": " + std::string(e.message()) + ")");
  } catch (const std::invalid_argument& e) {
    cleanup();
    throw ArtifactError(path + ": lib.so could not be loaded (ValueError: " + e.what() + ")");
  } catch (const std::exception& e) {
    cleanup();
    throw ArtifactError(path + ": lib.so could not be loaded (RuntimeError: " + e.what() + ")");
  }
}

std::vector<Spec> specs_of(const Json& list) {
  std::vector<Spec> out;
  for (const Json& s : list.list) {
    Spec spec;
    spec.name = detail::py_str(*s.get("name"));
    spec.dtype = s.get("dtype")->s;
    spec.dl = ffi::StringToDLDataType(ffi::String(spec.dtype));
    spec.shape = s.get("shape")->list;
    out.push_back(std::move(spec));
  }
  return out;
}

std::vector<TensorSpec> public_specs(const std::vector<Spec>& specs) {
  std::vector<TensorSpec> out;
  for (const Spec& s : specs) {
    TensorSpec t{s.name, s.dtype, {}};
    for (const Json& d : s.shape) t.shape.push_back(detail::py_str(d));
    out.push_back(std::move(t));
  }
  return out;
}

std::shared_ptr<SessionImpl> open_session(const std::string& path, detail::Contents& contents, const LoadOptions& options) {
  const Json& manifest = contents.manifest;
  if (options.check_cpu) check_target(path, manifest);
  check_sizes(path, manifest, options.limits);
  auto impl = std::make_shared<SessionImpl>();
  impl->path = path;
  impl->entry = manifest.get("entry")->s;
  impl->inputs = specs_of(*manifest.get("inputs"));
  impl->outputs = specs_of(*manifest.get("outputs"));
  impl->input_specs = public_specs(impl->inputs);
  impl->output_specs = public_specs(impl->outputs);
  for (const auto& kv : manifest.get("symbols")->dict) impl->symbols[kv.first] = kv.second.type == Json::Bool ? kv.second.b : kv.second.i;
  for (const Json& o : manifest.get("outputs")->list) {
    const Json* a = o.get("aliases");
    impl->aliases.push_back(!a || a->type == Json::Null ? -1 : (a->type == Json::Bool ? a->b : a->i != 0) ? 1 : 0);
  }
  if (const Json* sp = manifest.get("specialized")) {
    for (const Json& s : sp->list) {
      Specialized one{s.get("name")->s, s.get("dtype")->s, {}, {}};
      for (const Json& d : s.get("shape")->list) one.shape.push_back(d.i);
      flatten_json(*s.get("value"), &one.values);
      for (double& v : one.values) v = in_dtype(v, one.dtype);
      impl->specialized.push_back(std::move(one));
    }
  }
  auto loaded = std::make_shared<Loaded>();
  loaded->library = load_library(path, contents.library);
  contents.library = std::string();
  for (detail::Weight& w : contents.weights) {
    DLDataType dt = ffi::StringToDLDataType(ffi::String(w.dtype));
    ffi::Tensor t = empty_tensor(w.shape, dt);
    if (!w.bytes.empty()) std::memcpy(t.data_ptr(), w.bytes.data(), w.bytes.size());
    w.bytes = std::string();
    loaded->weights.push_back(std::move(t));
  }
  impl->loaded = loaded;
  std::unique_ptr<Vm> vm;
  int64_t arity = -1;
  try {
    vm = impl->take_vm(*loaded);
    arity = (*vm->module)->GetFunction("get_function_arity", true).value()(impl->entry).cast<int64_t>();
  } catch (const ffi::Error& e) {
    throw ArtifactError(path + ": lib.so has no usable function " + detail::repr_str(impl->entry) + " (" +
                        std::string(e.message()) + ")");
  } catch (const std::exception& e) {
    throw ArtifactError(path + ": lib.so has no usable function " + detail::repr_str(impl->entry) + " (" + e.what() + ")");
  }
  impl->give_back(*loaded, std::move(vm));
  size_t want = impl->inputs.size() + loaded->weights.size();
  if (arity != static_cast<int64_t>(want))
    throw ArtifactError(path + ": " + impl->entry + " takes " + std::to_string(arity) + " parameters, the manifest lists " +
                        std::to_string(impl->inputs.size()) + " inputs + " + std::to_string(loaded->weights.size()) +
                        " weights = " + std::to_string(want));
  impl->manifest_text = std::move(contents.manifest_text);
  impl->manifest = std::move(contents.manifest);
  impl->trust = contents.trust;
  return impl;
}

}  // namespace

Session load(const std::string& path, const LoadOptions& options) {
  detail::configure_threads(options.threads);
  detail::Contents contents;
  try {
    contents = detail::read_artifact(path, options);
  } catch (const Error&) {
    throw;
  } catch (const std::bad_alloc&) {
    throw ArtifactError(path + ": out of memory while reading the artifact; lower the size limits "
                        "(--max-member-mb, --max-tensor-mb) to refuse it early");
  } catch (const std::exception& e) {
    throw ArtifactError(path + ": cannot read the artifact (RuntimeError: " + detail::trunc(e.what(), 300) + ")");
  }
  try {
    return Session(open_session(path, contents, options));
  } catch (const Error&) {
    throw;
  } catch (const std::bad_alloc&) {
    throw ArtifactError(path + ": out of memory while loading the artifact");
  } catch (const ffi::Error& e) {
    throw ArtifactError(path + ": cannot load the artifact (" + std::string(e.kind()) + ": " +
                        detail::trunc(std::string(e.message()), 300) + ")");
  } catch (const std::exception& e) {
    throw ArtifactError(path + ": cannot load the artifact (RuntimeError: " + detail::trunc(e.what(), 300) + ")");
  }
}

Session::Session(std::shared_ptr<SessionImpl> impl) : impl_(std::move(impl)) {}

static SessionImpl& checked(const std::shared_ptr<SessionImpl>& impl) {
  if (!impl) throw std::logic_error("kiln::Session is empty (default-constructed or moved from)");
  return *impl;
}

Outputs Session::run(const Inputs& inputs) const { return checked(impl_).run(inputs); }
const std::vector<TensorSpec>& Session::inputs() const { return checked(impl_).input_specs; }
const std::vector<TensorSpec>& Session::outputs() const { return checked(impl_).output_specs; }
const std::string& Session::path() const { return checked(impl_).path; }
const TrustInfo& Session::trust() const { return checked(impl_).trust; }
const std::string& Session::manifest_json() const { return checked(impl_).manifest_text; }
void Session::close() {
  SessionImpl& impl = checked(impl_);
  std::lock_guard<std::mutex> guard(impl.mu);
  impl.loaded.reset();
}

}  // namespace kiln
