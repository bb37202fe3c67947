"""
Train TinyLLaVA-Video-R1 (paper s4.1): cold-start SFT, then GRPO with the rule rewards.

    python data.py download --what train   # the released training data, into data/train/
    python train.py --stage sft             # the cold start from the released base model -> runs/coldstart
    torchrun --nproc_per_node 8 train.py    # GRPO from the released cold start, 8 GPUs x 1 prompt -> runs/r1
    python train.py plot runs/r1            # curves.csv (+ curves.png with matplotlib) from metrics.jsonl
    python train.py shapes                  # the whole pipeline on the synthetic shapes task, CPU, minutes

Logs: metrics.jsonl, a row a step under TRL's GRPOTrainer names (grpo_log_row), and every
--sample-every steps all the step's completions with their rewards in completions.jsonl.

Read top to bottom. A GRPO step runs each prompt's frozen vision tower once, samples G = 8 completions
with the unwrapped model, scores them (rewards.py), turns rewards into group advantages (grpo.py, eq. 2)
and back-propagates the loss of eq. (1) in micro-batches; then the ranks average gradients and AdamW steps.

Data parallel, by hand: every rank holds the whole model (or, with --fsdp, a shard of it: torch's
FSDP2), takes a disjoint slice of each global batch, and every loss is normalised so that the mean of
the ranks' gradients is the gradient of the one big batch (grpo.py's docstring). All randomness (data
order, sampling, advantage noise, T-GRPO's shuffles) is a function of (seed, step, prompt index), so a
resumed run repeats an uninterrupted one and the same global batch gives the same update on 1 or 8 ranks.

Departures from the reference code:
1. Reward: eq. (4) as the paper writes it (--reference-reward for the code's formula).
2. A sample whose video cannot be decoded is skipped (its group gets zero weight) and counted; the
   reference substitutes another video.
3. fp32 master weights with bf16 autocast (the reference's bf16 weights cannot hold lr-1e-6 updates).
"""
import argparse
import copy
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data
import grpo
import model as M
import rewards

# -----------------------------------------------------------------------------
# Flags. Defaults are the paper's recipe (s4.1; the reference scripts for what it leaves out): the flags
# left unset take their stage's values below; the data lies where `python data.py download` puts it.

RECIPE = {  # cold start: 16 samples, 4 GPUs x 1, lr 1e-5 constant; GRPO: 8 GPUs x 1 prompt, lr 1e-6
    "sft": dict(init=data.CHECKPOINTS["base"], data=data.TRAIN_FILES["sft"], out="runs/coldstart", lr=1e-5,
                schedule="constant", warmup=0.0, batch_size=4),  # batch_size: global, split over the ranks
    "grpo": dict(init=data.CHECKPOINTS["coldstart"], data=data.TRAIN_FILES["grpo"], out="runs/r1", lr=1e-6,
                 schedule="cosine", warmup=0.03, batch_size=1)}


def parser():
    p = data.Parser(prog="train.py", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--stage", choices=["sft", "grpo"], default="grpo", help="cold-start SFT or GRPO")
    g.add_argument("--init", help="checkpoint folder or hub id; 'tiny' = a new tiny model (default: RECIPE)")
    g.add_argument("--data", help="grpo: NextQA-format jsonl; sft: LLaVA-format json (default: RECIPE)")
    g.add_argument("--video-root", default=None, help="videos are relative to this (default: --data's dir)")
    g.add_argument("--out", help="run folder: metrics.jsonl, checkpoints (default: RECIPE)")
    g.add_argument("--resume", default=None, help="a checkpoint folder of this run to continue from")
    g.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    g = p.add_argument_group("GRPO (paper s3.2, s4.3.3; the reference's sampling settings)")
    g.add_argument("--G", type=int, default=8, help="completions per prompt (the group)")
    g.add_argument("--prompts-per-rank", type=int, default=1, help="prompts per rank per optimizer step")
    g.add_argument("--max-new-tokens", type=int, default=512, help="completion length cap, tokens")
    g.add_argument("--temperature", type=float, default=1.0, help="rollout sampling temperature")
    g.add_argument("--top-k", type=int, default=50, help="rollout top-k (0 = off)")
    g.add_argument("--top-p", type=float, default=1.0, help="rollout nucleus mass (1 = off)")
    g.add_argument("--beta", type=float, default=0.01, help="KL weight; 0 = no reference model (s4.3.3)")
    g.add_argument("--clip-eps", type=float, default=0.2, help="epsilon of eq. (1)'s clip")
    g.add_argument("--num-iterations", type=int, default=1, help="updates per rollout (>1: the clip binds)")
    g.add_argument("--loss-type", choices=["grpo", "dr_grpo"], default="grpo",
                   help="dr_grpo: no 1/|o_i| and no std division (s4.3.3)")
    g.add_argument("--noise-std", type=float, default=0.02, help="advantage noise (paper s3.2); 0 = off")
    g.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    g = p.add_argument_group("rewards (paper s3.4, Figure 5; Video-R1's T-GRPO)")
    g.add_argument("--no-length-reward", action="store_true", help="Figure 5: fixed format reward")
    g.add_argument("--no-wrong-penalty", action="store_true", help="Figure 5: R = AR + FR")
    g.add_argument("--reference-reward", action="store_true", help="the reference code's reward formula")
    g.add_argument("--ml", type=int, default=rewards.ML, help="ML of eq. (3), characters")
    g.add_argument("--tgrpo", action="store_true", help="T-GRPO: G/2 extra completions on shuffled frames")
    g.add_argument("--tgrpo-alpha", type=float, default=0.3, help="T-GRPO's bonus for a right answer")
    g.add_argument("--tgrpo-mu", type=float, default=1.0, help="bonus paid when p >= mu * p_shuffled")
    g = p.add_argument_group("optimisation")
    g.add_argument("--lr", type=float, help="peak learning rate (default: RECIPE; paper s4.1)")
    g.add_argument("--schedule", choices=["cosine", "constant"], help="after the warmup (default: RECIPE)")
    g.add_argument("--warmup", type=float, help="linear warmup, fraction of the steps (default: RECIPE)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm")
    g.add_argument("--epochs", type=int, default=1, help="passes over --data")
    g.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: the epochs)")
    g.add_argument("--batch-size", type=int, help="sft: samples per rank per step (default: RECIPE / ranks)")
    g.add_argument("--rehearse", default=None,
                   help="sft: the previous stage's LLaVA json, mixed in by data.rehearsal_mix")
    g.add_argument("--rehearse-ratio", type=float, default=2, help="rehearsed records per --data sample")
    g.add_argument("--num-frames", type=int, default=16, help="frames per clip (16 in every stage)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in the backward")
    g.add_argument("--train-vision", action="store_true",
                   help="sft: also train the vision tower (a tiny model from scratch; the paper's is frozen)")
    g.add_argument("--fsdp", action="store_true", help="shard params, grads and optimizer state (FSDP2)")
    g.add_argument("--seed", type=int, default=0, help="data order, sampling, noise, a new model's init")
    g = p.add_argument_group("logs and checkpoints")
    g.add_argument("--sample-every", type=int, default=10, help="every N steps: print one completion, "
                   "save all to completions.jsonl")
    g.add_argument("--save-every", type=int, default=100, help="a resumable checkpoint every N steps")
    g.add_argument("--keep-last", type=int, default=2, help="resumable step-* checkpoints kept (0: all)")
    g.add_argument("--video-gain-every", type=int, default=25,
                   help="sft: every N steps log video_gain (is the model reading the video? 0 = never)")
    g.add_argument("--max-bad-fraction", type=float, default=0.05, help="stop when more videos fail")
    g.add_argument("--wandb", default=None, help="a wandb project name (needs wandb installed)")
    g.add_argument("--keep-videos-in-memory", action="store_true",
                   help="decode each clip once (small data sets: the shapes task)")
    g.add_argument("--quiet", action="store_true", help="no per-step log lines")
    return p


def check(args):
    """Fills the unset flags from RECIPE. Raises UserError for settings that cannot go together, and for
    a missing data file (naming the command that downloads the paper's)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    for k, v in RECIPE[args.stage].items():
        if getattr(args, k) is None:
            setattr(args, k, max(1, v // world) if k == "batch_size" else v)
    if not Path(args.data).exists():
        raise data.UserError(f"{args.data}: no such data file. {data.DOWNLOAD_HINT}")
    if args.rehearse and args.stage != "sft":
        raise data.UserError("--rehearse is for the sft stage (a cold start)")
    if args.train_vision and args.stage != "sft":
        raise data.UserError("--train-vision is for the sft stage: GRPO shares one tower pass among policy, "
                             "old policy and reference model, which needs a frozen tower")
    return args


def get_args(argv=None):
    return check(parser().parse_args(argv))


def settings(**overrides):
    """The flags' defaults with `overrides`, as get_args returns them (data.Parser.settings): how the
    shapes pipeline calls train(). Raises TypeError for a name that is not a flag, UserError as check."""
    return check(parser().settings(**overrides))


# -----------------------------------------------------------------------------
# Distributed helpers (shared with evaluate.py)

def dist_init():
    """RANK / WORLD_SIZE / LOCAL_RANK from torchrun; NCCL on CUDA, gloo on CPU.
    Returns (rank, world, device); (0, 1, the one device) without torchrun."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return rank, world, torch.device("cuda", local)
    dist.init_process_group("gloo")
    return rank, world, torch.device("cpu")


def master_process():  # rank 0 writes the logs and checkpoints
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args):
    if master_process():
        print(*args, flush=True)


def barrier():
    if dist.is_initialized():
        dist.barrier()


def all_sum(values, device):
    """Sum a list of floats over ranks (logging and counts). Returns a list of floats."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def average_gradients(params, world):
    # Plain data parallel: the mean over ranks of each gradient (one all-reduce per tensor).
    if world == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world


def seeded(*key, device="cpu"):
    """A torch.Generator on `device` whose state is a function of the key (seed, step, prompt index, ...)."""
    return torch.Generator(device).manual_seed(int(hashlib.sha256(repr(key).encode()).hexdigest()[:15], 16))


def autocast(device):
    # bf16 compute on CUDA over fp32 master weights; plain fp32 on CPU.
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# -----------------------------------------------------------------------------
# One GRPO step, in call order: rollouts -> rewards -> advantages -> reference log-probs -> loss, backward

def rollouts(model, prompts, feats, G, keys, name, sampling):
    """1. Sample G completions for each prompt (model.sample: all prompts decode together). Prompt b
    draws from its own generator, seeded by keys[b] (seed, step, its place in the global batch), so its
    completions do not depend on the number of ranks.
    Args: prompts: B long (P_b,); feats: B float (T, P, Dv) vision features; sampling: model.sample's
        keyword arguments (max_new_tokens, temperature, top_k, top_p, eos_id).
    Returns: one (ids long (G, L_b), mask long (G, L_b)) per prompt, each cut to its longest completion."""
    if not prompts:
        return []
    videos = model.connect(feats)                                                # (B, Q, D)
    ids, mask = M.sample(model, prompts, videos, G=G, **sampling,
                         generators=[seeded(*k, name, device=videos.device) for k in keys])
    groups = []
    for ids_b, mask_b in zip(ids.split(G), mask.split(G)):
        L = int(mask_b.sum(1).max())
        groups.append((ids_b[:, :L], mask_b[:, :L]))
    return groups


def score(texts, answer, letters, reward_fn):
    """2. The reward of each completion and its parts (rewards.reward, eq. 4, or the reference's).
    Returns three float32 tensors (G,): R, AR, FR."""
    parts = [reward_fn(t, answer, options=letters) for t in texts]
    return tuple(torch.tensor([p[k] for p in parts]) for k in range(3))


def temporal_bonus(tok, shuffled, acc, answer, letters, alpha, mu):
    """2b. T-GRPO (Video-R1): +alpha for each right ordered completion when the ordered group beats the
    shuffled one (rewards.temporal_bonus). shuffled: (ids, mask) of the G/2 completions on shuffled frames.
    Returns float32 (G,)."""
    texts = M.decode_completions(tok, *shuffled)
    shuffled_acc = [rewards.accuracy_reward(t, answer, options=letters) for t in texts]
    return torch.tensor(rewards.temporal_bonus(acc.tolist(), shuffled_acc, alpha, mu))


def reference_logprobs(model, ref_model, prompt, feats, ids, need_old):
    """4. Per-token log-probs (G, L) of the completions under the reference model (None without one) and
    under the sampling policy (None when each rollout gets one update: then old = logp.detach())."""
    with torch.no_grad():
        ref = old = None
        if ref_model is not None:
            ref = ref_model.completion_logprobs(prompt, ref_model.connect([feats])[0], ids)
        if need_old:
            old = model.completion_logprobs(prompt, model.connect([feats])[0], ids)
    return ref, old


def backward(model, group, n_sequences, micro_batch, loss_kw, device):
    """5. Backward of eq. (1) for one group, in micro-batches of `micro_batch` completions. The loss is
    normalised by n_sequences (the scored sequences of all ranks / the number of ranks), so summing the
    micro-batches and averaging the ranks' gradients gives the mean over the scored sequences; the
    connector re-runs per micro-batch on the group's stored vision features.
    loss_kw: grpo.grpo_loss's settings. Returns the summed loss (float) and grpo_loss's metrics list."""
    total, stats = 0.0, []
    for lo in range(0, len(group["ids"]), micro_batch):
        sl = slice(lo, lo + micro_batch)
        with autocast(device):
            video = model.connect([group["feats"]])[0]                         # (Q, D), with grad
            logp, entropy = model.completion_logprobs(group["prompt"], video, group["ids"][sl], entropy=True)
        old = logp.detach() if group["old_logp"] is None else group["old_logp"][sl]
        ref = None if group["ref_logp"] is None else group["ref_logp"][sl]
        mask = group["mask"][sl]
        loss, m = grpo.grpo_loss(logp, old, ref, group["adv"][sl], mask, num_sequences=n_sequences, **loss_kw)
        m["entropy"] = float((entropy * mask).sum() / mask.sum().clamp(min=1))  # per completion token
        (loss * group["weight"]).backward()
        total += loss.item() * group["weight"]
        stats.append(m)
    return total, stats


def make_groups(model, ref_model, tok, samples, pixels, keys, args, device):
    """Steps 1-4 for this rank's prompts: one dict per prompt with its tensors (prompt, feats, ids, mask,
    adv, ref_logp, old_logp), its weight and its metrics. A prompt whose video failed (pixels None)
    gets a zero-weight group on a blank video, one eos per row: the same passes, no gradient, so ranks
    stay in step."""
    chats = [data.chat_prompt(data.build_question(s.question, "reason")) for s in samples]
    prompts = [torch.tensor(data.tokenize_prompt(tok, c), device=device) for c in chats]
    S, eos = model.cfg.image_size, tok.eos_token_id
    blank = torch.zeros(args.num_frames, 3, S, S)
    live = [i for i, px in enumerate(pixels) if px is not None]
    reward_of = rewards.setting(args.reference_reward, not args.no_length_reward, not args.no_wrong_penalty,
                                args.ml)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, eos_id=eos)
    with torch.no_grad(), autocast(device), M.Gathered(model):
        # the frozen tower, once per video: rollouts, old, reference and backward all reuse it
        feats = [model.vision_features((blank if px is None else px).to(device)) for px in pixels]
        live_keys = [keys[i] for i in live]
        drawn = dict(zip(live, rollouts(model, [prompts[i] for i in live], [feats[i] for i in live], args.G,
                                        live_keys, "sample", sampling)))
        shuffled = {}
        if args.tgrpo:  # Video-R1: G/2 completions on shuffled frames, no gradient through them
            perms = [torch.randperm(len(feats[i]), generator=seeded(*k, "shuffle")).to(device)
                     for i, k in zip(live, live_keys)]
            shuffled = dict(zip(live, rollouts(model, [prompts[i] for i in live],
                                               [feats[i][p] for i, p in zip(live, perms)], args.G // 2,
                                               live_keys, "sample-shuffled", sampling)))
    groups = []
    for i, sample in enumerate(samples):
        group = dict(prompt=prompts[i], feats=feats[i], weight=0.0, metrics=None, old_logp=None)
        if i not in drawn:
            ids = torch.full((args.G, 1), eos, device=device)
            group.update(ids=ids, mask=torch.ones_like(ids), adv=torch.zeros(args.G, device=device),
                         ref_logp=torch.zeros(ids.shape, device=device))
            groups.append(group)
            continue
        ids, mask = drawn[i]
        letters = data.option_letters(sample.question)
        texts = M.decode_completions(tok, ids, mask)
        r, acc, fmt = score(texts, sample.answer, letters, reward_of)                  # 2. rewards
        bonus = torch.zeros(args.G)
        if i in shuffled:
            bonus = temporal_bonus(tok, shuffled[i], acc, sample.answer, letters, args.tgrpo_alpha,
                                   args.tgrpo_mu)
        total = r + bonus
        adv = grpo.group_advantages(total, args.G, scale_by_std=args.loss_type == "grpo",   # 3. advantages
                                    noise_std=args.noise_std, generator=seeded(*keys[i], "noise"))
        with autocast(device):
            ref, old = reference_logprobs(model, ref_model, prompts[i], feats[i], ids,  # 4.
                                          args.num_iterations > 1)
        group.update(ids=ids, mask=mask, adv=adv.to(device), weight=1.0, ref_logp=ref, old_logp=old)
        group["metrics"] = dict(reward=total.tolist(), acc=acc.tolist(), fmt=fmt.tolist(),
                                length=mask.sum(1).float().tolist(), bonus=bonus.tolist(),
                                clipped=(~((ids == eos) & mask.bool()).any(1)).tolist(),
                                well_formed=(fmt > 0).tolist(),  # FR > 0 exactly when the format rule holds
                                think_chars=[rewards.think_length(t) for t in texts],
                                texts=texts, answer=sample.answer)
        groups.append(group)
    return groups


def grpo_step(model, ref_model, tok, samples, pixels, keys, args, device, update):
    """One GRPO step on this rank's prompts: make_groups (rollouts, rewards, advantages, reference
    log-probs), then the backward passes of eq. (1); with --num-iterations k, k updates on the same
    rollouts (all but the last made here, by `update`). Returns the step's log row (summed over ranks)."""
    t0 = time.time()
    groups = make_groups(model, ref_model, tok, samples, pixels, keys, args, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: wait before reading the clock
    sec_rollout = time.time() - t0  # sampling and the reference model's log-probs
    loss_kw = dict(clip_eps=args.clip_eps, beta=args.beta, loss_type=args.loss_type,
                   max_len=args.max_new_tokens)
    # eq. (1)'s mean over the scored sequences of all ranks (a skipped prompt's group has weight 0); the
    # ranks' gradients are then averaged, hence the / world
    scored = all_sum([sum(g["weight"] for g in groups)], device)[0]
    n_sequences = max(scored, 1) * args.G / (dist.get_world_size() if dist.is_initialized() else 1)
    stats = []
    for it in range(args.num_iterations):
        for g in groups:
            _, st = backward(model, g, n_sequences, args.micro_batch, loss_kw, device)
            stats += st if g["weight"] else []
        if it < args.num_iterations - 1:  # the extra updates of a reused rollout
            update()
    return grpo_log_row([g["metrics"] for g in groups], stats, sec_rollout, args.tgrpo, device)


def grpo_log_row(metrics, stats, sec_rollout, tgrpo, device):
    """The step's means over all ranks' completions (None in `metrics` = a skipped prompt), under TRL's
    GRPOTrainer names: reward, reward_std (the mean over groups of each group's unbiased std),
    frac_reward_zero_std (groups whose G rewards are equal: no advantage, no gradient but the KL's),
    rewards/<part>/mean, completions/mean_length (tokens), completions/clipped_ratio (no eos within
    --max-new-tokens), kl, clip_ratio, entropy (nats per completion token). Ours: well_formed (FR > 0),
    think_length (Len of eq. 3, characters, well-formed completions only), rewards/temporal/mean (with
    T-GRPO: alpha x the fraction that earned the bonus), skipped, sec_rollout."""
    ms = [m for m in metrics if m]
    flat = lambda k: [v for m in ms for v in m[k]]
    think = [c for c, ok in zip(flat("think_chars"), flat("well_formed")) if ok]
    group_std = [torch.tensor(m["reward"]).std().item() for m in ms]
    # the sums over this rank's groups, then over all ranks (all_sum): each row value is a ratio of two
    sums = {"reward": flat("reward"), "acc": flat("acc"), "fmt": flat("fmt"), "length": flat("length"),
            "clipped": flat("clipped"), "bonus": flat("bonus"), "ok": flat("well_formed"), "think": think,
            "std": group_std, "zero_std": [s == 0 for s in group_std],
            "skipped": [m is None for m in metrics],
            **{k: [s[k] for s in stats] for k in ("kl", "clip_ratio", "entropy")}}
    counts = {"n": len(flat("reward")), "groups": len(ms), "stats": len(stats)}
    t = dict(zip([*sums, *counts], all_sum([sum(v) for v in sums.values()] + list(counts.values()), device)))
    n, groups, n_stats = (max(t[k], 1) for k in ("n", "groups", "stats"))
    row = {"reward": t["reward"] / n, "reward_std": t["std"] / groups,
           "frac_reward_zero_std": t["zero_std"] / groups,
           "rewards/accuracy/mean": t["acc"] / n, "rewards/format/mean": t["fmt"] / n,
           "completions/mean_length": t["length"] / n, "completions/clipped_ratio": t["clipped"] / n,
           "kl": t["kl"] / n_stats, "clip_ratio": t["clip_ratio"] / n_stats,
           "entropy": t["entropy"] / n_stats,
           "well_formed": t["ok"] / n, "think_length": t["think"] / max(t["ok"], 1),
           "skipped": int(t["skipped"]), "sec_rollout": sec_rollout}
    if tgrpo:
        row["rewards/temporal/mean"] = t["bonus"] / n
    if ms:
        row["sample"] = (ms[0]["texts"][0], ms[0]["reward"][0], ms[0]["answer"])
    row["groups"] = metrics  # this rank's, for completions.jsonl
    return row


def save_completions(path, step, prompt_ids, metrics):
    """Append every completion of the step, from all ranks, to completions.jsonl (rank 0 writes): one
    line per completion with the step, the prompt's id (its record's index in --data), the text and its
    rewards (total of eq. 4, accuracy AR, format FR). metrics: this rank's groups (grpo_log_row)."""
    rows = [dict(step=step, prompt_id=i, completion=t, reward=r, accuracy=a, format=f)
            for i, m in zip(prompt_ids, metrics) if m
            for t, r, a, f in zip(m["texts"], m["reward"], m["acc"], m["fmt"])]
    if dist.is_initialized():
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, rows)
        rows = [r for part in parts for r in part]
    if master_process():
        with open(path, "a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)


# -----------------------------------------------------------------------------
# One SFT step (the cold start, and the tiny model's base stage)

def sft_losses(model, tok, samples, pixels, device):
    """Summed cross-entropy of each sample's answer tokens, in one right-padded forward, each row with
    its own video.
    Args: samples: B data.Sample with targets; pixels: B float (T, 3, S, S) in [-1, 1], or None for a
        video that failed (a blank frame stands in; the caller gives it weight 0).
    Returns: (ce float32 (B,) in nats, summed over each row's answer tokens; answer tokens long (B,))."""
    rows = [data.sft_tensors(tok, s, device) for s in samples]
    S = model.cfg.image_size
    pixels = [torch.zeros(1, 3, S, S) if p is None else p for p in pixels]
    n = max(len(ids) for ids, _ in rows)
    ids = torch.stack([F.pad(i, (0, n - len(i))) for i, _ in rows])                         # (B, n)
    labels = torch.stack([F.pad(l, (0, n - len(l)), value=data.IGNORE_INDEX) for _, l in rows])  # (B, n)
    mask = torch.stack([(torch.arange(n, device=device) < len(i)).long() for i, _ in rows])
    with autocast(device):
        videos = model.encode_videos([p.to(device) for p in pixels])                        # (B, Q, D)
        logits, labels = model(ids, mask, videos, labels)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                         ignore_index=data.IGNORE_INDEX, reduction="none").view(len(rows), -1)   # (B, n' - 1)
    return ce.sum(1), (labels[:, 1:] != data.IGNORE_INDEX).sum(1)


def sft_backward(model, tok, samples, pixels, device, world):
    """Cross-entropy on answer tokens of a batch, normalised by the GLOBAL number of answer tokens
    (times world, since gradients are then averaged over ranks). A sample whose video failed gets
    weight 0. Returns (mean loss, local answer tokens)."""
    ce, n_tok = sft_losses(model, tok, samples, pixels, device)
    weights = torch.tensor([0.0 if p is None else 1.0 for p in pixels], device=device)
    n_local = float((n_tok * weights).sum())
    n_global = all_sum([n_local], device)[0]
    ce = (ce * weights).sum()
    (ce * world / max(n_global, 1)).backward()
    return ce.item() / max(n_global, 1), n_local


@torch.no_grad()
def video_gain(model, tok, samples, pixels, device):
    """Is the model reading the video? A diagnostic of ours, not the paper's: the answer loss of this
    batch with each sample given the NEXT sample's video, minus the loss with its own.
    ~0 while the model answers from the text alone (the plateau a model trained from scratch starts
    on); it grows as the model learns to read the clips.
    Args: as sft_losses; samples whose pixels are None are left out.
    Returns: (sum over this rank's samples of the loss difference in nats, their answer tokens), two
        floats, so that ranks can be summed before dividing; (0.0, 0.0) with fewer than two videos."""
    ok = [i for i, p in enumerate(pixels) if p is not None]
    if len(ok) < 2:
        return 0.0, 0.0
    samples, pixels = [samples[i] for i in ok], [pixels[i] for i in ok]
    own, n_tok = sft_losses(model, tok, samples, pixels, device)
    other, _ = sft_losses(model, tok, samples, pixels[1:] + pixels[:1], device)
    return float((other - own).sum()), float(n_tok.sum())


def sft_step(model, tok, samples, pixels, device, world, with_video_gain):
    """One SFT step's backward and log row. The video gain, when asked for, is measured before the
    backward, on the same parameters (under FSDP a forward between backward and step would not be)."""
    row = {}
    if with_video_gain:
        gain, n_gain = all_sum(video_gain(model, tok, samples, pixels, device), device)
        if n_gain:  # not with one sample per rank: there is no other video to swap in
            row["video_gain"] = gain / n_gain
    loss, n_tok = sft_backward(model, tok, samples, pixels, device, world)
    loss, n_tok, skipped = all_sum([loss, n_tok, sum(p is None for p in pixels)], device)
    return {"loss": loss, "tokens": int(n_tok), "skipped": int(skipped), **row}


# -----------------------------------------------------------------------------
# Checkpoints

def save_checkpoint(path, model, tok, optimizer, step, args):
    """model.py's layout (fp32 weights) + train_state.pt (optimizer, step, args), atomically; only the
    --keep-last newest step-* folders stay. The final one is also exported as final-bf16/, the released
    layout without optimizer state. Every rank must call it (FSDP gathers); rank 0 writes."""
    state, opt_state = M.full_state(model, optimizer)
    if master_process():
        extra = {"train_state.pt": {"optimizer": opt_state, "step": step, "args": vars(args)}}
        M.save_pretrained(model, path, tok, state=state, extra=extra)
        if path.name == "final":
            M.save_pretrained(model, path.with_name("final-bf16"), tok, dtype=torch.bfloat16, state=state)
        for old in sorted(path.parent.glob("step-*[0-9]"))[:-args.keep_last] if args.keep_last else []:
            shutil.rmtree(old)
        print(f"saved {path}", flush=True)
    barrier()


# -----------------------------------------------------------------------------
# Setting up a run: model, reference model, optimizer, data

def build_model(init, data_file, out, seed, device):
    """Returns (model, tokenizer). init 'tiny' builds a new tiny model whose tokenizer is trained on the
    texts of the data file's folder (data.tokenizer_texts; the shapes task), written to out/tokenizer."""
    if init != "tiny":
        return M.from_pretrained(init, device=device)
    tok_dir = Path(out) / "tokenizer"
    if master_process():
        tok_dir.parent.mkdir(parents=True, exist_ok=True)
        M.build_tokenizer(data.tokenizer_texts(Path(data_file).parent), tok_dir)
    barrier()
    tok = M.AutoTokenizer.from_pretrained(tok_dir)
    return M.new_tiny(tok, seed).to(device), tok


def load_models(args, out, device):
    """The policy (from --init, or --resume's checkpoint), in training mode and sharded with --fsdp; the
    reference model of the KL term (the starting checkpoint, frozen; None when beta = 0 or for SFT; a
    resumed run rebuilds it from --init, a tiny one from --seed and the run's tokenizer); the tokenizer.
    Returns (model, ref_model, tokenizer)."""
    if args.resume is None:
        model, tok = build_model(args.init, args.data, out, args.seed, device)
    else:
        model, tok = M.from_pretrained(args.resume, device=device)
    ref_model = None
    if args.stage == "grpo" and args.beta > 0:
        if not args.resume:
            ref_model = copy.deepcopy(model)
        elif args.init == "tiny":
            ref_model = M.new_tiny(tok, args.seed).to(device)
        else:
            ref_model = M.from_pretrained(args.init, device=device)[0]
        ref_model = ref_model.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
        ref_model.eval().requires_grad_(False)
    if args.grad_checkpointing:
        model.enable_grad_checkpointing()
    if args.train_vision:
        model.unfreeze_vision()
    model.train()
    if args.fsdp:
        M.shard_model(model)
    return model, ref_model, tok


def lr_at(step, total, warmup, schedule):
    """lr multiplier: linear warmup over the first `warmup` fraction of the steps, then cosine to 0
    (or constant)."""
    warm = math.ceil(warmup * total)
    if step < warm:
        return (step + 1) / warm
    if schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


# -----------------------------------------------------------------------------
# The main loop

def train(args):
    """Run one stage (args as get_args or settings returns them). Returns the final checkpoint's folder."""
    rank_, world, device = dist_init()
    out = Path(args.out)
    state = torch.load(Path(args.resume) / "train_state.pt", weights_only=False) if args.resume else None
    start = state["step"] if state else 0
    if master_process():
        M.claim_run_folder(out, start, args.resume, args.overwrite)
    barrier()
    log = (lambda *a: None) if args.quiet else print0

    model, ref_model, tok = load_models(args, out, device)
    params = [p for p in model.parameters() if p.requires_grad]  # connector + LLM; the vision tower is frozen
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))

    def update():
        """Average gradients over ranks, clip, step. Returns the gradient norm before clipping."""
        if not args.fsdp:
            average_gradients(params, world)  # FSDP has reduce-scattered them already
        norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    items, epochs = data.read_samples(args.stage, args.data, args.video_root, args.rehearse,
                                      args.rehearse_ratio, args.epochs, args.seed)
    per_rank = args.prompts_per_rank if args.stage == "grpo" else args.batch_size
    steps_per_epoch = len(items) // (per_rank * world)
    assert steps_per_epoch > 0, f"{len(items)} samples cannot fill one step of {per_rank} x {world} ranks"
    total_steps = min(steps_per_epoch * epochs, args.max_steps or steps_per_epoch * epochs)
    videos = data.VideoLoader(args.num_frames, model.cfg.image_size, args.keep_videos_in_memory, rank_)
    if state:
        M.load_optimizer(optimizer, state["optimizer"])
        log(f"resumed from {args.resume} at step {start}")
    log(M.memory_report(model, world, args.fsdp, ref_model is not None, device))
    log(f"{args.stage}: {len(items)} samples, {world} rank(s) x {per_rank} per step, {total_steps} steps")
    if args.wandb and master_process():
        import wandb
        wandb.init(project=args.wandb, config=vars(args))

    interrupted = []  # Ctrl-C, or a scheduler's SIGTERM: finish the step, save, exit on every rank
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *a: interrupted.append(True))
    t_start = time.time()
    for step in range(start, total_steps):
        t0 = time.time()
        for g in optimizer.param_groups:
            g["lr"] = args.lr * lr_at(step, total_steps, args.warmup, args.schedule)
        idx, global_idx = data.batch_indices(len(items), step, per_rank, rank_, world, args.seed)
        samples = [items[i] for i in idx]
        pixels = [videos(s.video) for s in samples]
        seen, bad = all_sum([videos.seen, len(videos.bad)], device)  # the run's totals, over all ranks
        data.check_bad_videos(bad, seen, args.max_bad_fraction, videos.bad)
        if args.stage == "grpo":
            keys = [(args.seed, step, gi) for gi in global_idx]
            row = grpo_step(model, ref_model, tok, samples, pixels, keys, args, device, update)
        else:
            gain = args.video_gain_every and (step + 1) % args.video_gain_every == 0
            row = sft_step(model, tok, samples, pixels, device, world, gain)
        row.update(step=step + 1, lr=optimizer.param_groups[0]["lr"], grad_norm=update(),
                   sec=time.time() - t0, skipped_total=int(bad))
        if device.type == "cuda":  # this rank's peak since the start: parameters, optimizer, activations
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        eta = (time.time() - t_start) / (step + 1 - start) * (total_steps - step - 1)
        show_sample = (step + 1) % args.sample_every == 0
        if "groups" in row and show_sample:
            save_completions(out / "completions.jsonl", step + 1, idx, row["groups"])
        row.pop("groups", None)
        log_step(out / "metrics.jsonl", row, total_steps, eta, args.wandb, log, show_sample)
        stop = all_sum([len(interrupted)], device)[0] > 0  # one rank signalled: all save this step
        if (step + 1) % args.save_every == 0 or stop or step + 1 == total_steps:
            name = "final" if step + 1 == total_steps else f"step-{step + 1:06d}"
            save_checkpoint(out / name, model, tok, optimizer, step + 1, args)
        if stop:
            log("interrupted: checkpoint saved, exiting")
            break
    if args.wandb and master_process():
        import wandb
        wandb.finish()
    if dist.is_initialized():
        dist.destroy_process_group()
    return out / "final"


def log_step(path, row, total, eta, wandb_project, log, show_sample):
    """The step's row (less the sample text) appended to metrics.jsonl and sent to wandb, on rank 0; its
    log line; with show_sample, one of the step's completions (GRPO)."""
    if master_process():
        with open(path, "a") as f:
            f.write(json.dumps({k: v for k, v in row.items() if k != "sample"}) + "\n")
        if wandb_project:
            import wandb
            wandb.log(row, step=row["step"])
    r, parts = row, [f"step {row['step']:5d}/{total}"]
    if "reward" in r:  # GRPO
        parts += [f"reward {r['reward']:+.3f} ± {r['reward_std']:.3f}",
                  f"acc {r['rewards/accuracy/mean']:.3f}",
                  f"format {r['rewards/format/mean']:.3f} (well-formed {r['well_formed']:.2f}, "
                  f"think {r['think_length']:.0f} ch)", f"len {r['completions/mean_length']:6.1f}",
                  f"kl {r['kl']:.4f}", f"clip {r['clip_ratio']:.3f}", f"entropy {r['entropy']:.2f}"]
    else:  # SFT
        parts += [f"loss {r['loss']:.4f}", f"tokens {r['tokens']}"]
    optional = {"rewards/temporal/mean": "temporal {:.3f}", "video_gain": "video gain {:.3f}"}
    parts += [form.format(r[k]) for k, form in optional.items() if k in r]
    rollout = f" (rollout {r['sec_rollout']:.2f} s)" if "sec_rollout" in r else ""
    parts += [f"lr {r['lr']:.2e}", f"{r['sec']:.2f} s/step{rollout}", f"eta {eta / 60:.1f} min"]
    optional = {"skipped_total": "skipped {}", "peak_gib": "peak {:.1f} GiB"}
    parts += [form.format(r[k]) for k, form in optional.items() if r.get(k)]
    log(" | ".join(parts))
    if show_sample and row.get("sample"):
        text, reward, label = row["sample"]
        log(f"  sample (reward {reward:+.2f}, label {label}): {text[:300]!r}")


def main(argv=None):
    return train(get_args(argv))


# -----------------------------------------------------------------------------
# The whole pipeline on the shapes task (CPU, minutes)

# The shapes pipeline's settings: train.py flags per stage, each value with its reason. Measured on the
# default run (README, The shapes task) unless said otherwise.
SHAPES = dict(
    n_train=2000, n_test=250,
    eval_tokens={"option": 4, "reason": 96},    # a letter; a thought of ~30 tokens and its tags
    base=dict(lr=1e-3,              # at 2e-3 the base's Option accuracy ranged 43-64% over initialisations
              epochs=3,             # 84.4% Option, against 62.8 with 2 (with 4, GRPO adds less to R1)
              warmup=0.05, batch_size=16, save_every=100_000, keep_videos_in_memory=True,
              train_vision=True),   # a random frozen tower read less (base 84.0% against 87.6)
    # Direction questions are a plateau for a model from scratch: in the mix of the five types it stays at
    # chance, so a part where their option records are 4 records in 5, at a constant lr (the plateau's
    # length varies: ~350 and ~1,300 steps in two runs) ...
    direction=dict(epochs=60, rehearse_ratio=0.25, schedule="constant"),
    # ... then all of sft.json with every record of the direction clips five more times, at half the lr:
    # it brings back the count questions that the direction part took away (R1's direction 30 -> 54)
    direction_all=dict(epochs=5, rehearse_ratio=1, lr=5e-4),
    cold=dict(lr=1e-3,              # 58.0% Reason with 34 unparsed, against 51.6 with 47 at 5e-4
              schedule="constant", warmup=0, batch_size=4, epochs=60, keep_videos_in_memory=True),
    # the cold start rehearses the base's records, 8 a step with 4 cold-start samples: R1 72.0 against 65.2
    rehearsal=dict(rehearse_ratio=2, batch_size=12),
    grpo=dict(lr=3e-4,              # at 1e-4 GRPO moved too little in 200 steps
              beta=0.1,             # at 3e-4 with the paper's 0.01 the thoughts emptied
              G=8, prompts_per_rank=8, max_new_tokens=96, micro_batch=8, max_steps=200,
              ml=120,               # ML of eq. (3) above the cold-start thoughts' ~90 characters
              sample_every=25, save_every=100_000, keep_videos_in_memory=True),
)
SMOKE = dict(  # a few steps of each stage: the CI's test of the pipeline
    n_train=20, n_test=5, eval_tokens={"option": 2, "reason": 8},
    base=dict(lr=2e-3, epochs=1, batch_size=8, max_steps=2, train_vision=True, quiet=True),
    direction=dict(epochs=2, rehearse_ratio=1, max_steps=1),
    direction_all=dict(epochs=2, rehearse_ratio=1, max_steps=1),
    cold=dict(lr=1e-4, schedule="constant", batch_size=4, max_steps=1, quiet=True),
    rehearsal=SHAPES["rehearsal"],
    grpo=dict(lr=1e-4, G=4, prompts_per_rank=2, max_new_tokens=8, ml=300, max_steps=2, quiet=True),
)


def shapes_args(argv):
    p = data.Parser(prog="train.py shapes", description="the whole pipeline on the shapes task")
    p.add_argument("--out", default="runs/shapes", help="the run's folder: data, checkpoints, results")
    p.add_argument("--seed", type=int, default=0, help="data, initialisation, sampling")
    p.add_argument("--smoke", action="store_true", help="a few steps of each stage (the CI test)")
    g = p.add_argument_group("the paper's ablations (s4.3), each a GRPO run of its own beside the default")
    g.add_argument("--no-coldstart", action="store_true", help="s4.3.1: GRPO straight from the base model")
    g.add_argument("--no-rehearsal", action="store_true", help="the paper's cold start: its 16 samples alone")
    g.add_argument("--reward", choices=["format", "length", "penalty"], default="penalty",
                   help="Figure 5: format reward only / + length reward / + wrong-answer penalty (default)")
    g.add_argument("--beta", type=float, default=None, help="Figure 6: 0 = no KL (default: SHAPES['grpo'])")
    g.add_argument("--loss-type", choices=["grpo", "dr_grpo"], default="grpo", help="Figure 6: Dr. GRPO")
    g.add_argument("--tgrpo", action="store_true", help="Video-R1's T-GRPO")
    g.add_argument("--grpo-steps", type=int, default=None, help="GRPO steps (default: SHAPES['grpo'])")
    return p.parse_args(argv)


def shapes_pipeline(argv):
    """data -> base SFT from scratch (in three parts) -> cold start -> GRPO -> evaluate the base (Option),
    the cold start and R1 (Reason) on the held-out split, printed in the layout of the paper's Table 1,
    with R1 against the cold start and the base on the same clips (McNemar's test); Figure 4's curves as
    CSV (and PNG with matplotlib). Stages already on disk are reused, so an ablation re-runs only GRPO
    and its evaluation. Returns {"results", "comparisons", "times", "curves"}. Raises UserError under
    torchrun with several ranks, or when --out's data folder was written for other settings."""
    import evaluate
    a = shapes_args(argv)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1:
        raise data.UserError("train.py shapes runs in one process: its stages share one data folder and "
                             "size their batches for one rank. Run it without torchrun.")
    S, out, d = SMOKE if a.smoke else SHAPES, Path(a.out), Path(a.out) / "data"
    t_all, times = time.time(), {}

    def stage(name, result, fn):  # runs fn unless its result is on disk; a half-finished run starts over
        if result.exists():
            return
        if result.name == "final":
            shutil.rmtree(result.parent, ignore_errors=True)
        t0 = time.time()
        fn()
        times[name] = time.time() - t0
        print(f"== {name}: {times[name] / 60:.1f} min", flush=True)

    stage("data", d / "shapes_args.txt", lambda: data.generate_shapes(d, S["n_train"], S["n_test"], a.seed))
    data.check_shapes(d, S["n_train"], S["n_test"], a.seed)  # a folder of another task or size is refused
    sft = lambda init, data_file, run, **kw: lambda: train(settings(
        stage="sft", init=str(init), data=str(d / data_file), out=str(run), seed=a.seed, **kw))
    stage("base SFT", out / "base/final", sft("tiny", "sft.json", out / "base", **S["base"]))
    for prev, part, records in (("base", "base-direction", "sft-direction.json"),
                                ("base-direction", "base-all", "sft-direction-all.json")):
        kw = {**S["base"], **S["direction" if part == "base-direction" else "direction_all"]}
        stage(f"base SFT, {part}", out / part / "final", sft(out / prev / "final", records, out / part,
                                                              rehearse=str(d / "sft.json"), **kw))
    base, cold = out / "base-all", out / ("coldstart" + "-norehearsal" * a.no_rehearsal)
    kw = {**S["cold"], **({} if a.no_rehearsal else dict(rehearse=str(d / "sft.json"), **S["rehearsal"]))}
    stage("cold start", cold / "final", sft(base / "final", "coldstart.json", cold, **kw))
    beta = "" if a.beta is None else "nokl" if a.beta == 0 else f"beta{a.beta:g}"  # a run folder per setting
    name = "r1" + "".join(f"-{x}" for x, on in (
        ("nocold", a.no_coldstart), ("norehearsal", a.no_rehearsal and not a.no_coldstart),
        (a.reward, a.reward != "penalty"), (beta, bool(beta)), ("drgrpo", a.loss_type == "dr_grpo"),
        ("tgrpo", a.tgrpo)) if on)
    r1 = out / name
    grpo_kw = {**S["grpo"], **({} if a.beta is None else {"beta": a.beta}),
               **({"max_steps": a.grpo_steps} if a.grpo_steps else {})}
    stage(f"GRPO ({name})", r1 / "final", lambda: train(settings(
        stage="grpo", init=str((base if a.no_coldstart else cold) / "final"), data=str(d / "train.jsonl"),
        out=str(r1), seed=a.seed, loss_type=a.loss_type, no_length_reward=a.reward == "format",
        no_wrong_penalty=a.reward != "penalty", tgrpo=a.tgrpo, **grpo_kw)))
    evaluate.write_curves(r1)

    results = []
    for label, ckpt, mode in (("TinyLLaVA-Video-SFT (base)", base, "option"),
                              ("TinyLLaVA-Video-ColdStart", cold, "reason"),
                              (f"TinyLLaVA-Video-R1 ({name})", r1, "reason")):
        ev = evaluate.settings(model=str(ckpt / "final"), bench="jsonl", data_root=str(d / "test.jsonl"),
                               out="", mode=mode, name=label, reason_sep="space",
                               max_new_tokens=S["eval_tokens"][mode])
        res = out / "eval" / f"{ckpt.name}-{mode}-{evaluate.cache_key(ev)}.json"  # new checkpoint, new key
        ev.out = str(res)
        res.parent.mkdir(parents=True, exist_ok=True)
        stage(f"eval {ckpt.name} ({mode})", res, lambda: evaluate.run(ev))
        results.append(json.loads(res.read_text()))
    comparisons = evaluate.shapes_report(results, d / "test.jsonl", r1)
    print(f"\ntotal time {(time.time() - t_all) / 60:.1f} min (this run's stages: "
          + ", ".join(f"{k} {v / 60:.1f}" for k, v in times.items()) + ")")
    return {"results": results, "comparisons": comparisons, "times": times, "curves": r1 / "curves.csv"}


if __name__ == "__main__":
    if sys.argv[1:2] == ["shapes"]:
        data.cli(shapes_pipeline, sys.argv[2:])
    elif sys.argv[1:2] == ["plot"]:  # python train.py plot RUN: RUN/curves.csv (+ curves.png with matplotlib)
        import evaluate
        data.cli(evaluate.plot, sys.argv[2:])
    else:
        data.cli(main)
        if "RANK" in os.environ:
            # Under torchrun, everything is on disk now: leave without the interpreter's teardown. With
            # --fsdp, DTensor's caches keep the gloo process group alive past destroy_process_group, and
            # its worker threads, stopped during the teardown, can abort a finished run (SIGABRT).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
