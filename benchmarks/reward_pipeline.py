"""Cost of the composite CLIP reward of one training step, against one CLIP text pass and a naive pipeline.

The composite is CLIP-S + retrieval + Group Embedding Gap + bidirectional + discriminator (reward and its
online update), computed by the library's reward callables on one batch of captions. It is timed against

  (a) one CLIP text-encoder pass over the same captions, the floor any CLIP reward has to pay, and
  (b) a naive pipeline in which every reward encodes the captions and the images itself.

Each repetition scores new captions (as every RL step does), so the shared text memory never hits across
repetitions. Run (about 3 minutes on 2 CPU cores, seconds on a GPU):

    python benchmarks/reward_pipeline.py --model ViT-B-32 --captions 512 --generations 4
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (random weights)")
    parser.add_argument("--captions", type=int, default=512)
    parser.add_argument("--generations", type=int, default=4, help="captions per image")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

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
