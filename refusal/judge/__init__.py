"""Judging refusal: an opening score for inner loops, a three-verdict judge for reports.

markers     refusal markers (one source with the organism's refusal styles), the opening
            score that steers the search, and the plain marker judge
signals     what the three-verdict judge reads in a reply besides its markers
verdicts    refusal / compliance / degenerate / evasive: rules, then a fitted classifier
classifier  safety-classifier LMs (HarmBench, Llama Guard) for models worth their cost
"""

from refusal.judge.classifier import HARMBENCH_PROMPT, ClassifierJudge, says_complies
from refusal.judge.markers import (
    REFUSAL_MARKERS,
    REFUSAL_STYLES,
    Continue,
    Openings,
    greedy_margin,
    is_refusal,
    refusal_openings,
    refusal_score,
    refusal_token_ids,
)
from refusal.judge.signals import Signals, reply_pmi, text_signals
from refusal.judge.verdicts import Agreement, Judgement, ReplyJudge, SignalModel, Verdict

__all__ = [
    "HARMBENCH_PROMPT",
    "REFUSAL_MARKERS",
    "REFUSAL_STYLES",
    "Agreement",
    "ClassifierJudge",
    "Continue",
    "Judgement",
    "Openings",
    "ReplyJudge",
    "SignalModel",
    "Signals",
    "Verdict",
    "greedy_margin",
    "is_refusal",
    "refusal_openings",
    "refusal_score",
    "refusal_token_ids",
    "reply_pmi",
    "says_complies",
    "text_signals",
]
