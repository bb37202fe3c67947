"""
Video in, prompts out: everything TinyLLaVA-Video-R1 reads before the model sees a token.

1. load_video       -- the 16 frames of a clip, picked as tinyllava/data/video_preprocess.py picks them
2. preprocess       -- frames -> SigLIP pixels: bicubic resize to S x S, x / 127.5 - 1
3. prompts          -- the qwen2_base chat template, the two answer modes (paper s3.3), token ids
4. readers          -- NextQA RL jsonl and LLaVA cold-start json (the released training data)
5. training feed    -- VideoLoader (failures counted, never substituted), rehearsal_mix
6. downloads        -- the released checkpoints, training data and benchmarks: `python data.py download`
7. the "shapes" task -- a synthetic video-QA data set made here, for machines without NextQA

Run:
    python data.py download --what train --root data     # train | mvbench | videomme | mlvu | mmvu
    python data.py shapes --out data/shapes --train 2000 --test 250 --seed 0
    python tests/bench.py video               # our reader vs decode-everything-then-pick
"""
import argparse
import json
import multiprocessing
import os
import random
import re
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F



class UserError(ValueError):
    """Bad input from the user: a data file, a flag, a checkpoint, a run folder, a full disk. Its message
    names the file and record and says what is wrong; train.py and evaluate.py print it in one line,
    without a traceback, and exit with status 2. Everything else keeps its traceback."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line from rank 0 (cli), not a usage text from every rank
        raise UserError(f"{self.prog}: {message} (see --help)")

    def settings(self, **overrides):
        """The flags' defaults with `overrides` (flag names with _ for -), as parse_args would return them:
        how a script calls another's main function without command-line strings. Raises TypeError for a
        name that is not a flag, UserError when a required flag is missing."""
        defaults = {a.dest: a.default for a in self._actions if a.dest != "help"}
        unknown = set(overrides) - set(defaults)
        if unknown:
            raise TypeError(f"not {self.prog} flags: {sorted(unknown)}")
        args = argparse.Namespace(**{**defaults, **overrides})
        missing = [a.dest for a in self._actions if a.required and getattr(args, a.dest) is None]
        if missing:
            raise UserError(f"missing settings: {missing}")
        return args


def cli(fn, *args):
    """fn(*args) as a command: bad input (a UserError, a missing file) prints one line from rank 0,
    without a traceback, and exits with status 2; any other error keeps its traceback."""
    try:
        return fn(*args)
    except (UserError, FileNotFoundError) as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


# -----------------------------------------------------------------------------
# 1. Reading video

IMAGE_EXTS = (".jpg", ".jpeg", ".png")
PTS_CONTAINERS = ("mov", "matroska")  # ffmpeg demuxer names whose packets carry presentation timestamps


def frame_indices(n_frames, num_frames):
    """Indices of the frames to keep: np.linspace(0, N-1, num_frames, dtype=int), as the
    reference's tinyllava/data/video_preprocess.py.

    The int cast truncates, and a clip shorter than num_frames repeats indices, exactly as the
    reference does. Returns an int64 array of shape (num_frames,).
    """
    return np.linspace(0, n_frames - 1, num_frames, dtype=int)


def load_video(path, num_frames=16, start=None, end=None):
    """Decode `num_frames` frames of a video file or a folder of numbered images.

    Args:
        path: a video file (mp4, webm, avi, mkv, ...) or a folder of numbered jpg/png frames.
        num_frames: how many frames to return (16 in every stage of the paper).
        start, end: optional bounds in SECONDS (MVBench); only frames whose timestamp t
            (from the stream start) has start <= t <= end are candidates. A folder's frame
            numbered n (00001.jpg: n = 1) is at n / 3 s: MVBench's frame folders are sampled at
            3 fps and numbered from 1, as its loader reads them.
    Returns:
        uint8 array (num_frames, H, W, 3), RGB, in time order. Identical, pixel for pixel, to
        decoding every frame and then taking `frame_indices(N, num_frames)` of the N candidates.
    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file cannot be decoded, or has no frame in [start, end]; the message
            names the file and the cause. No other video is ever substituted.
    Source: the reference's tinyllava/data/video_preprocess.py, which decodes every frame, then picks.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"video not found: {path}")
    if path.is_dir():
        return _load_frame_folder(path, num_frames, start, end)
    try:
        with av.open(str(path)) as container:
            return _load_from_container(container, path, num_frames, start, end)
    except (av.FFmpegError, IndexError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot decode video {path}: {type(e).__name__}: {e}") from e


FOLDER_FPS = 3  # frame folders have no timestamps; MVBench's are sampled at 3 fps


def _load_frame_folder(folder, num_frames, start=None, end=None):
    # Frames are ordered by the number in their name (frame_2 before frame_10), not by string.
    files = [f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTS]
    if not files:
        raise ValueError(f"frame folder {folder} holds no {'/'.join(IMAGE_EXTS)} files")
    def number(f):
        digits = re.findall(r"\d+", f.stem)
        if not digits:
            raise ValueError(f"frame file {f} has no number in its name")
        return int(digits[-1])
    files.sort(key=number)
    if start is not None or end is not None:  # the frame numbered n is at n / FOLDER_FPS seconds
        files = [f for f in files if _within(number(f) / FOLDER_FPS, start, end)]
        if not files:
            raise ValueError(f"frame folder {folder} has no frame between {start} s and {end} s")
    picked = [files[i] for i in frame_indices(len(files), num_frames)]
    return np.stack([_decode_image(f) for f in picked])


def _decode_image(file):
    try:
        with av.open(str(file)) as c:
            return next(c.decode(video=0)).to_ndarray(format="rgb24")
    except (av.FFmpegError, StopIteration) as e:
        raise ValueError(f"cannot decode frame image {file}: {e}") from e


def _load_from_container(container, path, num_frames, start, end):
    if not container.streams.video:
        raise ValueError(f"{path} has no video stream (audio only?)")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame threads change the speed, not the pixels
    # A demux pass reads packet headers only (no decoding): it gives the presentation timestamps
    # of every frame, hence N and the timestamps of the frames we want, and the keyframes to seek to.
    # Only mp4/mov and matroska/webm store presentation timestamps; avi's "pts" are decode-order.
    packets = []
    if container.format.name.split(",")[0] in PTS_CONTAINERS:
        packets = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.size > 0]
    if packets and all(pts is not None for pts, _ in packets):
        all_pts = sorted(pts for pts, _ in packets)
        pts = _bounded(all_pts, stream, start, end, path)
        wanted = [pts[i] for i in frame_indices(len(pts), num_frames)]
        keyframes = sorted(p for p, key in packets if key)
        frames = _decode_by_seeking(container, stream, sorted(set(wanted)), keyframes, path)
        if frames is not None:
            return np.stack([frames[p] for p in wanted])
    # Containers without trustworthy timestamps (e.g. some avi): decode in order, convert only kept frames.
    container.seek(0)
    return _decode_in_order(container, stream, path, num_frames, start, end)


def _bounded(all_pts, stream, start, end, path):
    if start is None and end is None:
        return all_pts
    t0, tb = all_pts[0], stream.time_base
    pts = [p for p in all_pts if _within(float((p - t0) * tb), start, end)]
    if not pts:
        raise ValueError(f"video {path} has no frame between {start} s and {end} s")
    return pts


def _within(t, start, end):
    # start <= t <= end in seconds; a missing bound is open
    return (start is None or start <= t) and (end is None or t <= end)


def _decode_by_seeking(container, stream, wanted, keyframes, path):
    """Decode the frames whose pts are in `wanted` (sorted); returns {pts: rgb array}, or None
    when the decoder's timestamps disagree with the demuxer's (then the caller decodes in order).

    Two savings, both exact: (1) for each run of wanted frames that share a keyframe, seek to that
    keyframe instead of decoding from the start; (2) while feeding packets we do not want, let the
    decoder skip non-reference frames (no other frame is predicted from them)."""
    ctx = stream.codec_context
    ctx.thread_type = "NONE"  # skip_frame must apply to the packet being fed, not a later one
    out = {}
    groups = {}
    for p in wanted:
        groups.setdefault(max((k for k in keyframes if k <= p), default=keyframes[0]), []).append(p)
    for key, group in groups.items():
        container.seek(key, stream=stream, backward=True, any_frame=False)
        todo = set(group)
        for packet in container.demux(stream):
            ctx.skip_frame = "DEFAULT" if packet.pts in todo else "NONREF"
            for frame in ctx.decode(packet if packet.size else None):
                if frame.pts in todo:
                    out[frame.pts] = frame.to_ndarray(format="rgb24")
                    todo.discard(frame.pts)
            if not todo:
                break
        if todo:
            return None
    return out


def _decode_in_order(container, stream, path, num_frames, start, end):
    # Pass 1 counts the candidate frames (decoding, but no colour conversion); pass 2 converts picks.
    times = [float(f.time) if f.time is not None else None for f in container.decode(stream)]
    if start is not None or end is not None:
        if any(t is None for t in times):
            raise ValueError(f"video {path} has frames without timestamps; cannot apply start/end")
        candidates = [i for i, t in enumerate(times) if _within(t - times[0], start, end)]
    else:
        candidates = list(range(len(times)))
    if not candidates:
        raise ValueError(f"video {path} has no frame between {start} s and {end} s")
    wanted = [candidates[i] for i in frame_indices(len(candidates), num_frames)]
    keep, frames = set(wanted), {}
    container.seek(0)
    for i, frame in enumerate(container.decode(stream)):
        if i in keep:
            frames[i] = frame.to_ndarray(format="rgb24")
        if i >= wanted[-1]:
            break
    return np.stack([frames[i] for i in wanted])


# -----------------------------------------------------------------------------
# 2. Preprocessing

def preprocess(frames, size=384):
    """SigLIP preprocessing, as the released image processor: bicubic resize to size x size (aspect ratio not kept, no
    crop), then x / 127.5 - 1 (= rescale 1/255, normalise mean = std = 0.5).

    Args: frames: uint8 array or tensor (T, H, W, 3), RGB. size: S in pixels (384 at full size).
    Returns: float32 tensor (T, 3, S, S) in [-1, 1].
    The resize is antialiased and rounded back to uint8, like PIL's bicubic in the reference
    processor, so the values match it up to rounding.
    """
    x = torch.as_tensor(np.asarray(frames)).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        x = x.round().clamp(0, 255)
    return x / 127.5 - 1.0


# -----------------------------------------------------------------------------
# 3. Prompts (exact characters: the reference's qwen2_base template and paper s3.3's suffix)

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_INDEX = -200  # the id that stands for the video in a prompt's token ids (the released config)
IGNORE_INDEX = -100       # the label of positions that get no loss
REASON_SUFFIX = ("Output the thinking process in <think> </think> and final answer (option) "
                 "in <answer> </answer> tags.")
OPTION_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTERS = "ABCDEFGHIJ"


def format_options(question, options):
    """Question + lettered options, as in NextQA: 'Q\\nOptions:\\nA. text\\nB. text'.

    Args: question: str; options: list of option texts (at most 10). Returns: str.
    Raises: ValueError if there are more options than letters.
    """
    if len(options) > len(LETTERS):
        raise ValueError(f"{len(options)} options; at most {len(LETTERS)} are supported")
    lines = [f"{LETTERS[i]}. {text}" for i, text in enumerate(options)]
    return question + "\nOptions:\n" + "\n".join(lines)


OPTION_LINE = re.compile(r"^(?:([A-J])\.|\(([A-J])\)) ", re.MULTILINE)  # "A. text" or "(A) text"


def option_letters(problem, default="ABCDE"):
    """The letters of a problem's options, written "A. text" (NextQA, Video-MME, MMVU) or "(A) text"
    (the reference eval's MVBench and MLVU prompts), e.g. "ABCD"; `default` when none are found."""
    return "".join(a or b for a, b in OPTION_LINE.findall(problem)) or default


def build_question(problem, mode="reason", sep=" "):
    """The user's text: the problem (question with options) + the answer-mode suffix.

    mode "reason": the think/answer suffix (paper s3.3); sep=" " as in RL training, "\\n" as in the
    reference eval. mode "option": the direct-letter suffix. Raises ValueError on an unknown mode.
    """
    suffix = {"reason": REASON_SUFFIX, "option": OPTION_SUFFIX}.get(mode)
    if suffix is None:
        raise ValueError(f"unknown answer mode {mode!r}; expected 'reason' or 'option'")
    return problem + sep + suffix


def chat_prompt(question):
    """The qwen2_base template (TinyLLaVA's conversation template), single turn, generation mode. No space after
    'ASSISTANT:'; a training answer is appended as '{answer}<|endoftext|>' right after it."""
    return f"{SYSTEM} USER: {IMAGE_TOKEN}\n{question} ASSISTANT:"


def chat_turn(question):
    """A later user turn of a multi-turn conversation in the qwen2_base template (TinyLLaVA's
    'USER: {content} ' + 'ASSISTANT:'), written right after the previous answer's <|endoftext|>."""
    return f"USER: {question} ASSISTANT:"


def tokenize_prompt(tokenizer, prompt):
    """Token ids of a prompt with one "<image>": the text before and after is tokenized separately and
    joined with -200 (the reference's tokenizer_image_token); no BOS. Returns a list[int].
    Raises ValueError unless the prompt holds exactly one <image>."""
    parts = prompt.split("<image>")
    if len(parts) != 2:
        raise ValueError(f"prompt must hold exactly one <image>, holds {len(parts) - 1}: {prompt[:80]!r}")
    before, after = (tokenizer(p, add_special_tokens=False).input_ids for p in parts)
    return before + [IMAGE_TOKEN_INDEX] + after


def sft_tensors(tok, sample, device):
    """ids and labels of one SFT sample: prompt + target + eos, loss on target + eos only (the reference's
    supervised recipe). A multi-turn sample (sample.history) continues each answer's eos with the next
    turn's 'USER: ... ASSISTANT:' (chat_turn); every answer and its eos get loss.
    Returns (ids long (n,), labels long (n,))."""
    ids, labels = [], []
    for k, (question, target) in enumerate(list(sample.history) + [(sample.question, sample.target)]):
        prompt = tokenize_prompt(tok, chat_prompt(question)) if k == 0 else \
            tok(chat_turn(question), add_special_tokens=False).input_ids
        answer = tok(target, add_special_tokens=False).input_ids + [tok.eos_token_id]
        ids += prompt + answer
        labels += [IGNORE_INDEX] * len(prompt) + answer
    return torch.tensor(ids, device=device), torch.tensor(labels, device=device)


# -----------------------------------------------------------------------------
# 4. Data set readers (the released NextQA RL jsonl and cold-start json)

@dataclass
class Sample:
    video: Path          # absolute or root-relative path of the clip
    question: str        # the problem: question text with its lettered options (no answer suffix)
    answer: str | None   # the label letter ("A".."E"), None when the record has no letter
    target: str | None = None  # the full supervised response (SFT / cold start), else None
    history: tuple = ()  # a multi-turn record's earlier (question, response) turns, oldest first


ANSWER_TAG = re.compile(r"<answer>\s*(.*?)\s*</answer>", re.DOTALL)


def read_text(path):
    """A data file's text. Raises UserError naming the file (and the line) when it is missing, empty or
    not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such data file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})") from None
    if not text.strip():
        raise UserError(f"{path}: the file is empty")
    return text


def check_label(letter, problem, where):
    """The label must be one letter among the record's own options (the "A. ..." lines of its problem).
    Returns the letter. Raises UserError naming the record."""
    letters = option_letters(problem, default="")
    if not letters:
        raise UserError(f"{where}: the question has no option lines ('A. ...')")
    if len(letter) != 1 or letter not in letters:
        raise UserError(f"{where}: the answer {letter!r} is not one of the record's option letters {letters}")
    return letter


def read_nextqa_jsonl(path, root=None):
    """Read NextQA RL data: one JSON object per line with `problem`, `solution` ("<answer>X</answer>")
    and `video_filename` (relative to `root`, default: the jsonl's folder).

    Returns: list[Sample]. Raises: UserError naming the file, line and field of a malformed record, or
    of a label that is not one letter among the record's options (check_label).
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    samples = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e})") from None
        problem = _field(rec, "problem", where)
        solution = _field(rec, "solution", where)
        m = ANSWER_TAG.fullmatch(solution.strip())
        if not m:
            raise UserError(f"{where}: field 'solution' must be '<answer>X</answer>', got {solution!r}")
        label = check_label(m.group(1), problem, where)
        samples.append(Sample(root / _field(rec, "video_filename", where), problem, label))
    return samples


def read_llava_json(path, root=None):
    """Read LLaVA-style conversations (the cold-start file and our SFT files): a JSON list of
    {"video": relpath, "conversations": [{"from": "human", "value": "<image>\\n..."},
    {"from": "gpt", "value": "..."}, ...]}: human and gpt turns alternating, one pair or more, as in
    LLaVA-Video-178K. The first human text loses its "<image>\\n" prefix.

    Returns: list[Sample] with `question` / `target` = the last human / gpt text, `history` = the
    earlier (human, gpt) pairs, and `answer` = the letter inside the last gpt text's <answer> tag (or
    that whole text if it is one letter), else None (a description, a caption).
    Raises: UserError naming the file, record index and field of a malformed record, or of an answer
    tag that does not hold one of the question's option letters (check_label).
    """
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    try:
        records = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(records, list) or not records:
        raise UserError(f"{path}: expected a non-empty JSON list of records")
    samples = []
    for i, rec in enumerate(records):
        where = f"{path}: record {i}"
        turns = _field(rec, "conversations", where, list)
        roles = [t.get("from") if isinstance(t, dict) else None for t in turns]
        if not turns or len(turns) % 2 or roles != ["human", "gpt"] * (len(turns) // 2):
            raise UserError(f"{where}: field 'conversations' must alternate human and gpt turns, human first, "
                             f"got {roles}")
        texts = [_field(t, "value", f"{where} turn {k} ({t['from']})") for k, t in enumerate(turns)]
        if not texts[0].startswith(IMAGE_TOKEN):
            raise UserError(f"{where}: the first human turn must start with {IMAGE_TOKEN!r}")
        if any(IMAGE_TOKEN in t for t in texts[1:]):
            raise UserError(f"{where}: {IMAGE_TOKEN!r} may only open the first human turn")
        texts[0] = texts[0][len(IMAGE_TOKEN):].lstrip("\n")
        pairs = list(zip(texts[::2], texts[1::2]))
        question, target = pairs[-1]
        m = ANSWER_TAG.search(target)
        letter = m.group(1) if m else target.strip()
        if m or (len(letter) == 1 and letter in LETTERS):  # an answer: it must be one of the options
            letter = check_label(letter, question, where)
        else:
            letter = None
        samples.append(Sample(root / _field(rec, "video", where), question, letter, target, tuple(pairs[:-1])))
    return samples


def _field(rec, name, where, kind=str):
    if not isinstance(rec, dict) or name not in rec:
        raise UserError(f"{where}: missing field {name!r}")
    if not isinstance(rec[name], kind):
        raise UserError(f"{where}: field {name!r} must be {kind.__name__}, got {type(rec[name]).__name__}")
    return rec[name]


# -----------------------------------------------------------------------------
# 5. Feeding the training loop: clips, with failures counted; mixed SFT data

# Decoded clips kept by VideoLoader(keep_in_memory=True), shared by every run in this process: the shapes
# pipeline's stages read the same clips (about 8 ms each to decode on the shapes task).
_KEPT = {}


class VideoLoader:
    """Loads and preprocesses a sample's frames, and counts the clips it read (`seen`) and those that
    failed (`bad`); the training loop sums both over ranks and stops past a fraction (check_bad_videos).
    With keep_in_memory, each clip is decoded once per process and its pixels kept (float32,
    T*3*S*S*4 bytes: 192 KiB for the shapes task's 16 x 32 x 32 frames; callers must not modify them in
    place), keyed by the file's path, size and modification time and the frames asked for, so a file
    written again is decoded again. On the shapes task decoding was a third of a base step."""

    def __init__(self, num_frames, size, keep_in_memory=False, rank=0):
        self.num_frames, self.size = num_frames, size
        self.seen, self.bad = 0, []
        self.keep, self.rank = keep_in_memory, rank

    def __call__(self, path):
        """Returns float32 (T, 3, S, S) in [-1, 1], or None (with a warning naming the file and the cause)
        when the video cannot be read. Another video is never substituted."""
        self.seen += 1
        try:
            st = os.stat(path)
            key = (str(path), st.st_size, st.st_mtime_ns, self.num_frames, self.size)
            if self.keep and key in _KEPT:
                return _KEPT[key]
            pixels = preprocess(load_video(path, self.num_frames), self.size)
            if self.keep:
                _KEPT[key] = pixels
            return pixels
        except (FileNotFoundError, ValueError) as e:
            self.bad.append(str(path))
            print(f"[rank {self.rank}] WARNING: skipping sample, {e}", flush=True)
            return None


def check_bad_videos(bad, seen, max_bad_fraction, examples=()):
    """Stop the run when more than `max_bad_fraction` of the `seen` videos (the run's totals over all
    ranks) failed. One failure is tolerated from the first video on; a second one among the first 20
    stops a run at the default 5%. Raises UserError naming some of the files."""
    if bad > max(1.0, max_bad_fraction * seen):
        raise UserError(f"{bad:.0f} of {seen:.0f} videos failed, more than --max-bad-fraction "
                        f"{max_bad_fraction}: {list(examples)[:5]}")


def read_samples(stage, data_file, video_root=None, rehearse=None, rehearse_ratio=2, epochs=1, seed=0):
    """A training stage's samples: NextQA jsonl for "grpo", LLaVA json for "sft", with `rehearse` (the
    previous stage's LLaVA json) mixed in by rehearsal_mix. Videos are relative to `video_root`, or to
    each file's own folder. Returns (list of Sample, the number of epochs to read it for).
    Raises: UserError naming the file and record of a malformed one (the readers, rehearsal_mix)."""
    root = lambda file: Path(video_root) if video_root else Path(file).parent
    read = read_nextqa_jsonl if stage == "grpo" else read_llava_json
    items = read(data_file, root(data_file))
    if not rehearse:
        return items, epochs
    old = read_llava_json(rehearse, root(rehearse))
    return rehearsal_mix(items, old, epochs, rehearse_ratio, seed, rehearse), 1


def batch_indices(n_items, step, per_rank, rank, world, seed):
    """This rank's item indices for a step: epoch e's order is a permutation seeded by (seed, e);
    a global batch is world * per_rank consecutive items of it; rank r takes its slice.
    Returns (indices, each item's position in the global batch: what seeds its sampling)."""
    per_step = per_rank * world
    epoch, k = divmod(step, n_items // per_step)
    order = np.random.default_rng([seed, epoch]).permutation(n_items)
    start = k * per_step + rank * per_rank
    return [int(i) for i in order[start:start + per_rank]], [rank * per_rank + j for j in range(per_rank)]


def rehearsal_mix(samples, old, epochs, ratio, seed, where="the rehearsal data"):
    """SFT on new data that keeps what the previous stage taught (not in the paper: the tiny model is
    trained from scratch, and its cold start would otherwise forget): `epochs` copies of `samples` plus
    `ratio` (a float) times as many records, rounded, of the previous stage's SFT data `old`, drawn
    without replacement (each used once), to be read as ONE shuffled epoch, so that every batch mixes
    the new format with the old skills. Without it the tiny shapes model, cold-started for 60 epochs on
    16 samples, forgets how to describe a clip (the loss of the base's own descriptions goes 0.31 ->
    0.97 nats a token; with ratio 1, 0.38; with ratio 2, 0.34). The shapes base stage's direction parts
    use it too (train.shapes_pipeline).
    Returns: list of epochs * len(samples) + n Sample (the samples, then the records), where
        n = round(ratio * epochs * len(samples)).
    Raises: ValueError if `old` (read from `where`) holds fewer than n records.
    """
    n = round(ratio * epochs * len(samples))
    if len(old) < n:
        raise UserError(f"{where}: {len(old)} records, fewer than the {n} that {epochs} epochs of "
                         f"{len(samples)} samples rehearse with at {ratio:g} each")
    return samples * epochs + random.Random(seed).sample(old, n)


# -----------------------------------------------------------------------------
# 6. The released checkpoints, training data and benchmarks, and where `python data.py download` puts them

CHECKPOINTS = {"base": "Zhang199/TinyLLaVA-Video-Qwen2.5-3B-Group-16-512",      # TinyLLaVA-Video
               "coldstart": "Zhang199/TinyLLaVA-Video-Coldstart_NextQA_16",     # after the 16-sample cold start
               "r1": "Zhang199/TinyLLaVA-Video-R1"}
DATASETS = {  # --what: (hub dataset, its folder under --root)
    "train": ("Zhang199/TinyLLaVA-Video-R1-training-data", "train"),  # 2 files + NextQA.zip (the clips)
    "mvbench": ("OpenGVLab/MVBench", "mvbench"), "videomme": ("lmms-lab/Video-MME", "videomme"),
    "mlvu": ("MLVU/MVLU", "mlvu"), "mmvu": ("yale-nlp/MMVU", "mmvu")}
TRAIN_FILES = {"sft": "data/train/nextqa-coldstart-16.json", "grpo": "data/train/nextqa_0-30s.jsonl"}
DOWNLOAD_HINT = ("The paper's training data: `python data.py download --what train --root data` writes data/train/ "
                 "(nextqa_0-30s.jsonl, nextqa-coldstart-16.json, NextQA/NExTVideo/<dir>/<id>.mp4)")


def download(what, root="data", fetch=True):
    """Fetch a data set with huggingface_hub (which transformers installs) into <root>/<folder>, then unpack
    every .zip in it in place (once: a <zip>.done marker is left beside it). fetch=False only unpacks a
    folder copied by hand. Returns the folder.
    Raises UserError for an unknown name, or when the hub cannot be reached: the message says what to
    download elsewhere and where to copy it."""
    if what not in DATASETS:
        raise UserError(f"unknown data set {what!r}; expected one of {sorted(DATASETS)}")
    repo, sub = DATASETS[what]
    folder = Path(root) / sub
    if fetch:
        from huggingface_hub import snapshot_download
        try:
            snapshot_download(repo, repo_type="dataset", local_dir=str(folder))
        except Exception as e:  # offline, a gated data set without a token, ...
            raise UserError(f"cannot download {repo} ({type(e).__name__}: {str(e)[:200]}). On a machine with "
                            f"internet: `hf download {repo} --repo-type dataset --local-dir {sub}`; copy that "
                            f"folder to {folder}, then `python data.py download --what {what} --root {root} "
                            f"--no-fetch` unpacks it") from None
    if not folder.is_dir():
        raise UserError(f"{folder}: no such folder (copy the {repo} data set there)")
    for z in sorted(folder.rglob("*.zip")):
        done = z.with_name(z.name + ".done")
        if not done.exists():
            with zipfile.ZipFile(z) as archive:
                archive.extractall(z.parent)
            done.write_text("unpacked\n")
    return folder


# -----------------------------------------------------------------------------
# 7. The synthetic "shapes" task
#
# Each clip shows 1-5 coloured shapes on a mid-grey background. Every shape in a clip has its own
# colour, so a question can name it. Five question types, four of which need the ORDER of the
# frames (shuffle the frames and the answer is gone; T-GRPO relies on this):
#   direction    which way does the X move?                 (order)
#   appear_first which colour appears first?                (order)
#   leave_first  which colour disappears first?             (order)
#   color_order  which colour does the shape show last?     (order)
#   count        how many shapes are in the video?          (not order)
# Each type has one fixed list of five options (the directions, the colours or the counts, always in
# the same order), so an answer's letter follows from its text. On purpose: with the options shuffled,
# the tiny language model did not learn to find the letter of a given answer text in 1500 steps even
# without a video (text-only, 24k examples, accuracy stayed at chance), and a task it cannot learn in
# minutes teaches a student nothing about GRPO. What is left to learn is to SEE.
# Answer letters are balanced: sample i of type (i % 5) gets letter (i // 5) % 5.

# Mid-grey background: ~0 after SigLIP normalisation, so background patches add little that is the
# same in every clip (at init ~45% of the tiny connector's output varies across clips, ~16% with a
# dark background), which makes the video easier to read for a model trained from scratch.
SIZE, FPS, BACKGROUND = 64, 8, 128
COLORS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 250),
          "yellow": (240, 220, 40), "magenta": (220, 50, 220)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = ("left", "right", "up", "down", "it does not move")
COUNTS = ("one", "two", "three", "four", "five")
QTYPES = ("direction", "appear_first", "leave_first", "color_order", "count")


@dataclass
class Obj:
    shape: str
    colors: list   # colour name per segment; more than one for color_order
    path: tuple    # (x0, y0, x1, y1): centre at the first and the last frame
    on: tuple      # (first, last) frame in which it is visible


def shapes_qtype(question):
    """The question type of a shapes question, from its text (for per-task tables)."""
    for prefix, qtype in (("Which way", "direction"), ("Which colour appears", "appear_first"),
                          ("Which colour disappears", "leave_first"), ("The ", "color_order"),
                          ("How many", "count")):
        if question.startswith(prefix):
            return qtype
    return "other"


def make_scene(rng, qtype, letter_index):
    """Draw the parameters of one clip and its question; the right answer is option `letter_index`.

    Args: rng: np.random.Generator; qtype: one of QTYPES; letter_index: 0..4, the right option.
    Returns: dict with qtype, T (frames), objects (list[Obj]), question, options (the type's five
        fixed texts), answer (letter).
    Raises: ValueError for an unknown qtype.
    """
    T = int(rng.integers(16, 33))
    shapes = [str(s) for s in rng.permutation(SHAPES * 2)]
    names = list(COLORS)
    right_color = names[letter_index]
    others = [str(c) for c in rng.permutation([c for c in names if c != right_color])]  # 4 colours
    def spot():
        return tuple(int(v) for v in rng.integers(14, SIZE - 14, size=2))
    if qtype == "direction":
        # Colours from all five, not from `others`: those leave out the colour of the answer's letter, so
        # "a letter whose colour is not shown" was right one time in three, and every model answered
        # that way
        c1, c2 = (str(c) for c in rng.permutation(names)[:2])
        move = DIRECTIONS[letter_index]
        x, y = spot()
        lo, hi = 10, SIZE - 10
        end = {"left": (lo, y), "right": (hi, y), "up": (x, lo), "down": (x, hi)}.get(move, (x, y))
        start = {"left": (hi, y), "right": (lo, y), "up": (x, hi), "down": (x, lo)}.get(move, (x, y))
        target = Obj(shapes[0], [c1], start + end, (0, T - 1))
        objects = [target, Obj(shapes[1], [c2], spot() * 2, (0, T - 1))]
        question, options = f"Which way does the {c1} {shapes[0]} move?", DIRECTIONS
    elif qtype in ("appear_first", "leave_first"):
        t1, t2 = sorted(int(t) for t in rng.choice(np.arange(1, T - 1), size=2, replace=False))
        a, b = _spread(rng, 2)  # apart, so neither hides the other
        on1, on2 = ((t1, T - 1), (t2, T - 1)) if qtype == "appear_first" else ((0, t1), (0, t2))
        objects = [Obj(shapes[0], [right_color], a * 2, on1), Obj(shapes[1], [others[0]], b * 2, on2)]
        verb = "appears" if qtype == "appear_first" else "disappears"
        question, options = f"Which colour {verb} first?", names
    elif qtype == "color_order":
        objects = [Obj(shapes[0], [others[0], others[1], right_color], spot() * 2, (0, T - 1))]
        question = f"The {shapes[0]} changes colour twice. Which colour does it show last?"
        options = names
    elif qtype == "count":
        n = letter_index + 1
        colors = [str(c) for c in rng.permutation(names)]
        objects = [Obj(shapes[k], [colors[k]], p * 2, (0, T - 1)) for k, p in enumerate(_spread(rng, n))]
        question, options = "How many shapes are in the video?", COUNTS
    else:
        raise ValueError(f"unknown question type {qtype!r}; expected one of {QTYPES}")
    return {"qtype": qtype, "T": T, "objects": objects, "question": question,
            "options": list(options), "answer": LETTERS[letter_index]}


def _spread(rng, n):
    # n non-overlapping centres on a 3x3 grid of cells, jittered, so counts are unambiguous.
    cells = rng.choice(9, size=n, replace=False)
    return [(int(10 + 22 * (c % 3) + rng.integers(-1, 2)), int(10 + 22 * (c // 3) + rng.integers(-1, 2)))
            for c in cells]


def render(scene):
    """Draw a scene: uint8 array (T, SIZE, SIZE, 3). Positions move linearly from path start to end;
    a multi-colour object shows its colours in equal thirds of the clip."""
    T = scene["T"]
    frames = np.full((T, SIZE, SIZE, 3), BACKGROUND, np.uint8)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE]
    for o in scene["objects"][::-1]:  # the first object (the one a question names) on top
        x0, y0, x1, y1 = o.path
        for t in range(o.on[0], o.on[1] + 1):
            a = t / (T - 1)
            cx, cy = x0 + a * (x1 - x0), y0 + a * (y1 - y0)
            color = o.colors[min(len(o.colors) - 1, t * len(o.colors) // T)]
            frames[t][_mask(o.shape, xx - cx, yy - cy)] = COLORS[color]
    return frames


def _mask(shape, dx, dy, r=9):
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    return (dy <= r) & (dy >= -r) & (np.abs(dx) <= (dy + r) / 2)  # triangle, apex up


def describe(scene):
    """A short templated description of what happens, in the words the questions need (the
    supervised 'caption' data; the cold-start reasoning starts with it). Returns a str, e.g.
    "The red circle moves right; the blue square stays still." """
    objs, q = scene["objects"], scene["qtype"]
    name = lambda o: f"the {o.colors[0]} {o.shape}"
    if q == "appear_first":
        a, b = sorted(objs, key=lambda o: o.on[0])
        text = f"{name(a)} appears first, then {name(b)} appears"
    elif q == "leave_first":
        a, b = sorted(objs, key=lambda o: o.on[1])
        text = f"{name(a)} disappears first, then {name(b)} disappears"
    elif q == "color_order":
        text = f"the {objs[0].shape} is {', then '.join(objs[0].colors)}"
    elif q == "count":
        n = len(objs)
        names = [name(o) for o in objs]
        text = f"there {'is' if n == 1 else 'are'} {COUNTS[n - 1]} shape{'s' * (n > 1)}: {_listed(names)}"
    else:
        parts = []
        for o in objs:
            x0, y0, x1, y1 = o.path
            move = "right" if x1 > x0 else "left" if x1 < x0 else "down" if y1 > y0 else "up" if y1 < y0 else None
            parts.append(f"{name(o)} moves {move}" if move else f"{name(o)} stays still")
        text = "; ".join(parts)
    return _sentence(text)


def colours(scene):
    """Every colour shown in the clip, in COLORS order: e.g. "Red, blue and magenta." Direct colour
    supervision for every clip: with only the QA and the description, the tiny base model barely
    reads colours (option accuracy 30%; with this record 59%)."""
    return _sentence(_listed(_shown(scene)))


def _shown(scene):
    return [c for c in COLORS if any(c in o.colors for o in scene["objects"])]  # in COLORS order


def _listed(words):
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]  # "a, b and c"


def _sentence(text):
    return text[0].upper() + text[1:] + "."


def explain(scene):
    """The templated thought, without tags: the description, then the option. E.g. "The red circle
    moves right; the blue square stays still. So the answer is right, which is option B." """
    letter = scene["answer"]
    chosen = scene["options"][LETTERS.index(letter)]
    return f"{describe(scene)} So the answer is {chosen}, which is option {letter}."


def reasoning(scene):
    """The chain of thought of a cold-start sample: explain(scene) in <think>, then the letter."""
    return f"<think>{explain(scene)}</think> <answer>{scene['answer']}</answer>"


def write_mp4(frames, path, fps=FPS):
    """Encode uint8 (T, H, W, 3) RGB frames as H.264 mp4, yuv420p, lossless (qp 0): the decoded pixels are
    the frames after the yuv420p conversion, whatever the encoder decides. With crf 12, ~35 of the 2,250
    shapes clips came out with other pixels (up to 6 levels) on each generation, so two runs of the same
    pipeline trained on different data."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"qp": "0", "preset": "veryfast", "threads": "1"}
        for f in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        out.mux(stream.encode())


def _make_sample(job):
    out, split, i, seed = job
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
    scene = make_scene(rng, QTYPES[i % len(QTYPES)], (i // len(QTYPES)) % 5)
    rel = f"videos/{split}_{i:05d}.mp4"
    write_mp4(render(scene), Path(out) / rel)
    return scene, rel


# The base stage's tagged record: the option question asking for the letter inside <answer> tags. A
# pretrained language model follows such an instruction; a model trained from scratch has to see it, or
# it learns the letter after "<answer>" from the cold start's 16 clips alone (cold start 50.0 -> 56.4%
# Reason with it, R1 63.2 -> 72.4). Asked as the second turn of the description's conversation, the
# letter is read after text, as in R1 after a thought (cold start 71.6, R1 81.6-84.0 over three GRPO
# seeds, against 56.4 and 72.4-76.8 as a record of its own).
TAG_SUFFIX = "Answer with the option's letter in <answer> </answer> tags."


def generate_shapes(out, n_train=2000, n_test=250, seed=0, workers=2):
    """Write the shapes data set to `out`:
        videos/*.mp4          H.264 clips, 16-32 frames, 64x64, 8 fps
        train.jsonl, test.jsonl  NextQA RL format (problem / solution / video_filename ...)
        sft.json              LLaVA format, for training the tiny base model from scratch; per train
                              clip: the option-mode QA (answer = the letter); a description of what the
                              question asks about, asked with the question and its options, followed by
                              the option question answered "<answer>X</answer>" (TAG_SUFFIX) as the
                              conversation's second turn; and the list of the clip's colours
        sft-direction.json    sft.json's option records of the direction clips (a fifth of the
                              train clips), for the base stage's second part (train.py shapes_pipeline)
        sft-direction-all.json  every sft.json record of the direction clips, for its third part
        coldstart.json        LLaVA format, 16 train clips with templated <think>/<answer> reasoning
        shapes_args.txt       the arguments that wrote the folder, as JSON
    Deterministic from `seed` (each sample has its own generator, so worker count does not matter).
    Returns: {"train": [scene, ...], "test": [...]}.
    Raises: UserError when `out` holds files other than a data set of these same settings (check_shapes).
    """
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        check_shapes(out, n_train, n_test, seed)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    jobs = [(str(out), s, i, seed) for s, n in (("train", n_train), ("test", n_test)) for i in range(n)]
    if workers > 1:  # spawned, not forked: a fork of a process that runs torch's threads can deadlock
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            results = pool.map(_make_sample, jobs, chunksize=16)
    else:
        results = [_make_sample(job) for job in jobs]
    scenes = {"train": [], "test": []}
    for (job, (scene, rel)) in zip(jobs, results):
        scene["video"] = rel
        scenes[job[1]].append(scene)
    for split, items in scenes.items():
        lines = [json.dumps({"problem": format_options(s["question"], s["options"]),
                             "solution": f"<answer>{s['answer']}</answer>", "video_filename": f"./{s['video']}",
                             "data_type": "video", "problem_id": i, "problem_type": "multiple choice"})
                 for i, s in enumerate(items)]
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    sft, direction, direction_all = [], [], []
    for s in scenes["train"]:
        problem = format_options(s["question"], s["options"])
        first = len(sft)
        sft.append(_record(s, build_question(problem, "option", "\n"), s["answer"]))
        # Described when asked with the options, as the reason prompt asks: the thought after it then
        # starts from the same context as the description (R1 82.0 against 79.2 without the options)
        sft.append(_record(s, f"{problem}\nDescribe what happens in the video.", describe(s),
                           (f"{problem}\n{TAG_SUFFIX}", f"<answer>{s['answer']}</answer>")))
        sft.append(_record(s, "Which colours are in the video?", colours(s)))
        if s["qtype"] == "direction":
            direction.append(sft[first])
            direction_all += sft[first:]
    # A stride of 6 (less for tiny splits) puts all five question types and letters among the 16.
    step = max(1, min(6, len(scenes["train"]) // 16))
    cold = [_record(s, build_question(format_options(s["question"], s["options"]), "reason"), reasoning(s))
            for s in scenes["train"][::step][:16]]
    (out / "sft.json").write_text(json.dumps(sft, indent=1))
    (out / "sft-direction.json").write_text(json.dumps(direction, indent=1))
    (out / "sft-direction-all.json").write_text(json.dumps(direction_all, indent=1))
    (out / "coldstart.json").write_text(json.dumps(cold, indent=1))
    (out / "shapes_args.txt").write_text(json.dumps(dict(train=n_train, test=n_test, seed=seed)))  # last: done
    return scenes


def check_shapes(folder, n_train, n_test, seed):
    """A shapes folder is reused only for the settings that wrote it. Raises UserError when its
    shapes_args.txt is missing (another task, or files of something else) or records other settings,
    or when a file of the data set is missing."""
    wanted, args = dict(train=n_train, test=n_test, seed=seed), Path(folder) / "shapes_args.txt"
    written = json.loads(args.read_text()) if args.exists() else None
    if written != wanted:
        raise UserError(f"{folder} holds {'no shapes data set' if written is None else written}, not the shapes "
                        f"data of {wanted}: choose another folder")
    missing = [f for f in SHAPES_FILES if not (Path(folder) / f).exists()]
    if missing:
        raise UserError(f"{folder} lacks {', '.join(missing)} (an older data.py wrote it): choose another folder")


SHAPES_FILES = ("train.jsonl", "test.jsonl", "sft.json", "sft-direction.json", "sft-direction-all.json",
                "coldstart.json")


def _record(scene, human, gpt, *more):
    """A LLaVA record about the scene's clip; `more` = further (human, gpt) turns of the conversation."""
    turns = [("human", f"{IMAGE_TOKEN}\n{human}"), ("gpt", gpt)]
    for h, g in more:
        turns += [("human", h), ("gpt", g)]
    return {"video": f"./{scene['video']}", "conversations": [{"from": w, "value": v} for w, v in turns]}


def tokenizer_texts(folder):
    """Every text the tiny model will read or write, for training its tokenizer (model.build_tokenizer):
    the prompt templates and every question, answer and earlier turn of the folder's *.json (LLaVA) and
    *.jsonl (NextQA) files, in sorted file order, four times over. Returns list[str]."""
    texts = [chat_prompt(build_question("", m)) for m in ("reason", "option")]
    for f in sorted(Path(folder).glob("*.json")):
        for s in read_llava_json(f):
            texts += [s.question, s.target or ""] + [text for turn in s.history for text in turn]
    for f in sorted(Path(folder).glob("*.jsonl")):
        texts += [s.question for s in read_nextqa_jsonl(f)]
    return texts * 4


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("shapes", help="generate the synthetic shapes video-QA data set")
    s.add_argument("--out", default="data/shapes")
    s.add_argument("--train", type=int, default=2000)
    s.add_argument("--test", type=int, default=250)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=2)
    s = sub.add_parser("download", help="fetch and unpack a released data set (huggingface_hub)")
    s.add_argument("--what", choices=sorted(DATASETS), default="train", help="which data set")
    s.add_argument("--root", default="data", help="it lands in <root>/<name>, where train.py and evaluate.py look")
    s.add_argument("--no-fetch", action="store_true", help="only unpack a folder copied there by hand")
    args = p.parse_args()
    if args.cmd == "download":
        try:
            print(f"{args.what}: {download(args.what, args.root, not args.no_fetch)}")
        except UserError as e:
            raise SystemExit(f"error: {e}")
    elif args.cmd == "shapes":
        t0 = time.time()
        generate_shapes(args.out, args.train, args.test, args.seed, args.workers)
        print(f"wrote {args.train} train + {args.test} test clips to {args.out} in {time.time() - t0:.1f} s")
