"""`edgerunner profiles`: every shipped profile validates; list, show, aliases, bad files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgerunner.cli import main
from edgerunner.errors import ProfileError
from edgerunner.paths import profiles_dir
from edgerunner.profiles import list_profiles, load_profile_file, resolve_profile

FAMILIES = ["rpi-zero2w", "rpi3b", "rpi4-2gb", "rpi4-4gb", "rpi4-8gb", "rpi5-2gb", "rpi5-4gb",
            "rpi5-8gb", "rpi5-16gb", "jetson-nano-4gb", "jetson-orin-nano-8gb",
            "jetson-orin-nx-16gb", "jetson-agx-orin-64gb", "phone-6gb", "phone-8gb", "phone-12gb"]


def test_every_device_family_has_a_valid_profile() -> None:
    names = {p.name for p in list_profiles(profiles_dir())}
    assert set(FAMILIES) <= names
    for path in profiles_dir().glob("*.toml"):
        profile = load_profile_file(path)
        assert profile.name == path.stem
        assert 0 < profile.usable_mb < profile.memory.total_mb
        assert profile.thermal.soft_limit_c <= profile.thermal.throttle_c
        # every number carries its source in a comment
        assert path.read_text().count("#") >= 8, f"{path.name} lacks source comments"


def test_aliases_are_unique_and_resolve() -> None:
    shipped = list_profiles(profiles_dir())
    aliases = [a for p in shipped for a in p.aliases]
    assert len(aliases) == len(set(aliases))
    assert not set(aliases) & {p.name for p in shipped}
    assert resolve_profile("rpi5").name == "rpi5-8gb"
    assert resolve_profile("rpi4").name == "rpi4-8gb"
    assert resolve_profile("orin-nano").name == "jetson-orin-nano-8gb"


def test_list_text_and_json() -> None:
    runner = CliRunner()
    text = runner.invoke(main, ["profiles", "list"])
    assert text.exit_code == 0
    assert "rpi5-8gb" in text.output and "jetson-agx-orin-64gb" in text.output
    data = json.loads(runner.invoke(main, ["profiles", "list", "--json"]).output)
    assert {p["name"] for p in data} >= set(FAMILIES)


def test_show_by_alias_and_by_path(tmp_path: Path) -> None:
    runner = CliRunner()
    shown = runner.invoke(main, ["profiles", "show", "rpi5", "--json"])
    assert shown.exit_code == 0
    assert json.loads(shown.output)["memory"]["total_mb"] == 8192
    own = tmp_path / "my-board.toml"
    own.write_text(runner.invoke(main, ["profiles", "show", "rpi5"]).output.replace(
        'name = "rpi5-8gb"', 'name = "my-board"'))
    mine = runner.invoke(main, ["profiles", "show", str(own), "--json"])
    assert mine.exit_code == 0 and json.loads(mine.output)["name"] == "my-board"


def test_unknown_profile_suggests_close_names() -> None:
    result = CliRunner().invoke(main, ["profiles", "show", "rpi55"])
    assert result.exit_code == 1
    assert "unknown device profile 'rpi55'" in result.output and "rpi5" in result.output


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('name = "x"\n[memory]\ntotal_mb = -1\nbandwidth_gbs = 1\n[cpu]\nbig_cores = 4\n',
         "memory.total_mb"),
        ('name = "x"\n[memory]\ntotal_mb = 1024\nbandwidth_gbs = 1\n[cpu]\nbig_cores = 4\n'
         'colour = "red"\n', "cpu.colour"),
        ('name = "x"\n[memory\n', "not valid TOML"),
    ],
)
def test_malformed_profile_names_file_field_and_problem(
    tmp_path: Path, text: str, expected: str
) -> None:
    bad = tmp_path / "bad-board.toml"
    bad.write_text(text)
    with pytest.raises(ProfileError) as err:
        resolve_profile(str(bad))
    assert str(bad) in str(err.value) and expected in str(err.value)
    result = CliRunner().invoke(main, ["profiles", "show", str(bad)])
    assert result.exit_code == 1 and expected in result.output


def test_wheel_ships_profiles_and_unit_template() -> None:
    # the package reaches them through its own directory, so an installed wheel has them too
    assert (profiles_dir() / "rpi5-8gb.toml").is_file()
    assert profiles_dir().parent.name == "edgerunner"
    from edgerunner.paths import systemd_dir

    assert (systemd_dir() / "edgerunner@.service").is_file()
