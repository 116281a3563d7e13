"""What torchrun runs on every rank: `python -m longcat.parallel.worker '<RunSpec JSON>'`.

The argument may also be a JSON list of specs: they run one after the other in the same process
group (each with its own mesh), which saves process start-up time in tests.
"""

from __future__ import annotations

import json
import sys
import traceback

import torch.distributed as dist

from .layout import shutdown_distributed
from .loop import RunSpec, run_training


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m longcat.parallel.worker '<RunSpec JSON or JSON list>'", file=sys.stderr)
        return 2
    data = json.loads(argv[0])
    specs = [RunSpec(**d) for d in (data if isinstance(data, list) else [data])]
    try:
        for spec in specs:
            run_training(spec)
    except Exception:
        # No barrier here: the other ranks may be stuck in a collective. Exit non-zero and let
        # torchrun stop (or restart) the group.
        traceback.print_exc()
        if dist.is_initialized():
            dist.destroy_process_group()
        return 1
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
