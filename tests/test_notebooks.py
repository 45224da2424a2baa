"""The notebooks run top to bottom on a real store and a real STAC API, and are committed clean.

Each notebook is executed in memory with nbclient, in a kernel running this interpreter (so the
kernel sees the same environment and the installed package), with ``notebooks/`` as the working
directory, and is never saved: executing it writes nothing into the repository. Inputs come
through the environment variables the notebooks document:

* ``explore_cube.ipynb``: ``SSL4EO_STORE`` = the ``clean_store`` fixture (a store built by the
  pipeline from the served test catalog);
* ``search_one_location.ipynb``: ``SSL4EO_STAC_URL`` = the served test catalog, ``SSL4EO_LON`` /
  ``SSL4EO_LAT`` = a test location whose first season has an S2 scene in the pipeline's scenes
  table (the notebook's search must choose that same scene).

Cells tagged ``figure`` must each show a figure (an ``image/png`` output).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
NOTEBOOK_FILES = ("explore_cube.ipynb", "search_one_location.ipynb")

# ------------------------------------------------------------------------------ committed state
@pytest.mark.parametrize("name", NOTEBOOK_FILES)
def test_committed_without_outputs(name: str) -> None:
    path = NOTEBOOKS / name
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cells"
    stale = [k for k, c in enumerate(nb.cells) if c.cell_type == "code" and c.outputs]
    counted = [k for k, c in enumerate(nb.cells)
               if c.cell_type == "code" and c.execution_count is not None]
    assert not stale, f"{name}: cells {stale} carry outputs; clear them before committing"
    assert not counted, f"{name}: cells {counted} carry execution counts; clear them"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    assert "widgets" not in nb.metadata, f"{name} carries widget state"
    assert any(c.cell_type == "markdown" for c in nb.cells)


# ------------------------------------------------------------------------------------ execution
@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory: pytest.TempPathFactory):
    """A ``python3`` kernelspec that runs this interpreter, found first through JUPYTER_PATH."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test interpreter)",
        "language": "python",
    }))
    return {
        "JUPYTER_PATH": str(root),
        "JUPYTER_RUNTIME_DIR": str(root / "runtime"),
        "JUPYTER_DATA_DIR": str(root / "data"),
        "IPYTHONDIR": str(root / "ipython"),
        "MPLCONFIGDIR": str(root / "matplotlib"),
    }


def _snapshot(directory: Path) -> dict[str, float]:
    return {str(p.relative_to(directory)): p.stat().st_mtime
            for p in directory.rglob("*")} if directory.exists() else {}


def _execute(name: str, env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    from nbclient import NotebookClient

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend draws PNGs
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    before = _snapshot(REPO / "notebooks")
    client = NotebookClient(
        nb, timeout=600, kernel_name="python3", allow_errors=False,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    client.execute()  # raises CellExecutionError naming the cell on the first error
    assert _snapshot(REPO / "notebooks") == before, "executing the notebook wrote files"
    return nb


def _check_cells(nb, name: str) -> int:
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.output_type == "error"]
    assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code), f"{name}: a cell did not run"
    missing = [
        k for k, c in enumerate(nb.cells)
        if "figure" in c.metadata.get("tags", [])
        and not any("image/png" in o.get("data", {}) for o in c.outputs)
    ]
    assert not missing, f"{name}: figure cells {missing} produced no image"
    return sum(1 for c in code for o in c.outputs if "image/png" in o.get("data", {}))


def _text(nb) -> str:
    out = []
    for c in nb.cells:
        for o in c.get("outputs", []):
            if o.output_type == "stream":
                out.append(o.text)
            elif "text/plain" in o.get("data", {}):
                out.append(o["data"]["text/plain"])
    return "\n".join(out)


def test_explore_cube_runs_on_built_store(clean_store: Path, kernel_env, monkeypatch) -> None:
    import zarr

    nb = _execute("explore_cube.ipynb", {**kernel_env, "SSL4EO_STORE": str(clean_store)},
                  monkeypatch)
    images = _check_cells(nb, "explore_cube.ipynb")
    assert images >= 6, f"expected at least 6 figures, got {images}"
    text = _text(nb)
    assert f"store: {clean_store}" in text
    status = zarr.open_group(str(clean_store), mode="r")["status"][:]
    counts = dict(re.findall(r"^(pending|complete|failed)\s+(\d+)\s*$", text, re.M))
    assert counts.get("complete") == str(int((status == 1).sum())), counts
    assert "<xarray.Dataset>" in text and "bands" in text


def test_explore_cube_names_missing_store(tmp_path: Path, kernel_env, monkeypatch) -> None:
    from nbclient.exceptions import CellExecutionError

    with pytest.raises(CellExecutionError, match="make demo"):
        _execute("explore_cube.ipynb",
                 {**kernel_env, "SSL4EO_STORE": str(tmp_path / "absent.zarr")}, monkeypatch)


def test_search_one_location_runs_on_local_api(stac_api, demo_tables, kernel_env,
                                               monkeypatch) -> None:
    import pandas as pd

    # a test location whose first season has an S2 scene in the pipeline's own scenes table
    scenes = pd.read_parquet(demo_tables["scenes"])
    ok = scenes[(scenes["modality"] == "S2L2A") & (scenes["season"] == 0)
                & (scenes["status"] == "ok")]
    assert len(ok), "the test catalog has no S2 scene in season 0 for any test location"
    row = ok.iloc[0]
    loc = pd.read_parquet(demo_tables["locations"]).set_index("sample").loc[row["sample"]]
    env = {**kernel_env, "SSL4EO_STAC_URL": stac_api.stac_url,
           "SSL4EO_LON": repr(float(loc["lon"])), "SSL4EO_LAT": repr(float(loc["lat"]))}
    nb = _execute("search_one_location.ipynb", env, monkeypatch)
    images = _check_cells(nb, "search_one_location.ipynb")
    assert images >= 1
    text = _text(nb)
    assert f"provider 'local' at {stac_api.stac_url}" in text
    # the notebook's search of the same patch picks the scene the pipeline's search picked
    assert f"SceneSearch chose {row['item_id']}" in text
