"""The ``gridgraph`` command's entry point, outside the package so that ``--help`` and ``--version`` answer
without importing torch (``import gridgraph`` loads torch, PyG and the operators, ~3 s): the argument parser
lives here, the work in :mod:`gridgraph.cli`, imported once the arguments are read."""
from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version
from importlib.util import find_spec
from pathlib import Path
from typing import Optional, Sequence

#: Exit codes of ``gridgraph verify``.
EXIT_PASS, EXIT_MISMATCH, EXIT_ERROR = 0, 1, 2

DTYPE_CHOICES = ("float32", "float64", "all")

EXIT_CODES = f"""exit codes:
  {EXIT_PASS}  every check passed
  {EXIT_MISMATCH}  a mismatch: some check failed (the tables and the summary say which)
  {EXIT_ERROR}  a usage error, or a model given with --model that could not be imported, built or run
     (one line on stderr; --debug adds the traceback)"""


def gridgraph_version() -> str:
    """gridgraph's version, read from ``gridgraph/_version.py`` without importing the package."""
    spec = find_spec("gridgraph")
    if spec is None or not spec.submodule_search_locations:
        return "unknown"
    namespace: dict = {}
    source = Path(list(spec.submodule_search_locations)[0]) / "_version.py"
    exec(compile(source.read_text(), str(source), "exec"), namespace)
    return namespace["__version__"]


def version_line() -> str:
    """``gridgraph X (torch Y, torch_geometric Z, Python W)``: what a bug report needs (from the installed
    distributions' metadata: nothing is imported)."""
    import platform

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return (f"gridgraph {gridgraph_version()} (torch {installed('torch')}, torch_geometric "
            f"{installed('torch_geometric')}, Python {platform.python_version()})")


def parser() -> argparse.ArgumentParser:
    """The ``gridgraph`` command's arguments."""
    p = argparse.ArgumentParser(prog="gridgraph", description="A CNN is a GNN on a pixel graph, exactly.",
                                epilog="'gridgraph verify --help' lists its options and exit codes.")
    p.add_argument("--version", action="version", version=version_line(),
                   help="print gridgraph's version (and torch's, PyG's, Python's) and exit")
    sub = p.add_subparsers(dest="command", required=True)
    verify = sub.add_parser(
        "verify", help="check every graph layer against torch.nn.Conv2d, and converted networks against their originals",
        description="Layers: every graph layer against torch.nn.Conv2d over a built-in table of configurations, "
                    "then the beyond-the-grid cases (masked, sparse, point positions, transposed, 1-D and 3-D) and "
                    "attention. Models: the reference networks (or your own, --model) converted with "
                    "gridgraph.convert against the originals, layer by layer, forward and gradients. A summary "
                    "table goes to stdout (every table with --verbose), a progress line per finished part to "
                    "stderr.",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("--device", default="all",
                        help="'cpu', 'cuda', 'cuda:N' or 'all' (every available device; default)")
    verify.add_argument("--dtype", choices=list(DTYPE_CHOICES), default="all", help="default: all")
    verify.add_argument("--seed", type=int, default=0, help="random seed of weights and inputs (default: 0)")
    verify.add_argument("--quick", action="store_true",
                        help="a representative subset of layers, and four reference networks (mobilenet, resnet, "
                             "dilated, unet) in training mode, float64 unless --dtype float32 (a second or two "
                             "after the import)")
    verify.add_argument("--only", choices=["layers", "models"],
                        help="run only the layer tables or only the models (default: both; --model implies models)")
    verify.add_argument("--model", action="append", metavar="MODULE:ATTRIBUTE", default=[],
                        help="verify your own model: an nn.Module or a zero-argument factory, given as "
                             "'package.module:name' or 'path/to/file.py:name' (repeatable; needs --input-shape)")
    verify.add_argument("--input-shape", metavar="B,C,H,W", help="input shape for --model, e.g. 2,3,32,32")
    verify.add_argument("--reference", action="append", metavar="NAME", default=[],
                        help="verify only these reference networks (repeatable; default: all of them)")
    verify.add_argument("--no-grads", action="store_true", help="models: compare outputs only, not gradients")
    verify.add_argument("--threads", type=int, default=1, metavar="N",
                        help="CPU threads for torch (default: 1; the checks use small tensors, for which "
                             "more threads mostly add contention, e.g. 7x slower on a busy 2-core machine)")
    verify.add_argument("--verbose", action="store_true",
                        help="print every table (each configuration, each network layer by layer), not only the "
                             "summary")
    verify.add_argument("--json", metavar="PATH",
                        help="also write the full report as JSON to PATH ('-': to stdout, the tables then go "
                             "to stderr); written for exit codes 1 and 2 too")
    verify.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    verify.add_argument("--debug", action="store_true",
                        help="print the traceback of an error in your model (--model), not just its message")
    sub.add_parser("info", help="print the versions and which kernels run here (what a bug report needs)",
                   description="Versions of gridgraph and its dependencies, the devices, which loops run the grid "
                               "kernels (numba's compiled loops, or torch's) and the structure cache.")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``gridgraph`` command: parse (``--help`` and ``--version`` end here), then run in :mod:`gridgraph.cli`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    from gridgraph.cli import run

    return run(args, argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
