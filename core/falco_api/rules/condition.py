"""A parser for Falco's condition language (the libsinsp filter grammar).

It follows the productions libsinsp documents in filter/parser.h:

    Expr        ::= OrExpr
    OrExpr      ::= AndExpr ('or' (' ' AndExpr | '(' Expr ')'))*
    AndExpr     ::= NotExpr ('and' (' ' NotExpr | '(' Expr ')'))*
    NotExpr     ::= ('not' blank)* ('not(' Expr ')' | Check)
    Check       ::= Field Condition | Transformer Condition | Identifier | '(' Expr ')'
    Condition   ::= 'exists'
                  | NumOp (NumValue | TransformerOrVal)
                  | StrOp (StrValue | TransformerOrVal)
                  | ListOp (ListValue | TransformerOrVal)
    ListValue   ::= '(' (StrValue (',' StrValue)*)? ')' | Identifier
    Field       ::= FieldName ('[' (QuotedStr | FieldArgBareStr) ']')?

and the same token shapes, so what it accepts and rejects matches what Falco's loader does. Positions are
0-based character offsets into the condition text; callers map them to file lines and columns.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

UNARY_OPERATORS = ("exists",)
NUMERIC_OPERATORS = ("<=", "<", ">=", ">")
# Word operators must be followed by a blank, as in libsinsp ("glob " etc.); listed longest-first where
# one is a prefix of another.
STRING_OPERATORS = (
    "==",
    "=",
    "!=",
    "bcontains",
    "bstartswith",
    "contains",
    "endswith",
    "glob",
    "icontains",
    "iglob",
    "startswith",
    "regex",
)
WORD_STRING_OPERATORS = frozenset(op for op in STRING_OPERATORS if op[0].isalpha())
LIST_OPERATORS = ("intersects", "in", "pmatch")
ALL_OPERATORS = UNARY_OPERATORS + NUMERIC_OPERATORS + STRING_OPERATORS + LIST_OPERATORS

# Transformers taking exactly one field (or nested transformer) argument.
SINGLE_ARG_TRANSFORMERS = ("tolower", "toupper", "b64", "basename", "len")
# Multi-value transformers: several arguments, which may also be literal strings (separators, options).
MULTI_ARG_TRANSFORMERS = ("join", "concat", "getopt")
TRANSFORMERS = SINGLE_ARG_TRANSFORMERS + MULTI_ARG_TRANSFORMERS
VAL_TRANSFORMER = "val"

KEYWORDS = frozenset({"and", "or", "not"})

MAX_NESTING = 100

_IDENTIFIER = re.compile(r"[a-zA-Z]+[a-zA-Z0-9_]*")
_FIELD_NAME = re.compile(r"[a-zA-Z]+[a-zA-Z0-9_]*(?:\.[a-zA-Z]+[a-zA-Z0-9_]*)+")
_FIELD_ARG_BARE = re.compile(r"[^ \b\t\n\r\[\]\"']+")
_HEX_NUMBER = re.compile(r"0[xX][0-9a-zA-Z]+")
_NUMBER = re.compile(r"[+\-]?[0-9]+\.?[0-9]*(?:[eE][+\-][0-9]+)?")
_BARE_STRING = re.compile(r"[^ \b\t\n\r(),=\"']+")
_NOT_BLANK = re.compile(r"not[ \b\t\n\r]+")
_BLANKS = " \t\b\r\n"

_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "\\": "\\", '"': '"', "'": "'"}


class ConditionSyntaxError(Exception):
    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset


# --- AST -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldRef:
    name: str
    arg: str | None
    offset: int

    @property
    def field_class(self) -> str:
        return self.name.split(".", 1)[0]


@dataclass(frozen=True)
class Literal:
    value: str
    quoted: bool
    offset: int


@dataclass(frozen=True)
class Transformer:
    name: str
    args: tuple[FieldRef | Transformer | Literal, ...]
    offset: int


@dataclass(frozen=True)
class ListLiteral:
    items: tuple[Literal, ...]
    offset: int


@dataclass(frozen=True)
class ListRef:
    """`in some_list` without parentheses: the identifier must name a list."""

    name: str
    offset: int


Operand = FieldRef | Transformer


@dataclass(frozen=True)
class UnaryCheck:
    left: Operand
    operator: str
    offset: int


@dataclass(frozen=True)
class BinaryCheck:
    left: Operand
    operator: str
    right: Literal | ListLiteral | ListRef | Operand
    offset: int


@dataclass(frozen=True)
class MacroRef:
    name: str
    offset: int


@dataclass(frozen=True)
class Not:
    child: Expr
    offset: int


@dataclass(frozen=True)
class And:
    children: tuple[Expr, ...]
    offset: int


@dataclass(frozen=True)
class Or:
    children: tuple[Expr, ...]
    offset: int


Expr = And | Or | Not | UnaryCheck | BinaryCheck | MacroRef


@dataclass
class ConditionRefs:
    """What a parsed condition refers to, with offsets, gathered in one walk."""

    macros: list[MacroRef] = field(default_factory=list)
    list_refs: list[ListRef] = field(default_factory=list)
    list_items: list[Literal] = field(default_factory=list)
    fields: list[FieldRef] = field(default_factory=list)


def collect_refs(expr: Expr) -> ConditionRefs:
    refs = ConditionRefs()
    stack: list[Expr] = [expr]
    while stack:
        node = stack.pop()
        if isinstance(node, And | Or):
            stack.extend(node.children)
        elif isinstance(node, Not):
            stack.append(node.child)
        elif isinstance(node, MacroRef):
            refs.macros.append(node)
        elif isinstance(node, UnaryCheck):
            _collect_operand(node.left, refs)
        else:
            _collect_operand(node.left, refs)
            right = node.right
            if isinstance(right, ListLiteral):
                refs.list_items.extend(right.items)
            elif isinstance(right, ListRef):
                refs.list_refs.append(right)
            elif isinstance(right, FieldRef | Transformer):
                _collect_operand(right, refs)
    refs.macros.sort(key=lambda r: r.offset)
    refs.list_refs.sort(key=lambda r: r.offset)
    refs.fields.sort(key=lambda r: r.offset)
    return refs


def _collect_operand(operand: FieldRef | Transformer | Literal, refs: ConditionRefs) -> None:
    if isinstance(operand, FieldRef):
        refs.fields.append(operand)
    elif isinstance(operand, Transformer):
        for arg in operand.args:
            _collect_operand(arg, refs)


# --- parser ----------------------------------------------------------------------------------------


def unescape(quoted: str) -> str:
    """The text of a quoted string token (quotes included) with backslash escapes resolved."""
    body = quoted[1:-1]
    if "\\" not in body:
        return body
    out: list[str] = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            out.append(_ESCAPES.get(nxt, "\\" + nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.depth = 0
        self.last_token = ""

    # lexing helpers

    def error(self, message: str, offset: int | None = None) -> ConditionSyntaxError:
        if offset is None:
            offset = self.pos
            # At the end of the input, point just after the last token rather than past trailing blanks.
            if not self.text[offset:].strip():
                offset = len(self.text.rstrip())
        return ConditionSyntaxError(message, offset)

    def blank(self) -> bool:
        start = self.pos
        text = self.text
        while self.pos < len(text) and text[self.pos] in _BLANKS:
            self.pos += 1
        return self.pos > start

    def literal(self, token: str) -> bool:
        if self.text.startswith(token, self.pos):
            self.pos += len(token)
            self.last_token = token
            return True
        return False

    def regex(self, pattern: re.Pattern[str]) -> str | None:
        match = pattern.match(self.text, self.pos)
        if match is None:
            return None
        self.pos = match.end()
        self.last_token = match.group(0)
        return self.last_token

    def quoted(self) -> str | None:
        if self.pos >= len(self.text) or self.text[self.pos] not in "'\"":
            return None
        delimiter = self.text[self.pos]
        i = self.pos + 1
        while i < len(self.text):
            ch = self.text[i]
            if ch == "\\":
                i += 2
                continue
            if ch == delimiter:
                token = self.text[self.pos : i + 1]
                self.pos = i + 1
                self.last_token = token
                return unescape(token)
            i += 1
        raise self.error("unterminated quoted string")

    def push(self) -> None:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.error(f"condition nested deeper than {MAX_NESTING} levels")

    def pop(self) -> None:
        self.depth -= 1

    # grammar

    def parse(self) -> Expr:
        if not self.text.strip():
            raise self.error("condition is empty", 0)
        expr = self.parse_or()
        self.blank()
        if self.pos != len(self.text):
            after = f" after '{self.last_token}'" if self.last_token else ""
            raise self.error(f"unexpected token{after}, expecting 'or', 'and'")
        return expr

    def parse_or(self) -> Expr:
        self.push()
        self.blank()
        start = self.pos
        children = [self.parse_and()]
        self.blank()
        while self.keyword("or"):
            children.append(self.keyword_operand("or", self.parse_and))
            self.blank()
        self.pop()
        return children[0] if len(children) == 1 else Or(tuple(children), start)

    def parse_and(self) -> Expr:
        self.push()
        self.blank()
        start = self.pos
        children = [self.parse_not()]
        self.blank()
        while self.keyword("and"):
            children.append(self.keyword_operand("and", self.parse_not))
            self.blank()
        self.pop()
        return children[0] if len(children) == 1 else And(tuple(children), start)

    def keyword(self, word: str) -> bool:
        # libsinsp matches the bare prefix, then insists on a blank or '(' right after it.
        return self.literal(word)

    def keyword_operand(self, word: str, parse_next: Callable[[], Expr]) -> Expr:
        if self.blank():
            return parse_next()
        if self.literal("("):
            return self.parse_embedded_remainder()
        if self.pos >= len(self.text):
            raise self.error(f"unexpected end of condition after '{word}'")
        raise self.error(f"expected blank or '(' after '{word}'")

    def parse_not(self) -> Expr:
        self.push()
        self.blank()
        start = self.pos
        negations = 0
        while self.regex(_NOT_BLANK) is not None:
            negations += 1
        if self.literal("not("):
            negations += 1
            child = self.parse_embedded_remainder()
        else:
            child = self.parse_check()
        self.pop()
        return Not(child, start) if negations % 2 else child

    def parse_embedded_remainder(self) -> Expr:
        self.push()
        self.blank()
        child = self.parse_or()
        self.blank()
        if not self.literal(")"):
            raise self.error("expected a ')' token")
        self.pop()
        return child

    def parse_check(self) -> Expr:
        self.push()
        self.blank()
        start = self.pos
        if self.literal("("):
            child = self.parse_embedded_remainder()
            self.pop()
            return child

        transformer = self.try_transformer(allow_val=False)
        if transformer is not None:
            result = self.parse_condition(transformer, start)
            self.pop()
            return result

        field_ref = self.try_field()
        if field_ref is not None:
            result = self.parse_condition(field_ref, start)
            self.pop()
            return result

        name = self.regex(_IDENTIFIER)
        if name is not None:
            if name in KEYWORDS:
                raise self.error(f"unexpected keyword '{name}', expecting a field check or a macro", start)
            if self.text.startswith("(", self.pos):
                if name == VAL_TRANSFORMER:
                    raise self.error("'val(' may only appear on the right-hand side of a comparison", start)
                known = ", ".join(TRANSFORMERS)
                raise self.error(f"unknown transformer '{name}(' (known: {known})", start)
            self.pop()
            return MacroRef(name, start)

        if self.pos >= len(self.text):
            raise self.error("unexpected end of condition, expecting a '(' token, a field check, or a macro")
        raise self.error("expected a '(' token, a field check, or a macro name")

    def try_field(self) -> FieldRef | None:
        start = self.pos
        name = self.regex(_FIELD_NAME)
        if name is None:
            return None
        arg: str | None = None
        if self.literal("["):
            arg = self.quoted()
            if arg is None:
                arg = self.regex(_FIELD_ARG_BARE)
            if arg is None:
                raise self.error("expected a valid field argument: a quoted string or a bare string")
            if not self.literal("]"):
                raise self.error("expected a ']' token")
        return FieldRef(name, arg, start)

    def try_transformer(self, *, allow_val: bool) -> Transformer | None:
        start = self.pos
        names = (*TRANSFORMERS, VAL_TRANSFORMER) if allow_val else TRANSFORMERS
        for name in names:
            if self.literal(name + "("):
                break
        else:
            return None
        self.push()
        args: list[FieldRef | Transformer | Literal] = []
        multi = name in MULTI_ARG_TRANSFORMERS
        while True:
            self.blank()
            args.append(self.transformer_arg(name, allow_literal=multi))
            self.blank()
            if multi and self.literal(","):
                continue
            break
        if not self.literal(")"):
            raise self.error(f"expected a ')' token to close '{name}('")
        self.pop()
        return Transformer(name, tuple(args), start)

    def transformer_arg(self, name: str, *, allow_literal: bool) -> FieldRef | Transformer | Literal:
        nested = self.try_transformer(allow_val=False)
        if nested is not None:
            return nested
        field_ref = self.try_field()
        if field_ref is not None:
            return field_ref
        if allow_literal:
            start = self.pos
            quoted = self.quoted()
            if quoted is not None:
                return Literal(quoted, True, start)
            bare = self.regex(_BARE_STRING)
            if bare is not None:
                return Literal(bare, False, start)
        raise self.error(f"expected a field or a transformer as argument of '{name}('")

    def parse_condition(self, left: Operand, start: int) -> Expr:
        self.blank()
        if self.literal("exists"):
            return UnaryCheck(left, "exists", start)
        operator_offset = self.pos
        for op in NUMERIC_OPERATORS:
            if self.literal(op):
                return BinaryCheck(left, op, self.num_value_or_transformer(), start)
        for op in STRING_OPERATORS:
            if op in WORD_STRING_OPERATORS:
                if not self.literal(op + " ") and not self.word_operator_before_blank(op):
                    continue
            elif not self.literal(op):
                continue
            return BinaryCheck(left, op, self.str_value_or_transformer(), start)
        for op in LIST_OPERATORS:
            if self.literal(op):
                return BinaryCheck(left, op, self.list_value_or_transformer(), start)
        ops = ", ".join(f"'{op}'" for op in ALL_OPERATORS)
        raise self.error(f"expected a valid check operator: one of {ops}", operator_offset)

    def word_operator_before_blank(self, op: str) -> bool:
        # libsinsp spells these "glob " etc.; any blank (tab, newline) after the word is accepted too.
        end = self.pos + len(op)
        if self.text.startswith(op, self.pos) and end < len(self.text) and self.text[end] in _BLANKS:
            self.pos = end
            self.last_token = op
            return True
        return False

    def value_transformer(self) -> Transformer | None:
        self.blank()
        return self.try_transformer(allow_val=True)

    def num_value_or_transformer(self) -> Literal | Operand:
        transformer = self.value_transformer()
        if transformer is not None:
            return transformer
        start = self.pos
        token = self.regex(_HEX_NUMBER) or self.regex(_NUMBER)
        if token is None:
            raise self.error("expected a number value")
        return Literal(token, False, start)

    def str_value_or_transformer(self) -> Literal | Operand:
        transformer = self.value_transformer()
        if transformer is not None:
            return transformer
        return self.str_value()

    def str_value(self) -> Literal:
        self.blank()
        start = self.pos
        quoted = self.quoted()
        if quoted is not None:
            return Literal(quoted, True, start)
        bare = self.regex(_BARE_STRING)
        if bare is not None:
            return Literal(bare, False, start)
        if self.pos >= len(self.text):
            raise self.error("unexpected end of condition, expecting a string value")
        raise self.error("expected a string value")

    def list_value_or_transformer(self) -> ListLiteral | ListRef | Operand:
        transformer = self.value_transformer()
        if transformer is not None:
            return transformer
        self.blank()
        start = self.pos
        if self.literal("("):
            items: list[Literal] = []
            self.blank()
            if not self.literal(")"):
                items.append(self.str_value())
                self.blank()
                while self.literal(","):
                    items.append(self.str_value())
                    self.blank()
                if not self.literal(")"):
                    raise self.error("expected ',' or a ')' token in the list")
            return ListLiteral(tuple(items), start)
        name = self.regex(_IDENTIFIER)
        if name is not None:
            return ListRef(name, start)
        raise self.error("expected a list '(...)' or a list name")


def parse_condition(text: str) -> Expr:
    """Parse a condition; raises ConditionSyntaxError(message, offset) on the first error."""
    try:
        return _Parser(text).parse()
    except RecursionError:
        raise ConditionSyntaxError("condition nested too deeply", 0) from None
