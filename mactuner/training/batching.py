"""Rows → units → global batches → micro-batches on the device.

No padding waste: rows of similar length are grouped into the same global batch
(or, with ``packing``, several rows share one sequence with position ids that
restart, which transformers turns into a block-diagonal mask). Micro-batches are
right-padded and run without an attention mask: under a causal mask a real
token never sees the padding after it, so the fast causal attention path is
exact. Every process plans the same batches from the seed, so nothing about the
data order needs communication.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from mactuner.data import IGNORE_INDEX

# rows are shuffled, then sorted by length inside windows of this many global
# batches: batches hold similar lengths while the order stays random
GROUPING_WINDOW = 64


@dataclass
class Unit:
    """What fills one row of a micro-batch: a tokenized row, or several packed together."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int] | None  # only when packed: restarts at 0 for each row

    @property
    def trained_tokens(self) -> int:
        """Tokens that take a loss (the first label is never predicted: nothing comes before it)."""
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


def make_units(rows: list[dict[str, list[int]]], packing: bool, max_length: int, seed: int) -> list[Unit]:
    """Rows as units; with ``packing``, rows shuffled and packed first-fit into sequences of ``max_length``."""
    if not packing:
        return [Unit(list(r["input_ids"]), list(r["labels"]), None) for r in rows]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    # first-fit decreasing over the shuffled rows: few, nearly full sequences
    order.sort(key=lambda i: -len(rows[i]["input_ids"]))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = len(rows[i]["input_ids"])
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(max_length - n)
    units = []
    for b in bins:
        ids, labels, positions = [], [], []
        for i in b:
            row_labels = list(rows[i]["labels"])
            # a row's first token must not be learned from the previous row's last
            row_labels[0] = IGNORE_INDEX
            ids += rows[i]["input_ids"]
            labels += row_labels
            positions += range(len(rows[i]["input_ids"]))
        units.append(Unit(ids, labels, positions))
    return units


def plan_epoch(units: list[Unit], global_batch: int, seed: int, epoch: int, group_by_length: bool) -> list[list[int]]:
    """The global batches of one epoch, as lists of unit indices; the same for every process.

    Units are shuffled by ``seed`` and ``epoch``; when grouping, they are sorted
    by length within windows of global batches, and the batches shuffled again,
    so each batch holds similar lengths in a random order of batches.
    """
    rng = random.Random(seed * 100_003 + epoch)
    order = list(range(len(units)))
    rng.shuffle(order)
    if group_by_length:
        window = global_batch * GROUPING_WINDOW
        grouped = []
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            chunk.sort(key=lambda i: -len(units[i].input_ids))
            grouped += chunk
        order = grouped
    batches = [order[i : i + global_batch] for i in range(0, len(order), global_batch)]
    if group_by_length:
        rng.shuffle(batches)
    return batches


@dataclass
class MicroBatch:
    """One forward pass worth of rows, on the device."""

    input_ids: torch.Tensor  # [rows, length], right-padded
    position_ids: torch.Tensor | None
    targets: torch.Tensor  # [trained tokens] the trained next tokens, in order
    real_tokens: int  # non-padding tokens
    # [trained tokens] the positions whose next token is trained, as indices into the [rows * length]
    # flattened sequence: selecting with them needs no device-to-host sync (a boolean mask does, on a GPU)
    positions: torch.Tensor | None = None


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy ``host`` to ``device``; to a GPU from page-locked memory without waiting (``non_blocking``).

    A pageable tensor is first copied by the driver into a pinned buffer, and the host waits for the
    copy; from pinned memory the copy is a DMA that overlaps the computation already queued.
    """
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def collate(units: list[Unit], pad_id: int, device: torch.device) -> MicroBatch:
    """Right-pad units into one micro-batch on ``device``.

    The index work is done on the host, and everything the device needs (token ids, position
    ids, targets, trained positions: all int64) travels in one buffer, one copy per micro-batch.
    """
    length = max(len(u.input_ids) for u in units)
    ids = torch.full((len(units), length), pad_id, dtype=torch.long)
    labels = torch.full((len(units), length), IGNORE_INDEX, dtype=torch.long)
    positions = None
    if units[0].position_ids is not None:
        # padding continues as one more "row" so it never joins a real one
        positions = torch.zeros((len(units), length), dtype=torch.long)
    for r, u in enumerate(units):
        n = len(u.input_ids)
        ids[r, :n] = torch.tensor(u.input_ids)
        labels[r, :n] = torch.tensor(u.labels)
        if positions is not None:
            positions[r, :n] = torch.tensor(u.position_ids)
            positions[r, n:] = torch.arange(length - n)
    shifted = labels[:, 1:]
    mask = shifted != IGNORE_INDEX
    # position (r, c) predicts token c + 1 of row r; flattened over rows of the full length
    trained_at = (torch.arange(len(units))[:, None] * length + torch.arange(length - 1)[None, :])[mask]
    targets = shifted[mask]
    parts = [ids.reshape(-1), targets, trained_at] + ([positions.reshape(-1)] if positions is not None else [])
    on_device = to_device(torch.cat(parts), device)
    sizes = [p.numel() for p in parts]
    pieces = on_device.split(sizes)
    return MicroBatch(
        input_ids=pieces[0].view(len(units), length),
        position_ids=pieces[3].view(len(units), length) if positions is not None else None,
        targets=pieces[1],
        real_tokens=sum(len(u.input_ids) for u in units),
        positions=pieces[2],
    )
