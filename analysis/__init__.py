"""Analysis over traces: residual dynamics, projections, prompt sets, benchmarks."""
