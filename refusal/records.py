"""Typed records of every row a run writes, and their JSON form.

`results.jsonl` holds one row per (stage, prompt): BaselineRecord for every evaluation
prompt; GreedyRecord, VerificationRecord, InteractionsRecord, DormantRecord and
CapabilityRecord for each refused prompt the stages reach. `direction.json` is a
DirectionRecord, `summary.json` a Summary. Features are `Feature` objects here and their
one text form (`L12/255`) in JSON. The per-prompt table, the summary, W&B and the report
read these records (PromptResult joins a prompt's rows), never the raw JSON.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from statistics import median
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, TypeAdapter

from refusal.errors import RefusalError
from refusal.features import Feature

RESULTS = "results.jsonl"


def _feature(value: Any) -> Feature:
    return value if isinstance(value, Feature) else Feature.parse(value)


# A Feature in Python, its text form in JSON.
FeatureField = Annotated[
    Feature, BeforeValidator(_feature), PlainSerializer(str, return_type=str, when_used="json")
]


class Model(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class Row(Model):
    """A row of results.jsonl: one stage's result for one prompt."""

    stage: str  # each record's own name (a Literal)
    prompt_id: int
    seconds: float = 0.0  # wall time of the stage on this prompt
    evals: int = 0  # masks the engine scored in the stage on this prompt (distinct rows)


class BaselineRecord(Row):
    stage: Literal["baseline"] = "baseline"
    instruction: str
    score: float  # clean opening score
    reply: str
    refused: bool  # opening score above threshold and the generation judge agrees


class Candidate(Model):
    feature: FeatureField
    cos: float  # decoder row's cosine to the refusal direction


class GreedyRecord(Row):
    stage: Literal["greedy"] = "greedy"
    clean_score: float
    candidates: list[Candidate]
    flips_all: bool = False  # ablating every candidate flips the prompt
    minimal: list[FeatureField] = Field(default_factory=list)
    score: float | None = None  # refusal score with M ablated (all candidates if no flip)
    n_masks: int = 0  # masks greedy filtering asked for, repeats included
    batches: int = 0  # engine calls
    one_minimal: bool = False  # every single removal was checked to restore refusal

    @property
    def size(self) -> int:
        return len(self.minimal)


class VerificationRecord(Row):
    stage: Literal["verification"] = "verification"
    reply_after: str  # greedy reply with M ablated
    flip_verified: bool  # the generation judge no longer calls it a refusal


class MainEffect(Model):
    feature: FeatureField
    w: float


class Pair(Model):
    a: FeatureField
    b: FeatureField
    interaction: float  # ⟨v_a, v_b⟩


class FMReadout(Model):
    """The FM's effects and pairs, and how it predicts flips on the test masks (None where
    they hold one class only, and in rows written before there was a test split)."""

    test_auc: float | None = None  # the FM's
    additive_test_auc: float | None = None  # the same model without pairwise terms
    all_of_m_auc: float | None = None  # the rule "every feature of M ablated"
    interaction_gain: float | None = None  # test_auc − additive_test_auc
    gain_interval: tuple[float, float] | None = None  # its 95 % bootstrap interval
    interactions_significant: bool = False  # the interval lies above zero
    n_distinct_masks: int | None = None  # the masks sampled, each once
    n_test: int | None = None  # of them, the test masks
    main_effects: list[MainEffect]
    top_pairs: list[Pair]  # strongest |⟨vᵢ,vⱼ⟩|
    interactions: list[list[float]]  # the full ⟨vᵢ,vⱼ⟩ matrix, for heatmaps
    checkpoint: str | None
    epochs: int


class InteractionsRecord(Row, FMReadout):
    stage: Literal["interactions"] = "interactions"
    features: list[FeatureField]  # M, then the extra features sampled beside it
    n_masks: int  # masks asked for (search.fm.n_masks); n_distinct_masks were drawn
    flip_fraction: float


class DormantFeature(Model):
    feature: FeatureField
    before: float  # max activation on the clean prompt
    after: float  # max activation with the earlier features of M ablated
    score_without: float  # refusal score, earlier M ablated
    score_with: float  # refusal score, earlier M and this latent ablated
    effect: float  # score_with − score_without (negative: it was holding refusal up)


class DormantRecord(Row):
    stage: Literal["dormant"] = "dormant"
    features: list[DormantFeature]


class CapabilityRecord(Row):
    stage: Literal["capability"] = "capability"
    harmless_kl: float  # mean first-token KL on harmless prompts with M ablated


Record = Annotated[
    BaselineRecord
    | GreedyRecord
    | VerificationRecord
    | InteractionsRecord
    | DormantRecord
    | CapabilityRecord,
    Field(discriminator="stage"),
]
_ROW = TypeAdapter(Record)


def parse_row(row: dict[str, Any]) -> Record:
    """The record of one JSON line of results.jsonl."""
    if row.get("stage") == "search":
        raise RefusalError(
            "this run directory was written by an older version of refusal (one `search` row "
            "per prompt); rerun it without resume=true, into a new directory."
        )
    return _ROW.validate_python(row)


class DirectionScore(Model):
    layer: int
    position: int  # negative offset from the end of the prompt
    bypass: float  # refusal score on harmful val prompts with r ablated everywhere
    induce: float  # refusal score on harmless val prompts with r added at its layer
    kl: float  # first-token KL on harmless val prompts with r ablated


class PromptCount(Model):
    """One prompt set of the direction through the baseline filter."""

    kept: int  # harmful: refused by the model; harmless: not refused
    dropped: int


class DirectionRecord(Model):
    """direction.json: the chosen (layer, position), how it was chosen, the prompts it was
    taken from, and every candidate's scores."""

    layer: int
    position: int
    admissible: bool  # it passed both filters (induce and KL); false: a fallback chose it
    chosen_by: str  # "induce and KL", or the fallback: "induce only", "KL only", "bypass only"
    # per set (harmful_train, harmless_train, harmful_val, harmless_val): prompts kept and
    # dropped by the baseline filter; empty where search.direction.filter_prompts=false
    prompts: dict[str, PromptCount]
    scores: list[DirectionScore]


@dataclass
class PromptResult:
    """One evaluation prompt's rows, joined: what tables, W&B and the report show."""

    baseline: BaselineRecord
    greedy: GreedyRecord | None = None
    verification: VerificationRecord | None = None
    interactions: InteractionsRecord | None = None
    dormant: DormantRecord | None = None
    capability: CapabilityRecord | None = None

    def add(self, record: Record) -> None:
        if not isinstance(record, BaselineRecord):
            setattr(self, record.stage, record)

    @property
    def stages(self) -> list[str]:
        """The search stages with a row for this prompt, in run order."""
        return [r.stage for r in self.search_rows]

    @property
    def prompt_id(self) -> int:
        return self.baseline.prompt_id

    @property
    def instruction(self) -> str:
        return self.baseline.instruction

    @property
    def searched(self) -> bool:
        return self.greedy is not None

    @property
    def flips_all(self) -> bool:
        return self.greedy is not None and self.greedy.flips_all

    @property
    def flip_verified(self) -> bool:
        return self.verification is not None and self.verification.flip_verified

    @property
    def minimal(self) -> list[Feature]:
        """M where the flip was verified by generation, else nothing."""
        return self.greedy.minimal if self.flip_verified and self.greedy else []

    @property
    def fm_auc(self) -> float | None:
        """The FM's AUC on its test masks."""
        return self.interactions.test_auc if self.interactions else None

    @property
    def interaction_gain(self) -> float | None:
        return self.interactions.interaction_gain if self.interactions else None

    @property
    def dormant_features(self) -> list[DormantFeature]:
        return self.dormant.features if self.dormant else []

    @property
    def harmless_kl(self) -> float | None:
        return self.capability.harmless_kl if self.capability else None

    @property
    def search_rows(self) -> list[Row]:
        rows = (self.greedy, self.verification, self.interactions, self.dormant, self.capability)
        return [r for r in rows if r is not None]

    @property
    def seconds(self) -> float:
        """Search time: every stage after the baseline."""
        return sum(r.seconds for r in self.search_rows)

    @property
    def evals(self) -> int:
        return sum(r.evals for r in self.search_rows)


def join(records: list[Record]) -> list[PromptResult]:
    """PromptResults in prompt order from rows in any order (a resumed run's included)."""
    results = {r.prompt_id: PromptResult(r) for r in records if isinstance(r, BaselineRecord)}
    for record in records:
        if not isinstance(record, BaselineRecord) and record.prompt_id in results:
            results[record.prompt_id].add(record)
    return [results[i] for i in sorted(results)]


class Summary(Model):
    """summary.json: a run's headline numbers (lists run over the verified flips)."""

    n_eval: int
    n_refused: int
    n_flipped_verified: int
    flip_rate: float | None
    minimal_set_sizes: list[int]
    all_minimal_verified: bool
    fm_heldout_auc: list[float | None]  # the FM's AUC on its test masks
    median_interaction_gain: float | None = None  # FM over additive test AUC, median
    n_interactions_significant: int = 0  # verified flips whose gain lies above zero
    harmless_kl: list[float | None]
    n_dormant: int
    direction: dict[str, int] | None
    evals_per_s: float | None
    batch_size: int | None
    seconds_per_prompt: list[float]
    median_seconds_per_prompt: float | None
    wall_seconds: float
    seed: int
    versions: dict[str, str] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(
        cls, results: list[PromptResult], direction: DirectionRecord | None, **run: Any
    ) -> Summary:
        """The summary of a run's prompt results; `run` adds batch_size, wall_seconds, seed,
        versions and config."""
        searched = [r for r in results if r.searched]
        flipped = [r for r in searched if r.flip_verified and r.greedy]
        n_refused = sum(r.baseline.refused for r in results)
        evals, seconds = sum(r.evals for r in searched), sum(r.seconds for r in searched)
        return cls(
            n_eval=len(results),
            n_refused=n_refused,
            n_flipped_verified=len(flipped),
            flip_rate=len(flipped) / n_refused if n_refused else None,
            minimal_set_sizes=[r.greedy.size for r in flipped if r.greedy],
            all_minimal_verified=all(r.greedy.one_minimal for r in flipped if r.greedy),
            fm_heldout_auc=[r.fm_auc for r in flipped],
            median_interaction_gain=median_or_none([r.interaction_gain for r in flipped]),
            n_interactions_significant=sum(
                r.interactions is not None and r.interactions.interactions_significant
                for r in flipped
            ),
            harmless_kl=[r.harmless_kl for r in flipped],
            n_dormant=sum(len(r.dormant_features) for r in flipped),
            direction=None
            if direction is None
            else {"layer": direction.layer, "position": direction.position},
            evals_per_s=evals / seconds if seconds else None,
            seconds_per_prompt=[r.seconds for r in searched],
            median_seconds_per_prompt=median(r.seconds for r in searched) if searched else None,
            **run,
        )


def mean_or_none(values: Sequence[float | None]) -> float | None:
    """The mean of the values measured, or None for none (nothing measured is not zero)."""
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def median_or_none(values: Sequence[float | None]) -> float | None:
    """The median of the values measured, or None for none."""
    present = [v for v in values if v is not None]
    return median(present) if present else None
