"""Run by tests/training/test_fsdp.py: phase-2 training (frozen trunk, CTM blocks learning) of a tiny converted Llama
through `CTMTrainer`, either alone (`python distributed_fsdp.py ...`) or under
`accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2 ...` on CPU processes over gloo.

    distributed_fsdp.py OUT PHASE1_FOLDER MAX_STEPS [--resume CHECKPOINT] [--as-launched] [--continuity]

`--continuity` trains phase 3's way instead: the thinking state carried across chunks of 8 tokens by
`ContinuityTrainer` (several forwards and backwards per step through one FSDP2 model).

The global batch is 4 sequences however many processes share it. Rank 0 writes `OUT/log_history.json` (the Trainer's
logs), `OUT/how.json` (how accelerate joined the processes and what the model became) and the final model twice,
with `trainer.save_model(OUT/final)` and with `model.save_pretrained(OUT/saved_by_every_rank)` called by every rank; checkpoints go to
`OUT/run/checkpoint-*` every 2 steps.

accelerate 1.16 turns an FSDP launch into FSDP only on accelerator devices: `AcceleratorState` switches to
`DistributedType.FSDP` in its MULTI_GPU/XPU/NPU/... branch, and CPU processes stay `MULTI_CPU`, where the Trainer's
model is wrapped in DDP (and, with the config's cpu-RAM-efficient loading, rank 1's model was built on the meta device
for FSDP to fill, so DDP fails: `--as-launched` shows it). Unless `--as-launched`, `fsdp_on_cpu` does on CPU what that branch does on GPUs (and nothing
else), so accelerate's own FSDP2 path runs: `fsdp2_prepare_model` (`fully_shard` per `CTMDecoderLayer`, then the
root), the gathered full state dict for saving, and the sharded optimizer state of its checkpoints."""

import json
import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from tiny import tiny_blocks, tiny_training_args

from modeling_ctm.training.phases import freeze_for_thinking, start_thinking
from modeling_ctm.training.trainers import ContinuityTrainer, CTMTrainer


GLOBAL_BATCH = 4
# decays start inside their clamp range [0, 15], off its edge at 0 where data-parallel rounding decides whether a
# nearly cancelling gradient passes (see tests/training/test_fsdp.py)
THINKING = dict(ctm_ticks=2, ctm_memory_length=3, ctm_n_synch_out=16, ctm_n_synch_action=8, ctm_nlm_hidden_size=4,
                ctm_synapse_depth=2, ctm_decay_init_range=[0.5, 1.0])  # fmt: skip


def fsdp_on_cpu() -> None:
    """What `AcceleratorState.__init__` does for an FSDP launch on GPUs, done for CPU processes: the process group
    (gloo), ranks and device stay as accelerate set them up for MULTI_CPU; only the distributed type and the FSDP
    plugin (read from the launcher's FSDP_* environment, as `Accelerator` does) change."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        raise RuntimeError(
            "fsdp_on_cpu needs an FSDP launch: accelerate launch --config_file recipes/accelerate/fsdp.yaml"
        )
    plugin = FullyShardedDataParallelPlugin()
    state = Accelerator(cpu=True, fsdp_plugin=plugin).state  # the Trainer's Accelerator joins this shared state
    if state.distributed_type != DistributedType.MULTI_CPU:
        raise RuntimeError(
            f"expected accelerate to fall back to MULTI_CPU on CPU processes, got {state.distributed_type}"
        )
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP


def main(out: Path, phase1: Path, max_steps: int, resume: str | None, as_launched: bool, continuity: bool) -> None:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args = tiny_training_args(
        out / "run", max_steps=max_steps, per_device_train_batch_size=GLOBAL_BATCH // world_size,
        save_strategy="steps", save_steps=2, lr_scheduler_type="linear",
    )  # fmt: skip
    if world_size > 1 and not as_launched:
        args.device  # noqa: B018 - sets up accelerate's PartialState (gloo, MULTI_CPU) the way the Trainer would
        fsdp_on_cpu()
    torch.manual_seed(0)
    carry = dict(ctm_carry="chunk", ctm_chunk_size=4) if continuity else {}
    model = start_thinking(phase1, ctm_layers="last", **THINKING, **carry).train()
    freeze_for_thinking(model)
    data = tiny_blocks(32, 16, seed=0)
    if continuity:
        trainer = ContinuityTrainer(model=model, args=args, train_dataset=data, chunk_length=8, gradient_window=1)
    else:
        trainer = CTMTrainer(model=model, args=args, train_dataset=data)
    trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(str(out / "final"))
    # what a recipe does after training: every process calls the model's own save_pretrained
    trainer.model.save_pretrained(str(out / "saved_by_every_rank"))
    if args.process_index == 0:
        prepared = trainer.model_wrapped
        how = {
            "world_size": args.world_size,
            "distributed_type": trainer.accelerator.distributed_type.value,
            "is_fsdp2": bool(trainer.accelerator.is_fsdp2),
            "wrapper": type(prepared).__name__,
            # FSDP2 turns each unit's class into FSDP<class> and its parameters into DTensors sharded on dim 0
            "fsdp_units": sorted(
                {type(m).__name__ for m in trainer.model.modules() if type(m).__name__.startswith("FSDP")}
            ),
            "dtensor_parameters": sum(type(p).__name__ == "DTensor" for p in trainer.model.parameters()),
            "parameters": sum(1 for _ in trainer.model.parameters()),
            "local_shapes": {
                name: list(getattr(p, "to_local", lambda p=p: p)().shape)
                for name, p in trainer.model.named_parameters()
                if name.endswith(("thinking.out_proj.weight", "self_attn.q_proj.weight"))
            },
            "trainable": sorted(n for n, p in trainer.model.named_parameters() if p.requires_grad),
        }
        (out / "how.json").write_text(json.dumps(how, indent=1))
        (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=1))


if __name__ == "__main__":
    argv = sys.argv[1:]
    resume = argv[argv.index("--resume") + 1] if "--resume" in argv else None
    main(Path(argv[0]), Path(argv[1]), int(argv[2]), resume, "--as-launched" in argv, "--continuity" in argv)
