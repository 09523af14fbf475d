// The master's signals (Options::handle_signals), written against Master's public API only, as
// the control service is: each one calls the method its control command calls. TERM, INT and
// QUIT stop gracefully, USR2 and HUP restart the workers one at a time, USR1 upgrades the
// master, TTIN and TTOU add and remove a worker (nginx's and gunicorn's conventions).
#ifndef PREFORK_MASTER_SIGNALS_HPP
#define PREFORK_MASTER_SIGNALS_HPP

#include <signal.h>
#include <sys/signalfd.h>

#include <prefork/version.hpp>
#include <prefork/event_loop.hpp>

namespace prefork::detail {

template <class Master>
void handle_signals(Master& master) {
  auto on = [&master](int signo, void (*act)(Master&)) {
    master.loop().on_signal(signo, [&master, act](const signalfd_siginfo&) { act(master); });
  };
  on(SIGTERM, [](Master& m) { m.shutdown(); });
  on(SIGINT, [](Master& m) { m.shutdown(); });
  on(SIGQUIT, [](Master& m) { m.shutdown(); });
  on(SIGUSR2, [](Master& m) { m.reload(); });
  on(SIGHUP, [](Master& m) { m.reload(); });
  on(SIGUSR1, [](Master& m) { m.upgrade(); });
  on(SIGTTIN, [](Master& m) { m.scale(m.workers_wanted() + 1); });
  on(SIGTTOU, [](Master& m) {
    if (m.workers_wanted() > 1) m.scale(m.workers_wanted() - 1);
  });
}

}  // namespace prefork::detail

#endif  // PREFORK_MASTER_SIGNALS_HPP
