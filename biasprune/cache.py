"""Content-addressed on-disk cache shared by worlds, pruned models, checkpoints and statistics."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "BIASPRUNE_CACHE"
_DEFAULT_CACHE_DIR = Path.home() / ".cache" / "biasprune"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Resolve the cache directory: the argument, then $BIASPRUNE_CACHE, then ~/.cache/biasprune."""
    if cache_dir:
        root = Path(cache_dir)
    elif os.environ.get(CACHE_ENV_VAR):
        root = Path(os.environ[CACHE_ENV_VAR])
    else:
        root = _DEFAULT_CACHE_DIR
    root = root.expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return root


def content_key(*parts: Any, length: int = 16) -> str:
    """Hash JSON-serializable parts into a short hex key; equal content gives an equal key."""
    payload = json.dumps(parts, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()[:length]


def hash_file(path: str | os.PathLike, length: int = 16) -> str:
    """Return the SHA-256 of a file's bytes, shortened to `length` hex digits."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]


def cached_dir(path: Path, build: Callable[[Path], None]) -> Path:
    """Return `path`, building it first with `build(tmp_dir)` if it does not exist.

    The directory is built under a temporary name and renamed into place, so an
    interrupted build never leaves a half-written entry that later runs would trust.
    """
    if path.is_dir():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        build(tmp)
        try:
            tmp.rename(path)
        except OSError:
            # Another process finished the same entry first; its content is equal by key.
            if not path.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
