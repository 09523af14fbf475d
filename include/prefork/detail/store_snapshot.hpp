// The store's snapshot file: its format (magic, version, length-prefixed records, CRC-32) and
// the crash-safe way it reaches the disk (temporary file, fsync, rename, fsync of the
// directory). MemoryStore::save/load build on it; nothing here knows about MemoryStore.
#ifndef PREFORK_DETAIL_STORE_SNAPSHOT_HPP
#define PREFORK_DETAIL_STORE_SNAPSHOT_HPP

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "prefork/detail/store_bytes.hpp"
#include "prefork/detail/syscall.hpp"
#include "prefork/detail/unique_fd.hpp"
#include "prefork/store/error.hpp"

namespace prefork::detail {

// Layout, every integer little-endian:
//   header   "PFSTORE\0" (8 bytes), version u32 = 1
//   record   key length u32, value length u32, expiry u64 (wall-clock ms since the Unix epoch,
//            0 = never), key bytes, value bytes; keys strictly ascending
//   trailer  record count u64, CRC-32 u32 of every byte before it
// The count sits in the trailer so the writer can stream records without a first pass.
inline constexpr std::string_view kSnapshotMagic{"PFSTORE\0", 8};
inline constexpr std::uint32_t kSnapshotVersion = 1;
inline constexpr std::size_t kSnapshotHeaderSize = 8 + 4;
inline constexpr std::size_t kSnapshotRecordHeaderSize = 4 + 4 + 8;
inline constexpr std::size_t kSnapshotTrailerSize = 8 + 4;

// CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320, the zlib/PNG one). One table lookup per
// byte: about 0.5 s for a full 64 MiB store, paid only at shutdown and start.
inline constexpr std::array<std::uint32_t, 256> kCrc32Table = [] {
  std::array<std::uint32_t, 256> t{};
  for (std::uint32_t i = 0; i < 256; ++i) {
    std::uint32_t c = i;
    for (int k = 0; k < 8; ++k) c = (c & 1u) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    t[i] = c;
  }
  return t;
}();

/// Feeds bytes into a running CRC-32; start from 0: crc32(crc32(0, a), b) == crc32(0, a + b).
inline std::uint32_t crc32(std::uint32_t crc, std::string_view bytes) noexcept {
  crc = ~crc;
  for (char ch : bytes) crc = kCrc32Table[(crc ^ static_cast<unsigned char>(ch)) & 0xFFu] ^ (crc >> 8);
  return ~crc;
}

struct SnapshotRecord {
  std::string_view key;
  std::string_view value;
  std::uint64_t expires_ms = 0;  ///< wall-clock ms since the epoch; 0 = never
};

/// What a parsed snapshot may hold; the loading store's limits.
struct SnapshotBounds {
  std::size_t max_key_size;
  std::size_t max_value_size;
  std::size_t max_bytes;       ///< of entry costs: key + value + entry_overhead each
  std::size_t entry_overhead;
};

/// Validates a whole snapshot and returns views of its records into `bytes` (on error, `out` is
/// left empty). Every check runs
/// before the caller changes anything: snapshot_corrupt (bad magic, checksum, structure,
/// unordered or repeated keys), snapshot_version, or key_too_long / value_too_long / full when
/// the records do not fit the bounds. Never reads out of bounds; allocates at most one
/// SnapshotRecord per 16 input bytes.
inline std::error_code parse_snapshot(std::string_view bytes, const SnapshotBounds& bounds,
                                      std::vector<SnapshotRecord>& out) {
  out.clear();
  if (bytes.size() < kSnapshotHeaderSize + kSnapshotTrailerSize ||
      bytes.substr(0, kSnapshotMagic.size()) != kSnapshotMagic)
    return store_errc::snapshot_corrupt;
  StoreReader header(bytes.substr(kSnapshotMagic.size(), 4));
  const auto version = header.get<std::uint32_t>();
  if (version > kSnapshotVersion) return store_errc::snapshot_version;
  if (version != kSnapshotVersion) return store_errc::snapshot_corrupt;

  const std::string_view covered = bytes.substr(0, bytes.size() - 4);
  StoreReader crc_field(bytes.substr(bytes.size() - 4));
  if (crc32(0, covered) != crc_field.get<std::uint32_t>()) return store_errc::snapshot_corrupt;

  StoreReader body(covered.substr(kSnapshotHeaderSize, covered.size() - kSnapshotHeaderSize - 8));
  StoreReader count_field(covered.substr(covered.size() - 8));
  const auto count = count_field.get<std::uint64_t>();
  if (count > body.remaining() / kSnapshotRecordHeaderSize) return store_errc::snapshot_corrupt;
  out.reserve(static_cast<std::size_t>(count));

  std::size_t cost = 0;
  while (body.ok() && body.remaining() > 0) {
    const auto key_size = body.get<std::uint32_t>();
    const auto value_size = body.get<std::uint32_t>();
    SnapshotRecord r;
    r.expires_ms = body.get<std::uint64_t>();
    r.key = body.bytes(key_size);
    r.value = body.bytes(value_size);
    if (!body.ok()) break;
    if ((!out.empty() && !(out.back().key < r.key)) || out.size() == count) {
      out.clear();
      return store_errc::snapshot_corrupt;
    }
    out.push_back(r);
  }
  if (!body.ok() || out.size() != count) {
    out.clear();
    return store_errc::snapshot_corrupt;
  }
  // Limits after the structure: a damaged file is reported as damaged, not as too big.
  for (const SnapshotRecord& r : out) {
    std::error_code ec;
    if (r.key.size() > bounds.max_key_size) ec = store_errc::key_too_long;
    else if (r.value.size() > bounds.max_value_size) ec = store_errc::value_too_long;
    cost += r.key.size() + r.value.size() + bounds.entry_overhead;
    if (!ec && cost > bounds.max_bytes) ec = store_errc::full;
    if (ec) {
      out.clear();
      return ec;
    }
  }
  return {};
}

/// Called after each chunk reaches the temporary file, with the bytes written so far; tests
/// use it to stop a save half-way.
using SnapshotProgress = std::function<void(std::size_t bytes_written)>;

/// Writes a snapshot so that a crash at any point leaves the previous file at `path` whole:
/// the bytes go to "<path>.tmp" (created afresh, mode 0600, close-on-exec), which is fsync'd,
/// renamed over `path`, and the directory fsync'd so the rename itself is durable (rename(2)
/// is atomic but lives in the directory's data; see the ext4 "data=ordered" discussions of
/// 2009 that made this idiom standard). A crash leaves at most a stale "<path>.tmp", which the
/// next save replaces and load never reads.
class SnapshotFileWriter {
 public:
  SnapshotFileWriter(std::string path, SnapshotProgress progress)
      : path_(std::move(path)), temp_(path_ + ".tmp"), progress_(std::move(progress)) {}
  SnapshotFileWriter(const SnapshotFileWriter&) = delete;
  SnapshotFileWriter& operator=(const SnapshotFileWriter&) = delete;
  ~SnapshotFileWriter() {
    if (fd_) {
      fd_.reset();
      ::unlink(temp_.c_str());
    }
  }

  std::error_code open() {
    // Unlink first and create with O_EXCL: a stale file (or a symlink planted in its place)
    // is never written through, and the new file gets mode 0600 whatever the old one had.
    if (::unlink(temp_.c_str()) != 0 && errno != ENOENT) return errno_code();
    fd_.reset(retry_eintr([&] {
      return ::open(temp_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0600);
    }));
    if (!fd_) return errno_code();
    buffer_.reserve(kChunk + kChunk / 4);
    buffer_.append(kSnapshotMagic);
    store_put(buffer_, kSnapshotVersion);
    return {};
  }

  std::error_code add(const SnapshotRecord& r) {
    store_put(buffer_, static_cast<std::uint32_t>(r.key.size()));
    store_put(buffer_, static_cast<std::uint32_t>(r.value.size()));
    store_put(buffer_, r.expires_ms);
    buffer_.append(r.key);
    buffer_.append(r.value);
    ++count_;
    return buffer_.size() >= kChunk ? flush() : std::error_code{};
  }

  std::error_code commit() {
    store_put(buffer_, count_);
    const std::uint32_t crc = crc32(crc_, buffer_);
    store_put(buffer_, crc);
    if (auto ec = flush(/*checksum=*/false)) return ec;
    if (retry_eintr([&] { return ::fsync(fd_.get()); }) != 0) return errno_code();
    // close() reports delayed write errors on some filesystems (NFS); a failure here must not
    // replace a good snapshot with a bad one.
    if (::close(fd_.release()) != 0) return fail_after_close();
    if (::rename(temp_.c_str(), path_.c_str()) != 0) return fail_after_close();
    return sync_directory();
  }

 private:
  static constexpr std::size_t kChunk = 64 * 1024;

  std::error_code flush(bool checksum = true) {
    if (checksum) crc_ = crc32(crc_, buffer_);
    std::string_view rest = buffer_;
    while (!rest.empty()) {
      ssize_t n = retry_eintr([&] { return ::write(fd_.get(), rest.data(), rest.size()); });
      if (n < 0) return errno_code();
      rest.remove_prefix(static_cast<std::size_t>(n));
    }
    written_ += buffer_.size();
    buffer_.clear();
    if (progress_) progress_(written_);
    return {};
  }

  std::error_code fail_after_close() {
    std::error_code ec = errno_code();
    ::unlink(temp_.c_str());
    return ec;
  }

  std::error_code sync_directory() {
    const auto slash = path_.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path_.substr(0, slash);
    UniqueFd d(retry_eintr([&] { return ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC); }));
    if (!d) return errno_code();
    if (retry_eintr([&] { return ::fsync(d.get()); }) != 0) return errno_code();
    return {};
  }

  std::string path_;
  std::string temp_;
  SnapshotProgress progress_;
  UniqueFd fd_;
  std::string buffer_;
  std::uint32_t crc_ = 0;
  std::uint64_t count_ = 0;
  std::size_t written_ = 0;
};

/// Reads a whole regular file of at most max_size bytes. ENOENT (as a system error) when it
/// does not exist, store_errc::full when it is larger than max_size: no snapshot that size can
/// fit the store, so it is refused before anything is allocated for it.
inline std::error_code read_snapshot_file(const std::string& path, std::size_t max_size,
                                          std::string& out) {
  UniqueFd fd(retry_eintr([&] { return ::open(path.c_str(), O_RDONLY | O_CLOEXEC); }));
  if (!fd) return errno_code();
  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) return errno_code();
  if (!S_ISREG(st.st_mode)) return std::make_error_code(std::errc::invalid_argument);
  if (static_cast<std::uint64_t>(st.st_size) > max_size) return store_errc::full;
  out.assign(static_cast<std::size_t>(st.st_size), '\0');
  std::size_t got = 0;
  while (got < out.size()) {
    ssize_t n = retry_eintr([&] { return ::read(fd.get(), out.data() + got, out.size() - got); });
    if (n < 0) return errno_code();
    if (n == 0) break;  // shrank since fstat: the parser reports the truncation
    got += static_cast<std::size_t>(n);
  }
  out.resize(got);
  return {};
}

}  // namespace prefork::detail

#endif  // PREFORK_DETAIL_STORE_SNAPSHOT_HPP
