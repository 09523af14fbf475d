#include "prefork/channel.hpp"

#include <catch2/catch.hpp>

#include "support/descriptors.hpp"
#include "support/heap.hpp"
#include "support/loop.hpp"

#include <fcntl.h>
#include <malloc.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <exception>
#include <filesystem>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "prefork/error.hpp"
#include "prefork/event_loop.hpp"

using namespace std::chrono_literals;
using prefork::Channel;
using prefork::ChannelLimits;
using prefork::Clock;
using prefork::errc;
using prefork::EventLoop;
using prefork::Frame;
using prefork::FrameKind;
using prefork::UniqueFd;

using prefork_test::count_open_fds;
using prefork_test::FdLeakCheck;
using prefork_test::heap_in_use;

using prefork_test::run_until;

namespace {

// ------------------------------------------------------------------------------------------
// Helpers
// ------------------------------------------------------------------------------------------



// Deterministic payload bytes: a frame that arrives shifted, truncated or mixed with another
// does not compare equal.
std::string pattern(std::size_t n, unsigned seed) {
  std::string s(n, '\0');
  for (std::size_t i = 0; i < n; ++i)
    s[i] = static_cast<char>((i * 131 + seed * 7 + (i >> 8)) & 0xff);
  return s;
}

// The documented wire header, written here independently of the library's encoder:
// magic "PF" (u16 LE), kind (u8), descriptor count (u8), payload length (u32 LE), tag (u64 LE).
std::string wire_header(std::uint8_t kind, std::uint8_t nfds, std::uint32_t length,
                        std::uint64_t tag = 0, std::uint16_t magic = 0x4650) {
  std::string h(16, '\0');
  auto put = [&](std::size_t at, std::uint64_t v, int bytes) {
    for (int i = 0; i < bytes; ++i) h[at + i] = static_cast<char>((v >> (8 * i)) & 0xff);
  };
  put(0, magic, 2);
  put(2, kind, 1);
  put(3, nfds, 1);
  put(4, length, 4);
  put(8, tag, 8);
  return h;
}

std::string wire_frame(std::string_view payload, std::uint64_t tag = 0,
                       std::uint8_t kind = static_cast<std::uint8_t>(FrameKind::user)) {
  return wire_header(kind, 0, static_cast<std::uint32_t>(payload.size()), tag) +
         std::string(payload);
}

struct Pipe {
  UniqueFd read_end, write_end;
};

Pipe make_pipe(int flags = O_CLOEXEC) {
  int p[2];
  REQUIRE(::pipe2(p, flags) == 0);
  return {UniqueFd(p[0]), UniqueFd(p[1])};
}

// Reads a blocking descriptor up to EOF.
std::string read_to_eof(int fd) {
  std::string out;
  char buf[4096];
  for (;;) {
    ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0 && errno == EINTR) continue;
    REQUIRE(n >= 0);
    if (n == 0) return out;
    out.append(buf, static_cast<std::size_t>(n));
  }
}

// Whether some process still holds the read end of the pipe whose write end this is: poll(2)
// reports POLLERR on a pipe's write end once no reader is left.
bool pipe_has_reader(int write_end) {
  pollfd p{write_end, POLLOUT, 0};
  REQUIRE(::poll(&p, 1, 0) >= 0);
  return (p.revents & POLLERR) == 0;
}

bool has_cloexec(int fd) {
  int flags = ::fcntl(fd, F_GETFD);
  REQUIRE(flags >= 0);
  return (flags & FD_CLOEXEC) != 0;
}

// Writes all of `bytes` to a non-blocking socket that has room for them.
void write_raw(int fd, std::string_view bytes) {
  while (!bytes.empty()) {
    ssize_t n = ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
    REQUIRE(n > 0);
    bytes.remove_prefix(static_cast<std::size_t>(n));
  }
}

// One sendmsg() carrying `bytes` with `fds` attached as SCM_RIGHTS.
void sendmsg_raw(int sock, std::string_view bytes, const std::vector<int>& fds) {
  REQUIRE(fds.size() <= 64);
  iovec iov{const_cast<char*>(bytes.data()), bytes.size()};
  msghdr msg{};
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int) * 64)] = {};
  if (!fds.empty()) {
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE(sizeof(int) * fds.size());
    cmsghdr* c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int) * fds.size());
    std::memcpy(CMSG_DATA(c), fds.data(), sizeof(int) * fds.size());
  }
  REQUIRE(::sendmsg(sock, &msg, MSG_NOSIGNAL) == static_cast<ssize_t>(bytes.size()));
}

// Two Channels on one EventLoop, connected by make_channel_pair(). `a` sends, `b` records.
struct ChannelPair {
  EventLoop loop;  // first: destroyed after the channels
  std::unique_ptr<Channel> a, b;
  std::vector<Frame> got;  // frames b received
  std::vector<std::error_code> a_closed, b_closed;

  explicit ChannelPair(ChannelLimits limits = {}) {
    auto [x, y] = prefork::make_channel_pair();
    a = std::make_unique<Channel>(loop, std::move(x), limits);
    b = std::make_unique<Channel>(loop, std::move(y), limits);
    a->on_close([this](std::error_code ec) { a_closed.push_back(ec); });
    b->on_close([this](std::error_code ec) { b_closed.push_back(ec); });
    b->on_frame([this](Frame&& f) { got.push_back(std::move(f)); });
  }
  bool run_until_received(std::size_t n) {
    return run_until(loop, [&] { return got.size() >= n || !b_closed.empty(); });
  }
};

// A Channel whose peer is a raw socket the test reads and writes byte by byte.
struct RawPeer {
  EventLoop loop;
  std::unique_ptr<Channel> ch;
  UniqueFd raw;
  std::vector<Frame> frames;
  std::vector<std::error_code> closes;

  explicit RawPeer(ChannelLimits limits = {}) {
    auto [mine, theirs] = prefork::make_channel_pair();
    ch = std::make_unique<Channel>(loop, std::move(mine), limits);
    raw = std::move(theirs);
    ch->on_frame([this](Frame&& f) { frames.push_back(std::move(f)); });
    ch->on_close([this](std::error_code ec) { closes.push_back(ec); });
  }
  void write(std::string_view bytes) { write_raw(raw.get(), bytes); }
  bool run_until_closed(std::chrono::milliseconds limit = 20s) {
    return run_until(loop, [&] { return !closes.empty(); }, limit);
  }
  // Appends whatever the channel has sent so far.
  void read_available(std::string& out) {
    char buf[64 * 1024];
    for (;;) {
      ssize_t n = ::recv(raw.get(), buf, sizeof buf, MSG_DONTWAIT);
      if (n <= 0) return;
      out.append(buf, static_cast<std::size_t>(n));
    }
  }
  // A few more rounds, to show that nothing else arrives after an error.
  void settle() {
    for (int i = 0; i < 3; ++i) loop.run_once(0);
  }
};

// The checks every malformed-input case shares: the frame before the bad one was delivered,
// the error reported once, the channel is closed, and nothing after the error arrives.
void check_failed_with(RawPeer& p, errc expected) {
  REQUIRE(p.run_until_closed());
  p.settle();
  REQUIRE(p.closes.size() == 1);
  CHECK(p.closes[0] == expected);
  CHECK(p.closes[0].category() == prefork::error_category());
  CHECK_FALSE(p.ch->is_open());
  REQUIRE(p.frames.size() == 1);
  CHECK(p.frames[0].payload == "before");
  CHECK(p.ch->send(FrameKind::user, "x") == errc::channel_closed);
}

std::uint64_t le(std::string_view s, std::size_t at, int bytes) {
  std::uint64_t v = 0;
  for (int i = 0; i < bytes; ++i)
    v |= std::uint64_t{static_cast<unsigned char>(s[at + i])} << (8 * i);
  return v;
}

}  // namespace

// ------------------------------------------------------------------------------------------
// Round trips
// ------------------------------------------------------------------------------------------

TEST_CASE("The wire header is the documented little-endian PF layout", "[channel]") {
  char h[prefork::detail::kHeaderSize];
  prefork::detail::encode_header(h, {5, 3, 0x01020304u, 0x1122334455667788ull});
  CHECK(std::string(h, sizeof h) == wire_header(5, 3, 0x01020304u, 0x1122334455667788ull));
  CHECK(h[0] == 'P');
  CHECK(h[1] == 'F');
}

TEST_CASE("Frames of every size class arrive intact and in order", "[channel]") {
  FdLeakCheck leaks;
  ChannelPair p;
  const std::size_t sizes[] = {0, 1, 64 * 1024, 1024 * 1024};
  for (unsigned i = 0; i < 4; ++i)
    REQUIRE_FALSE(p.a->send(FrameKind::user, pattern(sizes[i], i), 100 + i));
  REQUIRE(p.run_until_received(4));
  REQUIRE(p.got.size() == 4);
  for (unsigned i = 0; i < 4; ++i) {
    INFO("frame " << i << " of " << sizes[i] << " bytes");
    CHECK(p.got[i].kind == FrameKind::user);
    CHECK(p.got[i].tag == 100 + i);
    CHECK(p.got[i].payload.size() == sizes[i]);
    CHECK((p.got[i].payload == pattern(sizes[i], i)));
    CHECK(p.got[i].fds.empty());
  }

  // One 64 MiB frame: the default queue (64 MiB) takes it because it is empty.
  REQUIRE(run_until(p.loop, [&] { return p.a->queued_bytes() == 0; }));
  const std::size_t big = std::size_t{64} << 20;
  REQUIRE_FALSE(p.a->send(FrameKind::user, pattern(big, 9), 9));
  REQUIRE(p.run_until_received(5));
  REQUIRE(p.got.size() == 5);
  CHECK(p.got[4].tag == 9);
  CHECK(p.got[4].payload.size() == big);
  CHECK((p.got[4].payload == pattern(big, 9)));
  CHECK(p.a_closed.empty());
  CHECK(p.b_closed.empty());
}

TEST_CASE("A burst of 100000 small frames arrives complete and in order", "[channel]") {
  FdLeakCheck leaks;
  ChannelPair p;
  constexpr std::size_t count = 100000;
  for (std::size_t i = 0; i < count; ++i)
    REQUIRE_FALSE(p.a->send(FrameKind::user, "frame " + std::to_string(i), i));
  REQUIRE(p.run_until_received(count));
  REQUIRE(p.got.size() == count);
  std::size_t out_of_order = 0;
  for (std::size_t i = 0; i < count; ++i)
    if (p.got[i].tag != i || p.got[i].payload != "frame " + std::to_string(i)) ++out_of_order;
  CHECK(out_of_order == 0);
  CHECK(p.b_closed.empty());
}

TEST_CASE("The kind and the tag of a frame arrive with it", "[channel]") {
  FdLeakCheck leaks;
  ChannelPair p;
  const std::uint64_t tags[] = {0, 1, 0x0123456789abcdefull, ~std::uint64_t{0}};
  std::vector<std::pair<FrameKind, std::uint64_t>> sent;
  for (std::uint8_t k = 1; k <= prefork::kMaxFrameKind; ++k)
    for (std::uint64_t tag : tags) {
      sent.emplace_back(static_cast<FrameKind>(k), tag);
      REQUIRE_FALSE(p.a->send(static_cast<FrameKind>(k), "kind " + std::to_string(k), tag));
    }
  REQUIRE(p.run_until_received(sent.size()));
  REQUIRE(p.got.size() == sent.size());
  for (std::size_t i = 0; i < sent.size(); ++i) {
    INFO("frame " << i);
    CHECK(p.got[i].kind == sent[i].first);
    CHECK(p.got[i].tag == sent[i].second);
    CHECK(p.got[i].payload == "kind " + std::to_string(static_cast<int>(sent[i].first)));
  }
}

TEST_CASE("A frame of exactly max_message_size is sent and delivered", "[channel]") {
  FdLeakCheck leaks;
  ChannelLimits limits;
  limits.max_message_size = 1000;
  ChannelPair p(limits);
  REQUIRE_FALSE(p.a->send(FrameKind::user, pattern(1000, 1)));
  REQUIRE(p.run_until_received(1));
  CHECK((p.got[0].payload == pattern(1000, 1)));
  CHECK(p.b_closed.empty());
}

TEST_CASE("read_all_pending delivers what the peer sent without running the loop",
          "[channel]") {
  FdLeakCheck leaks;
  ChannelPair p;
  for (int i = 0; i < 3; ++i) REQUIRE_FALSE(p.a->send(FrameKind::stats, std::to_string(i)));
  REQUIRE(p.a->queued_bytes() == 0);  // small frames go straight into the socket
  p.b->read_all_pending();
  REQUIRE(p.got.size() == 3);
  CHECK(p.got[2].payload == "2");
  CHECK(p.b->is_open());
}

TEST_CASE("A channel keeps the loop alive only when asked to", "[channel]") {
  FdLeakCheck leaks;
  EventLoop loop;
  auto [x, y] = prefork::make_channel_pair();
  {
    Channel quiet(loop, std::move(x));
    CHECK_FALSE(loop.alive());
    Channel keeping(loop, std::move(y), {}, true);
    CHECK(loop.alive());
  }
  CHECK_FALSE(loop.alive());
}

// ------------------------------------------------------------------------------------------
// Descriptor passing
// ------------------------------------------------------------------------------------------

TEST_CASE("A descriptor sent with a frame arrives and reads from the same pipe", "[channel]") {
  FdLeakCheck leaks;
  ChannelPair p;
  Pipe pipe = make_pipe();
  std::vector<UniqueFd> fds;
  fds.push_back(std::move(pipe.read_end));
  REQUIRE_FALSE(p.a->send(FrameKind::connection, "with a pipe", 7, std::move(fds)));
  REQUIRE(p.run_until_received(1));
  REQUIRE(p.got[0].fds.size() == 1);
  CHECK(p.got[0].payload == "with a pipe");
  CHECK(p.got[0].tag == 7);

  const std::string text = "written after the descriptor was sent";
  REQUIRE(::write(pipe.write_end.get(), text.data(), text.size()) ==
          static_cast<ssize_t>(text.size()));
  pipe.write_end.reset();
  CHECK(read_to_eof(p.got[0].fds[0].get()) == text);
}

TEST_CASE("A received descriptor is close-on-exec even when the sent one was not",
          "[channel]") {
  FdLeakCheck leaks;
  ChannelPair p;
  Pipe pipe = make_pipe(0);  // no O_CLOEXEC on the sender's side
  REQUIRE_FALSE(has_cloexec(pipe.read_end.get()));
  std::vector<UniqueFd> fds;
  fds.push_back(std::move(pipe.read_end));
  REQUIRE_FALSE(p.a->send(FrameKind::handles, "", 0, std::move(fds)));
  REQUIRE(p.run_until_received(1));
  REQUIRE(p.got[0].fds.size() == 1);
  CHECK(has_cloexec(p.got[0].fds[0].get()));  // MSG_CMSG_CLOEXEC
}

TEST_CASE("The sender closes its copy of a descriptor once the frame is sent", "[channel]") {
  FdLeakCheck leaks;
  ChannelPair p;
  Pipe pipe = make_pipe();
  std::vector<UniqueFd> fds;
  fds.push_back(std::move(pipe.read_end));
  REQUIRE_FALSE(p.a->send(FrameKind::connection, "x", 0, std::move(fds)));
  REQUIRE(p.run_until_received(1));
  REQUIRE(p.got[0].fds.size() == 1);
  CHECK(pipe_has_reader(pipe.write_end.get()));
  p.got.clear();  // the receiver's copy, the only one left
  CHECK_FALSE(pipe_has_reader(pipe.write_end.get()));
}

TEST_CASE("Frames with descriptors interleaved with frames without keep each descriptor with its frame",
          "[channel]") {
  FdLeakCheck leaks;
  ChannelPair p;
  // Descriptor counts per frame, with large payloads on some descriptor frames so that they
  // are split over several writes and reads.
  const std::size_t nfds[] = {0, 1, 0, 0, 2, 0, 3, 1, 0, 16, 0, 1, 1, 0};
  const std::size_t sizes[] = {10, 300000, 0, 5, 70000, 1, 0, 3, 200000, 16, 8, 0, 100000, 2};
  constexpr std::size_t count = sizeof nfds / sizeof nfds[0];
  for (std::size_t i = 0; i < count; ++i) {
    std::vector<UniqueFd> fds;
    for (std::size_t j = 0; j < nfds[i]; ++j) {
      Pipe pipe = make_pipe(0);
      const std::string text = "frame " + std::to_string(i) + " fd " + std::to_string(j);
      REQUIRE(::write(pipe.write_end.get(), text.data(), text.size()) ==
              static_cast<ssize_t>(text.size()));
      fds.push_back(std::move(pipe.read_end));
    }
    REQUIRE_FALSE(p.a->send(FrameKind::user, pattern(sizes[i], unsigned(i)), i, std::move(fds)));
  }
  REQUIRE(p.run_until_received(count));
  REQUIRE(p.got.size() == count);
  for (std::size_t i = 0; i < count; ++i) {
    INFO("frame " << i);
    CHECK(p.got[i].tag == i);
    CHECK((p.got[i].payload == pattern(sizes[i], unsigned(i))));
    REQUIRE(p.got[i].fds.size() == nfds[i]);
    for (std::size_t j = 0; j < nfds[i]; ++j) {
      CHECK(has_cloexec(p.got[i].fds[j].get()));
      CHECK(read_to_eof(p.got[i].fds[j].get()) ==
            "frame " + std::to_string(i) + " fd " + std::to_string(j));
    }
  }
  CHECK(p.b_closed.empty());
}

TEST_CASE("Descriptors of frames still queued are closed when the channel is destroyed",
          "[channel]") {
  FdLeakCheck leaks;
  RawPeer p;  // the raw peer never reads
  Pipe pipe = make_pipe();
  REQUIRE_FALSE(p.ch->send(FrameKind::user, std::string(4 << 20, 'q')));
  std::vector<UniqueFd> fds;
  fds.push_back(std::move(pipe.read_end));
  REQUIRE_FALSE(p.ch->send(FrameKind::connection, "queued", 0, std::move(fds)));
  CHECK(pipe_has_reader(pipe.write_end.get()));
  p.ch.reset();
  CHECK_FALSE(pipe_has_reader(pipe.write_end.get()));
}

// ------------------------------------------------------------------------------------------
// send() errors and back-pressure
// ------------------------------------------------------------------------------------------

TEST_CASE("send refuses a payload above max_message_size with frame_too_large and sends nothing",
          "[channel]") {
  FdLeakCheck leaks;
  ChannelLimits limits;
  limits.max_message_size = 1024;
  RawPeer p(limits);
  Pipe pipe = make_pipe();
  std::vector<UniqueFd> fds;
  fds.push_back(std::move(pipe.read_end));

  CHECK(p.ch->send(FrameKind::user, std::string(1025, 'x'), 0, std::move(fds)) ==
        errc::frame_too_large);
  CHECK(p.ch->queued_bytes() == 0);
  CHECK(p.ch->is_open());
  // The descriptors were taken and closed with the refused frame.
  CHECK_FALSE(pipe_has_reader(pipe.write_end.get()));
  p.settle();
  std::string on_wire;
  p.read_available(on_wire);
  CHECK(on_wire.empty());

  // The largest allowed payload still goes through.
  REQUIRE_FALSE(p.ch->send(FrameKind::user, std::string(1024, 'y'), 5));
  REQUIRE(run_until(p.loop, [&] {
    p.read_available(on_wire);
    return on_wire.size() >= 16 + 1024;
  }));
  CHECK(on_wire == wire_header(1, 0, 1024, 5) + std::string(1024, 'y'));
  CHECK(p.closes.empty());
}

TEST_CASE("send refuses more than 16 descriptors with too_many_fds and sends nothing",
          "[channel]") {
  FdLeakCheck leaks;
  RawPeer p;
  std::vector<Pipe> pipes;
  std::vector<UniqueFd> fds;
  for (int i = 0; i < 17; ++i) {
    pipes.push_back(make_pipe());
    fds.push_back(std::move(pipes.back().read_end));
  }
  CHECK(p.ch->send(FrameKind::handles, "", 0, std::move(fds)) == errc::too_many_fds);
  CHECK(p.ch->queued_bytes() == 0);
  for (auto& pipe : pipes) CHECK_FALSE(pipe_has_reader(pipe.write_end.get()));
  std::string on_wire;
  p.settle();
  p.read_available(on_wire);
  CHECK(on_wire.empty());
  CHECK(p.ch->is_open());
}

TEST_CASE("send reports queue_full when the peer does not read and everything accepted arrives later",
          "[channel]") {
  FdLeakCheck leaks;
  ChannelLimits limits;
  limits.max_queued_bytes = 256 * 1024;
  RawPeer p(limits);
  int drained = 0;
  p.ch->on_drained([&] {
    ++drained;
    CHECK(p.ch->queued_bytes() == 0);
  });

  const std::string chunk = pattern(16 * 1024, 3);
  std::size_t accepted = 0;
  std::error_code ec;
  for (int i = 0; i < 10000 && !ec; ++i) {
    ec = p.ch->send(FrameKind::user, chunk, accepted);
    if (!ec) ++accepted;
  }
  REQUIRE(ec == errc::queue_full);
  const std::size_t queued = p.ch->queued_bytes();
  CHECK(queued > 0);
  CHECK(queued <= limits.max_queued_bytes);
  CHECK_FALSE(p.ch->has_room(chunk.size()));
  CHECK(p.ch->send(FrameKind::user, chunk) == errc::queue_full);
  CHECK(p.ch->queued_bytes() == queued);
  CHECK(p.ch->is_open());
  p.settle();
  CHECK(p.ch->queued_bytes() == queued);
  CHECK(drained == 0);

  // The peer reads: every accepted frame arrives whole and in order, and on_drained fires.
  std::string on_wire;
  const std::size_t expected = accepted * (16 + chunk.size());
  REQUIRE(run_until(p.loop, [&] {
    p.read_available(on_wire);
    return on_wire.size() >= expected && drained > 0;
  }));
  REQUIRE(on_wire.size() == expected);
  std::size_t bad = 0;
  for (std::size_t i = 0; i < accepted; ++i) {
    std::string_view f = std::string_view(on_wire).substr(i * (16 + chunk.size()), 16 + chunk.size());
    if (f.substr(0, 16) != wire_header(1, 0, static_cast<std::uint32_t>(chunk.size()), i) ||
        f.substr(16) != chunk)
      ++bad;
  }
  CHECK(bad == 0);
  CHECK(drained == 1);
  CHECK(p.ch->has_room(chunk.size()));
  CHECK(p.closes.empty());
}

TEST_CASE("An empty queue takes one message larger than max_queued_bytes", "[channel]") {
  FdLeakCheck leaks;
  ChannelLimits limits;
  limits.max_message_size = 8 << 20;
  limits.max_queued_bytes = 64 * 1024;
  RawPeer p(limits);
  CHECK(p.ch->has_room(4 << 20));
  REQUIRE_FALSE(p.ch->send(FrameKind::user, std::string(4 << 20, 'L')));
  // The socket cannot take 4 MiB while the peer does not read: most of it is queued.
  CHECK(p.ch->queued_bytes() > limits.max_queued_bytes);
  CHECK(p.ch->send(FrameKind::user, "") == errc::queue_full);
  CHECK(p.ch->send(FrameKind::user, std::string(4 << 20, 'M')) == errc::queue_full);
  CHECK_FALSE(p.ch->has_room(0));
}

TEST_CASE("A channel that pauses reading while full holds the peer's frames until its queue "
          "has drained to half, then delivers them all in order",
          "[channel]") {
  // The master's side of a worker that sends 100 requests with 64 KiB answers and reads
  // nothing: the answers stop at the budget (plus one), not at 6.4 MB.
  FdLeakCheck leaks;
  ChannelLimits limits;
  limits.max_queued_bytes = 512 * 1024;
  RawPeer p(limits);
  p.ch->pause_reading_while_full(true);
  const std::string answer = pattern(64 * 1024, 5);
  p.ch->on_frame([&](Frame&& f) {
    p.frames.push_back(std::move(f));
    CHECK_FALSE(p.ch->send(FrameKind::reply, answer, p.frames.back().tag));
  });
  constexpr std::uint64_t kRequests = 100;
  std::string requests;
  for (std::uint64_t i = 0; i < kRequests; ++i)
    requests += wire_frame("q", i, static_cast<std::uint8_t>(FrameKind::request));
  p.write(requests);
  REQUIRE(run_until(p.loop, [&] { return p.ch->over_budget(); }));
  p.settle();
  const std::size_t held_at = p.frames.size();
  CHECK(held_at < kRequests);
  CHECK(p.ch->queued_bytes() <= limits.max_queued_bytes + 16 + answer.size());

  // The peer reads: every request is delivered, once, in order, and every answer arrives.
  std::string on_wire;
  const std::size_t expected = kRequests * (16 + answer.size());
  REQUIRE(run_until(p.loop, [&] {
    p.read_available(on_wire);
    return on_wire.size() >= expected;
  }));
  REQUIRE(p.frames.size() == kRequests);
  for (std::uint64_t i = 0; i < kRequests; ++i) CHECK(p.frames[i].tag == i);
  CHECK(on_wire.size() == expected);
  CHECK(p.closes.empty());
}

TEST_CASE("A held channel delivers nothing after the current frame until the hold is lifted, "
          "then everything in order",
          "[channel]") {
  FdLeakCheck leaks;
  RawPeer p;
  p.ch->on_frame([&](Frame&& f) {
    p.frames.push_back(std::move(f));
    if (p.frames.size() == 2) p.ch->hold_reading(true);  // as the master's store service does
  });
  std::string frames;
  for (std::uint64_t i = 0; i < 10; ++i) frames += wire_frame("f", i);
  p.write(frames);
  REQUIRE(run_until(p.loop, [&] { return p.frames.size() == 2; }));
  p.settle();
  CHECK(p.frames.size() == 2);

  p.ch->hold_reading(false);  // delivers what was read already, then reads on
  REQUIRE(run_until(p.loop, [&] { return p.frames.size() == 10; }));
  for (std::uint64_t i = 0; i < 10; ++i) CHECK(p.frames[i].tag == i);
  CHECK(p.closes.empty());
}

TEST_CASE("A held channel whose peer hangs up closes with channel_closed", "[channel]") {
  FdLeakCheck leaks;
  RawPeer p;
  p.ch->hold_reading(true);
  p.write(wire_frame("unread"));
  p.settle();
  CHECK(p.frames.empty());
  p.raw.reset();
  REQUIRE(p.run_until_closed());
  p.settle();
  CHECK(p.frames.empty());
  CHECK(p.closes == std::vector<std::error_code>{errc::channel_closed});
}

TEST_CASE("on_drained fires once after a queue that had to wait has emptied", "[channel]") {
  FdLeakCheck leaks;
  ChannelPair p;
  int drained = 0;
  std::size_t queued_at_drain = 1;
  p.a->on_drained([&] {
    ++drained;
    queued_at_drain = p.a->queued_bytes();
  });

  // A frame the socket takes at once does not make the channel wait: no on_drained.
  REQUIRE_FALSE(p.a->send(FrameKind::user, "small"));
  REQUIRE(p.a->queued_bytes() == 0);
  REQUIRE(p.run_until_received(1));
  p.loop.run_once(0);
  CHECK(drained == 0);

  REQUIRE_FALSE(p.a->send(FrameKind::user, pattern(4 << 20, 4)));
  REQUIRE(p.a->queued_bytes() > 0);
  REQUIRE(run_until(p.loop, [&] { return drained > 0 && p.got.size() == 2; }));
  CHECK(drained == 1);
  CHECK(queued_at_drain == 0);
  p.loop.run_once(0);
  CHECK(drained == 1);
}

TEST_CASE("Closing the peer while data is queued reports channel_closed through the loop",
          "[channel]") {
  FdLeakCheck leaks;
  RawPeer p;
  SECTION("with a queue") {
    REQUIRE_FALSE(p.ch->send(FrameKind::user, std::string(4 << 20, 'q')));
    REQUIRE(p.ch->queued_bytes() > 0);
    p.raw.reset();
    (void)p.ch->send(FrameKind::user, "more");
    CHECK(p.closes.empty());  // never inside send()
  }
  SECTION("with an empty queue") {
    p.raw.reset();
    (void)p.ch->send(FrameKind::user, "after the peer left");
    CHECK(p.closes.empty());
  }
  REQUIRE(p.run_until_closed());
  p.settle();
  REQUIRE(p.closes.size() == 1);
  CHECK(p.closes[0] == errc::channel_closed);
  CHECK_FALSE(p.ch->is_open());
  CHECK(p.ch->queued_bytes() == 0);
  CHECK(p.ch->send(FrameKind::user, "x") == errc::channel_closed);
}

TEST_CASE("Closing one channel reports channel_closed to the other end only", "[channel]") {
  FdLeakCheck leaks;
  ChannelPair p;
  REQUIRE_FALSE(p.a->send(FrameKind::disconnect, "bye"));
  p.a->close();
  CHECK_FALSE(p.a->is_open());
  CHECK(p.a->send(FrameKind::user, "x") == errc::channel_closed);
  REQUIRE(run_until(p.loop, [&] { return !p.b_closed.empty(); }));
  // What was sent before close() still arrives, then the clean EOF.
  REQUIRE(p.got.size() == 1);
  CHECK(p.got[0].kind == FrameKind::disconnect);
  CHECK(p.b_closed == std::vector<std::error_code>{errc::channel_closed});
  CHECK(p.a_closed.empty());  // close() does not report
}

TEST_CASE("A frame callback may close the channel and nothing more is delivered", "[channel]") {
  FdLeakCheck leaks;
  ChannelPair p;
  int delivered = 0;
  p.b->on_frame([&](Frame&&) {
    if (++delivered == 3) p.b->close();
  });
  for (int i = 0; i < 10; ++i) REQUIRE_FALSE(p.a->send(FrameKind::user, std::to_string(i)));
  REQUIRE(run_until(p.loop, [&] { return !p.b->is_open(); }));
  REQUIRE(run_until(p.loop, [&] { return !p.a_closed.empty(); }));
  CHECK(delivered == 3);
  CHECK(p.b_closed.empty());
  CHECK(p.a_closed == std::vector<std::error_code>{errc::channel_closed});
}

// ------------------------------------------------------------------------------------------
// Malformed input from a raw peer
// ------------------------------------------------------------------------------------------

TEST_CASE("A clean EOF closes the channel with channel_closed", "[channel]") {
  FdLeakCheck leaks;
  RawPeer p;
  SECTION("after complete frames") {
    p.write(wire_frame("one") + wire_frame("") + wire_frame("three"));
    p.raw.reset();
    REQUIRE(p.run_until_closed());
    REQUIRE(p.frames.size() == 3);
    CHECK(p.frames[2].payload == "three");
  }
  SECTION("before any frame") {
    p.raw.reset();
    REQUIRE(p.run_until_closed());
    CHECK(p.frames.empty());
  }
  p.settle();
  CHECK(p.closes == std::vector<std::error_code>{errc::channel_closed});
  CHECK_FALSE(p.ch->is_open());
}

TEST_CASE("A frame with bad magic closes the channel with malformed_frame", "[channel]") {
  FdLeakCheck leaks;
  RawPeer p;
  p.write(wire_frame("before") + wire_header(1, 0, 5, 0, 0x4651) + "after" + wire_frame("later"));
  check_failed_with(p, errc::malformed_frame);
}

TEST_CASE("Garbage instead of a first frame closes the channel with malformed_frame",
          "[channel]") {
  FdLeakCheck leaks;
  RawPeer p;
  p.write("GET / HTTP/1.1\r\nHost: x\r\n\r\n");
  REQUIRE(p.run_until_closed());
  CHECK(p.closes == std::vector<std::error_code>{errc::malformed_frame});
  CHECK(p.frames.empty());
  CHECK_FALSE(p.ch->is_open());
}

TEST_CASE("A frame of an unknown kind closes the channel with malformed_frame", "[channel]") {
  for (int kind : {0, prefork::kMaxFrameKind + 1, 200, 255}) {
    INFO("kind " << kind);
    FdLeakCheck leaks;
    RawPeer p;
    p.write(wire_frame("before") + wire_header(static_cast<std::uint8_t>(kind), 0, 5) + "after" +
            wire_frame("later"));
    check_failed_with(p, errc::malformed_frame);
  }
}

TEST_CASE("A header announcing more than 16 descriptors closes the channel with too_many_fds",
          "[channel]") {
  for (int nfds : {17, 255}) {
    INFO("nfds " << nfds);
    FdLeakCheck leaks;
    RawPeer p;
    p.write(wire_frame("before") + wire_header(1, static_cast<std::uint8_t>(nfds), 0) +
            wire_frame("later"));
    check_failed_with(p, errc::too_many_fds);
  }
}

TEST_CASE("More than 16 descriptors attached to one write close the channel with too_many_fds",
          "[channel]") {
  FdLeakCheck leaks;
  RawPeer p;
  Pipe pipe = make_pipe();
  p.write(wire_frame("before"));
  // Delivered first: the frames read together with the oversized batch would be dropped.
  REQUIRE(run_until(p.loop, [&] { return p.frames.size() == 1; }));
  std::vector<int> fds(20, pipe.read_end.get());
  sendmsg_raw(p.raw.get(), wire_header(1, 16, 0) + wire_frame("later"), fds);
  pipe.read_end.reset();
  check_failed_with(p, errc::too_many_fds);
  p.ch.reset();
  p.raw.reset();
  CHECK_FALSE(pipe_has_reader(pipe.write_end.get()));
}

TEST_CASE("A header announcing a payload above max_message_size closes the channel with frame_too_large",
          "[channel]") {
  SECTION("default limits") {
    FdLeakCheck leaks;
    RawPeer p;
    p.write(wire_frame("before") + wire_header(1, 0, 0xffffffffu) + wire_frame("later"));
    check_failed_with(p, errc::frame_too_large);
  }
  SECTION("default limits one byte over") {
    FdLeakCheck leaks;
    RawPeer p;
    const auto over = static_cast<std::uint32_t>(ChannelLimits{}.max_message_size + 1);
    p.write(wire_frame("before") + wire_header(1, 0, over) + wire_frame("later"));
    check_failed_with(p, errc::frame_too_large);
  }
  SECTION("a small limit") {
    FdLeakCheck leaks;
    ChannelLimits limits;
    limits.max_message_size = 1000;
    RawPeer p(limits);
    p.write(wire_frame("before") + wire_header(1, 0, 1001) + std::string(1001, 'x') +
            wire_frame("later"));
    check_failed_with(p, errc::frame_too_large);
  }
}

TEST_CASE("A header announcing a descriptor that is not attached closes the channel with malformed_frame",
          "[channel]") {
  FdLeakCheck leaks;
  RawPeer p;
  p.write(wire_frame("before") + wire_header(6, 1, 4) + "conn" + wire_frame("later"));
  check_failed_with(p, errc::malformed_frame);
}

TEST_CASE("A frame cut short by the peer closing closes the channel with truncated_frame",
          "[channel]") {
  FdLeakCheck leaks;
  RawPeer p;
  const std::string whole = wire_header(1, 0, 100) + std::string(100, 'z');
  SECTION("half a frame") { p.write(wire_frame("before") + whole.substr(0, whole.size() / 2)); }
  SECTION("the header only") { p.write(wire_frame("before") + whole.substr(0, 16)); }
  SECTION("half a header") { p.write(wire_frame("before") + whole.substr(0, 7)); }
  SECTION("all but the last byte") {
    p.write(wire_frame("before") + whole.substr(0, whole.size() - 1));
  }
  p.loop.run_once(0);
  CHECK(p.closes.empty());  // an incomplete frame is not an error until the peer leaves
  p.raw.reset();
  check_failed_with(p, errc::truncated_frame);
}

TEST_CASE("A frame cut short after its descriptor arrived closes that descriptor", "[channel]") {
  FdLeakCheck leaks;
  RawPeer p;
  Pipe pipe = make_pipe();
  p.write(wire_frame("before"));
  const std::string whole = wire_header(6, 1, 100) + std::string(100, 'z');
  sendmsg_raw(p.raw.get(), whole.substr(0, 60), {pipe.read_end.get()});
  pipe.read_end.reset();
  p.raw.reset();
  check_failed_with(p, errc::truncated_frame);
  p.ch.reset();
  CHECK_FALSE(pipe_has_reader(pipe.write_end.get()));
}

TEST_CASE("A descriptor the receiver has no room for leaves its frame without it and the "
          "channel open",
          "[channel]") {
  FdLeakCheck leaks;
  ChannelPair p;
  Pipe lost = make_pipe(), later = make_pipe();
  rlimit saved{};
  REQUIRE(::getrlimit(RLIMIT_NOFILE, &saved) == 0);
  // The receiver at its descriptor limit: the kernel closes what it cannot install and sets
  // MSG_CTRUNC (scm_detach_fds), as for a worker at `ulimit -n` with many clients.
  rlimit low = saved;
  low.rlim_cur = std::min<rlim_t>(saved.rlim_cur, 256);
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &low) == 0);
  std::vector<UniqueFd> hogs;
  auto fill_table = [&] {
    for (rlim_t i = 0; i < low.rlim_cur; ++i) {
      int fd = ::dup(lost.write_end.get());
      if (fd < 0) break;
      hogs.emplace_back(fd);
    }
  };
  std::vector<UniqueFd> fds;
  fds.push_back(std::move(lost.read_end));
  REQUIRE_FALSE(p.a->send(FrameKind::connection, "no room", 1, std::move(fds)));
  REQUIRE_FALSE(p.a->send(FrameKind::user, "after it", 2));
  fill_table();  // the slot the sender's copy left, once sent, too
  REQUIRE(::dup(lost.write_end.get()) == -1);
  const bool received = p.run_until_received(2);
  hogs.clear();
  REQUIRE(::setrlimit(RLIMIT_NOFILE, &saved) == 0);
  REQUIRE(received);
  CHECK(p.b_closed.empty());
  CHECK(p.b->is_open());
  REQUIRE(p.got.size() == 2);
  CHECK(p.got[0].kind == FrameKind::connection);
  CHECK(p.got[0].payload == "no room");
  REQUIRE(p.got[0].fds.size() == 1);
  CHECK_FALSE(p.got[0].fds[0]);
  CHECK(p.got[1].payload == "after it");
  CHECK_FALSE(pipe_has_reader(lost.write_end.get()));  // the kernel closed it

  // With room again, descriptors arrive as before.
  fds.clear();
  fds.push_back(std::move(later.read_end));
  REQUIRE_FALSE(p.a->send(FrameKind::connection, "room again", 3, std::move(fds)));
  REQUIRE(p.run_until_received(3));
  REQUIRE(p.got[2].fds.size() == 1);
  CHECK(p.got[2].fds[0]);
  CHECK(pipe_has_reader(later.write_end.get()));
}

TEST_CASE("Descriptors of an undelivered frame are closed as soon as the channel fails",
          "[channel]") {
  FdLeakCheck leaks;
  RawPeer p;
  Pipe pipe = make_pipe();
  p.write(wire_frame("before"));
  const std::string whole = wire_header(6, 1, 100) + std::string(100, 'z');
  sendmsg_raw(p.raw.get(), whole.substr(0, 60), {pipe.read_end.get()});
  pipe.read_end.reset();
  p.raw.reset();
  check_failed_with(p, errc::truncated_frame);
  // The Channel object is still alive (its owner learns of the failure in on_close and may
  // keep it around), but the descriptor of a frame that will never be delivered is closed.
  CHECK_FALSE(pipe_has_reader(pipe.write_end.get()));
}

TEST_CASE("A peer that attaches descriptors to a frame announcing none cannot make the channel hoard them",
          "[channel]") {
  FdLeakCheck leaks;
  RawPeer p;
  Pipe pipe = make_pipe();
  // A frame that announces no descriptor, then its payload one byte at a time, each byte with
  // a descriptor attached. A well-behaved sender attaches descriptors only to the first byte
  // of a frame that announces them.
  p.write(wire_header(1, 0, 64));
  for (int i = 0; i < 32; ++i) sendmsg_raw(p.raw.get(), "x", {pipe.read_end.get()});
  pipe.read_end.reset();
  REQUIRE(p.run_until_closed(2s));
  CHECK(p.closes == std::vector<std::error_code>{errc::malformed_frame});
  CHECK(p.frames.empty());
  CHECK_FALSE(pipe_has_reader(pipe.write_end.get()));
}

// ------------------------------------------------------------------------------------------
// Fuzz
// ------------------------------------------------------------------------------------------

namespace {

struct ExpectedFrame {
  FrameKind kind;
  std::uint64_t tag;
  std::string payload;
};

struct Expected {
  std::vector<ExpectedFrame> frames;
  std::error_code error;
};

// An independent model of the receiver: the frames and the error a Channel must report for a
// byte stream that a peer wrote and then closed, with no descriptors attached. The header is
// validated field by field in wire order (magic, kind, descriptor count, length).
Expected reference_decode(std::string_view s, std::size_t max_message_size) {
  Expected e;
  auto fails = [&](errc why) {
    e.error = why;
    return e;
  };
  std::size_t pos = 0;
  for (;;) {
    const std::size_t left = s.size() - pos;
    if (left == 0) return fails(errc::channel_closed);
    if (left < 16) return fails(errc::truncated_frame);
    const auto magic = le(s, pos, 2), kind = le(s, pos + 2, 1), nfds = le(s, pos + 3, 1),
               length = le(s, pos + 4, 4), tag = le(s, pos + 8, 8);
    if (magic != 0x4650 || kind == 0 || kind > prefork::kMaxFrameKind)
      return fails(errc::malformed_frame);
    if (nfds > 16) return fails(errc::too_many_fds);
    if (length > max_message_size) return fails(errc::frame_too_large);
    if (left < 16 + length) return fails(errc::truncated_frame);
    if (nfds > 0) return fails(errc::malformed_frame);  // announced, never attached
    e.frames.push_back({static_cast<FrameKind>(kind), tag, std::string(s.substr(pos + 16, length))});
    pos += 16 + length;
  }
}

std::string random_bytes(std::mt19937_64& rng, std::size_t max_len) {
  std::string s(rng() % (max_len + 1), '\0');
  for (auto& c : s) c = static_cast<char>(rng());
  return s;
}

// One to four frames with plausible headers (mostly valid, sometimes with one bad field),
// then perhaps cut, corrupted or followed by garbage.
std::string framed_bytes(std::mt19937_64& rng) {
  auto chance = [&](unsigned percent) { return rng() % 100 < percent; };
  std::string s;
  const int frames = 1 + static_cast<int>(rng() % 4);
  for (int i = 0; i < frames; ++i) {
    const auto kind = static_cast<std::uint8_t>(chance(90) ? 1 + rng() % 8 : rng());
    const auto nfds = static_cast<std::uint8_t>(chance(90) ? 0 : rng() % 24);
    std::uint32_t length;
    if (chance(85))
      length = static_cast<std::uint32_t>(rng() % 65);
    else if (chance(70))
      length = static_cast<std::uint32_t>(rng() % (std::uint32_t{2} << 20));  // around the limit
    else
      length = static_cast<std::uint32_t>(rng());
    const auto magic = static_cast<std::uint16_t>(chance(97) ? 0x4650 : rng());
    s += wire_header(kind, nfds, length, rng(), magic);
    std::string payload(std::min<std::size_t>(length, 64 + rng() % 64), '\0');
    for (auto& c : payload) c = static_cast<char>(rng());
    s += payload;
  }
  if (chance(25) && !s.empty()) s.resize(rng() % s.size());
  if (chance(10) && !s.empty()) s[rng() % s.size()] = static_cast<char>(rng());
  if (chance(10)) s += random_bytes(rng, 32);
  return s;
}

std::string hex(std::string_view s) {
  static const char digits[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : s.substr(0, 96)) {
    out += digits[c >> 4];
    out += digits[c & 15];
  }
  if (s.size() > 96) out += "...";
  return out;
}

}  // namespace

TEST_CASE("Random bytes from a raw peer end in the frames and the error a reference decoder predicts",
          "[channel]") {
  FdLeakCheck leaks;
  EventLoop loop;  // shared by every iteration, so descriptor numbers are reused
  ChannelLimits limits;
  limits.max_message_size = 1 << 20;
  std::mt19937_64 rng(0x5eed'2024'0601ull);
  constexpr int iterations = 20000;
  for (int i = 0; i < iterations; ++i) {
    const std::string bytes = (i % 2 == 0) ? random_bytes(rng, 64) : framed_bytes(rng);
    const Expected want = reference_decode(bytes, limits.max_message_size);
    INFO("iteration " << i << ", " << bytes.size() << " bytes: " << hex(bytes));

    auto [mine, theirs] = prefork::make_channel_pair();
    std::vector<Frame> got;
    std::vector<std::error_code> closes;
    Channel ch(loop, std::move(mine), limits);
    ch.on_frame([&](Frame&& f) { got.push_back(std::move(f)); });
    ch.on_close([&](std::error_code ec) { closes.push_back(ec); });
    write_raw(theirs.get(), bytes);
    theirs.reset();

    for (int round = 0; round < 100 && closes.empty(); ++round) loop.run_once(100);
    REQUIRE(closes.size() == 1);
    REQUIRE(closes[0] == want.error);
    REQUIRE(got.size() == want.frames.size());
    for (std::size_t k = 0; k < got.size(); ++k) {
      REQUIRE(got[k].kind == want.frames[k].kind);
      REQUIRE(got[k].tag == want.frames[k].tag);
      REQUIRE((got[k].payload == want.frames[k].payload));
      REQUIRE(got[k].fds.empty());
    }
    REQUIRE_FALSE(ch.is_open());
  }
  CHECK_FALSE(loop.alive());
}

TEST_CASE("flush_blocking writes the whole queue while the peer reads", "[channel]") {
  FdLeakCheck leaks;
  RawPeer p;
  const std::size_t size = 4 << 20;
  REQUIRE_FALSE(p.ch->send(FrameKind::user, std::string(size, 'f')));
  REQUIRE(p.ch->queued_bytes() > 0);
  CHECK_FALSE(p.ch->flush_blocking(0));  // the peer does not read yet

  // A reader thread stands in for the peer process.
  std::size_t total = 0;
  std::thread reader([&, fd = p.raw.get()] {
    char buf[64 * 1024];
    for (;;) {
      pollfd pfd{fd, POLLIN, 0};
      ::poll(&pfd, 1, -1);
      ssize_t n = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
      if (n == 0) return;
      if (n > 0) total += static_cast<std::size_t>(n);
    }
  });
  const bool flushed = p.ch->flush_blocking(20000);
  p.ch->close();
  reader.join();
  CHECK(flushed);
  CHECK(total == 16 + size);
}

// ------------------------------------------------------------------------------------------
// Coalescing: consecutive frames share a buffer and a sendmsg
// ------------------------------------------------------------------------------------------

namespace {

void set_buffer(int fd, int option, int bytes) {
  REQUIRE(::setsockopt(fd, SOL_SOCKET, option, &bytes, sizeof bytes) == 0);
}

// What frame i of the mixed sequences below carries: its payload, and how many descriptors.
std::string mixed_payload(std::size_t i) {
  if (i % 400 == 200) return pattern(20000 + i, unsigned(i));  // moved, not copied, when sent
  if (i % 1500 == 750) return pattern(300000, unsigned(i));
  return "frame " + std::to_string(i);
}
std::size_t mixed_fds(std::size_t i) {
  if (i % 997 == 7) return 16;
  if (i % 97 == 5) return 1 + i % 3;
  return 0;
}
std::string fd_text(std::size_t frame, std::size_t fd) {
  return "frame " + std::to_string(frame) + " fd " + std::to_string(fd);
}

// Sends frames [0, count) of the mixed sequence: every descriptor is the read end of a pipe
// holding fd_text and then EOF; every 89th frame lends its descriptor (send_borrowed) and
// `lent` keeps it until the test ends.
void send_mixed(Channel& ch, std::size_t count, std::vector<UniqueFd>& lent) {
  for (std::size_t i = 0; i < count; ++i) {
    std::vector<UniqueFd> fds;
    const std::size_t n = i % 89 == 3 ? 1 : mixed_fds(i);
    for (std::size_t j = 0; j < n; ++j) {
      Pipe pipe = make_pipe();
      const std::string text = fd_text(i, j);
      REQUIRE(::write(pipe.write_end.get(), text.data(), text.size()) ==
              static_cast<ssize_t>(text.size()));
      fds.push_back(std::move(pipe.read_end));
    }
    const FrameKind kind = n > 0 ? FrameKind::connection : FrameKind::user;
    if (i % 89 == 3) {
      REQUIRE_FALSE(ch.send_borrowed(kind, mixed_payload(i), i, fds[0].get()));
      lent.push_back(std::move(fds[0]));
    } else {
      REQUIRE_FALSE(ch.send(kind, mixed_payload(i), i, std::move(fds)));
    }
  }
}

// The frames of send_mixed arrived in order, each with its own descriptors.
void check_mixed(const std::vector<Frame>& got, std::size_t count) {
  REQUIRE(got.size() == count);
  std::size_t bad = 0;
  for (std::size_t i = 0; i < count; ++i) {
    const std::size_t n = i % 89 == 3 ? 1 : mixed_fds(i);
    if (got[i].tag != i || got[i].payload != mixed_payload(i) || got[i].fds.size() != n) {
      INFO("frame " << i << ": tag " << got[i].tag << ", " << got[i].payload.size()
                    << " bytes, " << got[i].fds.size() << " descriptors");
      CHECK(false);
      ++bad;
      continue;
    }
    for (std::size_t j = 0; j < n; ++j)
      if (read_to_eof(got[i].fds[j].get()) != fd_text(i, j)) ++bad;
  }
  CHECK(bad == 0);
}

}  // namespace

TEST_CASE("Small frames sent in a burst with frames carrying descriptors arrive in order, each descriptor with its frame",
          "[channel][coalescing]") {
  FdLeakCheck leaks;
  std::vector<UniqueFd> lent;  // outlives the channels: borrowed descriptors stay open until sent
  ChannelPair p;
  constexpr std::size_t count = 3000;
  send_mixed(*p.a, count, lent);
  REQUIRE(p.run_until_received(count));
  check_mixed(p.got, count);
  CHECK(p.a_closed.empty());
  CHECK(p.b_closed.empty());
}

TEST_CASE("Frames with descriptors keep their place through partial writes to a tiny socket buffer",
          "[channel][coalescing]") {
  FdLeakCheck leaks;
  std::vector<UniqueFd> lent;
  ChannelPair p;
  // The kernel rounds these up to its minimum (a few KiB): most sendmsg calls write part of
  // what they were given, often ending inside a frame or a chunk.
  set_buffer(p.a->native_handle(), SO_SNDBUF, 1);
  set_buffer(p.b->native_handle(), SO_RCVBUF, 1);
  constexpr std::size_t count = 2000;
  send_mixed(*p.a, count, lent);
  CHECK(p.a->queued_bytes() > 0);
  REQUIRE(p.run_until_received(count));
  check_mixed(p.got, count);
  CHECK(p.a->queued_bytes() == 0);
  CHECK(p.b_closed.empty());
}

TEST_CASE("Coalesced frames reach the wire byte for byte when the peer reads a few bytes at a time",
          "[channel][coalescing]") {
  FdLeakCheck leaks;
  RawPeer p;
  set_buffer(p.ch->native_handle(), SO_SNDBUF, 1);
  std::string expected;
  for (std::size_t i = 0; i < 1500; ++i) {
    const std::string payload = mixed_payload(i);
    expected += wire_frame(payload, i);
    REQUIRE_FALSE(p.ch->send(FrameKind::user, payload, i));
  }
  std::string on_wire;
  char buf[97];  // an odd size, so reads end anywhere in a header or a payload
  REQUIRE(run_until(p.loop, [&] {
    for (int k = 0; k < 64; ++k) {
      ssize_t n = ::recv(p.raw.get(), buf, sizeof buf, MSG_DONTWAIT);
      if (n <= 0) break;
      on_wire.append(buf, static_cast<std::size_t>(n));
    }
    return on_wire.size() >= expected.size();
  }, 60s));
  CHECK(on_wire.size() == expected.size());
  CHECK((on_wire == expected));
  CHECK(p.ch->queued_bytes() == 0);
  CHECK(p.closes.empty());
}

TEST_CASE("queued_bytes counts whole frames until written and queue_full refuses only user traffic",
          "[channel][coalescing]") {
  FdLeakCheck leaks;
  ChannelLimits limits;
  limits.max_queued_bytes = 32 * 1024;
  RawPeer p(limits);  // the peer does not read until the end
  int drained = 0;
  p.ch->on_drained([&] { ++drained; });
  const std::string payload = pattern(100, 1);
  std::string expected;
  std::size_t accepted = 0;
  std::error_code ec;
  for (int i = 0; i < 100000 && !ec; ++i) {
    ec = p.ch->send(FrameKind::user, payload, accepted);
    if (!ec) expected += wire_frame(payload, accepted++);
  }
  REQUIRE(ec == errc::queue_full);
  const std::size_t queued = p.ch->queued_bytes();
  CHECK(queued > 0);
  CHECK(queued <= limits.max_queued_bytes);
  CHECK(queued + 16 + payload.size() > limits.max_queued_bytes);  // refused exactly when over
  CHECK_FALSE(p.ch->has_room(payload.size()));
  CHECK(p.ch->send(FrameKind::request, payload, 1) == errc::queue_full);
  CHECK(p.ch->send(FrameKind::store, payload, 1) == errc::queue_full);
  CHECK(p.ch->queued_bytes() == queued);
  // Control frames still go, behind the rest.
  REQUIRE_FALSE(p.ch->send(FrameKind::heartbeat, {}, 77));
  expected += wire_header(static_cast<std::uint8_t>(FrameKind::heartbeat), 0, 0, 77);
  CHECK(p.ch->queued_bytes() == queued + 16);

  std::string on_wire;
  REQUIRE(run_until(p.loop, [&] {
    p.read_available(on_wire);
    return on_wire.size() >= expected.size() && drained > 0;
  }));
  CHECK((on_wire == expected));
  CHECK(p.ch->queued_bytes() == 0);
  CHECK(drained == 1);
  CHECK(p.ch->has_room(limits.max_queued_bytes));
}

TEST_CASE("Large messages between small ones keep their place", "[channel][coalescing]") {
  FdLeakCheck leaks;
  ChannelPair p;
  std::vector<std::string> sent;
  for (std::size_t i = 0; i < 2000; ++i) {
    if (i == 500) sent.push_back(pattern(std::size_t{8} << 20, 8));
    else if (i == 1200) sent.push_back(pattern(100 * 1024, 9));
    else if (i == 1201) sent.push_back(pattern(16 * 1024, 10));  // at the copy/move boundary
    else if (i == 1202) sent.push_back(pattern(16 * 1024 + 1, 11));
    else sent.push_back("small " + std::to_string(i));
    REQUIRE_FALSE(p.a->send(FrameKind::user, sent.back(), i));
  }
  REQUIRE(p.run_until_received(sent.size()));
  REQUIRE(p.got.size() == sent.size());
  std::size_t bad = 0;
  for (std::size_t i = 0; i < sent.size(); ++i)
    if (p.got[i].tag != i || p.got[i].payload != sent[i]) ++bad;
  CHECK(bad == 0);
  CHECK(p.b_closed.empty());
}

TEST_CASE("A channel gives back the memory of a 64 MiB message and of a burst once they are delivered",
          "[channel][coalescing]") {
  FdLeakCheck leaks;
  ChannelPair p;
  std::size_t received = 0, received_bytes = 0;
  p.b->on_frame([&](Frame&& f) {
    ++received;
    received_bytes += f.payload.size();
  });
  // Both directions' buffers exist before the baseline is taken.
  REQUIRE_FALSE(p.a->send(FrameKind::user, "warm up"));
  REQUIRE(run_until(p.loop, [&] { return received == 1; }));
  const std::size_t before = heap_in_use();
  constexpr std::size_t slack = std::size_t{1} << 20;

  const std::size_t big = std::size_t{64} << 20;
  REQUIRE_FALSE(p.a->send(FrameKind::user, std::string(big, 'B')));
  REQUIRE(run_until(p.loop, [&] { return received == 2 && p.a->queued_bytes() == 0; }));
  CHECK(received_bytes == 7 + big);
  for (int i = 0; i < 3; ++i) p.loop.run_once(0);
  const std::size_t after_big = heap_in_use();
  INFO("heap before " << before << ", after the 64 MiB message " << after_big);
  CHECK(after_big < before + slack);

  // A burst of small frames queues megabytes before the loop writes them.
  constexpr std::size_t burst = 200000;
  for (std::size_t i = 0; i < burst; ++i)
    REQUIRE_FALSE(p.a->send(FrameKind::user, "a small message of forty bytes, or so..", i));
  REQUIRE(run_until(p.loop, [&] { return received == 2 + burst && p.a->queued_bytes() == 0; }));
  for (int i = 0; i < 3; ++i) p.loop.run_once(0);
  const std::size_t after_burst = heap_in_use();
  INFO("after the burst " << after_burst);
  CHECK(after_burst < before + slack);
  CHECK(p.b_closed.empty());
}
