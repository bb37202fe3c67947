"""The four benchmarks as released, in miniature, through both evaluation protocols: each prompt written
out by hand as the reference evaluation builds it, the reference's parsers on hand-picked answers, and
evaluate.py's command line on a tiny checkpoint."""
import json

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import data
import evaluate as E
import model as M

SUFFIX = "Output the thinking process in <think> </think> and final answer (option) in <answer> </answer> tags."


def clip(path, n=6):
    path.parent.mkdir(parents=True, exist_ok=True)
    data.write_mp4(np.random.default_rng(0).integers(0, 255, (n, 16, 16, 3), dtype=np.uint8), path)


def frame_folder(folder, n):
    """MVBench's frame-folder layout: 00001.jpg ... numbered from 1, 3 fps."""
    folder.mkdir(parents=True)
    for i in range(1, n + 1):
        with av.open(str(folder / f"{i:05d}.jpg"), "w", format="image2") as out:
            s = out.add_stream("mjpeg")
            s.width, s.height, s.pix_fmt = 16, 16, "yuvj444p"
            out.mux(s.encode(av.VideoFrame.from_ndarray(np.full((16, 16, 3), i * 9, np.uint8), format="rgb24")))
            out.mux(s.encode())


def mvbench(root):
    (root / "json").mkdir(parents=True)
    clip(root / "video/star/Charades_v1_480/a.mp4", n=40)
    frame_folder(root / "video/tvqa/frames_fps3_hq/ep1", 12)
    (root / "json/action_sequence.json").write_text(json.dumps([
        {"video": "a.mp4", "question": "What did the person do first?", "candidates": ["Sat.", "Ran.", "Ate."],
         "answer": "Ran.", "start": 0.1, "end": 0.9}]))
    (root / "json/episodic_reasoning.json").write_text(json.dumps([
        {"video": "ep1", "question": "Why?", "candidates": ["yes", "no"], "answer": "no", "start": 1.0, "end": 3.0}]))


def videomme(root):
    clip(root / "data/abc.mp4")
    clip(root / "data/xyz.MP4")
    rows = [{"video_id": "001", "duration": "short", "domain": "d", "sub_category": "s", "videoID": v,
             "question_id": q, "task_type": "t", "question": "What colour is the car?",
             "options": ["A. Red.", "B. Blue.", "C. Green.", "D. Black."], "answer": a}
            for q, v, a in (("001-1", "abc", "B"), ("001-2", "xyz", "D"))]
    (root / "videomme").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "videomme/test-00000-of-00001.parquet")


def mlvu(root):
    clip(root / "video/4_count/b.mp4")
    (root / "json").mkdir(parents=True)
    (root / "json/4_count.json").write_text(json.dumps([
        {"video": "b.mp4", "duration": 10, "question": "How many times?", "candidates": ["1", "2", "3", "4"],
         "answer": "3", "question_type": "count"}]))
    (root / "json/8_sub_scene.json").write_text(json.dumps([   # a generation task: no candidates
        {"video": "b.mp4", "duration": 10, "question": "Describe it.", "answer": "a scene", "question_type": "subPlot"}]))


def mmvu(root):
    clip(root / "videos/Art/0.mp4")
    (root / "validation.json").write_text(json.dumps([
        {"id": 7, "video": "https://huggingface.co/datasets/yale-nlp/MMVU/resolve/main/videos/Art/0.mp4",
         "question_type": "multiple-choice", "question": "Which style?",
         "choices": {"A": "Baroque", "B": "Cubism", "C": "Fauvism", "D": "Pop art", "E": "Dada"}, "answer": "B"},
        {"id": 8, "video": "videos/Art/0.mp4", "question_type": "open-ended", "question": "Why?", "choices": {},
         "answer": "because"}]))


MINIATURES = {"mvbench": mvbench, "videomme": videomme, "mlvu": mlvu, "mmvu": mmvu}

# Each benchmark's first question as eval_<bench>.py writes it, before "<image>\n" and the suffix.
REFERENCE_QUESTIONS = {
    "mvbench": "What did the person do first?\n(A) Sat.\n(B) Ran.\n(C) Ate.",
    "videomme": "What colour is the car?\nOptions:\nA. Red.\nB. Blue.\nC. Green.\nD. Black.",
    "mlvu": "How many times?\n(A) 1\n(B) 2\n(C) 3\n(D) 4",
    "mmvu": "Which style?\nA. Baroque\nB. Cubism\nC. Fauvism\nD. Pop art\nE. Dada",
}


def chat(text):
    return ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
            "detailed, and polite answers to the user's questions. USER: <image>\n" + text + " ASSISTANT:")


@pytest.mark.parametrize("bench", sorted(MINIATURES))
def test_prompts_in_both_protocols(tmp_path, bench):
    MINIATURES[bench](tmp_path)
    items = E.LOADERS[bench](tmp_path)
    first = items[0]
    assert E.prompt_for(first, "reason", protocol="reference") == chat(REFERENCE_QUESTIONS[bench] + "\n" + SUFFIX)
    ours = E.prompt_for(first, "reason")
    assert "\nOptions:\nA. " in ours and ours.endswith("\n" + SUFFIX + " ASSISTANT:")
    assert data.option_letters(first.reference) == data.option_letters(first.problem) == "".join(first.options)
    answers = {"mvbench": ["B", "B"], "videomme": ["B", "D"], "mlvu": ["C"], "mmvu": ["B"]}[bench]
    assert [it.answer for it in items] == answers            # MLVU's 8_sub_scene and MMVU's open item left out


def test_reference_protocol_drops_mvbench_bounds_of_video_files_only(tmp_path):
    mvbench(tmp_path)
    args = E.settings(model="m", bench="mvbench", out="o", data_root=str(tmp_path), protocol="reference")
    video, folder = E.load_items(args)
    assert (video.start, video.end) == (None, None)          # eval_mvbench.py's read_video ignores the bound
    assert (folder.start, folder.end) == (1.0, 3.0)          # its read_frame applies it
    ours = E.load_items(E.settings(model="m", bench="mvbench", out="o", data_root=str(tmp_path)))
    assert (ours[0].start, ours[0].end) == (0.1, 0.9)
    # 1.0 s .. 3.0 s at 3 fps are the frames numbered 3..9 (00003.jpg at 1.0 s); 4 of them by linspace
    got = data.load_video(folder.video, 4, folder.start, folder.end)
    want = [data._decode_image(tmp_path / f"video/tvqa/frames_fps3_hq/ep1/{n:05d}.jpg") for n in (3, 5, 7, 9)]
    np.testing.assert_array_equal(got, np.stack(want))


@pytest.mark.parametrize("completion, want", [
    ("<think>x</think> <answer>B</answer>", "B"),
    ("<answer> b. a dog </answer>", "B"),                # lower case counts
    ("<answer>apple</answer>", "A"),                     # its first character: a
    ("<answer>The answer is (C)</answer>", "C"),
    ("<answer>the (d) one</answer>", "D"),
    ("<answer>\nB\n</answer>", "B"),                     # spaces around the text may hold newlines
    ("<answer>B\nC</answer>", E.GUESS),                  # the text itself may not
    ("<answer>Z</answer>", E.GUESS),
    ("<answer>  </answer>", None),                       # an empty answer is wrong, not guessed
    ("B", E.GUESS),                                      # no tag
])
def test_reference_answer_by_hand(completion, want):
    assert E.reference_answer(completion, "ABCD") == want


@pytest.mark.parametrize("completion, want", [
    ("<answer>B</answer>", "B"),
    ("<answer>b</answer>", E.GUESS),                     # MVBench's parser is case-sensitive
    ("The answer is (C).", "C"),                         # no tag: the whole completion
    ("I think A or maybe C is right", "C"),              # " A ", " C ": the last one written
    (".(A) and (B)", "B"),
    ("it is clearly the small brown dog here", "A"),     # over 5 words: the option's text
    ("a dog", E.GUESS),                                  # 2 words: not read for text
    ("'B'", "B"),
    ("nothing", E.GUESS),
])
def test_reference_answer_mvbench_by_hand(completion, want):
    assert E.reference_answer_mvbench(completion, {"A": "dog", "B": "cat", "C": "cow"}) == want


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    tok = M.build_tokenizer(["What colour is the car? Options: A. B. C. (A) (B)"] * 10, d / "tok", vocab_size=280)
    M.save_pretrained(M.TinyLlavaVideo(M.tiny_config(len(tok))), d / "ckpt", tok)
    return d / "ckpt"


@pytest.mark.parametrize("bench", sorted(MINIATURES))
def test_cli_both_protocols(tmp_path, tiny_checkpoint, bench):
    MINIATURES[bench](tmp_path / bench)
    base = ["--model", str(tiny_checkpoint), "--bench", bench, "--data-root", str(tmp_path / bench)]
    ours = E.main(base + ["--out", str(tmp_path / "ours.json"), "--max-new-tokens", "3"])
    assert ours["args"]["temperature"] == 0.0 and ours["summary"]["n"] == len(ours["items"])
    ref = E.main(base + ["--out", str(tmp_path / "ref.json"), "--protocol", "reference", "--seeds", "2"])
    sampled = bench != "mvbench"                          # MVBench's script decodes greedily
    assert (ref["args"]["temperature"], ref["args"]["top_k"]) == ((1.0, 50) if sampled else (0.0, 0))
    assert ref["args"]["max_new_tokens"] == 1024 and len(ref["seeds"]) == 2
    assert ref["summary"]["score"] == pytest.approx(sum(s["score"] for s in ref["seeds"]) / 2)
    for row in ref["items"]:                              # every prediction is an option letter (or None)
        assert row["prediction"] in set(E.LOADERS[bench](tmp_path / bench)[0].options) | {None}
    with pytest.raises(data.UserError, match="Reason mode only"):
        E.main(base + ["--out", str(tmp_path / "x.json"), "--protocol", "reference", "--mode", "option"])
