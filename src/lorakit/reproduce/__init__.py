"""Reproductions of the papers' claims: each runs an experiment and writes JSON/CSV and a PNG."""
