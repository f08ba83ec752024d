"""The official workflow on our head: ``predict``, ``val`` and ``train`` (csra_triton/tools), on
tiny datasets written here (images through Pillow, annotations in every format read), with the
metrics against an independent float64 computation and hand-worked cases.

Before these commands a user of the paper's workflow left the package for the official scripts
(torch 1.6, the official head)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.no_triton      # the commands run the PyTorch fallback on CPU tensors

PIL = pytest.importorskip("PIL.Image")

from csra_triton.tools import data, metrics  # noqa: E402
from csra_triton.tools.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- metrics


def _ap_by_definition(scores, target):
    """Non-interpolated AP, float64, by its definition, loop by loop: rank the images by score
    (ties: the earlier image first), and average over the positives the precision at each."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    hits, total, n_pos = 0, 0.0, sum(1 for t in target if t == 1)
    for rank, i in enumerate(order, 1):
        if target[i] == 1:
            hits += 1
            total += hits / rank
    return total / n_pos if n_pos else None


def test_ap_hand_worked():
    # ranks: 0.9 (pos), 0.8 (neg), 0.7 (pos): AP = (1/1 + 2/3) / 2
    assert metrics.average_precision([0.9, 0.8, 0.7], [1, 0, 1]) == pytest.approx(5 / 6)
    # ties ranked in dataset order: (neg, pos) at 0.5 -> the positive second: AP = 1/2;
    # (pos, neg) -> 1
    assert metrics.average_precision([0.5, 0.5], [0, 1]) == pytest.approx(0.5)
    assert metrics.average_precision([0.5, 0.5], [1, 0]) == pytest.approx(1.0)
    assert metrics.average_precision([0.1, 0.2], [0, 0]) is None          # no positive


def test_metrics_hand_worked_and_rules():
    """Two classes, four images. Class 0: VOC-difficult on image 3 (left out); class 1 with no
    positive (left out of mAP and CR, listed). At threshold 0.5: class 0 predicted on images
    0, 1 (TP 1), class 1 on image 2 (TP 0)."""
    scores = np.array([[0.9, 0.1], [0.6, 0.2], [0.3, 0.7], [0.95, 0.4]])
    targets = np.array([[1, -1], [-1, -1], [1, -1], [0, -1]])
    r = metrics.evaluate(scores, targets, "voc07", ["a", "b"])
    # class 0 without image 3: scores (0.9 pos, 0.6 neg, 0.3 pos): AP = (1 + 2/3) / 2
    assert r["AP"]["a"] == pytest.approx(100 * 5 / 6) and r["AP"]["b"] is None
    assert r["mAP"] == pytest.approx(100 * 5 / 6)
    assert r["classes_without_positives"] == ["b"]
    # per class: TP (1, 0), predicted (2, 1), positives (2, 0)
    assert r["CP"] == pytest.approx(100 * (1 / 2 + 0 / 1) / 2)
    assert r["CR"] == pytest.approx(100 * (1 / 2))                        # class 0 only
    assert r["OP"] == pytest.approx(100 * 1 / 3) and r["OR"] == pytest.approx(100 * 1 / 2)
    assert r["OF1"] == pytest.approx(2 * (100 / 3) * 50 / (100 / 3 + 50))
    # WIDER: 99 left out of the AP, a negative in precision and recall
    w = metrics.evaluate(np.array([[0.9], [0.8], [0.2]]), np.array([[99], [1], [0]]), "wider")
    assert w["AP"]["0"] == pytest.approx(100.0)                           # (0.8 pos, 0.2 neg)
    assert w["OP"] == pytest.approx(100 * 1 / 2)                          # 0.9 predicted, wrong


@pytest.mark.parametrize("rule", metrics.RULES)
def test_metrics_against_float64_by_definition(rule):
    """Random scores (with ties; one class never predicted) and targets: every AP, mAP and the
    six P/R figures equal to their definitions computed loop by loop in float64."""
    rng = np.random.default_rng(0)
    n, C = 40, 6
    scores = rng.integers(0, 8, (n, C)) / 7.0                       # ties on purpose
    codes = {"plain": [0, 1], "voc07": [-1, 0, 1], "wider": [0, 1, 99]}[rule]
    targets = rng.choice(codes, (n, C))
    targets[0] = 1                                                  # every class a positive
    scores[:, -1] = np.minimum(scores[:, -1], 3 / 7)               # a class never predicted
    r = metrics.evaluate(scores, targets, rule)
    tp, pred, gt, aps = [], [], [], []
    for c in range(C):
        s, t = list(scores[:, c]), list(targets[:, c])
        if rule == "voc07":
            s_ap, t_ap = zip(*[(a, 1 if b == 1 else 0) for a, b in zip(s, t) if b != 0])
            s_pr, t_pr = s_ap, t_ap
        elif rule == "wider":
            s_ap, t_ap = zip(*[(a, b) for a, b in zip(s, t) if b != 99])
            s_pr, t_pr = s, [0 if b == 99 else b for b in t]
        else:
            s_ap = s_pr = s
            t_ap = t_pr = t
        aps.append(_ap_by_definition(s_ap, t_ap))
        hit = [v >= 0.5 for v in s_pr]
        tp.append(sum(1 for h, b in zip(hit, t_pr) if h and b == 1))
        pred.append(max(1, sum(hit)))
        gt.append(sum(1 for b in t_pr if b == 1))
    for c in range(C):
        assert r["AP"][str(c)] == pytest.approx(100 * aps[c], rel=1e-12)
    assert r["mAP"] == pytest.approx(100 * sum(aps) / C, rel=1e-12)
    CP, CR = sum(a / b for a, b in zip(tp, pred)) / C, sum(a / b for a, b in zip(tp, gt)) / C
    OP, OR = sum(tp) / sum(pred), sum(tp) / sum(gt)
    for k, v in dict(CP=CP, CR=CR, OP=OP, OR=OR, CF1=2 * CP * CR / (CP + CR),
                     OF1=2 * OP * OR / (OP + OR)).items():
        assert r[k] == pytest.approx(100 * v, rel=1e-12), k


# --------------------------------------------------------------------------- datasets


def _image(path, seed=0, size=(20, 16)):
    rng = np.random.default_rng(seed)
    PIL.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return str(path)


def _voc(root: Path, objects: dict, split="test"):
    """A VOC2007 folder: ``objects`` {image id: [(class, difficult)]}."""
    base = root / "VOC2007"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for i, (image_id, objs) in enumerate(objects.items()):
        _image(base / "JPEGImages" / f"{image_id}.jpg", i)
        body = "".join(f"<object>\n<name>{c}</name>\n<difficult>{d}</difficult>\n</object>\n"
                       for c, d in objs)
        (base / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation>\n<filename>{image_id}.jpg</filename>\n{body}</annotation>\n")
    (base / "ImageSets/Main" / f"{split}.txt").write_text("\n".join(objects) + "\n")
    return base


def test_voc_targets_as_the_official_preparation_writes_them(tmp_path):
    """Per class: 1 if an object is not difficult, 0 if all are difficult, -1 if none (test);
    binary for trainval (difficult counted negative)."""
    _voc(tmp_path, {"000001": [("dog", 0), ("cat", 1)], "000002": [("cat", 1), ("cat", 0)]})
    d = data.read_voc(tmp_path, "test")
    dog, cat, person = (data.VOC_CLASSES.index(c) for c in ("dog", "cat", "person"))
    t = d.targets()
    assert t[0, dog] == 1 and t[0, cat] == 0 and t[0, person] == -1 and t[1, cat] == 1
    assert d.rule == "voc07"
    _voc(tmp_path, {"000001": [("dog", 0), ("cat", 1)]}, split="trainval")
    tv = data.read_voc(tmp_path, "trainval").targets()
    assert tv[0, cat] == 0 and tv[0, dog] == 1 and tv[0, person] == 0


def test_every_format_reads_the_same_labels(tmp_path):
    """One labelling written as an official JSON, COCO instances and a CSV: the same binary
    targets from each reader (COCO's image without annotations left out, and said so)."""
    names = ["person", "bicycle", "car"]
    imgs = [_image(tmp_path / f"{i}.png", i) for i in range(3)]
    labels = [[1, 0, 1], [0, 1, 0], [0, 0, 1]]
    (tmp_path / "a.csv").write_text("path,labels\n" + "".join(
        f"{i}.png,{';'.join(n for n, v in zip(names, lab) if v)}\n"
        for i, lab in enumerate(labels)))
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    csv_d = data.read_data(tmp_path / "a.csv", names=tmp_path / "names.txt")
    coco = {"images": [{"id": i + 1, "file_name": f"{i}.png"} for i in range(4)],
            "categories": [{"id": 7, "name": "car"}, {"id": 1, "name": "person"},
                           {"id": 2, "name": "bicycle"}],
            "annotations": [{"id": k, "image_id": i + 1, "category_id": {0: 1, 1: 2, 2: 7}[c]}
                            for k, (i, c) in enumerate((i, c) for i, lab in enumerate(labels)
                                                       for c, v in enumerate(lab) if v)]}
    _image(tmp_path / "3.png", 3)
    (tmp_path / "inst.json").write_text(json.dumps(coco))
    coco_d = data.read_data(tmp_path / "inst.json", images=str(tmp_path))
    assert coco_d.names == ("person", "bicycle", "car")          # category id order
    assert len(coco_d.samples) == 3 and "1 images without annotations" in coco_d.notes[0]
    full = [lab + [0] * 77 for lab in labels]
    (tmp_path / "off.json").write_text(json.dumps(
        [{"img_path": p, "target": t} for p, t in zip(imgs, full)]))
    off = data.read_data(tmp_path / "off.json", dataset="coco")
    want = torch.tensor(labels, dtype=torch.float32)
    assert torch.equal(csv_d.train_targets(), want)
    assert torch.equal(coco_d.train_targets(), want)
    assert torch.equal(off.train_targets()[:, :3], want)


@pytest.mark.parametrize("case", ["malformed-json", "missing-image", "unknown-class-csv",
                                  "unknown-class-xml", "malformed-xml", "bad-target", "empty-json",
                                  "empty-split", "coco-entry", "wider-bbox", "relative-path"])
def test_broken_data_is_refused_naming_file_and_line(case, tmp_path):
    img = _image(tmp_path / "ok.png")
    if case == "malformed-json":
        (tmp_path / "a.json").write_text('[\n{"img_path": "ok.png",\n "target": [1, 0,]}\n]')
        path, kw, want = tmp_path / "a.json", dict(dataset="coco"), r"a.json, line 3"
    elif case == "missing-image":
        (tmp_path / "a.csv").write_text("ok.png,car\ngone.png,car\n")
        path, kw, want = tmp_path / "a.csv", dict(names=["car"]), r"a.csv, line 2: image .*gone"
    elif case == "unknown-class-csv":
        (tmp_path / "a.csv").write_text("path,labels\nok.png,car;truck\n")
        path, kw, want = tmp_path / "a.csv", dict(names=["car"]), r"a.csv, line 2: unknown class 'truck'"
    elif case == "unknown-class-xml":
        _voc(tmp_path, {"000001": [("dog", 0), ("dragon", 0)]})
        path, kw, want = tmp_path, {}, r"000001.xml, line 8: unknown class 'dragon'"
    elif case == "malformed-xml":
        base = _voc(tmp_path, {"000001": [("dog", 0)]})
        (base / "Annotations" / "000001.xml").write_text("<annotation>\n<object>\n</annotation>")
        path, kw, want = tmp_path, {}, r"000001.xml, line 3: malformed XML"
    elif case == "bad-target":
        (tmp_path / "a.json").write_text(json.dumps([{"img_path": img, "target": [2] * 20}]))
        path, kw, want = tmp_path / "a.json", dict(dataset="voc07"), r"entry 0: target values \[2\]"
    elif case == "empty-json":
        (tmp_path / "a.json").write_text("[]")
        path, kw, want = tmp_path / "a.json", dict(dataset="coco"), r"a.json: no samples"
    elif case == "empty-split":
        _voc(tmp_path, {})
        path, kw, want = tmp_path, {}, r"test.txt: no samples"
    elif case == "coco-entry":
        (tmp_path / "i.json").write_text(json.dumps(
            {"images": [{"id": 1, "file_name": "ok.png"}, {"id": 2}],
             "annotations": [], "categories": [{"id": 1, "name": "car"}]}))
        path, kw, want = tmp_path / "i.json", dict(images=str(tmp_path)), r"images\[1\]: expected"
    elif case == "wider-bbox":
        (tmp_path / "a.json").write_text(json.dumps(
            [{"img_path": img, "target": [0] * 14, "bbox": [0, 0, "w", 4]}]))
        path, kw, want = tmp_path / "a.json", dict(dataset="wider"), r"entry 0: .*'bbox'"
    else:
        (tmp_path / "a.json").write_text(json.dumps([{"img_path": "VOC2007/x.jpg",
                                                     "target": [1] + [0] * 79}]))
        path, kw, want = (tmp_path / "a.json", dict(dataset="coco"),
                          r"entry 0: image .* does not exist \(relative paths start at .*"
                          r"--image-root")
    with pytest.raises(data.DataError, match=want):
        data.read_data(path, **kw)


# --------------------------------------------------------------------------- the commands


SMALL = ["--synthetic-train", "64", "--synthetic-val", "32", "--batch", "16", "--warmup", "1",
         "--lr", "0.05"]


def _train(out, *extra):
    assert main(["train", *SMALL, "--out", str(out), *extra]) == 0
    return torch.load(Path(out) / "last.pt", weights_only=False)


def test_train_writes_resumable_checkpoints_a_log_and_the_official_layout(tmp_path):
    """Two epochs straight, and one epoch then a resume for the second: the same weights, the
    same log; best.pt, best_official.pth (the head as classifier.multi_head.{k}.head.weight),
    log.jsonl and curves.png written."""
    straight = _train(tmp_path / "a", "--epochs", "2")
    _train(tmp_path / "b", "--epochs", "1")
    resumed = _train(tmp_path / "b", "--epochs", "2", "--resume", str(tmp_path / "b" / "last.pt"))
    for k, v in straight["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert [e["epoch"] for e in resumed["log"]] == [1, 2]
    assert resumed["log"][1]["loss"] == straight["log"][1]["loss"]
    for name in ("best.pt", "best_official.pth", "log.jsonl", "curves.png"):
        assert (tmp_path / "a" / name).is_file(), name
    official = torch.load(tmp_path / "a" / "best_official.pth", weights_only=True)
    assert "classifier.multi_head.0.head.weight" in official
    assert official["classifier.multi_head.0.head.weight"].shape == (5, 64, 1, 1)
    log = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert [set(e) >= {"loss", "lr", "mAP"} for e in log] == [True, True]
    # the official warm-up: from 0 over the first epoch, per step (4 steps)
    assert log[0]["lr"] == pytest.approx(0.05 * 3 / 4) and log[1]["lr"] == pytest.approx(0.05)


def test_predict_and_val_on_a_trained_checkpoint(tmp_path, capsys):
    """predict lists each image's classes above the threshold (JSON too) and draws the maps;
    val's report equals the metrics of the model's own scores."""
    _train(tmp_path / "run", "--epochs", "2")
    from csra_triton.tools import demo, workflow

    shapes = demo.make_shapes(6, seed=7)
    lines = ["path,labels"]
    for i, (img, lab) in enumerate(zip(shapes.images, shapes.labels)):
        PIL.fromarray((img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(
            tmp_path / f"{i}.png")
        lines.append(f"{i}.png," + ";".join(demo.CLASSES[c] for c in lab.nonzero().flatten()))
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    (tmp_path / "n.txt").write_text("\n".join(demo.CLASSES) + "\n")
    ckpt = str(tmp_path / "run" / "best.pt")
    assert main(["predict", ckpt, str(tmp_path), "--threshold", "0.3", "--json",
                 str(tmp_path / "p.json"), "--maps", str(tmp_path / "maps")]) == 0
    pred = json.loads((tmp_path / "p.json").read_text())["results"]
    assert len(pred) == 6 and all(c["score"] >= 0.3 for r in pred for c in r["classes"])
    assert len(list((tmp_path / "maps").glob("*_maps.png"))) == 6
    assert main(["val", ckpt, str(tmp_path / "d.csv"), "--names", str(tmp_path / "n.txt"),
                 "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    model, info = workflow.load_checkpoint(ckpt)
    x = torch.stack([data.to_tensor(PIL.open(tmp_path / f"{i}.png").convert("RGB"), 32, "unit")
                     for i in range(6)])
    with torch.no_grad(), csra_backend():
        scores = torch.sigmoid(model(x).float()).double().numpy()
    want = metrics.evaluate(scores, shapes.labels.numpy(), "plain", demo.CLASSES)
    for k in ("mAP", "CP", "CR", "OP", "OR"):
        assert report[k] == pytest.approx(want[k], nan_ok=True), k
    assert "mAP" in capsys.readouterr().out


def csra_backend():
    from csra_triton import use_backend

    return use_backend("torch")


def test_two_ranks_train_what_one_rank_trains(tmp_path):
    """torchrun with 2 gloo ranks and a global batch of 16 (8 a rank), against one process with
    the same global batch: the same samples in every step (each rank's share of one
    permutation), gradients averaged by DistributedDataParallel, batch statistics the same on
    every rank (frozen: SyncBatchNorm needs CUDA). The weights after one epoch agree to fp32
    rounding."""
    args = [*SMALL, "--epochs", "1", "--bn", "frozen", "--warmup", "0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "-m", "csra_triton", "train", *args,
                          "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    one = _train(tmp_path / "one", "--epochs", "1", "--bn", "frozen", "--warmup", "0")
    two = torch.load(tmp_path / "two" / "last.pt", weights_only=False)
    for k, v in one["model"].items():
        if v.is_floating_point():
            err = (v.double() - two["model"][k].double()).norm() / max(v.double().norm(), 1e-12)
            assert err <= 1e-5, (k, err)
    assert two["log"][0]["loss"] == pytest.approx(one["log"][0]["loss"], rel=1e-5)
    # the held-out set scored in two shares and gathered: the same report as one process's
    for k in ("mAP", "CP", "CR", "OP", "OR"):
        assert two["log"][0][k] == pytest.approx(one["log"][0][k], rel=1e-4, nan_ok=True), k


def test_resnet_checkpoint_in_the_official_layout_validates_alike(tmp_path):
    """A ResNet-18 trained one epoch on a VOC folder: its best_official.pth (the official
    ResNet_CSRA's keys) and its best.pt give the same val report."""
    pytest.importorskip("torchvision")
    objects = {f"{i:06d}": [(data.VOC_CLASSES[i % 3], 0)] for i in range(8)}
    _voc(tmp_path / "voc", objects, split="trainval")
    _voc(tmp_path / "voc", objects, split="test")
    assert main(["train", "--train", str(tmp_path / "voc"), "--val", str(tmp_path / "voc"),
                 "--model", "resnet18", "--img-size", "64", "--epochs", "1", "--batch", "4",
                 "--pretrained", "none", "--out", str(tmp_path / "r")]) == 0
    reports = []
    for ckpt in ("best.pt", "best_official.pth"):
        out = tmp_path / f"{ckpt}.json"
        assert main(["val", str(tmp_path / "r" / ckpt), str(tmp_path / "voc"), "--img-size", "64",
                     "--json", str(out)]) == 0
        reports.append(json.loads(out.read_text()))
    assert reports[0]["AP"] == reports[1]["AP"] and reports[0]["mAP"] == reports[1]["mAP"]


def _recipe_args(**kw):
    import argparse

    base = dict(model=None, train="data", heads=1, lam=0.1, img_size=None, seed=0, scale=None,
                aug=None, step=None)
    return argparse.Namespace(**{**base, **kw})


@pytest.mark.parametrize("kind, want", [("voc07", ("unit", "flip+crop", 4)),
                                        ("coco", ("unit", "flip+crop", 5)),
                                        ("wider", ("half", "flip", 5)),
                                        ("csv", ("unit", "flip+crop", 5))])
def test_the_recipe_follows_the_data_as_the_official_main_does(kind, want):
    """main.py: VOC steps the learning rate every 4 epochs, the others every 5; WIDER trains
    with the flip alone; dataset.py scales WIDER's pixels to [-1, 1], every other to [0, 1],
    whatever the model. Flags override each."""
    from csra_triton.tools import workflow

    d = data.Dataset([], (), "plain", "x", kind=kind)
    for model in (None, "vit_b16_224"):
        cfg = workflow._train_config(_recipe_args(model=model), d, 3)
        assert (cfg["scale"], cfg["augment"], cfg["step"]) == want
    cfg = workflow._train_config(_recipe_args(scale="half", aug="flip", step=7), d, 3)
    assert (cfg["scale"], cfg["augment"], cfg["step"]) == ("half", "flip", 7)


def test_flip_alone_never_crops(tmp_path):
    """WIDER's augmentation: the whole (possibly mirrored) image, resized."""
    img = PIL.open(_image(tmp_path / "a.png", size=(30, 20))).convert("RGB")
    whole = data.to_tensor(img, 16, "half")
    for seed in range(8):
        t = data.transform(img, 16, "half", True, torch.Generator().manual_seed(seed), "flip")
        assert torch.equal(t, whole) or torch.equal(t, data.to_tensor(
            img.transpose(PIL.FLIP_LEFT_RIGHT), 16, "half"))
    crops = [data.transform(img, 16, "half", True, torch.Generator().manual_seed(s))
             for s in range(8)]
    assert not all(torch.equal(t, whole) for t in crops)


def test_pretrained_weights_are_asked_for_and_refused_clearly(monkeypatch):
    """--pretrained auto takes the official models' ImageNet weights; where they cannot be had
    (offline, no package) the command stops saying how to go on; none and the synthetic model
    take none."""
    from csra_triton.tools import workflow

    assert workflow._pretrained_state("none", "resnet101") is None
    assert workflow._pretrained_state("auto", "synthetic") is None
    monkeypatch.setitem(sys.modules, "torchvision", None)       # import torchvision fails
    monkeypatch.setitem(sys.modules, "timm", None)
    for model in ("resnet101", "vit_b16_224"):
        with pytest.raises(SystemExit, match=r"could not be had .*--pretrained none"):
            workflow._pretrained_state("auto", model)
    with pytest.raises(SystemExit, match="for the resnet models"):
        workflow._pretrained_state("torchvision", "vit_b16_224")


def test_resume_keeps_the_runs_configuration(tmp_path):
    """A run resumed without its flags goes on at its own image size, seed and step; data with
    another class count is refused."""
    first = _train(tmp_path / "r", "--epochs", "1", "--img-size", "24", "--seed", "3",
                   "--step", "2")
    again = _train(tmp_path / "r", "--epochs", "2", "--resume", str(tmp_path / "r" / "last.pt"))
    assert again["config"] == first["config"]
    assert (again["config"]["img_size"], again["config"]["seed"]) == (24, 3)
    assert again["step_lr"]["step_size"] == 2
    (tmp_path / "names.txt").write_text("a\nb\n")
    _image(tmp_path / "x.png")
    (tmp_path / "d.csv").write_text("x.png,a\n")
    with pytest.raises(SystemExit, match="checkpoint has 5 classes, the data 2"):
        main(["train", "--train", str(tmp_path / "d.csv"), "--names", str(tmp_path / "names.txt"),
              "--resume", str(tmp_path / "r" / "last.pt"), "--out", str(tmp_path / "r")])


def test_import_loads_none_of_the_workflow():
    """``import csra_triton`` imports no tool, and nothing of Pillow, tqdm or matplotlib that
    importing torch and triton did not import already."""
    code = ("import sys, torch, triton; before = set(sys.modules); import csra_triton; "
            "bad = [m for m in set(sys.modules) - before if m.startswith(("
            "'csra_triton.tools', 'PIL', 'tqdm', 'matplotlib'))]; print(sorted(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_progress_bars_only_on_a_terminal(monkeypatch):
    from csra_triton.tools import progress

    items = [1, 2, 3]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert progress.progress(items, "x") is items
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    bar = progress.progress(items, "x")
    assert bar is not items and list(bar) == items
