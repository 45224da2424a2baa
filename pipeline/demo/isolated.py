"""A Dask cluster whose processes cannot see the submitter's files, and a loopback S3 server:
a multi-machine build reproduced on one machine (the tests and ``benchmarks/multimachine.py``).

On a real cluster (Kubernetes pods, other hosts behind ``--scheduler``) the workers have the
package installed but not the submitting machine's disk: a path that the submitter hands to a
task does not exist there. :class:`IsolatedCluster` reproduces that here. It starts
``dask scheduler`` and ``dask worker`` processes, each in **its own mount namespace**
(``unshare --mount``, util-linux; needs root or user namespaces) in which every folder of
``hidden`` is covered by an empty, private tmpfs: the submitter's working folders (its tables,
its stores, the catalog's files) are not there for them, while the installed package, the
network (loopback: the STAC/asset servers, the S3 server) and their own scratch folder are.
:meth:`IsolatedCluster.workers_see` asks every worker whether it sees a path, so a test can
prove the isolation instead of assuming it.

:func:`s3_server` runs moto's S3 server on loopback: real S3 requests through botocore/s3fs,
dummy credentials, one bucket; the variables it sets (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``...) are inherited by processes started afterwards, as a pod gets them from
its Secret.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import UserError

#: dummy S3 credentials of the loopback server (a test asserts they never reach a log or store)
TEST_ACCESS_KEY = "ssl4eo-test-access-key"
TEST_SECRET_KEY = "ssl4eo-test-secret-9c41f7"

_S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_REGION",
           "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_EC2_METADATA_DISABLED")


def namespaces_unavailable() -> str | None:
    """Why :class:`IsolatedCluster` cannot run here (None: it can): ``unshare --mount`` and a
    tmpfs mount inside it are tried once."""
    if shutil.which("unshare") is None:
        return "util-linux's unshare is not installed"
    probe = tempfile.mkdtemp(prefix="ssl4eo-ns-probe-")
    try:
        Path(probe, "visible").touch()
        rc = subprocess.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f"mount -t tmpfs -o size=64k ssl4eo-hidden {shlex.quote(probe)} && "
             f"test ! -e {shlex.quote(probe)}/visible"],
            capture_output=True, text=True, timeout=30)
        if rc.returncode != 0:
            return f"cannot hide a folder in a mount namespace: {rc.stderr.strip() or rc.returncode}"
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"unshare failed: {exc}"
    finally:
        shutil.rmtree(probe, ignore_errors=True)


@contextmanager
def s3_server(bucket: str = "ssl4eo-test") -> Iterator[dict[str, str]]:
    """moto's S3 server on 127.0.0.1 (a free port) with ``bucket``; while open, the process
    environment points S3 clients at it (and is restored afterwards). Yields
    ``{"endpoint", "bucket"}``. Instance-metadata lookups are switched off, so a client without
    credentials fails at once instead of asking a cloud metadata address."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(AWS_ACCESS_KEY_ID=TEST_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=TEST_SECRET_KEY,
                      AWS_ENDPOINT_URL=endpoint, AWS_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    os.environ.pop("AWS_SESSION_TOKEN", None)
    os.environ.pop("AWS_PROFILE", None)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    try:
        yield {"endpoint": endpoint, "bucket": bucket}
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        try:
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
        except ImportError:
            pass


class IsolatedCluster:
    """``dask scheduler`` + ``n_workers`` ``dask worker`` processes, each in its own mount
    namespace with every folder of ``hidden`` covered by an empty tmpfs.

    ``env``: extra environment of the processes (they inherit this process's environment as
    it is when :meth:`start` runs: the object-storage variables included). The workers get
    the build's worker settings (:func:`pipeline.runner.worker_environment`). Their output goes
    to ``logs/`` in the cluster's own folder (``work_dir``, default a new temporary folder,
    which must not be inside ``hidden``). Use as a context manager.
    """

    def __init__(self, n_workers: int, hidden: Sequence[str | os.PathLike[str]], *,
                 nthreads: int = 1, env: Mapping[str, str] | None = None,
                 work_dir: str | os.PathLike[str] | None = None) -> None:
        reason = namespaces_unavailable()
        if reason:
            raise UserError(f"an isolated cluster needs mount namespaces: {reason}")
        self.n_workers = n_workers
        self.hidden = [str(Path(h).resolve()) for h in hidden]
        self.nthreads = nthreads
        self.env = dict(env or {})
        self.work_dir = Path(work_dir or tempfile.mkdtemp(prefix="ssl4eo-isolated-")).resolve()
        for h in self.hidden:
            if self.work_dir == Path(h) or Path(h) in self.work_dir.parents:
                raise ValueError(f"work_dir {self.work_dir} is inside the hidden folder {h}")
        self.log_dir = self.work_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.address: str | None = None
        self.scheduler: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []

    # --------------------------------------------------------------------------- processes
    def _spawn(self, name: str, argv: Sequence[str]) -> subprocess.Popen:
        from ..runner import worker_environment

        mounts = " && ".join(f"mount -t tmpfs -o size=1m,mode=0755 ssl4eo-hidden "
                             f"{shlex.quote(h)}" for h in self.hidden) or "true"
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
               f'{mounts} && exec "$@"', "sh", *argv]
        env = {**os.environ, **worker_environment(), **self.env,
               "PYTHONUNBUFFERED": "1"}
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        try:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    cwd=self.work_dir, start_new_session=True)
        finally:
            log.close()

    def start(self, timeout: float = 90) -> str:
        """Start the scheduler and the workers; returns the scheduler's address once every
        worker has joined."""
        sched_file = self.work_dir / "scheduler.json"
        self.scheduler = self._spawn("scheduler", [
            sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
            "--port", "0", "--no-dashboard", "--scheduler-file", str(sched_file)])
        deadline = time.monotonic() + timeout
        while not sched_file.exists():
            if self.scheduler.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the isolated scheduler did not start: {self.logs('scheduler')}")
            time.sleep(0.2)
        time.sleep(0.2)  # the file is written in one go, but let it land
        self.address = json.loads(sched_file.read_text())["address"]
        for i in range(self.n_workers):
            self.add_worker(f"worker-{i}")
        from distributed import Client

        with Client(self.address, timeout="30s") as client:
            client.wait_for_workers(self.n_workers, timeout=max(5.0, deadline - time.monotonic()))
        return self.address

    def add_worker(self, name: str) -> subprocess.Popen:
        assert self.address, "start() first"
        p = self._spawn(name, [
            sys.executable, "-m", "distributed.cli.dask_worker", self.address,
            "--name", name, "--nthreads", str(self.nthreads), "--nworkers", "1",
            "--no-dashboard", "--host", "127.0.0.1",
            "--local-directory", str(self.work_dir / "scratch" / name)])
        self.workers.append(p)
        return p

    def kill_worker(self, index: int) -> None:
        """SIGKILL worker ``index`` and its nanny (the whole process group): as a machine that
        dies, nothing restarts it."""
        p = self.workers[index]
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait(30)

    def kill_worker_mid_run(self, index: int, *, key_prefix: str = "ssl4eo-shard",
                            after_done: int = 1, until: Any = None,
                            timeout: float = 300) -> dict[str, Any] | None:
        """Wait until ``after_done`` tasks whose key starts with ``key_prefix`` have finished
        and one such task is running on worker ``index``, then kill that worker
        (:meth:`kill_worker`). ``until()`` returning true (the build ended) stops the wait.
        Returns ``{"worker", "tasks_done_before", "after_s"}``, or None when nothing was
        killed."""
        from distributed import Client

        t0 = time.perf_counter()
        name = f"worker-{index}"

        def finished(dask_scheduler: Any) -> int:
            return sum(ts.state == "memory" for k, ts in dask_scheduler.tasks.items()
                       if str(k).startswith(key_prefix))

        with Client(self.address, timeout="30s") as client:
            names = {w: i["name"] for w, i in client.scheduler_info()["workers"].items()}
            while time.perf_counter() - t0 < timeout and not (until and until()):
                done = client.run_on_scheduler(finished)
                busy = [w for w, keys in client.processing().items()
                        if names.get(w) == name and any(str(k).startswith(key_prefix)
                                                        for k in keys)]
                if done >= after_done and busy:
                    self.kill_worker(index)
                    return {"worker": busy[0], "tasks_done_before": done,
                            "after_s": round(time.perf_counter() - t0, 2)}
                time.sleep(0.1)
        return None

    def stop(self) -> None:
        procs = [*self.workers, *([self.scheduler] if self.scheduler else [])]
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)

    def __enter__(self) -> IsolatedCluster:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    # -------------------------------------------------------------------------- inspection
    def workers_see(self, path: str | os.PathLike[str]) -> dict[str, bool]:
        """For every live worker, whether ``path`` exists in its file system view."""
        from distributed import Client

        with Client(self.address, timeout="30s") as client:
            return client.run(os.path.exists, str(Path(path).resolve()))

    def logs(self, name: str | None = None) -> str:
        """The processes' output (one process by name: ``scheduler``, ``worker-0``...)."""
        files = [self.log_dir / f"{name}.log"] if name else sorted(self.log_dir.glob("*.log"))
        return "\n".join(f"--- {f.stem}\n{f.read_text(errors='replace')}"
                         for f in files if f.exists())


def store_objects(url: str | os.PathLike[str]) -> dict[str, bytes]:
    """Every file or object of a store at a path or URL: relative key -> bytes."""
    from .. import storage

    fs, root = storage.filesystem(url)
    root = root.rstrip("/")
    return {p[len(root) + 1:]: fs.cat_file(p) for p in fs.find(root)}


def differing_objects(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> list[str]:
    """Keys whose bytes differ between two stores (or exist in one only), sorted. Two builds
    of the same tables differ only in the root ``zarr.json`` (its provenance: date, paths)."""
    oa, ob = store_objects(a), store_objects(b)
    return sorted(k for k in set(oa) | set(ob) if oa.get(k) != ob.get(k))


__all__ = ["IsolatedCluster", "differing_objects", "store_objects", "TEST_ACCESS_KEY", "TEST_SECRET_KEY", "namespaces_unavailable",
           "s3_server"]
