"""``python -m fxprune``: the ``fxprune`` command."""
import sys

from fxprune.cli import main

sys.exit(main())
