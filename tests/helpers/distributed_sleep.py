"""Run by tests/memory/test_sleep.py under `torchrun --nproc_per_node 2`: a few training steps with a sleep every 2 steps on 2
CPU processes; every rank writes its weights and its heap so the test can check they are identical."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tiny import tiny_blocks, tiny_model, tiny_training_args

from modeling_ctm.memory.sleep import SleepCallback
from modeling_ctm.training.phases import freeze_for_thinking
from modeling_ctm.training.trainers import CTMTrainer


def main(out: Path) -> None:
    torch.manual_seed(0)
    model = tiny_model(ctm_layers="last").train()
    freeze_for_thinking(model)
    data = tiny_blocks(32, 16, seed=0)
    args = tiny_training_args(out / "run", max_steps=4)
    callback = SleepCallback(every=2, capacity=64, n_dreams=3, n_random=3, lr=1e-3, draw=False)
    trainer = CTMTrainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    rank = args.process_index
    if rank == 0:
        save_file({k: v.detach().clone() for k, v in model.state_dict().items()}, str(out / "initial.safetensors"))
    trainer.train()
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    save_file(weights, str(out / f"rank{rank}.safetensors"))
    _, heap = callback.heap.state_dict()
    heap.update(sleeps=callback.sleeps, entered=len(callback.heap.replays), reports=[
        {k: r[k] for k in ("dream_ids", "replay_ids", "consolidation_losses")} for r in callback.reports
    ])  # fmt: skip
    (out / f"rank{rank}.json").write_text(json.dumps(heap, sort_keys=True))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
