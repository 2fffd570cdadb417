"""Every GPU row of BENCHMARKS.md in one process, one JSON file: what a short, rationed GPU session runs.

Why one runner: a GPU machine is lent for minutes, so the rows run back to back in the order of their
value (the four issue rows first, then the speed switches), each row's record is written to ``--out`` as
soon as it is done (a run stopped at its time limit keeps what it finished), and a row that fails is
recorded with its error instead of ending the run. ``--tiny`` runs the same plan on the CPU with the
test-sized models (a check that the plan runs; its times mean nothing; compile rows are skipped there).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402

import torch  # noqa: E402

logger = logging.getLogger("gpu_suite")

STAGE1 = ["--dtype", "bf16", "--stage", "face", "--batch", "4", "--warmup", "3", "--repeats", "10"]
STAGE2 = ["--dtype", "bf16", "--stage", "composition", "--batch", "3", "--warmup", "3", "--repeats", "10"]
COMPILE = ["--compile", "--warmup", "5"]  # the first warm-up step compiles; train_step reports it as first_step_s

PLAN: list[tuple[str, str, list[str]]] = [
    ("conditioning", "conditioning_overhead", ["--dtype", "fp16", "--warmup", "10", "--repeats", "50"]),
    ("stage1", "train_step", STAGE1),
    ("stage2", "train_step", STAGE2),
    ("face_pipeline", "face_pipeline", ["--dtype", "fp16", "--face-provider", "auto", "--warmup", "5", "--repeats", "50"]),
    ("photo_latents", "photo_latents", ["--dtype", "bf16", "--warmup", "2", "--repeats", "10"]),
    ("stage1_channels_last", "train_step", STAGE1 + ["--channels-last"]),
    ("stage2_channels_last", "train_step", STAGE2 + ["--channels-last"]),
    ("stage2_checkpointing", "train_step", STAGE2 + ["--gradient-checkpointing"]),
    ("stage1_compile", "train_step", STAGE1 + COMPILE),
    ("stage2_compile", "train_step", STAGE2 + COMPILE),
]


def row_argv(args: list[str], tiny: bool, device: str) -> list[str]:
    """The row's arguments for this run: on ``--tiny``, test-sized models, fp32, one repeat."""
    if not tiny:
        return ["--device", device, *args]
    kept, values = [], iter(args)
    for arg in values:
        if arg in ("--dtype", "--warmup", "--repeats"):
            next(values)  # replaced below
        else:
            kept.append(arg)
    return ["--device", device, "--tiny", "--dtype", "fp32", "--warmup", "1", "--repeats", "1", *kept]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the JSON file of every row's record")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--only", nargs="+", choices=[name for name, _, _ in PLAN], help="run these rows only")
    parser.add_argument("--tiny", action="store_true", help="test-sized models on the CPU: a check that the plan runs")
    parser.add_argument("--photos", type=Path, help="training photos for the photo_latents row (its --photos)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda given but no CUDA device is available (use --tiny --device cpu for a check)")
    suite = {"environment": environment(torch.device(args.device)), "rows": {}}
    for name, script, row_args in PLAN:
        if args.only and name not in args.only:
            continue
        if args.tiny and "--compile" in row_args:
            continue
        extra = ["--photos", str(args.photos)] if script == "photo_latents" and args.photos else []
        row = row_argv(row_args, args.tiny, args.device) + extra
        logger.info("%s: python bench/%s.py %s", name, script, " ".join(row))
        start = time.perf_counter()
        try:
            record = importlib.import_module(script).main(row)
        except (Exception, SystemExit) as exc:  # one failed row must not cost the others
            record = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
            logger.error("%s failed: %s", name, record["error"])
        record["command"] = f"python bench/{script}.py {' '.join(row)}"
        record["wall_s"] = round(time.perf_counter() - start, 1)
        suite["rows"][name] = record
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(suite, indent=2), encoding="utf-8")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return suite


if __name__ == "__main__":
    main()
