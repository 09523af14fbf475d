#!/usr/bin/env bash
# Two prefork instances behind nginx, sharing sessions through Redis, on loopback: the
# README's "Beyond one machine" deployment, shrunk onto one host, and its check under load.
#
#   examples/deploy/run.sh [SESSIONS]   (default: build/examples/sessions, built with hiredis)
#     DURATION=10   seconds of wrk load;  KEEP=1   keep the temporary directory and its logs
#
# Starts, on free loopback ports and in one temporary directory: redis-server (no persistence),
# two `sessions --workers 2 --store redis` instances (A and B, same Redis, same key prefix) and
# nginx (2 workers, upstream A and B, retrying a failed request on the other instance; see
# nginx.conf.in). Then:
#   1. logs in through nginx and checks that the cookie is honoured by A and B directly and by
#      both through nginx;
#   2. runs `wrk GET /me` with the cookie through nginx and, twice during it, at the same
#      moment: a rolling restart of A (SIGUSR2, waiting for its "Reload done") and a SIGKILL to
#      one of B's workers (waiting for its replacement);
#   3. prints what wrk counted (requests, non-2xx, socket errors) and where nginx sent them,
#      and checks the session on A, B and nginx again;
#   4. kills Redis (A answers 503, both masters live on), starts it again on the same port and
#      checks that both instances reconnect by themselves and honour a new login.
# Failure is any non-2xx answer or socket error wrk counted (the restart and the kill must cost
# nothing: a request cut off by the SIGKILL, or sent on a kept-alive connection a draining worker
# closed, is retried by nginx on the other instance), any check above, or a deadline passed.
# Exit status 0 on success, 1 on failure, 2 on a missing tool. Every process it starts is
# stopped, by pid, on exit. Runs as root (CI) or as a user; about 20 s.
set -euo pipefail
export LC_ALL=C  # wrk's and the tools' output in the words parsed below

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
sessions=${1:-$root/build/examples/sessions}
duration=${DURATION:-10}
wrk_threads=2 wrk_connections=64

say() { printf 'deploy: %s\n' "$*"; }
die() { printf 'deploy: %s\n' "$*" >&2; exit 2; }
failures=0
fail() { printf 'deploy: FAIL: %s\n' "$*" >&2; failures=$((failures + 1)); }
# A failure after which nothing else makes sense.
fatal() { printf 'deploy: FAIL: %s\n' "$*" >&2; exit 1; }

[[ -x $sessions ]] || die "$sessions not found: build it first (cmake --preset release && cmake --build --preset release --target sessions)"
nginx_bin=${NGINX:-$(command -v nginx || true)}
[[ -z $nginx_bin && -x /usr/sbin/nginx ]] && nginx_bin=/usr/sbin/nginx  # sbin: not in a user's PATH
[[ -n $nginx_bin ]] || die "nginx is missing (tests/deps.sh --tests installs nginx)"
redis_bin=$(command -v redis-server || true)
[[ -z $redis_bin && -x /usr/bin/redis-server ]] && redis_bin=/usr/bin/redis-server
[[ -n $redis_bin ]] || die "redis-server is missing (tests/deps.sh --tests installs it)"
for tool in redis-cli wrk curl pgrep ss awk sed; do
  command -v "$tool" >/dev/null || die "$tool is missing (tests/deps.sh --tests installs it)"
done

tmp=$(mktemp -d "${TMPDIR:-/tmp}/prefork-deploy.XXXXXX")
started=()        # pids started here (masters, Redis, nginx, wrk), stopped in reverse on exit

# A zombie is not alive (kill -0 would say it is).
alive() {
  local s
  { read -r s <"/proc/$1/stat"; } 2>/dev/null || return 1
  s=${s##*) }
  [[ ${s:0:1} != Z ]]
}

# Polls every 20 ms until "$@" succeeds; fails after $deadline_s seconds (set by the caller).
deadline_s=10
wait_for() {
  local until_ms=$(($(now_ms) + deadline_s * 1000))
  until "$@"; do
    (($(now_ms) >= until_ms)) && return 1
    sleep 0.02
  done
}
now_ms() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }

# SIGTERM (a prefork master drains its workers; nginx and Redis stop), the pid's children too if
# they outlive it, SIGKILL after 10 s; then reaped.
stop() {
  local pid=$1 kids p
  if alive "$pid"; then
    kids=$(pgrep -P "$pid" || true)
    kill -TERM "$pid" 2>/dev/null || true
    # shellcheck disable=SC2086 # kids is a list of pids
    if ! deadline_s=10 wait_for gone "$pid" $kids; then
      say "pid $pid did not stop within 10 s of SIGTERM; SIGKILL"
      # shellcheck disable=SC2086
      kill -KILL "$pid" $kids 2>/dev/null || true
    fi
  fi
  wait "$pid" 2>/dev/null || true
  local kept=()
  for p in "${started[@]}"; do [[ $p == "$pid" ]] || kept+=("$p"); done
  started=("${kept[@]}")
}
gone() { local p; for p in "$@"; do alive "$p" && return 1; done; return 0; }

# shellcheck disable=SC2317 # run by the EXIT trap
cleanup() {
  local status=$? i
  for ((i = ${#started[@]} - 1; i >= 0; i--)); do stop "${started[i]}"; done
  if [[ ${KEEP:-0} == 1 || $status != 0 ]]; then
    say "logs kept in $tmp"
  else
    rm -rf "$tmp"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A port nothing listens on (below the ephemeral range, so no outgoing connection holds it).
# Another process may still take it first: the start_* functions then try another.
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 12000))
    [[ -z $(ss -Htln "sport = :$p") ]] && { echo "$p"; return; }
  done
}

log_has() { grep -q -- "$2" "$1" 2>/dev/null; }
count_in() { grep -c -- "$2" "$1" 2>/dev/null || true; }
show_log() { say "--- $1 (last 20 lines)"; tail -n 20 "$1" >&2 || true; }

# ---------------------------------------------------------------------------------------------
# Redis: in its own directory, no RDB or AOF, loopback only.

redis_port="" redis_pid=""
redis_up() { [[ $(redis-cli -h 127.0.0.1 -p "$redis_port" ping 2>/dev/null) == PONG ]]; }
start_redis_on() {
  redis_port=$1
  mkdir -p "$tmp/redis"
  : >"$tmp/redis.log"
  "$redis_bin" --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$tmp/redis" --logfile "$tmp/redis.log" --daemonize no &
  redis_pid=$!
  started+=("$redis_pid")
  deadline_s=10 wait_for redis_up_or_dead
  redis_up
}
redis_up_or_dead() { redis_up || ! alive "$redis_pid"; }
start_redis() {
  for _ in 1 2 3; do
    start_redis_on "$(free_port)" && return 0
    stop "$redis_pid"
    log_has "$tmp/redis.log" 'Address already in use' || { show_log "$tmp/redis.log"; return 1; }
  done
  return 1
}

# ---------------------------------------------------------------------------------------------
# Two sessions instances on ports the kernel picks; both use the same Redis and key prefix.

prefix="prefork-deploy-$$:"
declare -A pid port log
instance_ready() {
  local name=$1
  alive "${pid[$name]}" || return 0  # let the caller see it died
  port[$name]=$(sed -n 's/^Listening on .*:\([0-9][0-9]*\)$/\1/p' "${log[$name]}")
  [[ -n ${port[$name]} ]] && (($(count_in "${log[$name]}" '^Started process') >= 2))
}
start_instance() {
  local name=$1
  log[$name]=$tmp/sessions-$name.log
  : >"${log[$name]}"
  "$sessions" --host 127.0.0.1 --port 0 --workers 2 --store redis \
    --redis "127.0.0.1:$redis_port" --redis-prefix "$prefix" >"${log[$name]}" 2>&1 &
  pid[$name]=$!
  started+=("${pid[$name]}")
  if ! deadline_s=15 wait_for instance_ready "$name" || ! alive "${pid[$name]}"; then
    show_log "${log[$name]}"
    fatal "instance $name did not start"
  fi
}
workers_of() { pgrep -P "${pid[$1]}" | tr '\n' ' '; }

# ---------------------------------------------------------------------------------------------
# nginx in a temporary prefix.

nginx_port="" nginx_pid="" nginx_dir=$tmp/nginx
nginx_up_or_dead() {
  ! alive "$nginx_pid" ||
    [[ $(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://127.0.0.1:$nginx_port/me") == 401 ]]
}
start_nginx() {
  local user_line=""
  # As root nginx's workers would switch to `nobody`; run them as this user instead.
  if (($(id -u) == 0)); then user_line="user $(id -un) $(id -gn);"; fi
  for _ in 1 2 3; do
    rm -rf "$nginx_dir"
    mkdir -p "$nginx_dir"
    nginx_port=$(free_port)
    sed -e "s|@DIR@|$nginx_dir|g" -e "s|@PORT@|$nginx_port|g" -e "s|@USER@|$user_line|g" \
      -e "s|@PORT_A@|${port[A]}|g" -e "s|@PORT_B@|${port[B]}|g" \
      "$here/nginx.conf.in" >"$nginx_dir/nginx.conf"
    # -e: the error log before the configuration is read (the compiled-in one is /var/log's);
    # daemon off: the pid started here is nginx's master.
    "$nginx_bin" -e "$nginx_dir/error.log" -p "$nginx_dir" -c "$nginx_dir/nginx.conf" \
      >"$nginx_dir/stdout.log" 2>&1 &
    nginx_pid=$!
    started+=("$nginx_pid")
    deadline_s=10 wait_for nginx_up_or_dead
    alive "$nginx_pid" && nginx_up_or_dead && return 0
    stop "$nginx_pid"
    log_has "$nginx_dir/error.log" 'Address already in use' ||
      { show_log "$nginx_dir/error.log"; show_log "$nginx_dir/stdout.log"; return 1; }
  done
  return 1
}

# ---------------------------------------------------------------------------------------------
# HTTP checks.

# GET /me on port $1 with the session cookie: sets me_status, me_body, me_worker.
me_status="" me_body="" me_worker=""
get_me() {
  local out
  out=$(curl -s -i --max-time 5 -b "sid=$sid" "http://127.0.0.1:$1/me" | tr -d '\r') || true
  me_status=$(sed -n '1s/^HTTP\/[0-9.]* \([0-9]*\).*/\1/p' <<<"$out")
  me_worker=$(sed -n 's/^X-Worker-Pid: //p' <<<"$out")
  me_body=$(sed '1,/^$/d' <<<"$out")
}

# POST /login through nginx as $1: sets sid.
sid=""
login() {
  local head
  head=$(curl -s -D - -o /dev/null --max-time 5 -d "user=$1" "http://127.0.0.1:$nginx_port/login" |
    tr -d '\r') || true
  sid=$(sed -n 's/^Set-Cookie: sid=\([0-9a-f]*\);.*/\1/p' <<<"$head")
  [[ -n $sid ]] || fatal "POST /login through nginx: no session cookie; got: $(head -n 1 <<<"$head")"
}

instance_of() {  # the instance whose master is the parent of worker pid $1, or "?"
  local ppid
  ppid=$(awk '{print $4}' "/proc/$1/stat" 2>/dev/null || true)
  if [[ $ppid == "${pid[A]}" ]]; then echo A; elif [[ $ppid == "${pid[B]}" ]]; then echo B; else echo '?'; fi
}

# The session $sid of user $1 is honoured by A and B directly and, through nginx, by both.
check_session() {
  local user=$1 name seen=""
  for name in A B; do
    get_me "${port[$name]}"
    [[ $me_status == 200 && $me_body == "$user" ]] ||
      fail "GET /me on instance $name directly: $me_status '$me_body', expected 200 '$user'"
  done
  for _ in 1 2 3 4; do
    get_me "$nginx_port"
    [[ $me_status == 200 && $me_body == "$user" ]] ||
      fail "GET /me through nginx: $me_status '$me_body', expected 200 '$user'"
    [[ -n $me_worker ]] && seen+=" $(instance_of "$me_worker")"
  done
  [[ $seen == *A* && $seen == *B* ]] ||
    fail "4 requests through nginx did not reach both instances (went to:$seen)"
  say "session of $user honoured by A and B directly and through nginx (instances:$seen)"
}

# ---------------------------------------------------------------------------------------------
# The events under load.

# SIGUSR2 to A's master; returns once it printed one more "Reload done".
reload_a_start() {
  reloads_before=$(count_in "${log[A]}" '^Reload done')
  reload_sent=$(now_ms)
  kill -USR2 "${pid[A]}"
}
reloaded() {
  log_has "${log[A]}" '^Reload failed' && return 0
  (($(count_in "${log[A]}" '^Reload done') > reloads_before))
}
reload_a_wait() {
  deadline_s=15 wait_for reloaded || fatal "instance A: no 'Reload done' within 15 s of SIGUSR2"
  log_has "${log[A]}" '^Reload failed' && fatal "instance A: $(grep '^Reload failed' "${log[A]}" | tail -n 1)"
  say "  A: $(grep '^Reload done' "${log[A]}" | tail -n 1) (seen $(($(now_ms) - reload_sent)) ms after SIGUSR2)"
}

# SIGKILL to one of B's workers; returns once a replacement listens.
kill_b_start() {
  victim=$(pgrep -P "${pid[B]}" | head -n 1)
  [[ -n $victim ]] || fatal "instance B has no worker to kill"
  started_before=$(count_in "${log[B]}" '^Started process')
  kill_sent=$(now_ms)
  kill -KILL "$victim"
}
replaced() {
  log_has "${log[B]}" "^Worker $victim died" &&
    (($(count_in "${log[B]}" '^Started process') > started_before))
}
kill_b_wait() {
  deadline_s=10 wait_for replaced || fatal "instance B: worker $victim not replaced within 10 s of SIGKILL"
  say "  B: worker $victim SIGKILLed, replaced by $(grep '^Started process' "${log[B]}" | tail -n 1 |
    awk '{print $3}') (listening $(($(now_ms) - kill_sent)) ms after the kill)"
}

# ---------------------------------------------------------------------------------------------

say "sessions: $sessions"
start_redis || fatal "redis-server did not start"
say "redis $("$redis_bin" --version | sed -n 's/.* v=\([^ ]*\).*/\1/p') on 127.0.0.1:$redis_port (pid $redis_pid, no persistence), key prefix '$prefix'"
for name in A B; do
  start_instance "$name"
  log_has "${log[$name]}" 'redis store: connected' || true  # connects at the first operation
  say "instance $name: master ${pid[$name]} on 127.0.0.1:${port[$name]}, workers $(workers_of "$name")"
done
start_nginx || fatal "nginx did not start"
say "nginx $("$nginx_bin" -v 2>&1 | sed 's|.*/||') on 127.0.0.1:$nginx_port (pid $nginx_pid, 2 workers), upstream A and B"

login ann
say "POST /login through nginx: sid=${sid:0:8}..."
check_session ann
((failures == 0)) || fatal "the session is not shared; not starting the load"

say "load: wrk -t$wrk_threads -c$wrk_connections -d${duration}s GET /me with the cookie, through nginx"
wrk_out=$tmp/wrk.txt
wrk -t"$wrk_threads" -c"$wrk_connections" -d"${duration}s" --timeout 5s -H "Cookie: sid=$sid" \
  -H "X-Load: 1" "http://127.0.0.1:$nginx_port/me" >"$wrk_out" 2>&1 &
wrk_pid=$!
started+=("$wrk_pid")
load_start=$(now_ms)
# Pacing, not synchronisation: the events land while the load runs, each round at a fixed
# offset; the rounds themselves wait for what they caused.
rounds=2
for ((round = 1; round <= rounds; round++)); do
  at_ms=$((duration * 1000 * (2 * round - 1) / (2 * rounds + 1)))
  while (($(now_ms) - load_start < at_ms)); do sleep 0.05; done
  say "+$((($(now_ms) - load_start) / 100 * 100)) ms: rolling restart of A and SIGKILL to a worker of B, at once"
  reload_a_start
  kill_b_start
  reload_a_wait
  kill_b_wait
done
deadline_s=$((duration + 15)) wait_for gone "$wrk_pid" || fatal "wrk did not finish"
wait "$wrk_pid" || fatal "wrk failed: $(cat "$wrk_out")"

requests=$(awk '/requests in/ {print $1; exit}' "$wrk_out")
rate=$(awk '/^Requests\/sec:/ {printf "%d", $2}' "$wrk_out")
non2xx=$(awk -F': *' '/Non-2xx or 3xx responses/ {print $2}' "$wrk_out")
read -r e_connect e_read e_write e_timeout < <(
  awk '/Socket errors:/ {gsub(/,/, ""); print $4, $6, $8, $10; found = 1}
       END { if (!found) print 0, 0, 0, 0 }' "$wrk_out")
non2xx=${non2xx:-0}
failed=$((non2xx + e_connect + e_read + e_write + e_timeout))
[[ -n $requests ]] || fatal "could not read wrk's output: $(cat "$wrk_out")"
say "wrk: $requests requests in ${duration} s ($rate/s); non-2xx $non2xx; socket errors: connect $e_connect, read $e_read, write $e_write, timeout $e_timeout"
((requests > 0)) || fail "wrk made no request"
((failed == 0)) || fail "$failed requests failed under load"

check_session ann

# ---------------------------------------------------------------------------------------------
# Redis goes away and comes back: the instances fail cleanly and reconnect by themselves.

# Reaped at once, inside the redirection: bash reports a job killed by a signal on stderr.
{ kill -KILL "$redis_pid" && wait "$redis_pid"; } 2>/dev/null || true
stop "$redis_pid"
get_me "${port[A]}"
say "Redis SIGKILLed: GET /me on A: $me_status '$me_body'"
[[ $me_status == 503 ]] || fail "GET /me on A without Redis: $me_status, expected 503"
for name in A B; do alive "${pid[$name]}" || fatal "instance $name's master died with Redis"; done
start_redis_on "$redis_port" || fatal "redis-server did not start again on port $redis_port"
back_sent=$(now_ms)
# The sessions went with the old Redis (no persistence), so a reconnected instance says 401.
instance_back() { get_me "${port[$1]}"; [[ $me_status == 401 ]]; }
for name in A B; do
  deadline_s=5 wait_for instance_back "$name" ||
    fatal "instance $name did not reconnect to Redis within 5 s (last answer $me_status '$me_body')"
done
say "Redis restarted on port $redis_port: A and B answer again after $(($(now_ms) - back_sent)) ms (401: the old sessions went with the old Redis)"
login bob
check_session bob

# ---------------------------------------------------------------------------------------------
# Where nginx sent the load (its access log is written out when it stops).

# SIGQUIT: a graceful stop, which writes out the buffered access log.
kill -QUIT "$nginx_pid"
deadline_s=10 wait_for gone "$nginx_pid" || fail "nginx did not stop within 10 s of SIGQUIT"
stop "$nginx_pid"
# Lines: status|addr[, addr]|status[, status]; the last address tried is the one that answered.
awk -F'|' -v a="127.0.0.1:${port[A]}" -v b="127.0.0.1:${port[B]}" '
  { total++
    if ($1 == 499) closed++; else if ($1 !~ /^2/) bad++
    n = split($2, tried, ", ")
    if (n > 1) { retried++; if (tried[1] == a) from_a++; else if (tried[1] == b) from_b++ }
    if (tried[n] == a) by_a++; else if (tried[n] == b) by_b++ }
  END { printf "deploy: nginx: %d requests of the load logged, answered by A %d, by B %d; " \
               "retried on the other instance %d (A to B %d, B to A %d); non-2xx %d; " \
               "cut off by wrk stopping (499) %d\n",
               total, by_a, by_b, retried, from_a, from_b, bad, closed }' "$nginx_dir/load.log"
# Why nginx retried: what it saw on the upstream connection that failed.
if [[ -s $nginx_dir/error.log ]]; then
  sed -n 's/.*\*[0-9]* \(.*\) while reading response header from upstream.*/\1/p' \
    "$nginx_dir/error.log" | sort | uniq -c | sort -rn |
    awk '{ n = $1; sub(/^ *[0-9]+ /, ""); printf "deploy:   %d x %s\n", n, $0 }'
fi

# Both instances stop gracefully (SIGTERM: drain, exit 0), so that a sanitizer build also
# reports leaks before the logs are read.
for name in A B; do
  if ! alive "${pid[$name]}"; then
    fail "instance $name's master died"
    continue
  fi
  kill -TERM "${pid[$name]}"
  deadline_s=15 wait_for gone "${pid[$name]}" || fail "instance $name did not stop within 15 s of SIGTERM"
  status=0
  wait "${pid[$name]}" || status=$?
  ((status == 0)) || fail "instance $name exited with status $status after SIGTERM"
  stop "${pid[$name]}"
  # A sanitizer build (cmake --preset asan) reports on the instance's stderr and carries on.
  if grep -q -E 'ERROR: (Address|Leak)Sanitizer|runtime error:' "${log[$name]}"; then
    fail "sanitizer report in instance $name's log"
    grep -E -A 20 'ERROR: (Address|Leak)Sanitizer|runtime error:' "${log[$name]}" | head -n 40 >&2
  fi
done
if ((failures)); then
  say "FAILED ($failures checks); served $requests, failed $failed"
  exit 1
fi
say "PASS: served $requests, failed $failed"
