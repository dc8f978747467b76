"""Tuned configs on disk: the user's cache and the configs shipped in the package.

The cache is one JSON file per (GPU name, triton version, tritonbn version) in
$TRITONBN_CACHE_DIR, else $XDG_CACHE_HOME/tritonbn, else ~/.cache/tritonbn:

    {"format": 1, "gpu": "NVIDIA H100 80GB HBM3", "triton": "3.6.0", "tritonbn": "0.1.0",
     "configs": {"stats|float16|channel_last|256|1048576|1":
                     {"BLOCK_M": 32, "BLOCK_C": 64, "split": 264, "num_warps": 8,
                      "num_stages": 3, "ms": 0.21, "heuristic_ms": 0.23}, ...}}

Shipped configs (tritonbn/configs/<gpu>.json) have the same format; any triton
version may use them. A file that cannot be read, is not this format, or was
written for another GPU or version gives a CacheWarning and is ignored: launches
fall back to the heuristics. Writers merge under a lock file and replace the
file atomically (temp file + os.replace), so readers never see half a file and
concurrent tuners keep each other's entries.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import tempfile
import warnings
from pathlib import Path

from ..heuristics import CONFIG_TYPE
from .space import check_config, parse_bucket

FORMAT = 1
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "configs"


class CacheWarning(UserWarning):
    """A tuning cache or shipped config file was unusable; heuristics are used instead."""


@functools.lru_cache(maxsize=None)
def versions() -> dict:
    import triton

    from .. import __version__

    return {"triton": triton.__version__, "tritonbn": __version__}


def cache_dir() -> Path:
    if os.environ.get("TRITONBN_CACHE_DIR"):
        return Path(os.environ["TRITONBN_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "tritonbn"


def slug(gpu: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") or "unknown-gpu"


def cache_path(gpu: str) -> Path:
    v = versions()
    return cache_dir() / f"{slug(gpu)}-triton{v['triton']}-tritonbn{v['tritonbn']}.json"


def shipped_path(gpu: str) -> Path:
    return SHIPPED_DIR / f"{slug(gpu)}.json"


def header(gpu: str) -> dict:
    return {"format": FORMAT, "gpu": gpu, **versions()}


def parse_entry(key: str, raw) -> object:
    """The config of one cache entry; ValueError when it is not a valid one."""
    kernel = parse_bucket(key)
    typ = CONFIG_TYPE[kernel]
    if not isinstance(raw, dict):
        raise ValueError(f"{key}: entry is not an object")
    names = [f.name for f in dataclasses.fields(typ)]
    missing = [n for n in names if n not in raw]
    if missing:
        raise ValueError(f"{key}: missing {', '.join(missing)}")
    cfg = typ(**{n: raw[n] for n in names})
    check_config(kernel, cfg)
    return cfg


def entry(cfg, **extra) -> dict:
    """The JSON object of a config, with informational extras (timings)."""
    return dataclasses.asdict(cfg) | {k: v for k, v in extra.items() if v is not None}


def _problems(doc, gpu: str, check_versions: bool) -> list[str]:
    if not isinstance(doc, dict):
        return ["not a JSON object"]
    if doc.get("format") != FORMAT:
        return [f"format {doc.get('format')!r}, expected {FORMAT}"]
    out = []
    if doc.get("gpu") != gpu:
        out.append(f"written for GPU {doc.get('gpu')!r}, this is {gpu!r}")
    if check_versions:
        for name, value in versions().items():
            if doc.get(name) != value:
                out.append(f"written by {name} {doc.get(name)!r}, this is {value}")
    if not isinstance(doc.get("configs"), dict):
        out.append("no 'configs' object")
    return out


def load(path: Path, gpu: str, check_versions: bool = True) -> dict:
    """{bucket: config} from path; {} (with a CacheWarning) when it is unusable.

    A missing file is not a problem. Invalid entries are skipped, with one warning.
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        warnings.warn(f"tritonbn: cannot read tuning configs {path} ({e}); using heuristic "
                      "configs instead", CacheWarning, stacklevel=2)
        return {}
    try:
        doc = json.loads(text)
    except ValueError as e:
        warnings.warn(f"tritonbn: corrupt tuning configs {path} ({e}); using heuristic configs "
                      "instead. Delete the file or re-run `tritonbn tune` to rewrite it.",
                      CacheWarning, stacklevel=2)
        return {}
    problems = _problems(doc, gpu, check_versions)
    if problems:
        warnings.warn(f"tritonbn: stale tuning configs {path} ({'; '.join(problems)}); using "
                      "heuristic configs instead. Re-run `tritonbn tune` to rewrite it.",
                      CacheWarning, stacklevel=2)
        return {}
    configs, bad = {}, []
    for key, raw in doc["configs"].items():
        try:
            configs[key] = parse_entry(key, raw)
        except (ValueError, TypeError) as e:
            bad.append(str(e))
    if bad:
        warnings.warn(f"tritonbn: skipped {len(bad)} invalid entries of {path} (first: {bad[0]}); "
                      "their buckets use heuristic configs", CacheWarning, stacklevel=2)
    return configs


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock on path (POSIX); elsewhere no lock, and the atomic
    replace alone keeps the file whole."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def save(path: Path, gpu: str, entries: dict, check_versions: bool = True) -> None:
    """Merge {bucket: entry dict} into path's configs, atomically.

    Under the lock: re-read the file (another process may have added buckets),
    merge, write a temp file in the same directory, fsync, os.replace. A corrupt
    or stale file is replaced (it was being ignored anyway). Raises OSError when
    the directory is not writable.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_name(path.name + ".lock")):
        configs = {}
        try:
            doc = json.loads(path.read_text())
            if not _problems(doc, gpu, check_versions):
                configs = dict(doc["configs"])
        except (OSError, ValueError):
            pass
        configs.update(entries)
        doc = header(gpu) | {"configs": dict(sorted(configs.items()))}
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(doc, f, indent=1)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


class Store:
    """The configs one GPU launches with: the user's cache over the shipped file.

    Each is read on its first lookup, not at import or construction.
    """

    def __init__(self, gpu: str, path: Path, shipped: Path):
        self.gpu, self.path, self.shipped_path = gpu, path, shipped
        self._cached: dict | None = None
        self._shipped: dict | None = None
        self.memo: dict = {}  # tuning.select's answers per launch signature

    def _cache(self) -> dict:
        if self._cached is None:
            self._cached = load(self.path, self.gpu)
        return self._cached

    def _ship(self) -> dict:
        if self._shipped is None:
            self._shipped = load(self.shipped_path, self.gpu, check_versions=False)
        return self._shipped

    def tuned(self, key: str):
        """The config the user's cache holds for key, else None."""
        return self._cache().get(key)

    def get(self, key: str):
        """The config to launch with for key: the cache's, else the shipped one, else None."""
        cfg = self.tuned(key)
        return cfg if cfg is not None else self._ship().get(key)

    def sizes(self) -> tuple[int, int]:
        """(configs in the user's cache, configs shipped) for this GPU."""
        return len(self._cache()), len(self._ship())

    def put(self, entries: dict) -> bool:
        """Add {bucket: (config, extras dict)}: used from now on in this process, and
        saved to the cache file. False (with a warning) when it could not be saved."""
        self._cache().update({k: cfg for k, (cfg, _) in entries.items()})
        self.memo.clear()
        try:
            save(self.path, self.gpu, {k: entry(cfg, **extra) for k, (cfg, extra) in entries.items()})
        except OSError as e:
            warnings.warn(f"tritonbn: could not save tuned configs to {self.path} ({e}); they "
                          "last for this process only", CacheWarning, stacklevel=2)
            return False
        return True
