"""Template rendering and validation (core.templating), rule by rule."""

from __future__ import annotations

from typing import Any

import pytest

from core.templating import (
    TemplateContent,
    TemplateLimits,
    coerce_variables,
    render,
    sms_segments,
    validate,
)

LIMITS = TemplateLimits()
RECIPIENT = {"user_id": "u1", "name": "Ivan", "locale": "ru", "timezone": "Europe/Moscow", "attributes": {}}


def content(**overrides: Any) -> TemplateContent:
    base: dict[str, Any] = {
        "variables": [
            {"name": "film", "example": "Dune"},
            {"name": "starts_at", "type": "datetime", "example": "2026-12-01T17:00:00+00:00"},
        ],
        "fallback_locale": "en",
        "locales": {
            "en": {
                "email": {"subject": "{{ film }} premieres",
                          "html": "<p>Hi {{ recipient.name }}: <b>{{ film }}</b></p>"},
                "push": {"title": "{{ film }}", "body": "Starts {{ starts_at|datetime('short') }}",
                         "data": {"link": "cinema://{{ film|lower }}"}},
                "sms": {"text": "{{ film }} at {{ starts_at|datetime('short') }}"},
            },
            "ru": {"email": {"subject": "Премьера: {{ film }}", "html": "<p>{{ recipient.name }}, {{ film }}</p>"}},
        },
    }  # fmt: skip
    base.update(overrides)
    return TemplateContent.model_validate(base)


def messages(template: TemplateContent) -> list[tuple[str, str]]:
    return [(problem.part, problem.message) for problem in validate(template, LIMITS)]


def test_a_valid_template_has_no_problems() -> None:
    assert validate(content(), LIMITS) == []


def test_renders_each_channel_with_recipient_data_in_their_zone_and_locale() -> None:
    template = content()
    variables, problems = coerce_variables(
        template.variables, {"film": "Dune <2>", "starts_at": "2026-12-01T17:00:00Z"}
    )
    assert problems == []
    rendered = render(template, locale_wanted="ru-RU", variables=variables, recipient=RECIPIENT)
    assert rendered.locale == "ru"
    assert rendered.email is not None
    assert rendered.email.subject == "Премьера: Dune <2>"  # text part: not escaped
    assert rendered.email.html == "<p>Ivan, Dune &lt;2&gt;</p>"  # HTML part: autoescaped
    assert rendered.email.text == "Ivan, Dune <2>"  # generated from the HTML
    # ru has no push/sms part: the fallback locale's part, formatted for a Moscow recipient.
    assert rendered.push is not None
    assert rendered.push.body == "Starts 01.12.2026, 20:00"
    assert rendered.push.data == {"link": "cinema://dune <2>"}
    assert rendered.sms is not None
    assert rendered.sms.text == "Dune <2> at 01.12.2026, 20:00"


def test_locale_falls_back_from_region_to_language_to_default() -> None:
    template = content()
    assert template.pick_locale("ru-RU") == "ru"
    assert template.pick_locale("ru") == "ru"
    assert template.pick_locale("de-DE") == "en"
    assert template.pick_locale(None) == "en"


def test_english_recipient_gets_english_formats() -> None:
    template = content()
    variables, _ = coerce_variables(template.variables, {"film": "Up", "starts_at": "2026-12-01T17:00:00Z"})
    recipient = {**RECIPIENT, "locale": "en", "timezone": "America/New_York"}
    rendered = render(template, locale_wanted="en", variables=variables, recipient=recipient, channels=["sms"])
    assert rendered.sms is not None
    assert rendered.sms.text == "Up at 12/1/26, 12:00 PM"
    assert rendered.email is None


def test_jinjas_own_globals_render() -> None:
    # Compiled templates hold a flattened copy of the environment's globals.
    locales = content().model_dump()["locales"]
    locales["en"]["sms"]["text"] = (
        "{% set seen = namespace(n=0) %}{% for i in range(3) %}{% set seen.n = seen.n + i %}{% endfor %}"
        "{{ seen.n }} {{ dict(a=1)['a'] }}"
    )
    rendered = render(content(locales=locales), locale_wanted="en", variables={}, recipient=RECIPIENT, channels=["sms"])
    assert rendered.sms is not None
    assert rendered.sms.text == "3 1"


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("{{ film }", "syntax error"),
        ("{% if film %}no end", "syntax error"),
        ("{{ undeclared_thing }}", "variable 'undeclared_thing' is used but not declared"),
        ("{{ ''.__class__.__mro__ }}", "access to '__class__' is not allowed"),
        ("{{ film['__class__'] }}", "access to '__class__' is not allowed"),
        ("{{ cycler.__init__.__globals__ }}", "access to '__init__' is not allowed"),
        ("{{ lipsum.__globals__['os'] }}", "access to '__globals__' is not allowed"),
    ],
)
def test_sms_text_problems_are_reported_with_part_and_line(source: str, expected: str) -> None:
    locales = content().model_dump()["locales"]
    locales["en"]["sms"]["text"] = "first line\n" + source
    problems = validate(content(locales=locales), LIMITS)
    matching = [p for p in problems if p.part == "en.sms.text" and expected in p.message]
    assert matching, problems
    assert matching[0].line == 2


def test_every_problem_is_reported_at_once() -> None:
    locales = content().model_dump()["locales"]
    locales["en"]["email"]["subject"] = "{{ nope }}"
    locales["ru"]["email"]["html"] = "{{ film.__dict__ }}"
    locales["en"]["sms"]["text"] = "{% for %}"
    variables = [{"name": "film", "example": "Dune"}, {"name": "starts_at", "type": "datetime"}]
    parts = {part for part, _ in messages(content(locales=locales, variables=variables))}
    assert parts == {"variables.starts_at", "en.email.subject", "ru.email.html", "en.sms.text"}


def test_required_variables_need_examples_unless_defaulted() -> None:
    missing = content(variables=[{"name": "film"}, {"name": "starts_at", "type": "datetime", "example": "2026-01-01"}])
    assert ("variables.film", "required variable needs an example value") in messages(missing)
    defaulted = content(
        variables=[
            {"name": "film", "default": "a film"},
            {"name": "starts_at", "type": "datetime", "example": "2026-01-01"},
        ]
    )
    assert validate(defaulted, LIMITS) == []


def test_rendering_with_examples_must_succeed() -> None:
    locales = content().model_dump()["locales"]
    locales["en"]["sms"]["text"] = "{{ film + 1 }}"
    assert any(
        "rendering with the example values failed" in message for _, message in messages(content(locales=locales))
    )


def test_example_of_the_wrong_type_is_a_problem() -> None:
    variables = [{"name": "film", "example": 42}, {"name": "starts_at", "type": "datetime", "example": "2026-01-01"}]
    assert ("variables.film", "expected string: got int") in messages(content(variables=variables))


@pytest.mark.parametrize(
    ("text", "encoding", "segments"),
    [
        ("a" * 160, "GSM-7", 1),
        ("a" * 161, "GSM-7", 2),
        ("a" * 306, "GSM-7", 2),
        ("a" * 307, "GSM-7", 3),
        ("€" * 80, "GSM-7", 1),  # extension characters count twice
        ("€" * 81, "GSM-7", 2),
        ("я" * 70, "UCS-2", 1),
        ("я" * 71, "UCS-2", 2),
        ("я" * 134, "UCS-2", 2),
        ("🎬" * 35, "UCS-2", 1),  # outside the BMP: two UTF-16 units each
    ],
)
def test_sms_segments(text: str, encoding: str, segments: int) -> None:
    assert sms_segments(text) == (encoding, segments)


def test_channel_limits() -> None:
    locales = content().model_dump()["locales"]
    locales["en"]["sms"]["text"] = "я" * 202  # 4 UCS-2 segments
    locales["en"]["push"]["body"] = "x" * 5000
    locales["en"]["email"]["subject"] = "s" * 300
    found = dict(messages(content(locales=locales)))
    assert "4 SMS segments (UCS-2)" in found["en.sms.text"]
    assert "push payload is" in found["en.push"]
    assert "subject is 300 characters" in found["en.email.subject"]

    relaxed = TemplateLimits(sms_max_segments=4, push_max_bytes=6000, email_subject_max_chars=300)
    assert validate(content(locales=locales), relaxed) == []


def test_content_model_rules() -> None:
    with pytest.raises(ValueError, match="fallback_locale 'de' has no entry"):
        content(fallback_locale="de")
    with pytest.raises(ValueError, match="declared twice: film"):
        content(variables=[{"name": "film", "example": "a"}, {"name": "film", "example": "b"}])
    with pytest.raises(ValueError, match="reserved"):
        content(variables=[{"name": "recipient", "example": "a"}])


def test_locale_channels_must_exist_in_the_fallback() -> None:
    locales = content().model_dump()["locales"]
    del locales["en"]["sms"]
    locales["ru"]["sms"] = {"text": "{{ film }}"}
    assert ("ru.sms", "channel not defined in the fallback locale 'en'") in messages(content(locales=locales))


def test_variables_are_checked_against_their_types() -> None:
    template = content(
        variables=[
            {"name": "n", "type": "integer", "example": 1},
            {"name": "link", "type": "url", "example": "https://x.example"},
            {"name": "items", "type": "list", "required": False},
        ]
    )
    _, problems = coerce_variables(template.variables, {"n": "3", "link": "javascript:alert(1)", "extra": 1})
    assert {p.part for p in problems} == {"variables.n", "variables.link", "variables.extra"}
    values, problems = coerce_variables(template.variables, {"n": 3, "link": "https://cinema.example/f/1"})
    assert problems == []
    assert values == {"n": 3, "link": "https://cinema.example/f/1", "items": None}


def test_empty_optional_values_print_nothing_and_times_keep_sms_in_gsm7() -> None:
    template = content(
        variables=[
            {"name": "film", "example": "Dune"},
            {"name": "starts_at", "type": "datetime", "example": "2026-12-01T17:00:00+00:00"},
            {"name": "note", "required": False},
        ]
    )
    locales = template.model_dump()["locales"]
    locales["en"]["sms"]["text"] = "{{ film }}{{ note }} at {{ starts_at|datetime('short') }} for {{ recipient.name }}"
    template = content(variables=template.model_dump()["variables"], locales=locales)
    variables, _ = coerce_variables(template.variables, {"film": "Up", "starts_at": "2026-12-01T17:00:00Z"})
    recipient = {**RECIPIENT, "name": None, "locale": "en", "timezone": "UTC"}
    rendered = render(template, locale_wanted="en", variables=variables, recipient=recipient, channels=["sms"])
    assert rendered.sms is not None
    assert rendered.sms.text == "Up at 12/1/26, 5:00 PM for "
    assert rendered.sms.encoding == "GSM-7"
