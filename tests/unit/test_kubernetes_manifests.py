"""deploy/kubernetes/: every manifest validates offline against the Kubernetes OpenAPI
schemas (kubernetes-validate, strict: unknown fields are errors), and the pieces agree with
each other and with the router (the ConfigMap's routes.yaml parses, the probes are the
router's paths, the RBAC grants what discovery does, the grace period covers the drain).

Offline schema validation is all this checks: the manifests have not been applied to a
live cluster here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from router.config import parse_config

kubernetes_validate = pytest.importorskip("kubernetes_validate")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "kubernetes"
VERSIONS = ("1.30.0", kubernetes_validate.latest_version())  # preStop sleep needs >= 1.30
CRD_KINDS = {"ServiceMonitor"}  # the Prometheus Operator's, not in the Kubernetes schemas


def documents() -> list[tuple[str, dict]]:
    out = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                out.append((path.name, doc))
    return out


def find(kind: str, name: str | None = None) -> dict:
    for _, doc in documents():
        if doc["kind"] == kind and (name is None or doc["metadata"]["name"] == name):
            return doc
    raise AssertionError(f"no {kind} {name or ''}")


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_validates_against_the_kubernetes_schemas(version):
    checked = 0
    for file, doc in documents():
        if doc["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{file}: {doc['kind']} {doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
        checked += 1
    assert checked >= 8


def test_the_kustomization_lists_existing_files():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "llm"
    for resource in kustomization["resources"]:
        assert (DEPLOY / resource).is_file(), resource


def test_the_pieces_agree_with_each_other_and_the_router():
    configmap = find("ConfigMap", "vllm-router")
    config = parse_config(yaml.safe_load(configmap["data"]["routes.yaml"]), "configmap routes.yaml")
    discovery = config.models[0].discovery
    assert discovery is not None and discovery.kubernetes is not None
    assert discovery.kubernetes.service == find("Service", "vllm")["metadata"]["name"]
    deployment = find("Deployment", "vllm-router")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert "--workers" in container["args"]
    assert pod["terminationGracePeriodSeconds"] > config.server.drain_timeout + 5  # + preStop
    assert any(m["mountPath"] == "/tmp" for m in container["volumeMounts"])  # read-only root: metrics files
    assert pod["serviceAccountName"] == find("ServiceAccount")["metadata"]["name"]
    rule = find("Role")["rules"][0]
    assert rule["apiGroups"] == ["discovery.k8s.io"] and rule["resources"] == ["endpointslices"]
    assert set(rule["verbs"]) == {"get", "list", "watch"}
    binding = find("RoleBinding")
    assert binding["roleRef"]["name"] == find("Role")["metadata"]["name"]
    assert binding["subjects"][0]["name"] == pod["serviceAccountName"]
    service = find("Service", "vllm-router")
    ports = {p["name"] for p in container["ports"]}
    assert service["spec"]["ports"][0]["targetPort"] in ports
    assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    monitor = find("ServiceMonitor")
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    vllm = find("Deployment", "vllm")["spec"]["template"]["spec"]["containers"][0]
    assert discovery.kubernetes.port_name in {p["name"] for p in vllm["ports"]}
