"""
Train TinyLLaVA-Video-R1 (paper s4.1): cold-start SFT, then GRPO with the rule rewards.

    python train.py --stage sft  --init CKPT --data coldstart.json --out runs/coldstart --lr 1e-5 --schedule constant
    python train.py --stage grpo --init runs/coldstart/final --data nextqa.jsonl --video-root DATA --out runs/r1
    torchrun --nproc_per_node 8 train.py --stage grpo ...          # the paper's 8 GPUs, 1 prompt each
    python train.py --stage sft --init tiny --data data/shapes/sft.json ...   # a from-scratch tiny model (CPU)

One optimizer step of GRPO (defaults = SPEC.md s3): each rank takes its prompts; for each prompt it
encodes the 16 frames once, samples G = 8 completions with the unwrapped model, scores them
(rewards.py), turns rewards into group advantages (grpo.py, eq. 2), and back-propagates the loss of
eq. (1) in micro-batches; then the gradients are averaged over ranks and AdamW steps.

Data parallel, by hand: every rank holds the whole model (or, with --fsdp, a shard of it:
torch's FSDP2), takes a disjoint slice of each global batch, and every loss is normalised so that
the mean of the ranks' gradients is the gradient of the one big batch (grpo.py's docstring).
All randomness (data order, sampling, advantage noise, T-GRPO's shuffles) is a function of
(seed, step, prompt index), so a resumed run repeats an uninterrupted one and the same global batch
gives the same update on 1 or 8 ranks.

Departures from the reference code:
1. Reward: eq. (4) as the paper writes it (--reference-reward for the code's formula).
2. A sample whose video cannot be decoded is skipped (its group gets zero weight) and counted; the
   reference substitutes another video.
3. fp32 master weights with bf16 autocast (the reference trains bf16 weights, which cannot hold lr-1e-6 updates).
"""
import argparse
import copy
import hashlib
import json
import math
import os
import random
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
# Arguments


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to train
    p.add_argument("--stage", choices=["sft", "grpo"], default="grpo")
    p.add_argument("--init", required=True, help="checkpoint folder or hub id; 'tiny' = a new tiny model")
    p.add_argument("--data", required=True, help="grpo: NextQA-format jsonl; sft: LLaVA-format json")
    p.add_argument("--video-root", default=None, help="videos are relative to this (default: the data file's folder)")
    p.add_argument("--out", required=True, help="run folder: metrics.jsonl, checkpoints")
    p.add_argument("--resume", default=None, help="a checkpoint folder of this run to continue from")
    # GRPO (SPEC.md s3)
    p.add_argument("--G", type=int, default=8, help="completions per prompt")
    p.add_argument("--prompts-per-rank", type=int, default=1, help="prompts per rank per optimizer step")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=0.01, help="KL weight; 0 = no reference model (paper s4.3.3)")
    p.add_argument("--clip-eps", type=float, default=0.2)
    p.add_argument("--num-iterations", type=int, default=1, help="updates per rollout (>1: the clip binds)")
    p.add_argument("--loss-type", choices=["grpo", "dr_grpo"], default="grpo", help="dr_grpo also drops the std division")
    p.add_argument("--noise-std", type=float, default=0.02, help="advantage noise (paper s3.2); 0 = off")
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per forward/backward")
    # rewards (paper s3.4, Figure 5; Video-R1)
    p.add_argument("--no-length-reward", action="store_true", help="Figure 5: fixed format reward")
    p.add_argument("--no-wrong-penalty", action="store_true", help="Figure 5: R = AR + FR")
    p.add_argument("--reference-reward", action="store_true", help="the reference code's reward formula")
    p.add_argument("--ml", type=int, default=rewards.ML, help="ML of eq. (3), characters")
    p.add_argument("--tgrpo", action="store_true", help="Video-R1's T-GRPO: G/2 extra completions on shuffled frames")
    p.add_argument("--tgrpo-alpha", type=float, default=0.3)
    p.add_argument("--tgrpo-mu", type=float, default=1.0)
    # optimisation
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    p.add_argument("--warmup", type=float, default=0.03, help="fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--rehearse", default=None,
                   help="sft: the previous stage's LLaVA json; each pass over --data comes with --rehearse-ratio "
                        "times as many of its records, each used once (rehearsal_mix; NOTES.md, session 12)")
    p.add_argument("--rehearse-ratio", type=float, default=2, help="rehearsed records per --data sample")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: the epochs)")
    p.add_argument("--batch-size", type=int, default=1, help="sft: samples per rank per step")
    p.add_argument("--num-frames", type=int, default=16)
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument("--train-vision", action="store_true",
                   help="also train the vision tower (only for a tiny model built from scratch: the paper's is frozen)")
    p.add_argument("--fsdp", action="store_true", help="shard params, grads and optimizer state (FSDP2)")
    p.add_argument("--seed", type=int, default=0)
    # logs and checkpoints
    p.add_argument("--sample-every", type=int, default=10, help="print one completion every N steps")
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--video-gain-every", type=int, default=25,
                   help="sft: every N steps log video_gain (train.video_gain; 0 = never)")
    p.add_argument("--max-bad-fraction", type=float, default=0.05, help="stop when more videos than this fail")
    p.add_argument("--wandb", default=None, help="a wandb project name (needs wandb installed)")
    p.add_argument("--keep-videos-in-memory", action="store_true",
                   help="decode each clip once (small data sets: the shapes task)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.rehearse and args.stage != "sft":
        p.error("--rehearse is for the sft stage (a cold start)")
    return args


# -----------------------------------------------------------------------------
# Distributed helpers

def dist_init():
    """RANK / WORLD_SIZE / LOCAL_RANK from torchrun; NCCL on CUDA, gloo on CPU. Returns (rank, world, device)."""
    if "RANK" not in os.environ:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return 0, 1, device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        return rank, world, torch.device("cuda", local)
    dist.init_process_group("gloo")
    return rank, world, torch.device("cpu")


def average_gradients(params, world):
    # Plain data parallel: the mean over ranks of each gradient (one all-reduce per tensor).
    if world == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= world


def all_sum(values, device):
    """Sum a list of floats over ranks (logging and counts)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def seeded(*key, device="cpu"):
    """A torch.Generator on `device` whose state is a function of the key (seed, step, prompt index, ...)."""
    return torch.Generator(device).manual_seed(int(hashlib.sha256(repr(key).encode()).hexdigest()[:15], 16))


# -----------------------------------------------------------------------------
# Model setup

def build_model(args, device):
    """Returns (model, tokenizer). 'tiny' builds a new tiny model whose tokenizer is trained on the
    texts of the data folder (the shapes task)."""
    if args.init == "tiny":
        folder = Path(args.data).parent
        tok_dir = Path(args.out) / "tokenizer"
        if is_master():
            tok_dir.parent.mkdir(parents=True, exist_ok=True)
            M.build_tokenizer(tokenizer_texts(folder), tok_dir)
        barrier()
        tok = M.AutoTokenizer.from_pretrained(tok_dir)
        torch.manual_seed(args.seed)
        return M.TinyLlavaVideo(M.tiny_config(len(tok))).to(device), tok
    return M.from_pretrained(args.init, device=device)


def tokenizer_texts(folder):
    """Every text the tiny model will read or write: prompts, questions, answers, reasoning."""
    texts = [data.chat_prompt(data.build_question("", m)) for m in ("reason", "option")]
    # Not sft-think.json (--think-part only): its texts are the other files' pieces in new places, yet with
    # them the tokenizer, and so every default run from nothing, would change (567 tokens instead of 568 for seed 0)
    for f in sorted(f for f in folder.glob("*.json") if f.name != "sft-think.json"):
        for s in data.read_llava_json(f):
            texts += [s.question, s.target or ""] + [text for turn in s.history for text in turn]
    for f in sorted(folder.glob("*.jsonl")):
        texts += [s.question for s in data.read_nextqa_jsonl(f)]
    return texts * 4


def shard_model(model):
    """FSDP2: one unit per decoder layer and the connector, the rest (embeddings, tied lm_head, norm,
    frozen vision tower) in the root unit; bf16 compute and fp32 gradient reduction on CUDA."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if torch.cuda.is_available() else MixedPrecisionPolicy()
    for layer in model.language_model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model.connector, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for method in ("encode_video", "encode_videos", "completion_logprobs"):
        register_fsdp_forward_method(model, method)
    # FSDP initialises lazily from the first root forward; make it a root forward, not the sampler's
    # direct layer calls (which would turn each layer into a root of its own).
    with torch.no_grad():
        S = model.cfg.image_size
        model.encode_video(torch.zeros(1, 3, S, S, device=next(model.parameters()).device))
    # The root stays gathered after a forward; reshard it so that model.parameters() -- what the
    # optimizer will hold -- are the sharded parameters, not a temporary full copy.
    for unit in Gathered(model).units:
        unit.reshard()


class Gathered:
    """Inside `with Gathered(model):` an FSDP model holds full parameters and runs forwards without
    collectives, so ranks may decode different numbers of tokens. A no-op without FSDP."""

    def __init__(self, model):
        from torch.distributed.fsdp import FSDPModule
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]

    def __enter__(self):
        for u in self.units:
            u.unshard()
            u.set_reshard_after_forward(False)

    def __exit__(self, *exc):
        for u in self.units:
            u.reshard()
            u.set_reshard_after_forward(True)


def memory_report(model, args, world, device):
    """Bytes per rank for parameters, gradients, AdamW state and the reference model; a warning when
    they exceed the device's memory. Activations and the KV cache come on top."""
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shard = world if args.fsdp else 1
    parts = {"parameters (fp32)": 4 * n_all / shard, "gradients (fp32)": 4 * n_train / shard,
             "AdamW state (fp32 m, v)": 8 * n_train / shard}
    if args.stage == "grpo" and args.beta > 0:
        parts["reference model"] = (2 if device.type == "cuda" else 4) * n_all
    total = sum(parts.values())
    lines = [f"memory per rank ({'FSDP over %d ranks' % world if args.fsdp else 'data parallel'}, "
             f"{n_all / 1e6:.1f}M parameters, {n_train / 1e6:.1f}M trained):"]
    lines += [f"  {k:26s} {v / 2**30:8.2f} GiB" for k, v in parts.items()]
    lines.append(f"  {'total before activations':26s} {total / 2**30:8.2f} GiB")
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
        if total > 0.9 * have:
            lines.append(f"  WARNING: that is more than 90% of this GPU's {have / 2**30:.0f} GiB; "
                         f"try --fsdp, --grad-checkpointing or more GPUs")
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# Data

# Decoded clips kept by VideoLoader(keep_in_memory=True), shared by every run in this process: the shapes
# pipeline's stages read the same clips (about 8 ms each to decode on the shapes task).
_KEPT = {}


class VideoLoader:
    """Loads and preprocesses a sample's frames; counts failures and stops the run past a fraction.
    With keep_in_memory, each clip is decoded once per process and its pixels kept (float32,
    T*3*S*S*4 bytes: 192 KiB for the shapes task's 16 x 32 x 32 frames; callers must not modify them in
    place), keyed by the file's path, size and modification time and the frames asked for, so a file
    written again is decoded again. On the shapes task decoding was a third of a base step."""

    def __init__(self, num_frames, size, max_bad_fraction, keep_in_memory=False):
        self.num_frames, self.size, self.max_bad = num_frames, size, max_bad_fraction
        self.seen, self.bad = 0, []
        self.keep = keep_in_memory

    def __call__(self, path):
        """Returns float (T, 3, S, S), or None (with a warning) when the video cannot be read."""
        self.seen += 1
        try:
            st = os.stat(path)
            key = (str(path), st.st_size, st.st_mtime_ns, self.num_frames, self.size)
            if self.keep and key in _KEPT:
                return _KEPT[key]
            pixels = data.preprocess(data.load_video(path, self.num_frames), self.size)
            if self.keep:
                _KEPT[key] = pixels
            return pixels
        except (FileNotFoundError, ValueError) as e:
            self.bad.append(str(path))
            print(f"[rank {rank_of()}] WARNING: skipping sample, {e}", flush=True)
            if len(self.bad) > max(1, self.max_bad * self.seen) and self.seen >= 20:
                raise RuntimeError(f"{len(self.bad)} of {self.seen} videos failed (more than "
                                   f"--max-bad-fraction {self.max_bad}): {self.bad[:20]}")
            return None


def batch_indices(n_items, step, per_rank, rank, world, seed):
    """This rank's item indices for a step: epoch e's order is a permutation seeded by (seed, e);
    a global batch is world * per_rank consecutive items of it; rank r takes its slice."""
    per_step = per_rank * world
    steps_per_epoch = n_items // per_step
    epoch, k = divmod(step, steps_per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_items)
    start = k * per_step + rank * per_rank
    # second list: each item's position in the global batch, which (with the step) seeds its sampling
    return [int(i) for i in order[start:start + per_rank]], [rank * per_rank + j for j in range(per_rank)]


# -----------------------------------------------------------------------------
# One GRPO step

def rollouts(model, ref_model, tok, samples, pixels, args, step, global_idx, device):
    """Sample G completions for each of this rank's prompts and score them. The prompts decode
    together (one M.sample call); prompt i draws from its own generator, seeded by its place in the
    global batch (global_idx[i]), so its completions do not depend on the number of ranks.
    Returns one dict per prompt: the group's tensors (ids, mask, advantages, ref/old log-probs) and
    metrics, or a zero-weight dummy group where the video could not be read (same passes, no
    gradient, so ranks stay in step)."""
    prompts = [torch.tensor(M.tokenize_prompt(tok, data.chat_prompt(data.build_question(s.question, "reason"))),
                            device=device) for s in samples]
    pixels = [None if px is None else px.to(device) for px in pixels]  # once: sampling and scoring both use it
    keys = [(args.seed, step, gi) for gi in global_idx]
    live = [i for i, px in enumerate(pixels) if px is not None]
    eos, shuffled = tok.eos_token_id, {}
    with torch.no_grad(), autocast(device), Gathered(model):
        feats = [model.vision_tower(pixels[i]) for i in live]                     # (T, P, Dv), once per prompt
        live_prompts, live_keys = [prompts[i] for i in live], [keys[i] for i in live]
        drawn = dict(zip(live, sample_groups(model, live_prompts, feats, args.G, args, live_keys, "sample", eos)))
        if args.tgrpo:  # Video-R1: G/2 completions on shuffled frames, no gradient through them
            perms = [torch.randperm(len(f), generator=seeded(*k, "shuffle")).to(device)
                     for f, k in zip(feats, live_keys)]
            shuffled = dict(zip(live, sample_groups(model, live_prompts, [f[p] for f, p in zip(feats, perms)],
                                                    args.G // 2, args, live_keys, "sample-shuffled", eos)))
    groups = []
    for i, (sample, prompt) in enumerate(zip(samples, prompts)):
        if i not in drawn:
            groups.append(dummy_group(model, prompt, args, eos, device))
            continue
        groups.append(score_group(model, ref_model, tok, sample, prompt, pixels[i], drawn[i], shuffled.get(i),
                                  args, keys[i], device))
    return groups


def sample_groups(model, prompts, feats, G, args, keys, name, eos):
    """M.sample for a batch of prompts (frame features feats[b]: (T, P, Dv)), split back into one
    (ids (G, L_b), mask (G, L_b)) per prompt, each cut to its own longest completion."""
    if not prompts:
        return []
    videos = torch.stack([model.connector(f) for f in feats])                   # (B, Q, D)
    ids, mask = M.sample(model, prompts, videos, G=G, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, eos_id=eos,
                         generators=[seeded(*k, name, device=videos.device) for k in keys])
    groups = []
    for ids_b, mask_b in zip(ids.split(G), mask.split(G)):
        L = int(mask_b.sum(1).max())
        groups.append((ids_b[:, :L], mask_b[:, :L]))
    return groups


def score_group(model, ref_model, tok, sample, prompt, pixels, drawn, shuffled, args, key, device):
    """Rewards, advantages (eq. 2), reference/old log-probs and metrics of one prompt's G completions:
    drawn = (ids, mask); shuffled: T-GRPO's (ids, mask) on shuffled frames, or None."""
    ids, mask = drawn
    letters = data.option_letters(sample.question)
    texts = M.decode_completions(tok, ids, mask)
    r = torch.tensor([score(t, sample.answer, args, letters) for t in texts])
    acc = torch.tensor([rewards.accuracy_reward(t, sample.answer, options=letters) for t in texts])
    fmt = torch.tensor([rewards.format_reward(t, args.ml, length_reward=not args.no_length_reward) for t in texts])
    bonus = torch.zeros(args.G)
    if shuffled is not None:  # T-GRPO
        shuffled_acc = [rewards.accuracy_reward(t, sample.answer, options=letters)
                        for t in M.decode_completions(tok, *shuffled)]
        bonus = torch.tensor(rewards.temporal_bonus(acc.tolist(), shuffled_acc, args.tgrpo_alpha, args.tgrpo_mu))
    total = r + bonus
    adv = grpo.group_advantages(total, args.G, scale_by_std=args.loss_type == "grpo", noise_std=args.noise_std,
                                generator=seeded(*key, "noise"))
    out = dict(prompt=prompt, pixels=pixels, ids=ids, mask=mask, adv=adv.to(device), weight=1.0, ref_logp=None,
               old_logp=None)
    with torch.no_grad(), autocast(device):
        if ref_model is not None:
            out["ref_logp"] = ref_model.completion_logprobs(prompt, ref_model.encode_video(pixels), ids)
        if args.num_iterations > 1:
            out["old_logp"] = model.completion_logprobs(prompt, model.encode_video(pixels), ids)
    out["metrics"] = dict(reward=total.tolist(), acc=acc.tolist(), fmt=fmt.tolist(),
                          length=mask.sum(1).float().tolist(),
                          bonus=bonus.tolist(),  # T-GRPO's temporal reward (0 without --tgrpo)
                          well_formed=(fmt > 0).tolist(),  # FR > 0 exactly when the format rule holds (eq. 3)
                          think_chars=[rewards.think_length(t) for t in texts],
                          text=texts[0], text_reward=float(total[0]), answer=sample.answer)
    return out


def dummy_group(model, prompt, args, eos, device):
    """A zero-weight group for a prompt whose video failed: a blank video, one eos token per row."""
    pixels = torch.zeros(args.num_frames, 3, model.cfg.image_size, model.cfg.image_size, device=device)
    ids = torch.full((args.G, 1), eos, device=device)
    return dict(prompt=prompt, pixels=pixels, ids=ids, mask=torch.ones_like(ids),
                adv=torch.zeros(args.G, device=device), weight=0.0, metrics=None, old_logp=None,
                ref_logp=torch.zeros(ids.shape, device=device))


def score(text, answer, args, letters):
    """The reward of one completion under the chosen setting (rewards.py)."""
    if args.reference_reward:
        return rewards.reference_reward(text, answer, args.ml)
    return rewards.reward(text, answer, length_reward=not args.no_length_reward,
                          wrong_penalty=not args.no_wrong_penalty, ml=args.ml)


def grpo_backward(model, group, args, n_sequences, device):
    """Backward of eq. (1) for one group, in micro-batches; the loss is normalised by the number of
    sequences on this rank (n_sequences), so summing micro-batches gives the rank's batch mean.
    Returns the summed loss (float) and the per-token metrics of grpo_loss."""
    G = group["ids"].shape[0]
    feats = None if args.fsdp else model.vision_tower(group["pixels"])  # frozen: once per group
    total, stats = 0.0, []
    for lo in range(0, G, args.micro_batch):
        sl = slice(lo, lo + args.micro_batch)
        with autocast(device):
            video = model.encode_video(group["pixels"]) if args.fsdp else model.connector(feats)  # with grad
            logp = model.completion_logprobs(group["prompt"], video, group["ids"][sl])
        old = logp.detach() if group["old_logp"] is None else group["old_logp"][sl]
        ref = None if group["ref_logp"] is None else group["ref_logp"][sl]
        loss, m = grpo.grpo_loss(logp, old, ref, group["adv"][sl], group["mask"][sl], clip_eps=args.clip_eps,
                                 beta=args.beta, loss_type=args.loss_type, num_sequences=n_sequences,
                                 max_len=args.max_new_tokens)
        (loss * group["weight"]).backward()
        total += loss.item() * group["weight"]
        stats.append(m)
    return total, stats


# -----------------------------------------------------------------------------
# One SFT step

def rehearsal_mix(samples, old, epochs, ratio, seed, where="the rehearsal data"):
    """A cold start that keeps what the previous stage taught (not in the paper; NOTES.md, session 12):
    `epochs` copies of `samples` plus `ratio` (a float) times as many records, rounded, of the previous
    stage's SFT data `old`, drawn without replacement (each used once), to be read as ONE shuffled
    epoch, so that every batch mixes the new format with the old skills. Without it the tiny shapes model,
    cold-started for 60 epochs on 16 samples, forgets how to describe a clip (the loss of the base's
    own descriptions goes 0.31 -> 0.97 nats a token; with ratio 1, 0.38; with ratio 2, 0.34).
    The shapes base stage's direction parts use it too (shapes_pipeline).
    Returns: list of epochs * len(samples) + n data.Sample (the samples, then the records), where
        n = round(ratio * epochs * len(samples)).
    Raises: ValueError if `old` (read from `where`) holds fewer than n records.
    """
    n = round(ratio * epochs * len(samples))
    if len(old) < n:
        raise ValueError(f"{where}: {len(old)} records, fewer than the {n} that {epochs} epochs of "
                         f"{len(samples)} samples rehearse with at {ratio:g} each")
    return samples * epochs + random.Random(seed).sample(old, n)


def sft_tensors(tok, sample, device):
    """ids and labels of one cold-start / SFT sample: prompt + target + eos, loss on target + eos only
    (SPEC.md s3). A multi-turn sample (sample.history) continues each answer's eos with the next
    turn's 'USER: ... ASSISTANT:' (data.chat_turn); every answer and its eos get loss.
    Returns (ids long (n,), labels long (n,))."""
    ids, labels = [], []
    for k, (question, target) in enumerate(list(sample.history) + [(sample.question, sample.target)]):
        prompt = M.tokenize_prompt(tok, data.chat_prompt(question)) if k == 0 else \
            tok(data.chat_turn(question), add_special_tokens=False).input_ids
        answer = tok(target, add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids += prompt + answer
        labels += [M.IGNORE_INDEX] * len(prompt) + answer
    return torch.tensor(ids, device=device), torch.tensor(labels, device=device)


def sft_losses(model, tok, samples, pixels, device):
    """Summed cross-entropy of each sample's answer tokens (SPEC.md s3: loss on the answer and eos only),
    in one right-padded forward, each row with its own video.
    Args: samples: B data.Sample with targets; pixels: B float (T, 3, S, S) in [-1, 1], or None for a
        video that failed (a blank frame stands in; the caller gives it weight 0).
    Returns: (ce float32 (B,) in nats, summed over each row's answer tokens; answer tokens long (B,))."""
    rows = [sft_tensors(tok, s, device) for s in samples]
    S = model.cfg.image_size
    pixels = [torch.zeros(1, 3, S, S) if p is None else p for p in pixels]
    n = max(len(ids) for ids, _ in rows)
    ids = torch.stack([F.pad(i, (0, n - len(i))) for i, _ in rows])                         # (B, n)
    labels = torch.stack([F.pad(l, (0, n - len(l)), value=M.IGNORE_INDEX) for _, l in rows])  # (B, n)
    mask = torch.stack([(torch.arange(n, device=device) < len(i)).long() for i, _ in rows])
    with autocast(device):
        videos = model.encode_videos([p.to(device) for p in pixels])                        # (B, Q, D)
        logits, labels = model(ids, mask, videos, labels)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                         ignore_index=M.IGNORE_INDEX, reduction="none").view(len(rows), -1)   # (B, n' - 1)
    return ce.sum(1), (labels[:, 1:] != M.IGNORE_INDEX).sum(1)


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
    on); it grows as the model learns to read the clips (NOTES.md, session 9).
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


# -----------------------------------------------------------------------------
# Checkpoints

def full_state(model, optimizer):
    """Model and optimizer state with every FSDP shard gathered into a full tensor (a collective:
    every rank calls it, in the same order). Without FSDP, plain state dicts. The format is the
    same either way, so a run saved with --fsdp resumes without it and the other way round."""
    def full(v):
        return v.full_tensor() if hasattr(v, "full_tensor") else v
    model_state = {k: full(v) for k, v in model.state_dict().items()}
    opt = optimizer.state_dict()
    opt["state"] = {i: {k: full(v) for k, v in st.items()} for i, st in opt["state"].items()}
    return model_state, opt


def load_optimizer(optimizer, state):
    """Load a full optimizer state; under FSDP each tensor is cut back to this rank's shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, st in state["state"].items():
        p = params[int(i)]
        if isinstance(p, DTensor):
            st.update({k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements)
                       for k, v in st.items() if torch.is_tensor(v) and v.ndim > 0})
    optimizer.load_state_dict(state)


def save_checkpoint(path, model, tok, optimizer, step, args):
    """model.py's layout (fp32 weights) + train_state.pt (optimizer, step, args), atomically. Every
    rank must call it (FSDP gathers); rank 0 writes."""
    state, opt_state = full_state(model, optimizer)
    if is_master():
        extra = {"train_state.pt": {"optimizer": opt_state, "step": step, "args": vars(args)}}
        M.save_pretrained(model, path, tok, state=state, extra=extra)
        print(f"saved {path}", flush=True)
    barrier()


# -----------------------------------------------------------------------------
# Main loop

def lr_at(step, total, args):
    """lr multiplier: linear warmup over --warmup of the steps, then cosine to 0 (or constant)."""
    warm = math.ceil(args.warmup * total)
    if step < warm:
        return (step + 1) / warm
    if args.schedule == "constant":
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def autocast(device):
    # bf16 compute on CUDA over fp32 master weights; plain fp32 on CPU.
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


_RANK = 0


def rank_of():
    return _RANK


def is_master():
    return _RANK == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def main(argv=None):
    global _RANK
    args = get_args(argv)
    rank, world, device = dist_init()
    _RANK = rank
    out = Path(args.out)
    if is_master():
        out.mkdir(parents=True, exist_ok=True)
    barrier()
    log = (lambda *a: print(*a, flush=True)) if is_master() and not args.quiet else (lambda *a: None)

    # model, reference model, optimizer
    model, tok = build_model(args, device) if args.resume is None else M.from_pretrained(args.resume, device=device)
    ref_model = None
    if args.stage == "grpo" and args.beta > 0:  # the starting checkpoint, frozen (SPEC.md s3)
        ref_src = M.from_pretrained(args.init, device=device)[0] if args.resume else copy.deepcopy(model)
        ref_model = ref_src.to(torch.bfloat16 if device.type == "cuda" else torch.float32).eval().requires_grad_(False)
    if args.grad_checkpointing:
        model.language_model.activation_checkpointing_enable()
    if args.train_vision:
        model.vision_tower.unfreeze()
    model.train()
    if args.fsdp:
        shard_model(model)
    params = [p for p in model.parameters() if p.requires_grad]  # connector + LLM; the vision tower is frozen
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))

    # data
    root = lambda file: Path(args.video_root) if args.video_root else Path(file).parent  # the videos' folder
    read = data.read_nextqa_jsonl if args.stage == "grpo" else data.read_llava_json
    items = read(args.data, root(args.data))
    epochs = args.epochs
    if args.rehearse:
        old = data.read_llava_json(args.rehearse, root(args.rehearse))
        items, epochs = rehearsal_mix(items, old, args.epochs, args.rehearse_ratio, args.seed, args.rehearse), 1
    per_rank = args.prompts_per_rank if args.stage == "grpo" else args.batch_size
    steps_per_epoch = len(items) // (per_rank * world)
    assert steps_per_epoch > 0, f"{len(items)} samples cannot fill one step of {per_rank} x {world} ranks"
    total_steps = steps_per_epoch * epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    videos = VideoLoader(args.num_frames, model.cfg.image_size, args.max_bad_fraction, args.keep_videos_in_memory)

    start = 0
    if args.resume:
        state = torch.load(Path(args.resume) / "train_state.pt", weights_only=False)
        load_optimizer(optimizer, state["optimizer"])
        start = state["step"]
        log(f"resumed from {args.resume} at step {start}")
    log(memory_report(model, args, world, device))
    log(f"{args.stage}: {len(items)} samples, {world} rank(s) x {per_rank} per step, {total_steps} steps")
    if args.wandb and is_master():
        import wandb
        wandb.init(project=args.wandb, config=vars(args))

    interrupted = []
    signal.signal(signal.SIGINT, lambda *a: interrupted.append(True))  # finish the step, save, exit
    metrics_file = out / "metrics.jsonl"
    t_start = time.time()
    step = start
    for step in range(start, total_steps):
        t0 = time.time()
        for g in optimizer.param_groups:
            g["lr"] = args.lr * lr_at(step, total_steps, args)
        idx, global_idx = batch_indices(len(items), step, per_rank, rank, world, args.seed)
        samples = [items[i] for i in idx]
        pixels = [videos(s.video) for s in samples]
        def update():
            """Average gradients over ranks, clip, step. Returns the gradient norm before clipping."""
            if not args.fsdp:
                average_gradients(params, world)  # FSDP has reduce-scattered them already
            norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

        if args.stage == "grpo":
            row = grpo_step(model, ref_model, tok, samples, pixels, global_idx, args, step, device, update)
        else:
            loss, n_tok = sft_backward(model, tok, samples, pixels, device, world)
            loss, n_tok, skipped = all_sum([loss, n_tok, sum(p is None for p in pixels)], device)
            row = {"loss": loss, "tokens": int(n_tok), "skipped": int(skipped)}
            if args.video_gain_every and (step + 1) % args.video_gain_every == 0:
                gain, n_gain = all_sum(video_gain(model, tok, samples, pixels, device), device)
                if n_gain:  # not with one sample per rank: there is no other video to swap in
                    row["video_gain"] = gain / n_gain
        grad_norm = update()
        dt = time.time() - t0
        row.update(step=step + 1, lr=optimizer.param_groups[0]["lr"], grad_norm=grad_norm, sec=dt,
                   skipped_total=len(videos.bad))
        if device.type == "cuda":  # this rank's peak since the start: parameters, optimizer, activations
            row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if is_master():
            with open(metrics_file, "a") as f:
                f.write(json.dumps({k: v for k, v in row.items() if k != "sample"}) + "\n")
            if args.wandb:
                wandb.log(row, step=step + 1)
        eta = (time.time() - t_start) / (step + 1 - start) * (total_steps - step - 1)
        log(format_row(row, total_steps, eta))
        if args.stage == "grpo" and (step + 1) % args.sample_every == 0 and row.get("sample"):
            log(f"  sample (reward {row['sample'][1]:+.2f}, label {row['sample'][2]}): {row['sample'][0][:300]!r}")
        if (step + 1) % args.save_every == 0 or interrupted or step + 1 == total_steps:
            name = "final" if step + 1 == total_steps else f"step-{step + 1:06d}"
            save_checkpoint(out / name, model, tok, optimizer, step + 1, args)
        if interrupted:
            log("interrupted: checkpoint saved, exiting")
            break
    if args.wandb and is_master():
        wandb.finish()
    if dist.is_initialized():
        dist.destroy_process_group()
    return out / "final"


def grpo_step(model, ref_model, tok, samples, pixels, global_idx, args, step, device, update):
    """Rollouts for this rank's prompts, then the backward passes of eq. (1); with --num-iterations k,
    k updates on the same rollouts (all but the last made here, by `update`). Returns the log row."""
    t0 = time.time()
    groups = rollouts(model, ref_model, tok, samples, pixels, args, step, global_idx, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # kernels run asynchronously: wait before reading the clock
    sec_rollout = time.time() - t0  # sampling and the reference model's log-probs
    n_seq = len(groups) * args.G
    losses, stats = [], []
    for it in range(args.num_iterations):
        for g in groups:
            loss, st = grpo_backward(model, g, args, n_seq, device)
            losses.append(loss)
            stats += st if g["weight"] else []
        if it < args.num_iterations - 1:  # the extra updates of a reused rollout
            update()
    ms = [g["metrics"] for g in groups if g["metrics"]]
    flat = lambda k: [v for m in ms for v in m[k]]
    n = len(flat("reward"))
    # think_length: Len of eq. (3) in characters, averaged over the well-formed completions only
    think = [c for c, ok in zip(flat("think_chars"), flat("well_formed")) if ok]
    sums = all_sum([sum(flat("reward")), sum(x * x for x in flat("reward")), sum(flat("acc")), sum(flat("fmt")),
                    sum(flat("length")), n, sum(s["kl"] for s in stats), sum(s["clip_ratio"] for s in stats),
                    len(stats), len(groups) - len(ms), len(think), sum(think), sum(flat("bonus"))], device)
    r_sum, r_sq, acc, fmt, length, n, kl, clip, n_stats, skipped, n_ok, think_sum, bonus = sums
    n, n_stats = max(n, 1), max(n_stats, 1)
    row = {"reward": r_sum / n, "reward_std": math.sqrt(max(0.0, r_sq / n - (r_sum / n) ** 2)),
           "rewards/accuracy": acc / n, "rewards/format": fmt / n, "completion_length": length / n,
           "well_formed": n_ok / n, "think_length": think_sum / max(n_ok, 1),
           "kl": kl / n_stats, "clip_ratio": clip / n_stats, "skipped": int(skipped), "sec_rollout": sec_rollout}
    if args.tgrpo:  # mean temporal bonus per completion: alpha x the fraction that earned it
        row["rewards/temporal"] = bonus / n
    if ms:
        row["sample"] = (ms[0]["text"], ms[0]["text_reward"], ms[0]["answer"])
    return row


# -----------------------------------------------------------------------------
# The whole pipeline on the shapes task (CPU, minutes)

def shapes_pipeline(argv):
    """data -> base SFT from scratch (in three parts; four with --think-part) -> cold start -> GRPO ->
    evaluate base (option), cold start and R1 (reason) on the held-out split, printed in the layout of the
    paper's Table 1, with R1 against the cold start and the base on the same clips (McNemar's test);
    Figure 4's curves as CSV (and PNG with matplotlib). Stages already on disk are reused, so an ablation
    re-runs only GRPO and its evaluation. Returns the results dict. Raises ValueError when
    the data in --out was written for another base stage (its shapes_args.txt differs in --reasoning-base /
    --stepwise / --no-tag-record / --single-turn), or lacks a part's records (sft-direction.json since
    session 18, sft-direction-all.json since 19: fine with --one-part-base; sft-think.json since 23: needed
    by --think-part alone), when --think-part comes with --reasoning-base, --stepwise or --one-part-base,
    or when its base/ was trained for another number of epochs than --base-epochs asks."""
    import evaluate
    p = argparse.ArgumentParser(prog="train.py shapes", description=shapes_pipeline.__doc__)
    p.add_argument("--out", default="runs/shapes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="a few steps of each stage (the CI test)")
    # the paper's ablations (s4.3), each a GRPO run of its own next to the default one
    p.add_argument("--no-coldstart", action="store_true", help="s4.3.1: GRPO straight from the base model")
    p.add_argument("--no-rehearsal", action="store_true",
                   help="the paper's cold start: the 16 samples alone, without the base stage's records")
    p.add_argument("--single-turn", action="store_true",
                   help="the tagged option question as a record of its own, not as the description's second turn "
                        "(session 15's base); another --out")
    p.add_argument("--no-tag-record", action="store_true",
                   help="a base stage that never sees the answer in <answer> tags (sessions 1-14); another --out")
    p.add_argument("--one-part-base", action="store_true",
                   help="the base stage without its direction parts (sessions 1-17; NOTES.md, session 18)")
    p.add_argument("--base-epochs", type=int, default=None,
                   help="epochs of the base stage (default: SHAPES['base_epochs']); another value needs another --out")
    p.add_argument("--reward", choices=["format", "length", "penalty"], default="penalty",
                   help="Figure 5: format reward only / + length reward / + wrong-answer penalty (default)")
    p.add_argument("--beta", type=float, default=None, help="Figure 6: 0 = no KL (default: the one in SHAPES['grpo'])")
    p.add_argument("--loss-type", choices=["grpo", "dr_grpo"], default="grpo", help="Figure 6: Dr. GRPO")
    p.add_argument("--tgrpo", action="store_true", help="Video-R1's T-GRPO")
    p.add_argument("--grpo-steps", type=int, default=None)
    p.add_argument("--think-part", action="store_true",
                   help="a fourth base part: the thought in its <think> tags, then the letter after it (sft-think.json), "
                        "and a gentler cold start (NOTES.md, session 23)")
    p.add_argument("--reasoning-base", action="store_true",
                   help="a base stage that also learns the plain-text thought (NOTES.md, session 7); cold start 20 "
                        "epochs")
    p.add_argument("--stepwise", action="store_true",
                   help="--reasoning-base with every other thought one step longer (NOTES.md, session 8)")
    a = p.parse_args(argv)
    out = Path(a.out)
    S = SMOKE if a.smoke else SHAPES
    t_all, times = time.time(), {}

    def stage(name, fn):
        t0 = time.time()
        fn()
        times[name] = time.time() - t0
        print(f"== {name}: {times[name] / 60:.1f} min", flush=True)

    a.reasoning_base |= a.stepwise
    if a.think_part and (a.reasoning_base or a.one_part_base):
        raise ValueError("--think-part adds a part to the default base stage: not with --reasoning-base, --stepwise "
                         "or --one-part-base")
    # The tagged option record (data.TAG_SUFFIX), not with --reasoning-base: measured without it (NOTES.md, session 15)
    tag = not (a.no_tag_record or a.reasoning_base)
    d, kind = out / "data", dict(reasoning_record=a.reasoning_base, stepwise=a.stepwise, tag_record=tag,
                                 multiturn=tag and not a.single_turn)
    if not (d / "test.jsonl").exists():
        stage("data", lambda: data.generate_shapes(d, S["train"], S["test"], a.seed, **kind))
    written = json.loads((d / "shapes_args.txt").read_text()) if (d / "shapes_args.txt").exists() else {}  # none: an old folder
    if any(written.get(k, False) != v for k, v in kind.items()):
        raise ValueError(f"{d} was written for another base stage ({d / 'shapes_args.txt'}: {written}; this run "
                         f"wants {kind}); use another --out")
    # The cold start rehearses the base stage's records (NOTES.md, session 12): 4 cold-start samples and 8
    # records a step, on average. Not with --no-rehearsal (the paper's cold start), nor with
    # --reasoning-base (measured without it: its base stage already writes the thought).
    paper_cold = a.no_rehearsal and not a.reasoning_base          # a cold start of its own, in its own folder
    rehearse = not (a.no_rehearsal or a.reasoning_base)
    base = out / "base"
    cold = out / ("coldstart" + "-norehearsal" * paper_cold + "-onepart" * a.one_part_base
                  + "-think" * a.think_part)  # a folder per base
    epochs = a.base_epochs or S["base_epochs"]
    if not (base / "final").exists():
        stage("base SFT", lambda: main(["--stage", "sft", "--init", "tiny", "--data", str(d / "sft.json"), "--out",
                                        str(base), "--seed", str(a.seed), "--epochs", str(epochs)] + S["base"]))
    trained = torch.load(base / "final" / "train_state.pt", weights_only=False)["args"]["epochs"]
    if trained != epochs:
        raise ValueError(f"{base} was trained for {trained} epochs; this run wants {epochs} (--base-epochs); use another --out")
    # The base stage's second and third parts (NOTES.md, session 18). Direction questions are a plateau for
    # a model from scratch: alone, it reads them after ~250 steps at chance; in the mix of the five types
    # it stays at chance, with a fifth or half of the records about direction. So a part where their option
    # records are 4 records in 5 (the rest rehearse sft.json), at a constant lr, as the plateau's length
    # varies (left after ~350 and ~1,300 steps in two runs), then a part of all of sft.json with every
    # record of the direction clips five more times, at half the lr: it brings back the count questions
    # that the direction part took away, and teaches the descriptions to say what the option answers
    # read (direction words right in the descriptions 50% -> 78%, R1's direction 30 -> 54; NOTES.md,
    # session 19).
    # Each part: its records, then the base stage's flags, then its own (the last --lr wins).
    parts = [] if a.one_part_base else S["direction_parts"] + [S["think_part"]] * a.think_part
    if parts:
        missing = [records for _, records, _ in parts if not (d / records).exists()]
        if missing:  # checked before any part trains
            raise ValueError(f"{d} has no {', '.join(missing)} (an older data.py wrote it): use another --out"
                             + ("" if a.think_part else ", or --one-part-base"))
        for part, records, extra in parts:
            prev, base = base, out / part
            if not (base / "final").exists():
                stage(f"base SFT, {part}", lambda: main(
                    ["--stage", "sft", "--init", str(prev / "final"), "--data", str(d / records),
                     "--rehearse", str(d / "sft.json"), "--out", str(base), "--seed", str(a.seed)]
                    + S["base"] + extra))
    if not (cold / "final").exists():
        stage("cold start", lambda: main(["--stage", "sft", "--init", str(base / "final"), "--data",
                                          str(d / "coldstart.json"), "--out", str(cold), "--seed", str(a.seed)]
                                         + S["cold"] + ["--epochs", "20"] * a.reasoning_base  # only the tags are new
                                         + S["think_cold"] * a.think_part  # only the answer tag is new
                                         + (["--rehearse", str(d / "sft.json"), "--rehearse-ratio", "2",
                                             "--batch-size", "12"] if rehearse else [])))
    beta = "" if a.beta is None else "nokl" if a.beta == 0 else f"beta{a.beta:g}"  # a run dir per setting
    name = "r1" + "".join(f"-{x}" for x, on in (("onepart", a.one_part_base), ("think", a.think_part),
                                                 ("nocold", a.no_coldstart),
                                                 ("norehearsal", paper_cold and not a.no_coldstart),
                                                 (a.reward, a.reward != "penalty"),
                                                 (beta, bool(beta)), ("drgrpo", a.loss_type == "dr_grpo"),
                                                 ("tgrpo", a.tgrpo)) if on)
    r1 = out / name
    grpo_args = ["--stage", "grpo", "--init", str((base if a.no_coldstart else cold) / "final"), "--data",
                 str(d / "train.jsonl"), "--out", str(r1), "--seed", str(a.seed), "--loss-type", a.loss_type] + S["grpo"]
    grpo_args += ["--no-length-reward"] * (a.reward == "format") + ["--no-wrong-penalty"] * (a.reward != "penalty")
    grpo_args += ["--tgrpo"] * a.tgrpo + (["--beta", str(a.beta)] if a.beta is not None else [])
    grpo_args += ["--max-steps", str(a.grpo_steps)] if a.grpo_steps else []
    if not (r1 / "final").exists():
        shutil.rmtree(r1, ignore_errors=True)  # a half-finished run starts over
        stage(f"GRPO ({name})", lambda: main(grpo_args))
    write_curves(r1)

    results = []
    for label, ckpt, mode in (("TinyLLaVA-Video-SFT (base)", base, "option"),
                              ("TinyLLaVA-Video-ColdStart", cold, "reason"),
                              (f"TinyLLaVA-Video-R1 ({name})", r1, "reason")):
        res = out / "eval" / f"{ckpt.name}-{mode}.json"
        if not res.exists():
            res.parent.mkdir(parents=True, exist_ok=True)
            stage(f"eval {ckpt.name} ({mode})", lambda: evaluate.main(
                ["--model", str(ckpt / "final"), "--bench", "jsonl", "--data-root", str(d / "test.jsonl"),
                 "--mode", mode, "--out", str(res), "--name", label, "--reason-sep", "space",
                 "--max-new-tokens", str(S["eval_tokens"][mode])]))
        results.append(json.loads(res.read_text()))
    print(f"\nshapes test set ({len(results[0]['items'])} clips), accuracy in %:")
    print(evaluate.table(results))
    # A few clips either way are the test set's noise: McNemar's test on the clips only one model gets right
    comparisons = {f"R1 - {who}": evaluate.paired_comparison(results[2]["items"], results[k]["items"])
                   for k, who in ((1, "cold start"), (0, "base"))}
    print("\nR1 on the same clips (evaluate.paired_comparison):\n" + "\n".join(
        f"  {k}: {c['diff']:+.1f} points (R1 alone right on {c['a_only']}, the other alone on {c['b_only']}; "
        f"McNemar exact p = {c['p']:.2g})" for k, c in comparisons.items()))
    per_task = {r["name"]: r["summary"]["tasks"] for r in results}
    print("\nper question type:\n" + "\n".join(f"  {n}: " + ", ".join(f"{t} {v:.0f}" for t, v in ts.items())
                                                 for n, ts in per_task.items()))
    # Does the tag's letter follow from the thought? (README, Status: mostly not; the tag reads the clip itself)
    problems = {it.id: it.problem for it in evaluate.load_jsonl(d / "test.jsonl")}
    print("\nthe thoughts (Reason mode; evaluate.thought_agreement):")
    for r in results[1:]:
        r["thoughts"] = evaluate.thought_agreement(r["items"], problems)
        print(f"  {r['name']}: the thought names an option in {r['thoughts']['stated']:.0f}%, the right one in "
              f"{r['thoughts']['read_off']:.0f}% (read off), the tag's letter in {r['thoughts']['agree']:.0f}%")
    print(f"\ntotal time {(time.time() - t_all) / 60:.1f} min (this run's stages: "
          + ", ".join(f"{k} {v / 60:.1f}" for k, v in times.items()) + ")")
    return {"results": results, "comparisons": comparisons, "times": times, "curves": r1 / "curves.csv"}


# Sizes of the pipeline: the full run (21-30 minutes on 2 cores, as the machine's speed varies; see README) and the CI smoke run (seconds).
# The base stage's lr 1e-3: at 2e-3 its Option accuracy ranged 43-64% with the random initialisation, at
# 1e-3 three seeds gave 59-65% (NOTES.md, session 9); 3 epochs instead of 2: 84.4% (NOTES.md, session 11).
# 4 epochs (--base-epochs 4) give a better cold start and R1, but GRPO adds less to them and the
# completions shorten: 3 stays the default, where GRPO shows more of what it does (NOTES.md, session 14).
# The base data's tagged option record (data.TAG_SUFFIX; shapes_pipeline, --no-tag-record): R1 72.4% against
# 63.2, the format reward 0.921 against 0.891 (NOTES.md, session 15). Asked as the description's second turn
# (--single-turn: a record of its own), so the letter is read after text, as after a thought: R1 81.6 / 84.0
# / 82.4 over GRPO seeds against 72.4 / 73.2 / 76.8, cold start 71.6 against 56.4 (NOTES.md, session 16).
# The cold start's rehearsal (added in shapes_pipeline, which knows the data folder): R1 72.0% against
# 65.2 without (NOTES.md, session 12).
# The cold start's lr 1e-3 (5e-4 until session 19): from the same base, 58.0% Reason with 34 unparsed against
# 51.6 with 47, 72% of sampled completions well-formed against 56%; over three GRPO seeds R1 84.4-86.0 against
# 78.8-82.0 and a format reward of 0.92-0.94 against 0.83-0.87 (NOTES.md, session 20).
# GRPO at lr 3e-4 with beta 0.1 (the paper: 0.01): at 1e-4 GRPO moved too little, at 3e-4 with beta 0.01
# it emptied the thoughts (NOTES.md, session 10).
SHAPES = dict(train=2000, test=250, eval_tokens={"option": 4, "reason": 96}, base_epochs=3,
              base=["--lr", "1e-3", "--warmup", "0.05", "--batch-size", "16", "--save-every", "100000",
                    "--train-vision", "--keep-videos-in-memory"],
              direction_parts=[("base-direction", "sft-direction.json",
                                ["--epochs", "60", "--rehearse-ratio", "0.25", "--schedule", "constant"]),
                               ("base-all", "sft-direction-all.json",
                                ["--epochs", "5", "--rehearse-ratio", "1", "--lr", "5e-4"])],
              # --think-part (NOTES.md, session 23): 2 epochs of its 4,000 records rehearse each of sft.json's 6,000 once
              think_part=("base-think", "sft-think.json", ["--epochs", "2", "--rehearse-ratio", "0.75", "--lr", "5e-4"]),
              think_cold=["--lr", "1e-4", "--epochs", "20"],
              cold=["--lr", "1e-3", "--schedule", "constant", "--warmup", "0", "--batch-size", "4", "--epochs", "60",
                    "--keep-videos-in-memory"],
              grpo=["--lr", "3e-4", "--beta", "0.1", "--G", "8", "--prompts-per-rank", "8", "--max-new-tokens", "96",
                    "--ml", "120", "--max-steps", "200", "--sample-every", "25", "--save-every", "100000", "--micro-batch", "8",
                    "--keep-videos-in-memory"])
SMOKE = dict(train=20, test=5, eval_tokens={"option": 2, "reason": 8}, base_epochs=1,
             base=["--lr", "2e-3", "--batch-size", "8", "--max-steps", "2", "--quiet", "--train-vision"],
             direction_parts=[(part, records, ["--epochs", "2", "--rehearse-ratio", "1", "--max-steps", "1"])
                              for part, records, _ in SHAPES["direction_parts"]],
             think_part=(*SHAPES["think_part"][:2], ["--epochs", "1", "--rehearse-ratio", "1", "--max-steps", "1"]),
             think_cold=["--lr", "5e-5"],
             cold=["--lr", "1e-4", "--schedule", "constant", "--batch-size", "4", "--max-steps", "1", "--quiet"],
             grpo=["--lr", "1e-4", "--G", "4", "--prompts-per-rank", "2", "--max-new-tokens", "8", "--ml", "300",
                   "--max-steps", "2", "--quiet"])


def write_curves(run):
    """Figure 4's curves from a GRPO run's metrics.jsonl: curves.csv always, curves.png with matplotlib."""
    rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    keys = ["step", "completion_length", "rewards/accuracy", "rewards/format", "reward", "kl", "well_formed",
            "think_length", "rewards/temporal"]
    # "" where a run did not log a key: older runs, or rewards/temporal without --tgrpo
    lines = [",".join(keys)] + [",".join(str(r.get(k, "")) for k in keys) for r in rows]
    (run / "curves.csv").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, k in zip(axes, keys[1:4]):
        ax.plot([r["step"] for r in rows], [r[k] for r in rows], lw=0.8)
        ax.set_title(k)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(run / "curves.png", dpi=120)


def format_row(row, total, eta):
    if "reward" in row:
        temporal = f"| temporal {row['rewards/temporal']:.3f} " if "rewards/temporal" in row else ""
        body = (f"reward {row['reward']:+.3f} ± {row['reward_std']:.3f} | acc {row['rewards/accuracy']:.3f} "
                f"| format {row['rewards/format']:.3f} (well-formed {row['well_formed']:.2f}, think {row['think_length']:.0f} ch) "
                f"{temporal}| len {row['completion_length']:6.1f} | kl {row['kl']:.4f} | clip {row['clip_ratio']:.3f}")
    else:
        body = f"loss {row['loss']:.4f} | tokens {row['tokens']}"
        body += f" | video gain {row['video_gain']:.3f}" if "video_gain" in row else ""
    skipped = f" | skipped {row['skipped_total']}" if row.get("skipped_total") else ""
    rollout = f" (rollout {row['sec_rollout']:.2f} s)" if "sec_rollout" in row else ""
    peak = f" | peak {row['peak_gib']:.1f} GiB" if "peak_gib" in row else ""
    return (f"step {row['step']:5d}/{total} | {body} | lr {row['lr']:.2e} | {row['sec']:.2f} s/step{rollout} "
            f"| eta {eta / 60:.1f} min{skipped}{peak}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["shapes"]:
        shapes_pipeline(sys.argv[2:])
    else:
        main()
        if "RANK" in os.environ:
            # Under torchrun, everything is on disk now: leave without the interpreter's teardown. With
            # --fsdp, DTensor's caches keep the gloo process group alive past destroy_process_group, and
            # its worker threads, stopped during the teardown, can abort a finished run (SIGABRT, seen
            # once in CI; NOTES.md, session 20).
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
