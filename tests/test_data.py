"""Tests for data.py: exact frame picking, preprocessing, prompts, readers, the shapes task."""
import json
import re
from fractions import Fraction
from collections import Counter

import av
import numpy as np
import pytest
import torch

import bench
import data


def _frames(n, h=48, w=64):
    # Every frame differs (a moving bar and a per-frame level), so a wrong index shows up.
    out = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        out[i, :, :, 0] = (i * 7) % 256
        out[i, :, (i * 3) % w:(i * 3) % w + 6, 1] = 255
        out[i, (i * 2) % h, :, 2] = 200
    return out


def _write(path, frames, codec, fps=30, pts=None, options=None):
    """Encode frames; `pts` (in 1/1000 s) makes a variable-frame-rate file."""
    with av.open(str(path), "w") as out:
        s = out.add_stream(codec, rate=fps)
        s.width, s.height = frames.shape[2], frames.shape[1]
        s.pix_fmt = "yuv420p"
        if options:
            s.options = options
        if pts is not None:
            s.codec_context.time_base = Fraction(1, 1000)
        for i, f in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(f, format="rgb24")
            if pts is not None:
                vf.pts, vf.time_base = pts[i], s.codec_context.time_base
            out.mux(s.encode(vf))
        out.mux(s.encode())
    return path


VIDEOS = {  # name -> (file name, codec, encoder options)
    "h264_mp4": ("a.mp4", "libx264", {"g": "8", "bf": "3"}),   # short GOP + B-frames: seeking + reordering
    "vp9_webm": ("a.webm", "libvpx-vp9", {"g": "10"}),
    "mpeg4_avi": ("a.avi", "mpeg4", {"g": "6", "bf": "2"}),
    "h264_mkv": ("a.mkv", "libx264", {"g": "12"}),
}


@pytest.mark.parametrize("name", VIDEOS)
@pytest.mark.parametrize("num_frames", [16, 5])
def test_load_video_equals_decode_all_then_pick(tmp_path, name, num_frames):
    fname, codec, opts = VIDEOS[name]
    path = _write(tmp_path / fname, _frames(47), codec, options=opts)
    got = data.load_video(path, num_frames)
    assert got.shape == (num_frames, 48, 64, 3) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, bench.load_video_reference(path, num_frames))


def test_load_video_variable_frame_rate(tmp_path):
    pts = np.cumsum([0, 10, 50, 20, 100, 33, 33, 200, 10, 10, 70, 40, 40, 5, 90, 60, 30, 30, 45, 120])
    path = _write(tmp_path / "vfr.mp4", _frames(len(pts)), "libx264", pts=[int(p) for p in pts])
    np.testing.assert_array_equal(data.load_video(path, 16), bench.load_video_reference(path, 16))


def test_short_clip_repeats_indices(tmp_path):
    frames = _frames(5)
    path = _write(tmp_path / "short.mp4", frames, "libx264")
    got = data.load_video(path, 16)
    ref_all = bench.load_video_reference(path, 5)  # every frame, decoded
    # linspace(0, 4, 16) = 0, .27, .53, .8, 1.07, ..., 2.93, 3.2, 3.47, 3.73, 4; cast truncates:
    expect = [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 4]
    np.testing.assert_array_equal(got, ref_all[expect])


def test_start_end_bounds_in_seconds(tmp_path):
    path = _write(tmp_path / "b.mp4", _frames(90), "libx264", fps=30, options={"g": "10"})
    all_frames = bench.load_video_reference(path, 90)
    # Frames with 1.0 <= i/30 <= 2.0 are i = 30..60 (31 frames); linspace over those.
    idx = 30 + np.linspace(0, 30, 8, dtype=int)
    np.testing.assert_array_equal(data.load_video(path, 8, start=1.0, end=2.0), all_frames[idx])
    with pytest.raises(ValueError, match="no frame between"):
        data.load_video(path, 8, start=10.0, end=11.0)


def test_frame_folder_numeric_order(tmp_path):
    frames = _frames(12)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(frames):  # names whose string order differs from their number order
        with av.open(str(folder / f"img_{i + 1}.jpg"), "w", format="image2") as out:
            s = out.add_stream("mjpeg")
            s.width, s.height, s.pix_fmt = 64, 48, "yuvj444p"
            out.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
            out.mux(s.encode())
    got = data.load_video(folder, 4)
    singles = [data._decode_image(folder / f"img_{i + 1}.jpg") for i in (0, 3, 7, 11)]  # linspace(0,11,4)
    np.testing.assert_array_equal(got, np.stack(singles))
    # bounds at 3 fps, frame n at n / 3 s: 1.0 s .. 2.0 s are img_3..img_6; linspace(0, 3, 3) -> 0, 1, 3
    # -> img_3, img_4, img_6
    bounded = [data._decode_image(folder / f"img_{n}.jpg") for n in (3, 4, 6)]
    np.testing.assert_array_equal(data.load_video(folder, 3, start=1.0, end=2.0), np.stack(bounded))
    # jpg is lossy, but each picked frame must be closest to its own source frame
    for k, i in enumerate((0, 3, 7, 11)):
        errors = [np.abs(got[k].astype(int) - f.astype(int)).mean() for f in frames]
        assert int(np.argmin(errors)) == i


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.mp4"):
        data.load_video(tmp_path / "nope.mp4")
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"this is not a video" * 100)
    with pytest.raises(ValueError, match="bad.mp4"):
        data.load_video(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        data.load_video(empty)


def test_preprocess():
    frames = np.zeros((2, 20, 30, 3), np.uint8)
    frames[0] = 255
    x = data.preprocess(frames, size=16)
    assert x.shape == (2, 3, 16, 16) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], torch.ones(3, 16, 16))   # 255 / 127.5 - 1
    torch.testing.assert_close(x[1], -torch.ones(3, 16, 16))  # 0 / 127.5 - 1
    same = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    torch.testing.assert_close(data.preprocess(same, 4)[1, 2, 3, 0], torch.tensor(same[1, 3, 0, 2] / 127.5 - 1, dtype=torch.float32))


def test_prompt_templates_exact():
    problem = "What happens?\nOptions:\nA. x\nB. y"
    assert data.build_question(problem, "reason") == (
        "What happens?\nOptions:\nA. x\nB. y Output the thinking process in <think> </think> and final "
        "answer (option) in <answer> </answer> tags.")
    assert data.build_question(problem, "reason", "\n").endswith(
        "B. y\nOutput the thinking process in <think> </think> and final answer (option) in <answer> </answer> tags.")
    assert data.build_question(problem, "option", "\n") == (
        "What happens?\nOptions:\nA. x\nB. y\nAnswer with the option's letter from the given choices directly.")
    assert data.chat_prompt("Q?") == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nQ? ASSISTANT:")
    assert data.format_options("Q?", ["cat", "dog"]) == "Q?\nOptions:\nA. cat\nB. dog"
    with pytest.raises(ValueError, match="answer mode"):
        data.build_question(problem, "free")


def test_read_nextqa_jsonl(tmp_path):
    rec = {"problem": "Q?\nOptions:\nA. a.\nB. b.", "solution": "<answer>B</answer>",
           "video_filename": "./NextQA/NExTVideo/1/2.mp4", "data_type": "video", "problem_id": 7,
           "problem_type": "multiple choice"}
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps(rec) + "\n\n" + json.dumps({**rec, "solution": "<answer> A </answer>"}) + "\n")
    s = data.read_nextqa_jsonl(f, root="/data")
    assert [x.answer for x in s] == ["B", "A"]
    assert str(s[0].video) == "/data/NextQA/NExTVideo/1/2.mp4" and s[0].question == rec["problem"]
    f.write_text(json.dumps(rec) + "\n" + json.dumps({k: v for k, v in rec.items() if k != "problem"}))
    with pytest.raises(ValueError, match=r"d.jsonl:2: missing field 'problem'"):
        data.read_nextqa_jsonl(f)
    f.write_text(json.dumps({**rec, "solution": "B"}))
    with pytest.raises(ValueError, match=r"d.jsonl:1: field 'solution'"):
        data.read_nextqa_jsonl(f)
    f.write_text("{not json")
    with pytest.raises(ValueError, match=r"d.jsonl:1: not valid JSON"):
        data.read_nextqa_jsonl(f)


@pytest.mark.parametrize("solution, why", [
    ("<answer>C</answer>", "the answer 'C' is not one of the record's option letters AB"),   # not an option
    ("<answer>AB</answer>", "the answer 'AB' is not one"),
    ("<answer></answer>", "the answer '' is not one")])
def test_labels_are_one_of_the_records_own_letters(tmp_path, solution, why):
    rec = {"problem": "Q?\nOptions:\nA. a.\nB. b.", "solution": solution, "video_filename": "v.mp4"}
    (tmp_path / "d.jsonl").write_text(json.dumps({**rec, "solution": "<answer>A</answer>"}) + "\n" + json.dumps(rec))
    with pytest.raises(data.UserError, match=f"d.jsonl:2: {re.escape(why)}"):
        data.read_nextqa_jsonl(tmp_path / "d.jsonl")
    seven = {"problem": "Q?\nOptions:\n" + "\n".join(f"{c}. {c.lower()}" for c in "ABCDEFG"),
             "solution": "<answer>G</answer>", "video_filename": "v.mp4"}
    (tmp_path / "7.jsonl").write_text(json.dumps(seven))
    assert data.read_nextqa_jsonl(tmp_path / "7.jsonl")[0].answer == "G"
    cold = [{"video": "v.mp4", "conversations": [{"from": "human", "value": "<image>\n" + rec["problem"]},
                                                 {"from": "gpt", "value": f"<think>x</think> {solution}"}]}]
    (tmp_path / "c.json").write_text(json.dumps(cold))
    with pytest.raises(data.UserError, match=f"c.json: record 0: {re.escape(why)}"):
        data.read_llava_json(tmp_path / "c.json")


def test_unreadable_data_files_are_named(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'{"a": 1}\n{"problem": "caf\xe9"}\n')
    with pytest.raises(data.UserError, match=r"d.jsonl:2: not UTF-8 \(byte 0xe9"):
        data.read_nextqa_jsonl(f)
    f.write_text("\n  \n")
    with pytest.raises(data.UserError, match=r"d.jsonl: the file is empty"):
        data.read_nextqa_jsonl(f)
    (tmp_path / "e.json").write_text("[]")
    with pytest.raises(data.UserError, match=r"e.json: expected a non-empty JSON list"):
        data.read_llava_json(tmp_path / "e.json")
    with pytest.raises(data.UserError, match=r"gone.json: no such data file"):
        data.read_llava_json(tmp_path / "gone.json")


def test_an_audio_only_file_is_named(tmp_path):
    path = tmp_path / "audio.mp4"
    with av.open(str(path), "w") as out:
        s = out.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for p in s.encode(frame):
            out.mux(p)
        for p in s.encode(None):
            out.mux(p)
    with pytest.raises(ValueError, match="audio.mp4 has no video stream"):
        data.load_video(path)


def test_read_llava_json(tmp_path):
    recs = [{"video": "v/1.mp4", "conversations": [
                {"from": "human", "value": "<image>\nQ?\nOptions:\nA. a"},
                {"from": "gpt", "value": "<think>because</think> <answer>A</answer>"}]},
            {"video": "v/2.mp4", "conversations": [
                {"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A red dot."}]}]
    f = tmp_path / "c.json"
    f.write_text(json.dumps(recs))
    s = data.read_llava_json(f)
    assert s[0].question == "Q?\nOptions:\nA. a" and s[0].answer == "A"
    assert s[0].target == "<think>because</think> <answer>A</answer>"
    assert s[1].answer is None and s[1].video == tmp_path / "v/2.mp4"
    recs[1]["conversations"] = recs[1]["conversations"][:1]
    f.write_text(json.dumps(recs))
    with pytest.raises(ValueError, match=r"c.json: record 1: field 'conversations'"):
        data.read_llava_json(f)


def test_read_llava_json_multi_turn(tmp_path):
    turns = [("human", "<image>\nDescribe."), ("gpt", "A red dot."), ("human", "Q?\nOptions:\nA. a"),
             ("gpt", "<answer>A</answer>")]
    rec = {"video": "v.mp4", "conversations": [{"from": w, "value": v} for w, v in turns]}
    f = tmp_path / "m.json"
    f.write_text(json.dumps([rec]))
    (s,) = data.read_llava_json(f)
    assert s.history == (("Describe.", "A red dot."),)
    assert (s.question, s.target, s.answer) == ("Q?\nOptions:\nA. a", "<answer>A</answer>", "A")
    for bad, message in [(turns[:3], "alternate human and gpt"), (turns[1:], "alternate human and gpt"),
                         (turns[:2] + [("human", "<image>\nQ?"), turns[3]], "may only open the first human turn")]:
        rec["conversations"] = [{"from": w, "value": v} for w, v in bad]
        f.write_text(json.dumps([rec]))
        with pytest.raises(ValueError, match=rf"m.json: record 0: .*{message}"):
            data.read_llava_json(f)


# ---- the shapes task -------------------------------------------------------------------------

def _colour_mask(frames, color):
    return np.abs(frames.astype(int) - np.array(data.COLORS[color])).sum(-1) < 60  # (T, H, W)


def _present(frames, color):
    return _colour_mask(frames, color).reshape(len(frames), -1).sum(1) > 10  # (T,)


def _oracle(frames, scene):
    """Recompute a scene's answer from its PIXELS alone (independent of make_scene's bookkeeping):
    each shape has its own colour, so colour masks give presence and position per frame."""
    mask = lambda color: _colour_mask(frames, color)
    present = lambda color: _present(frames, color)
    q, objs = scene["qtype"], scene["objects"]
    if q == "direction":
        m = mask(objs[0].colors[0])
        ys0, xs0 = np.nonzero(m[0]); ys1, xs1 = np.nonzero(m[-1])
        dx, dy = xs1.mean() - xs0.mean(), ys1.mean() - ys0.mean()
        if abs(dx) < 2 and abs(dy) < 2:
            return "it does not move"
        return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")
    if q in ("appear_first", "leave_first"):
        def when(o):
            on = np.nonzero(present(o.colors[0]))[0]
            return on[0] if q == "appear_first" else on[-1]
        return min(objs, key=when).colors[0]
    if q == "color_order":
        seq = []
        for t in range(len(frames)):
            c = [c for c in data.COLORS if present(c)[t]]
            if c and (not seq or seq[-1] != c[0]):
                seq.append(c[0])
        assert len(seq) == 3, seq  # it changes colour twice
        return seq[-1]
    if q == "count":
        return data.COUNTS[sum(present(c)[0] for c in data.COLORS) - 1]


def test_shapes_answers_are_right_from_pixels():
    for i in range(100):
        scene = data.make_scene(np.random.default_rng(i), data.QTYPES[i % 5], i % 5)
        right = scene["options"][data.LETTERS.index(scene["answer"])]
        assert _oracle(data.render(scene), scene) == right, (i, scene["question"])
        assert len(set(scene["options"])) == 5, scene["options"]


def test_shapes_dataset(tmp_path):
    out = tmp_path / "shapes"
    scenes = data.generate_shapes(out, n_train=50, n_test=10, seed=3)
    train = data.read_nextqa_jsonl(out / "train.jsonl")
    assert len(train) == 50 and len(data.read_nextqa_jsonl(out / "test.jsonl")) == 10
    # the answer survives H.264 on the written files, checked on a few decoded clips
    for k in (0, 1, 2, 3, 4, 17):
        frames = data.load_video(train[k].video, scenes["train"][k]["T"])
        right = scenes["train"][k]["options"][data.LETTERS.index(train[k].answer)]
        assert _oracle(frames, scenes["train"][k]) == right
    cold = data.read_llava_json(out / "coldstart.json")
    assert len(cold) == 16 and len({c.answer for c in cold}) == 5
    assert all(c.target.endswith(f"</think> <answer>{c.answer}</answer>") for c in cold)
    assert all(c.question.endswith(data.REASON_SUFFIX) for c in cold)
    # sft.json: per clip the option QA, the description with the tagged question as its second turn, colours
    sft = data.read_llava_json(out / "sft.json")
    assert len(sft) == 150 and sum(s.answer is not None for s in sft) == 100  # the option and the tagged QA
    option, tagged, colours = sft[:3]
    assert option.question.endswith(data.OPTION_SUFFIX) and option.target == train[0].answer
    assert tagged.question == option.question.replace(data.OPTION_SUFFIX, data.TAG_SUFFIX)
    assert tagged.target == f"<answer>{train[0].answer}</answer>" and tagged.answer == train[0].answer
    # the description is asked with the question and its options, as the reason prompt asks
    (describe_q, describe_a), = tagged.history
    assert describe_q == option.question.replace(data.OPTION_SUFFIX, "Describe what happens in the video.")
    assert describe_q.startswith(scenes["train"][0]["question"] + "\nOptions:\n")
    assert describe_a == data.describe(scenes["train"][0])
    shown = {c for o in scenes["train"][0]["objects"] for c in o.colors}
    assert {w.strip(".,").lower() for w in colours.target.split()} - {"and"} == shown
    # sft-direction.json: the option records of the direction clips, each as it is in sft.json
    direction = json.loads((out / "sft-direction.json").read_text())
    records = json.loads((out / "sft.json").read_text())
    wanted = [records[3 * i] for i, sc in enumerate(scenes["train"]) if sc["qtype"] == "direction"]
    assert len(wanted) == 10 and direction == wanted
    assert all(r["conversations"][0]["value"].split("\n")[1].startswith("Which way") for r in direction)
    # sft-direction-all.json: every record of the direction clips (option, description + tag, colours)
    direction_all = json.loads((out / "sft-direction-all.json").read_text())
    wanted = [r for i, sc in enumerate(scenes["train"]) if sc["qtype"] == "direction" for r in records[3 * i:3 * i + 3]]
    assert len(direction_all) == 30 and direction_all == wanted
    # determinism: the same seed writes the same text and the same video bytes, every clip (with crf 12
    # about 1 clip in 65 came out different, so checking one clip was not enough)
    data.generate_shapes(tmp_path / "again", n_train=50, n_test=10, seed=3, workers=1)
    videos = sorted(p.relative_to(out).as_posix() for p in (out / "videos").iterdir())
    assert len(videos) == 60
    for name in ["train.jsonl", "test.jsonl", "sft.json", "coldstart.json"] + videos:
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name


def test_write_mp4_lossless_after_yuv420p(tmp_path):
    # the decoded planes are exactly the frames' yuv420p conversion, whatever the encoder decided
    frames = data.render(data.make_scene(np.random.default_rng(252), "count", 2))
    data.write_mp4(frames, tmp_path / "clip.mp4")
    with av.open(str(tmp_path / "clip.mp4")) as c:
        decoded = [f.to_ndarray() for f in c.decode(video=0)]
    expected = [av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="yuv420p").to_ndarray() for f in frames]
    assert len(decoded) == len(frames) and all(np.array_equal(d, e) for d, e in zip(decoded, expected))


def test_shapes_letters_balanced_and_text_only_baseline_near_chance():
    rng_scenes = lambda split, n: [data.make_scene(np.random.default_rng([0, split, i]), data.QTYPES[i % 5], (i // 5) % 5)
                                   for i in range(n)]
    train, test = rng_scenes(0, 1000), rng_scenes(1, 500)
    letters = Counter(s["answer"] for s in train)
    assert set(letters.values()) == {200}, letters
    # Text-only baseline: for each question text, the option text that was right most often in train.
    right = lambda s: s["options"][data.LETTERS.index(s["answer"])]
    best = {}
    for s in train:
        best.setdefault(s["question"], Counter())[right(s)] += 1
    hits = 0
    for s in test:
        counts = best.get(s["question"], Counter())
        guess = max(s["options"], key=lambda o: counts[o])
        hits += guess == right(s)
    assert hits / len(test) < 0.30, hits / len(test)
    # Nor do a direction clip's colours tell its letter: the colour that shares the answer's letter is
    # shown as often as any (2 of 5 colours shown: 0.4). (Drawn from the other four, it was never shown.)
    direction = [s for s in train if s["qtype"] == "direction"]
    shown = np.mean([list(data.COLORS)[data.LETTERS.index(s["answer"])] in {c for o in s["objects"] for c in o.colors}
                     for s in direction])
    assert 0.3 < shown < 0.5, shown
