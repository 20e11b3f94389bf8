"""deploy/kubernetes/picker/: the router as a Gateway API inference gateway's endpoint picker.

The built-in kinds validate against the Kubernetes schemas (kubernetes-validate, strict);
the InferencePool and the HTTPRoute against the published CRD schemas, vendored in
tests/reference/crds/ and made strict (an unknown field is an error, as `kubectl apply
--validate=strict` makes it), so a typo fails `make test`; and the pieces agree: the pool's
selector is the Service the picker's discovery follows, the pool's picker is the picker's
Service and gRPC port, the route's backend is the pool.  CEL rules of the CRDs
(x-kubernetes-validations) are not evaluated here; the manifests were not applied to a live
cluster."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from router.config import parse_config

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[2]
PICKER = ROOT / "deploy" / "kubernetes" / "picker"
CRDS = ROOT / "tests" / "reference" / "crds"
CUSTOM = {("inference.networking.k8s.io/v1", "InferencePool"): "inference.networking.k8s.io_inferencepools.yaml",
          ("gateway.networking.k8s.io/v1", "HTTPRoute"): "gateway.networking.k8s.io_httproutes.yaml"}


def documents() -> list[dict[str, Any]]:
    out = []
    for name in yaml.safe_load((PICKER / "kustomization.yaml").read_text())["resources"]:
        out += [doc for doc in yaml.safe_load_all((PICKER / name).read_text()) if doc]
    return out


def find(kind: str) -> dict[str, Any]:
    return next(doc for doc in documents() if doc["kind"] == kind)


def strict(schema: Any) -> Any:
    """An openAPIV3Schema with unknown fields refused wherever it lists an object's fields."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_schema(api_version: str, kind: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / CUSTOM[(api_version, kind)]).read_text())
    version = api_version.split("/")[1]
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            schema: dict[str, Any] = strict(served["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = {"type": "object"}  # (the API server's own)
            return schema
    raise AssertionError(f"{kind} {api_version} is not in the vendored CRD")


@pytest.mark.parametrize("version", ("1.30.0", kubernetes_validate.latest_version()))
def test_the_builtin_kinds_validate_against_the_kubernetes_schemas(version: str) -> None:
    checked = 0
    for doc in documents():
        if (doc["apiVersion"], doc["kind"]) in CUSTOM:
            continue
        kubernetes_validate.validate(doc, version, strict=True)
        checked += 1
    assert checked == 6  # ServiceAccount, Role, RoleBinding, ConfigMap, Deployment, Service


def test_the_pool_and_the_route_validate_against_the_published_crds() -> None:
    checked = 0
    for doc in documents():
        key = (doc["apiVersion"], doc["kind"])
        if key in CUSTOM:
            jsonschema.validate(doc, crd_schema(*key))
            checked += 1
    assert checked == 2


def test_a_typo_in_the_pool_is_an_error() -> None:
    pool = copy.deepcopy(find("InferencePool"))
    pool["spec"]["targetPort"] = pool["spec"].pop("targetPorts")  # one letter short
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pool, crd_schema(pool["apiVersion"], "InferencePool"))
    pool = copy.deepcopy(find("InferencePool"))
    pool["spec"]["endpointPickerRef"]["failureMode"] = "FailOpn"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(pool, crd_schema(pool["apiVersion"], "InferencePool"))


def test_the_pieces_agree() -> None:
    pool, route = find("InferencePool"), find("HTTPRoute")
    picker_service, deployment = find("Service"), find("Deployment")
    config = parse_config(yaml.safe_load(find("ConfigMap")["data"]["routes.yaml"]), "routes.yaml")
    # The pool's pods are what the picker's discovery follows: the Service `vllm`'s selector.
    vllm_service = next(doc for doc in yaml.safe_load_all((ROOT / "deploy" / "kubernetes" / "example-vllm.yaml")
                                                          .read_text()) if doc and doc["kind"] == "Service")
    discovery = config.models[0].discovery
    assert discovery is not None and discovery.kubernetes is not None
    assert discovery.kubernetes.service == vllm_service["metadata"]["name"]
    assert vllm_service["spec"]["selector"] == pool["spec"]["selector"]["matchLabels"]
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [vllm_service["spec"]["ports"][0]["port"]]
    # The pool's picker is this Service's gRPC port, which is the container's --picker-port.
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["name"] == picker_service["metadata"]["name"]
    grpc = next(p for p in picker_service["spec"]["ports"] if p["name"] == "grpc")
    assert ref["port"]["number"] == grpc["port"] and grpc["appProtocol"] == "kubernetes.io/h2c"
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = container["args"]
    assert args[0] == "pick" and args[args.index("--picker-port") + 1] == str(grpc["port"])
    assert {"name": "grpc", "containerPort": grpc["port"]} in container["ports"]
    assert container["readinessProbe"]["grpc"] == {"port": grpc["port"], "service": "readiness"}
    assert container["livenessProbe"]["grpc"] == {"port": grpc["port"], "service": "liveness"}
    # The pod's account may do what discovery does: list and watch EndpointSlices.
    role, binding = find("Role"), find("RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": pod["serviceAccountName"]}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert any("endpointslices" in rule["resources"] and {"list", "watch"} <= set(rule["verbs"])
               for rule in role["rules"])
    assert discovery.kubernetes.namespace == yaml.safe_load(
        (PICKER / "kustomization.yaml").read_text())["namespace"]
    # The route sends the API to the pool.
    backend = route["spec"]["rules"][0]["backendRefs"][0]
    assert (backend["group"], backend["kind"], backend["name"]) == (
        "inference.networking.k8s.io", "InferencePool", pool["metadata"]["name"])
    # The image the Deployment runs has the picker's dependencies.
    assert "picker" in next(line for line in (ROOT / "Dockerfile").read_text().splitlines()
                            if line.startswith("RUN pip install"))
