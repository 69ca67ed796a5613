"""Input discovery and captions: hostile folders and caption rows become rejects or one clear error."""

from __future__ import annotations

import json
import logging
import os
import unicodedata

import pytest

from pipeline.data import sources


def touch(path, data: bytes = b"x") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_links_that_lead_nowhere_and_special_files_are_planned_with_their_problem(tmp_path, caplog):
    root = tmp_path / "in"
    touch(root / "real" / "ok.wav")
    os.symlink("loop2.wav", root / "loop1.wav")
    os.symlink("loop1.wav", root / "loop2.wav")
    os.symlink("nowhere.wav", root / "dangling.wav")
    os.symlink(root / "real" / "ok.wav", root / "linked file.wav")  # a link to a file is read through
    os.symlink(root / "real", root / "linked folder")
    os.symlink(".", root / "real" / "self")  # a folder link into itself: never followed
    os.mkfifo(root / "fifo.wav")  # opening it to read would block for ever
    caplog.set_level(logging.WARNING)
    items, ignored = sources.discover(str(root))
    problems = {it["path"]: it.get("problem") for it in items}
    assert problems == {"dangling.wav": "dangling symbolic link (to 'nowhere.wav')",
                        "fifo.wav": "not a regular file (a FIFO, socket or device)",
                        "linked file.wav": None,
                        "loop1.wav": "symbolic link loop (too many levels of links)",
                        "loop2.wav": "symbolic link loop (too many levels of links)",
                        "real/ok.wav": None}
    assert not ignored
    assert "skipped 2 symbolic links to folders (not followed) and 0 unreadable folders" in caplog.text


def test_a_name_that_is_not_utf8_is_planned_as_a_reject_that_names_its_bytes(tmp_path):
    root = tmp_path / "in"
    name = os.path.join(os.fsencode(root), b"caf\xe9.wav")  # Latin-1 bytes
    touch(root / "ok.wav")
    touch(name)
    touch(name[:-3] + b"txt")  # its sidecar is not attached either
    items, _ = sources.discover(str(root))
    bad = next(it for it in items if it["path"] != "ok.wav")
    assert bad["path"] == "caf\\xe9.wav" and "sidecar" not in bad
    assert bad["problem"] == f"file name is not valid UTF-8: {name!r}; rename it"
    json.dumps(items, ensure_ascii=False).encode("utf-8")  # the plan can be written


def test_two_names_equal_after_nfc_normalisation_are_an_error_naming_both(tmp_path):
    root = tmp_path / "in"
    nfc, nfd = unicodedata.normalize("NFC", "café.wav"), unicodedata.normalize("NFD", "café.wav")
    assert nfc != nfd
    touch(root / "x" / nfc)
    touch(root / "x" / nfd)
    with pytest.raises(sources.SourceError, match="same name after Unicode NFC normalisation") as e:
        sources.discover(str(root))
    assert repr(f"x/{nfc}") in str(e.value) and repr(f"x/{nfd}") in str(e.value)


@pytest.mark.parametrize("row,what", [
    ('{"path": "a.wav", "prompt": NaN}', "NaN is not a JSON value"),
    ('{"path": "a.wav", "prompt": "fine", "bpm": Infinity}', "Infinity is not a JSON value"),
    ('{"path": "a.wav", "prompt": -Infinity}', "-Infinity is not a JSON value"),
    ('{"path": "a.wav", "prompt": 3.5}', "'prompt' must be a string, got float"),
    ('{"path": "a.wav", "caption": ["a", "list"]}', "'caption' must be a string, got list"),
])
def test_a_bad_value_in_a_jsonl_caption_row_names_the_file_and_line(tmp_path, row, what):
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"path": "b.wav", "prompt": "a good row"}\n\n' + row + "\n")
    with pytest.raises(sources.CaptionError) as e:
        sources.read_captions(str(captions))
    assert str(e.value).startswith(f"{captions}:3: {what}") and "\n" not in str(e.value)


def test_an_empty_prompt_in_a_csv_row_leaves_that_file_without_a_caption(tmp_path):
    """pandas writes NaN as an empty field: the file then has no caption and becomes a reject."""
    captions = tmp_path / "captions.csv"
    captions.write_text("path,prompt,bpm\na.wav,,120\nb.wav,  ,\nc.wav,a tone,\n")
    table = sources.read_captions(str(captions))
    assert table == {"a.wav": {"prompt": None, "bpm": "120"}, "b.wav": {"prompt": None, "bpm": ""},
                     "c.wav": {"prompt": "a tone", "bpm": ""}}


def test_a_nan_in_a_json_sidecar_is_a_caption_error_naming_the_sidecar(tmp_path):
    sidecar = tmp_path / "a.json"
    sidecar.write_text('{"prompt": "x", "loudness": NaN}')
    with pytest.raises(sources.CaptionError, match=f"sidecar {sidecar}: NaN is not a JSON value"):
        sources.read_sidecar(str(sidecar))
