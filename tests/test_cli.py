"""The `mixlab` command, run as a user runs it (a subprocess) and in-process."""
from __future__ import annotations

import json
import subprocess
import sys

from mixlab.cli import main


def run(*args):
    return subprocess.run([sys.executable, "-m", "mixlab", *args], capture_output=True, text=True, timeout=300)


def test_info_swin_tiny_prints_published_figures():
    r = run("info", "swin_tiny_patch4_window7_224")
    assert r.returncode == 0, r.stderr
    assert "28.29M" in r.stdout and "4.49" in r.stdout
    for stage in range(4):
        assert f"stages.{stage}" in r.stdout
    assert "56x56" in r.stdout and "window attention" in r.stdout


def test_info_container_light():
    r = run("info", "container_light")
    assert r.returncode == 0, r.stderr
    assert "20.63M" in r.stdout


def test_info_json_and_options(capsys):
    assert main(["info", "convnext_tiny", "--img-size", "64", "--in-chans", "1", "--num-classes", "10", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["input_size"] == [1, 64, 64]
    assert d["output_shape"] == [1, 10]
    assert [p["resolution"] for p in d["parts"] if p["name"].startswith("stages.")] == [[16, 16], [8, 8], [4, 4], [2, 2]]
    assert abs(sum(p["params"] for p in d["parts"]) - d["params"]) == 0
    assert d["macs"] >= sum(p["macs"] for p in d["parts"]) * 0.99


def test_unknown_model_lists_closest_names(capsys):
    assert main(["info", "swin_tiny_patch4"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'swin_tiny_patch4'" in err and "swin_tiny_patch4_window7_224" in err


def test_bad_size_is_a_clear_error(capsys):
    assert main(["info", "vit_tiny_patch16_224", "--img-size", "65"]) == 2
    assert "divisible by the patch size" in capsys.readouterr().err


def test_list(capsys):
    assert main(["list", "poolformer*"]) == 0
    assert capsys.readouterr().out.split() == ["poolformer_m36", "poolformer_m48", "poolformer_s12", "poolformer_s24",
                                               "poolformer_s36"]
    assert main(["list", "nothing_like_this"]) == 1
    assert main(["list", "deit", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 6 and {r["family"] for r in rows} == {"vit"}


def test_list_spec_mixers(capsys):
    from mixlab.registry import MIXERS
    assert main(["list", "--mixers", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["mixer"] for m in listed] == list(MIXERS)
    assert {"mixer": "window", "options": {"heads": 4, "window": 7}, "block": MIXERS["window"].description} in listed
    assert main(["list", "--mixers", "g*"]) == 0
    out = capsys.readouterr().out
    assert out.split()[0] == "gfilter" and "gmlp" in out and "window" not in out
    assert main(["list", "--mixers", "nothing*"]) == 1
    assert "mixlab list --mixers" in capsys.readouterr().err
