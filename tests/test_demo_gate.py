"""The demo gate end to end, on the cheapest real stage: the VOC07 SVM on feature1 of the demo data.

With one of the 19 SVM costs changed in the config (0.5^6 -> 10 x 0.5^6; two classes choose 0.5^6 on
feature1 of the demo data, while a change among the large costs moves nothing: they all separate the
training set), `regress` against the shipped demo reference turns red and its markdown table names the
metric. (That the packaged protocol reproduces the reference is what CI's `.ci/demo-regress` checks on
the whole suite; `.ci/demo-regress --write` regenerates results/reference/demo_random-init-resnet50.json.)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from densecl_bench import config
from densecl_bench.cli import main
from densecl_bench.results import Ledger
from densecl_bench.svm import cost_grid

DEMO_REFERENCE = Path(__file__).resolve().parent.parent / "results" / "reference" / "demo_random-init-resnet50.json"


def svm_config_dir(tmp: Path, **changes) -> Path:
    """A copy of the packaged configs whose VOC07 SVM scans feature1 only, with `changes` applied."""
    root = tmp / "configs"
    shutil.copytree(config.CONFIG_DIR, root)
    path = root / "benchmarks" / "svm_voc07.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg.update(layers=["feature1"], **changes)
    path.write_text(yaml.safe_dump(cfg))
    return root


def run_svm(tmp: Path, monkeypatch: pytest.MonkeyPatch, **changes) -> tuple[Path, list[dict]]:
    """`densecl-bench run voc07_svm --ckpt random` on the demo data under the changed config."""
    monkeypatch.setattr(config, "CONFIG_DIR", svm_config_dir(tmp, **changes))
    result = CliRunner().invoke(main, ["run", "voc07_svm", "--ckpt", "random", "--runs-dir", str(tmp / "runs"),
                                       "--run-id", "svm"])
    assert result.exit_code == 0, result.output
    return tmp / "runs" / "svm", Ledger(tmp / "runs" / "svm").records()


def feature1_reference(tmp: Path) -> Path:
    """The demo reference's feature1 SVM number with its own tolerances (the rest of the suite is not run)."""
    demo = json.loads(DEMO_REFERENCE.read_text())
    path = tmp / "feature1.json"
    path.write_text(json.dumps(demo | {"results": {"voc07_svm": {"feature1": demo["results"]["voc07_svm"]["feature1"]}}}))
    return path


def test_one_changed_svm_cost_turns_the_demo_gate_red(tmp_path, monkeypatch):
    costs = [0.15625 if c == 0.015625 else c for c in cost_grid("mmselfsup")]
    run, records = run_svm(tmp_path, monkeypatch, costs=costs)
    assert 0.15625 in next(r for r in records if r["metric"] == "feature1")["extra"]["chosen_costs"]
    gate = CliRunner().invoke(main, ["regress", str(run), "--reference", str(feature1_reference(tmp_path))])
    assert gate.exit_code == 1
    row = next(line for line in gate.output.splitlines() if line.startswith("| voc07_svm.feature1 |"))
    assert row.endswith(("| **worse** |", "| **better** |"))  # -0.29 on the current demo data
    assert "FAIL: " in gate.output
