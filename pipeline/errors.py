"""Errors a user can act on.

Raise :class:`UserError` (or a subclass) for bad input and environment problems: the CLI prints
its message, without a traceback, and exits with status 2. The message names the input, says
what was wrong and what to do.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by input or environment, with a message that says what to do."""


class ConfigError(UserError):
    """A configuration file, preset or option is invalid."""


class CatalogError(UserError):
    """The embedded catalog is missing, damaged or cannot be served."""


class SearchError(UserError):
    """A STAC search failed for good (after retries) or was asked for something impossible."""


class StoreError(UserError):
    """The Zarr store is missing, incompatible or cannot be written."""
