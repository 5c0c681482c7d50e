"""The Kubernetes manifests (deploy/k8s), without a cluster: every object validates against the Kubernetes
OpenAPI schema of 1.30 (the first release whose preStop `sleep` is on by default) and of the newest release
the validator ships, strictly (unknown fields rejected), with kubernetes-validate from PyPI; the PodMonitor
(a Prometheus Operator CRD the validator has no schema for) and the wiring between the objects are checked
here: probes, GPU, read-only pack volume, SIGTERM drain within the grace period, selectors, ports, the HPA's
metric through the Prometheus adapter."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import yaml

from server.config import EngineConfig, ServerConfig, env_name, flag_fields

kubernetes_validate = pytest.importorskip("kubernetes_validate")

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text())
OBJECTS = {f"{d['kind']}/{d['metadata']['name']}": d
           for f in KUSTOMIZATION["resources"] for d in yaml.safe_load_all((K8S / f).read_text()) if d}
VERSIONS = ["1.30.0", kubernetes_validate.utils.latest_version() + ".0"]


def _obj(kind: str) -> dict:
    (found,) = [o for key, o in OBJECTS.items() if key.startswith(kind + "/")]
    return found


def _container() -> dict:
    (c,) = _obj("Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def _env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in _container()["env"]}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("key", [k for k in OBJECTS if not k.startswith("PodMonitor/")])
def test_objects_validate_against_the_kubernetes_schema(key, version):
    assert kubernetes_validate.validate(OBJECTS[key], version, strict=True)


def test_the_validator_rejects_what_kubernetes_would():
    """The strict schema is real: an unknown field, a wrong type and a missing required field all fail."""
    bad = copy.deepcopy(_obj("Deployment"))
    bad["spec"]["template"]["spec"]["containers"][0]["ports"][0]["bogus"] = 1
    wrong = copy.deepcopy(_obj("Deployment"))
    wrong["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "45"
    missing = copy.deepcopy(_obj("HorizontalPodAutoscaler"))
    del missing["spec"]["scaleTargetRef"]["name"]
    for obj in (bad, wrong, missing):
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(obj, VERSIONS[-1], strict=True)


def test_every_file_is_listed_and_every_variable_is_known():
    objects = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "prometheus-adapter-values.yaml"}
    assert set(KUSTOMIZATION["resources"]) == objects
    known = {env_name("pack")} | {env_name(f.name) for cls in (ServerConfig, EngineConfig) for f in flag_fields(cls)}
    assert set(_env()) <= known, set(_env()) - known


def test_gpu_probes_and_read_only_packs():
    c, spec = _container(), _obj("Deployment")["spec"]["template"]["spec"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and _env()["UC_DEVICE"] == "cuda"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert c["startupProbe"]["httpGet"]["path"] == "/health/live"
    assert _env()["UC_HOST"] == "0.0.0.0"
    port = next(p for p in c["ports"] if p["name"] == "http")
    assert str(port["containerPort"]) == _env()["UC_PORT"]
    (mount,) = c["volumeMounts"]
    assert mount["readOnly"] and _env()["UC_PACK"].startswith(mount["mountPath"] + "/")
    (vol,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    claim = vol["persistentVolumeClaim"]
    assert claim["readOnly"] and claim["claimName"] == _obj("PersistentVolumeClaim")["metadata"]["name"]
    assert "ReadOnlyMany" in _obj("PersistentVolumeClaim")["spec"]["accessModes"]  # every replica mounts it


def test_sigterm_drain_fits_the_grace_period():
    """Kubernetes runs preStop, then sends SIGTERM; uc serve drains for up to UC_DRAIN_TIMEOUT; SIGKILL comes
    terminationGracePeriodSeconds after the start: it must cover both with room for uvicorn's shutdown."""
    spec = _obj("Deployment")["spec"]["template"]["spec"]
    pre_stop = _container()["lifecycle"]["preStop"]["sleep"]["seconds"]
    drain = float(_env()["UC_DRAIN_TIMEOUT"])
    assert spec["terminationGracePeriodSeconds"] >= pre_stop + drain + 5
    assert _obj("Deployment")["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_service_and_podmonitor_select_the_pods():
    pod_labels = _obj("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert _obj("Deployment")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    svc = _obj("Service")["spec"]
    assert svc["selector"].items() <= pod_labels.items()
    port_names = {p["name"] for p in _container()["ports"]}
    assert {p["targetPort"] for p in svc["ports"]} <= port_names
    pm = _obj("PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert ep["port"] in port_names and ep["path"] == "/metrics"
    assert set(pm["spec"]) == {"selector", "podMetricsEndpoints"} and set(ep) <= {"port", "path", "interval"}


def test_hpa_scales_on_the_queue_through_the_adapter():
    hpa = _obj("HorizontalPodAutoscaler")["spec"]
    dep = _obj("Deployment")
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": dep["metadata"]["name"]}
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    (rule,) = yaml.safe_load((K8S / "prometheus-adapter-values.yaml").read_text())["rules"]["custom"]
    assert rule["name"]["as"] == metric["pods"]["metric"]["name"]
    series = re.match(r"([a-z_:]+)\{", rule["seriesQuery"])[1]
    assert re.fullmatch(rule["name"]["matches"], series)
    assert series == "uc:num_requests_waiting"  # exported by uc serve (tests/test_dashboard.py scrapes it)
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}  # the PodMonitor's pod label
