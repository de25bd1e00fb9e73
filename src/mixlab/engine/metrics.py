"""Accuracy, the training loss functions, and the run's metric files."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..fileio import write_atomic


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets (mixup / cutmix / label smoothing), batch mean."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def binary_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """DeiT III's loss: independent sigmoid per class against the (mixed) targets."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets)


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose label is among the k highest logits, for each k (k is capped
    at the number of classes)."""
    maxk = min(max(ks), logits.shape[-1])
    pred = logits.topk(maxk, dim=-1).indices
    hit = pred.eq(labels.unsqueeze(-1))
    return [int(hit[:, :min(k, maxk)].any(dim=-1).sum()) for k in ks]


class MetricsLog:
    """Per-epoch metrics as JSON lines (``metrics.jsonl``) mirrored to ``metrics.csv``.

    On resume, rows of epochs that are being redone are dropped first, so a crash between
    writing a row and writing the checkpoint never leaves a duplicate.
    """

    def __init__(self, run_dir: Path):
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        self.csv = Path(run_dir) / "metrics.csv"
        self.rows: list[dict] = []
        if self.jsonl.exists():
            for line in self.jsonl.read_text().splitlines():
                if line.strip():
                    try:
                        self.rows.append(json.loads(line))
                    except json.JSONDecodeError:  # a torn last line from a crash
                        break

    def truncate(self, from_epoch: int) -> None:
        """Forget rows of epochs >= from_epoch (1-based epoch numbers)."""
        self.rows = [r for r in self.rows if r.get("epoch", 0) < from_epoch]
        self._write()

    def append(self, row: dict) -> None:
        self.rows.append(row)
        self._write()

    def _write(self) -> None:
        write_atomic(self.jsonl, "".join(json.dumps(r) + "\n" for r in self.rows))
        keys: list[str] = []
        for r in self.rows:
            keys += [k for k in r if k not in keys]
        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, fieldnames=keys)
        w.writeheader()
        w.writerows(self.rows)
        write_atomic(self.csv, buf.getvalue())
