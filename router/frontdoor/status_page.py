"""The live status page: ``GET /admin/status`` (one self-contained HTML page: no build step,
no external asset) and ``GET /admin/status.json``, which the page reads every two seconds.

Without Prometheus and Grafana an operator still sees where requests go: each replica's
health, breaker, load, KV-cache usage, prefix-cache hit rate (the engine's own counters) and
share of the recent traffic, the prefix index's size, and the last requests with their
routing decision and its per-term costs.  Admin-protected like the rest of /admin; with
``auth.admin_key`` set, a browser is asked for it (HTTP Basic: any user name, the key as the
password), and the page's own requests then carry it.  With ``--workers N`` each worker keeps
its own last requests and traffic shares (no state is shared between workers): the page says
which worker answered; the fleet-wide view is the dashboard's.  Client-chosen strings (model names,
request ids, error messages) reach the page only as text nodes, never as markup.
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from router import __version__
from router.errors import RouterError
from router.frontdoor.admin import Admin
from router.frontdoor.api_state import ApiState, json_response

BASIC_REALM = 'Basic realm="router admin", charset="UTF-8"'


class StatusPage:
    """The handlers of /admin/status and /admin/status.json."""

    def __init__(self, api: ApiState, admin: Admin) -> None:
        self.api = api
        self.admin = admin
        self.started = time.time()

    def _check(self, request: web.Request) -> None:
        """The admin check; a 401 asks a browser for the key (HTTP Basic)."""
        try:
            self.api.keyring.check_admin(request.headers, request.remote)
        except RouterError as exc:
            if exc.status == 401:
                raise RouterError(401, exc.message, type=exc.type, headers={"WWW-Authenticate": BASIC_REALM}) from None
            raise

    async def handle_page(self, request: web.Request) -> web.Response:
        self._check(request)
        return web.Response(text=PAGE, content_type="text/html", charset="utf-8", headers={
            "Cache-Control": "no-store",
            # Only its own inline script and style, and requests to this router.
            "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                       "style-src 'unsafe-inline'; connect-src 'self'; img-src data:",
            "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"})

    async def handle_data(self, request: web.Request) -> web.Response:
        self._check(request)
        return json_response(self.data())

    def data(self) -> dict[str, Any]:
        """The fleet as /admin/replicas has it, with each replica's hit rate and traffic
        share, the fleet's totals, and the last requests."""
        fleet = self.admin.fleet_state()
        shares = self.api.recent.shares()
        hits = queries = 0.0
        for replica in fleet["replicas"]:
            load = replica["load"]
            q, h = load["prefix_cache_queries"], load["prefix_cache_hits"]
            hits, queries = hits + h, queries + q
            replica["hit_rate"] = h / q if q else None
            replica["traffic_share"] = shares.get(replica["id"], 0.0)
        replicas = fleet["replicas"]
        summary = {
            "replicas": len(replicas),
            "healthy": sum(1 for r in replicas if r["health"] == "healthy"),
            "breakers_open": sum(1 for r in replicas if r["circuit_breaker"]["state"] != "closed"),
            "in_flight": sum(r["in_flight"] for r in replicas),
            "hit_rate": hits / queries if queries else None,
            "admission_queue": fleet["admission_queue"],
        }
        return {"router": {"version": __version__, "uptime_s": round(time.time() - self.started, 1),
                           "draining": self.api.draining},
                "summary": summary, "fleet": fleet, "recent": self.api.recent.snapshot()}


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>router status</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 18px;display:flex;gap:18px;align-items:baseline}
header h1{font-size:17px;margin:0}header span{opacity:.75}
main{padding:14px 18px}section{margin-bottom:18px}h2{font-size:15px;margin:6px 0}
.cards{display:flex;gap:10px;flex-wrap:wrap}
.card{background:#fff;border:1px solid #dde1e7;border-radius:6px;padding:8px 14px;min-width:120px}
.card b{display:block;font-size:20px}
table{border-collapse:collapse;background:#fff;width:100%;font-size:13px}
th,td{border-bottom:1px solid #e6e9ee;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eef0f4;font-weight:600}
.ok{color:#11772e}.bad{color:#b3261e}.warn{color:#9a6700}
.bar{background:#e6e9ee;border-radius:3px;width:90px;height:10px;display:inline-block;vertical-align:middle}
.bar i{display:block;height:10px;border-radius:3px;background:#3b6fd8}
.terms{font-family:ui-monospace,monospace;font-size:12px;white-space:pre}
#error{color:#b3261e}
</style></head>
<body>
<header><h1>vLLM smart router</h1><span id="policy"></span><span id="version"></span>
<span id="worker"></span><span id="updated"></span><span id="error"></span></header>
<main>
<section class="cards" id="cards"></section>
<section><h2>Replicas</h2><table><thead><tr><th>replica</th><th>model</th><th>health</th>
<th>breaker</th><th>in flight</th><th>running / waiting</th><th>KV cache</th><th>hit rate</th>
<th>traffic share</th><th>KV events</th></tr></thead><tbody id="replicas"></tbody></table></section>
<section><h2>Prefix index</h2><div id="index"></div></section>
<section><h2>Last requests</h2><table><thead><tr><th>time</th><th>request</th><th>model</th>
<th>status</th><th>replica</th><th>TTFB ms</th><th>cached / predicted tokens</th>
<th>decision (cost terms, s: winner / runner-up)</th></tr></thead><tbody id="recent"></tbody></table></section>
</main>
<script>
"use strict";
function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}
function show(v) { return typeof v === "object" ? JSON.stringify(v) : String(v); }
function dash(v) { return v === null || v === undefined ? "-" : v; }
function pct(x) { return x === null || x === undefined ? "-" : (100 * x).toFixed(1) + "%"; }
function bar(x) {
  const outer = el("span", null, "bar"), inner = el("i");
  inner.style.width = Math.max(0, Math.min(100, 100 * (x || 0))).toFixed(1) + "%";
  outer.appendChild(inner);
  const cell = el("td"); cell.appendChild(outer); cell.appendChild(el("span", " " + pct(x)));
  return cell;
}
function row(cells) {
  const tr = el("tr");
  for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", c));
  return tr;
}
function fill(id, rows) { const body = document.getElementById(id); body.replaceChildren(...rows); }
function card(label, value, cls) {
  const box = el("div", null, "card"); box.appendChild(el("b", value, cls)); box.appendChild(el("span", label));
  return box;
}
function decision(why) {
  if (!why) return "";
  const terms = [], rest = [];
  if (why.terms) for (const [name, pair] of Object.entries(why.terms))
    terms.push(name + " " + pair.map(v => Number(v).toFixed(4)).join("/"));
  for (const key of ["cost_s", "runner_up", "matched_tokens", "turn", "load"])
    if (why[key] !== undefined && why[key] !== null) rest.push(key + " " + show(why[key]));
  return [terms.join("  "), rest.join("  ")].filter(Boolean).join("\\n");
}
function render(data) {
  const s = data.summary, fleet = data.fleet;
  document.getElementById("policy").textContent = "policy " + (fleet.policy || "?");
  const draining = data.router.draining ? " (draining)" : "";
  const worker = fleet.worker && fleet.worker.index !== null && fleet.worker.index !== undefined ?
    "worker " + fleet.worker.index + " (its own requests)" : "";
  document.getElementById("worker").textContent = worker;
  document.getElementById("version").textContent = "v" + data.router.version + draining;
  document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  document.getElementById("error").textContent = "";
  fill("cards", [
    card("healthy replicas", s.healthy + " / " + s.replicas, s.healthy === s.replicas ? "ok" : "bad"),
    card("prefix-cache hit rate", pct(s.hit_rate)),
    card("requests in flight", s.in_flight),
    card("admission queue", s.admission_queue, s.admission_queue ? "warn" : ""),
    card("breakers not closed", s.breakers_open, s.breakers_open ? "bad" : "ok"),
  ]);
  fill("replicas", fleet.replicas.map(r => {
    const kv = r.kv_events ? ((r.kv_events.connected ? "connected" : "disconnected") + ", " +
      r.kv_events.events + " events, " + r.kv_events.gaps_lost + " gaps lost") : "off";
    return row([r.url, r.model, el("td", r.health, r.health === "healthy" ? "ok" : "bad"),
      el("td", r.circuit_breaker.state, r.circuit_breaker.state === "closed" ? "ok" : "bad"),
      r.in_flight, r.load.running + " / " + r.load.waiting, bar(r.load.kv_cache_usage),
      pct(r.hit_rate), bar(r.traffic_share), kv]);
  }));
  const index = fleet.prefix_index || {};
  document.getElementById("index").textContent = Object.keys(index).length ?
    Object.entries(index).map(([k, v]) => k + ": " + show(v)).join(", ") : "none";
  fill("recent", data.recent.map(q => row([
    new Date(q.ts * 1000).toLocaleTimeString(), q.method + " " + q.path, q.model || "-",
    el("td", q.status, q.status < 400 ? "ok" : "bad"), dash(q.replica), dash(q.ttfb_ms),
    dash(q.cached_tokens) + " / " + dash(q.predicted_cached_tokens),
    el("td", q.error ? q.error : decision(q.why), q.error ? "bad" : "terms")])));
}
async function refresh() {
  try {
    const answer = await fetch("status.json", {cache: "no-store"});
    if (!answer.ok) throw new Error("status.json answered " + answer.status);
    render(await answer.json());
  } catch (e) {
    document.getElementById("error").textContent = String(e.message || e);
  }
}
refresh();
setInterval(refresh, 2000);
</script>
</body></html>
"""
