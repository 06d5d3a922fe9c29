"""``python -m opengemma.serve``: the ``opengemma serve`` subcommand as a program of its own."""

import sys

from .cli import main

sys.exit(main())
