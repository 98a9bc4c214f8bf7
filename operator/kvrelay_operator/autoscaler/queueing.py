"""Queueing math for sizing the prefill pool against a TTFT quantile (pure, stdlib only).

The prefill pool is one queue in front of `c` replicas (the router sends work to the least
loaded one), so we model it as M/M/c: the waiting-time tail is P(W > t) = C(c, a) e^{-(c mu - lam) t}
with C the Erlang-C probability of waiting. Ignoring queueing here is the classic way TTFT-driven
autoscalers under-provision under load (their TTFT model only has the prefill time).
"""

from __future__ import annotations

import math


def erlang_c(num_servers: int, offered_load: float) -> float:
    """Probability that an arrival waits in an M/M/c queue with offered load a = lam / mu."""
    if offered_load <= 0:
        return 0.0
    if offered_load >= num_servers:
        return 1.0
    # Iterative Erlang-B then convert: stable for large c, no factorials.
    erlang_b = 1.0
    for k in range(1, num_servers + 1):
        erlang_b = offered_load * erlang_b / (k + offered_load * erlang_b)
    rho = offered_load / num_servers
    return erlang_b / (1.0 - rho + rho * erlang_b)


def wait_quantile(num_servers: int, arrival_rate: float, service_rate: float, quantile: float) -> float:
    """Queueing delay (seconds) at `quantile` for M/M/c; inf when the pool is overloaded."""
    if arrival_rate <= 0:
        return 0.0
    if num_servers <= 0 or arrival_rate >= num_servers * service_rate:
        return math.inf
    p_wait = erlang_c(num_servers, arrival_rate / service_rate)
    tail = 1.0 - quantile
    if p_wait <= tail:
        return 0.0
    return math.log(p_wait / tail) / (num_servers * service_rate - arrival_rate)


def servers_for_wait(
    arrival_rate: float,
    service_rate: float,
    quantile: float,
    wait_budget: float,
    max_utilization: float,
    limit: int = 4096,
) -> int:
    """Fewest servers keeping utilization <= max_utilization and the wait quantile <= wait_budget."""
    if arrival_rate <= 0:
        return 0
    num = max(1, math.ceil(arrival_rate / (service_rate * max_utilization) - 1e-9))
    while num < limit and wait_quantile(num, arrival_rate, service_rate, quantile) > wait_budget:
        num += 1
    return num
