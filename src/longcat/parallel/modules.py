"""Small helpers to walk a LongCat model whatever parallelism reshaped it."""

from __future__ import annotations

from collections.abc import Iterator

from torch import nn


def decoder_layers(model: nn.Module) -> Iterator[nn.Module]:
    """The decoder layers a model (or a pipeline stage) holds, in order."""
    layers = model.layers
    yield from (layers.values() if isinstance(layers, nn.ModuleDict) else layers)


def indexed_layers(model: nn.Module) -> Iterator[tuple[int, nn.Module]]:
    """(global layer index, layer): pipeline stages keep the full model's indices as keys."""
    layers = model.layers
    if isinstance(layers, nn.ModuleDict):
        yield from ((int(k), v) for k, v in layers.items())
    else:
        yield from enumerate(layers)


def mtp_layers(model: nn.Module) -> list[nn.Module]:
    return list(getattr(model, "mtp", None) or [])


__all__ = ["decoder_layers", "indexed_layers", "mtp_layers"]
