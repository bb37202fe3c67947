"""Faults and bad input: nothing lost, every bad input named (README, Reliability)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import evaluate
import train

ROOT = Path(__file__).resolve().parent.parent
GRPO = ["--stage", "grpo", "--G", "4", "--max-new-tokens", "8", "--lr", "1e-3", "--micro-batch", "3", "--quiet"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small shapes data set and a tiny model after one SFT step (its starting checkpoint)."""
    d = tmp_path_factory.mktemp("shapes")
    data.generate_shapes(d, n_train=24, n_test=4, seed=1, workers=1)
    train.main(["--stage", "sft", "--init", "tiny", "--data", str(d / "sft.json"), "--out", str(d / "init"),
                "--max-steps", "1", "--lr", "1e-3", "--quiet"])
    return d, d / "init/final"


def metrics(path):
    return [json.loads(l) for l in (Path(path) / "metrics.jsonl").read_text().splitlines()]


def command(args, nproc=0, timeout=600, **popen):
    """train.py (or evaluate.py, when args[0] ends in .py) as a command line; nproc > 0: under torchrun."""
    script = [str(ROOT / args.pop(0))] if args and args[0].endswith(".py") else [str(ROOT / "train.py")]
    runner = [sys.executable] if not nproc else [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                                                 str(nproc), "--master_port", str(29500 + os.getpid() % 1000)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(runner + script + args, env=env, capture_output=True, text=True, timeout=timeout, **popen)


def test_a_run_folder_belongs_to_one_run(setup, tmp_path):
    d, init = setup
    args = GRPO + ["--init", str(init), "--data", str(d / "train.jsonl"), "--out", str(tmp_path / "r"),
                   "--max-steps", "2", "--prompts-per-rank", "2"]
    train.main(args)
    first = (tmp_path / "r/final/model.safetensors").read_bytes()
    with pytest.raises(data.UserError, match=r"r already holds a run \(final, final-bf16, metrics.jsonl\): continue it "
                                             r"with --resume .*another --out \(--overwrite replaces it\)"):
        train.main(args + ["--seed", "1"])
    assert (tmp_path / "r/final/model.safetensors").read_bytes() == first and len(metrics(tmp_path / "r")) == 2
    train.main(args + ["--seed", "1", "--overwrite"])
    assert [r["step"] for r in metrics(tmp_path / "r")] == [1, 2]


def test_resume_truncates_the_log_and_removes_killed_saves(setup, tmp_path):
    d, init = setup
    args = GRPO + ["--init", str(init), "--data", str(d / "train.jsonl"), "--out", str(tmp_path / "r"),
                   "--max-steps", "4", "--save-every", "2", "--prompts-per-rank", "2", "--sample-every", "1"]
    train.main(args)
    (tmp_path / "r/step-000004.tmp4242").mkdir()          # a save killed midway
    train.main(args + ["--resume", str(tmp_path / "r/step-000002")])
    assert [r["step"] for r in metrics(tmp_path / "r")] == [1, 2, 3, 4]
    saved = [json.loads(l)["step"] for l in (tmp_path / "r/completions.jsonl").read_text().splitlines()]
    assert saved == [s for s in (1, 2, 3, 4) for _ in range(2 * 4)]   # 2 prompts x G = 4 a step, once each
    assert not (tmp_path / "r/step-000004.tmp4242").exists()


def test_resume_from_a_tiny_init_rebuilds_the_reference_model(setup, tmp_path):
    """A GRPO run from --init tiny: its reference model is the tiny model of --seed and the run's
    tokenizer, so a resumed run repeats an uninterrupted one."""
    d, _ = setup
    args = GRPO + ["--init", "tiny", "--data", str(d / "train.jsonl"), "--max-steps", "4", "--save-every", "2",
                   "--prompts-per-rank", "2", "--beta", "0.5", "--seed", "3"]
    train.main(args + ["--out", str(tmp_path / "full")])
    train.main(args + ["--out", str(tmp_path / "cut"), "--resume", str(tmp_path / "full/step-000002")])
    full, cut = metrics(tmp_path / "full"), metrics(tmp_path / "cut")
    assert [r["kl"] for r in full[2:]] == [r["kl"] for r in cut] and full[3]["kl"] > 0
    a, b = load_file(str(tmp_path / "full/final/model.safetensors")), load_file(str(tmp_path / "cut/final/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_saves_a_resumable_checkpoint(setup, tmp_path):
    d, init = setup
    out = tmp_path / "r"
    args = GRPO[:-1] + ["--init", str(init), "--data", str(d / "train.jsonl"), "--out", str(out),
                        "--max-steps", "1000", "--save-every", "1000", "--prompts-per-rank", "1"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "train.py")] + args, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-2000:]
    (saved,) = sorted(out.glob("step-*"))
    step = torch.load(saved / "train_state.pt", weights_only=False)["step"]
    assert step == len(metrics(out)) and "interrupted: checkpoint saved" in log


def test_sigterm_to_one_rank_saves_on_every_rank(setup, tmp_path):
    d, init = setup
    out = tmp_path / "r"
    args = GRPO + ["--init", str(init), "--data", str(d / "train.jsonl"), "--out", str(out), "--max-steps", "1000",
                   "--save-every", "1000", "--prompts-per-rank", "1", "--fsdp"]
    runner = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_port", str(29600 + os.getpid() % 1000), str(ROOT / "train.py")]
    proc = subprocess.Popen(runner + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    deadline = time.time() + 300
    while not (out / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.2)
    workers = children(proc.pid)
    os.kill(max(workers), signal.SIGTERM)        # one worker alone: the ranks agree to stop at the same step
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-3000:]
    (saved,) = sorted(out.glob("step-*"))
    assert torch.load(saved / "train_state.pt", weights_only=False)["step"] == len(metrics(out))


def children(pid):
    """The pids whose parent is `pid` (from /proc: torchrun's workers)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_sft_with_the_video_gain_under_fsdp_equals_one_process(setup, tmp_path):
    d, init = setup
    args = ["--stage", "sft", "--init", str(init), "--data", str(d / "sft.json"), "--max-steps", "2", "--lr", "1e-3",
            "--video-gain-every", "1", "--quiet"]
    train.main(args + ["--out", str(tmp_path / "one"), "--batch-size", "4"])
    r = command(args + ["--out", str(tmp_path / "two"), "--batch-size", "2", "--fsdp"], nproc=2)
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(str(tmp_path / "one/final/model.safetensors"))
    b = load_file(str(tmp_path / "two/final/model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-5, rtol=0, msg=k)  # a stale forward moved them ~2e-3
    # each rank pairs its own samples' videos, so the two gains measure different pairs: both logged
    assert all("video_gain" in x for x in metrics(tmp_path / "one") + metrics(tmp_path / "two"))


def broken_first(d, tmp_path, n_bad):
    """train.jsonl with its clips made absolute and the first n_bad records' videos broken."""
    (tmp_path / "broken.mp4").write_bytes(b"\x00not a video" * 50)
    rows = []
    for i, line in enumerate((d / "train.jsonl").read_text().splitlines()):
        rec = json.loads(line)
        rec["video_filename"] = str(tmp_path / "broken.mp4") if i < n_bad else str(d / rec["video_filename"])
        rows.append(json.dumps(rec))
    (tmp_path / "mixed.jsonl").write_text("\n".join(rows) + "\n")
    return tmp_path / "mixed.jsonl"


def test_bad_videos_are_counted_over_ranks_from_the_first_video(setup, tmp_path):
    """Each of 2 ranks reads one broken clip in its first step: 2 of 2 for the run, so it stops at once,
    with one line from rank 0 and no traceback."""
    d, init = setup
    mixed = broken_first(d, tmp_path, 24)
    r = command(GRPO + ["--init", str(init), "--data", str(mixed), "--out", str(tmp_path / "r"),
                        "--prompts-per-rank", "1", "--max-steps", "3"], nproc=2)
    assert r.returncode != 0
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert errors == ["error: 2 of 2 videos failed, more than --max-bad-fraction 0.05: "
                      f"['{tmp_path / 'broken.mp4'}']"], r.stderr[-3000:]
    assert "Traceback" not in r.stderr.split("error:")[0]


def test_a_skipped_prompt_does_not_scale_the_others_gradient(setup, tmp_path):
    """One prompt of two has a broken video: the gradient is that of the good prompt alone."""
    d, init = setup
    rec = [json.loads(l) for l in (d / "train.jsonl").read_text().splitlines()][:2]
    good, bad = dict(rec[0], video_filename=str(d / rec[0]["video_filename"])), dict(rec[1])
    (tmp_path / "b.mp4").write_bytes(b"junk" * 100)
    bad["video_filename"] = str(tmp_path / "b.mp4")
    order, _ = data.batch_indices(2, 0, 2, 0, 1, 0)              # the good prompt first in the global batch
    pair = [good, bad] if order[0] == 0 else [bad, good]
    (tmp_path / "pair.jsonl").write_text("\n".join(json.dumps(r) for r in pair))
    (tmp_path / "one.jsonl").write_text(json.dumps(good))
    common = GRPO + ["--init", str(init), "--max-steps", "1", "--beta", "0.05"]
    train.main(common + ["--data", str(tmp_path / "pair.jsonl"), "--out", str(tmp_path / "a"), "--prompts-per-rank", "2"])
    train.main(common + ["--data", str(tmp_path / "one.jsonl"), "--out", str(tmp_path / "b"), "--prompts-per-rank", "1"])
    a, b = metrics(tmp_path / "a")[0], metrics(tmp_path / "b")[0]
    assert a["skipped"] == 1 and a["reward"] == b["reward"]
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)


def test_user_errors_print_one_line_and_exit_2(setup, tmp_path):
    d, init = setup
    r = command(["--G", "eight"], nproc=2)                 # a usage error under torchrun: one line, rank 0
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode != 0 and len(errors) == 1 and "argument --G: invalid int value: 'eight'" in errors[0]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = command(GRPO + ["--init", str(init), "--data", str(empty), "--out", str(tmp_path / "r")])
    assert r.returncode == 2 and r.stderr.strip() == f"error: {empty}: the file is empty", r.stderr
    r = command(["evaluate.py", "--model", str(init), "--bench", "jsonl", "--data-root", str(empty),
                 "--out", str(tmp_path / "e.json")])
    assert r.returncode == 2 and r.stderr.strip() == f"error: {empty}: the file is empty", r.stderr
    r = command(["evaluate.py", "--model", str(init), "--bench", "mvbench", "--data-root", str(tmp_path),
                 "--out", str(tmp_path / "e.json")])
    assert r.returncode == 2 and "no mvbench items there" in r.stderr and "Traceback" not in r.stderr


def test_the_shapes_pipeline_refuses_several_ranks(tmp_path):
    r = command(["shapes", "--smoke", "--out", str(tmp_path / "s")], nproc=2)
    assert r.returncode != 0 and "train.py shapes runs in one process" in r.stderr
    assert not (tmp_path / "s").exists()


def test_evaluation_never_reuses_another_models_rows(setup, tmp_path):
    d, init = setup
    other = tmp_path / "other"
    train.main(["--stage", "sft", "--init", str(init), "--data", str(d / "sft.json"), "--out", str(other),
                "--max-steps", "3", "--lr", "5e-3", "--schedule", "cosine", "--warmup", "0.03", "--quiet"])
    kw = dict(bench="jsonl", data_root=str(d / "test.jsonl"), mode="reason", out=str(tmp_path / "e.json"),
              max_new_tokens=6, temperature=1.0, seed=5)  # sampled: each model draws its own tokens
    first = evaluate.run(evaluate.settings(model=str(init), **kw))
    second = evaluate.run(evaluate.settings(model=str(other / "final"), **kw))
    alone = evaluate.run(evaluate.settings(model=str(other / "final"), **dict(kw, out=str(tmp_path / "f.json"))))
    assert [r["completion"] for r in second["items"]] == [r["completion"] for r in alone["items"]]
    assert [r["completion"] for r in first["items"]] != [r["completion"] for r in second["items"]]


def test_keep_last_checkpoints_and_a_bf16_export(setup, tmp_path):
    d, init = setup
    train.main(GRPO + ["--init", str(init), "--data", str(d / "train.jsonl"), "--out", str(tmp_path / "r"),
                       "--max-steps", "5", "--save-every", "1", "--keep-last", "2", "--prompts-per-rank", "2"])
    assert sorted(p.name for p in (tmp_path / "r").iterdir() if p.is_dir()) == [
        "final", "final-bf16", "step-000003", "step-000004"]
    fp32, bf16 = (load_file(str(tmp_path / f"r/{n}/model.safetensors")) for n in ("final", "final-bf16"))
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], fp32[k].bfloat16()) for k in fp32)
    assert not (tmp_path / "r/final-bf16/train_state.pt").exists()
    model, _ = train.M.from_pretrained(tmp_path / "r/final-bf16")
    assert model.cfg.image_size == 32


def test_download_unpacks_once_and_names_the_way_round_offline(tmp_path, monkeypatch):
    import zipfile
    import huggingface_hub
    fetched = []

    def hub(repo, repo_type, local_dir):  # the stub hub: the training data's three files
        fetched.append((repo, repo_type))
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / "nextqa_0-30s.jsonl").write_text("{}\n")
        with zipfile.ZipFile(Path(local_dir) / "NextQA.zip", "w") as z:
            z.writestr("NextQA/NExTVideo/0/1.mp4", b"clip")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub)
    folder = data.download("train", tmp_path)
    assert fetched == [("Zhang199/TinyLLaVA-Video-R1-training-data", "dataset")] and folder == tmp_path / "train"
    assert (folder / "NextQA/NExTVideo/0/1.mp4").read_bytes() == b"clip"
    (folder / "NextQA/NExTVideo/0/1.mp4").unlink()
    data.download("train", tmp_path)                                   # unpacked once: the marker says so
    assert not (folder / "NextQA/NExTVideo/0/1.mp4").exists()

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(data.UserError, match=r"cannot download OpenGVLab/MVBench \(OSError: no network\).*"
                                             r"`hf download OpenGVLab/MVBench --repo-type dataset --local-dir mvbench`"):
        data.download("mvbench", tmp_path)


def test_the_paper_recipe_is_the_default(setup, tmp_path):
    """`torchrun --nproc_per_node 2 train.py` and `python train.py --stage sft` on a miniature of the
    released training data (its file names and layout), with only --init pointed at a tiny checkpoint."""
    d, init = setup
    r = command([], nproc=2, cwd=tmp_path)                 # no data yet: one line naming the download
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "data/train/nextqa_0-30s.jsonl: no such data file" in errors[0]
    assert "python data.py download --what train --root data" in errors[0]
    train_dir = tmp_path / "data/train"
    (train_dir / "NextQA/NExTVideo/0").mkdir(parents=True)
    rows = []
    for i, line in enumerate((d / "train.jsonl").read_text().splitlines()):
        rec = json.loads(line)
        (train_dir / f"NextQA/NExTVideo/0/{i}.mp4").write_bytes((d / rec["video_filename"]).read_bytes())
        rows.append(json.dumps(dict(rec, video_filename=f"./NextQA/NExTVideo/0/{i}.mp4")))
    (train_dir / "nextqa_0-30s.jsonl").write_text("\n".join(rows) + "\n")
    cold = json.loads((d / "coldstart.json").read_text())
    for rec in cold:
        rec["video"] = f"./NextQA/NExTVideo/0/{int(rec['video'].split('_')[-1][:5])}.mp4"
    (train_dir / "nextqa-coldstart-16.json").write_text(json.dumps(cold))
    sharded = ["--fsdp", "--grad-checkpointing"]           # as the README runs them on 40 GB cards
    r = command(["--stage", "sft", "--init", str(init), "--max-steps", "1"] + sharded, nproc=2, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(tmp_path / "runs/coldstart/final/train_state.pt", weights_only=False)["args"]
    assert (state["lr"], state["schedule"], state["batch_size"]) == (1e-5, "constant", 2)  # 4 over 2 ranks
    r = command(["--init", str(tmp_path / "runs/coldstart/final"), "--max-steps", "2", "--max-new-tokens", "16",
                 "--sample-every", "2"] + sharded, nproc=2, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(tmp_path / "runs/r1/final/train_state.pt", weights_only=False)["args"]
    assert (state["G"], state["lr"], state["beta"], state["data"]) == (8, 1e-6, 0.01, "data/train/nextqa_0-30s.jsonl")
    saved = [json.loads(l) for l in (tmp_path / "runs/r1/completions.jsonl").read_text().splitlines()]
    assert len(saved) == 2 * 8 and {c["step"] for c in saved} == {2}        # both ranks' prompts, G = 8 each
    r = command(["plot", "runs/r1"], cwd=tmp_path)
    assert r.returncode == 0 and "runs/r1/curves.csv" in r.stdout, r.stderr[-3000:]
    assert "completions/mean_length" in (tmp_path / "runs/r1/curves.csv").read_text().splitlines()[0]
