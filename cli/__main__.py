"""`python -m r2m.cli ...` is `r2m ...`."""

import sys

from .main import main

sys.exit(main())
