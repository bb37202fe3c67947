"""
The rule rewards of TinyLLaVA-Video-R1 (paper s3.4, eqs. 3-4) and Video-R1's T-GRPO.

Every reward is a pure function of text (the completion, decoded without special tokens) and the
label; no torch. The answer parser `parse_answer` is shared with evaluate.py, so the training reward
and the benchmark metric cannot drift apart.

Departures from the reference code (ZhangXJ199/TinyLLaVA-Video-R1's reward functions), each on purpose:
1. eq. (4) as the paper writes it. The reference computes AR + (2AR - 1) FR, which gives +1.0 to a
   correct answer in a broken format; `reference_reward` reproduces it for comparison.
2. An answer counts when the text in <answer></answer> is the letter, or the letter followed by a
   non-letter ("B", "B. sheep", "B)"). The reference's `startswith` also accepts "Because" for B.
3. No math-equivalence check (the answers here are letters).
4. Newlines: the format rule and the answer tag of eq. (3)-(4) match across newlines (the reference's
   format check uses DOTALL too), and so does `parse_answer`, in training and in evaluate.py's default
   protocol. `reference_reward` reads the answer tag as the reference's accuracy check does, on one
   line only, and so do the reference's evaluation parsers (evaluate.py --protocol reference).

Try: python rewards.py   (prints the reward of a few completions)
"""
import functools
from typing import NamedTuple

R0, R1, ML = 0.5, 0.5, 1200  # paper s3.4: base format reward, length reward weight, length cap (chars)
R2 = R0 + R1                 # accuracy reward: "equal importance" with the format reward
TAGS = ("<think>", "</think>", "<answer>", "</answer>")

# The parsers below use str.find, not regular expressions: they run in linear time on any input (a
# lazy regex such as <answer>(.*?)</answer> is quadratic on text full of unclosed tags).


def inside(text, open_tag, close_tag):
    """The text between the first `open_tag` and the first `close_tag` after it, or None: what
    re.search(open_tag + "(.*?)" + close_tag, text, re.DOTALL) finds, in linear time."""
    start = text.find(open_tag)
    if start < 0:
        return None
    end = text.find(close_tag, start + len(open_tag))
    return None if end < 0 else text[start + len(open_tag):end]


def answer_on_one_line(text):
    """What re.search(r"<answer>(.*?)</answer>", text) finds without DOTALL (the reference code's answer
    tag: no newline inside), or None; in linear time."""
    start, end = text.find("<answer>"), -1
    while start >= 0:
        if end < start + len("<answer>"):
            end = text.find("</answer>", start + len("<answer>"))
            if end < 0:
                return None
        newline = text.find("\n", start + len("<answer>"), end)
        if newline < 0:
            return text[start + len("<answer>"):end]
        start = text.find("<answer>", newline)
    return None


def format_ok(completion):
    """The format rule (paper s3.4): the stripped completion is exactly <think>...</think> then
    <answer>...</answer> (white space between allowed), and each of the four tags appears once."""
    text = completion.strip()
    if any(text.count(tag) != 1 for tag in TAGS):
        return False
    think_end, answer_start = text.find("</think>"), text.find("<answer>")
    return (text.startswith("<think>") and text.endswith("</answer>") and think_end < answer_start
            and text[think_end + len("</think>"):answer_start].strip() == "")


def think_length(completion):
    """Len of eq. (3): the number of CHARACTERS of the stripped text inside <think></think>
    (0 when there is no think block)."""
    thought = inside(completion, "<think>", "</think>")
    return 0 if thought is None else len(thought.strip())


def format_reward(completion, ml=ML, r0=R0, r1=R1, length_reward=True):
    """FR, eq. (3): r0 + LR with LR = min(1, Len / ML) * r1 when the format rule holds, else 0.

    With length_reward=False (the usual fixed format reward of Figure 5's first setting) a good
    format earns the same maximum, r0 + r1, whatever its length.
    Returns a float in {0} U [r0, r0 + r1]. Example: 600 characters of thinking, ML = 1200:
    FR = 0.5 + min(1, 600/1200) * 0.5 = 0.75.
    """
    if not format_ok(completion):
        return 0.0
    if not length_reward:
        return r0 + r1
    LR = min(1.0, think_length(completion) / ml) * r1  # eq. (3)
    return r0 + LR


def parse_answer(text, options="ABCDE", tagged=True):
    """The answer letter of a completion, or None.

    tagged=True (Reason mode): the text inside the first <answer></answer>; tagged=False (Option
    mode): the whole completion. After stripping, that text must be one of `options` alone, or
    followed by a non-letter: "B", "B.", "B. sheep", "B)" -> "B"; "(B)", "b", "Because", "" -> None.
    """
    if tagged:
        text = inside(text, "<answer>", "</answer>")
        if text is None:
            return None
    text = text.strip()
    if text and text[0] in options and (len(text) == 1 or not text[1].isalpha()):
        return text[0]
    return None


def accuracy_reward(completion, answer, r2=R2, options="ABCDE"):
    """AR (paper s3.4): r2 if the letter in <answer></answer> is the label, else 0 (also when there
    is no answer tag). `answer` is the label letter. Returns r2 or 0.0."""
    return r2 if parse_answer(completion, options) == answer else 0.0


class Reward(NamedTuple):
    """One completion's reward and its parts, each computed once: R (eq. 4), AR and FR (eq. 3)."""
    total: float
    accuracy: float
    format: float


def reward(completion, answer, length_reward=True, wrong_penalty=True, ml=ML, r0=R0, r1=R1, r2=R2,
           options="ABCDE"):
    """The total reward R of one completion, eq. (4), and the settings of the paper's Figure 5.

    Settings:  length_reward  wrong_penalty
      format reward only   False      False   R = AR + FR, FR in {0, 1}         (the usual)
      + length reward      True       False   R = AR + FR, FR = r0 + LR
      + wrong penalty      True       True    eq. (4)                             (the default)
    eq. (4):  AR + FR          if FR > 0 and AR = r2     correct:        1.5 .. 2.0
              -FR              if FR > 0 and AR = 0      wrong:         -0.5 .. -1.0
              -(r0 + r1 + r2)  if FR = 0                 broken format: -2.0
    A longer wrong answer is penalised more, so length grows only where it helps accuracy.
    `options`: the record's option letters (data.option_letters), so that a 7-option answer G counts.
    Returns: Reward(total=R, accuracy=AR, format=FR), floats.
    Example: "<think>" + 1200 chars + "</think><answer>B</answer>", label B -> Reward(2.0, 1.0, 1.0);
    label C -> Reward(-1.0, 0.0, 1.0).
    """
    FR = format_reward(completion, ml, r0, r1, length_reward)
    AR = accuracy_reward(completion, answer, r2, options)
    if not wrong_penalty:
        R = AR + FR
    elif FR > 0 and AR == r2:
        R = AR + FR
    elif FR > 0:
        R = -FR
    else:
        R = -(r0 + r1 + r2)
    return Reward(R, AR, FR)


def reference_reward(completion, answer, ml=ML, r0=R0, r1=R1, options=None):
    """The reference code's total reward, kept for comparison (the reward functions of the
    ZhangXJ199/TinyLLaVA-Video-R1 repository): R = AR + (2 AR - 1) FR, with exactly 0 mapped to -2.0.
    AR there: the stripped text in the first <answer></answer> that opens and closes on one line (its
    re.search has no DOTALL), or the whole completion when there is none, equals the label or starts
    with it (tinyllava/train/train.py's accuracy_reward, without its math_verify check). Differs from eq. (4) for a correct answer in a broken
    format (+1.0, not -2.0) and for "Because"-style answers. `options` is unused (the reference
    compares with the label only); it is here so both rewards are called alike.
    Returns: Reward(total, accuracy=AR, format=FR)."""
    tagged = answer_on_one_line(completion)
    text = (completion if tagged is None else tagged).strip()
    AR = 1.0 if text == answer or text.startswith(answer) else 0.0
    FR = format_reward(completion, ml, r0, r1)
    r = AR + (2 * AR - 1) * FR
    return Reward(-2.0 if r == 0 else r, AR, FR)


def setting(reference=False, length_reward=True, wrong_penalty=True, ml=ML):
    """The reward of one of train.py's settings (eq. 4, Figure 5's two others, or the reference code's),
    as f(completion, label, options=letters) -> Reward."""
    if reference:
        return functools.partial(reference_reward, ml=ml)
    return functools.partial(reward, length_reward=length_reward, wrong_penalty=wrong_penalty, ml=ml)


# -----------------------------------------------------------------------------
# Video-R1 (arXiv 2503.21776; repository tulerfeng/Video-R1)

def temporal_bonus(acc_ordered, acc_shuffled, alpha=0.3, mu=1.0):
    """T-GRPO's temporal reward: the G completions on ordered frames get +alpha each where correct,
    if p >= mu * p~ (p, p~: accuracy rates of the ordered and the shuffled group).

    Args: acc_ordered: G accuracies (0/1 or AR values, > 0 means correct); acc_shuffled: the
    accuracies of the completions on shuffled frames (G/2 of them); mu: 1.0 in the paper, 0.8 in the
    Video-R1 code. Returns: list of G floats (the bonus per ordered completion).
    Example: ordered [1,1,0,0] (p = .5), shuffled [1,0] (p~ = .5) -> [0.3, 0.3, 0, 0].
    """
    correct = [a > 0 for a in acc_ordered]
    p = sum(correct) / len(correct)
    p_shuffled = sum(a > 0 for a in acc_shuffled) / len(acc_shuffled)
    earned = p >= mu * p_shuffled
    return [alpha if (earned and c) else 0.0 for c in correct]


if __name__ == "__main__":
    for c in ["<think>" + "x" * 600 + "</think> <answer>B</answer>", "<think></think><answer>C</answer>",
              "<answer>B</answer>", "B"]:
        print(f"{reward(c, 'B').total:+.2f}  reference {reference_reward(c, 'B').total:+.2f}  {c[:40]!r}")
