"""The report as a list of blocks, rendered to Markdown (images linked) and to one self-contained HTML
file (images inlined as base64 data URIs, inline CSS, and a Content-Security-Policy that lets the page
load nothing else)."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

#: cell classes: the best / second-best value of a column (the paper's dark / light blue), a reference
#: row (oracle), a value that was not run
BEST, SECOND, REF, NA = "best", "second", "ref", "na"


@dataclass
class Cell:
    text: str
    cls: str = ""
    sub: str = ""  # secondary text (an interval), shown small


@dataclass
class Table:
    caption: str
    header: list[str]
    rows: list[list[Cell] | str]  # a str row is a group title spanning the table
    note: str = ""


@dataclass
class Image:
    path: Path
    alt: str
    caption: str = ""


@dataclass
class Para:
    text: str


@dataclass
class Heading:
    text: str
    level: int = 2
    anchor: str = ""


@dataclass
class Document:
    title: str
    blocks: list = field(default_factory=list)

    def add(self, *blocks) -> None:
        self.blocks.extend(blocks)


# ---------------------------------------------------------------------------------------- markdown
def _md_cell(c: Cell) -> str:
    t = c.text + (f" {c.sub}" if c.sub else "")
    t = t.replace("|", "\\|")
    if c.cls == BEST:
        return f"**{t}**"
    if c.cls == SECOND:
        return f"*{t}*"
    return t


def to_markdown(doc: Document, out: Path) -> str:
    lines = [f"# {doc.title}", ""]
    for b in doc.blocks:
        if isinstance(b, Heading):
            lines += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            lines += [b.text, ""]
        elif isinstance(b, Image):
            lines += [f"![{b.alt}]({b.path.relative_to(out).as_posix()})", ""]
            if b.caption:
                lines += [f"*{b.caption}*", ""]
        elif isinstance(b, Table):
            lines += [f"**{b.caption}**", ""] if b.caption else []
            lines.append("| " + " | ".join(h.replace("|", "\\|") for h in b.header) + " |")
            lines.append("|" + "|".join(["---"] + ["---:"] * (len(b.header) - 1)) + "|")
            for r in b.rows:
                if isinstance(r, str):
                    lines.append(f"| **{r}** |" + " |" * (len(b.header) - 1))
                else:
                    lines.append("| " + " | ".join(_md_cell(c) for c in r) + " |")
            lines.append("")
            if b.note:
                lines += [b.note, ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- html
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto; max-width: 72rem;
       padding: 0 1rem; color: #1b1f24; line-height: 1.45; }
h1 { font-size: 1.6rem; } h2 { font-size: 1.3rem; margin-top: 2.2rem; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 1.05rem; margin-top: 1.4rem; }
table { border-collapse: collapse; margin: 0.6rem 0 0.4rem; font-size: 0.9rem; }
caption { caption-side: top; text-align: left; font-weight: 600; padding-bottom: 0.3rem; }
th, td { border-bottom: 1px solid #d0d7de; padding: 0.25rem 0.6rem; text-align: right; white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { background: #f6f8fa; }
tr.group td { text-align: left; font-style: italic; background: #fafbfc; }
td.best { background: #9ecae1; font-weight: 600; }
td.second { background: #deebf7; }
td.ref { color: #57606a; }
td.na { color: #8c959f; }
small { color: #57606a; }
figure { margin: 0.8rem 0; } figure img { max-width: 100%; border: 1px solid #eaeef2; }
figcaption { font-size: 0.85rem; color: #57606a; }
p.note { font-size: 0.85rem; color: #57606a; margin-top: 0; }
div.scroll { overflow-x: auto; }
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _h(s: str) -> str:
    return html.escape(s, quote=True)


def _html_table(t: Table) -> str:
    out = ['<div class="scroll"><table>']
    if t.caption:
        out.append(f"<caption>{_h(t.caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{_h(h)}</th>" for h in t.header) + "</tr></thead><tbody>")
    for r in t.rows:
        if isinstance(r, str):
            out.append(f'<tr class="group"><td colspan="{len(t.header)}">{_h(r)}</td></tr>')
            continue
        cells = []
        for c in r:
            cls = f' class="{c.cls}"' if c.cls else ""
            sub = f" <small>{_h(c.sub)}</small>" if c.sub else ""
            cells.append(f"<td{cls}>{_h(c.text)}{sub}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table></div>")
    if t.note:
        out.append(f'<p class="note">{_h(t.note)}</p>')
    return "\n".join(out)


def to_html(doc: Document) -> str:
    body = [f"<h1>{_h(doc.title)}</h1>"]
    for b in doc.blocks:
        if isinstance(b, Heading):
            anchor = f' id="{_h(b.anchor)}"' if b.anchor else ""
            body.append(f"<h{b.level}{anchor}>{_h(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{_h(b.text)}</p>")
        elif isinstance(b, Image):
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            cap = f"<figcaption>{_h(b.caption)}</figcaption>" if b.caption else ""
            body.append(f'<figure><img alt="{_h(b.alt)}" src="data:image/png;base64,{data}">{cap}</figure>')
        elif isinstance(b, Table):
            body.append(_html_table(b))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta http-equiv=\"Content-Security-Policy\" content=\"{CSP}\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_h(doc.title)}</title><style>{CSS}</style></head>\n<body>\n" + "\n".join(body)
            + "\n</body></html>\n")
