// Separate compilation (detail/config.hpp): the master for Cluster's default policies, declared
// here as instantiated elsewhere and instantiated once, the whole class, in
// <prefork/impl/src.hpp>. master.hpp includes this file last, in that mode only.
#ifndef PREFORK_MASTER_INSTANTIATION_HPP
#define PREFORK_MASTER_INSTANTIATION_HPP

#include <prefork/version.hpp>
#include <prefork/balance/round_robin.hpp>
#include <prefork/master.hpp>
#include <prefork/restart.hpp>

#if defined(PREFORK_SEPARATE_COMPILATION)
namespace prefork {
namespace detail {
using DefaultMaster = Master<RoundRobin, Backoff<RestartOnCrash>, StringCodec>;
}  // namespace detail

// The whole class, private members too: with only its public members declared here, g++ -O2
// compiled the private ones they call, and the parts behind those, in every file that includes
// this (tests/bench/compile/server.cpp at -O2: about 10 s, against 8 s now). Spelled out: an
// explicit instantiation names a template-id, not an alias.
extern template class Master<RoundRobin, Backoff<RestartOnCrash>, StringCodec>;
}  // namespace prefork
#endif  // PREFORK_SEPARATE_COMPILATION

#endif  // PREFORK_MASTER_INSTANTIATION_HPP
