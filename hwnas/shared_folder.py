"""A folder of bytes by key that a search's worker processes on one machine share."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


class SharedFolder:
    """Bytes by key in a folder on this machine that a search's worker processes share (a pool's: hwnas.search.
    optimize.PoolWorkers): what one of them made (a fit, a depth-scaled graph), the others read. `kind` keeps
    the kinds of entry apart in one folder; `suffix` says what a file holds."""

    def __init__(self, folder: str | os.PathLike, kind: str, suffix: str = ""):
        self.folder, self.kind, self.suffix = Path(folder), kind, suffix

    def _path(self, key: str) -> Path:
        return self.folder / f"{self.kind}-{hashlib.sha256(key.encode()).hexdigest()[:32]}{self.suffix}"

    def get(self, key: str) -> bytes | None:
        path = self._path(key)
        return path.read_bytes() if path.exists() else None

    def put(self, key: str, data: bytes) -> None:
        partial = self._path(key).with_suffix(f".{os.getpid()}.partial")  # whole, then renamed: readers see all or nothing
        partial.write_bytes(data)
        os.replace(partial, self._path(key))
