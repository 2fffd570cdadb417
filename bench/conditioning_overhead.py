"""Sampling-step cost of AdaFace conditioning vs the plain prompt, measured side by side.

One denoising step = one SD1.5 UNet forward at batch 2 (classifier-free guidance: negative + positive),
512x512 images (64x64 latents), full SD1.5 architecture with random weights. The positive context is
(a) the plain prompt encoded by CLIP-L, or (b) the AdaFace prompt: the placeholder replaced by N subject
tokens through the core injection (``inject_into_chunks``), then the same encoder. AdaFace adds no
attention: its only possible per-step cost is a longer context, so the context lengths are reported too.
The two steps are interleaved in every repeat; the overhead is the ratio of their medians.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (base_parser, chunk_of, encode_chunks, overhead_pct, peak_gib, random_unet, report,  # noqa: E402
                    reset_peak, resolve, spec_for, time_interleaved)

from adaface_core.injection import SpecialTokens, SubjectSlot, inject_into_chunks  # noqa: E402
from adaface_core.tiny_models import random_clip_text, write_tokenizer  # noqa: E402
from adaface_core.tokenizer import load_clip_tokenizer, single_token_id  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser("UNet step with AdaFace conditioning vs the plain prompt (batch 2 CFG).")
    parser.add_argument("--latent", type=int, help="latent side (default 64 = 512x512 images; 8 with --tiny)")
    parser.add_argument("--num-tokens", type=int, default=16, help="subject tokens injected at the placeholder")
    parser.add_argument("--plain", default="a photo of a man in the forest")
    parser.add_argument("--adaface", default="a photo of z in the forest")
    args = parser.parse_args(argv)
    device, dtype = resolve(args)
    spec = spec_for(args.tiny)
    args.latent = args.latent or (8 if args.tiny else 64)

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_clip_tokenizer(write_tokenizer(Path(tmp) / "tokenizer"))
    text_model = random_clip_text(spec, seed_offset=1).to(device, dtype).eval()
    unet = random_unet(args.tiny, device=device).to(dtype).eval()
    special = SpecialTokens.from_empty_chunk(chunk_of(tokenizer, ""))
    g = torch.Generator().manual_seed(0)
    subject = torch.randn(args.num_tokens, spec.hidden_size, generator=g) * 0.02  # embedding-table scale
    slot = SubjectSlot("z", tuple(single_token_id(tokenizer, "z")), subject.to(device, dtype))

    plain_chunks = [chunk_of(tokenizer, args.plain)]
    adaface_chunks = [chunk_of(tokenizer, args.adaface)]  # tokenized once, like the plain prompt
    with torch.inference_mode():
        negative = encode_chunks(text_model, [chunk_of(tokenizer, "")])

        def encode_plain() -> torch.Tensor:
            return encode_chunks(text_model, plain_chunks)

        def encode_adaface() -> torch.Tensor:
            return encode_chunks(text_model, inject_into_chunks(adaface_chunks, [slot], special))

        contexts = {"plain": encode_plain(), "adaface": encode_adaface()}
        cfg = {k: torch.cat([negative.repeat(1, c.shape[1] // negative.shape[1], 1), c]) for k, c in contexts.items()}
        latents = torch.randn(2, 4, args.latent, args.latent, generator=g).to(device, dtype)
        t = torch.tensor([500, 500], device=device)

        def step(kind: str):
            return lambda: unet(latents, t, encoder_hidden_states=cfg[kind]).sample

        reset_peak(device)
        steps = time_interleaved({"plain": step("plain"), "adaface": step("adaface")}, device, args.warmup, args.repeats)
        peak = peak_gib(device)
        encodes = time_interleaved({"plain": encode_plain, "adaface": encode_adaface}, device, args.warmup, args.repeats)

    lengths = {k: int(c.shape[1]) for k, c in contexts.items()}
    overhead = overhead_pct(steps["adaface"], steps["plain"])
    results = {
        "unet_step_plain": steps["plain"].summary(),
        "unet_step_adaface": steps["adaface"].summary(),
        "step_overhead_pct": round(overhead, 2),
        "encode_plain": encodes["plain"].summary(),
        "encode_adaface_inject": encodes["adaface"].summary(),
        "context_tokens": lengths,
        "peak_gib": peak,
        "batch": 2,
        "latent": args.latent,
    }
    rows = [
        ("UNet step, plain prompt", steps["plain"].text()),
        ("UNet step, AdaFace prompt", steps["adaface"].text()),
        ("step overhead (median ratio)", f"{overhead:+.1f} %"),
        ("context tokens plain / AdaFace", f"{lengths['plain']} / {lengths['adaface']}"),
        ("prompt encode, plain (once per prompt)", encodes["plain"].text()),
        ("prompt encode, inject + encode", encodes["adaface"].text()),
        ("peak memory", "not tracked on CPU" if peak is None else f"{peak:.2f} GiB"),
    ]
    return report("conditioning_overhead", args, device, rows, results)


if __name__ == "__main__":
    main()
