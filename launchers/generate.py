"""Caption (and classify) images with a trained model: one JSON line per image on stdout.

    python launchers/generate.py --model runs/demo --images photos/ [--mode greedy|beam|sample] [--classify]
    python launchers/generate.py --model runs/demo --shards 'data/val-{000000..000001}.tar' --mode beam --beams 4
    python launchers/generate.py --model exported/demo --images photos/ --mode sample --temperature 0.7 --top-p 0.9

See mmscale/inference.py for the options, the output fields and how decoding works.
"""

from __future__ import annotations

import sys

from mmscale.inference import main

if __name__ == "__main__":
    sys.exit(main())
