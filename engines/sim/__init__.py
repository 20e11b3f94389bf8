"""A simulated vLLM 0.32 replica: same HTTP API, /metrics names and KV events, a paged prefix
cache, continuous batching and a roofline timing model.  See engines/sim/README.md."""
