"""The CLI with the SDK client replaced: parsing, output streams, exit codes, error mapping."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from typer.testing import CliRunner

import cli.main
from cli.main import app, exit_code_for
from cli.output import ago
from common.errors import InvalidSubmission, JobNotFound, TidalError
from common.models import Health, Job, JobPage, LogLine, LogPage, State, TokenCreated, WorkerInfo

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def make_job(job_id: str = "01JOB", state: str = "pending", **extra: Any) -> Job:
    return Job.model_validate({
        "id": job_id, "state": state, "owner": "admin", "kind": "shell", "queue": "default",
        "priority": "normal", "command": ["echo", "hi"], "created_at": NOW, **extra,
    })


def make_line(entry_id: str, text: str, stream: str = "stdout") -> LogLine:
    return LogLine(id=entry_id, stream=stream, time=NOW, text=text)  # type: ignore[arg-type]


class FakeClient:
    """Stands in for common.client.Client; records what the CLI asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.final = make_job(state="completed", exit_code=0)
        self.lines: list[LogLine] = []
        self.error: Exception | None = None

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.calls.append(("close", None))

    def _call(self, name: str, arg: Any) -> None:
        self.calls.append((name, arg))
        if self.error is not None:
            raise self.error

    def submit(self, sub: dict[str, Any]) -> Job:
        self._call("submit", sub)
        return make_job()

    def follow(self, job_id: str, after: str | None = None,
               progress: bool = False) -> Iterator[LogLine | Job]:
        self._call("follow", job_id)
        yield from self.lines
        yield self.final

    def get(self, job_id: str) -> Job:
        self._call("get", job_id)
        return make_job(job_id, "failed", exit_code=2, error="boom", attempt=1)

    def list(self, state: Any = None, queue: Any = None, host: Any = None, owner: Any = None,
             limit: int = 50, cursor: Any = None) -> JobPage:
        self._call("list", {"state": state, "queue": queue, "limit": limit, "cursor": cursor})
        return JobPage(jobs=[make_job("A", "running"), make_job("B", "queued")], next_cursor="c")

    def iter_jobs(self, *args: Any, **kwargs: Any) -> Iterator[Job]:
        self._call("iter_jobs", args)
        yield from [make_job("A"), make_job("B"), make_job("C")]

    def iter_logs(self, job_id: str) -> Iterator[LogLine]:
        self._call("iter_logs", job_id)
        yield from self.lines

    def logs(self, job_id: str, cursor: Any = None, limit: int = 1000) -> LogPage:
        raise AssertionError("the CLI pages with iter_logs")

    def cancel(self, job_id: str) -> Job:
        self._call("cancel", job_id)
        return make_job(job_id, "cancelled")

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        self._call("wait", (job_id, timeout))
        return self.final

    def watch(self, job_id: str, timeout: float | None = None) -> Iterator[Job]:
        self._call("watch", (job_id, timeout))
        yield self.final

    def workers(self) -> list[WorkerInfo]:
        self._call("workers", None)
        return [WorkerInfo(id="w1", hostname="box", pid=42, queues=["default", "gpu"], slots=4,
                           running=["A"], last_heartbeat=datetime.now(UTC))]

    def health(self) -> Health:
        self._call("health", None)
        return Health(status="ok", redis=True, database=True, version="0.1.0")

    def create_token(self, user: str, admin: bool = False) -> TokenCreated:
        self._call("create_token", (user, admin))
        return TokenCreated(user=user, admin=admin, token="tdl_secret")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    client = FakeClient()
    made: list[tuple[str | None, str | None]] = []

    def factory(url: str | None = None, token: str | None = None) -> FakeClient:
        made.append((url, token))
        return client

    monkeypatch.setattr(cli.main, "get_client", factory)
    client.made = made  # type: ignore[attr-defined]
    return client


runner = CliRunner()


def submitted(fake: FakeClient) -> dict[str, Any]:
    (sub,) = [arg for name, arg in fake.calls if name == "submit"]
    return sub  # type: ignore[no-any-return]


# -- submit -----------------------------------------------------------------------------


def test_submit_prints_only_the_id(fake: FakeClient) -> None:
    result = runner.invoke(app, ["submit", "--", "echo", "hi"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "01JOB\n"
    assert result.stderr == ""
    assert submitted(fake) == {"kind": "shell", "command": ["echo", "hi"]}


def test_submit_json_prints_the_document(fake: FakeClient) -> None:
    result = runner.invoke(app, ["submit", "--json", "--", "echo", "hi"])
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["id"] == "01JOB" and doc["state"] == "pending" and doc["command"] == ["echo", "hi"]


def test_submit_options_become_the_submission(fake: FakeClient,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_SHELL", "yes")
    args = ["submit", "-q", "gpu", "--priority", "HIGH", "--timeout", "60", "--retries", "2",
            "--host", "hv-7", "--env", "A=B", "-e", "C=D=E", "--env", "FROM_SHELL",
            "--cwd", "/srv", "--tag", "team=infra", "--idempotency-key", "k-1",
            "--", "make", "-j4", "--keep-going"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert submitted(fake) == {
        "kind": "shell", "command": ["make", "-j4", "--keep-going"], "queue": "gpu",
        "priority": "high", "timeout": 60.0, "retries": 2, "host": "hv-7",
        "env": {"A": "B", "C": "D=E", "FROM_SHELL": "yes"}, "cwd": "/srv",
        "tags": {"team": "infra"}, "idempotency_key": "k-1",
    }


def test_words_after_the_command_belong_to_it(fake: FakeClient) -> None:
    result = runner.invoke(app, ["submit", "ls", "-la", "--follow"])
    assert result.exit_code == 0, result.output
    assert submitted(fake)["command"] == ["ls", "-la", "--follow"]
    assert not any(name == "follow" for name, _ in fake.calls)


def test_shell_joins_the_words(fake: FakeClient) -> None:
    result = runner.invoke(app, ["submit", "--shell", "--", "echo", "a", "&&", "echo", "b"])
    assert result.exit_code == 0
    assert submitted(fake) == {"kind": "shell", "command": "echo a && echo b"}


def test_python_job_arguments_are_jsonish(fake: FakeClient) -> None:
    words = ["tasks.reports:build", "3", "text", '{"a": [1]}', "dry_run=true", "name=x"]
    result = runner.invoke(app, ["submit", "--python", "--", *words])
    assert result.exit_code == 0, result.output
    assert submitted(fake) == {"kind": "python", "function": "tasks.reports:build",
                               "args": [3, "text", {"a": [1]}],
                               "kwargs": {"dry_run": True, "name": "x"}}


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--priority", "urgent", "--", "true"], "urgent"),
        (["--env", "NOEQUALS_AND_UNSET_1234", "--", "true"], "KEY=VALUE"),
        (["--tag", "=v", "--", "true"], "KEY=VALUE"),
        (["--retries", "-1", "--", "true"], "--retries"),
        (["--shell", "--python", "--", "true"], "not both"),
        ([], "Missing argument"),
    ],
)
def test_bad_options_are_usage_errors(fake: FakeClient, args: list[str], complaint: str) -> None:
    result = runner.invoke(app, ["submit", *args])
    assert result.exit_code == 2
    assert complaint in result.stderr
    assert not any(name == "submit" for name, _ in fake.calls)


def test_connection_flags_reach_the_factory(fake: FakeClient) -> None:
    result = runner.invoke(app, ["submit", "--url", "http://x:1", "--token", "t", "--", "true"])
    assert result.exit_code == 0
    assert fake.made == [("http://x:1", "t")]  # type: ignore[attr-defined]


# -- follow -----------------------------------------------------------------------------------


def test_follow_splits_streams_and_exits_with_the_job_code(fake: FakeClient) -> None:
    fake.lines = [make_line("1-0", "hello"), make_line("2-0", "oops", "stderr"),
                  make_line("3-0", "[red]not markup[/]")]
    fake.final = make_job(state="failed", exit_code=3, reason="exit_code")
    result = runner.invoke(app, ["submit", "--follow", "--", "sh", "-c", "exit 3"])
    assert result.exit_code == 3
    assert result.stdout == "hello\n[red]not markup[/]\n"
    assert result.stderr.startswith("oops\n")
    assert "failed" in result.stderr and "hello" not in result.stderr
    assert ("follow", "01JOB") in fake.calls


def test_follow_json_is_one_document_per_line(fake: FakeClient) -> None:
    fake.lines = [make_line("1-0", "hello")]
    result = runner.invoke(app, ["submit", "-f", "--json", "--", "true"])
    assert result.exit_code == 0
    docs = [json.loads(line) for line in result.stdout.splitlines()]
    assert docs[0]["text"] == "hello" and docs[0]["stream"] == "stdout"
    assert docs[1]["state"] == "completed"


def test_ctrl_c_while_following_exits_130_and_says_the_job_goes_on(
    fake: FakeClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(job_id: str, after: str | None = None,
                    progress: bool = False) -> Iterator[LogLine | Job]:
        yield make_line("1-0", "hello")
        raise KeyboardInterrupt

    monkeypatch.setattr(fake, "follow", interrupted)
    result = runner.invoke(app, ["submit", "-f", "--", "sleep", "60"])
    assert result.exit_code == 130
    assert result.stdout == "hello\n"
    assert "job 01JOB keeps running" in result.stderr


def test_logs_prints_every_line_and_follow_streams(fake: FakeClient) -> None:
    fake.lines = [make_line("1-0", "a"), make_line("2-0", "b", "stderr")]
    result = runner.invoke(app, ["logs", "J1"])
    assert (result.exit_code, result.stdout, result.stderr) == (0, "a\n", "b\n")
    result = runner.invoke(app, ["logs", "-f", "J1"])
    assert result.exit_code == 0 and result.stdout == "a\n"
    assert ("follow", "J1") in fake.calls


@pytest.mark.parametrize(
    ("state", "extra", "code"),
    [
        ("completed", {"exit_code": 0}, 0),
        ("completed", {}, 0),
        ("failed", {"exit_code": 3}, 3),
        ("failed", {}, 1),
        ("failed", {"exit_code": 0}, 1),
        ("failed", {"exit_code": -9}, 137),
        ("expired", {}, 1),
        ("cancelled", {}, 130),
        ("cancelled", {"exit_code": -15}, 130),
        ("failed", {"reason": "timeout", "exit_code": -9}, 124),
    ],
)
def test_exit_code_for(state: str, extra: dict[str, Any], code: int) -> None:
    assert exit_code_for(make_job(state=state, **extra)) == code


# -- errors -----------------------------------------------------------------------------------


def test_not_found_is_one_red_line_and_exit_1(fake: FakeClient) -> None:
    fake.error = JobNotFound("job NOPE not found")
    result = runner.invoke(app, ["status", "NOPE"])
    assert result.exit_code == 1
    assert result.stderr == "error: job NOPE not found\n"
    assert result.stdout == ""


def test_invalid_submission_shows_its_details(fake: FakeClient) -> None:
    fake.error = InvalidSubmission("invalid job submission",
                                   [{"loc": ["body", "timeout"], "msg": "must be > 0"}])
    result = runner.invoke(app, ["submit", "--timeout", "0", "--", "true"])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == ["error: invalid job submission",
                                          "  body.timeout: must be > 0"]


def test_unreachable_api_message(fake: FakeClient) -> None:
    fake.error = TidalError("cannot reach the Tidal API at http://127.0.0.1:8000: is `tidal up` "
                            "running?")
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 1
    assert "cannot reach the Tidal API" in result.stderr


def test_real_client_error_is_mapped_too(monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Any) -> None:
    """No fake: the real factory against a port nobody listens on."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    from common.valkey import free_port

    result = runner.invoke(app, ["status", "X", "--url", f"http://127.0.0.1:{free_port()}"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: cannot reach the Tidal API at http://127.0.0.1:")


# -- the other commands ------------------------------------------------------------------------


def test_status_panel_and_json(fake: FakeClient) -> None:
    result = runner.invoke(app, ["status", "J1"])
    assert result.exit_code == 0
    for text in ("J1", "failed", "default", "normal", "admin", "boom", "echo hi", "exit code"):
        assert text in result.stdout
    result = runner.invoke(app, ["status", "J1", "--json"])
    assert json.loads(result.stdout)["error"] == "boom"


def test_list_table_page_and_all(fake: FakeClient) -> None:
    result = runner.invoke(app, ["list", "--state", "running", "-n", "5"])
    assert result.exit_code == 0, result.output
    assert "running" in result.stdout and "A" in result.stdout and "ago" in result.stdout
    assert "--all" in result.stderr  # tells how to get more
    assert ("list", {"state": "running", "queue": None, "limit": 5, "cursor": None}) in fake.calls
    result = runner.invoke(app, ["list", "--all", "--json"])
    doc = json.loads(result.stdout)
    assert [j["id"] for j in doc["jobs"]] == ["A", "B", "C"] and doc["next_cursor"] is None


def test_list_rejects_unknown_state(fake: FakeClient) -> None:
    assert runner.invoke(app, ["list", "--state", "sleeping"]).exit_code == 2


def test_cancel_workers_health_token(fake: FakeClient) -> None:
    result = runner.invoke(app, ["cancel", "J1"])
    assert result.exit_code == 0 and "cancelled" in result.stderr
    result = runner.invoke(app, ["workers"])
    assert result.exit_code == 0 and "box" in result.stdout and "default,gpu" in result.stdout
    assert json.loads(runner.invoke(app, ["workers", "--json"]).stdout)[0]["pid"] == 42
    result = runner.invoke(app, ["health"])
    assert result.exit_code == 0 and "ok" in result.stdout
    result = runner.invoke(app, ["token", "create", "--user", "ci", "--admin"])
    assert result.exit_code == 0 and result.stdout == "tdl_secret\n"
    assert ("create_token", ("ci", True)) in fake.calls


def test_wait_exits_with_the_job_code(fake: FakeClient) -> None:
    fake.final = make_job(state="failed", exit_code=4)
    result = runner.invoke(app, ["wait", "J1", "--timeout", "5"])
    assert result.exit_code == 4
    assert ("watch", ("J1", 5.0)) in fake.calls


def test_wait_timeout_is_an_error(fake: FakeClient) -> None:
    fake.error = TimeoutError("job J1 is still running after 1s")
    result = runner.invoke(app, ["wait", "J1", "--timeout", "1"])
    assert result.exit_code == 1 and result.stderr == "error: job J1 is still running after 1s\n"


# -- service commands --------------------------------------------------------------------------


def test_service_settings_redis_url_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    for name in ("TIDAL_REDIS_URL", "TIDAL_DATA_DIR", "TIDAL_URL", "TIDAL_CONCURRENCY"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main.service_settings(None).redis_url == "redis://127.0.0.1:6379/0"
    (tmp_path / ".tidal").mkdir()
    (tmp_path / ".tidal/cli.json").write_text(
        json.dumps({"url": "http://127.0.0.1:8000", "redis_url": "redis://file:1/0"}))
    assert cli.main.service_settings(None).redis_url == "redis://file:1/0"
    monkeypatch.setenv("TIDAL_REDIS_URL", "redis://env:2/0")
    assert cli.main.service_settings(None).redis_url == "redis://env:2/0"
    settings = cli.main.service_settings("redis://flag:3/0", concurrency=9, queues=None)
    assert (settings.redis_url, settings.concurrency, settings.queues) == (
        "redis://flag:3/0", 9, ["default"])


def test_ago() -> None:
    assert ago(None) == "-"
    assert ago(NOW - timedelta(seconds=3), NOW) == "3s ago"
    assert ago(NOW - timedelta(minutes=5, seconds=9), NOW) == "5m ago"
    assert ago(NOW - timedelta(hours=2), NOW) == "2h ago"
    assert ago(NOW - timedelta(days=4), NOW) == "4d ago"
    assert ago(NOW + timedelta(seconds=30), NOW) == "in 30s"


def test_states_are_all_coloured() -> None:
    from cli.output import STATE_STYLES

    assert set(STATE_STYLES) == set(State)


def test_dashboard_prints_the_page_with_the_token_in_its_fragment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    opened: list[str] = []
    monkeypatch.setattr("webbrowser.open", lambda address: opened.append(address) or True)
    monkeypatch.setenv("TIDAL_URL", "http://127.0.0.1:8123/")
    monkeypatch.setenv("TIDAL_TOKEN", "tdl_a+b/c")
    result = runner.invoke(app, ["dashboard"])
    assert result.exit_code == 0, result.output
    assert result.stdout == "http://127.0.0.1:8123/#token=tdl_a%2Bb%2Fc\n"
    assert opened == ["http://127.0.0.1:8123/#token=tdl_a%2Bb%2Fc"]
    opened.clear()
    result = runner.invoke(app, ["dashboard", "--no-open"])
    assert result.exit_code == 0 and opened == []
