"""Cost of the composite CLIP reward of one training step, against one CLIP text pass and a naive pipeline.

The composite is CLIP-S + retrieval + Group Embedding Gap + bidirectional + discriminator (reward and its
online update), computed by the library's reward callables on one batch of captions. It is timed against

  (a) one CLIP text-encoder pass over the same captions, the floor any CLIP reward has to pay, and
  (b) a naive pipeline in which every reward encodes the captions and the images itself.

Each repetition scores new captions (as every RL step does), so the shared text memory never hits across
repetitions. Run (about 3 minutes on 2 CPU cores, seconds on a GPU):

    python benchmarks/reward_pipeline.py --model ViT-B-32 --captions 512 --generations 4

``--host`` instead times the host-side (device-independent) work of one RL step at ``--captions`` captions, which on
a fast GPU decides throughput: CLIP tokenization (open_clip's tokenizer as ``ClipScorer`` used it, every caption
encoded twice, against its exact fast path now), decoding caption ids to text (the trainer's per-row loop against
one ``batch_decode``), image-embedding-cache look-ups, the in-batch P@1 target list, and Hugging Face
``generate``'s per-token overhead for ClipCap (against a bare cached forward loop). One torch thread:

    python benchmarks/reward_pipeline.py --host --captions 1024
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from clip_rl_trl import (
    BidirectionalReward,
    ClipScorer,
    ClipSReward,
    Discriminator,
    DiscriminatorReward,
    GroupGapReward,
    ImageEmbeddingCache,
    RetrievalReward,
    similar_image_groups,
)
from clip_rl_trl.rewards import functional as RF

WORDS = "a an the red blue green small large dog cat man woman on in with near sitting standing street table".split()


def captions_for(step: int, n: int, rng: np.random.Generator) -> list[str]:
    return [f"{' '.join(rng.choice(WORDS, size=rng.integers(5, 15)))} {step}" for _ in range(n)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> list[float]:
    times = []
    for r in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn(r)
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def best_of(fn, repeats: int) -> float:
    """The fastest of ``repeats`` calls (host-only code: the minimum is the least disturbed by other jobs)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def host(args: argparse.Namespace) -> None:
    """Host-side costs of one RL step at ``args.captions`` captions (CPU, one thread)."""
    import open_clip
    from transformers import DynamicCache

    from clip_rl_trl.clip import _FastClipTokens
    from clip_rl_trl.models.policies import completion_mask

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from rl_step_throughput import gpt2_tokenizer

    torch.set_num_threads(1)
    n, reps, length = args.captions, args.repeats, 16
    rng = np.random.default_rng(0)
    gpt_tok = gpt2_tokenizer(50257)
    eos = gpt_tok.eos_token_id

    def policy_ids() -> torch.Tensor:  # what a random GPT-2-sized policy samples: 16 words, some stopped early
        ids = torch.from_numpy(rng.integers(0, eos, (n, length)))
        stop = torch.from_numpy(rng.integers(8, length + 4, n))
        ids[torch.arange(length)[None, :] >= stop[:, None]] = eos
        return ids

    print(f"host-side costs of one step at {n} captions, {length} tokens each; CPU, 1 torch thread; best of {reps}")
    # -- CLIP tokenization: before (count truncations with encode, then tokenizer(texts)) vs the fast path
    tok = open_clip.get_tokenizer(args.model)
    ctx = tok.context_length
    for name, make in [
        ("random-policy captions", lambda: [t.strip() for t in gpt_tok.batch_decode(policy_ids().tolist(),
                                                                                   skip_special_tokens=True)]),
        ("COCO-like captions", lambda: captions_for(0, n, rng)),
    ]:
        batches = [make() for _ in range(reps + 1)]

        def before(texts):
            sum(len(tok.encode(t)) > ctx - 2 for t in texts)
            return tok(texts)

        def after(fast, texts):
            encoded = [fast.encode(t) for t in texts]
            sum(len(ids) > ctx - 2 for ids in encoded)
            return fast.tensor(encoded, ctx)

        assert torch.equal(before(batches[0]), after(_FastClipTokens(tok), batches[0]))
        t_before = min(best_of(lambda b=b: before(b), 1) for b in batches[1:])
        t_cold = min(best_of(lambda b=b: after(_FastClipTokens(tok), b), 1) for b in batches[1:])
        warm = _FastClipTokens(tok)
        after(warm, batches[0])  # the previous step's captions: their words are known, these texts are not
        t_warm = min(best_of(lambda b=b, w=warm: after(w, b), 1) for b in batches[1:])
        seen = batches[1]  # every caption seen before (a collapsed policy)
        t_seen = best_of(lambda w=warm, b=seen: after(w, b), reps)
        print(f"  CLIP tokenization, {name}: before {t_before * 1e3:.1f} ms; fast path {t_cold * 1e3:.1f} ms "
              f"(memo empty, {t_before / t_cold:.1f}x), {t_warm * 1e3:.1f} ms (after the previous step's captions, "
              f"{t_before / t_warm:.1f}x), {t_seen * 1e3:.2f} ms (captions seen)")
    # -- decoding ids to text: the trainer's per-row loop vs one batch_decode
    ids = policy_ids()
    mask = completion_mask(ids, eos)

    def per_row():
        return [gpt_tok.decode(row[: int(m.sum())].tolist(), skip_special_tokens=True).strip()
                for row, m in zip(ids, mask, strict=True)]

    def batched():
        lengths = mask.sum(1).tolist()
        rows = [row[:k] for row, k in zip(ids.tolist(), lengths, strict=True)]
        return [t.strip() for t in gpt_tok.batch_decode(rows, skip_special_tokens=True)]

    def rust_batch():  # the Rust tokenizer's own batch decode (the same strings: no Python clean-up is configured)
        lengths = mask.sum(1).tolist()
        rows = [row[:k] for row, k in zip(ids.tolist(), lengths, strict=True)]
        return [t.strip() for t in gpt_tok.backend_tokenizer.decode_batch(rows, skip_special_tokens=True)]

    assert per_row() == batched() == rust_batch()
    t_row, t_batch, t_rust = best_of(per_row, reps), best_of(batched, reps), best_of(rust_batch, reps)
    print(f"  decode (trainer._decode): per row {t_row * 1e3:.1f} ms ({2 * n} host syncs on a GPU: int(m.sum()) "
          f"and .tolist() per row); one .tolist() + batch_decode {t_batch * 1e3:.1f} ms ({t_row / t_batch:.1f}x); "
          f"+ backend_tokenizer.decode_batch {t_rust * 1e3:.1f} ms ({t_row / t_rust:.1f}x); same strings")
    # -- image-embedding-cache look-ups by id (the trainer looks up the batch's ids 4 times a step)
    cache = ImageEmbeddingCache([f"img-{i}" for i in range(100_000)], torch.randn(100_000, 512))
    batch_ids = [f"img-{i}" for i in rng.integers(0, 100_000, n // 4) for _ in range(4)]
    t_cache = best_of(lambda: cache[batch_ids], reps)
    print(f"  cache[{n} str ids] of a 100k x 512 cache: {t_cache * 1e3:.2f} ms")
    # -- trainer._in_batch_p_at_1's targets: list.index per caption vs a dict
    distinct = list(dict.fromkeys(batch_ids))
    t_index = best_of(lambda: torch.tensor([distinct.index(i) for i in batch_ids]), reps)

    def by_dict():
        position = {k: j for j, k in enumerate(distinct)}
        return torch.tensor([position[i] for i in batch_ids])

    assert torch.equal(by_dict(), torch.tensor([distinct.index(i) for i in batch_ids]))
    t_dict = best_of(by_dict, reps)
    print(f"  in-batch P@1 targets: list.index {t_index * 1e3:.2f} ms, dict {t_dict * 1e3:.2f} ms")
    # -- VLM image inputs: CausalVLMPolicy.image_inputs runs the processor on every row's image, each image 4 times
    from transformers import Idefics3ImageProcessor

    processor = Idefics3ImageProcessor(  # SmolVLM-256M's tower reads 512 px; one unsplit image per caption
        size={"longest_edge": 512}, max_image_size={"longest_edge": 512}, do_image_splitting=False,
        image_mean=[0.5] * 3, image_std=[0.5] * 3)
    photos = [Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)) for _ in range(16)]
    t_image = best_of(lambda: processor(images=[[im] for im in photos], return_tensors="pt"), reps) / len(photos)
    print(f"  Idefics3 image processor, 640x480 -> 512 px: {t_image * 1e3:.2f} ms per image: {t_image * n:.2f} s for "
          f"{n} rows, {t_image * n / args.generations:.2f} s for their {n // args.generations} distinct images")
    # -- HF generate's per-token overhead for ClipCap: a 12-layer GPT-2 of width 64 over 1,000 tokens, batch 8, so
    # that compute is negligible and what is left is Python per token (what a fast GPU waits on)
    from transformers import GPT2Config

    from clip_rl_trl import ClipCapConfig, ClipCapModel

    torch.manual_seed(0)
    gpt = GPT2Config(vocab_size=1000, n_layer=12, n_embd=64, n_head=2, bos_token_id=999, eos_token_id=999)
    model = ClipCapModel(ClipCapConfig(prefix_dim=512, prefix_length=10, gpt2_config=gpt.to_dict())).eval()
    emb = F.normalize(torch.randn(8, 512), dim=-1)
    steps = 32

    def hf_generate():
        model.generate(emb, do_sample=True, top_k=0, max_new_tokens=steps)  # a random model rarely stops early

    @torch.no_grad()
    def bare_loop():
        cache_kv = DynamicCache()
        out = model.gpt(inputs_embeds=model.prefix_embeds(emb), past_key_values=cache_kv, use_cache=True)
        for _ in range(steps - 1):
            token = torch.multinomial(out.logits[:, -1].float().softmax(-1), 1)
            out = model.gpt(input_ids=token, past_key_values=cache_kv, use_cache=True)

    t_gen, t_bare = best_of(hf_generate, reps) / steps, best_of(bare_loop, reps) / steps
    print(f"  ClipCap sampling per token (12 layers x 64, vocabulary 1000, batch 8): HF generate "
          f"{t_gen * 1e3:.2f} ms, bare cached forward loop {t_bare * 1e3:.2f} ms: generate's own overhead "
          f"{(t_gen - t_bare) * 1e3:.2f} ms per token")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--captions", type=int, default=512)
    parser.add_argument("--generations", type=int, default=4, help="captions per image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--host", action="store_true", help="time the host-side costs of one step instead")
    args = parser.parse_args()
    if args.host:
        host(args)
        return

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    device = torch.device(args.device)
    scorer = ClipScorer.from_open_clip(args.model, pretrained=None, device=device, batch_size=args.captions)
    n_images = args.captions // args.generations
    size = scorer.preprocess.transforms[0].size
    size = size if isinstance(size, int) else size[0]
    images = [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(n_images)]
    ids = [f"img{i}" for i in range(n_images)]
    cache = ImageEmbeddingCache.build([{"image": im, "image_id": i} for im, i in zip(images, ids, strict=True)], scorer, progress=False)
    cache = cache.to(device)
    groups = similar_image_groups(cache.embeddings, k=5)
    batch_ids = [i for i in ids for _ in range(args.generations)]
    refs = [[f"reference caption {j} of {i}" for j in range(5)] for i in batch_ids]
    disc = Discriminator(scorer.embed_dim, seed=0)
    rewards = [
        ClipSReward(scorer, cache, prompt=""),
        RetrievalReward(scorer, cache),
        GroupGapReward(scorer, cache, groups),
        BidirectionalReward(scorer, cache),
        DiscriminatorReward(disc, scorer, cache),
    ]
    print(f"device {device}, {args.model} (random init), {args.captions} captions = {n_images} images x "
          f"{args.generations}, {args.repeats} repeats after one warm-up")

    def one_pass(r: int) -> None:
        scorer.encode_texts(captions_for(1000 + r, args.captions, rng))

    def composite(r: int, reward_list=rewards) -> None:
        completions = captions_for(2000 + r, args.captions, rng)
        for reward in reward_list:
            reward(prompts=[""] * len(completions), completions=completions, completion_ids=None,
                   image_id=batch_ids, captions=refs)

    def naive(r: int) -> None:
        # Every reward encodes its own texts and images, as separate scripts glued together would.
        completions = captions_for(3000 + r, args.captions, rng)
        owner = torch.arange(n_images, device=device).repeat_interleave(args.generations)
        batch_images = [images[i] for i in owner.tolist()]
        for name in ["clip_s", "retrieval", "group_gap", "bidirectional", "discriminator"]:
            txt = scorer.encode_texts(completions)
            img = scorer.encode_images(batch_images)
            if name == "clip_s":
                RF.clip_s(img, txt)
            elif name == "retrieval":
                RF.retrieval_logprob(txt, img, owner, scorer.logit_scale)
            elif name == "group_gap":
                group = scorer.encode_images([images[j] for j in groups[owner].reshape(-1).tolist()])
                RF.group_embedding_gap(txt, img, group.view(len(txt), 5, -1))
            elif name == "bidirectional":
                RF.bidirectional_contrastive(txt, img, owner)
            else:
                disc.reward(img, txt)
                gt = scorer.encode_texts([r_ for rs in refs[:: args.generations] for r_ in rs])
                gt_img = scorer.encode_images([images[i] for i in range(n_images) for _ in range(5)])
                disc.update((gt_img, gt), (img, txt))

    with_prompt = [ClipSReward(scorer, cache), *rewards[1:]]
    results = {}
    for name, fn in [
        ("one CLIP text pass", one_pass),
        ("composite (library)", composite),
        ("composite, CLIP-S with its prompt", lambda r: composite(r, with_prompt)),
        ("naive pipeline", naive),
    ]:
        fn(-1)  # warm-up
        results[name] = statistics.median(timed(fn, device, args.repeats))
        print(f"  {name:<36} {results[name] * 1000:9.1f} ms (median)")
    base = results["one CLIP text pass"]
    print(f"composite / one text pass            = {results['composite (library)'] / base:.2f}x  (goal <= 1.30x)")
    print(f"composite with CLIP-S prompt / pass  = {results['composite, CLIP-S with its prompt'] / base:.2f}x")
    print(f"naive / composite                    = {results['naive pipeline'] / results['composite (library)']:.2f}x")


if __name__ == "__main__":
    main()
