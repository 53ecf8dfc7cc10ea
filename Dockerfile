# Momentum parameter server: the `server` extra on python:3.11-slim, run as a non-root user.
#
#   docker build -t momentum-service .
#   docker run --rm -p 8000:8000 -e MOMENTUM_REDIS_URL=redis://redis-host:6379/0 momentum-service
#
# Settings come from the environment (pydantic-settings, prefix MOMENTUM_); see
# service/momentum_service/settings.py. docker-compose.yml wires it to a Redis with AOF on.

# ---- builder: build the project wheel and install it with the server extra into a venv ----
FROM python:3.11-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

# A C compiler for the native SGD kernel (service/momentum_service/kernels/_sgd.c), in this
# stage only: the runtime stage copies the built venv, never the toolchain. Not version-pinned
# on purpose: these are bookworm's own toolchain packages, and a pinned Debian revision
# disappears from the mirror at the next point release; nothing of them reaches the image.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src

# Only what the wheel build reads (.dockerignore keeps everything else out of the context).
COPY pyproject.toml README.md LICENSE constraints.txt ./
COPY service/ service/
COPY clients/ clients/

# A real (non-editable) wheel, then the wheel plus its `server` extra into /opt/venv, at the
# versions of constraints.txt (those CI tested), which is the only thing the runtime stage
# takes from here. The extension is optional to pip (a
# client install without a compiler falls back to numpy); the image must have it, so the
# build fails here if it did not compile.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /tmp/dist . \
    && python -m venv /opt/venv \
    && set -- /tmp/dist/momentum_service-*.whl \
    && /opt/venv/bin/pip install --no-cache-dir -c constraints.txt "$1[server]" \
    && /opt/venv/bin/pip check \
    && /opt/venv/bin/python -c "from momentum_service.kernels import sgd; assert sgd.BACKEND == 'native', sgd.NATIVE_IMPORT_ERROR"

# ---- runtime ----
FROM python:3.11-slim-bookworm AS runtime

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

RUN groupadd --system --gid 10001 momentum \
    && useradd --system --uid 10001 --gid momentum --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin momentum

COPY --from=builder /opt/venv /opt/venv

USER 10001:10001

EXPOSE 8000

# The slim image has no curl: probe /healthz with the standard library (exit 1 on any error).
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2).status == 200 else 1)"]

CMD ["momentum-service", "serve", "--host", "0.0.0.0", "--port", "8000"]
