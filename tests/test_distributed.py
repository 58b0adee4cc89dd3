"""Calibration across processes: with a torch.distributed (gloo) group, each rank streams its own
shard of the calibration data and the sums are all-reduced, so 2 processes make the same plan and
weights as 1 process given all the data."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import snp_fx

timm = pytest.importorskip("timm")


def model_and_data():
    from timm.models.vision_transformer import VisionTransformer
    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=5).eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(2, 3, 32, 32, generator=g) for _ in range(4)]
    return model, batches


def prune(model, batches, presets=(None, "best")):
    x = batches[0]
    out = {}
    for preset in presets:  # SNP scores; exact q/k selection (pair Grams) + compensation (input Grams)
        p = snp_fx.prune(model, x, target_macs=0.6, calibration=batches, preset=preset, progress=False)
        out[preset] = (p.meta["snp_plan"], {k: v.clone() for k, v in p.state_dict().items()},
                       p.meta.get("snp_compensation", []))
    return out


def _rank(rank, world, port, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, batches = model_and_data()
        result = prune(model, batches[rank::world])  # this rank's shard
        if rank == 0:
            torch.save(result, path)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_equal_one_process_with_all_the_data(tmp_path):
    path = str(tmp_path / "rank0.pt")
    mp.spawn(_rank, args=(2, _free_port(), path), nprocs=2, join=True)
    two = torch.load(path, weights_only=False)
    model, batches = model_and_data()
    one = prune(model, batches)
    for preset in one:
        assert two[preset][0] == one[preset][0]  # the same plan
        w1, w2 = one[preset][1], two[preset][1]
        assert w1.keys() == w2.keys()
        for k in w1:
            assert torch.allclose(w1[k], w2[k], rtol=1e-5, atol=1e-6), k
    # not vacuous: half the data alone gives other scores, hence another plan
    assert prune(model, batches[::2], presets=[None])[None][0] != one[None][0]
    assert any(r["applied"] for r in two["best"][2])  # and a layer was refit from the summed Grams
