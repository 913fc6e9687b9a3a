"""Load pretrained weights into a `Segmentor` or its `MiT` encoder, whatever their layout.

Accepted sources: the NVlabs SegFormer ImageNet files `mit_b*.pth`;
Hugging Face SegFormer weights (hub id, folder or `.safetensors`); our own checkpoints (`student`
entry or plain Segmentor state dict); and the released DAFormer/DIDA mmcv checkpoints. Each foreign
layout has one `convert_*` function (timm `checkpoint_filter_fn` style) that maps it to our names.
Files are read only with `torch.load(weights_only=True)` or safetensors.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dida.errors import CheckpointError
from dida.models.mit import MIT_VARIANTS, MiT
from dida.models.segmentor import Segmentor

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

DEFAULT_PRETRAINED = "pretrained/mit_b5.pth"
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

# Hugging Face hub-file names (and transformers 5.x module names) -> NVlabs MiT names: first the
# stage prefixes (0-based there, 1-based in NVlabs), then the module names inside a block. Key and
# value projections become temporary `attn.k` / `attn.v`, joined into `attn.kv` afterwards.
_HF_STAGE_RULES: list[tuple[str, str]] = [
    (r"^encoder\.patch_embeddings\.(\d)\.layer_norm\.", "patch_embed{s}.norm."),
    (r"^encoder\.patch_embeddings\.(\d)\.", "patch_embed{s}."),
    (r"^encoder\.block\.(\d)\.", "block{s}."),
    (r"^encoder\.layer_norm\.(\d)\.", "norm{s}."),
    (r"^stages\.(\d)\.patch_embeddings\.layer_norm\.", "patch_embed{s}.norm."),
    (r"^stages\.(\d)\.patch_embeddings\.", "patch_embed{s}."),
    (r"^stages\.(\d)\.blocks\.", "block{s}."),
    (r"^stages\.(\d)\.layer_norm\.", "norm{s}."),
]
_HF_RULES: list[tuple[str, str]] = [
    (".attention.self.query.", ".attn.q."),
    (".attention.self.key.", ".attn.k."),
    (".attention.self.value.", ".attn.v."),
    (".attention.self.sr.", ".attn.sr."),
    (".attention.self.layer_norm.", ".attn.norm."),
    (".attention.output.dense.", ".attn.proj."),
    (".attention.q_proj.", ".attn.q."),
    (".attention.k_proj.", ".attn.k."),
    (".attention.v_proj.", ".attn.v."),
    (".attention.o_proj.", ".attn.proj."),
    (".attention.sequence_reduction.sequence_reduction.", ".attn.sr."),
    (".attention.sequence_reduction.layer_norm.", ".attn.norm."),
    (".mlp.dense1.", ".mlp.fc1."),
    (".mlp.dense2.", ".mlp.fc2."),
    (".layer_norm_1.", ".norm1."),
    (".layer_norm_2.", ".norm2."),
    (".layernorm_before.", ".norm1."),
    (".layernorm_after.", ".norm2."),
]


@dataclass
class LoadReport:
    """What a `load_pretrained` call did: the detected layout and the keys that did not match."""

    source: str
    layout: str
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        """One readable line: layout and counts, with the first few keys that did not match."""

        def some(keys: list[str]) -> str:
            return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

        parts = [f"{self.layout} layout"]
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                           ("ignored", self.ignored)):  # fmt: skip
            parts.append(f"{len(keys)} {name}" + (f" ({some(keys)})" if keys else ""))
        return ", ".join(parts)


def convert_hf_mit(state_dict: StateDict) -> StateDict:
    """Hugging Face SegFormer encoder (hub or transformers-5 names) -> NVlabs MiT state dict.

    Keys outside the encoder (`classifier.*`, `decode_head.*`) are dropped; `key`/`value` are
    stacked as `kv = [k; v]` on dim 0, the original's fused layout.
    """
    renamed: StateDict = {}
    for key, value in state_dict.items():
        if not _is_hf_encoder_key(key):
            continue
        name = key.removeprefix("segformer.")
        for pattern, template in _HF_STAGE_RULES:
            m = re.match(pattern, name)
            if m:
                name = template.format(s=int(m.group(1)) + 1) + name[m.end() :]
                break
        for old, new in _HF_RULES:
            name = name.replace(old, new)
        renamed[name] = value
    out: StateDict = {}
    for name, value in renamed.items():
        if ".attn.v." in name:
            continue
        if ".attn.k." in name:
            v_name = name.replace(".attn.k.", ".attn.v.")
            out[name.replace(".attn.k.", ".attn.kv.")] = torch.cat([value, renamed[v_name]], 0)
        else:
            out[name] = value
    return out


def convert_nvlabs_to_hf(state_dict: StateDict, layout: str = "hub") -> StateDict:
    """NVlabs MiT state dict -> Hugging Face names (`hub`: files on the hub, `transformers`:
    transformers 5.x `SegformerModel` module names). Used for parity tests and benchmarks."""
    if layout not in ("hub", "transformers"):
        raise ValueError(f"layout must be 'hub' or 'transformers', got {layout!r}")
    hub = layout == "hub"
    names = {
        "norm1": "layer_norm_1" if hub else "layernorm_before",
        "norm2": "layer_norm_2" if hub else "layernorm_after",
        "attn.q": "attention.self.query" if hub else "attention.q_proj",
        "attn.k": "attention.self.key" if hub else "attention.k_proj",
        "attn.v": "attention.self.value" if hub else "attention.v_proj",
        "attn.proj": "attention.output.dense" if hub else "attention.o_proj",
        "attn.sr": "attention.self.sr"
        if hub
        else "attention.sequence_reduction.sequence_reduction",
        "attn.norm": "attention.self.layer_norm"
        if hub
        else "attention.sequence_reduction.layer_norm",
        "mlp.fc1": "mlp.dense1" if hub else "mlp.fc1",
        "mlp.fc2": "mlp.dense2" if hub else "mlp.fc2",
        "mlp.dwconv.dwconv": "mlp.dwconv.dwconv",
    }
    out: StateDict = {}
    for key, value in state_dict.items():
        m = re.match(r"^(patch_embed|block|norm)(\d)\.(.*)$", key)
        if m is None:
            continue
        kind, stage, rest = m.group(1), int(m.group(2)) - 1, m.group(3)
        if kind == "patch_embed":
            rest = rest.replace("norm.", "layer_norm.")
            out[
                (
                    f"segformer.encoder.patch_embeddings.{stage}."
                    if hub
                    else f"stages.{stage}.patch_embeddings."
                )
                + rest
            ] = value
        elif kind == "norm":
            out[
                (f"segformer.encoder.layer_norm.{stage}." if hub else f"stages.{stage}.layer_norm.")
                + rest
            ] = value
        else:
            j, module, param = re.match(r"^(\d+)\.(.*)\.(weight|bias)$", rest).groups()
            prefix = (
                f"segformer.encoder.block.{stage}.{j}." if hub else f"stages.{stage}.blocks.{j}."
            )
            if module == "attn.kv":
                k, v = value.chunk(2, dim=0)
                out[f"{prefix}{names['attn.k']}.{param}"] = k
                out[f"{prefix}{names['attn.v']}.{param}"] = v
            else:
                out[f"{prefix}{names[module]}.{param}"] = value
    return out


def convert_mmseg_checkpoint(state_dict: StateDict) -> StateDict:
    """Released DAFormer/DIDA/HRDA/MIC mmcv checkpoint -> Segmentor state dict (student only).

    `model.backbone.*` -> `encoder.*`, `model.decode_head.*` -> `head.*`; HRDA's (and MIC(HRDA)'s)
    `HRDAHead` holds the shared head and the scale attention: `model.decode_head.head.*` ->
    `head.*`, `model.decode_head.scale_attention.*` -> `attention_head.*`. `ema_model.*` and
    `imnet_model.*` are dropped and a leading `module.` is stripped.
    """
    out: StateDict = {}
    for key, value in state_dict.items():
        name = key.removeprefix("module.").removeprefix("model.")
        if name.startswith("backbone."):
            out["encoder." + name.removeprefix("backbone.")] = value
        elif name.startswith("decode_head."):
            name = name.removeprefix("decode_head.")
            if name.startswith("scale_attention."):
                out["attention_head." + name.removeprefix("scale_attention.")] = value
            else:
                out["head." + name.removeprefix("head.")] = value
    return out


def _reason(err: Exception) -> str:
    """The first line of an exception's message (or its type name), at most 200 characters."""
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:200]


def _is_hub_id(source: str | Path) -> bool:
    """`owner/name` strings that are not checkpoint file names."""
    return (
        isinstance(source, str)
        and _HF_ID.match(source) is not None
        and not source.endswith((".pth", ".pt"))
    )


def check_weights_file(path: Path) -> None:
    """Raise `CheckpointError` "not a checkpoint" for a file that is neither a PyTorch file (zip
    or legacy pickle) nor safetensors, before a loader reports it in its own terms."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read ({_reason(err)})") from None
    is_torch = head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"
    is_safetensors = len(head) > 8 and head[8:9] == b"{"
    if not (is_torch or is_safetensors):
        raise CheckpointError(
            f"{path}: not a checkpoint (expected a PyTorch .pth/.pt file or .safetensors)"
        )


def _read_file(path: Path) -> Any:
    check_weights_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # corrupt, truncated, pickled code, ...
        raise CheckpointError(f"{path}: cannot read weights ({_reason(err)})") from None


def check_weights_source(source: str | Path) -> None:
    """Raise `load_pretrained`'s error for a local file that does not exist; never downloads."""
    if not Path(source).exists() and not _is_hub_id(source):
        _resolve(source)


def _resolve(source: str | Path) -> Path:
    path = Path(source)
    if path.exists():
        if path.is_dir():
            for name in ("model.safetensors", "pytorch_model.bin"):
                if (path / name).is_file():
                    return path / name
            raise CheckpointError(f"{path}: folder has no model.safetensors or pytorch_model.bin")
        return path
    if _is_hub_id(source):
        return _download(source)
    hint = ""
    if path.name.startswith("mit_b") or str(source) == DEFAULT_PRETRAINED:
        hint = (
            " (get the SegFormer ImageNet weights mit_b*.pth from the NVlabs SegFormer release"
            " Google Drive, or use --set model.pretrained=nvidia/mit-b5 with huggingface_hub)"
        )
    raise CheckpointError(f"{path}: weights file not found{hint}")


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise CheckpointError(
            f"{repo_id}: not a file, and huggingface_hub is not installed to download it"
        ) from None
    try:
        folder = snapshot_download(
            repo_id, allow_patterns=["*.safetensors", "*.json", "pytorch_model.bin"]
        )
    except Exception as err:
        raise CheckpointError(
            f"{repo_id}: cannot download from the Hugging Face hub (offline?): {_reason(err)}"
        ) from None
    return _resolve(folder)


def _unwrap(obj: Any, origin: str) -> tuple[StateDict, dict | None]:
    """Find the state dict inside a checkpoint object; also return an embedded config if any."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{origin}: expected a state dict, got {type(obj).__name__}")
    config = obj.get("config") if isinstance(obj.get("config"), dict) else None
    for key in ("student", "state_dict", "model"):
        if isinstance(obj.get(key), dict):
            return _unwrap(obj[key], origin)[0], config
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{origin}: no weights found (no tensors, no state_dict entry)")
    return tensors, config


def _is_hf_encoder_key(key: str) -> bool:
    return key.removeprefix("segformer.").startswith(("encoder.", "stages."))


def to_segmentor_names(state_dict: StateDict) -> tuple[StateDict, str, list[str]]:
    """Detect the layout and map it to Segmentor names; returns (state, layout, ignored keys)."""
    keys = [k.removeprefix("module.") for k in state_dict]
    kept: Callable[[str], bool]
    if any(k.startswith(("model.backbone.", "backbone.", "model.decode_head.")) for k in keys):
        layout, converted = "mmseg", convert_mmseg_checkpoint(state_dict)
        mmseg_key = re.compile(r"^(module\.)?(model\.)?(backbone|decode_head)\.")
        kept = lambda k: mmseg_key.match(k) is not None  # noqa: E731
    elif any(".patch_embeddings." in k or k.startswith("stages.") for k in keys):
        layout = "huggingface"
        converted = {"encoder." + k: v for k, v in convert_hf_mit(state_dict).items()}
        kept = _is_hf_encoder_key
    elif any(k.startswith("patch_embed1.") for k in keys):
        layout = "nvlabs"
        converted = {"encoder." + k: v for k, v in state_dict.items() if not k.startswith("head.")}
        kept = lambda k: not k.startswith("head.")  # noqa: E731
    else:
        layout = "dida"
        # DDP / torch.compile wrappers of our own models
        converted = {
            k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state_dict.items()
        }
        kept = lambda k: True  # noqa: E731
    ignored = sorted(k for k in state_dict if not kept(k))
    return converted, layout, ignored


def _mit_shape(state: StateDict) -> tuple[list[int], list[int]] | None:
    dims, depths = [], []
    for s in range(1, 5):
        w = state.get(f"encoder.patch_embed{s}.proj.weight")
        if w is None:
            return None
        dims.append(int(w.shape[0]))
        blocks = {int(k.split(".")[2]) for k in state if k.startswith(f"encoder.block{s}.")}
        depths.append(max(blocks) + 1 if blocks else 0)
    return dims, depths


def _variant_name(dims: list[int], depths: list[int]) -> str:
    for name, spec in MIT_VARIANTS.items():
        if spec["embed_dims"] == dims and spec["depths"] == depths:
            return name
    return f"custom MiT (dims {dims}, depths {depths})"


def _check_compatible(state: StateDict, target: Segmentor | MiT, origin: str) -> None:
    encoder = target.encoder if isinstance(target, Segmentor) else target
    found = _mit_shape(state)
    if found is not None and (found[0] != encoder.embed_dims or found[1] != encoder.depths):
        model = _variant_name(encoder.embed_dims, encoder.depths)
        raise CheckpointError(
            f"{origin}: weights are {_variant_name(*found)} but the model is {model}"
        )
    cls = state.get("head.conv_seg.weight")
    if isinstance(target, Segmentor) and cls is not None and cls.shape[0] != target.num_classes:
        raise CheckpointError(
            f"{origin}: checkpoint classifier has {cls.shape[0]} classes "
            f"but the model has {target.num_classes}"
        )


def load_state(
    target: Segmentor | MiT, state_dict: StateDict, origin: str = "weights"
) -> LoadReport:
    """Convert an in-memory state dict of any supported layout and load it (non-strict)."""
    if not isinstance(target, (Segmentor, MiT)):
        raise TypeError(f"target must be a Segmentor or MiT, got {type(target).__name__}")
    state, layout, ignored = to_segmentor_names(state_dict)
    _check_compatible(state, target, origin)
    if isinstance(target, MiT):
        state = {
            k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")
        }
    try:
        result = target.load_state_dict(state, strict=False)
    except RuntimeError as err:
        detail = " ".join(str(err).split())[:300]
        raise CheckpointError(f"{origin}: weights do not fit the model: {detail}") from None
    report = LoadReport(
        origin, layout, list(result.missing_keys), list(result.unexpected_keys), ignored
    )
    logger.info("loaded %s weights from %s", layout, origin)
    if report.missing:
        logger.warning("%s: %d weights missing, e.g. %s", origin, len(report.missing),
                       ", ".join(report.missing[:3]))  # fmt: skip
    if report.unexpected:
        logger.warning("%s: %d weights not used, e.g. %s", origin, len(report.unexpected),
                       ", ".join(report.unexpected[:3]))  # fmt: skip
    return report


def read_weights(source: str | Path) -> tuple[StateDict, dict | None]:
    """Read a weights file, folder or hub id; return its state dict and embedded config (if any)."""
    return _unwrap(_read_file(_resolve(source)), str(source))


def describe_weights(state_dict: StateDict) -> dict[str, Any]:
    """Layout, MiT variant, class count and size of a state dict of any supported layout."""
    state, layout, ignored = to_segmentor_names(state_dict)
    shape = _mit_shape(state)
    classifier = state.get("head.conv_seg.weight")
    attention = state.get("attention_head.conv_seg.weight")
    if attention is None:
        hrda = None
    else:
        hrda = "classwise attention" if attention.shape[0] > 1 else "single-channel attention"
    return {
        "layout": layout,
        "variant": _variant_name(*shape) if shape else None,
        "num_classes": int(classifier.shape[0]) if classifier is not None else None,
        "has_head": any(k.startswith("head.") for k in state),
        "hrda": hrda,
        "tensors": len(state),
        "parameters": sum(
            v.numel()
            for k, v in state.items()
            if "running_" not in k and not k.endswith("num_batches_tracked")
        ),
        "ignored": len(ignored),
    }


def load_pretrained(module: Segmentor | MiT, source: str | Path) -> LoadReport:
    """Load weights from a file, folder or Hugging Face id into `module` (see module docstring).

    Raises:
        CheckpointError: missing/unreadable file, other MiT variant or other number of classes.
    """
    state_dict, config = read_weights(source)
    variant = config.get("model", {}).get("variant") if config else None
    encoder = module.encoder if isinstance(module, Segmentor) else module
    if (
        variant
        and variant in MIT_VARIANTS
        and variant != encoder.variant
        and encoder.variant in MIT_VARIANTS
    ):
        raise CheckpointError(f"{source}: weights are {variant} but the model is {encoder.variant}")
    return load_state(module, state_dict, str(source))


def hf_reference_encoder(encoder: MiT, attn_implementation: str = "sdpa") -> nn.Module:
    """A `transformers.SegformerModel` holding `encoder`'s weights, for parity tests and benchmarks.

    Its block and stage LayerNorms get the original eps 1e-6 (transformers builds all with 1e-5).
    Needs the optional `transformers` package.
    """
    from transformers import SegformerConfig, SegformerModel

    config = SegformerConfig(
        num_channels=encoder.patch_embed1.proj.in_channels,
        hidden_sizes=list(encoder.embed_dims),
        depths=list(encoder.depths),
        num_attention_heads=[getattr(encoder, f"block{s}")[0].attn.num_heads for s in range(1, 5)],
        sr_ratios=[getattr(encoder, f"block{s}")[0].attn.sr_ratio for s in range(1, 5)],
        mlp_ratios=[
            getattr(encoder, f"block{s}")[0].mlp.fc1.out_features // encoder.embed_dims[s - 1]
            for s in range(1, 5)
        ],
        drop_path_rate=0.0,
    )
    config._attn_implementation = attn_implementation
    model = SegformerModel(config)
    is_v5 = any(k.startswith("stages.") for k in model.state_dict())
    state = convert_nvlabs_to_hf(encoder.state_dict(), "transformers" if is_v5 else "hub")
    if not is_v5:
        state = {k.removeprefix("segformer."): v for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    for name, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) and not (
            "patch_embeddings" in name or "attention" in name
        ):
            module.eps = 1e-6
    return model.eval()
