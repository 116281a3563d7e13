"""Inference: batched generation over the latent MLA cache, sampling, MTP speculative decoding."""

from .engine import Engine, GenerationResult, StreamEvent, TokenLogprob
from .sampling import BatchSampler, GenerationError, SamplingParams
from .scheduler import QueueFull, Scheduler, SchedulerConfig
from .speculative import MTPDrafter, greedy_accept, rejection_accept

__all__ = [
    "Engine", "GenerationResult", "StreamEvent", "TokenLogprob", "SamplingParams", "GenerationError",
    "BatchSampler", "MTPDrafter", "greedy_accept", "rejection_accept", "Scheduler", "SchedulerConfig", "QueueFull",
]
