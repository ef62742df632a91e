"""The table of heads: what each head predicts, how a record's field becomes its target, its
training loss and its validation metrics. Every other module reads `HEADS` instead of naming
heads, so adding a head is one entry here plus, where it needs its own, its loss and metrics.

Modules read `HEADS` when they are called, not when they are imported (`from redheart import
heads`, then `heads.HEADS`): a test extends the table for its duration (tests/test_heads.py).

A head is of one of three kinds, which settles what is common to its kind:

- `classes`: a distribution over classes (emotion). Logits out; softmax gives the shares.
- `shares`: shares of a whole that sum to 1 (SURD). Logits out; softmax gives the shares.
- `values`: independent values in [0, 1] (Bentham, regret). Logits out, so that the loss keeps
  a gradient where the sigmoid saturates (redheart/train/losses.py); sigmoid gives the values.
  Each value is labelled or not on its own (the mask is per element).

A one-value head gives a tensor of shape (B,), any other (B, size). Module names, metric keys
(`{name}_{metric}`, `{name}_loss`), config keys (`train.head_weights.{name}`) and checkpoint
keys (`{name}.` prefixes) all come from a head's `name`.

The config and the record schema read this table, and the command line checks them before it
imports torch (a bad data file fails at once, tests/test_cli_errors.py): so torch is used
through the tensors' own methods here, and imported inside the two functions that need more.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

EMOTIONS = ("joy", "trust", "fear", "surprise", "sadness", "disgust", "anger")
BENTHAM = ("intensity", "duration", "certainty", "propinquity", "purity",
           "extent", "fecundity", "remoteness", "succession", "utility")
SURD = ("synergy", "unique", "redundant", "deterministic")
KINDS = ("classes", "shares", "values")


@dataclass(frozen=True)
class LossOptions:
    """The techniques that change a head's training loss (the config's `tech` section)."""
    smoothing: float = 0.0  # label smoothing of the distributions (tech.label_smoothing)
    smooth_shares: bool = True  # also of `shares` heads (tech.smooth_surd)
    values: str = "bce"  # the loss of `values` heads: bce | mse (tech.value_loss)


@dataclass(frozen=True)
class Score:
    """A validation metric of a head, `{head}_{name}` in the metrics record."""
    name: str
    higher_is_better: bool
    # shown with its best epoch in the end-of-run summary (ECE is not: the summary's
    # calibration line speaks of it)
    in_summary: bool = True


@dataclass(frozen=True)
class Head:
    """One head: its entry in the table."""
    name: str  # module, tower attribute, record field, metric and loss key
    size: int  # outputs of its tower
    kind: str  # classes | shares | values (module docstring)
    # per item (a sample; for `values` heads an element) from logits and target: unreduced
    loss: Callable[[torch.Tensor, torch.Tensor, LossOptions], torch.Tensor]
    # from the labelled items' predictions (`prediction`) and targets: {"loss": the validation
    # loss, name: value for each of `scores`}
    metrics: Callable[[torch.Tensor, torch.Tensor], dict[str, float]]
    scores: tuple[Score, ...]
    label: str  # how text names it mid-sentence ("emotion", "Bentham"); capitalised for titles
    loss_unit: str  # what its validation loss is, for plot axes
    labels: tuple[str, ...] = ()  # names of its values (predict's output); none for a one-value head
    # its loss weighed by the number of votes the record's shares come from (Scruples' regret
    # and Bentham certainty are vote shares; redheart.data.dataset.vote_weights)
    vote_weighted: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"head {self.name}: kind {self.kind!r} is none of {KINDS}")
        if len(self.labels) != (self.size if self.size > 1 else 0):  # predict writes values by name
            raise ValueError(f"head {self.name}: {len(self.labels)} labels for {self.size} outputs "
                             "(a head of several values names each, a one-value head none)")

    @property
    def per_element(self) -> bool:
        """Whether each value is labelled on its own (else a sample's target is whole or missing)."""
        return self.kind == "values"

    def shape(self, n: int) -> tuple[int, ...]:
        """The shape of n samples' outputs and targets."""
        return (n,) if self.size == 1 else (n, self.size)

    def mask_shape(self, n: int) -> tuple[int, ...]:
        return self.shape(n) if self.per_element else (n,)

    def target(self, value: Any) -> tuple[list[float], list[bool]]:
        """A record's field (None: missing) as a target row and its mask (`mask_shape` of one
        sample, flat): zeros where unlabelled, never a filled-in value."""
        if value is None:
            return [0.0] * self.size, [False] * (self.size if self.per_element else 1)
        if not self.per_element:
            return [float(v) for v in value], [True]
        items = [value] if self.size == 1 else value
        return [0.0 if v is None else float(v) for v in items], [v is not None for v in items]

    def prediction(self, logits: torch.Tensor) -> torch.Tensor:
        """The tower's output as the prediction the metrics take: values in [0, 1] for a
        `values` head (sigmoid), logits for a distribution (softmax gives its shares)."""
        return logits.float().sigmoid() if self.kind == "values" else logits

    def consistency(self, logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
        """R-Drop's term between two dropout passes, per item: the symmetric KL of the
        distributions, the squared difference of the [0, 1] values."""
        if self.kind == "values":
            return (logits_a.float().sigmoid() - logits_b.float().sigmoid()).pow(2)
        return symmetric_kl(logits_a, logits_b)

    def output(self, prediction: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """Predictions (`prediction`) as predict gives them: a distribution's shares (softmax of
        its logits over `temperature`), the [0, 1] values as they are."""
        return prediction if self.kind == "values" else (prediction.float() / temperature).softmax(-1)

    def named(self, row: torch.Tensor) -> float | dict[str, float]:
        """One text's `output` by the names of its values, rounded; a one-value head's as a number."""
        if not self.labels:
            return round(float(row), 4)
        return {n: round(float(v), 4) for n, v in zip(self.labels, row)}


# --- losses (per item, from logits) ----------------------------------------------------------


def smooth(target: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Label smoothing of a soft target: (1 - e) * t + e / K."""
    if smoothing == 0.0:
        return target
    return target * (1.0 - smoothing) + smoothing / target.shape[-1]


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    """Per-sample cross-entropy against a soft target, from logits (never from probabilities)."""
    return -(smooth(target, smoothing) * logits.float().log_softmax(-1)).sum(-1)


def value_loss(logits: torch.Tensor, target: torch.Tensor, kind: str = "bce") -> torch.Tensor:
    """Element-wise loss of a [0, 1] head from its logits: `bce` (binary cross-entropy against
    the soft target) or `mse` (squared error of the sigmoid)."""
    import torch.nn.functional as F

    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return (logits.float().sigmoid() - target).pow(2)


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor) -> torch.Tensor:
    """Per-sample 0.5 * (KL(p_a || p_b) + KL(p_b || p_a))."""
    la, lb = logits_a.float().log_softmax(-1), logits_b.float().log_softmax(-1)
    return 0.5 * ((la.exp() * (la - lb)).sum(-1) + (lb.exp() * (lb - la)).sum(-1))


def class_loss(logits: torch.Tensor, target: torch.Tensor, opts: LossOptions) -> torch.Tensor:
    return soft_cross_entropy(logits, target, opts.smoothing)


def share_loss(logits: torch.Tensor, target: torch.Tensor, opts: LossOptions) -> torch.Tensor:
    return soft_cross_entropy(logits, target, opts.smoothing if opts.smooth_shares else 0.0)


def bounded_loss(logits: torch.Tensor, target: torch.Tensor, opts: LossOptions) -> torch.Tensor:
    return value_loss(logits, target, opts.values)


# --- metrics (of a split's labelled items) ---------------------------------------------------


def macro_f1(pred: torch.Tensor, gold: torch.Tensor, classes: int) -> float:
    """Macro-F1 over the classes that occur in the gold labels or the predictions."""
    f1s = []
    for c in range(classes):
        tp = int(((pred == c) & (gold == c)).sum())
        fp = int(((pred == c) & (gold != c)).sum())
        fn = int(((pred != c) & (gold == c)).sum())
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return sum(f1s) / len(f1s) if f1s else float("nan")


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() < 2:
        return float("nan")
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    denom = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


def expected_calibration_error(logits: torch.Tensor, target: torch.Tensor, bins: int = 15,
                               temperature: float = 1.0) -> float:
    """ECE of a softmax head (Guo et al., 2017): the texts binned by their top predicted share,
    each bin's |accuracy - mean top share| weighted by its size; a prediction is right when its
    argmax is the argmax of the (soft) target."""
    import torch

    p = (logits.double() / temperature).softmax(-1)
    conf, pred = p.max(-1)
    right = (pred == target.argmax(-1)).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            ece += float(inside.double().mean()) * abs(float(right[inside].mean() - conf[inside].mean()))
    return ece


def class_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Cross-entropy (no smoothing); accuracy and macro-F1 against the argmax of the soft
    target; the expected calibration error of the shares."""
    p, g = logits.argmax(-1), target.argmax(-1)
    return {"loss": float(soft_cross_entropy(logits, target).mean()), "acc": float((p == g).float().mean()),
            "f1": macro_f1(p, g, logits.shape[-1]), "ece": expected_calibration_error(logits, target)}


def value_metrics(values: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """MSE, MAE and Pearson r over the labelled values."""
    return {"loss": float((values - target).pow(2).mean()), "mae": float((values - target).abs().mean()),
            "r": pearson(values, target)}


def share_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """Cross-entropy (no smoothing) and the MAE of the shares."""
    return {"loss": float(soft_cross_entropy(logits, target).mean()),
            "mae": float((logits.softmax(-1) - target).abs().mean())}


# --- the table -------------------------------------------------------------------------------

VALUE_SCORES = (Score("mae", False), Score("r", True))

HEADS: tuple[Head, ...] = (
    Head(name="emotion", size=len(EMOTIONS), kind="classes", labels=EMOTIONS, loss=class_loss,
         metrics=class_metrics, scores=(Score("acc", True), Score("f1", True), Score("ece", False, in_summary=False)),
         label="emotion", loss_unit="cross-entropy (nats)"),
    Head(name="bentham", size=len(BENTHAM), kind="values", labels=BENTHAM, loss=bounded_loss,
         metrics=value_metrics, scores=VALUE_SCORES, label="Bentham", loss_unit="MSE (targets in [0, 1])",
         vote_weighted=True),
    Head(name="regret", size=1, kind="values", loss=bounded_loss,
         metrics=value_metrics, scores=VALUE_SCORES, label="regret", loss_unit="MSE (target in [0, 1])",
         vote_weighted=True),
    Head(name="surd", size=len(SURD), kind="shares", labels=SURD, loss=share_loss,
         metrics=share_metrics, scores=(Score("mae", False),), label="SURD", loss_unit="cross-entropy (nats)"),
)


def names() -> tuple[str, ...]:
    """The heads' names, in table order (the order of towers, losses and metrics)."""
    return tuple(h.name for h in HEADS)


def modules() -> tuple[str, ...]:
    """The modules (the unit of Sweet Spot and Crossover): the backbone, then one per head."""
    return ("backbone", *names())


def get(name: str) -> Head:
    for h in HEADS:
        if h.name == name:
            return h
    raise KeyError(f"no head {name!r} (heads: {', '.join(names())})")


def score_keys(summary_only: bool = False) -> list[tuple[str, bool]]:
    """The validation metrics by which runs and models are compared, with whether higher is
    better: the combined loss, then each head's scores in table order."""
    return [("loss", False)] + [(f"{h.name}_{s.name}", s.higher_is_better) for h in HEADS for s in h.scores
                                if s.in_summary or not summary_only]
