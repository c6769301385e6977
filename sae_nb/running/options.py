"""Command-line options made from dataclasses, as sparsify's and simple_parsing's are: a field's
type gives the option's kind (text, a Python literal, a boolean, a list, a choice) and its
docstring, the string literal under the field (read by :func:`field_docs`), gives the help, so
the help is written once, beside the field. ``python -m sae_nb`` builds the options of its
``extract``, ``train`` and ``sweep`` commands with :func:`add_options`. The same reading of a
field's type checks the values a config file gives (:func:`value_fits`) and says in words what
a field takes (:func:`expected_value`).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import numbers
import re
import textwrap
import types
import typing
from typing import Any, Literal


@dataclasses.dataclass(frozen=True)
class Option:
    """A command-line option made from a dataclass field."""

    name: str
    default: Any  # dataclasses.MISSING when the option is required
    help: str  # the first line of the field's docstring
    kind: str  # "text", "literal" (a Python literal, else text), "bool" or "list"
    item: str = "text"  # a list's items: "text" or "literal"
    nargs: int | str = "+"  # a list's length: "+", or a fixed-length tuple's
    choices: tuple = ()  # the values of a Literal type, shown as the option's metavar
    nullable: bool = False  # a text option whose type allows None reads the word None as None
    owner: type | None = None  # the class that declares (or redeclares) the field
    flags: tuple[str, ...] = ()  # other spellings, from the field's metadata ("flags")
    metavar: str | None = None  # from the field's metadata ("metavar"), else N for int, X for float


def field_docs(cls: type) -> dict[str, str]:
    """The docstring of each field of the dataclass ``cls``: the string literal right under the
    field's annotation in the class body, read from the source with ``ast``. Inherited fields
    keep their base class's docstring (the MRO is walked from the base down); a subclass that
    documents a field again replaces it. A class without source gives no docstrings."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):  # defined in an interactive session: nothing to read
            continue
        body = ast.parse(source).body[0].body
        for node, after in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def type_kind(annotation: Any) -> dict[str, Any]:
    """How an option of type ``annotation`` reads its value: the ``kind``, ``nullable`` and,
    where they differ from :class:`Option`'s defaults, ``item``, ``nargs``, ``choices`` and
    ``metavar``."""
    found: dict[str, Any] = {"nullable": False}
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        found["nullable"] = len(members) < len(typing.get_args(annotation))
        annotation = members[0] if len(members) == 1 else Any
    origin = typing.get_origin(annotation) or annotation
    if annotation is bool:
        return {**found, "kind": "bool"}
    if origin in (list, tuple):  # list[str], tuple[str, ...], tuple[float, float]
        members = typing.get_args(annotation)
        inner = type_kind(members[0] if members else Any)
        fixed = origin is tuple and members and Ellipsis not in members
        return {**found, "kind": "list", "item": "text" if inner["kind"] == "text" else "literal",
                "nargs": len(members) if fixed else "+", "choices": inner.get("choices", ()),
                "metavar": inner.get("metavar")}
    if origin is Literal:
        values = typing.get_args(annotation)
        text = all(isinstance(v, str) for v in values)
        return {**found, "kind": "text" if text else "literal", "choices": values}
    return {**found, "kind": "text" if annotation is str else "literal",
            "metavar": {int: "N", float: "X"}.get(annotation)}


SCALAR_WORDS = {"bool": ("true or false", "booleans"), "text": ("a text", "texts"),
                "N": ("a whole number", "whole numbers"), "X": ("a number", "numbers")}


def expected_value(annotation: Any) -> str:
    """What a value of type ``annotation`` must be, in a config file author's words: ``true or
    false``, ``a whole number``, ``a list of 2 numbers``, ``one of 'topk', 'batchtopk'``; with
    ``or null`` when the type allows None."""
    found = type_kind(annotation)
    if found.get("choices"):
        words = "one of " + ", ".join(map(repr, found["choices"]))
    else:
        key = found["kind"] if found["kind"] in ("bool", "text") else found.get("metavar")
        words = SCALAR_WORDS.get(key, ("a value", "values"))[0]
    if found["kind"] == "list":
        item = SCALAR_WORDS.get("text" if found["item"] == "text" else found.get("metavar"),
                                ("a value", "values"))[1]
        if found.get("choices"):
            item = "values among " + ", ".join(map(repr, found["choices"]))
        count = f"{found['nargs']} " if isinstance(found["nargs"], int) else ""
        words = f"a list of {count}{item}"
    return words + (" or null" if found["nullable"] else "")


def value_fits(value: Any, annotation: Any) -> bool:
    """Whether ``value``, as a JSON or YAML file or an option gives it, has the type
    ``annotation``: a bool for a bool (never the text 'no', which Python reads as true), an int
    or an integral float for an int, a list (or tuple) of fitting items of the right length for
    a list or tuple, a text (or one text for a list of texts), None only where allowed. A
    Literal's values are checked for their type only; the configurations check the value and
    say what each choice means."""
    found = type_kind(annotation)
    if value is None:
        return found["nullable"]
    if found["kind"] != "list":
        return _scalar_fits(value, found["kind"], found.get("metavar"), found.get("choices", ()))
    if isinstance(value, str) and found["item"] == "text" and found["nargs"] == "+":
        return True  # one text for a list of texts, as the configurations accept
    if not isinstance(value, (list, tuple)):
        return False
    if isinstance(found["nargs"], int) and len(value) != found["nargs"]:
        return False
    return all(_scalar_fits(v, found["item"], found.get("metavar"), found.get("choices", ()))
               for v in value)


def _scalar_fits(value: Any, kind: str, metavar: str | None, choices: tuple) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if choices:
        return any(type(value) is type(choice) for choice in choices)
    if kind == "text":
        return isinstance(value, str)
    if metavar in ("N", "X") and isinstance(value, bool):
        return False
    if metavar == "N":
        return isinstance(value, numbers.Integral) or (isinstance(value, float)
                                                       and value.is_integer())
    if metavar == "X":
        return isinstance(value, numbers.Real)
    return True  # a type the options read as any Python literal (a dict, a union)


def declared_in(cls: type, name: str) -> type:
    """The class of ``cls``'s MRO whose body declares (or redeclares) the field ``name``."""
    return next(k for k in cls.__mro__ if name in vars(k).get("__annotations__", {}))


def dataclass_options(cls: type) -> list[Option]:
    """An :class:`Option` for each field of the dataclass ``cls`` given at construction, in
    field order: its default, its docstring's first paragraph (lines joined), and its kind from
    its type."""
    docs, hints = field_docs(cls), typing.get_type_hints(cls)
    options = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        default = f.default
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        metadata = {k: f.metadata[k] for k in ("flags", "metavar") if k in f.metadata}
        help_text = " ".join(docs.get(f.name, "").partition("\n\n")[0].split())
        options.append(Option(f.name, default, help_text,
                              owner=declared_in(cls, f.name),
                              **{**type_kind(hints[f.name]), **metadata}))
    return options


def literal(text: str):
    """A Python literal when the text is one (``1e6``, ``None``, ``0.5``), else the text."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def boolean(text: str) -> bool:
    """``true``/``false`` (or ``1``/``0``, ``yes``/``no``, any case) as a bool."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    if text.lower() not in value:
        raise argparse.ArgumentTypeError(f"{text!r} is not true or false")
    return value[text.lower()]


def text_or_none(text: str) -> str | None:
    """The text, or None for the word ``None``."""
    return None if text == "None" else text


def description(summary: str, *more: str) -> str:
    """A subcommand's help as its description: a sentence, wrapped by hand (the raw formatter
    that keeps the examples' layout does not wrap)."""
    text = " ".join([f"{summary[0].upper()}{summary[1:]}.", *more])
    return textwrap.fill(text, width=96)


def first_sentence(doc: str | None) -> str:
    """A docstring's first sentence, on one line."""
    return re.split(r"(?<=\.)\s", " ".join((doc or "").split()), maxsplit=1)[0]


def option_help(option: Option) -> str:
    """The field's docstring's first line and the default as one would type it (a list's items
    apart, a text quoted), escaped for argparse's % format."""
    value = option.default
    if value is dataclasses.MISSING:
        shown = "required"
    elif isinstance(value, (list, tuple)):
        shown = "default: " + (" ".join(map(str, value)) or "none")
    else:
        shown = f"default: {value!r}"
    return f"{option.help} ({shown})".lstrip().replace("%", "%%")


def argument_settings(option: Option) -> dict[str, Any]:
    """``add_argument``'s type, nargs, action and metavar for ``option``'s kind."""
    if option.kind == "bool":
        return dict(type=boolean, nargs="?", const=True, metavar="true|false")
    read = {"text": text_or_none if option.nullable else str, "literal": literal}
    metavar = option.metavar or ("{" + ",".join(map(str, option.choices)) + "}"
                                 if option.choices else None)
    if option.kind == "list":  # --sites a b, or --sites a --sites b
        return dict(type=read[option.item], nargs=option.nargs, action="extend",
                    metavar=metavar)
    return dict(type=read[option.kind], metavar=metavar)


def add_options(parser: argparse.ArgumentParser, cls: type,
                underscores: bool = False) -> list[Option]:
    """An option per field of the dataclass ``cls`` (see :func:`dataclass_options`), spelled
    ``--name-with-dashes`` (and, with ``underscores``, ``--name_with_underscores``, not shown
    in the help). When several classes of the MRO declare fields, each gets its own group in
    the help, the most derived first, its fields in the order it declares them."""
    options = dataclass_options(cls)
    owners = sorted({o.owner for o in options}, key=cls.__mro__.index)
    groups = {owner: parser.add_argument_group(
        f"{first_sentence(owner.__doc__).rstrip('.')} ({owner.__name__})")
        if len(owners) > 1 else parser for owner in owners}
    def place(o: Option) -> tuple[int, int]:  # the owner's group, then its declaration order
        return owners.index(o.owner), list(vars(o.owner)["__annotations__"]).index(o.name)

    for option in sorted(options, key=place):
        settings = argument_settings(option)
        groups[option.owner].add_argument(
            *option.flags, "--" + option.name.replace("_", "-"), dest=option.name,
            help=option_help(option), required=option.default is dataclasses.MISSING,
            **settings)
        if underscores and "_" in option.name:
            groups[option.owner].add_argument("--" + option.name, dest=option.name,
                                              help=argparse.SUPPRESS, **settings)
    return options


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The options of ``cls`` given on the command line (the others are left out)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if f.init and hasattr(args, f.name)}
