"""The paper reward formulas as pure tensor functions: no state, no I/O, one reward per caption.

Conventions shared by every function:

- Embeddings are L2-normalised CLIP embeddings, ``(N, D)`` with one row per caption (``img_emb`` row i is the
  image of caption i), so a cosine is a row-wise dot product. Rows whose norm is off 1 by more than 1e-2 are
  rejected: an unnormalised embedding silently changes every formula.
- ``owner`` is an integer ``(N,)`` tensor of image ids. With ``num_generations = G > 1`` one image appears G
  times in a batch; captions of the same image are never each other's negatives and an image is never its
  own distractor. Rows of ``img_emb`` that share an owner must hold the same embedding (checked).
- Computation runs in float32 whatever the input dtype; the result is a ``(N,)`` float32 tensor on the input
  device. Every operation is differentiable, so inputs that require grad keep their graph.
- Bad input raises an error naming the argument: ``TypeError`` for a non-tensor or a wrong dtype family,
  ``ValueError`` for shapes, devices, NaN/inf, unnormalised rows and unknown option names.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "bidirectional_contrastive",
    "clip_s",
    "group_embedding_gap",
    "refclip_s",
    "retrieval_logprob",
]

# L2 norms of embeddings normalised in float16/bfloat16 are off 1 by a few 1e-3 at most.
_NORM_TOL = 1e-2
# Rows of one owner come from one image; encodings in different batches may differ by low-precision noise.
_SAME_IMAGE_MIN_COS = 0.999
_INT_DTYPES = frozenset({torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64})


def _validate(
    specs: dict[str, tuple[Any, str]], unit_norm_where: dict[str, str] | None = None
) -> dict[str, Tensor | None]:
    """Check named tensors against shape specs and return them, floating ones as float32.

    A spec reads ``"<kind> <dim> <dim> ..."``: kind is ``float``, ``int`` or ``bool``; each dim is a symbol
    bound by its first use and checked against every later use; a symbol ending in ``?`` may be 0, any other
    must be at least 1. A ``None`` tensor (an optional argument left out) is skipped. Float tensors must be
    finite with unit-norm rows along the last dimension; ``unit_norm_where`` maps a float argument to the bool
    argument whose True entries select the rows to check (padding rows are exempt). All tensors must share
    one device.
    """
    sizes: dict[str, tuple[int, str]] = {}
    out: dict[str, Tensor | None] = {}
    device: tuple[torch.device, str] | None = None
    for name, (x, spec) in specs.items():
        if x is None:
            out[name] = None
            continue
        kind, *dims = spec.split()
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if device is None:
            device = (x.device, name)
        elif x.device != device[0]:
            raise ValueError(
                f"{name} is on {x.device} but {device[1]} is on {device[0]}; put them on one device"
            )
        shape = tuple(x.shape)
        expected = "(" + ", ".join(d.rstrip("?") for d in dims) + ")"
        if x.ndim != len(dims):
            raise ValueError(f"{name} must be {len(dims)}-D {expected}, got shape {shape}")
        for dim, size in zip(dims, shape, strict=True):
            sym = dim.rstrip("?")
            if sym in sizes and sizes[sym][0] != size:
                bound, source = sizes[sym]
                raise ValueError(
                    f"{name} has shape {shape} {expected}, so {sym} = {size}, but {source} has {sym} = {bound}"
                )
            if size == 0 and not dim.endswith("?"):
                raise ValueError(f"{name} has shape {shape} {expected}: {sym} must be at least 1")
            sizes.setdefault(sym, (size, name))
        if kind == "float":
            if not x.is_floating_point():
                raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
            x = x.float()
        elif kind == "int":
            if x.dtype not in _INT_DTYPES:
                raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
        elif x.dtype != torch.bool:
            raise TypeError(f"{name} must be a bool tensor, got {x.dtype}")
        out[name] = x
    # After the loop, so that the masks named in unit_norm_where have been checked themselves. One norm per
    # row covers both checks: a NaN or inf element makes its row's norm NaN or inf, so the exact element-wise
    # scans run only to word the error. Padding rows are exempt from the norm, not from finiteness.
    for name, (_, spec) in specs.items():
        x = out[name]
        if x is None or not spec.startswith("float"):
            continue
        x = x.detach()
        norms = x.norm(dim=-1)
        off = (norms - 1).abs() > _NORM_TOL
        mask_name = (unit_norm_where or {}).get(name)
        if mask_name is not None:
            off &= out[mask_name]
        if not (off | ~torch.isfinite(norms)).any():
            continue
        if torch.isnan(x).any():
            raise ValueError(f"{name} contains NaN")
        if torch.isinf(x).any():
            raise ValueError(f"{name} contains inf")
        if not off.any():  # finite padding so large that its norm overflowed: harmless, it is masked out
            continue
        index = tuple(int(i) for i in off.nonzero()[0])
        raise ValueError(
            f"{name} must hold L2-normalised rows, but row {index if len(index) > 1 else index[0]} has norm "
            f"{float(norms[index]):.4g}; normalise with torch.nn.functional.normalize(x, dim=-1)"
        )
    return out


def check_embedding_matrix(value: Any, embed_dim: int, name: str, *, allow_empty: bool = True) -> None:
    """Raise an error naming ``name`` unless ``value`` is a finite floating-point ``(N, embed_dim)`` tensor.

    The input check of the learned reward heads (the discriminator, the grammar head): unlike the formulas of
    this module they read raw features, so rows need not be unit-norm. ``allow_empty=False`` also refuses N = 0.
    """
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != 2 or value.shape[1] != embed_dim:
        raise ValueError(f"{name} must have shape (N, {embed_dim}), got {tuple(value.shape)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if not allow_empty and value.shape[0] == 0:
        raise ValueError(f"{name} is empty (N = 0)")
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or infinite values")


def _positive(name: str, value: Any) -> float:
    """A finite scalar > 0 (a real number, NumPy scalars included, or a one-element tensor) as a float."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def _choice(name: str, value: Any, options: Sequence[str]) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}, got {value!r}")


def _distinct_images(img_emb: Tensor, owner: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One row per distinct owner: ``(images (U, D), owner ids (U,), inverse (N,))``.

    ``images[u]`` is the first row of ``img_emb`` whose owner is ``ids[u]``; ``inverse[i]`` is the index of
    caption i's image among them. Rows of one owner that hold different embeddings raise ``ValueError``.
    """
    ids, inverse = torch.unique(owner, return_inverse=True)
    rows = torch.arange(len(owner), device=owner.device)
    first = torch.full((len(ids),), len(owner), device=owner.device).scatter_reduce(0, inverse, rows, "amin")
    images = img_emb[first]
    with torch.no_grad():
        agreement = (img_emb * images[inverse]).sum(-1)
        differ = agreement < _SAME_IMAGE_MIN_COS
        if differ.any():
            i = int(differ.nonzero()[0])
            raise ValueError(
                f"img_emb rows {int(first[inverse[i]])} and {i} share owner {int(owner[i])} but hold different "
                f"embeddings (cosine {float(agreement[i]):.4f}): rows of one owner must be the same image"
            )
    return images, ids, inverse


def _owned_batch(
    txt_emb: Tensor, img_emb: Tensor, owner: Tensor, **extra: tuple[Any, str]
) -> tuple[dict[str, Tensor | None], Tensor, Tensor, Tensor]:
    """Validate a batch of captions with their images' owners, then dedupe the images.

    ``txt_emb`` and ``img_emb`` are ``"float N D"``, ``owner`` is ``"int N"``, ``extra`` maps further arguments to
    their specs (checked after those three, in order). Returns the validated tensors by name and
    :func:`_distinct_images` of ``img_emb``: ``(tensors, images (U, D), owner ids (U,), inverse (N,))``.
    """
    t = _validate(
        {
            "txt_emb": (txt_emb, "float N D"),
            "img_emb": (img_emb, "float N D"),
            "owner": (owner, "int N"),
            **extra,
        }
    )
    return (t, *_distinct_images(t["img_emb"], t["owner"]))


def _logsumexp_nonempty(logits: Tensor, dim: int, direction: str) -> Tensor:
    """``logsumexp`` over ``dim`` of -inf-masked logits; an all-masked slice (empty denominator) raises."""
    lse = logits.logsumexp(dim)
    if torch.isneginf(lse).any():
        raise ValueError(
            f"bidirectional_contrastive: empty {direction} denominator: at least two distinct images are needed "
            f"in the batch (or extra {'images' if direction == 't2i' else 'texts of other images'})"
        )
    return lse


def clip_s(img_emb: Tensor, txt_emb: Tensor, w: float = 2.5) -> Tensor:
    r"""CLIP-S, the reference-free CLIPScore: the reward of Cho et al. 2022.

    .. math:: \mathrm{CLIP\text{-}S}(c, I) = w \cdot \max(\cos(c, I), 0)

    Hessel et al. 2021, "CLIPScore", Eq. 1, with ``w = 2.5``; used as the RL reward by Cho et al. 2022,
    "Fine-grained Image Captioning with CLIP Reward". Inputs ``(N, D)``; returns ``(N,)``.
    """
    w = _positive("w", w)
    t = _validate({"img_emb": (img_emb, "float N D"), "txt_emb": (txt_emb, "float N D")})
    return w * (t["img_emb"] * t["txt_emb"]).sum(-1).clamp(min=0)


def refclip_s(img_emb: Tensor, txt_emb: Tensor, ref_emb: Tensor, ref_mask: Tensor, w: float = 2.5) -> Tensor:
    r"""RefCLIP-S: harmonic mean of CLIP-S and the best text-text cosine to a reference caption.

    .. math:: A = \mathrm{CLIP\text{-}S}(c, I), \quad B = \max_{r \in R(c)} \cos(c, r), \quad
              \mathrm{RefCLIP\text{-}S} = \frac{2AB}{A + B}

    Hessel et al. 2021, "CLIPScore", Eq. 2. As in the official CLIPScore code, B is the raw cosine (the
    paper writes ``max(B, 0)``; the code neither clips nor rescales it). The harmonic mean is returned only
    where ``A + B > 0`` and is 0 elsewhere: ``A + B = 0`` is 0/0 (both terms zero, whose harmonic mean is 0 by
    the F-score convention) or a pole, and ``A + B < 0`` (only possible with B < 0) would flip the sign of a
    negative product into a positive score. With CLIP, text-text cosines are positive in practice, so this
    only guards degenerate inputs against NaN and inf.

    ``ref_emb (N, R, D)`` holds up to R references per caption, ``ref_mask (N, R)`` (bool) marks the real ones
    (padding rows are ignored, any value). Every caption needs at least one reference.
    """
    w = _positive("w", w)
    t = _validate(
        {
            "img_emb": (img_emb, "float N D"),
            "txt_emb": (txt_emb, "float N D"),
            "ref_emb": (ref_emb, "float N R D"),
            "ref_mask": (ref_mask, "bool N R"),
        },
        unit_norm_where={"ref_emb": "ref_mask"},
    )
    mask = t["ref_mask"]
    no_ref = ~mask.any(1)
    if no_ref.any():
        rows = no_ref.nonzero().flatten().tolist()
        raise ValueError(
            f"ref_mask has no valid reference in row(s) {rows[:10]}{' ...' if len(rows) > 10 else ''}"
        )
    txt = t["txt_emb"]
    a = w * (t["img_emb"] * txt).sum(-1).clamp(min=0)
    b = torch.einsum("nd,nrd->nr", txt, t["ref_emb"]).masked_fill(~mask, -math.inf).amax(1)
    total = a + b
    defined = total > 0
    # The inner where keeps the division finite where it is discarded, so no NaN reaches the gradient either.
    return torch.where(
        defined, 2 * a * b / torch.where(defined, total, torch.ones_like(total)), torch.zeros_like(a)
    )


def retrieval_logprob(
    txt_emb: Tensor,
    img_emb: Tensor,
    owner: Tensor,
    logit_scale: float = 100.0,
    hard_neg_emb: Tensor | None = None,
) -> Tensor:
    r"""DiscriTune reward: log-probability that a CLIP retriever picks caption i's image among the candidates.

    .. math:: R(c_i) = \log \frac{\exp(s \cdot \cos(c_i, I_i))}{\sum_{I' \in \mathcal{C}_i} \exp(s \cdot \cos(c_i, I'))}

    Dessì et al. 2023, "Cross-Domain Image Captioning with Discriminative Finetuning", Sec. 3 (reward
    ``R(c, i, D)``), text -> image only, with ``s = logit_scale`` (CLIP's 100). The candidates
    :math:`\mathcal{C}_i` are one copy of each distinct image of the batch (the first row of each ``owner``)
    plus caption i's hard negatives ``hard_neg_emb[i]`` (``(N, K, D)``, optional), so a caption never competes
    with a repeat of its own image. At least two candidates are needed, otherwise the reward is identically 0.
    """
    scale = _positive("logit_scale", logit_scale)
    t, images, _, inverse = _owned_batch(txt_emb, img_emb, owner, hard_neg_emb=(hard_neg_emb, "float N K? D"))
    txt = t["txt_emb"]
    logits = scale * txt @ images.T
    if t["hard_neg_emb"] is not None:
        logits = torch.cat([logits, scale * torch.einsum("nd,nkd->nk", txt, t["hard_neg_emb"])], 1)
    if logits.shape[1] < 2:
        raise ValueError(
            "retrieval_logprob needs at least two candidate images: the batch holds one distinct image and no "
            "hard negatives"
        )
    return logits.log_softmax(1).gather(1, inverse[:, None]).squeeze(1)


def group_embedding_gap(txt_emb: Tensor, img_emb: Tensor, group_emb: Tensor, reduce: str = "avg") -> Tensor:
    r"""Group Embedding Gap: similarity to the target image minus similarity to its similar-image group.

    .. math:: G_{avg}(I, c) = \cos(c, I) - \frac{1}{K} \sum_{k=1}^{K} \cos(c, I_k), \qquad
              G_{min}(I, c) = \cos(c, I) - \max_{k} \cos(c, I_k)

    Zhang et al. 2022, "Distinctive Image Captioning via CLIP Guided Group Optimization", Eq. 3 (``"avg"``)
    and Eq. 4 (``"min"``). ``group_emb (N, K, D)`` holds the K similar images of caption i's image.
    """
    _choice("reduce", reduce, ("avg", "min"))
    t = _validate(
        {
            "txt_emb": (txt_emb, "float N D"),
            "img_emb": (img_emb, "float N D"),
            "group_emb": (group_emb, "float N K D"),
        }
    )
    txt = t["txt_emb"]
    group = torch.einsum("nd,nkd->nk", txt, t["group_emb"])
    return (txt * t["img_emb"]).sum(-1) - (group.mean(1) if reduce == "avg" else group.amax(1))


def bidirectional_contrastive(
    txt_emb: Tensor,
    img_emb: Tensor,
    owner: Tensor,
    temperature: float = 0.01,
    directions: str = "both",
    extra_txt_emb: Tensor | None = None,
    extra_img_emb: Tensor | None = None,
    extra_txt_owner: Tensor | None = None,
) -> Tensor:
    r"""Bidirectional decoupled contrastive reward of Chaffin et al. 2024.

    With :math:`s(c, I) = \cos(c, I) / \tau`:

    .. math:: t2i_i = s(c_i, I_i) - \log \sum_{I' \ne I_i} e^{s(c_i, I')}, \qquad
              i2t_i = s(c_i, I_i) - \log \sum_{j:\, owner_j \ne owner_i} e^{s(c_j, I_i)}, \qquad
              r_i = \tau \cdot \mathrm{mean}(t2i_i, i2t_i)

    Chaffin, Claveau and Kijak 2024, "Distinctive Image Captioning: Leveraging Ground Truth Captions in CLIP
    Guided Reinforcement Learning" (bidirectional contrastive reward). The t2i denominator ranges over the
    distinct images of the batch other than caption i's plus ``extra_img_emb[i]`` (``(N, K, D)``, hard
    negatives); the i2t denominator over every caption of another image plus the extra texts
    ``extra_txt_emb`` (``(M, D)``, e.g. ground-truth or greedy captions of other images), minus those whose
    ``extra_txt_owner`` (``(M,)``, optional) equals ``owner[i]``. The positive never enters its denominator
    (decoupled), so the log-sum-exp, a soft maximum, makes the closest other element the baseline.
    ``directions`` picks ``"t2i"``, ``"i2t"`` or ``"both"`` (their mean). An empty denominator (e.g. one
    distinct image and no extras) raises ``ValueError``.
    """
    tau = _positive("temperature", temperature)
    _choice("directions", directions, ("both", "t2i", "i2t"))
    if extra_txt_owner is not None and extra_txt_emb is None:
        raise ValueError("extra_txt_owner was given without extra_txt_emb")
    t, images, ids, inverse = _owned_batch(
        txt_emb,
        img_emb,
        owner,
        extra_txt_emb=(extra_txt_emb, "float M? D"),
        extra_txt_owner=(extra_txt_owner, "int M?"),
        extra_img_emb=(extra_img_emb, "float N K? D"),
    )
    txt = t["txt_emb"]
    # One (N, U) matrix serves both directions: row i is caption i against every distinct image (t2i),
    # column u is image u against every caption (i2t). Entries of a caption and its own image are masked.
    sim = txt @ images.T / tau
    positive = sim.gather(1, inverse[:, None]).squeeze(1)
    own = inverse[:, None] == torch.arange(len(ids), device=sim.device)
    negatives = sim.masked_fill(own, -math.inf)
    terms = []
    if directions in ("both", "t2i"):
        t2i = negatives
        if t["extra_img_emb"] is not None:
            t2i = torch.cat([t2i, torch.einsum("nd,nkd->nk", txt, t["extra_img_emb"]) / tau], 1)
        terms.append(positive - _logsumexp_nonempty(t2i, 1, "t2i"))
    if directions in ("both", "i2t"):
        i2t = negatives
        if t["extra_txt_emb"] is not None:
            extra = t["extra_txt_emb"] @ images.T / tau
            if t["extra_txt_owner"] is not None:
                extra = extra.masked_fill(t["extra_txt_owner"][:, None] == ids, -math.inf)
            i2t = torch.cat([i2t, extra], 0)
        terms.append(positive - _logsumexp_nonempty(i2t, 0, "i2t")[inverse])
    return tau * (terms[0] if len(terms) == 1 else (terms[0] + terms[1]) / 2)
