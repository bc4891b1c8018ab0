"""Line splitting, decoding and log batching, without Redis."""

from __future__ import annotations

from typing import Any

import pytest

from common.keys import Keys
from worker.output import BATCH_LINES, LineSplitter, LogWriter, decode, text_chunks
from worker.python import is_allowed


def split(chunks: list[bytes], max_bytes: int = 64) -> list[tuple[str, bool]]:
    s = LineSplitter(max_bytes)
    out: list[tuple[str, bool]] = []
    for data in chunks:
        out += s.feed(data)
    return out + s.close()


@pytest.mark.parametrize(
    ("chunks", "expected"),
    [
        ([b"a\nb\n"], [("a", False), ("b", False)]),
        ([b"a", b"b\nc"], [("ab", False), ("c", False)]),  # lines across reads; last unfinished
        ([b"x\r\n", b"y\r\r\n"], [("x", False), ("y\r", False)]),  # one trailing \r stripped
        ([b"\n\n"], [("", False), ("", False)]),  # empty lines kept
        ([b""], []),
        ([b"no newline"], [("no newline", False)]),
        ([b"a\r"], [("a", False)]),
    ],
)
def test_splits_on_newlines(chunks: list[bytes], expected: list[tuple[str, bool]]) -> None:
    assert split(chunks) == expected


def test_long_line_is_cut_and_marked_continued() -> None:
    out = split([b"a" * 10 + b"\n"], max_bytes=4)
    assert out == [("aaaa", True), ("aaaa", True), ("aa", False)]


def test_long_line_without_newline_is_cut_while_it_streams() -> None:
    s = LineSplitter(4)
    assert s.feed(b"abcdefghij") == [("abcd", True), ("efgh", True)]
    assert s.feed(b"k\n") == [("ijk", False)]
    assert s.close() == []


def test_exact_multiple_ends_with_a_final_chunk() -> None:
    assert split([b"abcdefgh\n"], max_bytes=4) == [("abcd", True), ("efgh", False)]


def test_cut_never_splits_a_utf8_character() -> None:
    text = "é" * 10  # 2 bytes each
    out = split([text.encode()], max_bytes=5)
    assert all("\ufffd" not in t for t, _ in out)
    assert "".join(t for t, _ in out) == text
    assert all(len(t.encode()) <= 5 for t, _ in out)
    euro = "€€€"  # 3 bytes each
    out = split([euro.encode() + b"\n"], max_bytes=4)
    assert [t for t, _ in out] == ["€", "€", "€"]


def test_binary_is_decoded_with_replacement() -> None:
    assert decode(b"ok \xff\xfe end") == "ok \ufffd\ufffd end"
    out = split([bytes(range(256)) * 4], max_bytes=100)
    assert out and all(isinstance(t, str) for t, _ in out)
    assert any("\ufffd" in t for t, _ in out)


def test_partial_line_memory_is_bounded() -> None:
    s = LineSplitter(1024)
    for _ in range(100):
        s.feed(b"z" * 10_000)
        assert len(s._partial) <= 1024


def test_text_chunks() -> None:
    assert text_chunks("hello", 100) == [("hello", False)]
    assert text_chunks("abcdef", 4) == [("abcd", True), ("ef", False)]


@pytest.mark.parametrize(
    ("module", "allowed", "ok"),
    [
        ("common.tasks", ["common.tasks"], True),
        ("tasks.reports", ["tasks"], True),
        ("tasks", ["tasks"], True),
        ("tasksx", ["tasks"], False),
        ("os", ["tasks", "common.tasks"], False),
        ("common", ["common.tasks"], False),
        ("anything", [""], False),
    ],
)
def test_allow_list(module: str, allowed: list[str], ok: bool) -> None:
    assert is_allowed(module, allowed) is ok


class FakePipe:
    """A pipeline that understands the writer's two scripts: a log_append.lua call is
    recorded as the XADDs and the PUBLISH it runs, a progress.lua call as ("progress",
    (keys, args)); `execute` answers one reply per script call."""

    def __init__(self, sink: list[list[tuple[str, Any]]], fail: bool, answer: int,
                 cap: int) -> None:
        self.sink, self.fail, self.answer, self.cap, self.ops = sink, fail, answer, cap, []
        self.replies: list[Any] = []

    def __len__(self) -> int:  # commands queued so far: one reply each
        return len(self.replies)

    def evalsha(self, sha: str, numkeys: int, *rest: Any) -> None:
        keys, args = list(rest[:numkeys]), list(rest[numkeys:])
        if sha == "progress":
            self.ops.append(("progress", (keys, args)))
            self.replies.append(self.answer)
            return
        assert sha == "log_append"
        maxlen, channel, count, lines = int(args[0]), args[1], args[2], args[3:]
        added = 0
        for i in range(0, len(lines), 4):
            stream, at, text, continued = lines[i:i + 4]
            # c = 'n': several whole lines, each ended by '\n' (see log_append.lua)
            assert continued != "n" or text.endswith("\n")
            for line in text.split("\n")[:-1] if continued == "n" else [text]:
                fields: dict[str, Any] = {"s": stream, "t": at, "l": line}
                if continued == "1":
                    fields["c"] = "1"
                self.xadd(keys[0], fields, maxlen=maxlen, approximate=True)
                added += 1
        if channel:
            self.publish(channel, count)
        self.replies.append(added)

    def xadd(self, key: str, fields: dict[str, Any], maxlen: int, approximate: bool) -> None:
        # the output cap, plus one per progress entry written (they never push output out)
        progress = sum(1 for batch in self.sink for op, _ in batch if op == "progress")
        assert approximate and maxlen == self.cap + progress + self._progress_here()
        self.ops.append(("xadd", (key, fields)))

    def _progress_here(self) -> int:
        return sum(1 for op, _ in self.ops if op == "progress")

    def publish(self, channel: str, count: int) -> None:
        self.ops.append(("publish", (channel, count)))

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        import redis

        if self.fail:
            raise redis.ConnectionError("down")
        self.sink.append(self.ops)
        return self.replies


class FakeScript:
    """A registered script, known by its name (its `sha` here)."""

    def __init__(self, name: str, source: str) -> None:
        self.sha, self.script = name, source


class FakeClient:
    def __init__(self, max_lines: int = 1000) -> None:
        self.batches: list[list[tuple[str, Any]]] = []
        self.fail = False
        self.progress_answer = 1  # what progress.lua answers (-1: a stale token)
        self.max_lines = max_lines  # the writer's output cap, checked on every XADD

    def pipeline(self, transaction: bool = True) -> FakePipe:
        assert transaction is False
        return FakePipe(self.batches, self.fail, self.progress_answer, self.max_lines)

    def register_script(self, source: str) -> FakeScript:
        for name in ("progress", "log_append"):
            if f"-- {name}.lua:" in source:
                return FakeScript(name, source)
        return FakeScript("other", source)


def writer(client: FakeClient, flush_ms: int = 10_000) -> LogWriter:
    return LogWriter(client, Keys("{p}"), "j1", flush_ms=flush_ms, max_lines=1000)


def test_one_flush_is_one_pipeline_with_one_publish() -> None:
    client = FakeClient()
    w = writer(client)
    w.add("o", "out")
    w.add("e", "err", continued=True)
    w.add("x", "sys")
    assert client.batches == []  # not due yet
    w.close()
    [ops] = client.batches
    assert [op for op, _ in ops] == ["xadd", "xadd", "xadd", "publish"]
    key, fields = ops[0][1]
    assert key == "{p}:log:j1"
    assert fields["s"] == "o" and fields["l"] == "out" and isinstance(fields["t"], int)
    assert "c" not in fields
    assert ops[1][1][1]["c"] == "1"
    assert ops[3][1] == ("{p}:logs:j1", 3)
    w.add("o", "after close")
    w.flush()
    assert len(client.batches) == 1


def test_flushes_when_the_batch_is_full() -> None:
    client = FakeClient()
    w = writer(client)
    for i in range(BATCH_LINES):
        w.add("o", str(i))
    assert len(client.batches) == 1 and len(client.batches[0]) == BATCH_LINES + 1


def test_flush_if_due_follows_the_first_unflushed_line() -> None:
    client = FakeClient()
    w = writer(client, flush_ms=0)
    assert w.due_in() is None
    w.add("o", "a")
    assert w.due_in() == 0.0
    w.flush_if_due()
    assert len(client.batches) == 1
    assert w.due_in() is None


def test_lines_survive_a_failed_flush_in_order() -> None:
    client = FakeClient()
    w = writer(client)
    w.add("o", "1")
    client.fail = True
    assert w.flush() is False
    w.add("o", "2")
    client.fail = False
    assert w.flush() is True
    texts = [args[1]["l"] for op, args in client.batches[0] if op == "xadd"]
    assert texts == ["1", "2"]


def test_the_ascii_fast_path_splits_like_the_general_one() -> None:
    """LineSplitter's one-decode path gives the same chunks as the byte-by-line path, for
    any cut of the input (CR, over-long lines, non-ASCII and empty lines included)."""
    import random

    class Slow(LineSplitter):
        def _feed_ascii(self, data: bytes) -> list[tuple[str, bool]] | None:
            return None

    rng = random.Random(7)
    pieces = [b"a", b"bc", b"\n", b"\r\n", b"\n\n", b"x" * 9, b"\xc3\xa9", b"\xff", b"12345"]
    for _ in range(300):
        data = b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(0, 6))))
        fast, slow = LineSplitter(8), Slow(8)
        got: list[tuple[str, bool]] = []
        want: list[tuple[str, bool]] = []
        start = 0
        for cut in [*cuts, len(data)]:
            got += fast.feed(data[start:cut])
            want += slow.feed(data[start:cut])
            start = cut
        assert got + fast.close() == want + slow.close(), data


def test_a_flood_goes_out_joined_and_comes_back_line_by_line() -> None:
    """Lines of one read share their time and travel as one argument; continued chunks,
    lines holding a newline and another stream break the run; every line is one entry."""
    client = FakeClient()
    w = writer(client)
    w.add_chunks("o", [("1", False), ("2", False), ("", False), ("long", True), ("er", False)])
    w.add("x", "two\nlines")
    w.add_chunks("e", [("e1", False), ("e2", False)])
    w.close()
    [ops] = client.batches
    entries = [fields for op, (_, fields) in ops if op == "xadd"]
    assert [(f["s"], f["l"], f.get("c")) for f in entries] == [
        ("o", "1", None), ("o", "2", None), ("o", "", None), ("o", "long", "1"),
        ("o", "er", None), ("x", "two\nlines", None), ("e", "e1", None), ("e", "e2", None)]
    assert ops[-1] == ("publish", ("{p}:logs:j1", 8))


def test_add_chunks_counts_the_budget_like_add() -> None:
    client = FakeClient(max_lines=5)
    w = LogWriter(client, Keys("{p}"), "j1", flush_ms=10_000, max_lines=5)
    w.add_chunks("o", [(str(i), False) for i in range(3)])
    assert not w.full
    w.add_chunks("o", [(str(i), False) for i in range(3, 8)])
    assert w.full
    w.close()
    texts = [f["l"] for batch in client.batches for op, (_, f) in batch if op == "xadd"]
    assert texts[:5] == ["0", "1", "2", "3", "4"] and "5" not in texts
