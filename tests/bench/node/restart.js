// Restart anchor: crash -> replacement worker 'listening' latency, and worker RSS.
// The anchor program behind the restart and RSS rows of tests/bench/RESULTS.md, unchanged (run it with node).
const cluster = require('cluster');
const http = require('http');
const ROUNDS = Number(process.env.ROUNDS ?? 20);
if (cluster.isPrimary) {
  const lat = []; let tExit = 0; let rounds = 0;
  cluster.on('exit', (w, code) => { tExit = process.hrtime.bigint(); if (rounds <= ROUNDS) cluster.fork(); });
  cluster.on('listening', (w) => {
    if (tExit) lat.push(Number(process.hrtime.bigint() - tExit) / 1e6);
    if (++rounds > ROUNDS) {
      lat.sort((a, b) => a - b);
      console.log(`crash->listening ms p50=${lat[lat.length/2|0].toFixed(1)} max=${lat[lat.length-1].toFixed(1)}`);
      const { execSync } = require('child_process');
      console.log('worker RSS kB', execSync(`ps -o rss= -p ${w.process.pid}`).toString().trim(), 'primary RSS kB', execSync(`ps -o rss= -p ${process.pid}`).toString().trim());
      w.kill(); return;
    }
    w.send('die');
  });
  cluster.fork();
} else {
  http.createServer((q, s) => s.end('ok')).listen(8082);
  process.on('message', () => process.exit(1));
}
