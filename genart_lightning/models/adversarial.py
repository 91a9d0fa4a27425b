"""The adversarial training step shared by every GAN family: alternating D/G updates under manual optimization.

Why gradients are synchronised by hand: Lightning's DDP wraps the whole LightningModule, so one reducer covers G and
D. A D update gives G no gradients (and a G update none to D), which DDP's reducer reports as unused parameters
unless it searches the graph every backward (`find_unused_parameters=True`) and all-reduces both nets each time.
Instead every backward runs under `block_backward_sync()` and, once per optimizer step, the gradients of the one net
being stepped are averaged over ranks in a single all-reduce, together with the floating buffers of both nets
(BatchNorm statistics, spectral-norm vectors: they would otherwise drift apart per rank, and each net also runs in
train mode in the other's step) and the step's loss (so the divergence check sees the same number on every rank, and
all ranks stop or skip together). StyleGAN2-ADA syncs the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from datamodules.distributed import rank_world
from genart_lightning.models.base import DivergenceError, GenerativeModel, check_nonfinite_mode
from genart_lightning.models.gan_objectives import (
    Loss,
    check_loss,
    discriminator_loss,
    generator_loss,
    r1_penalty,
)
from genart_lightning.nn.augment import DiscriminatorAugment
from genart_lightning.nn.ema import make_ema

COUNTERS_KEY = "adversarial_counters"


def average_over_ranks(net: nn.Module, loss: Tensor, buffers_of: Sequence[nn.Module] = ()) -> Tensor:
    """Average `net`'s gradients, the floating buffers of `net` and `buffers_of`, and `loss` over all ranks in one
    all-reduce; returns the mean loss."""
    world = rank_world()[1]
    if world == 1:
        return loss
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    buffers = [b for module in (net, *buffers_of) for b in module.buffers() if b.is_floating_point()]
    tensors = grads + buffers + [loss.reshape(1)]
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return flat[-1]


class AdversarialModel(GenerativeModel):
    """A GAN objective and its alternating step; subclasses build `generator`, `discriminator` and call `finish_init`.

    Counting: one D step per `accumulate_grad_batches` micro-batches, one G step per `n_critic` D steps; Lightning's
    `global_step` counts both optimizers' steps (2 per iteration with n_critic=1), `train/g_steps` counts G steps.
    """

    generator: nn.Module
    discriminator: nn.Module
    z_dim: int

    def __init__(
        self,
        loss: Loss = "nonsaturating",
        r1_gamma: float = 0.0,
        r1_interval: int = 16,
        n_critic: int = 1,
        lr_g: float = 2e-4,
        lr_d: float = 2e-4,
        betas_g: tuple[float, float] = (0.5, 0.999),
        betas_d: tuple[float, float] = (0.5, 0.999),
        ema_decay: float = 0.999,
        accumulate_grad_batches: int = 1,
        nonfinite: str = "raise",
        nonfinite_check_every: int = 1,
        reuse_fakes: bool = True,
        augment: Sequence[str] = (),
        augment_p: float = 1.0,
        augment_target: float | None = None,
        augment_speed_images: int = 20_000,
        diversity_weight: float = 0.0,
    ) -> None:
        """Objective, regularisers and optimizer settings; `nonfinite` is "raise" (stop) or "skip" (drop the step).

        `reuse_fakes`: the G step scores the fakes the D step just drew (as the PyTorch DCGAN tutorial does), one G
        forward per iteration instead of two; the G graph of each micro-batch is kept until the G step. False draws
        fresh noise for the G step.

        `augment`: ops of nn/augment.py (color, translation, cutout) applied to every image D sees, real and fake,
        each with probability `augment_p` (DiffAugment: all three, p=1); `augment_target` (ADA: 0.6) adapts p
        instead, starting from 0, by `augment_speed_images` images per unit of p. Small datasets need it.

        `diversity_weight`: the mode-seeking term of MSGAN (Mao et al. 2019) in G's loss, weight / (mean |G(z1, c) -
        G(z2, c)| / mean |z1 - z2| + 1e-5), at the cost of a second G forward per G step. A conditional G can learn to
        ignore its noise (digits: |G(z1, c) - G(z2, c)| was 0.04 against 0.46 between captions); this makes it pay.

        Args:
            loss: the GAN objective, "nonsaturating" (DCGAN's log-loss) or "hinge" (SAGAN / BigGAN's).
            r1_gamma: weight of the R1 penalty on D's input gradient at real images (0: off); raise it when D
                overfits or training diverges.
            r1_interval: lazy R1: the penalty every this many D steps, scaled up by it (fewer double
                backwards).
            n_critic: D steps per G step; more gives G a better-trained D to learn from, at more cost per G
                step.
            lr_g: Adam learning rate of the generator.
            lr_d: Adam learning rate of the discriminator.
            betas_g: Adam (beta1, beta2) of the generator; DCGAN's beta1 0.5 keeps momentum short, as GANs
                need.
            betas_d: Adam (beta1, beta2) of the discriminator.
            accumulate_grad_batches: micro-batches whose gradients one D step averages (a larger batch in the
                same memory); set it here, as the Trainer's does not work under manual optimization.
            nonfinite_check_every: check loss and gradient norm for NaN / inf every this many optimizer steps
                (0: never); each check waits for the device once.
            reuse_fakes: let the G step score the fakes the D step drew (one G forward per iteration); False
                draws fresh noise.
            augment: ops applied to every image D sees, any of color, translation, cutout (DiffAugment: all
                three); for small datasets, where D memorises the real images.
            augment_p: probability of each op per image, when augment_target is unset.
            augment_target: ADA: adapt p so the mean sign of D's logits on real images stays at this (ADA:
                0.6); None: p fixed at augment_p.
            augment_speed_images: ADA: images over which p can move by 1; fewer adapt faster (ADA: 500k).
            diversity_weight: weight of MSGAN's mode-seeking term in G's loss (0: off); for a G that ignores
                its noise, at one more G forward per G step.
        """
        super().__init__()
        check_loss(loss)
        for name, value in (("r1_interval", r1_interval), ("n_critic", n_critic), ("accumulate_grad_batches", accumulate_grad_batches)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value} (from --model.init_args.{name})")
        check_nonfinite_mode(nonfinite)
        self.automatic_optimization = False
        self.loss_kind = loss
        self.r1_gamma, self.r1_interval, self.n_critic = r1_gamma, r1_interval, n_critic
        self.lr_g, self.lr_d, self.betas_g, self.betas_d = lr_g, lr_d, tuple(betas_g), tuple(betas_d)
        self.ema_decay = ema_decay
        self.accumulate = accumulate_grad_batches
        self.nonfinite, self.nonfinite_check_every = nonfinite, nonfinite_check_every
        self.reuse_fakes = reuse_fakes
        self.augment = DiscriminatorAugment(augment, augment_p, augment_target, speed_images=augment_speed_images) if augment else None
        self.d_steps = self.g_steps = self.skipped_steps = 0
        self.diversity_weight = diversity_weight
        # (noise, condition, fake kept for the G step or None) of the micro-batches since the last D step
        self._pending: list[tuple[Tensor, Tensor | None, Tensor | None]] = []
        self._d_loss_sum: Tensor | None = None

    def finish_init(self) -> None:
        """Build the EMA generator once the nets exist (it is what sampling, grids and evaluation use)."""
        self.ema = make_ema(self.generator, self.ema_decay)

    # --- hooks for families -------------------------------------------------------------------------------------

    def condition(self, batch: dict) -> Tensor | None:
        """Condition vector per sample for G and D; None for unconditional families."""
        return None

    def fake_logits(self, real: Tensor, fake: Tensor, cond: Tensor | None) -> list[Tensor]:
        """Logits of every kind of pair D must call fake (a matching-aware D adds real images with wrong captions)."""
        return [self.judge(fake, cond)]

    def judge(self, images: Tensor, cond: Tensor | None) -> Tensor:
        """D's logits for `images` as D sees them in training: augmented when `augment` is set."""
        return self.discriminator(images if self.augment is None else self.augment(images), cond)

    def noise(self, n: int) -> Tensor:
        """Latent noise for training (sampling uses its own seeded generator)."""
        return torch.randn(n, self.z_dim, device=self.device)

    # --- the step -----------------------------------------------------------------------------------------------

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.Adam(self.generator.parameters(), lr=self.lr_g, betas=self.betas_g, fused=self.fused_optimizer()),
            torch.optim.Adam(self.discriminator.parameters(), lr=self.lr_d, betas=self.betas_d, fused=self.fused_optimizer()),
        ]

    def training_step(self, batch: dict, batch_idx: int) -> None:
        """One micro-batch of D loss; after `accumulate_grad_batches` of them a D step, and every `n_critic` a G step."""
        opt_g, opt_d = self.optimizers()
        real = batch["image"]
        cond = self.condition(batch)
        keep = self.reuse_fakes and (self.d_steps + 1) % self.n_critic == 0  # a G step follows this D step
        z = self.noise(real.shape[0])
        with torch.set_grad_enabled(keep):
            fake = self.generator(z, cond)
        with self.toggled_optimizer(opt_d):
            real_logits = self.judge(real, cond)
            d_loss = discriminator_loss(self.loss_kind, real_logits, self.fake_logits(real, fake.detach(), cond))
            total = d_loss
            if self.r1_gamma > 0 and self.d_steps % self.r1_interval == 0:
                # Lazy R1 (StyleGAN2): every r1_interval D steps, weighted by the interval to keep its average strength.
                r1 = r1_penalty(lambda x: self.judge(x, cond), real)
                total = total + 0.5 * self.r1_gamma * self.r1_interval * r1
                self.log("train/r1", r1.detach())
            self._backward(total)
        if self.augment is not None:
            self.augment.observe(real_logits)
        self._d_loss_sum = d_loss.detach() / self.accumulate + (0 if self._d_loss_sum is None else self._d_loss_sum)
        self._pending.append((z, cond, fake if keep else None))
        if len(self._pending) < self.accumulate:
            return
        d_loss_mean, self._d_loss_sum = self._d_loss_sum, None
        # G's buffers (BatchNorm statistics) are saved in the kept fakes' graphs: averaging them in place now would
        # break the G backward, so they are averaged at the G step that follows instead.
        augment = [] if self.augment is None else [self.augment]  # its statistics, averaged like BatchNorm's
        if self._step(opt_d, self.discriminator, "d_loss", d_loss_mean, buffers_of=augment + ([] if keep else [self.generator])):
            self.d_steps += 1
            if self.augment is not None:
                self.augment.update(self.d_steps)
                self.log("train/augment_p", self.augment.p)
            if self.d_steps % self.n_critic == 0:
                self._generator_step(opt_g)
        self._pending.clear()
        self.log("train/g_steps", float(self.g_steps))

    def _generator_step(self, opt_g) -> None:
        """G step over the same micro-batches' conditions, against the D just updated (alternating, not simultaneous)."""
        g_loss_mean = None
        with self.toggled_optimizer(opt_g):
            for z, cond, fake in self._pending:
                if fake is None:
                    z = self.noise(z.shape[0])
                    fake = self.generator(z, cond)
                g_loss = generator_loss(self.loss_kind, self.judge(fake, cond))
                if self.diversity_weight > 0:
                    g_loss = g_loss + self.diversity_weight * self._mode_seeking(z, fake, cond)
                self._backward(g_loss)
                part = g_loss.detach() / self.accumulate
                g_loss_mean = part if g_loss_mean is None else g_loss_mean + part
        if self._step(opt_g, self.generator, "g_loss", g_loss_mean, buffers_of=[self.discriminator]):
            self.g_steps += 1
            self.ema.update_parameters(self.generator)

    def _mode_seeking(self, z: Tensor, fake: Tensor, cond: Tensor | None) -> Tensor:
        """MSGAN's term for one micro-batch: small when another noise draw for the same condition gives another image."""
        z2 = self.noise(z.shape[0])
        ratio = (fake - self.generator(z2, cond)).abs().mean() / (z - z2).abs().mean()
        self.log("train/diversity", ratio.detach())
        return 1.0 / (ratio + 1e-5)

    def _backward(self, loss: Tensor) -> None:
        """Accumulate this micro-batch's share of the gradient locally; ranks are averaged once per step."""
        block_sync = getattr(self.trainer.strategy, "block_backward_sync", nullcontext)  # only parallel strategies have it
        with block_sync():
            self.manual_backward(loss / self.accumulate)

    def _step(self, opt, net: nn.Module, name: str, loss: Tensor, buffers_of: Sequence[nn.Module]) -> bool:
        """Average over ranks, check for divergence, step; returns False when a non-finite step was skipped."""
        loss = average_over_ranks(net, loss, buffers_of=buffers_of)
        self.log(f"train/{name}", loss, prog_bar=True)
        steps = self.d_steps + self.g_steps + self.skipped_steps
        if self.nonfinite_check_every and steps % self.nonfinite_check_every == 0:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in net.parameters() if p.grad is not None])
            if not bool(torch.isfinite(loss + grad_norm)):  # the one host sync of the guard
                message = (
                    f"non-finite {name} at g_step {self.g_steps} (global_step {self.global_step}): "
                    f"{name}={float(loss):.4g}, grad norm={float(grad_norm):.4g}; the step was not applied. "
                    f"Lower lr_g/lr_d, raise r1_gamma or enable spectral_norm (or set nonfinite='skip')"
                )
                opt.zero_grad(set_to_none=True)
                if self.nonfinite == "raise":
                    raise DivergenceError(message)
                self.skipped_steps += 1
                self.log("train/skipped_steps", float(self.skipped_steps))
                rank_zero_warn(message)
                return False
        opt.step()
        opt.zero_grad(set_to_none=True)
        return True

    # --- checkpoints --------------------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[COUNTERS_KEY] = {"d_steps": self.d_steps, "g_steps": self.g_steps, "skipped_steps": self.skipped_steps}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        counters = checkpoint.get(COUNTERS_KEY, {})
        self.d_steps = counters.get("d_steps", 0)
        self.g_steps = counters.get("g_steps", 0)
        self.skipped_steps = counters.get("skipped_steps", 0)
