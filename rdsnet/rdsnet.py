"""RDSNet meta-architecture (Wang et al., AAAI 2020).

Two streams over a ResNet/Res2Net FPN: the *object stream* (`RDSNetHead`: classes, boxes and a
2 x d object representation per anchor on P3-P7) and the *pixel stream* (`PixelStream`: a d-dim
embedding per pixel at stride 4). The correlation of the two gives instance masks, which are
cropped by the (expanded) boxes; at test time MBRM optionally refines the boxes from the masks.
"""
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, build_anchor_generator, build_backbone
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes, ImageList, Instances
from fvcore.nn import sigmoid_focal_loss, smooth_l1_loss
from torch import nn

from .box_ops import (
    BBOX_XFORM_CLAMP,
    Box2BoxTransformPlusOne,
    LowQualityOverrideMatcher,
    box_iou,
    nms_per_class,
)
from .correlation import correlate, foreground_logit
from .cropping import crop_mask
from .mask_loss import downsample_gt_masks, instance_mask_losses
from .mbrm import MBRM
from .object_stream import RDSNetHead
from .pixel_stream import PixelStream
from .targets import anchor_valid_flags, gt_bitmasks_at_pad_shape, pad_shape, to_inclusive

__all__ = ["RDSNet"]



def _topk_count(topk: int, n):
    """min(topk, n); ``n`` is a tensor when sizes are traced (export), and stays one."""
    if isinstance(n, torch.Tensor):
        return torch.clamp(n, max=topk)
    return min(topk, n)


def _chunks(n, size: int):
    """(start, end) slices of ``size`` rows covering ``n`` rows; one slice of all rows when
    ``n`` is a traced tensor (a trace would freeze the number of chunks)."""
    if isinstance(n, torch.Tensor):
        return [(0, n)]
    return [(start, start + size) for start in range(0, n, size)]


def _flatten(x: torch.Tensor, k: int) -> torch.Tensor:
    """(N, A*k, H, W) -> (N, H*W*A, k): the (y, x, anchor) order of Detectron2's anchors."""
    n, _, h, w = x.shape
    return x.view(n, -1, k, h, w).permute(0, 3, 4, 1, 2).reshape(n, -1, k)


@META_ARCH_REGISTRY.register()
class RDSNet(nn.Module):
    """Reciprocal one-stage detection and instance segmentation (see module docstring).

    Training returns ``{"loss_cls", "loss_box_reg", "loss_mask"}``; inference returns, per
    image, ``{"instances": Instances}`` at the requested output size with ``pred_boxes``
    (XYXY, Detectron2's continuous convention), ``scores``, ``pred_classes`` and ``pred_masks``
    (bool, (N, H, W) full image) when mask prediction is on.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: nn.Module,
        head: RDSNetHead,
        pixel_stream: Optional[PixelStream],
        head_in_features: Sequence[str],
        anchor_generator: nn.Module,
        box2box_transform: Box2BoxTransform,
        anchor_matcher: LowQualityOverrideMatcher,
        num_classes: int,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        size_divisibility: int = 32,
        box_plus_one: bool = True,
        focal_loss_alpha: float = 0.25,
        focal_loss_gamma: float = 2.0,
        smooth_l1_beta: float = 0.11,
        masks_to_train: int = 100,
        mask_min_area: int = 100,
        train_crop_pad: float = 0.25,
        test_crop_pad: float = 0.1,
        ohem_pos_neg_ratio: float = 1.0,
        mask_loss_weight: float = 1.0,
        test_score_thresh: float = 0.05,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.5,
        max_detections_per_image: int = 100,
        mask_thresh: float = 0.4,
        mask_paste_chunk: int = 16,
        mbrm: Optional[MBRM] = None,
    ):
        """
        Args:
            backbone: returns FPN features (at least ``head_in_features`` and the pixel inputs).
            head: object stream. pixel_stream: pixel stream, or None for boxes only.
            head_in_features: FPN levels of the object stream (p3..p7).
            anchor_generator: e.g. `RDSNetMMDetAnchorGenerator` or Detectron2's default.
            box2box_transform: box coder (`Box2BoxTransformPlusOne` with ``box_plus_one``).
            anchor_matcher: IoU matcher (thresholds 0.4 / 0.5, low-quality override).
            box_plus_one: mmdet-v1 "+1" conventions (inclusive boxes, see `box_ops`).
            Remaining arguments: `MODEL.RDSNET.*` (see `config.py`).
        """
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.pixel_stream = pixel_stream
        self.head_in_features = list(head_in_features)
        self.anchor_generator = anchor_generator
        self.box2box_transform = box2box_transform
        self.anchor_matcher = anchor_matcher
        self.num_classes = num_classes
        self.size_divisibility = size_divisibility
        self.box_plus_one = box_plus_one
        self.focal_loss_alpha = focal_loss_alpha
        self.focal_loss_gamma = focal_loss_gamma
        self.smooth_l1_beta = smooth_l1_beta
        self.masks_to_train = masks_to_train
        self.mask_min_area = mask_min_area
        self.train_crop_pad = train_crop_pad
        self.test_crop_pad = test_crop_pad
        self.ohem_pos_neg_ratio = ohem_pos_neg_ratio
        self.mask_loss_weight = mask_loss_weight
        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.max_detections_per_image = max_detections_per_image
        self.mask_thresh = mask_thresh
        self.mask_paste_chunk = mask_paste_chunk
        if mbrm is not None and pixel_stream is None:
            raise ValueError("MODEL.RDSNET.MBRM.ENABLED needs masks: set MODEL.MASK_ON=True")
        self.mbrm = mbrm
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)

    @classmethod
    def from_config(cls, cfg):
        rd = cfg.MODEL.RDSNET
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        missing = [f for f in list(rd.IN_FEATURES) + list(rd.PIXEL_IN_FEATURES) if f not in shapes]
        if missing:
            raise ValueError(
                f"MODEL.RDSNET.IN_FEATURES / PIXEL_IN_FEATURES: {missing} not produced by "
                f"MODEL.BACKBONE.NAME={cfg.MODEL.BACKBONE.NAME!r} (it gives {sorted(shapes)})"
            )
        feature_shapes = [shapes[f] for f in rd.IN_FEATURES]
        anchor_generator = build_anchor_generator(cfg, feature_shapes)
        num_anchors = anchor_generator.num_cell_anchors
        if len(set(num_anchors)) != 1:
            raise ValueError(
                f"RDSNet needs the same number of anchors per level, got {num_anchors}"
            )
        weights = tuple(rd.BBOX_REG_WEIGHTS)
        if rd.BOX_PLUS_ONE:
            box2box = Box2BoxTransformPlusOne(weights, scale_clamp=BBOX_XFORM_CLAMP)
        else:
            box2box = Box2BoxTransform(weights, scale_clamp=BBOX_XFORM_CLAMP)
        mbrm = MBRM(rd.MBRM.GAMMA, rd.MBRM.KERNEL_SIZE) if rd.MBRM.ENABLED else None
        return {
            "backbone": backbone,
            "head": RDSNetHead(cfg, feature_shapes, num_anchors=num_anchors[0]),
            "pixel_stream": PixelStream(cfg, shapes) if cfg.MODEL.MASK_ON else None,
            "head_in_features": rd.IN_FEATURES,
            "anchor_generator": anchor_generator,
            "box2box_transform": box2box,
            "anchor_matcher": LowQualityOverrideMatcher(
                rd.IOU_THRESHOLDS, rd.IOU_LABELS, allow_low_quality_matches=True
            ),
            "num_classes": rd.NUM_CLASSES,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": rd.SIZE_DIVISIBILITY,
            "box_plus_one": rd.BOX_PLUS_ONE,
            "focal_loss_alpha": rd.FOCAL_LOSS_ALPHA,
            "focal_loss_gamma": rd.FOCAL_LOSS_GAMMA,
            "smooth_l1_beta": rd.SMOOTH_L1_BETA,
            "masks_to_train": rd.MASKS_TO_TRAIN,
            "mask_min_area": rd.MASK_MIN_AREA,
            "train_crop_pad": rd.TRAIN_CROP_PAD,
            "test_crop_pad": rd.TEST_CROP_PAD,
            "ohem_pos_neg_ratio": rd.OHEM_POS_NEG_RATIO,
            "mask_loss_weight": rd.MASK_LOSS_WEIGHT,
            "test_score_thresh": rd.SCORE_THRESH_TEST,
            "test_topk_candidates": rd.TOPK_CANDIDATES_TEST,
            "test_nms_thresh": rd.NMS_THRESH_TEST,
            "max_detections_per_image": rd.DETECTIONS_PER_IMAGE,
            "mask_thresh": rd.MASK_THRESH,
            "mask_paste_chunk": rd.MASK_PASTE_CHUNK,
            "mbrm": mbrm,
        }

    @property
    def device(self):
        return self.pixel_mean.device

    # ------------------------------------------------------------------ common
    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        """Move to the model's device, normalise, pad to a multiple of `size_divisibility`."""
        images = [x["image"].to(self.device) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
        return ImageList.from_tensors(images, self.size_divisibility)

    def forward(self, batched_inputs: List[Dict]):
        """Detectron2 model interface: list of dataset dicts -> losses (train) or results."""
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)
        head_features = [features[f] for f in self.head_in_features]
        logits, deltas, reps = self.head(head_features)
        anchors = self.anchor_generator(head_features)
        pixel_reps = self.pixel_stream(features) if self.pixel_stream is not None else None
        if self.training:
            if "instances" not in batched_inputs[0]:
                raise ValueError("RDSNet training needs 'instances' in the inputs")
            gt = [x["instances"].to(self.device) for x in batched_inputs]
            return self.losses(images, head_features, anchors, logits, deltas, reps, pixel_reps, gt)
        output_sizes = [
            (x.get("height", size[0]), x.get("width", size[1]))
            for x, size in zip(batched_inputs, images.image_sizes)
        ]
        results = self.inference(images, anchors, logits, deltas, reps, output_sizes)
        processed = []
        for i, result in enumerate(results):
            pixel_i = None
            if pixel_reps is not None:
                ph, pw = pad_shape(images.image_sizes[i], self.size_divisibility)
                pixel_i = pixel_reps[i, :, : ph // 4, : pw // 4]
            inst = self.postprocess(result, pixel_i, images.image_sizes[i])
            processed.append({"instances": inst})
        return processed

    def _internal_gt_boxes(self, instances: Instances) -> torch.Tensor:
        """GT boxes in the internal convention (inclusive with ``box_plus_one``)."""
        boxes = instances.gt_boxes.tensor
        return to_inclusive(boxes) if self.box_plus_one else boxes

    # ------------------------------------------------------------------ training
    @torch.no_grad()
    def label_anchors(self, anchors: Boxes, valid: torch.Tensor, gt: Instances):
        """Assign anchors of one image.

        Args:
            anchors: (R, 4) all levels. valid: (R,) bool anchor valid flags.
        Returns:
            labels (R,) int8 in {-1 ignore, 0 negative, 1 positive}; matched GT index (R,).
        """
        gt_boxes = self._internal_gt_boxes(gt)
        iou = box_iou(gt_boxes, anchors.tensor, self.box_plus_one)
        iou[:, ~valid] = 0.0  # invalid anchors take no part in the assignment
        matches, labels = self.anchor_matcher(iou)
        labels[~valid] = -1
        return labels, matches

    def losses(self, images, features, anchors, logits, deltas, reps, pixel_reps, gt):
        """Focal + smooth-L1 detection losses and the OHEM mask loss."""
        anchors_all = Boxes.cat(anchors)
        grid_sizes = [tuple(f.shape[-2:]) for f in features]
        num_anchors = self.anchor_generator.num_cell_anchors
        logits = cat([_flatten(x, self.num_classes) for x in logits], dim=1)
        deltas = cat([_flatten(x, 4) for x in deltas], dim=1)
        rep_dim2 = reps[0].shape[1] // num_anchors[0]
        reps = cat([_flatten(x, rep_dim2) for x in reps], dim=1)

        labels, matches, padded_sizes = [], [], []
        for i, inst in enumerate(gt):
            padded = pad_shape(images.image_sizes[i], self.size_divisibility)
            valid = anchor_valid_flags(
                grid_sizes, self.anchor_generator.strides, num_anchors, padded, self.device
            )
            lab, mat = self.label_anchors(anchors_all, valid, inst)
            labels.append(lab)
            matches.append(mat)
            padded_sizes.append(padded)
        labels, matches = torch.stack(labels), torch.stack(matches)
        pos = labels == 1
        # Per-GPU normaliser: sum over images of max(#positives, 1) (mmdet v1).
        num_pos = torch.clamp(pos.sum(dim=1), min=1).sum().float()

        cls_target = torch.zeros_like(logits)
        gt_boxes_all = []
        for i, inst in enumerate(gt):
            boxes = self._internal_gt_boxes(inst)
            if len(inst) == 0:  # no positives; anchors as dummy targets (finite deltas)
                gt_boxes_all.append(anchors_all.tensor)
                continue
            cls_i = inst.gt_classes[matches[i]]
            rows = torch.nonzero(pos[i], as_tuple=True)[0]
            cls_target[i, rows, cls_i[rows]] = 1.0
            gt_boxes_all.append(boxes[matches[i]])
        counted = labels >= 0
        # fvcore's eager focal loss, not its TorchScript twin: the scripted function is
        # re-optimised after its first calls in a process, with other float rounding, so a run
        # resumed in a new process would not continue bit for bit.
        loss_cls = (
            sigmoid_focal_loss(
                logits[counted],
                cls_target[counted],
                alpha=self.focal_loss_alpha,
                gamma=self.focal_loss_gamma,
                reduction="sum",
            )
            / num_pos
        )
        gt_deltas = torch.stack(
            [self.box2box_transform.get_deltas(anchors_all.tensor, b) for b in gt_boxes_all]
        )
        loss_box = (
            smooth_l1_loss(deltas[pos], gt_deltas[pos], beta=self.smooth_l1_beta, reduction="sum")
            / num_pos
        )
        out = {"loss_cls": loss_cls, "loss_box_reg": loss_box}
        if self.pixel_stream is not None:
            out["loss_mask"] = self.mask_loss(
                images, reps, pixel_reps, pos, matches, gt, padded_sizes
            )
        return out

    def mask_loss(self, images, reps, pixel_reps, pos, matches, gt, padded_sizes):
        """Sample <= `masks_to_train` positive anchors per image and apply the mask loss.

        Args:
            reps: (N, R, 2d) object representations. pixel_reps: (N, d, Hb/4, Wb/4).
            pos: (N, R) positive anchors. matches: (N, R) matched GT indices.
        Returns:
            scalar: sum of per-instance losses / (#sampled instances + 1) x weight.
        """
        total = reps.sum() * 0.0 + pixel_reps.sum() * 0.0  # keeps every parameter in the graph
        count = 0
        for i, inst in enumerate(gt):
            pos_idx = torch.nonzero(pos[i], as_tuple=True)[0]
            if pos_idx.numel() == 0 or len(inst) == 0:
                continue
            padded = padded_sizes[i]
            masks = gt_bitmasks_at_pad_shape(inst, padded, self.device)  # (G, pad_h, pad_w)
            gt_idx = matches[i, pos_idx]
            keep = masks.flatten(1).sum(dim=1)[gt_idx] > self.mask_min_area
            pos_idx, gt_idx = pos_idx[keep], gt_idx[keep]
            if pos_idx.numel() == 0:
                continue
            perm = torch.randperm(pos_idx.numel(), device=self.device)[: self.masks_to_train]
            pos_idx, gt_idx = pos_idx[perm], gt_idx[perm]

            h4, w4 = padded[0] // 4, padded[1] // 4
            logits = correlate(pixel_reps[i, :, :h4, :w4], reps[i, pos_idx])  # (n, 2, h4, w4)
            targets = downsample_gt_masks(masks)[gt_idx].long()
            boxes = self._internal_gt_boxes(inst)[gt_idx]
            img_h, img_w = images.image_sizes[i]
            limit = 1.0 if self.box_plus_one else 0.0
            boxes = torch.stack(
                [
                    boxes[:, 0].clamp(0, img_w - limit),
                    boxes[:, 1].clamp(0, img_h - limit),
                    boxes[:, 2].clamp(0, img_w - limit),
                    boxes[:, 3].clamp(0, img_h - limit),
                ],
                dim=1,
            )
            inside = crop_mask(boxes * 0.25, h4, w4, self.train_crop_pad, self.box_plus_one)
            targets[~inside] = -1
            total = total + instance_mask_losses(logits, targets, self.ohem_pos_neg_ratio).sum()
            count += pos_idx.numel()
        return total / (count + 1) * self.mask_loss_weight

    # ------------------------------------------------------------------ inference
    @torch.no_grad()
    def inference(
        self, images: ImageList, anchors, logits, deltas, reps, output_sizes
    ) -> List[Instances]:
        """Per image: per-level top-k, decode, clip, rescale, class-wise NMS.

        As the authors, boxes are clipped to the network input, rescaled to the output
        (original image) size and only then suppressed ("+1" IoU at the original scale).

        Args:
            output_sizes: (height, width) per image of the requested outputs.
        Returns:
            Instances at the output size with pred_boxes (internal convention, not clipped to
            the output), scores, pred_classes and pred_reps (n, 2d).
        """
        num_a = self.anchor_generator.num_cell_anchors[0]
        rep_dim2 = reps[0].shape[1] // num_a
        results = []
        for i, image_size in enumerate(images.image_sizes):
            boxes_l, scores_l, reps_l = [], [], []
            for anc, lg, dl, rp in zip(anchors, logits, deltas, reps):
                scores = _flatten(lg[i : i + 1], self.num_classes)[0].sigmoid()
                k = _topk_count(self.test_topk_candidates, scores.shape[0])
                top = scores.max(dim=1).values.topk(k).indices
                d = _flatten(dl[i : i + 1], 4)[0][top]
                boxes_l.append(self.box2box_transform.apply_deltas(d, anc.tensor[top]))
                scores_l.append(scores[top])
                reps_l.append(_flatten(rp[i : i + 1], rep_dim2)[0][top])
            boxes, scores, obj_reps = cat(boxes_l), cat(scores_l), cat(reps_l)
            boxes = self._clip(boxes, image_size)
            out_h, out_w = output_sizes[i]
            sx, sy = out_w / image_size[1], out_h / image_size[0]
            boxes = boxes * boxes.new_tensor([sx, sy, sx, sy])
            cand = torch.nonzero(scores > self.test_score_thresh)
            rows, classes = cand[:, 0], cand[:, 1]
            keep = nms_per_class(
                boxes[rows], scores[rows, classes], classes, self.test_nms_thresh,
                self.box_plus_one, self.max_detections_per_image,
            )
            result = Instances((out_h, out_w))
            result.pred_boxes = Boxes(boxes[rows[keep]])
            result.scores = scores[rows[keep], classes[keep]]
            result.pred_classes = classes[keep]
            result.pred_reps = obj_reps[rows[keep]]
            results.append(result)
        return results

    def _clip(self, boxes: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
        """Clip to the image: [0, w-1] x [0, h-1] for inclusive boxes, else [0, w] x [0, h]."""
        h, w = image_size
        limit = 1.0 if self.box_plus_one else 0.0
        x = boxes[:, 0::2].clamp(min=0, max=w - limit)
        y = boxes[:, 1::2].clamp(min=0, max=h - limit)
        return torch.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], dim=1)

    def postprocess(
        self,
        result: Instances,
        pixel_reps: Optional[torch.Tensor],
        image_size: Tuple[int, int],
    ) -> Instances:
        """Predict masks at the output size, optionally refine boxes with MBRM, export boxes.

        Masks: foreground logit at stride 4 -> bilinear x4 (align_corners=False)
        -> crop to the unpadded image -> bilinear to (out_h, out_w) (align_corners=True) ->
        sigmoid -> zero outside the box expanded by `test_crop_pad` -> MBRM -> > `mask_thresh`.

        Args:
            result: `inference` output of this image (at the output size).
            pixel_reps: (d, pad_h/4, pad_w/4) pixel representations of this image, or None.
            image_size: (h, w) of the resized, unpadded network input.
        """
        out_h, out_w = result.image_size
        boxes = result.pred_boxes.tensor
        reps = result.pred_reps
        result.remove("pred_reps")
        if pixel_reps is not None:
            masks, h_prof, v_prof = [], [], []
            fg = foreground_logit(pixel_reps, reps)  # (n, pad_h/4, pad_w/4)
            for start, end in _chunks(fg.shape[0], self.mask_paste_chunk):
                chunk = fg[start:end, None]
                up = F.interpolate(chunk, scale_factor=4, mode="bilinear", align_corners=False)
                up = up[:, :, : image_size[0], : image_size[1]]
                full = F.interpolate(up, size=(out_h, out_w), mode="bilinear", align_corners=True)
                chunk_boxes = boxes[start:end]
                inside = crop_mask(chunk_boxes, out_h, out_w, self.test_crop_pad, self.box_plus_one)
                prob = full[:, 0].sigmoid() * inside
                masks.append(prob > self.mask_thresh)
                if self.mbrm is not None:
                    h_prof.append(prob.amax(dim=1))
                    v_prof.append(prob.amax(dim=2))
            if masks:
                result.pred_masks = torch.cat(masks)
            else:
                result.pred_masks = torch.zeros(
                    (0, out_h, out_w), dtype=torch.bool, device=fg.device
                )
            if self.mbrm is not None and len(result) > 0:
                inclusive = boxes if self.box_plus_one else to_inclusive(boxes)
                boxes = self.mbrm.refine_from_profiles(
                    torch.cat(h_prof), torch.cat(v_prof), inclusive
                )
                if not self.box_plus_one:
                    boxes = torch.cat([boxes[:, :2], boxes[:, 2:] + 1.0], dim=1)
        if self.box_plus_one:
            # inclusive pixel boxes cover [x1, x2 + 1) in Detectron2's continuous convention
            # (this is also mmdet's "+1" COCO export); one-pixel boxes (x1 == x2) are kept
            boxes = torch.cat([boxes[:, :2], boxes[:, 2:] + 1.0], dim=1)
        boxes = Boxes(boxes)
        boxes.clip((out_h, out_w))
        result.pred_boxes = boxes
        return result
