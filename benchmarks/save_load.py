"""Saving, loading and interop of a pruned model: file sizes, times, ONNX and dynamic int8.

    python benchmarks/save_load.py [--model deit_small_patch16_224] [--threads 2]

Prunes a random-init timm model (qk 0.5, v 0.25, ffn 0.3, residual 0.2, SNP scores on the example
input), then: the size of every file ``snp_fx.save`` writes and of ``torch.save(pruned)``, the time
of prune / save / load in one process, whether the loaded model equals the saved one bit for bit,
the relative error of the ONNX export (dynamo) run in onnxruntime, and ``quantize_dynamic`` (int8
Linears): state-dict size and relative error of the logits.  Writes benchmarks/results/save_load.json.
"""
import argparse
import io
import os
import tempfile
import time
import warnings

import timm
import torch

import snp_fx
from common import report
from snp_fx.verify import relative_error


def mb(n_bytes: int) -> float:
    return n_bytes / 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    rows = [{"what": "machine", "value": f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, "
                                         f"{args.threads} threads, torch {torch.__version__}"}]

    t = time.perf_counter()
    pruned = snp_fx.prune(model, x, ratios={"qk": 0.5, "v": 0.25, "ffn": 0.3, "residual": 0.2}, progress=False)
    t_prune = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        snp_fx.save(pruned, d)
        t_save = time.perf_counter() - t
        sizes = {name: os.path.getsize(os.path.join(d, name)) for name in sorted(os.listdir(d))}
        t = time.perf_counter()
        loaded = snp_fx.load(d, lambda: timm.create_model(args.model, pretrained=False))
        t_load = time.perf_counter() - t
    rows.append({"what": "saved directory", "value": f"{mb(sum(sizes.values())):.1f} MB: "
                 + ", ".join(f"{name} {mb(n):.3g}" for name, n in sizes.items())})
    buf = io.BytesIO()
    torch.save(pruned, buf)
    rows.append({"what": "torch.save(pruned)", "value": f"{mb(buf.tell()):.1f} MB"})
    rows.append({"what": "time, same process", "value": f"prune {t_prune:.1f} s, save {t_save:.1f} s, "
                 f"load {t_load:.1f} s (load = trace + analysis + rewrite, no scoring)"})
    with torch.no_grad():
        ref = pruned(x)
        same = all(torch.equal(a, b) for a, b in zip(pruned.state_dict().values(), loaded.state_dict().values()))
        rows.append({"what": "load == saved", "value": "bit for bit" if same and torch.equal(loaded(x), ref)
                     else f"differs: relative error {relative_error(loaded(x), ref):.1e}"})

    try:
        import onnxruntime as ort
        with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = os.path.join(d, "m.onnx")
            torch.onnx.export(pruned, (x,), path, dynamo=True)
            sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
            out = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        rows.append({"what": "ONNX (dynamo) in onnxruntime", "value": f"relative error {relative_error(out, ref):.1e}"})
    except ImportError as e:
        rows.append({"what": "ONNX (dynamo) in onnxruntime", "value": f"skipped ({e})"})

    q = torch.ao.quantization.quantize_dynamic(pruned, {torch.nn.Linear}, dtype=torch.qint8)
    sizes = []
    for m in (pruned, q):
        buf = io.BytesIO()
        torch.save(m.state_dict(), buf)
        sizes.append(buf.tell())
    with torch.no_grad():
        err = relative_error(q(x), ref)
    rows.append({"what": "dynamic int8 (quantize_dynamic)", "value": f"state_dict {mb(sizes[0]):.1f} MB -> "
                 f"{mb(sizes[1]):.1f} MB, relative error of the logits {err:.3f} (random init)"})
    print(f"{args.model}, qk=0.5, v=0.25, ffn=0.3, residual=0.2\n")
    report("save_load", [("", "what", ""), ("", "value", "")], rows)


if __name__ == "__main__":
    main()
