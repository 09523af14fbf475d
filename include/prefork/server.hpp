// What a file that only implements a Server includes: WorkerContext, Connection, EventLoop, the
// codecs, requests and the store client, and the Server concept Cluster checks. It compiles none
// of the master, the control socket, the store's backend (MemoryStore, snapshots) or systemd.
#ifndef PREFORK_SERVER_HPP
#define PREFORK_SERVER_HPP

#include <concepts>
#include <type_traits>
#include <utility>

#include <prefork/version.hpp>
#include <prefork/codec.hpp>
#include <prefork/connection.hpp>
#include <prefork/error.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/log.hpp>
#include <prefork/request.hpp>
#include <prefork/store_client.hpp>
#include <prefork/worker.hpp>

namespace prefork {

// A Server is built in each worker after it starts, from WorkerContext<Codec>& (or by default),
// and the worker calls the hooks it has (WorkerContext::serve detects them):
//   on_connection(Connection)                      an accepted connection, non-blocking
//   on_message(const message_type&)                a message from the master
//   on_request(const message_type&, Reply<Codec>)  a request from the master: answer the Reply
//   on_drain()                                     stop taking work and finish what is open
//   on_listening()                                 the worker has its listeners
// Every hook is optional. But a member named like a hook must be callable the way the worker
// calls it: the worker's detection asks "does this call compile?", which cannot tell a wrong
// signature from no member, so on_message(std::string&) was never called and on_connection(int)
// was taken for "no on_connection": the worker exited at its first listener, a crash loop.
//
// "Named like a hook" is decided by name lookup, not by a call or a member pointer: a member
// pointer (&S::on_message) cannot be formed for an overload set or a member template, and a
// call with a probe argument cannot tell "absent" from "ambiguous". A class derived from both S
// and a probe that declares the same name makes that name ambiguous exactly when S, or a base
// of S, declares it, as anything: a function, an overload set, a template, a data member (a
// std::function), public or not. A final S cannot be derived from: there the member pointer is
// the test, which finds a single non-template member; an overload set or a template in a final
// Server stays unchecked, as before.
namespace detail::server_hooks {

struct ConnectionProbe { void on_connection(); };
struct MessageProbe { void on_message(); };
struct RequestProbe { void on_request(); };
struct DrainProbe { void on_drain(); };
struct ListeningProbe { void on_listening(); };

// Never built: only name lookup into it.
template <class S, class Probe>
struct WithProbe : S, Probe {};

template <class S>
concept Derivable = std::is_class_v<S> && !std::is_final_v<S>;

template <class S>
concept DeclaresOnConnection =
    (Derivable<S> && !requires { &WithProbe<S, ConnectionProbe>::on_connection; }) ||
    requires { &S::on_connection; };
template <class S>
concept DeclaresOnMessage =
    (Derivable<S> && !requires { &WithProbe<S, MessageProbe>::on_message; }) ||
    requires { &S::on_message; };
template <class S>
concept DeclaresOnRequest =
    (Derivable<S> && !requires { &WithProbe<S, RequestProbe>::on_request; }) ||
    requires { &S::on_request; };
template <class S>
concept DeclaresOnDrain =
    (Derivable<S> && !requires { &WithProbe<S, DrainProbe>::on_drain; }) ||
    requires { &S::on_drain; };
template <class S>
concept DeclaresOnListening =
    (Derivable<S> && !requires { &WithProbe<S, ListeningProbe>::on_listening; }) ||
    requires { &S::on_listening; };

}  // namespace detail::server_hooks

/// Built in the worker the way WorkerContext::serve builds it: from the cluster's
/// WorkerContext<Codec>& if it can be, else by default.
template <class S, class Codec = StringCodec>
concept BuildsInWorker =
    std::constructible_from<S, WorkerContext<Codec>&> || std::constructible_from<S>;

// Each hook requirement holds when the hook is absent, or callable with exactly the expression
// WorkerContext::serve uses to detect it (so a hook this accepts is a hook the worker calls).
template <class S>
concept ConnectionHookFits =
    !detail::server_hooks::DeclaresOnConnection<S> ||
    requires(S& s, Connection c) { s.on_connection(std::move(c)); };

template <class S, class Codec = StringCodec>
concept MessageHookFits =
    !detail::server_hooks::DeclaresOnMessage<S> ||
    requires(S& s, const typename Codec::message_type& m) { s.on_message(m); };

template <class S, class Codec = StringCodec>
concept RequestHookFits =
    !detail::server_hooks::DeclaresOnRequest<S> ||
    requires(S& s, const typename Codec::message_type& m, Reply<Codec> r) {
      s.on_request(m, std::move(r));
    };

template <class S>
concept DrainHookFits = !detail::server_hooks::DeclaresOnDrain<S> || requires(S& s) {
  s.on_drain();
};

template <class S>
concept ListeningHookFits = !detail::server_hooks::DeclaresOnListening<S> || requires(S& s) {
  s.on_listening();
};

/// What Cluster<S, Balance, Restart, Codec> accepts as its Server.
template <class S, class Codec = StringCodec>
concept Server = BuildsInWorker<S, Codec> && ConnectionHookFits<S> &&
                 MessageHookFits<S, Codec> && RequestHookFits<S, Codec> && DrainHookFits<S> &&
                 ListeningHookFits<S>;

namespace detail {

// Cluster's check: one sentence per requirement, naming the hook and how it is called, instead
// of a concept's "constraints not satisfied" and a list of expressions.
template <class S, class Codec>
constexpr bool check_server() {
  static_assert(BuildsInWorker<S, Codec>,
                "prefork: a Server must be constructible from prefork::WorkerContext<Codec>& "
                "(Codec: the Cluster's MessageCodec, StringCodec by default) or by default");
  static_assert(ConnectionHookFits<S>,
                "prefork: Server::on_connection must be callable as "
                "on_connection(prefork::Connection)");
  static_assert(MessageHookFits<S, Codec>,
                "prefork: Server::on_message must be callable as "
                "on_message(const message_type&) (the Cluster Codec's message_type)");
  static_assert(RequestHookFits<S, Codec>,
                "prefork: Server::on_request must be callable as "
                "on_request(const message_type&, prefork::Reply<Codec>)");
  static_assert(DrainHookFits<S>, "prefork: Server::on_drain must be callable as on_drain()");
  static_assert(ListeningHookFits<S>,
                "prefork: Server::on_listening must be callable as on_listening()");
  return Server<S, Codec>;
}

}  // namespace detail
}  // namespace prefork

#endif  // PREFORK_SERVER_HPP
