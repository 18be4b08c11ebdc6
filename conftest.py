"""Doctest namespace: every docstring example may use ``torch`` and the public gridgraph API."""
import pytest
import torch

import gridgraph


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    doctest_namespace["torch"] = torch
    doctest_namespace["gridgraph"] = gridgraph
    for name in gridgraph.__all__:
        doctest_namespace[name] = getattr(gridgraph, name)
