"""The thinking suite's task generators (`thinking_tasks.py` trains and scores on them): k-hop lookup in context
(`KHopTask`), k hops to a fixed point (`ChainTask`) and running parity (`ParityTask`). Every item is one token and each
task has a difficulty knob; `sample` draws rows from a numpy generator, so a seed fixes the data."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KHopTask:
    """k-hop lookup in context. Token ids: 0 PAD, 1 SEP, the questions Q(k, x) = query_base + (k - 1) * nodes + x,
    the answers A_y = answer_base + y, and the pair tokens P(a, b) = pair_base + a * nodes + b."""

    nodes: int = 12
    queries: int = 8
    max_hops: int = 8

    name = "khop"

    def __post_init__(self):
        if not 1 <= self.max_hops < self.nodes:
            raise ValueError(f"max_hops={self.max_hops} is invalid: allowed values are 1 .. nodes - 1 = {self.nodes - 1}")

    query_base = 2

    @property
    def answer_base(self) -> int:
        return self.query_base + self.max_hops * self.nodes

    @property
    def pair_base(self) -> int:
        return self.answer_base + self.nodes

    @property
    def vocab_size(self) -> int:
        return self.pair_base + self.nodes * self.nodes

    @property
    def length(self) -> int:
        return self.nodes + 1 + 2 * self.queries

    def sample(self, rows: int, hops: list[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """`rows` items; each query's hop count drawn uniformly from `hops`. Returns input_ids and labels (T each),
        and `hops` (rows, queries)."""
        n, m = self.nodes, self.queries
        order = np.argsort(rng.random((rows, n)), axis=1)  # a random cycle: order[i] -> order[i + 1]
        successor = np.empty((rows, n), dtype=np.int64)
        np.put_along_axis(successor, order, np.roll(order, -1, axis=1), axis=1)
        listed = np.argsort(rng.random((rows, n)), axis=1)  # the order the pairs are written in
        pairs = self.pair_base + listed * n + np.take_along_axis(successor, listed, axis=1)
        start = rng.integers(0, n, (rows, m))
        k = np.asarray(hops)[rng.integers(0, len(hops), (rows, m))]
        target = start.copy()
        for step in range(1, max(hops) + 1):
            moved = np.take_along_axis(successor, target, axis=1)
            target = np.where(k >= step, moved, target)
        questions = np.stack([self.query_base + (k - 1) * n + start, self.answer_base + target], axis=2)
        input_ids = np.concatenate([pairs, np.ones((rows, 1), dtype=np.int64), questions.reshape(rows, 2 * m)], 1)
        labels = np.full_like(input_ids, -100)
        answer_columns = n + 1 + 2 * np.arange(m) + 1
        labels[:, answer_columns] = input_ids[:, answer_columns]
        return {"input_ids": input_ids, "labels": labels, "hops": k}

    def answers_by_following(self, input_ids: np.ndarray) -> np.ndarray:
        """The answer to every question of each row, found by reading the row's own pair tokens and following them:
        a check on `sample` that does not reuse its arithmetic. Returns (rows, queries) answer token ids."""
        out = np.empty((len(input_ids), self.queries), dtype=np.int64)
        for r, row in enumerate(input_ids.tolist()):
            table = dict(divmod(token - self.pair_base, self.nodes) for token in row[: self.nodes])
            for q in range(self.queries):
                hops, node = divmod(row[self.nodes + 1 + 2 * q] - self.query_base, self.nodes)
                for _ in range(hops + 1):
                    node = table[node]
                out[r, q] = self.answer_base + node
        return out

    def difficulty(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """The difficulty of each labelled position, in the order `labels != -100` lists them: its k."""
        return batch["hops"].reshape(-1)


@dataclass(frozen=True)
class ChainTask:
    """k hops to a fixed point: `chains` disjoint chains of `nodes / chains` nodes each, every node pointing at the next
    and the last (the chain's root) at itself, written as two tokens per node, "K_a V_b" (b the parent of a), in random
    order; then SEP and `queries` questions "K_x A_r": follow x's pointers until they stop moving, and answer its root
    r. The difficulty k is x's distance to its root (1 .. nodes / chains - 1). Unlike `KHopTask`, the question does not
    say how many hops to make: following a root's self-loop leaves it in place, so a loop that makes more hops than
    needed still lands on the answer (a fixed point, as in Bansal et al. 2022's mazes and prefix sums), and a model
    trained with few ticks can be run with more. Key and value tokens are disjoint (the MQAR form, which a tiny model
    learns, with `ctm_token_shift="embedding"` putting the key into the value's position); fused pair tokens P(a, b)
    need nodes^2 embeddings, and at 12 nodes no arm learned even one hop in 600 steps (a one-seed probe). Token ids:
    0 PAD, 1 SEP, K_a = 2 + a, V_b = 2 + nodes + b, A_y = 2 + 2 nodes + y. Chance: 1 / chains for a model that tells
    the roots (their pairs are self-loops) but not which one x leads to."""

    nodes: int = 24
    chains: int = 3
    queries: int = 8

    name = "chain"
    key_base = 2

    def __post_init__(self):
        if self.chains < 1 or self.nodes % self.chains or self.nodes // self.chains < 2:
            raise ValueError(
                f"nodes={self.nodes}, chains={self.chains} is invalid: chains must divide nodes into chains of >= 2 nodes"
            )

    @property
    def max_hops(self) -> int:
        return self.nodes // self.chains - 1

    @property
    def value_base(self) -> int:
        return self.key_base + self.nodes

    @property
    def answer_base(self) -> int:
        return self.value_base + self.nodes

    @property
    def vocab_size(self) -> int:
        return self.answer_base + self.nodes

    @property
    def length(self) -> int:
        return 2 * self.nodes + 1 + 2 * self.queries

    def sample(self, rows: int, hops: list[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        """`rows` items; each question's distance to its root drawn uniformly from `hops`. Returns input_ids and labels
        (T each), and `hops` (rows, queries)."""
        if not set(hops) <= set(range(1, self.max_hops + 1)):
            raise ValueError(f"hops={hops} is invalid: distances to a root are 1 .. {self.max_hops}")
        n, c, m = self.nodes, self.chains, self.queries
        length = n // c
        # chain_nodes[r, j, i]: the node at position i of chain j (i = length - 1 is the root)
        chain_nodes = np.argsort(rng.random((rows, n)), axis=1).reshape(rows, c, length)
        parent = np.empty((rows, n), dtype=np.int64)
        nxt = np.concatenate([chain_nodes[:, :, 1:], chain_nodes[:, :, -1:]], axis=2)  # the root points at itself
        np.put_along_axis(parent, chain_nodes.reshape(rows, n), nxt.reshape(rows, n), axis=1)
        listed = np.argsort(rng.random((rows, n)), axis=1)  # the order the pairs are written in
        pairs = np.stack([self.key_base + listed, self.value_base + np.take_along_axis(parent, listed, 1)], axis=2)
        k = np.asarray(hops)[rng.integers(0, len(hops), (rows, m))]
        chain = rng.integers(0, c, (rows, m))
        row_index = np.arange(rows)[:, None]
        start = chain_nodes[row_index, chain, length - 1 - k]
        root = chain_nodes[row_index, chain, length - 1]
        questions = np.stack([self.key_base + start, self.answer_base + root], axis=2)
        sep = np.ones((rows, 1), dtype=np.int64)
        input_ids = np.concatenate([pairs.reshape(rows, 2 * n), sep, questions.reshape(rows, 2 * m)], 1)
        labels = np.full_like(input_ids, -100)
        answer_columns = 2 * n + 1 + 2 * np.arange(m) + 1
        labels[:, answer_columns] = input_ids[:, answer_columns]
        # a question whose start node was asked before in the row can copy that answer with one lookup (the same
        # key finds the earlier "K_x A_r"): training keeps those (the copy is how a tiny model first forms the
        # lookup; with the answers hidden none formed in 900 steps, a one-seed probe), scoring counts first asks only
        earlier = (start[:, :, None] == start[:, None, :]) & np.tri(m, k=-1, dtype=bool).T[None]
        return {"input_ids": input_ids, "labels": labels, "hops": k, "scored": ~earlier.any(1)}

    def follow(self, input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every question's root and distance, found by reading the row's own pairs and following them until they stop
        moving (a check on `sample` that does not reuse its arithmetic): (rows, queries) answer ids and hop counts."""
        n = self.nodes
        answers = np.empty((len(input_ids), self.queries), dtype=np.int64)
        distances = np.empty_like(answers)
        for r, row in enumerate(input_ids.tolist()):
            table = {row[2 * i] - self.key_base: row[2 * i + 1] - self.value_base for i in range(n)}
            for q in range(self.queries):
                node, hops = row[2 * n + 1 + 2 * q] - self.key_base, 0
                while table[node] != node:
                    node, hops = table[node], hops + 1
                answers[r, q], distances[r, q] = self.answer_base + node, hops
        return answers, distances

    def difficulty(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """The difficulty of each labelled position, in the order `labels != -100` lists them: its distance k."""
        return batch["hops"].reshape(-1)


@dataclass(frozen=True)
class ParityTask:
    """Running parity. Token ids: 0 and 1 are the bits, 2 and 3 the parities even and odd. The label at position t
    is the parity of bits 0 .. t, put where a causal LM's loss reads the prediction made at t (labels[t + 1])."""

    length: int = 32

    name = "parity"
    vocab_size = 4

    @property
    def buckets(self) -> list[int]:
        """Position buckets 1-8, 9-16, 17-32, ... up to `length`."""
        edges = [8]
        while edges[-1] < self.length:
            edges.append(2 * edges[-1])
        return edges

    def sample(self, rows: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
        # one extra bit: labels[t + 1] holds the parity through bit t, so the last bit is input only
        bits = rng.integers(0, 2, (rows, self.length + 1))
        parity = np.cumsum(bits, axis=1) % 2
        labels = np.full_like(bits, -100)
        labels[:, 1:] = 2 + parity[:, :-1]
        return {"input_ids": bits, "labels": labels}

    def difficulty(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Per labelled position: the number of bits its parity covers, as the bucket (upper bound) it falls in."""
        rows = batch["labels"].shape[0]
        covered = np.arange(1, self.length + 1)
        bucket = np.asarray(self.buckets)[np.searchsorted(self.buckets, covered)]
        return np.tile(bucket, rows)
