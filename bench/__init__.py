"""Tidal's benchmark harness: `python -m bench` (see docs/performance.md).

Starts its own Valkey, runs Tidal's real services as subprocesses, measures submit, drain,
latency, scheduler scale and log-follow throughput, and the same drain / submit / latency
workloads on Redis job-queue peers installed into throw-away virtualenvs. Never imported
by the services or the tests.
"""
