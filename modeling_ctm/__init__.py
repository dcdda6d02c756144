"""modeling_ctm: a neuroplastic Continuous Thought Machine language model, native to the Hugging Face stack.

Importing the package registers the model with the `transformers` Auto classes, and marks the classes so that
`save_pretrained`/`push_to_hub` ship the model files as remote code (loadable with `trust_remote_code=True` where the
package is not installed).
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .adapters import CTM_LORA_TARGET_MODULES, register_peft_defaults
from .configuration_ctm import CTMConfig
from .memory import CTMEpisodicMemory
from .modeling_ctm import (
    CTMBlock,
    CTMCache,
    CTMCausalLMOutputWithPast,
    CTMForCausalLM,
    CTMLayerEvent,
    CTMLayerProbe,
    CTMModel,
    CTMOutputEvent,
    CTMPreTrainedModel,
    CTMTickEvent,
    CTMTickObserver,
    ThinkingState,
    multi_tick_loss,
    tick_certainty,
)


AutoConfig.register("ctm", CTMConfig, exist_ok=True)
AutoModel.register(CTMConfig, CTMModel, exist_ok=True)
AutoModelForCausalLM.register(CTMConfig, CTMForCausalLM, exist_ok=True)
CTMConfig.register_for_auto_class()
CTMModel.register_for_auto_class("AutoModel")
CTMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
register_peft_defaults()  # LoraConfig(task_type="CAUSAL_LM") adapts self-attention q/v, not the thinking blocks

__version__ = "0.1.0"

__all__ = [
    "CTM_LORA_TARGET_MODULES",
    "CTMBlock",
    "CTMCache",
    "CTMCausalLMOutputWithPast",
    "CTMConfig",
    "CTMEpisodicMemory",
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
]
