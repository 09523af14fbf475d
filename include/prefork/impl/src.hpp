// The one translation unit of separate compilation (detail/config.hpp): a program built with
// PREFORK_SEPARATE_COMPILATION compiles exactly one .cpp that includes this file, and gets here
// every definition the headers only declare in that mode. CMake and Meson build it for you.
#ifndef PREFORK_IMPL_SRC_HPP
#define PREFORK_IMPL_SRC_HPP

#include <prefork/prefork.hpp>

// Without PREFORK_SEPARATE_COMPILATION every definition is already inline in the headers, so
// this file adds nothing; a build that compiles it by mistake still links.
#if defined(PREFORK_SEPARATE_COMPILATION)

// The non-template definitions, one .ipp per header that has them.
#include <prefork/impl/channel.ipp>
#include <prefork/impl/event_loop.ipp>

namespace prefork {

// The explicit instantiation definitions matching the headers' extern template declarations:
// the default policies and codec of Cluster<Server>.
template class Backoff<RestartOnCrash>;
template class Reply<StringCodec>;
template class detail::Requests<StringCodec>;
template class Worker<StringCodec>;
template class WorkerContext<StringCodec>;
template void detail::emplace_master(std::optional<detail::DefaultMaster>&, Options,
                                     Backoff<RestartOnCrash>, detail::DefaultMaster::ChildMain);
template int detail::run_master(detail::DefaultMaster&);
template class Master<RoundRobin, Backoff<RestartOnCrash>, StringCodec>;

}  // namespace prefork

#endif  // PREFORK_SEPARATE_COMPILATION

#endif  // PREFORK_IMPL_SRC_HPP
