"""`python -m mmscale.export model|adapter ...` (mmscale.export.cli)."""

import sys

from mmscale.export.cli import main

sys.exit(main())
