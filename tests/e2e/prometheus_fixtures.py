"""A throwaway real Prometheus (Debian package) for e2e tests, and the small helpers around it."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml
from kvrelay_worker.ports import free_port
from kvrelay_worker.processes import stop_process


def query(url: str, expr: str) -> list[dict[str, Any]]:
    """Instant query against Prometheus at `url`; the result vector (raises on a PromQL error)."""
    full = f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(full, timeout=10) as response:
        body = json.load(response)
    assert body["status"] == "success", body
    return body["data"]["result"]


@contextlib.contextmanager
def run_prometheus(
    workdir: Path,
    jobs: dict[str, list[str]],
    rules: str = "",
    scrape_interval_s: float = 1,
    scrape_configs: Sequence[dict[str, Any]] = (),
    host: str = "127.0.0.1",
) -> Iterator[str]:
    """Prometheus scraping `jobs` (job name -> host:port targets) and any further `scrape_configs`,
    evaluating `rules`, listening on `host`; always stopped."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus not on PATH: run hack/install-prometheus.sh")
    config: dict[str, Any] = {
        "global": {"scrape_interval": f"{scrape_interval_s:g}s", "evaluation_interval": "2s"},
        "scrape_configs": [
            *({"job_name": job, "static_configs": [{"targets": targets}]} for job, targets in jobs.items()),
            *scrape_configs,
        ],
    }
    if rules:
        (workdir / "kvrelay-alerts.rules.yaml").write_text(rules)
        config["rule_files"] = [str(workdir / "kvrelay-alerts.rules.yaml")]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port(host)
    url = f"http://{host}:{port}"
    with (workdir / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(binary), f"--config.file={workdir / 'prometheus.yml'}",
             f"--storage.tsdb.path={workdir / 'data'}", f"--web.listen-address={host}:{port}",
             "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(
                        f"prometheus exited: {(workdir / 'prometheus.log').read_text()[-2000:]}"
                    )
                with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError("prometheus not ready after 60 s")
                time.sleep(0.3)
            yield url
        finally:
            stop_process(proc, grace_s=15)
