"""Reads each worker pod's load from its own /metrics, right before a scale-down.

The worker's endpoint, not Prometheus: it is exact and current at the moment the victims are chosen
(Prometheus is a scrape interval behind, keeps per-pod series only if the PodMonitor relabels them
with the pod's name, and may not be installed at all). Reads run concurrently with a short timeout,
so a pool of unreachable pods delays a scale-down by about one timeout, never more.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from prometheus_client.parser import text_string_to_metric_families

from kvrelay_operator.victims import PodLoad, WorkerPod

log = logging.getLogger(__name__)

DEFAULT_URL_TEMPLATE = "http://{ip}:{port}/metrics"
# The series a worker exports (worker_image/kvrelay_worker/metrics.py); one sample per model and role.
_RUNNING, _WAITING, _KV_USAGE = (
    "kvrelay_requests_running",
    "kvrelay_requests_waiting",
    "kvrelay_kv_cache_usage_ratio",
)


def parse_load(text: str) -> PodLoad:
    """PodLoad from Prometheus text exposition; a series the worker does not export yet counts as 0."""
    totals = {_RUNNING: 0.0, _WAITING: 0.0, _KV_USAGE: 0.0}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == _KV_USAGE:  # a ratio: the fullest cache if a pod reports several
                totals[_KV_USAGE] = max(totals[_KV_USAGE], float(sample.value))
            elif sample.name in totals:
                totals[sample.name] += float(sample.value)
    return PodLoad(
        running=round(totals[_RUNNING]), waiting=round(totals[_WAITING]), kv_cache_usage=totals[_KV_USAGE]
    )


def metrics_url(template: str, namespace: str, pod: WorkerPod, port: int) -> str:
    """The URL of one pod's /metrics: template fields {ip}, {port}, {pod}, {namespace}."""
    ip = pod.ip or ""
    host = f"[{ip}]" if ":" in ip else ip  # an IPv6 pod IP needs brackets in a URL
    return template.format(ip=host, port=port, pod=pod.name, namespace=namespace)


class PodLoadReader:
    """GETs /metrics of Ready pods with an IP; a pod that does not answer is left out of the result.

    The URL template is the seam tests use to serve loads for pods that have no real worker (kwok).
    """

    def __init__(self, url_template: str = DEFAULT_URL_TEMPLATE, timeout_s: float = 1.0) -> None:
        self.url_template = url_template
        self.timeout_s = timeout_s

    def _read_one(self, url: str) -> PodLoad:
        with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
            return parse_load(response.read().decode("utf-8", errors="replace"))

    def read(
        self, namespace: str, pods: Sequence[WorkerPod], port: int
    ) -> tuple[dict[str, PodLoad], dict[str, str]]:
        """(pod name -> load, pod name -> why it could not be read) for the Ready pods with an IP."""
        urls = {
            p.name: metrics_url(self.url_template, namespace, p, port)
            for p in pods
            if p.ready and p.ip and not p.terminating
        }
        if not urls:
            return {}, {}
        loads: dict[str, PodLoad] = {}
        failures: dict[str, str] = {}
        with ThreadPoolExecutor(max_workers=min(16, len(urls)), thread_name_prefix="pod-load") as pool:
            futures = {name: pool.submit(self._read_one, url) for name, url in urls.items()}
            for name, future in futures.items():
                try:
                    loads[name] = future.result()
                except Exception as exc:  # any failure (refused, timeout, HTTP error, bad text) = unknown
                    failures[name] = f"{type(exc).__name__}: {exc}"[:300]
        return loads, failures
