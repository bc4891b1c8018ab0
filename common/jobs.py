"""How a job lives in its Redis hash: fields written at submission, and the job document
read back from them. The hash keeps flat fields the Lua scripts need (queue, priority,
retries, scheduled_at …) and the whole submission as JSON in `spec`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, get_args

import orjson
from pydantic import BaseModel, TypeAdapter
from ulid import ULID

from common.clock import iso_to_ms, ms_to_iso
from common.models import Job, JobSubmission, Priority, Progress, State


def new_job_id() -> str:
    """A time-sortable id (ULID, 26 characters, lower case)."""
    return str(ULID()).lower()


_SUBMISSIONS: TypeAdapter[list[JobSubmission]] = TypeAdapter(list[JobSubmission])
_PRIORITY = {p.label: int(p) for p in Priority}


def _holds_model(annotation: Any) -> bool:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return True
    return any(_holds_model(arg) for arg in get_args(annotation))


# Fields whose value is (or holds) a model: exclude_defaults leaves the model's own
# defaults out inside them too.
NESTED_FIELDS = frozenset(name for name, f in JobSubmission.model_fields.items()
                          if _holds_model(f.annotation))
# every field's default as JSON values
_DEFAULTS: dict[str, Any] = JobSubmission.model_construct().model_dump(mode="json")


def submission_specs(subs: list[JobSubmission]) -> list[dict[str, Any]]:
    """What `spec` stores for each job (its submission as JSON values, defaults left out):
    `sub.model_dump(mode="json", exclude_defaults=True)` for each, made with one pydantic
    call over the list that dumps only the fields given (exclude_unset: no default is
    made or compared in pydantic, which costs a model per job for `resources`), then the
    given fields equal to their default dropped here. A given field that holds a model
    is dumped by pydantic's own exclude_defaults (rare: resources, depends_on)."""
    specs: list[dict[str, Any]] = []
    for sub, given in zip(subs, _SUBMISSIONS.dump_python(subs, mode="json", exclude_unset=True),
                          strict=True):
        spec = {name: value for name, value in given.items() if value != _DEFAULTS[name]}
        nested = NESTED_FIELDS.intersection(spec)
        if nested:
            exact = sub.model_dump(mode="json", exclude_defaults=True, include=set(nested))
            spec = {name: exact[name] if name in nested else value
                    for name, value in spec.items() if name not in nested or name in exact}
        specs.append(spec)
    return specs


def submission_fields(
    sub: JobSubmission, default_stale_after_s: float | None = None,
    spec: dict[str, Any] | None = None,
) -> dict[str, str | int | float]:
    """The hash fields written by submit.lua besides id, state, owner and created_at.
    `spec`: the job's entry of `submission_specs`, when the caller made them in bulk."""
    if spec is None:
        spec = sub.model_dump(mode="json", exclude_defaults=True)
    priority = _PRIORITY.get(sub.priority)
    fields: dict[str, str | int | float] = {
        "kind": sub.kind,
        "queue": sub.queue,
        "priority": priority if priority is not None else int(Priority.parse(sub.priority)),
        "retries": sub.retries,
        "spec": orjson.dumps(spec).decode(),
    }
    if sub.host:
        fields["host"] = sub.host
    if sub.scheduled_at is not None:
        fields["scheduled_at"] = iso_to_ms(sub.scheduled_at)
    if sub.idempotency_key:
        fields["idempotency_key"] = sub.idempotency_key
    stale_after = sub.stale_after or default_stale_after_s
    if stale_after:
        fields["stale_after"] = int(stale_after * 1000)
    if sub.depends_on:
        fields["ndeps"] = len(sub.depends_on)
    res = sub.resources
    if res.cpu or res.memory_mb or res.gpu:
        fields.update(res_cpu=res.cpu, res_mem=res.memory_mb, res_gpu=res.gpu)
    return fields


def spec_of(h: dict[str, str]) -> JobSubmission:
    return JobSubmission.model_validate(orjson.loads(h.get("spec") or "{}"))


def _int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def progress_of(h: dict[str, str]) -> Progress | None:
    """The progress the job's current attempt reported (progress.lua's fields); None when
    it reported none, or only an earlier attempt did."""
    if not h.get("progress_at") or h.get("progress_attempt") != (h.get("attempt") or "0"):
        return None
    return Progress(percent=_float(h.get("progress")), stage=h.get("progress_stage") or None,
                    message=h.get("progress_message") or None,
                    time=ms_to_iso(_int(h.get("progress_at"))))


def durations(h: dict[str, str], spec: dict[str, Any]) -> tuple[int | None, int | None]:
    """(wait_ms, run_ms): started − when the job could first run, the latest of created,
    scheduled_at and due_at (when a delayed start or a retry's back-off came due:
    promote_due.lua), once started; finished − started, once finished. Both of the last
    attempt. A mirror row brings its stored figures (the recorder computes them here too)."""
    if h.get("wait_ms") or h.get("run_ms"):
        return _int(h.get("wait_ms")), _int(h.get("run_ms"))
    created, started, finished = (_int(h.get(name)) for name in
                                  ("created_at", "started_at", "finished_at"))
    scheduled = max(_int(h.get("scheduled_at")) or 0, _int(h.get("due_at")) or 0) or None
    if scheduled is None and isinstance(spec.get("scheduled_at"), str):  # a mirror's row
        try:
            scheduled = iso_to_ms(datetime.fromisoformat(spec["scheduled_at"]))
        except ValueError:
            scheduled = None
    wait_ms = run_ms = None
    if started is not None and created is not None:
        wait_ms = max(0, started - max(created, scheduled or 0))
    if started is not None and finished is not None and finished >= started:
        run_ms = finished - started
    return wait_ms, run_ms


def job_from_hash(h: dict[str, str]) -> Job:
    """The job document from a job hash (as HGETALL returns it, decoded)."""
    spec: dict[str, Any] = orjson.loads(h.get("spec") or "{}")
    wait_ms, run_ms = durations(h, spec)
    result = orjson.loads(h["result"]) if h.get("result") else None
    spec.pop("retry_delay", None)
    spec.pop("retry_backoff", None)
    spec.pop("retry_max_delay", None)
    doc = {
        **spec,
        "id": h["id"],
        "state": State(h["state"]),
        "owner": h.get("owner", ""),
        "kind": h.get("kind") or spec.get("kind", "shell"),
        "queue": h.get("queue") or spec.get("queue", "default"),
        "priority": Priority(int(h.get("priority") or 2)).label,
        "wait_reason": h.get("wait_reason") or None,
        "attempt": _int(h.get("attempt")) or 0,
        "worker": h.get("worker") or None,
        "created_at": ms_to_iso(_int(h.get("created_at"))),
        "started_at": ms_to_iso(_int(h.get("started_at"))),
        "finished_at": ms_to_iso(_int(h.get("finished_at"))),
        "exit_code": _int(h.get("exit_code")),
        "result": result,
        "error": h.get("error") or None,
        "reason": h.get("reason") or None,
        "progress": progress_of(h),
        "peak_rss_kb": _int(h.get("peak_rss_kb")),
        "cpu_s": _float(h.get("cpu_s")),
        "wait_ms": wait_ms,
        "run_ms": run_ms,
    }
    return Job.model_validate(doc)


def hash_from_record(rec: Any) -> dict[str, str]:
    """A job hash rebuilt from its SQL mirror row (a JobRecord), for `job_from_hash`."""
    h: dict[str, str] = {}
    for name in (
        "id", "state", "owner", "kind", "queue", "priority", "host", "attempt", "worker",
        "wait_reason", "created_at", "started_at", "finished_at", "exit_code", "result",
        "error", "reason", "spec", "peak_rss_kb", "cpu_s", "wait_ms", "run_ms",
    ):
        value = getattr(rec, name, None)  # usage columns: only in mirrors that have them
        if value is not None:
            h[name] = str(value)
    return h
