"""``python -m steadyfit``: the same as the ``steadyfit`` console script."""

import sys

from steadyfit.cli import main

sys.exit(main())
