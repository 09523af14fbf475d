// Seed experiment: cluster of server.js, with restart-on-crash and SIGUSR2 rolling restart.
// The seed's cluster.js as measured in tests/bench/RESULTS.md, unchanged.
const cluster = require('cluster');
const os = require('os');
if (cluster.isPrimary) {
  const n = Number(process.env.WORKERS ?? os.cpus().length);
  for (let i = 0; i < n; i++) cluster.fork();
  cluster.on('exit', (worker, code) => {
    if (code !== 0 && !worker.exitedAfterDisconnect) cluster.fork();
  });
  process.on('SIGUSR2', () => {
    const workers = Object.values(cluster.workers);
    const restartWorker = (i) => {
      const worker = workers[i];
      if (!worker) { console.log('reload done'); return; }
      worker.on('exit', () => {
        if (!worker.exitedAfterDisconnect) return;
        cluster.fork().on('listening', () => restartWorker(i + 1));
      });
      worker.disconnect();
    };
    restartWorker(0);
  });
  console.log(`Master PID: ${process.pid}`);
} else {
  require('./server');
}
