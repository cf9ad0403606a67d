#!/usr/bin/env python
"""Train the cGAN or qGAN baseline: the entry point of :mod:`qid2_diffusers.training.gan`.

    python training/train_gan.py --model qgan --preset small --data_dir data/phantoms \\
        --output_dir weights/qgan-small-r3 --max_train_steps 20000
"""

import sys

from qid2_diffusers.training.gan import main

if __name__ == "__main__":
    sys.exit(main())
