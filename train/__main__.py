"""``python -m modrt.train TASK ...``: ``modrt train TASK ...``, the form torchrun starts::

    torchrun --nproc-per-node 2 -m modrt.train ptb --out runs/ddp      # 2 processes (gloo on CPU)
    torchrun --nproc-per-node 8 -m modrt.train ptb --device cuda       # 8 GPUs (NCCL)

Every process runs the same trainer over its share of each batch (``distributed``).
"""

import sys

from modrt.cli import cli

cli(args=["train", *sys.argv[1:]], prog_name="modrt")
