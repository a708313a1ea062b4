"""benchmarks/gpu_summary.py: the GPU run's one JSON and one markdown file keep what finished and
name what did not, since a lent GPU runs once and a deadline may cut any stage short."""

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_summary.py"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_summary", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(path: Path, curves: str) -> None:
    path.parent.mkdir(parents=True)
    path.write_text(f"# Report\n\n## Training curves\n\n{curves}\n![training curves](figures/"
                    "training_curves.png)\n\n## Per site and count level\n\nrest\n")


def test_a_finished_run_keeps_claims_curves_and_speed_without_figure_links(tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    out.mkdir()
    _report(work / "claims" / "s0" / "report.md", "| method | plateau |\n| U-Net | yes |")
    (work / "claims" / "claims.json").write_text(json.dumps([{"claim": "(a) x"}]))
    (work / "claims" / "claims.md").write_text("| claim |\n|---|\n| (a) x |\n")
    (work / "train_throughput.json").write_text(json.dumps([
        {"kind": "diffusion", "size": 64, "batch": 16, "stacks_per_s_median": 812.5}]))
    summary = _module().summarize(work, out, device="cpu", experiment="converge_gpu", seeds=2,
                                  claims_seconds=300, total_seconds=500)
    text = (out / "gpu.md").read_text()
    assert "| (a) x |" in text and "| U-Net | yes |" in text and "![" not in text
    assert "diffusion 64² batch 16: 812.5 stacks/s" in text
    assert "## Training curves, seed 1\n\nmissing" in text  # seed 1 never wrote its report
    assert summary["claims"] == [{"claim": "(a) x"}] and summary["plateau"]["s1"] is None
    assert json.loads((out / "gpu.json").read_text())["speed"]["train_throughput"][0]["size"] == 64


def test_a_run_cut_short_says_the_claims_are_missing(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    _module().summarize(tmp_path / "work", out, device="cpu", experiment="converge_gpu",
                        seeds=1, claims_seconds=420, total_seconds=540)
    text = (out / "gpu.md").read_text()
    assert "missing: the claims did not finish" in text and text.endswith("## Speed\n\nmissing\n")
    assert json.loads((out / "gpu.json").read_text())["claims"] is None
