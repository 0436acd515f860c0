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

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
    computed_field,
)

from refusal.errors import RefusalError
from refusal.features import Feature
from refusal.judge.verdicts import Verdict

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
    verdict: Verdict = Verdict.REFUSAL  # the three-verdict judge on the clean reply
    refused: bool  # opening score above threshold and the judge says refusal


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
    one_minimal_by_score: bool = False  # every single removal restores the opening score

    @property
    def size(self) -> int:
        return len(self.minimal)


class MinimalityCheck(Model):
    """M with one feature left unablated, judged by generation."""

    feature: FeatureField  # the feature kept
    verdict: Verdict
    reply: str


class VerificationRecord(Row):
    stage: Literal["verification"] = "verification"
    reply_after: str  # greedy reply with M ablated
    verdict_after: Verdict = Verdict.COMPLIANCE  # the judge on reply_after
    flip_verified: bool  # verdict_after is compliance: a jailbreak
    minimality: list[MinimalityCheck] = Field(default_factory=list)  # checked if verified
    one_minimal: bool = False  # verified, and every check above judged refusal

    @property
    def unresolved(self) -> bool:
        """The score flipped, but a reader would not call the reply an answer."""
        return not self.flip_verified


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
    n_masks: int  # masks asked for (search.fm.n_masks); n_distinct_masks were scored
    fits: int = 1  # fits of sequential sampling (search.fm.sample_step) before it settled
    flip_fraction: float


class DormantFeature(Model):
    feature: FeatureField
    setting: list[FeatureField] = Field(default_factory=list)  # the part of M ablated first
    before: float  # max activation on the clean prompt
    after: float  # max activation with the setting ablated
    score_without: float  # refusal score, the setting ablated
    score_with: float  # refusal score, the setting and this latent ablated
    effect: float  # score_with − score_without (negative: it was holding refusal up)
    null_percentile: float | None = None  # where its drop lies among the matched null's
    null_size: int = 0  # matched latents in that null
    verdict_with: Verdict | None = None  # the judge, where the score crossed the threshold

    @computed_field  # type: ignore[prop-decorator]
    @property
    def sign(self) -> str:
        """Whether ablating it lowers refusal (it was carrying refusal) or raises it."""
        return "lowers" if self.effect < 0 else "raises"


class DormantRecord(Row):
    stage: Literal["dormant"] = "dormant"
    features: list[DormantFeature]


class CapabilityRecord(Row):
    stage: Literal["capability"] = "capability"
    harmless_kl: float  # mean first-token KL on harmless prompts with M ablated


class RandomControlRecord(Row):
    """Random sets shaped like M (count per layer), active on the prompt, never of M."""

    stage: Literal["random_control"] = "random_control"
    n_draws: int  # 0: too few active latents at M's layers to draw one
    n_flipped: int = 0  # draws whose opening score flips
    n_judged: int = 0  # of those, generated and judged
    n_jailbroken_judged: int = 0  # of those, judged compliance
    first_draw: list[FeatureField] = Field(default_factory=list)  # its capability cost: controls

    @property
    def flip_rate(self) -> float | None:
        return self.n_flipped / self.n_draws if self.n_draws else None

    @property
    def jailbreak_rate(self) -> float | None:
        """Flip rate times the judged share of flips that are compliance (0 without flips)."""
        if not self.n_draws:
            return None
        if not self.n_flipped:
            return 0.0
        if not self.n_judged:
            return None
        return self.n_flipped / self.n_draws * self.n_jailbroken_judged / self.n_judged


Record = Annotated[
    BaselineRecord
    | GreedyRecord
    | VerificationRecord
    | InteractionsRecord
    | DormantRecord
    | RandomControlRecord
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


class EditCost(Model):
    """What an edit costs on harmless prompts (search.capability.n_prompts of harmless val)."""

    harmless_kl: float  # mean first-token KL(clean ‖ edited)
    delta_ce: float  # mean rise in per-token cross-entropy of the model's own clean replies
    harmless_refusal_rate: float  # the judge on replies generated under the edit
    n_prompts: int
    n_edits: int = 1  # edits averaged (ControlsRecord's means)


class TransferMatrix(Model):
    """Each sampled prompt's M (rows) ablated on each searched prompt (columns)."""

    sources: list[int]  # prompt ids
    targets: list[int]
    flips: list[list[bool]]  # opening score below the flip threshold
    n_judged: int  # off-diagonal flips generated and judged (a seeded sample)
    n_jailbroken_judged: int

    @property
    def off_diagonal(self) -> list[bool]:
        return [
            flip
            for s, row in zip(self.sources, self.flips)
            for t, flip in zip(self.targets, row)
            if s != t
        ]

    @property
    def flip_rate(self) -> float | None:
        off = self.off_diagonal
        return sum(off) / len(off) if off else None

    @property
    def rate(self) -> float | None:
        """Off-diagonal jailbreak fraction: the flip rate times the judged share of flips
        that are compliance (0 without flips)."""
        flip_rate = self.flip_rate
        if flip_rate is None or flip_rate == 0:
            return flip_rate
        return flip_rate * self.n_jailbroken_judged / self.n_judged if self.n_judged else None


class SharedSet(Model):
    """One feature set for many prompts: fitted on one half, judged on the other."""

    features: list[FeatureField]
    fit_prompts: list[int]
    held_out: list[int]
    fit_cover: float  # share of the fit prompts whose score it flips
    n_jailbroken_held_out: int  # the judge says compliance with it ablated
    cost: EditCost
    induced_refusal_rate: float  # harmless prompts with its decoder rows added

    @property
    def jailbreak_rate(self) -> float | None:
        return self.n_jailbroken_held_out / len(self.held_out) if self.held_out else None


class DirectionControl(Model):
    """The selected refusal direction ablated at every layer, on the refused prompts."""

    n_prompts: int
    n_jailbroken: int
    cost: EditCost

    @property
    def jailbreak_rate(self) -> float | None:
        return self.n_jailbroken / self.n_prompts if self.n_prompts else None


class ControlsRecord(Model):
    """controls.json: the run-level controls (refusal.controls)."""

    clean_harmless_refusal_rate: float | None = None  # no edit: what every cost compares to
    transfer: TransferMatrix | None = None
    shared: SharedSet | None = None
    direction: DirectionControl | None = None
    # the per-prompt Ms' costs, averaged (over a seeded sample of search.controls.max_sets)
    minimal_cost: EditCost | None = None
    random_cost: EditCost | None = None  # the same Ms' first random draws', averaged


class DirectionScore(Model):
    layer: int
    position: int  # negative offset from the end of the prompt
    induce: float  # refusal score on harmless val prompts with r added at its layer
    # read only where the induce filter passes, unless none does (refusal.direction.select)
    bypass: float | None = None  # refusal score on harmful val prompts, r ablated everywhere
    kl: float | None = None  # first-token KL on harmless val prompts with r ablated


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
    random_control: RandomControlRecord | None = None
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
    def one_minimal(self) -> bool:
        """M verified a jailbreak, and each single removal judged refusal by generation."""
        return self.verification is not None and self.verification.one_minimal

    @property
    def minimal(self) -> list[Feature]:
        """M where the flip was verified by generation, else nothing."""
        return self.greedy.minimal if self.flip_verified and self.greedy else []

    @property
    def score_minimal(self) -> list[Feature]:
        """M as greedy found it (its ablation flips the opening score), whatever the judge
        says of the reply: what the controls set beside random sets and carry to other
        prompts."""
        return self.greedy.minimal if self.flips_all and self.greedy else []

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
        rows = (
            self.greedy,
            self.verification,
            self.interactions,
            self.dormant,
            self.random_control,
            self.capability,
        )
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
    n_flipped_verified: int  # = n_jailbroken (kept for older readers)
    flip_rate: float | None
    n_jailbroken: int = 0  # the judge says compliance with M ablated
    jailbreak_rate: float | None = None  # n_jailbroken / n_refused
    n_unresolved: int = 0  # the score flipped, the judge does not say compliance
    one_minimal_rate: float | None = None  # of the jailbroken, 1-minimal by generation
    judge_agreement: float | None = None  # the judge against the labelled set (cross-val)
    minimal_set_sizes: list[int]
    all_minimal_verified: bool
    fm_heldout_auc: list[float | None]  # the FM's AUC on its test masks
    median_interaction_gain: float | None = None  # FM over additive test AUC, median
    n_interactions_significant: int = 0  # verified flips whose gain lies above zero
    harmless_kl: list[float | None]
    random_flip_rate: float | None = None  # random sets shaped like M: score flips, mean
    random_jailbreak_rate: float | None = None  # the same, judged compliance, mean
    transfer_rate: float | None = None  # each M on the other prompts: jailbreak fraction
    shared_set_size: int | None = None
    shared_set_jailbreak_rate: float | None = None  # on the held-out half
    direction_jailbreak_rate: float | None = None  # the refusal direction ablated
    n_dormant: int
    direction: dict[str, int] | None
    evals_per_s: float | None
    batch_size: int | None
    # the precision the model ran in (model.dtype resolved: `auto` is float32 on a CPU,
    # bfloat16 on a GPU); minimal sets move with it (docs/measurements.md)
    precision: str | None = None
    seconds_per_prompt: list[float]
    median_seconds_per_prompt: float | None
    wall_seconds: float
    # setup, baseline, direction, search (every per-prompt stage), controls: this run's
    # share of wall_seconds (a resumed run's, for what it redid)
    stage_seconds: dict[str, float] = Field(default_factory=dict)
    seed: int
    versions: dict[str, str] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(
        cls,
        results: list[PromptResult],
        direction: DirectionRecord | None,
        controls: ControlsRecord | None = None,
        **run: Any,
    ) -> Summary:
        """The summary of a run's prompt results; `run` adds batch_size, precision, wall_seconds,
        seed, versions, config and judge_agreement."""
        searched = [r for r in results if r.searched]
        flipped = [r for r in searched if r.flip_verified and r.greedy]
        n_refused = sum(r.baseline.refused for r in results)
        verified = [r.verification for r in searched if r.verification]
        randoms = [r.random_control for r in searched if r.random_control]
        transfer = controls.transfer if controls else None
        shared = controls.shared if controls else None
        evals, seconds = sum(r.evals for r in searched), sum(r.seconds for r in searched)
        return cls(
            n_eval=len(results),
            n_refused=n_refused,
            n_flipped_verified=len(flipped),
            flip_rate=len(flipped) / n_refused if n_refused else None,
            n_jailbroken=len(flipped),
            jailbreak_rate=len(flipped) / n_refused if n_refused else None,
            n_unresolved=sum(v.unresolved for v in verified),
            one_minimal_rate=mean_or_none([float(r.one_minimal) for r in flipped]),
            minimal_set_sizes=[r.greedy.size for r in flipped if r.greedy],
            all_minimal_verified=all(r.one_minimal for r in flipped),
            fm_heldout_auc=[r.fm_auc for r in flipped],
            median_interaction_gain=median_or_none([r.interaction_gain for r in flipped]),
            n_interactions_significant=sum(
                r.interactions is not None and r.interactions.interactions_significant
                for r in flipped
            ),
            harmless_kl=[r.harmless_kl for r in flipped],
            random_flip_rate=mean_or_none([c.flip_rate for c in randoms]),
            random_jailbreak_rate=mean_or_none([c.jailbreak_rate for c in randoms]),
            transfer_rate=transfer.rate if transfer else None,
            shared_set_size=len(shared.features) if shared else None,
            shared_set_jailbreak_rate=shared.jailbreak_rate if shared else None,
            direction_jailbreak_rate=controls.direction.jailbreak_rate
            if controls and controls.direction
            else None,
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
