"""Log throughput: one shell job printing M lines (`seq 1 M`) while a live follower on the
SSE endpoint counts them (raw frames, no per-line parsing beyond the count, so the
client is not what is measured). Lines/s = M / (end event − first line received); the
count must equal M and the last line must be M.

The follower asks for batched frames (`?batch=true`, as the SDK and `tidal logs -f` do):
one `lines` event per read, each line an object `{"id":…,"stream":…,"time":…,"text":…}`
inside it, counted by its `{"id":"` (a line's text is a JSON string, where a quote is
always escaped, so the pattern cannot occur inside it). `batch=False` measures the
per-line `line` frames instead; both kinds are counted, so a server that does not know
`batch` (python -m bench --source git:<older commit>) is measured too."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from bench.env import Tidal

LINE_FRAME = b"\nevent: line\n"
LINE_ITEM = b'{"id":"'
END = b"event: end"
PATTERNS = (LINE_FRAME, LINE_ITEM)  # neither occurs in the other kind of frame


def run_once(t: Tidal, m: int, timeout: float = 300, batch: bool = True) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {t.token}"}
    params = {"follow": "true", **({"batch": "true"} if batch else {})}
    with httpx.Client(base_url=t.url, headers=headers, timeout=60) as http:
        t0 = time.perf_counter()
        r = http.post("/jobs", json={"command": ["seq", "1", str(m)]})
        r.raise_for_status()
        job_id = r.json()["id"]
        result: dict[str, Any] = {"lines": 0}

        def follow() -> None:
            first = None
            count = 0
            carry = b""  # the last bytes of the previous chunks (a match may straddle)
            recent = b""  # the last bytes received: the last line is in them
            with httpx.Client(base_url=t.url, headers=headers,
                              timeout=httpx.Timeout(60, read=120)) as h, \
                 h.stream("GET", f"/jobs/{job_id}/logs", params=params) as resp:
                for chunk in resp.iter_bytes():
                    if first is None:
                        first = time.perf_counter()
                    buf = carry + chunk
                    end = buf.find(END)
                    # matches wholly inside `carry` were counted with the previous chunk
                    for pattern in PATTERNS:  # either kind: a server without batch too
                        count += buf.count(pattern, 0, end if end >= 0 else len(buf))
                        count -= carry.count(pattern)
                    recent = (recent + chunk)[-(400 + len(chunk)):]
                    if end >= 0:
                        recent = recent[:recent.find(END)]
                        break
                    carry = buf[-16:]
            result.update(lines=count, first=first, end=time.perf_counter(),
                          last=recent[-200:].decode(errors="replace"))

        th = threading.Thread(target=follow, daemon=True)
        th.start()
        th.join(timeout)
    if th.is_alive():
        raise RuntimeError("log follow did not end in time")
    span = result["end"] - (result["first"] or t0)
    return {
        "lines_expected": m,
        "lines_received": result["lines"],
        "frames": "lines" if batch else "line",
        "none_lost": result["lines"] == m and f'"text":"{m}"' in result["last"],
        "lines_per_s": round(result["lines"] / span, 1),
        "submit_to_end_s": round(result["end"] - t0, 3),
        "lines_per_s_from_submit": round(result["lines"] / (result["end"] - t0), 1),
    }
