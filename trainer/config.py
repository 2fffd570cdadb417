"""Training configuration: YAML -> typed dataclasses, validated, with every missing path named at once."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from adaface_core.errors import ConfigError, ModelFileMissingError

from .compositions import has_one_subject_slot
from .single_file import is_single_file, tokenizer_paths
from .single_file import required_paths as single_file_paths


@dataclass
class ModelsConfig:
    sd15: str = ""
    """SD1.5: a diffusers folder (unet/ text_encoder/ tokenizer/ vae/ scheduler/) or a single-file
    ``.safetensors``/``.ckpt`` checkpoint in the original LDM layout (the kind ComfyUI's checkpoints/ holds)."""
    tokenizer: str = ""
    """CLIP tokenizer folder (vocab.json + merges.txt): SD1.5's tokenizer/ or ComfyUI's comfy/sd1_tokenizer.
    Required when sd15 is a single file (it holds none); for a folder '' = its tokenizer/."""
    sd15_configs: str = ""
    """Architecture configs of a single-file sd15 (unet/, vae/, text_encoder/ config.json);
    '' = trainer/sd15_configs (SD1.5's own). Only an SD1.5-shaped variant needs its own."""
    arc2face: str = ""
    """FoivosPar/Arc2Face folder (encoder/ and arc2face/)."""
    face_pack: str = ""
    """insightface pack folder (antelopev2) for the ArcFace vectors of the training images; '' = random IDs only."""
    init_inverter: str = ""
    """Optional AdaFace checkpoint to start from; '' = a fresh inverter from SD1.5's (OpenAI CLIP-L) text encoder."""
    face_provider: str = "auto"


@dataclass
class DataConfig:
    root: str = ""
    """Folder tree of face images (jpg/png/webp), each optionally with ``<name>_mask.png`` beside it."""
    image_size: int = 512
    random_id_prob: float = 0.4
    id_noise_std: float = 0.01
    """Per-dimension std of the Gaussian noise added to real ArcFace vectors (before renormalising): a slight
    perturbation. On the 512-d unit vectors the noise's norm is about std x sqrt(512), so 0.01 keeps a
    cosine of about 0.97 to the photo's vector; 0.04 would already give 0.74, as far apart as two photos
    of one person often are."""
    cache_file: str = ""
    """ArcFace vector cache (safetensors); '' = ``<output>/face_ids.safetensors``."""
    photo_cache_gb: float = 4.0
    """Host memory, per process, for the photos' VAE latents (about 68 KiB a photo at 512x512): a cached photo
    is neither decoded nor encoded again. 0 encodes every photo at every use."""


STUDENT_TEMPLATES = (
    "a photo of {subject}",
    "photo of a {subject} person",
    "a close-up photo of {subject}",
    "a portrait of {subject}",
    "a good photo of {subject}",
    "a bright photo of {subject}",
    "a dark photo of {subject}",
    "a cropped photo of {subject}",
    "a picture of {subject}",
    "an image of {subject}",
)


@dataclass
class FaceLossConfig:
    student_templates: list[str] = field(default_factory=lambda: list(STUDENT_TEMPLATES))
    """The student's prompt, one drawn per sample; ``{subject}`` becomes the placeholder (other text, braces
    included, stays as written). Several, as in the reference code, so the subject tokens are not learnt for
    one fixed context."""
    placeholder: str = "z"
    chain_steps: int = 3
    first_t: tuple[float, float] = (0.7, 0.9)
    """First timestep of the chain, as a fraction of T, uniform in this range."""
    next_t_ratio: tuple[float, float] = (0.5, 0.8)
    """Each next timestep is the previous one times a ratio uniform in this range."""
    cfg_prob: float = 0.6
    cfg_scale: tuple[float, float] = (1.5, 2.5)
    use_masks: bool = True


@dataclass
class OptimConfig:
    optimizer: str = "prodigy"
    lr: float = 1.0
    d_coef: float = 2.0
    weight_decay: float = 0.0
    """The reference code trains without weight decay: it would pull the CLIP-initialised weights to 0."""
    betas: tuple[float, float] = (0.9, 0.999)
    bias_correction: bool = True
    """Prodigy's Adam-style bias correction (``use_bias_correction``), on in the reference code."""
    batch_size: int = 4
    grad_accum: int = 2
    warmup_steps: int = 0
    """Linear warm-up from 0 over these steps (for AdamW; Prodigy estimates its own step size, and the
    reference's Prodigy "warm_up_steps" are a hold at full LR, ``lr_decay_start`` here)."""
    lr_schedule: str = "linear"
    """``linear``: after ``lr_decay_start`` steps the LR falls linearly to ``lr_final_factor`` x at the stage's
    last step (the reference code's Prodigy schedule); ``constant``: no decay."""
    lr_decay_start: int = 500
    lr_final_factor: float = 1.0 / 11.0
    """The reference's PolynomialLR over 1.1 x the decay span ends at 1 - 1/1.1 = 1/11 of the LR."""
    max_grad_norm: float = 0.5
    """Global-norm clip at each optimizer step; 0.5 as in the reference code's paper runs (adaface-neurips/adaface
    ``configs/stable-diffusion/v1-finetune-ada.yaml`` ``grad_clip``, both stages; also ``v1-distill-arc2face-ada.yaml``)."""


@dataclass
class ExpansionConfig:
    enabled: bool = True
    factors: list[list[int]] = field(default_factory=list)
    """Per-expansion factors per inverter layer, applied in order (their product = final multipliers)."""
    forced_steps: list[int] = field(default_factory=list)
    """Expansion i happens at forced_steps[i] at the latest (0 or missing = plateau only)."""
    ema_beta: float = 0.99
    patience: int = 2000
    min_rel_improvement: float = 0.01
    warmup_steps: int = 5000
    min_steps_between: int = 10000
    perturb_std: float = 0.1


@dataclass
class StageConfig:
    max_steps: int = 240000
    optim: OptimConfig = field(default_factory=OptimConfig)
    expansion: ExpansionConfig = field(default_factory=ExpansionConfig)
    loss: FaceLossConfig = field(default_factory=FaceLossConfig)
    extra: dict[str, Any] = field(default_factory=dict)
    """Stage-specific settings a stage plugin reads itself (stage 2 puts its knobs here)."""


@dataclass
class RunConfig:
    output: str = "outputs/train"
    seed: int = 0
    save_every: int = 1000
    keep_last: int = 3
    log_every: int = 10
    mixed_precision: str = "no"
    """no | bf16 (frozen UNets are cast to bf16 too); fp16 is not supported (no loss scaling here)."""
    device: str = "auto"
    """auto (CUDA when present, else CPU) or cpu."""
    tensorboard: bool = True
    gradient_checkpointing: bool = False
    """Recompute the student UNet's activations in the backward pass: less memory, about 1/3 more time."""
    channels_last: bool = False
    """Frozen UNets in channels-last memory layout (faster convolutions on recent GPUs; same results)."""
    compile: bool = False
    """``torch.compile`` the frozen UNets (minutes of compiling before the first step; same results)."""
    distributed_timeout_minutes: int = 360
    """How long the other GPUs' processes wait for process 0 at a barrier: the first run's face analysis of a
    large photo tree (about 30 ms a photo) happens there, and torch's own default (10 to 30 minutes) ends the run."""


def unread_composition_loss_keys(composition: Optional[StageConfig]) -> list[str]:
    """The ``composition.loss`` settings set away from their defaults that stage 2 never reads: it draws its
    own prompts and takes the face-loss chain (masks, timesteps, CFG) from ``face.loss``."""
    if composition is None:
        return []
    default = FaceLossConfig()
    return [f.name for f in dataclasses.fields(FaceLossConfig)
            if f.name != "placeholder" and getattr(composition.loss, f.name) != getattr(default, f.name)]


@dataclass
class TrainConfig:
    models: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)
    face: StageConfig = field(default_factory=StageConfig)
    composition: Optional[StageConfig] = None
    stage: str = "face"

    def validate(self, check_paths: bool = True) -> "TrainConfig":
        problems = []
        if self.stage not in ("face", "composition", "both"):
            problems.append(f"stage must be face, composition or both, got {self.stage!r}")
        for name, stage in (("face", self.face), ("composition", self.composition)):
            if stage is None:
                continue
            o = stage.optim
            if o.optimizer not in ("prodigy", "adamw"):
                problems.append(f"{name}.optim.optimizer must be prodigy or adamw, got {o.optimizer!r}")
            if o.lr_schedule not in ("linear", "constant"):
                problems.append(f"{name}.optim.lr_schedule must be linear or constant, got {o.lr_schedule!r}")
            if not 0.0 <= o.lr_final_factor <= 1.0 or o.lr_decay_start < 0 or o.warmup_steps < 0:
                problems.append(f"{name}.optim: lr_final_factor must be in [0, 1], "
                                "lr_decay_start and warmup_steps >= 0")
            if not o.lr > 0:
                problems.append(f"{name}.optim.lr must be > 0, got {o.lr}")
            if o.batch_size < 1 or o.grad_accum < 1 or stage.max_steps < 0:
                problems.append(f"{name}: batch_size and grad_accum must be >= 1 and max_steps >= 0")
            if not all(0.0 <= beta < 1.0 for beta in o.betas) or not o.d_coef > 0 or o.weight_decay < 0:
                problems.append(f"{name}.optim: betas must be in [0, 1), d_coef > 0 and weight_decay >= 0, got "
                                f"{list(o.betas)}, {o.d_coef} and {o.weight_decay}")
            loss = stage.loss
            if loss.chain_steps < 1:
                problems.append(f"{name}.loss.chain_steps must be >= 1")
            if not 0.0 <= loss.first_t[0] <= loss.first_t[1] <= 1.0:
                problems.append(f"{name}.loss.first_t must be a range inside [0, 1], got {loss.first_t}")
            if not 0.0 < loss.next_t_ratio[0] <= loss.next_t_ratio[1] < 1.0:
                problems.append(f"{name}.loss.next_t_ratio must be a range inside (0, 1), got {loss.next_t_ratio}")
            if not 0.0 <= loss.cfg_prob <= 1.0:
                problems.append(f"{name}.loss.cfg_prob must be in [0, 1]")
            if not 0.0 < loss.cfg_scale[0] <= loss.cfg_scale[1]:
                problems.append(f"{name}.loss.cfg_scale must be a range [low, high] with 0 < low <= high, got {loss.cfg_scale}")
            if not loss.student_templates or not all(map(has_one_subject_slot, loss.student_templates)):
                problems.append(f"{name}.loss.student_templates must be a non-empty list of prompts, "
                                "each with '{subject}' once")
            expansion = stage.expansion
            for factors in expansion.factors:
                if not factors or any(int(f) < 1 for f in factors):
                    problems.append(f"{name}.expansion.factors entries must be non-empty lists of ints >= 1")
            forced = [step for step in expansion.forced_steps if step]  # 0 = by plateau only
            if any(step < 0 for step in expansion.forced_steps) or forced != sorted(set(forced)):
                problems.append(f"{name}.expansion.forced_steps must be steps in increasing order (0 = by plateau "
                                f"only), got {expansion.forced_steps}")
            if not 0.0 <= expansion.ema_beta < 1.0 or min(expansion.patience, expansion.warmup_steps,
                                                          expansion.min_steps_between) < 0 \
                    or expansion.min_rel_improvement < 0 or expansion.perturb_std < 0:
                problems.append(f"{name}.expansion: ema_beta must be in [0, 1); patience, warmup_steps, "
                                "min_steps_between, min_rel_improvement and perturb_std >= 0")
        if not 0.0 <= self.data.random_id_prob <= 1.0:
            problems.append("data.random_id_prob must be in [0, 1]")
        problems += [f"data.{name} must be >= 0, got {value}" for name, value in
                     (("photo_cache_gb", self.data.photo_cache_gb), ("id_noise_std", self.data.id_noise_std)) if value < 0]
        if not self.run.output.strip():
            problems.append("run.output must name the folder to train into (empty, it would be the working directory)")
        if self.data.image_size < 8 or self.data.image_size % 8:
            problems.append(f"data.image_size must be a positive multiple of 8 (the VAE's downsampling), "
                            f"got {self.data.image_size}")
        if self.run.distributed_timeout_minutes < 1:
            problems.append(f"run.distributed_timeout_minutes must be >= 1, got {self.run.distributed_timeout_minutes}")
        if self.run.save_every < 1 or self.run.keep_last < 0 or self.run.log_every < 1:
            problems.append("run.save_every and run.log_every must be >= 1 and run.keep_last >= 0, got "
                            f"{self.run.save_every}, {self.run.log_every} and {self.run.keep_last}")
        if self.run.mixed_precision not in ("no", "bf16"):
            problems.append(f"run.mixed_precision must be 'no' or 'bf16', got {self.run.mixed_precision!r} "
                            "(fp16 would need loss scaling; use bf16)")
        if self.run.device not in ("auto", "cpu"):
            problems.append(f"run.device must be 'auto' (CUDA when present, MPS on Apple silicon, else CPU) or 'cpu', got {self.run.device!r} "
                            "(pick GPUs with CUDA_VISIBLE_DEVICES or accelerate launch)")
        if self.face.extra:
            problems.append(f"face.extra: stage 1 reads no extra settings, got {', '.join(sorted(self.face.extra))}")
        ignored = unread_composition_loss_keys(self.composition)
        if ignored:
            problems.append(f"composition.loss: stage 2 reads only 'placeholder' (its face-loss chain is face.loss's), "
                            f"got {', '.join(ignored)}: set them under face.loss")
        if self.stage in ("composition", "both") and self.composition is None:
            problems.append(f"stage {self.stage!r} needs a 'composition:' section")
        if problems:
            raise ConfigError("invalid training configuration: " + "; ".join(problems))
        if check_paths:
            self.check_paths()
        return self

    def required_paths(self) -> list[tuple[str, Path]]:
        sd, a2f = Path(self.models.sd15 or "<unset>"), Path(self.models.arc2face or "<unset>")
        if self.models.sd15 and is_single_file(self.models.sd15):
            paths = single_file_paths(self.models.sd15, self.models.tokenizer, self.models.sd15_configs)
        else:
            tokenizer = [("models.tokenizer", path) for path in tokenizer_paths(self.models.tokenizer)] \
                if self.models.tokenizer else [("models.sd15 tokenizer", sd / "tokenizer" / "vocab.json")]
            paths = [
                ("models.sd15 unet", sd / "unet" / "config.json"),
                ("models.sd15 text_encoder", sd / "text_encoder" / "config.json"),
                *tokenizer,
                ("models.sd15 vae", sd / "vae" / "config.json"),
                ("models.sd15 scheduler", sd / "scheduler" / "scheduler_config.json"),
            ]
        paths += [
            ("models.arc2face encoder", a2f / "encoder" / "config.json"),
            ("models.arc2face unet", a2f / "arc2face" / "config.json"),
        ]
        if self.data.root:
            paths.append(("data.root", Path(self.data.root)))
        if self.models.face_pack:
            paths.append(("models.face_pack", Path(self.models.face_pack)))
        if self.models.init_inverter:
            paths.append(("models.init_inverter", Path(self.models.init_inverter)))
        return paths

    def check_paths(self) -> None:
        """One error naming every missing path (a single-file sd15 also needs models.tokenizer)."""
        missing = [f"{what}: {path}" for what, path in self.required_paths() if not path.exists()]
        if self.data.root and Path(self.data.root).is_file():
            raise ConfigError(f"data.root {self.data.root} is a file: give the folder of training photos")
        if missing:
            raise ModelFileMissingError(
                f"{len(missing)} path(s) named by the training configuration do not exist:\n  " + "\n  ".join(missing)
            )


def _build(cls: Any, values: Any, where: str) -> Any:
    """Recursively builds dataclass ``cls`` from a mapping, rejecting unknown keys by name."""
    if values is None:
        return cls()
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) in {where or 'config'}: {', '.join(unknown)} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for key, value in values.items():
        kwargs[key] = _convert(hints[key], value, f"{where}.{key}" if where else key)
    return cls(**kwargs)


def section_from_mapping(cls: Any, values: Any, where: str) -> Any:
    """A stage plug-in's settings dataclass from its ``extra:`` mapping, with the same checks as the YAML."""
    return _build(cls, values, where)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin is Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return None if value is None else _convert(args[0], value, where)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(typing.get_args(hint)):
            raise ConfigError(f"{where} must be a list of {len(typing.get_args(hint))} values, got {value!r}")
        return tuple(_convert(a, v, where) for a, v in zip(typing.get_args(hint), value))
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        (arg,) = typing.get_args(hint)
        return [_convert(arg, v, where) for v in value]
    if origin is dict or hint is Any:
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is str:
        return "" if value is None else str(value)
    return value


COMPOSITION_DEFAULTS: dict[str, Any] = {
    "max_steps": 120000,
    "optim": {"d_coef": 0.5, "batch_size": 3, "grad_accum": 2},
    "expansion": {"enabled": False},
}
"""Stage 2's own defaults (paper §3.1), under whatever a ``composition:`` section leaves out: stage 1's
(240k steps, d_coef 2, batch 4, expansion) would be wrong for it."""


def _with_defaults(defaults: dict[str, Any], values: Any) -> Any:
    if not isinstance(values, dict):
        return values
    merged = dict(defaults)
    for key, value in values.items():
        merged[key] = _with_defaults(defaults[key], value) if isinstance(defaults.get(key), dict) else value
    return merged


def config_from_dict(values: dict, base_dir: Optional[Path] = None) -> TrainConfig:
    """A configuration from a mapping; relative paths resolve against ``base_dir`` (the YAML's folder)."""
    if isinstance(values, dict) and values.get("composition") is not None:
        values = dict(values, composition=_with_defaults(COMPOSITION_DEFAULTS, values["composition"]))
    config = _build(TrainConfig, values, "")
    if base_dir is not None:
        for obj, attr in ((config.models, "sd15"), (config.models, "arc2face"), (config.models, "face_pack"),
                          (config.models, "init_inverter"), (config.models, "tokenizer"), (config.models, "sd15_configs"),
                          (config.data, "root"), (config.data, "cache_file")):
            value = getattr(obj, attr)
            if value and not Path(value).expanduser().is_absolute():
                setattr(obj, attr, str((base_dir / value).resolve()))
            elif value:
                setattr(obj, attr, str(Path(value).expanduser()))
    return config


def load_config(path: Union[str, Path], base: Optional[TrainConfig] = None) -> TrainConfig:
    """Reads a YAML file into a ``TrainConfig`` (not yet validated: call ``.validate()``); with ``base``,
    the file's values are laid over it, section by section (the smoke preset with a user's changes).

    Relative paths in it are relative to the working directory (run from the repository root)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileMissingError(f"training configuration not found: {path}")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    except UnicodeDecodeError as exc:  # Windows Notepad's "Unicode" is UTF-16
        raise ConfigError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): save it as UTF-8") from exc
    if base is not None and isinstance(values, dict):
        values = _laid_over(config_to_dict(base), values)
    return config_from_dict(values)


def _laid_over(base: dict, values: dict) -> dict:
    """``values`` over ``base``: mappings merge key by key, anything else replaces."""
    merged = dict(base)
    for key, value in values.items():
        below = merged.get(key)
        merged[key] = _laid_over(below, value) if isinstance(below, dict) and isinstance(value, dict) else value
    return merged


def config_to_dict(config: TrainConfig) -> dict:
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))
