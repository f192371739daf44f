"""ImageEmbeddingCache: image id -> CLIP image embedding, built once, saved as safetensors, memory-mapped.

The CLIP image tower runs once per image for a whole training run (DESIGN.md section 8); the trainer then looks
up the embeddings of each step's images by id. A saved cache is one ``.safetensors`` file holding two tensors:

- ``embeddings``: ``(N, D)`` in the dtype it was built with (float16 / bfloat16 / float32 / float64);
- ``ids``: ``(N,)`` int64 for integer ids, or ``(N, L)`` uint8 for string ids (UTF-8, NUL-padded to the longest
  id's byte length ``L``),

plus ``__metadata__`` naming the format and the id type. Any safetensors reader opens it. :meth:`load` maps the
file instead of reading it: opening costs the header and the ids, and a look-up touches only the pages of the
rows it returns.

Ids are all ``int`` or all ``str`` within one cache, and a look-up must use the same type: ``1`` and ``"1"`` are
different ids, and the ``KeyError`` for a wrong-typed id says which type the cache holds.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .clip import BadImage, ClipScorer, UnreadableImagesError, image_path, load_image

ImageId = int | str

_FORMAT = "clip_rl_trl.ImageEmbeddingCache"
_VERSION = "1"
# safetensors dtype name -> (torch dtype, numpy dtype the bytes are read as); numpy has no bfloat16, so its
# bits are read as uint16 and reinterpreted by torch.
_FLOAT_DTYPES: dict[str, tuple[torch.dtype, str]] = {
    "F16": (torch.float16, "<f2"),
    "BF16": (torch.bfloat16, "<u2"),
    "F32": (torch.float32, "<f4"),
    "F64": (torch.float64, "<f8"),
}
_TORCH_TO_ST = {torch_dtype: name for name, (torch_dtype, _) in _FLOAT_DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the limit the safetensors reference reader enforces
_PAGE = 4096
_WRITE_CHUNK_BYTES = 64 * 1024 * 1024


def _is_int_id(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _keys_from_ids(ids: Sequence[ImageId] | np.ndarray | torch.Tensor) -> tuple[np.ndarray, type]:
    """Validate build-time ids and encode them as a sortable numpy array: int64, or fixed-width UTF-8 bytes."""
    values = ids.tolist() if isinstance(ids, (torch.Tensor, np.ndarray)) else list(ids)
    if not values:
        raise ValueError("ids is empty: a cache needs at least one image")
    if all(_is_int_id(v) for v in values):
        try:
            return np.array(values, dtype=np.int64), int
        except OverflowError:
            big = next(v for v in values if not -(2**63) <= int(v) < 2**63)
            raise ValueError(f"image id {big} does not fit in int64") from None
    if all(isinstance(v, str) for v in values):
        if any("\x00" in v for v in values):
            bad = next(v for v in values if "\x00" in v)
            raise ValueError(f"image id {bad!r} contains a NUL character, which string ids cannot hold")
        encoded = [v.encode("utf-8") for v in values]
        return np.array(encoded, dtype=f"S{max(1, max(map(len, encoded)))}"), str
    first = values[0]
    kind = int if _is_int_id(first) else str
    for i, v in enumerate(values):
        if not (_is_int_id(v) or isinstance(v, str)):
            raise ValueError(
                f"ids[{i}] is {type(v).__name__} {v!r}: an image id must be an int or a str (all ids of one "
                f"type), not {type(v).__name__}"
            )
        if not (_is_int_id(v) if kind is int else isinstance(v, str)):
            raise ValueError(
                f"ids must be all int or all str; ids[0] is {type(first).__name__} {first!r} but ids[{i}] is "
                f"{type(v).__name__} {v!r}"
            )
    raise AssertionError("unreachable: a mixed id list has a first offending element")


class _IdIndex:
    """Sorted keys + argsort: vectorised id -> row look-up (``np.searchsorted``), no per-id Python dict."""

    def __init__(self, keys: np.ndarray, id_type: type) -> None:
        self.keys = keys
        self.id_type = id_type
        self.order = np.argsort(keys, kind="stable")
        self.sorted_keys = keys[self.order]
        dup = np.flatnonzero(self.sorted_keys[1:] == self.sorted_keys[:-1])
        if dup.size:
            raise ValueError(f"duplicate image id {self.decode(self.sorted_keys[dup[0]])!r}")

    def __len__(self) -> int:
        return len(self.keys)

    def decode(self, key: Any) -> ImageId:
        return key.decode("utf-8") if self.id_type is str else int(key)

    def query(self, ids: Any) -> tuple[np.ndarray, bool]:
        """Encode look-up ids like the stored keys -> (keys, whether one id was given); wrong types raise KeyError."""
        if isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu()
            if ids.dtype != torch.bfloat16:  # numpy has no bfloat16; such ids are rejected below as non-int
                ids = ids.numpy()
        if isinstance(ids, (torch.Tensor, np.ndarray)):
            single = ids.ndim == 0
            int_array = (
                isinstance(ids, np.ndarray) and ids.dtype != np.bool_ and np.can_cast(ids.dtype, np.int64)
            )
            if self.id_type is int and int_array:  # integer arrays / tensors: no per-id Python work
                return ids.astype(np.int64).reshape(-1), single
            values = ids.reshape(-1).tolist()
        elif isinstance(ids, (str, int, np.integer)):
            single, values = True, [ids]
        elif isinstance(ids, (Sequence, Iterator)):
            single, values = False, list(ids)
        else:
            raise TypeError(f"look up one id (int or str) or a sequence of ids, not {type(ids).__name__}")
        # set(map(type, ...)) runs in C: the common all-int / all-str batch pays no per-id Python call.
        types = set(map(type, values))
        if self.id_type is int:
            bad = None if types <= {int} else next((v for v in values if not _is_int_id(v)), None)
            if bad is not None:
                raise KeyError(self._wrong_type_message(bad))
            try:
                return np.array(values, dtype=np.int64), single
            except OverflowError:
                big = next(v for v in values if not -(2**63) <= v < 2**63)
                raise KeyError(f"image id {big} is not in the cache (it does not fit in int64)") from None
        if types <= {str} and "\x00" not in "".join(values):
            bad = None
        else:
            bad = next((v for v in values if not isinstance(v, str) or "\x00" in v), None)
        if bad is not None:
            raise KeyError(self._wrong_type_message(bad))
        return np.array([v.encode("utf-8") for v in values], dtype=bytes), single

    def rows(self, keys: np.ndarray) -> np.ndarray:
        if keys.size == 0:
            return np.empty(0, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.sorted_keys, keys), len(self.sorted_keys) - 1)
        found = self.sorted_keys[pos] == keys
        if not found.all():
            missing = keys[~found]
            first = self.decode(missing[0])
            more = (
                f" ({len(missing)} of the {len(keys)} ids asked for are missing)" if len(missing) > 1 else ""
            )
            raise KeyError(f"image id {first!r} is not in the cache{more}")
        return self.order[pos]

    def contains(self, value: object) -> bool:
        if self.id_type is int and not _is_int_id(value):
            return False
        if self.id_type is str and (not isinstance(value, str) or "\x00" in value):
            return False
        try:
            keys, _ = self.query(value)
            self.rows(keys)
        except KeyError:
            return False
        return True

    def _wrong_type_message(self, value: object) -> str:
        message = f"image id {value!r} ({type(value).__name__}) is not in the cache: its ids are {self.id_type.__name__}"
        if self.id_type is int and isinstance(value, str) and value.strip().lstrip("+-").isdigit():
            if self.contains(int(value)):
                message += f"; did you mean {int(value)}?"
        elif self.id_type is str and _is_int_id(value) and self.contains(str(value)):
            message += f"; did you mean {str(value)!r}?"
        return message


class ImageEmbeddingCache:
    """Image id -> embedding, with vectorised look-ups: ``cache[ids] -> (N, D)``.

    ``ImageEmbeddingCache(ids, embeddings)`` wraps embeddings already computed (``ids``: all int or all str,
    unique; ``embeddings``: ``(N, D)`` floating, finite, row ``i`` belongs to ``ids[i]``);
    :meth:`build` computes them with a :class:`~clip_rl_trl.clip.ClipScorer`. ``cache[ids]`` takes a sequence
    (or int tensor / array) of ids and returns their rows as one ``(len(ids), D)`` tensor on the cache's
    device, in the stored dtype; a single id returns ``(D,)``. An unknown id raises ``KeyError`` naming it.
    """

    #: The images :meth:`build` skipped with ``skip_bad_images=True`` (empty for any other cache).
    bad_images: tuple[BadImage, ...] = ()

    def __init__(self, ids: Sequence[ImageId] | np.ndarray | torch.Tensor, embeddings: torch.Tensor) -> None:
        if not isinstance(embeddings, torch.Tensor):
            raise TypeError(f"embeddings must be a torch.Tensor, got {type(embeddings).__name__}")
        index = _IdIndex(*_keys_from_ids(ids))
        if embeddings.ndim != 2 or not embeddings.is_floating_point():
            raise ValueError(
                f"embeddings must be a floating (N, D) tensor, got {embeddings.dtype} of shape {tuple(embeddings.shape)}"
            )
        if len(embeddings) != len(index):
            raise ValueError(f"{len(index)} ids but {len(embeddings)} embedding rows")
        finite = torch.isfinite(embeddings).all(dim=1)
        if not finite.all():
            row = int((~finite).nonzero()[0])
            raise ValueError(
                f"the embedding of image id {index.decode(index.keys[row])!r} (row {row}) is not finite"
            )
        self._index = index
        self._emb = embeddings.detach().contiguous()
        self._ids: list[ImageId] | None = None

    @classmethod
    def _from_parts(cls, index: _IdIndex, embeddings: torch.Tensor) -> ImageEmbeddingCache:
        cache = cls.__new__(cls)
        cache._index, cache._emb, cache._ids = index, embeddings, None
        return cache

    # -- building -----------------------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        dataset: Any,
        scorer: ClipScorer,
        image_column: str = "image",
        id_column: str = "image_id",
        *,
        dtype: torch.dtype | None = None,
        progress: bool = True,
        skip_bad_images: bool = False,
    ) -> ImageEmbeddingCache:
        """Embed every image of ``dataset`` once, ``scorer.batch_size`` images at a time, with a progress bar.

        ``dataset`` is a ``datasets.Dataset``, a mapping of columns, or a sequence of dict rows; its
        ``image_column`` holds PIL images, paths or ``datasets.Image()`` values and its ``id_column`` unique
        int or str ids (checked before any image is embedded). Embeddings are kept on the CPU in ``dtype``
        (default: the scorer's dtype); ``torch.float16`` halves the cache with no visible effect on cosine
        similarities.

        An image that cannot be read (missing file, corrupt bytes, not an image) does not stop the pass: every
        image is read, and :class:`UnreadableImagesError` then lists each bad one (row, id, column, path,
        reason); once one is found, the rest are only read, not embedded. With ``skip_bad_images=True`` the
        cache holds the other images and :attr:`bad_images` lists the skipped ones as :class:`BadImage`.
        """
        columns, length, read = _column_reader(dataset)
        for column in (image_column, id_column):
            if column not in columns:
                raise ValueError(f"dataset has no column {column!r}; its columns are {columns}")
        index = _IdIndex(*_keys_from_ids(read(id_column, 0, length)))
        dtype = scorer.dtype if dtype is None else dtype
        if dtype not in _TORCH_TO_ST:
            raise ValueError(f"dtype must be one of {sorted(map(str, _TORCH_TO_ST))}, got {dtype}")
        size = scorer.batch_size
        out: torch.Tensor | None = None
        filled = 0  # the good images' embeddings are packed in dataset order
        bad: list[BadImage] = []
        with tqdm(total=length, unit="img", desc="Embedding images", disable=not progress) as bar:
            for start in range(0, length, size):
                stop = min(start + size, length)
                pixels = []
                for row, value in enumerate(read(image_column, start, stop), start):
                    try:
                        image = load_image(value)
                    except (TypeError, ValueError) as err:
                        image_id = index.decode(index.keys[row])
                        bad.append(BadImage(row, image_id, image_column, image_path(value), str(err)))
                        continue
                    if skip_bad_images or not bad:  # once the build must fail, images are only read
                        pixels.append(scorer.preprocess(image))
                if pixels and (skip_bad_images or not bad):
                    emb = scorer.encode_images(torch.stack(pixels)).to("cpu", dtype)
                    if out is None:  # allocated once the embedding width is known; filled in place
                        out = torch.empty(length, emb.shape[1], dtype=dtype)
                    out[filled : filled + len(emb)] = emb
                    filled += len(emb)
                bar.update(stop - start)
        if bad and not skip_bad_images:
            raise UnreadableImagesError(bad, length, "skip_bad_images=True caches the others")
        if out is None:  # every image was bad
            raise UnreadableImagesError(bad, length, "no image is left to cache")
        if bad:
            index = _IdIndex(np.delete(index.keys, [b.row for b in bad]), index.id_type)
        cache = cls._from_parts(index, out[:filled])
        cache.bad_images = tuple(bad)
        return cache

    # -- look-ups ------------------------------------------------------------------------------------------

    def rows(self, ids: Any) -> torch.Tensor:
        """Row numbers of ``ids`` in :attr:`embeddings` (``LongTensor``; 0-dim for a single id)."""
        keys, single = self._index.query(ids)
        rows = torch.from_numpy(self._index.rows(keys))
        return rows[0] if single else rows

    def __getitem__(self, ids: Any) -> torch.Tensor:
        keys, single = self._index.query(ids)
        rows = self._index.rows(keys)
        if self._emb.device.type == "cpu":
            out = _take_rows(self._emb, rows)
        else:
            out = self._emb.index_select(0, torch.from_numpy(rows).to(self._emb.device))
        return out[0] if single else out

    def __contains__(self, image_id: object) -> bool:
        return self._index.contains(image_id)

    def __len__(self) -> int:
        return len(self._index)

    def __iter__(self) -> Iterator[ImageId]:
        return iter(self.ids)

    def __repr__(self) -> str:
        return (
            f"ImageEmbeddingCache(n={len(self)}, dim={self.dim}, dtype={self.dtype}, "
            f"ids={self.id_type.__name__}, device={self.device})"
        )

    @property
    def ids(self) -> list[ImageId]:
        """All ids in row order (row ``i`` of :attr:`embeddings` belongs to ``ids[i]``)."""
        if self._ids is None:
            keys = self._index.keys.tolist()
            self._ids = [k.decode("utf-8") for k in keys] if self.id_type is str else keys
        return self._ids

    @property
    def id_type(self) -> type:
        """``int`` or ``str``: the type every id of this cache has."""
        return self._index.id_type

    @property
    def embeddings(self) -> torch.Tensor:
        """The full ``(N, D)`` tensor (memory-mapped after :meth:`load`: reading it all reads the file)."""
        return self._emb

    @property
    def dim(self) -> int:
        return int(self._emb.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self._emb.dtype

    @property
    def device(self) -> torch.device:
        return self._emb.device

    def to(
        self, device: str | torch.device | None = None, dtype: torch.dtype | None = None
    ) -> ImageEmbeddingCache:
        """A cache with the same ids whose embeddings live on ``device`` / in ``dtype`` (copied into memory)."""
        return self._from_parts(self._index, self._emb.to(device=device, dtype=dtype))

    # -- saving and loading --------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the cache to the single file ``path`` (safetensors; ``.safetensors`` is the usual suffix).

        The file is written beside its destination and renamed into place, so a crash never leaves a
        truncated cache, and saving over the file this cache was loaded from is safe. Rows are streamed out in
        chunks: saving needs no second copy of the embeddings. Returns the path.
        """
        path = Path(path)
        emb = self._emb
        n, d = emb.shape
        emb_bytes = n * d * emb.element_size()
        keys = self._index.keys
        ids_entry: dict[str, Any]
        if self.id_type is int:
            ids_entry = {"dtype": "I64", "shape": [n], "data_offsets": [0, keys.nbytes]}
            emb_begin = keys.nbytes  # 8-byte aligned for every float dtype
        else:
            ids_entry = {
                "dtype": "U8",
                "shape": [n, keys.itemsize],
                "data_offsets": [emb_bytes, emb_bytes + keys.nbytes],
            }
            emb_begin = 0
        header = {
            "__metadata__": {"format": _FORMAT, "version": _VERSION, "id_type": self.id_type.__name__},
            "embeddings": {
                "dtype": _TORCH_TO_ST[emb.dtype],
                "shape": [n, d],
                "data_offsets": [emb_begin, emb_begin + emb_bytes],
            },
            "ids": ids_entry,
        }
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        # Pad the header with spaces (valid JSON, as the reference writer does) so the embeddings start on a
        # page boundary: a mapped row then never straddles two pages, and a look-up faults in one page per row.
        start = 8 + len(raw) + emb_begin
        raw += b" " * ((-start) % _PAGE)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(struct.pack("<Q", len(raw)))
                f.write(raw)
                if self.id_type is int:
                    f.write(np.ascontiguousarray(keys, dtype="<i8"))
                rows_per_chunk = max(1, _WRITE_CHUNK_BYTES // max(1, d * emb.element_size()))
                for i in range(0, n, rows_per_chunk):
                    f.write(emb[i : i + rows_per_chunk].detach().cpu().contiguous().view(torch.uint8).numpy())
                if self.id_type is str:
                    f.write(np.ascontiguousarray(keys))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True) -> ImageEmbeddingCache:
        """Open a cache written by :meth:`save`.

        With ``mmap=True`` (default) the file is mapped, not read: opening reads the header and the ids, and a
        look-up reads only the pages of the rows it returns (the mapping is advised as random-access, so the
        kernel does not read ahead around each row). The mapping is copy-on-write: writing into the tensor
        never changes the file. ``mmap=False`` reads the whole file into memory. The header (format, dtypes,
        shapes, offsets, file size) is checked, and a mismatch raises ``ValueError`` naming the problem;
        embedding values are not scanned, since that would read the file.
        """
        path = Path(path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header, data_start = _read_header(f, size, path)
            layout = _check_layout(header, size - data_start, path)
            if mmap:
                buffer: Any = _map(f)
            else:
                buffer = bytearray(size)
                f.seek(0)
                f.readinto(buffer)
        n, d = layout.rows, layout.dim
        torch_dtype, np_dtype = _FLOAT_DTYPES[layout.emb_dtype]
        emb_np = np.frombuffer(buffer, dtype=np_dtype, count=n * d, offset=data_start + layout.emb_begin)
        emb = torch.from_numpy(emb_np.reshape(n, d)).view(torch_dtype)
        key_dtype = "<i8" if layout.id_type is int else f"S{layout.id_width}"
        keys = np.frombuffer(buffer, dtype=key_dtype, count=n, offset=data_start + layout.ids_begin)
        try:
            index = _IdIndex(keys, layout.id_type)
        except ValueError as err:
            raise ValueError(f"{path}: corrupt cache: {err}") from None
        return cls._from_parts(index, emb)


def _take_rows(emb: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """Gather CPU rows with numpy's single-threaded ``take``.

    torch's ``index_select`` splits even a 100-row gather across its intra-op threads; on a busy CPU the
    median look-up then stalled for ~12 ms on a descheduled thread, against ~10 us single-threaded.
    """
    bits = emb.view(torch.int16) if emb.dtype is torch.bfloat16 else emb  # numpy has no bfloat16
    out = torch.from_numpy(bits.numpy().take(rows, axis=0))
    return out.view(torch.bfloat16) if emb.dtype is torch.bfloat16 else out


def _map(f: Any) -> mmap.mmap:
    """Map a whole file copy-on-write (writable for torch, never written back), advised as random access."""
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        # Without this, each faulted row drags in the kernel's read-ahead window (128 kB by default): 10,000
        # random look-ups in a 1 GB cache then map most of the file instead of ~40 MB.
        mapped.madvise(mmap.MADV_RANDOM)
    return mapped


def _read_header(f: Any, size: int, path: Path) -> tuple[dict[str, Any], int]:
    if size < 8:
        raise ValueError(f"{path} is not a safetensors file: it has {size} bytes")
    (length,) = struct.unpack("<Q", f.read(8))
    if length > min(size - 8, _MAX_HEADER):
        raise ValueError(
            f"{path} is not a valid safetensors file: header length {length} for a {size}-byte file"
        )
    try:
        header = json.loads(f.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a valid safetensors file: unreadable header ({err})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a valid safetensors file: header is not a JSON object")
    return header, 8 + length


class _Layout(NamedTuple):
    emb_dtype: str  # safetensors name, a key of _FLOAT_DTYPES
    rows: int
    dim: int
    emb_begin: int
    id_type: type
    id_width: int  # bytes per string id (1 for int ids, which are int64)
    ids_begin: int


def _check_layout(header: dict[str, Any], data_size: int, path: Path) -> _Layout:
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ValueError(f"{path} was not written by ImageEmbeddingCache.save (no {_FORMAT!r} metadata)")
    if meta.get("version") != _VERSION:
        raise ValueError(f"{path}: unsupported ImageEmbeddingCache format version {meta.get('version')!r}")
    id_type = {"int": int, "str": str}.get(meta.get("id_type"))
    if id_type is None:
        raise ValueError(
            f"{path}: corrupt cache: id_type is {meta.get('id_type')!r}, expected 'int' or 'str'"
        )

    def entry(name: str, dtypes: dict[str, int], ndim: int) -> tuple[str, list[int], int]:
        spec = header.get(name)
        if not isinstance(spec, dict):
            raise ValueError(f"{path}: corrupt cache: no {name!r} tensor")
        dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
        if dtype not in dtypes:
            raise ValueError(
                f"{path}: corrupt cache: {name!r} has dtype {dtype!r}, expected one of {sorted(dtypes)}"
            )
        if not (
            isinstance(shape, list) and len(shape) == ndim and all(type(s) is int and s >= 1 for s in shape)
        ):
            raise ValueError(
                f"{path}: corrupt cache: {name!r} has shape {shape!r}, expected {ndim} positive sizes"
            )
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)):
            raise ValueError(f"{path}: corrupt cache: {name!r} has data_offsets {offsets!r}")
        begin, end = offsets
        nbytes = int(np.prod(shape)) * dtypes[dtype]
        if not 0 <= begin <= end <= data_size or end - begin != nbytes or begin % dtypes[dtype]:
            raise ValueError(
                f"{path}: corrupt or truncated cache: {name!r} {dtype}{shape} needs {nbytes} bytes but its "
                f"data_offsets are {offsets} in a {data_size}-byte data section"
            )
        return dtype, shape, begin

    emb_name, emb_shape, emb_begin = entry(
        "embeddings", {k: v[0].itemsize for k, v in _FLOAT_DTYPES.items()}, 2
    )
    ids_dtypes, ids_ndim = ({"I64": 8}, 1) if id_type is int else ({"U8": 1}, 2)
    _, ids_shape, ids_begin = entry("ids", ids_dtypes, ids_ndim)
    if ids_shape[0] != emb_shape[0]:
        raise ValueError(f"{path}: corrupt cache: {ids_shape[0]} ids but {emb_shape[0]} embedding rows")
    id_width = ids_shape[1] if id_type is str else 1
    return _Layout(emb_name, emb_shape[0], emb_shape[1], emb_begin, id_type, id_width, ids_begin)


def _column_reader(dataset: Any) -> tuple[list[str], int, Any]:
    """(column names, number of rows, read(column, start, stop) -> list) for the dataset shapes build() takes."""
    if hasattr(dataset, "select_columns") and hasattr(dataset, "column_names"):  # datasets.Dataset
        import datasets

        columns = list(dataset.column_names)
        for column, feature in dataset.features.items():  # images are read undecoded ({"bytes", "path"}):
            if isinstance(feature, datasets.Image):  # build decodes each one, naming the row of a corrupt one
                dataset = dataset.cast_column(column, datasets.Image(decode=False))

        def read(column: str, start: int, stop: int) -> list:
            # Only the asked-for column is read: an image batch never decodes the other columns.
            return list(dataset.select_columns([column])[start:stop][column])

        return columns, len(dataset), read
    if isinstance(dataset, Mapping):  # columns: {"image": [...], "image_id": [...]}
        columns = list(dataset.keys())
        lengths = {c: len(dataset[c]) for c in columns}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"dataset columns have different lengths: {lengths}")
        return (
            columns,
            next(iter(lengths.values()), 0),
            lambda column, start, stop: list(dataset[column][start:stop]),
        )
    if isinstance(dataset, Sequence) and not isinstance(dataset, (str, bytes)):  # rows: [{"image": ..., ...}]
        if len(dataset) and not isinstance(dataset[0], Mapping):
            raise TypeError(
                f"dataset rows must be mappings of column -> value, got {type(dataset[0]).__name__}"
            )
        columns = list(dataset[0].keys()) if len(dataset) else []

        def read_rows(column: str, start: int, stop: int) -> list:
            try:
                return [dataset[i][column] for i in range(start, stop)]
            except KeyError:
                row = next(i for i in range(start, stop) if column not in dataset[i])
                raise ValueError(f"dataset row {row} has no column {column!r}") from None

        return columns, len(dataset), read_rows
    raise TypeError(
        f"dataset must be a datasets.Dataset, a mapping of columns or a sequence of dict rows, got {type(dataset).__name__}"
    )
