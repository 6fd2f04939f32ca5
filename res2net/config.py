"""Config keys of the `res2net` package (all under `MODEL.RES2NET`).

The keys mirror Detectron2's `MODEL.RESNETS` ones where the meaning is the same, but live in a
subtree this package owns so they never collide with keys Detectron2 adds later.
"""
from detectron2.config import CfgNode as CN


def add_res2net_config(cfg):
    """Add this method's keys to `cfg` in place (call before `merge_from_file`)."""
    _C = cfg
    _C.MODEL.RES2NET = CN()
    # Number of layers: 50 -> blocks per stage [3, 4, 6, 3]; 101 -> [3, 4, 23, 3];
    # 152 -> [3, 8, 36, 3].
    _C.MODEL.RES2NET.DEPTH = 50
    # s: number of splits per block; s - 1 hierarchical 3x3 convs. 1 = plain ResNet
    # bottleneck (used for the "ResNet-50 64w" rows).
    _C.MODEL.RES2NET.SCALE = 4
    # w: channels of one split in res2 (doubles per stage); inner width of a block = w * s.
    _C.MODEL.RES2NET.BASE_WIDTH = 26
    # "v1": 7x7 stem, strided 1x1 projection shortcut (original Res2Net).
    # "v1b": deep 3x3 stem (32-32-64) + avg-pool-then-1x1 shortcut (= timm "d", mmdet "v1d").
    _C.MODEL.RES2NET.VARIANT = "v1b"
    # Normalization of every conv: "FrozenBN", "BN", "SyncBN" or "GN" (see GN_NUM_GROUPS).
    _C.MODEL.RES2NET.NORM = "FrozenBN"
    # Group count of GroupNorm when NORM is "GN"; must divide every normalized width (the split
    # widths w*2^k too: e.g. 2 for 26w/18w/14w settings, up to 16 for 48w x 2s); checked at build.
    _C.MODEL.RES2NET.GN_NUM_GROUPS = 2
    # Output channels of the stem (the v1b deep stem uses half of it in its first two convs).
    _C.MODEL.RES2NET.STEM_OUT_CHANNELS = 64
    # Output channels of res2 (doubles per stage): 256 for the standard networks.
    _C.MODEL.RES2NET.RES2_OUT_CHANNELS = 256
    # Freeze the first N stages (1 = stem, 2 = stem + res2, ...), converting their BN to FrozenBN.
    # None (default): follow MODEL.BACKBONE.FREEZE_AT, the key every Detectron2 recipe sets; an
    # integer here overrides it for the Res2Net trunk only.
    _C.MODEL.RES2NET.FREEZE_AT = None
    # Features the trunk returns (any of "stem", "res2", ..., "res5").
    _C.MODEL.RES2NET.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Stride of the first block of res3..res5 in the 1x1 conv1 (True, maskrcnn-benchmark/d2-fork
    # default) or in the 3x3 convs and the last-split pool (False, how the ImageNet weights were
    # trained).
    _C.MODEL.RES2NET.STRIDE_IN_1X1 = False
    # 1 or 2; 2 makes res5 stride 1 with dilation-2 3x3 convs (output stride 16).
    _C.MODEL.RES2NET.RES5_DILATION = 1
    # Official/timm semantics: the first block of a stage avg-pools its bypassed last split
    # (3x3, padding 1) even when the block stride is 1 (res2.0, dilated res5.0). False = mmdet /
    # Res2Net-detectron2 behaviour (no pool at stride 1).
    _C.MODEL.RES2NET.POOL_STRIDE1 = True
    # Deformable 3x3 convs (every K_i of the stage, each with its own offset conv),
    # one flag per stage res2..res5. Implemented with torchvision.ops.deform_conv2d (CPU + GPU).
    _C.MODEL.RES2NET.DEFORM_ON_PER_STAGE = [False, False, False, False]
    # Modulated deformable conv (DCNv2: offsets + sigmoid masks) instead of DCNv1.
    _C.MODEL.RES2NET.DEFORM_MODULATED = False
    # Number of deformable offset groups.
    _C.MODEL.RES2NET.DEFORM_NUM_GROUPS = 1
    # Start every block as its shortcut (scale of conv3's norm = 0). Only for training from
    # scratch (e.g. the tiny test models); ImageNet weights overwrite it.
    _C.MODEL.RES2NET.ZERO_INIT_RESIDUAL = False
    # build_res2net_p67_fpn_backbone: input of P6 ("res5" = C5 as in RetinaNet, or "p5").
    _C.MODEL.RES2NET.P67_IN_FEATURE = "res5"
    # build_res2net_p67_fpn_backbone: ReLU between P6 and P7 (Detectron2's LastLevelP6P7).
    _C.MODEL.RES2NET.P67_RELU_BEFORE_P7 = True
