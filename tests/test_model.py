"""model.py: released layout, connector vs a slow loop, KV-cache decoding, checkpoints, sampler."""
import copy
import json
import os
import math

import pytest
import torch

import data
import model as M


def released_names():
    """The released checkpoint's parameter names and shapes, written out by hand from the release's model.safetensors.index.json."""
    out = {}
    lm = "language_model.model."
    out[lm + "embed_tokens.weight"] = (151936, 2048)
    for i in range(36):
        p = f"{lm}layers.{i}."
        for n, shape in [("q_proj", (2048, 2048)), ("k_proj", (256, 2048)), ("v_proj", (256, 2048))]:
            out[p + f"self_attn.{n}.weight"], out[p + f"self_attn.{n}.bias"] = shape, shape[:1]
        out[p + "self_attn.o_proj.weight"] = (2048, 2048)
        out[p + "mlp.gate_proj.weight"] = out[p + "mlp.up_proj.weight"] = (11008, 2048)
        out[p + "mlp.down_proj.weight"] = (2048, 11008)
        out[p + "input_layernorm.weight"] = out[p + "post_attention_layernorm.weight"] = (2048,)
    out[lm + "norm.weight"] = (2048,)
    v = "vision_tower._vision_tower.vision_model."
    out[v + "embeddings.patch_embedding.weight"], out[v + "embeddings.patch_embedding.bias"] = (1152, 3, 14, 14), (1152,)
    out[v + "embeddings.position_embedding.weight"] = (729, 1152)
    for i in range(27):
        p = f"{v}encoder.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[p + f"self_attn.{n}.weight"], out[p + f"self_attn.{n}.bias"] = (1152, 1152), (1152,)
        for n in ("layer_norm1", "layer_norm2"):
            out[p + f"{n}.weight"] = out[p + f"{n}.bias"] = (1152,)
        out[p + "mlp.fc1.weight"], out[p + "mlp.fc1.bias"] = (4304, 1152), (4304,)
        out[p + "mlp.fc2.weight"], out[p + "mlp.fc2.bias"] = (1152, 4304), (1152,)
    out[v + "post_layernorm.weight"] = out[v + "post_layernorm.bias"] = (1152,)
    h = v + "head."
    out[h + "probe"] = (1, 1, 1152)
    out[h + "attention.in_proj_weight"], out[h + "attention.in_proj_bias"] = (3456, 1152), (3456,)
    out[h + "attention.out_proj.weight"], out[h + "attention.out_proj.bias"] = (1152, 1152), (1152,)
    out[h + "layernorm.weight"] = out[h + "layernorm.bias"] = (1152,)
    out[h + "mlp.fc1.weight"], out[h + "mlp.fc1.bias"] = (4304, 1152), (4304,)
    out[h + "mlp.fc2.weight"], out[h + "mlp.fc2.bias"] = (1152, 4304), (1152,)
    c = "connector._connector."
    out[c + "latents"] = (32, 2048)
    out[c + "linear.weight"], out[c + "linear.bias"] = (2048, 1152), (2048,)
    for i in range(3):
        p = f"{c}layers.{i}."
        for n in ("norm_media", "norm_latents"):
            out[p + f"0.{n}.weight"] = out[p + f"0.{n}.bias"] = (2048,)
        out[p + "0.to_q.weight"], out[p + "0.to_kv.weight"], out[p + "0.to_out.weight"] = (512, 2048), (1024, 2048), (2048, 512)
        out[p + "1.0.weight"] = out[p + "1.0.bias"] = (2048,)
        out[p + "1.1.weight"], out[p + "1.3.weight"] = (8192, 2048), (2048, 8192)
    out[c + "norm.weight"] = out[c + "norm.bias"] = (2048,)
    return out


def test_full_size_layout_matches_release():
    with torch.device("meta"):
        m = M.TinyLlavaVideo(M.Config())
    state = {k: tuple(v.shape) for k, v in m.state_dict().items() if k in M.expected_keys(m)}
    assert state == released_names()
    connector = sum(p.numel() for p in m.connector.parameters())
    assert 110e6 < connector < 120e6                         # about 116 M at full size
    assert 3.6e9 < sum(p.numel() for p in m.parameters()) < 3.9e9  # ~3.7B (lm_head tied)
    assert m.language_model.lm_head.weight is m.language_model.model.embed_tokens.weight


# ---- connector against a slow, obviously-correct loop ---------------------------------------

def slow_layernorm(x, ln):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def slow_resampler(r, feats, group):
    """One chunk at a time, one head at a time, plain matrix formulas."""
    x = feats.reshape(-1, feats.shape[-1]) @ r.linear.weight.T + r.linear.bias   # (T*P, D)
    L = x.shape[0]
    sizes = [L // group + (1 if g < L % group else 0) for g in range(group)]     # first L % group get one more
    outs, start = [], 0
    for n in sizes:
        chunk, start = x[start:start + n], start + n
        lat = r.latents.clone()
        for attn, ff in r.layers:
            xm, ll = slow_layernorm(chunk, attn.norm_media), slow_layernorm(lat, attn.norm_latents)
            q = ll @ attn.to_q.weight.T
            kv = torch.cat([xm, ll]) @ attn.to_kv.weight.T
            k, v = kv[:, :kv.shape[1] // 2], kv[:, kv.shape[1] // 2:]
            d = q.shape[1] // attn.heads
            heads = []
            for h in range(attn.heads):
                s = slice(h * d, (h + 1) * d)
                w = torch.softmax((q[:, s] / math.sqrt(d)) @ k[:, s].T, dim=-1)
                heads.append(w @ v[:, s])
            lat = torch.cat(heads, 1) @ attn.to_out.weight.T + lat
            hdn = slow_layernorm(lat, ff[0]) @ ff[1].weight.T
            hdn = 0.5 * hdn * (1 + torch.erf(hdn / math.sqrt(2)))            # exact-erf GELU
            lat = hdn @ ff[3].weight.T + lat
        outs.append(slow_layernorm(lat, r.norm))
    out = torch.cat(outs)
    Q, D = out.shape
    pe = torch.zeros(Q, D)
    for pos in range(Q):
        for i in range(0, D, 2):
            angle = pos / 10000 ** (i / D)
            pe[pos, i], pe[pos, i + 1] = math.sin(angle), math.cos(angle)
    return out + pe.half().float()


@pytest.mark.parametrize("T,P", [(16, 7), (5, 9)])  # 16 equal chunks; 45 tokens -> 13 chunks of 3, 3 of 2
def test_connector_matches_slow_loop(T, P):
    torch.manual_seed(0)
    cfg = M.tiny_config(100)
    cfg.text_config["hidden_size"] = 32
    cfg.vision_config["hidden_size"] = 24
    cfg.resampler_heads, cfg.resampler_dim_head, cfg.num_queries = 2, 8, 48
    r = M.GroupResampler(cfg)
    for p in r.parameters():  # non-trivial LayerNorm weights too
        torch.nn.init.normal_(p, std=0.5)
    feats = torch.randn(T, P, 24)
    with torch.no_grad():
        torch.testing.assert_close(r(feats), slow_resampler(r, feats, cfg.group), atol=2e-4, rtol=2e-4)


def test_sinusoid_is_fp16_rounded():
    pe = M.sinusoid(512, 2048)
    assert pe.dtype == torch.float16 and pe[3, 0].item() == torch.tensor(math.sin(3.0)).half().item()
    assert pe[3, 1].item() == torch.tensor(math.cos(3.0)).half().item()


# ---- a tiny model with its tokenizer -------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    texts = ["the red circle moves left", "<think>so the answer is B</think> <answer>B</answer>",
             "A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:"] * 20
    tok = M.build_tokenizer(texts, tmp_path_factory.mktemp("tok"), vocab_size=300)
    m = M.TinyLlavaVideo(M.tiny_config(len(tok))).eval()
    prompt = torch.tensor(data.tokenize_prompt(tok, "USER: <image>\nthe red circle ASSISTANT:"))
    pixels = torch.randn(16, 3, 32, 32)
    return m, tok, prompt, pixels


def test_tokenizer_and_prompt_ids(tiny):
    m, tok, prompt, _ = tiny
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.eos_token_id == m.cfg.text_config["eos_token_id"]
    assert (prompt == data.IMAGE_TOKEN_INDEX).sum() == 1 and prompt[0] != tok.bos_token_id or tok.bos_token_id is None
    assert tok.decode(tok("<think>x</think>", add_special_tokens=False).input_ids) == "<think>x</think>"
    with pytest.raises(ValueError, match="exactly one <image>"):
        data.tokenize_prompt(tok, "no video here")


def greedy_slow(m, prompt, video, steps):
    """Greedy decoding by a full forward of the whole sequence at every step (no cache)."""
    ids = prompt.clone()
    out = []
    for _ in range(steps):
        logits, _ = m(ids[None], torch.ones(1, len(ids)), video[None])
        nxt = logits[0, -1].argmax()
        out.append(int(nxt))
        ids = torch.cat([ids, nxt[None]])
    return out


def test_incremental_decoding_equals_full_forward(tiny, sharp):
    _, _, prompt, pixels = tiny
    m = sharp
    with torch.no_grad():
        video = m.encode_video(pixels)
        ids, mask = M.sample(m, [prompt], video[None], G=3, max_new_tokens=12, temperature=0, eos_id=-1)
        assert ids.shape == (3, 12) and mask.all()
        assert ids[0].tolist() == ids[2].tolist() == greedy_slow(m, prompt, video, 12)
        # the log-probs of one batched forward equal the step-by-step ones
        logp = m.completion_logprobs(prompt, video, ids)
        seq = torch.cat([prompt, ids[0]])
        logits, _ = m(seq[None], torch.ones(1, len(seq)), video[None])
        step = logits[0, -13:-1].log_softmax(-1).gather(-1, ids[0, :, None]).squeeze(-1)
        torch.testing.assert_close(logp[0], step, atol=1e-5, rtol=1e-5)
        # the entropy at each position, against torch.distributions on the step-by-step logits
        logp2, entropy = m.completion_logprobs(prompt, video, ids, entropy=True)
        want = torch.distributions.Categorical(logits=logits[0, -13:-1]).entropy()
        torch.testing.assert_close(entropy[0], want, atol=1e-5, rtol=1e-5)
        assert torch.equal(logp2, logp) and entropy.shape == ids.shape


def test_encode_videos_equals_one_video_at_a_time(tiny):
    m, _, _, pixels = tiny
    videos = [pixels, torch.randn(5, 3, 32, 32), pixels[:1]]  # 16, 5 and 1 frames
    with torch.no_grad():
        batched = m.encode_videos(videos)
        assert batched.shape == (3, m.cfg.num_queries, m.cfg.hidden_size)
        for b, v in enumerate(videos):
            torch.testing.assert_close(batched[b], m.encode_video(v), atol=1e-5, rtol=1e-5)


def test_batch_sharing_one_video_and_splice_labels(tiny):
    m, _, prompt, pixels = tiny
    video = m.encode_video(pixels)
    ids = torch.stack([prompt, prompt])
    ids = torch.cat([ids, torch.tensor([[5, 6], [7, 0]])], 1)
    mask = torch.ones_like(ids)
    mask[1, -1] = 0                                          # right padding in row 1
    labels = torch.full_like(ids, data.IGNORE_INDEX)
    labels[:, -2:] = torch.tensor([[5, 6], [7, 0]])
    embeds, new_mask, new_labels = m.splice(ids, mask, video[None], labels)
    Q = video.shape[0]
    assert embeds.shape[:2] == (2, len(prompt) + 2 + Q - 1)
    assert new_mask[0].all() and new_mask[1].sum() == len(prompt) + 1 + Q - 1
    assert new_labels[0, -2:].tolist() == [5, 6] and new_labels[1, -2:].tolist() == [7, data.IGNORE_INDEX]
    k = int((prompt == data.IMAGE_TOKEN_INDEX).nonzero())
    torch.testing.assert_close(embeds[1, k:k + Q], video)
    with pytest.raises(ValueError, match="image tokens"):
        m.splice(torch.tensor([[1, 2, 3]]), torch.ones(1, 3), video[None])


def test_save_load_round_trip_exact_and_sharded(tiny, tmp_path):
    m, tok, prompt, pixels = tiny
    for shard in (5 * 2**30, 200_000):  # one file; several shards with an index
        path = tmp_path / f"ckpt{shard}"
        M.save_pretrained(m, path, tok, max_shard_bytes=shard)
        if shard < 2**30:
            index = json.loads((path / "model.safetensors.index.json").read_text())
            assert len(set(index["weight_map"].values())) > 1
        cfg = json.loads((path / "config.json").read_text())
        assert cfg["model_type"] == "tinyllava" and cfg["connector_type"] == "groupresampler"
        assert cfg["vision_feature_layer"] == -2 and cfg["image_token_index"] == -200
        m2, tok2 = M.from_pretrained(path)
        a, b = m.state_dict(), m2.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert m2.language_model.lm_head.weight is m2.language_model.model.embed_tokens.weight
        assert tok2("the red circle").input_ids == tok("the red circle").input_ids


def test_load_errors_list_names(tiny, tmp_path):
    m, tok, _, _ = tiny
    from safetensors.torch import load_file, save_file
    path = tmp_path / "c"
    M.save_pretrained(m, path, tok)
    state = load_file(str(path / "model.safetensors"))
    state["connector._connector.extra"] = torch.zeros(1)
    del state["connector._connector.latents"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"missing \(1\).*connector._connector.latents.*\n.*unexpected \(1\).*extra"):
        M.from_pretrained(path)
    with pytest.raises(M.UserError, match="`hf download Zhang199"):
        M.from_pretrained("Zhang199/TinyLLaVA-Video-Qwen2.5-3B-Group-16-512-does-not-exist")


def test_untied_lm_head_in_checkpoint_loads(tiny, tmp_path):
    m, tok, _, _ = tiny
    from safetensors.torch import load_file, save_file
    path = tmp_path / "c"
    M.save_pretrained(m, path, tok)
    state = load_file(str(path / "model.safetensors"))
    state["language_model.lm_head.weight"] = state["language_model.model.embed_tokens.weight"].clone()
    save_file(state, str(path / "model.safetensors"))
    m2, _ = M.from_pretrained(path)
    assert torch.equal(m2.language_model.lm_head.weight, m.language_model.lm_head.weight)


def test_save_is_atomic(tiny, tmp_path, monkeypatch):
    m, tok, _, _ = tiny
    path = tmp_path / "c"
    M.save_pretrained(m, path, tok)
    before = (path / "model.safetensors").read_bytes()
    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(M, "save_file", full)
    with pytest.raises(M.UserError, match=r"cannot write the checkpoint .*/c: \[Errno 28\] No space left on "
                                          r"device \(\d+\.\d GiB free there\)"):
        M.save_pretrained(m, path, tok)
    assert (path / "model.safetensors").read_bytes() == before   # the old checkpoint, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]     # no temporary folder left behind
    M.from_pretrained(path)


def test_checkpoint_files_take_the_process_umask(tiny, tmp_path):
    m, tok, _, _ = tiny
    old = os.umask(0o022)
    try:
        M.save_pretrained(m, tmp_path / "c", tok, extra={"train_state.pt": {"step": 1}})
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "c").iterdir()}
    assert modes["model.safetensors"] == modes["train_state.pt"] == modes["config.json"] == 0o644, modes


# ---- the sampler --------------------------------------------------------------------------

def test_sampler_is_deterministic_under_a_seed(tiny):
    m, _, prompt, pixels = tiny
    video = m.encode_video(pixels).detach()
    run = lambda s: M.sample(m, [prompt], video[None], G=4, max_new_tokens=10, eos_id=-1,
                             generators=[torch.Generator().manual_seed(s)])[0]
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


@pytest.fixture(scope="module")
def sharp(tiny):
    """The tiny model with initial weights of std 0.2 instead of 0.02: its next token depends strongly
    on the context (at 0.02 an unmasked pad moves the logits by ~1% of their spread), so a test sees a
    wrong position or a pad that leaks into attention."""
    _, tok, _, _ = tiny
    cfg = M.tiny_config(len(tok))
    cfg.text_config["initializer_range"] = 0.2
    torch.manual_seed(0)
    return M.TinyLlavaVideo(cfg).eval()


def test_a_batch_of_prompts_samples_what_each_prompt_would_alone(tiny, sharp):
    # Three prompts of different lengths (left-padded in the batch), three videos, one seed each:
    # the batched rows equal three separate calls, sampled and greedy.
    _, tok, prompt, pixels = tiny
    m = sharp
    prompts = [prompt, torch.tensor(data.tokenize_prompt(tok, "USER: <image>\nthe ASSISTANT: so the answer is")),
               torch.tensor(data.tokenize_prompt(tok, "<image>"))]
    assert len({len(p) for p in prompts}) == 3
    videos = torch.stack([m.encode_video(pixels), m.encode_video(-pixels), m.encode_video(pixels.flip(0))]).detach()
    seeds = lambda: [torch.Generator().manual_seed(s) for s in (3, 4, 5)]
    for temperature in (1.0, 0):
        ids, mask = M.sample(m, prompts, videos, G=4, max_new_tokens=10, temperature=temperature, eos_id=-1,
                             top_k=0, generators=seeds())
        assert ids.shape == (12, 10) and mask.all()
        for b, (p, g) in enumerate(zip(prompts, seeds())):
            alone, _ = M.sample(m, [p], videos[b:b + 1], G=4, max_new_tokens=10, temperature=temperature,
                                eos_id=-1, top_k=0, generators=[g])
            assert torch.equal(ids[4 * b:4 * b + 4], alone)
    assert ids[0].tolist() == greedy_slow(m, prompts[0], videos[0], 10)  # the last call was greedy
    with pytest.raises(ValueError, match="3 prompts, 2 videos"):
        M.sample(m, prompts, videos[:2], G=2, max_new_tokens=2)


def test_sampler_keeps_its_kv_cache_under_gradient_checkpointing(tiny, sharp):
    # GRPO samples from a model in training mode; with gradient checkpointing on, HF's layers drop the
    # KV cache in training mode, and each new token would attend to itself alone.
    _, _, prompt, pixels = tiny
    m = copy.deepcopy(sharp)
    video = m.encode_video(pixels).detach()
    want = greedy_slow(m, prompt, video, 8)
    m.enable_grad_checkpointing()
    m.train()
    ids, _ = M.sample(m, [prompt], video[None], G=2, max_new_tokens=8, temperature=0, eos_id=-1)
    assert ids[0].tolist() == want
    assert m.language_model.training  # the caller's mode comes back


def test_top_k_top_p_on_a_hand_made_distribution():
    p = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = p.log()
    keep = lambda **kw: torch.isfinite(M.filter_logits(logits, **kw))[0].tolist()
    assert keep(top_k=2) == [True, True, False, False, False]
    assert keep(top_p=0.8) == [True, True, True, False, False]    # .5 + .2 = .7 < .8: need the third
    assert keep(top_p=0.7) == [True, True, False, False, False]   # .7 reached with two
    assert keep(top_p=0.3) == [True, False, False, False, False]  # never empty
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([M.pick_tokens(logits.expand(1000, -1), 1.0, 3, 1.0, g) for _ in range(20)]).flatten()
    freq = torch.bincount(draws, minlength=5).float() / draws.numel()
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85, atol=0.01, rtol=0)
    assert M.pick_tokens(logits, 0, 0, 1.0, g).item() == 0        # temperature 0: greedy


def test_eos_handling(tiny):
    assert M.completion_mask(torch.tensor([[5, 0, 0], [5, 6, 7], [0, 0, 0], [4, 4, 0]]), 0).tolist() == \
        [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]]
    m, _, prompt, pixels = tiny
    video = m.encode_video(pixels).detach()
    greedy = M.sample(m, [prompt], video[None], G=2, max_new_tokens=12, temperature=0, eos_id=-1)[0][0].tolist()
    # make the first greedy token the eos: every row stops there, and so does the loop
    eos = greedy[0]
    ids, mask = M.sample(m, [prompt], video[None], G=2, max_new_tokens=12, temperature=0, eos_id=eos)
    assert ids.tolist() == [[eos], [eos]] and mask.tolist() == [[1], [1]]
    # sampled rows that end at different times: after its eos a row holds only eos, masked out
    # Same seed, same draws until a row meets the eos: a token row 0 drew at step 2 ends that row.
    draw = lambda e: M.sample(m, [prompt], video[None], G=16, max_new_tokens=6, eos_id=e, top_k=0,
                              generators=[torch.Generator().manual_seed(0)])
    eos = int(draw(-1)[0][0, 2])
    ids, mask = draw(eos)
    ended = 0
    for row, mrow in zip(ids.tolist(), mask.tolist()):
        if eos in row:
            j, ended = row.index(eos), ended + 1
            assert all(t == eos for t in row[j:]) and mrow == [1] * (j + 1) + [0] * (len(row) - j - 1)
        else:
            assert mrow == [1] * len(row)
    assert 0 < ended
