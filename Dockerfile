# syntax=docker/dockerfile:1
#
# Two images from one file, selected with --target (compose.yaml sets it per service):
#
#   api     `encore serve` and `encore db upgrade` (model_server, migrate): the project without
#           its `worker` dependency group, so no torch, faiss, scipy, numpy, pandas or pyarrow.
#   worker  everything else (trainer, scheduler, the Ray head and workers of compose's `ray`
#           profile): the `worker` group and the `ray` extra too, torch as its CPU build.
#
# Built as uv's Docker guide recommends (https://docs.astral.sh/uv/guides/integration/docker/):
# uv copied from its distroless image, a cache mount for uv's cache, bytecode compiled at install
# time, the locked dependencies in their own layer before the project, non-editable installs, and
# slim final stages that receive the environment only (no uv, no sources). The worker's build
# starts from the API's dependency layer, so the packages both images share are installed once.
# Sizes (README, "Running with compose"): `uv run python bench/images.py` measures both
# environments with the commands below.
#
# torch on the CPU
# ----------------
# uv.lock pins torch 2.15.0 from PyPI. Its Linux wheels depend, through
# `sys_platform == 'linux'` markers, on the CUDA stack: several GB that no Encore service uses
# (training and the nightly scoring run on CPUs). The CUDA-only packages of the lock are:
#   torch -> cuda-bindings -> cuda-pathfinder
#   torch -> cuda-toolkit[cublas,cudart,cufft,cufile,cupti,cusolver,cusparse,nvjitlink,nvrtc,nvtx]
#            -> nvidia-cublas, nvidia-cuda-nvrtc, nvidia-cuda-runtime, nvidia-cufft,
#               nvidia-nvjitlink, nvidia-cufile, nvidia-cuda-cupti, nvidia-cusolver,
#               nvidia-cusparse, nvidia-nvtx
#   torch -> nvidia-cudnn-cu13, nvidia-cusparselt-cu13, nvidia-nccl-cu13,
#            nvidia-nvshmem-cu13 -> nvidia-cuda-cccl
#   torch -> triton
# So the worker's build
#   1. syncs the lock with the worker group but without torch and every package above
#      (`--no-install-package` skips only the named package: torch's other dependencies,
#      filelock, fsspec, jinja2, networkx, setuptools, sympy and typing-extensions, are still
#      installed at their locked versions);
#   2. installs the same torch version, as the CPU build (2.15.0+cpu), from PyTorch's CPU index,
#      with --no-deps since its dependencies are already there;
#   3. installs the project with the same exclusions and --inexact: an exact sync would
#      uninstall the CPU torch, which the lock does not list under that version.
# Only this file uses the CPU index; pyproject.toml and uv.lock stay on PyPI.
# tests/test_image_packages.py checks TORCH_VERSION and both exclusion lists against uv.lock
# (after `uv lock --upgrade`, update them together), and that the API's syncs reach none of
# torch, faiss, scipy or a CUDA package through uv.lock's dependency graph.
#
# No HEALTHCHECK: each image runs two services, one of them a one-shot job, so each service's
# check lives in compose.yaml.

FROM python:3.11-slim-bookworm AS builder

COPY --from=ghcr.io/astral-sh/uv:0.13.9 /uv /uvx /bin/

# Compile bytecode at install time (faster start), copy from the cache mount instead of
# hard-linking (the cache is on another file system), and use the image's own Python, which
# sits at the same path in the final stages.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=0

WORKDIR /app


# The project's own dependencies, without any dependency group (not `worker`, not `dev`).
FROM builder AS api-deps

RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    uv sync --locked --no-default-groups --no-install-project --no-editable


FROM api-deps AS api-build

# The project itself, non-editable so that the final stage needs only the environment.
COPY . /app
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-default-groups --no-editable

# Fail the build, not the first request, if the app cannot load or a worker package came in.
RUN /app/.venv/bin/python -c "import model_server.main; from encore.cli.worker_group import WORKER_MODULES as w, missing_worker_packages as m; came = set(w.values()) - set(m()); assert not came, came"


FROM api-deps AS worker-build

ARG TORCH_VERSION=2.15.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# 1. The worker group's and the ray extra's locked dependencies, without the project, torch or
#    the CUDA stack. Ray (~0.25 GB) is there so that the same image runs `encore run --engine
#    ray` and a Ray node of compose's `ray` profile; it pulls in no CUDA package.
RUN --mount=type=cache,target=/root/.cache/uv \
    --mount=type=bind,source=uv.lock,target=uv.lock \
    --mount=type=bind,source=pyproject.toml,target=pyproject.toml \
    uv sync --locked --no-default-groups --group worker --extra ray --no-install-project --no-editable \
        --no-install-package torch \
        --no-install-package triton \
        --no-install-package cuda-bindings \
        --no-install-package cuda-pathfinder \
        --no-install-package cuda-toolkit \
        --no-install-package nvidia-cublas \
        --no-install-package nvidia-cuda-cccl \
        --no-install-package nvidia-cuda-cupti \
        --no-install-package nvidia-cuda-nvrtc \
        --no-install-package nvidia-cuda-runtime \
        --no-install-package nvidia-cudnn-cu13 \
        --no-install-package nvidia-cufft \
        --no-install-package nvidia-cufile \
        --no-install-package nvidia-cusolver \
        --no-install-package nvidia-cusparse \
        --no-install-package nvidia-cusparselt-cu13 \
        --no-install-package nvidia-nccl-cu13 \
        --no-install-package nvidia-nvjitlink \
        --no-install-package nvidia-nvshmem-cu13 \
        --no-install-package nvidia-nvtx

# 2. The locked torch version, CPU build.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv pip install --python /app/.venv/bin/python --no-deps \
        --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# 3. The project itself.
COPY . /app
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --locked --no-default-groups --group worker --extra ray --no-editable --inexact \
        --no-install-package torch \
        --no-install-package triton \
        --no-install-package cuda-bindings \
        --no-install-package cuda-pathfinder \
        --no-install-package cuda-toolkit \
        --no-install-package nvidia-cublas \
        --no-install-package nvidia-cuda-cccl \
        --no-install-package nvidia-cuda-cupti \
        --no-install-package nvidia-cuda-nvrtc \
        --no-install-package nvidia-cuda-runtime \
        --no-install-package nvidia-cudnn-cu13 \
        --no-install-package nvidia-cufft \
        --no-install-package nvidia-cufile \
        --no-install-package nvidia-cusolver \
        --no-install-package nvidia-cusparse \
        --no-install-package nvidia-cusparselt-cu13 \
        --no-install-package nvidia-nccl-cu13 \
        --no-install-package nvidia-nvjitlink \
        --no-install-package nvidia-nvshmem-cu13 \
        --no-install-package nvidia-nvtx

# Fail the build, not the first night, if torch is not the CPU build or a worker package is
# missing.
RUN /app/.venv/bin/python -c "import torch, encore.cli; from encore.cli.worker_group import missing_worker_packages as m; assert not m(), m(); assert torch.version.cuda is None, torch.__version__; print('torch', torch.__version__)"


# What both images share: a fixed non-root user and the settings.
FROM python:3.11-slim-bookworm AS runtime

# /data is ENCORE_HOME; an empty named volume mounted there takes this directory's owner, so
# the services can write bundles, pairings and SQLite files to it.
RUN groupadd --system --gid 10001 encore \
    && useradd --system --no-log-init --uid 10001 --gid encore \
        --create-home --home-dir /home/encore --shell /usr/sbin/nologin encore \
    && mkdir /data \
    && chown encore:encore /data

ENV PATH="/app/.venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ENCORE_HOME=/data

WORKDIR /home/encore
USER 10001:10001


# docker build --target worker: trainer and scheduler.
FROM runtime AS worker

# The environment only (root-owned, read-only for the services): the project is installed in it.
COPY --from=worker-build /app/.venv /app/.venv

# The scheduler's Prometheus metrics.
EXPOSE 9101

CMD ["encore", "scheduler"]


# docker build --target api: model_server and migrate. Last, so a plain `docker build .` gives
# the API, as before the split.
FROM runtime AS api

COPY --from=api-build /app/.venv /app/.venv

EXPOSE 8000

CMD ["encore", "serve", "--host", "0.0.0.0", "--port", "8000"]
