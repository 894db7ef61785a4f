"""Class names and prompt templates for zero-shot classification."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence, Tuple, Union

__all__ = ["SINGLE_TEMPLATE", "resolve_classes", "resolve_templates", "imagenet_classnames", "fill"]

SINGLE_TEMPLATE = "a photo of a {c}."


def imagenet_classnames() -> Tuple[str, ...]:
    """The 1000 ImageNet class names as open_clip ships them (two names occur twice there:
    'missile' and 'sunglasses', which is why duplicates are allowed)."""
    from .._compat import import_open_clip

    return tuple(import_open_clip().IMAGENET_CLASSNAMES)


def _read_class_file(path: Path) -> Tuple[str, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"classes: file {str(path)!r} is not UTF-8 text ({exc})") from None
    # one name per line; blank lines and '#' comment lines are skipped
    names = tuple(line.strip() for line in text.splitlines())
    names = tuple(n for n in names if n and not n.startswith("#"))
    if not names:
        raise ValueError(f"classes: file {str(path)!r} holds no class names (expected one per line)")
    return names


def resolve_classes(classes: Union[str, os.PathLike, Sequence[str]]) -> Tuple[str, ...]:
    """Class names from a list of names, ``"imagenet"``, or a UTF-8 text file (one name per line)."""
    if isinstance(classes, str) and classes.strip().lower() == "imagenet":
        return imagenet_classnames()
    if isinstance(classes, (str, os.PathLike)):
        p = Path(classes)
        if not p.is_file():
            raise ValueError(
                f"classes: expected 'imagenet', a text file with one class name per line, or a list "
                f"of names; got {str(classes)!r}, which is not an existing file")
        return _read_class_file(p)
    if isinstance(classes, (list, tuple)):
        if not classes:
            raise ValueError("classes: expected at least one class name, got an empty list")
        for i, c in enumerate(classes):
            if not isinstance(c, str) or not c.strip():
                raise ValueError(f"classes[{i}]: expected a non-empty string, got {c!r}")
        return tuple(c.strip() for c in classes)
    raise TypeError(f"classes: expected 'imagenet', a file path or a list of names, got {type(classes).__name__}")


def resolve_templates(templates: Union[str, Sequence[str]] = "single") -> Tuple[str, ...]:
    """Prompt templates, each with ``{c}`` where the class name goes.

    ``"single"``: ``a photo of a {c}.``; ``"ensemble"``: the 80 templates of the CLIP paper for
    ImageNet (as shipped by open_clip); or a list of template strings.
    """
    if isinstance(templates, str):
        key = templates.strip().lower()
        if key == "single":
            return (SINGLE_TEMPLATE,)
        if key == "ensemble":
            from .._compat import import_open_clip

            return tuple(t("{c}") for t in import_open_clip().OPENAI_IMAGENET_TEMPLATES)
        raise ValueError(f"templates: expected 'single', 'ensemble' or a list of strings containing "
                         f"'{{c}}', got {templates!r}")
    if isinstance(templates, (list, tuple)):
        if not templates:
            raise ValueError("templates: expected at least one template, got an empty list")
        for i, t in enumerate(templates):
            if not isinstance(t, str) or "{c}" not in t:
                raise ValueError(f"templates[{i}]: expected a string containing '{{c}}', got {t!r}")
        return tuple(templates)
    raise TypeError(f"templates: expected 'single', 'ensemble' or a list of strings, got {type(templates).__name__}")


def fill(template: str, name: str) -> str:
    """The prompt for one class (plain substitution: class names may contain braces)."""
    return template.replace("{c}", name)
