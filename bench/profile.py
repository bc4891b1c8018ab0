"""py-spy on the worker and the scheduler during one drain: raw collapsed stacks (trimmed
to stay small) and a top-functions summary (self and inclusive share of on-CPU samples)
per process, written to bench/profiles/. Needs `pip install py-spy` in the venv (a dev
tool, not a dependency); skipped with a note when it is missing."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.env import Tidal, log, per_job
from bench.tidal_drain import Mirror, queue_jobs
from bench.tidal_submit import NOOP

MAX_BYTES = 150_000
RATE = 200


def _pyspy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return str(here) if here.exists() else shutil.which("py-spy")


def _record(pyspy: str, pid: int, out: Path) -> subprocess.Popen[Any]:
    return subprocess.Popen(
        [pyspy, "record", "--pid", str(pid), "--rate", str(RATE), "--format", "raw",
         "--output", str(out), "--threads", "--nonblocking"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _frame(f: str) -> str:
    """'func (path/file.py:123)' → 'func (file.py)'; keeps thread labels as they are."""
    if " (" not in f:
        return f
    name, where = f.split(" (", 1)
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{name} ({short})"


def summarize(raw: Path, title: str) -> str:
    self_c: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith(("thread", "process")) else "?"
        frames = [_frame(f) for f in frames if not f.startswith(("thread", "process"))]
        threads[thread] += n
        if frames:
            self_c[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    lines = [f"# {title}: {total} on-CPU samples at {RATE} Hz (py-spy --threads --nonblocking)",
             "", "## by thread"]
    lines += [f"{100 * n / max(total, 1):6.1f}%  {t}" for t, n in threads.most_common(12)]
    lines += ["", "## self (top 30)"]
    lines += [f"{100 * n / max(total, 1):6.1f}%  {f}" for f, n in self_c.most_common(30)]
    lines += ["", "## inclusive, Tidal's own code (top 40)"]
    own = [(f, n) for f, n in incl.most_common() if _own(f)][:40]
    lines += [f"{100 * n / max(total, 1):6.1f}%  {f}" for f, n in own]
    lines += ["", "## inclusive, everything (top 40)"]
    lines += [f"{100 * n / max(total, 1):6.1f}%  {f}" for f, n in incl.most_common(40)]
    return "\n".join(lines) + "\n"


OWN = ("(api/", "(routes/", "(common/", "(scheduler/", "(worker/", "(cli/")


def _own(frame: str) -> bool:
    return any(p in frame for p in OWN) and "cli/__main__" not in frame and "cli/main" not in frame


def main() -> int:
    """`python -m bench.profile RAW TITLE`: print the summary of a raw py-spy file."""
    print(summarize(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "profile"), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def _trim(raw: Path) -> None:
    """Keep the heaviest stacks so the file stays under MAX_BYTES."""
    if raw.stat().st_size <= MAX_BYTES:
        return
    rows = [ln for ln in raw.read_text(errors="replace").splitlines() if ln.strip()]
    rows.sort(key=lambda ln: -int(ln.rpartition(" ")[2] or 0))
    kept, size = [], 0
    for row in rows:
        size += len(row) + 1
        if size > MAX_BYTES:
            break
        kept.append(row)
    raw.write_text("\n".join(kept) + "\n")


def run(t: Tidal, n: int, concurrency: int, outdir: str) -> dict[str, Any]:
    pyspy = _pyspy()
    if pyspy is None:
        return {"skipped": "py-spy not installed (pip install py-spy)"}
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    assert t.scheduler is not None
    mirror = Mirror(t)
    assert t.api is not None
    api_spy = _record(pyspy, t.api.pid, out / "api.raw.txt")
    time.sleep(1.0)  # py-spy attaches
    api0 = t.valkey.snapshot(t.pids())
    one = min(300, n)
    with t.client() as c:  # one at a time through the SDK
        for _ in range(one):
            c.submit(NOOP)
    api1 = t.valkey.snapshot(t.pids())
    mark = queue_jobs(t, n)  # REST batches of 1,000
    api2 = t.valkey.snapshot(t.pids())
    api_spy.send_signal(signal.SIGINT)
    api_spy.wait(timeout=30)
    log(f"profile: drain {n} jobs, 1 worker × {concurrency}, py-spy on worker + scheduler")
    spies = {"scheduler": _record(pyspy, t.scheduler.pid, out / "scheduler.raw.txt")}
    worker = t.start_worker(concurrency, wait=True)  # its start-up stays out of the profile
    spies["worker"] = _record(pyspy, worker.pid, out / "worker.raw.txt")
    before = t.valkey.snapshot(t.pids())
    deadline = time.monotonic() + 600
    while mirror.unfinished(mark) and time.monotonic() < deadline:
        time.sleep(0.05)
    after = t.valkey.snapshot(t.pids())
    for spy in spies.values():
        spy.send_signal(signal.SIGINT)
    for spy in spies.values():
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
    t.stop_workers()
    first, last = mirror.window(mark)
    mirror.close()
    result: dict[str, Any] = {"jobs": n, "concurrency": concurrency,
                              "redis_jobs_per_s_under_profiler":
                                  round(n * 1000 / max(1, last - first), 1)}
    result.update(per_job(before, after, n))
    result["api_sdk_one"] = per_job(api0, api1, one)
    result["api_rest_batch"] = per_job(api1, api2, n)
    for name in ("api", *spies):
        raw = out / f"{name}.raw.txt"
        if raw.exists() and raw.stat().st_size:
            what = "300 SDK submits, then REST batches" if name == "api" else "a drain"
            (out / f"{name}-top.txt").write_text(summarize(raw, f"{name} during {what}"))
            _trim(raw)
            result[f"{name}_profile"] = str(raw)
        else:
            result[f"{name}_profile"] = "py-spy wrote nothing (ptrace not permitted?)"
    return result
