#!/usr/bin/env python
"""Train or evaluate any method of this project with Detectron2's usual command line.

    python train_net.py --config-file configs/quickstart/mask_rcnn_R_18_FPN_shapes.yaml
    python train_net.py --config-file CFG --eval-only MODEL.WEIGHTS output/model_final.pth
    python train_net.py --num-gpus 4 --config-file CFG SOLVER.IMS_PER_BATCH 16
"""
from projects.engine import argument_parser
from projects.engine.train import run

if __name__ == "__main__":
    args = argument_parser().parse_args()
    print("Command Line Args:", args)
    run(args)
