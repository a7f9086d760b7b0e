"""``python -m diffusers_hold.bench``: the memorization benchmark (see :mod:`diffusers_hold.bench.cli`)."""

import sys

from .cli import main

sys.exit(main())
