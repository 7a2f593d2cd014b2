"""gapt benchmarks: each module measures one thing as a ratio against a baseline (see README.md)."""
