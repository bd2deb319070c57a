// A small, strict zip reader: the central directory, local headers and inflate (zlib), each
// check worded as Python's zipfile words it, so both runtimes refuse a bad file the same way.
#include <zlib.h>

#include <algorithm>
#include <cstring>

#include "internal.hpp"

namespace kiln {
namespace detail {

namespace {

constexpr uint32_t kEndSig = 0x06054b50, kEnd64Sig = 0x06064b50, kLoc64Sig = 0x07064b50;
constexpr uint32_t kCentralSig = 0x02014b50, kLocalSig = 0x04034b50;
constexpr size_t kEndSize = 22, kEnd64Size = 56, kLoc64Size = 20, kCentralSize = 46, kLocalSize = 30;

uint16_t u16(const std::string& b, size_t at) {
  return static_cast<uint16_t>(static_cast<unsigned char>(b[at]) | static_cast<unsigned char>(b[at + 1]) << 8);
}
uint32_t u32(const std::string& b, size_t at) { return u16(b, at) | static_cast<uint32_t>(u16(b, at + 2)) << 16; }
uint64_t u64(const std::string& b, size_t at) { return u32(b, at) | static_cast<uint64_t>(u32(b, at + 4)) << 32; }

[[noreturn]] void bad(const std::string& message) { throw ZipProblem{"BadZipFile", message}; }

struct End {
  uint64_t location = 0;  // offset of the end record (of the zip64 one's locator when present)
  uint64_t cd_size = 0;
  uint64_t cd_offset = 0;
  bool zip64 = false;
};

/// The end-of-central-directory record, found as zipfile._EndRecData does.
End end_record(const ZipSource& src) {
  uint64_t size = src.size();
  if (size < kEndSize) bad("File is not a zip file");
  End end;
  std::string tail = src.read(size - kEndSize, kEndSize);
  size_t found = std::string::npos;
  std::string window;
  uint64_t window_start = 0;
  if (u32(tail, 0) == kEndSig && tail[20] == 0 && tail[21] == 0) {
    window = tail, window_start = size - kEndSize, found = 0;
  } else {
    uint64_t span = std::min<uint64_t>(size, (1 << 16) + kEndSize);
    window_start = size - span;
    window = src.read(window_start, span);
    const char sig[4] = {'P', 'K', 5, 6};
    size_t at = window.rfind(std::string(sig, 4));
    if (at == std::string::npos || at + kEndSize > window.size()) bad("File is not a zip file");
    found = at;
  }
  std::string rec = window.substr(found, kEndSize);
  end.location = window_start + found;
  end.cd_size = u32(rec, 12);
  end.cd_offset = u32(rec, 16);
  if (end.location >= kLoc64Size) {
    std::string loc = src.read(end.location - kLoc64Size, kLoc64Size);
    if (loc.size() == kLoc64Size && u32(loc, 0) == kLoc64Sig) {
      if (u32(loc, 4) != 0 || u32(loc, 16) > 1) bad("zipfiles that span multiple disks are not supported");
      if (end.location < kLoc64Size + kEnd64Size) bad("Corrupt zip64 end of central directory locator");
      std::string e64 = src.read(end.location - kLoc64Size - kEnd64Size, kEnd64Size);
      if (e64.size() != kEnd64Size || u32(e64, 0) != kEnd64Sig)
        bad("Zip64 end of central directory record not found");
      end.cd_size = u64(e64, 40);
      end.cd_offset = u64(e64, 48);
      end.location -= kLoc64Size + kEnd64Size;
      end.zip64 = true;
    }
  }
  return end;
}

/// Zip64 sizes and offset from an entry's extra field (zipfile's _decodeExtra).
void decode_extra(const std::string& extra, ZipEntry* e) {
  size_t at = 0;
  while (at + 4 <= extra.size()) {
    uint16_t tp = u16(extra, at), ln = u16(extra, at + 2);
    if (at + 4 + ln > extra.size()) {
      char buf[80];
      std::snprintf(buf, sizeof buf, "Corrupt extra field %04x (size=%d)", tp, ln);
      bad(buf);
    }
    if (tp == 0x0001) {
      size_t field = at + 4, stop = at + 4 + ln;
      auto next = [&](const char* what) {
        if (field + 8 > stop) bad(std::string("Corrupt zip64 extra field. ") + what + " not found.");
        uint64_t v = u64(extra, field);
        field += 8;
        return v;
      };
      if (e->file_size == 0xFFFFFFFFu) e->file_size = next("File size");
      if (e->compress_size == 0xFFFFFFFFu) e->compress_size = next("Compress size");
      if (e->header_offset == 0xFFFFFFFFu) e->header_offset = next("Header offset");
    }
    at += 4 + ln;
  }
}

}  // namespace

std::vector<ZipEntry> zip_directory(const ZipSource& src) {
  End end = end_record(src);
  if (end.location < end.cd_size + end.cd_offset) bad("Bad offset for central directory");
  uint64_t concat = end.location - end.cd_size - end.cd_offset;
  std::string cd = src.read(end.cd_offset + concat, static_cast<size_t>(std::min<uint64_t>(end.cd_size, src.size())));
  std::vector<ZipEntry> out;
  size_t at = 0;
  while (at < end.cd_size) {
    if (at + kCentralSize > cd.size()) bad("Truncated central directory");
    if (u32(cd, at) != kCentralSig) bad("Bad magic number for central directory");
    ZipEntry e;
    e.flags = u16(cd, at + 8);
    e.method = u16(cd, at + 10);
    e.crc = u32(cd, at + 16);
    e.compress_size = u32(cd, at + 20);
    e.file_size = u32(cd, at + 24);
    size_t n = u16(cd, at + 28), m = u16(cd, at + 30), k = u16(cd, at + 32);
    e.header_offset = u32(cd, at + 42);
    if (u16(cd, at + 6) / 10 > 6 || (u16(cd, at + 6) / 10 == 6 && u16(cd, at + 6) % 10 > 3)) {
      char buf[64];
      std::snprintf(buf, sizeof buf, "zip file version %.1f", u16(cd, at + 6) / 10.0);
      throw ZipProblem{"NotImplementedError", buf};
    }
    size_t name_at = at + kCentralSize;
    if (name_at + n + m + k > cd.size()) bad("Truncated central directory");
    e.name = cd.substr(name_at, n);
    decode_extra(cd.substr(name_at + n, m), &e);
    e.header_offset += concat;
    out.push_back(std::move(e));
    at = name_at + n + m + k;
  }
  return out;
}

uint64_t zip_data_offset(const ZipSource& src, const ZipEntry& e) {
  std::string h = src.read(e.header_offset, kLocalSize);
  if (h.size() != kLocalSize) bad("Truncated file header");
  if (u32(h, 0) != kLocalSig) bad("Bad magic number for file header");
  size_t n = u16(h, 26), m = u16(h, 28);
  std::string name = src.read(e.header_offset + kLocalSize, n);
  if (e.flags & 0x20) throw ZipProblem{"NotImplementedError", "compressed patched data (flag bit 5)"};
  if (e.flags & 0x40) throw ZipProblem{"NotImplementedError", "strong encryption (flag bit 6)"};
  if (name != e.name)
    bad("File name in directory " + repr_str(e.name) + " and header " + repr_bytes(name) + " differ.");
  return e.header_offset + kLocalSize + n + m;
}

uint32_t crc32_of(const void* data, size_t n) {
  uLong crc = crc32(0L, Z_NULL, 0);
  const Bytef* p = static_cast<const Bytef*>(data);
  while (n > 0) {
    uInt chunk = static_cast<uInt>(std::min<size_t>(n, 1u << 30));
    crc = crc32(crc, p, chunk);
    p += chunk, n -= chunk;
  }
  return static_cast<uint32_t>(crc);
}

namespace {

std::string zlib_message(int err, const z_stream& zs) {
  const char* msg = zs.msg;
  if (msg == nullptr) {
    msg = err == Z_BUF_ERROR ? "incomplete or truncated stream"
          : err == Z_STREAM_ERROR ? "inconsistent stream state"
          : err == Z_DATA_ERROR ? "invalid input data"
                                : "library error";
  }
  return "Error " + std::to_string(err) + " while decompressing data: " + trunc(msg, 200);
}

struct Inflater {
  z_stream zs{};
  bool ok = false;
  Inflater() { ok = inflateInit2(&zs, -MAX_WBITS) == Z_OK; }
  ~Inflater() {
    if (ok) inflateEnd(&zs);
  }
};

}  // namespace

std::string zip_inflate(const std::string& path, const ZipSource& src, const ZipEntry& e) {
  const uint64_t want = e.file_size;
  auto corrupted = [&](const std::string& why) {
    return ArtifactError(path + ": member " + e.name + " is corrupted (" + why + ")");
  };
  uint64_t start;
  try {
    start = zip_data_offset(src, e);
  } catch (const ZipProblem& p) {
    throw corrupted(p.message);
  }
  std::string out;
  bool stream_end = true;
  if (e.method == 0) {
    out = src.read(start, static_cast<size_t>(std::min<uint64_t>(e.compress_size, want + 1)));
    if (out.size() < std::min<uint64_t>(e.compress_size, want + 1)) throw corrupted("");  // EOFError
  } else {
    Inflater inf;
    if (!inf.ok) throw corrupted("zlib could not start");
    out.resize(static_cast<size_t>(want) + 1);
    uint64_t left = e.compress_size, pos = start, got = 0;
    int rc = Z_OK;
    std::string chunk;
    stream_end = false;
    while (!stream_end) {
      if (inf.zs.avail_in == 0) {
        if (left == 0) break;
        chunk = src.read(pos, static_cast<size_t>(std::min<uint64_t>(left, 1 << 20)));
        if (chunk.empty()) throw corrupted("");  // EOFError: the file ends inside the member
        pos += chunk.size(), left -= chunk.size();
        inf.zs.next_in = reinterpret_cast<Bytef*>(chunk.data());
        inf.zs.avail_in = static_cast<uInt>(chunk.size());
      }
      uint64_t room = want + 1 - got;
      inf.zs.next_out = reinterpret_cast<Bytef*>(&out[static_cast<size_t>(got)]);
      inf.zs.avail_out = static_cast<uInt>(std::min<uint64_t>(room, 1u << 30));
      uInt before = inf.zs.avail_out;
      rc = inflate(&inf.zs, Z_NO_FLUSH);
      got += before - inf.zs.avail_out;
      if (got > want)
        throw ArtifactError(path + ": member " + e.name + " inflates past the " + commas(static_cast<int64_t>(want)) +
                            " bytes its zip directory entry gives");
      if (rc == Z_STREAM_END) stream_end = true;
      else if (rc == Z_BUF_ERROR && inf.zs.avail_in == 0 && left == 0) break;
      else if (rc != Z_OK && rc != Z_BUF_ERROR) throw corrupted(zlib_message(rc, inf.zs));
    }
    out.resize(static_cast<size_t>(got));
  }
  if (out.size() > want)
    throw ArtifactError(path + ": member " + e.name + " inflates past the " + commas(static_cast<int64_t>(want)) +
                        " bytes its zip directory entry gives");
  if (crc32_of(out.data(), out.size()) != e.crc) throw corrupted("Bad CRC-32 for file " + repr_str(e.name));
  if (!stream_end)
    throw ArtifactError(path + ": member " + e.name +
                        " is corrupted: its deflate stream does not end where the member does");
  if (out.size() != want)
    throw ArtifactError(path + ": member " + e.name + " is corrupted: it holds " +
                        commas(static_cast<int64_t>(out.size())) + " bytes, its zip directory entry says " +
                        commas(static_cast<int64_t>(want)));
  return out;
}

}  // namespace detail
}  // namespace kiln
