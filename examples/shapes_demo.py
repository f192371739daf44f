"""The shapes world (docs/shapes_world.md) with Chaffin et al. 2024's full recipe, offline on a CPU.

One- and two-object scenes whose human-like references mostly name only the salient object ("a red circle"),
a tiny CLIP trained on the world as the judge, and a tiny ClipCap MLE-trained on the references: the captioner
starts generic, and the RL stage (bidirectional contrastive reward + discriminator + ground-truth term) makes
its captions distinctive. The world checks what no real dataset can: does a caption parse (grammar validity),
and are the attributes it names true of the scene (attribute precision).

The recipe is the packaged clip_rl_trl/recipes/shapes_demo.yaml (`--config shapes_demo`, the default here), the
recipe `clip-rl-trl demo` runs.

    python examples/shapes_demo.py [--output_dir DIR] [--FIELD VALUE ...]       # minutes
    python examples/shapes_demo.py --toy                                         # about a minute

Writes the fine-tuned captioner, its model card (README.md), report.json / report.md (before and after),
captions.jsonl, training.png and captions.png into the output folder (default outputs/shapes_demo[-toy]).
"""

import sys

from clip_rl_trl.pipeline import main

if __name__ == "__main__":
    argv = sys.argv[1:]
    main(argv if "--config" in argv else ["--config", "shapes_demo", *argv])
