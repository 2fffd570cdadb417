"""The benchmark scripts still run (tiny models, one repeat) and report what BENCHMARKS.md quotes.

Nothing here times anything: speed is measured by the scripts themselves, never asserted in tests.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers_faces import require_buffalo_s_pack, require_faces

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

FAST = ["--tiny", "--repeats", "1", "--warmup", "0"]


def _record(path: Path) -> dict:
    record = json.loads(path.read_text(encoding="utf-8"))
    assert record["environment"]["torch"] and record["command"].startswith("python ")
    return record["results"]


def test_conditioning_overhead_keeps_the_plain_prompt_context(tmp_path):
    import conditioning_overhead

    conditioning_overhead.main(FAST + ["--json", str(tmp_path / "c.json")])
    results = _record(tmp_path / "c.json")
    assert results["context_tokens"] == {"plain": 77, "adaface": 77}
    assert results["unet_step_plain"]["repeats"] == results["unet_step_adaface"]["repeats"] == 1


def test_train_step_reports_flops_for_both_stages(tmp_path):
    import train_step

    train_step.main(FAST + ["--json", str(tmp_path / "t.json")])
    results = _record(tmp_path / "t.json")
    for stage in ("face", "composition"):
        assert results[stage]["flops_per_step"] > 0 and results[stage]["median_ms"] > 0
    assert results["paper_schedule_total_hours"] > 0


def test_train_step_reports_what_torch_compile_did():
    """The compile rows say how many graphs were compiled when, and why: a recompile inside the timed steps
    (compiling counted as step time) must show up in the record rather than hide in the median. The backward
    graph, compiled lazily at the first backward, is counted apart from the frames, and its time is included."""
    import torch
    import train_step

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.linear(x).relu()

    block = Block().requires_grad_(False)  # frozen, like the UNet; the gradient flows to its input
    block.compile(backend="aot_eager")  # dynamo's and AOT autograd's bookkeeping without inductor's minutes
    before = train_step.compile_events()
    block(torch.randn(2, 3, requires_grad=True)).sum().backward()
    first = train_step.compile_events()
    with torch.no_grad():  # the student's negative pass: another grad mode, so another graph
        block(torch.randn(2, 3))
    record = train_step.compile_record(before, first, train_step.compile_events())
    assert record["frames_after_first_step"] == 1 and record["frames_after_timed_steps"] == 2
    assert record["backward_graphs_after_first_step"] == record["backward_graphs_after_timed_steps"] == 1
    assert [(frame["code"], frame["ops"]) for frame in record["frames"]] == [("forward", 2)] * 2  # linear, relu
    assert len(record["recompile_reasons"]) == 1 and "grad_mode" in record["recompile_reasons"][0]
    assert record["graph_breaks"] == 0 and record["compile_s"] >= record["backward_compile_s"] >= 0


def test_each_compiled_stage_compiles_its_own_unet_graphs(tmp_path):
    """A stage benched after another in one process (as the GPU suite runs its rows) still runs its UNets
    compiled, and its first step is its own compile: the record lists the UNet forward among its frames."""
    import train_step

    train_step.main(["--tiny", "--repeats", "1", "--warmup", "1", "--compile", "--compile-backend", "eager",
                     "--json", str(tmp_path / "t.json")])
    results = _record(tmp_path / "t.json")
    for stage in ("face", "composition"):
        compiled = results[stage]["compiled"]
        assert compiled["frames_after_first_step"] == compiled["frames_after_timed_steps"] >= 1
        assert any(frame["ops"] > 300 for frame in compiled["frames"]), (stage, compiled["frames"])  # tiny UNet: ~800
        assert compiled["graph_breaks"] == 0


def test_face_pipeline_breakdown_and_cache(tmp_path):
    pack = require_buffalo_s_pack(tmp_path / "buffalo_s")
    import face_pipeline

    face_pipeline.main(FAST + ["--face-pack", str(pack), "--json", str(tmp_path / "f.json")])
    results = _record(tmp_path / "f.json")
    assert results["faces_found"] == 1
    for stage in ("detect + ArcFace", "Arc2Face encoder", "inverter", "inject + CLIP encode",
                  "repeated photo -> subject (cache)"):
        assert results[stage]["median_ms"] > 0


def test_photo_latents_compares_uncached_and_cached_photos(tmp_path):
    faces = require_faces()
    import photo_latents

    photo_latents.main(FAST + ["--photos", str(faces / "labeled"), "--json", str(tmp_path / "p.json")])
    results = _record(tmp_path / "p.json")
    assert len(results["photos"]) == 4 and results["vae_encode_flops_per_photo"] > 0
    for variant in ("uncached: load + VAE encode", "cached"):
        assert results[variant]["repeats"] == 1
    assert results["cache_bytes_per_photo"] > 0


def test_gpu_suite_records_every_row_even_after_a_failure(tmp_path):
    import gpu_suite

    out = tmp_path / "suite.json"
    gpu_suite.main(["--tiny", "--device", "cpu", "--only", "photo_latents", "conditioning",
                    "--photos", str(tmp_path / "missing"), "--out", str(out)])
    suite = json.loads(out.read_text(encoding="utf-8"))
    assert list(suite["rows"]) == ["conditioning", "photo_latents"]  # the plan's order
    assert suite["rows"]["conditioning"]["results"]["context_tokens"] == {"plain": 77, "adaface": 77}
    assert suite["rows"]["conditioning"]["command"].startswith("python bench/conditioning_overhead.py --device cpu --tiny")
    assert "photos" in suite["rows"]["photo_latents"]["error"]  # recorded, and the run went on
    assert suite["environment"]["torch"]


@pytest.mark.parametrize("line, counts", [
    ("120 passed, 3 skipped in 80.12s (0:01:20)", {"passed": 120, "skipped": 3}),
    ("1 failed, 7 passed in 2.00s", {"failed": 1, "passed": 7}),
])
def test_cpu_suite_reads_pytest_counts(line, counts):
    import cpu_suite

    assert cpu_suite.pytest_counts(f"....\n{line}\n") == counts
