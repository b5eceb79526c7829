"""Released checkpoints: the pinned manifest (`released.yaml`), `fetch`, and `--ckpt NAME`.

A released checkpoint is named as in its model zoo and pinned by url, sha256 (or the hex prefix the
publisher put in the file name, verified as torch.hub does) and the reference JSON of its published
numbers with per-metric tolerances. `fetch` is the only thing that downloads: it resumes a partial
download with an HTTP Range request, verifies the hash, and moves the file into
`$DENSECL_BENCH_HOME/weights/<name>.pth` only once it is verified, so a file there is always a
verified one. `--ckpt NAME` then resolves to that file and never downloads. `$DENSECL_BENCH_RELEASED`
points at another manifest (a private registry, a mirror, the tests' local server).
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any

import yaml

from densecl_bench import __version__, paths
from densecl_bench.errors import UserError

MANIFEST = Path(__file__).with_name("released.yaml")
MANIFEST_ENV = "DENSECL_BENCH_RELEASED"
_HEX = re.compile(r"^[0-9a-f]{8,64}$")
_CHUNK = 1 << 20


class FetchError(UserError):
    """A released checkpoint cannot be fetched or found; the message says what to do."""


@dataclass(frozen=True)
class Release:
    """One manifest entry. `sha256` is the full digest or its published prefix (8+ hex digits)."""

    name: str
    url: str
    sha256: str
    layout: str
    reference: Path
    source: str
    method: str = ""
    tolerances: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        """Where `fetch` stores it (present only once verified)."""
        return weights_dir() / f"{self.name}.pth"


def weights_dir() -> Path:
    return paths.home() / "weights"


def manifest_path() -> Path:
    return Path(os.environ.get(MANIFEST_ENV) or MANIFEST)


def load_manifest(path: str | os.PathLike[str] | None = None) -> dict[str, Release]:
    """The released checkpoints by name; references resolve relative to the manifest file."""
    path = Path(path) if path is not None else manifest_path()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise FetchError(f"{path}: cannot read the released-checkpoint manifest: {err}") from err
    releases = {}
    for name, entry in data.items():
        missing = {"url", "sha256", "layout", "reference", "source"} - set(entry or {})
        if missing:
            raise FetchError(f"{path}: entry {name!r} lacks {', '.join(sorted(missing))}")
        sha = str(entry["sha256"]).lower()
        if not _HEX.match(sha):
            raise FetchError(f"{path}: entry {name!r}: sha256 must be 8 to 64 hex digits, got {sha!r}")
        releases[name] = Release(name, entry["url"], sha, entry["layout"], path.parent / entry["reference"],
                                 " ".join(str(entry["source"]).split()), entry.get("method", ""),
                                 entry.get("tolerances") or {})
    return releases


def get(name: str) -> Release:
    releases = load_manifest()
    if name not in releases:
        raise FetchError(f"{name!r} is not a released checkpoint (known: {', '.join(releases) or 'none'}; "
                         "`densecl-bench released` lists them)")
    return releases[name]


def resolve(ckpt: str | os.PathLike[str]) -> Path:
    """`--ckpt` as a file: an existing path as given, a released name as its fetched file.

    Never downloads: a released name that is not fetched yet is an error naming the `fetch` command.
    """
    path = Path(ckpt)
    if path.exists():
        return path
    release = load_manifest().get(str(ckpt))
    if release is None:
        return path
    if not release.path.is_file():
        raise FetchError(f"{release.name} is a released checkpoint that is not fetched yet (looked for "
                         f"{release.path}); run `densecl-bench fetch {release.name}` first")
    return release.path


def reference_for(path: str | os.PathLike[str]) -> Release | None:
    """The release whose reference JSON is `path` (its published tolerances go with it)."""
    path = Path(path)
    for release in load_manifest().values():
        if release.reference.is_file() and path.is_file() and os.path.samefile(release.reference, path):
            return release
    return None


def fetch(release: Release, url: str | None = None, progress: bool = True,
          echo: Callable[[str], None] = print) -> Path:
    """Download `release` (or a mirror `url` of it), verify its hash, store it atomically; idempotent.

    A stored file that no longer matches the manifest (a re-pinned release) is downloaded again.
    """
    from densecl_bench.checkpoint import file_sha256  # checkpoint resolves names through this module

    dest = release.path
    if dest.is_file():
        if file_sha256(dest).startswith(release.sha256):
            echo(f"{release.name}: already fetched at {dest}")
            return dest
        echo(f"{release.name}: {dest} does not match the manifest's sha256 {release.sha256}; fetching it again")
        dest.unlink()
    download(url or release.url, dest, release.sha256, progress=progress)
    echo(f"{release.name}: verified sha256 {release.sha256}{'' if len(release.sha256) == 64 else '…'}, "
         f"stored at {dest}")
    return dest


def download(url: str, dest: Path, sha256: str, progress: bool = True, timeout: float = 60.0) -> None:
    """`url` -> `dest`, verified against `sha256` (a full digest or a prefix), resuming `dest.part`.

    An interrupted download keeps `<dest>.part` and the next call asks for the rest with
    `Range: bytes=<size>-`; a server that answers 200 instead starts it over. A file that does not
    verify is deleted (its bytes cannot be trusted to resume from) and nothing is stored.
    """
    from tqdm import tqdm

    from densecl_bench.checkpoint import file_sha256

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"densecl-bench/{__version__}"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
            resumed = start > 0 and resp.status == 206
            start = start if resumed else 0
            length = resp.headers.get("Content-Length")
            total = start + int(length) if length is not None else None
            with open(part, "ab" if resumed else "wb") as f, tqdm(
                    total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
                    desc=dest.name, disable=not progress) as bar:
                while chunk := resp.read(_CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
                if total is not None and f.tell() < total:  # the server closed early: a short read, no error
                    raise ConnectionError(f"connection closed at {f.tell()} of {total} bytes")
    except urllib.error.HTTPError as err:
        if not (err.code == 416 and start):  # 416: nothing left to send, the part is complete
            raise FetchError(f"{url}: HTTP {err.code} {err.reason}") from err
    except (OSError, HTTPException) as err:
        kept = part.stat().st_size if part.exists() else 0
        raise FetchError(f"{url}: download interrupted after {kept} bytes ({type(err).__name__}: {err}); "
                         "run the same command again to resume") from err
    digest = file_sha256(part)
    if not digest.startswith(sha256):
        part.unlink()
        raise FetchError(f"{url}: sha256 mismatch: expected {sha256}{'' if len(sha256) == 64 else '…'}, "
                         f"got {digest}; the download was deleted and nothing was stored (a corrupted "
                         "file or a changed release: check the url and the manifest)")
    os.replace(part, dest)
