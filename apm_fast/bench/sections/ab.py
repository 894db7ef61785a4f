"""(ab) One engine setting against its other values, in turns, in one run (``--ab SETTING=V1,V2``).

Whether a change to the engine pays is a difference of a few percent, smaller than what one
machine's timings move between runs; so the values are measured in turns (V1, V2, V1, V2, ...
``--ab-turns`` times) on the same machine, for every kernel table and every S of
``--students-list``, and compared within the run. Each row: one value on one table at S
students, one turn: the captured program's ``ttt_steps`` steps timed as the engine section times
them (:func:`engine.time_steps`, 20 repeats after a warm-up), ms a step and images/s, the
setting the program actually resolved (e.g. a table that cannot take it), and the last loss of
one ``fit`` of the same images (the values must train the same). Then one summary row per value:
the median over the turns and its ratio to the first value's.

The settings are the engine's switches (``apm_fast.ttt.engine.TTTEngine``): None leaves the
table's default.
"""
from __future__ import annotations

import torch

from ..timing import quantile
from .engine import _problem, time_steps

__all__ = ["run", "NAME", "SETTINGS", "parse_values"]

NAME = "ab"

# the engine's switches, and how to read back what a program resolved each to
SETTINGS = {
    "overlap": lambda p: p.overlap,
    "beside": lambda p: p.beside,
    "wgrad_beside": lambda p: p.wgrad_beside,
    "trigger_factors": lambda p: "mlp.0.weight" in p.factored,
    "position_halves": lambda p: p.pos_grid is not None,
    "first_layer_act_kept": lambda p: p.first_layer_act_kept,
    "pool_factors": lambda p: "attn.in_proj_weight" in p.factored,
}
_WORDS = {"true": True, "false": False, "none": None, "default": None}


def parse_values(text: str):
    """``SETTING=V1,V2[,...]`` -> (setting, (values...)): the values true, false or none (the
    table's default), at least two, each once."""
    name, sep, rest = str(text).partition("=")
    name = name.strip()
    if not sep or name not in SETTINGS:
        raise ValueError(f"--ab: expected SETTING=V1,V2 with SETTING one of {sorted(SETTINGS)}, got {text!r}")
    words = [w.strip().lower() for w in rest.split(",")]
    bad = [w for w in words if w not in _WORDS]
    if bad or len(words) < 2 or len(set(words)) != len(words):
        raise ValueError(f"--ab: expected at least two different values of true, false, none after "
                         f"{name}=, got {rest!r}")
    return name, tuple(_WORDS[w] for w in words)


def _word(value) -> str:
    return "none" if value is None else str(bool(value)).lower()


def _measure(ctx, table, students, setting, value):
    model, x, y, trainer = _problem(ctx, table, students, **{setting: value})
    prog = trainer.program(students)
    prog.load(x, y)
    t = time_steps(ctx, prog, 20)
    ms = t.median_ms / ctx.options.ttt_steps
    loss = trainer.fit(x, y).losses[:, -1].float()
    return {"timing": t.to_dict(), "ms_per_step": ms, "images_per_s": students / (ms * 1e-3 * ctx.options.ttt_steps),
            "resolved": _word(SETTINGS[setting](trainer.engine.program(students))), "mode": prog.mode,
            "loss_last_mean": float(loss.mean())}


def run(ctx) -> dict:
    o = ctx.options
    if o.ab is None:
        raise ValueError("the ab section needs a setting: --ab SETTING=V1,V2")
    setting, values = o.ab
    rows = []
    for turn in range(o.ab_turns):
        for name, status in ctx.fast_backends():
            for s in o.students_list:
                for value in values:
                    key = f"ab/{name}/S={s}/{setting}={_word(value)}/turn={turn}"
                    rows.append(ctx.row(dict(key=key, backend=name, students=s, setting=setting, value=_word(value),
                                             turn=turn, preset=o.engine_preset),
                                        status, name, lambda n=name, s=s, v=value: _measure(ctx, n, s, setting, v)))
                    if ctx.device.type == "cuda":
                        torch.cuda.empty_cache()
    for name, _ in ctx.fast_backends():
        for s in o.students_list:
            first = None
            for value in values:
                got = [r["ms_per_step"] for r in rows if r["status"] == "ok" and r["backend"] == name
                       and r["students"] == s and r["value"] == _word(value) and "turn" in r]
                if not got:
                    continue
                ms = quantile(got, 0.5)
                first = ms if first is None else first
                rows.append(dict(key=f"ab/{name}/S={s}/{setting}={_word(value)}", backend=name, students=s,
                                 setting=setting, value=_word(value), status="ok", reason="", turns=len(got), ms_per_step=ms,
                                 images_per_s=s / (ms * 1e-3 * o.ttt_steps), vs_first=ms / first))
    return {"rows": rows, "columns": [("what", "key"), ("ms/step", "ms_per_step"), ("images/s", "images_per_s"),
                                      ("resolved", "resolved"), ("x first value", "vs_first"),
                                      ("last loss", "loss_last_mean")]}
