"""The entry point torchrun starts in each process of a distributed training (cdl.ml.distributed)."""

from __future__ import annotations

import sys

from cdl.ml.distributed import worker_main

if __name__ == "__main__":
    worker_main(sys.argv[1])
