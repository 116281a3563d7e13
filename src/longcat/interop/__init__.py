"""Checkpoint formats: what a directory is, reading and writing models.

runs.py (kinds of directory, the newest-complete-checkpoint finder), hf.py (Hugging Face
LongcatFlash), native.py (our model directory), dcp.py (the model of a multi-process training
checkpoint), materialize.py (meta build + assign, shared by all readers), loader.py
(`longcat.load`), cli.py (`longcat convert`). See docs/ARCHITECTURE.md, "Checkpoints".
"""
