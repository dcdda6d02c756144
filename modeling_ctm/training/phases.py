"""The developmental phases as recipe classes (torchtune's recipe shape): each builds its model (phase 1 from the
recipe config, the others from the previous phase's checkpoint), its data and its Trainer, trains, and ends with the
shared finish step (`finish.finish_phase`: evaluate, sample, card, save). `PHASES` is the one registry.

1. `LanguagePhase`   - a plain transformer (`ctm_layers="none"`) learns the language at full speed; an optional first
                       stage on in-context recall rows only forms the lookup (`phase1.recall_warmup`).
   `BasePhase`       - or, with a `base:` section, a pretrained Llama-family base converted exactly (no training).
2. `ThinkingPhase`   - fresh CTM blocks (the recipe's `thinking:` fields, e.g. `profile: awake`) join the chosen layers
                       of the phase-1 model, beside their MLPs or in their place; the rest is frozen. With
                       `phase2.trunk_cache` the frozen trunk's output is computed once and only the top trains, on
                       the LM loss, distillation from phase 1, or both (`phase2.distillation`).
3. `ContinuityPhase` - the thinking state is carried between chunks (`ctm_carry="chunk"`); `ContinuityTrainer`.
4. `OnlinePhase`     - the phase-3 model lives through scripted conversations with its memory stack on (episodic
                       memory, plasticity, sleep), then is evaluated and saved like the others, its brain beside it.

The model conversions (`start_thinking`, `start_continuity`, `freeze_for_thinking`, `language_config`) live in
`training.transitions` and are re-exported here.
"""

import abc
import json
import time
from pathlib import Path

import torch
from transformers import set_seed

from ..io_ctm import atomic_write
from ..memory.episodic import CTMEpisodicMemory
from ..memory.plasticity import HebbianPlasticity, memory_held_bytes
from ..memory.session import CTMOnlineSession, OnlineConfig
from ..memory.sleep import Consolidator, ReplayHeap
from ..modeling_ctm import CTMForCausalLM
from .allocator import keep_freed_memory
from .distillation import DistillationConfig
from .finish import PhaseResult, finish_phase
from .phase_names import phase_name
from .recipe_config import OnlinePhaseConfig, RecipeConfig, resolve_base, sleep_callback
from .run_data import Data, conversation_script, held_out_recall_rows, phase1_data, recall_warmup_rows
from .trainers import ContinuityTrainer, CTMTrainer, recall_accuracy
from .transitions import FREEZE_CHOICES, freeze_for_thinking, language_config, start_continuity, start_thinking
from .trunk_cache import TrunkCache, TrunkCacheTrainer


__all__ = [
    "FREEZE_CHOICES", "PHASES", "BasePhase", "ContinuityPhase", "LanguagePhase", "OnlinePhase", "PhaseRecipe",
    "ThinkingPhase", "freeze_for_thinking", "get_phase", "language_config", "online_session", "start_continuity",
    "start_thinking",
]  # fmt: skip

RECALL_WARMUP_FOLDER = "recall-warmup"  # inside phase 1's folder: the warm-up stage's Trainer output


def seed_everything(config: RecipeConfig) -> None:
    set_seed(config.seed)
    if config.torch_threads:
        # small matrices gain little from a second thread, and spinning threads on a busy machine cost a lot
        torch.set_num_threads(config.torch_threads)
    if config.keep_freed_memory:
        keep_freed_memory()


class PhaseRecipe(abc.ABC):
    """One phase of a run: `PhaseRecipe(config, run_dir, data, source, resume).run()` -> `PhaseResult`.

    Subclasses set `number` (their name, description and folder come from `phase_names`) and build their model;
    `trainer_class`, `train_data` and `trainer_options` say how it trains."""

    number: int
    trainer_class = CTMTrainer

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        info = phase_name(cls.number)
        cls.name, cls.description, cls.folder, cls.recipe = info.name, info.description, info.folder, info.recipe

    def __init__(self, config: RecipeConfig, run_dir: Path, data: Data, source: Path | None = None,
                 resume: bool = False):  # fmt: skip
        if self.number > 1 and source is None:
            raise ValueError(f"phase {self.number} starts from the previous phase's model folder: source=None is invalid")
        self.config, self.run_dir, self.data, self.source, self.resume = config, Path(run_dir), data, source, resume
        self.spec = config.phase(self.number)

    @property
    def output_dir(self) -> Path:
        return self.run_dir / self.folder

    @abc.abstractmethod
    def build_model(self) -> CTMForCausalLM:
        """The model this phase trains, built from the recipe config or the previous phase's checkpoint."""

    def train_data(self) -> Data:
        return self.data

    def trainer_options(self) -> dict:
        return {}

    def before_training(self, model) -> dict:
        """A stage trained before the phase's own (phase 1's recall warm-up); returns its figures."""
        return {}

    def build_trainer(self, model, data: Data):
        options = self.trainer_options()
        if self.config.sleep is not None:  # the top-level `sleep:` section adds sleep to every training phase
            from ..fmri import draw_thinking_map

            options["callbacks"] = [*options.get("callbacks", []), sleep_callback(self.config.sleep, draw_thinking_map)]
        return self.trainer_class(
            model=model,
            args=self.config.training_arguments(self.number, self.output_dir),
            train_dataset=data.train,
            eval_dataset=data.eval,
            processing_class=data.tokenizer,
            bytes_per_token=data.bytes_per_token,
            **options,
        )

    def run(self) -> PhaseResult:
        seed_everything(self.config)
        model = self.build_model()
        before = self.before_training(model)
        data = self.train_data()  # its description is what the card says the phase trained on
        trainer = self.build_trainer(model, data)
        checkpoints = list(self.output_dir.glob("checkpoint-*"))
        started = time.perf_counter()
        trainer.train(resume_from_checkpoint=True if self.resume and checkpoints else None)
        # a stage's time is training time (the card's), not an evaluation figure (a resumed run would report another)
        seconds = time.perf_counter() - started + before.pop("recall_warmup_seconds", 0.0)
        return finish_phase(trainer, self.number, self.config, self.run_dir, data, seconds, base_model=self.source,
                            extra_metrics=before)  # fmt: skip


class LanguagePhase(PhaseRecipe):
    number = 1

    def build_model(self) -> CTMForCausalLM:
        tokenizer = self.data.tokenizer
        config = self.config.language_config(len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        return CTMForCausalLM(config)

    def train_data(self) -> Data:
        return phase1_data(self.config, self.data)

    def before_training(self, model) -> dict:
        """The recall warm-up (`phase1.recall_warmup`; none: {}): `model` trained in place on recall rows only, with
        the phase's TrainingArguments overlaid with the warm-up's `training`, `max_steps` = `steps`. Returns its
        figures, also kept in `recall-warmup/warmup_results.json`, so a resumed phase 1 past it reports them too."""
        spec = self.spec.recall_warmup
        if spec is None:
            return {}
        folder = self.output_dir / RECALL_WARMUP_FOLDER
        results = folder / "warmup_results.json"
        if self.resume and results.is_file() and list(self.output_dir.glob("checkpoint-*")):
            return json.loads(results.read_text())  # the main stage's checkpoint already holds the warmed-up weights
        args = self.config.training_arguments(1, folder, **spec.training, max_steps=spec.steps)
        n_rows = spec.steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        trainer = CTMTrainer(model=model, args=args, train_dataset=recall_warmup_rows(self.config, self.data.tokenizer, n_rows),
                             processing_class=self.data.tokenizer, bytes_per_token=self.data.bytes_per_token)  # fmt: skip
        started = time.perf_counter()
        trainer.train(resume_from_checkpoint=True if self.resume and list(folder.glob("checkpoint-*")) else None)
        figures = {"recall_warmup_steps": trainer.state.global_step, "recall_warmup_seconds": time.perf_counter() - started}
        rows = held_out_recall_rows(self.config, self.data.tokenizer)
        if rows is not None:  # what the warm-up alone formed, before the text
            figures["recall_accuracy_after_warmup"] = recall_accuracy(model, rows)
        atomic_write(results, lambda tmp: Path(tmp).write_text(json.dumps(figures, indent=2)))  # never half-written
        print(f"phase 1 recall warm-up: {json.dumps(figures)}")
        return figures


def load_base(source: str, dtype: torch.dtype = torch.float32) -> CTMForCausalLM:
    """A base (`base.source`) as a CTM model with no thinking layers: a converted folder loads as it is, a named
    source or a Llama-family folder converts exactly (`CTMForCausalLM.from_llama`)."""
    folder, gguf_file, converted = resolve_base(source)
    if converted:
        model = CTMForCausalLM.from_pretrained(folder, dtype=dtype)
        if model.config.ctm_layer_indices:
            raise ValueError(f"base.source={source!r} is invalid: it has thinking layers (ctm_layers="
                             f"{model.config.ctm_layers!r}); allowed values are a base without them")  # fmt: skip
        return model
    return CTMForCausalLM.from_llama(folder, gguf_file=gguf_file, dtype=dtype)


class BasePhase(PhaseRecipe):
    """Phase 1 from a pretrained base (`base:`): converted exactly, not trained; evaluated, sampled and carded like
    a trained phase 1, so phases 2-4 start from its folder."""

    number = 1

    def build_model(self) -> CTMForCausalLM:
        return load_base(self.config.base.source)

    def run(self) -> PhaseResult:
        seed_everything(self.config)
        started = time.perf_counter()
        model = self.build_model()
        seconds = time.perf_counter() - started
        trainer = CTMTrainer(model=model, args=self.config.training_arguments(1, self.output_dir),
                             eval_dataset=self.data.eval, processing_class=self.data.tokenizer,
                             bytes_per_token=self.data.bytes_per_token)  # fmt: skip
        return finish_phase(trainer, 1, self.config, self.run_dir, self.data, 0.0, base_model=None,
                            extra_metrics={"base_load_seconds": seconds})  # fmt: skip


class ThinkingPhase(PhaseRecipe):
    number = 2
    caches = None  # (train, held-out) trunk caches, once `before_training` has built them; None: the plain Trainer

    def build_model(self) -> CTMForCausalLM:
        model = start_thinking(self.source, **self.config.thinking_fields())
        counts = freeze_for_thinking(model, self.spec.freeze)
        print(f"phase 2: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen parameters")
        return model

    def before_training(self, model) -> dict:
        """With `phase2.trunk_cache`: the trunk below the first thinking layer, frozen, run once over the training
        and held-out blocks; with distillation, phase 1's top-k next-token log-probabilities cached beside it.
        Phase 1 is its own teacher where the start is exact (the blocks beside their MLPs); otherwise its
        checkpoint is loaded as the teacher (a second pass over the blocks)."""
        if not self.spec.trunk_cache:
            return {}
        spec = self.spec
        cache_dir = Path(spec.cache_dir) if spec.cache_dir else self.run_dir / "trunk-cache"
        teacher = None
        if spec.distillation != "lm" and model.config.ctm_mlp != "keep":
            teacher = CTMForCausalLM.from_pretrained(self.source).eval().requires_grad_(False)
        started = time.perf_counter()
        train = TrunkCache.build(model, torch.tensor(self.data.train["input_ids"]), cache_dir, teacher=teacher,
                                 distill_top_k=0 if spec.distillation == "lm" else spec.distill_top_k)  # fmt: skip
        held_out = TrunkCache.build(model, torch.tensor(self.data.eval["input_ids"]), cache_dir, distill_top_k=0)
        self.caches = (train, held_out)
        return {"trunk_cache_seconds": time.perf_counter() - started}

    def build_trainer(self, model, data: Data):
        if self.caches is None:
            return super().build_trainer(model, data)
        if self.config.sleep is not None:
            raise ValueError("sleep during training is invalid with phase2.trunk_cache: true (the sleep replay reads "
                             "token ids, the cached trainer the trunk's stream); allowed: sleep: null")  # fmt: skip
        train, held_out = self.caches
        mix = {"lm": DistillationConfig(1.0, 0.0), "kl": DistillationConfig(0.0, 1.0),
               "lm_kl": DistillationConfig(1.0, 1.0)}[self.spec.distillation]  # fmt: skip
        return TrunkCacheTrainer(
            model=model,
            args=self.config.training_arguments(self.number, self.output_dir),
            train_dataset=train,
            eval_dataset=held_out,
            processing_class=data.tokenizer,
            bytes_per_token=data.bytes_per_token,
            start_layer=train.start_layer,
            distillation=mix,
        )


class ContinuityPhase(PhaseRecipe):
    number = 3
    trainer_class = ContinuityTrainer

    def build_model(self) -> CTMForCausalLM:
        model = start_continuity(self.source, chunk_size=self.spec.chunk_size)
        counts = freeze_for_thinking(model, self.spec.freeze)
        print(f"phase 3: {counts['trainable']:,} trainable, {counts['frozen']:,} frozen parameters")
        return model

    def trainer_options(self) -> dict:
        return {"chunk_length": self.spec.chunk_length, "gradient_window": self.spec.gradient_window,
                "cut_attention": self.spec.cut_attention}  # fmt: skip


def online_session(model, tokenizer, spec: OnlinePhaseConfig, session: OnlineConfig | None = None) -> CTMOnlineSession:
    """The session `phase4` describes: episodic memory, plasticity, sleep and the token memory (added to `model` in
    place, empty), each optional. `session` replaces `spec.session`."""
    memory = plasticity = heap = consolidator = None
    if spec.token_memory == "token":  # a checkpoint from before phase 4 gets the memory, empty
        model.add_token_memory()
    if spec.memory is not None:
        memory = CTMEpisodicMemory.for_model(model.config, **spec.memory)
    if spec.plasticity is not None:
        plasticity = HebbianPlasticity(model, spec.plasticity)
    if spec.sleep is not None:
        heap = ReplayHeap(capacity=spec.sleep.capacity, admission=spec.sleep.admission)
        consolidator = Consolidator(model, spec.sleep.consolidation)
    return CTMOnlineSession(model, tokenizer, memory, plasticity, heap, consolidator, session or spec.session)


def live_through(session: CTMOnlineSession, script: list[list[str]]) -> dict:
    """Run the conversations; returns the reports, the tokens and the wall time."""
    started, reports = time.perf_counter(), []
    for conversation in script:
        for message in conversation:
            session.say(message)
        reports.append(session.end())
    tokens = sum(r["tokens"] for r in reports)
    return {"seconds": time.perf_counter() - started, "tokens": tokens, "reports": reports}


class OnlinePhase(PhaseRecipe):
    """The phase-3 model lives through the scripted conversations with its memory stack on, then is evaluated,
    sampled and saved like the other phases, its brain (`session.save`) beside the checkpoint. The same script is run
    once with the memory stack off, on a fresh copy, to state what the stack costs per token. A phase of conversations
    has no Trainer checkpoints: a rerun replays the same script exactly."""

    number = 4

    def build_model(self) -> CTMForCausalLM:
        model = CTMForCausalLM.from_pretrained(self.source)
        freeze_for_thinking(model, self.spec.freeze)  # sleep consolidates what phases 2-3 trained
        return model

    def run(self) -> PhaseResult:
        seed_everything(self.config)
        script = conversation_script(self.config, self.data)
        tokenizer = self.data.tokenizer
        bare_session = OnlineConfig(**{**vars(self.spec.session), "sleep_every": None})  # the same script, no stack
        off = live_through(CTMOnlineSession(self.build_model(), tokenizer, config=bare_session), script)
        session = online_session(self.build_model(), tokenizer, self.spec)
        on = live_through(session, script)
        session.save(self.output_dir / "brain")
        trainer = CTMTrainer(model=session.model, args=self.config.training_arguments(4, self.output_dir),
                             eval_dataset=self.data.eval, processing_class=tokenizer,
                             bytes_per_token=self.data.bytes_per_token)  # fmt: skip

        def save_memory(target: Path):  # the episodic memory travels (and is pushed) with the checkpoint
            if session.memory is not None:
                session.memory.save_pretrained(target / "episodic_memory")

        return finish_phase(trainer, 4, self.config, self.run_dir, self.data, on["seconds"], base_model=self.source,
                            extra_metrics=memory_figures(session, on, off), write_extra=save_memory)  # fmt: skip


def memory_figures(session: CTMOnlineSession, on: dict, off: dict) -> dict:
    """What phase 4's memory stack did and cost: recall, episodes, edits, sleeps, memory held, time per token."""
    reports = on["reports"]
    brain_bytes = 0
    if session.memory is not None:
        brain_bytes += session.memory.bytes_per_episode * session.memory.capacity
    if session.plasticity is not None:
        brain_bytes += memory_held_bytes(session.plasticity)
    if session.heap is not None:
        brain_bytes += session.heap.memory_bytes()
    edits = [r["plasticity"] for r in reports if "plasticity" in r]
    ratios = [abs(v - 1) for e in edits if e.get("applied") for v in e["norm_ratio"].values()]
    return {
        "online_conversations": len(reports),
        "online_tokens": on["tokens"],
        "online_recall_rate": sum(r["recalled"] for r in reports) / len(reports),
        "online_episodes": reports[-1].get("episodes", 0),
        "online_edits_applied": sum(bool(e.get("applied")) for e in edits),
        "online_edits_skipped": sum(bool(e.get("skipped")) for e in edits),
        "online_max_norm_drift": max(ratios, default=0.0),
        "online_sleeps": sum("sleep" in r for r in reports),
        "online_brain_bytes": brain_bytes,
        "online_ms_per_token_on": 1000 * on["seconds"] / on["tokens"],
        "online_ms_per_token_off": 1000 * off["seconds"] / off["tokens"],
    }


PHASES: dict[int, type[PhaseRecipe]] = {cls.number: cls for cls in (LanguagePhase, ThinkingPhase, ContinuityPhase,
                                                                     OnlinePhase)}  # fmt: skip


def get_phase(number: int, config: RecipeConfig | None = None) -> type[PhaseRecipe]:
    """The recipe class of phase `number`; phase 1 of a config with a `base:` section is `BasePhase`."""
    if number not in PHASES:
        raise ValueError(f"phase={number!r} is invalid: allowed values are {sorted(PHASES)}")
    if number == 1 and config is not None and config.base is not None:
        return BasePhase
    return PHASES[number]
