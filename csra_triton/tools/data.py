"""Multi-label datasets for ``predict``, ``val`` and ``train``: the official repository's annotation
files and the datasets' own formats, read into one form, with the official image transforms.

A dataset is a list of :class:`Sample` (an image path, a target vector, and for WIDER-Attribute a
person's box) with its class names and its evaluation rule (``metrics``): the official codes are
kept as they are, so that the official metrics apply unchanged:

* ``voc07`` test targets are ternary: 1 positive, -1 negative, 0 difficult (ignored by every
  metric); trainval targets binary, difficult counted negative (``utils/prepare/prepare_voc.py``);
* ``wider`` test targets mark an unspecified attribute 99 (ignored by AP, negative in P/R);
* ``coco`` and ``csv`` targets are binary.

Readers (each error a :class:`DataError` naming the file and the line or entry, nothing skipped
without saying so):

* :func:`read_official_json`: the JSON lists the official ``prepare_*.py`` write
  (``[{"img_path", "target", ["bbox"]}]``);
* :func:`read_voc`: ``VOCdevkit/VOC2007/{Annotations/*.xml, ImageSets/Main/<split>.txt,
  JPEGImages}``;
* :func:`read_coco`: COCO's ``instances_<split>.json`` and its image folder;
* :func:`read_csv`: ``path,label;label`` lines and a names file, for custom data.

Images are read with Pillow. The transforms are the official ones (torchvision's, on PIL images,
written here so that no torchvision is needed): training draws a horizontal flip and (except on
WIDER-Attribute, :func:`augmentation`) a resized crop of 70-100% of the area, then resizes to
``size`` x ``size``; evaluation resizes; pixels are scaled to [0, 1], or normalised to [-1, 1] on
WIDER-Attribute (:func:`scaling`: the official dataset class's rule, whatever the model). Each
sample's random draws come from its own generator, seeded by (seed, epoch, index): the same
whatever the rank or worker.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import torch

VOC_CLASSES = ("aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
               "sheep", "sofa", "train", "tvmonitor")
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich",
    "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush")
WIDER_CLASSES = ("Male", "longHair", "sunglass", "Hat", "Tshiirt", "longSleeve", "formal",
                 "shorts", "jeans", "longPants", "skirt", "faceMask", "logo", "stripe")
#: The official datasets' class names, in the order of their targets.
NAMES = {"voc07": VOC_CLASSES, "coco": COCO_CLASSES, "wider": WIDER_CLASSES}
#: The evaluation rule of each dataset kind (``metrics.RULES``).
RULE = {"voc07": "voc07", "coco": "plain", "wider": "wider", "csv": "plain"}


#: Pixel scalings: "unit" [0, 1]; "half" [-1, 1] (mean 0.5, std 0.5).
SCALES = ("unit", "half")
#: Training augmentations: "flip+crop" (the official default), "flip" (WIDER-Attribute's).
AUGMENTATIONS = ("flip+crop", "flip")


def scaling(data: "Dataset") -> str:
    """The pixel scaling the official training and evaluation use for a dataset: [-1, 1] for
    WIDER-Attribute, [0, 1] for every other (``pipeline/dataset.py``)."""
    return "half" if data.kind == "wider" else "unit"


def augmentation(data: "Dataset") -> str:
    """The official training augmentation of a dataset: a flip alone on WIDER-Attribute, else a
    flip and a resized crop (``main.py``)."""
    return "flip" if data.kind == "wider" else "flip+crop"


def lr_step(data: "Dataset") -> int:
    """Epochs between the official learning-rate steps: 4 on VOC2007, 5 on COCO, WIDER and
    other data (``main.py``)."""
    return 4 if data.kind == "voc07" else 5


class DataError(ValueError):
    """A dataset that cannot be read as given: the message names the file and the line or the
    entry, and says what was expected."""


@dataclasses.dataclass(frozen=True)
class Sample:
    path: str                          #: the image file
    target: tuple                      #: one code per class (see the module docstring)
    bbox: tuple | None = None          #: (x, y, w, h) of the region to crop (WIDER's person)


@dataclasses.dataclass
class Dataset:
    samples: list                      #: :class:`Sample` list
    names: tuple                       #: class names, in the targets' order
    rule: str                          #: the evaluation rule: "voc07", "wider" or "plain"
    source: str                        #: what was read (for reports)
    notes: list = dataclasses.field(default_factory=list)  #: what a reader left out, and why
    kind: str = "csv"                  #: "voc07", "coco", "wider" or "csv" (custom data)

    def targets(self) -> torch.Tensor:
        """(n, C) float64: the targets as coded (the metrics read them so)."""
        return torch.tensor([s.target for s in self.samples], dtype=torch.float64)

    def train_targets(self) -> torch.Tensor:
        """(n, C) float32 binary: what the loss trains on, as the official trainval files hold
        them (a difficult or unspecified label counted negative)."""
        t = self.targets()
        return (t == 1).float()


def _check_image(path: str, where: str, relative_to: str | None = None) -> str:
    if not os.path.isfile(path):
        hint = (f" (relative paths start at {relative_to}; --image-root DIR sets where)"
                if relative_to else "")
        raise DataError(f"{where}: image {path!r} does not exist{hint}")
    return path


def _read_json(path: Path):
    """An annotation file's JSON; a DataError naming the line and column where it is broken."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such annotation file") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}, column {exc.colno}: not valid JSON "
                        f"({exc.msg})") from None


def _nonempty(samples: list, where) -> list:
    if not samples:
        raise DataError(f"{where}: no samples")
    return samples


def read_official_json(path: str | Path, kind: str, image_root: str | None = None) -> Dataset:
    """One of the official JSON files (``kind``: voc07, coco or wider), its ``img_path``s taken
    as given, or relative to ``image_root`` (or the file's folder) where they are relative."""
    path = Path(path)
    if kind not in NAMES:
        raise DataError(f"--dataset: expected one of {', '.join(NAMES)}, got {kind!r}")
    names = NAMES[kind]
    doc = _read_json(path)
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a JSON list of {{'img_path', 'target'}} entries, got "
                        f"a {type(doc).__name__}")
    root = Path(image_root) if image_root else path.parent
    samples = []
    for i, e in enumerate(doc):
        where = f"{path}, entry {i}"
        if not isinstance(e, dict) or not isinstance(e.get("img_path"), str) or \
                not isinstance(e.get("target"), list):
            raise DataError(f"{where}: expected {{'img_path': str, 'target': [...]}}, got {e!r}"
                            [:300])
        target = e["target"]
        if len(target) != len(names) or not all(isinstance(v, (int, float)) for v in target):
            raise DataError(f"{where}: expected a target of {len(names)} numbers ({kind}), got "
                            f"{target!r}"[:300])
        allowed = {"voc07": {-1, 0, 1}, "coco": {0, 1}, "wider": {0, 1, 99}}[kind]
        bad = sorted({v for v in target} - allowed)
        if bad:
            raise DataError(f"{where}: target values {bad} are not {kind}'s codes "
                            f"{sorted(allowed)}")
        bbox = e.get("bbox")
        if kind == "wider" and not (isinstance(bbox, list) and len(bbox) == 4 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                for v in bbox) and bbox[2] > 0 and bbox[3] > 0):
            raise DataError(f"{where}: a WIDER-Attribute entry needs a 'bbox' [x, y, w, h] of "
                            f"numbers with w, h > 0, got {bbox!r}"[:300])
        relative = not os.path.isabs(e["img_path"])
        img = str(root / e["img_path"]) if relative else e["img_path"]
        samples.append(Sample(_check_image(img, where, str(root) if relative else None),
                              tuple(int(v) for v in target), tuple(bbox) if bbox else None))
    data = Dataset(_nonempty(samples, path), names, RULE[kind], str(path), kind=kind)
    if kind == "voc07" and not any(-1 in s.target for s in samples):
        # a trainval file: binary, difficult already counted negative (prepare_voc.py)
        data.rule = "plain"
        data.notes.append("no -1 in the targets: a binary (trainval) file, 0 read as negative")
    return data


def _voc_root(root: Path) -> Path:
    for cand in (root, root / "VOC2007", root / "VOCdevkit" / "VOC2007"):
        if (cand / "Annotations").is_dir():
            return cand
    raise DataError(f"{root}: no VOC2007 folder with Annotations/ (give VOCdevkit or VOC2007)")


def read_voc(root: str | Path, split: str = "test") -> Dataset:
    """VOC2007 from its own files: ``ImageSets/Main/<split>.txt`` names the images, each
    ``Annotations/<id>.xml`` their objects. Targets as ``prepare_voc.py`` writes them: per class
    1 if an object is not difficult, 0 if every one is difficult, -1 if none; binary for any
    split but ``test`` (difficult counted negative)."""
    base = _voc_root(Path(root))
    ids_file = base / "ImageSets" / "Main" / f"{split}.txt"
    if not ids_file.is_file():
        raise DataError(f"{ids_file}: no such split file (ImageSets/Main/{split}.txt)")
    index = {c: i for i, c in enumerate(VOC_CLASSES)}
    samples = []
    for line_no, line in enumerate(ids_file.read_text().splitlines(), 1):
        image_id = line.strip()
        if not image_id:
            continue
        xml_path = base / "Annotations" / f"{image_id}.xml"
        if not xml_path.is_file():
            raise DataError(f"{ids_file}, line {line_no}: no annotation {xml_path}")
        text = xml_path.read_text()
        try:
            tree = ET.fromstring(text)
        except ET.ParseError as exc:
            raise DataError(f"{xml_path}, line {exc.position[0]}: malformed XML ({exc})") from None
        target = [-1] * len(VOC_CLASSES)
        seen: dict = {}
        for obj in tree.iter("object"):
            name = (obj.findtext("name") or "").strip()
            if name not in index:
                at = next((n for n, t in enumerate(text.splitlines(), 1)
                           if re.search(rf"<name>\s*{re.escape(name)}\s*</name>", t)), "?")
                raise DataError(f"{xml_path}, line {at}: unknown class {name!r} (VOC's are "
                                f"{', '.join(VOC_CLASSES)})")
            seen.setdefault(index[name], []).append((obj.findtext("difficult") or "0").strip()
                                                    == "1")
        for c, difficult in seen.items():
            target[c] = 0 if all(difficult) else 1
        if split != "test":
            target = [1 if t == 1 else 0 for t in target]
        img = _check_image(str(base / "JPEGImages" / f"{image_id}.jpg"),
                           f"{ids_file}, line {line_no}")
        samples.append(Sample(img, tuple(target)))
    return Dataset(_nonempty(samples, ids_file), VOC_CLASSES,
                   "voc07" if split == "test" else "plain", f"{base} ({split})", kind="voc07")


def read_coco(annotations: str | Path, images: str | Path) -> Dataset:
    """COCO's ``instances_<split>.json``: categories in id order are the classes (their names
    from the file), an image's annotations its positives; images without annotations are left
    out, as ``prepare_coco.py`` does (the dataset's notes count them)."""
    path = Path(annotations)
    doc = _read_json(path)
    for key in ("images", "annotations", "categories"):
        if not isinstance(doc.get(key) if isinstance(doc, dict) else None, list):
            raise DataError(f"{path}: expected COCO instances with an {key!r} list")
    for key, fields in (("categories", ("id", "name")),
                        ("annotations", ("image_id", "category_id")),
                        ("images", ("id", "file_name"))):
        for i, e in enumerate(doc[key]):
            if not isinstance(e, dict) or any(f not in e for f in fields) or any(
                    isinstance(e[f], bool) or not isinstance(e[f], int)
                    for f in fields if f.endswith("id")):
                raise DataError(f"{path}, {key}[{i}]: expected an entry with "
                                f"{', '.join(fields)} (ids integers), got {e!r}"[:300])
    cats = sorted(doc["categories"], key=lambda c: c["id"])
    index = {c["id"]: i for i, c in enumerate(cats)}
    labels: dict = {}
    for i, a in enumerate(doc["annotations"]):
        if a["category_id"] not in index:
            raise DataError(f"{path}, annotations[{i}]: unknown category_id "
                            f"{a['category_id']!r}")
        labels.setdefault(a["image_id"], set()).add(index[a["category_id"]])
    samples, empty = [], 0
    for i, img in enumerate(sorted(doc["images"], key=lambda m: m["id"])):
        if img["id"] not in labels:
            empty += 1
            continue
        target = tuple(1 if c in labels[img["id"]] else 0 for c in range(len(cats)))
        file = _check_image(str(Path(images) / img["file_name"]), f"{path}, images[{i}]")
        samples.append(Sample(file, target))
    data = Dataset(_nonempty(samples, path), tuple(c["name"] for c in cats), "plain", str(path),
                   kind="coco")
    if empty:
        data.notes.append(f"{empty} images without annotations left out (as the official "
                          f"preparation does)")
    return data


def read_names(path: str | Path) -> tuple:
    """Class names, one per line (blank lines and ``#`` comments skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such names file")
    names = [n.strip() for n in path.read_text().splitlines()
             if n.strip() and not n.strip().startswith("#")]
    if len(set(names)) != len(names):
        raise DataError(f"{path}: class names repeat")
    if not names:
        raise DataError(f"{path}: no class names")
    return tuple(names)


def read_csv(path: str | Path, names, image_root: str | None = None) -> Dataset:
    """``path,labels`` lines (``labels``: class names separated by ``;``, possibly none; a first
    line ``path,labels`` is a header), image paths relative to ``image_root`` or the file's
    folder; ``names`` the class names (a sequence, or a names file)."""
    path = Path(path)
    names = tuple(names) if not isinstance(names, (str, Path)) else read_names(names)
    index = {n: i for i, n in enumerate(names)}
    root = Path(image_root) if image_root else path.parent
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    samples = []
    with path.open(newline="") as f:
        for line_no, row in enumerate(csv.reader(f), 1):
            if not row or (line_no == 1 and [c.strip() for c in row] == ["path", "labels"]):
                continue
            if len(row) != 2:
                raise DataError(f"{path}, line {line_no}: expected 'path,label;label', got "
                                f"{','.join(row)!r}")
            target = [0] * len(names)
            for label in filter(None, (v.strip() for v in row[1].split(";"))):
                if label not in index:
                    raise DataError(f"{path}, line {line_no}: unknown class {label!r}")
                target[index[label]] = 1
            img = row[0].strip()
            relative = not os.path.isabs(img)
            img = str(root / img) if relative else img
            samples.append(Sample(_check_image(img, f"{path}, line {line_no}",
                                               str(root) if relative else None), tuple(target)))
    if not samples:
        raise DataError(f"{path}: no samples")
    return Dataset(samples, names, "plain", str(path))


# --------------------------------------------------------------------------- images


def load_image(sample: Sample):
    """The sample's image (RGB), cropped to its box where it has one."""
    from PIL import Image

    try:
        img = Image.open(sample.path).convert("RGB")
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise DataError(f"{sample.path}: not an image Pillow can read "
                        f"({type(exc).__name__}: {exc})") from None
    if sample.bbox is not None:
        x, y, w, h = sample.bbox
        img = img.crop((x, y, x + w, y + h))
    return img


def _resized_crop_box(width: int, height: int, gen: torch.Generator,
                      scale=(0.7, 1.0), ratio=(3 / 4, 4 / 3)) -> tuple:
    """(left, top, w, h) of a random crop of ``scale`` of the area and aspect in ``ratio``,
    drawn as torchvision's ``RandomResizedCrop.get_params`` draws it (ten tries, else the
    central crop of the nearest allowed aspect)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * torch.empty(1).uniform_(scale[0], scale[1], generator=gen).item()
        aspect = math.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=gen).item())
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=gen).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=gen).item())
            return left, top, w, h
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def to_tensor(img, size: int, normalize: str) -> torch.Tensor:
    """A PIL image resized to (size, size) (bilinear) as a (3, size, size) float tensor in
    [0, 1] (``normalize="unit"``) or [-1, 1] (``"half"``: mean 0.5, std 0.5)."""
    from PIL import Image

    import numpy as np

    img = img.resize((size, size), Image.BILINEAR)
    t = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return (t - 0.5) / 0.5 if normalize == "half" else t


def transform(img, size: int, normalize: str, train: bool, gen: torch.Generator | None = None,
              augment: str = "flip+crop"):
    """The official transforms: for training a horizontal flip (p = 1/2) and, with ``augment``
    "flip+crop", a resized crop of 70-100% of the area, then the resize; for evaluation the
    resize."""
    from PIL import Image

    if train:
        if torch.rand(1, generator=gen).item() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if train and augment == "flip+crop":
        left, top, w, h = _resized_crop_box(img.width, img.height, gen)
        img = img.crop((left, top, left + w, top + h))
    return to_tensor(img, size, normalize)


class ImageDataset(torch.utils.data.Dataset):
    """(image tensor, binary target, index) per sample, for a DataLoader. ``epoch`` (set before
    each epoch) and ``seed`` seed each sample's draws."""

    def __init__(self, data: Dataset, size: int, normalize: str, train: bool, seed: int = 0,
                 augment: str = "flip+crop"):
        self.data, self.size, self.normalize, self.train = data, size, normalize, train
        self.seed, self.epoch, self.augment = seed, 0, augment
        self.targets = data.train_targets()

    def __len__(self) -> int:
        return len(self.data.samples)

    def __getitem__(self, i: int):
        gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) % (2 ** 63))
        img = transform(load_image(self.data.samples[i]), self.size, self.normalize,
                        self.train, gen, self.augment)
        return img, self.targets[i], i


class TensorImages(torch.utils.data.Dataset):
    """In-memory images (the synthetic shapes) with the same interface: a flip drawn per sample
    from its own generator when training."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, train: bool, seed: int = 0):
        self.images, self.targets, self.train = images, targets, train
        self.seed, self.epoch = seed, 0

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = self.images[i]
        if self.train:
            gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) % (2 ** 63))
            if torch.rand(1, generator=gen).item() < 0.5:
                img = img.flip(-1)
        return img, self.targets[i], i


def read_data(path: str | Path, dataset: str | None = None, images: str | None = None,
              names=None, split: str = "test", image_root: str | None = None) -> Dataset:
    """A dataset from ``path``, its format told by what it is: a folder (VOC's own files, the
    ``split`` of ``ImageSets/Main``), a ``.csv`` (custom data; ``names`` needed), or a ``.json``:
    an official annotation list (``dataset`` needed: voc07, coco or wider) or COCO's instances
    (``images``: the image folder)."""
    p = Path(path)
    if p.is_dir():
        return read_voc(p, split)
    if p.suffix.lower() == ".csv":
        if names is None:
            raise DataError(f"{p}: a CSV dataset needs its class names (--names FILE)")
        return read_csv(p, names, image_root)
    if p.suffix.lower() == ".json":
        try:
            head = p.read_text()[:4096].lstrip()
        except FileNotFoundError:
            raise DataError(f"{p}: no such annotation file") from None
        if head.startswith("{"):
            if images is None:
                raise DataError(f"{p}: COCO instances need their image folder (--images DIR)")
            return read_coco(p, images)
        if dataset is None:
            raise DataError(f"{p}: an official annotation file needs --dataset voc07, coco or "
                            f"wider (its targets' codes)")
        return read_official_json(p, dataset, image_root)
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    raise DataError(f"{p}: expected a VOC folder, a .csv or a .json file")
