"""How well does a shapes-world CLIP's image embedding encode each object's shape? A linear probe.

Trains (or loads from the cache) the tiny CLIP with the given vision tower, embeds 3,000 "train" and 1,000
"test" scenes, fits a logistic regression from the embedding to the first object's shape (and colour) on the
first set and prints its accuracy on the second (chance: 0.20 for the five shapes, 1/6 for the six colours), also
on single-object scenes alone, plus full-caption P@1 among 100, and the judge's binding accuracy: the share of
(scene, hard negative) pairs, five ``ShapesWorld.hard_negative`` scenes per test scene, in which the scene's
full caption scores above the negative's (colours, shapes or sizes exchanged between the objects, or one
replaced; chance 0.5). Commands behind docs/shapes_world.md:

    python benchmarks/clip_shape_probe.py                                     # the default ResNet, NegCLIP
    python benchmarks/clip_shape_probe.py --vision-cfg '{"layers": 3, "width": 96, "patch_size": 8}' --epochs 12 --no-hard-negatives
    python benchmarks/clip_shape_probe.py --vision-cfg '{"layers": 3, "width": 96, "patch_size": 4}' --epochs 12 --no-hard-negatives
    python benchmarks/clip_shape_probe.py --no-hard-negatives   # the judge without NegCLIP's hard negatives
"""

from __future__ import annotations

import argparse
import json
import random

import torch
import torch.nn.functional as F

from clip_rl_trl.data.shapes import ShapesWorld, train_shapes_clip
from clip_rl_trl.data.shapes.world import COLOURS, SHAPES
from clip_rl_trl.embeddings import ImageEmbeddingCache
from clip_rl_trl.evaluation.retrieval import recall_at_k


def probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor) -> float:
    """Test accuracy of a logistic regression fitted with Adam (500 full-batch steps)."""
    linear = torch.nn.Linear(x_train.shape[1], int(y_train.max()) + 1)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2)
    for _ in range(500):
        opt.zero_grad()
        F.cross_entropy(linear(x_train), y_train).backward()
        opt.step()
    with torch.no_grad():
        return (linear(x_test).argmax(1) == y_test).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--vision-cfg", type=json.loads, default={}, help="JSON merged into the default tower"
    )
    parser.add_argument("--epochs", type=int, default=None, help="CLIP epochs (default: train_shapes_clip's)")
    parser.add_argument("--hard-negatives", action=argparse.BooleanOptionalAction, default=True,
                        help="train_shapes_clip(hard_negatives=...): NegCLIP's swapped-attribute negatives (default on)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    world = ShapesWorld(0)
    settings = {"vision_cfg": args.vision_cfg} if args.vision_cfg else {}
    if args.epochs is not None:
        settings["epochs"] = args.epochs
    settings["hard_negatives"] = args.hard_negatives
    scorer = train_shapes_clip(world, **settings)
    train, test = world.to_dataset(3000, "train"), world.to_dataset(1000, "test")

    def embed(ds):
        cache = ImageEmbeddingCache.build(ds.select_columns(["image", "image_id"]), scorer, progress=False)
        return cache[ds["image_id"]].float()

    x_train, x_test = embed(train), embed(test)
    for key, vocab in (("shape", list(SHAPES)), ("colour", list(COLOURS))):
        y_train, y_test = ([vocab.index(s["objects"][0][key]) for s in ds["scene"]] for ds in (train, test))
        print(
            f"{key} of the first object: {probe(x_train, torch.tensor(y_train), x_test, torch.tensor(y_test)):.3f}"
        )
        if key == "shape":
            single = [
                [i for i, s in enumerate(ds["scene"]) if len(s["objects"]) == 1] for ds in (train, test)
            ]
            acc = probe(
                x_train[single[0]],
                torch.tensor(y_train)[single[0]],
                x_test[single[1]],
                torch.tensor(y_test)[single[1]],
            )
            print(f"shape, single-object scenes: {acc:.3f}")
    r1 = recall_at_k(scorer.encode_texts(test["full_caption"][:100]).float(), x_test[:100], k=1)[1]
    print(f"full-caption R@1 among the first 100 test scenes: {r1:.3f}")
    rng = random.Random("probe-negatives")
    scenes = test["scene"]
    true = scorer.encode_texts(test["full_caption"]).float()
    pairs = [(i, world.describe(world.hard_negative(s, rng))) for i, s in enumerate(scenes) for _ in range(5)]
    owner = torch.tensor([i for i, _ in pairs])
    negative = scorer.encode_texts([caption for _, caption in pairs]).float()
    right = (x_test[owner] * true[owner]).sum(1) > (x_test[owner] * negative).sum(1)
    print(f"binding accuracy (full caption vs a hard negative, chance 0.5): {right.float().mean().item():.3f}")


if __name__ == "__main__":
    main()
