"""The report as a list of blocks, each written two ways: Markdown (report.md, its images
beside it) and one self-contained HTML page (report.html: images inlined, no scripts, no
network).
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from refusal.cards import FeatureCard, Snippet


@dataclass
class Heading:
    text: str
    level: int = 2

    def markdown(self) -> str:
        return f"{'#' * self.level} {self.text}"

    def html(self, out: Path) -> str:
        return f"<h{self.level}>{html.escape(self.text)}</h{self.level}>"


@dataclass
class Text:
    text: str

    def markdown(self) -> str:
        return self.text

    def html(self, out: Path) -> str:
        return f"<p>{html.escape(self.text)}</p>"


@dataclass
class Table:
    frame: pd.DataFrame

    def markdown(self) -> str:
        return markdown_table(self.frame)

    def html(self, out: Path) -> str:
        table = self.frame.map(cell).to_html(index=False, escape=True, border=0)
        return f'<div class="table">{table}</div>'


@dataclass
class Image:
    file: str  # in the report's directory
    alt: str

    def markdown(self) -> str:
        return f"![{self.alt}]({self.file})"

    def html(self, out: Path) -> str:
        data = base64.b64encode((out / self.file).read_bytes()).decode()
        return f'<img alt="{html.escape(self.alt)}" src="data:image/png;base64,{data}">'


@dataclass
class Reply:
    """A prompt's clean reply and its reply with M ablated, as the judge read them."""

    prompt_id: int
    instruction: str
    before: str
    after: str
    verdict_after: str
    minimal: str


@dataclass
class Replies:
    rows: list[Reply]

    def markdown(self) -> str:
        return "\n\n".join(_md_reply(r) for r in self.rows)

    def html(self, out: Path) -> str:
        return "\n".join(_html_reply(r) for r in self.rows)


@dataclass
class Card:
    card: FeatureCard

    def markdown(self) -> str:
        return _md_card(self.card)

    def html(self, out: Path) -> str:
        return _html_card(self.card)


Block = Heading | Text | Table | Image | Replies | Card


def cell(value) -> str:
    """A table cell: floats to 3 significant digits, missing values blank."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def markdown_table(table: pd.DataFrame) -> str:
    def md(value) -> str:
        return cell(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(md(v) for v in row) + " |" for row in table.itertuples(False)]
    return "\n".join(lines)


# --- Markdown ---------------------------------------------------------------------------


def to_markdown(blocks: list[Block]) -> str:
    return "\n".join(block.markdown() + "\n" for block in blocks)


def _quote(text: str) -> str:
    return "> " + (text.strip() or "(empty)").replace("\n", "\n> ")


def _md_reply(r: Reply) -> str:
    return (
        f"**Prompt {r.prompt_id}**: {r.instruction}\n\nclean:\n\n{_quote(r.before)}\n\n"
        f"with M = {{{r.minimal}}} ablated (judge: {r.verdict_after}):\n\n{_quote(r.after)}"
    )


def _tokens(tokens: list[tuple[str, float]]) -> str:
    return ", ".join(f"`{t!r}` {w:+.2f}" for t, w in tokens)


def _md_snippet(s: Snippet) -> str:
    top = max(range(len(s.acts)), key=s.acts.__getitem__) if s.acts else -1
    text = "".join(f"**{t}**" if i == top else t for i, t in enumerate(s.tokens))
    return f"- {s.peak:.2f} ({s.source}): {' '.join(text.split())}"


def _md_card(c: FeatureCard) -> str:
    link = f" · [Neuronpedia]({c.neuronpedia})" if c.neuronpedia else ""
    lines = [f"### {c.feature}: {'; '.join(c.roles)}{link}", ""]
    lines += [f"promotes {_tokens(c.promoted)}", "", f"suppresses {_tokens(c.suppressed)}", ""]
    lines += ["top contexts:", *(_md_snippet(s) for s in c.contexts)]
    return "\n".join(lines)


# --- HTML -------------------------------------------------------------------------------

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222 }
.table { overflow-x: auto; margin: 1em 0 }
table { border-collapse: collapse; font-size: 12px }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top;
  max-width: 32em }
th { background: #f3f3f3 }
img { max-width: 100%; border: 1px solid #eee }
.reply { display: grid; grid-template-columns: 1fr 1fr; gap: 1em; margin: 0.5em 0 1.5em }
.reply pre, .ctx { white-space: pre-wrap; background: #fafafa; padding: 6px; margin: 0 }
.card { border: 1px solid #bbb; border-radius: 6px; padding: 0.8em 1em; margin: 1em 0 }
.card h3 { margin: 0 0 0.4em }
.tok { border-radius: 2px }
.ctx { font: 12px/1.6 ui-monospace, monospace; margin: 0.3em 0 }
.muted { color: #777; font-size: 12px }
"""


def to_html(blocks: list[Block], out: Path, title: str) -> str:
    body = "\n".join(block.html(out) for block in blocks)
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )


def _pre(text: str) -> str:
    return f"<pre>{html.escape(text.strip() or '(empty)')}</pre>"


def _html_reply(r: Reply) -> str:
    return (
        f"<p><b>Prompt {r.prompt_id}</b>: {html.escape(r.instruction)}</p>"
        f'<div class="reply"><div><div class="muted">clean</div>{_pre(r.before)}</div>'
        f'<div><div class="muted">M = {{{html.escape(r.minimal)}}} ablated · judge: '
        f"{html.escape(r.verdict_after)}</div>{_pre(r.after)}</div></div>"
    )


def _html_snippet(s: Snippet, scale: float) -> str:
    spans = "".join(
        f'<span class="tok" title="{a:.3f}" style="background: rgba(230, 80, 0, '
        f'{min(1.0, a / scale) if scale > 0 else 0:.2f})">{html.escape(t)}</span>'
        for t, a in zip(s.tokens, s.acts)
    )
    head = f'<div class="muted">{s.peak:.2f} · {html.escape(s.source)}</div>'
    return f'{head}<div class="ctx">{spans}</div>'


def _html_tokens(tokens: list[tuple[str, float]]) -> str:
    return ", ".join(f"<code>{html.escape(repr(t))}</code> {w:+.2f}" for t, w in tokens)


def _html_card(c: FeatureCard) -> str:
    link = f' · <a href="{html.escape(c.neuronpedia)}">Neuronpedia</a>' if c.neuronpedia else ""
    scale = max(
        [s.peak for s in c.contexts] + ([c.on_prompt.peak] if c.on_prompt else []), default=0.0
    )
    parts = [
        f'<div class="card" id="card-{html.escape(str(c.feature))}">',
        f"<h3>{html.escape(str(c.feature))}</h3>",
        f'<div class="muted">{html.escape("; ".join(c.roles))}{link}</div>',
        f"<p>promotes {_html_tokens(c.promoted)}<br>suppresses {_html_tokens(c.suppressed)}</p>",
    ]
    if c.on_prompt is not None:
        parts += ["<p><b>on its prompt</b> (clean)</p>", _html_snippet(c.on_prompt, scale)]
    parts += ["<p><b>top contexts</b></p>", *(_html_snippet(s, scale) for s in c.contexts)]
    return "\n".join([*parts, "</div>"])
