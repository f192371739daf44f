"""The online "human-written vs generated" discriminator of Chaffin et al. 2024, used as a reward regulariser.

An MLP reads the concatenation ``[e_I ; e_T]`` of the L2-normalised CLIP image and caption embeddings and
outputs one logit; ``P(human | I, c) = sigmoid(logit)``. Every RL step the trainer first reads the rewards
(:meth:`Discriminator.reward`, no gradient) and then trains the discriminator on that step's ground-truth
captions (label 1) and sampled captions (label 0) with one Adam step (:meth:`Discriminator.update`), so the
reward of a step always comes from the parameters *before* that step's update. The mixture with the
similarity reward, ``alpha * r_sim + (1 - alpha) * r_disc`` (``alpha = 0.94`` in the released code), is not
done here: it is the reward weights of the trainer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from clip_rl_trl.rewards.functional import check_embedding_matrix

logger = logging.getLogger(__name__)

# Adam hyper-parameters kept in the state dict (as float64 tensors) so that a resumed run uses the values
# the checkpoint was trained with, e.g. a learning rate a scheduler has changed.
_ADAM_HPARAMS = ("lr", "beta1", "beta2", "eps", "weight_decay")
_OPT_PREFIX = "optimizer."


class EmbeddingPair(NamedTuple):
    """Image and caption embeddings of the same captions, row ``i`` of each belonging together.

    ``img_emb`` is ``(N, D)``: the embedding of the image caption ``i`` describes (repeat an image's row
    for each of its captions); ``txt_emb`` is ``(N, D)``: the caption's embedding. Both L2-normalised.
    """

    img_emb: torch.Tensor
    txt_emb: torch.Tensor


def _check_embeddings(img_emb: Any, txt_emb: Any, embed_dim: int, names: tuple[str, str]) -> None:
    """Raise a ``TypeError``/``ValueError`` naming the argument when the two are not matching finite (N, D)."""
    for value, name in zip((img_emb, txt_emb), names, strict=True):
        check_embedding_matrix(value, embed_dim, name, allow_empty=False)
    if img_emb.shape[0] != txt_emb.shape[0]:
        raise ValueError(
            f"{names[0]} and {names[1]} must have the same number of rows (one image per caption), "
            f"got {img_emb.shape[0]} and {txt_emb.shape[0]}"
        )


def _as_pair(value: Any, name: str) -> EmbeddingPair:
    """Accept an :class:`EmbeddingPair` or a 2-tuple ``(img_emb, txt_emb)``; anything else is a misuse."""
    if isinstance(value, torch.Tensor) or not isinstance(value, Sequence) or len(value) != 2:
        raise TypeError(
            f"{name} must be a pair (img_emb, txt_emb) of (N, D) tensors, e.g. EmbeddingPair(img_emb, txt_emb); "
            f"got {type(value).__name__}"
        )
    return EmbeddingPair(*value)


class Discriminator(nn.Module):
    """MLP on ``[e_I ; e_T]`` giving the probability that a caption was written by a human (Chaffin et al. 2024).

    Architecture: ``Linear(2D, h_1) -> ReLU -> ... -> Linear(h_k, 1)``, ``hidden_dims = (512, 256)`` as in the
    released code. It owns its Adam optimizer (``lr = 7e-5`` as released), so :meth:`state_dict` holds the
    weights *and* the optimizer state (moments and step counts, as flat tensors under ``optimizer.``): a run
    saved with ``torch.save`` or ``safetensors`` and loaded into a fresh ``Discriminator`` resumes exactly.
    Loading a state dict without ``optimizer.`` keys (pre-trained weights only) resets the optimizer.

    The module moves itself (weights and optimizer moments) to the device of the embeddings it is given and
    computes in float32 whatever the input dtype.
    """

    def __init__(
        self,
        embed_dim: int,
        hidden_dims: Sequence[int] = (512, 256),
        lr: float = 7e-5,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {embed_dim}")
        hidden_dims = tuple(int(h) for h in hidden_dims)
        if any(h < 1 for h in hidden_dims):
            raise ValueError(f"hidden_dims must all be >= 1, got {hidden_dims}")
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        self.embed_dim = int(embed_dim)
        self.hidden_dims = hidden_dims
        dims = (2 * self.embed_dim, *hidden_dims)
        layers: list[nn.Module] = []
        with torch.random.fork_rng(devices=[], enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            for d_in, d_out in zip(dims[:-1], dims[1:], strict=True):
                layers += [nn.Linear(d_in, d_out), nn.ReLU()]
            layers.append(nn.Linear(dims[-1], 1))
        self.net = nn.Sequential(*layers)
        # foreach=False: one code path on every device, so a resumed run reproduces the arithmetic exactly.
        self.optimizer = torch.optim.Adam(
            self.net.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False
        )

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
        """Logits ``(N,)`` of ``P(human)`` for matching ``(N, D)`` image and caption embeddings."""
        _check_embeddings(img_emb, txt_emb, self.embed_dim, ("img_emb", "txt_emb"))
        self._follow(img_emb.device)
        features = torch.cat([img_emb, txt_emb], dim=-1).to(dtype=torch.float32)
        return self.net(features).squeeze(-1)

    @torch.no_grad()
    def reward(self, img_emb: torch.Tensor, txt_emb: torch.Tensor) -> torch.Tensor:
        """``r_disc(I, c) = P(human | I, c) = sigmoid(MLP([e_I ; e_T]))`` -> ``(N,)`` float32, no gradient.

        The regularisation reward of Chaffin et al. 2024 (the ``r_regu`` of their policy gradient
        ``-[(alpha * r_sim + (1 - alpha) * r_regu) grad log p]``). Never changes the parameters: call it
        before :meth:`update` so that a step's reward uses the pre-update discriminator.
        """
        was_training = self.training
        self.eval()
        try:
            return torch.sigmoid(self(img_emb, txt_emb)).to(img_emb.device)
        finally:
            self.train(was_training)

    def update(
        self,
        gt: EmbeddingPair | tuple[torch.Tensor, torch.Tensor],
        generated: EmbeddingPair | tuple[torch.Tensor, torch.Tensor],
    ) -> dict[str, float]:
        """One Adam step on the class-balanced binary cross-entropy (Chaffin et al. 2024, discriminator)::

            L = -1/2 * [ mean_{gt} log sigmoid(z) + mean_{generated} log(1 - sigmoid(z)) ]

        with ``z = MLP([e_I ; e_T])``, ground-truth (human) captions labelled 1 and generated ones 0. Each
        argument is a pair ``(img_emb, txt_emb)`` of ``(N, D)`` tensors, row ``i`` being one caption and its
        image (:class:`EmbeddingPair`); the two sides may have different ``N`` (e.g. ``G`` samples and one
        ground-truth caption per image): averaging each class separately keeps them weighted equally, and
        equals the released code's plain mean when both sides have the same size. Inputs are detached, so
        no gradient reaches CLIP or the policy.

        Returns the statistics of the pre-update forward pass, for logging: ``loss``, ``accuracy_gt``,
        ``accuracy_generated`` (share classified correctly at threshold 0.5), ``prob_gt``,
        ``prob_generated`` (mean ``P(human)``).
        """
        gt_pair, gen_pair = _as_pair(gt, "gt"), _as_pair(generated, "generated")
        _check_embeddings(*gt_pair, self.embed_dim, ("gt.img_emb", "gt.txt_emb"))
        _check_embeddings(*gen_pair, self.embed_dim, ("generated.img_emb", "generated.txt_emb"))
        if gt_pair.img_emb.device != gen_pair.img_emb.device:
            raise ValueError(
                f"gt and generated embeddings are on different devices: {gt_pair.img_emb.device} "
                f"and {gen_pair.img_emb.device}"
            )
        self.train()
        logits_gt = self(gt_pair.img_emb.detach(), gt_pair.txt_emb.detach())
        logits_gen = self(gen_pair.img_emb.detach(), gen_pair.txt_emb.detach())
        loss_gt = F.binary_cross_entropy_with_logits(logits_gt, torch.ones_like(logits_gt))
        loss_gen = F.binary_cross_entropy_with_logits(logits_gen, torch.zeros_like(logits_gen))
        loss = 0.5 * (loss_gt + loss_gen)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.eval()
        with torch.no_grad():
            return {
                "loss": loss.item(),
                "accuracy_gt": (logits_gt > 0).float().mean().item(),
                "accuracy_generated": (logits_gen <= 0).float().mean().item(),
                "prob_gt": torch.sigmoid(logits_gt).mean().item(),
                "prob_generated": torch.sigmoid(logits_gen).mean().item(),
            }

    def _follow(self, device: torch.device) -> None:
        if device != self.device:
            logger.debug("Discriminator moves to %s to follow its inputs", device)
            self.to(device)

    def _apply(self, fn: Any, recurse: bool = True) -> Discriminator:
        """Move/cast Adam's moments with the weights (``.to``, ``.cuda``); step counts stay CPU scalars."""
        super()._apply(fn, recurse)
        for state in self.optimizer.state.values():
            for key, value in state.items():
                if key != "step" and isinstance(value, torch.Tensor):
                    state[key] = fn(value)
        return self

    # State dict: weights as nn.Module keeps them, plus the optimizer as flat tensors under "optimizer.",
    # so a parent module's state_dict, torch.save(weights_only) and safetensors all hold the whole run.

    def state_dict(
        self, *args: Any, destination: Any = None, prefix: str = "", keep_vars: bool = False
    ) -> Any:
        if args:
            raise TypeError("Discriminator.state_dict takes keyword arguments only")
        destination = super().state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
        group = self.optimizer.param_groups[0]
        hparams = {
            "lr": group["lr"],
            "beta1": group["betas"][0],
            "beta2": group["betas"][1],
            "eps": group["eps"],
            "weight_decay": group["weight_decay"],
        }
        for name, value in hparams.items():
            destination[f"{prefix}{_OPT_PREFIX}{name}"] = torch.tensor(float(value), dtype=torch.float64)
        for index, param in enumerate(self.net.parameters()):
            for key, value in self.optimizer.state.get(param, {}).items():
                destination[f"{prefix}{_OPT_PREFIX}state.{index}.{key}"] = value.detach().clone()
        return destination

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        opt_prefix = prefix + _OPT_PREFIX
        opt_keys = [key for key in state_dict if key.startswith(opt_prefix)]
        weights = {key: value for key, value in state_dict.items() if not key.startswith(opt_prefix)}
        super()._load_from_state_dict(
            weights, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        params = list(self.net.parameters())
        self.optimizer.state.clear()
        if not opt_keys:
            return  # weights only (a pre-trained discriminator): a fresh optimizer
        group = self.optimizer.param_groups[0]
        values = {key[len(opt_prefix) :]: state_dict[key] for key in opt_keys}
        missing = [name for name in _ADAM_HPARAMS if name not in values]
        if missing:
            error_msgs.append(f"optimizer state is missing {', '.join(opt_prefix + m for m in missing)}")
            return
        group["lr"] = float(values.pop("lr"))
        group["betas"] = (float(values.pop("beta1")), float(values.pop("beta2")))
        group["eps"] = float(values.pop("eps"))
        group["weight_decay"] = float(values.pop("weight_decay"))
        for name, value in values.items():
            parts = name.split(".")
            if (
                len(parts) != 3
                or parts[0] != "state"
                or not parts[1].isdigit()
                or int(parts[1]) >= len(params)
            ):
                unexpected_keys.append(opt_prefix + name)
                continue
            param = params[int(parts[1])]
            key = parts[2]
            if key == "step":
                tensor = value.detach().to(dtype=torch.float32, device="cpu").clone()
            else:
                if value.shape != param.shape:
                    error_msgs.append(
                        f"{opt_prefix}{name}: shape {tuple(value.shape)} does not match parameter "
                        f"shape {tuple(param.shape)}"
                    )
                    continue
                tensor = value.detach().to(dtype=param.dtype, device=param.device).clone()
            self.optimizer.state[param][key] = tensor
        full = {"step", "exp_avg", "exp_avg_sq"}
        states = [set(self.optimizer.state.get(p, {})) for p in params]
        if any(keys != full for keys in states):
            incomplete = [i for i, keys in enumerate(states) if keys != full]
            error_msgs.append(f"optimizer state is incomplete for parameters {incomplete} of {len(params)}")
            self.optimizer.state.clear()

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, hidden_dims={self.hidden_dims}, lr={self.optimizer.param_groups[0]['lr']}"
