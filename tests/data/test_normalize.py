"""Unicode/whitespace normalization, Project Gutenberg boilerplate removal and HTML to text."""

import pytest

from llmpipe.data.accounting import Record
from llmpipe.data.normalize import HtmlToText, StripGutenberg, html_to_text, looks_like_html, normalize_text, strip_gutenberg

VERSE = "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n"


def test_nfc_composes_decomposed_characters():
    decomposed = "Cafe\u0301 cre\u0300me"
    assert normalize_text(decomposed) == "Caf\u00e9 cr\u00e8me"


def test_verse_line_breaks_survive_and_spaces_collapse():
    messy = "  Shall I compare\tthee  to a summer's day?   \r\nThou art more lovely \u00a0and more temperate:\r\n"
    assert normalize_text(messy) == "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:"
    assert normalize_text(VERSE).count("\n") == 1  # one line break between the two verse lines, none lost


def test_line_endings_blank_lines_and_control_characters():
    text = "\ufeffOne\rTwo\u2028Three\x0cFour\n\n\n\n\nFive\x00\x07 six\x1b\t\tseven"
    assert normalize_text(text) == "One\nTwo\nThree\nFour\n\nFive six seven"


def test_normalization_is_idempotent():
    once = normalize_text("A  b\r\n\r\n\r\n  c\u0301 \n")
    assert normalize_text(once) == once


# -- Project Gutenberg ---------------------------------------------------------------------------------

BODY = "HAMLET, PRINCE OF DENMARK\n\nby William Shakespeare\n\nACT I.\n\nBer. Who's there?\nFran. Nay, answer me."

MODERN = f"""\ufeffThe Project Gutenberg eBook of Hamlet, by William Shakespeare

This eBook is for the use of anyone anywhere in the United States and
most other parts of the world at no cost and with almost no restrictions
whatsoever. You may copy it, give it away or re-use it under the terms
of the Project Gutenberg License included with this eBook or online at
www.gutenberg.org.

Title: Hamlet
Author: William Shakespeare
Release Date: November, 1998 [eBook #1524]
Language: English

*** START OF THE PROJECT GUTENBERG EBOOK HAMLET ***




Produced by Dianne Bean and David Widger




{BODY}




*** END OF THE PROJECT GUTENBERG EBOOK HAMLET ***

Updated editions will replace the previous one--the old editions will
be renamed.

*** START: FULL LICENSE ***

THE FULL PROJECT GUTENBERG LICENSE
PLEASE READ THIS BEFORE YOU DISTRIBUTE OR USE THIS WORK
"""

EARLY_2000S = f"""The Project Gutenberg EBook of Hamlet, by William Shakespeare

Copyright laws are changing all over the world. Be sure to check the
copyright laws for your country before downloading or redistributing
this or any other Project Gutenberg eBook.

**Welcome To The World of Free Plain Vanilla Electronic Texts**

*****These eBooks Were Prepared By Thousands of Volunteers!*****

*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***

{BODY}

End of the Project Gutenberg EBook of Hamlet, by William Shakespeare

*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***

***** This file should be named 1524.txt or 1524.zip *****

*END THE SMALL PRINT! FOR PUBLIC DOMAIN EBOOKS*Ver.02/11/02*END*
"""

NINETIES_SMALL_PRINT = f"""**The Project Gutenberg Etext of Hamlet, by Shakespeare**

Please take a look at the important information in this header.
We encourage you to keep this file on your own disk.

**The Legal Small Print**

LIMITED WARRANTY; DISCLAIMER OF DAMAGES. But for the "Right of Replacement
or Refund" described below, [1] the Project (and any other party you may
receive this etext from as a PROJECT GUTENBERG-tm etext) disclaims all
liability to you for damages, costs and expenses.

*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*

{BODY}

End of Project Gutenberg's Hamlet, by William Shakespeare
"""


@pytest.mark.parametrize("raw", [MODERN, EARLY_2000S, NINETIES_SMALL_PRINT], ids=["2020s", "2000s", "1990s"])
def test_gutenberg_header_and_footer_removed_body_kept(raw: str):
    text, header, footer = strip_gutenberg(normalize_text(raw))
    assert text == BODY
    assert header and footer


def test_step_counts_removed_boilerplate_and_leaves_other_texts_alone():
    step = StripGutenberg()
    out = step(Record("a", "s", normalize_text(MODERN)))
    assert out.text == BODY
    assert step.stats["headers_removed"] == 1 and step.stats["footers_removed"] == 1
    plain = Record("b", "s", "A text that merely mentions Project Gutenberg in passing.\nNothing to strip.")
    assert step(plain) is plain


# -- HTML ----------------------------------------------------------------------------------------------

PAGE = """<!DOCTYPE html>
<html><head><title>Menu title</title><style>p { color: red }</style>
<script>var tracking = "do not keep me";</script></head>
<body><h1>The Tempest</h1>
<p>Full fathom five thy father lies;
   Of his bones are coral made &amp; those are pearls that were his eyes: caf&eacute; &#8212; &lt;ok&gt;</p>
<p>Line one<br>Line two</p>
<ul><li>first</li><li>second</li></ul>
<noscript>enable javascript</noscript>
</body></html>"""


def test_html_to_text_drops_scripts_styles_and_decodes_entities():
    text = normalize_text(html_to_text(PAGE))
    assert "tracking" not in text and "color" not in text and "Menu title" not in text and "javascript" not in text
    assert "made & those" in text and "caf\u00e9 \u2014 <ok>" in text
    assert text.startswith("The Tempest\n\nFull fathom five thy father lies; Of his bones")  # HTML newlines are spaces
    assert "Line one\nLine two" in text and "first\nsecond" in text


def test_html_detection_and_modes():
    page = Record("p", "web", PAGE, {"format": "jsonl"})
    fragment = Record("f", "web", "<p>Hello <b>there</b></p>", {"format": "html", "origin": "site/a.html"})
    prose = Record("t", "books", "If a < b and c > d, then <this> is not markup.", {"format": "txt"})
    assert looks_like_html(page) and looks_like_html(fragment) and not looks_like_html(prose)
    auto = HtmlToText("auto")
    assert auto(fragment).text == "Hello there"
    assert auto(prose) is prose
    assert HtmlToText("never")(page) is page
    assert HtmlToText("always")(Record("x", "s", "a &amp; b")).text == "a & b"
    assert auto.stats["docs_converted"] == 1
