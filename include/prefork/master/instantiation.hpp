// Separate compilation (detail/config.hpp): the master for Cluster's default policies, declared
// here as instantiated elsewhere and instantiated once in <prefork/impl/src.hpp>. master.hpp
// includes this file last, in that mode only.
#ifndef PREFORK_MASTER_INSTANTIATION_HPP
#define PREFORK_MASTER_INSTANTIATION_HPP

#include <prefork/version.hpp>
#include <prefork/balance/round_robin.hpp>
#include <prefork/master.hpp>
#include <prefork/restart.hpp>

#if defined(PREFORK_SEPARATE_COMPILATION)
// Its public members that do more than set a field, in one list: used there with INSTANTIATE =
// `template`, here with `extern template`. Not the whole class: an explicit instantiation of a
// class instantiates every member, also those a policy's kind never calls (the first-bytes
// peeking, for RoundRobin).
namespace prefork::detail {
using DefaultMaster = Master<RoundRobin, Backoff<RestartOnCrash>, StringCodec>;
}  // namespace prefork::detail
// Spelled out, not the alias: an explicit instantiation names a member through a template-id.
#define PREFORK_DETAIL_DEFAULT_MASTER Master<RoundRobin, Backoff<RestartOnCrash>, StringCodec>
#define PREFORK_DETAIL_DEFAULT_MASTER_MEMBERS(INSTANTIATE)                                     \
  INSTANTIATE void PREFORK_DETAIL_DEFAULT_MASTER::bind();                                      \
  INSTANTIATE detail::DefaultMaster::WorkerT* PREFORK_DETAIL_DEFAULT_MASTER::fork();           \
  INSTANTIATE std::vector<detail::DefaultMaster::WorkerT*>                                     \
      PREFORK_DETAIL_DEFAULT_MASTER::workers() const;                                          \
  INSTANTIATE detail::DefaultMaster::WorkerT* PREFORK_DETAIL_DEFAULT_MASTER::worker(unsigned)  \
      const;                                                                                   \
  INSTANTIATE std::error_code PREFORK_DETAIL_DEFAULT_MASTER::send(unsigned, const std::string&); \
  INSTANTIATE std::size_t PREFORK_DETAIL_DEFAULT_MASTER::broadcast(const std::string&);        \
  INSTANTIATE EventLoop::TimerId PREFORK_DETAIL_DEFAULT_MASTER::every(Clock::duration,         \
                                                                      std::function<void()>);  \
  INSTANTIATE EventLoop::TimerId PREFORK_DETAIL_DEFAULT_MASTER::after(Clock::duration,         \
                                                                      std::function<void()>);  \
  INSTANTIATE void PREFORK_DETAIL_DEFAULT_MASTER::shutdown(bool);                              \
  INSTANTIATE void PREFORK_DETAIL_DEFAULT_MASTER::reload();                                    \
  INSTANTIATE bool PREFORK_DETAIL_DEFAULT_MASTER::upgrade();                                   \
  INSTANTIATE void PREFORK_DETAIL_DEFAULT_MASTER::listen_control(const std::string&);          \
  INSTANTIATE ClusterStatus PREFORK_DETAIL_DEFAULT_MASTER::status() const;                     \
  INSTANTIATE void PREFORK_DETAIL_DEFAULT_MASTER::query_status(                                \
      std::function<void(const ClusterStatus&)>, Clock::duration);                             \
  INSTANTIATE std::error_code PREFORK_DETAIL_DEFAULT_MASTER::scale(std::size_t);               \
  INSTANTIATE int PREFORK_DETAIL_DEFAULT_MASTER::run();
namespace prefork {
PREFORK_DETAIL_DEFAULT_MASTER_MEMBERS(extern template)
}  // namespace prefork
#endif  // PREFORK_SEPARATE_COMPILATION

#endif  // PREFORK_MASTER_INSTANTIATION_HPP
