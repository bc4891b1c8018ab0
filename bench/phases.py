"""The phases of a run, in order; each round runs Tidal and every peer back to back, so
the ratios come from the same minutes of the same machine."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from bench import profile, tidal_drain, tidal_latency, tidal_logs, tidal_submit
from bench.env import ROOT, SOURCE, Tidal, log
from bench.stats import percentiles, summary


def _add(store: dict[str, Any], key: str, value: Any) -> None:
    if value is not None:
        store.setdefault(key, []).append(value)


def run_all(run: Any, t: Tidal, peers: list[Any]) -> None:
    if run.want("submit"):
        submit(run, t, peers)
    t.flush_prefix()
    if run.want("drain") or run.want("latency") or run.want("logs") or run.want("profile"):
        t.start_scheduler()
    best_c = run.concurrency[0]
    if run.want("drain"):
        best_c = drain(run, t, peers)
    if run.want("latency"):
        latency(run, t, peers)
    if run.want("logs"):
        logs(run, t)
    if run.want("profile"):
        run.res["profile"] = run.guard("profile", lambda: profile.run(
            t, min(run.n, 5000), best_c, run.args.profile_dir))
    t.stop()
    if run.want("scale"):
        run.res["tidal"]["scale"] = run.guard("scale", lambda: scale(run, t))


# -- submit -------------------------------------------------------------------------------------


def submit(run: Any, t: Tidal, peers: list[Any]) -> None:
    raw: dict[str, list[Any]] = {}
    praw: dict[str, dict[str, list[Any]]] = {p.spec.name: {} for p in peers}
    for r in range(run.args.rounds):
        for mode, n in run.submit_n.items():
            log(f"round {r + 1}: tidal submit {mode} × {n}")
            _add(raw, mode, run.guard(f"tidal submit {mode}",
                                      lambda m=mode, k=n: tidal_submit.run_once(t, m, k)))
        for p in peers:
            log(f"round {r + 1}: {p.spec.name} enqueue × {run.peer_submit_n}")
            _add(praw[p.spec.name], "one", run.guard(
                f"{p.spec.name} enqueue", lambda p=p: p.submit(run.peer_submit_n, False)))
            if p.spec.bulk:
                _add(praw[p.spec.name], "bulk", run.guard(
                    f"{p.spec.name} bulk", lambda p=p: p.submit(run.submit_n["sdk_batch"], True)))
    t.flush_prefix()
    run.res["tidal"]["submit"] = {m: _fold(v) for m, v in raw.items()}
    for name, modes in praw.items():
        run.res["peers"].setdefault(name, {})["submit"] = {m: _fold(v) for m, v in modes.items()}


def _fold(rounds: list[dict[str, Any]], key: str = "jobs_per_s") -> dict[str, Any]:
    """Median (range) of `key` over rounds, medians of the per-job costs, and the raw runs."""
    out: dict[str, Any] = {key: summary([r[key] for r in rounds])}
    for k in rounds[0] if rounds else []:
        if k.endswith("_per_job") or k in ("redis_jobs_per_s", "mirror_lag_ms",
                                            "dispatch_batch_mean", "dispatch_gap_ms_p50"):
            out[k] = summary([r[k] for r in rounds if r.get(k) is not None], 3)["median"]
    out["runs"] = rounds
    return out


# -- drain --------------------------------------------------------------------------------------


def drain(run: Any, t: Tidal, peers: list[Any]) -> int:
    def td(c: int, procs: int = 1) -> Any:
        return tidal_drain.run_once(t, run.n, c, procs, timeout=run.drain_max_s)

    def pd(p: Any, c: int, procs: int = 1) -> Any:
        return p.drain(run.n, c, procs, timeout=run.drain_max_s)

    one: dict[str, list[Any]] = {}
    pone: dict[str, dict[str, list[Any]]] = {p.spec.name: {} for p in peers}
    for r in range(run.args.rounds):
        for c in run.concurrency:
            log(f"round {r + 1}: tidal drain {run.n} jobs, 1 worker × {c}")
            _add(one, str(c), run.guard(f"tidal drain c={c}",
                                        lambda c=c: td(c)))
        for p in peers:
            for c in p.spec.configs:
                log(f"round {r + 1}: {p.spec.name} drain {run.n} jobs, 1 worker × {c}")
                _add(pone[p.spec.name], str(c), run.guard(
                    f"{p.spec.name} drain c={c}", lambda p=p, c=c: pd(p, c)))
    tres = run.res["tidal"].setdefault("drain", {})
    tres["one_process"] = {c: _fold(v) for c, v in one.items()}
    best_c = _best(tres["one_process"]) or run.concurrency[0]
    tres["best_concurrency"] = best_c
    pbest: dict[str, int] = {}
    for p in peers:
        d = run.res["peers"].setdefault(p.spec.name, {}).setdefault("drain", {})
        d["one_process"] = {c: _fold(v) for c, v in pone[p.spec.name].items()}
        pbest[p.spec.name] = _best(d["one_process"]) or p.spec.configs[0]
        d["best_concurrency"] = pbest[p.spec.name]
    two: list[Any] = []
    ptwo: dict[str, list[Any]] = {p.spec.name: [] for p in peers}
    for r in range(run.args.rounds):
        log(f"round {r + 1}: tidal drain {run.n} jobs, 2 workers × {best_c}")
        _add({"x": two}, "x", run.guard(
            "tidal drain 2 processes",
            lambda: td(best_c, 2)))
        for p in peers:
            c = pbest[p.spec.name]
            log(f"round {r + 1}: {p.spec.name} drain {run.n} jobs, 2 workers × {c}")
            _add({"x": ptwo[p.spec.name]}, "x", run.guard(
                f"{p.spec.name} drain 2 processes", lambda p=p, c=c: pd(p, c, 2)))
    tres["two_processes"] = _fold(two)
    for p in peers:
        run.res["peers"][p.spec.name]["drain"]["two_processes"] = _fold(ptwo[p.spec.name])
    tres["without_recorder"] = run.guard("tidal drain without recorder",
                                         lambda: _without_recorder(run, t, best_c))
    tres["server_hz"] = run.guard("tidal drain at hz 500", lambda: _with_hz(run, t, best_c))
    tres["dispatch_ahead"] = run.guard("tidal drain dispatching ahead",
                                       lambda: _dispatch_ahead(run, t, best_c))
    return int(best_c)


def block_timeout_ms(t: Tidal, block_ms: int = 20, samples: int = 10) -> float:
    """How long XREADGROUP BLOCK `block_ms` on an empty stream really takes on this server
    (a blocked client's timeout is only noticed on the server's `hz` tick)."""
    key, group = f"bench-probe-{t.port}", "probe"
    t.r.xgroup_create(key, group, id="0", mkstream=True)
    took = []
    try:
        for _ in range(samples):
            t0 = time.perf_counter()
            t.r.xreadgroup(group, "c", {key: ">"}, count=1, block=block_ms)
            took.append((time.perf_counter() - t0) * 1000)
    finally:
        t.r.delete(key)
    return round(statistics.median(took), 1)


def _with_hz(run: Any, t: Tidal, c: int, hz: int = 500) -> dict[str, Any]:
    """Diagnostic: the same drain with the server's `hz` raised from the default 10, so the
    scheduler's 20 ms XREADGROUP BLOCK on the submissions stream times out after ~20 ms
    instead of ~100 ms. Every other figure of the run is at the default."""
    old = t.r.config_get("hz").get("hz", "10")
    out: dict[str, Any] = {"default_hz": int(old),
                           "block_20ms_takes_ms_at_default_hz": block_timeout_ms(t)}
    got: list[Any] = []
    try:
        t.r.config_set("hz", hz)
        out[f"block_20ms_takes_ms_at_hz_{hz}"] = block_timeout_ms(t)
        for r in range(run.diag_rounds):
            log(f"round {r + 1}: tidal drain {run.n} jobs, 1 worker × {c}, server hz {hz}")
            _add({"x": got}, "x", run.guard(f"tidal drain hz {hz}",
                                            lambda: tidal_drain.run_once(t, run.n, c,
                                                                         timeout=run.drain_max_s)))
    finally:
        t.r.config_set("hz", old)
    out[f"drain_at_hz_{hz}"] = _fold(got)
    return out


def _restarted(run: Any, t: Tidal, what: str, env: dict[str, str],
               drain: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Diagnostic: drains with the scheduler restarted with `env`, then as it was."""
    t.stop_scheduler()
    got: list[Any] = []
    try:
        t.start_scheduler(**env)
        for r in range(run.diag_rounds):
            log(f"round {r + 1}: tidal drain {run.n} jobs, {what}")
            _add({"x": got}, "x", run.guard(f"tidal drain, {what}", drain))
    finally:
        t.stop_scheduler()
        t.start_scheduler()
    return _fold(got)


def _without_recorder(run: Any, t: Tidal, c: int) -> dict[str, Any]:
    """The scheduler with TIDAL_RECORDER=false (no SQL mirror: done = terminal in Redis)."""
    return _restarted(run, t, f"1 worker × {c}, recorder off", {"TIDAL_RECORDER": "false"},
                      lambda: tidal_drain.run_without_recorder(t, run.n, c,
                                                               timeout=run.drain_max_s))


def _dispatch_ahead(run: Any, t: Tidal, c: int, ahead: str = "1") -> dict[str, Any]:
    """The scheduler with TIDAL_DISPATCH_AHEAD (a prefetch of that fraction of the slots)."""
    return _restarted(run, t, f"1 worker × {c}, dispatch ahead {ahead}",
                      {"TIDAL_DISPATCH_AHEAD": ahead},
                      lambda: tidal_drain.run_once(t, run.n, c, timeout=run.drain_max_s))


def _best(by_conf: dict[str, Any]) -> int | None:
    ranked = [(v["jobs_per_s"]["median"] or 0, int(c)) for c, v in by_conf.items()
              if v.get("runs")]
    return max(ranked)[1] if ranked else None


# -- latency ------------------------------------------------------------------------------------


def latency(run: Any, t: Tidal, peers: list[Any]) -> None:
    tl: list[Any] = []
    pl: dict[str, list[list[float]]] = {p.spec.name: [] for p in peers}
    t.start_worker(4)
    try:
        for r in range(run.args.rounds):
            log(f"round {r + 1}: tidal latency × {run.latency_n}")
            _add({"x": tl}, "x", run.guard("tidal latency",
                                           lambda: tidal_latency.run_run(t, run.latency_n)))
        log(f"tidal latency (submit, then wait: two requests) × {run.latency_n}")
        two = run.guard("tidal latency two", lambda: tidal_latency.run_wait(t, run.latency_n))
        log(f"tidal latency (GET loop every 0.5 ms) × {run.latency_n}")
        poll = run.guard("tidal latency poll", lambda: tidal_latency.run_poll(t, run.latency_n))
        log(f"tidal latency (SSE follow) × {run.sse_n}")
        sse = run.guard("tidal latency sse", lambda: tidal_latency.run_sse(t, run.sse_n))
    finally:
        t.stop_workers()
    for r in range(run.args.rounds):
        for p in peers:
            log(f"round {r + 1}: {p.spec.name} latency × {run.latency_n}")
            _add({"x": pl[p.spec.name]}, "x", run.guard(
                f"{p.spec.name} latency", lambda p=p: p.latency(run.latency_n)))
    run.res["tidal"]["latency"] = {
        "p50_ms": summary([x["p50"] for x in tl], 2),
        "p95_ms": summary([x["p95"] for x in tl], 2),
        "p99_ms": summary([x["p99"] for x in tl], 2),
        "mode": tl[0]["mode"] if tl else None,
        "hops_ms_p50": tl[-1]["hops_ms_p50"] if tl else None,
        "runs": tl, "two_requests": two, "sse": sse, "poll": poll,
    }
    for name, rounds in pl.items():
        per = [percentiles(s) for s in rounds]
        run.res["peers"].setdefault(name, {})["latency"] = {
            "p50_ms": summary([x["p50"] for x in per], 2),
            "p95_ms": summary([x["p95"] for x in per], 2),
            "p99_ms": summary([x["p99"] for x in per], 2),
            "runs": per,
        }


# -- logs ---------------------------------------------------------------------------------------


def logs(run: Any, t: Tidal) -> None:
    got: list[Any] = []
    t.start_worker(4)
    try:
        for r in range(run.args.rounds):
            log(f"round {r + 1}: tidal log follow, {run.log_lines} lines")
            _add({"x": got}, "x", run.guard("tidal logs",
                                            lambda: tidal_logs.run_once(t, run.log_lines)))
    finally:
        t.stop_workers()
    run.res["tidal"]["logs"] = {
        "lines_per_s": summary([g["lines_per_s"] for g in got]),
        "lines_per_s_from_submit": summary([g["lines_per_s_from_submit"] for g in got]),
        "none_lost": all(g["none_lost"] for g in got) if got else None,
        "runs": got,
    }


# -- scale --------------------------------------------------------------------------------------


def scale(run: Any, t: Tidal) -> dict[str, Any]:
    log(f"scale: sizes {run.scale_sizes} (+ 100k with 10k hosts), in a child process")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys([str(SOURCE), str(ROOT)])))
    out = subprocess.run(
        [sys.executable, "-m", "bench.scale", "--url", t.valkey.url_db(9),
         "--sizes", run.scale_sizes, "--k", "5000", "--rounds", str(run.args.rounds),
         "--hosts-size", "100000"],
        cwd=SOURCE, env=env, capture_output=True, text=True, timeout=1500)
    if out.returncode != 0:
        raise RuntimeError(f"bench.scale failed: {out.stderr[-2000:]}")
    raw = json.loads(out.stdout)
    res: dict[str, Any] = {"k": raw["k"], "sizes": {}}
    for label, m in [*raw["sizes"].items(), ("100000 with 10k hosts", raw["hosts"])]:
        res["sizes"][label] = {
            "total_us_per_job": summary(m["total_us"], 1),
            "admit_us_per_job": summary(m["admit_us"], 1),
            "dispatch_us_per_job": summary(m["dispatch_us"], 1),
            "server_cpu_us_per_job": summary(m["server_us"], 1),
            "python_cpu_us_per_job": summary(m["python_us"], 1),
            "commands_per_job": summary(m["commands_per_job"], 2)["median"],
            "round_trips_per_job": summary(m["round_trips_per_job"], 3)["median"],
            "bytes_per_queued_job": m["bytes_per_queued_job"],
            "bytes_per_queued_job_without_events": m["bytes_per_queued_job_without_events"],
            "fill_s": m["fill_s"], "warning": m.get("warning"),
        }
    return res
