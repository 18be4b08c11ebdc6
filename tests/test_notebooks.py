"""Re-execute every committed notebook in a clean kernel; any failing cell (every claim is an assert) fails.

The kernel is ``ipykernel`` started by *this* interpreter (``sys.executable``), not whatever a
``python3`` kernel spec on disk points at, so the notebooks test the gridgraph installed here.
"""
import importlib.util
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="the notebook tests need the 'test' extra (nbformat)")
pytest.importorskip("nbclient", reason="the notebook tests need the 'test' extra (nbclient)")
pytest.importorskip("ipykernel", reason="the notebook tests need the 'test' extra (ipykernel)")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
_spec = importlib.util.spec_from_file_location("_notebook_build", NOTEBOOKS / "_build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

PATHS = sorted(NOTEBOOKS.glob("[0-9][0-9]-*.ipynb"))
TUTORIALS = ["01-pixels-as-nodes", "02-a-convolution-that-cannot-see", "03-the-art-of-mixing-channels",
             "04-kxk-convolution-as-message-passing", "05-the-separability-bargain",
             "06-the-price-of-separability", "07-grouped-vs-pointwise-mixing"]


def test_the_numbered_tutorials_exist_with_sources():
    names = [p.stem for p in PATHS]
    for name in TUTORIALS:
        assert name in names, f"notebooks/{name}.ipynb is missing"
        assert (build.SOURCES / f"{name}.py").exists(), f"notebooks/src/{name}.py is missing"


@pytest.mark.parametrize("source", build.sources(), ids=lambda p: p.stem)
def test_sources_are_in_jupytexts_percent_format(source):
    """Each source is exactly what jupytext writes for the notebook it reads from it (no header, magics
    commented out), so the sources stay plain Python and round-trip through jupytext unchanged."""
    import jupytext

    nb = build.build(source)
    assert nb.cells and {c.cell_type for c in nb.cells} == {"markdown", "code"}
    nb.metadata["jupytext"] = {"notebook_metadata_filter": "-all", "cell_metadata_filter": "-all"}
    assert jupytext.writes(nb, fmt="py:percent") == source.read_text(), \
        f"{source.name} is not in jupytext's percent format (e.g. a magic not commented out: '# %matplotlib')"
    assert build.build(source).cells[1].source.startswith("%matplotlib inline")  # the magic, uncommented


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_notebook_is_committed_executed_and_up_to_date(path):
    committed = nbformat.read(path, as_version=4)
    source = build.SOURCES / f"{path.stem}.py"
    if source.exists():
        fresh = build.build(source)
        assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in fresh.cells], \
            f"{path.name} is out of date with {source.name}: run python notebooks/_build.py {path.stem[:2]}"
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert code and all(c.execution_count is not None for c in code), f"{path.name} is committed unexecuted"
    outputs = [o for c in code for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], f"{path.name} is committed with an error"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} has no figure in its outputs"


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p.stem)
def test_notebook_runs_in_a_clean_kernel(path):
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    start = time.perf_counter()
    build.execute(nb, cwd=NOTEBOOKS, timeout=240)  # raises CellExecutionError on any failing cell
    seconds = time.perf_counter() - start
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code)
    print(f"{path.name}: {seconds:.1f} s")
