// The master-hosted shared store: the Store concept, MemoryStore (the default backend, with
// TTLs, a size limit and crash-safe snapshots), its error codes, the request/reply wire
// format a worker uses to reach it over the channel, and apply(), the master's side of it.
#ifndef PREFORK_STORE_HPP
#define PREFORK_STORE_HPP

#include "prefork/version.hpp"
#include "prefork/detail/store_host.hpp"
#include "prefork/detail/store_snapshot.hpp"
#include "prefork/detail/store_wire.hpp"
#include "prefork/store/concept.hpp"
#include "prefork/store/error.hpp"
#include "prefork/store/memory_store.hpp"

#endif  // PREFORK_STORE_HPP
