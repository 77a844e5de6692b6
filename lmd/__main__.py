"""``python -m lmd`` runs the ``lmd`` command line."""

import sys

from lmd.cli import main

sys.exit(main())
