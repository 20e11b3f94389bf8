"""`python -m engines ...`: see engines/cli.py."""

import sys

from engines.cli import main

sys.exit(main())
