"""DenseCL pretraining: correspondence, momentum, queues, loss, resume, checkpoint layout, DDP.

Tiny inputs: a ResNet-18 backbone (feature5 = 512 channels, the neck follows it) at 64 px (2x2 grid).
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from densecl_bench import config
from densecl_bench.config import ConfigError
from densecl_bench.data.base import ImageList
from densecl_bench.engine import HookBase, NonFiniteLoss, TrainingInterrupted
from densecl_bench.pretrain import DenseCL, QueueSizeError, dense_correspondence, train
from densecl_bench.pretrain.augment import EpochSampler, GaussianBlur, TwoViewDataset, mocov2

torch.set_num_threads(1)
HERE = Path(__file__).parent


def tiny_model(**kw) -> DenseCL:
    torch.manual_seed(0)
    args = dict(arch="resnet18", queue_len=16, feat_dim=8, momentum=0.9, temperature=0.2, loss_lambda=0.5)
    args.update(kw)
    return DenseCL(**args)


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def tiny_cfg(**over) -> dict:
    cfg = {
        "_config": "tiny", "seed": 0,
        "model": {"arch": "resnet18", "queue_len": 16, "feat_dim": 8, "momentum": 0.9, "temperature": 0.2,
                  "loss_lambda": 0.5, "loss_lambda_warmup_iters": 0},
        "data": {"image_size": 64, "batch_size_per_gpu": 4, "num_workers": 0, "on_bad_image": "raise"},
        "optimizer": {"lr": 0.05, "lr_reference_batch": 4, "momentum": 0.9, "weight_decay": 1e-4},
        "lr_schedule": "cosine", "epochs": 2, "checkpoint_interval": 1, "keep_checkpoints": 5, "log_interval": 1,
        "precision": "fp32", "channels_last": True, "compile": False,
    }
    return config.merge(cfg, over)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> ImageList:
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    paths, labels = [], []
    for i in range(12):
        arr = (rng.random((48, 56, 3)) * 255).astype(np.uint8)
        arr[: 24, :, i % 3] = 255  # a little structure per class
        p = root / f"{i:03d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
        labels.append(i % 3)
    return ImageList("tiny", root, paths, np.array(labels), ["a", "b", "c"])


def test_dense_correspondence_hand_built():
    # 3-d features on a 2x2 grid. The key positions hold the query vectors permuted (and rescaled,
    # which cosine similarity ignores), so each query position must find its own vector.
    q = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]]).T  # C x S^2
    perm = torch.tensor([2, 0, 3, 1])  # key position j holds query vector perm[j]
    k = q[:, perm] * torch.tensor([1.0, 3.0, 0.5, 2.0])
    idx = dense_correspondence(F.normalize(q, dim=0)[None], F.normalize(k, dim=0)[None])
    # query i is at key position j with perm[j] == i
    assert idx.tolist() == [[1, 3, 0, 2]]
    # an off-grid query: [1, 0.2, 0] is closest to [1, 0, 0] (key position 1)
    q2 = torch.tensor([[1.0, 0.2, 0]]).T
    assert dense_correspondence(F.normalize(q2, dim=0)[None], F.normalize(k, dim=0)[None]).tolist() == [[1]]


def test_key_encoder_no_grad_and_momentum_rule():
    model = tiny_model(momentum=0.9)
    with torch.no_grad():  # make query and key encoders differ
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    q0 = [p.detach().clone() for p in model.encoder_q.parameters()]
    k0 = [p.detach().clone() for p in model.encoder_k.parameters()]
    x = torch.randn(4, 3, 64, 64)
    model(x, x.flip(3))["loss"].backward()
    for pq, pk, a, b in zip(model.encoder_q.parameters(), model.encoder_k.parameters(), q0, k0, strict=True):
        assert not pk.requires_grad and pk.grad is None
        assert pq.grad is not None
        torch.testing.assert_close(pk.detach(), 0.9 * b + 0.1 * a, rtol=2.5e-7, atol=1e-9)  # fp32 rounding


def test_queue_enqueue_wraps_and_divisibility_error():
    model = tiny_model(queue_len=8, feat_dim=3)
    for step in range(3):
        keys = torch.full((4, 3), float(step + 1))
        model.enqueue(model.queue, model.queue_ptr, keys)
        assert int(model.queue_ptr) == [4, 0, 4][step]
    assert (model.queue[:, 4:] == 2).all() and (model.queue[:, :4] == 3).all()  # step 3 overwrote the oldest
    with pytest.raises(QueueSizeError, match="not a multiple"):
        model.check_batch(3)


def test_train_rejects_queue_not_divisible(images, tmp_path):
    with pytest.raises(QueueSizeError, match="queue_len 18 is not a multiple of the global batch 4"):
        train(tiny_cfg(model={"queue_len": 18}), images, tmp_path)


def _nce(pos: float, negs: torch.Tensor, t: float) -> float:
    logits = torch.cat([torch.tensor([pos]), negs]).double() / t
    return float(-(logits[0] - torch.logsumexp(logits, 0)))


def _reference_losses(model: DenseCL, im_q, im_k) -> tuple[float, float]:
    """The paper's definitions, computed row by row from a copy of the model (same BN mode)."""
    m = copy.deepcopy(model)
    queue, queue2, t = m.queue.clone(), m.queue2.clone(), m.temperature
    with torch.no_grad():
        for pk, pq in zip(m.encoder_k.parameters(), m.encoder_q.parameters(), strict=True):
            pk.copy_(m.momentum * pk + (1 - m.momentum) * pq)

        def enc(e, x):
            f = e[0](x, ("feature5",))["feature5"]
            g = e[1].mlp(f.mean((2, 3)))
            d = e[1].mlp2(f)
            return f.flatten(2), g, d.flatten(2)

        fq, gq, dq = enc(m.encoder_q, im_q)
        fk, gk, dk = enc(m.encoder_k, im_k)
    n, _, s2 = fq.shape
    single, dense = [], []
    for b in range(n):
        zq, zk = F.normalize(gq[b], dim=0), F.normalize(gk[b], dim=0)
        single.append(_nce(float(zq @ zk), zq @ queue, t))
        for i in range(s2):
            cos = torch.stack([F.cosine_similarity(fq[b, :, i], fk[b, :, j], dim=0) for j in range(s2)])
            j = int(cos.argmax())
            zqi, zkj = F.normalize(dq[b, :, i], dim=0), F.normalize(dk[b, :, j], dim=0)
            dense.append(_nce(float(zqi @ zkj), zqi @ queue2, t))
    return float(np.mean(single)), float(np.mean(dense))


def test_loss_equals_paper_definition():
    model = tiny_model(loss_lambda=0.3)
    torch.manual_seed(1)
    im_q, im_k = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    single, dense = _reference_losses(model, im_q, im_k)
    out = model(im_q, im_k)
    assert out["loss_single"].item() == pytest.approx(0.7 * single, rel=1e-5)
    assert out["loss_dense"].item() == pytest.approx(0.3 * dense, rel=1e-5)
    assert out["loss"].item() == pytest.approx(0.7 * single + 0.3 * dense, rel=1e-5)
    assert int(model.queue_ptr) == int(model.queue2_ptr) == 4


def test_lambda_zero_is_mocov2():
    torch.manual_seed(2)
    im_q, im_k = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    model = tiny_model(loss_lambda=0.0)
    plain = copy.deepcopy(model)
    queue = model.queue.clone()
    ref = copy.deepcopy(model)
    ref.momentum_update()
    with torch.no_grad():
        q = F.normalize(ref.encoder_q[1].mlp(ref.encoder_q[0](im_q, ("feature5",))["feature5"].mean((2, 3))), dim=1)
        k = F.normalize(ref.encoder_k[1].mlp(ref.encoder_k[0](im_k, ("feature5",))["feature5"].mean((2, 3))), dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue], 1) / 0.2
    moco = float(F.cross_entropy(logits, torch.zeros(4, dtype=torch.long)))
    out = model(im_q, im_k)
    assert out["loss"].item() == pytest.approx(moco, rel=1e-5)
    assert out["loss_dense"].item() == 0.0
    # the dense-free path (perf's MoCo v2 baseline) gives the same loss and leaves queue2 alone
    q2 = plain.queue2.clone()
    out_plain = plain(im_q, im_k, dense=False)
    assert out_plain["loss"].item() == pytest.approx(moco, rel=1e-5)
    assert torch.equal(plain.queue2, q2) and int(plain.queue2_ptr) == 0


def test_mocov2_augmentation_and_sampler(images):
    t = mocov2(64)
    names = [type(op).__name__ for op in t.transforms]
    assert names == ["RandomResizedCrop", "RandomApply", "RandomGrayscale", "GaussianBlur",
                     "RandomHorizontalFlip", "ToTensor", "Normalize"]
    rrc, jitter, gray, blur, flip = t.transforms[:5]
    assert rrc.size == (64, 64) and rrc.scale == (0.2, 1.0)
    assert jitter.p == 0.8 and jitter.transforms[0].hue == (-0.1, 0.1)
    assert jitter.transforms[0].brightness == (0.6, 1.4)
    assert gray.p == 0.2 and flip.p == 0.5
    assert isinstance(blur, GaussianBlur) and (blur.sigma_min, blur.sigma_max, blur.p) == (0.1, 2.0, 0.5)
    ds = TwoViewDataset(images, t, seed=0)
    state = torch.get_rng_state()
    a1, a2 = ds[(3, 0)]
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG is untouched
    b1, b2 = ds[(3, 0)]
    assert torch.equal(a1, b1) and torch.equal(a2, b2) and not torch.equal(a1, a2)
    assert not torch.equal(ds[(3, 1)][0], a1)  # another epoch, other views
    # two ranks split one permutation into disjoint halves of whole global batches; the order is the epoch's
    r0, r1 = (EpochSampler(11, 2, rank=r, world_size=2) for r in (0, 1))
    r0.set_epoch(1)
    r1.set_epoch(1)
    assert len(r0) == len(r1) == 4 and not {i for i, _ in r0} & {i for i, _ in r1}
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(0 + 1)).tolist()  # seed + epoch
    assert list(r0) == [(i, 1) for i in perm[0:8:2]] and list(r1) == [(i, 1) for i in perm[1:8:2]]


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_same(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        elif isinstance(a[key], list):
            assert len(a[key]) == len(b[key])
            for x, y in zip(a[key], b[key], strict=True):
                _assert_same({"v": x}, {"v": y})
        else:
            assert a[key] == b[key], key


def test_resume_after_interrupt_is_bit_identical(images, tmp_path):
    cfg = tiny_cfg()
    full = train(cfg, images, tmp_path / "full")  # 2 epochs x 3 iterations

    class Interrupt(HookBase):
        def after_step(self) -> None:
            if self.trainer.iter == 4:  # mid epoch 2
                os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted) as err:
        train(cfg, images, tmp_path / "cut", hooks=[Interrupt()])
    assert err.value.exit_code == 128 + signal.SIGTERM
    cut = load_ckpt(tmp_path / "cut" / "latest.pth")
    assert (cut["meta"]["epoch"], cut["meta"]["iter"], cut["meta"]["iter_in_epoch"]) == (1, 4, 1)
    resumed = train(cfg, images, tmp_path / "cut")
    a, b = load_ckpt(full), load_ckpt(resumed)
    assert a["meta"]["iter"] == b["meta"]["iter"] == 6 and a["meta"]["epoch"] == 2
    _assert_same(a["state_dict"], b["state_dict"])
    _assert_same(a["optimizer"], b["optimizer"])
    _assert_same(a["rng"], b["rng"])
    assert sorted(p.name for p in (tmp_path / "full").glob("*.pth")) == ["epoch_1.pth", "epoch_2.pth", "latest.pth"]
    assert (tmp_path / "cut" / "metrics.jsonl").read_text() == (tmp_path / "full" / "metrics.jsonl").read_text()


def test_metrics_record_both_loss_terms_and_their_sum(images, tmp_path, capsys):
    train(tiny_cfg(epochs=1), images, tmp_path)
    lines = [line for line in capsys.readouterr().out.splitlines() if " iter " in line]
    assert len(lines) == 3 and all("loss_single" in line and "loss_dense" in line for line in lines)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["iter"] for r in records] == [1, 2, 3, 3]  # log_interval 1, then the epoch's record
    for r in records[:3]:
        assert r["loss"] == pytest.approx(r["loss_single"] + r["loss_dense"], rel=1e-6)
    epoch = records[3]
    assert epoch["epoch"] == 1 and epoch["lr"] == 0.05  # cosine by epoch: epoch 0 runs at the base LR
    assert epoch["loss_dense"] == pytest.approx(sum(r["loss_dense"] for r in records[:3]) / 3, rel=1e-12)


@pytest.fixture(scope="module")
def stripes(tmp_path_factory) -> ImageList:
    """32 two-colour stripe patterns (angle, period and colours drawn per image): every crop of an image
    keeps its texture, so views of one image are alike and the instance task has a signal from the start."""
    root = tmp_path_factory.mktemp("stripes")
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:112, :112]
    paths = []
    for i in range(32):
        angle, period = rng.uniform(0, np.pi), rng.uniform(3, 12)
        on = np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period) > 0
        a, b = rng.integers(0, 256, (2, 3))
        paths.append(root / f"{i:02d}.png")
        Image.fromarray(np.where(on[..., None], a, b).astype(np.uint8)).save(paths[-1])
    return ImageList("stripes", root, paths, np.zeros(32, dtype=np.int64), ["stripes"])


def test_global_term_falls_below_chance(stripes, tmp_path):
    # The global (MoCo) half must learn. Once the queue (2 batches) holds only real keys, the untrained network
    # scores about chance, ln(K + 1) = 2.83 (2.69-2.90 here with the LR at 0), and so does a global half whose
    # gradient is cut (q detached in its loss: 2.69 at best); this run reaches 2.13 within 8 iterations.
    cfg = tiny_cfg(epochs=2, model={"momentum": 0.9}, data={"image_size": 112, "batch_size_per_gpu": 8},
                   optimizer={"lr": 0.00375, "lr_reference_batch": 8})
    train(cfg, stripes, tmp_path)
    per_iter: dict[int, float] = {}
    for line in (tmp_path / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)  # an epoch's record follows its last iteration's under the same iter: keep the first
        per_iter.setdefault(r["iter"], r["loss_single"] / 0.5)
    learnt = [per_iter[i] for i in sorted(per_iter) if i > 2]
    assert min(learnt) < np.log(16 + 1) - 0.4, learnt


def test_resume_needs_the_same_global_batch_and_no_resume_starts_afresh(images, tmp_path):
    train(tiny_cfg(epochs=2), images, tmp_path, max_epochs=1)
    with pytest.raises(ConfigError, match="global batch of 4, this run has 6"):
        train(tiny_cfg(epochs=2, data={"batch_size_per_gpu": 6}, model={"queue_len": 18}), images, tmp_path)
    with pytest.raises(ConfigError, match="belongs to another run: .*--no-resume"):
        train(tiny_cfg(epochs=2, seed=1), images, tmp_path)  # never silently overwritten
    first = load_ckpt(tmp_path / "epoch_1.pth")["state_dict"]
    train(tiny_cfg(epochs=2), images, tmp_path, resume=False, max_epochs=1)
    again = load_ckpt(tmp_path / "latest.pth")
    assert again["meta"]["iter"] == 3  # the first epoch again, not the second
    _assert_same(first, again["state_dict"])


def test_checkpoint_layout_and_foundation_loader(images, tmp_path):
    latest = train(tiny_cfg(epochs=1), images, tmp_path)
    ckpt = load_ckpt(latest)  # weights_only=True
    assert set(ckpt) >= {"meta", "state_dict", "optimizer"}
    sd = ckpt["state_dict"]
    assert sd["queue"].shape == sd["queue2"].shape == (8, 16)
    assert int(sd["queue_ptr"]) == int(sd["queue2_ptr"]) == (3 * 4) % 16
    assert {"encoder_q.1.mlp.0.weight", "encoder_q.1.mlp2.2.bias", "encoder_k.0.conv1.weight",
            "backbone.layer4.1.bn2.running_var"} <= set(sd)
    assert ckpt["meta"]["epoch"] == 1 and ckpt["meta"]["config"]["model"]["arch"] == "resnet18"
    from densecl_bench.checkpoint import load_checkpoint

    loaded = load_checkpoint(latest)
    assert loaded.arch == "resnet18"
    backbone = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    assert loaded.state_dict.keys() == backbone.keys()
    for k, v in backbone.items():
        assert torch.equal(loaded.state_dict[k], v), k
        assert torch.equal(sd[f"encoder_q.0.{k}"], v)


def test_nan_loss_stops(images, tmp_path):
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at iteration 2 \(epoch 1, lr inf\): loss_single nan, loss_dense nan"):
        train(tiny_cfg(optimizer={"lr": float("inf")}), images, tmp_path)


def test_cli_reports_a_nan_loss_as_an_error_line(images, tmp_path):
    from click.testing import CliRunner

    from densecl_bench.cli import main

    for i, path in enumerate(images.paths):
        (tmp_path / "data" / "train" / f"n{i % 3}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "train" / f"n{i % 3}" / path.name).write_bytes(path.read_bytes())
    cfg = tmp_path / "nan.yaml"
    cfg.write_text(json.dumps(tiny_cfg(optimizer={"lr": float("inf")}, epochs=1)).replace("Infinity", ".inf"))
    args = ["pretrain", str(cfg), "--data-root", str(tmp_path / "data"), "--work-dir", str(tmp_path / "work")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and "error: pretrain: the loss is nan at iteration 2" in res.output


def test_packaged_configs_follow_protocol():
    cfg = config.load("densecl_r50_8xb32-coslr-200e", "pretrain")
    assert cfg["model"] == {"arch": "resnet50", "queue_len": 65536, "feat_dim": 128, "momentum": 0.999,
                            "temperature": 0.2, "loss_lambda": 0.5, "loss_lambda_warmup_iters": 0}
    assert cfg["data"]["image_size"] == 224 and cfg["data"]["batch_size_per_gpu"] * 8 == 256
    assert cfg["optimizer"] == {"lr": 0.03, "lr_reference_batch": 256, "momentum": 0.9, "weight_decay": 1e-4}
    assert (cfg["lr_schedule"], cfg["epochs"], cfg["checkpoint_interval"]) == ("cosine", 200, 10)
    demo = config.load("densecl_demo", "pretrain")
    assert demo["model"]["queue_len"] % demo["data"]["batch_size_per_gpu"] == 0 and demo["data"]["demo"]
    assert demo["precision"] == "fp32"  # bf16 would apply on CPU too and change the demo numbers
    # the demo's two learning aids (perf/RESULTS.md, issue 17), absent from the recipe, which keeps §1.1/§1.2
    assert demo["model"]["zero_init_residual"] is True and "zero_init_residual" not in cfg["model"]
    assert demo["data"]["augmentation"] == {"color_jitter_p": 0.0, "grayscale_p": 0.5}
    assert "augmentation" not in cfg["data"]
    assert demo["data"]["image_size"] >= 97  # res5 grid 4x4 or finer (ceil(97 / 32) = 4)


def test_two_process_gloo_run(images, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "pretrain_ddp_script.py"), str(images.root), str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ckpt = load_ckpt(tmp_path / "latest.pth")
    assert ckpt["meta"]["global_batch"] == 8 and ckpt["meta"]["iter"] == 1
    assert int(ckpt["state_dict"]["queue_ptr"]) == 8  # both ranks' 4 keys were enqueued
    assert "ranks agree" in res.stdout


def test_zero_init_residual_starts_every_block_as_the_identity():
    # a demo-schedule option (off in the recipe, §1.1): the last BN of each block at 0, in both encoders
    blocks = lambda enc: [m for m in enc.modules() if hasattr(m, "conv2") and hasattr(m, "bn2")]  # noqa: E731
    on, off = tiny_model(zero_init_residual=True), tiny_model()
    for enc in (on.encoder_q[0], on.encoder_k[0]):
        assert blocks(enc) and all(not b.bn2.weight.any() for b in blocks(enc))  # BasicBlock: bn2 is the last
    assert all(b.bn2.weight.eq(1).all() for b in blocks(off.encoder_q[0]))
    x = torch.randn(2, 3, 64, 64)
    stem = on.encoder_q[0]
    with torch.no_grad():
        f = stem(x, ("feature2",))["feature2"]
        pre = stem.maxpool(stem.relu(stem.bn1(stem.conv1(x))))
    assert torch.allclose(f, pre)  # layer1 is the identity (64 -> 64 channels, no downsample)


def test_config_augmentation_overrides_reach_training_and_unknown_keys_fail(images, tmp_path):
    with pytest.raises(ConfigError, match="unknown keys"):
        train(tiny_cfg(data={"augmentation": {"jitter": 0.1}}), images, tmp_path / "bad")
    with pytest.raises(ConfigError, match="zero_init_residual"):
        train(tiny_cfg(model={"zero_init_residual": "yes"}), images, tmp_path / "bad2")
