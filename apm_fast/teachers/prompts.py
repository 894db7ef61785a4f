"""Class names and prompt templates for zero-shot classification."""
from __future__ import annotations

import os
import unicodedata
from pathlib import Path
from typing import Sequence, Tuple, Union

from ..validation import refuse_repeats

__all__ = ["SINGLE_TEMPLATE", "SIMPLE_TEMPLATES", "TEMPLATE_SETS", "resolve_classes", "resolve_templates",
           "imagenet_classnames", "fill"]

SINGLE_TEMPLATE = "a photo of a {c}."

# The 7 templates that sequential forward selection over the 80 of the CLIP paper picked, in the
# order selected (openai/CLIP, notebooks/Prompt_Engineering_for_ImageNet.ipynb: "This subset
# performs a bit better than the full 80 ensemble"; open_clip ships the same list as
# SIMPLE_IMAGENET_TEMPLATES). 7 prompts per class instead of 80: an ensemble at 1/11 of the cost.
SIMPLE_TEMPLATES = (
    "itap of a {c}.",
    "a bad photo of the {c}.",
    "a origami {c}.",
    "a photo of the large {c}.",
    "a {c} in a video game.",
    "art of the {c}.",
    "a photo of the small {c}.",
)

# The named template sets of resolve_templates (and of the CLI's --templates)
TEMPLATE_SETS = ("single", "simple", "ensemble")


def imagenet_classnames() -> Tuple[str, ...]:
    """The 1000 ImageNet class names as open_clip ships them. Two names occur twice there
    ('missile' and 'sunglasses', distinct ImageNet classes): the built-in list is kept as is,
    since results name classes by index too; lists given by the user may not repeat a name."""
    from .._compat import import_open_clip

    names = tuple(import_open_clip().IMAGENET_CLASSNAMES)
    if len(names) != 1000:  # a future open_clip changing this would silently shift every label
        raise ValueError(f"open_clip.IMAGENET_CLASSNAMES has {len(names)} names, expected 1000")
    return names


def _is_builtin_imagenet(names: Tuple[str, ...]) -> bool:
    """Whether ``names`` is the built-in ImageNet list (passed on as a list: the evaluation's
    ImageNet sets do), whose two repeated names are distinct classes."""
    if len(names) != 1000:
        return False
    try:
        return names == imagenet_classnames()
    except ImportError:
        return False


def _prompt_form(name: str) -> str:
    """What CLIP's tokenizer makes of a name: Unicode NFC, spaces collapsed, lower case (two names
    of one form give the same prompts, the same embedding)."""
    return " ".join(unicodedata.normalize("NFC", name).split()).casefold()


def _refuse_duplicates(names, source: str, places) -> None:
    """Refuse the first repeated class name, saying where both are (``places(first, second)``): two
    identical prompts split one class's probability in two (and a wrong top-1 can win by it). Names
    that differ only in case, spacing or Unicode form count as repeats (the same prompt)."""
    forms = [_prompt_form(n) for n in names]
    refuse_repeats(forms, lambda n, a, b: f"classes: {source}{names[b]!r} occurs twice ({places(a, b)}"
                                          + (f", as {names[a]!r}" if names[a] != names[b] else "")
                                          + "); each class name must be unique (case, spacing and "
                                            "Unicode form aside: the prompts would be the same)")


def _read_class_file(path: Path) -> Tuple[str, ...]:
    try:
        text = path.read_text(encoding="utf-8-sig")       # a leading byte-order mark is not a name
    except UnicodeDecodeError as exc:
        raise ValueError(f"classes: file {str(path)!r} is not UTF-8 text ({exc})") from None
    # one name per line; blank lines and '#' comment lines are skipped
    lines = [(i + 1, line.strip()) for i, line in enumerate(text.splitlines())]
    lines = [(no, n) for no, n in lines if n and not n.startswith("#")]
    if not lines:
        raise ValueError(f"classes: file {str(path)!r} holds no class names (expected one per line)")
    names = tuple(n for _, n in lines)
    _refuse_duplicates(names, f"file {str(path)!r}: ", lambda a, b: f"lines {lines[a][0]} and {lines[b][0]}")
    return names


def resolve_classes(classes: Union[str, os.PathLike, Sequence[str]]) -> Tuple[str, ...]:
    """Class names from a list of names, ``"imagenet"``, or a UTF-8 text file (one name per line).

    Names are stripped; a name given twice in a list or a file is refused (naming it and where),
    except in the built-in ImageNet list itself, given by name or as a list.
    """
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
        names = tuple(c.strip() for c in classes)
        if not _is_builtin_imagenet(names):
            _refuse_duplicates(names, "", lambda a, b: f"classes[{a}] and classes[{b}]")
        return names
    raise TypeError(f"classes: expected 'imagenet', a file path or a list of names, got {type(classes).__name__}")


def resolve_templates(templates: Union[str, Sequence[str]] = "single") -> Tuple[str, ...]:
    """Prompt templates, each with ``{c}`` where the class name goes.

    ``"single"``: ``a photo of a {c}.``; ``"simple"``: the 7 templates selected from the 80 by the
    CLIP authors (:data:`SIMPLE_TEMPLATES`); ``"ensemble"``: the 80 templates of the CLIP paper
    for ImageNet (as shipped by open_clip); or a list of template strings.
    """
    if isinstance(templates, str):
        key = templates.strip().lower()
        if key == "single":
            return (SINGLE_TEMPLATE,)
        if key == "simple":
            return SIMPLE_TEMPLATES
        if key == "ensemble":
            from .._compat import import_open_clip

            return tuple(t("{c}") for t in import_open_clip().OPENAI_IMAGENET_TEMPLATES)
        raise ValueError(f"templates: expected 'single', 'simple', 'ensemble' or a list of strings "
                         f"containing '{{c}}', got {templates!r}")
    if isinstance(templates, (list, tuple)):
        if not templates:
            raise ValueError("templates: expected at least one template, got an empty list")
        for i, t in enumerate(templates):
            if not isinstance(t, str) or "{c}" not in t:
                raise ValueError(f"templates[{i}]: expected a string containing '{{c}}', got {t!r}")
        return tuple(templates)
    raise TypeError(f"templates: expected 'single', 'simple', 'ensemble' or a list of strings, got "
                    f"{type(templates).__name__}")


def fill(template: str, name: str) -> str:
    """The prompt for one class (plain substitution: class names may contain braces)."""
    return template.replace("{c}", name)
