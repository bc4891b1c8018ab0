"""REST routes, one module per resource."""

from __future__ import annotations

from fastapi import APIRouter

from api.routes import health, hosts, jobs, logs, schedules, tokens, workers

ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    jobs.router,
    logs.router,
    workers.router,
    hosts.router,
    schedules.router,
    tokens.router,
)
