"""The data forms users bring, detected or named (``format:``), converted into ftbench's own rows.

Forms (as TRL's ``docs/source/dataset_formats.md`` and LLaMA-Factory's ``data/README.md`` define them):

- ``trl``: language modeling ``{"messages": [...]}``; prompt-completion ``{"prompt", "completion"}``;
  preference ``{"prompt", "chosen", "rejected"}`` or, with an implicit prompt, ``{"chosen",
  "rejected"}`` (the prompt is their common prefix, as TRL's ``extract_prompt``); strings (standard) or
  chat messages ``[{role, content}]`` (conversational). Unpaired preference rows (``{"prompt",
  "completion", "label"}``) pass through as they are, for the regime that reads them.
- ``alpaca`` (LLaMA-Factory): ``instruction``, ``input``, ``output``, ``system``, ``history`` (``[[q,
  a], ...]``); preference (``ranking``): ``chosen``/``rejected`` strings instead of ``output``.
- ``sharegpt`` (LLaMA-Factory): ``conversations: [{from, value}]`` with the roles human, gpt, system,
  observation, function_call (human/observation at odd positions, gpt/function_call at even ones), a
  ``system`` column; preference: ``chosen``/``rejected`` messages after a conversation ending with the
  user. ``role_tag``, ``content_tag``, ``user_tag``, ``assistant_tag``, ``observation_tag``,
  ``function_tag`` and ``system_tag`` rename the keys and roles (through ``dataset_info.json``).
- ``dataset_info:PATH#NAME``, a source: the set ``NAME`` of LLaMA-Factory's ``dataset_info.json``
  (``PATH`` the file or its folder), read as LLaMA-Factory's ``parser.py`` reads it: ``file_name``
  (relative to the file's folder; a folder of files) or ``hf_hub_url`` (+ ``subset``, ``split``),
  ``formatting``, ``ranking``, and the ``columns``/``tags`` mapping (a mapping given replaces every
  default of its kind, as in LLaMA-Factory: an unnamed column is not read).

``auto`` detects each row's form by its fields. A converted row is ftbench's native row (an
instruction row ``{instruction, input, output}`` or ``{messages}``; a pair ``{prompt, chosen,
rejected}``), so every form is tokenised, masked and split by the one code path of its regime: the loss
on responses only, multi-turn conversations rendered through the tokenizer's chat template. What a
conversion keeps from its form's own rules:

- TRL conversational prompt-completion: the prompt's assistant turns are context (not trained), as
  TRL's completion-only loss; a ``messages`` row trains every assistant turn (TRL's
  ``assistant_only_loss``, ftbench's rule).
- LLaMA-Factory: the history's responses are trained (its README: "will also be learned");
  function_call turns are assistant turns (trained), observation turns are ``tool`` turns (context).
- Alpaca's ``instruction`` and ``input`` are joined with a blank line, ftbench's rule for its native
  rows since before (LLaMA-Factory joins them with one newline).

Columns LLaMA-Factory reads that ftbench does not train on (``tools``, ``images``, ``videos``,
``audios``, ``kto_tag``) and the sources it cannot reach offline (``ms_hub_url``, ``om_hub_url``,
``script_url``, ``cloud_file_name``) are refused with an error naming them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, Optional

from ftbench.data.base import DataFormatError, Row, chat_messages, check_conversation, load_rows, read_rows, read_text_file
from ftbench.errors import ConfigError

FORMATS = ("auto", "trl", "alpaca", "sharegpt")
Format = Literal["auto", "trl", "alpaca", "sharegpt"]
Kind = Literal["instruction", "preference"]
DATASET_INFO = "dataset_info:"
#: a converted conversational prompt-completion row: how many leading messages are prompt (never trained)
PROMPT_TURNS = "prompt_turns"


@dataclass(frozen=True)
class Columns:
    """Where a LLaMA-Factory row keeps each part (``columns``) and how its messages name roles
    (``tags``): LLaMA-Factory's ``DatasetAttr``. The defaults are the names its README's examples use;
    None: the part is not read."""

    prompt: Optional[str] = "instruction"
    query: Optional[str] = "input"
    response: Optional[str] = "output"
    history: Optional[str] = "history"
    messages: Optional[str] = "conversations"
    system: Optional[str] = "system"
    chosen: Optional[str] = "chosen"
    rejected: Optional[str] = "rejected"
    role_tag: Optional[str] = "from"
    content_tag: Optional[str] = "value"
    user_tag: Optional[str] = "human"
    assistant_tag: Optional[str] = "gpt"
    observation_tag: Optional[str] = "observation"
    function_tag: Optional[str] = "function_call"
    system_tag: Optional[str] = "system"


COLUMN_NAMES = ("prompt", "query", "response", "history", "messages", "system", "chosen", "rejected")
TAG_NAMES = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
#: LLaMA-Factory's DatasetAttr defaults when a dataset_info.json entry has no ``columns``
LLAMAFACTORY_DEFAULTS = Columns(history=None, system=None, chosen=None, rejected=None)
UNSUPPORTED_COLUMNS = {"tools": "tool descriptions", "images": "images", "videos": "videos", "audios": "audio",
                       "kto_tag": "KTO labels (an unpaired set)"}
UNSUPPORTED_SOURCES = ("ms_hub_url", "om_hub_url", "script_url", "cloud_file_name")
UNSUPPORTED_KEYS = {"num_samples": "LLaMA-Factory samples rows at random; use data.max_train_rows",
                    "folder": "a folder of a hub repository; give file_name"}


# ---------------------------------------------------------------------------- detection
def detect(row: Row, kind: Kind) -> str:
    """The form of a row by its fields, or a DataFormatError naming the fields it has."""
    f = row.fields
    if "conversations" in f:
        return "sharegpt"
    if "instruction" in f:
        return "alpaca"
    if kind == "instruction" and ("messages" in f or "prompt" in f or "completion" in f):
        return "trl"
    if kind == "preference" and ("chosen" in f or "rejected" in f or "completion" in f):
        return "trl"  # paired, or unpaired (prompt/completion/label: KTO's rows, read by a subclass of the regime)
    expected = ("TRL's messages or prompt/completion, alpaca's instruction/output or sharegpt's conversations"
                if kind == "instruction" else
                "TRL's prompt/chosen/rejected, chosen/rejected or prompt/completion/label, alpaca's "
                "instruction/chosen/rejected or sharegpt's conversations/chosen/rejected")
    have = ", ".join(repr(k) for k in f) or "none"
    raise row.error(None, f"a row in no known {kind} form: it has the fields {have} (expected {expected})")


def convert(row: Row, kind: Kind, form: Format = "auto", columns: Columns = Columns()) -> Row:
    """``row`` in ftbench's native form for ``kind`` (see the module docstring), with the same file and line."""
    if form == "auto":
        form = detect(row, kind)
    elif columns == Columns() and detect(row, kind) != form:  # a dataset_info.json mapping names its own columns
        have = ", ".join(repr(k) for k in row.fields)
        raise row.error(None, f"a row not in the {form} form (data.format): it has the fields {have}")
    if form == "trl":
        new = trl_instruction(row) if kind == "instruction" else trl_pair(row)
    elif form == "alpaca":
        new = alpaca_row(row, kind, columns)
    elif form == "sharegpt":
        new = sharegpt_row(row, kind, columns)
    else:
        raise ConfigError(f"data.format: {form!r} is not one of {', '.join(FORMATS)}")
    return replace(new, form=form)


def _rest(row: Row, *used: Optional[str]) -> dict[str, Any]:
    """The row's other fields (``answer``, ``task``, ``choices``, ...), kept as they are."""
    return {k: v for k, v in row.fields.items() if k not in used}


def _checked(row: Row, fields: dict[str, Any]) -> Row:
    """A converted row whose chat messages this module has checked by its form's rules."""
    return Row(fields, row.source, row.line, checked=True)


# ---------------------------------------------------------------------------- TRL
def trl_instruction(row: Row) -> Row:
    """TRL language modeling ``messages`` (native) or prompt-completion (standard or conversational)."""
    f = row.fields
    if "messages" in f or ("prompt" not in f and "completion" not in f):
        return row
    if isinstance(f.get("prompt"), (list, dict)) or isinstance(f.get("completion"), (list, dict)):
        prompt = chat_messages(row, "prompt", f.get("prompt"))
        completion = chat_messages(row, "completion", f.get("completion"))
        check_conversation(row, ("prompt", prompt), ("completion", completion))
        return _checked(row, {**_rest(row, "prompt", "completion"), "messages": prompt + completion, PROMPT_TURNS: len(prompt)})
    prompt, completion = row.get_str("prompt"), row.get_str("completion")
    return Row({**_rest(row, "prompt", "completion"), "instruction": prompt, "output": completion}, row.source, row.line)


def extract_prompt(chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's ``extract_prompt`` on strings: the prompt is the common prefix of ``chosen`` and
    ``rejected`` up to their first difference, less a space right before it (which stays with the
    answers); when one is a prefix of the other, the loop ends one character short, as TRL's does.
    Two strings that differ in their first character have no prompt (TRL's then reads ``chosen[-1]``)."""
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if idx > 0 and chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def trl_pair(row: Row) -> Row:
    """TRL preference rows are native, except the standard implicit prompt (two strings), split here."""
    f = row.fields
    if f.get("prompt") is None and isinstance(f.get("chosen"), str) and isinstance(f.get("rejected"), str):
        prompt, chosen, rejected = extract_prompt(f["chosen"], f["rejected"])
        if not prompt:
            raise row.error("chosen", "no prompt: 'chosen' and 'rejected' share no leading text (give 'prompt')")
        return Row({**_rest(row, "prompt"), "prompt": prompt, "chosen": chosen, "rejected": rejected}, row.source, row.line)
    return row


# ---------------------------------------------------------------------------- LLaMA-Factory alpaca
def _optional_str(row: Row, name: Optional[str]) -> str:
    if name is None or row.fields.get(name) is None:
        return ""
    return row.get_str(name)


def alpaca_row(row: Row, kind: Kind, cols: Columns) -> Row:
    """An alpaca row: native when it has no system prompt and no history, else chat messages."""
    if cols.prompt is None:
        raise row.error(None, "an alpaca set needs its prompt column (columns.prompt)")
    instruction = row.get_str(cols.prompt)
    inp = _optional_str(row, cols.query)
    system = _optional_str(row, cols.system)
    history = row.fields.get(cols.history) if cols.history else None
    used = (cols.prompt, cols.query, cols.system, cols.history)
    if kind == "preference":
        answers = {name: row.get_str(column or name) for name, column in (("chosen", cols.chosen), ("rejected", cols.rejected))}
        used += (cols.chosen, cols.rejected)
    elif cols.response and row.fields.get(cols.response) is not None:
        answers = {"output": row.get_str(cols.response)}
        used += (cols.response,)
    elif "choices" in row.fields or "gold" in row.fields:
        answers = {}  # a multiple-choice row answers with its gold option (ftbench's native rule)
    else:
        raise row.error(cols.response or "output", "missing")
    if not system and not history:
        return Row({**_rest(row, *used), "instruction": instruction, "input": inp, **answers}, row.source, row.line)
    turns: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    if history is not None:
        if not isinstance(history, list):
            raise row.error(cols.history, "must be a list of [prompt, response] pairs")
        for i, pair in enumerate(history):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise row.error(f"{cols.history}[{i}]", "must be a [prompt, response] pair of strings")
            turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    turns.append({"role": "user", "content": f"{instruction}\n\n{inp}" if inp else instruction})
    if kind == "preference":
        pair_fields = {name: [{"role": "assistant", "content": text}] for name, text in answers.items()}
        return _checked(row, {**_rest(row, *used), "prompt": turns, **pair_fields})
    if "output" not in answers:
        raise row.error(cols.response or "output", "missing")
    return _checked(row, {**_rest(row, *used), "messages": turns + [{"role": "assistant", "content": answers["output"]}]})


# ---------------------------------------------------------------------------- LLaMA-Factory sharegpt
def _sharegpt_turns(row: Row, name: str, value: list, cols: Columns, first_position: int = 0, index_offset: int = 0,
                    one: bool = False) -> list[dict[str, str]]:
    """ShareGPT messages as chat messages, each at a position LLaMA-Factory accepts: human or
    observation first, then gpt or function_call, alternating (``first_position`` 1 starts with the
    assistant's). ``index_offset``: the index of ``value[0]`` in the file's list (for messages);
    ``one``: ``value`` is the single message of field ``name``."""
    roles = {cols.user_tag: "user", cols.observation_tag: "tool", cols.assistant_tag: "assistant", cols.function_tag: "assistant"}
    accept = ([t for t in (cols.user_tag, cols.observation_tag) if t], [t for t in (cols.assistant_tag, cols.function_tag) if t])
    out = []
    for i, m in enumerate(value):
        where = name if one else f"{name}[{index_offset + i}]"
        if not isinstance(m, dict):
            raise row.error(where, f"must be an object with {cols.role_tag!r} and {cols.content_tag!r}")
        role, content = m.get(cols.role_tag), m.get(cols.content_tag)
        allowed = accept[(first_position + i) % 2]
        if role not in allowed:
            raise row.error(f"{where}.{cols.role_tag}", f"expected {' or '.join(repr(t) for t in allowed)} at this position "
                                                       f"(sharegpt alternates {'/'.join(accept[0])} with {'/'.join(accept[1])}), got {role!r}")
        if not isinstance(content, str):
            raise row.error(f"{where}.{cols.content_tag}", "missing or not a string")
        out.append({"role": roles[role], "content": content})
    return out


def sharegpt_row(row: Row, kind: Kind, cols: Columns) -> Row:
    """A sharegpt row as chat messages (``messages``, or ``prompt``/``chosen``/``rejected``), checked
    by LLaMA-Factory's rules: an optional leading system turn (else the ``system`` column), then turns
    alternating as :func:`_sharegpt_turns` says; an SFT conversation ends with the assistant, a
    preference one with the user, followed by the chosen and rejected assistant messages."""
    name = cols.messages or "conversations"
    msgs = row.fields.get(name)
    if not isinstance(msgs, list) or not msgs:
        raise row.error(name, "must be a non-empty list of messages")
    first = msgs[0]
    if cols.system_tag and isinstance(first, dict) and first.get(cols.role_tag) == cols.system_tag:
        if not isinstance(first.get(cols.content_tag), str):
            raise row.error(f"{name}[0].{cols.content_tag}", "missing or not a string")
        system, msgs, offset = first[cols.content_tag], msgs[1:], 1
    else:
        system, offset = _optional_str(row, cols.system), 0
    turns = _sharegpt_turns(row, name, msgs, cols, index_offset=offset)
    head = [{"role": "system", "content": system}] if system else []
    if kind == "instruction":
        if not turns or len(turns) % 2:
            raise row.error(name, f"must end with an assistant turn ({cols.assistant_tag!r} or {cols.function_tag!r}); "
                                  f"it has {len(turns)} turns after the system prompt")
        return _checked(row, {**_rest(row, name, cols.system), "messages": head + turns})
    if len(turns) % 2 == 0:
        raise row.error(name, f"must end with a user turn ({cols.user_tag!r} or {cols.observation_tag!r}) before "
                              f"'chosen' and 'rejected'; it has {len(turns)} turns after the system prompt")
    answers = {}
    for side, column in (("chosen", cols.chosen), ("rejected", cols.rejected)):
        column = column or side
        value = row.fields.get(column)
        if not isinstance(value, dict):
            raise row.error(column, f"must be one message {{{cols.role_tag!r}: {cols.assistant_tag!r}, {cols.content_tag!r}: ...}}")
        answers[side] = _sharegpt_turns(row, column, [value], cols, first_position=1, one=True)
    return _checked(row, {**_rest(row, name, cols.system, cols.chosen, cols.rejected), "prompt": head + turns, **answers})


# ---------------------------------------------------------------------------- dataset_info.json
@dataclass(frozen=True)
class DatasetInfoSet:
    """One entry of a ``dataset_info.json``: where its rows are and how to read them."""

    where: str  # "path#name", for messages
    location: str  # a file, a folder of files, or "hf:NAME[:SUBSET]"
    split: str
    formatting: str
    ranking: bool
    columns: Columns


def parse_dataset_info(source: str) -> DatasetInfoSet:
    """``dataset_info:PATH#NAME`` resolved as LLaMA-Factory's ``parser.py`` does."""
    spec = source[len(DATASET_INFO):]
    path, _, name = spec.partition("#")
    if not name:
        raise ConfigError(f"data.source: {source!r}: name the set after '#' (dataset_info:PATH#NAME)")
    info_path = Path(path) / "dataset_info.json" if Path(path).is_dir() else Path(path)
    where = f"{info_path}#{name}"
    rows = read_text_json(info_path)
    if name not in rows:
        known = ", ".join(sorted(rows)) or "none"
        raise DataFormatError(str(info_path), None, None, f"no data set {name!r} (it defines {known})")
    entry = rows[name]
    if not isinstance(entry, dict):
        raise DataFormatError(where, None, None, "must be an object")
    for key in UNSUPPORTED_SOURCES:
        if key in entry and "hf_hub_url" not in entry and "file_name" not in entry:
            raise DataFormatError(where, None, key, "not supported (ftbench reads file_name or hf_hub_url)")
    for key, why in UNSUPPORTED_KEYS.items():
        if entry.get(key) is not None:
            raise DataFormatError(where, None, key, f"not supported ({why})")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise DataFormatError(where, None, "formatting", f"{formatting!r} is not alpaca or sharegpt")
    ranking = entry.get("ranking", False)
    if not isinstance(ranking, bool):
        raise DataFormatError(where, None, "ranking", f"must be true or false, got {ranking!r}")
    cols = LLAMAFACTORY_DEFAULTS
    if "columns" in entry:  # a mapping replaces every default: an unnamed column is not read
        mapping = entry["columns"]
        if not isinstance(mapping, dict):
            raise DataFormatError(where, None, "columns", "must be an object")
        for key, what in UNSUPPORTED_COLUMNS.items():
            if mapping.get(key):
                raise DataFormatError(where, None, f"columns.{key}", f"{what} are not supported by this regime")
        cols = replace(cols, **{k: mapping.get(k) for k in COLUMN_NAMES})
    if "tags" in entry:
        tags = entry["tags"]
        if not isinstance(tags, dict):
            raise DataFormatError(where, None, "tags", "must be an object")
        cols = replace(cols, **{k: tags.get(k) for k in TAG_NAMES})
    if "hf_hub_url" in entry:
        location = f"hf:{entry['hf_hub_url']}" + (f":{entry['subset']}" if entry.get("subset") else "")
    elif "file_name" in entry:
        location = str(info_path.parent / entry["file_name"])
    else:
        raise DataFormatError(where, None, "file_name", "missing (give file_name or hf_hub_url)")
    return DatasetInfoSet(where, location, entry.get("split", "train"), formatting, ranking, cols)


def read_text_json(path: Path) -> dict[str, Any]:
    """A dataset_info.json: a JSON object of data sets; errors name the file and the line."""
    text = read_text_file(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataFormatError(str(path), err.lineno, None, f"invalid JSON: {err.msg}") from err
    if not isinstance(obj, dict):
        raise DataFormatError(str(path), None, None, "expected a JSON object of data sets")
    return obj


def read_dataset_info(source: str, kind: Kind, form: Format) -> list[Row]:
    """The native rows of a ``dataset_info:PATH#NAME`` set."""
    entry = parse_dataset_info(source)
    if form not in ("auto", entry.formatting):
        raise ConfigError(f"data.format: {form!r}, but {entry.where} has formatting {entry.formatting!r} (use auto)")
    if entry.ranking != (kind == "preference"):
        need = "a ranking set (ranking: true)" if kind == "preference" else "a set without ranking"
        raise DataFormatError(entry.where, None, "ranking", f"the {kind} regime needs {need}")
    if kind == "preference" and (entry.columns.chosen is None or entry.columns.rejected is None):
        raise DataFormatError(entry.where, None, "columns", "a ranking set names its 'chosen' and 'rejected' columns")
    location = Path(entry.location)
    if not entry.location.startswith("hf:") and location.is_dir() and not any(
            (location / marker).exists() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
        rows = [r for f in sorted(location.iterdir()) if f.is_file() for r in read_rows(f)]  # a folder of data files
    else:
        rows = load_rows(entry.location, entry.split)
    return [convert(r, kind, entry.formatting, entry.columns) for r in rows]


def read_source(source: str, kind: Kind, form: Format = "auto") -> list[Row]:
    """The rows of a file, ``datasets`` source or ``dataset_info:PATH#NAME`` set, in native form."""
    if form not in FORMATS:
        raise ConfigError(f"data.format: {form!r} is not one of {', '.join(FORMATS)}")
    if source.startswith(DATASET_INFO):
        return read_dataset_info(source, kind, form)
    return [convert(r, kind, form) for r in load_rows(source)]
