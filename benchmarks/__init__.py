"""Benchmark harness: realistic prefix-heavy workloads through our router and its peers.

`python -m benchmarks run --scenario benchmarks/scenarios/NAME.yaml` brings up a fleet,
runs the scenario's workload through every target (our policies, the peer routers, and a
client straight to one replica), and writes raw JSON, a markdown table and PNG plots under
the scenario's output folder.  `python -m benchmarks report DIR` rebuilds the table and
plots from the raw JSON.

Modules, one noun each:
  scenario.py  the YAML schema, validated with yamlcheck (path-precise errors)
  workloads.py seeded, deterministic sessions of turns (multi-turn, shared prefix, agentic, no reuse)
  oracle.py    the best prefix-cache hit rate any router could reach on a request sequence
  loadgen.py   the aiohttp streaming client and the arrival processes
  procs.py     every process the harness starts, and stopping each by its own PID
  fleet.py     simulated or real vLLM replicas: bring-up, cache reset, /metrics deltas
  targets.py   what the client talks to: our router per policy, the peers, or one replica
  stats.py     percentiles and the per-run summary
  runner.py    one scenario end to end
  overhead.py  router-added latency, max sustained rate, added inter-token latency
  report.py    markdown tables and PNG plots from the raw JSON
  real.py      real vLLM replicas from an engines.yaml registry (fleet.kind: real)
  routing_micro.py  the routing-decision micro-benchmark (prefix routing issue)
"""
