"""Sharded loading: each rank reads only its box of every tensor, and the boxes gathered back are
bit for bit what `longcat.load` gives in one process.

Run as a script under torchrun (the distributed test below does that), this file is the worker:
for each job in its JSON argument it builds the checkpoint's model on the meta device, lays it out
with `parallelize(load_from=...)` (or, for a "save" job, initialises it from a seed and writes a
DCP checkpoint), and rank 0 saves every gathered tensor plus what each rank read and holds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from longcat.parallel.sharded_init import mark_shard
from longcat.parallel.sharded_load import load_config, load_shards, prepare_meta_model


@pytest.fixture(scope="module")
def published_fixture(tmp_path_factory):
    """family -> a tiny published checkpoint of it, written once per module."""
    from longcat.testing import write_published

    root = tmp_path_factory.mktemp("published")
    written: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in written:
            written[family] = write_published(root / family, family)
        return written[family]

    return get


def _meta(path, dtype=None, weights_dtype=None):
    from longcat.model import build_model

    model = build_model(load_config(path), device="meta")
    return prepare_meta_model(model, dtype=dtype, weights_dtype=weights_dtype)


def _mark_rows(module: torch.nn.Module, name: str, rank: int, ways: int, dim: int = 0) -> None:
    """Replace module.<name> (parameter or buffer, on meta) by rank's 1/ways of it along `dim`, marked."""
    full = getattr(module, name)
    n = full.shape[dim] // ways
    size = list(full.shape)
    size[dim] = n
    local = torch.empty(size, dtype=full.dtype, device="meta")
    offset = [0] * full.dim()
    offset[dim] = rank * n
    if isinstance(full, torch.nn.Parameter):
        local = torch.nn.Parameter(local, requires_grad=False)
        setattr(module, name, local)
    else:
        module.register_buffer(name, local)
    mark_shard(getattr(module, name), tuple(full.shape), tuple(offset))


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.itemsize == 1:  # e4m3 has no equality kernel on every build: compare the bytes
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


# ------------------------------------------------------------------------------------------------
# one process: plain local tensors marked with mark_shard (the inference layouts)


def test_box_reads_read_only_the_box(tmp_path):
    from safetensors.torch import save_file

    from longcat.interop.safetensors_io import SafetensorsDir

    full = torch.arange(6 * 10 * 7, dtype=torch.float32).reshape(6, 10, 7)
    save_file({"w": full}, str(tmp_path / "model.safetensors"))
    source = SafetensorsDir(tmp_path)
    # (offset, size, contiguous): a box whole after its first dimension, or of one run, is one byte range
    boxes = [((2, 0, 0), (3, 10, 7), True), ((1, 3, 0), (2, 4, 7), False), ((0, 2, 3), (6, 5, 2), False),
             ((5, 9, 6), (1, 1, 1), True)]
    for offset, size, contiguous in boxes:
        cut = full[tuple(slice(o, o + n) for o, n in zip(offset, size))]
        for min_run in (0, 1 << 20):
            before = source.bytes_read
            got = source.get_box("w", offset, size, min_run_bytes=min_run)
            assert torch.equal(got, cut), (offset, size)
            read = source.bytes_read - before
            if min_run == 0 or contiguous:
                assert read == cut.numel() * 4, (offset, size, read)  # exactly the box
            else:
                assert read == size[0] * 70 * 4  # short runs: the box's rows of the first dimension
    with pytest.raises(ValueError, match="outside"):
        source.get_box("w", (5, 0, 0), (2, 10, 7))
    source.close()


def test_expert_shards_of_an_fp8_checkpoint_stay_fp8_and_read_half_the_experts(published_fixture):
    """Two expert-parallel ranks of the FP8 fixture, weights_dtype='fp8': e4m3 copied as stored,
    scales alongside, each rank reading its own experts only."""
    import longcat
    from longcat.interop.hf import open_published

    path = published_fixture("flash-fp8")
    ref = longcat.load(path, dtype=torch.bfloat16, weights_dtype="fp8").state_dict()
    opened = open_published(path)
    # every stored weight the load uses, with its FP8 block scales
    used = {k for plan in opened.plans.values() for part in plan.parts for k in (part.key, part.scale_key) if k}
    total = sum(opened.source.info[k].nbytes for k in used)
    experts = sum(opened.source.info[k].nbytes for k in used if ".experts." in k)
    opened.source.close()
    for rank in range(2):
        model = _meta(path, torch.bfloat16, "fp8")
        for layer in model.layers:
            for name in ("gate_up_proj", "down_proj", "gate_up_proj_scale_inv", "down_proj_scale_inv"):
                _mark_rows(layer.mlp.experts, name, rank, 2)
        read = load_shards([model], path, device="cpu", dtype=torch.bfloat16, weights_dtype="fp8")
        assert read == total - experts // 2
        got = model.state_dict()
        assert got["layers.0.mlp.experts.gate_up_proj"].dtype == torch.float8_e4m3fn
        assert got["layers.0.self_attn.0.q_b_proj.weight"].dtype == torch.float8_e4m3fn
        for name, value in ref.items():
            if ".experts." in name:
                half = value.shape[0] // 2
                value = value[rank * half:(rank + 1) * half]
            assert _same(got[name], value), name


def test_fp8_block_cut_by_tensor_parallel_rows_is_one_line_before_allocation(published_fixture):
    import longcat
    from longcat.config import ConfigError

    path = published_fixture("flash-fp8")
    model = _meta(path, torch.bfloat16, "fp8")
    attn = model.layers[0].self_attn[0]
    _mark_rows(attn.q_b_proj, "weight", 1, 2)  # 96 rows -> 48 per rank: inside one 128-row block
    with pytest.raises(ConfigError) as caught:
        load_shards([model], path, device="cpu", dtype=torch.bfloat16, weights_dtype="fp8")
    message = str(caught.value)
    assert "\n" not in message
    assert "'layers.0.self_attn.0.q_b_proj.weight'" in message and "2 ways" in message
    assert "tensor parallelism" in message and "weights_dtype='bf16'" in message
    assert all(p.is_meta for p in model.parameters())  # nothing was allocated
    # dequantized (weights_dtype bf16), the same split is fine: the blocks it touches are read whole
    model = _meta(path, torch.bfloat16)
    _mark_rows(model.layers[0].self_attn[0].q_b_proj, "weight", 1, 2)
    load_shards([model], path, device="cpu", dtype=torch.bfloat16)
    ref = longcat.load(path, dtype=torch.bfloat16)
    assert _same(model.layers[0].self_attn[0].q_b_proj.weight.detach(),
                 ref.layers[0].self_attn[0].q_b_proj.weight.detach()[48:])


def test_native_directory_column_shards_and_bad_inputs(tmp_path):
    """Our model directory, an fp32 model read as bf16, a row-parallel weight split by columns."""
    import longcat
    from longcat.config import ConfigError, preset
    from longcat.interop.native import save_model
    from longcat.interop.safetensors_io import CheckpointError
    from longcat.model import build_model

    path = save_model(build_model(preset("tiny"), seed=3), tmp_path / "model")
    ref = longcat.load(path, dtype=torch.bfloat16).state_dict()
    for rank in range(2):
        model = _meta(path, torch.bfloat16)
        _mark_rows(model.layers[1].self_attn[0].o_proj, "weight", rank, 2, dim=1)
        load_shards([model], path, device="cpu", dtype=torch.bfloat16)
        got = model.state_dict()
        for name, value in ref.items():
            if name == "layers.1.self_attn.0.o_proj.weight":
                value = value[:, rank * 32:(rank + 1) * 32]
            assert _same(got[name], value), name
        # the router keeps fp32, holding the bf16-rounded values as longcat.load does
        assert got["layers.0.mlp.router.classifier.weight"].dtype == torch.float32
    with pytest.raises(ConfigError, match=r"prepare_meta_model\(model, dtype=torch.bfloat16\)"):
        load_shards([_meta(path)], path, device="cpu", dtype=torch.bfloat16)
    other = build_model(preset("tiny", hidden_size=96), device="meta")
    with pytest.raises(CheckpointError, match="shape .* the model being loaded has"):
        load_shards([other], path, device="cpu")
    with pytest.raises(CheckpointError, match="weights_dtype 'int4'"):
        load_shards([_meta(path)], path, device="cpu", weights_dtype="int4")


def test_our_directory_made_fp8_quantizes_gate_and_up_on_their_own_grids(tmp_path):
    """expert_ffn_hidden_size 136 is not a multiple of 128: the stacked gate_up_proj (2 x 136 rows) has
    2 x 2 row blocks, not ceil(272 / 128) = 3. One process and a box of experts agree."""
    import longcat
    from longcat.config import preset
    from longcat.interop.native import save_model
    from longcat.model import build_model
    from longcat.model.fp8 import quantize_stacked

    source = build_model(preset("tiny", expert_ffn_hidden_size=136), seed=4)
    path = save_model(source, tmp_path / "model")
    whole = longcat.load(path, weights_dtype="fp8").layers[0].mlp.experts
    q, scale = quantize_stacked(source.layers[0].mlp.experts.gate_up_proj.detach(), 2)
    assert _same(whole.gate_up_proj.detach(), q) and _same(whole.gate_up_proj_scale_inv, scale)
    model = _meta(path, weights_dtype="fp8")
    for name in ("gate_up_proj", "gate_up_proj_scale_inv"):
        _mark_rows(model.layers[0].mlp.experts, name, 1, 2)
    load_shards([model], path, device="cpu", weights_dtype="fp8")
    assert _same(model.layers[0].mlp.experts.gate_up_proj.detach(), q[4:])
    assert _same(model.layers[0].mlp.experts.gate_up_proj_scale_inv, scale[4:])


def test_dcp_checkpoint_into_fp8_expert_shards(tmp_path):
    """A DCP run checkpoint read into FP8-resident expert shards: the box is read dense through DCP
    and quantized on its own grid, as `longcat.load(weights_dtype='fp8')` quantizes the whole."""
    import warnings

    import torch.distributed.checkpoint as dcp

    import longcat
    from longcat.config import preset
    from longcat.model import build_model

    config = preset("tiny")
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dcp says it assumes a single process
        dcp.save({"model." + k: v for k, v in build_model(config, seed=2).state_dict().items()},
                 checkpoint_id=str(step), no_dist=True)
    (step / "train_config.json").write_text(json.dumps({"model": config.to_dict()}))
    (step / "COMPLETE").write_text("")
    ref = longcat.load(tmp_path / "run", weights_dtype="fp8").state_dict()
    model = _meta(step, weights_dtype="fp8")
    for layer in model.layers:
        for name in ("gate_up_proj", "down_proj", "gate_up_proj_scale_inv", "down_proj_scale_inv"):
            _mark_rows(layer.mlp.experts, name, 1, 2)
    read = load_shards([model], tmp_path / "run", device="cpu", weights_dtype="fp8")
    assert 0 < read
    got = model.state_dict()
    assert got["layers.1.mlp.experts.down_proj"].dtype == torch.float8_e4m3fn
    for name, value in ref.items():
        if ".experts." in name:
            value = value[value.shape[0] // 2:]
        assert _same(got[name], value), name


# ------------------------------------------------------------------------------------------------
# real gloo ranks: DTensor layouts through parallelize(load_from=...)


def _worker(jobs: list[dict]) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    import longcat.interop.safetensors_io as safetensors_io
    import longcat.parallel.sharded_load as sharded_load
    from longcat.model import build_model
    from longcat.parallel.engine import parallelize, setup
    from longcat.parallel.layout import ParallelLayout, shutdown_distributed

    safetensors_io.MIN_RUN_BYTES = 0  # read run by run: what a rank reads is exactly its boxes
    loaded: list[int] = []
    load_shards_ = sharded_load.load_shards

    def recording(*args, **kwargs):
        loaded.append(load_shards_(*args, **kwargs))
        return loaded[-1]

    sharded_load.load_shards = recording
    for job in jobs:
        config = load_config(job["path"]) if "path" in job else None
        if job.get("save"):
            from longcat.config import preset

            config = preset("tiny")
        dims = setup(ParallelLayout.parse(job["layout"]), config, device="cpu", seq_len=16)
        model = build_model(config, device="meta")
        pm = parallelize(model, dims, seq_len=16, seed=5, load_from=job.get("path"))
        if job.get("save"):
            import torch.distributed.checkpoint as dcp

            out = Path(job["save"])
            dcp.save({"model." + k: v for k, v in pm.module.state_dict().items()}, checkpoint_id=str(out))
            if dist.get_rank() == 0:
                (out / "train_config.json").write_text(json.dumps({"model": config.to_dict()}))
                (out / "COMPLETE").write_text("")
            dist.barrier()
            continue
        state, boxes = {}, {}
        for name, p in [*pm.module.named_parameters(), *pm.module.named_buffers()]:
            state[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().cpu().clone()
            boxes[name] = (p.to_local() if isinstance(p, DTensor) else p).numel()
        for stage in pm.stages:  # a pipeline stage's RoPE table is its own buffer
            for name, b in stage.named_buffers():
                state.setdefault(name, b.detach().cpu().clone())
        everything: list = [None] * dist.get_world_size()
        dist.all_gather_object(everything, (state, boxes, loaded[-1]))
        if dist.get_rank() == 0:
            merged: dict[str, torch.Tensor] = {}
            for rank_state, _, _ in everything:  # pipeline stages: each rank holds some layers
                merged.update(rank_state)
            torch.save({"state": merged, "boxes": [b for _, b, _ in everything], "read": [r for *_, r in everything]},
                       job["out"])
        dist.barrier()
    shutdown_distributed()


def _launch(tmp_path: Path, jobs: list[dict], nproc: int = 2) -> None:
    from longcat.parallel.launch import launch

    proc = launch([str(Path(__file__).resolve()), json.dumps(jobs)], nproc=nproc, threads_per_rank=1, timeout=300,
                  capture=True)
    assert proc.returncode == 0, proc.stdout[-6000:]


def _assert_matches_one_process(result: dict, path, label: str) -> None:
    import longcat

    reference = longcat.load(path)
    expected = {**dict(reference.named_parameters()), **dict(reference.named_buffers())}
    if "pp=" in label:  # pipeline stages hold no MTP heads
        expected = {k: v for k, v in expected.items() if not k.startswith("mtp.")}
    got = result["state"]
    assert set(got) == set(expected), f"{label}: {sorted(set(got) ^ set(expected))[:5]}"
    for name, value in expected.items():
        # the ranks hold fp32 (training); one process keeps the stored dtype: the same values
        assert torch.equal(got[name], value.detach().to(got[name].dtype)), f"{label}: {name} differs from longcat.load"


def test_two_ranks_read_only_their_boxes_and_gather_to_longcat_load(tmp_path, published_fixture):
    from longcat.interop.hf import open_published

    flash, fp8 = published_fixture("flash"), published_fixture("flash-fp8")
    dcp_dir = tmp_path / "run" / "checkpoints" / "step_00000003"
    jobs = [
        {"path": str(flash), "layout": "dp_shard=2,ep=2", "bf16_boxes": True},
        {"path": str(flash), "layout": "tp=2", "bf16_boxes": True},
        {"path": str(fp8), "layout": "dp_shard=2"},
        {"save": str(dcp_dir), "layout": "dp_shard=2"},
        {"path": str(tmp_path / "run"), "layout": "tp=2"},
        {"path": str(tmp_path / "run"), "layout": "dp_shard=2,ep=2"},
    ]
    for i, job in enumerate(jobs):
        job["out"] = str(tmp_path / f"job{i}.pt")
    _launch(tmp_path, jobs)
    opened = open_published(flash)
    total = sum(p.nbytes for p in opened.plans.values())
    opened.source.close()
    for job in jobs:
        if job.get("save"):
            continue
        label = f"{Path(job['path']).name} on {job['layout']}"
        result = torch.load(job["out"], weights_only=False)
        _assert_matches_one_process(result, job["path"], label)
        if job.get("bf16_boxes"):
            # every stored tensor is bf16 and read run by run: exactly 2 bytes per element of the boxes
            # (the RoPE table is computed, not read)
            for boxes, read in zip(result["boxes"], result["read"]):
                held = sum(n for name, n in boxes.items() if name != "rotary.inv_freq")
                assert read == 2 * held, f"{label}: read {read} bytes for {held} elements"
                assert read < (0.55 if "dp_shard" in job["layout"] else 0.95) * total, f"{label}: read {read} of {total}"
    # DCP: each rank reads the saved chunks its boxes overlap. Saved on dp_shard=2 (row halves of every
    # tensor), dp_shard=2,ep=2 needs one half of each; tp=2 both halves of what it keeps whole
    whole = sum(f.stat().st_size for f in dcp_dir.glob("*.distcp"))
    for job, share in ((jobs[4], 0.95), (jobs[5], 0.55)):
        read = torch.load(job["out"], weights_only=False)["read"]
        assert max(read) < share * whole, f"DCP on {job['layout']}: read {read} of {whole}"


@pytest.mark.slow
def test_four_ranks_combined_layouts_read_only_their_boxes(tmp_path, published_fixture):
    """FSDP over TP (strided shards) and pipeline stages with FSDP and EP inside, on 4 gloo ranks."""
    flash = published_fixture("flash")
    jobs = [{"path": str(flash), "layout": "dp_shard=2,tp=2"}, {"path": str(flash), "layout": "pp=2,dp_shard=2,ep=2"}]
    for i, job in enumerate(jobs):
        job["out"] = str(tmp_path / f"job{i}.pt")
    _launch(tmp_path, jobs, nproc=4)
    for job in jobs:
        label = f"{Path(job['path']).name} on {job['layout']}"
        result = torch.load(job["out"], weights_only=False)
        _assert_matches_one_process(result, job["path"], label)
        for boxes, read in zip(result["boxes"], result["read"]):
            held = sum(n for name, n in boxes.items() if name != "rotary.inv_freq")
            assert read == 2 * held, f"{label}: read {read} bytes for {held} elements"


@pytest.mark.slow
def test_a_stage_on_two_ranks_starts_from_the_run_it_names(tmp_path, corpus):
    """`longcat train --stage yarn --init-from RUN --nproc 2`: the ranks read RUN's weights box by box.
    With a vanishing lr (1e-30: updates far below any weight's rounding) and no router-bias update,
    the stage's final (DCP) checkpoint holds them unchanged."""
    import subprocess

    import longcat
    from longcat.cli import main

    common = ["--threads", "1", "--no-progress", "--peak-tflops", "1", "--data", str(corpus),
              "--set", "train.micro_batch=2", "--set", "train.tensorboard=false", "--set", "train.eval_batches=1",
              "--set", "train.sample_tokens=2", "--set", "train.seq_len=32", "--set", "train.device=cpu"]
    pre, stage = tmp_path / "pre", tmp_path / "stage"
    assert main(["train", "--preset", "tiny", *common, "--out", str(pre), "--steps", "2",
                 "--set", "model.max_position_embeddings=64"]) == 0
    proc = subprocess.run([sys.executable, "-m", "longcat.cli", "train", "--stage", "yarn", "--init-from", str(pre),
                           "--yarn-factor", "2", *common, "--out", str(stage), "--steps", "1", "--nproc", "2",
                           "--parallel", "dp_shard=2,ep=2", "--set", "train.lr=1e-30", "--set", "train.router_bias_rate=0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    before, after = longcat.load(pre).state_dict(), longcat.load(stage).state_dict()
    assert set(before) == set(after)
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=1e-25, msg=name)


if __name__ == "__main__":
    _worker(json.loads(sys.argv[1]))
