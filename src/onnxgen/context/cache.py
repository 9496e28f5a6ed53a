"""A cache of verified hashes, so loading the same unchanged model folder again does not hash its
weights and blobs again.

What is cached: the sha256 of each blob file, and the content hash of each scope (which reads
every weight the scope uses).  Each entry is keyed by the identity of every file its value was
computed from: resolved path, device, inode, size, modification time and status-change time
(nanoseconds).  Any change to a file (a write, a truncation, a replacement by rename or copy, even
with its modification time set back: the status-change time cannot be set back) gives another key,
so a changed file is always hashed again; nothing is trusted across changed files.  The cached
value is what was computed, never what a manifest claims: the loader still compares it with the
manifest.

Two guards against a file changing while it is hashed, or within the file system's timestamp
granularity: the identity is taken before and after reading and must be the same, and an entry is
stored only when every file's timestamps are older than ``RACY_NS`` before the hashing began.

The cache lives in ``$ONNXGEN_CACHE/context-hashes.json`` (default ``~/.cache/onnxgen``), written
atomically, 0600 in a 0700 folder.  It vouches for hashes, so a cache file that is not a regular
file owned by this user, or that others may write, is ignored (and not rewritten).  Embedded
payloads (at most 64 MiB each, inside the model file) are not cached: they are decoded and hashed
at each load.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
import time
import warnings
from pathlib import Path

from ..cache import cache_dir

CACHE_FILE = "context-hashes.json"
CACHE_VERSION = 1
# Files changed this recently when hashing starts are hashed but not cached: a later change within
# the file system's timestamp granularity could leave their identity as it was.
RACY_NS = 100_000_000
MAX_ENTRIES = 4096


def file_identity(path: str | os.PathLike) -> list | None:
    """[resolved path, device, inode, size, mtime_ns, ctime_ns], or None when it cannot be read."""
    try:
        resolved = Path(path).resolve()
        st = os.stat(resolved)
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return [str(resolved), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class HashCache:
    """Verified hashes by file identity (see the module docstring).  ``computed`` and ``cached``
    count the hashes this instance had to compute and those it found."""

    def __init__(self, path: str | os.PathLike | None = None):
        self.path = Path(path) if path is not None else cache_dir() / CACHE_FILE
        self.usable = True
        self.entries: dict[str, list] = self._read()
        self.computed = 0
        self.cached = 0
        self._new: dict[str, list] = {}

    def _read(self) -> dict:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return {}
        except OSError:
            self.usable = False
            return {}
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            self.usable = False
            warnings.warn(f"{self.path}: not a regular file of this user, or writable by others: the cache of "
                          "verified hashes is ignored (every hash is computed)", stacklevel=3)
            return {}
        try:
            doc = json.loads(self.path.read_text())
            if doc.get("version") == CACHE_VERSION and isinstance(doc.get("entries"), dict):
                return doc["entries"]
        except (OSError, ValueError, AttributeError):
            pass
        return {}  # unreadable or another version: start over (it is only a cache)

    @staticmethod
    def key(*parts) -> str:
        return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        entry = self.entries.get(key)
        if entry is not None and isinstance(entry, list) and entry and isinstance(entry[0], str):
            self.cached += 1
            return entry[0]
        self.computed += 1
        return None

    def put(self, key: str, value: str, identities: list, started_ns: int) -> bool:
        """Record ``value`` unless a file is unknown or too recently changed (see ``RACY_NS``)."""
        if not self.usable or any(i is None for i in identities):
            return False
        if any(max(i[4], i[5]) > started_ns - RACY_NS for i in identities):
            return False
        self.entries[key] = self._new[key] = [value, time.time()]
        return True

    def save(self) -> None:
        """Merge the new entries into the file (atomically; the newest ``MAX_ENTRIES`` kept)."""
        if not self.usable or not self._new:
            return
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            entries = self._read()
            if not self.usable:
                return
            entries.update(self._new)
            if len(entries) > MAX_ENTRIES:
                newest = sorted(entries.items(), key=lambda kv: kv[1][1] if len(kv[1]) > 1 else 0)[-MAX_ENTRIES:]
                entries = dict(newest)
            fd, tmp = tempfile.mkstemp(prefix=".context-hashes.", dir=self.path.parent)  # 0600
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump({"version": CACHE_VERSION, "entries": entries}, f)
                os.replace(tmp, self.path)
            except BaseException:
                os.unlink(tmp)
                raise
            self._new = {}
        except OSError as error:  # a cache that cannot be written costs time, not correctness
            warnings.warn(f"{self.path}: the cache of verified hashes was not written ({error})", stacklevel=2)
