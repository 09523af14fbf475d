// Restart policies: each time a worker process exits, the master asks its RestartPolicy whether
// to fork a replacement into the dead worker's slot, after what delay, or whether the slot is in
// a crash loop and should be given up. Policies are plain values; the master owns one.
#ifndef PREFORK_RESTART_HPP
#define PREFORK_RESTART_HPP

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <concepts>
#include <cstddef>
#include <limits>
#include <stdexcept>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <prefork/version.hpp>

#include "prefork/options.hpp"

namespace prefork {

/// What the master does with a slot whose worker just exited.
struct RestartDecision {
  enum class Action {
    none,     ///< leave the slot empty
    restart,  ///< fork a replacement into the slot after `delay`
    give_up,  ///< crash loop: the master marks the slot errored, raises an event and stays up
  } action = Action::none;
  /// For Action::restart: how long the master waits before forking. Ignored otherwise.
  std::chrono::milliseconds delay{0};

  static constexpr RestartDecision restart_now() noexcept { return {Action::restart, {}}; }
  static constexpr RestartDecision restart_after(std::chrono::milliseconds d) noexcept {
    return {Action::restart, d};
  }
  static constexpr RestartDecision no_restart() noexcept { return {Action::none, {}}; }
  static constexpr RestartDecision give_up_slot() noexcept { return {Action::give_up, {}}; }

  bool operator==(const RestartDecision&) const = default;
};

/// `p.on_exit(slot, exit)` decides, in the master, what happens to `slot` now that its worker
/// has exited as `exit` describes. Called once per exit, from the master's event loop, after the
/// process has been reaped; it may keep per-slot state. A replacement takes the dead worker's
/// slot, so slots (0..workers-1) are stable across restarts while worker ids are not.
template <class P>
concept DecidesRestart = requires(P& p, std::size_t slot, const ExitInfo& e) {
  { p.on_exit(slot, e) } -> std::same_as<RestartDecision>;
};

/// A restart policy: decides restarts, and can be moved into the Cluster that owns it.
///
/// Optional hook, detected with `if constexpr (requires { p.on_listening(slot); })`:
/// `p.on_listening(slot)` is called in the master when the worker in `slot` reaches
/// 'listening', for policies that judge health by readiness rather than by uptime. Its return
/// value is ignored. None of the built-ins needs it: ExitInfo already carries `uptime` and
/// `reached_listening`.
template <class P>
concept RestartPolicy = DecidesRestart<P> && std::move_constructible<P>;

/// Restart a worker that crashed: one that was not stopped on purpose and exited with a non-zero
/// code or was killed by a signal. This is the rule the Node docs' cluster example applies by
/// hand (`if (!worker.exitedAfterDisconnect && code !== 0) cluster.fork()`): a signal death
/// reports `code === null` there, and `null !== 0`, so it counts as a crash too.
/// A clean exit(0) is taken as the worker's own decision to stop and is not undone.
struct RestartOnCrash {
  RestartDecision on_exit(std::size_t, const ExitInfo& e) const noexcept {
    if (!e.exited_after_disconnect && e.crashed()) return RestartDecision::restart_now();
    return RestartDecision::no_restart();
  }
};
static_assert(RestartPolicy<RestartOnCrash>);

/// Restart every worker that was not stopped on purpose, exit(0) included (PM2's default
/// autorestart). A planned stop (disconnect(), kill(), shutdown, rolling restart) is never
/// undone by the policy: the master refills those slots itself when it means to.
struct RestartAlways {
  RestartDecision on_exit(std::size_t, const ExitInfo& e) const noexcept {
    if (e.exited_after_disconnect) return RestartDecision::no_restart();
    return RestartDecision::restart_now();
  }
};
static_assert(RestartPolicy<RestartAlways>);

/// Never replace a worker; the cluster shrinks as workers exit.
struct NeverRestart {
  RestartDecision on_exit(std::size_t, const ExitInfo&) const noexcept {
    return RestartDecision::no_restart();
  }
};
static_assert(RestartPolicy<NeverRestart>);

/// Tuning for Backoff. Aggregate: use designated initializers. Defaults follow PM2.
struct BackoffOptions {
  /// Delay before the first restart of a streak of quick exits (PM2's exp_backoff_restart_delay).
  std::chrono::milliseconds initial_delay{100};
  /// Each further quick exit multiplies the delay by this (PM2: 1.5). Finite, >= 1.
  double factor{1.5};
  /// The delay never grows past this (PM2: 15000 ms). >= initial_delay.
  std::chrono::milliseconds max_delay{15000};
  /// An exit after at least this much uptime ends the streak: restart at once (PM2 min_uptime).
  /// A worker the master killed at start_timeout never counts as healthy, however long it ran.
  std::chrono::milliseconds healthy_after{1000};
  /// An exit of a worker that had started (ExitInfo::reached_listening) and served something
  /// (ExitInfo::served: a connection or a request) ends the streak too, whatever its uptime:
  /// its start-up worked and it did work, so a worker killed or crashing afterwards is
  /// replaced at once, as Node and gunicorn do. Without this, workers SIGKILLed every half
  /// second under load (tests/bench/chaos.sh) were counted as a crash loop and their
  /// replacements held back for seconds, leaving one worker to take every reconnect. A worker
  /// that reached 'listening' and died before serving anything is judged by uptime: one that
  /// exits right after 'listening' every time is a crash loop (issue 13: `hello --crash-ms 1`
  /// forked 8,967 times in 5.5 s when 'listening' alone counted). false: judge by uptime
  /// alone, as PM2 does.
  bool started_is_healthy{true};
  /// Consecutive quick exits after which the slot is given up (PM2 max_restarts); 0: never.
  unsigned max_restarts{16};
};

/// Wraps a policy and spaces out the restarts it asks for when a slot keeps dying quickly,
/// giving the slot up when it is plainly in a crash loop — so a worker that cannot start (bad
/// config, database down, port taken) does not make the master fork as fast as it can reap.
///
/// Per exit in `slot`:
///  1. `Inner` decides first. If it says no restart (or gives up), that decision is returned and
///     the slot's streak resets to 0.
///  2. If the worker had started and served (reached 'listening' and took a connection or
///     counted a request, and `started_is_healthy`), or ran for at least `healthy_after` and
///     was not killed at start_timeout, the streak resets to 0 and the restart is immediate: a
///     worker that served and then crashed is replaced at once.
///  3. Otherwise it was a quick exit (e.g. a crash at start-up): the streak grows by one. If
///     `max_restarts != 0` and the streak exceeds it, the decision is give_up and the streak
///     resets. Else the restart waits `min(initial_delay * factor^(streak-1), max_delay)`,
///     rounded to the nearest millisecond: 100, 150, 225, 338, ... with the defaults.
/// If Inner asked for a delay of its own, the longer of the two delays wins.
///
/// Why a planned stop or a give-up resets the streak: it ends the chain of automatic restarts.
/// The next worker in that slot is one the master forked on purpose (a rolling restart, a new
/// binary, an operator reviving an errored slot) and deserves a fresh count — as `pm2 restart`
/// clears PM2's unstable_restarts. A streak that survived would let one quick crash of a fixed
/// deployment give the slot up again at once.
///
/// Anchors: PM2 restarts with exp_backoff_restart_delay growing ×1.5 up to 15 s, and resets it
/// after 30 s of uptime (https://pm2.io/docs/runtime/features/restart-strategies/); PM2 counts
/// exits under min_uptime (1 s) as unstable and marks the app 'errored' after max_restarts (16)
/// of them in a row; systemd gives a unit up after StartLimitBurst=5 starts within
/// StartLimitIntervalSec=10 s. The defaults here are PM2's min_uptime/max_restarts; PM2's
/// exponential backoff exactly is
/// `Backoff<RestartAlways>({.healthy_after = 30s, .started_is_healthy = false})`.
///
/// State is per slot: a vector of `unsigned`, grown on demand up to the highest slot that had a
/// quick exit. Not thread-safe; the master calls it from its event loop only.
template <RestartPolicy Inner = RestartOnCrash>
class Backoff {
 public:
  /// PM2's defaults around a default-constructed Inner. Not explicit, so a Backoff can be
  /// copy-list-initialized from `{}` (e.g. a default argument `Restart restart = {}`).
  Backoff() : Backoff(BackoffOptions{}) {}

  /// Throws std::invalid_argument naming the offending field when `options` is inconsistent:
  /// a negative duration, a factor that is not a finite number >= 1, or
  /// initial_delay > max_delay.
  explicit Backoff(BackoffOptions options, Inner inner = {})
      : options_(validate(options)), inner_(std::move(inner)) {}

  /// Runs in the master, once per exit in `slot`; see the class comment for the rules.
  /// Throws only what Inner::on_exit throws, or std::bad_alloc when growing the per-slot state.
  RestartDecision on_exit(std::size_t slot, const ExitInfo& e) {
    RestartDecision d = inner_.on_exit(slot, e);
    if (d.action != RestartDecision::Action::restart) {
      reset(slot);
      return d;
    }
    const bool served = e.reached_listening && e.served && options_.started_is_healthy;
    if (served || (e.uptime >= options_.healthy_after && !e.start_timed_out)) {
      reset(slot);
      return d;
    }
    unsigned& streak = streak_ref(slot);
    // Saturate: with max_restarts == 0 a slot may crash for ever, and wrapping to 0 would drop
    // a slot that has been failing for 2^32 exits back to initial_delay.
    if (streak != std::numeric_limits<unsigned>::max()) ++streak;
    if (options_.max_restarts != 0 && streak > options_.max_restarts) {
      streak = 0;
      return RestartDecision::give_up_slot();
    }
    d.delay = std::max(d.delay, delay_for(streak));
    return d;
  }

  /// Forgets the streak of quick exits in `slot` (in the master, e.g. before reviving a slot it
  /// gave up). Never throws.
  void reset(std::size_t slot) noexcept {
    if (slot < streaks_.size()) streaks_[slot] = 0;
  }

  /// Consecutive quick exits recorded for `slot` (0 for a slot never seen).
  unsigned streak(std::size_t slot) const noexcept {
    return slot < streaks_.size() ? streaks_[slot] : 0u;
  }

  const BackoffOptions& options() const noexcept { return options_; }
  Inner& inner() noexcept { return inner_; }
  const Inner& inner() const noexcept { return inner_; }

 private:
  static BackoffOptions validate(const BackoffOptions& o) {
    auto fail = [](const char* field, const std::string& requirement, const std::string& got) {
      throw std::invalid_argument(std::string("prefork: BackoffOptions.") + field + " must be " +
                                  requirement + ", got " + got);
    };
    auto ms = [](std::chrono::milliseconds d) { return std::to_string(d.count()) + "ms"; };
    if (o.initial_delay.count() < 0) fail("initial_delay", ">= 0", ms(o.initial_delay));
    if (o.max_delay.count() < 0) fail("max_delay", ">= 0", ms(o.max_delay));
    if (o.healthy_after.count() < 0) fail("healthy_after", ">= 0", ms(o.healthy_after));
    // `!(x >= 1)` also rejects NaN, which compares false with everything.
    if (!(o.factor >= 1) || !std::isfinite(o.factor)) {
      // Shortest round-trip form: "0.5", "nan", "-inf" rather than std::to_string's "0.500000".
      char buf[32];
      auto [end, ec] = std::to_chars(buf, buf + sizeof buf, o.factor);
      fail("factor", "a finite number >= 1", ec == std::errc{} ? std::string(buf, end) : "?");
    }
    if (o.initial_delay > o.max_delay) {
      fail("initial_delay", "<= max_delay (" + ms(o.max_delay) + ")", ms(o.initial_delay));
    }
    return o;
  }

  unsigned& streak_ref(std::size_t slot) {
    if (slot >= streaks_.size()) streaks_.resize(slot + 1, 0u);
    return streaks_[slot];
  }

  // initial * factor^(streak-1), capped at max_delay. With max_restarts == 0 the streak is
  // unbounded and factor^streak overflows to inf (1.5^1751 does), so the exponent is
  // capped before pow(): past `reach` the product exceeds max_delay anyway. The clamp after it
  // absorbs log()'s rounding and keeps the double below 2^63, where the conversion back to the
  // int64 count would be undefined. initial_delay == 0 returns early, as 0 * inf is NaN.
  std::chrono::milliseconds delay_for(unsigned streak) const noexcept {
    const double initial = static_cast<double>(options_.initial_delay.count());
    const double max = static_cast<double>(options_.max_delay.count());
    if (initial <= 0 || streak <= 1 || options_.factor == 1.0) return options_.initial_delay;
    const double reach = std::ceil(std::log(max / initial) / std::log(options_.factor));
    const double exponent = static_cast<double>(streak - 1);
    if (exponent > reach) return options_.max_delay;
    const double d = std::round(initial * std::pow(options_.factor, exponent));
    if (!(d < max)) return options_.max_delay;
    return std::chrono::milliseconds{static_cast<std::chrono::milliseconds::rep>(d)};
  }

  BackoffOptions options_;
  [[no_unique_address]] Inner inner_;
  std::vector<unsigned> streaks_;
};
static_assert(RestartPolicy<Backoff<>>);
static_assert(RestartPolicy<Backoff<RestartAlways>>);

}  // namespace prefork

#if defined(PREFORK_SEPARATE_COMPILATION)
// Cluster's default RestartPolicy, instantiated once in <prefork/impl/src.hpp>.
namespace prefork {
extern template class Backoff<RestartOnCrash>;
}  // namespace prefork
#endif

#endif  // PREFORK_RESTART_HPP
