"""`python -m moeviz`: the command line, see moeviz.cli."""

import sys

from moeviz.cli import main

sys.exit(main())
