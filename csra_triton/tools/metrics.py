"""The official CSRA evaluation (``utils/evaluation`` of the official repository), exactly, plus
per-class AP: mAP and CP, CR, CF1, OP, OR, OF1 at a score threshold of 0.5.

Scores are the sigmoid of the logits; targets are coded as the dataset's files code them
(``data``), and each rule treats the codes as the official evaluation does:

* ``plain`` (COCO, custom data): 1 positive, 0 negative;
* ``voc07``: 1 positive, -1 negative, 0 difficult: a difficult label is left out of the AP and of
  the precision and recall of its class;
* ``wider``: 99 unspecified: left out of the AP, counted negative in precision and recall.

AP of a class: its images sorted by score (descending; ties in dataset order), the mean over its
positives of the precision at each positive's rank (no interpolation). The official code sorts
with numpy's default sort, which is not stable: where a positive and a negative tie (fp32
sigmoids saturate at 1.0 above logits of ~17), its AP depends on the platform's sort; this one
is deterministic and equal to it wherever no positive ties a negative. mAP: the mean over
classes. Per class, at the threshold: precision = TP / predicted (a class with no prediction
counts one: precision 0), recall = TP / positives; CP and CR their means over classes,
OP = sum TP / sum predicted, OR = sum TP / sum positives, F1 = 2 P R / (P + R) of each pair.

Where the official code divides by zero (a class without a positive: its AP and recall are
0 / 0), this module leaves that class out of mAP and CR and lists it
(``classes_without_positives``), instead of returning NaN for both.
"""
from __future__ import annotations

import math

import numpy as np

RULES = ("plain", "voc07", "wider")
THRESHOLD = 0.5


def _ap_view(scores: np.ndarray, target: np.ndarray, rule: str) -> tuple:
    """(scores, binary targets) of one class as its AP sees them."""
    if rule == "voc07":
        keep = target != 0
        return scores[keep], (target[keep] == 1).astype(np.float64)
    if rule == "wider":
        keep = target != 99
        return scores[keep], target[keep]
    return scores, target


def _pr_view(scores: np.ndarray, target: np.ndarray, rule: str) -> tuple:
    """(scores, binary targets) of one class as its precision and recall see them."""
    if rule == "voc07":
        keep = target != 0
        return scores[keep], (target[keep] == 1).astype(np.float64)
    if rule == "wider":
        return scores, np.where(target == 99, 0.0, target)
    return scores, target


def average_precision(scores, target) -> float | None:
    """Non-interpolated AP of binary ``target`` ranked by ``scores`` (ties in the given order);
    None without a positive."""
    scores, target = np.asarray(scores, np.float64), np.asarray(target, np.float64)
    order = np.argsort(-scores, kind="stable")
    hits = target[order]
    n_pos = hits.sum()
    if n_pos == 0:
        return None
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / n_pos)


def evaluate(scores, targets, rule: str = "plain", names=None) -> dict:
    """The official metrics of ``scores`` (n, C), sigmoid outputs, against ``targets`` (n, C)
    coded for ``rule``; a report dict: mAP, CP, CR, CF1, OP, OR, OF1 (in %, as the official
    prints them over 1), per-class AP (None for a class without a positive), and the counts."""
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    scores = np.asarray(scores, np.float64)
    targets = np.asarray(targets, np.float64)
    if scores.shape != targets.shape or scores.ndim != 2:
        raise ValueError(f"scores and targets: expected two (n, C) arrays, got {scores.shape} "
                         f"and {targets.shape}")
    n, C = scores.shape
    names = list(names) if names is not None else [str(c) for c in range(C)]
    aps, tp, pred, gt = [], np.zeros(C), np.zeros(C), np.zeros(C)
    for c in range(C):
        aps.append(average_precision(*_ap_view(scores[:, c], targets[:, c], rule)))
        s, t = _pr_view(scores[:, c], targets[:, c], rule)
        hit = s >= THRESHOLD
        gt[c], pred[c], tp[c] = (t == 1).sum(), hit.sum(), (t * hit).sum()
    pred = np.where(pred == 0, 1.0, pred)       # (the official: no prediction counts as one)
    with_pos = gt > 0
    valid = [a for a in aps if a is not None]
    OP = tp.sum() / pred.sum()
    OR = tp.sum() / gt.sum() if gt.sum() else math.nan
    CP = float(np.mean(tp / pred))
    CR = float(np.mean(tp[with_pos] / gt[with_pos])) if with_pos.any() else math.nan

    def f1(p, r):
        return 2 * p * r / (p + r) if p + r > 0 else 0.0
    return {
        "mAP": 100 * float(np.mean(valid)) if valid else math.nan,
        "CP": 100 * CP, "CR": 100 * CR, "CF1": 100 * f1(CP, CR),
        "OP": 100 * float(OP), "OR": 100 * float(OR), "OF1": 100 * f1(float(OP), float(OR)),
        "AP": {name: (None if a is None else 100 * a) for name, a in zip(names, aps)},
        "images": n, "classes": C, "rule": rule, "threshold": THRESHOLD,
        "classes_without_positives": [name for name, a in zip(names, aps) if a is None],
    }


def table(report: dict) -> str:
    """The headline metrics as the official script prints them, and the per-class APs."""
    lines = [f"mAP: {report['mAP']:.2f}",
             f"CP: {report['CP']:.2f}, CR: {report['CR']:.2f}, CF1: {report['CF1']:.2f}",
             f"OP: {report['OP']:.2f}, OR: {report['OR']:.2f}, OF1: {report['OF1']:.2f}",
             "| class | AP |", "|---|---|"]
    for name, ap in report["AP"].items():
        lines.append(f"| {name} | {'—' if ap is None else f'{ap:.2f}'} |")
    if report["classes_without_positives"]:
        lines.append(f"(no positives, left out of mAP and CR: "
                     f"{', '.join(report['classes_without_positives'])})")
    return "\n".join(lines)
