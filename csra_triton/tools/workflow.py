"""The official repository's three scripts on csra-triton's head: ``predict`` (``demo.py``),
``val`` (``val.py``) and ``train`` (``main.py``, its recipe as the defaults).

Models (``--model``): ``resnet18``-``resnet152`` (torchvision, ``models.ResNetCSRA``: the
official ``ResNet_CSRA``), ``vit_b16_224`` / ``vit_l16_224`` (timm, the official ``VIT_*_CSRA``),
and ``synthetic`` (``demo``'s small CNN, which ``train`` runs without a dataset). A checkpoint is
either one ``train`` wrote (:data:`FORMAT`: the model's configuration, class names and weights,
plus the optimizer's, schedulers' and log's state) or an official one (a full model's state dict:
its architecture read from its keys, ``models.load_official_model``).

The official recipe (``main.py``): an ImageNet-pretrained backbone (torchvision's original
ResNet weights; timm's for ViTs), SGD, momentum 0.9, weight decay 1e-4, learning rate 0.01 for
the backbone and 10x for the classifier, a linear warm-up over the first 2 epochs (per step, from
0), then x0.1 every 4 (VOC) or 5 epochs, 30 epochs, batch 16, 448 x 448 images with a random
horizontal flip and resized crop (the flip alone on WIDER-Attribute), pixels scaled to [0, 1]
([-1, 1] on WIDER-Attribute). ``train`` adds bf16 autocast on GPUs (``--amp none``: the official
fp32), ``torch.compile``, ``torchrun`` data parallelism (PyTorch's DistributedDataParallel;
``--batch`` is the global batch, split over the ranks), resumable checkpoints, the best
checkpoint also in the official layout, and a log and plot of loss, learning rate and mAP per
epoch. Pixel scaling: ``val`` and ``train`` scale as the official training does for the data
(``data.scaling``); ``predict`` as the official ``demo.py`` does for the model ([-1, 1] for
ViTs); a checkpoint ``train`` wrote carries its own; ``--scale`` overrides.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from .. import ops
from ..module import CSRATriton
from . import data as data_
from . import metrics
from .progress import progress

#: The checkpoint ``train`` writes: {"format": FORMAT, "config", "names", "model", ...}.
FORMAT = "csra-triton/train-1"
MODELS = ("synthetic", "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
          "vit_b16_224", "vit_l16_224")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


class SyntheticCSRA(nn.Module):
    """``demo``'s small CNN trunk with the head as ``classifier`` (the official models' naming:
    the classifier's parameters are the ones with 10x the learning rate)."""

    def __init__(self, num_heads: int, lam: float, num_classes: int, width: int = 64):
        super().__init__()
        from . import demo

        self.backbone = demo.trunk(width)
        self.classifier = CSRATriton(width, num_classes, num_heads, lam)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.backbone(x))


def build_model(config: dict) -> nn.Module:
    """The model a configuration names (``model``, ``heads``, ``lam``, ``classes``)."""
    name, heads, lam, classes = (config[k] for k in ("model", "heads", "lam", "classes"))
    if name == "synthetic":
        return SyntheticCSRA(heads, lam, classes)
    from .. import models

    if name.startswith("resnet"):
        return models.ResNetCSRA(heads, lam, classes, depth=int(name[len("resnet"):]))
    if name == "vit_b16_224":
        return models.vit_b16_224_csra(cls_num_heads=heads, num_classes=classes, lam=lam)
    if name == "vit_l16_224":
        return models.vit_l16_224_csra(cls_num_heads=heads, num_classes=classes, lam=lam)
    raise ValueError(f"--model: expected one of {', '.join(MODELS)}, got {name!r}")


def family(model_name: str) -> dict:
    """Input size and pixel scaling of a model family, as the official ``demo.py`` uses them."""
    if model_name.startswith("vit"):
        return dict(img_size=224, normalize="half")
    if model_name == "synthetic":
        return dict(img_size=32, normalize="unit")
    return dict(img_size=448, normalize="unit")


def _head(model: nn.Module) -> CSRATriton:
    return unwrap(model).classifier


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel and torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def load_checkpoint(path: str, lam: float | None = None, device="cpu") -> tuple:
    """(model in eval mode, info: model name, image size, scaling, class names or None) of a
    checkpoint ``train`` wrote or of an official one."""
    ckpt = _load(path, "checkpoint")
    if isinstance(ckpt, dict) and ckpt.get("format") == FORMAT:
        config = dict(ckpt["config"])
        if lam is not None:
            config["lam"] = lam
        model = build_model(config)
        model.load_state_dict(ckpt["model"])
        info = dict(family(config["model"]), model=config["model"], names=ckpt.get("names"),
                    img_size=config.get("img_size") or family(config["model"])["img_size"],
                    scale=config.get("scale"))
    else:
        from .. import models

        arch = models.describe_official(ckpt)
        if lam is None:
            print(f"note: an official checkpoint does not store lam; using the official "
                  f"default {models.DEFAULT_LAM[arch['family']]} (the released COCO models were "
                  f"trained with other values: give --lam as trained)")
        model = models.load_official_model(ckpt, lam=lam)
        name = (f"resnet{arch['depth']}" if arch["family"] == "resnet" else "vit")
        info = dict(model=name, names=None, img_size=arch.get("img_size", 448),
                    normalize="half" if arch["family"] == "vit" else "unit", scale=None)
    return model.to(device).eval(), info


def _load(path: str, what: str):
    """A checkpoint file's contents, loaded with ``weights_only`` (tensors, numbers, strings,
    lists and dicts: no code runs from the file)."""
    if not os.path.isfile(path):
        raise SystemExit(f"{what}: {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - pickle errors of many kinds
        raise SystemExit(f"{what}: {path} is not a checkpoint torch.load reads with "
                         f"weights_only=True ({type(exc).__name__}: {str(exc)[:200]})") from None


def class_names(info: dict, classes: int, dataset: str | None, names_file: str | None) -> tuple:
    """The class names: a names file, a dataset's (voc07, coco, wider), the checkpoint's, or for
    20, 80 or 14 classes the official datasets' (VOC, COCO, WIDER-Attribute), else indices."""
    if names_file:
        names = data_.read_names(names_file)
    elif dataset:
        names = data_.NAMES[dataset]
    elif info.get("names"):
        names = tuple(info["names"])
    else:
        by_count = {len(v): v for v in data_.NAMES.values()}
        names = by_count.get(classes, tuple(str(c) for c in range(classes)))
    if len(names) != classes:
        raise SystemExit(f"class names: {len(names)} given, the model has {classes} classes")
    return tuple(names)


def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _backend(device: torch.device):
    """CPU tensors run the PyTorch fallback, even where TRITON_INTERPRET is set."""
    return ops.use_backend("torch" if device.type == "cpu" else "auto")


# --------------------------------------------------------------------------- predict


def _image_files(items) -> list:
    files = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            files += sorted(str(f) for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            files.append(str(p))
        else:
            raise SystemExit(f"images: {item} is neither an image file nor a folder")
    if not files:
        raise SystemExit("images: no image files found")
    return files


def predict(args) -> int:
    """``predict CHECKPOINT IMAGES...``: the classes above the threshold with their scores."""
    device = _device(args.device)
    model, info = load_checkpoint(args.checkpoint, args.lam, device)
    head = _head(model)
    names = class_names(info, head.classes, args.dataset, args.names)
    size = args.img_size or info["img_size"]
    scale = args.scale or info["scale"] or info["normalize"]    # (demo.py: by the model)
    files = _image_files(args.images)
    results = []
    maps_dir = Path(args.maps) if args.maps else None
    for i in progress(range(0, len(files), args.batch), "predict", unit="batch"):
        batch = files[i:i + args.batch]
        x = torch.stack([data_.to_tensor(data_.load_image(data_.Sample(f, ())), size, scale)
                         for f in batch]).to(device)
        with torch.no_grad(), _backend(device):
            logits = model(x)
            scores = torch.sigmoid(logits.float()).cpu()
        for f, s in zip(batch, scores):
            found = [(names[c], float(s[c])) for c in s.argsort(descending=True).tolist()
                     if s[c] > args.threshold]
            results.append(dict(image=f, classes=[dict(name=n, score=v) for n, v in found]))
            shown = ", ".join(f"{n} ({v:.3f})" for n, v in found) or "(none above threshold)"
            print(f"{f}: {shown}")
        if maps_dir is not None:
            _save_maps(model, x, logits, batch, names, maps_dir, scale, device)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(checkpoint=args.checkpoint,
                                                    threshold=args.threshold,
                                                    results=results), indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


def _save_maps(model, x, logits, files, names, folder: Path, normalize: str, device) -> None:
    """Head 0's attention for the top-3 classes of each image, overlaid (tools.viz)."""
    from . import viz

    m = unwrap(model)
    with torch.no_grad(), _backend(device):
        feats = (m.backbone(x) if not hasattr(m, "forward_features") else None)
        if feats is None:        # a ViT: its patch tokens as a (B, d, h, w) grid
            tokens = m.backbone(x)
            side = int(round(math.sqrt(tokens.shape[1])))
            feats = tokens.transpose(1, 2).reshape(x.shape[0], -1, side, side)
        amaps = m.classifier.attention_maps(feats)[:, 0]             # (B, C, h, w)
    images = x.cpu() * 0.5 + 0.5 if normalize == "half" else x.cpu()
    folder.mkdir(parents=True, exist_ok=True)
    for j, f in enumerate(files):
        viz.topk_grid(images[j:j + 1], logits[j:j + 1].cpu(), amaps[j:j + 1].cpu(), names,
                      folder / (Path(f).stem + "_maps.png"), k=3,
                      title=f"{Path(f).name}: head 0 attention")


# --------------------------------------------------------------------------- val


def read_dataset(path: str, args, split: str = "test", images: str | None = None):
    """``data.read_data`` of ``path`` with the command's ``--dataset``, ``--names`` and
    ``--image-root``; a DataError ends the command with its message."""
    try:
        return data_.read_data(path, args.dataset, images, args.names, split, args.image_root)
    except data_.DataError as exc:
        raise SystemExit(f"data: {exc}") from None


def scores_of(model: nn.Module, loader, device, world: int = 1) -> Tensor:
    """Sigmoid scores (n, C), float32 as the official evaluation computes them (no autocast), in
    the dataset's order; with ``world`` > 1 each rank scores its share (the loader's
    DistributedSampler) and every rank returns all of them."""
    out = {}
    model.eval()
    with torch.no_grad(), _backend(device):
        for x, _, idx in progress(loader, "evaluate", unit="batch"):
            logits = model(x.to(device))
            for i, s in zip(idx.tolist(), torch.sigmoid(logits.float()).cpu()):
                out[i] = s
    if world > 1:
        import torch.distributed as dist

        parts = [None] * world
        dist.all_gather_object(parts, out)
        for part in parts:
            out.update(part)
    return torch.stack([out[i] for i in range(len(out))])


def val(args) -> int:
    """``val CHECKPOINT --ann/--voc/--coco/--csv ...``: the official metrics, per-class AP, a
    JSON report."""
    device = _device(args.device)
    model, info = load_checkpoint(args.checkpoint, args.lam, device)
    dataset = read_dataset(args.data, args, args.split, args.images_dir)
    head = _head(model)
    if len(dataset.names) != head.classes:
        raise SystemExit(f"data: {len(dataset.names)} classes, the model has {head.classes}")
    for note in dataset.notes:
        print(f"note: {note}")
    size = args.img_size or info["img_size"]
    scale = args.scale or info["scale"] or data_.scaling(dataset)  # (val.py: by the data)
    loader = torch.utils.data.DataLoader(
        data_.ImageDataset(dataset, size, scale, train=False),
        batch_size=args.batch, shuffle=False, num_workers=args.workers)
    scores = scores_of(model, loader, device)
    report = metrics.evaluate(scores.double().numpy(), dataset.targets().numpy(), dataset.rule,
                              dataset.names)
    report.update(checkpoint=args.checkpoint, data=dataset.source, notes=dataset.notes)
    print(metrics.table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


# --------------------------------------------------------------------------- train


@contextlib.contextmanager
def _autocast(device: torch.device, amp: str):
    if amp == "none":
        yield
        return
    with torch.autocast(device.type, dtype=getattr(torch, amp)):
        yield


def _distributed(device_arg: str | None) -> tuple:
    """(rank, world size, device): from torchrun's environment (a process group of its
    ranks: NCCL on GPUs, gloo on CPUs), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, _device(device_arg)
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device_arg != "cpu"
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), world, torch.device(f"cuda:{local}" if cuda else "cpu")


def official_state_dict(model: nn.Module) -> dict:
    """The model's state dict in the official layout: the head as
    ``classifier.multi_head.{k}.head.weight`` (C, d, 1, 1), loadable by the official code and
    by ``models.load_official_model``."""
    m = unwrap(model)
    sd = {k: v for k, v in m.state_dict().items() if not k.startswith("classifier.")}
    sd.update(m.classifier.to_official_state_dict(prefix="classifier."))
    if isinstance(m.classifier.lam, Tensor):
        sd["classifier.lam"] = m.classifier.lam.detach().clone()
    return sd


def _read_train_data(args) -> tuple:
    """(train Dataset, val Dataset or None, class names): ``--train`` and ``--val`` read as
    ``val`` reads its data; (None, None, the synthetic shapes' names) without ``--train``."""
    if not args.train:
        from . import demo

        return None, None, demo.CLASSES
    train = read_dataset(args.train, args, "trainval", args.images_dir)
    val = (read_dataset(args.val, args, "test", args.val_images or args.images_dir)
           if args.val else None)
    for note in train.notes + (val.notes if val else []):
        print(f"note: {note}")
    if val is not None and val.names != train.names:
        raise SystemExit("data: --train and --val name different classes")
    return train, val, train.names


def _train_config(args, train: data_.Dataset | None, classes: int) -> dict:
    """The run's configuration: the flags given, the official recipe's value for the data where
    a flag is not (the pixel scaling, the augmentation, the learning-rate step)."""
    model_name = args.model or ("resnet101" if args.train else "synthetic")
    fam = family(model_name)
    return dict(model=model_name, heads=args.heads, lam=args.lam,
                img_size=args.img_size or fam["img_size"], classes=classes, seed=args.seed,
                scale=args.scale or (data_.scaling(train) if train else fam["normalize"]),
                augment=args.aug or (data_.augmentation(train) if train else "flip"),
                step=args.step or (data_.lr_step(train) if train else 5))


def _train_sets(cfg: dict, train: data_.Dataset | None, val: data_.Dataset | None,
                args) -> tuple:
    """(train set, val set or None, the val Dataset or None) for the DataLoaders: the images
    at the configuration's size and scaling, or the synthetic shapes."""
    if train is not None:
        size, scale = cfg["img_size"], cfg["scale"]
        return (data_.ImageDataset(train, size, scale, True, cfg["seed"], cfg["augment"]),
                None if val is None else data_.ImageDataset(val, size, scale, False), val)
    from . import demo

    tr = demo.make_shapes(args.synthetic_train, seed=cfg["seed"])
    te = demo.make_shapes(args.synthetic_val, seed=cfg["seed"] + 1)
    ev = data_.Dataset([data_.Sample("", tuple(int(v) for v in t)) for t in te.labels.tolist()],
                       demo.CLASSES, "plain", "synthetic shapes (held out)")
    return (data_.TensorImages(tr.images, tr.labels, True, cfg["seed"]),
            data_.TensorImages(te.images, te.labels, False), ev)


def train(args) -> int:
    """``train``: the official recipe (every default overridable) on our head; see the module
    docstring. ``--resume`` continues a run with the configuration it was started with."""
    rank, world, device = _distributed(args.device)
    if args.batch % world:
        raise SystemExit(f"--batch: the global batch {args.batch} does not split over {world} "
                         f"ranks")
    out = Path(args.out)
    resume = _load(args.resume, "--resume") if args.resume else None
    if resume is not None and not (isinstance(resume, dict) and resume.get("format") == FORMAT):
        raise SystemExit(f"--resume: {args.resume} is not a checkpoint train wrote")
    train_data, val_data, names = _read_train_data(args)
    if resume is None:
        cfg = _train_config(args, train_data, len(names))
    else:
        cfg = {**_train_config(args, train_data, len(names)), **resume["config"]}
        if cfg["classes"] != len(names):
            raise SystemExit(f"--resume: the checkpoint has {cfg['classes']} classes, the data "
                             f"{len(names)}")
        if rank == 0:
            print(f"resume: {args.resume} at epoch {resume['epoch']}, with its configuration "
                  f"({', '.join(f'{k} {v}' for k, v in cfg.items())})")
    train_set, val_set, val_data = _train_sets(cfg, train_data, val_data, args)
    torch.manual_seed(cfg["seed"])
    model = build_model(cfg)
    if resume is None:
        _load_pretrained(model, args.pretrained or "auto", cfg["model"])
    model.to(device)
    if args.bn == "sync":
        if device.type != "cuda":
            raise SystemExit("--bn sync: SyncBatchNorm needs CUDA; on CPU ranks use --bn frozen")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    backbone = [p for n, p in model.named_parameters() if "classifier" not in n]
    classifier = [p for n, p in model.named_parameters() if "classifier" in n]
    opt = torch.optim.SGD([{"params": backbone, "lr": args.lr},
                           {"params": classifier, "lr": args.lr * args.head_lr_mult}],
                          momentum=args.momentum, weight_decay=args.weight_decay)
    sampler = torch.utils.data.DistributedSampler(train_set, num_replicas=world, rank=rank,
                                                  shuffle=True, seed=cfg["seed"])
    loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch // world,
                                         sampler=sampler, num_workers=args.workers)
    step_lr = torch.optim.lr_scheduler.StepLR(opt, step_size=cfg["step"], gamma=args.gamma)
    # the official WarmUpLR: from 0 at the first step to the base rate over the warm-up epochs
    warm_iters = args.warmup * len(loader)
    warmup = (torch.optim.lr_scheduler.LambdaLR(opt, lambda it: min(1.0, it / warm_iters))
              if warm_iters > 0 else None)
    start, best, log = 1, -math.inf, []
    if resume is not None:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        step_lr.load_state_dict(resume["step_lr"])
        if warmup is not None:
            warmup.load_state_dict(resume["warmup"])
        start, best, log = resume["epoch"] + 1, resume["best_map"], resume["log"]
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        net = torch.compile(net)
    amp = args.amp or ("bfloat16" if device.type == "cuda" else "none")
    loss_fn = nn.BCEWithLogitsLoss()
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"train: {cfg['model']} ({cfg['heads']} heads, lam {cfg['lam']}, {cfg['classes']} "
              f"classes, {cfg['img_size']}px) on {len(train_set)} images, {world} rank(s) on "
              f"{device}, global batch {args.batch}, amp {amp}, epochs {start}..{args.epochs}")
    for epoch in range(start, args.epochs + 1):
        sampler.set_epoch(epoch)
        train_set.epoch = epoch
        net.train()
        if args.bn == "frozen":
            for m in net.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        t0, total, seen, lr = time.monotonic(), 0.0, 0, opt.param_groups[0]["lr"]
        with _backend(device):
            for x, y, _ in progress(loader, f"epoch {epoch}", unit="batch") if rank == 0 \
                    else loader:
                x, y = x.to(device), y.to(device)
                with _autocast(device, amp):
                    logits = net(x)
                loss = loss_fn(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                lr = opt.param_groups[0]["lr"]  # (the log reports the epoch's last step's)
                opt.step()
                if warmup is not None and epoch <= args.warmup:
                    warmup.step()
                total += loss.item() * len(x)
                seen += len(x)
        step_lr.step()
        if world > 1:                           # the loss over every rank's samples
            import torch.distributed as dist

            sums = torch.tensor([total, float(seen)], dtype=torch.float64, device=device)
            dist.all_reduce(sums)
            total, seen = sums.tolist()
        entry = dict(epoch=epoch, loss=total / max(seen, 1), lr=lr,
                     seconds=time.monotonic() - t0)
        if val_set is not None:                 # every rank scores its share, in fp32
            vsampler = torch.utils.data.DistributedSampler(val_set, num_replicas=world,
                                                           rank=rank, shuffle=False)
            vloader = torch.utils.data.DataLoader(val_set, batch_size=args.batch // world,
                                                  sampler=vsampler, num_workers=args.workers)
            scores = scores_of(model, vloader, device, world)
            report = metrics.evaluate(scores.double().numpy(), val_data.targets().numpy(),
                                      val_data.rule, names)
            entry.update({k: report[k] for k in ("mAP", "CP", "CR", "CF1", "OP", "OR", "OF1")})
        log.append(entry)
        if rank == 0:
            improved = entry.get("mAP", -math.inf) > best
            best = max(best, entry.get("mAP", -math.inf))
            state = dict(format=FORMAT, config=cfg, names=list(names), model=model.state_dict(),
                         optimizer=opt.state_dict(), step_lr=step_lr.state_dict(),
                         warmup=warmup.state_dict() if warmup is not None else None,
                         epoch=epoch, best_map=best, log=log)
            _save(state, out / "last.pt")
            if improved or val_set is None:
                _save(state, out / "best.pt")
                _save(official_state_dict(model), out / "best_official.pth")
            with (out / "log.jsonl").open("a") as f:
                f.write(json.dumps(entry) + "\n")
            shown = ", ".join(f"{k} {v:.4g}" for k, v in entry.items() if k != "epoch")
            print(f"epoch {epoch}: {shown}", flush=True)
    if rank == 0 and log:
        _plot(log, out / "curves.png")
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return 0


def _save(obj, path: Path) -> None:
    """Written to a temporary file and renamed: a crash never leaves half a checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


#: The ImageNet weights ``--pretrained auto`` gives: torchvision's IMAGENET1K_V1 for ResNets (the
#: original weights the official ResNet_CSRA loads), and for ViTs timm's ImageNet-21k weights
#: fine-tuned on ImageNet-1k: the official ViT-B file (``jx_vit_base_p16_224``) for ViT-B; for
#: ViT-L timm no longer lists the official ``jx_vit_large_p16_224`` (give that file as
#: ``--pretrained FILE`` to match the paper), and its AugReg weights are taken instead.
PRETRAINED = {"resnet": "IMAGENET1K_V1", "vit_b16_224": "vit_base_patch16_224.orig_in21k_ft_in1k",
              "vit_l16_224": "vit_large_patch16_224.augreg_in21k_ft_in1k"}


def _pretrained_state(source: str, model_name: str) -> dict | None:
    """The backbone weights ``source`` names: ``auto`` (the official models' ImageNet weights,
    :data:`PRETRAINED`; none for the synthetic model), ``torchvision`` (ResNets), ``timm``
    (ViTs), ``none``, or a state-dict file."""
    if source == "none" or (source == "auto" and model_name == "synthetic"):
        return None
    if source == "auto":
        source = "torchvision" if model_name.startswith("resnet") else "timm"
    try:
        if source == "torchvision":
            if not model_name.startswith("resnet"):
                raise SystemExit("--pretrained torchvision: for the resnet models")
            import torchvision

            weights = torchvision.models.get_model_weights(model_name)[PRETRAINED["resnet"]]
            return weights.get_state_dict(progress=False)
        if source == "timm":
            if model_name not in PRETRAINED:
                raise SystemExit("--pretrained timm: for vit_b16_224 and vit_l16_224")
            import timm

            return timm.create_model(PRETRAINED[model_name], pretrained=True).state_dict()
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, no cache, a missing package
        raise SystemExit(f"--pretrained {source}: the ImageNet weights of {model_name} could not "
                         f"be had ({type(exc).__name__}: {str(exc)[:200]}); give a state-dict "
                         f"file, or --pretrained none to start from random weights") from None
    sd = _load(source, "--pretrained")
    return sd.get("state_dict", sd) if isinstance(sd, dict) else sd


def _load_pretrained(model: nn.Module, source: str, model_name: str) -> None:
    """The backbone's pretrained weights (:func:`_pretrained_state`); the classifier keeps its
    initialisation."""
    sd = _pretrained_state(source, model_name)
    if sd is None:
        if model_name != "synthetic":
            print(f"note: {model_name} starts from random weights (--pretrained none); the "
                  f"official recipe starts from ImageNet weights")
        return
    own = model.state_dict()
    taken = {k: v for k, v in sd.items() if k in own and not k.startswith("classifier.")
             and v.shape == own[k].shape}
    if not taken:
        raise SystemExit(f"--pretrained: no parameter of {source} fits the {model_name} "
                         f"backbone")
    model.load_state_dict(taken, strict=False)
    print(f"pretrained: {len(taken)} of {len(own)} tensors from {source}")


def _plot(log: list, path: Path) -> None:
    """Loss, learning rate and mAP per epoch (matplotlib, where it is installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no matplotlib: the curves plot is skipped; log.jsonl has the numbers)")
        return
    epochs = [e["epoch"] for e in log]
    keys = [k for k in ("loss", "lr", "mAP") if any(k in e for e in log)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ax.plot(epochs, [e.get(k, math.nan) for e in log], marker="o")
        ax.set_title(k)
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"wrote {path}")
