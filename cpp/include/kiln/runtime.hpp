// kiln's C++ runtime: load a compiled .kiln artifact and run it on DLPack tensors.
//
//   kiln::Session s = kiln::load("m.kiln");
//   kiln::Outputs out = s.run({{"x", dl_tensor}});
//   const DLTensor& y = out.at("logits").dl();
//
// The same checks as the Python runtime (kiln.runtime), in the same order and with the same
// messages: zip directory against size limits, manifest digest and Ed25519 signature against the
// trusted keys, manifest structure and format version, member sha256s, weight npy headers, the
// target's architecture and CPU features, then the library; at run time input names, dtypes and
// shapes, and outputs against the manifest.
//
// Errors are exceptions (kiln::Error and its subclasses, named as in Python: ArtifactError,
// TrustError, InputError, LimitError) carrying the Python message text, so a log line reads the
// same whichever runtime wrote it; ORT's and AOTInductor's C++ APIs throw too.
#pragma once

#include <dlpack/dlpack.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace kiln {

/// Base of every error kiln raises for a bad artifact or bad input; what() is the message.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
  /// The Python class name of this error ("ArtifactError", ...).
  virtual const char* kind() const noexcept { return "Error"; }
};

/// An artifact that cannot be used; the message names the file and what is wrong.
class ArtifactError : public Error {
 public:
  using Error::Error;
  const char* kind() const noexcept override { return "ArtifactError"; }
};

/// An artifact whose signature is missing, wrong, or by a key that is not trusted.
class TrustError : public ArtifactError {
 public:
  using ArtifactError::ArtifactError;
  const char* kind() const noexcept override { return "TrustError"; }
};

/// Run inputs that do not match the model's signature: names the input, expected and got.
class InputError : public Error {
 public:
  using Error::Error;
  const char* kind() const noexcept override { return "InputError"; }
};

/// Input past one of kiln's size limits; names the limit, its value and how to raise it.
class LimitError : public Error {
 public:
  using Error::Error;
  const char* kind() const noexcept override { return "LimitError"; }
};

/// A key file that cannot be read or is not an Ed25519 key; the message names the file.
class KeyFileError : public Error {
 public:
  using Error::Error;
  const char* kind() const noexcept override { return "KeyFileError"; }
};

/// Largest sizes the runtime accepts (bytes, except zip_ratio); the defaults are Python's.
struct Limits {
  uint64_t member_bytes = 4ull << 30;
  uint64_t artifact_bytes = 16ull << 30;
  uint64_t zip_ratio = 200;
  uint64_t constant_bytes = 1ull << 30;
  uint64_t tensor_bytes = 16ull << 30;
};

/// What load() accepts beside the path (Python: kiln.load's keyword arguments).
struct LoadOptions {
  /// Public key files (PEM public or private key, or 32 raw bytes) trusted beside
  /// KILN_TRUSTED_KEYS and the local key $KILN_HOME/signing.pub.
  std::vector<std::string> trusted_keys;
  /// Accept an unsigned or untrusted artifact (never one whose signature fails to verify).
  bool allow_unsigned = false;
  Limits limits;
  /// Refuse code for another architecture or for CPU features this CPU lacks (SIGILL otherwise).
  bool check_cpu = true;
  /// Kernel threads; 0: TVM_NUM_THREADS, else every CPU this process may use.
  int threads = 0;
};

/// One input or output: dims are ints or symbol expressions ("N", "64*N") as in the manifest.
struct TensorSpec {
  std::string name;
  std::string dtype;
  std::vector<std::string> shape;
};

/// A tensor the runtime hands out (an output): owns one DLManagedTensor, CPU memory, C order.
class Tensor {
 public:
  Tensor() = default;
  /// Takes ownership of ``managed`` (its deleter runs when this Tensor is destroyed).
  explicit Tensor(DLManagedTensor* managed);
  Tensor(Tensor&&) noexcept;
  Tensor& operator=(Tensor&&) noexcept;
  Tensor(const Tensor&) = delete;
  Tensor& operator=(const Tensor&) = delete;
  ~Tensor();

  const DLTensor& dl() const;
  /// The dtype's manifest name (float32, int64, bfloat16, ...).
  std::string dtype() const;
  std::vector<int64_t> shape() const;
  int64_t numel() const;
  /// The first element, typed (no check: compare dtype() first).
  template <typename T>
  const T* data() const {
    return reinterpret_cast<const T*>(static_cast<const char*>(dl().data) + dl().byte_offset);
  }
  /// Hands the DLManagedTensor to the caller (who must call its deleter); this Tensor is empty after.
  DLManagedTensor* release() noexcept;

 private:
  DLManagedTensor* managed_ = nullptr;
};

/// A borrowed input: a DLTensor (CPU) the caller keeps alive for the duration of run().
class TensorRef {
 public:
  TensorRef(const DLTensor& t) : t_(&t) {}  // NOLINT: implicit by design ({{"x", t}})
  TensorRef(const DLTensor* t) : t_(t) {}  // NOLINT
  TensorRef(const DLManagedTensor* t) : t_(t ? &t->dl_tensor : nullptr) {}  // NOLINT
  TensorRef(const Tensor& t) : t_(&t.dl()) {}  // NOLINT
  const DLTensor* get() const { return t_; }

 private:
  const DLTensor* t_;
};

/// Inputs by name, in the caller's order (named in error messages in that order).
using Inputs = std::vector<std::pair<std::string, TensorRef>>;

/// Outputs by name, in the manifest's order.
class Outputs {
 public:
  std::vector<std::pair<std::string, Tensor>> items;
  /// The output called ``name``; std::out_of_range if there is none.
  const Tensor& at(const std::string& name) const;
  size_t size() const { return items.size(); }
  auto begin() const { return items.begin(); }
  auto end() const { return items.end(); }
};

/// What the signature check found.
struct TrustInfo {
  bool signed_ = false;
  std::string key_id;
  std::string trusted_by;  // "" when not trusted (loaded with allow_unsigned)
  bool trusted() const { return !trusted_by.empty(); }
  std::string describe() const;
};

struct SessionImpl;

/// A loaded artifact, ready to run; run() is safe from several threads at once.
class Session {
 public:
  Session() = default;
  explicit Session(std::shared_ptr<SessionImpl> impl);
  Session(Session&&) noexcept = default;
  Session& operator=(Session&&) noexcept = default;

  /// Validate the inputs (InputError), run the entry function, check the outputs (ArtifactError).
  Outputs run(const Inputs& inputs) const;
  const std::vector<TensorSpec>& inputs() const;
  const std::vector<TensorSpec>& outputs() const;
  const std::string& path() const;
  const TrustInfo& trust() const;
  /// The manifest.json text, exactly as stored (and signed).
  const std::string& manifest_json() const;
  /// Unload the library and weights now (runs in flight finish first); later runs raise ArtifactError.
  void close();

 private:
  std::shared_ptr<SessionImpl> impl_;
};

/// Load and fully check an artifact: limits, signature, manifest, hashes, weights, CPU, then the library.
Session load(const std::string& path, const LoadOptions& options = {});

/// Counters of kiln's kernel thread pool since the process started (Python's threads.stats()):
/// launches (pooled; inline: one thread, nested or pool busy; small: inline because measured small),
/// chunks by who ran them, caller sleeps, workers woken, handoffs, wakes skipped, workers started.
struct PoolStats {
  uint64_t launches, pooled, inline_, small, chunks_caller, chunks_workers, caller_sleeps, wakeups, handoffs,
      wakes_skipped, workers;
};
PoolStats thread_pool_stats();

/// The artifact format versions this runtime reads (signed ones; version 1 only with allow_unsigned).
std::vector<int> format_versions();

}  // namespace kiln
