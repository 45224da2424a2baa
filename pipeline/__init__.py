"""SSL4EO-S12 on open infrastructure: STAC search, stackstac cubes, sharded Zarr, PyTorch."""

__version__ = "0.1.0"
