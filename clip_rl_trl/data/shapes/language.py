"""The shapes world's language: parsing captions of its grammar, checking them against scenes, a word tokenizer.

``ShapesLanguage`` is what the evaluation suite and ``CaptionRLTrainer(world=...)`` need from a world (the
``CaptionWorld`` protocol of ``clip_rl_trl.evaluation.evaluate``): ``parse`` for fluency, ``attribute_precision``
and ``attribute_recall`` for faithfulness. The grammar is the one ``ShapesWorld`` writes its captions in::

    caption    := object [" and " object] [" on a " BACKGROUND " background"]
    object     := "a " [SIZE " "] [COLOUR " "] SHAPE [" " position]
    position   := "on the left" | "on the right" | "at the top" | "at the bottom" | "in the center"
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from clip_rl_trl.data.shapes.world import (
    BACKGROUNDS,
    COLOURS,
    OBJECT_ATTRIBUTES,
    POSITION_PHRASES,
    SHAPES,
    SIZES,
    Scene,
    check_scene,
)

_POSITION_WORDS = {tuple(phrase.split()): pos for pos, phrase in POSITION_PHRASES.items()}
_SIZE_SET = frozenset(SIZES)
_SHAPE_SET = frozenset(SHAPES)


class ShapesLanguage:
    """The shapes world's caption grammar: ``parse``, ``attribute_precision``, ``attribute_recall``,
    ``vocabulary`` and ``word_tokenizer``.

    Stateless: every method is a static or class method, so ``ShapesLanguage.parse(c)`` and
    ``ShapesLanguage().parse(c)`` are the same. Pass an instance as ``world=`` to
    ``clip_rl_trl.evaluation.evaluate_captions`` or ``CaptionRLTrainer`` for the ``grammar_valid``,
    ``attribute_precision`` and ``attribute_recall`` metrics.
    """

    def __repr__(self) -> str:
        return "ShapesLanguage()"

    @staticmethod
    def parse(caption: str) -> dict[str, Any] | None:
        """The attributes ``caption`` mentions, or ``None`` when it is not a sentence of the world's grammar.

        Returns ``{"objects": [{...}, ...]}`` (one or two object dicts holding only the mentioned keys among
        ``size``, ``colour``, ``shape``, ``position``), plus ``"background"`` when one is mentioned. Whitespace
        between words is free; words are case-sensitive (lower case). Repeated adjectives, adjectives out of
        order, a missing noun, a dangling "and", a third object, punctuation or unknown words all give ``None``.
        """
        if not isinstance(caption, str):
            raise TypeError(f"caption must be a str, got {type(caption).__name__}")
        words = caption.split()
        n = len(words)
        objects: list[dict[str, str]] = []
        i = 0
        while True:
            if i >= n or words[i] != "a":
                return None
            i += 1
            obj: dict[str, str] = {}
            if i < n and words[i] in _SIZE_SET:
                obj["size"] = words[i]
                i += 1
            if i < n and words[i] in COLOURS:
                obj["colour"] = words[i]
                i += 1
            if i >= n or words[i] not in _SHAPE_SET:
                return None
            obj["shape"] = words[i]
            i += 1
            position = _POSITION_WORDS.get(tuple(words[i : i + 3]))
            if position is not None:
                obj["position"] = position
                i += 3
            objects.append(obj)
            if i < n and words[i] == "and" and len(objects) == 1:
                i += 1
                continue
            break
        result: dict[str, Any] = {"objects": objects}
        if i + 4 <= n and words[i] == "on" and words[i + 1] == "a" and words[i + 3] == "background":
            if words[i + 2] not in BACKGROUNDS:
                return None
            result["background"] = words[i + 2]
            i += 4
        return result if i == n else None

    # ------------------------------------------------------------------ faithfulness

    @classmethod
    def _matched_counts(cls, caption: str, scene: Scene) -> tuple[int, int, int] | None:
        """(correct mentioned attributes, mentioned attributes, scene attributes) under the best matching.

        Mentioned objects are matched one-to-one to scene objects, choosing the assignment with the most correct
        attributes; a mentioned object left without a scene object (two objects named, one in the scene) has
        all its attributes wrong, so "a red circle and a red circle" is not faithful to a single red circle.
        """
        check_scene(scene)
        parsed = cls.parse(caption)
        return None if parsed is None else cls._counts(parsed, scene)

    @staticmethod
    def _counts(parsed: dict[str, Any], scene: Scene) -> tuple[int, int, int]:
        mentioned, actual = parsed["objects"], scene["objects"]
        best = 0
        for perm in itertools.permutations(range(len(actual)), min(len(mentioned), len(actual))):
            best = max(
                best, sum(sum(actual[j][k] == v for k, v in mentioned[i].items()) for i, j in enumerate(perm))
            )
        n_mentioned = sum(len(obj) for obj in mentioned)
        if "background" in parsed:
            n_mentioned += 1
            best += parsed["background"] == scene["background"]
        return best, n_mentioned, len(OBJECT_ATTRIBUTES) * len(actual) + 1

    @classmethod
    def attribute_precision(cls, caption: str, scene: Scene) -> float:
        """Share of the attributes ``caption`` mentions that are true of ``scene``: correct / mentioned.

        Attributes are each mentioned object's size, colour, shape and position, and the background; mentioned
        objects are matched one-to-one to scene objects so as to maximise the correct count. A caption that is
        not a sentence of the grammar (``parse`` gives ``None``) scores 0.0; report grammar validity separately.
        """
        counts = cls._matched_counts(caption, scene)
        return 0.0 if counts is None else counts[0] / counts[1]

    @classmethod
    def consistent(cls, caption: str, scenes: Sequence[Scene]) -> list[bool] | None:
        """For each scene, whether everything ``caption`` says is true of it (attribute precision 1): what a
        perfect reader of the grammar can check. None when the caption is not a sentence of the grammar."""
        parsed = cls.parse(caption)
        if parsed is None:
            return None
        for scene in scenes:
            check_scene(scene)
        return [correct == mentioned for correct, mentioned, _ in (cls._counts(parsed, s) for s in scenes)]

    @classmethod
    def attribute_recall(cls, caption: str, scene: Scene) -> float:
        """Share of the scene's attributes that ``caption`` mentions correctly: correct / (4 * objects + 1).

        Same matching as ``attribute_precision``; an ungrammatical caption scores 0.0.
        """
        counts = cls._matched_counts(caption, scene)
        return 0.0 if counts is None else counts[0] / counts[2]

    # ------------------------------------------------------------------ tokenizer for captioners

    @staticmethod
    def vocabulary() -> list[str]:
        """Every word of the grammar, sorted."""
        phrase_words = {w for phrase in POSITION_PHRASES.values() for w in phrase.split()}
        return sorted(
            {"a", "and", "on", "background", *SIZES, *COLOURS, *SHAPES, *BACKGROUNDS, *phrase_words}
        )

    @classmethod
    def word_tokenizer(cls) -> Any:
        """A word-level ``transformers.PreTrainedTokenizerFast`` over ``vocabulary()``.

        Special tokens ``<pad>`` (id 0), ``<bos>`` (1), ``<eos>`` (2), ``<unk>`` (3); ``encode`` adds none of them
        (the captioner decides where they go), and ``decode(encode(c)) == c`` for every caption of the grammar.
        """
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
        vocab = {tok: i for i, tok in enumerate(specials + cls.vocabulary())}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token="<pad>",
            bos_token="<bos>",
            eos_token="<eos>",
            unk_token="<unk>",
            model_max_length=32,
            clean_up_tokenization_spaces=False,
        )

