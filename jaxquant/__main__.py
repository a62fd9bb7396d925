"""``python -m jaxquant`` = the ``jaxquant`` command."""

import sys

from jaxquant.cli import main

sys.exit(main())
