"""`python -m diskpipe` runs the `diskpipe` command."""

import sys

from diskpipe.cli import main

sys.exit(main())
