// libFuzzer target for the IPC wire format: detail::decode_header on the first header, and a
// Channel reading the input as a byte stream from a raw peer (optionally with descriptors
// attached), both checked against an independent reference decoder. A violated invariant aborts,
// which libFuzzer reports as a crash, saving the input. Input layout: tests/fuzz/README.md.
#include "prefork/channel.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <system_error>
#include <utility>
#include <vector>

#include "prefork/error.hpp"
#include "prefork/event_loop.hpp"

namespace {

using prefork::Channel;
using prefork::ChannelLimits;
using prefork::errc;
using prefork::EventLoop;
using prefork::Frame;
using prefork::UniqueFd;

[[noreturn]] void violated(const char* what, int line, const char* detail = "") {
  std::fprintf(stderr, "frame.fuzz:%d: invariant violated: %s %s\n", line, what, detail);
  std::abort();
}
// A macro only for the condition's text and line: std::source_location needs Clang 15.
#define FUZZ_CHECK(cond)                    \
  do {                                      \
    if (!(cond)) violated(#cond, __LINE__); \
  } while (0)

// Inputs above this are ignored (run with -max_len=65536). The writer below never blocks, so
// this bounds the time per input, not a deadlock.
constexpr std::size_t kMaxInput = 64 * 1024;
// Script mode's repeated records stop growing the stream here: beyond the 1 MiB above which the
// Channel gives back its read buffer once a frame is consumed.
constexpr std::size_t kMaxStream = 2 << 20;
// Descriptors one input may attach in script mode: far below RLIMIT_NOFILE (1024 by default),
// so the kernel's in-flight limit (ETOOMANYREFS) is never reached.
constexpr std::size_t kMaxSentFds = 64;
// The full /proc/self/fd count runs every this many inputs, and after every input that sent
// descriptors (the only inputs that make the Channel open descriptors it could leak).
constexpr unsigned kFdCountEvery = 64;

// The limits the mode byte chooses from: the default, and limits small enough that frames over
// them fit in an input, so frame_too_large is reached with the payload actually present.
constexpr std::size_t kLimits[4] = {ChannelLimits{}.max_message_size, 4096, 64, 0};

// ---------------------------------------------------------------------------------------------
// The reference decoder: the header format as documented in channel.hpp, written independently
// of it. Fields little-endian: magic "PF" (u16), kind (u8), descriptor count (u8), payload
// length (u32), tag (u64); validated in wire order.
// ---------------------------------------------------------------------------------------------

std::uint64_t le(std::string_view s, std::size_t at, int bytes) {
  std::uint64_t v = 0;
  for (int i = 0; i < bytes; ++i)
    v |= std::uint64_t{static_cast<unsigned char>(s[at + static_cast<std::size_t>(i)])} << (8 * i);
  return v;
}

struct RefHeader {
  std::uint8_t kind;
  std::uint8_t nfds;
  std::uint32_t length;
  std::uint64_t tag;
};

// Precondition: s.size() >= 16.
std::pair<std::optional<RefHeader>, errc> reference_header(std::string_view s, std::size_t max) {
  RefHeader h{static_cast<std::uint8_t>(le(s, 2, 1)), static_cast<std::uint8_t>(le(s, 3, 1)),
              static_cast<std::uint32_t>(le(s, 4, 4)), le(s, 8, 8)};
  if (le(s, 0, 2) != 0x4650 || h.kind < 1 || h.kind > prefork::kMaxFrameKind)
    return {std::nullopt, errc::malformed_frame};
  if (h.nfds > 16) return {std::nullopt, errc::too_many_fds};
  if (h.length > max) return {std::nullopt, errc::frame_too_large};
  return {h, errc{}};
}

struct RefFrame {
  RefHeader header;
  std::string_view payload;
};

struct RefResult {
  std::vector<RefFrame> frames;
  errc error;  ///< what the Channel reports once the peer has closed after writing everything
};

// `with_fds`: whether a frame announcing descriptors is accepted (script mode, where the peer
// may attach some) or is malformed (a stream that carries none).
RefResult reference_decode(std::string_view s, std::size_t max, bool with_fds) {
  RefResult r;
  std::size_t pos = 0;
  for (;;) {
    const std::size_t left = s.size() - pos;
    if (left == 0) return r.error = errc::channel_closed, r;
    if (left < 16) return r.error = errc::truncated_frame, r;
    auto [h, ec] = reference_header(s.substr(pos), max);
    if (!h) return r.error = ec, r;
    if (left - 16 < h->length) return r.error = errc::truncated_frame, r;
    if (h->nfds > 0 && !with_fds) return r.error = errc::malformed_frame, r;
    r.frames.push_back({*h, s.substr(pos + 16, h->length)});
    pos += 16 + h->length;
  }
}

// ---------------------------------------------------------------------------------------------
// decode_header, directly
// ---------------------------------------------------------------------------------------------

void check_decode_header(std::string_view stream) {
  if (stream.size() < prefork::detail::kHeaderSize) return;
  // An exact-size heap copy: ASan reports a read past the 16 bytes decode_header may look at.
  std::unique_ptr<char[]> exact(new char[prefork::detail::kHeaderSize]);
  std::memcpy(exact.get(), stream.data(), prefork::detail::kHeaderSize);
  for (std::size_t max : {kLimits[0], kLimits[1], kLimits[2], kLimits[3], std::size_t{0xffffffff},
                          std::size_t(-1)}) {
    prefork::detail::FrameHeader h{};
    const std::error_code ec = prefork::detail::decode_header(exact.get(), max, h);
    const auto [want, want_ec] = reference_header(stream, max);
    if (!want) {
      FUZZ_CHECK(ec == want_ec);
      FUZZ_CHECK(ec.category() == prefork::error_category());
      continue;
    }
    FUZZ_CHECK(!ec);
    FUZZ_CHECK(h.kind == want->kind && h.nfds == want->nfds && h.length == want->length &&
               h.tag == want->tag);
    char again[prefork::detail::kHeaderSize];
    prefork::detail::encode_header(again, h);
    FUZZ_CHECK(std::memcmp(again, exact.get(), sizeof again) == 0);
  }
}

// ---------------------------------------------------------------------------------------------
// Descriptors
// ---------------------------------------------------------------------------------------------

std::size_t count_open_fds() {
  std::size_t n = 0;
  DIR* dir = ::opendir("/proc/self/fd");
  if (!dir) violated("opendir /proc/self/fd", __LINE__, std::strerror(errno));
  while (const dirent* e = ::readdir(dir))
    if (e->d_name[0] != '.') ++n;
  ::closedir(dir);
  return n - 1;  // the directory's own descriptor
}

struct FileId {
  dev_t dev;
  ino_t ino;
  bool operator==(const FileId&) const = default;
};

FileId file_id(int fd) {
  struct stat st {};
  if (::fstat(fd, &st) != 0) violated("fstat", __LINE__, std::strerror(errno));
  return {st.st_dev, st.st_ino};
}

// The descriptors script mode attaches: the read ends of distinct pipes, so that every received
// descriptor can be matched to the position it was sent at (by inode).
struct FdPool {
  std::array<UniqueFd, kMaxSentFds> fds;
  std::array<FileId, kMaxSentFds> ids;
  FdPool() {
    for (std::size_t i = 0; i < kMaxSentFds; ++i) {
      int p[2];
      if (::pipe2(p, O_CLOEXEC) != 0) violated("pipe2", __LINE__, std::strerror(errno));
      ::close(p[1]);
      fds[i].reset(p[0]);
      ids[i] = file_id(p[0]);
    }
  }
};

// ---------------------------------------------------------------------------------------------
// The Channel, reading from a raw peer
// ---------------------------------------------------------------------------------------------

struct Run {
  EventLoop& loop;
  const FdPool& pool;
  std::size_t max_message_size;
  std::size_t close_after;  // on_frame closes the Channel after this many frames (0: never)
  std::unique_ptr<Channel> channel;
  UniqueFd peer;
  int channel_fd, peer_fd;  // the pair's descriptor numbers, to check that both were closed
  bool peer_gone = false;   // the Channel closed its end: writes fail with EPIPE
  std::size_t fds_sent = 0;  // pool[0, fds_sent) went out, in this order
  std::size_t fds_delivered = 0;
  struct Got {
    std::uint8_t kind;
    std::uint64_t tag;
    std::string payload;
    std::size_t nfds;
  };
  std::vector<Got> frames;
  std::vector<std::error_code> closes;

  Run(EventLoop& l, const FdPool& p, std::size_t max, std::size_t close_after_frames)
      : loop(l), pool(p), max_message_size(max), close_after(close_after_frames) {
    auto [mine, theirs] = prefork::make_channel_pair();
    ChannelLimits limits;
    limits.max_message_size = max;
    channel = std::make_unique<Channel>(loop, std::move(mine), limits);
    peer = std::move(theirs);
    channel_fd = channel->native_handle();
    peer_fd = peer.get();
    channel->on_frame([this](Frame&& f) { on_frame(std::move(f)); });
    channel->on_close([this](std::error_code ec) { closes.push_back(ec); });
  }

  void on_frame(Frame&& f) {
    const auto kind = static_cast<unsigned>(f.kind);
    FUZZ_CHECK(kind >= 1 && kind <= prefork::kMaxFrameKind);
    FUZZ_CHECK(f.payload.size() <= max_message_size);
    FUZZ_CHECK(f.fds.size() <= prefork::detail::kMaxFdsPerFrame);
    FUZZ_CHECK(closes.empty());  // nothing is delivered after the error
    FUZZ_CHECK(channel->is_open());  // nor after close()
    for (const UniqueFd& fd : f.fds) {
      // Only descriptors that were sent, each once, in the order they were sent.
      FUZZ_CHECK(fds_delivered < fds_sent);
      const int flags = ::fcntl(fd.get(), F_GETFD);
      FUZZ_CHECK(flags >= 0 && (flags & FD_CLOEXEC));  // MSG_CMSG_CLOEXEC
      FUZZ_CHECK(file_id(fd.get()) == pool.ids[fds_delivered]);
      ++fds_delivered;
    }
    frames.push_back({static_cast<std::uint8_t>(kind), f.tag, std::move(f.payload), f.fds.size()});
    // Closing from the callback, with more frames and descriptors perhaps buffered behind this
    // one: allowed (not destroying), and nothing more may be delivered or reported.
    if (frames.size() == close_after) channel->close();
  }  // the frame's descriptors close here

  bool closed_here() const { return close_after > 0 && frames.size() == close_after; }

  // Sends `bytes` with `nfds` pool descriptors on its first byte, running the loop whenever the
  // socket is full so that the Channel drains it.
  void send(std::string_view bytes, std::size_t nfds) {
    nfds = std::min(nfds, kMaxSentFds - fds_sent);
    if (bytes.empty()) return;  // a stream socket sends no descriptors without a byte
    alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * kMaxSentFds)];
    while (!bytes.empty() && !peer_gone) {
      iovec iov{const_cast<char*>(bytes.data()), bytes.size()};
      msghdr msg{};
      msg.msg_iov = &iov;
      msg.msg_iovlen = 1;
      if (nfds > 0) {
        msg.msg_control = control;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        cmsghdr* c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        for (std::size_t i = 0; i < nfds; ++i) {
          const int fd = pool.fds[fds_sent + i].get();
          std::memcpy(CMSG_DATA(c) + i * sizeof(int), &fd, sizeof fd);
        }
      }
      const ssize_t n = ::sendmsg(peer.get(), &msg, MSG_NOSIGNAL | MSG_DONTWAIT);
      if (n > 0) {
        fds_sent += nfds;  // they rode on the first byte that went out
        nfds = 0;
        bytes.remove_prefix(static_cast<std::size_t>(n));
      } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
        FUZZ_CHECK(channel->is_open());  // a closed Channel's socket gives EPIPE, not EAGAIN
        loop.run_once(0);
      } else if (errno == EPIPE || errno == ECONNRESET) {
        FUZZ_CHECK(!channel->is_open());
        peer_gone = true;
      } else if (errno != EINTR) {
        violated("sendmsg", __LINE__, std::strerror(errno));
      }
    }
  }

  void pump() {
    if (channel->is_open()) loop.run_once(0);
  }

  // Closes the peer and runs the loop until the Channel has closed; checks its end state: it
  // reported exactly once, or never if on_frame closed it.
  void finish() {
    peer.reset();
    for (int round = 0; round < 1000 && channel->is_open(); ++round) loop.run_once(100);
    FUZZ_CHECK(!channel->is_open());
    FUZZ_CHECK(channel->native_handle() < 0);
    loop.run_once(0);
    FUZZ_CHECK(closes.size() == (closed_here() ? 0u : 1u));
    if (!closes.empty()) FUZZ_CHECK(closes[0].category() == prefork::error_category());
    FUZZ_CHECK(!loop.alive());
  }
};

bool same_frame(const Run::Got& got, const RefFrame& want) {
  return got.kind == want.header.kind && got.tag == want.header.tag &&
         got.payload == want.payload && got.nfds == want.header.nfds;
}

// on_frame closed the Channel after close_after frames: those are the reference's first ones.
void check_closed_here(const Run& run, std::string_view stream) {
  const RefResult want = reference_decode(stream, run.max_message_size, run.fds_sent > 0);
  FUZZ_CHECK(run.frames.size() <= want.frames.size());
  for (std::size_t i = 0; i < run.frames.size(); ++i)
    FUZZ_CHECK(same_frame(run.frames[i], want.frames[i]));
}

// No descriptor was attached: the Channel must deliver exactly the reference's frames and
// report exactly its error.
void check_exact(const Run& run, std::string_view stream) {
  const RefResult want = reference_decode(stream, run.max_message_size, false);
  FUZZ_CHECK(run.closes[0] == want.error);
  FUZZ_CHECK(run.frames.size() == want.frames.size());
  for (std::size_t i = 0; i < run.frames.size(); ++i)
    FUZZ_CHECK(same_frame(run.frames[i], want.frames[i]));
}

// Descriptors were attached wherever the input said, so the Channel may reject the stream
// early for them (descriptors a frame does not announce, a frame announcing more than arrived,
// more than 16 in one batch); otherwise it behaves as the bytes alone say. So: a prefix of the
// reference's frames, each with the descriptors it announces, and the reference's error only
// when every frame was delivered.
void check_with_fds(const Run& run, std::string_view stream) {
  const RefResult want = reference_decode(stream, run.max_message_size, true);
  FUZZ_CHECK(run.frames.size() <= want.frames.size());
  for (std::size_t i = 0; i < run.frames.size(); ++i)
    FUZZ_CHECK(same_frame(run.frames[i], want.frames[i]));
  const std::error_code ec = run.closes[0];
  const bool descriptor_error = ec == errc::malformed_frame || ec == errc::too_many_fds;
  if (run.frames.size() < want.frames.size())
    FUZZ_CHECK(descriptor_error);
  else
    FUZZ_CHECK(ec == want.error || descriptor_error);
}

struct Record {
  std::string_view bytes;
  std::size_t repeat;  // the bytes are sent this many times over, in one go
  std::size_t nfds;
  bool pump_after;
};

// Script mode: records of [control byte][length: u8, or u16 LE if bit 6][repeat byte if bit 7]
// [bytes]. The control byte's low 5 bits are how many descriptors ride on the record's first
// byte (over 16 is more than the Channel's control buffer takes); bit 5 runs a loop round after
// the record; bit 7 sends the bytes 2^(repeat & 15) times, so that a small input can make a
// stream larger than the Channel's 64 KiB read buffer (compaction, growth, shrinking).
std::vector<Record> parse_script(std::string_view s) {
  std::vector<Record> records;
  auto next_byte = [&]() -> std::size_t {
    if (s.empty()) return 0;
    const auto b = static_cast<unsigned char>(s[0]);
    s.remove_prefix(1);
    return b;
  };
  while (!s.empty()) {
    const std::size_t control = next_byte();
    std::size_t length = next_byte();
    if (control & 0x40) length |= next_byte() << 8;
    const std::size_t repeat = (control & 0x80) ? std::size_t{1} << (next_byte() & 15) : 1;
    length = std::min(length, s.size());
    records.push_back({s.substr(0, length), repeat, control & 0x1f, (control & 0x20) != 0});
    s.remove_prefix(length);
  }
  return records;
}

struct Globals {
  EventLoop loop;  // one for every input, as a process keeps one: descriptor numbers are reused
  FdPool pool;
  std::size_t baseline_fds = count_open_fds();
  unsigned inputs = 0;
  bool trace = std::getenv("PREFORK_FUZZ_TRACE") != nullptr;  // print each input's outcome
  // Kept from input to input: a stream of megabytes then costs no fresh pages (under ASan a
  // large allocation is a new mapping, and page faults were most of the time per input).
  std::string stream, repeated;
};

}  // namespace

// Input: one mode byte, then the stream. Mode bits 0-1: max_message_size (kLimits); bit 7:
// script mode (records with descriptors, parse_script) instead of a plain byte stream. Plain
// stream: bit 2 runs a loop round after every 2^(bits 3-6) bytes written, so that frames and
// headers are split across reads; without it the stream is written at once. Script mode: bits
// 2-6 are the number of frames after which on_frame closes the Channel (0: never).
extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size == 0 || size > kMaxInput) return 0;
  static Globals g;
  const unsigned mode = data[0];
  const std::string_view input(reinterpret_cast<const char*>(data) + 1, size - 1);
  const std::size_t max = kLimits[mode & 3];

  check_decode_header(input);

  // Script mode: bits 2-6 make on_frame close the Channel after that many frames (0: never).
  Run run(g.loop, g.pool, max, (mode & 0x80) ? (mode >> 2) & 31 : 0);
  std::string& stream = g.stream;  // what the peer actually wrote
  stream.clear();
  if (mode & 0x80) {
    std::string& repeated = g.repeated;
    for (const Record& r : parse_script(input)) {
      // Once the Channel has failed, the rest of the stream cannot change what it reported.
      if (run.peer_gone) break;
      std::string_view bytes = r.bytes;
      if (r.repeat > 1 && !bytes.empty()) {
        const std::size_t room = stream.size() < kMaxStream ? kMaxStream - stream.size() : 0;
        const std::size_t times = std::clamp(room / bytes.size(), std::size_t{1}, r.repeat);
        repeated.resize(bytes.size() * times);
        std::memcpy(repeated.data(), bytes.data(), bytes.size());
        for (std::size_t done = bytes.size(); done < repeated.size(); done *= 2) {
          const std::size_t n = std::min(done, repeated.size() - done);
          std::memcpy(repeated.data() + done, repeated.data(), n);
        }
        bytes = repeated;
      }
      stream.append(bytes);
      run.send(bytes, r.nfds);
      if (r.pump_after) run.pump();
    }
    // A peer attaching descriptors that no frame announces cannot make the Channel hoard them:
    // at rest it holds at most one frame's worth (it closed the pair's own end if it failed;
    // delivered descriptors are closed in on_frame).
    const std::size_t most = g.baseline_fds + 2 + prefork::detail::kMaxFdsPerFrame;
    if (run.fds_sent > 0 && count_open_fds() > most)
      violated("the Channel holds at most 16 undelivered descriptors", __LINE__);
  } else {
    stream.assign(input);
    const std::size_t chunk = (mode & 4) ? std::size_t{1} << ((mode >> 3) & 15) : input.size();
    for (std::size_t at = 0; at < input.size() && !run.peer_gone; at += chunk) {
      run.send(input.substr(at, chunk), 0);
      if (mode & 4) run.pump();
    }
  }
  run.finish();
  if (g.trace) {
    std::fprintf(stderr, "frame.fuzz: %s, limit %zu, %zu bytes, %zu descriptors: %zu frames (",
                 (mode & 0x80) ? "script" : "plain", max, stream.size(), run.fds_sent,
                 run.frames.size());
    for (std::size_t i = 0; i < run.frames.size() && i < 16; ++i)
      std::fprintf(stderr, " %u:%zu+%zufd", run.frames[i].kind, run.frames[i].payload.size(),
                   run.frames[i].nfds);
    std::fprintf(stderr, "%s ), %s\n", run.frames.size() > 16 ? " ..." : "",
                 run.closes.empty() ? "closed by on_frame" : run.closes[0].message().c_str());
  }
  if (run.closed_here())
    check_closed_here(run, stream);
  else if (run.fds_sent == 0)
    check_exact(run, stream);
  else
    check_with_fds(run, stream);

  // Descriptors: both ends of the pair are closed, and so is every descriptor that arrived for a
  // frame that was never delivered, as soon as the Channel failed (it still exists here). The
  // peer's number may have been reused by a received descriptor, so a leak of one of those can
  // also show up as the first check.
  for (int fd : {run.channel_fd, run.peer_fd})
    FUZZ_CHECK(::fcntl(fd, F_GETFD) == -1 && errno == EBADF);
  if (run.fds_sent > 0 || ++g.inputs % kFdCountEvery == 0) {
    const std::size_t now = count_open_fds();
    if (now != g.baseline_fds) {
      char detail[96];
      std::snprintf(detail, sizeof detail, "(%zu open, %zu before)", now, g.baseline_fds);
      violated("no descriptor leaked", __LINE__, detail);
    }
  }
  return 0;
}
