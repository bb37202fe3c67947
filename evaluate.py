"""
Evaluate a TinyLLaVA-Video checkpoint on the paper's benchmarks (Table 1) in Option or Reason mode.

    python evaluate.py --model CKPT --bench mvbench --mode reason --out results/r1_mvbench.json
    python evaluate.py --model CKPT --bench mvbench --protocol reference --seeds 3 --out ...
    python evaluate.py --model CKPT --bench jsonl --data-root data/shapes/test.jsonl --mode option --out ...
    torchrun --nproc_per_node 8 evaluate.py ...              # items sharded over ranks, gathered on rank 0
    python evaluate.py table results/*.json                  # results -> a table in the layout of Table 1

Benchmarks, in their released layouts under data/<name>/ (python data.py download --what <bench>):
    mvbench   json/<task>.json + video/<prefix>/...          Avg: the mean over all items
    videomme  videomme/*.parquet + data/<videoID>.mp4        overall + per duration
    mlvu      json/<k>_<task>.json + video/<k>_<task>/...   M-Avg: mean of the 7 task accuracies
    mmvu      validation.json + videos/...                   multiple-choice items only
    jsonl     a NextQA-format jsonl (the shapes test set)    overall (+ per question type for shapes)

Two protocols. "ours" (default) is deterministic: greedy decoding, every benchmark's options written
"Options:\nA. ..." as in training, the letter read by rewards.parse_answer (the training reward's
parser), an unparsed answer counted wrong. "reference" repeats the reference evaluation that produced
Table 1 (tinyllava/eval/eval_<bench>.py and scripts/eval/<bench>.sh of ZhangXJ199/TinyLLaVA-Video-R1):
each benchmark's own prompt, character for character; greedy on MVBench (its script passes
temperature 0), elsewhere sampling at T = 1, top-k 50; 1,024 new tokens; its parsers, which read
"(B)" and lower-case letters and guess a random letter (seeded per item) when they find none; MVBench's
start/end bounds applied only to its frame-folder task. Average over --seeds N. Reason mode only: the
release evaluates nothing else. A missing or undecodable video is reported, counted and left out of
the accuracy in both (the reference stops).
"""
import argparse
import dataclasses
import hashlib
import json
import math
import random
import re
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

import data
import model as M
import rewards
from train import dist_init, print0


@dataclass
class Item:
    id: str             # unique within the benchmark
    task: str           # per-task accuracy (MVBench task, Video-MME duration, shapes question type...)
    video: str          # path of the clip or frame folder
    problem: str        # question + "\nOptions:\nA. ..." lines (protocol "ours")
    answer: str         # label letter
    start: float | None = None  # seconds (MVBench)
    end: float | None = None
    options: dict = field(default_factory=dict)  # letter -> option text, in the prompt's order
    reference: str = ""  # the reference eval's question with its options (protocol "reference")


# -----------------------------------------------------------------------------
# Loaders (each benchmark's released layout)

def _json(path):
    try:
        return json.loads(data.read_text(path))
    except json.JSONDecodeError as e:
        raise data.UserError(f"{path}: not valid JSON ({e})") from None


def _letter_of(answer_text, candidates, where):
    """The letter of an answer given as option TEXT. Raises UserError naming the item if absent."""
    if answer_text not in candidates:
        raise data.UserError(f"{where}: answer {answer_text!r} is not among its options {candidates}")
    return data.LETTERS[candidates.index(answer_text)]


def _bracketed(question, candidates):
    """The reference's MVBench and MLVU question: 'Q\n(A) c1\n(B) c2', right-stripped (qa_template)."""
    return (question + "\n" + "".join(f"({data.LETTERS[i]}) {c}\n" for i, c in enumerate(candidates))).rstrip()


def _from_candidates(id, task, video, rec, where, **bounds):
    """An Item of MVBench or MLVU, whose records list option texts and give the answer as a text."""
    c = rec["candidates"]
    return Item(id, task, video, data.format_options(rec["question"], c), _letter_of(rec["answer"], c, where),
                options=dict(zip(data.LETTERS, c)), reference=_bracketed(rec["question"], c), **bounds)


# MVBench's video folders, per task (from its official loader); a video found directly under
# DATA/video/ wins, so a flat copy of the data set works too.
MVBENCH_PREFIX = {
    "action_sequence": "star/Charades_v1_480", "action_prediction": "star/Charades_v1_480",
    "action_antonym": "ssv2_video", "fine_grained_action": "Moments_in_Time_Raw/videos",
    "unexpected_action": "FunQA_test/test", "object_existence": "clevrer/video_validation",
    "object_interaction": "star/Charades_v1_480", "object_shuffle": "perception/videos",
    "moving_direction": "clevrer/video_validation", "action_localization": "sta/sta_video",
    "scene_transition": "scene_qa/video", "action_count": "perception/videos",
    "moving_count": "clevrer/video_validation", "moving_attribute": "clevrer/video_validation",
    "state_change": "perception/videos", "fine_grained_pose": "nturgbd",
    "character_order": "perception/videos", "egocentric_navigation": "vlnqa",
    "episodic_reasoning": "tvqa/frames_fps3_hq", "counterfactual_inference": "clevrer/video_validation",
}


def load_mvbench(root):
    root, items = Path(root), []
    for f in sorted((root / "json").glob("*.json")):
        task = f.stem
        for i, rec in enumerate(_json(f)):
            flat, nested = root / "video" / rec["video"], root / "video" / MVBENCH_PREFIX.get(task, "") / rec["video"]
            video = str(flat if flat.exists() else nested)
            items.append(_from_candidates(f"{task}/{i}", task, video, rec, f"{f}: item {i}",
                                          start=rec.get("start"), end=rec.get("end")))
    return items


def load_videomme(root):
    root, rows = Path(root), []
    # the release: videomme/test-00000-of-00001.parquet, the clips in data/ (from its zips)
    for f in sorted(root.glob("*.json")) + sorted(root.glob("*.jsonl")) + sorted(root.rglob("*.parquet")):
        if f.suffix == ".json":
            rows += _json(f)
        elif f.suffix == ".jsonl":
            rows += [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
        else:
            import pyarrow.parquet as pq
            rows += pq.read_table(f).to_pylist()
    items = []
    for r in rows:
        options = {o.strip()[0]: o.strip()[3:] for o in r["options"]}   # "A. text"
        if r["answer"] not in options:
            raise data.UserError(f"Video-MME {r['question_id']}: answer {r['answer']!r} not among options {r['options']}")
        problem = r["question"] + "\nOptions:\n" + "\n".join(o.strip() for o in r["options"])
        found = [root / "data" / f"{r['videoID']}{x}" for x in (".mp4", ".MP4", ".mkv")]  # lmms-eval's
        video = next((v for v in found if v.exists()), found[0])  # a missing clip is reported, not skipped
        reference = r["question"] + "\nOptions:\n" + "\n".join(r["options"])  # options as stored, unstripped
        items.append(Item(r["question_id"], r["duration"], str(video), problem, r["answer"], options=options,
                          reference=reference))
    return items


def load_mlvu(root):
    """MLVU dev's multiple-choice tasks (json/<k>_<task>.json); the generation tasks (8_sub_scene,
    9_summary: no candidates) are not part of M-Avg, as in the reference evaluation."""
    root, items = Path(root), []
    for f in sorted((root / "json").glob("*.json")):
        records = _json(f)
        if records and "candidates" not in records[0]:
            continue
        for i, rec in enumerate(records):
            items.append(_from_candidates(f"{f.stem}/{i}", f.stem, str(root / "video" / f.stem / rec["video"]),
                                          rec, f"{f}: item {i}"))
    return items


def load_mmvu(root):
    """MMVU's validation.json, multiple-choice items only (the paper's MMVU (mc)). Its choices are kept in
    the file's order, as the reference writes them ("A. text" lines, no "Options:" header)."""
    root, items = Path(root), []
    for rec in _json(root / "validation.json"):
        if rec["question_type"] != "multiple-choice":
            continue
        choices = rec["choices"]
        if rec["answer"] not in choices:
            raise data.UserError(f"MMVU {rec['id']}: answer {rec['answer']!r} not among choices {sorted(choices)}")
        video = rec["video"].split("videos/", 1)[-1]  # the release names URLs ending in videos/<subject>/<n>.mp4
        lines = "\n".join(f"{k}. {v}" for k, v in choices.items())
        items.append(Item(str(rec["id"]), "mc", str(root / "videos" / video), rec["question"] + "\nOptions:\n" + lines,
                          rec["answer"], options=dict(choices), reference=rec["question"] + "\n" + lines))
    return items


OPTION_TEXT = re.compile(data.OPTION_LINE.pattern + r"(.+)$", re.MULTILINE)


def load_jsonl(path):
    items = []
    for i, s in enumerate(data.read_nextqa_jsonl(path)):  # the reader checks each label against its options
        options = {a or b: text for a, b, text in OPTION_TEXT.findall(s.question)}
        items.append(Item(str(i), data.shapes_qtype(s.question), str(s.video), s.question, s.answer,
                          options=options, reference=s.question))
    return items


LOADERS = {"mvbench": load_mvbench, "videomme": load_videomme, "mlvu": load_mlvu, "mmvu": load_mmvu, "jsonl": load_jsonl}


# -----------------------------------------------------------------------------
# Scoring

def prompt_for(item, mode, reason_sep="\n", protocol="ours"):
    """The full prompt text of an item (data.chat_prompt, data.build_question). Protocol "ours": the
    problem with "Options:" lines, the suffix joined by `reason_sep` in Reason mode. "reference": the
    reference eval's question (Item.reference), the Reason suffix joined by a newline."""
    if protocol == "reference":
        return data.chat_prompt(data.build_question(item.reference, "reason", "\n"))
    return data.chat_prompt(data.build_question(item.problem, mode, reason_sep if mode == "reason" else "\n"))


GUESS = "guess"  # what a reference parser returns where the reference picks a random letter
ANSWER_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>")  # the reference's: no DOTALL, so on one line


def reference_answer(completion, letters):
    """The letter that eval_videomme.py, eval_mlvu.py and eval_mmvu.py (parse_multi_choice_response) read:
    the first character inside the answer tag if it is an option letter in either case ("b. ..." -> B),
    else the first option written "(C)" or "(c)" inside it, else GUESS. No tag: GUESS. An empty tag:
    None (the reference's function falls off its end, which never equals the label).
    letters: the item's option letters, in order. Returns a letter, None or GUESS."""
    m = ANSWER_TAG.search(completion)
    if m is None:
        return GUESS
    text = m.group(1).strip()
    if not text:
        return None
    if text[0] in letters or text[0] in letters.lower():
        return text[0].upper()
    return next((c for c in letters if f"({c})" in text or f"({c.lower()})" in text), GUESS)


def reference_answer_mvbench(completion, options):
    """The letter that eval_mvbench.py (parse_multi_choice_response, MMMU's parser) reads: the text inside
    the answer tag (the whole completion when there is none), stripped of the characters ,.!?;:' one after
    another; its first character if it is an upper-case option letter; else the options written "(B)", else
    those written " B ", else (over 5 words) those whose option text it contains, case-blind; the last one
    in the text when several; GUESS when none. options: {letter: option text}. Returns a letter or GUESS."""
    m = ANSWER_TAG.search(completion)
    text = m.group(1).strip() if m else completion
    for c in ",.!?;:'":
        text = text.strip(c)
    if text and text[0] in options:
        return text[0]
    text = f" {text} "
    for mark in ("({})", " {} "):
        found = [c for c in options if mark.format(c) in text]
        if found:
            return max(found, key=lambda c: text.rfind(mark.format(c)))  # max keeps the first of ties
    if len(text.split()) > 5:
        found = [c for c in options if options[c].lower() in text.lower()]
        if found:
            return max(found, key=lambda c: text.lower().rfind(options[c].lower()))
    return GUESS


def judge(item, completion, mode, protocol="ours", bench="jsonl", seed=0):
    """Score one completion. Protocol "ours": rewards.parse_answer (tags in Reason mode); unparsed is
    wrong. "reference": the reference's parser for `bench`, its random guess drawn from a generator seeded
    with (seed, item id), so it does not depend on ranks or batches.
    Returns (prediction letter or None, correct bool, parsed bool: read without a guess)."""
    letters = "".join(item.options) or data.option_letters(item.problem)
    if protocol == "ours":
        pred = rewards.parse_answer(completion, letters, tagged=(mode == "reason"))
        return pred, pred == item.answer, pred is not None
    pred = (reference_answer_mvbench(completion, item.options) if bench == "mvbench"
            else reference_answer(completion, letters))
    parsed = pred != GUESS
    if not parsed:
        pred = random.Random(f"{seed}/{item.id}").choice(letters)
    return pred, pred == item.answer, parsed


def evaluate(items, policy, mode, out_path, num_frames=16, size=384, reason_sep="\n", protocol="ours",
             bench="jsonl", seed=0, rank=0, world=1, log=print, batch_size=8):
    """Run `policy` on this rank's share of the items, `batch_size` items at a time, appending one
    JSON line per item to `<out_path>.rank<r>.jsonl` (items already there are skipped, so a run
    resumes). An item whose video cannot be read gets a row with its error; it is not retried.
    Prompts and scoring follow `protocol` (prompt_for, judge).

    policy(pixels list of float (T, 3, S, S), prompts list of str, keys list of int) -> completions
    list of str; keys are the items' indices in `items` (what seeds a sampled completion).
    Returns the number of items this rank evaluated now.
    """
    part = Path(f"{out_path}.rank{rank}.jsonl")
    done = {json.loads(l)["id"] for l in part.read_text().splitlines()} if part.exists() else set()
    mine = [(k, it) for k, it in enumerate(items) if k % world == rank and it.id not in done]
    prompt = lambda it: prompt_for(it, mode, reason_sep, protocol)
    score = lambda it, completion: judge(it, completion, mode, protocol, bench, seed)
    t0, log_every = time.time(), max(1, 20 // batch_size)   # a log line about every 20 items
    with open(part, "a") as f:
        for b, n in enumerate(range(0, len(mine), batch_size), 1):
            for row in _evaluate_batch(mine[n:n + batch_size], policy, prompt, score, num_frames, size, rank, log):
                f.write(json.dumps(row) + "\n")
            f.flush()
            m = min(n + batch_size, len(mine))
            if b % log_every == 0 or m == len(mine):
                rate = m / (time.time() - t0)
                log(f"[rank {rank}] {m}/{len(mine)} items | {rate:.2f} items/s | eta {(len(mine) - m) / rate / 60:.1f} min")
    return len(mine)


def _evaluate_batch(batch, policy, prompt, score, num_frames, size, rank, log):
    """The result rows of a batch of (index, item), in order: the clips that load are answered in
    one policy call, the others get their error."""
    rows, loaded = [], []
    for k, it in batch:
        rows.append({"id": it.id, "task": it.task, "answer": it.answer})
        try:
            loaded.append((k, it, rows[-1], data.preprocess(data.load_video(it.video, num_frames, it.start, it.end), size)))
        except (FileNotFoundError, ValueError) as e:
            rows[-1].update(error=str(e), prediction=None, correct=False, parsed=False, completion=None)
            log(f"[rank {rank}] video error, item {it.id}: {e}")
    if loaded:
        keys, its, out, pixels = zip(*loaded)
        completions = policy(list(pixels), [prompt(it) for it in its], list(keys))
        for it, row, completion in zip(its, out, completions):
            pred, correct, parsed = score(it, completion)
            row.update(prediction=pred, correct=correct, parsed=parsed, completion=completion)
    return rows


def summarize(bench, rows):
    """Accuracies (in %) from result rows: per task, the benchmark's score, counts of unparsed and
    video errors. Items whose video failed are left out of the accuracies (and counted)."""
    scored = [r for r in rows if "error" not in r]
    by_task = defaultdict(list)
    for r in scored:
        by_task[r["task"]].append(r["correct"])
    tasks = {t: 100.0 * sum(v) / len(v) for t, v in sorted(by_task.items())}
    overall = 100.0 * sum(r["correct"] for r in scored) / max(1, len(scored))
    score = sum(tasks.values()) / max(1, len(tasks)) if bench == "mlvu" else overall  # MLVU: M-Avg
    return {"bench": bench, "score": score, "overall": overall, "tasks": tasks, "n": len(scored),
            "unparsed": sum(not r["parsed"] for r in scored), "video_errors": len(rows) - len(scored)}


STATED = re.compile(r"So the answer is (.+?), which is option")  # the closing sentence of data.explain


def thought_text(completion):
    """The thought of a completion: the text before its first </think>, all of it when the thought is
    never closed (a broken completion still says what it thought). Characters, <think> included."""
    return completion.split("</think>")[0]


def stated_answer(completion, problem):
    """The option that a completion's thought names in data.explain's closing sentence, as a letter: "... So
    the answer is left, which is option A." in a problem whose options hold "C. left" gives "C". Read from
    the option's words, not from the letter after "option", which GRPO can rewrite ("which is option
    answer."). The thought (thought_text) must hold <think>. Returns None when it does not,
    when it holds no such sentence, or when the sentence's words are not an option of `problem` ("So the
    answer is one, ..." in a direction question)."""
    think = thought_text(completion)
    m = STATED.search(think) if "<think>" in think else None
    if m is None:
        return None
    options = {text: a or b for a, b, text in OPTION_TEXT.findall(problem)}
    return options.get(m.group(1).strip())


def thought_agreement(rows, problems):
    """Does the answer come from the thought? For Reason-mode result rows of the shapes task, whose thoughts
    close as the cold start's do ("So the answer is left, which is option A."; stated_answer):
    stated: thoughts that name an option; read_off: the option named is the label (the accuracy of the
    thought alone); agree: the option named is the tag's letter. All in % of the scored rows, which
    count a thought that names no option as neither. problems: {row id: problem text with its options}.
    Raises KeyError when a row's id has no problem. Ours, not the paper's (README, Status)."""
    scored = [r for r in rows if "error" not in r]
    said = [stated_answer(r["completion"], problems[r["id"]]) for r in scored]
    pct = lambda k: 100.0 * k / max(1, len(scored))
    return {"stated": pct(sum(s is not None for s in said)),
            "read_off": pct(sum(s is not None and s == r["answer"] for s, r in zip(said, scored))),
            "agree": pct(sum(s is not None and s == r["prediction"] for s, r in zip(said, scored)))}


def repeats(text, n=4, times=3):
    """Does some sequence of n words occur `times` times or more in `text` (padding such as "the answer
    the answer the answer the answer ...")? Words are split on white space. Returns bool."""
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return any(c >= times for c in Counter(grams).values())


def padded(rows):
    """The share (in %) of scored Reason-mode rows whose thought (the text before the first </think>)
    repeats a 4-word sequence 3 times or more (repeats)."""
    scored = [r for r in rows if "error" not in r]
    thoughts = [thought_text(r["completion"]).replace("<think>", " ") for r in scored]
    return 100.0 * sum(map(repeats, thoughts)) / max(1, len(scored))


def grpo_trend(run, n=20):
    """Means of a GRPO run's first and last n steps (metrics.jsonl): {"length": (tokens, tokens),
    "accuracy": (AR, AR), "format": (FR, FR)}; over all its steps when it has fewer than n."""
    rows = read_metrics(run)
    mean = lambda part, k: sum(r[k] for r in part) / len(part)
    keys = {"length": "completions/mean_length", "accuracy": "rewards/accuracy/mean", "format": "rewards/format/mean"}
    return {name: (mean(rows[:n], k), mean(rows[-n:], k)) for name, k in keys.items()}


def paired_comparison(rows_a, rows_b):
    """Is model A's accuracy different from model B's on the same items, or within the test set's noise?
    McNemar's exact test: only the items that one model gets right and the other wrong tell the two apart;
    if neither model were better, each such item would go either way with probability 1/2, so the
    two-sided p-value is 2 P(Binomial(a_only + b_only, 1/2) <= min(a_only, b_only)), at most 1. Items
    whose video failed in either result are left out. rows_a, rows_b: result rows ("id", "correct").
    Returns {"n": items compared, "diff": accuracy A - B in points, "a_only", "b_only": counts, "p"}.
    Raises ValueError when the two results hold different item ids. Ours, not the paper's (README, Status)."""
    a, b = ({r["id"]: r for r in rows} for rows in (rows_a, rows_b))
    if only_one := sorted(a.keys() ^ b.keys()):
        raise ValueError(f"paired_comparison: the results hold different items ({len(only_one)} ids in one only, "
                         f"e.g. {only_one[:3]})")
    ids = [i for i in a if "error" not in a[i] and "error" not in b[i]]
    a_only = sum(a[i]["correct"] and not b[i]["correct"] for i in ids)
    b_only = sum(b[i]["correct"] and not a[i]["correct"] for i in ids)
    m = a_only + b_only
    p = min(1.0, 2 * sum(math.comb(m, k) for k in range(min(a_only, b_only) + 1)) / 2 ** m)
    return {"n": len(ids), "diff": 100.0 * (a_only - b_only) / max(1, len(ids)), "a_only": a_only,
            "b_only": b_only, "p": p}


# -----------------------------------------------------------------------------
# Tables

BENCH_COLUMNS = [("mvbench", "MVBench"), ("videomme", "Video-MME (wo sub)"), ("mlvu", "MLVU"), ("mmvu", "MMVU (mc)"),
                 ("jsonl", "shapes / NextQA-format")]


def table(results):
    """A markdown table in the layout of the paper's Table 1: one row per (model, answer mode), one
    column per benchmark (score in %). `results`: list of result dicts as written by main()."""
    rows = defaultdict(dict)
    for r in results:
        rows[(r["name"], r["mode"])][r["summary"]["bench"]] = r["summary"]
    cols = [(b, title) for b, title in BENCH_COLUMNS if any(b in v for v in rows.values())]
    lines = ["| Model | Answer Type | " + " | ".join(t for _, t in cols) + " |",
             "|---|---|" + "---|" * len(cols)]
    for (name, mode), s in rows.items():
        cells = [f"{s[b]['score']:.1f}" if b in s else "-" for b, _ in cols]
        lines.append(f"| {name} | {mode.capitalize()} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def task_table(summary):
    """Per-task accuracies of one run, with its counts."""
    lines = ["| task | accuracy (%) |", "|---|---|"] + [f"| {t} | {a:.1f} |" for t, a in summary["tasks"].items()]
    lines.append(f"| **{'M-Avg' if summary['bench'] == 'mlvu' else 'score'}** | **{summary['score']:.1f}** |")
    return "\n".join(lines) + (f"\n\n{summary['n']} items scored, {summary['unparsed']} unparsed, "
                               f"{summary['video_errors']} video errors")


# -----------------------------------------------------------------------------
# The shapes pipeline's report (train.py shapes)

def shapes_report(results, test_file, run):
    """Print the pipeline's results: the Table-1 layout; R1 against the cold start and the base on the
    same clips (a few clips either way are the test set's noise: McNemar's test on the clips only one
    model gets right); per question type; whether each Reason row's letter follows from its thought and
    how many thoughts are padding (adds r["thoughts"] to those rows); the GRPO run's first and last 20
    steps (grpo_trend, added to the returned dict as "grpo"). Returns the comparisons."""
    print(f"\nshapes test set ({len(results[0]['items'])} clips), accuracy in %:")
    print(table(results))
    comparisons = {f"R1 - {who}": paired_comparison(results[2]["items"], results[k]["items"])
                   for k, who in ((1, "cold start"), (0, "base"))}
    print("\nR1 on the same clips (evaluate.paired_comparison):\n" + "\n".join(
        f"  {k}: {c['diff']:+.1f} points (R1 alone right on {c['a_only']}, the other alone on {c['b_only']}; "
        f"McNemar exact p = {c['p']:.2g})" for k, c in comparisons.items()))
    print("\nper question type:\n" + "\n".join(
        f"  {r['name']}: " + ", ".join(f"{t} {v:.0f}" for t, v in r["summary"]["tasks"].items()) for r in results))
    problems = {it.id: it.problem for it in load_jsonl(test_file)}
    print("\nthe thoughts (Reason mode; evaluate.thought_agreement):")
    for r in results[1:]:
        r["thoughts"] = t = dict(thought_agreement(r["items"], problems), padded=padded(r["items"]))
        print(f"  {r['name']}: the thought names an option in {t['stated']:.0f}%, the right one in "
              f"{t['read_off']:.0f}% (read off), the tag's letter in {t['agree']:.0f}%; {t['padded']:.0f}% "
              f"repeat a 4-word sequence 3 times or more")
    comparisons["grpo"] = g = grpo_trend(run)
    print(f"\nGRPO, mean of the first 20 steps -> the last 20: completion length {g['length'][0]:.1f} -> "
          f"{g['length'][1]:.1f} tokens, accuracy reward {g['accuracy'][0]:.2f} -> {g['accuracy'][1]:.2f}, "
          f"format reward {g['format'][0]:.2f} -> {g['format'][1]:.2f}")
    return comparisons


CURVES = {"grpo": ["completions/mean_length", "rewards/accuracy/mean", "rewards/format/mean", "reward", "kl",
                   "entropy"],                              # Figure 4's three first
          "sft": ["loss", "grad_norm", "lr"]}


def read_metrics(run):
    """The rows of a run's metrics.jsonl, one dict per logged step. Raises UserError when the file is
    missing or unreadable (data.read_text)."""
    return [json.loads(l) for l in data.read_text(Path(run) / "metrics.jsonl").splitlines() if l.strip()]


def write_curves(run):
    """A run's curves from its metrics.jsonl (`python train.py plot RUN`): curves.csv with every number
    logged (a column per key; empty where a step did not log it), and with matplotlib curves.png, one
    panel per key of CURVES (a GRPO run: Figure 4's completion length, accuracy and format rewards, then
    reward, kl and entropy; an SFT run: loss, grad_norm, lr). Returns the CSV's path.
    Raises UserError when the folder holds no metrics.jsonl rows."""
    run = Path(run)
    rows = read_metrics(run)
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, (int, float))))
    lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]
    (run / "curves.csv").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return run / "curves.csv"
    panels = [k for k in CURVES["grpo" if "reward" in keys else "sft"] if k in keys]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.2), squeeze=False)
    for ax, k in zip(axes[0], panels):
        ax.plot([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r], lw=0.8)
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(run / "curves.png", dpi=120)
    plt.close(fig)
    return run / "curves.csv"


def plot(runs):
    """`python train.py plot RUN [RUN ...]`: write_curves for each run folder, printing what it wrote."""
    if not runs:
        raise data.UserError("usage: python train.py plot RUN [RUN ...] (a run folder with metrics.jsonl)")
    for run in runs:
        print(write_curves(run), "and curves.png" if (Path(run) / "curves.png").exists() else "")


# -----------------------------------------------------------------------------
# The model as a policy

def model_policy(model, tok, mode, max_new_tokens=None, temperature=0.0, top_k=0, top_p=1.0, seed=0):
    """A policy for evaluate(): a batch of clips and prompts -> one completion each (greedy by
    default), the batch decoded together by model.sample. Item k draws from a generator seeded with
    (seed, k), so a sampled completion does not depend on the batch the item lands in."""
    device = next(model.parameters()).device
    max_new = max_new_tokens or (16 if mode == "option" else 512)

    @torch.no_grad()
    def policy(pixels, prompts, keys):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            videos = model.encode_videos([p.to(device) for p in pixels])
            ids = [torch.tensor(data.tokenize_prompt(tok, p), device=device) for p in prompts]
            gens = [torch.Generator(device=device).manual_seed(seed * 1_000_003 + k) for k in keys]
            out, mask = M.sample(model, ids, videos, G=1, max_new_tokens=max_new, temperature=temperature,
                                 top_k=top_k, top_p=top_p, eos_id=tok.eos_token_id, generators=gens)
        return M.decode_completions(tok, out, mask)
    return policy


def parser():
    p = data.Parser(prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint folder or hub id")
    p.add_argument("--bench", choices=sorted(LOADERS), required=True, help="which benchmark's loader")
    p.add_argument("--data-root", help="the benchmark's folder (default: data/<bench>, where data.py download "
                                       "puts it); jsonl: the file")
    p.add_argument("--mode", choices=["option", "reason"], default="reason", help="answer with the letter / think")
    p.add_argument("--protocol", choices=["ours", "reference"], default="ours",
                   help="ours: greedy, unparsed is wrong; reference: the reference evaluation (module docstring)")
    p.add_argument("--out", required=True, help="results JSON (and <out>.<key>.rank<r>.jsonl while running)")
    p.add_argument("--name", default=None, help="row name in tables (default: the model folder)")
    p.add_argument("--num-frames", type=int, default=16, help="frames per clip")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 16 option, 512 reason")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=0, help="sampling, and the reference parser's guesses")
    p.add_argument("--seeds", type=int, default=1, help="evaluate with seeds seed..seed+N-1 and average")
    p.add_argument("--reason-sep", choices=["newline", "space"], default="newline",
                   help="how the reason suffix joins the question: newline (reference eval) or space (RL training)")
    p.add_argument("--limit", type=int, default=0, help="only the first N items (a quick look)")
    p.add_argument("--batch-size", type=int, default=8, help="items decoded together (per rank)")
    return p


def settings(**overrides):
    """The flags' defaults with `overrides` (data.Parser.settings): how train.py shapes calls run().
    Raises TypeError for a name that is not a flag, UserError when --model, --bench or --out is missing."""
    return parser().settings(**overrides)


# The reference evaluation's decoding (scripts/eval/<bench>.sh and eval_<bench>.py): MVBench's script
# passes --temperature 0, which turns sampling off; the others call generate(do_sample=True) with
# transformers' defaults, T = 1 and top-k 50. All allow 1,024 new tokens.
REFERENCE_DECODING = {"mvbench": dict(temperature=0.0, top_k=0)}
REFERENCE_SAMPLING = dict(temperature=1.0, top_k=50, top_p=1.0, max_new_tokens=1024)

# Table 1 of the paper (16 frames), printed beside a result.
PAPER = {"mvbench": (49.0, 33.2, 49.5), "videomme": (42.2, 26.6, 46.6), "mlvu": (49.2, 28.6, 52.4),
         "mmvu": (46.1, 22.7, 46.9)}


def protocol_settings(args):
    """args with the reference protocol's decoding filled in (REFERENCE_*); unchanged for "ours".
    (Its prompts are prompt_for's, its MVBench bounds load_items'.) Raises UserError for --protocol
    reference in Option mode."""
    if args.protocol == "ours":
        return args
    if args.mode != "reason":
        raise data.UserError("--protocol reference evaluates Reason mode only: the reference release has no "
                             "Option-mode evaluation (its line for it is commented out)")
    return argparse.Namespace(**{**vars(args), **REFERENCE_SAMPLING, **REFERENCE_DECODING.get(args.bench, {})})


def cache_key(args):
    """What the partial results depend on: the checkpoint (its folder, and the size and time of its
    weight files, so a checkpoint written again is evaluated again) and every setting that changes an
    answer. Returns a 12-hex-digit key; partial results live in <out>.<key>.rank<r>.jsonl."""
    folder = Path(str(args.model))
    weights = sorted(folder.glob("*.safetensors*")) if folder.is_dir() else []
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in weights]
    model_id = str(folder.resolve()) if folder.is_dir() else str(args.model)
    answers = {k: v for k, v in vars(args).items() if k not in ("model", "out", "name", "batch_size", "seeds")}
    text = json.dumps([model_id, stamp, answers], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def load_items(args):
    """The benchmark's items (LOADERS), cut to --limit; under the reference protocol MVBench's bounds are
    dropped for video files (its loader applies them to the frame-folder task only).
    Raises UserError when the folder holds no item."""
    if args.data_root is None:
        if args.bench == "jsonl":
            raise data.UserError("--bench jsonl needs --data-root: the jsonl file")
        args.data_root = str(Path("data") / data.DATASETS[args.bench][1])
    items = LOADERS[args.bench](args.data_root)
    if not items:
        raise data.UserError(f"{args.data_root}: no {args.bench} items there (is --data-root the benchmark's "
                             f"folder, in its released layout?)")
    if args.protocol == "reference":
        items = [it if Path(it.video).is_dir() else dataclasses.replace(it, start=None, end=None) for it in items]
    return items[:args.limit] if args.limit else items


def run(args):
    """Evaluate args.model on args.bench, once per seed (--seeds); items are sharded over torchrun's ranks
    and gathered on rank 0, which writes args.out (the seeds' mean score, each seed's summary, the first
    seed's items) and prints the tables. Partial results (<out>.<cache_key>.rank<r>.jsonl) are reused
    only by the same checkpoint with the same settings and seed. Returns the result dict on rank 0, else
    None. Raises UserError when the benchmark's folder holds no item."""
    rank, world, device = dist_init()
    args = protocol_settings(args)
    items = load_items(args)
    model, tok = M.from_pretrained(args.model, device=device)
    model.eval()
    print0(f"{args.bench}: {len(items)} items, {args.mode} mode, protocol {args.protocol}, {world} rank(s)")
    per_seed = []
    for seed in range(args.seed, args.seed + args.seeds):
        one = argparse.Namespace(**{**vars(args), "seed": seed})
        part = f"{args.out}.{cache_key(one)}"
        policy = model_policy(model, tok, args.mode, args.max_new_tokens, args.temperature, args.top_k,
                              args.top_p, seed)
        evaluate(items, policy, args.mode, part, args.num_frames, model.cfg.image_size,
                 "\n" if args.reason_sep == "newline" else " ", args.protocol, args.bench, seed, rank, world,
                 print0, args.batch_size)
        if world > 1:
            dist.barrier()
        if rank == 0:  # it gathers the ranks' rows and writes the result
            per_seed.append([json.loads(l) for r in range(world)
                             for l in Path(f"{part}.rank{r}.jsonl").read_text().splitlines()])
    result = _write_result(args, per_seed) if rank == 0 else None
    if dist.is_initialized():
        dist.destroy_process_group()
    return result


def _write_result(args, per_seed):
    summaries = [summarize(args.bench, rows) for rows in per_seed]
    mean = lambda xs: sum(xs) / len(xs)
    summary = dict(summaries[0], score=mean([s["score"] for s in summaries]),
                   overall=mean([s["overall"] for s in summaries]),
                   tasks={t: mean([s["tasks"][t] for s in summaries]) for t in summaries[0]["tasks"]})
    result = {"name": args.name or Path(str(args.model)).name, "mode": args.mode, "model": str(args.model),
              "args": vars(args), "summary": summary, "seeds": summaries, "items": per_seed[0]}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(task_table(summary))
    if len(summaries) > 1:
        scores = ", ".join(f"{s['score']:.1f}" for s in summaries)
        print(f"score per seed: {scores}; mean {summary['score']:.1f} (the table's accuracies are means too)")
    if args.bench in PAPER:
        sft, cold, r1 = PAPER[args.bench]
        print(f"paper (Table 1): SFT (Option) {sft}, ColdStart (Reason) {cold}, R1 (Reason) {r1}")
    print(table([result]))
    return result


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "table":
        print(table([json.loads(Path(f).read_text()) for f in argv[1:]]))
        return
    return run(parser().parse_args(argv))


if __name__ == "__main__":
    data.cli(main)
