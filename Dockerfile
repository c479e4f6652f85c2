# syntax=docker/dockerfile:1
# clipsearch image: `clipsearch` is the entrypoint, `serve` the default command.
#   docker build -t clipsearch .                                  # CPU-only torch (small image)
#   docker build -t clipsearch:cuda --build-arg TORCH_VARIANT=cuda .   # CUDA-enabled torch from PyPI
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # a chosen CUDA build
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------- build
# Everything is installed into /opt/venv here; the runtime stage copies only that venv, so compilers,
# pip caches and build dependencies never reach the final image.
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
# A C toolchain only for dependencies without a wheel on this platform (e.g. some arm64 builds).
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
# torch first, from the index the build argument selects; `pip install .` below then keeps it
# (pyproject caps torch at the version this project is tested with).
RUN set -eu; \
    case "${TORCH_VARIANT}" in \
      cpu)  index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}" ;; \
      cuda) index="${TORCH_INDEX_URL:-https://pypi.org/simple}" ;; \
      *)    echo "TORCH_VARIANT must be cpu or cuda, not ${TORCH_VARIANT}" >&2; exit 1 ;; \
    esac; \
    pip install --index-url "$index" --extra-index-url https://pypi.org/simple \
        "torch==2.14.1" "torchvision==0.29.1"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY clipsearch ./clipsearch
COPY indexer ./indexer
COPY service ./service
RUN pip install . && cd / && python -c "import clipsearch.cli, service"

# -------------------------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
# The emoji font draws the demo data set; libgomp is the OpenMP runtime FAISS and torch use on CPU.
RUN apt-get update \
 && apt-get install -y --no-install-recommends fonts-noto-color-emoji fontconfig libgomp1 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/venv /opt/venv
# A fixed uid so a bind-mounted /data can be chowned to match; /data is created here, owned by that
# user, so a fresh named volume mounted on it is writable by the indexer.
RUN groupadd --system --gid 10001 clipsearch \
 && useradd --system --uid 10001 --gid clipsearch --create-home --home-dir /home/clipsearch clipsearch \
 && mkdir -p /data \
 && chown clipsearch:clipsearch /data
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    CLIPSEARCH_BUNDLES=/data/bundles \
    CLIPSEARCH_HOST=0.0.0.0 \
    CLIPSEARCH_PORT=8000
USER clipsearch
WORKDIR /data
EXPOSE 8000
# python, not curl: the slim base has no curl. /readyz is 200 only while a verified bundle is served.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('CLIPSEARCH_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["clipsearch"]
# Bundles dir, host and port come from the CLIPSEARCH_* variables above, so changing CLIPSEARCH_PORT
# moves the server and the healthcheck together.
CMD ["serve"]
