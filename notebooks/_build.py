"""Build the tutorial notebooks from their sources and execute them, so they are committed with outputs.

Each notebook is written as a plain Python file in ``notebooks/src/NN-title.py`` (jupytext's "percent"
format: a line ``# %%`` starts a code cell, ``# %% [markdown]`` a markdown cell whose lines are ``# ``
comments). This script reads each with jupytext, writes it as ``notebooks/NN-title.ipynb``, runs it
top to bottom in a fresh kernel (the interpreter running this script, whatever ``python`` is on
PATH), stores the outputs and prints the run time. A failing cell (every claim is an ``assert``)
stops the build with the error.

Usage::

    python notebooks/_build.py            # build and execute every notebook
    python notebooks/_build.py 03 05      # only those whose name starts with 03 or 05
    python notebooks/_build.py --no-execute

The test ``tests/test_notebooks.py`` re-executes the committed notebooks with :func:`execute` and
checks that each is up to date with its source (:func:`build`).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import jupytext
import nbformat

HERE = Path(__file__).resolve().parent
SOURCES = HERE / "src"
TIMEOUT = 300  # seconds per cell


def sources() -> list[Path]:
    """The notebook sources, in order."""
    return sorted(SOURCES.glob("[0-9][0-9]-*.py"))


def build(source: Path) -> nbformat.NotebookNode:
    """The (unexecuted) notebook of one source file, read by jupytext."""
    nb = jupytext.read(source, fmt="py:percent")
    nb.metadata.pop("jupytext", None)  # the pairing lives here, not in the committed notebooks
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):  # stable ids, so rebuilding does not churn the files
        cell["id"] = f"{source.stem[:2]}-{i:02d}"
    return nb


def kernel_manager():
    """A kernel manager that starts ``ipykernel`` in *this* interpreter (``sys.executable``).

    Kernel specs found on disk may point at another Python (a user-level ``python3`` spec, or the
    bare word ``python`` resolved on PATH); the notebooks must run against the gridgraph installed here.
    """
    from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
    from jupyter_client.manager import KernelManager

    class _ThisInterpreter(KernelSpecManager):
        def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
            return KernelSpec(argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                              display_name="Python 3 (this interpreter)", language="python", name="python3")

    return KernelManager(kernel_name="python3", kernel_spec_manager=_ThisInterpreter())


def execute(nb: nbformat.NotebookNode, cwd: Path = HERE, timeout: int = TIMEOUT) -> float:
    """Execute ``nb`` in place in a fresh kernel; return the wall time in seconds. Raises on a cell error."""
    from nbclient import NotebookClient

    km = kernel_manager()
    client = NotebookClient(nb, km=km, timeout=timeout, allow_errors=False, resources={"metadata": {"path": str(cwd)}})
    start = time.perf_counter()
    try:
        client.execute()
    finally:  # a kernel manager passed in is not shut down by nbclient: each kernel would outlive its notebook
        if km.has_kernel:
            km.shutdown_kernel(now=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("only", nargs="*", help="build only notebooks whose name starts with one of these")
    parser.add_argument("--no-execute", action="store_true", help="write the notebooks without running them")
    args = parser.parse_args(argv)
    chosen = [s for s in sources() if not args.only or any(s.stem.startswith(p) for p in args.only)]
    if not chosen:
        print("no notebook source matches", args.only, file=sys.stderr)
        return 2
    for source in chosen:
        nb = build(source)
        seconds = None if args.no_execute else execute(nb)
        target = HERE / f"{source.stem}.ipynb"
        nbformat.write(nb, target)
        print(f"{target.name}: {len(nb.cells)} cells" + ("" if seconds is None else f", executed in {seconds:.1f} s"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
