"""Evaluations that run the inference engine over generated tasks (`longcat eval ...`)."""
