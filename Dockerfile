# syntax=docker/dockerfile:1
#
# zutis-service: one uvicorn process serving one GPU. Scale out with replicas (deploy/README.md), not with
# workers inside a container: every worker would load its own copy of the model onto the same device and fight
# over it, and the service's batching engine already keeps the GPU busy from one process.
#
# Base image: python:3.11-slim, not nvidia/cuda. The torch wheel pip installs from PyPI is a CUDA build that
# brings its own CUDA runtime, cuBLAS and cuDNN as nvidia-* wheels (torch.version.cuda is 13.x for torch 2.15),
# so an nvidia/cuda runtime image would only ship a second, unused copy of those libraries (~3 GB). The one
# thing the container needs from the host is the driver (libcuda), which the NVIDIA Container Toolkit mounts in
# when the container is started with a GPU (compose's device reservation, or `docker run --gpus`); the two
# NVIDIA_* variables below tell it what to mount. The host driver must support the wheel's CUDA version
# (CUDA 13 needs driver >= 580). For an older driver, build with a torch built for an older CUDA, e.g.
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
# CPU-only hosts: the same image serves CPUs (ZUTIS_RUNTIME=auto runs OpenVINO there, in bfloat16 where the CPU
# has it); build it with torch's much smaller CPU wheel and keep /var/cache/zutis (the OpenVINO exports and
# compiled networks, ZUTIS_CACHE_DIR) on a volume so that a restart compiles nothing (README "Fast on a CPU"):
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t zutis-service:cpu .
# Python 3.11 is the version the project is developed and tested with.
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

WORKDIR /app

# Dependencies first, in their own layer, from pyproject.toml alone: editing the code does not reinstall torch.
# The optional index only matters for torch; the other packages still come from PyPI.
COPY pyproject.toml ./
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; open('/tmp/requirements.txt', 'w').write('\n'.join(deps) + '\n')" \
    && if [ -n "$TORCH_INDEX_URL" ]; then \
         pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "$(grep -E '^torch([<>=!~ ]|$)' /tmp/requirements.txt)"; \
       fi \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The code, installed (not editable) so that package data and the distribution's version are found: the inference
# library and the service only. .dockerignore leaves out model/training (and the training commands and configs),
# whose extra dependencies (pip's [train] extra) the image does not install either.
COPY README.md ./
COPY model/ model/
COPY service/ service/
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info

# Weights baked into the image so that it runs on its own; mounting a directory over /app/weights (as
# docker-compose.yml does) or pointing ZUTIS_CHECKPOINT at another file, or at a zoo model (zoo:coco-vit-b16,
# fetched at start-up into ZUTIS_CACHE_DIR), replaces them without a rebuild.
# The bracket makes the source a pattern, which BuildKit lets match nothing: a checkout without weights still
# builds an image, to be run with weights mounted.
COPY weight[s] weights/

# /var/cache/zutis: where ZUTIS_CHECKPOINT=zoo:NAME fetches models to (ZUTIS_CACHE_DIR), owned by the service's
# user so that a named volume mounted there (docker-compose.yml) starts out writable by it.
RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/zutis zutis \
    && mkdir -p /var/cache/zutis \
    && chown 10001:10001 /var/cache/zutis
# Numeric, so that runtimes (Kubernetes runAsNonRoot) can verify it is not root without reading /etc/passwd.
USER 10001:10001

# The allocator and OpenMP settings matter on CPU (steady, several times faster steps; docs/benchmarks.md) and
# are harmless on GPU.
ENV ZUTIS_HOST=0.0.0.0 \
    ZUTIS_PORT=8000 \
    ZUTIS_CHECKPOINT=/app/weights/zutis-shapes.safetensors \
    ZUTIS_CACHE_DIR=/var/cache/zutis \
    MALLOC_MMAP_THRESHOLD_=33554432 \
    MALLOC_TRIM_THRESHOLD_=1073741824 \
    OMP_WAIT_POLICY=PASSIVE
EXPOSE 8000

# Healthy means ready: /readyz answers 200 only once the model is loaded and warmed up, and 503 again while the
# service drains after SIGTERM. The start period covers a first start with ZUTIS_CHECKPOINT=zoo:NAME (about
# 850 MB downloaded and converted: README "Real photographs"), then loading and warm-up on a cold GPU; a ready
# container turns healthy at once whatever its length.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10m --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('ZUTIS_PORT', '8000') + '/readyz', timeout=2)"]

# Exec form, so python is the process that receives SIGTERM: uvicorn then turns readiness off, finishes the
# queued and in-flight requests and exits. Give it time to do so (docker stop -t / compose stop_grace_period).
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service"]
