"""Gopher-style quality and repetition filters: each keeps good text, rejects its kind of junk with
its own reason, and its threshold in params changes the outcome."""

import pytest

from llmpipe.data.accounting import Record
from llmpipe.data.filters import GopherQuality, GopherRepetition, QualityConfig
from llmpipe.data.normalize import normalize_text
from llmpipe.data.steps import Reject

GOOD = normalize_text("""Now is the winter of our discontent made glorious summer by this sun of York,
and all the clouds that lour'd upon our house in the deep bosom of the ocean buried.
Now are our brows bound with victorious wreaths, our bruised arms hung up for monuments,
our stern alarums changed to merry meetings, our dreadful marches to delightful measures.

Grim-visaged war hath smooth'd his wrinkled front, and now, instead of mounting barded steeds
to fright the souls of fearful adversaries, he capers nimbly in a lady's chamber
to the lascivious pleasing of a lute. But I, that am not shaped for sportive tricks,
nor made to court an amorous looking-glass, have no delight to pass away the time.""")

LEGALESE = ("All rights reserved. No part of this publication may be reproduced, stored in a retrieval system, "
            "or transmitted in any form or by any means without the prior written permission of the publisher.")
LOREM = " ".join(["lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod tempor"] * 6)


def judge(text: str, **overrides) -> str:
    """'kept' or the reject reason, through both steps like the pipeline runs them."""
    cfg = QualityConfig(**overrides)
    record = Record("id", "src", normalize_text(text))
    for step in (GopherQuality(cfg), GopherRepetition(cfg)):
        out = step(record)
        if isinstance(out, Reject):
            return out.reason
    return "kept"


def test_good_prose_is_kept():
    assert judge(GOOD) == "kept"


@pytest.mark.parametrize("text, reason", [
    ("To be, or not to be: that is the question.", "quality.too_few_words"),
    (" ".join(["a to be of it is so"] * 10), "quality.short_words"),
    (" ".join(["incomprehensibilities of the counterrevolutionaries"] * 20), "quality.long_words"),
    (GOOD + "\n" + " ".join(["#news #sale #free"] * 20), "quality.symbols"),
    (GOOD + "\n" + " ".join(["12.5 | 1,000 -- 3"] * 12), "quality.non_alpha"),
    (LOREM, "quality.few_stop_words"),
    (GOOD + "\n" + "\n".join(f"and then the story of item {i} continues..." for i in range(8)), "quality.ellipsis_lines"),
    ("\n\n".join(["Click here to subscribe to our newsletter and the best of deals."] * 4 + [GOOD]),
     "quality.dup_paragraphs"),
    ("\n\n".join([f"Scene {i}. The players enter and take their places." for i in range(8)] + [GOOD] * 2),
     "quality.dup_paragraph_chars"),
    (GOOD.split("\n\n")[0] + "\n" + "\n".join(["Home", "About", "Contact", "Login"] * 4), "quality.dup_lines"),
    ("\n".join(GOOD.replace("\n\n", "\n").split("\n") + [LEGALESE] * 3), "quality.dup_line_chars"),
])
def test_each_filter_rejects_its_junk_with_its_reason(text: str, reason: str):
    assert judge(text) == reason


def test_max_words_rejects_long_documents():
    assert judge(GOOD, max_words=100) == "quality.too_many_words"


@pytest.mark.parametrize("text, overrides", [
    ("To be, or not to be: that is the question.", {"min_words": 5}),
    (LOREM, {"min_stop_words": 0}),
    (GOOD + "\n" + " ".join(["12.5 | 1,000 -- 3"] * 12), {"min_alpha_words_fraction": 0.5}),
    (GOOD.split("\n\n")[0] + "\n" + "\n".join(["Home", "About", "Contact", "Login"] * 4), {"max_dup_line_fraction": 0.9}),
])
def test_thresholds_change_the_outcome(text: str, overrides: dict):
    assert judge(text) != "kept"
    assert judge(text, **overrides) == "kept"


def test_play_dialogue_with_repeated_speaker_names_is_kept():
    # Quick exchanges repeat speaker lines in ~40% of the lines: Gopher's 0.3 would reject real plays.
    dialogue = "\n\n".join(f"{who}.\n{line}" for who, line in [
        ("HAMLET", "Do you see yonder cloud that's almost in shape of a camel?"),
        ("POLONIUS", "By the mass, and 'tis like a camel, indeed."),
        ("HAMLET", "Methinks it is like a weasel."),
        ("POLONIUS", "It is backed like a weasel."),
        ("HAMLET", "Or like a whale?"),
        ("POLONIUS", "Very like a whale."),
        ("HAMLET", "Then I will come to my mother by and by. They fool me to the top of my bent."),
        ("POLONIUS", "I will say so."),
        ("HAMLET", "By and by is easily said. Leave me, friends, and let the night be what it will be."),
    ])
    assert judge(dialogue) == "kept"
    assert judge(dialogue, max_dup_line_fraction=0.3) == "quality.dup_lines"


def test_reject_detail_names_the_measured_value():
    out = GopherQuality(QualityConfig())(Record("id", "src", "Too short."))
    assert out == Reject("quality.too_few_words", "2 words < min_words 50")
