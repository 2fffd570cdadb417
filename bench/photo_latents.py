"""A micro-batch of training photos -> VAE latents and face masks: uncached (decode, crop, resize, VAE
encode) against the trainer's photo latent cache (``trainer.photo_latents``), side by side.

What the cache removes from every step after the first pass over the data: the host's image decoding
(the same work on any machine's CPU, serial with the GPU's in the trainer) and the VAE encoder's GPU
time. The VAE is SD1.5's architecture with random weights (``trainer/sd15_configs/vae``), float32 weights
as the trainer keeps it, run under ``--dtype`` autocast as the trainer's mixed precision runs it; its FLOPs
per photo are counted with ``torch.utils.flop_counter``. Photos: real ones from ``../shared/data/faces``
(the labeled photos at least ``--image-size`` wide, like FFHQ-style training data), or ``--photos DIR``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, base_parser, report, resolve, spec_for, time_interleaved  # noqa: E402
from face_pipeline import FACES  # noqa: E402

from adaface_core.tiny_models import write_vae_folder  # noqa: E402
from adaface_core.image_io import PHOTO_SUFFIXES  # noqa: E402
from trainer.data import FaceImages, downsample_mask  # noqa: E402
from trainer.models import vae_latents  # noqa: E402
from trainer.photo_latents import PhotoLatents  # noqa: E402


@dataclass
class VaeOnly:
    """The part of ``trainer.models.Models`` the photo cache uses."""

    vae: torch.nn.Module
    device: torch.device

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return vae_latents(self.vae, pixels, self.device)


def random_vae(tiny: bool, tmp: Path, device: torch.device) -> torch.nn.Module:
    """SD1.5's AutoencoderKL with random weights (or the tests' tiny one), float32 as the trainer keeps it."""
    from diffusers import AutoencoderKL

    if tiny:
        return AutoencoderKL.from_pretrained(str(write_vae_folder(spec_for(True), tmp / "vae"))).to(device)
    config = json.loads((REPO / "trainer" / "sd15_configs" / "vae" / "config.json").read_text(encoding="utf-8"))
    torch.manual_seed(0)
    with torch.device(device):
        return AutoencoderKL(**{k: v for k, v in config.items() if not k.startswith("_")})


def image_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        return img.size


def training_photos(root: Path, count: int, min_side: int) -> dict[Path, tuple[int, int]]:
    """``count`` photos at least ``min_side`` px on their shorter side, with their sizes (largest first, so the
    cost is not flattered)."""
    sizes = {p: image_size(p) for p in sorted(root.rglob("*")) if p.suffix.lower() in PHOTO_SUFFIXES}
    usable = sorted((p for p, wh in sizes.items() if min(wh) >= min_side), key=lambda p: -sizes[p][0] * sizes[p][1])
    if len(usable) < count:
        raise SystemExit(f"need {count} photos of at least {min_side} px under {root}, found {len(usable)}")
    return {p: sizes[p] for p in usable[:count]}


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser("Training photos -> VAE latents: uncached vs the photo latent cache.")
    parser.add_argument("--batch", type=int, default=4, help="photos per micro-batch (stage 1's batch size)")
    parser.add_argument("--image-size", type=int, help="training resolution (default 512; 64 with --tiny)")
    parser.add_argument("--photos", type=Path, help="a folder of training photos (default: the shared labeled faces)")
    parser.set_defaults(warmup=1, repeats=5)
    args = parser.parse_args(argv)
    device, dtype = resolve(args)
    size = args.image_size or (64 if args.tiny else 512)
    root = args.photos or FACES / "labeled"
    photo_sizes = training_photos(root, args.batch, size)
    paths = list(photo_sizes)
    with tempfile.TemporaryDirectory(prefix="bench_photos_") as tmp:
        vae = random_vae(args.tiny, Path(tmp), device).eval().requires_grad_(False)
    models = VaeOnly(vae, device)
    images = FaceImages(root, paths, torch.zeros(len(paths), 512), size)
    latent = size // 2 ** (len(vae.config.block_out_channels) - 1)
    indices = list(range(len(paths)))
    warm = PhotoLatents(images)
    loaded = [images.load(i) for i in indices]

    def load_all():
        return [images.load(i) for i in indices]

    def encode_all():
        for pixels, mask in loaded:
            models.encode_images(pixels[None])
            downsample_mask(mask[None], (latent, latent))

    fns = {
        "load (decode, crop, resize, mask)": load_all,
        "VAE encode": encode_all,
        "uncached: load + VAE encode": lambda: PhotoLatents(images, max_bytes=0).get(models, indices, latent),
        "cached": lambda: warm.get(models, indices, latent),
    }
    precision = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    with torch.inference_mode(), precision:
        warm.get(models, indices, latent)
        timings = time_interleaved(fns, device, args.warmup, args.repeats)
        with FlopCounterMode(display=False) as counter:
            models.encode_images(loaded[0][0][None])
    results = {name: t.summary() for name, t in timings.items()}
    results |= {"photos": [f"{p.relative_to(root).as_posix()} {w}x{h}" for p, (w, h) in photo_sizes.items()],
                "image_size": size, "latent_size": latent, "autocast": str(dtype) if dtype != torch.float32 else None, "vae_encode_flops_per_photo": counter.get_total_flops(),
                "cache_bytes_per_photo": warm.cached_bytes // len(paths)}
    rows = [(f"{name}, {len(paths)} photos", t.text()) for name, t in timings.items()]
    rows += [("VAE encoder FLOPs per photo", f"{counter.get_total_flops() / 1e9:.1f} GFLOP"),
             ("cache memory per photo", f"{warm.cached_bytes / len(paths) / 1024:.1f} KiB"),
             ("photos", ", ".join(results["photos"]))]
    return report("photo_latents", args, device, rows, results)


if __name__ == "__main__":
    main()
