"""The shipped configs (full profile) carry the published protocol values of PROTOCOLS.md.

A guard against silent drift: every value below is a literal from the MMSelfSup 0.x configs cited
in PROTOCOLS.md (section in the comment). Variants must stay in named profiles.
"""

import pytest

from densecl_bench import config
from densecl_bench.svm import cost_grid

EXPECTED = {
    ("benchmarks", "svm_voc07"): {  # §2.2, §2.3
        "transform": "voc_svm", "pooling": "protocol", "image_size": 224, "cv_folds": 3,
        "intercept_scaling": 1.0, "costs": "mmselfsup",
        "layers": ["feature1", "feature2", "feature3", "feature4", "feature5"],
    },
    ("benchmarks", "svm_voc07_lowshot"): {  # §3
        "ks": [1, 2, 4, 8, 16, 32, 64, 96], "samples": 5, "cost_select": "test", "costs": "mmselfsup",
    },
    ("benchmarks", "knn_imagenet"): {  # §5
        "ks": [10, 20, 100, 200], "temperature": 0.07, "l2_normalize": True, "layer": "feature5",
        "transform": "center_crop", "image_size": 224, "query_chunk": 500,
    },
    ("benchmarks", "resnet50_mhead_linear-8xb32-steplr-90e_in1k"): {  # §4.1, §4.2
        "lr": 0.01, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4, "lr_steps": [30, 60, 90],
        "epochs": 90, "total_batch_size": 256, "train_aug": "imagenet_mhead", "test_aug": "center_crop",
    },
    ("benchmarks", "resnet50_linear-8xb32-steplr-100e_in1k"): {  # §4.2 AvgPool column
        "lr": 30.0, "momentum": 0.9, "weight_decay": 0.0, "lr_steps": [60, 80], "epochs": 100,
        "total_batch_size": 256, "pooling": "global",
    },
    ("benchmarks", "resnet50_mhead_8xb32-steplr-28e_places205"): {  # §4.2 Places205
        "lr": 0.01, "nesterov": True, "weight_decay": 1e-4, "lr_steps": [7, 14, 21], "epochs": 28,
        "total_batch_size": 256, "train_aug": "places205",
    },
}

PRETRAIN = {  # §1.1, §1.3
    "model.queue_len": 65536, "model.feat_dim": 128, "model.momentum": 0.999, "model.temperature": 0.2,
    "model.loss_lambda": 0.5, "model.loss_lambda_warmup_iters": 0, "data.image_size": 224,
    "data.batch_size_per_gpu": 32, "optimizer.lr": 0.03, "optimizer.lr_reference_batch": 256,
    "optimizer.momentum": 0.9, "optimizer.weight_decay": 1e-4, "lr_schedule": "cosine", "epochs": 200,
    "checkpoint_interval": 10, "model.arch": "resnet50",
}


@pytest.mark.parametrize("kind,name", list(EXPECTED))
def test_benchmark_config_matches_protocol(kind, name):
    cfg = config.load(name, kind)
    for key, value in EXPECTED[(kind, name)].items():
        got = cfg[key]
        assert got == value or (key == "layers" and got == "feature1-5"), (name, key, got)


def test_pretrain_config_matches_protocol():
    cfg = config.load("densecl_r50_8xb32-coslr-200e", "pretrain")
    for dotted, value in PRETRAIN.items():
        node = cfg
        for part in dotted.split("."):
            node = node[part]
        assert node == value, (dotted, node)


def test_mmselfsup_cost_grid_is_the_19_published_costs():
    costs = cost_grid("mmselfsup")
    assert costs[:3] == [1.0, 10.0, 100.0]
    assert costs[3:] == [0.5**k for k in range(4, 20)]
