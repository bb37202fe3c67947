"""The whole shapes pipeline, a few steps of each stage (the CI's smoke version of `train.py shapes`)."""

import json

import pytest
import torch

import data
import evaluate
import train


def test_shapes_pipeline_smoke(tmp_path, capsys):
    out = tmp_path / "shapes"
    res = train.shapes_pipeline(["--out", str(out), "--smoke"])
    names = [r["name"] for r in res["results"]]
    assert names == ["TinyLLaVA-Video-SFT (base)", "TinyLLaVA-Video-ColdStart", "TinyLLaVA-Video-R1 (r1)"]
    assert [r["mode"] for r in res["results"]] == ["option", "reason", "reason"]
    for r in res["results"]:  # each accuracy is the hand count of its items
        items = r["items"]
        assert len(items) == 5 and r["summary"]["score"] == 100 * sum(i["correct"] for i in items) / 5
    printed = capsys.readouterr().out
    assert "| Model | Answer Type | shapes / NextQA-format |" in printed
    problems = {str(k): json.loads(l)["problem"] for k, l in enumerate((out / "data/test.jsonl").read_text().splitlines())}
    for r in res["results"][1:]:  # the Reason-mode rows: does the letter follow from the thought?
        assert r["thoughts"] == dict(evaluate.thought_agreement(r["items"], problems), padded=evaluate.padded(r["items"]))
        assert f"{r['name']}: the thought names an option in {r['thoughts']['stated']:.0f}%" in printed
    r1, cold, base = (r["items"] for r in res["results"][::-1])
    assert res["comparisons"] == {"grpo": evaluate.grpo_trend(out / "r1"),
                                  "R1 - cold start": evaluate.paired_comparison(r1, cold),
                                  "R1 - base": evaluate.paired_comparison(r1, base)}
    assert f"R1 - base: {res['comparisons']['R1 - base']['diff']:+.1f} points" in printed
    curves = (out / "r1/curves.csv").read_text().splitlines()
    header = curves[0].split(",")
    assert {"step", "completions/mean_length", "rewards/accuracy/mean", "rewards/format/mean"} <= set(header)
    assert len(curves) == 3 and all(len(c.split(",")) == len(header) for c in curves)
    # the base stage in three parts, each from the one before; the base evaluated is the last
    args = lambda part: torch.load(out / part / "final/train_state.pt", weights_only=False)["args"]
    assert args("base-direction")["init"] == str(out / "base/final")
    assert args("base-direction")["data"].endswith("sft-direction.json") and args("base-direction")["rehearse"].endswith("sft.json")
    assert args("base-all")["init"] == str(out / "base-direction/final")
    assert args("base-all")["data"].endswith("sft-direction-all.json")
    assert args("coldstart")["init"] == str(out / "base-all/final") and res["results"][0]["model"].endswith("base-all/final")
    # an ablation re-runs only GRPO and its evaluation, on the same base and cold start
    stamp = (out / "base-all/final/model.safetensors").stat().st_mtime
    res = train.shapes_pipeline(["--out", str(out), "--smoke", "--beta", "0", "--loss-type", "dr_grpo"])
    assert (out / "base-all/final/model.safetensors").stat().st_mtime == stamp
    assert res["results"][2]["name"] == "TinyLLaVA-Video-R1 (r1-nokl-drgrpo)" and "GRPO (r1-nokl-drgrpo)" in res["times"]
    assert (out / "r1-nokl-drgrpo/final/train_state.pt").exists()
    # the default cold start rehearses the base stage's records; --no-rehearsal is its own cold start
    assert torch.load(out / "coldstart/final/train_state.pt", weights_only=False)["args"]["rehearse"].endswith("sft.json")
    res = train.shapes_pipeline(["--out", str(out), "--smoke", "--no-rehearsal"])
    assert [r["name"] for r in res["results"][1:]] == ["TinyLLaVA-Video-ColdStart", "TinyLLaVA-Video-R1 (r1-norehearsal)"]
    assert res["results"][1]["model"].endswith("coldstart-norehearsal/final")
    assert torch.load(out / "coldstart-norehearsal/final/train_state.pt", weights_only=False)["args"]["rehearse"] is None
    for records in ("sft-direction.json", "sft-direction-all.json"):  # a folder that an older data.py wrote
        (out / "data" / records).rename(out / "data/away.json")
        with pytest.raises(ValueError, match=f"lacks {records} \\(an older data.py wrote it\\): choose another folder"):
            train.shapes_pipeline(["--out", str(out), "--smoke"])
        (out / "data/away.json").rename(out / "data" / records)
    assert [len(r["conversations"]) for r in json.loads((out / "data/sft.json").read_text())] == [2, 4, 2] * 20


def test_a_data_folder_of_other_settings_is_refused(tmp_path):
    data_dir = tmp_path / "shapes/data"
    data_dir.mkdir(parents=True)
    (data_dir / "train.jsonl").write_text("{}\n")                      # a folder of another task
    with pytest.raises(data.UserError, match="holds no shapes data set, not the shapes data of"):
        train.shapes_pipeline(["--out", str(tmp_path / "shapes"), "--smoke"])
    assert (data_dir / "train.jsonl").read_text() == "{}\n"             # left as it was
    data.generate_shapes(tmp_path / "s", n_train=20, n_test=5, seed=0, workers=1)
    with pytest.raises(data.UserError, match=r"holds \{'train': 20, 'test': 5, 'seed': 0\}, not .*'seed': 1"):
        data.generate_shapes(tmp_path / "s", n_train=20, n_test=5, seed=1, workers=1)
