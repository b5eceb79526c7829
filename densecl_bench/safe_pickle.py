"""Reading untrusted checkpoint files without running code from them.

A pickle can name any importable callable and have the loader call it (`__reduce__`), so a
downloaded checkpoint is code unless the unpickler restricts what it resolves. Two loaders:

- `load_pickle`: `.pkl` files (detectron2 / MoCo / DenseCL converter output) through a
  `pickle.Unpickler` that resolves only numpy array reconstruction and plain containers.
- `load_torch`: `torch.save` files through `torch.load(weights_only=True)`, additionally allowing
  numpy arrays and replacing a short list of known training-bookkeeping classes (mmengine's
  `HistoryBuffer` in `message_hub`, Lightning/omegaconf hyper-parameters, `argparse.Namespace`)
  by inert stand-ins, so full training checkpoints load while their tensors are all we use.
  The real classes are never imported, called or constructed.

Anything else is refused with `UnsafePickleError` naming the global.
PROTOCOLS.md §1.4, §6.2 (what those files contain).
"""

from __future__ import annotations

import codecs
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

__all__ = ["UnsafePickleError", "InertStub", "load_pickle", "load_torch"]

_reconstruct = np._core.multiarray._reconstruct
_scalar = np._core.multiarray.scalar

# (module, name) -> object, for the `.pkl` unpickler. Pickles written by numpy < 2 name
# `numpy.core.*`, numpy >= 2 writes `numpy._core.*`; both resolve to the same functions here
# (never through the deprecated `numpy.core` shim).
_PKL_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("collections", "OrderedDict"): OrderedDict,
    ("_codecs", "encode"): codecs.encode,  # how protocol-2 pickles written by Python 3 store bytes
}

# Globals inside torch files that are replaced by `InertStub`s instead of refused: bookkeeping
# that training frameworks put next to the weights. Stubs are safe whatever they stand for,
# because they never touch the real object; the list only keeps refusal the default.
_STUB_PREFIXES: tuple[str, ...] = (
    "mmengine.",
    "mmcv.",
    "addict.",
    "omegaconf.",
    "lightning.",
    "lightning_fabric.",
    "pytorch_lightning.",
)
_STUB_NAMES: frozenset[str] = frozenset({"argparse.Namespace", "typing.Any", "pathlib.PosixPath", "pathlib.WindowsPath"})


class UnsafePickleError(pickle.UnpicklingError):
    """The file names a global that is neither allowed nor replaceable by an inert stub."""

    def __init__(self, names: list[str], detail: str = "") -> None:
        self.names = names
        msg = f"refusing to load: the file references forbidden global(s) {', '.join(names)}"
        super().__init__(msg + (f" ({detail})" if detail else ""))


class InertStub:
    """Stands in for a class from a training framework; keeps its constructor args and state."""

    stub_of: str = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> InertStub:
        inst = super().__new__(cls)
        inst.args = args
        inst.state = None
        return inst

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<stub of {self.stub_of}>"


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _PKL_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError([f"{module}.{name}"], "only numpy arrays and plain containers are allowed") from None


def load_pickle(file: str | Path | IO[bytes]) -> Any:
    """Unpickle a `.pkl` admitting only numpy arrays, numpy scalars and plain containers.

    `encoding='latin1'` reads Python 2 pickles of numpy arrays, as detectron2 does.
    """
    if isinstance(file, (str, Path)):
        with open(file, "rb") as f:
            return _RestrictedUnpickler(f, encoding="latin1").load()
    return _RestrictedUnpickler(file, encoding="latin1").load()


def _numpy_safe_globals() -> list[Any]:
    dtype_classes = {type(np.dtype(c)) for c in np.typecodes["All"]}
    return [
        _reconstruct,
        (_reconstruct, "numpy.core.multiarray._reconstruct"),
        _scalar,
        (_scalar, "numpy.core.multiarray.scalar"),
        np.ndarray,
        np.dtype,
        *sorted(dtype_classes, key=lambda t: t.__name__),
    ]


def _stubbable(name: str) -> bool:
    return name in _STUB_NAMES or name.startswith(_STUB_PREFIXES)


def _stub(name: str) -> tuple[type, str]:
    return type(name.rsplit(".", 1)[-1], (InertStub,), {"stub_of": name}), name


def load_torch(path: str | Path) -> Any:
    """`torch.load(weights_only=True, map_location='cpu')` plus numpy arrays and inert stubs.

    The first attempt allows numpy only; if torch refuses a global, the file is scanned
    (statically, nothing runs) for all such globals, and it is loaded again with stubs only if
    every one of them is on the stub list.
    """
    numpy_globals = _numpy_safe_globals()
    try:
        with torch.serialization.safe_globals(numpy_globals):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as first:
        detail = _reason(first)
        try:
            with torch.serialization.safe_globals(numpy_globals):
                names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # legacy (non-zip) files cannot be scanned: report torch's refusal
            raise UnsafePickleError(_globals_in(detail), detail) from None
        forbidden = sorted(n for n in names if not _stubbable(n))
        if forbidden or not names:
            raise UnsafePickleError(forbidden or _globals_in(detail), detail) from None
        with torch.serialization.safe_globals([*numpy_globals, *(_stub(n) for n in sorted(set(names)))]):
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as second:
                raise UnsafePickleError(sorted(set(names)), _reason(second)) from None


def _reason(error: Exception) -> str:
    """The line of torch's long weights-only message that says what was refused."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    hits = [ln for ln in lines if "GLOBAL" in ln or "unrecognized" in ln or "Can only" in ln]
    return (hits or lines or [repr(error)])[0]


def _globals_in(message: str) -> list[str]:
    """The `GLOBAL a.b` names torch's weights-only error mentions (for the error we raise)."""
    words = message.replace("`", " ").split()
    found = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "GLOBAL"]
    return found or ["<unknown>"]
