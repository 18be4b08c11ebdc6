"""Sphinx configuration: the API reference, built from gridgraph's docstrings (autodoc + napoleon).

Build: ``python -m sphinx -W --keep-going -n -b html docs docs/_build/html`` (``tests/test_docs.py``
does exactly this, so a docstring that breaks the build fails the tests).
"""
import shutil
from pathlib import Path

import gridgraph

project = "gridgraph"
author = "the gridgraph authors"
copyright = "2026, the gridgraph authors"
release = gridgraph.__version__
version = ".".join(release.split(".")[:2])

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax", "myst_nb"]
exclude_patterns = ["_build"]

# The tutorials: the notebooks of notebooks/ with their stored outputs (copied here at each build from the
# checkout gridgraph is installed from; never executed by the docs build: the test suite executes them).
nb_execution_mode = "off"
myst_enable_extensions: list = []
suppress_warnings = ["myst.header", "myst.xref_missing", "mystnb.unknown_mime_type"]
_NOTEBOOKS = Path(gridgraph.__file__).resolve().parents[1] / "notebooks"
_TUTORIALS = Path(__file__).resolve().parent / "tutorials"
if _NOTEBOOKS.is_dir():
    shutil.rmtree(_TUTORIALS, ignore_errors=True)
    _TUTORIALS.mkdir()
    for _notebook in sorted(_NOTEBOOKS.glob("[0-9][0-9]-*.ipynb")):
        shutil.copy(_notebook, _TUTORIALS / _notebook.name)
root_doc = "index"

# Docstrings are Google style (Args:, Returns:, Example:), with reST inside.
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_param = False  # "stride, padding, ...: as in nn.Conv2d" stays one entry
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the docstrings say the types; the signatures stay short
autodoc_inherit_docstrings = False  # torch's and PyG's docstrings are theirs, not ours

# Every cross-reference must resolve (nitpicky), except to the libraries underneath: no inventory of
# torch, PyG, numpy or matplotlib is fetched (the build runs offline and in CI).
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|torch_geometric|numpy|np|matplotlib|networkx|nx|nn|F|fractions)([. ].*)?"),
    (r"py:.*", r"(Tensors?|Module|Parameter|Figure|Axes|MessagePassing|Data|EdgeIndex|OptTensor|Adj|Size)"),
    (r"py:class", r"(optional|callable|sequence|iterable|mapping|tuple|list|dict|int|float|bool|str|Any|Optional|"
                  r"Sequence|Iterable|Iterator|Mapping|Callable|Union|type|object|None)"),
    (r"py:class", r".*\.\.\..*"),  # 'tuple[int, ...]' in a type
]

html_theme = "alabaster"
html_title = f"gridgraph {release}"
html_static_path: list = []
html_show_sourcelink = False


def _resolve_gridgraph(app, env, node, contnode):
    """Resolve what the Python domain could not, in two steps.

    1. A public name (in ``gridgraph.__all__``) referred to by a module path
       (``gridgraph.graph.image_to_graph``) or bare (``image_to_graph``) links to its entry under the
       package (``gridgraph.image_to_graph``), where this reference documents it: docstrings keep working
       when a module is renamed.
    2. A name that exists in gridgraph but has no entry here (an internal helper) is shown as code,
       without a link.

    Anything else stays unresolved, and the nitpicky build fails on it: a reference to something
    that does not exist (a typo, a renamed function) is a broken docstring.
    """
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    name = target.rsplit(".", 1)[-1]
    if name in gridgraph.__all__ and (target == name or target.startswith("gridgraph.")):
        resolved = env.get_domain("py").resolve_xref(env, node["refdoc"], app.builder, node["reftype"],
                                                     f"gridgraph.{name}", node, contnode)
        if resolved is not None:
            return resolved
    if "." not in target:  # a bare name, written in the module that defines it: its unique documented entry
        domain = env.get_domain("py")
        found = [full for full in domain.objects if full.endswith("." + target) and full.startswith("gridgraph.")]
        if len(found) == 1:
            return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], found[0], node, contnode)
    module, cls = node.get("py:module") or "gridgraph", node.get("py:class")
    if target.startswith("gridgraph."):
        candidates = [target]
    else:  # relative to where the reference is written: its class, its module, the package
        candidates = ([f"{module}.{cls}.{target}"] if cls else []) + [f"{module}.{target}", f"gridgraph.{target}"]
    return contnode if any(_exists(c) for c in candidates) else None


def _exists(dotted: str) -> bool:
    """Whether ``dotted`` names a module, or an attribute reached from the longest importable module."""
    import importlib

    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attribute in parts[cut:]:
            if hasattr(obj, attribute):
                obj = getattr(obj, attribute)
            elif attribute in getattr(obj, "__dataclass_fields__", {}):  # a field without a class default
                obj = None
            else:
                return False
        return True
    return False


def setup(app):
    app.connect("missing-reference", _resolve_gridgraph)
