"""The Python SDK: a typed, synchronous httpx client, one method per REST endpoint.

    from common.client import Client

    with Client.from_config() as tidal:            # finds the URL and token like the CLI
        job = tidal.submit({"command": ["sh", "-c", "make test"], "priority": "high"})
        for item in tidal.follow(job.id):          # LogLine per output line, then the Job
            ...
        for item in tidal.follow(job.id, progress=True):   # ProgressUpdate items too
            ...
        final = tidal.wait(job.id, timeout=600)
        for job in tidal.watch(job.id):            # the document each time it changes

Every error the API answers (`{"error": {"code", "message", "details"}}`) becomes the
matching `common.errors` exception in one function, `error_from_response`.
"""

from __future__ import annotations

import builtins
import math
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Self
from urllib.parse import quote

import httpx
import orjson
from pydantic import TypeAdapter, ValidationError

from common import config
from common.cron import Schedule
from common.errors import (
    Conflict,
    Forbidden,
    InvalidSubmission,
    JobNotFound,
    LimitExceeded,
    RedisUnavailable,
    TidalError,
    Unauthorized,
)
from common.http import LeanHTTP
from common.models import (
    Health,
    HostInfo,
    Job,
    JobBatch,
    JobEvents,
    JobPage,
    JobSubmission,
    LogLine,
    LogPage,
    ProgressUpdate,
    QueueInfo,
    State,
    TokenCreated,
    WorkerInfo,
)

__all__ = ["Client", "ProgressUpdate", "SSEEvent", "error_from_response", "iter_sse"]

USER_AGENT = "tidal-sdk/0.1"

_ERRORS: dict[int, type[TidalError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: JobNotFound,
    409: Conflict,
    413: InvalidSubmission,
    415: InvalidSubmission,
    422: InvalidSubmission,
    429: LimitExceeded,
    503: RedisUnavailable,
}
# Answers worth another try when nothing can have been applied twice (or the call is idempotent).
_RETRY_STATUS = frozenset({502, 503, 504})

_workers_adapter = TypeAdapter(list[WorkerInfo])
_hosts_adapter = TypeAdapter(list[HostInfo])
_queues_adapter = TypeAdapter(list[QueueInfo])
_schedules_adapter = TypeAdapter(list[Schedule])
_submissions_adapter = TypeAdapter(list[JobSubmission])
_JSON_BODY = {"Content-Type": "application/json"}


def error_from_response(response: httpx.Response) -> TidalError:
    """The one mapping of an error answer to a `common.errors` exception."""
    status = response.status_code
    message, details = f"HTTP {status} from {response.request.url}", None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        message = str(body["error"].get("message") or message)
        details = body["error"].get("details")
    elif response.text:
        message = f"{message}: {response.text[:200]}"
    return _ERRORS.get(status, TidalError)(message, details)


# -- Server-Sent Events ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str
    data: str
    id: str | None = None


def iter_sse(lines: Iterable[str]) -> Iterator[SSEEvent]:
    """Parse SSE lines (without line endings) into events. An event is dispatched only at
    its closing blank line, so a frame cut off by a dropped connection is never yielded.
    Comments (`: ping`) and unknown fields are skipped."""
    event: str | None = None
    data: list[str] = []
    event_id: str | None = None
    for line in lines:
        if not line:
            if data or event is not None:
                yield SSEEvent(event or "message", "\n".join(data), event_id)
            event, data, event_id = None, [], None
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            event = value
        elif name == "data":
            data.append(value)
        elif name == "id":
            event_id = value


def _entry_key(entry_id: str) -> tuple[int, int] | None:
    """A stream entry id `<ms>-<seq>` as a comparable tuple (None if it is not one)."""
    ms, _, seq = entry_id.partition("-")
    try:
        return int(ms), int(seq or 0)
    except ValueError:
        return None


def _is_after(entry_id: str, last: str | None) -> bool:
    if last is None:
        return True
    a, b = _entry_key(entry_id), _entry_key(last)
    return a > b if a is not None and b is not None else entry_id != last


def _finite(value: Any) -> bool:
    """False if a float anywhere inside is NaN or ±Infinity."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list | tuple):
        return all(_finite(v) for v in value)
    return True


def _job_path(job_id: str, suffix: str = "") -> str:
    """/jobs/<id><suffix>, with the id quoted so it can only ever be one path segment."""
    return f"/jobs/{quote(job_id, safe='')}{suffix}"


class _StreamEnded(Exception):
    """The SSE stream closed before its `end` event."""


# -- the client --------------------------------------------------------------------------


class Client:
    """A typed client of the Tidal REST API. Use as a context manager, or call close()."""

    follow_attempts = 8  # reconnects in a row without progress before follow() gives up
    long_poll_s = 30.0  # how long wait() asks the server to hold each GET /jobs/{id}
    submit_attempts = 3  # tries of a submission that carries an idempotency_key

    def __init__(
        self,
        url: str = config.DEFAULT_URL,
        token: str | None = None,
        timeout: float = 30.0,
        *,
        transport: httpx.BaseTransport | None = None,
        retry_delay: float = 0.25,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.retry_delay = retry_delay
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )
        # the JSON calls go the lean way (common/http.py) unless a transport is given (or
        # the URL is not http(s): httpx then says what is wrong with it, at the first call)
        lean = transport is None and LeanHTTP.serves(self.url)
        self._lean = LeanHTTP(self.url, headers, timeout) if lean else None
        self._sleep = time.sleep

    @classmethod
    def from_config(
        cls, url: str | None = None, token: str | None = None, timeout: float = 30.0
    ) -> Client:
        """A client configured like the CLI: flags → TIDAL_URL/TIDAL_TOKEN → cli.json."""
        found = config.load(url=url, token=token)
        return cls(found.url, found.token, timeout)

    def close(self) -> None:
        self._http.close()
        if self._lean is not None:
            self._lean.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- plumbing ----------------------------------------------------------------------

    def _unreachable(self, exc: httpx.TransportError) -> TidalError:
        if isinstance(exc, httpx.ConnectError):
            return TidalError(f"cannot reach the Tidal API at {self.url}: is `tidal up` running?")
        if isinstance(exc, httpx.TimeoutException):
            return TidalError(f"the Tidal API at {self.url} did not answer in time ({exc!r})")
        return TidalError(f"lost the connection to the Tidal API at {self.url}: {exc!r}")

    def _check(self, response: httpx.Response) -> httpx.Response:
        if response.is_success:
            return response
        response.read()
        error = error_from_response(response)
        if isinstance(error, Unauthorized) and not self.token:
            error.message += " (no token: set TIDAL_TOKEN, pass --token, or run `tidal up`)"
            error.args = (error.message,)
        raise error

    def _send(self, method: str, path: str, *, params: dict[str, str] | None = None,
              content: bytes | None = None, headers: dict[str, str] | None = None,
              read_timeout: float | None = None) -> httpx.Response:
        """One request with a body already encoded; raises httpx's TransportErrors.
        `read_timeout`: how long the answer may take (a long-poll's wait + the timeout)."""
        if self._lean is not None:
            return self._lean.request(method, path, params=params, content=content,
                                      headers=headers, read_timeout=read_timeout)
        timeout = httpx.Timeout(self.timeout, read=read_timeout or self.timeout)
        return self._http.request(method, path, params=params, content=content,
                                  headers=headers, timeout=timeout)

    def _request(self, method: str, path: str, *, params: dict[str, str] | None = None,
                 json: Any = None) -> Any:
        content = None if json is None else orjson.dumps(json)
        try:
            response = self._send(method, path, params=params, content=content,
                                  headers=_JSON_BODY if content is not None else None)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        response = self._check(response)
        return None if response.status_code == 204 else response.json()

    # -- jobs --------------------------------------------------------------------------

    @staticmethod
    def _model(sub: JobSubmission | Mapping[str, Any]) -> JobSubmission:
        """Validate a submission here (same model as the server)."""
        try:
            model = sub if isinstance(sub, JobSubmission) else JobSubmission.model_validate(sub)
        except ValidationError as exc:
            details = [
                {"loc": ".".join(str(p) for p in e["loc"]), "msg": e["msg"], "type": e["type"]}
                for e in exc.errors(include_url=False)
            ]
            raise InvalidSubmission("invalid job submission", details) from exc
        if not _finite([model.args, model.kwargs]):  # pydantic would send them as null
            raise InvalidSubmission("args: NaN and Infinity are not valid JSON")
        return model

    @classmethod
    def _body(cls, sub: JobSubmission | Mapping[str, Any]) -> dict[str, Any]:
        """The submission validated, dumped with only what was set."""
        return cls._model(sub).model_dump(mode="json", exclude_unset=True)

    @classmethod
    def _bodies(cls, subs: Iterable[JobSubmission | Mapping[str, Any]]
                ) -> builtins.list[dict[str, Any]]:
        """`_body` of each, in one pydantic call over the list when all are valid (a batch
        of 1,000 costs about half as much); else the first invalid one raises as `_body`
        does, without the index."""
        items = builtins.list(subs)
        try:
            models = _submissions_adapter.validate_python(items)
        except ValidationError:
            models = [cls._model(sub) for sub in items]  # raises for the first bad one
        for model in models:
            if not _finite([model.args, model.kwargs]):
                raise InvalidSubmission("args: NaN and Infinity are not valid JSON")
        return _submissions_adapter.dump_python(models, mode="json", exclude_unset=True)

    def _post_jobs(self, payload: Any, retry: bool, wait: float | None = None
                   ) -> httpx.Response:
        """POST /jobs. Retried on transport errors and 502/503/504 only when every job carries
        an idempotency_key: otherwise a lost answer could mean a job submitted twice.
        `payload` comes from `_body`/`_bodies`: JSON values, NaN and Infinity refused there
        (the model's bounds refuse them in every float field but args and kwargs, which
        `_finite` checks), so orjson's encoding is exact."""
        try:
            content = orjson.dumps(payload)
        except TypeError as exc:
            raise InvalidSubmission(f"not valid JSON: {exc}") from exc
        params: dict[str, str] = {}
        read_timeout = None
        if wait:
            params["wait"] = f"{wait:.3f}"
            read_timeout = wait + self.timeout
        attempts = self.submit_attempts if retry else 1
        for attempt in range(1, attempts + 1):
            try:
                response = self._send("POST", "/jobs", params=params, content=content,
                                      headers=_JSON_BODY, read_timeout=read_timeout)
            except httpx.TransportError as exc:
                if attempt == attempts:
                    error = self._unreachable(exc)
                    if not isinstance(exc, httpx.ConnectError):
                        error.message += " (the submission may or may not have been accepted)"
                        error.args = (error.message,)
                    raise error from exc
            else:
                if response.status_code not in _RETRY_STATUS or attempt == attempts:
                    return self._check(response)
            self._sleep(self.retry_delay * 2 ** (attempt - 1))
        raise AssertionError("unreachable")  # pragma: no cover

    def submit(self, sub: JobSubmission | Mapping[str, Any], wait: float | None = None) -> Job:
        """Submit one job; returns the job document (state `pending`). With `wait` (0..60 s)
        the server answers once the job finished, or after that long with the job as it
        stands: `run` is submit-and-wait with no limit on the wait."""
        body = self._body(sub)
        response = self._post_jobs(body, retry=bool(body.get("idempotency_key")), wait=wait)
        return Job.model_validate_json(response.content)

    def run(self, sub: JobSubmission | Mapping[str, Any], timeout: float | None = None) -> Job:
        """Submit one job and wait until it finished: one request when it finishes within
        `long_poll_s`, then long-polls as `wait` does. Raises TimeoutError if it is not done
        after `timeout` seconds (the job goes on: it was accepted)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.submit(sub, wait=self.long_poll_s if timeout is None
                          else min(self.long_poll_s, timeout))
        if job.state.terminal:
            return job
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError(f"job {job.id} is still {job.state} after {timeout}s")
        return self.wait(job.id, timeout=left)

    def submit_many(self, subs: Iterable[JobSubmission | Mapping[str, Any]]) -> builtins.list[Job]:
        """Submit a batch in one request; returns the jobs in the same order."""
        bodies = self._bodies(subs)
        retry = bool(bodies) and all(b.get("idempotency_key") for b in bodies)
        return JobBatch.model_validate_json(self._post_jobs(bodies, retry=retry).content).jobs

    def get(self, job_id: str, wait: float | None = None, polls: int | None = None,
            until: str | None = None) -> Job:
        """The job document. With `wait` (0..60 s) the server answers as soon as the job
        changes state (or, with `until="finished"`, once it finished), or after that long
        (a long-poll); `polls` says how often the caller asked before, and the answer's
        `poll_after_ms` grows with it."""
        params: dict[str, str] = {}
        if until:
            params["until"] = until
        read_timeout = None
        if wait:
            params["wait"] = f"{wait:.3f}"
            read_timeout = wait + self.timeout
        if polls:
            params["polls"] = str(polls)
        try:
            response = self._send("GET", _job_path(job_id), params=params,
                                  read_timeout=read_timeout)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        return Job.model_validate_json(self._check(response).content)

    def list(
        self,
        state: State | str | None = None,
        queue: str | None = None,
        host: str | None = None,
        owner: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> JobPage:
        """One page of jobs, newest first; pass `next_cursor` back for the next page."""
        params = {"state": state, "queue": queue, "host": host, "owner": owner, "cursor": cursor}
        query = {k: str(v) for k, v in params.items() if v is not None}
        query["limit"] = str(limit)
        return JobPage.model_validate(self._request("GET", "/jobs", params=query))

    def iter_jobs(
        self,
        state: State | str | None = None,
        queue: str | None = None,
        host: str | None = None,
        owner: str | None = None,
        page_size: int = 200,
    ) -> Iterator[Job]:
        """Every matching job, following the cursors page by page."""
        cursor: str | None = None
        while True:
            page = self.list(state, queue, host, owner, limit=page_size, cursor=cursor)
            yield from page.jobs
            # a page may be short, even empty, and still have more after it
            if not page.next_cursor or page.next_cursor == cursor:
                return
            cursor = page.next_cursor

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: `cancelled` at once, or still `running` while its worker kills it."""
        return Job.model_validate(self._request("DELETE", _job_path(job_id)))

    def retry(self, job_id: str) -> Job:
        """Run a finished job again, as a new attempt of the same job."""
        return Job.model_validate(self._request("POST", _job_path(job_id, "/retry")))

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Wait until the job is terminal, by long-polls that the server holds until the
        job finished (`until=finished`: one request, not one per transition). Raises
        TimeoutError if it is not done after `timeout` seconds."""
        for job in self._long_polls(job_id, timeout, until="finished"):
            if job.state.terminal:
                return job
        raise AssertionError("unreachable")  # pragma: no cover - the polls end terminal

    def watch(self, job_id: str, timeout: float | None = None) -> Iterator[Job]:
        """The job document now and each time it changes (a transition, or a progress
        event: docs/live.md#progress); ends after the terminal document. Raises
        TimeoutError if it is not done after `timeout` seconds."""
        yield from self._long_polls(job_id, timeout)

    def _long_polls(self, job_id: str, timeout: float | None,
                    until: str | None = None) -> Iterator[Job]:
        """Long-polls of `long_poll_s`, yielding each answer that brought news and the
        terminal one. An early answer that changed something is followed by the next poll
        at once; one with nothing new (a server that does not hold requests) waits the
        `poll_after_ms` it advised first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        polls, previous = 0, None
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            hold = self.long_poll_s if left is None else max(0.0, min(self.long_poll_s, left))
            asked = time.monotonic()
            job = self.get(job_id, wait=hold, polls=polls, until=until)
            seen = job.model_dump(exclude={"poll_after_ms", "wait_detail"})
            if seen != previous or job.state.terminal:
                yield job
            if job.state.terminal:
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                raise TimeoutError(f"job {job_id} is still {job.state} after {timeout}s")
            if now - asked < hold * 0.9 and seen == previous:
                pause = (job.poll_after_ms or 1000) / 1000
                self._sleep(pause if deadline is None else min(pause, deadline - now))
            previous, polls = seen, polls + 1

    # -- logs --------------------------------------------------------------------------

    def logs(self, job_id: str, cursor: str | None = None, limit: int = 1000) -> LogPage:
        """One page of a job's stored output."""
        params = {"limit": str(limit), **({"cursor": cursor} if cursor else {})}
        answer = self._request("GET", _job_path(job_id, "/logs"), params=params)
        return LogPage.model_validate(answer)

    def iter_logs(self, job_id: str, page_size: int = 1000) -> Iterator[LogLine]:
        """Every stored line of a job's output, paging through the cursors."""
        cursor: str | None = None
        while True:
            page = self.logs(job_id, cursor=cursor, limit=page_size)
            yield from page.lines
            if not page.next_cursor or page.next_cursor == cursor:
                return
            cursor = page.next_cursor

    def follow(
        self, job_id: str, after: str | None = None, *, progress: bool = False
    ) -> Iterator[LogLine | ProgressUpdate | Job]:
        """Stream a job's output live: a LogLine per line (and with `progress` a
        ProgressUpdate per progress report), then the final Job, then stop.

        Starts after entry id `after` (None: from the first line). A dropped connection is
        resumed with `Last-Event-ID`, after a short backoff; lines already yielded are never
        yielded again. Gives up after `follow_attempts` reconnects in a row without progress.
        """
        last, failures = after, 0
        while True:
            try:
                with closing(self._follow_once(job_id, last)) as items:
                    for item in items:
                        if isinstance(item, Job):
                            yield item
                            return
                        if _is_after(item.id, last):
                            last, failures = item.id, 0
                            if progress or isinstance(item, LogLine):
                                yield item
                raise _StreamEnded("the log stream ended before the job did")
            except (httpx.TransportError, _StreamEnded, RedisUnavailable) as exc:
                failures += 1
                if failures > self.follow_attempts:
                    raise self._follow_lost(job_id, exc) from exc
            self._sleep(min(self.retry_delay * 2 ** (failures - 1), 2.0))

    def _follow_lost(self, job_id: str, exc: Exception) -> TidalError:
        if isinstance(exc, httpx.TransportError):
            reason = self._unreachable(exc).message
        else:
            reason = str(exc)
        return TidalError(f"lost the log stream of job {job_id}: {reason}")

    def _follow_once(
        self, job_id: str, last: str | None
    ) -> Iterator[LogLine | ProgressUpdate | Job]:
        """One SSE connection: yields lines and progress reports, and the Job when the
        `end` event arrives. Asks for batched frames (`lines`: a read's lines in one event,
        each with its id); a server that sends a `line` event per line works the same."""
        headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if last:
            headers["Last-Event-ID"] = last
        timeout = httpx.Timeout(self.timeout, read=max(self.timeout, 60.0))
        with self._http.stream(
            "GET", _job_path(job_id, "/logs"), params={"follow": "true", "batch": "true"},
            headers=headers, timeout=timeout,
        ) as response:
            if response.status_code in _RETRY_STATUS:
                response.read()
                raise RedisUnavailable(error_from_response(response).message)
            self._check(response)
            for event in iter_sse(response.iter_lines()):
                if event.event == "end":
                    # `null` when the job's hash is gone from Redis: ask for it (SQL history)
                    end = orjson.loads(event.data)
                    yield self.get(job_id) if end is None else Job.model_validate(end)
                    return
                if event.event == "error":  # the server lost Redis mid-stream: reconnect
                    raise RedisUnavailable(str(orjson.loads(event.data).get("message")))
                if event.event == "lines":
                    for line in orjson.loads(event.data)["lines"]:
                        yield LogLine.model_validate(line)
                elif event.event == "line":
                    data = orjson.loads(event.data)
                    yield LogLine.model_validate({**data, "id": event.id or data.get("id", "")})
                elif event.event == "progress":
                    data = orjson.loads(event.data)
                    yield ProgressUpdate.model_validate({**data, "id": event.id or ""})

    def events(self, job_id: str) -> JobEvents:
        """Every transition of the job (seq, time, state, by whom, details)."""
        return JobEvents.model_validate(self._request("GET", _job_path(job_id, "/events")))

    # -- cluster -----------------------------------------------------------------------

    def queues(self) -> builtins.list[QueueInfo]:
        """Each queue now: depth, in flight, running, delayed, slots, recent rates."""
        return _queues_adapter.validate_python(self._request("GET", "/queues"))

    def metrics(self) -> str:
        """The Prometheus text of GET /metrics."""
        try:
            response = self._send("GET", "/metrics", headers={"Accept": "text/plain"})
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        return self._check(response).text

    def workers(self) -> builtins.list[WorkerInfo]:
        return _workers_adapter.validate_python(self._request("GET", "/workers"))

    def hosts(self) -> builtins.list[HostInfo]:
        return _hosts_adapter.validate_python(self._request("GET", "/hosts"))

    def schedules(self) -> builtins.list[Schedule]:
        return _schedules_adapter.validate_python(self._request("GET", "/schedules"))

    def create_schedule(self, name: str, cron: str,
                        job: JobSubmission | Mapping[str, Any]) -> Schedule:
        """Submit `job` at every tick of the cron expression `cron` (UTC)."""
        body = {"name": name, "cron": cron, "job": self._body(job)}
        return Schedule.model_validate(self._request("POST", "/schedules", json=body))

    def remove_schedule(self, name: str) -> None:
        self._request("DELETE", f"/schedules/{quote(name, safe='')}")

    def health(self) -> Health:
        return Health.model_validate(self._request("GET", "/healthz"))

    def create_token(self, user: str, admin: bool = False) -> TokenCreated:
        """Create an API token for `user` (needs an admin token). Shown once: store it."""
        body = {"user": user, "admin": admin}
        return TokenCreated.model_validate(self._request("POST", "/tokens", json=body))
