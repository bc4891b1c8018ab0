"""CLI options and commands of the scheduling rules, with the SDK client replaced."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.main import app, parse_duration
from common.cron import Schedule
from common.models import HostInfo
from tests.unit.test_cli import FakeClient, make_job

runner = CliRunner()


class SchedulingClient(FakeClient):
    def retry(self, job_id: str) -> Any:
        self._call("retry", job_id)
        return make_job(job_id, "pending")

    def hosts(self) -> list[HostInfo]:
        self._call("hosts", None)
        return [HostInfo(host="hv1", holder="01A", waiters=["01B", "01C"], waiting=2)]

    def create_schedule(self, name: str, cron: str, job: dict[str, Any]) -> Schedule:
        self._call("create_schedule", (name, cron, job))
        return Schedule(name=name, cron=cron, job=job, owner="admin")  # type: ignore[arg-type]


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> SchedulingClient:
    c = SchedulingClient()
    monkeypatch.setattr("cli.main.get_client", lambda *a, **k: c)
    return c


def submitted(client: SchedulingClient) -> dict[str, Any]:
    return next(arg for name, arg in client.calls if name == "submit")


def test_after_in_and_resources_become_the_submission(client: SchedulingClient) -> None:
    out = runner.invoke(app, ["submit", "--after", "01A", "--after", "01B:any", "--in", "10m",
                              "--cpu", "2", "--memory", "512", "--", "make", "test"])
    assert out.exit_code == 0, out.output
    sub = submitted(client)
    assert sub["depends_on"] == [{"id": "01A", "on": "success"}, {"id": "01B", "on": "any"}]
    assert sub["resources"] == {"cpu": 2.0, "memory_mb": 512}
    start = datetime.fromisoformat(sub["scheduled_at"])
    assert timedelta(minutes=9) < start - datetime.now(UTC) <= timedelta(minutes=10)


def test_at_takes_an_iso_time(client: SchedulingClient) -> None:
    out = runner.invoke(app, ["submit", "--at", "2030-01-02T03:04:05Z", "--", "true"])
    assert out.exit_code == 0, out.output
    assert submitted(client)["scheduled_at"].startswith("2030-01-02T03:04:05")


@pytest.mark.parametrize("args", [["--at", "tomorrow"], ["--in", "ten"], ["--after", "01A:maybe"],
                                  ["--at", "10:00", "--in", "1m"]])
def test_bad_start_and_dependency_options_are_usage_errors(
    client: SchedulingClient, args: list[str]
) -> None:
    out = runner.invoke(app, ["submit", *args, "--", "true"])
    assert out.exit_code == 2
    assert not [c for c in client.calls if c[0] == "submit"]


@pytest.mark.parametrize(("text", "seconds"), [("90", 90), ("90s", 90), ("10m", 600),
                                               ("2h", 7200), ("1.5d", 129600)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_retry_hosts_and_cron_add(client: SchedulingClient) -> None:
    assert runner.invoke(app, ["retry", "01A"]).output.strip() == "01A"
    hosts = runner.invoke(app, ["hosts"]).output
    assert "hv1" in hosts and "01A" in hosts and "01B" in hosts
    out = runner.invoke(app, ["cron", "add", "nightly", "--cron", "0 3 * * *", "--priority",
                              "low", "--", "make", "backup"])
    assert out.exit_code == 0, out.output
    name, cron, job = next(arg for n, arg in client.calls if n == "create_schedule")
    assert (name, cron, job["command"], job["priority"]) == (
        "nightly", "0 3 * * *", ["make", "backup"], "low")
