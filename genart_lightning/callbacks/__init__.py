"""Callbacks shared by every family: sample grids, EMA-aware evaluation, throughput."""
