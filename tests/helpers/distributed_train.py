"""Run by tests/training/test_phases.py under `torchrun --nproc_per_node 2`: a few training steps on 2 CPU processes, then
every rank writes its weights so the test can check they are identical."""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tiny import tiny_blocks, tiny_model, tiny_training_args

from modeling_ctm.training.phases import freeze_for_thinking
from modeling_ctm.training.trainers import ContinuityTrainer, CTMTrainer


def main(out: Path, phase: str) -> None:
    torch.manual_seed(0)
    carry = dict(ctm_carry="chunk", ctm_chunk_size=4) if phase == "continuity" else {}
    model = tiny_model(ctm_layers="last", **carry).train()
    freeze_for_thinking(model)
    data = tiny_blocks(32, 16, seed=0)
    args = tiny_training_args(out / "run", max_steps=4)
    if phase == "continuity":
        trainer = ContinuityTrainer(model=model, args=args, train_dataset=data, chunk_length=8, gradient_window=1)
    else:
        trainer = CTMTrainer(model=model, args=args, train_dataset=data)
    rank = args.process_index
    if rank == 0:
        save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, str(out / "initial.safetensors"))
        (out / "world_size.txt").write_text(str(args.world_size))
    trainer.train()
    if rank == 0:  # how the processes were joined (DDP via torchrun or an accelerate config, or FSDP)
        (out / "distributed_type.txt").write_text(str(trainer.accelerator.distributed_type.value))
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}  # clone: tied weights
    save_file(weights, str(out / f"rank{rank}.safetensors"))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
