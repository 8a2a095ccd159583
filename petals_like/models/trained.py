"""A small Llama trained here, offline, on the Python standard library's own source: readable output
for the demo, and a model whose numbers mean something for tests and benchmarks.

Every machine with Python has the corpus (`sysconfig.get_paths()["stdlib"]`, ~11 MB of .py files
without the test suites), so the model needs no download. The recipe is sized for CPUs: 4 blocks of
hidden 256 with grouped-query attention (8 query heads, 2 KV heads) and a 4096-token byte-level BPE
learned from the same files train in 12 minutes on 2 cores to write function headers, docstrings
and indented bodies (docs/trained-model.md has the numbers). Files are split into training and
validation by a hash of their path, so the validation perplexity in `training.json` is measured on
code the model never saw, next to the unigram baseline on the same tokens.

The default folder is a per-machine cache (`default_trained_path()`): built once, then used by the
demo, the tests and the benchmarks. Training is not bit-for-bit reproducible across machines (thread
counts change float sums, and the budget is wall-clock), but the recorded perplexity is measured on
the folder's own weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import shutil
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from petals_like.models.tiny import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, _quiet_transformers, save_byte_level_tokenizer
from petals_like.utils.cache import cache_dir

logger = logging.getLogger(__name__)

RECORD_FILE = "training.json"  # written last: a folder with it is complete
RECORD_VERSION = 1  # bump with the recipe or the data, together with the default folder's name
DEFAULT_NAME = "trained-llama-v1"
DEFAULT_BUDGET_S = 720.0  # seconds of training; data, tokenizer and evaluation add ~30 s on 2 cores
SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
VALIDATION_SHARE = 0.06  # of the files, chosen by a hash of their relative path
SAMPLE_PROMPT = "def "  # ends in a space, as a user would type it (see _TrainingWindows)


@dataclass(frozen=True)
class Recipe:
    num_hidden_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 8
    num_key_value_heads: int = 2  # grouped-query attention, as in Llama 3 / Mistral
    intermediate_size: int = 768  # 3 x hidden: a multiple of 64, so int4's groups of 64 inputs take the down projection
    vocab_size: int = 4096
    seq_len: int = 256  # tokens per window, <s> included; also the model's max_position_embeddings
    batch_size: int = 16  # windows per step: 4096 tokens, ~0.8 s a step on 2 idle cores
    learning_rate: float = 2e-3  # peak; cosine decay to a tenth over the budget
    warmup_steps: int = 30
    weight_decay: float = 0.1  # on matrices only
    space_split_share: float = 0.05  # of the tokens " name" that are trained as " " + "name" (see _TrainingWindows)
    max_steps: int = 100_000  # the wall-clock budget usually ends training first
    validation_tokens: int = 131_072  # scored: the first N tokens of the validation files, rounded down to whole windows


def default_trained_path() -> Path:
    """The per-machine cache, as the server's throughput cache: $PETALS_LIKE_CACHE or ~/.cache/petals_like."""
    return cache_dir() / DEFAULT_NAME


def read_training_record(path: str | Path) -> Optional[dict[str, Any]]:
    """training.json of a complete trained folder, else None (missing, half-written or another version)."""
    path = Path(path)
    try:
        record = json.loads((path / RECORD_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if record.get("version") != RECORD_VERSION or not (path / "config.json").is_file():
        return None
    return record


def is_complete(path: str | Path) -> bool:
    return read_training_record(path) is not None


def make_trained_model(
    path: str | Path,
    *,
    budget_s: float = DEFAULT_BUDGET_S,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    **recipe_overrides: Any,
) -> Path:
    """Train the model into `path` and return it; a complete folder there is returned at once.

    budget_s: seconds of training (the learning-rate schedule follows the clock, so a short budget
    still ends with a decayed rate). recipe_overrides: fields of Recipe, e.g. num_hidden_layers=2.
    A folder this function did not make is never written into; one it made with another
    RECORD_VERSION is rebuilt only with overwrite=True.
    """
    path = Path(path)
    recipe = Recipe(**recipe_overrides)
    if recipe.num_key_value_heads > recipe.num_attention_heads or recipe.num_attention_heads % recipe.num_key_value_heads:
        raise ValueError(f"num_attention_heads={recipe.num_attention_heads} must be a multiple of num_key_value_heads")
    if budget_s <= 0:
        raise ValueError(f"budget_s={budget_s} must be positive")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file, not a folder for a checkpoint")
    if path.exists():
        if is_complete(path) and not overwrite:
            return path
        ours = (path / RECORD_FILE).is_file()
        if not ours and any(path.iterdir()):
            raise FileExistsError(f"{path} exists and was not made by make_trained_model; refusing to write into it")
        if ours and not overwrite:
            raise FileExistsError(f"{path} holds a trained model of another version; pass overwrite=True to rebuild it")

    # build next to the target and rename: an interrupted build never leaves a folder that looks complete
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        record = _build(staging, recipe, budget_s=budget_s, seed=seed, progress=progress)
        (staging / RECORD_FILE).write_text(json.dumps(record, indent=2))
        if path.exists():
            shutil.rmtree(path)  # only reached for an empty folder or one of ours with overwrite=True
        try:
            os.replace(staging, path)
        except OSError:
            if not is_complete(path):  # else a concurrent caller finished first; theirs is as good
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(
        f"Trained a Llama in {path}: validation perplexity {record['validation_perplexity']:.2f}, "
        f"unigram {record['unigram_perplexity']:.1f}"
    )
    return path


def corpus_files(root: Optional[str | Path] = None) -> tuple[list[Path], list[Path]]:
    """(training, validation) .py files under the standard library, each sorted by relative path.

    The split hashes the relative path, so a file lands on the same side on every machine and a
    Python version that adds or drops files moves no other file across.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    train, validation = [], []
    for file in sorted(root.rglob("*.py"), key=lambda f: f.relative_to(root).as_posix()):
        relative = file.relative_to(root)
        if SKIP_DIRS.intersection(relative.parts[:-1]) or not file.is_file():
            continue
        bucket = int.from_bytes(hashlib.sha256(relative.as_posix().encode()).digest()[:4], "big") / 2**32
        (validation if bucket < VALIDATION_SHARE else train).append(file)
    if not train or not validation:
        raise FileNotFoundError(f"too few .py files under {root} to train on (found {len(train) + len(validation)})")
    return train, validation


def read_texts(files: Sequence[Path]) -> list[str]:
    return [file.read_text(encoding="utf-8", errors="replace") for file in files]


def token_stream(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """All texts as one stream of ids, each file as `<s> ... </s>` (the tokenizer prepends <s>).

    `tokenizer` is a PreTrainedTokenizerFast; its backend encodes the files in parallel and without
    the warning about sequences longer than model_max_length, which does not apply to a stream.
    """
    encodings = tokenizer.backend_tokenizer.encode_batch(list(texts))
    ids: list[int] = []
    for encoding in encodings:
        ids.extend(encoding.ids)
        ids.append(EOS_ID)
    return torch.tensor(ids, dtype=torch.long)  # [tokens]


def validation_windows(stream: torch.Tensor, seq_len: int, max_tokens: int) -> torch.Tensor:
    """The first max_tokens of the validation stream (rounded down to whole windows) as [windows, seq_len].

    Each window is <s> and then seq_len - 1 tokens of the stream, the shape of a training window, and
    is scored from its own start: windows[:, 1:] are the first tokens of the stream, each scored
    once, by the model and by the unigram baseline alike.
    """
    windows = min(max_tokens, stream.numel()) // (seq_len - 1)
    if windows < 1:
        raise ValueError(f"the validation files hold {stream.numel()} tokens, fewer than one window of {seq_len}")
    return with_bos(stream[: windows * (seq_len - 1)].view(windows, seq_len - 1))


def with_bos(chunks: torch.Tensor) -> torch.Tensor:
    """[n, length] chunks of the stream -> [n, length + 1] windows that start with <s>.

    Tokenized prompts always start with <s>; a model that saw <s> only before a file's first line
    would continue "<s>def" as if a file began with it. Training windows start at any line of a
    file, each after <s>, so a snippet is a prompt the model has seen the like of.
    """
    return torch.cat([torch.full((chunks.shape[0], 1), BOS_ID, dtype=chunks.dtype), chunks], dim=1)


@torch.no_grad()
def model_perplexity(model: torch.nn.Module, windows: torch.Tensor, batch_size: int = 16) -> float:
    """exp(mean cross-entropy) of predicting windows[:, 1:] from the tokens before them."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in windows.split(batch_size):
        logits = model(input_ids=batch).logits[:, :-1].float()  # [batch, seq - 1, vocab]
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
        count += batch[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


def unigram_perplexity(train_stream: torch.Tensor, windows: torch.Tensor, vocab_size: int) -> float:
    """The baseline: each token's training-split frequency (add-one smoothed), scored on windows[:, 1:]."""
    counts = torch.bincount(train_stream, minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    return math.exp(-log_probs[windows[:, 1:].reshape(-1)].mean().item())


def _build(folder: Path, recipe: Recipe, *, budget_s: float, seed: int, progress: bool) -> dict[str, Any]:
    import transformers
    from transformers import AutoTokenizer

    started = time.monotonic()
    train_files, validation_files = corpus_files()
    train_texts = read_texts(train_files)
    save_byte_level_tokenizer(_train_tokenizer(train_texts, recipe), folder, recipe.seq_len)
    tokenizer = AutoTokenizer.from_pretrained(folder)  # as every user of the folder will load it
    train_stream = token_stream(tokenizer, train_texts)
    windows = validation_windows(token_stream(tokenizer, read_texts(validation_files)), recipe.seq_len, recipe.validation_tokens)
    logger.info(f"{len(train_files)} training files ({train_stream.numel()} tokens), {len(validation_files)} validation files")

    model = _make_model(recipe, seed)
    train_started = time.monotonic()
    sampler = _TrainingWindows(train_stream, tokenizer, recipe, torch.Generator().manual_seed(seed))
    steps, last_loss = _train(model, sampler, recipe, budget_s=budget_s, progress=progress)
    train_seconds = time.monotonic() - train_started
    model.eval()
    validation = model_perplexity(model, windows)
    sample = _greedy(model, tokenizer, SAMPLE_PROMPT, max_new_tokens=48)
    with _quiet_transformers():
        model.save_pretrained(folder)
    parameters = sum(p.numel() for p in model.parameters())
    return {
        "version": RECORD_VERSION,
        "validation_perplexity": validation,
        "unigram_perplexity": unigram_perplexity(train_stream, windows, recipe.vocab_size),
        "validation_tokens": windows[:, 1:].numel(),  # scored; windows of seq_len = <s> + seq_len - 1 of them
        "seq_len": recipe.seq_len,
        "steps": steps,
        "tokens_seen": steps * recipe.batch_size * (recipe.seq_len - 1),
        "final_train_loss": last_loss,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.monotonic() - started, 1),
        "budget_s": budget_s,
        "seed": seed,
        "parameters": parameters,
        "recipe": dataclasses.asdict(recipe),
        "corpus": {
            "stdlib": sysconfig.get_paths()["stdlib"],
            "python": platform.python_version(),
            "train_files": len(train_files),
            "validation_files": len(validation_files),
            "train_tokens": train_stream.numel(),
        },
        "sample": {"prompt": SAMPLE_PROMPT, "greedy": sample},
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
    }


def _train_tokenizer(texts: Sequence[str], recipe: Recipe) -> Any:
    """A byte-level BPE learned on the training files: any text still round-trips, and Python's
    keywords and indentation runs become single tokens (~3.5 characters a token at 4096)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # as save_byte_level_tokenizer sets it
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # first, so they take ids 0..3 as in the random models
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen in the corpus or not
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def _make_model(recipe: Recipe, seed: int) -> Any:
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        intermediate_size=recipe.intermediate_size,
        max_position_embeddings=recipe.seq_len,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        tie_word_embeddings=False,  # as in the larger Llamas: the head is its own matrix, a separate tensor to serve
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    with torch.random.fork_rng(devices=[]):  # seed locally: the caller's RNG stream is left untouched
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).float()
    model.config.dtype = torch.float32
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    return model


class _TrainingWindows:
    """Random training windows [batch, seq_len]: <s>, then seq_len - 1 tokens of the stream.

    Two choices make prompts look like the training data. Windows start at the start of a line
    (prompts do: "def ", "import", "class"), so "<s>def" is common, not a rare file start. And a
    `space_split_share` of the tokens " name" are written as " " + "name": byte-level BPE gives a
    name its leading space, so a prompt ending in a space ("def ") ends on a lone space token, which
    the corpus has only inside indentation. Validation windows keep the tokenizer's own spelling.
    """

    def __init__(self, stream: torch.Tensor, tokenizer: Any, recipe: Recipe, generator: torch.Generator) -> None:
        self.stream, self.recipe, self.generator = stream, recipe, generator
        self.offsets = torch.arange(recipe.seq_len - 1)
        ends_line = torch.tensor([i == BOS_ID or "\n" in tokenizer.decode([i]) for i in range(recipe.vocab_size)])
        self.starts = ends_line[stream[: stream.numel() - len(self.offsets) - 1]].nonzero().flatten() + 1
        self.space_id = tokenizer.backend_tokenizer.encode(" ", add_special_tokens=False).ids[0]
        space, vocab = tokenizer.convert_ids_to_tokens(self.space_id), tokenizer.get_vocab()
        self.rest = torch.full((recipe.vocab_size,), -1, dtype=torch.long)  # " name" -> "name", where that is a token
        for token, token_id in vocab.items():
            if token.startswith(space) and token[len(space) :] in vocab:
                self.rest[token_id] = vocab[token[len(space) :]]

    def sample(self) -> torch.Tensor:
        picks = torch.randint(0, len(self.starts), (self.recipe.batch_size,), generator=self.generator)
        chunks = self.stream[self.starts[picks, None] + self.offsets]  # [batch, seq - 1]
        split = (self.rest[chunks] >= 0) & (torch.rand(chunks.shape, generator=self.generator) < self.recipe.space_split_share)
        pairs = torch.stack([torch.where(split, self.space_id, chunks), torch.where(split, self.rest[chunks], -1)], dim=-1)
        pairs = pairs.flatten(1)  # [batch, 2 * (seq - 1)]: each token, then its second half or -1
        kept_first = torch.argsort((pairs < 0).to(torch.int8), dim=1, stable=True)  # the -1s last, the rest in order
        return with_bos(pairs.gather(1, kept_first[:, : chunks.shape[1]]))


def _train(model: Any, sampler: _TrainingWindows, recipe: Recipe, *, budget_s: float, progress: bool) -> tuple[int, float]:
    """AdamW on random windows until the budget or max_steps; returns (steps, the last losses' moving average).

    The schedule's progress is max(elapsed / budget, step / max_steps), so the rate decays over
    whatever number of steps the machine manages in the budget rather than a guessed step count.
    """
    from tqdm.auto import tqdm

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.learning_rate,
        betas=(0.9, 0.95),
    )
    model.train()
    started, step, loss_ema = time.monotonic(), 0, float("nan")
    bar = tqdm(
        total=100, desc="training", unit="%", disable=not progress, bar_format="{l_bar}{bar}| {elapsed}<{remaining}{postfix}"
    )
    while True:
        done = max((time.monotonic() - started) / budget_s, step / recipe.max_steps)
        if done >= 1.0:
            break
        warmup = min(1.0, (step + 1) / recipe.warmup_steps)
        for group in optimizer.param_groups:
            group["lr"] = recipe.learning_rate * warmup * (0.1 + 0.45 * (1.0 + math.cos(math.pi * done)))
        batch = sampler.sample()  # [batch, seq]
        loss = model(input_ids=batch, labels=batch).loss  # labels are shifted inside: token t predicts t + 1
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        loss_ema = loss.item() if math.isnan(loss_ema) else 0.95 * loss_ema + 0.05 * loss.item()
        bar.set_postfix_str(f"step {step}, loss {loss_ema:.3f}", refresh=False)
        bar.update(min(100, int(100 * done)) - bar.n)
    bar.update(100 - bar.n)
    bar.close()
    return step, loss_ema


@torch.no_grad()
def _greedy(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    output = model.generate(input_ids, max_new_tokens=max_new_tokens, do_sample=False)
    return prompt + tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
