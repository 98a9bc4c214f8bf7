"""SLO autoscaler: pure policy (`policy.decide`), Prometheus reader, kopf actuation hook.

`types` and `policy` import neither kubernetes, kopf nor torch, so the benchmark and the unit
tests drive the very same decision code on a virtual clock.
"""
