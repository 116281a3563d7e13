"""Checkpoint formats: what a directory is, reading and writing models.

safetensors_io.py (lazy, memory-mapped safetensors directories; the sharded writer), runs.py
(kinds of directory, the newest-complete-checkpoint finder), materialize.py (meta build, then each
tensor allocated and filled: shared by all readers), hf.py (Hugging Face and the published LongCat
families, BF16 and FP8), native.py (our model directory), dcp.py (the model of a multi-process
training checkpoint), loader.py (`longcat.load`), cli.py (`longcat convert`). See
docs/ARCHITECTURE.md, "Checkpoints", and docs/CHECKPOINTS.md.
"""
