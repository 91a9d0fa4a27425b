"""`--trainer.strategy fsdp2`: fully sharded data parallel through FSDP2 under Lightning's ModelParallelStrategy.

Lightning's `FSDPStrategy` wraps the model in FSDP1, which refuses a CPU accelerator; ModelParallelStrategy runs
`fully_shard` (FSDP2) and works with gloo on CPU as with NCCL on GPUs, so the code path tested here is the one users
run. It leaves the sharding to the model's `configure_model`; this subclass fixes the mesh to pure data parallelism
(every rank a data-parallel replica holding 1/N of the weights, no tensor parallelism) and saves one full
checkpoint file by default, which `genart sample` and `load_model` read like any other. For models whose full state
does not fit one host, `save_distributed_checkpoint: true` writes a directory of per-rank shards instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry

FSDP2 = "fsdp2"


class FSDP2Strategy(ModelParallelStrategy):
    """ModelParallelStrategy with a data-parallel mesh over all ranks; `model.device_mesh["data_parallel"]` shards.

    HSDP: with more than one node (or `hsdp_replicas` > 1), `hsdp_mesh` is a (replicate, shard) mesh: weights are
    sharded over the ranks of a node and replicated across nodes, so the all-gathers of every layer stay on the fast
    intra-node links and only the gradient all-reduce crosses nodes. `hsdp_replicas: 1` shards over all ranks.
    """

    def __init__(self, save_distributed_checkpoint: bool = False, hsdp_replicas: int | None = None, **kwargs: Any) -> None:
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.hsdp_replicas = hsdp_replicas
        self._hsdp_mesh: Any = None

    @property
    def hsdp_mesh(self) -> Any:
        """The (replicate, shard) mesh, or None when all ranks shard (one node, or `hsdp_replicas: 1`)."""
        replicas = self.hsdp_replicas or self.num_nodes
        if replicas <= 1:
            return None
        if self._hsdp_mesh is None:
            world = self.num_nodes * self.num_processes
            if world % replicas:
                raise ValueError(f"hsdp_replicas {replicas} does not divide the {world} ranks; choose a divisor (the "
                                 "node count by default)")
            from torch.distributed.device_mesh import init_device_mesh

            self._hsdp_mesh = init_device_mesh(self.root_device.type, (replicas, world // replicas),
                                               mesh_dim_names=("replicate", "shard"))
        return self._hsdp_mesh

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes  # all ranks shard; "auto" would mean nodes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's strict check of a full checkpoint walks every parameter, also those our families keep out of
        checkpoints on purpose (a frozen text encoder or first stage, rebuilt from its source); check the keys
        against the model's own state_dict instead, then load."""
        path = Path(self.broadcast(checkpoint_path))
        module = self.lightning_module
        if path.is_file() and module.strict_loading:
            saved = torch.load(path, mmap=True, map_location="cpu", weights_only=True)["state_dict"].keys()
            expected = module.state_dict().keys()
            if saved != expected:
                missing, unexpected = sorted(expected - saved), sorted(saved - expected)
                raise KeyError(f"{path} does not fit this model: missing {missing[:3]}, unexpected {unexpected[:3]}; "
                               "resume with the configuration that wrote it")
        strict, module.strict_loading = module.strict_loading, False
        try:
            return super().load_checkpoint(path, weights_only)
        finally:
            module.strict_loading = strict


if FSDP2 not in StrategyRegistry:
    StrategyRegistry.register(FSDP2, FSDP2Strategy, description="FSDP2 (fully_shard) over all ranks, full checkpoints")
