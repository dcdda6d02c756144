"""Sharing: publishing a run to the Hub (`publishing`), model cards (`cards`, template in `model_cards/`) and the
peft defaults (`adapters`)."""
