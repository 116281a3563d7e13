"""Accelerators (a TOML catalog in longcat/catalog/hardware/) and software stacks (named profiles).

Every hardware number lives in a TOML file, in a table that says where it comes from:
`[vendor]` (published by the vendor), `[estimated]` (our estimate, with a reason in `[notes]`) or
`[measured]` (`longcat plan calibrate`). Any field can be overridden from the command line
(`--hw-set gemm_efficiency=0.6`), which marks it `override`. A file may start from another entry
with `inherit = "h100"`.

The efficiency factors are the planner's only free constants, and there is one set per
accelerator: the same A100 factors serve every row of the Megatron validation table.
"""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..catalog import catalog_file, catalog_names
from ..config import ConfigError

SOURCES = ("vendor", "estimated", "measured")


@dataclass
class Hardware:
    name: str = "accelerator"
    description: str = ""
    # --- compute and memory ---------------------------------------------------------------------------
    peak_tflops_bf16: float = 0.0  # dense, no sparsity
    peak_tflops_fp8: float = 0.0  # 0 = no FP8 (FP8 runs at the BF16 rate)
    # fp32 matmuls (an LSA indexer's scores and its training target run in fp32); 0 = half the BF16 rate
    peak_tflops_fp32: float = 0.0
    hbm_gib: float = 0.0
    hbm_bandwidth_gbs: float = 0.0
    # --- interconnect (per chip, one direction) --------------------------------------------------------------
    scaleup_domain: int = 1  # chips in one NVLink / HCCS / UB domain
    scaleup_bandwidth_gbs: float = 0.0
    scaleout_bandwidth_gbs: float = 0.0  # NIC bandwidth per chip
    # --- efficiency factors: achieved fraction of the peaks above -----------------------------------------
    gemm_efficiency: float = 0.7  # large bf16/fp8 GEMMs in a training step
    expert_gemm_efficiency: float = 0.0  # grouped GEMMs over many small experts (0: same as gemm_efficiency)
    attention_efficiency: float = 0.5  # attention core (flash kernels, or batched GEMMs over heads)
    # attention given an explicit (query, key) mask: the kernel computes every key, none skipped as
    # a causal kernel skips the future (LSA's keep-mask on a runtime without a sparse kernel);
    # FLOPs counted over all keys; 0 = attention_efficiency
    masked_attention_efficiency: float = 0.0
    memory_efficiency: float = 0.7  # element-wise kernels vs HBM bandwidth
    # element-wise kernels over blocks that stay in cache (a fused loss's blocks), bytes moved per
    # second; 0 = not known: they run at the HBM rate above
    cache_elementwise_gbs: float = 0.0
    scaleup_efficiency: float = 0.75  # collective bus bandwidth vs link bandwidth
    scaleout_efficiency: float = 0.8
    collective_latency_us: float = 20.0  # fixed cost of one collective or point-to-point message
    kernel_overhead_us: float = 4.0  # launch/dispatch cost per kernel (eager PyTorch on a CPU: ~10s of us)
    reserved_gib: float = 3.0  # runtime context and allocator slack, not available to tensors
    # the GEMM library's per-shape kernel cache (oneDNN on CPUs; `longcat plan calibrate` measures it)
    library_cache_gib: float = 0.0  # its plateau
    library_cache_per_shape_mib: float = 0.0  # its growth per linear-layer shape (forward + backward)
    # resident memory the host allocator keeps beyond the live tensors at a step's peak, as a share of
    # them: glibc malloc's heap holds freed chunks between live ones (mallopt(3); `longcat plan
    # calibrate` measures it). 0 = none: a device allocator's pool is counted in reserved_gib
    allocator_retention: float = 0.0
    # --- reliability and storage -------------------------------------------------------------------------------
    chip_mtbf_hours: float = 50000.0  # mean time between job-stopping failures, per chip
    restart_minutes: float = 15.0  # detect, reschedule, reload after a failure
    storage_write_gbs_per_chip: float = 1.0  # checkpoint write bandwidth each chip can drive
    storage_write_gbs_max: float = 2000.0  # the file system's aggregate ceiling

    provenance: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)
    notes: dict[str, str] = dataclasses.field(default_factory=dict, repr=False)

    def validate(self) -> None:
        for name in ("peak_tflops_bf16", "hbm_gib", "hbm_bandwidth_gbs"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"hardware '{self.name}': field '{name}' must be > 0 (set it in the TOML or with --hw-set)")
        if self.expert_gemm_efficiency == 0:
            self.expert_gemm_efficiency = self.gemm_efficiency
        if self.masked_attention_efficiency == 0:
            self.masked_attention_efficiency = self.attention_efficiency
        if self.peak_tflops_fp32 == 0:
            self.peak_tflops_fp32 = self.peak_tflops_bf16 / 2
        for name in ("gemm_efficiency", "expert_gemm_efficiency", "attention_efficiency", "masked_attention_efficiency",
                     "memory_efficiency", "scaleup_efficiency", "scaleout_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"hardware '{self.name}': '{name}' must be in (0, 1], got {getattr(self, name)}")
        if self.allocator_retention < 0:
            raise ConfigError(f"hardware '{self.name}': allocator_retention must be >= 0 (a share of the live tensors), "
                              f"got {self.allocator_retention}")
        if self.scaleup_domain < 1:
            raise ConfigError(f"hardware '{self.name}': scaleup_domain must be >= 1")

    def peak_tflops(self, precision: str) -> float:
        if precision == "fp8" and self.peak_tflops_fp8 > 0:
            return self.peak_tflops_fp8
        return self.peak_tflops_bf16

    def group_bandwidth(self, size: int, stride: int) -> float:
        """Achieved per-chip bandwidth (bytes/s) of a collective over `size` ranks spaced `stride` apart.

        Ranks are numbered with the tensor-parallel dimension innermost, so a group fits in one
        scale-up domain when size * stride <= domain. A group that spans domains is limited by the
        NICs: with k members per domain, rings run through k NICs at once (NCCL/HCCL use one ring
        per NIC), so the bus bandwidth is k times the per-chip NIC rate, capped by the scale-up link.
        """
        if size <= 1:
            return float("inf")
        up = self.scaleup_bandwidth_gbs * self.scaleup_efficiency * 1e9
        if size * stride <= self.scaleup_domain:
            return up
        per_domain = max(1, min(size, self.scaleup_domain // max(1, stride)))
        return min(up, per_domain * self.scaleout_bandwidth_gbs * self.scaleout_efficiency * 1e9)

    def fields_table(self) -> list[tuple[str, Any, str, str]]:
        out = []
        for f in fields(self):
            if f.name in ("provenance", "notes", "name", "description"):
                continue
            out.append((f.name, getattr(self, f.name), self.provenance.get(f.name, "default"), self.notes.get(f.name, "")))
        return out

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("provenance", "notes")}
        d["provenance"] = dict(self.provenance)
        return d


_HW_FIELDS = {f.name for f in fields(Hardware)} - {"provenance", "notes", "name", "description"}


def _coerce(name: str, value: Any, where: str) -> Any:
    kind = typing.get_type_hints(Hardware)[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}: hardware field '{name}' must be a number, got {value!r}")
    if kind is int:
        if float(value) != int(value):
            raise ConfigError(f"{where}: hardware field '{name}' must be an integer, got {value!r}")
        return int(value)
    return float(value)


def hardware_names() -> list[str]:
    return catalog_names("hardware")


def _resolve_path(spec: str) -> Path:
    path = Path(spec)
    if path.suffix == ".toml" and path.exists():
        return path
    candidate = catalog_file("hardware", spec.lower())
    if candidate is not None:
        return candidate
    hint = " (run `longcat plan calibrate` to create it)" if spec == "cpu-local" else ""
    raise ConfigError(f"unknown hardware '{spec}'{hint}; choose one of: {', '.join(hardware_names())}, or pass a FILE.toml")


def load_hardware(spec: str, overrides: dict[str, Any] | None = None, _seen: tuple[str, ...] = ()) -> Hardware:
    """A catalog name (longcat/catalog/hardware/NAME.toml) or a TOML file, then command-line overrides."""
    path = _resolve_path(spec)
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cannot parse {path}: {exc}") from exc
    if "inherit" in data:
        parent = data["inherit"]
        if parent in _seen:
            raise ConfigError(f"{path}: 'inherit' loops through {parent}")
        hw = load_hardware(parent, None, _seen + (spec,))
    else:
        hw = Hardware()
    hw.name = data.get("name", path.stem)
    hw.description = data.get("description", hw.description)
    known_top = {"name", "description", "inherit", "notes", *SOURCES}
    unknown_top = sorted(set(data) - known_top)
    if unknown_top:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown_top)}; put fields under [vendor], [estimated] or [measured]")
    for source in SOURCES:
        for name, value in data.get(source, {}).items():
            if name not in _HW_FIELDS:
                raise ConfigError(f"{path}: unknown hardware field '{name}' in [{source}]; valid: {', '.join(sorted(_HW_FIELDS))}")
            setattr(hw, name, _coerce(name, value, str(path)))
            hw.provenance[name] = source
    hw.notes.update({k: str(v) for k, v in data.get("notes", {}).items()})
    for name, value in (overrides or {}).items():
        if name not in _HW_FIELDS:
            raise ConfigError(f"unknown hardware field '{name}' in --hw-set; valid: {', '.join(sorted(_HW_FIELDS))}")
        setattr(hw, name, _coerce(name, value, "--hw-set"))
        hw.provenance[name] = "override"
    hw.validate()
    return hw


def parse_assignments(items: list[str] | None, what: str) -> dict[str, Any]:
    """["gemm_efficiency=0.6", "flash_attention=false"] -> {name: number|bool}."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"{what} '{item}' must look like FIELD=VALUE")
        name, raw = (s.strip() for s in item.split("=", 1))
        name = name.replace("-", "_")
        low = raw.lower()
        if low in ("true", "false"):
            out[name] = low == "true"
            continue
        try:
            out[name] = float(raw)
        except ValueError:
            raise ConfigError(f"{what} '{item}': value must be a number or true/false") from None
    return out


# ------------------------------------------------------------------------------------------------------
# software stacks: what the training framework overlaps and fuses. These are facts about the code
# that ran, not tuning knobs: the Megatron-LM of 2021 had no flash attention, no sequence
# parallelism and no communication overlap; a current stack has all three.


@dataclass
class Stack:
    name: str = "modern"
    flash_attention: bool = True  # fused attention: no S x S scores in memory; causal blocks skipped
    sequence_parallel: bool = True  # norms/dropout regions split over TP ranks (Korthikanti 2022)
    tp_overlap: float = 0.0  # share of TP collectives hidden behind GEMMs
    overlap_grad_reduce: bool = True  # DP reduce in buckets during the last backward, param gather in the first forward
    grad_reduce_bytes: float = 4.0  # gradient element size on the wire (fp32 reduce)
    pp_scatter_gather: bool = True  # stage-boundary sends split across the TP ranks' links
    balance_stages: bool = True  # uneven layer counts so the head/embedding stages are not slower
    fp8_activation_cache: bool = False  # with --precision fp8: GEMM inputs kept in e4m3 + 1x128 scales (DeepSeek-V3 §3.3.2)
    optimizer_state_bytes: float = 4.0  # bytes per AdamW moment (DeepSeek-V3 keeps them in bf16: 2)
    ema: bool = False  # an fp32 EMA copy of the weights
    ema_offload: bool = False  # ... kept in host memory, updated asynchronously (DeepSeek-V3 §3.3.1): no device memory
    logits_bytes: float = 6.0  # per logit element kept: bf16 logits + fp32 log-probabilities
    logits_backward_bytes: float = 6.0  # transient per logit element in the loss backward (fused: fp32 grad + bf16 grad)
    # Fused linear cross-entropy (Liger Kernel's FusedLinearCrossEntropy, Hsu et al. 2024; Apple's
    # Cut Cross-Entropy, Wijmans et al. 2024; longcat.model.cross_entropy): the head's logits are
    # made a block of rows at a time, turned into the loss and the gradients at once and dropped,
    # so no (tokens, vocab) tensor is ever held and the logits_* fields above do not apply.
    # 0 = unfused. > 0: bytes of one block's fp32 logits (rows = this / (4 * vocab), at least
    # loss_block_min_rows); the step keeps each head's hidden-state gradient (compute dtype) and
    # fp32 head-weight gradient instead.
    loss_block_bytes: float = 0.0
    loss_block_min_rows: float = 128.0
    # Routed experts' grouped GEMMs on rows padded with zeros to bucketed counts
    # (longcat.model.moe.bucketed_count, on CPU): a GEMM library that builds a kernel per shape
    # (oneDNN) then sees a few sizes again and again instead of a new size per expert and step.
    # 0 = exact row counts; > 0: each expert's rows rounded up to a multiple of 1/this of their
    # power of two, at least expert_row_bucket_min rows (the padding is real work on zeros).
    expert_row_buckets: float = 0.0
    expert_row_bucket_min: float = 16.0
    optimizer_traffic_bytes: float = 30.0  # AdamW step bytes per local parameter: fused kernel (fp32 master, m, v, grad, bf16 copy)
    persistent_grads: bool = True  # gradients live in a buffer for the whole step (Megatron, FSDP), not set to None
    elementwise_passes: float = 1.0  # traffic of a block's element-wise work relative to fused kernels
    eager_autograd: bool = False  # op-by-op autograd keeps intermediates fused kernels drop (Architecture.layer_tensors)
    # LSA/DSA training attention: True, a sparse kernel reads only each query's selected keys
    # (DeepSeek-V3.2's FlashMLA sparse kernels); False, dense attention under the keep-mask (every
    # key computed), with the selection and the indexer's KL target materialized per (query, key)
    # (Architecture.lsa_dense_runtime)
    sparse_attention_kernel: bool = True

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


STACKS: dict[str, Stack] = {
    "modern": Stack(),
    # Narayanan et al. 2021 (Megatron-LM at 3072 A100s): fp16, full masked softmax, no sequence
    # parallelism, blocking TP all-reduces, DP all-reduce after the pipeline flush, scatter/gather
    # stage-boundary sends, every stage holds L/p layers (embedding and head added on top).
    "megatron-2021": Stack(
        name="megatron-2021", flash_attention=False, sequence_parallel=False, tp_overlap=0.0,
        overlap_grad_reduce=False, grad_reduce_bytes=2.0, pp_scatter_gather=True, balance_stages=False,
    ),
    # DeepSeek-V3's FP8 training framework (DeepSeek-AI 2024, §3.2-3.3): FP8 GEMM inputs cached for
    # the backward (1x128 tile scales), AdamW moments in bf16, an EMA of the weights in host memory.
    # Recompute of norms and MLA up-projections and the DualPipe overlap are layout choices
    # (recompute=norm_up, ep_schedule=dualbatch).
    "deepseek-v3": Stack(name="deepseek-v3", fp8_activation_cache=True, optimizer_state_bytes=2.0, ema=True,
                         ema_offload=True),
    # One PyTorch process as `longcat train` runs it: SDPA (flash kernels), torch.optim.AdamW in
    # its single-tensor form (eight passes over the state: 80 bytes per parameter), gradients set to
    # None between steps, the fused chunked cross-entropy of longcat.model.cross_entropy (8 MiB of
    # fp32 logits per block, at least 128 rows: its BLOCK_BYTES and MIN_BLOCK_ROWS; with
    # loss_block_bytes=0 the unfused F.cross_entropy path: fp32 log-probabilities kept, the backward
    # holding two fp32 gradients and a bf16 one per logit), and element-wise
    # chains run op by op: an RMSNorm makes ~7 passes over its tensor where a fused kernel makes 2,
    # SwiGLU 5 instead of 3, a residual add 3 either way -- about twice the fused traffic over a block.
    # On CPU the experts' rows are padded to 8 bucketed sizes per octave, at least 16
    # (longcat.model.moe.bucketed_count); LSA runs as dense SDPA under a keep-mask, with no sparse
    # kernel (model/attention.py).
    "pytorch-eager": Stack(
        name="pytorch-eager", flash_attention=True, sequence_parallel=False, overlap_grad_reduce=True,
        optimizer_traffic_bytes=80.0, logits_backward_bytes=10.0, persistent_grads=False, elementwise_passes=2.0,
        eager_autograd=True, loss_block_bytes=float(8 << 20), loss_block_min_rows=128.0, expert_row_buckets=8.0,
        expert_row_bucket_min=16.0, sparse_attention_kernel=False,
    ),
}


def load_stack(name: str, overrides: dict[str, Any] | None = None) -> Stack:
    if name not in STACKS:
        raise ConfigError(f"unknown software stack '{name}'; choose one of: {', '.join(STACKS)}")
    stack = dataclasses.replace(STACKS[name])
    hints = typing.get_type_hints(Stack)
    for key, value in (overrides or {}).items():
        if key == "ep_overlap":
            raise ConfigError("--stack-set ep_overlap is gone: the overlap follows from the schedule, "
                              "--layout ep_schedule=dualbatch|shortcut|none")
        if key not in hints or key == "name":
            raise ConfigError(f"unknown stack field '{key}' in --stack-set; valid: {', '.join(k for k in hints if k != 'name')}")
        if hints[key] is bool:
            if not isinstance(value, bool):
                raise ConfigError(f"--stack-set {key} must be true or false")
        elif isinstance(value, bool):
            raise ConfigError(f"--stack-set {key} must be a number")
        else:
            value = float(value)
        setattr(stack, key, value)
    return stack


__all__ = ["Hardware", "Stack", "STACKS", "load_hardware", "load_stack", "hardware_names", "parse_assignments"]
