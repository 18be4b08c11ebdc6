"""The API reference (docs/, Sphinx autodoc): it builds from the docstrings with warnings as errors and
every cross-reference resolved, documents every public name, and fails on a broken docstring."""
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import gridgraph

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def sphinx_build(source: Path, out: Path, env: dict = None) -> subprocess.CompletedProcess:
    """``sphinx-build -E -W --keep-going -n``: fresh, warnings are errors, every reference must resolve."""
    return subprocess.run([sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-n", "-q", "-b", "html",
                           str(source), str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("html")
    proc = sphinx_build(DOCS, out)
    assert proc.returncode == 0, f"the API reference does not build cleanly:\n{proc.stderr[-5000:]}"
    assert "WARNING" not in proc.stderr and "ERROR" not in proc.stderr, proc.stderr[-5000:]
    return out


def test_api_reference_builds_cleanly(built):
    index = (built / "index.html").read_text()
    assert f"gridgraph {gridgraph.__version__}" in index
    for page in ("graphs", "layers", "networks", "analysis"):
        assert (built / "api" / f"{page}.html").exists()
    assert "Exit codes" in (built / "cli.html").read_text()
    for page, words in (("install", ['.[onnx]', '.[test]', "CPU-only", "GPU"]),
                        ("quickstart", ["to_gnn", "tiled"]), ("architecture", ["How data flows"])):
        text = (built / f"{page}.html").read_text()
        assert all(w in text for w in words), page


def test_tutorials_are_the_notebooks_with_their_outputs(built):
    """Every notebook is a page, rendered from its stored outputs (text and figures), not re-executed."""
    import json

    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]-*.ipynb"))
    assert len(notebooks) >= 12
    for notebook in notebooks:
        page = (built / "tutorials" / f"{notebook.stem}.html").read_text()
        cells = json.loads(notebook.read_text())["cells"]
        first_text = next(o["text"] for c in cells if c["cell_type"] == "code" for o in c.get("outputs", [])
                          if o.get("output_type") == "stream")
        line = next(line for line in (first_text if isinstance(first_text, str) else "".join(first_text)).splitlines()
                    if line.strip() and "<" not in line and "&" not in line and "'" not in line)
        assert line.strip()[:40] in page, (notebook.name, line)
        assert any("image/png" in o.get("data", {}) for c in cells for o in c.get("outputs", [])) <= ("<img" in page)


def test_every_public_callable_has_an_example():
    import inspect

    missing = [name for name in gridgraph.__all__ if callable(getattr(gridgraph, name))
               and not inspect.ismodule(getattr(gridgraph, name))
               and ">>>" not in (inspect.getdoc(getattr(gridgraph, name)) or "")]
    assert not missing, f"public callables without a docstring example: {missing}"


def test_every_public_name_is_documented_under_the_package(built):
    """Each name of ``gridgraph.__all__`` has an entry ``gridgraph.NAME`` (modules: ``gridgraph.analysis``),
    so the reference follows the public API, not the module layout."""
    ids = set()
    for page in built.rglob("*.html"):
        ids |= set(re.findall(r'id="([^"]+)"', page.read_text()))
    missing = [name for name in gridgraph.__all__
               if f"gridgraph.{name}" not in ids and f"module-gridgraph.{name}" not in ids]
    assert not missing, f"public names without an entry in docs/api/*.rst: {missing}"


def test_docstring_examples_are_rendered(built):
    layers = (built / "api" / "layers.html").read_text()
    assert "GridConv2d.from_conv2d" in layers and "&gt;&gt;&gt;" in layers  # doctest blocks kept
    assert "stride, padding, dilation, groups, bias, padding_mode, device, dtype" in layers  # one Args entry


def test_a_broken_docstring_fails_the_build(tmp_path):
    """The same configuration on a module with a bad indentation and a reference to nothing: both fail."""
    source = tmp_path / "docs"
    shutil.copytree(DOCS, source, ignore=shutil.ignore_patterns("_build"))
    (tmp_path / "broken_module.py").write_text(textwrap.dedent('''
        def good(x):
            """Return ``x``; see :func:`gridgraph.image_to_graph`."""
            return x


        def broken(x):
            """Return ``x``, see :func:`gridgraph.no_such_function`.

            Args:
                x (int): the value,
              badly indented.
            """
            return x
        '''))
    (source / "broken.rst").write_text("Broken\n======\n\n.. autofunction:: broken_module.good\n"
                                       ".. autofunction:: broken_module.broken\n")
    index = source / "index.rst"
    index.write_text(index.read_text() + "   broken\n")
    import os

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = sphinx_build(source, tmp_path / "html", env=env)
    assert proc.returncode != 0
    assert "py:func reference target not found: gridgraph.no_such_function" in proc.stderr
    assert "broken_module.broken" in proc.stderr and "good" not in proc.stderr.replace("broken_module.broken", "")
