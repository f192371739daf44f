"""The registry of rewards a recipe can name, and what a reward needs to be built from a recipe.

A recipe names a reward by its registry key (``bidirectional``) or by a dotted import path to your own class
or function (``my_pkg.rewards.LengthReward``). A class is built with ``cls.from_recipe(env, **options)`` when it
has that class method (every reward of :mod:`clip_rl_trl.rewards.callables` does), else with
``cls(**options)``; a plain function is used as it is (TRL's contract: ``f(prompts, completions, **columns)``).

A reward's options and their defaults live in one place, the signatures it is built through: the keyword
parameters of its ``from_recipe`` and of the callables in its ``option_sources`` (its constructor by default),
less the objects the pipeline injects (``injected``). :func:`reward_options` reads them from there, so a recipe
is checked against them before any data is loaded.

Register a reward of your own with ``@register_reward("name")``; this module imports no reward module, so the
registry stays below them (the rewards register themselves when :mod:`clip_rl_trl.rewards.callables` is
imported, as ``import clip_rl_trl`` does).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from clip_rl_trl.importing import import_dotted

__all__ = ["REWARDS", "RewardEnv", "build_rewards", "check_reward_options", "register_reward", "resolve_reward",
           "reward_options"]

REWARDS: dict[str, type] = {}


def register_reward(name: str) -> Callable[[type], type]:
    """Class decorator: make ``name`` a reward a recipe can name (``reward_funcs: [name]``)."""

    def add(cls: type) -> type:
        if name in REWARDS and REWARDS[name] is not cls:
            raise ValueError(f"reward name {name!r} is already registered to {REWARDS[name].__qualname__}")
        REWARDS[name] = cls
        return cls

    return add


def resolve_reward(name: str) -> Any:
    """The class or function a recipe's reward name stands for: a registry key, or a dotted import path."""
    if name in REWARDS:
        return REWARDS[name]
    target = import_dotted(name, "reward", sorted(REWARDS))
    if not callable(target):
        raise ValueError(f"reward {name!r} is a {type(target).__name__}, not a class or a function")
    return target


def _keywords(func: Callable) -> tuple[set[str], bool]:
    """The parameter names ``func`` takes by keyword, and whether it also takes ``**kwargs``."""
    params = inspect.signature(func).parameters.values()
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names - {"self", "cls"}, any(p.kind is p.VAR_KEYWORD for p in params)


def reward_options(target: Any) -> set[str] | None:
    """The options a recipe may give reward ``target`` (None: any, it takes ``**kwargs``)."""
    if not inspect.isclass(target):
        return set()  # a plain function: nothing to configure
    if not hasattr(target, "from_recipe"):
        names, open_ = _keywords(target.__init__)
        return None if open_ else names
    # Each from_recipe along the class's ancestry that passes **options on adds its own keyword options.
    names, open_ = set(), True
    for cls in target.__mro__:
        if open_ and "from_recipe" in vars(cls):
            own, open_ = _keywords(vars(cls)["from_recipe"].__func__)
            names |= own - {"env"}
    if open_:
        for source in getattr(target, "option_sources", (target.__init__,)):
            extra, source_open = _keywords(source)
            if source_open:
                return None
            names |= extra
    return names - set(getattr(target, "injected", ()))


def check_reward_options(names: Sequence[str], kwargs: Mapping[str, Mapping[str, Any]]) -> None:
    """Resolve every reward name and check its options, before any data is loaded; raises ``ValueError``."""
    for name in names:
        target = resolve_reward(name)
        valid = reward_options(target)
        given = set(kwargs.get(name, {}))
        if valid is not None and given - valid:
            raise ValueError(
                f"reward_kwargs.{name}: unknown option(s) {sorted(given - valid)}; valid: {sorted(valid)}"
            )


@dataclass
class RewardEnv:
    """What the pipeline hands every reward's ``from_recipe``: the judge, the cache and the training split.

    ``train`` is the training split (rows with ``id_column`` and ``captions_column``): CIDEr-D's document
    frequencies, the grammar head's captions and the similar-image groups all come from it, never from the
    evaluation images.
    """

    scorer: Any
    cache: Any
    train: Any
    id_column: str = "image_id"
    captions_column: str = "captions"
    output_dir: Path = Path(".")
    progress: bool = True
    _groups: dict[tuple, dict[Any, list[Any]]] = field(default_factory=dict, repr=False)

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        """Files a reward trains and saves (the grammar head) are written once, by the main process."""
        from accelerate import PartialState

        with PartialState().main_process_first():
            yield

    @property
    def is_main_process(self) -> bool:
        from accelerate import PartialState

        return PartialState().is_main_process

    def groups(self, k: int, similarity: str = "image", exclude_above: float | None = None) -> dict[Any, list[Any]]:
        """Each training image's ``k`` most similar other training images (Zhang et al. 2022, §3.2; Eq. 2 with
        ``similarity="captions"``), by image id; computed once per setting."""
        import torch.nn.functional as F

        from clip_rl_trl.neighbors import groups_within_split

        key = (k, similarity, exclude_above)
        if key not in self._groups:
            ids = list(self.train[self.id_column])
            rows = groups_within_split(
                F.normalize(self.cache[ids].float(), dim=-1), k, similarity=similarity, scorer=self.scorer,
                refs=self.train[self.captions_column] if similarity == "captions" else None,
                exclude_above=exclude_above,
            )
            self._groups[key] = {ids[i]: [ids[j] for j in row] for i, row in enumerate(rows.tolist())}
        return self._groups[key]

    def hard_negatives(
        self, ranks: int | Sequence[int] | None, similarity: str = "image", exclude_above: float | None = None
    ) -> dict[Any, list[Any]] | None:
        """``K`` (the K nearest images) or 0-based neighbour ranks (``[3, 4]``: the 4th and 5th) -> each training
        image's hard negatives; None for none."""
        if ranks is None or ranks == 0:
            return None
        if isinstance(ranks, int) and not isinstance(ranks, bool) and ranks > 0:
            ranks = list(range(ranks))
        if (
            not isinstance(ranks, (list, tuple))
            or not ranks
            or not all(isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in ranks)
        ):
            raise ValueError(f"hard_negatives: a count K >= 0 or a list of 0-based neighbour ranks like [3, 4], got {ranks!r}")
        ranks = sorted(set(ranks))
        groups = self.groups(max(ranks) + 1, similarity, exclude_above)
        return {i: [g[r] for r in ranks] for i, g in groups.items()}

    def train_image_embeddings(self) -> torch.Tensor:
        return self.cache[list(self.train[self.id_column])].float()

    def path(self, value: str | os.PathLike | None, default: str) -> Path:
        return Path(value) if value else self.output_dir / default


def build_rewards(names: Sequence[str], kwargs: Mapping[str, Mapping[str, Any]], env: RewardEnv) -> list[Any]:
    """The reward callables for ``names`` (registry keys or dotted paths) with their ``kwargs``.

    A reward class with ``provides_scorer = True`` (the grammar reward: a CLIP whose text tower was tuned with
    the grammar head) is built first, and every other reward then reads that scorer, as in Cho et al. 2022.
    """
    check_reward_options(names, kwargs)
    targets = {name: resolve_reward(name) for name in names}
    order = sorted(names, key=lambda n: not getattr(targets[n], "provides_scorer", False))
    built: dict[str, Any] = {}
    for name in order:
        target, options = targets[name], dict(kwargs.get(name, {}))
        try:
            if inspect.isclass(target) and hasattr(target, "from_recipe"):
                built[name] = target.from_recipe(env, **options)
            elif inspect.isclass(target):
                built[name] = target(**options)
            else:
                built[name] = target
        except (TypeError, ValueError, KeyError, OSError) as err:
            raise ValueError(f"reward {name}: {err}") from err
        if getattr(target, "provides_scorer", False):
            env.scorer = built[name].scorer
    return [built[name] for name in names]
