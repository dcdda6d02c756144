"""modeling_ctm: a neuroplastic Continuous Thought Machine language model, native to the Hugging Face stack.

Importing the package registers the model with the `transformers` Auto classes, and marks the classes so that
`save_pretrained`/`push_to_hub` ship the model files as remote code (loadable with `trust_remote_code=True` where the
package is not installed). The model files are imported at once; the memory stack, the training code and the Hub
helpers only when one of their names is first used, so `import modeling_ctm` stays as light as the model.

Layout: the model files (`configuration_ctm.py`, `modeling_ctm.py` and its `*_ctm.py` siblings) travel with
checkpoints; `memory/` (episodic, plasticity, sleep, session), `training/` (phases, trainers, runs, the main job,
data, tokenization), `hub/` (publishing, cards, peft defaults), `fmri.py` (pictures) and `cli.py` build on them.
"""

import importlib

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_ctm import CTMCache, ThinkingState
from .configuration_ctm import CTMConfig
from .hub.adapters import CTM_LORA_TARGET_MODULES, register_peft_defaults
from .loss_ctm import multi_tick_loss, tick_certainty
from .modeling_ctm import CTMBlock, CTMCausalLMOutputWithPast, CTMForCausalLM, CTMModel, CTMPreTrainedModel
from .observers_ctm import CTMLayerEvent, CTMLayerProbe, CTMOutputEvent, CTMTickEvent, CTMTickObserver


AutoConfig.register("ctm", CTMConfig, exist_ok=True)
AutoModel.register(CTMConfig, CTMModel, exist_ok=True)
AutoModelForCausalLM.register(CTMConfig, CTMForCausalLM, exist_ok=True)
CTMConfig.register_for_auto_class()
CTMModel.register_for_auto_class("AutoModel")
CTMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
register_peft_defaults()  # LoraConfig(task_type="CAUSAL_LM") adapts self-attention q/v, not the thinking blocks

__version__ = "0.1.0"

# the memory stack and the training code, imported on first use (PEP 562), as transformers' own lazy modules do
_LAZY = {
    "CTMEpisodicMemory": "memory.episodic",
    "HebbianPlasticity": "memory.plasticity",
    "PlasticityConfig": "memory.plasticity",
    "HebbianPlasticityCallback": "memory.plasticity",
    "ReplayHeap": "memory.sleep",
    "ConsolidationConfig": "memory.sleep",
    "Consolidator": "memory.sleep",
    "SleepCallback": "memory.sleep",
    "CTMOnlineSession": "memory.session",
    "OnlineConfig": "memory.session",
    "CTMTrainer": "training.trainers",
    "ContinuityTrainer": "training.trainers",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "CTM_LORA_TARGET_MODULES",
    "CTMBlock",
    "CTMCache",
    "CTMCausalLMOutputWithPast",
    "CTMConfig",
    "CTMForCausalLM",
    "CTMLayerEvent",
    "CTMLayerProbe",
    "CTMModel",
    "CTMOutputEvent",
    "CTMPreTrainedModel",
    "CTMTickEvent",
    "CTMTickObserver",
    "ThinkingState",
    "multi_tick_loss",
    "tick_certainty",
    *_LAZY,
]
