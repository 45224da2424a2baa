"""Season windows per location.

Two rules (``seasons.rule`` in the config):

* ``shifted`` (the paper): reference dates 2020-12-21, 2021-03-20, 2021-06-21, 2021-09-22, each
  minus one shift of 0..364 days drawn per location (the same shift for its four windows);
  windows are +-15 days around the shifted dates. The shift is a pure function of
  ``(seasons.seed, sample id)`` (SplitMix64), so it is reproducible and independent of order.
* ``calendar``: the four calendar seasons of ``year``: DJF (December of ``year - 1`` through
  February), MAM, JJA, SON; the same for every location.

Windows are half-open ``[start, end)`` in UTC, returned as ``datetime64[ms]`` arrays of shape
``(n, 4)``; season index 0..3 is chronological.
"""

from __future__ import annotations

import numpy as np

from .config import SeasonsConfig

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser, vectorised over uint64."""
    with np.errstate(over="ignore"):
        z = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def shift_days(sample_ids: np.ndarray | list[str], seed: int, max_shift: int = 365) -> np.ndarray:
    """Per-location shift in days, uniform in ``0..max_shift-1``, seeded by the sample id."""
    ids = np.asarray([int(s) for s in sample_ids], dtype=np.uint64)
    with np.errstate(over="ignore"):
        key = _splitmix64(np.uint64(seed & 0xFFFFFFFFFFFFFFFF) ^ np.uint64(0x5EA5075EA5075EA5))
        h = _splitmix64(ids ^ key)
    return (h % np.uint64(max_shift)).astype(np.int64)


def season_windows(sample_ids: np.ndarray | list[str], cfg: SeasonsConfig) -> np.ndarray:
    """Windows ``(n, 4, 2)`` of ``datetime64[ms]`` (start inclusive, end exclusive)."""
    n = len(sample_ids)
    if cfg.rule == "calendar":
        y = cfg.year
        edges = np.array(
            [f"{y - 1}-12-01", f"{y}-03-01", f"{y}-06-01", f"{y}-09-01", f"{y}-12-01"],
            dtype="datetime64[ms]",
        )
        one = np.stack([edges[:-1], edges[1:]], axis=-1)  # (4, 2)
        return np.broadcast_to(one, (n, 4, 2)).copy()
    refs = np.array([d.isoformat() for d in cfg.reference_dates], dtype="datetime64[ms]")
    shift = shift_days(sample_ids, cfg.seed, cfg.max_shift_days).astype("timedelta64[D]")
    half = np.timedelta64(int(round(cfg.half_window_days * 86400 * 1000)), "ms")
    centres = refs[None, :] - shift[:, None].astype("timedelta64[ms]")  # (n, 4)
    return np.stack([centres - half, centres + half], axis=-1)
