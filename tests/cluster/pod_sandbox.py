"""A container as a local process: the pod's netns, a private mount and UTS namespace, a tmpfs root.

The agent runs `ip netns exec NS unshare --mount --uts --propagation private python pod_sandbox.py
SPEC.json`; this script (as root, inside those namespaces) mounts a tmpfs on the spec's `root`,
mirrors the host's top-level entries into it with bind mounts, adds the --image-bind paths, mounts
the volumes over them, chroots there and execs the container's command. A directory on the way to a
mount path is recreated in the tmpfs (its host entries bound one by one), so no mount point is ever
created on the host.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC = 1, 32, 4096, 16384
PR_SET_PDEATHSIG = 1
EXIT_START_ERROR = 128  # what the kubelet reports for a container that could not start
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class Mount:
    """A host path bound at a path inside the container."""

    source: str
    target: str
    read_only: bool = False


@dataclass
class SandboxSpec:
    """Everything the launcher needs; written as JSON by the agent."""

    root: str  # an empty host dir to mount the tmpfs root on (inside the private mount namespace)
    tmp: str  # the host dir that becomes the container's /tmp
    hostname: str
    argv: list[str]
    env: dict[str, str]
    cwd: str = "/"
    image_mounts: list[Mount] = field(default_factory=list)  # the "image" content, under every volume
    mounts: list[Mount] = field(default_factory=list)  # volumes, on top (one at /models hides /models/x)
    # The test runtime itself (venv, checkout) where it lies under /tmp: over everything, so an
    # emptyDir on /tmp (the chart's operator has one) cannot hide the interpreter.
    runtime_mounts: list[Mount] = field(default_factory=list)

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self)))

    @classmethod
    def read(cls, path: Path) -> SandboxSpec:
        raw = json.loads(path.read_text())
        keys = ("image_mounts", "mounts", "runtime_mounts")
        mounts = {key: [Mount(**m) for m in raw.get(key, [])] for key in keys}
        return cls(**{**raw, **mounts})


def launch_argv(netns: str, spec_path: Path, python: str = sys.executable) -> list[str]:
    """The command that runs a container described by spec_path in netns (the agent Popens it)."""
    return [
        "ip", "netns", "exec", netns, "unshare", "--mount", "--uts", "--propagation", "private", "--",
        python, str(Path(__file__).resolve()), str(spec_path),
    ]  # fmt: skip


def exec_argv(pid: int, argv: list[str]) -> list[str]:
    """A command run inside a running container's namespaces, root and cwd (exec probes)."""
    # An absolute nsenter: the caller passes the container's environment, whose PATH may lack it.
    nsenter = shutil.which("nsenter") or "nsenter"
    return [nsenter, "-t", str(pid), "-n", "-m", "-u", "-r", "-w", "--", *argv]


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda s: s.encode() if s is not None else None  # noqa: E731
    if _libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data)):
        errno = ctypes.get_errno()
        raise OSError(errno, f"mount {source} on {target}: {os.strerror(errno)}")


def _bind(source: str, target: str, read_only: bool = False) -> None:
    _mount(source, target, None, MS_BIND | MS_REC)
    if read_only:
        _mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY)


def _resolve(path: str) -> str:
    """A mount path with host symlinks on its existing part resolved (/var/run -> /run), as runc does."""
    parts = Path(path).parts[1:]
    for i in range(len(parts), 0, -1):
        head = os.path.join("/", *parts[:i])
        if os.path.lexists(head):
            return os.path.join(os.path.realpath(head), *parts[i:])
    return path


def _mirror(host_dir: str, root: str, shadowed: set[str], skip: set[str]) -> None:
    """Recreates host_dir in the tmpfs: entries bound one by one, shadowed dirs recreated recursively."""
    for entry in os.scandir(host_dir):
        host_path, inner = entry.path, root + entry.path
        if host_path in skip:
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(host_path), inner)
        elif entry.is_dir(follow_symlinks=False):
            os.mkdir(inner)
            if host_path in shadowed:
                _mirror(host_path, root, shadowed, skip)
            else:
                _bind(host_path, inner)
        else:
            Path(inner).touch()
            try:
                _bind(host_path, inner)
            except OSError:
                os.unlink(inner)  # e.g. a file that vanished meanwhile; the container just lacks it


def build_root(spec: SandboxSpec) -> None:
    """Mounts the container's filesystem view on spec.root (in this process's mount namespace)."""
    root = spec.root.rstrip("/")
    resolve = lambda mounts: [Mount(m.source, _resolve(m.target), m.read_only) for m in mounts]  # noqa: E731
    image = [*resolve(spec.image_mounts), Mount(spec.tmp, "/tmp")]
    volumes = resolve(spec.mounts)
    runtime = resolve(spec.runtime_mounts)
    targets = {m.target for m in image + volumes + runtime}
    shadowed = {str(parent) for t in targets for parent in Path(t).parents if str(parent) != "/"}
    _mount("tmpfs", root, "tmpfs", 0, "mode=755")
    _mirror("/", root, shadowed, skip=targets)
    # The image first, then the volumes over it, then the runtime; within each, parents first.
    for group in (image, volumes, runtime):
        for m in sorted(group, key=lambda m: len(Path(m.target).parts)):
            inner = root + m.target
            if os.path.isdir(m.source):
                os.makedirs(inner, exist_ok=True)
            else:
                os.makedirs(os.path.dirname(inner), exist_ok=True)
                Path(inner).touch()
            _bind(m.source, inner, m.read_only)


def main(argv: list[str]) -> int:
    """Sets up the container's view and execs its command; only returns (128) when that fails."""
    spec = SandboxSpec.read(Path(argv[1]))
    # Die with the agent (SIGKILL of the agent included) rather than outlive it as an orphan.
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    try:
        socket.sethostname(spec.hostname)
        build_root(spec)
        os.chroot(spec.root)
        # The runtime creates a missing workingDir, as runc does.
        os.makedirs(spec.cwd, exist_ok=True)
        os.chdir(spec.cwd)
        os.execvpe(spec.argv[0], spec.argv, spec.env)
    except OSError as exc:
        print(f"pod_sandbox: cannot start {spec.argv!r}: {exc}", file=sys.stderr, flush=True)
    return EXIT_START_ERROR


if __name__ == "__main__":
    sys.exit(main(sys.argv))
