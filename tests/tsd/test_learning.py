"""A tiny TSD Faster R-CNN and a tiny TSD Mask R-CNN (ResNet-18 FPN, 64 channels, 96-128 px)
learn the synthetic `shapes` dataset."""
import projects
from projects.testing import TINY_RCNN_OPTS, TINY_RESNET_OPTS, load_config, train_and_evaluate

ITERS = 150
# Bar for "learned": an untrained model scores ~0 box AP on shapes_val (random boxes); the tiny
# Faster R-CNN of the foundation tests passes 15 AP in 200 iterations.
MIN_BBOX_AP = 15.0
MIN_MASK_AP = 10.0
# Small TSD towers for the tiny model; 2x2 samples per bin (bins are ~1 px at this size) and
# 64 RoIs per image keep the iteration cheap.
TSD_TINY_OPTS = [
    "MODEL.TSD.FC_DIM", 256,
    "MODEL.TSD.OFFSET_FC_DIM", 64,
    "MODEL.TSD.SAMPLES_PER_BIN", 2,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 64,
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
    assert results["bbox"]["AP"] >= MIN_BBOX_AP, results


def test_tiny_tsd_mask_rcnn_learns_shapes(tmp_path_factory):
    results = _train("tsd_mask_rcnn_R_50_FPN_1x", tmp_path_factory)
    assert results["bbox"]["AP"] >= MIN_BBOX_AP, results
    assert results["segm"]["AP"] >= MIN_MASK_AP, results
