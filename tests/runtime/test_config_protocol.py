"""Settings layering and request validation: no model needed."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from edgerunner.bundle.settings import ServeConfig, load_config
from edgerunner.errors import ConfigError
from edgerunner.paths import default_socket_path, runtime_socket_path
from edgerunner.runtime.protocol import (
    BusyError,
    ChatCompletionRequest,
    RequestError,
    parse_request,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def test_layers_apply_in_order(tmp_path: Path) -> None:
    bundle_toml = tmp_path / "bundle.toml"
    bundle_toml.write_text("queue_depth = 3\nstrict = true\nsocket_mode = 0o600\n"
                           "[mqtt]\nurl = 'mqtt://a:1883'\n")
    user_toml = tmp_path / "user.toml"
    user_toml.write_text("queue_depth = 5\n[mqtt]\ndevice_id = 'pi-1'\n")
    env = {"EDGERUNNER_QUEUE_DEPTH": "6", "EDGERUNNER_MQTT__URL": "mqtt://b:1883",
           "EDGERUNNER_TRACEBACK": "1"}
    config = load_config(bundle_toml, user_toml, environ=env, overrides={"queue_depth": 7})
    assert config.queue_depth == 7  # flag beats env beats files
    assert config.strict is True  # only the bundle file set it
    assert config.socket_mode == 0o600
    assert config.mqtt.url == "mqtt://b:1883"  # env beats the bundle file
    assert config.mqtt.device_id == "pi-1"  # nested tables merge, not replace


def test_bad_setting_names_its_source(tmp_path: Path) -> None:
    user_toml = tmp_path / "user.toml"
    user_toml.write_text("queue_depth = 0\n")
    with pytest.raises(ConfigError, match=r"user.toml: queue_depth"):
        load_config(None, user_toml, environ={})
    with pytest.raises(ConfigError, match="environment: http"):
        load_config(None, None, environ={"EDGERUNNER_HTTP": "nonsense"})
    user_toml.write_text("no_such_setting = 1\n")
    with pytest.raises(ConfigError, match="no_such_setting"):
        load_config(None, user_toml, environ={})
    user_toml.write_text("queue_depth = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(None, user_toml, environ={})
    user_toml.write_text("n_parallel = 17\n")  # more streams than a context is made for
    with pytest.raises(ConfigError, match=r"user.toml: n_parallel.*less than or equal to 16"):
        load_config(None, user_toml, environ={})


def test_rendered_config_toml_loads_back_to_the_defaults(tmp_path: Path, bundle_manifest) -> None:
    from edgerunner.bundle.settings import render_config_toml

    text = render_config_toml(bundle_manifest)
    assert "# Headroom (MiB) that must stay free" in text
    path = tmp_path / "config.toml"
    path.write_text(text)
    tomllib.loads(text)
    assert load_config(path, environ={}) == ServeConfig.model_validate({})


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"messages": []}, "messages: List should have at least 1 item"),
        ({"messages": "hi"}, "messages: Input should be a valid list"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10**12}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n: Input should be 1"),
        ({"messages": [{"role": "user", "content": "x"}], "functions": []},
         "functions: unknown field"),  # OpenAI's deprecated form of tools
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "retrieval"}]},
         "tools.0.type"),
        ({"messages": [{"role": "user", "content": "x"}],
          "response_format": {"type": "json_schema"}}, "needs a \"json_schema\""),
    ],
)
def test_bad_requests_are_named(body: dict, needle: str) -> None:
    with pytest.raises(RequestError) as info:
        parse_request("chat", body)
    assert info.value.code == "invalid_request"
    assert info.value.http_status == 400
    assert needle in info.value.message


def test_non_object_body_is_refused() -> None:
    with pytest.raises(RequestError, match="JSON object"):
        parse_request("chat", [1, 2])


def test_max_completion_tokens_is_max_tokens() -> None:
    request = parse_request("chat", {"messages": [{"role": "user", "content": "x"}],
                                     "max_completion_tokens": 7})
    assert isinstance(request, ChatCompletionRequest)
    assert request.max_tokens == 7


def test_error_body_and_status() -> None:
    busy = BusyError("queue full", retry_after=3)
    assert busy.http_status == 503
    assert busy.body() == {"error": {"type": "server_busy", "code": "busy",
                                     "message": "queue full"}}
    assert RequestError("context_length_exceeded", "x").http_status == 400
    assert RequestError("model_not_found", "x").http_status == 404


def test_serve_never_defaults_to_an_installed_services_socket(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    service = short_tmp / "run/edgerunner/smol/api.sock"
    service.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listening:
        listening.bind(str(service))
        listening.listen(1)
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        own = short_tmp / "run/edgerunner/edgerunner.sock"
        assert runtime_socket_path(short_tmp) == service  # `ask` finds the service
        assert default_socket_path(short_tmp) == own  # `serve` keeps to its own
        monkeypatch.setenv("XDG_RUNTIME_DIR", str(short_tmp / "xdg"))
        assert default_socket_path(short_tmp) == short_tmp / "xdg/edgerunner.sock"
        assert ServeConfig().socket_path() == short_tmp / "xdg/edgerunner.sock"
        assert ServeConfig(socket=short_tmp / "mine.sock").socket_path() == short_tmp / "mine.sock"


def test_serve_refuses_a_parallel_flag_out_of_range(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from edgerunner.cli import main

    result = CliRunner().invoke(main, ["serve", str(tmp_path), "--parallel", "0"])
    assert result.exit_code == 2 and "--parallel" in result.output


@pytest.mark.parametrize(("flag", "value"), [("--queue-depth", "1025"), ("--n-ctx", "255"),
                                             ("--request-timeout", "0"),
                                             ("--threads", "257")])
def test_serve_flags_keep_the_config_fields_bounds(tmp_path: Path, flag: str,
                                                   value: str) -> None:
    from click.testing import CliRunner

    from edgerunner.cli import main

    result = CliRunner().invoke(main, ["serve", str(tmp_path), flag, value])
    assert result.exit_code == 2 and flag in result.output


def test_serve_help_lists_every_exit_code() -> None:
    from click.testing import CliRunner

    from edgerunner.cli import main
    from edgerunner.errors import ExitCode

    text = CliRunner().invoke(main, ["serve", "--help"]).output
    for code in ExitCode:
        assert f"{code.value}  {code.meaning}" in text
    assert "llama.cpp cannot decode on this CPU" in text  # 5 was missing from the epilog


def test_a_plan_that_does_not_fit_exits_3_through_its_error() -> None:
    from edgerunner.errors import EdgerunnerError, ExitCode, NoFitError, PlanError

    assert NoFitError("x").exit_code == ExitCode.NO_FIT == 3
    assert PlanError("x").exit_code == EdgerunnerError("x").exit_code == ExitCode.ERROR
