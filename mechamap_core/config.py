"""ScanConfig: the typed scan configuration, and the project's only YAML load/save/validate."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import operator
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import unpaired_surrogate
from .files import atomic_write_text

BUNDLED_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
MAX_CONFIG_BYTES = 2_000_000


class ConfigError(ValueError):
    """A config that cannot be used. `problems` lists (field, message) pairs, one per fault."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(self._lines()))

    def _lines(self) -> list[str]:
        """Each problem as 'field: message' (the message alone when it concerns no one field)."""
        return [f"{name}: {msg}" if name else msg for name, msg in self.problems]

    def listing(self) -> str:
        """The problems for a reader: one as a line, several as a bulleted list after a blank line (Markdown in the
        app, plain text in a terminal), where str() runs them together on one line separated by '; '."""
        lines = self._lines()
        return lines[0] if len(lines) == 1 else "\n\n" + "\n".join(f"- {line}" for line in lines)

    def for_field(self, name: str) -> list[str]:
        """Messages about one field (e.g. 'categories' or 'master_text')."""
        return [msg for f, msg in self.problems if f == name or f.startswith(name + ".")]


@dataclass
class ScanConfig:
    """What to scan and how. Defaults give a usable scan of the bundled model."""

    master_text: str | list[str] = ""
    categories: dict[str, list[str]] = field(default_factory=dict)
    model: str = BUNDLED_MODEL_ID
    threshold: float = 1.0  # flag neurons with score >= this (88% of them held up on held-out text)
    top_k_tokens: int = 5
    limit_neurons: int = 0  # first N neurons of each layer; 0 = all
    layers: list[int] | None = None  # None = all layers
    corpus: str | None = None  # path to a .txt (one document per line) or .jsonl corpus
    corpus_text_field: str = "text"
    batch_size: int = 8  # chunks per forward pass
    max_chunk_tokens: int = 0  # 0 = the model's context length
    auroc: bool = True  # one-vs-rest AUROC for every neuron (a sort per neuron: the scan's costliest statistic)
    permutations: int = 1000  # word-level permutation test of separation (p_value, q_value); 0 = Welch's test instead
    cv_folds: int = 5  # folds of each category's words for cv_auroc; 0 = no cv_auroc
    seed: int = 0  # permutation draws and word folds

    @property
    def texts(self) -> list[str]:
        """The master text as a list of documents (a single string is one document)."""
        return [self.master_text] if isinstance(self.master_text, str) else list(self.master_text)

    def covering(self, layers: list[int] | None, limit_neurons: int | None) -> ScanConfig:
        """A copy with a scan's own layers and neuron limit in it (those given, e.g. the Scan page's or the CLI's
        --layers / --limit-neurons), so that the run's metadata["config"] and config_hash record what it covered."""
        given = {"layers": _whole_numbers(layers), "limit_neurons": _whole_number(limit_neurons)}
        return dataclasses.replace(self, **{key: value for key, value in given.items() if value is not None})

    def to_dict(self) -> dict:
        """Plain dict of every field, in declaration order (what save_config writes)."""
        return dataclasses.asdict(self)

    def content_hash(self) -> str:
        """Stable short hash of the config content (keys scan caches and run ids)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _whole_number(value):
    """value as a Python int where it is a whole number of another kind (numpy's int64); anything else unchanged, for
    validate_config to name."""
    try:
        return value if isinstance(value, bool) else operator.index(value)
    except TypeError:
        return value


def _whole_numbers(values):
    """A list of _whole_number from a tuple, range, array or list of layer numbers; None, or a str, unchanged."""
    if values is None or isinstance(values, str):
        return values
    try:
        return [_whole_number(value) for value in values]
    except TypeError:
        return values


_FIELD_TYPES = {
    "master_text": (str, list),
    "categories": (dict,),
    "model": (str,),
    "threshold": (int, float),
    "top_k_tokens": (int,),
    "limit_neurons": (int,),
    "layers": (list, type(None)),
    "corpus": (str, type(None)),
    "corpus_text_field": (str,),
    "batch_size": (int,),
    "max_chunk_tokens": (int,),
    "auroc": (bool,),
    "permutations": (int,),
    "cv_folds": (int,),
    "seed": (int,),
}
_CATEGORY_NAME = re.compile(r"\w(?:[\w \-]{0,62}[\w\-])?")  # fullmatch: no trailing space or line break


def config_from_dict(data: object, require_master_text: bool = True) -> ScanConfig:
    """Validate a parsed mapping and build a ScanConfig. Raises ConfigError listing every fault.

    require_master_text=False accepts a config without a master text (only categories), e.g. one to write a text for.
    """
    if data is None:
        raise ConfigError([("", "the config is empty: it needs at least master_text and categories")])
    if not isinstance(data, dict):
        raise ConfigError([("", f"the config must be a mapping of keys to values, not {type(data).__name__}")])
    problems: list[tuple[str, str]] = []
    known = {f.name for f in dataclasses.fields(ScanConfig)}
    for key in data:
        if key not in known:
            problems.append((str(key), f"unknown key '{key}' (known keys: {', '.join(sorted(known))})"))
    problems += _type_problems(data)
    if problems:
        raise ConfigError(problems)
    values = {k: v for k, v in data.items() if k in known}
    if isinstance(values.get("categories"), dict):
        values["categories"] = {str(k): v for k, v in values["categories"].items()}
    cfg = ScanConfig(**values)
    validate_config(cfg, require_master_text)
    return cfg


THRESHOLD_LIMIT = 1000.0  # |threshold| above it flags nothing or everything: scores are scale-free (top neurons ~5)
MIN_CHUNK_TOKENS = 16  # the shortest chunk a scan cuts a text into (max_chunk_tokens; 0: the model's own limit)
_LARGEST_SETTING = 2**63 - 1  # a whole-number setting must fit an int64 (numpy, torch's generator seed, float())


def _type_problems(values: dict) -> list[tuple[str, str]]:
    """(key, message) for each setting in values whose type is not the one ScanConfig takes (a bool is no number)."""
    problems = []
    for key, types in _FIELD_TYPES.items():
        if key in values and (not isinstance(values[key], types) or (isinstance(values[key], bool) and bool not in types)):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            problems.append((key, f"'{key}' must be {wanted}, got {_what_was_given(values[key], types)}"))
    return problems


def _yaml_float(number: float) -> str:
    """number as YAML reads a float: 0.001, 1.0e+300 (an exponent only after a dot)."""
    mantissa, exponent, power = repr(number).partition("e")
    return f"{mantissa}{'' if '.' in mantissa else '.0'}e{power}" if exponent else mantissa


def _what_was_given(value: object, wanted: tuple[type, ...]) -> str:
    """A setting's wrong value, in words: its type; for a number that YAML read as text (1e0, 1e-3: YAML 1.1 reads
    an exponent as a number only after a dot and with a sign), the text and how to write it."""
    if isinstance(value, str) and (float in wanted or int in wanted):
        try:
            number = float(value.replace("_", ""))
        except ValueError:
            return "str"
        written = _yaml_float(number) if float in wanted else f"{number:.0f}" if number.is_integer() else None
        if math.isfinite(number) and written is not None:
            return f"the text '{value}' (YAML reads an exponent as a number only in a form like 1.0e+0: write {written})"
    return type(value).__name__


def validate_config(cfg: ScanConfig, require_master_text: bool = True) -> None:
    """Check a ScanConfig's values. Raises ConfigError listing every fault; returns None when valid.

    require_master_text=False lets an empty master text pass (every other check stays)."""
    settings = {setting.name: getattr(cfg, setting.name) for setting in dataclasses.fields(cfg)}
    problems = _type_problems(settings)
    for name, value in settings.items():
        if isinstance(value, float) and not math.isfinite(value):
            problems.append((name, f"'{name}' must be a finite number, got {value}"))
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) > _LARGEST_SETTING:
            problems.append((name, f"'{name}' is too large: at most {_LARGEST_SETTING:,} (2^63 - 1)"))
    if problems:  # the checks below compare numbers and walk lists: they need the types right
        raise ConfigError(problems)
    texts = cfg.master_text if isinstance(cfg.master_text, list) else [cfg.master_text]
    if any(not isinstance(t, str) for t in texts):
        problems.append(("master_text", "every master text entry must be a string"))
    elif require_master_text and not any(t.strip() for t in texts) and not cfg.corpus:
        problems.append(("master_text", "the master text is empty: give some text that uses the category words"))
    else:
        problems += [("master_text", f"the master text has {bad}") for bad in map(unpaired_surrogate, texts) if bad][:1]
    if not cfg.categories:
        problems.append(("categories", "there are no categories: add at least one category with words"))
    seen: dict[str, str] = {}
    for name, words in cfg.categories.items():
        where = f"categories.{name}"
        if not name.strip():
            problems.append((where, "a category has an empty name"))
            continue
        if (bad := unpaired_surrogate(name)) is not None:
            problems.append((where, f"a category name has {bad}"))
            continue
        if not _CATEGORY_NAME.fullmatch(name):
            problems.append((where, f"category name {name!r} may use letters, digits, spaces, '-' and '_' (max 64), and "
                                    "starts with a letter or digit and ends with no space"))  # fmt: skip
        if name.strip().lower() in seen:
            problems.append((where, f"duplicate category '{name}' (same as '{seen[name.strip().lower()]}')"))
        seen[name.strip().lower()] = name
        words_problem = _words_problem(name, words)
        if words_problem:
            problems.append((where, words_problem))
    for key in ("top_k_tokens", "limit_neurons", "max_chunk_tokens", "permutations", "seed"):
        if getattr(cfg, key) < 0:
            problems.append((key, f"'{key}' must be 0 or more, got {getattr(cfg, key)}"))
    if 0 < cfg.max_chunk_tokens < MIN_CHUNK_TOKENS:
        problems.append(("max_chunk_tokens", f"'max_chunk_tokens' must be 0 (the model's own limit) or at least "
                                             f"{MIN_CHUNK_TOKENS}: shorter chunks leave the model no context to read a "
                                             f"word in (with 1, activations of a token repeat exactly and scores run "
                                             f"into the hundreds of thousands)"))  # fmt: skip
    if abs(cfg.threshold) > THRESHOLD_LIMIT:
        problems.append(("threshold", f"'threshold' must be between -{THRESHOLD_LIMIT:g} and {THRESHOLD_LIMIT:g} (the "
                                      f"score is scale-free: the bundled model's top neurons score about 5)"))  # fmt: skip
    if cfg.top_k_tokens > 100:
        problems.append(("top_k_tokens", "'top_k_tokens' must be at most 100"))
    if cfg.permutations > 100_000:
        problems.append(("permutations", "'permutations' must be at most 100000"))
    if cfg.cv_folds == 1 or cfg.cv_folds < 0 or cfg.cv_folds > 20:
        problems.append(("cv_folds", "'cv_folds' must be 0 (off) or 2 to 20"))
    if cfg.batch_size < 1:
        problems.append(("batch_size", "'batch_size' must be at least 1"))
    if cfg.layers is not None and any(not isinstance(x, int) or isinstance(x, bool) or x < 0 for x in cfg.layers):
        problems.append(("layers", "'layers' must be a list of layer numbers (0 or more)"))
    elif cfg.layers is not None and not cfg.layers:
        problems.append(("layers", "'layers' lists no layer: leave it out (null) to scan every layer"))
    if problems:
        raise ConfigError(problems)
    # normalise words to stripped strings (YAML may give 1999 as an int)
    cfg.categories = {name: [str(w).strip() for w in words] for name, words in cfg.categories.items()}


def _words_problem(name: str, words: object) -> str | None:
    """What keeps a category's entries from being a list of words, or None. Numbers count as words (YAML reads 1999
    as an int); true/false (YAML's reading of unquoted yes, no, on, off), nested lists and mappings, dates and other
    values do not; empty or blank words (and null: a '-' with nothing after it) are named, not dropped."""
    listed = f"category '{name}' must be a list of words"
    if not isinstance(words, list):
        return listed
    flags = [number for number, word in enumerate(words, start=1) if isinstance(word, bool)]
    if flags:
        return (f"{listed}: YAML reads {_entries(flags)} (yes, no, on, off, true, false unquoted) as true/false; "
                f'quote {"it" if len(flags) == 1 else "them"}, e.g. "yes"')  # fmt: skip
    for number, word in enumerate(words, start=1):
        if isinstance(word, (list, dict)):
            kind = "list" if isinstance(word, list) else "mapping"
            return f"{listed}: entry {number} is a {kind}; give one word or phrase per entry"
        if not isinstance(word, (str, int, float, type(None))):  # a date: YAML reads 2024-01-15 as one
            return f'{listed}: YAML reads entry {number} as a {type(word).__name__}; quote it, e.g. "{word}"'
    not_text = [(number, bad) for number, word in enumerate(words, start=1)
                if isinstance(word, str) and (bad := unpaired_surrogate(word)) is not None]  # fmt: skip
    if not_text:
        return f"category '{name}' entry {not_text[0][0]} has {not_text[0][1]}"
    broken = [number for number, word in enumerate(words, start=1) if isinstance(word, str) and re.search(r"[\r\n]", word)]
    if broken:
        return (f"category '{name}' has a line break in {_entries(broken)}: a word is one line; give each word its "
                "own entry")  # fmt: skip
    empty = [number for number, word in enumerate(words, start=1) if word is None or not str(word).strip()]
    if len(empty) == len(words):
        return f"category '{name}' has no words"
    if empty:
        what, them = ("an empty word", "it") if len(empty) == 1 else ("empty words", "them")
        return f"category '{name}' has {what} ({_entries(empty)}): remove {them}"
    return None


def _entries(numbers: list[int]) -> str:
    """[2] -> 'entry 2', [2, 4] -> 'entries 2 and 4', [1, 2, 5] -> 'entries 1, 2 and 5'."""
    if len(numbers) == 1:
        return f"entry {numbers[0]}"
    return f"entries {', '.join(map(str, numbers[:-1]))} and {numbers[-1]}"


def safe_load_yaml(text: str, what: str = "config", words_under: tuple[str, ...] | None = ("categories",)) -> object:
    """yaml.safe_load of at most MAX_CONFIG_BYTES; ConfigError says where malformed YAML goes wrong, which key a
    mapping lists twice, or which word YAML would read as something written otherwise (_words_yaml_changes:
    the keys and list entries under the top-level keys words_under, or anywhere with None)."""
    if len(text.encode("utf-8", errors="replace")) > MAX_CONFIG_BYTES:
        raise ConfigError([("", f"the {what} is larger than {MAX_CONFIG_BYTES // 1_000_000} MB")])
    try:
        data = yaml.safe_load(text)
        document = yaml.compose(text, Loader=yaml.SafeLoader)
        repeated = _repeated_keys(document)
        changed = _words_yaml_changes(document, words_under)
        expanded = _expanded_size(data, {})
    except RecursionError:  # [[[[... nested some hundreds deep: the parser's own recursion gives out
        raise ConfigError([("", "the YAML is nested too deeply to be a config")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([("", f"the YAML is malformed{where}: {reason}")]) from None
    if expanded > MAX_CONFIG_BYTES:  # aliases (*name) repeat what an anchor holds: 90 KB of them made 200 MB of text
        raise ConfigError([("", f"the {what} holds {expanded / 1e6:,.0f} MB of text once YAML repeats what its aliases "
                                f"(*name) point to: at most {MAX_CONFIG_BYTES // 1_000_000} MB")])  # fmt: skip
    if repeated:  # safe_load keeps the last of them and drops the rest without a word
        raise ConfigError([("", f"{_keys_named(key, first_key)} (lines {first} and {again}): the first would be lost; "
                                "merge them or rename one")
                           for key, first_key, first, again in repeated])  # fmt: skip
    if changed:
        raise ConfigError([("", f"line {line}: YAML reads {text} as {_yaml_reading(value)}, so it would become "
                                f"'{value}'; quote it to keep it as written: \"{text}\"")
                           for text, value, line in changed])  # fmt: skip
    return data


def _expanded_size(value: object, sizes: dict[int, int]) -> int:
    """The characters of text in a safe_load result, counting a list or mapping that aliases share each time it is
    used (sizes: the sizes worked out so far, by id, so that shared ones are measured once)."""
    if isinstance(value, str):
        return len(value)
    if not isinstance(value, (list, dict)):
        return 1
    if id(value) not in sizes:
        sizes[id(value)] = 0  # while it is measured: a list that holds itself (&l [*l]) adds nothing more
        items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
        sizes[id(value)] = sum(_expanded_size(item, sizes) for item in items)
    return sizes[id(value)]


_READ_AS_OTHER_THAN_TEXT = {f"tag:yaml.org,2002:{kind}" for kind in ("int", "float", "bool", "null")}


def _read_value(node) -> object:
    """What safe_load makes of a scalar node."""
    return yaml.SafeLoader("").construct_object(node)


def _yaml_reading(value: object) -> str:
    """How a message names what YAML read: 'true', 'null', 'the number 2.5'."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    return f"the number {value!r}"


def _keys_named(key: str, first_key: str) -> str:
    """"'food' appears twice in one mapping", or for two spellings of one key, "one mapping has '1' and '1.0', which
    YAML reads as one key"."""
    if key == first_key:
        return f"'{key}' appears twice in one mapping"
    return f"one mapping has '{first_key}' and '{key}', which YAML reads as one key"


def _containers(roots) -> list:
    """Every mapping and list node under the composed YAML nodes roots, each once: an alias shares its anchor's
    node, so a recursive one does not loop and nested ones (billion laughs) do not multiply the walk."""
    stack, visited, found = list(roots), set(), []
    while stack:
        node = stack.pop()
        if not isinstance(node, (yaml.MappingNode, yaml.SequenceNode)) or id(node) in visited:
            continue
        visited.add(id(node))
        found.append(node)
        stack.extend([value for _, value in node.value] if isinstance(node, yaml.MappingNode) else node.value)
    return found


def _words_yaml_changes(document, words_under: tuple[str, ...] | None) -> list[tuple[str, object, int]]:
    """(text, value, line) of each unquoted key or list entry that YAML reads as a number whose str() differs
    from the text (2.50 as 2.5, 012 as 10, 1_000 as 1000, 1:30 as 90, .5 as 0.5), and of each unquoted key it
    reads as true, false or null (yes as True, ~ as None): as a word or a name it would change without a word
    of warning. (A list entry read as true/false or null is named by config_from_dict.) Only under the
    top-level mapping's keys words_under (None: the whole document); a setting's value (seed: 012) is a
    number, not a word, and is not checked."""
    if words_under is None:
        roots = [document]
    elif isinstance(document, yaml.MappingNode):
        roots = [value for key, value in document.value if isinstance(key, yaml.ScalarNode) and key.value in words_under]
    else:
        roots = []
    numbers = ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    words = {}  # id -> node: an aliased word once
    for node in _containers(roots):
        if isinstance(node, yaml.MappingNode):  # a name read as true becomes 'True'
            words.update((id(key), key) for key, _ in node.value if isinstance(key, yaml.ScalarNode)
                         and key.style is None and key.tag in _READ_AS_OTHER_THAN_TEXT)  # fmt: skip
        else:
            words.update((id(entry), entry) for entry in node.value if isinstance(entry, yaml.ScalarNode)
                         and entry.style is None and entry.tag in numbers)  # fmt: skip
    found = [(word.start_mark.line, word.start_mark.column, word.value, _read_value(word)) for word in words.values()]
    return [(text, value, line + 1) for line, _, text, value in sorted(found, key=lambda item: item[:2]) if str(value) != text]


def _repeated_keys(node) -> list[tuple[str, str, int, int]]:
    """(key, the key it repeats, first line, repeated line) for each key that a mapping of the composed YAML lists
    twice. Keys compare as written, so 1999 and '1999' (one category once names are strings) count as the same,
    and as safe_load reads them, so 1 and 1.0 (or 1 and true) do too."""
    repeated = []
    for mapping in _containers([node]):
        if not isinstance(mapping, yaml.MappingNode):
            continue
        seen: dict[tuple, tuple[str, int]] = {}
        for key in _keys_with_merged(mapping):  # a key a merge (<<) brings in and the mapping lists too is lost as well
            if isinstance(key, yaml.ScalarNode):
                line = key.start_mark.line + 1
                names = [("as written", key.value)]
                if key.style is None and key.tag in _READ_AS_OTHER_THAN_TEXT:
                    names.append(("as read", _read_value(key)))
                first = next((seen[name] for name in names if name in seen), None)
                if first is not None:
                    repeated.append((key.value, first[0], first[1], line))
                for name in names:
                    seen.setdefault(name, (key.value, line))
    return sorted(repeated, key=lambda found: found[3])


def _keys_with_merged(mapping: yaml.MappingNode, depth: int = 0) -> list:
    """The key nodes of a composed mapping: those of the mappings its merge keys (<<) bring in first, as YAML merges
    them, then its own (a merge key itself left out)."""
    merged, own = [], []
    for key, value in mapping.value:
        if isinstance(key, yaml.ScalarNode) and key.tag == "tag:yaml.org,2002:merge":
            sources = value.value if isinstance(value, yaml.SequenceNode) else [value]
            for source in sources:
                if isinstance(source, yaml.MappingNode) and depth < 32:
                    merged += _keys_with_merged(source, depth + 1)
        else:
            own.append(key)
    return merged + own


class ContrastSetGivenError(ConfigError):
    """A contrast set given for a scan config: named as such, rather than as an unknown key per category."""


def parse_config(text: str, require_master_text: bool = True) -> ScanConfig:
    """Parse YAML text into a validated ScanConfig. Raises ConfigError on malformed or invalid input, and
    ContrastSetGivenError (one fault) for a contrast set. require_master_text=False accepts a config without a master
    text."""
    from .contrast import contrast_shaped  # the contrast module builds on this one

    data = safe_load_yaml(text)
    try:
        return config_from_dict(data, require_master_text)
    except ConfigError:
        if contrast_shaped(data):
            raise ContrastSetGivenError([("", "this is a contrast set (words with in-sense and out-of-sense sentences), "
                                              "not a scan config: the Hypothesis page's \"Word form or meaning?\" check "
                                              "and `python -m mechamap_core contrast --contrast FILE` take it")]) from None  # fmt: skip
        raise


def load_config(path: str | os.PathLike, require_master_text: bool = True) -> ScanConfig:
    """Load and validate a YAML config file. Raises ConfigError (bad content) or FileNotFoundError.

    require_master_text=False accepts a config that has only categories (write-text writes it a master text)."""
    return parse_config(read_yaml_file(path, "config"), require_master_text)


def read_yaml_file(path: str | os.PathLike, what: str) -> str:
    """The text of the YAML file path, given as a `what` ("config", "contrast set"); a pipe (--config <(...),
    /dev/stdin) is read like a file. Raises FileNotFoundError for a folder or a missing file, and ConfigError for
    a file that is not UTF-8 text (a binary file given for a YAML one)."""
    path = Path(path)
    if path.is_dir():
        raise FileNotFoundError(f"{path} is a folder, not a {what} file")
    if not path.exists():
        raise FileNotFoundError(f"{what} file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError([("", f"{path} is not UTF-8 text (byte {exc.start + 1}): is it a YAML {what}?")]) from None


def as_scan_config(cfg: ScanConfig | str | os.PathLike, argument: str = "the config") -> ScanConfig:
    """cfg itself when it is a ScanConfig, the config file's (load_config) when it is a path (str or os.PathLike);
    else a TypeError naming `argument` (ConfigError or FileNotFoundError from load_config for a bad file)."""
    if isinstance(cfg, ScanConfig):
        return cfg
    if isinstance(cfg, (str, os.PathLike)):
        return load_config(cfg)
    raise TypeError(f"{argument} must be a ScanConfig or the path of a YAML config file, not {type(cfg).__name__}")


def config_to_yaml(cfg: ScanConfig) -> str:
    """YAML text for a config: long texts as block scalars, keys in declaration order."""

    class _Dumper(yaml.SafeDumper):
        pass

    def _str(dumper, value):
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    _Dumper.add_representer(str, _str)
    data = {k: v for k, v in cfg.to_dict().items() if v is not None}
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


def save_config(cfg: ScanConfig, path: str | os.PathLike) -> Path:
    """Validate, then write atomically (temp file + rename) so a crash never leaves half a file."""
    validate_config(cfg)
    return atomic_write_text(Path(path), config_to_yaml(cfg))


MAX_LAYER_NUMBER = 99_999  # far beyond any model's depth: a longer range is a typo, refused before it fills memory


def parse_layer_list(text: str) -> list[int] | None:
    """'0,2,5-7' -> [0, 2, 5, 6, 7] (sorted, no repeats); '' -> None (all layers). Raises ValueError, also for a
    layer number above MAX_LAYER_NUMBER."""
    if not text or not text.strip():
        return None
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ValueError(f"invalid layer list '{text}': use layer numbers and ranges, e.g. 0,2,5-7") from None
        if first < 0 or last < 0:
            raise ValueError("layer numbers must be 0 or more")
        if last < first:
            raise ValueError(f"invalid layer range '{part}': the end is before the start")
        if last > MAX_LAYER_NUMBER:
            raise ValueError(f"layer {last:,} in '{part}' is beyond any model: layer numbers go up to {MAX_LAYER_NUMBER:,}")
        out.extend(range(first, last + 1))
    if not out:
        raise ValueError(f"invalid layer list '{text}': use layer numbers and ranges, e.g. 0,2,5-7")
    return sorted(set(out))


def layers_out_of_range(layers: list[int] | None, n_layers: int) -> str | None:
    """Why layers name a layer that a model of n_layers layers does not have ("layer 9 is out of range: this model
    has layers 0-5"; many as ranges, "layers 6-99999 are ..."), or None when every layer exists or layers is None."""
    bad = [layer for layer in layers or [] if not 0 <= layer < n_layers]
    if not bad:
        return None
    named = f"layer {bad[0]} is" if len(bad) == 1 else f"layers {layer_list_text(bad)} are"
    return f"{named} out of range: this model has layers 0-{n_layers - 1}"


def layer_list_text(layers: list[int]) -> str:
    """[0, 2, 5, 6, 7] -> '0, 2, 5-7': layer numbers with runs of consecutive ones as ranges (parse_layer_list reads it)."""
    parts: list[str] = []
    for layer in sorted(set(layers)):
        if parts and parts[-1].rpartition("-")[2] == str(layer - 1):
            parts[-1] = f"{parts[-1].partition('-')[0]}-{layer}"
        else:
            parts.append(str(layer))
    return ", ".join(parts)


_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-]{0,63}$")


def safe_child_path(folder: str | os.PathLike, name: str, suffix: str) -> Path:
    """Path of `name + suffix` inside folder. Raises ValueError for names with separators, '..' or odd characters."""
    stem = name[: -len(suffix)] if suffix and name.endswith(suffix) else name
    if not _SAFE_NAME.match(stem):
        raise ValueError(
            f"'{name}' is not a valid name: use 1-64 letters, digits, '-' or '_', starting with a letter or digit"
        )
    folder = Path(folder).resolve()
    path = (folder / f"{stem}{suffix}").resolve()
    if path.parent != folder:
        raise ValueError(f"'{name}' would leave the folder {folder}")
    return path


def words_text(words: list[str]) -> str:
    """A category's words as one editable line, 'pizza, "1,000", ice cream': joined by ', ', a word holding a comma or
    a double quote quoted CSV-style (its quotes doubled), so split_words gives the same words back."""
    quoted = ['"' + word.replace('"', '""') + '"' if ("," in word or '"' in word) else word for word in map(str, words)]
    return ", ".join(quoted)


def split_words(text: str) -> list[str]:
    """The words of one line written as words_text writes them: split on commas outside double quotes, each stripped,
    blank ones dropped ('Washington, D.C.' unquoted is two words; quoted, one). A line break separates words as a
    comma does (a word never holds one: a cell typed over two lines is two words). Raises ValueError for a double
    quote that opens a word and is never closed: read as CSV reads it, it would swallow the rest of the line into
    one word ('"New York, Paris' one word, where two were meant)."""
    one_line = re.sub(r"\r\n|[\r\n]", ",", text)
    if _opens_a_quote_never_closed(one_line):
        raise ValueError(f"a double quote opens a word and is never closed in '{text.strip()}': close it, or write "
                         'a double quote inside a word as two ("")')  # fmt: skip
    return [word.strip() for word in next(csv.reader([one_line], skipinitialspace=True), []) if word.strip()]


def _opens_a_quote_never_closed(line: str) -> bool:
    """Whether a field of the comma-separated line starts (after spaces) with a double quote that no later single
    double quote closes ("" inside is an escaped quote): csv would read the rest of the line into that field."""
    at = 0
    while True:
        while line[at : at + 1] == " ":
            at += 1
        if line[at : at + 1] == '"':
            at += 1
            while True:
                at = line.find('"', at)
                if at < 0:
                    return True
                if line[at + 1 : at + 2] != '"':
                    break
                at += 2
            at += 1
        comma = line.find(",", at)
        if comma < 0:
            return False
        at = comma + 1
