// kiln's kernel thread pool in C++ (Python's runtime/threads.py): pool.c is threads.C_SOURCE,
// compiled into this library; adopt_thread_pool patches each loaded kernel library's
// __TVMBackendParallelLaunch slot, as threads.adopt does, with the same settings and environment.
#include <dlfcn.h>
#include <sched.h>
#include <tvm/ffi/c_api.h>

#include <cctype>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>

#include "internal.hpp"

extern "C" {
int kiln_parallel_launch(void* f, void* cdata, int num_task);
void kiln_pool_configure(int threads, int chunks, long spin_us, long wait_spin_us, long small_us, long chunk_us,
                         int backoff);
void kiln_pool_set_error_api(void* move, void* set, void* decref);
void kiln_pool_stats(uint64_t* out);
}

namespace kiln {
namespace detail {

namespace {

/// Python's threads.Tuning defaults.
struct Tuning {
  long chunks = 16, chunk_us = 4, small_us = 5, spin_us = 60, wait_spin_us = 30, backoff = 256;
};

std::string strip(const std::string& s) {
  size_t a = s.find_first_not_of(" \t\n\r\f\v");
  return a == std::string::npos ? "" : s.substr(a, s.find_last_not_of(" \t\n\r\f\v") - a + 1);
}

bool all_digits(const std::string& s) {
  if (s.empty()) return false;
  for (char c : s)
    if (!std::isdigit(static_cast<unsigned char>(c))) return false;
  return true;
}

/// KILN_THREAD_POOL_TUNING="spin_us=0,chunks=8": Tuning fields from the environment.
Tuning env_tuning() {
  Tuning t;
  const char* env = std::getenv("KILN_THREAD_POOL_TUNING");
  std::string text = env ? env : "";
  size_t at = 0;
  while (at <= text.size()) {
    size_t next = text.find(',', at);
    if (next == std::string::npos) next = text.size();
    std::string item = strip(text.substr(at, next - at));
    at = next + 1;
    if (item.empty()) continue;
    size_t eq = item.find('=');
    std::string key = strip(item.substr(0, eq)), value = eq == std::string::npos ? "" : strip(item.substr(eq + 1));
    long* field = key == "chunks" ? &t.chunks : key == "chunk_us" ? &t.chunk_us : key == "small_us" ? &t.small_us
                : key == "spin_us" ? &t.spin_us : key == "wait_spin_us" ? &t.wait_spin_us
                : key == "backoff" ? &t.backoff : nullptr;
    if (!field || !all_digits(value))
      throw std::invalid_argument("KILN_THREAD_POOL_TUNING: " + repr_str(item) +
                                  " is not NAME=INT with NAME one of ['backoff', 'chunk_us', 'chunks', 'small_us', "
                                  "'spin_us', 'wait_spin_us']");
    *field = std::stol(value);
  }
  return t;
}

bool enabled() {
  const char* env = std::getenv("KILN_THREAD_POOL");
  std::string v = strip(env ? env : "kiln");
  for (auto& c : v) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return v != "tvm";
}

int threads_from_env() {
  const char* env = std::getenv("TVM_NUM_THREADS");
  std::string v = env ? env : "";
  if (all_digits(v) && std::stol(v) > 0) return static_cast<int>(std::stol(v));
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof set, &set) == 0) return CPU_COUNT(&set);
  return 1;
}

std::mutex pool_lock;
bool pool_ready = false;
Tuning pool_tuning;

}  // namespace

int configure_threads(int threads) {
  if (threads < 0) throw std::invalid_argument("threads must be >= 1, got " + std::to_string(threads));
  if (threads == 0) threads = threads_from_env();
  setenv("TVM_NUM_THREADS", std::to_string(threads).c_str(), 1);
  return threads;
}

bool adopt_thread_pool(const std::string& lib_path) {
  if (!enabled()) return false;
  {
    std::lock_guard<std::mutex> guard(pool_lock);
    if (!pool_ready) {
      kiln_pool_set_error_api(reinterpret_cast<void*>(&TVMFFIErrorMoveFromRaised),
                              reinterpret_cast<void*>(&TVMFFIErrorSetRaised),
                              reinterpret_cast<void*>(&TVMFFIObjectDecRef));
      pool_tuning = env_tuning();
      pool_ready = true;
    }
    const Tuning& t = pool_tuning;
    kiln_pool_configure(threads_from_env(), static_cast<int>(t.chunks), t.spin_us, t.wait_spin_us, t.small_us,
                        t.chunk_us, static_cast<int>(t.backoff));
  }
  void* handle = dlopen(lib_path.c_str(), RTLD_NOLOAD | RTLD_NOW);
  if (!handle) return false;  // not loaded under this path
  bool patched = false;
  if (!dlsym(handle, "__TVMBackendParallelBarrier")) {  // a barrier needs TVM's static pool
    void** slot = static_cast<void**>(dlsym(handle, "__TVMBackendParallelLaunch"));
    if (slot) {
      *slot = reinterpret_cast<void*>(&kiln_parallel_launch);
      patched = true;
    }
  }
  dlclose(handle);  // only drops the reference taken above
  return patched;
}

}  // namespace detail

PoolStats thread_pool_stats() {
  uint64_t v[11];
  kiln_pool_stats(v);
  return PoolStats{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10]};
}

}  // namespace kiln
