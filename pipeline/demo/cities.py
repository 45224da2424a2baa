"""Places the embedded catalog covers with synthetic scenes.

Chosen to exercise what a global pipeline meets: both hemispheres, the equator, and a city
(Halle, 11.97 E) whose surroundings straddle the UTM zone 32/33 boundary at 12 E. The demo
preset samples its locations around these cities; the synthetic generator covers each with
Sentinel-2 L2A tiles and Sentinel-1 RTC scenes.
"""

from __future__ import annotations

from typing import NamedTuple


class DemoCity(NamedTuple):
    name: str
    lon: float
    lat: float
    #: dominant land cover of the synthetic surroundings (drives the generator and the
    #: labelled probe task when EuroSAT-MS is absent)
    biome: str


DEMO_CITIES: tuple[DemoCity, ...] = (
    DemoCity("Halle", 11.970, 51.483, "temperate-cropland"),  # UTM 32/33 boundary
    DemoCity("Delhi", 77.209, 28.614, "semi-arid-urban"),
    DemoCity("Nairobi", 36.817, -1.286, "savanna"),  # just south of the equator
    DemoCity("Sao Paulo", -46.633, -23.550, "tropical-forest"),
    DemoCity("Sydney", 151.209, -33.868, "coastal"),
)

#: The calendar year the synthetic acquisitions cover: December of the year before through
#: November, so the four calendar seasons (DJF, MAM, JJA, SON) are all present, and the
#: processing-baseline 04.00 change (2022-01-25) falls inside the first season.
DEMO_YEAR = 2022
