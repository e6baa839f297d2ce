"""What a run's outputs were made from, as content hashes, and the check that two outputs agree on it.

- `gates_hash(dir)`: sha256 of `gates.safetensors` and `gates.json`, less the keys that only record how warmup
  got there (so a warmup that merely resumes a finished run keeps its hash);
- `model_identity(name)`: the base model's name and a sha256 of its weight files (tiny models: their config name,
  they are built bit-identically from it; hub ids: the name, no local file to hash). A file's hash is computed
  once and cached under `$QGATE_CACHE/hashes`, keyed by path, size and mtime;
- `file_key(path)`: a path-independent key of an input file (size, first and last MiB), for resuming after the
  data moved.

Stages write `run_identity(...)` into what they make (`stats/_schema.json`, `selfcheck/selfcheck.json`,
`selection/selection_stats.json`) and `check_same` it against their inputs, so a run never mixes outputs of two
gates, two base models or two encodings.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

GATES_FILE, GATES_META = "gates.safetensors", "gates.json"
# gates.json keys that record how warmup ran, not what the gates compute: the weights and the architecture keys
# (mode, layers, contrast …) are hashed; a resumed warmup, a changed report interval or another machine's model
# cache path leave the hash as it was.
VOLATILE_GATE_KEYS = ("resumed_from", "final_metrics", "rows", "warmup", "loss", "encoding", "seed", "steps_done",
                      "base_model_path", "qgate_version")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
CHUNK = 1 << 20


class IdentityMismatch(ValueError):
    """An input made from other gates, another base model or another encoding than the stage's own."""


def fingerprint(obj) -> str:
    """sha256 of the canonical JSON of `obj`."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def gates_hash(gates_dir: str | Path) -> str:
    gates_dir = Path(gates_dir)
    meta = json.loads((gates_dir / GATES_META).read_text())
    digest = hashlib.sha256()
    digest.update(bytes.fromhex(file_sha256(gates_dir / GATES_FILE, cache=False)))
    digest.update(fingerprint({k: v for k, v in meta.items() if k not in VOLATILE_GATE_KEYS}).encode())
    return digest.hexdigest()


def file_sha256(path: str | Path, cache: bool = True) -> str:
    """sha256 of a local file; with `cache`, remembered under `$QGATE_CACHE/hashes` by (path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    entry = _cache_dir() / f"{hashlib.sha1(str(path).encode()).hexdigest()}.json"
    key = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if cache and entry.exists():
        cached = json.loads(entry.read_text())
        if {k: cached.get(k) for k in key} == key:
            return cached["sha256"]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    if cache:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**key, "sha256": digest.hexdigest()}))
        tmp.replace(entry)
    return digest.hexdigest()


def _cache_dir() -> Path:
    return Path(os.environ.get("QGATE_CACHE") or Path.home() / ".cache" / "qgate") / "hashes"


def model_identity(name: str) -> dict:
    """{"name", "weights_sha256"}: the hash of the weight files of a local model (None for a hub id)."""
    from qgate import tiny
    from qgate.models import resolve_model_path

    if tiny.is_tiny(name):
        return {"name": name, "weights_sha256": f"config:{name}"}
    path = Path(resolve_model_path(name))
    files = [path] if path.is_file() else sorted(p for p in path.glob("*") if p.name.endswith(WEIGHT_SUFFIXES))
    if not files:
        return {"name": name, "weights_sha256": None}
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + bytes.fromhex(file_sha256(file)))
    return {"name": name, "weights_sha256": digest.hexdigest()}


def run_identity(config, gates_dir: str | Path) -> dict:
    """What scores depend on beyond the stage's own settings: gates, base model, weights dtype, encoding."""
    return identity_of(config.model, gates_dir, config.dtype, config.autocast, config.encoding.max_length,
                       config.encoding.score_on)


def identity_of(model: str, gates_dir: str | Path, dtype: str, autocast: str, max_length: int, score_on: str) -> dict:
    return {"gates_sha256": gates_hash(gates_dir), "base_model": model_identity(model), "dtype": str(dtype),
            "autocast": str(autocast), "encoding": {"max_length": int(max_length), "score_on": str(score_on)}}


# The `_schema.json` keys that make stats what they are (its paths may move).
STATS_KEYS = ("stats_version", "alphas", "eps", "gate_layers", "model", "score_on", "max_length", "ifd", "raw",
              "identity")


def stats_identity(schema: dict) -> dict | None:
    """The identity recorded in a stats `_schema.json` and a fingerprint of the stats' settings (None: stats
    written before identities were recorded)."""
    if schema.get("identity") is None:
        return None
    return {**schema["identity"], "stats_sha256": fingerprint({k: schema.get(k) for k in STATS_KEYS})}


def checked_stats_identity(stats_dir: str | Path, gates_dir: str | Path) -> dict | None:
    """The identity of the stats in `stats_dir`, refused unless they were made with the gates in `gates_dir`
    (when those exist)."""
    identity = stats_identity(json.loads((Path(stats_dir) / "_schema.json").read_text()))
    if (Path(gates_dir) / GATES_META).exists():
        check_same({"gates_sha256": gates_hash(gates_dir)}, identity, f"the stats in {stats_dir}",
                   f"the gates in {gates_dir} are other ones (did warmup run again?); collect again into a new out "
                   "directory, or remove stats/ and rejects/")
    return identity


def selection_identity(dirs: list[Path], schemas: list[dict], gates_dir: str | Path) -> dict | None:
    """The identity of the stats selected from: one for every stats directory (each `_schema.json`), and the
    gates' of the run that selects."""
    found = [(d, stats_identity(schema)) for d, schema in zip(dirs, schemas)]
    found = [(d, i) for d, i in found if i is not None]
    if not found:
        return None
    first_dir, identity = found[0]
    for other_dir, other in found[1:]:
        check_same({k: v for k, v in identity.items() if k != "stats_sha256"}, other, f"the stats in {other_dir}",
                   f"they cannot be selected together with those of {first_dir}")
    return checked_stats_identity(first_dir, gates_dir)


def differences(expected: dict, found: dict, prefix: str = "") -> list[str]:
    """`key: found → expected` for every key both hold with different values (nested dicts by dotted key)."""
    out = []
    for key in sorted(set(expected) & set(found)):
        a, b = found[key], expected[key]
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(b, a, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {_short(a)} there, {_short(b)} here")
    return out


def _short(value) -> str:
    text = str(value)
    return text[:12] if len(text) == 64 and all(c in "0123456789abcdef" for c in text) else repr(value)


def check_same(expected: dict | None, found: dict | None, what: str, hint: str) -> None:
    """Raise `IdentityMismatch` naming each difference between the identity `found` in an input and the one a
    stage works with; an input written before identities were recorded (None) passes."""
    if expected is None or found is None:
        return
    diff = differences(expected, found)
    if diff:
        raise IdentityMismatch(f"{what} came from other inputs than this run's ({'; '.join(diff)}): {hint}")


def check_resume(path: str | Path, settings: dict, resuming: bool, what: str) -> None:
    """Refuse to resume `what` made under other `settings` than those recorded at `path`; record them."""
    path = Path(path)
    if resuming and path.exists():
        check_same(settings, json.loads(path.read_text()), what,
                   "resume with the settings it was made with, or use a new out directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=2, sort_keys=True))


def file_key(path: str) -> str:
    """A key of an input file that does not depend on where it is mounted: its size and its first and last MiB."""
    import fsspec

    with fsspec.open(path, "rb") as f:
        size = f.size if getattr(f, "size", None) is not None else f.seek(0, os.SEEK_END)
        f.seek(0)
        digest = hashlib.sha256(str(size).encode() + b"\0" + f.read(CHUNK))
        if size > 2 * CHUNK:
            f.seek(size - CHUNK)
        digest.update(f.read(CHUNK))
    return digest.hexdigest()


def file_keys(paths: list[str]) -> dict[str, str]:
    """{path: key}; files with the same content get keys `#1`, `#2`… in path order, so none hides another."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=16) as pool:
        keys = list(pool.map(file_key, paths))
    seen: dict[str, int] = {}
    out = {}
    for path, key in zip(paths, keys):
        seen[key] = seen.get(key, 0) + 1
        out[path] = key if seen[key] == 1 else f"{key}#{seen[key]}"
    return out
