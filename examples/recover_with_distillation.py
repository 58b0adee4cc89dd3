"""Prune a trained ViT to 40% of its MACs, then win the accuracy back by knowledge distillation.

A small timm ViT (4 blocks, 4 heads of 32, 16x16 inputs in 4x4 patches) is trained on scikit-learn's
`load_digits` (1797 real handwritten digits, 8x8, upscaled); SNP prunes it one-shot to 40% of its
MACs, calibrated on training images; then the pruned GraphModule is fine-tuned with the dense model
as teacher (KL divergence of temperature-softened logits + cross-entropy), and, for comparison,
with cross-entropy alone for the same epochs.  Test top-1 is printed after each step.

    python examples/recover_with_distillation.py
    python examples/recover_with_distillation.py --target-macs 0.25 --epochs 20
"""
from __future__ import annotations

import argparse
import copy
import time

import timm
import torch
import torch.nn.functional as F

import snp_fx
from snp_fx.cost import count_macs, count_params


def digits(seed=0):
    """(train, test) tensors: images (N, 3, 16, 16) in [-1, 1], labels (N,); a fixed 75/25 split."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 8 - 1  # pixel values 0..16
    x = F.interpolate(x[:, None], scale_factor=2, mode="nearest").expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(d.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[:len(y) // 4], order[len(y) // 4:]
    return (x[train], y[train]), (x[test], y[test])


def vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=128, depth=4,
                             num_heads=4, num_classes=10)


@torch.inference_mode()
def top1(model, x, y) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()


def fit(model, train, epochs, lr, teacher=None, temperature=4.0, alpha=0.7, seed=0):
    """AdamW with a cosine schedule.  With a teacher: alpha * T^2 * KL(student_T || teacher_T) + (1 - alpha) * CE."""
    x, y = train
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * -(-len(y) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y)).split(64):
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx], label_smoothing=0.1 if teacher is None else 0.0)
            if teacher is not None:
                with torch.no_grad():
                    soft = F.log_softmax(teacher(x[idx]) / temperature, dim=-1)
                kd = F.kl_div(F.log_softmax(logits / temperature, dim=-1), soft, log_target=True,
                              reduction="batchmean")
                loss = alpha * temperature ** 2 * kd + (1 - alpha) * loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target-macs", type=float, default=0.4, help="MACs kept, as a fraction of the dense model")
    ap.add_argument("--dense-epochs", type=int, default=40, help="training of the dense model")
    ap.add_argument("--epochs", type=int, default=10, help="fine-tuning of the pruned model")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    train, (xte, yte) = digits(args.seed)
    t = time.perf_counter()
    torch.manual_seed(args.seed)
    dense = fit(vit(), train, args.dense_epochs, lr=2e-3, seed=args.seed)
    print(f"dense: trained {args.dense_epochs} epochs in {time.perf_counter() - t:.0f} s, "
          f"test top-1 {top1(dense, xte, yte):.1%}", flush=True)

    x = train[0][:1]
    calib = train[0][:512].split(64)  # training images only: the test set stays unseen
    pruned = snp_fx.prune(dense, x, target_macs=args.target_macs, calibration=calib, progress=False)
    m0, m1 = count_macs(dense, (x,)), count_macs(pruned, (x,))
    p0, p1 = count_params(dense), count_params(pruned)
    print(f"pruned to {m1 / m0:.1%} of the MACs ({m0 / 1e6:.2f} M -> {m1 / 1e6:.2f} M), "
          f"{p1 / p0:.1%} of the params ({p0 / 1e6:.3f} M -> {p1 / 1e6:.3f} M)", flush=True)
    rows = [("dense", top1(dense, xte, yte)), ("pruned, one-shot", top1(pruned, xte, yte))]

    t = time.perf_counter()
    ce = fit(copy.deepcopy(pruned), train, args.epochs, lr=5e-4, seed=args.seed)
    rows.append((f"pruned + {args.epochs} epochs cross-entropy", top1(ce, xte, yte)))
    kd = fit(copy.deepcopy(pruned), train, args.epochs, lr=5e-4, teacher=dense.eval(), seed=args.seed)
    rows.append((f"pruned + {args.epochs} epochs distillation (KL T=4 + CE)", top1(kd, xte, yte)))
    print(f"fine-tuning: {time.perf_counter() - t:.0f} s\n")
    print(f"| model ({len(yte)} test digits) | top-1 |\n|---|---|")
    for name, acc in rows:
        print(f"| {name} | {acc:.1%} |")


if __name__ == "__main__":
    main()
