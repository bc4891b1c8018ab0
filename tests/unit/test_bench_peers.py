"""The benchmark harness's peers, without running any: BullMQ counts as a peer for the
ratios and the best peer, but the issue's "drain ≥ 4× the best Python peer" is taken over
the Python peers only; without Node the BullMQ peer is skipped with a note."""

from __future__ import annotations

from typing import Any

import pytest

from bench import cli, report
from bench.peers import PEERS, NodePeer, Peer, make, missing_runtime
from bench.stats import summary


def _drain(rate: float) -> dict[str, Any]:
    return {"best_concurrency": 50, "one_process": {"50": {"jobs_per_s": summary([rate])}}}


def _res(tidal: float, peers: dict[str, tuple[str, float]]) -> dict[str, Any]:
    res: dict[str, Any] = {
        "tidal": {"drain": _drain(tidal)},
        "peers": {n: {"runtime": rt, "drain": _drain(v)} for n, (rt, v) in peers.items()},
    }
    report.finish(res)
    return res


def _target(res: dict[str, Any], prefix: str) -> dict[str, Any]:
    return next(t for t in res["targets"] if t["target"].startswith(prefix))


def test_bullmq_is_the_best_peer_but_not_a_python_peer() -> None:
    res = _res(6000, {"dramatiq": ("python", 1300), "arq": ("python", 1000),
                      "bullmq": ("node", 7500)})
    r = res["ratios"]["drain, 1 worker process (jobs/s)"]
    assert r["best_peer"] == "bullmq" and r["vs_best"] == 0.8
    assert r["best_python_peer"] == "dramatiq" and r["vs_best_python"] == 4.62
    assert r["per_peer"] == {"dramatiq": 4.62, "arq": 6.0, "bullmq": 0.8}
    python = _target(res, "drain vs best Python peer")
    assert python["value"] == "4.62× dramatiq" and python["status"] == "pass"
    bullmq = _target(res, "ahead of BullMQ's drain")
    assert bullmq["value"] == "6,000 vs 7,500 jobs/s (0.80×)" and bullmq["status"] == "MISS"


def test_without_bullmq_the_reference_figure_is_the_goal() -> None:
    res = _res(8000, {"dramatiq": ("python", 2500)})
    assert _target(res, "drain vs best Python peer")["status"] == "MISS"  # 3.2×
    ref = _target(res, "drain vs BullMQ (reference")
    assert ref["value"] == 8000 and ref["status"] == "pass"


def test_only_bullmq_leaves_the_python_target_open() -> None:
    res = _res(8000, {"bullmq": ("node", 7000)})
    assert _target(res, "drain vs best Python peer")["status"] == "–"
    assert _target(res, "ahead of BullMQ's drain")["status"] == "pass"


def test_results_without_a_runtime_are_python_peers() -> None:
    assert report.python_peers({"peers": {"rq": {}, "bullmq": {"runtime": "node"}}}) == {"rq"}


def test_python_peers_keep_their_runner_and_bullmq_gets_the_node_one() -> None:
    assert all(PEERS[n].runtime == "python" for n in ("dramatiq", "arq", "celery", "rq"))
    dbs = [s.db for s in PEERS.values()]
    assert len(set(dbs)) == len(dbs) and 0 not in dbs  # Tidal uses DB 0
    bullmq = make(PEERS["bullmq"], None, None)  # type: ignore[arg-type]
    assert isinstance(bullmq, NodePeer) and bullmq.script.name == "bullmq_peer.mjs"
    assert bullmq.script.exists() and PEERS["bullmq"].bulk
    assert type(make(PEERS["rq"], None, None)) is Peer  # type: ignore[arg-type]
    assert NodePeer._package("bullmq@6.7.0") == "bullmq"
    assert NodePeer._package("@scope/pkg@1.2.3") == "@scope/pkg"


def test_bullmq_is_skipped_with_a_note_without_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("bench.peers.shutil.which", lambda tool: None)
    assert missing_runtime(PEERS["bullmq"]) == "node and npm not on PATH"
    assert missing_runtime(PEERS["dramatiq"]) is None
    run = cli.Run(cli.parse(["--peer", "bullmq"]))
    run.res["versions"] = {}
    assert cli.load_peers(run, None, None) == []  # type: ignore[arg-type]
    assert run.res["skipped_peers"] == {"bullmq": "node and npm not on PATH"}
    assert run.res["errors"] == []
