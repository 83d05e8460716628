# syntax=docker/dockerfile:1
# The inference worker image (ghcr.io/microturn/worker): `microturn worker` — one engine, one model, one GPU.
# torch comes from the CUDA index named by TORCH_INDEX_URL: pick the CUDA variant your GPU nodes' driver supports
# (cu128 needs driver >= 570; use .../whl/cpu for a CPU-only worker image). The CUDA runtime ships in the wheels,
# so the base stays python:slim; the node provides the driver (NVIDIA device plugin / GPU operator).
# Build from the repository root (the build context):
#   docker build -f infra/docker/worker.Dockerfile -t ghcr.io/microturn/worker:0.1.0 .
#   docker build -f infra/docker/worker.Dockerfile --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
ARG PYTHON_IMAGE=python:3.11.9-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY microturn ./microturn
COPY webrtc_gateway ./webrtc_gateway
COPY inference ./inference
RUN pip install . && pip check

FROM ${PYTHON_IMAGE}
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
LABEL org.opencontainers.image.description="microturn inference worker (torch from ${TORCH_INDEX_URL})"
RUN groupadd --system --gid 10001 microturn \
    && useradd --system --uid 10001 --gid microturn --home-dir /home/microturn --create-home \
       --shell /usr/sbin/nologin microturn
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MICROTURN_HOST=0.0.0.0 \
    MICROTURN_LOG_FORMAT=json \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
WORKDIR /home/microturn
USER 10001:10001
EXPOSE 8090/tcp
CMD ["microturn", "worker"]
