// Seed experiment: one HTTP server with simulated CPU work (1e7 loop).
// The seed's server.js as measured in tests/bench/RESULTS.md. One change: an optional HOST (unset:
// all interfaces, as in the seed) so that the benchmark binds to 127.0.0.1 only.
const http = require('http');
const pid = process.pid;
const work = Number(process.env.WORK ?? 1e7);
const port = Number(process.env.PORT ?? 8080);
const host = process.env.HOST || undefined;
let usersCount;
http.createServer((req, res) => {
  for (let i = 0; i < work; i++); // simulate CPU work
  res.end(`Handled by process ${pid}\nUsers: ${usersCount}`);
}).listen(port, host, () => { if (!process.env.QUIET) console.log(`Started process ${pid}`); });
process.on('message', msg => { if (msg && msg.usersCount) usersCount = msg.usersCount; });
if (process.env.CRASH_MS) setTimeout(() => process.exit(1), Math.random() * Number(process.env.CRASH_MS));
