"""Real vLLM: the CPU-build installer, the tiny local model and `vllm serve` command lines."""
