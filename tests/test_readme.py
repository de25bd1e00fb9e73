"""The README is the front door: its Python quickstart runs, its model table is measured,
and its test command is the one .ci/run runs."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import mixlab
from mixlab.analysis import count_macs, count_params

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_quickstart_runs():
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert blocks, "README has no Python quickstart"
    torch.manual_seed(0)
    exec(compile(blocks[0], "README quickstart", "exec"), {})


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    test_cmd = re.search(r"# 2\..*\n(.*)\n", README).group(1).strip()
    assert test_cmd in ci


def _table_rows():
    table = README.split("<!-- model-table:start -->")[1].split("<!-- model-table:end -->")[0]
    for line in table.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        yield cells[0].strip("`"), float(cells[1]), float(cells[2])


def test_model_table_lists_every_model():
    assert sorted(r[0] for r in _table_rows()) == mixlab.list_models()


@pytest.mark.parametrize("name,params,gmacs", list(_table_rows()))
def test_model_table_is_measured(name, params, gmacs):
    with torch.device("meta"):
        m = mixlab.create_model(name).eval()
        macs, _ = count_macs(m, torch.empty(1, 3, *m.img_size))
    assert round(count_params(m) / 1e6, 2) == params
    assert round(macs / 1e9, 2) == gmacs
