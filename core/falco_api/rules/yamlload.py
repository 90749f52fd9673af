"""Safe, bounded YAML loading for rules files, keeping source positions.

PyYAML's SafeLoader already refuses arbitrary Python objects; on top of it this module bounds what a
hostile or broken file can cost before any validation runs: the size of the text, the nesting depth of
the node tree, and the size of the tree once aliases are expanded ("billion laughs": a few hundred bytes
of anchors that expand to gigabytes when something walks the result).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

DEFAULT_MAX_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class RulesLimits:
    """Resource bounds applied to every rules file before it is interpreted."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_depth: int = 64
    # Counted with aliases expanded: each reference to an anchored node counts that node's whole subtree.
    max_expanded_nodes: int = 1_000_000
    max_files: int = 1000


class YamlLimitError(Exception):
    """The document breaks one of the RulesLimits; line/column point at where it was noticed."""

    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column


class YamlSyntaxError(Exception):
    def __init__(self, message: str, line: int, column: int) -> None:
        super().__init__(message)
        self.message = message
        self.line = line
        self.column = column


def mark_position(node: Node) -> tuple[int, int]:
    """1-based (line, column) of a node's start."""
    return node.start_mark.line + 1, node.start_mark.column + 1


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses node trees nested deeper than a limit while composing them."""

    def __init__(self, stream: str, max_depth: int) -> None:
        super().__init__(stream)
        self._max_depth = max_depth
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:  # type: ignore[override]
        self._depth += 1
        try:
            if self._depth > self._max_depth:
                mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
                raise YamlLimitError(
                    f"YAML nesting deeper than {self._max_depth} levels", mark.line + 1, mark.column + 1
                )
            return super().compose_node(parent, index)  # type: ignore[no-any-return]
        finally:
            self._depth -= 1


# yaml-cpp (Falco's parser) reads a plain `=` as the string "=", as in `comps: [=, in]`; PyYAML's YAML 1.1
# resolver tags it as a "value" and SafeLoader then refuses it.
def _construct_plain_string(loader: yaml.SafeLoader, node: Node) -> str:
    return str(node.value)


_BoundedLoader.add_constructor("tag:yaml.org,2002:value", _construct_plain_string)


def _check_expansion(root: Node, limit: int) -> None:
    """Count nodes as a consumer walking the constructed data would see them (aliases expanded)."""
    sizes: dict[int, int] = {}
    in_progress: set[int] = set()
    # Iterative post-order walk: a recursive one would itself be a stack-depth hazard on odd inputs.
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if key in sizes and not children_done:
            continue
        children: list[Node] = []
        if isinstance(node, SequenceNode):
            children = list(node.value)
        elif isinstance(node, MappingNode):
            for k, v in node.value:
                children.extend((k, v))
        if not children_done:
            if key in in_progress:
                line, col = mark_position(node)
                raise YamlLimitError("recursive YAML alias (an anchor that contains itself)", line, col)
            in_progress.add(key)
            stack.append((node, True))
            for child in children:
                if id(child) in in_progress:
                    line, col = mark_position(child)
                    raise YamlLimitError("recursive YAML alias (an anchor that contains itself)", line, col)
                if id(child) not in sizes:
                    stack.append((child, False))
            continue
        in_progress.discard(key)
        total = 1 + sum(sizes[id(c)] for c in children)
        if total > limit:
            line, col = mark_position(node)
            raise YamlLimitError(
                f"YAML expands to more than {limit} nodes once aliases are resolved (alias expansion bomb?)",
                line,
                col,
            )
        sizes[key] = total


@dataclass
class LoadedDocument:
    """The composed node tree (for positions) and the constructed Python data (for values)."""

    root: Node | None
    data: Any


def load_rules_yaml(content: str, limits: RulesLimits | None = None) -> LoadedDocument:
    """Parse one rules file safely.

    Raises YamlLimitError when a limit is exceeded and YamlSyntaxError on malformed YAML (including more
    than one document in the stream). An empty file yields root None and data None.
    """
    limits = limits or RulesLimits()
    size = len(content.encode("utf-8", errors="surrogatepass"))
    if size > limits.max_bytes:
        raise YamlLimitError(f"file is {size} bytes, larger than the limit of {limits.max_bytes} bytes", 1, 1)
    try:
        # The reader refuses control characters (NUL, ESC, ...) as soon as it is made.
        loader = _BoundedLoader(content, limits.max_depth)
    except yaml.reader.ReaderError as exc:
        line, col = _position_of(content, exc.position)
        code = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "?")
        raise YamlSyntaxError(
            f"invalid YAML: character U+{code:04X} is not allowed ({exc.reason})", line, col
        ) from None
    try:
        root = loader.get_single_node()
        if root is None:
            return LoadedDocument(None, None)
        _check_expansion(root, limits.max_expanded_nodes)
        data = loader.construct_document(root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (1, 1)
        parts = [p for p in (exc.context, exc.problem) if p]
        raise YamlSyntaxError("invalid YAML: " + ", ".join(parts), line, col) from None
    except yaml.YAMLError as exc:
        raise YamlSyntaxError(f"invalid YAML: {exc}", 1, 1) from None
    except RecursionError:
        raise YamlLimitError("YAML structure too deeply nested", 1, 1) from None
    finally:
        loader.dispose()
    return LoadedDocument(root, data)


def _position_of(content: str, index: int) -> tuple[int, int]:
    """1-based (line, column) of a character index, counting lines like PyYAML."""
    before = content[:index]
    line_start = max(before.rfind("\n"), before.rfind("\r")) + 1
    return before.count("\n") + before.count("\r") - before.count("\r\n") + 1, index - line_start + 1


def mapping_entries(node: MappingNode) -> dict[str, tuple[Node, Node]]:
    """Key name -> (key node, value node) for the scalar keys of a mapping, last one winning like PyYAML."""
    out: dict[str, tuple[Node, Node]] = {}
    for key_node, value_node in node.value:
        if isinstance(key_node, ScalarNode):
            out[str(key_node.value)] = (key_node, value_node)
    return out


class SourceText:
    """Maps character offsets of a file's text to 1-based line/column, and scalar values back to source."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._line_starts = [0]
        for i, ch in enumerate(text):
            if ch == "\n":
                self._line_starts.append(i + 1)

    def position(self, index: int) -> tuple[int, int]:
        import bisect

        index = max(0, min(index, len(self.text)))
        line = bisect.bisect_right(self._line_starts, index) - 1
        return line + 1, index - self._line_starts[line] + 1

    def scalar_offset_map(self, node: ScalarNode) -> list[int]:
        """For each character of the scalar's value, its index in the file text (best effort).

        Plain, block (| and >) and quoted scalars differ from their source only by layout (indentation,
        folded line breaks) and escapes, so a greedy alignment that lets source-only whitespace and
        escape characters be skipped recovers the position of every meaningful character.
        """
        value = str(node.value)
        start, end = node.start_mark.index, node.end_mark.index
        raw = self.text[start:end]
        j = 0
        if node.style in ("|", ">"):
            newline = raw.find("\n")
            j = newline + 1 if newline >= 0 else len(raw)
        elif node.style in ("'", '"'):
            j = 1
        mapping: list[int] = []
        i = 0
        while i < len(value):
            if j >= len(raw):
                mapping.append(start + max(len(raw) - 1, 0))
                i += 1
                continue
            v, s = value[i], raw[j]
            if v == s:
                mapping.append(start + j)
                i += 1
                j += 1
            elif s in " \t\r\n\\":
                j += 1
            elif v in " \t\r\n":
                mapping.append(start + j)
                i += 1
            else:
                j += 1
        return mapping
