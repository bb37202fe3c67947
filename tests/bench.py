"""
Benchmarks and tooling, kept out of the six files that a reader follows next to the paper. Each benchmark
prints ratios against a baseline measured in the same run; none is a test.

    python tests/bench.py video      load_video (seek to the 16 frames) vs decode-everything-then-pick
    python tests/bench.py sampler    our rollout sampler vs HF generate(); 8 prompts one by one vs together
    python tests/bench.py random-init OUT TOKENIZER_DIR   a full-size model with random weights (GPU figures)
"""
import sys
import time
from pathlib import Path

import av
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import model as M  # noqa: E402


def load_video_reference(path, num_frames=16):
    """The reference's way, the slow baseline of tests/test_data.py and bench_video: decode every
    frame to RGB, then pick data.frame_indices(N, num_frames). Returns uint8 (num_frames, H, W, 3)."""
    with av.open(str(path)) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    return np.stack([frames[i] for i in data.frame_indices(len(frames), num_frames)])


def bench_video(path="/tmp/bench_30s.mp4", repeats=3):
    """Time 16 frames from a 30 s, 30 fps, 640x360 H.264 clip: load_video vs load_video_reference."""
    if not Path(path).exists():
        t = np.arange(900)[:, None, None]
        x = np.arange(640)[None, None, :]
        with av.open(path, "w") as out:
            s = out.add_stream("libx264", rate=30)
            s.width, s.height, s.pix_fmt = 640, 360, "yuv420p"
            for i in range(900):
                img = np.zeros((360, 640, 3), np.uint8)
                img[..., 0] = ((x + 3 * t[i]) % 256).astype(np.uint8)
                img[100:200, (2 * i) % 600:(2 * i) % 600 + 40] = 255
                out.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
            out.mux(s.encode())
    def best(fn):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            frames = fn(path, 16)
            times.append(time.perf_counter() - t0)
        return min(times), frames
    ours, a = best(data.load_video)
    ref, b = best(load_video_reference)
    assert np.array_equal(a, b), "readers disagree"
    print(f"16 frames of {path} (30 s, 30 fps, 640x360 H.264), best of {repeats}:")
    print(f"  decode-all-then-pick {ref * 1000:7.1f} ms\n  load_video           {ours * 1000:7.1f} ms"
          f"\n  speed-up             {ref / ours:7.1f}x")


def bench_sampler(G=8, new_tokens=128, prompt_len=64):
    """Times one rollout group on CPU for a mid-size random model (same weights, same run):
    8 separate generate() calls with batch 1 (the reference code's way), generate() with
    num_return_sequences=G, and `sample`. Every call is forced to make exactly `new_tokens` tokens."""
    torch.manual_seed(0)
    cfg = M.tiny_config(4096)
    cfg.text_config.update(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                           num_key_value_heads=2)
    cfg.vision_config.update(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
    cfg.num_queries = 512  # as released: the prompt the model prefills is ~600 tokens, mostly video
    model = M.TinyLlavaVideo(cfg).eval()
    lm = model.language_model
    pixels = torch.randn(16, 3, cfg.image_size, cfg.image_size)
    prompt = torch.randint(1, 4096, (prompt_len,))
    prompt[10] = data.IMAGE_TOKEN_INDEX
    never = dict(eos_token_id=None, pad_token_id=0)  # no early stop: all three make the same work
    with torch.no_grad():
        def reference_way():
            for _ in range(G):  # the reference: encode the video and prefill again for every sample
                embeds, _, _ = model.splice(prompt[None], torch.ones(1, prompt_len), model.encode_video(pixels)[None])
                lm.generate(inputs_embeds=embeds, do_sample=True, top_k=50, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, **never)
        def hf_batched():
            embeds, _, _ = model.splice(prompt[None], torch.ones(1, prompt_len), model.encode_video(pixels)[None])
            lm.generate(inputs_embeds=embeds, do_sample=True, top_k=50, max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens, num_return_sequences=G, **never)
        def ours():
            M.sample(model, [prompt], model.encode_video(pixels)[None], G=G, max_new_tokens=new_tokens, eos_id=-1,
                   generators=[torch.Generator().manual_seed(0)])
        times = {name: best_of_two(fn) for name, fn in (("reference: 8 x generate(batch 1)", reference_way),
                                                         ("generate(num_return_sequences=8)", hf_batched),
                                                         ("ours: sample()", ours))}
    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"one rollout group: G={G}, {new_tokens} new tokens, {prompt_len}-token prompt + 16 frames "
          f"({cfg.num_queries} video tokens), best of 2, "
          f"{n_params:.0f}M-parameter model, CPU, {torch.get_num_threads()} threads")
    base = times["ours: sample()"]
    for name, t in times.items():
        print(f"  {name:36s} {t:7.2f} s   {t / base:5.2f}x ours")


@torch.no_grad()
def bench_prompts(B=8, G=8, new_tokens=64):
    """Times the rollout of the shapes pipeline's GRPO step on CPU (tiny preset, B prompts x G): one
    `sample` call per prompt against one call for all B (left-padded: the prompts differ in length).
    Same seeds, so both make the same tokens; no early stop, so the same number of them."""
    torch.manual_seed(0)
    model = M.TinyLlavaVideo(M.tiny_config(600)).eval()
    prompts = [torch.randint(1, 600, (40 + 3 * b,)) for b in range(B)]
    for p in prompts:
        p[5] = data.IMAGE_TOKEN_INDEX
    videos = torch.stack([model.encode_video(torch.randn(16, 3, 32, 32)) for _ in range(B)])
    seeds = lambda: [torch.Generator().manual_seed(b) for b in range(B)]
    one_by_one = lambda: torch.cat([M.sample(model, [p], v[None], G, new_tokens, eos_id=-1, generators=[g])[0]
                                    for p, v, g in zip(prompts, videos, seeds())])
    together = lambda: M.sample(model, prompts, videos, G, new_tokens, eos_id=-1, generators=seeds())[0]
    assert torch.equal(one_by_one(), together())
    apart, batched = best_of_two(one_by_one), best_of_two(together)
    print(f"{B} prompts x G={G}, {new_tokens} new tokens, tiny preset, CPU, {torch.get_num_threads()} threads, best of 2:"
          f" one sample() per prompt {apart:.2f} s, one for all {batched:.2f} s: {apart / batched:.2f}x")


def random_checkpoint(out, tokenizer_dir, device="cpu"):
    """Write a full-size model (Config(): the released shapes, ~3.7B parameters) with random weights, in
    bf16 and the released layout, with the tokenizer of `tokenizer_dir` beside it: a stand-in for the
    release on machines that cannot download it, for speed and memory figures (README, The paper's
    recipe on GPUs).
    A shapes run's tokenizer has ~600 ids against the model's 151936 rows; sampled ids past its
    vocabulary decode to nothing, and eos (id 0) is drawn about once in 151936 tokens, so every
    completion runs to the token cap: the worst case for time and memory."""
    torch.manual_seed(0)
    with torch.device(device):  # a GPU initialises 3.7B parameters in seconds, a CPU in minutes
        model = M.TinyLlavaVideo(M.Config())
    tok = M.AutoTokenizer.from_pretrained(tokenizer_dir, config=M.PretrainedConfig())
    model.cfg.text_config.update(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    M.save_pretrained(model, out, tok, dtype=torch.bfloat16)


def best_of_two(fn):
    """The shorter of two timed calls of fn(), in seconds."""
    runs = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return min(runs)


if __name__ == "__main__":
    if sys.argv[1:] == ["video"]:
        bench_video()
    elif sys.argv[1:] == ["sampler"]:
        bench_sampler()
        bench_prompts()
    elif sys.argv[1:2] == ["random-init"] and len(sys.argv) == 4:
        random_checkpoint(sys.argv[2], sys.argv[3], "cuda" if torch.cuda.is_available() else "cpu")
    else:
        print(__doc__)
