"""The health gate's pieces that need no daemon: the schema check and the latency bounds."""

from __future__ import annotations

import pytest

from edgerunner.bundle.manifest import BundleManifest, Prediction
from edgerunner.device.smoke import schema_problem
from edgerunner.pack.smoke import STATUS_SCHEMA, default_smoke, latency_bound


@pytest.mark.parametrize(("value", "problem"), [
    ({"device": "pump-1", "ok": True}, None),
    ({"device": "pump-1"}, "lacks required 'ok'"),
    ({"device": "pump-1", "ok": "yes"}, "$.ok is str, schema wants boolean"),
    ({"device": "pump-1", "ok": True, "extra": 1}, "has 'extra'"),
    (["pump-1"], "$ is list, schema wants object"),
])
def test_schema_problem_names_the_first_violation(value: object, problem: str | None) -> None:
    found = schema_problem(value, STATUS_SCHEMA)
    assert found == problem if problem is None else problem in (found or "")


def test_integer_is_not_boolean_and_items_are_checked() -> None:
    assert schema_problem(True, {"type": "integer"}) is not None
    assert schema_problem([1, "x"], {"type": "array", "items": {"type": "integer"}}) == (
        "$[1] is str, schema wants integer")
    assert schema_problem("b", {"enum": ["a"]}) == "$ is 'b', not one of ['a']"


def test_latency_bound_grows_as_the_plan_slows() -> None:
    fast, slow = Prediction(decode_tps=50.0), Prediction(decode_tps=2.0)
    assert latency_bound(64, fast) < latency_bound(64, slow)
    assert latency_bound(64, Prediction(decode_tps=0.0)) == latency_bound(64, Prediction(
        decode_tps=1.0))  # no prediction: 1 tok/s
    assert [p.name for p in default_smoke(fast)] == ["greeting", "json-status"]


def test_old_manifests_without_smoke_prompts_still_load(rpi5_bundle: object) -> None:
    from pathlib import Path

    data = BundleManifest.model_validate_json(
        (Path(str(rpi5_bundle)) / "manifest.json").read_text()).model_dump()
    data.pop("smoke")
    assert BundleManifest.model_validate(data).smoke == []
