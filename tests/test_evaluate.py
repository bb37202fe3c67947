"""evaluate.py: hand-made records in each format, a stub policy with known answers, hand-counted accuracies."""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import evaluate as E
import model as M


def clip(path, n=6):
    path.parent.mkdir(parents=True, exist_ok=True)
    data.write_mp4(np.random.default_rng(0).integers(0, 255, (n, 16, 16, 3), dtype=np.uint8), path)
    return path


def stub(answers, calls=None):
    """A policy that answers by the question's key, e.g. 'K3' in the prompt -> answers['K3'];
    appends each call's keys to `calls`."""
    def policy(pixels, prompts, keys):
        assert len(pixels) == len(prompts) == len(keys)
        assert all(p.ndim == 4 and p.shape[1] == 3 for p in pixels)
        if calls is not None:
            calls.append(keys)
        return [answers[re.search(r"K\d+", prompt).group(0)] for prompt in prompts]
    return policy


def reason(letter):
    return f"<think>I looked.</think> <answer>{letter}</answer>"


def run(items, answers, tmp_path, mode="reason", bench="x", protocol="ours", **kw):
    out = tmp_path / f"{bench}.{protocol}.json"
    E.evaluate(items, stub(answers), mode, out, num_frames=4, size=8, log=lambda *a: None, protocol=protocol,
               bench=bench, **kw)
    rows = [json.loads(l) for l in Path(f"{out}.rank0.jsonl").read_text().splitlines()]
    return E.summarize(bench, rows), rows


def test_mvbench(tmp_path):
    root = tmp_path / "mvb"
    (root / "json").mkdir(parents=True)
    clip(root / "video/star/Charades_v1_480/a.mp4", n=40)   # found through the task's prefix folder
    clip(root / "video/b.mp4")                              # found flat
    frames = root / "video/tvqa/frames_fps3_hq/ep1"
    frames.mkdir(parents=True)
    import av
    for i in range(9):  # a frame folder of jpgs (3 fps: frame i at i / 3 s)
        with av.open(str(frames / f"{i:05d}.jpg"), "w", format="image2") as out:
            s = out.add_stream("mjpeg")
            s.width, s.height, s.pix_fmt = 16, 16, "yuvj444p"
            out.mux(s.encode(av.VideoFrame.from_ndarray(np.full((16, 16, 3), i * 20, np.uint8), format="rgb24")))
            out.mux(s.encode())
    (root / "json/action_sequence.json").write_text(json.dumps([
        {"video": "a.mp4", "question": "K1 what?", "candidates": ["x", "y", "z"], "answer": "y", "start": 0.1, "end": 0.9},
        {"video": "a.mp4", "question": "K2 what?", "candidates": ["x", "y"], "answer": "x"},
        {"video": "b.mp4", "question": "K3 what?", "candidates": ["x", "y", "z", "w"], "answer": "w"}]))
    (root / "json/episodic_reasoning.json").write_text(json.dumps([
        {"video": "ep1", "question": "K4 what?", "candidates": ["p", "q"], "answer": "q", "start": 0.5, "end": 2.0}]))
    items = E.load_mvbench(root)
    assert [i.answer for i in items] == ["B", "A", "D", "B"]
    assert items[0].problem == "K1 what?\nOptions:\nA. x\nB. y\nC. z" and items[0].start == 0.1
    s, rows = run(items, {"K1": reason("B"), "K2": reason("B"), "K3": reason("D"), "K4": reason("B")}, tmp_path, bench="mvbench")
    # action_sequence: 2 of 3; episodic_reasoning: 1 of 1; MVBench = mean of the task accuracies
    assert s["tasks"] == pytest.approx({"action_sequence": 200 / 3, "episodic_reasoning": 100.0})
    assert s["score"] == s["overall"] == pytest.approx(75.0)   # Avg: over all items, as the reference
    (root / "json/bad.json").write_text(json.dumps([{"video": "b.mp4", "question": "K9", "candidates": ["x"], "answer": "nope"}]))
    with pytest.raises(ValueError, match=r"bad.json: item 0: answer 'nope'"):
        E.load_mvbench(root)


def test_videomme_per_duration_and_missing_video(tmp_path):
    root = tmp_path / "vmme"
    clip(root / "data/v1.mp4")
    clip(root / "data/v2.mp4")
    rec = lambda q, vid, dur, ans: {"video_id": "001", "duration": dur, "domain": "d", "sub_category": "s",
                                    "videoID": vid, "question_id": q, "task_type": "t", "question": f"{q} what?",
                                    "options": ["A. a", "B. b", "C. c", "D. d"], "answer": ans}
    (root / "test.json").write_text(json.dumps([rec("K1", "v1", "short", "A"), rec("K2", "v1", "short", "C"),
                                                rec("K3", "v2", "long", "D"), rec("K4", "gone", "long", "A")]))
    items = E.load_videomme(root)
    s, rows = run(items, {"K1": "A", "K2": "B", "K3": "D.", "K4": "A"}, tmp_path, mode="option", bench="videomme")
    assert s["video_errors"] == 1 and s["n"] == 3                        # K4's video is missing: counted, left out
    assert s["tasks"] == pytest.approx({"short": 50.0, "long": 100.0})
    assert s["score"] == pytest.approx(200 / 3)                          # overall over scored items
    assert [r.get("error") is not None for r in rows] == [False, False, False, True]


def test_mlvu_macro_average(tmp_path):
    root = tmp_path / "mlvu"
    clip(root / "video/1_plotQA/a.mp4")
    clip(root / "video/4_count/b.mp4")
    (root / "json").mkdir()
    (root / "json/1_plotQA.json").write_text(json.dumps([
        {"video": "a.mp4", "duration": 10, "question": f"K{i} q", "candidates": ["u", "v"], "answer": "v",
         "question_type": "plotQA"} for i in range(1, 5)]))
    (root / "json/4_count.json").write_text(json.dumps([
        {"video": "b.mp4", "duration": 10, "question": "K5 q", "candidates": ["1", "2"], "answer": "1", "question_type": "count"}]))
    items = E.load_mlvu(root)
    s, _ = run(items, {"K1": reason("B"), "K2": reason("B"), "K3": reason("A"), "K4": "no tags B",
                       "K5": reason("A")}, tmp_path, bench="mlvu")
    assert s["tasks"] == pytest.approx({"1_plotQA": 50.0, "4_count": 100.0})
    assert s["score"] == pytest.approx(75.0) and s["overall"] == pytest.approx(60.0)   # M-Avg vs item mean
    assert s["unparsed"] == 1


def test_mmvu_multiple_choice_only(tmp_path):
    root = tmp_path / "mmvu"
    clip(root / "videos/Art/0.mp4")
    (root / "validation.json").write_text(json.dumps([
        {"id": 1, "video": "https://host/datasets/yale-nlp/MMVU/resolve/main/videos/Art/0.mp4",
         "question_type": "multiple-choice", "question": "K1 q", "choices": {"A": "a", "B": "b", "C": "c", "D": "d", "E": "e"},
         "answer": "E"},
        {"id": 2, "video": "videos/Art/0.mp4", "question_type": "open-ended", "question": "K2 q", "choices": {}, "answer": "x"},
        {"id": 3, "video": "videos/Art/0.mp4", "question_type": "multiple-choice", "question": "K3 q",
         "choices": {"A": "a", "B": "b"}, "answer": "A"}]))
    items = E.load_mmvu(root)
    assert [i.id for i in items] == ["1", "3"] and items[0].video.endswith("videos/Art/0.mp4")
    s, _ = run(items, {"K1": reason("E"), "K3": reason("(A)")}, tmp_path, bench="mmvu")
    assert s["score"] == 50.0 and s["unparsed"] == 1                    # "(A)" does not parse


def test_unparsed_guess_option_resume_and_sharding(tmp_path):
    clip(tmp_path / "v.mp4")
    lines = [json.dumps({"problem": f"K{i} which?\nOptions:\nA. a\nB. b", "solution": "<answer>A</answer>",
                         "video_filename": "v.mp4"}) for i in range(1, 7)]
    (tmp_path / "t.jsonl").write_text("\n".join(lines))
    items = E.load_jsonl(tmp_path / "t.jsonl")
    answers = {f"K{i}": reason("A") if i <= 3 else "garbage" for i in range(1, 7)}
    s, _ = run(items, answers, tmp_path, bench="a")
    assert s["score"] == 50.0 and s["unparsed"] == 3
    s, rows = run(items, answers, tmp_path, bench="a", protocol="reference", seed=0)
    guessed = [r for r in rows if not r["parsed"]]
    assert len(guessed) == 3 and all(r["prediction"] in "AB" for r in guessed)
    assert s["score"] == pytest.approx(100 * (3 + sum(r["correct"] for r in guessed)) / 6)
    # each guess is seeded by (seed, item id): the same in another run, rank or batch
    assert [E.judge(items[k], "garbage", "reason", "reference", "a", 0)[0] for k in range(3, 6)] == \
        [r["prediction"] for r in guessed]
    # resume: a second call finds every item done
    assert E.evaluate(items, stub(answers), "reason", tmp_path / "a.ours.json", 4, 8, log=lambda *a: None) == 0
    # two ranks: disjoint shares that together cover every item once
    for r in (0, 1):
        E.evaluate(items, stub(answers), "reason", tmp_path / "sh.json", 4, 8, rank=r, world=2, log=lambda *a: None)
    ids = [json.loads(l)["id"] for r in (0, 1) for l in (tmp_path / f"sh.json.rank{r}.jsonl").read_text().splitlines()]
    assert sorted(ids) == sorted(i.id for i in items)


def test_batches_keep_item_order_and_a_missing_video_gets_its_own_row(tmp_path):
    clip(tmp_path / "v.mp4")
    lines = [json.dumps({"problem": f"K{i} which?\nOptions:\nA. a\nB. b", "solution": "<answer>B</answer>",
                         "video_filename": "gone.mp4" if i == 3 else "v.mp4"}) for i in range(1, 8)]
    (tmp_path / "t.jsonl").write_text("\n".join(lines))
    items = E.load_jsonl(tmp_path / "t.jsonl")
    answers = {f"K{i}": reason("AB"[i % 2]) for i in range(1, 8)}   # odd keys right
    results = {}
    for bs in (1, 3, 8):
        calls = []
        out = tmp_path / f"b{bs}.json"
        E.evaluate(items, stub(answers, calls), "reason", out, 4, 8, log=lambda *a: None, batch_size=bs)
        rows = [json.loads(l) for l in Path(f"{out}.rank0.jsonl").read_text().splitlines()]
        assert max(map(len, calls)) <= bs and sum(map(len, calls)) == 6   # the missing clip is not asked
        if bs == 3:
            assert calls == [[0, 1], [3, 4, 5], [6]]                         # keys: indices in `items`
        results[bs] = rows
    assert results[1] == results[3] == results[8]
    assert [r["id"] for r in results[3]] == [it.id for it in items]
    assert "gone.mp4" in results[3][2]["error"] and results[3][2]["correct"] is False
    assert E.summarize("x", results[3])["score"] == pytest.approx(100 * 3 / 6)   # K1, K5, K7 of the 6 read


def test_model_policy_batch_equals_one_at_a_time(tmp_path):
    # model_policy decodes a batch together; each item's completion (greedy, and sampled with its
    # own seed) is the one it gets alone.
    tok = M.build_tokenizer(["the red circle moves left", "Options: A. B. C."] * 10, tmp_path / "tok", vocab_size=280)
    cfg = M.tiny_config(len(tok))
    cfg.text_config["initializer_range"] = 0.2   # logits that depend on the context (test_model's `sharp`)
    torch.manual_seed(0)
    m = M.TinyLlavaVideo(cfg).eval()
    S = cfg.vision_config["image_size"]
    pixels = [torch.randn(4, 3, S, S, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    prompts = [data.chat_prompt(data.build_question(q, "reason")) for q in
               ("red?", "Which way does the red circle move?\nOptions:\nA. left\nB. right", "A circle?")]
    for temperature in (0.0, 1.0):
        policy = E.model_policy(m, tok, "reason", max_new_tokens=12, temperature=temperature, top_k=50, seed=3)
        together = policy(pixels, prompts, [5, 6, 7])
        alone = [policy([p], [q], [k])[0] for p, q, k in zip(pixels, prompts, [5, 6, 7])]
        assert together == alone and len(set(together)) == 3


def test_prompts_and_table():
    it = E.Item("1", "t", "v.mp4", "Q?\nOptions:\nA. a", "A")
    assert E.prompt_for(it, "reason").endswith("A. a\n" + data.REASON_SUFFIX + " ASSISTANT:")
    assert E.prompt_for(it, "reason", " ").endswith("A. a " + data.REASON_SUFFIX + " ASSISTANT:")
    assert E.prompt_for(it, "option").endswith("A. a\n" + data.OPTION_SUFFIX + " ASSISTANT:")
    res = [{"name": "SFT", "mode": "option", "summary": {"bench": "mvbench", "score": 49.0}},
           {"name": "SFT", "mode": "option", "summary": {"bench": "mlvu", "score": 49.2}},
           {"name": "R1", "mode": "reason", "summary": {"bench": "mvbench", "score": 49.5}}]
    assert E.table(res).splitlines() == ["| Model | Answer Type | MVBench | MLVU |", "|---|---|---|---|",
                                         "| SFT | Option | 49.0 | 49.2 |", "| R1 | Reason | 49.5 | - |"]


def test_cli_with_a_tiny_checkpoint(tmp_path):
    d = tmp_path / "shapes"
    data.generate_shapes(d, n_train=10, n_test=3, seed=0, workers=1)
    tok = M.build_tokenizer(["the red circle", "Options: A. B."] * 10, tmp_path / "tok", vocab_size=280)
    M.save_pretrained(M.TinyLlavaVideo(M.tiny_config(len(tok))), tmp_path / "ckpt", tok)
    out = tmp_path / "r.json"
    E.main(["--model", str(tmp_path / "ckpt"), "--bench", "jsonl", "--data-root", str(d / "test.jsonl"),
            "--mode", "reason", "--out", str(out), "--max-new-tokens", "4", "--name", "tiny"])
    res = json.loads(out.read_text())
    assert len(res["items"]) == 3 and res["summary"]["n"] == 3 and res["name"] == "tiny"
    assert res["summary"]["score"] == 100 * sum(r["correct"] for r in res["items"]) / 3


def test_thought_agreement_counts_by_hand():
    problem = "Which way does the red circle move?\nOptions:\nA. left\nB. right\nC. up\nD. down\nE. it does not move"
    rows = [  # label, tag's letter, completion
        ("A", "A", "<think>The red circle moves left. So the answer is left, which is option A.</think> <answer>A</answer>"),
        ("B", "B", "<think>It moves up. So the answer is up, which is option answer.</think> <answer>B</answer>"),
        ("C", "D", "<think>So the answer is down, which is option C.</think> <answer>D</answer>"),  # the words count
        ("D", "D", "<think>So the answer is three, which is option C.</think> <answer>D</answer>"),  # not an option
        ("E", "E", "<think>It stays.</think> <answer>E</answer> So the answer is it does not move, which is option E."),
        ("A", None, "<think>So the answer is left, which is option A.</think>"),                  # no tag: still read off
    ]
    assert [E.stated_answer(c, problem) for _, _, c in rows] == ["A", "C", "D", None, None, "A"]
    items = [{"id": str(k), "answer": a, "prediction": p, "completion": c} for k, (a, p, c) in enumerate(rows)]
    items.append({"id": "6", "answer": "A", "error": "no video"})  # left out of the shares
    got = E.thought_agreement(items, {str(k): problem for k in range(7)})
    assert got == {"stated": 100 * 4 / 6, "read_off": 100 * 2 / 6, "agree": 100 * 2 / 6}
    with pytest.raises(KeyError):
        E.thought_agreement(items, {})


def test_paired_comparison_by_hand():
    rows = lambda correct: [{"id": str(k), "correct": c} for k, c in enumerate(correct)]
    a = rows([1, 1, 0, 0, 1, 1, 1, 1, 1, 1])  # right alone on items 0, 1; items 4-9 right in both
    b = rows([0, 0, 1, 0, 1, 1, 1, 1, 1, 1])  # right alone on item 2; both wrong on item 3
    got = E.paired_comparison(a, b)
    # 3 discordant items, 1 of them B's: p = 2 (C(3,0) + C(3,1)) / 2^3 = 1 (capped)
    assert got == {"n": 10, "diff": 10.0, "a_only": 2, "b_only": 1, "p": 1.0}
    a7 = rows([1] * 8 + [0] * 6)  # 1 item for A alone, 6 for B alone, 7 right in both
    b7 = rows([1] * 7 + [0] + [1] * 6)
    got = E.paired_comparison(a7, b7)
    assert (got["a_only"], got["b_only"]) == (1, 6) and got["diff"] == pytest.approx(100 * -5 / 14)
    assert got["p"] == pytest.approx(2 * (1 + 7) / 2 ** 7)  # 0.125
    assert E.paired_comparison(a7, a7)["p"] == 1.0  # no discordant item
    b_err = b7[:3] + [{"id": "3", "error": "no video"}] + b7[4:]
    assert E.paired_comparison(a7, b_err)["n"] == 13  # left out in both
    with pytest.raises(ValueError, match="different items"):
        E.paired_comparison(a7, b7[:-1])


def test_repeats_and_padded_by_hand():
    pad = "<think>the answer the answer the answer the answer is left</think> <answer>A</answer>"
    assert E.repeats("the answer the answer the answer the answer is left")   # "the answer the answer" x3
    assert not E.repeats("the answer the answer the answer is left")           # x2 only
    assert not E.repeats("a b c d a b c d x a b c d", times=4) and E.repeats("a b c d a b c d x a b c d")
    rows = [{"id": "0", "completion": pad}, {"id": "1", "completion": "<think>It moves left.</think>"},
            {"id": "2", "completion": "<think>x</think> the answer the answer the answer the answer"},  # after
            {"id": "3", "error": "no video"}]
    assert E.padded(rows) == pytest.approx(100 / 3)


def test_grpo_trend_by_hand(tmp_path):
    rows = [{"step": k + 1, "completions/mean_length": 10.0 + k, "rewards/accuracy/mean": k / 100,
             "rewards/format/mean": 0.5} for k in range(30)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = E.grpo_trend(tmp_path)
    assert got["length"] == pytest.approx((10 + 9.5, 10 + 19.5))      # steps 1-20 and 11-30
    assert got["accuracy"] == pytest.approx((0.095, 0.195)) and got["format"] == (0.5, 0.5)
