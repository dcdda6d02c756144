"""The `ctm` command: train the phases, evaluate a checkpoint, chat with a model that remembers.

    ctm train --preset tiny --output runs/tiny           # the main job (phases 1 -> 4), as recipes/run_all.py
    ctm eval runs/tiny/phase3-continuity/model           # held-out blocks and paragraphs, every readout
    ctm inspect runs/tiny/phase2-thinking/model --blocks 4   # is each thinking block awake? (the block-health gauge)
    ctm chat runs/tiny/phase3-continuity/model --brain my-brain
                                                         # a conversation per run; the brain persists between runs
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path


def _train(args) -> None:
    from .training.main_job import main_job_from_args

    main_job_from_args(args)


def _load_checkpoint(path: Path):
    from transformers import AutoTokenizer

    from .modeling_ctm import CTMForCausalLM

    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a model folder (no config.json)")
    return CTMForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def _eval(args) -> None:
    from .training.data import load_text_dataset, pack_dataset
    from .training.runs import load_preset, training_arguments
    from .training.trainers import CTMTrainer, evaluate_documents

    model, tokenizer = _load_checkpoint(args.checkpoint)
    preset = load_preset(args.preset)
    spec = preset["data"]
    validation = load_text_dataset(spec["source"])["validation"]
    blocks = pack_dataset(validation, tokenizer, spec["block_size"])
    blocks = blocks.select(range(min(spec.get("eval_blocks", len(blocks)), len(blocks))))
    with tempfile.TemporaryDirectory() as scratch:
        trainer = CTMTrainer(model=model, args=training_arguments(preset, 1, Path(scratch)), eval_dataset=blocks)
        metrics = {k: v for k, v in trainer.evaluate().items() if not k.endswith(("_runtime", "_per_second"))}
    paragraphs = list(validation["text"][: spec.get("eval_paragraphs", 40)])
    metrics.update(evaluate_documents(model, tokenizer, paragraphs, prefix="paragraphs"))
    print(json.dumps(metrics, indent=2))


def _chat(args) -> None:
    from .memory.session import CTMOnlineSession, session_from_spec
    from .training.runs import load_preset

    brain = args.brain
    if brain is not None and (brain / "session.json").is_file():
        session = CTMOnlineSession.load(brain)
        print(f"[brain {brain}: {session.conversations} conversations, {len(session.memory or [])} episodes]")
    else:
        model, tokenizer = _load_checkpoint(args.checkpoint)
        session = session_from_spec(model, tokenizer, load_preset(args.preset)["phase4"])
    messages = args.message or iter(lambda: input("you> "), None)
    try:
        for message in messages:
            if message.strip() in ("/quit", "/end"):
                break
            print(f"ctm> {_say(session, message, args.show_confidence, args.unsure_below)}")
    except EOFError:
        pass
    if session.ids is not None:
        report = session.end()
        print(f"[recalled an episode: {report['recalled']}; episodes: {report.get('episodes', 0)}]")
    if brain is not None:
        session.save(brain)
        print(f"[brain saved to {brain}]")


def _say(session, message: str, show_confidence: bool, threshold: float) -> str:
    """One turn; with `show_confidence` the reply's words the confidence head scores below `threshold` are marked
    `[word?]`, and " (unsure)" follows a reply holding one (a rule at generation time, not a trained behaviour)."""
    if not show_confidence:
        return session.say(message)
    from .confidence_ctm import CTMConfidenceRecorder, mark_unsure, mark_words

    model = session.model
    if getattr(model, "confidence_head", None) is None:
        raise ValueError("--show-confidence needs a model with a confidence head (CTMConfig.ctm_confidence_head)")
    before = 0 if session.ids is None else session.ids.shape[1]
    recorder = CTMConfidenceRecorder(model.config, model.confidence_head, last_only=True)
    with model.observing(recorder):
        session.say(message)
    told = session.tokenizer(message, add_special_tokens=False).input_ids
    new = session.ids[0, before + len(told) :].tolist()
    # one entry per forward call: the generation steps are the last len(new) calls
    confidence = [float(c[0, -1]) for c in recorder.confidence[len(recorder.confidence) - len(new) :]]
    pieces = [session.tokenizer.decode([t], skip_special_tokens=True) for t in new]
    return mark_unsure(mark_words(pieces, confidence, threshold), min(confidence, default=1.0), threshold)


def _inspect(args) -> None:
    import torch

    from .gauge import block_health
    from .training.data import load_text_dataset, pack_dataset
    from .training.runs import load_preset

    model, tokenizer = _load_checkpoint(args.checkpoint)
    spec = load_preset(args.preset)["data"]
    # the same held-out blocks `ctm eval` scores, cut to what the model's positions allow
    blocks = pack_dataset(load_text_dataset(spec["source"])["validation"], tokenizer, spec["block_size"])
    blocks = blocks.select(range(min(args.blocks, len(blocks))))
    input_ids = torch.tensor(blocks["input_ids"])[:, : model.config.max_position_embeddings]
    health = block_health(model, input_ids)
    columns = ["block_to_residual", "block_to_mlp", "sync_variation", "entry_share"]
    print(f"{'layer':>5} " + " ".join(f"{c:>17}" for c in columns) + "  tick_change")
    for idx, layer in health["layers"].items():
        cells = " ".join(f"{'-' if layer[c] is None else format(layer[c], '.4g'):>17}" for c in columns)
        print(f"{idx:>5} {cells}  " + " ".join(format(x, ".3g") for x in layer["tick_change"]))
    print("tick CE: " + " ".join(format(x, ".4f") for x in health["tick_ce"]) + f"   served CE: {health['ce']:.4f}")
    if args.carry:
        _print_carry(model, tokenizer, spec, args.carry)


def _print_carry(model, tokenizer, spec: dict, tokens: int) -> None:
    """The long-carry profile (`gauge.carry_profile`) at a few positions of one stream of held-out text."""
    import torch

    from .gauge import carry_profile
    from .training.data import load_text_dataset

    text = "\n\n".join(load_text_dataset(spec["source"])["validation"]["text"])
    stream = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:tokens])[None]
    positions = sorted({p for p in (0, 48, 128, 384, 1000, stream.shape[1] - 1) if p < stream.shape[1]})
    print(f"carried along {stream.shape[1]} tokens (ctm_carry={model.config.ctm_carry!r}):")
    for idx, profile in carry_profile(model, stream).items():
        for name in ("beta_out", "sync_norm", "tick0_convergence"):
            cells = "  ".join(f"@{p}: {profile[name][p].item():.4g}" for p in positions)
            print(f"  layer {idx} {name:>17}  {cells}")


def build_parser() -> argparse.ArgumentParser:
    from .training.main_job import main_job_parser

    parser = argparse.ArgumentParser(prog="ctm", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = main_job_parser(commands.add_parser("train", help="the main job: phases 1 -> 4 on a preset"))
    train.set_defaults(run=_train)
    evaluate = commands.add_parser("eval", help="held-out evaluation of a checkpoint (every readout)")
    evaluate.add_argument("checkpoint", type=Path, help="a model folder (e.g. runs/tiny/phase3-continuity/model)")
    evaluate.add_argument("--preset", default="tiny", help="the preset whose held-out data to score")
    evaluate.set_defaults(run=_eval)
    inspect = commands.add_parser("inspect", help="block-health gauge of each thinking layer on held-out text")
    inspect.add_argument("checkpoint", type=Path, help="a model folder")
    inspect.add_argument("--blocks", type=int, default=4, help="how many held-out blocks to measure on")
    inspect.add_argument("--preset", default="tiny", help="the preset whose held-out data to use")
    inspect.add_argument(
        "--carry", type=int, default=0, metavar="TOKENS",
        help="also follow the carried state along this many held-out tokens read as one stream (beta, tick-0 sync)",
    )  # fmt: skip
    inspect.set_defaults(run=_inspect)
    chat = commands.add_parser("chat", help="talk to a model with its memory stack on")
    chat.add_argument("checkpoint", type=Path, help="a model folder with ctm_carry='chunk' (phase 3 or 4)")
    chat.add_argument("--brain", type=Path, help="folder the brain is loaded from (if it exists) and saved to")
    chat.add_argument("--message", action="append", help="say this instead of reading stdin (repeatable)")
    chat.add_argument("--preset", default="tiny", help="the preset whose phase4 section sets up the memory stack")
    chat.add_argument("--show-confidence", action="store_true",
                      help="mark the reply's words the confidence head scores low as [word?], and add ' (unsure)'")
    chat.add_argument("--unsure-below", type=float, default=0.5, metavar="P",
                      help="the confidence below which --show-confidence marks a word (default 0.5)")
    chat.set_defaults(run=_chat)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, ValueError, OSError) as error:
        print(f"ctm {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
