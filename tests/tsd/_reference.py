"""Reference formulas of the TSD tests, written from the paper and the authors' code (never
from the package): box coding, the proposal translation P̂_r (Eq. 3), IoU, softmax, SmoothL1."""
import math


def _wh(b, legacy):
    e = 1.0 if legacy else 0.0
    return b[2] - b[0] + e, b[3] - b[1] + e


def ref_encode(p, g, weights, legacy):
    """R-CNN deltas of box g relative to p (mmdet v1 "+1" widths if legacy), times weights."""
    pw, ph = _wh(p, legacy)
    gw, gh = _wh(g, legacy)
    if legacy:
        pcx, pcy = (p[0] + p[2]) / 2, (p[1] + p[3]) / 2
        gcx, gcy = (g[0] + g[2]) / 2, (g[1] + g[3]) / 2
    else:
        pcx, pcy, gcx, gcy = p[0] + pw / 2, p[1] + ph / 2, g[0] + gw / 2, g[1] + gh / 2
    wx, wy, ww, wh = weights
    return [wx * (gcx - pcx) / pw, wy * (gcy - pcy) / ph, ww * math.log(gw / pw),
            wh * math.log(gh / ph)]


def ref_decode(p, d, weights, legacy):
    pw, ph = _wh(p, legacy)
    wx, wy, ww, wh = weights
    if legacy:
        cx, cy = (p[0] + p[2]) / 2, (p[1] + p[3]) / 2
    else:
        cx, cy = p[0] + pw / 2, p[1] + ph / 2
    cx, cy = cx + d[0] / wx * pw, cy + d[1] / wy * ph
    w, h = pw * math.exp(d[2] / ww), ph * math.exp(d[3] / wh)
    if legacy:
        return [cx - w / 2 + 0.5, cy - h / 2 + 0.5, cx + w / 2 - 0.5, cy + h / 2 - 0.5]
    return [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]


def ref_translate(p, dr, gamma, legacy):
    w, h = _wh(p, legacy)
    sx, sy = gamma * dr[0] * w, gamma * dr[1] * h
    return [p[0] + sx, p[1] + sy, p[2] + sx, p[3] + sy]


def ref_iou(a, b, legacy):
    e = 1.0 if legacy else 0.0
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]) + e)
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]) + e)
    inter = iw * ih
    aa, ab = _wh(a, legacy), _wh(b, legacy)
    return inter / (aa[0] * aa[1] + ab[0] * ab[1] - inter)


def softmax(v):
    m = max(v)
    e = [math.exp(x - m) for x in v]
    return [x / sum(e) for x in e]


def smooth_l1(x, beta=1.0):
    x = abs(x)
    return 0.5 * x * x / beta if x < beta else x - 0.5 * beta
