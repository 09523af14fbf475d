// Unit tests for prefork/server.hpp: it is the only prefork header this file includes, and it must
// not bring in the master, the control socket, the store's backend or systemd (the build of this
// file stops if it does); the Server concept accepts every shape of hook the worker calls and
// rejects a member named like a hook that the worker cannot call.
#include <prefork/server.hpp>

#if defined(PREFORK_MASTER_HPP) || defined(PREFORK_CLUSTER_HPP)
#error "prefork/server.hpp must not include the master (master.hpp, cluster.hpp)"
#endif
#if defined(PREFORK_DETAIL_CONTROL_HPP) || defined(PREFORK_CONTROL_HPP)
#error "prefork/server.hpp must not include the control socket (control.hpp, detail/control.hpp)"
#endif
#if defined(PREFORK_DETAIL_STORE_MEMORY_HPP) || defined(PREFORK_DETAIL_STORE_SNAPSHOT_HPP) || \
    defined(PREFORK_DETAIL_STORE_HOST_HPP) || defined(PREFORK_STORE_HPP)
#error "prefork/server.hpp must not include the store's backend (MemoryStore, snapshots, StoreHost)"
#endif
#if defined(PREFORK_DETAIL_SYSTEMD_HPP) || defined(PREFORK_DETAIL_UPGRADE_HPP)
#error "prefork/server.hpp must not include systemd or the upgrade (master-only)"
#endif

#include <catch2/catch.hpp>

#include <functional>
#include <string>
#include <vector>

namespace {

using prefork::Connection;
using prefork::PodCodec;
using prefork::Reply;
using prefork::StringCodec;
using prefork::WorkerContext;

struct Everything {
  explicit Everything(WorkerContext<>& ctx);
  void on_connection(Connection c);
  void on_message(const std::string& m);
  void on_request(const std::string& m, Reply<StringCodec> r);
  void on_drain();
  void on_listening();
};
struct Nothing {};
struct ByValue {
  void on_connection(Connection&& c);
  void on_message(std::string m);
  void on_request(std::string m, Reply<StringCodec> r);
};
struct Generic {
  void on_connection(auto c);
  void on_message(const auto& m);
  void on_request(const auto& m, auto r);
};
struct Overloaded {
  void on_message(const std::string& m);
  void on_message(int m);
};
struct Template {
  template <class M>
  void on_message(M&& m);
};
struct DataMembers {
  std::function<void(const std::string&)> on_message;
  std::function<void()> on_drain;
};
struct FromBase : Everything {
  using Everything::Everything;
};
struct Sealed final {
  void on_message(const std::string& m);
};
struct Pods {
  explicit Pods(WorkerContext<PodCodec<int>>& ctx);
  void on_message(int m);
};

struct ConnectionByFd { void on_connection(int fd); };
struct MutableMessage { void on_message(std::string& m); };
struct OverloadedWrongly {
  void on_message(std::string& m);
  void on_message(std::vector<int>& m);
};
struct TemplateWrongly {
  template <class C>
  void on_connection(C& c);  // an lvalue reference: the worker hands over an rvalue
};
struct ReplyMissing { std::string on_request(const std::string& m); };
struct DrainWithReason { void on_drain(int reason); };
struct ListeningWithAddresses { void on_listening(const std::vector<std::string>& a); };
struct PrivateHook {
 private:
  void on_drain();
};
struct SealedWrongly final { void on_drain(int reason); };
struct OtherCodecsContext { explicit OtherCodecsContext(WorkerContext<PodCodec<int>>& ctx); };

}  // namespace

TEST_CASE("The Server concept accepts hooks however they take what the worker passes", "[server]") {
  STATIC_REQUIRE(prefork::Server<Everything>);
  STATIC_REQUIRE(prefork::Server<Nothing>);
  STATIC_REQUIRE(prefork::Server<ByValue>);
  STATIC_REQUIRE(prefork::Server<Generic>);
  STATIC_REQUIRE(prefork::Server<Overloaded>);
  STATIC_REQUIRE(prefork::Server<Template>);
  STATIC_REQUIRE(prefork::Server<DataMembers>);
  STATIC_REQUIRE(prefork::Server<FromBase>);
  STATIC_REQUIRE(prefork::Server<Sealed>);
  STATIC_REQUIRE(prefork::Server<Pods, PodCodec<int>>);
}

TEST_CASE("The Server concept rejects a member named like a hook that the worker cannot call",
          "[server]") {
  STATIC_REQUIRE_FALSE(prefork::ConnectionHookFits<ConnectionByFd>);
  STATIC_REQUIRE_FALSE(prefork::MessageHookFits<MutableMessage>);
  STATIC_REQUIRE_FALSE(prefork::MessageHookFits<OverloadedWrongly>);
  STATIC_REQUIRE_FALSE(prefork::ConnectionHookFits<TemplateWrongly>);
  STATIC_REQUIRE_FALSE(prefork::RequestHookFits<ReplyMissing>);
  STATIC_REQUIRE_FALSE(prefork::DrainHookFits<DrainWithReason>);
  STATIC_REQUIRE_FALSE(prefork::ListeningHookFits<ListeningWithAddresses>);
  STATIC_REQUIRE_FALSE(prefork::DrainHookFits<PrivateHook>);
  STATIC_REQUIRE_FALSE(prefork::DrainHookFits<SealedWrongly>);
  for (bool accepted : {prefork::Server<ConnectionByFd>, prefork::Server<MutableMessage>,
                        prefork::Server<ReplyMissing>, prefork::Server<DrainWithReason>,
                        prefork::Server<ListeningWithAddresses>})
    CHECK_FALSE(accepted);
}

TEST_CASE("A Server must be built from the context of the cluster's codec or by default",
          "[server]") {
  STATIC_REQUIRE(prefork::BuildsInWorker<Everything>);
  STATIC_REQUIRE(prefork::BuildsInWorker<Nothing>);
  STATIC_REQUIRE(prefork::BuildsInWorker<OtherCodecsContext, PodCodec<int>>);
  STATIC_REQUIRE_FALSE(prefork::BuildsInWorker<OtherCodecsContext>);
  STATIC_REQUIRE_FALSE(prefork::BuildsInWorker<Everything, PodCodec<int>>);
}
