"""A prefix-cache-aware, load-aware router for fleets of vLLM replicas."""

__version__ = "0.1.0"
