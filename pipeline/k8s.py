"""Kubernetes: the Dask cluster specification, one source of truth for code and manifests.

The manifests live in ``pipeline/deploy_specs/`` (package data, so they are there after
``pip install``); ``deploy/k8s/`` holds identical copies for ``kubectl apply`` (a test checks).
:func:`cluster_spec` loads the DaskCluster from that YAML and applies overrides;
:func:`make_cluster` starts a ``dask_kubernetes.operator.KubeCluster`` from it, which is what
``ssl4eo build --cluster kubernetes`` does. ``ssl4eo k8s manifests`` renders the manifests with
your image, store URL and worker counts for ``kubectl apply``.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from .errors import UserError

if TYPE_CHECKING:
    import argparse

log = logging.getLogger(__name__)

#: Folder of the canonical manifests inside the package.
SPEC_DIR = Path(__file__).with_name("deploy_specs")
#: The manifest files, in the order to apply them.
MANIFEST_FILES = ("configmap.yaml", "daskcluster.yaml", "daskjob.yaml", "train-job.yaml")
#: Name of the DaskCluster in daskcluster.yaml (and of its autoscaler).
DEFAULT_CLUSTER_NAME = "ssl4eo"
#: Environment variable naming the container image for :func:`make_cluster`.
IMAGE_ENV = "SSL4EO_IMAGE"
#: Where a pod finds its service-account token when it runs inside Kubernetes.
IN_CLUSTER_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


class KubernetesError(UserError):
    """Kubernetes is not reachable or not set up for the Dask operator."""


def load_manifests(filename: str) -> list[dict[str, Any]]:
    """The documents of one manifest file in :data:`SPEC_DIR` (a fresh copy each call)."""
    if filename not in MANIFEST_FILES:
        raise ValueError(f"unknown manifest {filename!r}: choose one of {MANIFEST_FILES}")
    with open(SPEC_DIR / filename, encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def _find(docs: Sequence[dict[str, Any]], kind: str) -> dict[str, Any]:
    for doc in docs:
        if doc.get("kind") == kind:
            return doc
    raise LookupError(f"no {kind} in the manifests")


def _containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return list(pod_spec.get("containers", [])) + list(pod_spec.get("initContainers", []))


def _merge_env(container: dict[str, Any], env: Mapping[str, str]) -> None:
    items = [e for e in container.get("env", []) if e["name"] not in env]
    items += [{"name": k, "value": str(v)} for k, v in env.items()]
    container["env"] = items


def cluster_spec(
    name: str | None = None,
    *,
    image: str | None = None,
    n_workers: int | None = None,
    resources: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    nthreads: int | None = None,
) -> dict[str, Any]:
    """The DaskCluster resource of ``daskcluster.yaml``, with overrides.

    With no arguments it equals the manifest exactly. ``name`` renames the cluster (and the
    scheduler service's selector, which must follow it); ``image`` replaces every container
    image; ``n_workers`` the worker replicas; ``resources`` the worker container's resources
    (``{"requests": {...}, "limits": {...}}``); ``env`` adds or replaces environment variables
    on the scheduler and workers; ``nthreads`` the threads per worker.
    """
    spec = copy.deepcopy(_find(load_manifests("daskcluster.yaml"), "DaskCluster"))
    if name is not None:
        spec["metadata"]["name"] = name
        spec["spec"]["scheduler"]["service"]["selector"]["dask.org/cluster-name"] = name
    worker_pod = spec["spec"]["worker"]["spec"]
    scheduler_pod = spec["spec"]["scheduler"]["spec"]
    if n_workers is not None:
        if n_workers < 0:
            raise UserError(f"n_workers={n_workers}: give a number of workers >= 0")
        spec["spec"]["worker"]["replicas"] = int(n_workers)
    worker = next(c for c in worker_pod["containers"] if c["name"] == "worker")
    if resources is not None:
        unknown = set(resources) - {"requests", "limits"}
        if unknown:
            raise UserError(
                f"resources has unknown keys {sorted(unknown)}: give 'requests' and/or 'limits'"
            )
        worker["resources"] = copy.deepcopy(dict(resources))
    if nthreads is not None:
        args = worker["args"]
        args[args.index("--nthreads") + 1] = str(int(nthreads))
    for pod in (worker_pod, scheduler_pod):
        for container in _containers(pod):
            if image is not None:
                container["image"] = image
            if env:
                _merge_env(container, env)
    return spec


def autoscaler_spec(
    cluster: str | None = None, minimum: int | None = None, maximum: int | None = None
) -> dict[str, Any]:
    """The DaskAutoscaler of ``daskcluster.yaml`` for ``cluster``, with optional bounds."""
    spec = copy.deepcopy(_find(load_manifests("daskcluster.yaml"), "DaskAutoscaler"))
    if cluster is not None:
        spec["metadata"]["name"] = cluster
        spec["spec"]["cluster"] = cluster
    if minimum is not None:
        spec["spec"]["minimum"] = int(minimum)
    if maximum is not None:
        spec["spec"]["maximum"] = int(maximum)
    if spec["spec"]["minimum"] > spec["spec"]["maximum"]:
        raise UserError(
            f"adaptive scaling minimum {spec['spec']['minimum']} is above maximum "
            f"{spec['spec']['maximum']}: give minimum <= maximum"
        )
    return spec


def kube_config_source() -> str | None:
    """Where Kubernetes credentials would come from (a kubeconfig path or ``in-cluster``), or
    None when there are none: no service-account token, no ``$KUBECONFIG``, no ``~/.kube/config``."""
    if os.environ.get("KUBERNETES_SERVICE_HOST") and IN_CLUSTER_TOKEN.is_file():
        return "in-cluster"
    env = os.environ.get("KUBECONFIG")
    candidates = env.split(os.pathsep) if env else [str(Path.home() / ".kube" / "config")]
    for candidate in candidates:
        if candidate and Path(candidate).expanduser().is_file():
            return str(Path(candidate).expanduser())
    return None


def make_cluster(
    n_workers: int | None = None,
    image: str | None = None,
    *,
    name: str | None = None,
    namespace: str | None = None,
    minimum: int | None = None,
    maximum: int | None = None,
    adaptive: bool = True,
    resources: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    **kwargs: Any,
) -> Any:
    """Start a Dask cluster on Kubernetes through the dask-kubernetes operator.

    The cluster is :func:`cluster_spec` (the DaskCluster of ``deploy/k8s``) with these
    overrides; ``image`` defaults to ``$SSL4EO_IMAGE`` or the manifest's. With ``adaptive``
    (the default) the scheduler scales workers between the autoscaler manifest's bounds
    (``minimum`` / ``maximum`` override them); otherwise ``n_workers`` stay fixed. Extra
    keyword arguments go to ``KubeCluster``. Returns the ``KubeCluster`` (a context manager
    that deletes the cluster on close).

    Raises :class:`KubernetesError` when dask-kubernetes is not installed, no Kubernetes
    credentials are configured, or the API server / operator cannot be reached.
    """
    try:
        from dask_kubernetes.operator import KubeCluster
    except ImportError as exc:
        raise KubernetesError(
            "--cluster kubernetes needs the dask-kubernetes package, which is not installed: "
            "`pip install 'ssl4eo-stac[k8s]'` (or `pip install dask-kubernetes`)"
        ) from exc
    source = kube_config_source()
    if source is None:
        raise KubernetesError(
            "--cluster kubernetes found no Kubernetes credentials: no $KUBECONFIG, no "
            "~/.kube/config and not running in a pod. Point KUBECONFIG at your cluster's "
            "config (e.g. `export KUBECONFIG=~/.kube/config` after `gcloud/az/aws ... "
            "get-credentials`), or use --cluster local / --scheduler tcp://host:8786"
        )
    image = image or os.environ.get(IMAGE_ENV) or None
    spec = cluster_spec(name, image=image, n_workers=n_workers, resources=resources, env=env)
    cluster_name = spec["metadata"]["name"]
    log.info("starting DaskCluster %s (credentials from %s)", cluster_name, source)
    try:
        cluster = KubeCluster(custom_cluster_spec=spec, namespace=namespace, **kwargs)
    except (UserError, KeyboardInterrupt):
        raise
    except Exception as exc:  # kr8s / httpx / operator errors: one actionable message
        raise KubernetesError(
            f"could not start the DaskCluster {cluster_name!r} with the credentials in "
            f"{source}: {type(exc).__name__}: {exc}. Check that the cluster is reachable "
            "(`kubectl get nodes`) and that the Dask operator is installed (`helm install "
            "--repo https://helm.dask.org --create-namespace -n dask-operator --generate-name "
            "dask-kubernetes-operator`)"
        ) from exc
    if adaptive:
        bounds = autoscaler_spec(cluster_name, minimum, maximum)["spec"]
        cluster.adapt(minimum=bounds["minimum"], maximum=bounds["maximum"])
    return cluster


# ------------------------------------------------------------------------------- rendering
def _replace_flag(args: list[str], flag: str, value: str) -> bool:
    if flag in args:
        args[args.index(flag) + 1] = value
        return True
    return False


def render_manifests(
    *,
    image: str | None = None,
    train_image: str | None = None,
    store: str | None = None,
    run_url: str | None = None,
    namespace: str | None = None,
    n_workers: int | None = None,
    minimum: int | None = None,
    maximum: int | None = None,
    gpus: int | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """All manifests with a user's settings: {filename: documents}.

    ``image`` replaces the Dask and build images, ``train_image`` the training image, ``store``
    the store URL of the build and training commands, ``run_url`` the build job's ``--out``
    (where it writes the locations and scenes tables the workers read; default: ``run`` beside
    the store, :func:`default_run_url`), ``gpus`` the GPUs of the training Job (and torchrun's
    ``--nproc-per-node``), ``n_workers`` / ``minimum`` / ``maximum`` the worker counts,
    ``namespace`` is set on every resource. ``store`` and ``run_url`` must be object-storage
    URLs: the pods share no disk.
    """
    from . import storage

    for what, url in (("--store", store), ("--run-url", run_url)):
        if url is not None and not storage.is_remote(url):
            raise UserError(
                f"{what} {url!r} is a local path, but the job pod and the worker pods share no "
                "disk: give an object-storage URL (s3://bucket/ssl4eo/cube.zarr, az://..., "
                "gs://...)")
        if url is not None and storage.scheme(url) in storage.READ_ONLY_SCHEMES:
            raise UserError(f"{what} {storage.redact(url)!r} is served over HTTP, which can only "
                            "be read: give an s3://, az:// or gs:// URL")
    if run_url is None and store is not None:
        run_url = default_run_url(store)
    out: dict[str, list[dict[str, Any]]] = {}
    for filename in MANIFEST_FILES:
        docs = load_manifests(filename)
        for doc in docs:
            kind = doc["kind"]
            if namespace:
                doc["metadata"]["namespace"] = namespace
            if kind == "DaskCluster":
                doc.update(cluster_spec(doc["metadata"]["name"], image=image, n_workers=n_workers))
                if namespace:
                    doc["metadata"]["namespace"] = namespace
            elif kind == "DaskAutoscaler":
                name = doc["spec"]["cluster"]
                doc["spec"] = autoscaler_spec(name, minimum, maximum)["spec"]
            elif kind == "DaskJob":
                name = doc["metadata"]["name"]
                doc["spec"]["cluster"]["spec"] = cluster_spec(
                    name, image=image, n_workers=n_workers
                )["spec"]
                for container in doc["spec"]["job"]["spec"]["containers"]:
                    if image:
                        container["image"] = image
                    if store:
                        _replace_flag(container["args"], "--store", store)
                    if run_url:
                        _replace_flag(container["args"], "--out", run_url)
            elif kind == "Job":
                pod = doc["spec"]["template"]["spec"]
                for container in pod["containers"]:
                    if train_image:
                        container["image"] = train_image
                    if store:
                        _replace_flag(container["args"], "--store", store)
                    if gpus is not None:
                        for section in ("requests", "limits"):
                            container["resources"][section]["nvidia.com/gpu"] = str(gpus)
                        args = container["args"]
                        i = next(i for i, a in enumerate(args) if a.startswith("--nproc-per-node"))
                        args[i] = f"--nproc-per-node={gpus}"
        out[filename] = docs
    return out


def default_run_url(store: str) -> str:
    """The build job's ``--out`` for a store URL: a ``run`` folder beside the store
    (``s3://b/ssl4eo-s12/cube.zarr`` -> ``s3://b/ssl4eo-s12/run``)."""
    head, _, _ = store.rstrip("/").rpartition("/")
    return f"{head}/run"


def write_manifests(out_dir: str | Path, manifests: Mapping[str, list[dict[str, Any]]]) -> list[Path]:
    """Write rendered manifests, one file each, as multi-document YAML; returns the paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for filename, docs in manifests.items():
        path = out / filename
        path.write_text(
            "---\n".join(yaml.safe_dump(d, sort_keys=False, width=100) for d in docs),
            encoding="utf-8",
        )
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------- CLI
def _cmd_manifests(args: argparse.Namespace) -> int:
    manifests = render_manifests(
        image=args.image, train_image=args.train_image, store=args.store,
        run_url=args.run_url, namespace=args.namespace, n_workers=args.workers, minimum=args.min_workers,
        maximum=args.max_workers, gpus=args.gpus,
    )
    for path in write_manifests(args.out, manifests):
        print(path)
    return 0


def _cmd_spec(args: argparse.Namespace) -> int:
    spec = cluster_spec(args.name, image=args.image, n_workers=args.workers)
    print(yaml.safe_dump(spec, sort_keys=False, width=100), end="")
    return 0


def add_commands(subparsers: Any) -> None:
    """``ssl4eo k8s manifests`` and ``ssl4eo k8s spec``."""
    k8s = subparsers.add_parser(
        "k8s", help="Kubernetes manifests (Dask operator cluster, build DaskJob, training Job)",
        description="Render the Kubernetes manifests shipped with the package.",
    )
    sub = k8s.add_subparsers(title="k8s commands", metavar="COMMAND")
    p = sub.add_parser(
        "manifests", help="write the manifests with your image, store URL and sizes",
        description="Write configmap.yaml, daskcluster.yaml, daskjob.yaml and train-job.yaml "
        "to a folder, for `kubectl apply -f FOLDER/...`.",
    )
    p.add_argument("--out", "-o", required=True, help="folder to write the manifests to")
    p.add_argument("--image", default=None, help="container image for Dask and the build job")
    p.add_argument("--train-image", default=None, help="container image for the training Job")
    p.add_argument("--store", default=None,
                   help="store URL of the build and training (s3://bucket/ssl4eo/cube.zarr, "
                   "az://..., gs://...; object storage: the pods share no disk)")
    p.add_argument("--run-url", default=None,
                   help="object-storage folder where the build job writes its locations and "
                   "scenes tables, which the workers read and a re-applied job reuses "
                   "(default: `run` beside --store)")
    p.add_argument("--namespace", default=None, help="namespace to set on every resource")
    p.add_argument("--workers", type=int, default=None, help="initial Dask workers")
    p.add_argument("--min-workers", type=int, default=None, help="adaptive scaling minimum")
    p.add_argument("--max-workers", type=int, default=None, help="adaptive scaling maximum")
    p.add_argument("--gpus", type=int, default=None, help="GPUs (torchrun processes) to train on")
    p.set_defaults(func=_cmd_manifests)
    s = sub.add_parser(
        "spec", help="print the DaskCluster spec that --cluster kubernetes uses",
        description="Print the DaskCluster resource built by pipeline.k8s.cluster_spec.",
    )
    s.add_argument("--name", default=None, help="cluster name (default: ssl4eo)")
    s.add_argument("--image", default=None, help="container image")
    s.add_argument("--workers", type=int, default=None, help="worker replicas")
    s.set_defaults(func=_cmd_spec)
    k8s.set_defaults(func=lambda args: (k8s.print_help(), 2)[1])
