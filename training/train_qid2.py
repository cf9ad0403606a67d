#!/usr/bin/env python
"""Train QID² with 🤗 Accelerate: the entry point of :mod:`qid2_diffusers.training.qid2`.

    python training/train_qid2.py --config small --data_dir data/phantoms --output_dir runs/qid2-small-r3
    accelerate launch --num_processes 2 training/train_qid2.py --config small \\
        --data_dir data/phantoms --output_dir runs/qid2-small-r3 --resume_from_checkpoint latest
"""

import sys

from qid2_diffusers.training.qid2 import main

if __name__ == "__main__":
    sys.exit(main())
