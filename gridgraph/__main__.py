"""``python -m gridgraph`` is the ``gridgraph`` command."""
import sys

from .cli import main

sys.exit(main())
