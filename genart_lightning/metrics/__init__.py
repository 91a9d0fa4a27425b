"""Evaluation metrics (torchmetrics, so they synchronise across ranks): FID/KID, CLIP score, shapes attribute accuracy."""
