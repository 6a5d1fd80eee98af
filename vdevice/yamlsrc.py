"""YAML with positions: every validation error names file, line and field path.

Scenario and topology files are written by hand by driver engineers; an error such as
``scenarios/x.yaml:14: steps[3].rebalance.trigger: unknown trigger 'rescna'; did you
mean 'rescan'? (expected one of: ...)`` lets them fix the file without reading our
code. PyYAML's ``safe_load`` throws the positions away and silently keeps the last of
two duplicate keys, so this module composes the node tree itself (``SafeLoader``,
nothing unsafe is ever constructed) and keeps a map from field path to line.

The API is deliberately small, for the scenario validator (``lab.scenario``) and the
topology loader (``vdevice``) alike:

``load(text, filename) -> Located``
    Parse one YAML document. ``Located.data`` is plain Python (dict, list, str, int,
    float, bool, None); ``Located.line_of(path)`` is the line of the node at ``path``
    (or of its nearest existing ancestor); ``Located.error(message, path)`` builds a
    ``SpecError`` with file, line and field filled in; ``Located.at(path)`` is a view
    rooted at ``path`` that still reports full paths (for an inline topology inside a
    scenario file).

``validate(model_cls, located, path=()) -> model``
    Validate the data at ``path`` with a pydantic model and turn a ``ValidationError``
    into a ``SpecError`` at the right line (``spec_error`` does the conversion alone).

``suggest`` / ``unknown`` build "did you mean" messages with :mod:`difflib`.

Paths are tuples of mapping keys and list indexes, ``("steps", 3, "rebalance",
"trigger")``, printed as ``steps[3].rebalance.trigger`` by ``format_path``. No file
I/O happens here: the caller reads the file and passes its text and name.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from vdevice.errors import SpecError

__all__ = ["Located", "Position", "YamlPath", "format_path", "load", "spec_error",
           "suggest", "unknown", "validate"]

PathElem = str | int
YamlPath = tuple[PathElem, ...]
M = TypeVar("M", bound=BaseModel)

_MERGE_TAG = "tag:yaml.org,2002:merge"
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")


@dataclass(frozen=True)
class Position:
    """Where a node is. ``key_line`` is the line of its key when it is a mapping value.

    Errors prefer the key's line: for ``rebalance:`` followed by an indented block the
    key line is where a reader looks, not the first line of the block.
    """

    line: int                  # 1-based line where the value node starts
    column: int                # 1-based
    key_line: int | None = None

    @property
    def report_line(self) -> int:
        return self.key_line if self.key_line is not None else self.line


def format_path(path: Iterable[PathElem]) -> str:
    """``("steps", 3, "plug", "device")`` -> ``steps[3].plug.device``.

    Keys that are not plain identifiers are quoted (``limits["a b"]``) so the path
    stays unambiguous.
    """
    out = ""
    for elem in path:
        if isinstance(elem, int):
            out += f"[{elem}]"
        elif _IDENT_RE.match(elem):
            out += f".{elem}" if out else elem
        else:
            out += f"[{elem!r}]"
    return out


def suggest(word: object, choices: Iterable[object], cutoff: float = 0.6) -> str | None:
    """The closest choice to ``word`` (difflib ratio >= ``cutoff``), or None."""
    opts = [str(c) for c in choices]
    close = difflib.get_close_matches(str(word), opts, n=1, cutoff=cutoff)
    return close[0] if close else None


def unknown(what: str, word: object, choices: Sequence[object]) -> str:
    """A message for an unknown name: ``unknown trigger 'rescna'; did you mean 'rescan'?
    (expected one of: pressure, rescan, ...)``."""
    if not choices:
        return f"unknown {what} {word!r} (there are none to choose from)"
    close = suggest(word, choices)
    listed = ", ".join(str(c) for c in choices)
    if close is None and not _SHOWABLE.match(str(word)):
        # not a near-miss of a known name and not a plain short word: it may be content
        # of a file that was never meant as a scenario (a key, a token); don't repeat it
        return f"unknown {what} (expected one of: {listed})"
    hint = f"; did you mean {close!r}?" if close is not None else ""
    return f"unknown {what} {word!r}{hint} (expected one of: {listed})"


#: a name shown back in "unknown ..." messages: short, lower-case-ish, like the names
#: scenarios use; anything else is not repeated (see ``unknown``)
_SHOWABLE = re.compile(r"^[a-z][a-z0-9_.*?-]{0,39}$")


class Located:
    """Parsed YAML data plus the line of every node, addressed by field path.

    A ``Located`` made by ``at(path)`` shares the position map; its ``data`` is the
    sub-tree and paths given to it are relative, but errors name the full path from
    the file's root, because that is what the user sees in the file.
    """

    __slots__ = ("data", "filename", "prefix", "_positions")

    def __init__(self, data: Any, filename: str, positions: Mapping[YamlPath, Position],
                 prefix: YamlPath = ()) -> None:
        self.data = data
        self.filename = filename
        self.prefix = prefix
        self._positions = positions

    def __repr__(self) -> str:
        where = format_path(self.prefix) or "<root>"
        return f"Located({self.filename!r}, {where})"

    # ---- positions ----------------------------------------------------------------
    def position(self, path: Sequence[PathElem] = ()) -> Position | None:
        """The exact position of the node at ``path``, or None when there is none."""
        return self._positions.get(self.prefix + tuple(path))

    def line_of(self, path: Sequence[PathElem] = ()) -> int | None:
        """The line of the node at ``path``, else of its nearest existing ancestor.

        A missing field has no node of its own; the mapping that lacks it is the
        right place to point at.
        """
        full = self.prefix + tuple(path)
        for n in range(len(full), -1, -1):
            pos = self._positions.get(full[:n])
            if pos is not None:
                return pos.report_line
        return None

    def field(self, path: Sequence[PathElem] = ()) -> str:
        """The full printed field path of ``path`` (relative to this view)."""
        return format_path(self.prefix + tuple(path))

    def error(self, message: str, path: Sequence[PathElem] = ()) -> SpecError:
        """A ``SpecError`` naming this file, the line of ``path`` and the field path."""
        return SpecError(message, file=self.filename, line=self.line_of(path),
                         field=self.field(path) or None)

    def relocate(self, err: SpecError, path: Sequence[PathElem] = ()) -> SpecError:
        """``err`` with file, line and field filled in where it had none.

        Validators below the YAML layer (``vdevice.sizes``) raise ``SpecError`` with a
        relative field name or none; this anchors them at ``path``.
        """
        fld = self.field(path) or None
        return err.located(file=self.filename, line=self.line_of(path), field=fld)

    # ---- navigation ---------------------------------------------------------------
    def has(self, path: Sequence[PathElem]) -> bool:
        return (self.prefix + tuple(path)) in self._positions

    def get(self, path: Sequence[PathElem]) -> Any:
        """The data at ``path`` (KeyError/IndexError when absent)."""
        node = self.data
        for elem in path:
            node = node[elem]
        return node

    def at(self, path: Sequence[PathElem]) -> Located:
        """A view rooted at ``path``; errors still carry the full path and the file."""
        return Located(self.get(path), self.filename, self._positions, self.prefix + tuple(path))

    def with_data(self, data: Any) -> Located:
        """The same positions over different data of the same shape.

        Used after parameter substitution: the substituted steps keep the lines of
        the templated ones they came from.
        """
        return Located(data, self.filename, self._positions, self.prefix)


# ---- loading -----------------------------------------------------------------------

#: limits on what a scenario or topology may be (they come from other people): the
#: text, the nodes after alias expansion (a 460-byte alias bomb expands to gigabytes),
#: and the nesting (deep nesting exhausts the parser's recursion)
MAX_YAML_CHARS = 1024 * 1024
MAX_YAML_NODES = 50_000
MAX_YAML_DEPTH = 64


def load(text: str, filename: str) -> Located:
    """Parse one YAML document into plain data with positions.

    Raises ``SpecError`` (with the line) for YAML syntax errors, several documents in
    one file, duplicate keys (naming both lines), non-scalar keys and recursive
    aliases. An empty document yields ``data is None``; the schema decides whether
    that is acceptable.
    """
    if len(text) > MAX_YAML_CHARS:
        raise SpecError(f"{len(text)} characters is more than the {MAX_YAML_CHARS} a scenario "
                        "or topology may have", file=filename)
    try:
        loader = yaml.SafeLoader(text)   # its reader refuses NUL and control characters
    except yaml.YAMLError as exc:
        raise SpecError(f"YAML error: {type(exc).__name__}: the file has characters YAML "
                        "does not allow (NUL, control characters)", file=filename) from None
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            raise _syntax_error(exc, filename) from None
        except yaml.YAMLError as exc:   # ReaderError: NUL and other unprintable characters
            raise SpecError(f"YAML error: {type(exc).__name__}: the file has characters YAML "
                            "does not allow (NUL, control characters)", file=filename) from None
        except RecursionError:
            raise SpecError(f"nested more deeply than the {MAX_YAML_DEPTH} levels a scenario "
                            "or topology may have", file=filename) from None
        positions: dict[YamlPath, Position] = {}
        if root is None:
            return Located(None, filename, positions)
        data = _Builder(loader, filename, positions).build(root, (), None)
        return Located(data, filename, positions)
    finally:
        loader.dispose()


def _syntax_error(exc: yaml.MarkedYAMLError, filename: str) -> SpecError:
    mark = exc.problem_mark or exc.context_mark
    context = exc.context
    if context and exc.context_mark is not None and mark is not exc.context_mark \
            and exc.context_mark.line != getattr(mark, "line", None):
        context = f"{context} started at line {exc.context_mark.line + 1}"
    parts = [p for p in (context, exc.problem) if p]
    what = "; ".join(parts) or "cannot parse"
    if "found character '\\t'" in what:
        what += " (YAML does not allow tabs for indentation; use spaces)"
    return SpecError(f"YAML syntax error: {what}", file=filename,
                     line=mark.line + 1 if mark is not None else None)


class _Builder:
    """Turns composed nodes into plain data while recording positions."""

    def __init__(self, loader: yaml.SafeLoader, filename: str,
                 positions: dict[YamlPath, Position]) -> None:
        self.loader = loader
        self.filename = filename
        self.positions = positions
        self.active: set[int] = set()   # node ids on the current path (recursive aliases)
        self.built = 0

    def build(self, node: yaml.Node, path: YamlPath, key_line: int | None) -> Any:
        self.built += 1
        if self.built > MAX_YAML_NODES:
            raise SpecError(f"more than {MAX_YAML_NODES} values once aliases are expanded "
                            "(an alias bomb?)", file=self.filename,
                            line=node.start_mark.line + 1)
        if len(path) > MAX_YAML_DEPTH:
            raise SpecError(f"nested more deeply than the {MAX_YAML_DEPTH} levels a scenario "
                            "or topology may have", file=self.filename,
                            line=node.start_mark.line + 1)
        self.positions[path] = Position(node.start_mark.line + 1, node.start_mark.column + 1,
                                        key_line)
        if id(node) in self.active:
            raise SpecError("recursive YAML alias", file=self.filename,
                            line=node.start_mark.line + 1, field=format_path(path) or None)
        if isinstance(node, yaml.ScalarNode):
            try:
                return self.loader.construct_object(node, deep=True)
            except yaml.MarkedYAMLError as exc:
                raise _syntax_error(exc, self.filename) from None
            except (ValueError, OverflowError):   # e.g. an integer of 5000 digits
                raise SpecError("a value YAML cannot represent (a number too long?)",
                                file=self.filename, line=node.start_mark.line + 1,
                                field=format_path(path) or None) from None
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(child, path + (i,), None)
                        for i, child in enumerate(node.value)]
            if isinstance(node, yaml.MappingNode):
                return self._mapping(node, path)
            raise SpecError(f"unsupported YAML node {node.tag}", file=self.filename,
                            line=node.start_mark.line + 1)  # pragma: no cover
        finally:
            self.active.discard(id(node))

    def _key(self, node: yaml.Node, path: YamlPath) -> str | int:
        if not isinstance(node, yaml.ScalarNode):
            raise SpecError("mapping keys must be plain names, not lists or mappings",
                            file=self.filename, line=node.start_mark.line + 1,
                            field=format_path(path) or None)
        key = self.loader.construct_object(node)
        if isinstance(key, bool) or key is None or not isinstance(key, (str, int)):
            # YAML 1.1 reads `on:`/`no:`/`null:` as booleans or null; say so plainly.
            raise SpecError(f"mapping key {node.value!r} is read by YAML as {key!r}; quote it",
                            file=self.filename, line=node.start_mark.line + 1,
                            field=format_path(path) or None)
        return key

    def _mapping(self, node: yaml.MappingNode, path: YamlPath) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        first_line: dict[Any, int] = {}
        merged: list[yaml.MappingNode] = []
        for knode, vnode in node.value:
            if knode.tag == _MERGE_TAG:
                # `<<: *defaults` - explicit keys win over merged ones, as YAML says.
                sources = vnode.value if isinstance(vnode, yaml.SequenceNode) else [vnode]
                for src in sources:
                    if not isinstance(src, yaml.MappingNode):
                        raise SpecError("'<<' merges only mappings", file=self.filename,
                                        line=knode.start_mark.line + 1,
                                        field=format_path(path) or None)
                    merged.append(src)
                continue
            key = self._key(knode, path)
            kline = knode.start_mark.line + 1
            if key in first_line:
                raise SpecError(f"duplicate key {key!r} (first at line {first_line[key]}, "
                                f"again at line {kline}); YAML would silently keep only the "
                                "last one", file=self.filename, line=kline,
                                field=format_path(path + (key,)))
            first_line[key] = kline
            out[key] = self.build(vnode, path + (key,), kline)
        for src in merged:
            for knode, vnode in src.value:
                if knode.tag == _MERGE_TAG:
                    raise SpecError("nested '<<' merges are not supported", file=self.filename,
                                    line=knode.start_mark.line + 1)
                key = self._key(knode, path)
                if key not in out:
                    out[key] = self.build(vnode, path + (key,), knode.start_mark.line + 1)
        return out


# ---- pydantic -------------------------------------------------------------------------

def validate(model_cls: type[M], located: Located, path: Sequence[PathElem] = (), *,
             context: dict[str, Any] | None = None) -> M:
    """Validate the data at ``path`` with ``model_cls``; errors become ``SpecError``.

    ``context`` is handed to pydantic validators (``info.context``).
    """
    sub = located.at(path) if path else located
    try:
        return model_cls.model_validate(sub.data, context=context)
    except ValidationError as exc:
        raise spec_error(exc, sub, model_cls) from None
    except SpecError as exc:           # raised by a plain (non-pydantic) hook
        raise sub.relocate(exc) from None


def spec_error(exc: ValidationError, located: Located,
               model_cls: type[BaseModel] | None = None) -> SpecError:
    """Convert a pydantic ``ValidationError`` into one ``SpecError`` at the right line.

    Pydantic's ``loc`` tuples contain data keys and also names of its own (union
    members such as ``'int'``, tagged-union tags, ``function-after[...]``); we walk
    the data alongside and keep only the elements that exist in it, so the line is
    that of the nearest real node. Errors at the same place (the branches of a
    union) are merged. The first problem is the error; up to five more are listed.
    """
    groups: dict[YamlPath, list[dict[str, Any]]] = {}
    for err in exc.errors(include_url=False):
        path = _data_path(located.data, err["loc"])
        groups.setdefault(path, []).append(dict(err))
    msgs: list[tuple[YamlPath, str]] = [(p, _group_message(errs, p, model_cls))
                                        for p, errs in groups.items()]
    path0, msg0 = msgs[0]
    extra = msgs[1:]
    if extra:
        lines = [f"  also {located.filename}:{located.line_of(p)}: {located.field(p)}: {m}"
                 for p, m in extra[:5]]
        if len(extra) > 5:
            lines.append(f"  ... and {len(extra) - 5} more")
        msg0 = msg0 + "\n" + "\n".join(lines)
    return located.error(msg0, path0)


def _data_path(data: Any, loc: Sequence[Any]) -> YamlPath:
    out: list[PathElem] = []
    node = data
    missing = False
    for elem in loc:
        if missing:
            break
        if isinstance(node, Mapping):
            if elem in node:
                out.append(elem)
                node = node[elem]
                continue
            if isinstance(elem, str) and f"{elem}_ms" in node:   # `timeout_ms:` for `timeout`
                out.append(f"{elem}_ms")
                node = node[f"{elem}_ms"]
                continue
            if isinstance(elem, str) and _IDENT_RE.match(elem) and not _is_pydantic_tag(elem):
                # A key the data lacks (a missing field): name it, point at its parent.
                out.append(elem)
                missing = True
            continue
        if isinstance(node, list) and isinstance(elem, int) and 0 <= elem < len(node):
            out.append(elem)
            node = node[elem]
            continue
        # a union member name, a tag or a function name: not part of the data
    return tuple(out)


_PYDANTIC_TAGS = {"str", "int", "float", "bool", "list", "dict", "tuple", "none", "set"}


def _is_pydantic_tag(elem: str) -> bool:
    base = elem.split("[", 1)[0]
    return base in _PYDANTIC_TAGS or "[" in elem or base.startswith("function-")


def _group_message(errs: list[dict[str, Any]], path: YamlPath,
                   model_cls: type[BaseModel] | None) -> str:
    if len(errs) == 1:
        return _message(errs[0], path, model_cls)
    # A union: "expected an integer or a string".
    expected = [_EXPECT.get(e["type"]) for e in errs]
    if all(expected):
        uniq = list(dict.fromkeys(x for x in expected if x))
        either = uniq[0] if len(uniq) == 1 else ", ".join(uniq[:-1]) + " or " + uniq[-1]
        return f"expected {either}, got {_show(errs[0].get('input'))}"
    others = [e for e in errs if e["type"] not in _EXPECT]
    return _message(others[0] if others else errs[0], path, model_cls)


_EXPECT = {
    "int_type": "an integer", "int_parsing": "an integer", "float_type": "a number",
    "float_parsing": "a number", "string_type": "a string", "bool_type": "true or false",
    "bool_parsing": "true or false", "list_type": "a list", "tuple_type": "a list",
    "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
    "none_required": "nothing (null)", "int_from_float": "a whole number",
    "mapping_type": "a mapping",
}


def _show(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    if value is None:
        return "nothing (null)"
    return repr(value)


def _message(err: dict[str, Any], path: YamlPath, model_cls: type[BaseModel] | None) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "missing":
        return "required field is missing"
    if kind == "extra_forbidden":
        key = path[-1] if path else "?"
        allowed = _allowed_fields(model_cls, err["loc"][:-1])
        if allowed:
            return unknown("field", key, allowed)
        return f"unknown field {key!r}"
    if kind in ("literal_error", "enum"):
        choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
        return unknown("value", err.get("input"), choices)
    if kind in ("value_error", "assertion_error"):
        inner = ctx.get("error")
        if isinstance(inner, SpecError):
            return inner.bare_message
        msg = str(err.get("msg", ""))
        return msg.split(", ", 1)[1] if msg.startswith(("Value error, ", "Assertion failed, ")) \
            else msg
    if kind in _EXPECT:
        return f"expected {_EXPECT[kind]}, got {_show(err.get('input'))}"
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        return f"{err.get('msg', kind).lower().replace('input', 'value')}, got {err.get('input')!r}"
    if kind in ("too_short", "too_long"):
        return str(err.get("msg", kind)).replace("List", "the list").replace("Tuple", "the list")
    if kind == "string_pattern_mismatch":
        return f"{_show(err.get('input'))} does not have the expected form ({ctx.get('pattern')})"
    return str(err.get("msg", kind))


def _allowed_fields(model_cls: type[BaseModel] | None, loc: Sequence[Any]) -> list[str]:
    """Best effort: the field names of the model that ``loc`` lands in (for suggestions)."""
    import typing

    if model_cls is None:
        return []
    current: list[type[BaseModel]] = [model_cls]
    for elem in loc:
        nxt: list[type[BaseModel]] = []
        for cls in current:
            fields = cls.model_fields
            name = next((n for n, f in fields.items() if n == elem or f.alias == elem), None)
            if name is None:
                nxt.append(cls)            # a tag or index: stay on this model
                continue
            stack = [fields[name].annotation]
            while stack:
                ann = stack.pop()
                if isinstance(ann, type) and issubclass(ann, BaseModel):
                    nxt.append(ann)
                else:
                    stack.extend(a for a in typing.get_args(ann) if a is not None)
        current = list(dict.fromkeys(nxt))
        if not current:
            return []
    names: list[str] = []
    for cls in current:
        names += [f.alias or n for n, f in cls.model_fields.items()]
    return list(dict.fromkeys(names))
