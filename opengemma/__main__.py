"""``python -m opengemma`` runs the command line (see :mod:`opengemma.cli`)."""

import sys

from .cli import main

sys.exit(main())
