"""Test and example helpers: tiny checkpoints in the published LongCat layouts (`published`)."""

from .published import FIXTURE_FAMILIES, published_config, published_tensors, write_published

__all__ = ["FIXTURE_FAMILIES", "published_config", "published_tensors", "write_published"]
