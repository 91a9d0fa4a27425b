"""Diffusion math as pure tensor functions: noise schedules, eps/v/x0 parameterizations, samplers, guidance."""
