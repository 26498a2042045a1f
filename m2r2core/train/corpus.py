"""The distillation corpus: millions of training tokens, kept apart from every evaluation set.

    python -m m2r2core.train corpus     # build or resume it (progress bar, atomic shards)

What it holds (one folder, `work_dir(model)/corpus`):
- `plan.jsonl`: every instruction the model answers, with its source (ShareGPT's first user
  turn, or an instruction written from a Wikipedia article) and its split. A ShareGPT record
  or Wikipedia article is `dev` (one in twenty: checkpoint choice, tuning), `test` (one in
  twenty: the figures we report) or `train`, by a hash of its id or title.
- `chat/<split>-NNNNN.jsonl`: the model's own greedy answers to the plan's instructions
  (on-policy self-distillation), generated in batches of similar prompt length, one shard per
  file, each written under a temporary name and renamed: an interrupted build resumes at the
  first missing shard and never leaves half a shard that loads.
- `text.jsonl`: teacher-forced text of the train split only: ShareGPT conversations through
  the chat template (the assistant turns are the answer part) and Wikipedia lead sections, cut
  into windows.
- `manifest.json`: the model and build settings the shards were made with; a build or a
  trainer with another model or settings is refused, naming both.
- Growth rounds (`corpus --grow N [--grow-round R]`): N fresh train instructions, half ShareGPT
  first turns and half written from Wikipedia train articles, none in an earlier plan (nor an
  article an earlier plan wrote from), in `plan-grow<R>.jsonl`, answered into
  `chat/train-g<R>-NNNNN.jsonl` shards the same way; trainers read them with the rest of the
  train split. The manifest records each round. Once the first turns run out, the ShareGPT half
  is later user turns answered after the record's conversation so far (`sharegpt-followup`; read
  back with only FOLLOW_UP_CONTEXT tokens of it before the answer), and once those run out,
  later user turns asked alone as first turns (`sharegpt-turn`); once every article is taken,
  the Wikipedia half writes from an article again with a template it was not yet asked with.

Every training prompt that matches an MT-Bench turn or an AlpacaEval instruction (normalised
text, or a near duplicate: word-trigram Jaccard of at least `NEAR_DUPLICATE`) is removed with
its whole record; the manifest says how many.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from m2r2core.errors import M2R2Error
from m2r2core.runtime import assets
from m2r2core.runtime.prompt import encode_messages
from m2r2core.train.distill import (
    TEMPLATES,
    Sample,
    answer_batch,
    instructions,
    wiki_articles,
    written,
)

VERSION = 1
NEAR_DUPLICATE = 0.5
FOLLOW_UP_PROMPT_TOKENS = 512
"""The longest templated conversation (history and the follow-up turn) a follow-up may have."""
FOLLOW_UP_CONTEXT = 96
"""Tokens of conversation kept before a follow-up's answer when the corpus is read: a training
window then starts near the answer instead of spending itself on the history."""
MIN_TURN_WORDS = 8
"""The fewest words a later user turn asked alone may have ("go on", "shorter please" need the
conversation they were said in)."""
_ROLES = {"human": "user", "gpt": "assistant"}
SPLITS = ("dev", "test", "train")


class CorpusError(M2R2Error):
    """A corpus folder that is empty, corrupt, or was built for another model or settings."""


def split_of(key: str) -> str:
    """The split of a ShareGPT record id or a Wikipedia title: dev, test or train."""
    bucket = hashlib.sha256(key.encode()).digest()[1] % 20
    return "dev" if bucket == 0 else "test" if bucket == 1 else "train"


def heldout_half(title: str) -> str:
    """Which half of the held-out Wikipedia articles (distill.is_held_out) a title is in."""
    return "dev" if hashlib.sha256(title.encode()).digest()[2] % 2 == 0 else "test"


def sharegpt_records(path: Path | None = None) -> Iterator[dict]:
    """The complete records of the shipped (truncated) ShareGPT file, one at a time."""
    path = path or assets.locate(assets.SHAREGPT)
    text = path.read_text(encoding="utf-8", errors="replace")
    decoder = json.JSONDecoder()
    index = text.index("[") + 1
    while True:
        while index < len(text) and text[index] in " \t\r\n,":
            index += 1
        if index >= len(text) or text[index] == "]":
            return
        try:
            record, index = decoder.raw_decode(text, index)
        except json.JSONDecodeError:
            return  # the record cut off by the truncation
        yield record


def normalise(text: str) -> str:
    """Lower-case words only: what two copies of one prompt share."""
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def _trigrams(normalised: str) -> set[tuple[str, ...]]:
    words = normalised.split()
    return {tuple(words[i:i + 3]) for i in range(len(words) - 2)}


class OverlapFilter:
    """Says whether a training prompt copies (or nearly copies) an evaluation prompt."""

    def __init__(self, eval_texts: list[str]) -> None:
        """Index the evaluation prompts by normalised text and by word trigram."""
        self.exact = {normalise(t) for t in eval_texts}
        self.grams = [_trigrams(normalise(t)) for t in eval_texts]
        self.index: dict[tuple[str, ...], list[int]] = {}
        for number, grams in enumerate(self.grams):
            for gram in grams:
                self.index.setdefault(gram, []).append(number)

    def overlaps(self, text: str) -> bool:
        """Exact normalised match, or word-trigram Jaccard >= NEAR_DUPLICATE with one of them."""
        norm = normalise(text)
        if norm in self.exact:
            return True
        grams = _trigrams(norm)
        shared: dict[int, int] = {}
        for gram in grams:
            for number in self.index.get(gram, ()):
                shared[number] = shared.get(number, 0) + 1
        return any(n / (len(grams) + len(self.grams[k]) - n) >= NEAR_DUPLICATE
                   for k, n in shared.items())


def evaluation_texts() -> list[str]:
    """Every prompt any evaluation reads: MT-Bench (both turns) and all AlpacaEval slices."""
    mt = assets.locate(assets.MT_BENCH_QUESTIONS)
    texts = [turn for line in mt.read_text(encoding="utf-8").splitlines() if line.strip()
             for turn in json.loads(line)["turns"]]
    alpaca = json.loads(assets.locate(assets.ALPACA_EVAL).read_text(encoding="utf-8"))
    return texts + [row["instruction"] for row in alpaca]


@dataclass(frozen=True)
class Instruction:
    """One planned instruction."""

    id: str
    source: str
    """'sharegpt' (a first user turn), 'sharegpt-followup' (a later user turn, answered after
    the conversation before it), 'sharegpt-turn' (a later user turn asked alone, as a first
    turn) or 'wiki'."""
    split: str
    text: str
    history: list[dict] | None = None
    """The chat messages before `text` (a follow-up's conversation so far), or None."""

    def messages(self) -> list[dict]:
        """The conversation the model answers: the history, then this user turn."""
        return [*(self.history or []), {"role": "user", "content": self.text}]


@dataclass(frozen=True)
class Settings:
    """What a corpus is built with; a resume must use the same."""

    n_sharegpt: int = 3000
    n_wiki: int = 2000
    heldout_per_split: int = 120
    """Instructions answered per held-out split (dev, test), half from each source."""
    max_new_tokens: int = 160
    max_prompt_tokens: int = 320
    text_tokens: int = 4_500_000
    window: int = 256
    seed: int = 0


def _sharegpt_prompts(settings: Settings, tokenizer, overlap: OverlapFilter,
                      removed: dict[str, int]) -> Iterator[tuple[dict, str, Instruction | None]]:
    """ShareGPT records whose first turn is a human prompt that copies no evaluation prompt:
    (record, split, its Instruction, or None when the prompt is not ASCII or too long);
    removed[split] counts the prompts dropped for overlapping an evaluation prompt.
    """
    for record in sharegpt_records():
        turns = record.get("conversations") or []
        if not turns or turns[0].get("from") != "human":
            continue
        prompt = (turns[0].get("value") or "").strip()
        split = split_of(str(record.get("id")))
        if not prompt or overlap.overlaps(prompt):
            removed[split] = removed.get(split, 0) + bool(prompt)
            continue
        usable = prompt.isascii() and \
            len(tokenizer(prompt)["input_ids"]) <= settings.max_prompt_tokens
        yield record, split, (Instruction(str(record["id"]), "sharegpt", split, prompt)
                              if usable else None)


def _train_conversations(overlap: OverlapFilter) -> Iterator[tuple[dict, list[dict]]]:
    """(record, its user and assistant turns) of the train-split ShareGPT records, leaving out
    a record whose first turn is a user prompt that copies an evaluation prompt.
    """
    for record in sharegpt_records():
        turns = [t for t in record.get("conversations") or []
                 if t.get("from") in _ROLES and t.get("value")]
        if not turns or split_of(str(record.get("id"))) != "train":
            continue
        if turns[0]["from"] == "human" and overlap.overlaps(turns[0]["value"].strip()):
            continue
        yield record, turns


def _sharegpt_follow_ups(settings: Settings, tokenizer, overlap: OverlapFilter,
                         used: set[str]) -> tuple[list[Instruction], int]:
    """Later user turns of train-split ShareGPT records (`<record id>#<turn>`), each with the
    record's conversation before it as history, not in `used`: ASCII, no copy of an evaluation
    prompt (nor a record whose first turn is one), the turn within `max_prompt_tokens` and the
    templated conversation within FOLLOW_UP_PROMPT_TOKENS. Returns them and how many turns were
    dropped for matching an evaluation prompt.
    """
    out, removed = [], 0
    for record, turns in _train_conversations(overlap):
        for k in range(2, len(turns), 2):
            if [t["from"] for t in turns[:k + 1]] != ["human", "gpt"] * (k // 2) + ["human"]:
                break
            key, text = f"{record['id']}#{k}", turns[k]["value"].strip()
            if key in used or not text.isascii():
                continue
            if overlap.overlaps(text):
                removed += 1
                continue
            if len(tokenizer(text)["input_ids"]) > settings.max_prompt_tokens:
                continue
            history = [{"role": _ROLES[t["from"]], "content": t["value"].strip()}
                       for t in turns[:k]]
            follow_up = Instruction(key, "sharegpt-followup", "train", text, history)
            if prompt_length(tokenizer, follow_up) <= FOLLOW_UP_PROMPT_TOKENS:
                out.append(follow_up)
    return out, removed


def _sharegpt_later_turns(settings: Settings, tokenizer, overlap: OverlapFilter,
                          used: set[str], asked: set[str]) -> tuple[list[Instruction], int]:
    """Later user turns of train-split ShareGPT records asked alone, as first turns
    (`<record id>@<turn>`, source 'sharegpt-turn'): every user turn but a record's first, not in
    `used` (by its own key or its follow-up key), ASCII, at least MIN_TURN_WORDS words, within
    `max_prompt_tokens`, no copy of an evaluation prompt (nor of a record whose first turn is
    one), and no text (normalised) already in `asked` or taken before in this pool. Returns
    them and how many turns were dropped for matching an evaluation prompt.
    """
    out, removed, seen = [], 0, set(asked)
    for record, turns in _train_conversations(overlap):
        for k, turn in enumerate(turns[1:], start=1):
            key, text = f"{record['id']}@{k}", turn["value"].strip()
            if turn["from"] != "human" or key in used or f"{record['id']}#{k}" in used \
                    or not text.isascii():
                continue
            if overlap.overlaps(text):
                removed += 1
                continue
            norm = normalise(text)
            if len(text.split()) < MIN_TURN_WORDS or norm in seen or \
                    len(tokenizer(text)["input_ids"]) > settings.max_prompt_tokens:
                continue
            seen.add(norm)
            out.append(Instruction(key, "sharegpt-turn", "train", text))
    return out, removed


def prompt_length(tokenizer, instruction: Instruction) -> int:
    """Tokens of the prompt the model answers: the user turn, or a follow-up's templated
    conversation.
    """
    if not instruction.history:
        return len(tokenizer(instruction.text)["input_ids"])
    return len(encode_messages(tokenizer, instruction.messages()))


def plan(settings: Settings, tokenizer, overlap: OverlapFilter
         ) -> tuple[list[Instruction], list[dict], int]:
    """The instructions to answer, the train-split ShareGPT records for teacher forcing, and how
    many records were removed for matching an evaluation prompt.
    """
    rng = random.Random(settings.seed)
    chosen: dict[str, list[Instruction]] = {s: [] for s in SPLITS}
    conversations, dropped = [], {}
    for record, split, instruction in _sharegpt_prompts(settings, tokenizer, overlap, dropped):
        if split == "train":
            conversations.append(record)
        if instruction is not None:
            chosen[split].append(instruction)
    removed = sum(dropped.values())
    wanted = {"train": settings.n_sharegpt, "dev": settings.heldout_per_split // 2,
              "test": settings.heldout_per_split // 2}
    out = [i for s in SPLITS for i in rng.sample(chosen[s], min(wanted[s], len(chosen[s])))]
    for split, count in (("train", settings.n_wiki), ("dev", settings.heldout_per_split // 2),
                         ("test", settings.heldout_per_split // 2)):
        articles = [a for a in wiki_articles("train" if split == "train" else "heldout")
                    if split == "train" or heldout_half(a["title"]) == split]
        for number, text in enumerate(instructions(articles, count, settings.seed + len(split))):
            out.append(Instruction(f"wiki-{split}-{number}", "wiki", split, text))
    return out, conversations, removed


def teacher_forced(tokenizer, conversations: list[dict], settings: Settings) -> list[Sample]:
    """Train-split ShareGPT conversations (chat template; the first assistant turn starts the
    answer part) and Wikipedia train articles, cut into windows, up to `text_tokens` in all.
    """
    rng = random.Random(settings.seed + 7)
    budget = settings.text_tokens
    samples: list[Sample] = []
    wiki = [tokenizer(a["extract"])["input_ids"] for a in wiki_articles("train")]
    for ids in wiki:
        samples += _windows(ids, 0, "text", settings.window)
    budget -= sum(len(s.ids) for s in samples)
    rng.shuffle(conversations)
    for record in conversations:
        if budget <= 0:
            break
        messages = [{"role": _ROLES[t["from"]], "content": t["value"]}
                    for t in record["conversations"] if t.get("from") in _ROLES and t.get("value")]
        if len(messages) < 2 or messages[1]["role"] != "assistant":
            continue
        first = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True,
                                              tokenize=False)
        start = len(tokenizer(first, add_special_tokens=False)["input_ids"])
        ids = tokenizer(tokenizer.apply_chat_template(messages, tokenize=False),
                        add_special_tokens=False)["input_ids"]
        pieces = _windows(ids, start, "sharegpt", settings.window)
        samples += pieces
        budget -= sum(len(s.ids) for s in pieces)
    return samples


def _windows(ids: list[int], answer_start: int, kind: str, window: int) -> list[Sample]:
    """Cut one sequence into windows; a window wholly before the answer is dropped."""
    out = []
    for begin in range(0, len(ids), window):
        piece = ids[begin:begin + window]
        if len(piece) >= 16 and begin + len(piece) > answer_start:
            out.append(Sample(piece, max(0, answer_start - begin), kind))
    return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """Write rows as JSONL under a temporary name, then rename (never half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSONL file; CorpusError naming the file if it is corrupt."""
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line]
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorpusError(f"{path} is corrupt ({err}); delete it and run `python -m "
                          "m2r2core.train corpus` again to rebuild it.") from err


def check_manifest(folder: Path, expected: dict) -> None:
    """Refuse a corpus folder built for another model or with other settings."""
    path = folder / "manifest.json"
    if not path.is_file():
        return
    found = json.loads(path.read_text())
    for key in ("model_name", "model_fingerprint", "version", "settings"):
        if found.get(key) != expected.get(key):
            raise CorpusError(
                f"The corpus in {folder} was built for '{found.get('model_name')}' (fingerprint "
                f"{found.get('model_fingerprint')}, {key}: {found.get(key)}); this run is for "
                f"'{expected['model_name']}' (fingerprint {expected['model_fingerprint']}, "
                f"{key}: {expected.get(key)}). Use another --out folder or the same settings.")


def build(folder: Path, model, tokenizer, model_name: str, model_fingerprint: str,
          settings: Settings, batch_size: int, shard_size: int,
          progress: Callable[[int, int], None] | None = None,
          splits: tuple[str, ...] = SPLITS) -> dict:
    """Build (or resume) the corpus in `folder`, answering the instructions of `splits` (none:
    the plan and the teacher-forced text alone); returns the manifest.
    """
    folder.mkdir(parents=True, exist_ok=True)
    manifest = {"version": VERSION, "model_name": model_name,
                "model_fingerprint": model_fingerprint, "settings": asdict(settings)}
    check_manifest(folder, manifest)
    plan_path, text_path = folder / "plan.jsonl", folder / "text.jsonl"
    if not plan_path.is_file() or not text_path.is_file():
        overlap = OverlapFilter(evaluation_texts())
        planned, conversations, removed = plan(settings, tokenizer, overlap)
        if not planned:
            raise CorpusError("No instruction survived the filters; the corpus would be empty.")
        text = teacher_forced(tokenizer, conversations, settings)
        write_jsonl(text_path, [asdict(s) for s in text])
        write_jsonl(plan_path, [asdict(i) for i in planned])
        manifest["removed_for_overlap"] = removed
        (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    manifest = json.loads((folder / "manifest.json").read_text())
    planned = [Instruction(**row) for row in read_jsonl(plan_path)]
    planned = [i for i in planned if i.split in splits]
    _answer_shards(folder, model, tokenizer, shard_plan(planned, tokenizer, shard_size),
                   settings, batch_size, len(planned), progress)
    return manifest


def shard_plan(planned: list[Instruction], tokenizer, shard_size: int, tag: str = ""
               ) -> list[tuple[str, list[Instruction]]]:
    """Shards of similar prompt length (less padding per batch); held-out splits first, so a
    trainer can measure itself before the train split is complete. `tag` marks a growth
    round's shards (`train-g1-00000`), which sort after the first build's.
    """
    out = []
    for split in SPLITS:
        rows = sorted((i for i in planned if i.split == split),
                      key=lambda i: (prompt_length(tokenizer, i), i.id))
        for number, start in enumerate(range(0, len(rows), shard_size)):
            out.append((f"{split}-{tag}{number:05d}", rows[start:start + shard_size]))
    return out


def _answer_shards(folder: Path, model, tokenizer, shards: list[tuple[str, list[Instruction]]],
                   settings: Settings, batch_size: int, total: int,
                   progress: Callable[[int, int], None] | None) -> None:
    """Answer every shard not yet written (each written atomically: a resume starts at the
    first missing one).
    """
    (folder / "chat").mkdir(exist_ok=True)
    done = 0
    for name, rows in shards:
        path = folder / "chat" / f"{name}.jsonl"
        if not path.is_file():
            out = []
            for start in range(0, len(rows), batch_size):
                batch = rows[start:start + batch_size]
                answers = answer_batch(model, tokenizer,
                                       [i.messages() if i.history else i.text for i in batch],
                                       settings.max_new_tokens)
                out += [asdict(s) | {"id": i.id, "source": i.source, "split": i.split}
                        for i, s in zip(batch, answers, strict=True)]
            write_jsonl(path, out)
        done += len(rows)
        if progress:
            progress(done, total)


def growth_plan(settings: Settings, tokenizer, overlap: OverlapFilter, earlier: list[Instruction],
                count: int, round_: int) -> tuple[list[Instruction], int]:
    """`count` fresh train instructions for growth round `round_`, none in `earlier`.

    Half from ShareGPT: first user turns no plan took, then, once those run out, later user
    turns with their conversation as history (`_sharegpt_follow_ups`), then, once those run
    out too, later user turns asked alone (`_sharegpt_later_turns`). The rest written from
    Wikipedia train articles: articles no earlier plan wrote from first (the first build's are
    drawn again from its seed; a growth round names its article in the id), then, once every
    article is taken, an article again with a template none of its earlier instructions used.
    Returns them and how many prompts were dropped for matching an evaluation prompt.
    """
    rng = random.Random(settings.seed + 1000 * round_)
    used = {i.id for i in earlier}
    dropped: dict[str, int] = {}
    fresh = [i for _, split, i in _sharegpt_prompts(settings, tokenizer, overlap, dropped)
             if split == "train" and i is not None and i.id not in used]
    removed = dropped.get("train", 0)
    half = count - count // 2
    out = rng.sample(fresh, min(half, len(fresh)))
    if len(out) < half:
        follow_ups, dropped_turns = _sharegpt_follow_ups(settings, tokenizer, overlap, used)
        removed += dropped_turns
        out += rng.sample(follow_ups, min(half - len(out), len(follow_ups)))
    if len(out) < half:
        alone, dropped_turns = _sharegpt_later_turns(
            settings, tokenizer, overlap, used | {i.id for i in out},
            {normalise(i.text) for i in [*earlier, *out]})
        removed += dropped_turns
        out += rng.sample(alone, min(half - len(out), len(alone)))
    articles = list(wiki_articles("train"))
    first = random.Random(settings.seed + len("train")).sample(articles,
                                                                min(settings.n_wiki, len(articles)))
    taken = {a["title"] for a in first} | {i.id.split("/", 1)[1] for i in earlier
                                           if i.id.startswith("wiki-g")}
    left = [a for a in articles if a["title"] not in taken]
    chosen = random.Random(settings.seed + 1000 * round_ + 1).sample(
        left, min(count - len(out), len(left)))
    texts = [instructions([article], 1, settings.seed + 1000 * round_ + 2 + number)[0]
               for number, article in enumerate(chosen)]
    wanted = count - len(out) - len(chosen)
    if wanted > 0:
        this_round = set(texts)
        pairs = [(article, template) for article, template in _unused_templates(articles, earlier)
                 if written(template, article) not in this_round]
        for article, template in random.Random(settings.seed + 1000 * round_ + 3).sample(
                pairs, min(wanted, len(pairs))):
            chosen.append(article)
            texts.append(written(template, article))
    for number, (article, text) in enumerate(zip(chosen, texts, strict=True)):
        if overlap.overlaps(text):
            removed += 1
            continue
        out.append(Instruction(f"wiki-g{round_}-{number}/{article['title']}", "wiki", "train",
                               text))
    return out, removed


def _unused_templates(articles: list[dict], earlier: list[Instruction]
                      ) -> list[tuple[dict, str]]:
    """(article, template) pairs whose instruction no earlier plan holds, in article order."""
    planned = {i.text for i in earlier if i.source == "wiki"}
    return [(article, template) for article in articles for template in TEMPLATES
            if written(template, article) not in planned]


def grow(folder: Path, model, tokenizer, model_name: str, model_fingerprint: str,
         settings: Settings, count: int, round_: int, batch_size: int, shard_size: int,
         progress: Callable[[int, int], None] | None = None, answer: bool = True) -> dict:
    """Add (or resume) growth round `round_` of `count` fresh train instructions to a built
    corpus (answer=False: only its plan, which a later round's plan depends on); returns the
    manifest. CorpusError for a corpus not planned yet, of another model or settings, or a round
    already planned with another count.
    """
    manifest_path, plan_path = folder / "manifest.json", folder / "plan.jsonl"
    if not plan_path.is_file() or not manifest_path.is_file():
        raise CorpusError(f"No corpus in {folder} to grow; build it first with `python -m "
                          "m2r2core.train corpus`.")
    check_manifest(folder, {"version": VERSION, "model_name": model_name,
                            "model_fingerprint": model_fingerprint,
                            "settings": asdict(settings)})
    if round_ < 1 or count < 1:
        raise CorpusError(f"A growth round needs a round of at least 1 and at least one "
                          f"instruction (got round {round_}, {count} instructions).")
    manifest = json.loads(manifest_path.read_text())
    rounds = manifest.setdefault("growth", {})
    known = rounds.get(str(round_))
    if known is not None and known["instructions"] != count:
        raise CorpusError(f"Growth round {round_} of the corpus in {folder} was planned with "
                          f"{known['instructions']} instructions, not {count}; resume it with "
                          f"--grow {known['instructions']} or start round {round_ + 1}.")
    path = folder / f"plan-grow{round_}.jsonl"
    if not path.is_file():
        earlier = [Instruction(**row) for row in read_jsonl(plan_path)]
        for other in sorted(folder.glob("plan-grow*.jsonl")):
            earlier += [Instruction(**row) for row in read_jsonl(other)]
        planned, removed = growth_plan(settings, tokenizer, OverlapFilter(evaluation_texts()),
                                       earlier, count, round_)
        if not planned:
            raise CorpusError("No fresh instruction is left for a growth round.")
        write_jsonl(path, [asdict(i) for i in planned])
        rounds[str(round_)] = {"instructions": count, "planned": len(planned),
                               "removed_for_overlap": removed}
        tmp = manifest_path.with_name(manifest_path.name + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.replace(manifest_path)
    if answer:
        planned = [Instruction(**row) for row in read_jsonl(path)]
        _answer_shards(folder, model, tokenizer, shard_plan(planned, tokenizer, shard_size,
                                                            f"g{round_}-"),
                       settings, batch_size, len(planned), progress)
    return manifest


def finished(folder: Path, split: str, growth: bool = True) -> list[Sample]:
    """The chat answers of one split built so far (none while its first shard is being made);
    the growth rounds' after the first build's, or (growth=False) the first build's alone.
    """
    first = _answers(folder, f"{split}-[0-9]*.jsonl")
    return first + grown(folder, split) if growth else first


def grown(folder: Path, split: str) -> list[Sample]:
    """The growth rounds' chat answers of one split, in round and shard order."""
    return [s for samples in growth_rounds(folder, split).values() for s in samples]


def growth_rounds(folder: Path, split: str) -> dict[int, list[Sample]]:
    """{growth round: its chat answers of one split so far}, in round order."""
    rounds = sorted({int(path.name[len(split) + 2:].split("-")[0])
                     for path in (folder / "chat").glob(f"{split}-g*-*.jsonl")})
    return {r: _answers(folder, f"{split}-g{r}-*.jsonl") for r in rounds}


def _answers(folder: Path, pattern: str) -> list[Sample]:
    return [_sample(r) for path in sorted((folder / "chat").glob(pattern))
            for r in read_jsonl(path) if len(r["ids"]) >= 2]


def _sample(row: dict) -> Sample:
    """One answer row as a Sample; a follow-up keeps FOLLOW_UP_CONTEXT tokens before its answer."""
    cut = 0
    if row.get("source") == "sharegpt-followup":
        cut = max(0, row["answer_start"] - FOLLOW_UP_CONTEXT)
    return Sample(row["ids"][cut:], row["answer_start"] - cut, "chat", row.get("source", ""))


def text_samples(folder: Path) -> list[Sample]:
    """The teacher-forced text windows (train split only; none before the plan is written)."""
    path = folder / "text.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    return [Sample(**(r | {"source": r.get("source") or "text"})) for r in rows]


def load(folder: Path, split: str, with_text: bool = True,
         model_fingerprint: str | None = None) -> list[Sample]:
    """The finished samples of one split: chat answers (and, for train, the teacher-forced text).

    Raises CorpusError for a missing, empty or corrupt corpus, or one of another model.
    """
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise CorpusError(f"No corpus in {folder}; build it with `python -m m2r2core.train "
                          "corpus`.")
    manifest = json.loads(manifest_path.read_text())
    if model_fingerprint and manifest.get("model_fingerprint") != model_fingerprint:
        raise CorpusError(
            f"The corpus in {folder} was built by '{manifest.get('model_name')}' (fingerprint "
            f"{manifest.get('model_fingerprint')}); the loaded model's fingerprint is "
            f"{model_fingerprint}. Build a corpus for this model.")
    samples = finished(folder, split)
    if split == "train" and with_text:
        samples += text_samples(folder)
    samples = [s for s in samples if len(s.ids) >= 2]
    if not samples:
        raise CorpusError(f"The corpus in {folder} has no finished {split} samples yet.")
    return samples

