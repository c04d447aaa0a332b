"""nnU-Net glue: the base trainer that runs the PUMIT segmentation network inside the stock nnU-Net loop.

It only overrides nnU-Net's hooks and delegates to the library: plans adaptation (:mod:`pumit_nnunet.nnunet.plans`),
the network (:class:`pumit_nnunet.models.segmentation.PumitSegNet`), the optimiser and schedule
(:mod:`pumit_nnunet.optim`) and pre-trained weights (:mod:`pumit_nnunet.nnunet.pretrained`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from torch import nn

from pumit_nnunet.checkpoints.load import unwrap_network
from pumit_nnunet.nnunet.plans import PUMIT_NETWORK, adapt_and_fit
from pumit_nnunet.nnunet.recipe import RecipeSettings, recipe_arch_overrides
from pumit_nnunet.nnunet.recipe_trainer import RecipeHooks, recipe_from_plans
from pumit_nnunet.optim import WarmupDecaySchedule, build_adamw
from pumit_nnunet.pretrain.precision import autocast_context, default_precision

if TYPE_CHECKING:
    from pumit_nnunet.nnunet.memory_fit import FitDecision

__all__ = ["PumitTrainerBase"]


class PumitTrainerBase(RecipeHooks, nnUNetTrainer):
    """Common behaviour of every PUMIT trainer; subclasses set the class attributes below (a few lines each).

    Class attributes:
        vit_size: ViT preset (``T``, ``S``, ``B``, ``L``).
        pumit_epochs / pumit_iterations / pumit_val_iterations: schedule length (PUMIT fine-tunes 50k steps).
        warmup_fraction: share of all iterations spent in linear warm-up (PUMIT: 5k of 50k).
        patch_cap: per-axis upper bound on the (token-aligned) patch size, for small machines.
        batch_size_override: replaces the plan's batch size.
        grad_clip: gradient-norm clipping.
        arch_overrides: further network keyword arguments written into the plans (e.g. decoder channels).
        test_time_mirroring: allow nnU-Net's mirroring test-time augmentation at prediction.
        checkpoint_every: epochs between ``checkpoint_latest.pth`` writes (nnU-Net's ``save_every``).
        recipe: ``"nnunet"`` or ``"authors"`` forces a fine-tuning recipe; None (default) takes the plans' protocol
            (``pumit_protocol.recipe``), else nnU-Net's. See :mod:`pumit_nnunet.nnunet.recipe`.

    Subclasses must not override ``__init__``: nnU-Net records the constructor's arguments by inspecting its
    signature, so variants are expressed through these attributes only.
    """

    vit_size: ClassVar[str] = "B"
    pumit_epochs: ClassVar[int] = 200
    pumit_iterations: ClassVar[int] = 250
    pumit_val_iterations: ClassVar[int] = 50
    warmup_fraction: ClassVar[float] = 0.1
    patch_cap: ClassVar[Sequence[int] | None] = None
    batch_size_override: ClassVar[int | None] = None
    base_lr: ClassVar[float] = 1e-4
    base_weight_decay: ClassVar[float] = 0.05
    grad_clip: ClassVar[float] = 1.0
    arch_overrides: ClassVar[dict[str, Any] | None] = None
    test_time_mirroring: ClassVar[bool] = True
    checkpoint_every: ClassVar[int | None] = None
    recipe: ClassVar[str | None] = None

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self.recipe_settings, self.memory_fit = self.fit_plans(plans, configuration, dataset_json)
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.print_to_log_file(self.memory_fit.message(f"{configuration}, ViT-{self.vit_size}"))
        self.initial_lr = self.base_lr
        self.weight_decay = self.base_weight_decay
        self.num_epochs = self.pumit_epochs
        self.num_iterations_per_epoch = self.pumit_iterations
        self.num_val_iterations_per_epoch = self.pumit_val_iterations
        self.schedule_kind, self.min_lr_ratio = "poly", 0.0
        self._apply_protocol()
        self.enable_deep_supervision = True
        if self.checkpoint_every is not None:
            self.save_every = self.checkpoint_every
        self._pretrained_route()

    @classmethod
    def fit_plans(cls, plans: dict, configuration: str, dataset_json: dict) -> tuple[RecipeSettings, FitDecision]:
        """Adapt ``plans`` (in place) as this trainer trains them; ``(RecipeSettings, FitDecision)``. The one place
        the trainer's patch, batch and network are decided (the demo's nnU-Net twin copies its patch and batch)."""
        # the recipe fixes parts of the network (decoder options, input map): decide it before the plans are adapted
        settings = recipe_from_plans(plans, configuration, cls.recipe)
        # stock plans: the memory-fitting rule picks patch, batch and activation checkpointing (PUMIT_GPU_MEMORY_GB)
        decision = adapt_and_fit(plans, configuration, cls.vit_size, dataset_json, cls.patch_cap,
                                 cls.batch_size_override, recipe_arch_overrides(settings, cls.arch_overrides))
        return settings, decision

    def _apply_protocol(self) -> None:
        """A plan preset's ``pumit_protocol`` (e.g. BTCV: 50k steps, lr 1e-4, 5k warm-up, cosine) sets the schedule.

        Variants that shorten the run (``_smoke``, ``_5epochs``...) keep their length: they exist to be short."""
        from pumit_nnunet.nnunet.presets import protocol_from_plans

        protocol = protocol_from_plans(self.configuration_manager.configuration)
        if protocol is None:
            return
        if self.pumit_epochs == PumitTrainerBase.pumit_epochs and self.pumit_iterations == PumitTrainerBase.pumit_iterations:
            self.num_epochs, self.num_iterations_per_epoch = protocol.epochs, protocol.iterations_per_epoch
        self.initial_lr, self.weight_decay, self.grad_clip = protocol.learning_rate, protocol.weight_decay, protocol.grad_clip
        self.warmup_fraction = protocol.warmup_iterations / protocol.iterations
        self.schedule_kind, self.min_lr_ratio = protocol.schedule, protocol.min_learning_rate / protocol.learning_rate
        self.print_to_log_file(f"PUMIT protocol from the plans: {protocol}")

    # -- network ------------------------------------------------------------------------------------------------
    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels: int,
                                   num_output_channels: int, enable_deep_supervision: bool = True) -> nn.Module:
        name = configuration_manager.network_arch_class_name
        if name != PUMIT_NETWORK:
            raise ValueError(
                f"the plans configuration describes {name!r}, not the PUMIT network; PUMIT trainers adapt stock plans "
                "when they start training, so train with -tr PumitTrainer (or a variant) before predicting with it"
            )
        return get_network_from_plans(name, configuration_manager.network_arch_init_kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import, num_input_channels,
                                      num_output_channels, allow_init=True, deep_supervision=enable_deep_supervision)

    def _get_deep_supervision_scales(self):
        if not self.enable_deep_supervision:
            return None
        from pumit_nnunet.models.segmentation import deep_supervision_scales

        kwargs = self.configuration_manager.network_arch_init_kwargs
        return deep_supervision_scales(len(kwargs["patch_size"]), kwargs["aniso_d"])

    def on_train_start(self):
        # weights recorded in the plans seed a *fresh* run only: not --c with a checkpoint (current_epoch > 0),
        # not --val (no training), and not when -pretrained_weights already loaded weights (it wins)
        from pumit_nnunet.nnunet.pretrained import WEIGHTS_LOADED_FLAG, load_pretrained_from_plans

        if not self.was_initialized:
            self.initialize()
        from pumit_nnunet.nnunet.checkpointing import trainer_refuses_bad_input

        if self.current_epoch == 0 and not getattr(unwrap_network(self.network), WEIGHTS_LOADED_FLAG, False):
            with trainer_refuses_bad_input("pre-trained weights recorded in the plans not loaded"):
                load_pretrained_from_plans(self)
        super().on_train_start()

    def _pretrained_route(self) -> None:
        from pumit_nnunet.nnunet.pretrained import PLANS_KEY, install_pretrained_weights_route

        install_pretrained_weights_route(self.configuration_manager.configuration.get(PLANS_KEY))

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, do_dummy_2d, initial_patch, mirror_axes = super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.test_time_mirroring:
            self.inference_allowed_mirroring_axes = None
        return rotation, do_dummy_2d, initial_patch, mirror_axes

    # -- optimisation -------------------------------------------------------------------------------------------
    @property
    def total_iterations(self) -> int:
        return self.num_epochs * self.num_iterations_per_epoch

    def configure_optimizers(self):
        optimizer = build_adamw(unwrap_network(self.network), self.initial_lr, self.weight_decay)
        warmup = int(round(self.warmup_fraction * self.total_iterations))
        schedule = WarmupDecaySchedule(optimizer, warmup, self.total_iterations, self.schedule_kind, self.min_lr_ratio)
        return optimizer, schedule

    def on_train_epoch_start(self):
        # the schedule is stepped per iteration (nnU-Net's steps per epoch and flattens the groups' lrs)
        self.network.train()
        self._iteration = self.current_epoch * self.num_iterations_per_epoch
        self.lr_scheduler.set_step(self._iteration)
        self.print_to_log_file("")
        self.print_to_log_file(f"Epoch {self.current_epoch}")
        lr = self.optimizer.param_groups[0]["lr"]
        self.print_to_log_file(f"Current learning rate: {np.round(lr, decimals=7)}")
        self.logger.log("lrs", lr, self.current_epoch)

    def _autocast(self):
        return autocast_context(self.device, default_precision(self.device))

    def train_step(self, batch: dict) -> dict:
        self.lr_scheduler.set_step(getattr(self, "_iteration", 0))
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) else target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            loss = self.loss(self.network(data), target)
        if self._skip_nonfinite(loss):  # keep the last good weights; stop after too many in a row
            self._iteration = getattr(self, "_iteration", 0) + 1
            return {"loss": loss.detach().cpu().numpy()}
        use_scaler = self.grad_scaler is not None and not torch.cuda.is_bf16_supported()
        if use_scaler:  # fp16 only; bf16 needs no loss scaling
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip)
        if use_scaler:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        self._iteration = getattr(self, "_iteration", 0) + 1
        return {"loss": loss.detach().cpu().numpy()}

    def _skip_nonfinite(self, loss: torch.Tensor) -> bool:
        """Whether to skip this step (non-finite loss); stops the run after ``PUMIT_MAX_NONFINITE_STEPS`` in a row."""
        from pumit_nnunet.nnunet.checkpointing import TrainerRefusal
        from pumit_nnunet.nnunet.loss_guard import NonFiniteLossGuard

        if getattr(self, "_loss_guard", None) is None:
            self._loss_guard = NonFiniteLossGuard(log=self.print_to_log_file)
        try:
            return self._loss_guard.skip(loss, getattr(self, "_iteration", 0))
        except TrainerRefusal as error:
            self.print_to_log_file(str(error))
            for loader in (self.dataloader_train, self.dataloader_val):  # background workers must not outlive us
                if hasattr(loader, "_finish"):
                    loader._finish()
            raise

    # -- checkpoints --------------------------------------------------------------------------------------------
    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint with plain values only (loads with ``weights_only=True``), written atomically (nnU-Net
        writes in place: an interruption mid-write would destroy the last good checkpoint), never from NaN weights."""
        from pumit_nnunet.checkpoints.format import atomic_torch_save
        from pumit_nnunet.nnunet.checkpointing import require_finite_network, results_checkpoint

        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)  # writes nothing (logs why on rank 0)
        require_finite_network(self.network, filename)
        atomic_torch_save(results_checkpoint(self), filename)

    def load_checkpoint(self, filename_or_checkpoint: str | dict) -> None:
        """``--c`` / ``--val``: read weights-only (a crafted file cannot run code) and refuse non-finite weights."""
        from pumit_nnunet.nnunet.checkpointing import read_results_checkpoint, restore_results_checkpoint

        checkpoint = filename_or_checkpoint
        if not isinstance(checkpoint, dict):  # refuse a bad file before building anything
            self.print_to_log_file(f"PUMIT: loading {checkpoint} weights-only")
            checkpoint = read_results_checkpoint(checkpoint, self.device)
        if not self.was_initialized:
            self.initialize()
        restore_results_checkpoint(self, checkpoint)
