"""Checkpoints: read HF-named safetensors tensor by tensor (only this rank's slices),
initialise presets from a seed, and save in the HF layout that transformers loads.

    report = load_checkpoint(model, "/path/to/ckpt")   # report.bytes_read
    init_random(model, seed=0)                          # same weights under every layout
    save_checkpoint(model, "/path/out")                 # config.json + model.safetensors

Missing, unexpected or mis-shaped tensors raise ``CheckpointError`` listing every name
with its expected and found shape. Never unpickles anything.

Also read: FP8 (e4m3) weights with 128 x 128 block scales (``<name>_scale_inv``, float32
``[ceil(rows/128), ceil(cols/128)]``, DeepSeek-V3 / GLM-4.5-FP8 style), dequantized at
load into the run dtype from just the rank's slice and its scale blocks; a 3-D expert tensor
stored as MXFP4 (``<name>_blocks`` + ``<name>_scales``, GPT-OSS; ``moerun.mxfp4``),
dequantized into the run dtype, this rank's experts only; and checkpoints holding
multi-token-prediction layers (``model.layers.N``, N >= num_hidden_layers), whose tensors
are skipped with one log line.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from . import mxfp4
from .config import ModelConfig
from .model import MoEModel

INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")  # safetensors' dtype names the loader converts
FP8_DTYPE = "F8_E4M3"  # read only with its block scales
FP8_BLOCK = 128  # rows and columns one scale covers
SCALE_SUFFIX = "_scale_inv"  # <name>.weight_scale_inv: dequantized = fp8 * scale (per block)

log = logging.getLogger("moerun")


class CheckpointError(ValueError):
    pass


@dataclass
class LoadReport:
    bytes_read: int
    tensors_read: int


def _open(fn: Path):
    """A safetensors file opened for slicing; a CheckpointError naming it when it is not one."""
    try:
        return safe_open(fn, "pt", device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{fn} is missing: the checkpoint's index names it; copy every shard") from None
    except Exception as e:  # safetensors raises its own error type for a truncated or empty file
        raise CheckpointError(f"{fn} is not a readable safetensors file ({type(e).__name__}: {e}); "
                              "it may be truncated: download or copy it again") from None


def checkpoint_files(path: str | Path) -> dict[str, Path]:
    """Tensor name -> file, from the index when sharded, else from the single file."""
    path = Path(path)
    if (path / INDEX).exists():
        try:
            with open(path / INDEX) as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / INDEX} is not a safetensors index ({type(e).__name__}: {e}); "
                                  'it needs {"weight_map": {tensor name: file}}') from None
        missing = sorted({fn for fn in weight_map.values() if not (path / fn).is_file()})
        if missing:
            raise CheckpointError(f"{path} lacks shard(s) {', '.join(missing)} that {INDEX} names: copy them")
        return {name: path / fn for name, fn in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path} (pickled .bin checkpoints are not read; "
                              "convert them with transformers' save_pretrained(safe_serialization=True))")
    out = {}
    for fn in files:
        with _open(fn) as f:
            out.update({k: fn for k in f.keys()})
    return out


def full_model_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name and full shape of the whole model (built on the meta device)."""
    with torch.device("meta"):
        full = MoEModel(cfg)
    return {s.name: s.shape for s in full.specs()}


def load_checkpoint(model, path: str | Path, progress: bool = False) -> LoadReport:
    """Read this rank's slices of every tensor; ``progress`` shows a bar (rank 0, a terminal)."""
    files = checkpoint_files(path)
    expected = full_model_shapes(model.cfg)
    problems = []
    ignorable = {"lm_head.weight"} if model.cfg.tie_word_embeddings else set()
    mtp = _mtp_tensors(files, model.cfg.num_layers)
    if mtp:
        layers = sorted({int(_LAYER.match(n).group(1)) for n in mtp})
        log.info("skipping %d tensors of layer(s) %s: multi-token-prediction layers past num_hidden_layers "
                 "(%d), which moerun does not run", len(mtp), ", ".join(map(str, layers)), model.cfg.num_layers)
    ignorable |= mtp | {n for n in files if n.endswith(SCALE_SUFFIX) and n[:-len(SCALE_SUFFIX)] in expected}
    quantized = {n for n in expected if n not in files and f"{n}_blocks" in files and f"{n}_scales" in files}
    ignorable |= {f"{n}{suffix}" for n in quantized for suffix in ("_blocks", "_scales")}
    unexpected = sorted(n for n in files if n not in expected and n not in ignorable
                        and not n.endswith("rotary_emb.inv_freq"))
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): " + ", ".join(unexpected[:20])
                        + (" ..." if len(unexpected) > 20 else ""))
    missing = sorted(n for n in expected if n not in files and n not in quantized)
    if missing:
        problems.append(f"missing tensors ({len(missing)}): " + ", ".join(
            f"{n} {list(expected[n])}" for n in missing[:20]) + (" ..." if len(missing) > 20 else ""))
    specs = model.specs()
    handles: dict[Path, object] = {}
    bytes_read = 0
    misshaped, wrong_dtype, non_finite = [], [], []
    bar = tqdm(specs, desc="loading weights", unit="tensor", leave=False,
               disable=not (progress and sys.stderr.isatty()))

    def handle(name):  # the open file holding tensor ``name`` (each file opened once)
        if files[name] not in handles:
            handles[files[name]] = _open(files[name])
        return handles[files[name]]

    try:
        for spec in bar:
            if spec.name in quantized:
                t, problem = _read_mxfp4(spec, handle(f"{spec.name}_blocks"), handle(f"{spec.name}_scales"),
                                         spec.dest.dtype)
                if problem:
                    misshaped.append(problem)
                    continue
                bytes_read += t.numel() // 2 + t.numel() // mxfp4.GROUP  # half a byte a value + the scales
                spec.dest.data.copy_(spec.to_dest(t))
                continue
            if spec.name not in files:
                continue
            sl = handle(spec.name).get_slice(spec.name)
            shape = tuple(sl.get_shape())
            if shape != tuple(spec.shape):
                misshaped.append(f"{spec.name}: expected {list(spec.shape)}, found {list(shape)}")
                continue
            scale = spec.name + SCALE_SUFFIX
            if sl.get_dtype() == FP8_DTYPE and scale in files and len(shape) == 2:
                s_sl = handle(scale).get_slice(scale)
                want = (math.ceil(shape[0] / FP8_BLOCK), math.ceil(shape[1] / FP8_BLOCK))
                if tuple(s_sl.get_shape()) != want or s_sl.get_dtype() not in FLOAT_DTYPES:
                    misshaped.append(f"{scale}: expected {list(want)} float ({FP8_BLOCK}x{FP8_BLOCK} blocks of "
                                     f"{list(shape)}), found {list(s_sl.get_shape())} {s_sl.get_dtype()}")
                    continue
                t, n_bytes = dequant_fp8_block(sl, s_sl, spec.index, shape)
            elif sl.get_dtype() not in FLOAT_DTYPES:
                wrong_dtype.append(f"{spec.name}: {sl.get_dtype()}" + (
                    f" without its block scales {scale}" if sl.get_dtype() == FP8_DTYPE else ""))
                continue
            else:
                t = sl[spec.index] if spec.index else sl[:]
                n_bytes = t.numel() * t.element_size()
            # one reduction per tensor: a NaN or inf anywhere makes the sum non-finite
            if not torch.isfinite(t.float().sum()):
                non_finite.append(spec.name)
                continue
            spec.dest.data.copy_(spec.to_dest(t.to(spec.dest.dtype)))
            bytes_read += n_bytes
    finally:
        handles.clear()
        bar.close()
    if misshaped:
        problems.append(f"mis-shaped tensors ({len(misshaped)}): " + "; ".join(misshaped[:20]))
    if wrong_dtype:
        problems.append(f"tensors that are not floating point ({len(wrong_dtype)}; weights must be F32, F16, "
                        f"BF16, or F8_E4M3 with {FP8_BLOCK}x{FP8_BLOCK} block scales <name>{SCALE_SUFFIX}): "
                        + "; ".join(wrong_dtype[:20]))
    if non_finite:
        problems.append(f"tensors holding NaN or inf ({len(non_finite)}): " + ", ".join(non_finite[:20]))
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match model_type {model.cfg.model_type!r} "
                              f"as its config.json describes it:\n  " + "\n  ".join(problems))
    return LoadReport(bytes_read, len(specs))


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _mtp_tensors(files, num_layers: int) -> set[str]:
    """Tensors of layers past the model's last (GLM-4.5's / DeepSeek-V3's MTP modules)."""
    return {n for n in files if (m := _LAYER.match(n)) and int(m.group(1)) >= num_layers}


def dequant_fp8_block(w_sl, s_sl, index: tuple[slice, ...], shape: tuple[int, int]):
    """The part ``index`` of an FP8 weight [rows, cols] in float32: reads that part of the
    weight and just the scale blocks covering it (``s_sl`` [ceil(rows/128), ceil(cols/128)]).
    Returns (tensor, bytes read)."""
    idx = tuple(index) + (slice(None),) * (2 - len(index))
    (r0, r1, _), (c0, c1, _) = idx[0].indices(shape[0]), idx[1].indices(shape[1])
    B = FP8_BLOCK
    w = w_sl[r0:r1, c0:c1]
    s = s_sl[r0 // B: max(math.ceil(r1 / B), r0 // B), c0 // B: max(math.ceil(c1 / B), c0 // B)]
    s_full = s.float().repeat_interleave(B, 0).repeat_interleave(B, 1)
    dr, dc = r0 - r0 // B * B, c0 - c0 // B * B
    out = w.float() * s_full[dr: dr + (r1 - r0), dc: dc + (c1 - c0)]
    return out, w.numel() * w.element_size() + s.numel() * s.element_size()


def _read_mxfp4(spec, blocks_file, scales_file, dtype):
    """This rank's slice (its experts: the first dim only) of an MXFP4 tensor, dequantized:
    (tensor, None) or (None, what is wrong)."""
    bl, sc = blocks_file.get_slice(f"{spec.name}_blocks"), scales_file.get_slice(f"{spec.name}_scales")
    problem = mxfp4.check(spec.name, bl.get_shape(), sc.get_shape(), spec.shape)
    if problem:
        return None, problem
    if any(s != slice(None) for s in spec.index[1:]):
        return None, f"{spec.name}: an MXFP4 tensor is split only along its first dim (experts)"
    if bl.get_dtype() != "U8" or sc.get_dtype() != "U8":
        return None, f"{spec.name}: MXFP4 blocks / scales must be U8, found {bl.get_dtype()} / {sc.get_dtype()}"
    rows = spec.index[:1]
    blocks, scales = (bl[rows] if rows else bl[:]), (sc[rows] if rows else sc[:])
    return mxfp4.dequantize(blocks, scales, dtype), None


def _seed_for(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & (2**63 - 1)


def init_random(model, seed: int = 0, std: float = 0.02) -> None:
    """Fill every tensor from a generator seeded by (seed, tensor name): a rank computes
    the full tensor and keeps its slice, so every layout holds the same model."""
    for spec in model.specs():
        if spec.name.endswith("norm.weight"):
            spec.dest.data.fill_(1.0)
            continue
        g = torch.Generator().manual_seed(_seed_for(seed, spec.name))
        full = torch.randn(spec.shape, generator=g) * std
        spec.dest.data.copy_(spec.to_dest(full[spec.index] if spec.index else full).to(spec.dest.dtype))


def save_checkpoint(model, path: str | Path) -> None:
    """Write config.json and model.safetensors (HF names and each family's layout: per-expert
    tensors, or GPT-OSS's fused ones; unquantized)."""
    if not (model.is_first and model.is_last) or model.comm.tp_size * model.comm.ep_size != 1:
        raise ValueError("save_checkpoint needs the whole model in one process")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {s.name: s.to_checkpoint(s.dest.detach().to("cpu")).contiguous().clone() for s in model.specs()}
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with open(path / "config.json", "w") as f:
        json.dump(model.cfg.to_hf(), f, indent=2)
