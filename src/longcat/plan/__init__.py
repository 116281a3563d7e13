"""Cluster planner (DESIGN §5, docs/PLANNER.md): parallel layout, memory per device, step time, MFU,
days, checkpoints and failures for training; weights, KV cache and chips per context for serving.

    from longcat.plan import load_architecture, load_hardware, load_stack, TrainSetup, Planner, search
    planner = Planner(TrainSetup(load_architecture("longcat2"), load_hardware("ascend-910c"),
                                 load_stack("modern"), chips=50000, seq_len=8192, global_batch_tokens=51.2e6))
    best = search(planner, top=1)[0]
"""

from .arch import Architecture, from_longcat, load_architecture
from .hardware import STACKS, Hardware, Stack, load_hardware, load_stack
from .layout import Layout, parse_layout
from .serve import ServeSetup, chips_for_context, serve_plan
from .train import Planner, TrainPlan, TrainSetup, search

__all__ = [
    "Architecture", "from_longcat", "load_architecture", "Hardware", "Stack", "STACKS", "load_hardware",
    "load_stack", "Layout", "parse_layout", "ServeSetup", "serve_plan", "chips_for_context", "Planner",
    "TrainPlan", "TrainSetup", "search",
]
