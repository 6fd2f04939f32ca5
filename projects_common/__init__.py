"""Helpers shared by several method packages.

This package imports no method package (and not the `projects` umbrella), so any method can
use it without import cycles: checkpoint conversion (`checkpoint`), test-time augmentation
dispatch (`tta`), and small layers such as soft-NMS (`soft_nms`).
"""
