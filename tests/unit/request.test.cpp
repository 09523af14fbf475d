#include "prefork/request.hpp"

#include <catch2/catch.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "prefork/channel.hpp"
#include "prefork/codec.hpp"
#include "prefork/error.hpp"
#include "prefork/event_loop.hpp"

#include "support/loop.hpp"

// Request/response over a real channel pair in one process: one loop, the caller's side and
// the answering side wired the way WorkerContext and Master wire them.

using namespace std::chrono_literals;
using prefork::Channel;
using prefork::Clock;
using prefork::errc;
using prefork::EventLoop;
using prefork::Frame;
using prefork::FrameKind;
using prefork::Reply;
using prefork::StringCodec;

using prefork_test::run_until;

namespace {

struct Answer {
  std::error_code ec;
  std::string reply;
};

// `caller` sends requests; `answerer` answers them with `handler` (none: no handler).
struct Pair {
  using Handler = std::function<void(const std::string&, Reply<StringCodec>)>;

  EventLoop loop;
  std::unique_ptr<Channel> caller, answerer;
  std::shared_ptr<prefork::detail::ReplyLink> link = std::make_shared<prefork::detail::ReplyLink>();
  prefork::detail::Requests<StringCodec> outgoing{loop, false};
  Handler handler;
  std::vector<FrameKind> seen;  // what reached the caller's side

  Pair() {
    auto [a, b] = prefork::make_channel_pair();
    caller = std::make_unique<Channel>(loop, std::move(a));
    answerer = std::make_unique<Channel>(loop, std::move(b));
    link->channel = answerer.get();
    caller->on_frame([this](Frame&& f) {
      seen.push_back(f.kind);
      if (f.kind == FrameKind::reply) outgoing.on_reply(f.tag, f.payload);
      if (f.kind == FrameKind::failure) outgoing.on_failure(f.tag, f.payload);
    });
    caller->on_close([this](std::error_code) { outgoing.fail_all(errc::peer_gone); });
    answerer->on_frame([this](Frame&& f) {
      if (f.kind != FrameKind::request) return;
      prefork::detail::answer(link, StringCodec{}, f, static_cast<bool>(handler),
                              [this](const std::string& m, Reply<StringCodec> r) {
                                handler(m, std::move(r));
                              });
    });
  }

  std::optional<Answer>& ask(std::string m, std::optional<Answer>& out,
                             Clock::duration timeout = 20s) {
    outgoing.start(caller.get(), FrameKind::request, std::move(m),
                   [&out](std::error_code ec, const std::string& r) {
                     REQUIRE_FALSE(out.has_value());  // exactly once
                     out = Answer{ec, r};
                   },
                   timeout);
    return out;
  }
};

}  // namespace

TEST_CASE("A request gets its own reply, matched by correlation id, out of order",
          "[request]") {
  Pair p;
  std::vector<std::pair<std::string, Reply<StringCodec>>> held;
  p.handler = [&](const std::string& m, Reply<StringCodec> r) { held.emplace_back(m, r); };
  std::vector<std::optional<Answer>> answers(50);
  for (std::size_t i = 0; i < answers.size(); ++i) p.ask("n" + std::to_string(i), answers[i]);
  REQUIRE(run_until(p.loop, [&] { return held.size() == answers.size(); }));
  // Answered in reverse order: each callback still gets the answer to its own request.
  for (auto it = held.rbegin(); it != held.rend(); ++it) CHECK_FALSE(it->second(it->first + "!"));
  REQUIRE(run_until(p.loop, [&] { return p.outgoing.size() == 0; }));
  for (std::size_t i = 0; i < answers.size(); ++i) {
    REQUIRE(answers[i].has_value());
    CHECK_FALSE(answers[i]->ec);
    CHECK(answers[i]->reply == "n" + std::to_string(i) + "!");
  }
}

TEST_CASE("A request never answered fails with request_timeout and a late answer is dropped",
          "[request]") {
  Pair p;
  std::optional<Reply<StringCodec>> kept;
  p.handler = [&](const std::string&, Reply<StringCodec> r) { kept = r; };
  std::optional<Answer> a;
  p.ask("slow", a, 50ms);
  REQUIRE(run_until(p.loop, [&] { return a.has_value(); }));
  CHECK(a->ec == errc::request_timeout);
  CHECK(a->reply.empty());
  REQUIRE(kept.has_value());
  CHECK_FALSE((*kept)("too late"));  // sent; the caller no longer waits for it
  REQUIRE(run_until(p.loop, [&] { return p.seen.size() == 1; }));
  CHECK(p.seen[0] == FrameKind::reply);
  CHECK(p.outgoing.size() == 0);
}

TEST_CASE("A request whose handler drops its Reply fails at once with request_failed",
          "[request]") {
  Pair p;
  p.handler = [](const std::string&, Reply<StringCodec>) {};
  std::optional<Answer> a;
  p.ask("x", a);
  REQUIRE(run_until(p.loop, [&] { return a.has_value(); }));
  CHECK(a->ec == errc::request_failed);
}

TEST_CASE("Copies of a Reply share one answer: the first wins, the last copy dropped does not "
          "fail an answered request",
          "[request]") {
  Pair p;
  std::vector<Reply<StringCodec>> copies;
  p.handler = [&](const std::string&, Reply<StringCodec> r) {
    copies.push_back(r);
    copies.push_back(r);
  };
  std::optional<Answer> a;
  p.ask("x", a);
  REQUIRE(run_until(p.loop, [&] { return copies.size() == 2; }));
  CHECK_FALSE(copies[1]("first"));
  CHECK(copies[0].answered());
  CHECK_FALSE(copies[0]("second"));  // ignored
  copies.clear();
  REQUIRE(run_until(p.loop, [&] { return a.has_value(); }));
  CHECK_FALSE(a->ec);
  CHECK(a->reply == "first");
  // Nothing else was sent: no second reply, no failure from the dropped copies.
  p.loop.run_once(0);
  CHECK(p.seen == std::vector<FrameKind>{FrameKind::reply});
}

TEST_CASE("Reply::fail fails the request with request_failed", "[request]") {
  Pair p;
  p.handler = [](const std::string&, Reply<StringCodec> r) { r.fail(); };
  std::optional<Answer> a;
  p.ask("x", a);
  REQUIRE(run_until(p.loop, [&] { return a.has_value(); }));
  CHECK(a->ec == errc::request_failed);
}

TEST_CASE("A request to a side without a handler fails with no_handler", "[request]") {
  Pair p;
  std::optional<Answer> a;
  p.ask("x", a);
  REQUIRE(run_until(p.loop, [&] { return a.has_value(); }));
  CHECK(a->ec == errc::no_handler);
}

TEST_CASE("A request the answering side cannot decode fails with decode_failed", "[request]") {
  struct Pod {
    std::uint64_t n;
  };
  using Codec = prefork::PodCodec<Pod>;
  EventLoop loop;
  auto [a, b] = prefork::make_channel_pair();
  Channel caller(loop, std::move(a)), answerer(loop, std::move(b));
  auto link = std::make_shared<prefork::detail::ReplyLink>();
  link->channel = &answerer;
  prefork::detail::Requests<Codec> outgoing(loop, false);
  bool handled = false;
  answerer.on_frame([&](Frame&& f) {
    prefork::detail::answer(link, Codec{}, f, true,
                            [&](const Pod&, Reply<Codec>) { handled = true; });
  });
  caller.on_frame([&](Frame&& f) {
    if (f.kind == FrameKind::failure) outgoing.on_failure(f.tag, f.payload);
  });
  std::optional<std::error_code> ec;
  // Three bytes are no Pod: what a peer with another codec, or a hostile one, would send.
  outgoing.start(&caller, FrameKind::request, "abc",
                 [&](std::error_code e, const Pod&) { ec = e; }, 20s);
  REQUIRE(run_until(loop, [&] { return ec.has_value(); }));
  CHECK(*ec == errc::decode_failed);
  CHECK_FALSE(handled);
}

TEST_CASE("A reply the caller cannot decode fails the request with the codec's error",
          "[request]") {
  struct Pod {
    std::uint64_t n;
  };
  using Codec = prefork::PodCodec<Pod>;
  EventLoop loop;
  auto [a, b] = prefork::make_channel_pair();
  Channel caller(loop, std::move(a)), answerer(loop, std::move(b));
  prefork::detail::Requests<Codec> outgoing(loop, false);
  answerer.on_frame([&](Frame&& f) { answerer.send(FrameKind::reply, "abc", f.tag); });
  caller.on_frame([&](Frame&& f) { outgoing.on_reply(f.tag, f.payload); });
  std::optional<std::error_code> ec;
  outgoing.start(&caller, FrameKind::request, std::string(Codec{}.encode(Pod{7})),
                 [&](std::error_code e, const Pod&) { ec = e; }, 20s);
  REQUIRE(run_until(loop, [&] { return ec.has_value(); }));
  CHECK(*ec);
  CHECK(outgoing.size() == 0);
}

TEST_CASE("fail_all fails every pending request in the order sent, once", "[request]") {
  Pair p;
  std::vector<Reply<StringCodec>> held;
  p.handler = [&](const std::string&, Reply<StringCodec> r) { held.push_back(r); };
  std::vector<std::optional<Answer>> answers(5);
  std::vector<int> order;
  for (int i = 0; i < 5; ++i)
    p.outgoing.start(p.caller.get(), FrameKind::request, "x",
                     [&, i](std::error_code ec, const std::string&) {
                       order.push_back(i);
                       answers[static_cast<std::size_t>(i)] = Answer{ec, {}};
                     },
                     20s);
  REQUIRE(run_until(p.loop, [&] { return held.size() == 5; }));
  p.outgoing.fail_all(errc::peer_gone);
  CHECK(order == std::vector<int>{0, 1, 2, 3, 4});
  for (auto& a : answers) CHECK(a->ec == errc::peer_gone);
  // The answers that come now find nobody waiting.
  for (auto& r : held) r("late");
  REQUIRE(run_until(p.loop, [&] { return p.seen.size() == 5; }));
  CHECK(order.size() == 5);
}

TEST_CASE("A request on a closed channel fails with channel_closed, after request returns",
          "[request]") {
  Pair p;
  p.caller->close();
  bool returned = false;
  std::optional<std::error_code> ec;
  p.outgoing.start(p.caller.get(), FrameKind::request, "x",
                   [&](std::error_code e, const std::string&) {
                     CHECK(returned);
                     ec = e;
                   },
                   20s);
  returned = true;
  REQUIRE(run_until(p.loop, [&] { return ec.has_value(); }));
  CHECK(*ec == errc::channel_closed);
  std::optional<std::error_code> none;
  p.outgoing.start(nullptr, FrameKind::request, "x",
                   [&](std::error_code e, const std::string&) { none = e; }, 20s);
  REQUIRE(run_until(p.loop, [&] { return none.has_value(); }));
  CHECK(*none == errc::channel_closed);
}

TEST_CASE("A Reply that outlives its channel answers into nothing", "[request]") {
  Pair p;
  std::optional<Reply<StringCodec>> kept;
  p.handler = [&](const std::string&, Reply<StringCodec> r) { kept = r; };
  std::optional<Answer> a;
  p.ask("x", a);
  REQUIRE(run_until(p.loop, [&] { return kept.has_value(); }));
  p.link->channel = nullptr;  // what the owners do when the channel closes
  p.answerer.reset();
  CHECK((*kept)("answer") == errc::channel_closed);
  kept.reset();  // and dropping it sends nothing either
  REQUIRE(run_until(p.loop, [&] { return a.has_value(); }));
  CHECK(a->ec == errc::peer_gone);  // the caller's channel saw its peer close
}
