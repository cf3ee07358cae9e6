"""Run by tests/test_trainer.py under `accelerate launch --num_processes 2 --cpu`: trains a tiny peft LoRA
with the shared trainer on two processes (gloo) and writes each rank's initial and final trainable weights."""
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import LoraConfig, inject_adapter_in_model
from safetensors.torch import save_file

from sdknobs import load_model
from sdknobs.training.trainer import ParamSubsetMethod, TrainConfig, train


class TinyLora(ParamSubsetMethod):
    """Trains injected LoRA weights; parameters / state_dict / load_state_dict come from ParamSubsetMethod."""

    name = "tiny-lora"

    def __init__(self):
        super().__init__(["lora_"])

    def setup(self, model):
        # a different random LoRA init on each rank: the trainer must broadcast rank 0's weights
        torch.manual_seed(1000 + int(os.environ.get("RANK", "0")))
        inject_adapter_in_model(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                           target_modules=["to_q", "to_k", "to_v", "to_out.0"]), model.unet)
        self.params = {n: p for n, p in model.unet.named_parameters() if "lora_" in n}
        self.start = {n: p.detach().clone() for n, p in self.params.items()}  # before the trainer's broadcast


def main(model_dir: str, data_dir: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    acc = Accelerator(cpu=True)
    out = Path(out_dir)
    method = TinyLora()
    model = load_model(model_dir, device="cpu")
    cfg = TrainConfig(data_dir=data_dir, out=str(out / "final.safetensors"), run_dir=str(out / "run"), steps=3,
                      batch_size=1, grad_accum=2, learning_rate=1e-2, validate_every=0, checkpoint_every=0,
                      progress=False, seed=0)
    res = train(model, method, cfg, accelerator=acc, log=lambda m: None)
    r = acc.process_index
    save_file({k: v.contiguous() for k, v in method.start.items()}, str(out / f"start{r}.safetensors"))
    save_file({k: v.contiguous() for k, v in method.state_dict().items()}, str(out / f"end{r}.safetensors"),
              metadata={"world": str(acc.num_processes), "loss": repr(res.train_loss)})


if __name__ == "__main__":
    main(*sys.argv[1:4])
