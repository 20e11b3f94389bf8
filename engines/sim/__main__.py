"""`python -m engines.sim`: see engines/sim/cli.py."""

import sys

from engines.sim.cli import main

sys.exit(main())
