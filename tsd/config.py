"""Config keys of the `tsd` package (all under `MODEL.TSD`)."""
from detectron2.config import CfgNode as CN


def add_tsd_config(cfg):
    """Add this method's keys to `cfg` in place (call before `merge_from_file`)."""
    cfg.MODEL.TSD = CN()
    # γ of paper Eq. 3/5: offsets are γ·Δ·(w, h); the authors' trans_std.
    cfg.MODEL.TSD.GAMMA = 0.1
    # S: S×S bilinear samples averaged per bin of the deformable RoI pooling (paper Eq. 6).
    cfg.MODEL.TSD.SAMPLES_PER_BIN = 4
    # Hidden width of the offset generators F_c / F_r (shared first fc, then 2 fcs each).
    cfg.MODEL.TSD.OFFSET_FC_DIM = 256
    # Number and width of the fc layers of each TSD task tower (classification, regression).
    cfg.MODEL.TSD.NUM_FC = 2
    cfg.MODEL.TSD.FC_DIM = 1024
    # Add the progressive-constraint losses (paper Eq. 7, 8).
    cfg.MODEL.TSD.PC_ENABLED = True
    # m_c: classification PC margin (configs of the authors: 0.3; paper ablations 0.2).
    cfg.MODEL.TSD.CLS_PC_MARGIN = 0.3
    # m_r: localisation PC margin.
    cfg.MODEL.TSD.LOC_PC_MARGIN = 0.3
    # Stop the gradient of loss_tsd_box_reg into ΔR through the P̂_r-relative targets
    # (the authors' code does NOT detach: False reproduces it).
    cfg.MODEL.TSD.DETACH_TRANSLATED_TARGETS = False
    # Authors' coordinate conventions: rounded/left-aligned deformable pooling, "+1" widths in
    # the translation, mmdet FPN level rule and "+1" IoU in the PC loss. False = Detectron2's
    # continuous conventions (aligned pooling that matches ROIAlignV2 geometry).
    cfg.MODEL.TSD.LEGACY_COORDS = False
    # Cascade only: multiplier of all losses of each stage (authors' TSD configs: 1, 1, 1).
    cfg.MODEL.TSD.CASCADE_STAGE_WEIGHTS = (1.0, 1.0, 1.0)
    # Cascade only: re-assign and re-sample every stage as the authors (drop the GT rows, append
    # the GT, match at the stage IoU, ROI_HEADS.BATCH_SIZE_PER_IMAGE RoIs with at most
    # POSITIVE_FRACTION positives). False: Detectron2's cascade (all refined RoIs, no sampling).
    cfg.MODEL.TSD.CASCADE_RESAMPLE = True
