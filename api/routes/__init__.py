"""REST routes, one module per resource."""

from __future__ import annotations

from fastapi import APIRouter

from api.routes import health, jobs, logs, tokens, workers

ROUTERS: tuple[APIRouter, ...] = (
    health.router,
    jobs.router,
    logs.router,
    workers.router,
    tokens.router,
)
