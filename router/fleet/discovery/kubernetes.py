"""Kubernetes discovery: a model's replicas are the ready endpoints of EndpointSlices.

An informer, written with kubernetes_asyncio (the maintained asyncio client, on aiohttp):
LIST the namespace's EndpointSlices selected by the Service name (label
``kubernetes.io/service-name``) or by labels, then WATCH from the list's
``resourceVersion`` (with bookmarks), applying ADDED / MODIFIED / DELETED to the slices it
holds and publishing the endpoints after each event.  The watch is bounded by ``resync``
seconds (server-side ``timeoutSeconds``); when it ends, or fails in any way (410 Gone for
a resourceVersion too old, the API server restarting, a network error), the informer
LISTs again: the list is the truth, so no event missed in between can leave a stale
replica.  Failures are retried after 1 s, doubling up to 30 s, and change nothing.

Which endpoints are replicas (EndpointSlice API, discovery.k8s.io/v1):
* ``conditions.ready`` true, or absent (the API says "unknown" is to be read as ready),
  and not ``terminating``: a pod being deleted is drained, never sent new requests;
* its first address (the API's consumers use the first; the others are the same pod);
* the port: ``port`` if configured, else the slice's port named ``port_name``, else the
  slice's only port (a slice with several ports and no choice is skipped, logged).
Each replica's labels get ``pod`` (targetRef name), ``zone`` and ``node`` where present.

Credentials: in-cluster (the pod's service account: needs RBAC ``get, list, watch`` on
``endpointslices`` in the namespace; deploy/kubernetes/ has it) or a kubeconfig file.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from router.config import KubernetesDiscoveryConfig
from router.fleet.discovery.endpoints import Endpoint, Publish

log = logging.getLogger("router.discovery.kubernetes")

SERVICE_LABEL = "kubernetes.io/service-name"
MAX_SLICES = 4096  # slices held per source (a Service has one per 100 endpoints by default)
RETRY_S = (1.0, 30.0)
REQUEST_TIMEOUT_S = 30.0


def label_selector(config: KubernetesDiscoveryConfig) -> str:
    if config.service is not None:
        return f"{SERVICE_LABEL}={config.service}"
    return ",".join(f"{k}={v}" for k, v in sorted(config.selector.items()))


def slice_port(config: KubernetesDiscoveryConfig, item: dict[str, Any]) -> int | None:
    if config.port is not None:
        return config.port
    ports = [p for p in item.get("ports") or [] if isinstance(p, dict) and isinstance(p.get("port"), int)]
    if config.port_name is not None:
        named = [p["port"] for p in ports if p.get("name") == config.port_name]
        return named[0] if named else None
    return ports[0]["port"] if len(ports) == 1 else None


def endpoints_of(config: KubernetesDiscoveryConfig, slices: dict[str, dict[str, Any]]) -> list[Endpoint]:
    """The ready, not terminating endpoints of every slice, sorted (stable answers)."""
    out: list[Endpoint] = []
    for name, item in sorted(slices.items()):
        port = slice_port(config, item)
        if port is None:
            log.warning("EndpointSlice %s: no port to use (set discovery.kubernetes.port or "
                        "port_name); skipped", name)
            continue
        for endpoint in item.get("endpoints") or []:
            if not isinstance(endpoint, dict):
                continue
            conditions = endpoint.get("conditions") or {}
            if conditions.get("ready") is False or conditions.get("terminating") is True:
                continue
            addresses = endpoint.get("addresses") or []
            if not addresses or not isinstance(addresses[0], str):
                continue
            labels: dict[str, str] = {}
            target = endpoint.get("targetRef") or {}
            if isinstance(target.get("name"), str):
                labels["pod"] = target["name"]
            for key, label in (("zone", "zone"), ("nodeName", "node")):
                if isinstance(endpoint.get(key), str):
                    labels[label] = endpoint[key]
            out.append(Endpoint(addresses[0], port, labels))
    return out


class KubernetesSource:
    """List-then-watch of one selector's EndpointSlices (module docstring)."""

    def __init__(self, config: KubernetesDiscoveryConfig, publish: Publish,
                 failed: Callable[[str], None]) -> None:
        self.config = config
        self.publish = publish
        self.failed = failed
        self.slices: dict[str, dict[str, Any]] = {}

    async def run(self) -> None:
        from kubernetes_asyncio import client

        configuration = await self._configuration()
        retry = RETRY_S[0]
        async with client.ApiClient(configuration) as api_client:
            api = client.DiscoveryV1Api(api_client)
            while True:
                try:
                    version = await self._list(api)
                    retry = RETRY_S[0]
                    await self._watch(api, version)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - ApiException, aiohttp errors, bad JSON
                    reason = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
                    log.warning("Kubernetes discovery in %s (%s) failed, replicas unchanged: %s",
                                self.config.namespace, label_selector(self.config), reason)
                    self.failed(reason)
                    await asyncio.sleep(retry)
                    retry = min(retry * 2, RETRY_S[1])

    async def _configuration(self) -> Any:
        from kubernetes_asyncio import client, config

        configuration = client.Configuration()
        if self.config.kubeconfig is not None:
            await config.load_kube_config(config_file=self.config.kubeconfig, context=self.config.context,
                                          client_configuration=configuration)
        else:
            config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        return configuration

    async def _list(self, api: Any) -> str | None:
        response = await api.list_namespaced_endpoint_slice(
            self.config.namespace, label_selector=label_selector(self.config),
            _preload_content=False, _request_timeout=REQUEST_TIMEOUT_S)
        try:
            data = json.loads(await response.read())
        finally:
            response.release()
        items = data.get("items") or []
        self.slices = {}
        for item in items[:MAX_SLICES]:
            name = (item.get("metadata") or {}).get("name")
            if isinstance(name, str):
                self.slices[name] = item
        self.publish(endpoints_of(self.config, self.slices))
        version = (data.get("metadata") or {}).get("resourceVersion")
        return version if isinstance(version, str) else None

    async def _watch(self, api: Any, version: str | None) -> None:
        from kubernetes_asyncio import watch

        stream = watch.Watch(return_type="object")  # raw dicts: no model deserialization
        kwargs: dict[str, Any] = {"label_selector": label_selector(self.config),
                                  "timeout_seconds": max(1, int(self.config.resync)),
                                  "allow_watch_bookmarks": True}
        if version:
            kwargs["resource_version"] = version
        async with stream:
            async for event in stream.stream(api.list_namespaced_endpoint_slice, self.config.namespace,
                                             **kwargs):
                kind = event.get("type")
                item = event.get("raw_object") or {}
                name = (item.get("metadata") or {}).get("name")
                if kind == "BOOKMARK" or not isinstance(name, str):
                    continue
                if kind == "DELETED":
                    self.slices.pop(name, None)
                elif kind in ("ADDED", "MODIFIED"):
                    if name in self.slices or len(self.slices) < MAX_SLICES:
                        self.slices[name] = item
                else:
                    continue
                self.publish(endpoints_of(self.config, self.slices))
