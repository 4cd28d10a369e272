"""The deployment in deploy/: manifests that Kubernetes and the dask-kubernetes operator accept,
hardened pods, commands the image installs, and the DaskJob's pipeline run as the operator runs it.

The image itself is not built here (no Docker engine): its install line runs in a venv at
/opt/venv, and the image's layout (/opt/blockals, a read-only root filesystem, the emptyDir
at /tmp) is made with a private mount namespace for each "container".
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import blockals
from blockals import cluster as clusters

kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
MANIFESTS = sorted((DEPLOY / "kubernetes").glob("*.yaml"))
VERSION = kubernetes_validate.latest_version()
DASK_KINDS = ("DaskCluster", "DaskJob", "DaskAutoscaler", "DaskWorkerGroup")


def documents():
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            yield path.name, doc


def the(kind: str) -> dict:
    (doc,) = [doc for _, doc in documents() if doc["kind"] == kind]
    return doc


def cluster_specs():
    """Every DaskCluster spec: the DaskCluster's own and each DaskJob's."""
    for name, doc in documents():
        if doc["kind"] == "DaskCluster":
            yield name, doc["spec"]
        if doc["kind"] == "DaskJob":
            yield name, doc["spec"]["cluster"]["spec"]


def pods():
    """``(role, pod spec)`` of every pod the manifests make."""
    for _, spec in cluster_specs():
        yield "scheduler", spec["scheduler"]["spec"]
        yield "worker", spec["worker"]["spec"]
    for _, doc in documents():
        if doc["kind"] == "DaskJob":
            yield "job", doc["spec"]["job"]["spec"]


def all_containers(init: bool = False):
    for _, pod in pods():
        yield from pod["containers"]
        if init:
            yield from pod.get("initContainers", [])


def argv(container: dict) -> list[str]:
    """What the container runs: its command and args (the image has no ENTRYPOINT)."""
    return container.get("command", []) + container.get("args", [])


def validate(kind: str, spec: dict) -> None:
    kubernetes_validate.validate({"apiVersion": "v1", "kind": kind, "metadata": {"name": "x"}, "spec": spec}, VERSION,
                                 strict=True)


def gib(quantity: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)\s*([A-Za-z]*)", quantity).groups()
    return float(value) * {"Gi": 1, "GiB": 1, "Mi": 1 / 1024, "MiB": 1 / 1024}[unit]


# The image, read from deploy/Dockerfile.

DOCKERFILE = (DEPLOY / "Dockerfile").read_text()
INSTRUCTIONS = [re.split(r"\s+", line, maxsplit=1) for line in re.sub(r"\\\n\s*", " ", DOCKERFILE).splitlines()
                if line.strip() and not line.lstrip().startswith("#")]


def image_env() -> dict[str, str]:
    env = {}
    for op, rest in INSTRUCTIONS:
        if op == "ENV":
            env.update(item.split("=", 1) for item in shlex.split(rest))
    return env


def image_install() -> tuple[str, list[str]]:
    """``(venv, pip install arguments)`` of the Dockerfile's install line."""
    (venv,) = [rest.split()[-1] for op, rest in INSTRUCTIONS if op == "RUN" and rest.startswith("python -m venv ")]
    (line,) = [rest for op, rest in INSTRUCTIONS if op == "RUN" and rest.startswith(f"{venv}/bin/pip install ")]
    return venv, shlex.split(line)[2:]


def image_workdir() -> str:
    (workdir,) = [rest for op, rest in INSTRUCTIONS if op == "WORKDIR"]
    return workdir


def image_copies() -> list[tuple[list[str], str]]:
    return [(parts[:-1], parts[-1]) for op, rest in INSTRUCTIONS if op == "COPY" for parts in [rest.split()]]


def image_precompile() -> list[str]:
    (code,) = re.findall(r'python -c "([^"]*precompile[^"]*)"', DOCKERFILE)
    return ["python", "-c", code]


def constraints() -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonical(name)] = version.strip()
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# Parsing and Kubernetes' own schemas.


def test_every_manifest_parses_and_names_its_kind():
    kinds = {doc["kind"] for _, doc in documents()}
    assert {"DaskCluster", "DaskJob", "DaskAutoscaler", "NetworkPolicy"} <= kinds
    for _, doc in documents():
        assert doc["apiVersion"] in ("kubernetes.dask.org/v1", "networking.k8s.io/v1") and doc["metadata"]["name"]


def test_pod_service_and_policy_specs_validate_against_kubernetes():
    for name, spec in cluster_specs():
        validate("Service", spec["scheduler"]["service"])
    for _, pod in pods():
        validate("Pod", pod)
        # Quantities are strings, as Kubernetes wants them.
        for c in pod["containers"] + pod.get("initContainers", []):
            for section in c["resources"].values():
                assert all(isinstance(v, str) for v in section.values())
    for _, doc in documents():
        if doc["kind"] == "NetworkPolicy":
            kubernetes_validate.validate(doc, VERSION, strict=True)
    # A spec that breaks the schema is caught: the check can fail.
    with pytest.raises(kubernetes_validate.ValidationError):
        validate("Pod", {"containers": [{"name": "x", "image": "y", "unknownField": 1}]})


# The operator's custom resources, checked against the CRDs dask-kubernetes ships.


def crd_schemas() -> dict[str, dict]:
    """The operator's CRDs (the Helm chart's, with the pod and service schemas written out):
    kind -> the OpenAPI schema of its served version, with unknown fields refused."""
    pytest.importorskip("dask_kubernetes", reason="the operator's CRDs come with dask-kubernetes (test extra)")
    crds = importlib.resources.files("dask_kubernetes") / "operator" / "deployment" / "helm" / \
        "dask-kubernetes-operator" / "crds"
    schemas = {}
    for path in crds.iterdir():
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))  # 900 kB of YAML
        (version,) = [v for v in crd["spec"]["versions"] if v["served"]]
        assert crd["spec"]["group"] + "/" + version["name"] == "kubernetes.dask.org/v1"
        kind = crd["spec"]["names"]["kind"]
        schema = strict(version["schema"]["openAPIV3Schema"])
        # The fields every object has, which the API server checks itself.
        schema["properties"] = {**schema["properties"], "apiVersion": {"const": "kubernetes.dask.org/v1"},
                                "kind": {"const": kind}, "metadata": {"type": "object", "required": ["name"]}}
        schemas[kind] = schema
    assert set(schemas) == set(DASK_KINDS)
    return schemas


def strict(schema):
    """The schema with ``additionalProperties: false`` wherever it lists an object's fields: the API
    server drops a field its CRD does not know (a misplaced securityContext would be lost without
    a word), so the manifests must have none."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


def crd_errors(doc: dict, schemas: dict[str, dict]) -> list[str]:
    validator = jsonschema.Draft7Validator(schemas[doc["kind"]])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


def test_operator_resources_validate_against_the_operators_crds():
    schemas = crd_schemas()
    resources = [(name, doc) for name, doc in documents() if doc["kind"] in DASK_KINDS]
    resources.append(("kubernetes_cluster_spec()", clusters.kubernetes_cluster_spec()))
    assert len(resources) >= 4
    for name, doc in resources:
        assert crd_errors(doc, schemas) == [], name
    # The check can fail: a field the CRD does not know, and one of the wrong type.
    cluster = the("DaskCluster")
    misplaced = {**cluster, "spec": {**cluster["spec"], "worker": {**cluster["spec"]["worker"], "securityContext": {}}}}
    assert any("securityContext" in e for e in crd_errors(misplaced, schemas))
    assert crd_errors({**the("DaskAutoscaler"), "spec": {"cluster": "blockals", "minimum": "1", "maximum": 8}}, schemas)
    assert crd_errors({**the("DaskJob"), "spec": {"cluster": the("DaskJob")["spec"]["cluster"]}}, schemas)  # no job


def test_operator_resources_have_what_the_operator_reads():
    for name, spec in cluster_specs():
        assert spec["scheduler"]["spec"]["containers"] and spec["scheduler"]["service"]["ports"], name
        assert spec["worker"]["spec"]["containers"], name
        assert isinstance(spec["worker"]["replicas"], int)
        # The operator finds the dashboard and the comm by these port names.
        assert {p["name"] for p in spec["scheduler"]["service"]["ports"]} == {"tcp-comm", "http-dashboard"}
    autoscaler = the("DaskAutoscaler")
    assert autoscaler["spec"]["cluster"] == the("DaskCluster")["metadata"]["name"]
    assert 1 <= autoscaler["spec"]["minimum"] <= autoscaler["spec"]["maximum"]


# One cluster spec: the manifests' and the one --cluster kubernetes starts.


def test_the_manifests_clusters_are_the_one_the_pipeline_starts():
    cluster, job = the("DaskCluster"), the("DaskJob")
    assert cluster == clusters.kubernetes_cluster_spec(cluster["metadata"]["name"])
    assert job["spec"]["cluster"]["spec"] == clusters.kubernetes_cluster_spec(job["metadata"]["name"])["spec"]
    # Started under a name of its own: with daskcluster.yaml's it would join (and, closing,
    # remove) the interactive cluster; with the DaskJob's, a job's.
    assert clusters.KUBERNETES_NAME not in {cluster["metadata"]["name"], job["metadata"]["name"]}
    worker_pod = job["spec"]["cluster"]["spec"]["worker"]["spec"]
    assert job["spec"]["job"]["spec"]["initContainers"] == worker_pod["initContainers"]


def test_every_pod_runs_the_versioned_image():
    image = f"blockals:{blockals.__version__}"
    assert clusters.kubernetes_image() == image
    assert {c["image"] for c in all_containers(init=True)} == {image}
    assert clusters.kubernetes_cluster_spec(image="registry.example.com/b:1")["spec"]["worker"]["spec"]["containers"][0][
        "image"] == "registry.example.com/b:1"
    readme = (DEPLOY / "README.md").read_text()
    assert f"-t registry.example.com/{image} ." in readme and "latest" not in readme
    assert f"-t {image} ." in DOCKERFILE and "latest" not in DOCKERFILE
    assert re.search(r"^FROM python:\d+\.\d+\.\d+-slim-\w+$", DOCKERFILE, re.M)  # the base image's Python pinned too


# Hardening.


def test_pods_are_non_root_confined_and_write_only_their_emptydir():
    user = next(rest for op, rest in INSTRUCTIONS if op == "USER")
    for role, pod in pods():
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and str(security["runAsUser"]) == user != "0", role
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}, role
        assert pod["automountServiceAccountToken"] is False, role  # no pod talks to the Kubernetes API
        (scratch,) = pod["volumes"]
        assert set(scratch) == {"name", "emptyDir"}
        for c in pod["containers"] + pod.get("initContainers", []):
            assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                                            "readOnlyRootFilesystem": True}, role
            assert c["volumeMounts"] == [{"name": scratch["name"], "mountPath": clusters.SCRATCH}], role
            assert c["resources"]["limits"]["memory"] and c["resources"]["requests"]["cpu"]
        for c in pod["containers"]:
            # Everything a container writes goes to the emptyDir: $HOME, temporary files,
            # Dask's scratch space and spilled data, numba's cache.
            env = {v["name"]: v["value"] for v in c["env"]}
            for var in ("HOME", "TMPDIR", "DASK_TEMPORARY_DIRECTORY", "NUMBA_CACHE_DIR"):
                assert Path(clusters.SCRATCH) in [Path(env[var]), *Path(env[var]).parents], (role, var)
            if role != "job":
                assert any(p["name"] == "http-dashboard" for p in c["ports"])
        if role != "scheduler":  # workers and the job load the image's compiled loops, not compile them
            (init,) = pod["initContainers"]
            (main,) = pod["containers"]
            assert init["command"][:2] == ["python", "-c"]
            assert repr(image_env()["NUMBA_CACHE_DIR"]) in init["command"][2]
            assert repr({v["name"]: v["value"] for v in main["env"]}["NUMBA_CACHE_DIR"]) in init["command"][2]
    for _, spec in cluster_specs():
        for c in spec["worker"]["spec"]["containers"]:
            command = argv(c)
            limit = command[command.index("--memory-limit") + 1]
            assert gib(limit) == gib(c["resources"]["limits"]["memory"])


def test_secrets_come_from_a_secret_not_the_manifests():
    for c in all_containers(init=True):
        for var in c.get("env", []):  # no credential is ever written into a manifest
            assert not re.search(r"KEY|SECRET|PASSWORD|TOKEN", var["name"]) or "valueFrom" in var
    job_and_workers = [c for c in all_containers() if c["name"] in ("job", "worker")]
    assert job_and_workers and all(
        {"secretRef": {"name": "blockals-s3", "optional": True}} in c["envFrom"] for c in job_and_workers)


def operator_pods(job: dict) -> dict[str, list[dict]]:
    """The pods the operator makes for a DaskJob (its own functions build them): role -> pods,
    each ``{"metadata": ..., "spec": ...}``."""
    pytest.importorskip("dask_kubernetes", reason="the operator's pod builders come with dask-kubernetes (test extra)")
    from dask_kubernetes.operator.controller import controller

    name, cluster = job["metadata"]["name"], job["spec"]["cluster"]["spec"]
    scheduler = controller.build_scheduler_deployment_spec(name, cluster["scheduler"]["spec"], {}, {})
    workers = [controller.build_worker_deployment_spec(f"{name}-default", "default", name, f"w{i}",
                                                       cluster["worker"]["spec"], {}, {})
               for i in range(cluster["worker"]["replicas"])]
    runner = controller.build_job_pod_spec(name, name, "default", job["spec"]["job"]["spec"], {}, {})
    return {"scheduler": [scheduler["spec"]["template"]], "worker": [w["spec"]["template"] for w in workers],
            "job": [runner]}


def admits(policy: dict, labels: dict[str, str], namespace: dict[str, str], port: int) -> bool:
    """Whether ``policy`` lets a pod with ``labels`` in a namespace with labels ``namespace``
    connect to ``port`` of a pod it selects (same namespace as the policy: {"...name": "default"})."""
    def matches(selector, have):
        return selector is not None and all(have.get(k) == v for k, v in selector.get("matchLabels", {}).items())

    for rule in policy["spec"]["ingress"]:
        if "ports" in rule and port not in [p["port"] for p in rule["ports"]]:
            continue
        for peer in rule["from"]:
            in_namespace = matches(peer["namespaceSelector"], namespace) if "namespaceSelector" in peer \
                else namespace == {"kubernetes.io/metadata.name": "default"}
            if in_namespace and matches(peer.get("podSelector", {}), labels):
                return True
    return False


def test_network_policies_admit_only_the_clusters_own_pods_and_the_operator():
    policies = {doc["metadata"]["name"]: doc for _, doc in documents() if doc["kind"] == "NetworkPolicy"}
    names = {the("DaskCluster")["metadata"]["name"], the("DaskJob")["metadata"]["name"], clusters.KUBERNETES_NAME}
    selected = {p["spec"]["podSelector"]["matchLabels"]["dask.org/cluster-name"] for p in policies.values()}
    assert selected == names  # every cluster blockals starts is isolated
    for policy in policies.values():
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        assert all(rule.get("from") and not any("ipBlock" in peer for peer in rule["from"])
                   for rule in policy["spec"]["ingress"])
    here = {"kubernetes.io/metadata.name": "default"}
    operator = ({"app.kubernetes.io/name": "dask-kubernetes-operator", "app.kubernetes.io/instance": "x"},
                {"kubernetes.io/metadata.name": "dask-operator"})
    job = the("DaskJob")
    policy = policies[job["metadata"]["name"]]
    made = operator_pods(job)
    for role, role_pods in made.items():
        for pod in role_pods:
            labels = pod["metadata"]["labels"]
            assert all(labels.get(k) == v for k, v in policy["spec"]["podSelector"]["matchLabels"].items()), role
            # The scheduler and its dashboard take the job's runner pod and the workers.
            for port in (8786, 8787):
                assert admits(policy, labels, here, port), (role, port)
    assert admits(policy, *operator, 8787) and admits(policy, *operator, 8786)
    assert not admits(policy, *operator, 40000)  # the operator only asks the scheduler
    other = {**made["worker"][0]["metadata"]["labels"], "dask.org/cluster-name": "blockals"}
    for port in (8786, 8787):
        assert not admits(policy, other, here, port)  # another Dask cluster's pod
        assert not admits(policy, {"app": "anything"}, here, port)
        assert not admits(policy, made["job"][0]["metadata"]["labels"], {"kubernetes.io/metadata.name": "other"}, port)


# Commands: each is a program that the image's install line installs.


def requirement_closure(name: str, extras: set[str]) -> dict[str, importlib.metadata.Distribution]:
    """The installed distributions ``name[extras]`` needs, transitively (markers evaluated here)."""
    from packaging.requirements import Requirement

    found: dict[str, importlib.metadata.Distribution] = {}
    seen = set()
    todo = [(name, frozenset(extras))]
    while todo:
        dist_name, dist_extras = todo.pop()
        if (canonical(dist_name), dist_extras) in seen:
            continue
        seen.add((canonical(dist_name), dist_extras))
        dist = importlib.metadata.distribution(dist_name)
        found[canonical(dist.metadata["Name"])] = dist
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (dist_extras or {""})):
                todo.append((req.name, frozenset(req.extras)))
    return found


def image_extras() -> set[str]:
    """The extras of blockals that the Dockerfile's install line installs."""
    _, args = image_install()
    (target,) = [a for a in args if a.startswith(".")]
    return set(re.fullmatch(r"\.\[([\w,]+)\]", target).group(1).split(","))


def image_programs() -> dict[str, tuple[str, importlib.metadata.EntryPoint]]:
    """Console scripts (and `dask` subcommands, as ``"dask scheduler"``) installed by the
    Dockerfile's install line, as resolved in this environment: name -> (distribution, entry point)."""
    programs = {}
    for key, dist in requirement_closure("blockals", image_extras()).items():
        for ep in dist.entry_points:
            if ep.group == "console_scripts":
                programs[ep.name] = (key, ep)
            elif ep.group == "dask_cli":  # `dask <name>`: distributed's scheduler and worker
                programs[f"dask {ep.name}"] = (key, ep)
    return programs


def test_every_command_is_a_program_the_image_installs():
    programs = image_programs()
    pins = constraints()
    commands = [argv(c) for c in all_containers(init=True)]
    assert {tuple(c[:2]) for c in commands if c[0] == "dask"} == {("dask", "scheduler"), ("dask", "worker")}
    for command in commands:
        if command[0] == "python":  # the venv's interpreter
            continue
        program = " ".join(command[:2]) if command[0] == "dask" else command[0]
        assert program in programs, f"{command[:2]}: not installed by the image ({sorted(programs)})"
        dist, ep = programs[program]
        ep.load()  # its code imports
        assert pins.get(dist) == importlib.metadata.version(dist), f"{dist} is not pinned at the version tested"
    assert "dask-scheduler" not in programs and "dask-worker" not in programs  # gone from distributed
    # The S3 extra is in the image (the job writes to s3://), and everything it or a machine
    # starting clusters (--cluster kubernetes) installs is pinned.
    assert "s3" in image_extras() and "s3fs" in requirement_closure("blockals", image_extras())
    for dist in requirement_closure("blockals", image_extras() | {"kubernetes"}):
        if dist != "blockals":
            assert dist in pins, f"{dist} is not in deploy/constraints.txt"


def test_the_job_runs_the_pipeline_the_image_contains():
    workdir = Path(image_workdir())
    assert (["pipelines"], "./pipelines") in image_copies()
    job = the("DaskJob")["spec"]["job"]["spec"]["containers"][0]
    command = argv(job)
    script = Path(command[1])
    assert command[0] == "python" and script.parent.parent == workdir
    assert (ROOT / script.relative_to(workdir)).is_file()
    config = Path(command[command.index("--config") + 1])
    assert (ROOT / config.relative_to(workdir)).is_file()
    assert command[command.index("--data") + 1].startswith("s3://")  # outputs go to a bucket


# --cluster kubernetes.


def load_pipeline():
    spec = importlib.util.spec_from_file_location("als_pipeline", ROOT / "pipelines" / "als_pipeline.py")
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    return pipeline


@pytest.fixture
def fake_kubecluster(monkeypatch):
    """dask-kubernetes' KubeCluster replaced by a LocalCluster that records how it was made."""
    pytest.importorskip("dask_kubernetes", reason="--cluster kubernetes needs dask-kubernetes (test extra)")
    import dask_kubernetes.operator
    from distributed import LocalCluster

    made = []

    class FakeKubeCluster(LocalCluster):
        def __init__(self, **kwargs):
            made.append(kwargs)
            spec = kwargs["custom_cluster_spec"]
            if spec["metadata"]["name"] == "taken":
                raise ValueError("Cluster taken already exists and create mode is 'CREATE_ONLY'")
            super().__init__(n_workers=1, threads_per_worker=1, processes=False, host="127.0.0.1", protocol="tcp://",
                             dashboard_address="127.0.0.1:0")

    monkeypatch.setattr(dask_kubernetes.operator, "KubeCluster", FakeKubeCluster)
    return made


def test_cluster_kubernetes_starts_the_blockals_image_under_its_own_name(fake_kubecluster, tmp_path, monkeypatch):
    from dask_kubernetes.operator.kubecluster.kubecluster import CreateMode

    pipeline = load_pipeline()
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    data = tmp_path / "data"
    assert pipeline.main(["--cluster", "kubernetes", "--n-workers", "3", "--stages", "ingest", "--data", str(data)]) == 0
    assert pipeline.main(["--cluster", "kubernetes", "--image", "registry.example.com/blockals:0.1.0",
                          "--stages", "ingest", "--data", str(data)]) == 0
    first, second = fake_kubecluster
    assert first["custom_cluster_spec"] == clusters.kubernetes_cluster_spec(n_workers=3)
    assert first["custom_cluster_spec"]["metadata"]["name"] == clusters.KUBERNETES_NAME
    assert first["create_mode"] == CreateMode.CREATE_ONLY and first["shutdown_on_close"] is True
    images = {c["image"] for role in ("scheduler", "worker")
              for c in second["custom_cluster_spec"]["spec"][role]["spec"]["containers"]}
    assert images == {"registry.example.com/blockals:0.1.0"}
    assert (data / "ratings.zarr" / "zarr.json").exists()


def test_cluster_kubernetes_refuses_a_cluster_already_there(fake_kubecluster):
    with pytest.raises(blockals.InputError, match="kubectl delete daskcluster taken"):
        with clusters.kubernetes_client(name="taken"):
            pass


def test_cluster_kubernetes_without_dask_kubernetes_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", None)
    with pytest.raises(blockals.InputError, match=r"pip install 'blockals\[kubernetes\]'"):
        with clusters.kubernetes_client():
            pass


# The image's layout, made with a private mount namespace per container.

LAYOUT = r"""
set -e
pipelines=$1 cache=$2 emptydir=$3 venv=$4 keep=$5; shift 5
mount -t tmpfs -o mode=755 blockals-opt /opt
mkdir -p /opt/blockals/pipelines /opt/blockals/numba-cache /opt/venv /opt/host-tmp
mount --bind "$pipelines" /opt/blockals/pipelines
mount -o remount,bind,ro /opt/blockals/pipelines
if [ -n "$cache" ]; then mount --bind "$cache" /opt/blockals/numba-cache; fi
if [ -n "$venv" ]; then mount --bind "$venv" /opt/venv; fi
if [ -n "$emptydir" ]; then
    mount --bind /tmp /opt/host-tmp
    mount --bind "$emptydir" /tmp
    for path in $keep; do  # this Python and checkout, where they live under the host's /tmp
        mkdir -p "$path"
        mount --bind "/opt/host-tmp${path#/tmp}" "$path"
    done
    mount -o remount,ro /opt
    mount -o remount,bind,ro /
fi
cd /opt/blockals
exec "$@"
"""


def in_layout(command: list[str], *, cache: Path | None = None, emptydir: Path | None = None,
              venv: Path | None = None) -> list[str]:
    """``command`` in a mount namespace where /opt holds the image's files: /opt/blockals/pipelines
    (this checkout's, read-only), /opt/blockals/numba-cache (``cache``) and /opt/venv (``venv``).
    With ``emptydir``, that directory is /tmp and everything else is read-only, as in a pod."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", LAYOUT, "layout", str(ROOT / "pipelines"),
            str(cache or ""), str(emptydir or ""), str(venv or ""), " ".join(_under_tmp()), *command]


def _under_tmp() -> list[str]:
    """This checkout and this Python's environment where they lie under /tmp, which a pod's
    emptyDir replaces: kept visible in the layout, so the host image still finds them."""
    paths = {str(ROOT), sys.prefix, sys.base_prefix, str(Path(sys.executable).resolve().parent.parent)}
    return sorted(p for p in paths if Path(p).resolve().is_relative_to("/tmp") and " " not in p)


@pytest.fixture(scope="session")
def layouts():
    """Skips where this machine cannot make mount namespaces (the checks need root)."""
    probe = subprocess.run(in_layout(["sh", "-c", "! test -w / && ! test -w /opt/blockals/pipelines && test -w /tmp"],
                                     emptydir=Path("/tmp")), capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no private mount namespace with a read-only root here (unshare: {probe.stderr.strip()[-200:]})")


class Image:
    """Where the image's programs come from: this environment's Python ("host"), or a venv
    made at /opt/venv by the Dockerfile's own lines ("venv")."""

    def __init__(self, venv: Path | None, cache: Path):
        self.venv, self.cache = venv, cache

    def env(self, container_env: dict[str, str]) -> dict[str, str]:
        """A container's environment: the image's, then the manifest's and the operator's."""
        env = {k: v for k, v in image_env().items() if k != "PATH"}
        bindir = "/opt/venv/bin" if self.venv else str(Path(sys.executable).parent)
        env["PATH"] = f"{bindir}:/usr/local/bin:/usr/bin:/bin"
        if not self.venv and os.environ.get("PYTHONPATH"):  # a checkout run without installing it
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        return {**env, **container_env}

    def run(self, command, *, emptydir=None, container_env=(), **kwargs):
        return subprocess.run(in_layout(command, cache=self.cache, emptydir=emptydir, venv=self.venv),
                              env=self.env(dict(container_env)), **kwargs)

    def start(self, command, *, emptydir, container_env, log: Path):
        with open(log, "wb") as out:
            return subprocess.Popen(in_layout(command, cache=self.cache, emptydir=emptydir, venv=self.venv),
                                    env=self.env(container_env), stdout=out, stderr=subprocess.STDOUT)


def compiled_cache(image: Image, directory: Path) -> Path:
    """The image's numba cache, as its build makes it: the Dockerfile's precompile line, run with
    NUMBA_CACHE_DIR at ``directory`` (starting from this process's compiled loops, where their
    source is the same, so that it loads rather than compiles)."""
    from numba.core.caching import _CacheLocator

    from blockals import kernels

    image.cache = None
    where = image.run(["python", "-c", "import blockals.kernels as k; print(k.__file__)"], capture_output=True,
                      text=True, check=True).stdout.strip()
    mine = Path(kernels._cholesky_tiled._cache._cache_path)
    target = directory / _CacheLocator.get_suitable_cache_subpath(where)
    target.mkdir(parents=True, exist_ok=True)
    for f in mine.glob("kernels.*.nb[ic]"):
        shutil.copy2(f, target)
    image.cache = directory
    image.run(image_precompile(), container_env={"NUMBA_CACHE_DIR": "/opt/blockals/numba-cache"}, check=True,
              timeout=600)
    assert any(target.glob("*.nbc"))
    return directory


@pytest.fixture(scope="session")
def host_image(layouts, tmp_path_factory):
    image = Image(None, None)
    compiled_cache(image, tmp_path_factory.mktemp("host-numba-cache"))
    return image


@pytest.fixture(scope="session")
def venv_image(layouts, tmp_path_factory):
    """A venv made as the Dockerfile makes /opt/venv: ``python -m venv`` and its pip install line
    (with the pip cache, and no bytecode compiled, to be quicker), in a build context holding
    what the Dockerfile copies."""
    context = tmp_path_factory.mktemp("context")
    for sources, dest in image_copies():
        for source in sources:
            target = context / dest / Path(source).name if dest.endswith("/") or len(sources) > 1 else context / dest
            target.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if (ROOT / source).is_dir() else shutil.copy2)(ROOT / source, target)
    venv = tmp_path_factory.mktemp("venv")
    path, args = image_install()
    assert path == "/opt/venv"
    args = [a for a in args if a != "--no-cache-dir"] + ["--no-compile", "--quiet"]
    image = Image(venv, None)
    build = ["sh", "-c", 'cd "$0" && "$1" -m venv /opt/venv && shift && /opt/venv/bin/pip install "$@"',
             str(context), sys.executable, *args]
    done = image.run(build, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    compiled_cache(image, tmp_path_factory.mktemp("venv-numba-cache"))
    return image


@pytest.mark.slow  # a venv of the image's ~70 packages: a minute with pip's cache
def test_every_command_runs_in_a_venv_made_as_the_dockerfile_does(venv_image, tmp_path):
    for container in all_containers(init=True):
        command = argv(container)
        program = command[:2] if command[0] == "dask" else command[:1]
        where = venv_image.run(["sh", "-c", f"command -v {program[0]}"], capture_output=True, text=True)
        assert where.stdout.strip() == f"/opt/venv/bin/{program[0]}", command
        if command[0] == "dask":
            done = venv_image.run([*program, "--help"], capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, (command, done.stderr[-2000:])
    imports = venv_image.run(["python", "-c", "import blockals, distributed, s3fs; print(blockals.__file__)"],
                             capture_output=True, text=True, timeout=120)
    assert imports.returncode == 0 and imports.stdout.startswith("/opt/venv/"), imports.stderr[-2000:]
    # Everything the install line put in the venv is pinned, at the version it installed.
    frozen = venv_image.run(["python", "-m", "pip", "list", "--format", "json"], capture_output=True, text=True,
                            check=True).stdout
    pins = constraints()
    installed = {canonical(d["name"]): d["version"] for d in json.loads(frozen)}
    for name in set(installed) - {"blockals", "pip", "setuptools", "wheel"}:
        assert pins.get(name) == installed[name], name


# The DaskJob, run as the operator runs it.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def expand(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of a container's command and args."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg)


class DaskJobPods:
    """The DaskJob's pods as the operator makes them, run on 127.0.0.1: each container's command
    and environment as the manifest and the operator give them (init containers first), each
    in the image's layout with a read-only root and its own emptyDir; the Service's DNS name
    resolved to the scheduler's loopback address, and the Secret holding the keys of an S3 API
    on loopback. Entering starts the scheduler and the workers and gives a client of them."""

    def __init__(self, image: Image, s3_endpoint: str, tmp_path: Path):
        self.image, self.tmp_path = image, tmp_path
        self.job = the("DaskJob")
        self.made = operator_pods(self.job)
        self.secret = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_ENDPOINT_URL": s3_endpoint}
        self.port = free_port()
        self.service = f"{self.job['metadata']['name']}-scheduler.default.svc.cluster.local:8786"
        self.processes: list[subprocess.Popen] = []
        self.emptydirs: dict[str, Path] = {}

    def container_env(self, c: dict) -> dict[str, str]:
        env = dict(self.secret) if c.get("envFrom") else {}
        for var in c.get("env", []):
            env[var["name"]] = var["value"].replace(self.service, f"127.0.0.1:{self.port}")
        return env

    def start_pod(self, name: str, pod: dict, extra: list[str]):
        """Runs the pod's init containers, then starts its container (runs it to the end, for the
        job)."""
        emptydir = self.emptydirs[name] = self.tmp_path / name
        emptydir.mkdir()
        for init in pod["spec"].get("initContainers", []):
            env = self.container_env(init)
            done = self.image.run([expand(a, env) for a in argv(init)], emptydir=emptydir, container_env=env,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, (name, init["name"], done.stderr[-2000:])
        (c,) = pod["spec"]["containers"]
        env = self.container_env(c)
        command = [expand(a, env) for a in argv(c)] + extra
        if name == "job":
            return self.image.run(command, emptydir=emptydir, container_env=env, capture_output=True, text=True,
                                  timeout=900)
        self.processes.append(self.image.start(command, emptydir=emptydir, container_env=env,
                                               log=self.tmp_path / f"{name}.log"))
        return None

    def __enter__(self):
        from distributed import Client

        try:
            # The scheduler and workers listen on loopback, not on every interface as in a pod.
            self.start_pod("scheduler", self.made["scheduler"][0], ["--host", "127.0.0.1", "--port", str(self.port),
                                                                    "--dashboard-address", "127.0.0.1:0"])
            for i, pod in enumerate(self.made["worker"]):
                self.start_pod(f"worker{i}", pod, ["--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0"])
            deadline = time.monotonic() + 120
            while True:
                try:
                    self.client = Client(f"tcp://127.0.0.1:{self.port}", set_as_default=False, timeout=5)
                    break
                except OSError:
                    assert time.monotonic() < deadline and all(p.poll() is None for p in self.processes), \
                        (self.tmp_path / "scheduler.log").read_text()[-3000:]
            self.client.wait_for_workers(len(self.made["worker"]), timeout=120)
        except BaseException:
            self.__exit__()
            raise
        return self.client

    def run_job(self) -> subprocess.CompletedProcess:
        (runner,) = self.made["job"]
        return self.start_pod("job", runner, [])

    def __exit__(self, *exc) -> None:
        if getattr(self, "client", None) is not None:
            self.client.close()
        for p in self.processes:
            p.send_signal(signal.SIGTERM)
        for p in self.processes:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()

    def check_workers_wrote_only_their_emptydirs(self) -> None:
        """Workers kept their scratch space in their emptyDir, and loaded the image's compiled
        solver loops from the copy the init container made there rather than compiling them
        again (a new specialization would rewrite a kernels.* index file or add one)."""
        def solver_loops(cache: Path) -> dict[str, tuple[int, int]]:
            return {str(p.relative_to(cache)): (p.stat().st_size, p.stat().st_mtime_ns)
                    for p in cache.rglob("kernels.*") if p.is_file()}

        assert solver_loops(self.image.cache)
        for i in range(len(self.made["worker"])):
            assert any(self.emptydirs[f"worker{i}"].glob("dask-scratch-space*"))
            assert solver_loops(self.emptydirs[f"worker{i}"] / "numba-cache") == solver_loops(self.image.cache)


def test_the_daskjobs_cluster_trains_from_s3_with_a_read_only_root(host_image, s3_endpoint, tmp_path):
    """The scheduler and workers of daskjob.yaml, as the operator starts them, train a model on a
    store in the bucket (the job itself runs in the slow test below)."""
    s3fs = pytest.importorskip("s3fs")
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_endpoint}}
    s3fs.S3FileSystem(**options).mkdir("blockals-cluster")
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"user": rng.integers(0, 50, 800), "item": rng.integers(0, 30, 800)}).drop_duplicates()
    frame["rating"] = rng.integers(1, 6, len(frame)).astype(float)
    pods = DaskJobPods(host_image, s3_endpoint, tmp_path)
    with pods as client:
        names = {w["name"] for w in client.scheduler_info(n_workers=-1)["workers"].values()}
        assert names == {w["metadata"]["name"] for w in pods.made["worker"]}  # $(DASK_WORKER_NAME) expanded
        store = blockals.ingest(frame, "s3://blockals-cluster/r.zarr", n_user_blocks=1, n_item_blocks=1,
                                storage_options=options)
        model = blockals.ALS(rank=3, max_iter=3, reg=0.1, dtype="float64").fit(store, client)
        # It trained on these workers (in processes whose root is read-only), not in this process.
        assert client.run_on_scheduler(lambda dask_scheduler: "blockals-solve-users" in dask_scheduler.task_prefixes)
        local = client.run(lambda dask_worker: dask_worker.local_directory)
    assert all(d.startswith(f"{clusters.SCRATCH}/") for d in local.values()), local
    pods.check_workers_wrote_only_their_emptydirs()
    # The same model as from a local copy of the data, trained in this process.
    from distributed import Client, LocalCluster

    local_store = blockals.ingest(frame, tmp_path / "r.zarr", n_user_blocks=1, n_item_blocks=1)
    with LocalCluster(n_workers=1, processes=False, host="127.0.0.1", protocol="tcp://",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster, set_as_default=False) as local_client:
        here = blockals.ALS(rank=3, max_iter=3, reg=0.1, dtype="float64").fit(local_store, local_client)
    np.testing.assert_allclose(model.user_factors_, here.user_factors_, atol=1e-8)


def run_daskjob(image: Image, s3_endpoint: str, tmp_path: Path) -> None:
    """The whole DaskJob: its cluster, then the runner pod's command exactly as written."""
    s3fs = pytest.importorskip("s3fs")
    fs = s3fs.S3FileSystem(key="testing", secret="testing", client_kwargs={"endpoint_url": s3_endpoint})
    pods = DaskJobPods(image, s3_endpoint, tmp_path)
    command = argv(pods.job["spec"]["job"]["spec"]["containers"][0])
    data = command[command.index("--data") + 1].removeprefix("s3://")
    fs.mkdir(data.split("/")[0])
    with pods as client:
        done = pods.run_job()
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        # It ran on these workers, not on a cluster of its own.
        assert client.run_on_scheduler(lambda dask_scheduler: "blockals-solve-users" in dask_scheduler.task_prefixes)
    assert "| train |" in done.stdout and "| recommend |" in done.stdout, done.stdout[-2000:]
    for name in ("ratings.zarr", "train.zarr", "test.zarr", "model.zarr", "recommendations.zarr"):
        assert fs.exists(f"{data}/{name}/zarr.json"), name
    # Better than predicting every rating with one constant, by a clear margin.
    metrics = json.loads(fs.cat(f"{data}/metrics.json"))
    assert metrics["rmse"] < 0.85 * blockals.datasets.movielens_like(seed=0)["rating"].std()
    pods.check_workers_wrote_only_their_emptydirs()


@pytest.mark.slow  # every stage of the pipeline through moto's S3 server: about 100 s
def test_the_daskjob_runs_as_the_operator_starts_it(host_image, s3_endpoint, tmp_path):
    run_daskjob(host_image, s3_endpoint, tmp_path)


@pytest.mark.slow  # builds the image's venv (see above)
def test_the_daskjob_runs_in_the_images_venv(venv_image, s3_endpoint, tmp_path):
    run_daskjob(venv_image, s3_endpoint, tmp_path)
