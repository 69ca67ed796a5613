"""The listening page: prompts as rows, checkpoint x CFG columns, relative escaped links."""
from __future__ import annotations

from html.parser import HTMLParser

import pytest

from pipeline.report.page import Clip, Reference, check_name, clip_stem, format_cfg, prompt_header, render_page


class Collector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.rows: list[list[tuple[str, dict]]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "tr":
            self.rows.append([])
        elif self.rows:
            self.rows[-1].append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def clips() -> list[Clip]:
    out = []
    for ck in ("step-200", "step-100"):
        for pid, prompt in (("p1", "a flute"), ("p0", "drums <loud> & fast")):
            for cfg in (6.0, 3.0):
                for seed in (1, 0):
                    stem = f"{ck}/{clip_stem(pid, cfg, seed)}"
                    out.append(Clip(ck, pid, prompt, cfg, seed, stem + ".flac", stem + ".png", "v-ddim, 4 steps"))
    return out


def sections(page: str) -> list[Collector]:
    """One parsed Collector per <section> of the page."""
    out = []
    for chunk in page.split("<section>")[1:]:
        parsed = Collector()
        parsed.feed(chunk.split("</section>")[0])
        out.append(parsed)
    return out


def test_page_has_a_section_per_checkpoint_a_row_per_prompt_and_a_column_per_cfg():
    page = render_page("Render", clips())
    first, second = sections(page)
    assert "".join(first.text).strip().startswith("step-200") and "".join(second.text).strip().startswith("step-100")
    header, *body = first.rows
    assert [t for t, _ in header if t == "th"] == ["th", "th", "th"] and "".join(first.text).count("CFG 3") == 1
    assert len(body) == 2  # prompts p1, p0 in order of appearance
    audio = [a["src"] for t, a in body[0] if t == "audio"]
    assert audio == [f"step-200/p1/cfg{c}-seed{s}.flac" for c in ("3", "6") for s in (0, 1)]
    assert all(a["preload"] == "metadata" and "controls" in a for t, a in body[0] if t == "audio")
    images = [a["src"] for t, a in second.rows[2] if t == "img"]
    assert images[0] == "step-100/p0/cfg3-seed0.png" and len(images) == 4


def test_references_add_a_real_clips_column_to_every_section():
    refs = [Reference("p0", "drums, real", "references/p0/0.flac", "references/p0/0.png")]
    for parsed in sections(render_page("Render", clips(), references=refs)):
        header, p1, p0 = parsed.rows
        assert "real clips" in "".join(parsed.text)
        assert [a["src"] for t, a in p0 if t == "audio"][-1] == "references/p0/0.flac"
        assert not [a for t, a in p1 if t == "audio" and a["src"].startswith("references")]


def test_prompt_header_states_when_the_model_makes_shorter_clips_than_asked():
    assert prompt_header({"prompt": "x", "seconds_start": 0, "seconds_total": 5}, "id", 2.05) == \
        "x (asks for 0-5 s; the model makes 2.05 s clips)"
    assert prompt_header({"prompt": "x", "seconds_start": 0, "seconds_total": 2}, "id", 2.05) == "x (asks for 0-2 s)"
    assert prompt_header({}, "id", 1.0) == "id"


def test_text_is_escaped_and_links_are_quoted():
    page = render_page("a <b> title", [Clip("ck", "p", "<script>alert(1)</script>", 1.5, 0,
                                            "ck/p/my clip.flac", "ck/p/x#1.png")])
    assert "<script>" not in page and "&lt;script&gt;" in page and "&lt;b&gt;" in page
    assert 'src="ck/p/my%20clip.flac"' in page and 'src="ck/p/x%231.png"' in page
    assert "CFG 1.5" in page


@pytest.mark.parametrize("href", ["/abs/x.flac", "../up.flac", "s3://b/x.flac", "http://x/y.flac"])
def test_links_must_be_relative_below_the_page(href):
    with pytest.raises(ValueError, match="relative path"):
        render_page("t", [Clip("ck", "p", "x", 1, 0, href, "ck/x.png")])


def test_names_and_stems():
    assert format_cfg(6.0) == "6" and format_cfg(6.5) == "6.5" and format_cfg(7) == "7"
    assert clip_stem("amen-break_1", 6.0, 3) == "amen-break_1/cfg6-seed3"
    for bad in ("", ".hidden", "a/b", "a b", "-x", "ü"):
        with pytest.raises(ValueError, match="expected letters, digits"):
            check_name(bad, "prompt id")
