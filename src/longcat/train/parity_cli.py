"""`longcat parallel check`: validate a layout, then train a few steps on it under torchrun.

    longcat parallel check --nproc 2 --parallel dp_shard=2,ep=2 --steps 5 --compare

The layout is checked against the model and the process count before anything starts. The
ranks run `longcat.train.Trainer` on the layout; with --compare the same Trainer also runs the
same steps in one process and the largest relative loss difference is printed (about 1e-7 in
fp32).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def register(subparsers) -> None:
    parser = subparsers.add_parser("parallel", help="scale-out tools: check a parallel layout on this machine")
    sub = parser.add_subparsers(dest="parallel_command", metavar="SUBCOMMAND")
    check = sub.add_parser(
        "check",
        help="validate a layout and train a few steps on it, printing the losses",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument("--nproc", type=int, default=2, help="processes on this node (default 2)")
    check.add_argument("--parallel", default=None,
                       help="layout, e.g. dp_shard=2,ep=2 (names: dp_shard dp_replicate ep tp cp pp pp_schedule "
                            "pp_microbatches pp_stages_per_rank); default: dp_shard=NPROC")
    check.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                       help="model config override, repeatable (e.g. --set num_layers=4)")
    check.add_argument("--steps", type=int, default=5)
    check.add_argument("--batch", type=int, default=4, help="global batch in sequences")
    check.add_argument("--seq-len", type=int, default=32)
    check.add_argument("--lr", type=float, default=3e-3)
    check.add_argument("--seed", type=int, default=0)
    check.add_argument("--mtp-weight", type=float, default=0.0)
    check.add_argument("--z-loss", type=float, default=0.0)
    check.add_argument("--balance-loss", type=float, default=0.0)
    check.add_argument("--indexer-loss-weight", type=float, default=0.0)
    check.add_argument("--device", default="cpu", help="cpu, cuda, npu or auto")
    check.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                       help="FSDP parameter precision (auto: bf16 on accelerators)")
    check.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    check.add_argument("--max-restarts", type=int, default=0, help="torchrun restarts after a rank dies")
    check.add_argument("--checkpoint-dir", default=None,
                       help="distributed checkpoints here (default: a temporary directory); resumes from the newest")
    check.add_argument("--checkpoint-every", type=int, default=0)
    check.add_argument("--crash-at-step", type=int, default=0,
                       help="fault injection: SIGKILL one rank right after this step, before its checkpoint "
                            "(first attempt only)")
    check.add_argument("--crash-rank", type=int, default=0)
    check.add_argument("--compare", action="store_true",
                       help="also run the same Trainer in one process and compare the losses")
    check.add_argument("--timeout", type=float, default=900.0, help="seconds before the whole group is killed")
    check.add_argument("--json", default=None, help="write the rank-0 summary here")
    check.set_defaults(func=run_check)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def run_check(args) -> int:
    from ..config import parse_overrides, preset
    from ..devices import resolve_device
    from ..errors import UserError
    from ..model.losses import LossWeights
    from ..parallel.launch import launch
    from ..parallel.layout import ParallelLayout
    from .parity import RunSpec, reference_run

    overrides = parse_overrides(args.overrides)
    config = preset(args.preset, **overrides)
    layout = ParallelLayout.parse(args.parallel or f"dp_shard={args.nproc}")
    weights = LossWeights(mtp=args.mtp_weight, z_loss=args.z_loss, balance=args.balance_loss,
                          indexer=args.indexer_loss_weight)
    # Everything the workers would reject, rejected here first (no processes started).
    for flag, value in (("--steps", args.steps), ("--batch", args.batch), ("--seq-len", args.seq_len)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    resolve_device(args.device, setting="--device")
    layout.validate(
        config, args.nproc, seq_len=args.seq_len, global_batch=args.batch,
        with_mtp=weights.with_mtp(config), with_indexer_loss=weights.with_indexer(config),
        with_aux_losses=weights.any_aux,
    )
    with tempfile.TemporaryDirectory(prefix="longcat-parallel-") as tmp:
        results = Path(args.json) if args.json else Path(tmp) / "results.json"
        spec = RunSpec(
            preset=args.preset, overrides=overrides, layout=str(layout), steps=args.steps, batch=args.batch,
            seq_len=args.seq_len, lr=args.lr, seed=args.seed, mtp_weight=args.mtp_weight, z_loss=args.z_loss,
            balance_loss=args.balance_loss, indexer_loss_weight=args.indexer_loss_weight, device=args.device,
            precision=args.precision, threads=args.threads, out=str(Path(tmp) / "run"), checkpoint_dir=args.checkpoint_dir,
            checkpoint_every=args.checkpoint_every, crash_at_step=args.crash_at_step, crash_rank=args.crash_rank,
            results=str(results),
        )
        print(f"layout {layout} on {args.nproc} process(es), preset {args.preset}, "
              f"{args.batch}x{args.seq_len} tokens per step", flush=True)
        try:
            proc = launch(["-m", "longcat.train.parity_worker", spec.to_json()], nproc=args.nproc,
                          max_restarts=args.max_restarts, threads_per_rank=args.threads, timeout=args.timeout)
        except subprocess.TimeoutExpired as exc:
            raise UserError(f"the distributed run did not finish: {exc}") from None
        if proc.returncode != 0:
            print(f"longcat parallel check: the distributed run failed (exit {proc.returncode}); "
                  "see the rank output above", file=sys.stderr)
            return 1
        summary = json.loads(results.read_text())
        print(f"done: {summary['tokens_per_s']:,.0f} tokens/s (steady state, all ranks together)")
        if args.compare:
            if args.device != "cpu" or args.precision != "fp32":
                print("note: --compare runs the one-process reference with fp32 parameters on CPU")
            ref = reference_run(RunSpec(**{**json.loads(spec.to_json()), "device": "cpu", "precision": "fp32"}))
            worst = 0.0
            for step, loss in ref["losses"].items():
                got = summary["losses"].get(str(step))
                if got is None:
                    continue
                worst = max(worst, abs(got - loss) / max(abs(loss), 1e-12))
            print(f"single process: final loss {ref['losses'][args.steps]:.6f}; largest relative loss "
                  f"difference over {args.steps} steps: {worst:.2e}")
    return 0


__all__ = ["register", "run_check"]
