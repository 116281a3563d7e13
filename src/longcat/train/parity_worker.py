"""What torchrun runs on every rank: `python -m longcat.train.parity_worker '<RunSpec JSON>'`.

Each spec runs through `longcat.train.Trainer` on its layout (`longcat.train.parity.run_training`).
The argument may also be a JSON list of specs: they run one after the other in the same process
group (each with its own mesh), which saves process start-up time in tests.
"""

from __future__ import annotations

import json
import sys

import torch.distributed as dist

from ..parallel.layout import shutdown_distributed
from .parity import RunSpec, run_training


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m longcat.train.parity_worker '<RunSpec JSON or JSON list>'", file=sys.stderr)
        return 2
    data = json.loads(argv[0])
    specs = [RunSpec(**d) for d in (data if isinstance(data, list) else [data])]
    try:
        for spec in specs:
            run_training(spec)
    except BaseException:
        # No barrier here: the other ranks may be stuck in a collective. Let the traceback end this
        # rank with a non-zero exit, and torchrun stop (or restart) the group.
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
