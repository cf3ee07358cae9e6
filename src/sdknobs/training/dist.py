"""Device, precision and process glue for the shared trainer: plain PyTorch on one device, or an
accelerate.Accelerator when started by `accelerate launch` with several processes.

No DistributedDataParallel wrapper: the trainable weights live inside modules that methods and
pipelines call directly. Rank 0's trainable weights are broadcast once, and every optimizer step
averages the gradients with one flat all-reduce; Accelerate prepares the optimizer and does fp16
loss scaling; only the main process validates and writes."""
from __future__ import annotations

import os
from contextlib import nullcontext

import torch

from sdknobs.errors import SdknobsError


def accelerator_from_env(cfg):
    """An accelerate.Accelerator when started by `accelerate launch` with several processes, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import Accelerator

    kw = {"cpu": True} if cfg.device == "cpu" else {}
    if cfg.mixed_precision != "no":
        kw["mixed_precision"] = cfg.mixed_precision
    return Accelerator(**kw)


class _Dist:
    """Device, precision and process glue: plain PyTorch, or an accelerate.Accelerator."""

    def __init__(self, accelerator, cfg, model):
        self.acc = accelerator
        self.rank = accelerator.process_index if accelerator else 0
        self.world = accelerator.num_processes if accelerator else 1
        self.main = accelerator.is_main_process if accelerator else True
        self.device = accelerator.device if accelerator else torch.device(cfg.device) if cfg.device else model.device
        mp = accelerator.mixed_precision if accelerator else cfg.mixed_precision
        if mp == "fp16" and self.device.type == "cpu":
            raise SdknobsError("--mixed-precision fp16 needs a GPU; on the CPU use no or bf16")
        self.amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mp)
        self.scaler = torch.amp.GradScaler("cuda") if mp == "fp16" and not accelerator else None

    def autocast(self):
        if self.acc:
            return self.acc.autocast()
        return torch.autocast(self.device.type, dtype=self.amp) if self.amp else nullcontext()

    def backward(self, loss):
        if self.acc:
            self.acc.backward(loss)
        elif self.scaler:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def broadcast(self, params):
        if self.world > 1:
            for p in params:
                torch.distributed.broadcast(p.data, src=0)

    def average_grads(self, params):
        """grad <- mean over processes (one flat all-reduce)."""
        if self.world == 1:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        torch.distributed.all_reduce(flat)
        flat /= self.world
        i = 0
        for p in params:
            p.grad.copy_(flat[i:i + p.numel()].view_as(p.grad))
            i += p.numel()

    def clip(self, opt, params, max_norm: float):
        if self.acc:
            self.acc.clip_grad_norm_(params, max_norm)
            return
        if self.scaler:
            self.scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)  # one fused norm over all tensors, CPU too

    def step(self, opt):
        if self.scaler:
            self.scaler.step(opt)
            self.scaler.update()
        else:
            opt.step()

    def mean(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], device=self.device, dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item() / self.world)

    def barrier(self):
        if self.acc:
            self.acc.wait_for_everyone()

    def scaler_obj(self):
        return self.acc.scaler if self.acc else self.scaler
