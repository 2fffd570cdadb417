"""Training-step time, model FLOPs, MFU and peak memory of stage 1 (face distillation) and stage 2
(composition distillation), at full SD1.5 / CLIP-L sizes with random weights.

The step is the trainer's own ``Trainer.train_step`` (sample a batch, the stage's loss, backward, clip,
optimizer step) on the stage its registry builds, so a change in the trainer shows up here. Random IDs
only (no photos, no VAE): the teacher makes its own starting latents, as stage 1 does for 40 % of IDs.
Stage 2 encodes its class prompts when it is built, as in training, so its steps are timed warm.
FLOPs are what ``torch.utils.flop_counter`` counts in one step (with gradient checkpointing that
includes the recomputed forward); MFU = FLOPs / median step time / --peak-tflops. On CUDA one more
step runs under ``torch.cuda.set_sync_debug_mode`` and its host-device syncs are counted by call site.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Timing, base_parser, peak_gib, random_unet, report, reset_peak, resolve, spec_for,  # noqa: E402
                    time_fn, time_once)

from adaface_core.arc2face import Arc2FaceEncoder  # noqa: E402
from adaface_core.tiny_models import random_clip_text, write_tokenizer  # noqa: E402
from adaface_core.tokenizer import load_clip_tokenizer  # noqa: E402
from trainer.config import OptimConfig, StageConfig, TrainConfig  # noqa: E402
from trainer.loop import Trainer  # noqa: E402
from trainer.models import Models, _frozen, build_inverter, frozen_dtype_for  # noqa: E402
from trainer.single_file import sd15_scheduler  # noqa: E402
from trainer.run import make_accelerator  # noqa: E402
from trainer.speed import apply_speed_options, compiled_unets_see_hooks  # noqa: E402
from trainer.stages import get_stage_builder  # noqa: E402

PAPER_STEPS = {"face": 240_000, "composition": 120_000}


def build_random_models(config: TrainConfig, device: torch.device, tiny: bool, tmp: Path) -> Models:
    """``trainer.models.Models`` with random full-size (or tiny) weights, built in memory (no model folders)."""
    spec = spec_for(tiny)
    frozen = frozen_dtype_for(config, device)
    tokenizer = load_clip_tokenizer(write_tokenizer(tmp / "tokenizer"))
    text_encoder = random_clip_text(spec, seed_offset=1)
    inverter = build_inverter(config, text_encoder)
    return Models(
        tokenizer=tokenizer,
        text_encoder=_frozen(text_encoder, device, frozen),
        unet=_frozen(random_unet(tiny, seed=2, device=device), device, frozen),
        vae=None,
        scheduler=sd15_scheduler(),
        teacher_unet=_frozen(random_unet(tiny, seed=4, device=device), device, frozen),
        id_encoder=_frozen(Arc2FaceEncoder(random_clip_text(spec, seed_offset=3), tokenizer), device, frozen),
        inverter=inverter.to(device),
        device=device,
        frozen_dtype=frozen,
    )


def count_syncs(step: Callable[[], object], device: torch.device) -> Optional[dict]:
    """The host-device synchronizations of one ``step()``, by call site (``torch.cuda.set_sync_debug_mode``).

    Each one stops the host until the GPU has run everything queued, so the GPU then idles while the next
    kernels are launched. The trainer's own code should show one (the loss read back per step); the rest
    name whoever else waits (a sync in backward is filed under torch's autograd frame). CUDA only (None elsewhere)."""
    if device.type != "cuda":
        return None
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    sites = Counter(f"{'/'.join(Path(w.filename).parts[-2:])}:{w.lineno}"
                    for w in caught if "synchroniz" in str(w.message))
    return {"total": sum(sites.values()), "by_site": dict(sites.most_common(12))}


def compile_events() -> tuple[list, int]:
    """(dynamo's compilation records so far in this process, graph breaks met so far)."""
    from torch._dynamo.utils import counters, get_compilation_metrics

    return list(get_compilation_metrics()), sum(counters["graph_break"].values())


def compile_record(before: tuple[list, int], after_first_step: tuple[list, int], after_timing: tuple[list, int]) -> dict:
    """What ``torch.compile`` did in one stage's bench: the frames dynamo compiled by the end of the first
    step and of the timed steps (the UNet forward and each recompile of it; stage 2's UNet-level capture
    hooks are frames of their own), the backward graphs AOT autograd compiled (lazily, at a frame's first
    backward: the gradient reaches the inverter through the frozen UNet), why each recompile happened,
    graph breaks, and the seconds spent compiling both.

    A compile inside the timed steps would put compiling into the median, and a graph break runs the code
    between the pieces eagerly: both show here instead of as an unexplained step time."""
    first_frames, first_backward = _forward_and_backward(after_first_step[0][len(before[0]):])
    frames, backward = _forward_and_backward(after_timing[0][len(before[0]):])
    forward_s = sum(getattr(m, "entire_frame_compile_time_s", None) or 0.0 for m in frames)
    backward_s = sum(getattr(m, "backward_cumulative_compile_time_us", None) or 0 for m in backward) / 1e6
    return {
        "frames_after_first_step": len(first_frames),
        "frames_after_timed_steps": len(frames),
        "backward_graphs_after_first_step": len(first_backward),
        "backward_graphs_after_timed_steps": len(backward),
        "frames": [{"code": getattr(m, "co_name", None), "id": str(getattr(m, "compile_id", "")),
                    "ops": getattr(m, "graph_op_count", None) or 0} for m in frames],
        "recompile_reasons": [m.recompile_reason.strip() for m in frames if getattr(m, "recompile_reason", None)],
        "graph_breaks": after_timing[1] - before[1],
        "compile_s": round(forward_s + backward_s, 1),
        "backward_compile_s": round(backward_s, 1),
    }


def _forward_and_backward(metrics: list) -> tuple[list, list]:
    """Dynamo's frame records, and AOT autograd's lazy backward compiles (records with ``is_forward`` False,
    no code name and no op count, whose time is in ``backward_cumulative_compile_time_us``)."""
    backward = [m for m in metrics if getattr(m, "is_forward", None) is False]
    return [m for m in metrics if getattr(m, "is_forward", None) is not False], backward


def bench_stage(name: str, args, device: torch.device, tmp: Path) -> tuple[dict, Timing]:
    config = TrainConfig()
    config.run.device = "cpu" if device.type == "cpu" else "auto"
    config.run.mixed_precision = "bf16" if args.dtype == "bf16" else "no"
    config.data.image_size = 64 if args.tiny else 512  # latents 8 (tiny UNet) or 64 (SD1.5 at 512x512)
    batch = args.batch or (4 if name == "face" else 3)
    stage_config = StageConfig(optim=OptimConfig(optimizer=args.optimizer, batch_size=batch,
                                                       grad_accum=args.grad_accum))
    if name == "face":
        config.face = stage_config
    else:
        config.composition = stage_config
    accelerator = make_accelerator(config)
    if args.compile:
        # From scratch for every stage and row of a suite: the first step is then this stage's compile time,
        # and nothing carries over from an earlier one (a call under FlopCounterMode leaves dynamo skipping
        # the compiled UNet's frame from then on, so a later stage would silently run eager).
        torch._dynamo.reset()
    config.run.gradient_checkpointing = args.gradient_checkpointing
    config.run.channels_last = args.channels_last
    config.run.compile = args.compile
    models = build_random_models(config, accelerator.device, args.tiny, tmp)
    apply_speed_options(models, config.run, compile_backend=args.compile_backend)  # the trainer's own switches
    stage = get_stage_builder(name)(config, stage_config, models, accelerator, tmp / name)
    trainer = Trainer(stage, stage_config, models, accelerator, tmp / name, tensorboard=False, show_progress=False)

    with compiled_unets_see_hooks(config.run):  # as trainer/run.py trains
        first_step_s = None
        compiles_before = compile_events()
        if args.warmup:  # the first step includes torch.compile's compiling, when it is on
            first_step_s = time_once(trainer.train_step, device) / 1000
        compiles_after_first = compile_events()
        for _ in range(args.warmup - 1):
            trainer.train_step()
        reset_peak(device)
        timing = time_fn(trainer.train_step, device, 0, args.repeats)
        peak = peak_gib(device)
        compiled = compile_record(compiles_before, compiles_after_first, compile_events()) if args.compile else None
        syncs = count_syncs(trainer.train_step, device)
        with FlopCounterMode(display=False) as counter:  # last: compiled code does not run under it (see above)
            trainer.train_step()
        flops = counter.get_total_flops()
    seconds = timing.median / 1000
    tflops = flops / seconds / 1e12
    result = timing.summary() | {
        "batch": batch, "grad_accum": args.grad_accum, "prompts_per_sample": 1 if name == "face" else 4,
        "flops_per_step": flops,
        "achieved_tflops": round(tflops, 3), "mfu_pct": round(100 * tflops / args.peak_tflops, 2),
        "peak_gib": peak, "frozen_dtype": str(models.frozen_dtype), "mixed_precision": accelerator.mixed_precision,
        "gradient_checkpointing": args.gradient_checkpointing, "optimizer": args.optimizer,
        "channels_last": args.channels_last, "compile": args.compile, "first_step_s": first_step_s,
        "compiled": compiled, "syncs_per_step": syncs,
        "paper_schedule_hours": round(PAPER_STEPS[name] * seconds / 3600, 1),
    }
    del trainer, models
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result, timing


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser("Stage-1 / stage-2 training step: time, FLOPs, MFU, peak memory.")
    parser.add_argument("--stage", choices=["face", "composition", "both"], default="both")
    parser.add_argument("--batch", type=int, help="batch size (default: 4 for stage 1, 3 for stage 2)")
    parser.add_argument("--grad-accum", type=int, default=2,
                        help="micro-batches per optimizer step (2, as trainer/configs/paper_both.yaml)")
    parser.add_argument("--optimizer", default="prodigy", choices=["prodigy", "adamw"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--channels-last", action="store_true", help="frozen UNets in channels-last layout")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the frozen UNets (warm-up then includes compiling: raise --warmup)")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend (the trainer's: inductor; eager: dynamo's tracing only, a quick check)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak of the dtype (H100 SXM bf16: 989)")
    parser.set_defaults(warmup=2, repeats=5)
    args = parser.parse_args(argv)
    if args.dtype == "fp16":
        parser.error("the trainer runs bf16 autocast or fp32 (fp16 would need loss scaling): use --dtype bf16")
    logging.basicConfig(level=logging.WARNING)
    device, _ = resolve(args)
    stages = ["face", "composition"] if args.stage == "both" else [args.stage]
    results, rows = {}, []
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        for name in stages:
            r, timing = bench_stage(name, args, device, Path(tmp))
            results[name] = r
            peak = "n/a on CPU" if r["peak_gib"] is None else f"{r['peak_gib']:.2f} GiB"
            rows.append((f"{name} step, batch {r['batch']} x {r['grad_accum']} micro-batches", timing.text("ms", 1)))
            rows.append((f"{name} FLOPs / TFLOP/s / MFU",
                         f"{r['flops_per_step'] / 1e12:.3f} TFLOP, {r['achieved_tflops']:.2f} TFLOP/s, {r['mfu_pct']:.2f} %"))
            rows.append((f"{name} peak memory", peak))
            if r["syncs_per_step"] is not None:
                sites = ", ".join(f"{k} x{v}" for k, v in r["syncs_per_step"]["by_site"].items())
                rows.append((f"{name} host-device syncs per step", f"{r['syncs_per_step']['total']} ({sites})"))
            if r["first_step_s"] is not None:
                rows.append((f"{name} first step (with compiling, if --compile)", f"{r['first_step_s']:.1f} s"))
            if r["compiled"] is not None:
                c = r["compiled"]
                rows.append((f"{name} torch.compile",
                             f"frames {c['frames_after_first_step']} after the first step, {c['frames_after_timed_steps']} "
                             f"after the timed ones; backward graphs {c['backward_graphs_after_first_step']}, "
                             f"{c['backward_graphs_after_timed_steps']}; {c['graph_breaks']} graph breaks; "
                             f"{c['compile_s']} s compiling ({c['backward_compile_s']} s of it backward)"))
            rows.append((f"{name} paper schedule ({PAPER_STEPS[name]} steps)", f"{r['paper_schedule_hours']} h"))
    if len(stages) == 2:
        total = sum(r["paper_schedule_hours"] for r in results.values())
        results["paper_schedule_total_hours"] = round(total, 1)
        rows.append(("paper schedule, both stages", f"{total:.1f} h ({total / 24:.2f} days)"))
    return report("train_step", args, device, rows, results)


if __name__ == "__main__":
    main()
