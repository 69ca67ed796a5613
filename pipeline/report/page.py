"""The listening page: one section per checkpoint (or train step), prompts as rows, CFG scales as
columns, one player and one spectrogram per seed in each cell, and optionally real clips per prompt.

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
section { margin-bottom: 2em; }
table { border-collapse: collapse; width: 100%; table-layout: fixed; }
th, td { border: 1px solid #ccc; padding: 0.4em; vertical-align: top; overflow-wrap: anywhere; }
th.prompt { text-align: left; width: 14em; font-weight: normal; }
th.prompt code, .length { color: #666; font-size: 0.85em; }
figure { margin: 0 0 0.6em 0; }
figure img { display: block; width: 100%; max-width: WIDTHpx; height: auto; }
figure audio { width: 100%; max-width: WIDTHpx; }
figcaption { font-size: 0.8em; color: #666; }
"""
"""One section per checkpoint (or train step), so a page of many checkpoints grows down, not sideways;
a fixed-layout table of the page's width, so more CFG columns shrink the images instead of scrolling."""


@dataclasses.dataclass(frozen=True, slots=True)
class Reference:
    """A real clip shown beside a prompt's generated ones (e.g. through the model's VAE)."""
    prompt_id: str
    label: str
    """What the clip is (its caption or labels)."""
    audio_href: str
    image_href: str


def prompt_header(metadata: dict, fallback: str, clip_seconds: float) -> str:
    """Row header text for a prompt: its text, the timing it asks for, and, when that is longer than
    what the model generates, the length of the clips (the model's ``sample_size``)."""
    text = str(metadata.get("prompt", fallback))
    if "seconds_total" in metadata:
        start, total = metadata.get("seconds_start", 0), metadata["seconds_total"]
        text += f" (asks for {start}-{total} s"
        if float(total) - float(start) > clip_seconds + 0.01:
            text += f"; the model makes {clip_seconds:.2f} s clips"
        text += ")"
    return text


def render_page(title: str, clips: Sequence[Clip], notes: Sequence[str] = (),
                references: Sequence[Reference] = ()) -> str:
    """The HTML text. One section per column group (in order of first appearance) with CFG columns
    ascending; rows: prompts in order of first appearance; seeds ascending within a cell. ``references``
    add a last column "real clips" to every section."""
    from pipeline.report.spectrogram import FIGURE_PIXELS

    groups: dict[str, set[float]] = {}
    rows: dict[str, str] = {}
    cells: dict[tuple[str, str, float], list[Clip]] = {}
    for clip in clips:
        groups.setdefault(clip.column, set()).add(float(clip.cfg_scale))
        rows.setdefault(clip.prompt_id, clip.prompt)
        cells.setdefault((clip.prompt_id, clip.column, float(clip.cfg_scale)), []).append(clip)
    real: dict[str, list[Reference]] = {}
    for ref in references:
        real.setdefault(ref.prompt_id, []).append(ref)
    esc = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{esc(title)}</title>", f"<style>{_STYLE.replace('WIDTH', str(FIGURE_PIXELS[0]))}</style>", "</head>",
           "<body>", f"<h1>{esc(title)}</h1>"]
    out += [f"<p>{esc(note)}</p>" for note in notes]
    for group, scales in groups.items():
        cfgs = sorted(scales)
        out += ["<section>", f"<h2>{esc(group)}</h2>", "<table>", "<thead>", '<tr><th class="prompt">prompt</th>'
                + "".join(f"<th>CFG {esc(format_cfg(cfg))}</th>" for cfg in cfgs)
                + ("<th>real clips</th>" if real else "") + "</tr>", "</thead>", "<tbody>"]
        for prompt_id, prompt in rows.items():
            out.append(f'<tr><th class="prompt">{esc(prompt)}<br><code>{esc(prompt_id)}</code></th>')
            for cfg in cfgs:
                items = sorted(cells.get((prompt_id, group, cfg), []), key=lambda c: c.seed)
                out.append("<td>" + "".join(_figure(c) for c in items) + "</td>")
            if real:
                out.append("<td>" + "".join(_reference(r) for r in real.get(prompt_id, [])) + "</td>")
            out.append("</tr>")
        out += ["</tbody>", "</table>", "</section>"]
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def _figure(clip: Clip) -> str:
    caption = f"seed {clip.seed}"
    alt = f"mel spectrogram, {clip.prompt_id}, {clip.column}, CFG {format_cfg(clip.cfg_scale)}, {caption}"
    return (f'<figure title="{html.escape(clip.details)}">'
            f'<img src="{_href(clip.image_href)}" alt="{html.escape(alt)}">'
            f'<audio controls preload="metadata" src="{_href(clip.audio_href)}"></audio>'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _reference(ref: Reference) -> str:
    return (f'<figure><img src="{_href(ref.image_href)}" alt="mel spectrogram, real clip: {html.escape(ref.label)}">'
            f'<audio controls preload="metadata" src="{_href(ref.audio_href)}"></audio>'
            f"<figcaption>{html.escape(ref.label)}</figcaption></figure>")
