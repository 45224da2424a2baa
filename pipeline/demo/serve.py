"""Serve the embedded catalog: PostgreSQL + pgstac + stac-fastapi-pgstac, and a COG server.

:func:`serve_catalog` starts, on loopback only,

1. PostgreSQL with its own fresh data directory (``initdb``; run as the ``postgres`` user when
   we are root), the PostGIS extension, and the pgstac schema (``pypgstac`` migrate);
2. the catalog's collections and items, loaded with pypgstac (upsert), their asset hrefs
   rewritten from file-relative paths to absolute URLs on the asset server;
3. stac-fastapi-pgstac under uvicorn (a subprocess);
4. a threaded HTTP server with Range requests for the catalog's files (a subprocess; see
   :mod:`pipeline.demo.httpserver`),

waits until both HTTP servers answer, and stops everything it started (whole process groups)
on exit, on error, and on SIGINT/SIGTERM in the ``ssl4eo catalog serve`` command::

    with serve_catalog("demo-output/catalog") as served:
        client = pystac_client.Client.open(served.stac_url)

The catalog directory contract (written by :mod:`pipeline.demo.catalog`)::

    DIR/catalog.json                                STAC Catalog, "ssl4eo:catalog_version": "1"
    DIR/collections/<collection-id>.json            STAC Collections
    DIR/items/<collection-id>/<item-id>.json        STAC Items (asset hrefs relative to the file)
    DIR/assets/<collection-id>/<item-id>/<key>.tif  COGs
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import json
import logging
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..errors import CatalogError

log = logging.getLogger(__name__)

#: Catalog format version this server reads.
CATALOG_VERSION = "1"
CATALOG_VERSION_KEY = "ssl4eo:catalog_version"
#: Environment variable naming the directory with PostgreSQL's ``initdb`` and ``postgres``.
PG_BINDIR_ENV = "SSL4EO_PG_BINDIR"
#: Environment variable naming PostgreSQL's share directory (where ``extension/`` lives).
PG_SHAREDIR_ENV = "SSL4EO_PG_SHAREDIR"
#: Marker file that says a data directory was made by us (and may be replaced).
_MARKER = ".ssl4eo-serve"

_INSTALL_HINT = (
    "Install them with `make demo` (or `make test`), which runs deploy/ensure-system-packages.sh, "
    "or yourself: `apt-get install postgresql-15-postgis-3` (Debian/Ubuntu) or "
    "`conda env create -f environment.yml`; or set "
    f"{PG_BINDIR_ENV} to the directory holding initdb and postgres."
)

_INFERRED_RELS = {"self", "root", "parent", "collection", "item", "items", "child"}


# ----------------------------------------------------------------------------- PostgreSQL bins
@dataclass(frozen=True)
class PgInstall:
    """Where PostgreSQL's programs and its extension files are."""

    bindir: Path
    sharedir: Path | None

    def exe(self, name: str) -> str:
        return str(self.bindir / name)


def _pg_version_key(path: str) -> tuple[int, ...]:
    parts = Path(path).parts
    for p in parts:
        if p.replace(".", "").isdigit():
            return tuple(int(x) for x in p.split("."))
    return (0,)


def find_postgres(bindir: str | os.PathLike | None = None) -> PgInstall:
    """Find PostgreSQL (``initdb``, ``postgres``) with PostGIS; raise :class:`CatalogError`.

    Looks in ``bindir``, else ``$SSL4EO_PG_BINDIR``, else ``pg_config --bindir``, the newest
    ``/usr/lib/postgresql/*/bin``, and ``PATH``.
    """
    bindir = bindir or os.environ.get(PG_BINDIR_ENV)
    candidates: list[Path] = []
    if bindir:
        candidates.append(Path(bindir))
    else:
        pg_config = shutil.which("pg_config")
        if pg_config:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                out = subprocess.run(
                    [pg_config, "--bindir"], capture_output=True, text=True, timeout=10
                ).stdout.strip()
                if out:
                    candidates.append(Path(out))
        for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=_pg_version_key, reverse=True):
            candidates.append(Path(d))
        on_path = shutil.which("postgres")
        if on_path:
            candidates.append(Path(on_path).resolve().parent)
    found = None
    for d in candidates:
        if (d / "initdb").is_file() and (d / "postgres").is_file():
            found = d
            break
    if found is None:
        where = str(candidates[0]) if bindir else "the usual places (/usr/lib/postgresql/*/bin, PATH)"
        raise CatalogError(
            f"PostgreSQL server programs (initdb, postgres) were not found in {where}; the "
            f"embedded STAC API needs PostgreSQL with PostGIS. {_INSTALL_HINT}"
        )
    sharedir = _find_sharedir(found)
    if sharedir is None or not (sharedir / "extension" / "postgis.control").is_file():
        raise CatalogError(
            f"PostgreSQL is installed ({found}) but the PostGIS extension is not "
            f"(no extension/postgis.control in {sharedir or 'its share directory'}). "
            f"{_INSTALL_HINT}"
        )
    return PgInstall(found, sharedir)


def _find_sharedir(bindir: Path) -> Path | None:
    env = os.environ.get(PG_SHAREDIR_ENV)
    if env:
        return Path(env)
    pg_config = bindir / "pg_config"
    if pg_config.is_file():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [str(pg_config), "--sharedir"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
            if out and Path(out).is_dir():
                return Path(out)
    # Debian: /usr/lib/postgresql/15/bin -> /usr/share/postgresql/15
    if bindir.parent.parent.name == "postgresql":
        cand = Path("/usr/share/postgresql") / bindir.parent.name
        if cand.is_dir():
            return cand
    # conda / prefix installs: PREFIX/bin -> PREFIX/share/postgresql or PREFIX/share
    for cand in (bindir.parent / "share" / "postgresql", bindir.parent / "share"):
        if (cand / "extension").is_dir():
            return cand
    return None


# ------------------------------------------------------------------------------ catalog files
@dataclass
class CatalogFiles:
    """The parsed catalog: collections and items, hrefs still as written."""

    root: Path
    catalog: dict
    collections: dict[str, tuple[Path, dict]]
    items: list[tuple[Path, dict]]


def _read_json(path: Path, what: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise CatalogError(
            f"{what} {path} is damaged: not valid JSON ({exc.msg} at line {exc.lineno}, column "
            f"{exc.colno}). Rebuild the catalog with `ssl4eo catalog build --out "
            f"{path.parents[2] if what == 'item file' else path.parent}` or remove the file."
        ) from None
    except UnicodeDecodeError:
        raise CatalogError(
            f"{what} {path} is damaged: not UTF-8 text. Rebuild the catalog with "
            "`ssl4eo catalog build`, or remove the file."
        ) from None


def read_catalog(catalog_dir: str | os.PathLike) -> CatalogFiles:
    """Read and check a catalog directory; raise :class:`CatalogError` naming the bad file."""
    root = Path(catalog_dir).expanduser()
    build_hint = f"Build it with `ssl4eo catalog build --out {root}`."
    if not root.exists():
        raise CatalogError(f"catalog directory {root} does not exist. {build_hint}")
    if not root.is_dir():
        raise CatalogError(f"catalog path {root} is not a directory. {build_hint}")
    cat_path = root / "catalog.json"
    if not cat_path.is_file():
        raise CatalogError(
            f"{root} is not an embedded catalog (it has no catalog.json). {build_hint}"
        )
    root = root.resolve()
    cat_path = root / "catalog.json"
    catalog = _read_json(cat_path, "catalog file")
    version = catalog.get(CATALOG_VERSION_KEY) if isinstance(catalog, dict) else None
    if version != CATALOG_VERSION:
        raise CatalogError(
            f"catalog {cat_path} has format version {version!r}, this program reads "
            f"{CATALOG_VERSION!r}. Rebuild it with `ssl4eo catalog build --out {root}`."
        )
    collections: dict[str, tuple[Path, dict]] = {}
    for path in sorted((root / "collections").glob("*.json")):
        coll = _read_json(path, "collection file")
        if not isinstance(coll, dict) or coll.get("type") != "Collection" or "id" not in coll:
            raise CatalogError(
                f"collection file {path} is damaged: not a STAC Collection (needs "
                f'"type": "Collection" and an "id"). {build_hint}'
            )
        collections[coll["id"]] = (path, coll)
    if not collections:
        raise CatalogError(f"catalog {root} has no collections (collections/*.json). {build_hint}")
    items: list[tuple[Path, dict]] = []
    for path in sorted((root / "items").glob("*/*.json")):
        item = _read_json(path, "item file")
        problem = _item_problem(item, collections)
        if problem:
            raise CatalogError(
                f"item file {path} is damaged: {problem}. Rebuild the catalog with "
                f"`ssl4eo catalog build --out {root}`, or remove the file."
            )
        items.append((path, item))
    return CatalogFiles(root, catalog, collections, items)


def _item_problem(item: Any, collections: dict) -> str | None:
    if not isinstance(item, dict):
        return "not a JSON object"
    if item.get("type") != "Feature":
        return 'not a STAC Item ("type" is not "Feature")'
    for key in ("id", "collection", "geometry", "properties", "assets"):
        if not item.get(key):
            return f'it has no "{key}"'
    props = item["properties"]
    if not isinstance(props, dict) or not (
        props.get("datetime") or (props.get("start_datetime") and props.get("end_datetime"))
    ):
        return "its properties have no datetime"
    for key in ("datetime", "start_datetime", "end_datetime"):
        if props.get(key) is not None and not _is_datetime(props[key]):
            return f"its {key} {props[key]!r} is not an RFC 3339 datetime"
    if item["collection"] not in collections:
        return f"its collection {item['collection']!r} has no collections/*.json"
    geom = item["geometry"]
    if not isinstance(geom, dict) or "type" not in geom or "coordinates" not in geom:
        return "its geometry is not GeoJSON"
    if not isinstance(item["assets"], dict):
        return '"assets" is not an object'
    for key, asset in item["assets"].items():
        if not isinstance(asset, dict) or not isinstance(asset.get("href"), str):
            return f"asset {key!r} has no href"
    return None


def _is_datetime(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _absolute_href(href: str, file_path: Path, root: Path, asset_url: str) -> str:
    """A file-relative href as a URL on the asset server (other hrefs unchanged)."""
    if "://" in href or href.startswith("/vsi"):
        return href
    target = (file_path.parent / href).resolve() if not href.startswith("/") else Path(href)
    try:
        rel = target.relative_to(root)
    except ValueError:
        raise CatalogError(
            f"{file_path} refers to {href}, which lies outside the catalog directory {root}; "
            "the asset server only serves files inside it. Rebuild the catalog."
        ) from None
    return f"{asset_url}/{rel.as_posix()}"


def rewrite_for_serving(obj: dict, file_path: Path, root: Path, asset_url: str) -> dict:
    """A copy of an item or collection ready for pgstac: absolute asset hrefs, no local links.

    The API makes its own self/root/parent/collection links, so relative links with those
    rels are dropped; other relative links (licence, previews) point at the asset server.
    """
    out = dict(obj)
    if isinstance(obj.get("assets"), dict):
        out["assets"] = {
            k: {**a, "href": _absolute_href(a["href"], file_path, root, asset_url)}
            for k, a in obj["assets"].items()
        }
    links = []
    for link in obj.get("links", []) or []:
        href = link.get("href", "")
        if "://" in href:
            links.append(link)
        elif link.get("rel") not in _INFERRED_RELS:
            links.append({**link, "href": _absolute_href(href, file_path, root, asset_url)})
    out["links"] = links
    return out


#: items per row group of an exported snapshot
SNAPSHOT_ROW_GROUP = 500


def export_geoparquet(catalog_dir: str | os.PathLike, out: str | os.PathLike,
                      asset_url: str) -> dict[str, int]:
    """Write the catalog's items as one STAC GeoParquet snapshot at ``out``, with hrefs on the
    asset server at ``asset_url`` exactly as the served API gives them
    (:func:`rewrite_for_serving`), written by ``stac_geoparquet`` (the library Planetary
    Computer's ``geoparquet-items`` snapshots come from). Returns item counts per collection."""
    import stac_geoparquet.arrow as sga

    files = read_catalog(catalog_dir)
    items = [rewrite_for_serving(i, p, files.root, asset_url.rstrip("/"))
             for p, i in files.items]
    if not items:
        raise CatalogError(f"catalog {files.root} has no items to export")
    # sorted by collection and time, in row groups of SNAPSHOT_ROW_GROUP items, as snapshots
    # partitioned by time are: a search reads only the row groups of its windows
    items.sort(key=lambda it: (it["collection"], it["properties"].get("datetime") or "",
                               it["id"]))
    table = sga.parse_stac_items_to_arrow(items)
    table = table.read_all() if hasattr(table, "read_all") else table
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    # stac_geoparquet writes each record batch as one row group
    sga.to_parquet(table.to_reader(max_chunksize=SNAPSHOT_ROW_GROUP), tmp)
    tmp.replace(out)
    counts: dict[str, int] = {}
    for item in items:
        counts[item["collection"]] = counts.get(item["collection"], 0) + 1
    return counts


# ------------------------------------------------------------------------------------ children
def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child
    """Ask Linux to SIGTERM this child when its parent dies (no orphans after a kill -9)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen
    log: Path
    stop_signal: int = signal.SIGTERM

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join("    " + line for line in lines[-n:])

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, self.stop_signal)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", self.name, timeout)
        # whatever is left in the group (workers, backends) goes too
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)


def _spawn(
    name: str,
    args: list[str],
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
    as_user: str | None = None,
    pass_fds: tuple[int, ...] = (),
    stop_signal: int = signal.SIGTERM,
    stdout: int | None = None,
) -> _Child:
    logf = open(log_path, "ab")  # noqa: SIM115 (the child owns it; we close our copy)
    try:
        kwargs: dict[str, Any] = {}
        if as_user:
            pw = pwd.getpwnam(as_user)
            kwargs.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=stdout if stdout is not None else logf,
            stderr=logf,
            env=env,
            cwd=cwd,
            start_new_session=True,
            pass_fds=pass_fds,
            preexec_fn=_set_pdeathsig,
            **kwargs,
        )
    finally:
        logf.close()
    return _Child(name, proc, log_path, stop_signal)


def _bind(host: str, port: int, what: str, option: str) -> socket.socket:
    """A listening socket on (host, port); a clear :class:`CatalogError` when taken."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise CatalogError(f"cannot resolve host {host!r} for the {what}: {exc}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise CatalogError(
                f"port {port} on {host} is already in use, so the {what} cannot listen there. "
                f"Stop the program using it, or pass another {option} (0 picks a free port)."
            ) from None
        raise CatalogError(f"cannot listen on {host}:{port} for the {what}: {exc}") from None
    sock.set_inheritable(True)
    return sock


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _traversable_by_others(path: Path) -> bool:
    p = path.resolve()
    for d in [p, *p.parents]:
        if d.exists() and not d.stat().st_mode & 0o001:
            return False
    return True


# ---------------------------------------------------------------------------------- the server
@dataclass
class Served:
    """A running embedded STAC API and asset server. ``stop()`` ends all of it."""

    stac_url: str
    asset_url: str
    dsn: str
    catalog_dir: Path
    workdir: Path
    counts: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    _children: list[_Child] = field(default_factory=list, repr=False)
    _cleanup_dirs: list[Path] = field(default_factory=list, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def pids(self) -> list[int]:
        """Process ids of the children started (PostgreSQL, uvicorn, asset server)."""
        return [c.proc.pid for c in self._children]

    def asset_stats(self) -> dict:
        """What the asset server has sent so far (see :mod:`pipeline.demo.httpserver`)."""
        with urllib.request.urlopen(f"{self.asset_url}/_stats", timeout=10) as resp:
            return json.load(resp)

    def check_alive(self) -> None:
        """Raise :class:`CatalogError` when a server process has died."""
        for c in self._children:
            if not c.alive():
                raise CatalogError(
                    f"the {c.name} stopped unexpectedly (exit {c.proc.returncode}); its log "
                    f"{c.log}:\n{c.log_tail()}"
                )

    def stop(self) -> None:
        """Stop every process started (newest first) and remove temporary directories."""
        if self._stopped:
            return
        self._stopped = True
        for child in reversed(self._children):
            child.stop()
        for d in self._cleanup_dirs:
            shutil.rmtree(d, ignore_errors=True)

    def __enter__(self) -> Served:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_catalog_server(
    catalog_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    asset_port: int = 0,
    workdir: str | os.PathLike | None = None,
    progress: bool = True,
    pg_bindir: str | os.PathLike | None = None,
    startup_timeout: float = 60.0,
) -> Served:
    """Start everything; return a :class:`Served` (call ``stop()``), or raise and clean up.

    ``port``/``asset_port`` 0 pick free ports. ``workdir`` holds logs and the database
    (default: a temporary directory removed on stop). ``pg_bindir`` overrides where
    PostgreSQL's programs are looked for (also ``$SSL4EO_PG_BINDIR``).
    """
    t0 = time.perf_counter()
    say = _say if progress else (lambda msg: None)
    files = read_catalog(catalog_dir)
    pg = find_postgres(pg_bindir)
    api_sock = _bind(host, port, "STAC API", "--port")
    try:
        asset_sock = _bind(host, asset_port, "asset server", "--asset-port")
    except BaseException:
        api_sock.close()
        raise
    api_port = api_sock.getsockname()[1]
    asset_port = asset_sock.getsockname()[1]
    stac_url = f"http://{_url_host(host)}:{api_port}"
    asset_url = f"http://{_url_host(host)}:{asset_port}"

    cleanup: list[Path] = []
    if workdir is None:
        wd = Path(tempfile.mkdtemp(prefix="ssl4eo-serve-"))
        os.chmod(wd, 0o755)  # the postgres user (when we are root) must reach wd/postgres
        cleanup.append(wd)
    else:
        wd = Path(workdir).expanduser().resolve()
        wd.mkdir(parents=True, exist_ok=True)
    served = Served(stac_url, asset_url, "", files.root, wd, _cleanup_dirs=cleanup)
    try:
        with api_sock, asset_sock:
            _start_all(served, files, pg, host, api_sock, asset_sock, wd, say, startup_timeout)
    except BaseException:
        served.stop()
        raise
    served.timings["total_s"] = round(time.perf_counter() - t0, 3)
    log.info("catalog served in %.1f s: %s", served.timings["total_s"], served.timings)
    return served


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _start_all(
    served: Served,
    files: CatalogFiles,
    pg: PgInstall,
    host: str,
    api_sock: socket.socket,
    asset_sock: socket.socket,
    wd: Path,
    say,
    startup_timeout: float,
) -> None:
    timings = served.timings
    logs = wd / "logs"
    logs.mkdir(exist_ok=True)

    # 1. the asset server: first, so that a broken Python environment shows early
    t = time.perf_counter()
    asset = _spawn(
        "asset server",
        [sys.executable, "-m", "pipeline.demo.httpserver", "--root", str(files.root),
         "--fd", str(asset_sock.fileno())],
        logs / "assets.log",
        pass_fds=(asset_sock.fileno(),),
        cwd=str(wd),
        env={**os.environ, "PYTHONPATH": _pythonpath()},
        stdout=subprocess.DEVNULL,
    )
    served._children.append(asset)

    # 2. PostgreSQL
    say(f"Starting PostgreSQL ({pg.bindir}) ...")
    dsn = _start_postgres(served, pg, wd, logs, startup_timeout)
    served.dsn = dsn
    timings["postgres_s"] = round(time.perf_counter() - t, 3)

    # 3. pgstac schema and data
    t = time.perf_counter()
    _migrate_and_load(served, files, dsn, say)
    timings["pgstac_load_s"] = round(time.perf_counter() - t, 3)

    # 4. the STAC API
    t = time.perf_counter()
    u = urlsplit(dsn)
    env = {
        **os.environ,
        "PYTHONPATH": _pythonpath(),
        "PGHOST": u.hostname or "127.0.0.1",
        "PGPORT": str(u.port),
        "PGUSER": u.username or "postgres",
        "PGPASSWORD": u.password or "",
        "PGDATABASE": u.path.lstrip("/") or "postgres",
        "POSTGRES_HOST_READER": u.hostname or "127.0.0.1",
        "POSTGRES_HOST_WRITER": u.hostname or "127.0.0.1",
        "POSTGRES_PORT": str(u.port),
        "POSTGRES_USER": u.username or "postgres",
        "POSTGRES_PASS": u.password or "",
        "POSTGRES_DBNAME": u.path.lstrip("/") or "postgres",
        "DB_MIN_CONN_SIZE": "1",
        "DB_MAX_CONN_SIZE": "4",
        "STAC_FASTAPI_TITLE": "ssl4eo embedded catalog",
        "STAC_FASTAPI_DESCRIPTION": (
            "Sentinel-1/2 scenes (real and synthetic) served on loopback by ssl4eo"
        ),
        "STAC_FASTAPI_VERSION": "1.0.0",
        "STAC_FASTAPI_LANDING_ID": "ssl4eo-embedded",
        "ENABLE_RESPONSE_MODELS": "false",
    }
    env.pop("ENABLED_EXTENSIONS", None)
    api = _spawn(
        "STAC API (uvicorn)",
        [sys.executable, "-m", "uvicorn", "stac_fastapi.pgstac.app:create_app", "--factory",
         "--fd", str(api_sock.fileno()), "--log-level", "warning", "--no-access-log",
         "--timeout-graceful-shutdown", "3"],
        logs / "stac-api.log",
        env=env,
        cwd=str(wd),  # stac-fastapi reads a .env from the working directory: use ours
        pass_fds=(api_sock.fileno(),),
    )
    served._children.append(api)
    say(f"Starting the STAC API on {served.stac_url} and the asset server on {served.asset_url} ...")
    deadline = time.monotonic() + startup_timeout
    pending = {"STAC API": f"{served.stac_url}/", "asset server": f"{served.asset_url}/_stats"}
    while pending:
        served.check_alive()
        for name, url in list(pending.items()):
            if _http_ok(url):
                del pending[name]
        if pending and time.monotonic() > deadline:
            raise CatalogError(
                f"the {', '.join(pending)} did not answer within {startup_timeout:.0f} s; logs "
                f"in {logs}:\n{api.log_tail()}"
            )
        if pending:
            time.sleep(0.1)
    timings["api_s"] = round(time.perf_counter() - t, 3)


def _pythonpath() -> str:
    """PYTHONPATH for children so they import this very package (also from a source tree)."""
    here = str(Path(__file__).resolve().parents[2])
    old = os.environ.get("PYTHONPATH")
    return here + (os.pathsep + old if old else "")


def _start_postgres(
    served: Served, pg: PgInstall, wd: Path, logs: Path, startup_timeout: float
) -> str:
    import psycopg

    is_root = os.geteuid() == 0
    user = None
    if is_root:
        user = "postgres"
        try:
            pwd.getpwnam(user)
        except KeyError:
            raise CatalogError(
                "we run as root and PostgreSQL refuses to run as root, but there is no "
                "`postgres` user to run it as. Create one (`useradd -r postgres`) or run as "
                "an ordinary user."
            ) from None
    base = wd / "postgres"
    if is_root and not _traversable_by_others(wd):
        # the postgres user cannot reach a directory under a private parent: use /tmp
        base = Path(tempfile.mkdtemp(prefix="ssl4eo-pg-"))
        served._cleanup_dirs.append(base)
    elif base.exists():
        if not (base / _MARKER).exists():
            raise CatalogError(
                f"{base} exists and was not made by `ssl4eo catalog serve`; choose another "
                "--workdir or remove it."
            )
        shutil.rmtree(base)
    if base not in served._cleanup_dirs:
        base.mkdir(parents=True, exist_ok=True)
    (base / _MARKER).write_text("made by ssl4eo catalog serve; replaced on each start\n")
    data = base / "data"
    sock_dir = base / "run"
    sock_dir.mkdir(mode=0o700, exist_ok=True)
    password = secrets.token_urlsafe(18)
    pwfile = base / "pwfile"
    pwfile.write_text(password + "\n")
    os.chmod(pwfile, 0o600)
    if user:
        pw = pwd.getpwnam(user)
        os.chmod(base, 0o755)
        for p in (base, sock_dir, pwfile):
            os.chown(p, pw.pw_uid, pw.pw_gid)
    os.chmod(base, 0o755)

    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(LC_ALL="C.UTF-8", LANG="C.UTF-8", TZ="UTC")
    kw: dict[str, Any] = {}
    if user:
        pw = pwd.getpwnam(user)
        kw.update(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
        env["HOME"] = str(base)
    initdb_log = logs / "initdb.log"
    with open(initdb_log, "wb") as lf:
        r = subprocess.run(
            [pg.exe("initdb"), "-D", str(data), "-U", "postgres", "--auth-local=trust",
             "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8",
             "--locale=C.UTF-8", "--no-sync", "--no-instructions"],
            stdout=lf, stderr=subprocess.STDOUT, env=env, cwd=str(base), timeout=120, **kw,
        )
    pwfile.unlink()
    if r.returncode != 0:
        tail = initdb_log.read_text(errors="replace")[-1500:]
        raise CatalogError(
            f"initdb failed (exit {r.returncode}) creating {data}; log {initdb_log}:\n{tail}"
        )

    last_error = ""
    ready = False
    for _attempt in range(3):
        pg_port = _free_port("127.0.0.1")
        child = _spawn(
            "PostgreSQL",
            [pg.exe("postgres"), "-D", str(data), "-p", str(pg_port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={sock_dir}",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=40", "-c", "shared_buffers=64MB",
             "-c", "logging_collector=off", "-c", "log_min_messages=warning"],
            logs / "postgres.log",
            env=env,
            cwd=str(base),
            as_user=user,
            stop_signal=signal.SIGINT,  # PostgreSQL's "fast shutdown"
        )
        served._children.append(child)
        deadline = time.monotonic() + startup_timeout
        while child.alive() and time.monotonic() < deadline:
            try:
                with psycopg.connect(
                    host=str(sock_dir), port=pg_port, user="postgres", dbname="postgres",
                    connect_timeout=2,
                ) as conn:
                    conn.execute("SELECT 1")
                ready = True
                break
            except psycopg.OperationalError as exc:
                last_error = str(exc)
                time.sleep(0.05)
        if ready:
            break
        if child.alive():
            raise CatalogError(
                f"PostgreSQL did not accept connections within {startup_timeout:.0f} s "
                f"({last_error}); log {child.log}:\n{child.log_tail()}"
            )
        tail = child.log_tail()
        served._children.remove(child)
        child.stop()
        if "could not bind" in tail or "Address already in use" in tail:
            continue  # someone took the port between our check and the start: try another
        raise CatalogError(
            f"PostgreSQL did not start (exit {child.proc.returncode}); log {child.log}:\n{tail}"
        )
    else:
        raise CatalogError(f"PostgreSQL could not bind a free loopback port: {last_error}")

    with psycopg.connect(
        host=str(sock_dir), port=pg_port, user="postgres", dbname="postgres", autocommit=True
    ) as conn:
        try:
            conn.execute("CREATE EXTENSION IF NOT EXISTS postgis")
        except psycopg.Error as exc:
            raise CatalogError(
                f"PostgreSQL runs but the PostGIS extension cannot be created: "
                f"{str(exc).strip()}. {_INSTALL_HINT}"
            ) from None
    return f"postgresql://postgres:{password}@127.0.0.1:{pg_port}/postgres"


_JSON_TYPES = ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string"),
               (list, "array"), (dict, "object"))
_NOT_QUERYABLE = {"datetime", "start_datetime", "end_datetime", "created", "updated"}


def infer_queryables(items: list[dict]) -> dict[str, dict]:
    """A queryables document per collection, typed from the values its items carry.

    pgstac compares and sorts a property by its queryable's type; a property it does not know
    is compared as text (so ``sortby=eo:cloud_cover`` would put 8 after 72).
    """
    seen: dict[str, dict[str, set[str]]] = {}
    for item in items:
        props = seen.setdefault(item["collection"], {})
        for name, value in item.get("properties", {}).items():
            if name in _NOT_QUERYABLE or value is None:
                continue
            kind = next((t for cls, t in _JSON_TYPES if isinstance(value, cls)), None)
            if kind:
                props.setdefault(name, set()).add(kind)
    docs = {}
    for cid, props in seen.items():
        properties = {}
        for name, kinds in sorted(props.items()):
            if kinds <= {"integer", "number"}:
                kind = "integer" if kinds == {"integer"} else "number"
            elif len(kinds) == 1:
                kind = next(iter(kinds))
            else:
                continue  # mixed types: leave it untyped
            properties[name] = {"title": name, "type": kind}
        if properties:
            docs[cid] = {
                "$schema": "https://json-schema.org/draft/2019-09/schema",
                "type": "object",
                "title": f"Queryables for {cid}",
                "properties": properties,
            }
    return docs


def _migrate_and_load(served: Served, files: CatalogFiles, dsn: str, say) -> None:
    from pypgstac.db import PgstacDB
    from pypgstac.load import Loader, Methods
    from pypgstac.migrate import Migrate

    t = time.perf_counter()
    with PgstacDB(dsn=dsn) as db:
        version = Migrate(db).run_migration()
        served.timings["migrate_s"] = round(time.perf_counter() - t, 3)
        log.info("pgstac %s migrated in %.2f s", version, served.timings["migrate_s"])
        colls = [
            rewrite_for_serving(c, p, files.root, served.asset_url)
            for p, c in files.collections.values()
        ]
        items = [
            rewrite_for_serving(i, p, files.root, served.asset_url) for p, i in files.items
        ]
        say(f"Loading {len(colls)} collections and {len(items)} items into pgstac ...")
        loader = Loader(db=db)
        loader.load_collections(iter(colls), Methods.upsert)
        conn = db.connect()
        for cid, doc in infer_queryables(items).items():
            # typed queryables: without them pgstac compares and sorts properties as text
            conn.execute(
                "SELECT upsert_queryables(%s::jsonb, %s::text[], NULL, false)",
                [json.dumps(doc), [cid]],
            )
        try:
            loader.load_items(iter(items), Methods.upsert)
        except Exception as exc:  # pypgstac raises plain Exceptions and psycopg errors
            raise CatalogError(
                f"loading the items of {files.root} into pgstac failed: {exc}. Rebuild the "
                f"catalog with `ssl4eo catalog build --out {files.root}`."
            ) from exc
    counts: dict[str, int] = {}
    for i in items:
        counts[i["collection"]] = counts.get(i["collection"], 0) + 1
    served.counts = counts


@contextlib.contextmanager
def serve_catalog(
    catalog_dir: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    asset_port: int = 0,
    workdir: str | os.PathLike | None = None,
    progress: bool = True,
    pg_bindir: str | os.PathLike | None = None,
) -> Iterator[Served]:
    """Serve ``catalog_dir`` for the duration of the ``with`` block (see the module doc)."""
    served = start_catalog_server(
        catalog_dir, host=host, port=port, asset_port=asset_port, workdir=workdir,
        progress=progress, pg_bindir=pg_bindir,
    )
    try:
        yield served
    finally:
        served.stop()


def sample_and_search(stac_url: str, out: Path, sampling: dict[str, Any] | None = None
                      ) -> dict[str, Path]:
    """``ssl4eo sample`` then ``ssl4eo search`` of the demo config (``sampling`` overriding its
    sampling section) against a served catalog, quietly: ``{"locations", "scenes"}`` parquet
    paths in ``out``. The set-up of the tests and the build / fault benchmarks."""
    from ..config import load_config
    from ..sampling import sample, write_locations
    from ..search import search_locations

    cfg = load_config("demo", overrides={"sampling": dict(sampling or {}),
                                         "search": {"stac_url": stac_url}})
    locations = write_locations(sample(cfg.sampling, progress=False),
                                Path(out) / "locations.parquet", cfg)
    scenes = Path(out) / "scenes.parquet"
    search_locations(locations, scenes, cfg, progress=False)
    return {"locations": locations, "scenes": scenes}


@contextlib.contextmanager
def served_catalog(workdir: str | os.PathLike, catalog: str | os.PathLike | None = None,
                   profile: str = "test") -> Iterator[Served]:
    """An embedded catalog served on loopback for as long as the block runs: ``catalog`` if
    given, else one built into ``workdir/catalog`` (``profile``, no real data, seed 0). The
    set-up of the build, fault and multi-machine benchmarks."""
    from .catalog import build_catalog

    workdir = Path(workdir)
    if catalog is None:
        catalog = workdir / "catalog"
        build_catalog(catalog, profile=profile, real_data=None, seed=0, progress=False)
    served = start_catalog_server(catalog, workdir=workdir / "serve", progress=False)
    try:
        yield served
    finally:
        served.stop()
