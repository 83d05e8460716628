# syntax=docker/dockerfile:1
# The gateway image (ghcr.io/microturn/gateway): `microturn serve` — HTTP signalling, WebRTC media, the micro-turn
# clock — with CPU-only torch (the gateway never runs the model when MICROTURN_WORKERS is set).
# Build from the repository root (the build context):
#   docker build -f infra/docker/gateway.Dockerfile -t ghcr.io/microturn/gateway:0.1.0 .
ARG PYTHON_IMAGE=python:3.11.9-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# CPU wheel first, so `pip install .` finds torch satisfied and does not pull the CUDA build from PyPI
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY microturn ./microturn
COPY webrtc_gateway ./webrtc_gateway
COPY inference ./inference
RUN pip install . && pip check
# web/ (templates, static files, widget) is not in the Python package; the app looks for it beside its packages
COPY web /opt/venv/lib/python3.11/site-packages/web

FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 microturn \
    && useradd --system --uid 10001 --gid microturn --home-dir /home/microturn --create-home \
       --shell /usr/sbin/nologin microturn
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MICROTURN_HOST=0.0.0.0 \
    MICROTURN_LOG_FORMAT=json
WORKDIR /home/microturn
USER 10001:10001
EXPOSE 8080/tcp
CMD ["microturn", "serve"]
