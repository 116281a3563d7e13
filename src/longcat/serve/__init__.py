"""`longcat serve`: an OpenAI-compatible HTTP server over the inference engine."""
