"""Benchmarks: side-by-side timing of our modes against each other and against PEFT."""
