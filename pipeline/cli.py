"""``ssl4eo``: the command line. One sub-command per stage; each reads and writes files.

Each stage module exposes ``add_commands(subparsers)``, which adds its sub-commands and sets
``func`` on them. Heavy imports happen inside the command functions so that ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from . import __version__
from .errors import UserError

#: Modules that contribute sub-commands, in the order ``--help`` lists them.
COMMAND_MODULES = (
    "pipeline.demo.cli",
    "pipeline.sampling",
    "pipeline.search",
    "pipeline.runner",
    "pipeline.export",
    "pipeline.k8s",
    "pipeline.train.cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl4eo",
        description=(
            "Build SSL4EO-S12-style self-supervised datasets from STAC APIs (Planetary Computer "
            "by default, or the embedded local catalog) into one sharded Zarr store, and "
            "pretrain on it."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0,
        help="more log output (-v info, -vv debug)",
    )
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).add_commands(sub)
    return parser


def _quiet_dask(record: logging.LogRecord) -> bool:
    """Drop Dask's (``distributed.*``) records below WARNING."""
    return record.levelno >= logging.WARNING or not record.name.startswith("distributed")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = {0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # Dask sets its own loggers to INFO: a local cluster's start and stop would print 30
        # lines between the progress bars. Its warnings and errors still show.
        for handler in logging.getLogger().handlers:
            handler.addFilter(_quiet_dask)
    if not hasattr(args, "func"):
        parser.print_help()
        return 2
    try:
        result = args.func(args)
    except UserError as exc:
        print(f"ssl4eo: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ssl4eo: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
