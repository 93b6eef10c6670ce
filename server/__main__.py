"""`python -m server` runs the `tokenrelay` command."""

import sys

from server.cli import main

sys.exit(main())
