"""The foundation commands as a user types them: help, inspect, convert, data demo/check, extract."""

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
