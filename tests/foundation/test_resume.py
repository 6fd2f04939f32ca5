"""`--resume` after a real kill -9 continues exactly: per method family, a `train_net.py`
subprocess is SIGKILLed mid-run (between two checkpoints, or while writing one), resumed with
`--resume`, and its `model_final.pth` (weights, every method's state buffers, optimizer state)
must equal, bit for bit, the one of an uninterrupted run of the same command."""
import os
import socket
import subprocess
import sys

import pytest
import torch

import projects
from projects.engine import argument_parser
from projects.testing import TINY_RCNN_OPTS, TINY_RESNET_OPTS, repo_root

from .conftest import QUICKSTART, cli_opts

KILL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_kill")

ITERS, PERIOD, KILL_AFTER = 12, 4, 9  # checkpoints after iterations 3, 7, 11; killed after 9
SMALL = [
    "SOLVER.MAX_ITER", ITERS, "SOLVER.CHECKPOINT_PERIOD", PERIOD,
    "SOLVER.STEPS", (9,),  # an LR step after the resume point: the scheduler must be restored
    "SOLVER.WARMUP_ITERS", 4, "SOLVER.BASE_LR", 0.02, "SOLVER.IMS_PER_BATCH", 2,
    "INPUT.MIN_SIZE_TRAIN", (64, 80), "INPUT.MAX_SIZE_TRAIN", 128,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN", 100, "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64,
    "DATASETS.TEST", (), "SEED", 7,
]
RCNN = TINY_RESNET_OPTS + TINY_RCNN_OPTS
RES2NET = [
    "MODEL.RES2NET.VARIANT", "v1b", "MODEL.RES2NET.NORM", "GN", "MODEL.RES2NET.GN_NUM_GROUPS", 8,
    "MODEL.RES2NET.FREEZE_AT", 0, "MODEL.RES2NET.BASE_WIDTH", 8, "MODEL.RES2NET.SCALE", 4,
    "MODEL.RES2NET.STEM_OUT_CHANNELS", 32, "MODEL.RES2NET.RES2_OUT_CHANNELS", 64,
]
FAMILIES = {
    # config, options
    "res2net_mask_rcnn": ("res2net/mask_rcnn_R2_50_26w4s_FPN_2x.yaml", RCNN + RES2NET),
    "dynamic_rcnn": ("dynamic_rcnn/dynamic_rcnn_R_50_FPN_1x.yaml", RCNN + [
        "MODEL.DYNAMIC_RCNN.UPDATE_ITERS", 3, "MODEL.DYNAMIC_RCNN.KI", 10,
        "MODEL.DYNAMIC_RCNN.KBETA", 5,
        # floor and cap out of the way: T and beta move in a few iterations of a random model
        "MODEL.DYNAMIC_RCNN.IOU_FLOOR", 0.05, "MODEL.DYNAMIC_RCNN.BETA_CAP", 10.0]),
    "tsd": ("tsd/tsd_faster_rcnn_R_50_FPN_1x.yaml", RCNN + [
        "MODEL.TSD.FC_DIM", 64, "MODEL.TSD.OFFSET_FC_DIM", 32, "MODEL.TSD.SAMPLES_PER_BIN", 2]),
    "decoupled_rcnn": ("decoupled_rcnn/decoupled_rcnn_R_50_FPN_2x.yaml", RCNN + [
        "MODEL.DECOUPLED_RCNN.REG_BATCH_SIZE_PER_IMAGE", 64,
        "MODEL.DECOUPLED_RCNN.RPN_POST_NMS_TOPK_REG_TRAIN", 100]),
    "rdsnet": ("rdsnet/rdsnet_R_50_FPN_1x.yaml", TINY_RESNET_OPTS + [
        "MODEL.RDSNET.NUM_CLASSES", 3, "MODEL.RDSNET.PIXEL_CONV_DIM", 32,
        "MODEL.ANCHOR_GENERATOR.SIZES", [[16], [32], [64], [128], [256]]]),
}


def _args(config, opts, out, *flags):
    return ["--config-file", projects.model_zoo.get_config_file(config), *flags,
            *cli_opts(opts + SMALL), "OUTPUT_DIR", str(out)]


def _train(argv):
    """`train_net.py argv` in a fresh interpreter, as a user runs it. Every run of these tests
    is its own process: TorchScript functions in the losses (fvcore's focal loss) specialise
    after their first calls, and an interpreter that already ran other models can give other
    float results than a fresh one."""
    return _run_script(os.path.join(repo_root(), "train_net.py"), argv, 0)


def _run_script(script, argv, returncode, **env):
    """``python script argv`` in its own process group; ``env`` may hold the kill settings of
    ``_kill/sitecustomize.py`` (KILL_AFTER_ITER, KILL_DURING_SAVE)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([KILL_DIR, repo_root()]),
               OMP_NUM_THREADS=str(torch.get_num_threads()), **env)
    proc = subprocess.run([sys.executable, script, *argv], env=env, cwd=repo_root(),
                          capture_output=True, text=True, start_new_session=True, timeout=900)
    assert proc.returncode == returncode, proc.stderr[-4000:]  # -9: killed, not failed
    return proc


def _train_killed(argv, **kill):
    """`train_net.py argv` in a subprocess that SIGKILLs its process group as ``kill`` says."""
    return _run_script(os.path.join(repo_root(), "train_net.py"), argv, -9, **kill)


def _final(out):
    return torch.load(os.path.join(out, "model_final.pth"), weights_only=True)


def _assert_identical(resumed, reference):
    assert resumed["iteration"] == reference["iteration"] == ITERS - 1
    assert resumed["model"].keys() == reference["model"].keys()
    for k, v in reference["model"].items():
        assert torch.equal(resumed["model"][k], v), k
    opt_r = resumed["trainer"]["_trainer"]["optimizer"]["state"]
    opt_u = reference["trainer"]["_trainer"]["optimizer"]["state"]
    assert opt_r.keys() == opt_u.keys() and len(opt_u) > 0
    for i, s in opt_u.items():
        assert torch.equal(opt_r[i]["momentum_buffer"], s["momentum_buffer"]), i
    assert resumed["trainer"]["data_loader"] == reference["trainer"]["data_loader"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_kill_9_then_resume_equals_uninterrupted_run(family, tmp_path):
    config, opts = FAMILIES[family]
    _train(_args(config, opts, tmp_path / "reference"))

    run = tmp_path / "run"
    _train_killed(_args(config, opts, run), KILL_AFTER_ITER=str(KILL_AFTER))
    assert not (run / "model_final.pth").exists()
    assert (run / "last_checkpoint").read_text() == "model_0000007.pth"
    at_kill = torch.load(run / "model_0000007.pth", weights_only=True)

    _train(_args(config, opts, run, "--resume"))
    resumed, reference = _final(run), _final(tmp_path / "reference")
    _assert_identical(resumed, reference)
    moved = [k for k, v in reference["model"].items()
             if v.is_floating_point() and not torch.equal(v, at_kill["model"][k])]
    assert len(moved) > len(reference["model"]) // 2  # training went on after the resume point
    if family == "dynamic_rcnn":
        state = {k.split("dynamic_state.")[1]: v for k, v in resumed["model"].items()
                 if "dynamic_state." in k}
        assert int(state["iteration"]) == ITERS
        # resumed mid-window (8 % 3 = 2 entries) and updated after the resume
        assert int(at_kill["model"]["roi_heads.dynamic_state.iou_count"][0]) == 2
        for name in ("iou_thr", "beta"):
            assert state[name] != at_kill["model"][f"roi_heads.dynamic_state.{name}"], name


QUICKSTART_NAME = "quickstart/mask_rcnn_R_18_FPN_shapes.yaml"


@pytest.fixture(scope="module")
def quickstart_reference(tmp_path_factory):
    """`model_final.pth` of the uninterrupted quickstart run (loader in the main process)."""
    out = tmp_path_factory.mktemp("quickstart_reference")
    _train(_args(QUICKSTART_NAME, RCNN, out))
    return _final(out)


def test_loader_workers_resume_exactly(tmp_path, quickstart_reference):
    """With a loader worker process (its own random state, prefetching) the stream continues
    where it stopped too; the run is also identical to the one mapping in the main process."""
    opts = RCNN + ["DATALOADER.NUM_WORKERS", 1]
    run = tmp_path / "run"
    _train_killed(_args(QUICKSTART_NAME, opts, run), KILL_AFTER_ITER=str(KILL_AFTER))
    _train(_args(QUICKSTART_NAME, opts, run, "--resume"))
    _assert_identical(_final(run), quickstart_reference)


@pytest.mark.parametrize("victim", ["model_final", "model_0000007"])
def test_kill_while_writing_a_checkpoint(victim, tmp_path, quickstart_reference):
    """Killed half-way through writing a checkpoint: no truncated file under the final name,
    `last_checkpoint` names a complete file, and `--resume` ends with a loadable
    `model_final.pth` equal to the uninterrupted run's."""
    run = tmp_path / "run"
    _train_killed(_args(QUICKSTART_NAME, RCNN, run), KILL_DURING_SAVE=victim)
    assert not (run / f"{victim}.pth").exists()
    named = (run / "last_checkpoint").read_text()
    torch.load(run / named, weights_only=True)  # complete
    leftovers = [f for f in os.listdir(run) if f.endswith(".tmp")]
    assert len(leftovers) == 1  # the half-written temporary file

    _train(_args(QUICKSTART_NAME, RCNN, run, "--resume"))
    assert not [f for f in os.listdir(run) if f.endswith(".tmp")]
    _assert_identical(_final(run), quickstart_reference)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_resume_exactly(tmp_path):
    """Two CPU processes (gloo): each rank restores its own random states and data stream.
    Through `train_net.py --num-gpus 2` where Detectron2's launch supports CPU workers (main);
    with Detectron2 v0.6, `train_net.py` refuses clearly and the same `Trainer` runs on two
    gloo processes started by the test's launcher."""
    from projects.engine import train as train_module

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --num-gpus would use NCCL on GPUs")
    config = QUICKSTART_NAME
    if train_module._launch_supports_cpu_workers():
        script = os.path.join(repo_root(), "train_net.py")

        def argv(out, *flags):
            return ["--num-gpus", "2", *_args(config, RCNN, out, *flags)]
    else:
        with pytest.raises(SystemExit, match="--num-gpus 2 without CUDA.*Detectron2 main"):
            train_module.run(argument_parser().parse_args(
                ["--config-file", QUICKSTART, "--num-gpus", "2"]))
        script = os.path.join(KILL_DIR, "gloo_train.py")

        def argv(out, *flags):
            full = _args(config, RCNN, out)
            return [str(_free_port()), *flags, full[1], *full[2:]]

    _run_script(script, argv(tmp_path / "reference"), 0)
    run = tmp_path / "run"
    _run_script(script, argv(run), -9, KILL_AFTER_ITER=str(KILL_AFTER))
    assert not (run / "model_final.pth").exists()
    _run_script(script, argv(run, "--resume"), 0)
    resumed, reference = _final(run), _final(tmp_path / "reference")
    _assert_identical(resumed, reference)
    states = resumed["trainer"]["random_states"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])


def test_evaluation_during_training_leaves_the_random_states(tmp_path):
    """`Trainer.test` (the EvalHook's evaluation, after a checkpoint was written) must not
    consume the training random streams, or the run after an evaluation would differ from the
    run resumed from that checkpoint. (Building the test loader draws from torch's generator.)"""
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import DatasetEvaluator

    from projects.engine import Trainer
    from projects.engine.random_state import capture_random_states

    name = "shapes_val_first4_resume_test"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: DatasetCatalog.get("shapes_val")[:4])
        MetadataCatalog.get(name).set(
            thing_classes=MetadataCatalog.get("shapes_val").thing_classes)

    class Count(DatasetEvaluator):
        def reset(self):
            self.n = 0

        def process(self, inputs, outputs):
            self.n += len(inputs)

        def evaluate(self):
            return {"images": {"n": self.n}}

    cfg = projects.load_config(QUICKSTART, RCNN + ["DATASETS.TEST", (name,)])
    torch.manual_seed(0)
    model = Trainer.build_model(cfg)
    before = capture_random_states()
    results = Trainer.test(cfg, model, [Count()])
    after = capture_random_states()
    assert results["images"]["n"] == 4
    assert torch.equal(before["torch"], after["torch"])
    assert before["numpy"]["keys"].equal(after["numpy"]["keys"])
    assert before["python"] == after["python"]
