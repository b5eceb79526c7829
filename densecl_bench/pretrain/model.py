"""DenseCL: dense contrastive learning on top of MoCo v2 (query/key encoders, two queues).

Wang, Zhang, Shen, Kong, Li, "Dense Contrastive Learning for Self-Supervised Visual
Pre-Training", CVPR 2021. Parameters and behaviour follow PROTOCOLS.md §1.1 (MMSelfSup 0.x
`mmselfsup/models/algorithms/densecl.py`, `necks/densecl_neck.py`, `heads/contrastive_head.py`;
WXinlong/DenseCL `openselfsup/models/densecl.py`, `necks.py::DenseCLNeck`). Read, not copied.

The module's state-dict keys are MMSelfSup 0.x's (`queue`, `queue_ptr`, `queue2`, `queue2_ptr`,
`encoder_q.0.*`, `encoder_q.1.mlp.*`, `encoder_q.1.mlp2.*`, `encoder_k.*`, `backbone.*`), so our
training checkpoints read like the reference's. `encoder_q.0` is `densecl_bench.backbone.Backbone`,
whose keys are torchvision's; `backbone` is the same module registered a second time, exactly as
the reference does it, which is where the `backbone.*` keys come from.

Shuffle-BN (MoCo): under DDP the key batch is gathered from every rank, permuted, and each rank
encodes a random slice, so BN statistics of the key encoder never come from the same images as the
query's. In a single process there is nothing to shuffle across: BN sees the whole batch either way
(as in the reference on one GPU), so no shuffle is done.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from densecl_bench import dist
from densecl_bench.backbone import Backbone


class QueueSizeError(ValueError):
    """The queue length is not a multiple of the global batch: the FIFO pointer would not wrap cleanly."""


class DenseCLNeck(nn.Module):
    """Global MLP branch and dense 1x1-conv branch on the res5 map (MMSelfSup 0.x `DenseCLNeck`).

    Returns (global projection N x D, dense projection N x D x S^2, pooled dense projection N x D).
    The third output fills queue 2 on the key side only. PyTorch default init (§1.1, MMSS-0.x).
    """

    def __init__(self, in_channels: int = 2048, hid_channels: int = 2048, out_channels: int = 128) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_channels, hid_channels), nn.ReLU(inplace=True), nn.Linear(hid_channels, out_channels)
        )
        self.mlp2 = nn.Sequential(
            nn.Conv2d(in_channels, hid_channels, 1), nn.ReLU(inplace=True), nn.Conv2d(hid_channels, out_channels, 1)
        )

    def forward(self, x: Tensor, dense: bool = True) -> tuple[Tensor, Tensor | None, Tensor | None]:
        g = self.mlp(x.mean(dim=(2, 3)))
        if not dense:
            return g, None, None
        d = self.mlp2(x)
        return g, d.flatten(2), d.mean(dim=(2, 3))


def init_backbone(backbone: Backbone, zero_init_residual: bool = False) -> None:
    """MMSelfSup 0.x backbone init (§1.1): Kaiming normal (fan_out, ReLU) for conv, BN weight 1 / bias 0.

    zero_init_residual: the last BN of every residual block starts at weight 0 (Goyal et al. 2017), so
    each block starts as the identity. Off in the recipe (§1.1); the demo schedule turns it on.
    """
    for m in backbone.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in backbone.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)


def dense_correspondence(q_b: Tensor, k_b: Tensor) -> Tensor:
    """For each query position, the key position whose backbone feature is most similar.

    q_b, k_b: L2-normalised (along C) backbone features, N x C x S^2. Returns N x S^2 indices into the
    key's S^2 positions: argmax_j <q_b[:, :, i], k_b[:, :, j]> (the cosine similarity, §1.1).
    """
    sim = torch.bmm(q_b.transpose(1, 2), k_b)  # N x S^2 (query) x S^2 (key)
    return sim.argmax(dim=2)


def _rows(t: Tensor) -> Tensor:
    """N x D x S^2 -> (N*S^2) x D: one row per grid position."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])


def info_nce(q: Tensor, k: Tensor, bank: Tensor, temperature: float) -> Tensor:
    """MMSelfSup's ContrastiveHead: CE over cat(<q,k>, q^T bank) / T with the positive at index 0.

    q, k: M x D matched rows (L2-normalised); bank: D x K negatives. Written as
    mean(logaddexp(pos, logsumexp(neg)) - pos) with q pre-scaled by 1/T: the same loss without
    materialising the concatenated M x (K+1) logits twice (M = N*S^2 rows against 65536 negatives
    is the largest tensor of the dense branch).
    """
    q = q / temperature
    pos = (q * k).sum(1)
    neg = q @ bank
    return (torch.logaddexp(pos, torch.logsumexp(neg, dim=1)) - pos).mean()


class DenseCL(nn.Module):
    """Query encoder, momentum key encoder, global and dense queues, and the DenseCL loss.

    Args:
        arch: backbone arch; the neck's input width is the backbone's feature5 width (2048 for
            ResNet-50), and `hid_channels` defaults to it (2048 in the reference).
        queue_len: K, the number of negatives in each queue (65536).
        feat_dim: projection dim (128).
        momentum: EMA coefficient of the key encoder (0.999).
        temperature: tau of both contrastive losses (0.2).
        loss_lambda: weight of the dense loss; (1 - lambda) weighs the global loss (0.5).
        hid_channels: hidden width of both neck branches (default: the backbone's feature5 width).
        zero_init_residual: start every residual block as the identity (False in the recipe).
    """

    def __init__(
        self,
        arch: str = "resnet50",
        queue_len: int = 65536,
        feat_dim: int = 128,
        momentum: float = 0.999,
        temperature: float = 0.2,
        loss_lambda: float = 0.5,
        hid_channels: int | None = None,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        backbone = Backbone(arch)
        init_backbone(backbone, zero_init_residual)
        width = backbone.channels["feature5"]
        self.encoder_q = nn.ModuleList([backbone, DenseCLNeck(width, hid_channels or width, feat_dim)])
        self.encoder_k = copy.deepcopy(self.encoder_q)
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.backbone = self.encoder_q[0]
        self.queue_len = queue_len
        self.momentum = momentum
        self.temperature = temperature
        self.loss_lambda = loss_lambda
        self.register_buffer("queue", F.normalize(torch.randn(feat_dim, queue_len), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.register_buffer("queue2", F.normalize(torch.randn(feat_dim, queue_len), dim=0))
        self.register_buffer("queue2_ptr", torch.zeros(1, dtype=torch.long))

    def check_batch(self, global_batch: int) -> None:
        """Fail at start, not mid-epoch, when the queue cannot take whole global batches."""
        if global_batch <= 0 or self.queue_len % global_batch:
            raise QueueSizeError(
                f"queue_len {self.queue_len} is not a multiple of the global batch {global_batch} "
                f"(batch per process x world size); choose a queue length or batch size that divides it"
            )

    @torch.no_grad()
    def momentum_update(self) -> None:
        """k <- m * k + (1 - m) * q over all key-encoder parameters (not buffers), as in MoCo."""
        k_params = list(self.encoder_k.parameters())
        torch._foreach_mul_(k_params, self.momentum)
        torch._foreach_add_(k_params, list(self.encoder_q.parameters()), alpha=1.0 - self.momentum)

    @torch.no_grad()
    def enqueue(self, queue: Tensor, ptr: Tensor, keys: Tensor) -> None:
        """FIFO: write the keys gathered from every rank at `ptr` (columns), then advance and wrap."""
        keys = dist.all_gather_cat(keys)
        n = keys.shape[0]
        self.check_batch(n)
        start = int(ptr)
        queue[:, start : start + n] = keys.T.to(queue.dtype)
        ptr[0] = (start + n) % self.queue_len

    def _encode(self, encoder: nn.ModuleList, x: Tensor, dense: bool) -> tuple[Tensor, ...]:
        """Backbone res5 map -> (global z, dense z, pooled dense z, backbone feature), fp32, normalised."""
        feat = encoder[0](x, ("feature5",))["feature5"]
        g, d, d_pool = encoder[1](feat, dense)
        g = F.normalize(g.float(), dim=1)
        if not dense:
            return g, None, None, None
        return (
            g,
            F.normalize(d.float(), dim=1),
            F.normalize(d_pool.float(), dim=1),
            F.normalize(feat.detach().float().flatten(2), dim=1),  # only its argmax is used: no graph
        )

    @torch.no_grad()
    def _encode_keys(self, im_k: Tensor, dense: bool) -> tuple[Tensor, ...]:
        if not dist.is_dist():
            return self._encode(self.encoder_k, im_k, dense)
        im_all = dist.all_gather_cat(im_k)
        perm = torch.randperm(im_all.shape[0], device=im_all.device)
        torch_dist.broadcast(perm, src=0)
        n, r = im_k.shape[0], dist.rank()
        outs = self._encode(self.encoder_k, im_all[perm[r * n : (r + 1) * n]], dense)
        unshuffle = torch.argsort(perm)[r * n : (r + 1) * n]
        return tuple(None if t is None else dist.all_gather_cat(t)[unshuffle] for t in outs)

    def forward(self, im_q: Tensor, im_k: Tensor, dense: bool = True, loss_lambda: float | None = None) -> dict[str, Tensor]:
        """One training forward; returns the weighted global and dense losses and their sum `loss`.

        dense=False skips the dense branch entirely (a plain MoCo v2 step of the same code path, used by
        perf/); `loss_lambda` overrides the configured weight (the optional warm-up sets it to 0).
        """
        lam = self.loss_lambda if loss_lambda is None else loss_lambda
        q, q_grid, _, q_b = self._encode(self.encoder_q, im_q, dense)
        with torch.no_grad():
            self.momentum_update()
            k, k_grid, k2, k_b = self._encode_keys(im_k, dense)
        with torch.autocast(device_type=im_q.device.type, enabled=False):
            # the queues change in place below, after this graph was built: hand the loss a copy
            out = {"loss_single": info_nce(q, k, self.queue.clone(), self.temperature) * (1.0 - lam)}
            if dense:
                idx = dense_correspondence(q_b, k_b)
                matched = k_grid.gather(2, idx.unsqueeze(1).expand(-1, k_grid.shape[1], -1))
                out["loss_dense"] = info_nce(_rows(q_grid), _rows(matched), self.queue2.clone(), self.temperature) * lam
        out["loss"] = sum(out.values())
        self.enqueue(self.queue, self.queue_ptr, k)
        if dense:
            self.enqueue(self.queue2, self.queue2_ptr, k2)
        return out


def lambda_at(iteration: int, loss_lambda: float, warmup_iters: int) -> float:
    """The optional λ warm-up (DCL `DenseCLWarmupHook`, off in every reference config): λ = 0 for
    the first `warmup_iters` iterations, the configured λ afterwards."""
    return 0.0 if iteration < warmup_iters else loss_lambda
