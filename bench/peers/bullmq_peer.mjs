// BullMQ (Node): the same command line and JSON-line outputs as the Python peer scripts
// (`enqueue|worker|latency --url redis://127.0.0.1:PORT/DB --n N [--bulk] --concurrency C
// [--latency]`), and the same job counter as _common.py, so Peer.drain/counts work unchanged.
//
// enqueue: Queue.add one at a time (each awaited, as the Python peers do), or Queue.addBulk in
//   chunks of 1,000 with --bulk;
// worker:  a Worker with `concurrency` = C and a no-op processor that bumps an in-process
//   counter, reported every 20 ms as HSET bench:done <pid> "<count> <first_s> <last_s>";
//   --latency changes nothing (BullMQ's worker already waits push-based, BZPOPMIN on a marker);
// latency: add one job and wait for it with job.waitUntilFinished(QueueEvents) (XREAD BLOCK
//   on the events stream: push-based, like the Python peers' waits), on an idle worker.
//
// bullmq and ioredis live in the peer's own npm dir (not in this repository); the harness
// points NODE_PATH at its node_modules, which createRequire's resolution honours.

import { createRequire } from "node:module";
import { parseArgs } from "node:util";

const require = createRequire(import.meta.url);
const { Queue, QueueEvents, Worker } = require("bullmq");
const IORedis = require("ioredis");

const QUEUE = "bench";
const DONE_KEY = "bench:done"; // hash: pid -> "count first_ts last_ts" (seconds), as _common.py

const { positionals, values: a } = parseArgs({
  allowPositionals: true,
  options: {
    url: { type: "string" },
    n: { type: "string", default: "1000" },
    bulk: { type: "boolean", default: false },
    concurrency: { type: "string", default: "8" },
    latency: { type: "boolean", default: false },
  },
});
const mode = positionals[0];
if (!["enqueue", "worker", "latency"].includes(mode) || !a.url) {
  console.error("usage: bullmq_peer.mjs enqueue|worker|latency --url URL [--n N] [--bulk] " +
    "[--concurrency C] [--latency]");
  process.exit(2);
}
const N = Number(a.n);

// ioredis reads the database number from the URL's path (redis://host:port/DB). BullMQ
// requires maxRetriesPerRequest: null on the connections that block (worker, QueueEvents);
// the same options everywhere keep it simple.
const connect = () => new IORedis(a.url, { maxRetriesPerRequest: null });

// Wall-clock seconds with sub-millisecond resolution (Date.now() has whole milliseconds).
const nowS = () => (performance.timeOrigin + performance.now()) / 1000;

function emit(fields) {
  process.stdout.write(JSON.stringify(fields) + "\n");
}

// Drain runs delete each job when it finishes, so Redis memory stays flat as for the
// others. The latency run keeps them (300 small hashes): waitUntilFinished checks the job
// once after subscribing, and a job already removed then reads as failed.
function makeQueue(keep) {
  return new Queue(QUEUE, {
    connection: connect(),
    defaultJobOptions: { removeOnComplete: !keep, removeOnFail: !keep },
  });
}

async function enqueue() {
  const queue = makeQueue(false);
  await queue.waitUntilReady(); // the connection, as the Python peers' brokers are built first
  const t0 = performance.now();
  if (a.bulk) {
    for (let start = 0; start < N; start += 1000) {
      const size = Math.min(1000, N - start);
      await queue.addBulk(Array.from({ length: size }, () => ({ name: "noop", data: {} })));
    }
  } else {
    for (let i = 0; i < N; i++) await queue.add("noop", {});
  }
  emit({ jobs: N, seconds: (performance.now() - t0) / 1000 });
  await queue.close();
}

async function latency() {
  const queue = makeQueue(true);
  const events = new QueueEvents(QUEUE, { connection: connect() });
  await Promise.all([queue.waitUntilReady(), events.waitUntilReady()]);
  const one = async () => {
    const job = await queue.add("noop", {});
    await job.waitUntilFinished(events, 10_000);
  };
  for (let i = 0; i < 5; i++) await one(); // warm-up, as _common.latency_loop
  const samples = [];
  for (let i = 0; i < N; i++) {
    const t0 = performance.now();
    await one();
    samples.push(performance.now() - t0);
  }
  emit({ samples_ms: samples });
  await Promise.all([events.close(), queue.close()]);
}

function worker() {
  let count = 0, first = 0, last = 0;
  // The counter is reported on its own connection, one HSET every 20 ms, never per job.
  const reporter = connect();
  const report = () =>
    reporter.hset(DONE_KEY, String(process.pid), `${count} ${first} ${last}`).catch(() => {});
  setInterval(report, 20);

  const w = new Worker(QUEUE, async () => {
    const now = nowS();
    if (count++ === 0) first = now;
    last = now;
  }, {
    connection: connect(),
    concurrency: Number(a.concurrency),
    // No stalled-jobs sweep (a moveStalledJobsToWait script at start, then every 30 s):
    // nothing stalls in these runs, and it would only add noise to a window of seconds.
    // Lock renewal stays at its default.
    skipStalledCheck: true,
  });
  w.on("error", (err) => console.error("worker error:", err));

  // The harness stops workers with SIGTERM: close (finishing the jobs in flight), report
  // once more, exit; force the exit if closing hangs.
  const stop = async () => {
    setTimeout(() => process.exit(0), 3000).unref();
    await w.close().catch(() => {});
    await report();
    process.exit(0);
  };
  process.on("SIGTERM", stop);
  process.on("SIGINT", stop);
}

if (mode === "worker") {
  worker();
} else {
  (mode === "enqueue" ? enqueue() : latency()).then(
    () => process.exit(0),
    (err) => { console.error(err); process.exit(1); },
  );
}
