"""The contract every family keeps: one sampling entry, its image shape, optional hooks, a self-describing checkpoint.

`genart sample`, the evaluator and sample grids use only what is declared here, so a new family is one
subclass of `GenerativeModel` (its objective and its step) with networks from `nn/`.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from genart_lightning.nn.text_encoder import FrozenTextEncoder

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

FAMILY_KEY = "genart_family"
"""Checkpoint entry naming the family class, so `genart sample` can rebuild any checkpoint."""

TEXT_ENCODER_KEY = "genart_text_encoder"
"""Checkpoint entry with the fingerprint of the frozen text encoder the weights were trained with."""


NONFINITE_MODES = ("raise", "skip")
"""What a family does with a non-finite loss: stop with DivergenceError, or skip the step and count it."""


class DivergenceError(FloatingPointError):
    """A loss or gradient turned non-finite; the step was not applied."""


def check_nonfinite_mode(mode: str) -> str:
    """`mode` if it is one of NONFINITE_MODES, else one line with the choices."""
    if mode not in NONFINITE_MODES:
        raise ValueError(f"nonfinite must be 'raise' or 'skip', got {mode!r} (from --model.init_args.nonfinite)")
    return mode


@runtime_checkable
class FirstStage(Protocol):
    """What latent diffusion needs of an autoencoder: scaled latents in, images in [-1, 1] out."""

    def encode(self, images: Tensor) -> Tensor:
        """Images [B, C, H, W] in [-1, 1] -> latents already multiplied by `scaling`."""
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images in [-1, 1]."""
        ...

    def latent_shape(self, image_size: int, width: int | None = None) -> tuple[int, int, int]:
        """[C, h, w] of the latents of one image `image_size` high and `width` wide (square when width is None)."""
        ...

    @property
    def scaling(self) -> float:
        """The factor `encode` applies so that latents have unit variance."""
        ...

    @property
    def image_channels(self) -> int:
        """Channels of the images `decode` returns."""
        ...


class GenerativeModel(L.LightningModule):
    """Base class of all families; configs may only name its subclasses (LightningCLI subclass mode).

    The settings below mean the same in every family that takes them, so they are described once, here; a
    family that means more by one describes it in its own docstring, and `genart parts NAME` shows that.

    Args:
        image_size: side in pixels of the square images trained on and sampled; match
            --data.init_args.image_size.
        channels: channels of the images trained on and drawn; 3, as TextImageDataModule gives RGB.
        caption_dropout: share of training captions replaced by "", so the model also learns the uncaptioned
            case (what diffusion's classifier-free guidance extrapolates from; 0: never, and guidance has no
            baseline).
        text_encoder: OpenCLIP model name of the frozen text encoder that reads captions ("genart-tiny": a
            random-init tower that ships with the package, for offline runs); None: an unconditional model.
        text_pretrained: OpenCLIP tag (e.g. laion2b_s32b_b79k) or local checkpoint file of the text encoder's
            weights; None: random init (seeded, so it rebuilds the same).
        text_cache_dir: where OpenCLIP downloads pretrained text weights to (None: the Hugging Face cache).
        ema_decay: decay of the moving average of the weights that sampling uses; nearer 1 averages over more
            steps (0.999: about the last 1000) and smooths more, but follows training later.
        nonfinite: what a non-finite loss does: "raise" stops with DivergenceError, "skip" drops that step,
            warns and counts it (for rare spikes in long runs).
        gradient_checkpointing: recompute activations in backward instead of keeping them: less memory for
            about one more forward pass, for large images or batches.
        compile: torch.compile the family's large networks: true (inductor) or a backend name (e.g.
            aot_eager); the first steps are slow while it compiles.
    """

    conditional: bool = False
    """True when `sample` uses captions."""
    reconstructs: bool = False
    """True when the family implements `reconstruction_metrics` (autoencoders); the evaluator then reports them."""
    RENAMED_ARGUMENTS: ClassVar[dict[str, str]] = {}
    """Deprecated init argument -> its new name. A config using the old name still works, with a deprecation line;
    an old checkpoint's hyperparameters are renamed silently on load."""

    def sample(self, n: int, captions: Sequence[str] | None = None, seed: int = 0, **options: Any) -> Tensor:
        """Draw `n` images in [-1, 1], shape [n, C, H, W]; the same seed gives the same images.

        `captions` (one per image) for conditional families; `options` are the family's own sampling settings
        (steps, sampler, guidance, ...), each defaulting to the config's value.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement sample()")

    def image_shape(self) -> tuple[int, int, int]:
        """[C, H, W] of the images `sample` draws."""
        raise NotImplementedError(f"{type(self).__name__} does not implement image_shape()")

    def sampling_settings(self, options: dict) -> dict:
        """The settings `sample(**options)` really uses, defaults filled in (recorded in metrics.json, samples.jsonl)."""
        return dict(options)

    def reconstruction_metrics(self, batches: Iterable[dict]) -> dict[str, float]:
        """Hook for autoencoders (`reconstructs = True`): reconstruction quality over real batches."""
        raise NotImplementedError(f"{type(self).__name__} does not reconstruct images")

    def drop_captions(self, captions: Sequence[str]) -> list[str]:
        """Replace each caption by "" with probability `caption_dropout` (the one setting every family uses).

        Dropped captions teach the unconditional prediction that classifier-free guidance extrapolates from.
        """
        return [c if k else "" for c, k in zip(captions, self.keep_captions(len(captions)), strict=True)]

    def keep_captions(self, n: int) -> Tensor:
        """Which of n captions survive caption dropout (bool [n]); what `drop_captions` applies, for cached text."""
        return torch.rand(n) >= self.hparams.caption_dropout

    def skip_nonfinite(self, loss: Tensor, mode: str) -> bool:
        """For automatic optimization: True when this step must be skipped (return None from training_step).

        Every rank takes part in the decision (a rank with a NaN loss makes all of them skip), so DDP's gradient
        all-reduce is either run by all ranks or by none; `mode="raise"` stops with DivergenceError instead.
        Skips are counted in `train/nonfinite_skipped` and kept in checkpoints.
        """
        bad = not bool(torch.isfinite(loss.detach()))  # the one host sync of the guard
        if self._trainer is not None:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return False
        message = (f"{type(self).__name__}: non-finite loss ({float(loss):.4g} on this rank) at global_step {self.global_step}; "
                   "the step was not applied. Lower the learning rate or clip gradients (or set nonfinite='skip')")
        if mode == "raise":
            raise DivergenceError(message)
        self.nonfinite_skips = getattr(self, "nonfinite_skips", 0) + 1
        self.log("train/nonfinite_skipped", float(self.nonfinite_skips))
        rank_zero_warn(message)
        return True

    def save_hyperparameters(self, *args: Any, **kwargs: Any) -> None:
        """Lightning's, then deprecated argument names moved to their new ones (see RENAMED_ARGUMENTS)."""
        kwargs.setdefault("frame", inspect.currentframe().f_back)
        super().save_hyperparameters(*args, **kwargs)
        for old, new in self.RENAMED_ARGUMENTS.items():
            value = self.hparams.pop(old, None)
            if value is not None:
                rank_zero_warn(
                    f"{type(self).__name__}: `{old}` is deprecated, write `{new}: {value!r}` instead (--model.init_args.{new})",
                    category=FutureWarning,
                )
                self.hparams[new] = value

    @classmethod
    def upgrade_hparams(cls, hyper_parameters: dict) -> dict:
        """Hyperparameters saved under deprecated names, renamed (for checkpoints written before a rename)."""
        out = dict(hyper_parameters)
        for old, new in cls.RENAMED_ARGUMENTS.items():
            if old in out:
                value = out.pop(old)
                if value is not None:
                    out[new] = value
        return out

    def fused_optimizer(self) -> bool:
        """Whether to ask Adam/AdamW for torch's fused kernel: one kernel over all parameters instead of a Python loop
        over tensors, 3-6x faster optimizer steps (measured in benchmarks/); it exists for CPU and CUDA tensors. Not
        under autocast with gradient clipping: Lightning's MixedPrecision refuses to clip a fused optimizer's
        gradients (it would unscale them itself under fp16), in bf16 too, where nothing is scaled."""
        trainer = self._trainer
        if trainer is not None and trainer.gradient_clip_val and isinstance(trainer.precision_plugin, MixedPrecision):
            return False
        return self.device.type in ("cpu", "cuda")

    def on_fit_start(self) -> None:
        """Give every rank its own random stream: the same seed on all ranks would repeat noise and timesteps."""
        torch.manual_seed(rank_seed(int(os.environ.get("PL_GLOBAL_SEED", "0")), self.global_rank))

    def frozen_text_encoder(self) -> FrozenTextEncoder | None:
        """The text encoder this model rebuilds from its name instead of storing (None if none or trained along)."""
        text = getattr(self, "text_encoder", None)  # an OpenCLIP or a transformers one: both rebuild and fingerprint
        return text if text is not None and hasattr(text, "fingerprint") and not text.trainable else None

    def frozen_fingerprints(self) -> dict[str, dict[str, str]]:
        """Checkpoint entry -> fingerprint of each frozen part this model rebuilds from its source instead of storing."""
        text = self.frozen_text_encoder()
        return {TEXT_ENCODER_KEY: text.fingerprint()} if text is not None else {}

    def check_frozen_parts(self, checkpoint: dict, source: str = "the checkpoint") -> None:
        """One line when a frozen part built now (text encoder, pretrained first stage) is not the one `checkpoint`
        was trained with."""
        for key, now in self.frozen_fingerprints().items():
            saved = checkpoint.get(key)
            if saved is None or saved == now:
                continue
            if key == TEXT_ENCODER_KEY:
                raise ValueError(
                    f"{source} was trained with text encoder {saved['model']} ({saved['pretrained']}, weights {saved['sha256']}) "
                    f"but {now['model']} ({now['pretrained']}, weights {now['sha256']}) was built now; give the same "
                    "text_encoder / text_pretrained (file or tag) as in training, or pin the open_clip version it was trained with"
                )
            raise ValueError(f"{source} was trained with the frozen {key.removeprefix('genart_').replace('_', ' ')} "
                             f"{saved} but {now} was built now; point it at the weights it was trained with")

    def configure_model(self) -> None:
        """Under `--trainer.strategy fsdp2` (Lightning sets a device mesh), shard the networks once, over the
        strategy's HSDP mesh where it has one; else nothing."""
        if self.device_mesh is not None and not getattr(self, "sharded", False):
            hsdp = getattr(self.trainer.strategy, "hsdp_mesh", None)
            self.shard(hsdp or self.device_mesh["data_parallel"])
            self.sharded = True

    def shard(self, mesh: DeviceMesh) -> None:
        """Shard this family's networks with FSDP2 over `mesh` (families that support it override this)."""
        raise ValueError(f"{type(self).__name__} does not run under FSDP (--trainer.strategy fsdp2); its networks are "
                         "small enough to replicate: use --trainer.strategy ddp")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[FAMILY_KEY] = f"{type(self).__module__}.{type(self).__qualname__}"
        checkpoint["nonfinite_skips"] = getattr(self, "nonfinite_skips", 0)
        checkpoint.update(self.frozen_fingerprints())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.check_frozen_parts(checkpoint)
        self.nonfinite_skips = checkpoint.get("nonfinite_skips", 0)


def rank_seed(seed: int, rank: int) -> int:
    """Seed of one rank derived from the run's global seed (distinct per rank, stable across restarts)."""
    return (seed * 1_000_003 + rank * 7_919 + 1) % (2**63 - 1)
