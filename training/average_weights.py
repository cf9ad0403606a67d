#!/usr/bin/env python
"""Average fine-tuned QID² pipelines: the entry point of :mod:`qid2_diffusers.training.average_weights`.

    python training/average_weights.py --inputs runs/crops runs/slices --output_dir runs/soup
"""

import sys

from qid2_diffusers.training.average_weights import main

if __name__ == "__main__":
    sys.exit(main())
