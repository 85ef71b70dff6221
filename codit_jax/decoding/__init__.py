"""CoDIT decoding: the score, the samplers, and the compiled two-model decode loop."""
