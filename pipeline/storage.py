"""Store URLs: local paths and object storage (``s3://``, ``az://``, ``gs://``, ``https://``).

Every stage that reads or writes the Zarr store goes through :func:`open_store`, so a local
folder and a bucket follow the same code path. Remote URLs are opened with fsspec
(s3fs, adlfs, gcsfs, HTTP) as a :class:`zarr.storage.FsspecStore`; local paths as a
:class:`zarr.storage.LocalStore`.

Credentials come from the environment only, through the usual variables each client library
reads itself (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``,
``AZURE_STORAGE_ACCOUNT_NAME`` / ``AZURE_STORAGE_ACCOUNT_KEY`` / ``AZURE_STORAGE_SAS_TOKEN``
/ ``AZURE_STORAGE_CONNECTION_STRING``, ``GOOGLE_APPLICATION_CREDENTIALS``). This module adds
the few non-secret settings that those libraries do not pick up on their own (an S3-compatible
endpoint from ``AWS_ENDPOINT_URL``, the region) and never logs a secret: use :func:`redact` for
anything printed.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from .errors import StoreError

if TYPE_CHECKING:
    import fsspec
    from zarr.abc.store import Store

log = logging.getLogger(__name__)

#: URL schemes read through fsspec, and the package that provides each.
REMOTE_SCHEMES: dict[str, str] = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "az": "adlfs",
    "abfs": "adlfs",
    "abfss": "adlfs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "http": "aiohttp",
    "https": "aiohttp",
    "memory": "fsspec",
}
#: Schemes that can only be read (plain HTTP servers do not accept writes).
READ_ONLY_SCHEMES = frozenset({"http", "https"})

_SECRET_KEY = re.compile(r"(key|secret|token|password|passwd|credential|sas|sig|signature)", re.I)

Mode = Literal["r", "r+", "a", "w", "w-"]


def scheme(url: str | os.PathLike[str]) -> str:
    """The URL scheme of ``url`` (``""`` for a local path, ``file://`` included)."""
    text = os.fspath(url)
    if re.match(r"^[A-Za-z]:[\\/]", text):  # a Windows drive letter is not a scheme
        return ""
    parts = urlsplit(text)
    if parts.scheme in ("", "file"):
        return ""
    return parts.scheme.lower()


def is_remote(url: str | os.PathLike[str]) -> bool:
    """Whether ``url`` names object storage or a web server rather than a local path."""
    return scheme(url) != ""


def local_path(url: str | os.PathLike[str]) -> Path:
    """The local path of a plain path or ``file://`` URL."""
    text = os.fspath(url)
    if text.startswith("file://"):
        text = urlsplit(text).path
    return Path(text).expanduser()


def join(url: str | os.PathLike[str], *parts: str) -> str:
    """Join path components onto a local path or a URL (``s3://b/cube.zarr`` + ``S2L2A``)."""
    if not is_remote(url):
        return str(local_path(url).joinpath(*parts))
    base = os.fspath(url).rstrip("/")
    tail = "/".join(p.strip("/") for p in parts if p.strip("/"))
    return f"{base}/{tail}" if tail else base


def env_storage_options(url: str | os.PathLike[str]) -> dict[str, Any]:
    """Non-secret client settings for ``url`` taken from the environment.

    * S3: ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (MinIO, Ceph, a test server) becomes
      ``endpoint_url``; ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` becomes the client region;
      ``SSL4EO_S3_ANON=1`` reads public buckets without credentials.
    * Azure: ``AZURE_STORAGE_ACCOUNT_NAME`` becomes ``account_name`` (adlfs reads the key, SAS
      token or connection string from the environment itself).

    Secrets are left to the client libraries, which read them from the same environment.
    """
    kind = scheme(url)
    options: dict[str, Any] = {}
    if kind in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            options.setdefault("client_kwargs", {})["region_name"] = region
        if os.environ.get("SSL4EO_S3_ANON", "").lower() in ("1", "true", "yes"):
            options["anon"] = True
    elif kind in ("az", "abfs", "abfss"):
        account = os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
        if account:
            options["account_name"] = account
    return options


def storage_options_for(
    url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Environment settings for ``url`` (:func:`env_storage_options`), overridden by
    ``storage_options`` (nested ``client_kwargs`` are merged, not replaced)."""
    options = env_storage_options(url)
    for key, value in (storage_options or {}).items():
        if key == "client_kwargs" and isinstance(value, Mapping):
            options["client_kwargs"] = {**options.get("client_kwargs", {}), **value}
        else:
            options[key] = value
    return options


def redact(value: Any) -> Any:
    """A copy of a URL or options mapping safe to log: secrets and URL credentials masked."""
    if isinstance(value, Mapping):
        return {
            k: ("***" if _SECRET_KEY.search(str(k)) and v else redact(v)) for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str) and "://" in value:
        parts = urlsplit(value)
        netloc = parts.netloc
        if "@" in netloc:
            netloc = "***@" + netloc.rsplit("@", 1)[1]
        query = parts.query
        if query:
            query = "&".join(
                f"{k}=***" if _SECRET_KEY.search(k) else f"{k}={v}"
                for k, _, v in (item.partition("=") for item in query.split("&"))
            )
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    return value


def _require_backend(url: str) -> None:
    kind = scheme(url)
    if kind not in REMOTE_SCHEMES:
        raise StoreError(
            f"store URL {redact(url)!r} has the scheme {kind!r}, which this pipeline cannot "
            f"open; use a local path or one of: "
            f"{', '.join(s + '://' for s in sorted(REMOTE_SCHEMES))}"
        )
    package = REMOTE_SCHEMES[kind]
    try:
        __import__(package)
    except ImportError as exc:
        raise StoreError(
            f"store URL {redact(url)!r} needs the package {package!r}, which is not installed; "
            f"install it with `pip install {package}` (or `pip install 'ssl4eo-stac[k8s]'` "
            "for s3fs and adlfs)"
        ) from exc


def filesystem(
    url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[fsspec.AbstractFileSystem, str]:
    """A synchronous fsspec filesystem and the path inside it, for listing and deleting."""
    import fsspec

    text = os.fspath(url)
    if not is_remote(text):
        return fsspec.filesystem("file"), str(local_path(text).resolve())
    _require_backend(text)
    fs, path = fsspec.core.url_to_fs(text, **storage_options_for(text, storage_options))
    return fs, path


def open_store(
    url: str | os.PathLike[str],
    mode: Mode = "r",
    storage_options: Mapping[str, Any] | None = None,
) -> Store:
    """Open ``url`` as a Zarr v3 store object (not a group), for ``zarr.open_group(store)``,
    ``xr.open_zarr(store)`` and ``xr.Dataset.to_zarr(store)``.

    ``mode="r"`` gives a read-only store; any other mode a writable one (the group/array calls
    decide whether to create or overwrite). ``storage_options`` go to the fsspec filesystem,
    on top of the settings found in the environment (:func:`env_storage_options`).
    """
    import zarr.storage

    text = os.fspath(url)
    read_only = mode == "r"
    if not is_remote(text):
        path = local_path(text)
        if read_only and not path.exists():
            raise StoreError(
                f"store {text!r} does not exist; build it first (`ssl4eo build ...`) or check "
                "the path"
            )
        return zarr.storage.LocalStore(path, read_only=read_only)
    _require_backend(text)
    if not read_only and scheme(text) in READ_ONLY_SCHEMES:
        raise StoreError(
            f"store URL {redact(text)!r} is served over HTTP, which can only be read; write to "
            "a local path or object storage (s3://, az://, gs://) instead"
        )
    options = storage_options_for(text, storage_options)
    log.debug("opening store %s with options %s", redact(text), redact(options))
    try:
        return zarr.storage.FsspecStore.from_url(text, storage_options=options, read_only=read_only)
    except (ValueError, TypeError) as exc:
        raise StoreError(
            f"cannot open store URL {redact(text)!r} with options {redact(options)}: {exc}"
        ) from exc


def store_exists(
    url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> bool:
    """Whether a Zarr store (a root ``zarr.json``) exists at ``url``."""
    fs, path = filesystem(url, storage_options)
    return bool(fs.exists(f"{path.rstrip('/')}/zarr.json"))


def remove_store(
    url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None
) -> None:
    """Delete the store at ``url`` and everything under it (no error when absent)."""
    fs, path = filesystem(url, storage_options)
    if fs.exists(path):
        fs.rm(path, recursive=True)


# --------------------------------------------------------------------------- tables that travel
#: What to set so that a URL of each scheme can be read, for error messages.
CREDENTIAL_HELP: dict[str, str] = {
    "s3": "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN for temporary "
          "credentials, AWS_ENDPOINT_URL for an S3-compatible server such as MinIO, "
          "SSL4EO_S3_ANON=1 for a public bucket)",
    "az": "AZURE_STORAGE_ACCOUNT_NAME with AZURE_STORAGE_ACCOUNT_KEY, AZURE_STORAGE_SAS_TOKEN or "
          "AZURE_STORAGE_CONNECTION_STRING",
    "gs": "GOOGLE_APPLICATION_CREDENTIALS (a service-account key file)",
    "http": "nothing: give a URL the server answers without credentials (a pre-signed URL works;"
            " its query is never printed)",
}
CREDENTIAL_HELP.update({"s3a": CREDENTIAL_HELP["s3"], "abfs": CREDENTIAL_HELP["az"],
                        "abfss": CREDENTIAL_HELP["az"], "gcs": CREDENTIAL_HELP["gs"],
                        "https": CREDENTIAL_HELP["http"]})


def credential_help(url: str | os.PathLike[str]) -> str:
    """The environment variables a reader or writer of ``url`` needs (empty for local paths)."""
    return CREDENTIAL_HELP.get(scheme(url), "")


def _is_auth_error(exc: BaseException) -> bool:
    """Whether ``exc`` says "no or wrong credentials" (botocore, adlfs, gcsfs, HTTP 401/403)."""
    names = {type(e).__name__ for e in _chain(exc)}
    if names & {"NoCredentialsError", "PartialCredentialsError", "ClientAuthenticationError",
                "PermissionError", "CredentialRetrievalError", "RefreshError"}:
        return True
    text = " ".join(str(e) for e in _chain(exc))
    return bool(re.search(r"\b(401|403)\b|AccessDenied|Forbidden|InvalidAccessKeyId|"
                          r"SignatureDoesNotMatch|credentials", text, re.I))


def _chain(exc: BaseException) -> list[BaseException]:
    out, seen = [], set()
    while exc is not None and id(exc) not in seen:
        out.append(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return out


def input_error(url: str | os.PathLike[str], what: str, exc: BaseException,
                made_by: str = "") -> StoreError:
    """A user-facing error for an input (a table) at ``url`` that cannot be read: it names the
    URL (redacted), says whether it is missing or refused, and what to set or run."""
    shown = redact(os.fspath(url))
    fix = f"; create it with `{made_by}`" if made_by else ""
    if isinstance(exc, FileNotFoundError) or "NoSuchKey" in str(exc) or "NoSuchBucket" in str(exc):
        where = (f" (check the URL; reading it needs {credential_help(url)})"
                 if is_remote(url) else "")
        return StoreError(f"{what} {shown} does not exist{fix}{where}")
    if is_remote(url) and _is_auth_error(exc):
        return StoreError(
            f"{what} {shown} cannot be read with the credentials in this environment "
            f"({type(exc).__name__}: {redact(str(exc))}); set {credential_help(url)}")
    return StoreError(f"{what} {shown} cannot be read ({type(exc).__name__}: "
                      f"{redact(str(exc))}){fix}")


def arrow_filesystem(url: str | os.PathLike[str]):  # -> (pyarrow.fs.FileSystem, str)
    """A pyarrow filesystem and the path in it, for ``pq.ParquetFile(path, filesystem=fs)`` and
    friends: a local path as it is, a URL through fsspec (range reads, so a build task reads
    only the row groups it needs of a table in a bucket)."""
    import pyarrow.fs as pafs

    if not is_remote(url):
        return pafs.LocalFileSystem(), str(local_path(url).resolve())
    fs, path = filesystem(url)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def input_info(url: str | os.PathLike[str], what: str, made_by: str = "") -> dict[str, Any]:
    """Size (and ETag, where the server gives one) of the file at ``url``; a
    :class:`StoreError` naming the URL and the variables to set when it is missing or refused."""
    if not is_remote(url):
        path = local_path(url)
        if not path.is_file():
            raise input_error(url, what, FileNotFoundError(str(path)), made_by)
        return {"size": path.stat().st_size}
    try:
        fs, path = filesystem(url)
        info = fs.info(path)
    except StoreError:
        raise
    except Exception as exc:  # noqa: BLE001 - every client raises its own types
        raise input_error(url, what, exc, made_by) from exc
    if info.get("type") == "directory":
        fix = f"; create it with `{made_by}`" if made_by else ""
        raise StoreError(f"{what} {redact(os.fspath(url))} is a folder, not a file{fix}")
    return {"size": int(info.get("size") or 0), "etag": info.get("ETag") or info.get("etag")}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a local file (read in 1 MiB blocks). Remote tables are identified by their
    ETag and size (:func:`input_info`) instead of being downloaded for a hash."""
    import hashlib

    h = hashlib.sha256()
    with open(local_path(path), "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def upload_file(local: str | os.PathLike[str], url: str) -> str:
    """Copy a local file to ``url`` (an object PUT is atomic: readers see all of it or none);
    a local destination is written beside and renamed. Returns ``url``."""
    import shutil

    if not is_remote(url):
        dest = local_path(url)
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(dest.name + ".partial")
        shutil.copyfile(local, tmp)
        os.replace(tmp, dest)
        return str(dest)
    if scheme(url) in READ_ONLY_SCHEMES:
        raise StoreError(f"{redact(url)} is served over HTTP, which can only be read; publish "
                         "to object storage (s3://, az://, gs://) or a shared folder instead")
    fs, path = filesystem(url)
    try:
        fs.put_file(os.fspath(local), path)
    except Exception as exc:  # noqa: BLE001
        if _is_auth_error(exc):
            raise StoreError(f"cannot write {redact(url)} with the credentials in this "
                             f"environment ({type(exc).__name__}); set {credential_help(url)}"
                             ) from exc
        raise StoreError(f"cannot write {redact(url)}: {type(exc).__name__}: "
                         f"{redact(str(exc))}") from exc
    return url


def exists(url: str | os.PathLike[str]) -> bool:
    """Whether a file exists at a local path or URL (False where it cannot be looked up)."""
    if not is_remote(url):
        return local_path(url).exists()
    fs, path = filesystem(url)
    return bool(fs.exists(path))
