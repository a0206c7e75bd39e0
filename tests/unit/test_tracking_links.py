"""Which links click tracking rewrites (core.tracking): the <a> start tags a mail client's
HTML tokenizer sees. On well-formed markup the regex finder agrees tag for tag with a
finder built on html.parser (the reference here); where markup is left open or an element
holds text (title, textarea), it follows the HTML tokenizer."""

from __future__ import annotations

import random
import re
import uuid
from html.parser import HTMLParser
from urllib.parse import unquote

import pytest

from core import tracking
from core.tracking import InstantDelivery

KEY = b"k" * 32
BASE = "https://mail.example.org"
TOKEN = tracking.delivery_token(KEY, InstantDelivery(uuid.UUID(int=7), "email"))

NEWSLETTER = """<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN" "http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">
<html xmlns="http://www.w3.org/1999/xhtml" lang="en">
<head>
<meta http-equiv="Content-Type" content="text/html; charset=UTF-8">
<title>Dune is out</title>
<!--[if mso]><xml><o:OfficeDocumentSettings><o:PixelsPerInch>96</o:PixelsPerInch>
</o:OfficeDocumentSettings></xml><![endif]-->
<style type="text/css">
  a[x-apple-data-detectors] { color: inherit !important; }
  .button > a { background: #c00; } /* <a href="https://shop.example.com/css"> */
</style>
</head>
<body style="margin:0">
<table role="presentation" width="100%" cellpadding="0" cellspacing="0" border=0>
<tr><td align=center>
  <a href="https://shop.example.com/?utm_source=mail&amp;utm_campaign=dune"
    ><img src="https://cdn.example.com/logo.png" alt="Marquee > Cinemas" width="120"/></a>
</td></tr>
<tr><td class='content'>
  <h1>Dune</h1>
  <p>Hello Alex, &lt;a href="https://shop.example.com/not-a-tag"&gt; is text.</p>
  <!--[if mso]>
  <v:roundrect href="https://shop.example.com/book" style="height:40px"><center>Book</center></v:roundrect>
  <![endif]-->
  <!--[if !mso]><!-- -->
  <div class="button"><a class="btn" href="https://shop.example.com/book?film=dune&amp;seat=best" target=_blank
    >Book</a></div>
  <!--<![endif]-->
  <p>Also: <A HREF='https://shop.example.com/films/arrival'>Arrival</A>,
  <a
     href = "https://SHOP.example.com/films/sicario"
     title="Sicario (2015)">Sicario</a>, <a href=https://shop.example.com/films/bare>bare</a>.</p>
  <script type="text/javascript">var s = "<a href='https://shop.example.com/in-script'>";</script>
  <p><a href="mailto:help@shop.example.com">mail</a> <a href="#top">top</a> <a name="anchor">x</a>
  <a href="https://help.example.net/faq" data-x='a"b'>FAQ</a><a href="https://shop.example.com/self-closing"/></p>
</td></tr>
</table>
</body>
</html>
"""

# Well-formed pieces of markup, joined at random below.
PIECES = [
    '<a href="https://shop.example.com/x">', "</a>", "<p>", "</p>", "text ", "<!-- c -->", '<!-- <a href="x"> -->',
    "<script>var a = \"<a href='x'>\";</script>", "<style>a > b { color: red }</style>", "<br/>", "<img src=x>",
    "\n", "\r\n", "<!DOCTYPE html>", '<div class="a>b">', "<div title='a > b'>", "&amp;", "&lt;a href=x&gt;",
    "<A HREF=y>", '<a\n  class="btn"\n  href = "https://SHOP.example.com/spaced" >', "<a/>", '<a name="n">', "</A>",
    '<a data-href="https://shop.example.com/not-this" href=https://shop.example.com/bare>', "<td align=center>",
    "<!--[if mso]><table><tr><td><![endif]-->", '<!--[if !mso]><!-- --><a href="https://m.example.com/">m</a><!--<![endif]-->',
    '<a href="x"/>', "a < b", "5 > 4", '<span style="x:\'y\'">', '<meta charset="utf-8">', "</div >", '<a\thref="t">',
    "<a href='q' >", '<a href=x title="y"a=b>', '<noscript><a href="n"></noscript>', "<p/>", "<head>", "</body>",
]  # fmt: skip


class _ReferenceFinder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.found: list[tuple[tuple[int, int], str]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        text = self.get_starttag_text()
        if tag == "a" and text:
            self.found.append((self.getpos(), text))


def reference_anchors(text: str) -> list[tuple[int, str]]:
    finder = _ReferenceFinder()
    finder.feed(text)
    finder.close()
    line_starts = [0, *(match.end() for match in re.finditer("\n", text))]
    return [(line_starts[line - 1] + column, tag) for (line, column), tag in finder.found]


def instrument(text: str) -> str:
    return tracking.instrument_html(
        text, token=TOKEN, base_url=BASE, allowed_hosts=["shop.example.com"], opens=False, clicks=True, key=KEY
    )


def tracked_targets(text: str) -> list[str]:
    out = instrument(text)
    return [unquote(url) for url in re.findall(r"/t/c/[^?]+\?u=([^&]+)&amp;", out)]


def test_a_newsletter_has_the_links_html_parser_finds() -> None:
    anchors = tracking._anchor_tags(NEWSLETTER)
    assert anchors == reference_anchors(NEWSLETTER)
    assert len(anchors) == 10
    assert tracked_targets(NEWSLETTER) == [
        "https://shop.example.com/?utm_source=mail&utm_campaign=dune",
        "https://shop.example.com/book?film=dune&seat=best",
        "https://shop.example.com/films/arrival",
        "https://SHOP.example.com/films/sicario",
        "https://shop.example.com/films/bare",
        "https://shop.example.com/self-closing",
    ]


@pytest.mark.parametrize("seed", range(4))
def test_well_formed_markup_reads_as_html_parser_reads_it(seed: int) -> None:
    pick = random.Random(seed)
    for _ in range(500):
        text = "".join(pick.choice(PIECES) for _ in range(pick.randint(1, 25)))
        assert tracking._anchor_tags(text) == reference_anchors(text), text


@pytest.mark.parametrize(
    "text",
    [
        '<title>Sale <a href="https://shop.example.com/t"></title>',  # title and textarea hold text
        '<textarea><a href="https://shop.example.com/t"></textarea>',
        '<!-- never closed <a href="https://shop.example.com/c">',  # the comment runs to the end
        '<p title="never closed><a href="https://shop.example.com/q">',  # so does the tag
        '<a href="https://shop.example.com/open"',  # a tag without its ">" is no tag
        '<!--><a href="https://shop.example.com/after-empty-comment">',
    ],
)
def test_what_the_html_tokenizer_does_not_read_as_a_link(text: str) -> None:
    expected = ["https://shop.example.com/after-empty-comment"] if "empty-comment" in text else []
    assert tracked_targets(text) == expected


def test_rewriting_twice_changes_nothing_more() -> None:
    once = instrument(NEWSLETTER)
    assert instrument(once) == once
