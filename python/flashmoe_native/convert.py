"""`flashmoe convert SRC OUT --bits {4,8,16}`: Hugging Face Qwen3.5-MoE checkpoint -> model dir.

The conversion streams: one non-expert tensor (in row chunks) or one expert at a time is read,
encoded, written and hashed, so memory stays a small multiple of one expert even for 200+ GB models.
Everything is written into a temporary sibling directory that is renamed to OUT only when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import _core
from . import format as fmt
from .format import ModelFormatError
from .progress import Progress, format_bytes
from .safetensors_io import Checkpoint

# copied next to the converted weights when the source has them (tokenizer, chat template, ...)
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "generation_config.json",
    "special_tokens_map.json",
    "config.json",
)
# small, and they decide routing or gating: quantization error here changes which experts run
KEEP_BF16_SUFFIXES = (
    "mlp.gate.weight",
    "mlp.shared_expert_gate.weight",
    "linear_attn.in_proj_a.weight",
    "linear_attn.in_proj_b.weight",
)
# bound on float32 elements decoded at once while converting one big tensor (64 MB)
CHUNK_ELEMENTS = 16 << 20
SKIPPED_PREFIXES = ("model.visual.", "mtp.")  # vision tower and multi-token-prediction head

# config.json model_type -> tensor name prefix of the language model
MODEL_TYPES = {"qwen3_5_moe": "model.language_model.", "qwen3_5_moe_text": "model."}


def read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelFormatError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFormatError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ModelFormatError(f"{path}: expected a JSON object")
    return value


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


def normalize_config(
    raw: dict[str, Any], generation_config: dict[str, Any] | None, config_path: Path
) -> dict[str, Any]:
    """config.json (+ generation_config.json) -> the manifest's `config` (docs/format.md)."""
    model_type = raw.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ModelFormatError(
            f"{config_path}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(MODEL_TYPES)})"
        )
    text = raw.get("text_config") if model_type == "qwen3_5_moe" else raw
    if not isinstance(text, dict):
        raise ModelFormatError(
            f"{config_path}: model_type {model_type} needs a 'text_config' object"
        )

    def get(key: str, default: Any = None) -> Any:
        # the wrapper's own keys count too (some exports keep e.g. vocab_size only at top level)
        for scope in (text, raw):
            if scope.get(key) is not None:
                return scope[key]
        if default is None:
            raise ModelFormatError(f"{config_path}: missing {key!r}")
        return default

    if get("hidden_act", "silu") != "silu":
        raise ModelFormatError(f"{config_path}: hidden_act {text['hidden_act']!r} is not supported")
    if text.get("attention_bias"):
        raise ModelFormatError(f"{config_path}: attention_bias is not supported")

    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ModelFormatError(f"{config_path}: rope_type {rope_type!r} is not supported")
    # defaults are transformers' for Qwen3.5-MoE, so the result matches what it would run
    rope_theta = float(rope.get("rope_theta", text.get("rope_theta", 10000.0)))
    partial = float(rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 0.25)))
    head_dim = int(get("head_dim"))

    layers = int(get("num_hidden_layers"))
    layer_types = text.get("layer_types")
    if layer_types is None:
        interval = int(get("full_attention_interval", 4))
        layer_types = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(layers)
        ]

    eos: list[int] = []
    for source in (generation_config or {}, text, raw):
        for token in _token_ids(source.get("eos_token_id")):
            if token not in eos:
                eos.append(token)

    config = {
        "vocab_size": int(get("vocab_size")),
        "hidden_size": int(get("hidden_size")),
        "num_hidden_layers": layers,
        "layer_types": list(layer_types),
        "rms_norm_eps": float(get("rms_norm_eps", 1e-6)),
        "num_attention_heads": int(get("num_attention_heads")),
        "num_key_value_heads": int(get("num_key_value_heads")),
        "head_dim": head_dim,
        "rotary_dim": int(head_dim * partial),
        "rope_theta": rope_theta,
        "max_position_embeddings": int(get("max_position_embeddings", 32768)),
        "linear_num_key_heads": int(get("linear_num_key_heads")),
        "linear_num_value_heads": int(get("linear_num_value_heads")),
        "linear_key_head_dim": int(get("linear_key_head_dim")),
        "linear_value_head_dim": int(get("linear_value_head_dim")),
        "linear_conv_kernel_dim": int(get("linear_conv_kernel_dim", 4)),
        "num_experts": int(get("num_experts")),
        "num_experts_per_tok": int(get("num_experts_per_tok")),
        "moe_intermediate_size": int(get("moe_intermediate_size")),
        # Qwen3.5 always renormalises the top-k weights (transformers ignores the key)
        "norm_topk_prob": True,
        "shared_expert_intermediate_size": int(get("shared_expert_intermediate_size")),
        "eos_token_ids": eos,
    }
    # reuse the manifest's own checks so a bad config.json fails here, naming config.json
    fmt.check_config(config, config_path)
    return config


def tensor_dtype(name: str, shape: list[int], bits: int) -> str:
    """The stored dtype of a tensor at --bits `bits` (docs/format.md)."""
    if len(shape) == 1 or name.endswith("conv1d.weight"):
        return "f32"
    if bits == 16 or name.endswith(KEEP_BF16_SUFFIXES) or shape[1] % fmt.GROUP_SIZE:
        return "bf16"
    return f"q{bits}"


@dataclass
class Source:
    """A checkpoint directory understood: its config and where each tensor comes from."""

    directory: Path
    model_type: str
    config: dict[str, Any]
    prefix: str
    checkpoint: Checkpoint
    tie_word_embeddings: bool

    def tensor_name(self, name: str) -> str:
        """Checkpoint name of a manifest tensor."""
        if name == "lm_head.weight":
            if "lm_head.weight" not in self.checkpoint and self.tie_word_embeddings:
                return self.prefix + "embed_tokens.weight"
            return "lm_head.weight"
        return self.prefix + name

    def fused_experts(self, layer: int) -> bool:
        return f"{self.prefix}layers.{layer}.mlp.experts.gate_up_proj" in self.checkpoint

    def expert_source_names(self, layer: int) -> list[str]:
        p = f"{self.prefix}layers.{layer}.mlp.experts."
        if self.fused_experts(layer):
            return [p + "gate_up_proj", p + "down_proj"]
        return [
            f"{p}{e}.{part}_proj.weight"
            for e in range(self.config["num_experts"])
            for part in ("gate", "up", "down")
        ]


def open_source(src: Path) -> Source:
    if not src.is_dir():
        raise ModelFormatError(f"{src}: not a directory")
    config_path = src / "config.json"
    raw = read_json(config_path)
    generation_path = src / "generation_config.json"
    generation = read_json(generation_path) if generation_path.exists() else None
    config = normalize_config(raw, generation, config_path)
    model_type = str(raw["model_type"])
    text = raw.get("text_config", raw)
    tie = bool(text.get("tie_word_embeddings", raw.get("tie_word_embeddings", False)))
    return Source(src, model_type, config, MODEL_TYPES[model_type], Checkpoint(src), tie)


def check_source_tensors(source: Source, expected: dict[str, list[int]]) -> None:
    """Every needed tensor present with the right shape, and nothing unexplained left over."""
    ckpt = source.checkpoint
    used: set[str] = set()
    for name, shape in expected.items():
        src_name = source.tensor_name(name)
        if src_name not in ckpt:
            raise ModelFormatError(f"{source.directory}: checkpoint lacks tensor {src_name}")
        info = ckpt.info(src_name)
        want = [shape[0], 1, shape[1]] if name.endswith("conv1d.weight") else shape
        if list(info.shape) != want:
            raise ModelFormatError(
                f"{info.path}: tensor {src_name} has shape {list(info.shape)}, "
                f"config implies {want}"
            )
        used.add(src_name)
    cfg = source.config
    n_experts, inter, hidden = cfg["num_experts"], cfg["moe_intermediate_size"], cfg["hidden_size"]
    for layer in range(cfg["num_hidden_layers"]):
        names = source.expert_source_names(layer)
        if not source.fused_experts(layer) and names[0] not in ckpt:
            raise ModelFormatError(
                f"{source.directory}: checkpoint has no experts for layer {layer} (neither "
                f"{source.prefix}layers.{layer}.mlp.experts.gate_up_proj nor {names[0]})"
            )
        if source.fused_experts(layer):
            wants = [[n_experts, 2 * inter, hidden], [n_experts, hidden, inter]]
        else:
            per_part = {"gate": [inter, hidden], "up": [inter, hidden], "down": [hidden, inter]}
            wants = [per_part[n.rsplit(".", 2)[-2].removesuffix("_proj")] for n in names]
        for src_name, want in zip(names, wants, strict=True):
            if src_name not in ckpt:
                raise ModelFormatError(f"{source.directory}: checkpoint lacks tensor {src_name}")
            info = ckpt.info(src_name)
            if list(info.shape) != want:
                raise ModelFormatError(
                    f"{info.path}: tensor {src_name} has shape {list(info.shape)}, "
                    f"config implies {want}"
                )
            used.add(src_name)
    for name in ckpt.tensors:
        if name not in used and not name.startswith(SKIPPED_PREFIXES):
            raise ModelFormatError(
                f"{ckpt.info(name).path}: unexpected tensor {name} (not part of a "
                f"{source.model_type} language model)"
            )


class HashingWriter:
    """Sequential writer of one data file that hashes everything it writes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = open(path, "wb")  # closed in close()
        self.hasher = _core.Xxh64()
        self.size = 0

    def write(self, data: np.ndarray) -> None:
        data = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        self.hasher.update_array(data)
        self.file.write(memoryview(data))
        self.size += data.size

    def pad_to(self, offset: int) -> None:
        if offset < self.size:
            raise AssertionError(f"{self.path}: cannot pad back to {offset} from {self.size}")
        if offset > self.size:
            self.write(np.zeros(offset - self.size, dtype=np.uint8))

    def close(self) -> dict[str, Any]:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return {"size": self.size, "xxh64": fmt.hex64(self.hasher.digest())}


def _row_chunks(rows: int, cols: int) -> Iterator[tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(1, cols))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _finite(w: np.ndarray, where: Path, name: str) -> np.ndarray:
    if not np.isfinite(w).all():
        raise ModelFormatError(f"{where}: tensor {name} contains NaN or Inf")
    return w


def write_tensor(
    out: HashingWriter,
    source: Source,
    name: str,
    shape: list[int],
    dtype: str,
    progress: Progress,
) -> dict[str, Any]:
    """Stream one non-expert tensor into weights.bin in row chunks; returns its manifest entry."""
    src_name = source.tensor_name(name)
    info = source.checkpoint.info(src_name)
    offset = fmt.align_up(out.size, fmt.TENSOR_ALIGN)
    out.pad_to(offset)
    rows = shape[0]
    cols = shape[1] if len(shape) == 2 else 1
    scales: list[np.ndarray] = []
    biases: list[np.ndarray] = []
    for start, stop in _row_chunks(rows, cols):
        chunk = source.checkpoint.read_rows(src_name, start, stop).reshape(stop - start, cols)
        progress.advance((stop - start) * info.row_nbytes)
        _finite(chunk, info.path, src_name)
        if dtype in fmt.QUANT_BITS:
            data, chunk_scales, chunk_biases = fmt.quantize(chunk, fmt.QUANT_BITS[dtype])
            out.write(data)
            scales.append(chunk_scales)
            biases.append(chunk_biases)
        else:
            out.write(fmt.encode_tensor(chunk, dtype))
    if dtype in fmt.QUANT_BITS:
        # the quantized layout puts all data first, then all scales, then all biases
        layout = fmt.quant_layout(rows, cols, fmt.QUANT_BITS[dtype])
        out.pad_to(offset + layout.scales_offset)
        out.write(np.concatenate(scales).astype("<u2"))
        out.pad_to(offset + layout.biases_offset)
        out.write(np.concatenate(biases).astype("<u2"))
    nbytes = out.size - offset
    if nbytes != fmt.tensor_nbytes(dtype, shape):
        raise AssertionError(f"{name}: wrote {nbytes} bytes for {dtype} {shape}")
    return {"dtype": dtype, "shape": list(shape), "offset": offset, "nbytes": nbytes}


def read_layer_experts(
    source: Source, layer: int
) -> Iterator[tuple[int, dict[str, np.ndarray], int]]:
    """(expert, {gate, up, down} float32, source bytes read) for each expert of a layer."""
    ckpt = source.checkpoint
    inter = source.config["moe_intermediate_size"]
    names = source.expert_source_names(layer)
    fused = source.fused_experts(layer)
    for e in range(source.config["num_experts"]):
        if fused:
            gate_up = ckpt.read_index(names[0], e)  # [2I, H], gate rows first
            down = ckpt.read_index(names[1], e)
            nbytes = ckpt.info(names[0]).row_nbytes + ckpt.info(names[1]).row_nbytes
            parts = {"gate": gate_up[:inter], "up": gate_up[inter:], "down": down}
            origin = {"gate": names[0], "up": names[0], "down": names[1]}
        else:
            origin = dict(zip(fmt.EXPERT_PARTS, names[3 * e : 3 * e + 3], strict=True))
            parts = {p: ckpt.read(n) for p, n in origin.items()}
            nbytes = sum(ckpt.info(n).nbytes for n in origin.values())
        for p, w in parts.items():
            _finite(w, ckpt.info(origin[p]).path, f"{origin[p]} (expert {e})")
        yield e, parts, nbytes


def encode_expert_block(
    weights: dict[str, np.ndarray],
    dtypes: dict[str, str],
    parts: dict[str, dict[str, Any]],
    block_stride: int,
) -> tuple[np.ndarray, str]:
    """One expert's gate, up and down encoded at their offsets in a zero-padded block, and the
    block's xxh64."""
    block = np.zeros(block_stride, dtype=np.uint8)
    for name, w in weights.items():
        encoded = fmt.encode_tensor(w, dtypes[name])
        start = parts[name]["offset"]
        block[start : start + encoded.size] = encoded
    hasher = _core.Xxh64()
    hasher.update_array(block)
    return block, fmt.hex64(hasher.digest())


def _is_replaceable(out: Path) -> bool:
    """--force may replace a previous conversion or an empty directory, nothing else."""
    if out.is_dir() and not out.is_symlink():
        return (out / fmt.MANIFEST_NAME).is_file() or not any(out.iterdir())
    return False


def convert(
    src: str | os.PathLike[str],
    out: str | os.PathLike[str],
    bits: int,
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Convert checkpoint directory `src` into model directory `out`; returns `out`."""
    if bits not in (4, 8, 16):
        raise ValueError(f"bits must be 4, 8 or 16, not {bits}")
    src_path = Path(src).resolve()
    out_path = Path(out).absolute()
    if out_path.resolve() == src_path or src_path.is_relative_to(out_path.resolve()):
        raise ModelFormatError(
            f"{out_path}: the output must not be or contain the source {src_path}"
        )
    if out_path.exists() or out_path.is_symlink():
        if not force:
            raise FileExistsError(f"{out_path}: already exists (use --force to replace it)")
        if not _is_replaceable(out_path):
            raise FileExistsError(
                f"{out_path}: exists and is not a converted model directory; refusing to replace it"
            )

    source = open_source(src_path)
    config = source.config
    expected = fmt.expected_tensor_shapes(config)
    check_source_tensors(source, expected)
    dtypes = {name: tensor_dtype(name, shape, bits) for name, shape in expected.items()}
    expert_shapes = fmt.expected_expert_shapes(config)
    expert_dtypes = {p: tensor_dtype("experts." + p, s, bits) for p, s in expert_shapes.items()}
    parts, block_bytes, block_stride = fmt.expert_block_layout(expert_dtypes, expert_shapes)

    ckpt = source.checkpoint
    total = sum(ckpt.info(source.tensor_name(n)).nbytes for n in expected)
    total += sum(
        ckpt.info(n).nbytes
        for layer in range(config["num_hidden_layers"])
        for n in source.expert_source_names(layer)
    )

    tmp = out_path.with_name(f"{out_path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        with Progress(total, f"convert {src_path.name}", enabled=progress) as bar:
            weights = HashingWriter(tmp / fmt.WEIGHTS_FILE)
            try:
                tensors = {
                    name: write_tensor(weights, source, name, shape, dtypes[name], bar)
                    for name, shape in expected.items()
                }
            finally:
                weights_entry = weights.close()

            experts = HashingWriter(tmp / fmt.EXPERTS_FILE)
            block_hashes: list[str] = []

            def write_block(job: Future[tuple[np.ndarray, str]], nbytes: int) -> None:
                block, digest = job.result()
                experts.write(block)
                block_hashes.append(digest)
                bar.advance(nbytes)

            # reading stays in this thread (sequential I/O); quantizing and hashing an expert
            # releases the GIL, so blocks are encoded in parallel and written back in order
            workers = max(1, min(8, os.cpu_count() or 1))
            try:
                with ThreadPoolExecutor(workers) as pool:
                    in_flight: deque[tuple[Future[tuple[np.ndarray, str]], int]] = deque()
                    for layer in range(config["num_hidden_layers"]):
                        for _, weights_of, nbytes in read_layer_experts(source, layer):
                            job = pool.submit(
                                encode_expert_block, weights_of, expert_dtypes, parts, block_stride
                            )
                            in_flight.append((job, nbytes))
                            if len(in_flight) > 2 * workers:
                                write_block(*in_flight.popleft())
                    while in_flight:
                        write_block(*in_flight.popleft())
            finally:
                experts_entry = experts.close()

        for name in COPIED_FILES:
            if (src_path / name).is_file():
                shutil.copyfile(src_path / name, tmp / name)
        manifest = fmt.build_manifest(
            config=config,
            bits=bits,
            tensors=tensors,
            expert_parts=parts,
            block_bytes=block_bytes,
            block_stride=block_stride,
            block_hashes=block_hashes,
            files={fmt.WEIGHTS_FILE: weights_entry, fmt.EXPERTS_FILE: experts_entry},
            source={"path": str(src_path), "model_type": source.model_type},
        )
        fmt.write_manifest(tmp, manifest)

        if out_path.exists():
            old = out_path.with_name(f"{out_path.name}.old-{os.getpid()}")
            out_path.rename(old)
            tmp.rename(out_path)
            shutil.rmtree(old)
        else:
            tmp.rename(out_path)
        _fsync_dir(out_path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        ckpt.close()
    return out_path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", type=Path, help="checkpoint directory (config.json + safetensors)")
    parser.add_argument("out", type=Path, help="model directory to create")
    parser.add_argument(
        "--bits",
        type=int,
        choices=(4, 8, 16),
        default=4,
        help="4 or 8: affine group-64 quantization of the large matrices; 16: bf16 (default 4)",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace OUT if it is a previous conversion"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")


def run(args: argparse.Namespace) -> int:
    try:
        out = convert(args.src, args.out, args.bits, force=args.force, progress=not args.quiet)
    except (ModelFormatError, FileExistsError, OSError, ValueError) as e:
        print(f"flashmoe convert: error: {e}", file=sys.stderr)
        return 1
    manifest = fmt.load_manifest(out, verify_weights=False)
    files = manifest["files"]
    experts = manifest["experts"]
    if not args.quiet:
        print(
            f"wrote {out}: {fmt.WEIGHTS_FILE} {format_bytes(files[fmt.WEIGHTS_FILE]['size'])}, "
            f"{fmt.EXPERTS_FILE} {format_bytes(files[fmt.EXPERTS_FILE]['size'])} "
            f"({experts['num_layers']} layers x {experts['num_experts']} experts of "
            f"{format_bytes(experts['block_stride'])}), {args.bits}-bit"
        )
    return 0
