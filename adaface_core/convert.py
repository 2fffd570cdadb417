"""One-time conversion of an official AdaFace ``.pt`` release into this pack's safetensors format.

The official files pickle whole ``SubjBasisGenerator`` modules. They are read with the restricted
unpickler (nothing in them is imported or run), the Arc2Face generator's prompt inverter weights
are mapped onto :class:`PromptInverter`, the attention multipliers are rebuilt from the weight
shapes (and checked against what the file says), and the result is written with
:func:`save_inverter`, so it loads with :func:`load_inverter` like any trained inverter.

    python -m adaface_core.convert OFFICIAL.pt OUT.safetensors [--subject z] [--dtype fp16|fp32]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch

from .checkpoint import (
    check_weights_usable, check_writable_destination, fsync_dir, load_inverter, non_finite_tensors, save_inverter,
    write_failed,
)
from .cli import run_cli, user_path
from .clip_text import ClipTextConfig
from .errors import AdaFaceError, CheckpointError, ConfigError
from .inverter import InverterConfig, PromptInverter, reference_template_ids
from .safe_unpickle import StandIn, is_standin, load_torch_zip
from .weights import load_checked

logger = logging.getLogger(__name__)

ARC2FACE_TOKENS = 16  # Arc2Face's ID prompt: 16 image-space tokens (ConsistentID's has 4)
JOINT_ARC2FACE_INDEX = 1  # the reference's name2idx: {'consistentID': 0, 'arc2face': 1}
_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


_CONFIG_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings", "layer_norm_eps", "hidden_act")


@dataclass
class ConversionReport:
    """What was converted, from where, and what was deliberately left out."""

    source: str
    destination: str
    subject: str
    generator: str
    num_tokens: int
    attention_multipliers: list[int]
    hidden_state_layer_weights: list[float]
    clip: dict[str, Any]
    source_dtype: str
    output_dtype: str
    num_tensors: int
    left_out: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [
            f"converted {self.source} -> {self.destination}",
            f"  generator: {self.generator} ({self.num_tokens} ID tokens), subject {self.subject!r}",
            f"  attention multipliers: {self.attention_multipliers}",
            f"  hidden-state layer weights: {[round(w, 4) for w in self.hidden_state_layer_weights]}",
            f"  dtype: {self.source_dtype} -> {self.output_dtype}, {self.num_tensors} tensors",
        ]
        lines += [f"  left out: {item}" for item in self.left_out]
        lines += [f"  note: {item}" for item in self.notes]
        return "\n".join(lines)


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """An attribute of a stand-in, or a key of a plain dict."""
    if isinstance(obj, StandIn):
        return obj.get(name, default)
    if isinstance(obj, dict):
        return obj.get(name, default)
    return default


def _members(container: Any) -> Optional[list[Any]]:
    """Members of a pickled ModuleList (or a plain list/tuple); ``None`` for a single module."""
    if isinstance(container, (list, tuple)):
        return list(container)
    if is_standin(container, "ModuleList"):
        return [child for _, child in container.children()]
    return None


def _num_id_tokens(generator: StandIn) -> Optional[int]:
    for name in ("N_ID", "num_id_vecs"):
        value = generator.get(name)
        if isinstance(value, int):
            return value
    return None


def select_arc2face_generator(
    checkpoint: Any, subject: str, notes: list[str], left_out: list[str]
) -> tuple[StandIn, str]:
    """The Arc2Face generator for ``subject``: the single one, or index 1 of a joint release."""
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"the file holds a {type(checkpoint).__name__}, not the dict of an AdaFace release")
    generators = checkpoint.get("string_to_subj_basis_generator_dict")
    if generators is None:
        keys = sorted(map(str, checkpoint))[:8]
        raise CheckpointError(
            f"no 'string_to_subj_basis_generator_dict' in the file (top-level keys: {keys}); "
            "is this an official AdaFace checkpoint?"
        )
    logger.debug("placeholder_strings %s, subject_strings %s", checkpoint.get("placeholder_strings"),
                 checkpoint.get("subject_strings"))
    entry = _get(generators, subject)
    if entry is None:
        keys = [k for k, _ in generators.children()] if isinstance(generators, StandIn) else list(map(str, generators))
        raise CheckpointError(f"no generator for subject {subject!r}; the file has subjects {keys} (use --subject)")
    path = f"string_to_subj_basis_generator_dict[{subject!r}]"
    members = _members(entry)
    if members is None:
        generator = entry
    else:
        counts = [_num_id_tokens(m) if isinstance(m, StandIn) else None for m in members]
        if len(members) <= JOINT_ARC2FACE_INDEX or counts[JOINT_ARC2FACE_INDEX] != ARC2FACE_TOKENS:
            raise CheckpointError(
                f"{path} is a joint release of {len(members)} generators with {counts} ID tokens; expected the "
                f"Arc2Face generator ({ARC2FACE_TOKENS} tokens) at index {JOINT_ARC2FACE_INDEX}"
            )
        generator = members[JOINT_ARC2FACE_INDEX]
        path += f"[{JOINT_ARC2FACE_INDEX}]"
        for index, count in enumerate(counts):
            if index != JOINT_ARC2FACE_INDEX:
                what = "ConsistentID generator" if count == 4 else "generator"
                left_out.append(f"{what} at index {index} ({count} ID tokens): this pack runs the Arc2Face branch only")
    if not isinstance(generator, StandIn):
        raise CheckpointError(f"{path} is a {type(generator).__name__}, not a pickled generator module")
    count = _num_id_tokens(generator)
    if count is None:
        notes.append(f"{path} records no N_ID; assuming {ARC2FACE_TOKENS} Arc2Face ID tokens")
    elif count != ARC2FACE_TOKENS:
        raise CheckpointError(
            f"{path} takes {count} ID tokens; this pack runs the Arc2Face generator ({ARC2FACE_TOKENS} tokens)"
            + (" and this looks like a ConsistentID generator" if count == 4 else "")
        )
    if generator.get("placeholder_is_bg") is True or generator.get("prompt2token_proj") is None:
        raise CheckpointError(f"{path} ({generator.class_path}) has no prompt2token_proj: not a face generator")
    return generator, path


def _text_model(generator: StandIn) -> tuple[StandIn, Any]:
    """``prompt2token_proj.text_model`` (transformers 4.x) or the flattened model itself, and its config."""
    proj = generator.get("prompt2token_proj")
    if not isinstance(proj, StandIn):
        raise CheckpointError(f"prompt2token_proj is a {type(proj).__name__}, not a pickled CLIP text model")
    text_model = proj.get("text_model", proj)
    if not isinstance(text_model, StandIn) or not isinstance(text_model.get("embeddings"), StandIn):
        raise CheckpointError("prompt2token_proj has no CLIP text transformer (no text_model.embeddings)")
    return text_model, proj.get("config") or text_model.get("config")


def _shape_of(tensors: dict[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in tensors:
        raise CheckpointError(f"prompt2token_proj.text_model lacks the weight {key}")
    return tuple(tensors[key].shape)


def build_config(
    tensors: dict[str, torch.Tensor], stored: Any, text_model: StandIn, notes: list[str]
) -> ClipTextConfig:
    """CLIP text config from the stored config object, checked against (or, absent, taken from) the shapes."""
    vocab, hidden = _shape_of(tensors, "embeddings.token_embedding.weight")
    positions = _shape_of(tensors, "embeddings.position_embedding.weight")[0]
    layers = text_model.lookup("encoder.layers")
    num_layers = len(_members(layers) or []) if isinstance(layers, StandIn) else 0
    if num_layers == 0:
        raise CheckpointError("prompt2token_proj.text_model.encoder.layers is missing or empty")
    intermediate = _shape_of(tensors, "encoder.layers.0.mlp.fc1.weight")[0]
    from_shapes = {"vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate,
                   "num_hidden_layers": num_layers, "max_position_embeddings": positions}
    heads = max(hidden // 64, 1)  # CLIP's head width
    if isinstance(stored, (StandIn, dict)):
        values = {name: _get(stored, name) for name in _CONFIG_FIELDS if _get(stored, name) is not None}
        values.setdefault("num_attention_heads", heads)
        wrong = {k: (values[k], v) for k, v in from_shapes.items() if k in values and values[k] != v}
        if wrong:
            raise CheckpointError(f"the stored CLIP config disagrees with the weight shapes (config, weights): {wrong}")
    else:
        eps = text_model.lookup("final_layer_norm.eps")
        values = {"num_attention_heads": heads, "layer_norm_eps": eps if isinstance(eps, float) else 1e-5}
        notes.append(f"no stored CLIP config: taken from the weight shapes, {heads} heads of 64")
    try:
        return ClipTextConfig.from_dict({**values, **from_shapes})
    except (AdaFaceError, TypeError, ValueError) as exc:
        raise CheckpointError(f"the generator's CLIP configuration is not usable: {exc}") from exc


def rebuild_multipliers(
    tensors: dict[str, torch.Tensor], text_model: StandIn, config: ClipTextConfig, stored: Any, notes: list[str]
) -> list[int]:
    """Per-layer key/value copies from the projection shapes, checked against the recorded list.

    The generator's ``prompt2token_proj_attention_multipliers`` must agree (the reference loader
    expands to it before loading the weights). A layer's own ``multiplier`` attribute may be stale
    (the reference's de-duplication script edits weights and the list, not that attribute), so a
    disagreement there is only noted.
    """
    hidden, multipliers = config.hidden_size, []
    for i in range(config.num_hidden_layers):
        base = f"encoder.layers.{i}.self_attn"
        rows = {name: _shape_of(tensors, f"{base}.{name}.weight")[0] for name in ("q_proj", "k_proj", "v_proj")}
        if rows["q_proj"] != hidden or rows["k_proj"] % hidden or rows["k_proj"] != rows["v_proj"]:
            raise CheckpointError(f"layer {i} attention has projection rows {rows}; expected q={hidden}, k=v=m*hidden")
        multiplier = rows["k_proj"] // hidden
        recorded = text_model.lookup(f"{base}.multiplier")
        if isinstance(recorded, int) and recorded != multiplier:
            notes.append(f"layer {i}'s attention records multiplier {recorded}; its weights hold {multiplier} copies")
        multipliers.append(multiplier)
    if stored is not None and not (isinstance(stored, (list, tuple)) and all(isinstance(m, int) for m in stored)):
        notes.append(f"prompt2token_proj_attention_multipliers is not a list of ints ({stored!r:.60}); not checked")
    elif stored is not None and list(stored) != multipliers:
        raise CheckpointError(
            f"prompt2token_proj_attention_multipliers says {list(stored)} but the weight shapes give {multipliers}"
        )
    return multipliers


def _layer_weights(generator: StandIn) -> torch.Tensor:
    weights = generator.get("hidden_state_layer_weights")
    if weights is None:  # the reference's 'none' scheme: the last layer alone
        return torch.ones(1)
    shape = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
    if not (isinstance(shape, tuple) and (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1))):
        raise CheckpointError(f"hidden_state_layer_weights has shape {shape}; expected [k, 1] (one weight per layer)")
    return weights.detach().reshape(-1).float()


def _check_layerwise_proj(generator: StandIn, path: str) -> None:
    proj = generator.get("layerwise_proj")
    if proj is not None and not is_standin(proj, "Identity"):
        raise CheckpointError(f"{path} uses a layer-wise projection ({proj!r}) that this pack does not implement")


def convert_official_checkpoint(
    src: Union[str, Path],
    dst: Union[str, Path],
    subject: str = "z",
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
) -> ConversionReport:
    """Converts an official AdaFace ``.pt`` (read without running it) into an inverter safetensors file.

    ``dtype`` casts the written CLIP weights; by default they keep the source's precision. An existing
    ``dst`` is replaced only with ``overwrite``, and only by a file that reloaded through the checked path.
    """
    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise CheckpointError(f"the output must be a .safetensors file, got {dst.name}")
    check_writable_destination(dst)
    if dst.exists() and not overwrite:
        raise ConfigError(f"{dst} already exists; choose another name or pass --overwrite")
    checkpoint = load_torch_zip(src)
    notes: list[str] = []
    left_out: list[str] = []
    generator, path = select_arc2face_generator(checkpoint, subject, notes, left_out)
    _check_layerwise_proj(generator, path)
    text_model, stored_config = _text_model(generator)
    tensors = dict(text_model.named_tensors())
    config = build_config(tensors, stored_config, text_model, notes)
    stored_multipliers = generator.get("prompt2token_proj_attention_multipliers")
    multipliers = rebuild_multipliers(tensors, text_model, config, stored_multipliers, notes)
    layer_weights = _layer_weights(generator)
    num_tokens = _num_id_tokens(generator) or ARC2FACE_TOKENS
    if generator.get("static_img_suffix_embs") is not None or (generator.get("N_SFX") or 0) > 0:
        left_out.append("static image suffix embeddings (the reference uses them only in UNet distillation)")
    try:
        inverter_config = InverterConfig(
            clip=config, num_tokens=num_tokens, attention_multipliers=multipliers,
            num_hidden_state_layers=len(layer_weights), template_ids=reference_template_ids(num_tokens),
        )
    except AdaFaceError as exc:
        raise CheckpointError(f"{path} does not fit the inverter: {exc}") from exc
    inverter = PromptInverter(inverter_config)
    expected = set(inverter.clip.state_dict())
    state = {f"clip.{k}": v.detach().float() for k, v in tensors.items() if k in expected}
    unexpected = sorted(k for k, v in tensors.items() if k not in expected and isinstance(v, torch.nn.Parameter))
    if unexpected:
        raise CheckpointError(f"prompt2token_proj has weights this inverter does not know: {unexpected[:6]}")
    state["hidden_state_layer_weights"] = layer_weights
    load_checked(inverter, state, f"{src.name} {path}")
    check_weights_usable(inverter, f"{src.name} {path}")
    source_dtype = tensors["embeddings.token_embedding.weight"].dtype
    out_dtype = dtype or source_dtype
    metadata = {"converted_from": src.name, "source_generator": path, "source_subject": subject}
    inverter.clip.to(out_dtype)  # the three layer weights stay float32: tiny, and the mix is sensitive to them
    overflowed = non_finite_tensors(inverter.clip)
    if overflowed:
        raise CheckpointError(f"{src.name}: {overflowed[0]} holds values too large for {_dtype_name(out_dtype)}; "
                              "convert with --dtype fp32")
    staged = dst.with_name(f".{dst.stem}.converting.safetensors")
    try:
        save_inverter(inverter, staged, extra_metadata=metadata)
        load_inverter(staged)  # the written file must reload through the normal checked path
        try:
            os.replace(staged, dst)  # only now does an existing file give way
        except OSError as exc:
            raise write_failed(dst, exc) from exc
    finally:
        staged.unlink(missing_ok=True)  # a failed check or an interrupt leaves no second inverter in the folder
    fsync_dir(dst.parent)
    report = ConversionReport(
        source=str(src), destination=str(dst.resolve()), subject=subject, generator=f"{path} ({generator.class_path})",
        num_tokens=num_tokens, attention_multipliers=multipliers, hidden_state_layer_weights=layer_weights.tolist(),
        clip=config.to_dict(), source_dtype=_dtype_name(source_dtype),
        output_dtype=_dtype_name(out_dtype), num_tensors=len(state), left_out=left_out, notes=notes,
    )
    logger.info("%s", report.summary())  # names what was left out (the ConsistentID branch of a joint release)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point: 0 on success, 2 with a one-line error on any failure to convert."""
    parser = argparse.ArgumentParser(prog="python -m adaface_core.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=user_path, help="official AdaFace .pt checkpoint (read safely, never executed)")
    parser.add_argument("destination", type=user_path, help="output .safetensors file")
    parser.add_argument("--subject", default="z", help="subject string of the generator to convert (default: z)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), help="output precision (default: the source's)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing destination file")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    return run_cli(
        lambda: convert_official_checkpoint(args.source, args.destination, args.subject, _DTYPES.get(args.dtype),
                                            args.overwrite),
        "conversion",
        args.verbose,
    )

if __name__ == "__main__":
    sys.exit(main())
