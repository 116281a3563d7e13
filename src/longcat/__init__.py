"""longcat: train, run, serve and plan LongCat-class MoE language models."""

from .config import ConfigError, ModelConfig, load_config, preset

__version__ = "0.1.0"


def load(path, **kwargs):
    """Load a model from a Hugging Face LongcatFlash directory, our model directory, a training run
    directory (its newest complete checkpoint, one process or several) or one checkpoint step_N."""
    from .interop.loader import load

    return load(path, **kwargs)


def save_hf(model, path, **kwargs):
    """Write the Hugging Face layout (config.json + safetensors, one key per expert)."""
    from .interop.hf import save_hf

    return save_hf(model, path, **kwargs)


__all__ = ["ConfigError", "ModelConfig", "load_config", "preset", "load", "save_hf", "__version__"]
