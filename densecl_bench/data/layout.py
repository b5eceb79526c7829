"""The expected on-disk layout of each dataset, one clear error when it is not met, and `data check`.

Readers call `require_dir` / `require_file` so that a missing piece is reported once, by path, together
with the layout the reader expected (issue 2 part 6). `check_data_root` walks a whole data root the same
way and lists every problem instead of stopping at the first, for `densecl-bench data check`.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from densecl_bench.data.base import DataLayoutError

LAYOUTS: dict[str, str] = {
    "voc07": """\
<root>/VOCdevkit/VOC2007/
  JPEGImages/<id>.jpg
  Annotations/<id>.xml                      (detection)
  ImageSets/Main/{trainval,test}.txt
  ImageSets/Main/<class>_{trainval,test}.txt  (one per VOC class; lines '<id> <1|0|-1>')
  ImageSets/Segmentation/<split>.txt, SegmentationClass/<id>.png  (segmentation only)""",
    "voc12aug": """\
<root>/VOCdevkit/VOC2012/
  JPEGImages/<id>.jpg
  Annotations/<id>.xml, ImageSets/Main/trainval.txt  (detection)
  ImageSets/Segmentation/{train,val,aug}.txt
  SegmentationClass/<id>.png                (train/val masks, class index per pixel, 255 = ignore)
  SegmentationClassAug/<id>.png             (aug masks, from mmsegmentation's tools/convert_datasets/voc_aug.py)""",
    "coco2017": """\
<root>/coco/
  annotations/instances_{train2017,val2017}.json
  train2017/*.jpg
  val2017/*.jpg""",
    "imagenet": """\
<root>/imagenet/
  {train,val}/<wnid>/*.JPEG                 (one folder per class)
  meta/{train,val}.txt                      (optional MMSelfSup lists: '<path relative to <split>/> <label>')""",
    "places205": """\
<root>/Places205/
  trainvalsplit_places205/{train,val}_places205.csv  (lines '<path relative to images256/> <label>')
  data/vision/torralba/deeplearning/images256/<letter>/<scene>/*.jpg
  categoryIndex_places205.csv               (optional: lines '/<letter>/<scene> <label>')""",
    "inat18": """\
<root>/iNaturalist2018/
  train2018.json, val2018.json              (the competition's COCO-style annotations: images, annotations,
                                             categories; one annotation per image)
  train_val2018/<supercategory>/<category_id>/*.jpg  (each image's `file_name`, relative to <root>/iNaturalist2018/)""",
    "cityscapes": """\
<root>/cityscapes/
  leftImg8bit/{train,val}/<city>/<stem>_leftImg8bit.png
  gtFine/{train,val}/<city>/<stem>_gtFine_labelTrainIds.png  (19 classes, 255 = ignore; from *_gtFine_labelIds.png
                                             with `densecl-bench data cityscapes-trainids --root <root>/cityscapes`)""",
}

_DIRS = {
    "voc07": ("VOCdevkit", "VOC2007"),
    "voc12aug": ("VOCdevkit", "VOC2012"),
    "coco2017": ("coco",),
    "imagenet": ("imagenet",),
    "places205": ("Places205",),
    "inat18": ("iNaturalist2018",),
    "cityscapes": ("cityscapes",),
}

PLACES_IMAGES = Path("data/vision/torralba/deeplearning/images256")
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
INAT_ANNOTATIONS = {"train": "train2018.json", "val": "val2018.json"}
CITYSCAPES_IMAGE_SUFFIX = "_leftImg8bit.png"
CITYSCAPES_TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
CITYSCAPES_LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
"""The 20 VOC classes in sorted (alphabetical) order: the names of the `<class>_<split>.txt` files and the
column order of the SVM label matrix. Defined here, with the layout, so that voc.py and `check_data_root`
share it without importing each other."""


def dataset_dirs(root: str | os.PathLike[str]) -> dict[str, Path]:
    """Where each dataset lives under a data root (real or demo: the same layout)."""
    return {name: Path(root).joinpath(*parts) for name, parts in _DIRS.items()}


def layout_error(dataset: str, problem: str) -> DataLayoutError:
    return DataLayoutError(f"{problem}\nexpected layout for {dataset}:\n{LAYOUTS[dataset]}")


def require_dir(path: Path, dataset: str) -> Path:
    if not path.is_dir():
        raise layout_error(dataset, f"missing folder {path}")
    return path


def require_file(path: Path, dataset: str) -> Path:
    if not path.is_file():
        raise layout_error(dataset, f"missing file {path}")
    return path


def read_ids(path: Path, dataset: str) -> list[str]:
    """The first whitespace-separated token of every non-empty line (VOC ImageSets lists)."""
    return [line.split()[0] for line in require_file(path, dataset).read_text().splitlines() if line.strip()]


@dataclass
class DatasetStatus:
    """What `check_data_root` found for one dataset: ok, or each missing piece by path, plus counts."""

    name: str
    path: Path
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    found: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        self.ok = False
        self.problems.append(text)


def _count_files(folder: Path, suffixes: tuple[str, ...]) -> int:
    with os.scandir(folder) as entries:
        return sum(1 for e in entries if e.name.lower().endswith(suffixes))


def _check_dirs(status: DatasetStatus, *names: str) -> bool:
    good = True
    for name in names:
        if not (status.path / name).is_dir():
            status.problem(f"missing folder {status.path / name}")
            good = False
    return good


def _check_listed(status: DatasetStatus, list_file: Path, *targets: tuple[str, str]) -> None:
    """Every id in `list_file` must have `<folder>/<id><suffix>` for each (folder, suffix) target."""
    if not list_file.is_file():
        status.problem(f"missing file {list_file}")
        return
    ids = read_ids(list_file, status.name)
    status.found.append(f"{list_file.relative_to(status.path)}: {len(ids)} ids")
    for folder, suffix in targets:
        if not (status.path / folder).is_dir():
            continue  # reported once by _check_dirs
        present = {n[: -len(suffix)] for n in os.listdir(status.path / folder) if n.endswith(suffix)}
        missing = [i for i in ids if i not in present]
        if missing:
            status.problem(f"{len(missing)} of {len(ids)} ids in {list_file} have no "
                           f"{status.path / folder}/<id>{suffix} (first: {', '.join(missing[:3])})")


def _check_voc07(status: DatasetStatus) -> None:
    if not _check_dirs(status, "JPEGImages", "Annotations", "ImageSets/Main"):
        return
    main = status.path / "ImageSets" / "Main"
    for split in ("trainval", "test"):
        _check_listed(status, main / f"{split}.txt", ("JPEGImages", ".jpg"), ("Annotations", ".xml"))
        absent = [c for c in VOC_CLASSES if not (main / f"{c}_{split}.txt").is_file()]
        if absent:
            status.problem(f"missing {len(absent)} class files {main}/<class>_{split}.txt (first: {absent[0]})")


def _check_voc12aug(status: DatasetStatus) -> None:
    if not _check_dirs(status, "JPEGImages", "SegmentationClass", "SegmentationClassAug", "ImageSets/Segmentation"):
        return
    seg = status.path / "ImageSets" / "Segmentation"
    for split, masks in (("train", "SegmentationClass"), ("val", "SegmentationClass"), ("aug", "SegmentationClassAug")):
        _check_listed(status, seg / f"{split}.txt", ("JPEGImages", ".jpg"), (masks, ".png"))


def _check_coco(status: DatasetStatus) -> None:
    for split in ("train2017", "val2017"):
        ann = status.path / "annotations" / f"instances_{split}.json"
        if not ann.is_file():
            status.problem(f"missing file {ann}")
        if _check_dirs(status, split):
            status.found.append(f"{split}/: {_count_files(status.path / split, IMAGE_SUFFIXES)} images")


def _check_imagenet(status: DatasetStatus) -> None:
    for split in ("train", "val"):
        meta = status.path / "meta" / f"{split}.txt"
        if meta.is_file():
            with open(meta) as f:
                status.found.append(f"meta/{split}.txt: {sum(1 for line in f if line.strip())} images")
        if not _check_dirs(status, split):
            continue
        classes = [e for e in os.scandir(status.path / split) if e.is_dir()]
        status.found.append(f"{split}/: {len(classes)} class folders")
        if not classes and not meta.is_file():
            status.problem(f"no class folders in {status.path / split} and no {meta}")


def _check_places(status: DatasetStatus) -> None:
    images = status.path / PLACES_IMAGES
    have_images = _check_dirs(status, str(PLACES_IMAGES))
    for split in ("train", "val"):
        csv = status.path / "trainvalsplit_places205" / f"{split}_places205.csv"
        if not csv.is_file():
            status.problem(f"missing file {csv}")
            continue
        with open(csv) as f:
            rels = [line.rstrip("\n").rsplit(" ", 1)[0] for line in f if line.strip()]
        status.found.append(f"{csv.name}: {len(rels)} images")
        # a spot check: stat-ing all 2.4M listed files would take minutes on network storage
        missing = [r for r in rels[:5] + rels[-5:] if have_images and not (images / r).is_file()]
        if missing:
            status.problem(f"listed images missing under {images} (e.g. {missing[0]})")


def cityscapes_label_path(image: Path, image_dir: Path, label_dir: Path,
                          suffix: str = CITYSCAPES_TRAIN_IDS_SUFFIX) -> Path:
    """`gtFine/<split>/<city>/<stem><suffix>` for `leftImg8bit/<split>/<city>/<stem>_leftImg8bit.png`."""
    stem = image.name[: -len(CITYSCAPES_IMAGE_SUFFIX)]
    return label_dir / image.parent.relative_to(image_dir) / f"{stem}{suffix}"


def _check_inat(status: DatasetStatus) -> None:
    for split, name in INAT_ANNOTATIONS.items():
        ann = status.path / name
        if not ann.is_file():
            status.problem(f"missing file {ann}")
            continue
        with open(ann) as f:
            doc = json.load(f)
        files = [image["file_name"] for image in doc.get("images", [])]
        status.found.append(f"{name}: {len(files)} images, {len(doc.get('categories', []))} categories")
        # a spot check, as for Places205: stat-ing all 437k listed files takes minutes on network storage
        missing = [f for f in files[:5] + files[-5:] if not (status.path / f).is_file()]
        if missing:
            status.problem(f"{split} images listed in {name} missing under {status.path} (e.g. {missing[0]})")


def _check_cityscapes(status: DatasetStatus) -> None:
    for split in ("train", "val"):
        if not _check_dirs(status, f"leftImg8bit/{split}", f"gtFine/{split}"):
            continue
        image_dir, gt = status.path / "leftImg8bit" / split, status.path / "gtFine" / split
        images = sorted(image_dir.rglob(f"*{CITYSCAPES_IMAGE_SUFFIX}"))
        status.found.append(f"leftImg8bit/{split}: {len(images)} images")
        unlabelled = [image for image in images if not cityscapes_label_path(image, image_dir, gt).is_file()]
        if not images:
            status.problem(f"no *{CITYSCAPES_IMAGE_SUFFIX} images under {image_dir}")
        elif unlabelled:
            first = unlabelled[0]
            convertible = cityscapes_label_path(first, image_dir, gt, CITYSCAPES_LABEL_IDS_SUFFIX).is_file()
            hint = (f"; write them with `densecl-bench data cityscapes-trainids --root {status.path}`"
                    if convertible else "")
            status.problem(f"{len(unlabelled)} of {len(images)} {split} images have no *{CITYSCAPES_TRAIN_IDS_SUFFIX} "
                           f"(first: {cityscapes_label_path(first, image_dir, gt)}){hint}")


_CHECKS = {
    "voc07": _check_voc07,
    "voc12aug": _check_voc12aug,
    "coco2017": _check_coco,
    "imagenet": _check_imagenet,
    "places205": _check_places,
    "inat18": _check_inat,
    "cityscapes": _check_cityscapes,
}


def check_data_root(root: str | os.PathLike[str]) -> list[DatasetStatus]:
    """Check every dataset folder under `root`; a missing dataset is one problem, not an exception."""
    statuses = []
    for name, path in dataset_dirs(root).items():
        status = DatasetStatus(name, path)
        if path.is_dir():
            _CHECKS[name](status)
        else:
            status.problem(f"missing folder {path}")
        statuses.append(status)
    return statuses


def format_report(statuses: list[DatasetStatus]) -> str:
    """Human-readable report: one block per dataset, problems first, then the expected layout if broken."""
    blocks = []
    for s in statuses:
        lines = [f"[{'ok' if s.ok else 'MISSING' if not s.path.is_dir() else 'BROKEN'}] {s.name}: {s.path}"]
        lines += [f"  found {text}" for text in s.found]
        lines += [f"  problem: {text}" for text in s.problems]
        if not s.ok:
            lines.append("  expected layout:")
            lines += [f"    {line}" for line in LAYOUTS[s.name].splitlines()]
        blocks.append("\n".join(lines))
    return "\n".join(blocks)
