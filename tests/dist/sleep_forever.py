"""A rank that never ends on its own: for the test that a timed-out launch leaves no process behind."""

import os
import sys
import time

from pathlib import Path

Path(sys.argv[-1]).joinpath(f"pid{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
time.sleep(3600)
