"""The toxicity filter: the shipped word-list scorer, its threshold, and a scorer plugged in by path."""

from pathlib import Path

import pytest

from llmpipe.data.accounting import Record
from llmpipe.data.steps import Reject
from llmpipe.data.toxicity import ToxicityConfig, ToxicityFilter, WordListScorer, default_words_path
from llmpipe.errors import UserError

PROSE = ("I pray you, sir, what is the matter with the king? He hath been sick these three days, "
         "and will see no one but his daughter, who sits by him and reads to him of old wars. ") * 3


def test_word_list_ships_with_the_package_and_is_modest():
    words = WordListScorer().words
    assert default_words_path().is_file() and 20 <= len(words) <= 200
    assert b"fuck" in words and b"whore" not in words and b"bastard" not in words  # Shakespeare keeps his


def test_score_is_the_share_of_listed_words_case_and_punctuation_insensitive():
    scorer = WordListScorer()
    assert scorer.score(PROSE) == 0.0
    assert scorer.score("What the FUCK, you shit-head!") == pytest.approx(2 / 6)


def test_filter_rejects_above_threshold_and_threshold_changes_outcome(tmp_path: Path):
    toxic = Record("t", "web", PROSE + " fuck this shit, fucking hell.")
    strict = ToxicityFilter(ToxicityConfig(), tmp_path)
    out = strict(toxic)
    assert isinstance(out, Reject) and out.reason == "toxicity" and "score 0.0259" in out.detail  # 3 of 116 words
    assert strict(Record("p", "web", PROSE)).text == PROSE
    assert ToxicityFilter(ToxicityConfig(threshold=0.1), tmp_path)(toxic) is toxic


def test_custom_word_list_path_is_relative_to_the_project(tmp_path: Path):
    (tmp_path / "words.txt").write_text("# mine\nmatter\n")
    step = ToxicityFilter(ToxicityConfig(scorer_args={"words_path": "words.txt"}), tmp_path)
    assert step(Record("p", "s", PROSE)).reason == "toxicity"  # "matter" is on this list


def test_a_classifier_plugs_in_by_dotted_path(tmp_path: Path, monkeypatch):
    (tmp_path / "my_scorers.py").write_text(
        "class LengthScorer:\n"
        "    def __init__(self, scale):\n"
        "        self.scale = scale\n"
        "    def score(self, text):\n"
        "        return min(1.0, len(text) / self.scale)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = ToxicityConfig(scorer="my_scorers:LengthScorer", scorer_args={"scale": 100}, threshold=0.5)
    step = ToxicityFilter(cfg, tmp_path)
    assert step(Record("s", "s", "short")).text == "short"
    assert step(Record("l", "s", "x" * 80)).reason == "toxicity"


def test_bad_scorer_path_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match="toxicity.scorer"):
        ToxicityFilter(ToxicityConfig(scorer="no_such_module:Scorer"), tmp_path)
    with pytest.raises(UserError, match="score"):
        ToxicityFilter(ToxicityConfig(scorer="pathlib:PurePath"), tmp_path)
