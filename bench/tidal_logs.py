"""Log throughput: one shell job printing M lines (`seq 1 M`) while a live follower on the
SSE endpoint counts them (raw frames, no per-line parsing beyond the count, so the
client is not what is measured). Lines/s = M / (end event − first line received); the
count must equal M and the last line must be M."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx

from bench.env import Tidal


def run_once(t: Tidal, m: int, timeout: float = 300) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {t.token}"}
    with httpx.Client(base_url=t.url, headers=headers, timeout=60) as http:
        t0 = time.perf_counter()
        r = http.post("/jobs", json={"command": ["seq", "1", str(m)]})
        r.raise_for_status()
        job_id = r.json()["id"]
        result: dict[str, Any] = {"lines": 0}

        def follow() -> None:
            first = None
            count = 0
            tail = b""
            last_data = b""
            with httpx.Client(base_url=t.url, headers=headers,
                              timeout=httpx.Timeout(60, read=120)) as h, \
                 h.stream("GET", f"/jobs/{job_id}/logs", params={"follow": "true"}) as resp:
                for chunk in resp.iter_bytes():
                    if first is None:
                        first = time.perf_counter()
                    buf = tail + chunk
                    count += buf.count(b"\nevent: line\n")
                    ended = b"event: end" in buf
                    if not ended:
                        cut = buf.rfind(b"\n\n")
                        if cut >= 0:
                            frame = buf[:cut]
                            at = frame.rfind(b"data: ")
                            if at >= 0:
                                last_data = frame[at:]
                        tail = buf[-12:]  # shorter than the pattern: no match is counted twice
                    else:
                        body = buf[:buf.find(b"event: end")]
                        at = body.rfind(b"data: ")
                        if at >= 0:
                            last_data = body[at:]
                        break
            result.update(lines=count, first=first, end=time.perf_counter(),
                          last=last_data[:200].decode(errors="replace"))

        th = threading.Thread(target=follow, daemon=True)
        th.start()
        th.join(timeout)
    if th.is_alive():
        raise RuntimeError("log follow did not end in time")
    span = result["end"] - (result["first"] or t0)
    return {
        "lines_expected": m,
        "lines_received": result["lines"],
        "none_lost": result["lines"] == m and f'"text":"{m}"' in result["last"],
        "lines_per_s": round(result["lines"] / span, 1),
        "submit_to_end_s": round(result["end"] - t0, 3),
        "lines_per_s_from_submit": round(result["lines"] / (result["end"] - t0), 1),
    }
