"""``python -m volseg``: the command line (the Slicer module runs the engine this way)."""

import sys

from volseg.cli import main

sys.exit(main())
