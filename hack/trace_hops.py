"""Count the source files one chat request passes through, in every process of `kvrelay serve`.

Issue 12 asks whether the path of one request got shorter. This measures it instead of guessing:
each process (router, prefill worker, decode worker) runs a profiler from a `sitecustomize` that
records, while a control file says "on", every call into a file of the checkout and the nearest
checkout file that called it. A callback run by the event loop or a thread pool counts as an
entry, not as a call from the file that started the loop. One warm-up request runs first, so
lazy set-up is not counted.

    python hack/trace_hops.py [--checkout DIR]   # one JSON line: files and cross-file edges

`--checkout` measures another commit's tree (e.g. a `git worktree`) with this venv.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

URL_RE = re.compile(r"serving model '([^']+)' at (http://\S+/v1)")

# Runs inside every traced process. Kept small: it is on every call while tracing.
SITECUSTOMIZE = r"""
import atexit, json, os, sys, threading, time
_root = os.environ["KVRELAY_HOP_ROOT"]
_control = os.environ["KVRELAY_HOP_CONTROL"]
_out = os.environ["KVRELAY_HOP_OUT"]
_state = {"on": False}
_files = set()
_edges = set()
_pkg = _root + "/worker_image/kvrelay_worker/"
_dispatchers = {"_run", "run", "_bootstrap_inner", "_worker"}
_dispatch_files = ("asyncio/events.py", "threading.py", "concurrent/futures/thread.py")

def _prof(frame, event, arg):
    if not _state["on"] or event != "call":
        return
    callee = frame.f_code.co_filename
    if not callee.startswith(_pkg):
        return
    _files.add(callee)
    caller = frame.f_back
    while caller is not None and not caller.f_code.co_filename.startswith(_pkg):
        if caller.f_code.co_name in _dispatchers and caller.f_code.co_filename.endswith(_dispatch_files):
            caller = None  # run by the event loop or a thread: an entry, not a call from a file
            break
        caller = caller.f_back
    if caller is not None and caller.f_code.co_filename != callee:
        _edges.add((caller.f_code.co_filename, callee))

def _dump():
    name = os.path.join(_out, f"{os.getpid()}.json")
    with open(name, "w") as f:
        json.dump({"argv": sys.argv, "files": sorted(_files), "edges": sorted(_edges)}, f)

def _watch():
    while True:
        try:
            word = open(_control).read().strip()
        except OSError:
            word = ""
        if word == "on":
            _state["on"] = True
        elif word == "dump" and _state["on"]:
            _state["on"] = False
            _dump()
        time.sleep(0.05)

sys.setprofile(_prof)
threading.setprofile(_prof)
threading.Thread(target=_watch, daemon=True).start()
"""


def chat(base_url: str, model: str) -> str:
    body = {
        "model": model,
        "temperature": 0,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }
    request = urllib.request.Request(
        base_url + "/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.load(reply)["choices"][0]["message"]["content"]


def role_of(argv: list[str]) -> str:
    text = " ".join(argv)
    for role in ("prefill", "decode", "router"):
        if role in text:
            return role
    return "router"  # kvrelay serve runs the router in its own process


def measure(checkout: Path, work: Path) -> dict[str, object]:
    """Start `kvrelay serve --model tiny` from `checkout`, trace one request, and count."""
    site, out, control = work / "site", work / "out", work / "control"
    site.mkdir()
    out.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    control.write_text("off")
    paths = [str(site), str(checkout / "worker_image"), str(checkout / "operator")]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(paths),
        "KVRELAY_HOP_ROOT": str(checkout.resolve()),
        "KVRELAY_HOP_CONTROL": str(control),
        "KVRELAY_HOP_OUT": str(out),
    }
    command = [
        sys.executable, "-c", "from kvrelay_worker.cli import main; main()",
        "serve", "--model", "tiny", "--port", "0", "--log-dir", str(work / "logs"),
    ]  # fmt: skip
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if m := URL_RE.search(line):
                model, base_url = m.group(1), m.group(2)
                break
        else:
            raise RuntimeError("kvrelay serve exited before serving")
        chat(base_url, model)  # warm-up: lazy imports and first-call set-up are not the request path
        control.write_text("on")
        time.sleep(0.5)
        text = chat(base_url, model)
        time.sleep(0.5)
        control.write_text("dump")
        deadline = time.monotonic() + 20
        while len(list(out.glob("*.json"))) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    prefix = str(checkout.resolve() / "worker_image") + "/"
    per_role: dict[str, dict[str, int]] = {}
    all_files: set[str] = set()
    edges: set[str] = set()
    edge_total = 0
    for dump in out.glob("*.json"):
        data = json.loads(dump.read_text())
        if not data["files"]:
            continue
        files = [f.removeprefix(prefix) for f in data["files"]]
        role = role_of(data["argv"])
        per_role[role] = {"files": len(files), "cross_file_edges": len(data["edges"])}
        short = [(a.removeprefix(prefix), b.removeprefix(prefix)) for a, b in data["edges"]]
        edges.update(f"{role}: {a} -> {b}" for a, b in short)
        all_files.update(files)
        edge_total += len(data["edges"])
    return {
        "checkout": str(checkout),
        "reply": text,
        "per_process": per_role,
        "files_total": sum(r["files"] for r in per_role.values()),
        "distinct_files": len(all_files),
        "cross_file_edges_total": edge_total,
        "files": sorted(all_files),
        "edges": sorted(edges),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--list", action="store_true", help="also print the files and cross-file calls")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kvrelay-hops-") as tmp:
        result = measure(args.checkout, Path(tmp))
    files, edges = result.pop("files"), result.pop("edges")
    print(json.dumps(result))
    if args.list:
        print("\n".join([*files, *edges]))  # type: ignore[list-item]


if __name__ == "__main__":
    main()
