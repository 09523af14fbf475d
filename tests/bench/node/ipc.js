// IPC anchor: primary->worker one-way throughput and ping-pong round-trip latency over cluster IPC.
// The anchor program behind the IPC row of tests/bench/RESULTS.md, unchanged; tests/bench/ipc.sh runs it.
const cluster = require('cluster');
const N = Number(process.env.N ?? 200000), RTT = Number(process.env.RTT ?? 20000);
if (cluster.isPrimary) {
  const w = cluster.fork();
  w.on('online', () => {
    let t0 = process.hrtime.bigint();
    for (let i = 0; i < N; i++) w.send({ seq: i, usersCount: 625 });
    w.once('message', () => {
      const s = Number(process.hrtime.bigint() - t0) / 1e9;
      console.log(`one-way: ${N} msgs in ${s.toFixed(3)} s = ${(N / s).toFixed(0)} msg/s`);
      let k = 0; const lat = []; let ts = process.hrtime.bigint();
      w.on('message', () => {
        const now = process.hrtime.bigint(); lat.push(Number(now - ts) / 1e3);
        if (++k < RTT) { ts = process.hrtime.bigint(); w.send({ ping: k }); }
        else { lat.sort((a, b) => a - b); console.log(`rtt us p50=${lat[RTT/2|0].toFixed(1)} p99=${lat[RTT*0.99|0].toFixed(1)}`); w.kill(); }
      });
      ts = process.hrtime.bigint(); w.send({ ping: 0 });
    });
  });
} else {
  let c = 0;
  process.on('message', m => { if (m.ping !== undefined) process.send({ pong: m.ping }); else if (++c === N) process.send({ done: c }); });
}
