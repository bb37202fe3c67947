"""train.py on the tiny model: data parallel = one big batch, what GRPO trains, SFT labels, resume, bad videos."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import model as M
import train

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small shapes data set and a tiny model after one SFT step (its starting checkpoint)."""
    d = tmp_path_factory.mktemp("shapes")
    data.generate_shapes(d, n_train=24, n_test=4, seed=1, workers=1)  # three records per clip
    init = d / "init"
    train.main(["--stage", "sft", "--init", "tiny", "--data", str(d / "sft.json"), "--out", str(init),
                "--max-steps", "1", "--lr", "1e-3", "--quiet"])
    return d, init / "final"


GRPO = ["--stage", "grpo", "--G", "4", "--max-new-tokens", "8", "--lr", "1e-3", "--micro-batch", "3", "--quiet"]


def weights(path):
    return load_file(str(Path(path) / "model.safetensors"))


def metrics(path):
    return [json.loads(l) for l in (Path(path) / "metrics.jsonl").read_text().splitlines()]


def torchrun(args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--master_port", str(29500 + os.getpid() % 1000), str(ROOT / "train.py")] + args
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_equal_one_process_on_the_union_batch(setup, tmp_path, mode):
    d, init = setup
    common = GRPO + ["--init", str(init), "--data", str(d / "train.jsonl"), "--max-steps", "1", "--beta", "0.05"]
    train.main(common + ["--out", str(tmp_path / "one"), "--prompts-per-rank", "2"])
    torchrun(common + ["--out", str(tmp_path / "two"), "--prompts-per-rank", "1"] + (["--fsdp"] if mode == "fsdp" else []))
    a, b, start = weights(tmp_path / "one/final"), weights(tmp_path / "two/final"), weights(init)
    assert a.keys() == b.keys()
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    assert moved > 1e-4                                   # the step did something
    for k in a:  # Adam's first step is about lr * sign(grad): compare at a fraction of lr
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=0, msg=k)
    ma, mb = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert ma[0]["completions/mean_length"] == mb[0]["completions/mean_length"]
    for k in ("reward", "reward_std", "frac_reward_zero_std", "completions/clipped_ratio", "entropy"):
        assert ma[0][k] == pytest.approx(mb[0][k], rel=1e-4), k


def test_grpo_trains_connector_and_llm_not_vision(setup, tmp_path):
    d, init = setup
    train.main(GRPO + ["--init", str(init), "--data", str(d / "train.jsonl"), "--out", str(tmp_path / "r"),
                       "--max-steps", "1", "--prompts-per-rank", "2", "--tgrpo", "--num-iterations", "2"])
    a, b = weights(init), weights(tmp_path / "r/final")
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert all(not k.startswith("vision_tower.") for k in changed)
    assert any(k.startswith("connector.") for k in changed)
    assert any(k.startswith("language_model.model.layers.") for k in changed)
    row = metrics(tmp_path / "r")[0]
    for key in ("reward", "reward_std", "frac_reward_zero_std", "rewards/accuracy/mean", "rewards/format/mean",
                "rewards/temporal/mean", "completions/mean_length", "completions/clipped_ratio", "kl", "clip_ratio",
                "entropy", "lr"):
        assert key in row
    assert row["entropy"] > 0


def one_prompt(d, tmp_path):
    """A GRPO data file of the first training prompt alone, so that its label is known.
    Returns (path, the label letter, a wrong letter)."""
    rec = json.loads((d / "train.jsonl").read_text().splitlines()[0])
    rec["video_filename"] = str(d / rec["video_filename"])
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(rec) + "\n")
    label = rec["solution"][len("<answer>")]
    return path, label, "B" if label == "A" else "A"


def test_logged_rewards_of_known_completions(setup, tmp_path, monkeypatch):
    """Every sampled completion replaced by the same four texts: the logged means worked by hand."""
    d, init = setup
    data_file, label, wrong = one_prompt(d, tmp_path)
    texts = ["<think>" + "x" * 30 + f"</think> <answer>{label}</answer>",  # FR 0.5 + 30/60*0.5 = .75, AR 1
             "<think>" + "y" * 90 + f"</think> <answer>{wrong}</answer>",  # FR 1.0 (capped), AR 0
             f"<answer>{label}</answer>",                                  # broken: FR 0, AR 1
             "no tags at all"]                                             # broken: FR 0, AR 0
    monkeypatch.setattr(M, "decode_completions", lambda tok, ids, mask: list(texts))
    train.main(GRPO + ["--init", str(init), "--data", str(data_file), "--out", str(tmp_path / "r"),
                       "--max-steps", "1", "--prompts-per-rank", "1", "--ml", "60", "--sample-every", "1"])
    row = metrics(tmp_path / "r")[0]
    assert row["rewards/format/mean"] == pytest.approx((0.75 + 1.0) / 4)
    assert row["rewards/accuracy/mean"] == pytest.approx(2 / 4)
    rewards = [1.75, -1.0, -2.0, -2.0]                                     # eq. (4)
    assert row["reward"] == pytest.approx(sum(rewards) / 4)
    mean = sum(rewards) / 4                                                # one group: its unbiased std
    assert row["reward_std"] == pytest.approx((sum((r - mean) ** 2 for r in rewards) / 3) ** 0.5)
    assert row["frac_reward_zero_std"] == 0.0
    assert row["well_formed"] == pytest.approx(2 / 4)
    assert row["think_length"] == pytest.approx((30 + 90) / 2)  # characters, well-formed ones only
    saved = [json.loads(l) for l in (tmp_path / "r/completions.jsonl").read_text().splitlines()]
    assert [(c["step"], c["prompt_id"], c["completion"]) for c in saved] == [(1, 0, t) for t in texts]
    assert [c["reward"] for c in saved] == pytest.approx(rewards)
    assert [c["accuracy"] for c in saved] == [1.0, 0.0, 1.0, 0.0] and [c["format"] for c in saved] == \
        pytest.approx([0.75, 1.0, 0.0, 0.0])


def test_logged_lengths_of_known_completions(setup, tmp_path, monkeypatch):
    """Four hand-made completions of at most 3 tokens: one runs out of tokens before its eos (clipped)."""
    d, init = setup
    data_file, _, _ = one_prompt(d, tmp_path)
    e, x = M.from_pretrained(init)[1].eos_token_id, 5
    ids = torch.tensor([[x, x, e], [x, e, e], [x, x, x], [e, e, e]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0], [1, 1, 1], [1, 0, 0]])   # up to and including the first eos
    monkeypatch.setattr(M, "sample", lambda *a, **k: (ids.clone(), mask.clone()))
    train.main(GRPO + ["--init", str(init), "--data", str(data_file), "--out", str(tmp_path / "r"),
                       "--max-steps", "1", "--prompts-per-rank", "1", "--max-new-tokens", "3"])
    row = metrics(tmp_path / "r")[0]
    assert row["completions/mean_length"] == pytest.approx((3 + 2 + 3 + 1) / 4)
    assert row["completions/clipped_ratio"] == pytest.approx(1 / 4)


@pytest.mark.parametrize("shuffled_right, paid", [(1, True), (2, False)])
def test_logged_temporal_bonus(setup, tmp_path, monkeypatch, shuffled_right, paid):
    """T-GRPO: 2 of the 4 ordered completions right (p = 0.5); of the G/2 = 2 on shuffled frames 1
    right (p~ = 0.5: bonus paid, p >= p~) or 2 (p~ = 1: not paid). Logged means worked by hand."""
    d, init = setup
    data_file, label, wrong = one_prompt(d, tmp_path)
    ordered = [f"<think>x</think> <answer>{label}</answer>"] * 2 + [f"<think>x</think> <answer>{wrong}</answer>"] * 2
    shuffled = [f"<answer>{label}</answer>"] * shuffled_right + [f"<answer>{wrong}</answer>"] * (2 - shuffled_right)
    monkeypatch.setattr(M, "decode_completions", lambda tok, ids, mask: list(ordered if len(ids) == 4 else shuffled))
    train.main(GRPO + ["--init", str(init), "--data", str(data_file), "--out", str(tmp_path / "r"),
                       "--max-steps", "1", "--prompts-per-rank", "1", "--ml", "60", "--tgrpo"])
    row = metrics(tmp_path / "r")[0]
    bonus = 0.3 * 2 / 4 if paid else 0.0  # alpha on each of the 2 right ones
    fr = 0.5 + 1 / 60 * 0.5               # one character of thought
    assert row["rewards/temporal/mean"] == pytest.approx(bonus)
    assert row["reward"] == pytest.approx((2 * (1 + fr) - 2 * fr) / 4 + bonus)  # eq. (4) + the bonus


def test_sft_labels_cover_answer_and_eos_only(setup):
    d, init = setup
    _, tok = M.from_pretrained(init)
    s = data.Sample(video=Path("x.mp4"), question="Q?", answer="B", target="<think>a</think> <answer>B</answer>")
    ids, labels = data.sft_tensors(tok, s, torch.device("cpu"))
    prompt = data.tokenize_prompt(tok, data.chat_prompt("Q?"))
    answer = tok("<think>a</think> <answer>B</answer>", add_special_tokens=False).input_ids
    assert ids.tolist() == prompt + answer + [tok.eos_token_id]
    assert labels.tolist() == [-100] * len(prompt) + answer + [tok.eos_token_id]


def test_sft_multi_turn_continues_after_each_eos_and_labels_every_answer(setup):
    d, init = setup
    _, tok = M.from_pretrained(init)
    s = data.Sample(video=Path("x.mp4"), question="Q?", answer="B", target="<answer>B</answer>",
                    history=(("Describe.", "A red dot."),))
    ids, labels = data.sft_tensors(tok, s, torch.device("cpu"))
    enc = lambda text: tok(text, add_special_tokens=False).input_ids
    first, eos = data.tokenize_prompt(tok, data.chat_prompt("Describe.")), [tok.eos_token_id]
    assert ids.tolist() == first + enc("A red dot.") + eos + enc("USER: Q? ASSISTANT:") + enc("<answer>B</answer>") + eos
    ignored = lambda part: [-100] * len(part)
    assert labels.tolist() == (ignored(first) + enc("A red dot.") + eos + ignored(enc("USER: Q? ASSISTANT:"))
                               + enc("<answer>B</answer>") + eos)


def test_rehearsal_mix_reads_each_sample_once_an_epoch_and_each_record_at_most_once():
    samples, old = ["s0", "s1", "s2"], [f"o{i}" for i in range(10)]
    mix = data.rehearsal_mix(samples, old, epochs=2, ratio=1, seed=0)
    assert mix[:6] == samples * 2
    assert len(mix) == 12 and len(set(mix[6:])) == 6 and set(mix[6:]) <= set(old)
    assert data.rehearsal_mix(samples, old, 2, 1, 0) == mix and data.rehearsal_mix(samples, old, 2, 1, 1) != mix
    mix = data.rehearsal_mix(samples, old, epochs=1, ratio=3, seed=0)
    assert mix[:3] == samples and len(set(mix[3:])) == 9 and set(mix[3:]) <= set(old)
    # a fractional ratio (the shapes base stage's direction parts): 3 x 4 x 0.25 = 3 records
    mix = data.rehearsal_mix(samples, old, epochs=4, ratio=0.25, seed=0)
    assert mix[:12] == samples * 4 and len(mix) == 15 and len(set(mix[12:])) == 3 and set(mix[12:]) <= set(old)
    with pytest.raises(ValueError, match="old.json: 10 records, fewer than the 12"):
        data.rehearsal_mix(samples, old, 2, 2, 0, "old.json")


def test_cold_start_with_rehearsal(setup, tmp_path):
    # 16 cold-start samples x 2 epochs + 32 of sft.json's 72 records, read as one epoch of 8 per step
    d, init = setup
    args = ["--stage", "sft", "--init", str(init), "--data", str(d / "coldstart.json"), "--lr", "1e-3", "--quiet",
            "--batch-size", "8", "--rehearse", str(d / "sft.json"), "--rehearse-ratio", "1"]
    train.main(args + ["--epochs", "2", "--out", str(tmp_path / "cold")])
    rows = metrics(tmp_path / "cold")
    assert [r["step"] for r in rows] == list(range(1, 9)) and all(r["skipped"] == 0 for r in rows)
    with pytest.raises(ValueError, match="sft.json: 72 records, fewer than the 80"):
        train.main(args + ["--epochs", "5", "--out", str(tmp_path / "too_many")])
    with pytest.raises(data.UserError, match="--rehearse is for the sft stage"):
        train.main(args[:1] + ["grpo"] + args[2:] + ["--out", str(tmp_path / "grpo")])


def test_video_gain_against_one_sample_at_a_time(setup, tmp_path):
    d, init = setup
    model, tok = M.from_pretrained(init)
    cpu = torch.device("cpu")
    samples = data.read_llava_json(d / "sft.json")[:9:3]  # three clips (sft.json has three records per clip)
    pixels = [data.VideoLoader(16, model.cfg.image_size)(s.video) for s in samples]

    def loss(sample, px):  # no padding, no batching: one forward per sample
        ids, labels = data.sft_tensors(tok, sample, cpu)
        with torch.no_grad():
            logits, labels = model(ids[None], torch.ones_like(ids)[None], model.encode_video(px)[None], labels[None])
        ce = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
        return float(ce), int((labels[0, 1:] != -100).sum())

    own = [loss(s, p) for s, p in zip(samples, pixels)]
    other = [loss(s, pixels[(i + 1) % 3]) for i, s in enumerate(samples)]  # the next sample's video
    gain, n = train.video_gain(model, tok, samples, pixels, cpu)
    assert n == sum(k for _, k in own)
    assert gain == pytest.approx(sum(o for o, _ in other) - sum(o for o, _ in own), rel=1e-4, abs=1e-4)
    assert abs(gain) > 1e-3  # the videos differ, so the losses do
    same, _ = train.video_gain(model, tok, samples, [pixels[0]] * 3, cpu)
    assert same == pytest.approx(0.0, abs=1e-4)
    assert train.video_gain(model, tok, samples, [pixels[0], None, None], cpu) == (0.0, 0.0)
    # and the SFT loop logs it every N steps
    train.main(["--stage", "sft", "--init", str(init), "--data", str(d / "sft.json"), "--out", str(tmp_path / "g"),
                "--max-steps", "2", "--video-gain-every", "2", "--batch-size", "4", "--quiet"])
    rows = metrics(tmp_path / "g")
    assert "video_gain" not in rows[0] and abs(rows[1]["video_gain"]) < 10
    train.main(["--stage", "sft", "--init", str(init), "--data", str(d / "sft.json"), "--out", str(tmp_path / "g1"),
                "--max-steps", "1", "--video-gain-every", "1", "--batch-size", "1", "--quiet"])
    assert "video_gain" not in metrics(tmp_path / "g1")[0]  # one sample: no other video, nothing logged


def test_resume_repeats_an_uninterrupted_run(setup, tmp_path):
    d, init = setup
    args = GRPO + ["--init", str(init), "--data", str(d / "train.jsonl"), "--max-steps", "4", "--save-every", "2",
                   "--prompts-per-rank", "2"]
    train.main(args + ["--out", str(tmp_path / "full")])
    (tmp_path / "cut").mkdir()
    train.main(args + ["--out", str(tmp_path / "cut"), "--resume", str(tmp_path / "full/step-000002")])
    full, resumed = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert [r["step"] for r in resumed] == [3, 4]
    for a, b in zip(full[2:], resumed):
        for k in ("reward", "rewards/accuracy/mean", "completions/mean_length", "kl", "entropy", "grad_norm"):
            assert a[k] == b[k], (k, a[k], b[k])
    wa, wb = weights(tmp_path / "full/final"), weights(tmp_path / "cut/final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_broken_video_is_skipped_and_counted(setup, tmp_path):
    d, init = setup
    rows = (d / "train.jsonl").read_text().splitlines()[:8]
    bad = tmp_path / "videos"
    bad.mkdir()
    (bad / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    rec = json.loads(rows[0])
    rec["video_filename"] = str(bad / "broken.mp4")
    rows[3] = json.dumps(rec)
    for i, r in enumerate(rows[:3] + rows[4:]):  # the others point at the real clips
        rec = json.loads(r)
        rec["video_filename"] = str(d / rec["video_filename"])
        rows[i if i < 3 else i + 1] = json.dumps(rec)
    (tmp_path / "mixed.jsonl").write_text("\n".join(rows))
    train.main(GRPO + ["--init", str(init), "--data", str(tmp_path / "mixed.jsonl"), "--out", str(tmp_path / "r"),
                       "--prompts-per-rank", "2", "--max-steps", "4"])
    m = metrics(tmp_path / "r")
    assert len(m) == 4 and m[-1]["skipped_total"] == 1 and sum(r["skipped"] for r in m) == 1
    data.check_bad_videos(1, 1, 0.05)              # one failure is tolerated from the first video on
    data.check_bad_videos(2, 40, 0.05)             # 5% of 40
    for bad_seen in ((2, 2), (2, 39), (3, 40)):
        with pytest.raises(data.UserError, match=f"{bad_seen[0]} of {bad_seen[1]} videos failed"):
            data.check_bad_videos(*bad_seen, 0.05, ["x.mp4"])


def test_videos_kept_in_memory_equal_fresh_decodes(setup, tmp_path, monkeypatch):
    d = setup[0]
    clips = [tmp_path / f"{k}.mp4" for k in range(3)]
    for src, dst in zip(sorted((d / "videos").glob("*.mp4")), clips):
        dst.write_bytes(src.read_bytes())
    decodes = []
    load = data.load_video
    monkeypatch.setattr(data, "load_video", lambda *a, **k: decodes.append(a[0]) or load(*a, **k))
    fresh = data.VideoLoader(16, 32)
    for kept in (data.VideoLoader(16, 32, keep_in_memory=True),
                 data.VideoLoader(16, 32, keep_in_memory=True)):  # a later run in the same process
        for clip in clips:
            assert torch.equal(kept(clip), fresh(clip))
    assert len(decodes) == 3 + 3 + 3   # fresh: twice; kept: once, shared by both loaders
    # another clip of another size (the key holds size and mtime; mtime alone can be coarse)
    other = next(v for v in sorted((d / "videos").glob("*.mp4")) if v.stat().st_size != clips[0].stat().st_size)
    clips[0].write_bytes(other.read_bytes())  # written again: decoded again, not served from memory
    assert torch.equal(kept(clips[0]), fresh(other))
    assert len(decodes) == 9 + 2


def test_the_frozen_tower_runs_once_per_video_per_grpo_step(setup, tmp_path, monkeypatch):
    """Rollout, T-GRPO's shuffled rollout, old and reference log-probs and the backward micro-batches all
    share one vision-tower pass per prompt: 2 prompts, 1 step -> 2 passes, each over one clip's frames."""
    d, init = setup
    frames = []
    forward = M.VisionTower.forward
    monkeypatch.setattr(M.VisionTower, "forward", lambda self, px: frames.append(len(px)) or forward(self, px))
    train.main(GRPO + ["--init", str(init), "--data", str(d / "train.jsonl"), "--out", str(tmp_path / "r"),
                       "--max-steps", "1", "--prompts-per-rank", "2", "--tgrpo", "--num-iterations", "2",
                       "--beta", "0.05", "--micro-batch", "2"])
    assert frames == [16, 16]


def test_settings_are_the_flags_defaults_with_overrides(tmp_path):
    d = str(tmp_path / "d.json")
    (tmp_path / "d.json").write_text("[]")
    args = train.settings(stage="sft", init="tiny", data=d, out="o", lr=1e-3)
    assert args == train.get_args(["--stage", "sft", "--init", "tiny", "--data", d, "--out", "o", "--lr", "1e-3"])
    assert (args.schedule, args.warmup, args.batch_size) == ("constant", 0.0, 4)   # the cold start's recipe
    with pytest.raises(TypeError, match="not train.py flags: \\['learning_rate'\\]"):
        train.settings(init="tiny", data=d, out="o", learning_rate=1e-3)
    with pytest.raises(data.UserError, match="gone.json: no such data file. The paper's training data: `python data"):
        train.settings(init="tiny", data=str(tmp_path / "gone.json"))
    with pytest.raises(ValueError, match="--train-vision is for the sft stage"):
        train.settings(init="tiny", data=d, out="o", train_vision=True)
