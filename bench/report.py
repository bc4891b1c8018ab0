"""Ratios, the issue's targets with pass/miss, and the tables printed at the end."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from bench.stats import fmt_range

BULLMQ_DRAIN_REF = 7487  # /work/shared/PERFORMANCE.md, same machine kind (when not measured)
BULLMQ = "bullmq"


def _get(d: Any, *path: Any) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def _med(d: Any, *path: Any) -> float | None:
    s = _get(d, *path)
    return s.get("median") if isinstance(s, dict) else None


def tidal_drain_best(res: dict[str, Any]) -> dict[str, Any] | None:
    d = _get(res, "tidal", "drain")
    if not d:
        return None
    return _get(d, "one_process", str(d.get("best_concurrency")))


def peer_drain_best(p: dict[str, Any]) -> dict[str, Any] | None:
    d = _get(p, "drain")
    if not d:
        return None
    return _get(d, "one_process", str(d.get("best_concurrency")))


def python_peers(res: dict[str, Any]) -> set[str]:
    """The peers the issue's "≥ 4× the best Python peer" is about: every peer but the Node
    one(s) (BullMQ has its own target). Results without a runtime are all Python."""
    return {n for n, p in res.get("peers", {}).items()
            if isinstance(p, dict) and p.get("runtime", "python") == "python"}


def rows(res: dict[str, Any]) -> list[tuple[str, Any, dict[str, Any], bool]]:
    """(label, tidal summary, {peer: summary}, higher is better)."""
    peers = res.get("peers", {})
    out = [
        ("drain, 1 worker process (jobs/s)", _get(tidal_drain_best(res), "jobs_per_s"),
         {n: _get(peer_drain_best(p), "jobs_per_s") for n, p in peers.items()}, True),
        ("drain, 2 worker processes (jobs/s)",
         _get(res, "tidal", "drain", "two_processes", "jobs_per_s"),
         {n: _get(p, "drain", "two_processes", "jobs_per_s") for n, p in peers.items()}, True),
        ("submit one at a time (jobs/s)", _get(res, "tidal", "submit", "sdk_one", "jobs_per_s"),
         {n: _get(p, "submit", "one", "jobs_per_s") for n, p in peers.items()}, True),
        ("submit batch (jobs/s; Tidal: SDK submit_many)",
         _get(res, "tidal", "submit", "sdk_batch", "jobs_per_s"),
         {n: _get(p, "submit", "bulk", "jobs_per_s") for n, p in peers.items()}, True),
        ("submit batch, raw REST POST of 1,000 (jobs/s)",
         _get(res, "tidal", "submit", "rest_batch", "jobs_per_s"), {}, True),
        ("idle latency p50 (ms)", _get(res, "tidal", "latency", "p50_ms"),
         {n: _get(p, "latency", "p50_ms") for n, p in peers.items()}, False),
        ("idle latency p99 (ms)", _get(res, "tidal", "latency", "p99_ms"),
         {n: _get(p, "latency", "p99_ms") for n, p in peers.items()}, False),
    ]
    return out


def ratios(res: dict[str, Any]) -> dict[str, Any]:
    """Tidal ÷ each peer (latency: peer ÷ Tidal, so > 1 means Tidal is better), ÷ the best
    peer (BullMQ included) and ÷ the best Python peer."""
    out: dict[str, Any] = {}
    python = python_peers(res)
    for label, tidal, peers, higher in rows(res):
        t = tidal.get("median") if isinstance(tidal, dict) else None
        vals = {n: s["median"] for n, s in peers.items() if isinstance(s, dict) and s["median"]}
        if not t or not vals:
            continue
        # the best peer is the one Tidal's ratio is smallest against
        raw = {n: t / v if higher else v / t for n, v in vals.items()}
        top = min(raw, key=raw.__getitem__)
        out[label] = {"per_peer": {n: round(x, 2) for n, x in raw.items()},
                      "best_peer": top, "vs_best": round(raw[top], 2)}
        py = [n for n in raw if n in python]
        if py:
            top_py = min(py, key=raw.__getitem__)
            out[label].update(best_python_peer=top_py, vs_best_python=round(raw[top_py], 2))
    return out


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, value: Any, goal: str, ok: bool | None) -> None:
        out.append({"target": name, "value": value, "goal": goal,
                    "status": "–" if ok is None else ("pass" if ok else "MISS")})

    drain = _med(tidal_drain_best(res), "jobs_per_s")
    add("drain, 1 worker process", drain, "≥ 5,000 jobs/s", None if drain is None
        else drain >= 5000)
    r = _get(res, "ratios", "drain, 1 worker process (jobs/s)")
    ok = r is not None and "vs_best_python" in r
    add("drain vs best Python peer (same run)",
        f"{r['vs_best_python']}× {r['best_python_peer']}" if ok else None,
        "≥ 4×", r["vs_best_python"] >= 4 if ok else None)
    bullmq = _med(peer_drain_best(_get(res, "peers", BULLMQ) or {}), "jobs_per_s")
    if bullmq:  # measured in this run: the ratio of the same minutes
        add("ahead of BullMQ's drain (same run)",
            f"{drain:,.0f} vs {bullmq:,.0f} jobs/s ({drain / bullmq:.2f}×)" if drain
            else f"BullMQ {bullmq:,.0f} jobs/s", "> 1× (goal)",
            None if drain is None else drain > bullmq)
    else:
        add("drain vs BullMQ (reference 7,487 from PERFORMANCE.md; not run here)", drain,
            "> 7,487 (goal)", None if drain is None else drain > BULLMQ_DRAIN_REF)
    rest = _med(res, "tidal", "submit", "rest_batch", "jobs_per_s")
    add("REST batch submit", rest, "≥ 20,000 jobs/s", None if rest is None else rest >= 20000)
    p50 = _med(res, "tidal", "latency", "p50_ms")
    add("idle latency p50 (HTTP + scheduler)", p50, "≤ 2.5 ms",
        None if p50 is None else p50 <= 2.5)
    sizes = _get(res, "tidal", "scale", "sizes") or {}
    base = _med(sizes, "1000", "total_us_per_job")
    for label in sizes:
        if label == "1000" or base is None:
            continue
        v = _med(sizes, label, "total_us_per_job")
        add(f"scheduler cost per job, {label} queued vs 1k",
            v and f"{v:.0f} vs {base:.0f} µs ({v / base:.2f}×)", "≤ 1.5×",
            None if v is None else v / base <= 1.5)
    lines = _med(res, "tidal", "logs", "lines_per_s")
    lost = _get(res, "tidal", "logs", "none_lost")
    add("log follow", lines, "≥ 100,000 lines/s, none lost",
        None if lines is None else (lines >= 100_000 and bool(lost)))
    return out


def finish(res: dict[str, Any]) -> None:
    res["ratios"] = ratios(res)
    res["targets"] = targets(res)


def _fmt(s: Any, digits: int = 0) -> str:
    return fmt_range(s, digits) if isinstance(s, dict) else "–"


def print_tables(res: dict[str, Any]) -> None:
    console = Console(width=200)
    m = res.get("machine", {})
    console.print(f"\n[bold]Tidal benchmark[/] — {m.get('nproc')} cores, {m.get('cpu_model')}, "
                  f"{m.get('memory_mb')} MB; valkey {res.get('versions', {}).get('valkey-server')}"
                  f"; medians of {res.get('settings', {}).get('rounds')} rounds (min–max)")
    peers = list(res.get("peers", {}))
    table = Table(show_lines=False)
    table.add_column("workload")
    table.add_column("Tidal", justify="right")
    for p in peers:
        table.add_column(f"{p} {res.get('versions', {}).get(p, '')}", justify="right")
    table.add_column("Tidal ÷ best peer", justify="right")
    rat = res.get("ratios", {})
    for label, tidal, per, higher in rows(res):
        digits = 0 if higher else 2
        r = rat.get(label)
        table.add_row(label, _fmt(tidal, digits), *[_fmt(per.get(p), digits) for p in peers],
                      f"{r['vs_best']}× ({r['best_peer']})" if r else "–")
    console.print(table)
    console.print(_ratio_table(res, peers))
    console.print(_cost_table(res))
    console.print(_tidal_table(res))
    console.print(_targets_table(res))
    for name, why in res.get("skipped_peers", {}).items():
        console.print(f"peer {name} skipped: {why}")
    for err in res.get("errors", []):
        console.print(f"[red]error[/] {err['what']}: {err['error'][:300]}")


def _ratio_table(res: dict[str, Any], peers: list[str]) -> Table:
    """Tidal ÷ each peer (latency: the peer's ms ÷ Tidal's, so above 1 Tidal is better)."""
    table = Table(title="Tidal ÷ each peer, same run (> 1: Tidal better)")
    table.add_column("workload")
    for p in peers:
        table.add_column(p, justify="right")
    table.add_column("best peer", justify="right")
    table.add_column("best Python peer", justify="right")
    for label, r in res.get("ratios", {}).items():
        per = r["per_peer"]
        table.add_row(label, *[f"{per[p]}×" if p in per else "–" for p in peers],
                      f"{r['vs_best']}× ({r['best_peer']})",
                      f"{r['vs_best_python']}× ({r['best_python_peer']})"
                      if "vs_best_python" in r else "–")
    return table


def _cost_table(res: dict[str, Any]) -> Table:
    cost = Table(title="cost per job while draining (1 worker process, best setting)")
    for col in ("system", "setting", "round trips", "commands", "server CPU ms", "worker CPU ms",
                "scheduler CPU ms"):
        cost.add_column(col, justify="right")
    td = tidal_drain_best(res)
    if td:
        cost.add_row("tidal", f"c={_get(res, 'tidal', 'drain', 'best_concurrency')}",
                     *[str(td.get(k, "–")) for k in ("round_trips_per_job", "commands_per_job",
                                                     "server_cpu_ms_per_job",
                                                     "worker_cpu_ms_per_job",
                                                     "scheduler_cpu_ms_per_job")])
    for name, p in res.get("peers", {}).items():
        pd = peer_drain_best(p)
        if pd:
            cost.add_row(name, f"c={_get(p, 'drain', 'best_concurrency')}",
                         *[str(pd.get(k, "–")) for k in ("round_trips_per_job",
                                                         "commands_per_job",
                                                         "server_cpu_ms_per_job",
                                                         "worker_cpu_ms_per_job")], "–")
    return cost


def _tidal_table(res: dict[str, Any]) -> Table:
    t = res.get("tidal", {})
    extra = Table(title="Tidal only")
    extra.add_column("figure")
    extra.add_column("value", justify="right")
    for c, v in (_get(t, "drain", "one_process") or {}).items():
        extra.add_row(f"drain 1 process, concurrency {c}: mirror / redis jobs/s; "
                      "dispatch every … ms, … jobs at a time",
                      f"{_fmt(v.get('jobs_per_s'))} / {v.get('redis_jobs_per_s')}; "
                      f"{v.get('dispatch_gap_ms_p50', '–')} ms, "
                      f"{v.get('dispatch_batch_mean', '–')}")
    wr = _get(t, "drain", "without_recorder")
    if wr and wr.get("runs"):
        extra.add_row("diagnostic: drain, best setting, recorder off (jobs/s)",
                      _fmt(wr.get("jobs_per_s")))
    da = _get(t, "drain", "dispatch_ahead")
    if da and da.get("runs"):
        extra.add_row("diagnostic: drain, best setting, TIDAL_DISPATCH_AHEAD=1 (jobs/s)",
                      _fmt(da.get("jobs_per_s")))
    hz = _get(t, "drain", "server_hz")
    if hz:
        extra.add_row("diagnostic: XREADGROUP BLOCK 20 really takes (ms) at hz 10 / 500",
                      f"{hz.get('block_20ms_takes_ms_at_default_hz')} / "
                      f"{hz.get('block_20ms_takes_ms_at_hz_500')}")
        extra.add_row("diagnostic: drain, best setting, server hz 500 (jobs/s)",
                      _fmt(_get(hz, "drain_at_hz_500", "jobs_per_s")))
    lat = t.get("latency") or {}
    if lat.get("hops_ms_p50"):
        extra.add_row("latency hops p50 (ms, Redis clock)",
                      ", ".join(f"{k} {v}" for k, v in lat["hops_ms_p50"].items()))
    if lat.get("two_requests"):
        extra.add_row("latency via submit, then wait (two requests) p50 / p99 (ms)",
                      f"{lat['two_requests'].get('p50')} / {lat['two_requests'].get('p99')}")
    if lat.get("poll"):
        extra.add_row("latency via a GET loop every 0.5 ms p50 / p99 (ms)",
                      f"{lat['poll'].get('p50')} / {lat['poll'].get('p99')}")
    if lat.get("sse"):
        extra.add_row("latency via SSE follow p50 / p99 (ms)",
                      f"{lat['sse'].get('p50')} / {lat['sse'].get('p99')}")
    logs = t.get("logs") or {}
    if logs:
        extra.add_row("log follow lines/s (first line → end; none lost?)",
                      f"{_fmt(logs.get('lines_per_s'))}; {logs.get('none_lost')}")
    for label, s in (_get(t, "scale", "sizes") or {}).items():
        extra.add_row(f"scheduler µs/job (admit+dispatch), {label} queued; server CPU µs; "
                      f"bytes/queued job",
                      f"{_fmt(s['total_us_per_job'], 1)}; {_fmt(s['server_cpu_us_per_job'], 1)};"
                      f" {s['bytes_per_queued_job']}")
    return extra


def _targets_table(res: dict[str, Any]) -> Table:
    tg = Table(title="targets (issue)")
    for col in ("target", "value", "goal", "status"):
        tg.add_column(col)
    for row in res.get("targets", []):
        v = row["value"]
        tg.add_row(row["target"], f"{v:,.1f}" if isinstance(v, float) else str(v), row["goal"],
                   row["status"])
    return tg
