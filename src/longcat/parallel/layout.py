"""The parallel layout: degrees of every parallelism, checked before any process group exists.

A layout string names degrees: "dp_shard=2,ep=2,tp=1,cp=1,pp=1,dp_replicate=1" (plus the pipeline
options pp_schedule=1f1b|interleaved|gpipe, pp_microbatches=M, pp_stages_per_rank=V). The
product pp * dp_replicate * dp_shard * cp * tp is the world size. Expert parallelism does not add
ranks: like TorchTitan, it borrows them from the data-parallel shard dimension (every EP rank also
reads its own data), so ep must divide dp_shard.

The planner uses the same names (`longcat.plan.layout.Layout` is a ParallelLayout plus the knobs
only it models), so the `parallel` string of a `longcat plan train` result is a layout string here.

`ParallelLayout.validate(config, world_size, ...)` runs before any work and raises `ConfigError`
naming the degree to change and the values that would work. `build_mesh` then makes one
`DeviceMesh` with named dimensions and the flattened views the parallelisms need.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from ..config import ConfigError, ModelConfig

# torch is imported where it is used: the planner (`longcat plan`) shares this vocabulary and
# should not pay for importing torch.
if TYPE_CHECKING:
    import torch

# Degrees, in mesh order (outermost first). ep is carved out of dp_shard.
DEGREES = ("pp", "dp_replicate", "dp_shard", "cp", "tp", "ep")
SCHEDULES = ("1f1b", "interleaved", "gpipe")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelLayout:
    dp_shard: int = 1  # FSDP: parameters, gradients and optimizer state sharded over these ranks
    dp_replicate: int = 1  # HSDP/DDP: whole replicas (each sharded over dp_shard)
    ep: int = 1  # expert parallelism: experts split over ep ranks taken from dp_shard
    tp: int = 1  # tensor parallelism: attention heads and dense-FFN columns split
    cp: int = 1  # context parallelism: the sequence split (zig-zag) with all-gathered latent KV
    pp: int = 1  # pipeline parallelism: layers split into stages
    pp_schedule: str = "1f1b"
    pp_microbatches: int = 0  # 0 = pp * pp_stages_per_rank
    pp_stages_per_rank: int = 1  # > 1 for the interleaved schedule (virtual stages)

    # --------------------------------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str | None) -> "ParallelLayout":
        """"dp_shard=2,ep=2" -> ParallelLayout. Empty or None means one rank, no parallelism."""
        if not text:
            return cls()
        known = {f.name: f for f in fields(cls)}
        values: dict[str, object] = {}
        for item in text.replace(" ", "").split(","):
            if not item:
                continue
            if "=" not in item:
                raise ConfigError(f"--parallel item '{item}' must look like NAME=VALUE, e.g. dp_shard=2")
            name, raw = item.split("=", 1)
            name = name.replace("-", "_")
            if name not in known:
                raise ConfigError(
                    f"unknown --parallel name '{name}'; valid names: {', '.join(known)}"
                )
            if name == "pp_schedule":
                values[name] = raw.lower()
                continue
            try:
                values[name] = int(raw)
            except ValueError:
                raise ConfigError(f"--parallel {name} must be an integer, got '{raw}'") from None
        layout = cls(**values)
        layout._check_values()
        return layout

    def __str__(self) -> str:
        parts = [f"{d}={getattr(self, d)}" for d in ("dp_replicate", "dp_shard", "ep", "tp", "cp", "pp")]
        if self.pp > 1:
            parts += [f"pp_schedule={self.pp_schedule}", f"pp_microbatches={self.microbatches}"]
            if self.pp_stages_per_rank > 1:
                parts.append(f"pp_stages_per_rank={self.pp_stages_per_rank}")
        return ",".join(parts)

    def replace(self, **kw) -> "ParallelLayout":
        return dataclasses.replace(self, **kw)

    # --------------------------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.pp * self.dp_replicate * self.dp_shard * self.cp * self.tp

    @property
    def dp(self) -> int:
        """Ranks that read different sequences."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_shard_mod_ep(self) -> int:
        return self.dp_shard // self.ep if self.ep and self.dp_shard % self.ep == 0 else 0

    @property
    def num_stages(self) -> int:
        return self.pp * self.pp_stages_per_rank

    @property
    def microbatches(self) -> int:
        return self.pp_microbatches or self.num_stages

    @property
    def fsdp(self) -> bool:
        """Whether parameters are sharded/replicated over data ranks (FSDP/HSDP)."""
        return self.dp_shard * self.cp > 1 or self.dp_replicate > 1

    def _check_values(self) -> None:
        for name in ("dp_shard", "dp_replicate", "ep", "tp", "cp", "pp", "pp_stages_per_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--parallel {name} must be >= 1, got {getattr(self, name)}")
        if self.pp_microbatches < 0:
            raise ConfigError(f"--parallel pp_microbatches must be >= 0 (0 = automatic), got {self.pp_microbatches}")
        if self.pp_schedule not in SCHEDULES:
            raise ConfigError(f"--parallel pp_schedule must be one of {', '.join(SCHEDULES)}, got '{self.pp_schedule}'")
        if self.pp_schedule == "interleaved" and self.pp_stages_per_rank < 2:
            raise ConfigError(
                "--parallel pp_schedule=interleaved needs pp_stages_per_rank >= 2 (virtual stages per rank); "
                "set pp_stages_per_rank=2 or use pp_schedule=1f1b"
            )
        if self.pp_schedule != "interleaved" and self.pp_stages_per_rank > 1:
            raise ConfigError(
                f"--parallel pp_stages_per_rank={self.pp_stages_per_rank} needs pp_schedule=interleaved"
            )

    # --------------------------------------------------------------------------------------------
    def validate(
        self,
        config: ModelConfig,
        world_size: int,
        *,
        seq_len: int | None = None,
        global_batch: int | None = None,
        with_mtp: bool = False,
        with_indexer_loss: bool = False,
        with_aux_losses: bool = False,
        fp8_block: int | None = None,
    ) -> None:
        """Raise ConfigError for the first degree that cannot work; the message says what to set.

        `global_batch` is the number of sequences per micro-step over all ranks; `with_mtp`,
        `with_indexer_loss` and `with_aux_losses` (z-loss/balance loss) say which losses the run
        trains, since some parallelisms do not support all of them yet. `fp8_block` (the block
        size of block-scaled FP8 weights, e.g. 128) checks that tensor parallelism cuts no block.
        """
        self._check_values()
        others = self.world_size // self.dp_shard
        if self.world_size != world_size:
            if world_size % others == 0:
                hint = f"; with the other degrees as they are, set dp_shard={world_size // others}"
            else:
                hint = (f"; no dp_shard fits the other degrees (their product {others} does not divide "
                        f"{world_size}): change them, e.g. --parallel dp_shard={world_size} alone")
            raise ConfigError(
                f"--parallel {self}: pp*dp_replicate*dp_shard*cp*tp = {self.world_size} but the world size "
                f"(--nproc * nodes) is {world_size}{hint}. Every rank must have exactly one place in the mesh"
            )
        if self.dp_shard % self.ep:
            good = [d for d in _divisors(self.dp_shard) if config.n_routed_experts % d == 0]
            raise ConfigError(
                f"--parallel ep={self.ep} must divide dp_shard={self.dp_shard} (expert-parallel ranks are taken "
                f"from the data-shard ranks); valid ep: {good}, or raise dp_shard"
            )
        if config.n_routed_experts % self.ep:
            good = [d for d in _divisors(self.dp_shard) if config.n_routed_experts % d == 0]
            raise ConfigError(
                f"--parallel ep={self.ep} must divide the {config.n_routed_experts} routed experts "
                f"(n_routed_experts); valid ep: {good}"
            )
        if self.tp > 1:
            for field_name in ("num_attention_heads", "ffn_hidden_size"):
                value = getattr(config, field_name)
                if value % self.tp:
                    good = [d for d in _divisors(world_size) if config.num_attention_heads % d == 0
                            and config.ffn_hidden_size % d == 0]
                    raise ConfigError(
                        f"--parallel tp={self.tp} must divide {field_name}={value}; valid tp: {good}"
                    )
            if fp8_block:
                self._check_fp8_blocks(config, fp8_block, world_size)
            if with_indexer_loss:
                raise ConfigError(
                    f"--parallel tp={self.tp}: the LSA indexer loss needs every attention head on one rank; "
                    "set tp=1, or train without the indexer loss (train.indexer_loss_weight=0 or model.index_n_heads=0)"
                )
            if self.cp > 1:
                raise ConfigError("--parallel tp and cp cannot both be > 1 yet; set cp=1 or tp=1")
        if config.num_layers % self.num_stages:
            good = [d for d in _divisors(config.num_layers) if d % self.pp_stages_per_rank == 0 and world_size % (d // self.pp_stages_per_rank) == 0]
            raise ConfigError(
                f"--parallel pp={self.pp} with {self.pp_stages_per_rank} stage(s) per rank makes {self.num_stages} stages, "
                f"which must divide num_layers={config.num_layers}; valid pp*pp_stages_per_rank: {good}"
            )
        if self.pp > 1:
            if self.microbatches % self.pp:
                raise ConfigError(
                    f"--parallel pp_microbatches={self.microbatches} must be a multiple of pp={self.pp}"
                )
            unsupported = [name for name, on in (("MTP heads", with_mtp), ("the LSA indexer loss", with_indexer_loss),
                                                 ("z-loss / balance loss", with_aux_losses)) if on]
            if unsupported:
                raise ConfigError(
                    f"--parallel pp={self.pp} trains only the next-token loss; {', '.join(unsupported)} would be dropped. "
                    "Set pp=1, or turn them off (train.mtp_weight=0, train.indexer_loss_weight=0, train.z_loss=0, "
                    "train.balance_loss=0)"
                )
        if self.cp > 1:
            if with_mtp:
                raise ConfigError(
                    f"--parallel cp={self.cp}: the MTP heads shift the sequence across context shards; "
                    "set cp=1 or train.mtp_weight=0"
                )
            if seq_len is not None and seq_len % (2 * self.cp):
                good = [d for d in _divisors(world_size) if seq_len % (2 * d) == 0]
                raise ConfigError(
                    f"--parallel cp={self.cp} splits each sequence into 2*cp={2 * self.cp} chunks, so seq_len={seq_len} "
                    f"must be divisible by {2 * self.cp}; valid cp: {good}"
                )
        if global_batch is not None:
            per_micro = self.dp * (self.microbatches if self.pp > 1 else 1)
            if global_batch % per_micro:
                what = f"dp_replicate*dp_shard={self.dp}" + (f" times pp_microbatches={self.microbatches}" if self.pp > 1 else "")
                raise ConfigError(
                    f"the global batch of {global_batch} sequences must be divisible by {what} = {per_micro}; "
                    f"change the batch size or the data-parallel degrees"
                )


    # --------------------------------------------------------------------------------------------
    @property
    def inference_world_size(self) -> int:
        """Ranks an inference layout runs on: in inference ep borrows its ranks from tp (every rank
        computes every token), so tp=2,ep=2 runs on 2 ranks and tp=2,ep=4 on 4."""
        return max(self.tp, self.ep)

    def validate_inference(self, config: ModelConfig, world_size: int, *, fp8_block: int | None = None) -> None:
        """Raise ConfigError for a layout generation cannot run (longcat.parallel.inference):
        only tp and ep apply, on max(tp, ep) ranks, each dividing what it splits. `fp8_block`
        (FP8-resident weights) checks that tensor parallelism cuts no weight block."""
        self._check_values()
        other = [f"{name}={getattr(self, name)}" for name in ("pp", "cp", "dp_shard", "dp_replicate")
                 if getattr(self, name) > 1]
        if other:
            raise ConfigError(
                f"--parallel {', '.join(other)}: not supported for inference, which splits a model with tp "
                "(attention heads and dense FFNs) and ep (experts) only; e.g. --parallel tp=2,ep=2"
            )
        big, small = max(self.tp, self.ep), min(self.tp, self.ep)
        if big % small:
            raise ConfigError(
                f"--parallel tp={self.tp},ep={self.ep}: for inference the smaller degree must divide the larger "
                f"(ep borrows the tp ranks); e.g. tp={self.tp},ep={self.tp} or tp={self.ep},ep={self.ep}"
            )
        if world_size != big:
            raise ConfigError(
                f"--parallel tp={self.tp},ep={self.ep} runs inference on max(tp, ep) = {big} ranks but the world "
                f"size (--nproc * nodes) is {world_size}: set --nproc {big}, or degrees whose larger is {world_size}"
            )
        if config.n_routed_experts % self.ep:
            good = [d for d in _divisors(world_size) if config.n_routed_experts % d == 0]
            raise ConfigError(
                f"--parallel ep={self.ep} must divide the {config.n_routed_experts} routed experts "
                f"(n_routed_experts); valid ep: {good}"
            )
        for field_name in ("num_attention_heads", "ffn_hidden_size"):
            value = getattr(config, field_name)
            if value % self.tp:
                good = [d for d in _divisors(world_size) if config.num_attention_heads % d == 0
                        and config.ffn_hidden_size % d == 0]
                raise ConfigError(f"--parallel tp={self.tp} must divide {field_name}={value}; valid tp: {good}")
        if fp8_block and self.tp > 1:
            self._check_fp8_blocks(config, fp8_block, world_size)

    def _check_fp8_blocks(self, config: ModelConfig, block: int, world_size: int) -> None:
        """Every dimension tensor parallelism splits must split on FP8 block boundaries: a rank's
        part of a block-scaled weight has to own whole blocks with their scales."""
        heads = config.num_attention_heads
        split = {  # the dimension each tensor-parallel weight is cut along, whole
            "q_b_proj rows (heads x qk_head_dim)": heads * (config.qk_nope_head_dim + config.qk_rope_head_dim),
            "kv_b_proj rows (heads x (qk_nope_head_dim + v_head_dim))": heads * (config.qk_nope_head_dim + config.v_head_dim),
            "o_proj columns (heads x v_head_dim)": heads * config.v_head_dim,
            "dense FFN width (ffn_hidden_size)": config.ffn_hidden_size,
        }

        def cuts(tp: int) -> str | None:
            if tp == 1:  # an unsplit weight keeps its partial last block
                return None
            return next((what for what, size in split.items() if size % tp or (size // tp) % block), None)

        cut = cuts(self.tp)
        if cut is not None:
            good = [d for d in _divisors(world_size) if cuts(d) is None]
            raise ConfigError(
                f"--parallel tp={self.tp} cuts the {block}x{block} FP8 weight blocks of {cut}: each rank's part "
                f"must be a multiple of {block}; valid tp: {good}"
            )


# ------------------------------------------------------------------------------------------------
# backend and device


def device_type_for(device: str | torch.device | None = None) -> str:
    """'cpu', 'cuda', 'npu', ... from a device name ('auto' picks the accelerator if any)."""
    import torch

    from ..devices import auto_device

    name = str(device or "auto")
    if name != "auto":
        return torch.device(name).type
    return auto_device().type


def backend_for(device_type: str) -> str:
    """The collective backend for a device: gloo (CPU), nccl (CUDA), hccl (Ascend NPU via torch_npu)."""
    if device_type == "cpu":
        return "gloo"
    if device_type == "cuda":
        return "nccl"
    if device_type == "npu":
        try:
            import torch_npu  # noqa: F401  (registers the hccl backend)
        except ImportError:
            raise ConfigError("device 'npu' needs the torch_npu package (pip install torch-npu)") from None
        return "hccl"
    import torch.distributed

    # Other accelerators register their own backend with the device; let torch pick it.
    return torch.distributed.get_default_backend_for_device(device_type)


# ------------------------------------------------------------------------------------------------
# the mesh


@dataclass
class ParallelDims:
    """The layout bound to a live world: the DeviceMesh and its named views.

    Mesh dims (outermost first): pp, dp_replicate, dp_shard_mod_ep, cp, ep, tp. Flattened views:
    dp_shard = (dp_shard_mod_ep, ep), dp = (dp_replicate, dp_shard), dp_shard_cp = (dp_shard, cp)
    where dense parameters are sharded, dp_cp = (dp, cp) over which losses and router counts are
    averaged, and edp = (dp_shard_mod_ep, cp) where expert parameters are sharded.
    """

    layout: ParallelLayout
    mesh: torch.distributed.device_mesh.DeviceMesh
    device: torch.device
    views: dict = dataclasses.field(default_factory=dict)  # flattened meshes by name
    # sequences per micro-batch over all ranks, when `setup` was told: lets the step engine accept
    # either the global batch or this rank's rows of it (global_batch / dp)
    global_batch: int | None = None

    def __getitem__(self, name: str):
        return self.views[name] if name in self.views else self.mesh[name]

    def size(self, name: str) -> int:
        return self[name].size()

    def local_rank(self, name: str) -> int:
        return self[name].get_local_rank()

    def group(self, name: str):
        return self[name].get_group()

    @property
    def dp_rank(self) -> int:
        return self.local_rank("dp")

    @property
    def fsdp_mesh(self):
        """Mesh for the dense parameters: 1-D (dp_shard_cp) or 2-D HSDP (dp_replicate, dp_shard_cp)."""
        return self._hsdp("dp_shard_cp")

    @property
    def expert_fsdp_mesh(self):
        return self._hsdp("edp")

    def _hsdp(self, shard_dim: str):
        if self.layout.dp_replicate > 1:
            from torch.distributed.device_mesh import DeviceMesh

            return DeviceMesh._concatenate([self.mesh["dp_replicate"], self.views[shard_dim]])
        return self.views[shard_dim]


# ep sits after cp so that the expert FSDP mesh (dp_shard_mod_ep, cp) and ep stay in mesh order,
# which FSDP needs to combine them.
MESH_DIMS = ("pp", "dp_replicate", "dp_shard_mod_ep", "cp", "ep", "tp")
FLATTENED = {
    "dp_shard": ("dp_shard_mod_ep", "ep"),
    "dp": ("dp_replicate", "dp_shard_mod_ep", "ep"),
    "dp_shard_cp": ("dp_shard_mod_ep", "cp", "ep"),
    "dp_cp": ("dp_replicate", "dp_shard_mod_ep", "cp", "ep"),
    "edp": ("dp_shard_mod_ep", "cp"),
}


def build_mesh(layout: ParallelLayout, device_type: str) -> ParallelDims:
    """One DeviceMesh over the whole (already initialised) world, with the flattened views."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh

    sizes = (layout.pp, layout.dp_replicate, layout.dp_shard // layout.ep, layout.cp, layout.ep, layout.tp)
    mesh = init_device_mesh(device_type, sizes, mesh_dim_names=MESH_DIMS)
    views = {name: mesh[dims]._flatten(name) for name, dims in FLATTENED.items()}
    if device_type == "cpu":
        device = torch.device("cpu")
    else:
        device = torch.device(device_type, int(os.environ.get("LOCAL_RANK", "0")))
    return ParallelDims(layout, mesh, device, views)


def init_distributed(device_type: str, *, timeout_s: float = 600.0) -> None:
    """Initialise the default process group from torchrun's environment (or a world of one)."""
    import datetime

    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device_type not in ("cpu",):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        module = getattr(torch, device_type, None)
        if module is not None and hasattr(module, "set_device"):
            module.set_device(local_rank)
    if "RANK" not in os.environ:
        # A single process without torchrun: a world of one on a free local port.
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = _restart_safe_store(timeout)
    if store is None:
        dist.init_process_group(backend_for(device_type), timeout=timeout)
    else:
        dist.init_process_group(backend_for(device_type), timeout=timeout, store=store,
                                rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def _restart_safe_store(timeout):
    """Under torchrun, the rendezvous store with a per-attempt key prefix.

    torchrun (c10d rendezvous) hands restarted workers the same store as the attempt that
    failed, with its keys still in it: process groups created after a restart can then read the
    dead workers' addresses ("Gloo connectFullMesh failed ... Connection refused"). Prefixing
    every key with the restart count keeps each attempt to itself.
    """
    if "TORCHELASTIC_RESTART_COUNT" not in os.environ or "MASTER_ADDR" not in os.environ:
        return None
    import torch.distributed as dist

    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    rank = int(os.environ["RANK"])
    base = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
        is_master=not agent_store and rank == 0, timeout=timeout, multi_tenant=True,
    )
    return dist.PrefixStore(f"longcat/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", base)


def shutdown_distributed() -> None:
    """Every distributed entry point ends here: a barrier, then destroy (else gloo may abort at exit)."""
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


__all__ = [
    "ParallelLayout", "ParallelDims", "DEGREES", "SCHEDULES", "MESH_DIMS", "build_mesh", "backend_for",
    "device_type_for", "init_distributed", "shutdown_distributed", "free_port",
]
