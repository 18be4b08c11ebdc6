"""What a wheel carries (LICENSE, py.typed, metadata), the one version source and ``gridgraph --version``."""
import email
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import gridgraph
from gridgraph.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """A wheel built the way a user's ``pip install .`` builds it, from a copy of the sources (nothing is
    written into the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "_gridgraph_cli.py"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "gridgraph", source / "gridgraph", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp / "dist"),
                           str(source)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = (tmp / "dist").glob("gridgraph-*.whl")
    return zipfile.ZipFile(path)


def _metadata(wheel: zipfile.ZipFile) -> email.message.Message:
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/METADATA")]
    return email.message_from_bytes(wheel.read(name))


def test_wheel_ships_the_license_and_py_typed(wheel):
    names = wheel.namelist()
    (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
    assert wheel.read(license_file) == (ROOT / "LICENSE").read_bytes()
    assert b"MIT License" in wheel.read(license_file)
    assert "gridgraph/py.typed" in names
    assert "gridgraph/_version.py" in names


def test_wheel_metadata(wheel):
    meta = _metadata(wheel)
    assert meta["Name"] == "gridgraph"
    assert meta["Version"] == gridgraph.__version__
    assert meta["License-Expression"] == "MIT"
    classifiers = meta.get_all("Classifier")
    assert "Typing :: Typed" in classifiers and "Programming Language :: Python :: 3" in classifiers
    urls = dict(u.split(", ", 1) for u in meta.get_all("Project-URL"))
    assert {"Homepage", "Documentation", "Changelog", "Issues"} <= set(urls)
    assert all(u.startswith("https://") for u in urls.values())


def test_one_version_source():
    """pyproject.toml reads the version from gridgraph/_version.py; nothing else writes it."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "gridgraph._version.__version__"}
    from gridgraph._version import __version__

    assert gridgraph.__version__ == __version__
    assert f"## [{__version__}]" in (ROOT / "CHANGELOG.md").read_text(), "CHANGELOG.md has no entry for it"


def test_version_option(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"gridgraph {gridgraph.__version__} (torch ")
    assert "torch_geometric " in out and "Python " in out


def test_wheel_ships_the_light_entry_point(wheel):
    assert "_gridgraph_cli.py" in wheel.namelist()
    (name,) = [n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt")]
    assert "gridgraph = _gridgraph_cli:main" in wheel.read(name).decode()


@pytest.mark.parametrize("argv", [["--version"], ["--help"], ["verify", "--help"]])
def test_help_and_version_import_nothing_heavy(argv):
    """``gridgraph --help`` / ``--version`` answer before torch, PyG or gridgraph itself are imported."""
    code = (f"import sys, _gridgraph_cli\ntry:\n    _gridgraph_cli.main({argv!r})\nexcept SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "heavy = sorted(m for m in ('torch', 'torch_geometric', 'gridgraph', 'numpy', 'matplotlib') "
            "if m in sys.modules)\nprint('HEAVY', heavy)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout[-500:]


def test_import_gridgraph_still_registers_the_operators():
    code = "import torch, gridgraph\nprint(hasattr(torch.ops.gridgraph, 'grid_conv'), callable(gridgraph.to_gnn))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.split() == ["True", "True"], proc.stderr[-2000:]
