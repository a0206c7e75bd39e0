"""Segments: a structured filter over recipients, compiled to parameterised SQL.

A filter is data, never SQL from a user: field names come from a fixed list (or
`attributes.<key>` for custom JSON attributes) and every value is a bound parameter.

    {"all": [
        {"field": "country", "op": "in", "value": ["RU", "KZ"]},
        {"any": [{"field": "tags", "op": "contains", "value": "premium"},
                 {"field": "attributes.plan", "op": "eq", "value": "family"}]},
        {"not": {"field": "last_active_at", "op": "lt", "value": "2026-01-01T00:00:00Z"}}
    ]}
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal, Union

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator
from sqlalchemy.dialects import postgresql as pg

from core.queries import recipients

Operator = Literal["eq", "ne", "in", "not_in", "contains", "gt", "gte", "lt", "lte", "exists", "not_exists"]

# field -> (column, kind). Kinds decide which operators and values make sense.
FIELDS: dict[str, tuple[str, str]] = {
    "user_id": ("user_id", "text"),
    "country": ("country", "text"),
    "locale": ("locale", "text"),
    "timezone": ("timezone", "text"),
    "email": ("email", "text"),
    "tags": ("tags", "array"),
    "follows": ("follows", "array"),
    "created_at": ("created_at", "time"),
    "last_active_at": ("last_active_at", "time"),
}
_ATTRIBUTE = re.compile(r"^attributes\.([A-Za-z0-9_]{1,64})$")
_OPERATORS_BY_KIND: dict[str, set[str]] = {
    "text": {"eq", "ne", "in", "not_in", "exists", "not_exists"},
    "array": {"contains", "in", "exists", "not_exists"},
    "time": {"gt", "gte", "lt", "lte", "exists", "not_exists"},
    "json": {"eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte", "exists", "not_exists", "contains"},
}


class Condition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    field: str
    op: Operator
    value: Any = None

    @model_validator(mode="after")
    def _check(self) -> Condition:
        kind = _kind(self.field)
        if self.op not in _OPERATORS_BY_KIND[kind]:
            allowed = ", ".join(sorted(_OPERATORS_BY_KIND[kind]))
            raise ValueError(f"operator {self.op!r} does not apply to {self.field!r} (use one of: {allowed})")
        if self.op in ("exists", "not_exists"):
            if self.value is not None:
                raise ValueError(f"{self.op!r} takes no value")
        elif self.op in ("in", "not_in"):
            if not isinstance(self.value, list) or not self.value or len(self.value) > 10_000:
                raise ValueError(f"{self.op!r} needs a list of 1 to 10,000 values")
        elif kind == "array" and isinstance(self.value, list):
            if not self.value or not all(isinstance(item, str) for item in self.value):
                raise ValueError(f"{self.op!r} on {self.field!r} needs a tag or a non-empty list of tags")
        elif self.value is None or isinstance(self.value, dict | list):
            raise ValueError(f"{self.op!r} needs a single value")
        if kind == "time" and self.value is not None:
            try:
                datetime.fromisoformat(str(self.value))
            except ValueError as err:
                raise ValueError(f"{self.field!r} needs an ISO 8601 time, got {self.value!r}") from err
        return self


class AllOf(BaseModel):
    model_config = ConfigDict(extra="forbid")
    all: list[Filter] = Field(min_length=1, max_length=100)


class AnyOf(BaseModel):
    model_config = ConfigDict(extra="forbid")
    any: list[Filter] = Field(min_length=1, max_length=100)


class NotOf(BaseModel):
    model_config = ConfigDict(extra="forbid")
    not_: Filter = Field(alias="not")


def _node_kind(value: Any) -> str:
    if isinstance(value, dict):
        for key in ("all", "any", "not"):
            if key in value:
                return key
        return "condition"
    for model, tag in ((AllOf, "all"), (AnyOf, "any"), (NotOf, "not")):
        if isinstance(value, model):
            return tag
    return "condition"


# The node's own keys pick its type, so an error names the one rule that failed.
Filter = Annotated[
    Union[  # noqa: UP007 - forward references need the Union spelling
        Annotated[AllOf, Tag("all")],
        Annotated[AnyOf, Tag("any")],
        Annotated[NotOf, Tag("not")],
        Annotated[Condition, Tag("condition")],
    ],
    Discriminator(_node_kind),
]
AllOf.model_rebuild()
AnyOf.model_rebuild()
NotOf.model_rebuild()


class SegmentFilter(BaseModel):
    """The root of a filter (a wrapper so it can be validated on its own)."""

    root: Filter


def _kind(field: str) -> str:
    if field in FIELDS:
        return FIELDS[field][1]
    if _ATTRIBUTE.match(field):
        return "json"
    known = ", ".join([*FIELDS, "attributes.<key>"])
    raise ValueError(f"unknown field {field!r} (known: {known})")


def compile_filter(node: Filter) -> sa.ColumnElement[bool]:
    """The filter as a SQLAlchemy boolean expression over the recipients table."""
    if isinstance(node, AllOf):
        return sa.and_(*(compile_filter(child) for child in node.all))
    if isinstance(node, AnyOf):
        return sa.or_(*(compile_filter(child) for child in node.any))
    if isinstance(node, NotOf):
        return sa.not_(compile_filter(node.not_))
    return _condition(node)


def _condition(cond: Condition) -> sa.ColumnElement[bool]:
    kind = _kind(cond.field)
    if kind == "json":
        key = _ATTRIBUTE.match(cond.field).group(1)  # type: ignore[union-attr]
        return _json_condition(key, cond)
    column = recipients.c[FIELDS[cond.field][0]]
    op, value = cond.op, cond.value
    if op == "exists":
        return column.is_not(None) if kind != "array" else sa.func.cardinality(column) > 0
    if op == "not_exists":
        return column.is_(None) if kind != "array" else sa.func.cardinality(column) == 0
    if kind == "array":
        wanted = value if isinstance(value, list) else [value]
        array = sa.cast(sa.literal(list(map(str, wanted)), pg.ARRAY(sa.Text)), pg.ARRAY(sa.Text))
        # contains: has every listed tag; in: has at least one of them.
        return column.contains(array) if op == "contains" else column.overlap(array)
    if kind == "time":
        moment = datetime.fromisoformat(str(value))
        return {"gt": column > moment, "gte": column >= moment, "lt": column < moment, "lte": column <= moment}[op]
    if op == "eq":
        return column == str(value)
    if op == "ne":
        return sa.or_(column != str(value), column.is_(None))
    if op == "in":
        return column.in_([str(item) for item in value])
    return sa.or_(column.not_in([str(item) for item in value]), column.is_(None))


def _json_condition(key: str, cond: Condition) -> sa.ColumnElement[bool]:
    attributes = recipients.c.attributes
    op, value = cond.op, cond.value
    if op == "exists":
        return attributes.has_key(key)
    if op == "not_exists":
        return sa.not_(attributes.has_key(key))
    if op == "contains":  # the attribute is a JSON array holding the value
        return attributes[key].contains(sa.cast(sa.literal([value], pg.JSONB), pg.JSONB))
    if op in ("eq", "ne", "in", "not_in"):
        values = value if isinstance(value, list) else [value]
        matches = sa.or_(
            *(attributes.contains(sa.cast(sa.literal({key: item}, pg.JSONB), pg.JSONB)) for item in values)
        )
        return matches if op in ("eq", "in") else sa.not_(matches)
    # Ordering compares numbers as numbers and anything else as text.
    if isinstance(value, int | float) and not isinstance(value, bool):
        left: sa.ColumnElement[Any] = sa.cast(attributes[key].astext, sa.Numeric)
        right: Any = value
        guard = sa.func.jsonb_typeof(attributes[key]) == "number"
    else:
        left, right = attributes[key].astext, str(value)
        guard = attributes.has_key(key)
    comparison = {"gt": left > right, "gte": left >= right, "lt": left < right, "lte": left <= right}[op]
    return sa.and_(guard, comparison)
