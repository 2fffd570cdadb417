"""Stage 2, composition distillation (paper §2.3-2.4): the stage plug-in the training loop runs.

Per sample, four prompt instances share one noisy latent and timestep: subject-single ("a photo of z"),
subject-composition ("a photo of z <composition>"), class-single ("a photo of a person") and
class-composition; one batched UNet pass over the 4B instances feeds the compositional delta loss and
the elastic face-preserving loss (``losses_composition.composition_step``). The latent is the photo's
VAE latent, or for a random ID the teacher's one-step estimate from the sample's noise (as in stage 1),
noised to a mid-to-high t with that same noise.

Held-out check (``evaluate``): fixed random IDs, compositions removed from the training pool, fixed
noises and timesteps. It measures the delta loss (what stage 2 trains) and the stage-1 face-distillation
loss (measured, never trained here), so a run shows whether composition gains cost face fidelity.

Settings come from the stage section's ``extra:`` mapping (``CompositionSettings``), unknown keys refused.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch

from adaface_core.checkpoint import read_metadata
from adaface_core.devices import host_to_device
from adaface_core.errors import ConfigError
from adaface_core.inverter import InverterConfig
from adaface_core.tokenizer import load_clip_tokenizer, single_token_id

from .compositions import (DEFAULT_TEMPLATE, CompositionPool, PromptQuad, TokenAlignment, aligned_tokens, build_prompts,
                           has_one_subject_slot, load_composition_pool, sample_prompts)
from .config import StageConfig, TrainConfig, section_from_mapping
from .face_masks import attach_detector_masks
from .face_space import FaceBatch, FaceSpace
from .feature_capture import select_cross_attention_layers
from .loop import heldout_loss, precision_context
from .losses_composition import CompositionLossWeights, composition_step, prompt_delta_weights
from .losses_face import FaceDistillationLoss, FaceStage
from .models import Models, placeholder_token_id, tokenizer_folder
from .prompt_cache import FrozenPromptCache
from .stages import build_face_space, face_analyzer_factory, face_models_fingerprint, vae_downsampling

logger = logging.getLogger(__name__)


@dataclass
class CompositionSettings:
    """Stage-2 knobs (``composition.extra`` in the YAML)."""

    class_word: str = "person"
    """Class word of the class prompts ('a photo of a person') where a photo's folder has no ``class.txt``."""
    template: str = DEFAULT_TEMPLATE
    composition_files: list[str] = field(default_factory=list)
    """Extra composition pools (``trainer/data/compositions.txt`` format), merged with the packaged one."""
    capture_layers: list[str] = field(default_factory=lambda: ["up_blocks.3"])
    """UNet cross-attention layers whose features enter the losses: prefixes, or ["all"] (the paper)."""
    t_range: tuple[float, float] = (0.5, 0.9)
    """Timestep, as a fraction of T, uniform in this range (mid to high: the layout is still being decided)."""
    weights: CompositionLossWeights = field(default_factory=CompositionLossWeights)
    heldout_compositions: int = 8
    """Compositions taken out of the training pool for the held-out check."""
    heldout_size: int = 4
    heldout_batches: int = 2
    heldout_seed: int = 4321
    face_loss_bound: float = 1.5
    """Held-out face loss after stage 2 may be at most this times the loss before (warned, and reported)."""
    random_id_prob: float = 0.0
    """Share of random IDs among the training samples when there are photos (paper §2.4: stage 2 trains on
    face photos with their masks; a random ID has neither, so its face-preserving term covers the whole image).
    Without photos every ID is random."""

    @property
    def layers(self) -> Union[str, list[str]]:
        return "all" if self.capture_layers == ["all"] else self.capture_layers


def special_token_ids(tokenizer) -> list[int]:
    """BOS, EOS and padding ids (SD1.5's CLIP tokenizer: 49406, 49407, 49407), the tokens the reference's
    prompt-delta mask leaves out."""
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return sorted({i for i in ids if i is not None})


def composition_settings(stage_config: StageConfig) -> CompositionSettings:
    settings = section_from_mapping(CompositionSettings, stage_config.extra, "composition.extra")
    if not 0.0 <= settings.t_range[0] <= settings.t_range[1] <= 1.0:
        raise ConfigError(f"composition.extra.t_range must be a range inside [0, 1], got {settings.t_range}")
    if not 0.0 <= settings.random_id_prob <= 1.0:
        raise ConfigError(f"composition.extra.random_id_prob must be in [0, 1], got {settings.random_id_prob}")
    if settings.heldout_size < 1 or settings.heldout_batches < 1 or settings.face_loss_bound <= 0:
        raise ConfigError("composition.extra: heldout_size and heldout_batches must be >= 1 and face_loss_bound > 0, "
                          f"got {settings.heldout_size}, {settings.heldout_batches} and {settings.face_loss_bound}")
    if not has_one_subject_slot(settings.template):
        raise ConfigError(f"composition.extra.template must hold '{{subject}}' once, as a word of its own, got "
                          f"{settings.template!r}")
    weights = dataclasses.asdict(settings.weights)
    if any(not value >= 0 for value in weights.values()) or not any(settings.weights.delta_weights().values()):
        raise ConfigError(f"composition.extra.weights must be >= 0 (a negative one climbs its loss), with a delta "
                          f"term above 0, got {weights}")
    if not settings.capture_layers or not settings.class_word.strip() or settings.heldout_compositions < 1 \
            or not math.isfinite(settings.face_loss_bound):
        raise ConfigError("composition.extra: capture_layers must name a layer, class_word a word, "
                          "heldout_compositions be >= 1 and face_loss_bound a number, got "
                          f"{settings.capture_layers}, {settings.class_word!r}, {settings.heldout_compositions} and "
                          f"{settings.face_loss_bound}")
    return settings


def check_prompts(pool: CompositionPool, settings: CompositionSettings, placeholder: str, tokenizer,
                  num_tokens: int, max_length: int = 77) -> None:
    """Refuses what stage 2 would fail on at whichever step first drew it, hours in: a placeholder of several
    tokens, or one the template or a composition already holds (a prompt must hold it once), and a
    composition too long for the subject tokens within ``max_length`` positions. Also a held-out share
    that leaves no training composition."""
    placeholder_id = placeholder_token_id(tokenizer, placeholder)
    if placeholder_id in single_token_id(tokenizer, settings.template.replace("{subject}", "")):
        raise ConfigError(f"composition.extra.template {settings.template!r} holds the placeholder {placeholder!r} "
                          "already: choose another placeholder")
    holding, too_long = [], []
    for composition in pool.entries:
        ids = single_token_id(tokenizer, build_prompts(composition, placeholder=placeholder,
                                                       template=settings.template).subject_comp)
        if ids.count(placeholder_id) > 1:  # the template's own is there once
            holding.append(composition)
        if len(ids) - 1 + num_tokens + 2 > max_length:  # the placeholder becomes the tokens; + start and end
            too_long.append(composition)
    if holding:
        raise ConfigError(f"the placeholder {placeholder!r} is also a word of {len(holding)} composition(s) "
                          f"({'; '.join(holding[:3])}): choose another placeholder (composition.loss.placeholder)")
    if too_long:
        raise ConfigError(f"{len(too_long)} composition(s) leave no room for the {num_tokens} subject tokens in "
                          f"{max_length} positions: shorten them ({'; '.join(too_long[:3])})")
    if settings.heldout_compositions >= len(pool):
        raise ConfigError(f"composition.extra.heldout_compositions {settings.heldout_compositions} leaves none of "
                          f"the {len(pool)} compositions to train on")


def check_composition_inputs(config: TrainConfig) -> CompositionSettings:
    """Stage 2's settings, files and prompts, checked before any model loads (a ``--stage both`` run would
    otherwise meet a mistake only after stage 1)."""
    settings = composition_settings(config.composition)
    pool = load_composition_pool(settings.composition_files)
    start = config.models.init_inverter  # '' = a fresh inverter
    num_tokens = (InverterConfig.from_json(read_metadata(start)["config"]) if start else InverterConfig()).num_tokens
    check_prompts(pool, settings, config.composition.loss.placeholder, load_clip_tokenizer(tokenizer_folder(config)),
                  num_tokens)
    return settings


def check_capture_layers(unet: torch.nn.Module, stage_config: StageConfig) -> None:
    """Names each ``capture_layers`` entry that matches no cross-attention layer of this UNet, before stage 1
    trains: the first stage-2 step would otherwise fail hours later (or quietly drop a mistyped entry)."""
    layers = composition_settings(stage_config).layers
    if layers == "all":
        return
    for prefix in layers:
        try:
            select_cross_attention_layers(unet, [prefix])
        except ValueError as exc:
            raise ConfigError(f"composition.extra.capture_layers: {exc}") from None


def split_pool(pool: CompositionPool, heldout: int) -> tuple[CompositionPool, CompositionPool]:
    """(training pool, held-out pool): every k-th entry is held out, so every category tends to be represented."""
    entries = pool.entries
    heldout = min(heldout, len(entries) - 1)
    every = max(1, len(entries) // max(heldout, 1))
    held = entries[::every][:heldout] if heldout > 0 else []
    train = [e for e in entries if e not in set(held)]
    return CompositionPool({"train": train}), CompositionPool({"heldout": held or train})


@dataclass
class CompositionBatch:
    faces: FaceBatch
    quads: list[PromptQuad]
    noise: torch.Tensor
    """``[B, 4, h, w]``: the initial noise, shared by the four instances of a sample."""
    timesteps: torch.Tensor
    """``[B]`` long."""


class CompositionStage:
    """Stage 2 as the loop sees it; ``evaluate(models)`` gives the held-out figures."""

    name = "composition"

    def __init__(self, face_space: FaceSpace, pool: CompositionPool, settings: CompositionSettings, placeholder: str,
                 face_loss: FaceDistillationLoss, num_train_timesteps: int,
                 weights: Optional[CompositionLossWeights] = None):
        self.num_train_timesteps = num_train_timesteps
        self.face_space = face_space
        self.pool = pool
        self.settings = settings
        self.placeholder = placeholder
        self.face_loss = face_loss
        self.weights = weights or settings.weights
        self.heldout: Optional[tuple[CompositionStage, FaceStage]] = None
        self.heldout_settings: dict = {}
        """What the held-out figures depend on (``heldout_settings``), stored beside their start row."""
        self.class_prompts = FrozenPromptCache()
        """The class prompts' embeddings (frozen encoder, a finite set): encoded once each."""

    def class_prompt_texts(self) -> list[str]:
        """Every class prompt this stage can draw: each composition with each of its photos' class words."""
        words = {self.settings.class_word}
        images = self.face_space.images
        if images is not None:
            words |= {w for w in (images.class_word(i) for i in range(len(images))) if w}
        quads = [build_prompts(entry, word, self.placeholder, self.settings.template)
                 for word in sorted(words) for entry in self.pool.entries]
        return list(dict.fromkeys([q.class_single for q in quads] + [q.class_comp for q in quads]))

    def sample_batch(self, batch_size: int, generator: torch.Generator) -> CompositionBatch:
        faces = self.face_space.sample(batch_size, generator)
        quads = sample_prompts(self.pool, faces.class_words, batch_size, generator, self.placeholder,
                               default_class_word=self.settings.class_word, template=self.settings.template)
        size = self.face_loss.latent_size
        noise = torch.randn(batch_size, 4, size, size, generator=generator)
        low, high = self.settings.t_range
        t = ((low + (high - low) * torch.rand(batch_size, generator=generator)) * (self.num_train_timesteps - 1)).round().long()
        return CompositionBatch(faces, quads, noise, t)

    def token_alignment(self, models: Models, quads: list[PromptQuad], subject_len: int) -> TokenAlignment:
        """Per sample, the positions that correspond across its four prompts (N subject tokens vs 'a <class>')."""
        ids = models.prompt_ids([quads[0].subject_single])[0].tolist()
        start = ids.index(models.placeholder_id(self.placeholder))
        lengths = [len(models.tokenizer(q.class_single, add_special_tokens=False)["input_ids"])
                   - len(models.tokenizer(q.subject_single, add_special_tokens=False)["input_ids"]) + 1 for q in quads]
        return TokenAlignment.stack([aligned_tokens(start, subject_len, class_len) for class_len in lengths])

    def prompt_weights(self, models: Models, quads: list[PromptQuad], token_index: torch.Tensor) -> torch.Tensor:
        """``[B, K]`` weights of the prompt-embedding delta at the aligned positions ``[B, 4, K]``
        (``prompt_delta_weights``), read off the class prompts' ids: there they equal the subject prompts' ids."""
        single, comp = models.prompt_ids([q.class_single for q in quads] + [q.class_comp for q in quads]).chunk(2)
        return prompt_delta_weights(single.gather(1, token_index[:, 2]), comp.gather(1, token_index[:, 3]),
                                    special_token_ids(models.tokenizer))

    @torch.no_grad()
    def start_latents(self, models: Models, batch: CompositionBatch, teacher_ctx: torch.Tensor,
                      timesteps: torch.Tensor):
        """(noisy latents ``[B, 4, h, w]`` at ``timesteps`` (on the device),
        latent-resolution face masks ``[B, 1, h, w]``)."""
        noise = host_to_device(batch.noise, models.device)
        x0, masks = self.face_loss.start_x0(models, batch.faces, noise, teacher_ctx, None)
        return self.face_loss.noisy(models, x0, noise, timesteps), masks

    def loss(self, models: Models, batch: CompositionBatch, generator: torch.Generator):
        device, dtype = models.device, models.frozen_dtype
        quads = batch.quads
        timesteps = host_to_device(batch.timesteps, device)
        with torch.no_grad():
            enc = models.id_encoder(host_to_device(batch.faces.id_vectors, device, dtype))
            x_t, masks = self.start_latents(models, batch, enc.prompt_embeds.detach(), timesteps)
            class_embeds = self.class_prompts.encode(models, [q.class_single for q in quads] + [q.class_comp for q in quads])
        subject = models.inverter(enc.id_tokens.detach().float())
        subject_embeds = models.encode_with_subject([q.subject_single for q in quads] + [q.subject_comp for q in quads],
                                                    self.placeholder, torch.cat([subject, subject]))
        prompt_embeds = torch.cat([subject_embeds, class_embeds.to(subject_embeds)]).to(dtype)
        alignment = self.token_alignment(models, quads, subject.shape[1])
        prompt_weights = host_to_device(self.prompt_weights(models, quads, alignment.index), device)
        out = composition_step(models.unet, x_t.to(dtype), timesteps, prompt_embeds, masks,
                               self.settings.layers, self.weights, alignment.apply(lambda t: host_to_device(t, device)),
                               prompt_weights=prompt_weights)
        return out["loss"].float(), {k: v.detach() for k, v in out.items() if k != "loss"}

    def evaluate(self, models: Models) -> dict[str, float]:
        """Held-out delta loss (trained) and stage-1 face-distillation loss (measured only), fixed draws."""
        if self.heldout is None:
            raise RuntimeError("no held-out set was built for this stage")
        delta_stage, face_stage = self.heldout
        s = self.settings
        return {
            "heldout_delta": heldout_loss(delta_stage, models, s.heldout_batches, s.heldout_size, s.heldout_seed),
            "heldout_face": heldout_loss(face_stage, models, s.heldout_batches, s.heldout_size, s.heldout_seed),
        }


DELTA_REVISION = 2
"""Raised when the delta loss itself changes (2: the attention maps carry the subject's summed attention), so a
run resumed from an older version measures its held-out start again instead of comparing across the change."""


def heldout_settings(settings: CompositionSettings, config: TrainConfig, placeholder: str,
                     heldout_pool: CompositionPool) -> dict:
    """What the held-out figures depend on (the training-only knobs left out), the held-out compositions
    themselves included (a file edited since picks others): a resume under other values measures the
    stage's start again (``HeldoutReport``)."""
    measured = {k: v for k, v in dataclasses.asdict(settings).items() if k not in ("random_id_prob", "face_loss_bound")}
    measured["weights"].pop("face_preserve")  # the held-out draws weigh the delta terms only
    return dict(measured, placeholder=placeholder, heldout_entries=heldout_pool.entries,
                face_loss=dataclasses.asdict(config.face.loss),
                image_size=config.data.image_size, delta_revision=DELTA_REVISION)


def build_stage(config: TrainConfig, stage_config: StageConfig, models: Models, accelerator, output: Path) -> CompositionStage:
    settings = composition_settings(stage_config)
    face_space = build_face_space(config, models, accelerator, output, settings.random_id_prob)
    if face_space.images is not None and config.models.face_pack:
        with accelerator.main_process_first():  # process 0 runs the detector and caches; the others read the cache
            attach_detector_masks(face_space.images, face_analyzer_factory(config), output / "face_boxes.json",
                                  face_models_fingerprint(config))
    pool, heldout_pool = split_pool(load_composition_pool(settings.composition_files), settings.heldout_compositions)
    latent = config.data.image_size // vae_downsampling(models)
    face_loss = FaceDistillationLoss(config.face.loss, latent)
    placeholder = stage_config.loss.placeholder
    T = models.num_train_timesteps
    stage = CompositionStage(face_space, pool, settings, placeholder, face_loss, T)
    stage.heldout_settings = heldout_settings(settings, config, placeholder, heldout_pool)
    # Held out: random IDs only (never a training photo), the held-out compositions, delta terms only.
    heldout_ids = FaceSpace(None, models.id_dim, 1.0, 0.0, seed=settings.heldout_seed)
    delta_only = dataclasses.replace(settings.weights, face_preserve=0.0)
    stage.heldout = (CompositionStage(heldout_ids, heldout_pool, settings, placeholder, face_loss, T, delta_only),
                     FaceStage(heldout_ids, face_loss))
    with precision_context(accelerator):  # the training steps' precision, so warm and later encodes agree
        stage.class_prompts.warm(models, stage.class_prompt_texts())
    logger.info("composition stage: %d training / %d held-out compositions, layers %s, t in %s·T",
                len(pool), len(heldout_pool), settings.layers, settings.t_range)
    return stage
