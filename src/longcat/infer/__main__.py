"""`python -m longcat.infer ARGS` = `longcat generate ARGS`, and generation on several processes.

    longcat generate --nproc 2 --parallel tp=2,ep=2 --model DIR ...        # one node (runs this)
    torchrun --nnodes 2 --nproc-per-node 8 ... -m longcat.infer --parallel tp=8,ep=16 --model DIR ...

With --nproc N (or --parallel) outside torchrun, the layout is checked against the checkpoint's
config (one line naming the degree to change, before any process starts) and the same command
is started on N ranks under torchrun. Inside torchrun, each rank builds the model on the meta
device, keeps its shard (`longcat.parallel.inference`), reads only that from the checkpoint and
runs the ordinary `Engine`; every rank computes the same tokens, rank 0 prints them.
"""

from __future__ import annotations

import contextlib
import os
import sys


def main(argv: list[str]) -> int:
    from ..cli import build_parser
    from ..config import ConfigError
    from ..errors import UserError
    from ..interop.safetensors_io import CheckpointError

    args = build_parser().parse_args(["generate", *argv])
    try:
        return _generate(args, argv)
    except (ConfigError, UserError, CheckpointError, FileNotFoundError) as exc:
        print(f"longcat generate: error: {exc}", file=sys.stderr)
        return 2


def _generate(args, argv: list[str]) -> int:
    from ..parallel.launch import is_torchrun_worker

    if is_torchrun_worker():
        return _rank(args)
    if args.nproc == 1 and not args.parallel:
        from .cli import generate

        return generate(args)
    return _launch(args, argv)


def _layout(args, world_size: int):
    from ..parallel.layout import ParallelLayout

    return ParallelLayout.parse(args.parallel or f"tp={world_size},ep={world_size}")


def _check(args, world_size: int):
    """Everything that can be refused before a process starts or a weight is allocated ->
    (layout, model config)."""
    from ..errors import UserError
    from ..model.fp8 import BLOCK
    from ..parallel.sharded_load import load_config
    from .cli import resolve_model_dir

    if args.compile:
        raise UserError("--compile is not supported with several processes yet (the ranks' all-reduces run "
                        "eagerly); drop --compile, or generate in one process")
    config = load_config(resolve_model_dir(args.model))
    layout = _layout(args, world_size)
    layout.validate_inference(config, world_size, fp8_block=BLOCK if args.weights_dtype == "fp8" else None)
    return layout, config


def _launch(args, argv: list[str]) -> int:
    from ..errors import UserError
    from ..parallel.launch import launch, relaunch_argv

    if args.nproc < 1:
        raise UserError(f"--nproc must be >= 1, got {args.nproc}")
    nproc = args.nproc
    if nproc == 1 and args.parallel:  # --parallel alone: as many ranks as the layout needs
        nproc = _layout(args, 1).inference_world_size
    _check(args, nproc)
    proc = launch(["-m", "longcat.infer", *relaunch_argv(argv)], nproc=nproc)
    if proc.returncode != 0:
        print(f"longcat generate: the distributed run failed (exit {proc.returncode}); see the rank output above",
              file=sys.stderr)
        return 1
    return 0


def _rank(args) -> int:
    import torch.distributed as dist

    from ..devices import resolve_device
    from ..parallel.inference import load_for_inference, setup_inference, shared_seed
    from ..parallel.layout import device_type_for, shutdown_distributed
    from .cli import generate

    layout, config = _check(args, int(os.environ["WORLD_SIZE"]))
    device = resolve_device(args.device, setting="--device")
    if device.type != "cpu" and device.index is None:  # one accelerator per rank of this node
        args.device = f"{device.type}:{int(os.environ.get('LOCAL_RANK', '0'))}"
    try:
        ranks = setup_inference(layout, config, device_type=device_type_for(device), weights_dtype=args.weights_dtype)
        args.seed = shared_seed(args.seed)  # sampled tokens must be the same on every rank
        quiet = contextlib.ExitStack()
        if ranks.rank != 0:  # every rank computes the same tokens; one prints them
            sink = quiet.enter_context(open(os.devnull, "w"))
            quiet.enter_context(contextlib.redirect_stdout(sink))
            quiet.enter_context(contextlib.redirect_stderr(sink))
        with quiet:
            code = generate(args, load_model=lambda path, **kw: load_for_inference(path, ranks, **kw))
    except BaseException:
        # no barrier: another rank may be stuck in a collective; torchrun stops the group
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    shutdown_distributed()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
