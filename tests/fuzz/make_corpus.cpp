// Writes the seed corpora: tests/fuzz/corpus/frame/ (frames built with the library's own
// encode_header, in the input layout frame.fuzz.cpp reads) and tests/fuzz/corpus/codec/ (values
// encoded with the codecs codec.fuzz.cpp decodes) and tests/fuzz/corpus/store/ (store requests,
// replies, snapshots and request scripts, in the layout store.fuzz.cpp reads) and
// tests/fuzz/corpus/control/ (control request lines, which control.fuzz.cpp parses and quotes).
// Valid inputs and a few near misses, each reaching one outcome, so that fuzzing starts from
// every branch of the decoders.
// Usage: fuzz.make_corpus <tests/fuzz/corpus>   (overwrites the files of the same names)
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <string>
#include <string_view>
#include <utility>

#include "prefork/channel.hpp"
#include "prefork/codec.hpp"
#include "prefork/store.hpp"
#include "sample.hpp"

namespace {

namespace fs = std::filesystem;
using prefork::FrameKind;

std::string header(FrameKind kind, std::uint32_t length, std::uint64_t tag = 0,
                   std::uint8_t nfds = 0) {
  char h[prefork::detail::kHeaderSize];
  prefork::detail::encode_header(h, {static_cast<std::uint8_t>(kind), nfds, length, tag});
  return std::string(h, sizeof h);
}

std::string frame(FrameKind kind, std::string_view payload, std::uint64_t tag = 0,
                  std::uint8_t nfds = 0) {
  return header(kind, static_cast<std::uint32_t>(payload.size()), tag, nfds) +
         std::string(payload);
}

// The mode byte (frame.fuzz.cpp): bits 0-1 the limit (0: default, 1: 4096, 2: 64, 3: 0),
// bit 2 + bits 3-6 a loop round after every 2^n bytes, bit 7 script mode, in which bits 2-6
// make on_frame close the Channel after that many frames.
constexpr char plain = 0x00;
constexpr char limit_64 = 0x02;
constexpr char limit_0 = 0x03;
constexpr char limit_4096 = 0x01;
char split_every(unsigned log2_bytes) { return static_cast<char>(0x04 | (log2_bytes << 3)); }
constexpr char script = static_cast<char>(0x80);
char script_closing_after(unsigned frames) { return static_cast<char>(0x80 | (frames << 2)); }

// One script record: control byte (descriptors, loop round after it, 2-byte length, repeat),
// then the length, the repeat exponent (the bytes are sent 2^log2_repeat times) and the bytes.
std::string record(std::string_view bytes, unsigned nfds, bool pump = false,
                   unsigned log2_repeat = 0) {
  const bool wide = bytes.size() > 255;
  std::string r(1, static_cast<char>(nfds | (pump ? 0x20 : 0) | (wide ? 0x40 : 0) |
                                     (log2_repeat > 0 ? 0x80 : 0)));
  r += static_cast<char>(bytes.size() & 0xff);
  if (wide) r += static_cast<char>(bytes.size() >> 8);
  if (log2_repeat > 0) r += static_cast<char>(log2_repeat);
  return r + std::string(bytes);
}

void write(const fs::path& dir, const std::string& name, const std::string& bytes) {
  fs::create_directories(dir);
  std::ofstream out(dir / name, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) {
    std::fprintf(stderr, "make_corpus: cannot write %s\n", (dir / name).c_str());
    std::exit(1);
  }
}

// store.fuzz.cpp's mode byte: what the rest of the input is.
constexpr char store_request = 0;
constexpr char store_reply = 1;
constexpr char store_snapshot = 2;
constexpr char store_snapshot_fixed_crc = 3;
constexpr char store_script = 4;

// One record of a store script: the fake clock moves by advance_ms, then the request runs.
std::string step(unsigned advance_ms, const prefork::StoreRequest& r) {
  const std::string bytes = prefork::encode(r);
  if (bytes.size() > 255) {
    std::fprintf(stderr, "make_corpus: a script request must encode to at most 255 bytes\n");
    std::exit(1);
  }
  return std::string(1, static_cast<char>(advance_ms)) + static_cast<char>(bytes.size()) + bytes;
}

// A snapshot's bytes, written through MemoryStore::save to a scratch file beside the corpus.
std::string snapshot_of(const prefork::MemoryStore<>& store, const fs::path& scratch) {
  if (auto ec = store.save(scratch.string())) {
    std::fprintf(stderr, "make_corpus: save %s: %s\n", scratch.c_str(), ec.message().c_str());
    std::exit(1);
  }
  std::ifstream in(scratch, std::ios::binary);
  std::string bytes{std::istreambuf_iterator<char>(in), {}};
  fs::remove(scratch);
  return bytes;
}

template <class Codec>
std::string encoded(const typename Codec::message_type& m) {
  return Codec{}.encode(m);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <corpus dir, e.g. tests/fuzz/corpus>\n", argv[0]);
    return 2;
  }
  const fs::path root(argv[1]);

  const fs::path f = root / "frame";
  const std::string hello = frame(FrameKind::user, "hello", 1);
  std::string every_kind;
  for (std::uint8_t k = 1; k <= prefork::kMaxFrameKind; ++k)
    every_kind += frame(static_cast<FrameKind>(k), std::string(k, 'k'), 0x0101010101010101u * k);
  const std::string three = frame(FrameKind::user, "") + frame(FrameKind::stats, "x", 7) +
                            frame(FrameKind::user, std::string(100, 'p'), ~std::uint64_t{0});
  write(f, "plain-empty", std::string(1, plain));
  write(f, "plain-one-frame", plain + hello);
  write(f, "plain-every-kind", plain + every_kind);
  write(f, "plain-split-4", split_every(2) + three);
  write(f, "plain-split-1", split_every(0) + hello + frame(FrameKind::heartbeat, "", 2));
  write(f, "plain-truncated", plain + hello + hello.substr(0, 19));
  write(f, "plain-announces-fd", plain + hello + frame(FrameKind::handles, "h", 0, 1));
  const auto bad_kind = static_cast<FrameKind>(prefork::kMaxFrameKind + 1);
  write(f, "plain-bad-kind", plain + hello + frame(bad_kind, "?"));
  write(f, "limit64-at-limit", limit_64 + frame(FrameKind::user, std::string(64, 'a')));
  write(f, "limit64-over", limit_64 + hello + frame(FrameKind::user, std::string(65, 'b')));
  write(f, "limit0-empty-ok", limit_0 + frame(FrameKind::online, "") + frame(FrameKind::user, "x"));
  write(f, "limit4096-large", limit_4096 + frame(FrameKind::user, std::string(4096, 'c')) +
                                  frame(FrameKind::user, std::string(5000, 'd')));

  const std::string conn = frame(FrameKind::connection, "conn", 3, 1);
  write(f, "script-one-fd", script + record(conn, 1) + record(hello, 0));
  write(f, "script-16-fds", script + record(frame(FrameKind::handles, "", 0, 16), 16));
  write(f, "script-17-fds", script + record(frame(FrameKind::handles, "", 0, 16), 17));
  write(f, "script-fd-split", script + record(conn.substr(0, 10), 1, true) +
                                  record(conn.substr(10), 0, true) + record(hello, 0));
  // on_frame closes the Channel after the second frame, with a third one and its descriptor
  // read already: they are dropped, the descriptor closed.
  write(f, "script-close-in-callback",
        script_closing_after(2) + record(hello + hello + conn + hello, 1) + record(hello, 0));
  write(f, "script-unannounced-fd", script + record(hello, 1));
  write(f, "script-missing-fd", script + record(frame(FrameKind::handles, "", 0, 3), 2));
  std::string several;
  for (std::uint8_t n = 1; n <= 4; ++n)
    several += record(frame(FrameKind::connection, std::string(n, 'c'), n, n), n, n % 2 == 0);
  write(f, "script-fd-per-frame", script + several);
  // 128 times three frames of different sizes and bytes, 186 KiB at once: the Channel's 64 KiB
  // read buffer fills up with a frame cut in two, which it moves to the front before reading on.
  write(f, "script-repeat-compaction",
        script + record(frame(FrameKind::user, std::string(1000, 'a'), 5) +
                            frame(FrameKind::stats, std::string(333, 'b'), 6) +
                            frame(FrameKind::user, std::string(77, 'c'), 7),
                        0, false, 7));
  // A 1.5 MiB frame (48 bytes sent 32768 times), then a small one: the read buffer grows past
  // 1 MiB and is given back once the large frame is consumed.
  write(f, "script-repeat-large-frame",
        script + record(header(FrameKind::user, 48 << 15), 0) +
            record(std::string(48, 'L'), 0, false, 15) + record(hello, 0));
  write(f, "script-wide-record",
        script + record(frame(FrameKind::user, std::string(1000, 'w')) + hello, 0));

  const fs::path c = root / "codec";
  using prefork_fuzz::OtherVariantCodec;
  using prefork_fuzz::Sample;
  using prefork_fuzz::SampleVariantCodec;
  const Sample sample{0x01020304u, 0x0506, 0x07, -8, 0.5};
  write(c, "empty", "");
  write(c, "text", encoded<prefork::StringCodec>("hello"));
  write(c, "sample", encoded<prefork::PodCodec<Sample>>(sample));
  write(c, "bool-true", encoded<prefork::PodCodec<bool>>(true));
  write(c, "variant-int", encoded<SampleVariantCodec>(42));
  write(c, "variant-string", encoded<SampleVariantCodec>(std::string("message")));
  write(c, "variant-sample", encoded<SampleVariantCodec>(sample));
  write(c, "other-bool", encoded<OtherVariantCodec>(false));
  write(c, "other-u16", encoded<OtherVariantCodec>(std::uint16_t{0xbeef}));
  write(c, "other-second-string",
        encoded<OtherVariantCodec>(OtherVariantCodec::message_type(std::in_place_index<3>, "b")));

  const fs::path st = root / "store";
  using prefork::StoreOp;
  using prefork::StoreReply;
  using prefork::StoreRequest;
  write(st, "request-get", store_request + prefork::encode(StoreRequest{.op = StoreOp::get, .key = "k"}));
  write(st, "request-set-ttl",
        store_request + prefork::encode(StoreRequest{
                            .op = StoreOp::set, .key = "k", .value = std::string("v\0v", 3), .ttl_ms = 5}));
  write(st, "request-cas-expected",
        store_request + prefork::encode(StoreRequest{
                            .op = StoreOp::compare_and_set, .key = "k", .value = "b", .expected = "a"}));
  write(st, "request-increment-min",
        store_request + prefork::encode(StoreRequest{
                            .op = StoreOp::increment, .key = "n",
                            .delta = std::numeric_limits<std::int64_t>::min()}));
  write(st, "request-keys", store_request + prefork::encode(StoreRequest{
                                                .op = StoreOp::keys, .key = "user:", .limit = 2}));
  write(st, "reply-ok", store_reply + prefork::encode(StoreReply{}));
  write(st, "reply-value", store_reply + prefork::encode(StoreReply{.value = "value"}));
  write(st, "reply-keys", store_reply + prefork::encode(StoreReply{.keys = {"a", "", "b"}}));
  write(st, "reply-full", store_reply + prefork::encode(StoreReply{
                                            .error = prefork::store_errc::full,
                                            .message = "store full: 512 of 512 bytes used"}));

  prefork::MemoryStore<> store;
  (void)store.set("alpha", "1");
  (void)store.set(std::string("b\0", 2), std::string(40, 'v'), std::chrono::hours(1));
  (void)store.set("", "empty key");
  const std::string snap = snapshot_of(store, root / "store.scratch");
  write(st, "snapshot-three", store_snapshot + snap);
  write(st, "snapshot-empty", store_snapshot + snapshot_of(prefork::MemoryStore<>{}, root / "store.scratch"));
  // The checksum is recomputed by the target in this mode: a damaged length reaches the parser.
  std::string damaged = snap;
  damaged[12] = static_cast<char>(0x7f);
  write(st, "snapshot-fixed-crc-bad-length", store_snapshot_fixed_crc + damaged);
  write(st, "snapshot-fixed-crc-valid", store_snapshot_fixed_crc + snap);

  write(st, "script-counter-ttl",
        store_script + step(0, {.op = StoreOp::increment, .key = "hits", .delta = 1, .ttl_ms = 10}) +
            step(5, {.op = StoreOp::increment, .key = "hits", .delta = 1, .ttl_ms = 10}) +
            step(5, {.op = StoreOp::get, .key = "hits"}) +
            step(0, {.op = StoreOp::increment, .key = "hits", .delta = -3}));
  write(st, "script-fill-and-expire",
        store_script + step(0, {.op = StoreOp::set, .key = "a", .value = std::string(60, 'a'), .ttl_ms = 3}) +
            step(0, {.op = StoreOp::set, .key = "b", .value = std::string(60, 'b')}) +
            step(0, {.op = StoreOp::set, .key = "c", .value = std::string(60, 'c')}) +
            step(0, {.op = StoreOp::set, .key = "d", .value = std::string(60, 'd')}) +
            step(3, {.op = StoreOp::set, .key = "d", .value = std::string(60, 'd')}) +
            step(0, {.op = StoreOp::keys, .key = ""}));
  write(st, "script-cas-lock",
        store_script + step(0, {.op = StoreOp::compare_and_set, .key = "lock", .value = "me", .ttl_ms = 2}) +
            step(1, {.op = StoreOp::compare_and_set, .key = "lock", .value = "you"}) +
            step(1, {.op = StoreOp::compare_and_set, .key = "lock", .value = "you"}) +
            step(0, {.op = StoreOp::compare_and_set, .key = "lock", .value = "x", .expected = "you"}) +
            step(0, {.op = StoreOp::erase, .key = "lock"}));

  // Control requests: what `ctl` sends, every scalar type and escape, and a near miss per
  // rejection (control.fuzz.cpp also quotes the same bytes).
  const fs::path ctl = root / "control";
  write(ctl, "status", R"({"command":"status"})");
  write(ctl, "scale", R"({"command":"scale","workers":3})");
  write(ctl, "scalars", " {\"s\":\"x\", \"n\":-1.5e+3, \"t\":true, \"f\":false, \"z\":null}\r\n");
  write(ctl, "escapes", R"({"e":"\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00"})");
  write(ctl, "utf8", "{\"caf\xc3\xa9\":\"\xe2\x82\xac \xf0\x9f\x98\x80\"}");
  write(ctl, "empty-object", "{}");
  std::string many = "{";
  for (int i = 0; i < 65; ++i) many += (i ? ",\"" : "\"") + std::to_string(i) + "\":" + std::to_string(i);
  write(ctl, "65-fields", many + "}");
  write(ctl, "nested", R"({"command":"scale","workers":[3]})");
  write(ctl, "duplicate", R"({"command":"a","command":"b"})");
  write(ctl, "trailing", R"({"command":"stop"} {})");
  write(ctl, "lone-surrogate", R"({"k":"\ud800x"})");
  write(ctl, "invalid-utf8", "{\"k\":\"\xc0\xaf \xed\xa0\x80 \xff\"}");
  write(ctl, "bad-number", R"({"n":01.e})");
  return 0;
}
