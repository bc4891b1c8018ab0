"""The worker's LogWriter and log_append.lua against the real server: joined runs of
lines come back as one stream entry per line, in order, with their fields."""

from __future__ import annotations

import redis

from common.keys import Keys
from worker.output import LineSplitter, LogWriter


def test_a_flood_is_one_entry_per_line_in_order(r: redis.Redis, keys: Keys) -> None:
    w = LogWriter(r, keys, "j1", flush_ms=10_000, max_lines=100_000)
    splitter = LineSplitter(16)
    data = b"".join(b"%d\n" % i for i in range(2500)) + b"\r\n" + b"y" * 20 + b"\n\xc3\xa9\n"
    for start in range(0, len(data), 4096):
        w.add_chunks("o", splitter.feed(data[start:start + 4096]))
    w.add("x", "two\nlines")
    w.add_chunks("e", [("err", False)] + splitter.close())
    w.close()
    entries = r.xrange(keys.log("j1"))
    got = [(f["s"], f["l"], f.get("c")) for _, f in entries]
    assert got == [("o", str(i), None) for i in range(2500)] + [
        ("o", "", None), ("o", "y" * 16, "1"), ("o", "y" * 4, None), ("o", "é", None),
        ("x", "two\nlines", None), ("e", "err", None)]
    assert all(f["t"].isdigit() for _, f in entries)
    assert w.written == len(entries)
