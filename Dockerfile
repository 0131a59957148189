# ai-engine on CPU: the engine, llama-cpp-python built for portable x86-64 CPUs, and the embedded
# default model. For a CUDA GPU use Dockerfile.cuda (or the compose file's `ai-engine` service).
#   docker build -t ai-engine:cpu .
#   docker run --rm -p 127.0.0.1:5000:5000 -e ALLOW_NO_KEY=1 ai-engine:cpu
#   docker run --rm -p 5000:5000 -v "$PWD/models:/models" -v "$PWD/key:/run/secrets/key:ro" \
#     -e ENGINE_API_KEY_FILE=/run/secrets/key -e MODEL=my-model.gguf ai-engine:cpu
# Listening on 0.0.0.0 inside the container, the engine refuses to start without a key unless
# ALLOW_NO_KEY=1 says that the port is published on loopback only (docs/security.md).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# Distribution packages are not pinned: the base image fixes the release, and pinned Debian
# versions disappear from the archive at the next point release, breaking the build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake git \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PIP_DISABLE_PIP_VERSION_CHECK=1
# GGML_NATIVE=OFF compiles ggml's SSE/AVX/AVX2/FMA/F16C kernels, which any x86-64-v3 CPU runs,
# instead of the build machine's own features; in particular not the AMX kernels that crash on
# Sapphire Rapids and later Xeons (see DESIGN.md). For a known CPU add flags, e.g.
#   --build-arg LLAMA_CMAKE_ARGS="-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON"
ARG LLAMA_CMAKE_ARGS=""
RUN CMAKE_ARGS="-DGGML_NATIVE=OFF ${LLAMA_CMAKE_ARGS}" pip install --no-cache-dir llama-cpp-python==0.3.36
COPY setup.cfg pyproject.toml README.md /src/
COPY engine /src/engine
COPY convert /src/convert
COPY ai_engine_common /src/ai_engine_common
RUN pip install --no-cache-dir /src

FROM ${PYTHON_IMAGE}
ARG UID=1000
# libgomp1: llama.cpp's CPU backend runs its threads with OpenMP.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid "${UID}" engine \
    && mkdir /models && chown "${UID}:${UID}" /models
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1 \
    MODEL_PATH=/models API_HOST=0.0.0.0 API_PORT=5000 N_GPU_LAYERS=0
USER ${UID}:${UID}
# The embedded default model, assembled into the image once (sha256 checked), so the image runs
# without a volume; a named volume on /models starts as a copy of it.
RUN ai-engine ensure-model --model-path /models
VOLUME /models
EXPOSE 5000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('API_PORT', '5000'), timeout=4)"]
CMD ["ai-engine", "serve"]
