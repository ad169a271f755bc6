"""Evaluate a trained run on test shards; with --compare, against a base run (before / after fine-tuning).

    python launchers/evaluate.py --checkpoint runs/demo-finetune --compare runs/demo [--shards SPEC] [--out DIR]

See mmscale/evaluation/evaluate.py for what is measured.
"""

from __future__ import annotations

import sys

from mmscale.evaluation.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
