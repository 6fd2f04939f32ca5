"""A tiny TSD Faster R-CNN and a tiny TSD Mask R-CNN (ResNet-18 FPN, 64 channels, 96-128 px)
learn the synthetic `shapes` dataset."""
import projects
from projects.testing import TINY_RCNN_OPTS, TINY_RESNET_OPTS, load_config, train_and_evaluate

ITERS = 150
# Bars for "learned" (box/mask AP on shapes_val). An untrained model scores ~0 AP. Measured in
# this setting (seeded, 150 iterations; results vary with the number of CPU threads): TSD Faster
# R-CNN 2.3-3.7 box AP (AP50 9.3-13.4); TSD Mask R-CNN 4.4 box AP / 5.1 mask AP (AP50 14.7 /
# 14.2, one thread); the same config with the plain sibling head only
# (configs/tsd/baseline_faster_rcnn_R_50_FPN_1x.yaml) 1.9 box AP (AP50 8.4). The authors'
# schedule settings (RGB/torchvision normalisation, sampling ratio 2, warm-up factor 1/32) learn
# slowly in 150 tiny iterations, hence the modest bars.
MIN_AP = 1.5
MIN_AP50 = 6.0
# Small TSD towers for the tiny model; 2x2 samples per bin (bins are ~1 px at this size) and
# 64 RoIs per image keep the iteration cheap; Detectron2's L1 box losses and all anchors
# (instead of the authors' Smooth-L1 betas and border filter) speed up the tiny run.
TSD_TINY_OPTS = [
    "MODEL.TSD.FC_DIM", 256,
    "MODEL.TSD.OFFSET_FC_DIM", 64,
    "MODEL.TSD.SAMPLES_PER_BIN", 2,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64,
    "MODEL.ROI_BOX_HEAD.SMOOTH_L1_BETA", 0.0,
    "MODEL.RPN.SMOOTH_L1_BETA", 0.0,
    "MODEL.RPN.BOUNDARY_THRESH", -1,
    "SOLVER.MAX_ITER", ITERS,
    "SOLVER.STEPS", (int(ITERS * 0.8),),
    "SEED", 1,
]


def _train(name, tmp_path_factory):
    cfg = load_config(projects.model_zoo.get_config_file(f"tsd/{name}.yaml"),
                      TINY_RESNET_OPTS + TINY_RCNN_OPTS + TSD_TINY_OPTS)
    return train_and_evaluate(cfg, tmp_path_factory.mktemp(name))


def test_tiny_tsd_faster_rcnn_learns_shapes(tmp_path_factory):
    results = _train("tsd_faster_rcnn_R_50_FPN_1x", tmp_path_factory)
    assert results["bbox"]["AP"] >= MIN_AP, results
    assert results["bbox"]["AP50"] >= MIN_AP50, results


def test_tiny_tsd_mask_rcnn_learns_shapes(tmp_path_factory):
    results = _train("tsd_mask_rcnn_R_50_FPN_1x", tmp_path_factory)
    for task in ("bbox", "segm"):
        assert results[task]["AP"] >= MIN_AP, results
        assert results[task]["AP50"] >= MIN_AP50, results
