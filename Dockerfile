# gradindex: the indexer and the server in one image.
#
#   docker build -t gradindex .                                   # CPU torch (default)
#   docker build -t gradindex:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124 .
#
# Configuration is read only from GRADINDEX_* environment variables (see README).
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    GRADINDEX_DATA_DIR=/data \
    GRADINDEX_HOST=0.0.0.0 \
    GRADINDEX_PORT=8000

# A CUDA base image has no Python of its own; the slim base has one already.
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
      && rm -rf /var/lib/apt/lists/*; \
    fi \
    && python3 -m venv "$VIRTUAL_ENV"

# torch first, from the chosen wheel index, so the project's torch range installs nothing more.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"

# The package is installed from a wheel, not in editable mode: the image runs what users install.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gradindex ./gradindex
COPY client ./client
# Extras baked in, e.g. `--build-arg EXTRAS=milvus` (pymilvus, for `--store milvus`).
ARG EXTRAS=""
RUN pip install . && if [ -n "$EXTRAS" ]; then pip install ".[$EXTRAS]"; fi && rm -rf /src
WORKDIR /app

RUN useradd --system --create-home --uid 10001 gradindex \
    && mkdir -p /data && chown gradindex:gradindex /data
USER gradindex
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=5 \
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v1/health' % os.environ.get('GRADINDEX_PORT', '8000'), timeout=4)"

CMD ["sh", "-c", "gradindex db upgrade && exec gradindex serve --host \"$GRADINDEX_HOST\" --port \"$GRADINDEX_PORT\""]
