"""A small timm ViT trained on scikit-learn's load_digits (real handwritten digits, 8x8).

Shared by the benchmarks that need a model whose attention means something.
Trains in about a minute on 2 CPU cores; cached in benchmarks/results/.
"""
import os

import timm
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.path.join(HERE, "results", "digits_vit.pt")


def data():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    x = x[:, None].expand(-1, 3, -1, -1).contiguous()
    x = F.interpolate(x, size=16, mode="nearest")  # 16x16, patch 4: 16 tokens + cls
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = (x - 0.5) / 0.5, y
    x, y = x[perm], y[perm]
    n_test = 397
    return (x[n_test:], y[n_test:]), (x[:n_test], y[:n_test])


def make_model():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=4, num_classes=10,
                             embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0)


def accuracy(model, x, y, batch=256):
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(y), batch):
            correct += (model(x[i:i + batch]).argmax(-1) == y[i:i + batch]).sum().item()
    return correct / len(y)


def trained_model(epochs=60, verbose=True):
    torch.manual_seed(0)
    model = make_model()
    if os.path.exists(CACHE):
        model.load_state_dict(torch.load(CACHE, weights_only=True))
        return model.eval()
    (xtr, ytr), (xte, yte) = data()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    steps = epochs * ((len(ytr) + 63) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(ytr))
        for i in range(0, len(ytr), 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx], label_smoothing=0.1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if verbose and (ep + 1) % 10 == 0:
            print(f"epoch {ep + 1}: test accuracy {accuracy(model, xte, yte):.3f}", flush=True)
    os.makedirs(os.path.dirname(CACHE), exist_ok=True)
    torch.save(model.state_dict(), CACHE)
    return model.eval()


if __name__ == "__main__":
    m = trained_model()
    (_, _), (xte, yte) = data()
    print("test accuracy", accuracy(m, xte, yte))
