"""`python -m mechamap_core`: run the command line."""

import sys

from .cli import main

sys.exit(main())
