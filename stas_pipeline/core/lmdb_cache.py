"""LMDB cache of decoded, resized samples: built once by ``stas build-lmdb``, read by every epoch, fold,
DataLoader worker and DDP rank.

Layout of a cache directory (an LMDB environment, ``data.mdb`` and ``lock.mdb``, plus ``integrity.json``):

- ``integrity.json``: the size and CRC-32 of ``data.mdb`` as its build wrote it. A reader checks them (once per
  process) before LMDB touches the file: an overwritten, truncated or missing ``data.mdb`` is named as a corrupt
  cache, never read (LMDB itself would read garbage or die of SIGBUS), and ``stas build-lmdb`` rebuilds it.
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
import shlex
import shutil
import struct
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from numbers import Number
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Resized
from tqdm import tqdm

from stas_pipeline.core.bundles import BundleError, bundle_file, parsed_content, running_parser
from stas_pipeline.core.datalist import SECTIONS, mask_of, read_datalist
from stas_pipeline.core.errors import StasError
from stas_pipeline.core.images import image_error
from stas_pipeline.core.problems import Problems
from stas_pipeline.core.transforms import LoadRGBImaged

CACHE_VERSION = 2
META_KEY = b"__meta__"
INTEGRITY_FILE = "integrity.json"
CACHE_FILES = ("data.mdb", "lock.mdb", INTEGRITY_FILE)  # what a build leaves in the folder
_HEADER = struct.Struct("<I")
_COMMIT_EVERY = 16
EntryLoader = Callable[[dict, "Preprocessing", Sequence[str]], dict]  # (entry, chain, keys) -> loaded arrays


class CacheError(StasError, RuntimeError):
    """The cache is missing, incomplete, built with other preprocessing, or stale for some sources."""


class ChainError(CacheError, ValueError):
    """A preprocessing chain the cache cannot take (it must start with LoadImaged)."""


class CorruptCacheError(CacheError):
    """A cache whose files are missing, truncated or overwritten, or whose records do not decode."""

    def __init__(self, message: str, reason: str = ""):
        super().__init__(message)
        self.reason = reason

    @classmethod
    def of(cls, cache_dir: str | Path, reason: str) -> CorruptCacheError:
        """The one line naming ``cache_dir``, ``reason`` and the command that rebuilds it."""
        return cls(f"{cache_dir}: corrupt LMDB cache ({reason}); rebuild it with: {rebuild_command(cache_dir)}",
                   reason)


@contextmanager
def _reading(cache_dir: str | Path, what: str) -> Iterator[None]:
    """Within it, LMDB's errors and bytes that do not decode as a record are a corrupt cache."""
    try:
        yield
    except (lmdb.Error, ValueError, KeyError, TypeError, struct.error) as err:
        raise CorruptCacheError.of(cache_dir, f"{what}: {type(err).__name__}: {err}".splitlines()[0]) from err


class Preprocessing:
    """The deterministic part of a task's transform chain, applied once when the cache is built.

    ``transforms`` are MONAI dictionary transforms as a bundle declares them (``task#preprocessing``): the first
    is a ``LoadImaged`` (arrays in (H, W[, C]) order), the rest keep the image on its 0..255 scale (intensity
    scaling happens after the cache). The cache is keyed by :attr:`spec`, a description of every transform's
    class and parameters, so a cache built with another chain (size, crop, interpolation) is refused.
    """

    def __init__(self, transforms: Sequence[Callable] | Compose):
        transforms = list(transforms.transforms if isinstance(transforms, Compose) else transforms)
        if not transforms or not isinstance(transforms[0], LoadImaged):
            raise ChainError("a cached preprocessing chain starts with LoadImaged, got "
                             f"{[type(t).__name__ for t in transforms]}")
        self.transforms = transforms
        self.spec = describe(transforms)

    @classmethod
    def resize(cls, image_size: int | Sequence[int], image_mode: str = "area", label_mode: str = "nearest",
               keys: Sequence[str] = ("image", "label")) -> Preprocessing:
        """LoadRGBImaged -> EnsureChannelFirstd -> Resized(image_size): images with ``image_mode``, the ``label``
        key with ``label_mode``; the chain ``bundles/tasks/segmentation.json`` declares."""
        keys = list(keys)
        modes = [label_mode if k == "label" else image_mode for k in keys]
        return cls([
            LoadRGBImaged(keys, reverse_indexing=False, allow_missing_keys=True),
            EnsureChannelFirstd(keys, allow_missing_keys=True),
            Resized(keys, spatial_size=image_size_pair(image_size), mode=modes, allow_missing_keys=True),
        ])

    @classmethod
    def of(cls, spec: Preprocessing | Sequence[Callable] | int | Sequence[int]) -> Preprocessing:
        """``spec`` itself, a chain of transforms, or the resize chain for an image size."""
        if isinstance(spec, Preprocessing):
            return spec
        if isinstance(spec, int) or (isinstance(spec, Sequence) and all(isinstance(v, int) for v in spec)):
            return cls.resize(spec)
        return cls(spec)

    def load(self, data: dict) -> dict:
        """Only the loading step: arrays at the original size."""
        return self.transforms[0](data)

    def after_load(self, data: dict) -> dict:
        """Every step after loading."""
        for transform in self.transforms[1:]:
            data = transform(data)
        return data

    def __call__(self, data: dict) -> dict:
        return self.after_load(self.load(data))

    def to_json(self) -> list:
        return self.spec


def describe(obj: Any, depth: int = 0) -> Any:
    """A JSON description of a transform chain: each object's class and its attributes (recursively), so that
    any parameter that changes what the chain computes changes the description."""
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, (list, tuple)):
        return [describe(v, depth) for v in obj]
    if isinstance(obj, dict):
        return {str(k): describe(v, depth) for k, v in obj.items()}
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return np.asarray(obj).tolist()
    if isinstance(obj, (type, torch.dtype, np.dtype)) or callable(obj) and not hasattr(obj, "__dict__"):
        return getattr(obj, "__qualname__", str(obj))
    name = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if isinstance(obj, np.random.RandomState) or depth >= 4 or not hasattr(obj, "__dict__"):
        return name
    state = {k: v for k, v in sorted(vars(obj).items()) if not isinstance(v, threading.local)}  # MONAI's tracing
    return {"_target_": name, **{k.lstrip("_"): describe(v, depth + 1) for k, v in state.items()}}


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
    """The record key of an entry: its image's resolved path; a tile's adds its window."""
    key = str(Path(item[image_key]).resolve())
    if "tile" in item:
        t = item["tile"]
        key += f"#y={t['y']},x={t['x']},size={t['size']},scale={t['scale']}"
    return key.encode()


def load_entry(item: dict, pre: Preprocessing, keys: Sequence[str], loader: EntryLoader | None = None) -> dict:
    """The loading step for one entry (``keys``: its image key, then its mask key if any): ``loader``, the task's
    for entries that are not plain files (:meth:`~stas_pipeline.tasks.base.Task.entry_loader`: tiles of a slide),
    or when None the chain's loader on the entry's files."""
    if loader is None:
        return pre.load({k: item[k] for k in keys})
    return loader(item, pre, keys)


def array_loader(load: Callable[[dict], dict]) -> EntryLoader:
    """An entry loader from ``load(entry) -> {"image": (H, W[, C]) array[, "label": (H, W) array]}`` (which reads
    the entry's ``image`` and ``label``): the arrays as the rest of the chain takes loaded files."""
    def loader(item: dict, pre: Preprocessing, keys: Sequence[str]) -> dict:
        arrays = load({**item, "image": item[keys[0]], "label": item[keys[1]] if len(keys) > 1 else None})
        return {k: MetaTensor(a, meta={"original_channel_dim": -1 if a.ndim == 3 else "no_channel"})
                for k, a in zip(keys, (arrays["image"], arrays.get("label")), strict=False)}
    return loader


def _keys(item: dict, image_key: str, label_key: str) -> list[str]:
    """The entry's file keys: its image, and its label when that is a mask."""
    return [image_key, label_key] if mask_of(item, label_key) is not None else [image_key]


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
_VERIFIED: set[tuple[int, int, int, int]] = set()  # data.mdb files (dev, inode, size, mtime) found intact


def file_crc32(path: str | Path) -> int:
    """CRC-32 of a file's bytes, read in chunks."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(16 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _write_integrity(folder: Path) -> None:
    """Record the size and CRC-32 of the finished ``data.mdb`` in ``integrity.json``."""
    data = folder / "data.mdb"
    record = {"data.mdb": {"size": data.stat().st_size, "crc32": file_crc32(data)}}
    (folder / INTEGRITY_FILE).write_text(json.dumps(record))


def integrity_problem(cache_dir: str | Path) -> str | None:
    """Why ``cache_dir``'s ``data.mdb`` is not the file its build wrote (missing, unreadable, truncated,
    overwritten), or None when it is; a file found intact is not read again by this process."""
    folder = Path(cache_dir)
    try:
        st = (folder / "data.mdb").stat()
    except FileNotFoundError:
        return "data.mdb is missing"
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return None
    try:
        built = json.loads((folder / INTEGRITY_FILE).read_text())["data.mdb"]
        size, crc = int(built["size"]), int(built["crc32"])
    except FileNotFoundError:
        return f"no {INTEGRITY_FILE} beside data.mdb: written by an older build-lmdb, or copied without it"
    except (ValueError, KeyError, TypeError) as err:
        return f"{INTEGRITY_FILE} does not parse: {type(err).__name__}: {err}"
    except OSError as err:
        return f"cannot read {INTEGRITY_FILE}: {err}"
    if st.st_size != size:
        return f"data.mdb is {st.st_size} bytes, {size} when it was built" + (": truncated" * (st.st_size < size))
    try:
        found = file_crc32(folder / "data.mdb")
    except OSError as err:
        return f"cannot read data.mdb: {err}"
    if found != crc:
        return f"data.mdb was overwritten since it was built: CRC-32 {found:08x}, {crc:08x} when built"
    _VERIFIED.add(key)
    return None


def open_reader(cache_dir: str | Path) -> lmdb.Environment:
    """This process's read-only environment for ``cache_dir``, shared by every dataset reading it.

    The folder's integrity is checked first (:func:`integrity_problem`): a damaged cache raises
    :class:`CorruptCacheError`. LMDB allows one open per file and process; environments inherited through fork
    are closed in the child and opened afresh. A rebuilt cache (new files) gets a new environment.
    """
    problem = integrity_problem(cache_dir)
    if problem is not None:
        raise CorruptCacheError.of(cache_dir, problem)
    st = os.stat(Path(cache_dir) / "data.mdb")
    key = (os.getpid(), st.st_dev, st.st_ino)
    if key not in _READERS:
        for inherited in [k for k in _READERS if k[0] != key[0]]:
            _READERS.pop(inherited).close()
        with _reading(cache_dir, "data.mdb does not open"):
            _READERS[key] = lmdb.open(str(cache_dir), readonly=True, lock=False, readahead=False, meminit=False,
                                      max_readers=4096, subdir=True)
    return _READERS[key]


def read_meta(cache_dir: str | Path) -> dict | None:
    """The cache's ``__meta__``, or None when ``cache_dir`` holds no cache (nor any file of one) or an unfinished
    one; a damaged cache raises :class:`CorruptCacheError`."""
    if not any((Path(cache_dir) / name).exists() for name in CACHE_FILES):
        return None
    env = open_reader(cache_dir)
    with _reading(cache_dir, "the meta record does not decode"):
        with env.begin() as txn:
            raw = txn.get(META_KEY)
        meta = json.loads(raw) if raw else None
        if meta is not None and not isinstance(meta, dict):
            raise TypeError(f"a JSON {type(meta).__name__}, not an object")
    return meta if meta and meta.get("complete") else None


# ---------------------------------------------------------------------------- the command that rebuilds a cache


def _bundle_run() -> ConfigParser | None:
    """The parser of the MONAI bundle run this is called from, if any, and if its bundle is found by name."""
    parser = running_parser()
    if parser is None:
        return None
    try:
        bundle_file(str(parser.config.get("bundle_name")))
    except BundleError:
        return None
    return parser


def _plain(value: Any) -> bool:
    """A knob value ``--set`` can pass: JSON scalars (not a MONAI expression or reference) and lists of them."""
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float)) or \
        isinstance(value, str) and not value.startswith(("$", "@", "%"))


def _knob_text(value: Any) -> str:
    """``value`` as ``build-lmdb --set`` reads it back (JSON when the text parses as JSON, else text)."""
    if isinstance(value, str):
        try:
            json.loads(value)
        except ValueError:
            return value
    return json.dumps(value)


def chain_knobs(run: ConfigParser) -> dict[str, Any]:
    """The top-level values of a bundle run that its preprocessing chain depends on: ``image_size``, and every
    other knob without which the bundle's chain would differ from the run's."""
    bundle = run.config["bundle_name"]
    wanted = Preprocessing(run.get_parsed_content("task#preprocessing")).spec

    def spec(knobs: dict) -> list:
        return Preprocessing(parsed_content(bundle, ["task#preprocessing"], knobs)[0]).spec

    knobs = {k: v for k, v in run.config.items() if _plain(v)}
    for key in [k for k in knobs if k != "image_size"]:
        without = {k: v for k, v in knobs.items() if k != key}
        if spec(without) == wanted:
            knobs = without
    return knobs


def _lists(datalist: str | Path, keys: Iterable[str]) -> list[str]:
    """The datalist sections holding the cache's ``keys`` (training, where the bundles' folds are, always)."""
    data = read_datalist(datalist)
    rest = set(keys) - {sample_key(e).decode() for e in data.entries("training")}
    return ["training", *(s for s in SECTIONS if s != "training"
                          and any(sample_key(e).decode() in rest for e in data.entries(s)))]


def rebuild_command(cache_dir: str | Path, meta: dict | None = None) -> str:
    """The ``stas build-lmdb`` command that builds ``cache_dir`` as the MONAI bundle run opening it needs it: the
    run's datalist, bundle, image size and every knob its chain depends on, and (from the old cache's ``meta``)
    the datalist sections it held. Outside a bundle run, what cannot be known is left as ``<placeholders>``."""
    run = _bundle_run()
    if run is None:
        return (f"stas build-lmdb --datalist <datalist.json> --out {shlex.quote(str(cache_dir))} "
                "--bundle <bundle> --image-size <size>")
    knobs = chain_knobs(run)
    datalist = str(run.get_parsed_content("datalist"))
    argv = ["stas", "build-lmdb", "--datalist", datalist, "--out", str(cache_dir),
            "--bundle", run.config["bundle_name"]]
    if "image_size" in knobs:
        argv += ["--image-size", *(str(n) for n in np.atleast_1d(knobs.pop("image_size")))]
    for key, value in knobs.items():
        argv += ["--set", f"{key}={_knob_text(value)}"]
    lists = _lists(datalist, (meta or {}).get("keys", []))
    if lists != ["training"]:
        argv += ["--lists", *lists]
    return shlex.join(argv)


class LMDBCacheDataset(torch.utils.data.Dataset):
    """Dataset over a cache built by :func:`build_cache` with ``preprocessing`` (a :class:`Preprocessing` or
    an image size); yields dicts ready for the random transforms.

    Each item is ``image`` (uint8 tensor, C x H x W) and ``label``: for segmentation a mask (uint8 0/1,
    1 x H x W), plus ``orig_size`` (H0, W0); with ``original_label`` the ``label`` is the mask at the original
    size (1 x H0 x W0), for scoring at the original resolution. A numeric label is passed through. The entry's
    other fields (fold, source, a pseudo-label's round) are left out: they differ between entries, and a batch
    needs the same keys in every item. The environment is opened read-only and lazily in each process
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
        if meta is None:
            raise CacheError(f"{self.cache_dir}: no complete LMDB cache here; build it with: "
                             f"{rebuild_command(self.cache_dir)}")
        if meta.get("version") != CACHE_VERSION or meta.get("preprocessing") != pre.to_json():
            built = (f"built with another preprocessing chain ({spec_difference(meta.get('preprocessing'), pre.spec)})"
                     if meta.get("version") == CACHE_VERSION else
                     f"cache format {meta.get('version')}, this version reads {CACHE_VERSION}")
            raise CacheError(f"{self.cache_dir}: {built}; rebuild it with: {rebuild_command(self.cache_dir, meta)}")
        left_out, left = meta.get("skipped", {}), []
        stale = []
        with _reading(self.cache_dir, "a record does not decode"), self._open().begin() as txn:
            for item in self.data:
                value = txn.get(sample_key(item, self.image_key))
                if value is None:
                    reason = left_out.get(str(Path(item[self.image_key]).resolve()))
                    left += [item] if reason else []
                    stale.append(f"{item[self.image_key]} (" + (
                        f"left out when the cache was built: {reason}; fix the file or drop it from the datalist)"
                        if reason else "not in the cache)"))
                    continue
                header, _ = decode_header(value)
                for key in (self.image_key, self.label_key):
                    if key in header["sources"] and header["sources"][key] != _identity_or_none(item[key]):
                        stale.append(f"{item[key]} (changed since the cache was built)")
        if stale:
            shown = "; ".join(stale[:5]) + (f"; and {len(stale) - 5} more" if len(stale) > 5 else "")
            rebuild = "" if len(stale) == len(left) else \
                f"; rebuild it with: {rebuild_command(self.cache_dir, meta)}"
            raise CacheError(f"{self.cache_dir}: stale for {len(stale)} sample(s): {shown}{rebuild}")

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
        with _reading(self.cache_dir, f"the record of {item[self.image_key]} does not decode"):
            with self._open().begin(buffers=False) as txn:
                value = txn.get(sample_key(item, self.image_key))
            header, arrays = decode_record(value, self.arrays)
        tensors = {self.arrays[k]: torch.from_numpy(a) for k, a in arrays.items()}
        fields = {k: item[k] for k in (self.image_key, self.label_key) if k in item}
        sample = {**fields, **tensors, "orig_size": tuple(header["orig_size"])}
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
    corrupt: str = ""  # why the old cache could not be read (then rebuilt from scratch)


def _load_sample(item: dict, pre: Preprocessing, image_key: str, label_key: str,
                 loader: EntryLoader | None = None) -> bytes:
    """Run the cached chain on one datalist entry and encode it (raises on unreadable input)."""
    keys = _keys(item, image_key, label_key)
    has_mask = len(keys) > 1
    raw = load_entry(item, pre, keys, loader)
    image = raw[image_key]
    if image.ndim == 2:
        raise ValueError("expected a colour image, got a single-channel one")
    orig = tuple(int(s) for s in image.shape[:2])
    sources = {k: source_identity(item[k]) for k in keys}
    header: dict = {"sources": sources, "orig_size": list(orig)}
    if not has_mask and isinstance(item.get(label_key), Number):
        header["target"] = item[label_key]
    if has_mask:
        mask = np.asarray(raw[label_key])
        if mask.ndim == 3:
            raise ValueError(f"{item[label_key]}: mask must be single-channel, got {mask.shape[-1]} channels")
        if mask.shape != orig:
            raise ValueError(f"{item[label_key]}: mask is {mask.shape[1]}x{mask.shape[0]} (WxH), "
                             f"image is {orig[1]}x{orig[0]}")
        mask = (mask > 0).astype(np.uint8)[None]
    out = pre.after_load(raw)
    arrays = {"image": to_uint8(out[image_key])}
    if arrays["image"].ndim != 3:
        raise ValueError(f"the preprocessing chain gave an image of shape {arrays['image'].shape}, not (C, H, W)")
    if has_mask:
        arrays["label"] = (np.asarray(out[label_key]) > 0).astype(np.uint8)
        arrays["label_orig"] = mask
    return encode_record(header, arrays, packed=("label", "label_orig"))


def to_uint8(image: Any) -> np.ndarray:
    """An image of the chain's output (0..255 floats) as the cache stores it: rounded, clipped, uint8."""
    return np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8)


_ABSENT = object()


def spec_difference(built: Any, wanted: Any, path: str = "") -> str:
    """Where two chain descriptions first differ, e.g. ``[2].spatial_size: built [32, 32], needs [64, 64]``: the
    path of the first differing value and both values, shortened around their first differing character."""
    if isinstance(built, dict) and isinstance(wanted, dict):
        for key in [*built, *(k for k in wanted if k not in built)]:
            a, b = built.get(key, _ABSENT), wanted.get(key, _ABSENT)
            if a != b:
                return spec_difference(a, b, f"{path}.{key}")
    if isinstance(built, list) and isinstance(wanted, list):
        for i in range(max(len(built), len(wanted))):
            a = built[i] if i < len(built) else _ABSENT
            b = wanted[i] if i < len(wanted) else _ABSENT
            if a != b:
                return spec_difference(a, b, f"{path}[{i}]")
    texts = ["(nothing)" if v is _ABSENT else json.dumps(v) for v in (built, wanted)]
    start = max(0, len(os.path.commonprefix(texts)) - 20)
    shown = [("..." if start else "") + t[start:start + 60] + ("..." if len(t) > start + 60 else "") for t in texts]
    return f"{path.lstrip('.') or 'chain'}: built {shown[0]}, needs {shown[1]}"


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
        _reusable(env, sample_key(item, image_key), item, _keys(item, image_key, label_key)) is not None
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


def build_cache(
    items: Sequence[dict],
    cache_dir: str | Path,
    preprocessing: Preprocessing | int | Sequence[int],
    problems: Problems | None = None,
    image_key: str = "image",
    label_key: str = "label",
    progress: bool = True,
    loader: EntryLoader | None = None,
) -> BuildStats:
    """Build (or incrementally refresh) the cache for ``items``.

    A cache that already holds exactly ``items``, unchanged, is left as it is. Otherwise unchanged samples
    of an existing cache with the same preprocessing are copied over, changed or new ones are decoded; a bad
    sample is reported to ``problems`` and left out. Memory stays bounded: samples are streamed one at a time
    and committed every few samples. The new cache is written beside ``cache_dir`` and renamed onto it only
    when complete. Concurrent builders of the same cache wait for each other. ``loader``: the task's loading
    step for entries that are not plain files (see :func:`load_entry`). A corrupt old cache is reported (a
    warning), not read, and rebuilt from scratch.
    """
    problems = problems or Problems("build-lmdb")
    pre = Preprocessing.of(preprocessing)
    cache_dir = Path(cache_dir).resolve()
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    if cache_dir.exists() and any(cache_dir.iterdir()) and not any((cache_dir / f).exists() for f in CACHE_FILES):
        raise CacheError(f"{cache_dir}: exists and is not an LMDB cache; refusing to replace it")

    stats = BuildStats()
    items = _unique(items, problems, stats, image_key, label_key)
    with open(cache_dir.parent / f".{cache_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            meta = read_meta(cache_dir)
        except CorruptCacheError as err:
            meta, stats.corrupt = None, err.reason
            problems.warn(cache_dir, f"corrupt LMDB cache ({err.reason}); rebuilding it from scratch (the old one is "
                                     "replaced when the new one is complete)")
        reuse = meta is not None and meta.get("version") == CACHE_VERSION \
            and meta.get("preprocessing") == pre.to_json()
        old_env = open_reader(cache_dir) if reuse else None
        if old_env is not None and _up_to_date(old_env, meta, items, image_key, label_key):
            stats.reused = len(items)
        else:
            _rebuild(items, cache_dir, pre, old_env, problems, stats, image_key, label_key, progress, loader)
    stats.bytes_on_disk = sum(f.stat().st_size for f in cache_dir.iterdir())
    problems.count("decoded", stats.written)
    problems.count("reused", stats.reused)
    return stats


def _unique(items: Sequence[dict], problems: Problems, stats: BuildStats, image_key: str,
            label_key: str) -> list[dict]:
    """One entry per image (a pseudo-labelled copy of a test image shares its record); an image listed twice
    with different masks is skipped."""
    first: dict[bytes, dict] = {}
    for item in items:
        key = sample_key(item, image_key)
        if key not in first:
            first[key] = item
        elif mask_of(item, label_key) is not None or mask_of(first[key], label_key) is not None:
            if item.get(label_key) != first[key].get(label_key):
                problems.skip(item[image_key], "listed twice in the datalist, with different masks")
                stats.skipped += 1
    return list(first.values())


def _rebuild(items: Sequence[dict], cache_dir: Path, pre: Preprocessing, old_env: lmdb.Environment | None,
             problems: Problems, stats: BuildStats, image_key: str, label_key: str, progress: bool,
             loader: EntryLoader | None) -> None:
    """Write a complete new cache beside ``cache_dir``, then swap it in."""
    tmp_dir = cache_dir.parent / f".{cache_dir.name}.building"
    shutil.rmtree(tmp_dir, ignore_errors=True)  # leftovers of an interrupted build
    env = lmdb.open(str(tmp_dir), map_size=64 << 20, subdir=True, metasync=False, sync=False)
    keys_written: list[str] = []
    left_out: dict[str, str] = {}
    pending: list[tuple[bytes, bytes]] = []
    try:
        for item in tqdm(items, desc="build-lmdb", unit="img", disable=not progress):
            key = sample_key(item, image_key)
            keys = _keys(item, image_key, label_key)
            value = _reusable(old_env, key, item, keys)
            if value is not None:
                stats.reused += 1
            else:
                try:
                    value = _load_sample(item, pre, image_key, label_key, loader)
                except Exception as err:  # noqa: BLE001 - any unreadable input is reported, not fatal
                    cause = image_error(item[image_key])
                    reason = (f"cannot decode image: {cause}" if cause
                              else f"{type(err).__name__}: {err}".splitlines()[0])
                    problems.skip(item[image_key], reason)
                    left_out[key.decode()] = reason
                    stats.skipped += 1
                    continue
                stats.written += 1
            if not keys_written:  # size the map from the first record; a full map still grows in _put_all
                env.set_mapsize(max(64 << 20, int(len(items) * len(value) * 1.25)))
            pending.append((key, value))
            keys_written.append(key.decode())
            if len(pending) >= _COMMIT_EVERY:
                _put_all(env, pending)
        meta = {"version": CACHE_VERSION, "preprocessing": pre.to_json(), "keys": keys_written,
                "skipped": left_out, "complete": True}
        pending.append((META_KEY, json.dumps(meta).encode()))
        _put_all(env, pending)
        env.sync(True)
    finally:
        env.close()
    _write_integrity(tmp_dir)
    if cache_dir.exists():
        trash = cache_dir.parent / f".{cache_dir.name}.old"
        shutil.rmtree(trash, ignore_errors=True)
        os.replace(cache_dir, trash)
        os.replace(tmp_dir, cache_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp_dir, cache_dir)
