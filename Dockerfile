# syntax=docker/dockerfile:1
# sfmp-serve on NVIDIA GPUs: vLLM's official OpenAI server image plus this package, installed by
# scripts/install.sh (the same script CI and the README use, so the image cannot drift from what
# is tested). Build from the repo root:   docker build -t sfmp-serve:gpu .
# Run (checkpoint mounted read-only at /models/model):
#   docker run --gpus all -p 127.0.0.1:8000:8000 -v $PWD/models/ckpt:/models/model:ro sfmp-serve:gpu
FROM vllm/vllm-openai:v0.32.0

# Offline at run time: the model comes from the mount, never from a hub.
ENV HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_BREAK_SYSTEM_PACKAGES=1

WORKDIR /opt/sfmp-serve
COPY pyproject.toml README.md ./
COPY scripts ./scripts
COPY sfmp_serve ./sfmp_serve
COPY offline ./offline
# SFMP_VENV=system: the image's python already has vllm==0.32.0, so the "cuda" variant only adds
# this package and its extras next to it instead of building a second environment.
RUN SFMP_VENV=system scripts/install.sh cuda

# Unprivileged user; HOME holds vLLM's compile cache. /models is only ever read.
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin sfmp \
    && mkdir -p /models && chown root:root /models && chmod 0755 /models
USER sfmp
ENV HOME=/home/sfmp
VOLUME ["/models"]

EXPOSE 8000
# The first start compiles (minutes on large models), hence the long start period.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# `sfmp serve` validates the checkpoint, sets PROMETHEUS_MULTIPROC_DIR (so SFMP metrics reach
# /metrics) and starts vLLM's OpenAI server with --model CKPT --quantization sfmp (it refuses
# both options from the user). Arguments after the image name replace CMD, e.g.
# `docker run ... sfmp-serve:gpu /models/model --host 0.0.0.0 --max-model-len 4096`.
# --verbose: vLLM's log on stdout, where container runtimes collect it (not in a file).
ENTRYPOINT ["sfmp", "serve", "--verbose"]
CMD ["/models/model", "--host", "0.0.0.0", "--port", "8000"]
