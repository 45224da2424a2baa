"""Kubernetes manifests and the code-built cluster spec.

* every DaskCluster / DaskJob / DaskAutoscaler validates against the CRD schemas shipped with the
  installed dask-kubernetes (made strict: unknown fields fail, as `kubectl apply
  --validate=strict` would report them);
* every Pod spec, Service, Job, ConfigMap and PVC validates against the Kubernetes JSON schemas
  shipped by kubernetes-validate (strict variants), offline;
* the code-built spec (:func:`pipeline.k8s.cluster_spec`) equals the YAML; deploy/k8s equals the
  package copy; pods run as non-root; no secret values inline.
"""

from __future__ import annotations

import copy
import functools
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline import k8s
from pipeline.errors import UserError

jsonschema = pytest.importorskip("jsonschema")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "k8s"
#: Kubernetes versions to validate against: an older supported one and the newest shipped.
K8S_VERSIONS = ("1.29", str(kubernetes_validate.latest_version()))
CRD_FILES = {
    "DaskCluster": "daskcluster.yaml",
    "DaskJob": "daskjob.yaml",
    "DaskAutoscaler": "daskautoscaler.yaml",
    "DaskWorkerGroup": "daskworkergroup.yaml",
}
SECRET_NAME = re.compile(r"(KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL|SAS|CONNECTION_STRING)", re.I)


def _all_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(f, d) for f in k8s.MANIFEST_FILES for d in k8s.load_manifests(f)]


# ------------------------------------------------------------------------------ CRD schemas
def _crd_dir() -> Path:
    dk = pytest.importorskip("dask_kubernetes")
    path = (
        Path(dk.__file__).parent
        / "operator" / "deployment" / "helm" / "dask-kubernetes-operator" / "crds"
    )
    if not path.is_dir():
        pytest.skip(f"dask-kubernetes {dk.__version__} ships no resolved CRDs at {path}")
    return path


def _strict(schema: Any) -> Any:
    """Close every object schema that lists its properties (what the API server's pruning and
    strict field validation do), unless it preserves unknown fields."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def _crd_validator(kind: str) -> Any:
    crd = yaml.safe_load((_crd_dir() / CRD_FILES[kind]).read_text())
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _strict(version["schema"]["openAPIV3Schema"])
    # metadata is validated by the API server's ObjectMeta, not by the CRD schema
    schema.setdefault("properties", {})["metadata"] = {"type": "object"}
    schema["properties"]["apiVersion"] = {"const": "kubernetes.dask.org/v1"}
    schema["properties"]["kind"] = {"const": kind}
    return jsonschema.Draft7Validator(schema)


def _crd_errors(doc: dict[str, Any]) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in _crd_validator(doc["kind"]).iter_errors(doc)
    ]


def _dask_docs() -> list[tuple[str, dict[str, Any]]]:
    return [(f, d) for f, d in _all_docs() if d["apiVersion"].startswith("kubernetes.dask.org/")]


@pytest.mark.parametrize("filename,doc", _dask_docs(), ids=lambda x: x if isinstance(x, str) else x["kind"])
def test_dask_resources_match_crd_schema(filename: str, doc: dict[str, Any]) -> None:
    assert _crd_errors(doc) == [], filename


def test_crd_validation_is_strict() -> None:
    """The validator really rejects a typo, a wrong type and a missing required field."""
    cluster = k8s.cluster_spec()
    bad = copy.deepcopy(cluster)
    bad["spec"]["worker"]["replica"] = 3  # typo
    assert any("replica" in e for e in _crd_errors(bad))
    bad = copy.deepcopy(cluster)
    bad["spec"]["worker"]["replicas"] = "three"
    assert _crd_errors(bad)
    bad = copy.deepcopy(cluster)
    del bad["spec"]["scheduler"]["spec"]["containers"]
    assert _crd_errors(bad)
    bad = copy.deepcopy(cluster)
    bad["spec"]["worker"]["spec"]["containers"][0]["resource"] = {}  # typo deep in a PodSpec
    assert _crd_errors(bad)


# ----------------------------------------------------------------------- Kubernetes schemas
def _k8s_objects() -> list[tuple[str, dict[str, Any]]]:
    """Every core Kubernetes object in the manifests, pod specs inside Dask resources wrapped as
    Pods and scheduler services as Services."""
    out: list[tuple[str, dict[str, Any]]] = []

    def pod(where: str, spec: dict[str, Any]) -> None:
        out.append((where, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                            "spec": spec}))

    def cluster(where: str, spec: dict[str, Any]) -> None:
        pod(f"{where} worker", spec["worker"]["spec"])
        pod(f"{where} scheduler", spec["scheduler"]["spec"])
        out.append((f"{where} service", {"apiVersion": "v1", "kind": "Service",
                                         "metadata": {"name": "s"},
                                         "spec": spec["scheduler"]["service"]}))

    for filename, doc in _all_docs():
        where = f"{filename} {doc['kind']}"
        if doc["kind"] == "DaskCluster":
            cluster(where, doc["spec"])
        elif doc["kind"] == "DaskJob":
            pod(f"{where} job", doc["spec"]["job"]["spec"])
            cluster(where, doc["spec"]["cluster"]["spec"])
        elif doc["kind"] == "DaskAutoscaler":
            continue
        else:
            out.append((where, doc))
    return out


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_kubernetes_objects_match_schemas(version: str) -> None:
    objects = _k8s_objects()
    kinds = {o["kind"] for _, o in objects}
    assert {"Pod", "Service", "Job", "ConfigMap", "PersistentVolumeClaim"} <= kinds
    for where, obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where} is not a valid {obj['kind']} for Kubernetes {version}: {exc}")


def test_kubernetes_validation_is_strict() -> None:
    job = next(d for _, d in _all_docs() if d["kind"] == "Job")
    bad = copy.deepcopy(job)
    bad["spec"]["template"]["spec"]["containers"][0]["volumeMount"] = []  # typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)
    bad = copy.deepcopy(job)
    bad["spec"]["backoffLimit"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)


# --------------------------------------------------------------- security and consistency
def _pod_specs() -> list[tuple[str, dict[str, Any]]]:
    return [(w, o["spec"]) for w, o in _k8s_objects() if o["kind"] == "Pod"] + [
        (f"{f} Job", d["spec"]["template"]["spec"]) for f, d in _all_docs() if d["kind"] == "Job"
    ]


def test_every_pod_runs_as_non_root_without_privileges() -> None:
    pods = _pod_specs()
    assert len(pods) == 6  # cluster worker+scheduler, job runner + its cluster's two, training
    for where, spec in pods:
        ctx = spec["securityContext"]
        assert ctx["runAsNonRoot"] is True, where
        assert ctx["runAsUser"] > 0, where
        for c in spec["containers"]:
            cctx = c["securityContext"]
            assert cctx["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert cctx["capabilities"]["drop"] == ["ALL"], (where, c["name"])
            assert cctx.get("privileged") is not True
            assert ":" in c["image"] and not c["image"].endswith(":latest"), c["image"]


def test_no_secret_values_inline() -> None:
    kinds = {d["kind"] for _, d in _all_docs()}
    assert "Secret" not in kinds  # secrets are created with kubectl, never committed
    refs = set()
    for where, spec in _pod_specs():
        for c in spec["containers"]:
            for item in c.get("env", []):
                assert not (SECRET_NAME.search(item["name"]) and "value" in item), (where, item)
            for src in c.get("envFrom", []):
                if "secretRef" in src:
                    refs.add(src["secretRef"]["name"])
    assert refs == {"ssl4eo-object-storage"}
    for path in DEPLOY.glob("*.yaml"):
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text)
        assert "AccountKey=" not in text and "sig=" not in text


def test_gdal_settings_on_workers() -> None:
    worker = k8s.cluster_spec()["spec"]["worker"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["GDAL_DISABLE_READDIR_ON_OPEN"] == "EMPTY_DIR"
    assert int(env["GDAL_HTTP_MAX_RETRY"]) >= 3
    assert float(env["GDAL_HTTP_RETRY_DELAY"]) > 0
    assert env["GDAL_HTTP_MERGE_CONSECUTIVE_RANGES"] == "YES"
    assert env["VSI_CACHE"] == "TRUE"
    assert worker["resources"]["requests"]["memory"] == worker["resources"]["limits"]["memory"]


def test_workers_have_the_build_worker_settings() -> None:
    """The Kubernetes workers get the LocalCluster's worker settings, as environment variables."""
    import dask

    from pipeline.runner import WORKER_CONFIG, worker_environment

    worker = k8s.cluster_spec()["spec"]["worker"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in worker["env"]}
    wanted = worker_environment()
    assert len(wanted) == len(WORKER_CONFIG)
    for name, value in wanted.items():
        assert name in env, f"deploy/k8s/daskcluster.yaml: the workers lack {name}={value}"
        assert str(env[name]) == value, (name, env[name], value)
    # what Dask reads from the DASK_* variables is WORKER_CONFIG's value
    parsed = dask.config.collect_env({k: v for k, v in env.items() if k.startswith("DASK_")})
    for key, value in WORKER_CONFIG.items():
        if not key.startswith("distributed.nanny.pre-spawn-environ."):
            assert dask.config.get(key, config=parsed) == value, key


def test_deploy_copies_equal_package_specs() -> None:
    """deploy/k8s is what users apply; pipeline/deploy_specs is what the code loads."""
    shipped = sorted(p.name for p in k8s.SPEC_DIR.glob("*.yaml"))
    assert shipped == sorted(k8s.MANIFEST_FILES)
    assert sorted(p.name for p in DEPLOY.glob("*.yaml")) == shipped
    for name in shipped:
        assert (DEPLOY / name).read_bytes() == (k8s.SPEC_DIR / name).read_bytes(), (
            f"deploy/k8s/{name} differs from pipeline/deploy_specs/{name}: "
            "cp pipeline/deploy_specs/*.yaml deploy/k8s/"
        )


def test_code_built_spec_equals_yaml() -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "daskcluster.yaml").read_text()))
    assert k8s.cluster_spec() == docs[0]
    assert k8s.autoscaler_spec() == docs[1]
    job, job_autoscaler = yaml.safe_load_all((DEPLOY / "daskjob.yaml").read_text())
    name = job["metadata"]["name"]
    # the DaskJob's cluster is the same spec, renamed after the job (the operator names it so)
    assert job["spec"]["cluster"]["spec"] == k8s.cluster_spec(name)["spec"]
    assert job_autoscaler["spec"] == k8s.autoscaler_spec(name)["spec"]
    # one image for the Dask side
    images = {c["image"] for c in job["spec"]["job"]["spec"]["containers"]}
    assert images == {docs[0]["spec"]["worker"]["spec"]["containers"][0]["image"]}


def test_cluster_spec_overrides() -> None:
    spec = k8s.cluster_spec(
        "my-build", image="reg.io/me/ssl4eo:1.2", n_workers=7, nthreads=2,
        resources={"requests": {"cpu": "2", "memory": "8Gi"}}, env={"GDAL_HTTP_MAX_RETRY": "9"},
    )
    assert spec["metadata"]["name"] == "my-build"
    assert spec["spec"]["scheduler"]["service"]["selector"]["dask.org/cluster-name"] == "my-build"
    assert spec["spec"]["worker"]["replicas"] == 7
    worker = spec["spec"]["worker"]["spec"]["containers"][0]
    sched = spec["spec"]["scheduler"]["spec"]["containers"][0]
    assert worker["image"] == sched["image"] == "reg.io/me/ssl4eo:1.2"
    assert worker["args"][worker["args"].index("--nthreads") + 1] == "2"
    assert worker["resources"] == {"requests": {"cpu": "2", "memory": "8Gi"}}
    retry = [e for e in worker["env"] if e["name"] == "GDAL_HTTP_MAX_RETRY"]
    assert retry == [{"name": "GDAL_HTTP_MAX_RETRY", "value": "9"}]
    assert _crd_errors(spec) == []
    assert k8s.cluster_spec() != spec  # the manifest itself is untouched
    with pytest.raises(UserError, match="limits"):
        k8s.cluster_spec(resources={"limit": {}})
    with pytest.raises(UserError, match="minimum"):
        k8s.autoscaler_spec(minimum=5, maximum=2)


def test_rendered_manifests_validate(tmp_path: Path) -> None:
    from pipeline.cli import main

    rc = main([
        "k8s", "manifests", "--out", str(tmp_path), "--image", "reg.io/me/ssl4eo:2.0",
        "--train-image", "reg.io/me/ssl4eo-train:2.0", "--store", "az://cont/cube.zarr",
        "--namespace", "eo", "--workers", "3", "--max-workers", "50", "--gpus", "8",
    ]) if _cli_has("k8s") else _render_direct(tmp_path)
    assert rc == 0
    docs = {p.name: list(yaml.safe_load_all(p.read_text())) for p in tmp_path.glob("*.yaml")}
    assert sorted(docs) == sorted(k8s.MANIFEST_FILES)
    job = docs["daskjob.yaml"][0]
    args = job["spec"]["job"]["spec"]["containers"][0]["args"]
    assert args[args.index("--store") + 1] == "az://cont/cube.zarr"
    assert job["spec"]["cluster"]["spec"]["worker"]["replicas"] == 3
    assert docs["daskcluster.yaml"][1]["spec"]["maximum"] == 50
    train = docs["train-job.yaml"][1]["spec"]["template"]["spec"]["containers"][0]
    assert "--nproc-per-node=8" in train["args"]
    assert train["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert train["image"] == "reg.io/me/ssl4eo-train:2.0"
    for filename, ds in docs.items():
        for d in ds:
            assert d["metadata"]["namespace"] == "eo", filename
            if d["apiVersion"].startswith("kubernetes.dask.org/"):
                assert _crd_errors(d) == [], filename
            elif d["kind"] in ("Job", "ConfigMap", "PersistentVolumeClaim"):
                kubernetes_validate.validate(d, K8S_VERSIONS[0], strict=True)


def _cli_has(command: str) -> bool:
    from pipeline.cli import COMMAND_MODULES

    return "pipeline.k8s" in COMMAND_MODULES


def _render_direct(out: Path) -> int:
    k8s.write_manifests(out, k8s.render_manifests(
        image="reg.io/me/ssl4eo:2.0", train_image="reg.io/me/ssl4eo-train:2.0",
        store="az://cont/cube.zarr", namespace="eo", n_workers=3, maximum=50, gpus=8,
    ))
    return 0


# ------------------------------------------------------------------- commands the pods run
def _parser_or_skip(command: str) -> Any:
    from pipeline.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    if command not in sub.choices:
        pytest.skip(f"`ssl4eo {command}` is not registered in pipeline.cli yet")
    return parser


def test_build_job_command_parses() -> None:
    job = next(d for _, d in _all_docs() if d["kind"] == "DaskJob")
    container = job["spec"]["job"]["spec"]["containers"][0]
    assert container["command"] == ["ssl4eo"]
    args = [a.replace("$(DASK_SCHEDULER_ADDRESS)", "tcp://sched:8786") for a in container["args"]]
    parser = _parser_or_skip("run")
    parsed = parser.parse_args(args)
    assert callable(parsed.func)


def _job_args(manifests: dict[str, list[dict[str, Any]]] | None = None) -> Any:
    docs = manifests["daskjob.yaml"] if manifests else [d for _, d in _all_docs()]
    job = next(d for d in docs if d["kind"] == "DaskJob")
    args = job["spec"]["job"]["spec"]["containers"][0]["args"]
    return _parser_or_skip("run").parse_args(
        [a.replace("$(DASK_SCHEDULER_ADDRESS)", "tcp://sched:8786") for a in args])


def test_build_job_hands_workers_only_object_storage_urls() -> None:
    """The job pod and the worker pods share no disk: what the job writes for the workers (the
    tables under --out) and the store must be object storage, shipped and rendered."""
    from pipeline import storage
    from pipeline.errors import UserError

    for parsed in (_job_args(), _job_args(k8s.render_manifests(store="gs://bkt/eo/cube.zarr"))):
        assert parsed.scheduler == "tcp://sched:8786"
        for url in (parsed.store, parsed.out, storage.join(parsed.out, "locations.parquet"),
                    storage.join(parsed.out, "scenes.parquet")):
            assert storage.is_remote(url) and storage.scheme(url) not in ("http", "https"), url
    rendered = _job_args(k8s.render_manifests(store="gs://bkt/eo/cube.zarr"))
    assert (rendered.store, rendered.out) == ("gs://bkt/eo/cube.zarr", "gs://bkt/eo/run")
    custom = _job_args(k8s.render_manifests(store="s3://a/cube.zarr", run_url="s3://b/tables"))
    assert custom.out == "s3://b/tables"
    for bad in ({"store": "/data/cube.zarr"}, {"store": "s3://a/c.zarr", "run_url": "/tmp/x"},
                {"store": "https://host/cube.zarr"}):
        with pytest.raises(UserError, match="object-storage URL|only be read"):
            k8s.render_manifests(**bad)


def test_training_job_command_parses() -> None:
    job = next(d for _, d in _all_docs() if d["kind"] == "Job")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["torchrun"]
    args = container["args"]
    i = args.index("--no-python")
    assert args[i + 1] == "ssl4eo"
    nproc = next(a for a in args if a.startswith("--nproc-per-node"))
    assert nproc.split("=")[1] == container["resources"]["limits"]["nvidia.com/gpu"]
    parser = _parser_or_skip("pretrain")
    parsed = parser.parse_args(args[i + 2:])
    assert callable(parsed.func)


# ------------------------------------------------------------------------------ make_cluster
def test_make_cluster_without_kube_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("dask_kubernetes")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing-config"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert k8s.kube_config_source() is None
    with pytest.raises(k8s.KubernetesError, match="KUBECONFIG"):
        k8s.make_cluster(n_workers=1)


def test_make_cluster_without_dask_kubernetes(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "dask_kubernetes.operator", None)
    with pytest.raises(UserError, match="pip install"):
        k8s.make_cluster(n_workers=1)


@pytest.mark.timeout(120)
def test_make_cluster_unreachable_api_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A kube config whose API server refuses connections gives one actionable error."""
    pytest.importorskip("dask_kubernetes")
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": "t",
        "clusters": [{"name": "t", "cluster": {"server": f"https://127.0.0.1:{port}",
                                               "insecure-skip-tls-verify": True}}],
        "users": [{"name": "t", "user": {"token": "t"}}],
        "contexts": [{"name": "t", "context": {"cluster": "t", "user": "t",
                                               "namespace": "default"}}],
    }
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("KUBECONFIG", str(path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert k8s.kube_config_source() == str(path)
    with pytest.raises(k8s.KubernetesError, match="kubectl get nodes"):
        k8s.make_cluster(n_workers=1, resource_timeout=5, quiet=True)
    assert os.environ["KUBECONFIG"] == str(path)
