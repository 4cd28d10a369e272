"""The Kubernetes manifests: parse, carry what the operator needs, validate as Kubernetes objects."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
VERSION = kubernetes_validate.latest_version()


def documents():
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            yield path.name, doc


def cluster_specs():
    """Every DaskCluster spec: the DaskCluster's own and each DaskJob's."""
    for name, doc in documents():
        if doc["kind"] == "DaskCluster":
            yield name, doc["spec"]
        if doc["kind"] == "DaskJob":
            yield name, doc["spec"]["cluster"]["spec"]


def validate(kind: str, spec: dict) -> None:
    api = "v1"
    kubernetes_validate.validate({"apiVersion": api, "kind": kind, "metadata": {"name": "x"}, "spec": spec}, VERSION, strict=True)


def gib(quantity: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)\s*([A-Za-z]*)", quantity).groups()
    return float(value) * {"Gi": 1, "GiB": 1, "Mi": 1 / 1024, "MiB": 1 / 1024}[unit]


def test_every_manifest_parses_and_names_its_kind():
    kinds = {doc["kind"] for _, doc in documents()}
    assert {"DaskCluster", "DaskJob", "DaskAutoscaler"} <= kinds
    for _, doc in documents():
        assert doc["apiVersion"] in ("kubernetes.dask.org/v1", "v1") and doc["metadata"]["name"]


def test_operator_resources_have_the_required_fields():
    for name, spec in cluster_specs():
        assert spec["scheduler"]["spec"]["containers"] and spec["scheduler"]["service"]["ports"], name
        assert spec["worker"]["spec"]["containers"], name
        assert isinstance(spec["worker"]["replicas"], int)
    for _, doc in documents():
        if doc["kind"] == "DaskJob":
            assert doc["spec"]["job"]["spec"]["containers"]
        if doc["kind"] == "DaskAutoscaler":
            assert doc["spec"]["cluster"] and 1 <= doc["spec"]["minimum"] <= doc["spec"]["maximum"]


def test_pod_and_service_specs_validate_against_kubernetes():
    pods = []
    for name, spec in cluster_specs():
        pods += [spec["scheduler"]["spec"], spec["worker"]["spec"]]
        validate("Service", spec["scheduler"]["service"])
    pods += [doc["spec"]["job"]["spec"] for _, doc in documents() if doc["kind"] == "DaskJob"]
    for pod in pods:
        validate("Pod", pod)
        # Quantities are strings, as Kubernetes wants them.
        for c in pod["containers"]:
            for section in c["resources"].values():
                assert all(isinstance(v, str) for v in section.values())
    # A spec that breaks the schema is caught: the check can fail.
    with pytest.raises(kubernetes_validate.ValidationError):
        validate("Pod", {"containers": [{"name": "x", "image": "y", "unknownField": 1}]})


def test_pods_are_non_root_limited_and_name_the_dashboard():
    for name, spec in cluster_specs():
        for role in ("scheduler", "worker"):
            pod = spec[role]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
            for c in pod["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False
                assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
                assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"]
                assert any(p["name"] == "http-dashboard" for p in c["ports"])
        for c in spec["worker"]["spec"]["containers"]:
            args = c["args"]
            limit = args[args.index("--memory-limit") + 1]
            assert gib(limit) == gib(c["resources"]["limits"]["memory"]), name


def all_containers():
    for name, spec in cluster_specs():
        for role in ("scheduler", "worker"):
            yield from spec[role]["spec"]["containers"]
    for _, doc in documents():
        if doc["kind"] == "DaskJob":
            yield from doc["spec"]["job"]["spec"]["containers"]


def test_secrets_come_from_a_secret_not_the_manifests():
    for c in all_containers():
        for var in c.get("env", []):  # no credential is ever written into a manifest
            assert not re.search(r"KEY|SECRET|PASSWORD|TOKEN", var["name"]) or "valueFrom" in var
    job_and_workers = [c for c in all_containers() if c["name"] in ("job", "worker")]
    assert all({"secretRef": {"name": "blockals-s3", "optional": True}} in c["envFrom"] for c in job_and_workers)


def test_the_job_runs_the_pipeline_the_image_contains():
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.M).group(1)
    assert re.search(r"^COPY pipelines \./pipelines", dockerfile, re.M)
    assert re.search(r"^USER 1000", dockerfile, re.M)
    for _, doc in documents():
        if doc["kind"] != "DaskJob":
            continue
        args = doc["spec"]["job"]["spec"]["containers"][0]["args"]
        script = Path(args[1])
        assert args[0] == "python" and script.parent.parent == Path(workdir)
        assert (ROOT / script.relative_to(workdir)).is_file()
        config = Path(args[args.index("--config") + 1])
        assert (ROOT / config.relative_to(workdir)).is_file()
        assert args[args.index("--data") + 1].startswith("s3://")  # outputs go to a bucket
