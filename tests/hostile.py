"""Hostile text a person can paste, and a reader of the token view: shared by the unit tests
and the browser tests."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "assets" / "samples"

# Text the app must analyse and show literally.
HOSTILE_TEXTS = {
    "script": "<script>alert(1)</script> and then some text",
    "img": '<img src=x onerror=alert(1)> and <a href="javascript:alert(1)">a link</a>',
    "markup": "</span></div><b>bold</b> **not bold** $x^2$ `code` &amp; &lt;s&gt; <|endoftext|> </s>",
    "nul": "before\x00after \x00\x00 end",
    "replacement": "bad byte \ufffd here \ufffd\ufffd",
    "emoji_zwj": "👩\u200d🔬 scientist 👨\u200d👩\u200d👧\u200d👦 family 🏳️\u200d🌈 flag 👍🏽",
    "combining": "e\u0301 n\u0303 Z\u0334\u0321\u0322a\u0336l\u0337g\u0338o\u0335 and \u0301 alone",
    "rtl": "English עברית مرحبا بالعالم \u202eevil override\u202c back \u200f",
    "controls": "tab\there\r\nline\u2028sep \u200b zero-width \x1b[31m ansi \x7f",
}

# Text with nothing to analyse: the app asks for text instead.
BLANK_TEXTS = {
    "empty": "",
    "spaces": "    ",
    "whitespace": " \n\t \r\n\u3000\u00a0\u2003 ",
}

LONG_TEXT_CHARS = 200_000


def long_text() -> str:
    """200,000 characters of real prose, code and other scripts."""
    samples = "\n".join(path.read_text(encoding="utf-8") for path in sorted(SAMPLES.glob("*.txt")))
    return (samples * (LONG_TEXT_CHARS // len(samples) + 1))[:LONG_TEXT_CHARS]


class TokenView(HTMLParser):
    """The tags, attributes and per-token text of token_view_html's output."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: set[str] = set()
        self.attributes: set[str] = set()
        self.tokens: list[str] = []
        self.positions: list[tuple[int, int]] = []  # first and last token of each span
        self._depth = 0  # > 0 inside a token span
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attributes.update(name for name, _ in attrs)
        if self._depth:
            self._depth += tag != "br"
        elif tag == "span" and "moeviz-token" in (dict(attrs).get("class") or "").split():
            self.tokens.append("")
            first, last = dict(attrs)["data-positions"].split("-")
            self.positions.append((int(first), int(last)))
            self._depth = 1

    def handle_endtag(self, tag):
        if self._depth:
            self._depth -= 1

    def handle_data(self, data):
        if self._depth:
            self.tokens[-1] += data
