"""Converter from the authors' mmdetection-v1 TSD checkpoints on synthetic data."""
import copy
import os
import re
import tempfile
import unittest

import torch
from detectron2.checkpoint import DetectionCheckpointer

import tsd_tiny
from projects_common.checkpoint import ConversionError
from tsd.convert import convert_tsd_checkpoint, convert_tsd_state_dict, expected_head_shapes

# this package's name -> mmdet name of one box head (written independently of tsd.convert)
HEAD = {
    "box_head{s}.fc1": "shared_fcs.0", "box_head{s}.fc2": "shared_fcs.1",
    "box_predictor{s}.cls_score": "fc_cls", "box_predictor{s}.bbox_pred": "fc_reg",
    "tsd_head{s}.offset_generator.offset_fc": "shared_fc.0",
    "tsd_head{s}.offset_generator.delta_c_fc1": "delta_c.0",
    "tsd_head{s}.offset_generator.delta_c_fc2": "delta_c.2",
    "tsd_head{s}.offset_generator.delta_r_fc1": "delta_r.0",
    "tsd_head{s}.offset_generator.delta_r_fc2": "delta_r.2",
    "tsd_head{s}.cls_head.fc1": "TSD_pc_fcs.0", "tsd_head{s}.cls_head.fc2": "TSD_pc_fcs.1",
    "tsd_head{s}.reg_head.fc1": "TSD_pr_fcs.0", "tsd_head{s}.reg_head.fc2": "TSD_pr_fcs.1",
    "tsd_head{s}.predictor.cls_score": "TSD_fc_cls",
    "tsd_head{s}.predictor.bbox_pred": "TSD_fc_reg",
}


def to_mmdet(d2_state, stages=None):
    """Build an authors'-layout state dict from a model's state dict (inverse mapping +
    background re-inserted at index 0), plus num_batches_tracked entries."""
    out = {}
    head = {}
    for s in ([None] if stages is None else range(stages)):
        suffix = "" if s is None else f".{s}"
        prefix = "bbox_head." if s is None else f"bbox_head.{s}."
        for ours, theirs in HEAD.items():
            head["roi_heads." + ours.format(s=suffix)] = prefix + theirs
    for k, v in d2_state.items():
        base, leaf = k.rsplit(".", 1)
        if base in head:
            name = head[base]
            if name.endswith(("fc_cls", "TSD_fc_cls")):
                v = torch.cat([v[-1:], v[:-1]])  # bg last -> bg first
            elif name.endswith(("fc_reg", "TSD_fc_reg")):
                v = torch.cat([torch.randn_like(v[:4]), v])  # untrained bg slot
            out[f"{name}.{leaf}"] = v
            continue
        m = re.fullmatch(r"backbone\.bottom_up\.stem\.conv1\.(weight|norm\.(\w+))", k)
        if m:
            out["backbone.conv1.weight" if m.group(2) is None else f"backbone.bn1.{m.group(2)}"] = v
            continue
        m = re.fullmatch(
            r"backbone\.bottom_up\.res(\d)\.(\d+)\.(conv\d|shortcut)\.(weight|norm\.(\w+))", k
        )
        if m:
            layer = f"backbone.layer{int(m.group(1)) - 1}.{m.group(2)}."
            conv, norm = m.group(3), m.group(5)
            if conv == "shortcut":
                out[layer + ("downsample.0.weight" if norm is None else f"downsample.1.{norm}")] = v
            else:
                out[layer + (f"{conv}.weight" if norm is None else f"bn{conv[-1]}.{norm}")] = v
            if norm == "running_var":
                out[layer + ("downsample.1" if conv == "shortcut" else f"bn{conv[-1]}")
                    + ".num_batches_tracked"] = torch.tensor(5)
            continue
        m = re.fullmatch(r"backbone\.fpn_(lateral|output)(\d)\.(weight|bias)", k)
        if m:
            kind = "lateral_convs" if m.group(1) == "lateral" else "fpn_convs"
            out[f"neck.{kind}.{int(m.group(2)) - 2}.conv.{m.group(3)}"] = v
            continue
        m = re.fullmatch(r"proposal_generator\.rpn_head\.(\w+)\.(weight|bias)", k)
        if m:
            name = {"conv": "rpn_conv", "objectness_logits": "rpn_cls", "anchor_deltas": "rpn_reg"}
            out[f"rpn_head.{name[m.group(1)]}.{m.group(2)}"] = v
            continue
        m = re.fullmatch(r"roi_heads\.mask_head\.(mask_fcn(\d)|deconv|predictor)\.(weight|bias)", k)
        if m:
            if m.group(2):
                out[f"mask_head.convs.{int(m.group(2)) - 1}.conv.{m.group(3)}"] = v
            elif m.group(1) == "deconv":
                out[f"mask_head.upsample.{m.group(3)}"] = v
            else:
                out[f"mask_head.conv_logits.{m.group(3)}"] = torch.cat([torch.randn_like(v[:1]), v])
            continue
        raise AssertionError(f"test inverse mapping misses {k}")
    return out


def _frozen(cfg):
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    return cfg


class TestConvertTSD(unittest.TestCase):
    def _round_trip(self, cfg, stages=None):
        model = tsd_tiny.build(_frozen(cfg))
        state = {k: v.clone() for k, v in model.state_dict().items()}
        for v in state.values():
            if v.dtype.is_floating_point:
                v.normal_()
        source = to_mmdet(state, stages)
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        out = convert_tsd_state_dict(source, shapes)
        self.assertEqual(set(out), set(state))
        for k in state:
            torch.testing.assert_close(out[k], state[k], msg=k)
        with tempfile.TemporaryDirectory() as d:
            src = os.path.join(d, "tsd.pth")
            torch.save({"meta": {"epoch": 14}, "state_dict": source}, src)
            convert_tsd_checkpoint(src, os.path.join(d, "out.pth"), shapes)
            model2 = tsd_tiny.build(_frozen(cfg), seed=9)
            DetectionCheckpointer(model2).load(os.path.join(d, "out.pth"))
            for k, v in model2.state_dict().items():
                torch.testing.assert_close(v, state[k], msg=k)

    def test_faster_and_mask_round_trip(self):
        self._round_trip(tsd_tiny.tiny_cfg("TSDROIHeads", mask_on=True))

    def test_cascade_round_trip(self):
        self._round_trip(tsd_tiny.tiny_cfg("TSDCascadeROIHeads"), stages=3)

    def test_r50_head_table(self):
        """The authors' head shapes for 81 classes: 45,886,094 parameters, loadable into the
        Detectron2 R-50 TSD head after dropping the background regression slots."""
        shapes = expected_head_shapes(81)
        self.assertEqual(sum(torch.Size(s).numel() for s in shapes.values()), 45_886_094)
        source = {f"bbox_head.{k}": torch.randn(s) for k, s in shapes.items()}
        out = convert_tsd_state_dict(source)
        heads = copy.deepcopy(tsd_tiny.r50_heads())
        heads.load_state_dict({k[len("roi_heads."):]: v for k, v in out.items()}, strict=True)
        t = heads.tsd_head.predictor
        src_cls = source["bbox_head.TSD_fc_cls.weight"]
        torch.testing.assert_close(t.cls_score.weight[80], src_cls[0])  # background last
        torch.testing.assert_close(t.cls_score.weight[:80], src_cls[1:])
        torch.testing.assert_close(t.bbox_pred.weight, source["bbox_head.TSD_fc_reg.weight"][4:])
        torch.testing.assert_close(heads.tsd_head.offset_generator.delta_c_fc2.weight,
                                   source["bbox_head.delta_c.2.weight"])

    def test_errors(self):
        shapes = expected_head_shapes(4, in_channels=8, resolution=7, fc_dim=16, offset_dim=8)
        source = {f"bbox_head.{k}": torch.zeros(s) for k, s in shapes.items()}
        convert_tsd_state_dict(source)
        bad = dict(source, **{"bbox_head.mystery.weight": torch.zeros(1)})
        with self.assertRaisesRegex(ConversionError, "bbox_head.mystery.weight"):
            convert_tsd_state_dict(bad)
        wrong = dict(source, **{"bbox_head.delta_r.2.weight": torch.zeros(3, 8)})
        with self.assertRaisesRegex(ConversionError, "delta_r.2.weight"):
            convert_tsd_state_dict(wrong)
        target = {k: tuple(v.shape) for k, v in convert_tsd_state_dict(source).items()}
        target["roi_heads.tsd_head.predictor.cls_score.weight"] = (7, 16)
        with self.assertRaisesRegex(ConversionError, "shape mismatches"):
            convert_tsd_state_dict(source, target)


if __name__ == "__main__":
    unittest.main()
