# Copyright 2026 The modeling-ctm authors. Licensed under the Apache License, Version 2.0.
"""The rule's state as tensors + JSON-able metadata (written next to a Trainer checkpoint by the callback)."""

from __future__ import annotations

import torch


class RulePersistence:
    """`state()` / `load_state()` of `HebbianPlasticity` (a mixin)."""

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors, json-able metadata): the anchors, the weights as the rule left them (so its edit is known exactly
        after a load), the pending statistics, the counters and the config."""
        self.follow_other_changes()
        tensors = {f"anchor.{name}": anchor.contiguous() for name, anchor in self.anchors.items()}
        tensors.update({f"written.{name}": w.contiguous() for name, w in self._written.items()})
        tensors["statistics"] = self._stats.clone()
        for name, key_sum in self.key_sums.items():
            tensors[f"key_sum.{name}"] = key_sum.clone()
            tensors[f"key_count.{name}"] = torch.tensor([self.key_counts[name]], dtype=torch.float64)
        meta = {
            "config": self.config.to_dict(),
            "edits_applied": self.edits_applied,
            "edits_skipped": self.edits_skipped,
            "batches_skipped": self.batches_skipped,
        }
        return tensors, meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        anchors = {k[len("anchor.") :]: v for k, v in tensors.items() if k.startswith("anchor.")}
        expected = {t.name for t in self.targets}
        if set(anchors) != expected:
            raise ValueError(f"saved plasticity anchors {sorted(anchors)} do not match the targets {sorted(expected)}.")
        device = self.targets[0].param.device
        self.anchors = {name: anchors[name].to(device) for name in anchors}
        written = {k[len("written.") :]: v.to(device) for k, v in tensors.items() if k.startswith("written.")}
        # a state written before the rule kept its own edit: the whole distance to the anchor counts as the rule's
        self._written = written if set(written) == expected else {t.name: t.param.detach().clone() for t in self.targets}
        stats = tensors.get("statistics")
        if stats is not None:
            self._stats.copy_(stats.to(torch.float64))
        else:
            self._stats.zero_()
        for name in self.key_sums:
            if f"key_sum.{name}" in tensors:
                self.key_sums[name] = tensors[f"key_sum.{name}"].to(torch.float64).cpu().clone()
                self.key_counts[name] = float(tensors[f"key_count.{name}"][0])
        self.edits_applied = int(meta.get("edits_applied", 0))
        self.edits_skipped = int(meta.get("edits_skipped", 0))
        self.batches_skipped = int(meta.get("batches_skipped", 0))

