"""Benchmarks behind `longcat bench`: train step and decode speed against transformers, the planner
against a real run. `common` holds what they share (comparable config, prompts, a device-synchronizing timer)."""
