"""REST routes, one module per resource."""

from __future__ import annotations

from fastapi import APIRouter

from api.routes import (
    dashboard,
    events,
    health,
    hosts,
    jobs,
    logs,
    metrics,
    queues,
    schedules,
    tokens,
    workers,
)

ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    jobs.router,
    logs.router,
    events.router,
    queues.router,
    metrics.router,
    workers.router,
    hosts.router,
    schedules.router,
    tokens.router,
    dashboard.router,
)
