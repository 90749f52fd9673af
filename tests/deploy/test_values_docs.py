"""Every value in values.yaml is documented with a helm-docs `# --` comment.

A value counts as documented when its own key, or the key of a map that holds it, has a comment
block starting with `# --` right above it (helm-docs documents a whole map by its parent key).
"""

from __future__ import annotations

import pytest
import yaml

from .chart import CHART_DIR


def undocumented_values(text: str) -> list[str]:
    """Dotted paths of the leaf values in ``text`` that no `# --` comment covers, in file order."""
    lines = text.splitlines()
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as error:
        raise ValueError(f"values.yaml does not parse: {error}") from error
    if root is None:
        return []
    if not isinstance(root, yaml.MappingNode):
        raise ValueError("values.yaml must be a mapping at the top level")
    missing: list[str] = []

    def documented(key: yaml.Node) -> bool:
        """The comment lines directly above the key (same block, no blank line) include `# --`."""
        index = key.start_mark.line - 1
        while index >= 0 and lines[index].strip().startswith("#"):
            if lines[index].strip().startswith("# --"):
                return True
            index -= 1
        return False

    def walk(node: yaml.MappingNode, prefix: str) -> None:
        for key, value in node.value:
            path = f"{prefix}{key.value}"
            if documented(key):
                continue
            if isinstance(value, yaml.MappingNode) and value.value:
                walk(value, f"{path}.")
            else:
                missing.append(path)

    walk(root, "")
    return missing


def test_every_value_has_a_doc_comment() -> None:
    missing = undocumented_values((CHART_DIR / "values.yaml").read_text())
    assert not missing, f"values without a `# --` comment: {missing}"


def test_parser_finds_an_undocumented_leaf() -> None:
    text = "# -- documented\na: 1\nb: 2\n"
    assert undocumented_values(text) == ["b"]


def test_parser_accepts_a_documented_parent_for_its_children() -> None:
    text = "# -- all of it\nresources:\n  limits:\n    cpu: 1\n"
    assert undocumented_values(text) == []


def test_parser_descends_into_undocumented_parents() -> None:
    text = "image:\n  # -- the tag\n  tag: x\n  pullPolicy: Always\n"
    assert undocumented_values(text) == ["image.pullPolicy"]


def test_parser_needs_the_comment_directly_above() -> None:
    text = "# -- far away\n\na: 1\n# plain comment\nb: 2\n"
    assert undocumented_values(text) == ["a", "b"]


def test_parser_reads_multi_line_comments_and_empty_maps() -> None:
    text = "# -- first line\n# second line\na: {}\nempty: {}\n"
    assert undocumented_values(text) == ["empty"]


def test_parser_reports_broken_yaml_clearly() -> None:
    with pytest.raises(ValueError, match="does not parse"):
        undocumented_values("a: [1, 2\n")
    with pytest.raises(ValueError, match="mapping"):
        undocumented_values("- a\n- b\n")
