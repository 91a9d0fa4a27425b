"""Sweeps: a spec expands into runs, launched locally or as one SLURM job array, then reported."""
