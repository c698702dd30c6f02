"""Runs a scheduler's steps on a runtime, and keeps the rows that wait between layers.

The runner is what a :class:`~layerexit.serving.scheduler.Scheduler` is not: it calls the runtime, and it
holds each waiting row's runtime state (hidden states, mask, the strategy's per-row state) under the
row's id, as blocks of rows that left a step together. A ``layer`` step's rows are taken from their
blocks (one ``take`` per block, one ``join``), and the rows that go on are kept as a new block. Every
decision is :func:`~layerexit.runtime.loop.exit_step`'s on that row's own probabilities, so which rows
share a tensor never changes an answer (tested against offline replay).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from layerexit.data.encoding import pad_right
from layerexit.errors import LayerExitError
from layerexit.runtime.base import Rows, Runtime
from layerexit.runtime.loop import check_online, early_exit, exit_step
from layerexit.serving.scheduler import Inputs, Outcome, Step
from layerexit.strategies import State, Strategy, select_state


@dataclass
class Block:
    """Rows kept together: the runtime's ``rows``, the strategy ``state`` and the row ids, in order."""

    rows: Rows
    state: State
    ids: list[int]


class StepRunner:
    """Owns one runtime's calls for a scheduler's steps."""

    def __init__(self, runtime: Runtime, strategy: Strategy, *, pad_id: int = 0) -> None:
        check_online(strategy)
        self.runtime = runtime
        self.strategy = strategy
        self.pad_id = pad_id
        self._blocks: dict[int, Block] = {}
        self._block_of: dict[int, int] = {}  # row id -> block id
        self._block_ids = itertools.count()

    def run(self, step: Step) -> Outcome:
        """Run one step; what it did."""
        if step.kind == "layer":
            return self._layer(step)
        ids, mask, types = collate(step.inputs, self.pad_id)
        if step.kind == "embed":
            rows = self.runtime.embed(ids, mask, types)
            self._keep(rows, self.strategy.init(len(step.rows), self.runtime.num_labels, "cpu"), step.rows)
            empty = torch.empty(0, dtype=torch.long)
            return Outcome([], empty, torch.empty(0, self.runtime.num_labels), empty, list(step.rows))
        if step.kind == "full":
            probs = self.runtime.full(ids, mask, types)  # (B, C)
            layers = torch.full((len(step.rows),), self.runtime.num_layers)
            return Outcome(list(step.rows), probs.argmax(-1), probs, layers, [])
        result = early_exit(self.runtime, self.strategy, ids, mask, types)
        return Outcome(list(step.rows), result.prediction, result.probs, result.exit_layer, [])

    def forget(self, rows: Iterable[int]) -> None:
        """The scheduler dropped these rows: a block none of whose rows is wanted any more is freed now, the
        others lose the dropped rows when they are next taken from."""
        touched = {self._block_of.pop(row) for row in rows if row in self._block_of}
        for block in touched:
            if not any(self._block_of.get(row) == block for row in self._blocks[block].ids):
                del self._blocks[block]

    def clear(self) -> None:
        self._blocks.clear()
        self._block_of.clear()

    @property
    def held(self) -> int:
        """Rows kept between steps."""
        return len(self._block_of)

    def _keep(self, rows: Rows, state: State, ids: list[int]) -> None:
        block = next(self._block_ids)
        self._blocks[block] = Block(rows, state, ids)
        self._block_of.update((row, block) for row in ids)

    def _layer(self, step: Step) -> Outcome:
        rows, state = self._gather(step.rows)
        rows, probs, fire, prediction = exit_step(self.runtime, self.strategy, step.stage, rows, state)
        left = fire.nonzero().squeeze(1)
        went_on = (~fire).nonzero().squeeze(1)
        if len(went_on):
            kept = went_on if len(left) else None
            self._keep(
                rows if kept is None else self.runtime.take(rows, kept),
                state if kept is None else select_state(state, kept),
                [step.rows[i] for i in went_on.tolist()],
            )
        leaving = [step.rows[i] for i in left.tolist()]
        going = [step.rows[i] for i in went_on.tolist()]
        return Outcome(leaving, prediction[left], probs[left], torch.full((len(left),), step.stage), going)

    def _gather(self, ids: list[int]) -> tuple[Rows, State]:
        """The rows ``ids``, in that order, taken out of their blocks (what stays of a block is kept)."""
        blocks: list[int] = []
        for row in ids:
            if row not in self._block_of:
                raise LayerExitError(f"row {row} is not held by the runner")
            blocks.append(self._block_of.pop(row))
        wanted: dict[int, list[int]] = {b: [] for b in blocks}  # block -> positions, in the order asked
        position = {b: {row: i for i, row in enumerate(self._blocks[b].ids)} for b in wanted}
        for row, b in zip(ids, blocks, strict=True):
            wanted[b].append(position[b][row])
        parts: list[tuple[Rows, State]] = []
        order: list[int] = []
        for block_id, positions in wanted.items():
            block = self._blocks.pop(block_id)
            if positions == list(range(len(block.ids))):
                parts.append((block.rows, block.state))
            else:
                index = torch.tensor(positions)
                parts.append((self.runtime.take(block.rows, index), select_state(block.state, index)))
                rest = [i for i, row in enumerate(block.ids) if self._block_of.get(row) == block_id]
                if rest:  # the rows of the block that still wait (not dropped meanwhile)
                    index = torch.tensor(rest)
                    self._blocks[block_id] = Block(
                        self.runtime.take(block.rows, index),
                        select_state(block.state, index),
                        [block.ids[i] for i in rest],
                    )
            order.extend(block.ids[i] for i in positions)
        rows = parts[0][0] if len(parts) == 1 else self.runtime.join([p[0] for p in parts])
        state = parts[0][1] if len(parts) == 1 else {k: torch.cat([p[1][k] for p in parts]) for k in parts[0][1]}
        if order != ids:  # rows asked across blocks in another order than the blocks give them
            where = {row: i for i, row in enumerate(order)}
            index = torch.tensor([where[row] for row in ids])
            rows, state = self.runtime.take(rows, index), select_state(state, index)
        return rows, state


def collate(inputs: list[Inputs], pad_id: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``token_type_ids`` of the given inputs."""
    type_rows = None if inputs[0][1] is None else [torch.zeros_like(i) if t is None else t for i, t in inputs]
    return pad_right([ids for ids, _ in inputs], type_rows, pad_id)
