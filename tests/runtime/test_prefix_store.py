"""The prefix cache survives an unload and a load (a restart): restored cells give the cold text;
a file that is corrupt, truncated or written under another plan is ignored, never fatal."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from edgerunner.bundle.manifest import RuntimePlan
from edgerunner.runtime.engine.core import Engine, Outcome
from edgerunner.runtime.engine.prefix_store import INDEX, PrefixIndex, PrefixStore
from edgerunner.runtime.protocol import parse_request
from tests.runtime.conftest import loaded_engine

PLAN = RuntimePlan(quant="Q4_1", n_ctx=1024, kv_type="f16", flash_attn=True, n_threads=2,
                   n_batch=256, n_ubatch=256, n_parallel=2, prefix_cache_cells=512)
SYSTEM = ("You are the assistant of a smart home with a kitchen, a garden and a garage. "
          "Answer in one short sentence and never mention that you are an AI.")
MODEL_SHA = "0" * 64  # the key's model part: any fixed value stands for one model here


def ask(engine: Engine, question: str = "What is in the garden?") -> Outcome:
    request: Any = parse_request("chat", {
        "messages": [{"role": "system", "content": SYSTEM},
                     {"role": "user", "content": question}],
        "temperature": 0, "max_tokens": 12})
    return engine.run(engine.prepare(request, 12), None, lambda: False)


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "prefixes"


def saved(default_model: Path, store_dir: Path) -> Outcome:
    """A cold answer from an engine whose cache is then saved by its unload."""
    with loaded_engine(default_model, PLAN, prefix_store=PrefixStore(store_dir, MODEL_SHA)) as eng:
        cold = ask(eng)
    assert cold.cached_tokens == 0
    index = PrefixIndex.model_validate_json((store_dir / INDEX).read_text())
    assert len(index.entries) == 1 and index.entries[0].tokens > 8
    return cold


def test_a_saved_prefix_is_restored_and_gives_the_cold_text(default_model: Path,
                                                            store_dir: Path) -> None:
    cold = saved(default_model, store_dir)
    with loaded_engine(default_model, PLAN, prefix_store=PrefixStore(store_dir, MODEL_SHA)) as eng:
        assert eng.batcher.cache.entries == 1
        eng.warm_up()  # as the daemon's worker does before its first request: cells stay
        warm = ask(eng)
    assert warm.cached_tokens > 8
    assert warm.text == cold.text


def test_another_plan_drops_the_saved_prefixes(default_model: Path, store_dir: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    saved(default_model, store_dir)
    other = PLAN.model_copy(update={"n_ctx": 768})
    caplog.set_level(logging.INFO)
    with loaded_engine(default_model, other,
                       prefix_store=PrefixStore(store_dir, MODEL_SHA)) as eng:
        assert eng.batcher.cache.entries == 0
        assert not list(store_dir.glob("prefix-*.state"))
        assert ask(eng).cached_tokens == 0
    assert "dropped" in caplog.text


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_corrupt_file_is_ignored_with_a_log_line(default_model: Path, store_dir: Path,
                                                    caplog: pytest.LogCaptureFixture,
                                                    damage: str) -> None:
    cold = saved(default_model, store_dir)
    (state,) = store_dir.glob("prefix-*.state")
    data = bytearray(state.read_bytes())
    if damage == "truncate":
        del data[len(data) // 2:]
    else:
        data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    with loaded_engine(default_model, PLAN, prefix_store=PrefixStore(store_dir, MODEL_SHA)) as eng:
        assert eng.batcher.cache.entries == 0
        again = ask(eng)
    assert again.cached_tokens == 0 and again.text == cold.text
    assert "ignored" in caplog.text


def test_an_unreadable_index_is_ignored(default_model: Path, store_dir: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    cold = saved(default_model, store_dir)
    (store_dir / INDEX).write_text("{\"key\": ")
    with loaded_engine(default_model, PLAN, prefix_store=PrefixStore(store_dir, MODEL_SHA)) as eng:
        assert ask(eng).text == cold.text
    assert "unreadable" in caplog.text
