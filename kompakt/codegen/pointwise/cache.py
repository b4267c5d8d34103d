"""An on-disk, content-addressed cache of rendered kernels.

Triton's ``@jit`` reads a kernel's source through ``inspect``, so a generated kernel must live in
a real file. Each source is written once to ``<cache_dir>/pointwise_<hash16>.py``, where hash16
is the first 16 hex digits of the sha256 of its text, then imported and memoized per process.

Only text we rendered is ever executed: the file's content is checked against the full sha256
before use (a file that does not match is rewritten), and the verified text itself is what runs
and what Triton parses, not a second read of the file.

Ahead-of-time compiles name a kernel ``"kompakt.codegen.pointwise.cache:pointwise_<hash16>"``:
this module's ``__getattr__`` loads that file (hash checked) in the compiling subprocess, which
inherits ``KOMPAKT_CACHE_DIR``. No triton import here; the generated file imports it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import linecache
import os
import re
import sys
import tempfile
from pathlib import Path

from kompakt.codegen.pointwise.render import KERNEL_NAME
from kompakt.errors import CodegenError

PREFIX = "pointwise_"
_STEM = re.compile(r"pointwise_[0-9a-f]{16}")
_LOADED: dict[str, object] = {}  # full sha256 -> jit function


def cache_dir() -> Path:
    """``$KOMPAKT_CACHE_DIR`` or ``~/.cache/kompakt/kernels``, created if missing."""
    configured = os.environ.get("KOMPAKT_CACHE_DIR")
    path = Path(configured) if configured else Path.home() / ".cache" / "kompakt" / "kernels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def source_hash(source: str) -> str:
    """sha256 hex digest of the source's UTF-8 bytes."""
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


def module_stem(source: str) -> str:
    """``pointwise_<hash16>``: the cached file's name without ``.py``."""
    return PREFIX + source_hash(source)[:16]


def write_source(source: str) -> Path:
    """Writes the source to its cache file unless a file with exactly this text is there."""
    path = cache_dir() / f"{module_stem(source)}.py"
    if _read_if_matches(path, source_hash(source)) is None:
        _write_atomically(path, source)
    return path


def load_kernel(source: str):
    """The ``@triton.jit`` function `KERNEL_NAME` defined by ``source`` (cached on disk)."""
    digest = source_hash(source)
    if digest not in _LOADED:
        path = write_source(source)
        _LOADED[digest] = _execute(path, source, digest)
    return _LOADED[digest]


def load_cached(stem: str):
    """The kernel in ``<cache_dir>/<stem>.py``, for callers that have only its name (AOT)."""
    if not _STEM.fullmatch(stem):
        raise CodegenError(f"'{stem}' is not a cached pointwise kernel name (pointwise_<hash16>)")
    path = cache_dir() / f"{stem}.py"
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise CodegenError(f"cached kernel {path} is unreadable: {err}") from err
    digest = source_hash(text)
    if digest[:16] != stem[len(PREFIX) :]:
        raise CodegenError(f"cached kernel {path} does not match its hash; render it again")
    if digest not in _LOADED:
        _LOADED[digest] = _execute(path, text, digest)
    return _LOADED[digest]


def clear_memory_cache() -> None:
    """Forgets loaded kernels (as a new process would); files on disk stay."""
    _LOADED.clear()


def __getattr__(name: str):
    # PEP 562: ``cache.pointwise_<hash16>`` is the cached kernel, so "module:function" names
    # reach generated files from aot.py's subprocess without putting the cache on sys.path.
    if _STEM.fullmatch(name):
        return load_cached(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _read_if_matches(path: Path, digest: str) -> str | None:
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    return text if source_hash(text) == digest else None


def _write_atomically(path: Path, text: str) -> None:
    # A temp file in the same folder, then rename: readers (other processes, the AOT
    # subprocess) see the old file or the whole new one, never half a file.
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _execute(path: Path, text: str, digest: str):
    """Runs the verified ``text`` as module ``_kompakt_pointwise_<hash16>`` of file ``path``."""
    name = f"_kompakt_{PREFIX}{digest[:16]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise CodegenError(f"cannot import generated kernel {path}")
    module = importlib.util.module_from_spec(spec)
    # Pin the text inspect (and so Triton's jit) reads for this path to the verified text; an
    # mtime of None keeps linecache.checkcache from reloading it from disk.
    linecache.cache[str(path)] = (len(text), None, text.splitlines(keepends=True), str(path))
    sys.modules[name] = module
    try:
        exec(compile(text, str(path), "exec"), module.__dict__)  # noqa: S102 - verified text
    except Exception as err:
        sys.modules.pop(name, None)
        raise CodegenError(f"generated kernel {path} failed to load: {err}") from err
    return getattr(module, KERNEL_NAME)
