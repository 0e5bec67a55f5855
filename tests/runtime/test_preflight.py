"""The decode preflight on the real model, and its fallback when the child really dies from a
signal: the interpreter the daemon starts the child with is a shell script (the OS boundary) that
kills itself with SIGILL when asked to decode with llama.cpp's extra buffer types on."""

from __future__ import annotations

import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from edgerunner.bundle.manifest import RuntimePlan
from edgerunner.bundle.store import MODEL_FILE, Bundle
from edgerunner.errors import ExitCode
from edgerunner.runtime.engine.preflight import PreflightError, preflight


def crashing_python(directory: Path, *, only_with_extra_bufts: bool) -> Path:
    """A python that dies from SIGILL (always, or when the request asks for extra bufts)."""
    real = sys.executable
    match = '*\'"extra_bufts": true\'*' if only_with_extra_bufts else "*"
    script = directory / "python-sigill"
    script.write_text(
        "#!/bin/sh\n"
        'request=$(cat)\n'
        f'case "$request" in {match}) kill -ILL $$ ;; esac\n'
        f'printf "%s" "$request" | exec {real} "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def test_the_real_model_decodes_here_and_the_verdict_is_cached(
        bundle: Bundle, tmp_path: Path) -> None:
    plan = bundle.manifest.plan
    sha = bundle.manifest.files[MODEL_FILE].sha256
    first = preflight(bundle.model_path, sha, plan, 1, store=tmp_path)
    assert (first.path, first.cached, first.failures) == ("default", False, [])
    assert "AVX2 = 1" in first.system_info or "NEON = 1" in first.system_info
    assert (tmp_path / f"{first.key}.json").is_file()
    again = preflight(bundle.model_path, sha, plan, 1, store=tmp_path,
                      python=str(crashing_python(tmp_path, only_with_extra_bufts=False)))
    assert (again.path, again.cached, again.key) == ("default", True, first.key)
    # other settings, another key: the crashing interpreter runs now and is caught
    other = plan.model_copy(update={"kv_type": "q8_0", "flash_attn": True})
    with pytest.raises(PreflightError, match="SIGILL"):
        preflight(bundle.model_path, sha, other, 1, store=tmp_path,
                  python=str(crashing_python(tmp_path, only_with_extra_bufts=False)))


def test_a_signal_with_extra_bufts_falls_back_to_none(bundle: Bundle, tmp_path: Path) -> None:
    python = crashing_python(tmp_path, only_with_extra_bufts=True)
    verdict = preflight(bundle.model_path, bundle.manifest.files[MODEL_FILE].sha256,
                        RuntimePlan(n_ctx=1024, n_threads=1), 1, store=tmp_path,
                        python=str(python))
    assert verdict.path == "no_extra_bufts"
    assert verdict.failures == ["default: SIGILL"]
    assert not verdict.extra_bufts


def test_the_daemon_serves_without_extra_bufts_when_the_default_dies(
        spawn: Any, short_tmp: Path) -> None:
    python = crashing_python(short_tmp, only_with_extra_bufts=True)
    daemon = spawn(env={"EDGERUNNER_PREFLIGHT_PYTHON": str(python),
                        "XDG_CACHE_HOME": str(short_tmp / "cache")})
    daemon.wait_ready()
    with daemon.client() as client:
        cpu = client.get("/health").json()["cpu"]
        assert cpu["llama_path"] == "no_extra_bufts"
        assert cpu["preflight_failures"] == ["default: SIGILL"]
        reply = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] >= 1
    daemon.proc.terminate()
    assert daemon.wait() == 0


def test_the_daemon_exits_5_naming_the_signal_and_the_fix(spawn: Any, short_tmp: Path) -> None:
    python = crashing_python(short_tmp, only_with_extra_bufts=False)
    daemon = spawn(env={"EDGERUNNER_PREFLIGHT_PYTHON": str(python),
                        "XDG_CACHE_HOME": str(short_tmp / "cache")})
    assert daemon.wait() == ExitCode.PREFLIGHT
    log = daemon.stderr()
    assert "default: SIGILL; no_extra_bufts: SIGILL" in log
    assert "llama_build.py --rebuild" in log  # the fix
    assert "CPU :" in log  # the features llama.cpp saw
    assert not daemon.socket.exists()
