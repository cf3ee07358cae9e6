"""Training building blocks shared by pretraining (shapes), LoRA and textual inversion.

- `step.diffusion_loss`: the one denoising training step (noise -> t -> x_t -> U-Net -> MSE);
- `data`: folders of captioned images and a deterministic, resumable batch sampler;
- `trainer.train`: the one training engine for LoRA and textual inversion (a `method.Method` says what
  learns; `dist` holds the device / precision / multi-process glue);
- `checkpoint`: atomic save / load of a whole training state (weights, optimizer, step, RNGs);
- `runs`: a run kept whole (checks before the run folder exists, --resume / --overwrite, checkpoints never
  lost to pruning or a non-finite loss, Ctrl-C that saves the last finished step);
- `plots.loss_curve_png`: a loss curve drawn with PIL (no matplotlib).
"""
from sdknobs.training.step import StepTrace, compute_snr, diffusion_loss, make_noise_scheduler

__all__ = ["StepTrace", "compute_snr", "diffusion_loss", "make_noise_scheduler"]
