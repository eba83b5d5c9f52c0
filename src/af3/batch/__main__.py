"""``python -m af3.batch MANIFEST --output OUT ...``: ``af3 batch`` for launchers such as
``torchrun --nproc_per_node K -m af3.batch ...`` (each rank takes every K-th item; see ``af3 batch --help``)."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["batch", *sys.argv[1:]]))
