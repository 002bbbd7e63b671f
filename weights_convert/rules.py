r"""Renaming a reference state dict into altdiff-min's names: an ordered list of rules, strict both ways.

A rule is `(pattern, replacement)`, applied like a line of a sed script: every rule, in order,
rewrites the first place its regex matches in the name (groups allowed, `^` to anchor). So a layout
is usually described in two short lists: where a block sits (`^down_blocks\.(\d+)\.resnets\.(\d+)\.`
→ `down.\1.res.\2.`), then what differs inside blocks (`time_emb_proj\.` → `time_proj.`). Names
that are the same in both layouts need no rule. A drop is `(pattern, reason)`: source tensors we
deliberately do not use, each with the reason why.

Strict means: every source tensor is renamed into a name the target has or dropped, no two land on
the same name, every target tensor is filled, and every shape agrees. All problems are collected and
reported at once, before anything is loaded.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from altdiff_min.errors import BadFile
from altdiff_min.storage.folder import empty_modules

Rule = tuple[str, str | Callable[[re.Match], str]]  # (regex searched in the name, its replacement), in order
Drop = tuple[str, str]  # (regex searched in a source name, why the tensor is not needed)


class ConversionError(BadFile):
    """A state dict that does not fit the target model; the message lists every offending name."""


@dataclass
class Report:
    converted: int = 0
    dropped: Counter = field(default_factory=Counter)  # reason → count

    def __str__(self) -> str:
        lines = [f"converted {self.converted} tensors"]
        lines += [f"dropped {n} ({reason})" for reason, n in self.dropped.items()]
        return "; ".join(lines)


class Alias(tuple):
    """A rule that reads another spelling only (an older diffusers', the prefix transformers 5 strips):
    convert applies it like any rule, export (invert) never writes it."""


class Nested:
    """A replacement that renames the rest of the name by a module's own rules under `prefix`: one
    module inside another (the safety checker's CLIP tower). Made by `nested`; invert reads it backwards."""

    def __init__(self, prefix: str, rules: list[Rule]):
        self.prefix, self.rules = prefix, rules

    def __call__(self, m: re.Match) -> str:
        return self.prefix + rename(m.group(1), self.rules)


def nested(theirs: str, ours: str, rules: list[Rule]) -> Rule:
    """Everything under the prefix `theirs`, renamed by `rules`, under the prefix `ours`."""
    return (rf"^{re.escape(theirs)}(.*)$", Nested(ours, rules))


def rename(name: str, rules: list[Rule]) -> str:
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name, count=1)
    return name


def _listing(title: str, names: list[str], limit: int = 12) -> str:
    more = f"\n    … and {len(names) - limit} more" if len(names) > limit else ""
    return f"  {title} ({len(names)}):\n    " + "\n    ".join(names[:limit]) + more


def fits_kind(tensor: torch.Tensor, target: torch.Tensor) -> bool:
    """A dense tensor of the target's kind: any real float precision for a float (fp16, bf16, fp32 and
    fp64 checkpoints all exist; `load` casts them), the same dtype otherwise."""
    if tensor.layout != torch.strided:
        return False
    if target.is_floating_point():
        return tensor.is_floating_point()
    return tensor.dtype == target.dtype


def convert_state_dict(
    source: Mapping[str, torch.Tensor],
    rules: list[Rule],
    drops: list[Drop],
    target: Mapping[str, torch.Tensor],
    what: str = "state dict",
) -> tuple[dict[str, torch.Tensor], Report]:
    """Rename `source` into the names of `target` (a state dict, e.g. of a model on the meta device).

    Returns the renamed tensors (the same tensor objects, not copies) and a report of what was done.
    Raises ConversionError naming every unknown, duplicate, missing or mis-shaped tensor.
    """
    out: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    report = Report()
    unknown, duplicates, wrong_shape, wrong_kind = [], [], [], []
    seen: set[str] = set()  # targets some source tensor aimed at, fitting or not
    for name, tensor in source.items():
        if not isinstance(name, str):
            raise ConversionError(f"{what} has a key that is not a name: {name!r}")
        reason = next((why for pattern, why in drops if re.search(pattern, name)), None)
        if reason is not None:
            report.dropped[reason] += 1
            continue
        new = rename(name, rules)
        if new not in target:
            unknown.append(name if new == name else f"{name} (→ {new}, which the model does not have)")
            continue
        seen.add(new)
        if new in out:
            duplicates.append(f"{name} and {origin[new]} both → {new}")
        elif tuple(tensor.shape) != tuple(target[new].shape):
            wrong_shape.append(f"{name}: {tuple(tensor.shape)}, but {new} is {tuple(target[new].shape)}")
        elif not fits_kind(tensor, target[new]):
            wrong_kind.append(f"{name}: {tensor.dtype} {str(tensor.layout).removeprefix('torch.')}, but {new} holds "
                              f"{'real floats' if target[new].is_floating_point() else target[new].dtype}, dense")
        else:
            out[new], origin[new] = tensor, name
    missing = [name for name in target if name not in seen]
    problems = [
        _listing(title, names)
        for title, names in [
            ("unexpected tensors (no rule leads to a model tensor, no drop reason)", unknown),
            ("tensors renamed onto the same target", duplicates),
            ("tensors of the wrong shape", wrong_shape),
            ("tensors of the wrong kind", wrong_kind),
            ("missing tensors (nothing in the source fills them)", missing),
        ]
        if names
    ]
    if problems:
        raise ConversionError(f"{what} does not fit the model:\n" + "\n".join(problems))
    report.converted = len(out)
    return out, report


def load_model(make: Callable[[], torch.nn.Module], source: Mapping[str, torch.Tensor], rules: list[Rule],
               drops: list[Drop], what: str) -> tuple[torch.nn.Module, Report]:
    """Build `make()` on the meta device (no memory, no random init), convert `source` into it and
    load with strict=True. assign=True makes the model use the source tensors themselves: no copy,
    so `model.state_dict()` is the converted state dict."""
    with empty_modules():
        model = make()
    tensors, report = convert_state_dict(source, rules, drops, model.state_dict(), what)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval(), report


# ---- backwards: altdiff-min's names → the reference's, for export ------------------------------------------
# The rules are the one home of each layout's names; export reads them backwards. A rule whose regex is
# literal text, `^`/`$` anchors and capture groups (each used once in the replacement) is a bijection
# between what it matches and what it writes, so it inverts mechanically: the replacement becomes the
# regex (its groups' sub-patterns put back), the regex the replacement; the list runs in reverse order.
# Alias rules (other spellings read only) are left out: names are written as current readers expect them.
_PIECE = re.compile(r"\\(.)|(\()|([A-Za-z0-9_\-]+)|(\^)|(\$)|(.)", re.DOTALL)


def _pattern_pieces(pattern: str) -> tuple[list, bool, bool]:
    """A simple rule regex as [literal str | group sub-pattern (a 1-tuple)], anchored at start, at end."""
    pieces, i, start, end = [], 0, False, False
    while i < len(pattern):
        m = _PIECE.match(pattern, i)
        escaped, group, literal, caret, dollar, other = m.groups()
        if escaped is not None:
            if escaped.isalnum():  # \d, \w, …: a class, not one character
                raise ValueError(f"rule {pattern!r} is not invertible (class \\{escaped} outside a group)")
            pieces.append(escaped)
        elif group:
            depth, j = 1, m.end()
            while depth:
                if j == len(pattern):
                    raise ValueError(f"rule {pattern!r}: unbalanced group")
                c = pattern[j]
                j += 2 if c == "\\" else 1
                depth += {"(": 1, ")": -1}.get(c, 0) if c != "\\" else 0
            inner = pattern[m.end():j - 1]
            if re.search(r"(?<!\\)\((?!\?:)", inner):
                raise ValueError(f"rule {pattern!r} is not invertible (a group inside a group)")
            pieces.append((inner,))
            i = j
            continue
        elif literal is not None:
            pieces.append(literal)
        elif caret is not None and i == 0:
            start = True
        elif dollar is not None and m.end() == len(pattern):
            end = True
        else:
            raise ValueError(f"rule {pattern!r} is not invertible ({other or caret or dollar!r} outside a group)")
        i = m.end()
    return pieces, start, end


def invert(rules: list[Rule]) -> list[Rule]:
    """The rules backwards (ours → the reference's names), in reverse order; ValueError for a rule that is
    not plain text and groups (a callable replacement, a class outside a group, a group dropped)."""
    inverse: list[Rule] = []
    for pattern, replacement in (rule for rule in reversed(rules) if not isinstance(rule, Alias)):
        if isinstance(replacement, Nested):
            pieces, _, _ = _pattern_pieces(pattern)
            if pieces[-1:] != [(".*",)] or not all(isinstance(p, str) for p in pieces[:-1]):
                raise ValueError(f"rule {pattern!r}: a nested rule is `^prefix(.*)$`")
            inverse.append(nested(replacement.prefix, "".join(pieces[:-1]), invert(replacement.rules)))
            continue
        if callable(replacement):
            raise TypeError(f"rule {pattern!r} has a computed replacement: it does not invert mechanically")
        pieces, start, end = _pattern_pieces(pattern)
        groups = [p[0] for p in pieces if isinstance(p, tuple)]
        regex, order = "^" if start else "", []
        parts = re.findall(r"([^\\]+)|\\(\d+)", replacement)
        if "".join(lit or f"\\{ref}" for lit, ref in parts) != replacement or not parts:
            raise ValueError(f"rule {pattern!r} writes {replacement!r}: only text and \\N groups invert mechanically")
        for literal, ref in parts:
            if literal:
                regex += re.escape(literal)
            elif int(ref) in order:
                raise ValueError(f"rule {pattern!r} uses group {ref} twice: it does not invert mechanically")
            else:
                order.append(int(ref))
                regex += f"({groups[int(ref) - 1]})"
        if sorted(order) != list(range(1, len(groups) + 1)):
            raise ValueError(f"rule {pattern!r} drops a group: it does not invert mechanically")
        n = iter(range(1, len(groups) + 1))
        back = "".join(p.replace("\\", "\\\\") if isinstance(p, str) else f"\\g<{order.index(next(n)) + 1}>"
                       for p in pieces)
        inverse.append((regex + ("$" if end else ""), back))
    return inverse


def rename_back(names: list[str], rules: list[Rule], what: str) -> dict[str, str]:
    """{our name: the reference's name} by the inverted rules, each checked to convert forward into the
    name it came from, no two the same: the forward rules stay the only statement of the layout."""
    inverse = invert(rules)
    out = {name: rename(name, inverse) for name in names}
    if wrong := [f"{n} → {t} → {rename(t, rules)}" for n, t in out.items() if rename(t, rules) != n]:
        raise ConversionError(f"{what}: {len(wrong)} name(s) do not come back through the rules, e.g. {wrong[:3]}")
    if len(set(out.values())) != len(out):
        same = [t for t, k in Counter(out.values()).items() if k > 1]
        raise ConversionError(f"{what}: several tensors would be written as {same[:3]}")
    return out
