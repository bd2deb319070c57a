// The trust decision (Python's runtime/signing.py): which public keys are trusted, and whether an
// artifact's signature.json verifies under one of them. Ed25519 and sha256 are OpenSSL's.
#include <openssl/bio.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <pwd.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <cstdlib>
#include <fstream>
#include <map>
#include <memory>

#include "internal.hpp"

namespace kiln {
namespace detail {

namespace {

constexpr size_t kKeyFileMax = 64 * 1024;
constexpr size_t kRecordMax = 64 * 1024;
const char* kContext = "kiln-artifact-signature-v1\n";
const char* kHowToTrust =
    "pass its public key with --trust KEY.pub (CLI) or trusted_keys=[...] (Python), or list it in "
    "KILN_TRUSTED_KEYS; or load it untrusted with --allow-unsigned (allow_unsigned=True)";

using Pkey = std::unique_ptr<EVP_PKEY, decltype(&EVP_PKEY_free)>;

std::string fingerprint(const std::string& raw) { return sha256_hex(raw.data(), raw.size()).substr(0, 16); }

bool is_file(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

/// A path as Python's pathlib prints it: repeated and trailing slashes and "." parts dropped.
std::string normalize(const std::string& path) {
  std::string out;
  size_t at = 0;
  bool absolute = !path.empty() && path[0] == '/';
  while (at <= path.size()) {
    size_t next = path.find('/', at);
    if (next == std::string::npos) next = path.size();
    std::string part = path.substr(at, next - at);
    if (!part.empty() && part != ".") out += (out.empty() ? "" : "/") + part;
    at = next + 1;
  }
  return absolute ? "/" + out : (out.empty() ? "." : out);
}

std::string home_dir() {
  const char* home = std::getenv("HOME");
  if (home && *home) return home;
  struct passwd* pw = getpwuid(getuid());
  return pw && pw->pw_dir ? pw->pw_dir : "";
}

std::string kiln_home() {
  const char* env = std::getenv("KILN_HOME");
  if (env && *env) {
    std::string p = env;
    if (p == "~" || p.rfind("~/", 0) == 0) p = home_dir() + p.substr(1);
    return normalize(p);
  }
  return normalize(home_dir() + "/.config/kiln");
}

std::string read_key_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw KeyFileError(path + ": cannot read key file (" + std::strerror(errno) + ")");
  std::string data(kKeyFileMax + 1, '\0');
  f.read(&data[0], static_cast<std::streamsize>(data.size()));
  data.resize(static_cast<size_t>(f.gcount()));
  if (data.size() > kKeyFileMax)
    throw KeyFileError(path + ": not a key file (larger than " + std::to_string(kKeyFileMax) + " bytes)");
  return data;
}

std::string raw_public(EVP_PKEY* key) {
  unsigned char raw[32];
  size_t len = sizeof raw;
  if (EVP_PKEY_get_raw_public_key(key, raw, &len) != 1 || len != 32) return "";
  return std::string(reinterpret_cast<char*>(raw), len);
}

/// The 32 raw bytes of the Ed25519 public key in a key file (PEM public or private key, or raw).
std::string load_public_key(const std::string& path) {
  std::string data = read_key_file(path);
  if (data.size() == 32) return data;
  std::unique_ptr<BIO, decltype(&BIO_free)> bio(BIO_new_mem_buf(data.data(), static_cast<int>(data.size())),
                                                &BIO_free);
  bool is_private = data.find("PRIVATE KEY") != std::string::npos;
  Pkey key(is_private ? PEM_read_bio_PrivateKey(bio.get(), nullptr, nullptr, nullptr)
                      : PEM_read_bio_PUBKEY(bio.get(), nullptr, nullptr, nullptr),
           &EVP_PKEY_free);
  if (!key) {
    if (is_private)
      throw KeyFileError(path + ": not an unencrypted PEM private key; make one with kiln keygen");
    throw KeyFileError(path + ": not a PEM public key; kiln keygen writes one as PREFIX.pub");
  }
  if (EVP_PKEY_id(key.get()) != EVP_PKEY_ED25519)
    throw KeyFileError(path + ": a " + OBJ_nid2sn(EVP_PKEY_id(key.get())) +
                       (is_private ? " key, expected an Ed25519 private key (kiln keygen)"
                                   : " key, expected an Ed25519 public key (kiln keygen)"));
  return raw_public(key.get());
}

const std::string* find_key(const TrustedKeys& keys, const std::string& raw) {
  for (const auto& k : keys)
    if (k.first == raw) return &k.second;
  return nullptr;
}

struct Trusted {
  TrustedKeys keys;
  void add(const std::string& raw, const std::string& label) {
    if (!find_key(keys, raw)) keys.emplace_back(raw, label);
  }
};

}  // namespace

TrustedKeys trusted_public_keys(const std::vector<std::string>& given) {
  Trusted out;
  for (const auto& path : given) out.add(load_public_key(path), path);
  const char* env = std::getenv("KILN_TRUSTED_KEYS");
  std::string list = env ? env : "";
  size_t at = 0;
  while (at <= list.size()) {
    size_t next = list.find(':', at);
    if (next == std::string::npos) next = list.size();
    std::string entry = list.substr(at, next - at);
    entry.erase(0, entry.find_first_not_of(" \t\n\r\f\v"));
    entry.erase(entry.find_last_not_of(" \t\n\r\f\v") + 1);
    if (!entry.empty()) {
      try {
        out.add(load_public_key(entry), "KILN_TRUSTED_KEYS: " + entry);
      } catch (const KeyFileError& e) {
        throw KeyFileError(std::string("KILN_TRUSTED_KEYS: ") + e.what());
      }
    }
    at = next + 1;
  }
  std::string home = kiln_home();
  for (const std::string& path : {home + "/signing.key", home + "/signing.pub"}) {
    if (!is_file(path)) continue;
    try {
      out.add(load_public_key(path), "local key " + home + "/signing.pub");
    } catch (const KeyFileError&) {
      continue;  // a damaged local key trusts nothing
    }
  }
  return out.keys;
}

namespace {

bool unhex(const std::string& text, std::string* out) {
  if (text.size() % 2) return false;
  out->clear();
  for (size_t k = 0; k < text.size(); k += 2) {
    int hi = std::isxdigit(static_cast<unsigned char>(text[k])) ? std::stoi(text.substr(k, 1), nullptr, 16) : -1;
    int lo = std::isxdigit(static_cast<unsigned char>(text[k + 1])) ? std::stoi(text.substr(k + 1, 1), nullptr, 16)
                                                                    : -1;
    if (hi < 0 || lo < 0) return false;
    out->push_back(static_cast<char>(hi * 16 + lo));
  }
  return true;
}

std::string field_bytes(const std::string& path, const Json& record, const std::string& field, size_t size) {
  const Json* value = record.get(field);
  std::string raw;
  if (!value || !value->is_str() || !unhex(value->s, &raw)) raw.clear();
  if (raw.size() != size)
    throw TrustError(path + ": signature.json: " + field + " should be " + std::to_string(size) +
                     " bytes as hex, found " + trunc(value ? py_repr(*value) : "None", 100));
  return raw;
}

bool ed25519_verify(const std::string& public_key, const std::string& signature, const std::string& message) {
  Pkey key(EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, nullptr,
                                       reinterpret_cast<const unsigned char*>(public_key.data()), public_key.size()),
           &EVP_PKEY_free);
  if (!key) return false;
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), &EVP_MD_CTX_free);
  if (!ctx || EVP_DigestVerifyInit(ctx.get(), nullptr, nullptr, nullptr, key.get()) != 1) return false;
  return EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(signature.data()), signature.size(),
                          reinterpret_cast<const unsigned char*>(message.data()), message.size()) == 1;
}

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

}  // namespace

TrustInfo verify_record(const std::string& path, const std::string& manifest_bytes, const std::string& record_bytes,
                        const TrustedKeys& trusted, bool allow_unsigned) {
  if (record_bytes.size() > kRecordMax)
    throw ArtifactError(path + ": signature.json is " + std::to_string(record_bytes.size()) +
                        " bytes, more than a signature record can be (" + std::to_string(kRecordMax) + ")");
  Json record;
  std::string error;
  if (!parse_json(record_bytes, &record, &error))
    throw ArtifactError(path + ": signature.json is not valid JSON (JSONDecodeError: " + error + ")");
  const Json* digest_field = record.get("digest");
  if (record.type != Json::Dict || !digest_field || !digest_field->is_str())
    throw ArtifactError(path + ": signature.json should be an object with a \"digest\", found " +
                        trunc(py_repr(record), 200));
  std::string digest = sha256_hex(manifest_bytes.data(), manifest_bytes.size());
  if (lower(digest_field->s) != digest)
    throw ArtifactError(path + ": manifest.json: sha256 " + digest + " does not match the digest in signature.json (" +
                        trunc(digest_field->s, 64) +
                        "): the manifest was modified or damaged after it was written");
  TrustInfo info;
  if (!record.has("signature")) {
    if (allow_unsigned) return info;
    throw TrustError(path +
                     ": the artifact is not signed, and a .kiln holds native code that runs when it is loaded: "
                     "recompile it with kiln compile (which signs with your local key, or --sign KEY), or, if you "
                     "trust where it came from, load it with --allow-unsigned / allow_unsigned=True");
  }
  const Json* algorithm = record.get("algorithm");
  if (!algorithm || !algorithm->is_str() || algorithm->s != "ed25519")
    throw TrustError(path + ": signature.json: unsupported signature algorithm " +
                     trunc(algorithm ? py_repr(*algorithm) : "None", 40) + " (this runtime verifies ed25519)");
  std::string public_key = field_bytes(path, record, "public_key", 32);
  std::string signature = field_bytes(path, record, "signature", 64);
  std::string kid = fingerprint(public_key);
  if (!ed25519_verify(public_key, signature, kContext + digest))
    throw TrustError(path + ": the signature does not verify with the key it names (" + kid +
                     "): the artifact was modified after it was signed, or the signature is forged");
  const Json* key_id = record.get("key_id");
  if (key_id && key_id->type != Json::Null && !(key_id->is_str() && key_id->s == kid))
    throw TrustError(path + ": signature.json: key_id " + trunc(py_repr(*key_id), 40) +
                     " is not the fingerprint of its public key (" + kid + ")");
  const std::string* source = find_key(trusted, public_key);
  if (!source && !allow_unsigned) {
    std::vector<std::string> known;
    for (const auto& k : trusted) known.push_back(fingerprint(k.first) + " (" + k.second + ")");
    std::sort(known.begin(), known.end());
    std::string list;
    for (const auto& k : known) list += (list.empty() ? "" : ", ") + k;
    throw TrustError(path + ": signed by key " + kid + ", which is not trusted here (trusted keys: " +
                     (list.empty() ? "none" : list) + "); if you trust that signer, " + kHowToTrust);
  }
  info.signed_ = true;
  info.key_id = kid;
  info.trusted_by = source ? *source : "";
  return info;
}

}  // namespace detail

std::string TrustInfo::describe() const {
  if (!signed_) return "unsigned (loaded with --allow-unsigned)";
  std::string how = trusted() ? "trusted: " + trusted_by : "NOT trusted, loaded with --allow-unsigned";
  return "ed25519, key " + key_id + " (" + how + ")";
}

}  // namespace kiln
