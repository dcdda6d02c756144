"""The `ctm` command: train the phases, evaluate a checkpoint, chat with a model that remembers.

    ctm train --preset tiny --output runs/tiny           # the main job (phases 1 -> 4), as recipes/run_all.py
    ctm eval runs/tiny/phase3-continuity/model           # held-out blocks and paragraphs, every readout
    ctm inspect runs/tiny/phase2-thinking/model --blocks 4   # is each thinking block awake? (the block-health gauge)
    ctm chat runs/tiny/phase3-continuity/model --brain my-brain
                                                         # a conversation per run; the brain persists between runs
    ctm convert smollm2-135m-instruct --output runs/smollm2-ctm --set ctm_layers=last
                                                         # a pretrained Llama-family checkpoint as a CTM, exactly
    ctm chat runs/smollm2-ctm --system "You are brief."   # a converted chat model, its chat template applied
    ctm chat runs/smollm2-ctm --brain my-brain --message "My sister is called Anna."
    ctm chat runs/smollm2-ctm --brain my-brain --message "What's my sister's name?"
                                                         # facts a message states are kept in the brain
"""

import argparse
import dataclasses
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
    from .training.runs import load_preset
    from .training.trainers import CTMTrainer, evaluate_documents

    config = load_preset(args.preset)  # checked before the model loads
    model, tokenizer = _load_checkpoint(args.checkpoint)
    spec = config.data
    validation = load_text_dataset(spec.source)["validation"]
    blocks = pack_dataset(validation, tokenizer, spec.block_size)
    blocks = blocks.select(range(len(blocks) if spec.eval_blocks is None else min(spec.eval_blocks, len(blocks))))
    with tempfile.TemporaryDirectory() as scratch:
        trainer = CTMTrainer(model=model, args=config.training_arguments(1, Path(scratch)), eval_dataset=blocks)
        metrics = {k: v for k, v in trainer.evaluate().items() if not k.endswith(("_runtime", "_per_second"))}
    paragraphs = list(validation["text"][: spec.eval_paragraphs])
    metrics.update(evaluate_documents(model, tokenizer, paragraphs, prefix="paragraphs"))
    print(json.dumps(metrics, indent=2))


def open_chat_session(checkpoint: Path, brain: Path | None = None, preset: str = "tiny"):
    """The session `ctm chat` talks through: the brain in `brain` if one was saved there, else `checkpoint` with the
    memory stack of `preset`'s phase4 section (none for a model without thinking layers). Prints what it loaded."""
    from .memory.session import CTMOnlineSession
    from .training.phases import freeze_for_thinking, online_session
    from .training.runs import load_preset

    if brain is not None and (brain / "session.json").is_file():
        session = CTMOnlineSession.load(brain)
        facts = f", {session.contextual.writes} facts written" if session.contextual is not None else ""
        print(f"[brain {brain}: {session.conversations} conversations, {len(session.memory or [])} episodes{facts}]")
        return session
    spec = load_preset(preset).phase4
    if spec is None:
        raise ValueError(f"preset={preset!r} has no phase4 section: allowed presets set up a memory stack")
    model, tokenizer = _load_checkpoint(Path(checkpoint))
    spec.session = dataclasses.replace(spec.session, chat_template=tokenizer.chat_template is not None)
    if not model.config.ctm_layer_indices:
        # a converted checkpoint without thinking layers has no thinking state to remember with
        spec = dataclasses.replace(
            spec, memory=None, token_memory="none", plasticity=None, sleep=None,
            session=dataclasses.replace(spec.session, sleep_every=None),
        )  # fmt: skip
        print("[ctm_layers='none': a plain chat (memory, plasticity and sleep need thinking layers: convert with "
              "--set ctm_layers=last --set ctm_carry=chunk --set ctm_chunk_size=1)]")  # fmt: skip
    elif model.config.ctm_carry != "chunk":
        raise ValueError(
            f"{checkpoint} has ctm_carry={model.config.ctm_carry!r}: chat carries thinking state between "
            "turns and needs ctm_carry='chunk' (a phase 3 or 4 model, or ctm convert ... --set ctm_carry=chunk "
            "--set ctm_chunk_size=1)"
        )
    else:
        freeze_for_thinking(model, spec.freeze)  # what sleep may change, as in phase 4
    return online_session(model, tokenizer, spec)


def _chat(args) -> None:
    from transformers import TextStreamer

    brain = args.brain
    session = open_chat_session(args.checkpoint, brain, args.preset)
    fact_memory = args.fact_memory if args.fact_memory is not None else brain is not None
    kept_facts = None
    if fact_memory and session.contextual is None:
        from .memory.statements import chat_fact_memory

        session.contextual = chat_fact_memory(session.model, session.tokenizer, args.fact_layer)
    elif not fact_memory:  # neither written nor read this run; a brain's fact memory is kept as it was
        kept_facts, session.contextual = session.contextual, None
    overrides = {"system": args.system, "max_new_tokens": args.max_new_tokens}
    session.config = dataclasses.replace(session.config, **{k: v for k, v in overrides.items() if v is not None})
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise ValueError(f"--temperature={args.temperature} --top-p={args.top_p} is invalid: allowed values are "
                         "temperature >= 0 (0: greedy) and 0 < top-p <= 1")  # fmt: skip
    decoding = {"do_sample": False}
    if args.temperature > 0:
        decoding = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
    messages = args.message or iter(lambda: input("you> "), None)
    try:
        for message in messages:
            if message.strip() in ("/quit", "/end"):
                break
            # a message that states facts is answered as a statement; the fact memory's read steers the others
            told = remember_statements(session, message) if fact_memory else []
            if args.show_confidence:
                reply = _say(session, message, args.show_confidence, args.unsure_below, read_facts=not told,
                             **decoding)
                print(f"ctm> {reply}")
                continue
            print("ctm> ", end="", flush=True)
            streamer = TextStreamer(session.tokenizer, skip_prompt=True, skip_special_tokens=True)
            session.say(message, streamer=streamer, read_facts=not told, **decoding)
    except EOFError:
        pass
    if session.ids is not None:
        report = session.end()
        print(f"[recalled an episode: {report['recalled']}; episodes: {report.get('episodes', 0)}]")
    if kept_facts is not None:
        session.contextual = kept_facts
    if brain is not None:
        session.save(brain)
        print(f"[brain saved to {brain}]")


def remember_statements(session, message: str) -> list:
    """Write every fact `message` states into the session's fact memory (`memory.statements.find_statements` finds
    them; questions and chit-chat write nothing), one line each. Returns the statements written."""
    from .memory.statements import find_statements

    statements = find_statements(message)
    for statement in statements:
        written = session.tell_fact(*statement.written())
        note = "already known" if written < 1e-3 else "remembered"
        print(f"[{note}: {statement.text!r} (subject {statement.subject_text!r}, value {statement.value_text!r})]")
    return statements


def parse_set_options(pairs: list[str] | None) -> dict:
    """`--set key=value` options as a dict, each value read as a YAML scalar (`last` a string, `3` an int, `[0, 2]` a
    list, `null` None)."""
    import yaml

    fields = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set {pair!r} is invalid: allowed values are key=value (e.g. ctm_layers=last)")
        try:
            fields[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError as error:
            reason = " ".join(str(error).split())
            raise ValueError(f"--set {key.strip()}={value!r} is invalid: not a YAML value ({reason})") from None
    return fields


def _convert(args) -> None:
    import torch

    from .convert import convert_checkpoint
    from .hub.sources import resolve_source

    ctm_fields = parse_set_options(args.set)
    not_ctm = sorted(key for key in ctm_fields if not key.startswith("ctm_"))
    if not_ctm:
        raise ValueError(
            f"--set {', '.join(not_ctm)}: only ctm_* fields can be set (the decoder fields come from the checkpoint)"
        )
    source, gguf_file = resolve_source(args.source)
    if args.gguf_file is not None:
        gguf_file = args.gguf_file
    report = convert_checkpoint(source, args.output, gguf_file=gguf_file, dtype=getattr(torch, args.dtype),
                                **ctm_fields)  # fmt: skip
    config = report["config"]
    print(
        f"converted {args.source} -> {args.output}: {config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"ctm_layers={config.ctm_layers!r}, chat template: {'yes' if report['chat_template'] else 'no'}"
    )
    print(
        f"load {report['load_seconds']:.1f} s, convert {report['convert_seconds']:.1f} s, save "
        f"{report['save_seconds']:.1f} s, peak RSS {report['peak_rss_bytes'] / 1e9:.2f} GB"
    )


UNSURE_TEXT = " (unsure)"  # how a trained marker token is shown, whatever the tokenizer calls it


def _say(session, message: str, show_confidence: bool, threshold: float, **decoding) -> str:
    """One turn; with `show_confidence` the reply's words the confidence head scores below `threshold` are marked
    `[word?]`, and " (unsure)" follows a reply holding one (a rule at generation time). A checkpoint trained to write
    its own marker (`CTMConfig.ctm_unsure_token_id`, `modeling_ctm.training.marker`) gets no rule: the marker shows
    where the model wrote it."""
    if not show_confidence:
        return session.say(message, **decoding)
    from .confidence_ctm import CTMConfidenceRecorder, mark_unsure, mark_words

    model = session.model
    unsure_id = getattr(model.config, "ctm_unsure_token_id", None)
    if unsure_id is not None:
        session.say(message, **decoding)
        pieces = [UNSURE_TEXT if t == unsure_id else session.tokenizer.decode([t], skip_special_tokens=True)
                  for t in session.reply_ids.tolist()]  # fmt: skip
        return "".join(pieces)
    if getattr(model, "confidence_head", None) is None:
        raise ValueError("--show-confidence needs a model with a confidence head (CTMConfig.ctm_confidence_head)")
    recorder = CTMConfidenceRecorder(model.config, model.confidence_head, last_only=True)
    with model.observing(recorder):
        session.say(message, **decoding)
    new = session.reply_ids.tolist()
    # one entry per forward call: the generation steps are the last len(new) calls
    confidence = [float(c[0, -1]) for c in recorder.confidence[len(recorder.confidence) - len(new) :]]
    pieces = [session.tokenizer.decode([t], skip_special_tokens=True) for t in new]
    return mark_unsure(mark_words(pieces, confidence, threshold), min(confidence, default=1.0), threshold)


def _inspect(args) -> None:
    import torch

    from .gauge import block_health
    from .training.data import load_text_dataset, pack_dataset
    from .training.runs import load_preset

    spec = load_preset(args.preset).data
    model, tokenizer = _load_checkpoint(args.checkpoint)
    # the same held-out blocks `ctm eval` scores, cut to what the model's positions allow
    blocks = pack_dataset(load_text_dataset(spec.source)["validation"], tokenizer, spec.block_size)
    blocks = blocks.select(range(min(args.blocks, len(blocks))))
    input_ids = torch.tensor(blocks["input_ids"])[:, : model.config.max_position_embeddings]
    health = block_health(model, input_ids)
    columns = ["block_to_residual", "block_to_mlp", "sync_variation", "entry_share"]
    print(f"{'layer':>5} " + " ".join(f"{c:>17}" for c in columns) + "  tick_change")
    for idx, layer in health["layers"].items():
        cells = " ".join(f"{'-' if layer[c] is None else format(layer[c], '.4g'):>17}" for c in columns)
        print(f"{idx:>5} {cells}  " + " ".join(format(x, ".3g") for x in layer["tick_change"]))
    print(
        "tick CE: " + " ".join(format(x, ".4f") for x in health["tick_ce"])
        + f"   served CE ({model.config.ctm_readout} readout): {health['served_ce']:.4f}"
        + f"   training objective: {health['objective']:.4f}"
    )  # fmt: skip
    if args.carry:
        _print_carry(model, tokenizer, spec, args.carry)


def _print_carry(model, tokenizer, spec, tokens: int) -> None:
    """The long-carry profile (`gauge.carry_profile`) at a few positions of one stream of held-out text."""
    import torch

    from .gauge import carry_profile
    from .training.data import load_text_dataset

    text = "\n\n".join(load_text_dataset(spec.source)["validation"]["text"])
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
    chat.add_argument(
        "checkpoint", type=Path,
        help="a model folder with ctm_carry='chunk' (phase 3 or 4, or converted with thinking layers), or a converted "
        "model with ctm_layers='none' (a plain chat)",
    )  # fmt: skip
    chat.add_argument("--brain", type=Path, help="folder the brain is loaded from (if it exists) and saved to")
    chat.add_argument("--message", action="append", help="say this instead of reading stdin (repeatable)")
    chat.add_argument("--preset", default="tiny", help="the preset whose phase4 section sets up the memory stack")
    chat.add_argument("--system", help="the system prompt (with a chat template; default: the template's own)")
    chat.add_argument("--max-new-tokens", type=int, help="reply length (default: the preset's phase4 session)")
    chat.add_argument("--temperature", type=float, default=0.0, help="0: greedy (the default); > 0: sampling")
    chat.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass, with --temperature > 0")
    chat.add_argument("--show-confidence", action="store_true",
                      help="mark the reply's words the confidence head scores low as [word?], and add ' (unsure)'")
    chat.add_argument("--unsure-below", type=float, default=0.5, metavar="P",
                      help="the confidence below which --show-confidence marks a word (default 0.5)")
    chat.add_argument(
        "--fact-memory", action=argparse.BooleanOptionalAction, default=None,
        help="find the facts each message states ('my sister is called Anna', 'I live in Paris', 'the meeting is on "
        "Tuesday'), write them into the contextual fact memory, let its read steer the replies, and keep it in the "
        "brain (default: on when --brain is given)",
    )  # fmt: skip
    chat.add_argument("--fact-layer", type=int, metavar="N",
                      help="the decoder layer whose state keys a fact's subject, for a new fact memory (default 1)")
    chat.set_defaults(run=_chat)
    convert = commands.add_parser("convert", help="a Llama-family checkpoint as a CTM model (the same function)")
    convert.add_argument(
        "source", help="a model folder, a Hub id, or a named offline source (smollm2-135m-instruct)"
    )  # fmt: skip
    convert.add_argument("--output", type=Path, required=True, help="the folder the converted model is written to")
    convert.add_argument("--gguf-file", help="a GGUF file inside SOURCE to dequantize (named sources set it)")
    convert.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                         help="the converted weights' dtype")  # fmt: skip
    convert.add_argument(
        "--set", action="append", metavar="KEY=VALUE",
        help="a ctm_* config field, value read as YAML (repeatable), e.g. --set ctm_layers=last --set ctm_ticks=4",
    )  # fmt: skip
    convert.set_defaults(run=_convert)
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
