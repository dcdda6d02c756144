# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""Configuration of the neuroplastic Continuous Thought Machine (CTM) language model.

This file travels with every checkpoint as remote code, so it imports only `transformers` (and the standard library).
"""

import dataclasses
import difflib

from transformers.configuration_utils import PreTrainedConfig

from .conversion_ctm import decoder_fields_from_llama


CTM_LAYER_CHOICES = ("none", "all", "last")
CTM_READOUT_CHOICES = ("last", "most_certain", "tick_mixture")
CTM_MLP_CHOICES = ("replace", "keep")
CTM_READOUT_NORM_CHOICES = ("none", "rms", "rms_gate")
CTM_SYNC_SEED_CHOICES = ("start_state", "zero")
CTM_INPUT_INJECTION_CHOICES = ("none", "every_tick")
CTM_CARRY_CHOICES = ("none", "chunk")
CTM_NLM_IMPLEMENTATION_CHOICES = ("plain", "fused")
CTM_TOKEN_SHIFT_CHOICES = ("none", "embedding")
CTM_TOKEN_MEMORY_CHOICES = ("none", "token")
CTM_QUERY_SOURCE_CHOICES = ("sync_action", "state", "input_then_state")
CTM_QUERY_SCALE_CHOICES = ("fixed", "learned")
CTM_STATE_NORM_CHOICES = ("none", "rms")
CTM_CONFIDENCE_HEAD_CHOICES = ("none", "linear")
MAX_DECAY = 15.0  # r = exp(-15) ~ 3e-7: a pair with this decay forgets everything between ticks

# Named sets of `ctm_*` values: what a recipe asks for by name (`thinking: {profile: awake}`) instead of retyping them.
# "awake" is the recommended block, the design the tiny preset measured awake and stable (docs/results.md): it replaces
# the MLP (kept beside it, the block stayed asleep: its output 7.6e-7 of the residual stream after phase 2, 0.21-0.24
# replacing it); S_out is made of what the ticks computed (`sync_seed="zero"`), the token's own input reaches every tick,
# the accumulators forget (every rate exp(-decay) < 1) and z is RMS-normed every tick (so a state carried over 2,048
# tokens stays in range); it trains what it serves, the tick mixture's CE (the argmin + most-certain objective drove
# the ticks apart). Sizes (ticks, trace length, pairs, widths) stay each recipe's choice.
# The `CTMConfig` defaults are NOT this profile: they are the reference's, and a saved config.json lists only the
# fields it was saved with, so changing a default would change what old checkpoints compute.
CTM_PROFILES: dict[str, dict] = {
    "awake": {
        "ctm_mlp": "replace",
        "ctm_readout": "tick_mixture",
        "ctm_sync_seed": "zero",
        "ctm_input_injection": "every_tick",
        "ctm_decay_init_range": [0.1, 1.0],
        "ctm_state_norm": "rms",
        "ctm_loss_mixture_weight": 1.0,
        "ctm_loss_argmin_weight": 0.0,
        "ctm_loss_certain_weight": 0.0,
        "ctm_loss_tick_aux_weight": 0.1,
    },
}


class CTMConfig(PreTrainedConfig):
    r"""
    Configuration of a decoder-only transformer whose MLPs are (partly) replaced by CTM blocks.

    The decoder fields follow [`LlamaConfig`]; with `ctm_layers="none"` the model *is* a Llama-style transformer
    (phase 1 of the developmental recipe). The `ctm_*` fields describe the thinking blocks.

    The `ctm_*` defaults are the reference CTM's, kept so that every saved checkpoint (whose config.json lacks fields
    added after it) computes what it computed. They give a block that stays asleep in a language model: the
    recommended values are the profile `CTM_PROFILES["awake"]` (`CTMConfig.from_profile("awake", ...)`, or
    `thinking: {profile: awake}` in a training preset). Fields marked *Experimental* are used by no preset.

    Args:
        ctm_layers (`str` or `list[int]`, defaults to `"last"`):
            Which decoder layers think: `"none"` (plain MLPs everywhere), `"all"`, `"last"`, or a list of layer
            indices (negative indices count from the end).
        ctm_ticks (`int`, defaults to 3):
            K, the number of internal ticks each CTM block runs per token.
        ctm_memory_length (`int`, defaults to 16):
            M, the length of the rolling trace of pre-activations that feeds the neuron-level models.
        ctm_n_synch_out (`int`, *optional*):
            Number of neuron pairs whose synchronisation is read out (S_out). Defaults to `hidden_size // 2`.
        ctm_n_synch_action (`int`, *optional*):
            Number of neuron pairs whose synchronisation forms the attention query (S_action). Defaults to
            `hidden_size // 2`.
        ctm_nlm_hidden_size (`int`, defaults to 32):
            Hidden width of every neuron's private two-layer GLU model (NLM).
        ctm_synapse_depth (`int`, defaults to 32):
            Number of linear layers in the U-Net synapse (even, >= 2; half down, half up).
        ctm_attention_heads (`int`, defaults to 1):
            Heads of the causal cross-attention with which the neurons re-observe the block input.
        ctm_tick_embeddings (`bool`, defaults to `True`):
            Whether a learned per-tick embedding is added to the state entering the synapse.
        ctm_decay_init_range (`tuple[float, float]`, defaults to `(0.0, 0.0)`):
            Synchronisation decays are drawn from U(low, high); r = exp(-decay). `(0, 0)` is the reference (r = 1,
            plain running sums).
        ctm_readout (`str`, defaults to `"most_certain"`):
            Which tick inference reads per token: `"last"`, `"most_certain"` (lowest normalised entropy) or
            `"tick_mixture"` (the mean of the K ticks' next-token distributions; `logits` are then its log-probs).
        ctm_mlp (`str`, defaults to `"replace"`):
            What happens to the MLP of a thinking layer: `"replace"` (the seed: the CTM block takes its place) or
            `"keep"` (the MLP stays beside the block and both add to the residual stream; with the zero-initialised
            readout, a phase-1 model converted this way computes exactly the same function at step 0).
        ctm_sync_seed (`str`, defaults to `"start_state"`):
            What the sync accumulators start from: `"start_state"` (the reference: alpha = the start state's pair
            products, beta = 1) or `"zero"` (alpha = 0, beta = 1: one zero-valued pseudo-observation, so S_out is
            made of what the ticks computed and not dominated by the start state's constant products).
        ctm_input_injection (`str`, defaults to `"none"`):
            How a token's own input reaches its ticks: `"none"` (the reference: only through the cross-attention over
            the sequence, whose query is the same for every token at tick 0) or `"every_tick"` (a learned projection
            of the token's block input is added to every tick's attention query and synapse input, so the state
            depends on the token from the first tick on and each tick can look up something new).
        ctm_readout_norm (`str`, defaults to `"none"`):
            *Experimental* (no preset uses it).
            What the block's readout `out_proj` reads: `"none"` (the reference: raw S_out, `out_proj` zero-initialised),
            `"rms"` (S_out RMS-normalised over its pairs with a learned gain, `out_proj` zero-initialised) or
            `"rms_gate"` (RMS-normalised, `out_proj` randomly initialised, and a learned scalar gate initialised at 0
            multiplies the output, ReZero-style). All three add exactly nothing at initialisation, so the `ctm_mlp="keep"`
            exact start holds; the normalised ones give the readout an input of unit size (raw S_out is ~1e-2 and
            nearly the same for every token) and the gated one sends the block a gradient from the first step on.
        ctm_loss_argmin_weight (`float`, defaults to 0.5):
            Weight of the per-token cross-entropy at the lowest-loss tick.
        ctm_loss_certain_weight (`float`, defaults to 0.5):
            Weight of the per-token cross-entropy at the most-certain tick.
        ctm_loss_tick_aux_weight (`float`, defaults to 0.0):
            Weight of the auxiliary loss averaged over all ticks (keeps every tick a usable prediction).
        ctm_loss_mixture_weight (`float`, defaults to 0.0):
            Weight of the cross-entropy of the tick mixture (the mean of the K distributions, the `"tick_mixture"`
            readout): a soft, deployable version of the argmin term (-log mean_k p_k is a soft minimum over the
            ticks' CE), so the model is trained on exactly what that readout serves.
        ctm_carry (`str`, defaults to `"none"`):
            How thinking state flows between positions: `"none"` (every token starts from the learned start state)
            or `"chunk"` (every token of chunk c starts from the final state of the last token of chunk c-1).
        ctm_chunk_size (`int`, *optional*):
            Chunk size C of the `"chunk"` carry; C = 1 is token-to-token streaming. Required with `"chunk"`.
        ctm_tick_checkpointing (`bool`, defaults to `False`):
            Recompute each tick in the backward pass instead of storing its activations (trades compute for memory).
        ctm_halt_threshold (`float`, *optional*):
            *Experimental* (no preset uses it).
            Adaptive ticks: a token stops thinking in a CTM layer once its sync convergence
            1 - ||S_out,k - S_out,k-1|| / ||S_out,k|| (clamped to [0, 1]) reaches this value; its whole thinking state
            then stays as that tick left it, which is what it outputs and what it carries. `None` (default): every
            token runs all K ticks. 0 stops every token after one tick.
        ctm_nlm_implementation (`str`, defaults to `"plain"`):
            How the neuron-level models run. `"plain"`: two batched matmuls under autograd, which stores the (D, N, 2H)
            and (D, N, H) hidden activations of every tick for the backward pass. `"fused"`: one autograd function
            whose backward recomputes them from the trace (same forward values; gradients equal to float tolerance),
            with a fused Triton forward kernel on CUDA when Triton is installed. It trades a little backward compute
            for memory; see `eval/README.md` for what it does to speed and peak memory.
        ctm_token_shift (`str`, defaults to `"none"`):
            What each position's input embedding is given of the token before it: `"none"` (the reference) or
            `"embedding"` (RWKV-style token shift: x_t + W x_{t-1}, with x_{t-1} the input embedding of the previous
            real token, zero for a sequence's first token, and W zero-initialised so a fresh shift adds nothing). A
            key that carries its previous token makes in-context lookup learnable by a small model;
            the cache carries x_{t-1} through cached decoding, beams and left padding.
        ctm_token_memory (`str`, defaults to `"none"`):
            A fast-weight associative memory read at the output: `"none"` (the reference) or `"token"`: one slot
            (a D-vector) per vocabulary token, added to the final-normed hidden state of every position holding that
            token, so it moves the prediction of the token that follows. The slots start at zero (a fresh memory
            adds nothing) and are written by phase 4's delta rule (`PlasticityConfig(targets=["token_memory"])`):
            a fact "NAME CODE" told once is stored under NAME's slot and read back whenever NAME is the last token,
            in any later context. Its keys are one-hot, so writes under different tokens never interfere. It reads
            `input_ids` (not `inputs_embeds`).
        ctm_confidence_head (`str`, defaults to `"none"`):
            `"linear"`: a confidence head, P(the served token is right) from the readout's probabilities, the
            certainty of every tick and each tick's change of S_out (`confidence_ctm.py`), fitted afterwards with a
            Brier loss on frozen features and read by `generate(..., output_confidence=True)`. `"none"`: no head.
        ctm_unsure_token_id (`int`, *optional*):
            The vocabulary token the model was trained to write after an answer its confidence head scores low (the
            metacognitive marker, " (unsure)"; `modeling_ctm.training.marker`), so readers such as `ctm chat
            --show-confidence` show the model's own marker instead of applying a rule. `None`: not trained to.
        ctm_query_source (`str`, defaults to `"sync_action"`):
            *Experimental* (no preset uses it).
            What forms the block's cross-attention query each tick: `"sync_action"` (the reference: `q_proj` of the
            action synchronisation, a running average of pair products over the ticks so far) or `"state"` (`q_proj`
            of the post-activations z the previous tick produced, D -> D): tick t then asks a question made of what
            tick t-1 found, so successive ticks can chain lookups (a hop per tick; the chain task of eval/thinking_tasks.py). The action
            accumulators are still kept (the carry, snapshots and halting read them) but no longer feed the query.
            `"input_then_state"` (needs `ctm_input_injection="every_tick"`): tick 0's query is the token's own
            projected input alone, and every later tick's query is `q_proj(z)` alone. With `"state"` the token's
            input is added to every tick's query, and while z is small (as it is in a young block) every tick asks
            the first tick's question again.
        ctm_query_scale (`str`, defaults to `"fixed"`):
            *Experimental* (no preset uses it).
            How sharp the block's cross-attention can be: `"fixed"` (the reference: RMS-normed queries and keys, so a
            logit is at most sqrt(head_dim), 4 at head_dim 16, and a lookup among 30 positions keeps about half its
            weight on the wrong ones) or `"learned"`: each head's normed query is multiplied by exp(g), g a learned
            per-head scalar starting at 0 (so a fresh block computes what `"fixed"` does), and the block can sharpen
            a lookup until one position wins. Chained lookups (one per tick) need that sharpness.
        ctm_state_norm (`str`, defaults to `"none"`):
            `"none"` (the reference) or `"rms"`: the neuron-level models' output z is RMS-normalised every tick. A
            tick maps z to z + synapse(...) and then through the NLMs, a map whose gain can exceed 1; a block that
            matters (`ctm_mlp="replace"`) carried over 2,048 tokens grew ||S_out|| from 14 to 1e9 with `"none"`.
            The norm keeps the carried state in the range training saw however long the carry runs.
    """

    model_type = "ctm"
    keys_to_ignore_at_inference = ["cache", "certainty", "selected_tick", "tick_losses"]

    # decoder (Llama-style)
    vocab_size: int = 4096
    hidden_size: int = 768
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 6
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    tie_word_embeddings: bool = True
    rope_parameters: dict | None = None
    attention_bias: bool = False
    attention_dropout: float = 0.0
    mlp_bias: bool = False

    # thinking blocks
    ctm_layers: str | list[int] = "last"
    ctm_ticks: int = 3
    ctm_memory_length: int = 16
    ctm_n_synch_out: int | None = None
    ctm_n_synch_action: int | None = None
    ctm_nlm_hidden_size: int = 32
    ctm_synapse_depth: int = 32
    ctm_attention_heads: int = 1
    ctm_tick_embeddings: bool = True
    ctm_decay_init_range: tuple[float, float] | list[float] = (0.0, 0.0)
    ctm_readout: str = "most_certain"
    ctm_mlp: str = "replace"
    ctm_readout_norm: str = "none"
    ctm_sync_seed: str = "start_state"
    ctm_input_injection: str = "none"
    ctm_loss_argmin_weight: float = 0.5
    ctm_loss_certain_weight: float = 0.5
    ctm_loss_tick_aux_weight: float = 0.0
    ctm_loss_mixture_weight: float = 0.0
    ctm_carry: str = "none"
    ctm_chunk_size: int | None = None
    ctm_tick_checkpointing: bool = False
    ctm_halt_threshold: float | None = None
    ctm_nlm_implementation: str = "plain"
    ctm_token_shift: str = "none"
    ctm_token_memory: str = "none"
    ctm_confidence_head: str = "none"
    ctm_unsure_token_id: int | None = None
    ctm_query_source: str = "sync_action"
    ctm_query_scale: str = "fixed"
    ctm_state_norm: str = "none"

    def __post_init__(self, **kwargs):
        self.refuse_unknown_ctm_fields(kwargs)
        if self.head_dim is None and self.num_attention_heads:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.ctm_n_synch_out is None:
            self.ctm_n_synch_out = self.hidden_size // 2
        if self.ctm_n_synch_action is None:
            self.ctm_n_synch_action = self.hidden_size // 2
        if isinstance(self.ctm_layers, tuple):
            self.ctm_layers = list(self.ctm_layers)
        self.ctm_decay_init_range = [float(v) for v in self.ctm_decay_init_range]
        super().__post_init__(**kwargs)
        self.validate_ctm()

    @classmethod
    def from_profile(cls, profile: str, **fields) -> "CTMConfig":
        """A config with the `ctm_*` values of `CTM_PROFILES[profile]`, then `fields` over them."""
        return cls(**{**ctm_profile(profile), **fields})

    @property
    def ctm_layer_indices(self) -> list[int]:
        """Sorted indices of the decoder layers whose MLP is a CTM block."""
        n = self.num_hidden_layers
        if self.ctm_layers == "none":
            return []
        if self.ctm_layers == "all":
            return list(range(n))
        if self.ctm_layers == "last":
            return [n - 1]
        return sorted({i % n for i in self.ctm_layers})

    @classmethod
    def from_llama_config(cls, llama_config, **ctm_fields) -> "CTMConfig":
        """The config of a Llama-family checkpoint (`LlamaConfig`, a Mistral or Qwen2 config without a sliding window)
        as a `CTMConfig`, with `ctm_fields` for the thinking blocks.

        With no `ctm_fields` (or `ctm_layers="none"`) the CTM model computes the checkpoint's function. With thinking
        layers, `ctm_mlp` defaults to `"keep"`: the blocks start silent beside the MLPs, so the start is exact too.
        Unsupported fields (another model type, a RoPE type other than default/llama3, a sliding window) are refused by
        name."""
        not_ctm = sorted(key for key in ctm_fields if not key.startswith("ctm_"))
        if not_ctm:
            raise ValueError(
                f"CTMConfig.from_llama_config takes ctm_* fields only; got {not_ctm} (the decoder fields come from the "
                "checkpoint)"
            )
        ctm_fields.setdefault("ctm_layers", "none")
        if ctm_fields["ctm_layers"] != "none":
            ctm_fields.setdefault("ctm_mlp", "keep")
        return cls(**decoder_fields_from_llama(llama_config), **ctm_fields)

    @classmethod
    def refuse_unknown_ctm_fields(cls, kwargs: dict) -> None:
        """A misspelled `ctm_*` keyword would otherwise become a silent extra attribute (the config keeps unknown
        keys): refuse it and name the closest field. Other unknown keys pass, as in every `PreTrainedConfig`."""
        known = [f.name for f in dataclasses.fields(cls) if f.name.startswith("ctm_")]
        for key in kwargs:
            if key.startswith("ctm_") and key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise TypeError(
                    f"CTMConfig got an unknown field {key}={kwargs[key]!r}: {hint}allowed ctm_ fields are {known}."
                )

    def validate_ctm(self):
        """Raise `ValueError` naming the field and what is allowed for every invalid architecture value."""

        def fail(field, value, allowed):
            raise ValueError(f"CTMConfig.{field}={value!r} is invalid: {allowed}.")

        def positive_int(field, value, note=""):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                fail(field, value, "allowed values are integers >= 1" + note)

        for field in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
            positive_int(field, getattr(self, field))
        if self.hidden_size % self.num_attention_heads != 0:
            fail("num_attention_heads", self.num_attention_heads, f"must divide hidden_size={self.hidden_size}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            fail(
                "num_key_value_heads",
                self.num_key_value_heads,
                f"must divide num_attention_heads={self.num_attention_heads}",
            )

        n = self.num_hidden_layers
        if isinstance(self.ctm_layers, str):
            if self.ctm_layers not in CTM_LAYER_CHOICES:
                fail(
                    "ctm_layers", self.ctm_layers, f"allowed values are {CTM_LAYER_CHOICES} or a list of layer indices"
                )
        elif isinstance(self.ctm_layers, list):
            bad = [i for i in self.ctm_layers if not isinstance(i, int) or isinstance(i, bool) or not -n <= i < n]
            if bad or not self.ctm_layers:
                fail("ctm_layers", self.ctm_layers, f"layer indices must be integers in [-{n}, {n - 1}] (non-empty)")
        else:
            fail("ctm_layers", self.ctm_layers, f"allowed values are {CTM_LAYER_CHOICES} or a list of layer indices")

        positive_int("ctm_ticks", self.ctm_ticks)
        positive_int("ctm_memory_length", self.ctm_memory_length)
        positive_int("ctm_nlm_hidden_size", self.ctm_nlm_hidden_size)
        positive_int("ctm_attention_heads", self.ctm_attention_heads)
        if self.hidden_size % self.ctm_attention_heads != 0:
            fail("ctm_attention_heads", self.ctm_attention_heads, f"must divide hidden_size={self.hidden_size}")
        max_pairs = self.hidden_size * (self.hidden_size + 1) // 2
        for field in ("ctm_n_synch_out", "ctm_n_synch_action"):
            value = getattr(self, field)
            positive_int(field, value)
            if value > max_pairs:
                fail(
                    field,
                    value,
                    f"at most hidden_size*(hidden_size+1)/2 = {max_pairs} distinct neuron pairs exist",
                )
        depth = self.ctm_synapse_depth
        if not isinstance(depth, int) or isinstance(depth, bool) or depth < 2 or depth % 2:
            fail("ctm_synapse_depth", depth, "allowed values are even integers >= 2 (half down, half up)")
        if len(self.ctm_decay_init_range) != 2 or not (
            0.0 <= self.ctm_decay_init_range[0] <= self.ctm_decay_init_range[1] <= MAX_DECAY
        ):
            fail(
                "ctm_decay_init_range",
                self.ctm_decay_init_range,
                f"must be [low, high] with 0 <= low <= high <= {MAX_DECAY}",
            )
        if self.ctm_readout not in CTM_READOUT_CHOICES:
            fail("ctm_readout", self.ctm_readout, f"allowed values are {CTM_READOUT_CHOICES}")
        loss_weights = (
            "ctm_loss_argmin_weight",
            "ctm_loss_certain_weight",
            "ctm_loss_tick_aux_weight",
            "ctm_loss_mixture_weight",
        )
        for field in loss_weights:
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                fail(field, value, "allowed values are numbers >= 0")
        if self.ctm_layer_indices and sum(getattr(self, field) for field in loss_weights) <= 0:
            fail("ctm_loss_argmin_weight", self.ctm_loss_argmin_weight, "the four ctm_loss_*_weight must not all be 0")
        if self.ctm_mlp not in CTM_MLP_CHOICES:
            fail("ctm_mlp", self.ctm_mlp, f"allowed values are {CTM_MLP_CHOICES}")
        if self.ctm_sync_seed not in CTM_SYNC_SEED_CHOICES:
            fail("ctm_sync_seed", self.ctm_sync_seed, f"allowed values are {CTM_SYNC_SEED_CHOICES}")
        if self.ctm_input_injection not in CTM_INPUT_INJECTION_CHOICES:
            fail("ctm_input_injection", self.ctm_input_injection, f"allowed values are {CTM_INPUT_INJECTION_CHOICES}")
        if self.ctm_readout_norm not in CTM_READOUT_NORM_CHOICES:
            fail("ctm_readout_norm", self.ctm_readout_norm, f"allowed values are {CTM_READOUT_NORM_CHOICES}")
        if self.ctm_carry not in CTM_CARRY_CHOICES:
            fail("ctm_carry", self.ctm_carry, f"allowed values are {CTM_CARRY_CHOICES}")
        halt = self.ctm_halt_threshold
        if halt is not None and (not isinstance(halt, (int, float)) or isinstance(halt, bool) or not 0 <= halt <= 1):
            fail("ctm_halt_threshold", halt, "allowed values are None (no halting) or a number in [0, 1]")
        if self.ctm_nlm_implementation not in CTM_NLM_IMPLEMENTATION_CHOICES:
            fail(
                "ctm_nlm_implementation",
                self.ctm_nlm_implementation,
                f"allowed values are {CTM_NLM_IMPLEMENTATION_CHOICES}",
            )
        if self.ctm_token_shift not in CTM_TOKEN_SHIFT_CHOICES:
            fail("ctm_token_shift", self.ctm_token_shift, f"allowed values are {CTM_TOKEN_SHIFT_CHOICES}")
        if self.ctm_token_memory not in CTM_TOKEN_MEMORY_CHOICES:
            fail("ctm_token_memory", self.ctm_token_memory, f"allowed values are {CTM_TOKEN_MEMORY_CHOICES}")
        if self.ctm_confidence_head not in CTM_CONFIDENCE_HEAD_CHOICES:
            fail("ctm_confidence_head", self.ctm_confidence_head, f"allowed values are {CTM_CONFIDENCE_HEAD_CHOICES}")
        unsure = self.ctm_unsure_token_id
        if unsure is not None and (
            not isinstance(unsure, int) or isinstance(unsure, bool) or not 0 <= unsure < self.vocab_size
        ):
            fail("ctm_unsure_token_id", unsure, f"allowed values are None or a token id in 0 .. {self.vocab_size - 1}")
        if self.ctm_query_source not in CTM_QUERY_SOURCE_CHOICES:
            fail("ctm_query_source", self.ctm_query_source, f"allowed values are {CTM_QUERY_SOURCE_CHOICES}")
        if self.ctm_query_source == "input_then_state" and self.ctm_input_injection != "every_tick":
            fail(
                "ctm_query_source",
                self.ctm_query_source,
                "'input_then_state' needs ctm_input_injection='every_tick' (tick 0's query is the injected input)",
            )
        if self.ctm_query_scale not in CTM_QUERY_SCALE_CHOICES:
            fail("ctm_query_scale", self.ctm_query_scale, f"allowed values are {CTM_QUERY_SCALE_CHOICES}")
        if self.ctm_state_norm not in CTM_STATE_NORM_CHOICES:
            fail("ctm_state_norm", self.ctm_state_norm, f"allowed values are {CTM_STATE_NORM_CHOICES}")
        if self.ctm_carry == "chunk" or self.ctm_chunk_size is not None:
            positive_int("ctm_chunk_size", self.ctm_chunk_size, " (required when ctm_carry='chunk')")


__all__ = ["CTMConfig"]


def ctm_profile(name: str) -> dict:
    """A copy of the named `CTM_PROFILES` entry; an unknown name is refused with the allowed ones."""
    if name not in CTM_PROFILES:
        raise ValueError(f"profile={name!r} is invalid: allowed values are {sorted(CTM_PROFILES)}")
    return {key: list(value) if isinstance(value, list) else value for key, value in CTM_PROFILES[name].items()}
