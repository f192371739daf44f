"""The frozen CLIP judge: batched, L2-normalised image and text embeddings from any open_clip model; and
:func:`load_image`, which reads an image and names it when it cannot."""

from __future__ import annotations

import functools
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

ImageLike = Image.Image | str | os.PathLike | Mapping[str, Any]


def load_image(image: ImageLike) -> Image.Image:
    """Open ``image`` as RGB: a PIL image, a path, or an undecoded ``datasets.Image`` value (``{"bytes",
    "path"}``, as ``datasets.Image(decode=False)`` reads it; decoded as ``datasets`` decodes it). An unreadable
    one raises ``ValueError`` naming it."""
    if isinstance(image, Image.Image):
        try:
            image.load()  # a lazily opened image is read here: truncated or corrupt data fails now
            return image if image.mode == "RGB" else image.convert("RGB")
        except OSError as err:
            raise ValueError(f"cannot decode image: {_reason(err)}") from err
    if isinstance(image, Mapping) and set(image) <= {"bytes", "path"}:
        import datasets

        data, path = image.get("bytes"), image.get("path")
        if data is None and path is None:
            raise ValueError("the image value has neither bytes nor a path")
        where = f"image {os.fspath(path)!r}" if data is None else f"the {len(data)} image bytes"
        if data is not None and path:
            where += f" of {os.fspath(path)!r}"
        try:
            decoded = datasets.Image().decode_example({"bytes": data, "path": path})
            return decoded if decoded.mode == "RGB" else decoded.convert("RGB")
        except OSError as err:  # UnidentifiedImageError and FileNotFoundError are OSErrors
            raise ValueError(f"cannot read {where}: {_reason(err)}") from err
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as img:
                return img.convert("RGB")
        except OSError as err:
            raise ValueError(f"cannot read image {os.fspath(image)!r}: {_reason(err)}") from err
    raise TypeError(f"got {type(image).__name__}, not a PIL image, a path or a datasets.Image value")


def _reason(err: OSError) -> str:
    """PIL's reason without the file object it names (``<_io.BytesIO object at 0x...>`` for bytes)."""
    if isinstance(err, UnidentifiedImageError):
        return "not an image format PIL can identify"
    if isinstance(err, FileNotFoundError):
        return "no such file"
    return str(err)


def image_path(value: Any) -> str | None:
    """The file an image value names: a path, a ``datasets.Image`` value's ``path``, a PIL image's file."""
    path = value.get("path") if isinstance(value, Mapping) else getattr(value, "filename", value)
    return os.fspath(path) if isinstance(path, (str, os.PathLike)) and path else None


class BadImage(NamedTuple):
    """An image of a dataset that :func:`load_image` cannot read: row, id, column, file (if any) and why."""

    row: int
    image_id: int | str
    column: str
    path: str | None
    error: str

    def __str__(self) -> str:
        return f"row {self.row} (image id {self.image_id!r}, column {self.column!r}): {self.error}"


class UnreadableImagesError(ValueError):
    """Images of a dataset that cannot be read (``ImageEmbeddingCache.build``); ``bad_images`` lists all."""

    def __init__(self, bad_images: Sequence[BadImage], total: int, hint: str) -> None:
        self.bad_images = tuple(bad_images)
        self.total = total
        listing = "; ".join(map(str, self.bad_images))
        super().__init__(f"{len(self.bad_images)} of the {total} images cannot be read ({hint}): {listing}")


def _text_context(model: torch.nn.Module) -> int | None:
    """Token positions of an open_clip text tower (``CLIP``, or ``CustomTextCLIP.text``), which the tokenizer
    must fill exactly; ``None`` for other towers (a Hugging Face encoder takes shorter inputs)."""
    for tower in (model, getattr(model, "text", None)):
        if isinstance(getattr(tower, "positional_embedding", None), torch.Tensor):
            context = getattr(tower, "context_length", None)
            return context if isinstance(context, int) else None
    return None


_MEMO_SIZE = 1 << 16  # texts (and words) remembered by _FastClipTokens before its memo is cleared


class _FastClipTokens:
    """open_clip's ``SimpleTokenizer`` (the OpenAI / LAION CLIP tokenizer), token for token, at a fraction of the cost.

    ``SimpleTokenizer.encode`` runs ``ftfy.fix_text`` and ``html.unescape`` twice on every text, then BPE-encodes
    each word and joins byte-mapped strings, all in Python: about 0.1 ms per caption, and ``ClipScorer`` used to
    encode every caption twice (once to count truncations, once to tokenize). Here a text of printable ASCII
    without ``&`` skips the cleaning that cannot change it (``ftfy`` and ``html.unescape`` are the identity on such
    text; printable ASCII maps byte for byte onto the BPE alphabet), a word's ids are remembered, and a text's ids
    too (a policy repeats captions). Any other text goes through ``tokenizer.encode`` itself.
    """

    def __init__(self, tokenizer: Any) -> None:
        from open_clip.tokenizer import _clean_lower

        self.tokenizer = tokenizer
        self.lower = tokenizer.clean_fn is _clean_lower
        self.sot, self.eot = tokenizer.sot_token_id, tokenizer.eot_token_id
        self._words: dict[str, list[int]] = {}
        self._texts: dict[str, list[int]] = {}

    @staticmethod
    def supports(tokenizer: Any) -> bool:
        """Exactly open_clip's ``SimpleTokenizer`` with the ``lower`` or ``whitespace`` cleaning, no reduction."""
        try:
            from open_clip.tokenizer import SimpleTokenizer, _clean_lower, _clean_whitespace
        except ImportError:
            return False
        return (
            type(tokenizer) is SimpleTokenizer
            and getattr(tokenizer, "reduction_fn", None) is None
            and getattr(tokenizer, "clean_fn", None) in (_clean_lower, _clean_whitespace)
            and all(hasattr(tokenizer, name) for name in ("pat", "bpe", "encoder", "sot_token_id", "eot_token_id"))
        )

    def encode(self, text: str) -> list[int]:
        """``tokenizer.encode(text)`` (without the start and end markers); the list must not be modified."""
        ids = self._texts.get(text)
        if ids is not None:
            return ids
        if text.isascii() and text.isprintable() and "&" not in text:
            clean = " ".join(text.split())
            if self.lower:
                clean = clean.lower()
            ids = []
            words, tokenizer = self._words, self.tokenizer
            for word in tokenizer.pat.findall(clean):
                word_ids = words.get(word)
                if word_ids is None:
                    word_ids = [tokenizer.encoder[piece] for piece in tokenizer.bpe(word).split(" ")]
                    if len(words) >= _MEMO_SIZE:
                        words.clear()
                    words[word] = word_ids
                ids += word_ids
        else:
            ids = list(self.tokenizer.encode(text))
        if len(self._texts) >= _MEMO_SIZE:
            self._texts.clear()
        self._texts[text] = ids
        return ids

    def tensor(self, encoded: Sequence[list[int]], context_length: int) -> torch.Tensor:
        """``(N, context_length)`` ids as ``SimpleTokenizer.__call__`` writes them: start, ids, end, zeros; a text
        too long is cut and its last position set to the end marker."""
        out = np.zeros((len(encoded), context_length), dtype=np.int64)
        for row, ids in enumerate(encoded):
            tokens = [self.sot, *ids, self.eot]
            if len(tokens) > context_length:
                tokens = tokens[:context_length]
                tokens[-1] = self.eot
            out[row, : len(tokens)] = tokens
        return torch.from_numpy(out)


class ClipScorer:
    """A frozen open_clip model that turns images and texts into L2-normalised embeddings.

    ``ClipScorer(model, tokenizer, preprocess)`` wraps any open_clip model (its ``encode_image`` /
    ``encode_text``), the tokenizer that goes with it and the image transform; the model is put in eval mode
    and its parameters frozen. ``ClipScorer.from_open_clip("ViT-B-32", pretrained="openai")`` loads a
    released checkpoint through open_clip's registry.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Callable[..., torch.Tensor],
        preprocess: Callable[[Image.Image], torch.Tensor],
        device: str | torch.device | None = None,
        batch_size: int = 256,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        model_context, tokenizer_context = _text_context(model), getattr(tokenizer, "context_length", None)
        if model_context is not None and tokenizer_context is not None and tokenizer_context != model_context:
            raise ValueError(
                f"the tokenizer's context length is {tokenizer_context} but the model's text tower has "
                f"{model_context} positions: build the tokenizer with the model's context length, e.g. "
                f"open_clip.get_tokenizer(name, context_length={model_context})"
            )
        self.model = model.eval().requires_grad_(False)
        if device is not None:
            self.model.to(device)
        self.tokenizer = tokenizer
        self._fast_tokens: _FastClipTokens | None = None
        self.preprocess = preprocess
        self.batch_size = batch_size
        self.num_truncated = 0
        self._warned_truncation = False
        # The last few text lists encoded through `encode_texts_shared` (completions, greedy captions,
        # references of one step): every reward of a step reads one CLIP text pass.
        self._shared: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()
        self.shared_capacity = 4

    @classmethod
    def from_open_clip(
        cls,
        model_name: str,
        pretrained: str | None = None,
        device: str | torch.device | None = None,
        batch_size: int = 256,
        **model_kwargs: Any,
    ) -> ClipScorer:
        """Build a scorer from open_clip's registry, e.g. ``("ViT-B-32", pretrained="openai")``.

        Weights come from the Hub or open_clip's download cache (``HF_HUB_OFFLINE=1`` uses the cache only);
        ``pretrained=None`` gives a randomly initialised model of that architecture. The tokenizer is built
        with the model's text context (which ``model_kwargs`` may change).
        """
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(
            model_name, pretrained=pretrained, device=device, **model_kwargs
        )
        tokenizer = open_clip.get_tokenizer(model_name, context_length=_text_context(model))
        return cls(model, tokenizer, preprocess, device=device, batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def logit_scale(self) -> float:
        """CLIP's learned inverse temperature, ``exp(model.logit_scale)`` (100 for the released models)."""
        return float(self.model.logit_scale.exp().item())

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 77))

    @functools.cached_property
    def embed_dim(self) -> int:
        return int(self.encode_texts([""]).shape[-1])

    def _batch_size(self, batch_size: int | None) -> int:
        size = self.batch_size if batch_size is None else batch_size
        if size < 1:
            raise ValueError(f"batch_size must be >= 1, got {size}")
        return size

    @torch.no_grad()
    def encode_images(
        self, images: Sequence[ImageLike] | torch.Tensor, batch_size: int | None = None
    ) -> torch.Tensor:
        """Embed images: PIL images of any mode, paths, or a preprocessed ``(N, 3, H, W)`` tensor -> ``(N, D)``."""
        size = self._batch_size(batch_size)
        if isinstance(images, torch.Tensor):
            if images.ndim != 4:
                raise ValueError(f"images tensor must be (N, 3, H, W), got shape {tuple(images.shape)}")
            chunks = [images[i : i + size] for i in range(0, len(images), size)]
        else:
            if isinstance(images, (Image.Image, str, os.PathLike, Mapping)):
                raise TypeError("encode_images expects a sequence of images; wrap a single image in a list")
            images = list(images)
            chunks = [
                torch.stack([self.preprocess(load_image(img)) for img in images[i : i + size]])
                for i in range(0, len(images), size)
            ]
        out = [self._embed(self.model.encode_image, chunk) for chunk in chunks]
        return torch.cat(out) if out else self._empty()

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int | None = None) -> torch.Tensor:
        """Embed texts -> ``(N, D)``. Texts longer than the context are truncated, counted and warned about."""
        if isinstance(texts, str):
            raise TypeError("encode_texts expects a sequence of strings; wrap a single text in a list")
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        size = self._batch_size(batch_size)
        fast = self._fast()
        if fast is None:
            self._count_truncated(texts)
            chunks = (self.tokenize(texts[i : i + size]) for i in range(0, len(texts), size))
        else:  # every text is encoded once, for the truncation count and the token ids alike
            encoded = [fast.encode(text) for text in texts]
            self._note_truncated(sum(len(ids) > self.context_length - 2 for ids in encoded))
            chunks = (fast.tensor(encoded[i : i + size], self.context_length) for i in range(0, len(texts), size))
        out = [self._embed(self.model.encode_text, chunk) for chunk in chunks]
        return torch.cat(out) if out else self._empty()

    def encode_texts_shared(self, texts: Sequence[str]) -> torch.Tensor:
        """``encode_texts`` that remembers the last ``shared_capacity`` distinct lists of texts.

        The reward functions of one training step all call this with the step's completions: the first call runs
        the CLIP text tower, the others read its result. The returned tensor must not be modified in place.
        """
        key = tuple(texts)
        hit = self._shared.get(key)
        if hit is not None:
            self._shared.move_to_end(key)
            return hit
        emb = self.encode_texts(key)
        self._shared[key] = emb
        while len(self._shared) > self.shared_capacity:
            self._shared.popitem(last=False)
        return emb

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids ``(N, context_length)`` as the text tower expects them (truncated to the context)."""
        fast = self._fast()
        if fast is None:
            return self.tokenizer(list(texts))
        return fast.tensor([fast.encode(text) for text in texts], self.context_length)

    def _fast(self) -> _FastClipTokens | None:
        """The fast exact path for open_clip's ``SimpleTokenizer`` (rebuilt if ``tokenizer`` was replaced)."""
        fast = self._fast_tokens
        if fast is not None and fast.tokenizer is self.tokenizer:
            return fast
        self._fast_tokens = _FastClipTokens(self.tokenizer) if _FastClipTokens.supports(self.tokenizer) else None
        return self._fast_tokens

    def _embed(self, encode: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device)
        if batch.is_floating_point():
            batch = batch.to(self.dtype)
        return F.normalize(encode(batch).float(), dim=-1).to(self.dtype)

    def _empty(self) -> torch.Tensor:
        return torch.empty(0, self.embed_dim, device=self.device, dtype=self.dtype)

    def _count_truncated(self, texts: list[str]) -> None:
        """Count texts whose tokens (plus start/end markers) exceed the context; warn once per scorer."""
        encode = getattr(self.tokenizer, "encode", None)
        if encode is None:  # Hugging Face tokenizers wrapped by open_clip truncate on their own.
            return
        limit = self.context_length - 2
        self._note_truncated(sum(len(encode(text)) > limit for text in texts))

    def _note_truncated(self, over: int) -> None:
        if not over:
            return
        self.num_truncated += over
        if not self._warned_truncation:
            self._warned_truncation = True
            logger.warning(
                "%d caption(s) exceed CLIP's context of %d tokens and were truncated; "
                "ClipScorer.num_truncated keeps the running count (this warning is shown once).",
                over,
                self.context_length,
            )
