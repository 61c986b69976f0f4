# Serve a model exported with `tuneforge export RUN --to DIR`, on CPU.
#
#   docker build -t tuneforge-serve .
#   docker run --rm -p 127.0.0.1:8000:8000 -e TUNEFORGE_API_KEYS=<long random key> \
#       -v "$PWD/DIR:/model:ro" tuneforge-serve
#
# The exported folder is mounted read-only at /model (its manifest is verified at
# start-up). To bake one into an image instead: FROM tuneforge-serve, COPY DIR /model.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

WORKDIR /app
# CPU-only torch first, pinned, so that installing tuneforge does not pull CUDA wheels.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[serve]"

RUN useradd --create-home --uid 10001 tuneforge
USER tuneforge
ENV HOME=/home/tuneforge

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
# Inside a container 0.0.0.0 is the only useful bind (publish the port on the host's
# loopback, as above, or behind a proxy). API keys come from TUNEFORGE_API_KEYS;
# without one a random key is generated and printed to the log.
CMD ["tuneforge", "serve", "/model", "--host", "0.0.0.0", "--port", "8000"]
