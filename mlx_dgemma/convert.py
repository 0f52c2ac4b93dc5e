"""Hugging Face DiffusionGemma checkpoint -> MLX model folder.

The folder has the layout of mlx-community's conversions (made by mlx-vlm), so a folder
made by either tool loads in the other:

- Hugging Face key names; shared weights once, under ``model.decoder.``; the encoder's
  own ``model.encoder.language_model.layers.N.layer_scalar``; no tied ``lm_head``;
- experts fused as on the hub, ``experts.gate_up_proj.weight`` [E, 2I, H] and
  ``experts.down_proj.weight`` [E, H, I] (mlx-vlm adds the ``.weight`` suffix);
- the vision tower (``model.encoder.vision_tower.*``, ``model.encoder.embed_vision.*``)
  copied as it is, never quantized (mlx-vlm loads it; the text model here does not);
- quantized the mlx-lm way (``.scales``/``.biases`` beside each quantized weight, a
  ``quantization`` block with per-module overrides keyed by module path, mirrored as
  ``quantization_config``), sharded safetensors with an index, tokenizer files, a card.

Conversion streams: the source is read one tensor at a time (``mx.load`` is lazy) and
output shards are written as they fill, so memory stays near one output shard plus the
tensor in flight, whatever the size of the model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from math import prod
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import mlx.core as mx
from mlx.utils import tree_flatten

from . import folder
from .config import ConfigError, ModelArgs, read_config
from .loader import WeightsError, read_header, resolve_model_path, weight_files
from .model import Model
from .errors import ConvertError  # noqa: F401  (raised here; defined with the others)

ENC = "model.encoder.language_model."
DEC = "model.decoder."
VISION = ("model.encoder.vision_tower.", "model.encoder.embed_vision.")
DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
# (group size, bits) each mode allows; None = free.
MODES = {"affine": (None, None), "mxfp4": (32, 4)}
DEFAULT_MAX_SHARD_BYTES = 5 << 30  # mlx-lm's make_shards default


# ---------------------------------------------------------------------------- plan


@dataclass
class Tensor:
    """One source tensor and where it goes."""

    src_key: str
    file: Path
    out_key: str
    shape: Tuple[int, ...]
    dtype: str
    offset: int
    nbytes: int
    priority: int  # 0: decoder prefix (or not shared); 1: encoder prefix copy

    @property
    def vision(self) -> bool:
        return self.out_key.startswith(VISION)


def target_key(key: str) -> Optional[Tuple[str, int]]:
    """(output key, priority) for a source key, or None for keys the folder drops."""
    if key == "lm_head.weight" or "rotary_emb" in key:
        return None  # tied to the embeddings / recomputed
    if key.startswith(VISION):
        return key, 0
    priority = 0
    if key.startswith(ENC):
        if key.endswith(".layer_scalar"):
            return key, 0  # the only encoder weights not shared with the decoder
        key, priority = DEC + key[len(ENC):], 1
    if key.endswith((".experts.gate_up_proj", ".experts.down_proj")):
        key += ".weight"  # mlx-vlm's SwitchLinear names
    return key, priority


def expected_shapes(args: ModelArgs) -> Dict[str, Tuple[int, ...]]:
    """Output key -> shape of every text weight the config calls for.

    Read off the MLX module tree (parameters are lazy, so nothing is allocated), mapped
    back to the disk layout: the inverse of ``Model.sanitize``.
    """
    out: Dict[str, Tuple[int, ...]] = {}
    for k, v in tree_flatten(Model(args).parameters()):
        shape = tuple(v.shape)
        if k.startswith(VISION):
            continue  # the vision tower is copied as it is
        if ".experts.switch_glu." in k:
            base, rest = k.split(".experts.switch_glu.")
            if rest == "gate_proj.weight":
                out[f"{base}.experts.gate_up_proj.weight"] = (shape[0], 2 * shape[1], shape[2])
            elif rest == "down_proj.weight":
                out[f"{base}.experts.down_proj.weight"] = shape
        elif k.endswith(".encoder_layer_scalar"):
            out[ENC + k[len(DEC): -len("encoder_layer_scalar")] + "layer_scalar"] = shape
        else:
            out[k] = shape
    return out


def make_plan(src: Path, headers: Dict[Path, Dict[str, dict]], expected: Dict[str, tuple]) -> List[Tensor]:
    """Decide, from the key lists alone, which source tensor each output key comes from."""
    chosen: Dict[str, Tensor] = {}
    for f, header in headers.items():
        for key, info in header.items():
            if key.endswith((".scales", ".biases")):
                raise ConvertError(f"{f}: {key}: the source is already quantized; convert from the unquantized checkpoint")
            t = target_key(key)
            if t is None:
                continue
            out, priority = t
            start, end = info["data_offsets"]
            tensor = Tensor(key, f, out, tuple(info["shape"]), info["dtype"], start, end - start, priority)
            prev = chosen.get(out)
            if prev is not None and prev.shape != tensor.shape:
                raise WeightsError(
                    f"{f}: {key} has shape {tensor.shape} but {prev.src_key} in {prev.file.name} has {prev.shape}"
                )
            if prev is None or priority < prev.priority:
                chosen[out] = tensor
    text = {k: t for k, t in chosen.items() if not t.vision}
    missing = sorted(set(expected) - set(text))
    if missing:
        raise WeightsError(f"{src}: missing weight {missing[0]} ({len(missing)} missing in all)")
    extra = sorted(set(text) - set(expected))
    if extra:
        t = text[extra[0]]
        raise WeightsError(f"{t.file}: unexpected weight {t.src_key} (not in a model of this config)")
    for k, t in text.items():
        if t.shape != tuple(expected[k]):
            raise WeightsError(
                f"{t.file}: {t.src_key} has shape {t.shape}, expected {tuple(expected[k])} "
                f"for the config in {src / 'config.json'}"
            )
    order = {f: i for i, f in enumerate(headers)}  # read each file front to back
    return sorted(chosen.values(), key=lambda t: (order[t.file], t.offset))


# ---------------------------------------------------------------------- quantization


@dataclass
class QuantSpec:
    """Which weights get quantized, and how."""

    bits: int = 4
    group_size: int = 64
    mode: str = "affine"
    recipe: str = "mixed"

    @classmethod
    def make(cls, bits: Optional[int], group_size: Optional[int], mode: str, recipe: str) -> "QuantSpec":
        if mode not in MODES:
            raise ConvertError(f"--q-mode {mode!r}: expected one of {', '.join(MODES)}")
        if recipe not in ("mixed", "uniform"):
            raise ConvertError(f"--recipe {recipe!r}: expected mixed or uniform")
        need_group, need_bits = MODES[mode]
        if bits is not None and bits not in (4, 8):
            raise ConvertError(f"--q-bits {bits}: expected 4 or 8")
        if need_bits and bits not in (None, need_bits):
            raise ConvertError(f"--q-mode {mode} needs --q-bits {need_bits}, got {bits}")
        if need_group and group_size not in (None, need_group):
            raise ConvertError(f"--q-mode {mode} needs --q-group-size {need_group}, got {group_size}")
        if group_size is not None and group_size not in (32, 64, 128):
            raise ConvertError(f"--q-group-size {group_size}: expected 32, 64 or 128")
        return cls(bits or need_bits or 4, group_size or need_group or 64, mode, recipe)

    @property
    def default(self) -> dict:
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}

    @property
    def sensitive_params(self) -> dict:
        # As mlx-vlm: affine 8 bits, group 64 (or the chosen affine group size).
        return {"group_size": self.group_size if self.mode == "affine" else 64, "bits": 8, "mode": "affine"}

    @staticmethod
    def is_sensitive(path: str) -> bool:
        """Kept at 8 bits by the mixed recipe: router, embeddings (= tied LM head),
        attention, the dense MLP, and the self-conditioning MLP (small, run once per
        step, and it feeds every layer's input)."""
        return (
            path.endswith(".embed_tokens")
            or ".self_attn." in path
            or ".router." in path
            or ".mlp." in path
            or ".self_conditioning." in path
        )

    def params_for(self, t: Tensor) -> Optional[dict]:
        """Quantization parameters for a tensor, or None to keep it in float."""
        key = t.out_key
        # Only matrices (Linear, Embedding, SwitchLinear weights); never norms, scalars,
        # router.scale or per_expert_scale, never the vision tower.
        if t.vision or not key.endswith(".weight") or len(t.shape) < 2 or "norm" in key:
            return None
        p = self.sensitive_params if self._kept_at_8(key) else self.default
        if t.shape[-1] % p["group_size"]:
            return None  # as mlx-lm: rows that do not split into groups stay in float
        return p

    def _kept_at_8(self, key: str) -> bool:
        return self.recipe == "mixed" and self.is_sensitive(key[: -len(".weight")])

    def block(self, plan: List[Tensor]) -> dict:
        """config.json's quantization block: the defaults, plus an override (keyed by module
        path, as mlx-lm and mlx-vlm write them) for each module the mixed recipe keeps at 8 bits."""
        q = dict(self.default)
        for t in plan:
            p = self.params_for(t)
            if p is not None and self._kept_at_8(t.out_key):
                q[t.out_key[: -len(".weight")]] = dict(p)
        return q

    def describe(self) -> str:
        if self.recipe == "uniform":
            return f"{self.bits}-bit {self.mode} (group {self.group_size}) everywhere"
        return (
            f"experts at {self.bits}-bit {self.mode} (group {self.group_size}); router, embeddings, "
            f"attention, dense and self-conditioning MLPs at 8-bit affine (group {self.sensitive_params['group_size']})"
        )


def quantize_tensor(key: str, w: mx.array, p: dict) -> Dict[str, mx.array]:
    parts = mx.quantize(w, group_size=p["group_size"], bits=p["bits"], mode=p["mode"])
    base = key[: -len(".weight")]
    out = {f"{base}.weight": parts[0], f"{base}.scales": parts[1]}
    if len(parts) > 2 and parts[2] is not None:
        out[f"{base}.biases"] = parts[2]
    return out


# --------------------------------------------------------------------------- writing


class ShardWriter:
    """Collects converted tensors and writes a shard whenever the next would overflow it.

    ``peak_pending_bytes`` records the most bytes ever held waiting for a write: the
    converter's working set beyond the one tensor in flight.
    """

    def __init__(self, path: Path, max_bytes: int):
        self.path, self.max_bytes = path, max_bytes
        self.pending: Dict[str, mx.array] = {}
        self.pending_bytes = 0
        self.peak_pending_bytes = 0
        self.parts: List[Tuple[str, List[str]]] = []
        self.total_bytes = 0

    def add(self, key: str, a: mx.array) -> None:
        if self.pending and self.pending_bytes + a.nbytes > self.max_bytes:
            self.flush()
        self.pending[key] = a
        self.pending_bytes += a.nbytes
        self.peak_pending_bytes = max(self.peak_pending_bytes, self.pending_bytes)

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"part-{len(self.parts) + 1:05d}.safetensors"
        try:
            mx.save_safetensors(str(self.path / name), self.pending, metadata={"format": "mlx"})
        except Exception as e:  # disk full, permissions
            raise ConvertError(f"{self.path / name}: could not be written ({e})".splitlines()[0]) from None
        self.parts.append((name, list(self.pending)))
        self.total_bytes += self.pending_bytes
        self.pending, self.pending_bytes = {}, 0
        mx.clear_cache()  # freed buffers go back to the system, not into MLX's cache

    def finish(self) -> Dict[str, str]:
        """Rename the parts to mlx-lm's names; return the weight map."""
        self.flush()
        n = len(self.parts)
        weight_map = {}
        for i, (name, keys) in enumerate(self.parts):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.path / name, self.path / final)
            weight_map.update({k: final for k in keys})
        return weight_map


# ------------------------------------------------------------------------- convert


@dataclass
class ConvertResult:
    path: Path
    shards: int
    tensors: int
    total_bytes: int
    parameters: int
    peak_pending_bytes: int
    max_shard_bytes: int
    largest_tensor_bytes: int
    quantized: int = 0
    vision_tensors: int = 0
    text_bits_per_weight: float = 0.0
    files: List[str] = field(default_factory=list)


def portable_config(config: dict, args: ModelArgs) -> dict:
    """Add the released checkpoint's ``global_head_dim``/``num_global_key_value_heads`` keys
    beside transformers' ``per_layer_config`` form: mlx-vlm reads only the former (and
    transformers and mlx_dgemma prefer per_layer_config when both are there)."""
    text = config.get("text_config")
    if not isinstance(text, dict) or "per_layer_config" not in text or "global_head_dim" in text:
        return config
    text = {**text, "global_head_dim": args.full_head_dim, "num_global_key_value_heads": args.full_kv_heads}
    return {**config, "text_config": text}


def _prepare_output(dst: Path, src: Path, overwrite: bool) -> Tuple[Path, List[Path]]:
    """Check the destination; create a temporary folder beside it. Returns (tmp, created parents)."""
    if dst.exists() and not overwrite:
        raise ConvertError(f"{dst}: already exists (choose another --mlx-path, or pass --overwrite to replace it)")
    if dst.exists() and not dst.is_dir():
        raise ConvertError(f"{dst}: exists and is not a folder")
    s = src.resolve()
    if dst == s or dst in s.parents:
        raise ConvertError(f"{dst}: is (or contains) the source folder {src}")
    created: List[Path] = []
    p = dst.parent
    while not p.exists():
        created.append(p)
        p = p.parent
    try:
        for d in reversed(created):
            d.mkdir()
        tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.converting-", dir=dst.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the final folder private
    except OSError as e:
        _remove_empty(created)
        raise ConvertError(f"{dst}: cannot write the output folder there ({e.strerror or e})") from None
    return tmp, created


def _remove_empty(dirs: List[Path]) -> None:
    for d in dirs:  # deepest first
        try:
            d.rmdir()
        except OSError:
            pass


def _install(tmp: Path, dst: Path, overwrite: bool) -> None:
    """Move the finished folder into place (replacing ``dst`` only when asked to)."""
    old = None
    if dst.exists():
        if not overwrite:
            raise ConvertError(f"{dst}: appeared while converting; not replaced")
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / dst.name)
    try:
        os.replace(tmp, dst)
    except OSError as e:
        if old is not None:
            os.replace(old / dst.name, dst)
            shutil.rmtree(old, ignore_errors=True)
        raise ConvertError(f"{dst}: could not move the converted folder into place ({e.strerror or e})") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n} B"


def convert(
    hf_path: Union[str, Path],
    mlx_path: Union[str, Path],
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    q_mode: str = "affine",
    dtype: Optional[str] = None,
    recipe: str = "mixed",
    max_shard_size: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> ConvertResult:
    """Convert a Hugging Face DiffusionGemma folder (or hub id) into an MLX model folder.

    ``dtype`` casts the text weights (default: keep the source's dtype); ``quantize``
    applies ``recipe`` ("mixed": experts at ``q_bits``, the sensitive rest at 8 bits;
    "uniform": everything at ``q_bits``). Raises ConfigError, WeightsError or
    ConvertError with one-line messages; never leaves a partial folder behind.
    """
    spec = QuantSpec.make(q_bits, q_group_size, q_mode, recipe) if quantize else None
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if max_shard_size <= 0:
        raise ConvertError(f"--max-shard-size {max_shard_size}: must be positive")
    dst = Path(mlx_path).expanduser().absolute()
    if dst.exists() and not overwrite:  # fail before any download
        raise ConvertError(f"{dst}: already exists (choose another --mlx-path, or pass --overwrite to replace it)")

    src = resolve_model_path(hf_path)
    hub_id = None if Path(hf_path).expanduser().exists() else str(hf_path)
    config = read_config(src)
    if config.get("quantization") or config.get("quantization_config"):
        raise ConvertError(
            f"{src / 'config.json'}: the source is already quantized; convert from the unquantized checkpoint"
        )
    try:
        args = ModelArgs.from_config(config)
    except (ConfigError, TypeError, ValueError) as e:
        raise ConfigError(f"{src / 'config.json'}: {e}".splitlines()[0]) from None

    config = portable_config(config, args)
    files = weight_files(src)
    headers = {f: read_header(f) for f in files}
    plan = make_plan(src, headers, expected_shapes(args))
    target = DTYPES[dtype] if dtype else None

    vision = [t for t in plan if t.vision]
    if vision:
        log(
            f"[INFO] Vision tower: {len(vision)} tensors ({_human(sum(t.nbytes for t in vision))}) copied as they are, "
            "not quantized: mlx-vlm uses them for images; mlx_dgemma loads the text model only."
        )
    tmp, created = _prepare_output(dst, src, overwrite)
    try:
        result = _write(tmp, plan, spec, target, max_shard_size, progress)
        quant_block = spec.block(plan) if spec else None
        folder.write_config(config, tmp, quant_block)
        result.files = folder.copy_support_files(src, tmp)
        if spec:
            precision = f"quantized, {spec.describe()}; {result.text_bits_per_weight:.2f} bits per text weight"
        else:
            precision = f"{dtype or 'the source dtype'}, not quantized"
        folder.write_model_card(tmp, dst.name, src, hub_id, precision, result.vision_tensors)
        _install(tmp, dst, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise
    result.path = dst
    if spec:
        log(f"[INFO] Quantized {result.quantized} weights ({spec.describe()}): "
            f"{result.text_bits_per_weight:.3f} bits per text weight.")
    log(f"[INFO] Wrote {dst} ({result.shards} shard{'s' * (result.shards > 1)}, {_human(result.total_bytes)}).")
    return result


def _write(
    tmp: Path,
    plan: List[Tensor],
    spec: Optional[QuantSpec],
    target: Optional[mx.Dtype],
    max_shard_size: int,
    progress: bool,
) -> ConvertResult:
    """Stream every planned tensor through cast/quantize into shards under ``tmp``."""
    from tqdm import tqdm

    writer = ShardWriter(tmp, max_shard_size)
    text_bytes = text_params = quantized = vision = 0
    bar = tqdm(total=sum(t.nbytes for t in plan), unit="B", unit_scale=True, desc="Converting",
               disable=not progress, leave=False)
    lazy_file, lazy = None, {}
    largest = 0
    try:
        for t in plan:
            if t.file != lazy_file:
                # mx.load is lazy: a tensor is read from disk only when evaluated.
                lazy_file, lazy = t.file, _load_lazy(t.file)
            try:
                a = lazy.pop(t.src_key)
                if t.vision:
                    out = {t.out_key: a}
                    vision += 1
                else:
                    if target is not None and mx.issubdtype(a.dtype, mx.floating):
                        a = a.astype(target)
                    p = spec.params_for(t) if spec else None
                    out = quantize_tensor(t.out_key, a, p) if p else {t.out_key: a}
                    quantized += p is not None
                mx.eval(list(out.values()))
            except (ConvertError, WeightsError):
                raise
            except Exception as e:
                raise WeightsError(f"{t.file}: {t.src_key}: could not be converted ({e})".splitlines()[0]) from None
            del a
            for k, v in out.items():
                largest = max(largest, v.nbytes)
                if not t.vision:
                    text_bytes += v.nbytes
                writer.add(k, v)
            if not t.vision:
                text_params += prod(t.shape)
            del out
            bar.update(t.nbytes)
    finally:
        bar.close()
        lazy = None
    weight_map = writer.finish()
    folder.write_index(tmp, weight_map, writer.total_bytes, sum(prod(t.shape) for t in plan))
    return ConvertResult(
        path=tmp,
        shards=len(writer.parts),
        tensors=len(weight_map),
        total_bytes=writer.total_bytes,
        parameters=sum(prod(t.shape) for t in plan),
        peak_pending_bytes=writer.peak_pending_bytes,
        max_shard_bytes=max_shard_size,
        largest_tensor_bytes=largest,
        quantized=quantized,
        vision_tensors=vision,
        text_bits_per_weight=8 * text_bytes / max(text_params, 1),
    )


def _load_lazy(f: Path) -> Dict[str, mx.array]:
    try:
        return mx.load(str(f))
    except Exception as e:
        raise WeightsError(f"{f}: could not be read ({e})".splitlines()[0]) from None


# ------------------------------------------------------------------------------ CLI


def parse_size(s: str) -> int:
    """'5GB', '500MB', '2GiB', '123456' -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:([kmgt])(i?)b?|b?)\s*", s, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"{s!r}: expected a size such as 5GB, 500MB or 2GiB")
    number, unit, binary = m.groups()
    scale = (1024 if binary else 1000) ** ("KMGT".index(unit.upper()) + 1) if unit else 1
    return int(float(number) * scale)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="convert.py",
        description="Convert a Hugging Face DiffusionGemma checkpoint into an MLX model folder "
        "(the mlx-lm / mlx-vlm layout).",
    )
    p.add_argument("--hf-path", "--model", required=True, help="local Hugging Face folder or hub id")
    p.add_argument("--mlx-path", default="mlx_model", help="output folder (default: mlx_model)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    p.add_argument("--q-bits", type=int, choices=(4, 8), help="bits for the experts (mixed) or everything (uniform); default 4")
    p.add_argument("--q-group-size", type=int, help="group size (default 64; mxfp4 needs 32)")
    p.add_argument("--q-mode", choices=tuple(MODES), default="affine", help="quantization mode (default affine)")
    p.add_argument("--recipe", choices=("mixed", "uniform"), default="mixed",
                   help="mixed: experts at --q-bits, router/embeddings/attention/MLPs at 8 bits (default); "
                   "uniform: everything at --q-bits")
    p.add_argument("--dtype", choices=tuple(DTYPES), help="dtype of the unquantized text weights (default: as in the source)")
    p.add_argument("--max-shard-size", type=parse_size, default=DEFAULT_MAX_SHARD_BYTES,
                   help="largest output shard, e.g. 5GB (default), 2GiB, 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace --mlx-path if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    prog = "convert.py"
    if not args.quantize and (args.q_bits or args.q_group_size or args.q_mode != "affine"):
        print(f"{prog}: error: --q-bits, --q-group-size and --q-mode need -q", file=sys.stderr)
        return 2
    try:
        convert(
            args.hf_path,
            args.mlx_path,
            quantize=args.quantize,
            q_bits=args.q_bits,
            q_group_size=args.q_group_size,
            q_mode=args.q_mode,
            dtype=args.dtype,
            recipe=args.recipe,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (ConfigError, WeightsError, ConvertError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # what the checks above could not foresee: disk full, permissions
        print(f"{prog}: error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; no output folder was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
