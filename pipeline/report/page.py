"""The listening page: prompts as rows, checkpoints x CFG scales as columns, one player and one
spectrogram per seed in each cell.

One static ``index.html`` with relative links only, so the same file works opened from disk
(``file://``), served from an S3 bucket as a static site, or copied elsewhere with its folder. Shared by
the train stage's demos (``<out>/demos/index.html`` over ``demos/step-<n>/``) and by render
(``<out>/index.html`` over ``<out>/<checkpoint>/``). Players use ``preload="metadata"`` so a page of
hundreds of clips does not download them all on open.
"""

from __future__ import annotations

import dataclasses
import html
import re
from collections.abc import Sequence
from urllib.parse import quote

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclasses.dataclass(frozen=True, slots=True)
class Clip:
    """One generated item as the page shows it."""
    column: str
    """Column group: a checkpoint name (render) or ``step <n>`` (train demos)."""
    prompt_id: str
    prompt: str
    """Row header text (the prompt, plus any other conditioning worth showing)."""
    cfg_scale: float
    seed: int
    audio_href: str
    """Path of the audio file relative to the page, ``/``-separated."""
    image_href: str
    """Path of the spectrogram PNG relative to the page."""
    details: str = ""
    """Tooltip text (sampler, steps, timings)."""


def check_name(name: str, what: str) -> str:
    """A path segment we create (checkpoint name, prompt id): letters, digits, ``._-``, not starting with
    a dot, so it is the same string on disk, in S3 keys and in URLs."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{what}={name!r}: expected letters, digits, '.', '_' or '-' (not starting with '.' or '-')")
    return name


def format_cfg(cfg_scale: float) -> str:
    """``6.0 -> "6"``, ``6.5 -> "6.5"``: the CFG as written in file names and headers."""
    return format(float(cfg_scale), "g")


def clip_stem(prompt_id: str, cfg_scale: float, seed: int) -> str:
    """``<prompt-id>/cfg<scale>-seed<s>``: the file name of an item below its checkpoint folder, without
    extension (``.flac``, ``.png``, ``.json``)."""
    return f"{check_name(prompt_id, 'prompt id')}/cfg{format_cfg(cfg_scale)}-seed{int(seed)}"


def _href(path: str) -> str:
    if path.startswith("/") or "://" in path or ".." in path.split("/"):
        raise ValueError(f"page link {path!r}: expected a relative path below the page's folder")
    return html.escape(quote(path, safe="/"), quote=True)


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; }
th, td { border: 1px solid #ccc; padding: 0.4em; vertical-align: top; }
th.prompt { text-align: left; max-width: 22em; font-weight: normal; }
th.prompt code { color: #666; }
figure { margin: 0 0 0.6em 0; }
figure img { display: block; width: 320px; height: 96px; image-rendering: auto; }
figure audio { width: 320px; }
figcaption { font-size: 0.8em; color: #666; }
"""


def render_page(title: str, clips: Sequence[Clip], notes: Sequence[str] = ()) -> str:
    """The HTML text. Columns: groups in order of first appearance, CFG ascending within a group; rows:
    prompts in order of first appearance; seeds ascending within a cell."""
    groups: dict[str, set[float]] = {}
    rows: dict[str, str] = {}
    cells: dict[tuple[str, str, float], list[Clip]] = {}
    for clip in clips:
        groups.setdefault(clip.column, set()).add(float(clip.cfg_scale))
        rows.setdefault(clip.prompt_id, clip.prompt)
        cells.setdefault((clip.prompt_id, clip.column, float(clip.cfg_scale)), []).append(clip)
    columns = [(group, cfg) for group, scales in groups.items() for cfg in sorted(scales)]
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{esc(title)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>",
           f"<h1>{esc(title)}</h1>"]
    out += [f"<p>{esc(note)}</p>" for note in notes]
    out += ["<table>", "<thead>", "<tr><th rowspan=\"2\">prompt</th>"
            + "".join(f'<th colspan="{len(groups[g])}">{esc(g)}</th>' for g in groups) + "</tr>",
            "<tr>" + "".join(f"<th>CFG {esc(format_cfg(cfg))}</th>" for _, cfg in columns) + "</tr>",
            "</thead>", "<tbody>"]
    for prompt_id, prompt in rows.items():
        out.append(f'<tr><th class="prompt">{esc(prompt)}<br><code>{esc(prompt_id)}</code></th>')
        for group, cfg in columns:
            items = sorted(cells.get((prompt_id, group, cfg), []), key=lambda c: c.seed)
            out.append("<td>" + "".join(_figure(c) for c in items) + "</td>")
        out.append("</tr>")
    out += ["</tbody>", "</table>", "</body>", "</html>", ""]
    return "\n".join(out)


def _figure(clip: Clip) -> str:
    caption = f"seed {clip.seed}"
    alt = f"mel spectrogram, {clip.prompt_id}, {clip.column}, CFG {format_cfg(clip.cfg_scale)}, {caption}"
    return (f'<figure title="{html.escape(clip.details)}">'
            f'<img src="{_href(clip.image_href)}" alt="{html.escape(alt)}">'
            f'<audio controls preload="metadata" src="{_href(clip.audio_href)}"></audio>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
