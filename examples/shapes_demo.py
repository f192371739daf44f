"""The shapes world (docs/shapes_world.md) with Chaffin et al. 2024's full recipe, offline on a CPU.

One- and two-object scenes whose human-like references mostly name only the salient object ("a red circle"),
a tiny CLIP trained on the world as the judge, and a tiny ClipCap MLE-trained on the references: the captioner
starts generic, and the RL stage (bidirectional contrastive reward + discriminator + ground-truth term) makes
its captions distinctive. The world checks what no real dataset can: does a caption parse (grammar validity),
and are the attributes it names true of the scene (attribute precision).

The recipe is examples/configs/shapes_demo.yaml; `clip-rl-trl demo` runs the same recipe with a richer report.

    python examples/shapes_demo.py --config examples/configs/shapes_demo.yaml [--output-dir DIR] [--set K=V]
    python examples/shapes_demo.py --config examples/configs/shapes_demo.yaml --toy      # about a minute

Writes the fine-tuned captioner, its model card (README.md), report.json / report.md (before and after),
captions.jsonl, training.png and captions.png into the output folder (default outputs/shapes_demo[-toy]).
"""

from clip_rl_trl.recipe import example_main

if __name__ == "__main__":
    example_main(__doc__)
