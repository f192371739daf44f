"""The grammar reward of Cho et al. 2022: corrupted captions as negatives, a head on the CLIP text embedding.

Cho et al. fine-tune CLIP's text encoder (image encoder frozen) with its contrastive loss on (image, caption)
pairs plus a cross-entropy that teaches a small head to tell a caption (label 1) from a corrupted copy of it
(label 0: an n-gram repeated, removed, inserted, swapped, or the words shuffled). The head's probability of
"grammatical" is then a reward that discourages the degenerate, repetitive captions a pure CLIP reward yields.

The head reads the same pooled, projected, L2-normalised text embedding that ``ClipScorer.encode_texts``
returns, so a training step's grammar reward reads the one text pass that the other rewards share. The head
records the prompt its training texts started with (``head.prompt``; Cho et al.'s released code: "A photo
depicts "), and scoring prepends the same one: a head only knows text as it saw it in training.
"""

from __future__ import annotations

import copy
import json
import os
import random
from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from clip_rl_trl.clip import ClipScorer
from clip_rl_trl.rewards.functional import check_embedding_matrix

CORRUPTIONS: tuple[str, ...] = ("repeat", "remove", "insert", "swap", "shuffle")
_HEAD_FILE = "grammar_head.safetensors"


class GrammarNegativeSampler:
    """Seeded corruptions of a caption into an ungrammatical negative (Cho et al. 2022).

    Captions are split on whitespace into tokens; ``n`` is drawn uniformly from ``1..max_ngram`` (capped by
    what the caption allows) and the corruption is drawn uniformly among the kinds that can change it:

    - ``repeat``: duplicate an n-gram in place (``a red circle`` -> ``a red red circle``);
    - ``remove``: delete an n-gram, leaving at least one token (-> ``a circle``);
    - ``insert``: insert an n-gram at a random position, its tokens drawn from ``vocab`` when given, else a
      contiguous n-gram of the caption itself (-> ``a red circle a red``);
    - ``swap``: exchange two non-overlapping n-grams of the same length (-> ``circle red a``);
    - ``shuffle``: shuffle all the tokens of the caption (-> ``red circle a``).

    A negative is never the caption itself (compared token by token) and never one of ``avoid``: a
    collection of known-grammatical captions (e.g. the training captions) or a predicate
    ``avoid(text) -> bool`` (e.g. a grammar checker), so that removing an adjective from ``a red circle``
    does not label the grammatical ``a circle`` a negative. Cho et al. do not filter: ``avoid=None``. Short captions: a one-word caption can
    only be repeated or receive an insertion (``circle`` -> ``circle circle``); a two-word caption also loses
    a word (``a circle`` -> ``circle``) or has its two words swapped. An empty caption with no ``vocab`` has
    no negative and raises ``ValueError``. The same seed and the same calls give the same negatives.
    """

    def __init__(
        self,
        seed: int = 0,
        *,
        kinds: Sequence[str] = CORRUPTIONS,
        max_ngram: int = 3,
        vocab: Sequence[str] | None = None,
        avoid: Collection[str] | Callable[[str], bool] | None = None,
        max_tries: int = 100,
    ) -> None:
        kinds = tuple(kinds)
        unknown = [k for k in kinds if k not in CORRUPTIONS]
        if unknown or not kinds:
            raise ValueError(f"kinds must be a non-empty subset of {CORRUPTIONS}, got {kinds}")
        if max_ngram < 1:
            raise ValueError(f"max_ngram must be >= 1, got {max_ngram}")
        if max_tries < 1:
            raise ValueError(f"max_tries must be >= 1, got {max_tries}")
        if vocab is not None:
            vocab = [w for w in vocab]
            if not vocab or any(not isinstance(w, str) or len(w.split()) != 1 for w in vocab):
                raise ValueError("vocab must be a non-empty sequence of single whitespace-free words")
        self.kinds = kinds
        self.max_ngram = max_ngram
        self.vocab = vocab
        if avoid is None or callable(avoid):
            self._avoid = avoid
        else:
            known = frozenset(" ".join(c.split()) for c in avoid)
            self._avoid = known.__contains__
        self.max_tries = max_tries
        self.rng = random.Random(seed)

    def applicable(self, tokens: Sequence[str]) -> tuple[str, ...]:
        """The corruptions that can turn these tokens into something else."""
        size, distinct = len(tokens), len(set(tokens))
        ok = {
            "repeat": size >= 1,
            "remove": size >= 2,
            "insert": size >= 1 or self.vocab is not None,
            "swap": distinct >= 2,
            "shuffle": distinct >= 2,
        }
        return tuple(k for k in self.kinds if ok[k])

    def corrupt(self, caption: str, kind: str) -> str:
        """Apply one corruption of ``kind``; the result may equal the caption (use :meth:`sample` to avoid it)."""
        tokens = caption.split()
        if kind not in self.applicable(tokens):
            raise ValueError(f"corruption {kind!r} cannot change the caption {caption!r}")
        return " ".join(self._apply(tokens, kind))

    def sample(self, caption: str) -> tuple[str, str]:
        """One negative of ``caption`` and the corruption that made it: ``(negative, kind)``."""
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a str, got {type(caption).__name__}")
        tokens = caption.split()
        kinds = self.applicable(tokens)
        if not kinds:
            raise ValueError(f"no corruption in {self.kinds} can change the caption {caption!r}")
        for _ in range(self.max_tries):
            kind = self.rng.choice(kinds)
            negative = self._apply(tokens, kind)
            text = " ".join(negative)
            if negative != tokens and (self._avoid is None or not self._avoid(text)):
                return text, kind
        raise ValueError(
            f"found no negative of {caption!r} outside `avoid` in {self.max_tries} tries (kinds {kinds})"
        )

    def __call__(self, captions: Sequence[str], num_negatives: int = 1) -> list[list[str]]:
        """``num_negatives`` negatives for each caption, in order."""
        if isinstance(captions, str):
            raise TypeError("captions must be a sequence of strings; wrap a single caption in a list")
        if num_negatives < 1:
            raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
        return [[self.sample(c)[0] for _ in range(num_negatives)] for c in captions]

    def _ngram_size(self, limit: int) -> int:
        return self.rng.randint(1, min(self.max_ngram, limit))

    def _apply(self, tokens: list[str], kind: str) -> list[str]:
        size = len(tokens)
        rng = self.rng
        if kind == "repeat":
            n = self._ngram_size(size)
            i = rng.randint(0, size - n)
            return tokens[: i + n] + tokens[i : i + n] + tokens[i + n :]
        if kind == "remove":
            n = self._ngram_size(size - 1)
            i = rng.randint(0, size - n)
            return tokens[:i] + tokens[i + n :]
        if kind == "insert":
            if self.vocab is not None:
                gram = [rng.choice(self.vocab) for _ in range(self._ngram_size(self.max_ngram))]
            else:
                n = self._ngram_size(size)
                k = rng.randint(0, size - n)
                gram = tokens[k : k + n]
            j = rng.randint(0, size)
            return tokens[:j] + gram + tokens[j:]
        if kind == "swap":
            n = self._ngram_size(size // 2)
            i = rng.randint(0, size - 2 * n)
            j = rng.randint(i + n, size - n)
            return tokens[:i] + tokens[j : j + n] + tokens[i + n : j] + tokens[i : i + n] + tokens[j + n :]
        shuffled = list(tokens)
        rng.shuffle(shuffled)
        return shuffled


def make_grammar_negatives(
    captions: Sequence[str], *, num_negatives: int = 1, seed: int = 0, **sampler_kwargs: Any
) -> list[list[str]]:
    """``num_negatives`` corrupted copies of each caption; keyword arguments go to :class:`GrammarNegativeSampler`."""
    return GrammarNegativeSampler(seed, **sampler_kwargs)(captions, num_negatives)


class GrammarHead(nn.Module):
    """``Linear(D, D, bias=False) -> ReLU -> Linear(D, 2, bias=False)`` on the CLIP text embedding (Cho et al.).

    Class 1 is "grammatical". It reads the pooled, projected, L2-normalised embedding of
    ``ClipScorer.encode_texts`` (the released code reads the pooled feature before CLIP's projection).
    It computes in float32 and moves itself to the device of its input. ``prompt`` is the text prepended to
    every caption it is trained on (set by :func:`train_grammar_head`, saved with the weights); whoever scores
    with the head prepends the same (:class:`~clip_rl_trl.rewards.callables.GrammarReward` does).
    """

    def __init__(self, embed_dim: int, seed: int | None = None, prompt: str = "") -> None:
        super().__init__()
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        self.embed_dim = int(embed_dim)
        self.prompt = prompt
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            self.net = nn.Sequential(
                nn.Linear(self.embed_dim, self.embed_dim, bias=False),
                nn.ReLU(),
                nn.Linear(self.embed_dim, 2, bias=False),
            )

    def forward(self, txt_emb: torch.Tensor) -> torch.Tensor:
        """Logits ``(N, 2)``: column 0 "ungrammatical", column 1 "grammatical"."""
        check_embedding_matrix(txt_emb, self.embed_dim, "txt_emb")
        device = next(self.parameters()).device
        if txt_emb.device != device:
            self.to(txt_emb.device)
        return self.net(txt_emb.to(torch.float32))

    @torch.no_grad()
    def reward(self, txt_emb: torch.Tensor) -> torch.Tensor:
        """``r_grammar(c) = softmax(head(e_T(c)))[1]`` = P(grammatical) -> ``(N,)`` float32 (Cho et al. 2022)."""
        was_training = self.training
        self.eval()
        try:
            return self(txt_emb).softmax(dim=-1)[:, 1]
        finally:
            self.train(was_training)

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the weights to ``directory/grammar_head.safetensors``; the config (prompt included) in its metadata."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        config = {"embed_dim": self.embed_dim, "prompt": self.prompt}
        save_file(weights, path / _HEAD_FILE, metadata={"config": json.dumps(config)})
        return path / _HEAD_FILE

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: str | torch.device | None = None
    ) -> GrammarHead:
        """Load a head written by :meth:`save_pretrained`."""
        file = Path(directory) / _HEAD_FILE
        if not file.is_file():
            raise FileNotFoundError(f"no {_HEAD_FILE} in {os.fspath(directory)!r}")
        with safe_open(file, framework="pt") as f:
            metadata = f.metadata() or {}
        if "config" not in metadata:
            raise ValueError(f"{file} has no GrammarHead config in its metadata")
        config = json.loads(metadata["config"])
        if "prompt" not in config:
            # Guessing would score text the head never saw; an older head did not record its prompt.
            raise ValueError(
                f"{file} does not record the prompt its head was trained with (saved before heads kept it): "
                "train the head again"
            )
        head = cls(**config)
        head.load_state_dict(load_file(file))
        return head.to(device) if device is not None else head


def _is_text_parameter(name: str) -> bool:
    """open_clip's text tower: everything but the image tower (``visual.``) and the learned temperature."""
    return not name.startswith("visual.") and name not in ("logit_scale", "logit_bias")


def text_tower_state_dict(scorer: ClipScorer) -> dict[str, torch.Tensor]:
    """The text-tower parameters of the scorer's model, the part :func:`train_grammar_head` changes."""
    return {k: v.detach() for k, v in scorer.model.named_parameters() if _is_text_parameter(k)}


def save_text_tower(scorer: ClipScorer, path: str | os.PathLike) -> None:
    """Save the (fine-tuned) text tower as safetensors; load it over the same architecture with :func:`load_text_tower`."""
    save_file(
        {k: v.to("cpu").contiguous() for k, v in text_tower_state_dict(scorer).items()}, os.fspath(path)
    )


def load_text_tower(scorer: ClipScorer, path: str | os.PathLike) -> ClipScorer:
    """A new scorer: a copy of ``scorer`` with the text tower read from ``path`` (``scorer`` is not changed)."""
    weights = load_file(os.fspath(path))
    expected = set(text_tower_state_dict(scorer))
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights)), sorted(set(weights) - expected)
        raise ValueError(
            f"{os.fspath(path)!r} is not this model's text tower: missing {missing}, unexpected {extra}"
        )
    model = copy.deepcopy(scorer.model)
    model.load_state_dict(weights, strict=False)
    return ClipScorer(model, scorer.tokenizer, scorer.preprocess, batch_size=scorer.batch_size)


def _group_captions(captions: Sequence[str | Sequence[str]], n_images: int) -> list[list[str]]:
    if isinstance(captions, str):
        raise TypeError("captions must be a sequence with one entry per image, not a single string")
    if len(captions) != n_images:
        raise ValueError(f"captions has {len(captions)} entries but image_emb has {n_images} rows")
    groups = []
    for i, entry in enumerate(captions):
        group = [entry] if isinstance(entry, str) else list(entry)
        if not group or any(not isinstance(c, str) or not c.split() for c in group):
            raise ValueError(f"captions[{i}] must be a non-empty caption or a non-empty list of them")
        groups.append(group)
    return groups


def _encode_with_grad(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """Like ``ClipScorer.encode_texts`` (pooled, projected, L2-normalised) but differentiable."""
    return F.normalize(model.encode_text(tokens).float(), dim=-1)


def train_grammar_head(
    scorer: ClipScorer,
    image_emb: torch.Tensor,
    captions: Sequence[str | Sequence[str]],
    *,
    epochs: int = 10,
    batch_size: int = 256,
    lr: float = 1e-5,
    head_lr: float | None = None,
    weight_decay: float = 0.0,
    grammar_weight: float = 1.0,
    num_negatives: int = 1,
    negatives: GrammarNegativeSampler | None = None,
    prompt: str = "",
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[dict[str, float]], None] | None = None,
) -> tuple[ClipScorer, GrammarHead]:
    """Fine-tune a copy of CLIP's text tower and train a :class:`GrammarHead` (Cho et al. 2022)::

        L = L_CLIP + grammar_weight * L_grammar
        L_CLIP = 1/2 [ CE(s * T I^T, diag) + CE(s * I T^T, diag) ]          (CLIP's symmetric loss)
        L_grammar = 1/2 [ mean_{captions} -log p_1 + mean_{negatives} -log p_0 ],  p = softmax(head(e_T))

    with ``T`` the batch's caption embeddings, ``I`` the cached image embeddings (the image tower is frozen
    and never runs: pass ``image_emb (N, D)`` of the N images), ``s = exp(logit_scale)`` of the model, kept
    frozen. Each epoch visits every image once, with one of its captions drawn at random (as the released
    code does), so ``captions`` holds one caption or a list of captions per image. Negatives come from
    ``negatives`` (default ``GrammarNegativeSampler(seed)``), ``num_negatives`` per caption; averaging each
    class separately weighs captions and negatives equally, and equals the released code's plain mean for
    one negative per caption. ``prompt`` is prepended to every text (the released code uses
    ``"A photo depicts "``) and recorded as ``head.prompt``: ``GrammarReward`` and
    :func:`evaluate_grammar_head` prepend the same prompt when they score.

    Returns a *new* ``ClipScorer`` holding the fine-tuned text tower (the input scorer is not changed) and
    the trained head. ``callback``, when given, receives each step's statistics: ``step``, ``epoch``,
    ``loss``, ``clip_loss``, ``grammar_loss``, ``grammar_accuracy`` (on the batch, before the update).
    """
    if not isinstance(image_emb, torch.Tensor) or image_emb.ndim != 2:
        raise ValueError(
            f"image_emb must be an (N, D) tensor, got {getattr(image_emb, 'shape', type(image_emb))}"
        )
    groups = _group_captions(captions, image_emb.shape[0])
    for name, value, low in (
        ("epochs", epochs, 1),
        ("batch_size", batch_size, 2),
        ("num_negatives", num_negatives, 1),
    ):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if image_emb.shape[0] < 2:
        raise ValueError(f"the contrastive loss needs at least 2 images, got {image_emb.shape[0]}")
    if not lr > 0 or (head_lr is not None and not head_lr > 0):
        raise ValueError(f"learning rates must be > 0, got lr={lr}, head_lr={head_lr}")
    embed_dim = scorer.embed_dim
    check_embedding_matrix(image_emb, embed_dim, "image_emb")

    device = scorer.device
    model = copy.deepcopy(scorer.model)
    text_params = []
    for name, param in model.named_parameters():
        param.requires_grad_(_is_text_parameter(name))
        if param.requires_grad:
            text_params.append(param)
    if not text_params:
        raise ValueError("found no text-tower parameters in the scorer's model")
    model.train()
    model.visual.eval()
    logit_scale = model.logit_scale.detach().exp().float()

    head = GrammarHead(embed_dim, seed=seed, prompt=prompt).to(device)
    optimizer = torch.optim.AdamW(
        [
            {"params": text_params, "lr": lr},
            {"params": list(head.parameters()), "lr": head_lr if head_lr is not None else lr},
        ],
        weight_decay=weight_decay,
    )
    sampler = negatives if negatives is not None else GrammarNegativeSampler(seed)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    image_emb = F.normalize(image_emb.detach().to(device=device, dtype=torch.float32), dim=-1)

    n_images = image_emb.shape[0]
    steps_per_epoch = -(-n_images // batch_size)
    step = 0
    with tqdm(total=epochs * steps_per_epoch, desc="grammar head", disable=not progress) as bar:
        for epoch in range(epochs):
            order = torch.randperm(n_images, generator=generator).tolist()
            for start in range(0, n_images, batch_size):
                index = order[start : start + batch_size]
                positives = [rng.choice(groups[i]) for i in index]
                negs = [neg for group in sampler(positives, num_negatives) for neg in group]
                tokens = scorer.tokenize([head.prompt + text for text in positives + negs]).to(device)
                feats = _encode_with_grad(model, tokens)
                pos_feats = feats[: len(index)]
                logits = logit_scale * pos_feats @ image_emb[index].T
                target = torch.arange(len(index), device=device)
                clip_loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
                head_logits = head(feats)
                n_pos = len(index)
                loss_pos = F.cross_entropy(
                    head_logits[:n_pos], torch.ones(n_pos, dtype=torch.long, device=device)
                )
                loss_neg = F.cross_entropy(
                    head_logits[n_pos:], torch.zeros(len(negs), dtype=torch.long, device=device)
                )
                grammar_loss = 0.5 * (loss_pos + loss_neg)
                loss = clip_loss + grammar_weight * grammar_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

                with torch.no_grad():
                    predicted = head_logits.argmax(dim=-1)
                    accuracy = 0.5 * (
                        (predicted[:n_pos] == 1).float().mean() + (predicted[n_pos:] == 0).float().mean()
                    )
                stats = {
                    "step": float(step),
                    "epoch": float(epoch),
                    "loss": loss.item(),
                    "clip_loss": clip_loss.item(),
                    "grammar_loss": grammar_loss.item(),
                    "grammar_accuracy": accuracy.item(),
                }
                if callback is not None:
                    callback(stats)
                bar.set_postfix(loss=f"{stats['loss']:.3f}", grammar_acc=f"{stats['grammar_accuracy']:.3f}")
                bar.update()
                step += 1

    head.eval().requires_grad_(False)
    return ClipScorer(model, scorer.tokenizer, scorer.preprocess, batch_size=scorer.batch_size), head


def evaluate_grammar_head(
    scorer: ClipScorer,
    head: GrammarHead,
    captions: Sequence[str],
    *,
    negatives: GrammarNegativeSampler | None = None,
    num_negatives: int = 1,
    seed: int = 0,
) -> dict[str, float]:
    """Accuracy of ``head`` at telling ``captions`` (grammatical) from corrupted copies of them.

    Each caption and its negatives (from ``negatives``, default ``GrammarNegativeSampler(seed)``) are
    encoded with ``scorer`` after the head's training prompt (``head.prompt``) and classified at
    ``P(grammatical) > 0.5``. Returns ``accuracy`` (the mean of ``accuracy_grammatical`` and
    ``accuracy_negative``, so both classes weigh the same), those two, the mean ``prob_grammatical`` /
    ``prob_negative``, and ``accuracy_<kind>`` for each corruption kind.
    """
    if isinstance(captions, str) or not captions:
        raise ValueError("captions must be a non-empty sequence of strings")
    sampler = negatives if negatives is not None else GrammarNegativeSampler(seed)
    samples = [sampler.sample(c) for c in captions for _ in range(num_negatives)]
    p_pos = head.reward(scorer.encode_texts([head.prompt + c for c in captions]))
    p_neg = head.reward(scorer.encode_texts([head.prompt + text for text, _ in samples]))
    kinds = [kind for _, kind in samples]
    correct_neg = (p_neg <= 0.5).float()
    result = {
        "accuracy_grammatical": (p_pos > 0.5).float().mean().item(),
        "accuracy_negative": correct_neg.mean().item(),
        "prob_grammatical": p_pos.mean().item(),
        "prob_negative": p_neg.mean().item(),
    }
    result["accuracy"] = 0.5 * (result["accuracy_grammatical"] + result["accuracy_negative"])
    for kind in sorted(set(kinds)):
        mask = torch.tensor([k == kind for k in kinds], device=correct_neg.device)
        result[f"accuracy_{kind}"] = correct_neg[mask].mean().item()
    return result
