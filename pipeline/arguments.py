"""The one check of a JSON config block against the constructor it is passed to (SAT forwards unknown keys
silently through **kwargs; here a typo or a missing key is an error naming it): backbone, conditioner and
encoder blocks (`pipeline/models/`), optimizer and scheduler blocks (`pipeline/config_training.py`)."""
from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping


def check_arguments(config: Mapping, key_path: str, owner: str, accepted: Iterable[Callable],
                    reserved: Iterable[str] = (), required: bool = True) -> None:
    """Raise ValueError naming the keys of ``config`` that no callable in ``accepted`` takes by name (those
    signatures together make up what ``owner`` takes; ``reserved`` names are set by the caller, not the config)
    and, with ``required``, the arguments without a default that ``config`` lacks."""
    reserved = set(reserved)
    known: dict[str, bool] = {}  # name -> required
    for fn in accepted:
        for name, p in inspect.signature(fn).parameters.items():
            if name != "self" and name not in reserved and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                known[name] = known.get(name, False) or p.default is p.empty
    unknown = [k for k in config if k not in known]
    if unknown:
        raise ValueError(f"{key_path}: unknown argument(s) {unknown} for {owner}; known: {list(known)}")
    missing = [n for n, needed in known.items() if needed and n not in config]
    if required and missing:
        raise ValueError(f"{key_path}: {owner} needs {missing}")
