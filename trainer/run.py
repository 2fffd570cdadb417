"""AdaFace trainer CLI.

    python trainer/run.py --preset smoke
    python trainer/run.py --config trainer/configs/stage1_paper.yaml [--stage face|composition|both]
                          [--resume DIR] [--output DIR] [--max-steps N]
    accelerate launch --multi_gpu --num_processes 2 trainer/run.py --config ...   (DDP; gloo on CPU-only machines)
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere: make the repo's packages importable
    sys.path.insert(0, str(REPO_ROOT))

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Optional  # noqa: E402

logger = logging.getLogger("trainer.run")


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="trainer/run.py", description="Train the AdaFace prompt inverter.")
    parser.add_argument("--config", type=Path, help="training configuration (YAML), e.g. trainer/configs/stage1_paper.yaml")
    parser.add_argument("--preset", choices=["smoke"], help="smoke: tiny random models built on the fly, proves the machinery")
    parser.add_argument("--stage", choices=["face", "composition", "both"], help="which stage(s) to run (default: the config's)")
    parser.add_argument("--resume", type=Path, help="continue from the latest checkpoint in this folder")
    parser.add_argument("--output", type=Path, help="output folder (overrides run.output)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in an output folder holding an earlier run's checkpoints (they are deleted); "
                             "with --resume of an older checkpoint, delete the later ones")
    parser.add_argument("--max-steps", type=int, help="override max_steps of the stage(s) run")
    parser.add_argument("--seed", type=int, help="override run.seed")
    parser.add_argument("--save-every", type=int, help="override run.save_every")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs only)")
    parser.add_argument("--validate-only", action="store_true", help="load and validate the configuration, then exit")
    parser.add_argument("--crash-at-step", type=int, help=argparse.SUPPRESS)  # tests: simulate a kill
    args = parser.parse_args(argv)
    if not args.config and not args.preset:
        parser.error("give --config FILE.yaml or --preset smoke")
    return args


@dataclass
class RunResult:
    output: Path
    stages: list = field(default_factory=list)
    smoke_check: Optional[dict] = None


def load_run_config(args: argparse.Namespace):
    from trainer.config import load_config

    if args.preset == "smoke":
        from trainer.presets import smoke_config

        config = smoke_config(args.output or Path("outputs/smoke"), args.config)
    else:
        config = load_config(args.config)
    if args.output:
        config.run.output = str(args.output)
    if args.stage:
        config.stage = args.stage
    if args.seed is not None:
        config.run.seed = args.seed
    if args.save_every is not None:
        config.run.save_every = args.save_every
    if args.max_steps is not None:
        for stage in (config.face, config.composition):
            if stage is not None:
                stage.max_steps = args.max_steps
    return config


def earlier_runs(output: Path, resumed: dict[str, Optional[Path]]) -> dict[str, Path]:
    """Stage folders of ``output`` holding a run this one would not resume: its latest checkpoint, or the
    final inverter of a finished run whose checkpoints were deleted to save space.

    Why: starting afresh there would cut the earlier run's loss log, overwrite its inverter and let
    ``keep_last`` delete the new checkpoints in favour of the old ones; a mistyped ``--resume`` led there.
    ``resumed``: each stage's checkpoint that ``--resume`` names (None for none).
    """
    from trainer.checkpointing import list_checkpoints
    from trainer.loop import FINAL_INVERTER

    found = {}
    for name, checkpoint in resumed.items():
        checkpoints = output / name / "checkpoints"
        existing = list_checkpoints(checkpoints)
        if existing and (checkpoint is None or checkpoint.resolve().parent != checkpoints.resolve()):
            found[name] = existing[-1][1]
        elif not existing and (output / name / FINAL_INVERTER).is_file():
            found[name] = output / name / FINAL_INVERTER
    return found


def abandoned_checkpoints(output: Path, resumed: dict[str, Optional[Path]]) -> list[Path]:
    """Checkpoints of ``output`` past an older one that ``--resume`` names in that same folder, latest first.

    Why: left there, they are the branch being abandoned: ``keep_last`` would prune the resumed branch's
    lower steps first, and a later plain ``--resume`` would continue the abandoned one.
    """
    from trainer.checkpointing import checkpoint_step, checkpoints_after

    found: list[Path] = []
    for name, checkpoint in resumed.items():
        checkpoints = output / name / "checkpoints"
        if checkpoint is not None and checkpoint.resolve().parent == checkpoints.resolve():
            found += checkpoints_after(checkpoints, checkpoint_step(checkpoint))
    return found


@dataclass
class OutputCleanup:
    """What ``--overwrite`` deletes before training: whole stages of an earlier run, or the later
    checkpoints of a run resumed from an older step."""

    start_over: dict[str, Path] = field(default_factory=dict)
    abandoned: list[Path] = field(default_factory=list)


def stage1_origin(face_steps: int) -> str:
    """How a stage-2 checkpoint of a ``--stage both`` run records the stage-1 result it was trained from."""
    return f"face step {face_steps}"


def stale_stage2(resumed: dict[str, Optional[Path]], face_steps: int) -> Optional[str]:
    """The recorded origin of the stage-2 checkpoint a ``--stage both`` resume would continue, when it is not
    the stage-1 result this run ends with (face.max_steps raised or lowered since)."""
    from adaface_core.checkpoint import read_metadata
    from trainer.checkpointing import INVERTER_FILE

    checkpoint = resumed.get("composition")
    if "face" not in resumed or checkpoint is None:
        return None
    origin = read_metadata(checkpoint / INVERTER_FILE).get("starts_from")
    return origin if origin and origin != stage1_origin(face_steps) else None


def past_max_steps(resumed: dict[str, Optional[Path]], max_steps: dict[str, int]) -> Optional[str]:
    """The refusal for a resume whose checkpoint is past the stage's ``max_steps`` now in force: it would stop
    at once and call that step final."""
    from adaface_core.checkpoint import read_metadata
    from trainer.checkpointing import INVERTER_FILE

    for name, checkpoint in resumed.items():
        metadata = read_metadata(checkpoint / INVERTER_FILE) if checkpoint is not None else {}
        step = int(metadata.get("step", 0))
        if metadata.get("stage") == name and step > max_steps[name]:
            return (f"--resume {checkpoint} is at step {step}, past the {name} stage's max_steps {max_steps[name]}: "
                    "raise max_steps, or resume from an earlier step_N folder")
    return None


def check_output(args: argparse.Namespace, output: Path, max_steps: dict[str, int]) -> OutputCleanup:
    """Refuses a missing ``--resume`` folder, a fresh start over an earlier run (unless ``--overwrite``, or
    the smoke preset in its default folder), a resume from an older checkpoint that leaves later ones
    behind (unless ``--overwrite``) or past ``max_steps``, and a stage 2 resumed on top of another stage-1
    result; returns what to delete. ``max_steps``: each stage to run, with its steps."""
    from adaface_core.errors import ConfigError

    from trainer.checkpointing import find_resume_checkpoint

    if args.resume is not None and not args.resume.exists():
        raise ConfigError(f"--resume {args.resume}: no such folder (give the output folder of the run to continue)")
    resumed = {name: find_resume_checkpoint(args.resume, name) if args.resume is not None else None for name in max_steps}
    if args.resume is not None and not any(resumed.values()):
        raise ConfigError(f"--resume {args.resume}: no {' or '.join(max_steps)} checkpoint there (give the run's output "
                          "folder, a stage folder, its checkpoints/ folder or one step_* folder)")
    refusal = past_max_steps(resumed, max_steps)
    if refusal is not None:
        raise ConfigError(refusal)
    face_steps = max_steps.get("face", 0)
    origin = stale_stage2(resumed, face_steps)
    if origin is not None:
        raise ConfigError(f"--resume {args.resume}: its stage-2 checkpoints were trained from stage 1 at {origin}, but "
                          f"stage 1 now ends at step {face_steps}: keep face.max_steps, or finish stage 1 with --stage "
                          "face and train stage 2 afresh into another --output (models.init_inverter: the new "
                          "face/adaface_inverter.safetensors)")
    cleanup = OutputCleanup(earlier_runs(output, resumed), abandoned_checkpoints(output, resumed))
    if cleanup.start_over and not (args.overwrite or (args.preset == "smoke" and args.output is None)):
        name, latest = next(iter(cleanup.start_over.items()))
        raise ConfigError(f"{output / name} holds an earlier run ({latest.name}): continue it with --resume {output}, "
                          "write to another --output, or start over with --overwrite (deletes its checkpoints)")
    if cleanup.abandoned and not args.overwrite:
        later = ", ".join(sorted(path.name for path in cleanup.abandoned))
        raise ConfigError(f"--resume {args.resume}: {cleanup.abandoned[0].parent} also holds later checkpoints ({later}); "
                          f"continue from the latest with --resume {output}, write this branch to another --output, "
                          "or give --overwrite to delete the later ones")
    return cleanup


def make_accelerator(config):
    from datetime import timedelta

    from accelerate import Accelerator, InitProcessGroupKwargs

    kwargs = {}
    if os.environ.get("ACCELERATE_MIXED_PRECISION") in (None, "", "no"):
        kwargs["mixed_precision"] = config.run.mixed_precision
    wait = InitProcessGroupKwargs(timeout=timedelta(minutes=config.run.distributed_timeout_minutes))
    accelerator = Accelerator(cpu=config.run.device == "cpu", kwargs_handlers=[wait], **kwargs)
    if accelerator.mixed_precision == "fp16":
        from adaface_core.errors import ConfigError

        raise ConfigError("fp16 mixed precision is not supported by this trainer (no loss scaling); use bf16")
    return accelerator


def run_stage(name: str, config, models, accelerator, output: Path, resume: Optional[Path], args,
              metadata: Optional[dict[str, str]] = None) -> object:
    """Builds stage ``name`` through its registered builder and trains it; returns a ``StageResult``.
    ``metadata`` goes into every checkpoint and the result."""
    from trainer.loop import Trainer
    from trainer.stages import get_stage_builder

    stage_config = config.face if name == "face" else config.composition
    stage = get_stage_builder(name)(config, stage_config, models, accelerator, output)
    trainer = Trainer(
        stage, stage_config, models, accelerator, output / name,
        seed=config.run.seed, save_every=config.run.save_every, keep_last=config.run.keep_last,
        log_every=config.run.log_every, resume=resume, tensorboard=config.run.tensorboard,
        crash_at_step=args.crash_at_step, show_progress=not args.no_progress, metadata=metadata,
    )
    report = None
    if hasattr(stage, "evaluate"):  # stages with a held-out check (stage 2) are measured at start and end
        from trainer.logs import HeldoutReport

        report = HeldoutReport(output / name, stage.settings.face_loss_bound, accelerator.is_main_process,
                               stage.heldout_settings)
        report.start(trainer.step, lambda: stage.evaluate(models))
    result = trainer.train()
    if report is not None:
        result.heldout = report.finish(result.steps, stage.evaluate(models))
    logger.info("%s stage: %d steps, %.2f steps/s; inverter %s", name, result.steps, result.steps_per_second,
                result.final_checkpoint)
    return result


def main(argv: Optional[list[str]] = None) -> RunResult:
    from trainer.logs import setup_logging

    setup_logging()
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from adaface_core.checkpoint import atomic_write_text
    from trainer.config import config_to_dict
    from trainer.models import build_models, frozen_dtype_for

    config = load_run_config(args)
    config.validate(check_paths=True)
    if config.stage in ("composition", "both"):
        from trainer.stage_composition import check_composition_inputs

        check_composition_inputs(config)  # stage-2 knobs, files and prompts fail before model loading
    if args.validate_only:
        logger.info("configuration is valid")
        return RunResult(Path(config.run.output))
    output = Path(config.run.output)
    stages = ["face", "composition"] if config.stage == "both" else [config.stage]
    steps = {"face": config.face.max_steps, "composition": config.composition.max_steps if config.composition else 0}
    cleanup = check_output(args, output, {name: steps[name] for name in stages})
    accelerator = make_accelerator(config)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)  # one copy of the INFO lines
    elif accelerator.num_processes > 1:
        logger.info("%d processes (%s); each waits up to %d minutes for the others at a barrier "
                    "(run.distributed_timeout_minutes)", accelerator.num_processes, accelerator.distributed_type,
                    config.run.distributed_timeout_minutes)
    torch.manual_seed(config.run.seed)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        atomic_write_text(output / "config.json", json.dumps(config_to_dict(config), indent=2))
        for name in cleanup.start_over:
            logger.warning("starting over: deleting the earlier run's checkpoints and TensorBoard log in %s", output / name)
            for folder in ("checkpoints", "tensorboard"):
                shutil.rmtree(output / name / folder, ignore_errors=True)
        for path in cleanup.abandoned:
            logger.warning("resuming from an older checkpoint: deleting the later %s", path)
            shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    from trainer.stages import get_stage_builder

    for name in stages:
        get_stage_builder(name)  # a missing stage fails before minutes of model loading
    models = build_models(config, accelerator.device, frozen_dtype_for(config, accelerator.device))
    if "composition" in stages:
        from trainer.stage_composition import check_capture_layers

        check_capture_layers(models.unet, config.composition)
    from trainer.speed import apply_speed_options, compiled_unets_see_hooks

    apply_speed_options(models, config.run)
    result = RunResult(output)
    with compiled_unets_see_hooks(config.run):
        for name in stages:
            # Stage 2 after stage 1 in one run records which stage-1 result it trains on (see stale_stage2).
            origin = {"starts_from": stage1_origin(config.face.max_steps)} if name == "composition" and "face" in stages else None
            result.stages.append(run_stage(name, config, models, accelerator, output, args.resume, args, origin))
        if args.preset == "smoke" and accelerator.is_main_process:
            from trainer.presets import smoke_check

            result.smoke_check = smoke_check(config, models, result, output)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.num_processes > 1:
        import gc

        gc.collect()  # free collective work objects while the interpreter is whole, not during its shutdown
    return result


def cli() -> int:
    """``main`` for the command line: an error the user can act on is one log line, not a traceback."""
    from adaface_core.errors import AdaFaceError

    try:
        main()
    except AdaFaceError as exc:
        logging.getLogger("trainer.run").error("%s", exc)
        return 2
    except OSError as exc:  # a full disk, a folder without write permission: what to fix, in one line
        logging.getLogger("trainer.run").error("%s: %s", type(exc).__name__, exc)
        return 2
    except KeyboardInterrupt:
        logging.getLogger("trainer.run").error("interrupted; resume with --resume <output folder> "
                                               "(steps since the last checkpoint are redone)")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
