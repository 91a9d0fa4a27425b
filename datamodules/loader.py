"""Main-process side of the text-image loader: epoch plans, batch order, resumable position, skipped-sample warnings."""

from __future__ import annotations

import math
import random
import signal
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch.utils.data import DataLoader

from datamodules.stream import ShardStream, StreamConfig

WARN_EVERY_S = 60.0
"""At most one skipped-samples warning per minute while an epoch runs (plus a summary at its end)."""


@dataclass(frozen=True)
class EpochPlan:
    """Shards and batch quota of every loader slot (slot = rank * workers + worker) for one training epoch."""

    slot_shards: list[list[int]]
    slot_quotas: list[int]
    batches_per_rank: int
    dropped: int  # samples left out this epoch so every rank gets the same number of full batches


def plan_exact(counts: list[int], world_size: int, workers: int, batch_size: int, seed: int, epoch: int,
               bucket_counts: list[list[int]] | None = None) -> EpochPlan:
    """Deal shards (shuffled per epoch, same on all ranks) to slots; equalise ranks by trimming whole batches.

    With aspect buckets (`bucket_counts[shard][bucket]`), a slot can make only the full batches each bucket of its
    shards holds; the rest of each bucket is left out of the epoch like any remainder."""
    order = list(range(len(counts)))
    random.Random(f"{seed}-{epoch}").shuffle(order)
    # Largest shards first, each to the emptiest rank, then within a rank to its emptiest worker: totals end up
    # close, so trimming ranks to equal batch counts drops little. Equal-sized shards go round robin, in the
    # epoch's shuffled order.
    by_size = sorted(order, key=lambda i: -counts[i])
    slot_shards = []
    for rank_shards in _deal(by_size, counts, world_size, minimum=workers):
        slot_shards.extend(_deal(rank_shards, counts, workers))
    if bucket_counts is None:
        available = [sum(counts[i] for i in shards) // batch_size for shards in slot_shards]
    else:
        available = [sum(sum(column) // batch_size for column in zip(*(bucket_counts[i] for i in shards), strict=True))
                     for shards in slot_shards]
    per_rank = min(sum(available[r * workers : (r + 1) * workers]) for r in range(world_size))
    quotas = list(available)
    for r in range(world_size):
        mine = range(r * workers, (r + 1) * workers)
        for _ in range(sum(quotas[s] for s in mine) - per_rank):
            quotas[max(mine, key=lambda s: quotas[s])] -= 1  # trim the fullest worker first
    return EpochPlan(slot_shards, quotas, per_rank, sum(counts) - per_rank * world_size * batch_size)


def _deal(shards: list[int], counts: list[int], bins: int, minimum: int = 1) -> list[list[int]]:
    """Greedy balance: each shard (in order) to the bin with the fewest samples, keeping `minimum` shards per bin."""
    out: list[list[int]] = [[] for _ in range(bins)]
    totals = [0] * bins
    for done, shard in enumerate(shards):
        short = [b for b in range(bins) if len(out[b]) < minimum]
        # Once the shards left only just cover the bins still short of `minimum`, they go there.
        candidates = short if sum(minimum - len(out[b]) for b in short) >= len(shards) - done else range(bins)
        target = min(candidates, key=lambda b: (totals[b], b))
        out[target].append(shard)
        totals[target] += counts[shard]
    return out


def plan_resampled(batches_per_rank: int, world_size: int, workers: int) -> EpochPlan:
    """Each worker of every rank makes its share of a fixed batch count; shards are drawn in the workers."""
    share = [batches_per_rank // workers + (w < batches_per_rank % workers) for w in range(workers)]
    return EpochPlan([], share * world_size, batches_per_rank, 0)


class ShardLoader:
    """Iterable Lightning trains on: one DataLoader per epoch over ShardStream, in a fixed batch order.

    Stateful (`state_dict`/`load_state_dict`, the protocol Lightning's fit loop checks), so a mid-epoch checkpoint
    resumes with the same batches in the same order. The position lives here in the main process: the last batch
    index and stream position of every worker slot whose batches were handed out.
    """

    def __init__(self, config: StreamConfig, counts: list[int], pin_memory: bool, batches_per_epoch: int | None = None):
        self.config = config
        self.counts = counts
        self.pin_memory = pin_memory
        self.batches_per_epoch = batches_per_epoch
        self.epoch = 0
        self.skipped: Counter[str] = Counter()
        """Samples skipped in the current epoch by reason, summed over this rank's workers."""
        self._positions: dict[int, tuple[int, int]] = {}
        self._resume: dict[int, tuple[int, int]] = {}
        self._resume_epoch = -1

    batch_sampler = None
    """Read by Lightning's shuffle check next to `sampler`; there is none (batches are made in the workers)."""

    @property
    def sampler(self) -> ShardLoader:
        """Lightning sets the epoch through `dataloader.sampler.set_epoch`."""
        return self

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shard order, shuffle and flips the next iteration uses."""
        self.epoch = epoch

    @property
    def workers(self) -> int:
        return max(1, self.config.num_workers)

    def plan(self) -> EpochPlan:
        """The current epoch's training plan (same on every rank)."""
        cfg = self.config
        if cfg.mode == "resampled":
            return plan_resampled(self.batches_per_epoch or 0, cfg.world_size, self.workers)
        bucket_counts = [cfg.bucketing.counts(url) for url in cfg.urls] if cfg.bucketing is not None else None
        return plan_exact(self.counts, cfg.world_size, self.workers, cfg.batch_size, cfg.seed, self.epoch, bucket_counts)

    def _val_slot_samples(self) -> list[list[int]]:
        """Validation samples of each slot, per bucket (one bucket without aspect buckets)."""
        cfg, slots = self.config, self.config.world_size * self.workers
        if cfg.bucketing is None:
            total = sum(self.counts)
            return [[total // slots + (s < total % slots)] for s in range(slots)]
        out = [[0] * len(cfg.bucketing.sizes) for _ in range(slots)]
        buckets = (b for url in cfg.urls for b in cfg.bucketing.of.get(url, {}).values())
        for i, bucket in enumerate(buckets):  # slot s reads every `slots`-th sample from the s-th
            if bucket is not None:
                out[i % slots][bucket] += 1
        return out

    def __len__(self) -> int:
        cfg = self.config
        if cfg.stage == "train":
            return self.plan().batches_per_rank
        mine = self._val_slot_samples()[cfg.rank * self.workers : (cfg.rank + 1) * self.workers]
        return sum(math.ceil(n / cfg.batch_size) for per_bucket in mine for n in per_bucket)

    def __iter__(self) -> Iterator[dict]:
        cfg = self.config
        resume = self._resume if self._resume_epoch == self.epoch else {}
        self._resume, self.skipped = {}, Counter()
        if cfg.stage == "train":
            plan = self.plan()
            cfg = replace(cfg, epoch=self.epoch, slot_shards=plan.slot_shards, slot_quotas=plan.slot_quotas, resume=resume)
        else:
            cfg = replace(cfg, epoch=self.epoch)
        self._positions = dict(resume)
        # A fresh DataLoader per epoch: the epoch's plan is baked into its workers. Starting them is cheap with fork
        # (Linux's default); under spawn/forkserver each epoch pays the workers' imports once.
        loader = DataLoader(
            ShardStream(cfg),
            batch_size=None,
            num_workers=cfg.num_workers,
            pin_memory=self.pin_memory,
            prefetch_factor=4 if cfg.num_workers > 0 else None,
            collate_fn=_as_sent,
            worker_init_fn=_leave_signals_to_the_trainer,
            # its own generator for the workers' base seed: drawn from the global RNG, a new iterator (every epoch
            # and validation) would shift the training noise of the steps after it, so a run resumed from a
            # checkpoint saved before it (end of epoch, before validation) would draw other noise than the original
            generator=torch.Generator().manual_seed(zlib.crc32(f"{cfg.seed}-{cfg.stage}-{self.epoch}-{cfg.rank}".encode())),
        )
        pin = self.pin_memory and torch.cuda.is_available()
        slots = range(cfg.rank * self.workers, (cfg.rank + 1) * self.workers)
        per_slot: dict[int, tuple[dict, str]] = {}
        last_warning = -math.inf
        order = _batch_order(cfg.slot_quotas, slots, resume) if cfg.stage == "train" else None
        expected = next(order, None) if order is not None else None
        pending: dict[tuple[int, int], dict] = {}
        for item in loader:
            slot = item.pop("__slot__")
            per_slot[slot] = item.pop("__skipped__")
            if sum(len(c) for c, _ in per_slot.values()):
                self.skipped = sum((Counter(c) for c, _ in per_slot.values()), Counter())
                if time.monotonic() - last_warning > WARN_EVERY_S:
                    last_warning = time.monotonic()
                    warnings.warn(self._skipped_message(per_slot, "so far"), stacklevel=2)
            if "key" not in item:
                continue  # a worker's end-of-epoch report
            for name in ARRAY_FIELDS.intersection(item):
                item[name] = _as_tensor(item[name], pin)
            position = (item.pop("__pops__"), item.pop("__index__"))
            if order is None:
                yield item
                continue
            # DataLoader alternates workers; after a resume they may be one batch apart, so restore the order.
            pending[(position[1], slot)] = (item, position)
            while expected in pending:
                batch, (pops, index) = pending.pop(expected)
                self._positions[expected[1]] = (pops, index + 1)
                yield batch
                expected = next(order, None)
        if self.skipped:
            warnings.warn(self._skipped_message(per_slot, f"in epoch {self.epoch} ({cfg.stage})"), stacklevel=2)

    def _skipped_message(self, per_slot: dict[int, tuple[dict, str]], when: str) -> str:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        last = next((m for _, m in reversed(per_slot.values()) if m), "")
        fix = "set --data.strict=true to stop at the first one, or list them with `genart shards info URLS`"
        last = f"; last: {last}" if last else ""
        return f"skipped {sum(self.skipped.values())} unusable samples {when} ({reasons}){last}; {fix}"

    def state_dict(self) -> dict:
        """Epoch and, per worker slot, (stream items consumed, batches handed out) -- all plain ints."""
        positions = {str(s): list(p) for s, p in self._positions.items()}
        return {"epoch": self.epoch, "layout": [self.config.world_size, self.workers], "positions": positions}

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved epoch where it stopped (needs the same ranks x workers, else the epoch restarts)."""
        self.epoch = int(state["epoch"])
        layout = [self.config.world_size, self.workers]
        if list(state["layout"]) != layout:
            warnings.warn(
                f"checkpoint's data position is for {state['layout'][0]} ranks x {state['layout'][1]} workers, this run"
                f" has {layout[0]} x {layout[1]}: epoch {self.epoch} restarts from its first batch; resume with the"
                " same devices and --data.num_workers to continue it exactly",
                stacklevel=2,
            )
            return
        self._resume_epoch = int(state["epoch"])
        self.epoch = self._resume_epoch
        self._resume = {int(s): (int(p[0]), int(p[1])) for s, p in state["positions"].items()}


def _batch_order(quotas: list[int], slots: range, resume: dict[int, tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """(batch index, slot) in the order a fresh DataLoader yields them: round robin over workers by batch index."""
    start = {s: resume.get(s, (0, 0))[1] for s in slots}
    for index in range(max((quotas[s] for s in slots), default=0)):
        for s in slots:
            if start[s] <= index < quotas[s]:
                yield index, s


def _leave_signals_to_the_trainer(worker_id: int) -> None:
    """SLURM signals every process of a job step, loader workers included: a worker killed by the SIGTERM of a requeue
    (or the SIGUSR1 of a time limit) would crash the training process before it saves. The trainer handles them and
    stops its workers itself."""
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def _as_sent(item: dict) -> dict:
    """Keep a worker's numpy batch as it is (the default would make it a tensor, sent through shared memory)."""
    return item


ARRAY_FIELDS = frozenset(("image", "latent", "text_tokens", "text_mask", "text_pooled", "original_size", "crop_top_left"))
"""Batch fields that leave a worker as arrays (numpy through the pipe, or tensors in shared memory)."""


def _as_tensor(array: np.ndarray | torch.Tensor, pin: bool) -> torch.Tensor:
    """A batch field as a tensor; one that came through a worker's pipe is pinned here (the DataLoader pins tensors)."""
    if isinstance(array, torch.Tensor):
        return array
    tensor = torch.from_numpy(array)
    return tensor.pin_memory() if pin else tensor


def pin_memory_default() -> bool:
    """Pin host memory only where there is a GPU to copy to."""
    return torch.cuda.is_available()
