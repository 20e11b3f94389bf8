"""The metrics as an operator sees them: a real Prometheus scrapes the router and the
replicas, and every query of the Grafana dashboard runs against it.

This catches what unit tests of the exposition cannot: a dashboard query naming a metric or
label the router does not export, PromQL that does not parse, a scrape format Prometheus
rejects.  Prometheus comes from Debian's package (`make test` installs it); the test is
skipped with a reason only where the binary is absent.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import aiohttp
import pytest
import yaml

from engines.children import die_with_parent

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "config" / "grafana" / "dashboards" / "router.json"
PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus binary not installed (make test installs it)")

# Queries that must return data after traffic; the others (failovers, retries, exact-mode
# predictions...) only have to be valid PromQL over metrics that exist.
MUST_HAVE_DATA = {
    "Fleet prefix-cache hit rate (engines)",
    "Hit rate the router predicted",
    "Upper bound: longest match in the fleet",
    "Prefix-cache hit rate per replica (engines)",
    "Routing decision time (p50, p99)",
    "Routing decisions per replica",
    "Requests per second by status",
    "Requests per second by replica",
    "Requests per second by model",
    "Time to first token per model (p50, p99)",
    "Time to first token per replica (p99)",
    "End-to-end latency per model (p50, p99)",
    "End-to-end latency per replica (p99)",
    "Replica health (1 = in state)",
    "Circuit breakers (1 = in state)",
    "KV cache usage per replica",
    "Client connections",
}
# Grafana's variables as "All" selects them.
VARIABLES = {"$model": ".*", "$replica": ".*"}
SHIPPED = yaml.safe_load((ROOT / "config" / "prometheus.yml").read_text())


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):  # (rows have none)
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            out.append((panel["title"], expr))
    return out


def test_dashboard_v2_has_its_variables_units_and_one_replica_label() -> None:
    """Model and replica variables used by the panels; decision time and loop lag in
    seconds on panels of their own; no panel keyed by Prometheus' `instance`."""
    dashboard = json.loads(DASHBOARD.read_text())
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["model", "replica"]
    panels = {p["title"]: p for p in dashboard["panels"] if p["type"] != "row"}
    assert len(panels) == len([p for p in dashboard["panels"] if p["type"] != "row"])  # titles unique
    for title in ("Routing decision time (p50, p99)", "Event-loop lag", "Time to first token per model (p50, p99)"):
        assert panels[title]["fieldConfig"]["defaults"]["unit"] == "s", title
    queries = [expr for _, expr in dashboard_queries()]
    assert not any("instance" in q for q in queries)
    assert sum("$model" in t["expr"] for p in panels.values() for t in p["targets"]) >= 10
    assert sum("$replica" in t["expr"] for p in panels.values() for t in p["targets"]) >= 10


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")
def test_shipped_prometheus_config_and_alert_rules_are_valid_and_fire_as_tested() -> None:
    for args in (["check", "config", "prometheus.yml"], ["check", "rules", "prometheus-alerts.yml"],
                 ["test", "rules", "prometheus-alerts.test.yml"]):
        result = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, cwd=ROOT / "config")
        assert result.returncode == 0, result.stdout + result.stderr
    rules = yaml.safe_load((ROOT / "config" / "prometheus-alerts.yml").read_text())
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    assert {"RouterReplicaEjected", "RouterQueueRejecting", "RouterKVEventStreamLost",
            "RouterHitRateCollapsed", "RouterDecisionTimeHigh"} <= names


async def query(http: aiohttp.ClientSession, base: str, expr: str) -> dict:
    async with http.get(f"{base}/api/v1/query", params={"query": expr}) as response:
        body = await response.json()
    assert body["status"] == "success", f"{expr}: {body}"
    return body["data"]


async def test_every_dashboard_query_runs_on_real_prometheus(
        make_sims, start_router, make_routes, http, unused_port, tmp_path) -> None:
    sims = await make_sims(2)
    server = await start_router(make_routes([s.url for s in sims], policy="cache_aware"))
    system = "You are a careful assistant. " * 20
    for i in range(12):
        body = {"model": "sim-a", "max_tokens": 4, "stream": i % 2 == 0,
                "messages": [{"role": "system", "content": system}, {"role": "user", "content": f"Q{i}"}]}
        async with http.post(server.url + "/v1/chat/completions", json=body) as response:
            assert response.status == 200
            await response.read()

    targets = [urlparse(u).netloc for u in [server.url, *(s.url for s in sims)]]
    # The shipped config's jobs, pointed at this fleet: its relabelling gives the replicas'
    # own series the router's `replica` label.
    vllm_job = next(job for job in SHIPPED["scrape_configs"] if job["job_name"] == "vllm")
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(ROOT / "config" / "prometheus-alerts.yml")],
              "scrape_configs": [
                  {"job_name": "stack", "static_configs": [{"targets": targets[:1]}]},
                  {"job_name": "stack-vllm", "static_configs": [{"targets": targets[1:]}],
                   "relabel_configs": vllm_job["relabel_configs"]}]}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    base = f"http://127.0.0.1:{unused_port}"
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
         f"--web.listen-address=127.0.0.1:{unused_port}"],
        stdout=log, stderr=subprocess.STDOUT, preexec_fn=die_with_parent())
    try:
        # Wait until two scrapes of every target landed (rate() needs two samples), with
        # traffic in between so counters move.
        for _ in range(300):
            await asyncio.sleep(0.1)
            try:
                data = await query(http, base, 'count(count_over_time(up{job=~"stack.*"}[1m]) >= 2)')
            except aiohttp.ClientError:
                continue
            if data["result"] and float(data["result"][0]["value"][1]) == len(targets):
                break
            async with http.post(server.url + "/v1/completions",
                                 json={"model": "sim-a", "prompt": system + "more", "max_tokens": 2}) as r:
                await r.read()
        else:
            pytest.fail("Prometheus never scraped every target twice: "
                        + (tmp_path / "prometheus.log").read_text()[-2000:])

        up = await query(http, base, 'up{job=~"stack.*"}')
        assert {r["metric"]["instance"] for r in up["result"] if r["value"][1] == "1"} == set(targets)
        # One replica label: the replicas' own series carry the router's replica URLs.
        hits = await query(http, base, "vllm:prefix_cache_queries_total")
        assert {r["metric"]["replica"] for r in hits["result"]} == {s.url for s in sims}
        empty = []
        for title, expr in dashboard_queries():
            data = await query(http, base, expr)
            if title in MUST_HAVE_DATA and not data["result"]:
                empty.append(f"{title}: {expr}")
        assert not empty, "dashboard queries without data after traffic:\n" + "\n".join(empty)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
