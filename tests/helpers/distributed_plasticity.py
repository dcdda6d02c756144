"""Run by tests/memory/test_plasticity.py under `torchrun --nproc_per_node 2`: a few training steps with the Hebbian callback
on 2 CPU processes with different data shards; every rank writes its weights and counters."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tiny import tiny_blocks, tiny_model, tiny_training_args

from modeling_ctm.memory.plasticity import HebbianPlasticityCallback, PlasticityConfig
from modeling_ctm.training.trainers import CTMTrainer


def main(out: Path) -> None:
    torch.manual_seed(0)
    model = tiny_model(ctm_layers="last").train()
    data = tiny_blocks(32, 16, seed=0)
    args = tiny_training_args(out / "run", max_steps=4, learning_rate=1e-3)
    callback = HebbianPlasticityCallback(PlasticityConfig(learning_rate=50.0, synapse_learning_rate=0.5), 1)
    trainer = CTMTrainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()
    rank = args.process_index
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    save_file(weights, str(out / f"rank{rank}.safetensors"))
    report = {"edits_applied": callback.rule.edits_applied, "world_size": args.world_size}
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
