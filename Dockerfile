# One image for every Tidal service; docker-compose.yml picks the command per service.
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Jobs are run by an unprivileged user (RLIMIT_NPROC does not bind root).
RUN groupadd --system tidal && useradd --system --gid tidal --home-dir /srv/tidal --create-home tidal

WORKDIR /app
COPY pyproject.toml README.md ./
COPY api ./api
COPY scheduler ./scheduler
COPY worker ./worker
COPY cli ./cli
COPY common ./common
RUN pip install .

USER tidal
WORKDIR /srv/tidal
ENV TIDAL_DATA_DIR=/srv/tidal/data
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)" || exit 1

ENTRYPOINT ["tidal"]
CMD ["--help"]
