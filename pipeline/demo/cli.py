"""Sub-commands of the embedded catalog: ``ssl4eo catalog build|serve`` and ``ssl4eo demo``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from ..errors import UserError


class _Stop(BaseException):
    """Raised by the SIGTERM/SIGINT handler to unwind and stop the servers (a BaseException,
    so that no ``except Exception`` on the way swallows it)."""


def default_real_data() -> Path | None:
    """Where the real scenes are by default: ``$SSL4EO_REAL_DATA``, else ``../shared/data/real``
    next to the source tree or the working directory; ``None`` when none exists."""
    env = os.environ.get("SSL4EO_REAL_DATA")
    if env:
        return Path(env)
    for base in (Path(__file__).resolve().parents[2], Path.cwd()):
        cand = (base / ".." / "shared" / "data" / "real").resolve()
        if cand.is_dir():
            return cand
    return None


def _real_data_arg(args: argparse.Namespace) -> Path | None:
    if getattr(args, "no_real_data", False):
        return None
    if getattr(args, "real_data", None):
        p = Path(args.real_data).expanduser()
        if not p.is_dir():
            raise UserError(
                f"--real-data {p} is not a directory; name the folder holding the real scenes "
                "(e.g. ../shared/data/real) or pass --no-real-data for synthetic scenes only."
            )
        return p
    return default_real_data()


def _add_real_data_options(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--real-data", metavar="DIR",
        help="folder with the real scenes to include (default: $SSL4EO_REAL_DATA or "
        "../shared/data/real when present)",
    )
    g.add_argument(
        "--no-real-data", action="store_true",
        help="synthetic scenes only, even when the real scenes are present",
    )


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Add ``catalog`` (``build``, ``serve``, ``export-geoparquet``) and ``demo``."""
    cat = sub.add_parser(
        "catalog",
        help="build or serve the embedded STAC catalog (local COGs + items)",
        description="The embedded catalog: COGs and STAC items on disk, served on loopback by "
        "PostgreSQL + pgstac + stac-fastapi-pgstac and a Range-capable asset server.",
    )
    csub = cat.add_subparsers(title="catalog commands", metavar="COMMAND")
    cat.set_defaults(func=lambda args: (cat.print_help(), 2)[1])

    b = csub.add_parser(
        "build", help="write the embedded catalog (COGs and STAC items) to a directory",
        description="Write Sentinel-2 L2A and Sentinel-1 RTC COGs and STAC items shaped like "
        "Planetary Computer's: the real scenes when present, plus deterministic synthetic ones.",
    )
    b.add_argument("--out", required=True, metavar="DIR", help="directory to write the catalog to")
    b.add_argument(
        "--profile", choices=("demo", "test"), default="demo",
        help="size of the synthetic part: 'demo' (the full demo) or 'test' (small, for tests)",
    )
    _add_real_data_options(b)
    b.add_argument("--seed", type=int, default=0, help="seed of the synthetic generator")
    b.set_defaults(func=_cmd_build)

    s = csub.add_parser(
        "serve", help="serve a built catalog as a STAC API on loopback until interrupted",
        description="Start PostgreSQL (own data directory), load the catalog with pypgstac, serve "
        "stac-fastapi-pgstac and the COGs (HTTP Range) on loopback; print the URLs; stop "
        "everything on Ctrl-C or SIGTERM.",
    )
    s.add_argument("--catalog", required=True, metavar="DIR",
                   help="catalog directory written by `ssl4eo catalog build`")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, loopback only)")
    s.add_argument("--port", type=int, default=8000,
                   help="STAC API port (default 8000; 0 picks a free port)")
    s.add_argument("--asset-port", type=int, default=0,
                   help="asset (COG) server port (default 0: pick a free port)")
    s.add_argument("--workdir", metavar="DIR", default=None,
                   help="directory for the database and logs (default: a temporary directory, "
                   "removed on exit)")
    s.add_argument("--quiet", action="store_true", help="no start-up progress messages")
    s.set_defaults(func=_cmd_serve)

    g = csub.add_parser(
        "export-geoparquet",
        help="write the catalog's items as a STAC GeoParquet snapshot (for search --items)",
        description="Write every item of a built catalog into one STAC GeoParquet file with "
        "stac-geoparquet, hrefs on the asset server as the served API gives them, so that "
        "`ssl4eo search --items FILE` makes the same choice as the API search.",
    )
    g.add_argument("--catalog", required=True, metavar="DIR",
                   help="catalog directory written by `ssl4eo catalog build`")
    g.add_argument("--out", required=True, metavar="FILE", help="GeoParquet file to write")
    g.add_argument("--asset-url", required=True, metavar="URL",
                   help="the asset server's URL (printed by `ssl4eo catalog serve` as "
                   "'Assets:'), prefixed to the items' relative hrefs")
    g.set_defaults(func=_cmd_export)

    d = sub.add_parser(
        "demo", help="run the demo end to end on the embedded catalog (no internet needed)",
        description="Build the embedded catalog (or reuse it), serve it, and run the pipeline's "
        "stages on it; writes OUT/summary.json.",
    )
    d.add_argument("--out", default=os.environ.get("DEMO_DIR", "demo-output"), metavar="DIR",
                   help="output directory (default: $DEMO_DIR or demo-output)")
    _add_real_data_options(d)
    d.add_argument("--seed", type=int, default=0, help="seed of the synthetic generator")
    d.add_argument("--rebuild", action="store_true",
                   help="rebuild the catalog even when OUT/catalog is up to date")
    d.set_defaults(func=_cmd_demo)


def _cmd_build(args: argparse.Namespace) -> int:
    from .catalog import build_catalog

    out = Path(args.out).expanduser()
    t = time.perf_counter()
    result = build_catalog(
        out, profile=args.profile, real_data=_real_data_arg(args), seed=args.seed, progress=True
    )
    n = result.get("items") if isinstance(result, dict) else None
    print(f"Catalog written to {out} in {time.perf_counter() - t:.1f} s"
          + (f" ({n} items)" if n is not None else ""))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .serve import export_geoparquet

    counts = export_geoparquet(args.catalog, args.out, args.asset_url)
    print(f"{sum(counts.values())} items ({', '.join(f'{n} {c}' for c, n in sorted(counts.items()))})"
          f" -> {args.out}")
    return 0


def install_stop_handlers() -> dict[int, object]:
    """Make SIGTERM and SIGINT raise :class:`_Stop`; returns the previous handlers."""

    def handler(signum, frame):  # noqa: ARG001
        raise _Stop(signal.Signals(signum).name)

    return {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}


def _cmd_serve(args: argparse.Namespace) -> int:
    from .serve import start_catalog_server

    old = install_stop_handlers()
    served = None
    try:
        served = start_catalog_server(
            args.catalog, host=args.host, port=args.port, asset_port=args.asset_port,
            workdir=args.workdir, progress=not args.quiet,
        )
        counts = ", ".join(f"{n} {c}" for c, n in sorted(served.counts.items()))
        print(f"STAC API: {served.stac_url}", flush=True)
        print(f"Assets:   {served.asset_url}", flush=True)
        print(f"Serving {counts} (started in {served.timings.get('total_s', 0):.1f} s). "
              "Press Ctrl-C to stop.", flush=True)
        while True:
            time.sleep(1.0)
            served.check_alive()
    except _Stop as sig:
        print(f"Stopping ({sig}) ...", file=sys.stderr, flush=True)
        return 0
    finally:
        # a second signal while stopping must not leave processes behind
        for s in old:
            signal.signal(s, signal.SIG_IGN)
        if served is not None:
            served.stop()
        for s, h in old.items():
            signal.signal(s, h)  # type: ignore[arg-type]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .run import run_demo

    old = install_stop_handlers()
    try:
        run_demo(Path(args.out).expanduser(), real_data=_real_data_arg(args), seed=args.seed,
                 rebuild=args.rebuild)
    except _Stop as sig:
        print(f"ssl4eo demo: stopped ({sig})", file=sys.stderr)
        return 130
    finally:
        for s, h in old.items():
            signal.signal(s, h)  # type: ignore[arg-type]
    return 0
