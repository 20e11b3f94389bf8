# One image for the router and the simulated vLLM replicas (the sim is part of the package).
# Real vLLM replicas use vLLM's own images (vllm/vllm-openai); see docs/engines.md ("Real vLLM on GPUs").
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY router ./router
COPY engines ./engines
COPY yamlcheck ./yamlcheck
COPY tokenization ./tokenization
COPY benchmarks ./benchmarks
COPY config ./config
RUN pip install ".[sim,kubernetes,picker]"
RUN useradd --system --uid 10001 router
USER router
EXPOSE 8000
ENTRYPOINT ["router"]
CMD ["--config", "/app/config/routes.yaml"]
