"""The condition parser: every grammar form, and where errors are reported."""

from __future__ import annotations

import pytest

from falco_api.rules.condition import (
    And,
    BinaryCheck,
    ConditionSyntaxError,
    FieldRef,
    ListLiteral,
    ListRef,
    Literal,
    MacroRef,
    Not,
    Or,
    Transformer,
    UnaryCheck,
    collect_refs,
    parse_condition,
)


def check(text: str) -> BinaryCheck:
    expr = parse_condition(text)
    assert isinstance(expr, BinaryCheck), expr
    return expr


def syntax_error(text: str) -> ConditionSyntaxError:
    with pytest.raises(ConditionSyntaxError) as info:
        parse_condition(text)
    return info.value


@pytest.mark.parametrize("op", ["=", "==", "!=", "<", "<=", ">", ">="])
def test_symbol_comparison_operators(op: str) -> None:
    expr = check(f"fd.num{op}3")
    assert expr.operator == op
    assert expr.left == FieldRef("fd.num", None, 0)
    assert expr.right == Literal("3", False, len("fd.num") + len(op))


@pytest.mark.parametrize(
    "op",
    ["contains", "icontains", "bcontains", "startswith", "bstartswith", "endswith", "glob", "iglob", "regex"],
)
def test_word_comparison_operators(op: str) -> None:
    expr = check(f"proc.cmdline {op} 'a b'")
    assert expr.operator == op
    assert isinstance(expr.right, Literal)
    assert expr.right.value == "a b" and expr.right.quoted


def test_word_operator_needs_a_blank_after_it() -> None:
    err = syntax_error("proc.name contains'x'")
    assert "expected a valid check operator" in err.message
    assert err.offset == len("proc.name ")


def test_numeric_operators_take_numbers_only() -> None:
    assert check("fd.num >= -1").right == Literal("-1", False, 10)
    assert check("evt.arg.flags > 0x1F").right == Literal("0x1F", False, 16)
    assert check("evt.latency < 1.5e+3").right == Literal("1.5e+3", False, 14)
    err = syntax_error("fd.num > abc")
    assert err.message == "expected a number value" and err.offset == 9


def test_unary_exists() -> None:
    expr = parse_condition("proc.pname exists")
    assert expr == UnaryCheck(FieldRef("proc.pname", None, 0), "exists", 0)


@pytest.mark.parametrize("op", ["in", "intersects", "pmatch"])
def test_list_operators_with_literal_lists(op: str) -> None:
    expr = check(f"proc.name {op} (bash, \"my shell\", 'x,y', runc:[0:PARENT], /usr/bin/)")
    assert expr.operator == op
    assert isinstance(expr.right, ListLiteral)
    assert [i.value for i in expr.right.items] == ["bash", "my shell", "x,y", "runc:[0:PARENT]", "/usr/bin/"]
    assert [i.quoted for i in expr.right.items] == [False, True, True, False, False]


def test_empty_list_and_list_name() -> None:
    assert check("proc.name in ()").right == ListLiteral((), 13)
    assert check("proc.name in shell_binaries").right == ListRef("shell_binaries", 13)


def test_list_errors() -> None:
    err = syntax_error("proc.name in (a, b")
    assert err.message == "expected ',' or a ')' token in the list" and err.offset == 18
    err = syntax_error("proc.name in (a,)")
    assert "expected a string value" in err.message and err.offset == 16
    err = syntax_error("proc.name in 'a'")
    assert err.message == "expected a list '(...)' or a list name"


def test_field_arguments() -> None:
    assert check("proc.aname[2] = bash").left == FieldRef("proc.aname", "2", 0)
    assert check("evt.arg[fd] = 3").left == FieldRef("evt.arg", "fd", 0)
    assert check("ka.req.pod.containers.image[0] = x").left.name == "ka.req.pod.containers.image"  # type: ignore[union-attr]
    assert check("jevt.value[/user/username] = admin").left == FieldRef("jevt.value", "/user/username", 0)
    assert check("proc.env['HOME'] = /root").left == FieldRef("proc.env", "HOME", 0)
    assert check("proc.exe_ino.ctime_duration_proc_start < 1").left.name == (  # type: ignore[union-attr]
        "proc.exe_ino.ctime_duration_proc_start"
    )
    err = syntax_error("proc.aname[2 = bash")
    assert err.message == "expected a ']' token" and err.offset == len("proc.aname[2")
    err = syntax_error("proc.aname[] = bash")
    assert "expected a valid field argument" in err.message


@pytest.mark.parametrize("name", ["tolower", "toupper", "b64", "basename", "len"])
def test_single_argument_transformers(name: str) -> None:
    expr = check(f"{name}(proc.name) = bash")
    assert expr.left == Transformer(name, (FieldRef("proc.name", None, len(name) + 1),), 0)


def test_nested_transformers_and_val() -> None:
    expr = check("len(tolower(fd.name)) > val(proc.pid)")
    assert isinstance(expr.left, Transformer) and isinstance(expr.left.args[0], Transformer)
    assert expr.right == Transformer("val", (FieldRef("proc.pid", None, 28),), 24)
    assert isinstance(check("proc.name in val(proc.pname)").right, Transformer)
    assert isinstance(check("proc.name = toupper(proc.pname)").right, Transformer)


@pytest.mark.parametrize("name", ["join", "concat", "getopt"])
def test_multi_argument_transformers(name: str) -> None:
    expr = check(f'{name}(proc.name, "-", proc.pname) = a-b')
    assert isinstance(expr.left, Transformer) and expr.left.name == name
    assert [type(a).__name__ for a in expr.left.args] == ["FieldRef", "Literal", "FieldRef"]


def test_transformer_errors() -> None:
    err = syntax_error("tolower(proc.name = a")
    assert "')' token to close 'tolower('" in err.message and err.offset == len("tolower(proc.name ")
    err = syntax_error("tolower('x') = a")
    assert "expected a field or a transformer as argument of 'tolower('" in err.message
    # val() compares against another field and is not allowed on the left-hand side.
    err = syntax_error("val(proc.name) = a")
    assert err.message == "'val(' may only appear on the right-hand side of a comparison" and err.offset == 0
    err = syntax_error("a and upper(proc.name) = A")
    assert err.message.startswith("unknown transformer 'upper('") and err.offset == 6


def test_boolean_structure_and_precedence() -> None:
    expr = parse_condition("a or b and not c")
    assert isinstance(expr, Or)
    assert expr.children[0] == MacroRef("a", 0)
    second = expr.children[1]
    assert isinstance(second, And)
    assert second.children[1] == Not(MacroRef("c", 15), 11)


def test_not_forms_and_double_negation() -> None:
    assert parse_condition("not not a") == MacroRef("a", 8)
    assert isinstance(parse_condition("not(a)"), Not)
    assert isinstance(parse_condition("a and(b)"), And)
    assert isinstance(parse_condition("a or(b)"), Or)
    assert isinstance(parse_condition("((a))"), MacroRef)


def test_multiline_condition_and_blanks() -> None:
    expr = parse_condition("\n  (evt.type = open\n\tand fd.name startswith /etc)\n")
    assert isinstance(expr, And)


def test_quoted_strings_and_escapes() -> None:
    assert check(r'proc.cmdline = "say \"hi\""').right == Literal('say "hi"', True, 15)
    assert check(r"proc.cmdline = 'it\'s'").right == Literal("it's", True, 15)
    assert check(r'fd.name = "a\\b"').right == Literal("a\\b", True, 10)
    err = syntax_error('proc.name = "abc')
    assert err.message == "unterminated quoted string" and err.offset == 12


def test_bare_strings_stop_at_separators() -> None:
    expr = parse_condition("(fd.name startswith /etc/)")
    assert isinstance(expr, BinaryCheck) and expr.right == Literal("/etc/", False, 20)
    assert check("evt.dir=<").right == Literal("<", False, 8)


def test_error_positions() -> None:
    assert syntax_error("evt.type = open and").message == "unexpected end of condition after 'and'"
    err = syntax_error("evt.type = open and\n  ")
    assert err.offset == len("evt.type = open and")
    err = syntax_error("(a")
    assert err.message == "expected a ')' token" and err.offset == 2
    err = syntax_error("a b")
    assert err.message == "unexpected token after 'a', expecting 'or', 'and'" and err.offset == 2
    err = syntax_error("proc.name bogus x")
    assert err.message.startswith("expected a valid check operator") and err.offset == 10
    err = syntax_error("a and and b")
    assert err.message.startswith("unexpected keyword 'and'") and err.offset == 6
    err = syntax_error("evt.type = ")
    assert "expecting a string value" in err.message and err.offset == 10
    err = syntax_error("a andb")
    assert err.message == "expected blank or '(' after 'and'"
    assert syntax_error("   ").message == "condition is empty"
    assert syntax_error("= x").offset == 0


def test_nesting_limit() -> None:
    err = syntax_error("(" * 200 + "a" + ")" * 200)
    assert "nested deeper" in err.message
    assert isinstance(parse_condition("(" * 15 + "a" + ")" * 15), MacroRef)


def test_collect_refs_gathers_macros_lists_fields() -> None:
    refs = collect_refs(
        parse_condition("m1 and not (proc.name in (l1, x) or fd.name in l2) and tolower(fd.nameraw) = m2")
    )
    assert [m.name for m in refs.macros] == ["m1"]
    assert [r.name for r in refs.list_refs] == ["l2"]
    assert [i.value for i in refs.list_items] == ["l1", "x"]
    assert [f.name for f in refs.fields] == ["proc.name", "fd.name", "fd.nameraw"]
