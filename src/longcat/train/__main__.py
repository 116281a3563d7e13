"""`python -m longcat.train ARGS` = `longcat train ARGS` (for `torchrun ... -m longcat.train ...`)."""

import sys

from ..cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
