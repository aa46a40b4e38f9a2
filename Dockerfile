# t2i-slim: one image for `t2i api`, `t2i worker` and `t2i serve` (the command picks the role). Needs BuildKit (the
# default builder since Docker 23; DOCKER_BUILDKIT=1 on 20.10). No `# syntax=` line: that would pull a frontend image.
#
#   docker build -t t2i-slim .                                   # GPU hosts: CUDA runtime base, CUDA build of torch
#   docker build -t t2i-slim:cpu --build-arg VARIANT=cpu .       # CPU only: slim base, CPU build of torch
#   docker build --build-arg BAKE_MODELS=models -t t2i-slim .    # bake ./models into /models
#   docker build --network none --build-arg WHEELHOUSE=wheelhouse --build-arg PYTHON_IMAGE=BASE ...
#                                                                # air-gapped: wheels from ./wheelhouse, any base image
#                                                                # with python3 3.11 and its venv module (deploy/README.md)
#
# Model weights are mounted at /models (set T2I_MODELS_FILE=/models/models.yaml), not baked, unless BAKE_MODELS is
# given. With no models file the image serves the miniature-world kit it ships (CPU-friendly, for a first look).

ARG VARIANT=cuda
ARG PYTHON=3.11
ARG PYTHON_IMAGE=python:${PYTHON}-slim
ARG CUDA_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
ARG WHEELHOUSE=deploy/docker/no-wheelhouse

# -- 1. build: every wheel, from the pinned requirements, into /wheels ------------------------------------------
# Dependencies first, the project second: a change to the code leaves the dependency layers cached.
FROM ${PYTHON_IMAGE} AS build
ARG VARIANT
ARG WHEELHOUSE
# A venv, not the base's pip: a Debian base refuses pip outside one.
RUN python3 -m venv /opt/build
WORKDIR /src
COPY requirements.lock ./
COPY ${WHEELHOUSE} /wheelhouse/
# Where wheels come from: the wheelhouse and nothing else (--no-index: no network), or with none given the package
# index, where the CPU variant takes torch from PyTorch's CPU index (no CUDA libraries). $source is unquoted on
# purpose: it is empty or several words.
# hadolint ignore=SC2086
RUN if [ "$WHEELHOUSE" != deploy/docker/no-wheelhouse ]; then source="--no-index --find-links /wheelhouse"; \
        ls /wheelhouse/*.whl >/dev/null 2>&1 \
        || { echo "WHEELHOUSE=$WHEELHOUSE holds no wheels (deploy/README.md: the air-gapped build)" >&2; exit 1; }; \
    elif [ "$VARIANT" = "cpu" ]; then source="--extra-index-url https://download.pytorch.org/whl/cpu"; \
    else source=""; fi \
    && echo "$source" > /opt/build/source \
    && /opt/build/bin/pip wheel --no-cache-dir --wheel-dir /wheels/deps $source -r requirements.lock \
    && cp requirements.lock /wheels/deps/
COPY pyproject.toml README.md ./
COPY service ./service
COPY trainer ./trainer
# hadolint ignore=SC2046
RUN /opt/build/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels/project $(cat /opt/build/source) .

# -- 2a. runtime on a CUDA base (GPU hosts) -----------------------------------------------------------------------
FROM ${CUDA_BASE} AS runtime-cuda
ARG PYTHON
ENV DEBIAN_FRONTEND=noninteractive
# The distribution's Python is not 3.11 on every CUDA base; deadsnakes provides it. Versions float with the base.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get install -y --no-install-recommends "python${PYTHON}" "python${PYTHON}-venv" \
    && apt-get purge -y software-properties-common && apt-get autoremove -y \
    && rm -rf /var/lib/apt/lists/* \
    && "python${PYTHON}" -m venv /opt/venv

# -- 2b. runtime on a slim base (CPU only) -------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime-cpu
RUN python3 -m venv /opt/venv

# -- 3. the image: the chosen runtime, the wheels, a non-root user ------------------------------------------------
# hadolint ignore=DL3006
FROM runtime-${VARIANT}
ARG BAKE_MODELS=deploy/docker/no-models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/home/t2i/.cache/huggingface \
    T2I_HOME=/home/t2i/.cache/t2i-slim \
    T2I_HOST=0.0.0.0 \
    T2I_WORKER_METRICS_HOST=0.0.0.0
# Every wheel was built from requirements.lock in stage 1: the versions are pinned there. Dependencies, then the project.
RUN --mount=type=bind,from=build,source=/wheels/deps,target=/wheels/deps \
    pip install --no-cache-dir --no-index --find-links /wheels/deps -r /wheels/deps/requirements.lock \
    && useradd --create-home --uid 10001 t2i \
    && mkdir -p /models && chown t2i /models
# hadolint ignore=DL3013
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links /wheels/deps --find-links /wheels/project t2i-slim
# An optional models directory baked in (air-gapped sites); by default only a README: /models is a mount point.
COPY --chown=10001 ${BAKE_MODELS} /models/
USER 10001
WORKDIR /home/t2i
EXPOSE 8000 9400
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD ["t2i", "healthcheck"]
ENTRYPOINT ["t2i"]
CMD ["serve"]
