"""Prompt files -> validated prompt rows and error rows (DESIGN.md "Contracts", Prompt rows).

Pure: no Ray, no torch. A file is `.txt` (a prompt a line; blank and `#` lines skipped),
`.jsonl` (an object a line) or `.csv` (a header, then a row a line). The bytes are decoded line by
line, so one line of invalid UTF-8 is one error row, not a dead file. Every line that is not a
valid row becomes a `RowError` naming its line and reason; the caller records it in the manifest
and goes on. Only a file that cannot be read at all, or a CSV header that makes every row
meaningless, is an error of the whole job (ValueError naming file:line).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from t2v.render.rows import PromptRow, RowFields

FIELDS = tuple(RowFields.model_fields)
"""prompt, id, negative_prompt, seed, steps, cfg, frames, height, width, meta."""
FORMATS = (".txt", ".jsonl", ".csv")
ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
MAX_SEED = 2**63 - 1
INT_FIELDS = ("seed", "steps", "frames", "height", "width")
STR_FIELDS = ("prompt", "id", "negative_prompt")

# count_tokens(prompts) -> tokens each prompt needs (special tokens included), untruncated.
TokenCounter = Callable[[list[str]], list[int]]


class RowInvalid(ValueError):
    """One row is unusable; the message is the reason recorded in its error row, `field` the
    row field it is about (None: the line as a whole, e.g. invalid JSON)."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class PromptRules:
    """What a row may hold and what it gets when it leaves a field out (job config + model)."""

    base_seed: int = 0
    """A row without `seed` gets one derived from (base_seed, id)."""
    steps: int = 30
    cfg: float = 5.0
    frames: int = 9
    height: int = 32
    width: int = 32
    negative_prompt: str = ""
    temporal_down: int = 4
    """frames must be 1 + temporal_down * k (the causal VAE's clip lengths)."""
    temporal_patch: int = 1
    """The latent frame count 1 + k must be divisible by the DiT's temporal patch."""
    spatial_multiple: int = 8
    """height and width must be multiples of the VAE's spatial_down x the DiT's patch."""
    max_tokens: int | None = None
    """Token limit of the text encoder when truncation is off (None: prompts are cut, any length
    goes)."""
    num_per_prompt: int = 1
    """Videos per row: ids `{id}-{k}` with seeds seed + k when > 1."""
    max_steps: int = 1000
    max_cfg: float = 50.0
    max_frames: int = 1025
    max_side: int = 4096


@dataclass
class RowError:
    """A line that is not a valid row."""

    line: int
    error: str
    id: str | None = None
    """The row's id when it had a well-formed one (else None)."""
    prompt: str | None = None


@dataclass
class ParsedPrompts:
    source: str
    rows: list[PromptRow]
    errors: list[RowError]
    lines: int
    """Lines read (blank and comment lines included)."""


def prompt_format(uri: str) -> str:
    """The format a prompt file's extension names, or ValueError."""
    lower = uri.lower()
    for ext in FORMATS:
        if lower.endswith(ext):
            return ext
    raise ValueError(f"{uri}: prompt file must end in {', '.join(FORMATS)}")


def derive_id(given: dict) -> str:
    """A row without an id: a hash of the fields it gives (values after type coercion), so the
    same row gets the same id in every run and format."""
    canon = json.dumps(given, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def derive_seed(base_seed: int, row_id: str) -> int:
    """A row without a seed: 31 bits of sha256(base_seed, id); stable across runs and machines."""
    digest = hashlib.sha256(f"{base_seed}/{row_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


# ----------------------------------------------------------------------------- lines


def _lines(data: bytes) -> list[tuple[int, str | None, str | None]]:
    """(line number, text or None, error or None) per line; decoded one line at a time."""
    out = []
    for n, raw in enumerate(data.split(b"\n"), 1):
        raw = raw.removesuffix(b"\r")
        if n == 1:
            raw = raw.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte-order mark
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            out.append((n, None, f"invalid UTF-8 at byte {e.start + 1} of the line"))
            continue
        if "\x00" in text:
            out.append((n, None, "NUL character in the line"))
            continue
        out.append((n, text, None))
    if out and out[-1][1] == "":  # a final newline is not an extra line
        out.pop()
    return out


MAX_INT_DIGITS = 19
"""Longer integers are out of every field's range (int64); refused before Python builds them."""
MAX_DEPTH = 32
"""JSON nesting a line may have (`meta` is free JSON, but not a stack overflow)."""


def _json_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise RowInvalid(f"integer of {len(text.lstrip('-'))} digits is out of range")
    return int(text)


def _json_constant(name: str) -> float:
    raise RowInvalid(f"{name} is not a number JSON allows")


def _check_text(value: object) -> None:
    """RowInvalid on a string (key or value, at any depth: `_json_object` bounds it) that is not
    Unicode text: a lone surrogate escape such as \\ud800 parses, but cannot be written as
    UTF-8."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise RowInvalid(f"lone surrogate \\u{ord(value[e.start]):04x} in a string (not "
                             "Unicode text)") from None
    elif isinstance(value, dict):
        for kv in value.items():
            for v in kv:
                _check_text(v)
    elif isinstance(value, list):
        for v in value:
            _check_text(v)


def _json_object(text: str, prefix: str = "") -> dict:
    """A JSON object from `text`, else RowInvalid naming what is wrong (after `prefix`): bad
    JSON, too deep, an integer beyond int64, NaN/Infinity, a lone surrogate, not an object."""
    # Deeper than the interpreter's stack would raise RecursionError: refuse by a cheap count.
    if text.count("[") + text.count("{") > MAX_DEPTH and _bracket_depth(text) > MAX_DEPTH:
        raise RowInvalid(f"{prefix}JSON nested deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(text, parse_int=_json_int, parse_constant=_json_constant)
    except json.JSONDecodeError as e:
        raise RowInvalid(f"{prefix}invalid JSON: {e.msg} at column {e.colno}") from None
    except RowInvalid as e:
        raise RowInvalid(f"{prefix}{e}") from None
    if not isinstance(value, dict):
        raise RowInvalid(f"{prefix}expected a JSON object, got {_type_name(value)}")
    try:
        _check_text(value)
    except RowInvalid as e:
        raise RowInvalid(f"{prefix}{e}") from None
    return value


def _bracket_depth(text: str) -> int:
    """The deepest nesting of [ and { outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _typed(row: dict) -> RowFields:
    """Typed fields of a line (null means "not given" for every field but prompt), or
    RowInvalid naming the first problem in the line's own key order: a wrong type, then unknown
    fields, then a missing prompt."""
    given = {k: v for k, v in row.items() if v is not None or k == "prompt"}
    try:
        return RowFields.model_validate(given)
    except ValidationError as e:
        errors = e.errors()
    order = {k: i for i, k in enumerate(given)}
    typed = sorted((str(x["loc"][0]) for x in errors if x["type"] not in
                    ("extra_forbidden", "missing")), key=lambda k: order.get(k, len(order)))
    if typed:
        key = typed[0]
        value = given.get(key)
        what = ("an integer" if key in INT_FIELDS else "a number" if key == "cfg" else
                "a JSON object" if key == "meta" else "a string")
        shown = repr(value) if key in (*INT_FIELDS, "cfg") else _type_name(value)
        raise RowInvalid(f"{key}: expected {what}, got {shown}", key)
    unknown = sorted(str(x["loc"][0]) for x in errors if x["type"] == "extra_forbidden")
    if unknown:
        raise RowInvalid(f"unknown field{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))} (known: {', '.join(FIELDS)})",
                         unknown[0])
    raise RowInvalid("missing prompt", "prompt")


def _check_csv_types(row: dict[str, str]) -> dict:
    """CSV cells (strings) -> typed fields; an empty cell means "not given" (but see prompt)."""
    out: dict = {}
    for key, value in row.items():
        if value == "" and key != "prompt":
            continue
        if key in INT_FIELDS:
            if not re.fullmatch(r"\s*[+-]?\d+\s*", value):
                raise RowInvalid(f"{key}: expected an integer, got {value!r}")
            out[key] = int(value)
        elif key == "cfg":
            try:
                out[key] = float(value)
            except ValueError:
                raise RowInvalid(f"cfg: expected a number, got {value!r}") from None
        elif key == "meta":
            out[key] = _json_object(value, "meta: ")
        else:
            out[key] = value
    return out


# ----------------------------------------------------------------------------- one row


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not (math.isfinite(value) and lo <= value <= hi):
        raise RowInvalid(f"{name}={value} out of range [{lo}, {hi}]", name)


def _check_row(f: RowFields, rules: PromptRules) -> str:
    """A typed row against the job's rules -> its id; RowInvalid names the first problem."""
    if not f.prompt.strip():
        raise RowInvalid("empty prompt", "prompt")
    for key in STR_FIELDS:
        if "\x00" in (getattr(f, key) or ""):
            raise RowInvalid(f"{key} contains a NUL character", key)
    if f.id is not None:
        if not ID_PATTERN.fullmatch(f.id):
            raise RowInvalid(f"id {f.id[:140]!r} must match {ID_PATTERN.pattern}", "id")
        if f.id.startswith("."):  # hidden files; and list_prefix hides `.t2v-tmp-*` outputs
            raise RowInvalid(f"id {f.id!r} must not start with '.'", "id")
    if f.seed is not None:
        _check_range("seed", f.seed, 0, MAX_SEED - rules.num_per_prompt)
    if f.steps is not None:
        _check_range("steps", f.steps, 1, rules.max_steps)
    if f.cfg is not None:
        _check_range("cfg", f.cfg, 0, rules.max_cfg)
    frames = rules.frames if f.frames is None else f.frames
    _check_range("frames", frames, 1, rules.max_frames)
    latent_frames = 1 + (frames - 1) // rules.temporal_down
    if (frames - 1) % rules.temporal_down or latent_frames % rules.temporal_patch:
        raise RowInvalid(f"frames={frames} must be 1 + {rules.temporal_down}k for the VAE"
                         + (f" with 1 + k divisible by {rules.temporal_patch}"
                            if rules.temporal_patch > 1 else ""), "frames")
    for side in ("height", "width"):
        value = getattr(f, side)
        value = getattr(rules, side) if value is None else value
        _check_range(side, value, rules.spatial_multiple, rules.max_side)
        if value % rules.spatial_multiple:
            raise RowInvalid(f"{side}={value} must be a multiple of {rules.spatial_multiple} "
                             "(VAE spatial_down x DiT patch)", side)
    return f.id if f.id is not None else derive_id(f.given())


def _make_row(line: int, f: RowFields, row_id: str, rules: PromptRules) -> PromptRow:
    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    return PromptRow(
        line=line, id=row_id, prompt=f.prompt,
        negative_prompt=pick(f.negative_prompt, rules.negative_prompt),
        seed=f.seed if f.seed is not None else derive_seed(rules.base_seed, row_id),
        steps=pick(f.steps, rules.steps), cfg=float(pick(f.cfg, rules.cfg)),
        frames=pick(f.frames, rules.frames), height=pick(f.height, rules.height),
        width=pick(f.width, rules.width), meta=pick(f.meta, {}))


def _given_id(fields: RowFields | None) -> str | None:
    if fields is not None and fields.id is not None:
        if ID_PATTERN.fullmatch(fields.id) and not fields.id.startswith("."):
            return fields.id
    return None


def _given_prompt(fields: RowFields | None) -> str | None:
    return fields.prompt.replace("\x00", "") if fields is not None else None


# ----------------------------------------------------------------------------- files


def _raw_rows(data: bytes, fmt: str,
              source: str) -> tuple[list[tuple[int, RowFields | None, str | None]], int]:
    """((line, typed fields or None, error or None) per non-blank, non-comment line, lines)."""
    out: list[tuple[int, RowFields | None, str | None]] = []
    header: list[str] | None = None
    lines = _lines(data)
    for n, text, err in lines:
        if err is not None:
            out.append((n, None, err))
            continue
        if not text.strip() or (fmt == ".txt" and text.strip().startswith("#")):
            continue
        if fmt == ".txt":
            out.append((n, RowFields(prompt=text.strip()), None))
            continue
        try:
            if fmt == ".jsonl":
                out.append((n, _typed(_json_object(text)), None))
                continue
            try:
                cells = next(csv.reader([text], strict=True))
            except csv.Error as e:
                raise RowInvalid(f"invalid CSV: {e}") from None
            if header is None:
                header = _csv_header(cells, source, n)
                continue
            if len(cells) != len(header):
                raise RowInvalid(f"{len(cells)} cells, the header has {len(header)}")
            out.append((n, _typed(_check_csv_types(dict(zip(header, cells, strict=True)))),
                        None))
        except RowInvalid as e:
            out.append((n, None, str(e)))
    return out, len(lines)


def _csv_header(cells: list[str], source: str, line: int) -> list[str]:
    names = [c.strip() for c in cells]
    unknown = [c for c in names if c not in FIELDS]
    if unknown:
        raise ValueError(f"{source}:{line}: CSV header has unknown columns "
                         f"{', '.join(map(repr, unknown))} (known: {', '.join(FIELDS)})")
    if len(set(names)) != len(names):
        raise ValueError(f"{source}:{line}: CSV header repeats a column: {names}")
    if "prompt" not in names:
        raise ValueError(f"{source}:{line}: CSV header has no 'prompt' column: {names}")
    return names


def parse_prompts(data: bytes, fmt: str, rules: PromptRules, source: str = "<prompts>",
                  count_tokens: TokenCounter | None = None) -> ParsedPrompts:
    """The bytes of a prompt file -> valid rows and error rows, in line order.

    `count_tokens` checks prompt lengths against `rules.max_tokens` (truncation off). A repeated
    id (or an id a previous row's `{id}-{k}` samples took) is an error naming the first line.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown prompt format {fmt!r}; known: {', '.join(FORMATS)}")
    checked: list[tuple[int, RowFields, str]] = []
    errors: list[RowError] = []
    raw, lines = _raw_rows(data, fmt, source)
    for n, fields, err in raw:
        if err is None:
            try:
                checked.append((n, fields, _check_row(fields, rules)))
                continue
            except RowInvalid as e:
                err = str(e)
        errors.append(RowError(n, err, _given_id(fields), _given_prompt(fields)))
    too_long = _too_long(checked, rules, count_tokens)
    rows, first_line = [], {}
    for n, fields, row_id in checked:
        row = _make_row(n, fields, row_id, rules)
        names = [row_id] + [s.id for s in row.samples(rules.num_per_prompt)]
        taken = next((name for name in names if name in first_line), None)
        if n in too_long:
            errors.append(RowError(n, str(too_long[n]), row_id, row.prompt))
        elif taken is not None:
            errors.append(RowError(n, f"repeated id {taken!r} (first on line {first_line[taken]})",
                                   row_id, row.prompt))
        else:
            first_line |= dict.fromkeys(names, n)
            rows.append(row)
    errors.sort(key=lambda e: e.line)
    return ParsedPrompts(source=source, rows=rows, errors=errors, lines=lines)


def parse_row(text: str, rules: PromptRules, line: int = 1,
              count_tokens: TokenCounter | None = None) -> PromptRow:
    """One JSON object (an API request body, a .jsonl line) -> a valid row by the rules of a
    prompt file's line; RowInvalid (with its `field`) names the first problem."""
    fields = _typed(_json_object(text))
    row_id = _check_row(fields, rules)
    if problem := _too_long([(line, fields, row_id)], rules, count_tokens).get(line):
        raise problem
    return _make_row(line, fields, row_id, rules)


def _too_long(checked: list[tuple[int, RowFields, str]], rules: PromptRules,
              count_tokens: TokenCounter | None) -> dict[int, RowInvalid]:
    """Line -> the problem (naming its field), for rows whose prompt or negative prompt the
    encoder would have to cut."""
    if rules.max_tokens is None or count_tokens is None or not checked:
        return {}
    texts = [(n, key, text) for n, f, _ in checked for key, text in (
        ("prompt", f.prompt), ("negative_prompt", f.negative_prompt
                               if f.negative_prompt is not None else rules.negative_prompt))]
    counts = count_tokens([t for _, _, t in texts])
    out: dict[int, RowInvalid] = {}
    for (n, key, _), count in zip(texts, counts, strict=True):
        if count > rules.max_tokens and n not in out:
            out[n] = RowInvalid(f"{key.replace('_', ' ')} has {count} tokens, more than the text "
                                f"encoder's max_length={rules.max_tokens} (truncate is off)", key)
    return out
