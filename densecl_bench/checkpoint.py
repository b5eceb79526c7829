"""Checkpoint loading (any known layout -> torchvision ResNet keys), verification, and export.

Every benchmark must say exactly which weights it measured, so loading is strict: the file's
layout is detected, its backbone keys are renamed to torchvision's (conv1, bn1, layer1..4; fc
dropped), and loading fails unless every backbone tensor is present with the right shape.
Formats: PROTOCOLS.md §1.4 (MMSelfSup 0.x/1.x, OpenSelfSup/DenseCL, extracted backbones) and
§6.2 (MoCo/DenseCL `convert-pretrain-to-detectron2.py` renames). Files are untrusted and are read
through `safe_pickle` only.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import pickle
import re
import zipfile
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from torch import Tensor, nn
from torchvision.ops import FrozenBatchNorm2d

from densecl_bench import released
from densecl_bench.backbone import ARCHS, Backbone, random_state_dict
from densecl_bench.errors import UserError
from densecl_bench.paths import atomic_path, atomic_torch_save
from densecl_bench.safe_pickle import UnsafePickleError, load_pickle, load_torch

log = logging.getLogger(__name__)

# What each detected layout is; `describe` prints it and the README lists it.
LAYOUTS: dict[str, str] = {
    "torchvision": "plain torchvision ResNet state dict (fc ignored)",
    "timm": "timm training checkpoint (`state_dict` with torchvision key names)",
    "extracted-backbone": "extracted backbone {'state_dict', 'author'} (MMSelfSup/DenseCL extract_backbone_weights; mmcv/mmseg pretrained)",
    "mmselfsup-0.x": "MMSelfSup 0.x / OpenSelfSup / DenseCL training checkpoint (mmcv runner; identical keys)",
    "mmselfsup-1.x": "MMSelfSup 1.x mmengine checkpoint (`backbone.*`)",
    "moco": "MoCo training checkpoint (`encoder_q.*`; fc / MLP head ignored)",
    "lightning": "solo-learn / PyTorch Lightning checkpoint (`backbone.*`)",
    "backbone-prefixed": "state dict with torchvision names under `backbone.` (e.g. lightly)",
    "detectron2": "detectron2 .pkl (convert-pretrain-to-detectron2 output: stem / res2..res5 / convN.norm / shortcut)",
    "detectron2-model": "detectron2 trained model (`backbone.bottom_up.*`, or C4 `backbone.*` + `roi_heads.res5.*`)",
    "random": "seeded random initialisation (torchvision init)",
}
EXPORT_FORMATS: tuple[str, ...] = ("detectron2", "torchvision", "mmcv")

# Where torchvision-named backbones live inside the files we know, most specific first.
# `backbone.` wins over `encoder_q.0.` because MMSS 0.x stores the same module under both.
_TV_PREFIXES: tuple[str, ...] = ("backbone.", "encoder_q.0.", "encoder_q.", "base_encoder.", "")
_D2_PREFIXES: tuple[str, ...] = ("", "backbone.bottom_up.", "backbone.")
_WRAPPERS: tuple[str, ...] = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_CONTAINERS: tuple[str, ...] = ("state_dict", "model", "module", "network", "net")
_BACKBONE_ROOT = re.compile(r"^(conv1|bn1|layer\d+)\.")
_LEGACY_TORCH_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"
_ZIP_MAGIC = b"PK\x03\x04"
_NBT = "num_batches_tracked"
# (bottleneck?, layer3 block count) -> arch
_ARCH_BY_LAYER3: dict[tuple[bool, int], str] = {(False, 2): "resnet18", (False, 6): "resnet34", (True, 6): "resnet50", (True, 23): "resnet101"}


class CheckpointError(UserError, ValueError):
    """A checkpoint cannot be used; the message names the file, the layout detected and what is wrong."""


@dataclass
class LoadedCheckpoint:
    """A backbone state dict in torchvision keys (conv1, bn1, layer1..4; no fc) and its provenance.

    `prefix` is where the backbone keys were found in the file (e.g. `module.encoder_q.`),
    `container` the nesting they were read from (e.g. `['state_dict']`).
    """

    state_dict: dict[str, Tensor]
    arch: str
    layout: str
    sha256: str
    path: str
    ignored_keys: list[str] = field(default_factory=list)
    missing_keys: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)
    prefix: str = ""
    container: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ reading


def file_sha256(path: str | Path) -> str:
    """sha256 of a file, streamed (checkpoints can be GBs)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_untrusted(path: Path) -> Any:
    """torch files (zip or legacy) through weights-only torch.load, anything else as a `.pkl`."""
    with open(path, "rb") as f:
        head = f.read(len(_LEGACY_TORCH_MAGIC))
    if head.startswith(_ZIP_MAGIC) and not zipfile.is_zipfile(path):
        # torch.save writes a zip whose directory is at the end: a cut-off copy lost it
        raise CheckpointError(f"{path}: the file is truncated or corrupt (a torch zip archive without its "
                              "central directory, e.g. an interrupted download or copy)")
    try:
        if zipfile.is_zipfile(path) or head == _LEGACY_TORCH_MAGIC:
            return load_torch(path)
        return load_pickle(path)
    except UnsafePickleError as err:
        raise CheckpointError(f"{path}: {err}") from None
    except Exception as err:  # corrupt or foreign files fail in many ways; all mean "unreadable"
        raise CheckpointError(f"{path}: the file is truncated or corrupt, or not a torch / pickle checkpoint "
                              f"({type(err).__name__}: {err})") from None


def _is_array(v: Any) -> bool:
    return isinstance(v, (Tensor, np.ndarray, np.generic))


def _as_tensor(v: Any) -> Tensor:
    if isinstance(v, Tensor):
        return v
    if isinstance(v, np.generic):
        return torch.from_numpy(np.asarray(v).copy())
    return torch.from_numpy(v if v.flags.writeable else v.copy())


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """Descend `state_dict` / `model` / ... until the mapping that holds the arrays.

    Returns (state, container trail, top-level mapping).
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a dict of tensors, found a {type(obj).__name__} [layout: unknown]")
    top, cur, trail = dict(obj), obj, []
    while not any(_is_array(v) for v in cur.values()):
        nxt = next((k for k in _CONTAINERS if isinstance(cur.get(k), Mapping)), None)
        if nxt is None:
            raise CheckpointError(
                f"{path}: no tensors found (looked inside {', '.join(repr(k) for k in _CONTAINERS)}); "
                f"keys at {trail or 'top level'}: {_summarise(list(cur))} [layout: unknown]"
            )
        cur = cur[nxt]
        trail.append(nxt)
    return dict(cur), trail, top


def _strip_wrappers(state: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Remove DDP `module.` / torch.compile `_orig_mod.` prefixes; return the wrapper prefix seen."""
    seen = ""
    for wrapper in _WRAPPERS:
        if state and all(k.startswith(wrapper) for k in state):
            state = {k[len(wrapper) :]: v for k, v in state.items()}
            seen += wrapper
    return state, seen


# ------------------------------------------------------------------------------------ key maps


def from_detectron2_key(key: str) -> str | None:
    """Inverse of the §6.2 renames: `stem.conv1.norm.weight` -> `bn1.weight`, `res2` -> `layer1`, ..."""
    if key.startswith("stem."):
        key = key[len("stem.") :]
    else:
        m = re.match(r"res([2-5])\.(.*)$", key)
        if not m:
            return None
        key = f"layer{int(m[1]) - 1}.{m[2]}"
    key = re.sub(r"(^|\.)shortcut\.norm\.", r"\1downsample.1.", key)
    key = re.sub(r"(^|\.)shortcut\.", r"\1downsample.0.", key)
    return re.sub(r"(^|\.)conv([1-3])\.norm\.", r"\1bn\2.", key)


def to_detectron2_key(key: str) -> str:
    """The MoCo / DenseCL `convert-pretrain-to-detectron2.py` renames (PROTOCOLS.md §6.2)."""
    if "layer" not in key:
        key = "stem." + key
    key = re.sub(r"layer([1-4])", lambda m: f"res{int(m[1]) + 1}", key)
    key = re.sub(r"bn([1-3])", r"conv\1.norm", key)
    return key.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def _find_backbone(keys: list[str]) -> tuple[str, str, dict[str, str]] | None:
    """(naming 'torchvision'|'detectron2', prefix, {canonical key: source key}) or None."""
    keyset = set(keys)
    for prefix in _D2_PREFIXES:
        if prefix + "stem.conv1.weight" in keyset:
            mapping: dict[str, str] = {}
            for k in keys:
                if k.startswith(prefix):
                    rest = k[len(prefix) :]
                elif prefix == "backbone." and k.startswith("roi_heads.res5."):  # detectron2 C4
                    rest = k[len("roi_heads.") :]
                else:
                    continue
                canon = from_detectron2_key(rest)
                if canon is not None:
                    mapping[canon] = k
            return "detectron2", prefix, mapping
    for prefix in _TV_PREFIXES:
        if prefix + "conv1.weight" in keyset:
            return "torchvision", prefix, {k[len(prefix) :]: k for k in keys if k.startswith(prefix)}
    return None


def _name_layout(naming: str, prefix: str, keys: list[str], top: dict[str, Any], trail: list[str]) -> str:
    meta = top.get("meta") if isinstance(top.get("meta"), Mapping) else {}
    if naming == "detectron2":
        return "detectron2" if prefix == "" else "detectron2-model"
    if prefix in ("encoder_q.", "base_encoder."):
        return "moco"
    if prefix == "encoder_q.0.":
        return "mmselfsup-0.x"
    if prefix == "backbone.":
        if "mmcv_version" in meta or any(k.startswith("encoder_q.0.") for k in keys):
            return "mmselfsup-0.x"
        if "message_hub" in top or "mmengine_version" in meta or any(k.startswith(("neck.", "head.", "target_backbone")) for k in keys):
            return "mmselfsup-1.x"
        if "pytorch-lightning_version" in top or any(k.startswith(("momentum_backbone.", "projector.")) for k in keys):
            return "lightning"
        return "backbone-prefixed"
    if trail == ["state_dict"] and "author" in top:
        return "extracted-backbone"
    if trail == ["state_dict"] and "arch" in top:
        return "timm"
    return "torchvision"


# ------------------------------------------------------------------------------------ arch


@functools.lru_cache(maxsize=None)
def expected_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Every backbone state-dict key of `arch` with its shape, in torchvision's order (no fc)."""
    if arch not in ARCHS:
        raise CheckpointError(f"unknown arch {arch!r}: expected one of {', '.join(ARCHS)}")
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in Backbone(arch).state_dict().items()}


def infer_arch(keys: list[str]) -> str | None:
    """resnet18/34/50/101 from canonical keys: BasicBlock vs Bottleneck (conv3), layer3 block count."""
    bottleneck = any(re.match(r"layer\d+\.\d+\.conv3\.weight$", k) for k in keys)
    layer3 = {m[1] for k in keys if (m := re.match(r"layer3\.(\d+)\.", k))}
    return _ARCH_BY_LAYER3.get((bottleneck, len(layer3)))


def _arch_evidence(keys: list[str]) -> str:
    bottleneck = any(re.match(r"layer\d+\.\d+\.conv3\.weight$", k) for k in keys)
    layer3 = {m[1] for k in keys if (m := re.match(r"layer3\.(\d+)\.", k))}
    return f"{'Bottleneck' if bottleneck else 'BasicBlock'}s, {len(layer3)} blocks in layer3"


# ------------------------------------------------------------------------------------ loading


def random_sha256(arch: str, seed: int) -> str:
    """The `random` checkpoint's identity: sha256 of a stable description of how its weights are made.

    The weights are torchvision's initialisation under `torch.manual_seed(seed)`, so (arch, seed) fix
    them; the hash keys the feature cache and the run id like a file's sha256 does.
    """
    return hashlib.sha256(f"densecl-bench random init: arch={arch} seed={seed} init=torchvision".encode()).hexdigest()


def load_checkpoint(path: str | Path, arch: str | None = None, allow_partial: bool = False,
                    seed: int = 0) -> LoadedCheckpoint:
    """Load the ResNet backbone from any supported layout, verified complete and finite.

    Args:
        path: a checkpoint file, a released name (`densecl-bench released`; its fetched file), or the
            string `random` for the seeded random-init backbone.
        arch: resnet18/34/50/101; inferred from the keys when None (a mismatch is an error).
        allow_partial: load even if backbone tensors are missing (they keep random init and are
            listed in `missing_keys`); logged as a warning. Shape mismatches and NaN/inf values
            always fail.
        seed: the weights of `random` (see `random_sha256`); ignored for files.
    """
    if str(path) == "random":
        arch = arch or "resnet50"
        expected_shapes(arch)  # validates the name
        return LoadedCheckpoint(random_state_dict(arch, seed=seed), arch, "random", random_sha256(arch, seed),
                                "random", meta={"seed": seed})
    path = released.resolve(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    sha = file_sha256(path)
    raw = _read_untrusted(path)
    state, trail, top = _unwrap(raw, path)
    state, wrapper = _strip_wrappers(state)
    keys = list(state)
    found = _find_backbone(keys)
    if found is None:
        raise CheckpointError(
            f"{path}: no ResNet backbone found (looked for conv1.weight under "
            f"{', '.join(repr(p) for p in _TV_PREFIXES)} and detectron2 stem.conv1.weight); "
            f"keys: {_summarise(keys)} [layout: unknown]"
        )
    naming, prefix, mapping = found
    layout = _name_layout(naming, prefix, keys, top, trail)
    where = f"[file: {path}; layout: {layout}, backbone keys under {wrapper + prefix!r}]"

    candidates = {c: s for c, s in mapping.items() if _BACKBONE_ROOT.match(c)}
    inferred = infer_arch(list(candidates))
    if arch is None:
        if inferred is None:
            raise CheckpointError(f"cannot infer the architecture ({_arch_evidence(list(candidates))}); pass arch= {where}")
        arch = inferred
    elif arch not in ARCHS:
        raise CheckpointError(f"unknown arch {arch!r}: expected one of {', '.join(ARCHS)} {where}")
    elif inferred is not None and inferred != arch:
        raise CheckpointError(f"arch {arch!r} was given but the checkpoint holds a {inferred} ({_arch_evidence(list(candidates))}) {where}")

    shapes = expected_shapes(arch)
    not_arrays = [c for c in candidates if not _is_array(state[candidates[c]])]
    mismatched = [
        f"{c}: checkpoint {tuple(state[candidates[c]].shape)} vs {arch} {shapes[c]}"
        for c in candidates
        if c in shapes and c not in not_arrays and tuple(state[candidates[c]].shape) != shapes[c]
    ]
    if mismatched or not_arrays:
        problems = mismatched + [f"{c}: not a tensor" for c in not_arrays]
        raise CheckpointError(f"{len(problems)} backbone tensor(s) have the wrong shape for {arch}: {_summarise(problems, 8)} {where}")
    missing = [k for k in shapes if not k.endswith(_NBT) and k not in candidates]
    unexpected = [c for c in candidates if c not in shapes]
    if (missing or unexpected) and not allow_partial:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of {_required_count(arch)} backbone tensors are missing: {_summarise(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} keys are not part of a plain {arch}: {_summarise(unexpected)}")
        raise CheckpointError("; ".join(parts) + f" (allow_partial / --allow-partial loads it anyway) {where}")
    if missing or unexpected:
        log.warning(
            "!!! PARTIAL CHECKPOINT %s (%s): %d of %d backbone tensors MISSING, they keep their RANDOM "
            "initialisation: %s; %d unexpected keys ignored: %s. Results from it do not measure this checkpoint.",
            path, layout, len(missing), _required_count(arch), _summarise(missing), len(unexpected), _summarise(unexpected),
        )

    state_dict = {k: _as_tensor(state[candidates[k]]) for k in shapes if k in candidates}
    nonfinite = [f"{k} ({int((~torch.isfinite(v)).sum())} of {v.numel()})" for k, v in state_dict.items()
                 if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if nonfinite:
        raise CheckpointError(f"{len(nonfinite)} backbone tensor(s) hold NaN or inf values (a diverged run?): "
                              f"{_summarise(nonfinite, 8)} {where}")
    used = {candidates[k] for k in state_dict}
    return LoadedCheckpoint(
        state_dict=state_dict,
        arch=arch,
        layout=layout,
        sha256=sha,
        path=str(path),
        ignored_keys=[wrapper + k for k in keys if k not in used],
        missing_keys=missing,
        meta=_meta(top),
        prefix=wrapper + prefix,
        container=trail,
    )


def _required_count(arch: str) -> int:
    return sum(not k.endswith(_NBT) for k in expected_shapes(arch))


def _meta(top: dict[str, Any]) -> dict:
    """The file's `meta` dict (mmcv/mmengine: config, epoch, ...) plus scalar top-level entries."""
    meta = {k: v for k, v in top.items() if isinstance(v, (str, int, float, bool)) or v is None}
    if isinstance(top.get("meta"), Mapping):
        meta.update(top["meta"])
    return meta


def _load_into(model: nn.Module, ckpt: LoadedCheckpoint) -> None:
    """Load the checkpoint's tensors into `model`: every tensor must fit, only `ckpt.missing_keys` stay random."""
    result = model.load_state_dict(ckpt.state_dict, strict=False)
    missing = {k for k in result.missing_keys if not k.endswith(_NBT)}
    if result.unexpected_keys or missing != set(ckpt.missing_keys):
        raise CheckpointError(
            f"{ckpt.path}: state dict does not fit {ckpt.arch}: missing {_summarise(sorted(missing))}, "
            f"unexpected {_summarise(result.unexpected_keys)} [layout: {ckpt.layout}]"
        )


def build_backbone(ckpt: LoadedCheckpoint) -> Backbone:
    """A `Backbone` holding the checkpoint's tensors; only `ckpt.missing_keys` may stay random."""
    model = Backbone(ckpt.arch)
    _load_into(model, ckpt)
    return model


def frozen_batchnorm(module: nn.Module) -> nn.Module:
    """`module` with every BatchNorm2d replaced by a FrozenBatchNorm2d of its statistics and affine.

    A frozen BN normalises with the running statistics in train mode too, so `model.train()` cannot
    unfreeze it, whichever wrapper (IntermediateLayerGetter, BackboneWithFPN) later holds the stage.
    """
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, eps=module.eps)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(frozen, name).copy_(getattr(module, name).detach())
        return frozen
    for name, child in module.named_children():
        setattr(module, name, frozen_batchnorm(child))
    return module


def build_trainable(
    ckpt: LoadedCheckpoint,
    *,
    norm_layer: Callable[[int], nn.Module] | None = None,
    frozen_stages: int = -1,
    replace_stride_with_dilation: Sequence[bool] = (False, False, False),
) -> torchvision.models.ResNet:
    """A torchvision ResNet (fc: Identity) holding the checkpoint's tensors, for benchmarks that fine-tune.

    norm_layer and replace_stride_with_dilation are torchvision's (BatchNorm2d by default; (False, True,
    True) is mmseg's D8: strides (1, 2, 1, 1), dilations (1, 1, 2, 4), the first block of a dilated
    stage at half the dilation). frozen_stages as mmcv's ResNet: -1 none, 0 the stem (conv1, bn1),
    i the stem and layer1..layer_i; their parameters get no gradients and their BN is frozen.
    """
    if not -1 <= frozen_stages <= 4:
        raise ValueError(f"frozen_stages must be -1 (none) .. 4 (every stage), got {frozen_stages}")
    net = getattr(torchvision.models, ckpt.arch)(
        weights=None, norm_layer=norm_layer, replace_stride_with_dilation=list(replace_stride_with_dilation)
    )
    net.fc = nn.Identity()
    _load_into(net, ckpt)
    if frozen_stages >= 0:
        net.bn1 = frozen_batchnorm(net.bn1)
        for stage in (net.conv1, net.bn1, *(getattr(net, f"layer{i}") for i in range(1, frozen_stages + 1))):
            frozen_batchnorm(stage).requires_grad_(False)
    return net


# ------------------------------------------------------------------------------------ reporting


def _summarise(items: list[str], limit: int = 12) -> str:
    if not items:
        return "none"
    shown = ", ".join(items[:limit])
    return shown + (f", ... and {len(items) - limit} more" if len(items) > limit else "")


def _group(keys: list[str], prefix: str) -> str:
    """`encoder_k.0.* (320), queue (1), ...`: keys counted by their leading module.

    Keys beside the backbone (`module.encoder_q.fc.*`) or under a DDP wrapper are grouped one
    level below that prefix.
    """

    def head(k: str) -> str:
        base = prefix if prefix and k.startswith(prefix) else next((w for w in _WRAPPERS if k.startswith(w)), "")
        parts = k[len(base) :].split(".")
        n = 2 if len(parts) > 2 and parts[1].isdigit() else 1
        return base + ".".join(parts[:n]) + (".*" if len(parts) > n else "")

    counts = Counter(head(k) for k in keys)
    return ", ".join(f"{h} ({n})" for h, n in counts.items())


def describe(ckpt: LoadedCheckpoint) -> str:
    """The `densecl-bench inspect` report: layout, arch, sha256, tensor counts, ignored and missing keys."""
    shapes = expected_shapes(ckpt.arch)
    required = _required_count(ckpt.arch)
    nbt_total = len(shapes) - required
    nbt = sum(k.endswith(_NBT) for k in ckpt.state_dict)
    loaded = len(ckpt.state_dict) - nbt
    where = f" (keys under {ckpt.prefix!r}" + (f" in {ckpt.container}" if ckpt.container else "") + ")"
    lines = [
        f"file:     {ckpt.path}",
        f"layout:   {ckpt.layout} -- {LAYOUTS.get(ckpt.layout, '')}{where if ckpt.layout != 'random' else ''}",
        f"arch:     {ckpt.arch}",
        f"sha256:   {ckpt.sha256}",
        f"loaded:   {loaded}/{required} backbone tensors (weights + BN running stats), "
        f"{nbt}/{nbt_total} num_batches_tracked (optional)",
        f"status:   {'complete' if not ckpt.missing_keys else 'INCOMPLETE: missing tensors keep their random init'}",
        f"missing:  {len(ckpt.missing_keys)}" + (f": {_summarise(ckpt.missing_keys)}" if ckpt.missing_keys else ""),
        f"ignored:  {len(ckpt.ignored_keys)} keys" + (f": {_group(ckpt.ignored_keys, ckpt.prefix)}" if ckpt.ignored_keys else ""),
    ]
    shown = {k: v for k, v in ckpt.meta.items() if isinstance(v, (str, int, float, bool)) and len(str(v)) <= 60}
    if shown:
        lines.append("meta:     " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ export


def export_checkpoint(state_dict: Mapping[str, Tensor], fmt: str, out_path: str | Path, author: str = "densecl-bench") -> Path:
    """Write a torchvision-keyed backbone state dict in another layout, atomically.

    `detectron2`: the §6.2 renames, numpy values, `{"model", "__author__", "matching_heuristics": True}`
    pickled to a `.pkl` (detectron2 only keeps those keys for `.pkl` files). `torchvision`: the plain
    state dict. `mmcv`: `{'state_dict': ..., 'author': ...}`, the extracted-backbone layout that
    mmcv/mmseg/mmdet `Pretrained` init and MMSelfSup's extract_backbone_weights use.
    """
    out_path = Path(out_path)
    sd = {k: v.detach().cpu() for k, v in state_dict.items()}
    if fmt == "detectron2":
        if out_path.suffix != ".pkl":
            raise CheckpointError(f"{out_path}: a detectron2 checkpoint must end in .pkl (detectron2 reads the dict only from .pkl files)")
        model = {to_detectron2_key(k): (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in sd.items()}
        with atomic_path(out_path) as tmp, open(tmp, "wb") as f:
            pickle.dump({"model": model, "__author__": author, "matching_heuristics": True}, f)
    elif fmt == "torchvision":
        atomic_torch_save(out_path, sd)
    elif fmt == "mmcv":
        atomic_torch_save(out_path, {"state_dict": sd, "author": author})
    else:
        raise CheckpointError(f"unknown export format {fmt!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    return out_path


def convert(
    src: str | Path,
    to: str | None,
    out: str | Path,
    extract_backbone: bool = False,
    arch: str | None = None,
    allow_partial: bool = False,
) -> LoadedCheckpoint:
    """`densecl-bench convert`: load `src` (verified) and write it as `to`; `extract_backbone` means `mmcv`."""
    if extract_backbone:
        if to not in (None, "mmcv"):
            raise CheckpointError(f"--extract-backbone writes the mmcv extracted-backbone layout; it cannot be combined with --to {to}")
        to = "mmcv"
    if to not in EXPORT_FORMATS:
        raise CheckpointError(f"unknown target format {to!r}: expected one of {', '.join(EXPORT_FORMATS)}")
    out, src_path = Path(out), Path(src)
    if out.resolve() == src_path.resolve() or (out.exists() and src_path.exists() and out.samefile(src_path)):
        raise CheckpointError(f"{out}: the output is the input file; write the converted checkpoint elsewhere")
    ckpt = load_checkpoint(src, arch=arch, allow_partial=allow_partial)
    export_checkpoint(ckpt.state_dict, to, out)
    return ckpt


def extract_backbone(path: str | Path, out_path: str | Path, arch: str | None = None, allow_partial: bool = False) -> LoadedCheckpoint:
    """MMSelfSup's extract_backbone_weights for any layout: write `{'state_dict', 'author'}` (verified)."""
    return convert(path, "mmcv", out_path, arch=arch, allow_partial=allow_partial)
