"""`watch`: checkpoints that appear while it runs are benchmarked once each, with the epoch recorded;
a restart benchmarks nothing again; the sentinel and the final epoch stop it."""

import threading
import time

import pytest
import torch
import torchvision
from click.testing import CliRunner

from densecl_bench.benchmarks.base import Metric
from densecl_bench.benchmarks.knn import ImagenetKnn
from densecl_bench.cli import main
from densecl_bench.results import Ledger
from densecl_bench.watch import STOP_FILE, watch, watched_epochs


def _weights(epoch: int) -> dict[str, torch.Tensor]:
    """A small ResNet's tensors, drawn from the epoch's own generator: the global RNG is shared with the
    watching thread, which builds networks meanwhile."""
    gen = torch.Generator().manual_seed(epoch)
    return {k: torch.rand(v.shape, generator=gen) if v.is_floating_point() else v
            for k, v in torchvision.models.resnet18().state_dict().items()}


def _write_snapshot(work_dir, epoch: int, epochs: int) -> None:
    """An epoch snapshot as our pretraining writes it (atomically; meta with the schedule length)."""
    state = {"meta": {"epoch": epoch, "config": {"epochs": epochs}}, "state_dict": _weights(epoch)}
    tmp = work_dir / f".epoch_{epoch}.tmp"
    torch.save(state, tmp)
    tmp.replace(work_dir / f"epoch_{epoch}.pth")


@pytest.fixture
def knn_calls(monkeypatch, tmp_path):
    """kNN replaced by a probe of the loaded weights (which checkpoint ran, and that its own weights
    were used), on an empty data root: the watch is under test here, not kNN."""
    calls = []

    def probe(self, ctx):
        calls.append(ctx.checkpoint.path)
        return [Metric(self.name, "k=20", float(ctx.backbone.conv1.weight.sum()))]

    monkeypatch.setattr(ImagenetKnn, "run", probe)
    for split in ("train", "val"):
        (tmp_path / "data" / "imagenet" / split).mkdir(parents=True)
    return calls


def test_each_checkpoint_that_appears_is_benchmarked_once(tmp_path, knn_calls):
    work = tmp_path / "work_dirs" / "densecl_demo"
    work.mkdir(parents=True)

    def train():  # a pretraining run writing its epochs while the watch polls
        for epoch in (1, 2, 3):
            _write_snapshot(work, epoch, epochs=3)
            time.sleep(0.3)

    writer = threading.Thread(target=train)
    writer.start()
    result = watch(work, ["knn"], runs_dir=tmp_path / "runs", poll_s=0.1, data_root=tmp_path / "data",
                   echo=lambda *_: None)
    writer.join()
    assert result.stopped_by == "final epoch 3" and result.benchmarked == [1, 2, 3]
    assert [p.rsplit("/", 1)[1] for p in knn_calls] == ["epoch_1.pth", "epoch_2.pth", "epoch_3.pth"]
    runs = watched_epochs(result.watch_dir)
    assert list(runs) == [1, 2, 3]
    for epoch, run_dir in runs.items():
        records = Ledger(run_dir).records()
        assert [(r["metric"], r["provenance"]["epoch"]) for r in records] == [("k=20", epoch)]
        assert records[0]["value"] == pytest.approx(float(_weights(epoch)["conv1.weight"].sum()))

    # a restart: nothing is benchmarked again
    knn_calls.clear()
    again = watch(work, ["knn"], runs_dir=tmp_path / "runs", poll_s=0.1, data_root=tmp_path / "data",
                  echo=lambda *_: None)
    assert again.benchmarked == [] and knn_calls == [] and again.stopped_by == "final epoch 3"


def test_every_n_epochs_and_the_sentinel(tmp_path, knn_calls):
    work = tmp_path / "work"
    work.mkdir()
    for epoch in (1, 2, 3, 4):
        _write_snapshot(work, epoch, epochs=10)
    (work / STOP_FILE).touch()  # the run was stopped early: benchmark what is there, then end
    out = CliRunner().invoke(main, ["watch", str(work), "--bench", "knn", "--every", "2", "--poll", "0.1",
                                    "--runs-dir", str(tmp_path / "runs"), "--data-root", str(tmp_path / "data")])
    assert out.exit_code == 0, out.output
    assert f"stopped: sentinel {work / STOP_FILE}" in out.output
    assert [p.rsplit("/", 1)[1] for p in knn_calls] == ["epoch_2.pth", "epoch_4.pth"]
    assert list(watched_epochs(tmp_path / "runs" / "watch-work")) == [2, 4]
