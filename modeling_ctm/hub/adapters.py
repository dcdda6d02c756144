"""peft defaults for CTM models: what `LoraConfig(task_type="CAUSAL_LM")` adapts when no `target_modules` is given.

peft picks default LoRA targets by `config.model_type` from `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`
(Llama: `["q_proj", "v_proj"]`). A plain name list would also match the thinking block's own `q_proj`/`v_proj`
(`model.layers.N.thinking.q_proj` reads the action synchronisation, not the token stream), which someone adapting
attention did not ask for. So the CTM default is a regex that peft full-matches against module names: the query and
value projections of the decoder's self-attention only, as for Llama.

To adapt the thinking blocks too, pass `target_modules=CTM_LORA_THINKING_TARGET_MODULES` (attention plus the CTM
block's linear maps); the per-neuron NLM weights are plain parameters, reachable with `target_parameters`.

Importing `modeling_ctm` registers the default. A checkpoint loaded with `trust_remote_code=True` where this package
is not installed does not import it: pass `target_modules=CTM_LORA_TARGET_MODULES` (the string below) yourself.
"""

from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING


CTM_LORA_TARGET_MODULES = r".*\.self_attn\.(q_proj|v_proj)"
CTM_LORA_THINKING_TARGET_MODULES = r".*\.(self_attn\.(q_proj|v_proj)|thinking\.(q_proj|k_proj|v_proj|out_proj))"


def register_peft_defaults(model_type: str = "ctm") -> None:
    """Make `CTM_LORA_TARGET_MODULES` peft's LoRA default for `model_type` (idempotent; keeps a user's own entry).

    peft's LoRA, mixed and the LoRA-derived tuners read this mapping (BOFT/C3A copied it at import, so they still need
    `target_modules`)."""
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault(model_type, CTM_LORA_TARGET_MODULES)
