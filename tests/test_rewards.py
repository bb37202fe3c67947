"""rewards.py: a table of completions and their exact rewards, worked by hand."""
import random

import pytest

import rewards

T600 = "x" * 600     # Len = 600 chars -> LR = 600/1200 * .5 = .25 -> FR = .75
T1500 = "y" * 1500   # Len capped at ML -> FR = 1.0


def ok(think, ans):
    return f"<think>{think}</think> <answer>{ans}</answer>"


# (completion, label, eq. 4 reward)
TABLE = [
    (ok(T600, "B"), "B", 1.0 + 0.75),                       # correct, medium thinking
    (ok(T600, "B"), "C", -0.75),                            # wrong, medium thinking
    (ok(T1500, "B"), "B", 2.0),                             # correct, long thinking (capped)
    (ok(T1500, "A"), "B", -1.0),                            # wrong, long: the biggest penalty
    (ok("", "B"), "B", 1.5),                                # empty thinking, correct
    (ok("  ab  ", "B"), "B", 1.0 + 0.5 + 2 / 1200 * 0.5),   # Len counts stripped characters
    (ok("", ""), "B", -0.5),                                # empty answer: wrong, format fine
    (ok("", "B. the cat"), "B", 1.5),                       # "B. text" counts
    (ok("", " B "), "B", 1.5),                              # white space inside the tag
    (ok("", "(B)"), "B", -0.5),                             # "(B)" does not
    (ok("", "b"), "B", -0.5),                               # case-sensitive
    (ok("", "Because"), "B", -0.5),                         # a word is not a letter
    ("\n  <think>a</think>\n<answer>B</answer>  ", "B", 1.5 + 1 / 1200 * 0.5),  # leading/trailing space
    ("<think>a</think><answer>B</answer>", "B", 1.5 + 1 / 1200 * 0.5),          # no space needed
    ("<answer>B</answer>", "B", -2.0),                      # no think block
    ("<think>a</think>", "B", -2.0),                        # no answer block
    ("B", "B", -2.0),                                       # no tags at all
    ("", "B", -2.0),                                        # nothing
    ("<think>a</think><think>b</think><answer>B</answer>", "B", -2.0),   # duplicated tag
    ("<think>a<think>b</think></think><answer>B</answer>", "B", -2.0),   # nested tags
    ("<think>a</think><answer>B</answer><answer>B</answer>", "B", -2.0),
    ("Sure. <think>a</think><answer>B</answer>", "B", -2.0),  # text before
    ("<think>a</think><answer>B</answer> done", "B", -2.0),   # text after
    ("<answer>B</answer><think>a</think>", "B", -2.0),        # wrong order
]


@pytest.mark.parametrize("completion,label,expected", TABLE)
def test_eq4_table(completion, label, expected):
    assert rewards.reward(completion, label).total == pytest.approx(expected, abs=1e-12)


def test_format_and_accuracy_parts():
    assert rewards.format_reward(ok(T600, "B")) == pytest.approx(0.75)
    assert rewards.format_reward(ok(T600, "B"), length_reward=False) == 1.0
    assert rewards.format_reward("<answer>B</answer>") == 0.0
    assert rewards.accuracy_reward(ok("", "B"), "B") == 1.0
    assert rewards.accuracy_reward("<answer>B</answer>", "B") == 1.0  # accuracy alone ignores format
    assert rewards.think_length(ok("  abc ", "B")) == 3


def test_figure5_settings():
    kw_format_only = dict(length_reward=False, wrong_penalty=False)
    kw_length = dict(length_reward=True, wrong_penalty=False)
    # format reward only: R = AR + FR with FR in {0, 1}
    assert rewards.reward(ok(T600, "B"), "B", **kw_format_only).total == 2.0
    assert rewards.reward(ok(T600, "C"), "B", **kw_format_only).total == 1.0
    assert rewards.reward("<answer>B</answer>", "B", **kw_format_only).total == 1.0  # broken format, right letter
    assert rewards.reward("nothing", "B", **kw_format_only).total == 0.0
    # + length reward: FR = .5 + LR
    assert rewards.reward(ok(T600, "B"), "B", **kw_length).total == pytest.approx(1.75)
    assert rewards.reward(ok(T600, "C"), "B", **kw_length).total == pytest.approx(0.75)   # wrong and long: still positive
    assert rewards.reward(ok(T1500, "C"), "B", **kw_length).total == pytest.approx(1.0)
    # + wrong-answer penalty (default): wrong and long is now the worst well-formed answer
    assert rewards.reward(ok(T1500, "C"), "B").total == pytest.approx(-1.0)


def test_reference_code_option():
    ref = lambda *a: rewards.reference_reward(*a).total
    assert ref("<answer>B</answer>", "B") == 1.0       # AR=1, FR=0: 1 + (2-1)*0 = 1 (eq. 4 gives -2)
    assert ref("B", "B") == 1.0                         # no tag: falls back to the whole completion
    assert ref("C", "B") == -2.0                        # 0 -> -2
    assert ref(ok(T600, "B"), "B") == pytest.approx(1.75)
    assert ref(ok(T600, "C"), "B") == pytest.approx(-0.75)   # 0 + (0-1)*0.75
    assert ref(ok("", "Because"), "B") == pytest.approx(1.5)  # startswith: the word counts there
    # a tag across a newline is no tag there: the whole text is the answer, wrong; FR = .5 + 1/1200 * .5
    assert ref("<think>x</think> <answer>\nB</answer>", "B") == pytest.approx(-(0.5 + 0.5 / 1200))
    assert rewards.reward("<think>x</think> <answer>\nB</answer>", "B").accuracy == 1.0  # eq. (4) reads it


def test_parse_answer():
    p = rewards.parse_answer
    assert p("<think>x</think><answer>D</answer>") == "D"
    assert p("<answer>F</answer>") is None                      # not among the options
    assert p("<answer>F</answer>", options="ABCDEF") == "F"
    assert p("C", tagged=False) == "C" and p("C. blue", tagged=False) == "C"
    assert p("Cyan", tagged=False) is None and p("no tag") is None


def test_temporal_bonus():
    assert rewards.temporal_bonus([1, 1, 0, 0], [1, 0]) == [0.3, 0.3, 0.0, 0.0]        # .5 >= 1 * .5
    assert rewards.temporal_bonus([1, 0, 0, 0], [1, 0]) == [0.0] * 4                   # .25 < .5
    assert rewards.temporal_bonus([1, 0, 0, 0], [1, 0, 0, 0, 0], mu=0.8) == [0.3, 0, 0, 0]  # .25 >= .8 * .2
    assert rewards.temporal_bonus([1, 0, 0, 0], [1, 1, 0, 0, 0], mu=0.8) == [0.0] * 4     # .25 < .8 * .4


def test_fuzz_never_raises_and_stays_in_range():
    rng = random.Random(0)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "A", "B", "(B)", " ", "\n", "x" * 50, "<", ">", "é"]
    for _ in range(3000):
        c = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        r, AR, FR = rewards.reward(c, "B")
        assert r == -2.0 or -1.0 <= r <= -0.5 or 1.5 <= r <= 2.0, (c, r)
        assert (AR, FR) == (rewards.accuracy_reward(c, "B"), rewards.format_reward(c)), c  # the parts, once
        ref = rewards.reference_reward(c, "B").total
        assert ref == -2.0 or -1.0 <= ref <= 2.0


def test_the_records_own_letters_count():
    """A 7-option record: G is a right answer there, worth the same as B in a 5-option one."""
    seven = rewards.reward(ok(T600, "G"), "G", options="ABCDEFG")
    assert seven == rewards.reward(ok(T600, "B"), "B") == (1.75, 1.0, 0.75)
    assert rewards.reward(ok(T600, "G"), "G").total == -0.75   # not among A-E: wrong, with a good format


def test_parsers_equal_the_regular_expressions_they_replace():
    """The paper's rule written as regular expressions (the slow path) against the linear parsers."""
    import re
    FORMAT = re.compile(r"<think>.*?</think>\s*<answer>.*?</answer>", re.DOTALL)
    rng = random.Random(1)
    pieces = ["<think>", "</think>", "<answer>", "</answer>", "B", " ", "\n", "xy", "<", "/", "think>"]
    for _ in range(5000):
        c = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 10)))
        text = c.strip()
        by_regex = FORMAT.fullmatch(text) is not None and all(text.count(t) == 1 for t in rewards.TAGS)
        assert rewards.format_ok(c) == by_regex, c
        m = re.search(r"<answer>(.*?)</answer>", c, re.DOTALL)
        assert rewards.inside(c, "<answer>", "</answer>") == (m.group(1) if m else None), c
        m = re.search(r"<answer>(.*?)</answer>", c)        # the reference's: no DOTALL
        assert rewards.answer_on_one_line(c) == (m.group(1) if m else None), c
        m = re.search(r"<think>(.*?)</think>", c, re.DOTALL)
        assert rewards.think_length(c) == (len(m.group(1).strip()) if m else 0), c


def test_parsers_take_linear_time_on_unclosed_tags():
    """240 KB of unclosed tags: a lazy regex needs ~90 s here (quadratic), the parsers milliseconds.
    The bound is 100x the linear time, so only a quadratic parser can miss it."""
    import time
    for text in ("<answer>" * 30_000, "<think>" * 30_000 + "</answer>", "<answer>\n" * 30_000 + "</answer>"):
        t0 = time.perf_counter()
        rewards.reward(text, "B")
        rewards.reference_reward(text, "B")
        rewards.parse_answer(text)
        assert time.perf_counter() - t0 < 2.0
