"""The shared-prefix cache kept across restarts: llama.cpp's per-sequence state files on disk.

A Home Assistant system prompt with its tool list is thousands of tokens; evaluated cold after
every reboot it costs tens of seconds on a small CPU. When the engine unloads (drain, or
keep_alive), each cached prompt's KV cells are written with `llama_state_seq_save_file`, one
file per prompt, and an `index.json` names them with their sha256 and a key. When the engine
loads, the files are checked (`check`, in a thread while llama.cpp reads the weights) and come
back into the prefix cache with `llama_state_seq_load_file` (`restore`).

The key covers what makes KV cells valid: the model's sha256, the served plan (n_ctx, KV type,
flash attention, batch sizes, ...) and the llama.cpp build. Anything different, and the files
are dropped. A file whose sha256 or token count does not match the index, or that llama.cpp
cannot read, is skipped with a log line: a cache is never a reason not to start. Disk use is
bounded by `max_bytes` (the most recently used prompts are kept first) and, through the cache
itself, by the plan's prefix_cache_cells.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import llama_cpp
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgerunner._fs import atomic_write_text, sha256_file
from edgerunner.bundle.manifest import RuntimePlan
from edgerunner.runtime.engine.batch import PrefixCache
from edgerunner.runtime.engine.preflight import build_id

logger = logging.getLogger(__name__)

INDEX = "index.json"
DEFAULT_MAX_BYTES = 512 * 2**20


class SavedPrefix(BaseModel):
    """One state file: a cached prompt's KV cells and its tokens."""

    model_config = ConfigDict(extra="forbid")
    file: str = Field(default="", description="File name in the store's directory")
    tokens: int = Field(default=0, ge=0, description="Prompt tokens the file holds")
    bytes: int = Field(default=0, ge=0, description="File size")
    sha256: str = Field(default="", description="sha256 of the file")


class PrefixIndex(BaseModel):
    """What index.json says: the key the files were written under, most recent first."""

    model_config = ConfigDict(extra="forbid")
    key: str = Field(default="", description="Model sha256 + plan + llama.cpp build, hashed")
    entries: list[SavedPrefix] = Field(default_factory=list)


def store_key(model_sha256: str, plan: RuntimePlan) -> str:
    """What saved cells depend on: the model, the plan as served, the llama.cpp build."""
    parts = [model_sha256, json.dumps(plan.model_dump(mode="json"), sort_keys=True), build_id()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


class PrefixStore:
    """The prefix cache's files for one bundle, in `directory`."""

    def __init__(self, directory: Path, model_sha256: str,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory = Path(directory)
        self.model_sha256 = model_sha256
        self.max_bytes = max_bytes

    def save(self, ctx: Any, cache: PrefixCache, plan: RuntimePlan) -> int:
        """Write every cached prompt (most recently used first, up to max_bytes); how many."""
        held = cache.held()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            logger.warning("cannot keep the prefix cache in %s (%s)", self.directory,
                           exc.strerror or exc)
            return 0
        self._remove_files()
        index = PrefixIndex(key=store_key(self.model_sha256, plan))
        used = 0
        for n, (seq_id, tokens) in enumerate(held):
            path = self.directory / f"prefix-{n}.state"
            array = (llama_cpp.llama_token * len(tokens))(*tokens)
            written = llama_cpp.llama_state_seq_save_file(ctx, str(path).encode(), seq_id, array,
                                                          len(tokens))
            if written == 0 or not path.is_file():
                logger.warning("llama.cpp could not save a cached prompt to %s", path)
                continue
            size = path.stat().st_size
            if used + size > self.max_bytes:
                path.unlink()
                break
            used += size
            index.entries.append(SavedPrefix(file=path.name, tokens=len(tokens), bytes=size,
                                             sha256=sha256_file(path)))
        try:
            atomic_write_text(self.directory / INDEX, index.model_dump_json(indent=2) + "\n")
        except OSError as exc:
            logger.warning("cannot write %s (%s)", self.directory / INDEX, exc.strerror or exc)
            return 0
        if index.entries:
            logger.info("prefix cache saved: %d prompts, %d tokens, %.1f MiB",
                        len(index.entries), sum(e.tokens for e in index.entries), used / 2**20)
        return len(index.entries)

    def check(self, plan: RuntimePlan) -> list[tuple[Path, SavedPrefix]]:
        """The saved prompts that may be restored under `plan`, least recent first: the index
        read, its key compared (another key: the files are removed), every file's size and
        sha256 checked. Only files and hashing: it runs while llama.cpp loads the weights."""
        index = self._read_index()
        if index is None:
            return []
        if index.key != store_key(self.model_sha256, plan):
            logger.info("saved prefix cache dropped: written for another model, plan or "
                        "llama.cpp build")
            self._remove_files()
            return []
        checked = []
        for entry in reversed(index.entries):  # least recent first: the newest ends up newest
            path = self.directory / entry.file
            problem = self._check(path, entry)
            if problem:
                logger.warning("saved prefix %s ignored: %s", path, problem)
                continue
            checked.append((path, entry))
        return checked

    def restore(self, ctx: Any, cache: PrefixCache, checked: list[tuple[Path, SavedPrefix]],
                n_ctx: int) -> int:
        """Load the prompts `check` passed into the (empty) cache; how many came back."""
        restored = 0
        for path, entry in checked:
            if cache.adopt(entry.tokens, lambda seq_id, p=path, e=entry:  # type: ignore[misc]
                           self._load(ctx, p, e, seq_id, n_ctx)):
                restored += 1
        if restored:
            logger.info("prefix cache restored: %d of %d checked prompts", restored,
                        len(checked))
        return restored

    def _read_index(self) -> PrefixIndex | None:
        path = self.directory / INDEX
        try:
            return PrefixIndex.model_validate_json(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError, ValueError) as exc:
            logger.warning("saved prefix cache ignored: %s is unreadable (%s)", path, exc)
            return None

    @staticmethod
    def _check(path: Path, entry: SavedPrefix) -> str:
        if Path(entry.file).name != entry.file:
            return "the index names a file outside the store"
        try:
            size = path.stat().st_size
            if size != entry.bytes:
                return f"{size} bytes, the index says {entry.bytes} (truncated?)"
            if sha256_file(path) != entry.sha256:
                return "its sha256 does not match the index (corrupted)"
        except OSError as exc:
            return f"unreadable ({exc.strerror or exc})"
        return ""

    @staticmethod
    def _load(ctx: Any, path: Path, entry: SavedPrefix, seq_id: int, n_ctx: int
              ) -> list[int] | None:
        tokens = (llama_cpp.llama_token * n_ctx)()
        count = ctypes.c_size_t(0)
        read = llama_cpp.llama_state_seq_load_file(ctx, str(path).encode(), seq_id, tokens,
                                                   n_ctx, ctypes.byref(count))
        if read == 0 or count.value != entry.tokens:
            logger.warning("saved prefix %s ignored: llama.cpp could not load it", path)
            return None
        return list(tokens[:count.value])

    def _remove_files(self) -> None:
        for path in self.directory.glob("prefix-*.state"):
            with contextlib.suppress(OSError):
                path.unlink()
        with contextlib.suppress(OSError):
            (self.directory / INDEX).unlink()
