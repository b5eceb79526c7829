"""The foundation commands as a user types them: help, inspect, convert, data demo/check, extract."""

import pytest
import torch
import torchvision
from click.testing import CliRunner

from densecl_bench.checkpoint import load_checkpoint
from densecl_bench.cli import main


def test_help_lists_the_commands():
    out = CliRunner().invoke(main, ["--help"]).output
    for command in ("inspect", "convert", "data", "extract", "run", "list", "table", "regress", "pretrain"):
        assert command in out


def test_inspect_and_convert_round_trip(tmp_path):
    net = torchvision.models.resnet18()
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    cli = CliRunner()
    inspect = cli.invoke(main, ["inspect", str(tmp_path / "r18.pth")])
    assert inspect.exit_code == 0, inspect.output
    assert "torchvision" in inspect.output and "resnet18" in inspect.output
    out = cli.invoke(main, ["convert", str(tmp_path / "r18.pth"), "--to", "detectron2", "-o", str(tmp_path / "r18.pkl")])
    assert out.exit_code == 0, out.output
    back = cli.invoke(main, ["convert", str(tmp_path / "r18.pkl"), "--to", "torchvision", "-o",
                             str(tmp_path / "r18_tv.pth")])
    assert back.exit_code == 0, back.output
    original = {k: v for k, v in net.state_dict().items() if not k.startswith("fc.")}
    restored = torch.load(tmp_path / "r18_tv.pth", weights_only=True)
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    assert load_checkpoint(tmp_path / "r18.pkl").layout == "detectron2"


def test_inspect_partial_checkpoint_fails_with_message(tmp_path):
    sd = torchvision.models.resnet18().state_dict()
    del sd["layer4.1.conv2.weight"]
    torch.save(sd, tmp_path / "partial.pth")
    out = CliRunner().invoke(main, ["inspect", str(tmp_path / "partial.pth")])
    assert out.exit_code == 2
    assert "layer4.1.conv2.weight" in out.output


def test_data_demo_check_and_extract(tmp_path, bench_home):
    cli = CliRunner()
    demo = cli.invoke(main, ["data", "demo"])
    assert demo.exit_code == 0, demo.output
    check = cli.invoke(main, ["data", "check", "--root", str(bench_home / "demo")])
    assert check.exit_code == 0 and "[ok] voc07" in check.output
    missing = cli.invoke(main, ["data", "check", "--root", str(tmp_path)])
    assert missing.exit_code == 1 and "VOCdevkit" in missing.output
    args = ["extract", "--ckpt", "random", "--dataset", "voc07", "--split", "test", "--layers", "feature4-5",
            "--workers", "0", "--batch-size", "48"]
    first = cli.invoke(main, args)
    assert first.exit_code == 0, first.output
    assert "feature4: 240 x 9216" in first.output and "feature5: 240 x 8192" in first.output
    cached = list((bench_home / "cache").rglob("*.npy"))
    second = cli.invoke(main, args)
    assert second.output == first.output and list((bench_home / "cache").rglob("*.npy")) == cached


def test_pretrain_epochs_sets_the_cosine_schedule_length(tmp_path):
    """`--epochs N`: the cosine spans N epochs; `--stop-after-epochs` stops within it and a re-run resumes."""
    import math

    import numpy as np
    import yaml
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(8):
        folder = tmp_path / "data" / "train" / f"n0{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(folder / f"{i}.png")
    cfg = {"seed": 0, "model": {"arch": "resnet18", "queue_len": 16, "feat_dim": 8, "momentum": 0.9,
                                "temperature": 0.2, "loss_lambda": 0.5, "loss_lambda_warmup_iters": 0},
           "data": {"image_size": 32, "batch_size_per_gpu": 4, "num_workers": 0, "on_bad_image": "raise"},
           "optimizer": {"lr": 0.05, "lr_reference_batch": 4, "momentum": 0.9, "weight_decay": 1e-4},
           "lr_schedule": "cosine", "epochs": 200, "checkpoint_interval": 10, "keep_checkpoints": 1,
           "log_interval": 1, "precision": "fp32", "channels_last": False, "compile": False}
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    cli = CliRunner()
    args = ["pretrain", str(tmp_path / "tiny.yaml"), "--data-root", str(tmp_path / "data"), "--work-dir",
            str(tmp_path / "work"), "--device", "cpu"]

    def lr_and_epoch() -> tuple[float, int]:
        ckpt = torch.load(tmp_path / "work" / "latest.pth", weights_only=False)
        return ckpt["optimizer"]["param_groups"][0]["lr"], ckpt["meta"]["epoch"]

    out = cli.invoke(main, [*args, "--epochs", "4", "--stop-after-epochs", "2"])
    assert out.exit_code == 0, out.output
    lr, epoch = lr_and_epoch()  # the LR of epoch index 1 of a 4-epoch cosine (200 would give ~0.05)
    assert epoch == 2 and lr == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 1 / 4)))
    moved = cli.invoke(main, [*args, "--epochs", "6"])
    assert moved.exit_code == 2 and "4-epoch schedule, this run has 6" in moved.output
    done = cli.invoke(main, [*args, "--epochs", "4"])
    assert done.exit_code == 0, done.output
    lr, epoch = lr_and_epoch()
    assert epoch == 4 and lr == pytest.approx(0.05 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    help_text = " ".join(cli.invoke(main, ["pretrain", "--help"]).output.split())
    assert "the cosine schedule spans this many epochs" in help_text


def test_inspect_and_convert_refuse_damaged_or_self_overwriting_files(tmp_path):
    cli = CliRunner()
    sd = torchvision.models.resnet18().state_dict()
    sd["layer1.0.bn2.running_mean"][0] = float("inf")
    torch.save(sd, tmp_path / "inf.pth")
    out = cli.invoke(main, ["inspect", str(tmp_path / "inf.pth")])
    assert out.exit_code == 2 and "NaN or inf" in out.output and "layer1.0.bn2.running_mean (1 of 64)" in out.output
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "ok.pth")
    data = (tmp_path / "ok.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 3])
    out = cli.invoke(main, ["inspect", str(tmp_path / "cut.pth")])
    assert out.exit_code == 2 and "truncated or corrupt" in out.output and "persistent id" not in out.output
    out = cli.invoke(main, ["convert", str(tmp_path / "ok.pth"), "--to", "torchvision", "-o", str(tmp_path / "ok.pth")])
    assert out.exit_code == 2 and "the output is the input file" in out.output
    assert (tmp_path / "ok.pth").read_bytes() == data
