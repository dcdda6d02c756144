"""The typed recipe config: a training preset (YAML) parsed once into dataclasses, checked whole before any model is
built or any text tokenized.

    config = load_recipe_config("tiny", overrides=["phase3.training.max_steps=50"])
    config.phase3.chunk_size, config.thinking_fields(), config.training_arguments(3, output_dir)

What it takes from its anchors:
- transformers' `HfArgumentParser.parse_yaml_file(..., allow_extra_keys=False)`: dataclasses are the schema, their
  field types check the values, an unknown key is an error. Here the dataclasses nest (a phase holds its stages), and
  every error names the full key path (`phase3.training.max_stepz: unknown key; did you mean 'max_steps'?`).
- torchtune's config: one YAML per recipe, dotted `key.path=value` overrides from the command line, the config
  validated before the recipe starts.

Every default lives in one place: the field of the dataclass that owns it. The phase-4 session is made of the
memory package's own dataclasses (`OnlineConfig`, `PlasticityConfig`, `ConsolidationConfig`), so their defaults and
checks are theirs. Each phase's `TrainingArguments` is an overlay (the shared `training:` section, then the phase's
`training:`); it is constructed once at load time, so a bad field fails before step 0.

Sleep's replay admission has one default for both places it appears (the top-level `sleep:` section, sleep during
training, and `phase4.sleep`, sleep between conversations): `SLEEP_ADMISSION = "reservoir"`, the one that let sleep
reduce forgetting in `eval/sleep_retention.py`. The tiny preset's phase 4 states `admission: loss`, what it measured.

`parse_set` is the one `--set` parser: the recipes' dotted `--set a.b=v` (`apply_overrides`) and the experiments'
`--set field=v` (`eval/harness.py` imports this parser) read the value the same way, as a YAML scalar
(`3`, `0.5`, `1e-3`, `true`, `null`, `[1, 2]`, or a plain string).
"""

import dataclasses
import difflib
import inspect
import json
import re
import tempfile
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from transformers import TrainingArguments

from ..configuration_ctm import CTM_PROFILES, CTM_TOKEN_MEMORY_CHOICES, CTMConfig, ctm_profile
from ..memory.plasticity import PlasticityConfig
from ..memory.session import OnlineConfig
from ..memory.sleep import ConsolidationConfig, ReplayHeap, SleepCallback
from .data import RECALL_LOSS_ON
from .transitions import FREEZE_CHOICES


PRESETS = Path(__file__).resolve().parent.parent / "presets"
SLEEP_ADMISSION = "reservoir"


class RecipeConfigError(ValueError):
    """A preset key or value the recipe config does not take; the message names its key path."""


# -- YAML scalars -------------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-3` as a string (its floats need a dot); YAML 1.2, JSON and Python read a float."""


_Loader.add_implicit_resolver(  # tried after YAML's own int and float patterns
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789")
)


def read_yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def yaml_scalar(text: str):
    """A `--set` value: what YAML reads (`3`, `0.5`, `1e-3`, `true`, `null`, `[1, 2]`), else the text itself."""
    try:
        return read_yaml(text)
    except yaml.YAMLError:
        return text


# -- typed parsing ------------------------------------------------------------------------------------------------------


def _suggest(key: str, allowed) -> str:
    close = difflib.get_close_matches(str(key), [str(a) for a in allowed], n=1)
    return f"did you mean {close[0]!r}? " if close else ""


def _describe(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return f"one of {list(args)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    if origin in (list, tuple) or tp in (list, tuple):
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def coerce(tp, value, path: str):
    """`value` (as YAML read it) checked against the type annotation `tp`; returns it converted (int -> float,
    list -> tuple, mapping -> dataclass). Raises `RecipeConfigError` naming `path`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    bad = RecipeConfigError(f"{path}={value!r} is invalid: allowed values are {_describe(tp)}")
    if tp is Any or tp is object:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        members = [a for a in args if a is not type(None)]
        if isinstance(value, dict) and any(dataclasses.is_dataclass(a) for a in members):
            return build(next(a for a in members if dataclasses.is_dataclass(a)), value, path)  # its own key errors
        for arg in members:
            try:
                return coerce(arg, value, path)
            except RecipeConfigError:
                pass
        raise bad
    if origin is Literal:
        if value in args:
            return value
        raise RecipeConfigError(f"{path}={value!r} is invalid: allowed values are {list(args)}")
    if dataclasses.is_dataclass(tp):
        return build(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],)
        if origin is tuple and args and len(args) != 1:
            if len(value) != len(args):
                raise bad
            return tuple(coerce(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        items = [coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)] if args else list(value)
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    return value


def refuse_unknown(keys, allowed, path: str) -> None:
    """An unknown key names its full path, the closest allowed key and all of them."""
    for key in keys:
        if key not in allowed:
            where = f"{path}.{key}" if path else str(key)
            raise RecipeConfigError(f"{where}: unknown key; {_suggest(key, allowed)}allowed keys are {sorted(allowed)}")


def build(cls, mapping, path: str = ""):
    """An instance of dataclass `cls` from a mapping: unknown keys refused, each value checked against its field's
    type, missing required fields named, and the class's own checks (`__post_init__`) reported under `path`."""
    if mapping is None:
        mapping = {}
    if not isinstance(mapping, dict):
        raise RecipeConfigError(f"{path or 'the preset'}={mapping!r} is invalid: allowed values are a mapping of "
                                f"{[f.name for f in dataclasses.fields(cls) if f.init]}")  # fmt: skip
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    refuse_unknown(mapping, fields, path)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        where = f"{path}.{name}" if path else name
        if name in mapping:
            kwargs[name] = coerce(hints[name], mapping[name], where)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise RecipeConfigError(f"{where}: missing; allowed values are {_describe(hints[name])}")
    try:
        return cls(**kwargs)
    except RecipeConfigError:
        raise
    except (ValueError, TypeError) as error:
        message = str(error)
        named = next((name for name in fields if message.startswith((f"{name}=", f"{name}:", f"{name}."))), None)
        joined = f"{path}.{message}" if path and named else f"{path or cls.__name__}: {message}"
        raise RecipeConfigError(joined) from None


def check_signature_keys(function, spec: dict, path: str, exclude=()) -> None:
    """The keys of `spec` are keyword arguments of `function` (less `exclude`, which the caller passes)."""
    allowed = [name for name in inspect.signature(function).parameters if name not in ("self", *exclude)]
    refuse_unknown(spec, allowed, path)


# -- the recipe config --------------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    """source: "austen" (the embedded novels, Persuasion held out), a text file, a folder of .txt files or a saved
    dataset. tokenizer: a tokenizer folder or hub id, "base" (the tokenizer of `base.source`), or None (a byte-level
    BPE of `tokenizer_vocab_size` trained on the training split, kept in the run folder). train_blocks: a seeded
    random subset of the packed training blocks (None: all; a real base on a CPU trains on a few). eval_blocks:
    held-out blocks scored after every phase (None: all). eval_paragraphs: the first held-out paragraphs, each scored
    whole from its first token, after every phase (and by `ctm eval`). eval_recall: score in-context recall rows after
    every phase (64 rows of `block_size` tokens: a minute per phase through a 135M model on a CPU)."""

    source: str = "austen"
    tokenizer: str | None = None
    tokenizer_vocab_size: int = 4096
    block_size: int = 128
    train_blocks: int | None = None
    eval_blocks: int | None = None
    eval_paragraphs: int = 40
    eval_recall: bool = True

    def __post_init__(self):
        for name in ("tokenizer_vocab_size", "block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: allowed values are integers >= 1")
        for name in ("train_blocks", "eval_blocks"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: allowed values are integers >= 1 or null")
        if self.eval_paragraphs < 0:
            raise ValueError(f"eval_paragraphs={self.eval_paragraphs!r} is invalid: allowed values are integers >= 0")


@dataclass
class RecallWarmupConfig:
    """Phase 1's first stage: `steps` steps on in-context recall rows only, so the lookup forms before the text
    dilutes it. length: tokens of a row (None: `data.block_size`; at least one whole episode, 4 x `recall_pairs`).
    tokens: the ids its rows use (None: `phase1.recall_tokens`). loss_on: "all" tokens or the queried "answers" only.
    training: TrainingArguments fields over the phase's own (not max_steps: `steps` sets it)."""

    steps: int
    length: int | None = None
    tokens: int | None = None
    loss_on: Literal[RECALL_LOSS_ON] = "all"
    training: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps={self.steps!r} is invalid: allowed values are integers >= 1")
        if "max_steps" in self.training:
            raise ValueError("training.max_steps is invalid here: `steps` sets the warm-up's length")


@dataclass
class LanguagePhaseConfig:
    """Phase 1. recall_share: share of the text stage's rows that are in-context recall (MQAR) rows (0: text only).
    recall_pairs: facts per recall episode (4 tokens each), in every recall row and the held-out recall score.
    recall_tokens: the tokenizer's first ordinary tokens recall rows draw from (None: all). recall_loss_on: the mixed
    rows' loss on "all" tokens or on the queried "answers" only."""

    training: dict = field(default_factory=dict)
    recall_warmup: RecallWarmupConfig | None = None
    recall_share: float = 0.0
    recall_pairs: int = 10
    recall_tokens: int | None = None
    recall_loss_on: Literal[RECALL_LOSS_ON] = "all"

    def __post_init__(self):
        if not 0 <= self.recall_share < 1:
            raise ValueError(f"recall_share={self.recall_share!r} is invalid: allowed values are numbers in [0, 1)")
        if self.recall_pairs < 1:
            raise ValueError(f"recall_pairs={self.recall_pairs!r} is invalid: allowed values are integers >= 1")


DISTILLATION_CHOICES = ("lm", "kl", "lm_kl")


@dataclass
class ThinkingPhaseConfig:
    """Phase 2. freeze: what stays phase 1's ("non_ctm": all but the CTM blocks; "non_thinking_ffn": all but the
    blocks and MLPs kept beside them; "none"). trunk_cache: compute the frozen stream entering the first thinking
    layer once (`training.trunk_cache`) and train only the layers from there (needs `freeze: non_ctm`).
    distillation (with the trunk cache): the loss, "lm" (the model's own), "kl" (KL to phase 1's next-token
    distribution over its top `distill_top_k` tokens and "any other") or "lm_kl" (both, weight 1 each).
    cache_dir: where the cache lives (None: `trunk-cache` in the run folder)."""

    training: dict = field(default_factory=dict)
    freeze: Literal[FREEZE_CHOICES] = "non_ctm"
    trunk_cache: bool = False
    distillation: Literal[DISTILLATION_CHOICES] = "lm"
    distill_top_k: int = 32
    cache_dir: str | None = None

    def __post_init__(self):
        if self.distill_top_k < 1:
            raise ValueError(f"distill_top_k={self.distill_top_k!r} is invalid: allowed values are integers >= 1")
        if self.trunk_cache and self.freeze != "non_ctm":
            raise ValueError(f"freeze={self.freeze!r} is invalid with trunk_cache: true: allowed values are "
                             "['non_ctm'] (the cached trunk and the layer's own MLP must stay frozen)")  # fmt: skip
        if self.distillation != "lm" and not self.trunk_cache:
            raise ValueError(f"distillation={self.distillation!r} is invalid without trunk_cache: allowed values are "
                             "['lm'] (the teacher's distribution is cached with the trunk)")  # fmt: skip


@dataclass
class ContinuityPhaseConfig:
    """Phase 3. chunk_size: `ctm_chunk_size` (a chunk's tokens start from the previous chunk's last state).
    chunk_length: training chunks processed in order (a multiple of chunk_size). gradient_window: chunk boundaries a
    gradient crosses. cut_attention: only the thinking state crosses chunk boundaries."""

    chunk_size: int
    chunk_length: int
    training: dict = field(default_factory=dict)
    freeze: Literal[FREEZE_CHOICES] = "non_ctm"
    gradient_window: int = 1
    cut_attention: bool = False

    def __post_init__(self):
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size!r} is invalid: allowed values are integers >= 1")
        if self.chunk_length < self.chunk_size or self.chunk_length % self.chunk_size:
            raise ValueError(f"chunk_length={self.chunk_length!r} is invalid: allowed values are multiples of "
                             f"chunk_size={self.chunk_size}")  # fmt: skip
        if self.gradient_window < 1:
            raise ValueError(f"gradient_window={self.gradient_window!r} is invalid: allowed values are integers >= 1")


@dataclass
class ReplaySleepConfig:
    """Sleep between phase 4's conversations: a `ReplayHeap` of `capacity` sequences (`admission`: "reservoir", a
    uniform sample of what was read, or "loss", the hardest) consolidated with `consolidation`."""

    capacity: int = 16
    admission: Literal["loss", "reservoir"] = SLEEP_ADMISSION
    consolidation: ConsolidationConfig = field(default_factory=ConsolidationConfig)

    def __post_init__(self):
        ReplayHeap(capacity=self.capacity, admission=self.admission)  # its own checks, before any model exists


@dataclass
class OnlinePhaseConfig:
    """Phase 4: `conversations` scripted conversations of `turns` held-out paragraphs (after the scored ones), each
    cut to `max_message_words`, lived with the memory stack on. freeze: what sleep's consolidation may change.
    session: `OnlineConfig`. memory: `CTMEpisodicMemory.for_model` options (`capacity` required; None: no episodic
    memory). token_memory: "token" adds the fast-weight token memory, empty. plasticity: `PlasticityConfig` (None:
    off). sleep: `ReplaySleepConfig` (None: no sleep)."""

    conversations: int
    turns: int = 2
    max_message_words: int = 48
    freeze: Literal[FREEZE_CHOICES] = "non_ctm"
    session: OnlineConfig = field(default_factory=OnlineConfig)
    memory: dict | None = None
    token_memory: Literal[CTM_TOKEN_MEMORY_CHOICES] = "none"
    plasticity: PlasticityConfig | None = None
    sleep: ReplaySleepConfig | None = None
    training: dict = field(default_factory=dict)

    def __post_init__(self):
        for name in ("conversations", "turns", "max_message_words"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: allowed values are integers >= 1")
        if self.memory is not None and "capacity" not in self.memory:
            raise ValueError("memory.capacity: missing; allowed values are integers >= 1")


@dataclass
class BaseConfig:
    """A pretrained Llama-family base as phase 1 (`CTMForCausalLM.from_llama`, no training): `source` is a named
    offline source (`hub.sources`, e.g. "smollm2-135m-instruct"), a converted CTM folder or a Llama folder. The
    preset's `model:` stays empty: the decoder fields are the base's."""

    source: str

    def __post_init__(self):
        if not self.source:
            raise ValueError("source='' is invalid: allowed values are a named source, a converted folder or a "
                             "Llama-family folder")  # fmt: skip


@dataclass
class SamplesConfig:
    """Greedy samples written into every phase's card."""

    prompts: list[str] = field(default_factory=lambda: ["It is a truth universally acknowledged"])
    max_new_tokens: int = 40


@dataclass
class ThinkingConfig:
    """The `ctm_*` fields of the blocks phase 2 adds: a named profile (`CTM_PROFILES`) and fields over it."""

    profile: str | None = None
    fields: dict = field(default_factory=dict)

    def resolved(self) -> dict:
        base = ctm_profile(self.profile) if self.profile is not None else {}
        return {**base, **self.fields}


@dataclass
class RecipeConfig:
    """A training preset, typed. `model`: the decoder fields of `CTMConfig`; `thinking`: its `ctm_*` fields for phase
    2 (`profile:` names a set of them); `base`: a pretrained base as phase 1 instead of training one (its decoder
    fields replace `model`); `training`: the TrainingArguments every phase shares; `sleep`: the
    `SleepCallback` arguments that add sleep to every training phase (None: off); `torch_threads`: the torch threads
    (None: torch's choice); `keep_freed_memory`: serve large CPU allocations from the heap and keep what is freed
    (`training.allocator`: glibc only; a quarter of the tiny main job's CPU time was page faults without it)."""

    name: str
    data: DataConfig
    thinking: ThinkingConfig
    training: dict
    phase2: ThinkingPhaseConfig
    phase3: ContinuityPhaseConfig
    model: dict = field(default_factory=dict)
    phase1: LanguagePhaseConfig = field(default_factory=LanguagePhaseConfig)
    base: BaseConfig | None = None
    phase4: OnlinePhaseConfig | None = None
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    seed: int = 0
    torch_compile: bool = False
    torch_threads: int | None = None
    keep_freed_memory: bool = False
    sleep: dict | None = None

    def phase(self, number: int):
        return getattr(self, f"phase{number}")

    def thinking_fields(self) -> dict:
        return self.thinking.resolved()

    def language_config(self, vocab_size: int, **tokens) -> CTMConfig:
        """The phase-1 config: the decoder fields, no thinking layers."""
        return CTMConfig(**{**self.model, "vocab_size": vocab_size, **tokens, "ctm_layers": "none"})

    def training_arguments(self, phase: int, output_dir, **overrides) -> TrainingArguments:
        """The shared TrainingArguments overlaid with the phase's own, then `overrides` (a stage's)."""
        return TrainingArguments(output_dir=str(output_dir), **self.training_fields(phase, **overrides))

    def training_fields(self, phase: int, **overrides) -> dict:
        defaults = {
            "seed": self.seed,
            "eval_strategy": "no",  # every phase ends with a held-out evaluation anyway
            "save_strategy": "steps",
            "prediction_loss_only": True,
            "remove_unused_columns": False,
            "torch_compile": self.torch_compile,
        }
        phase_config = self.phase(phase)
        return {**defaults, **self.training, **(phase_config.training if phase_config else {}), **overrides}

    def recall_warmup_length(self) -> int:
        warmup = self.phase1.recall_warmup
        return self.data.block_size if warmup is None or warmup.length is None else warmup.length

    def validate(self) -> None:
        """The checks that need several sections, and every object built once to run its own checks (all cheap:
        no model, no data)."""
        tokens = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # the tokenizer's, not known yet
        if self.base is not None:
            language = checked_base_config(self)
        else:
            if self.data.tokenizer == "base":
                raise RecipeConfigError("data.tokenizer='base' is invalid without a `base:` section: allowed values "
                                        "are a tokenizer folder, a hub id or null")  # fmt: skip
            try:
                language = self.language_config(self.data.tokenizer_vocab_size, **tokens)
            except (ValueError, TypeError) as error:
                raise RecipeConfigError(f"model: {error}") from None
        try:
            thinking = CTMConfig.from_dict({**language.to_dict(), "ctm_layers": "last", **self.thinking_fields()})
        except (ValueError, TypeError) as error:
            raise RecipeConfigError(f"thinking: {error}") from None
        try:
            CTMConfig.from_dict({**thinking.to_dict(), "ctm_carry": "chunk", "ctm_chunk_size": self.phase3.chunk_size})
        except (ValueError, TypeError) as error:
            raise RecipeConfigError(f"phase3.chunk_size: {error}") from None
        episode = 4 * self.phase1.recall_pairs
        warmup = self.phase1.recall_warmup
        if warmup is not None and not episode <= self.recall_warmup_length() <= self.data.block_size:
            raise RecipeConfigError(
                f"phase1.recall_warmup.length={warmup.length!r} is invalid: allowed values are integers {episode} .. "
                f"{self.data.block_size} (a whole episode of phase1.recall_pairs facts .. data.block_size)"
            )
        if self.phase1.recall_share and episode > self.data.block_size:
            raise RecipeConfigError(f"phase1.recall_pairs={self.phase1.recall_pairs} is invalid with recall_share > 0: "
                                    f"an episode ({episode} tokens) must fit data.block_size={self.data.block_size}")  # fmt: skip
        with tempfile.TemporaryDirectory() as scratch:
            shared = {k: v for k, v in self.training_fields(1).items() if k not in self.phase1.training}
            check_training_arguments(shared, scratch, "training")
            for phase in (1, 2, 3, 4):
                if self.phase(phase) is None:
                    continue
                check_training_arguments(self.training_fields(phase), scratch, f"phase{phase}.training")
            if warmup is not None:
                fields = self.training_fields(1, **warmup.training, max_steps=warmup.steps)
                check_training_arguments(fields, scratch, "phase1.recall_warmup.training")
        if self.phase4 is not None and self.phase4.memory is not None:
            from ..memory.episodic import CTMEpisodicMemory

            shape = ("ctm_layer_indices", "hidden_size", "memory_length", "n_synch_out", "n_synch_action")
            allowed = ["key_size", *(k for k in inspect.signature(CTMEpisodicMemory.__init__).parameters
                                     if k not in ("self", "key_size", *shape))]  # fmt: skip
            refuse_unknown(self.phase4.memory, allowed, "phase4.memory")
            try:
                CTMEpisodicMemory.for_model(thinking, **self.phase4.memory)
            except (ValueError, TypeError) as error:
                raise RecipeConfigError(f"phase4.memory: {error}") from None
        if self.sleep is not None:
            check_signature_keys(SleepCallback.__init__, self.sleep, "sleep", exclude=("reference_model", "draw"))
            try:
                sleep_callback(self.sleep)
            except (ValueError, TypeError) as error:
                raise RecipeConfigError(f"sleep: {error}") from None


def resolve_base(source: str) -> tuple[str, str | None, bool]:
    """Where a base (`base.source`) lives: (folder, GGUF file or None, whether the folder is a converted CTM model
    rather than a Llama-family checkpoint to convert)."""
    from ..hub.sources import resolve_source

    folder, gguf_file = resolve_source(source)
    config_file = Path(folder) / "config.json"
    if gguf_file is not None or not config_file.is_file():
        return folder, gguf_file, False
    return folder, gguf_file, json.loads(config_file.read_text()).get("model_type") == "ctm"


def base_config(source: str) -> CTMConfig:
    """The decoder config of a base (`base.source`): a converted CTM folder's own, or a Llama-family config (a GGUF's
    header for a named source) converted; its config only, no weight is read."""
    folder, gguf_file, converted = resolve_base(source)
    if converted:
        config = CTMConfig.from_pretrained(folder)
        return CTMConfig.from_dict({**config.to_dict(), "ctm_layers": "none"})
    from transformers import AutoConfig

    return CTMConfig.from_llama_config(AutoConfig.from_pretrained(folder, gguf_file=gguf_file))


def checked_base_config(config: "RecipeConfig") -> CTMConfig:
    """With a `base:` section: `model:` and phase 1's training are the base's, and the base's config must be readable."""
    if config.model:
        raise RecipeConfigError(f"model={config.model!r} is invalid with a `base:` section: allowed values are {{}} "
                                "(the decoder fields are the base's)")  # fmt: skip
    if config.phase1 != LanguagePhaseConfig():
        raise RecipeConfigError("phase1 is invalid with a `base:` section: phase 1 is the converted base and trains "
                                "nothing; allowed values are an empty or absent `phase1:`")  # fmt: skip
    try:
        return base_config(config.base.source)
    except (OSError, ValueError, TypeError, ImportError) as error:
        raise RecipeConfigError(f"base.source={config.base.source!r} is invalid: {error}") from None


def sleep_callback(spec: dict, draw=None) -> SleepCallback:
    """The top-level `sleep:` section's callback, with this module's admission default."""
    return SleepCallback(**{"admission": SLEEP_ADMISSION, **spec}, draw=draw)


_TRAINING_FIELDS = {f.name: f for f in dataclasses.fields(TrainingArguments) if f.init}
_TRAINING_HINTS = typing.get_type_hints(TrainingArguments)


def check_training_arguments(fields: dict, output_dir: str, path: str) -> TrainingArguments:
    """A TrainingArguments overlay: every key a TrainingArguments field, plain scalar fields of the right type, and the
    whole constructed once (its own `__post_init__` checks), so a bad field fails before step 0."""
    for key, value in fields.items():
        if key not in _TRAINING_FIELDS:
            raise RecipeConfigError(
                f"{path}.{key}: unknown key; {_suggest(key, _TRAINING_FIELDS)}allowed keys are the TrainingArguments "
                "fields (transformers.TrainingArguments)"
            )
        hint = _TRAINING_HINTS.get(key)
        plain = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        if value is not None and set(plain) - {type(None)} <= {int, float, bool}:
            coerce(hint, value, f"{path}.{key}")
    try:
        return TrainingArguments(output_dir=output_dir, **fields)
    except (ValueError, TypeError) as error:
        # a mixed-precision field this machine cannot run (a GPU preset read on a CPU) is no error of the preset: the
        # phase's own TrainingArguments raises it on the machine that trains, still before step 0
        portable = {k: v for k, v in fields.items() if k not in HARDWARE_FIELDS}
        if portable != fields:
            try:
                return TrainingArguments(output_dir=output_dir, **portable)
            except (ValueError, TypeError):
                pass
        raise RecipeConfigError(f"{path}: {error}") from None


HARDWARE_FIELDS = ("bf16", "fp16", "tf32", "bf16_full_eval", "fp16_full_eval")


def _split_thinking(raw) -> dict:
    """`thinking:` in YAML is flat (`profile` beside `ctm_*` fields); each field is checked against `CTMConfig`."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeConfigError(f"thinking={raw!r} is invalid: allowed values are a mapping of ctm_* fields and "
                                "`profile`")  # fmt: skip
    known = [f.name for f in dataclasses.fields(CTMConfig) if f.name.startswith("ctm_")]
    refuse_unknown([k for k in raw if k != "profile"], known, "thinking")
    profile = raw.get("profile")
    if profile is not None and profile not in CTM_PROFILES:
        raise RecipeConfigError(f"thinking.profile={profile!r} is invalid: allowed values are {sorted(CTM_PROFILES)}")
    return {"profile": profile, "fields": {k: v for k, v in raw.items() if k != "profile"}}


def _check_model(raw) -> dict:
    if not isinstance(raw, dict):
        raise RecipeConfigError(f"model={raw!r} is invalid: allowed values are a mapping of CTMConfig decoder fields")
    known = [f.name for f in dataclasses.fields(CTMConfig)]
    refuse_unknown(raw, [k for k in known if k not in ("vocab_size", "ctm_layers")], "model")
    return raw


def recipe_config(raw: dict) -> RecipeConfig:
    """A parsed preset mapping, typed and checked whole (see the module docstring)."""
    if not isinstance(raw, dict):
        raise RecipeConfigError(f"the preset is {type(raw).__name__}: allowed values are a mapping of sections")
    raw = dict(raw)
    raw["model"] = _check_model(raw.get("model", {}))
    raw["thinking"] = _split_thinking(raw.get("thinking"))
    for section in ("training", "sleep"):  # mappings checked below against what reads them
        if section in raw and raw[section] is not None and not isinstance(raw[section], dict):
            raise RecipeConfigError(f"{section}={raw[section]!r} is invalid: allowed values are a mapping")
    config = build(RecipeConfig, raw)
    config.validate()
    return config


def preset_path(name_or_path: str | Path) -> Path:
    """A preset by name (`modeling_ctm/presets/<name>.yaml`) or path."""
    path = Path(name_or_path)
    if not path.suffix:
        path = PRESETS / f"{name_or_path}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in PRESETS.glob("*.yaml"))
        raise RecipeConfigError(
            f"preset={str(name_or_path)!r} is invalid: allowed values are {available} or a path to a YAML file"
        )
    return path


def load_raw_preset(name_or_path: str | Path, overrides=()) -> dict:
    """The preset's YAML mapping with the dotted `--set` overrides applied (not yet typed)."""
    raw = read_yaml(preset_path(name_or_path).read_text())
    return apply_overrides(raw, overrides)


def load_recipe_config(name_or_path: str | Path, overrides=()) -> RecipeConfig:
    """The typed, checked recipe config of a preset name or YAML path, with `--set a.b=v` overrides."""
    return recipe_config(load_raw_preset(name_or_path, overrides))


# -- overrides ----------------------------------------------------------------------------------------------------------


class SetError(RecipeConfigError):
    """A `--set` that names no field, or a value the field does not take."""


def parse_override(item: str) -> tuple[list[str], object]:
    """`a.b.c=VALUE` -> (["a", "b", "c"], the YAML scalar VALUE)."""
    name, equals, text = item.partition("=")
    if not equals or not name or any(not part for part in name.split(".")):
        raise SetError(f"--set {item!r} is invalid: the form is KEY.PATH=VALUE (e.g. phase3.training.max_steps=50)")
    return name.split("."), yaml_scalar(text)


def apply_overrides(raw: dict, overrides) -> dict:
    """A copy of the preset mapping with each `a.b.c=VALUE` set (sections created as needed); the typed load checks
    the keys and values afterwards, so a misspelled override is named like a misspelled preset key."""
    import copy

    raw = copy.deepcopy(raw)
    for item in overrides or ():
        path, value = parse_override(item)
        node = raw
        for depth, key in enumerate(path[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            elif not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise SetError(f"--set {item!r} is invalid: {where} is {child!r}, not a section")
            node = child
        node[path[-1]] = value
    return raw


def _field_defaults(settings) -> dict:
    defaults = {}
    for f in dataclasses.fields(settings):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
        else:
            defaults[f.name] = None
    return defaults


def parse_set(item: str, settings) -> tuple[str, object]:
    """An experiment's `--set FIELD=VALUE` -> (field, value), checked against the `settings` dataclass (class or
    instance): the value is a YAML scalar, typed by the field's annotation (a str field keeps the text as written).
    A settings class with a `model` dict field also takes the CTMConfig fields, merged into that dict (CTMConfig
    checks their values). The experiments' harness (`eval/harness.py`) parses its `--set` with it."""
    name, equals, text = item.partition("=")
    defaults = _field_defaults(settings)
    model_fields = isinstance(defaults.get("model"), dict)
    allowed = sorted(set(defaults) - ({"model"} if model_fields else set()))
    if not equals or not name:
        raise SetError(f"--set {item!r} is invalid: the form is FIELD=VALUE with FIELD one of {allowed}")
    value = yaml_scalar(text)
    if name not in defaults or (model_fields and name == "model"):
        if model_fields and name in {f.name for f in dataclasses.fields(CTMConfig)}:
            return name, value
        extra = " and the CTMConfig fields (the model)" if model_fields else ""
        raise SetError(f"--set {name}: unknown field {name!r}; {_suggest(name, allowed)}allowed fields are "
                       f"{allowed}{extra}")  # fmt: skip
    try:
        hint = typing.get_type_hints(settings if isinstance(settings, type) else type(settings)).get(name, Any)
    except (NameError, TypeError):  # an annotation that does not resolve: type by the default, as before
        hint = type(defaults[name]) if isinstance(defaults[name], (bool, int, float, list, tuple)) else Any
    if hint is str or (isinstance(defaults[name], str) and hint is Any):
        return name, text
    try:
        return name, coerce(hint, value, name)
    except RecipeConfigError as error:
        raise SetError(f"--set {item!r}: {error}") from None
