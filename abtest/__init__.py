"""Fleet-wide A/B decisions: intervals, always-valid guardrail tests, the shared split and its judge.

Torch-free: the judge (`mame-judge`) runs beside the servers and reads Prometheus, not the model.
See docs/ab_testing.md.
"""
