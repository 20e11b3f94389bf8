"""What runs behind the router: `engines.sim` (a simulated vLLM replica) and `engines.vllm`
(the config-as-code launcher for real vLLM).  See `python -m engines --help`."""
