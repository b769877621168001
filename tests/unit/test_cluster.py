"""platform/cluster without a cluster: the KubeRay manifests, the AWS launcher config, the
runtime_env and the Dockerfile are parsed and checked against what they must agree with.

There is no Kubernetes API server or cloud here, so the checks are the ones that catch the
mistakes that otherwise surface only at `kubectl apply` / `ray up` / hours into a job:

* a compact structural schema of the KubeRay v1 CRDs (RayCluster, RayJob, RayService),
  strict where a typo would be silently ignored (unknown spec keys), jsonschema-validated;
* GPU requests on the workers and none on the head; env from Secrets, never literal keys;
* every `python -m ...` entrypoint names a module and recipe that exist, and its `--set`
  overrides load through ``ageray.config`` (a typo fails here, not on the cluster);
* render.py agreement: RayService serveConfigV2 == serve/config.yaml (but the model),
  RayJob cluster specs == raycluster.yaml, RayJob runtime_env == runtime_env.yaml;
* aws.yaml against Ray's own autoscaler schema and config validation;
* runtime_env.yaml through ``ray.runtime_env.RuntimeEnv`` and Ray's own upload filter.

Each checker returns a list of problems, and each has a test that breaks a parsed copy and
asserts the checker notices: a check that cannot fail is not a check.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import itertools
import json
import re
import shlex
import shutil
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "platform" / "cluster"
KUBERAY = CLUSTER / "kuberay"
SERVE_CONFIG = ROOT / "serve" / "config.yaml"
README = CLUSTER / "README.md"

MANIFESTS = sorted(KUBERAY.glob("*.yaml"))
RAYJOBS = sorted(KUBERAY.glob("rayjob-*.yaml"))

# Entry points other sessions are still writing: a missing one skips (with this reason)
# instead of failing; once the file exists it is checked like the others.
PENDING_MODULES = {"jobs.demo", "tuning.search"}
PENDING_FILES_UNDER = ("tuning/spaces/",)


def _load_render() -> ModuleType:
    """render.py by path: platform/ is not (and must not be) a package."""
    name = "ageray_cluster_render"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, CLUSTER / "render.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


render = _load_render()


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def kind_of(path: Path) -> str:
    return load(path)["kind"]


def cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The RayClusterSpec(s) inside a RayCluster / RayJob / RayService."""
    spec = doc.get("spec") or {}
    key = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}[
        doc["kind"]
    ]
    if key is None:
        return [spec]
    return [spec[key]] if isinstance(spec.get(key), dict) else []


def pod_templates(cluster_spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(group name, pod template) for the head and every worker group."""
    yield "head", cluster_spec["headGroupSpec"]["template"]
    for group in cluster_spec.get("workerGroupSpecs") or []:
        yield group["groupName"], group["template"]


def containers(cluster_spec: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for group, template in pod_templates(cluster_spec):
        for container in template["spec"]["containers"]:
            yield group, container


# ======================================================================================
# A compact structural schema of the KubeRay v1 CRDs
# ======================================================================================

QUANTITY = {
    "anyOf": [
        {"type": "integer", "minimum": 0},
        {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(m|k|Ki|M|Mi|G|Gi|T|Ti)?$"},
    ]
}
RESOURCES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "requests": {"type": "object", "additionalProperties": QUANTITY},
        "limits": {"type": "object", "additionalProperties": QUANTITY},
    },
}
CONTAINER = {
    "type": "object",
    "required": ["name", "image"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        # a tag, never implicitly :latest (a pod restart must not change the code)
        "image": {"type": "string", "pattern": r"^[^\s:]+(:[0-9]+)?(/[^\s:]+)*:[\w][\w.-]*$"},
        "resources": RESOURCES,
        "env": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["name"],
                "properties": {"name": {"type": "string"}, "value": {"type": "string"}},
                "not": {"required": ["value", "valueFrom"]},
            },
        },
        "ports": {
            "type": "array",
            "items": {"type": "object", "required": ["containerPort"]},
        },
    },
}
POD_TEMPLATE = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["containers"],
            "properties": {
                "containers": {"type": "array", "minItems": 1, "items": CONTAINER},
                "volumes": {"type": "array"},
            },
        },
    },
}
# rayStartParams is map[string]string in the CRD: `num-cpus: 0` (an int) is rejected.
RAY_START_PARAMS = {"type": "object", "additionalProperties": {"type": "string"}}
RAYCLUSTER_SPEC = {
    "type": "object",
    "required": ["headGroupSpec"],
    "additionalProperties": False,
    "properties": {
        "rayVersion": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "enableInTreeAutoscaling": {"type": "boolean"},
        "autoscalerOptions": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]},
                "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                "resources": RESOURCES,
                "image": {"type": "string"},
                "imagePullPolicy": {"type": "string"},
                "env": {"type": "array"},
                "envFrom": {"type": "array"},
                "securityContext": {"type": "object"},
                "volumeMounts": {"type": "array"},
                "version": {"enum": ["v1", "v2"]},
            },
        },
        "headServiceAnnotations": {"type": "object"},
        "gcsFaultToleranceOptions": {"type": "object"},
        "suspend": {"type": "boolean"},
        "managedBy": {"type": "string"},
        "headGroupSpec": {
            "type": "object",
            "required": ["rayStartParams", "template"],
            "additionalProperties": False,
            "properties": {
                "rayStartParams": RAY_START_PARAMS,
                "template": POD_TEMPLATE,
                "serviceType": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                "headService": {"type": "object"},
                "enableIngress": {"type": "boolean"},
            },
        },
        "workerGroupSpecs": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "groupName",
                    "minReplicas",
                    "maxReplicas",
                    "rayStartParams",
                    "template",
                ],
                "additionalProperties": False,
                "properties": {
                    "groupName": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                    "replicas": {"type": "integer", "minimum": 0},
                    "minReplicas": {"type": "integer", "minimum": 0},
                    "maxReplicas": {"type": "integer", "minimum": 1},
                    "idleTimeoutSeconds": {"type": "integer", "minimum": 0},
                    "rayStartParams": RAY_START_PARAMS,
                    "template": POD_TEMPLATE,
                    "numOfHosts": {"type": "integer", "minimum": 1},
                    "suspend": {"type": "boolean"},
                    "scaleStrategy": {"type": "object"},
                },
            },
        },
    },
}
METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"}},
}


def _top(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"},
            "kind": {"const": kind},
            "metadata": METADATA,
            "spec": spec,
        },
    }


SCHEMAS: dict[str, dict[str, Any]] = {
    "RayCluster": _top("RayCluster", RAYCLUSTER_SPEC),
    "RayJob": _top(
        "RayJob",
        {
            "type": "object",
            "required": ["entrypoint"],
            "additionalProperties": False,
            # a RayJob either brings its cluster or names a running one
            "oneOf": [{"required": ["rayClusterSpec"]}, {"required": ["clusterSelector"]}],
            "properties": {
                "entrypoint": {"type": "string", "minLength": 1},
                "runtimeEnvYAML": {"type": "string"},
                "rayClusterSpec": RAYCLUSTER_SPEC,
                "clusterSelector": {"type": "object", "additionalProperties": {"type": "string"}},
                "submissionMode": {
                    "enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]
                },
                "shutdownAfterJobFinishes": {"type": "boolean"},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                "backoffLimit": {"type": "integer", "minimum": 0},
                "entrypointNumCpus": {"type": "number", "minimum": 0},
                "entrypointNumGpus": {"type": "number", "minimum": 0},
                "entrypointResources": {"type": "string"},
                "jobId": {"type": "string"},
                "metadata": {"type": "object"},
                "submitterPodTemplate": POD_TEMPLATE,
                "submitterConfig": {"type": "object"},
                "suspend": {"type": "boolean"},
                "managedBy": {"type": "string"},
                "deletionStrategy": {"type": "object"},
            },
        },
    ),
    "RayService": _top(
        "RayService",
        {
            "type": "object",
            "required": ["serveConfigV2", "rayClusterConfig"],
            "additionalProperties": False,
            "properties": {
                "serveConfigV2": {"type": "string", "minLength": 1},
                "rayClusterConfig": RAYCLUSTER_SPEC,
                "upgradeStrategy": {
                    "type": "object",
                    "properties": {
                        "type": {"enum": ["NewCluster", "None", "NewClusterWithIncrementalUpgrade"]}
                    },
                },
                "serveService": {"type": "object"},
                "excludeHeadPodFromServeSvc": {"type": "boolean"},
                "serviceUnhealthySecondThreshold": {"type": "integer"},
                "deploymentUnhealthySecondThreshold": {"type": "integer"},
            },
        },
    ),
}


def schema_problems(doc: Any) -> list[str]:
    """jsonschema errors of a manifest against its kind's structural schema."""
    if not isinstance(doc, dict) or doc.get("kind") not in SCHEMAS:
        return [f"not a RayCluster/RayJob/RayService: kind={getattr(doc, 'get', dict)('kind')!r}"]
    validator = jsonschema.Draft202012Validator(SCHEMAS[doc["kind"]])
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
        for e in validator.iter_errors(doc)
    ]


# ======================================================================================
# Semantic checkers (each returns problems; empty = fine)
# ======================================================================================

CREDENTIAL_ENV = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY)", re.IGNORECASE)


def gpu_problems(cluster_spec: dict[str, Any]) -> list[str]:
    """GPU on the workers that are meant for it, none on the head, sane replica bounds."""
    out = []
    head_params = cluster_spec["headGroupSpec"]["rayStartParams"]
    if head_params.get("num-cpus") != "0":
        out.append('head: rayStartParams num-cpus must be "0" (no Ray work on the head)')
    gpu_groups = 0
    for group, container in containers(cluster_spec):
        res = container.get("resources") or {}
        limits, requests = res.get("limits") or {}, res.get("requests") or {}
        gpus = limits.get("nvidia.com/gpu")
        if group == "head":
            if gpus or requests.get("nvidia.com/gpu"):
                out.append("head: requests nvidia.com/gpu; the head must stay CPU-only")
            continue
        if group.startswith("gpu"):
            if not gpus:
                out.append(f"{group}: GPU group without an nvidia.com/gpu limit")
            elif requests.get("nvidia.com/gpu", gpus) != gpus:
                out.append(f"{group}: nvidia.com/gpu request != limit (Kubernetes rejects it)")
            gpu_groups += 1
        elif gpus:
            out.append(f"{group}: requests GPUs but is not named gpu*")
        for key in ("cpu", "memory"):
            if key not in limits:
                out.append(f"{group}: no {key} limit (Ray sizes itself from limits)")
    if gpu_groups == 0:
        out.append("no GPU worker group")
    for group in cluster_spec.get("workerGroupSpecs") or []:
        lo, hi = group["minReplicas"], group["maxReplicas"]
        if not lo <= group.get("replicas", lo) <= hi:
            out.append(f"{group['groupName']}: replicas outside [minReplicas, maxReplicas]")
    if not cluster_spec.get("enableInTreeAutoscaling"):
        out.append("enableInTreeAutoscaling is not true")
    return out


def pod_env_problems(cluster_spec: dict[str, Any]) -> list[str]:
    """Every container: MLflow URI, S3 credentials from a Secret, /dev/shm in memory."""
    out = []
    for group, template in pod_templates(cluster_spec):
        volumes = {v["name"]: v for v in template["spec"].get("volumes") or []}
        for container in template["spec"]["containers"]:
            env = {e["name"]: e for e in container.get("env") or []}
            if "MLFLOW_TRACKING_URI" not in env:
                out.append(f"{group}: no MLFLOW_TRACKING_URI")
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                ref = (env.get(name) or {}).get("valueFrom", {}).get("secretKeyRef")
                if not ref:
                    out.append(f"{group}: {name} must come from a Secret (secretKeyRef)")
            shm = [m for m in container.get("volumeMounts") or [] if m["mountPath"] == "/dev/shm"]
            if not shm:
                out.append(f"{group}: no /dev/shm mount (DataLoader workers, object store)")
            elif (volumes.get(shm[0]["name"], {}).get("emptyDir") or {}).get("medium") != "Memory":
                out.append(f"{group}: /dev/shm is not an emptyDir with medium Memory")
    return out


def secret_problems(text: str, where: str) -> list[str]:
    """Literal AWS credentials in a file's text."""
    out = []
    if re.search(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b", text):
        out.append(f"{where}: contains an AWS access key id (AKIA/ASIA...)")
    for m in re.finditer(
        r"(?im)^[^#\n]*\baws_(secret_access_key|access_key_id|session_token)\b\s*[:=]\s*(\S+)",
        text,
    ):
        value = m.group(2).strip("\"'")
        if value and not value.startswith(("$", "{", "<")):
            out.append(f"{where}: literal aws_{m.group(1)} value")
    return out


def literal_env_problems(doc: dict[str, Any], where: str) -> list[str]:
    """Credential-like env vars (SECRET/PASSWORD/TOKEN/ACCESS_KEY) set with a literal value."""
    out = []
    for spec in cluster_specs(doc):
        for group, container in containers(spec):
            for env in container.get("env") or []:
                if CREDENTIAL_ENV.search(env["name"]) and "value" in env:
                    out.append(f"{where} {group}: {env['name']} has a literal value")
    return out


def entrypoint_problems(entrypoint: str) -> tuple[list[str], list[str]]:
    """(problems, pending) for one `python -m <module> ...` command.

    The module must be jobs/<name>.py or tuning/<name>.py; --config and --space files must
    exist; --set overrides must load through ageray.config (unknown keys / bad values fail).
    """
    from ageray.config import ConfigError, load_config

    problems: list[str] = []
    pending: list[str] = []
    argv = shlex.split(entrypoint)
    if argv[:2] != ["python", "-m"] or len(argv) < 3:
        return [f"{entrypoint!r}: not `python -m <module> ...`"], pending
    module = argv[2]
    package, _, name = module.partition(".")
    if package not in ("jobs", "tuning") or not name:
        problems.append(f"{module}: entry points live in jobs/ or tuning/")
    elif not (ROOT / package / f"{name}.py").is_file():
        (pending if module in PENDING_MODULES else problems).append(
            f"{module}: {package}/{name}.py does not exist"
        )
    args = argv[3:]
    config = None
    overrides: list[str] = []
    for flag, value in itertools.pairwise(args):
        if flag in ("--config", "-c", "--space"):
            if not (ROOT / value).is_file():
                lst = pending if value.startswith(PENDING_FILES_UNDER) else problems
                lst.append(f"{module}: {flag} {value} does not exist")
            if flag != "--space":
                config = value
        elif flag == "--set":
            overrides.append(value)
    if config or overrides:
        try:
            load_config(ROOT / config if config else None, overrides)
        except ConfigError as exc:
            problems.append(f"{module}: {exc}")
    return problems, pending


def gpu_budget_problems(doc: dict[str, Any]) -> list[str]:
    """A RayJob's Ray Train workers must fit the GPUs its cluster can scale to."""
    from ageray.config import load_config

    argv = shlex.split(doc["spec"]["entrypoint"])
    config = next((v for f, v in itertools.pairwise(argv) if f in ("--config", "-c")), None)
    overrides = [v for f, v in itertools.pairwise(argv) if f == "--set"]
    if config is None or not (ROOT / config).is_file():
        return []
    cfg = load_config(ROOT / config, overrides)
    if not cfg.ray.use_gpu:
        return []
    total = 0.0
    # a clusterSelector job runs on the long-lived RayCluster
    for spec in cluster_specs(doc) or [load(KUBERAY / "raycluster.yaml")["spec"]]:
        for group in spec.get("workerGroupSpecs") or []:
            for c in group["template"]["spec"]["containers"]:
                gpus = float(
                    ((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", 0)
                )
                total += gpus * group["maxReplicas"]
    need = cfg.ray.num_workers * cfg.ray.gpus_per_worker
    if need > total:
        return [f"{doc['metadata']['name']}: needs {need:g} GPUs, the cluster scales to {total:g}"]
    return []


# ======================================================================================
# Tests: files parse and match the structural schemas
# ======================================================================================


def test_manifests_present() -> None:
    kinds = sorted(kind_of(p) for p in MANIFESTS)
    assert kinds.count("RayCluster") == 1 and kinds.count("RayService") == 1
    assert {p.name for p in RAYJOBS} >= {"rayjob-train.yaml", "rayjob-tune.yaml"}


@pytest.mark.parametrize("path", sorted(CLUSTER.rglob("*.yaml")), ids=lambda p: p.name)
def test_every_yaml_parses(path: Path) -> None:
    assert isinstance(load(path), dict), f"{path}: top level must be a mapping"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_matches_crd_schema(path: Path) -> None:
    assert schema_problems(load(path)) == []


@pytest.mark.parametrize(
    "mutate, expect",
    [
        (lambda d: d["spec"]["headGroupSpec"].pop("rayStartParams"), "rayStartParams"),
        (lambda d: d["spec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}), "string"),
        (lambda d: d["spec"]["workerGroupSpecs"][0].pop("maxReplicas"), "maxReplicas"),
        (lambda d: d["spec"]["workerGroupSpecs"][0].pop("groupName"), "groupName"),
        (lambda d: d["spec"].update({"enableInTreeAutoscaler": True}), "enableInTreeAutoscaler"),
        (
            lambda d: d["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0].pop("image"),
            "image",
        ),
        (
            lambda d: d["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0].update(
                {"image": "ghcr.io/ageray/ageray"}
            ),
            "does not match",
        ),
        (lambda d: d.update({"apiVersion": "ray.io/v1alpha1"}), "ray.io/v1"),
    ],
    ids=[
        "no-rayStartParams",
        "int-param",
        "no-maxReplicas",
        "no-groupName",
        "typo",
        "no-image",
        "untagged-image",
        "old-api",
    ],
)
def test_raycluster_schema_catches(mutate: Any, expect: str) -> None:
    doc = copy.deepcopy(load(KUBERAY / "raycluster.yaml"))
    mutate(doc)
    problems = schema_problems(doc)
    assert any(expect in p for p in problems), problems


def test_rayjob_and_rayservice_schema_catch() -> None:
    job = load(KUBERAY / "rayjob-train.yaml")
    broken = copy.deepcopy(job)
    broken["spec"].pop("entrypoint")
    assert any("entrypoint" in p for p in schema_problems(broken))
    broken = copy.deepcopy(job)
    broken["spec"].pop("rayClusterSpec")
    assert schema_problems(broken)  # neither rayClusterSpec nor clusterSelector
    broken = copy.deepcopy(job)
    broken["spec"]["submissionMode"] = "K8sMode"
    assert any("K8sMode" in p for p in schema_problems(broken))
    service = load(KUBERAY / "rayservice.yaml")
    broken = copy.deepcopy(service)
    broken["spec"]["serveConfigV2"] = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert any("string" in p for p in schema_problems(broken))  # the CRD wants a string


# ======================================================================================
# Tests: GPUs, env, secrets, image
# ======================================================================================

ALL_CLUSTER_SPECS = [
    pytest.param(spec, id=f"{p.name}") for p in MANIFESTS for spec in cluster_specs(load(p))
]


@pytest.mark.parametrize("spec", ALL_CLUSTER_SPECS)
def test_gpu_workers_and_cpu_head(spec: dict[str, Any]) -> None:
    assert gpu_problems(spec) == []


def test_gpu_checker_catches() -> None:
    spec = load(KUBERAY / "raycluster.yaml")["spec"]
    broken = copy.deepcopy(spec)
    head = broken["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["resources"]["limits"]["nvidia.com/gpu"] = 1
    assert any("head" in p for p in gpu_problems(broken))
    broken = copy.deepcopy(spec)
    for group in broken["workerGroupSpecs"]:
        for c in group["template"]["spec"]["containers"]:
            c["resources"]["limits"].pop("nvidia.com/gpu", None)
            c["resources"]["requests"].pop("nvidia.com/gpu", None)
    assert any("GPU" in p for p in gpu_problems(broken))
    broken = copy.deepcopy(spec)
    broken["headGroupSpec"]["rayStartParams"].pop("num-cpus")
    assert any("num-cpus" in p for p in gpu_problems(broken))


@pytest.mark.parametrize("spec", ALL_CLUSTER_SPECS)
def test_pod_env_mlflow_s3_secret_and_shm(spec: dict[str, Any]) -> None:
    assert pod_env_problems(spec) == []


def test_pod_env_checker_catches() -> None:
    spec = copy.deepcopy(load(KUBERAY / "raycluster.yaml")["spec"])
    worker = spec["workerGroupSpecs"][0]["template"]["spec"]
    # YAML aliases share one env list between containers: give this one its own copy
    worker["containers"][0]["env"] = [
        {"name": "AWS_ACCESS_KEY_ID", "value": "x"} if e["name"] == "AWS_ACCESS_KEY_ID" else e
        for e in worker["containers"][0]["env"]
    ]
    worker["volumes"] = [{"name": "dshm", "emptyDir": {}}]
    problems = pod_env_problems(spec)
    assert any("AWS_ACCESS_KEY_ID" in p for p in problems)
    assert any("Memory" in p for p in problems)


def _scanned_files() -> list[Path]:
    files = [p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    return files + ([SERVE_CONFIG] if SERVE_CONFIG.is_file() else [])


def test_no_literal_credentials_anywhere() -> None:
    problems = []
    for path in _scanned_files():
        problems += secret_problems(path.read_text(errors="replace"), str(path.relative_to(ROOT)))
    for path in MANIFESTS:
        problems += literal_env_problems(load(path), path.name)
    assert problems == []


def test_credential_scanner_catches() -> None:
    key_id = "AKIA" + "ABCDEFGHIJKLMNOP"  # split so this file itself stays clean
    assert secret_problems(f"env:\n  - value: {key_id}\n", "x")
    assert secret_problems("aws_secret_access_key: abc/def+ghi\n", "x")
    assert secret_problems("aws_secret_access_key = notArealKey0123\n", "x")
    assert not secret_problems("aws_secret_access_key: ${AWS_SECRET_ACCESS_KEY}\n", "x")
    doc = copy.deepcopy(load(KUBERAY / "raycluster.yaml"))
    head = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head["env"] = [*head["env"], {"name": "AGERAY_API_TOKEN", "value": "hunter2"}]
    assert literal_env_problems(doc, "raycluster.yaml")


def _dockerfile_ray_image() -> tuple[str, str]:
    """(ray version, python tag) of the Dockerfile's base image."""
    text = (CLUSTER / "Dockerfile").read_text()
    m = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)", text, re.M)
    assert m, "Dockerfile: ARG RAY_IMAGE=rayproject/ray:<version>-py<xy>... not found"
    return m.group(1), f"{m.group(2)}.{m.group(3)}"


def test_one_image_and_ray_version_everywhere() -> None:
    """Every pod runs the image of this project version, built on the Ray the CRDs name."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    image = f"ghcr.io/ageray/ageray:{project['version']}"
    ray_version, python = _dockerfile_ray_image()
    for path in MANIFESTS:
        for spec in cluster_specs(load(path)):
            assert spec["rayVersion"] == ray_version, path.name
            for group, container in containers(spec):
                assert container["image"] == image, f"{path.name} {group}"
    lower = re.search(r'"ray\[[^\]]*\]>=([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert lower and tuple(map(int, ray_version.split("."))) >= tuple(
        map(int, lower.group(1).split("."))
    ), "the image's Ray is older than pyproject's lower bound"
    need = re.match(r">=\s*(\d+)\.(\d+)", project["requires-python"])
    assert need and tuple(map(int, python.split("."))) >= (int(need[1]), int(need[2]))


def test_dockerfile_installs_like_the_readme() -> None:
    text = (CLUSTER / "Dockerfile").read_text()
    run = " ".join(re.findall(r"^RUN (.*)$", text.replace("\\\n", " "), re.M))
    assert re.search(r"pip install --no-cache-dir \.(\s|$)", run), "the image does `pip install .`"
    assert re.search(r"pip install .*--no-deps .*facenet", run, re.I), "facenet without its pins"
    assert "ARG FACENET=facenet-pytorch==2.6.0" in text
    assert " -e " not in run and "[dev]" not in run, "no editable / dev install in the image"
    assert f"WORKDIR {render.IMAGE_WORKDIR}" in text, "RayJobs use local://<WORKDIR>"
    for folder in ("jobs", "tuning", "serve", "recipes", "platform/ageray"):
        assert re.search(rf"^COPY .*\b{re.escape(folder)} ", text, re.M), folder


def test_platform_is_not_a_package() -> None:
    """platform/__init__.py would shadow the stdlib `platform` (ray, torch, mlflow use it)."""
    assert not (ROOT / "platform" / "__init__.py").exists()
    assert not (CLUSTER / "__init__.py").exists()


# ======================================================================================
# Tests: entrypoints
# ======================================================================================


def _entrypoints() -> list[Any]:
    return [pytest.param(load(p)["spec"]["entrypoint"], id=p.name) for p in RAYJOBS]


@pytest.mark.parametrize("entrypoint", _entrypoints())
def test_rayjob_entrypoint_modules_recipes_and_overrides(entrypoint: str) -> None:
    problems, pending = entrypoint_problems(entrypoint)
    assert problems == []
    if pending:
        pytest.skip("pending (being written by another session): " + "; ".join(pending))


def test_entrypoint_checker_catches() -> None:
    base = "python -m jobs.train --config recipes/glae_r18.yaml"
    assert entrypoint_problems(base)[0] == []
    assert entrypoint_problems("python -m jobs.trian --config recipes/glae_r18.yaml")[0]
    assert entrypoint_problems("python -m jobs.train --config recipes/nope.yaml")[0]
    assert any(
        "model.backbon" in p for p in entrypoint_problems(base + " --set model.backbon=x")[0]
    )
    assert entrypoint_problems(base + " --set ray.num_workers=zero")[0]
    assert entrypoint_problems("python jobs/train.py")[0]
    # a pending module skips instead of failing, an unknown one fails
    assert entrypoint_problems("python -m tuning.search_x --config recipes/glae_r18.yaml")[0]


def test_make_shards_entrypoint_parses_with_its_own_parser() -> None:
    """jobs.make_shards has its own CLI (no --config): run its argparse on the arguments."""
    path = KUBERAY / "rayjob-make-shards.yaml"
    if not path.is_file():
        pytest.skip("no make_shards RayJob")
    argv = shlex.split(load(path)["spec"]["entrypoint"])
    from jobs.make_shards import build_parser

    args = build_parser().parse_args(argv[3:])
    assert args.output.startswith("s3://"), "in-cluster shards must go to S3"


def test_commands_in_docs_name_existing_modules_and_recipes() -> None:
    """`python -m jobs.x` / `--config recipes/y.yaml` in the README and config comments."""
    texts = [README, CLUSTER / "aws.yaml", CLUSTER / "runtime_env.yaml", *MANIFESTS]
    problems, pending = [], []
    for path in texts:
        text = path.read_text()
        for module in set(re.findall(r"python -m ((?:jobs|tuning)\.\w+)", text)):
            package, name = module.split(".")
            if not (ROOT / package / f"{name}.py").is_file():
                (pending if module in PENDING_MODULES else problems).append(
                    f"{path.name}: {module}"
                )
        for recipe in set(re.findall(r"(recipes/[\w.-]+\.yaml)", text)):
            if not (ROOT / recipe).is_file():
                problems.append(f"{path.name}: {recipe}")
    assert problems == []
    if pending:
        pytest.skip("pending modules: " + ", ".join(sorted(set(pending))))


@pytest.mark.parametrize("path", RAYJOBS, ids=lambda p: p.name)
def test_rayjob_gpu_budget_and_lifecycle(path: Path) -> None:
    doc = load(path)
    assert gpu_budget_problems(doc) == []
    spec = doc["spec"]
    assert spec.get("shutdownAfterJobFinishes") is True and "ttlSecondsAfterFinished" in spec
    assert spec.get("activeDeadlineSeconds", 0) > 0 and "backoffLimit" in spec
    # in-cluster runs must keep state on shared storage, not on an ephemeral pod
    for flag in re.findall(r"--set (run\.storage_path|data\.shards)=(\S+)", spec["entrypoint"]):
        assert flag[1].startswith("s3://"), flag


def test_gpu_budget_checker_catches() -> None:
    doc = copy.deepcopy(load(KUBERAY / "rayjob-train.yaml"))
    doc["spec"]["entrypoint"] += " --set ray.num_workers=64"
    assert gpu_budget_problems(doc)


# ======================================================================================
# Tests: render.py agreement (serve config, cluster spec, runtime_env)
# ======================================================================================


def _require_serve_config() -> dict[str, Any]:
    if not SERVE_CONFIG.is_file():
        pytest.skip("pending: serve/config.yaml is not written yet (Serve session)")
    return load(SERVE_CONFIG)


def test_render_check_passes_on_the_repo() -> None:
    _require_serve_config()
    assert render.check(render.Paths(ROOT)) == []
    assert render.main(["--check"]) == 0


def test_serve_config_v2_differs_from_serve_config_only_in_the_model() -> None:
    source = _require_serve_config()
    served = yaml.safe_load(load(KUBERAY / "rayservice.yaml")["spec"]["serveConfigV2"])
    differences = render.diff_values(served, source, limit=100)
    assert differences, "the production model_uri override is missing"
    assert all(
        re.match(r"applications\[\d+\]\.(args|deployments\[\d+\]\.user_config)\.model_uri", d)
        for d in differences
    ), differences
    for app in served["applications"]:
        if app["import_path"] == render.SERVE_IMPORT_PATH:
            assert app["args"]["model_uri"] == render.PRODUCTION_MODEL_URI


def test_render_check_catches_drift() -> None:
    """Mutated manifests (parsed copies fed to the checker) are reported, each one."""
    _require_serve_config()
    paths = render.Paths(ROOT)
    parts = render.expected_parts(paths)
    real = {p: load(p) for p in {part.manifest for part in parts}}

    def with_change(target: Path, change: Any) -> list[str]:
        docs = copy.deepcopy(real)
        change(docs[target])
        return render.check_parts(parts, paths, load=lambda p: docs[p])

    def serve_change(doc: dict[str, Any]) -> None:
        cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
        cfg["applications"][0]["deployments"][0]["max_ongoing_requests"] += 1
        doc["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)

    def serve_model(doc: dict[str, Any]) -> None:
        cfg = yaml.safe_load(doc["spec"]["serveConfigV2"])
        cfg["applications"][0]["args"]["model_uri"] = "models:/ageray@candidate"
        doc["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)

    def job_image(doc: dict[str, Any]) -> None:
        head = doc["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        head["containers"][0]["image"] = "ghcr.io/ageray/ageray:0.0.9"

    def job_env(doc: dict[str, Any]) -> None:
        env = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])
        env["env_vars"].pop("PYTHONPATH")
        doc["spec"]["runtimeEnvYAML"] = yaml.safe_dump(env)

    def service_cluster(doc: dict[str, Any]) -> None:
        doc["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = 99

    assert with_change(paths.rayservice, lambda d: None) == []
    assert any("max_ongoing_requests" in p for p in with_change(paths.rayservice, serve_change))
    assert any("model_uri" in p for p in with_change(paths.rayservice, serve_model))
    assert any("image" in p for p in with_change(RAYJOBS[0], job_image))
    assert any("PYTHONPATH" in p for p in with_change(RAYJOBS[0], job_env))
    assert any("maxReplicas" in p for p in with_change(paths.rayservice, service_cluster))


def test_render_rewrites_a_stale_copy_and_keeps_comments(tmp_path: Path) -> None:
    """render.py on a copy of the repo: --check fails, render fixes it, comments survive."""
    _require_serve_config()
    shutil.copytree(
        CLUSTER, tmp_path / "platform" / "cluster", ignore=shutil.ignore_patterns("__pycache__")
    )
    (tmp_path / "serve").mkdir()
    shutil.copy(SERVE_CONFIG, tmp_path / "serve" / "config.yaml")
    paths = render.Paths(tmp_path)
    raycluster = paths.raycluster.read_text()
    paths.raycluster.write_text(raycluster.replace("ageray:0.1.0", "ageray:0.2.0"))
    serve_cfg = load(paths.serve_config)
    serve_cfg["applications"][0]["deployments"][0]["max_queued_requests"] = 7
    paths.serve_config.write_text(yaml.safe_dump(serve_cfg))

    assert render.main(["--check", "--root", str(tmp_path)]) == 1
    changed = render.render(paths)
    assert set(changed) == {*paths.rayjobs(), paths.rayservice}
    assert render.check(paths) == []
    assert render.render(paths) == []  # idempotent
    job_text = (paths.kuberay / "rayjob-train.yaml").read_text()
    assert "ageray:0.2.0" in job_text and "ageray:0.1.0" not in job_text
    assert job_text.startswith("# Two-stage training")  # hand-written comments kept
    assert "--set ray.use_gpu=true" in job_text
    served = yaml.safe_load(load(paths.rayservice)["spec"]["serveConfigV2"])
    assert served["applications"][0]["deployments"][0]["max_queued_requests"] == 7


def test_render_reports_a_missing_source(tmp_path: Path) -> None:
    shutil.copytree(
        CLUSTER, tmp_path / "platform" / "cluster", ignore=shutil.ignore_patterns("__pycache__")
    )
    problems = render.check(render.Paths(tmp_path))  # no serve/config.yaml in the copy
    assert problems and "config.yaml" in problems[0]
    assert render.main(["--check", "--root", str(tmp_path)]) == 1


def test_serve_override_only_touches_the_model() -> None:
    cfg = {
        "applications": [
            {
                "name": "ageray",
                "import_path": "serve.app:app",
                "args": {"model_uri": "models:/ageray@candidate", "device": "cpu"},
                "runtime_env": {"working_dir": ".", "excludes": ["/runs"]},
                "deployments": [{"name": "AgeEstimator", "user_config": {"model_uri": "x"}}],
            },
            {"name": "other", "import_path": "other.app:app", "args": {"model_uri": "y"}},
        ]
    }
    out = render.serve_config_v2(cfg, "models:/ageray@production")
    app, other = out["applications"]
    assert app["args"] == {"model_uri": "models:/ageray@production", "device": "cpu"}
    assert app["deployments"][0]["user_config"]["model_uri"] == "models:/ageray@production"
    assert app["runtime_env"] == {"working_dir": render.IMAGE_WORKING_DIR_URI}
    assert other == cfg["applications"][1]
    assert cfg["applications"][0]["args"]["model_uri"] == "models:/ageray@candidate"  # no aliasing


def test_serve_configs_are_valid_serve_deploy_configs() -> None:
    """Both serve/config.yaml and serveConfigV2 pass Ray Serve's own schema, their
    user_config passes ageray.serving's, and the import path names a real builder."""
    from ray.serve.schema import ServeDeploySchema

    from ageray.serving import ServeSettings

    source = _require_serve_config()
    served = yaml.safe_load(load(KUBERAY / "rayservice.yaml")["spec"]["serveConfigV2"])
    for cfg in (source, served):
        ServeDeploySchema.model_validate(cfg)
        for app in cfg["applications"]:
            for dep in app.get("deployments") or []:
                ServeSettings.from_mapping(dep.get("user_config"))
    with pytest.raises(ValueError):
        broken = copy.deepcopy(served)
        broken["applications"][0]["deployments"][0]["max_ongoing_requests"] = "many"
        ServeDeploySchema.model_validate(broken)

    for app in served["applications"]:
        module, _, attr = app["import_path"].partition(":")
        path = ROOT / Path(*module.split(".")).with_suffix(".py")
        assert path.is_file(), f"{app['import_path']}: {path} does not exist"
        tree = ast.parse(path.read_text())
        names = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
        names |= {
            t.id
            for n in tree.body
            if isinstance(n, ast.Assign)
            for t in n.targets
            if isinstance(t, ast.Name)
        }
        assert attr in names, f"{path} defines no `{attr}`"
    # KubeRay's serve Service targets port 8000 on pods with a container port named serve
    port = (served.get("http_options") or {}).get("port", 8000)
    spec = load(KUBERAY / "rayservice.yaml")["spec"]["rayClusterConfig"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": port, "name": "serve"} in head["ports"]


# ======================================================================================
# Tests: runtime_env
# ======================================================================================


def _runtime_env() -> dict[str, Any]:
    return load(CLUSTER / "runtime_env.yaml")


def runtime_env_problems(env: dict[str, Any]) -> list[str]:
    """Keys Ray knows, values Ray accepts, and nothing secret."""
    from ray.runtime_env import RuntimeEnv

    out = []
    public = {k for k in RuntimeEnv.known_fields if not k.startswith("_")}
    unknown = set(env) - public
    if unknown:  # RuntimeEnv would only warn: an unknown key is treated as a plugin
        out.append(f"unknown runtime_env keys {sorted(unknown)} (known: {sorted(public)})")
    try:
        RuntimeEnv(**env)
    except (TypeError, ValueError) as exc:
        out.append(f"RuntimeEnv rejects it: {exc}")
    for name in env.get("env_vars") or {}:
        if CREDENTIAL_ENV.search(name) or name.startswith("AWS_"):
            out.append(f"env_vars.{name}: credentials do not belong in a runtime_env")
    return out


def test_runtime_env_is_valid() -> None:
    env = _runtime_env()
    assert runtime_env_problems(env) == []
    assert "working_dir" not in env, "`ray job submit --working-dir .` sets it"
    assert env["env_vars"]["PYTHONPATH"] == "platform"
    for path in RAYJOBS:  # the in-cluster variants too
        assert runtime_env_problems(yaml.safe_load(load(path)["spec"]["runtimeEnvYAML"])) == []


def test_runtime_env_checker_catches() -> None:
    env = _runtime_env()
    assert runtime_env_problems({**env, "workingdir": "."})
    assert runtime_env_problems({**env, "env_vars": {"N": 1}})
    assert runtime_env_problems({**env, "env_vars": {"AWS_SECRET_ACCESS_KEY": "x"}})
    assert runtime_env_problems({"working_dir": "local://relative/path"})


def uploaded(relpath: str, excludes: list[str], root: Path = ROOT) -> bool:
    """Would `ray job submit --working-dir <root>` upload this path? Ray's own rule: a path
    is skipped when it or any parent matches Ray's defaults, the runtime_env excludes,
    .gitignore or .rayignore (ray._private.runtime_env.packaging, Ray 2.60)."""
    from ray._private import ray_constants
    from ray._private.runtime_env import packaging

    matchers = [
        packaging._get_excludes(
            root, ray_constants.get_runtime_env_default_excludes() + list(excludes)
        )
    ]
    matchers += packaging.get_excludes_from_ignore_files(root, include_gitignore=True)
    path = root / relpath
    chain = [path, *path.parents]
    chain = chain[: chain.index(root)]
    return not any(match(p) for p in chain for match in matchers)


def test_runtime_env_uploads_the_code_and_not_the_bulk() -> None:
    excludes = _runtime_env()["excludes"]
    code = [
        p.relative_to(ROOT).as_posix()
        for folder in ("platform/ageray", "jobs", "tuning", "serve", "recipes")
        for p in (ROOT / folder).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p)
    ]
    assert "platform/ageray/data/loader.py" in code
    assert [p for p in code if not uploaded(p, excludes)] == []
    for bulk in (
        ".venv/bin/python",
        "runs/x/checkpoint.pt",
        "data/utkface.tar",
        ".git/HEAD",
        "somewhere/shards.tar",
        "platform/ageray.egg-info/PKG-INFO",
    ):
        assert not uploaded(bulk, excludes), bulk


def test_upload_check_catches_an_unanchored_exclude() -> None:
    """`data` (no leading slash) matches at any depth and drops the library's data package."""
    excludes = [*_runtime_env()["excludes"], "data"]
    assert not uploaded("platform/ageray/data/loader.py", excludes)


# ======================================================================================
# Tests: AWS cluster launcher config
# ======================================================================================


def _aws() -> dict[str, Any]:
    return load(CLUSTER / "aws.yaml")


def aws_problems(cfg: dict[str, Any]) -> list[str]:
    """Ray's schema (ray/autoscaler/ray-schema.json) and Ray's own config validation."""
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    out = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in jsonschema.Draft7Validator(schema).iter_errors(cfg)
    ]
    if out:
        return out
    try:
        validate_config(prepare_config(copy.deepcopy(cfg)))
    except (ValueError, RuntimeError, jsonschema.ValidationError) as exc:
        out.append(f"ray validate_config: {exc}")
    return out


def test_ray_autoscaler_schema_exists() -> None:
    import ray

    assert (Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").is_file()


def test_aws_config_validates_with_rays_schema() -> None:
    assert aws_problems(_aws()) == []


def test_aws_config_shape() -> None:
    cfg = _aws()
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    gpu = [t for t in types.values() if t["resources"].get("GPU")]
    assert gpu and all(t["max_workers"] >= 1 for t in gpu)
    for t in types.values():
        assert {"InstanceType", "ImageId", "IamInstanceProfile"} <= set(t["node_config"])
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    assert cfg["initialization_commands"] == []
    setup = "\n".join(cfg["setup_commands"])
    assert re.search(r"pip install\b.*~/ageray(\s|$)", setup), "installs the synced project"
    assert re.search(r"pip install\b.*--no-deps facenet-pytorch==2\.6\.0", setup)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(cfg[key])
        m = re.search(r"--object-store-memory[= ](\d+)", start)
        assert m and int(m.group(1)) >= 1 << 30, f"{key}: size the object store explicitly"
    assert "/home/ubuntu/ageray" in cfg["file_mounts"]


def test_aws_checker_catches() -> None:
    cfg = _aws()
    assert aws_problems({**cfg, "setup_comands": []})  # typo: schema has no such key
    broken = copy.deepcopy(cfg)
    broken["head_node_type"] = "nope"
    assert aws_problems(broken)
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["gpu"]["resources"]["GPU"] = 0.5  # must be an integer
    assert aws_problems(broken)
    broken = copy.deepcopy(cfg)
    broken["available_node_types"]["gpu"].pop("node_config")
    assert aws_problems(broken)


def test_render_leaves_cluster_selector_jobs_alone(tmp_path: Path) -> None:
    """A RayJob aimed at the long-lived cluster (clusterSelector) gets only its runtime_env."""
    _require_serve_config()
    shutil.copytree(
        CLUSTER, tmp_path / "platform" / "cluster", ignore=shutil.ignore_patterns("__pycache__")
    )
    (tmp_path / "serve").mkdir()
    shutil.copy(SERVE_CONFIG, tmp_path / "serve" / "config.yaml")
    paths = render.Paths(tmp_path)
    job = paths.kuberay / "rayjob-on-ageray.yaml"
    job.write_text(
        "apiVersion: ray.io/v1\nkind: RayJob\nmetadata:\n  name: on-ageray\nspec:\n"
        "  entrypoint: python -m jobs.train --config recipes/glae_r18.yaml\n"
        "  clusterSelector:\n    ray.io/cluster: ageray\n"
        "  runtimeEnvYAML: |\n    {}\n"
    )
    assert render.check(paths)  # runtimeEnvYAML is stale
    assert render.render(paths) == [job]
    assert render.check(paths) == []
    doc = load(job)
    assert "rayClusterSpec" not in doc["spec"] and schema_problems(doc) == []
    assert gpu_budget_problems(doc) == []
