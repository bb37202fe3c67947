"""
TinyLLaVA-Video (Group-16-512): SigLIP vision tower -> group Perceiver resampler -> Qwen2.5-3B.

    frames (T, 3, 384, 384)
      -> vision tower (SigLIP, frozen): hidden_states[-2], token 0 dropped     (T, 728, 1152)
      -> connector (group resampler, written here): 16 groups x 32 latents    (512, 2048)
      -> spliced into the prompt where the <image> id -200 stands
      -> language model (Qwen2ForCausalLM)                                    logits

Also here: loading and saving checkpoints in the released layout (Zhang199/TinyLLaVA-Video-*), a tiny
preset for the shapes task, and the sampler of GRPO's rollouts, written by hand: encode each video
once, prefill each prompt once, copy its KV cache G times, decode all prompts' G rows together.

Benchmarks (our sampler against HF generate(), prompts one by one against together) and a full-size
random checkpoint for GPU figures: python tests/bench.py sampler | random-init OUT TOKENIZER_DIR
"""
import json
import math
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import (AutoTokenizer, DynamicCache, PretrainedConfig, Qwen2Config, Qwen2ForCausalLM,
                          SiglipVisionConfig, SiglipVisionModel)

from data import IGNORE_INDEX, IMAGE_TOKEN_INDEX, UserError


# -----------------------------------------------------------------------------
# Config

QWEN25_3B = dict(  # the released text_config: Qwen2.5-3B base
    vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
    num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=32768,
    rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu",
    bos_token_id=151643, eos_token_id=151643, use_sliding_window=False, sliding_window=32768,
    max_window_layers=36, attention_dropout=0.0, initializer_range=0.02)
SIGLIP_SO400M = dict(  # the released vision_config
    hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
    patch_size=14, image_size=384, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
    num_channels=3, attention_dropout=0.0)


@dataclass
class Config:
    text_config: dict = field(default_factory=lambda: dict(QWEN25_3B))      # Qwen2 config dict
    vision_config: dict = field(default_factory=lambda: dict(SIGLIP_SO400M))  # SigLIP vision config dict
    group: int = 16                  # the flattened frame tokens are split into this many chunks
    num_queries: int = 512           # connector outputs in all; num_queries / group latents per chunk
    num_resampler_layers: int = 3    # attention + feed-forward blocks of the resampler
    resampler_heads: int = 8         # not in the released config.json: the reference fixes 8 x 64
    resampler_dim_head: int = 64
    latents_init_std: float = 1.0    # the reference's randn; the tiny preset starts smaller (see tiny_config)
    vision_feature_layer: int = -2   # which hidden state of the vision tower feeds the connector
    image_token_index: int = IMAGE_TOKEN_INDEX
    pad_token: str = "<|endoftext|>"  # = eos for Qwen2.5 base

    @property
    def hidden_size(self):
        return self.text_config["hidden_size"]

    @property
    def vision_hidden_size(self):
        return self.vision_config["hidden_size"]

    @property
    def image_size(self):
        return self.vision_config["image_size"]


def tiny_config(vocab_size):
    """The CPU preset for the shapes task: same architecture, ~3M parameters.
    32-px frames in 8-px patches (15 tokens per frame after dropping token 0), 16 groups x 4 latents.
    Its latents start at std 0.02, not 1: trained from scratch, latents of norm ~11 would drown the
    small video-dependent part of the resampler's output, and the model learns to ignore the video."""
    text = dict(QWEN25_3B, vocab_size=vocab_size, hidden_size=128, intermediate_size=384,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=1024, bos_token_id=0, eos_token_id=0, max_window_layers=4,
                rope_theta=10000.0)
    vision = dict(SIGLIP_SO400M, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=2, patch_size=8, image_size=32)
    return Config(text_config=text, vision_config=vision, group=16, num_queries=64,
                  num_resampler_layers=2, resampler_heads=4, resampler_dim_head=32, latents_init_std=0.02)


def new_tiny(tokenizer, seed):
    """A new tiny model for `tokenizer`, initialised from `seed`: the same weights for the same two."""
    torch.manual_seed(seed)
    return TinyLlavaVideo(tiny_config(len(tokenizer)))


# -----------------------------------------------------------------------------
# The connector: a group Perceiver resampler (the reference's tinyllava/model/connector/groupresampler.py)

class PerceiverAttention(nn.Module):
    """Latents attend to [media tokens ; latents] (Flamingo's resampler attention)."""

    def __init__(self, dim, heads, dim_head):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * dim_head, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim, bias=False)

    def forward(self, x, latents):
        # x: (B, n, D) media tokens of one chunk; latents: (B, m, D)
        x, latents = self.norm_media(x), self.norm_latents(latents)
        q = self.to_q(latents)                                         # (B, m, h*d)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, -1)  # (B, n+m, h*d) each
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))  # (B, h, ., d)
        attn = (q * self.scale @ k.transpose(-1, -2)).softmax(-1)      # (B, h, m, n+m)
        out = (attn @ v).transpose(1, 2).flatten(2)                    # (B, m, h*d)
        return self.to_out(out)                                        # (B, m, D)


def feed_forward(dim, mult=4):
    # Names must be .0 (LayerNorm), .1, .3 (Linear) to match the checkpoint: GELU sits at .2
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


def sinusoid(n, dim):
    """Positional encoding over n positions (groupresampler.py's): pe[:, 0::2] = sin(pos * div),
    pe[:, 1::2] = cos(pos * div), div = exp(arange(0, dim, 2) * -ln(10000) / dim). Computed in fp32
    and rounded to fp16, as the reference builds it in fp16. Returns float16 (n, dim)."""
    pos = torch.arange(n, dtype=torch.float32)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    pe = torch.zeros(n, dim)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe.half()


class GroupResampler(nn.Module):
    """The "groupresampler" connector: a Perceiver resampler run on each of `group` chunks of the
    video's token sequence, from one shared set of latents.

    forward: (T, P, Dv) frame features of ONE video -> (num_queries, D)
        flatten in time order          (1, T*P, Dv)
        linear                         (1, T*P, D)
        split into `group` chunks      the first (T*P) % group chunks get one extra token
        per chunk, from the shared latents (m = num_queries / group, D):
            3 x [latents = attn(chunk, latents) + latents; latents = ff(latents) + latents]
            final LayerNorm            (m, D)
        concatenate the chunks         (num_queries, D)
        + sinusoidal positions         (num_queries, D)
    """

    def __init__(self, cfg):
        super().__init__()
        D, self.group = cfg.hidden_size, cfg.group
        assert cfg.num_queries % cfg.group == 0, "num_queries must be a multiple of group"
        self.latents = nn.Parameter(torch.randn(cfg.num_queries // cfg.group, D) * cfg.latents_init_std)
        self.linear = nn.Linear(cfg.vision_hidden_size, D)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(D, cfg.resampler_heads, cfg.resampler_dim_head), feed_forward(D)])
            for _ in range(cfg.num_resampler_layers))
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        x = self.linear(x.flatten(0, 1)[None])                   # (1, T*P, D)
        chunks = torch.tensor_split(x, self.group, dim=1)         # group x (1, n_g, D)
        if len({c.shape[1] for c in chunks}) == 1:
            out = self.resample(torch.cat(chunks))                # equal chunks: one batched pass
        else:
            out = torch.cat([self.resample(c) for c in chunks])   # (group, m, D)
        out = out.flatten(0, 1)                                   # (num_queries, D)
        return out + sinusoid(out.shape[0], out.shape[1]).to(out)

    def resample(self, chunks):
        latents = self.latents.expand(chunks.shape[0], -1, -1)    # (B, m, D), shared by all chunks
        for attn, ff in self.layers:
            latents = attn(chunks, latents) + latents
            latents = ff(latents) + latents
        return self.norm(latents)                                 # (B, m, D)


class Connector(nn.Module):
    # Holder, so parameter names read connector._connector.* as in the released checkpoint.
    def __init__(self, cfg):
        super().__init__()
        self._connector = GroupResampler(cfg)

    def forward(self, x):
        return self._connector(x)


class VisionTower(nn.Module):
    """SigLIP, frozen; features = hidden_states[-2] with token 0 dropped (the "patch" strategy).

    Frozen in every stage of the paper (its SigLIP comes pretrained). Only a tiny model built from
    scratch trains its tower, in its base stage (`unfreeze`): a random frozen one read less (base
    84.0% Option against 87.6, count 88 against 98, in a pair of runs)."""

    def __init__(self, cfg):
        super().__init__()
        self._vision_tower = nn.Module()  # names: vision_tower._vision_tower.vision_model.*
        self._vision_tower.vision_model = SiglipVisionModel(SiglipVisionConfig(**cfg.vision_config))
        self.feature_layer = cfg.vision_feature_layer
        self.trainable = False
        self.requires_grad_(False)

    def unfreeze(self):
        self.trainable = True
        self.requires_grad_(True)

    def train(self, mode=True):
        return super().train(mode and self.trainable)  # frozen: always eval mode

    def forward(self, pixels):
        # pixels: (T, 3, S, S) in [-1, 1] -> (T, P - 1, Dv)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            out = self._vision_tower.vision_model(pixel_values=pixels, output_hidden_states=True)
            return out.hidden_states[self.feature_layer][:, 1:]


# -----------------------------------------------------------------------------
# The model

class TinyLlavaVideo(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.language_model = Qwen2ForCausalLM(Qwen2Config(**cfg.text_config))
        self.vision_tower = VisionTower(cfg)
        self.connector = Connector(cfg)

    # The pipeline, a method a stage: vision_features -> connect -> splice -> language model. Each stage
    # that runs parameters is an FSDP forward method (shard_model), so callers never reach a submodule.

    def vision_features(self, pixels):
        """1. The frozen vision tower: pixels float (T, 3, S, S) in [-1, 1] -> features (T, P, Dv), with
        P = (S / patch)^2 - 1 (hidden_states[-2], token 0 dropped). Frozen in every stage of the paper, so a
        GRPO step runs it once per video and shares the features among the rollout, the policy's
        backward and the reference model."""
        return self.vision_tower(pixels.to(self.connector._connector.linear.weight.dtype))

    def connect(self, features):
        """2. The connector: a list of B float (T_b, P, Dv), one per video -> video embeddings (B, Q, D).
        Gradient flows when called outside no_grad (the connector is trained)."""
        return torch.stack([self.connector(f) for f in features])

    def encode_video(self, pixels):
        """Stages 1 and 2 for one video: float (T, 3, S, S) -> (Q, D)."""
        return self.connect([self.vision_features(pixels)])[0]

    def encode_videos(self, videos):
        """Stages 1 and 2 for a batch: list of B float (T_b, 3, S, S) -> (B, Q, D). All frames go through
        the vision tower in one batch (frames are independent there); the connector then resamples each
        video's own frames. Equals stacking encode_video per video."""
        feats = self.vision_features(torch.cat(videos))                  # (sum T_b, P, Dv)
        return self.connect(feats.split([len(v) for v in videos]))

    def enable_grad_checkpointing(self):
        """Recompute the language model's activations in the backward (less memory, ~30% more time)."""
        self.language_model.activation_checkpointing_enable()

    def unfreeze_vision(self):
        """Train the vision tower too: only for a tiny model built from scratch (VisionTower)."""
        self.vision_tower.unfreeze()

    def splice(self, input_ids, attention_mask, video_embeds, labels=None):
        """Put the video in place of the <image> id: each row's single -200 becomes num_queries embeddings.

        Args:
            input_ids: long (B, L), right-padded, exactly one -200 among each row's valid tokens.
            attention_mask: (B, L), 1 on valid tokens.  labels: optional long (B, L).
            video_embeds: (B, Q, D) one video per row, or (1, Q, D) shared by all rows.
        Returns: (inputs_embeds (B, L', D), attention_mask (B, L'), labels (B, L') or None), right-padded,
            with L' = max valid length + Q - 1; labels are IGNORE_INDEX on the video and padding.
        Raises: ValueError if a row holds no -200 or more than one.
        """
        embed = self.language_model.get_input_embeddings()
        rows, label_rows = [], []
        for b in range(input_ids.shape[0]):
            ids = input_ids[b, attention_mask[b].bool()]
            at = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten()
            if len(at) != 1:
                raise ValueError(f"row {b} holds {len(at)} image tokens ({IMAGE_TOKEN_INDEX}); expected exactly one")
            k = int(at[0])
            video = video_embeds[b if video_embeds.shape[0] > 1 else 0]
            rows.append(torch.cat([embed(ids[:k]), video.to(embed.weight.dtype), embed(ids[k + 1:])]))
            if labels is not None:
                lab = labels[b, attention_mask[b].bool()]
                label_rows.append(torch.cat([lab[:k], lab.new_full((video.shape[0],), IGNORE_INDEX), lab[k + 1:]]))
        n = max(r.shape[0] for r in rows)
        embeds = torch.stack([F.pad(r, (0, 0, 0, n - r.shape[0])) for r in rows])
        mask = torch.stack([(torch.arange(n, device=input_ids.device) < r.shape[0]).long() for r in rows])
        if labels is not None:
            labels = torch.stack([F.pad(l, (0, n - l.shape[0]), value=IGNORE_INDEX) for l in label_rows])
        return embeds, mask, labels

    def completion_logprobs(self, prompt_ids, video_embeds, completion_ids, entropy=False):
        """Per-token log-probs of G completions of one prompt, in one batched forward. Gradient flows
        when called outside no_grad. (A method, so FSDP can gather the parameters around it.)

        Args: prompt_ids long (P,) with one -200; video_embeds (Q, D); completion_ids long (G, L).
        Returns: float32 (G, L): log pi(o_t | prompt, video, o_<t); with entropy=True also the entropy
            (nats, float32 (G, L), no gradient) of pi(. | prompt, video, o_<t) at each position.
        """
        G, L = completion_ids.shape
        ids = torch.cat([prompt_ids.to(completion_ids.device).expand(G, -1), completion_ids], 1)
        embeds, mask, _ = self.splice(ids, torch.ones_like(ids), video_embeds[None])
        # Only the last L + 1 positions' logits: the one before o_1 predicts o_1, the very last nothing.
        logits = self.language_model(inputs_embeds=embeds, attention_mask=mask, logits_to_keep=L + 1).logits
        logits = logits[:, :-1].float()                                     # (G, L, V)
        lse = logits.logsumexp(-1)
        logp = logits.gather(-1, completion_ids[..., None]).squeeze(-1) - lse
        if not entropy:
            return logp
        with torch.no_grad():  # H = lse - sum_v p_v z_v, one row at a time to bound the (L, V) temporaries
            mean_z = torch.stack([(row.softmax(-1) * row).sum(-1) for row in logits])
        return logp, lse.detach() - mean_z

    def forward(self, input_ids, attention_mask, video_embeds, labels=None):
        """Logits of a batch of prompts+answers. Returns (logits (B, L', V), labels (B, L') or None):
        labels spliced like the inputs, so logits[:, t] predicts labels[:, t + 1]."""
        embeds, mask, labels = self.splice(input_ids, attention_mask, video_embeds, labels)
        logits = self.language_model(inputs_embeds=embeds, attention_mask=mask).logits
        return logits, labels


# -----------------------------------------------------------------------------
# Tokenizer helpers

def build_tokenizer(texts, out_dir, vocab_size=1024):
    """Train the tiny preset's tokenizer: byte-level BPE (as Qwen's), `<|endoftext|>` = eos = pad,
    and the four reasoning tags as single tokens, saved to `out_dir` so that
    AutoTokenizer.from_pretrained(out_dir) loads it. `texts`: iterable of training strings."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", padding_side="right")
    fast.add_tokens(["<think>", "</think>", "<answer>", "</answer>"])  # plain (not special) tokens
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


# -----------------------------------------------------------------------------
# Checkpoints in the released layout (a save_pretrained folder of TinyLlavaForConditionalGeneration)

def config_dict(cfg):
    """The config.json of a checkpoint: the released keys, plus our two resampler keys."""
    d = asdict(cfg)
    return {"architectures": ["TinyLlavaForConditionalGeneration"], "model_type": "tinyllava",
            "connector_type": "groupresampler", "group": cfg.group, "num_queries": cfg.num_queries,
            "num_resampler_layers": cfg.num_resampler_layers, "resampler_heads": cfg.resampler_heads,
            "resampler_dim_head": cfg.resampler_dim_head, "hidden_size": cfg.hidden_size,
            "image_token_index": cfg.image_token_index, "ignore_index": IGNORE_INDEX,
            "image_aspect_ratio": "square", "llm_model_name_or_path": "Qwen/Qwen2.5-3B",
            "tokenizer_name_or_path": "Qwen/Qwen2.5-3B", "tokenizer_model_max_length": 3072,
            "tokenizer_padding_side": "right", "tokenizer_use_fast": False, "pad_token": cfg.pad_token,
            "text_config": d["text_config"], "vision_config": d["vision_config"],
            "vision_model_name_or_path": "google/siglip-so400m-patch14-384",
            "vision_hidden_size": cfg.vision_hidden_size, "vision_feature_layer": cfg.vision_feature_layer,
            "vision_feature_select_strategy": "patch"}


def config_from_dict(d, where="config.json"):
    """Config from a checkpoint's config.json dict. Raises ValueError for another model type or connector."""
    if d.get("model_type") != "tinyllava" or d.get("connector_type", "groupresampler") != "groupresampler":
        raise UserError(f"{where}: model_type {d.get('model_type')!r} / connector_type "
                         f"{d.get('connector_type')!r}; expected 'tinyllava' / 'groupresampler'")
    return Config(text_config=dict(QWEN25_3B, **d["text_config"]),
                  vision_config=dict(SIGLIP_SO400M, **d.get("vision_config", {})),
                  group=d.get("group", 16), num_queries=d.get("num_queries", 512),
                  num_resampler_layers=d.get("num_resampler_layers", 3),
                  resampler_heads=d.get("resampler_heads", 8), resampler_dim_head=d.get("resampler_dim_head", 64),
                  vision_feature_layer=d.get("vision_feature_layer", -2),
                  image_token_index=d.get("image_token_index", IMAGE_TOKEN_INDEX),
                  pad_token=d.get("pad_token", "<|endoftext|>"))


def expected_keys(model):
    """Names a checkpoint must hold: the state dict less the tied lm_head (absent in the release)."""
    keys = set(model.state_dict())
    if model.cfg.text_config.get("tie_word_embeddings", True):
        keys.discard("language_model.lm_head.weight")
    return keys


def resolve(path):
    """A local checkpoint folder, or a hub id ("Zhang199/...") downloaded with huggingface_hub.
    Raises FileNotFoundError naming what to download and where when it is neither."""
    if Path(path).is_dir():
        return Path(path)
    if str(path).count("/") == 1 and not str(path).startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download
            return Path(snapshot_download(str(path)))
        except Exception as e:  # offline, unknown repo, ...: the user must fetch it by hand
            raise UserError(
                f"cannot download {path} ({type(e).__name__}: {str(e)[:200]}). On a machine with internet run "
                f"`hf download {path} --local-dir checkpoints/{Path(str(path)).name}` and pass that folder "
                f"instead") from None
    raise FileNotFoundError(f"checkpoint folder not found: {path}")


def load_state(path):
    """All tensors of a checkpoint folder: model.safetensors, or the shards of model.safetensors.index.json."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")
    state = {}
    for f in files:
        state.update(load_file(str(path / f)))
    return state


def from_pretrained(path, device="cpu", dtype=torch.float32):
    """Load a checkpoint folder in the released layout: config.json, safetensors
    (single file or sharded with an index), tokenizer files.

    Returns: (model, tokenizer), the model on `device` in `dtype`, vision tower frozen.
    Raises: FileNotFoundError (missing folder or weights), ValueError listing every missing and
    unexpected parameter name (no silent partial load) or a shape mismatch.
    """
    path = resolve(path)
    cfg = config_from_dict(json.loads((path / "config.json").read_text()), path / "config.json")
    with torch.device(device):
        model = TinyLlavaVideo(cfg)
    state = load_state(path)
    expected = expected_keys(model)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected - {"language_model.lm_head.weight"})
    if missing or unexpected:
        raise UserError(f"{path}: checkpoint does not match the model.\n  missing ({len(missing)}): {missing[:20]}"
                         f"\n  unexpected ({len(unexpected)}): {unexpected[:20]}")
    own = model.state_dict()
    for k, v in state.items():
        if k in own and own[k].shape != v.shape:
            raise UserError(f"{path}: {k} has shape {tuple(v.shape)} in the checkpoint, {tuple(own[k].shape)} in the model")
    model.load_state_dict(state, strict=False)   # lm_head: tied to the embeddings when absent
    model.language_model.tie_weights()
    model.to(dtype)
    # config=: without it AutoTokenizer reads config.json and warns that model_type "tinyllava" is
    # unknown; the tokenizer's class comes from tokenizer_config.json either way
    return model, AutoTokenizer.from_pretrained(path, config=PretrainedConfig())


def save_pretrained(model, path, tokenizer=None, dtype=None, max_shard_bytes=5 * 2**30, state=None, extra=None):
    """Write a checkpoint folder in the released layout (names, config.json, shards + index), atomically:
    everything goes to a temporary sibling folder that is renamed into place at the end, so a crash
    leaves either the old checkpoint or the new one, never a readable but broken one.

    dtype: cast the weights (the release is bf16); None keeps them (fp32 master weights for resume).
    state: the tensors to write (default: model.state_dict(); train.py passes FSDP's gathered state).
    extra: {file name: object} saved with torch.save into the same folder (the training state).
    Files get the process umask's permissions (0644 under the usual 022), so others can read them.
    Raises: UserError when the disk refuses the write (full, read-only); the temporary folder is removed.
    """
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        _write_folder(tmp, model, tokenizer, dtype, max_shard_bytes, state, extra)
    except (OSError, RuntimeError) as e:  # a full disk (torch.save: RuntimeError), a quota: clean up
        shutil.rmtree(tmp, ignore_errors=True)
        free = shutil.disk_usage(path.parent).free / 2**30
        raise UserError(f"cannot write the checkpoint {path}: {e} ({free:.1f} GiB free there)") from None
    umask = os.umask(0)
    os.umask(umask)
    for f in tmp.iterdir():  # safetensors writes 0600: give the files the process umask, as open() does
        f.chmod(0o666 & ~umask)
    replace_dir(tmp, path)


def _write_folder(tmp, model, tokenizer, dtype, max_shard_bytes, state, extra):
    keys = expected_keys(model)
    state = {k: (v.to(dtype) if dtype else v).detach().cpu().contiguous()
             for k, v in (state if state is not None else model.state_dict()).items() if k in keys}
    shards, size = [{}], 0
    for k in sorted(state):
        nbytes = state[k].numel() * state[k].element_size()
        if size + nbytes > max_shard_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][k], size = state[k], size + nbytes
    if len(shards) == 1:
        save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        (tmp / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (tmp / "config.json").write_text(json.dumps(config_dict(model.cfg), indent=2))
    eos = model.cfg.text_config["eos_token_id"]
    (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": eos, "pad_token_id": eos}))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    for name, obj in (extra or {}).items():
        torch.save(obj, tmp / name)


def claim_run_folder(out, start, resume, overwrite):
    """A run folder belongs to one run. A new run refuses a folder that holds anything (--overwrite
    empties it first); a resumed run keeps the rows of metrics.jsonl and completions.jsonl up to the
    checkpoint's step (the steps after it run again). Temporary folders of saves that were killed
    midway are removed. Raises UserError naming the folder and the ways out."""
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_saves(out)
    if resume:
        for log in (out / "metrics.jsonl", out / "completions.jsonl"):
            if log.exists():
                rows = [l for l in log.read_text().splitlines() if json.loads(l)["step"] <= start]
                log.write_text("".join(r + "\n" for r in rows))
    elif any(out.iterdir()):
        if not overwrite:
            held = ", ".join(sorted(p.name for p in out.iterdir())[:5])
            raise UserError(f"{out} already holds a run ({held}): continue it with --resume "
                            f"{out}/<checkpoint>, or choose another --out (--overwrite replaces it)")
        shutil.rmtree(out)
        out.mkdir()


def remove_stale_saves(folder):
    """Remove the temporary folders (<name>.tmp<pid>, <name>.old) of saves killed midway."""
    for stale in Path(folder).iterdir():
        if stale.is_dir() and re.search(r"\.(tmp\d+|old)$", stale.name):
            shutil.rmtree(stale)


def replace_dir(tmp, path):
    """Move a finished folder `tmp` to `path`, replacing what was there with two renames."""
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


# -----------------------------------------------------------------------------
# Sampling (GRPO's rollouts, evaluation) and log-probs, by hand

def filter_logits(logits, top_k=0, top_p=1.0):
    """Keep the top_k largest logits (0: all), then the smallest set of tokens whose probability sums
    to at least top_p; the rest become -inf. logits: float (N, V). Returns float (N, V)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # tokens after the top_p mass is reached
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def completion_mask(ids, eos_id):
    """1 on completion tokens up to and including the first eos, 0 after (from POSITIONS, never from
    token values: pad = eos in Qwen). ids: long (G, L) -> long (G, L)."""
    is_eos = ids == eos_id
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), ids.shape[1])  # (G,)
    return (torch.arange(ids.shape[1], device=ids.device)[None] <= first[:, None]).long()


def decode_completions(tokenizer, ids, mask):
    """Texts of completions: each row's masked tokens, decoded without special tokens (as the reference's
    reward functions read them).
    ids, mask: long (G, L) as returned by `sample`. Returns list[str] of length G."""
    return [tokenizer.decode(row[m.bool()], skip_special_tokens=True) for row, m in zip(ids.cpu(), mask.cpu())]


@torch.no_grad()
def sample(model, prompts, videos, G=8, max_new_tokens=512, temperature=1.0, top_k=50, top_p=1.0,
           eos_id=None, generators=None):
    """Draw G completions for each of B prompts, each prompt about its own video, decoding all B x G
    rows together (one forward per new token, whatever B is).

    Prefill: each prompt gets its video spliced in, the B sequences are LEFT-padded to one length (so
    every row's next token goes in the same column; the padding is masked out and the positions count
    from each row's first real token), and run once; the KV cache is then copied G times per prompt.
    Decode: token by token; a row stops at its first eos (later positions are filled with eos and
    masked out); all stop when every row has, or at max_new_tokens. Prompt b's draws come from its own
    generator and are discarded once its rows are done, so they do not depend on the other prompts in
    the batch: a batch gives each prompt the completions it would get alone (up to float rounding).

    Args:
        prompts: list of B long (P_b,), each with one -200.  videos: (B, Q, D) connector outputs.
        temperature: 0 means greedy.  top_k: 0 means no top-k.
        generators: None (the global RNG) or a list of B torch.Generator on the model's device.
    Returns: (ids long (B*G, L), mask long (B*G, L)), rows b*G .. b*G + G - 1 for prompt b; L <=
        max_new_tokens; mask from completion_mask.
    Raises: ValueError if the numbers of prompts, videos and generators differ, or (splice) if a
        prompt holds no -200 or more than one.
    """
    lm = model.language_model
    eos_id = lm.config.eos_token_id if eos_id is None else eos_id
    B, gens = len(prompts), generators or [None] * len(prompts)
    if not B == len(videos) == len(gens):
        raise ValueError(f"{B} prompts, {len(videos)} videos and {len(gens)} generators: need one of each per prompt")
    # HF's layers drop the KV cache in training mode when gradient checkpointing is on (GRPO's
    # rollouts run between training steps): decode in eval mode, then restore the caller's mode.
    with eval_mode(lm):
        rows = [model.splice(p.to(videos.device)[None], torch.ones(1, len(p), device=videos.device), v[None])[0][0]
                for p, v in zip(prompts, videos)]                                # B x (P'_b, D)
        n = max(len(r) for r in rows)
        embeds = torch.stack([F.pad(r, (0, 0, n - len(r), 0)) for r in rows])   # (B, n, D), left-padded
        attn = torch.stack([(torch.arange(n, device=videos.device) >= n - len(r)).long() for r in rows])
        pos = (attn.cumsum(1) - 1).clamp(min=0)                                 # each row counts from 0
        cache = DynamicCache()
        logits = lm(inputs_embeds=embeds, attention_mask=attn, position_ids=pos, past_key_values=cache,
                    use_cache=True).logits[:, -1]                              # prefill once per prompt
        cache.batch_repeat_interleave(G)                                       # each prompt's KV cache, G copies
        logits, attn = logits.repeat_interleave(G, 0), attn.repeat_interleave(G, 0)   # (B*G, V), (B*G, n)
        pos = pos[:, -1:].repeat_interleave(G, 0)                              # (B*G, 1): the last position
        done = torch.zeros(B * G, dtype=torch.bool, device=logits.device)
        tokens = []
        for _ in range(max_new_tokens):
            nxt = torch.cat([pick_tokens(l.float(), temperature, top_k, top_p, g)
                             for l, g in zip(logits.split(G), gens)])                 # (B*G,)
            nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
            tokens.append(nxt)
            done |= nxt == eos_id
            if done.all():
                break
            attn, pos = F.pad(attn, (0, 1), value=1), pos + 1
            logits = lm(input_ids=nxt[:, None], attention_mask=attn, position_ids=pos, past_key_values=cache,
                        use_cache=True).logits[:, -1]                              # decode
        ids = torch.stack(tokens, 1)                                               # (B*G, L)
        return ids, completion_mask(ids, eos_id)


@contextmanager
def eval_mode(module):
    """Inside the block `module` is in eval mode; its earlier mode comes back on exit."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def pick_tokens(logits, temperature, top_k, top_p, generator):
    """One token per row: argmax when temperature == 0, else a draw from the filtered softmax."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# -----------------------------------------------------------------------------
# Sharding for data-parallel training (FSDP2), used by train.py --fsdp

def shard_model(model):
    """FSDP2: one unit per decoder layer and the connector, the rest (embeddings, tied lm_head, norm,
    frozen vision tower) in the root unit; bf16 compute and fp32 gradient reduction on CUDA. The
    pipeline's stages become forward methods of the root, so FSDP gathers the parameters around them."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if torch.cuda.is_available() else MixedPrecisionPolicy()
    for layer in model.language_model.model.layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model.connector, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for method in ("vision_features", "connect", "completion_logprobs"):
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


def memory_report(model, world, fsdp, with_reference, device):
    """Bytes per rank for parameters, gradients, AdamW state and the reference model; a warning when
    they exceed the device's memory. Activations and the KV cache come on top. Returns a str."""
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shard = world if fsdp else 1
    parts = {"parameters (fp32)": 4 * n_all / shard, "gradients (fp32)": 4 * n_train / shard,
             "AdamW state (fp32 m, v)": 8 * n_train / shard}
    if with_reference:
        parts["reference model"] = (2 if device.type == "cuda" else 4) * n_all
    total = sum(parts.values())
    lines = [f"memory per rank ({'FSDP over %d ranks' % world if fsdp else 'data parallel'}, "
             f"{n_all / 1e6:.1f}M parameters, {n_train / 1e6:.1f}M trained):"]
    lines += [f"  {k:26s} {v / 2**30:8.2f} GiB" for k, v in parts.items()]
    lines.append(f"  {'total before activations':26s} {total / 2**30:8.2f} GiB")
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
        if total > 0.9 * have:
            lines.append(f"  WARNING: that is more than 90% of this GPU's {have / 2**30:.0f} GiB; "
                         f"try --fsdp, --grad-checkpointing or more GPUs")
    return "\n".join(lines)
