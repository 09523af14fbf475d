// prefork: Node's cluster model for C++ on Linux. One include for the whole public API.
#ifndef PREFORK_PREFORK_HPP
#define PREFORK_PREFORK_HPP

#include <prefork/version.hpp>
#include <prefork/balance/policy.hpp>
#include <prefork/balance/ip_hash.hpp>
#include <prefork/balance/least_connections.hpp>
#include <prefork/balance/pick_with.hpp>
#include <prefork/balance/reuse_port.hpp>
#include <prefork/balance/round_robin.hpp>
#include <prefork/balance/shared_accept.hpp>
#include <prefork/balance/sticky.hpp>
#include <prefork/channel.hpp>
#include <prefork/cluster.hpp>
#include <prefork/codec.hpp>
#include <prefork/connection.hpp>
#include <prefork/control.hpp>
#include <prefork/error.hpp>
#include <prefork/event_loop.hpp>
#include <prefork/log.hpp>
#include <prefork/master.hpp>
#include <prefork/options.hpp>
#include <prefork/request.hpp>
#include <prefork/restart.hpp>
#include <prefork/status.hpp>
#include <prefork/store.hpp>
#include <prefork/store_client.hpp>
#include <prefork/worker.hpp>
#include <prefork/worker_handle.hpp>

#endif  // PREFORK_PREFORK_HPP
