"""examples/train_multilabel.py at a small setting (the default run takes about a minute)."""
import subprocess
import sys
from pathlib import Path

import torch

from csra_triton.tools.demo import CLASSES, average_precision, make_shapes

ROOT = Path(__file__).resolve().parent.parent


def test_example_runs_and_reports_both_heads(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "examples/train_multilabel.py"), "--train",
                          "128", "--test", "64", "--epochs", "1", "--save",
                          str(tmp_path / "m.pt")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if line.startswith("| csra")
            or line.startswith("| gap-linear")]
    assert len(rows) == 2
    for row in rows:
        assert 0.0 <= float(row.split("|")[2]) <= 100.0
    saved = torch.load(tmp_path / "m.pt")
    assert saved["state_dict"]["head.weight"].shape == (1, len(CLASSES), 64)


def test_shapes_labels_match_boxes():
    data = make_shapes(20, seed=5)
    assert data.images.shape == (20, 3, 32, 32)
    for labels, boxes in zip(data.labels, data.boxes):
        assert sorted(c for c, *_ in boxes) == labels.nonzero().flatten().tolist()
        assert all(0 <= x0 <= x1 < 32 and 0 <= y0 <= y1 < 32 for _, x0, y0, x1, y1 in boxes)


def test_average_precision_against_a_direct_count():
    scores = torch.tensor([[0.9], [0.8], [0.7], [0.6]])
    labels = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    # positives at ranks 1 and 3: precisions 1/1 and 2/3
    assert torch.allclose(average_precision(scores, labels), torch.tensor([(1 + 2 / 3) / 2]))
