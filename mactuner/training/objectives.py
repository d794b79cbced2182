"""Preference objectives: DPO (sigmoid or IPO), ORPO and KTO, inside the trainer's own loop.

The trainer's step stays what it is for SFT (global batch → micro-batches → one
backward each → one optimizer step); an objective replaces only the loss of a
micro-batch. Each training row is one *unit* whose ``trained_tokens`` is 1, so the
trainer's normaliser (the sum of ``trained_tokens`` over the global batch) is the
number of pairs (DPO, ORPO) or answers (KTO), and its ``loss_sum / normaliser`` is
the mean loss per row, whatever the micro-batch: the same as TRL's trainers on a
batch of that size.

- **Sequences.** A pair's chosen and rejected answers, each after its prompt, run
  in one forward pass (``[chosen…, rejected…]`` in one micro-batch); the prompt's
  tokens are masked. The LM head runs only at the answers' tokens, chunk by chunk
  (:class:`ChunkedTokenLogps`), as the SFT loss does.
- **Reference** (DPO, KTO). LoRA/QLoRA: the same model with the adapter disabled
  (peft's ``disable_adapter()``), no second copy; full fine-tuning: a frozen copy of
  the base in the compute dtype, made before the first step.
- **DPO** (Rafailov et al. 2023): ``-logsigmoid(beta * (Δchosen - Δrejected))`` where
  Δ is the policy's summed log-probability minus the reference's; IPO: the squared
  ``(Δchosen/len - Δrejected/len - 1/(2 beta))``, as TRL computes them.
- **ORPO** (Hong et al. 2024): the chosen answer's cross-entropy (per token of the
  global batch) minus ``beta * logsigmoid(log odds ratio)`` of the mean per-token
  log-probabilities; no reference pass. (TRL's ORPOTrainer also takes the NLL on the
  prompt's tokens; here the prompt stays masked, as in SFT.)
- **KTO** (Ethayarajh et al. 2024): ``1 - sigmoid(beta * (Δ - KL))`` for desirable and
  ``1 - sigmoid(beta * (KL - Δ))`` for undesirable answers, weighted; KL is TRL's
  estimate: each prompt with the previous row's answer (mismatched pairs of the
  micro-batch), policy minus reference, averaged, clamped at 0, without gradient.

Rewards are ``beta * Δ`` (ORPO: ``beta`` times the policy's mean log-probability, as
TRL reports them); preference accuracy is the share of pairs whose chosen reward
is above the rejected one.
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mactuner.data import IGNORE_INDEX
from mactuner.training.batching import Unit, collate
from mactuner.training.compiled import LayerCompiler
from mactuner.training.losses import LOSS_CHUNK_TOKENS

# the statistics an objective reports, per step and per evaluation
REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy")


@dataclass
class PairUnit:
    """A chosen/rejected pair after the same prompt: one training row of DPO and ORPO."""

    chosen: Unit
    rejected: Unit
    prompt_length: int = 0
    position_ids: None = None  # never packed

    @property
    def input_ids(self) -> list[int]:
        """Both sequences' tokens (their count is the pair's length, for batching and throughput)."""
        return self.chosen.input_ids + self.rejected.input_ids

    @property
    def trained_tokens(self) -> int:
        """The trainer's normaliser counts rows: one per pair."""
        return 1


@dataclass
class AnswerUnit:
    """A single answer labelled desirable or not: one training row of KTO."""

    prompt_ids: list[int]
    completion_ids: list[int]
    label: bool
    position_ids: None = None

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.completion_ids

    @property
    def trained_tokens(self) -> int:
        return 1

    def unit(self, completion_ids: list[int] | None = None) -> Unit:
        """The prompt followed by this answer (or another one: KTO's mismatched pairs), prompt masked."""
        answer = self.completion_ids if completion_ids is None else completion_ids
        return Unit(self.prompt_ids + answer, [IGNORE_INDEX] * len(self.prompt_ids) + list(answer), None)


def pair_units(rows) -> list[PairUnit | AnswerUnit]:
    """:class:`mactuner.data.preference.PreferenceRow` objects as trainer units."""
    from mactuner.data.preference import sequence

    units: list[PairUnit | AnswerUnit] = []
    for r in rows:
        if r.chosen_ids is not None:
            units.append(PairUnit(Unit(*sequence(r.prompt_ids, r.chosen_ids), None),
                                  Unit(*sequence(r.prompt_ids, r.rejected_ids), None), len(r.prompt_ids)))
        else:
            units.append(AnswerUnit(list(r.prompt_ids), list(r.completion_ids), bool(r.label)))
    return units


class ChunkedTokenLogps(torch.autograd.Function):
    """Per-token cross-entropy of ``hidden @ weight.T`` against ``targets`` ([N] float32), chunk by chunk.

    Like :class:`mactuner.training.losses.ChunkedLinearCrossEntropy` but per token: a token's
    loss depends only on its own hidden state, so the gradient of the hidden states is computed
    in the forward pass (``softmax - one_hot`` times the weight) and the backward pass only scales
    each row by its token's upstream gradient. For a frozen head only (no weight gradient).
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        with torch.autocast(hidden.device.type, enabled=False):
            losses = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
            for start in range(0, hidden.shape[0], chunk):
                logits = (hidden[start : start + chunk] @ weight.T).float()
                t = targets[start : start + chunk]
                log_z = torch.logsumexp(logits, dim=-1)
                losses[start : start + chunk] = log_z - logits.gather(1, t[:, None]).squeeze(1)
                if grad_hidden is not None:
                    probs = logits.sub_(log_z[:, None]).exp_()
                    probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                    grad_hidden[start : start + chunk] = probs.to(weight.dtype) @ weight
                del logits
        ctx.save_for_backward(grad_hidden)
        return losses

    @staticmethod
    def backward(ctx, grad_output):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_output[:, None].to(grad_hidden.dtype), None, None, None


@dataclass
class SequenceLogps:
    """Per-sequence sums of the answer tokens' log-probabilities, and their token counts."""

    logps: torch.Tensor  # [rows] float32
    tokens: torch.Tensor  # [rows] float32
    # with answer_from: the same over every trained token (prompt included), for ORPO's NLL
    all_logps: torch.Tensor | None = None


class PreferenceObjective:
    """The loss of one micro-batch of pairs (or labelled answers), and the reward statistics.

    Args:
        config: the run's :class:`mactuner.config.TrainConfig` (objective, beta, dpo_loss, KTO weights).
        trainer: the :class:`mactuner.training.trainer.Trainer` whose model it runs (loaded).
    """

    def __init__(self, config, trainer):
        self.config = config
        self.trainer = trainer
        self.kind = config.objective
        self.beta = float(config.beta)
        self.reference = None  # a frozen copy (full fine-tuning); None: the adapter is disabled instead
        if self.kind in ("dpo", "kto") and config.method == "full":
            reference = copy.deepcopy(trainer.causal_lm).to(trainer.compute_dtype)
            reference.requires_grad_(False)
            reference.eval()
            self.reference = reference
        self._stats: dict[str, torch.Tensor] = {}  # summed statistics of the applied steps since the last report
        self._pending: dict[str, torch.Tensor] = {}  # those of the step being tried
        self._step_answer_tokens = 1.0
        self._step_rows = 1.0
        # ORPO's NLL on the prompt's tokens too (TRL's ORPOTrainer does) when assistant_only_loss is off
        self.nll_on_prompt = self.kind == "orpo" and not config.assistant_only_loss

    # -- data

    def prepare(self, load, train_examples, val_examples):
        """Tokenized train and validation units of a :class:`~mactuner.data.preference.PreferenceLoad`."""
        from mactuner.data.preference import tokenize_preferences

        problems: list = []
        tokenizer, max_length = self.trainer.tokenizer, self.config.max_length
        train = pair_units(tokenize_preferences(train_examples, tokenizer, max_length, problems))
        val = pair_units(tokenize_preferences(val_examples, tokenizer, max_length, problems))
        # a pair whose answers were cut off entirely teaches nothing
        def usable(u):
            if isinstance(u, PairUnit):
                return u.chosen.labels.count(IGNORE_INDEX) < len(u.chosen.labels) and u.rejected.labels.count(IGNORE_INDEX) < len(u.rejected.labels)
            return bool(u.completion_ids)

        kept_train = [u for u in train if usable(u)]
        kept_val = [u for u in val if usable(u)]
        return kept_train, kept_val, problems, len(train) + len(val) - len(kept_train) - len(kept_val)

    # -- the step

    def begin_step(self, global_batch) -> None:
        """Called before each try of a step: clears the statistics of a try that ran out of memory
        and counts what the ORPO NLL is normalised by (the global batch's chosen tokens)."""
        self._pending = {}
        if self.kind == "orpo":
            self._step_answer_tokens = float(max(1, sum(self._nll_tokens(u) for u in global_batch)))
            self._step_rows = float(len(global_batch))

    def _nll_tokens(self, unit: PairUnit) -> int:
        return len(unit.chosen.input_ids) - 1 if self.nll_on_prompt else unit.chosen.trained_tokens

    def end_step(self) -> None:
        """The step was applied: its statistics join those of the report."""
        for key, value in self._pending.items():
            self._stats[key] = self._stats[key] + value if key in self._stats else value
        self._pending = {}

    def pop_stats(self) -> dict[str, float]:
        """Mean rewards, margin and accuracy over the rows since the last call (one device read)."""
        stats, self._stats = self._stats, {}
        return _means(stats)

    def loss_sum(self, units: list) -> torch.Tensor:
        """The summed loss of ``units`` (float32; the trainer divides by the global batch's rows)."""
        loss, stats = self._loss(units)
        for key, value in stats.items():
            self._pending[key] = self._pending[key] + value if key in self._pending else value
        return loss

    @torch.no_grad()
    def evaluate(self, units: list, micro_batch: int) -> dict[str, float]:
        """Validation: mean loss per row and the reward statistics over ``units`` (this process's)."""
        total: dict[str, torch.Tensor] = {}
        saved = self._step_answer_tokens, self._step_rows
        if self.kind == "orpo":
            self._step_answer_tokens = float(max(1, sum(self._nll_tokens(u) for u in units)))
            self._step_rows = float(len(units))
        loss = torch.zeros((), dtype=torch.float32, device=self.trainer.device)
        for start in range(0, len(units), micro_batch):
            chunk_loss, stats = self._loss(units[start : start + micro_batch])
            loss += chunk_loss
            for key, value in stats.items():
                total[key] = total[key] + value if key in total else value
        self._step_answer_tokens, self._step_rows = saved
        total["loss_sum"] = torch.stack([loss, torch.tensor(float(len(units)), device=loss.device)])
        return total

    # -- the losses

    def _loss(self, units: list) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.kind == "kto":
            return self._kto(units)
        sequences = [u.chosen for u in units] + [u.rejected for u in units]
        n = len(units)
        if self.kind == "orpo":
            if not self.nll_on_prompt:
                return self._orpo(self.sequence_logps(sequences), n)
            whole = [Unit(u.chosen.input_ids, list(u.chosen.input_ids), None) for u in units]
            starts = [u.prompt_length for u in units] * 2
            return self._orpo(self.sequence_logps(whole + sequences[n:], answer_from=starts), n)
        policy = self.sequence_logps(sequences)
        chosen, rejected = policy.logps[:n], policy.logps[n:]
        with torch.no_grad(), self.reference_model() as model:
            ref = self.sequence_logps(sequences, model)
        chosen_ratio = chosen - ref.logps[:n]
        rejected_ratio = rejected - ref.logps[n:]
        if self.config.dpo_loss == "ipo":
            delta = chosen_ratio / policy.tokens[:n].clamp(min=1.0) - rejected_ratio / policy.tokens[n:].clamp(min=1.0)
            losses = (delta - 1 / (2 * self.beta)) ** 2
        else:
            losses = -F.logsigmoid(self.beta * (chosen_ratio - rejected_ratio))
        return losses.sum(), _pair_stats(self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach())

    def _orpo(self, policy: SequenceLogps, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mean_logps = policy.logps / policy.tokens.clamp(min=1.0)
        chosen, rejected = mean_logps[:n], mean_logps[n:]
        log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
        ratio = F.logsigmoid(log_odds)
        # the chosen answers' NLL per token of the whole global batch, as a per-row share
        nll_logps = policy.logps if policy.all_logps is None else policy.all_logps
        nll = -nll_logps[:n].sum() * (self._step_rows / self._step_answer_tokens)
        loss = nll - self.beta * ratio.sum()
        stats = _pair_stats(self.beta * chosen.detach(), self.beta * rejected.detach())
        stats["log_odds_ratio"] = torch.stack([ratio.detach().sum(), torch.tensor(float(n), device=ratio.device)])
        return loss, stats

    def _kto(self, units: list[AnswerUnit]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = self.trainer.device
        labels = torch.tensor([u.label for u in units], dtype=torch.bool, device=device)
        sequences = [u.unit() for u in units]
        # TRL's KL estimate: each prompt with the previous row's answer (the first with the last)
        mismatched = [u.unit(units[i - 1].completion_ids) for i, u in enumerate(units)]
        policy = self.sequence_logps(sequences)
        with torch.no_grad(), LayerCompiler.eager():
            kl_policy = self.sequence_logps(mismatched)
            with self.reference_model() as model:
                ref = self.sequence_logps(sequences, model)
                kl_ref = self.sequence_logps(mismatched, model)
            kl = (kl_policy.logps - kl_ref.logps).mean().clamp(min=0)
        ratio = policy.logps - ref.logps
        desirable = 1 - torch.sigmoid(self.beta * (ratio - kl))
        undesirable = 1 - torch.sigmoid(self.beta * (kl - ratio))
        losses = torch.where(
            labels, self.config.kto_desirable_weight * desirable, self.config.kto_undesirable_weight * undesirable
        )
        rewards = self.beta * ratio.detach()
        good = labels.float()
        stats = {
            "rewards/chosen": torch.stack([(rewards * good).sum(), good.sum()]),
            "rewards/rejected": torch.stack([(rewards * (1 - good)).sum(), (1 - good).sum()]),
            "kl": torch.stack([kl, torch.ones((), device=device)]),
        }
        return losses.sum(), stats

    # -- the model

    def reference_model(self):
        """The reference: the frozen copy, or the trained model with its adapter disabled."""
        stack = contextlib.ExitStack()
        # compiled layers would compile again for no_grad and for the disabled adapter: run them eagerly
        stack.enter_context(LayerCompiler.eager())
        if self.reference is not None:
            stack.enter_context(contextlib.nullcontext())
            model = self.reference
        else:
            model = stack.enter_context(_DisabledAdapter(self.trainer.model, self.trainer.causal_lm))
        return _Entered(stack, model)

    def sequence_logps(self, sequences: list[Unit], model=None, answer_from: list[int] | None = None) -> SequenceLogps:
        """Summed log-probabilities of each sequence's trained (answer) tokens, in one forward pass.

        With ``answer_from`` (each sequence's first answer token), ``logps`` and ``tokens`` count the
        answer's tokens only and ``all_logps`` every trained token.
        """
        trainer = self.trainer
        model = trainer.causal_lm if model is None else model
        batch = collate(sequences, trainer.pad_id, trainer.device)
        rows = batch.positions // batch.input_ids.shape[1]
        use_autocast = trainer._autocast and model is trainer.causal_lm
        autocast = torch.autocast(trainer.device.type, dtype=trainer.compute_dtype) if use_autocast else contextlib.nullcontext()
        with autocast:
            head = model.get_output_embeddings()
            plain_head = type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad
            if trainer._head_only_where_trained and plain_head:
                hidden = model.base_model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False)[0]
                hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.positions)
                weight = head.weight if not use_autocast else head.weight.to(trainer.compute_dtype)
                hidden = hidden.to(weight.dtype)
                if torch.is_grad_enabled() and hidden.requires_grad:
                    token_nll = ChunkedTokenLogps.apply(hidden, weight, batch.targets, LOSS_CHUNK_TOKENS)
                else:
                    token_nll = ChunkedTokenLogps.forward(_NoGrad(), hidden, weight, batch.targets, LOSS_CHUNK_TOKENS)
            else:
                logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
                trained = logits.reshape(-1, logits.shape[-1]).index_select(0, batch.positions)
                token_nll = F.cross_entropy(trained.float(), batch.targets, reduction="none")
        count = len(sequences)
        weights = torch.ones_like(token_nll)
        all_logps = None
        if answer_from is not None:
            all_logps = torch.zeros(count, dtype=torch.float32, device=token_nll.device).index_add(0, rows, -token_nll)
            # position c predicts token c + 1: an answer token from the sequence's first one on
            columns = batch.positions % batch.input_ids.shape[1]
            starts = torch.tensor(answer_from, device=token_nll.device)
            weights = ((columns + 1) >= starts[rows]).float()
        logps = torch.zeros(count, dtype=torch.float32, device=token_nll.device).index_add(0, rows, -token_nll * weights)
        tokens = torch.zeros(count, dtype=torch.float32, device=token_nll.device).index_add(0, rows, weights)
        return SequenceLogps(logps, tokens, all_logps)


class _Entered:
    """A context that was already set up: ``with`` yields ``value`` and closes ``stack`` at the end."""

    def __init__(self, stack: contextlib.ExitStack, value):
        self.stack, self.value = stack, value

    def __enter__(self):
        return self.value

    def __exit__(self, *exc):
        return self.stack.__exit__(*exc)


class _NoGrad:
    """A stand-in ``ctx`` for calling :class:`ChunkedTokenLogps`' forward without autograd."""

    needs_input_grad = (False, False, False, False)

    def save_for_backward(self, *tensors):
        pass


class _DisabledAdapter:
    """``with``: the PEFT model's adapter off (the base model), yielding the causal LM to run."""

    def __init__(self, peft_model, causal_lm):
        self.peft_model, self.causal_lm = peft_model, causal_lm
        self._context = None

    def __enter__(self):
        self._context = self.peft_model.disable_adapter()
        self._context.__enter__()
        return self.causal_lm

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _pair_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums and counts (stacked, so that they add across micro-batches and steps) of the reward statistics."""
    n = torch.tensor(float(chosen.shape[0]), device=chosen.device)
    return {
        "rewards/chosen": torch.stack([chosen.sum(), n]),
        "rewards/rejected": torch.stack([rejected.sum(), n]),
        "rewards/margin": torch.stack([(chosen - rejected).sum(), n]),
        "rewards/accuracy": torch.stack([(chosen > rejected).float().sum(), n]),
    }


def _means(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    if not stats:
        return {}
    keys = list(stats)
    values = torch.stack([stats[k].float() for k in keys]).tolist()
    out = {k: (s / c if c else None) for k, (s, c) in zip(keys, values)}
    if "rewards/chosen" in out and "rewards/margin" not in out and out.get("rewards/chosen") is not None \
            and out.get("rewards/rejected") is not None:
        out["rewards/margin"] = out["rewards/chosen"] - out["rewards/rejected"]
    return {k: v for k, v in out.items() if v is not None}


def stats_means(stats: dict[str, Any]) -> dict[str, float]:
    """Means of summed statistics (as :meth:`PreferenceObjective.evaluate` returns them)."""
    return _means({k: v for k, v in stats.items() if k != "loss_sum"})
