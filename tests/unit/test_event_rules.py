"""Trigger rules as data (core.events): payload placeholders, conditions, variables, send times."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from core.events import (
    BadTime,
    Delay,
    PayloadCondition,
    RuleDefinition,
    fill,
    fire_at,
    holds,
    placeholders,
    template_variables,
)

PAYLOAD = {"user_id": "u1", "series_id": 42, "days_left": 2, "plan": {"name": "family"}, "title": "Dune"}


def test_placeholders_are_filled_from_the_payload_keeping_types() -> None:
    audience = {
        "all": [
            {"field": "follows", "op": "contains", "value": "series:${series_id}"},
            {"field": "attributes.plan", "op": "eq", "value": "${plan.name}"},
            {"field": "attributes.n", "op": "gt", "value": "${days_left}"},
        ]
    }
    assert sorted(placeholders(audience)) == ["days_left", "plan.name", "series_id"]
    filled = fill(audience, PAYLOAD)
    assert [item["value"] for item in filled["all"]] == ["series:42", "family", 2]


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ({"field": "days_left", "op": "lte", "value": 3}, True),
        ({"field": "days_left", "op": "gt", "value": 3}, False),
        ({"field": "plan.name", "op": "in", "value": ["family", "solo"]}, True),
        ({"field": "missing", "op": "ne", "value": 1}, True),
        ({"field": "missing", "op": "eq", "value": 1}, False),
        ({"field": "missing", "op": "not_exists"}, True),
        ({"field": "title", "op": "gt", "value": 3}, False),  # text against a number: does not hold
    ],
)
def test_conditions_hold_as_written(condition: dict, expected: bool) -> None:
    assert holds([PayloadCondition.model_validate(condition)], PAYLOAD) is expected


def test_a_condition_needs_the_value_its_operator_takes() -> None:
    with pytest.raises(ValidationError, match="needs a non-empty list"):
        PayloadCondition(field="x", op="in", value=3)
    with pytest.raises(ValidationError, match="takes no value"):
        PayloadCondition(field="x", op="exists", value=3)


def test_template_variables_come_from_the_payload_or_the_mapping() -> None:
    rule = RuleDefinition(template="t", channels=["email"], category="c", variables={"plan_name": "plan.name"})
    assert template_variables(rule, ["title", "plan_name", "absent"], PAYLOAD) == {
        "title": "Dune",
        "plan_name": "family",
    }


def test_a_rule_is_consistent() -> None:
    with pytest.raises(ValidationError, match="listed twice"):
        RuleDefinition(template="t", channels=["email", "email"], category="c")
    with pytest.raises(ValidationError, match="needs the user audience"):
        RuleDefinition.model_validate(
            {
                "template": "t",
                "channels": ["email"],
                "category": "c",
                "audience": {"kind": "segment", "filter": {}},
                "digest": {"window_seconds": 60, "template": "d"},
            }
        )
    with pytest.raises(ValidationError, match="exactly one of window_seconds and at_local_time"):
        RuleDefinition.model_validate(
            {"template": "t", "channels": ["email"], "category": "c", "digest": {"template": "d"}}
        )


def test_send_times() -> None:
    occurred = datetime(2026, 3, 27, 12, 0, tzinfo=UTC)
    assert fire_at(None, occurred, {}, "UTC") is None
    assert fire_at(Delay(offset_seconds=600), occurred, {}, "UTC") == datetime(2026, 3, 27, 12, 10, tzinfo=UTC)
    # 10:00 in Berlin the next morning: the clocks go forward on 29 March, so 10:00 is 08:00 UTC then.
    assert fire_at(Delay(offset_seconds=2 * 86400, at_local_time="10:00"), occurred, {}, "Europe/Berlin") == datetime(
        2026, 3, 30, 8, 0, tzinfo=UTC
    )
    assert fire_at(Delay(offset_seconds=0, at_local_time="10:00"), occurred, {}, "Europe/Berlin") == datetime(
        2026, 3, 28, 9, 0, tzinfo=UTC
    )
    before_expiry = Delay(offset_seconds=-3 * 86400, from_field="expires_at")
    assert fire_at(before_expiry, occurred, {"expires_at": "2026-04-10T00:00:00+03:00"}, "UTC") == datetime(
        2026, 4, 6, 21, 0, tzinfo=UTC
    )
    with pytest.raises(BadTime, match="no UTC offset"):
        fire_at(before_expiry, occurred, {"expires_at": "2026-04-10T00:00:00"}, "UTC")
    with pytest.raises(BadTime, match="not an ISO 8601 time"):
        fire_at(before_expiry, occurred, {"expires_at": "soon"}, "UTC")
