"""Throughput of one RL step of ``CaptionRLTrainer`` at the papers' scale, and where the step's time goes.

One step = sample captions, one CLIP text pass shared by every reward (CLIP-S with ``prompt=""`` and DiscriTune's
retrieval reward), group-mean baseline, policy-gradient loss and backward, optimiser step. Models (random init:
weights do not change the cost; nothing is downloaded):

``clipcap``  ClipCap (MLP mapper, 10 prefix embeddings) on a GPT-2-small decoder (``GPT2Config`` defaults: 12
    layers, width 768, 12 heads, vocabulary 50257, EOS 50256), fully trained, read from an image-embedding cache.
``vlm``      Idefics3 with SmolVLM-256M-Instruct's sizes (text: Llama, hidden 576, 30 layers, 9 heads, 3 KV heads,
    MLP 1536, vocabulary 49280; vision: SigLIP hidden 768, 12 layers, 12 heads, MLP 3072, patch 16 at 512 px;
    scale factor 4: 64 image tokens per image, one unsplit 512 px image per caption), its Idefics3 processor
    and chat template (``build_toy_vlm("idefics3", sizes=...)``); LoRA (r 16) on the language model's attention
    projections (``family("vlm").lora_targets``), gradient checkpointing on.
``text``     The GPT-2-small decoder alone, continuing the prompt "a" (``CausalLMPolicy``): the one model the stock
    ``trl.GRPOTrainer`` can drive as ours does, timed beside ours with the same rewards and settings.

The judge is a random ``open_clip`` ViT-B-32 (embed 512); the image-embedding cache holds random unit vectors.
Tokenizers: a real GPT-2 tokenizer cannot be downloaded offline, so the GPT-2 vocabulary is a word-level
``PreTrainedTokenizerFast`` (``toy_tokenizer``) of 50257 ids: id 0 a newline, ids 1-50255 distinct English words and
word pieces (CLIP's BPE vocabulary, then capitalised copies), id 50256 ``<|endoftext|>`` (EOS, pad). A random
policy therefore writes real-word captions that CLIP's tokenizer splits as it would real text. The VLM's
tokenizer is the same kind, 49280 ids with Idefics3's special tokens. A random policy almost never samples EOS,
so every caption runs to ``--max-completion-length`` tokens: the most generation can cost.

Per configuration: captions per second (batch / median wall time per step, data loading included), peak memory
(``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS over the timed steps on the CPU), and the
share of the timed steps spent in generation (``trainer.policy.generate``; stock: ``_generate_single_turn``),
rewards (``trainer._score``: CLIP text pass + reward math; stock: ``_calculate_rewards``), image inputs
(``policy.image_inputs``: cache look-ups, or the processor on the images), loss + backward (``compute_loss`` and
``accelerator.backward``) and the rest (decoding, baseline, logging, optimiser, data loading), each bracketed by
``torch.cuda.synchronize()`` on a GPU. The wrappers are set on the trainer instance; the trainer is unchanged.

    python benchmarks/rl_step_throughput.py --json rl_step.json            # GPU: bf16, batches 64 .. 1024
    python benchmarks/rl_step_throughput.py --tiny --json tiny.json        # toy sizes on the CPU, seconds
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import resource
import statistics
import tempfile
import time
from collections import defaultdict
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from clip_rl_trl import (
    CaptionRLConfig,
    CaptionRLTrainer,
    ClipCapConfig,
    ClipCapModel,
    ClipScorer,
    ImageEmbeddingCache,
)
from clip_rl_trl.models.policies import completion_mask
from clip_rl_trl.models.toy_vlm import build_toy_vlm, toy_tokenizer, toy_words
from clip_rl_trl.models.vlm import DEFAULT_INSTRUCTION
from clip_rl_trl.rewards.callables import ClipSReward, RetrievalReward

GPT2_VOCAB = 50257
SMOLVLM_TEXT = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49280, max_position_embeddings=8192, rope_theta=100000.0)
SMOLVLM_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      patch_size=16)
SMOLVLM_IMAGE, SMOLVLM_SCALE = 512, 4
PARTS = ("generation", "rewards", "inputs", "loss_backward")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------- vocabularies


@functools.cache
def word_pool() -> tuple[str, ...]:
    """Distinct words: CLIP's BPE vocabulary (whole words first, then word pieces), then capitalised copies."""
    import open_clip

    encoder = open_clip.get_tokenizer("ViT-B-32").encoder
    whole = [w[:-4] for w in encoder if w.endswith("</w>")]
    pieces = [w for w in encoder if not w.endswith("</w>")]
    words = [w for w in dict.fromkeys([*whole, *pieces]) if w.isascii() and w.isalpha()]
    lower = list(dict.fromkeys(w.lower() for w in words))
    return tuple(dict.fromkeys([*lower, *(w.capitalize() for w in lower)]))


def gpt2_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer of exactly ``vocab`` ids; the last is ``<|endoftext|>`` (GPT-2's EOS id)."""
    words = [w for w in word_pool() if w != "a"][: vocab - 3]
    tokenizer = toy_tokenizer(["a", *words], tail=("<|endoftext|>",), eos="<|endoftext|>", pad="<|endoftext|>",
                              bos="<|endoftext|>", unk="<|endoftext|>")
    assert len(tokenizer) == vocab and tokenizer.eos_token_id == vocab - 1, (len(tokenizer), tokenizer.eos_token_id)
    return tokenizer


def vlm_words(vocab: int) -> list[str]:
    """Caption words that make the Idefics3 toy tokenizer exactly ``vocab`` ids (its specials are 44 more)."""
    specials = 3 + 40 + 1  # head specials, Idefics3 tail specials, "\n"
    words: list[str] = []
    have = set(toy_words([]))
    for word in word_pool():
        if len(have) >= vocab - specials:
            break
        if word not in have:
            have.add(word)
            words.append(word)
    return words


# ---------------------------------------------------------------------- models, judge, data


def make_judge(opts: argparse.Namespace, device: torch.device) -> ClipScorer:
    torch.manual_seed(0)
    batch = max(opts.batches)
    if opts.tiny:
        import open_clip
        from open_clip.transform import image_transform

        model = open_clip.CLIP(embed_dim=64, vision_cfg=dict(image_size=32, patch_size=4, width=64, layers=2),
                               text_cfg=dict(context_length=24, width=64, heads=4, layers=2))
        return ClipScorer(model, open_clip.SimpleTokenizer(context_length=24), image_transform(32, is_train=False),
                          device=device, batch_size=batch)
    kwargs = {"precision": "bf16"} if opts.bf16 else {}
    return ClipScorer.from_open_clip("ViT-B-32", pretrained=None, device=device, batch_size=batch, **kwargs)


def make_cache(n: int, scorer: ClipScorer) -> ImageEmbeddingCache:
    generator = torch.Generator().manual_seed(0)
    emb = F.normalize(torch.randn(n, scorer.embed_dim, generator=generator), dim=-1)
    return ImageEmbeddingCache([f"img-{i}" for i in range(n)], emb).to(scorer.device, scorer.dtype)


def make_images(n: int, size: int) -> list[Image.Image]:
    """Smooth random images (8x8 noise blown up): cheap to store and decode, so data loading stays small."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).resize((size, size), Image.BILINEAR)
            for _ in range(n)]


def gpt2_config(opts: argparse.Namespace, tokenizer: Any) -> GPT2Config:
    shape = dict(n_layer=2, n_embd=32, n_head=2, n_positions=64) if opts.tiny else {}
    return GPT2Config(vocab_size=len(tokenizer), bos_token_id=tokenizer.eos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **shape)


def build(kind: str, opts: argparse.Namespace, scorer: ClipScorer) -> dict[str, Any]:
    """Model, processing class and trainer keyword arguments of ``kind``, on the CPU in fp32 (cast later)."""
    torch.manual_seed(0)
    if kind in ("clipcap", "text"):
        tokenizer = gpt2_tokenizer(300 if opts.tiny else GPT2_VOCAB)
        if kind == "clipcap":
            config = ClipCapConfig(prefix_dim=scorer.embed_dim, prefix_length=4 if opts.tiny else 10,
                                   gpt2_config=gpt2_config(opts, tokenizer).to_dict())
            return {"model": ClipCapModel(config), "processing_class": tokenizer}
        from clip_rl_trl.models.policies import CausalLMPolicy

        return {"model": GPT2LMHeadModel(gpt2_config(opts, tokenizer)), "processing_class": tokenizer,
                "policy": CausalLMPolicy(tokenizer, prompt="a")}
    from peft import LoraConfig

    from clip_rl_trl.models.families import family

    if opts.tiny:
        model, processor = build_toy_vlm("idefics3")
    else:
        sizes = {"text": SMOLVLM_TEXT, "vision": SMOLVLM_VISION, "scale_factor": SMOLVLM_SCALE}
        model, processor = build_toy_vlm("idefics3", image_size=SMOLVLM_IMAGE,
                                         words=vlm_words(SMOLVLM_TEXT["vocab_size"]), sizes=sizes)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=family("vlm").lora_targets)
    return {"model": model, "processing_class": processor, "peft_config": lora}


def image_size(opts: argparse.Namespace) -> int:
    return 32 if opts.tiny else SMOLVLM_IMAGE


def dataset_for(kind: str, opts: argparse.Namespace, cache: ImageEmbeddingCache, stock: bool) -> datasets.Dataset:
    ids = cache.ids[: opts.images]
    columns: dict[str, list] = {"image_id": ids}
    if kind == "vlm":
        images = make_images(opts.distinct_pixels, image_size(opts))
        columns["image"] = [images[i % len(images)] for i in range(len(ids))]
        if stock:
            turn = [{"type": "image"}, {"type": "text", "text": DEFAULT_INSTRUCTION}]
            columns["prompt"] = [[{"role": "user", "content": turn}]] * len(ids)
    elif stock:
        columns["prompt"] = ["a"] * len(ids)
    return datasets.Dataset.from_dict(columns)


# ---------------------------------------------------------------------- timing


class StepClock(TrainerCallback):
    """Wall time between consecutive step ends (so data loading counts), the part timers' sums per step, and the
    peak memory from the end of the warm-up on."""

    def __init__(self, device: torch.device, warmup: int) -> None:
        self.device, self.warmup = device, warmup
        self.stamps: list[float] = []
        self.parts: list[dict[str, float]] = []
        self.current: dict[str, float] = defaultdict(float)

    def on_train_begin(self, args, state, control, **kwargs):
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        self.stamps.append(time.perf_counter())
        self.parts.append(dict(self.current))
        self.current.clear()
        if len(self.parts) == self.warmup:
            reset_peak_memory(self.device)

    def timed(self, name: str, fn: Any, after: Any = None) -> Any:
        """``fn`` timed under ``name``; ``after(result)`` then runs outside the timed span."""

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            sync(self.device)
            start = time.perf_counter()
            try:
                result = fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.current[name] += time.perf_counter() - start
            if after is not None:
                after(result)
            return result

        return wrapper


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak RSS (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(kind: str, stock: bool, batch: int, opts: argparse.Namespace, scorer: ClipScorer,
        cache: ImageEmbeddingCache) -> dict[str, Any]:
    """Train ``opts.warmup + opts.steps`` steps of one configuration; one row of results."""
    from trl import GRPOConfig, GRPOTrainer

    device = scorer.device
    parts = build(kind, opts, scorer)
    model = parts.pop("model")
    if opts.bf16:
        model = model.to(torch.bfloat16)
    rewards = [ClipSReward(scorer, cache, prompt=""), RetrievalReward(scorer, cache)]
    clock = StepClock(device, opts.warmup)
    lengths: list[float] = []  # mean completion tokens (EOS included) of every generation call
    common = dict(
        per_device_train_batch_size=batch, num_generations=opts.num_generations,
        max_completion_length=opts.max_completion_length, max_steps=opts.warmup + opts.steps, learning_rate=1e-5,
        logging_steps=1, report_to=[], save_strategy="no", use_cpu=device.type == "cpu", bf16=opts.bf16, seed=0,
        disable_tqdm=True, log_completions=False, disable_dropout=True,
        gradient_checkpointing=kind == "vlm", dataloader_num_workers=0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        dataset = dataset_for(kind, opts, cache, stock)
        if stock:
            parts.pop("policy", None)  # the stock trainer reads the prompt from the dataset
            trainer = GRPOTrainer(model=model, reward_funcs=rewards, args=GRPOConfig(output_dir=tmp, **common),
                                  train_dataset=dataset, callbacks=[clock], **parts)
            trainer._generate_single_turn = clock.timed(
                "generation", trainer._generate_single_turn,
                after=lambda out: lengths.append(statistics.mean(len(ids) for ids in out[0])))
            trainer._calculate_rewards = clock.timed("rewards", trainer._calculate_rewards)
        else:
            trainer = CaptionRLTrainer(model=model, reward_funcs=rewards,
                                       args=CaptionRLConfig(output_dir=tmp, baseline="group", **common),
                                       train_dataset=dataset, image_cache=cache, scorer=scorer, callbacks=[clock],
                                       **parts)
            policy = trainer.policy
            eos = trainer.caption_tokenizer.eos_token_id
            policy.generate = clock.timed(
                "generation", policy.generate,
                after=lambda ids: lengths.append(completion_mask(ids, eos).sum(1).float().mean().item()))
            policy.image_inputs = clock.timed("inputs", policy.image_inputs)
            trainer._score = clock.timed("rewards", trainer._score)
        trainer.compute_loss = clock.timed("loss_backward", trainer.compute_loss)
        trainer.accelerator.backward = clock.timed("loss_backward", trainer.accelerator.backward)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    steps = np.diff(clock.stamps)[opts.warmup :]
    timed = clock.parts[opts.warmup :]
    total = float(steps.sum())
    shares = {p: sum(t.get(p, 0.0) for t in timed) / total for p in PARTS}
    shares["other"] = 1.0 - sum(shares.values())
    median = float(np.median(steps))
    return {
        "model": kind, "trainer": "stock" if stock else "ours", "batch": batch, "device": str(device),
        "dtype": "bf16" if opts.bf16 else "fp32", "steps": len(steps), "median_step_s": median,
        "captions_per_s": batch / median, "peak_memory_mb": peak_memory_mb(device),
        "memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "peak RSS",
        **{f"share_{k}": v for k, v in shares.items()},
        **{f"seconds_{k}": v * total / len(steps) for k, v in shares.items()},  # mean per timed step
        "completion_tokens": statistics.mean(lengths[opts.warmup :]),
    }


# ---------------------------------------------------------------------- report


def table(rows: list[dict[str, Any]]) -> str:
    ratio = {(r["model"], r["batch"]): r["median_step_s"] for r in rows if r["trainer"] == "stock"}
    out = ["| model | trainer | batch | step | captions/s | peak MB | gen | rewards | inputs | loss+bwd | other "
           "| tokens | ours/stock |", "|" + "---|" * 13]
    for r in rows:
        stock = ratio.get((r["model"], r["batch"]))
        vs = f"{r['median_step_s'] / stock:.2f}x" if stock and r["trainer"] == "ours" else ""
        out.append(
            f"| {r['model']} | {r['trainer']} | {r['batch']} | {r['median_step_s'] * 1e3:.1f} ms "
            f"| {r['captions_per_s']:.1f} | {r['peak_memory_mb']:.0f} | {r['share_generation']:.1%} "
            f"| {r['share_rewards']:.1%} | {r['share_inputs']:.1%} | {r['share_loss_backward']:.1%} "
            f"| {r['share_other']:.1%} | {r['completion_tokens']:.1f} | {vs} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="clipcap,vlm,text", help="comma list of clipcap, vlm, text")
    parser.add_argument("--batches", default=None, help="captions per step, comma list (default 64,...,1024)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5; --tiny 2)")
    parser.add_argument("--warmup", type=int, default=None, help="steps before timing (default 2; --tiny 1)")
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=None, help="default 16; --tiny 6")
    parser.add_argument("--device", default=None, help="cuda if available, else cpu")
    parser.add_argument("--stock", choices=("auto", "off"), default="auto",
                        help="time the stock trl.GRPOTrainer beside ours where it can drive the model (text, vlm)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU, for a smoke test")
    parser.add_argument("--clip-tokenizer", choices=("fast", "open_clip"), default="fast",
                        help="open_clip: ClipScorer without its fast tokenization path (as before issue 13's fix: "
                        "every caption through open_clip's tokenizer twice), to measure the fix inside a step")
    parser.add_argument("--json", default=None, help="write the rows to this file")
    opts = parser.parse_args()
    if opts.tiny:
        opts.device = opts.device or "cpu"
    device = torch.device(opts.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":
        torch.set_num_threads(1)
    opts.bf16 = device.type == "cuda"
    default_batches = "8,16" if opts.tiny else "64,128,256,512,1024"
    opts.batches = [int(b) for b in (opts.batches or default_batches).split(",")]
    opts.steps = opts.steps or (2 if opts.tiny else 5)
    opts.warmup = opts.warmup if opts.warmup is not None else (1 if opts.tiny else 2)
    opts.max_completion_length = opts.max_completion_length or (6 if opts.tiny else 16)
    if opts.warmup < 1:
        parser.error("--warmup must be >= 1 (the first step builds the optimiser and is never timed)")
    if any(b % opts.num_generations for b in opts.batches):
        parser.error(f"every batch must be a multiple of --num-generations {opts.num_generations}")
    models = [m.strip() for m in opts.models.split(",") if m.strip()]
    unknown = set(models) - {"clipcap", "vlm", "text"}
    if unknown:
        parser.error(f"unknown models {sorted(unknown)}")
    opts.images = 2 * max(opts.batches) // opts.num_generations
    opts.distinct_pixels = min(opts.images, 64)

    scorer = make_judge(opts, device)
    if opts.clip_tokenizer == "open_clip":
        scorer._fast = lambda: None  # encode_texts then counts truncations and tokenizes with the tokenizer itself
    cache = make_cache(opts.images, scorer)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU, 1 thread'}), "
          f"{'bf16' if opts.bf16 else 'fp32'}, {'tiny sizes' if opts.tiny else 'full sizes'}; "
          f"{opts.num_generations} captions per image, max_completion_length {opts.max_completion_length}, "
          f"{opts.warmup} warm-up + {opts.steps} timed steps; CLIP tokenization {opts.clip_tokenizer}; "
          f"torch {torch.__version__}", flush=True)
    rows = []
    for kind in models:
        for batch in opts.batches:
            sides = [False] + ([True] if kind in ("text", "vlm") and opts.stock == "auto" else [])
            for stock in sides:
                try:
                    row = run(kind, stock, batch, opts, scorer, cache)
                except Exception as err:  # out of memory, or a stock trainer that cannot drive the model
                    if not (stock or isinstance(err, torch.OutOfMemoryError)):
                        raise
                    side = "stock GRPOTrainer" if stock else "CaptionRLTrainer"
                    print(f"{side} on {kind} at batch {batch} failed: {type(err).__name__}: {err}", flush=True)
                    continue
                finally:  # the next configuration's peak memory must not count this one's leftovers
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                print(f"  {kind} {row['trainer']} batch {batch}: {row['captions_per_s']:.1f} captions/s", flush=True)
                if opts.json:  # after every row: a run stopped by a time limit keeps what it measured
                    with open(opts.json, "w") as f:
                        json.dump(rows, f, indent=1)
    print(table(rows))


if __name__ == "__main__":
    main()
