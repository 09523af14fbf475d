#include "prefork/detail/socket.hpp"

#include <catch2/catch.hpp>

#include "support/descriptors.hpp"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include "prefork/connection.hpp"

using prefork::UniqueFd;
using prefork::detail::listen_on;
using prefork::detail::local_address;
using prefork::detail::parse_address;
using prefork::detail::SocketAddress;

using prefork_test::count_open_fds;
using prefork_test::FdLeakCheck;

namespace {


std::uint16_t port_of(const SocketAddress& a) {
  if (a.family() == AF_INET) {
    sockaddr_in in;
    std::memcpy(&in, &a.storage, sizeof in);
    return ntohs(in.sin_port);
  }
  REQUIRE(a.family() == AF_INET6);
  sockaddr_in6 in6;
  std::memcpy(&in6, &a.storage, sizeof in6);
  return ntohs(in6.sin6_port);
}

bool parses(const std::string& spec) {
  SocketAddress a;
  return !parse_address(spec, a);
}

// A socket path unique to this process, removed again when the test ends.
struct TempSocketPath {
  std::string path = "/tmp/prefork-socket-test-" + std::to_string(::getpid()) + ".sock";
  TempSocketPath() { ::unlink(path.c_str()); }
  ~TempSocketPath() { ::unlink(path.c_str()); }
};

}  // namespace

TEST_CASE("parse_address accepts an IPv4 address with a port", "[socket]") {
  SocketAddress a;
  REQUIRE_FALSE(parse_address("127.0.0.1:0", a));
  CHECK(a.family() == AF_INET);
  CHECK(a.length == sizeof(sockaddr_in));
  CHECK(port_of(a) == 0);
  CHECK(prefork::detail::to_string(a) == "127.0.0.1:0");

  REQUIRE_FALSE(parse_address("10.1.2.3:65535", a));
  CHECK(port_of(a) == 65535);
  CHECK(prefork::detail::to_string(a) == "10.1.2.3:65535");
}

TEST_CASE("parse_address accepts a bracketed IPv6 address with a port", "[socket]") {
  SocketAddress a;
  REQUIRE_FALSE(parse_address("[::1]:8080", a));
  CHECK(a.family() == AF_INET6);
  CHECK(a.length == sizeof(sockaddr_in6));
  CHECK(port_of(a) == 8080);
  CHECK(prefork::detail::to_string(a) == "[::1]:8080");
}

TEST_CASE("parse_address reads a port without a host as every IPv4 interface", "[socket]") {
  SocketAddress a;
  REQUIRE_FALSE(parse_address(":80", a));
  CHECK(a.family() == AF_INET);
  CHECK(port_of(a) == 80);
  CHECK(prefork::detail::to_string(a) == "0.0.0.0:80");
}

TEST_CASE("parse_address accepts a unix socket path", "[socket]") {
  SocketAddress a;
  REQUIRE_FALSE(parse_address("unix:/tmp/x", a));
  CHECK(a.family() == AF_UNIX);
  CHECK(a.length == offsetof(sockaddr_un, sun_path) + std::strlen("/tmp/x") + 1);
  CHECK(prefork::detail::to_string(a) == "unix:/tmp/x");
}

TEST_CASE("parse_address takes a unix path up to the size of sun_path less its terminator",
          "[socket]") {
  constexpr std::size_t capacity = sizeof(sockaddr_un{}.sun_path);
  std::string longest = "unix:/" + std::string(capacity - 2, 'p');  // capacity - 1 characters
  SocketAddress a;
  REQUIRE_FALSE(parse_address(longest, a));
  CHECK(prefork::detail::to_string(a) == longest);

  std::string too_long = "unix:/" + std::string(capacity - 1, 'p');  // no room for the NUL
  CHECK(parse_address(too_long, a) == std::errc::invalid_argument);
  CHECK(parse_address("unix:/" + std::string(4096, 'p'), a) == std::errc::invalid_argument);
}

TEST_CASE("parse_address rejects addresses that are not HOST:PORT or unix:PATH", "[socket]") {
  const char* bad[] = {
      "",                // nothing
      "1.2.3.4",         // no port
      "1.2.3.4:",        // empty port
      "1.2.3.4:65536",   // port out of range
      "1.2.3.4:99999999999999999999",  // port overflows
      "1.2.3.4:-1",      // negative port
      "1.2.3.4:+80",     // sign
      "1.2.3.4: 80",     // space
      "1.2.3.4:80x",     // trailing garbage
      "1.2.3.4:0x50",    // hex
      "host:80",         // names are not resolved
      "localhost:80",    // not even this one
      "1.2.3:80",        // not a dotted quad
      "256.1.1.1:80",    // octet out of range
      "[::1:80",         // unclosed bracket
      "::1:80",          // IPv6 without brackets
      "[::1]",           // IPv6 without a port
      "[127.0.0.1]:80",  // IPv4 in brackets
      "[]:80",           // empty brackets
      "unix:",           // empty path
  };
  for (const char* spec : bad) {
    INFO("address: '" << spec << "'");
    SocketAddress a;
    CHECK(parse_address(spec, a) == std::errc::invalid_argument);
  }
}

TEST_CASE("parse_address leaves an empty address behind after a failure", "[socket]") {
  SocketAddress a;
  REQUIRE_FALSE(parse_address("127.0.0.1:80", a));
  REQUIRE(parse_address("host:80", a));
  CHECK(a.length == 0);
  CHECK(a.family() == AF_UNSPEC);
  CHECK(parses("127.0.0.1:80"));
}

TEST_CASE("listen_on binds port 0 and local_address reports the port the kernel chose",
          "[socket]") {
  const auto fds_before = count_open_fds();
  {
    UniqueFd fd = listen_on("127.0.0.1:0", 16);
    REQUIRE(fd);
    SocketAddress bound = local_address(fd.get());
    REQUIRE(bound.family() == AF_INET);
    CHECK(port_of(bound) != 0);
    CHECK(prefork::detail::to_string(bound) == "127.0.0.1:" + std::to_string(port_of(bound)));

    int flags = ::fcntl(fd.get(), F_GETFL);
    CHECK((flags & O_NONBLOCK) != 0);
    CHECK((::fcntl(fd.get(), F_GETFD) & FD_CLOEXEC) != 0);
    int listening = 0;
    socklen_t len = sizeof listening;
    REQUIRE(::getsockopt(fd.get(), SOL_SOCKET, SO_ACCEPTCONN, &listening, &len) == 0);
    CHECK(listening == 1);
  }
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("listen_on binds an IPv6 loopback address on port 0", "[socket]") {
  UniqueFd fd;
  try {
    fd = listen_on("[::1]:0", 16);
  } catch (const std::system_error& e) {
    if (e.code() == std::errc::address_family_not_supported ||
        e.code() == std::errc::address_not_available)
      WARN("no IPv6 loopback here: " << e.what());
    else
      throw;
    return;
  }
  SocketAddress bound = local_address(fd.get());
  REQUIRE(bound.family() == AF_INET6);
  CHECK(port_of(bound) != 0);
  CHECK(prefork::detail::to_string(bound) == "[::1]:" + std::to_string(port_of(bound)));
}

TEST_CASE("listen_on binds a unix socket path and local_address reports it", "[socket]") {
  TempSocketPath tmp;
  UniqueFd fd = listen_on("unix:" + tmp.path, 16);
  REQUIRE(fd);
  CHECK(prefork::detail::to_string(local_address(fd.get())) == "unix:" + tmp.path);
}

TEST_CASE("Binding an address twice throws a system_error naming bind and the address",
          "[socket]") {
  const auto fds_before = count_open_fds();
  {
    UniqueFd first = listen_on("127.0.0.1:0", 16);
    const std::string spec = "127.0.0.1:" + std::to_string(port_of(local_address(first.get())));
    try {
      (void)listen_on(spec, 16);
      FAIL("a second bind of " << spec << " succeeded");
    } catch (const std::system_error& e) {
      std::string what = e.what();
      INFO(what);
      CHECK(e.code() == std::errc::address_in_use);
      CHECK(what.find("bind " + spec) != std::string::npos);
      CHECK(what.find("Address already in use") != std::string::npos);
      CHECK(what.rfind("prefork: ", 0) == 0);
    }
  }
  // The socket of the failed attempt is closed.
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("Binding a unix path that exists throws and leaves the file alone", "[socket]") {
  TempSocketPath tmp;
  UniqueFd first = listen_on("unix:" + tmp.path, 16);
  try {
    (void)listen_on("unix:" + tmp.path, 16);
    FAIL("a second bind of " << tmp.path << " succeeded");
  } catch (const std::system_error& e) {
    INFO(e.what());
    CHECK(e.code() == std::errc::address_in_use);
    CHECK(std::string(e.what()).find("bind unix:" + tmp.path) != std::string::npos);
  }
  CHECK(std::filesystem::exists(tmp.path));
}

TEST_CASE("listen_on with reuse_port lets two sockets bind the same port", "[socket]") {
  using prefork::detail::ReusePortRole;
  for (auto role : {ReusePortRole::lead, ReusePortRole::join}) {
    UniqueFd first = listen_on("127.0.0.1:0", 16, role);
    const std::string spec = "127.0.0.1:" + std::to_string(port_of(local_address(first.get())));
    UniqueFd second = listen_on(spec, 16, ReusePortRole::join);
    CHECK(port_of(local_address(second.get())) == port_of(local_address(first.get())));
  }
}

TEST_CASE("A reuse-port lead socket refuses an address a SO_REUSEPORT socket holds", "[socket]") {
  using prefork::detail::ReusePortRole;
  const auto fds_before = count_open_fds();
  {
    UniqueFd other = listen_on("127.0.0.1:0", 16, ReusePortRole::join);  // another server's
    const std::string spec = "127.0.0.1:" + std::to_string(port_of(local_address(other.get())));
    for (auto role : {ReusePortRole::lead, ReusePortRole::none}) {
      try {
        (void)listen_on(spec, 16, role);
        FAIL("a second group leader bound " << spec);
      } catch (const std::system_error& e) {
        CHECK(e.code() == std::errc::address_in_use);
        CHECK(std::string(e.what()) == "prefork: bind " + spec + ": Address already in use");
      }
    }
  }
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("listen_on throws for a bad address and names the address in the message",
          "[socket]") {
  const auto fds_before = count_open_fds();
  for (const char* spec : {"host:80", "1.2.3.4:65536", "", "unix:"}) {
    INFO("address: '" << spec << "'");
    try {
      (void)listen_on(spec, 16);
      FAIL("listen_on accepted a bad address");
    } catch (const std::system_error& e) {
      std::string what = e.what();
      INFO(what);
      CHECK(e.code() == std::errc::invalid_argument);
      CHECK(what.find(std::string("'") + spec + "'") != std::string::npos);
    }
  }
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("A Connection owns its descriptor and prints the peer address", "[socket]") {
  const auto fds_before = count_open_fds();
  {
    UniqueFd listener = listen_on("127.0.0.1:0", 16);
    SocketAddress server = local_address(listener.get());

    UniqueFd client(::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0));
    REQUIRE(client);
    // A loopback connect completes from the listen backlog; no accept needed first.
    REQUIRE(::connect(client.get(), server.get(), server.length) == 0);
    SocketAddress client_address = local_address(client.get());

    SocketAddress peer;
    peer.length = sizeof peer.storage;
    UniqueFd accepted(::accept4(listener.get(), peer.get(), &peer.length,
                                SOCK_NONBLOCK | SOCK_CLOEXEC));
    REQUIRE(accepted);
    const int raw = accepted.get();

    prefork::Connection c(std::move(accepted), peer);
    CHECK(static_cast<bool>(c));
    CHECK(c.fd() == raw);
    CHECK(c.peer() == prefork::detail::to_string(client_address));
    CHECK(c.peer() == "127.0.0.1:" + std::to_string(port_of(client_address)));
    CHECK(c.peer_address().family() == AF_INET);

    UniqueFd taken = c.release();
    CHECK(taken.get() == raw);
    CHECK_FALSE(static_cast<bool>(c));
    CHECK(c.fd() == -1);
  }
  CHECK(count_open_fds() == fds_before);
}

TEST_CASE("A default Connection holds no descriptor", "[socket]") {
  prefork::Connection c;
  CHECK_FALSE(static_cast<bool>(c));
  CHECK(c.fd() == -1);
}

TEST_CASE("A Connection from an unnamed unix peer prints unix:", "[socket]") {
  int sv[2];
  REQUIRE(::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0);
  UniqueFd other(sv[1]);
  SocketAddress peer;
  peer.length = sizeof peer.storage;
  REQUIRE(::getpeername(sv[0], peer.get(), &peer.length) == 0);
  prefork::Connection c{UniqueFd(sv[0]), peer};
  CHECK(c.peer() == "unix:");
}

TEST_CASE("address_problem names the rule a listen address breaks and accepts host names",
          "[socket]") {
  using prefork::detail::address_problem;
  for (const char* ok : {"127.0.0.1:0", ":8080", "[::1]:80", "localhost:8080", "a-b.example:1",
                         "unix:/run/app.sock"})
    CHECK(address_problem(ok).empty());
  const std::string long_path = "unix:/" + std::string(107, 'p');  // 108 bytes
  CHECK(address_problem(long_path) == "the path is 108 bytes, longer than 107 (the size of a "
                                      "Unix socket address)");
  CHECK(address_problem("unix:/" + std::string(106, 'p')).empty());  // 107: the longest
  CHECK(address_problem("unix:") == "no path after 'unix:'");
  CHECK(address_problem("127.0.0.1").starts_with("no port"));
  CHECK(address_problem("h:65536") == "the port '65536' is not a number from 0 to 65535");
  CHECK(address_problem("1.2.3.999:80") == "'1.2.3.999' is not a numeric IPv4 address");
  CHECK(address_problem("[::g]:80") == "'::g' is not a numeric IPv6 address");
  CHECK(address_problem("::1:80") == "an IPv6 address goes in brackets: [::1]:80");
  CHECK(address_problem("-bad-:80").find("is neither a numeric address nor a host name") !=
        std::string::npos);
}

TEST_CASE("resolve_listen_address keeps numeric addresses and resolves localhost", "[socket]") {
  using prefork::detail::resolve_listen_address;
  CHECK(resolve_listen_address("127.0.0.1:0") == std::vector<std::string>{"127.0.0.1:0"});
  CHECK(resolve_listen_address("unix:/x.sock") == std::vector<std::string>{"unix:/x.sock"});
  std::vector<std::string> local = resolve_listen_address("localhost:8080");
  REQUIRE_FALSE(local.empty());
  for (auto& a : local) CHECK((a == "127.0.0.1:8080" || a == "[::1]:8080"));
  CHECK(prefork::detail::same_port_as("[::1]:0", "127.0.0.1:4321") == "[::1]:4321");
  CHECK(prefork::detail::same_port_as("[::1]:80", "127.0.0.1:4321") == "[::1]:80");
}
