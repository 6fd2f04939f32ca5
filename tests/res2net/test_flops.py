"""Complexity at the ImageNet setting (paper Table 1: Res2Net-50 26w x 4s = 4.2
GFLOPs, i.e. multiply-accumulates, at 224 x 224) through the project's tools/analyze_model.py
(--backbone-only: the trunk of cfg.MODEL.BACKBONE plus a 1000-way fc)."""
import importlib.util
import os
import sys

import pytest

from projects.testing import repo_root
from projects.tools_common import setup_cfg


def analyze_model():
    name = "_tools_analyze_model"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(repo_root(), "tools", "analyze_model.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


# config, overrides, hand recount of conv + fc MACs, params with fc (BN gamma/beta counted)
CASES = [
    ("mask_rcnn_R2_50_26w4s_FPN_2x.yaml", [], 4.255, 25_699_120),
    ("mask_rcnn_R2_50_26w4s_FPN_2x.yaml", ["MODEL.RES2NET.VARIANT", "v1b"], 4.495, 25_718_352),
]


@pytest.mark.parametrize("config,opts,recount_gmacs,params", CASES)
def test_trunk_flops_and_params_at_224(config, opts, recount_gmacs, params):
    cfg = setup_cfg(os.path.join(repo_root(), "configs", "res2net", config),
                    opts + ["MODEL.RES2NET.NORM", "BN"])  # BN: gamma/beta are parameters
    r = analyze_model().analyze_backbone(cfg, (224, 224))
    assert r["params_with_fc"] == params
    # fvcore counts one flop per multiply-add of convs and the fc: the exact recount.
    assert r["gflops_with_fc"] == pytest.approx(recount_gmacs, rel=2e-3)
    if opts == [] and "26w4s" in config:
        # Paper / official README: 4.2 G for Res2Net-50 (within 3%).
        assert abs(r["gflops_with_fc"] - 4.2) / 4.2 < 0.03
