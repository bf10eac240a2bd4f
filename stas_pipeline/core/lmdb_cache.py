"""LMDB cache of decoded, resized samples: built once by ``stas build-lmdb``, read by every epoch, fold,
DataLoader worker and DDP rank.

Layout of a cache directory (an LMDB environment):

- ``__meta__``: JSON with the format version, the preprocessing (image size, interpolation modes), the
  sample keys and ``"complete": true``. A build writes it last, into a temporary directory that is renamed
  onto the cache only when complete, so an interrupted build is never read as a cache.
- one record per sample, keyed by its image path: a JSON header (source files' identity, original size,
  array layout, a numeric target if any) followed by the raw arrays:
  ``image`` uint8 (C, H, W) at the cache's size; ``label`` the binary mask at the cache's size and
  ``label_orig`` the binary mask at the original size, both bit-packed.

Images are kept as uint8 (intensity scaling happens after the cache, on the fly), which makes a record
4x smaller than MONAI's ``LMDBDataset`` storing float32 tensors; see docs/benchmarks.md.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from numbers import Number
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Resized
from tqdm import tqdm

from stas_pipeline.core.problems import Problems

CACHE_VERSION = 1
META_KEY = b"__meta__"
_HEADER = struct.Struct("<I")
_COMMIT_EVERY = 16


class CacheError(RuntimeError):
    """The cache is missing, incomplete, built with other preprocessing, or stale for some sources."""


@dataclass(frozen=True)
class Preprocessing:
    """The deterministic part of the transform chain, applied once when the cache is built.

    ``image_size`` is one number for a square or ``(H, W)``.
    """

    image_size: tuple[int, int]
    image_mode: str = "area"
    label_mode: str = "nearest"

    def __post_init__(self):
        object.__setattr__(self, "image_size", image_size_pair(self.image_size))

    @classmethod
    def of(cls, spec: Preprocessing | int | Sequence[int]) -> Preprocessing:
        """``spec`` itself, or the default preprocessing for an image size."""
        return spec if isinstance(spec, Preprocessing) else cls(spec)

    def loader(self, keys: Sequence[str]) -> LoadImaged:
        """LoadImaged with arrays in (H, W[, C]) order, as PIL and torch index them."""
        return LoadImaged(keys, reader="PILReader", reverse_indexing=False, image_only=True)

    def resizer(self, keys: Sequence[str]) -> list:
        """EnsureChannelFirstd -> Resized (images with ``image_mode``, the ``label`` key with ``label_mode``)."""
        modes = [self.label_mode if k == "label" else self.image_mode for k in keys]
        return [EnsureChannelFirstd(keys), Resized(keys, spatial_size=self.image_size, mode=modes)]

    def transforms(self, keys: Sequence[str]) -> list:
        """The whole deterministic chain: LoadImaged -> EnsureChannelFirstd -> Resized."""
        return [self.loader(keys), *self.resizer(keys)]

    def to_json(self) -> dict:
        return {**asdict(self), "image_size": list(self.image_size)}


def image_size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    """800 -> (800, 800); (h, w) stays."""
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def source_identity(path: str | Path) -> dict:
    """What tells a changed source apart: resolved path, size in bytes, modification time (ns)."""
    st = os.stat(path)
    return {"path": str(Path(path).resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def sample_key(item: dict, image_key: str = "image") -> bytes:
    return str(Path(item[image_key]).resolve()).encode()


def _has_mask(item: dict, label_key: str) -> bool:
    return isinstance(item.get(label_key), (str, os.PathLike))


# ---------------------------------------------------------------------------- record encoding


def encode_record(header: dict, arrays: dict[str, np.ndarray], packed: Iterable[str] = ()) -> bytes:
    """Header JSON plus raw array bytes; arrays named in ``packed`` are binary and stored bit-packed."""
    layout, chunks, offset = {}, [], 0
    packed = set(packed)
    for name, arr in arrays.items():
        arr = np.ascontiguousarray(arr)
        raw = np.packbits(arr.astype(bool)).tobytes() if name in packed else arr.tobytes()
        layout[name] = {"dtype": str(arr.dtype), "shape": list(arr.shape), "offset": offset,
                        "nbytes": len(raw), "packed": name in packed}
        chunks.append(raw)
        offset += len(raw)
    head = json.dumps({**header, "arrays": layout}).encode()
    return _HEADER.pack(len(head)) + head + b"".join(chunks)


def decode_header(value: bytes) -> tuple[dict, int]:
    (n,) = _HEADER.unpack_from(value)
    return json.loads(value[_HEADER.size:_HEADER.size + n]), _HEADER.size + n


def decode_record(value: bytes, names: Iterable[str] | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """Header and arrays of a record (only those in ``names`` when given)."""
    header, start = decode_header(value)
    arrays = {}
    for name, spec in header["arrays"].items():
        if names is not None and name not in names:
            continue
        buf = np.frombuffer(value, np.uint8, spec["nbytes"], start + spec["offset"])
        shape = spec["shape"]
        if spec["packed"]:
            arr = np.unpackbits(buf, count=int(np.prod(shape))).astype(spec["dtype"])
        else:
            arr = buf.view(spec["dtype"]).copy()
        arrays[name] = arr.reshape(shape)
    return header, arrays


# ---------------------------------------------------------------------------- reading


_READERS: dict[tuple[int, int, int], lmdb.Environment] = {}


def open_reader(cache_dir: str | Path) -> lmdb.Environment:
    """This process's read-only environment for ``cache_dir``, shared by every dataset reading it.

    LMDB allows one open per file and process; environments inherited through fork are closed in the child
    and opened afresh. A rebuilt cache (new files) gets a new environment.
    """
    st = os.stat(Path(cache_dir) / "data.mdb")
    key = (os.getpid(), st.st_dev, st.st_ino)
    if key not in _READERS:
        for inherited in [k for k in _READERS if k[0] != key[0]]:
            _READERS.pop(inherited).close()
        _READERS[key] = lmdb.open(str(cache_dir), readonly=True, lock=False, readahead=False, meminit=False,
                                  max_readers=4096, subdir=True)
    return _READERS[key]


def read_meta(cache_dir: str | Path) -> dict | None:
    """The cache's ``__meta__`` or None when ``cache_dir`` holds no complete cache."""
    if not (Path(cache_dir) / "data.mdb").is_file():
        return None
    with open_reader(cache_dir).begin() as txn:
        raw = txn.get(META_KEY)
    meta = json.loads(raw) if raw else None
    return meta if meta and meta.get("complete") else None


class LMDBCacheDataset(torch.utils.data.Dataset):
    """Dataset over a cache built by :func:`build_cache` with ``preprocessing`` (a :class:`Preprocessing` or
    an image size); yields dicts ready for the random transforms.

    Each item is the datalist entry (paths, fold, ...) with ``image`` (uint8 tensor, C x H x W), and for
    segmentation ``label`` (uint8 0/1, 1 x H x W), plus ``orig_size`` (H0, W0); with ``original_label`` the
    ``label`` is the mask at the original size (1 x H0 x W0), for scoring at the original resolution.
    A numeric label is passed through. The environment is opened read-only and lazily in each process
    (DataLoader worker, DDP rank), so any number of readers can share one cache.

    On construction the cache is checked against the requested preprocessing and against every source
    file's size and modification time; anything stale raises :class:`CacheError` naming the files.
    """

    def __init__(
        self,
        data: Sequence[dict],
        cache_dir: str | Path,
        preprocessing: Preprocessing | int | Sequence[int],
        transform: Callable | None = None,
        image_key: str = "image",
        label_key: str = "label",
        original_label: bool = False,
    ):
        self.data = list(data)
        self.arrays = {"image": "image", "label_orig" if original_label else "label": label_key}
        self.cache_dir = str(cache_dir)
        self.transform = transform
        self.image_key, self.label_key = image_key, label_key
        self._env = None
        self._pid = None
        self._check(Preprocessing.of(preprocessing))

    def _check(self, pre: Preprocessing) -> None:
        meta = read_meta(self.cache_dir)
        hint = f"build it with: stas build-lmdb --datalist <datalist.json> --out {self.cache_dir}"
        if meta is None:
            raise CacheError(f"{self.cache_dir}: no complete LMDB cache here; {hint}")
        if meta.get("version") != CACHE_VERSION or meta.get("preprocessing") != pre.to_json():
            raise CacheError(
                f"{self.cache_dir}: built with {meta.get('preprocessing')}, this run needs {pre.to_json()}; "
                f"rebuild it ({hint} --image-size {pre.image_size[0]})"
            )
        stale = []
        with self._open().begin() as txn:
            for item in self.data:
                value = txn.get(sample_key(item, self.image_key))
                if value is None:
                    stale.append(f"{item[self.image_key]} (not in the cache)")
                    continue
                header, _ = decode_header(value)
                for key in (self.image_key, self.label_key):
                    if key in header["sources"] and header["sources"][key] != _identity_or_none(item[key]):
                        stale.append(f"{item[key]} (changed since the cache was built)")
        if stale:
            shown = "; ".join(stale[:5]) + (f"; and {len(stale) - 5} more" if len(stale) > 5 else "")
            raise CacheError(f"{self.cache_dir}: stale for {len(stale)} sample(s): {shown}; {hint}")

    def _open(self) -> lmdb.Environment:
        if self._pid != os.getpid():
            self._env, self._pid = open_reader(self.cache_dir), os.getpid()
        return self._env

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_env": None, "_pid": None}

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict:
        item = self.data[index]
        with self._open().begin(buffers=False) as txn:
            value = txn.get(sample_key(item, self.image_key))
        header, arrays = decode_record(value, self.arrays)
        tensors = {self.arrays[k]: torch.from_numpy(a) for k, a in arrays.items()}
        sample = {**item, **tensors, "orig_size": tuple(header["orig_size"])}
        return self.transform(sample) if self.transform is not None else sample


def _identity_or_none(path: Any) -> dict | None:
    try:
        return source_identity(path)
    except OSError:
        return None


# ---------------------------------------------------------------------------- building


@dataclass
class BuildStats:
    written: int = 0
    reused: int = 0
    skipped: int = 0
    bytes_on_disk: int = 0


def _load_sample(item: dict, pre: Preprocessing, image_key: str, label_key: str) -> bytes:
    """Decode, resize and encode one datalist entry (raises on unreadable input)."""
    has_mask = _has_mask(item, label_key)
    keys = [image_key, label_key] if has_mask else [image_key]
    raw = pre.loader(keys)({k: item[k] for k in keys})
    image = raw[image_key]
    if image.ndim == 2:
        raise ValueError("expected a colour image, got a single-channel one")
    orig = tuple(int(s) for s in image.shape[:2])
    sources = {k: source_identity(item[k]) for k in keys}
    header: dict = {"sources": sources, "orig_size": list(orig)}
    if not has_mask and isinstance(item.get(label_key), Number):
        header["target"] = item[label_key]
    resized = Compose(pre.resizer(keys))(raw)
    arrays = {"image": np.clip(np.rint(np.asarray(resized[image_key])), 0, 255).astype(np.uint8)}
    if has_mask:
        mask = np.asarray(raw[label_key])
        if mask.ndim == 3:
            raise ValueError(f"{item[label_key]}: mask must be single-channel, got {mask.shape[-1]} channels")
        if mask.shape != orig:
            raise ValueError(f"{item[label_key]}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH), "
                             f"image is {orig[1]}x{orig[0]}")
        arrays["label"] = (np.asarray(resized[label_key]) > 0).astype(np.uint8)
        arrays["label_orig"] = (mask > 0).astype(np.uint8)[None]
    return encode_record(header, arrays, packed=("label", "label_orig"))


def _reusable(old_env: lmdb.Environment | None, key: bytes, item: dict, keys: Sequence[str]) -> bytes | None:
    """The old record for ``key`` if all its sources are unchanged."""
    if old_env is None:
        return None
    with old_env.begin() as txn:
        value = txn.get(key)
    if value is None:
        return None
    sources = decode_header(value)[0]["sources"]
    ok = set(sources) == set(keys) and all(sources[k] == _identity_or_none(item[k]) for k in keys)
    return value if ok else None


def _up_to_date(env: lmdb.Environment, meta: dict, items: Sequence[dict], image_key: str, label_key: str) -> bool:
    """True when the cache holds exactly ``items`` and none of their sources changed: nothing to rebuild."""
    if meta["keys"] != [sample_key(item, image_key).decode() for item in items]:
        return False
    return all(
        _reusable(env, sample_key(item, image_key), item,
                  [image_key, label_key] if _has_mask(item, label_key) else [image_key]) is not None
        for item in items
    )


def _put_all(env: lmdb.Environment, pending: list[tuple[bytes, bytes]]) -> None:
    """Write ``pending`` in one transaction, growing the map when it is full; empties ``pending``."""
    while True:
        try:
            with env.begin(write=True) as txn:
                for key, value in pending:
                    txn.put(key, value)
            break
        except lmdb.MapFullError:
            env.set_mapsize(env.info()["map_size"] * 2)
    pending.clear()


def _estimate_map_size(n: int, pre: Preprocessing) -> int:
    h, w = pre.image_size
    per_sample = 3 * h * w + h * w // 8 + 2_000_000 // 8 + 4096  # image + packed masks (original ~2 MP)
    return max(64 << 20, int(n * per_sample * 1.2))


def build_cache(
    items: Sequence[dict],
    cache_dir: str | Path,
    preprocessing: Preprocessing | int | Sequence[int],
    problems: Problems | None = None,
    image_key: str = "image",
    label_key: str = "label",
    progress: bool = True,
) -> BuildStats:
    """Build (or incrementally refresh) the cache for ``items``.

    A cache that already holds exactly ``items``, unchanged, is left as it is. Otherwise unchanged samples
    of an existing cache with the same preprocessing are copied over, changed or new ones are decoded; a bad
    sample is reported to ``problems`` and left out. Memory stays bounded: samples are streamed one at a time
    and committed every few samples. The new cache is written beside ``cache_dir`` and renamed onto it only
    when complete. Concurrent builders of the same cache wait for each other.
    """
    problems = problems or Problems("build-lmdb")
    pre = Preprocessing.of(preprocessing)
    cache_dir = Path(cache_dir).resolve()
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    if cache_dir.exists() and any(cache_dir.iterdir()) and read_meta(cache_dir) is None \
            and not (cache_dir / "data.mdb").exists():
        raise CacheError(f"{cache_dir}: exists and is not an LMDB cache; refusing to replace it")

    stats = BuildStats()
    with open(cache_dir.parent / f".{cache_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta = read_meta(cache_dir)
        reuse = meta is not None and meta.get("version") == CACHE_VERSION \
            and meta.get("preprocessing") == pre.to_json()
        old_env = open_reader(cache_dir) if reuse else None
        if old_env is not None and _up_to_date(old_env, meta, items, image_key, label_key):
            stats.reused = len(items)
        else:
            _rebuild(items, cache_dir, pre, old_env, problems, stats, image_key, label_key, progress)
    stats.bytes_on_disk = sum(f.stat().st_size for f in cache_dir.iterdir())
    problems.count("decoded", stats.written)
    problems.count("reused", stats.reused)
    return stats


def _rebuild(items: Sequence[dict], cache_dir: Path, pre: Preprocessing, old_env: lmdb.Environment | None,
             problems: Problems, stats: BuildStats, image_key: str, label_key: str, progress: bool) -> None:
    """Write a complete new cache beside ``cache_dir``, then swap it in."""
    tmp_dir = cache_dir.parent / f".{cache_dir.name}.building"
    shutil.rmtree(tmp_dir, ignore_errors=True)  # leftovers of an interrupted build
    env = lmdb.open(str(tmp_dir), map_size=_estimate_map_size(len(items), pre), subdir=True,
                    metasync=False, sync=False)
    keys_written: list[str] = []
    seen: set[bytes] = set()
    pending: list[tuple[bytes, bytes]] = []
    try:
        for item in tqdm(items, desc="build-lmdb", unit="img", disable=not progress):
            key = sample_key(item, image_key)
            if key in seen:
                problems.skip(item[image_key], "listed twice in the datalist")
                stats.skipped += 1
                continue
            keys = [image_key, label_key] if _has_mask(item, label_key) else [image_key]
            value = _reusable(old_env, key, item, keys)
            if value is not None:
                stats.reused += 1
            else:
                try:
                    value = _load_sample(item, pre, image_key, label_key)
                except Exception as err:  # noqa: BLE001 - any unreadable input is reported, not fatal
                    problems.skip(item[image_key], f"{type(err).__name__}: {err}".splitlines()[0])
                    stats.skipped += 1
                    continue
                stats.written += 1
            pending.append((key, value))
            seen.add(key)
            keys_written.append(key.decode())
            if len(pending) >= _COMMIT_EVERY:
                _put_all(env, pending)
        meta = {"version": CACHE_VERSION, "preprocessing": pre.to_json(), "keys": keys_written, "complete": True}
        pending.append((META_KEY, json.dumps(meta).encode()))
        _put_all(env, pending)
        env.sync(True)
    finally:
        env.close()
    if cache_dir.exists():
        trash = cache_dir.parent / f".{cache_dir.name}.old"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(cache_dir, trash)
        os.replace(tmp_dir, cache_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp_dir, cache_dir)
