"""Run directories written by an earlier mixlab still evaluate and resume (fixtures in
tests/fixtures/run-v0.1.0, made by mixlab 0.1.0 before the task engine; see their README)."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from mixlab.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "run-v0.1.0"


def test_previous_version_run_evaluates(tmp_path, capsys):
    run = tmp_path / "complete"
    shutil.copytree(FIXTURES / "complete", run)
    assert main(["eval", str(run)]) == 0
    captured = capsys.readouterr()
    assert "top-1 9.38%" in captured.out  # 6 of 64 images, as 0.1.0 measured (summary.json)
    assert "records no class names" in captured.err  # 0.1.0 did not record them: they cannot be checked


def test_previous_version_run_resumes_bit_identically(tmp_path):
    run = tmp_path / "interrupted"
    shutil.copytree(FIXTURES / "interrupted", run)
    assert main(["train", "--resume", str(run)]) == 0
    got = load_file(run / "checkpoints" / "ckpt-00000008.safetensors")
    want = load_file(FIXTURES / "complete" / "checkpoints" / "ckpt-00000008.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert (run / "summary.json").is_file()
