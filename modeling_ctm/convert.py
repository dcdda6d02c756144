"""`ctm convert`'s work: a Llama-family checkpoint converted and written with its tokenizer and generation config.

Not a model file (it does not travel with checkpoints): the model files hold what a converted checkpoint needs to
load; this module is the tool that writes one.
"""

import resource
import sys
import time

import torch

from .configuration_ctm import CTMConfig
from .conversion_ctm import load_llama
from .io_ctm import save_folder_atomically
from .modeling_ctm import CTMForCausalLM


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (`ru_maxrss` is in kilobytes on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def convert_checkpoint(
    model_or_path, output, gguf_file: str | None = None, dtype: torch.dtype = torch.float32, **ctm_fields
) -> dict:
    """Convert a Llama-family checkpoint (a folder or a Hub id; `gguf_file` for a GGUF file in that folder) and write
    the CTM model, the checkpoint's tokenizer (with its chat template) and its generation config into `output`, as one
    atomic save: a reader sees the previous folder's files or the new ones. The tokenizer is required: a converted
    chat model is useless without its chat template.

    Returns the seconds each step took (`load_seconds`, `convert_seconds`, `save_seconds`) and the process's peak RSS.
    """
    from transformers import AutoTokenizer

    start = time.perf_counter()
    check = lambda config: CTMConfig.from_llama_config(config, **ctm_fields)  # noqa: E731  (before any weight)
    llama = load_llama(model_or_path, gguf_file=gguf_file, dtype=dtype, check_config=check)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_or_path, gguf_file=gguf_file)
    except (OSError, ValueError) as error:
        raise FileNotFoundError(f"{model_or_path} has no tokenizer that AutoTokenizer can load: {error}") from None
    loaded = time.perf_counter()
    model = CTMForCausalLM.from_llama(llama, dtype=dtype, **ctm_fields)
    del llama
    converted = time.perf_counter()

    def save(staging: str) -> None:
        model.save_pretrained(staging)  # weights, config, generation config and the model files (remote code)
        tokenizer.save_pretrained(staging)

    save_folder_atomically(save, str(output))
    return {
        "load_seconds": loaded - start,
        "convert_seconds": converted - loaded,
        "save_seconds": time.perf_counter() - converted,
        "peak_rss_bytes": peak_rss_bytes(),
        "config": model.config,
        "chat_template": getattr(tokenizer, "chat_template", None) is not None,
    }
