"""A ledger the jobs of the fault tests append to (O_APPEND writes, one line each), so a
test sees every execution, including those of attempts Tidal gave up on:

    start <job> <attempt> <pid> <wall-clock ns> [<host>]
    end   <job> <attempt> <pid> <wall-clock ns> [<host>]

Shell jobs write it with `date +%s%N` (CLOCK_REALTIME: the test machine's clock does not
step during a run); `$$` is the job's process-group leader.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


def shell_job(ledger: Path, seconds: float, host: str = "", later: float | None = None) -> str:
    """A /bin/sh -c command that records its start and end around `sleep seconds`
    (`later` seconds from the second attempt on, when given)."""
    stamp = f'$TIDAL_JOB_ID $TIDAL_ATTEMPT $$ $(date +%s%N) {host}'
    pause = f"{seconds}" if later is None else (
        f'$([ "$TIDAL_ATTEMPT" = 1 ] && echo {seconds} || echo {later})')
    return (f'echo "start {stamp}" >> {ledger}; sleep {pause}; '
            f'echo "end {stamp}" >> {ledger}')


@dataclass(frozen=True)
class Mark:
    kind: str  # start | end
    job: str
    attempt: int
    pid: int
    ns: int
    host: str


def read(ledger: Path) -> list[Mark]:
    if not ledger.exists():
        return []
    marks = []
    for line in ledger.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 5:
            host = parts[5] if len(parts) > 5 else ""
            marks.append(Mark(parts[0], parts[1], int(parts[2]), int(parts[3]), int(parts[4]),
                              host))
    return marks


def started(ledger: Path, job: str, attempt: int) -> Mark | None:
    return next((m for m in read(ledger) if m.kind == "start" and m.job == job
                 and m.attempt == attempt), None)


def ended(ledger: Path, job: str, attempt: int) -> Mark | None:
    return next((m for m in read(ledger) if m.kind == "end" and m.job == job
                 and m.attempt == attempt), None)


def overlaps(marks: list[Mark], longest_ns: int) -> list[tuple[Mark, Mark]]:
    """Pairs of executions of the same host whose intervals intersect. An execution with
    no `end` (killed) is taken to last `longest_ns`, the longest a job runs."""
    ends = {(m.job, m.attempt, m.pid): m.ns for m in marks if m.kind == "end"}
    by_host: dict[str, list[tuple[int, int, Mark]]] = {}
    for m in marks:
        if m.kind == "start" and m.host:
            stop = ends.get((m.job, m.attempt, m.pid), m.ns + longest_ns)
            by_host.setdefault(m.host, []).append((m.ns, stop, m))
    found = []
    for runs in by_host.values():
        runs.sort(key=lambda r: r[0])
        latest_end, holder = -1, None
        for start, stop, m in runs:
            if holder is not None and start < latest_end:
                found.append((holder, m))
            if stop > latest_end:
                latest_end, holder = stop, m
    return found
