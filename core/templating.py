"""Templates: their content model, sandboxed rendering and validation before save.

Rendering is Jinja2's SandboxedEnvironment with StrictUndefined: a template cannot reach
Python internals, and a missing variable is an error, never an empty string. HTML parts
are autoescaped, text parts are not. Compiled templates are cached per (template,
version, locale) through their source text, so a campaign compiles a template once, not
per recipient.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import lru_cache
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel.dates import format_date, format_datetime
from babel.numbers import format_decimal
from inscriptis import get_text
from jinja2 import StrictUndefined, TemplateSyntaxError, meta, nodes, pass_context
from jinja2.exceptions import SecurityError, UndefinedError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

VariableType = Literal["string", "number", "integer", "boolean", "date", "datetime", "url", "list"]
VariableName = Annotated[str, StringConstraints(pattern=r"^[a-z_][a-z0-9_]{0,63}$")]
LOCALE_PATTERN = r"^[a-z]{2,3}(-[A-Z]{2})?$"
LocaleCode = Annotated[str, StringConstraints(pattern=LOCALE_PATTERN)]

# Always available to every template, whatever it declares.
RECIPIENT_VARIABLE = "recipient"
RECIPIENT_FIELDS = ("user_id", "name", "email", "phone", "locale", "timezone", "country", "tags", "attributes")


def recipient_context(recipient: Mapping[str, Any]) -> dict[str, Any]:
    """The recipient fields a template may use as {{ recipient.* }}."""
    return {name: recipient.get(name) for name in RECIPIENT_FIELDS}


class TemplateLimits(BaseModel):
    sms_max_segments: int = 3
    push_max_bytes: int = 4096
    email_subject_max_chars: int = 255


class VariableSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: VariableName
    type: VariableType = "string"
    required: bool = True
    default: Any = None
    example: Any = None
    description: str = ""


class EmailPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    subject: str = Field(min_length=1)
    html: str = Field(min_length=1)
    text: str | None = Field(default=None, description="Plain-text alternative; generated from html when absent")


class PushPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1)
    body: str = Field(min_length=1)
    data: dict[str, str] = Field(default_factory=dict)


class SmsPart(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1)


class LocaleParts(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: EmailPart | None = None
    push: PushPart | None = None
    sms: SmsPart | None = None

    def channels(self) -> set[str]:
        return {name for name in ("email", "push", "sms") if getattr(self, name) is not None}


class TemplateContent(BaseModel):
    """Everything one version of a template holds; stored as JSON, never edited in place."""

    model_config = ConfigDict(extra="forbid")

    variables: list[VariableSpec] = Field(default_factory=list)
    fallback_locale: LocaleCode = "en"
    # propertyNames: the OpenAPI says which keys are locale codes (pydantic does not emit it).
    locales: dict[LocaleCode, LocaleParts] = Field(
        min_length=1, json_schema_extra={"propertyNames": {"pattern": LOCALE_PATTERN}}
    )

    @model_validator(mode="after")
    def _fallback_exists(self) -> TemplateContent:
        if self.fallback_locale not in self.locales:
            raise ValueError(f"fallback_locale {self.fallback_locale!r} has no entry in locales")
        if not self.locales[self.fallback_locale].channels():
            raise ValueError(f"locale {self.fallback_locale!r} defines no channel")
        names = [variable.name for variable in self.variables]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"variables declared twice: {', '.join(duplicates)}")
        if RECIPIENT_VARIABLE in names:
            raise ValueError(f"{RECIPIENT_VARIABLE!r} is reserved for the recipient's own fields")
        return self

    def channels(self) -> set[str]:
        return self.locales[self.fallback_locale].channels()

    def pick_locale(self, wanted: str | None) -> str:
        """Exact locale, else its language (pt-BR -> pt), else the fallback."""
        if wanted:
            if wanted in self.locales:
                return wanted
            language = wanted.split("-")[0]
            if language in self.locales:
                return language
        return self.fallback_locale

    def part(self, locale: str, channel: str) -> EmailPart | PushPart | SmsPart | None:
        """A channel's part in a locale, else the fallback locale's."""
        found = getattr(self.locales[locale], channel)
        if found is None:
            found = getattr(self.locales[self.fallback_locale], channel)
        return found  # type: ignore[no-any-return]

    def iter_sources(self) -> Iterator[tuple[str, str, bool]]:
        """(part path, Jinja source, is_html) for every text field of every locale."""
        for locale, parts in self.locales.items():
            if parts.email:
                yield f"{locale}.email.subject", parts.email.subject, False
                yield f"{locale}.email.html", parts.email.html, True
                if parts.email.text is not None:
                    yield f"{locale}.email.text", parts.email.text, False
            if parts.push:
                yield f"{locale}.push.title", parts.push.title, False
                yield f"{locale}.push.body", parts.push.body, False
                for key, value in parts.push.data.items():
                    yield f"{locale}.push.data.{key}", value, False
            if parts.sms:
                yield f"{locale}.sms.text", parts.sms.text, False


@dataclass(frozen=True)
class Problem:
    part: str
    message: str
    line: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"part": self.part, "line": self.line, "message": self.message}


class TemplateInvalid(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("; ".join(f"{p.part}: {p.message}" for p in problems))
        self.problems = problems


class RenderError(Exception):
    """Rendering failed for this data (missing variable, wrong type, sandbox violation)."""


@dataclass
class RenderedEmail:
    subject: str
    html: str
    text: str


@dataclass
class RenderedPush:
    title: str
    body: str
    data: dict[str, str]

    def payload_bytes(self) -> int:
        return len(json.dumps({"title": self.title, "body": self.body, "data": self.data}).encode())


@dataclass
class RenderedSms:
    text: str
    encoding: str
    segments: int


@dataclass
class Rendered:
    locale: str
    email: RenderedEmail | None = None
    push: RenderedPush | None = None
    sms: RenderedSms | None = None
    channels: list[str] = field(default_factory=list)


# --- SMS segments (3GPP TS 23.038) -------------------------------------------------------

_GSM7_BASIC = set(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
_GSM7_EXTENDED = set("^{}\\[~]|€\f")


def sms_segments(text: str) -> tuple[str, int]:
    """(encoding, segments): GSM-7 fits 160 septets (153 per part when split),
    anything else is UCS-2 at 70 characters (67 per part)."""
    if all(ch in _GSM7_BASIC or ch in _GSM7_EXTENDED for ch in text):
        septets = sum(2 if ch in _GSM7_EXTENDED else 1 for ch in text)
        return "GSM-7", 1 if septets <= 160 else -(-septets // 153)
    units = len(text.encode("utf-16-le")) // 2  # characters outside the BMP take two
    return "UCS-2", 1 if units <= 70 else -(-units // 67)


# --- Filters -------------------------------------------------------------------------------


def _as_datetime(value: Any) -> datetime:
    if isinstance(value, datetime):
        return value
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day)
    if isinstance(value, str):
        return datetime.fromisoformat(value)
    raise TypeError(f"expected a date or time, got {type(value).__name__}")


def _zone(name: str | None) -> ZoneInfo:
    try:
        return ZoneInfo(name or "UTC")
    except (ZoneInfoNotFoundError, ValueError):
        return ZoneInfo("UTC")


def _babel_locale(locale: str) -> str:
    return locale.replace("-", "_")


class _Environments:
    """Two sandboxes (HTML autoescaped, text not) sharing filters that know the recipient."""

    def __init__(self) -> None:
        self.html = self._make(autoescape=True)
        self.text = self._make(autoescape=False)

    @staticmethod
    def _make(autoescape: bool) -> SandboxedEnvironment:
        env = SandboxedEnvironment(
            undefined=StrictUndefined,
            autoescape=autoescape,
            keep_trailing_newline=False,
            # An optional variable left empty (or a recipient without a name) prints nothing,
            # not "None".
            finalize=lambda value: "" if value is None else value,
        )
        env.filters["datetime"] = _filter_datetime
        env.filters["date"] = _filter_date
        env.filters["number"] = _filter_number
        return env


def _recipient_context(ctx: Any) -> tuple[str, str | None]:
    recipient = ctx.get(RECIPIENT_VARIABLE) or {}
    return str(recipient.get("locale") or "en"), recipient.get("timezone")


def _plain_spaces(text: str) -> str:
    # CLDR puts narrow no-break spaces in times ("10:00\u202fPM"); one such character forces
    # a whole SMS from GSM-7 (160 a segment) to UCS-2 (70).
    return text.replace("\u202f", " ").replace("\xa0", " ")


@pass_context
def _filter_datetime(ctx: Any, value: Any, format: str = "medium") -> str:
    locale, zone = _recipient_context(ctx)
    moment = _as_datetime(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=ZoneInfo("UTC"))
    return _plain_spaces(format_datetime(moment, format=format, tzinfo=_zone(zone), locale=_babel_locale(locale)))


@pass_context
def _filter_date(ctx: Any, value: Any, format: str = "medium") -> str:
    locale, zone = _recipient_context(ctx)
    moment = _as_datetime(value)
    if moment.tzinfo is not None:
        moment = moment.astimezone(_zone(zone))
    return _plain_spaces(format_date(moment.date(), format=format, locale=_babel_locale(locale)))


@pass_context
def _filter_number(ctx: Any, value: Any) -> str:
    locale, _ = _recipient_context(ctx)
    return format_decimal(value, locale=_babel_locale(locale))


ENVIRONMENTS = _Environments()


@lru_cache(maxsize=4096)
def _compiled(source: str, is_html: bool) -> Any:
    # Keyed by source: identical text in two versions compiles once; a new version's
    # changed text is a new key. Versions are immutable, so nothing ever goes stale.
    env = ENVIRONMENTS.html if is_html else ENVIRONMENTS.text
    template = env.from_string(source)
    # Jinja keeps a template's globals as a ChainMap over the environment's and copies them
    # into every render's context, slowly; ours are set once (_Environments) and flattened
    # here, a render costs less than half (a campaign renders three parts per message).
    template.globals = dict(template.globals)
    return template


# --- Variables -----------------------------------------------------------------------------

_URL = re.compile(r"^https?://[^\s/$.?#][^\s]*$", re.IGNORECASE)


def checked_variables(content: TemplateContent, given: Mapping[str, Any]) -> dict[str, Any]:
    """The values a send renders with; RenderError naming every problem when they do not fit."""
    values, problems = coerce_variables(content.variables, given)
    if problems:
        raise RenderError("; ".join(f"{p.part}: {p.message}" for p in problems))
    return values


def render_for_recipient(
    content: TemplateContent,
    recipient: Mapping[str, Any],
    variables: Mapping[str, Any],
    channels: list[str] | None = None,
) -> Rendered:
    """The one way a template meets a recipient (a recipients row): their fields as
    {{ recipient.* }}, their locale. `variables` are already checked (checked_variables)."""
    return render(content, locale_wanted=recipient.get("locale"), variables=variables,
                  recipient=recipient_context(recipient), channels=channels)  # fmt: skip


def coerce_variables(
    specs: list[VariableSpec], given: Mapping[str, Any], *, use_examples: bool = False
) -> tuple[dict[str, Any], list[Problem]]:
    """Check the values against the declarations; fill defaults (or examples, for previews)."""
    values: dict[str, Any] = {}
    problems: list[Problem] = []
    declared = {spec.name for spec in specs}
    for name in given:
        if name not in declared:
            problems.append(Problem(f"variables.{name}", "not declared by this template"))
    for spec in specs:
        if spec.name in given:
            value = given[spec.name]
        elif use_examples and spec.example is not None:
            value = spec.example
        elif spec.default is not None:
            value = spec.default
        elif spec.required:
            problems.append(Problem(f"variables.{spec.name}", "required and not given"))
            continue
        else:
            value = None
        try:
            values[spec.name] = _coerce(spec.type, value)
        except (TypeError, ValueError) as err:
            problems.append(Problem(f"variables.{spec.name}", f"expected {spec.type}: {err}"))
    return values, problems


def _coerce(kind: VariableType, value: Any) -> Any:
    if value is None:
        return None
    if kind == "string":
        if not isinstance(value, str):
            raise TypeError(f"got {type(value).__name__}")
        return value
    if kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise TypeError(f"got {type(value).__name__}")
        return value
    if kind == "integer":
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"got {type(value).__name__}")
        return value
    if kind == "boolean":
        if not isinstance(value, bool):
            raise TypeError(f"got {type(value).__name__}")
        return value
    if kind in ("date", "datetime"):
        if not isinstance(value, str):
            raise TypeError("an ISO 8601 string")
        parsed = datetime.fromisoformat(value)
        return parsed.date() if kind == "date" else parsed
    if kind == "url":
        if not isinstance(value, str) or not _URL.match(value):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value
    if not isinstance(value, list):
        raise TypeError(f"got {type(value).__name__}")
    return value


# --- Validation ----------------------------------------------------------------------------


def _names_with_lines(tree: nodes.Template) -> Iterator[tuple[str, int]]:
    for node in tree.find_all(nodes.Name):
        if node.ctx == "load":
            yield node.name, node.lineno


def _unsafe_attributes(tree: nodes.Template) -> Iterator[tuple[str, int]]:
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        attribute = node.attr if isinstance(node, nodes.Getattr) else getattr(getattr(node, "arg", None), "value", None)
        if isinstance(attribute, str) and attribute.startswith("_"):
            yield attribute, node.lineno


def validate(content: TemplateContent, limits: TemplateLimits) -> list[Problem]:
    """Every problem at once: syntax, undeclared or unsafe names, examples, channel limits."""
    problems: list[Problem] = []
    declared = {spec.name for spec in content.variables}
    for spec in content.variables:
        if spec.required and spec.example is None and spec.default is None:
            problems.append(Problem(f"variables.{spec.name}", "required variable needs an example value"))

    parsed_ok = True
    for path, source, is_html in content.iter_sources():
        env = ENVIRONMENTS.html if is_html else ENVIRONMENTS.text
        try:
            tree = env.parse(source)
        except TemplateSyntaxError as err:
            problems.append(Problem(path, f"syntax error: {err.message}", err.lineno))
            parsed_ok = False
            continue
        assigned = meta.find_undeclared_variables(tree)
        for name, line in _names_with_lines(tree):
            if name in assigned and name not in declared and name != RECIPIENT_VARIABLE:
                problems.append(Problem(path, f"variable {name!r} is used but not declared", line))
        for attribute, line in _unsafe_attributes(tree):
            problems.append(Problem(path, f"access to {attribute!r} is not allowed", line))

    for locale, parts in content.locales.items():
        extra = parts.channels() - content.channels()
        for channel in sorted(extra):
            problems.append(
                Problem(
                    f"{locale}.{channel}", f"channel not defined in the fallback locale {content.fallback_locale!r}"
                )
            )

    if problems or not parsed_ok:
        return _unique(problems)

    example_vars, variable_problems = coerce_variables(content.variables, {}, use_examples=True)
    problems.extend(variable_problems)
    if problems:
        return _unique(problems)
    example_recipient = {
        "user_id": "example-user",
        "name": "Alex Example",
        "email": "alex@example.com",
        "phone": "+15551234567",
        "timezone": "UTC",
        "country": "US",
        "attributes": {},
    }
    for locale in content.locales:
        try:
            rendered = render(
                content, locale_wanted=locale, variables=example_vars, recipient={**example_recipient, "locale": locale}
            )
        except RenderError as err:
            problems.append(Problem(f"{locale}", f"rendering with the example values failed: {err}"))
            continue
        problems.extend(_limit_problems(locale, rendered, limits))
    return _unique(problems)


def _limit_problems(locale: str, rendered: Rendered, limits: TemplateLimits) -> list[Problem]:
    problems = []
    if rendered.sms and rendered.sms.segments > limits.sms_max_segments:
        problems.append(
            Problem(
                f"{locale}.sms.text",
                f"{rendered.sms.segments} SMS segments ({rendered.sms.encoding}) with the example values; "
                f"at most {limits.sms_max_segments} allowed",
            )
        )
    if rendered.push and rendered.push.payload_bytes() > limits.push_max_bytes:
        problems.append(
            Problem(
                f"{locale}.push",
                f"push payload is {rendered.push.payload_bytes()} bytes; at most {limits.push_max_bytes} allowed",
            )
        )
    if rendered.email and len(rendered.email.subject) > limits.email_subject_max_chars:
        problems.append(
            Problem(
                f"{locale}.email.subject",
                f"subject is {len(rendered.email.subject)} characters; at most {limits.email_subject_max_chars}",
            )
        )
    return problems


def _unique(problems: list[Problem]) -> list[Problem]:
    return list(dict.fromkeys(problems))


# --- Rendering -----------------------------------------------------------------------------


def render(
    content: TemplateContent,
    *,
    locale_wanted: str | None,
    variables: Mapping[str, Any],
    recipient: Mapping[str, Any],
    channels: list[str] | None = None,
) -> Rendered:
    """Render the channel parts for one recipient. Raises RenderError on any failure."""
    locale = content.pick_locale(locale_wanted)
    context = {**variables, RECIPIENT_VARIABLE: dict(recipient)}
    wanted = channels if channels is not None else sorted(content.channels())
    result = Rendered(locale=locale, channels=wanted)
    try:
        for channel in wanted:
            part = content.part(locale, channel)
            if isinstance(part, EmailPart):
                html = _render_source(part.html, True, context)
                text_source = part.text if part.text is not None else text_source_from_html(part.html)
                text = _render_source(text_source, False, context).strip()
                result.email = RenderedEmail(subject=_render_source(part.subject, False, context).strip(), html=html,
                                             text=text)  # fmt: skip
            elif isinstance(part, PushPart):
                result.push = RenderedPush(
                    title=_render_source(part.title, False, context),
                    body=_render_source(part.body, False, context),
                    data={key: _render_source(value, False, context) for key, value in part.data.items()},
                )
            elif isinstance(part, SmsPart):
                text = _render_source(part.text, False, context)
                encoding, segments = sms_segments(text)
                result.sms = RenderedSms(text=text, encoding=encoding, segments=segments)
            else:
                raise RenderError(f"the template has no {channel} part")
    except (UndefinedError, SecurityError, TypeError, ValueError, ArithmeticError) as err:
        raise RenderError(str(err)) from err
    except TemplateSyntaxError as err:
        raise RenderError(f"syntax error: {err.message} (line {err.lineno})") from err
    return result


@lru_cache(maxsize=1024)
def text_source_from_html(html_source: str) -> str:
    """The plain-text alternative, derived once per template version from the HTML *source*
    (Jinja tags are text to an HTML parser, so they survive) and then rendered like any
    text part, instead of converting every recipient's rendered HTML."""
    return str(get_text(html_source))


def _render_source(source: str, is_html: bool, context: Mapping[str, Any]) -> str:
    return str(_compiled(source, is_html).render(context))
