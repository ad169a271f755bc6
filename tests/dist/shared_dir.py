"""Both ranks check that output_dir is one filesystem for all (mmscale.training.cluster.shared_dir_problems).

    RANK=r WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=p python shared_dir.py OUTPUT_DIR RESULT_JSON
"""

import json
import sys

from mmscale.training.cluster import shared_dir_problems
from mmscale.training.engine import init_distributed

rank, _ = init_distributed(timeout_s=60)
problems = shared_dir_problems(sys.argv[1])
with open(f"{sys.argv[2]}.rank{rank}", "w") as f:
    json.dump(problems, f)
