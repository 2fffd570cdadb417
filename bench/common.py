"""Shared benchmark plumbing: argument parsing, timing with warm-up and device sync, peak memory,
an environment record, the full-size SD1.5 / CLIP-L specs, and a JSON + table report.

Why one helper: every figure in BENCHMARKS.md must be produced the same way (warm-up, repeats,
median and min-max, synchronised clocks) so the rows can be compared and re-run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # scripts run as `python bench/x.py` from the repository root
    sys.path.insert(0, str(REPO))

from adaface_core.tiny_models import TinySpec, unet_config  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# SD1.5's UNet architecture, the trainer's shipped copy of runwayml/stable-diffusion-v1-5's unet/config.json
# (weights are random).
SD15_UNET = {k: v for k, v in json.loads((REPO / "trainer" / "sd15_configs" / "unet" / "config.json")
                                         .read_text(encoding="utf-8")).items() if not k.startswith("_")}
# CLIP-L text encoder (SD1.5's, Arc2Face's encoder and the inverter all share it); UNet widths are SD1.5's.
FULL_SPEC = TinySpec(hidden_size=768, num_layers=12, num_heads=12, unet_channels=(320, 640, 1280, 1280))
TINY_SPEC = TinySpec()


def spec_for(tiny: bool) -> TinySpec:
    return TINY_SPEC if tiny else FULL_SPEC


def unet_config_for(tiny: bool) -> dict:
    return unet_config(TINY_SPEC) if tiny else dict(SD15_UNET)


def random_unet(tiny: bool, seed: int = 0, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A UNet2DConditionModel of SD1.5's architecture (or the tiny test one) with random weights, initialised
    on ``device`` (on a GPU that takes a second; on the CPU a full-size one takes several)."""
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its dtype-cast advice does not apply to random weights
    torch.manual_seed(seed)
    with torch.device(device):
        return UNet2DConditionModel(**unet_config_for(tiny))


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--tiny", action="store_true", help="tiny random models: a fast check that the script runs")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> Optional[float]:
    """Peak allocated memory since ``reset_peak`` (CUDA only; None on CPU, where it is not tracked)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


@dataclass
class Timing:
    samples_ms: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def min(self) -> float:
        return min(self.samples_ms)

    @property
    def max(self) -> float:
        return max(self.samples_ms)

    def summary(self) -> dict[str, Any]:
        return {"median_ms": round(self.median, 3), "min_ms": round(self.min, 3), "max_ms": round(self.max, 3),
                "repeats": len(self.samples_ms), "samples_ms": [round(x, 3) for x in self.samples_ms]}

    def text(self, unit: str = "ms", digits: int = 2) -> str:
        """``median (min, max, n)`` in ``ms`` or ``s``."""
        scale = 1000.0 if unit == "s" else 1.0
        m, lo, hi = (v / scale for v in (self.median, self.min, self.max))
        return f"{m:.{digits}f} {unit} (min {lo:.{digits}f}, max {hi:.{digits}f}, n={len(self.samples_ms)})"


def time_once(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return (time.perf_counter() - start) * 1000.0


def time_interleaved(fns: dict[str, Callable[[], Any]], device: torch.device, warmup: int, repeats: int) -> dict[str, Timing]:
    """Times several variants side by side: each repeat runs every variant once, in a rotating order,
    so drift (clocks, thermal, other load) hits all variants alike and their ratio is fair."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    timings = {name: Timing() for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            timings[name].samples_ms.append(time_once(fns[name], device))
    return timings


def time_fn(fn: Callable[[], Any], device: torch.device, warmup: int, repeats: int) -> Timing:
    return time_interleaved({"x": fn}, device, warmup, repeats)["x"]


def overhead_pct(a: Timing, b: Timing) -> float:
    """``a`` relative to ``b`` as a percentage overhead, from the medians."""
    return (a.median / b.median - 1) * 100


def _version(name: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _git_commit() -> Optional[str]:
    head = REPO / ".git" / "HEAD"
    if not head.is_file():
        return None
    ref = head.read_text().strip()
    if not ref.startswith("ref: "):
        return ref
    target = REPO / ".git" / ref[5:]
    return target.read_text().strip() if target.is_file() else None


def environment(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on: enough to tell whether two reports are comparable."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "commit": _git_commit(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
    }
    for pkg in ("torch", "diffusers", "transformers", "onnxruntime", "onnxruntime-gpu", "insightface", "accelerate"):
        env[pkg] = _version(pkg)
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def report(name: str, args: argparse.Namespace, device: torch.device, rows: Sequence[tuple[str, str]],
           results: dict[str, Any]) -> dict[str, Any]:
    """Prints a two-column table and writes the JSON record (environment, arguments, results)."""
    record = {"benchmark": name, "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
              "args": {k: str(v) for k, v in vars(args).items()}, "environment": environment(device),
              "results": results}
    width = max(len(label) for label, _ in rows) if rows else 0
    print(f"== {name} on {device} ({args.dtype}{', tiny' if getattr(args, 'tiny', False) else ''})")
    for label, value in rows:
        print(f"  {label.ljust(width)}  {value}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(record, indent=2), encoding="utf-8")
    return record


def resolve(args: argparse.Namespace) -> tuple[torch.device, torch.dtype]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but no CUDA device is available")
    return device, DTYPES[args.dtype]


def chunk_of(tokenizer, text: str) -> list[tuple[int, float]]:
    """A ComfyUI-shaped 77-entry chunk ``(token, weight)`` of a short prompt."""
    from adaface_core.injection import as_token_chunks

    return as_token_chunks(tokenizer(text, padding="max_length", max_length=77, truncation=True))[0]


def encode_chunks(text_model, chunks: Sequence[Sequence[tuple]]) -> torch.Tensor:
    """``[1, 77 * C, H]``: ComfyUI-shaped token chunks through the text encoder in one batched pass, tensor
    entries spliced in as input embeddings (how ComfyUI's SD1 CLIP consumes injected subject tokens)."""
    from adaface_core.injection import chunk_input_embeds

    rows = chunk_input_embeds(chunks, text_model.embeddings.token_embedding.weight)
    hidden = text_model(token_embeds=rows).last_hidden_state
    return hidden.reshape(1, -1, hidden.shape[-1])
