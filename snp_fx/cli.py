"""`snp-fx` command: prune or inspect a timm model, a Hugging Face model folder, or `pkg.module:factory`.

`snp-fx prune MODEL --out DIR` prints a report (widths per block, params, MACs,
latency, and for text models the embedding cosine to the dense model on held-out
lines) and writes the pruned model, plan.json, report.md, widths.png and
attention.png into DIR.  Every option is checked before any model is built; bad
input ends with one line on stderr and exit code 2 (``--verbose`` or
``SNP_FX_VERBOSE=1``: the full traceback too).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import json
import os
import random
import sys
import time

import torch

from .errors import SNPError, SNPFXError, brief

DEFAULT_RATIOS = "qk=0.5,v=0.25,ffn=0.3"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _status(msg: str) -> None:
    """Progress lines go to stderr, so stdout is the report alone."""
    print(f"[snp-fx] {msg}", file=sys.stderr, flush=True)


@dataclasses.dataclass
class Source:
    """A loaded model and what its inputs look like."""
    model: torch.nn.Module
    kind: str                     # "image" or "text"
    size: tuple = (3, 224, 224)   # image models: (C, H, W)
    tokenizer: str | None = None  # text models: the tokenizer's folder (None: random token ids only)
    vocab: int = 0                # text models: ids are drawn below this without a tokenizer


def _is_hf_folder(spec: str) -> bool:
    return os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "config.json"))


def check_model_spec(spec: str) -> None:
    """What can be said of MODEL before loading anything."""
    if os.path.isdir(spec) and not _is_hf_folder(spec):
        raise SNPError(f"'{spec}' is a folder without config.json: give a Hugging Face model folder "
                       "(config.json + weights), a timm model name or pkg.module:factory")
    if _is_hf_folder(spec) or ":" in spec:
        return
    if os.sep in spec or spec.endswith((".json", ".safetensors", ".pt", ".pth")):
        raise SNPError(f"'{spec}' does not exist: give a Hugging Face model folder, a timm model name or "
                       "pkg.module:factory")
    import timm
    if spec not in timm.list_models() and spec not in timm.list_pretrained():
        close = difflib.get_close_matches(spec, timm.list_models(), n=4, cutoff=0.75)
        raise SNPError(f"unknown timm model '{spec}'" + (f"; did you mean {', '.join(close)}?" if close else
                       "; see timm.list_models()"))


def load_model(spec: str, pretrained: bool = False, checkpoint: str | None = None,
               tokenizer: str | None = None) -> Source:
    """A timm model name, a Hugging Face model folder, or `pkg.module:factory` returning a module
    (imported from the current folder too); then an optional state dict."""
    check_model_spec(spec)
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise SNPError(f"checkpoint '{checkpoint}' not found")
    if _is_hf_folder(spec):
        src = _load_hf(spec, tokenizer)
    elif ":" in spec:
        src = _load_factory(spec, tokenizer)
    else:
        import timm
        try:
            model = timm.create_model(spec, pretrained=pretrained)
        except Exception as e:  # no network, no cached weights, ...
            raise SNPError(f"could not create '{spec}' (pretrained={pretrained}): {brief(e)}; "
                           "without network access use --checkpoint FILE") from e
        src = Source(model, "image", tuple(model.pretrained_cfg.get("input_size", (3, 224, 224))))
    if checkpoint is not None:
        load_checkpoint(src.model, checkpoint)
    src.model.eval()
    return src


def _load_factory(spec: str, tokenizer: str | None) -> Source:
    mod_name, _, fn = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:  # a factory module in the current folder
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(mod_name), fn)
    except (ImportError, AttributeError) as e:
        raise SNPError(f"cannot import '{spec}': {e}") from e
    try:
        model = factory()
    except Exception as e:
        raise SNPError(f"'{spec}' failed when called without arguments: {brief(e)}") from e
    if not isinstance(model, torch.nn.Module):
        raise SNPError(f"'{spec}' returned {type(model).__name__}, not a torch.nn.Module")
    return _describe(model, tokenizer or _folder_of(model))


def _folder_of(model) -> str | None:
    """The local folder a Hugging Face model was loaded from, if any (its tokenizer lives there)."""
    path = getattr(getattr(model, "config", None), "_name_or_path", None) or getattr(model, "name_or_path", None)
    return path if isinstance(path, str) and os.path.isdir(path) else None


def _describe(model: torch.nn.Module, tokenizer_dir: str | None) -> Source:
    """Image or text model, from Hugging Face's `main_input_name` (`input_size` for other image models)."""
    config = getattr(model, "config", None)
    if getattr(model, "main_input_name", None) == "input_ids":
        if hasattr(config, "use_cache"):
            config.use_cache = False  # decoders export only without a cache (its object is not a pytree)
        return Source(model, "text", tokenizer=tokenizer_dir, vocab=int(getattr(config, "vocab_size", 0) or 0))
    if config is not None and hasattr(config, "image_size"):  # a Hugging Face vision model
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        return Source(model, "image", (getattr(config, "num_channels", 3), size, size))
    return Source(model, "image", tuple(getattr(model, "input_size", (3, 224, 224))))


def _load_hf(folder: str, tokenizer: str | None) -> Source:
    """A Hugging Face model folder, read locally (no hub): its architecture class, else AutoModel."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise SNPError(f"'{folder}' is a Hugging Face model folder: pip install transformers") from None
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if arch else None
        model = (cls or transformers.AutoModel).from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise SNPError(f"cannot load the Hugging Face model in '{folder}': {brief(e)}") from e
    return _describe(model, tokenizer or folder)


def load_checkpoint(model: torch.nn.Module, path: str) -> None:
    """Load a state dict: .safetensors, or a torch.save file (.pt/.pth, tensors only)."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SNPError(f"cannot read checkpoint '{path}': {brief(e)}") from e
    # training scripts often wrap the weights: {"model": ...} / {"state_dict": ...}
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise SNPError(f"checkpoint '{path}' holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise SNPError(f"checkpoint '{path}' does not fit the model: "
                       f"{' '.join(str(e).split())[:300]}") from e


def parse_ratios(text: str) -> dict:
    """'qk=0.5,v=0.25' -> {"qk": 0.5, "v": 0.25}; every fraction in [0, 1)."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, val = part.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            out[key.strip()] = float(val)
        except ValueError:
            raise SNPError(f"bad ratio '{part}': write KIND=FRACTION, e.g. qk=0.5,v=0.25,ffn=0.3") from None
        if not 0.0 <= out[key.strip()] < 1.0:
            raise SNPError(f"ratio '{part}' is the fraction removed and must be in [0, 1), e.g. {key.strip()}=0.5")
    return out


def parse_round_to(text: str):
    """'8' -> 8; 'qk=8,v=8,ffn=64' -> {"qk": 8, "v": 8, "ffn": 64}."""
    try:
        if "=" not in text:
            value = int(text)
        else:
            value = {k.strip(): int(v) for k, _, v in (part.partition("=") for part in text.split(",") if part)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --round-to '{text}': write 8, or per kind qk=8,v=8,ffn=64") from None
    if any(v < 1 for v in (value.values() if isinstance(value, dict) else [value])):
        raise argparse.ArgumentTypeError(f"--round-to '{text}': widths steps must be >= 1")
    return value


def parse_count(text: str) -> float:
    """'2.0G', '500M', '0.5' (a fraction of the dense model) -> number."""
    t = text.strip().upper()
    mult = {"K": 1e3, "M": 1e6, "G": 1e9}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if mult != 1 else t) * mult
    except ValueError:
        value = float("nan")
    if not value > 0 or 1 <= value < 1000:  # 1.5 is neither a fraction nor a plausible count: 1.5G?
        raise SNPError(f"bad target '{text}': write e.g. 2.0G, 500M, or a fraction of the dense model "
                       "such as 0.5") from None
    return value


# ---------------------------------------------------------------------------
# Calibration data
# ---------------------------------------------------------------------------

class ImageFiles(torch.utils.data.Dataset):
    """Images under a folder (flat, or ImageFolder-style class subfolders), read with PIL."""

    def __init__(self, root: str, transform, limit: int | None = None, seed: int = 0):
        from torchvision.datasets.folder import IMG_EXTENSIONS
        if not os.path.isdir(root):
            raise SNPError(f"calibration folder '{root}' does not exist")
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs
                       if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."))
        if not files:
            raise SNPError(f"no images in '{root}' (looked for {', '.join(IMG_EXTENSIONS)}, in subfolders too)")
        if limit and limit < len(files):  # a seeded subset, so every class folder is represented
            files = sorted(random.Random(seed).sample(files, limit))
        self.files, self.transform = files, transform

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        from PIL import Image
        try:
            with Image.open(self.files[i]) as im:
                return self.transform(im.convert("RGB"))
        except OSError as e:
            raise SNPError(f"cannot read image '{self.files[i]}': {e}") from e


def image_transform(model: torch.nn.Module, size: tuple):
    """timm's evaluation transform for the model (resize, center crop, normalise)."""
    import timm.data
    cfg = timm.data.resolve_data_config({}, model=model)
    if tuple(cfg["input_size"]) != tuple(size):  # a model without a timm config: its own input size
        cfg["input_size"] = tuple(size)
    return timm.data.create_transform(**cfg)


def read_lines(path: str) -> list[str]:
    """One text sample per non-empty line."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise SNPError(f"cannot read --calib-text '{path}': {e}") from e


def load_tokenizer(folder: str | None):
    if folder is None:
        raise SNPError("--calib-text needs the model's tokenizer: give --tokenizer DIR")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise SNPError(f"no tokenizer in '{folder}' ({brief(e)}); give --tokenizer DIR "
                       "(a folder with the tokenizer files)") from e


def text_batches(tokenizer, lines: list[str], batch: int, seq_len: int) -> list[dict]:
    """Keyword-input batches of exactly ``batch`` lines padded to ``seq_len`` tokens (one shape: it also
    fits a graph exported for the example's shapes only); the last batch is filled up by repeating its
    last line."""
    out = []
    for i in range(0, len(lines), batch):
        chunk = lines[i:i + batch]
        chunk += chunk[-1:] * (batch - len(chunk))
        enc = tokenizer(chunk, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


@dataclasses.dataclass
class Data:
    """The example input (trace, verify, MACs, latency), calibration batches, held-out batches."""
    example: object
    calibration: object = None
    held_out: list | None = None
    held_out_count: int = 0


def prepare_data(args, src: Source) -> Data:
    g = torch.Generator().manual_seed(args.seed)
    if src.kind == "image":
        if args.calib_text:
            raise SNPError("--calib-text is for text models; this is an image model: use --calib DIR")
        calib = None
        if args.calib:
            ds = ImageFiles(args.calib, image_transform(src.model, src.size), args.calib_max, args.seed)
            _status(f"calibration: {len(ds)} images from {args.calib}")
            calib = torch.utils.data.DataLoader(ds, batch_size=args.calib_batch)
        elif args.calib_random:
            n, b = args.calib_random, args.calib_batch
            calib = [torch.randn(min(b, n - i), *src.size, generator=g) for i in range(0, n, b)]
        # one calibration input if any (a single image: MACs and latency are per image)
        example = next(iter(calib))[:1] if calib is not None else torch.randn(1, *src.size, generator=g)
        return Data(example, calib)
    if args.calib:
        raise SNPError("--calib DIR is for image models; this is a text model: use --calib-text FILE")
    if args.calib_text:
        tokenizer = load_tokenizer(src.tokenizer)
        lines = read_lines(args.calib_text)
        n_eval = args.eval_lines if args.eval_lines is not None else min(64, len(lines) // 4)
        if len(lines) - n_eval < 1:
            raise SNPError(f"--calib-text has {len(lines)} lines and {n_eval} are held out: give more lines "
                           "or a smaller --eval-lines")
        calib_lines = lines[:len(lines) - n_eval]
        if args.calib_max:
            calib_lines = calib_lines[:args.calib_max]
        b = min(args.calib_batch, len(calib_lines))
        calib_lines = calib_lines[:len(calib_lines) // b * b]  # whole batches: the graph has one shape
        calib = text_batches(tokenizer, calib_lines, b, args.seq_len)
        held = text_batches(tokenizer, lines[len(lines) - n_eval:], b, args.seq_len) if n_eval else None
        _status(f"calibration: {len(calib_lines)} lines in batches of {b} x {args.seq_len} tokens; "
                f"{n_eval} held out")
        return Data(calib[0], calib, held, n_eval)
    if not src.vocab:
        raise SNPError("this text model's config has no vocab_size: give --calib-text FILE (and --tokenizer DIR)")
    n = args.calib_random or 1
    b = min(args.calib_batch, n)

    def ids():
        return {"input_ids": torch.randint(0, src.vocab, (b, args.seq_len), generator=g),
                "attention_mask": torch.ones(b, args.seq_len, dtype=torch.long)}
    calib = [ids() for _ in range(-(-n // b))]
    return Data(calib[0], calib if args.calib_random else None)


def _forward(model, inputs):
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs) if isinstance(inputs, tuple) \
        else model(inputs)


def _on(x, device, dtype=None):
    """``x`` (a tensor, dict or list of them) on ``device``; floating tensors cast to ``dtype``."""
    if isinstance(x, torch.Tensor):
        return x.to(device, dtype) if dtype is not None and x.is_floating_point() else x.to(device)
    if isinstance(x, dict):
        return {k: _on(v, device, dtype) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_on(v, device, dtype) for v in x)
    return x


@torch.inference_mode()
def embedding_cosine(dense, pruned, batches: list[dict], count: int) -> dict:
    """Cosine of pruned vs dense sentence embeddings (mask-weighted mean of the last hidden state,
    as sentence-transformers makes them) over the first ``count`` rows of ``batches``."""
    cos = []
    for b in batches:
        outs = []
        for m in (dense, pruned):
            out = m(**b)
            h = out.last_hidden_state if hasattr(out, "last_hidden_state") else \
                out[0] if isinstance(out, (tuple, list)) or hasattr(out, "to_tuple") else out
            mask = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            outs.append(torch.nn.functional.normalize((h.float() * mask).sum(1) / mask.sum(1).clamp(min=1), dim=-1))
        cos.append((outs[0] * outs[1]).sum(-1))
    c = torch.cat(cos)[:count]
    return {"mean": float(c.mean()), "min": float(c.min()), "count": count}


def resolve_leaves(model: torch.nn.Module, text: str | None) -> list:
    """--leaf-modules: module class names or qualified names, comma-separated."""
    if not text:
        return []
    by_class = {type(m).__name__: type(m) for m in model.modules()}
    names = dict(model.named_modules())
    out = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        if item in by_class:
            out.append(by_class[item])
        elif item in names:
            out.append(item)
        else:
            close = difflib.get_close_matches(item, list(by_class) + list(names), n=3)
            raise SNPError(f"--leaf-modules: '{item}' is neither a module class nor a module name of this model"
                           + (f"; did you mean {', '.join(close)}?" if close else ""))
    return out


# ---------------------------------------------------------------------------
# Options, checked before any model is built
# ---------------------------------------------------------------------------

def _budget(args) -> dict:
    given = [o for o, v in (("--ratios", args.ratios), ("--config", args.config), ("--target-macs", args.target_macs),
                            ("--target-params", args.target_params), ("--target-latency", args.target_latency)) if v]
    if len(given) > 1:
        raise SNPError(f"give one budget, not {' and '.join(given)}")
    if args.target_latency:
        from .latency import target_seconds
        try:
            value = float(args.target_latency)
        except ValueError:
            value = args.target_latency  # "35ms", "0.035s"
        if isinstance(value, float) and not 0 < value < 1:
            raise SNPError(f"bad --target-latency '{args.target_latency}': a fraction of the dense latency "
                           "such as 0.5, or a time such as 35ms")
        target_seconds(value, 1.0)  # checks the form
        return {"target_latency": value}
    if args.target_macs:
        return {"target_macs": parse_count(args.target_macs)}
    if args.target_params:
        return {"target_params": parse_count(args.target_params)}
    if args.config:
        from .planning import BUNDLED_CONFIGS
        if args.config not in BUNDLED_CONFIGS and not os.path.isfile(args.config):
            raise SNPError(f"--config '{args.config}' is neither a file nor one of {list(BUNDLED_CONFIGS)}")
        if args.config not in BUNDLED_CONFIGS:
            try:
                with open(args.config) as f:
                    json.load(f)
            except (OSError, ValueError) as e:
                raise SNPError(f"--config '{args.config}' is not a JSON ratio file: {e}") from e
        return {"ratios": args.config}
    return {"ratios": parse_ratios(args.ratios or DEFAULT_RATIOS)}


def check_options(args) -> dict:
    """Everything that can be checked without the model; returns the budget."""
    for name in ("gamma", "calib_batch", "calib_max", "repeats", "seq_len"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise SNPError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if getattr(args, "eval_lines", None) is not None and args.eval_lines < 0:
        raise SNPError(f"--eval-lines must be >= 0, got {args.eval_lines}")
    if args.calib_random < 0:
        raise SNPError(f"--calib-random must be >= 0, got {args.calib_random}")
    sources = [o for o, v in (("--calib", args.calib), ("--calib-random", args.calib_random),
                              ("--calib-text", args.calib_text)) if v]
    if len(sources) > 1:
        raise SNPError(f"give one calibration source, not {' and '.join(sources)}")
    for option, path, isfile in (("--checkpoint", args.checkpoint, True), ("--calib-text", args.calib_text, True),
                                 ("--calib", args.calib, False), ("--tokenizer", args.tokenizer, False)):
        if path and not (os.path.isfile(path) if isfile else os.path.isdir(path)):
            raise SNPError(f"{option} '{path}' is not {'a file' if isfile else 'a folder'}")
    if args.out and os.path.exists(args.out) and not os.path.isdir(args.out):
        raise SNPError(f"--out '{args.out}' is a file: give a folder (it is created if missing)")
    _device(args.device)
    budget = _budget(args)
    check_model_spec(args.model)
    return budget


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise SNPError(f"--device '{text}' is not a device: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SNPError(f"--device {text}: this machine has no CUDA GPU (torch.cuda.is_available() is False)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise SNPError(f"--device {text}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise SNPError(f"--device '{text}': use cpu, cuda or cuda:N")
    return device


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

def cmd_prune(args) -> int:
    budget = check_options(args)
    from . import api
    from .cost import count_macs, count_params
    from .io import save
    from .report import attention_kernels, load_warning, prune_report, time_interleaved
    device, dtype = _device(args.device), DTYPES[args.dtype]
    _status(f"loading {args.model}")
    src = load_model(args.model, args.pretrained, args.checkpoint, args.tokenizer)
    data = prepare_data(args, src)
    leaves = resolve_leaves(src.model, args.leaf_modules)
    model = src.model.to(device, torch.float32)  # pruned and checked in float32 (a Hugging Face
    x = _on(data.example, device)                # checkpoint loads in its stored dtype), written in --dtype
    t = time.perf_counter()
    _status(f"analyzing ({args.frontend} frontend)")
    analysis = api.analyze(model, x, leaf_modules=leaves, frontend=args.frontend)
    _status(f"scoring and planning ({_options(args)})")
    plan = api.plan(analysis, importance=args.importance or "snp", selection=args.selection or "score",
                    preset=args.preset,
                    seed=args.seed, calibration=data.calibration, gamma=args.gamma, round_to=args.round_to,
                    heads=args.heads, hardware=args.hardware, normalise=args.normalise, **budget)
    _status("rewriting and verifying" + (" and compensating" if _compensates(args) else ""))
    pruned = api.apply(model, plan, x, analysis=analysis, compensate=_compensates(args),
                       calibration=data.calibration)
    elapsed = time.perf_counter() - t
    dense, pruned32 = model, pruned
    if dtype != torch.float32:  # pruned (and verified) in float32, then converted
        import copy
        dense, pruned = copy.deepcopy(model).to(dtype), copy.deepcopy(pruned).to(dtype)
        x = _on(x, device, dtype)
    inputs = x if isinstance(x, dict) else (x,)
    _status("counting MACs")
    stats = {"params": (count_params(dense), count_params(pruned)),
             "macs": (count_macs(dense, inputs), count_macs(pruned, inputs)), "elapsed": elapsed}
    stats["kernels"] = attention_kernels(pruned, inputs, [s.node for s in analysis.sites])
    if data.held_out:
        _status(f"embedding cosine on {data.held_out_count} held-out lines")
        c = embedding_cosine(dense, pruned, _on(data.held_out, device), data.held_out_count)
        stats["findings"] = [f"Embedding cosine to the dense model on {c['count']} held-out lines of "
                            f"{args.calib_text}: mean {c['mean']:.4f}, min {c['min']:.4f}"]
    if not args.no_latency:
        batch = _batch_text(x)
        _status(f"timing dense vs pruned ({batch}, {args.repeats} interleaved runs each)")
        lat = time_interleaved({"dense": dense, "pruned": pruned}, inputs, repeats=args.repeats)
        stats["latency"] = (lat["dense"], lat["pruned"])
        stats["load_warning"] = load_warning()  # a busy machine makes even the ratios drift
        where = f"{torch.get_num_threads()} CPU threads" if device.type == "cpu" else str(device)
        stats["latency_note"] = (f"Latency: median of {args.repeats} interleaved forward passes, {batch}, "
                                 f"{args.dtype}, {where}, this machine")
    if analysis.gm.meta.get("snp_input_shapes"):
        from .trace import describe_shapes
        stats.setdefault("findings", []).append(
            f"The pruned model takes inputs {describe_shapes(analysis.gm.meta['snp_input_shapes'])} "
            "(torch.export; d: dynamic sizes)" + (" exported for the example's shapes only: "
                                                  f"{analysis.gm.meta['snp_static_reason']}"
                                                  if analysis.gm.meta.get("snp_static_reason") else ""))
    outputs = {}
    if args.out:
        from . import plots
        _status(f"writing to {args.out}")
        save(pruned, args.out, x)  # writes plan.json too
        to = "" if dtype == torch.float32 else f".to(torch.{args.dtype})"
        outputs[f"pruned model (snp_fx.load(DIR, model{to}))"] = os.path.join(args.out, "model.safetensors")
        outputs["plan"] = os.path.join(args.out, "plan.json")
        plots.plot_widths(analysis, plan, os.path.join(args.out, "widths.png"), title=args.model)
        outputs["widths plot"] = os.path.join(args.out, "widths.png")
        if plots.plot_attention(analysis, plan, pruned32, analysis.inputs, os.path.join(args.out, "attention.png")):
            outputs["attention maps"] = os.path.join(args.out, "attention.png")
        outputs["this report"] = os.path.join(args.out, "report.md")
    text = prune_report(f"snp-fx prune {args.model}", analysis, plan, stats, outputs)
    if args.out:
        with open(os.path.join(args.out, "report.md"), "w") as f:
            f.write(text)
    print(text)
    return 0


def _compensates(args) -> bool:
    from .api import PRESETS
    return args.compensate or bool(args.preset and PRESETS[args.preset].get("compensate"))


def _options(args) -> str:
    return ", ".join(f"{k}={v}" for k, v in (("preset", args.preset), ("importance", args.importance or "snp"),
                                              ("selection", args.selection or "score")) if v)


def _batch_text(x) -> str:
    t = x["input_ids"] if isinstance(x, dict) else x
    return f"batch {t.shape[0]} x {t.shape[1]} tokens" if isinstance(x, dict) else f"batch {t.shape[0]}"


def cmd_inspect(args) -> int:
    check_model_spec(args.model)
    for option, path in (("--checkpoint", args.checkpoint), ("--tokenizer", args.tokenizer)):
        if path and not os.path.exists(path):
            raise SNPError(f"{option} '{path}' does not exist")
    from . import api
    _status(f"loading {args.model}")
    src = load_model(args.model, args.pretrained, args.checkpoint, args.tokenizer)
    args.calib = args.calib_text = None
    args.calib_random, args.calib_batch, args.seed = 0, 1, 0
    data = prepare_data(args, src)
    _status(f"analyzing ({args.frontend} frontend)")
    print(api.analyze(src.model, data.example, leaf_modules=resolve_leaves(src.model, args.leaf_modules),
                      frontend=args.frontend))
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error (exit 2)."""

    def error(self, message):
        print(f"snp-fx: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _model_options(p):
    p.add_argument("model", help="timm model name, a Hugging Face model folder (config.json + weights), "
                                 "or pkg.module:factory (imported from the current folder too)")
    p.add_argument("--pretrained", action="store_true", help="load timm's pretrained weights")
    p.add_argument("--checkpoint", metavar="FILE", help="load a state dict (.safetensors, .pt, .pth)")
    p.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder of a text model "
                                                      "(default: the model's own folder)")
    p.add_argument("--seq-len", type=int, default=64, metavar="L", help="text models: tokens per sample")
    p.add_argument("--frontend", default="auto", choices=("auto", "fx", "export"),
                   help="tracer: torch.fx, torch.export, or auto (fx, else export)")
    p.add_argument("--leaf-modules", metavar="NAMES", help="module classes or names kept whole "
                                                           "(not traced into, left unpruned), comma-separated")
    p.add_argument("--verbose", action="store_true", help="on error, print the full traceback "
                                                          "(also: SNP_FX_VERBOSE=1)")


def build_parser() -> argparse.ArgumentParser:
    from .api import PRESETS
    from .importance import DEFAULT_GAMMA, IMPORTANCES, SELECTIONS
    from .planning import NORMALISE
    ap = _Parser(prog="snp-fx", description="Structured neuron-level pruning of transformers.")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    p = sub.add_parser("prune", help="prune a model, print a report, write the pruned model and plots",
                       description="Prune MODEL (a timm model name, a Hugging Face model folder, or "
                                   "pkg.module:factory returning a module). Budget: --ratios (default "
                                   f"{DEFAULT_RATIOS}), --config, --target-macs, --target-params or "
                                   "--target-latency. "
                                   "MACs are per sample (image, or sequence of --seq-len tokens).")
    _model_options(p)
    p.add_argument("--ratios", help="fraction removed per kind (qk, v, ffn, residual, heads) or per group name, "
                                    f"e.g. qk=0.5,v=0.3,ffn=0.3,residual=0.2,heads=0 (default {DEFAULT_RATIOS})")
    p.add_argument("--config", help="the authors' ratio file (JSON), or DeiT_t / DeiT_s / DeiT_s_small / DeiT_b")
    p.add_argument("--target-macs", help="MACs budget per sample: 2.0G, or a fraction of the dense model such as 0.45")
    p.add_argument("--target-params", help="parameter budget: 12M, or a fraction such as 0.5")
    p.add_argument("--target-latency", help="latency budget for the example batch on this machine: 35ms, or a "
                                            "fraction of the dense latency such as 0.5 (op latencies are measured "
                                            "once and cached)")
    p.add_argument("--heads", action="store_true", help="with a target: let whole heads go too")
    p.add_argument("--hardware", choices=("cpu", "cuda"),
                   help="round widths to what this hardware runs fastest (when --round-to is not given)")
    p.add_argument("--normalise", choices=NORMALISE, default="group",
                   help="with a target: compare scores across groups by their mean (group) or also by each "
                        "kind's spread (kind: nearly flat scores are cut gradually)")
    p.add_argument("--round-to", type=parse_round_to, default=1, metavar="N|KIND=N,...",
                   help="kept widths are multiples of N, or per kind: qk=8,v=8,ffn=64")
    p.add_argument("--preset", choices=list(PRESETS), help="named options: best (fluctuation widths, exact q/k selection, "
                                                           "least-squares compensation) or paper")
    p.add_argument("--importance", choices=IMPORTANCES, default=None,
                   help="channel scores (default snp, or the preset's)")
    p.add_argument("--selection", choices=SELECTIONS, default=None,
                   help="q/k pairs: the top scores, or exact attention-error selection (default score)")
    p.add_argument("--compensate", action="store_true",
                   help="refit the v / FFN consumers by least squares over the calibration data")
    p.add_argument("--gamma", type=int, default=DEFAULT_GAMMA,
                   help=f"singular components in the SNP q/k score (default {DEFAULT_GAMMA})")
    p.add_argument("--calib", metavar="DIR", help="image models: calibrate on the images in DIR "
                                                  "(flat, or class subfolders)")
    p.add_argument("--calib-text", metavar="FILE", help="text models: calibrate on the lines of FILE (one sample "
                                                        "per line); the last --eval-lines are held out")
    p.add_argument("--eval-lines", type=int, metavar="N",
                   help="lines of --calib-text held out for the embedding cosine (default min(64, a quarter))")
    p.add_argument("--calib-max", type=int, metavar="N", help="use at most N calibration images / lines")
    p.add_argument("--calib-random", type=int, default=0, metavar="N",
                   help="calibrate on N random inputs (default: one example input)")
    p.add_argument("--calib-batch", type=int, default=16, metavar="B", help="calibration batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    p.add_argument("--dtype", default="float32", choices=list(DTYPES),
                   help="dtype of the written model (pruning and its check run in float32)")
    p.add_argument("--no-latency", action="store_true", help="skip timing dense vs pruned")
    p.add_argument("--repeats", type=int, default=10, help="timed forward passes per model")
    p.add_argument("--out", metavar="DIR",
                   help="write the pruned model, plan.json, report.md, widths.png and attention.png here")
    p.set_defaults(fn=cmd_prune)
    i = sub.add_parser("inspect", help="print the analysis: attention sites, groups, what is unprunable")
    _model_options(i)
    i.set_defaults(fn=cmd_inspect)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        os.environ["SNP_FX_VERBOSE"] = "1"
    try:
        return args.fn(args)
    except SNPError as e:
        _report_error("error", e, args)
        return 2
    except SNPFXError as e:  # RewriteError / InternalError: not the user's fault; say so in one line, exit 1
        _report_error("internal error", e, args)
        return 1


def _report_error(what: str, e: BaseException, args) -> None:
    from .errors import verbose
    if verbose():
        import traceback
        traceback.print_exc()
    print(f"snp-fx: {what}: " + " ".join(str(e).split()), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
