"""Settings: presets, season windows, precedence, and every kind of bad input.

The ``ssl4eo-s12`` numbers are the paper's, as read from zhu-xlab/SSL4EO-S12
``ssl4eo_s12_downloader.py`` (docs/reference/ssl4eo_anchors.md): reference dates 2020-12-21,
2021-03-20, 2021-06-21, 2021-09-22 minus one shift of 0..364 days per location, +-15-day
windows, the most recent scene with cloud cover below 20 %, 10,000 cities, sigma 50 km.
"""

from __future__ import annotations

import datetime as dt
import http.server
import socket
import threading
import time

import numpy as np
import pytest

from pipeline.cli import main
from pipeline.config import Config, available_presets, load_config
from pipeline.errors import ConfigError, SearchError, UserError
from pipeline.layout import sample_id
from pipeline.providers import get_provider, provider_from_config
from pipeline.sampling import locations_from_points, table_metadata, write_locations
from pipeline.search import SceneSearch, check_reachable
from pipeline.seasons import season_windows, shift_days

PAPER_DATES = [dt.date(2020, 12, 21), dt.date(2021, 3, 20), dt.date(2021, 6, 21),
               dt.date(2021, 9, 22)]
DAY = np.timedelta64(1, "D")


def _d(s: str) -> np.datetime64:
    return np.datetime64(s, "ms")


# --------------------------------------------------------------------------------- presets
def test_presets_available():
    assert {"ssl4eo-s12", "calendar", "demo"} <= set(available_presets())


def test_ssl4eo_s12_preset_is_the_paper():
    cfg = load_config("ssl4eo-s12")
    assert cfg == load_config()  # the default preset
    s, w, q = cfg.sampling, cfg.seasons, cfg.search
    assert (s.num_locations, s.num_cities, s.sigma_km, s.clip_km, s.cities) == (
        250_000, 10_000, 50.0, None, "world")
    assert w.rule == "shifted"
    assert w.reference_dates == PAPER_DATES
    assert w.half_window_days == 15  # get_period(date - delta, days=30): +-15 days
    assert w.max_shift_days == 365  # np.random.randint(365): 0..364
    assert w.choice == "most_recent"  # sort('system:time_start', False).first()
    assert w.max_cloud_cover == 20.0  # --cloud_pct 20, strictly below
    assert q.provider == "planetary-computer" and q.stac_url is None
    assert q.modalities == ["S2L2A", "S1RTC"]
    assert sorted(q.s1_orbit_states) == ["ascending", "descending"]  # both mixed in v1
    assert q.drop_incomplete is False


def test_calendar_and_demo_presets():
    cal = load_config("calendar")
    assert cal.preset == "calendar"
    assert (cal.seasons.rule, cal.seasons.choice, cal.seasons.max_cloud_cover) == (
        "calendar", "least_cloudy", 20.0)
    assert cal.search.provider == "planetary-computer"
    demo = load_config("demo")
    assert demo.search.provider == "local" and demo.search.stac_url is None
    assert demo.sampling.cities == "demo" and demo.sampling.clip_km == 4.0
    assert demo.seasons.rule == "calendar"


def test_config_round_trips_through_its_json():
    cfg = load_config("demo", overrides={"search": {"stac_url": "http://127.0.0.1:1"}})
    again = Config.model_validate(cfg.to_dict())
    assert again == cfg
    assert cfg.to_dict()["seasons"]["reference_dates"][0] == "2020-12-21"


# ------------------------------------------------------------------------- season windows
def test_shifted_windows_are_the_paper_rule_and_reproducible():
    cfg = load_config("ssl4eo-s12").seasons
    ids = [sample_id(i) for i in range(5000)]
    w = season_windows(ids, cfg)
    assert w.shape == (5000, 4, 2) and w.dtype == np.dtype("datetime64[ms]")
    assert ((w[:, :, 1] - w[:, :, 0]) == 30 * DAY).all()  # +-15 days, half-open
    centre = w[:, :, 0] + 15 * DAY
    refs = np.array([d.isoformat() for d in PAPER_DATES], dtype="datetime64[ms]")
    shift = (refs[None, :] - centre) / DAY
    # one shift per location, the same for its four windows, whole days in 0..364
    assert (shift == shift[:, :1]).all()
    s = shift[:, 0]
    assert (s == np.round(s)).all() and s.min() >= 0 and s.max() <= 364
    np.testing.assert_array_equal(s.astype(int), shift_days(ids, cfg.seed, 365))
    # roughly uniform over the year
    assert s.min() <= 5 and s.max() >= 359
    counts = np.histogram(s, bins=[0, 91, 182, 273, 365])[0] / len(s)
    assert np.abs(counts - 0.25).max() < 0.03, counts
    # chronological, ~3 months apart, all within the paper's span
    assert (np.diff(w[:, :, 0], axis=1) > 80 * DAY).all()
    assert w.min() >= _d("2019-12-06") and w.max() <= _d("2021-10-08")
    # a location with shift 0 gets exactly the reference windows
    zero = np.flatnonzero(s == 0)
    assert zero.size > 0
    np.testing.assert_array_equal(w[zero[0], :, 0], refs - 15 * DAY)

    # a pure function of (seed, id): order and batch do not matter
    rev = season_windows(ids[::-1], cfg)
    np.testing.assert_array_equal(rev[::-1], w)
    np.testing.assert_array_equal(season_windows([ids[1234]], cfg)[0], w[1234])
    # another seed shifts (almost) every location differently
    other = load_config("ssl4eo-s12", overrides={"seasons": {"seed": 43}}).seasons
    assert (shift_days(ids, other.seed) != s).mean() > 0.99


def test_shifted_window_parameters_from_config():
    cfg = load_config("ssl4eo-s12", overrides={"seasons": {
        "max_shift_days": 10, "half_window_days": 7,
        "reference_dates": ["2022-01-10", "2022-04-10", "2022-07-10", "2022-10-10"]}}).seasons
    ids = [sample_id(i) for i in range(500)]
    w = season_windows(ids, cfg)
    assert ((w[:, :, 1] - w[:, :, 0]) == 14 * DAY).all()
    shift = (_d("2022-01-10") - (w[:, 0, 0] + 7 * DAY)) / DAY
    assert set(shift.astype(int)) == set(range(10))


def test_calendar_windows_djf_from_december_before():
    cfg = load_config("calendar").seasons
    assert cfg.year == 2022
    w = season_windows(["0000000", "0000001", "9999999"], cfg)
    want = np.array([["2021-12-01", "2022-03-01"], ["2022-03-01", "2022-06-01"],
                     ["2022-06-01", "2022-09-01"], ["2022-09-01", "2022-12-01"]],
                    dtype="datetime64[ms]")
    for row in w:
        np.testing.assert_array_equal(row, want)
    leap = load_config("calendar", overrides={"seasons": {"year": 2020}}).seasons
    w = season_windows(["0000000"], leap)[0]
    assert w[0, 0] == _d("2019-12-01") and w[0, 1] == _d("2020-03-01")
    assert w[0, 0] <= _d("2020-02-29T23:59:59") < w[0, 1]  # 29 Feb is in DJF, 1 Mar is not
    assert not w[0, 0] <= _d("2020-03-01") < w[0, 1]


# ------------------------------------------------------------------------------ precedence
def test_precedence_flag_over_file_over_preset(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text(
        "preset: demo\n"
        "sampling: {num_locations: 100, seed: 7, clip_km: null}\n"
        "seasons: {max_cloud_cover: 30}\n"
        "search: {stac_url: 'http://127.0.0.1:8081'}\n"
        "cube: {resampling: bilinear}\n"
    )
    cfg = load_config(path=f, overrides={"sampling": {"num_locations": 7, "sigma_km": None}})
    assert cfg.preset == "demo"
    assert cfg.sampling.num_locations == 7  # flag
    assert cfg.sampling.seed == 7  # file
    assert cfg.sampling.clip_km is None  # file sets null over the preset's 4.0
    assert cfg.sampling.sigma_km == 2.0  # preset (an unset flag does not erase it)
    assert cfg.seasons.max_cloud_cover == 30  # file
    assert cfg.seasons.rule == "calendar"  # preset
    assert cfg.search.stac_url == "http://127.0.0.1:8081"
    assert cfg.extra_sections == {"cube": {"resampling": "bilinear"}}  # other stages' sections
    # an explicit preset beats the file's preset key; the file still beats the preset
    cal = load_config("ssl4eo-s12", path=f)
    assert cal.preset == "ssl4eo-s12" and cal.seasons.rule == "shifted"
    assert cal.sampling.num_locations == 100 and cal.sampling.sigma_km == 50.0


def test_precedence_through_the_cli(tmp_path):
    f = tmp_path / "my.yaml"
    f.write_text("preset: demo\nsampling: {num_locations: 9, seed: 3}\n")
    out = tmp_path / "loc.parquet"
    assert main(["sample", "--config", str(f), "--seed", "5", "--out", str(out),
                 "--no-progress"]) == 0
    recorded = table_metadata(out)["config"]
    assert recorded["preset"] == "demo"
    assert recorded["sampling"]["num_locations"] == 9
    assert recorded["sampling"]["seed"] == 5
    assert recorded["sampling"]["sigma_km"] == 2.0


# ------------------------------------------------------------------------------ bad input
def test_malformed_or_missing_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling: {num_locations: 10\nseasons: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml' is not valid YAML"):
        load_config(path=bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections, got list"):
        load_config(path=lst)
    with pytest.raises(ConfigError, match="cannot read config file .*nope.yaml"):
        load_config(path=tmp_path / "nope.yaml")


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown preset 'ssl4eo'.*calendar, demo, ssl4eo-s12"):
        load_config("ssl4eo")


@pytest.mark.parametrize("over, where", [
    ({"sampling": {"sigma": 5}}, "sampling.sigma: Extra inputs are not permitted"),
    ({"seasons": {"windows": 4}}, "seasons.windows"),
    ({"search": {"collection": "x"}}, "search.collection"),
])
def test_unknown_keys(tmp_path, over, where):
    with pytest.raises(ConfigError, match=where):
        load_config("ssl4eo-s12", overrides=over)
    import yaml

    f = tmp_path / "c.yaml"
    f.write_text(yaml.safe_dump(over))
    with pytest.raises(ConfigError, match=rf"config file .*c.yaml.*{where.split(':')[0]}"):
        load_config(path=f)


@pytest.mark.parametrize("dates, message", [
    (["2021-09-22", "2021-06-21", "2021-03-20", "2020-12-21"], "strictly increasing"),
    (["2021-03-20", "2021-03-20", "2021-06-21", "2021-09-22"], "strictly increasing"),
    (["2020-12-21", "2021-02-30", "2021-06-21", "2021-09-22"], "reference_dates.1"),
    (["2020-12-21", "not a date", "2021-06-21", "2021-09-22"], "reference_dates.1"),
    (["2020-12-21", "2021-03-20", "2021-06-21"], "exactly 4 dates, got 3"),
    (["2020-01-01", "2020-06-01", "2020-09-01", "2021-01-02"], "within one year"),
])
def test_reversed_or_invalid_dates(dates, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={"seasons": {"reference_dates": dates}})


@pytest.mark.parametrize("over, message", [
    ({"year": 2014}, "seasons.year"),
    ({"half_window_days": 0}, "seasons.half_window_days"),
    ({"half_window_days": 200}, "seasons.half_window_days"),
    ({"max_shift_days": 0}, "seasons.max_shift_days"),
    ({"rule": "monthly"}, "seasons.rule"),
    ({"choice": "least_recent"}, "seasons.choice"),
])
def test_other_bad_season_settings(over, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides={"seasons": over})


@pytest.mark.parametrize("cloud", [-1, 0, 100.5, 150])
def test_cloud_cover_out_of_range(cloud):
    with pytest.raises(ConfigError, match=rf"max_cloud_cover={float(cloud):g}.* out of range"):
        load_config(overrides={"seasons": {"max_cloud_cover": cloud}})


def test_cloud_cover_bounds_accepted():
    assert load_config(overrides={"seasons": {"max_cloud_cover": 100}}).seasons.max_cloud_cover \
        == 100
    assert load_config(overrides={"seasons": {"max_cloud_cover": 0.5}}).seasons.max_cloud_cover \
        == 0.5


def test_unknown_provider():
    cfg = load_config(overrides={"search": {"provider": "google-earth-engine"}})
    with pytest.raises(ConfigError, match="unknown provider 'google-earth-engine'.*"
                                          "planetary-computer, earth-search, local"):
        provider_from_config(cfg.search)
    with pytest.raises(ConfigError, match="unknown provider"):
        SceneSearch(cfg)


def test_unknown_modality_or_collection_for_provider():
    with pytest.raises(ConfigError, match=r"unknown modalities \['S3OLCI'\]"):
        load_config(overrides={"search": {"modalities": ["S2L2A", "S3OLCI"]}})
    # Earth Search has no Sentinel-1 RTC; Planetary Computer has no S2 L1C
    es = load_config(overrides={"search": {"provider": "earth-search"}})
    with pytest.raises(ConfigError, match="'earth-search' has no collection for modality 'S1RTC'"):
        SceneSearch(es)
    pc = load_config(overrides={"search": {"modalities": ["S2L1C"]}})
    with pytest.raises(ConfigError, match="'planetary-computer' has no collection for .*'S2L1C'"):
        SceneSearch(pc)
    ok = load_config(overrides={"search": {"provider": "earth-search",
                                           "modalities": ["S2L2A", "S2L1C"]}})
    prov = SceneSearch(ok).provider
    assert prov.collection("S2L1C") == "sentinel-2-l1c"
    assert prov.asset_key("S2L2A", "B04") == "red"
    with pytest.raises(ConfigError, match="band 'B10' is not a S2L2A band"):
        prov.asset_key("S2L2A", "B10")
    # the local catalog needs its URL
    with pytest.raises(ConfigError, match="provider 'local' needs the URL"):
        SceneSearch(load_config("demo"))
    assert get_provider("planetary-computer").collection("S1RTC") == "sentinel-1-rtc"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_api_fails_fast_through_the_cli(tmp_path, capsys):
    locs = tmp_path / "loc.parquet"
    write_locations(locations_from_points([12.0], [51.5]), locs, None)
    out = tmp_path / "scenes.parquet"
    url = f"http://127.0.0.1:{_closed_port()}"
    t = time.perf_counter()
    rc = main(["search", "--preset", "demo", "--stac-url", url, "--locations", str(locs),
               "--out", str(out), "--no-progress"])
    assert time.perf_counter() - t < 5
    assert rc == 2
    err = capsys.readouterr().err
    assert f"the STAC API at '{url}' is unreachable" in err and "--stac-url" in err
    assert not out.exists() and not (tmp_path / "scenes.parquet.partial").exists()


def test_url_that_is_not_a_stac_api():
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/not-stac"
        t = time.perf_counter()
        with pytest.raises(SearchError, match="answered HTTP 404 on its landing page") as exc:
            check_reachable(url, timeout_s=2)
        assert time.perf_counter() - t < 5
        assert isinstance(exc.value, UserError)
    finally:
        server.shutdown()
        server.server_close()


def test_misspelt_section_is_an_error(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("preset: demo\nsampeling:\n  num_locations: 3\n")
    with pytest.raises(ConfigError, match=r"unknown section\(s\) \['sampeling'\].*sampling"):
        load_config(path=f)
