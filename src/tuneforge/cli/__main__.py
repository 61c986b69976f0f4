"""`python -m tuneforge.cli ...` (torchrun's `-m tuneforge.cli train ...` too)."""

import sys

from tuneforge.cli import main

sys.exit(main())
