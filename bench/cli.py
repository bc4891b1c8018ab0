"""`python -m bench`: run the workloads, print the table, write bench/results/*.json.

Order of a run (every phase bounded; everything stopped by PID in `finally`):
  submit (API only; Tidal and peers interleaved per round) → scheduler started →
  drain, one worker process (per round: Tidal at each concurrency, each peer at each of
  its settings) → drain, two processes at each system's best setting → diagnostics
  (Tidal's drain with the recorder off, then with the server's hz at 500) → latency →
  log follow → profile (py-spy on API, worker, scheduler) → scale (in a child process)."""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import phases, report
from bench.env import ROOT, SOURCE, Services, Tidal, Valkey, log, machine, versions
from bench.peers import PEERS, make, missing_runtime

WORKLOADS = ("submit", "drain", "latency", "logs", "profile", "scale")
RESULTS = ROOT / "bench" / "results"


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smaller counts (drain 2,000 jobs; scale up to 100k): ~10 minutes")
    ap.add_argument("--only", default="", help=f"comma list of {', '.join(WORKLOADS)}")
    ap.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                    help="also run arq, RQ, Celery and Dramatiq, and BullMQ where node and "
                         "npm are on PATH (default: yes)")
    ap.add_argument("--peer", action="append", default=None, choices=list(PEERS),
                    help="only this peer (repeat)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=None, help="drain N (default 10,000; quick 2,000)")
    ap.add_argument("--drain-max-s", type=float, default=None,
                    help="time bound of one drain run (default 25 s; quick 15 s)")
    ap.add_argument("--concurrency", default="16,32,64,128",
                    help="Tidal worker concurrencies tried")
    ap.add_argument("--source", default=None,
                    help="tree whose services are run: a directory, or git:REV (an export of "
                         "that commit); default: this work tree")
    ap.add_argument("--recorder-process", action="store_true",
                    help="run the recorder as its own process (tidal recorder) instead of "
                         "inside the scheduler, as tidal up does")
    ap.add_argument("--profile-dir", default=str(ROOT / "bench" / "profiles"))
    ap.add_argument("--keep", action="store_true", help="keep the temporary dir (logs)")
    return ap.parse_args(argv)


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        q = args.quick
        self.n = args.jobs or (2000 if q else 10_000)
        # a drain run stops after this many seconds of draining (rate of what was done), so
        # a slow system cannot stretch the run; the diagnostics run once
        self.drain_max_s = args.drain_max_s or (15.0 if q else 25.0)
        self.diag_rounds = 1
        self.submit_n = {"sdk_one": 500 if q else 2000, "sdk_batch": 5000 if q else 20_000,
                         "rest_batch": 10_000 if q else 50_000}
        self.peer_submit_n = 1000 if q else 3000
        self.latency_n = 300
        self.sse_n = 5 if q else 10
        self.log_lines = 100_000
        self.scale_sizes = "1000,100000" if q else "1000,100000,1000000"
        self.concurrency = [int(c) for c in args.concurrency.split(",")]
        self.only = set(filter(None, args.only.split(","))) or set(WORKLOADS)
        self.res: dict[str, Any] = {"tidal": {}, "peers": {}, "errors": []}

    def want(self, name: str) -> bool:
        return name in self.only

    def guard(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run one measurement; a failure is recorded and the run goes on."""
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - reported, never hidden
            log(f"FAILED {what}: {exc!r}")
            self.res["errors"].append({"what": what, "error": repr(exc)[:2000],
                                       "trace": traceback.format_exc()[-3000:]})
            return None


def source_info() -> dict[str, Any]:
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(ROOT), *a], capture_output=True,
                                  text=True, timeout=10).stdout.strip()
        except OSError:
            return ""
    dirty = git("status", "--porcelain", "--", "common", "api", "scheduler", "worker", "cli")
    return {"source": str(SOURCE), "work_tree": str(ROOT), "head": git("rev-parse", "HEAD"),
            "services_dirty_in_work_tree": bool(dirty)}


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    # SIGTERM unwinds like Ctrl-C, so `finally` stops every process this run started
    signal.signal(signal.SIGTERM, _interrupt)
    run = Run(args)
    workdir = Path(tempfile.mkdtemp(prefix="tidal-bench-"))
    services = Services()
    valkey: Valkey | None = None
    started = time.time()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    res = run.res
    res.update(started=time.strftime("%Y-%m-%dT%H:%M:%S%z"), machine=machine(),
               versions=versions(), source=source_info(),
               settings={"quick": args.quick, "rounds": args.rounds, "drain_jobs": run.n,
                         "submit_jobs": run.submit_n, "latency_jobs": run.latency_n,
                         "log_lines": run.log_lines, "scale_sizes": run.scale_sizes,
                         "concurrency": run.concurrency})
    ok = False
    try:
        valkey = Valkey(workdir)
        res["versions"]["valkey-server"] = valkey.version
        log(f"valkey {valkey.version} at {valkey.url}; work dir {workdir}; source {SOURCE}")
        tidal = Tidal(valkey, workdir, services, recorder_process=args.recorder_process)
        peers = load_peers(run, valkey, services) if args.peers else []
        tidal.start_api()
        phases.run_all(run, tidal, peers)
        ok = True
    except KeyboardInterrupt:
        log("interrupted")
    except Exception as exc:  # noqa: BLE001
        log(f"run failed: {exc!r}")
        res["errors"].append({"what": "run", "error": repr(exc),
                              "trace": traceback.format_exc()[-3000:]})
    finally:
        services.close()
        if valkey is not None:
            valkey.stop()
        res["seconds"] = round(time.time() - started, 1)
        RESULTS.mkdir(parents=True, exist_ok=True)
        report.finish(res)
        path = RESULTS / f"bench-{stamp}.json"
        path.write_text(json.dumps(res, indent=1, default=str))
        report.print_tables(res)
        log(f"results: {path} ({res['seconds']} s)")
        if args.keep or not ok:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok and not res["errors"] else 1


def load_peers(run: Run, valkey: Valkey, services: Services) -> list[Any]:
    peers = []
    for name in run.args.peer or list(PEERS):
        spec = PEERS[name]
        why = missing_runtime(spec)
        if why:  # BullMQ without Node: a note, not an error
            log(f"skipping {name}: {why}")
            run.res.setdefault("skipped_peers", {})[name] = why
            continue
        peer = make(spec, valkey, services)
        version = run.guard(f"install {name}", peer.ensure)
        if version:
            run.res["versions"][name] = version
            run.res["versions"].update({f"{name}:{k}": v for k, v in peer.extra_versions().items()})
            # report.py keeps "best Python peer" (the 4× target) apart from BullMQ
            run.res["peers"].setdefault(name, {})["runtime"] = spec.runtime
            peers.append(peer)
    return peers


if __name__ == "__main__":
    sys.exit(main())
