"""tools/benchmark.py: SPEC parsing and a real 1-iteration side-by-side run of two tiny
configs (the second differs by a per-config override) through the command line."""
import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


@pytest.fixture(scope="module")
def bench(load_tool):
    return load_tool("benchmark")


def test_parse_spec(bench, tiny_config):
    path, opts = bench.parse_spec(tiny_config + "::MODEL.RDSNET.MBRM.ENABLED True  A 'x y'",
                                  ["MODEL.DEVICE", "cpu"])
    assert path == tiny_config
    assert opts == ["MODEL.DEVICE", "cpu", "MODEL.RDSNET.MBRM.ENABLED", "True", "A", "x y"]
    assert bench.default_label(tiny_config + "::MODEL.MASK_ON False") == \
        "tiny_mask_rcnn_R_18_FPN [MODEL.MASK_ON False]"


def test_spec_errors(bench, tiny_config):
    # an unquoted override ends up as its own "config file": say how to quote it
    with pytest.raises(bench.BenchmarkError, match="quoted SPEC"):
        bench.parse_spec("True")
    with pytest.raises(bench.BenchmarkError, match="KEY VALUE pairs"):
        bench.parse_spec(tiny_config + "::MODEL.MASK_ON")
    with pytest.raises(bench.BenchmarkError, match="2 labels for 1 configs"):
        bench.run([tiny_config], labels=["a", "b"])


def test_two_configs_side_by_side(tmp_path, tiny_config):
    out_json = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(REPO_ROOT, "tools", "benchmark.py"),
           "--task", "train", "--size", "64", "96", "--batch", "1", "--iters", "1",
           "--warmup", "0", "--threads", "1", "--label", "mask", "box",
           "--json", str(out_json), "--config-file", tiny_config,
           tiny_config + "::MODEL.MASK_ON False", "--opts", "SOLVER.BASE_LR", "0.001"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ratio vs first" in proc.stdout and "peak mem MB" in proc.stdout
    assert "random initialisation" in proc.stdout
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert table[1].split("|")[1].strip() == "mask" and table[2].split("|")[1].strip() == "box"
    with open(out_json) as f:
        res = json.load(f)
    assert res["task"] == "train" and res["size"] == [64, 96]
    mask, box = res["results"]
    assert mask["ratio"] == 1.0
    assert box["ratio"] == pytest.approx(box["median_s"] / mask["median_s"])
    for r in (mask, box):
        assert len(r["times_s"]) == 1 and r["median_s"] > 0 and r["mean_s"] == r["median_s"]
        assert r["peak_mem_mb"] > 0
        assert r["mem_kind"] == ("CUDA max_memory_allocated" if r["device"].startswith("cuda")
                                 else "CPU peak RSS increase")
        assert r["opts"][:2] == ["SOLVER.BASE_LR", "0.001"]
        assert r["weights_loaded"] is False  # MODEL.WEIGHTS "" in the tiny config
    # the per-config override really applies: no mask head in the second model
    assert box["opts"][2:] == ["MODEL.MASK_ON", "False"]
    assert box["params"] < mask["params"]


def test_failing_config_is_named(tmp_path, tiny_config):
    cmd = [sys.executable, os.path.join(REPO_ROOT, "tools", "benchmark.py"),
           "--task", "eval", "--size", "64", "64", "--iters", "1", "--warmup", "0",
           "--config-file", tiny_config + "::MODEL.NO_SUCH_KEY 1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "NO_SUCH_KEY" in proc.stderr and "tiny_mask_rcnn_R_18_FPN" in proc.stderr


def test_eval_reports_equal_work_and_stages(tmp_path, tiny_config):
    """Inference: the RPN fills POST_NMS_TOPK_TEST (20 in the tiny config), the stage split
    adds up to at most the total, and different detection counts refuse the ratio (exit 2)."""
    out_json = tmp_path / "bench.json"
    cmd = [sys.executable, os.path.join(REPO_ROOT, "tools", "benchmark.py"),
           "--task", "eval", "--size", "96", "128", "--iters", "2", "--warmup", "0",
           "--threads", "1", "--label", "all", "none", "--json", str(out_json),
           "--config-file", tiny_config + "::MODEL.ROI_HEADS.SCORE_THRESH_TEST 0.0",
           tiny_config + "::MODEL.ROI_HEADS.SCORE_THRESH_TEST 1.0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "no time ratio printed" in proc.stdout
    assert "none: 0.0 detections per image, all: 10.0" in proc.stdout
    with open(out_json) as f:
        res = json.load(f)["results"]
    for r in res:
        assert r["proposals_per_image"] == 20 and r["proposal_topk"] == 20
        assert set(r["stages_s"]) == {"backbone", "proposals", "heads", "postprocess"}
        assert all(v > 0 for v in r["stages_s"].values())
        assert sum(r["stages_s"].values()) <= r["median_s"] * 1.05
        assert r["ratio"] is None
    assert res[0]["detections_per_image"] == 10 and res[1]["detections_per_image"] == 0


def test_equal_work_rules(bench):
    def result(label, proposals, topk, detections):
        return {"label": label, "proposals_per_image": proposals, "proposal_topk": topk,
                "detections_per_image": detections}

    same = [result("a", 1000, 1000, 100), result("b", 1000, 1000, 100)]
    assert bench.equal_work_problems(same, "eval") == []
    starved = [result("a", 2, 1000, 100), result("b", 1000, 1000, 100)]
    problems = bench.equal_work_problems(starved, "eval")
    assert problems[0] == "a: its RPN returned 2 proposals per image, fewer than its " \
                          "POST_NMS_TOPK_TEST=1000"
    assert problems[1] == "b: 1000.0 proposals per image, a: 2.0"
    # a different top-k is asked for by the user: only the detections must agree
    asked = [result("a", 1000, 1000, 100), result("b", 500, 500, 100)]
    assert bench.equal_work_problems(asked, "eval") == []
    # a dense detector (no RPN) against another: detections only
    dense = [result("a", None, None, 0), result("b", None, None, 3)]
    assert bench.equal_work_problems(dense, "eval") == ["b: 3.0 detections per image, a: 0.0"]
    # training: detection counts do not exist, proposals still must agree
    assert bench.equal_work_problems([result("a", 300, 300, None),
                                      result("b", 200, 300, None)], "train") == \
        ["b: 200.0 proposals per image, a: 300.0"]


def test_stages_come_from_the_median_iteration(bench):
    """The stage split is that of the iteration with the median total, so stages and "rest"
    add up to that iteration (per-stage medians over different iterations would not)."""
    steps = [
        {"seconds": 10.0, "stages": {"backbone": 6.0, "heads": 3.0}},
        {"seconds": 4.0, "stages": {"backbone": 1.0, "heads": 2.5}},
        {"seconds": 7.0, "stages": {"backbone": 2.0, "heads": 4.0}},
    ]
    assert bench._median_stages(steps) == {"backbone": 2.0, "heads": 4.0}
    assert bench._median_iteration_seconds(steps) == 7.0
    # even count: the lower middle one
    assert bench._median_stages(steps[:2]) == {"backbone": 1.0, "heads": 2.5}
    assert bench._median_stages([{"seconds": 1.0}]) == {}


def test_ratio_is_paired_per_round(bench):
    """The time ratio is the median of per-round ratios: a machine slow in rounds 2 and 3
    (for both configs alike) does not change it, while the ratio of medians would."""
    ref = [10.0, 30.0, 30.0, 10.0, 10.0]
    other = [12.0, 36.0, 36.0, 12.0, 12.0]
    assert bench.paired_ratio(other, ref) == pytest.approx(1.2)
    # the slow phase shifted between the two configs: the ratio of medians becomes 3.6
    shifted = [12.0, 12.0, 36.0, 36.0, 36.0]
    ref_shifted = [10.0, 30.0, 30.0, 10.0, 10.0]
    assert bench.paired_ratio(shifted, ref_shifted) == pytest.approx(1.2)
    assert (sorted(shifted)[2] / sorted(ref_shifted)[2]) == pytest.approx(3.6)
    with pytest.raises(bench.BenchmarkError, match="one time per round"):
        bench.paired_ratio([1.0], [1.0, 2.0])
